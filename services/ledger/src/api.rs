//! The ledger's query interface: JSON request/reply on `dispatch.query.*`, answered
//! by one copy of the ledger (queue group). Ingress and the CLI are its clients.

use serde::{Deserialize, Serialize};

use crate::view::{Note, PendingApproval, RunView};

/// Runs in a page when a query names no limit.
pub const DEFAULT_PAGE: u32 = 100;
/// The most runs one page may hold. Pages are also cut by size, so that no reply can
/// outgrow a NATS message, whatever the runs hold.
pub const MAX_PAGE: u32 = 1000;
/// The most feedback notes one tasks query drains.
pub const MAX_NOTES: u32 = 200;

/// `dispatch.query.runs`: one page of runs, newest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// Include finished runs (`ps -a`); otherwise only queued and doing.
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub conversation: Option<String>,
    /// At most this many runs (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Start after this run id: the `next` of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunsReply {
    /// Newest first.
    pub runs: Vec<RunView>,
    /// Where the next page starts (`after`), if there is one.
    #[serde(default)]
    pub next: Option<String>,
}

/// `dispatch.query.run`: one run by id or unique id prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    pub id: String,
}

/// `dispatch.query.tasks`: a page of the conversation's tasks, and its oldest feedback
/// notes, drained: each note is handed out once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksQuery {
    pub conversation: String,
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub after: Option<String>,
    /// A client-chosen id for this drain (1 to 64 of `A-Z a-z 0-9 - _`). Asking again
    /// with the same id, say after a lost answer, returns the same notes instead of
    /// draining new ones.
    #[serde(default)]
    pub drain_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TasksReply {
    pub tasks: Vec<RunView>,
    #[serde(default)]
    pub next: Option<String>,
    /// Oldest first; each note is handed out once.
    pub feedback: Vec<Note>,
    /// More notes are waiting: ask again (with a new drain id) to get them.
    #[serde(default)]
    pub more_feedback: bool,
}

/// `dispatch.query.approvals`: a page of the approval requests nobody has answered,
/// in approval id order (oldest run first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsQuery {
    /// At most this many (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Start after this approval id: the `next` of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalsReply {
    pub approvals: Vec<PendingApproval>,
    /// Where the next page starts (`after`), if there is one.
    #[serde(default)]
    pub next: Option<String>,
}

/// `dispatch.query.transcript`: a conversation's runs, newest first, each with its
/// transcript: the UI message stream chunks of the whole run, texts whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptQuery {
    pub conversation: String,
    /// At most this many runs (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Start after this run id: the `next` of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Stop at this run (included): only it and the runs after it.
    #[serde(default)]
    pub since: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TranscriptReply {
    /// Newest first.
    pub runs: Vec<TranscriptRun>,
    /// Where the next (older) page starts (`after`), if there is one.
    #[serde(default)]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TranscriptRun {
    pub run_id: String,
    pub goal: String,
    pub status: crate::view::TaskStatus,
    /// The run's chunks (AI SDK UI message stream protocol), oldest first.
    #[schema(value_type = Vec<Object>)]
    pub chunks: Vec<serde_json::Value>,
    /// The sequence of the run's last event these chunks come from: a stream reader
    /// goes on with the chunks of later events (their `Dispatch-Run-Seq`).
    pub last_seq: u64,
    /// Some chunks were left out to keep the answer within a message: the whole run
    /// is in its log (`dispatch logs`).
    #[serde(default)]
    pub cut: bool,
}

/// `dispatch.query.replay`: rebuild one run's views from its log (takes a [`RunQuery`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayReply {
    pub run: RunView,
    /// Events read and verified.
    pub events: u64,
    /// The key that sealed the run (hex), if it has ended.
    pub sealed_by: Option<String>,
    /// False for a run removed with `rm`/`prune`: it stays out of the views.
    pub views_rebuilt: bool,
    /// What happened to the run's `_steps.jsonl`.
    pub trail: TrailOutcome,
}

/// What `replay` did with a run's trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrailOutcome {
    /// Written again from the verified log.
    Exported,
    /// Not written: the run has not ended, so there is no sealed trail yet.
    NotEnded,
    /// Not written: the run was removed together with its trail (`prune --trails`).
    Removed,
}

/// `dispatch.query.status`: how far this ledger copy's views have caught up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    /// Last `DISPATCH_RUNS` sequence applied to the views.
    pub runs_cursor: u64,
    /// Last `DISPATCH_LEDGER` sequence applied to the views.
    pub ledger_cursor: u64,
    /// Some ended run's trail is still to be written.
    #[serde(default)]
    pub trails_due: bool,
}

/// Why a query could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub enum QueryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    /// The log does not verify.
    #[error("{0}")]
    Corrupt(String),
}

/// Every reply: the answer or an error.
pub type Reply<T> = Result<T, QueryError>;
