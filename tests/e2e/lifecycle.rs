//! stop, restart, rm and prune, including their refusals.

use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_tests::{Stack, finished};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);
const SLOW: &str =
    "#+TITLE: Slow\n* TODO Sleep\n  - call: test.sleep {\"ms\": 30000}\n  :done-when: true\n";

async fn wait_started_call(stack: &Stack, run_id: RunId) -> anyhow::Result<()> {
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await
}

async fn ps_all(stack: &Stack) -> anyhow::Result<Vec<Value>> {
    let out = stack.cli(&["ps", "-a", "--format", "json"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

async fn ledger_knows(stack: &Stack, run_id: RunId, status: &str) -> anyhow::Result<()> {
    let id = run_id.to_string();
    stack
        .eventually(LIMIT, || async {
            let runs = ps_all(stack).await.ok()?;
            runs.iter()
                .any(|r| r["run_id"] == id && r["status"] == status)
                .then_some(())
        })
        .await
}

#[tokio::test]
async fn stop_asks_the_owner_and_the_run_ends_stopped() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let run_id = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, run_id).await?;

    let out = stack.cli(&["stop", &run_id.to_string()[..8]])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), run_id.to_string());
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32);
    assert_eq!(end.reason, "stopped by cli");
    assert!(
        events
            .last()
            .unwrap()
            .event
            .writer
            .starts_with("dispatcher/"),
        "the owner ended it"
    );
    let wait = stack.cli(&["wait", &run_id.to_string()])?;
    assert_eq!((wait.code, wait.stdout.as_str()), (Some(2), "stopped\n"));
    // Stopping an ended run changes nothing.
    let again = stack.cli(&["stop", &run_id.to_string()])?;
    assert_eq!(again.code, Some(0));
    assert_eq!(stack.log().await?.read(&run_id).await?.len(), events.len());
    Ok(())
}

