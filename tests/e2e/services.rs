//! Service runs: `dispatch serve` starts a long-lived run that its schedules and its
//! interval wake, each wake a run of its own recorded in the service's log; it stays
//! `doing` while idle, ends `stopped` when stopped (its schedules go with it), and a
//! restart rebuilds it from its log. An Agentfile with a mistake is refused by line.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dispatch_bus::{RunId, streams};
use dispatch_proto::run::v1::{RunRequested, RunStatus, ServiceWoken, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_tests::{Stack, finished};
use serde_json::Value;
use sha2::Digest as _;

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "s3cret-token-for-the-hook";

fn requested(events: &[StoredEvent]) -> Result<RunRequested> {
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::RunRequested(r)) => Some(r.clone()),
            _ => None,
        })
        .context("the run was requested")
}

fn wakes(events: &[StoredEvent]) -> Vec<ServiceWoken> {
    events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ServiceWoken(w)) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

fn inspect(stack: &Stack, run: &str) -> Result<Value> {
    let out = stack.cli(&["inspect", run])?;
    anyhow::ensure!(out.code == Some(0), "inspect: {}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

fn ps_status(stack: &Stack, run: &str) -> Result<Option<String>> {
    let out = stack.cli(&["ps", "-a", "--format", "json"])?;
    anyhow::ensure!(out.code == Some(0), "ps: {}", out.stderr);
    let runs: Vec<Value> = serde_json::from_str(&out.stdout)?;
    Ok(runs
        .iter()
        .find(|r| r["run_id"] == run)
        .and_then(|r| r["status"].as_str().map(str::to_owned)))
}

#[tokio::test]
async fn a_service_wakes_on_its_schedule_and_interval_and_ends_stopped() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    for service in ["scheduler", "dispatcher"] {
        stack.add(service).await?;
    }
    let out = stack.cli(&[
        "serve",
        "--goal",
        "Service errand",
        "--schedule",
        "*/2 * * * * * *",
        "--interval",
        "3s",
    ])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let service: RunId = out.stdout.trim().parse()?;
    let id = service.to_string();
    let log = stack.log().await?;

    // It wakes for both reasons, each wake a heartbeat run recorded in its log first.
    let woke = stack
        .eventually(LIMIT, || async {
            let events = log.read(&service).await.ok()?;
            let woke = wakes(&events);
            let reasons = |r: &str| woke.iter().filter(|w| w.wake == r).count();
            (reasons("schedule") >= 2 && reasons("interval") >= 1).then_some(woke)
        })
        .await?;
    assert_eq!(ps_status(&stack, &id)?.as_deref(), Some("doing"));
    for wake in &woke {
        let events = stack.wait_finished(wake.run_id.parse()?, LIMIT).await?;
        assert_eq!(finished(&events).status, RunStatus::Done as i32);
        let child = requested(&events)?;
        assert_eq!(child.kind, "heartbeat");
        assert_eq!(child.parent_run_id, id);
        assert_eq!(child.wake, wake.wake);
        assert_eq!(child.goal, "Service errand");
        let payload: Value = serde_json::from_str(&child.payload)?;
        assert_eq!(payload["wake"], wake.wake.as_str(), "{payload}");
        assert!(payload["fire_at_ms"].as_i64().is_some(), "{payload}");
    }
    let view = inspect(&stack, &id)?;
    assert_eq!(view["kind"], "service");
    assert_eq!(view["status"], "doing");
    assert_eq!(view["service"]["schedules"][0], "*/2 * * * * * * UTC");
    assert_eq!(view["service"]["interval_ms"], 3000);
    assert_eq!(
        view["service"]["schedule_ids"].as_array().map(Vec::len),
        Some(2),
        "{view}"
    );
    assert!(view["service"]["wakes"].as_u64() >= Some(woke.len() as u64));
    assert!(
        view.get("deadline_at_ms").is_none_or(Value::is_null),
        "{view}"
    );
    let listed = stack.cli(&["schedule", "ls", "--format", "json"])?;
    let schedules: Vec<Value> = serde_json::from_str(&listed.stdout)?;
    assert_eq!(schedules.len(), 2, "{schedules:?}");
    assert!(schedules.iter().all(|s| s["service_run_id"] == id.as_str()));

    // A stop ends it at once (nothing runs an idle service), and its schedules go.
    let began = std::time::Instant::now();
    let out = stack.cli(&["stop", &id])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "a stop does not wait out a grace period: {:?}",
        began.elapsed()
    );
    let events = stack.wait_finished(service, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32);
    assert_eq!(end.reason, "stopped by cli");
    assert_eq!(ps_status(&stack, &id)?.as_deref(), Some("stopped"));
    stack
        .eventually(LIMIT, || async {
            let listed = stack.cli(&["schedule", "ls", "--format", "json"]).ok()?;
            let schedules: Vec<Value> = serde_json::from_str(&listed.stdout).ok()?;
            schedules.is_empty().then_some(())
        })
        .await?;
    // No wake after the end: the log is sealed, and nothing more was woken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(log.read(&service).await?.len(), events.len());
    Ok(())
}

