//! Schedule-fire lateness: how long after its intended time a fire's goal is stored,
//! with `SCHEDULES` active schedules all due in the same second (the worst burst), over
//! `ROUNDS` rounds; against raw JetStream: a timer that wakes at the same instants and
//! stores as many messages at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dispatch_bus::{Bus, streams, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{AddScheduleRequest, Overlap, Schedule};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_testkit::{NatsServer, Service};
use futures::StreamExt;
use prost::Message as _;
use serde_json::json;

use crate::{Results, percentile, verdict};

const SCHEDULES: usize = 1000;
/// Every five seconds, at the same second for all of them.
const EXPRESSION: &str = "*/5 * * * * * *";
const PERIOD_MS: i64 = 5000;
const ROUNDS: usize = 3;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

pub async fn run(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    // Raw: wake at a boundary, store SCHEDULES messages at once, time each store.
    let js = bus.jetstream();
    let mut raw = Vec::new();
    for _ in 0..ROUNDS {
        let due = (now_ms() / PERIOD_MS + 1) * PERIOD_MS;
        tokio::time::sleep(Duration::from_millis((due - now_ms()).max(0) as u64)).await;
        let acks = futures::future::join_all((0..SCHEDULES).map(|i| {
            let js = js.clone();
            async move {
                let ack = js
                    .publish(
                        format!("bench.fire.{i}"),
                        bytes::Bytes::from_static(b"fire"),
                    )
                    .await?;
                ack.await?;
                anyhow::Ok(now_ms() - due)
            }
        }))
        .await;
        for late in acks {
            raw.push(late? as f64);
        }
    }

    let scheduler = Service::start("scheduler", nats, workspace, &[]).await?;
    for i in 0..SCHEDULES {
        let reply: Reply<Schedule> = bus
            .request_json(
                subject::schedule::add(),
                &AddScheduleRequest {
                    expression: EXPRESSION.into(),
                    goal: format!("bench fire {i}"),
                    overlap: Overlap::Allow as i32,
                    ..Default::default()
                },
                Duration::from_secs(10),
            )
            .await?;
        reply.map_err(|e| anyhow::anyhow!("add a schedule: {e}"))?;
    }
    let started = now_ms();
    let wanted = SCHEDULES * ROUNDS;
    // The fires of the first ROUNDS full periods after every schedule was added.
    let first = (started / PERIOD_MS + 1) * PERIOD_MS;
    let last = first + (ROUNDS as i64 - 1) * PERIOD_MS;
    tokio::time::sleep(Duration::from_millis((last - now_ms() + 3000).max(0) as u64)).await;
    let lateness = stored_lateness(bus, first, last).await?;
    drop(scheduler);
    anyhow::ensure!(
        lateness.len() == wanted,
        "{} fires stored between {first} and {last}, not {wanted}",
        lateness.len()
    );
    let (p50, p99) = (percentile(&lateness, 50.0), percentile(&lateness, 99.0));
    let (raw50, raw99) = (percentile(&raw, 50.0), percentile(&raw, 99.0));
    lines.push(format!(
        "schedules fire lateness, {SCHEDULES} schedules due in the same second, {ROUNDS} rounds: p50 {p50:.0} ms, p99 {p99:.0} ms | raw timer + {SCHEDULES} stores p50 {raw50:.0} ms, p99 {raw99:.0} ms (target p99 < 1000 ms: {})",
        verdict(p99 < 1000.0)
    ));
    results.insert(
        "schedules".into(),
        json!({
            "schedules": SCHEDULES,
            "rounds": ROUNDS,
            "fire_lateness_ms": {"p50": p50, "p99": p99},
            "raw_lateness_ms": {"p50": raw50, "p99": raw99},
        }),
    );
    Ok(())
}

/// For each goal a schedule stored for a fire time in `[first, last]`: the time the
/// server stored it minus that fire time (its run id's time), in ms.
async fn stored_lateness(bus: &Bus, first: i64, last: i64) -> Result<Vec<f64>> {
    let stream = bus.jetstream().get_stream(streams::GOALS).await?;
    let end = stream.get_info().await?.state.last_sequence;
    let consumer = stream
        .create_consumer(
            dispatch_bus::async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject::GOALS_ALL.into(),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut lateness = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (seq, stored) = (info.stream_sequence, info.published);
        let goal = SubmitGoal::decode(message.payload.as_ref())?;
        let id = uuid::Uuid::parse_str(&goal.run_id)?;
        let (secs, nanos) = id.get_timestamp().context("a v7 id")?.to_unix();
        let intended = secs as i64 * 1000 + i64::from(nanos / 1_000_000);
        if (first..=last).contains(&intended) {
            let stored_ms = (stored.unix_timestamp_nanos() / 1_000_000) as i64;
            lateness.push((stored_ms - intended) as f64);
        }
        if seq >= end {
            break;
        }
    }
    Ok(lateness)
}
