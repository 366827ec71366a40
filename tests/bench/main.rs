//! `cargo xtask bench`: Dispatch's speed and memory, each figure beside raw JetStream
//! measured in the same run on the same nats-server. Prints a table and writes
//! `<target dir>/bench/results.json`. Figures, not assertions: a shared machine is noisy.

mod growth;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dispatch_bus::{Bus, RunId, subject};
use dispatch_proto::run::v1::{LeafStarted, RunEvent, run_event::Body};
use dispatch_runlog::RunLog;
use dispatch_testkit::{NatsServer, Service};
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};

const ACK_SAMPLES: usize = 2000;
const APPEND_WRITERS: usize = 8;
const APPENDS_PER_WRITER: usize = 1000;
const E2E_RUNS: usize = 2000;
const PAYLOAD: usize = 256;

#[tokio::main]
async fn main() -> Result<()> {
    let (nats, workspace, bus) = fresh_server("dispatch-bench-").await?;
    let mut results = serde_json::Map::new();
    let mut lines = Vec::new();

    // 1. Ack latency: POST /v1/goals → 202, against a raw publish + ack.
    let raw = raw_publish_latencies(&bus, ACK_SAMPLES).await?;
    let ingress = Service::start(
        "ingress",
        &nats,
        workspace.path(),
        &["--listen", "127.0.0.1:0"],
    )
    .await?;
    let http_addr = ingress.health().detail["http_addr"]
        .as_str()
        .context("ingress address")?
        .to_owned();
    let key = dispatch_tests::api_key(workspace.path())?;
    let ack = post_latencies(&http_addr, &key, ACK_SAMPLES).await?;
    let (raw_p50, raw_p99) = (percentile(&raw, 50.0), percentile(&raw, 99.0));
    let (ack_p50, ack_p99) = (percentile(&ack, 50.0), percentile(&ack, 99.0));
    let ratio = ack_p50 / raw_p50;
    lines.push(format!(
        "ack       POST /v1/goals p50 {ack_p50:.3} ms, p99 {ack_p99:.3} ms | raw publish+ack p50 {raw_p50:.3} ms, p99 {raw_p99:.3} ms | p50 ratio {ratio:.2}x (target ≤ 3x, p99 < 10 ms: {})",
        verdict(ratio <= 3.0 && ack_p99 < 10.0)
    ));
    results.insert(
        "ack".into(),
        json!({
            "samples": ACK_SAMPLES, "p50_ms": ack_p50, "p99_ms": ack_p99,
            "raw_p50_ms": raw_p50, "raw_p99_ms": raw_p99, "p50_ratio": ratio,
            "target_met": ratio <= 3.0 && ack_p99 < 10.0,
        }),
    );
    drop(ingress);
    purge_goals(&bus).await?;

    // 2. Append throughput: the run-log library against raw publishes, same concurrency.
    let raw_rate = raw_publish_rate(&bus).await?;
    let log_rate = runlog_append_rate(&bus).await?;
    let ratio = log_rate / raw_rate;
    lines.push(format!(
        "append    run log {log_rate:.0} events/s | raw publish {raw_rate:.0} msgs/s | ratio {:.0}% (target ≥ 50%: {})",
        ratio * 100.0,
        verdict(ratio >= 0.5)
    ));
    results.insert("append".into(), json!({
        "writers": APPEND_WRITERS, "per_writer": APPENDS_PER_WRITER,
        "events_per_s": log_rate, "raw_per_s": raw_rate, "ratio": ratio, "target_met": ratio >= 0.5,
    }));

    // 3. End-to-end runs/s for a one-leaf plan with every service running, and RSS.
    let mut services = Vec::new();
    for (name, args) in [
        ("ledger", vec!["--state-dir", "e2e-ledger"]),
        ("policy", vec![]),
        ("connectors", vec![]),
        ("dispatcher", vec!["--max-runs", "512"]),
        ("ingress", vec!["--listen", "127.0.0.1:0"]),
    ] {
        let state;
        let args: Vec<&str> = if name == "ledger" {
            state = workspace.path().join(".dispatch/state/e2e-ledger");
            vec!["--state-dir", state.to_str().unwrap()]
        } else {
            args
        };
        services.push(Service::start(name, &nats, workspace.path(), &args).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle: Vec<(String, u64)> = services
        .iter()
        .map(|s| (s.name.clone(), rss_kib(s.pid(), "VmRSS")))
        .collect();
    let (rate, elapsed) = e2e_rate(&bus, E2E_RUNS).await?;
    lines.push(format!(
        "e2e       {rate:.0} runs/s ({E2E_RUNS} one-leaf runs in {:.2} s, one copy of each service) (target ≥ 200: {})",
        elapsed.as_secs_f64(),
        verdict(rate >= 200.0)
    ));
    results.insert("e2e".into(), json!({
        "runs": E2E_RUNS, "seconds": elapsed.as_secs_f64(), "runs_per_s": rate, "target_met": rate >= 200.0,
    }));
    let mut rss = serde_json::Map::new();
    for (service, (name, idle_kib)) in services.iter().zip(idle) {
        let peak = rss_kib(service.pid(), "VmHWM");
        let idle_mb = idle_kib as f64 / 1024.0;
        lines.push(format!(
            "rss       {name:<11} idle {idle_mb:.1} MB, peak under load {:.1} MB (target idle ≤ 30 MB: {})",
            peak as f64 / 1024.0,
            verdict(idle_mb <= 30.0)
        ));
        rss.insert(name, json!({ "idle_mb": idle_mb, "peak_mb": peak as f64 / 1024.0, "target_met": idle_mb <= 30.0 }));
    }
    results.insert("rss".into(), Value::Object(rss));
    // Gone for good before the rebuild, so only the fresh ledger answers its queries.
    for mut service in services {
        service.kill().await?;
    }

    // 4. View rebuild: a fresh ledger over the whole run stream (the appends and the
    // end-to-end runs above), against a raw read of the same stream.
    let total = stream_last_seq(&bus, dispatch_bus::streams::RUNS).await?;
    let raw_read = raw_read_rate(&bus, total).await?;
    let (rebuild, whole) = rebuild_rate(&nats, workspace.path(), &bus, total).await?;
    let ratio = rebuild / raw_read;
    lines.push(format!(
        "rebuild   ledger {rebuild:.0} events/s over {total} events ({whole:.0}/s counting process start) | raw ordered read {raw_read:.0} msgs/s | ratio {:.0}% (target ≥ 50%: {})",
        ratio * 100.0,
        verdict(ratio >= 0.5)
    ));
    results.insert(
        "rebuild".into(),
        json!({
            "events": total, "events_per_s": rebuild, "events_per_s_with_start": whole,
            "raw_per_s": raw_read, "ratio": ratio, "target_met": ratio >= 0.5,
        }),
    );

    // 5. Growth: the cost of one more run at 1k, 10k and 50k runs in the log.
    let growth = growth::run(&mut lines).await?;
    results.insert("growth".into(), growth);

    println!(
        "Dispatch benchmarks (nats-server {}, same server for every raw figure)",
        nats_version()
    );
    for line in &lines {
        println!("  {line}");
    }
    // Beside the build output (`<target dir>/bench`), wherever CARGO_TARGET_DIR puts it.
    let bin = dispatch_testkit::bin_dir();
    let out = bin.parent().unwrap_or(&bin).join("bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("results.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(results))?,
    )?;
    println!("  written to {}", path.display());
    Ok(())
}

/// A nats-server of its own, an empty workspace, an admin connection, and the stream
/// the raw figures are measured on.
async fn fresh_server(prefix: &str) -> Result<(NatsServer, tempfile::TempDir, Bus)> {
    let nats = NatsServer::start().await?;
    let workspace = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let bus = nats.bus().await?;
    bus.jetstream()
        .get_or_create_stream(dispatch_bus::async_nats::jetstream::stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.>".into()],
            ..Default::default()
        })
        .await?;
    Ok((nats, workspace, bus))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn nats_version() -> String {
    dispatch_testkit::nats_server_binary()
        .ok()
        .and_then(|p| dispatch_natsbin::version_of(&p).ok())
        .map_or("?".into(), |v| v.to_string())
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i]
}

