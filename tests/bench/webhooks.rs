//! Webhook → 202 latency: requests to a service run's hook (`/hooks/{account}/{agent}/
//! {channel}`, shared secret checked, envelope built, wake goal stored), one at a time,
//! against raw JetStream publish + ack of a message of the same size, in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dispatch_bus::{Bus, streams};
use dispatch_proto::run::v1::{Listener, ServiceSpec};
use dispatch_runlog::submit::{Goal, submit_goal};
use dispatch_testkit::{NatsServer, Service};
use serde_json::json;
use sha2::Digest as _;

use crate::{Results, percentile};

const SAMPLES: usize = 1000;
const SECRET: &str = "bench-hook-secret";
const BODY: &str = r#"{"action": "opened", "number": 1}"#;

pub async fn run(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    // Earlier sections' goals (the schedules' fires) would queue ahead of the service.
    let goals = bus.jetstream().get_stream(streams::GOALS).await?;
    goals.purge().await?;
    let dispatcher = Service::start("dispatcher", nats, workspace, &[]).await?;
    let ingress = Service::start("ingress", nats, workspace, &["--listen", "127.0.0.1:0"]).await?;
    let http_addr = ingress.health().detail["http_addr"]
        .as_str()
        .context("ingress address")?
        .to_owned();
    let spec = ServiceSpec {
        listeners: vec![Listener {
            hook: "bench/svc/hook".into(),
            secret_sha256: sha2::Sha256::digest(SECRET.as_bytes()).to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let goal = Goal::new("bench wake", "default", 0, "cli")?.with_service(spec)?;
    submit_goal(bus, goal).await?;
    let http = reqwest::Client::new();
    let url = format!("http://{http_addr}/hooks/bench/svc/hook");
    let send = || {
        http.post(&url)
            .header("x-dispatch-secret", SECRET)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
    };
    // Ready once the dispatcher has stored the hook.
    let ready = Instant::now() + Duration::from_secs(30);
    while send().await?.status() != 202 {
        if Instant::now() > ready {
            bail!("the bench service's hook never answered 202");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hooks = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let answer = send().await?;
        if answer.status() != 202 {
            bail!("the hook answered {}", answer.status());
        }
        hooks.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(ingress);
    drop(dispatcher);
    // Raw: publish + ack of a goal-sized message (the envelope is most of a wake's goal).
    let raw = crate::raw_publish_latencies(bus, SAMPLES, 600).await?;
    let (p50, p99) = (percentile(&hooks, 50.0), percentile(&hooks, 99.0));
    let (raw50, raw99) = (percentile(&raw, 50.0), percentile(&raw, 99.0));
    lines.push(format!(
        "webhook   POST /hooks/… → 202, shared secret checked, one at a time: p50 {p50:.3} ms, p99 {p99:.3} ms | raw publish+ack p50 {raw50:.3} ms, p99 {raw99:.3} ms | p50 ratio {:.2}x",
        p50 / raw50
    ));
    results.insert(
        "webhooks".into(),
        json!({
            "samples": SAMPLES, "p50_ms": p50, "p99_ms": p99,
            "raw_p50_ms": raw50, "raw_p99_ms": raw99, "p50_ratio": p50 / raw50,
        }),
    );
    // The wakes stored here are not part of the other figures.
    goals.purge().await?;
    Ok(())
}
