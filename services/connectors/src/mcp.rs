//! MCP connectors: tools served by Model Context Protocol servers, reached with the
//! official Rust SDK (`rmcp`) as the client.
//!
//! Each server configured in `dispatch.toml` is one connector:
//!
//! ```toml
//! [[connectors.mcp]]
//! name = "fs"                       # its tools are fs.read_file, fs.write_file, …
//! command = "npx"                   # stdio: started and supervised by this service
//! args = ["-y", "@modelcontextprotocol/server-filesystem", "/srv/shared"]
//! env = { LOG_LEVEL = "warn" }      # added to a minimal environment (PATH, HOME, …)
//! secret_env = { GITHUB_TOKEN = "github-token" }   # variable = a secret's name
//! call_timeout_ms = 60000
//! trust_annotations = false         # the default: see below
//! risk = { read_text_file = "read", write_file = "write" }   # by the server's tool names
//!
//! [[connectors.mcp]]
//! name = "search"
//! url = "https://mcp.example.com/mcp"   # streamable HTTP
//! headers = { "X-Team" = "ops" }
//! bearer_token_secret = "search-token"  # or bearer_token_env = "SEARCH_TOKEN"
//! secret_headers = { "X-Api-Key" = "search-key" }  # header = a secret's name
//! ```
//!
//! A server does not rate its own tools. Its tool annotations (`readOnlyHint`, …) are
//! hints the MCP specification says not to decide by unless the server is trusted, so
//! by default every tool it lists is `destructive`, unless the table's `risk` rates it
//! (or a policy rule names it). `trust_annotations = true` takes the annotations' word
//! (for servers the operator vouches for, such as the reference servers the tests
//! run); `risk` wins over them either way. An untrusted server's schemas also lose
//! their `format` marks for paths and URLs, which would otherwise tell the policy
//! which arguments its `path_prefix` and `url_host` conditions need not look at.
//!
//! A [`Server`] keeps its connection up: it connects (starting the process for stdio),
//! runs the initialize handshake, lists the tools with their schemas and annotations,
//! and puts them in the catalogue; when the connection ends (the process exits, the
//! HTTP session fails) it connects again after a jittered, growing delay. A stdio
//! server gets only a minimal environment, so the secrets Dispatch itself holds (a
//! model API key) never reach it.
//!
//! Secrets (`secret_env`, `bearer_token_secret`, `secret_headers`) are leased per
//! connection, not per call: a stdio server is one process serving every run, started
//! with the values in its environment, and an HTTP session sends its headers with every
//! request. Each connection takes a fresh lease whose values can be read only while it
//! connects; everything the server says afterwards (results, errors, stderr) is scrubbed
//! with them. Every [`SECRET_CHECK`] the values are read again: a secret that was
//! changed or removed ends the connection once its calls in flight are done (or their
//! timeout passed), and the next one uses the new value or stays down saying why.
//!
//! A call runs under a timeout; when it times out, or the run it belongs to ends, its
//! future is dropped and `rmcp` sends `notifications/cancelled` for it. A server that
//! goes away mid-call fails the call with that reason; the connectors' at-most-once
//! rule (`ToolCallStarted` before the request leaves) keeps it from being sent again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::catalogue::{self, Hints, Risk, ToolEntry};
use dispatch_secrets::{Grants, Lease, Scope, Store};
use futures::StreamExt as _;
use process_wrap::tokio::{CommandWrap, ProcessGroup};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ContentBlock, Implementation, JsonObject, ResourceContents, Tool,
};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{Peer, ServiceError, ServiceExt as _};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;

/// The largest tool output or error recorded, from any connector; the rest is cut,
/// and the cut is said ([`cap`]).
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// Most tools taken from one server.
const MAX_TOOLS: usize = 128;
/// Longest tool description kept, in characters.
const MAX_DESCRIPTION_CHARS: usize = 2_000;
/// How long connecting and the initialize handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long listing the tools may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);
/// Listings in a row that fail (an error, not a timeout) before the connection is made
/// again: a server that cannot say its tools is no use as it is.
const LIST_FAILURES: u32 = 3;
/// A stdio server's stderr: at most this many lines are logged per
/// [`STDERR_WINDOW`]; the rest are counted, and the count is logged.
const STDERR_LINES: u32 = 100;
const STDERR_WINDOW: Duration = Duration::from_secs(10);
/// How long a call waits for a server that is (re)starting.
const STARTING_WAIT: Duration = Duration::from_secs(15);
/// How often a connection's secrets are read again, to see whether they changed.
pub const SECRET_CHECK: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the restart delay.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The default per-call timeout.
const DEFAULT_CALL_TIMEOUT_MS: u64 = 60_000;
/// Environment variables a stdio server inherits; everything else it gets is configured.
const INHERITED_ENV: [&str; 7] = ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TERM"];

