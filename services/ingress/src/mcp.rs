//! `/mcp`: Dispatch's hand-off verbs for any MCP client (`dispatch_mcp`), over
//! streamable HTTP, behind the same API key as `/v1`.
//!
//! Served statelessly: each POST is one JSON-RPC request answered with one JSON body,
//! and no session is kept, so any ingress copy behind a load balancer answers any
//! request. There is no GET stream to resume and no session to DELETE (405). The API
//! key is the guard, so the `Host` check meant for servers on a laptop is off:
//! deployments serve their own host names.

use std::sync::Arc;

use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::{App, MAX_BODY_BYTES, access};

/// The MCP endpoint's service: one [`dispatch_mcp::Server`] per request, naming the API
/// key the request was made with as who acts.
pub(crate) fn service(
    app: &App,
) -> StreamableHttpService<dispatch_mcp::Server, NeverSessionManager> {
    let caller = dispatch_mcp::Caller::per_request(|parts| {
        let id = access::Caller::id(parts.extensions.get());
        (!id.is_empty()).then(|| format!("api key {id} (mcp)"))
    });
    let server = dispatch_mcp::Server::new(app.bus.clone(), app.log.clone(), caller);
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY_BYTES)
        .with_cancellation_token(app.stopping.child_token());
    StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}
