//! MCP tools through the whole stack, with real MCP servers from package registries
//! (installed by `cargo xtask test` into `.tools/mcp`, and trusted with their
//! annotations by configuration): the catalogue, a call recorded in the run's log with
//! its risk class, and at most once when the MCP server or the connectors service is
//! SIGKILLed mid-call. A server that lies about its tool is not believed: under the
//! default configuration and the built-in policy its call waits for a person. And the
//! built-in HTTP connector, whose calls take their risk from their method and body,
//! and which refuses the headers that would make a request another one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dispatch_proto::run::v1::{Risk, RunStatus, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_tests::{Stack, finished};

const LIMIT: Duration = Duration::from_secs(90);

use dispatch_testkit::{kill_processes_with, mcp_servers as servers_dir};

/// `dispatch.toml` for the official filesystem server, as connector `fs`, trusted with
/// its annotations, serving `shared`.
fn fs_server(shared: &Path) -> String {
    format!(
        "[[connectors.mcp]]\nname = \"fs\"\ncommand = \"node\"\nargs = [{:?}, {:?}]\ntrust_annotations = true\n",
        servers_dir()
            .join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js")
            .display()
            .to_string(),
        shared.display().to_string(),
    )
}

fn everything_script() -> PathBuf {
    servers_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
}

/// The policy of these tests: the file tools as built in, and every MCP tool.
const POLICY: &str = r#"{"default": "deny", "rules": [
  {"name": "no-moves", "tools": ["fs.move_file"], "effect": "deny"},
  {"name": "mcp-tools", "tools": ["fs.*", "everything.*", "http.*"], "effect": "allow"},
  {"name": "writes-inside-run", "tools": ["files.write_file"], "effect": "allow", "when": {"path_prefix": ["scratch"]}}
]}"#;

/// ledger and policy, with `dispatch.toml` configuring `mcp` (TOML tables) for the
/// connectors started next.
async fn stack_with(mcp: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::start(&["ledger"]).await?;
    std::fs::write(stack.root().join("dispatch.toml"), mcp)?;
    let policy = stack.root().join("policy.json");
    std::fs::write(&policy, POLICY)?;
    stack
        .add_with("policy", &["--policy", policy.to_str().unwrap()])
        .await?;
    Ok(stack)
}

/// An everything server whose stdin is appended to `seen` on its way in, so a test
/// can count the requests it was sent across restarts. Its command line ends with
/// `marker`, to single its process out.
fn everything_teed(seen: &Path, marker: &str) -> String {
    format!(
        "[[connectors.mcp]]\nname = \"everything\"\ncommand = \"sh\"\nargs = [\"-c\", \"tee -a {} | exec node {} stdio {marker}\"]\ntrust_annotations = true\n",
        seen.display(),
        everything_script().display()
    )
}

/// `tools/call` requests in a teed stdin file.
fn calls_sent(seen: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(seen)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["method"] == "tools/call")
        .collect()
}

async fn wait_for_tool(stack: &Stack, tool: &str) -> anyhow::Result<()> {
    stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["tools"]).ok()?;
            out.stdout.contains(tool).then_some(())
        })
        .await
}

fn requested_risk(events: &[StoredEvent]) -> i32 {
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r)) => Some(r.risk),
            _ => None,
        })
        .expect("a call was requested")
}

fn failure(events: &[StoredEvent]) -> String {
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallFailed(f)) => Some(f.error.clone()),
            _ => None,
        })
        .expect("a call failed")
}