/// One `[[connectors.mcp]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The connector's name, the namespace of its tools.
    pub name: String,
    /// stdio: the program to start (a relative path is taken from the workspace).
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// stdio: environment added to the minimal one it inherits.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio: environment variables whose values are secrets, by the secrets' names.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// stdio: working directory (default: the workspace).
    pub cwd: Option<PathBuf>,
    /// Streamable HTTP: the endpoint.
    pub url: Option<String>,
    /// Streamable HTTP: headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Streamable HTTP: the environment variable holding a bearer token.
    pub bearer_token_env: Option<String>,
    /// Streamable HTTP: the name of the secret that is the bearer token.
    pub bearer_token_secret: Option<String>,
    /// Streamable HTTP: headers whose values are secrets, by the secrets' names.
    #[serde(default)]
    pub secret_headers: BTreeMap<String, String>,
    /// How long one call may take, in milliseconds.
    pub call_timeout_ms: Option<u64>,
    /// Whether the server's tool annotations decide its tools' risk classes (and its
    /// schemas' path and URL marks count). Off by default: a server does not rate its
    /// own tools.
    #[serde(default)]
    pub trust_annotations: bool,
    /// Risk classes by the server's tool names, over whatever the annotations say.
    #[serde(default)]
    pub risk: BTreeMap<String, Risk>,
}

impl ServerConfig {
    /// Checks one server's table; `reserved` are names taken by built-in connectors.
    pub fn check(&self, reserved: &[&str]) -> Result<(), String> {
        let name = &self.name;
        if !catalogue::valid_connector_name(name) {
            return Err(format!(
                "MCP server name {name:?}: use 1-32 of a-z, 0-9 and '-', starting with a letter"
            ));
        }
        if reserved.contains(&name.as_str()) {
            return Err(format!(
                "MCP server name {name:?} is taken by a built-in connector"
            ));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => Err(format!(
                "MCP server {name}: give either command (stdio) or url (HTTP), not both"
            )),
            (None, None) => Err(format!(
                "MCP server {name}: give command (stdio) or url (HTTP)"
            )),
            (Some(command), None) if command.trim().is_empty() => {
                Err(format!("MCP server {name}: command is empty"))
            }
            (None, Some(url)) => {
                let parsed = url
                    .parse::<http::Uri>()
                    .map_err(|e| format!("MCP server {name}: url: {e}"))?;
                if !matches!(parsed.scheme_str(), Some("http" | "https")) {
                    return Err(format!("MCP server {name}: url must be http or https"));
                }
                if parsed.authority().is_some_and(|a| a.as_str().contains('@')) {
                    return Err(format!(
                        "MCP server {name}: put credentials in bearer_token_secret, not in the url"
                    ));
                }
                if self.bearer_token_env.is_some() && self.bearer_token_secret.is_some() {
                    return Err(format!(
                        "MCP server {name}: give bearer_token_env or bearer_token_secret, not both"
                    ));
                }
                for (key, value) in &self.headers {
                    http::HeaderName::try_from(key.as_str())
                        .map_err(|e| format!("MCP server {name}: header {key:?}: {e}"))?;
                    http::HeaderValue::try_from(value.as_str())
                        .map_err(|e| format!("MCP server {name}: header {key:?}: {e}"))?;
                }
                let bearer = self.bearer_token_env.is_some() || self.bearer_token_secret.is_some();
                for key in self.secret_headers.keys() {
                    let header = http::HeaderName::try_from(key.as_str())
                        .map_err(|e| format!("MCP server {name}: secret header {key:?}: {e}"))?;
                    if self.headers.keys().any(|h| h.eq_ignore_ascii_case(key))
                        || (bearer && header == http::header::AUTHORIZATION)
                    {
                        return Err(format!("MCP server {name}: header {key:?} is given twice"));
                    }
                }
                Ok(())
            }
            (Some(_), None)
                if !self.headers.is_empty()
                    || !self.secret_headers.is_empty()
                    || self.bearer_token_env.is_some()
                    || self.bearer_token_secret.is_some() =>
            {
                Err(format!(
                    "MCP server {name}: headers, secret_headers and bearer tokens are for url servers"
                ))
            }
            (Some(_), None) => {
                if let Some(key) = self.secret_env.keys().find(|k| self.env.contains_key(*k)) {
                    return Err(format!(
                        "MCP server {name}: {key} is in both env and secret_env"
                    ));
                }
                Ok(())
            }
        }?;
        if self.url.is_some() && !self.secret_env.is_empty() {
            return Err(format!(
                "MCP server {name}: secret_env is for command (stdio) servers"
            ));
        }
        for secret in self.secrets() {
            dispatch_secrets::check_name(secret).map_err(|e| format!("MCP server {name}: {e}"))?;
        }
        if self.call_timeout_ms == Some(0) {
            return Err(format!(
                "MCP server {name}: call_timeout_ms must be above 0"
            ));
        }
        if let Some(tool) = self.risk.keys().find(|t| !catalogue::valid_tool_name(t)) {
            return Err(format!(
                "MCP server {name}: risk names {tool:?}, which is not a tool name (1-64 letters, digits, '_' or '-')"
            ));
        }
        Ok(())
    }

