//! The test harness: real parts, cleaned up on drop.
//!
//! - [`NatsServer`] spawns `nats-server` with JetStream on a random port (`-p -1`) and a
//!   temporary store, with the same identities and permissions `dispatch up` sets up
//!   (one nkey seed per identity), reports its URL, restarts on the same store and
//!   port, and kills and removes everything on drop.
//! - [`Service`] starts one of Dispatch's binaries as a real process and waits for its
//!   health reply on the bus (never a sleep).
//! - [`model::StandIn`] stands in for an OpenAI-compatible model server, replaying
//!   answers recorded from real ones.
//!
//! - [`mcp_servers`] and [`kill_processes_with`] reach the MCP servers `cargo xtask test`
//!   installs, and kill one of them (or anything else) by a marker in its command line.
//!
//! Binaries are looked up beside the test executable (`target/<profile>/`); `cargo xtask
//! test` builds them first. The nats-server binary is found as `dispatch-natsbin` says.

pub mod model;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dispatch_bus::durability::SyncPolicy;
use dispatch_bus::health::Health;
use dispatch_bus::{Bus, Credentials, Identity};
use tokio::process::{Child, Command};

/// How long a spawned process gets to become healthy.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Where services connect: one server, or a cluster reached through its server list.
pub trait Nats {
    /// The URL (or comma-separated server list) a service is given.
    fn urls(&self) -> String;
    /// Where `identity`'s nkey seed is.
    fn seed(&self, identity: Identity) -> PathBuf;
}

impl Nats for NatsServer {
    fn urls(&self) -> String {
        self.url()
    }
    fn seed(&self, identity: Identity) -> PathBuf {
        NatsServer::seed(self, identity)
    }
}

impl Nats for NatsCluster {
    fn urls(&self) -> String {
        NatsCluster::urls(self)
    }
    fn seed(&self, identity: Identity) -> PathBuf {
        dispatch_bus::auth::seed_path(self._auth.path(), identity)
    }
}

/// Connects to `nats` as `identity` with its seed.
pub async fn connect(nats: &impl Nats, identity: Identity) -> Result<Bus> {
    let credentials = Credentials::nkey_file(&nats.seed(identity))?;
    Ok(Bus::connect(&nats.urls(), identity, &credentials).await?)
}

/// A `nats-server` child with JetStream, owned by a test.
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    /// Where the identities' seeds are: the server's own directory, or a cluster's.
    auth: PathBuf,
    /// A cluster node's name, route port and its peers' route ports.
    node: Option<Node>,
    /// When JetStream syncs to disk (`always` unless a benchmark asks otherwise).
    sync: SyncPolicy,
}

struct Node {
    name: String,
    route_port: u16,
    peers: Vec<u16>,
}

/// Three (or `n`) `nats-server`s with JetStream clustered on loopback, sharing one set
/// of identities: what a deployment on several machines looks like, in one test.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// Holds the shared seeds; dropped with the cluster.
    _auth: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` clustered servers on free loopback ports and waits until JetStream
    /// has a meta leader (a stream can be declared).
    pub async fn start(n: usize) -> Result<Self> {
        let cluster = Self::spawn(n).await?;
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            match cluster.bus().await {
                Ok(_) => return Ok(cluster),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("the cluster did not come up: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Starts `n` clustered servers and returns as soon as each listens: JetStream may
    /// have no meta leader yet and nothing is declared, as on a fresh deployment where
    /// every process starts at once.
    pub async fn spawn(n: usize) -> Result<Self> {
        Self::spawn_with(n, SyncPolicy::default()).await
    }

    /// [`Self::spawn`] with every node syncing JetStream to disk as `sync` says.
    pub async fn spawn_with(n: usize, sync: SyncPolicy) -> Result<Self> {
        let auth = tempfile::Builder::new()
            .prefix("dispatch-cluster-")
            .tempdir()?;
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let mut nodes = Vec::with_capacity(n);
        for (i, route_port) in route_ports.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("dispatch-nats-")
                .tempdir()?;
            nodes.push(NatsServer {
                child: None,
                dir,
                port: 0,
                auth: auth.path().to_path_buf(),
                sync,
                node: Some(Node {
                    name: format!("node-{}", i + 1),
                    route_port: *route_port,
                    peers: route_ports
                        .iter()
                        .filter(|p| *p != route_port)
                        .copied()
                        .collect(),
                }),
            });
        }
        for node in &mut nodes {
            node.spawn().await?;
        }
        Ok(Self { nodes, _auth: auth })
    }

    /// Every node's URL, comma-separated, as `NATS_URL` names a cluster.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects as the admin identity through every node's URL (streams declared).
    pub async fn bus(&self) -> Result<Bus> {
        connect(self, Identity::Admin).await
    }

    /// The node called `name` (as stream info names a leader).
    pub fn node_named(&mut self, name: &str) -> Option<&mut NatsServer> {
        self.nodes.iter_mut().find(|n| n.name() == Some(name))
    }
}

/// A port free on loopback now (the kernel's choice; released for the caller to bind).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl NatsServer {
    /// Starts a server on a random port with a fresh temporary store.
    pub async fn start() -> Result<Self> {
        Self::start_with_sync(SyncPolicy::default()).await
    }

    /// [`Self::start`] with JetStream syncing to disk as `sync` says.
    pub async fn start_with_sync(sync: SyncPolicy) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dispatch-nats-")
            .tempdir()?;
        let auth = dir.path().join("auth");
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            auth,
            node: None,
            sync,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A cluster node's server name (`node-1`, …); none for a lone server.
    pub fn name(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.name.as_str())
    }

    /// True while the server process runs (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Where the server keeps its JetStream store.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Where the server keeps its JetStream files and its log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects a bus client as the admin identity (streams declared).
    pub async fn bus(&self) -> Result<Bus> {
        self.bus_as(Identity::Admin).await
    }

    /// Connects a bus client as `identity`.
    pub async fn bus_as(&self, identity: Identity) -> Result<Bus> {
        Ok(Bus::connect(&self.url(), identity, &self.credentials(identity)?).await?)
    }

    /// Where `identity`'s nkey seed is.
    pub fn seed(&self, identity: Identity) -> PathBuf {
        dispatch_bus::auth::seed_path(&self.auth, identity)
    }

    pub fn credentials(&self, identity: Identity) -> Result<Credentials> {
        Ok(Credentials::nkey_file(&self.seed(identity))?)
    }

    /// Kills the server (SIGKILL) and leaves it down until [`Self::restart`].
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let binary = nats_server_binary()?;
        let ports_dir = self.dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        for entry in std::fs::read_dir(&ports_dir)? {
            std::fs::remove_file(entry?.path())?;
        }
        let config = self.dir.path().join("nats.conf");
        dispatch_bus::auth::write_server_config(&self.auth, &config, self.sync)?;
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut command = Command::new(&binary);
        if let Some(node) = &self.node {
            let routes: Vec<String> = node
                .peers
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            command
                .args(["-n", &node.name, "--cluster_name", "dispatch-test"])
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{}", node.route_port))
                .arg("--routes")
                .arg(routes.join(","));
        }
        let child = command
            .arg("-c")
            .arg(&config)
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "--store_dir"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(self.dir.path().join("nats.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        self.child = Some(child);
        self.port = wait_for_port(&ports_dir).await?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

async fn wait_for_port(ports_dir: &Path) -> Result<u16> {
    let deadline = tokio::time::Instant::now() + STARTUP;
    loop {
        if let Some(port) = read_ports_file(ports_dir) {
            return Ok(port);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nats-server wrote no ports file in {}", ports_dir.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_ports_file(ports_dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(ports_dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports["nats"].as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// The nats-server the tests use (see `dispatch-natsbin` for the lookup order).
pub fn nats_server_binary() -> Result<PathBuf> {
    dispatch_natsbin::locate(&workspace_root())
        .map(|(path, _)| path)
        .map_err(|problem| anyhow::anyhow!("{problem}"))
}

/// The repository root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// Where cargo put the workspace's binaries for the running profile: beside this
/// executable, or one level up when it is a test in `target/<profile>/deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps/ has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A Dispatch binary running as a child process, killed on drop.
pub struct Service {
    pub name: String,
    pub instance: String,
    child: Child,
    health: Health,
}