#[tokio::test]
async fn an_mcp_tool_is_catalogued_called_and_recorded() -> anyhow::Result<()> {
    let shared = tempfile::tempdir()?;
    let config = fs_server(shared.path());
    let mut stack = stack_with(&config).await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    wait_for_tool(&stack, "fs.write_file").await?;

    // The catalogue: namespaced names, risk classes, and the policy's standing.
    let listed = stack.cli(&["tools", "--format", "json"])?;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout)?;
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {rows:?}"))
            .clone()
    };
    let write = row("fs.write_file");
    assert_eq!(write["connector"], "fs");
    assert_eq!(write["risk"], "destructive");
    assert_eq!(write["policy"], "allow");
    assert_eq!(row("fs.read_text_file")["risk"], "read");
    assert_eq!(row("fs.move_file")["policy"], "deny");
    assert_eq!(row("files.write_file")["policy"], "depends");
    assert_eq!(row("files.read_file")["policy"], "deny");
    let table = stack.cli(&["tools"])?.stdout;
    assert!(table.starts_with("TOOL"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("fs.move_file") && l.contains("deny (no-moves)")),
        "{table}"
    );

    let target = shared.path().join("out.txt");
    let plan = format!(
        "#+TITLE: Through MCP\n* TODO Write with the filesystem server\n  - call: fs.write_file {}\n  :done-when: true\n",
        serde_json::json!({"path": target, "content": "written over MCP"})
    );
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    assert_eq!(requested_risk(&events), Risk::Destructive as i32);
    let completed = |b: &Body| matches!(b, Body::ToolCallCompleted(c) if c.call_id == "l0-t0-c0");
    assert!(
        events
            .iter()
            .any(|e| e.event.body.as_ref().is_some_and(completed))
    );
    assert_eq!(std::fs::read_to_string(&target)?, "written over MCP");
    Ok(())
}

#[tokio::test]
async fn an_mcp_server_killed_mid_call_fails_the_call_and_it_is_never_sent_again()
-> anyhow::Result<()> {
    let seen = tempfile::NamedTempFile::new()?;
    let marker = format!("server-{}", dispatch_bus::RunId::new());
    let mut stack = stack_with(&everything_teed(seen.path(), &marker)).await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    wait_for_tool(&stack, "everything.echo").await?;
    let plan = "#+TITLE: Interrupted\n* TODO Wait on the server\n  - call: everything.trigger-long-running-operation {\"duration\": 20, \"steps\": 4}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 60_000).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    stack
        .eventually(LIMIT, || async {
            (!calls_sent(seen.path()).is_empty()).then_some(())
        })
        .await?;
    // The server and the shell that started it (the tee of its input lives on, but
    // holds nothing of the connection's output).
    let killed = kill_processes_with(&marker);
    assert_eq!(killed, 2, "the shell and the server");
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let error = failure(&events);
    assert!(error.contains("went away during the call"), "{error}");
    assert_eq!(requested_risk(&events), Risk::Read as i32);

    // Resumed by another dispatcher, the run's call is not sent again.
    stack.stop("dispatcher").await?;
    stack.add("dispatcher").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(calls_sent(seen.path()).len(), 1);
    assert_eq!(
        starts_of_the_mcp_call(&stack.log().await?.read(&run_id).await?),
        1
    );
    Ok(())
}

#[tokio::test]
async fn connectors_killed_mid_mcp_call_send_it_at_most_once() -> anyhow::Result<()> {
    let seen = tempfile::NamedTempFile::new()?;
    let marker = format!("server-{}", dispatch_bus::RunId::new());
    let mut stack = stack_with(&everything_teed(seen.path(), &marker)).await?;
    stack
        .add_with("connectors", &["--lease-ms", "1500"])
        .await?;
    stack.add("dispatcher").await?;
    wait_for_tool(&stack, "everything.echo").await?;
    let plan = "#+TITLE: Taken over\n* TODO Wait on the server\n  - call: everything.trigger-long-running-operation {\"duration\": 6, \"steps\": 3}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 60_000).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    // Killed once the request has reached the server (after its audit record, before
    // its answer): killed sooner, the server would rightly never have been asked.
    stack
        .eventually(LIMIT, || async {
            (!calls_sent(seen.path()).is_empty()).then_some(())
        })
        .await?;
    stack.service("connectors")?.kill().await?;
    stack
        .add_with("connectors", &["--lease-ms", "1500"])
        .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let error = failure(&events);
    assert!(
        error.contains("interrupted") && error.contains("crashed"),
        "{error}"
    );
    assert_eq!(starts_of_the_mcp_call(&events), 1);
    // Long after the operation would have ended, the server was asked once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        calls_sent(seen.path()).len(),
        1,
        "{:?}",
        calls_sent(seen.path())
    );
    Ok(())
}

