//! Work-queue consumption: many copies of a service share one durable pull consumer,
//! so each command is handled by one copy, and each copy bounds how many it handles
//! at once.
//!
//! No message is redelivered forever. Every consumer is declared with
//! [`MAX_DELIVER`] and a growing backoff ([`backoff`]). A message that keeps
//! crashing or failing its handler is worked on at most [`WORK_ATTEMPTS`] times;
//! the deliveries after that ([`Delivery::give_up`]) do not try the work again but
//! record why it was given up (the run ends `blocked`, or the step fails), so even a
//! message that kills its process every time ends with a recorded reason. Transient
//! failures (NATS away for a moment) are retried inside one delivery while its lease
//! is renewed, so an outage does not use up deliveries.
//!
//! A handler that keeps its own schedule of tries (the streamer's deliveries of run
//! results, minutes to hours apart) takes its messages with [`Redelivery::Paced`]: no
//! server backoff, each message handed back with the exact wait the handler asks for,
//! and a bound on deliveries the handler settles before.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::{Bus, Error};

/// A durable consumer on the command stream.
#[derive(Debug, Clone)]
pub struct WorkQueue {
    /// The stream the consumer reads (a work-queue stream, or the goals stream).
    pub stream: &'static str,
    pub consumer: &'static str,
    pub filter_subjects: Vec<String>,
    /// The lease on a fetched command: renewed while its handler runs; once renewals
    /// stop (the process died) for this long, the server hands it to another copy.
    pub ack_wait: Duration,
}

/// A handler's share of its loop's concurrency. A handler that only waits (a run
/// waiting for a person) gives it back for the wait with [`Slot::idle`], so that
/// waiting work does not hold room that running work needs; hundreds of commands can
/// wait while `concurrency` of them run.
#[derive(Clone)]
pub struct Slot(Arc<SlotInner>);

