//! `cargo xtask bench --peer restate`: Dispatch beside Restate, a durable-execution
//! engine people pick for the same job, measured on this machine in the same run with
//! the same HTTP client, alternating between the two.
//!
//! Restate runs on loopback (`restate-server` from npm, its store in a temporary
//! directory) with one service whose handler takes five `ctx.run` steps: as many
//! durable steps as a one-leaf Dispatch run records (plan, model turn, policy
//! decision, tool call, gate). Both get the same load: goals POSTed 64 at a time,
//! answered at once (fire and forget), then counted as they complete, each side from its
//! own record as a client would read it (Dispatch: each run's terminal event on the bus;
//! Restate: each invocation's output, attached to with its invocation id); and a paced
//! load for the ack latency of a stack that is busy but not saturated. Dispatch is the
//! stack `dispatch up` runs. CPU is read from `/proc` for every process of each stack
//! (Dispatch's services and nats-server; restate-server and the Node.js service).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dispatch_bus::Bus;
use dispatch_testkit::NatsServer;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use super::{Load, Results, Stack};

/// Goals per closed-loop round, and how many rounds each side gets, alternating.
const FIRED: usize = 500;
const ROUNDS: usize = 3;
/// The most the machine's load may move within one pair of rounds (a Dispatch round and
/// the Restate round after it) for the ratio to be printed: a ratio between rounds under
/// different loads compares the machine, not the two systems. Pairs, not all rounds: the
/// bench's own work raises the one-minute average over its rounds (about 1 to 3 on two
/// cores), evenly for both sides, since they alternate.
const LOAD_SPREAD: f64 = 1.0;
/// The targets (issue 31): at least twice Restate's completions at the same number of
/// durable steps, and no more CPU per run than it.
const COMPLETIONS_TARGET: f64 = 2.0;
const CPU_TARGET: f64 = 1.0;
/// The paced load: POSTs per second and how many.
const PACED_RATE: u64 = 200;
const PACED: usize = 400;

