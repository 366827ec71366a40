//! The offline provider. **Not a language model**: a deterministic stand-in that
//! needs no network and no weights. It exists so Dispatch runs end to end on any
//! machine, and so tests and benchmarks see exactly reproducible runs.
//!
//! - As author, it writes the same three-leaf plan shape for every goal — unless the
//!   goal already is an org outline with a TODO headline, which it hands back as the
//!   plan, so a caller can choose the plan exactly.
//! - In a leaf, it first makes the calls the leaf's body spells out on lines of the form
//!   `call: <tool> <json args>`, then reads the scratch files the body names, then
//!   writes whatever the leaf's `:done-when:` gate checks for, then stops.

use dispatch_plan::gate::{self, Check};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::{
    AuthorReply, AuthorRequest, CallForm, Error, Exchange, JudgeRequest, Judgement, Provider,
    ToolCall, TurnReply, TurnRequest, Usage, Verdict,
};

/// The provider's name as recorded in events.
pub const NAME: &str = "offline";

/// The offline provider. `pace` is how long it takes per word of a turn's text when
/// someone listens to it stream (zero: the whole text at once), so a stack without a
/// model streams as it would with one.
#[derive(Debug, Clone, Default)]
pub struct Offline {
    pub pace: std::time::Duration,
}

impl Provider for Offline {
    fn name(&self) -> &str {
        NAME
    }

    fn author(&self, request: AuthorRequest) -> BoxFuture<'_, Result<AuthorReply, Error>> {
        let text = if is_outline(&request.goal) {
            request.goal.clone()
        } else {
            plan_for(&request.goal)
        };
        async move {
            Ok(AuthorReply {
                cut_off: false,
                text,
                usage: Usage::default(),
            })
        }
        .boxed()
    }

    /// The offline validator's verdict depends on the call's risk class alone, so
    /// every path of the gate can be shown without a model: reads and writes are
    /// allowed, external calls denied, destructive ones escalated to a person.
    fn judge(&self, request: JudgeRequest) -> BoxFuture<'_, Result<Judgement, Error>> {
        let (verdict, reason) = match request.risk.as_str() {
            "read" | "write" => (
                Verdict::Allow,
                "the offline validator allows reads and writes",
            ),
            "external" => (Verdict::Deny, "the offline validator denies external calls"),
            _ => (
                Verdict::Escalate,
                "the offline validator leaves destructive calls to a person",
            ),
        };
        async move {
            Ok(Judgement {
                verdict,
                reason: reason.to_owned(),
                usage: Usage::default(),
            })
        }
        .boxed()
    }

    fn turn(&self, request: TurnRequest) -> BoxFuture<'_, Result<TurnReply, Error>> {
        async move {
            let reply = turn(&request);
            if let Some(deltas) = &request.deltas {
                for word in reply.text.split_inclusive(' ') {
                    if !self.pace.is_zero() {
                        tokio::time::sleep(self.pace).await;
                    }
                    let _ = deltas.send(crate::Delta::Text(word.to_owned()));
                }
            }
            Ok(reply)
        }
        .boxed()
    }
}

/// The plan the offline provider writes for `goal`.
pub fn plan_for(goal: &str) -> String {
    let title = one_line(goal, 80);
    format!(
        "#+TITLE: {title}

* TODO Write the goal down
  :PROPERTIES:
  :ORDERED: t
  :END:
  - Record the goal, word for word, in scratch/goal.org.
  :done-when: test -s scratch/goal.org

* TODO Note what the goal asks for
  :PROPERTIES:
  :ORDERED: t
  :END:
  - List the goal's key terms, one per line, in scratch/notes.org.
  :done-when: grep -q 'key terms' scratch/notes.org

* TODO Consolidate into a report
  :PROPERTIES:
  :ORDERED: t
  :END:
  - Read scratch/goal.org and scratch/notes.org and combine them into scratch/REPORT.org.
  :done-when: test -s scratch/REPORT.org && grep -q '#+TITLE' scratch/REPORT.org
"
    )
}

/// True when `goal` already is a plan: some line is a TODO-family headline.
fn is_outline(goal: &str) -> bool {
    goal.lines().any(|line| {
        let stars = line.bytes().take_while(|&b| b == b'*').count();
        stars > 0
            && line[stars..].starts_with(' ')
            && dispatch_plan::TODO_KEYWORDS
                .iter()
                .any(|k| line[stars..].trim_start().starts_with(&format!("{k} ")))
    })
}

