//! Model providers: who writes plans and who drives a leaf's agent loop.
//!
//! [`Provider`] is the seam. [`offline::Offline`] is the provider used when no model is
//! configured: deterministic, no network, and **not a language model**. It writes a
//! valid plan for any goal and calls the built-in tools so every gate passes, so the
//! whole pipeline runs on a machine with no model at all. [`openai::OpenAi`] talks to
//! any OpenAI-compatible chat-completions server; [`sse`] reads its event streams
//! with every buffer bounded.

pub mod offline;
pub mod openai;
pub mod sse;
mod textcalls;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use dispatch_plan::Leaf;

/// The sampling temperature plans are authored at: plan-writing should be boring.
pub const AUTHOR_TEMPERATURE: f32 = 0.2;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("model provider {provider} failed: {message}")]
    Provider { provider: String, message: String },
    /// No whole answer came within the provider's timeout. Asking again may do
    /// better, so a caller with time left may.
    #[error("model provider {provider} failed: {message}")]
    TimedOut { provider: String, message: String },
    /// The provider cannot be built from its configuration.
    #[error("model configuration: {0}")]
    Config(String),
}

/// What the author model is asked.
#[derive(Debug, Clone)]
pub struct AuthorRequest {
    pub goal: String,
    /// The plan grammar, verbatim.
    pub grammar: &'static str,
    /// The previous attempt and why it was sent back, for the one retry.
    pub retry: Option<Retry>,
    pub temperature: f32,
    /// The tools the plan's steps can use (the author sees names and descriptions).
    pub tools: Vec<ToolSpec>,
}

/// An author's previous answer and why it was sent back.
#[derive(Debug, Clone)]
pub struct Retry {
    /// What the model answered (bounded by the dispatcher), when it is worth showing
    /// again: not an answer cut off at the token limit, which is mostly repetition.
    pub answer: Option<String>,
    /// What to correct: the rejection's code and message, worded as an instruction.
    pub error: String,
}

/// A tool call as the model asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id in the conversation: the model's own in a reply (empty if it gave
    /// none), the run's call id in the history sent back.
    #[serde(default)]
    pub id: String,
    pub tool: String,
    pub args_json: String,
}

impl ToolCall {
    /// A call with no id yet.
    pub fn new(tool: impl Into<String>, args_json: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            tool: tool.into(),
            args_json: args_json.into(),
        }
    }
}

/// A tool on offer to the model. Every turn of every run is offered the catalogue's
/// tools, so the description and the schema are shared, not copied per request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Namespaced by its connector: `files.read_file`.
    pub name: String,
    pub description: Arc<str>,
    /// The JSON schema of its arguments.
    pub parameters: Arc<serde_json::Value>,
}

impl ToolSpec {
    /// The name as model APIs see it: they allow no `.` in a function name, so the
    /// connector and the tool are joined with `__` (`files__read_file`). Connector
    /// names hold no `_`, so the first `__` is always that joint.
    pub fn wire_name(&self) -> String {
        wire_name(&self.name)
    }
}

/// [`ToolSpec::wire_name`] of a tool name.
pub fn wire_name(name: &str) -> String {
    name.replacen('.', "__", 1)
}

/// The tool on offer that a model named, by its name or its wire name.
pub fn resolve<'t>(tools: &'t [ToolSpec], named: &str) -> Option<&'t ToolSpec> {
    tools
        .iter()
        .find(|t| t.name == named || t.wire_name() == named)
}

/// Tokens one answer took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// How a model wrote the tool calls of a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallForm {
    /// It made none.
    None,
    /// The API's `tool_calls`.
    Native,
    /// JSON in a code fence in its text.
    Fenced,
    /// Its whole text was the JSON.
    Bare,
    /// JSON inside `<tool_call>` tags in its text.
    Tagged,
    /// Prose naming one tool, with its arguments as JSON in a code fence.
    Described,
}

impl CallForm {
    /// The word recorded in `ModelTurn.call_form`.
    pub fn word(self) -> &'static str {
        match self {
            CallForm::None => "",
            CallForm::Native => "native",
            CallForm::Fenced => "fenced",
            CallForm::Bare => "bare",
            CallForm::Tagged => "tagged",
            CallForm::Described => "described",
        }
    }
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
        call_id: String,
        tool: String,
        result: Result<String, String>,
    },
    /// The model said the step was finished, but its `:done-when:` check did not pass:
    /// the check and why, so the model can go on with the step.
    GateFailed { command: String, detail: String },
    /// The model said the step is not done without having made a single call: it is
    /// told to use the tools first (once).
    GaveUpUntried,
    /// The model said the step is done without having made a single call: it is told
    /// that it has made nothing yet (once).
    DoneUntried,
}

