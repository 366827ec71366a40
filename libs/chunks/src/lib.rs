//! Run events as chunks of the AI SDK's UI message stream protocol: each run is one
//! assistant message (`start` … `finish`, its id the run id), each leaf a step, model
//! text a text part, tool calls tool parts, and what is Dispatch's own (the plan, a
//! leaf's state, an approval request, how the run ended) data parts: `data-run`,
//! `data-plan`, `data-leaf`, `data-approval`. Data parts carry an `id`, so a later
//! part with the same id (a leaf finishing, an approval answered) replaces the earlier
//! one in a client that assembles the message.
//!
//! The mapping is a function of the event alone, so a chunk published again after a
//! crash is the same chunk, and any copy of the streamer produces the same stream.

use dispatch_proto::run::v1::{Decision, LeafState, RunEvent, TallyEntry, run_event::Body};

/// How the call id of a gate's call starts (the gate's check id, `gate-l<leaf>[-<n>]`);
/// a model's calls are `l<leaf>-t<turn>-c<n>`.
const GATE_CALL_PREFIX: &str = "gate-";
use serde_json::{Value, json};

/// Most characters of a goal, a report or a tool's output put in one chunk; the rest
/// is in the run's log, and the transcript.
pub const MAX_TEXT_CHARS: usize = 16 * 1024;

/// The chunks `event` (of run `run_id`) becomes, in order; none for events a client
/// has no use for (a gate check's detail, a command abandoned).
pub fn of(run_id: &str, event: &RunEvent) -> Vec<Value> {
    let Some(body) = &event.body else {
        return Vec::new();
    };
    match body {
        Body::RunRequested(r) => vec![
            json!({"type": "start", "messageId": run_id}),
            data_run(
                run_id,
                json!({"status": "queued", "goal": cut(&r.goal), "origin": r.origin}),
            ),
        ],
        Body::RunStarted(_) => vec![data_run(run_id, json!({"status": "running"}))],
        Body::PlanAuthored(p) => vec![json!({
            "type": "data-plan",
            "id": "plan",
            "data": {
                "title": p.title,
                "workflow": p.workflow_path,
                "leaves": p.leaves.iter().map(|l| json!({"leaf": l.index, "title": l.title})).collect::<Vec<_>>(),
            },
        })],
        Body::PlanRejected(p) => vec![json!({
            "type": "data-plan-rejected",
            "id": format!("plan-rejected-{}", p.attempt),
            "data": {"attempt": p.attempt, "code": p.code, "message": cut(&p.message)},
        })],
        Body::LeafStarted(l) => vec![
            json!({"type": "start-step"}),
            data_leaf(
                l.leaf,
                json!({"leaf": l.leaf, "title": l.title, "state": "doing"}),
            ),
        ],
        // Text as the model writes it: each part opened by its first piece and
        // closed by the turn it became, or by being given up.
        Body::OutputDelta(d) if d.abandoned => match d.offset {
            0 => Vec::new(),
            _ => vec![json!({"type": "text-end", "id": streamed_id(d.leaf, d.turn, d.part)})],
        },
        Body::OutputDelta(d) => {
            let id = streamed_id(d.leaf, d.turn, d.part);
            let mut chunks = Vec::with_capacity(2);
            if d.offset == 0 {
                chunks.push(json!({"type": "text-start", "id": id}));
            }
            chunks.push(json!({"type": "text-delta", "id": id, "delta": cut(&d.text)}));
            chunks
        }
        Body::ModelTurn(t) if t.streamed => {
            vec![json!({"type": "text-end", "id": streamed_id(t.leaf, t.turn, t.streamed_part)})]
        }
        // Not streamed (a provider that does not, or text that was not what streamed):
        // the whole text at once.
        Body::ModelTurn(t) if !t.text.is_empty() => {
            let id = format!("text-{}-{}", t.leaf, t.turn);
            vec![
                json!({"type": "text-start", "id": id}),
                json!({"type": "text-delta", "id": id, "delta": cut(&t.text)}),
                json!({"type": "text-end", "id": id}),
            ]
        }
        // A gate's call is the gate's business, not a tool call of the model's.
        Body::ToolCallRequested(c) if c.gate => Vec::new(),
        Body::PolicyDecided(d) if d.call_id.starts_with(GATE_CALL_PREFIX) => Vec::new(),
        Body::ToolCallRequested(c) => vec![json!({
            "type": "tool-input-available",
            "toolCallId": c.call_id,
            "toolName": c.tool,
            "input": input(&c.args_json),
        })],
        Body::PolicyDecided(d) if d.decision() == Decision::Deny => {
            vec![json!({"type": "tool-output-denied", "toolCallId": d.call_id})]
        }
        Body::ApprovalRequested(a) => vec![
            json!({"type": "tool-approval-request", "approvalId": a.approval_id, "toolCallId": a.call_id}),
            json!({
                "type": "data-approval",
                "id": a.approval_id,
                "data": {
                    "approval": a.approval_id,
                    "call": a.call_id,
                    "tool": a.tool,
                    "reason": cut(&a.reason),
                    "rule": a.rule,
                    "expires_unix_ms": a.expires_unix_ms,
                    "state": "waiting",
                },
            }),
        ],
        Body::ApprovalResolved(a) => vec![json!({
            "type": "data-approval",
            "id": a.approval_id,
            "data": {
                "approval": a.approval_id,
                "call": a.call_id,
                "state": if a.decision() == Decision::Allow { "approved" } else { "denied" },
                "by": cut(&a.resolved_by),
                "reason": cut(&a.reason),
                "expired": a.expired,
            },
        })],
        Body::ToolCallCompleted(c) => vec![json!({
            "type": "tool-output-available",
            "toolCallId": c.call_id,
            "output": cut(&c.output),
        })],
        Body::ToolCallFailed(f) => vec![json!({
            "type": "tool-output-error",
            "toolCallId": f.call_id,
            "errorText": cut(&f.error),
        })],
        Body::LeafFinished(l) => vec![
            data_leaf(
                l.leaf,
                json!({
                    "leaf": l.leaf,
                    "state": match l.state() {
                        LeafState::Done => "done",
                        LeafState::Skipped => "skipped",
                        _ => "failed",
                    },
                    "reason": cut(&l.reason),
                }),
            ),
            json!({"type": "finish-step"}),
        ],
        Body::RunFinished(f) => vec![
            data_run(
                run_id,
                json!({
                    "status": f.status().word(),
                    "reason": cut(&f.reason),
                    "summary": cut(&f.summary),
                    "tally": tally(&f.tally),
                    "report": cut(&f.report),
                }),
            ),
            json!({"type": "finish"}),
        ],
        _ => Vec::new(),
    }
}

