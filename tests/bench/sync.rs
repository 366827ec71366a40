//! What the sync policy costs: for `always` (fsync before every ack, the single-server
//! default) and nats-server's own 2-minute interval, each on a fresh server of its own,
//! raw JetStream publish + ack latency and throughput, the run log's append throughput,
//! and POST /v1/goals → 202 through ingress.

use anyhow::{Context, Result};
use dispatch_bus::durability::SyncPolicy;
use dispatch_testkit::Service;
use serde_json::json;

use crate::{
    ACK_SAMPLES, PAYLOAD, Results, fresh_server, percentile, post_latencies, raw_publish_latencies,
    raw_publish_rate, runlog_append_rate,
};

pub async fn run(lines: &mut Vec<String>, results: &mut Results) -> Result<()> {
    let mut figures = serde_json::Map::new();
    for policy in [
        SyncPolicy::Always,
        SyncPolicy::Every(std::time::Duration::from_secs(120)),
    ] {
        let (nats, workspace, bus) = fresh_server("dispatch-bench-sync-", policy).await?;
        let raw = raw_publish_latencies(&bus, ACK_SAMPLES, PAYLOAD).await?;
        let raw_rate = raw_publish_rate(&bus).await?;
        let log_rate = runlog_append_rate(&bus).await?;
        let ingress = Service::start(
            "ingress",
            &nats,
            workspace.path(),
            &["--listen", "127.0.0.1:0"],
        )
        .await?;
        let addr = ingress.health().detail["http_addr"]
            .as_str()
            .context("ingress address")?
            .to_owned();
        let key = dispatch_tests::api_key(workspace.path())?;
        let ack = post_latencies(&addr, &key, ACK_SAMPLES).await?;
        let (raw_p50, raw_p99) = (percentile(&raw, 50.0), percentile(&raw, 99.0));
        let (ack_p50, ack_p99) = (percentile(&ack, 50.0), percentile(&ack, 99.0));
        lines.push(format!(
            "sync {:<6} raw publish+ack p50 {raw_p50:.3} ms, p99 {raw_p99:.3} ms, {raw_rate:.0} msgs/s (8 writers) | run log {log_rate:.0} events/s | POST /v1/goals p50 {ack_p50:.3} ms, p99 {ack_p99:.3} ms",
            policy.to_string()
        ));
        figures.insert(
            policy.to_string(),
            json!({
                "raw_p50_ms": raw_p50, "raw_p99_ms": raw_p99, "raw_per_s": raw_rate,
                "runlog_events_per_s": log_rate, "post_p50_ms": ack_p50, "post_p99_ms": ack_p99,
            }),
        );
    }
    results.insert("sync".into(), serde_json::Value::Object(figures));
    Ok(())
}
