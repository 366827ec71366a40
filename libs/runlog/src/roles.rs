//! Who writes what: each event kind has one writer role, and a run's log is trusted only
//! if every event in it was written by its kind's role.
//!
//! Two facts say who wrote an event, and both must name the same role:
//! - the subject the server stored it on, `dispatch.run.<account>.<run_id>.<role>`,
//!   which only that role's identity may publish to (the server enforces it);
//! - the event's own `role`, which its hash covers, so a seal certifies it and an
//!   exported trail can be checked offline.
//!
//! The rule itself is [`may_write`]. It is written out in ARCHITECTURE.md ("Who writes
//! what") so a third party can apply it to a log without this code.

use dispatch_bus::subject::LogWriter;
use dispatch_proto::run::v1::{Decision, MEMO_RULE, RunEvent, WriterRole, run_event::Body};

/// The role of the identity that may publish on `writer`'s subjects, as events name it.
pub fn role_of(writer: LogWriter) -> WriterRole {
    match writer {
        LogWriter::Dispatcher => WriterRole::Dispatcher,
        LogWriter::Policy => WriterRole::Policy,
        LogWriter::Connectors => WriterRole::Connectors,
    }
}

/// The subjects a role appends on.
pub fn writer_of(role: WriterRole) -> Option<LogWriter> {
    match role {
        WriterRole::Dispatcher => Some(LogWriter::Dispatcher),
        WriterRole::Policy => Some(LogWriter::Policy),
        WriterRole::Connectors => Some(LogWriter::Connectors),
        WriterRole::Unspecified => None,
    }
}

/// Whether `role` may write `body`; `Err` says why not.
///
/// - the dispatcher: the run's lifecycle (`RunRequested`, `RunStarted`, `ServiceWoken`,
///   `StopRequested`, `FeedbackQueued`, `RunFinished`), a chat turn's place and context
///   (`TurnOrdered`, `TurnContext`), plans (`PlanAuthored`,
///   `PlanRejected`), leaves and turns (`LeafStarted`, `LeafFinished`, `ModelTurn`,
///   `OutputDelta`), call requests (`ToolCallRequested`); and two refusals that only
///   ever deny: a `PolicyDecided` that denies under the `denial-memo` rule, and an
///   `ApprovalResolved` that denies because the request expired;
/// - policy: `PolicyDecided`, `ApprovalRequested`, `ApprovalResolved`, and
///   `CommandAbandoned` of a `policy` command;
/// - connectors: `ToolCallStarted`, `ToolCallCompleted`, `ToolCallFailed`,
///   `GateChecked`, and `CommandAbandoned` of a `tool` or `gate` command.
pub fn may_write(role: WriterRole, body: &Body) -> Result<(), String> {
    use WriterRole::{Connectors, Dispatcher, Policy};
    let allowed = match body {
        Body::RunRequested(_)
        | Body::PlanAuthored(_)
        | Body::PlanRejected(_)
        | Body::RunStarted(_)
        | Body::ServiceWoken(_)
        | Body::TurnOrdered(_)
        | Body::TurnContext(_)
        | Body::LeafStarted(_)
        | Body::LeafFinished(_)
        | Body::ModelTurn(_)
        | Body::OutputDelta(_)
        | Body::ToolCallRequested(_)
        | Body::StopRequested(_)
        | Body::FeedbackQueued(_)
        | Body::RunFinished(_) => role == Dispatcher,
        Body::PolicyDecided(d) => {
            role == Policy
                || role == Dispatcher && d.decision() == Decision::Deny && d.rule == MEMO_RULE
        }
        Body::ApprovalRequested(_) => role == Policy,
        Body::ApprovalResolved(r) => {
            role == Policy || role == Dispatcher && r.decision() == Decision::Deny && r.expired
        }
        Body::ToolCallStarted(_)
        | Body::ToolCallCompleted(_)
        | Body::ToolCallFailed(_)
        | Body::GateChecked(_) => role == Connectors,
        Body::CommandAbandoned(a) => match a.command.as_str() {
            "policy" => role == Policy,
            "tool" | "gate" => role == Connectors,
            _ => false,
        },
    };
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "a {} event written by {}, which may not write it",
            body.kind(),
            name(role)
        ))
    }
}

/// The role that writes events of `body`'s kind (besides the dispatcher's two
/// refusals, see [`may_write`]).
pub fn writer_for(body: &Body) -> WriterRole {
    [
        WriterRole::Dispatcher,
        WriterRole::Policy,
        WriterRole::Connectors,
    ]
    .into_iter()
    .find(|role| may_write(*role, body).is_ok())
    .unwrap_or(WriterRole::Unspecified)
}