/// A finished run's chunks as a transcript has them: what [`of`] makes of its events,
/// with each turn's text whole (the pieces it streamed in are left out).
pub fn transcript<'a>(
    run_id: &str,
    events: impl IntoIterator<Item = &'a RunEvent> + Clone,
) -> Vec<Value> {
    // Turns the log has whole; a turn still being written (no ModelTurn yet) is given
    // as its pieces so far, so a reader can go on with the pieces that follow.
    let whole: std::collections::HashSet<(u32, u32)> = events
        .clone()
        .into_iter()
        .filter_map(|event| match &event.body {
            Some(Body::ModelTurn(t)) => Some((t.leaf, t.turn)),
            _ => None,
        })
        .collect();
    events
        .into_iter()
        .filter_map(|event| match &event.body {
            Some(Body::OutputDelta(d)) if whole.contains(&(d.leaf, d.turn)) => None,
            Some(Body::ModelTurn(t)) if t.streamed => {
                let whole = RunEvent {
                    body: Some(Body::ModelTurn(dispatch_proto::run::v1::ModelTurn {
                        streamed: false,
                        ..t.clone()
                    })),
                    ..Default::default()
                };
                Some(of(run_id, &whole))
            }
            Some(_) => Some(of(run_id, event)),
            None => None,
        })
        .flatten()
        .collect()
}

