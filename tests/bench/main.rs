//! `cargo xtask bench`: Dispatch's speed and memory, each figure beside raw JetStream
//! measured in the same run on the same nats-server. Prints a table and writes
//! `<target dir>/bench/results.json`. Figures, not assertions: a shared machine is noisy.

mod chat;
mod cost;
mod gate;
mod growth;
mod peer;
mod schedules;
mod streams;
mod sync;
mod telemetry;
mod tools;
mod turns;
mod webhooks;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dispatch_bus::durability::SyncPolicy;
use dispatch_bus::{Bus, RunId, subject};
use dispatch_proto::run::v1::{LeafStarted, RunEvent, RunStatus, run_event::Body};
use dispatch_runlog::RunLog;
use dispatch_testkit::{NatsServer, Service};
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};

pub(crate) const ACK_SAMPLES: usize = 2000;
const APPEND_WRITERS: usize = 8;
const APPENDS_PER_WRITER: usize = 1000;
const E2E_RUNS: usize = 2000;
const E2E_CONCURRENCY: usize = 64;
/// The offered load (POSTs per second, open loop) under which the full-stack ack
/// latency is measured, and how many goals that is.
const PACED_RATE: u64 = 200;
const PACED_RUNS: usize = 1000;
/// The runs over which what a run stores and syncs is counted, and how many at a time.
const COST_RUNS: usize = 200;
const COST_CONCURRENCY: usize = 16;
pub(crate) const PAYLOAD: usize = 256;

/// The sections, in the order they run; `cargo xtask bench e2e growth` runs only those.
const SECTIONS: [&str; 14] = [
    "ack",
    "append",
    "sync",
    "e2e",
    "telemetry",
    "tools",
    "turns",
    "chat",
    "rebuild",
    "gate",
    "streams",
    "schedules",
    "webhooks",
    "growth",
];

