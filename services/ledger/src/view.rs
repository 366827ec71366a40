//! The run view's reducer: a run's view is a pure function of its events. The view
//! itself is the front doors' contract (`dispatch_proto::api::v1::RunView`); how it is
//! folded from a log is the ledger's.

use dispatch_bus::subject::LogWriter;
use dispatch_proto::api::v1::{
    Corruption, ListenerView, PendingApproval, RunView, ServiceView, TamperedAfterSeal, TaskStatus,
};
use dispatch_proto::run::v1::{LeafState, RunEvent, RunStatus, WriterRole, run_event::Body};
use dispatch_runlog::seal::Trust;

/// The most of a call's arguments, and of its rule and reason, a pending approval shows.
const APPROVAL_ARGS_BYTES: usize = 1024;
const APPROVAL_TEXT_BYTES: usize = 1024;
/// The most pending approvals one run's view holds. A run asks one at a time; a log
/// that says otherwise still leaves a view that fits a reply.
pub const MAX_PENDING_APPROVALS: usize = 32;

/// Folding a run's events into its view.
pub trait Fold: Sized {
    /// A message on the run's subjects (at stream sequence `stream_seq`) that is not one
    /// of its events.
    fn apply_garbage(view: Option<Self>, run_id: &str, error: String, stream_seq: u64) -> Self;
    /// The view of a goal no dispatcher has taken yet.
    fn queued(command: &dispatch_proto::command::v1::SubmitGoal) -> Self;
    /// Applies one event, stored at `stream_seq` on `stored_as`'s subject, verifying it
    /// against what came before.
    fn apply(
        view: Option<Self>,
        event: &RunEvent,
        stored_as: LogWriter,
        stream_seq: u64,
        trust: &Trust,
    ) -> Self;
}

/// True once the view holds the run's valid seal: anything stored after it is outside
/// the record.
fn sealed(view: &RunView) -> bool {
    view.corrupt.is_none() && view.finished_at_ms.is_some()
}

/// Counts a message stored after the run's seal, which changes nothing else.
fn mark_after_seal(view: &mut RunView, stream_seq: u64) {
    view.last_stream_seq = stream_seq;
    let after = view.tampered_after_seal.get_or_insert(TamperedAfterSeal {
        stream_seq,
        messages: 0,
    });
    after.messages += 1;
}

/// A run's view before its first event is applied.
fn new_view(event: &RunEvent) -> RunView {
    RunView {
        run_id: event.run_id.clone(),
        status: TaskStatus::Queued as i32,
        requested_at_ms: event.time_unix_ms,
        ..Default::default()
    }
}

fn add_usage(view: &mut RunView, usage: Option<&dispatch_proto::run::v1::Usage>) {
    if let Some(usage) = usage {
        view.prompt_tokens = view.prompt_tokens.saturating_add(usage.prompt_tokens);
        view.completion_tokens = view
            .completion_tokens
            .saturating_add(usage.completion_tokens);
    }
}

/// Marks the run corrupt at `seq`; nothing after it is applied.
fn mark_corrupt(view: &mut RunView, seq: u64, reason: String) {
    let line = format!("log fails verification at seq {seq}: {reason}");
    view.status = TaskStatus::Corrupt as i32;
    view.reason = Some(dispatch_runlog::slice_chars(
        &line,
        dispatch_runlog::SUMMARY_CHARS,
    ));
    view.summary = view.reason.clone();
    view.corrupt = Some(Corruption { seq, reason });
}

/// The checks an event must pass to be applied: it is the next in sequence, links to
/// the last one applied, hashes to its own hash, was written by its kind's role on
/// that role's subject, and obeys the seal rules.
fn check(
    view: &RunView,
    event: &RunEvent,
    stored_as: LogWriter,
    trust: &Trust,
) -> Result<(), String> {
    if event.seq != view.last_seq + 1 {
        return Err(format!("expected seq {}", view.last_seq + 1));
    }
    let linked = if view.last_seq == 0 {
        event.prev_hash == dispatch_runlog::chain::GENESIS
    } else {
        hex::encode(&event.prev_hash) == view.last_hash
    };
    if !linked {
        return Err("prev_hash does not link to the previous event".into());
    }
    if event.hash != dispatch_runlog::chain::hash(event) {
        return Err("hash does not match the event's content".into());
    }
    dispatch_runlog::chain::check_link(event, Some(stored_as), trust)
}