/// A run's transcript as the AI SDK's `UIMessage`s: the goal as the user's message, and
/// the run as the assistant's, its parts assembled from `chunks` (from [`transcript`]):
/// text parts, tool parts (`tool-<name>` with their state, input and output), step
/// starts, and data parts (the last of each id).
pub fn messages(run_id: &str, goal: &str, chunks: &[Value]) -> Vec<Value> {
    let mut parts: Vec<Value> = Vec::new();
    let mut text_at: std::collections::HashMap<String, usize> = Default::default();
    let mut tool_at: std::collections::HashMap<String, usize> = Default::default();
    let mut data_at: std::collections::HashMap<String, usize> = Default::default();
    for chunk in chunks {
        let kind = chunk["type"].as_str().unwrap_or_default();
        let id = chunk["id"].as_str().unwrap_or_default().to_owned();
        let call = chunk["toolCallId"].as_str().unwrap_or_default().to_owned();
        match kind {
            "start-step" => parts.push(json!({"type": "step-start"})),
            "text-start" => {
                text_at.insert(id, parts.len());
                parts.push(json!({"type": "text", "text": "", "state": "streaming"}));
            }
            "text-delta" => {
                if let Some(&at) = text_at.get(&id) {
                    let text = format!(
                        "{}{}",
                        parts[at]["text"].as_str().unwrap_or_default(),
                        chunk["delta"].as_str().unwrap_or_default()
                    );
                    parts[at]["text"] = json!(text);
                }
            }
            "text-end" => {
                if let Some(&at) = text_at.get(&id) {
                    parts[at]["state"] = json!("done");
                }
            }
            "tool-input-available" => {
                tool_at.insert(call.clone(), parts.len());
                parts.push(json!({
                    "type": format!("tool-{}", chunk["toolName"].as_str().unwrap_or_default()),
                    "toolCallId": call,
                    "state": "input-available",
                    "input": chunk["input"],
                }));
            }
            "tool-output-available" | "tool-output-error" | "tool-output-denied" => {
                if let Some(&at) = tool_at.get(&call) {
                    let part = &mut parts[at];
                    match kind {
                        "tool-output-available" => {
                            part["state"] = json!("output-available");
                            part["output"] = chunk["output"].clone();
                        }
                        "tool-output-error" => {
                            part["state"] = json!("output-error");
                            part["errorText"] = chunk["errorText"].clone();
                        }
                        _ => part["state"] = json!("output-denied"),
                    }
                }
            }
            data if data.starts_with("data-") => {
                let part = json!({"type": data, "id": id, "data": chunk["data"]});
                match data_at.get(&format!("{data}\0{id}")) {
                    Some(&at) => parts[at] = part,
                    None => {
                        data_at.insert(format!("{data}\0{id}"), parts.len());
                        parts.push(part);
                    }
                }
            }
            _ => {}
        }
    }
    vec![
        json!({"id": format!("{run_id}-goal"), "role": "user", "parts": [{"type": "text", "text": goal}]}),
        json!({"id": run_id, "role": "assistant", "parts": parts}),
    ]
}

/// Whether `event` ends its run's message.
pub fn is_terminal(event: &RunEvent) -> bool {
    matches!(event.body, Some(Body::RunFinished(_)))
}

/// The id of the text part a turn's text streams into.
fn streamed_id(leaf: u32, turn: u32, part: u32) -> String {
    format!("text-{leaf}-{turn}-{part}")
}

fn data_run(run_id: &str, mut data: Value) -> Value {
    data["run"] = json!(run_id);
    json!({"type": "data-run", "id": run_id, "data": data})
}

fn data_leaf(leaf: u32, data: Value) -> Value {
    json!({"type": "data-leaf", "id": format!("leaf-{leaf}"), "data": data})
}

