//! The permission gate's costs.
//!
//! - What a policy decision adds to a tool call: the time from the call's request
//!   being stored to its decision being stored (the dispatcher's policy command, the
//!   policy service reading the run's log, deciding, and appending), read off a live
//!   subscription to the run log, for every call of runs that make `CALLS` calls.
//! - What waiting costs: `WAITING` runs each stopped at an approval request at once,
//!   against a dispatcher allowed `--max-runs 32`: they must all reach their request
//!   (a waiting run gives its slot back), and the dispatcher's memory growth is read
//!   from `/proc`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dispatch_bus::{Bus, subject};
use dispatch_proto::run::v1::{RunEvent, run_event::Body};
use dispatch_testkit::{NatsServer, Service};
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};

use crate::{Results, Stack, percentile, rss_kib, tools, verdict};

const CALLS: usize = 20;
const ROUNDS: usize = 10;
const WAITING: usize = 200;

/// Runs `goal` to its end; for each of its calls, how long after its request was
/// stored its decision was, in milliseconds.
async fn decision_times(bus: &Bus, goal: &str) -> Result<Vec<f64>> {
    let mut requested: HashMap<String, Instant> = HashMap::new();
    let mut times = Vec::new();
    tools::watch_run(bus, goal, |at, body| match body {
        Body::ToolCallRequested(r) => {
            requested.insert(r.call_id.clone(), at);
        }
        Body::PolicyDecided(d) => {
            if let Some(asked) = requested.get(&d.call_id) {
                times.push(at.duration_since(*asked).as_secs_f64() * 1e3);
            }
        }
        _ => {}
    })
    .await?;
    Ok(times)
}

pub async fn run(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let stack = Stack::start(nats, workspace).await?;
    let plan = tools::plan(CALLS);
    decision_times(bus, &plan).await?; // warm-up
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        times.extend(decision_times(bus, &plan).await?);
    }
    stack.kill().await?;
    let (p50, p99) = (percentile(&times, 50.0), percentile(&times, 99.0));
    lines.push(format!(
        "gate      a policy decision adds {p50:.2} ms p50 ({p99:.2} ms p99) to a tool call: request stored → decision stored, {} calls (target ≤ 1 ms p50: {})",
        times.len(),
        verdict(p50 <= 1.0)
    ));

    let waiting = waiting(nats, workspace).await?;
    let growth_mib = waiting.grown_kib as f64 / 1024.0;
    lines.push(format!(
        "gate      (small stack: policy, connectors, dispatcher) {WAITING} runs waiting for approval at once on a dispatcher with --max-runs 32: all reached their request in {:.1} s; the dispatcher grew {growth_mib:.1} MiB ({:.0} KiB per waiting run; target < 50 MB: {})",
        waiting.took.as_secs_f64(),
        waiting.grown_kib as f64 / WAITING as f64,
        verdict(growth_mib * 1.048_576 < 50.0)
    ));
    let value: Value = json!({
        "decision_p50_ms": p50, "decision_p99_ms": p99, "decisions": times.len(),
        "decision_target_met": p50 <= 1.0,
        "waiting_runs": WAITING, "waiting_seconds": waiting.took.as_secs_f64(),
        "dispatcher_growth_kib": waiting.grown_kib,
        "waiting_target_met": growth_mib * 1.048_576 < 50.0,
    });
    results.insert("gate".into(), value);
    Ok(())
}

struct Waiting {
    took: Duration,
    grown_kib: u64,
}

/// `WAITING` runs stopped at an approval each; the dispatcher's growth meanwhile.
async fn waiting(nats: &NatsServer, workspace: &std::path::Path) -> Result<Waiting> {
    let policy = workspace.join("bench-gate-policy.json");
    std::fs::write(
        &policy,
        r#"{"default": "ask", "rules": [
          {"name": "reads", "effect": "allow", "risk": ["read"]},
          {"name": "run-writes", "effect": "allow", "risk": ["write"], "when": {"path_prefix": ["scratch/"]}},
          {"name": "erasing", "effect": "ask", "tools": ["test.erase"]}
        ]}"#,
    )?;
    let policy = policy.to_str().context("utf-8")?;
    let mut services = vec![
        Service::start("policy", nats, workspace, &["--policy", policy]).await?,
        Service::start("connectors", nats, workspace, &["--test-tools"]).await?,
        Service::start("dispatcher", nats, workspace, &["--max-runs", "32"]).await?,
    ];
    let bus = nats.bus().await?;
    let dispatcher = services[2].pid();
    // One plain run first, so the dispatcher's pools and caches exist before measuring.
    tools::watch_run(&bus, &tools::plan(1), |_, _| {}).await?;
    let mut events = bus.client().subscribe(subject::RUNS_ALL).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(dispatcher, "VmRSS");

    let started = Instant::now();
    for i in 0..WAITING {
        let plan = format!(
            "#+TITLE: Wait {i}\n* TODO Erase\n  - call: test.erase {{\"key\": \"bench-{i}\"}}\n  :done-when: true\n"
        );
        let goal = dispatch_runlog::submit::Goal::new(&plan, "default", 600_000, "bench")?;
        dispatch_runlog::submit::submit_goal(&bus, goal).await?;
    }
    wait_for(&mut events, WAITING, |b| {
        matches!(b, Body::ApprovalRequested(_))
    })
    .await?;
    let took = started.elapsed();
    // Let the waits settle into their steady state before reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(dispatcher, "VmRSS");
    for service in &mut services {
        service.kill().await?;
    }
    Ok(Waiting {
        took,
        grown_kib: after.saturating_sub(before),
    })
}

/// Waits until `n` events `pick` accepts have gone by.
async fn wait_for(
    events: &mut dispatch_bus::async_nats::Subscriber,
    n: usize,
    pick: impl Fn(&Body) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut seen = 0;
    while seen < n {
        let message = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("only {seen} of {n} events within 180 s"))?
            .context("subscription ended")?;
        if let Ok(RunEvent {
            body: Some(body), ..
        }) = RunEvent::decode(message.payload.as_ref())
            && pick(&body)
        {
            seen += 1;
        }
    }
    Ok(())
}
