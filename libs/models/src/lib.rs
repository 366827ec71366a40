//! Model providers: who writes plans and who drives a leaf's agent loop.
//!
//! [`Provider`] is the seam. [`offline::Offline`] is the provider used when no model is
//! configured: deterministic, no network, and **not a language model**. It writes a
//! valid plan for any goal and calls the built-in tools so every gate passes, so the
//! whole pipeline runs on a machine with no model at all. An OpenAI-compatible client
//! will live beside it.

pub mod offline;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use dispatch_plan::Leaf;

/// The sampling temperature plans are authored at: plan-writing should be boring.
pub const AUTHOR_TEMPERATURE: f32 = 0.2;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("model provider {provider} failed: {message}")]
    Provider { provider: String, message: String },
}

/// What the author model is asked.
#[derive(Debug, Clone)]
pub struct AuthorRequest {
    pub goal: String,
    /// The plan grammar, verbatim.
    pub grammar: &'static str,
    /// The validation error of the previous attempt, fed back for the one retry.
    pub previous_error: Option<String>,
    pub temperature: f32,
}

/// A tool call as the model asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub tool: String,
    pub args_json: String,
}

/// One entry of a leaf's conversation so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// What the model answered on an earlier turn.
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    /// The outcome of one of those calls: `Ok(output)` or `Err(reason)` (a failure or a
    /// policy denial).
    ToolResult {
        tool: String,
        result: Result<String, String>,
    },
}

/// What the leaf's model is asked on each turn.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub goal: String,
    pub leaf: Leaf,
    pub history: Vec<Exchange>,
    /// Names and one-line descriptions of the tools on offer.
    pub tools: Vec<(String, String)>,
}

/// The model's answer on one turn: tool calls to make, or none when the leaf is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnReply {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
}

/// A model provider. Implementations must be safe to share between runs.
pub trait Provider: Send + Sync {
    /// A name recorded in the events the model's answers produce.
    fn name(&self) -> &str;

    /// Writes a plan for a goal: an org outline, possibly wrapped in code fences.
    fn author(&self, request: AuthorRequest) -> BoxFuture<'_, Result<String, Error>>;

    /// Takes one turn of a leaf's agent loop.
    fn turn(&self, request: TurnRequest) -> BoxFuture<'_, Result<TurnReply, Error>>;
}