#[tokio::test]
async fn the_example_agentfile_serves_restarts_from_its_log_and_keeps_its_secret() -> Result<()> {
    let stack = Stack::start(&["ledger", "scheduler", "dispatcher"]).await?;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/Agentfile");
    let env = [("DISPATCH_WEBHOOK_SECRET", SECRET)];

    // Without its secret, it says where to put it and starts nothing.
    let out = stack.cli(&["serve", example])?;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("DISPATCH_WEBHOOK_SECRET"),
        "{}",
        out.stderr
    );
    let out = stack.cli_with_env(&["serve", example], &env)?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let service: RunId = out.stdout.trim().parse()?;
    let id = service.to_string();
    stack
        .eventually(LIMIT, || async {
            (inspect(&stack, &id).ok()?["status"] == "doing").then_some(())
        })
        .await?;
    let view = inspect(&stack, &id)?;
    assert_eq!(
        view["service"]["schedules"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(view["service"]["source"], example);
    let listener = &view["service"]["listeners"][0];
    assert_eq!(listener["listen_addr"], "127.0.0.1:0");
    assert_eq!(listener["path"], "/hook");
    assert_eq!(listener["methods"][0], "POST");
    assert_eq!(listener["shared_secret"], true);
    assert_eq!(listener["max_body_bytes"], 8192);

    // The log holds the secret's digest, never the secret.
    let log = stack.log().await?;
    let events = log.read(&service).await?;
    let spec = requested(&events)?.service.context("a service spec")?;
    assert_eq!(
        spec.listeners[0].secret_sha256,
        sha2::Sha256::digest(SECRET.as_bytes()).to_vec()
    );
    for dir in [stack.nats.store_dir(), stack.root().to_path_buf()] {
        assert_eq!(
            dispatch_tests::files_holding(&dir, SECRET.as_bytes(), &dir.join("none")),
            Vec::<String>::new(),
            "the secret is stored nowhere"
        );
    }

    // A restart stops it and starts it again from what its log recorded.
    let out = stack.cli(&["restart", &id])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let again: RunId = out.stdout.trim().parse()?;
    let events = stack.wait_finished(service, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Stopped as i32);
    let restarted = stack
        .eventually(LIMIT, || async {
            let events = log.read(&again).await.ok()?;
            events
                .iter()
                .any(|e| matches!(e.event.body, Some(Body::RunStarted(_))))
                .then_some(events)
        })
        .await?;
    let respec = requested(&restarted)?;
    assert_eq!(respec.kind, "service");
    assert_eq!(respec.service, Some(spec));
    assert_eq!(
        ps_status(&stack, &again.to_string())?.as_deref(),
        Some("doing")
    );
    let out = stack.cli(&["stop", &again.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // A mistake in an Agentfile is refused with its file and line; nothing starts.
    let goals_before = stack.stream_messages(streams::GOALS).await?;
    let bad = stack.root().join("Agentfile.bad");
    std::fs::write(
        &bad,
        "GOAL \"Watch\"\nSCHEDULE \"*/2 * * * * * *\"\nSCHEDULE \"61 * * * *\"\n",
    )?;
    let out = stack.cli(&["serve", bad.to_str().context("utf-8")?])?;
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr
            .contains(&format!("{}:3: SCHEDULE: `61 * * * *`", bad.display())),
        "{}",
        out.stderr
    );
    let out = stack.cli(&["serve", "--goal", "x", "--listen", "nowhere"])?;
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr.contains("`nowhere` is not an address"),
        "{}",
        out.stderr
    );
    assert_eq!(stack.stream_messages(streams::GOALS).await?, goals_before);
    Ok(())
}
