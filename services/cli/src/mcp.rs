//! `dispatch mcp`: Dispatch's hand-off verbs for an MCP client that starts servers as
//! processes (Claude Desktop, an IDE), over stdio. The same server as ingress's `/mcp`
//! (`dispatch_mcp`), on the bus as the CLI. Stdout carries the protocol and nothing
//! else: logs go to stderr (`RUST_LOG`, default `warn`).

use dispatch_bus::Bus;
use dispatch_runlog::RunLog;
use rmcp::ServiceExt as _;

use crate::{Failure, exit};

/// Who acts, as the records name them (a stop's `requested_by`, an approval's
/// `resolved_by`).
const CALLER: &str = "cli (mcp)";

/// Serves MCP on stdin and stdout until the client closes stdin.
pub(crate) async fn serve(bus: Bus, log: RunLog) -> Result<u8, Failure> {
    log_to_stderr();
    let server = dispatch_mcp::Server::new(bus, log, dispatch_mcp::Caller::fixed(CALLER));
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| Failure::new(format!("mcp: the client did not initialize: {e}")))?;
    tracing::info!("serving mcp on stdio");
    let quit = running
        .waiting()
        .await
        .map_err(|e| Failure::new(format!("mcp: the server stopped: {e}")))?;
    tracing::info!(reason = ?quit, "mcp client gone");
    Ok(exit::DONE)
}

/// Logs on stderr, never stdout: stdout is the protocol's.
fn log_to_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
