//! The run view and its reducer: a pure function of the run's events.

use dispatch_proto::run::v1::{LeafState, RunEvent, RunStatus, run_event::Body};
use serde::{Deserialize, Serialize};

/// The statuses people see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Doing,
    Done,
    Blocked,
    Stopped,
}

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Done | TaskStatus::Blocked | TaskStatus::Stopped
        )
    }

    pub fn word(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Doing => "doing",
            TaskStatus::Done => "done",
            TaskStatus::Blocked => "blocked",
            TaskStatus::Stopped => "stopped",
        }
    }

    /// The org keyword in TASKS.org.
    pub fn keyword(self) -> &'static str {
        match self {
            TaskStatus::Queued => "TODO",
            TaskStatus::Doing => "DOING",
            TaskStatus::Done => "DONE",
            TaskStatus::Blocked => "BLOCKED",
            TaskStatus::Stopped => "STOPPED",
        }
    }
}

/// What `ps` and `inspect` show about a run. Everything in it comes from the log, so a
/// rebuild produces it byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    pub run_id: String,
    pub goal: String,
    pub conversation_id: String,
    pub origin: String,
    pub status: TaskStatus,
    pub title: Option<String>,
    pub workflow: Option<String>,
    pub owner: Option<String>,
    pub leaves: u32,
    pub leaves_done: u32,
    pub leaves_failed: u32,
    pub reason: Option<String>,
    pub summary: Option<String>,
    pub timeout_ms: u64,
    pub requested_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub deadline_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Sequence of the last event applied.
    pub last_seq: u64,
}

impl RunView {
    fn new(event: &RunEvent) -> Self {
        Self {
            run_id: event.run_id.clone(),
            goal: String::new(),
            conversation_id: String::new(),
            origin: String::new(),
            status: TaskStatus::Queued,
            title: None,
            workflow: None,
            owner: None,
            leaves: 0,
            leaves_done: 0,
            leaves_failed: 0,
            reason: None,
            summary: None,
            timeout_ms: 0,
            requested_at_ms: event.time_unix_ms,
            started_at_ms: None,
            deadline_at_ms: None,
            finished_at_ms: None,
            last_seq: 0,
        }
    }

    /// The view of a goal no dispatcher has taken yet. Once the run's log starts, its
    /// `RunRequested` sets every field this one does, so the final view does not depend
    /// on which of the two streams a projection reads first.
    pub fn queued(command: &dispatch_proto::command::v1::SubmitGoal) -> Self {
        let mut view = Self::new(&RunEvent {
            run_id: command.run_id.clone(),
            time_unix_ms: command.submitted_at_unix_ms,
            ..Default::default()
        });
        // What the run's `RunRequested` will record, bounds applied the same way.
        let requested = dispatch_runlog::submit::requested(command);
        view.goal = requested.goal;
        view.conversation_id = requested.conversation_id;
        view.origin = requested.origin;
        view.timeout_ms = requested.timeout_ms;
        view
    }

    /// Applies one event. Events at or below `last_seq` were applied already.
    pub fn apply(view: Option<Self>, event: &RunEvent) -> Self {
        let mut view = view.unwrap_or_else(|| Self::new(event));
        if event.seq <= view.last_seq {
            return view;
        }
        view.last_seq = event.seq;
        let Some(body) = &event.body else { return view };
        match body {
            Body::RunRequested(r) => {
                view.goal = r.goal.clone();
                view.conversation_id = r.conversation_id.clone();
                view.origin = r.origin.clone();
                view.timeout_ms = r.timeout_ms;
                view.requested_at_ms = event.time_unix_ms;
            }
            Body::PlanAuthored(p) => {
                view.title = Some(p.title.clone());
                view.workflow = Some(p.workflow_path.clone());
                view.leaves = p.leaves.len() as u32;
            }
            Body::RunStarted(s) => {
                if !view.status.is_terminal() {
                    view.status = TaskStatus::Doing;
                }
                view.owner = Some(s.owner.clone());
                view.started_at_ms = Some(event.time_unix_ms);
                view.deadline_at_ms = Some(s.deadline_unix_ms);
            }
            Body::LeafFinished(f) => {
                if f.state == LeafState::Done as i32 {
                    view.leaves_done += 1;
                } else {
                    view.leaves_failed += 1;
                }
            }
            Body::RunFinished(f) => {
                view.status = match RunStatus::try_from(f.status) {
                    Ok(RunStatus::Done) => TaskStatus::Done,
                    Ok(RunStatus::Stopped) => TaskStatus::Stopped,
                    _ => TaskStatus::Blocked,
                };
                view.reason = Some(f.reason.clone());
                view.summary = Some(f.summary.clone());
                view.finished_at_ms = Some(event.time_unix_ms);
            }
            Body::PlanRejected(_)
            | Body::LeafStarted(_)
            | Body::ModelTurn(_)
            | Body::ToolCallRequested(_)
            | Body::PolicyDecided(_)
            | Body::ToolCallStarted(_)
            | Body::StopRequested(_)
            | Body::CommandAbandoned(_)
            | Body::ToolCallCompleted(_)
            | Body::ToolCallFailed(_)
            | Body::GateChecked(_)
            | Body::FeedbackQueued(_) => {}
        }
        view
    }
}

/// A feedback note: how a run ended, for the conversation that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub run_id: String,
    pub status: String,
    pub summary: String,
    pub goal: String,
    pub queued_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::{LeafFinished, RunFinished, RunRequested, RunStarted};

    use super::*;

    fn event(seq: u64, body: Body) -> RunEvent {
        RunEvent {
            run_id: "r".into(),
            seq,
            time_unix_ms: seq as i64 * 1000,
            body: Some(body),
            ..Default::default()
        }
    }

    #[test]
    fn a_run_moves_queued_doing_done_and_replays_idempotently() {
        let events = [
            event(
                1,
                Body::RunRequested(RunRequested {
                    goal: "g".into(),
                    conversation_id: "c".into(),
                    ..Default::default()
                }),
            ),
            event(
                2,
                Body::RunStarted(RunStarted {
                    owner: "d".into(),
                    deadline_unix_ms: 9,
                }),
            ),
            event(
                3,
                Body::LeafFinished(LeafFinished {
                    leaf: 0,
                    state: LeafState::Done as i32,
                    reason: String::new(),
                }),
            ),
            event(
                4,
                Body::LeafFinished(LeafFinished {
                    leaf: 1,
                    state: LeafState::Failed as i32,
                    reason: String::new(),
                }),
            ),
            event(
                5,
                Body::RunFinished(RunFinished {
                    status: RunStatus::Done as i32,
                    reason: "workflow finished".into(),
                    summary: "s".into(),
                    tally: vec![],
                }),
            ),
        ];
        let mut view = None;
        let mut seen = Vec::new();
        for e in &events {
            let v = RunView::apply(view, e);
            seen.push(v.status);
            view = Some(v);
        }
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
        let done = view.unwrap();
        assert_eq!((done.leaves_done, done.leaves_failed), (1, 1));
        // Re-delivering any event changes nothing.
        let again = events
            .iter()
            .fold(done.clone(), |v, e| RunView::apply(Some(v), e));
        assert_eq!(again, done);
    }
}
