//! Tool calls written as JSON in a model's text, for models that do not use the API's
//! `tool_calls` (Qwen2.5-Coder on llama-server answers with a fenced JSON object):
//!
//! - tagged: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one or more; or
//!   in `<tools>` tags, the tags the Qwen template puts around the tools' signatures
//!   (the 1.5B model writes its call in them now and then);
//! - fenced: a ```` ```json ```` (or bare ```` ``` ````) block holding such an object, or an
//!   array of them;
//! - bare: the whole answer is such an object or array, or one such object per line;
//!   or its first lines are such objects and the rest is prose (`{"name": …}` and then a
//!   line saying what it is for, as small models write);
//! - described: no call in any of those forms, but prose that names exactly one tool on
//!   offer and, after that name, a fenced JSON object that is that tool's arguments by
//!   its schema ("I called the `http__request` function with: ```json {"url": …}```",
//!   as the 1.5B Qwen model writes it). Only the first object fenced after the name is
//!   read, and only if every key is a property the schema declares and every property
//!   it requires is there, so a result the model imagined after it is never the call.
//!
//! A call counts only if it names a tool on offer, or another tool of a connector on
//! offer (`fs.write_file` when only `fs.read_file` is offered: a call the policy then
//! refuses, so the model hears why, rather than text taken for its answer), and its
//! arguments are a JSON object (given as an object or as a string holding one): JSON
//! that happens to be in an answer is not taken for a call. A call written out again
//! is the same call, made once: a small model repeats one until its token limit. An
//! answer that writes out more than 16 different calls, or more than 64 in all, makes
//! none. Nothing here recurses beyond serde_json's own limit.

use serde_json::Value;

use crate::openai::MAX_CALLS;
use crate::{CallForm, ToolCall, ToolSpec};

/// The most calls one answer may write out, the same call written again included.
const MAX_WRITTEN_CALLS: usize = 4 * MAX_CALLS;

/// The calls `text` writes out, and how; `None` if it writes none.
pub fn parse(text: &str, tools: &[ToolSpec]) -> Option<(Vec<ToolCall>, CallForm)> {
    if tools.is_empty() {
        return None;
    }
    // Tags and fences mark where the calls are, so a marked block that is no call (a
    // small model fences a "call" to its step's `test -s` check after a real one) is
    // passed over; unmarked JSON counts only when all of it is calls.
    let mut tagged = between(text, "<tool_call>", "</tool_call>");
    if tagged.is_empty() {
        tagged = between(text, "<tools>", "</tools>");
    }
    if !tagged.is_empty() {
        return calls(&tagged, tools, Blocks::SomeCalls).map(|c| (c, CallForm::Tagged));
    }
    let fenced = fences(text);
    if !fenced.is_empty() {
        return calls(&fenced, tools, Blocks::SomeCalls)
            .map(|c| (c, CallForm::Fenced))
            .or_else(|| described(text, tools).map(|c| (vec![c], CallForm::Described)));
    }
    let text = text.trim();
    calls(&[text], tools, Blocks::AllCalls)
        .or_else(|| {
            calls(
                &text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect::<Vec<_>>(),
                tools,
                Blocks::AllCalls,
            )
        })
        .or_else(|| calls_then_prose(text, tools))
        .map(|c| (c, CallForm::Bare))
        .or_else(|| described(text, tools).map(|c| (vec![c], CallForm::Described)))
}

/// The calls on the answer's first lines, when prose follows them: the first line that
/// is no call must be no JSON either, so an answer with a broken or foreign object
/// among its calls is still text.
fn calls_then_prose(text: &str, tools: &[ToolSpec]) -> Option<Vec<ToolCall>> {
    let mut out = Written::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match block_calls(line, tools) {
            Some(calls) => out.add(calls),
            None if out.calls.is_empty() || line.trim_start().starts_with(['{', '[']) => {
                return None;
            }
            None => break,
        }
        if out.too_many() {
            return None;
        }
    }
    out.calls()
}

