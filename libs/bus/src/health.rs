//! Health over the bus: every service copy answers `dispatch.health.<service>` and
//! `dispatch.health.<service>.<instance>` with a [`Health`] reply while it runs.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Bus, Error, ErrorKind, subject};

/// What a service says about itself when asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub service: String,
    pub instance: String,
    pub pid: u32,
    /// Made afresh each time a process starts: a copy restarted under the same instance
    /// name (and, in a container, maybe the same pid) answers with another one.
    #[serde(default)]
    pub boot: String,
    /// Service-specific facts, e.g. the HTTP address ingress listens on.
    #[serde(default)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl Health {
    pub fn new(service: &str, instance: &str) -> Self {
        Self {
            service: service.to_owned(),
            instance: instance.to_owned(),
            pid: std::process::id(),
            boot: boot_id().to_owned(),
            detail: METRICS_ADDR
                .get()
                .map(|addr| {
                    serde_json::Map::from_iter([(
                        "metrics_addr".to_owned(),
                        addr.to_string().into(),
                    )])
                })
                .unwrap_or_default(),
        }
    }
}

static METRICS_ADDR: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

/// Where this process serves `/metrics`, said in every health reply from now on (as
/// `detail.metrics_addr`): a listener bound to port 0 is found this way.
pub fn set_metrics_addr(addr: std::net::SocketAddr) {
    let _ = METRICS_ADDR.set(addr);
}

/// This process's [`Health::boot`].
pub fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| uuid::Uuid::now_v7().simple().to_string())
}

/// A name for this process among the copies of its service: `<pid>-<random>`.
pub fn instance_name() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{}-{}", std::process::id(), &id[id.len() - 6..])
}

/// Answers health requests until `shutdown` fires.
pub async fn serve(bus: Bus, health: Health, shutdown: CancellationToken) -> Result<(), Error> {
    let client = bus.client();
    let all = client
        .subscribe(subject::health(&health.service))
        .await
        .map_err(|e| Error::other("subscribe health", e))?;
    let one = client
        .subscribe(subject::health_instance(&health.service, &health.instance))
        .await
        .map_err(|e| Error::other("subscribe health", e))?;
    let mut requests = futures::stream::select(all, one);
    let body: bytes::Bytes = serde_json::to_vec(&health)
        .map_err(|e| Error::other("encode health", e))?
        .into();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            request = requests.next() => {
                let Some(request) = request else { return Ok(()) };
                if let Some(reply) = request.reply {
                    // A lost health reply only delays whoever asked; they ask again.
                    let _ = client.publish(reply, body.clone()).await;
                }
            }
        }
    }
}

/// Why JetStream did not accept a probe write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteRefused {
    /// Not connected to NATS at all: not a JetStream problem.
    #[error("not connected to NATS")]
    Disconnected,
    /// Connected, but the write was refused or never acknowledged; the server's reason.
    #[error("{0}")]
    Refused(String),
}

/// How long a probe write waits for its acknowledgement.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Writes one small message to `DISPATCH_PROBE` as `service` and waits for JetStream's
/// acknowledgement: the one way to learn that the server stores writes now. A server
/// whose store ran out of space keeps answering reads and info requests, and refuses
/// (insufficient resources) or never acknowledges writes.
pub async fn probe_writes(bus: &Bus, service: &str) -> Result<(), WriteRefused> {
    use async_nats::connection::State;
    if bus.client().connection_state() != State::Connected {
        return Err(WriteRefused::Disconnected);
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string();
    let write = async {
        bus.jetstream()
            .publish(subject::probe(service), stamp.into())
            .await?
            .await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, write).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(WriteRefused::Refused(e.to_string())),
        Err(_) => Err(WriteRefused::Refused(format!(
            "no acknowledgement within {PROBE_TIMEOUT:?}"
        ))),
    }
}

/// Asks `instance` of `service` for its health until it answers or `limit` passes.
/// Between asks, `starting` may give up early (say, because the process has exited).
pub async fn wait(
    bus: &Bus,
    service: &str,
    instance: &str,
    limit: std::time::Duration,
    mut starting: impl FnMut() -> Result<(), String>,
) -> Result<Health, Error> {
    let subject = subject::health_instance(service, instance);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        starting().map_err(|why| {
            Error::new(
                ErrorKind::NoResponders,
                format!("{service} ({instance}): {why}"),
            )
        })?;
        let asked = bus
            .request_json::<_, Health>(subject.clone(), &(), std::time::Duration::from_millis(500))
            .await;
        match asked {
            Ok(health) => return Ok(health),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::NoResponders,
                    format!("{service} ({instance}) did not become healthy within {limit:?}: {e}"),
                ));
            }
        }
    }
}
