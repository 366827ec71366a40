//! Runs never get stuck: deadlines, crashed owners, orphans, a restarted NATS, and
//! feedback that outlives every process.

use std::collections::BTreeSet;
use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_tests::{Stack, count, finished};

const LIMIT: Duration = Duration::from_secs(90);

fn time_of(events: &[StoredEvent], kind: &str) -> i64 {
    events
        .iter()
        .find(|e| e.event.body.as_ref().is_some_and(|b| b.kind() == kind))
        .map(|e| e.event.time_unix_ms)
        .unwrap_or_else(|| panic!("no {kind} event"))
}

fn owner(events: &[StoredEvent]) -> String {
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::RunStarted(s)) => Some(s.owner.clone()),
            _ => None,
        })
        .expect("the run started")
}

#[tokio::test]
async fn the_kill_switch_ends_a_run_at_its_deadline_and_cancels_the_call() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let plan = "#+TITLE: Too slow\n* TODO Sleep past the deadline\n  - call: test.sleep {\"ms\": 6000, \"marker\": \"scratch/slept.txt\"}\n  :done-when: test -s scratch/slept.txt\n";
    let run_id = stack.submit(plan, "default", 2000).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert_eq!(end.reason, "timed out after 2s");
    // The kill switch is armed when the run is requested, planning included.
    let requested = time_of(&events, "run_requested");
    let ended = time_of(&events, "run_finished");
    assert!(
        (2000..3000).contains(&(ended - requested)),
        "ended {} ms after it was requested",
        ended - requested
    );
    assert_eq!(
        count(&events, "tool_call_started"),
        1,
        "the sleep was running"
    );

    // Long after the sleep would have finished, it has left no trace: it was cancelled.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let marker = stack
        .root()
        .join(format!(".dispatch/runs/{run_id}/scratch/slept.txt"));
    assert!(!marker.exists(), "the sleeping call ran to completion");
    let after = stack.log().await?.read(&run_id).await?;
    assert_eq!(
        after.len(),
        events.len(),
        "something was appended after the terminal event"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_owner_is_replaced_and_no_call_runs_twice() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    for _ in 0..2 {
        stack
            .add_with("dispatcher", &["--lease-ms", "2000"])
            .await?;
    }
    let plan = "#+TITLE: Survive\n\
        * TODO Count around a slow call\n  - call: test.count {\"key\": \"takeover\"}\n  - call: test.sleep {\"ms\": 3000}\n  - call: test.count {\"key\": \"takeover\", \"note\": \"after\"}\n  :done-when: true\n\
        * TODO Count once more\n  - call: test.count {\"key\": \"takeover\"}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 120_000).await?;
    // Mid-leaf: the slow call is executing.
    stack
        .wait_for_event(
            run_id,
            LIMIT,
            |b| matches!(b, Body::ToolCallStarted(s) if s.call_id == "l0-t0-c1"),
        )
        .await?;
    let first_owner = owner(&stack.log().await?.read(&run_id).await?);
    let victim = stack
        .services
        .iter_mut()
        .find(|s| first_owner.ends_with(&s.instance))
        .expect("the owner is one of ours");
    victim.kill().await?;

    let events = stack.wait_finished(run_id, LIMIT).await?; // verifies the chain
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    assert!(
        end.summary
            .starts_with(r#"workflow finished: {"DONE": 2, "FAILED": 0}"#),
        "{}",
        end.summary
    );
    let finisher = events.last().unwrap().event.writer.clone();
    assert_ne!(
        finisher, first_owner,
        "the killed dispatcher cannot have finished the run"
    );
    assert!(finisher.starts_with("dispatcher/"));
    // The views name the copy that carried the run on, not the one that died.
    let shown = stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["inspect", &run_id.to_string()]).ok()?;
            let view: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
            (view["status"] == "done").then(|| view["owner"].as_str().map(str::to_owned))?
        })
        .await?;
    assert_eq!(
        shown, finisher,
        "inspect names the owner after the takeover"
    );
    let counted = stack.counted("takeover");
    let unique: BTreeSet<_> = counted.iter().collect();
    assert_eq!(counted.len(), 3, "count executions: {counted:?}");
    assert_eq!(unique.len(), 3, "a call was executed twice: {counted:?}");
    let requested = count(&events, "tool_call_requested");
    assert_eq!(
        count(&events, "tool_call_started"),
        requested,
        "every call started once"
    );
    assert_eq!(
        count(&events, "tool_call_completed"),
        requested,
        "every call completed once"
    );
    Ok(())
}

