//! The backbone end to end: real nats-server, every service a real process, real HTTP.

use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_proto::run::v1::RunStatus;
use dispatch_tests::{ALL, Stack, count, finished, read};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

async fn post_goal(stack: &Stack, body: Value) -> anyhow::Result<(RunId, Value)> {
    let response = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let reply: Value = response.json().await?;
    let run_id: RunId = reply["run_id"].as_str().unwrap().parse()?;
    assert_eq!(reply["status_url"], format!("/v1/runs/{run_id}"));
    Ok((run_id, reply))
}

async fn run_view(stack: &Stack, run_id: &RunId, status: &str) -> anyhow::Result<Value> {
    let url = stack.url(&format!("/v1/runs/{run_id}"));
    let http = stack.http.clone();
    stack
        .eventually(LIMIT, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.get(&url).send().await.ok()?;
                let view: Value = response.json().await.ok()?;
                (view["status"] == status).then_some(view)
            }
        })
        .await
}

#[tokio::test]
async fn a_goal_posted_over_http_reaches_done_and_every_view_agrees() -> anyhow::Result<()> {
    let stack = Stack::start(&ALL).await?;
    let goal = "Compare the pricing of two sandbox providers";
    let (run_id, _) =
        post_goal(&stack, json!({ "goal": goal, "conversation_id": "chat-7" })).await?;

    // The log: one plan, three leaves done, one terminal event with the tally.
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32);
    assert_eq!(
        end.summary,
        r#"workflow finished: {"DONE": 3, "FAILED": 0}"#
    );
    assert_eq!(count(&events, "run_finished"), 1);
    assert_eq!(count(&events, "leaf_finished"), 3);
    assert_eq!(
        count(&events, "policy_decided"),
        count(&events, "tool_call_requested")
    );
    assert_eq!(
        count(&events, "tool_call_completed"),
        count(&events, "tool_call_requested")
    );

    // The HTTP view.
    let view = run_view(&stack, &run_id, "done").await?;
    assert_eq!(view["goal"], goal);
    assert_eq!(view["leaves_done"], 3);
    let workflow = view["workflow"].as_str().unwrap().to_owned();
    assert_eq!(
        workflow,
        "workflows/compare-the-pricing-of-two-sandbox-providers.org"
    );

    // The plan file is the plan the log recorded, and it parses.
    let plan = read(stack.root().join(&workflow));
    let parsed = dispatch_plan_check(&plan);
    assert_eq!(parsed, 3);

    // The run left its report in its scratch directory.
    let report = read(
        stack
            .root()
            .join(format!(".dispatch/runs/{run_id}/scratch/REPORT.org")),
    );
    assert!(report.contains(goal));

    // TASKS.org shows it DONE with its drawer and tally.
    let tasks = stack.tasks_org_with_finished(1, LIMIT).await?;
    assert!(tasks.starts_with("#+TITLE: Dispatch — tasks\n"), "{tasks}");
    assert!(
        tasks.contains("#+TODO: TODO DOING BLOCKED CORRUPT | DONE STOPPED"),
        "{tasks}"
    );
    let entry = format!(
        "* DONE {goal}\n  :PROPERTIES:\n  :ID: {run_id}\n  :FILE: {workflow}\n  :STARTED: ["
    );
    assert!(tasks.contains(&entry), "{tasks}");
    assert!(
        tasks.contains("  :END:\n  workflow finished: {\"DONE\": 3, \"FAILED\": 0}\n"),
        "{tasks}"
    );

    // The CLI agrees: ps, inspect by prefix, logs, wait.
    let ps = stack.cli(&["ps", "-a", "--format", "json"])?;
    assert_eq!(ps.code, Some(0), "{}", ps.stderr);
    let runs: Value = serde_json::from_str(&ps.stdout)?;
    assert_eq!(runs[0]["run_id"], run_id.to_string());
    assert_eq!(runs[0]["status"], "done");
    let live = stack.cli(&["ps", "-q"])?;
    assert_eq!(live.stdout, "", "a finished run is listed as live");

    let prefix = &run_id.to_string()[..13];
    let inspect = stack.cli(&["inspect", prefix])?;
    assert_eq!(inspect.code, Some(0), "{}", inspect.stderr);
    let inspected: Value = serde_json::from_str(&inspect.stdout)?;
    assert_eq!(inspected["status"], "done");
    assert_eq!(inspected["workflow"], workflow);

    let logs = stack.cli(&["logs", prefix])?;
    assert_eq!(logs.code, Some(0), "{}", logs.stderr);
    assert_eq!(logs.stdout.lines().count(), events.len());
    assert!(
        logs.stdout
            .lines()
            .last()
            .unwrap()
            .contains(r#"done: workflow finished — workflow finished: {"DONE": 3, "FAILED": 0}"#),
        "{}",
        logs.stdout
    );

    let wait = stack.cli(&["wait", &run_id.to_string()])?;
    assert_eq!((wait.code, wait.stdout.as_str()), (Some(0), "done\n"));

    // The feedback note goes to its conversation once.
    let tasks_url = stack.url("/v1/tasks?conversation=chat-7");
    let first: Value = stack.http.get(&tasks_url).send().await?.json().await?;
    assert_eq!(first["feedback"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["feedback"][0]["run_id"], run_id.to_string());
    assert_eq!(first["feedback"][0]["status"], "done");
    assert_eq!(first["tasks"][0]["run_id"], run_id.to_string());
    let second: Value = stack.http.get(&tasks_url).send().await?.json().await?;
    assert_eq!(second["feedback"], json!([]), "a note was handed out twice");
    let other: Value = stack.get_json("/v1/tasks").await?;
    assert_eq!(
        other["feedback"],
        json!([]),
        "a note leaked to another conversation"
    );
    Ok(())
}

/// Counts the leaves of a plan file the way the dispatcher reads it.
fn dispatch_plan_check(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("* TODO ")).count()
}

