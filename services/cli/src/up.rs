//! `dispatch up`: a whole local stack in the foreground, supervised
//! ([`crate::supervise`]): a child that dies is started again, and Ctrl-C or SIGTERM
//! stops them all.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dispatch_bus::auth::seed_path;
use dispatch_bus::durability::SyncPolicy;
use dispatch_bus::{Bus, Credentials, Identity};
use dispatch_runlog::RunLog;
use dispatch_runlog::submit::{Goal, submit_goal};
use dispatch_service::layout;
use tokio::process::{Child, Command};

use crate::supervise::{Launch, Supervisor};
use crate::{Failure, exit};

/// The services `up` starts, in start order.
pub use dispatch_service::SERVICES;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Port of the local nats-server (ignored when NATS_URL is set).
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// When the local nats-server syncs JetStream to disk: `always` (every write before
    /// its acknowledgement, so an acked goal survives a power loss) or an interval such
    /// as `2m` (acks from the page cache: survives a crash of the server, not of the
    /// machine). Ignored when NATS_URL is set.
    #[arg(long, env = "DISPATCH_NATS_SYNC", default_value = "always")]
    nats_sync: SyncPolicy,
    /// Port of the local nats-server's monitoring endpoint on 127.0.0.1 (`/varz`,
    /// `/jsz`, `/healthz`); 0 turns it off. Ignored when NATS_URL is set.
    #[arg(long, default_value_t = 8222)]
    nats_monitor_port: u16,
    /// First of the ports, on 127.0.0.1, the services serve Prometheus `/metrics` on
    /// (one each, in the order they start); 0 (the default): any free port each, shown
    /// as they come up.
    #[arg(long, env = "DISPATCH_METRICS_PORT", default_value_t = 0)]
    metrics_port: u16,
    /// Address ingress listens on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// Address ingress serves gRPC on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    grpc: String,
    /// Once everything is up, run this goal end to end and show what it left.
    #[arg(long)]
    demo: Option<String>,
    /// Stop the stack after the demo instead of staying up.
    #[arg(long, requires = "demo")]
    exit_after_demo: bool,
    /// Base URL of an OpenAI-compatible model server, up to and including `/v1`
    /// (`cargo xtask model` serves `http://127.0.0.1:8091/v1`), for the dispatcher's
    /// author and worker; unset, runs use the offline provider, which is not a model.
    #[arg(long = "model", env = "DISPATCH_MODEL_URL", value_name = "URL")]
    model_url: Option<String>,
    /// The model's name on that server.
    #[arg(long, env = "DISPATCH_MODEL", requires = "model_url")]
    model_name: Option<String>,
}

/// How `up` starts its own nats-server, kept so it can start it again.
#[derive(Clone)]
pub(crate) struct LocalNats {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    /// The monitoring port (`-m`), 0 for none.
    pub monitor_port: u16,
    pub store: PathBuf,
    pub log: PathBuf,
}

impl LocalNats {
    /// Starts the server on its port and store.
    pub(crate) fn start(&self) -> Result<Child, Failure> {
        let mut command = Command::new(&self.binary);
        if self.monitor_port != 0 {
            // Bound to the `-a` address, loopback.
            command.args(["-m", &self.monitor_port.to_string()]);
        }
        command
            .arg("-c")
            .arg(&self.config)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--store_dir",
            ])
            .arg(&self.store)
            .arg("-l")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::new(format!("start {}: {e}", self.binary.display())))
    }
}

/// The name `up` gives its nats-server among its processes.
pub(crate) const NATS: &str = "nats-server";

pub async fn up(
    workspace: &Path,
    nats_url: Option<String>,
    auth: &dispatch_service::NatsAuth,
    args: UpArgs,
) -> Result<u8, Failure> {
    // Checked before anything is made: a bad flag changes nothing.
    if let Some(url) = &args.model_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(Failure::new(format!(
            "--model {url:?} is not a model server's base URL; give one such as \
             http://127.0.0.1:8091/v1"
        )));
    }
    let workspace = workspace
        .canonicalize()
        .map_err(|e| Failure::new(format!("workspace {}: {e}", workspace.display())))?;
    // Logs, the store, views and trails are its owner's alone (and every service it
    // starts makes its files so too).
    dispatch_service::private_files();
    // The key that seals this workspace's runs, made before any service starts, so
    // every reader trusts it from its first event.
    dispatch_runlog::seal::Sealer::load_or_create(&layout::seal_key(&workspace))?;
    // And the local user's API key, so the HTTP API is usable at once.
    crate::api_key::ensure_local(&workspace)?;
    let state = layout::state_dir(&workspace);
    std::fs::create_dir_all(&state)
        .map_err(|e| Failure::new(format!("{}: {e}", state.display())))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Failure::new(format!("{}: {e}", state.display())))?;
    }
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Failure::new(format!("{}: {e}", logs.display())))?;
    // Take over SIGINT/SIGTERM before starting anything, so a signal that arrives while
    // the stack is still starting stops it cleanly instead of killing only this process.
    let mut signals = Signals::install()?;
    let mut children = Supervisor::default();

    let result = start_and_serve(
        &workspace,
        &logs,
        nats_url,
        auth,
        &args,
        &mut children,
        &mut signals,
    )
    .await;
    children.stop_all().await;
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            errln!("dispatch: logs are in {}", logs.display());
            Err(e)
        }
    }
}

