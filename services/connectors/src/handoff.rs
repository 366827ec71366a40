//! The hand-off as tools (the `dispatch` connector), for chat turns: a conversation's
//! agent starts long work as a planned run and hears back in a later turn.
//!
//! - `dispatch.dispatch {goal, timeout?}` starts a planned run for the turn's
//!   conversation (origin `chat`, its parent the turn) and answers with its run id at
//!   once. The run id is made from the turn and the call, so a call that is delivered
//!   again never starts a second run.
//! - `dispatch.tasks {}` lists the conversation's runs and drains its feedback notes
//!   (each handed out once; the drain id is made from the call, so asking again after a
//!   lost answer hands out the same ones).
//! - `dispatch.status {run_id}` and `dispatch.stop {run_id}` look at and stop one of the
//!   conversation's runs; any other run is refused as not found.
//!
//! Only a chat turn may call them: a planned step that starts planned runs would be a
//! loop with no person in it.

use std::time::Duration;

use dispatch_bus::catalogue::{Risk, ToolEntry};
use dispatch_bus::{Bus, RunId, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{GetRunRequest, ListTasksRequest, ListTasksResponse, RunView};
use dispatch_proto::run::v1::RunRequested;
use dispatch_runlog::submit::{Goal, Submission};
use dispatch_runlog::{one_line, turn};
use serde::Deserialize;

/// The connector's name: the namespace of its tools.
pub const CONNECTOR: &str = "dispatch";

/// How long the ledger has to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most tasks `dispatch.tasks` lists.
const TASKS_LISTED: u32 = 20;
/// The most runs one turn may hand off: a model calling `dispatch.dispatch` in a loop
/// is stopped with a clear error rather than starting runs without end.
const MAX_HAND_OFFS: usize = 10;
/// How long a stopped run's owner has to end it by itself.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub fn entries() -> Vec<ToolEntry> {
    let entry = |tool, description, parameters, risk| {
        ToolEntry::builtin(CONNECTOR, tool, description, parameters, risk)
    };
    vec![
        entry(
            "dispatch",
            "Hand long work off: starts a background run that plans and carries out the \
             goal, and returns its run id at once. Its result comes back in a later turn.",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "goal": {"type": "string", "description": "what the run should do, in full: it sees nothing of this conversation"},
                    "timeout": {"type": "string", "description": "how long it may take, e.g. \"10m\" (default 35m)"},
                },
                "required": ["goal"],
                "additionalProperties": false,
            }),
            Risk::Write,
        ),
        entry(
            "tasks",
            "The runs this conversation started, and the notes of those that ended since \
             you last asked (each note is given once).",
            serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false}),
            Risk::Read,
        ),
        entry(
            "status",
            "One run of this conversation: its status and result.",
            serde_json::json!({
                "type": "object",
                "properties": {"run_id": {"type": "string"}},
                "required": ["run_id"],
                "additionalProperties": false,
            }),
            Risk::Read,
        ),
        entry(
            "stop",
            "Stop one run of this conversation.",
            serde_json::json!({
                "type": "object",
                "properties": {"run_id": {"type": "string"}},
                "required": ["run_id"],
                "additionalProperties": false,
            }),
            Risk::Write,
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchArgs {
    goal: String,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    run_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// Runs `dispatch.<name>` for call `call_id` of the turn `run_id`, whose request is
/// `requested`.
pub async fn call(
    bus: &Bus,
    log: &dispatch_runlog::RunLog,
    run_id: &RunId,
    requested: &RunRequested,
    call_id: &str,
    name: &str,
    args: &str,
) -> Result<String, String> {
    if requested.kind != turn::KIND {
        return Err(format!(
            "dispatch.{name} is for chat turns; this run is a {}",
            if requested.kind.is_empty() {
                "job"
            } else {
                requested.kind.as_str()
            }
        ));
    }
    let conversation = requested.conversation_id.as_str();
    match name {
        "dispatch" => {
            let args: DispatchArgs = parse(name, args)?;
            let made = crate::calls_made(log, run_id, call_id, &["dispatch.dispatch"]).await?;
            if made >= MAX_HAND_OFFS {
                return Err(format!(
                    "this turn has handed off {made} runs, the most one turn may \
                     ({MAX_HAND_OFFS}); tell the user what is still to do instead"
                ));
            }
            hand_off(bus, run_id, conversation, call_id, args).await
        }
        "tasks" => {
            let _: NoArgs = parse(name, args)?;
            tasks(bus, run_id, conversation, call_id).await
        }
        "status" => {
            let args: RunArgs = parse(name, args)?;
            let view = conversation_run(bus, conversation, &args.run_id).await?;
            Ok(describe(&view))
        }
        "stop" => {
            let args: RunArgs = parse(name, args)?;
            let view = conversation_run(bus, conversation, &args.run_id).await?;
            let target: RunId = view.run_id.parse().map_err(|e| format!("{e}"))?;
            let by = format!("turn {run_id}");
            dispatch_runlog::stop::hand_over(bus, &target, STOP_GRACE, false, &by)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!("asked run {target} to stop"))
        }
        other => Err(format!(
            "dispatch has no tool {other:?}; it has dispatch, tasks, status and stop"
        )),
    }
}

fn parse<'a, T: Deserialize<'a>>(name: &str, args: &'a str) -> Result<T, String> {
    serde_json::from_str(args).map_err(|e| format!("dispatch.{name}: bad arguments: {e}"))
}

async fn hand_off(
    bus: &Bus,
    turn: &RunId,
    conversation: &str,
    call_id: &str,
    args: DispatchArgs,
) -> Result<String, String> {
    let timeout_ms = match args.timeout.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| format!("dispatch.dispatch: timeout {text:?}: {e} (write it like 10m)"))?
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    let goal = Goal::new(&args.goal, conversation, timeout_ms, "chat")
        .map_err(|e| format!("dispatch.dispatch: {e}"))?
        .handed_off_by(*turn);
    // One run per call, whoever carries the call out and however often.
    let key = format!("{turn}/{call_id}/dispatch");
    let run_id: RunId =
        dispatch_runlog::derived_uuid(dispatch_runlog::uuid_millis(&turn.to_string()), &key)
            .to_string()
            .parse()
            .map_err(|e| format!("{e}"))?;
    Submission::for_run(goal, run_id)
        .submit(bus)
        .await
        .map_err(|e| format!("the goal was not stored: {e}"))?;
    Ok(format!(
        "started run {run_id}. It runs in the background; its result comes back as a note \
         at the top of a later turn (or ask dispatch.tasks)."
    ))
}

