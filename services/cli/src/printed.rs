//! Control characters driven through every printer of the CLI (issue 28, point 10).
//!
//! Every printer is given records whose every text is hostile: terminal escape
//! sequences (OSC 52, CSI, their C1 forms), BEL, backspace, CR, line feeds, DEL, bidi
//! overrides. What it prints must hold no character a terminal acts on but the line
//! feeds of its own layout, and a line feed in a field must never make a line of its
//! own: an event is one line, a table one line per row, a report keeps only its own
//! lines. The printers' output then goes out through `terminal`, whose own property
//! (escaped text, JSON that reads back the same) is tested there; `clippy.toml` keeps
//! every `println!` in the crate going through it.

use dispatch_proto::api::v1::{
    ListTasksResponse, Note, PendingApproval, ReplayRunResponse, RunView, Schedule, TaskStatus,
};
use dispatch_proto::command::v1::DeliveryAttempt;
use dispatch_proto::policy::v1::{PolicyVersion, TestPolicyResponse};
use dispatch_proto::run::v1::*;
use proptest::prelude::*;
use run_event::Body;

use crate::terminal::is_safe;
use crate::terminal::tests::hostile;

/// A position for every kind of event. The match names every kind (no `_` arm), so a
/// kind added to the protocol does not compile here until [`every_event`] shows it.
fn kind_index(body: &Body) -> usize {
    match body {
        Body::RunRequested(_) => 0,
        Body::PlanAuthored(_) => 1,
        Body::PlanRejected(_) => 2,
        Body::RunStarted(_) => 3,
        Body::LeafStarted(_) => 4,
        Body::ModelTurn(_) => 5,
        Body::ToolCallRequested(_) => 6,
        Body::PolicyDecided(_) => 7,
        Body::ToolCallCompleted(_) => 8,
        Body::ToolCallFailed(_) => 9,
        Body::GateChecked(_) => 10,
        Body::LeafFinished(_) => 11,
        Body::FeedbackQueued(_) => 12,
        Body::RunFinished(_) => 13,
        Body::ToolCallStarted(_) => 14,
        Body::StopRequested(_) => 15,
        Body::CommandAbandoned(_) => 16,
        Body::ApprovalRequested(_) => 17,
        Body::ApprovalResolved(_) => 18,
        Body::OutputDelta(_) => 19,
        Body::ServiceWoken(_) => 20,
        Body::TurnOrdered(_) => 21,
        Body::TurnContext(_) => 22,
    }
}
const KINDS: usize = 23;

