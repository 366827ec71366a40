//! Secret leases end to end: a secret set through the CLI (from stdin), leased by the
//! HTTP connector for one call to the one host configured for it, or by an MCP
//! connector for one connection (a stdio server's environment, an HTTP server's bearer
//! token), and then looked for everywhere a test can look: every message in JetStream's
//! store on disk, the run's events and trail, every file in the workspace (service
//! logs, TASKS.org, workflows), the HTTP API and the CLI's outputs. Only the server it
//! was meant for sees it.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_testkit::{bin_dir, mcp_servers, pids_with};
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

/// Looks for `secret` everywhere a test can: files in the workspace but the secrets
/// key, JetStream's store on disk, `events`, what the CLI and the HTTP API show.
async fn found_nowhere(
    stack: &Stack,
    run_id: dispatch_bus::RunId,
    events: &[dispatch_runlog::StoredEvent],
    secret: &str,
) -> Result<()> {
    let trail = dispatch_service::layout::steps_file(stack.root(), &run_id);
    stack
        .eventually(LIMIT, || async { trail.exists().then_some(()) })
        .await?;
    let needle = secret.as_bytes();
    let key_file = dispatch_secrets::key_path(stack.root());
    assert_eq!(
        dispatch_tests::files_holding(stack.root(), needle, &key_file),
        Vec::<String>::new(),
        "workspace files (logs, trail, TASKS.org, views) hold the secret"
    );
    assert_eq!(
        dispatch_tests::files_holding(&stack.nats.store_dir(), needle, &key_file),
        Vec::<String>::new(),
        "JetStream's store holds the secret in the clear"
    );
    for event in events {
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
        vec!["tools"],
    ] {
        let out = stack.cli(&args)?;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "dispatch {args:?} shows the secret"
        );
    }
    for path in [
        format!("/v1/runs/{run}"),
        format!("/v1/runs/{run}/events"),
        "/v1/runs?all=true".into(),
        "/v1/tasks".into(),
        "/v1/conversations/default/transcript".into(),
    ] {
        let body = stack
            .http
            .get(stack.url(&path))
            .send()
            .await?
            .text()
            .await?;
        assert!(!body.contains(secret), "GET {path} shows the secret");
    }
    Ok(())
}

#[tokio::test]
async fn a_leased_secret_reaches_its_host_and_nothing_else() -> Result<()> {
    let (port, seen) = echo_server().await?;
    // Every service exports traces and metrics, serves /metrics and logs JSON: the
    // secret must be in none of them either.
    let receiver = dispatch_tests::otlp::Receiver::start().await?;
    let mut telemetry = receiver.env();
    telemetry.push(("DISPATCH_LOG_FORMAT", "json".into()));
    telemetry.push(("DISPATCH_METRICS_LISTEN", "127.0.0.1:0".into()));
    let env: Vec<(&str, &str)> = telemetry.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut stack = Stack::start(&[]).await?;
    stack.add_env("ledger", &env).await?;
    lease_for_http(&stack, port)?;
    let policy = stack.root().join("policy.json");
    std::fs::write(&policy, POLICY)?;
    stack
        .add_with_env(
            "policy",
            &["--policy", policy.to_str().context("utf-8")?],
            &env,
        )
        .await?;
    stack.add_env("connectors", &env).await?;
    stack.add_env("dispatcher", &env).await?;
    stack.add_env("ingress", &env).await?;

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

    let listed = stack.cli(&["secret", "ls"])?.stdout;
    assert!(
        listed.contains("planted") && listed.contains("********"),
        "{listed}"
    );
    found_nowhere(&stack, run_id, &events, PLANTED).await?;
    // Not in a span or a metric sent over OTLP (once the run's spans are there), nor
    // in any service's /metrics.
    stack
        .eventually(LIMIT, || async {
            receiver
                .spans()
                .iter()
                .any(|s| s.name == "execute_tool http.request")
                .then_some(())
        })
        .await?;
    assert!(
        !receiver.holds(PLANTED.as_bytes()),
        "the OTLP receiver got the secret"
    );
    for service in &stack.services {
        let addr = service.health().detail["metrics_addr"]
            .as_str()
            .context("metrics_addr")?;
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .text()
            .await?;
        assert!(text.contains("target_info"), "{}: {text}", service.name);
        assert!(!text.contains(PLANTED), "{}'s /metrics", service.name);
    }
    Ok(())
}

