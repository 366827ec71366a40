//! The `memory` connector: what a conversation's agent keeps between conversations
//! (`dispatch-memory` holds the store). Changes are tool calls, so each is in the log
//! of the run that made it; internal writes are recorded, not gated (the built-in
//! policy allows them).

use dispatch_bus::RunId;
use dispatch_bus::catalogue::{Risk, ToolEntry};
use dispatch_memory::{KINDS, MAX_CHANGES_PER_RUN, Memory, Owner};
use dispatch_proto::run::v1::RunRequested;
use dispatch_runlog::RunLog;
use serde::Deserialize;

/// The connector's name: the namespace of its tools.
pub const CONNECTOR: &str = "memory";

pub fn entries() -> Vec<ToolEntry> {
    let entry = |tool, description, parameters, risk| {
        ToolEntry::builtin(CONNECTOR, tool, description, parameters, risk)
    };
    vec![
        entry(
            "remember",
            "Keep something for later conversations: a preference, a note, a person, a \
             document or a todo. The same key replaces what it held.",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "kind": {"type": "string", "enum": KINDS},
                    "key": {"type": "string", "description": "a short name for it, e.g. favourite-colour"},
                    "text": {"type": "string", "description": "what to remember, in full"},
                },
                "required": ["kind", "text"],
                "additionalProperties": false,
            }),
            Risk::Write,
        ),
        entry(
            "recall",
            "Find what was remembered, by words (and kind); with no query, the latest.",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "kind": {"type": "string", "enum": KINDS},
                },
                "additionalProperties": false,
            }),
            Risk::Read,
        ),
        entry(
            "forget",
            "Forget what a key holds.",
            serde_json::json!({
                "type": "object",
                "properties": {"key": {"type": "string"}},
                "required": ["key"],
                "additionalProperties": false,
            }),
            Risk::Write,
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RememberArgs {
    kind: String,
    #[serde(default)]
    key: Option<String>,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecallArgs {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetArgs {
    key: String,
}

/// Runs `memory.<name>` for call `call_id` of `run_id`, whose request is `requested`.
pub async fn call(
    memory: &Memory,
    log: &RunLog,
    run_id: &RunId,
    requested: &RunRequested,
    call_id: &str,
    name: &str,
    args: &str,
) -> Result<String, String> {
    let owner = Owner::of_conversation(&requested.conversation_id);
    let bad = |e: serde_json::Error| format!("memory.{name}: bad arguments: {e}");
    match name {
        "remember" => {
            let args: RememberArgs = serde_json::from_str(args).map_err(bad)?;
            changes_left(log, run_id, call_id).await?;
            let kept = memory
                .remember(
                    &owner,
                    &args.kind,
                    args.key.as_deref(),
                    &args.text,
                    &run_id.to_string(),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!("remembered under {:?} ({})", kept.key, kept.kind))
        }
        "recall" => {
            let args: RecallArgs = serde_json::from_str(args).map_err(bad)?;
            let all = memory.list(&owner).await.map_err(|e| e.to_string())?;
            let found = dispatch_memory::recall(&all, args.query.as_deref(), args.kind.as_deref());
            Ok(match found.is_empty() {
                true => "nothing remembered matches".to_owned(),
                false => dispatch_memory::lines(&found),
            })
        }
        "forget" => {
            let args: ForgetArgs = serde_json::from_str(args).map_err(bad)?;
            changes_left(log, run_id, call_id).await?;
            match memory
                .forget(&owner, &args.key)
                .await
                .map_err(|e| e.to_string())?
            {
                true => Ok(format!("forgot {:?}", args.key)),
                false => Err(format!("nothing is remembered under {:?}", args.key)),
            }
        }
        other => Err(format!(
            "memory has no tool {other:?}; it has remember, recall and forget"
        )),
    }
}

/// Refuses a change past [`MAX_CHANGES_PER_RUN`] in one run: an agent writing memory in
/// a loop is stopped with a clear error, counted from the run's own log.
async fn changes_left(log: &RunLog, run_id: &RunId, call_id: &str) -> Result<(), String> {
    let made =
        crate::calls_made(log, run_id, call_id, &["memory.remember", "memory.forget"]).await?;
    if made >= MAX_CHANGES_PER_RUN {
        return Err(format!(
            "this run has changed memory {made} times, the most one run may \
             ({MAX_CHANGES_PER_RUN}); say what you would keep instead"
        ));
    }
    Ok(())
}
