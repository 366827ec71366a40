//! `dispatch up`: the local stack as one foreground process, supervising its children.
//! (Its restarts of a SIGKILLed nats-server and service, with runs in flight, are in
//! the chaos suite, `tests/e2e/chaos.rs`.)

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use dispatch_tests::up::{
    Up, command as up, free_port, port_closed, processes_mentioning, signal, wait_for_stack,
};
use tokio::process::Command;

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
    // nats-server's monitoring and every service's metrics are on loopback.
    assert!(
        stderr.contains("nats-server monitoring on http://127.0.0.1:"),
        "{stderr}"
    );
    for service in dispatch_service::SERVICES {
        assert!(
            stderr.lines().any(|l| l.contains(&format!(" {service} "))
                && l.contains("metrics on http://127.0.0.1:")),
            "{service}: {stderr}"
        );
    }
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
    assert_eq!(
        services(&processes_mentioning(&needle)),
        dispatch_tests::ALL.len()
    );

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

#[tokio::test]
async fn a_service_that_keeps_dying_is_left_down_until_asked_for_again() -> anyhow::Result<()> {
    let mut up = Up::start("").await?;
    let children = up.children();
    assert_eq!(children, 1 + dispatch_tests::ALL.len());

    // The scheduler dies each time it is started: five exits within a minute.
    let mut killed = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !up.said().contains("leaving it down") {
        if let Some(pid) = up.child_pid("dispatch-scheduler")
            && killed.insert(pid)
        {
            signal(pid, "KILL")?;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "up never gave up on the scheduler; it said:\n{}",
            up.said()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let said = up.said();
    assert_eq!(killed.len(), 5, "{said}");
    // Each exit and each restart was said, the waits doubling.
    for wait in ["500ms", "1s", "2s", "4s"] {
        assert!(
            said.contains(&format!(
                "dispatch: scheduler exited (killed by SIGKILL); restarting it in {wait}\n"
            )),
            "{wait}: {said}"
        );
    }
    assert_eq!(
        said.matches("dispatch: scheduler restarted (pid").count(),
        4
    );
    // Given up on: which, why, where its log is, and how to have it back.
    assert!(
        said.contains(
            "dispatch: scheduler exited (killed by SIGKILL), 5 times within 1m; leaving it down"
        ),
        "{said}"
    );
    assert!(said.contains(".dispatch/logs/scheduler.log"), "{said}");
    let usr1 = format!("`kill -USR1 {}` starts it again", up.pid());
    assert!(said.contains(&usr1), "{said}");

    // The rest of the stack runs on without it, and it is not started again.
    let run = up
        .submit("Tidy the shared drive", Duration::from_secs(30))
        .await?;
    up.wait_status(&run, "done", Duration::from_secs(90))
        .await?;
    assert_eq!(up.child_pid("dispatch-scheduler"), None, "{}", up.said());
    assert_eq!(up.children(), children - 1);

    // Asked for, it comes back.
    signal(up.pid(), "USR1")?;
    up.wait_said(
        "dispatch: scheduler restarted (pid",
        5,
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        up.said()
            .contains("dispatch: starting scheduler again, as asked")
    );
    assert!(
        up.child_pid("dispatch-scheduler").is_some(),
        "{}",
        up.said()
    );

    // And Ctrl-C still stops everything.
    up.interrupt_leaves_nothing().await?;
    Ok(())
}

/// Whether this machine lets the test give nats-server a small disk of its own: a
/// tmpfs mounted in a private mount namespace (root, or CAP_SYS_ADMIN).
fn small_disks_allowed() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=1m tmpfs "$0""#)
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fills the file system holding `dir` with a ballast file; returns its path.
fn fill(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 1 << 16];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => return Err(e),
        }
    }
    // The page cache may hold a last partial chunk; what matters is that it is full.
    let _ = file.sync_all();
    Ok(path)
}

#[tokio::test]
async fn a_full_disk_is_reported_and_healed_once_space_is_freed() -> anyhow::Result<()> {
    if !small_disks_allowed() {
        eprintln!("skipped: mounting a small tmpfs needs root (or CAP_SYS_ADMIN)");
        return Ok(());
    }
    let workspace = tempfile::tempdir()?;
    let store = workspace.path().join(".dispatch/nats");
    std::fs::create_dir_all(&store)?;
    let stderr_path = tempfile::NamedTempFile::new()?.into_temp_path();
    let (nats_port, http_port) = (free_port(), free_port());
    // nats-server's store gets a 32 MiB disk of its own, in a mount namespace that
    // lives and dies with `dispatch up`.
    let up_command = up(workspace.path(), nats_port, http_port);
    let std_up = up_command.as_std();
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=32m tmpfs "$0" && exec "$@""#)
        .arg(&store)
        .arg(std_up.get_program())
        .args(std_up.get_args())
        .current_dir(workspace.path())
        .env_remove("NATS_URL")
        .env_remove("DISPATCH_WORKSPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let said = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    wait_for_stack(http_port).await;
    let pid = child.id().expect("running");
    // The store as `dispatch up` and its nats-server see it.
    let their_store = std::path::PathBuf::from(format!("/proc/{pid}/root")).join(
        store
            .canonicalize()?
            .strip_prefix("/")
            .expect("an absolute path"),
    );

    let token = std::fs::read_to_string(workspace.path().join(".dispatch/auth/http-token"))?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let submit = |goal: &'static str| {
        http.post(format!("{base}/v1/goals"))
            .bearer_auth(token.trim())
            .json(&serde_json::json!({ "goal": goal }))
            .send()
    };
    assert_eq!(submit("Before the disk fills").await?.status(), 202);

    let ballast = fill(&their_store)?;
    // Goals are refused, and /healthz says why and what to do.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let health = loop {
        let _ = submit("While the disk is full").await;
        let response = http.get(format!("{base}/healthz")).send().await?;
        if response.status() == 503 {
            break response.json::<serde_json::Value>().await?;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never said that writes fail; up said:\n{}",
            said()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["hint"].as_str().unwrap_or("").contains("Free space"),
        "{health}"
    );
    // Once ingress knows, a goal is refused at once, saying why (`writes_refused` is
    // answered without trying to store it): not after its tries time out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = submit("While ingress knows").await?;
        let status = response.status();
        let problem: serde_json::Value = response.json().await.unwrap_or_default();
        if problem["code"] == "writes_refused" {
            assert_eq!(status, 503, "{problem}");
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Free space"),
                "{problem}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "goals were not refused at once: {problem}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !said().contains("Free some space") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "up did not tell the operator what to do:\n{}",
            said()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Space comes back; nobody restarts anything by hand.
    std::fs::remove_file(&ballast)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let run_id = loop {
        let response = submit("After space came back").await?;
        if response.status() == 202 {
            let body: serde_json::Value = response.json().await?;
            break body["run_id"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "goals were still refused after space came back; up said:\n{}",
            said()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(said().contains("restarting nats-server"), "{}", said());
    // And it runs to the end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let view: serde_json::Value = http
            .get(format!("{base}/v1/runs/{run_id}"))
            .bearer_auth(token.trim())
            .send()
            .await?
            .json()
            .await?;
        if view["status"] == "done" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never finished: {view}\nup said:\n{}",
            said()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let healthy = http.get(format!("{base}/healthz")).send().await?;
    assert_eq!(healthy.status(), 200);

    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(40), child.wait()).await??;
    assert_eq!(exit.code(), Some(0), "{}", said());
    Ok(())
}