/// The forms a secret is passed on in by careless servers and models: as it is, in
/// base64 (on its own and after `user:`, as Basic auth has it), URL-safe base64, hex in
/// either case, percent-encoded, upper case.
fn forms(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    vec![
        secret.to_owned(),
        STANDARD.encode(secret),
        STANDARD.encode(format!("user:{secret}")),
        URL_SAFE_NO_PAD.encode(secret),
        hex::encode(secret),
        hex::encode_upper(secret),
        secret.bytes().map(|b| format!("%{b:02X}")).collect(),
        secret.to_uppercase(),
    ]
}

/// Configures the HTTP connector to reach 127.0.0.1:`port` with the secret `planted`
/// as its bearer token.
fn lease_for_http(stack: &Stack, port: u16) -> Result<()> {
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
    Ok(())
}

/// A free local port.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The output of the call to `tool` in `events`, or its error.
fn outcome(events: &[dispatch_runlog::StoredEvent], tool: &str) -> Result<String, String> {
    let call_id = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r)) if r.tool == tool => Some(r.call_id.clone()),
            _ => None,
        })
        .unwrap_or_default();
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallCompleted(c)) if c.call_id == call_id => Some(Ok(c.output.clone())),
            Some(Body::ToolCallFailed(f)) if f.call_id == call_id => Some(Err(f.error.clone())),
            _ => None,
        })
        .unwrap_or_else(|| Err(format!("no outcome of {tool}")))
}

/// Runs a plan calling `calls` (tool and JSON arguments) in one leaf; its events.
async fn run_calls(
    stack: &Stack,
    calls: &[(&str, &str)],
) -> Result<(dispatch_bus::RunId, Vec<dispatch_runlog::StoredEvent>)> {
    let mut plan = "#+TITLE: Use the servers\n* TODO Call them\n".to_owned();
    for (tool, args) in calls {
        plan.push_str(&format!("  - call: {tool} {args}\n"));
    }
    plan.push_str("  :done-when: true\n");
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    Ok((run_id, stack.wait_finished(run_id, LIMIT).await?))
}