/// A run's leaf tally as a JSON object, `{"DONE": 3, "FAILED": 0}`.
pub fn tally(entries: &[TallyEntry]) -> Value {
    entries
        .iter()
        .map(|e| (e.state.clone(), json!(e.count)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A call's arguments as the chunk's `input`: the JSON object, or (not JSON, or too
/// large to repeat) its text cut.
fn input(args_json: &str) -> Value {
    match serde_json::from_str::<Value>(args_json) {
        Ok(value) if args_json.len() <= MAX_TEXT_CHARS => value,
        _ => Value::String(cut(args_json)),
    }
}

fn cut(text: &str) -> String {
    dispatch_runlog::slice_chars(text, MAX_TEXT_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatch_proto::run::v1::{
        ModelTurn, OutputDelta, RunFinished, RunRequested, RunStatus, ToolCallRequested,
    };

    fn event(body: Body) -> RunEvent {
        RunEvent {
            body: Some(body),
            ..Default::default()
        }
    }

    fn types(chunks: &[Value]) -> Vec<&str> {
        chunks.iter().map(|c| c["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn a_run_is_one_message_with_text_and_tool_parts() {
        let run = "r1";
        let start = of(
            run,
            &event(Body::RunRequested(RunRequested {
                goal: "say hi".into(),
                ..Default::default()
            })),
        );
        assert_eq!(types(&start), ["start", "data-run"]);
        assert_eq!(start[0]["messageId"], "r1");
        let turn = of(
            run,
            &event(Body::ModelTurn(ModelTurn {
                leaf: 1,
                turn: 2,
                text: "hello".into(),
                ..Default::default()
            })),
        );
        assert_eq!(types(&turn), ["text-start", "text-delta", "text-end"]);
        assert_eq!(turn[1]["delta"], "hello");
        assert_eq!(turn[1]["id"], "text-1-2");
        // A turn with only tool calls has no text part.
        assert!(of(run, &event(Body::ModelTurn(ModelTurn::default()))).is_empty());
        let call = of(
            run,
            &event(Body::ToolCallRequested(ToolCallRequested {
                call_id: "c1".into(),
                tool: "files.read_file".into(),
                args_json: r#"{"path": "a"}"#.into(),
                ..Default::default()
            })),
        );
        assert_eq!(call[0]["input"]["path"], "a");
        let end = of(
            run,
            &event(Body::RunFinished(RunFinished {
                status: RunStatus::Blocked as i32,
                reason: "timed out".into(),
                ..Default::default()
            })),
        );
        assert_eq!(types(&end), ["data-run", "finish"]);
        assert_eq!(end[0]["data"]["status"], "blocked");
        assert_eq!(end[0]["id"], "r1");
    }

    #[test]
    fn streamed_text_opens_a_part_grows_it_and_the_turn_closes_it() {
        let delta = |part: u32, offset: u64, text: &str, abandoned: bool| {
            of(
                "r",
                &event(Body::OutputDelta(OutputDelta {
                    leaf: 0,
                    turn: 1,
                    part,
                    offset,
                    text: text.into(),
                    abandoned,
                })),
            )
        };
        let first = delta(0, 0, "Hel", false);
        assert_eq!(types(&first), ["text-start", "text-delta"]);
        assert_eq!(first[0]["id"], "text-0-1-0");
        assert_eq!(types(&delta(0, 3, "lo", false)), ["text-delta"]);
        // Given up: the part ends; nothing streamed, nothing to end.
        assert_eq!(types(&delta(0, 5, "", true)), ["text-end"]);
        assert!(delta(1, 0, "", true).is_empty());
        let turn = |streamed: bool| {
            of(
                "r",
                &event(Body::ModelTurn(ModelTurn {
                    leaf: 0,
                    turn: 1,
                    text: "Hello".into(),
                    streamed,
                    streamed_part: 2,
                    ..Default::default()
                })),
            )
        };
        let closed = turn(true);
        assert_eq!(types(&closed), ["text-end"]);
        assert_eq!(closed[0]["id"], "text-0-1-2");
        assert_eq!(
            types(&turn(false)),
            ["text-start", "text-delta", "text-end"]
        );
    }

    #[test]
    fn a_transcript_has_whole_texts_and_assembles_into_messages() {
        let events = [
            event(Body::RunRequested(RunRequested {
                goal: "say hi".into(),
                ..Default::default()
            })),
            event(Body::OutputDelta(OutputDelta {
                text: "Hel".into(),
                ..Default::default()
            })),
            event(Body::ModelTurn(ModelTurn {
                text: "Hello".into(),
                streamed: true,
                tool_calls: vec![],
                ..Default::default()
            })),
            event(Body::ToolCallRequested(ToolCallRequested {
                call_id: "c1".into(),
                tool: "files.read_file".into(),
                args_json: "{}".into(),
                ..Default::default()
            })),
            event(Body::ToolCallCompleted(
                dispatch_proto::run::v1::ToolCallCompleted {
                    call_id: "c1".into(),
                    output: "contents".into(),
                },
            )),
        ];
        let chunks = transcript("r", &events);
        assert_eq!(
            types(&chunks),
            [
                "start",
                "data-run",
                "text-start",
                "text-delta",
                "text-end",
                "tool-input-available",
                "tool-output-available"
            ]
        );
        let messages = messages("r", "say hi", &chunks);
        assert_eq!(messages[0]["role"], "user");
        assert_eq!(messages[0]["parts"][0]["text"], "say hi");
        let parts = &messages[1]["parts"];
        assert_eq!(parts[1]["type"], "text");
        assert_eq!(parts[1]["text"], "Hello");
        assert_eq!(parts[1]["state"], "done");
        assert_eq!(parts[2]["type"], "tool-files.read_file");
        assert_eq!(parts[2]["state"], "output-available");
        assert_eq!(parts[2]["output"], "contents");
    }

    #[test]
    fn a_turn_still_being_written_is_in_the_transcript_as_its_pieces() {
        let delta = |offset: u64, text: &str| {
            event(Body::OutputDelta(OutputDelta {
                leaf: 0,
                turn: 1,
                offset,
                text: text.into(),
                ..Default::default()
            }))
        };
        let events = [delta(0, "Hel"), delta(3, "lo")];
        let chunks = transcript("r", &events);
        assert_eq!(types(&chunks), ["text-start", "text-delta", "text-delta"]);
        // Once the turn is whole, the transcript has it whole instead.
        let mut done = events.to_vec();
        done.push(event(Body::ModelTurn(ModelTurn {
            leaf: 0,
            turn: 1,
            text: "Hello".into(),
            streamed: true,
            ..Default::default()
        })));
        let chunks = transcript("r", &done);
        assert_eq!(types(&chunks), ["text-start", "text-delta", "text-end"]);
        assert_eq!(chunks[1]["delta"], "Hello");
    }

    #[test]
    fn arguments_that_are_not_json_are_given_as_text() {
        let call = of(
            "r",
            &event(Body::ToolCallRequested(ToolCallRequested {
                call_id: "c".into(),
                args_json: "{not json".into(),
                ..Default::default()
            })),
        );
        assert_eq!(call[0]["input"], "{not json");
    }
}
