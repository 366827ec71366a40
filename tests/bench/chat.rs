//! What a chat turn costs Dispatch beyond the model's own time: its place in the
//! conversation (compare-and-set on the head), the wait (the turn before it read), the
//! drain (a ledger request), the context (earlier turns read from their logs, or from
//! the dispatcher's cache of finished turns) and the turn's own events, with the
//! offline model answering in microseconds. Measured at the start of a conversation
//! and again after 500 turns, beside a one-leaf planned run on the same stack: the
//! context must cost the same at turn 500 as at turn 5 (it is bounded by the history
//! budget, and finished turns are read once).

use std::time::Instant;

use anyhow::Result;
use dispatch_bus::Bus;
use dispatch_proto::run::v1::run_event::Body;
use dispatch_runlog::submit::Goal;
use dispatch_runlog::turn::Busy;
use serde_json::{Value, json};

use crate::{Results, Stack, percentile};

/// Turns in the long conversation.
const TURNS: usize = 500;
/// Turns (and planned runs) measured at each end.
const WINDOW: usize = 10;

/// One turn of `conversation`: its time from the goal stored to its end, and how many
/// earlier turns its context holds (and how many it leaves out).
async fn one_turn(bus: &Bus, conversation: &str, n: usize) -> Result<(f64, u64, u64)> {
    let goal =
        Goal::new(&format!("Message number {n}"), conversation, 0, "bench")?.turn(Busy::Queue);
    let mut context = (0, 0);
    let took = crate::tools::watch_goal(bus, goal, |_, body| {
        if let Body::TurnContext(c) = body {
            context = (c.earlier_run_ids.len() as u64, c.left_out);
        }
    })
    .await?;
    Ok((took.as_secs_f64() * 1e3, context.0, context.1))
}

pub async fn run(
    bus: &Bus,
    nats: &dispatch_testkit::NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let stack = Stack::start(nats, workspace).await?;
    let planned_goal = crate::tools::plan(0);
    crate::tools::watch_run(bus, &planned_goal, |_, _| {}).await?;
    let mut planned = Vec::new();
    for _ in 0..WINDOW {
        planned.push(
            crate::tools::watch_run(bus, &planned_goal, |_, _| {})
                .await?
                .as_secs_f64()
                * 1e3,
        );
    }
    let load_before = crate::load_average();
    let started = Instant::now();
    let (mut early, mut late) = (Vec::new(), Vec::new());
    let mut last_context = (0, 0);
    for n in 1..=TURNS {
        let (ms, earlier, left_out) = one_turn(bus, "bench-chat", n).await?;
        if n <= WINDOW {
            early.push(ms);
        }
        if n > TURNS - WINDOW {
            late.push(ms);
        }
        last_context = (earlier, left_out);
    }
    let seconds = started.elapsed().as_secs_f64();
    let load_after = crate::load_average();
    let (planned_p50, early_p50, late_p50) = (
        percentile(&planned, 50.0),
        percentile(&early, 50.0),
        percentile(&late, 50.0),
    );
    let ratio = late_p50 / early_p50;
    lines.push(format!(
        "chat      a turn's overhead (goal stored → turn ended, offline model): p50 {early_p50:.1} ms at turns 1-{WINDOW}, {late_p50:.1} ms at turns {}-{TURNS} ({ratio:.2}×; its context held {} earlier turns, {} left out), beside {planned_p50:.1} ms for a one-leaf planned run; {TURNS} turns one after another in {seconds:.1} s",
        TURNS - WINDOW + 1,
        last_context.0,
        last_context.1,
    ));
    let value: Value = json!({
        "turns": TURNS, "window": WINDOW,
        "early_p50_ms": early_p50, "late_p50_ms": late_p50, "late_to_early": ratio,
        "planned_run_p50_ms": planned_p50,
        "last_context_turns": last_context.0, "last_left_out": last_context.1,
        "load_before": load_before, "load_after": load_after,
    });
    results.insert("chat".into(), value);
    stack.kill().await
}
