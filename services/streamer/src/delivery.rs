//! Deferred delivery: a finished run's result POSTed to the callback its goal named,
//! however long after the connection that started it closed.
//!
//! When the streamer relays a run's terminal event and the run's request names a
//! callback, it queues a `DeliverRun` command (`dispatch.cmd.deliver`, deduplicated
//! per run). Every streamer copy takes such commands from the shared durable consumer
//! `deliveries`, so a dead callback holds one delivery, never the relay or the others.
//!
//! A delivery is signed per Standard Webhooks: `webhook-id` (the run id, the same on
//! every try: the receiver's idempotency key), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under the
//! secret `webhook-signing`, a `whsec_…` value). The body is
//! `{"type": "run.finished", "timestamp", "data": {run_id, conversation_id, status,
//! reason, summary, report, tally}}`. Any answer but 2xx is tried again on the command
//! consumer's backoff, up to [`work::WORK_ATTEMPTS`] tries; every try is recorded on
//! `dispatch.delivery.<run_id>` before the next. Only hosts in `--callback-hosts` are
//! called, and no redirect is followed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::subject::LogWriter;
use dispatch_bus::work::{self, Delivery, WorkQueue};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_proto::command::v1::{DeliverRun, DeliveryAttempt};
use dispatch_proto::run::v1::{RunFinished, RunRequested, run_event::Body};
use dispatch_service::hosts::AllowedHost;
use hmac::Mac as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// The secret deliveries are signed with.
pub const SIGNING_SECRET: &str = "webhook-signing";
/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most deliveries one copy makes at once.
const CONCURRENCY: usize = 32;

/// Queues the delivery of `run_id`'s result; idempotent per run.
pub async fn queue(bus: &Bus, run_id: &RunId) -> Result<(), String> {
    let command = DeliverRun {
        run_id: run_id.to_string(),
    };
    store(
        bus,
        subject::cmd::deliver(),
        &format!("deliver-{run_id}"),
        &command,
    )
    .await
}