async fn tasks(
    bus: &Bus,
    turn: &RunId,
    conversation: &str,
    call_id: &str,
) -> Result<String, String> {
    // A drain id of letters, digits, '-' and '_', at most 64: the turn and the call.
    let drain_id: String = format!("{}-{call_id}", turn.to_string().replace('-', ""))
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    let query = ListTasksRequest {
        conversation_id: conversation.to_owned(),
        limit: Some(TASKS_LISTED),
        after: None,
        drain_id: Some(drain_id),
    };
    let reply: Reply<ListTasksResponse> = bus
        .request_json(subject::query::tasks(), &query, QUERY_TIMEOUT)
        .await
        .map_err(|e| format!("the ledger did not answer: {e}"))?;
    let page = reply.map_err(|e| e.to_string())?;
    // The turns themselves are the conversation, not its tasks.
    let runs: Vec<&RunView> = page.tasks.iter().filter(|r| r.kind != turn::KIND).collect();
    let mut out = String::new();
    if runs.is_empty() {
        out.push_str("This conversation has started no runs.\n");
    } else {
        out.push_str("This conversation's runs, newest first:\n");
        for run in runs {
            out.push_str(&format!("- {}\n", describe(run)));
        }
    }
    if page.feedback.is_empty() {
        out.push_str("No new notes.");
    } else {
        out.push_str("New notes (each given once):\n");
        for note in &page.feedback {
            out.push_str(&format!(
                "- run {} ({:?}) ended {}: {}\n",
                note.run_id,
                one_line(&note.goal, 200),
                note.status,
                one_line(&note.summary, 300)
            ));
        }
    }
    Ok(out.trim_end().to_owned())
}

/// The run `id` names, if it is one of `conversation`'s; anything else is not found.
async fn conversation_run(bus: &Bus, conversation: &str, id: &str) -> Result<RunView, String> {
    let reply: Reply<RunView> = bus
        .request_json(
            subject::query::run(),
            &GetRunRequest { id: id.to_owned() },
            QUERY_TIMEOUT,
        )
        .await
        .map_err(|e| format!("the ledger did not answer: {e}"))?;
    match reply {
        Ok(view) if view.conversation_id == conversation => Ok(view),
        Ok(_) | Err(dispatch_proto::api::QueryError::NotFound(_)) => Err(format!(
            "no run {:?} in this conversation",
            one_line(id, 64)
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// One line about a run: id, status, goal, and its result once it has one.
fn describe(view: &RunView) -> String {
    let mut line = format!(
        "run {} is {}: {:?}",
        view.run_id,
        view.status().word(),
        one_line(&view.goal, 200)
    );
    if let Some(summary) = view.summary.as_deref().filter(|s| !s.is_empty()) {
        line.push_str(&format!(" — {}", one_line(summary, 300)));
    }
    line
}