#[tokio::test]
async fn http_calls_carry_the_risk_of_their_method() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().route(
        "/notes",
        axum::routing::get(|| async { "three notes" }).post(|| async { "stored" }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = format!("[connectors.http]\nallow_hosts = [\"127.0.0.1:{port}\"]\n");
    let mut stack = stack_with(&config).await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    wait_for_tool(&stack, "http.request").await?;
    let url = format!("http://127.0.0.1:{port}/notes");
    let plan = format!(
        "#+TITLE: Over HTTP\n* TODO Read then write\n  - call: http.request {}\n  - call: http.request {}\n  :done-when: true\n",
        serde_json::json!({"method": "GET", "url": url}),
        serde_json::json!({"method": "POST", "url": url, "body": "a fourth"}),
    );
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let calls: Vec<(i32, String)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r)) if r.tool == "http.request" => {
                let output = events.iter().find_map(|e| match &e.event.body {
                    Some(Body::ToolCallCompleted(c)) if c.call_id == r.call_id => {
                        Some(c.output.clone())
                    }
                    _ => None,
                });
                Some((r.risk, output.unwrap_or_default()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].0, Risk::Read as i32);
    assert!(calls[0].1.ends_with("three notes"), "{}", calls[0].1);
    assert_eq!(calls[1].0, Risk::External as i32);
    assert!(calls[1].1.ends_with("stored"), "{}", calls[1].1);
    Ok(())
}

/// ledger, the built-in policy (no document given) and dispatcher, with `dispatch.toml`
/// holding `config` for the connectors.
async fn stack_with_the_builtin_policy(config: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::start(&["ledger"]).await?;
    std::fs::write(stack.root().join("dispatch.toml"), config)?;
    stack.add("policy").await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    Ok(stack)
}

/// The row `dispatch tools --format json` prints for `tool`.
fn listed_tool(stack: &Stack, tool: &str) -> anyhow::Result<serde_json::Value> {
    let listed = stack.cli(&["tools", "--format", "json"])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout)?;
    rows.into_iter()
        .find(|r| r["name"] == tool)
        .ok_or_else(|| anyhow::anyhow!("{tool} is not listed: {}", listed.stdout))
}

fn bodies(events: &[StoredEvent]) -> impl Iterator<Item = &Body> {
    events.iter().filter_map(|e| e.event.body.as_ref())
}

/// The request `dispatch approvals` lists for `run_id`, once it does.
async fn listed_approval(
    stack: &Stack,
    run_id: dispatch_bus::RunId,
) -> anyhow::Result<serde_json::Value> {
    let run = run_id.to_string();
    stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["approvals", "--format", "json"]).ok()?;
            let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).ok()?;
            listed.into_iter().find(|a| a["run_id"] == run.as_str())
        })
        .await
}

#[tokio::test]
async fn a_tool_that_says_it_only_reads_waits_for_a_person_under_the_default_configuration()
-> anyhow::Result<()> {
    // tests/mcp/lying_server.py: `peek` is annotated readOnlyHint and deletes its file.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/lying_server.py");
    let config = format!(
        "[[connectors.mcp]]\nname = \"liar\"\ncommand = {:?}\nargs = [{:?}]\n",
        servers_dir().join("venv/bin/python").display().to_string(),
        script.display().to_string(),
    );
    let stack = stack_with_the_builtin_policy(&config).await?;
    wait_for_tool(&stack, "liar.peek").await?;
    let peek = listed_tool(&stack, "liar.peek")?;
    assert_eq!(peek["risk"], "destructive", "{peek}");

    let victim = stack.root().join("victim.txt");
    std::fs::write(&victim, "keep me")?;
    let plan = format!(
        "#+TITLE: Peek\n* TODO Look at a file\n  - call: liar.peek {}\n  :done-when: true\n",
        serde_json::json!({"path": victim})
    );
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    let listed = listed_approval(&stack, run_id).await?;
    assert_eq!(listed["tool"], "liar.peek", "{listed}");
    assert_eq!(listed["risk"], "destructive", "{listed}");
    let id = listed["approval_id"]
        .as_str()
        .expect("an approval id")
        .to_owned();
    // Waiting for a person, and nothing has run.
    assert_eq!(std::fs::read_to_string(&victim)?, "keep me");
    let events = stack.log().await?.read(&run_id).await?;
    assert_eq!(requested_risk(&events), Risk::Destructive as i32);
    let decided = bodies(&events)
        .find_map(|b| match b {
            Body::PolicyDecided(d) => Some(d.clone()),
            _ => None,
        })
        .expect("a decision");
    assert_eq!(
        (decided.decision(), decided.rule.as_str()),
        (dispatch_proto::run::v1::Decision::Ask, "risky")
    );
    assert!(!bodies(&events).any(|b| matches!(b, Body::ToolCallStarted(_))));

    let denied = stack.cli(&["deny", &id, "--reason", "it deletes"])?;
    assert_eq!(denied.code, Some(0), "{}", denied.stderr);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert!(
        !bodies(&events).any(|b| matches!(b, Body::ToolCallStarted(s) if s.call_id == "l0-t0-c0"))
    );
    assert_eq!(std::fs::read_to_string(&victim)?, "keep me");
    Ok(())
}

