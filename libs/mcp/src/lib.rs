//! Dispatch as an MCP server: how an agent outside Dispatch (Claude Desktop, an IDE)
//! reaches the hand-off verbs.
//!
//! [`Server`] is one MCP server handler (`rmcp`). Ingress serves it over streamable
//! HTTP at `/mcp`, behind the API key; `dispatch mcp` serves it over stdio. Its tools
//! hand a goal over (`dispatch`), read a conversation's tasks and drain its feedback
//! notes (`tasks`), show and stop one run (`status`, `stop`), and list and answer
//! approval requests (`approvals`, `approve`, `deny`); each finished run's report is a
//! resource (`dispatch://runs/<run_id>/report`).
//!
//! Everything goes over the bus the way the other doors do it: a goal through
//! `dispatch_runlog::submit`, queries to the ledger, a stop to the dispatcher, an answer
//! to the policy service. So this crate keeps no state and writes no run log, and it
//! picks no transport: its callers do. Every answer is bounded (texts cut, structured
//! JSON left out past a size), whatever the runs hold.

mod calls;
mod resources;
mod tools;

use std::sync::Arc;

use dispatch_bus::Bus;
use dispatch_runlog::RunLog;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Extensions,
    Implementation, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};

pub use resources::report_uri;

/// The origin of every run a goal over MCP starts.
pub const ORIGIN: &str = "mcp";

/// The conversation of a goal, and of a tasks query, that names none: a client that
/// dispatches and then polls `tasks` sees its own notes.
pub const CONVERSATION: &str = "mcp";

/// The caller of a request nobody can tell more about.
const UNKNOWN_CALLER: &str = "mcp";

/// The most bytes of text one answer carries; a longer one is cut, and says so.
const MAX_TEXT_BYTES: usize = 256 * 1024;

/// The most bytes of structured JSON one answer carries; a larger one is left out (its
/// text still says it all, cut). With [`MAX_TEXT_BYTES`], no answer nears 1 MiB.
const MAX_STRUCTURED_BYTES: usize = 256 * 1024;

/// What an MCP client reaches Dispatch through: one per transport, cheap to clone.
#[derive(Clone)]
pub struct Server {
    bus: Bus,
    /// Run logs, read (a finished run's report); this server writes none.
    log: RunLog,
    caller: Caller,
}

/// Who is asking, as the records name them: a stop's `requested_by`, an approval's
/// `resolved_by`.
#[derive(Clone)]
pub enum Caller {
    /// The same for every request (`cli (mcp)` over stdio).
    Fixed(String),
    /// Told by each HTTP request (its API key's id, say); `mcp` when it cannot be.
    PerRequest(Who),
}

/// Who made an HTTP request, told by its parts.
pub type Who = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

impl Caller {
    pub fn fixed(label: impl Into<String>) -> Self {
        Self::Fixed(label.into())
    }

    /// A caller worked out from each request's HTTP parts (which the streamable HTTP
    /// transport puts among the request's extensions).
    pub fn per_request(
        who: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self::PerRequest(Arc::new(who))
    }

    fn of(&self, extensions: &Extensions) -> String {
        match self {
            Self::Fixed(label) => label.clone(),
            Self::PerRequest(who) => extensions
                .get::<http::request::Parts>()
                .and_then(|parts| who(parts))
                .unwrap_or_else(|| UNKNOWN_CALLER.to_owned()),
        }
    }
}

impl Server {
    /// A server over `bus`, reading run logs through `log` (with the trust its reader
    /// has), naming `caller` as who acts.
    pub fn new(bus: Bus, log: RunLog, caller: Caller) -> Self {
        Self { bus, log, caller }
    }
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("dispatch", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Dispatch runs goals as agents. `dispatch` hands a goal over and answers at once \
             with its run id; `tasks` lists the conversation's tasks and hands out each \
             finished run's note once; `status` and `stop` take a run id; `approvals`, \
             `approve` and `deny` answer tool calls waiting for a person. Each finished \
             run's report is the resource dispatch://runs/<run_id>/report.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::all()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools::all().into_iter().find(|tool| tool.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let call = match tools::Call::parse(&request.name, request.arguments.as_ref()) {
            Ok(call) => call,
            Err(tools::Refused::UnknownTool(name)) => {
                return Err(ErrorData::invalid_params(
                    format!(
                        "no tool {name:?}; the tools are {}",
                        tools::NAMES.join(", ")
                    ),
                    None,
                ));
            }
            Err(tools::Refused::Arguments(why)) => return Ok(refusal(why).into()),
        };
        let caller = self.caller.of(&context.extensions);
        tracing::debug!(tool = %request.name, caller = %caller, "mcp tool call");
        Ok(self.call(call, &caller).await.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        self.reports().await
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.report(&request.uri).await.map(Into::into)
    }
}

/// `text` cut to [`MAX_TEXT_BYTES`], saying so when it is.
fn bounded(text: String) -> String {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    let mut cut = dispatch_runlog::slice_bytes(&text, MAX_TEXT_BYTES - 64).to_owned();
    cut.push_str("\n… (cut: the whole answer is too long for one reply)");
    cut
}

/// A tool's answer: readable text, and the same as JSON when it is not too large.
fn answer(text: String, structured: serde_json::Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(bounded(text))]);
    let size = serde_json::to_vec(&structured).map_or(usize::MAX, |bytes| bytes.len());
    if size <= MAX_STRUCTURED_BYTES {
        result.structured_content = Some(structured);
    }
    result
}

/// A tool's failure the caller should read (`isError`): bad arguments, a refusal, a
/// service that did not answer.
fn refusal(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(bounded(message.into()))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_on_a_character_and_say_so() {
        let long = "é".repeat(MAX_TEXT_BYTES);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_TEXT_BYTES, "{}", cut.len());
        assert!(cut.ends_with("too long for one reply)"));
        assert_eq!(bounded("short".into()), "short");
    }

    #[test]
    fn structured_answers_past_the_bound_are_left_to_the_text() {
        let small = answer("t".into(), serde_json::json!({"run_id": "r"}));
        assert_eq!(small.structured_content.unwrap()["run_id"], "r");
        let big = serde_json::json!({"x": "y".repeat(MAX_STRUCTURED_BYTES)});
        let big = answer("t".into(), big);
        assert!(big.structured_content.is_none());
        assert_eq!(big.is_error, Some(false));
    }

    #[test]
    fn a_fixed_caller_is_the_same_for_every_request() {
        let caller = Caller::fixed("cli (mcp)");
        assert_eq!(caller.of(&Extensions::new()), "cli (mcp)");
    }

    #[test]
    fn a_per_request_caller_reads_the_http_parts_or_is_mcp() {
        let caller = Caller::per_request(|parts| {
            parts
                .headers
                .get("x-key-id")
                .and_then(|v| v.to_str().ok())
                .map(|id| format!("api key {id} (mcp)"))
        });
        assert_eq!(caller.of(&Extensions::new()), "mcp");
        let (parts, ()) = http::Request::builder()
            .header("x-key-id", "k1")
            .body(())
            .unwrap()
            .into_parts();
        let mut extensions = Extensions::new();
        extensions.insert(parts);
        assert_eq!(caller.of(&extensions), "api key k1 (mcp)");
    }
}