/// What an earlier step of the plan found: its title, and what its tools returned and
/// its model answered (bounded), for the steps after it to build on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierStep {
    pub title: String,
    pub found: String,
}

/// A chat turn's conversation: what the model is shown before its own turns so far
/// (`TurnRequest::history`). Built from the logs, the same every time it is built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chat {
    /// How many earlier turns of the conversation are left out (the oldest; the model
    /// is told so).
    pub left_out: u64,
    /// The earlier turns given, oldest first.
    pub earlier: Vec<ChatTurn>,
    /// Errands of this conversation that ended since its last turn: one line each
    /// (drained at the top of this turn, so said once).
    pub notes: Vec<String>,
    /// The new message.
    pub message: String,
}

/// One earlier turn of a conversation: the message, and what the model did with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatTurn {
    pub message: String,
    /// Its answers, calls and their results, in order.
    pub exchanges: Vec<Exchange>,
    /// How it ended when it did not end with an answer (stopped, blocked), in words.
    pub cut_short: Option<String>,
}

/// What the leaf's model is asked on each turn.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub goal: String,
    pub leaf: Leaf,
    /// Set for a chat turn: the conversation, instead of a plan's step (`leaf` then
    /// holds the message as its body, and `earlier` is empty).
    pub chat: Option<Chat>,
    /// The steps of the plan finished before this one, in order.
    pub earlier: Vec<EarlierStep>,
    pub history: Vec<Exchange>,
    /// The tools on offer.
    pub tools: Vec<ToolSpec>,
    /// Where the answer's text goes as it arrives, if anyone is listening.
    pub deltas: Option<DeltaSink>,
}

/// Text of an answer as it streams in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// The next piece of the answer's text.
    Text(String),
    /// The text sent so far is void: the request failed and is being made again.
    Restart,
}

/// Where a provider sends [`Delta`]s. Unbounded: an answer is capped in size, and a
/// provider never waits on whoever reads them.
pub type DeltaSink = tokio::sync::mpsc::UnboundedSender<Delta>;

/// The model's answer on one turn: tool calls to make, or none when the leaf is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnReply {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    pub form: CallForm,
}

/// The author's answer: the plan's text (possibly fenced) and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorReply {
    pub text: String,
    pub usage: Usage,
    /// The model stopped at the token limit, not because it had finished: whatever
    /// the text holds is not the whole of what it meant (a small model repeating one
    /// line until the limit ends this way).
    pub cut_off: bool,
}

/// What the permission gate's validator is asked about one tool call.
#[derive(Debug, Clone)]
pub struct JudgeRequest {
    /// The policy's guidance, in words.
    pub guidance: String,
    /// The rule that sent the call to the validator, and its reason.
    pub rule: String,
    pub rule_reason: String,
    pub tool: String,
    /// `read`, `write`, `destructive` or `external`.
    pub risk: String,
    pub args_json: String,
}

/// The validator's verdict on a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// A person should decide.
    Escalate,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Escalate => "escalate",
        }
    }
}

/// A verdict and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub reason: String,
    pub usage: Usage,
}

/// A model provider. Implementations must be safe to share between runs.
pub trait Provider: Send + Sync {
    /// A name recorded in the events the model's answers produce.
    fn name(&self) -> &str;

    /// Writes a plan for a goal: an org outline, possibly wrapped in code fences.
    fn author(&self, request: AuthorRequest) -> BoxFuture<'_, Result<AuthorReply, Error>>;

    /// Takes one turn of a leaf's agent loop.
    fn turn(&self, request: TurnRequest) -> BoxFuture<'_, Result<TurnReply, Error>>;

    /// Judges one tool call for the permission gate.
    fn judge(&self, request: JudgeRequest) -> BoxFuture<'_, Result<Judgement, Error>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_are_found_by_their_name_or_their_wire_name() {
        let spec = |name: &str| ToolSpec {
            name: name.into(),
            description: "".into(),
            parameters: serde_json::json!({"type": "object"}).into(),
        };
        let tools = [spec("files.write_file"), spec("fs.a__b")];
        assert_eq!(tools[0].wire_name(), "files__write_file");
        assert_eq!(tools[1].wire_name(), "fs__a__b");
        for (named, found) in [
            ("files__write_file", "files.write_file"),
            ("files.write_file", "files.write_file"),
            ("fs__a__b", "fs.a__b"),
        ] {
            assert_eq!(resolve(&tools, named).map(|t| t.name.as_str()), Some(found));
        }
        assert!(resolve(&tools, "write_file").is_none());
    }
}
