//! Answering requests in a queue group: one copy of a service answers each request, a
//! bounded number at once, until shutdown. The policy service and the scheduler answer
//! their `dispatch.req.*` requests this way.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{Bus, Error, ErrorKind};

/// Takes the requests on `subject` in queue group `group` and publishes what `answer`
/// makes of each to its reply subject (`None`: no answer, e.g. an unknown subject). At
/// most `concurrency` are answered at once; past that, requests wait in the
/// subscription. Returns when `shutdown` fires or the subscription ends; fails only
/// when the subscription cannot be made.
pub async fn serve<F, Fut>(
    bus: &Bus,
    subject: &'static str,
    group: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    answer: F,
) -> Result<(), Error>
where
    F: Fn(async_nats::Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<Vec<u8>>> + Send + 'static,
{
    let client = bus.client().clone();
    let mut requests = client
        .queue_subscribe(subject, group.to_owned())
        .await
        .map_err(|e| Error::new(ErrorKind::Unreachable, format!("take {subject}: {e}")))?;
    let permits = Arc::new(Semaphore::new(concurrency));
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = requests.next() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Ok(());
        };
        let (answer, client) = (answer.clone(), client.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let request = message.subject.clone();
            if let Some(body) = answer(message).await
                && let Err(e) = client.publish(reply, body.into()).await
            {
                tracing::warn!(subject = %request, error = %e, "cannot answer a request");
            }
        });
    }
}
