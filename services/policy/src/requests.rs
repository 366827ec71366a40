//! Requests the policy service answers on `dispatch.req.policy.*` (one copy each, by
//! queue group): set the document, dry-run a call, resolve an approval. Each reply is
//! a small protobuf message; a request that does not decode is answered with why.

use std::time::Duration;

use dispatch_bus::async_nats;
use dispatch_bus::catalogue::Risk;
use dispatch_bus::subject;
use dispatch_proto::policy::v1::{
    ResolveApprovalRequest, ResolveApprovalResponse, SetPolicyRequest, SetPolicyResponse,
    TestPolicyRequest, TestPolicyResponse, resolve_approval_response::Outcome,
};
use dispatch_proto::run::v1::{ApprovalResolved, Decision, run_event::Body};
use dispatch_rules::Document;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::{Gate, parse_approval_id};
use dispatch_rules::store;

/// Requests this copy answers at once.
const CONCURRENCY: usize = 32;
/// How many lost appends one answer rides out before it asks the person to try again:
/// a waiting run appends nothing, so losing more than a few means the log is busy.
const MAX_RACES: usize = 16;
/// The longest name a person gives themselves, and the longest reason.
const MAX_WHO: usize = 128;
const MAX_REASON: usize = 1024;

pub(crate) async fn serve(gate: Gate, shutdown: CancellationToken) {
    let bus = gate.bus.clone();
    let answered = dispatch_bus::answer::serve(
        &bus,
        subject::policy::ALL,
        subject::policy::POLICY_GROUP,
        CONCURRENCY,
        shutdown,
        move |message| {
            let gate = gate.clone();
            async move {
                Some(match message.subject.as_str() {
                    subject::policy::SET => set(&gate, &message).await.encode_to_vec(),
                    subject::policy::TEST => test(&gate, &message).await.encode_to_vec(),
                    subject::policy::RESOLVE => resolve(&gate, &message).await.encode_to_vec(),
                    other => {
                        tracing::warn!(subject = other, "no such policy request");
                        return None;
                    }
                })
            }
        },
    )
    .await;
    if let Err(e) = answered {
        tracing::error!(error = %e, "cannot take policy requests");
    }
}

async fn set(gate: &Gate, message: &async_nats::Message) -> SetPolicyResponse {
    let refused = |error: String| SetPolicyResponse {
        error,
        ..Default::default()
    };
    let Ok(request) = SetPolicyRequest::decode(message.payload.as_ref()) else {
        return refused("the request is not a SetPolicyRequest".into());
    };
    let document = match Document::parse(&request.document) {
        Ok(document) => document,
        Err(e) => return refused(e.to_string()),
    };
    let who = clip(&request.changed_by, MAX_WHO);
    let who = if who.is_empty() {
        "someone".to_owned()
    } else {
        who
    };
    let note = clip(&request.note, MAX_REASON);
    // Built on the newest version there is, not this copy's view of it, which may lag.
    let current = match store::current(&gate.bus).await {
        Ok(current) => current,
        Err(e) => return refused(e.to_string()),
    };
    match store::set(&gate.bus, &current, &document, &who, &note).await {
        Ok((version, added)) => {
            if added {
                tracing::info!(
                    version = version.record.version,
                    hash = version.record.hash,
                    changed_by = who,
                    "policy changed"
                );
            }
            SetPolicyResponse {
                error: String::new(),
                version: Some(version.record),
                unchanged: !added,
            }
        }
        Err(e) => refused(e.to_string()),
    }
}

async fn test(gate: &Gate, message: &async_nats::Message) -> TestPolicyResponse {
    let refused = |error: String| TestPolicyResponse {
        error,
        ..Default::default()
    };
    let Ok(request) = TestPolicyRequest::decode(message.payload.as_ref()) else {
        return refused("the request is not a TestPolicyRequest".into());
    };
    // As a call is recorded: in its one form, or refused (a key given twice, not one
    // object, too big), as the gate would refuse it.
    let args_json = match dispatch_runlog::args::canonical(&request.args_json) {
        Ok(canonical) => canonical.json,
        Err(why) => {
            return refused(format!(
                "the arguments are refused ({why}): {}",
                clip(&request.args_json, 80)
            ));
        }
    };
    let request = TestPolicyRequest {
        args_json,
        ..request
    };
    let entry = match gate.catalogue.tool(&request.tool).await {
        Ok(entry) => entry,
        Err(e) => return refused(e.to_string()),
    };
    // As a check decides: the catalogue's risk (destructive for a tool nobody
    // serves), and the tool's schema for which arguments are paths and URLs.
    let risk = entry
        .as_ref()
        .map_or(Risk::Destructive, |e| e.risk_of_call(&request.args_json));
    let in_force = gate.in_force.borrow().clone();
    let verdict = in_force.document.decide(dispatch_rules::Call {
        tool: &request.tool,
        args_json: &request.args_json,
        risk,
        origin: &request.origin,
        schema: entry.as_ref().map(|e| &e.parameters),
    });
    TestPolicyResponse {
        error: String::new(),
        effect: verdict.effect.word().to_owned(),
        rule: verdict.rule,
        reason: verdict.reason,
        risk: risk.word().to_owned(),
        policy_version: in_force.record.version,
        policy_hash: in_force.record.hash.clone(),
    }
}

