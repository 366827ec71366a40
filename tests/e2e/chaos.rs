//! The chaos suite (`cargo xtask chaos`): while runs are in flight, SIGKILL each
//! service in turn (starting a replacement) and restart nats-server on its store.
//! Afterwards every run is terminal, every chain and seal verifies, no event is lost or
//! duplicated, and the counting tool shows no side effect executed twice.
//!
//! And `dispatch up` as the supervisor: with runs in flight, its nats-server and then
//! its dispatcher are SIGKILLed; it starts each again (nats-server on the same store
//! and port), says so, and every run ends `done`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_tests::up::{Up, signal};
use dispatch_tests::{Stack, count, finished};

/// Runs submitted before the faults start, and after each fault.
const FIRST_WAVE: usize = 12;
const PER_FAULT: usize = 3;
const LEASE: &str = "1500";

fn plan(n: usize) -> String {
    format!(
        "#+TITLE: Chaos {n}\n\
         * TODO Count and wait\n  - call: test.count {{\"key\": \"chaos\"}}\n  - call: test.sleep {{\"ms\": {}}}\n  :done-when: true\n\
         * TODO Count again\n  - call: test.count {{\"key\": \"chaos\"}}\n  - call: test.sleep {{\"ms\": {}}}\n  - call: test.count {{\"key\": \"chaos\", \"note\": \"again\"}}\n  :done-when: true\n",
        800 + (n * 137) % 1200,
        600 + (n * 53) % 900
    )
}

async fn start(stack: &mut Stack, service: &str) -> anyhow::Result<()> {
    let policy = stack.root().join("test-policy.json");
    let policy = policy.to_str().unwrap().to_owned();
    let args: Vec<&str> = match service {
        "policy" => vec!["--policy", &policy],
        "connectors" => vec!["--test-tools", "--lease-ms", LEASE],
        "dispatcher" => vec!["--lease-ms", LEASE],
        "ingress" => vec!["--listen", "127.0.0.1:0"],
        _ => vec![],
    };
    stack.add_with(service, &args).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "slow: run with `cargo xtask chaos`"]
async fn runs_survive_every_service_and_nats_being_killed() -> anyhow::Result<()> {
    let began = Instant::now();
    let mut stack = Stack::start(&[]).await?;
    stack.test_policy()?;
    for service in [
        "ledger",
        "policy",
        "policy",
        "connectors",
        "connectors",
        "dispatcher",
        "dispatcher",
        "ingress",
    ] {
        start(&mut stack, service).await?;
    }
    let mut ids: Vec<RunId> = Vec::new();
    for n in 0..FIRST_WAVE {
        ids.push(stack.submit(&plan(n), "chaos", 0).await?);
    }

    // Kill one copy of each service in turn while the runs are in flight.
    for victim in [
        "dispatcher",
        "connectors",
        "policy",
        "ledger",
        "ingress",
        "dispatcher",
    ] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let i = stack
            .services
            .iter()
            .position(|s| s.name == victim)
            .expect("running");
        let mut killed = stack.services.remove(i);
        killed.kill().await?;
        eprintln!(
            "chaos: killed {victim} ({}) at {:?}",
            killed.instance,
            began.elapsed()
        );
        start(&mut stack, victim).await?;
        for _ in 0..PER_FAULT {
            let n = ids.len();
            ids.push(stack.submit(&plan(n), "chaos", 0).await?);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.nats.restart().await?;
    eprintln!("chaos: restarted nats-server at {:?}", began.elapsed());

    let mut statuses = BTreeMap::new();
    for id in &ids {
        // Reading verifies every link and the seal.
        let events = stack.wait_finished(*id, Duration::from_secs(240)).await?;
        let end = finished(&events);
        *statuses
            .entry(RunStatus::try_from(end.status)?.word())
            .or_insert(0) += 1;
        assert!(
            !events.last().unwrap().event.signature.is_empty(),
            "run {id} is not sealed"
        );
        let unique: BTreeSet<_> = events.iter().map(|e| e.event.event_id.clone()).collect();
        assert_eq!(
            unique.len(),
            events.len(),
            "run {id}: an event is stored twice"
        );
        assert_eq!(count(&events, "run_finished"), 1);
        assert_eq!(
            count(&events, "tool_call_started"),
            count(&events, "tool_call_requested") - denied(&events)
        );
    }
    let mut executions: BTreeMap<String, usize> = BTreeMap::new();
    for line in stack.counted("chaos") {
        *executions.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "side effects executed twice: {twice:?}");
    eprintln!(
        "chaos: {} runs terminal {statuses:?}, {} counted side effects, none twice, in {:?}",
        ids.len(),
        executions.len(),
        began.elapsed()
    );
    assert_eq!(statuses.values().sum::<i32>(), ids.len() as i32);

    // The ledger, killed and restarted too, agrees with the logs.
    let want: BTreeSet<String> = ids.iter().map(RunId::to_string).collect();
    stack
        .eventually(Duration::from_secs(60), || async {
            let out = stack.cli(&["ps", "-a", "--format", "json"]).ok()?;
            let runs: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).ok()?;
            let terminal: BTreeSet<String> = runs
                .iter()
                .filter(|r| r["status"] != "queued" && r["status"] != "doing")
                .map(|r| r["run_id"].as_str().unwrap_or_default().to_owned())
                .collect();
            (terminal == want).then_some(())
        })
        .await
        .inspect_err(|_| stack.print_service_logs(40))?;
    Ok(())
}

