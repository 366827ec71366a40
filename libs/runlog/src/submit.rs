//! Handing a goal to Dispatch — what ingress and the CLI both do — and turning a stored
//! goal into the first event of its run.

use async_nats::jetstream::stream::DirectGetErrorKind;
use dispatch_bus::{Bus, ConversationId, RunId, async_nats, streams, subject};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_proto::run::v1::{RunRequested, run_event::Body};
use prost::Message as _;

use crate::{Error, ErrorKind, RunHandle};

/// A goal as an origin hands it over, already validated.
#[derive(Debug, Clone)]
pub struct Goal {
    pub goal: String,
    pub conversation: ConversationId,
    pub timeout_ms: u64,
    pub origin: String,
}

/// Stores the goal on `dispatch.goal.<run_id>` and returns the run id once JetStream
/// has acknowledged it: one durable write, and nothing can lose the goal afterwards. A
/// dispatcher turns it into the run's first event (`RunRequested`) when it takes it; the
/// ledger shows it as queued meanwhile.
pub async fn submit_goal(bus: &Bus, goal: Goal) -> Result<RunId, Error> {
    let run_id = RunId::new();
    let command = SubmitGoal {
        run_id: run_id.to_string(),
        request_event_id: uuid::Uuid::now_v7().to_string(),
        goal: goal.goal,
        conversation_id: goal.conversation.to_string(),
        timeout_ms: goal.timeout_ms,
        origin: goal.origin,
        submitted_at_unix_ms: crate::handle::now_unix_ms(),
    };
    bus.append(
        subject::goal(&run_id),
        &command.run_id,
        None,
        command.encode_to_vec().into(),
    )
    .await?;
    Ok(run_id)
}

/// The stored goal of `run_id`, if there is one.
pub async fn find_goal(bus: &Bus, run_id: &RunId) -> Result<Option<SubmitGoal>, Error> {
    let stream = bus
        .jetstream()
        .get_stream(streams::GOALS)
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unreachable,
                format!("open stream {}: {e}", streams::GOALS),
            )
        })?;
    match stream
        .direct_get_last_for_subject(subject::goal(run_id).as_str())
        .await
    {
        Ok(message) => SubmitGoal::decode(message.payload.as_ref())
            .map(Some)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("goal of run {run_id} does not decode: {e}"),
                )
            }),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::new(
            ErrorKind::Unreachable,
            format!("read goal of run {run_id}: {e}"),
        )),
    }
}

/// The `RunRequested` event a goal stands for.
pub fn requested(command: &SubmitGoal) -> RunRequested {
    RunRequested {
        goal: command.goal.clone(),
        conversation_id: command.conversation_id.clone(),
        timeout_ms: command.timeout_ms,
        origin: command.origin.clone(),
    }
}

/// Makes sure the run's log starts with the goal's `RunRequested`. It carries the id the
/// goal named, so whoever writes it first — the dispatcher taking the goal, or a stop of
/// a still-queued run — the others find it instead of adding a second one.
pub async fn record_request(
    handle: &mut RunHandle,
    command: &SubmitGoal,
) -> Result<RunRequested, Error> {
    let pick = |b: &Body| match b {
        Body::RunRequested(r) => Some(r.clone()),
        _ => None,
    };
    if let Some(found) = handle.bodies().find_map(pick) {
        return Ok(found);
    }
    let body = Body::RunRequested(requested(command));
    handle
        .append_with_id(command.request_event_id.clone(), body, &command.run_id)
        .await?;
    Ok(handle.bodies().find_map(pick).expect("just recorded"))
}
