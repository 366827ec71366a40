//! The connectors service: where tool calls are executed.
//!
//! It takes tool-call commands from a durable consumer shared by its copies, and gate
//! checks asked of its queue group (`dispatch.ask.gate`, see `dispatch_bus::ask`). A
//! tool call runs only if the run's log holds an allow decision for it and
//! no result yet — the call id is the idempotency key — and its result is appended to
//! the run's log.
//!
//! Tools are served by connectors and named `<connector>.<tool>`: the built-in
//! `files` connector works on the run's `scratch/` ([`files`]), the built-in `http`
//! connector reaches the hosts its allowlist names ([`http`]), and each configured MCP
//! server is one more ([`mcp`]); chat turns hand work off through the built-in
//! `dispatch` connector (`handoff`), keep what they learn with the `memory` one and read
//! earlier runs and conversations with the `history` one. Every copy puts the tools it serves in the tool
//! catalogue ([`dispatch_bus::catalogue`]), where the dispatcher finds what to offer.
//! Gates are evaluated by the interpreter in [`gate`], confined to the run directory.

pub mod files;
pub mod gate;
mod handoff;
mod history;
pub mod http;
pub mod mcp;
mod memory;
mod search;
mod test_tools;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::{
    self,
    jetstream::{self, AckKind, kv},
};
use dispatch_bus::catalogue::{self, ToolEntry};
use dispatch_bus::health::{self, Health};
use dispatch_bus::work::{self, Delivery, WorkQueue};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_proto::command::v1::{CallTool, CheckGate};
use dispatch_proto::run::v1::{
    Decision, GateChecked, ToolCallCompleted, ToolCallFailed, ToolCallStarted, run_event::Body,
};
use dispatch_runlog::{RunHandle, RunLog};
use dispatch_service::layout;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub const SERVICE: &str = "connectors";

/// A call still running after this long starts following its run, to be cancelled if
/// the run ends; quicker ones (most built-in tools) finish before that costs anything.
const WATCH_CALLS_AFTER: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "dispatch-connectors",
    about = "Dispatch tool execution",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// Lease on a command in milliseconds: if this copy dies mid-command, another copy
    /// gets it this long after the last renewal.
    #[arg(long, env = "DISPATCH_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Most calls this copy executes at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Also offer the `sleep` and `count` tools used to test Dispatch itself.
    #[arg(long, env = "DISPATCH_TEST_TOOLS")]
    pub test_tools: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error(transparent)]
    Log(#[from] dispatch_runlog::Error),
    #[error("{0}")]
    Config(String),
}

pub struct Connectors {
    config: Config,
    bus: Bus,
    log: RunLog,
    registry: Arc<Registry>,
}

/// Why a call the log shows started has no result, as far as can be told now: the
/// process that started it still answers with the same boot id (a NATS outage kept its
/// result from the log), or it does not (it died, or was restarted, mid-call).
pub async fn why_unfinished(bus: &Bus, started: &ToolCallStarted) -> String {
    let executor = &started.executor;
    let alive = match executor.split_once('/') {
        Some((service, instance)) if !started.executor_boot.is_empty() => bus
            .request_json::<_, Health>(
                subject::health_instance(service, instance),
                &(),
                Duration::from_secs(1),
            )
            .await
            .is_ok_and(|health| health.boot == started.executor_boot),
        _ => false,
    };
    if alive {
        format!(
            "interrupted by a NATS outage: {executor} started this call and still runs, but \
             its result never reached the log; not executed again"
        )
    } else {
        format!(
            "interrupted: {executor} started this call and stopped before recording its \
             result (it crashed, was killed or restarted); not executed again"
        )
    }
}

struct Context {
    log: RunLog,
    workspace: PathBuf,
    registry: Arc<Registry>,
    /// The secrets, when a connector's configuration names any.
    secrets: Option<Arc<dispatch_secrets::Store>>,
    /// `connectors/<instance>`, recorded in `ToolCallStarted`.
    executor: String,
    /// The tool catalogue, which `tools.search` reads.
    catalogue: kv::Store,
    /// What agents remember (the `memory` tools).
    memory: dispatch_memory::Memory,
}