async fn start_and_serve(
    workspace: &Path,
    logs: &Path,
    nats_url: Option<String>,
    auth: &dispatch_service::NatsAuth,
    args: &UpArgs,
    children: &mut Supervisor,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    if let Some(url) = &args.model_url {
        errln!("  model: {url} (author and worker)");
    }
    // A local server admits only the identities whose seeds are in .dispatch/auth/;
    // each service gets its own. An external one is reached with the credentials the
    // operator configured (flags or environment, inherited by every service).
    let (url, admin, seeds, local) = match nats_url {
        Some(url) => {
            errln!("using NATS at {url}");
            let credentials = auth.credentials(workspace, Identity::Admin)?;
            (url, credentials, None, None)
        }
        None => {
            let seeds = layout::auth_dir(workspace);
            let config = layout::nats_config(workspace);
            dispatch_bus::auth::write_server_config(&seeds, &config, args.nats_sync)?;
            let local = local_nats(
                workspace,
                logs,
                &config,
                args.nats_port,
                args.nats_monitor_port,
            )?;
            errln!("  JetStream syncs to disk: {}", args.nats_sync);
            children.start(NATS, Launch::Nats(local.clone()))?;
            let admin = Credentials::nkey_file(&seed_path(&seeds, Identity::Admin))?;
            let url = format!("nats://127.0.0.1:{}", args.nats_port);
            (url, admin, Some(seeds), Some(local))
        }
    };
    let bus = connect_with_retry(&url, &admin, children).await?;

    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| Failure::new("cannot tell where the dispatch binaries are"))?;
    for (n, service) in SERVICES.into_iter().enumerate() {
        let binary = bin_dir.join(format!("dispatch-{service}"));
        let metrics_port = match args.metrics_port {
            0 => 0,
            base => base.checked_add(n as u16).ok_or_else(|| {
                Failure::new(format!(
                    "--metrics-port {base}: the services need {} ports from it",
                    SERVICES.len()
                ))
            })?,
        };
        if !binary.exists() {
            return Err(Failure::new(format!(
                "{} is missing; build the services with `cargo build --bins` (cargo xtask up does)",
                binary.display()
            )));
        }
        let instance = format!("{service}-local");
        let mut service_args: Vec<OsString> = vec!["--nats-url".into(), url.clone().into()];
        if let Some(dir) = &seeds {
            let identity = Identity::of_service(service).expect("a Dispatch service");
            service_args.push("--nats-nkey".into());
            service_args.push(seed_path(dir, identity).into_os_string());
        }
        service_args.extend([
            "--workspace".into(),
            workspace.as_os_str().to_owned(),
            "--instance".into(),
            instance.clone().into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}").into(),
        ]);
        if service == "dispatcher" {
            if let Some(url) = &args.model_url {
                service_args.extend(["--model-url".into(), url.into()]);
            }
            if let Some(name) = &args.model_name {
                service_args.extend(["--model".into(), name.into()]);
            }
        }
        if service == "ingress" {
            service_args.extend([
                "--listen".into(),
                args.http.clone().into(),
                "--grpc-listen".into(),
                args.grpc.clone().into(),
            ]);
        }
        children.start(
            service,
            Launch::Service {
                binary,
                args: service_args,
                log: logs.join(format!("{service}.log")),
            },
        )?;
        let health =
            dispatch_bus::health::wait(&bus, service, &instance, Duration::from_secs(30), || {
                children.check_alive().map_err(|e| e.to_string())
            })
            .await?;
        let extra = health
            .detail
            .get("http_addr")
            .and_then(|a| a.as_str())
            .map(|a| format!(" on http://{a}"))
            .into_iter()
            .chain(
                health
                    .detail
                    .get("grpc_addr")
                    .and_then(|a| a.as_str())
                    .map(|a| format!(", gRPC on {a}")),
            )
            .chain(
                health
                    .detail
                    .get("metrics_addr")
                    .and_then(|a| a.as_str())
                    .map(|a| format!(", metrics on http://{a}/metrics")),
            )
            .collect::<String>();
        errln!("  {service:<11} up (pid {}){extra}", health.pid);
    }
    errln!(
        "Dispatch is up. NATS {url}, workspace {}\nHTTP API key (send as `Authorization: Bearer <key>`): {}",
        workspace.display(),
        dispatch_service::api_keys::local_key_path(workspace).display()
    );

    if let Some(goal) = &args.demo {
        let code = demo(&bus, workspace, goal).await?;
        if args.exit_after_demo {
            return Ok(code);
        }
    }
    errln!(
        "Try: dispatch run \"<a goal>\", dispatch ps -a, dispatch tasks. Ctrl-C stops the stack."
    );
    let watch = crate::store_watch::StoreWatch::new(bus, local);
    serve_until_signal(children, signals, watch).await
}

