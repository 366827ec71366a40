//! Against a real model: `cargo xtask test --real-model` starts the local llama-server
//! that `cargo xtask model` builds and runs these (ignored otherwise) with
//! `DISPATCH_REAL_MODEL_URL` and `DISPATCH_REAL_MODEL` set, and the MCP servers of
//! `.tools/mcp` installed.
//!
//! What is asserted is what Dispatch must do with whatever the model answers — the plan
//! is the model's, a leaf's model is offered tools and its call goes through the policy
//! and a connector into the log — and, for the filesystem errand, that it is done: the
//! run ends `done` with a report naming the listed files. A small model does not always
//! get there (ARCHITECTURE.md, "Models", says how often the 1.5B one did). What the
//! model did is printed, event by event.

use std::time::Duration;

use dispatch_proto::run::v1::run_event::Body;
use dispatch_runlog::StoredEvent;
use dispatch_tests::{Stack, finished};

/// A small model on two cores: each answer takes seconds, a run minutes.
const LIMIT: Duration = Duration::from_secs(15 * 60);

fn model() -> (String, String) {
    let url = std::env::var("DISPATCH_REAL_MODEL_URL")
        .expect("DISPATCH_REAL_MODEL_URL is not set: run `cargo xtask test --real-model`");
    let name = std::env::var("DISPATCH_REAL_MODEL").unwrap_or_else(|_| "default".into());
    (url, name)
}

fn print(events: &[StoredEvent]) {
    for stored in events {
        let Some(body) = &stored.event.body else {
            continue;
        };
        let detail = match body {
            Body::PlanAuthored(p) => format!("attempt {}: {:?}", p.attempt, p.plan_text),
            Body::PlanRejected(p) => format!(
                "attempt {}: {} {}; it wrote {:?}",
                p.attempt, p.code, p.message, p.answer
            ),
            Body::ModelTurn(t) => format!(
                "leaf {} turn {} ({}): {:?} calls {:?}",
                t.leaf,
                t.turn,
                t.call_form,
                t.text.chars().take(300).collect::<String>(),
                t.tool_calls
                    .iter()
                    .map(|c| format!("{} {}", c.tool, c.args_json))
                    .collect::<Vec<_>>()
            ),
            Body::PolicyDecided(d) => format!("{} {:?}: {}", d.call_id, d.decision(), d.reason),
            Body::ToolCallCompleted(c) => format!("{}: {:?}", c.call_id, c.output),
            Body::ToolCallFailed(f) => format!("{}: {}", f.call_id, f.error),
            Body::GateChecked(g) => format!("{} passed={} {}", g.command, g.passed, g.detail),
            Body::LeafFinished(f) => format!("leaf {} {:?}: {}", f.leaf, f.state(), f.reason),
            Body::RunFinished(f) => {
                format!("{:?}: {} | report {:?}", f.status(), f.summary, f.report)
            }
            other => format!("{other:?}").chars().take(200).collect(),
        };
        eprintln!("#{:<3} {:<20} {detail}", stored.event.seq, body.kind());
    }
}

/// ledger, policy and connectors, then a dispatcher on the real model.
async fn stack_on_the_model() -> anyhow::Result<Stack> {
    let (url, name) = model();
    let mut stack = Stack::start(&["ledger", "policy", "connectors"]).await?;
    stack
        .add_with_env(
            "dispatcher",
            &["--max-turns", "4"],
            &[
                ("DISPATCH_MODEL_URL", url.as_str()),
                ("DISPATCH_MODEL", name.as_str()),
            ],
        )
        .await?;
    Ok(stack)
}

