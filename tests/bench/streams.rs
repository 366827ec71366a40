//! Conversation streams: what reading a conversation over SSE costs, beside raw NATS.
//!
//! - Fan-out latency: a chunk published (core publish, as the streamer's publish is one
//!   publish) on a conversation's subject, until an SSE client of ingress has it, one
//!   chunk at a time; against a core subscriber on the same subject of the same server.
//! - Sustained delivery: `CLIENTS` SSE clients on one conversation while `BURST` chunks
//!   are published as fast as the publisher can; chunks per second each client got, and
//!   in all.
//! - Resume: a client back with a cursor `GAP` chunks behind; the time until it has
//!   them all.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dispatch_bus::{Bus, ConversationId, subject};
use dispatch_testkit::{NatsServer, Service};
use futures::StreamExt;
use serde_json::json;

use crate::{Results, percentile, verdict};

const LATENCY_SAMPLES: usize = 1000;
const CLIENTS: usize = 100;
const BURST: usize = 5000;
const GAP: usize = 1000;

/// The chunks of one SSE response, as (id, index) as they arrive; `index` is the `i`
/// the bench put in the chunk. Read by a task of its own, so the response is drained
/// however slowly the caller looks.
fn events(response: reqwest::Response) -> impl futures::Stream<Item = (String, u64)> {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let (mut id, mut data) = (String::new(), String::new());
        while let Some(Ok(bytes)) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buffer.find('\n') {
                let line: String = buffer.drain(..=end).collect();
                let line = line.trim_end();
                if line.is_empty() {
                    if let Ok(chunk) = serde_json::from_str::<serde_json::Value>(&data)
                        && let Some(i) = chunk["data"]["i"].as_u64()
                        && sender.send((std::mem::take(&mut id), i)).is_err()
                    {
                        return;
                    }
                    data.clear();
                } else if let Some(value) = line.strip_prefix("id:") {
                    id = value.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
        }
    });
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// The index of the chunk a bench client waits for to know it is following.
const HELLO: usize = 1 << 40;

fn chunk(i: usize) -> bytes::Bytes {
    json!({"type": "data-bench", "id": "b", "data": {"i": i}})
        .to_string()
        .into()
}