/// The call `text` describes: its prose (outside code fences) names one tool on offer
/// and no other, and the first JSON object after that name — in a fenced block, or in
/// inline code (`` `{"path": "a"}` ``) — fits the tool's schema ([`fits`]).
fn described(text: &str, tools: &[ToolSpec]) -> Option<ToolCall> {
    // Split at the fence marks, even pieces are prose and odd ones fenced; the last
    // piece is prose, or an unclosed fence, and is never read as a block.
    let pieces: Vec<&str> = text.split("```").collect();
    let mut named: Option<(&ToolSpec, usize, usize)> = None;
    for (at, prose) in pieces.iter().enumerate().step_by(2) {
        for tool in tools.iter() {
            let Some(offset) = named_at(prose, tool) else {
                continue;
            };
            match named {
                None => named = Some((tool, at, offset)),
                Some((first, _, _)) if first.name == tool.name => {}
                Some(_) => return None,
            }
        }
    }
    let (tool, at, offset) = named?;
    let last = pieces.len() - 1;
    // What follows the name, in order: inline code of the prose, fenced blocks.
    let mut after: Vec<&str> = Vec::new();
    for (i, piece) in pieces.iter().enumerate().skip(at) {
        if i % 2 == 1 {
            if i < last {
                after.push(without_info(piece));
            }
            continue;
        }
        let mut start = 0;
        for (n, span) in piece.split('`').enumerate() {
            // Odd parts are inline code; one that holds the name itself is not after it.
            if n % 2 == 1 && (i > at || start > offset) {
                after.push(span);
            }
            start += span.len() + 1;
        }
    }
    let arguments = after.iter().find_map(|code| {
        serde_json::from_str::<Value>(code.trim())
            .ok()
            .filter(Value::is_object)
    })?;
    fits(&arguments, &tool.parameters).then(|| ToolCall {
        id: String::new(),
        tool: tool.name.clone(),
        args_json: arguments.to_string(),
    })
}

/// Where `prose` first names `tool`, by its name or its wire name, as a word of its own
/// (`http.request.` at the end of a sentence does; `http.requests` does not).
fn named_at(prose: &str, tool: &ToolSpec) -> Option<usize> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    [tool.name.clone(), tool.wire_name()]
        .iter()
        .filter_map(|name| {
            prose.match_indices(name.as_str()).find_map(|(at, _)| {
                let before = prose[..at].chars().next_back();
                let mut after = prose[at + name.len()..].chars();
                let starts = !before.is_some_and(|c| word(c) || c == '.');
                let ends = match after.next() {
                    None => true,
                    Some('.') => !after.next().is_some_and(word),
                    Some(c) => !word(c),
                };
                (starts && ends).then_some(at)
            })
        })
        .min()
}

/// Whether `arguments` are a tool's arguments by its JSON schema: the schema declares
/// its properties, every key of `arguments` is one of them, and every property the
/// schema requires is there. (The connector validates the values; this only tells
/// arguments from any other object.)
fn fits(arguments: &Value, schema: &Value) -> bool {
    let (Some(arguments), Some(properties)) = (
        arguments.as_object(),
        schema.get("properties").and_then(Value::as_object),
    ) else {
        return false;
    };
    let required = schema
        .get("required")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    arguments.keys().all(|key| properties.contains_key(key))
        && required
            .iter()
            .all(|key| key.as_str().is_some_and(|key| arguments.contains_key(key)))
}

/// Which blocks of an answer must be calls for any of them to count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocks {
    AllCalls,
    SomeCalls,
}

/// The calls in `blocks`, each a JSON object or an array of objects; `None` if they
/// make no call, or if one is not a call and `need` is [`Blocks::AllCalls`].
fn calls(blocks: &[&str], tools: &[ToolSpec], need: Blocks) -> Option<Vec<ToolCall>> {
    let mut out = Written::default();
    for block in blocks {
        match block_calls(block, tools) {
            Some(calls) => out.add(calls),
            None if need == Blocks::AllCalls => return None,
            None => {}
        }
        if out.too_many() {
            return None;
        }
    }
    out.calls()
}

/// The calls an answer writes out, each once: a call written out again is the same
/// call (the 1.5B model, told a step is not done, wrote one fetch 16 and 35 times over
/// until its token limit, and meant one fetch).
#[derive(Default)]
struct Written {
    calls: Vec<ToolCall>,
    written: usize,
}

