//! Handing a goal to Dispatch: what ingress and the CLI both do.

use dispatch_bus::{Bus, ConversationId, RunId, subject};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_proto::run::v1::{RunRequested, run_event::Body};
use prost::Message as _;

use crate::{Error, RunLog};

/// A goal as an origin hands it over, already validated.
#[derive(Debug, Clone)]
pub struct Goal {
    pub goal: String,
    pub conversation: ConversationId,
    pub timeout_ms: u64,
    pub origin: String,
}

/// The goal's run id, returned once the goal is durably stored.
///
/// The goal command goes first: once it is stored, a dispatcher will carry the run to a
/// terminal state even if nothing else here succeeds. The `RunRequested` event follows
/// so that views show the run as queued before any dispatcher picks it up; it carries
/// the id named in the command, so if a dispatcher appends it first the two agree and
/// the second append is dropped.
pub async fn submit_goal(bus: &Bus, log: &RunLog, goal: Goal) -> Result<RunId, Error> {
    let run_id = RunId::new();
    let request_event_id = uuid::Uuid::now_v7().to_string();
    let command = SubmitGoal {
        run_id: run_id.to_string(),
        request_event_id: request_event_id.clone(),
        goal: goal.goal.clone(),
        conversation_id: goal.conversation.to_string(),
        timeout_ms: goal.timeout_ms,
        origin: goal.origin.clone(),
        submitted_at_unix_ms: crate::handle::now_unix_ms(),
    };
    bus.append(
        subject::cmd::goal(),
        &command.run_id,
        None,
        None,
        command.encode_to_vec().into(),
    )
    .await?;
    let mut handle = log.new_run(run_id);
    let appended = handle
        .append_with_id(
            request_event_id,
            Body::RunRequested(requested(&command)),
            &command.run_id,
        )
        .await;
    if let Err(err) = appended {
        // The command is stored, so the run will happen; the dispatcher writes the
        // request event itself when it finds none.
        tracing::warn!(run_id = %run_id, error = %err, "goal stored, request event deferred to the dispatcher");
    }
    Ok(run_id)
}

/// The `RunRequested` event a goal command stands for.
pub fn requested(command: &SubmitGoal) -> RunRequested {
    RunRequested {
        goal: command.goal.clone(),
        conversation_id: command.conversation_id.clone(),
        timeout_ms: command.timeout_ms,
        origin: command.origin.clone(),
    }
}