    /// The risk class of the server's tool `tool` annotated with `hints`: the `risk`
    /// table's, else the annotations' if they are trusted, else `destructive`.
    fn risk_of(&self, tool: &str, hints: Option<Hints>) -> Risk {
        match self.risk.get(tool) {
            Some(risk) => *risk,
            None if self.trust_annotations => Risk::from_hints(hints),
            None => Risk::Destructive,
        }
    }

    /// The names of the secrets this server is given.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.secret_env
            .values()
            .chain(&self.bearer_token_secret)
            .chain(self.secret_headers.values())
            .map(String::as_str)
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms.unwrap_or(DEFAULT_CALL_TIMEOUT_MS))
    }
}

/// Where a server's connection stands.
#[derive(Clone)]
enum State {
    Starting,
    Up(Arc<Up>),
    /// Not connected, and why.
    Down(String),
}

struct Up {
    peer: Peer<RoleClient>,
    /// Tool names as the server knows them, with their catalogue entries.
    tools: Vec<(String, ToolEntry)>,
    /// The connection's secrets, to scrub what the server answers with.
    lease: Option<Arc<Lease>>,
}

type Connection = RunningService<RoleClient, ClientConfig>;

/// A connection just made, with what it was made with.
struct Connected<'a> {
    connection: Connection,
    lease: Option<Arc<Lease>>,
    secrets: Option<&'a Store>,
}

/// One configured MCP server and its connection.
pub struct Server {
    config: ServerConfig,
    workspace: PathBuf,
    /// The secrets its configuration names, granted to it alone.
    grants: Grants,
    state: watch::Sender<State>,
}