#[tokio::test]
async fn a_run_whose_deadline_passes_with_no_dispatcher_alive_ends_orphaned() -> anyhow::Result<()>
{
    let mut stack = Stack::with_test_tools().await?;
    stack
        .add_with("dispatcher", &["--lease-ms", "1000"])
        .await?;
    let plan = "#+TITLE: Abandoned\n* TODO Wait\n  - call: test.sleep {\"ms\": 20000}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 3000).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    stack.service("dispatcher")?.kill().await?;
    stack.services.retain(|s| s.name != "dispatcher");

    // Nobody runs it past its deadline; then a dispatcher starts.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    stack
        .add_with("dispatcher", &["--lease-ms", "1000"])
        .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert_eq!(end.reason, "orphaned");
    Ok(())
}

#[tokio::test]
async fn a_nats_restart_mid_run_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack
        .add_with("dispatcher", &["--lease-ms", "2000"])
        .await?;
    let plan = "#+TITLE: Through a restart\n\
        * TODO Before\n  - call: test.count {\"key\": \"restart\"}\n  - call: test.sleep {\"ms\": 1500}\n  :done-when: true\n\
        * TODO After\n  - call: test.count {\"key\": \"restart\"}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 120_000).await?;
    stack
        .wait_for_event(
            run_id,
            LIMIT,
            |b| matches!(b, Body::ToolCallStarted(s) if s.call_id == "l0-t0-c1"),
        )
        .await?;
    stack.nats.restart().await?;

    let events = stack.wait_finished(run_id, LIMIT).await?; // no gap, no fork
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    let ids: BTreeSet<_> = events.iter().map(|e| e.event.event_id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "an event is stored twice");
    let counted = stack.counted("restart");
    let unique: BTreeSet<_> = counted.iter().collect();
    assert_eq!(
        unique.len(),
        counted.len(),
        "a call was executed twice: {counted:?}"
    );
    assert!(counted.len() <= 2);
    Ok(())
}

#[tokio::test]
async fn feedback_survives_every_restart_and_concurrent_drains_split_it() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let mut kept = Vec::new();
    for n in 0..2 {
        kept.push(stack.submit(&format!("Keep note {n}"), "kept", 0).await?);
    }
    let mut split = Vec::new();
    for n in 0..6 {
        split.push(stack.submit(&format!("Split note {n}"), "split", 0).await?);
    }
    for id in kept.iter().chain(&split) {
        stack.wait_finished(*id, LIMIT).await?;
    }

    // Every process goes down hard, nats-server too, and comes back.
    for service in &mut stack.services {
        service.kill().await?;
    }
    stack.services.clear();
    stack.nats.restart().await?;
    let policy = stack.test_policy()?;
    stack.add("ledger").await?;
    stack
        .add_with("policy", &["--policy", policy.to_str().unwrap()])
        .await?;
    stack.add("ingress").await?;
    // A second ledger copy with views of its own answers queries too.
    let other_state = stack.root().join(".dispatch/state/ledger-2");
    stack
        .add_with("ledger", &["--state-dir", other_state.to_str().unwrap()])
        .await?;

    let notes = stack
        .eventually(LIMIT, || async {
            let reply = stack.get_json("/v1/tasks?conversation=kept").await.ok()?;
            let notes = reply["feedback"].as_array()?.clone();
            (!notes.is_empty()).then_some(notes)
        })
        .await?;
    let got: BTreeSet<String> = notes
        .iter()
        .map(|n| n["run_id"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = kept.iter().map(RunId::to_string).collect();
    assert_eq!(got, want, "undrained notes did not survive the restarts");

    // Both ledgers have caught up with every run before the drains race.
    stack
        .eventually(LIMIT, || async {
            let reply = stack.get_json("/v1/runs?conversation=split").await.ok()?;
            (reply["runs"]
                .as_array()?
                .iter()
                .filter(|r| r["status"] == "done")
                .count()
                == 6)
                .then_some(())
        })
        .await?;
    let url = stack.url("/v1/tasks?conversation=split");
    let drains = (0..16).map(|_| {
        let (http, url) = (stack.http.clone(), url.clone());
        tokio::spawn(async move {
            http.get(url)
                .send()
                .await?
                .json::<serde_json::Value>()
                .await
        })
    });
    let mut handed_out = Vec::new();
    for drain in drains {
        let reply = drain.await??;
        for note in reply["feedback"].as_array().unwrap() {
            handed_out.push(note["run_id"].as_str().unwrap().to_owned());
        }
    }
    let unique: BTreeSet<_> = handed_out.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        handed_out.len(),
        "a note was handed out twice: {handed_out:?}"
    );
    // A ledger copy that had not yet applied some note hands it out on a later drain.
    let rest = stack.get_json("/v1/tasks?conversation=split").await?;
    let rest: Vec<String> = rest["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["run_id"].as_str().unwrap().to_owned())
        .collect();
    let all: BTreeSet<String> = handed_out.into_iter().chain(rest).collect();
    let want: BTreeSet<String> = split.iter().map(RunId::to_string).collect();
    assert_eq!(all, want);
    Ok(())
}

/// A policy check is an ask, stored nowhere: one made while no policy copy is up is made
/// again until one is, and the run goes on with one decision.
#[tokio::test]
async fn a_policy_check_asked_while_no_policy_is_up_is_asked_again() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    stack
        .add_with("dispatcher", &["--lease-ms", "1000"])
        .await?;
    let plan = "#+TITLE: Ask again\n* TODO Count once\n  - call: test.count {\"key\": \"asked\"}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 0).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallRequested(_)))
        .await?;
    // Long enough for the first ask to find nobody.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = stack.log().await?.read(&run_id).await?;
    assert_eq!(count(&events, "policy_decided"), 0, "no policy is up yet");
    let policy = stack.test_policy()?;
    let policy = policy.to_str().unwrap().to_owned();
    stack.add_with("policy", &["--policy", &policy]).await?;

    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    assert_eq!(count(&events, "policy_decided"), 1);
    assert_eq!(stack.counted("asked").len(), 1);
    Ok(())
}

