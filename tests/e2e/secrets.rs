//! Secret leases end to end: a secret set through the CLI (from stdin), leased by the
//! HTTP connector for one call to the one host configured for it, and then looked for
//! everywhere a test can look: every message in JetStream's store on disk, the run's
//! events and trail, every file in the workspace (service logs, TASKS.org, workflows),
//! the HTTP API and the CLI's outputs. Only the server it was meant for sees it.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_testkit::bin_dir;
use dispatch_tests::{Stack, finished};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const LIMIT: Duration = Duration::from_secs(60);

/// Recognizable, and nowhere else by chance.
const PLANTED: &str = "sk-planted-7f3a9c1e-do-not-leak";

const POLICY: &str = r#"{"default": "deny", "rules": [
  {"name": "http", "effect": "allow", "tools": ["http.request"]}
]}"#;

/// A server on a free local port that answers every request with the request's own
/// head (an echo, as some APIs do with headers), and keeps every head it saw.
async fn echo_server() -> Result<(u16, Arc<Mutex<Vec<String>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                kept.lock().unwrap().push(head.clone());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((port, seen))
}

/// `dispatch secret set NAME` with `value` on stdin.
fn set_secret(stack: &Stack, name: &str, value: &str) -> Result<std::process::Output> {
    let mut child = std::process::Command::new(bin_dir().join("dispatch"))
        .args(["secret", "set", name])
        .env("NATS_URL", stack.nats.url())
        .env(
            "DISPATCH_NATS_NKEY",
            stack.nats.seed(dispatch_bus::Identity::Cli),
        )
        .env("DISPATCH_WORKSPACE", stack.root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{value}\n").as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// Every file under `dir` that holds `needle`, but `except`.
fn files_holding(dir: &std::path::Path, needle: &[u8], except: &std::path::Path) -> Vec<String> {
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

#[tokio::test]
async fn a_leased_secret_reaches_its_host_and_nothing_else() -> Result<()> {
    let (port, seen) = echo_server().await?;
    let mut stack = Stack::start(&["ledger"]).await?;
    std::fs::write(
        stack.root().join("dispatch.toml"),
        format!(
            r#"
[connectors.http]
allow_hosts = ["127.0.0.1:{port}"]

[[connectors.http.credentials]]
host = "127.0.0.1:{port}"
header = "Authorization"
secret = "planted"
prefix = "Bearer "
"#
        ),
    )?;
    let policy = stack.root().join("policy.json");
    std::fs::write(&policy, POLICY)?;
    stack
        .add_with("policy", &["--policy", policy.to_str().context("utf-8")?])
        .await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    stack.add("ingress").await?;

    // Set from stdin; `********` sent back keeps it; refused values change nothing.
    let set = set_secret(&stack, "planted", PLANTED)?;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let kept = set_secret(&stack, "planted", dispatch_secrets::MASK)?;
    let said = String::from_utf8_lossy(&kept.stderr);
    assert!(
        kept.status.success() && said.contains("unchanged"),
        "{said}"
    );
    let short = set_secret(&stack, "planted", "abc")?;
    assert!(!short.status.success());
    let bad_name = set_secret(&stack, "2bad", PLANTED)?;
    assert!(!bad_name.status.success());

    // The model sends its own Authorization header; the configured one replaces it.
    let url = format!("http://127.0.0.1:{port}/echo");
    let plan = format!(
        "#+TITLE: Use the token\n* TODO Call the API\n  - call: http.request {{\"method\": \"POST\", \"url\": \"{url}\", \"headers\": {{\"Authorization\": \"Bearer guessed\"}}, \"body\": \"hello\"}}\n  :done-when: true\n"
    );
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(
        finished(&events).status(),
        RunStatus::Done,
        "{}",
        finished(&events).reason
    );

    // The host it is for got it, once, in place of the model's guess.
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].contains(&format!("authorization: Bearer {PLANTED}")),
        "{}",
        heads[0]
    );
    assert!(!heads[0].contains("guessed"));
    // What the tool answered (the echo) is recorded masked.
    let output = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallCompleted(c)) => Some(c.output.clone()),
            _ => None,
        })
        .context("no result")?;
    assert!(
        output.contains("authorization: Bearer ********"),
        "{output}"
    );

    // Now look everywhere.
    let trail = dispatch_service::layout::steps_file(stack.root(), &run_id);
    stack
        .eventually(LIMIT, || async { trail.exists().then_some(()) })
        .await?;
    let needle = PLANTED.as_bytes();
    let key_file = dispatch_secrets::key_path(stack.root());
    assert_eq!(
        files_holding(stack.root(), needle, &key_file),
        Vec::<String>::new(),
        "workspace files (logs, trail, TASKS.org, views) hold the secret"
    );
    assert_eq!(
        files_holding(&stack.nats.store_dir(), needle, &key_file),
        Vec::<String>::new(),
        "JetStream's store holds the secret in the clear"
    );
    for event in &events {
        let bytes = prost::Message::encode_to_vec(&event.event);
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }
    let run = run_id.to_string();
    for args in [
        vec!["logs", run.as_str()],
        vec!["inspect", run.as_str()],
        vec!["ps", "-a", "--format", "json"],
        vec!["secret", "ls"],
        vec!["secret", "ls", "--format", "json"],
        vec!["tasks"],
        vec!["replay", run.as_str()],
    ] {
        let out = stack.cli(&args)?;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        assert!(
            !out.stdout.contains(PLANTED) && !out.stderr.contains(PLANTED),
            "dispatch {args:?} shows the secret"
        );
    }
    let listed = stack.cli(&["secret", "ls"])?.stdout;
    assert!(
        listed.contains("planted") && listed.contains("********"),
        "{listed}"
    );
    for path in [
        format!("/v1/runs/{run}"),
        "/v1/runs?all=true".into(),
        "/v1/tasks".into(),
    ] {
        let body = stack
            .http
            .get(stack.url(&path))
            .send()
            .await?
            .text()
            .await?;
        assert!(!body.contains(PLANTED), "GET {path} shows the secret");
    }
    Ok(())
}