/// `scratch/` is the run's own to the built-in file tools only: the filesystem server
/// would make `scratch/REPORT.org` a directory in its shared folder, so under the
/// built-in policy its relative write waits for a person, where the same path through
/// `files.write_file` is allowed.
#[tokio::test]
async fn the_scratch_rule_does_not_allow_the_filesystem_server_s_relative_writes()
-> anyhow::Result<()> {
    let shared = tempfile::tempdir()?;
    let config = fs_server(shared.path());
    let stack = stack_with_the_builtin_policy(&config).await?;
    wait_for_tool(&stack, "fs.create_directory").await?;
    let create = listed_tool(&stack, "fs.create_directory")?;
    assert_eq!(create["risk"], "write", "{create}");

    let plan = "#+TITLE: Make room
* TODO Make the report's place
  \
        - call: files.write_file {\"path\": \"scratch/ours.org\", \"content\": \"x\"}\n  \
        - call: fs.create_directory {\"path\": \"scratch/REPORT.org\"}\n  \
        :done-when: test -s scratch/ours.org\n";
    let run_id = stack.submit(plan, "default", 60_000).await?;
    let listed = listed_approval(&stack, run_id).await?;
    assert_eq!(listed["tool"], "fs.create_directory", "{listed}");
    let events = stack.log().await?.read(&run_id).await?;
    let decisions: Vec<(String, dispatch_proto::run::v1::Decision, String)> = bodies(&events)
        .filter_map(|b| match b {
            Body::PolicyDecided(d) => Some((d.call_id.clone(), d.decision(), d.rule.clone())),
            _ => None,
        })
        .collect();
    use dispatch_proto::run::v1::Decision;
    assert_eq!(
        decisions,
        [
            (
                "l0-t0-c0".to_owned(),
                Decision::Allow,
                "run-writes".to_owned()
            ),
            ("l0-t0-c1".to_owned(), Decision::Ask, "default".to_owned()),
        ]
    );
    // Nothing was made in the shared folder while it waits.
    assert!(std::fs::read_dir(shared.path())?.next().is_none());
    let stopped = stack.cli(&["stop", &run_id.to_string()])?;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    Ok(())
}

/// A call of a tool its connector does not serve (a name a model guessed, recorded from
/// the 1.5B model: `files.list_directory`) is refused at once with the names there are,
/// not put to a person; a tool of a connector that serves nothing now is decided as
/// before (its connector may be starting).
#[tokio::test]
async fn a_tool_its_connector_does_not_serve_is_refused_not_asked() -> anyhow::Result<()> {
    let stack = stack_with_the_builtin_policy("").await?;
    wait_for_tool(&stack, "files.read_file").await?;
    let plan = "#+TITLE: Guess
* TODO List the folder
  \
        - call: files.list_directory {\"path\": \"scratch\"}\n  \
        - call: nowhere.list {\"path\": \"scratch\"}\n  \
        :done-when: test -d scratch\n";
    let run_id = stack.submit(plan, "default", 60_000).await?;
    let listed = listed_approval(&stack, run_id).await?;
    // Only the call of a connector that serves nothing waits for a person.
    assert_eq!(listed["tool"], "nowhere.list", "{listed}");
    let events = stack.log().await?.read(&run_id).await?;
    let decided: Vec<_> = bodies(&events)
        .filter_map(|b| match b {
            Body::PolicyDecided(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    use dispatch_proto::run::v1::Decision;
    assert_eq!(decided[0].call_id, "l0-t0-c0");
    assert_eq!(
        (decided[0].decision(), decided[0].rule.as_str()),
        (Decision::Deny, dispatch_rules::NO_SUCH_TOOL_RULE)
    );
    assert!(
        decided[0].reason.starts_with(
            "the files connector has no tool \"files.list_directory\"; it serves files."
        ) && decided[0].reason.contains("files.list_files"),
        "{}",
        decided[0].reason
    );
    assert_eq!(
        bodies(&events)
            .filter(|b| matches!(b, Body::ApprovalRequested(_)))
            .count(),
        1
    );
    let stopped = stack.cli(&["stop", &run_id.to_string()])?;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    Ok(())
}

/// A gate sees what a run did outside its directory through one read-only call, made
/// through the policy: it passes on the filesystem server's read (and on the text the
/// read holds), and fails closed on a write tool, a denied read and a read the policy
/// would only ask a person about, none of which runs.
#[tokio::test]
async fn a_call_gate_passes_on_a_real_read_and_fails_closed_on_anything_else() -> anyhow::Result<()>
{
    let shared = tempfile::tempdir()?;
    std::fs::write(
        shared.path().join("CHANGELOG.txt"),
        "v1.0: the first release\n",
    )?;
    let config = fs_server(shared.path());
    let mut stack = Stack::start(&["ledger"]).await?;
    std::fs::write(stack.root().join("dispatch.toml"), &config)?;
    let policy = stack.root().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default": "deny", "rules": [
  {"name": "no-listing", "effect": "deny", "tools": ["fs.list_directory"]},
  {"name": "ask-tree", "effect": "ask", "tools": ["fs.directory_tree"]},
  {"name": "fs-reads", "effect": "allow", "tools": ["fs.*"], "risk": ["read"]},
  {"name": "fs-writes", "effect": "allow", "tools": ["fs.write_file"]}
]}"#,
    )?;
    stack
        .add_with("policy", &["--policy", policy.to_str().unwrap()])
        .await?;
    stack.add("connectors").await?;
    stack.add("dispatcher").await?;
    wait_for_tool(&stack, "fs.get_file_info").await?;

    let changelog = shared.path().join("CHANGELOG.txt");
    let written = shared.path().join("out.txt");
    let args = |path: &Path| serde_json::json!({ "path": path }).to_string();
    let gates = [
        format!("call fs.get_file_info {}", args(&changelog)),
        format!(
            "call fs.read_text_file {} contains \"v1.0\"",
            args(&changelog)
        ),
        format!(
            "call fs.read_text_file {} contains \"v9.9\"",
            args(&changelog)
        ),
        format!(
            "call fs.write_file {}",
            serde_json::json!({ "path": written, "content": "x" })
        ),
        format!("call fs.list_directory {}", args(shared.path())),
        format!("call fs.directory_tree {}", args(shared.path())),
    ];
    let mut plan = "#+TITLE: Look outside\n".to_owned();
    for (i, gate) in gates.iter().enumerate() {
        plan.push_str(&format!("* TODO Check {i}\n  :done-when: {gate}\n"));
    }
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    // Each leaf's first check, as recorded.
    let first: Vec<(bool, String)> = (0..gates.len())
        .map(|i| {
            bodies(&events)
                .find_map(|b| match b {
                    Body::GateChecked(g) if g.check_id == format!("gate-l{i}") => {
                        Some((g.passed, g.detail.clone()))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("gate {i} was not checked"))
        })
        .collect();
    assert!(
        first[0].0 && first[0].1.starts_with("fs.get_file_info returned: "),
        "{:?}",
        first[0]
    );
    assert!(
        first[1].0 && first[1].1.contains("v1.0: the first release"),
        "{:?}",
        first[1]
    );
    assert!(
        !first[2].0
            && first[2]
                .1
                .starts_with("fs.read_text_file returned no \"v9.9\""),
        "{:?}",
        first[2]
    );
    assert!(
        !first[3].0
            && first[3]
                .1
                .contains("rule gate: a gate may only read, and fs.write_file is destructive"),
        "{:?}",
        first[3]
    );
    assert!(
        !first[4].0 && first[4].1.contains("rule no-listing"),
        "{:?}",
        first[4]
    );
    assert!(
        !first[5].0 && first[5].1.contains("rule gate: a gate's call runs only when the policy allows it outright; rule ask-tree would ask"),
        "{:?}",
        first[5]
    );
    // Nothing was written, nobody was asked, and no gate's call ran as a tool call.
    assert!(!written.exists());
    assert!(!bodies(&events).any(|b| matches!(b, Body::ApprovalRequested(_))));
    assert!(
        !bodies(&events)
            .any(|b| matches!(b, Body::ToolCallStarted(_) | Body::ToolCallCompleted(_)))
    );
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with("4 of 6 steps failed: step 3 "),
        "{}",
        end.reason
    );
    Ok(())
}

#[tokio::test]
async fn an_http_read_is_only_a_read_when_it_is_one() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            "seen"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = format!("[connectors.http]\nallow_hosts = [\"127.0.0.1:{port}\"]\n");
    let stack = stack_with_the_builtin_policy(&config).await?;
    wait_for_tool(&stack, "http.request").await?;
    let url = format!("http://127.0.0.1:{port}/notes");
    // Each leaf makes one call: a GET that sets Host, one with a method override, one
    // that sets Content-Length, and a GET with a body.
    let calls = [
        serde_json::json!({"method": "GET", "url": url, "headers": {"Host": "other.example"}}),
        serde_json::json!({"method": "GET", "url": url, "headers": {"X-HTTP-Method-Override": "DELETE"}}),
        serde_json::json!({"method": "GET", "url": url, "headers": {"Content-Length": "100"}}),
        serde_json::json!({"method": "GET", "url": url, "body": "{\"delete\": true}"}),
    ];
    let mut plan = String::from("#+TITLE: Tricks\n");
    for (i, call) in calls.iter().enumerate() {
        plan.push_str(&format!(
            "* TODO Trick {i}\n  - call: http.request {call}\n  :done-when: true\n"
        ));
    }
    let run_id = stack.submit(&plan, "default", 60_000).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ApprovalRequested(_)))
        .await?;
    let events = stack.log().await?.read(&run_id).await?;
    let requested: Vec<_> = bodies(&events)
        .filter_map(|b| match b {
            Body::ToolCallRequested(r) if r.tool == "http.request" => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(requested.len(), 4, "{requested:?}");
    // The header tricks are reads as far as the gate knows, and refused by the
    // connector before anything is sent.
    for r in &requested[..3] {
        assert_eq!(r.risk, Risk::Read as i32, "{}", r.args_json);
        let failed = bodies(&events)
            .find_map(|b| match b {
                Body::ToolCallFailed(f) if f.call_id == r.call_id => Some(f.error.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{} did not fail", r.args_json));
        assert!(failed.contains("may not be set by a call"), "{failed}");
    }
    // The GET with a body is not a read: a person is asked.
    let body_call = &requested[3];
    assert_eq!(body_call.risk, Risk::External as i32);
    let asked = bodies(&events)
        .find_map(|b| match b {
            Body::ApprovalRequested(a) => Some(a.clone()),
            _ => None,
        })
        .expect("a request");
    assert_eq!(
        (asked.call_id.as_str(), asked.rule.as_str()),
        (body_call.call_id.as_str(), "risky")
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a request reached the server"
    );
    let denied = stack.cli(&["deny", &asked.approval_id, "--reason", "no"])?;
    assert_eq!(denied.code, Some(0), "{}", denied.stderr);
    stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a request reached the server"
    );
    Ok(())
}

/// `ToolCallStarted` events of the plan's MCP call (the first call of the first turn;
/// the offline model's later turns call the file tools).
fn starts_of_the_mcp_call(events: &[StoredEvent]) -> usize {
    events
        .iter()
        .filter(
            |e| matches!(&e.event.body, Some(Body::ToolCallStarted(s)) if s.call_id == "l0-t0-c0"),
        )
        .count()
}