pub async fn run(
    bus: &Bus,
    nats: &NatsServer,
    workspace: &std::path::Path,
    lines: &mut Vec<String>,
    results: &mut Results,
) -> Result<()> {
    let ingress = Service::start("ingress", nats, workspace, &["--listen", "127.0.0.1:0"]).await?;
    let addr = ingress.health().detail["http_addr"]
        .as_str()
        .context("ingress address")?
        .to_owned();
    let key = dispatch_tests::api_key(workspace)?;
    let http = dispatch_tests::http_client(&key)?;
    let client = bus.client().clone();
    let url = |conversation: &str| format!("http://{addr}/v1/conversations/{conversation}/stream");
    let to = |conversation: &str| -> Result<subject::Subject> {
        Ok(subject::conv::of(&conversation.parse::<ConversationId>()?))
    };

    // Fan-out latency, one chunk at a time: raw core pub/sub first.
    let raw_subject = to("bench-raw")?;
    let mut raw_sub = client.subscribe(raw_subject.clone()).await?;
    let mut raw = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES + 50 {
        let sent = Instant::now();
        client.publish(raw_subject.clone(), chunk(i)).await?;
        tokio::time::timeout(Duration::from_secs(5), raw_sub.next())
            .await?
            .context("raw subscription ended")?;
        if i >= 50 {
            raw.push(sent.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(raw_sub);
    let sse_subject = to("bench-sse")?;
    let mut sse = Box::pin(events(http.get(url("bench-sse")).send().await?));
    // The client is following once it has a first chunk.
    client.publish(sse_subject.clone(), chunk(HELLO)).await?;
    tokio::time::timeout(Duration::from_secs(10), sse.next())
        .await?
        .context("SSE ended")?;
    let mut over_sse = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES + 50 {
        let sent = Instant::now();
        client.publish(sse_subject.clone(), chunk(i)).await?;
        let (_, got) = tokio::time::timeout(Duration::from_secs(10), sse.next())
            .await?
            .context("SSE ended")?;
        anyhow::ensure!(got == i as u64, "chunk {got} came for {i}");
        if i >= 50 {
            over_sse.push(sent.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(sse);
    let (raw50, raw99) = (percentile(&raw, 50.0), percentile(&raw, 99.0));
    let (sse50, sse99) = (percentile(&over_sse, 50.0), percentile(&over_sse, 99.0));
    let ratio = sse50 / raw50;
    lines.push(format!(
        "fan-out   chunk published → SSE client of ingress: p50 {sse50:.3} ms, p99 {sse99:.3} ms | raw core pub/sub p50 {raw50:.3} ms, p99 {raw99:.3} ms | p50 ratio {ratio:.2}x (target ≤ 2x: {})",
        verdict(ratio <= 2.0)
    ));

    // Sustained delivery to many clients.
    let many = to("bench-many")?;
    let mut readers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CLIENTS);
    for _ in 0..CLIENTS {
        let response = http.get(url("bench-many")).send().await?;
        let ready = ready_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut events = Box::pin(events(response));
            let mut got = 0usize;
            let mut first = None;
            while let Some((_, i)) = events.next().await {
                if i == HELLO as u64 {
                    let _ = ready.send(()).await;
                    continue;
                }
                first.get_or_insert_with(Instant::now);
                got += 1;
                if got == BURST {
                    break;
                }
            }
            (got, Instant::now())
        }));
    }
    client.publish(many.clone(), chunk(HELLO)).await?;
    for _ in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await?
            .context("a client did not start")?;
    }
    let started = Instant::now();
    for i in 0..BURST {
        client.publish(many.clone(), chunk(i)).await?;
    }
    client.flush().await?;
    let mut last = started;
    let mut complete = 0;
    for reader in readers {
        let (got, at) = tokio::time::timeout(Duration::from_secs(120), reader).await??;
        if got == BURST {
            complete += 1;
        }
        last = last.max(at);
    }
    let secs = last.duration_since(started).as_secs_f64();
    let per_client = BURST as f64 / secs;
    lines.push(format!(
        "fan-out   {CLIENTS} SSE clients, {BURST} chunks published at once: every client had all of them in {secs:.2} s ({complete}/{CLIENTS} complete) | {per_client:.0} chunks/s per client, {:.0} deliveries/s in all",
        per_client * CLIENTS as f64
    ));

    // Resume across a gap.
    let gap = to("bench-gap")?;
    client.publish(gap.clone(), chunk(HELLO)).await?;
    let mut first = Box::pin(events(http.get(url("bench-gap")).send().await?));
    let (cursor, _) = tokio::time::timeout(Duration::from_secs(10), first.next())
        .await?
        .context("no first chunk")?;
    drop(first);
    for i in 0..GAP {
        client.publish(gap.clone(), chunk(i)).await?;
    }
    client.flush().await?;
    // Stored before the client comes back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let response = http
        .get(url("bench-gap"))
        .header("Last-Event-ID", &cursor)
        .send()
        .await?;
    let mut resumed = Box::pin(events(response));
    let mut got = 0;
    while got < GAP {
        tokio::time::timeout(Duration::from_secs(30), resumed.next())
            .await?
            .context("the resumed stream ended")?;
        got += 1;
    }
    let resume_ms = started.elapsed().as_secs_f64() * 1e3;
    lines.push(format!(
        "resume    a client back {GAP} chunks behind (Last-Event-ID): all of them in {resume_ms:.1} ms ({:.0} chunks/s)",
        GAP as f64 / (resume_ms / 1e3)
    ));
    results.insert(
        "streams".into(),
        json!({
            "fanout_p50_ms": sse50, "fanout_p99_ms": sse99,
            "raw_pubsub_p50_ms": raw50, "raw_pubsub_p99_ms": raw99, "p50_ratio": ratio,
            "clients": CLIENTS, "burst": BURST, "burst_seconds": secs,
            "chunks_per_second_per_client": per_client, "complete_clients": complete,
            "resume_gap": GAP, "resume_ms": resume_ms,
        }),
    );
    drop(ingress);
    Ok(())
}