impl Server {
    pub fn new(config: ServerConfig, workspace: &Path) -> Self {
        let mut grants = Grants::default();
        for secret in config.secrets() {
            grants.grant(&config.name, secret);
        }
        Self {
            config,
            workspace: workspace.to_owned(),
            grants,
            state: watch::Sender::new(State::Starting),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Keeps the connection up until `shutdown`, putting the server's tools in the
    /// catalogue (`None`: tests that only call) whenever they are listed, and leasing
    /// the secrets it is configured with from `secrets`.
    pub async fn supervise(
        self: Arc<Self>,
        catalogue: Option<kv::Store>,
        secrets: Option<Arc<Store>>,
        shutdown: CancellationToken,
    ) {
        let name = self.config.name.clone();
        let restart_delays = || {
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut delays = restart_delays();
        loop {
            let since = Instant::now();
            let why = match self.lease(secrets.as_deref()).await {
                Ok(lease) => match self.connect(lease.as_ref()).await {
                    Ok(connection) => {
                        let up = Connected {
                            connection,
                            lease,
                            secrets: secrets.as_deref(),
                        };
                        self.serve(up, catalogue.as_ref(), &shutdown).await
                    }
                    Err(why) => scrub(lease.as_deref(), why),
                },
                Err(why) => why,
            };
            if shutdown.is_cancelled() {
                return;
            }
            if since.elapsed() > STABLE_AFTER {
                delays = restart_delays();
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            tracing::warn!(
                server = name,
                reason = why,
                delay_ms = delay.as_millis() as u64,
                "MCP server down; connecting again"
            );
            self.state.send_replace(State::Down(why));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// A lease of the secrets the server is configured with, for one connection: its
    /// values can be read while connecting, and scrub what the server says for as
    /// long as the connection lasts.
    async fn lease(&self, secrets: Option<&Store>) -> Result<Option<Arc<Lease>>, String> {
        let names: Vec<&str> = self.config.secrets().collect();
        if names.is_empty() {
            return Ok(None);
        }
        let store = secrets.ok_or("it is configured with secrets, and no secrets store is open")?;
        let scope = Scope {
            connector: self.config.name.clone(),
            run_id: String::new(),
            call_id: "connection".into(),
        };
        let until = Instant::now() + CONNECT_TIMEOUT;
        store
            .lease(&self.grants, scope, &names, until)
            .await
            .map(|lease| Some(Arc::new(lease)))
            .map_err(|e| e.to_string())
    }

    /// Connects and runs the initialize handshake, handing `lease`'s values over.
    async fn connect(&self, lease: Option<&Arc<Lease>>) -> Result<Connection, String> {
        let name = &self.config.name;
        let client = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("dispatch-connectors", env!("CARGO_PKG_VERSION")),
        );
        let handshake = async {
            match (&self.config.command, &self.config.url) {
                (Some(command), _) => {
                    // The server leads a process group of its own, and the whole group
                    // is killed when the connection ends: a server started through a
                    // wrapper (`npx`, `uvx`, `sh -c`) leaves no orphan behind.
                    let mut wrapped =
                        CommandWrap::from(self.command(command, lease.map(|l| &**l))?);
                    wrapped.wrap(ProcessGroup::leader());
                    let (process, stderr) = TokioChildProcess::builder(wrapped)
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .map_err(|e| format!("cannot start {command:?}: {e}"))?;
                    if let Some(stderr) = stderr {
                        tokio::spawn(forward_stderr(name.clone(), stderr, lease.cloned()));
                    }
                    client.serve(process).await.map_err(|e| e.to_string())
                }
                (None, Some(url)) => {
                    let config = self.http(url, lease.map(|l| &**l))?;
                    let transport = StreamableHttpClientTransport::from_config(config);
                    client.serve(transport).await.map_err(|e| e.to_string())
                }
                (None, None) => Err("neither command nor url".to_owned()),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| format!("no answer to initialize within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("initialize failed: {e}"))
    }

    /// The stdio server's command: configured arguments and environment (secrets'
    /// values from `lease`) on top of a minimal inherited one.
    fn command(
        &self,
        program: &str,
        lease: Option<&Lease>,
    ) -> Result<tokio::process::Command, String> {
        let program = match Path::new(program) {
            path if path.is_relative() && program.contains('/') => self.workspace.join(path),
            path => path.to_owned(),
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(&self.config.args)
            .env_clear()
            .current_dir(self.config.cwd.as_ref().unwrap_or(&self.workspace))
            .kill_on_drop(true);
        for key in INHERITED_ENV {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command.envs(&self.config.env);
        for (variable, secret) in &self.config.secret_env {
            command.env(variable, leased(lease, secret)?);
        }
        Ok(command)
    }

    fn http(
        &self,
        url: &str,
        lease: Option<&Lease>,
    ) -> Result<StreamableHttpClientTransportConfig, String> {
        // rmcp's HTTP client (reqwest, built without a crypto provider of its own) uses
        // the process's; ring is the one already compiled in. A second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut headers = std::collections::HashMap::new();
        for (key, value) in &self.config.headers {
            let key = http::HeaderName::try_from(key.as_str()).map_err(|e| e.to_string())?;
            let value = http::HeaderValue::try_from(value.as_str()).map_err(|e| e.to_string())?;
            headers.insert(key, value);
        }
        for (key, secret) in &self.config.secret_headers {
            let key = http::HeaderName::try_from(key.as_str()).map_err(|e| e.to_string())?;
            let mut value = http::HeaderValue::try_from(leased(lease, secret)?)
                .map_err(|_| format!("secret {secret} cannot be sent in a header"))?;
            value.set_sensitive(true);
            headers.insert(key, value);
        }
        let mut config = StreamableHttpClientTransportConfig::with_uri(url).custom_headers(headers);
        if let Some(variable) = &self.config.bearer_token_env {
            let token = std::env::var(variable)
                .map_err(|_| format!("the bearer token variable {variable} is not set"))?;
            config = config.auth_header(token);
        }
        if let Some(secret) = &self.config.bearer_token_secret {
            config = config.auth_header(leased(lease, secret)?);
        }
        Ok(config)
    }

    /// Lists the tools, puts them in the catalogue, and keeps doing so every
    /// [`catalogue::REFRESH`] until the connection ends (returning why), its secrets
    /// change, or `shutdown`.
    async fn serve(
        &self,
        connected: Connected<'_>,
        store: Option<&kv::Store>,
        shutdown: &CancellationToken,
    ) -> String {
        let Connected {
            connection,
            lease,
            secrets,
        } = connected;
        let name = &self.config.name;
        let peer = connection.peer().clone();
        let version = peer
            .peer_info()
            .and_then(|info| info.server_info.as_ref().map(|s| s.version.clone()))
            .unwrap_or_default();
        let closer = connection.cancellation_token();
        let mut waiting = std::pin::pin!(connection.waiting());
        let mut refresh = tokio::time::interval(catalogue::REFRESH);
        let mut check = tokio::time::interval(SECRET_CHECK);
        check.reset();
        let mut failed_listings = 0u32;
        let why = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break "shutting down".to_owned(),
                quit = &mut waiting => {
                    let why = match quit {
                        Ok(reason) => format!("the connection ended ({reason:?})"),
                        Err(e) => format!("the connection's task failed: {e}"),
                    };
                    return scrub(lease.as_deref(), why);
                }
                _ = check.tick(), if lease.is_some() => {
                    let (Some(secrets), Some(lease)) = (secrets, &lease) else { continue };
                    match secrets.still_current(lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            self.drain().await;
                            break "its secrets changed; connecting with the new values".to_owned();
                        }
                        Err(dispatch_secrets::Error::Bucket(e)) => {
                            tracing::warn!(server = name, error = e, "cannot read the secrets bucket to check this server's secrets");
                        }
                        Err(e) => {
                            self.drain().await;
                            break format!("its secrets can no longer be leased: {e}");
                        }
                    }
                }
                _ = refresh.tick() => {
                    // A server that does not answer its listing is hung: its calls would
                    // hang too. It is taken out of use and connected to again (a stdio
                    // server's process started anew), not left wedged.
                    let tools = match tokio::time::timeout(LIST_TIMEOUT, peer.list_all_tools()).await {
                        Ok(Ok(tools)) => tools,
                        Ok(Err(e)) => {
                            let error = scrub(lease.as_deref(), e.to_string());
                            tracing::warn!(server = name, error, "tools/list failed");
                            failed_listings += 1;
                            if failed_listings >= LIST_FAILURES {
                                self.state.send_replace(State::Starting);
                                break format!(
                                    "tools/list failed {failed_listings} times in a row ({error}); connecting again"
                                );
                            }
                            continue;
                        }
                        Err(_) => {
                            self.state.send_replace(State::Starting);
                            break format!(
                                "tools/list did not answer within {} s: the server is hung; connecting again",
                                LIST_TIMEOUT.as_secs()
                            );
                        }
                    };
                    failed_listings = 0;
                    let tools = self.entries(&tools, &version);
                    let first = !matches!(*self.state.borrow(), State::Up(_));
                    if first {
                        tracing::info!(server = name, version, tools = tools.len(), trust_annotations = self.config.trust_annotations, "MCP server up");
                        for rated in self.config.risk.keys().filter(|r| !tools.iter().any(|(t, _)| t == *r)) {
                            tracing::warn!(server = name, tool = rated, "the risk table rates a tool the server does not list");
                        }
                    }
                    if let Some(store) = store {
                        for (_, entry) in &tools {
                            if let Err(e) = catalogue::put_tool(store, entry).await {
                                tracing::warn!(server = name, tool = entry.name, error = %e, "cannot put a tool in the catalogue");
                            }
                        }
                    }
                    let up = Up { peer: peer.clone(), tools, lease: lease.clone() };
                    self.state.send_replace(State::Up(Arc::new(up)));
                }
            }
        };
        closer.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        why
    }

    /// Takes the connection out of use and waits until the calls on it have ended,
    /// or a call's timeout has passed.
    async fn drain(&self) {
        if let State::Up(up) = self.state.send_replace(State::Starting) {
            let deadline = Instant::now() + self.config.call_timeout();
            while Arc::strong_count(&up) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Catalogue entries for the tools a server lists; tools whose names Dispatch
    /// cannot carry are left out, said once per listing.
    fn entries(&self, tools: &[Tool], version: &str) -> Vec<(String, ToolEntry)> {
        let name = &self.config.name;
        let now = catalogue::now_unix_ms();
        let mut out = Vec::new();
        for tool in tools {
            if !catalogue::valid_tool_name(&tool.name) {
                tracing::warn!(server = name, tool = %tool.name, "leaving out a tool whose name is not 1-64 letters, digits, '_' or '-'");
                continue;
            }
            if out.len() == MAX_TOOLS {
                tracing::warn!(
                    server = name,
                    listed = tools.len(),
                    "the server lists more than {MAX_TOOLS} tools; the rest are left out"
                );
                break;
            }
            let hints = tool.annotations.as_ref().map(|a| Hints {
                read_only: a.read_only_hint,
                destructive: a.destructive_hint,
                open_world: a.open_world_hint,
            });
            let description = tool
                .description
                .as_deref()
                .or(tool.title.as_deref())
                .unwrap_or_default();
            let mut parameters = serde_json::Value::Object((*tool.input_schema).clone());
            if !self.config.trust_annotations {
                unmark(&mut parameters);
            }
            out.push((
                tool.name.to_string(),
                ToolEntry {
                    name: format!("{name}.{}", tool.name),
                    connector: name.clone(),
                    description: description.chars().take(MAX_DESCRIPTION_CHARS).collect(),
                    parameters,
                    risk: self.config.risk_of(&tool.name, hints),
                    version: version.to_owned(),
                    refreshed_unix_ms: now,
                    read_when: None,
                },
            ));
        }
        out
    }

    /// The catalogue entries of the tools the server listed last (empty while down).
    pub fn tools(&self) -> Vec<ToolEntry> {
        match &*self.state.borrow() {
            State::Up(up) => up.tools.iter().map(|(_, e)| e.clone()).collect(),
            _ => Vec::new(),
        }
    }

    /// Calls the server's tool `tool` (its own name, without the namespace).
    pub async fn call(&self, tool: &str, args_json: &str) -> Result<String, String> {
        let name = &self.config.name;
        let arguments: JsonObject = serde_json::from_str(args_json)
            .map_err(|e| format!("the arguments of {name}.{tool} are not a JSON object: {e}"))?;
        let up = self.wait_up().await?;
        if !up.tools.iter().any(|(t, _)| t == tool) {
            return Err(format!("the MCP server {name} has no tool {tool:?}"));
        }
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
        let timeout = self.config.call_timeout();
        // Dropping the call's future (timeout here, or the run ending above) makes rmcp
        // send notifications/cancelled for it.
        let answer = tokio::time::timeout(timeout, up.peer.call_tool_once(params)).await;
        let answer = match answer {
            Err(_) => Err(format!(
                "{name}.{tool} did not answer within {} ms; the call was cancelled",
                timeout.as_millis()
            )),
            Ok(Err(ServiceError::TransportClosed)) => Err(format!(
                "the MCP server {name} went away during the call (it exited, was killed or \
                 closed the connection); whether the call took effect is unknown"
            )),
            Ok(Err(ServiceError::McpError(e))) => Err(format!(
                "the MCP server {name} refused the call: {}",
                e.message
            )),
            Ok(Err(e)) => Err(format!("the call to {name}.{tool} failed: {e}")),
            Ok(Ok(CallToolResponse::Complete(result))) => render(result),
            Ok(Ok(CallToolResponse::InputRequired(_))) => Err(format!(
                "{name}.{tool} asked for more input, which Dispatch does not give"
            )),
            Ok(Ok(_)) => Err(format!(
                "{name}.{tool} answered with a task to poll, or a kind of answer Dispatch \
                 does not follow"
            )),
        };
        let lease = up.lease.as_deref();
        answer
            .map(|text| scrub(lease, text))
            .map_err(|e| scrub(lease, e))
    }

    async fn wait_up(&self) -> Result<Arc<Up>, String> {
        let mut state = self.state.subscribe();
        let up = tokio::time::timeout(STARTING_WAIT, state.wait_for(|s| matches!(s, State::Up(_))))
            .await;
        if let Ok(Ok(state)) = up
            && let State::Up(up) = &*state
        {
            return Ok(up.clone());
        }
        let name = &self.config.name;
        Err(match &*self.state.borrow() {
            State::Down(why) => format!("the MCP server {name} is not running: {why}"),
            _ => format!("the MCP server {name} did not start within {STARTING_WAIT:?}"),
        })
    }
}

/// Removes the `format` marks (`path`, `uri`, …) by which a schema tells the policy
/// which arguments are paths and URLs, and so which others it need not judge. Without
/// them every string is judged. The schema was parsed by serde_json, whose recursion
/// limit bounds how deep this goes.
fn unmark(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            let marked = map.get("format").and_then(|f| f.as_str()).is_some_and(|f| {
                matches!(
                    f,
                    "path" | "uri" | "url" | "iri" | "uri-reference" | "iri-reference"
                )
            });
            if marked {
                map.remove("format");
            }
            map.values_mut().for_each(unmark);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unmark),
        _ => {}
    }
}

/// A call's result as the text the model reads. An `isError` result fails the call.
fn render(result: CallToolResult) -> Result<String, String> {
    let mut parts = Vec::new();
    for block in &result.content {
        parts.push(match block {
            ContentBlock::Text(text) => text.text.clone(),
            ContentBlock::Image(image) => {
                format!(
                    "[image {}, {} bytes of base64]",
                    image.mime_type,
                    image.data.len()
                )
            }
            ContentBlock::Audio(audio) => {
                format!(
                    "[audio {}, {} bytes of base64]",
                    audio.mime_type,
                    audio.data.len()
                )
            }
            ContentBlock::Resource(embedded) => match &embedded.resource {
                ResourceContents::TextResourceContents { text, .. } => text.clone(),
                ResourceContents::BlobResourceContents { uri, blob, .. } => {
                    format!("[resource {uri}, {} bytes of base64]", blob.len())
                }
                _ => "[a resource of a kind Dispatch does not read]".to_owned(),
            },
            ContentBlock::ResourceLink(link) => format!("[resource {}]", link.uri),
            _ => "[content of a kind Dispatch does not read]".to_owned(),
        });
    }
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    let text = parts.join("\n");
    if result.is_error == Some(true) {
        Err(text)
    } else {
        Ok(text)
    }
}

/// `text` with the values of `lease`, if any, masked.
fn scrub(lease: Option<&Lease>, text: String) -> String {
    match lease {
        Some(lease) => lease.scrub(&text),
        None => text,
    }
}

/// The value of `secret` from a connection's lease.
fn leased<'a>(lease: Option<&'a Lease>, secret: &str) -> Result<&'a str, String> {
    lease
        .ok_or_else(|| format!("secret {secret} was not leased"))?
        .value(secret)
        .map_err(|e| e.to_string())
}

/// `text` cut to [`MAX_OUTPUT_BYTES`] on a character boundary, saying so.
pub fn cap(text: String) -> String {
    if text.len() <= MAX_OUTPUT_BYTES {
        return text;
    }
    let kept = dispatch_runlog::slice_bytes(&text, MAX_OUTPUT_BYTES);
    format!(
        "{kept}\n[cut: {} bytes, the first {} kept]",
        text.len(),
        kept.len()
    )
}

/// A stdio server's stderr, line by line, into this service's log: at most
/// [`STDERR_LINES`] per [`STDERR_WINDOW`], so a server that floods its stderr cannot
/// flood the log; what is left out is counted and said.
async fn forward_stderr(
    server: String,
    stderr: tokio::process::ChildStderr,
    lease: Option<Arc<Lease>>,
) {
    let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(4096));
    let mut gate = LineGate::new(Instant::now());
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(line) => line,
            // An over-long line is skipped; the rest go on.
            Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded) => continue,
            Err(_) => break,
        };
        let (log, dropped) = gate.take(Instant::now());
        if dropped > 0 {
            tracing::warn!(
                server,
                lines = dropped,
                window_s = STDERR_WINDOW.as_secs(),
                "the server wrote more to stderr than is logged; these lines were left out"
            );
        }
        if log {
            tracing::info!(server, "{}", scrub(lease.as_deref(), line));
        }
    }
    let (_, dropped) = gate.take(Instant::now() + STDERR_WINDOW);
    if dropped > 0 {
        tracing::warn!(
            server,
            lines = dropped,
            "the server wrote more to stderr than is logged; these lines were left out"
        );
    }
}

/// Which stderr lines are logged: [`STDERR_LINES`] per window of [`STDERR_WINDOW`].
struct LineGate {
    window: Instant,
    logged: u32,
    dropped: u64,
}

impl LineGate {
    fn new(now: Instant) -> Self {
        Self {
            window: now,
            logged: 0,
            dropped: 0,
        }
    }