impl Fold for RunView {
    /// A message on the run's subjects that is not one of its events: after the run's
    /// seal it is only counted; before, the log no longer verifies.
    fn apply_garbage(view: Option<Self>, run_id: &str, error: String, stream_seq: u64) -> Self {
        let mut view = view.unwrap_or_else(|| {
            new_view(&RunEvent {
                run_id: run_id.to_owned(),
                ..Default::default()
            })
        });
        if stream_seq <= view.last_stream_seq {
            return view;
        }
        if sealed(&view) {
            mark_after_seal(&mut view, stream_seq);
        } else if view.corrupt.is_none() {
            let seq = view.last_seq + 1;
            mark_corrupt(&mut view, seq, error);
        }
        view
    }

    /// The view of a goal no dispatcher has taken yet. Once the run's log starts, its
    /// `RunRequested` sets every field this one does, so the final view does not depend
    /// on which of the two streams a projection reads first.
    fn queued(command: &dispatch_proto::command::v1::SubmitGoal) -> Self {
        let mut view = new_view(&RunEvent {
            run_id: command.run_id.clone(),
            time_unix_ms: command.submitted_at_unix_ms,
            ..Default::default()
        });
        // What the run's `RunRequested` will record, bounds applied the same way.
        let requested = dispatch_runlog::submit::requested(command);
        apply_requested(&mut view, &requested);
        view.goal = requested.goal;
        view.conversation_id = requested.conversation_id;
        view.origin = requested.origin;
        view.timeout_ms = requested.timeout_ms;
        view
    }