impl Context {
    /// Runs `tool` for call `call_id` of `run_id`: `tools.search` here, with the
    /// catalogue, and every other tool by its connector.
    async fn call(
        &self,
        run_id: &RunId,
        call_id: &str,
        tool: &str,
        args_json: &str,
    ) -> Result<String, String> {
        if tool
            .strip_prefix(search::CONNECTOR)
            .and_then(|t| t.strip_prefix('.'))
            == Some(search::TOOL)
        {
            return search::search(&self.catalogue, args_json).await;
        }
        if let Some(name) = tool
            .strip_prefix(handoff::CONNECTOR)
            .and_then(|t| t.strip_prefix('.'))
        {
            let requested = self.requested(run_id).await?;
            let bus = self.log.bus();
            return handoff::call(bus, &self.log, run_id, &requested, call_id, name, args_json)
                .await;
        }
        if let Some(name) = tool
            .strip_prefix(history::CONNECTOR)
            .and_then(|t| t.strip_prefix('.'))
        {
            return history::call(self.log.bus(), &self.log, name, args_json).await;
        }
        if let Some(name) = tool
            .strip_prefix(memory::CONNECTOR)
            .and_then(|t| t.strip_prefix('.'))
        {
            let requested = self.requested(run_id).await?;
            return memory::call(
                &self.memory,
                &self.log,
                run_id,
                &requested,
                call_id,
                name,
                args_json,
            )
            .await;
        }
        self.registry
            .call(
                &self.workspace,
                self.secrets.as_deref(),
                run_id,
                call_id,
                tool,
                args_json,
            )
            .await
    }
}

/// How many calls of `tools` the run `run_id` has made and completed, besides
/// `call_id`, read from its log: the built-in tools that bound what one run may do
/// (memory changes, hand-offs) count from the record, whichever copy made the calls.
async fn calls_made(
    log: &RunLog,
    run_id: &RunId,
    call_id: &str,
    tools: &[&str],
) -> Result<usize, String> {
    let events = log
        .read(run_id)
        .await
        .map_err(|e| format!("cannot read the run's log: {e}"))?;
    let asked: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r))
                if r.call_id != call_id && tools.contains(&r.tool.as_str()) =>
            {
                Some(r.call_id.as_str())
            }
            _ => None,
        })
        .collect();
    Ok(events
        .iter()
        .filter(|e| {
            matches!(&e.event.body, Some(Body::ToolCallCompleted(c)) if asked.contains(&c.call_id.as_str()))
        })
        .count())
}

impl Context {
    /// The run's first event, its request: who asked and for which conversation.
    async fn requested(
        &self,
        run_id: &RunId,
    ) -> Result<dispatch_proto::run::v1::RunRequested, String> {
        match self.log.first_event(run_id).await {
            Ok(Some(first)) => match first.event.body {
                Some(Body::RunRequested(requested)) => Ok(requested),
                _ => Err("the run's log does not start with its request".into()),
            },
            Ok(None) => Err("the run has no log".into()),
            Err(e) => Err(format!("cannot read the run's request: {e}")),
        }
    }
}

/// The connectors this copy serves.
pub struct Registry {
    test_tools: bool,
    http: Option<http::Http>,
    servers: BTreeMap<String, Arc<mcp::Server>>,
    /// Which connector may lease which secret: what its configuration names.
    grants: dispatch_secrets::Grants,
}

impl Registry {
    /// The built-in connectors, and the MCP servers `dispatch.toml` configures in
    /// `workspace` (checked: a mistake is an error naming it).
    pub fn configured(workspace: &std::path::Path, test_tools: bool) -> Result<Self, Error> {
        use dispatch_service::config::section;
        let config = |e: dispatch_service::config::Error| Error::Config(e.to_string());
        let servers = section(workspace, SERVICE, "mcp").map_err(config)?;
        let http = section(workspace, SERVICE, "http").map_err(config)?;
        Self::new(servers, http, workspace, test_tools)
    }

