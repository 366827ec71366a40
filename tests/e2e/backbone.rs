//! The backbone end to end: real nats-server, every service a real process, real HTTP.

use std::time::Duration;

use anyhow::Context as _;
use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
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
    // The tally, then the first lines of the report the run wrote.
    assert!(
        end.summary
            .starts_with("workflow finished: {\"DONE\": 3, \"FAILED\": 0}\n* Goal\n"),
        "{}",
        end.summary
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
        tasks.contains("#+TODO: TODO DOING WAITING BLOCKED CORRUPT | DONE STOPPED"),
        "{tasks}"
    );
    let entry = format!(
        "* DONE {goal}\n  :PROPERTIES:\n  :ID: {run_id}\n  :FILE: {workflow}\n  :STARTED: ["
    );
    assert!(tasks.contains(&entry), "{tasks}");
    assert!(
        tasks.contains("  :END:\n  workflow finished: {\"DONE\": 3, \"FAILED\": 0} * Goal "),
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
        logs.stdout.lines().last().unwrap().contains(
            r#"done: workflow finished — workflow finished: {"DONE": 3, "FAILED": 0} * Goal"#
        ),
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

/// The status URL a 202 names answers at once: the goal is stored before the 202 is
/// sent, and a run the views have not caught up with is found by its goal.
#[tokio::test]
async fn a_run_reads_queued_the_moment_its_202_is_sent() -> anyhow::Result<()> {
    use dispatch_proto::api::v1::{GetRunRequest, TaskStatus};
    // No dispatcher: every run stays queued, so the only right answer is `queued`.
    let stack = Stack::start(&["ledger", "ingress"]).await?;
    let mut grpc = stack.grpc_client().await?;
    for i in 0..1000 {
        let (run_id, reply) = post_goal(&stack, json!({ "goal": format!("Errand {i}") })).await?;
        let status_url = reply["status_url"].as_str().unwrap();
        let response = stack.http.get(stack.url(status_url)).send().await?;
        assert_eq!(
            response.status(),
            200,
            "run {i} ({run_id}) read as {response:?}"
        );
        let view: Value = response.json().await?;
        assert_eq!(view["status"], "queued", "{view}");
        assert_eq!(view["goal"], format!("Errand {i}"));
        if i % 100 == 0 {
            let view = grpc
                .get_run(GetRunRequest {
                    id: run_id.to_string(),
                })
                .await?
                .into_inner();
            assert_eq!(view.status(), TaskStatus::Queued);
            let inspect = stack.cli(&["inspect", &run_id.to_string()])?;
            assert_eq!(inspect.code, Some(0), "{}", inspect.stderr);
            let view: Value = serde_json::from_str(&inspect.stdout)?;
            assert_eq!(view["status"], "queued");
        }
    }
    // An id no goal names is still not found.
    let unknown = stack
        .http
        .get(stack.url(&format!("/v1/runs/{}", RunId::new())))
        .send()
        .await?;
    assert_eq!(unknown.status(), 404);
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

#[tokio::test]
async fn a_run_leaves_a_report_that_run_prints_and_inspect_points_to() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger", "policy", "connectors", "dispatcher"]).await?;
    let out = stack.cli(&["run", "Summarise what a kill switch is for"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let run_id: RunId = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .context("dispatch run names the run")?
        .trim()
        .parse()?;
    let path = format!(".dispatch/runs/{run_id}/scratch/REPORT.org");
    let written = std::fs::read_to_string(stack.root().join(&path))?;
    // Printed after the events, whole, under a heading that says where it is.
    let printed = out
        .stdout
        .split_once(&format!("── report ({path}) ──\n"))
        .context("the report is printed")?
        .1;
    assert_eq!(printed.trim_end(), written.trim_end());

    let events = stack.log().await?.read(&run_id).await?;
    let end = finished(&events);
    assert_eq!(end.report, written);
    assert_eq!(end.report_path, path);
    // The note's summary: the tally, then the report's first lines, within 300 chars.
    let first_line = written
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with("#+"))
        .context("the report says something")?;
    assert!(
        end.summary.starts_with("workflow finished: {"),
        "{}",
        end.summary
    );
    assert!(end.summary.contains(first_line.trim()), "{}", end.summary);
    assert!(end.summary.chars().count() <= 300);

    let inspect = stack.cli(&["inspect", &run_id.to_string()])?;
    let view: Value = serde_json::from_str(&inspect.stdout)?;
    assert_eq!(view["report_path"], path.as_str());
    assert_eq!(view["report_bytes"], written.len() as u64);
    Ok(())
}

#[tokio::test]
async fn a_report_planted_as_a_link_is_not_read() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let secret = stack.root().join("secret.txt");
    std::fs::write(&secret, "the secret")?;
    let plan =
        "#+TITLE: Planted\n* TODO Wait\n  - call: test.sleep {\"ms\": 1500}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 60_000).await?;
    let scratch = stack
        .root()
        .join(format!(".dispatch/runs/{run_id}/scratch"));
    stack
        .eventually(Duration::from_secs(30), || async {
            scratch.is_dir().then_some(())
        })
        .await?;
    std::os::unix::fs::symlink(&secret, scratch.join("REPORT.org"))?;
    let events = stack.wait_finished(run_id, Duration::from_secs(60)).await?;
    let end = finished(&events);
    assert!(!end.report.contains("the secret"), "{}", end.report);
    assert_eq!(end.report_path, "", "the link is not the report");
    // The report is then the last leaf's answer.
    let answer = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::LeafFinished(f)) => Some(f.answer.clone()),
            _ => None,
        })
        .context("the leaf finished")?;
    assert!(!answer.is_empty());
    assert_eq!(end.report, answer);
    Ok(())
}