struct SlotInner {
    permits: Arc<Semaphore>,
    held: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl Slot {
    fn new(permits: Arc<Semaphore>, held: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self(Arc::new(SlotInner {
            permits,
            held: std::sync::Mutex::new(Some(held)),
        }))
    }

    /// Runs `wait` without holding the slot, then takes a slot again (waiting for one
    /// if the loop is busy). If `wait` is dropped before it ends, the slot stays given
    /// back: the handler is being cancelled.
    pub async fn idle<T>(&self, wait: impl Future<Output = T>) -> T {
        drop(self.lock().take());
        let out = wait.await;
        let permit = self
            .0
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        *self.lock() = Some(permit);
        out
    }

    /// True while the handler holds a slot (not idle).
    #[cfg(test)]
    fn is_held(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<tokio::sync::OwnedSemaphorePermit>> {
        // An Option assigned whole: nothing half-written to recover from.
        self.0.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many times the server delivers one message before dropping it.
pub const MAX_DELIVER: i64 = 10;

/// Deliveries that attempt the work; the remaining ones only settle the outcome.
pub const WORK_ATTEMPTS: i64 = 7;

/// The redelivery schedule for a consumer whose lease is `lease`: the first
/// redeliveries come one lease after the holder stopped renewing (a crashed copy is
/// replaced quickly), later ones back off, up to ten minutes.
pub fn backoff(lease: Duration) -> Vec<Duration> {
    const CAP: Duration = Duration::from_secs(600);
    [1, 1, 2, 4, 8, 16]
        .iter()
        .map(|factor| (lease * *factor).min(CAP).max(lease))
        .collect()
}

/// Which delivery of its message a handler is working on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub number: i64,
}

impl Delivery {
    pub fn of(message: &jetstream::Message) -> Self {
        let number = message.info().map_or(1, |info| info.delivered.max(1));
        Self { number }
    }

    /// True once the work was attempted [`WORK_ATTEMPTS`] times: the handler must not
    /// try again, but record that the message was given up and why.
    pub fn give_up(self) -> bool {
        self.number > WORK_ATTEMPTS
    }

    /// The reason recorded when a message is given up.
    pub fn give_up_reason(self, what: &str) -> String {
        format!(
            "gave up on {what} after {} deliveries: every attempt crashed, timed out or failed",
            self.number - 1
        )
    }
}

/// Fetches failing one after another: each waits longer (50 ms doubling to 2 s,
/// jittered, so copies that lost the same server spread out), and the outage is said
/// once when it starts and once when it ends, not per attempt.
struct Outage {
    consumer: &'static str,
    delays: Option<backon::ExponentialBackoff>,
    failures: u64,
}

impl Outage {
    fn new(consumer: &'static str) -> Self {
        Self {
            consumer,
            delays: None,
            failures: 0,
        }
    }

    /// A fetch failed with `error`: how long to wait before the next.
    fn failed(&mut self, error: &dyn std::fmt::Display) -> Duration {
        use backon::BackoffBuilder as _;
        self.failures += 1;
        let delays = self.delays.get_or_insert_with(|| {
            tracing::warn!(consumer = self.consumer, error = %error, "fetching failed; retrying with backoff until it works again");
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .without_max_times()
                .build()
        });
        delays.next().unwrap_or(Duration::from_secs(2))
    }

    /// A fetch worked: an outage, if there was one, is over.
    fn over(&mut self) {
        if self.delays.take().is_some() {
            tracing::info!(
                consumer = self.consumer,
                failures = self.failures,
                "fetching works again"
            );
            self.failures = 0;
        }
    }
}

/// How many times a transient failure is retried inside one delivery before the
/// handler hands the message back (about half a minute of retrying).
pub const TRANSIENT_RETRIES: usize = 7;

/// Delays between retries of a transient failure inside one delivery: 250 ms
/// doubling to 8 s, jittered so that copies retrying after one outage spread out.
pub fn retry_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(8))
        .with_jitter()
        .with_max_times(TRANSIENT_RETRIES)
        .build()
}

/// Runs `attempt` until it succeeds or fails for good: a failure `transient` accepts
/// is tried again after the next of [`retry_delays`], inside the same delivery (whose
/// lease keeps being renewed). Returns the last outcome, or `None` if `shutdown` came
/// first.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Option<Result<T, E>>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = retry_delays();
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        let err = match outcome {
            Err(e) if transient(&e) => e,
            done => return Some(done),
        };
        let Some(delay) = delays.next() else {
            return Some(Err(err));
        };
        tracing::warn!(what, error = %err, retry_in_ms = delay.as_millis() as u64, "transient failure, retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Settles a message with what [`retry`] returned for it: acknowledged when done,
/// terminated when it can never succeed (`transient` says no), handed back for the
/// server's backoff schedule when it may succeed later, and handed back at once when
/// this copy is shutting down (`None`), for another copy to take.
pub async fn settle<E: std::fmt::Display>(
    message: &jetstream::Message,
    what: &str,
    outcome: Option<Result<(), E>>,
    transient: impl Fn(&E) -> bool,
) {
    use jetstream::AckKind;
    let ack = match outcome {
        Some(Ok(())) => AckKind::Ack,
        Some(Err(e)) if !transient(&e) => {
            tracing::warn!(what, reason = %e, "dropping a message that can never succeed");
            AckKind::Term
        }
        Some(Err(e)) => {
            let deliveries = Delivery::of(message).number;
            tracing::warn!(what, deliveries, error = %e, "failed, handing it back");
            AckKind::Nak(None)
        }
        None => AckKind::Nak(Some(Duration::from_millis(1))),
    };
    if let Err(e) = message.ack_with(ack).await {
        tracing::warn!(what, error = %e, "cannot settle the message; it will be redelivered");
    }
}

/// Sends in-progress acks (`+WPI`) every third of `ack_wait`, forever.
async fn renew_lease(
    client: async_nats::Client,
    reply: Option<async_nats::Subject>,
    ack_wait: Duration,
) {
    let Some(reply) = reply else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(ack_wait / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = client.publish(reply.clone(), "+WPI".into()).await {
            tracing::warn!(error = %e, "lease renewal failed");
        }
    }
}

/// How long the loop waits for in-flight handlers after shutdown is requested.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// When a work queue's messages come back after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// On the server's schedule: [`backoff`] from the lease, at most [`MAX_DELIVER`]
    /// deliveries (the handler gives up after [`WORK_ATTEMPTS`]).
    Backoff,
    /// On the handler's: it hands a message back with `Nak(Some(delay))` and the server
    /// keeps that delay exactly, which it does only for a consumer without a backoff (a
    /// nak's delay is otherwise stretched by the backoff's steps). A message left
    /// unacknowledged (its holder died) comes back one lease later. At most
    /// `max_deliver` deliveries: the handler must settle a message before that.
    Paced { max_deliver: i64 },
}

/// Fetches commands and runs `handler` on each, at most `concurrency` at a time (not
/// counting handlers idle in [`Slot::idle`]), until `shutdown` fires; then waits up to
/// [`DRAIN_GRACE`] for running handlers. Handlers ack their own messages.
pub async fn consume<F, Fut>(
    bus: &Bus,
    queue: WorkQueue,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: F,
) -> Result<(), Error>
where
    F: Fn(jetstream::Message, Slot) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    consume_with(
        bus,
        queue,
        Redelivery::Backoff,
        concurrency,
        shutdown,
        handler,
    )
    .await
}