/// Finds nats-server and says how `up` runs it.
fn local_nats(
    workspace: &Path,
    logs: &Path,
    config: &Path,
    port: u16,
    monitor_port: u16,
) -> Result<LocalNats, Failure> {
    let mut roots: Vec<PathBuf> = vec![workspace.to_path_buf()];
    // Running from target/<profile>/: the project root is two levels up.
    if let Some(root) = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
    {
        roots.push(root);
    }
    let mut last = None;
    let mut found = None;
    for root in &roots {
        match dispatch_natsbin::locate(root) {
            Ok(ok) => {
                found = Some(ok);
                break;
            }
            Err(problem) => last = Some(problem),
        }
    }
    let (binary, version) = match (found, last) {
        (Some(found), _) => found,
        (None, Some(problem)) => return Err(Failure::new(problem.to_string())),
        (None, None) => {
            return Err(Failure::new(
                dispatch_natsbin::Problem::NotFound.to_string(),
            ));
        }
    };
    let store = layout::state_dir(workspace).join("nats");
    std::fs::create_dir_all(&store)
        .map_err(|e| Failure::new(format!("{}: {e}", store.display())))?;
    errln!(
        "  nats-server {version} on 127.0.0.1:{port}, store {}",
        store.display()
    );
    if monitor_port != 0 {
        errln!("  nats-server monitoring on http://127.0.0.1:{monitor_port} (/varz, /jsz)");
    }
    Ok(LocalNats {
        binary,
        config: config.to_path_buf(),
        port,
        monitor_port,
        store,
        log: logs.join("nats.log"),
    })
}

async fn connect_with_retry(
    url: &str,
    credentials: &Credentials,
    children: &mut Supervisor,
) -> Result<Bus, Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        children.check_alive()?;
        match Bus::connect(url, Identity::Admin, credentials).await {
            Err(e) if e.kind() == dispatch_bus::ErrorKind::Denied => return Err(e.into()),
            Ok(bus) => return Ok(bus),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn demo(bus: &Bus, workspace: &Path, goal: &str) -> Result<u8, Failure> {
    let trust =
        dispatch_runlog::seal::Trust::default().with_workspace_key(&layout::seal_key(workspace));
    let log = RunLog::open(bus, "cli").await?.with_trust(trust);
    let goal = Goal::new(goal, dispatch_bus::ConversationId::DEFAULT, 0, "cli")
        .map_err(|e| Failure::new(format!("demo goal: {e}")))?;
    let run_id = submit_goal(bus, goal.clone()).await?;
    let goal = goal.goal();
    errln!("\ndemo goal {goal:?} → run {run_id}");
    let code = crate::follow(&log, run_id, true, Some(Duration::from_secs(120))).await?;
    // The ledger renders TASKS.org a moment after the run ends; wait for this run's
    // entry to show its finish before printing the file.
    let tasks = layout::tasks_file(workspace);
    let id = run_id.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&tasks).unwrap_or_default();
        let finished = text.split_once(&id).is_some_and(|(_, entry)| {
            entry
                .split("\n* ")
                .next()
                .is_some_and(|e| e.contains(":FINISHED:"))
        });
        if finished || tokio::time::Instant::now() > deadline {
            errln!("\n{} now reads:\n{text}", tasks.display());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if code != exit::DONE {
        errln!("the demo run did not end done (exit code {code})");
    }
    Ok(code)
}

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    /// Asks for the children left down after crash-looping.
    revive: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, Failure> {
        use tokio::signal::unix::{SignalKind, signal};
        let install =
            |kind| signal(kind).map_err(|e| Failure::new(format!("install signal handler: {e}")));
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            revive: install(SignalKind::user_defined1())?,
        })
    }
}

async fn serve_until_signal(
    children: &mut Supervisor,
    signals: &mut Signals,
    mut watch: crate::store_watch::StoreWatch,
) -> Result<u8, Failure> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut probe = tokio::time::interval(crate::store_watch::EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // A stop comes first: the children it stops are not to be restarted.
            biased;
            _ = signals.interrupt.recv() => break,
            _ = signals.terminate.recv() => break,
            _ = signals.revive.recv() => children.revive(),
            _ = tick.tick() => children.tend(),
            _ = probe.tick() => watch.check(children).await?,
        }
    }
    errln!("stopping");
    Ok(exit::DONE)
}
