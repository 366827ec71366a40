//! Asks: a nudge to whichever copy of a service is up, to carry out a step that a run's
//! log already requests (a policy decision on a requested call, a leaf's gate check).
//!
//! An ask is a core request to a queue group, stored nowhere; the copy that takes it
//! says so at once, before it does the work. The step it names is
//! stored already: the run's log holds the request, and the answer is an event the
//! asked service appends to that log. So the asker needs no queue to keep the ask for
//! it; it waits on the log and asks again while the answer does not come (nobody was up,
//! the copy that took it died). That saves what a work-queue command costs a run: one
//! stored message and two syncs (its store and its removal) per step.
//!
//! What this asks of a handler: it must be idempotent and read everything it acts on
//! from the log (it appends only if the log has no answer yet), since the same ask may
//! reach it twice, or reach two copies. Work that must run at most once and may take
//! long (a tool call) stays a work-queue command.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::{Bus, Error, ErrorKind, subject::Subject};

/// How long an ask waits for a copy to say it took it.
pub const TAKE_WAIT: Duration = Duration::from_secs(2);

/// What became of one ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// A copy took the step and works on it now.
    Taken,
    /// A copy has the step in hand from an earlier ask.
    InHand,
    /// No copy is up, or none said so in [`TAKE_WAIT`].
    Nobody,
}

const TAKEN: &[u8] = b"taken";
const IN_HAND: &[u8] = b"in hand";

/// Asks on `subject`, carrying the current span's trace context, and says whether a
/// copy took it. Nothing more is promised: the asker watches the log for the answer,
/// and asks again while it does not come.
pub async fn ask(bus: &Bus, subject: Subject, payload: Bytes) -> Result<Asked, Error> {
    let mut headers = HeaderMap::new();
    crate::trace::inject(&mut headers);
    let request = async_nats::Request::new()
        .payload(payload)
        .headers(headers)
        .timeout(Some(TAKE_WAIT));
    match bus.client().send_request(subject.clone(), request).await {
        Ok(reply) if reply.payload.as_ref() == IN_HAND => Ok(Asked::InHand),
        Ok(_) => Ok(Asked::Taken),
        Err(e) => match e.kind() {
            async_nats::client::RequestErrorKind::NoResponders
            | async_nats::client::RequestErrorKind::TimedOut => Ok(Asked::Nobody),
            _ => Err(Error::new(
                ErrorKind::Unreachable,
                format!("ask on {subject}: {e}"),
            )),
        },
    }
}

/// One ask in this copy's hands until dropped.
struct InHand {
    asks: Arc<Mutex<HashSet<Bytes>>>,
    key: Bytes,
}

impl Drop for InHand {
    fn drop(&mut self) {
        if let Ok(mut asks) = self.asks.lock() {
            asks.remove(&self.key);
        }
    }
}

/// Takes the asks on `subject` in queue group `group`, says to each asker that it took
/// it, and runs `handler` on each, at most `concurrency` at once (past that, asks wait
/// in the subscription). An ask that this copy is handling already (the same bytes: the
/// asker asked again before the answer came) is answered "in hand" and not run again.
/// Returns when `shutdown` fires, after waiting up to [`crate::work::DRAIN_GRACE`] for
/// running handlers; fails only when the subscription cannot be made.
pub async fn serve<F, Fut>(
    bus: &Bus,
    subject: &'static str,
    group: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: F,
) -> Result<(), Error>
where
    F: Fn(async_nats::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut asks = bus
        .client()
        .queue_subscribe(subject, group.to_owned())
        .await
        .map_err(|e| Error::new(ErrorKind::Unreachable, format!("take {subject}: {e}")))?;
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let in_hand: Arc<Mutex<HashSet<Bytes>>> = Arc::default();
    let tasks = TaskTracker::new();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = asks.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let key = message.payload.clone();
        let again = match in_hand.lock() {
            Ok(mut asks) => !asks.insert(key.clone()),
            Err(_) => false,
        };
        if again {
            reply(bus, &message, IN_HAND).await;
            continue;
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
        };
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("process {subject}"),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = subject,
            messaging.consumer.group.name = group,
        );
        crate::trace::follow(&span, message.headers.as_ref());
        reply(bus, &message, TAKEN).await;
        let handler = handler.clone();
        let held = InHand {
            asks: in_hand.clone(),
            key,
        };
        tasks.spawn(
            async move {
                let _permit = permit;
                // Let go of the step however the handler ends, panics included.
                let _held = held;
                handler(message).await;
            }
            .instrument(span),
        );
    }
    tasks.close();
    if tokio::time::timeout(crate::work::DRAIN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(subject, "handlers still running after the grace period");
    }
    Ok(())
}

/// Tells the asker what became of its ask; an asker that is gone is no matter.
async fn reply(bus: &Bus, message: &async_nats::Message, word: &'static [u8]) {
    if let Some(reply) = message.reply.clone() {
        let _ = bus.client().publish(reply, Bytes::from_static(word)).await;
    }
}