/// A chat turn, offline: the message's `call:` lines are called on the first turn;
/// then the answer says, in fixed words, what it was told — the message, how many
/// earlier turns it was given (and the first words of the last one), the notes it was
/// handed, and the calls' results — so that what reached the model can be seen.
fn chat_turn(chat: &crate::Chat, history: &[Exchange]) -> TurnReply {
    let explicit = explicit_calls(&chat.message);
    if history.is_empty() && !explicit.is_empty() {
        let names: Vec<&str> = explicit.iter().map(|c| c.tool.as_str()).collect();
        return reply(format!("Calling {}.", names.join(", ")), explicit);
    }
    let mut text = format!(
        "Offline model (not a language model). You said: {}.",
        one_line(&chat.message, 200)
    );
    match chat.earlier.last() {
        None => text.push_str(" This is the first turn I was given."),
        Some(last) => text.push_str(&format!(
            " I was given {} earlier turns; the last one said: {}.",
            chat.earlier.len(),
            one_line(&last.message, 200)
        )),
    }
    if chat.left_out > 0 {
        text.push_str(&format!(" {} older turns were left out.", chat.left_out));
    }
    for note in &chat.notes {
        text.push_str(&format!(" Note: {}.", one_line(note, 300)));
    }
    for exchange in history {
        if let Exchange::ToolResult { tool, result, .. } = exchange {
            match result {
                Ok(out) => text.push_str(&format!(" {tool} returned: {}.", one_line(out, 300))),
                Err(e) => text.push_str(&format!(" {tool} failed: {}.", one_line(e, 300))),
            }
        }
    }
    reply(text, Vec::new())
}

/// The `call: <tool> <json>` lines of a leaf's body.
fn explicit_calls(body: &str) -> Vec<ToolCall> {
    body.lines()
        .filter_map(|line| {
            let rest = line
                .trim()
                .trim_start_matches("- ")
                .strip_prefix("call:")?
                .trim();
            let (tool, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, "{}"));
            Some(ToolCall::new(tool, args.trim()))
        })
        .collect()
}

fn turn(request: &TurnRequest) -> TurnReply {
    if let Some(chat) = &request.chat {
        return chat_turn(chat, &request.history);
    }
    let explicit = explicit_calls(&request.leaf.body);
    let turns_taken = request
        .history
        .iter()
        .filter(|e| matches!(e, Exchange::Assistant { .. }))
        .count();
    if turns_taken == 0 && !explicit.is_empty() {
        let text = format!(
            "Calling {}.",
            explicit
                .iter()
                .map(|c| c.tool.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return reply(text, explicit);
    }
    // Whatever failed in this leaf, the explicit calls included (a denial among them),
    // is said in the closing answer.
    let failures: Vec<String> = request
        .history
        .iter()
        .filter_map(|e| match e {
            Exchange::ToolResult { result: Err(e), .. } => Some(e.clone()),
            _ => None,
        })
        .collect();
    // Turns after the explicit calls behave as if those had not happened.
    let skip = usize::from(!explicit.is_empty());
    let from = request
        .history
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Exchange::Assistant { .. }))
        .nth(skip)
        .map_or(request.history.len(), |(i, _)| i);
    let request = &TurnRequest {
        chat: None,
        history: request.history[from..].to_vec(),
        ..request.clone()
    };
    let targets = targets(&request.leaf);
    let inputs: Vec<String> = scratch_paths(&request.leaf.body)
        .into_iter()
        .filter(|p| !targets.iter().any(|(t, _)| t == p))
        .collect();
    let turns_taken = request
        .history
        .iter()
        .filter(|e| matches!(e, Exchange::Assistant { .. }))
        .count();
    let wrote = request
        .history
        .iter()
        .any(|e| matches!(e, Exchange::ToolResult { tool, .. } if tool == "files.write_file"));

    if turns_taken == 0 && !inputs.is_empty() {
        let calls = inputs
            .iter()
            .map(|path| call("files.read_file", serde_json::json!({ "path": path })))
            .collect();
        return reply(format!("Reading {}.", inputs.join(", ")), calls);
    }
    if !wrote && !targets.is_empty() {
        let sources: Vec<String> = request
            .history
            .iter()
            .filter_map(|e| match e {
                Exchange::ToolResult {
                    tool,
                    result: Ok(out),
                    ..
                } if tool == "files.read_file" => Some(out.trim().to_owned()),
                _ => None,
            })
            .collect();
        let calls = targets
            .iter()
            .map(|(path, needles)| {
                let content = compose(request, path, needles, &sources);
                call(
                    "files.write_file",
                    serde_json::json!({ "path": path, "content": content }),
                )
            })
            .collect::<Vec<_>>();
        let written: Vec<&str> = targets.iter().map(|(p, _)| p.as_str()).collect();
        return reply(format!("Writing {}.", written.join(", ")), calls);
    }
    let text = if failures.is_empty() {
        format!("Finished: {}.", request.leaf.title)
    } else {
        format!(
            "Could not finish {}: {}",
            request.leaf.title,
            failures.join("; ")
        )
    };
    reply(text, Vec::new())
}