#[tokio::test]
#[ignore = "needs a real model server: cargo xtask test --real-model"]
async fn a_real_model_plans_and_its_leaf_calls_a_tool() -> anyhow::Result<()> {
    let stack = stack_on_the_model().await?;
    let goal = "Write the word hello into the file scratch/hello.txt";
    let run_id = stack
        .submit(goal, "default", LIMIT.as_millis() as u64)
        .await?;
    let events = stack.wait_finished_or_show(run_id, LIMIT).await?;
    print(&events);
    let bodies: Vec<&Body> = events
        .iter()
        .filter_map(|e| e.event.body.as_ref())
        .collect();
    let plan = bodies
        .iter()
        .find_map(|b| match b {
            Body::PlanAuthored(p) => Some(p),
            _ => None,
        })
        .expect("the model's plan was accepted (see the events above)");
    assert!(plan.model.starts_with("openai:"), "{}", plan.model);
    let called = bodies
        .iter()
        .any(|b| matches!(b, Body::ModelTurn(t) if !t.tool_calls.is_empty()));
    assert!(
        called,
        "no leaf's model called a tool (see the events above)"
    );
    let executed = bodies
        .iter()
        .any(|b| matches!(b, Body::ToolCallCompleted(_) | Body::ToolCallFailed(_)));
    assert!(executed, "no call reached a connector");
    let end = finished(&events);
    eprintln!(
        "run {run_id} ended {:?}; hello.txt holds {:?}",
        end.status(),
        std::fs::read_to_string(
            stack
                .root()
                .join(format!(".dispatch/runs/{run_id}/scratch/hello.txt"))
        )
        .ok()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a real model server: cargo xtask test --real-model"]
async fn a_real_model_lists_files_through_the_filesystem_server() -> anyhow::Result<()> {
    // The official filesystem MCP server, rooted at a directory with a few files.
    let shared = tempfile::tempdir()?;
    for (name, text) in [
        ("notes.md", "Meeting notes: ship the MCP connectors.\n"),
        ("todo.txt", "1. write tests\n2. run them\n"),
        ("data.csv", "a,b\n1,2\n"),
    ] {
        std::fs::write(shared.path().join(name), text)?;
    }
    let script = dispatch_testkit::mcp_servers()
        .join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    let policy = r#"{"default": "deny", "rules": [
      {"name": "fs-reads", "effect": "allow", "tools": ["fs.list_directory",
        "fs.list_directory_with_sizes", "fs.directory_tree", "fs.read_text_file",
        "fs.read_file", "fs.get_file_info", "fs.search_files", "fs.list_allowed_directories"]},
      {"name": "no-run-reads", "effect": "deny", "tools": ["files.read_file", "files.list_files"]},
      {"name": "scratch", "effect": "allow", "tools": ["files.write_file"], "when": {"path_prefix": ["scratch"]}}
    ]}"#;
    let (url, name) = model();
    let mut stack = Stack::start(&["ledger"]).await?;
    std::fs::write(
        stack.root().join("dispatch.toml"),
        format!(
            "[[connectors.mcp]]\nname = \"fs\"\ncommand = \"node\"\nargs = [{:?}, {:?}]\n",
            script.display().to_string(),
            shared.path().display().to_string()
        ),
    )?;
    let path = stack.root().join("policy.json");
    std::fs::write(&path, policy)?;
    let path = path.display().to_string();
    stack.add_with("policy", &["--policy", &path]).await?;
    stack.add("connectors").await?;
    stack
        .eventually(Duration::from_secs(60), || async {
            let out = stack.cli(&["tools"]).ok()?;
            out.stdout.contains("fs.list_directory").then_some(())
        })
        .await?;
    stack
        .add_with_env(
            "dispatcher",
            &["--max-turns", "6"],
            &[
                ("DISPATCH_MODEL_URL", url.as_str()),
                ("DISPATCH_MODEL", name.as_str()),
            ],
        )
        .await?;
    let goal = format!(
        "List the files in {} and write a short summary of them to scratch/REPORT.org",
        shared.path().display()
    );
    let run_id = stack
        .submit(&goal, "default", LIMIT.as_millis() as u64)
        .await?;
    let events = stack.wait_finished_or_show(run_id, LIMIT).await?;
    print(&events);
    let fs_calls: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r)) if r.tool.starts_with("fs.") => Some(r.tool.as_str()),
            _ => None,
        })
        .collect();
    let end = finished(&events);
    let report = std::fs::read_to_string(stack.root().join(&end.report_path)).ok();
    eprintln!(
        "run {run_id} ended {:?}; filesystem calls {fs_calls:?}; report at {:?}: {report:?}",
        end.status(),
        end.report_path
    );
    assert!(
        !fs_calls.is_empty(),
        "the model called no filesystem tool (see the events above)"
    );
    // The errand is done for real: the run wrote its report, and the report is about
    // the files the filesystem server listed.
    assert_eq!(
        end.status(),
        dispatch_proto::run::v1::RunStatus::Done,
        "{}",
        end.reason
    );
    let report = report.expect("the run wrote scratch/REPORT.org");
    assert!(
        ["notes.md", "todo.txt", "data.csv"]
            .iter()
            .any(|name| report.contains(name)),
        "the report names none of the files: {report:?}"
    );
    Ok(())
}