#[tokio::test]
async fn processes_starting_at_once_all_declare_the_streams() -> anyhow::Result<()> {
    // Every process declares every stream when it connects. The conversation stream is
    // made with the time as its first sequence, so makers at the same moment ask with
    // different configurations; the server refuses all but one, and each of those must
    // take the stream that was made.
    let nats = dispatch_testkit::NatsServer::start().await?;
    let connects: Vec<_> = (0..8).map(|_| nats.bus()).collect();
    for bus in futures::future::join_all(connects).await {
        bus?;
    }
    let mut stream = nats
        .bus()
        .await?
        .jetstream()
        .get_stream(dispatch_bus::streams::CONVERSATIONS)
        .await?;
    assert!(stream.info().await?.config.first_sequence.unwrap_or(0) > 1);
    Ok(())
}

#[tokio::test]
async fn an_ask_is_taken_once_while_in_hand_and_finds_nobody_when_nobody_serves()
-> anyhow::Result<()> {
    use dispatch_bus::ask::{self, Asked};
    use dispatch_bus::subject::Subject;

    let nats = dispatch_testkit::NatsServer::start().await?;
    let bus = nats.bus().await?;
    let subject = Subject::from_static("dispatch.ask.test");
    let step = bytes::Bytes::from_static(b"step one");
    assert_eq!(
        ask::ask(&bus, subject.clone(), step.clone()).await?,
        Asked::Nobody,
        "no copy serves the subject yet"
    );

    // A copy whose handler holds each step until told to let go, counting the runs.
    let (release, released) = tokio::sync::watch::channel(false);
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn({
        let (bus, runs, shutdown) = (nats.bus().await?, runs.clone(), shutdown.clone());
        async move {
            ask::serve(&bus, "dispatch.ask.test", "test", 4, shutdown, move |_| {
                let (runs, mut released) = (runs.clone(), released.clone());
                async move {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = released.wait_for(|go| *go).await;
                }
            })
            .await
        }
    });
    let taken = async {
        loop {
            match ask::ask(&bus, subject.clone(), step.clone()).await? {
                Asked::Nobody => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return anyhow::Ok(other),
            }
        }
    };
    assert_eq!(tokio::time::timeout(LIMIT, taken).await??, Asked::Taken);
    assert_eq!(
        ask::ask(&bus, subject.clone(), step.clone()).await?,
        Asked::InHand,
        "asked again while the step is in hand"
    );
    let other = bytes::Bytes::from_static(b"step two");
    assert_eq!(ask::ask(&bus, subject.clone(), other).await?, Asked::Taken);
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Once the handler is done, the same step asked again is taken again: the asker
    // asks only while the log shows no answer, so this is a step whose taker failed.
    release.send(true)?;
    let again = async {
        loop {
            match ask::ask(&bus, subject.clone(), step.clone()).await? {
                Asked::InHand => tokio::time::sleep(Duration::from_millis(20)).await,
                other => return anyhow::Ok(other),
            }
        }
    };
    assert_eq!(tokio::time::timeout(LIMIT, again).await??, Asked::Taken);
    shutdown.cancel();
    serving.await??;
    Ok(())
}
