//! The ledger's query interface: JSON request/reply on `dispatch.query.*`, answered
//! by one copy of the ledger (queue group). Ingress and the CLI are its clients.

use serde::{Deserialize, Serialize};

use crate::view::{Note, RunView};

/// `dispatch.query.runs`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// Include finished runs (`ps -a`); otherwise only queued and doing.
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub conversation: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunsReply {
    /// Newest first.
    pub runs: Vec<RunView>,
}

/// `dispatch.query.run`: one run by id or unique id prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    pub id: String,
}

/// `dispatch.query.tasks`: the conversation's tasks, and its feedback notes drained.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksQuery {
    pub conversation: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TasksReply {
    pub tasks: Vec<RunView>,
    /// Oldest first; each note is handed out once.
    pub feedback: Vec<Note>,
}

/// `dispatch.query.replay`: rebuild one run's views from its log (takes a [`RunQuery`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayReply {
    pub run: RunView,
    /// Events read and verified.
    pub events: u64,
    /// The key that sealed the run (hex), if it has ended.
    pub sealed_by: Option<String>,
}

/// `dispatch.query.status`: how far this ledger copy's views have caught up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    /// Last `DISPATCH_RUNS` sequence applied to the views.
    pub runs_cursor: u64,
    /// Last `DISPATCH_LEDGER` sequence applied to the views.
    pub ledger_cursor: u64,
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