/// Calls the policy denied never start.
fn denied(events: &[dispatch_runlog::StoredEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(&e.event.body, Some(Body::PolicyDecided(d)) if d.decision != dispatch_proto::run::v1::Decision::Allow as i32))
        .count()
}

#[tokio::test]
#[ignore = "slow: run with `cargo xtask chaos`"]
async fn dispatch_up_restarts_a_killed_nats_server_and_service_and_runs_resume()
-> anyhow::Result<()> {
    const LIMIT: Duration = Duration::from_secs(60);
    // A short lease, so a run whose dispatcher died is taken back soon; the offline
    // model paced, so runs are in flight when things die.
    let mut up = Up::start("[dispatcher]\nlease_ms = 2000\noffline_pace_ms = 100\n").await?;
    let mut runs = Vec::new();
    submit(&up, &mut runs).await?;

    // nats-server, SIGKILLed, is started again on its store and port: the runs from
    // before are still there, and the services reconnect to the same address.
    let nats = up.child_pid("nats-server").expect("up runs nats-server");
    signal(nats, "KILL")?;
    up.wait_said(
        "dispatch: nats-server exited (killed by SIGKILL); restarting it in 500ms",
        1,
        LIMIT,
    )
    .await?;
    up.wait_said("dispatch: nats-server restarted (pid", 1, LIMIT)
        .await?;
    let again = up.child_pid("nats-server");
    assert!(again.is_some() && again != Some(nats), "{}", up.said());
    // A service, SIGKILLed mid-run, is started again with its arguments; its runs
    // are taken back from the log. Killed while it runs a goal: killed before or
    // after, it has nothing to take back; a batch that ends unseen is followed by
    // another.
    let mut in_flight = false;
    for _ in 0..5 {
        submit(&up, &mut runs).await?;
        let batch = runs[runs.len() - PER_FAULT * 2..].to_vec();
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !in_flight && tokio::time::Instant::now() < deadline {
            let mut statuses = Vec::new();
            for run in &batch {
                statuses.push(up.status_of(run).await?);
            }
            in_flight = statuses.iter().any(|s| s == "doing");
            if statuses.iter().all(|s| s == "done") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if in_flight {
            break;
        }
    }
    assert!(
        in_flight,
        "no batch of runs was seen running; up said:\n{}",
        up.said()
    );
    let dispatcher = up
        .child_pid("dispatch-dispatcher")
        .expect("up runs a dispatcher");
    signal(dispatcher, "KILL")?;
    up.wait_said(
        "dispatch: dispatcher exited (killed by SIGKILL); restarting it in 500ms",
        1,
        LIMIT,
    )
    .await?;
    up.wait_said("dispatch: dispatcher restarted (pid", 1, LIMIT)
        .await?;
    submit(&up, &mut runs).await?;

    for run in &runs {
        up.wait_status(run, "done", Duration::from_secs(240))
            .await?;
    }
    let said = up.said();
    assert!(!said.contains("leaving it down"), "{said}");
    // The restarted dispatcher (its log appended to the killed one's) took over runs
    // the killed one had begun.
    let log = std::fs::read_to_string(up.workspace.path().join(".dispatch/logs/dispatcher.log"))?;
    assert!(log.contains("resuming from the log"), "{log}");
    eprintln!(
        "chaos: {} runs done under dispatch up; it said:\n{said}",
        runs.len()
    );

    up.interrupt_leaves_nothing().await?;
    Ok(())
}

/// Submits a few more goals under `up`, asking again while ingress cannot take them.
async fn submit(up: &Up, runs: &mut Vec<String>) -> anyhow::Result<()> {
    for _ in 0..PER_FAULT * 2 {
        let n = runs.len();
        let goal = format!("Tidy the shared drive, pass {n}");
        runs.push(up.submit(&goal, Duration::from_secs(60)).await?);
    }
    Ok(())
}