#[tokio::test]
async fn mcp_servers_are_given_secrets_by_name_and_never_show_them() -> Result<()> {
    const WEB_TOKEN: &str = "wt-planted-2b8e61d4-do-not-leak";
    const ROTATED: &str = "sk-rotated-91c0f5a7-do-not-leak";
    // A streamable HTTP MCP server that answers 401 without the token, and whose one
    // tool says what Authorization header it was called with.
    let port = free_port()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/bearer_server.py");
    let _web = tokio::process::Command::new(mcp_servers().join("venv/bin/python"))
        .args([script, &port.to_string()])
        .env("BEARER_TOKEN", WEB_TOKEN)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // The everything server (stdio), its process singled out by a marker.
    let marker = format!("stdio-{}", uuid::Uuid::now_v7());
    let everything =
        mcp_servers().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let mut stack = Stack::start(&["ledger"]).await?;
    std::fs::write(
        stack.root().join("dispatch.toml"),
        format!(
            r#"
[[connectors.mcp]]
name = "everything"
command = "node"
args = ["{}", "stdio", "{marker}"]
secret_env = {{ EVERYTHING_TOKEN = "planted" }}

[[connectors.mcp]]
name = "web"
url = "http://127.0.0.1:{port}/mcp"
bearer_token_secret = "web-token"
"#,
            everything.display()
        ),
    )?;
    for (name, value) in [("planted", PLANTED), ("web-token", WEB_TOKEN)] {
        let set = set_secret(&stack, name, value)?;
        assert!(
            set.status.success(),
            "{}",
            String::from_utf8_lossy(&set.stderr)
        );
    }
    let policy = stack.root().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default": "deny", "rules": [
  {"name": "mcp", "effect": "allow", "tools": ["everything.*", "web.*"]}
]}"#,
    )?;
    stack
        .add_with("policy", &["--policy", policy.to_str().context("utf-8")?])
        .await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    stack.add("ingress").await?;
    // Both servers come up: the HTTP one only with the right token.
    stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["tools"]).ok()?.stdout;
            (out.contains("everything.get-env") && out.contains("web.whoami")).then_some(())
        })
        .await?;

    let (run_id, events) = run_calls(
        &stack,
        &[
            ("everything.get-env", "{}"),
            ("web.whoami", "{}"),
            ("web.whoami_encoded", "{}"),
        ],
    )
    .await?;
    assert_eq!(
        finished(&events).status(),
        RunStatus::Done,
        "{}",
        finished(&events).reason
    );
    // The stdio server had the value in its environment, the HTTP server got the token
    // with its call, and what they said back is masked.
    let env = outcome(&events, "everything.get-env").map_err(anyhow::Error::msg)?;
    assert!(env.contains(r#""EVERYTHING_TOKEN": "********""#), "{env}");
    let whoami = outcome(&events, "web.whoami").map_err(anyhow::Error::msg)?;
    assert_eq!(whoami, "authorization: Bearer ********");
    // Passed back encoded every which way: masked in each form.
    let encoded = outcome(&events, "web.whoami_encoded").map_err(anyhow::Error::msg)?;
    // (A base64 form keeps at most its last character, which holds a few bits of the
    // token's last byte and of whatever follows it.)
    assert_eq!(encoded.lines().count(), 7, "{encoded}");
    for line in encoded.lines() {
        assert!(line.contains("********"), "{line:?} in {encoded}");
    }
    found_nowhere(&stack, run_id, &events, PLANTED).await?;
    for form in forms(WEB_TOKEN) {
        found_nowhere(&stack, run_id, &events, &form).await?;
    }

    // Rotated: the server is started again with the new value.
    let [before] = pids_with(&marker)[..] else {
        anyhow::bail!("expected one everything process: {:?}", pids_with(&marker));
    };
    let set = set_secret(&stack, "planted", ROTATED)?;
    assert!(set.status.success());
    stack
        .eventually(LIMIT, || async {
            let now = pids_with(&marker);
            (now.len() == 1 && now[0] != before).then_some(())
        })
        .await?;
    let (run_id, events) = run_calls(&stack, &[("everything.get-env", "{}")]).await?;
    let env = outcome(&events, "everything.get-env").map_err(anyhow::Error::msg)?;
    assert!(env.contains(r#""EVERYTHING_TOKEN": "********""#), "{env}");
    found_nowhere(&stack, run_id, &events, ROTATED).await?;

    // Removed: the server is stopped, and calls say why.
    let out = stack.cli(&["secret", "rm", "planted"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    stack
        .eventually(LIMIT, || async {
            pids_with(&marker).is_empty().then_some(())
        })
        .await?;
    let (_, events) = run_calls(&stack, &[("everything.get-env", "{}")]).await?;
    let error = outcome(&events, "everything.get-env").unwrap_err();
    assert!(error.contains("no secret named planted"), "{error}");
    Ok(())
}

/// A server on a free local port that answers every request with the token of its
/// `Authorization: Bearer` header encoded every which way, as a careless API might.
async fn encoding_echo_server() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
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
                let token = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: Bearer "))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let body = forms(&token)[1..].join("\n");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

/// A hostile OpenAI-compatible server: it answers each request with the next of
/// `answers` (SSE bodies, made with [`sse_text`] and [`sse_call`]), and keeps every
/// request it was sent.
async fn scripted_model(answers: Vec<String>) -> Result<(String, Arc<Mutex<Vec<String>>>)> {
    use axum::response::IntoResponse as _;
    let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: String| {
            let (answers, kept) = (answers.clone(), kept.clone());
            async move {
                kept.lock().unwrap().push(body);
                let next = answers.lock().unwrap().pop_front().unwrap_or_default();
                ([("content-type", "text/event-stream")], next).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, seen))
}

fn sse_chunk(delta: serde_json::Value, finish: Option<&str>) -> String {
    let chunk = serde_json::json!({
        "id": "chatcmpl-hostile", "object": "chat.completion.chunk", "model": "hostile",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

/// An answer of `text`, streamed three characters at a time.
fn sse_text(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = sse_chunk(serde_json::json!({"role": "assistant"}), None);
    for piece in chars.chunks(3) {
        let piece: String = piece.iter().collect();
        out.push_str(&sse_chunk(serde_json::json!({"content": piece}), None));
    }
    out.push_str(&sse_chunk(serde_json::json!({}), Some("stop")));
    out.push_str("data: [DONE]\n\n");
    out
}

/// An answer calling `function` with `arguments`, streamed five characters at a time.
fn sse_call(function: &str, arguments: &str) -> String {
    let chars: Vec<char> = arguments.chars().collect();
    let mut out = sse_chunk(serde_json::json!({"role": "assistant"}), None);
    for (i, piece) in chars.chunks(5).enumerate() {
        let piece: String = piece.iter().collect();
        let mut call = serde_json::json!({"index": 0, "function": {"arguments": piece}});
        if i == 0 {
            call["id"] = "call-1".into();
            call["type"] = "function".into();
            call["function"]["name"] = function.into();
        }
        out.push_str(&sse_chunk(serde_json::json!({"tool_calls": [call]}), None));
    }
    out.push_str(&sse_chunk(serde_json::json!({}), Some("tool_calls")));
    out.push_str("data: [DONE]\n\n");
    out
}

/// A model that came by a secret (a server passed it back encoded, and the model
/// decoded it) and writes it: in its streamed text, in a call's arguments, in a file
/// through that call. What it wrote is recorded, streamed and run with the secret
/// masked, and the secret, in any of its forms, is found in none of the store, the
/// workspace, the logs, the trail, the HTTP and CLI answers, the transcript, or what
/// the model is sent next.
#[tokio::test]
async fn a_secret_a_model_decodes_is_masked_in_all_it_writes() -> Result<()> {
    let port = encoding_echo_server().await?;
    let url = format!("http://127.0.0.1:{port}/token");
    let plan = "#+TITLE: Keep the token\n* TODO Fetch the token and keep it\n  :done-when: test -s scratch/kept.txt\n";
    let keep = serde_json::json!({
        "path": "scratch/kept.txt",
        "content": format!("the token is {PLANTED}, in hex {}", hex::encode(PLANTED)),
    })
    .to_string();
    let (model_url, prompts) = scripted_model(vec![
        sse_text(plan),
        sse_call(
            "http__request",
            &serde_json::json!({"method": "GET", "url": url}).to_string(),
        ),
        sse_call("files__write_file", &keep),
        sse_text(&format!(
            "Done: I decoded {PLANTED} (or {}) and kept it.",
            PLANTED.to_uppercase()
        )),
    ])
    .await?;
    let mut stack = Stack::start(&["ledger"]).await?;
    lease_for_http(&stack, port)?;
    let policy = stack.root().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default": "deny", "rules": [
  {"name": "http", "effect": "allow", "tools": ["http.request"]},
  {"name": "keep", "effect": "allow", "tools": ["files.write_file"]}
]}"#,
    )?;
    stack
        .add_with("policy", &["--policy", policy.to_str().context("utf-8")?])
        .await?;
    stack.add("connectors").await?;
    let set = set_secret(&stack, "planted", PLANTED)?;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    stack
        .add_with(
            "dispatcher",
            &["--model-url", &model_url, "--model", "hostile"],
        )
        .await?;
    stack.add("ingress").await?;

    let run_id = stack
        .submit("Fetch the token and keep it", "default", 60_000)
        .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(
        finished(&events).status(),
        RunStatus::Done,
        "{}",
        finished(&events).reason
    );
    // The server's encodings came back masked; what the model wrote is masked.
    let fetched = outcome(&events, "http.request").map_err(anyhow::Error::msg)?;
    assert!(fetched.matches("********").count() >= 6, "{fetched}");
    let kept = std::fs::read_to_string(
        dispatch_service::layout::run_dir(stack.root(), &run_id).join("scratch/kept.txt"),
    )?;
    assert_eq!(kept, "the token is ********, in hex ********");
    let last_turn = events
        .iter()
        .rev()
        .find_map(|e| match &e.event.body {
            Some(Body::ModelTurn(t)) => Some(t.text.clone()),
            _ => None,
        })
        .unwrap_or_default();
    assert_eq!(
        last_turn,
        "Done: I decoded ******** (or ********) and kept it."
    );
    let streamed: String = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::OutputDelta(d)) => Some(d.text.clone()),
            _ => None,
        })
        .collect();
    assert!(!streamed.contains("planted"), "{streamed}");
    // Nothing the model was sent after the call holds the secret in any form.
    let sent = prompts.lock().unwrap().clone();
    assert_eq!(sent.len(), 4, "author and three turns");
    for form in forms(PLANTED) {
        for prompt in &sent {
            assert!(!prompt.contains(&form), "a prompt holds {form}: {prompt}");
        }
        found_nowhere(&stack, run_id, &events, &form).await?;
    }
    Ok(())
}
