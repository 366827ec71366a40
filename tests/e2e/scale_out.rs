//! Scale-out under faults (`cargo xtask cluster`): the topology of
//! `deploy/topology.toml` — three clustered nats-servers with R3 streams and two copies
//! of every service — started on loopback the way a fresh deployment starts (all at
//! once), then run under a steady load of goals POSTed to both ingress copies while
//!
//! 1. the node leading `DISPATCH_RUNS` is SIGKILLed,
//! 2. that node restarts and catches up,
//! 3. one copy of every service is SIGKILLed.
//!
//! Afterwards every acknowledged goal has run exactly once to `done` with a sealed log
//! and a trail, no side effect happened twice, and throughput was back to at least 80%
//! of its pre-fault rate within 10 s of each kill. Figures are printed for the record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dispatch_bus::{Bus, Identity, RunId, streams, subject};
use dispatch_proto::run::v1::{RunEvent, RunStatus, run_event::Body};
use dispatch_testkit::{Nats as _, workspace_root};
use dispatch_tests::topology::{Deployment, Topology};
use dispatch_tests::{count, finished};
use futures::StreamExt;
use prost::Message as _;

/// Goals POSTed per second, open loop (a goal is sent on time whatever came before).
const RATE: f64 = 4.0;
/// How long each phase of the load lasts.
const WARM_UP: Duration = Duration::from_secs(8);
const BEFORE: Duration = Duration::from_secs(10);
const AFTER: Duration = Duration::from_secs(20);
/// The window throughput is judged over, and how much of the pre-fault rate it must reach.
const WINDOW: f64 = 2.0;
const RECOVERED: f64 = 0.8;
/// How long after a fault throughput may take to recover.
const RECOVERY_LIMIT: f64 = 10.0;
/// How long a submission is retried (same idempotency key) before it counts as refused.
const SUBMIT_FOR: Duration = Duration::from_secs(60);
/// The most warnings and errors a copy may log per second of load, faults included:
/// an outage is said when it starts and when it ends, not at every attempt.
const WARNINGS_PER_S: f64 = 1.0;
/// Streams whose replicas must catch up on a restarted node.
const REPLICATED: [&str; 4] = [
    streams::RUNS,
    streams::GOALS,
    streams::COMMANDS,
    streams::LEDGER,
];

fn plan(n: usize) -> String {
    format!(
        "#+TITLE: Scale {n}\n* TODO Count once\n  - call: test.count {{\"key\": \"scale\"}}\n  :done-when: true\n"
    )
}

#[tokio::test]
#[ignore = "slow: run with `cargo xtask cluster`"]
async fn a_fresh_cluster_starts_with_every_process_at_once_ten_times() -> Result<()> {
    let topology = Topology::load(&workspace_root())?;
    let http = reqwest::Client::new();
    for attempt in 1..=10 {
        let began = Instant::now();
        let mut deployment = Deployment::start(&topology)
            .await
            .with_context(|| format!("start {attempt} of 10"))?;
        let healthy = began.elapsed();
        let key = deployment.api_key.clone();
        let addr = deployment.ingress_addrs()[attempt % 2].clone();
        let run_id = submit(&http, &[addr], &key, attempt, &plan(attempt)).await?;
        let events = wait_finished(&deployment, run_id, Duration::from_secs(60)).await;
        let exited: Vec<String> = deployment
            .services
            .iter_mut()
            .filter_map(|s| s.has_exited().then(|| s.instance.clone()))
            .collect();
        if !exited.is_empty() || events.is_err() {
            deployment.print_logs(30);
        }
        ensure!(exited.is_empty(), "start {attempt}: {exited:?} exited");
        let events = events?;
        ensure!(
            finished(&events).status == RunStatus::Done as i32,
            "start {attempt}: {}",
            finished(&events).reason
        );
        eprintln!(
            "start {attempt}/10: {} processes healthy in {healthy:.1?}, a goal done after {:.1?}",
            deployment.services.len() + topology.nats.nodes,
            began.elapsed()
        );
    }
    Ok(())
}

