//! Stop commands (`dispatch.cmd.stop`) from the front doors, which write no run logs
//! (the CLI, HTTP, gRPC): the dispatcher records the request in the run's log, and ends
//! the run `stopped` itself if its owner has not within the grace period.
//!
//! And the runs nothing asked for (`dispatch.cmd.ghost`, from the ledger): a log that
//! starts with a request no goal names has no owner and would stay `doing` for ever.
//! The dispatcher checks that no goal names it and ends it `blocked`.

use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::work::{self, Delivery, WorkQueue};
use dispatch_bus::{RunId, streams, subject};
use dispatch_proto::command::v1::{EndGhost, StopRun};
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
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
        filter_subjects: vec![
            subject::cmd::STOP.to_owned(),
            subject::cmd::GHOST.to_owned(),
        ],
        ack_wait: ctx.lease,
    };
    let bus = ctx.bus.clone();
    work::consume(&bus, queue, CONCURRENCY, shutdown, move |message, _slot| {
        handle(ctx.clone(), message)
    })
    .await
}

async fn handle(ctx: Arc<Context>, message: jetstream::Message) {
    if message.subject.as_str() == subject::cmd::GHOST {
        return ghost(ctx, message).await;
    }
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

/// How far back a run's request may be for its goal to be looked for: goals are kept
/// 30 days ([`dispatch_bus::streams`]), so past that an absent goal proves nothing.
pub(crate) const GHOST_HORIZON: Duration = Duration::from_secs(29 * 24 * 3600);

/// The reason a run nothing asked for ends with.
pub(crate) const GHOST_REASON: &str = "ghost: no goal was submitted for this run (its log was not started by a dispatcher taking a goal)";

/// Ends the run an `EndGhost` names, if it is one: its log starts with a request,
/// recent enough that its goal would still be kept, no goal names it, and it has not
/// ended. Anything else is left as it is, so a forged command costs a read.
async fn ghost(ctx: Arc<Context>, message: jetstream::Message) {
    let delivery = Delivery::of(&message);
    let run_id = match EndGhost::decode(&message.payload[..]).map(|c| c.run_id.parse::<RunId>()) {
        Ok(Ok(run_id)) => run_id,
        _ => {
            tracing::warn!("a ghost command for no run; dropped");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    if delivery.give_up() {
        tracing::error!(%run_id, deliveries = delivery.number, "giving up on a ghost command");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    }
    match end_ghost(&ctx, run_id).await {
        Ok(true) => {
            tracing::warn!(%run_id, "ended a run that no goal asked for");
            let _ = message.ack().await;
        }
        Ok(false) => {
            let _ = message.ack().await;
        }
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
            tracing::error!(%run_id, error = %e, "the run's log does not verify; not ending it");
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::warn!(%run_id, error = %e, "ghost check not done yet; handing it back");
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// Whether `run_id` was a ghost, now ended.
async fn end_ghost(ctx: &Context, run_id: RunId) -> Result<bool, dispatch_runlog::Error> {
    let Some(first) = ctx.log.first_event(&run_id).await? else {
        return Ok(false);
    };
    if !matches!(first.event.body, Some(Body::RunRequested(_))) {
        // Its log does not verify: readers show it corrupt.
        return Ok(false);
    }
    // When the server stored it, not when it says it was written.
    let stored_at = ctx.log.first_stored_at_ms(&run_id).await?.unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if now.saturating_sub(stored_at) > GHOST_HORIZON.as_millis() as u64 {
        return Ok(false);
    }
    if dispatch_runlog::submit::find_goal(&ctx.bus, &run_id)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let mut run = ctx.log.handle(run_id).await?;
    if run.is_finished() {
        return Ok(false);
    }
    match run
        .finish(RunStatus::Blocked, GHOST_REASON, GHOST_REASON, "ghost")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => Ok(false),
        Err(e) => Err(e),
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
