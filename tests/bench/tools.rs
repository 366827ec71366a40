//! What Dispatch adds to one tool call, end to end: the request appended, the policy
//! command and its decision, the connector command, the call (here `files.list_files`,
//! microseconds of work) and its result in the log, and the dispatcher seeing it.
//!
//! Measured as the difference between one-leaf runs whose leaf makes `CALLS` calls and
//! runs whose leaf makes none, one run at a time, divided by `CALLS`: everything else a
//! run does (plan, leaf, gate, report, seal) cancels out. The offline model answers in
//! microseconds, so no model time is in it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dispatch_bus::{Bus, subject};
use dispatch_proto::run::v1::{RunEvent, RunStatus, run_event::Body};
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};

use crate::{Results, Stack, percentile, verdict};

/// Calls in the leaf of the measured runs.
const CALLS: usize = 20;
/// Runs of each kind, alternating.
const ROUNDS: usize = 15;

/// A one-leaf plan whose leaf makes `calls` reads.
pub fn plan(calls: usize) -> String {
    let mut plan = String::from("#+TITLE: Calls\n* TODO Call the tools\n");
    for _ in 0..calls {
        plan.push_str("  - call: files.list_files {\"path\": \"scratch\"}\n");
    }
    plan.push_str("  :done-when: true\n");
    plan
}

/// Submits `goal` and waits for its run to end `done`; the time that took.
async fn one_run(bus: &Bus, goal: &str) -> Result<Duration> {
    watch_run(bus, goal, |_, _| {}).await
}

/// Submits `goal`, hands each of its run's events to `seen` with the moment it
/// arrived, and waits for the run to end `done`; the time that took.
pub async fn watch_run(
    bus: &Bus,
    goal: &str,
    seen: impl FnMut(Instant, &Body),
) -> Result<Duration> {
    let goal = dispatch_runlog::submit::Goal::new(goal, "default", 0, "bench")?;
    watch_goal(bus, goal, seen).await
}

/// [`watch_run`] for a goal made by the caller (a chat turn, say).
pub async fn watch_goal(
    bus: &Bus,
    goal: dispatch_runlog::submit::Goal,
    mut seen: impl FnMut(Instant, &Body),
) -> Result<Duration> {
    let mut events = bus.client().subscribe(subject::RUNS_ALL).await?;
    let started = Instant::now();
    let run_id = dispatch_runlog::submit::submit_goal(bus, goal)
        .await?
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("the run did not finish within 60 s")?
            .context("subscription ended")?;
        let at = Instant::now();
        let Ok(RunEvent {
            run_id: id,
            body: Some(body),
            ..
        }) = RunEvent::decode(message.payload.as_ref())
        else {
            continue;
        };
        if id != run_id {
            continue;
        }
        seen(at, &body);
        if let Body::RunFinished(finished) = body {
            anyhow::ensure!(
                finished.status == RunStatus::Done as i32,
                "run {id} ended {}: {}",
                finished.status().word(),
                finished.reason
            );
            return Ok(started.elapsed());
        }
    }
}

pub async fn run(
    bus: &Bus,
    nats: &dispatch_testkit::NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let stack = Stack::start(nats, workspace).await?;
    let (without, with) = (plan(0), plan(CALLS));
    // One of each first, to warm caches and connections.
    one_run(bus, &without).await?;
    one_run(bus, &with).await?;
    let (mut base, mut called) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(one_run(bus, &without).await?.as_secs_f64() * 1e3);
        called.push(one_run(bus, &with).await?.as_secs_f64() * 1e3);
    }
    let (base_p50, called_p50) = (percentile(&base, 50.0), percentile(&called, 50.0));
    let per_call = (called_p50 - base_p50) / CALLS as f64;
    lines.push(format!(
        "tools     {per_call:.2} ms per tool call end to end (request → policy → connector → result in the log → dispatcher), from a run with {CALLS} calls (p50 {called_p50:.1} ms) against one with none (p50 {base_p50:.1} ms), {ROUNDS} of each, one at a time (target < 2 ms: {})",
        verdict(per_call < 2.0)
    ));
    let value: Value = json!({
        "calls_per_run": CALLS, "rounds": ROUNDS,
        "run_without_calls_p50_ms": base_p50, "run_with_calls_p50_ms": called_p50,
        "per_call_ms": per_call, "target_met": per_call < 2.0,
    });
    results.insert("tools".into(), value);
    stack.kill().await
}
