//! Tool calls written as JSON in a model's text, for models that do not use the API's
//! `tool_calls` (Qwen2.5-Coder on llama-server answers with a fenced JSON object):
//!
//! - tagged: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one or more;
//! - fenced: a ```` ```json ```` (or bare ```` ``` ````) block holding such an object, or an
//!   array of them;
//! - bare: the whole answer is such an object or array, or one such object per line.
//!
//! A call counts only if it names a tool on offer and its arguments are a JSON object
//! (given as an object or as a string holding one): JSON that happens to be in an
//! answer is not taken for a call. Nothing here recurses beyond serde_json's own limit.

use serde_json::Value;

use crate::openai::MAX_CALLS;
use crate::{CallForm, ToolCall, ToolSpec};

/// The calls `text` writes out, and how; `None` if it writes none.
pub fn parse(text: &str, tools: &[ToolSpec]) -> Option<(Vec<ToolCall>, CallForm)> {
    if tools.is_empty() {
        return None;
    }
    let tagged = between(text, "<tool_call>", "</tool_call>");
    if !tagged.is_empty() {
        return calls(&tagged, tools).map(|c| (c, CallForm::Tagged));
    }
    let fenced = fences(text);
    if !fenced.is_empty() {
        return calls(&fenced, tools).map(|c| (c, CallForm::Fenced));
    }
    let text = text.trim();
    calls(&[text], tools)
        .or_else(|| {
            calls(
                &text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect::<Vec<_>>(),
                tools,
            )
        })
        .map(|c| (c, CallForm::Bare))
}

/// The calls in `blocks`, each a JSON object or an array of objects; `None` unless every
/// block is one and they make at least one call.
fn calls(blocks: &[&str], tools: &[ToolSpec]) -> Option<Vec<ToolCall>> {
    let mut out = Vec::new();
    for block in blocks {
        let value: Value = serde_json::from_str(block.trim()).ok()?;
        let objects = match value {
            Value::Array(items) => items,
            object @ Value::Object(_) => vec![object],
            _ => return None,
        };
        for object in objects {
            out.push(call(&object, tools)?);
            if out.len() > MAX_CALLS {
                return None;
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `{"name", "arguments" | "parameters"}`, possibly inside `{"function": …}`.
fn call(object: &Value, tools: &[ToolSpec]) -> Option<ToolCall> {
    let object = object.get("function").unwrap_or(object);
    let name = object.get("name")?.as_str()?;
    let tool = crate::resolve(tools, name)?;
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
        tool: tool.name.clone(),
        args_json: arguments.to_string(),
    })
}

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
        .map(|block| match block.find('\n') {
            // The info string (`json`) runs to the end of the opening line.
            Some(newline) if !block[..newline].trim_start().starts_with(['{', '[']) => {
                &block[newline + 1..]
            }
            _ => block,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<ToolSpec> {
        ["write_file", "read_file"]
            .into_iter()
            .map(|name| ToolSpec {
                name: name.into(),
                description: String::new(),
                parameters: serde_json::json!({"type": "object"}),
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
        let tagged = "I will read it.\n<tool_call>\n{\"name\": \"read_file\", \"parameters\": {\"path\": \"p\"}}\n</tool_call>";
        assert_eq!(
            one(tagged),
            (
                "read_file".into(),
                r#"{"path":"p"}"#.into(),
                CallForm::Tagged
            )
        );
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
    fn too_many_calls_are_none() {
        let call = r#"{"name": "read_file", "arguments": {}}"#;
        let many = format!("[{}]", vec![call; MAX_CALLS + 1].join(","));
        assert_eq!(parse(&many, &tools()), None);
        let enough = format!("[{}]", vec![call; MAX_CALLS].join(","));
        assert_eq!(
            parse(&enough, &tools()).map(|(c, _)| c.len()),
            Some(MAX_CALLS)
        );
    }
}