    /// For a line at `now`: whether to log it, and how many lines the window that just
    /// ended left out (to be said once).
    fn take(&mut self, now: Instant) -> (bool, u64) {
        let mut ended = 0;
        if now.duration_since(self.window) >= STDERR_WINDOW {
            ended = std::mem::take(&mut self.dropped);
            self.window = now;
            self.logged = 0;
        }
        if self.logged < STDERR_LINES {
            self.logged += 1;
            (true, ended)
        } else {
            self.dropped += 1;
            (false, ended)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_stderr_is_logged_in_part_and_counted() {
        let start = Instant::now();
        let mut gate = LineGate::new(start);
        let logged = (0..1000).filter(|_| gate.take(start).0).count();
        assert_eq!(logged, STDERR_LINES as usize);
        // The next window logs again and says how many the last one left out.
        let later = start + STDERR_WINDOW;
        assert_eq!(gate.take(later), (true, 1000 - u64::from(STDERR_LINES)));
        assert_eq!(gate.take(later), (true, 0));
    }

    fn server(toml: &str) -> Result<(), String> {
        let config: ServerConfig = toml::from_str(toml).map_err(|e| e.to_string())?;
        config.check(&["files", "test"])
    }

    #[test]
    fn server_tables_are_checked() {
        assert!(server("name = \"fs\"\ncommand = \"node\"\nargs = [\"x\"]").is_ok());
        assert!(
            server("name = \"gh\"\ncommand = \"node\"\nsecret_env = { GITHUB_TOKEN = \"github-token\" }")
                .is_ok()
        );
        assert!(
            server("name = \"web\"\nurl = \"https://h/mcp\"\nbearer_token_secret = \"t\"\nsecret_headers = { X-Key = \"k\" }")
                .is_ok()
        );
        assert!(
            server("name = \"web\"\nurl = \"https://h/mcp\"\nheaders = { X-A = \"b\" }").is_ok()
        );
        let cases = [
            ("name = \"Fs\"\ncommand = \"x\"", "MCP server name"),
            ("name = \"files\"\ncommand = \"x\"", "taken by a built-in"),
            ("name = \"fs\"", "give command"),
            (
                "name = \"fs\"\ncommand = \"x\"\nurl = \"http://h\"",
                "not both",
            ),
            ("name = \"fs\"\nurl = \"ftp://h\"", "http or https"),
            (
                "name = \"fs\"\nurl = \"http://u:p@h\"",
                "bearer_token_secret",
            ),
            (
                "name = \"fs\"\nurl = \"http://h\"\nbearer_token_env = \"T\"\nbearer_token_secret = \"t\"",
                "not both",
            ),
            (
                "name = \"fs\"\nurl = \"http://h\"\nbearer_token_secret = \"9t\"",
                "secret name",
            ),
            (
                "name = \"fs\"\nurl = \"http://h\"\nbearer_token_secret = \"t\"\nsecret_headers = { authorization = \"u\" }",
                "given twice",
            ),
            (
                "name = \"fs\"\nurl = \"http://h\"\nheaders = { X-Key = \"a\" }\nsecret_headers = { x-key = \"u\" }",
                "given twice",
            ),
            (
                "name = \"fs\"\nurl = \"http://h\"\nsecret_env = { T = \"t\" }",
                "for command (stdio) servers",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nbearer_token_secret = \"t\"",
                "for url servers",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nenv = { T = \"a\" }\nsecret_env = { T = \"t\" }",
                "both env and secret_env",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nsecret_env = { T = \"no spaces\" }",
                "secret name",
            ),
            (
                "name = \"fs\"\nurl = \"http://h\"\nheaders = { \"a b\" = \"c\" }",
                "header",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nheaders = { a = \"c\" }",
                "for url servers",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\ncall_timeout_ms = 0",
                "above 0",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nshell = true",
                "unknown field",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nrisk = { \"fs.read\" = \"read\" }",
                "not a tool name",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\nrisk = { read = \"harmless\" }",
                "unknown variant `harmless`",
            ),
            (
                "name = \"fs\"\ncommand = \"x\"\ntrust_annotations = \"yes\"",
                "invalid type",
            ),
        ];
        for (toml, expect) in cases {
            let err = server(toml).unwrap_err();
            assert!(err.contains(expect), "{toml:?}: {err}");
        }
    }

    /// The entries a server with `toml` gets for tools listed with `tools` (JSON).
    fn entries_of(toml: &str, tools: serde_json::Value) -> BTreeMap<String, ToolEntry> {
        let config: ServerConfig = toml::from_str(toml).unwrap();
        config.check(&[]).unwrap();
        let server = Server::new(config, Path::new("."));
        let tools: Vec<Tool> = serde_json::from_value(tools).unwrap();
        server.entries(&tools, "1").into_iter().collect()
    }

    #[test]
    fn a_server_does_not_rate_its_own_tools_unless_it_is_trusted() {
        let listed = serde_json::json!([
            {"name": "peek", "inputSchema": {"type": "object", "properties": {
                "path": {"type": "string", "format": "path"},
                "more": {"type": "array", "items": {"type": "string", "format": "uri"}}}},
             "annotations": {"readOnlyHint": true}},
            {"name": "add", "inputSchema": {"type": "object"},
             "annotations": {"readOnlyHint": false, "destructiveHint": false, "openWorldHint": false}},
            {"name": "plain", "inputSchema": {"type": "object"}}
        ]);
        let risks = |toml: &str| -> Vec<(String, Risk)> {
            entries_of(toml, listed.clone())
                .into_iter()
                .map(|(name, entry)| (name, entry.risk))
                .collect()
        };
        let base = "name = \"liar\"\ncommand = \"x\"\n";
        let everything_destructive: Vec<(String, Risk)> = ["add", "peek", "plain"]
            .iter()
            .map(|t| ((*t).to_owned(), Risk::Destructive))
            .collect();
        assert_eq!(risks(base), everything_destructive);
        assert_eq!(
            risks(&format!("{base}trust_annotations = true\n")),
            vec![
                ("add".to_owned(), Risk::Write),
                ("peek".to_owned(), Risk::Read),
                ("plain".to_owned(), Risk::Destructive)
            ]
        );
        // The operator's table wins, trusted or not.
        for trust in ["false", "true"] {
            let toml = format!(
                "{base}trust_annotations = {trust}\nrisk = {{ peek = \"destructive\", plain = \"read\" }}\n"
            );
            let got = risks(&toml);
            assert!(
                got.contains(&("peek".to_owned(), Risk::Destructive)),
                "{trust}: {got:?}"
            );
            assert!(
                got.contains(&("plain".to_owned(), Risk::Read)),
                "{trust}: {got:?}"
            );
        }
        // An untrusted server's path and URL marks are gone; a trusted one's kept.
        let untrusted = entries_of(base, listed.clone());
        let schema = &untrusted["peek"].parameters;
        assert!(
            schema["properties"]["path"].get("format").is_none(),
            "{schema}"
        );
        assert!(
            schema["properties"]["more"]["items"]
                .get("format")
                .is_none(),
            "{schema}"
        );
        assert_eq!(schema["properties"]["path"]["type"], "string");
        let trusted = entries_of(&format!("{base}trust_annotations = true\n"), listed);
        assert_eq!(
            trusted["peek"].parameters["properties"]["path"]["format"],
            "path"
        );
    }

    #[test]
    fn outputs_are_capped_on_a_character_boundary() {
        let long = "é".repeat(MAX_OUTPUT_BYTES);
        let capped = cap(long);
        assert!(capped.len() < MAX_OUTPUT_BYTES + 100);
        assert!(
            capped.ends_with("kept]"),
            "{}",
            &capped[capped.len() - 60..]
        );
        assert_eq!(cap("short".into()), "short");
    }

    #[test]
    fn results_render_as_text_and_errors_fail() {
        let ok: CallToolResult = serde_json::from_value(serde_json::json!({
            "content": [{"type": "text", "text": "a"}, {"type": "image", "data": "AAAA", "mimeType": "image/png"}]
        }))
        .unwrap();
        assert_eq!(
            render(ok).unwrap(),
            "a\n[image image/png, 4 bytes of base64]"
        );
        let structured: CallToolResult = serde_json::from_value(
            serde_json::json!({"content": [], "structuredContent": {"t": 1}}),
        )
        .unwrap();
        assert_eq!(render(structured).unwrap(), r#"{"t":1}"#);
        let failed: CallToolResult = serde_json::from_value(serde_json::json!({
            "content": [{"type": "text", "text": "no such file"}], "isError": true
        }))
        .unwrap();
        assert_eq!(render(failed).unwrap_err(), "no such file");
    }
}