/// [`consume`], with messages coming back after a failure as `redelivery` says.
pub async fn consume_with<F, Fut>(
    bus: &Bus,
    queue: WorkQueue,
    redelivery: Redelivery,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: F,
) -> Result<(), Error>
where
    F: Fn(jetstream::Message, Slot) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let js = crate::streams::declaring(bus);
    let stream = crate::streams::declare(&format!("stream {}", queue.stream), || {
        js.get_stream(queue.stream)
    })
    .await?;
    // Create or update: a consumer declared by an older release gets today's limits.
    let (max_deliver, backoff) = match redelivery {
        Redelivery::Backoff => (MAX_DELIVER, backoff(queue.ack_wait)),
        Redelivery::Paced { max_deliver } => (max_deliver, Vec::new()),
    };
    let config = pull::Config {
        durable_name: Some(queue.consumer.to_owned()),
        filter_subjects: queue.filter_subjects.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: queue.ack_wait,
        max_deliver,
        backoff,
        max_ack_pending: 100_000,
        ..Default::default()
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> =
        crate::streams::declare(&format!("consumer {}", queue.consumer), || {
            stream.create_consumer(config.clone())
        })
        .await?;

    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tasks = TaskTracker::new();
    let mut outage = Outage::new(queue.consumer);
    tasks.spawn(crate::metrics::watch_consumer(
        consumer.clone(),
        queue.consumer,
        shutdown.clone(),
    ));
    'fetch: loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
        };
        let want = (permits.available_permits() + 1).min(64);
        let batch = consumer
            .batch()
            .max_messages(want)
            .expires(Duration::from_secs(2))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                let wait = outage.failed(&e);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let mut permit = Some(first);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break 'fetch,
                message = batch.next() => message,
            };
            let Some(message) = message else {
                outage.over();
                break;
            };
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    // Its server gone, the stream without a leader: wait before asking
                    // again rather than asking as fast as the answers come back.
                    let wait = outage.failed(&e);
                    drop(permit.take());
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'fetch,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    break;
                }
            };
            outage.over();
            let held = match permit.take() {
                Some(p) => p,
                None => permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closes"),
            };
            let handler = handler.clone();
            let renew = renew_lease(bus.client().clone(), message.reply.clone(), queue.ack_wait);
            let slot = Slot::new(permits.clone(), held);
            // The handler continues the trace the command was published in.
            let span = tracing::info_span!(
                "process",
                otel.name = %format_args!("process {}", queue.stream),
                otel.kind = "consumer",
                messaging.system = "nats",
                messaging.operation.type = "process",
                messaging.destination.name = %message.subject,
                messaging.consumer.group.name = queue.consumer,
                messaging.nats.delivery = Delivery::of(&message).number,
            );
            crate::trace::follow(&span, message.headers.as_ref());
            tasks.spawn(
                async move {
                    // The command stays ours while the handler runs, however long it
                    // takes; if this process dies, renewals stop and the server
                    // redelivers it.
                    tokio::select! {
                        _ = handler(message, slot) => {}
                        _ = renew => unreachable!("renewing never ends"),
                    }
                }
                .instrument(span),
            );
        }
    }
    tasks.close();
    if tokio::time::timeout(DRAIN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            consumer = queue.consumer,
            "handlers still running after the grace period"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_slot_makes_room_and_is_taken_back_after() {
        let permits = Arc::new(Semaphore::new(1));
        let first = permits.clone().acquire_owned().await.unwrap();
        let slot = Slot::new(permits.clone(), first);
        assert_eq!(permits.available_permits(), 0);

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = {
            let slot = slot.clone();
            tokio::spawn(async move { slot.idle(rx).await })
        };
        // While it waits, another handler gets the room.
        let other = tokio::time::timeout(Duration::from_secs(5), permits.clone().acquire_owned())
            .await
            .expect("the idle slot was given back")
            .unwrap();
        tx.send(()).unwrap();
        tokio::task::yield_now().await;
        assert!(!slot.is_held(), "took a slot the other handler holds");
        drop(other);
        waiting.await.unwrap().unwrap();
        assert!(slot.is_held());
        assert_eq!(permits.available_permits(), 0);
        drop(slot);
        assert_eq!(permits.available_permits(), 1);
    }
}
