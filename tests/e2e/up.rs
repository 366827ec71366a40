//! `dispatch up`: the local stack as one foreground process.

use std::process::Stdio;
use std::time::Duration;

use dispatch_testkit::bin_dir;
use tokio::process::Command;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("bound").port()
}

fn up(workspace: &std::path::Path, nats_port: u16, http_port: u16) -> Command {
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
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Waits until ingress under `dispatch up` answers `/healthz` on `http_port`.
async fn wait_for_stack(http_port: u16) {
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

fn port_closed(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn up_runs_a_demo_goal_end_to_end_and_cleans_up() -> anyhow::Result<()> {
    let workspace = tempfile::tempdir()?;
    let (nats_port, http_port) = (free_port(), free_port());
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        up(workspace.path(), nats_port, http_port)
            .args(["--demo", "Tidy the shared drive", "--exit-after-demo"])
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Dispatch is up"), "{stderr}");
    let tasks = std::fs::read_to_string(workspace.path().join("TASKS.org"))?;
    assert!(tasks.contains("* DONE Tidy the shared drive"), "{tasks}");
    // Every identity has its own private seed, and the local user an HTTP API key.
    use std::os::unix::fs::PermissionsExt;
    let auth = workspace.path().join(".dispatch/auth");
    for file in [
        "ingress.nk",
        "dispatcher.nk",
        "cli.nk",
        "admin.nk",
        "http-token",
        "api-keys.json",
    ] {
        let mode = std::fs::metadata(auth.join(file))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    assert!(stderr.contains(".dispatch/auth/http-token"), "{stderr}");
    assert!(
        workspace.path().join(".dispatch/nats").is_dir(),
        "the local store lives under .dispatch/nats"
    );
    assert!(
        workspace
            .path()
            .join("workflows/tidy-the-shared-drive.org")
            .is_file()
    );
    assert!(
        port_closed(nats_port) && port_closed(http_port),
        "up left a process listening"
    );
    Ok(())
}

#[tokio::test]
async fn ctrl_c_stops_the_whole_stack_cleanly() -> anyhow::Result<()> {
    let workspace = tempfile::tempdir()?;
    let (nats_port, http_port) = (free_port(), free_port());
    let mut child = up(workspace.path(), nats_port, http_port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_stack(http_port).await;
    // The key `up` made for the local user opens the API; nothing else does.
    let token = std::fs::read_to_string(workspace.path().join(".dispatch/auth/http-token"))?;
    let runs = format!("http://127.0.0.1:{http_port}/v1/runs");
    let http = reqwest::Client::new();
    let with = http.get(&runs).bearer_auth(token.trim()).send().await?;
    assert_eq!(with.status(), 200);
    assert_eq!(http.get(&runs).send().await?.status(), 401);
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(40), child.wait()).await??;
    assert_eq!(exit.code(), Some(0));
    assert!(
        port_closed(nats_port) && port_closed(http_port),
        "a process outlived Ctrl-C"
    );
    Ok(())
}

/// Processes whose command line mentions `needle`, as (pid, command line).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push((pid, cmdline));
        }
    }
    out
}

#[tokio::test]
async fn services_stop_when_up_is_killed() -> anyhow::Result<()> {
    let workspace = tempfile::tempdir()?;
    let needle = workspace.path().to_string_lossy().into_owned();
    let (nats_port, http_port) = (free_port(), free_port());
    let mut child = up(workspace.path(), nats_port, http_port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_for_stack(http_port).await;
    let services = |procs: &[(u32, String)]| {
        procs
            .iter()
            .filter(|(_, c)| c.contains("dispatch-"))
            .count()
    };
    assert_eq!(services(&processes_mentioning(&needle)), 5);

    child.kill().await?; // SIGKILL: no chance to stop anything itself
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = processes_mentioning(&needle);
        if services(&left) == 0 {
            // nats-server has no way to notice; clean it up here.
            for (pid, _) in left {
                let _ = std::process::Command::new("kill")
                    .arg("-9")
                    .arg(pid.to_string())
                    .status();
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "services outlived `dispatch up`: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
