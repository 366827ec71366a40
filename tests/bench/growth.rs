//! Growth: what one more run costs as the log grows. A fresh nats-server and stack;
//! the log is filled with sealed finished runs (written straight into it, as
//! `dispatch_tests::seed_finished_runs` does) up to each level, and at each level the
//! ack latency, the end-to-end rate and the ledger's CPU per event are measured.
//! Flat figures across the levels are the goal.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{ListRunsRequest, ListRunsResponse};
use dispatch_testkit::Service;
use serde_json::{Value, json};

/// Runs in the log at which the figures are taken.
pub const LEVELS: [usize; 3] = [1_000, 10_000, 50_000];
const ACK_SAMPLES: usize = 200;
const E2E_RUNS: usize = 300;

pub async fn run(lines: &mut Vec<String>) -> Result<Value> {
    let (nats, workspace, bus) =
        super::fresh_server("dispatch-bench-growth-", Default::default()).await?;
    let mut services = Vec::new();
    for name in ["ledger", "policy", "connectors", "dispatcher", "ingress"] {
        let args: &[&str] = match name {
            "dispatcher" => &["--max-runs", "512"],
            "ingress" => &["--listen", "127.0.0.1:0"],
            _ => &[],
        };
        services.push(Service::start(name, &nats, workspace.path(), args).await?);
    }
    let ledger_pid = services[0].pid();
    let http_addr = services[4].health().detail["http_addr"]
        .as_str()
        .context("ingress address")?
        .to_owned();
    let key = dispatch_tests::api_key(workspace.path())?;

    let mut in_log = 0;
    let mut figures = Vec::new();
    for level in LEVELS {
        let started = Instant::now();
        while in_log < level {
            let n = (level - in_log).min(5_000);
            let ids: Vec<RunId> = (0..n).map(|_| RunId::new()).collect();
            dispatch_tests::seed_finished_runs(&bus, workspace.path(), &ids, "default", 60).await?;
            in_log += n;
        }
        let seeded_in = started.elapsed();
        settle(&bus).await?;

        let raw = super::raw_publish_latencies(&bus, ACK_SAMPLES, super::PAYLOAD).await?;
        let ack = super::post_latencies(&http_addr, &key, ACK_SAMPLES).await?;
        in_log += ACK_SAMPLES;
        settle(&bus).await?;

        let cpu_before = super::cpu_ns(ledger_pid);
        let events_before = super::stream_last_seq(&bus, streams::RUNS).await?
            + super::stream_last_seq(&bus, streams::GOALS).await?;
        let (rate, _) = super::e2e_rate(&bus, E2E_RUNS).await?;
        in_log += E2E_RUNS;
        settle(&bus).await?;
        let events = super::stream_last_seq(&bus, streams::RUNS).await?
            + super::stream_last_seq(&bus, streams::GOALS).await?
            - events_before;
        let cpu_us_per_event =
            (super::cpu_ns(ledger_pid) - cpu_before) as f64 / 1000.0 / events as f64;

        let (ack_p50, raw_p50) = (super::percentile(&ack, 50.0), super::percentile(&raw, 50.0));
        lines.push(format!(
            "growth    (small stack: ledger, policy, connectors, dispatcher, ingress) {level:>6} runs in the log: ack p50 {ack_p50:.3} ms with the stack running the acked goals ({:.2}x raw {raw_p50:.3} ms), e2e {rate:.0} runs/s, ledger {cpu_us_per_event:.0} µs CPU/event (seeded in {:.0} s)",
            ack_p50 / raw_p50,
            seeded_in.as_secs_f64()
        ));
        figures.push(json!({
            "runs_in_log": level, "ack_p50_ms": ack_p50, "raw_p50_ms": raw_p50,
            "ack_ratio": ack_p50 / raw_p50, "e2e_runs_per_s": rate,
            "ledger_cpu_us_per_event": cpu_us_per_event, "events_measured": events,
        }));
    }
    if let (Some(first), Some(last)) = (figures.first(), figures.last()) {
        let growth = last["ledger_cpu_us_per_event"].as_f64().unwrap_or(0.0)
            / first["ledger_cpu_us_per_event"].as_f64().unwrap_or(1.0);
        lines.push(format!(
            "growth    ledger CPU/event at {} runs is {growth:.2}x that at {} (target: flat, ≤ 1.5x: {})",
            LEVELS[LEVELS.len() - 1],
            LEVELS[0],
            super::verdict(growth <= 1.5)
        ));
    }
    for mut service in services {
        service.kill().await?;
    }
    Ok(json!({ "levels": figures }))
}

/// Waits until no run is live and the ledger has caught up ([`super::caught_up`]).
async fn settle(bus: &Bus) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        super::caught_up(bus).await?;
        let live: Option<ListRunsResponse> = bus
            .request_json::<_, Reply<ListRunsResponse>>(
                subject::query::runs(),
                &ListRunsRequest {
                    limit: Some(1),
                    ..Default::default()
                },
                Duration::from_secs(5),
            )
            .await
            .ok()
            .and_then(|r| r.ok());
        if live.is_some_and(|l| l.runs.is_empty()) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "runs were still live after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