/// Checks who wrote `event`: its `role` is the role of the subject it was stored on
/// (`stored_as`; `None` for an exported trail, whose subjects are not known) and may
/// write its kind; and a run starts with `RunRequested`, which nothing else is.
pub fn check(event: &RunEvent, stored_as: Option<LogWriter>) -> Result<(), String> {
    let role = event.role();
    let Some(body) = &event.body else {
        return Err("the event has no body".into());
    };
    if let Some(subject) = stored_as
        && role_of(subject) != role
    {
        return Err(format!(
            "stored on the {} subject but names {} as its writer",
            subject.token(),
            name(role)
        ));
    }
    match (event.seq, body) {
        (1, Body::RunRequested(_)) => {}
        (1, _) => {
            return Err(format!(
                "the run starts with {}, not run_requested",
                body.kind()
            ));
        }
        (_, Body::RunRequested(_)) => return Err("run_requested after the run's start".into()),
        _ => {}
    }
    may_write(role, body)
}

/// How a role is named in messages.
pub fn name(role: WriterRole) -> &'static str {
    match role {
        WriterRole::Dispatcher => "the dispatcher",
        WriterRole::Policy => "policy",
        WriterRole::Connectors => "connectors",
        WriterRole::Unspecified => "no role",
    }
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::{
        ApprovalResolved, CommandAbandoned, PolicyDecided, RunRequested, ToolCallCompleted,
    };

    use super::*;

    fn event(seq: u64, role: WriterRole, body: Body) -> RunEvent {
        RunEvent {
            seq,
            role: role as i32,
            body: Some(body),
            ..Default::default()
        }
    }

    #[test]
    fn each_kind_has_its_writer() {
        let approve = Body::ApprovalResolved(ApprovalResolved {
            decision: Decision::Allow as i32,
            ..Default::default()
        });
        assert!(may_write(WriterRole::Policy, &approve).is_ok());
        for role in [
            WriterRole::Dispatcher,
            WriterRole::Connectors,
            WriterRole::Unspecified,
        ] {
            let err = may_write(role, &approve).unwrap_err();
            assert!(err.contains("approval_resolved"), "{err}");
        }
        let result = Body::ToolCallCompleted(ToolCallCompleted::default());
        assert!(may_write(WriterRole::Connectors, &result).is_ok());
        assert!(may_write(WriterRole::Policy, &result).is_err());
        assert!(may_write(WriterRole::Dispatcher, &result).is_err());
    }

    #[test]
    fn the_dispatcher_may_only_refuse_in_policys_place() {
        let expired = |decision: Decision, expired: bool| {
            Body::ApprovalResolved(ApprovalResolved {
                decision: decision as i32,
                expired,
                ..Default::default()
            })
        };
        assert!(may_write(WriterRole::Dispatcher, &expired(Decision::Deny, true)).is_ok());
        assert!(may_write(WriterRole::Dispatcher, &expired(Decision::Allow, true)).is_err());
        assert!(may_write(WriterRole::Dispatcher, &expired(Decision::Deny, false)).is_err());
        let memo = |decision: Decision, rule: &str| {
            Body::PolicyDecided(PolicyDecided {
                decision: decision as i32,
                rule: rule.into(),
                ..Default::default()
            })
        };
        assert!(may_write(WriterRole::Dispatcher, &memo(Decision::Deny, MEMO_RULE)).is_ok());
        assert!(may_write(WriterRole::Dispatcher, &memo(Decision::Allow, MEMO_RULE)).is_err());
        assert!(may_write(WriterRole::Dispatcher, &memo(Decision::Deny, "default")).is_err());
    }

    #[test]
    fn an_abandoned_command_is_its_servers_to_record() {
        let abandoned = |command: &str| {
            Body::CommandAbandoned(CommandAbandoned {
                command: command.into(),
                ..Default::default()
            })
        };
        assert!(may_write(WriterRole::Policy, &abandoned("policy")).is_ok());
        assert!(may_write(WriterRole::Policy, &abandoned("tool")).is_err());
        assert!(may_write(WriterRole::Connectors, &abandoned("gate")).is_ok());
        assert!(may_write(WriterRole::Connectors, &abandoned("policy")).is_err());
        assert!(may_write(WriterRole::Dispatcher, &abandoned("tool")).is_err());
        assert!(may_write(WriterRole::Connectors, &abandoned("other")).is_err());
    }

    #[test]
    fn the_subject_and_the_envelope_name_one_writer_and_a_run_starts_with_its_request() {
        let requested = Body::RunRequested(RunRequested::default());
        let first = event(1, WriterRole::Dispatcher, requested.clone());
        assert!(check(&first, Some(LogWriter::Dispatcher)).is_ok());
        assert!(check(&first, None).is_ok());
        let err = check(&first, Some(LogWriter::Policy)).unwrap_err();
        assert!(err.contains("stored on the policy subject"), "{err}");

        let ghost = event(
            1,
            WriterRole::Connectors,
            Body::ToolCallCompleted(Default::default()),
        );
        let err = check(&ghost, Some(LogWriter::Connectors)).unwrap_err();
        assert!(err.contains("starts with tool_call_completed"), "{err}");
        let again = event(2, WriterRole::Dispatcher, requested);
        assert!(check(&again, Some(LogWriter::Dispatcher)).is_err());
    }
}
