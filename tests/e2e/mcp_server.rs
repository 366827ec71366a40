//! Dispatch as an MCP server, driven by a client nobody here wrote: the official Python
//! MCP SDK (installed by `cargo xtask test` into `.tools/mcp`), over streamable HTTP
//! against ingress's `/mcp` and over stdio against `dispatch mcp`. A goal handed over
//! through the `dispatch` tool runs to `done`, its note comes through `tasks` once, and
//! a client without an API key is refused before it reaches MCP.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dispatch_bus::RunId;
use dispatch_proto::run::v1::RunStatus;
use dispatch_testkit::{bin_dir, mcp_servers};
use dispatch_tests::{Stack, finished, stored_goals};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(90);

/// The tools every transport lists, in order.
const TOOLS: [&str; 7] = [
    "dispatch",
    "tasks",
    "status",
    "stop",
    "approvals",
    "approve",
    "deny",
];

/// What the Python client printed: one JSON object a line, each with its `event`.
struct Printed {
    lines: Vec<Value>,
    stderr: String,
}

impl Printed {
    fn event(&self, name: &str) -> Result<&Value> {
        self.lines
            .iter()
            .find(|line| line["event"] == name)
            .with_context(|| format!("no {name} printed: {:?}\n{}", self.lines, self.stderr))
    }
}

/// Runs `tests/mcp/dispatch_client.py` with `args`, and `env` besides.
async fn client(args: &[&str], env: &[(&str, &str)]) -> Result<Printed> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/dispatch_client.py");
    let run = tokio::process::Command::new(mcp_servers().join("venv/bin/python"))
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .context("the MCP client did not end")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines = stdout
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
        .collect::<Result<Vec<Value>>>()?;
    if !out.status.success() {
        bail!(
            "the MCP client failed ({}): {lines:?}\n{stderr}",
            out.status
        );
    }
    Ok(Printed { lines, stderr })
}

fn tool_names(printed: &Printed) -> Result<Vec<String>> {
    Ok(serde_json::from_value(
        printed.event("tools")?["names"].clone(),
    )?)
}

#[tokio::test]
async fn an_mcp_client_dispatches_over_http_and_gets_the_note_once() -> Result<()> {
    let stack = Stack::start(&["ledger", "policy", "connectors", "ingress", "dispatcher"]).await?;
    let url = stack.url("/mcp");
    let goal = "Summarise what a kill switch is for";
    let printed = match client(
        &["http", &url, goal],
        &[("DISPATCH_MCP_KEY", &stack.api_key)],
    )
    .await
    {
        Ok(printed) => printed,
        Err(e) => {
            stack.print_service_logs(40);
            return Err(e);
        }
    };

    assert_eq!(printed.event("initialized")?["server"], "dispatch");
    assert_eq!(tool_names(&printed)?, TOOLS);
    let schemas = &printed.event("tools")?["schemas"];
    for tool in TOOLS {
        assert_eq!(schemas[tool]["additionalProperties"], false, "{tool}");
    }
    assert_eq!(schemas["dispatch"]["required"], json!(["goal"]));

    // Bad input is the tool's error, with a reason, and stores nothing.
    let bad = printed.event("bad_goal")?;
    assert_eq!(bad["is_error"], true, "{bad}");
    assert!(
        bad["text"]
            .as_str()
            .unwrap()
            .contains("goal must not be empty"),
        "{bad}"
    );
    let bad = printed.event("bad_timeout")?;
    assert_eq!(bad["is_error"], true, "{bad}");
    assert!(
        bad["text"].as_str().unwrap().contains("not a duration"),
        "{bad}"
    );

    // The goal is stored as POST /v1/goals stores one, and runs to done.
    let dispatched = printed.event("dispatched")?;
    assert_eq!(dispatched["is_error"], false, "{dispatched}");
    let run_id: RunId = dispatched["structured"]["run_id"]
        .as_str()
        .context("the run id, as JSON")?
        .parse()?;
    assert!(
        dispatched["text"]
            .as_str()
            .unwrap()
            .contains(&run_id.to_string())
    );
    let goals = stored_goals(&stack.bus).await?;
    assert_eq!(goals.len(), 1, "only the good goal is stored: {goals:?}");
    let stored = &goals[0];
    assert_eq!(
        (
            stored.run_id.as_str(),
            stored.goal.as_str(),
            stored.origin.as_str(),
            stored.conversation_id.as_str()
        ),
        (run_id.to_string().as_str(), goal, "mcp", "mcp")
    );
    let events = stack.wait_finished_or_show(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);

    // Its note came through `tasks`, once.
    let note = &printed.event("note")?["note"];
    assert_eq!(note["run_id"], run_id.to_string(), "{note}");
    assert_eq!(note["status"], "done", "{note}");
    let again = printed.event("tasks_again")?;
    assert_eq!(again["is_error"], false, "{again}");
    let notes = again["structured"]["notes"].as_array().unwrap();
    assert!(
        notes.iter().all(|n| n["run_id"] != run_id.to_string()),
        "the note came again: {again}"
    );
    let tasks = again["structured"]["tasks"].as_array().unwrap();
    assert!(
        tasks
            .iter()
            .any(|t| t["run_id"] == run_id.to_string() && t["status"] == "done"),
        "{again}"
    );

    let status = printed.event("status")?;
    assert_eq!(status["structured"]["status"], "done", "{status}");
    assert_eq!(status["structured"]["origin"], "mcp", "{status}");

    // Its report is a resource.
    let uri = format!("dispatch://runs/{run_id}/report");
    let uris = &printed.event("resources")?["uris"];
    assert!(uris.as_array().unwrap().iter().any(|u| u == &uri), "{uris}");
    let report = &printed.event("report")?["texts"][0];
    assert!(
        report.as_str().is_some_and(|text| !text.trim().is_empty()),
        "{report}"
    );

    // Without a key: refused before MCP, as /v1 is.
    let refused = client(&["refused", &url], &[]).await?;
    let refused = refused.event("refused")?;
    assert_eq!(refused["refused"], true, "{refused}");
    let responses = refused["responses"].as_array().unwrap();
    assert!(!responses.is_empty(), "{refused}");
    for response in responses {
        assert_eq!(response["status"], 401, "{refused}");
        assert_eq!(response["www_authenticate"], "Bearer", "{refused}");
    }
    // And a wrong key, asked without the SDK.
    let wrong = reqwest::Client::new()
        .post(&url)
        .bearer_auth("not-a-key")
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    Ok(())
}