impl Written {
    fn add(&mut self, calls: Vec<ToolCall>) {
        for call in calls {
            self.written += 1;
            if !self.calls.contains(&call) {
                self.calls.push(call);
            }
        }
    }

    /// More than one answer may make: more than [`MAX_CALLS`] different calls, or
    /// more than [`MAX_WRITTEN_CALLS`] written out in all.
    fn too_many(&self) -> bool {
        self.calls.len() > MAX_CALLS || self.written > MAX_WRITTEN_CALLS
    }

    fn calls(self) -> Option<Vec<ToolCall>> {
        (!self.calls.is_empty()).then_some(self.calls)
    }
}

/// The calls of one block, if it is wholly calls.
fn block_calls(block: &str, tools: &[ToolSpec]) -> Option<Vec<ToolCall>> {
    let objects = match json_or_doubled(block.trim())? {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        _ => return None,
    };
    if objects.len() > MAX_CALLS {
        return None;
    }
    objects.iter().map(|object| call(object, tools)).collect()
}

/// `block` as JSON; or, when it opens with a doubled brace (`{{"name": …}}`, as the
/// 1.5B Qwen model writes calls now and then, as if escaping a template), as the JSON
/// inside one pair of braces less, with up to two stray closing braces more dropped.
fn json_or_doubled(block: &str) -> Option<Value> {
    if let Ok(value) = serde_json::from_str(block) {
        return Some(value);
    }
    let inner = block.strip_prefix("{{")?;
    let mut inner = format!("{{{inner}");
    for _ in 0..3 {
        inner = inner.strip_suffix('}')?.trim_end().to_owned();
        if let Ok(value @ Value::Object(_)) = serde_json::from_str(&inner) {
            return Some(value);
        }
    }
    None
}

/// `{"name", "arguments" | "parameters"}`, possibly inside `{"function": …}`.
fn call(object: &Value, tools: &[ToolSpec]) -> Option<ToolCall> {
    let object = object.get("function").unwrap_or(object);
    let name = object.get("name")?.as_str()?;
    let tool = match crate::resolve(tools, name) {
        Some(tool) => tool.name.clone(),
        None => of_a_connector_on_offer(tools, name)?,
    };
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None => Value::Object(Default::default()),
        Some(Value::String(text)) => serde_json::from_str(text).ok()?,
        Some(value) => value.clone(),
    };
    if !arguments.is_object() {
        return None;
    }
    Some(ToolCall {
        id: String::new(),
        tool,
        args_json: arguments.to_string(),
    })
}

/// `name` as a tool name (`fs.write_file`, written `fs.write_file` or `fs__write_file`)
/// if its connector serves a tool on offer.
fn of_a_connector_on_offer(tools: &[ToolSpec], name: &str) -> Option<String> {
    let (connector, tool) = name.split_once('.').or_else(|| name.split_once("__"))?;
    let well_formed = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_TOOL_NAME
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let offered = tools
        .iter()
        .any(|t| t.name.split_once('.').is_some_and(|(c, _)| c == connector));
    (offered && well_formed(connector) && well_formed(tool)).then(|| format!("{connector}.{tool}"))
}

/// The longest connector or tool name taken from a model's text.
const MAX_TOOL_NAME: usize = 64;

/// The texts between each `open` and the next `close`.
fn between<'t>(text: &'t str, open: &str, close: &str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// The contents of the text's ```` ``` ```` blocks, without their info strings.
fn fences(text: &str) -> Vec<&str> {
    between(text, "```", "```")
        .into_iter()
        .map(without_info)
        .collect()
}