    pub fn new(
        configs: Vec<mcp::ServerConfig>,
        http: http::HttpConfig,
        workspace: &std::path::Path,
        test_tools: bool,
    ) -> Result<Self, Error> {
        let reserved = [
            files::CONNECTOR,
            test_tools::CONNECTOR,
            http::CONNECTOR,
            search::CONNECTOR,
            handoff::CONNECTOR,
            history::CONNECTOR,
            memory::CONNECTOR,
        ];
        let mut servers = BTreeMap::new();
        let mut grants = dispatch_secrets::Grants::default();
        for config in configs {
            config.check(&reserved).map_err(Error::Config)?;
            let name = config.name.clone();
            for secret in config.secrets() {
                grants.grant(&name, secret);
            }
            let server = Arc::new(mcp::Server::new(config, workspace));
            if servers.insert(name.clone(), server).is_some() {
                return Err(Error::Config(format!(
                    "two MCP servers are named {name:?}; names must differ"
                )));
            }
        }
        let http = http::Http::new(http).map_err(Error::Config)?;
        for name in http.iter().flat_map(http::Http::secrets) {
            grants.grant(http::CONNECTOR, name);
        }
        Ok(Self {
            test_tools,
            http,
            servers,
            grants,
        })
    }

    /// The configured MCP servers.
    pub fn servers(&self) -> impl Iterator<Item = &Arc<mcp::Server>> {
        self.servers.values()
    }

    /// Entries of the built-in connectors' tools.
    fn builtin_entries(&self) -> Vec<ToolEntry> {
        let mut entries = files::entries();
        entries.push(search::entry());
        entries.extend(handoff::entries());
        entries.extend(memory::entries());
        entries.extend(history::entries());
        if self.test_tools {
            entries.extend(test_tools::entries());
        }
        entries.extend(self.http.as_ref().map(http::Http::entry));
        entries
    }

    /// Runs `tool` (`<connector>.<tool>`) for call `call_id` of `run_id`, leasing
    /// from `secrets` what the connector's configuration names.
    pub async fn call(
        &self,
        workspace: &std::path::Path,
        secrets: Option<&dispatch_secrets::Store>,
        run_id: &RunId,
        call_id: &str,
        tool: &str,
        args: &str,
    ) -> Result<String, String> {
        let run_dir = layout::run_dir(workspace, run_id);
        let (connector, name) = tool.split_once('.').unwrap_or(("", tool));
        if let (http::CONNECTOR, Some(http)) = (connector, &self.http) {
            let run = run_id.to_string();
            let leasing = http::Leasing {
                store: secrets,
                grants: &self.grants,
                run_id: &run,
                call_id,
            };
            return http.call(name, args, leasing).await;
        }
        match connector {
            files::CONNECTOR => {
                let (name, args) = (name.to_owned(), args.to_owned());
                tokio::task::spawn_blocking(move || files::call(&run_dir, &name, &args))
                    .await
                    .map_err(|e| format!("tool panicked: {e}"))?
                    .map_err(|e| e.to_string())
            }
            test_tools::CONNECTOR if self.test_tools => {
                let run = run_id.to_string();
                test_tools::call(workspace, &run_dir, &run, call_id, name, args).await
            }
            _ => match self.servers.get(connector) {
                Some(server) => server.call(name, args).await,
                None => Err(format!(
                    "no connector serves {tool:?}: tools are named <connector>.<tool>, and \
                     this service has {}",
                    self.names().join(", ")
                )),
            },
        }
    }

    /// The catalogue entry this copy serves for `tool` now, if any.
    fn entry(&self, tool: &str) -> Option<ToolEntry> {
        let (connector, _) = tool.split_once('.')?;
        match self.servers.get(connector) {
            Some(server) => server.tools().into_iter().find(|e| e.name == tool),
            None => self.builtin_entries().into_iter().find(|e| e.name == tool),
        }
    }

