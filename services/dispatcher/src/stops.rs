//! Stop commands (`dispatch.cmd.stop`) from the front doors that write no run logs
//! (HTTP, gRPC): the dispatcher records the request in the run's log, and ends the run
//! `stopped` itself if its owner has not within the grace period.

use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::work::{self, Delivery, WorkQueue};
use dispatch_bus::{RunId, streams, subject};
use dispatch_proto::command::v1::StopRun;
use dispatch_runlog::stop::{MAX_GRACE, Stopped};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::Context;

/// Stops one copy waits out at once. Each holds a command for at most its grace period.
const CONCURRENCY: usize = 64;

/// The most of `requested_by` a stop records.
const REQUESTED_BY_CHARS: usize = 64;

/// Takes stop commands until `shutdown`.
pub async fn serve(
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> Result<(), dispatch_bus::Error> {
    let queue = WorkQueue {
        stream: streams::COMMANDS,
        consumer: streams::consumers::DISPATCHER_STOPS,
        filter_subjects: vec![subject::cmd::STOP.to_owned()],
        ack_wait: ctx.lease,
    };
    let bus = ctx.bus.clone();
    work::consume(&bus, queue, CONCURRENCY, shutdown, move |message, _slot| {
        handle(ctx.clone(), message)
    })
    .await
}

async fn handle(ctx: Arc<Context>, message: jetstream::Message) {
    let delivery = Delivery::of(&message);
    let Ok(command) = StopRun::decode(&message.payload[..]) else {
        tracing::warn!("a stop command that does not decode; dropped");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    let Ok(run_id) = command.run_id.parse::<RunId>() else {
        tracing::warn!(
            run_id = dispatch_runlog::slice_bytes(&command.run_id, 64),
            "a stop command for no run; dropped"
        );
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    if delivery.give_up() {
        tracing::error!(%run_id, deliveries = delivery.number, "giving up on a stop command that never went through");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    }
    let by = requested_by(&command.requested_by);
    let grace = Duration::from_millis(command.grace_ms).min(MAX_GRACE);
    match dispatch_runlog::stop::stop(&ctx.log, run_id, grace, command.force, &by).await {
        Ok(stopped) => {
            match stopped {
                Stopped::Now => tracing::info!(%run_id, by, "run stopped"),
                Stopped::Already => tracing::debug!(%run_id, "stop of a run that had ended"),
                Stopped::NoSuchRun => tracing::warn!(%run_id, "stop of a run nobody asked for"),
            }
            let _ = message.ack().await;
        }
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
            tracing::error!(%run_id, error = %e, "the run's log does not verify; not stopping it");
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::warn!(%run_id, error = %e, "stop not recorded yet; handing it back");
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// Who asked, as the log records it: printable, bounded, never empty.
fn requested_by(asked: &str) -> String {
    let by = dispatch_runlog::one_line(asked, REQUESTED_BY_CHARS);
    if by.is_empty() { "api".to_owned() } else { by }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_asked_is_printable_and_bounded() {
        assert_eq!(requested_by(""), "api");
        assert_eq!(requested_by("http:key1"), "http:key1");
        let hostile = requested_by(&format!("\x1b[2J{}", "x".repeat(500)));
        assert!(hostile.chars().count() <= REQUESTED_BY_CHARS);
        assert!(!hostile.chars().any(char::is_control));
    }
}
