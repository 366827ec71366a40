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
//! reason, summary, report, tally}}`. Only hosts in `--callback-hosts` are called, and no
//! redirect is followed.
//!
//! Tries follow a schedule ([`Schedule`]; by default the one Standard Webhooks suggests:
//! at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h after the try before), for
//! every failure alike: an answer other than 2xx, no answer, or no signing secret (it
//! may be set before the next try). A callback that can never be called (a host not
//! allowed) is given up at once. The schedule is kept from the record, not from the
//! server's count of deliveries: every try is recorded on `dispatch.delivery.<run_id>`
//! (a `DeliveryAttempt`, appended with optimistic concurrency on that subject) before
//! the next, with when the next is due, and the command is handed back to the server
//! with exactly the wait until then (the consumer has no backoff, which would stretch
//! such waits). A command that comes back early (a copy died, the server restarted) is
//! handed back again for what is left of the wait, without a try.
//!
//! After its last try a delivery is given up, and stays so until an operator re-sends
//! it (`dispatch deliveries resend`): a `DeliverRun` of the next round, whose tries
//! start at once and follow the schedule again. The record is only ever appended to;
//! each try names its round, and a command of an older round than the record's newest
//! is dropped.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::subject::LogWriter;
use dispatch_bus::work::{self, Delivery, Redelivery, WorkQueue};
use dispatch_bus::{Bus, ErrorKind, RunId, streams, subject};
use dispatch_proto::command::v1::{DeliverRun, DeliveryAttempt};
use dispatch_proto::run::v1::{RunFinished, RunRequested, run_event::Body};
use dispatch_secrets::DELIVERY_SIGNING;
use dispatch_service::hosts::AllowedHost;
use hmac::Mac as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most deliveries one copy makes at once.
const CONCURRENCY: usize = 32;
/// How many times the server hands one command out before dropping it: every try, and
/// every early return (a copy died, the server restarted, a lost race), well above
/// [`Schedule::MAX_TRIES`]. The command before the last is given up and recorded.
const MAX_DELIVER: i64 = 100;
/// How soon a command is looked at again after something in the way of deciding
/// (the run or the record could not be read, another copy recorded first).
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// When a delivery is tried: the wait before each try, the first counted from the run's
/// end (its command's queueing) or from an operator's re-send, each later one from the
/// try before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(Vec<Duration>);

impl Schedule {
    /// Standard Webhooks' suggested schedule, as its text gives it.
    pub const STANDARD_WEBHOOKS: &str = "0s,5s,5m,30m,2h,5h,10h,10h";
    /// Most tries in a round: the record keeps 100 tries per run.
    pub const MAX_TRIES: usize = 20;
    /// The longest wait between two tries.
    pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

