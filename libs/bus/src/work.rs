//! Work-queue consumption: many copies of a service share one durable pull consumer,
//! so each command is handled by one copy, and each copy bounds how many it handles
//! at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Fetches commands and runs `handler` on each, at most `concurrency` at a time, until
/// `shutdown` fires; then waits up to [`DRAIN_GRACE`] for running handlers. Handlers
/// ack their own messages.
pub async fn consume<F, Fut>(
    bus: &Bus,
    queue: WorkQueue,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: F,
) -> Result<(), Error>
where
    F: Fn(jetstream::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stream = bus
        .jetstream()
        .get_stream(queue.stream)
        .await
        .map_err(|e| Error::other(&format!("open stream {}", queue.stream), e))?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            queue.consumer,
            pull::Config {
                durable_name: Some(queue.consumer.to_owned()),
                filter_subjects: queue.filter_subjects.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: queue.ack_wait,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::other(&format!("declare consumer {}", queue.consumer), e))?;

    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tasks = TaskTracker::new();
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
                tracing::warn!(consumer = queue.consumer, error = %e, "fetch failed, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let mut permit = Some(first);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break 'fetch,
                message = batch.next() => message,
            };
            let Some(message) = message else { break };
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(consumer = queue.consumer, error = %e, "fetch interrupted");
                    break;
                }
            };
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
            tasks.spawn(async move {
                // The command stays ours while the handler runs, however long it takes;
                // if this process dies, renewals stop and the server redelivers it.
                tokio::select! {
                    _ = handler(message) => {}
                    _ = renew => unreachable!("renewing never ends"),
                }
                drop(held);
            });
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