/// A turn's reply: the offline provider's calls are structured, as native calls are.
fn reply(text: String, tool_calls: Vec<ToolCall>) -> TurnReply {
    TurnReply {
        form: if tool_calls.is_empty() {
            CallForm::None
        } else {
            CallForm::Native
        },
        text,
        tool_calls,
        usage: Usage::default(),
    }
}

/// The files the leaf's gate checks, each with the text it must contain. A leaf
/// without a parsable gate gets one note file so it still leaves a trace.
fn targets(leaf: &dispatch_plan::Leaf) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let parsed = leaf.done_when.as_deref().map(gate::parse);
    if let Some(Ok(gate)) = parsed {
        gate.walk(&mut |check| {
            let (path, needle) = match check {
                Check::NonEmpty(p) | Check::IsFile(p) | Check::Exists(p) | Check::Readable(p) => {
                    (p.clone(), None)
                }
                Check::IsDir(p) => (format!("{}/.keep", p.trim_end_matches('/')), None),
                Check::Grep(g) => (
                    g.path.clone(),
                    Some(
                        g.pattern
                            .trim_start_matches('^')
                            .trim_end_matches('$')
                            .to_owned(),
                    ),
                ),
                _ => return,
            };
            match out.iter_mut().find(|(p, _)| *p == path) {
                Some((_, needles)) => needles.extend(needle),
                None => out.push((path, needle.into_iter().collect())),
            }
        });
    }
    // A leaf with no gate leaves a note of its own; one whose gate names no file
    // (`true`) needs none.
    if leaf.done_when.is_none() {
        out.push((format!("scratch/leaf-{}.org", leaf.index + 1), Vec::new()));
    }
    out
}

fn compose(request: &TurnRequest, path: &str, needles: &[String], sources: &[String]) -> String {
    let mut text = format!("#+TITLE: {}\n\n", one_line(&request.leaf.title, 80));
    if path.ends_with("goal.org") {
        text.push_str(&request.goal);
        text.push('\n');
    } else if path.ends_with("notes.org") {
        text.push_str("key terms:\n");
        for term in key_terms(&request.goal) {
            text.push_str(&format!("- {term}\n"));
        }
    } else {
        text.push_str(&format!("* Goal\n{}\n", request.goal));
        if !sources.is_empty() {
            text.push_str("\n* Sources\n");
            for source in sources {
                text.push_str(source);
                text.push_str("\n\n");
            }
        }
    }
    for needle in needles {
        if !text.contains(needle.as_str()) {
            text.push_str(needle);
            text.push('\n');
        }
    }
    text
}

fn key_terms(goal: &str) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for word in goal.split(|c: char| !c.is_alphanumeric()) {
        let word = word.to_lowercase();
        if word.chars().count() > 3 && !terms.contains(&word) {
            terms.push(word);
        }
    }
    terms.truncate(12);
    terms
}

/// Words in `text` that name a file under `scratch/`.
fn scratch_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in
        text.split(|c: char| c.is_whitespace() || matches!(c, '`' | ',' | '(' | ')' | '"' | '\''))
    {
        let word = word.trim_end_matches(['.', ':', ';']);
        if word.starts_with("scratch/")
            && word.len() > "scratch/".len()
            && !out.iter().any(|p| p == word)
        {
            out.push(word.to_owned());
        }
    }
    out
}

fn call(tool: &str, args: serde_json::Value) -> ToolCall {
    ToolCall::new(tool, args.to_string())
}