#[tokio::test]
async fn a_goal_is_accepted_with_no_dispatcher_and_carried_out_later() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger", "ingress"]).await?;
    let (run_id, _) = post_goal(&stack, json!({ "goal": "Write a haiku about queues" })).await?;
    let queued = run_view(&stack, &run_id, "queued").await?;
    assert_eq!(queued["goal"], "Write a haiku about queues");
    assert_eq!(
        stack.stream_messages(dispatch_bus::streams::GOALS).await?,
        1,
        "the goal waits in JetStream"
    );

    for service in ["policy", "connectors", "dispatcher"] {
        stack.add(service).await?;
    }
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    run_view(&stack, &run_id, "done").await?;
    // The goal command is acknowledged and gone from the work queue.
    stack.commands_drained(LIMIT).await?;
    Ok(())
}

#[tokio::test]
async fn the_ledger_rebuilds_its_views_byte_for_byte_from_the_logs() -> anyhow::Result<()> {
    let mut stack = Stack::start(&ALL).await?;
    let mut ids = Vec::new();
    for goal in ["First errand", "Second errand", "Third errand"] {
        ids.push(post_goal(&stack, json!({ "goal": goal })).await?.0);
    }
    for id in &ids {
        stack.wait_finished(*id, LIMIT).await?;
        run_view(&stack, id, "done").await?;
    }
    // Drain the default conversation so a drain event is part of what is rebuilt.
    let drained: Value = stack.get_json("/v1/tasks").await?;
    assert_eq!(drained["feedback"].as_array().unwrap().len(), 3);

    let tasks_path = stack.root().join("TASKS.org");
    let before_tasks = stack.tasks_org_with_finished(3, LIMIT).await?;
    let before_ps = stack.cli(&["ps", "-a", "--format", "json"])?.stdout;

    stack.stop("ledger").await?;
    std::fs::remove_dir_all(stack.root().join(".dispatch/state/ledger"))?;
    std::fs::remove_file(&tasks_path)?;
    stack.add("ledger").await?;

    let after_tasks = stack.tasks_org_with_finished(3, LIMIT).await?;
    assert_eq!(after_tasks, before_tasks);
    let after_ps = stack.cli(&["ps", "-a", "--format", "json"])?.stdout;
    assert_eq!(after_ps, before_ps);
    // Drained notes stay drained after the rebuild.
    let again: Value = stack.get_json("/v1/tasks").await?;
    assert_eq!(again["feedback"], json!([]));
    Ok(())
}
