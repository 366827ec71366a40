//! What every Dispatch service process has in common, so each `main.rs` stays a few
//! lines: the flags that locate NATS and the workspace, telemetry (logs, traces, metrics:
//! [`telemetry`]), and a shutdown token that SIGINT or SIGTERM cancels. Service logic lives in each
//! service's own library.

use std::path::PathBuf;

/// Every service, in the order a stack starts them (`dispatch up`, the test stacks).
pub const SERVICES: [&str; 7] = [
    "ledger",
    "policy",
    "connectors",
    "streamer",
    "scheduler",
    "dispatcher",
    "ingress",
];

pub mod api_keys;
pub mod config;
pub mod hosts;
pub mod telemetry;

use tokio_util::sync::CancellationToken;

/// Flags every service takes. Each can also come from the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// NATS server to connect to.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Workspace root: TASKS.org and workflows/ are written here, machine state under
    /// .dispatch/.
    #[arg(long, env = "DISPATCH_WORKSPACE", default_value = ".")]
    pub workspace: PathBuf,
    /// Name of this copy among the service's copies (default: pid and a random suffix,
    /// chosen once when the flags are parsed).
    #[arg(long, env = "DISPATCH_INSTANCE", default_value_t = dispatch_bus::health::instance_name(), hide_default_value = true)]
    pub instance: String,
    /// Ed25519 public keys (hex, comma-separated) whose seals on finished runs are
    /// trusted, besides the workspace's own key.
    #[arg(long, env = "DISPATCH_TRUSTED_KEYS", value_delimiter = ',', value_parser = dispatch_runlog::seal::parse_public_key)]
    pub trusted_keys: Vec<[u8; 32]>,
    #[command(flatten)]
    pub nats_auth: NatsAuth,
    #[command(flatten)]
    pub telemetry: telemetry::TelemetryArgs,
}

/// How a process authenticates to NATS. Without either flag, the identity's seed in
/// the workspace (`.dispatch/auth/<identity>.nk`, made by `dispatch up`) is used when
/// it exists, and no credentials otherwise.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuth {
    /// File holding this process's nkey seed (mode 0600).
    #[arg(
        long,
        global = true,
        env = "DISPATCH_NATS_NKEY",
        conflicts_with = "nats_creds"
    )]
    pub nats_nkey: Option<PathBuf>,
    /// NATS credentials file (user JWT and seed), for a server in operator mode.
    #[arg(long, global = true, env = "DISPATCH_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
}

impl NatsAuth {
    /// The credentials `identity` connects with from `workspace`.
    pub fn credentials(
        &self,
        workspace: &std::path::Path,
        identity: dispatch_bus::Identity,
    ) -> Result<dispatch_bus::Credentials, dispatch_bus::Error> {
        if let Some(path) = &self.nats_creds {
            return Ok(dispatch_bus::Credentials::CredsFile(path.clone()));
        }
        if let Some(path) = &self.nats_nkey {
            return dispatch_bus::Credentials::nkey_file(path);
        }
        let own = dispatch_bus::auth::seed_path(&layout::auth_dir(workspace), identity);
        if own.exists() {
            return dispatch_bus::Credentials::nkey_file(&own);
        }
        Ok(dispatch_bus::Credentials::None)
    }

    /// Connects to `url` as `identity`.
    pub async fn connect(
        &self,
        url: &str,
        workspace: &std::path::Path,
        identity: dispatch_bus::Identity,
    ) -> Result<dispatch_bus::Bus, dispatch_bus::Error> {
        let credentials = self.credentials(workspace, identity)?;
        dispatch_bus::Bus::connect(url, identity, &credentials).await
    }
}

impl CommonArgs {
    /// Connects this service to the bus as `identity`.
    pub async fn connect(
        &self,
        identity: dispatch_bus::Identity,
    ) -> Result<dispatch_bus::Bus, dispatch_bus::Error> {
        self.nats_auth
            .connect(&self.nats_url, &self.workspace, identity)
            .await
    }
}