/// The same for a gate check, which the connectors make: asked again until a copy is up.
#[tokio::test]
async fn a_gate_check_asked_while_no_connector_is_up_is_asked_again() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let policy = stack.test_policy()?;
    let policy = policy.to_str().unwrap().to_owned();
    stack.add_with("policy", &["--policy", &policy]).await?;
    stack
        .add_with("dispatcher", &["--lease-ms", "1000"])
        .await?;
    let plan = "#+TITLE: Gate later\n* TODO Write nothing\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 0).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::LeafStarted(_)))
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = stack.log().await?.read(&run_id).await?;
    assert_eq!(count(&events, "gate_checked"), 0, "no connector is up yet");
    stack.add_with("connectors", &["--test-tools"]).await?;

    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    assert_eq!(count(&events, "gate_checked"), 1);
    Ok(())
}

/// A copy that takes every policy check and never answers (broken, or hostile with the
/// policy's own seed) cannot keep a run waiting: after 7 takes the run ends `blocked`,
/// saying which check was never answered.
#[tokio::test]
async fn a_check_taken_again_and_again_and_never_answered_blocks_the_run() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    let taker = stack.nats.bus_as(dispatch_bus::Identity::Policy).await?;
    let takes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn({
        let (takes, shutdown) = (takes.clone(), shutdown.clone());
        async move {
            dispatch_bus::ask::serve(
                &taker,
                dispatch_bus::subject::ask::POLICY,
                dispatch_bus::subject::ask::POLICY_GROUP,
                4,
                shutdown,
                move |_| {
                    takes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async {}
                },
            )
            .await
        }
    });
    stack.add_with("dispatcher", &["--lease-ms", "500"]).await?;
    let plan = "#+TITLE: Never answered\n* TODO Count once\n  - call: test.count {\"key\": \"unanswered\"}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 0).await?;

    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert_eq!(
        end.reason,
        "the policy check of call l0-t0-c0: taken 7 times and never answered"
    );
    assert_eq!(takes.load(std::sync::atomic::Ordering::SeqCst), 7);
    assert_eq!(count(&events, "policy_decided"), 0);
    assert!(stack.counted("unanswered").is_empty(), "the call never ran");
    shutdown.cancel();
    serving.await??;
    Ok(())
}