    /// `0s,5s,5m,…`: one duration per try.
    pub fn parse(text: &str) -> Result<Self, String> {
        let waits = text
            .split(',')
            .map(|part| {
                humantime::parse_duration(part.trim())
                    .map_err(|e| format!("{part:?} is not a duration like 5s, 5m or 2h ({e})"))
                    .and_then(|wait| {
                        if wait > Self::MAX_WAIT {
                            Err(format!("{part:?}: a wait is at most 24h"))
                        } else {
                            Ok(wait)
                        }
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if waits.len() > Self::MAX_TRIES {
            return Err(format!("at most {} tries", Self::MAX_TRIES));
        }
        Ok(Self(waits))
    }

    /// How many tries a round has.
    pub fn tries(&self) -> u32 {
        self.0.len() as u32
    }

    /// The wait before try `n` (1-based); `None` past the last.
    fn before(&self, n: u32) -> Option<Duration> {
        self.0.get((n as usize).checked_sub(1)?).copied()
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Self::parse(Self::STANDARD_WEBHOOKS).expect("the standard schedule parses")
    }
}

/// Queues the delivery of `run_id`'s result; idempotent per run.
pub async fn queue(bus: &Bus, run_id: &RunId) -> Result<(), String> {
    let command = DeliverRun {
        run_id: run_id.to_string(),
        ..Default::default()
    };
    store(
        bus,
        subject::cmd::deliver(),
        &format!("deliver-{run_id}"),
        None,
        &command,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Publishes `message` on `to` once (`Nats-Msg-Id`: `id`) and waits until it is stored;
/// with `expected`, only if the subject's last message is at that sequence.
async fn store(
    bus: &Bus,
    to: subject::Subject,
    id: &str,
    expected: Option<u64>,
    message: &impl prost::Message,
) -> Result<(), dispatch_bus::Error> {
    bus.append(to, id, expected, message.encode_to_vec().into())
        .await
        .map(drop)
}

/// What every delivery needs.
pub struct Deliverer {
    bus: Bus,
    runs: dispatch_bus::reads::Reader,
    record: dispatch_bus::reads::Reader,
    http: reqwest::Client,
    secrets: dispatch_secrets::Store,
    grants: dispatch_secrets::Grants,
    allowed: Vec<AllowedHost>,
    schedule: Schedule,
}

/// Why a try did not deliver, and whether another may.
struct Failed {
    status: u16,
    error: String,
    retry: bool,
}

/// What to do with a command now.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Try: the try's number in its round.
    Try(u32),
    /// Not yet: try `attempt` after this long.
    Wait(u32, Duration),
    /// Nothing more: delivered, given up, or superseded by a later round.
    Settled,
}

/// What the record says of the command's round, and so whether to try now. `round` is
/// the command's, `last` the record's newest try, `queued_ms` when the command was
/// stored.
fn next(
    schedule: &Schedule,
    round: u32,
    last: Option<&DeliveryAttempt>,
    queued_ms: i64,
    now_ms: i64,
) -> Next {
    let wait_until = |due_ms: i64, n: u32| {
        if now_ms >= due_ms {
            Next::Try(n)
        } else {
            Next::Wait(n, Duration::from_millis((due_ms - now_ms) as u64))
        }
    };
    match last {
        Some(last) if last.round.max(1) > round => Next::Settled,
        Some(last) if last.round.max(1) == round => {
            if last.delivered || last.gave_up {
                return Next::Settled;
            }
            match schedule.before(last.attempt + 1) {
                Some(wait) => {
                    wait_until(last.at_unix_ms + wait.as_millis() as i64, last.attempt + 1)
                }
                // A record of a longer schedule than this copy's: one more try, now.
                None => Next::Try(last.attempt + 1),
            }
        }
        // The round's first try: a re-send at once, the first round after the first
        // wait from the run's end.
        _ if round > 1 => Next::Try(1),
        _ => {
            let wait = schedule.before(1).unwrap_or_default();
            wait_until(queued_ms + wait.as_millis() as i64, 1)
        }
    }
}

impl Deliverer {
    pub async fn new(
        bus: &Bus,
        workspace: &std::path::Path,
        allowed: Vec<AllowedHost>,
        schedule: Schedule,
    ) -> Result<Self, String> {
        let runs = bus
            .jetstream()
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| format!("open the run-log stream: {e}"))?;
        let record = bus
            .jetstream()
            .get_stream(streams::DELIVERIES)
            .await
            .map_err(|e| format!("open the deliveries stream: {e}"))?;
        let key_path = dispatch_secrets::key_path(workspace);
        let key = dispatch_secrets::Key::load(&key_path).map_err(|e| e.to_string())?;
        let secrets = dispatch_secrets::Store::open(bus, key_path, key)
            .await
            .map_err(|e| e.to_string())?;
        let mut grants = dispatch_secrets::Grants::default();
        grants.grant(crate::SERVICE, DELIVERY_SIGNING);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(POST_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            bus: bus.clone(),
            runs: dispatch_bus::reads::Reader::new(runs),
            record: dispatch_bus::reads::Reader::new(record),
            http,
            secrets,
            grants,
            allowed,
            schedule,
        })
    }

    /// Takes delivery commands until `shutdown`. `lease` is how long a command being
    /// tried stays this copy's after it stops renewing it (it died).
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
        let paced = Redelivery::Paced {
            max_deliver: MAX_DELIVER,
        };
        work::consume_with(
            &bus,
            queue,
            paced,
            CONCURRENCY,
            shutdown,
            move |message, _slot| {
                let me = self.clone();
                async move { me.handle(message).await }
            },
        )
        .await
    }

    async fn handle(&self, message: jetstream::Message) {
        let ack = self.decide(&message).await;
        if let Err(e) = message.ack_with(ack).await {
            tracing::warn!(error = %e, "cannot settle a delivery command; it comes back");
        }
    }

    /// Tries the command's delivery if it is due, records the try, and says how the
    /// command is settled.
    async fn decide(&self, message: &jetstream::Message) -> AckKind {
        let look_again = AckKind::Nak(Some(LOOK_AGAIN));
        let Ok(command) = DeliverRun::decode(&message.payload[..]) else {
            tracing::warn!("a delivery command that does not decode; dropped");
            return AckKind::Term;
        };
        let Ok(run_id) = command.run_id.parse::<RunId>() else {
            tracing::warn!(
                run_id = command.run_id,
                "a delivery command for no run; dropped"
            );
            return AckKind::Term;
        };
        let (requested, finished) = match self.run(&run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => {
                tracing::warn!(%run_id, "a delivery for a run that has not ended; dropped");
                return AckKind::Term;
            }
            Err(e) => {
                tracing::warn!(%run_id, error = e, "cannot read the run to deliver it");
                return look_again;
            }
        };
        let url = requested.callback_url.clone();
        if url.is_empty() {
            return AckKind::Ack;
        }
        let last = match self.last_try(&run_id).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(%run_id, error = e, "cannot read the delivery record");
                return look_again;
            }
        };
        let round = command.round.max(1);
        let queued_ms = message.info().map_or_else(
            |_| now_ms(),
            |i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64,
        );
        // The server drops a command after its last delivery: the one before is the
        // last chance to record that it was given up, rather than lose it unsaid.
        let last_chance = Delivery::of(message).number >= MAX_DELIVER - 1;
        let (attempt, outcome) = match next(
            &self.schedule,
            round,
            last.as_ref().map(|(_, a)| a),
            queued_ms,
            now_ms(),
        ) {
            Next::Settled => return AckKind::Term,
            Next::Wait(attempt, _) | Next::Try(attempt) if last_chance => {
                let given_up = Failed {
                    status: 0,
                    error: format!(
                        "given up: the command came back {MAX_DELIVER} times without being settled"
                    ),
                    retry: false,
                };
                (attempt, Err(given_up))
            }
            Next::Wait(_, wait) => return AckKind::Nak(Some(wait)),
            Next::Try(attempt) => {
                let outcome = self.post(&run_id, &url, &requested, &finished).await;
                (attempt, outcome)
            }
        };
        let mut record = DeliveryAttempt {
            run_id: run_id.to_string(),
            attempt,
            url: without_query(&url),
            at_unix_ms: now_ms(),
            webhook_id: run_id.to_string(),
            round,
            requested_by: command.requested_by.clone(),
            tries: self.schedule.tries(),
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
                match self.schedule.before(attempt + 1).filter(|_| failed.retry) {
                    Some(wait) => {
                        record.next_try_unix_ms = record.at_unix_ms + wait.as_millis() as i64;
                        AckKind::Nak(Some(wait))
                    }
                    None => {
                        record.gave_up = true;
                        AckKind::Term
                    }
                }
            }
        };
        let expected = last.as_ref().map_or(0, |(seq, _)| *seq);
        if let Err(e) = self.record(&run_id, &record, expected).await {
            // Another copy recorded a try first: decide again on what it wrote.
            // Unrecorded, the try is made again: the record comes before the next.
            if e.kind() != ErrorKind::Conflict {
                tracing::warn!(%run_id, error = %e, "cannot record a delivery attempt");
            }
            return look_again;
        }
        tracing::info!(%run_id, round, attempt, status = record.status, delivered = record.delivered, gave_up = record.gave_up, next_try_unix_ms = record.next_try_unix_ms, "delivery attempt");
        ack
    }

    /// The newest entry of the run's delivery record, with its stream sequence.
    async fn last_try(&self, run_id: &RunId) -> Result<Option<(u64, DeliveryAttempt)>, String> {
        let Some(message) = self
            .record
            .last(subject::delivery(run_id).as_str())
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let attempt = DeliveryAttempt::decode(&message.payload[..])
            .map_err(|e| format!("the record's last entry does not decode: {e}"))?;
        Ok(Some((message.sequence, attempt)))
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
                &[DELIVERY_SIGNING],
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
                .value(DELIVERY_SIGNING)
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

    /// Appends a try to the run's record, if its last entry is still at `expected`.
    async fn record(
        &self,
        run_id: &RunId,
        attempt: &DeliveryAttempt,
        expected: u64,
    ) -> Result<(), dispatch_bus::Error> {
        let id = format!("{run_id}:{}:{}", attempt.round, attempt.attempt);
        store(
            &self.bus,
            subject::delivery(run_id),
            &id,
            Some(expected),
            attempt,
        )
        .await
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

    #[test]
    fn the_default_schedule_is_the_one_standard_webhooks_suggests() {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(
            Schedule::default().0,
            [
                Duration::ZERO,
                Duration::from_secs(5),
                minutes(5),
                minutes(30),
                minutes(120),
                minutes(300),
                minutes(600),
                minutes(600),
            ]
        );
        assert_eq!(Schedule::parse("0s, 250ms").unwrap().tries(), 2);
        for bad in ["", "5", "soon", "25h", &"1s,".repeat(21)] {
            assert!(
                Schedule::parse(bad.trim_end_matches(',')).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn each_try_waits_its_turn_from_the_try_before_and_a_round_settles_once() {
        let schedule = Schedule::parse("0s,5s,5m").unwrap();
        let tried = |round, attempt, at_unix_ms| DeliveryAttempt {
            round,
            attempt,
            at_unix_ms,
            status: 500,
            ..Default::default()
        };
        // The first try at once; the second 5 s after the first, whenever it comes back.
        assert_eq!(next(&schedule, 1, None, 1_000, 1_000), Next::Try(1));
        let first = tried(1, 1, 10_000);
        assert_eq!(
            next(&schedule, 1, Some(&first), 0, 10_003),
            Next::Wait(2, Duration::from_millis(4_997))
        );
        assert_eq!(next(&schedule, 1, Some(&first), 0, 15_000), Next::Try(2));
        // The third five minutes after the second.
        let second = tried(1, 2, 15_000);
        assert_eq!(
            next(&schedule, 1, Some(&second), 0, 16_000),
            Next::Wait(3, Duration::from_millis(299_000))
        );
        // Delivered or given up: nothing more in that round.
        let delivered = DeliveryAttempt {
            delivered: true,
            ..tried(1, 2, 15_000)
        };
        assert_eq!(
            next(&schedule, 1, Some(&delivered), 0, 20_000),
            Next::Settled
        );
        let gave_up = DeliveryAttempt {
            gave_up: true,
            ..tried(1, 3, 315_000)
        };
        assert_eq!(
            next(&schedule, 1, Some(&gave_up), 0, 400_000),
            Next::Settled
        );
        // A re-send starts the next round at once; the old round's command is dropped
        // when it comes back.
        assert_eq!(next(&schedule, 2, Some(&gave_up), 0, 400_000), Next::Try(1));
        let resent = tried(2, 1, 400_000);
        assert_eq!(next(&schedule, 1, Some(&resent), 0, 900_000), Next::Settled);
        // A record from before rounds (round 0) is the first round's.
        assert_eq!(
            next(&schedule, 1, Some(&tried(0, 1, 10_000)), 0, 11_000),
            Next::Wait(2, Duration::from_millis(4_000))
        );
    }
}