/// One event of every kind (two of some, for their other shapes), every text in it `t`.
fn every_event(t: &str) -> Vec<RunEvent> {
    let s = || t.to_owned();
    let call = ToolCall {
        call_id: s(),
        tool: s(),
        args_json: s(),
    };
    let bodies = vec![
        Body::RunRequested(RunRequested {
            goal: s(),
            conversation_id: s(),
            origin: s(),
            callback_url: s(),
            payload: s(),
            kind: s(),
            parent_run_id: s(),
            wake: s(),
            ..Default::default()
        }),
        Body::PlanAuthored(PlanAuthored {
            title: s(),
            slug: s(),
            workflow_path: s(),
            plan_text: s(),
            model: s(),
            leaves: vec![PlanLeaf {
                keyword: s(),
                title: s(),
                body: s(),
                done_when: s(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        Body::PlanRejected(PlanRejected {
            code: s(),
            message: s(),
            model: s(),
            answer: s(),
            ..Default::default()
        }),
        Body::RunStarted(RunStarted {
            owner: s(),
            schedule_ids: vec![s()],
            ..Default::default()
        }),
        Body::RunStarted(RunStarted {
            owner: s(),
            deadline_unix_ms: 1,
            ..Default::default()
        }),
        Body::LeafStarted(LeafStarted {
            leaf: 0,
            title: s(),
        }),
        Body::ModelTurn(ModelTurn {
            text: s(),
            tool_calls: vec![call.clone()],
            model: s(),
            call_form: s(),
            ..Default::default()
        }),
        Body::ToolCallRequested(ToolCallRequested {
            call_id: s(),
            tool: s(),
            args_json: s(),
            ..Default::default()
        }),
        Body::PolicyDecided(PolicyDecided {
            call_id: s(),
            rule: s(),
            reason: s(),
            policy_hash: s(),
            validator: s(),
            validator_verdict: s(),
            memo_of: s(),
            ..Default::default()
        }),
        Body::ToolCallCompleted(ToolCallCompleted {
            call_id: s(),
            output: s(),
        }),
        Body::ToolCallFailed(ToolCallFailed {
            call_id: s(),
            error: s(),
        }),
        Body::GateChecked(GateChecked {
            command: s(),
            detail: s(),
            check_id: s(),
            ..Default::default()
        }),
        Body::LeafFinished(LeafFinished {
            reason: s(),
            answer: s(),
            ..Default::default()
        }),
        Body::FeedbackQueued(FeedbackQueued {
            conversation_id: s(),
            summary: s(),
            goal: s(),
            ..Default::default()
        }),
        Body::RunFinished(RunFinished {
            reason: s(),
            summary: format!("{t}-"),
            report: s(),
            report_path: s(),
            tally: vec![TallyEntry {
                state: s(),
                count: 1,
            }],
            ..Default::default()
        }),
        Body::ToolCallStarted(ToolCallStarted {
            call_id: s(),
            executor: s(),
            executor_boot: s(),
        }),
        Body::StopRequested(StopRequested {
            requested_by: s(),
            ..Default::default()
        }),
        Body::CommandAbandoned(CommandAbandoned {
            command: s(),
            key: s(),
            reason: s(),
            ..Default::default()
        }),
        Body::ApprovalRequested(ApprovalRequested {
            approval_id: s(),
            call_id: s(),
            tool: s(),
            args_json: s(),
            rule: s(),
            reason: s(),
            ..Default::default()
        }),
        Body::ApprovalResolved(ApprovalResolved {
            approval_id: s(),
            call_id: s(),
            resolved_by: s(),
            reason: s(),
            ..Default::default()
        }),
        Body::OutputDelta(OutputDelta {
            text: s(),
            ..Default::default()
        }),
        Body::OutputDelta(OutputDelta {
            text: s(),
            abandoned: true,
            ..Default::default()
        }),
        Body::ServiceWoken(ServiceWoken {
            run_id: s(),
            wake: s(),
            listener: 1,
        }),
        Body::TurnOrdered(TurnOrdered {
            previous_run_id: s(),
            number: 2,
        }),
        Body::TurnContext(TurnContext {
            earlier_run_ids: vec![s()],
            left_out: 1,
            notes: vec![TurnNote {
                run_id: s(),
                status: s(),
                summary: s(),
                goal: s(),
            }],
        }),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| RunEvent {
            seq: i as u64 + 1,
            run_id: s(),
            writer: s(),
            body: Some(body),
            ..Default::default()
        })
        .collect()
}

fn view(t: &str) -> RunView {
    RunView {
        run_id: t.to_owned(),
        goal: t.to_owned(),
        conversation_id: t.to_owned(),
        origin: t.to_owned(),
        status: TaskStatus::Blocked as i32,
        title: Some(t.to_owned()),
        workflow: Some(t.to_owned()),
        owner: Some(t.to_owned()),
        reason: Some(t.to_owned()),
        summary: Some(t.to_owned()),
        kind: t.to_owned(),
        leaves: 2,
        ..Default::default()
    }
}

/// Asserts `printed` is safe and has exactly `lines` lines.
fn check(what: &str, printed: &str, lines: usize) -> Result<(), TestCaseError> {
    prop_assert!(is_safe(printed), "{what} printed {printed:?}");
    prop_assert_eq!(
        printed.lines().count(),
        lines,
        "{} printed {:?}",
        what,
        printed
    );
    Ok(())
}

#[test]
fn the_list_of_events_has_every_kind() {
    let mut seen = [false; KINDS];
    for event in every_event("x") {
        seen[kind_index(event.body.as_ref().unwrap())] = true;
    }
    assert!(seen.iter().all(|s| *s), "{seen:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_event_is_one_safe_line(t in hostile()) {
        for event in every_event(&t) {
            check("event_line", &crate::format::event_line(&event), 1)?;
        }
    }

    #[test]
    fn a_report_keeps_only_its_own_lines(t in hostile()) {
        let finished = RunFinished {
            report: format!("x{t}x\n\nfine\n"),
            report_path: t.clone(),
            ..Default::default()
        };
        let report = crate::format::report(&finished).unwrap();
        prop_assert!(is_safe(&report), "{report:?}");
        // The heading, then the report's own lines (a CR LF is one line feed).
        let own = finished.report.trim_end().replace("\r\n", "\n").matches('\n').count() + 1;
        prop_assert_eq!(report.lines().count(), 2 + own, "{:?}", report);
    }

    #[test]
    fn tables_of_runs_and_tasks_are_a_line_a_row(t in hostile()) {
        let runs = [view(&t), view(&t)];
        check("ps", &crate::format::ps_table(&runs, 0, true), 3)?;
        check("ps --no-trunc", &crate::format::ps_table(&runs, 0, false), 3)?;
        let note = Note {
            run_id: t.clone(),
            status: t.clone(),
            summary: t.clone(),
            goal: t.clone(),
            ..Default::default()
        };
        let tasks = ListTasksResponse {
            tasks: runs.to_vec(),
            feedback: vec![note.clone(), note],
            next: Some(t.clone()),
            more_feedback: false,
        };
        // "feedback:", two notes, a blank line, the header and two runs.
        check("tasks", &crate::format::tasks(&tasks), 7)?;
    }

    #[test]
    fn the_gate_s_printers_are_a_line_a_record(t in hostile()) {
        let tool = crate::format::ToolRow {
            name: t.clone(),
            connector: t.clone(),
            risk: dispatch_bus::catalogue::Risk::Write,
            policy: "ask",
            rule: t.clone(),
            version: t.clone(),
            description: t.clone(),
        };
        check("tools", &crate::format::tools_table(&[tool]), 2)?;
        let approval = PendingApproval {
            approval_id: t.clone(),
            run_id: t.clone(),
            tool: t.clone(),
            args_json: t.clone(),
            risk: t.clone(),
            rule: t.clone(),
            reason: t.clone(),
            ..Default::default()
        };
        check("approvals", &crate::format::approvals_table(&[approval], 0), 2)?;
        let tested = TestPolicyResponse {
            effect: t.clone(),
            rule: t.clone(),
            reason: t.clone(),
            risk: t.clone(),
            policy_hash: t.clone(),
            error: t.clone(),
            ..Default::default()
        };
        check("policy test", &crate::format::policy_tested(&tested), 1)?;
        let version = dispatch_rules::store::InForce {
            record: PolicyVersion {
                hash: t.clone(),
                previous_hash: t.clone(),
                changed_by: t.clone(),
                note: t.clone(),
                document_json: t.clone(),
                ..Default::default()
            },
            document: dispatch_rules::Document::parse(r#"{"rules": [], "default": "deny"}"#)
                .unwrap(),
            stream_seq: 1,
        };
        let damaged = dispatch_rules::store::Damaged {
            stream_seq: 2,
            reason: t.clone(),
        };
        let history = [
            dispatch_rules::store::Entry::Version(version),
            dispatch_rules::store::Entry::Damaged(damaged),
        ];
        check("policy history", &crate::format::policy_history(&history), 3)?;
    }

    #[test]
    fn replay_schedules_todos_and_status_are_a_line_a_record(t in hostile()) {
        let replayed = ReplayRunResponse {
            run: Some(view(&t)),
            events: 3,
            sealed_by: Some(t.clone()),
            views_rebuilt: true,
            ..Default::default()
        };
        check("replay", &crate::format::replayed(&replayed), 1)?;
        let schedule = Schedule {
            schedule_id: t.clone(),
            expression: t.clone(),
            time_zone: t.clone(),
            goal: t.clone(),
            conversation_id: t.clone(),
            payload: t.clone(),
            created_by: t.clone(),
            last_run_id: t.clone(),
            ..Default::default()
        };
        check("schedule ls", &crate::schedule::table(&[schedule]), 2)?;
        let todo = crate::todo::Listed {
            todo_id: t.clone(),
            text: t.clone(),
            due_at_ms: 0,
            state: t.clone(),
            run_id: Some(t.clone()),
        };
        check("todo ls", &crate::todo::table(&[todo]), 2)?;
        let status = crate::status::Status {
            streams: vec![crate::status::StreamStatus {
                stream: t.clone(),
                replicas: 3,
                leader: Some(t.clone()),
                followers: vec![crate::status::Follower {
                    server: t.clone(),
                    current: false,
                    offline: false,
                    lag: 1,
                    active_ms: 0,
                }],
                messages: 0,
                bytes: 0,
                last_sequence: 0,
                error: None,
            }],
            consumers: vec![crate::status::ConsumerStatus {
                stream: t.clone(),
                consumer: t.clone(),
                pending: 0,
                ack_pending: 0,
                redelivered: 0,
                error: Some(t.clone()),
            }],
        };
        // Two tables, a blank line between.
        check("status", &crate::status::table(&status), 5)?;
    }

    #[test]
    fn deliveries_are_a_line_a_delivery_and_a_try(t in hostile()) {
        let attempt = DeliveryAttempt {
            run_id: t.clone(),
            attempt: 2,
            url: t.clone(),
            error: t.clone(),
            webhook_id: t.clone(),
            round: 2,
            requested_by: t.clone(),
            next_try_unix_ms: 5,
            tries: 8,
            ..Default::default()
        };
        let listed = crate::deliveries::Listed {
            run_id: t.clone(),
            state: crate::deliveries::State::Pending,
            round: 2,
            tries: 2,
            max_tries: 8,
            last_status: 0,
            last_error: t.clone(),
            last_try_at_unix_ms: 0,
            next_try_at_unix_ms: Some(5),
            url: t.clone(),
        };
        check("deliveries", &crate::deliveries::table(&[listed], 0), 2)?;
        check("deliveries show", &crate::deliveries::tries_table(&[attempt.clone(), attempt]), 3)?;
    }

    #[test]
    fn attach_shows_text_with_its_lines_and_everything_else_a_line_a_chunk(t in hostile()) {
        let chunks = [
            serde_json::json!({"type": "tool-input-available", "toolName": t, "input": {"a": t}}),
            serde_json::json!({"type": "tool-output-available", "output": t}),
            serde_json::json!({"type": "tool-output-error", "errorText": t}),
            serde_json::json!({"type": "data-approval", "data": {"state": "waiting", "approval": t, "tool": t}}),
            serde_json::json!({"type": "data-run", "data": {"status": "queued", "run": t}}),
            serde_json::json!({"type": "data-run", "data": {"status": t, "run": t, "reason": t}}),
            serde_json::json!({"type": "data-leaf", "data": {"state": "doing", "title": t}}),
        ];
        for chunk in &chunks {
            let mut at_line_start = true;
            let shown = crate::attach::show(chunk, &mut at_line_start);
            check("attach", &shown, 1)?;
        }
        let mut at_line_start = true;
        let delta = serde_json::json!({"type": "text-delta", "delta": t});
        let shown = crate::attach::show(&delta, &mut at_line_start);
        prop_assert!(is_safe(&shown), "{shown:?}");
        prop_assert_eq!(
            shown.matches('\n').count(),
            t.replace("\r\n", "\n").matches('\n').count()
        );
    }
}
