//! What exporting traces and metrics costs: end-to-end throughput of the e2e section's
//! load (one-leaf runs POSTed to ingress) with OTLP export off, and with every service
//! exporting spans and metrics to an OTLP/HTTP receiver in this process, each on a
//! fresh server. The goal is to stay within 10% of export off.

use anyhow::Result;
use dispatch_bus::durability::SyncPolicy;
use dispatch_tests::otlp::Receiver;
use serde_json::json;

use crate::{Results, Stack, caught_up, e2e_http, fresh_server, verdict};

const RUNS: usize = 1000;
const CONCURRENCY: usize = 64;

pub async fn run(lines: &mut Vec<String>, results: &mut Results) -> Result<()> {
    let mut rates = Vec::new();
    for export in [false, true] {
        let (nats, workspace, bus) =
            fresh_server("dispatch-bench-telemetry-", SyncPolicy::default()).await?;
        let receiver = Receiver::start().await?;
        let env = if export { receiver.env() } else { Vec::new() };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let stack = Stack::start_with_env(&nats, workspace.path(), &env).await?;
        let load = e2e_http(&bus, &stack.http_addr, &stack.key, RUNS, CONCURRENCY).await?;
        caught_up(&bus).await?;
        let spans = receiver.spans().len();
        stack.kill().await?;
        rates.push((load.rate(), spans));
    }
    let [(off, _), (on, spans)] = rates[..] else {
        unreachable!("two loads")
    };
    let ratio = on / off;
    lines.push(format!(
        "telemetry export off {off:.0} runs/s, on {on:.0} runs/s ({:.0}% of off; {spans} spans received) ({RUNS} one-leaf runs, {CONCURRENCY} at a time) (target ≥ 90%: {})",
        ratio * 100.0,
        verdict(ratio >= 0.9)
    ));
    results.insert(
        "telemetry".into(),
        json!({
            "runs": RUNS, "concurrency": CONCURRENCY,
            "off_runs_per_s": off, "on_runs_per_s": on, "ratio": ratio,
            "spans_received": spans, "target_met": ratio >= 0.9,
        }),
    );
    Ok(())
}
