//! Helpers for the end-to-end tests: a whole stack (nats-server and service processes)
//! in a temporary workspace, an HTTP client, the `dispatch` CLI as a process, and
//! `dispatch up` itself as a user runs it ([`up`]).

pub mod otlp;
pub mod scripted;
pub mod topology;
pub mod up;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dispatch_bus::{Bus, RunId};
use dispatch_proto::api::v1::dispatch_client::DispatchClient;
use dispatch_proto::run::v1::{RunFinished, run_event::Body};
use dispatch_runlog::{RunLog, StoredEvent};
use dispatch_testkit::{NatsServer, Service, bin_dir};
use tonic::service::interceptor::InterceptedService;

/// Every service, in the order a stack starts them.
pub use dispatch_service::SERVICES as ALL;

pub struct Stack {
    pub nats: NatsServer,
    pub workspace: tempfile::TempDir,
    pub services: Vec<Service>,
    pub bus: Bus,
    /// An HTTP client that sends [`Self::api_key`] with every request.
    pub http: reqwest::Client,
    /// A key from the workspace's API key store, as `dispatch api-key create` makes.
    pub api_key: String,
}

/// ingress's gRPC client as [`Stack::grpc_client`] makes it.
pub type GrpcClient = DispatchClient<InterceptedService<tonic::transport::Channel, BearerKey>>;

/// Puts an API key on every gRPC request.
#[derive(Clone)]
pub struct BearerKey(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// An event of `run_id` as a forger would write it: a fresh id and a fixed time, not
/// yet linked into a chain (`dispatch_runlog::chain::link` does that).
pub fn forged_event(run_id: &RunId, body: Body) -> dispatch_proto::run::v1::RunEvent {
    dispatch_proto::run::v1::RunEvent {
        event_id: RunId::new().to_string(),
        run_id: run_id.to_string(),
        time_unix_ms: 1_700_000_000_000,
        writer: "forger".into(),
        // The role that writes this kind: a forgery that gets who-wrote-what right.
        role: dispatch_runlog::roles::writer_for(&body) as i32,
        body: Some(body),
        ..Default::default()
    }
}

/// The subject of `event`'s run its role appends on (the dispatcher's for no role).
pub fn subject_of(event: &dispatch_proto::run::v1::RunEvent) -> dispatch_bus::subject::Subject {
    let run_id: RunId = event.run_id.parse().expect("a run id");
    let writer = dispatch_runlog::roles::writer_of(event.role())
        .unwrap_or(dispatch_bus::subject::LogWriter::Dispatcher);
    dispatch_bus::subject::run(&run_id, writer)
}

/// Creates an API key in `workspace`'s store (as `dispatch api-key create` does).
pub fn api_key(workspace: &Path) -> Result<String> {
    use dispatch_service::api_keys::{Store, store_path};
    let path = store_path(workspace);
    let mut store = Store::load(&path)?;
    let key = store.create("test")?;
    store.save(&path)?;
    Ok(key)
}

/// An HTTP client that authenticates with `key`.
pub fn http_client(key: &str) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse()?,
    );
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        // Ingress closes a kept-alive connection idle for 10 s (`--header-timeout`); a
        // client that keeps one longer races that close with its next request.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?)
}

/// The run logs as a reader in the workspace at `root` sees them: trusting its seal key.
pub async fn workspace_log(bus: &Bus, root: &Path) -> Result<RunLog> {
    let trust = dispatch_runlog::seal::Trust::default()
        .with_workspace_key(&dispatch_service::layout::seal_key(root));
    Ok(RunLog::open(bus, "test").await?.with_trust(trust))
}