#[tokio::test]
#[ignore = "slow: run with `cargo xtask cluster`"]
async fn runs_ride_out_a_node_dying_and_a_copy_of_every_service_dying() -> Result<()> {
    let topology = Topology::load(&workspace_root())?;
    let mut deployment = Deployment::start(&topology).await?;
    let admin = deployment.cluster.bus().await?;
    for stream in REPLICATED {
        let info = admin
            .jetstream()
            .get_stream(stream)
            .await?
            .get_info()
            .await?;
        ensure!(
            info.config.num_replicas == topology.nats.replicas,
            "{stream} has {} replicas",
            info.config.num_replicas
        );
    }
    let victim = leader_of(&admin, streams::RUNS).await?;
    eprintln!("cluster: {} leads {}", victim, streams::RUNS);

    // Completions are watched from a node that stays up, by a plain subscription.
    let watched_from: Vec<String> = deployment
        .cluster
        .nodes
        .iter()
        .filter(|n| n.name() != Some(victim.as_str()))
        .map(|n| n.url())
        .collect();
    let watcher = Bus::connect(
        &watched_from.join(","),
        Identity::Admin,
        &dispatch_bus::Credentials::nkey_file(&deployment.cluster.seed(Identity::Admin))?,
    )
    .await?;
    let began = Instant::now();
    let done_at: Arc<Mutex<BTreeMap<String, f64>>> = Arc::default();
    let mut finishes = watcher.client().subscribe(subject::RUNS_ALL).await?;
    let seen = done_at.clone();
    tokio::spawn(async move {
        while let Some(message) = finishes.next().await {
            let Ok(event) = RunEvent::decode(message.payload.as_ref()) else {
                continue;
            };
            if matches!(event.body, Some(Body::RunFinished(_))) {
                let at = began.elapsed().as_secs_f64();
                seen.lock().unwrap().entry(event.run_id).or_insert(at);
            }
        }
    });

    // The load: one goal every 1/RATE s, each sent to the ingress copies in turn.
    let acked: Arc<Mutex<Vec<(usize, RunId)>>> = Arc::default();
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop_load = tokio_util::sync::CancellationToken::new();
    let load = {
        let (acked, refused, stop) = (acked.clone(), refused.clone(), stop_load.clone());
        let (addrs, key) = (deployment.ingress_addrs(), deployment.api_key.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let mut order = addrs.clone();
                order.rotate_left(n % addrs.len());
                let (http, key, acked, refused) =
                    (http.clone(), key.clone(), acked.clone(), refused.clone());
                tasks.spawn(async move {
                    match submit(&http, &order, &key, n, &plan(n)).await {
                        Ok(run_id) => acked.lock().unwrap().push((n, run_id)),
                        Err(e) => refused.lock().unwrap().push(format!("goal {n}: {e:#}")),
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    tokio::time::sleep(WARM_UP + BEFORE).await;
    let first_kill = began.elapsed().as_secs_f64();
    deployment
        .cluster
        .node_named(&victim)
        .context("the leader is a node")?
        .kill()
        .await?;
    eprintln!("cluster: SIGKILLed {victim} at {first_kill:.1} s");
    tokio::time::sleep(AFTER).await;

    let restarted = began.elapsed().as_secs_f64();
    deployment
        .cluster
        .node_named(&victim)
        .context("the killed node")?
        .restart()
        .await?;
    let caught_up = caught_up(&admin, &victim, Duration::from_secs(120)).await?;
    eprintln!(
        "cluster: {victim} restarted at {restarted:.1} s, every replica current {caught_up:.1?} later"
    );
    tokio::time::sleep(BEFORE).await;

    let second_kill = began.elapsed().as_secs_f64();
    let mut killed = Vec::new();
    for name in dispatch_service::SERVICES {
        let i = deployment
            .services
            .iter()
            .position(|s| s.name == name)
            .context("every service runs")?;
        let mut copy = deployment.services.remove(i);
        copy.kill().await?;
        killed.push(copy.instance.clone());
    }
    eprintln!(
        "cluster: SIGKILLed one copy of every service at {second_kill:.1} s: {}",
        killed.join(", ")
    );
    tokio::time::sleep(AFTER).await;
    stop_load.cancel();
    load.await?;
    let load_ended = began.elapsed().as_secs_f64();

    // Every acknowledged goal ends, exactly once, done.
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    ensure!(
        refused.is_empty(),
        "{} goals never acknowledged, the first: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    let ids: BTreeSet<RunId> = acked.iter().map(|(_, id)| *id).collect();
    ensure!(ids.len() == acked.len(), "one run id for two goals");
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for (n, run_id) in &acked {
        let events = wait_finished(&deployment, *run_id, Duration::from_secs(180))
            .await
            .inspect_err(|_| deployment.print_logs(40))
            .with_context(|| format!("goal {n}"))?;
        let end = finished(&events);
        *statuses
            .entry(RunStatus::try_from(end.status)?.word())
            .or_default() += 1;
        ensure!(
            end.status == RunStatus::Done as i32,
            "goal {n} ({run_id}) ended {}: {}",
            RunStatus::try_from(end.status)?.word(),
            end.reason
        );
        ensure!(count(&events, "run_finished") == 1, "goal {n} ended twice");
        let unique: BTreeSet<_> = events.iter().map(|e| &e.event.event_id).collect();
        ensure!(unique.len() == events.len(), "goal {n}: an event twice");
        ensure!(
            !events.last().unwrap().event.signature.is_empty(),
            "goal {n} is not sealed"
        );
    }
    // The side effect of every run happened once.
    let counted = std::fs::read_to_string(
        dispatch_service::layout::state_dir(deployment.root()).join("counters/scale.log"),
    )
    .unwrap_or_default();
    let mut per_run: BTreeMap<&str, usize> = BTreeMap::new();
    for line in counted.lines() {
        *per_run
            .entry(line.split(' ').next().unwrap_or_default())
            .or_default() += 1;
    }
    for (n, run_id) in &acked {
        let times = per_run.get(run_id.to_string().as_str()).copied();
        ensure!(
            times == Some(1),
            "goal {n}: its side effect ran {times:?} times"
        );
    }
    // Every finished run has its trail.
    let trails_by = Instant::now() + Duration::from_secs(60);
    for (n, run_id) in &acked {
        let trail = dispatch_service::layout::steps_file(deployment.root(), run_id);
        while !trail.exists() {
            if Instant::now() > trails_by {
                deployment.print_logs(40);
                bail!("goal {n} ({run_id}) has no trail at {}", trail.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Throughput: completions per second around each fault.
    let times: Vec<f64> = {
        let done_at = done_at.lock().unwrap();
        let mut times: Vec<f64> = acked
            .iter()
            .filter_map(|(_, id)| done_at.get(&id.to_string()).copied())
            .collect();
        times.sort_by(f64::total_cmp);
        times
    };
    eprintln!(
        "cluster: {} goals acknowledged at {RATE}/s over {load_ended:.0} s, every one done once {statuses:?}, \
         side effects once each, every trail written",
        acked.len()
    );
    let mut missed = Vec::new();
    for (fault, at) in [
        ("RUNS leader node SIGKILLed", first_kill),
        ("one copy of every service SIGKILLed", second_kill),
    ] {
        let before = rate(&times, at - BEFORE.as_secs_f64(), at);
        let during = rate(&times, at, at + RECOVERY_LIMIT);
        let after = rate(&times, at + RECOVERY_LIMIT, at + AFTER.as_secs_f64());
        let back = recovered_by(&times, at, before);
        eprintln!(
            "cluster: {fault}: {before:.2} runs/s before, {during:.2} in the 10 s after, {after:.2} in the 10 s after that; \
             back to ≥{:.0}% ({:.2} runs/s over {WINDOW} s) {}",
            RECOVERED * 100.0,
            before * RECOVERED,
            back.map_or("never".into(), |s| format!("{s:.1} s after the kill")),
        );
        if back.is_none_or(|s| s > RECOVERY_LIMIT) {
            missed.push(fault);
        }
    }
    // An outage is said once when it starts and once when it ends, not per attempt.
    let mut volume = deployment.log_volume();
    volume.sort_by_key(|v| std::cmp::Reverse(v.warnings));
    for v in &volume {
        eprintln!(
            "cluster: {} logged {} warnings over {load_ended:.0} s; most often {:?}",
            v.copy, v.warnings, v.loudest
        );
    }
    let loud: Vec<&str> = volume
        .iter()
        .filter(|v| v.warnings as f64 > load_ended * WARNINGS_PER_S)
        .map(|v| v.copy.as_str())
        .collect();
    let restart_window = rate(
        &times,
        restarted,
        restarted + caught_up.as_secs_f64().max(WINDOW),
    );
    eprintln!("cluster: while {victim} caught up: {restart_window:.2} runs/s");
    ensure!(
        missed.is_empty(),
        "throughput did not recover within {RECOVERY_LIMIT} s after: {missed:?}"
    );
    ensure!(
        loud.is_empty(),
        "logged more than {WARNINGS_PER_S} warnings a second: {loud:?}"
    );
    Ok(())
}

/// POSTs goal `n`, trying the ingress copies in `addrs` in turn with one idempotency
/// key (a retry is the same goal) until one acknowledges it.
async fn submit(
    http: &reqwest::Client,
    addrs: &[String],
    key: &str,
    n: usize,
    goal: &str,
) -> Result<RunId> {
    let deadline = Instant::now() + SUBMIT_FOR;
    let body = serde_json::json!({ "goal": goal, "conversation_id": "scale" });
    let mut last = String::new();
    for addr in addrs.iter().cycle() {
        if Instant::now() > deadline {
            bail!("not acknowledged within {SUBMIT_FOR:?}; last: {last}");
        }
        let answer = http
            .post(format!("http://{addr}/v1/goals"))
            .bearer_auth(key)
            .header("Idempotency-Key", format!("scale-{n}"))
            .json(&body)
            .send()
            .await;
        match answer {
            Ok(response) if response.status() == 202 => {
                let body: serde_json::Value = response.json().await?;
                let id = body["run_id"].as_str().context("202 names the run")?;
                return id.parse().map_err(|e| anyhow::anyhow!("run id {id}: {e}"));
            }
            Ok(response) => {
                let status = response.status();
                last = format!(
                    "{addr}: {status} {}",
                    response.text().await.unwrap_or_default()
                );
            }
            Err(e) => last = format!("{addr}: {:#}", anyhow::Error::from(e)),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    unreachable!("cycling a non-empty list")
}

async fn wait_finished(
    deployment: &Deployment,
    run_id: RunId,
    limit: Duration,
) -> Result<Vec<dispatch_runlog::StoredEvent>> {
    let bus = deployment.cluster.bus().await?;
    let log = dispatch_tests::workspace_log(&bus, deployment.root()).await?;
    dispatch_tests::wait_finished(&log, run_id, limit).await
}

/// The server name of `stream`'s leader.
async fn leader_of(bus: &Bus, stream: &str) -> Result<String> {
    let info = bus.jetstream().get_stream(stream).await?.get_info().await?;
    info.cluster
        .and_then(|c| c.leader)
        .with_context(|| format!("{stream} has no leader"))
}

/// Waits until `node` is a current replica of every replicated stream; returns how long.
async fn caught_up(bus: &Bus, node: &str, limit: Duration) -> Result<Duration> {
    let began = Instant::now();
    'wait: loop {
        ensure!(
            began.elapsed() < limit,
            "{node} did not catch up within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        for stream in REPLICATED {
            let Ok(handle) = bus.jetstream().get_stream(stream).await else {
                continue 'wait;
            };
            let Ok(info) = handle.get_info().await else {
                continue 'wait;
            };
            let Some(cluster) = &info.cluster else {
                continue 'wait;
            };
            let current = cluster.leader.as_deref() == Some(node)
                || cluster.replicas.iter().any(|peer| {
                    peer.name == node && peer.current && !peer.offline && peer.lag.unwrap_or(0) == 0
                });
            if !current {
                continue 'wait;
            }
        }
        return Ok(began.elapsed());
    }
}

/// Completions per second in `[from, to)`.
fn rate(times: &[f64], from: f64, to: f64) -> f64 {
    let n = times.iter().filter(|t| (from..to).contains(*t)).count();
    n as f64 / (to - from).max(f64::EPSILON)
}

/// Seconds after `fault` by which a `WINDOW`-long window first held at least
/// `RECOVERED` of `before`'s rate (the window's end), within 30 s.
fn recovered_by(times: &[f64], fault: f64, before: f64) -> Option<f64> {
    let mut start = fault;
    while start < fault + 30.0 {
        if rate(times, start, start + WINDOW) >= RECOVERED * before {
            return Some(start + WINDOW - fault);
        }
        start += 0.25;
    }
    None
}