async fn raw_publish_latencies(bus: &Bus, n: usize) -> Result<Vec<f64>> {
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        bus.jetstream()
            .publish(format!("bench.latency.{}", i % 16), payload.clone())
            .await?
            .await?;
        out.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

async fn post_latencies(addr: &str, key: &str, n: usize) -> Result<Vec<f64>> {
    let http = dispatch_tests::http_client(key)?;
    let url = format!("http://{addr}/v1/goals");
    let body = json!({ "goal": "x".repeat(PAYLOAD - 12) });
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let response = http.post(&url).json(&body).send().await?;
        if response.status() != 202 {
            bail!("POST /v1/goals answered {}", response.status());
        }
        out.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// The goals POSTed for the latency figure are not part of the end-to-end figure.
async fn purge_goals(bus: &Bus) -> Result<()> {
    let stream = bus
        .jetstream()
        .get_stream(dispatch_bus::streams::GOALS)
        .await?;
    stream.purge().await?;
    Ok(())
}

async fn raw_publish_rate(bus: &Bus) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..APPEND_WRITERS {
        let js = bus.jetstream().clone();
        tasks.push(tokio::spawn(async move {
            let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
            for _ in 0..APPENDS_PER_WRITER {
                js.publish(format!("bench.append.{w}"), payload.clone())
                    .await?
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((APPEND_WRITERS * APPENDS_PER_WRITER) as f64 / started.elapsed().as_secs_f64())
}

async fn runlog_append_rate(bus: &Bus) -> Result<f64> {
    let log = RunLog::open(bus, "bench").await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..APPEND_WRITERS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut run = log.handle(RunId::new()).await?;
            for n in 0..APPENDS_PER_WRITER {
                let title = format!("{n:0>width$}", width = PAYLOAD - 40);
                run.append(
                    Body::LeafStarted(LeafStarted {
                        leaf: n as u32,
                        title,
                    }),
                    "bench",
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((APPEND_WRITERS * APPENDS_PER_WRITER) as f64 / started.elapsed().as_secs_f64())
}

async fn stream_last_seq(bus: &Bus, name: &str) -> Result<u64> {
    let mut stream = bus.jetstream().get_stream(name).await?;
    Ok(stream.info().await?.state.last_sequence)
}

async fn raw_read_rate(bus: &Bus, total: u64) -> Result<f64> {
    use dispatch_bus::async_nats::jetstream::consumer::pull::OrderedConfig;
    let stream = bus
        .jetstream()
        .get_stream(dispatch_bus::streams::RUNS)
        .await?;
    let started = Instant::now();
    let consumer = stream.create_consumer(OrderedConfig::default()).await?;
    let mut messages = consumer.messages().await?;
    let mut seen = 0u64;
    while let Some(message) = messages.next().await {
        let message = message?;
        // Decode as the ledger does, so the comparison is about the views, not parsing.
        let _ = RunEvent::decode(message.payload.as_ref());
        seen += 1;
        if message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence
            >= total
        {
            break;
        }
    }
    Ok(seen as f64 / started.elapsed().as_secs_f64())
}

/// A fresh ledger's catch-up over the run stream: the steady rate (from the first
/// progress it reports to the end, so process start-up is left out), and the rate over
/// the whole time including start-up.
async fn rebuild_rate(
    nats: &NatsServer,
    workspace: &std::path::Path,
    bus: &Bus,
    total: u64,
) -> Result<(f64, f64)> {
    let state = workspace.join(".dispatch/state/rebuild-ledger");
    let started = Instant::now();
    let _ledger = Service::start(
        "ledger",
        nats,
        workspace,
        &["--state-dir", state.to_str().unwrap()],
    )
    .await?;
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let status: Result<dispatch_ledger::api::StatusReply, _> = bus
            .request_json(subject::query::status(), &(), Duration::from_millis(500))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r: dispatch_ledger::api::Reply<_>| r.map_err(anyhow::Error::from));
        let cursor = status.as_ref().map_or(0, |s| s.runs_cursor);
        if cursor > 0 && cursor < total && first.is_none() {
            first = Some((Instant::now(), cursor));
        }
        if cursor >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let whole = total as f64 / started.elapsed().as_secs_f64();
    let steady = match first {
        Some((at, from)) => (total - from) as f64 / at.elapsed().as_secs_f64(),
        None => whole,
    };
    Ok((steady, whole))
}

async fn e2e_rate(bus: &Bus, n: usize) -> Result<(f64, Duration)> {
    let mut finished = bus.client().subscribe(subject::RUNS_ALL).await?;
    let plan = "#+TITLE: One leaf\n* TODO Leave a note\n  :done-when: test -s scratch/leaf-1.org\n";
    let started = Instant::now();
    let submitter = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let submits = futures::stream::iter(0..n).map(|_| {
                let bus = bus.clone();
                async move {
                    let goal = dispatch_runlog::submit::Goal::new(plan, "default", 0, "bench")
                        .expect("the bench goal is valid");
                    dispatch_runlog::submit::submit_goal(&bus, goal).await
                }
            });
            let results: Vec<_> = submits.buffer_unordered(64).collect().await;
            results.into_iter().collect::<Result<Vec<_>, _>>()
        })
    };
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while done < n {
        let message = tokio::time::timeout_at(deadline, finished.next())
            .await
            .context("e2e runs did not finish within 300 s")?
            .context("subscription ended")?;
        let event = RunEvent::decode(message.payload.as_ref());
        if event.is_ok_and(|e| matches!(e.body, Some(Body::RunFinished(_)))) {
            done += 1;
        }
    }
    let elapsed = started.elapsed();
    submitter.await??;
    Ok((n as f64 / elapsed.as_secs_f64(), elapsed))
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`: now, `VmHWM`: peak).
fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}
