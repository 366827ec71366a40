//! `dispatch status`: what the bus looks like from here. For every stream, its
//! replicas, leader, each follower's state and lag, and its size; for every durable
//! consumer, the work waiting, in flight and redelivered. Read from JetStream's own
//! answers (stream and consumer info), so it shows the truth even when no service runs.

use dispatch_bus::Bus;
use dispatch_bus::auth::DURABLES;
use dispatch_bus::streams;
use serde::Serialize;

use crate::{Failure, Format, exit, format};

#[derive(Debug, Serialize)]
pub(crate) struct StreamStatus {
    pub(crate) stream: String,
    pub(crate) replicas: usize,
    /// The server leading it (a single server leads every stream); none while it
    /// has no leader.
    pub(crate) leader: Option<String>,
    pub(crate) followers: Vec<Follower>,
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    pub(crate) last_sequence: u64,
    /// Why its state could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Follower {
    pub(crate) server: String,
    pub(crate) current: bool,
    pub(crate) offline: bool,
    /// Operations behind the leader.
    pub(crate) lag: u64,
    /// Milliseconds since the leader last heard from it.
    pub(crate) active_ms: u128,
}

#[derive(Debug, Serialize)]
pub(crate) struct ConsumerStatus {
    pub(crate) stream: String,
    pub(crate) consumer: String,
    /// Messages not yet delivered to any copy.
    pub(crate) pending: u64,
    /// Delivered, neither acknowledged nor given up yet.
    pub(crate) ack_pending: usize,
    pub(crate) redelivered: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) streams: Vec<StreamStatus>,
    pub(crate) consumers: Vec<ConsumerStatus>,
}

pub async fn run(bus: &Bus, output: Format) -> Result<u8, Failure> {
    let js = bus.jetstream();
    let mut status = Status {
        streams: Vec::new(),
        consumers: Vec::new(),
    };
    for name in streams::ALL {
        let info = match js.get_stream(name).await {
            Ok(stream) => stream.get_info().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        status.streams.push(match info {
            Ok(info) => {
                let cluster = info.cluster.unwrap_or_default();
                StreamStatus {
                    stream: name.to_owned(),
                    replicas: info.config.num_replicas,
                    leader: cluster.leader,
                    followers: cluster
                        .replicas
                        .into_iter()
                        .map(|peer| Follower {
                            server: peer.name,
                            current: peer.current,
                            offline: peer.offline,
                            lag: peer.lag.unwrap_or(0),
                            active_ms: peer.active.as_millis(),
                        })
                        .collect(),
                    messages: info.state.messages,
                    bytes: info.state.bytes,
                    last_sequence: info.state.last_sequence,
                    error: None,
                }
            }
            Err(error) => StreamStatus {
                stream: name.to_owned(),
                replicas: 0,
                leader: None,
                followers: Vec::new(),
                messages: 0,
                bytes: 0,
                last_sequence: 0,
                error: Some(error),
            },
        });
    }
    for (stream, consumer, _) in DURABLES {
        let info = match js.get_stream(stream).await {
            Ok(handle) => match handle
                .get_consumer::<dispatch_bus::async_nats::jetstream::consumer::pull::Config>(
                    consumer,
                )
                .await
            {
                Ok(mut handle) => handle.info().await.cloned().map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let (pending, ack_pending, redelivered, error) = match info {
            Ok(info) => (
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                None,
            ),
            // Declared by its service when it first starts.
            Err(e) => (0, 0, 0, Some(e)),
        };
        status.consumers.push(ConsumerStatus {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            pending,
            ack_pending,
            redelivered,
            error,
        });
    }
    match output {
        Format::Json => crate::terminal::json(&status),
        Format::Table => out!("{}", table(&status)),
    }
    let broken = status.streams.iter().any(|s| {
        s.error.is_some()
            || (s.replicas > 1 && (s.leader.is_none() || s.followers.iter().any(|f| f.offline)))
    });
    Ok(if broken { exit::DEGRADED } else { exit::DONE })
}

pub(crate) fn table(status: &Status) -> String {
    let streams = status.streams.iter().map(|s| {
        let followers = if let Some(error) = &s.error {
            error.clone()
        } else if s.followers.is_empty() {
            "-".into()
        } else {
            s.followers
                .iter()
                .map(|f| {
                    let state = if f.offline {
                        "offline".to_owned()
                    } else if f.current {
                        "current".to_owned()
                    } else {
                        format!("behind {}", f.lag)
                    };
                    format!("{} {state}", f.server)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        [
            s.stream.clone(),
            s.replicas.to_string(),
            s.leader.clone().unwrap_or_else(|| "-".into()),
            followers,
            s.messages.to_string(),
            s.last_sequence.to_string(),
        ]
    });
    let mut out = format::plain_table(
        [
            "STREAM",
            "REPLICAS",
            "LEADER",
            "FOLLOWERS",
            "MESSAGES",
            "LAST SEQ",
        ],
        streams,
    );
    out.push('\n');
    let consumers = status.consumers.iter().map(|c| {
        [
            c.consumer.clone(),
            c.stream.clone(),
            c.pending.to_string(),
            c.ack_pending.to_string(),
            c.redelivered.to_string(),
            c.error.clone().unwrap_or_default(),
        ]
    });
    out.push_str(&format::plain_table(
        [
            "CONSUMER",
            "STREAM",
            "PENDING",
            "IN FLIGHT",
            "REDELIVERED",
            "ERROR",
        ],
        consumers,
    ));
    out
}