#[tokio::main]
async fn main() -> Result<()> {
    let mut chosen: Vec<String> = std::env::args().skip(1).collect();
    let peer = match chosen.iter().position(|a| a == "--peer") {
        None => None,
        Some(at) => {
            let name = chosen.get(at + 1).cloned().unwrap_or_default();
            if name != "restate" {
                bail!("--peer takes the peer to compare with; the one there is: restate");
            }
            chosen.drain(at..at + 2);
            Some(name)
        }
    };
    if let Some(unknown) = chosen.iter().find(|c| !SECTIONS.contains(&c.as_str())) {
        bail!(
            "no bench section {unknown:?}; the sections are {}",
            SECTIONS.join(", ")
        );
    }
    // With a peer, only the comparison runs unless sections are named too.
    let wants = |section: &str| {
        (chosen.is_empty() && peer.is_none()) || chosen.iter().any(|c| c == section)
    };
    let (nats, workspace, bus) = fresh_server("dispatch-bench-", SyncPolicy::default()).await?;
    let mut results = serde_json::Map::new();
    let mut lines = Vec::new();
    // The machine's load beside each section's figures: a figure from a busy machine
    // says less, and a ratio from rounds under different loads says nothing.
    let mut section_load: Option<(usize, f64)> = None;
    let mut mark = |lines: &mut Vec<String>, name: &str| {
        if let Some((from, before)) = section_load.take() {
            let after = load_average();
            if lines.len() > from {
                lines.push(format!("          (load {before:.2} → {after:.2})"));
            }
        }
        if !name.is_empty() {
            section_load = Some((lines.len(), load_average()));
        }
    };

    if wants("ack") {
        mark(&mut lines, "ack");
        ack_section(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("append") {
        mark(&mut lines, "append");
        append_section(&bus, &mut lines, &mut results).await?;
    }
    if wants("sync") {
        mark(&mut lines, "sync");
        sync::run(&mut lines, &mut results).await?;
    }
    if wants("e2e") {
        mark(&mut lines, "e2e");
        e2e_section(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("telemetry") {
        mark(&mut lines, "telemetry");
        telemetry::run(&mut lines, &mut results).await?;
    }
    if wants("tools") {
        mark(&mut lines, "tools");
        tools::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("turns") {
        mark(&mut lines, "turns");
        turns::run(&bus, &mut lines, &mut results).await?;
    }
    if wants("chat") {
        mark(&mut lines, "chat");
        chat::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("rebuild") {
        mark(&mut lines, "rebuild");
        rebuild_section(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("gate") {
        mark(&mut lines, "gate");
        gate::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("streams") {
        mark(&mut lines, "streams");
        streams::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("schedules") {
        mark(&mut lines, "schedules");
        schedules::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("webhooks") {
        mark(&mut lines, "webhooks");
        webhooks::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if peer.is_some() {
        mark(&mut lines, "peer");
        peer::run(&bus, &nats, workspace.path(), &mut lines, &mut results).await?;
    }
    if wants("growth") {
        mark(&mut lines, "growth");
        // The cost of one more run at 1k, 10k and 50k runs in the log.
        let growth = growth::run(&mut lines).await?;
        results.insert("growth".into(), growth);
    }

    mark(&mut lines, "");
    println!(
        "Dispatch benchmarks (nats-server {}, JetStream sync {} unless a line says otherwise, same server for every raw figure; workspaces on {})",
        nats_version(),
        SyncPolicy::default(),
        filesystem_of(&std::env::temp_dir())
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

type Results = serde_json::Map<String, Value>;

/// Ack latency: POST /v1/goals → 202 with only ingress running, against a raw publish +
/// ack.
async fn ack_section(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let raw = raw_publish_latencies(bus, ACK_SAMPLES, PAYLOAD).await?;
    let ingress = Service::start("ingress", nats, workspace, &["--listen", "127.0.0.1:0"]).await?;
    let http_addr = ingress.health().detail["http_addr"]
        .as_str()
        .context("ingress address")?
        .to_owned();
    let key = dispatch_tests::api_key(workspace)?;
    let ack = post_latencies(&http_addr, &key, ACK_SAMPLES).await?;
    let (raw_p50, raw_p99) = (percentile(&raw, 50.0), percentile(&raw, 99.0));
    let (ack_p50, ack_p99) = (percentile(&ack, 50.0), percentile(&ack, 99.0));
    let ratio = ack_p50 / raw_p50;
    lines.push(format!(
        "ack       POST /v1/goals, ingress alone, one at a time: p50 {ack_p50:.3} ms, p99 {ack_p99:.3} ms | raw publish+ack p50 {raw_p50:.3} ms, p99 {raw_p99:.3} ms | p50 ratio {ratio:.2}x (target ≤ 3x: {})",
        verdict(ratio <= 3.0)
    ));
    results.insert(
        "ack".into(),
        json!({
            "samples": ACK_SAMPLES, "p50_ms": ack_p50, "p99_ms": ack_p99,
            "raw_p50_ms": raw_p50, "raw_p99_ms": raw_p99, "p50_ratio": ratio,
            "target_met": ratio <= 3.0,
        }),
    );
    drop(ingress);
    // The goals POSTed here are not part of the end-to-end figure.
    purge_goals(bus).await
}

/// Append throughput: the run-log library against raw publishes, same concurrency.
async fn append_section(bus: &Bus, lines: &mut Vec<String>, results: &mut Results) -> Result<()> {
    let raw_rate = raw_publish_rate(bus).await?;
    let log_rate = runlog_append_rate(bus).await?;
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
    Ok(())
}

/// End to end with every service running: one-leaf goals POSTed 64 at a time (the
/// completion rate and the CPU each process spent per run), then at a paced rate (the
/// ack latency of a busy stack), and RSS.
async fn e2e_section(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let stack = Stack::start(nats, workspace).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle: Vec<(String, u64)> = stack
        .services
        .iter()
        .map(|s| (s.name.clone(), rss_kib(s.pid(), "VmRSS")))
        .collect();
    let cpu_before = stack.cpu_ns(nats);
    let load = e2e_http(bus, &stack.http_addr, &stack.key, E2E_RUNS, E2E_CONCURRENCY).await?;
    // The work a run leaves behind (its trail, its views) is part of what it costs.
    caught_up(bus).await?;
    let cpu_after = stack.cpu_ns(nats);
    let rate = load.rate();
    lines.push(format!(
        "e2e       {rate:.0} runs/s ({E2E_RUNS} one-leaf runs POSTed {E2E_CONCURRENCY} at a time, done in {:.2} s, one copy of each service) (target ≥ 200: {})",
        load.elapsed.as_secs_f64(),
        verdict(rate >= 200.0)
    ));
    let (closed_p50, closed_p99) = (percentile(&load.acks, 50.0), percentile(&load.acks, 99.0));
    lines.push(format!(
        "ack       POST /v1/goals, full stack, {E2E_CONCURRENCY} clients posting back to back: p50 {closed_p50:.3} ms, p99 {closed_p99:.3} ms (mostly queueing: {E2E_CONCURRENCY} in flight)"
    ));
    let steady = e2e_paced(bus, &stack.http_addr, &stack.key, PACED_RATE, PACED_RUNS).await?;
    let (p50, p99) = (
        percentile(&steady.acks, 50.0),
        percentile(&steady.acks, 99.0),
    );
    lines.push(format!(
        "ack       POST /v1/goals, full stack running the goals, {PACED_RATE} POSTs/s offered: p50 {p50:.3} ms, p99 {p99:.3} ms (target p99 ≤ 10 ms: {})",
        verdict(p99 <= 10.0)
    ));
    let per_run: Vec<(String, f64)> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|((name, after), (_, before))| {
            (
                name.clone(),
                (after - before) as f64 / 1e6 / E2E_RUNS as f64,
            )
        })
        .collect();
    let total: f64 = per_run.iter().map(|(_, ms)| ms).sum();
    lines.push(format!(
        "cpu       {total:.2} ms per run: {} (target ≤ 3 ms: {})",
        per_run
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(total <= 3.0)
    ));
    results.insert("e2e".into(), json!({
        "runs": E2E_RUNS, "concurrency": E2E_CONCURRENCY, "seconds": load.elapsed.as_secs_f64(),
        "runs_per_s": rate, "target_met": rate >= 200.0,
        "ack_closed_loop_p50_ms": closed_p50, "ack_closed_loop_p99_ms": closed_p99,
        "ack_paced_rate": PACED_RATE, "ack_p50_ms": p50, "ack_p99_ms": p99, "ack_target_met": p99 <= 10.0,
        "cpu_ms_per_run": total, "cpu_ms_per_run_by_process": per_run.iter().map(|(n, ms)| (n.clone(), json!(ms))).collect::<serde_json::Map<_, _>>(),
        "cpu_target_met": total <= 3.0,
    }));
    let mut rss = serde_json::Map::new();
    for (service, (name, idle_kib)) in stack.services.iter().zip(idle) {
        let peak = rss_kib(service.pid(), "VmHWM");
        let idle_mb = idle_kib as f64 / 1024.0;
        lines.push(format!(
            "rss       {name:<11} idle {idle_mb:.1} MB, peak under load {:.1} MB (target idle ≤ 20 MB: {})",
            peak as f64 / 1024.0,
            verdict(idle_mb <= 20.0)
        ));
        rss.insert(name, json!({ "idle_mb": idle_mb, "peak_mb": peak as f64 / 1024.0, "target_met": idle_mb <= 20.0 }));
    }
    results.insert("rss".into(), Value::Object(rss));
    cost_pass(bus, nats, &stack, lines, results).await?;
    // Gone for good before the rebuild, so only the fresh ledger answers its queries.
    stack.kill().await
}

/// What a one-leaf run stores and syncs, counted over runs of their own (see
/// [`cost`]).
async fn cost_pass(
    bus: &Bus,
    nats: &NatsServer,
    stack: &Stack,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    // Nothing of the runs before (the paced ones) is still being relayed or folded.
    caught_up(bus).await?;
    let before = cost::stored(bus).await?;
    let counter = match nats.pid() {
        Some(pid) => cost::SyncCounter::attach(pid).await?,
        None => None,
    };
    e2e_http(
        bus,
        &stack.http_addr,
        &stack.key,
        COST_RUNS,
        COST_CONCURRENCY,
    )
    .await?;
    caught_up(bus).await?;
    // The streamer purges a finished run's chunks `--purge-after` (10 s) later: that
    // is part of what the run costs.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let fsyncs = match counter {
        Some(counter) => Some(counter.count().await? as f64 / COST_RUNS as f64),
        None => None,
    };
    let after = cost::stored(bus).await?;
    let (disk, memory, by_stream) = cost::per_run(&before, &after, COST_RUNS);
    lines.push(format!(
        "stored    {disk:.1} messages on disk and {memory:.1} in memory per one-leaf run: {} (target on disk ≤ 18: {}; the probes and the tool catalogue are written on a clock, not per run)",
        by_stream
            .iter()
            .map(|(name, in_memory, per)| format!(
                "{name} {per:.1}{}",
                if *in_memory { " (memory)" } else { "" }
            ))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(disk <= 18.0)
    ));
    lines.push(match fsyncs {
        Some(fsyncs) => format!(
            "fsyncs    {fsyncs:.1} per one-leaf run by nats-server (strace -c over {COST_RUNS} runs, {COST_CONCURRENCY} at a time) (target ≤ 20: {})",
            verdict(fsyncs <= 20.0)
        ),
        None => "fsyncs    not measured: this machine has no strace".to_owned(),
    });
    results.insert(
        "stored".into(),
        cost::json(disk, memory, &by_stream, fsyncs),
    );
    Ok(())
}

/// View rebuild: a fresh ledger over the whole run stream (whatever the sections before
/// left in it), against a raw read of the same stream.
async fn rebuild_section(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let total = stream_last_seq(bus, dispatch_bus::streams::RUNS).await?;
    if total == 0 {
        lines.push("rebuild   skipped: the run stream is empty (run it with e2e)".into());
        return Ok(());
    }
    let raw_read = raw_read_rate(bus, total).await?;
    let (rebuild, whole) = rebuild_rate(nats, workspace, bus, total).await?;
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
    Ok(())
}

/// One copy of every service, ingress on a random port, and the key to call it.
pub struct Stack {
    pub services: Vec<Service>,
    pub http_addr: String,
    pub key: String,
}

impl Stack {
    pub async fn start(nats: &NatsServer, workspace: &std::path::Path) -> Result<Self> {
        Self::start_with_env(nats, workspace, &[]).await
    }

    /// [`Self::start`] with `env` set for every service.
    pub async fn start_with_env(
        nats: &NatsServer,
        workspace: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let state = workspace.join(".dispatch/state/e2e-ledger");
        let state = state.to_str().context("state path")?;
        // The stack `dispatch up` runs: every service, the streamer and the scheduler
        // included (the streamer stores a run's chunks: leaving it out flatters the
        // figures).
        let mut services = Vec::new();
        for name in dispatch_service::SERVICES {
            let args: Vec<&str> = match name {
                "ledger" => vec!["--state-dir", state],
                "dispatcher" => vec!["--max-runs", "512"],
                "ingress" => vec!["--listen", "127.0.0.1:0"],
                _ => vec![],
            };
            services.push(Service::start_with_env(name, nats, workspace, &args, env).await?);
        }
        let ingress = services
            .iter()
            .find(|s| s.name == "ingress")
            .context("ingress runs")?;
        let http_addr = ingress.health().detail["http_addr"]
            .as_str()
            .context("ingress address")?
            .to_owned();
        let key = dispatch_tests::api_key(workspace)?;
        Ok(Self {
            services,
            http_addr,
            key,
        })
    }

    /// CPU time each service and the nats-server have used so far, in nanoseconds.
    pub fn cpu_ns(&self, nats: &NatsServer) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .services
            .iter()
            .map(|s| (s.name.clone(), cpu_ns(s.pid())))
            .collect();
        out.push(("nats-server".into(), nats.pid().map_or(0, cpu_ns)));
        out
    }

    /// Every process of the stack: the services and the nats-server.
    pub fn pids(&self, nats: &NatsServer) -> Vec<u32> {
        let mut pids: Vec<u32> = self.services.iter().map(Service::pid).collect();
        pids.extend(nats.pid());
        pids
    }

    /// CPU time the whole stack has used so far, in nanoseconds.
    pub fn cpu_total(&self, nats: &NatsServer) -> u64 {
        self.pids(nats).into_iter().map(cpu_ns).sum()
    }

    pub async fn kill(self) -> Result<()> {
        for mut service in self.services {
            service.kill().await?;
        }
        Ok(())
    }
}

/// A nats-server of its own, an empty workspace, an admin connection, and the stream
/// the raw figures are measured on.
pub(crate) async fn fresh_server(
    prefix: &str,
    sync: SyncPolicy,
) -> Result<(NatsServer, tempfile::TempDir, Bus)> {
    let nats = NatsServer::start_with_sync(sync).await?;
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

/// The type of the filesystem `path` is on (from `/proc/self/mounts`), with its
/// device, since what a run's files cost depends on it (see ARCHITECTURE.md, "What a
/// run costs"); `TMPDIR` moves the bench's workspaces.
fn filesystem_of(path: &std::path::Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), format!("{kind} ({device} at {point})")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "an unknown filesystem".into(), |(_, fs)| fs)
}

/// The machine's one-minute load average (`/proc/loadavg`), or NaN where there is none.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn nats_version() -> String {
    dispatch_testkit::nats_server_binary()
        .ok()
        .and_then(|p| dispatch_natsbin::version_of(&p).ok())
        .map_or("?".into(), |v| v.to_string())
}

pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i]
}

/// Raw JetStream: publish + ack of `n` messages of `size` bytes, one at a time (ms each).
pub(crate) async fn raw_publish_latencies(bus: &Bus, n: usize, size: usize) -> Result<Vec<f64>> {
    let payload = bytes::Bytes::from(vec![b'x'; size]);
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

pub(crate) async fn post_latencies(addr: &str, key: &str, n: usize) -> Result<Vec<f64>> {
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

pub(crate) async fn raw_publish_rate(bus: &Bus) -> Result<f64> {
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

pub(crate) async fn runlog_append_rate(bus: &Bus) -> Result<f64> {
    let log = RunLog::open(bus, "bench")
        .await?
        .writing_as(dispatch_bus::subject::LogWriter::Dispatcher);
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
        let status = ledger_status(bus, Duration::from_millis(500)).await;
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

const ONE_LEAF_PLAN: &str =
    "#+TITLE: One leaf\n* TODO Leave a note\n  :done-when: test -s scratch/leaf-1.org\n";

/// `n` one-leaf runs submitted straight to the bus, 64 at a time: runs/s and the time.
async fn e2e_rate(bus: &Bus, n: usize) -> Result<(f64, Duration)> {
    let finished = bus.client().subscribe(subject::RUNS_ALL).await?;
    let started = Instant::now();
    let submitter = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let submits = futures::stream::iter(0..n).map(|_| {
                let bus = bus.clone();
                async move {
                    let goal =
                        dispatch_runlog::submit::Goal::new(ONE_LEAF_PLAN, "default", 0, "bench")
                            .expect("the bench goal is valid");
                    dispatch_runlog::submit::submit_goal(&bus, goal).await
                }
            });
            let results: Vec<_> = submits.buffer_unordered(E2E_CONCURRENCY).collect().await;
            results.into_iter().collect::<Result<Vec<_>, _>>()
        })
    };
    count_finished(finished, n).await?;
    let elapsed = started.elapsed();
    submitter.await??;
    Ok((n as f64 / elapsed.as_secs_f64(), elapsed))
}

/// What a load of POSTed goals measured: each POST's latency and the time until the
/// last run finished.
pub struct Load {
    pub acks: Vec<f64>,
    pub elapsed: Duration,
    pub runs: usize,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.runs as f64 / self.elapsed.as_secs_f64()
    }
}

/// `n` one-leaf goals POSTed to ingress, `concurrency` at a time, as a client would.
pub async fn e2e_http(
    bus: &Bus,
    addr: &str,
    key: &str,
    n: usize,
    concurrency: usize,
) -> Result<Load> {
    let finished = bus.client().subscribe(subject::RUNS_ALL).await?;
    let http = dispatch_tests::http_client(key)?;
    let url = format!("http://{addr}/v1/goals");
    let started = Instant::now();
    let posts = futures::stream::iter(0..n)
        .map(|_| post_goal(&http, &url))
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>();
    let (acks, counted) = tokio::join!(posts, count_finished(finished, n));
    counted?;
    Ok(Load {
        acks: acks.into_iter().collect::<Result<_>>()?,
        elapsed: started.elapsed(),
        runs: n,
    })
}

/// `n` one-leaf goals POSTed at `rate` per second, each answer's latency measured
/// while the stack runs the goals before it.
async fn e2e_paced(bus: &Bus, addr: &str, key: &str, rate: u64, n: usize) -> Result<Load> {
    let finished = bus.client().subscribe(subject::RUNS_ALL).await?;
    let http = dispatch_tests::http_client(key)?;
    let started = Instant::now();
    let acks = paced(&http, &format!("http://{addr}/v1/goals"), rate, n).await?;
    count_finished(finished, n).await?;
    Ok(Load {
        acks,
        elapsed: started.elapsed(),
        runs: n,
    })
}

/// `n` goals POSTed to `url` at `rate` per second whatever the answers take (an open
/// loop, as independent clients arrive): each answer's latency in milliseconds.
pub async fn paced(http: &reqwest::Client, url: &str, rate: u64, n: usize) -> Result<Vec<f64>> {
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..n {
        ticks.tick().await;
        let (http, url) = (http.clone(), url.to_owned());
        posts.spawn(async move { post_goal(&http, &url).await });
    }
    posts.join_all().await.into_iter().collect()
}

/// POSTs the one-leaf goal to `url` and returns how long the `202` took, in ms.
pub async fn post_goal(http: &reqwest::Client, url: &str) -> Result<f64> {
    let sent = Instant::now();
    let response = http
        .post(url)
        .json(&json!({ "goal": ONE_LEAF_PLAN }))
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 202,
        "POST {url} answered {}",
        response.status()
    );
    Ok(sent.elapsed().as_secs_f64() * 1000.0)
}

/// Waits until `n` runs have ended, as their terminal events pass on the bus.
async fn count_finished(mut events: dispatch_bus::async_nats::Subscriber, n: usize) -> Result<()> {
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while done < n {
        let message = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("the runs did not finish within 300 s")?
            .context("subscription ended")?;
        // A run that did not end `done` did not do the work being measured.
        if let Ok(RunEvent {
            run_id,
            body: Some(Body::RunFinished(finished)),
            ..
        }) = RunEvent::decode(message.payload.as_ref())
        {
            anyhow::ensure!(
                finished.status == RunStatus::Done as i32,
                "run {run_id} ended {}: {}",
                finished.status().word(),
                finished.reason
            );
            done += 1;
        }
    }
    Ok(())
}

/// CPU time (user + system) the process has used, in nanoseconds, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms: the measured phases are seconds long).
pub fn cpu_ns(pid: u32) -> u64 {
    const NS_PER_TICK: u64 = 10_000_000;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name may hold spaces; the fields after it do not.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let user: u64 = fields.get(11)?.parse().ok()?;
            let system: u64 = fields.get(12)?.parse().ok()?;
            Some((user + system) * NS_PER_TICK)
        })
        .unwrap_or(0)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`: now, `VmHWM`: peak).
pub fn rss_kib(pid: u32, field: &str) -> u64 {
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

/// Waits until the ledger has folded everything in the run log and written every
/// trail, and the streamer has relayed every event: what a run leaves behind is billed
/// to it, and seeding ends thousands of runs
/// at once whose trails must not be billed to the runs measured after.
pub async fn caught_up(bus: &Bus) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let target = stream_last_seq(bus, dispatch_bus::streams::RUNS).await?;
        let status = ledger_status(bus, Duration::from_secs(5)).await;
        if status.is_some_and(|s| s.runs_cursor >= target && !s.trails_due)
            && streamer_caught_up(bus).await?
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ledger did not catch up within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the streamer has relayed every run event (its consumer has none pending or
/// unacknowledged); true when no streamer runs here.
async fn streamer_caught_up(bus: &Bus) -> Result<bool> {
    let runs = bus
        .jetstream()
        .get_stream(dispatch_bus::streams::RUNS)
        .await?;
    match runs
        .consumer_info(dispatch_bus::streams::consumers::STREAMER)
        .await
    {
        Ok(info) => Ok(info.num_pending == 0 && info.num_ack_pending == 0),
        Err(_) => Ok(true),
    }
}

/// The ledger's status, or `None` while it does not answer.
async fn ledger_status(
    bus: &Bus,
    timeout: Duration,
) -> Option<dispatch_proto::api::v1::LedgerStatusResponse> {
    bus.request_json::<_, dispatch_proto::api::Reply<_>>(subject::query::status(), &(), timeout)
        .await
        .ok()?
        .ok()
}
