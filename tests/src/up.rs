//! `dispatch up` as a user runs it: the binary, in a workspace of its own, on free
//! ports, its stderr kept to read what it said; its children found by their parent.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, bail};
use dispatch_testkit::bin_dir;
use tokio::process::Command;

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("bound").port()
}

pub fn port_closed(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// `dispatch up` in `workspace` with its own nats-server on `nats_port` and ingress's
/// HTTP on `http_port` (gRPC and monitoring on free ports).
pub fn command(workspace: &Path, nats_port: u16, http_port: u16) -> Command {
    let mut command = Command::new(bin_dir().join("dispatch"));
    command
        .current_dir(workspace)
        .env_remove("NATS_URL")
        .env_remove("DISPATCH_WORKSPACE")
        .args([
            "up",
            "--nats-port",
            &nats_port.to_string(),
            "--http",
            &format!("127.0.0.1:{http_port}"),
            "--grpc",
            "127.0.0.1:0",
            "--nats-monitor-port",
            &free_port().to_string(),
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Waits until ingress under `dispatch up` answers `/healthz` on `http_port`.
pub async fn wait_for_stack(http_port: u16) {
    let http = reqwest::Client::new();
    let healthz = format!("http://127.0.0.1:{http_port}/healthz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !http
        .get(&healthz)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stack never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Processes whose command line mentions `needle`, as (pid, command line).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    processes()
        .into_iter()
        .filter(|(_, _, cmdline)| cmdline.contains(needle))
        .map(|(pid, _, cmdline)| (pid, cmdline))
        .collect()
}

/// Every process, as (pid, parent pid, command line).
fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(raw), Ok(stat)) = (
            std::fs::read(entry.path().join("cmdline")),
            std::fs::read_to_string(entry.path().join("stat")),
        ) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the name may hold spaces, not a `)`.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        out.push((pid, ppid, cmdline));
    }
    out
}

/// Sends `signal` (`KILL`, `INT`, `USR1`, ...) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// A running `dispatch up` with its workspace and what it says on stderr.
pub struct Up {
    pub workspace: tempfile::TempDir,
    pub child: tokio::process::Child,
    pub nats_port: u16,
    pub http_port: u16,
    stderr: PathBuf,
    _stderr_file: tempfile::TempPath,
    pub http: reqwest::Client,
}

impl Up {
    /// Starts `dispatch up` in a fresh workspace holding `dispatch_toml` (if not empty)
    /// and waits until its ingress is healthy and `up` says the stack is up.
    pub async fn start(dispatch_toml: &str) -> Result<Self> {
        let workspace = tempfile::tempdir()?;
        if !dispatch_toml.is_empty() {
            std::fs::write(workspace.path().join("dispatch.toml"), dispatch_toml)?;
        }
        let stderr_file = tempfile::NamedTempFile::new()?.into_temp_path();
        let (nats_port, http_port) = (free_port(), free_port());
        let child = command(workspace.path(), nats_port, http_port)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_file)?)
            .spawn()?;
        let up = Self {
            workspace,
            child,
            nats_port,
            http_port,
            stderr: stderr_file.to_path_buf(),
            _stderr_file: stderr_file,
            http: reqwest::Client::new(),
        };
        let healthy = tokio::time::timeout(Duration::from_secs(90), wait_for_stack(http_port));
        if healthy.await.is_err() {
            bail!("the stack never became healthy; up said:\n{}", up.said());
        }
        // Ingress answers before `up` has seen every service's health: only once it says
        // the stack is up does it tend its children (a child dying before that fails
        // the start).
        up.wait_said("Dispatch is up.", 1, Duration::from_secs(30))
            .await?;
        Ok(up)
    }

    /// Everything `up` has said on stderr so far.
    pub fn said(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until `up` has said `text` at least `times` times.
    pub async fn wait_said(&self, text: &str, times: usize, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.said().matches(text).count() < times {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "up did not say {text:?} {times} times; it said:\n{}",
                    self.said()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("up is running")
    }

    /// The pid of `up`'s child whose command line mentions `needle` (`nats-server`,
    /// `dispatch-dispatcher`), if it has one.
    pub fn child_pid(&self, needle: &str) -> Option<u32> {
        let up = self.pid();
        processes()
            .into_iter()
            .find(|(_, ppid, cmdline)| *ppid == up && cmdline.contains(needle))
            .map(|(pid, ..)| pid)
    }

    /// How many children `up` has.
    pub fn children(&self) -> usize {
        let up = self.pid();
        processes()
            .into_iter()
            .filter(|(_, ppid, _)| *ppid == up)
            .count()
    }

    /// The local user's HTTP API key.
    pub fn token(&self) -> Result<String> {
        let token =
            std::fs::read_to_string(self.workspace.path().join(".dispatch/auth/http-token"))?;
        Ok(token.trim().to_owned())
    }

    /// POSTs a goal, asking again while ingress cannot take it (the bus restarting,
    /// say); the run id.
    pub async fn submit(&self, goal: &str, limit: Duration) -> Result<String> {
        let token = self.token()?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let response = self
                .http
                .post(format!("http://127.0.0.1:{}/v1/goals", self.http_port))
                .bearer_auth(&token)
                .json(&serde_json::json!({ "goal": goal }))
                .send()
                .await;
            let said = match response {
                Ok(r) if r.status() == 202 => {
                    let body: serde_json::Value = r.json().await?;
                    return Ok(body["run_id"].as_str().unwrap_or_default().to_owned());
                }
                Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                bail!("goal {goal:?} not taken: {said}; up said:\n{}", self.said());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Run `run_id` as ingress shows it now (`null` if it cannot say).
    async fn view_of(&self, run_id: &str) -> Result<serde_json::Value> {
        let token = self.token()?;
        let response = self
            .http
            .get(format!(
                "http://127.0.0.1:{}/v1/runs/{run_id}",
                self.http_port
            ))
            .bearer_auth(&token)
            .send()
            .await?;
        Ok(response.json().await.unwrap_or_default())
    }

    /// Run `run_id`'s status as ingress shows it now (empty if it cannot say).
    pub async fn status_of(&self, run_id: &str) -> Result<String> {
        let view = self.view_of(run_id).await?;
        Ok(view["status"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits until run `run_id` is `status`, as ingress shows it.
    pub async fn wait_status(&self, run_id: &str, status: &str, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = serde_json::Value::Null;
        loop {
            if let Ok(view) = self.view_of(run_id).await {
                if view["status"] == status {
                    return Ok(());
                }
                last = view;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "run {run_id} is not {status}: {last}; up said:\n{}",
                    self.said()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Ctrl-C: `up`'s exit code once it has stopped everything.
    pub async fn interrupt(&mut self) -> Result<Option<i32>> {
        signal(self.pid(), "INT")?;
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??;
        Ok(exit.code())
    }

    /// Ctrl-C, and then nothing of the stack is left: `up` exits 0, its ports are
    /// closed, and no process mentions its workspace.
    pub async fn interrupt_leaves_nothing(&mut self) -> Result<()> {
        let code = self.interrupt().await?;
        anyhow::ensure!(
            code == Some(0),
            "up exited {code:?}; it said:\n{}",
            self.said()
        );
        anyhow::ensure!(
            port_closed(self.nats_port) && port_closed(self.http_port),
            "a process outlived Ctrl-C"
        );
        let workspace = self.workspace.path().to_string_lossy().into_owned();
        let left = processes_mentioning(&workspace);
        anyhow::ensure!(left.is_empty(), "processes outlived Ctrl-C: {left:?}");
        Ok(())
    }
}
