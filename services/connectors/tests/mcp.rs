//! The MCP connectors against real MCP servers from package registries, installed by
//! `cargo xtask test` into `.tools/mcp` (`DISPATCH_MCP_SERVERS`): the official
//! filesystem and everything servers (npm) and the time server (PyPI), configured to
//! be trusted with their annotations as these tests' reference servers; and a server
//! on the official Python SDK that lies about its tool (`tests/mcp/lying_server.py`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_bus::catalogue::Risk;
use dispatch_connectors::Registry;
use dispatch_connectors::mcp::ServerConfig;
use tokio_util::sync::CancellationToken;

use dispatch_testkit::{kill_processes_with, mcp_servers as servers_dir, pids_with};

fn node_server(package: &str, args: &[&str], name: &str) -> ServerConfig {
    let script = servers_dir().join(format!(
        "node_modules/@modelcontextprotocol/{package}/dist/index.js"
    ));
    let mut all = vec![script.display().to_string()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    ServerConfig {
        name: name.into(),
        command: Some("node".into()),
        args: all,
        trust_annotations: true,
        ..Default::default()
    }
}

/// `tests/mcp/lying_server.py`: its tool `peek` claims `readOnlyHint` and deletes the
/// file it is given.
fn lying_server(trust_annotations: bool) -> ServerConfig {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp/lying_server.py");
    ServerConfig {
        name: "liar".into(),
        command: Some(servers_dir().join("venv/bin/python").display().to_string()),
        args: vec![script.display().to_string()],
        trust_annotations,
        ..Default::default()
    }
}

fn time_server() -> ServerConfig {
    ServerConfig {
        name: "time".into(),
        command: Some(
            servers_dir()
                .join("venv/bin/mcp-server-time")
                .display()
                .to_string(),
        ),
        args: vec!["--local-timezone".into(), "UTC".into()],
        trust_annotations: true,
        ..Default::default()
    }
}

/// A registry serving `configs`, supervised until the returned token is cancelled.
struct Served {
    registry: Arc<Registry>,
    workspace: tempfile::TempDir,
    stop: CancellationToken,
}

impl Served {
    async fn start(configs: Vec<ServerConfig>) -> Self {
        let workspace = tempfile::tempdir().unwrap();
        let registry =
            Arc::new(Registry::new(configs, Default::default(), workspace.path(), false).unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(registry.clone().serve(None, None, stop.clone()));
        let served = Self {
            registry,
            workspace,
            stop,
        };
        served.wait_for_tools().await;
        served
    }

    async fn wait_for_tools(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.registry.servers().any(|s| s.tools().is_empty()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "MCP servers did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn risks(&self) -> std::collections::BTreeMap<String, Risk> {
        self.registry
            .servers()
            .flat_map(|s| s.tools())
            .map(|t| (t.name, t.risk))
            .collect()
    }

    async fn call(&self, tool: &str, args: serde_json::Value) -> Result<String, String> {
        self.registry
            .call(
                self.workspace.path(),
                None,
                &RunId::new(),
                "c0",
                tool,
                &args.to_string(),
            )
            .await
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn tools_are_discovered_with_their_risk_classes() {
    let fs_root = tempfile::tempdir().unwrap();
    let root = fs_root.path().display().to_string();
    let served = Served::start(vec![
        node_server("server-filesystem", &[&root], "fs"),
        node_server("server-everything", &["stdio"], "everything"),
        time_server(),
    ])
    .await;
    let risks = served.risks();
    let expect = [
        ("fs.read_text_file", Risk::Read),
        ("fs.list_directory", Risk::Read),
        ("fs.write_file", Risk::Destructive),
        ("fs.move_file", Risk::Destructive),
        ("fs.create_directory", Risk::Write),
        ("everything.echo", Risk::Read),
        ("everything.simulate-research-query", Risk::Write),
        ("everything.gzip-file-as-resource", Risk::External),
        ("time.get_current_time", Risk::Read),
        ("time.convert_time", Risk::Read),
    ];
    for (tool, risk) in expect {
        assert_eq!(risks.get(tool), Some(&risk), "{tool}: {risks:?}");
    }
    let time = served
        .registry
        .servers()
        .find(|s| s.name() == "time")
        .unwrap();
    let entry = time
        .tools()
        .into_iter()
        .find(|t| t.name == "time.get_current_time")
        .unwrap();
    assert_eq!(entry.connector, "time");
    assert_eq!(entry.version, "2026.10.19");
    assert_eq!(entry.parameters["type"], "object");
    assert!(entry.parameters["properties"]["timezone"].is_object());
}

#[tokio::test]
async fn a_server_s_own_annotations_rate_nothing_unless_it_is_trusted() {
    let served = Served::start(vec![lying_server(false)]).await;
    let entry = served
        .registry
        .servers()
        .flat_map(|s| s.tools())
        .find(|t| t.name == "liar.peek")
        .expect("the liar lists peek");
    assert_eq!(entry.risk, Risk::Destructive, "readOnlyHint was believed");
    assert!(
        entry.parameters["properties"]["path"]
            .get("format")
            .is_none(),
        "an untrusted server's path mark was kept: {}",
        entry.parameters
    );
    drop(served);

    let trusted = Served::start(vec![lying_server(true)]).await;
    assert_eq!(trusted.risks().get("liar.peek"), Some(&Risk::Read));
    let rated = Served::start(vec![ServerConfig {
        risk: [("peek".to_owned(), Risk::Destructive)].into(),
        ..lying_server(true)
    }])
    .await;
    assert_eq!(rated.risks().get("liar.peek"), Some(&Risk::Destructive));
    // What it does: the file is gone.
    let file = rated.workspace.path().join("victim.txt");
    std::fs::write(&file, "keep me").unwrap();
    let out = rated
        .call("liar.peek", serde_json::json!({"path": file}))
        .await
        .unwrap();
    assert!(out.contains("removed"), "{out}");
    assert!(!file.exists());
}

#[tokio::test]
async fn calls_run_on_the_real_servers() {
    let fs_root = tempfile::tempdir().unwrap();
    let root = fs_root.path().display().to_string();
    let served = Served::start(vec![
        node_server("server-filesystem", &[&root], "fs"),
        time_server(),
    ])
    .await;
    let target = Path::new(&root).join("notes.txt");
    let wrote = served
        .call(
            "fs.write_file",
            serde_json::json!({"path": target, "content": "hello from dispatch"}),
        )
        .await
        .unwrap();
    assert!(wrote.contains("Successfully wrote"), "{wrote}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hello from dispatch"
    );
    let read = served
        .call("fs.read_text_file", serde_json::json!({"path": target}))
        .await
        .unwrap();
    assert_eq!(read, "hello from dispatch");
    // The server's own refusal fails the call, with its reason.
    let outside = served
        .call(
            "fs.read_text_file",
            serde_json::json!({"path": "/etc/passwd"}),
        )
        .await
        .unwrap_err();
    assert!(outside.contains("outside allowed directories"), "{outside}");
    let now = served
        .call(
            "time.get_current_time",
            serde_json::json!({"timezone": "UTC"}),
        )
        .await
        .unwrap();
    assert!(
        now.contains("\"timezone\": \"UTC\"") || now.contains("UTC"),
        "{now}"
    );
    for (tool, args, expect) in [
        ("fs.no_such_tool", serde_json::json!({}), "has no tool"),
        ("nope.tool", serde_json::json!({}), "no connector serves"),
        (
            "time.get_current_time",
            serde_json::json!([1]),
            "not a JSON object",
        ),
    ] {
        let err = served.call(tool, args).await.unwrap_err();
        assert!(err.contains(expect), "{tool}: {err}");
    }
}

#[tokio::test]
async fn a_server_killed_mid_call_fails_the_call_and_is_restarted() {
    // A marker in its arguments singles this server's process out.
    let marker = format!("stdio-{}", uuid::Uuid::now_v7());
    let mut config = node_server("server-everything", &["stdio", &marker], "everything");
    config.call_timeout_ms = Some(30_000);
    let served = Served::start(vec![config]).await;
    let [pid] = pids_with(&marker)[..] else {
        panic!("expected one server process: {:?}", pids_with(&marker));
    };
    let call = served.call(
        "everything.trigger-long-running-operation",
        serde_json::json!({"duration": 20, "steps": 5}),
    );
    let kill = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(kill_processes_with(&marker), 1);
    };
    let (result, ()) = tokio::join!(call, kill);
    let err = result.unwrap_err();
    assert!(err.contains("went away during the call"), "{err}");
    // The supervisor starts it again, and calls work once it is up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let again = pids_with(&marker);
        if again.len() == 1 && again[0] != pid {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let echoed = served
        .call("everything.echo", serde_json::json!({"message": "back"}))
        .await
        .unwrap();
    assert!(echoed.contains("back"), "{echoed}");
}

#[tokio::test]
async fn a_call_past_its_timeout_is_cancelled() {
    // The server's stdin is copied to a file on its way in, to see what it was sent.
    let seen = tempfile::NamedTempFile::new().unwrap();
    let script =
        servers_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let config = ServerConfig {
        name: "everything".into(),
        command: Some("sh".into()),
        args: vec![
            "-c".into(),
            format!(
                "tee {} | exec node {} stdio",
                seen.path().display(),
                script.display()
            ),
        ],
        call_timeout_ms: Some(500),
        ..Default::default()
    };
    let served = Served::start(vec![config]).await;
    let started = std::time::Instant::now();
    let err = served
        .call(
            "everything.trigger-long-running-operation",
            serde_json::json!({"duration": 30, "steps": 3}),
        )
        .await
        .unwrap_err();
    assert!(err.contains("did not answer within 500 ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The server was told: notifications/cancelled for that request's id.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let cancelled = loop {
        let sent = std::fs::read_to_string(seen.path()).unwrap();
        let messages: Vec<serde_json::Value> = sent
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let call = messages.iter().find(|m| m["method"] == "tools/call");
        let cancel = messages
            .iter()
            .find(|m| m["method"] == "notifications/cancelled");
        if let (Some(call), Some(cancel)) = (call, cancel) {
            break (call["id"].clone(), cancel["params"]["requestId"].clone());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cancellation sent: {sent}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cancelled.0, cancelled.1);
    // The connection is still good after the cancelled call.
    let echoed = served
        .call(
            "everything.echo",
            serde_json::json!({"message": "still here"}),
        )
        .await
        .unwrap();
    assert!(echoed.contains("still here"), "{echoed}");
}

#[tokio::test]
async fn streamable_http_servers_are_reached_by_url() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let script =
        servers_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let mut server = tokio::process::Command::new("node")
        .arg(script)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the HTTP server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = Served::start(vec![ServerConfig {
        name: "web".into(),
        url: Some(url),
        headers: [("X-Dispatch-Test".to_owned(), "1".to_owned())].into(),
        trust_annotations: true,
        ..Default::default()
    }])
    .await;
    assert_eq!(served.risks().get("web.echo"), Some(&Risk::Read));
    let sum = served
        .call("web.get-sum", serde_json::json!({"a": 2, "b": 40}))
        .await
        .unwrap();
    assert!(sum.contains("42"), "{sum}");
    drop(served);
    server.kill().await.unwrap();
}

/// A server that answers its handshake and then never its listing is hung: it is
/// connected to again (its process started anew), not left wedged with no tools. The
/// hung process is gone, though it was started through a shell that does not pass
/// signals on: its whole process group is killed.
#[tokio::test]
async fn a_server_that_hangs_on_tools_list_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("hung-once");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp/hung_server.py");
    let python = servers_dir().join("venv/bin/python");
    let hung = ServerConfig {
        name: "hung".into(),
        command: Some("sh".into()),
        // `; true`: the shell waits for the server instead of becoming it.
        args: vec![
            "-c".into(),
            format!(
                "{} {} {}; true",
                python.display(),
                script.display(),
                marker.display()
            ),
        ],
        trust_annotations: true,
        ..Default::default()
    };
    // Up within the listing's timeout, a reconnect and a start: not never.
    let served = Served::start(vec![hung]).await;
    assert!(marker.exists(), "the first process hung");
    assert_eq!(
        served.call("hung.ping", serde_json::json!({})).await,
        Ok("pong".into())
    );
    // The live connection's shell and server; the hung pair killed, none orphaned.
    let marker = marker.display().to_string();
    let mut alive = pids_with(&marker).len();
    for _ in 0..50 {
        if alive == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        alive = pids_with(&marker).len();
    }
    assert_eq!(alive, 2, "processes left with the marker");
}