    /// Applies one event, verifying it against what came before: events at or below
    /// `last_seq` were applied already, an event that fails verification marks the run
    /// `corrupt` (see [`check`]) and stops it from changing any further, and anything
    /// stored after a valid seal is outside the record: counted, never applied.
    fn apply(
        view: Option<Self>,
        event: &RunEvent,
        stored_as: LogWriter,
        stream_seq: u64,
        trust: &Trust,
    ) -> Self {
        let mut view = view.unwrap_or_else(|| new_view(event));
        if view.corrupt.is_some() {
            return view;
        }
        // A redelivered message was applied (or counted) already.
        if stream_seq <= view.last_stream_seq {
            return view;
        }
        // After the seal, whatever it claims, a message is not part of the record.
        if sealed(&view) {
            mark_after_seal(&mut view, stream_seq);
            return view;
        }
        if let Err(reason) = check(&view, event, stored_as, trust) {
            mark_corrupt(&mut view, event.seq, reason);
            return view;
        }
        view.last_seq = event.seq;
        view.last_stream_seq = stream_seq;
        view.last_hash = hex::encode(&event.hash);
        let Some(body) = &event.body else { return view };
        match body {
            Body::RunRequested(r) => {
                view.goal = r.goal.clone();
                view.conversation_id = r.conversation_id.clone();
                view.origin = r.origin.clone();
                view.timeout_ms = r.timeout_ms;
                apply_requested(&mut view, r);
                view.requested_at_ms = event.time_unix_ms;
            }
            Body::PlanAuthored(p) => {
                add_usage(&mut view, p.usage.as_ref());
                view.title = Some(p.title.clone());
                view.workflow = Some(p.workflow_path.clone());
                view.leaves = p.leaves.len() as u32;
            }
            Body::RunStarted(s) => {
                if !view.status().is_terminal() {
                    view.set_status(TaskStatus::Doing);
                }
                view.owner = Some(s.owner.clone());
                view.started_at_ms = Some(event.time_unix_ms);
                // A service has no deadline.
                view.deadline_at_ms = (s.deadline_unix_ms != 0).then_some(s.deadline_unix_ms);
                if let Some(service) = view.service.as_mut() {
                    service.schedule_ids = s.schedule_ids.clone();
                }
            }
            Body::ServiceWoken(w) => {
                if let Some(service) = view.service.as_mut() {
                    service.wakes += 1;
                    service.last_wake_at_ms = Some(event.time_unix_ms);
                    service.last_wake_run_id = Some(w.run_id.clone());
                    let listener = (w.listener as usize)
                        .checked_sub(1)
                        .and_then(|i| service.listeners.get_mut(i));
                    if let Some(listener) = listener {
                        listener.requests_handled += 1;
                        listener.last_request_at_ms = Some(event.time_unix_ms);
                    }
                }
            }
            Body::LeafFinished(f) => {
                match f.state() {
                    LeafState::Done => view.leaves_done += 1,
                    // Not run: neither done nor failed.
                    LeafState::Skipped => {}
                    _ => view.leaves_failed += 1,
                }
            }
            Body::ApprovalRequested(a) => {
                if view.approvals.len() < MAX_PENDING_APPROVALS
                    && !view
                        .approvals
                        .iter()
                        .any(|p| p.approval_id == a.approval_id)
                {
                    let risk = dispatch_proto::run::v1::Risk::try_from(a.risk)
                        .map_or("destructive", |r| r.word());
                    view.approvals.push(PendingApproval {
                        approval_id: dispatch_runlog::slice_bytes(
                            &a.approval_id,
                            APPROVAL_TEXT_BYTES,
                        )
                        .to_owned(),
                        run_id: event.run_id.clone(),
                        tool: dispatch_runlog::slice_bytes(&a.tool, APPROVAL_TEXT_BYTES).to_owned(),
                        args_json: dispatch_runlog::slice_bytes(&a.args_json, APPROVAL_ARGS_BYTES)
                            .to_owned(),
                        args_clipped: a.args_json.len() > APPROVAL_ARGS_BYTES,
                        args_bytes: a.args_json.len() as u64,
                        args_digest: dispatch_runlog::slice_bytes(&a.args_digest, 80).to_owned(),
                        risk: risk.to_owned(),
                        rule: dispatch_runlog::slice_bytes(&a.rule, APPROVAL_TEXT_BYTES).to_owned(),
                        reason: dispatch_runlog::slice_bytes(&a.reason, APPROVAL_TEXT_BYTES)
                            .to_owned(),
                        requested_at_ms: event.time_unix_ms,
                        expires_at_ms: a.expires_unix_ms,
                    });
                }
                if !view.status().is_terminal() {
                    view.set_status(TaskStatus::Waiting);
                }
            }
            Body::ApprovalResolved(r) => {
                view.approvals.retain(|p| p.approval_id != r.approval_id);
                if view.approvals.is_empty() && view.status() == TaskStatus::Waiting {
                    view.set_status(TaskStatus::Doing);
                }
            }
            Body::RunFinished(f) => {
                view.approvals.clear();
                view.set_status(match RunStatus::try_from(f.status) {
                    Ok(RunStatus::Done) => TaskStatus::Done,
                    Ok(RunStatus::Stopped) => TaskStatus::Stopped,
                    _ => TaskStatus::Blocked,
                });
                view.reason = Some(f.reason.clone());
                view.summary = Some(f.summary.clone());
                view.finished_at_ms = Some(event.time_unix_ms);
                view.report_path = (!f.report_path.is_empty()).then(|| f.report_path.clone());
                view.report_bytes = f.report.len() as u64;
            }
            Body::PlanRejected(p) => add_usage(&mut view, p.usage.as_ref()),
            Body::ModelTurn(t) => add_usage(&mut view, t.usage.as_ref()),
            Body::LeafStarted(_)
            | Body::ToolCallRequested(_)
            | Body::PolicyDecided(_)
            | Body::ToolCallStarted(_)
            | Body::StopRequested(_)
            | Body::CommandAbandoned(_)
            | Body::ToolCallCompleted(_)
            | Body::ToolCallFailed(_)
            | Body::GateChecked(_)
            | Body::FeedbackQueued(_)
            | Body::TurnOrdered(_)
            | Body::TurnContext(_)
            | Body::OutputDelta(_) => {}
        }
        // The owner is the dispatcher copy that last wrote to the run: after a takeover
        // the copy carrying it on (and finishing it), not the one that died.
        if view.owner.is_some()
            && event.role() == WriterRole::Dispatcher
            && event.writer.starts_with(DISPATCHER_WRITER)
        {
            view.owner = Some(event.writer.clone());
        }
        view
    }
}

/// How a dispatcher copy names itself as the writer of the events it appends.
const DISPATCHER_WRITER: &str = "dispatcher/";