impl Service {
    /// Starts `dispatch-<service>` against `nats` as its own identity with extra
    /// `args`, and waits until it answers on its instance health subject.
    pub async fn start(
        service: &str,
        nats: &impl Nats,
        workspace: &Path,
        args: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(service, nats, workspace, args, &[]).await
    }

    /// [`Self::start`] with extra environment variables for the process.
    pub async fn start_with_env(
        service: &str,
        nats: &impl Nats,
        workspace: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let identity = Identity::of_service(service)
            .with_context(|| format!("{service} is no Dispatch service"))?;
        let binary = bin_dir().join(format!("dispatch-{service}"));
        if !binary.exists() {
            bail!(
                "{} is not built: run `cargo build --bins` (cargo xtask test does)",
                binary.display()
            );
        }
        let instance = format!("{service}-{}", uuid_suffix());
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(workspace.join(format!(".{instance}.log")))?;
        let child = Command::new(&binary)
            .arg("--nats-url")
            .arg(nats.urls())
            .arg("--nats-nkey")
            .arg(nats.seed(identity))
            .arg("--workspace")
            .arg(workspace)
            .arg("--instance")
            .arg(&instance)
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let bus = connect(nats, Identity::Admin).await?;
        let health = wait_healthy(&bus, service, &instance).await?;
        Ok(Self {
            name: service.to_owned(),
            instance,
            child,
            health,
        })
    }

    pub fn pid(&self) -> u32 {
        self.health.pid
    }

    /// What the service reported about itself, e.g. ingress's `http_addr`.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// True once the process has exited (crashed, or was killed).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Where the service writes its log.
    pub fn log_path(&self, workspace: &Path) -> PathBuf {
        workspace.join(format!(".{}.log", self.instance))
    }

    /// SIGKILL, the way a crash looks.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit; returns its exit status code.
    pub async fn terminate(&mut self) -> Result<Option<i32>> {
        let pid = self.child.id().context("already exited")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .context("service did not exit within 20s of SIGTERM")??;
        Ok(exit.code())
    }
}

/// Waits until `instance` of `service` answers its health subject.
pub async fn wait_healthy(bus: &Bus, service: &str, instance: &str) -> Result<Health> {
    Ok(dispatch_bus::health::wait(bus, service, instance, STARTUP, || Ok(())).await?)
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}{:08x}", std::process::id(), nanos)
}

/// Where `cargo xtask test` installed the MCP servers the tests run
/// (`DISPATCH_MCP_SERVERS`, `.tools/mcp`): `node_modules/` and a `venv/`.
pub fn mcp_servers() -> PathBuf {
    PathBuf::from(std::env::var_os("DISPATCH_MCP_SERVERS").expect(
        "DISPATCH_MCP_SERVERS is not set: run `cargo xtask test`, which installs the MCP \
         servers into .tools/mcp",
    ))
}

/// The pids of processes whose command line holds `marker`.
pub fn pids_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every process whose command line holds `marker`; returns how many.
pub fn kill_processes_with(marker: &str) -> usize {
    pids_with(marker)
        .into_iter()
        .filter(|pid| {
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        })
        .count()
}