/// A fenced block without its info string (`json`), which runs to the end of the
/// opening line.
fn without_info(block: &str) -> &str {
    match block.find('\n') {
        Some(newline) if !block[..newline].trim_start().starts_with(['{', '[']) => {
            &block[newline + 1..]
        }
        _ => block,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<ToolSpec> {
        ["write_file", "read_file"]
            .into_iter()
            .map(|name| ToolSpec {
                name: name.into(),
                description: "".into(),
                parameters: serde_json::json!({"type": "object"}).into(),
            })
            .collect()
    }

    fn one(text: &str) -> (String, String, CallForm) {
        let (calls, form) = parse(text, &tools()).expect("a call");
        assert_eq!(calls.len(), 1, "{calls:?}");
        (calls[0].tool.clone(), calls[0].args_json.clone(), form)
    }

    #[test]
    fn reads_each_written_form() {
        let fenced = "```json\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"scratch/a\", \"content\": \"x\"}}\n```";
        assert_eq!(
            one(fenced),
            (
                "write_file".into(),
                r#"{"content":"x","path":"scratch/a"}"#.into(),
                CallForm::Fenced
            )
        );
        let bare = r#"  {"name": "read_file", "arguments": "{\"path\": \"scratch/a\"}"} "#;
        assert_eq!(
            one(bare),
            (
                "read_file".into(),
                r#"{"path":"scratch/a"}"#.into(),
                CallForm::Bare
            )
        );
        // The second as the 1.5B model wrote it, in the tags its template puts around the
        // tools' signatures (errands).
        for tagged in [
            "I will read it.\n<tool_call>\n{\"name\": \"read_file\", \"parameters\": {\"path\": \"p\"}}\n</tool_call>",
            "<tools> {\"name\": \"read_file\", \"arguments\": {\"path\":\"p\"}} </tools>",
        ] {
            assert_eq!(
                one(tagged),
                (
                    "read_file".into(),
                    r#"{"path":"p"}"#.into(),
                    CallForm::Tagged
                )
            );
        }
        let lines = "{\"name\": \"read_file\", \"arguments\": {}}\n\n{\"name\": \"write_file\", \"arguments\": {}}\n";
        let (calls, form) = parse(lines, &tools()).unwrap();
        assert_eq!((calls.len(), form), (2, CallForm::Bare));
        let wrapped = "```\n[{\"function\": {\"name\": \"read_file\", \"arguments\": {}}}]\n```";
        assert_eq!(
            one(wrapped),
            ("read_file".into(), "{}".into(), CallForm::Fenced)
        );
    }

    #[test]
    fn calls_followed_by_prose_are_read() {
        let read = r#"{"name": "read_file", "arguments": {"path": "p"}}"#;
        let write = r#"{"name": "write_file", "arguments": {"path": "q", "content": "x"}}"#;
        let text = format!("{read}\nI asked for the file; I will sum it up next.");
        assert_eq!(
            one(&text),
            ("read_file".into(), r#"{"path":"p"}"#.into(), CallForm::Bare)
        );
        let (calls, _) = parse(&format!("{read}\n\n{write}\nBoth asked."), &tools()).unwrap();
        assert_eq!(calls.len(), 2);
        // Prose first, a foreign or broken object after the calls, or too many: text.
        for text in [
            format!("I will read it.\n{read}"),
            format!("{read}\n{{\"name\": \"test\", \"arguments\": {{}}}}\nThen done."),
            format!("{read}\n{{\"name\": \"write_file\", \"arg\nDone."),
            format!(
                "{}\nToo many.",
                (0..=MAX_CALLS)
                    .map(|i| format!(r#"{{"name": "read_file", "arguments": {{"path": "p{i}"}}}}"#))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ] {
            assert_eq!(parse(&text, &tools()), None, "{text:?}");
        }
    }

    #[test]
    fn a_call_in_doubled_braces_is_read() {
        // As the 1.5B model wrote them (recorded), with one or two stray braces more.
        for text in [
            r#"{{"name": "read_file", "arguments": {"path": "p"}}}"#,
            r#"{{"name": "read_file", "arguments": {"path": "p"}}}}"#,
            "{{\"name\": \"read_file\", \"arguments\": {\"path\": \"p\"}}}}\nI did it.",
        ] {
            let (tool, args, _) = one(text.lines().next().unwrap_or_default());
            assert_eq!(
                (tool.as_str(), args.as_str()),
                ("read_file", r#"{"path":"p"}"#)
            );
        }
        // Not a way around the rules: still only a call to a tool on offer.
        assert_eq!(
            parse(r#"{{"name": "rm_rf", "arguments": {}}}"#, &tools()),
            None
        );
        assert_eq!(parse("{{ not json }}", &tools()), None);
    }

    #[test]
    fn json_that_is_no_call_is_text() {
        for text in [
            "",
            "All done: I wrote scratch/REPORT.org.",
            r#"{"name": "Bob", "arguments": {}}"#,
            r#"{"name": "write_file", "arguments": [1, 2]}"#,
            r#"{"name": "write_file", "arguments": "not json"}"#,
            "```json\n{\"name\": \"write_file\"\n```",
            "```\n[1, 2, 3]\n```",
            "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
            "<tool_call>unterminated",
            // One call per line, the last cut off by the token limit: none of them.
            "{\"name\": \"read_file\", \"arguments\": {}}\n{\"name\": \"write_file\", \"arg",
        ] {
            assert_eq!(parse(text, &tools()), None, "{text:?}");
        }
        assert_eq!(parse(r#"{"name": "read_file"}"#, &[]), None);
    }

    #[test]
    fn a_call_to_another_tool_of_a_connector_on_offer_is_a_call() {
        let offered = vec![ToolSpec {
            name: "fs.read_file".into(),
            description: "".into(),
            parameters: serde_json::json!({"type": "object"}).into(),
        }];
        for (text, tool) in [
            (
                "```json\n{\"name\": \"fs.write_file\", \"arguments\": {\"path\": \"a\"}}\n```",
                Some("fs.write_file"),
            ),
            (
                "<tool_call>{\"name\": \"fs__write_file\", \"arguments\": {}}</tool_call>",
                Some("fs.write_file"),
            ),
            (
                r#"{"name": "fs.read_file", "arguments": {}}"#,
                Some("fs.read_file"),
            ),
            // Another connector, none, or a name no tool could have: text.
            (r#"{"name": "web.fetch", "arguments": {}}"#, None),
            (r#"{"name": "write_file", "arguments": {}}"#, None),
            (r#"{"name": "fs.", "arguments": {}}"#, None),
            (r#"{"name": "fs.rm -rf /", "arguments": {}}"#, None),
        ] {
            let got = parse(text, &offered).map(|(calls, _)| calls[0].tool.clone());
            assert_eq!(got.as_deref(), tool, "{text}");
        }
    }

    #[test]
    fn a_marked_block_that_is_no_call_is_passed_over() {
        let write = r#"{"name": "write_file", "arguments": {"path": "scratch/a", "content": "x"}}"#;
        let check = r#"{"name": "test", "arguments": {"path": "scratch/a"}}"#;
        let fenced = format!("```json\n{write}\n```\n```json\n{check}\n```");
        let tagged = format!("<tool_call>{check}</tool_call><tool_call>{write}</tool_call>");
        for (text, form) in [(fenced, CallForm::Fenced), (tagged, CallForm::Tagged)] {
            let (calls, got) = parse(&text, &tools()).expect("the real call");
            assert_eq!(got, form);
            assert_eq!(calls.len(), 1, "{calls:?}");
            assert_eq!(calls[0].tool, "write_file");
        }
        // Unmarked, one line that is no call makes the whole answer text.
        assert_eq!(parse(&format!("{write}\n{check}"), &tools()), None);
        // Marked blocks none of which is a call are text.
        assert_eq!(parse(&format!("```\n{check}\n```"), &tools()), None);
    }

    #[test]
    fn a_call_described_in_prose_with_fenced_arguments_is_read() {
        let http = ToolSpec {
            name: "http.request".into(),
            description: "".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"method": {}, "url": {}, "headers": {}, "body": {}},
                "required": ["method", "url"],
            })
            .into(),
        };
        let search = ToolSpec {
            name: "tools.search".into(),
            description: "".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"query": {}}}).into(),
        };
        let offered = [http, search];
        let arguments = "```json\n{\n  \"method\": \"GET\",\n  \"url\": \"http://127.0.0.1:36161/about\"\n}\n```";
        // As the 1.5B model wrote it (recorded), with the result it imagined after it.
        let recorded = format!(
            "I called the `http__request` function with the following arguments:\n{arguments}\n\
             The function returned the following result:\n```json\n{{\"status\": 200, \"body\": \"...\"}}\n```\n\
             I then wrote the company's name to scratch/REPORT.org."
        );
        let (calls, form) = parse(&recorded, &offered).expect("the described call");
        assert_eq!(form, CallForm::Described);
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].tool.as_str(), calls[0].args_json.as_str()),
            (
                "http.request",
                r#"{"method":"GET","url":"http://127.0.0.1:36161/about"}"#
            )
        );
        let read = |text: &str| parse(text, &offered).map(|(calls, _)| calls[0].tool.clone());
        // Named by its own name, at the end of a sentence: read.
        assert_eq!(
            read(&format!("I will use http.request.\n{arguments}")).as_deref(),
            Some("http.request")
        );
        for text in [
            // Two tools named, or none, or only after the block: text.
            format!("I ran tools__search, then http__request:\n{arguments}"),
            format!("Here are the arguments:\n{arguments}"),
            format!("{arguments}\nThat was for http__request."),
            // A name inside a longer word is no name.
            format!("I called xhttp__request:\n{arguments}"),
            format!("I called http.requests:\n{arguments}"),
            // The first object after the name is not the tool's arguments: a key the
            // schema does not declare, or one it requires is missing.
            format!("http__request returned:\n```json\n{{\"status\": 200}}\n```\n{arguments}"),
            "http__request:\n```json\n{\"url\": \"http://a/\"}\n```".into(),
            // An unclosed fence is not a block.
            "http__request:\n```json\n{\"method\": \"GET\", \"url\": \"http://a/\"}".into(),
        ] {
            assert_eq!(read(&text), None, "{text:?}");
        }
        // Its arguments in inline code (recorded, a later run): read; the same words
        // naming two tools, as its next turn wrote them, are a story, not a call.
        let inline = "I called the `http__request` function with the arguments \
            `{\"method\": \"GET\", \"url\": \"http://127.0.0.1:36795/about\"}`. The function \
            returned the status, headers, and body of the request.";
        let (calls, form) = parse(inline, &offered).expect("the described call");
        assert_eq!(form, CallForm::Described);
        assert_eq!(
            calls[0].args_json,
            r#"{"method":"GET","url":"http://127.0.0.1:36795/about"}"#
        );
        let story = "I called the `tools__search` function with the arguments \
            `{\"query\": \"fetch web page\"}`. I then called the `http__request` function \
            with the arguments `{\"method\": \"GET\", \"url\": \"http://a/\"}`.";
        assert_eq!(parse(story, &offered), None);
        // Inline code before the name, or holding the name, is not its arguments.
        assert_eq!(
            read("With `{\"method\": \"GET\", \"url\": \"http://a/\"}` I called `http__request`."),
            None
        );
        // A tool whose schema declares no properties cannot be told from any object.
        let loose = parse(
            "I called `read_file`:\n```json\n{\"path\": \"p\"}\n```",
            &tools(),
        );
        assert_eq!(loose, None);
    }

    #[test]
    fn a_call_written_again_and_again_is_one_call() {
        let call = "```json\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"p\"}}\n```\n";
        // As the 1.5B model wrote one: over and over until its token limit cut the last.
        let again = format!("{}```json\n{{\"name\": \"read", call.repeat(MAX_CALLS + 4));
        let (calls, form) = parse(&again, &tools()).unwrap();
        assert_eq!((calls.len(), form), (1, CallForm::Fenced));
        let lines = "{\"name\": \"read_file\", \"arguments\": {}}\n";
        let parsed = |n: usize| parse(&lines.repeat(n), &tools()).map(|(c, _)| c.len());
        assert_eq!(parsed(MAX_CALLS + 1), Some(1));
        assert_eq!(parsed(MAX_WRITTEN_CALLS), Some(1));
        assert_eq!(parsed(MAX_WRITTEN_CALLS + 1), None);
    }

    #[test]
    fn too_many_calls_are_none() {
        let calls = |n: usize| {
            (0..n)
                .map(|i| format!(r#"{{"name": "read_file", "arguments": {{"path": "p{i}"}}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        };
        let many = format!("[{}]", calls(MAX_CALLS + 1));
        assert_eq!(parse(&many, &tools()), None);
        let enough = format!("[{}]", calls(MAX_CALLS));
        assert_eq!(
            parse(&enough, &tools()).map(|(c, _)| c.len()),
            Some(MAX_CALLS)
        );
    }
}