#[tokio::test]
async fn dispatch_mcp_serves_the_same_tools_over_stdio() -> Result<()> {
    let stack = Stack::start(&["ledger", "policy", "connectors", "dispatcher"]).await?;
    let run_id = stack
        .submit("Summarise what a kill switch is for", "default", 0)
        .await?;
    let events = stack.wait_finished_or_show(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);

    let dispatch = bin_dir().join("dispatch");
    let seed = stack.nats.seed(dispatch_bus::Identity::Cli);
    let nats_url = stack.nats.url();
    let printed = client(
        &["stdio", path(&dispatch)?, &run_id.short()],
        &[
            ("NATS_URL", nats_url.as_str()),
            ("DISPATCH_NATS_NKEY", path(&seed)?),
            ("DISPATCH_WORKSPACE", path(stack.root())?),
        ],
    )
    .await?;

    assert_eq!(printed.event("initialized")?["server"], "dispatch");
    assert_eq!(tool_names(&printed)?, TOOLS);
    let status = printed.event("status")?;
    assert_eq!(status["is_error"], false, "{status}");
    // Found by its short id, as people type it.
    assert_eq!(
        status["structured"]["run_id"],
        run_id.to_string(),
        "{status}"
    );
    assert_eq!(status["structured"]["status"], "done", "{status}");
    let approvals = printed.event("approvals")?;
    assert_eq!(approvals["is_error"], false, "{approvals}");
    assert_eq!(
        approvals["structured"]["approvals"],
        json!([]),
        "{approvals}"
    );
    Ok(())
}

fn path(path: &Path) -> Result<&str> {
    path.to_str().context("the path is UTF-8")
}

/// A one-step plan whose first call is a write the built-in policy asks a person about
/// (the test connector's `count`, a write with no path); its second notes it in scratch.
const ASKS: &str = "#+TITLE: Asks first\n* TODO Count and note it\n  - call: test.count {\"key\": \"asked\"}\n  - call: files.write_file {\"path\": \"scratch/done.txt\", \"content\": \"x\"}\n  :done-when: test -s scratch/done.txt";

#[tokio::test]
async fn an_mcp_client_answers_approvals_and_stops_a_run() -> Result<()> {
    let mut stack = Stack::start(&["ledger", "policy", "ingress", "dispatcher"]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    let url = stack.url("/mcp");
    let printed = match client(
        &["answers", &url, ASKS],
        &[("DISPATCH_MCP_KEY", &stack.api_key)],
    )
    .await
    {
        Ok(printed) => printed,
        Err(e) => {
            stack.print_service_logs(40);
            return Err(e);
        }
    };
    let runs = printed.event("runs")?;
    let run =
        |name: &str| -> Result<RunId> { Ok(runs[name].as_str().context("a run id")?.parse()?) };
    // A digest other than the one shown allows nothing.
    let wrong = printed.event("wrong_digest")?;
    assert_eq!(wrong["is_error"], true, "{wrong}");
    assert!(
        wrong["text"].as_str().unwrap().contains("digest_mismatch"),
        "{wrong}"
    );
    let approved = printed.event("approved")?;
    assert_eq!(approved["structured"]["outcome"], "resolved", "{approved}");
    assert!(
        approved["structured"]["resolved_by"]
            .as_str()
            .unwrap()
            .starts_with("api key "),
        "{approved}"
    );
    let denied = printed.event("denied")?;
    assert_eq!(denied["is_error"], false, "{denied}");
    // Exactly one answer wins.
    let again = printed.event("again")?;
    assert_eq!(again["is_error"], true, "{again}");
    assert!(
        again["text"].as_str().unwrap().contains("already_decided"),
        "{again}"
    );
    assert_eq!(printed.event("stopped")?["is_error"], false);

    let ended = |events: &[dispatch_runlog::StoredEvent]| finished(events).status();
    assert_eq!(
        ended(&stack.wait_finished_or_show(run("approved")?, LIMIT).await?),
        RunStatus::Done
    );
    assert_eq!(
        ended(&stack.wait_finished_or_show(run("denied")?, LIMIT).await?),
        RunStatus::Blocked
    );
    let stopped = stack.wait_finished_or_show(run("stopped")?, LIMIT).await?;
    assert_eq!(ended(&stopped), RunStatus::Stopped);
    assert!(
        finished(&stopped).reason.contains("(mcp)"),
        "{}",
        finished(&stopped).reason
    );
    Ok(())
}