async fn resolve(gate: &Gate, message: &async_nats::Message) -> ResolveApprovalResponse {
    let answer = |outcome: Outcome, message: String| ResolveApprovalResponse {
        outcome: outcome as i32,
        message,
        ..Default::default()
    };
    let Ok(request) = ResolveApprovalRequest::decode(message.payload.as_ref()) else {
        return answer(
            Outcome::Invalid,
            "the request is not a ResolveApprovalRequest".into(),
        );
    };
    let decision = match request.decision.as_str() {
        "allow" => Decision::Allow,
        "deny" => Decision::Deny,
        other => {
            return answer(
                Outcome::Invalid,
                format!("decision {other:?} is neither allow nor deny"),
            );
        }
    };
    let who = clip(request.resolved_by.trim(), MAX_WHO);
    if who.is_empty() {
        return answer(
            Outcome::Invalid,
            "say who is answering (resolved_by)".into(),
        );
    }
    let Some((run_id, call_id)) = parse_approval_id(&request.approval_id) else {
        return answer(
            Outcome::Invalid,
            format!(
                "{:?} is not an approval id (<run id>.<call id>)",
                clip(&request.approval_id, 100)
            ),
        );
    };
    let mut run = match gate.log.handle(run_id).await {
        Ok(run) => run,
        Err(e) => return answer(Outcome::Unspecified, e.to_string()),
    };
    let body = Body::ApprovalResolved(ApprovalResolved {
        approval_id: request.approval_id.clone(),
        call_id: call_id.clone(),
        decision: decision as i32,
        resolved_by: who.clone(),
        reason: clip(&request.reason, MAX_REASON),
        expired: false,
    });
    for _ in 0..MAX_RACES {
        let asked = run.bodies().find_map(|b| match b {
            Body::ApprovalRequested(a) if a.call_id == call_id => Some(a.args_digest.clone()),
            _ => None,
        });
        let Some(asked_digest) = asked else {
            return answer(
                Outcome::NotFound,
                format!("no approval request {}", request.approval_id),
            );
        };
        // An allowance holds only for the arguments the person was shown. A denial
        // needs no digest (nothing runs), but one that names other arguments is refused
        // too: the person was looking at something else.
        let named = request.args_digest.trim();
        if (decision == Decision::Allow || !named.is_empty()) && named != asked_digest {
            return answer(
                Outcome::DigestMismatch,
                if named.is_empty() {
                    format!(
                        "to allow {}, name the digest of its arguments ({asked_digest}), as \
                         the approval listing shows it",
                        request.approval_id
                    )
                } else {
                    format!(
                        "{} asks about arguments with digest {asked_digest}, not {}; nothing was \
                         recorded",
                        request.approval_id,
                        clip(named, 80)
                    )
                },
            );
        }
        let resolved = run.bodies().find_map(|b| match b {
            Body::ApprovalResolved(r) if r.call_id == call_id => Some(r.clone()),
            _ => None,
        });
        if let Some(resolved) = resolved {
            let word = word(resolved.decision());
            return ResolveApprovalResponse {
                outcome: Outcome::AlreadyDecided as i32,
                message: format!(
                    "{} was already decided: {word} by {}",
                    request.approval_id, resolved.resolved_by
                ),
                decision: word.to_owned(),
                resolved_by: resolved.resolved_by,
            };
        }
        if run.is_finished() {
            return answer(
                Outcome::RunEnded,
                format!("run {run_id} ended before anyone answered"),
            );
        }
        // Appended with the log's last sequence expected: of two answers at once, the
        // second finds the first in the log when it reads again.
        match run.append(body.clone(), &request.approval_id).await {
            Ok(_) => {
                tracing::info!(run_id = %run_id, call_id, decision = word(decision), by = who, "approval resolved");
                return ResolveApprovalResponse {
                    outcome: Outcome::Resolved as i32,
                    message: format!("{} {}", request.approval_id, past(decision)),
                    decision: word(decision).to_owned(),
                    resolved_by: who,
                };
            }
            // The handle has read the log again; look once more.
            Err(e) if e.kind() == dispatch_runlog::ErrorKind::Conflict => {}
            Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => {
                return answer(
                    Outcome::RunEnded,
                    format!("run {run_id} ended before anyone answered"),
                );
            }
            Err(e) => return answer(Outcome::Unspecified, e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    answer(
        Outcome::Unspecified,
        format!(
            "run {run_id} kept changing while the answer was recorded; nothing was recorded, try again"
        ),
    )
}

fn word(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "allow",
        _ => "deny",
    }
}

fn past(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "approved",
        _ => "denied",
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn clip(text: &str, max: usize) -> String {
    dispatch_runlog::slice_bytes(text, max).to_owned()
}