fn one_line(text: &str, max_chars: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        flat
    } else {
        let cut: String = flat.chars().take(max_chars - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AUTHOR_TEMPERATURE;

    fn drive(goal: &str, leaf: &dispatch_plan::Leaf, files: &mut Vec<(String, String)>) {
        let mut history = Vec::new();
        for _ in 0..5 {
            let reply = turn(&TurnRequest {
                chat: None,
                earlier: Vec::new(),
                goal: goal.into(),
                leaf: leaf.clone(),
                history: history.clone(),
                tools: Vec::new(),
                deltas: None,
            });
            history.push(Exchange::Assistant {
                text: reply.text.clone(),
                tool_calls: reply.tool_calls.clone(),
            });
            if reply.tool_calls.is_empty() {
                return;
            }
            for call in reply.tool_calls {
                let args: serde_json::Value = serde_json::from_str(&call.args_json).unwrap();
                let path = args["path"].as_str().unwrap().to_owned();
                let result = match call.tool.as_str() {
                    "files.write_file" => {
                        files.push((path, args["content"].as_str().unwrap().to_owned()));
                        Ok("written".to_owned())
                    }
                    "files.read_file" => files
                        .iter()
                        .rev()
                        .find(|(p, _)| *p == path)
                        .map(|(_, c)| c.clone())
                        .ok_or_else(|| "no such file".to_owned()),
                    other => panic!("unexpected tool {other}"),
                };
                history.push(Exchange::ToolResult {
                    call_id: call.id,
                    tool: call.tool,
                    result,
                });
            }
        }
        panic!("the offline provider never finished the leaf");
    }

    #[test]
    fn its_plan_is_valid_and_ends_in_a_report() {
        let answer = futures::FutureExt::now_or_never(Offline::default().author(AuthorRequest {
            goal: "Compare  the\nprices of two sandboxes".into(),
            grammar: dispatch_plan::GRAMMAR,
            tools: Vec::new(),
            retry: None,
            temperature: AUTHOR_TEMPERATURE,
        }))
        .expect("the offline provider never waits")
        .unwrap()
        .text;
        let plan = dispatch_plan::parse(&answer).unwrap();
        assert_eq!(plan.title, "Compare the prices of two sandboxes");
        assert_eq!(plan.leaves.len(), 3);
        assert!(
            plan.leaves
                .iter()
                .all(|l| l.ordered && l.done_when.is_some())
        );
        assert!(
            plan.leaves[2]
                .done_when
                .as_deref()
                .unwrap()
                .contains("scratch/REPORT.org")
        );
    }

    #[test]
    fn it_writes_what_every_gate_checks() {
        let goal = "Compare the prices of two sandboxes";
        let plan = dispatch_plan::parse(&plan_for(goal)).unwrap();
        let mut files = Vec::new();
        for leaf in &plan.leaves {
            drive(goal, leaf, &mut files);
        }
        let get = |p: &str| {
            files
                .iter()
                .rev()
                .find(|(f, _)| f == p)
                .map(|(_, c)| c.clone())
                .unwrap()
        };
        assert!(get("scratch/goal.org").contains(goal));
        assert!(get("scratch/notes.org").contains("key terms"));
        let report = get("scratch/REPORT.org");
        assert!(report.starts_with("#+TITLE"), "{report}");
        assert!(
            report.contains("sandboxes"),
            "the report did not read the notes: {report}"
        );
    }

    #[test]
    fn a_goal_that_is_an_outline_is_the_plan_and_call_lines_are_made_first() {
        let goal = "#+TITLE: Exact\n* TODO Count once\n  - call: test.count {\"key\": \"k\"}\n  :done-when: test -s scratch/out.org\n";
        let answer = futures::FutureExt::now_or_never(Offline::default().author(AuthorRequest {
            goal: goal.into(),
            grammar: dispatch_plan::GRAMMAR,
            tools: Vec::new(),
            retry: None,
            temperature: AUTHOR_TEMPERATURE,
        }))
        .expect("the offline provider never waits")
        .unwrap()
        .text;
        assert_eq!(answer, goal);
        let plan = dispatch_plan::parse(&answer).unwrap();
        let leaf = plan.leaves[0].clone();
        let first = turn(&TurnRequest {
            chat: None,
            earlier: Vec::new(),
            goal: goal.into(),
            leaf: leaf.clone(),
            history: vec![],
            tools: vec![],
            deltas: None,
        });
        assert_eq!(
            first.tool_calls,
            [ToolCall::new("test.count", r#"{"key": "k"}"#)]
        );
        let history = vec![
            Exchange::Assistant {
                text: first.text,
                tool_calls: first.tool_calls,
            },
            Exchange::ToolResult {
                call_id: "c0".into(),
                tool: "test.count".into(),
                result: Ok("1".into()),
            },
        ];
        let second = turn(&TurnRequest {
            chat: None,
            earlier: Vec::new(),
            goal: goal.into(),
            leaf,
            history,
            tools: vec![],
            deltas: None,
        });
        assert_eq!(second.tool_calls.len(), 1);
        assert_eq!(second.tool_calls[0].tool, "files.write_file");
        assert!(second.tool_calls[0].args_json.contains("scratch/out.org"));
        assert!(!is_outline("Just do the thing * TODO later"));
    }

    #[test]
    fn it_is_deterministic() {
        assert_eq!(plan_for("x"), plan_for("x"));
    }
}