#[tokio::test]
async fn stop_ends_unowned_runs_escalates_past_the_grace_and_force_does_not_wait()
-> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    // No dispatcher: the run is queued and nobody owns it. The CLI writes no run log,
    // so the stop waits for a dispatcher: `stop` says so and exits 3...
    let queued = stack.submit(SLOW, "default", 0).await?;
    let out = stack.cli(&["stop", "--timeout", "1s", &queued.to_string()])?;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stderr.contains("queued for the dispatcher"), "{out:?}");
    let detached = stack.cli(&["stop", "-d", &queued.to_string()])?;
    assert_eq!(detached.code, Some(0), "{detached:?}");
    assert!(stack.log().await?.read(&queued).await?.is_empty());

    // ...and the first dispatcher to come takes it: the run ends stopped, whoever of
    // the goal and the stop it took first.
    stack.add("dispatcher").await?;
    let events = stack.wait_finished(queued, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32);
    assert!(end.reason.starts_with("stopped by cli"), "{}", end.reason);
    assert!(
        events
            .iter()
            .all(|e| e.event.writer.starts_with("dispatcher/")),
        "the dispatcher wrote the stop and the end"
    );
    stack.commands_drained(LIMIT).await?;
    assert_eq!(stack.log().await?.read(&queued).await?.len(), events.len());

    let running = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, running).await?;
    let out = stack.cli(&["stop", "--force", &running.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let end = stack.wait_finished(running, LIMIT).await?;
    assert_eq!(finished(&end).reason, "stopped by cli (forced)");

    // A started run whose owner is gone: another dispatcher takes the stop, the grace
    // runs out, and it ends the run (before the dead owner's lease lapses and the run
    // would be resumed).
    let orphan = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, orphan).await?;
    stack.service("dispatcher")?.kill().await?;
    stack.services.retain(|s| s.name != "dispatcher");
    stack.add("dispatcher").await?;
    let out = stack.cli(&["stop", "--grace-period-ms", "300", &orphan.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let end = stack.wait_finished(orphan, LIMIT).await?;
    assert_eq!(
        finished(&end).reason,
        "stopped by cli (forced: no owner ended it within 300 ms)"
    );
    Ok(())
}

/// The front doors that write no run log: HTTP and gRPC hand the stop to the
/// dispatcher, which records it; the owner ends the run, or the dispatcher does.
#[tokio::test]
async fn http_and_grpc_stop_runs_through_the_dispatcher() -> anyhow::Result<()> {
    use dispatch_proto::api::v1::StopRunRequest;
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    stack.add("ingress").await?;
    let keys = dispatch_service::api_keys::store_path(stack.root());
    let key_id = dispatch_service::api_keys::Store::load(&keys)?.keys[0]
        .id
        .clone();

    let asked = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, asked).await?;
    let stop = |id: String, body: &'static str| {
        let request = stack
            .http
            .post(stack.url(&format!("/v1/runs/{id}/stop")))
            .header("content-type", "application/json")
            .body(body);
        async move { request.send().await }
    };
    let answer = stop(asked.to_string()[..8].to_owned(), r#"{"grace_ms": 20000}"#).await?;
    assert_eq!(answer.status(), 202);
    assert_eq!(
        answer.headers()["location"].to_str()?,
        format!("/v1/runs/{asked}")
    );
    let body: Value = answer.json().await?;
    assert_eq!(body["run_id"], asked.to_string());
    let events = stack.wait_finished(asked, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32);
    assert_eq!(end.reason, format!("stopped by http:{key_id}"));
    // The request was written by the dispatcher, and the owner ended the run.
    let request = events
        .iter()
        .find(|e| matches!(e.event.body, Some(Body::StopRequested(_))))
        .expect("a stop request in the log");
    assert!(
        request.event.writer.starts_with("dispatcher/"),
        "{}",
        request.event.writer
    );
    assert!(
        events
            .last()
            .unwrap()
            .event
            .writer
            .starts_with("dispatcher/")
    );

    // An ended run, an unknown one, a bad body: refused, and nothing changes.
    let again = stop(asked.to_string(), "").await?;
    assert_eq!(again.status(), 409);
    let problem: Value = again.json().await?;
    assert_eq!(problem["code"], "run_ended");
    let unknown = stop(RunId::new().to_string(), "").await?;
    assert_eq!(unknown.status(), 404);
    for body in [r#"{"grace": 1}"#, r#"{"grace_ms": 600001}"#, "{"] {
        let bad = stop(asked.to_string(), body).await?;
        assert_eq!(bad.status(), 400, "{body}");
    }
    assert_eq!(stack.log().await?.read(&asked).await?.len(), events.len());

    // gRPC, forced: the dispatcher ends it without waiting for the owner.
    let mut client = stack.grpc_client().await?;
    let forced = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, forced).await?;
    let stopped = client
        .stop_run(StopRunRequest {
            run_id: forced.to_string(),
            force: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(stopped.run_id, forced.to_string());
    let events = stack.wait_finished(forced, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32);
    assert!(
        end.reason.starts_with(&format!("stopped by grpc:{key_id}")),
        "{}",
        end.reason
    );
    let ended = client
        .stop_run(StopRunRequest {
            run_id: forced.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition);
    let unknown = client
        .stop_run(StopRunRequest {
            run_id: RunId::new().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn rm_refuses_live_runs_and_removes_ended_ones_from_views_and_disk() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let done = stack.submit("Quick errand", "default", 0).await?;
    stack.wait_finished(done, LIMIT).await?;
    ledger_knows(&stack, done, "done").await?;
    let live = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, live).await?;

    let refused = stack.cli(&["rm", &live.to_string()])?;
    assert_eq!(refused.code, Some(125));
    assert!(
        refused.stderr.contains("has not ended"),
        "{}",
        refused.stderr
    );
    assert!(
        stack
            .log()
            .await?
            .handle(live)
            .await?
            .events()
            .iter()
            .all(|e| !matches!(e.event.body, Some(Body::StopRequested(_))))
    );

    let dir = stack.root().join(format!(".dispatch/runs/{done}"));
    assert!(dir.is_dir());
    let out = stack.cli(&["rm", &done.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let id = done.to_string();
    stack
        .eventually(LIMIT, || async {
            let gone = ps_all(&stack).await.ok()?.iter().all(|r| r["run_id"] != id);
            // The working directory goes; the audit trail stays.
            (gone && dir_names(&dir) == ["_steps.jsonl"]).then_some(())
        })
        .await?;
    let tasks = stack
        .eventually(LIMIT, || async {
            // TASKS.org is rendered at most once a second: wait for the render that
            // follows the removal, not a stale one from before either run.
            let text = std::fs::read_to_string(stack.root().join("TASKS.org")).ok()?;
            (!text.contains(&id) && text.contains(&live.to_string())).then_some(text)
        })
        .await?;
    assert!(tasks.contains(&live.to_string()));
    // The log stays.
    let logs = stack.cli(&["logs", &id])?;
    assert_eq!(logs.code, Some(0), "{}", logs.stderr);

    // --force stops a live run first.
    let out = stack.cli(&["rm", "--force", &live.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let events = stack.wait_finished(live, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Stopped as i32);

    // A rebuild of the views keeps removed runs removed.
    let live_id = live.to_string();
    stack
        .eventually(LIMIT, || async {
            ps_all(&stack)
                .await
                .ok()?
                .iter()
                .all(|r| r["run_id"] != live_id)
                .then_some(())
        })
        .await?;
    let before = stack.cli(&["ps", "-a", "--format", "json"])?.stdout;
    stack.stop("ledger").await?;
    std::fs::remove_dir_all(stack.root().join(".dispatch/state/ledger"))?;
    stack.add("ledger").await?;
    let after = stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["ps", "-a", "--format", "json"]).ok()?;
            (out.code == Some(0) && out.stdout == before).then_some(out.stdout)
        })
        .await?;
    assert_eq!(after, "[]\n");
    Ok(())
}

#[tokio::test]
async fn restart_runs_the_goal_again_and_prune_clears_ended_runs() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let first = stack.submit("Water the plants", "garden", 0).await?;
    stack.wait_finished(first, LIMIT).await?;

    let out = stack.cli(&["restart", &first.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let second: RunId = out.stdout.trim().parse()?;
    assert_ne!(second, first);
    let events = stack.wait_finished(second, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    let Some(Body::RunRequested(requested)) = &events[0].event.body else {
        panic!("first event")
    };
    assert_eq!(requested.goal, "Water the plants");
    assert_eq!(requested.conversation_id, "garden");

    let live = stack.submit(SLOW, "default", 0).await?;
    wait_started_call(&stack, live).await?;
    ledger_knows(&stack, second, "done").await?;
    ledger_knows(&stack, live, "doing").await?;
    let out = stack.cli(&["prune"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pruned: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(pruned.len(), 2, "{}", out.stdout);
    let live_id = live.to_string();
    stack
        .eventually(LIMIT, || async {
            let runs = ps_all(&stack).await.ok()?;
            (runs.len() == 1 && runs[0]["run_id"] == live_id).then_some(())
        })
        .await?;
    assert!(stack.root().join(format!(".dispatch/runs/{live}")).is_dir());
    // prune keeps the audit trail: of an ended run's directory only `_steps.jsonl` stays.
    let first_dir = stack.root().join(format!(".dispatch/runs/{first}"));
    stack
        .eventually(LIMIT, || async {
            (dir_names(&first_dir) == ["_steps.jsonl"]).then_some(())
        })
        .await?;

    // --trails deletes them too, but only when confirmed: never without a terminal.
    let third = stack.submit("Sweep the yard", "garden", 0).await?;
    stack.wait_finished(third, LIMIT).await?;
    ledger_knows(&stack, third, "done").await?;
    let refused = stack.cli(&["prune", "--trails"])?;
    assert_eq!(refused.code, Some(125), "{refused:?}");
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    ledger_knows(&stack, third, "done").await?;
    let out = stack.cli(&["prune", "--trails", "--force"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains(&third.to_string()), "{}", out.stdout);
    let third_dir = stack.root().join(format!(".dispatch/runs/{third}"));
    stack
        .eventually(LIMIT, || async { (!third_dir.exists()).then_some(()) })
        .await?;
    assert_eq!(dir_names(&first_dir), ["_steps.jsonl"]);

    // Replay of a removed run says what it did, and brings back only a kept trail.
    let replay = stack.cli(&["replay", &first.to_string()])?;
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    assert!(
        replay
            .stdout
            .contains("views not rebuilt: the run was removed"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("trail written to"),
        "{}",
        replay.stdout
    );
    let replay = stack.cli(&["replay", &third.to_string()])?;
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    assert!(
        replay
            .stdout
            .contains("trail not written: it was deleted by prune --trails"),
        "{}",
        replay.stdout
    );
    assert!(!third_dir.exists());
    assert_eq!(
        ps_all(&stack).await?.len(),
        1,
        "replay brought no removed run back"
    );
    Ok(())
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn short_ids_tell_apart_runs_started_together() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger", "ingress"]).await?;
    // Written back to back, so their ids share a long timestamp prefix.
    let seeded = stack.seed_finished_runs(40, "default", 10).await?;
    stack
        .eventually(LIMIT, || async {
            (ps_all(&stack).await.ok()?.len() == 40).then_some(())
        })
        .await?;
    // Most of them share their first 7 characters (all of them unless the seeding
    // crossed a 2^20 ms boundary of the timestamp).
    let mut by_prefix = std::collections::BTreeMap::<String, usize>::new();
    for id in &seeded {
        *by_prefix.entry(id.to_string()[..7].to_owned()).or_default() += 1;
    }
    let (shared, n) = by_prefix.iter().max_by_key(|(_, n)| **n).unwrap();
    assert!(*n >= 20, "{by_prefix:?}");
    let ambiguous = stack.cli(&["inspect", shared])?;
    assert_ne!(ambiguous.code, Some(0));
    assert!(
        ambiguous.stderr.contains("matches several runs"),
        "{}",
        ambiguous.stderr
    );

    // `ps` shows the short form, and every one of them names its run.
    let table = stack.cli(&["ps", "-a"])?.stdout;
    for id in &seeded {
        let short = id.short();
        assert!(table.contains(&format!("\n{short}  ")), "{short}:\n{table}");
        let inspect = stack.cli(&["inspect", &short])?;
        assert_eq!(inspect.code, Some(0), "{}", inspect.stderr);
        let view: Value = serde_json::from_str(&inspect.stdout)?;
        assert_eq!(view["run_id"], id.to_string());
    }
    let full = stack.cli(&["ps", "-a", "--no-trunc"])?.stdout;
    assert!(full.contains(&seeded[0].to_string()), "{full}");

    // A prefix of a short id works too, and so does HTTP.
    let target = seeded[7];
    let over_http = stack
        .get_json(&format!("/v1/runs/{}", target.short()))
        .await?;
    assert_eq!(over_http["run_id"], target.to_string());
    let logs = stack.cli(&["logs", &target.short()[..9]])?;
    assert_eq!(logs.code, Some(0), "{}", logs.stderr);
    assert_eq!(logs.stdout.lines().count(), 3, "{}", logs.stdout);

    // A removed run's short id no longer resolves.
    let out = stack.cli(&["rm", &target.short()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["inspect", &target.short()]).ok()?;
            out.stderr.contains("no run matches").then_some(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn job_and_heartbeat_runs_carry_their_kind_and_payload() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let cases: [(&[&str], &str, &str); 3] = [
        (&["--job", r#"{"rows": 3}"#], "job", r#"{"rows": 3}"#),
        (&["--heartbeat=tick 7"], "heartbeat", "tick 7"),
        (&["--heartbeat"], "heartbeat", ""),
    ];
    for (flags, kind, payload) in cases {
        let mut args = vec!["run", "-d"];
        args.extend_from_slice(flags);
        args.push("Quick errand");
        let out = stack.cli(&args)?;
        assert_eq!(out.code, Some(0), "{flags:?}: {}", out.stderr);
        let run_id: RunId = out.stdout.trim().parse()?;
        let events = stack.wait_finished(run_id, LIMIT).await?;
        let requested = events
            .iter()
            .find_map(|e| match &e.event.body {
                Some(Body::RunRequested(r)) => Some(r.clone()),
                _ => None,
            })
            .expect("requested");
        assert_eq!(
            (requested.kind.as_str(), requested.payload.as_str()),
            (kind, payload)
        );
        ledger_knows(&stack, run_id, "done").await?;
        let view = ps_all(&stack)
            .await?
            .into_iter()
            .find(|r| r["run_id"] == run_id.to_string())
            .expect("listed");
        assert_eq!(view["kind"], kind);
    }
    // A restart runs the same kind with the same payload.
    let mut restarted_one = false;
    for view in ps_all(&stack).await? {
        let id: RunId = view["run_id"].as_str().unwrap_or_default().parse()?;
        let events = stack.log().await?.read(&id).await?;
        let Some(Body::RunRequested(first)) = events[0].event.body.clone() else {
            continue;
        };
        if first.payload != "tick 7" {
            continue;
        }
        let out = stack.cli(&["restart", &id.to_string()])?;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let again: RunId = out.stdout.trim().parse()?;
        let events = stack.wait_finished(again, LIMIT).await?;
        let Some(Body::RunRequested(second)) = events[0].event.body.clone() else {
            panic!("a run starts with its request");
        };
        assert_eq!((second.kind, second.payload), (first.kind, first.payload));
        restarted_one = true;
    }
    assert!(restarted_one, "the heartbeat run was restarted");
    let both = stack.cli(&[
        "run",
        "-d",
        "--job",
        "x",
        "--heartbeat",
        "y",
        "Quick errand",
    ])?;
    assert_ne!(both.code, Some(0));
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.stderr
    );
    Ok(())
}
