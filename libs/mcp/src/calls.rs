//! What each tool does once its call is checked: one request over the bus, and an
//! answer a person (or a model) can read, with the same as JSON.

use std::time::Duration;

use dispatch_bus::{RunId, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{
    GetRunRequest, ListApprovalsRequest, ListApprovalsResponse, ListTasksRequest,
    ListTasksResponse, RunView,
};
use dispatch_proto::policy::v1::{
    ResolveApprovalRequest, ResolveApprovalResponse, resolve_approval_response::Outcome,
};
use dispatch_runlog::one_line;
use dispatch_runlog::submit::{Goal, Submission, Submitted};
use rmcp::model::CallToolResult;
use serde_json::json;

use crate::tools::Call;
use crate::{Server, answer, refusal};

/// How long a query waits for the ledger.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the policy service has to record an answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a goal is offered to NATS: again is safe (the same submission is
/// stored once), so a blip does not lose it.
const STORE_ATTEMPTS: u32 = 3;

/// Tasks and approvals in one answer: a page, as the ledger cuts it.
const PAGE: u32 = 100;

/// Characters of a goal, a summary or a reason shown on one line.
const GOAL_CHARS: usize = 200;
const SUMMARY_CHARS: usize = 500;

impl Server {
    pub(crate) async fn call(&self, call: Call, caller: &str) -> CallToolResult {
        let answered = match call {
            Call::Dispatch(goal) => self.dispatch(*goal).await,
            Call::Tasks(conversation) => self.tasks(conversation.as_str()).await,
            Call::Status(run) => self.status(&run).await,
            Call::Stop(run) => self.stop(&run, caller).await,
            Call::Approvals => self.approvals().await,
            Call::Approve {
                approval_id,
                args_digest,
            } => {
                self.resolve(approval_id, "allow", args_digest, String::new(), caller)
                    .await
            }
            Call::Deny {
                approval_id,
                reason,
            } => {
                self.resolve(approval_id, "deny", String::new(), reason, caller)
                    .await
            }
        };
        answered.unwrap_or_else(refusal)
    }

    /// Stores the goal as `POST /v1/goals` does and answers with its run id.
    async fn dispatch(&self, goal: Goal) -> Result<CallToolResult, String> {
        let conversation = goal.conversation().to_string();
        let submission = Submission::new(goal);
        let mut last_error = None;
        for attempt in 0..STORE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            match submission.submit(&self.bus).await {
                Ok(submitted) => {
                    let run_id = match submitted {
                        Submitted::Stored(run_id) => run_id.to_string(),
                        Submitted::Earlier(earlier) => earlier.run_id,
                    };
                    tracing::info!(run_id = %run_id, "goal stored over mcp");
                    return Ok(answer(
                        format!(
                            "run {run_id} is queued (conversation {conversation}). Call \
                             `tasks` with this conversation to get its note once it ends, \
                             or `status` with the run id."
                        ),
                        json!({"run_id": run_id, "conversation": conversation}),
                    ));
                }
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "goal not stored yet");
                    last_error = Some(e);
                }
            }
        }
        let run_id = submission.run_id();
        let error = last_error.map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(run_id = %run_id, error = %error, "goal not known to be stored");
        Err(format!(
            "NATS did not confirm the goal ({error}); it may or may not be stored as run \
             {run_id}: check with `status` before dispatching it again"
        ))
    }

    /// A page of the conversation's tasks, and its notes, drained.
    async fn tasks(&self, conversation: &str) -> Result<CallToolResult, String> {
        let request = ListTasksRequest {
            conversation_id: conversation.to_owned(),
            limit: Some(PAGE),
            after: None,
            drain_id: None,
        };
        let page: ListTasksResponse = self.ask(subject::query::tasks(), &request).await?;
        let mut text = format!(
            "tasks of conversation {conversation}: {}\n",
            page.tasks.len()
        );
        let mut tasks = Vec::with_capacity(page.tasks.len());
        for task in &page.tasks {
            let status = task.status().word();
            let goal = one_line(&task.goal, GOAL_CHARS);
            text.push_str(&format!("{} {status} {goal}\n", task.run_id));
            tasks.push(json!({"run_id": task.run_id, "status": status, "goal": goal}));
        }
        if page.next.is_some() {
            text.push_str("(more tasks: the newest are shown)\n");
        }
        text.push_str(&format!("notes: {}\n", page.feedback.len()));
        let mut notes = Vec::with_capacity(page.feedback.len());
        for note in &page.feedback {
            let status = one_line(&note.status, 32);
            let summary = one_line(&note.summary, SUMMARY_CHARS);
            text.push_str(&format!("{} {status} {summary}\n", note.run_id));
            notes.push(json!({
                "run_id": note.run_id,
                "status": status,
                "summary": summary,
                "goal": one_line(&note.goal, GOAL_CHARS),
            }));
        }
        if page.more_feedback {
            text.push_str("(more notes are waiting: call tasks again)\n");
        }
        Ok(answer(
            text,
            json!({
                "conversation": conversation,
                "tasks": tasks,
                "notes": notes,
                "more_notes": page.more_feedback,
            }),
        ))
    }

    /// One run as the ledger shows it.
    async fn status(&self, run: &str) -> Result<CallToolResult, String> {
        let view: RunView = self
            .ask(subject::query::run(), &GetRunRequest { id: run.to_owned() })
            .await?;
        let status = view.status();
        let mut text = format!(
            "run {}: {}\ngoal: {}\nconversation: {}  origin: {}\n",
            view.run_id,
            status.word(),
            one_line(&view.goal, SUMMARY_CHARS),
            one_line(&view.conversation_id, 128),
            one_line(&view.origin, 128),
        );
        if view.leaves > 0 {
            text.push_str(&format!(
                "steps: {} of {} done, {} failed\n",
                view.leaves_done, view.leaves, view.leaves_failed
            ));
        }
        if let Some(reason) = &view.reason {
            text.push_str(&format!("reason: {}\n", one_line(reason, SUMMARY_CHARS)));
        }
        if let Some(summary) = &view.summary {
            text.push_str(&format!("summary: {}\n", one_line(summary, SUMMARY_CHARS)));
        }
        for approval in &view.approvals {
            text.push_str(&format!(
                "waiting for approval: {} ({})\n",
                approval.approval_id,
                one_line(&approval.tool, 128)
            ));
        }
        if status.is_terminal()
            && let Ok(run_id) = view.run_id.parse::<RunId>()
        {
            text.push_str(&format!("report: {}\n", crate::report_uri(&run_id)));
        }
        let structured = serde_json::to_value(&view).unwrap_or_default();
        Ok(answer(text, structured))
    }

    /// Hands the run's stop to the dispatcher, as `dispatch stop --detach` does.
    async fn stop(&self, run: &str, caller: &str) -> Result<CallToolResult, String> {
        let run_id = self.resolve_run(run).await?;
        dispatch_runlog::stop::hand_over(
            &self.bus,
            &run_id,
            dispatch_runlog::stop::DEFAULT_GRACE,
            false,
            caller,
        )
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(run_id = %run_id, by = %caller, "stop handed over");
        let grace = dispatch_runlog::stop::DEFAULT_GRACE.as_secs();
        Ok(answer(
            format!(
                "the stop of run {run_id} is handed to the dispatcher: the run ends \
                 `stopped` within {grace}s (one that has ended already is left as it is). \
                 `status` shows it."
            ),
            json!({"run_id": run_id.to_string(), "stop": "handed_over", "grace_s": grace}),
        ))
    }

    /// The run a whole id names when its log or goal is there, else the one the ledger
    /// finds for a short id or prefix.
    async fn resolve_run(&self, run: &str) -> Result<RunId, String> {
        if let Ok(run_id) = run.parse::<RunId>() {
            let logged = self
                .log
                .read_after(&run_id, 0)
                .await
                .is_ok_and(|events| !events.is_empty());
            let known = logged
                || dispatch_runlog::submit::find_goal(&self.bus, &run_id)
                    .await
                    .is_ok_and(|goal| goal.is_some());
            if known {
                return Ok(run_id);
            }
        }
        let view: RunView = self
            .ask(subject::query::run(), &GetRunRequest { id: run.to_owned() })
            .await?;
        view.run_id
            .parse()
            .map_err(|e: dispatch_bus::IdError| e.to_string())
    }

    /// A page of the approval requests nobody has answered.
    async fn approvals(&self) -> Result<CallToolResult, String> {
        let request = ListApprovalsRequest {
            limit: Some(PAGE),
            after: None,
        };
        let page: ListApprovalsResponse = self.ask(subject::query::approvals(), &request).await?;
        let mut text = format!("approval requests waiting: {}\n", page.approvals.len());
        let mut listed = Vec::with_capacity(page.approvals.len());
        for approval in &page.approvals {
            let tool = one_line(&approval.tool, 128);
            let args = one_line(&approval.args_json, 300);
            text.push_str(&format!(
                "{} run {} tool {tool} risk {} digest {}\n  args: {args}{}\n  why: {}\n",
                approval.approval_id,
                approval.run_id,
                one_line(&approval.risk, 32),
                approval.args_digest,
                if approval.args_clipped {
                    " (clipped)"
                } else {
                    ""
                },
                one_line(&approval.reason, SUMMARY_CHARS),
            ));
            listed.push(json!({
                "approval_id": approval.approval_id,
                "run_id": approval.run_id,
                "tool": tool,
                "risk": approval.risk,
                "rule": one_line(&approval.rule, 128),
                "reason": one_line(&approval.reason, SUMMARY_CHARS),
                "args_json": approval.args_json,
                "args_clipped": approval.args_clipped,
                "args_digest": approval.args_digest,
                "expires_at_ms": approval.expires_at_ms,
            }));
        }
        if page.next.is_some() {
            text.push_str("(more are waiting: answer these first)\n");
        }
        Ok(answer(
            text,
            json!({"approvals": listed, "more": page.next.is_some()}),
        ))
    }

    /// Records an answer to an approval request through the policy service, which
    /// lets exactly one answer win.
    async fn resolve(
        &self,
        approval_id: String,
        decision: &str,
        args_digest: String,
        reason: String,
        caller: &str,
    ) -> Result<CallToolResult, String> {
        let reply: ResolveApprovalResponse = self
            .bus
            .request_proto(
                subject::policy::resolve(),
                &ResolveApprovalRequest {
                    approval_id: approval_id.clone(),
                    decision: decision.to_owned(),
                    resolved_by: caller.to_owned(),
                    reason,
                    args_digest,
                },
                RESOLVE_TIMEOUT,
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "the policy service did not answer");
                format!("the policy service did not answer: {e}; nothing was recorded")
            })?;
        let message = one_line(&reply.message, SUMMARY_CHARS);
        let outcome = match reply.outcome() {
            Outcome::Resolved => {
                tracing::info!(approval_id = %approval_id, decision, by = %caller, "approval answered over mcp");
                return Ok(answer(
                    format!("{approval_id}: {decision} recorded (by {caller}). {message}"),
                    json!({
                        "approval_id": approval_id,
                        "decision": decision,
                        "resolved_by": caller,
                        "outcome": "resolved",
                        "message": message,
                    }),
                ));
            }
            Outcome::AlreadyDecided => "already_decided",
            Outcome::RunEnded => "run_ended",
            Outcome::NotFound => "not_found",
            Outcome::Invalid => "invalid_approval",
            Outcome::DigestMismatch => "digest_mismatch",
            Outcome::Unspecified => "policy_unavailable",
        };
        Err(format!(
            "{outcome}: {message} (nothing was recorded for this answer)"
        ))
    }

    /// Asks the ledger, and says why there is no answer when there is none.
    async fn ask<Q, R>(&self, subject: subject::Subject, query: &Q) -> Result<R, String>
    where
        Q: serde::Serialize,
        R: serde::de::DeserializeOwned,
    {
        match self
            .bus
            .request_json::<_, Reply<R>>(subject, query, QUERY_TIMEOUT)
            .await
        {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(one_line(&e.to_string(), SUMMARY_CHARS)),
            Err(e) => {
                tracing::warn!(error = %e, "the ledger did not answer");
                Err(format!("the ledger did not answer: {e}"))
            }
        }
    }
}