/// Waits for a run's terminal event in `log` and returns its whole (verified) log.
/// Rides out NATS being briefly away (a restart in a chaos test, a node killed).
pub async fn wait_finished(
    log: &RunLog,
    run_id: RunId,
    limit: Duration,
) -> Result<Vec<StoredEvent>> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let late = tokio::time::Instant::now() > deadline;
        match log.read(&run_id).await {
            Ok(events)
                if events
                    .iter()
                    .any(|e| matches!(e.event.body, Some(Body::RunFinished(_)))) =>
            {
                return Ok(events);
            }
            Ok(events) if late => {
                bail!(
                    "run {run_id} did not finish within {limit:?}; log has {} events",
                    events.len()
                );
            }
            Err(e) if late || e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
                return Err(e.into());
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Stack {
    /// nats-server and the named services, each started as a process and healthy.
    pub async fn start(services: &[&str]) -> Result<Self> {
        let nats = NatsServer::start().await?;
        let workspace = tempfile::Builder::new().prefix("dispatch-ws-").tempdir()?;
        // As `dispatch up` does: the workspace's seal key exists before any service.
        dispatch_runlog::seal::Sealer::load_or_create(&dispatch_service::layout::seal_key(
            workspace.path(),
        ))?;
        let bus = nats.bus().await?;
        let api_key = api_key(workspace.path())?;
        let mut stack = Self {
            nats,
            workspace,
            services: Vec::new(),
            bus,
            http: http_client(&api_key)?,
            api_key,
        };
        for service in services {
            stack.add(service).await?;
        }
        Ok(stack)
    }

    /// ledger, policy allowing the test tools, and connectors offering them.
    pub async fn with_test_tools() -> Result<Self> {
        let mut stack = Self::start(&["ledger"]).await?;
        let policy = stack.test_policy()?;
        let policy = policy.to_str().context("policy path is UTF-8")?.to_owned();
        stack.add_with("policy", &["--policy", &policy]).await?;
        stack.add_with("connectors", &["--test-tools"]).await?;
        Ok(stack)
    }

    pub async fn add(&mut self, service: &str) -> Result<&Service> {
        self.add_env(service, &[]).await
    }

    /// [`Self::add`] with `env` set for the process.
    pub async fn add_env(&mut self, service: &str, env: &[(&str, &str)]) -> Result<&Service> {
        let args: &[&str] = if service == "ingress" {
            &["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]
        } else {
            &[]
        };
        self.add_with_env(service, args, env).await
    }

    pub fn service(&mut self, name: &str) -> Result<&mut Service> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no {name} in this stack"))
    }

    /// Stops a service with SIGTERM and forgets it.
    pub async fn stop(&mut self, name: &str) -> Result<()> {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no {name} in this stack"))?;
        let mut service = self.services.remove(i);
        service.terminate().await?;
        Ok(())
    }

    pub fn root(&self) -> &Path {
        self.workspace.path()
    }

    /// `http://<ingress addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress_addr("http_addr"))
    }

    /// `http://<ingress gRPC addr>`.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.ingress_addr("grpc_addr"))
    }

    /// A gRPC client of ingress that sends [`Self::api_key`] with every request.
    pub async fn grpc_client(&self) -> Result<GrpcClient> {
        let channel = tonic::transport::Channel::from_shared(self.grpc_url())?
            .connect()
            .await?;
        let key = format!("Bearer {}", self.api_key).parse()?;
        Ok(DispatchClient::with_interceptor(channel, BearerKey(key)))
    }

    /// An address ingress reports in its health (`http_addr`, `grpc_addr`).
    fn ingress_addr(&self, which: &str) -> String {
        let ingress = self
            .services
            .iter()
            .find(|s| s.name == "ingress")
            .expect("the stack runs ingress");
        ingress.health().detail[which]
            .as_str()
            .unwrap_or_else(|| panic!("ingress reports no {which}"))
            .to_owned()
    }

    /// Runs the `dispatch` CLI against this stack.
    pub fn cli(&self, args: &[&str]) -> Result<Cli> {
        self.cli_with_env(args, &[])
    }

    /// Runs the `dispatch` CLI against this stack with `env` set besides.
    pub fn cli_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Cli> {
        self.cli_run(args, env, None)
    }

    /// Runs the `dispatch` CLI against this stack with `input` on its standard input.
    pub fn cli_with_input(&self, args: &[&str], input: &str) -> Result<Cli> {
        self.cli_run(args, &[], Some(input))
    }

    fn cli_run(&self, args: &[&str], env: &[(&str, &str)], input: Option<&str>) -> Result<Cli> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(bin_dir().join("dispatch"))
            .args(args)
            .env("NATS_URL", self.nats.url())
            .env(
                "DISPATCH_NATS_NKEY",
                self.nats.seed(dispatch_bus::Identity::Cli),
            )
            .env("DISPATCH_WORKSPACE", self.root())
            // Last, so that the caller's settings win.
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("run dispatch")?;
        let mut stdin = child.stdin.take().context("the CLI's stdin")?;
        if let Some(input) = input {
            stdin.write_all(input.as_bytes())?;
        }
        drop(stdin);
        let output = child.wait_with_output().context("run dispatch")?;
        Ok(Cli {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    pub async fn log(&self) -> Result<RunLog> {
        workspace_log(&self.bus, self.root()).await
    }

    /// [`Self::wait_finished`], printing what the run did so far (`dispatch logs`) if it
    /// does not end in time: a slow real model's run that times out still shows why.
    pub async fn wait_finished_or_show(
        &self,
        run_id: RunId,
        limit: Duration,
    ) -> Result<Vec<StoredEvent>> {
        let waited = self.wait_finished(run_id, limit).await;
        if waited.is_err() {
            match self.cli(&["logs", &run_id.to_string()]) {
                Ok(logs) => eprintln!(
                    "run {run_id} did not end within {limit:?}; its log so far:\n{}{}",
                    logs.stdout, logs.stderr
                ),
                Err(e) => eprintln!("run {run_id} did not end, and its log cannot be read: {e}"),
            }
        }
        waited
    }

    /// Waits for a run's terminal event and returns its whole (verified) log. Rides out
    /// NATS being briefly away (a restart in a chaos test).
    pub async fn wait_finished(&self, run_id: RunId, limit: Duration) -> Result<Vec<StoredEvent>> {
        wait_finished(&self.log().await?, run_id, limit).await
    }

    /// Prints the last `lines` lines of every running service's log to stderr (for a
    /// failing test to say what the services saw).
    pub fn print_service_logs(&self, lines: usize) {
        for service in &self.services {
            let path = service.log_path(self.root());
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            eprintln!("--- {} ({}) ---", service.instance, path.display());
            for line in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{line}");
            }
        }
    }

    /// Starts `service` with extra arguments and keeps it in the stack.
    pub async fn add_with(&mut self, service: &str, args: &[&str]) -> Result<&Service> {
        self.add_with_env(service, args, &[]).await
    }

    /// Starts `service` with extra arguments and environment variables.
    pub async fn add_with_env(
        &mut self,
        service: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<&Service> {
        let started =
            Service::start_with_env(service, &self.nats, self.workspace.path(), args, env).await?;
        self.services.push(started);
        Ok(self.services.last().expect("just pushed"))
    }

    /// Submits a goal over the bus as the CLI does.
    pub async fn submit(&self, goal: &str, conversation: &str, timeout_ms: u64) -> Result<RunId> {
        let goal = dispatch_runlog::submit::Goal::new(goal, conversation, timeout_ms, "test")?;
        Ok(dispatch_runlog::submit::submit_goal(&self.bus, goal).await?)
    }

    /// Writes `n` finished runs straight into the run log, each sealed by this
    /// workspace's key as a dispatcher would: a request with a `goal_chars`-long goal for
    /// `conversation`, its feedback note, and `done`. For tests of what a ledger holding
    /// many runs does, without running each one.
    pub async fn seed_finished_runs(
        &self,
        n: usize,
        conversation: &str,
        goal_chars: usize,
    ) -> Result<Vec<RunId>> {
        let ids: Vec<RunId> = (0..n).map(|_| RunId::new()).collect();
        self.seed_finished_runs_with_ids(&ids, conversation, goal_chars)
            .await?;
        Ok(ids)
    }

    /// [`Self::seed_finished_runs`] with the given ids (say, made at other times with
    /// [`run_id_at`]).
    pub async fn seed_finished_runs_with_ids(
        &self,
        run_ids: &[RunId],
        conversation: &str,
        goal_chars: usize,
    ) -> Result<()> {
        seed_finished_runs(&self.bus, self.root(), run_ids, conversation, goal_chars).await
    }

    /// Runs a dispatcher inside the test process with `provider` as its model (the one
    /// test double: a model this machine cannot reach). Cancel the token to stop it.
    pub async fn dispatcher_in_process(
        &self,
        provider: std::sync::Arc<dyn dispatch_models::Provider>,
    ) -> Result<tokio_util::sync::CancellationToken> {
        let config = dispatch_dispatcher::Config {
            common: dispatch_service::CommonArgs {
                nats_url: self.nats.url(),
                workspace: self.root().to_path_buf(),
                instance: "in-process".into(),
                trusted_keys: Vec::new(),
                nats_auth: dispatch_service::NatsAuth {
                    nats_nkey: Some(self.nats.seed(dispatch_bus::Identity::Dispatcher)),
                    nats_creds: None,
                },
                telemetry: Default::default(),
            },
            max_runs: 4,
            lease_ms: dispatch_dispatcher::DEFAULT_LEASE.as_millis() as u64,
            chat_history_chars: 24_000,
            chat_history_turns: 50,
            model: dispatch_dispatcher::model::ModelArgs::offline(),
        };
        let providers = dispatch_dispatcher::model::Providers::both(provider);
        let dispatcher = dispatch_dispatcher::Dispatcher::build(config, providers).await?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(dispatcher.run(shutdown.clone()));
        Ok(shutdown)
    }

    /// Writes a policy document that also allows the test tools; returns its path.
    pub fn test_policy(&self) -> Result<PathBuf> {
        let path = self.root().join("test-policy.json");
        std::fs::write(&path, TEST_POLICY)?;
        Ok(path)
    }

    /// Lines of the `count` test tool's record for `key`: one per execution.
    pub fn counted(&self, key: &str) -> Vec<String> {
        std::fs::read_to_string(self.root().join(format!(".dispatch/counters/{key}.log")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Messages currently stored in a stream.
    pub async fn stream_messages(&self, stream: &str) -> Result<u64> {
        let mut stream = self.bus.jetstream().get_stream(stream).await?;
        Ok(stream.info().await?.state.messages)
    }

    /// `GET <ingress><path>` as JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self.http.get(self.url(path)).send().await?.json().await?)
    }

    /// Waits until every goal was taken and acknowledged and the command work queue is
    /// empty: nothing is left to do or in flight.
    pub async fn commands_drained(&self, limit: Duration) -> Result<()> {
        self.eventually(limit, || async {
            let left = self
                .stream_messages(dispatch_bus::streams::COMMANDS)
                .await
                .ok()?;
            let stream = self
                .bus
                .jetstream()
                .get_stream(dispatch_bus::streams::GOALS)
                .await
                .ok()?;
            let mut goals: dispatch_bus::async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer(dispatch_bus::streams::consumers::DISPATCHER_GOALS)
                .await
                .ok()?;
            let info = goals.info().await.ok()?;
            (left == 0 && info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        })
        .await
    }

    /// Waits until TASKS.org shows `finished` runs with a `:FINISHED:` line; returns it.
    pub async fn tasks_org_with_finished(
        &self,
        finished: usize,
        limit: Duration,
    ) -> Result<String> {
        let path = self.root().join("TASKS.org");
        self.eventually(limit, || async {
            let text = std::fs::read_to_string(&path).ok()?;
            (text.matches(":FINISHED:").count() == finished).then_some(text)
        })
        .await
    }

    /// Waits until the run's log holds an event `pick` accepts.
    pub async fn wait_for_event(
        &self,
        run_id: RunId,
        limit: Duration,
        pick: impl Fn(&Body) -> bool,
    ) -> Result<()> {
        let log = self.log().await?;
        self.eventually(limit, || {
            let log = log.clone();
            let pick = &pick;
            async move {
                let events = log.read(&run_id).await.ok()?;
                events
                    .iter()
                    .any(|e| e.event.body.as_ref().is_some_and(pick))
                    .then_some(())
            }
        })
        .await
    }

    /// Polls `read` until it returns `Some`, for up to `limit`.
    pub async fn eventually<T, F, Fut>(&self, limit: Duration, mut read: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(value) = read().await {
                return Ok(value);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("condition not met within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The built-in policy plus the test connector's tools.
pub const TEST_POLICY: &str = r#"{
  "rules": [
    {"name": "test-tools", "tools": ["test.*"], "effect": "allow"},
    {"name": "read-only-tools", "tools": ["files.read_file", "files.list_files"], "effect": "allow", "when": {"path_prefix": ["scratch"]}},
    {"name": "writes-inside-run", "tools": ["files.write_file"], "effect": "allow", "when": {"path_prefix": ["scratch"]}}
  ],
  "default": "deny"
}"#;

/// What a CLI invocation printed and how it exited.
#[derive(Debug)]
pub struct Cli {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Writes finished runs with `run_ids` straight into the run log, each sealed by the
/// key of `workspace` as a dispatcher would (see [`Stack::seed_finished_runs`]).
pub async fn seed_finished_runs(
    bus: &Bus,
    workspace: &Path,
    run_ids: &[RunId],
    conversation: &str,
    goal_chars: usize,
) -> Result<()> {
    use dispatch_proto::run::v1::{RunRequested, RunStatus};
    let sealer = dispatch_runlog::seal::Sealer::load_or_create(
        &dispatch_service::layout::seal_key(workspace),
    )?;
    let log = RunLog::open(bus, "seed")
        .await?
        .writing_as(dispatch_bus::subject::LogWriter::Dispatcher)
        .with_sealer(sealer);
    let numbered: Vec<(usize, RunId)> = run_ids.iter().copied().enumerate().collect();
    for chunk in numbered.chunks(200) {
        let mut writes = Vec::new();
        for &(i, run_id) in chunk {
            let mut handle = log.new_run(run_id);
            let goal = format!("Seeded errand {i} {}", "x".repeat(goal_chars));
            let conversation = conversation.to_owned();
            writes.push(async move {
                let request = Body::RunRequested(RunRequested {
                    goal,
                    conversation_id: conversation,
                    timeout_ms: 0,
                    origin: "seed".into(),
                    ..Default::default()
                });
                handle.append(request, "seed").await?;
                handle
                    .finish(RunStatus::Done, "seeded", "seeded", "seed")
                    .await?;
                Ok::<_, dispatch_runlog::Error>(())
            });
        }
        for result in futures::future::join_all(writes).await {
            result?;
        }
    }
    Ok(())
}

/// A run id made at `unix_ms` (a UUIDv7 carries its time), for runs seeded in the past.
pub fn run_id_at(unix_ms: u64) -> RunId {
    let timestamp = uuid::Timestamp::from_unix(
        uuid::NoContext,
        unix_ms / 1000,
        (unix_ms % 1000) as u32 * 1_000_000,
    );
    uuid::Uuid::new_v7(timestamp)
        .to_string()
        .parse()
        .expect("a hyphenated lowercase UUID")
}

/// The terminal event of a finished log.
pub fn finished(events: &[StoredEvent]) -> &RunFinished {
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::RunFinished(f)) => Some(f),
            _ => None,
        })
        .expect("the log is finished")
}

/// How many events of `kind` the log holds.
pub fn count(events: &[StoredEvent], kind: &str) -> usize {
    events
        .iter()
        .filter(|e| e.event.body.as_ref().is_some_and(|b| b.kind() == kind))
        .count()
}

pub fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One server-sent event: its id (a cursor) and its data, parsed as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: serde_json::Value,
}

/// Reads server-sent events from `response` until `last` says an event is the last
/// one wanted (it is included), `max` events were read, or `limit` passes.
pub async fn read_sse(
    response: reqwest::Response,
    max: usize,
    limit: Duration,
    last: impl Fn(&SseEvent) -> bool,
) -> Result<Vec<SseEvent>> {
    use futures::StreamExt as _;
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let (mut id, mut data) = (None, String::new());
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() {
                    let value = match data.as_str() {
                        // The protocol's end of a response.
                        "[DONE]" => serde_json::Value::String(data.clone()),
                        _ => serde_json::from_str(&data)
                            .with_context(|| format!("an SSE event that is not JSON: {data}"))?,
                    };
                    let event = SseEvent {
                        id: id.take(),
                        data: value,
                    };
                    data.clear();
                    let done = last(&event);
                    events.push(event);
                    if done || events.len() == max {
                        return Ok(events);
                    }
                }
            } else if let Some(value) = line.strip_prefix("id:") {
                id = Some(value.trim().to_owned());
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .with_context(|| format!("{} events, then nothing for too long", events.len()))?;
        match chunk {
            Some(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes?)),
            None => return Ok(events),
        }
    }
}

/// Every file under `dir` that holds `needle`, but `except`.
pub fn files_holding(
    dir: &std::path::Path,
    needle: &[u8],
    except: &std::path::Path,
) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path != except
                && std::fs::read(&path)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// Every goal stored in the goal stream, oldest first.
pub async fn stored_goals(bus: &Bus) -> Result<Vec<dispatch_proto::command::v1::SubmitGoal>> {
    use futures::StreamExt as _;
    let stream = bus
        .jetstream()
        .get_stream(dispatch_bus::streams::GOALS)
        .await?;
    let last = stream.get_info().await?.state.last_sequence;
    let mut goals = Vec::new();
    if last == 0 {
        return Ok(goals);
    }
    let consumer = stream
        .create_consumer(
            dispatch_bus::async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: dispatch_bus::subject::GOALS_ALL.into(),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let seq = message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        goals.push(prost::Message::decode(message.payload.as_ref())?);
        if seq >= last {
            break;
        }
    }
    Ok(goals)
}

/// A proxy to a real model server that keeps every answer, in order, under `dir`.
pub async fn recorder(upstream: String, dir: PathBuf) -> anyhow::Result<String> {
    std::fs::create_dir_all(&dir)?;
    let count = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (upstream, dir, count, http) =
            (upstream.clone(), dir.clone(), count.clone(), http.clone());
        async move {
            let path = request.uri().path().trim_start_matches("/v1").to_owned();
            let body = axum::body::to_bytes(request.into_body(), 16 << 20)
                .await
                .unwrap_or_default();
            let sent = http
                .post(format!("{upstream}{path}"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let Ok(response) = sent else {
                return axum::response::IntoResponse::into_response((
                    axum::http::StatusCode::BAD_GATEWAY,
                    Vec::<u8>::new(),
                ));
            };
            let status = response.status();
            let streamed = response
                .headers()
                .get("content-type")
                .is_some_and(|t| t.to_str().unwrap_or_default().contains("event-stream"));
            let bytes = response.bytes().await.unwrap_or_default().to_vec();
            let n = {
                let mut c = count.lock().unwrap();
                *c += 1;
                *c
            };
            let ext = if streamed { "sse" } else { "json" };
            let _ = std::fs::write(dir.join(format!("{n:02}.{ext}")), &bytes);
            let _ = std::fs::write(dir.join(format!("{n:02}.{ext}.request.json")), &body);
            let kind = if streamed {
                "text/event-stream"
            } else {
                "application/json"
            };
            axum::response::Response::builder()
                .status(status.as_u16())
                .header("content-type", kind)
                .body(axum::body::Body::from(bytes))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// A webhook receiver on the Standard Webhooks library (`tests/mcp/webhook_receiver.py`),
/// answering 500 to its first `fail_first` requests, each request a JSON line in `log`;
/// with the port it listens on. It binds a free port itself and says which, so no other
/// test can take the port between its choice and its bind.
pub async fn webhook_receiver(
    secret: &str,
    fail_first: u32,
    log: &Path,
) -> Result<(tokio::process::Child, u16)> {
    use tokio::io::AsyncBufReadExt as _;
    let mut child =
        tokio::process::Command::new(dispatch_testkit::mcp_servers().join("venv/bin/python"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/mcp/webhook_receiver.py"
            ))
            .args(["0", secret, &fail_first.to_string()])
            .arg(log)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
    let stdout = child.stdout.take().context("the receiver's stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the webhook receiver did not say its port within 30 s")??;
    let port = line
        .trim()
        .parse()
        .with_context(|| format!("the webhook receiver said {line:?}, not a port"))?;
    Ok((child, port))
}