/// The model's URL, or a recording proxy in front of it when `DISPATCH_RECORD_DIR` is
/// set (its answers kept under `<dir>/<name>`, for the stand-in to replay in CI).
async fn model_or_recorder(name: &str) -> anyhow::Result<String> {
    let (url, _) = model();
    match std::env::var_os("DISPATCH_RECORD_DIR") {
        Some(dir) => dispatch_tests::recorder(url, std::path::PathBuf::from(dir).join(name)).await,
        None => Ok(url),
    }
}

/// ledger, policy, connectors and ingress, then a dispatcher on the model (or on a
/// recorder in front of it, keeping its answers under `name`).
async fn chat_stack_on_the_model(name: &str) -> anyhow::Result<Stack> {
    let url = model_or_recorder(name).await?;
    let (_, model_name) = model();
    let mut stack = Stack::start(&["ledger", "policy", "connectors", "ingress"]).await?;
    stack
        .add_with_env(
            "dispatcher",
            &["--max-turns", "4"],
            &[
                ("DISPATCH_MODEL_URL", url.as_str()),
                ("DISPATCH_MODEL", model_name.as_str()),
            ],
        )
        .await?;
    Ok(stack)
}

#[tokio::test]
#[ignore = "needs a real model server: cargo xtask test --real-model"]
async fn a_real_model_answers_the_second_turn_from_the_first() -> anyhow::Result<()> {
    let stack = chat_stack_on_the_model("remembers").await?;
    let mut answers = Vec::new();
    for text in [
        "My favourite colour is teal. Please remember that.",
        "What is my favourite colour? Answer in one word.",
    ] {
        let answer = stack
            .http
            .post(stack.url("/v1/conversations/colours/messages"))
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await?;
        anyhow::ensure!(answer.status() == 202, "{}", answer.text().await?);
        let body: serde_json::Value = answer.json().await?;
        let run_id: dispatch_bus::RunId = body["run_id"].as_str().unwrap_or_default().parse()?;
        let events = stack.wait_finished_or_show(run_id, LIMIT).await?;
        print(&events);
        answers.push(finished(&events).summary.clone());
    }
    eprintln!("the model answered {answers:?}");
    assert!(
        answers[1].to_lowercase().contains("teal"),
        "the second answer does not say teal: {:?}",
        answers[1]
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a real model server: cargo xtask test --real-model"]
async fn a_real_model_hands_an_errand_off_and_hears_of_it_next_turn() -> anyhow::Result<()> {
    let stack = chat_stack_on_the_model("hands-off").await?;
    let say = |text: &'static str| {
        let stack = &stack;
        async move {
            let answer = stack
                .http
                .post(stack.url("/v1/conversations/seam/messages"))
                .json(&serde_json::json!({ "text": text }))
                .send()
                .await?;
            anyhow::ensure!(answer.status() == 202, "{}", answer.text().await?);
            let body: serde_json::Value = answer.json().await?;
            let run_id: dispatch_bus::RunId =
                body["run_id"].as_str().unwrap_or_default().parse()?;
            let events = stack.wait_finished_or_show(run_id, LIMIT).await?;
            print(&events);
            anyhow::Ok(events)
        }
    };
    let one = say(
        "Hand this off to run in the background with the dispatch tool: write the word \
         hello into the file scratch/hello.txt.",
    )
    .await?;
    let errand = one.iter().find_map(|e| match &e.event.body {
        Some(Body::ToolCallCompleted(c)) if c.output.starts_with("started run ") => c
            .output
            .get(12..48)
            .and_then(|id| id.parse::<dispatch_bus::RunId>().ok()),
        _ => None,
    });
    let Some(errand) = errand else {
        anyhow::bail!("the model did not hand the errand off (see its turn above)");
    };
    let errand_log = stack.wait_finished_or_show(errand, LIMIT).await?;
    eprintln!("the errand ended {:?}", finished(&errand_log).status());
    let two = say("Is the background work finished? What did it say?").await?;
    let drained = two.iter().find_map(|e| match &e.event.body {
        Some(Body::TurnContext(c)) => Some(c.notes.clone()),
        _ => None,
    });
    let drained = drained.unwrap_or_default();
    assert!(
        drained.iter().any(|n| n.run_id == errand.to_string()),
        "the errand's note was not drained into the next turn: {drained:?}"
    );
    eprintln!(
        "the model relayed: {:?}",
        finished(&two).report.chars().take(400).collect::<String>()
    );
    Ok(())
}