    fn names(&self) -> Vec<&str> {
        let mut names = vec![
            files::CONNECTOR,
            search::CONNECTOR,
            handoff::CONNECTOR,
            history::CONNECTOR,
            memory::CONNECTOR,
        ];
        if self.test_tools {
            names.push(test_tools::CONNECTOR);
        }
        if self.http.is_some() {
            names.push(http::CONNECTOR);
        }
        names.extend(self.servers.keys().map(String::as_str));
        names
    }

    /// Supervises every MCP server and keeps the built-in tools in the catalogue, until
    /// `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        store: Option<kv::Store>,
        secrets: Option<Arc<dispatch_secrets::Store>>,
        shutdown: CancellationToken,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        for server in self.servers.values() {
            let supervised =
                server
                    .clone()
                    .supervise(store.clone(), secrets.clone(), shutdown.clone());
            tasks.spawn(supervised);
        }
        if let Some(store) = store {
            let mut refresh = tokio::time::interval(catalogue::REFRESH);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = refresh.tick() => {
                        for entry in self.builtin_entries() {
                            if let Err(e) = catalogue::put_tool(&store, &entry).await {
                                tracing::warn!(tool = entry.name, error = %e, "cannot put a tool in the catalogue");
                            }
                        }
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

impl Connectors {
    pub async fn build(config: Config) -> Result<Self, Error> {
        let registry = Arc::new(Registry::configured(
            &config.common.workspace,
            config.test_tools,
        )?);
        let instance = config.common.instance.clone();
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Connectors)
            .await?;
        let log = RunLog::open(&bus, &format!("{SERVICE}/{instance}"))
            .await?
            .writing_as(dispatch_bus::subject::LogWriter::Connectors)
            .with_trust(config.common.trust());
        Ok(Self {
            config,
            bus,
            log,
            registry,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
        let health = tokio::spawn(health::serve(
            self.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        let secrets = if self.registry.grants.is_empty() {
            None
        } else {
            let path = dispatch_secrets::key_path(&self.config.common.workspace);
            let key =
                dispatch_secrets::Key::load(&path).map_err(|e| Error::Config(e.to_string()))?;
            if key.is_none() {
                tracing::warn!(path = %path.display(), "no secrets key: only secrets in DISPATCH_SECRET_* variables can be leased");
            }
            Some(Arc::new(
                dispatch_secrets::Store::open(&self.bus, path, key)
                    .await
                    .map_err(|e| Error::Config(e.to_string()))?,
            ))
        };
        let store = catalogue::open(&self.bus).await?;
        let connectors = tokio::spawn(self.registry.clone().serve(
            Some(store.clone()),
            secrets.clone(),
            shutdown.clone(),
        ));
        tracing::info!(
            instance,
            mcp_servers = self.registry.servers.len(),
            "connectors ready"
        );
        let memory = dispatch_memory::Memory::open(&self.bus)
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        let ctx = Arc::new(Context {
            memory,
            log: self.log.clone(),
            workspace: self.config.common.workspace.clone(),
            registry: self.registry.clone(),
            secrets,
            executor: format!("{SERVICE}/{instance}"),
            catalogue: store,
        });
        // Gate checks come as asks (stored nowhere); tool calls, which must run at most
        // once and may take long, as work-queue commands.
        let gate_ctx = ctx.clone();
        let stop = shutdown.clone();
        let gates = dispatch_bus::ask::serve(
            &self.bus,
            subject::ask::GATE,
            subject::ask::CONNECTORS_GROUP,
            self.config.concurrency,
            shutdown.clone(),
            move |message| gate_asked(gate_ctx.clone(), message, stop.clone()),
        );
        let stop = shutdown.clone();
        let calls = work::consume(
            &self.bus,
            WorkQueue {
                stream: streams::COMMANDS,
                consumer: streams::consumers::CONNECTOR_CALLS,
                filter_subjects: vec![subject::cmd::TOOL.to_owned()],
                ack_wait: Duration::from_millis(self.config.lease_ms.max(300)),
            },
            self.config.concurrency,
            shutdown,
            move |message, _slot| handle(ctx.clone(), message, stop.clone()),
        );
        tokio::try_join!(gates, calls)?;
        let _ = health.await;
        let _ = connectors.await;
        Ok(())
    }
}

async fn open_call(ctx: &Context, call: &CallTool) -> Result<(RunId, RunHandle), Rejected> {
    let request = |b: &Body| matches!(b, Body::ToolCallRequested(r) if r.call_id == call.call_id);
    open(ctx, &call.run_id, call.from_stream_seq, request).await
}

async fn open(
    ctx: &Context,
    run_id: &str,
    from: u64,
    anchor: impl Fn(&Body) -> bool,
) -> Result<(RunId, RunHandle), Rejected> {
    let run_id: RunId = run_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| Rejected::Malformed(e.to_string()))?;
    Ok((run_id, ctx.log.handle_at(run_id, from, anchor).await?))
}

/// Carries out a tool-call command from the work queue.
async fn handle(ctx: Arc<Context>, message: jetstream::Message, shutdown: CancellationToken) {
    let delivery = Delivery::of(&message);
    let call = match CallTool::decode(message.payload.as_ref()) {
        Ok(call) => call,
        Err(e) => {
            tracing::warn!(subject = %message.subject, error = %e, "dropping a command that is not a CallTool");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let what = format!("tool {}/{}", call.run_id, call.call_id);
    let outcome = work::retry(&what, &shutdown, Rejected::is_transient, || async {
        match &call {
            _ if delivery.give_up() => give_up(&ctx, &call, delivery).await,
            call => call_tool(&ctx, call, &shutdown).await,
        }
    })
    .await;
    work::settle(&message, &what, outcome, Rejected::is_transient).await;
}

/// Checks the gate an ask names. Transient failures are tried again here; if they last,
/// the dispatcher asks again later, and gives the run up after a few copies took the
/// check and none answered.
async fn gate_asked(ctx: Arc<Context>, message: async_nats::Message, shutdown: CancellationToken) {
    let check = match CheckGate::decode(message.payload.as_ref()) {
        Ok(check) => check,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a gate ask that is not a CheckGate");
            return;
        }
    };
    let what = format!("gate {}/{}", check.run_id, check.check_id);
    let outcome = work::retry(&what, &shutdown, Rejected::is_transient, || {
        check_gate(&ctx, &check)
    })
    .await;
    if let Some(Err(e)) = outcome {
        tracing::warn!(run_id = check.run_id, check_id = check.check_id, error = %e, "cannot check the gate; the dispatcher will ask again");
    }
}

enum Rejected {
    /// The command can never succeed: drop it.
    Malformed(String),
    /// The bus or the log failed: try again.
    Retry(Error),
}

impl Rejected {
    /// Worth trying again: anything but a malformed command or a log that does not
    /// verify.
    fn is_transient(&self) -> bool {
        match self {
            Rejected::Malformed(_) => false,
            Rejected::Retry(Error::Log(e)) => e.kind() != dispatch_runlog::ErrorKind::Corrupt,
            Rejected::Retry(_) => true,
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::Malformed(reason) => f.write_str(reason),
            Rejected::Retry(e) => e.fmt(f),
        }
    }
}

impl From<dispatch_runlog::Error> for Rejected {
    fn from(err: dispatch_runlog::Error) -> Self {
        Rejected::Retry(err.into())
    }
}

/// Records in the run's log that the command was given up, so the run ends `blocked`.
async fn give_up(ctx: &Context, call: &CallTool, delivery: Delivery) -> Result<(), Rejected> {
    let (run_id, mut run) = open_call(ctx, call).await?;
    let reason = delivery.give_up_reason("the tool command");
    tracing::error!(run_id = %run_id, call_id = call.call_id, reason, "giving up");
    run.abandon("tool", &call.call_id, (delivery.number - 1) as u32, &reason)
        .await?;
    Ok(())
}

/// Appends a result unless the log already has one (or the run is over).
async fn record(
    run: &mut RunHandle,
    pick: impl Fn(&Body) -> Option<()>,
    body: Body,
    cause: &str,
) -> Result<(), Rejected> {
    match run.ensure(pick, body, cause).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Executes `call` in a span of OpenTelemetry's GenAI `execute_tool` kind, a child of
/// the span that asked for it.
async fn call_tool(
    ctx: &Context,
    call: &CallTool,
    shutdown: &CancellationToken,
) -> Result<(), Rejected> {
    let span = tracing::info_span!(
        "execute_tool",
        otel.name = %format_args!("execute_tool {}", call.tool),
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = call.tool.as_str(),
        gen_ai.tool.call.id = call.call_id.as_str(),
        connector = connector_of(&call.tool),
        run_id = call.run_id.as_str(),
    );
    call_tool_in_span(ctx, call, shutdown)
        .instrument(span)
        .await
}

/// The connector a namespaced tool name (`fs.read_file`) belongs to.
fn connector_of(tool: &str) -> &str {
    tool.split_once('.')
        .map_or(tool, |(connector, _)| connector)
}

/// How long tool calls take, by connector and outcome (`ok` / `error`).
fn call_durations() -> &'static opentelemetry::metrics::Histogram<f64> {
    static DURATIONS: std::sync::OnceLock<opentelemetry::metrics::Histogram<f64>> =
        std::sync::OnceLock::new();
    DURATIONS.get_or_init(|| {
        opentelemetry::global::meter(dispatch_bus::metrics::METER)
            .f64_histogram("dispatch.tool.duration")
            .with_unit("s")
            .with_description("Tool calls executed, by connector and outcome")
            .with_boundaries(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .build()
    })
}

async fn call_tool_in_span(
    ctx: &Context,
    call: &CallTool,
    shutdown: &CancellationToken,
) -> Result<(), Rejected> {
    if ctx.registry.test_tools && call.tool == test_tools::CRASH {
        tracing::error!(call_id = call.call_id, "the crash test tool: aborting");
        std::process::abort();
    }
    let (run_id, mut run) = open_call(ctx, call).await?;
    let call_id = call.call_id.as_str();
    let has_result = |b: &Body| match b {
        Body::ToolCallCompleted(c) if c.call_id == call_id => Some(()),
        Body::ToolCallFailed(f) if f.call_id == call_id => Some(()),
        Body::CommandAbandoned(a) if a.command == "tool" && a.key == call_id => Some(()),
        _ => None,
    };
    if run.bodies().find_map(has_result).is_some() || run.is_finished() {
        // Already executed (a redelivery or a resumed run): never run a call twice.
        return Ok(());
    }
    // Execute what the log requested and the policy allowed, not what the command says.
    let requested = run.bodies().find_map(|b| match b {
        Body::ToolCallRequested(r) if r.call_id == call_id => Some(r.clone()),
        _ => None,
    });
    // Allowed by the policy, or asked and approved by a person.
    let decided = run.bodies().find_map(|b| match b {
        Body::PolicyDecided(d) if d.call_id == call_id => Some(d.decision()),
        _ => None,
    });
    let approved = || {
        run.bodies().any(|b| {
            matches!(b, Body::ApprovalResolved(r)
                if r.call_id == call_id && r.decision() == Decision::Allow)
        })
    };
    let allowed = match decided {
        Some(Decision::Allow) => true,
        Some(Decision::Ask) => approved(),
        _ => false,
    };
    let started = |b: &Body| match b {
        Body::ToolCallStarted(s) if s.call_id == call_id => Some(s.clone()),
        _ => None,
    };
    let interrupted = run.bodies().find_map(started);
    // Only arguments in their one form run: the form the policy judged and a person saw.
    let unreadable = requested
        .as_ref()
        .and_then(|r| dispatch_runlog::args::is_canonical(&r.args_json).err());
    let result = match (requested, allowed, interrupted) {
        (None, _, _) => Err("the run's log never requested this call".to_owned()),
        (Some(_), false, _) => {
            Err("the run's log holds no allow decision for this call".to_owned())
        }
        (Some(_), true, None) if unreadable.is_some() => Err(format!(
            "the call's arguments are refused: {}",
            unreadable.unwrap_or_default()
        )),
        // Started before and never finished: its effect is unknown, so it is not run
        // again (at most once); the model sees the failure and can decide.
        (Some(_), true, Some(interrupted)) => {
            Err(why_unfinished(ctx.log.bus(), &interrupted).await)
        }
        (Some(requested), true, None) => {
            // The audit record comes first: if it cannot be appended, nothing runs.
            let audit = Body::ToolCallStarted(ToolCallStarted {
                call_id: call_id.to_owned(),
                executor: ctx.executor.clone(),
                executor_boot: dispatch_bus::health::boot_id().to_owned(),
            });
            loop {
                match run.append(audit.clone(), call_id).await.map(|_| ()) {
                    Ok(()) => break,
                    Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => return Ok(()),
                    // Someone appended first; if it was another copy starting this very
                    // call (a redelivery race), the call is theirs.
                    Err(e) if e.kind() == dispatch_runlog::ErrorKind::Conflict => {
                        if run.bodies().find_map(started).is_some()
                            || run.bodies().find_map(has_result).is_some()
                        {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // If the run ends while the call is in flight (deadline, stop), the call is
            // abandoned: dropping its future cancels it, and nothing more is recorded.
            let began = std::time::Instant::now();
            tokio::select! {
                result = ctx.call(&run_id, call_id, &requested.tool, &requested.args_json) => {
                    let outcome = if result.is_ok() { "ok" } else { "error" };
                    call_durations().record(
                        began.elapsed().as_secs_f64(),
                        &[
                            opentelemetry::KeyValue::new("connector", connector_of(&requested.tool).to_owned()),
                            opentelemetry::KeyValue::new("outcome", outcome),
                        ],
                    );
                    result
                },
                ended = async {
                    tokio::time::sleep(WATCH_CALLS_AFTER).await;
                    run.wait_until_finished().await
                } => {
                    ended?;
                    tracing::info!(run_id = %run_id, call_id, "run ended during the call; call cancelled");
                    return Ok(());
                }
            }
        }
    };
    tracing::info!(run_id = %run_id, call_id, ok = result.is_ok(), "tool call executed");
    if result.is_err() {
        tracing::Span::current().record("otel.status_code", "ERROR");
    }
    // Whatever the connector (an MCP server's error text, a long listing), the result
    // is bounded so that its event fits a NATS message.
    let body = match result {
        Ok(output) => Body::ToolCallCompleted(ToolCallCompleted {
            call_id: call_id.to_owned(),
            output: mcp::cap(output),
        }),
        Err(error) => Body::ToolCallFailed(ToolCallFailed {
            call_id: call_id.to_owned(),
            error: mcp::cap(error),
        }),
    };
    // The call has run: its result is worth retrying to record for as long as this
    // delivery lasts, rather than leaving it to look interrupted.
    let mut delays = work::retry_delays();
    loop {
        let err = match record(&mut run, has_result, body.clone(), call_id).await {
            Err(e) if e.is_transient() => e,
            done => return done,
        };
        let Some(delay) = delays.next() else {
            return Err(err);
        };
        tracing::warn!(run_id = %run_id, call_id, error = %err, "cannot record the call's result yet, retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Err(err),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn check_gate(ctx: &Context, check: &CheckGate) -> Result<(), Rejected> {
    let (run_id, mut run) = open(ctx, &check.run_id, check.from_stream_seq, |_| true).await?;
    let check_id = check.check_id.as_str();
    let has_result = |b: &Body| match b {
        Body::GateChecked(g) if g.check_id == check_id => Some(()),
        Body::CommandAbandoned(a) if a.command == "gate" && a.key == check_id => Some(()),
        _ => None,
    };
    if run.bodies().find_map(has_result).is_some() || run.is_finished() {
        return Ok(());
    }
    let run_dir = layout::run_dir(&ctx.workspace, &run_id);
    let source = check.command.clone();
    let outcome = match dispatch_plan::gate::parse(&source) {
        Ok(parsed) if parsed.call().is_some() => {
            call_gate(ctx, &run_id, &run, check_id, &check.command).await
        }
        _ => tokio::task::spawn_blocking(move || gate::check(&run_dir, &source))
            .await
            .map_err(|e| Rejected::Malformed(format!("gate panicked: {e}")))?,
    };
    tracing::info!(run_id = %run_id, check_id, passed = outcome.passed, "gate checked");
    let body = Body::GateChecked(GateChecked {
        leaf: check.leaf,
        command: check.command.clone(),
        passed: outcome.passed,
        detail: outcome.detail,
        check_id: check_id.to_owned(),
    });
    record(&mut run, has_result, body, check_id).await
}

/// The most of a call gate's result quoted as its evidence, in characters.
const EVIDENCE_CHARS: usize = 400;

/// Checks a `call …` gate: the call the run's log requested for it (its call id is the
/// check's id) runs only if the policy allowed it and this copy's catalogue says it
/// reads; it passes when the call succeeds and its result holds the gate's text.
/// Anything else fails closed, saying why.
async fn call_gate(
    ctx: &Context,
    run_id: &RunId,
    run: &RunHandle,
    check_id: &str,
    source: &str,
) -> gate::Outcome {
    let failed = |detail: String| gate::Outcome {
        passed: false,
        detail,
    };
    let requested = run.bodies().find_map(|b| match b {
        Body::ToolCallRequested(r) if r.call_id == check_id && r.gate => Some(r.clone()),
        _ => None,
    });
    let Some(requested) = requested else {
        return failed("the run's log never requested the gate's call".into());
    };
    // The gate's text, which the dispatcher sent, names the same tool and what the
    // result must hold.
    let named = dispatch_plan::gate::parse(source)
        .ok()
        .and_then(|g| g.call().map(|c| (c.tool.clone(), c.contains.clone())));
    let Some((tool, contains)) = named.filter(|(tool, _)| *tool == requested.tool) else {
        return failed("the gate's call is not the one its gate names".into());
    };
    let decided = run.bodies().find_map(|b| match b {
        Body::PolicyDecided(d) if d.call_id == check_id => Some(d.clone()),
        _ => None,
    });
    match decided {
        Some(d) if d.decision() == Decision::Allow => {}
        Some(d) => {
            return failed(format!(
                "the policy did not allow the gate's call {tool}: rule {}: {}",
                d.rule, d.reason
            ));
        }
        None => return failed(format!("the policy never decided the gate's call {tool}")),
    }
    match ctx.registry.entry(&tool) {
        Some(entry) if entry.risk_of_call(&requested.args_json) == catalogue::Risk::Read => {}
        Some(entry) => {
            return failed(format!(
                "a gate may only read, and {tool} is {}",
                entry.risk_of_call(&requested.args_json).word()
            ));
        }
        None => return failed(format!("no connector here serves {tool}")),
    }
    if let Err(why) = dispatch_runlog::args::is_canonical(&requested.args_json) {
        return failed(format!("the gate's call's arguments are refused: {why}"));
    }
    let result = ctx
        .call(run_id, check_id, &tool, &requested.args_json)
        .await;
    match result {
        Ok(output) => {
            let quoted = dispatch_runlog::slice_chars(&output, EVIDENCE_CHARS);
            match &contains {
                Some(text) if !output.contains(text.as_str()) => {
                    failed(format!("{tool} returned no {text:?}: {quoted}"))
                }
                _ => gate::Outcome {
                    passed: true,
                    detail: format!("{tool} returned: {quoted}"),
                },
            }
        }
        Err(error) => failed(format!(
            "{tool} failed: {}",
            dispatch_runlog::slice_chars(&error, EVIDENCE_CHARS)
        )),
    }
}