/// Publishes `message` on `to` once (`Nats-Msg-Id`: `id`) and waits until it is stored.
async fn store(
    bus: &Bus,
    to: subject::Subject,
    id: &str,
    message: &impl prost::Message,
) -> Result<(), String> {
    bus.append(to, id, None, message.encode_to_vec().into())
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What every delivery needs.
pub struct Deliverer {
    bus: Bus,
    runs: dispatch_bus::reads::Reader,
    http: reqwest::Client,
    secrets: dispatch_secrets::Store,
    grants: dispatch_secrets::Grants,
    allowed: Vec<AllowedHost>,
}

/// Why a try did not deliver, and whether another may.
struct Failed {
    status: u16,
    error: String,
    retry: bool,
}

impl Deliverer {
    pub async fn new(
        bus: &Bus,
        workspace: &std::path::Path,
        allowed: Vec<AllowedHost>,
    ) -> Result<Self, String> {
        let runs = bus
            .jetstream()
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| format!("open the run-log stream: {e}"))?;
        let key_path = dispatch_secrets::key_path(workspace);
        let key = dispatch_secrets::Key::load(&key_path).map_err(|e| e.to_string())?;
        let secrets = dispatch_secrets::Store::open(bus, key_path, key)
            .await
            .map_err(|e| e.to_string())?;
        let mut grants = dispatch_secrets::Grants::default();
        grants.grant(crate::SERVICE, SIGNING_SECRET);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(POST_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            bus: bus.clone(),
            runs: dispatch_bus::reads::Reader::new(runs),
            http,
            secrets,
            grants,
            allowed,
        })
    }

    /// Takes delivery commands until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        lease: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), dispatch_bus::Error> {
        let queue = WorkQueue {
            stream: streams::COMMANDS,
            consumer: streams::consumers::DELIVERIES,
            filter_subjects: vec![subject::cmd::DELIVER.to_owned()],
            ack_wait: lease,
        };
        let bus = self.bus.clone();
        work::consume(&bus, queue, CONCURRENCY, shutdown, move |message, _slot| {
            let me = self.clone();
            async move { me.handle(message).await }
        })
        .await
    }

    async fn handle(&self, message: jetstream::Message) {
        let delivery = Delivery::of(&message);
        let Ok(command) = DeliverRun::decode(&message.payload[..]) else {
            tracing::warn!("a delivery command that does not decode; dropped");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let Ok(run_id) = command.run_id.parse::<RunId>() else {
            tracing::warn!(
                run_id = command.run_id,
                "a delivery command for no run; dropped"
            );
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let (requested, finished) = match self.run(&run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => {
                tracing::warn!(%run_id, "a delivery for a run that has not ended; dropped");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::warn!(%run_id, error = e, "cannot read the run to deliver it");
                let _ = message.ack_with(AckKind::Nak(None)).await;
                return;
            }
        };
        let url = requested.callback_url.clone();
        if url.is_empty() {
            let _ = message.ack().await;
            return;
        }
        let attempt = u32::try_from(delivery.number).unwrap_or(u32::MAX);
        let outcome = if delivery.give_up() {
            Err(Failed {
                status: 0,
                error: delivery.give_up_reason("delivering the result"),
                retry: false,
            })
        } else {
            self.post(&run_id, &url, &requested, &finished).await
        };
        let mut record = DeliveryAttempt {
            run_id: run_id.to_string(),
            attempt,
            url: without_query(&url),
            at_unix_ms: now_ms(),
            webhook_id: run_id.to_string(),
            ..Default::default()
        };
        let ack = match outcome {
            Ok(status) => {
                record.status = u32::from(status);
                record.delivered = true;
                AckKind::Ack
            }
            Err(failed) => {
                record.status = u32::from(failed.status);
                record.error = failed.error;
                record.gave_up = !failed.retry || attempt as i64 >= work::WORK_ATTEMPTS;
                if record.gave_up {
                    AckKind::Term
                } else {
                    AckKind::Nak(None)
                }
            }
        };
        if let Err(e) = self.record(&run_id, &record).await {
            // Unrecorded, the try is made again: the record comes before the next.
            tracing::warn!(%run_id, error = e, "cannot record a delivery attempt");
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        }
        tracing::info!(%run_id, attempt, status = record.status, delivered = record.delivered, gave_up = record.gave_up, "delivery attempt");
        let _ = message.ack_with(ack).await;
    }

    /// The run's request and its terminal event (`None` while it has none).
    async fn run(&self, run_id: &RunId) -> Result<Option<(RunRequested, RunFinished)>, String> {
        let log = subject::run_log(run_id);
        let first = self.runs.next(&log, 1).await.map_err(|e| e.to_string())?;
        // The terminal event is the dispatcher's; whatever another writer stored after
        // it is not the run's end.
        let last = self
            .runs
            .last(subject::run(run_id, LogWriter::Dispatcher).as_str())
            .await
            .map_err(|e| e.to_string())?;
        let (Some(first), Some(last)) = (first, last) else {
            return Err("the run has no events".into());
        };
        let first = dispatch_runlog::decode(run_id, first.sequence, &first.payload)
            .map_err(|e| e.to_string())?;
        let last = dispatch_runlog::decode(run_id, last.sequence, &last.payload)
            .map_err(|e| e.to_string())?;
        match (first.body, last.body) {
            (Some(Body::RunRequested(requested)), Some(Body::RunFinished(finished))) => {
                Ok(Some((requested, finished)))
            }
            (Some(Body::RunRequested(_)), _) => Ok(None),
            _ => Err("the run's first event is not its request".into()),
        }
    }

    /// One signed POST of the result.
    async fn post(
        &self,
        run_id: &RunId,
        url: &str,
        requested: &RunRequested,
        finished: &RunFinished,
    ) -> Result<u16, Failed> {
        let refuse = |error: String| Failed {
            status: 0,
            error,
            retry: false,
        };
        let parsed =
            reqwest::Url::parse(url).map_err(|e| refuse(format!("the callback URL: {e}")))?;
        let host = parsed.host_str().unwrap_or_default();
        let port = parsed.port_or_known_default().unwrap_or(0);
        let default = if parsed.scheme() == "https" { 443 } else { 80 };
        if !self.allowed.iter().any(|a| a.admits(host, port, default)) {
            return Err(refuse(format!(
                "{host}:{port} is not one of the streamer's --callback-hosts"
            )));
        }
        let scope = dispatch_secrets::Scope {
            connector: crate::SERVICE.to_owned(),
            run_id: run_id.to_string(),
            call_id: "delivery".into(),
        };
        let lease = self
            .secrets
            .lease(
                &self.grants,
                scope,
                &[SIGNING_SECRET],
                std::time::Instant::now() + POST_TIMEOUT,
            )
            .await
            .map_err(|e| Failed {
                status: 0,
                error: format!("cannot sign: {e}"),
                // Someone may set it before the next try.
                retry: true,
            })?;
        let key = signing_key(
            lease
                .value(SIGNING_SECRET)
                .map_err(|e| refuse(e.to_string()))?,
        );
        let body = payload(run_id, requested, finished).to_string();
        let id = run_id.to_string();
        let timestamp = now_ms() / 1000;
        let signature = sign(&key, &id, timestamp, &body);
        let answer = self
            .http
            .post(parsed)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
            Ok(response) => Err(Failed {
                status: response.status().as_u16(),
                error: format!("the callback answered {}", response.status()),
                retry: true,
            }),
            Err(e) => Err(Failed {
                status: 0,
                error: lease.scrub(&format!("the callback could not be reached: {e}")),
                retry: true,
            }),
        }
    }

    async fn record(&self, run_id: &RunId, attempt: &DeliveryAttempt) -> Result<(), String> {
        let id = format!("{run_id}:{}", attempt.attempt);
        store(&self.bus, subject::delivery(run_id), &id, attempt).await
    }
}

/// The body of a delivery.
fn payload(run_id: &RunId, requested: &RunRequested, finished: &RunFinished) -> serde_json::Value {
    serde_json::json!({
        "type": "run.finished",
        "timestamp": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "data": {
            "run_id": run_id.to_string(),
            "conversation_id": requested.conversation_id,
            "status": finished.status().word(),
            "reason": finished.reason,
            "summary": finished.summary,
            "report": finished.report,
            "tally": dispatch_chunks::tally(&finished.tally),
        },
    })
}

/// The key a `whsec_…` secret stands for (its base64); any other value is the key's
/// bytes as they are.
fn signing_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// `v1,<base64 HMAC-SHA256 of id.timestamp.body>`.
fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let signature = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(signature)
    )
}

fn without_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example the Standard Webhooks libraries use; the Python one (standardwebhooks
        // 1.1.0) signs it the same.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(signing_key("plain"), b"plain");
        assert_eq!(without_query("https://h/p?token=x#f"), "https://h/p");
    }
}
