//! The `history` connector: what the owner's earlier conversations and runs said, so a
//! turn can bring in "what we found last week".
//!
//! - `history.search {query}`: finished runs whose goal or result holds the words (the
//!   ledger's word index, `dispatch.query.search`), most words first, then newest;
//! - `history.read {run_id}`: one run as it went: its goal, how it ended, and its answer
//!   or report (read from its log, which the connectors read anyway);
//! - `history.read {conversation}`: a conversation's latest runs and turns, oldest first,
//!   each with its goal and result.
//!
//! Every answer is bounded. One owner today: every run is the default account's.

use std::time::Duration;

use dispatch_bus::catalogue::{Risk, ToolEntry};
use dispatch_bus::{Bus, ConversationId, RunId, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{ListRunsRequest, ListRunsResponse, RunView, SearchRunsRequest};
use dispatch_proto::run::v1::run_event::Body;
use dispatch_runlog::{RunLog, one_line, slice_chars};
use serde::Deserialize;

/// The connector's name: the namespace of its tools.
pub const CONNECTOR: &str = "history";

/// How long the ledger has to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most runs a search or a conversation's read shows.
const SHOWN: u32 = 10;
/// The most of one run's answer or report shown, in characters.
const READ_CHARS: usize = 6_000;

pub fn entries() -> Vec<ToolEntry> {
    let entry = |tool, description, parameters| {
        ToolEntry::builtin(CONNECTOR, tool, description, parameters, Risk::Read)
    };
    vec![
        entry(
            "search",
            "Find earlier runs and conversation turns by words in what was asked or \
             found; lists each with its run id and result.",
            serde_json::json!({
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
                "additionalProperties": false,
            }),
        ),
        entry(
            "read",
            "Read one earlier run (run_id: what was asked, how it ended, its answer or \
             report) or a conversation's latest turns (conversation).",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "run_id": {"type": "string"},
                    "conversation": {"type": "string"},
                },
                "additionalProperties": false,
            }),
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    query: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    conversation: Option<String>,
}

/// Runs `history.<name>` with `args`.
pub async fn call(bus: &Bus, log: &RunLog, name: &str, args: &str) -> Result<String, String> {
    let bad = |e: serde_json::Error| format!("history.{name}: bad arguments: {e}");
    match name {
        "search" => {
            let args: SearchArgs = serde_json::from_str(args).map_err(bad)?;
            let query = SearchRunsRequest {
                query: slice_chars(&args.query, 500),
                limit: Some(SHOWN),
            };
            let page = ask(bus, subject::query::search(), &query).await?;
            Ok(match page.runs.is_empty() {
                true => format!("nothing earlier matches {:?}", one_line(&args.query, 100)),
                false => page.runs.iter().map(line).collect::<Vec<_>>().join("\n"),
            })
        }
        "read" => {
            let args: ReadArgs = serde_json::from_str(args).map_err(bad)?;
            match (args.run_id, args.conversation) {
                (Some(run), None) => read_run(log, &run).await,
                (None, Some(conversation)) => read_conversation(bus, &conversation).await,
                _ => Err("history.read takes either run_id or conversation".into()),
            }
        }
        other => Err(format!(
            "history has no tool {other:?}; it has search and read"
        )),
    }
}

async fn ask<Q: serde::Serialize>(
    bus: &Bus,
    subject: dispatch_bus::subject::Subject,
    query: &Q,
) -> Result<ListRunsResponse, String> {
    let reply: Reply<ListRunsResponse> = bus
        .request_json(subject, query, QUERY_TIMEOUT)
        .await
        .map_err(|e| format!("the ledger did not answer: {e}"))?;
    reply.map_err(|e| e.to_string())
}

/// One run in a line: what it was, its id and status, what was asked and what came of it.
fn line(view: &RunView) -> String {
    let what = if view.kind == dispatch_runlog::turn::KIND {
        "turn"
    } else {
        "run"
    };
    let mut line = format!(
        "- {what} {} in {} ({}): {:?}",
        view.run_id,
        view.conversation_id,
        view.status().word(),
        one_line(&view.goal, 200)
    );
    if let Some(summary) = view.summary.as_deref().filter(|s| !s.is_empty()) {
        line.push_str(&format!(" → {}", one_line(summary, 300)));
    }
    line
}

async fn read_run(log: &RunLog, run: &str) -> Result<String, String> {
    let run_id: RunId = run.parse().map_err(|e| format!("{e}"))?;
    let events = log
        .read(&run_id)
        .await
        .map_err(|e| format!("cannot read run {run_id}: {e}"))?;
    let mut goal = None;
    let mut end = None;
    for body in events.iter().filter_map(|e| e.event.body.as_ref()) {
        match body {
            Body::RunRequested(r) => goal = Some(r.goal.clone()),
            Body::RunFinished(f) => end = Some(f.clone()),
            _ => {}
        }
    }
    let Some(goal) = goal else {
        return Err(format!("no run {run_id}"));
    };
    let mut out = format!("asked: {}\n", slice_chars(&goal, 2_000));
    match end {
        None => out.push_str("it has not ended yet"),
        Some(end) => {
            out.push_str(&format!(
                "it ended {}: {}\n",
                end.status().word(),
                one_line(&end.reason, 300)
            ));
            let said = if end.report.trim().is_empty() {
                &end.summary
            } else {
                &end.report
            };
            out.push_str(&slice_chars(said.trim(), READ_CHARS));
        }
    }
    Ok(out)
}

async fn read_conversation(bus: &Bus, conversation: &str) -> Result<String, String> {
    let conversation: ConversationId = conversation.parse().map_err(|e| format!("{e}"))?;
    let query = ListRunsRequest {
        all: true,
        conversation_id: Some(conversation.to_string()),
        limit: Some(SHOWN),
        ..Default::default()
    };
    let page = ask(bus, subject::query::runs(), &query).await?;
    if page.runs.is_empty() {
        return Ok(format!("conversation {conversation} has no runs"));
    }
    // Oldest first, as a conversation reads.
    Ok(page
        .runs
        .iter()
        .rev()
        .map(line)
        .collect::<Vec<_>>()
        .join("\n"))
}