impl CommonArgs {
    /// Whose seals this process accepts: the configured keys and the workspace key.
    pub fn trust(&self) -> dispatch_runlog::seal::Trust {
        dispatch_runlog::seal::Trust::keys(self.trusted_keys.iter().copied())
            .with_workspace_key(&layout::seal_key(&self.workspace))
    }
}

/// Sets up logs, traces and metrics for `service` as its flags and the `OTEL_*`
/// variables say ([`telemetry`]); keep the value until the process ends.
pub fn init_telemetry(
    service: &str,
    common: &CommonArgs,
) -> Result<telemetry::Telemetry, telemetry::Error> {
    private_files();
    telemetry::init(service, &common.instance, &common.telemetry)
}

/// From now on this process creates files only its owner may read (0600, directories
/// 0700): logs, trails, views, run directories hold what runs did, and may hold what a
/// tool returned. Children started from here inherit it.
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Set by a supervisor (`dispatch up`) that holds the child's stdin open: when the
/// supervisor dies, even by SIGKILL, stdin reaches end-of-file and the child stops.
pub const EXIT_WITH_PARENT: &str = "DISPATCH_EXIT_WITH_PARENT";

/// A token cancelled on the first SIGINT or SIGTERM (or, under a supervisor that set
/// [`EXIT_WITH_PARENT`], when the supervisor goes away).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let watch_parent = std::env::var_os(EXIT_WITH_PARENT).is_some();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("shutdown requested"),
            _ = term.recv() => tracing::info!("shutdown requested"),
            _ = parent_gone(), if watch_parent => tracing::warn!("supervisor gone; shutting down"),
        }
        cancel.cancel();
    });
    token
}

/// Resolves when stdin reaches end-of-file.
async fn parent_gone() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {}
}

/// Where things live under a workspace. Machine-owned state is under `.dispatch/`;
/// `TASKS.org` and `workflows/` sit at the root, where git sees them.
pub mod layout {
    use std::path::{Path, PathBuf};

    pub fn state_dir(workspace: &Path) -> PathBuf {
        workspace.join(".dispatch")
    }

    /// The workspace `start` is in, found the way git finds a repository: the nearest
    /// of `start` and its parents that holds a `.dispatch/` directory.
    pub fn find_workspace(start: &Path) -> Option<PathBuf> {
        start
            .ancestors()
            .find(|dir| state_dir(dir).is_dir())
            .map(Path::to_path_buf)
    }

    /// A run's working directory: `.dispatch/runs/<run_id>/`.
    pub fn run_dir(workspace: &Path, run_id: &dispatch_bus::RunId) -> PathBuf {
        state_dir(workspace).join("runs").join(run_id.to_string())
    }

    /// The leaves' shared workspace inside a run's directory.
    pub const SCRATCH: &str = "scratch";

    pub fn workflows_dir(workspace: &Path) -> PathBuf {
        workspace.join("workflows")
    }

    pub fn tasks_file(workspace: &Path) -> PathBuf {
        workspace.join("TASKS.org")
    }

    /// The nkey seeds of the bus identities (`<identity>.nk`, mode 0600).
    pub fn auth_dir(workspace: &Path) -> PathBuf {
        state_dir(workspace).join("auth")
    }

    /// The configuration `dispatch up` starts its nats-server with.
    pub fn nats_config(workspace: &Path) -> PathBuf {
        state_dir(workspace).join("nats.conf")
    }

    /// The Ed25519 key that seals finished runs.
    pub fn seal_key(workspace: &Path) -> PathBuf {
        state_dir(workspace).join("keys").join("seal.ed25519")
    }

    /// A run's exported, verifiable trail.
    pub fn steps_file(workspace: &Path, run_id: &dispatch_bus::RunId) -> PathBuf {
        run_dir(workspace, run_id).join("_steps.jsonl")
    }
}