pub async fn run(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let dir = std::env::var_os("DISPATCH_RESTATE_DIR")
        .map(PathBuf::from)
        .context("DISPATCH_RESTATE_DIR is not set: run `cargo xtask bench --peer restate`")?;
    let restate = Restate::start(&dir).await?;
    let stack = Stack::start(nats, workspace).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = (stack_rss(&stack.pids(nats)), stack_rss(&restate.pids()));

    let dispatch_url = format!("http://{}/v1/goals", stack.http_addr);
    let http_dispatch = dispatch_tests::http_client(&stack.key)?;
    let http_restate = reqwest::Client::new();
    // Warm both up (connections, caches, JIT) before anything counts.
    restate.fire(&http_restate, 50, 16).await?;
    super::e2e_http(bus, &stack.http_addr, &stack.key, 50, 16).await?;
    // What the sections before left for the new stack (the streamer relays the run
    // events since its last copy stopped) is not billed to the first round.
    super::caught_up(bus).await?;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut loads = vec![super::load_average()];
    for _ in 0..ROUNDS {
        let cpu = stack.cpu_total(nats);
        let load = super::e2e_http(bus, &stack.http_addr, &stack.key, FIRED, 64).await?;
        // Billed with what the runs leave behind (trails, views), as in the e2e section.
        super::caught_up(bus).await?;
        ours.push((load, stack.cpu_total(nats) - cpu));
        let cpu = restate.cpu_total();
        loads.push(super::load_average());
        let load = restate.fire(&http_restate, FIRED, 64).await?;
        theirs.push((load, restate.cpu_total() - cpu));
        loads.push(super::load_average());
    }
    let moved = moved_within_pairs(&loads);
    let comparable = moved <= LOAD_SPREAD;
    let paced_ours = super::paced(&http_dispatch, &dispatch_url, PACED_RATE, PACED).await?;
    let paced_theirs = super::paced(&http_restate, &restate.send_url(), PACED_RATE, PACED).await?;
    let peak = (stack_peak(&stack.pids(nats)), stack_peak(&restate.pids()));

    let ours = Summary::of(&ours, &paced_ours, idle.0, peak.0);
    let theirs = Summary::of(&theirs, &paced_theirs, idle.1, peak.1);
    for (name, s) in [("dispatch", &ours), ("restate", &theirs)] {
        lines.push(format!(
            "peer      {name:<8} {:.0} completed/s (median of {ROUNDS} rounds of {FIRED} POSTed 64 at a time; {:.0}–{:.0}) | ack p50 {:.2} ms, p99 {:.2} ms at 64 in flight; {:.2} / {:.2} ms at {PACED_RATE}/s | CPU {:.2} ms per run | RSS idle {:.0} MB, peak {:.0} MB",
            s.rate, s.rate_min, s.rate_max, s.ack_p50, s.ack_p99, s.paced_p50, s.paced_p99, s.cpu_ms, s.idle_mb, s.peak_mb
        ));
    }
    let ratio = ours.rate / theirs.rate;
    let loads_line = loads
        .iter()
        .map(|l| format!("{l:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cpu_ratio = ours.cpu_ms / theirs.cpu_ms;
    if comparable {
        lines.push(format!(
            "peer      dispatch/restate: completions {ratio:.2}x (target ≥ {COMPLETIONS_TARGET:.1}x: {}), CPU per run {cpu_ratio:.2}x (target ≤ {CPU_TARGET:.1}x: {}), ack p50 at {PACED_RATE}/s {:.2}x, idle RSS {:.2}x (load across the rounds: {loads_line})",
            super::verdict(ratio >= COMPLETIONS_TARGET),
            super::verdict(cpu_ratio <= CPU_TARGET),
            ours.paced_p50 / theirs.paced_p50,
            ours.idle_mb / theirs.idle_mb,
        ));
    } else {
        lines.push(format!(
            "peer      dispatch/restate: no ratio: the load moved {moved:.2} within a pair of rounds ({loads_line}), more than {LOAD_SPREAD}; run it again on a quieter machine"
        ));
    }
    results.insert(
        "peer".into(),
        json!({
            "peer": "restate 1.7.12, @restatedev/restate-sdk 1.17.2, five ctx.run steps",
            "dispatch": ours.json(), "restate": theirs.json(),
            "completion_ratio": comparable.then_some(ratio), "cpu_ratio": comparable.then_some(cpu_ratio),
            "target_met": comparable && ratio >= COMPLETIONS_TARGET,
            "cpu_target_met": comparable && cpu_ratio <= CPU_TARGET,
            "loads": loads, "load_moved_within_a_pair": moved, "load_spread_allowed": LOAD_SPREAD,
        }),
    );
    stack.kill().await
}

/// One side's figures over its rounds.
struct Summary {
    rate: f64,
    rate_min: f64,
    rate_max: f64,
    ack_p50: f64,
    ack_p99: f64,
    paced_p50: f64,
    paced_p99: f64,
    cpu_ms: f64,
    idle_mb: f64,
    peak_mb: f64,
}

impl Summary {
    fn of(rounds: &[(Load, u64)], paced: &[f64], idle_kib: u64, peak_kib: u64) -> Self {
        let mut rates: Vec<f64> = rounds.iter().map(|(load, _)| load.rate()).collect();
        rates.sort_by(f64::total_cmp);
        let acks: Vec<f64> = rounds.iter().flat_map(|(l, _)| l.acks.clone()).collect();
        let runs: usize = rounds.iter().map(|(l, _)| l.runs).sum();
        let cpu_ns: u64 = rounds.iter().map(|(_, cpu)| cpu).sum();
        Self {
            rate: rates[rates.len() / 2],
            rate_min: rates[0],
            rate_max: rates[rates.len() - 1],
            ack_p50: super::percentile(&acks, 50.0),
            ack_p99: super::percentile(&acks, 99.0),
            paced_p50: super::percentile(paced, 50.0),
            paced_p99: super::percentile(paced, 99.0),
            cpu_ms: cpu_ns as f64 / 1e6 / runs as f64,
            idle_mb: idle_kib as f64 / 1024.0,
            peak_mb: peak_kib as f64 / 1024.0,
        }
    }

    fn json(&self) -> Value {
        json!({
            "completed_per_s": self.rate, "completed_per_s_min": self.rate_min,
            "completed_per_s_max": self.rate_max, "ack_p50_ms": self.ack_p50,
            "ack_p99_ms": self.ack_p99, "paced_ack_p50_ms": self.paced_p50,
            "paced_ack_p99_ms": self.paced_p99, "cpu_ms_per_run": self.cpu_ms,
            "idle_rss_mb": self.idle_mb, "peak_rss_mb": self.peak_mb,
        })
    }
}

fn stack_rss(pids: &[u32]) -> u64 {
    pids.iter().map(|pid| super::rss_kib(*pid, "VmRSS")).sum()
}

fn stack_peak(pids: &[u32]) -> u64 {
    pids.iter().map(|pid| super::rss_kib(*pid, "VmHWM")).sum()
}

/// restate-server and the Node.js service, on loopback, with a throwaway store.
struct Restate {
    server: Child,
    service: Child,
    ingress: u16,
    counter: u16,
    _store: tempfile::TempDir,
}

impl Restate {
    async fn start(dir: &Path) -> Result<Self> {
        let store = tempfile::Builder::new()
            .prefix("dispatch-bench-restate-")
            .tempdir()?;
        let log_path = store.path().join("restate.log");
        let log = std::fs::File::create(&log_path)?;
        let server = Command::new(server_binary(dir)?)
            .args([
                "--no-logo",
                "--listen-mode",
                "tcp",
                "--use-random-ports",
                "true",
            ])
            .args(["--bind-ip", "127.0.0.1", "--base-dir"])
            .arg(store.path().join("data"))
            // The bench's own RUST_LOG would hide the lines that name the ports.
            .env_remove("RUST_LOG")
            .env("RESTATE_LOG_DISABLE_ANSI_CODES", "true")
            .env("RESTATE_DISABLE_TELEMETRY", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start restate-server")?;
        let (ingress, admin) = ports_from_log(&log_path).await?;

        let mut service = Command::new("node")
            .arg(dir.join("service.mjs"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start the Restate service (node)")?;
        let stdout = service.stdout.take().context("service stdout")?;
        let mut out = tokio::io::BufReader::new(stdout).lines();
        let ports: Value = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
                .await
                .context("the Restate service did not start within 30 s")??
                .context("the Restate service exited before listening")?;
            if line.starts_with('{') {
                break serde_json::from_str(&line)?;
            }
        };
        // Keep reading what the SDK prints, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        let port = |name: &str| -> Result<u16> {
            ports[name]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("the service printed no {name} port"))
        };
        let (endpoint, counter) = (port("endpoint")?, port("counter")?);

        let admin_url = format!("http://127.0.0.1:{admin}/deployments");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let registered = reqwest::Client::new()
                .post(&admin_url)
                .json(&json!({ "uri": format!("http://127.0.0.1:{endpoint}") }))
                .send()
                .await;
            match registered {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() > deadline => bail!("restate did not register the service"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(Self {
            server,
            service,
            ingress,
            counter,
            _store: store,
        })
    }

    fn send_url(&self) -> String {
        format!("http://127.0.0.1:{}/bench/run/send", self.ingress)
    }

    fn pids(&self) -> Vec<u32> {
        [self.server.id(), self.service.id()]
            .into_iter()
            .flatten()
            .collect()
    }

    fn cpu_total(&self) -> u64 {
        self.pids().into_iter().map(super::cpu_ns).sum()
    }

    async fn finished(&self, http: &reqwest::Client) -> Result<u64> {
        let reply: Value = http
            .get(format!("http://127.0.0.1:{}/", self.counter))
            .send()
            .await?
            .json()
            .await?;
        reply["finished"].as_u64().context("counter reply")
    }

    /// `n` invocations sent `concurrency` at a time, each counted complete when
    /// Restate's own record gives its output: the client attaches to every invocation
    /// (`GET /restate/invocation/<id>/attach`, as a client waiting for a result does),
    /// not the handler's counter. The handler's count is checked against it.
    async fn fire(&self, http: &reqwest::Client, n: usize, concurrency: usize) -> Result<Load> {
        let before = self.finished(http).await?;
        let url = self.send_url();
        let started = Instant::now();
        let sent = futures::stream::iter(0..n)
            .map(|_| send(http, &url))
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let outputs = futures::stream::iter(sent.iter().map(|(_, id)| id))
            .map(|id| self.output(http, id))
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            outputs.iter().all(|o| o == "done"),
            "an invocation's output was not \"done\""
        );
        let counted = self.finished(http).await? - before;
        anyhow::ensure!(
            counted == n as u64,
            "restate gave {n} outputs but its handler counted {counted}"
        );
        Ok(Load {
            acks: sent.into_iter().map(|(ack, _)| ack).collect(),
            elapsed,
            runs: n,
        })
    }

    /// The output of invocation `id`, once it has one.
    async fn output(&self, http: &reqwest::Client, id: &str) -> Result<String> {
        let url = format!(
            "http://127.0.0.1:{}/restate/invocation/{id}/attach",
            self.ingress
        );
        let reply = http
            .get(&url)
            .timeout(Duration::from_secs(300))
            .send()
            .await?;
        anyhow::ensure!(
            reply.status().is_success(),
            "GET {url} answered {}",
            reply.status()
        );
        Ok(reply
            .json::<Value>()
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}

/// Sends one invocation as a client would; its ack latency (ms) and invocation id.
async fn send(http: &reqwest::Client, url: &str) -> Result<(f64, String)> {
    let sent = Instant::now();
    let response = http
        .post(url)
        .json(&json!({ "goal": super::ONE_LEAF_PLAN }))
        .send()
        .await?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "POST {url} answered {status}");
    let ack = sent.elapsed().as_secs_f64() * 1000.0;
    let body: Value = response.json().await?;
    let id = body["invocationId"]
        .as_str()
        .with_context(|| format!("no invocationId in {body}"))?
        .to_owned();
    Ok((ack, id))
}

/// The restate-server binary itself: `node_modules/.bin/restate-server` is a Node.js
/// wrapper that spawns it, and killing the wrapper would leave the server running.
fn server_binary(dir: &Path) -> Result<PathBuf> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => bail!("no restate-server package for {other}"),
    };
    let path = dir.join(format!(
        "node_modules/@restatedev/restate-server-linux-{arch}/bin/restate-server"
    ));
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo xtask bench --peer restate`",
        path.display()
    );
    Ok(path)
}

/// The ingress and admin ports restate-server chose, from its startup log.
async fn ports_from_log(path: &Path) -> Result<(u16, u16)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let port_of = |server: &str| -> Option<u16> {
            let at = log.find(&format!("server_name: {server}"))?;
            let rest = &log[at..];
            let port = rest.split("server.port:").nth(1)?;
            port.split_whitespace().next()?.parse().ok()
        };
        if let (Some(ingress), Some(admin)) =
            (port_of("http-ingress-server"), port_of("admin-api-server"))
        {
            return Ok((ingress, admin));
        }
        if Instant::now() > deadline {
            let tail: String = log
                .chars()
                .rev()
                .take(800)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!("restate-server did not say where it listens within 60 s; its log ends:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The most the load moved within one pair of rounds, given the load before the first
/// round and after each round since (so a pair's readings are before its Dispatch round,
/// between the two, and after its Restate round).
fn moved_within_pairs(loads: &[f64]) -> f64 {
    loads
        .windows(3)
        .step_by(2)
        .map(|pair| {
            let (lo, hi) = pair
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| {
                    (lo.min(*l), hi.max(*l))
                });
            hi - lo
        })
        .fold(0.0_f64, f64::max)
}

#[cfg(test)]
mod tests {
    use super::moved_within_pairs;

    #[test]
    fn the_load_is_compared_within_each_pair_of_rounds() {
        // A climb across the bench, even within each pair: comparable.
        let climbing = [1.04, 1.44, 1.97, 2.21, 2.21, 2.91, 2.91];
        assert!((moved_within_pairs(&climbing) - 0.93).abs() < 1e-9);
        // A jump inside one pair is what is not.
        let jump = [1.0, 1.1, 3.0, 3.0, 3.1, 3.1, 3.2];
        assert!((moved_within_pairs(&jump) - 2.0).abs() < 1e-9);
    }
}