/// What a run's request sets in its view beyond the goal: its kind, and a service's
/// wake sources or a wake's service.
fn apply_requested(view: &mut RunView, r: &dispatch_proto::run::v1::RunRequested) {
    view.kind = if r.kind.is_empty() {
        dispatch_runlog::submit::KINDS[0].to_owned()
    } else {
        r.kind.clone()
    };
    view.parent_run_id = r.parent_run_id.clone();
    view.wake = r.wake.clone();
    view.service = (r.kind == dispatch_runlog::service::KIND).then(|| {
        let spec = r.service.clone().unwrap_or_default();
        ServiceView {
            source: spec.source,
            schedules: spec
                .schedules
                .iter()
                .map(|s| match s.time_zone.as_str() {
                    "" => format!("{} UTC", s.expression),
                    zone => format!("{} {zone}", s.expression),
                })
                .collect(),
            interval_ms: spec.interval_ms,
            listeners: spec
                .listeners
                .iter()
                .map(|l| ListenerView {
                    listen_addr: l.listen_addr.clone(),
                    hook: l.hook.clone(),
                    path: l.path.clone(),
                    methods: l.methods.clone(),
                    shared_secret: !l.secret_sha256.is_empty(),
                    signed: !l.signing_secret.is_empty(),
                    max_body_bytes: l.max_body_bytes,
                    max_header_bytes: l.max_header_bytes,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    });
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::{
        ApprovalRequested, ApprovalResolved, LeafFinished, RunFinished, RunRequested, RunStarted,
    };
    use dispatch_runlog::seal::Sealer;

    use super::*;

    /// A properly chained log of `bodies`, the terminal one sealed by `sealer`.
    fn chain(bodies: Vec<Body>, sealer: &Sealer) -> Vec<RunEvent> {
        let mut events: Vec<RunEvent> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| RunEvent {
                run_id: "r".into(),
                time_unix_ms: (i as i64 + 1) * 1000,
                role: match body {
                    Body::ApprovalRequested(_) | Body::ApprovalResolved(_) => WriterRole::Policy,
                    _ => WriterRole::Dispatcher,
                } as i32,
                body: Some(body),
                ..Default::default()
            })
            .collect();
        dispatch_runlog::chain::link(&mut events, Some(sealer));
        events
    }

    /// Applies `event` as stored on its own role's subject, at stream sequence `seq`
    /// times ten (other runs' events between).
    fn apply(view: Option<RunView>, event: &RunEvent, trust: &Trust) -> RunView {
        let on = dispatch_runlog::roles::writer_of(event.role()).unwrap_or(LogWriter::Dispatcher);
        RunView::apply(view, event, on, event.seq * 10, trust)
    }

    fn sealer(name: &str) -> Sealer {
        let dir = std::env::temp_dir().join(format!("dispatch-view-{name}-{}", uuid_like()));
        let sealer = Sealer::load_or_create(&dir.join("key")).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        sealer
    }

    fn uuid_like() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    fn bodies() -> Vec<Body> {
        vec![
            Body::RunRequested(RunRequested {
                goal: "g".into(),
                conversation_id: "c".into(),
                ..Default::default()
            }),
            Body::RunStarted(RunStarted {
                owner: "d".into(),
                deadline_unix_ms: 9,
                ..Default::default()
            }),
            Body::LeafFinished(LeafFinished {
                leaf: 0,
                state: LeafState::Done as i32,
                reason: String::new(),
                answer: String::new(),
            }),
            Body::LeafFinished(LeafFinished {
                leaf: 1,
                state: LeafState::Failed as i32,
                reason: String::new(),
                answer: String::new(),
            }),
            Body::RunFinished(RunFinished {
                status: RunStatus::Done as i32,
                reason: "workflow finished".into(),
                summary: "s".into(),
                tally: vec![],
                ..Default::default()
            }),
        ]
    }

    /// Folds `events` into a view; the status after each, and the last view.
    fn fold(events: &[RunEvent], trust: &Trust) -> (Vec<TaskStatus>, RunView) {
        let mut view = None;
        let mut seen = Vec::new();
        for e in events {
            let v = apply(view, e, trust);
            seen.push(v.status());
            view = Some(v);
        }
        (seen, view.expect("at least one event"))
    }

    #[test]
    fn a_run_moves_queued_doing_done_and_replays_idempotently() {
        let key = sealer("ok");
        let trust = Trust::keys([key.public_key()]);
        let events = chain(bodies(), &key);
        let (seen, view) = fold(&events, &trust);
        assert_eq!(
            seen,
            [
                TaskStatus::Queued,
                TaskStatus::Doing,
                TaskStatus::Doing,
                TaskStatus::Doing,
                TaskStatus::Done
            ]
        );
        let done = view;
        assert_eq!((done.leaves_done, done.leaves_failed), (1, 1));
        assert!(done.corrupt.is_none());
        // Re-delivering any event changes nothing.
        let again = events
            .iter()
            .fold(done.clone(), |v, e| apply(Some(v), e, &trust));
        assert_eq!(again, done);
    }

    #[test]
    fn a_run_waits_while_an_approval_is_pending_and_its_view_stays_bounded() {
        let key = sealer("approvals");
        let trust = Trust::keys([key.public_key()]);
        let asked = |i: usize| {
            Body::ApprovalRequested(ApprovalRequested {
                approval_id: format!("r.l0-t{i}-c0"),
                call_id: format!("l0-t{i}-c0"),
                tool: "test.erase".into(),
                args_json: "x".repeat(10_000),
                reason: "y".repeat(10_000),
                ..Default::default()
            })
        };
        let mut log = bodies()[..2].to_vec();
        log.push(asked(0));
        log.push(Body::ApprovalResolved(ApprovalResolved {
            approval_id: "r.l0-t0-c0".into(),
            call_id: "l0-t0-c0".into(),
            ..Default::default()
        }));
        // A log that asks far more than a run ever does at once.
        log.extend((1..=100).map(asked));
        let events = chain(log, &key);
        let (seen, view) = fold(&events, &trust);
        assert_eq!(seen[2], TaskStatus::Waiting);
        assert_eq!(seen[3], TaskStatus::Doing);
        assert_eq!(view.status(), TaskStatus::Waiting);
        assert_eq!(view.approvals.len(), MAX_PENDING_APPROVALS);
        assert_eq!(view.approvals[0].approval_id, "r.l0-t1-c0");
        assert!(serde_json::to_vec(&view).unwrap().len() < 128 * 1024);
        assert_eq!(TaskStatus::Waiting.keyword(), "WAITING");
    }

    #[test]
    fn a_forged_or_broken_log_is_corrupt_never_done() {
        let ours = sealer("ours");
        let trust = Trust::keys([ours.public_key()]);
        let fold = |events: &[RunEvent]| {
            events
                .iter()
                .fold(None, |v, e| Some(apply(v, e, &trust)))
                .unwrap()
        };
        // Sealed by a key nobody trusts.
        let forged = fold(&chain(bodies(), &sealer("theirs")));
        assert_eq!(forged.status(), TaskStatus::Corrupt);
        let why = forged.corrupt.unwrap();
        assert_eq!(why.seq, 5);
        assert!(why.reason.contains("not a trusted key"), "{}", why.reason);

        // An edited event breaks its own hash; later events are not applied.
        let mut edited = chain(bodies(), &ours);
        if let Some(Body::LeafFinished(f)) = edited[3].body.as_mut() {
            f.state = LeafState::Done as i32;
        }
        let view = fold(&edited);
        assert_eq!(view.status(), TaskStatus::Corrupt);
        assert_eq!(view.corrupt.as_ref().unwrap().seq, 4);
        assert_eq!(view.leaves_done, 1);

        // An event after the seal.
        let mut late = chain(bodies(), &ours);
        let extra = chain(
            bodies()
                .into_iter()
                .chain([Body::LeafStarted(Default::default())])
                .collect(),
            &ours,
        );
        late.push(extra[5].clone());
        let view = fold(&late);
        assert_eq!(view.status(), TaskStatus::Done, "the sealed record stands");
        assert_eq!(
            view.tampered_after_seal,
            Some(TamperedAfterSeal {
                stream_seq: 60,
                messages: 1
            })
        );
        // ...and so does a message that is no event at all, counted once however often
        // it is delivered.
        let view = RunView::apply_garbage(Some(view), "r", "not an event".into(), 70);
        let view = RunView::apply_garbage(Some(view), "r", "not an event".into(), 70);
        assert_eq!(view.status(), TaskStatus::Done);
        assert_eq!(view.tampered_after_seal.as_ref().unwrap().messages, 2);
        assert!(view.corrupt.is_none());

        // An approval written by connectors, or stored on their subject, is a forgery.
        let mut log = bodies()[..2].to_vec();
        log.push(Body::ApprovalResolved(ApprovalResolved {
            approval_id: "r.l0-t0-c0".into(),
            decision: dispatch_proto::run::v1::Decision::Allow as i32,
            ..Default::default()
        }));
        let events = chain(log, &ours);
        let view = RunView::apply(None, &events[0], LogWriter::Dispatcher, 1, &trust);
        let view = RunView::apply(Some(view), &events[1], LogWriter::Dispatcher, 2, &trust);
        let forged = RunView::apply(Some(view), &events[2], LogWriter::Connectors, 3, &trust);
        assert_eq!(forged.status(), TaskStatus::Corrupt);
        assert!(
            forged
                .corrupt
                .unwrap()
                .reason
                .contains("stored on the connectors subject"),
        );
    }
}
