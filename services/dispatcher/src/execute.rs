//! One run, driven from its log to its terminal event.
//!
//! Every step is "find it in the log, or do it and append it", so the same code runs a
//! fresh goal and resumes an interrupted one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispatch_bus::ask::Asked;
use dispatch_bus::work::Slot;
use dispatch_bus::{RunId, subject};
use dispatch_models::{
    AUTHOR_TEMPERATURE, AuthorRequest, Delta, EarlierStep, Exchange, Retry, ToolSpec, TurnReply,
    TurnRequest,
};
use dispatch_proto::command::v1::{CallTool, CheckGate, CheckPolicy, SubmitGoal};
use dispatch_proto::run::v1::{
    ApprovalRequested, ApprovalResolved, Decision, GateChecked, LeafFinished, LeafStarted,
    LeafState, ModelTurn, OutputDelta, PlanAuthored, PlanLeaf, PlanRejected, PolicyDecided, Risk,
    RunRequested, RunStarted, RunStatus, StopRequested, TallyEntry, ToolCall, ToolCallRequested,
    run_event::Body,
};
use dispatch_rules::MEMO_RULE;
use dispatch_runlog::submit::MAX_TIMEOUT_MS;
use dispatch_runlog::{ErrorKind, Report, RunHandle, SUMMARY_CHARS, slice_bytes, slice_chars};
use dispatch_service::layout;

use crate::{Context, DEFAULT_TIMEOUT, Error, telemetry};

mod chat;
pub(crate) use chat::{Budget, TurnCache};
use opentelemetry::KeyValue;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The rejection code of a plan whose author stopped at the token limit.
const CUT_OFF: &str = "cut_off";
/// How many answers the author model may give for one plan: the first, and one retry
/// with the reason the first was sent back.
const AUTHOR_ATTEMPTS: usize = 2;
/// How many times a leaf's model, having said it finished, is told that the leaf's gate
/// does not pass and given another turn (while turns are left).
const GATE_RETRIES: u32 = 2;

/// The most of one earlier step's findings a later step's model is shown, in characters.
const EARLIER_STEP_CHARS: usize = 2_000;
/// The most of all earlier steps' findings a step's model is shown, in characters.
const EARLIER_CHARS: usize = 8_000;

/// How long the owner of a force-stopped run waits for the requester's terminal event.
const FORCED_STOP_WAIT: Duration = Duration::from_secs(10);

/// The report a run may write in its scratch directory.
const REPORT_FILE: &str = "REPORT.org";
/// The most of a report recorded in `RunFinished`.
const MAX_REPORT_BYTES: usize = 64 * 1024;
/// The most of a leaf's answer recorded in `LeafFinished`.
const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// Why a leaf whose model made no tool call is FAILED, whatever its gate says.
const NO_CALL: &str = "the model made no tool call in the step other than looking for \
                       tools, so nothing shows the step's own work: its gate would pass \
                       without it";
/// The most of a call's arguments recorded when they have no canonical form (the
/// policy refuses such a call; this is only what it was).
const UNREADABLE_ARGS_BYTES: usize = 16 * 1024;
/// How often streamed model text is appended to the log, at most: a few events a
/// second per streaming run, each soon on the conversation stream.
const DELTA_EVERY: Duration = Duration::from_millis(50);
/// Streamed text appended at once when this much has gathered before [`DELTA_EVERY`].
const DELTA_BYTES: usize = 2048;

/// How often a run waiting for approval looks at its log when its feed is quiet.
const APPROVAL_POLL: Duration = Duration::from_secs(5);

/// The built-in tool that finds other tools by words (the connectors' `tools.search`).
const SEARCH_TOOL: &str = "tools.search";
/// The built-in tool that writes a file under `scratch/`: offered to every step whose
/// gate checks such a file, whatever tools its author named.
const SCRATCH_WRITE_TOOL: &str = "files.write_file";

/// How many times one model request is made when it times out, while the run's
/// deadline leaves time (the deadline cuts any of them short).
const MODEL_TRIES: u32 = 3;

/// How long the stop watcher trusts a quiet feed before it reads the log itself.
const STOP_WATCH_QUIET: Duration = Duration::from_secs(5);

/// Why driving a run stopped short of its plan.
enum Stop {
    /// The run ends `blocked` with this reason.
    Blocked(String),
    /// Someone asked the run to stop; it ends `stopped` with this reason.
    Stopped(String),
    /// Something else already wrote the terminal event.
    Finished,
    /// The bus or the log failed; the run stays where its log is and is retried.
    Infra(Error),
}

impl From<dispatch_runlog::Error> for Stop {
    fn from(err: dispatch_runlog::Error) -> Self {
        match err.kind() {
            ErrorKind::Finished => Stop::Finished,
            _ => Stop::Infra(err.into()),
        }
    }
}

impl From<dispatch_bus::Error> for Stop {
    fn from(err: dispatch_bus::Error) -> Self {
        Stop::Infra(err.into())
    }
}

/// Drives `run_id` to its terminal event. Returns once the log holds one.
pub(crate) async fn run(
    ctx: &Context,
    run_id: RunId,
    command: &SubmitGoal,
    slot: Slot,
) -> Result<(), Error> {
    let span = tracing::info_span!(
        "run",
        run_id = %run_id,
        origin = command.origin.as_str(),
        status = tracing::field::Empty,
    );
    run_in_span(ctx, run_id, command, slot)
        .instrument(span)
        .await
}

async fn run_in_span(
    ctx: &Context,
    run_id: RunId,
    command: &SubmitGoal,
    slot: Slot,
) -> Result<(), Error> {
    if command.kind == dispatch_runlog::service::KIND {
        return crate::service::start(ctx, run_id, command).await;
    }
    let handle = ctx.log.handle(run_id).await?;
    // A wake is recorded in its service's log before its own first event; one that has
    // its first event was recorded already.
    if handle.events().is_empty()
        && !command.wake.is_empty()
        && let Err(reason) = crate::service::record_wake(ctx, run_id, command).await?
    {
        tracing::info!(run_id = %run_id, reason, "a wake may not run");
        return block(ctx, run_id, command, reason).await;
    }
    let mut exec = Exec {
        ctx,
        resumed: !handle.events().is_empty(),
        run: handle,
        command,
        slot: Some(slot),
    };
    if exec.run.is_finished() {
        return Ok(());
    }
    // Taken over after its deadline passed with nobody running it: the run is orphaned.
    if let Some(started) = exec.find(as_started) {
        if started.deadline_unix_ms <= now_unix_ms() {
            tracing::warn!(run_id = %run_id, "deadline passed while no dispatcher ran it");
            return settle(
                exec.finish(RunStatus::Blocked, "orphaned".into(), "orphaned".into())
                    .await,
            );
        }
        tracing::info!(run_id = %run_id, events = exec.run.events().len(), "resuming from the log");
        // The copy that began the run did so in a span of its own; this one links to
        // it, so a trace view leads from the take-over back to the first attempt.
        if let Ok(Some(begun)) = ctx.log.trace_of(&run_id).await {
            tracing::Span::current().add_link(begun);
        }
    }
    let outcome = exec.drive().await;
    let report = exec.report();
    let (status, reason, summary) = match outcome {
        Ok(_) if command.kind == dispatch_runlog::turn::KIND => exec.turn_outcome(),
        Ok(tally) => {
            let tally_line = format!("workflow finished: {}", tally_json(&tally));
            match exec.unfinished() {
                // Done only when every leaf was shown done.
                None => {
                    let opening = opening_lines(&report.text);
                    let summary = match opening.is_empty() {
                        true => tally_line,
                        false => format!("{tally_line}\n{opening}"),
                    };
                    (RunStatus::Done, "workflow finished".to_owned(), summary)
                }
                Some(reason) => {
                    let summary = format!("{tally_line}\n{reason}");
                    (RunStatus::Blocked, reason, summary)
                }
            }
        }
        Err(Stop::Blocked(reason)) => (RunStatus::Blocked, reason.clone(), reason),
        Err(Stop::Stopped(reason)) => (RunStatus::Stopped, reason.clone(), reason),
        Err(Stop::Finished) => return Ok(()),
        Err(Stop::Infra(e)) => return Err(e),
    };
    settle(exec.finish_with(status, reason, summary, report).await)
}

/// Ends `run_id` `blocked` with `reason` (sliced to 300 characters), unless it has
/// ended already. Used when the executor itself failed.
pub(crate) async fn block(
    ctx: &Context,
    run_id: RunId,
    command: &SubmitGoal,
    reason: String,
) -> Result<(), Error> {
    let mut exec = Exec {
        ctx,
        run: ctx.log.handle(run_id).await?,
        command,
        slot: None,
        resumed: true,
    };
    if exec.run.is_finished() {
        return Ok(());
    }
    // A goal given up or rejected before its run began still gets its first event,
    // so its log reads like any other run's.
    if let Err(stop) = exec.requested().await {
        return settle(Err(stop));
    }
    settle(
        exec.finish(RunStatus::Blocked, reason.clone(), reason)
            .await,
    )
}

fn settle(finished: Result<(), Stop>) -> Result<(), Error> {
    match finished {
        Ok(()) | Err(Stop::Finished) => Ok(()),
        Err(Stop::Blocked(_) | Stop::Stopped(_)) => unreachable!("finishing never blocks"),
        Err(Stop::Infra(e)) => Err(e),
    }
}

struct Exec<'a> {
    ctx: &'a Context,
    run: RunHandle,
    command: &'a SubmitGoal,
    /// This run's share of the copy's `--max-runs`, given back while it waits for a
    /// person (none when only settling a run).
    slot: Option<Slot>,
    /// The log had events before this attempt: an earlier one was interrupted.
    resumed: bool,
}

impl Exec<'_> {
    /// Runs the plan until it ends, its deadline passes, or someone asks it to stop.
    async fn drive(&mut self) -> Result<Vec<TallyEntry>, Stop> {
        if let Some(stop) = self.find(as_stop) {
            return Err(self.stopped(&stop).await);
        }
        let read = self.run.events().last().map_or(0, |e| e.stream_seq);
        // One subscription to the run's feed serves the watcher and the handle.
        let shared = self.ctx.log.share_feed(&mut self.run).await.ok();
        let watch = watch_for_stop(self.ctx.log.clone(), *self.run.run_id(), read, shared);
        let work = async {
            match self.command.kind == dispatch_runlog::turn::KIND {
                true => self.drive_turn().await,
                false => self.drive_plan().await,
            }
        };
        let stop = tokio::select! {
            result = work => return result,
            stop = watch => stop,
        };
        Err(self.stopped(&stop).await)
    }

    /// The work is cancelled. A forced stop is ended by whoever forced it, so its reason
    /// stands; this copy only steps in if that terminal event does not come.
    async fn stopped(&mut self, stop: &StopRequested) -> Stop {
        if stop.force {
            let ended =
                tokio::time::timeout(FORCED_STOP_WAIT, self.run.wait_until_finished()).await;
            if matches!(ended, Ok(Ok(()))) {
                return Stop::Finished;
            }
            return Stop::Stopped(format!("stopped by {} (forced)", stop.requested_by));
        }
        Stop::Stopped(stop_reason(stop))
    }

    /// The plan and its leaves, within the run's deadline: the kill switch is a wall
    /// for the whole run, armed when the run is requested, so an author stuck on a slow
    /// model is cut by it as a leaf would be.
    async fn drive_plan(&mut self) -> Result<Vec<TallyEntry>, Stop> {
        let requested = self.requested().await?;
        let timeout = self.timeout_of(&requested);
        let deadline_ms = self.deadline_ms(timeout);
        let left = deadline_ms.saturating_sub(now_unix_ms()).max(0) as u64;
        let wall = tokio::time::Instant::now() + Duration::from_millis(left);
        let work = async {
            let plan = self.plan(&requested).await?;
            self.started(deadline_ms).await?;
            self.leaves(&requested, &plan).await
        };
        match tokio::time::timeout_at(wall, work).await {
            Ok(result) => result,
            Err(_) if self.waiting_for_approval() => {
                Err(Stop::Blocked("timed out waiting for approval".into()))
            }
            Err(_) if self.find(as_plan).is_none() => Err(Stop::Blocked(format!(
                "timed out after {} while the plan was being written",
                human(timeout)
            ))),
            Err(_) => Err(Stop::Blocked(format!("timed out after {}", human(timeout)))),
        }
    }

    /// The run's kill-switch budget. The log is read back, not trusted to be sane: a
    /// timeout beyond the longest a goal may ask for is held to that.
    fn timeout_of(&self, requested: &RunRequested) -> Duration {
        match requested.timeout_ms {
            0 => DEFAULT_TIMEOUT,
            ms => Duration::from_millis(ms.min(MAX_TIMEOUT_MS)),
        }
    }

    /// When the run's time is up, in Unix milliseconds: `timeout` after it was
    /// requested (its first event), or the deadline its start recorded.
    fn deadline_ms(&self, timeout: Duration) -> i64 {
        if let Some(started) = self.find(as_started) {
            return started.deadline_unix_ms;
        }
        let requested_at = self
            .run
            .events()
            .first()
            .map_or_else(now_unix_ms, |e| e.event.time_unix_ms);
        requested_at.saturating_add(timeout.as_millis() as i64)
    }

    async fn requested(&mut self) -> Result<RunRequested, Stop> {
        Ok(dispatch_runlog::submit::record_request(&mut self.run, self.command).await?)
    }

    async fn plan(&mut self, requested: &RunRequested) -> Result<PlanAuthored, Stop> {
        if let Some(plan) = self.find(as_plan) {
            return Ok(plan);
        }
        let span = tracing::info_span!("plan", run_id = %self.run.run_id());
        self.author_plan(requested).instrument(span).await
    }

    async fn author_plan(&mut self, requested: &RunRequested) -> Result<PlanAuthored, Stop> {
        let mut rejected: Vec<PlanRejected> = self.all(as_rejected);
        loop {
            if rejected.len() >= AUTHOR_ATTEMPTS {
                let last = rejected.last().expect("every attempt rejected");
                return Err(Stop::Blocked(format!(
                    "plan rejected: {}: {}",
                    last.code, last.message
                )));
            }
            let attempt = rejected.len() as u32 + 1;
            let retry = rejected.last().map(|r| Retry {
                answer: (r.code != CUT_OFF).then(|| r.answer.clone()),
                error: format!(
                    "Your previous outline was invalid ({}: {}). Emit a corrected org outline only.",
                    r.code, r.message
                ),
            });
            let provider = &self.ctx.providers.author;
            let offered = self.ctx.offer.current().await;
            let tools = offered.plan_specs();
            let known: Vec<String> = tools.iter().map(|t| t.name.clone()).collect();
            let goal = dispatch_runlog::submit::prompt_goal(requested);
            let span = telemetry::model_span(provider.name(), "author");
            let request = AuthorRequest {
                goal: goal.clone(),
                grammar: dispatch_plan::GRAMMAR,
                retry,
                temperature: AUTHOR_TEMPERATURE,
                tools,
            };
            let mut timeouts = 0;
            let mut answer = loop {
                match provider
                    .author(request.clone())
                    .instrument(span.clone())
                    .await
                {
                    Err(dispatch_models::Error::TimedOut { message, .. })
                        if timeouts + 1 < MODEL_TRIES =>
                    {
                        timeouts += 1;
                        tracing::warn!(run_id = %self.run.run_id(), timeouts, reason = %message, "the author model timed out; asking again within the run's deadline");
                    }
                    answer => {
                        break answer.map_err(|e| {
                            span.record("otel.status_code", "ERROR");
                            Stop::Blocked(slice_chars(&e.to_string(), SUMMARY_CHARS))
                        })?;
                    }
                }
            };
            telemetry::model_used(&span, provider.name(), answer.usage);
            // Nothing a model writes keeps a secret it may have come by.
            answer.text = self.ctx.known.scrub(&answer.text);
            telemetry::model_content(&span, &goal, &answer.text);
            // An outline cut off at the token limit is not the one the model meant, even
            // when what arrived parses (a small model repeating a line until the limit).
            let parsed = if answer.cut_off {
                Err((
                    CUT_OFF.to_owned(),
                    "the outline stopped at the token limit before it was finished; write a \
                     shorter one, each headline and drawer once"
                        .to_owned(),
                ))
            } else {
                dispatch_plan::parse(&answer.text)
                    .map_err(|e| (e.code().to_owned(), e.to_string()))
                    .and_then(|plan| {
                        // A leaf with no gate can never be shown done: always sent back.
                        if let Some(told) = plan.gateless_leaves() {
                            return Err((dispatch_plan::NO_GATE.to_owned(), told));
                        }
                        // Nor one whose gate passes whatever the step did, when a model
                        // wrote it: a plan given as the goal (the offline provider runs
                        // it as written) is its writer's to make.
                        if provider.name() != dispatch_models::offline::NAME
                            && let Some(told) = plan.blind_gates()
                        {
                            return Err((dispatch_plan::BLIND_GATE.to_owned(), told));
                        }
                        // A tool no connector serves is worth the retry while one is
                        // left; on the last attempt it is left out, and the step can
                        // search for what it needs.
                        let last_attempt = attempt as usize >= AUTHOR_ATTEMPTS;
                        let known: Vec<&str> = known.iter().map(String::as_str).collect();
                        let plan = match plan.unknown_tools(&known) {
                            Some(told) if !last_attempt => {
                                return Err((dispatch_plan::UNKNOWN_TOOL.to_owned(), told));
                            }
                            Some(_) => plan.without_unknown_tools(&known),
                            None => plan,
                        };
                        // A gate that can never pass makes a step that can never be
                        // shown done, so the plan cannot succeed: sent back, and refused
                        // on its last attempt rather than run to a certain `blocked`.
                        if let Some(told) =
                            plan.unusable_gates(|outside| offered.gate_call(outside))
                        {
                            return Err((dispatch_plan::UNUSABLE_GATE.to_owned(), told));
                        }
                        // A step checked on a later step's file is worth the retry while
                        // one is left; on the last attempt it runs as written.
                        match plan.borrowed_gates(
                            |tool| offered.writes_in_run(tool),
                            |outside| offered.gate_call(outside),
                        ) {
                            Some(told) if !last_attempt => {
                                Err((dispatch_plan::BORROWED_GATE.to_owned(), told))
                            }
                            _ => Ok(plan),
                        }
                    })
            };
            match parsed {
                Ok(plan) => {
                    let slug = dispatch_plan::slug(&requested.goal);
                    let path =
                        write_workflow(&self.ctx.workspace, &slug, self.run.run_id(), &plan.text)
                            .map_err(|e| Stop::Blocked(format!("cannot write the plan: {e}")))?;
                    let body = PlanAuthored {
                        attempt,
                        title: plan.title.clone(),
                        slug,
                        workflow_path: path,
                        plan_text: plan.text.clone(),
                        leaves: plan.leaves.iter().map(to_proto_leaf).collect(),
                        model: provider.name().to_owned(),
                        usage: Some(usage(answer.usage)),
                    };
                    return self.ensure(as_plan, Body::PlanAuthored(body)).await;
                }
                Err((code, message)) => {
                    tracing::info!(run_id = %self.run.run_id(), attempt, code, "plan rejected");
                    let body = PlanRejected {
                        attempt,
                        code,
                        message,
                        model: provider.name().to_owned(),
                        usage: Some(usage(answer.usage)),
                        answer: slice_bytes(&answer.text, MAX_ANSWER_BYTES).to_owned(),
                    };
                    let matches = move |b: &Body| match b {
                        Body::PlanRejected(r) if r.attempt == attempt => Some(r.clone()),
                        _ => None,
                    };
                    self.ensure(matches, Body::PlanRejected(body)).await?;
                    rejected = self.all(as_rejected);
                }
            }
        }
    }

    /// Records the start, with the run's deadline, and makes its scratch directory.
    async fn started(&mut self, deadline_unix_ms: i64) -> Result<(), Stop> {
        let body = Body::RunStarted(RunStarted {
            owner: self.ctx.owner.clone(),
            deadline_unix_ms,
            ..Default::default()
        });
        let first_start = self.find(as_started).is_none();
        self.ensure(as_started, body).await?;
        if first_start {
            telemetry::metrics()
                .started
                .add(1, &[KeyValue::new("origin", self.command.origin.clone())]);
        }
        let scratch = layout::run_dir(&self.ctx.workspace, self.run.run_id()).join(layout::SCRATCH);
        std::fs::create_dir_all(&scratch)
            .map_err(|e| Stop::Blocked(format!("cannot create {}: {e}", scratch.display())))?;
        Ok(())
    }

    async fn leaves(
        &mut self,
        requested: &RunRequested,
        plan: &PlanAuthored,
    ) -> Result<Vec<TallyEntry>, Stop> {
        for leaf in &plan.leaves {
            let index = leaf.index;
            if self.find(finished_leaf(index)).is_some() {
                continue;
            }
            // An ordered leaf builds on the ones before it: after a failure it would
            // only build on what is not there.
            if leaf.ordered
                && let Some(failed) = self.find(failed_leaf)
            {
                let title = plan
                    .leaves
                    .iter()
                    .find(|l| l.index == failed)
                    .map_or("", |l| l.title.as_str());
                let skipped = Body::LeafFinished(LeafFinished {
                    leaf: index,
                    state: LeafState::Skipped as i32,
                    reason: slice_chars(
                        &format!("not run: step {} ({title:?}) before it failed", failed + 1),
                        SUMMARY_CHARS,
                    ),
                    answer: String::new(),
                });
                self.ensure(finished_leaf(index), skipped).await?;
                continue;
            }
            let started = Body::LeafStarted(LeafStarted {
                leaf: index,
                title: leaf.title.clone(),
            });
            self.ensure(started_leaf(index), started).await?;
            let span = tracing::info_span!(
                "leaf",
                run_id = %self.run.run_id(),
                leaf = index,
                state = tracing::field::Empty,
            );
            let (state, reason, answer) =
                self.leaf(requested, leaf).instrument(span.clone()).await?;
            span.record("state", state.as_str_name());
            tracing::info!(run_id = %self.run.run_id(), leaf = index, state = state.as_str_name(), "leaf finished");
            let finished = Body::LeafFinished(LeafFinished {
                leaf: index,
                state: state as i32,
                reason,
                answer,
            });
            self.ensure(finished_leaf(index), finished).await?;
        }
        Ok(self.run.tally())
    }

    /// Asks the worker model for one turn, appending its text to the log as it streams
    /// (`OutputDelta`s, gathered for [`DELTA_EVERY`]; an answer quicker than that adds
    /// none). Returns the reply and the part whose deltas are exactly its text, if any.
    async fn streamed_turn(
        &mut self,
        leaf: u32,
        turn: u32,
        mut request: TurnRequest,
    ) -> Result<(TurnReply, Option<u32>), Stop> {
        let provider = self.ctx.providers.worker.clone();
        // A part this turn streamed before (a resumed run) is void: end it, go on in
        // the next one.
        let earlier = self
            .run
            .bodies()
            .filter_map(|b| match b {
                Body::OutputDelta(d) if d.leaf == leaf && d.turn == turn => Some(d.clone()),
                _ => None,
            })
            .last();
        let mut part = Part::new(leaf, turn, 0);
        if let Some(earlier) = earlier {
            if !earlier.abandoned {
                let mut void = Part::new(leaf, turn, earlier.part);
                void.offset = earlier.offset + earlier.text.len() as u64;
                self.append_delta(void.delta(String::new(), true)).await?;
            }
            part = Part::new(leaf, turn, earlier.part + 1);
        }
        let span = telemetry::model_span(provider.name(), "turn");
        let prompt = telemetry::capture_content().then(|| format!("{:?}", request.history.last()));
        let mut timeouts = 0;
        let reply = loop {
            let (sink, deltas) = tokio::sync::mpsc::unbounded_channel();
            request.deltas = Some(sink);
            let asked = provider.turn(request.clone()).instrument(span.clone());
            match self.stream_into(&mut part, asked, deltas).await? {
                Err(dispatch_models::Error::TimedOut { message, .. })
                    if timeouts + 1 < MODEL_TRIES =>
                {
                    timeouts += 1;
                    tracing::warn!(run_id = %self.run.run_id(), leaf, turn, timeouts, reason = %message, "the worker model timed out; asking again within the run's deadline");
                    // What this answer streamed is void; the next starts a new part.
                    part.scrubbed = Default::default();
                    self.abandon(&mut part).await?;
                }
                reply => break reply,
            }
        };
        let mut reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                self.abandon(&mut part).await?;
                return Err(Stop::Blocked(slice_chars(&e.to_string(), SUMMARY_CHARS)));
            }
        };
        telemetry::model_used(&span, provider.name(), reply.usage);
        // Nothing a model writes keeps a secret it may have come by: not its text, and
        // not the arguments of the calls it asks for (a secret it decoded, sent on).
        reply.text = self.ctx.known.scrub(&reply.text);
        for call in &mut reply.tool_calls {
            call.args_json = self.ctx.known.scrub(&call.args_json);
        }
        if let Some(prompt) = prompt {
            telemetry::model_content(&span, &prompt, &reply.text);
        }
        if part.sent.is_empty() {
            // Nothing went out while the model answered: the ModelTurn says it all.
            return Ok((reply, None));
        }
        self.flush(&mut part).await?;
        if part.sent != reply.text {
            self.abandon(&mut part).await?;
            return Ok((reply, None));
        }
        Ok((reply, Some(part.part)))
    }

    /// Waits for `asked`, appending the text it streams to `part` as it comes
    /// (scrubbed of secrets), and returns its answer.
    async fn stream_into(
        &mut self,
        part: &mut Part,
        asked: impl std::future::Future<Output = Result<TurnReply, dispatch_models::Error>>,
        mut deltas: tokio::sync::mpsc::UnboundedReceiver<Delta>,
    ) -> Result<Result<TurnReply, dispatch_models::Error>, Stop> {
        let mut asked = std::pin::pin!(asked);
        // First flush after DELTA_EVERY: an answer quicker than that is not streamed
        // at all (no events beyond its ModelTurn).
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + DELTA_EVERY, DELTA_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reply = loop {
            tokio::select! {
                biased;
                reply = &mut asked => break reply,
                Some(delta) = deltas.recv() => match delta {
                    Delta::Text(text) => {
                        // Scrubbed as it streams: what could still become part of a
                        // secret waits for the text after it.
                        let safe = part.scrubbed.push(&text, &self.ctx.known);
                        part.pending.push_str(&safe);
                        if part.pending.len() >= DELTA_BYTES {
                            self.flush(part).await?;
                        }
                    }
                    Delta::Restart => self.abandon(part).await?,
                },
                _ = every.tick() => self.flush(part).await?,
            }
        };
        while let Ok(delta) = deltas.try_recv() {
            match delta {
                Delta::Text(text) => {
                    let safe = part.scrubbed.push(&text, &self.ctx.known);
                    part.pending.push_str(&safe);
                }
                Delta::Restart => self.abandon(part).await?,
            }
        }
        if reply.is_ok() {
            let rest = part.scrubbed.finish(&self.ctx.known);
            part.pending.push_str(&rest);
        }
        Ok(reply)
    }

    /// Appends the text gathered in `part`, if any; text not appended stays gathered
    /// for the next try.
    async fn flush(&mut self, part: &mut Part) -> Result<(), Stop> {
        if part.pending.is_empty() {
            return Ok(());
        }
        if self
            .append_delta(part.delta(part.pending.clone(), false))
            .await?
        {
            let text = std::mem::take(&mut part.pending);
            part.offset += text.len() as u64;
            part.sent.push_str(&text);
        }
        Ok(())
    }

    /// Ends `part` as void (its text was not the answer) and starts the next one.
    async fn abandon(&mut self, part: &mut Part) -> Result<(), Stop> {
        part.pending.clear();
        if !part.sent.is_empty() {
            // Not appended, the part stays open to clients until the turn ends it.
            self.append_delta(part.delta(String::new(), true)).await?;
            *part = Part::new(part.leaf, part.turn, part.part + 1);
        }
        Ok(())
    }

    /// Appends `delta`; whether it was. Streamed text is a courtesy to whoever
    /// watches (the turn's text is in its ModelTurn whatever happens here), so only a
    /// run that has ended stops the turn.
    async fn append_delta(&mut self, delta: OutputDelta) -> Result<bool, Stop> {
        let cause = self.command.run_id.clone();
        for _ in 0..3 {
            match self
                .run
                .append(Body::OutputDelta(delta.clone()), &cause)
                .await
            {
                Ok(_) => return Ok(true),
                // Another writer (a stop request) appended; the handle has read it.
                Err(e) if e.kind() == ErrorKind::Conflict => continue,
                Err(e) if e.kind() == ErrorKind::Finished => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(run_id = %self.run.run_id(), error = %e, "streamed text not appended; trying with the next piece");
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }

    /// One leaf's agent loop and gate. The leaf is DONE only when its gate passed after
    /// the model said it finished; it is FAILED when the model says it could not do the
    /// step, when its last tool call failed and was not tried again, when it has no
    /// gate, when its model made no tool call (told once to make one), or when the gate
    /// does not pass.
    async fn leaf(
        &mut self,
        requested: &RunRequested,
        leaf: &PlanLeaf,
    ) -> Result<(LeafState, String, String), Stop> {
        let mut history = Vec::new();
        // Set when the model has finished: how the leaf ended.
        let mut finished: Option<Result<GateChecked, String>> = None;
        let mut checks = 0;
        // A gate that cannot be parsed fails however often it is checked.
        let retry_gate = dispatch_plan::gate::parse(&leaf.done_when).is_ok();
        // The model's last words on the leaf: its answer.
        let mut answer = String::new();
        // The last tool call of the leaf, if it failed: a step that ends on a failure
        // it did not try again did not do what it set out to.
        let mut failed_call: Option<String> = None;
        let max_turns = self.ctx.max_turns;
        for turn in 0..max_turns {
            let model_turn = match self.find(model_turn(leaf.index, turn)) {
                Some(recorded) => recorded,
                None => self.model_turn(requested, leaf, turn, &history).await?,
            };
            history.push(assistant_exchange(&model_turn));
            answer = model_turn.text.clone();
            if model_turn.tool_calls.is_empty() {
                // Looking for tools (`tools.search`) is no part of a step's work: a
                // step that only searched, then said it was done, had its gate pass on
                // an earlier step's file (errands, recorded).
                let called = history
                    .iter()
                    .any(|e| matches!(e, Exchange::ToolResult { tool, .. } if tool != SEARCH_TOOL));
                let told = history
                    .iter()
                    .any(|e| matches!(e, Exchange::GaveUpUntried | Exchange::DoneUntried));
                let untried = !called && !told;
                let said = crate::answer::admits_unfinished(&model_turn.text);
                // Given up before a single call: told once to try, while turns are left.
                if said.is_some() && untried && turn + 1 < max_turns {
                    history.push(Exchange::GaveUpUntried);
                    continue;
                }
                if let Some(said) = said {
                    finished = Some(Err(format!("the model said the step is not done: {said}")));
                    break;
                }
                if let Some(failed) = failed_call.take() {
                    finished = Some(Err(slice_chars(
                        &format!("its last tool call failed and was not tried again: {failed}"),
                        SUMMARY_CHARS,
                    )));
                    break;
                }
                if leaf.done_when.is_empty() {
                    finished = Some(Err(
                        "the leaf has no :done-when: gate, so nothing shows it done".into(),
                    ));
                    break;
                }
                // A step whose model made no call did nothing a gate could see: one
                // that passes would have passed without it (a path outside the run read
                // by `call`, a file an earlier step made). Told once to make its calls.
                // The offline provider is no model: its turns are the plan's `call:`
                // lines, and a leaf written with none makes none, as its writer meant.
                let scripted = model_turn.model == dispatch_models::offline::NAME;
                if !scripted && !called {
                    if untried && turn + 1 < max_turns {
                        history.push(Exchange::DoneUntried);
                        continue;
                    }
                    finished = Some(Err(NO_CALL.into()));
                    break;
                }
                let gate = self.gate(leaf, checks).await?;
                checks += 1;
                let last_turn = turn + 1 >= max_turns;
                if gate.passed || !retry_gate || checks > GATE_RETRIES || last_turn {
                    finished = Some(Ok(gate));
                    break;
                }
                history.push(Exchange::GateFailed {
                    command: gate.command,
                    detail: gate.detail,
                });
                continue;
            }
            failed_call = self
                .turn_calls(leaf.index, &model_turn.tool_calls, &mut history)
                .await?;
        }
        let answer = slice_bytes(&answer, MAX_ANSWER_BYTES).to_owned();
        Ok(match finished {
            None => (
                LeafState::Failed,
                format!("the model did not finish the leaf within {max_turns} turns"),
                answer,
            ),
            Some(Err(reason)) => (
                LeafState::Failed,
                slice_chars(&reason, SUMMARY_CHARS),
                answer,
            ),
            Some(Ok(gate)) if gate.passed => (
                LeafState::Done,
                format!("gate passed: {}", gate.command),
                answer,
            ),
            Some(Ok(gate)) => (
                LeafState::Failed,
                slice_chars(&format!("gate failed: {}", gate.detail), SUMMARY_CHARS),
                answer,
            ),
        })
    }

    /// Makes the calls of one model answer in order, each through the policy and a
    /// connector, and adds their results to `history`. A call asked for twice in one
    /// answer (same tool, same canonical arguments) runs once; the model is told that
    /// the second was the same call. Returns the last call's failure, if it failed.
    async fn turn_calls(
        &mut self,
        leaf: u32,
        calls: &[ToolCall],
        history: &mut Vec<Exchange>,
    ) -> Result<Option<String>, Stop> {
        let mut asked: Vec<(ToolCall, &str)> = Vec::new();
        let mut failed = None;
        for call in calls {
            let form = self.recorded_form(call);
            if let Some((_, first)) = asked
                .iter()
                .find(|(a, _)| a.tool == form.tool && a.args_json == form.args_json)
            {
                history.push(Exchange::ToolResult {
                    call_id: call.call_id.clone(),
                    tool: call.tool.clone(),
                    result: Ok(format!(
                        "not run: this is the same call as {first}, made once in this \
                         turn; its result is above"
                    )),
                });
                continue;
            }
            asked.push((form, &call.call_id));
            let result = self.tool_call(leaf, call).await?;
            failed = result
                .as_ref()
                .err()
                .map(|error| format!("{}: {error}", call.tool));
            history.push(Exchange::ToolResult {
                call_id: call.call_id.clone(),
                tool: call.tool.clone(),
                result,
            });
        }
        Ok(failed)
    }

    /// Asks the worker model for turn `turn` of `leaf` and records its answer.
    async fn model_turn(
        &mut self,
        requested: &RunRequested,
        leaf: &PlanLeaf,
        turn: u32,
        history: &[Exchange],
    ) -> Result<ModelTurn, Stop> {
        let tools = self.leaf_tools(leaf, self.ctx.offer.current().await.plan_specs());
        let request = TurnRequest {
            chat: None,
            goal: dispatch_runlog::submit::prompt_goal(requested),
            leaf: from_proto_leaf(leaf),
            earlier: self.earlier_steps(leaf.index),
            history: history.to_vec(),
            tools,
            deltas: None,
        };
        let (reply, streamed) = self.streamed_turn(leaf.index, turn, request).await?;
        let body = model_turn_body(
            leaf.index,
            turn,
            reply,
            streamed,
            self.ctx.providers.worker.name(),
        );
        self.ensure(model_turn(leaf.index, turn), body).await
    }

    /// The tools `leaf`'s model is offered, of those on offer: all of them when its
    /// author named none; else the ones it named, `tools.search`, the built-in write
    /// when its gate checks a file under `scratch/` (a step named "Fetch the page" with
    /// only `http.request` and checked on `scratch/page.html` could not make the file
    /// its check looks for: errands, recorded), and what searches in this leaf found
    /// (read from their results in the log, so a resumed leaf is offered the same).
    fn leaf_tools(&self, leaf: &PlanLeaf, on_offer: Vec<ToolSpec>) -> Vec<ToolSpec> {
        if leaf.tools.is_empty() {
            return on_offer;
        }
        let checks_scratch = dispatch_plan::gate::parse(&leaf.done_when).is_ok_and(|gate| {
            gate.paths()
                .iter()
                .any(|p| p.trim_start_matches("./").starts_with("scratch/"))
        });
        let searches: Vec<&str> = self
            .run
            .bodies()
            .filter_map(|b| match b {
                Body::ToolCallRequested(r)
                    if r.leaf == leaf.index && !r.gate && r.tool == SEARCH_TOOL =>
                {
                    Some(r.call_id.as_str())
                }
                _ => None,
            })
            .collect();
        let found: Vec<&str> = self
            .run
            .bodies()
            .filter_map(|b| match b {
                Body::ToolCallCompleted(c) if searches.contains(&c.call_id.as_str()) => {
                    Some(c.output.as_str())
                }
                _ => None,
            })
            .flat_map(|output| {
                output.lines().filter_map(|line| {
                    let rest = line.strip_prefix("- ")?;
                    rest.split_once(' ').map(|(name, _)| name)
                })
            })
            .collect();
        on_offer
            .into_iter()
            .filter(|t| {
                t.name == SEARCH_TOOL
                    || leaf.tools.contains(&t.name)
                    || (checks_scratch && t.name == SCRATCH_WRITE_TOOL)
                    || found.contains(&t.name.as_str())
            })
            .collect()
    }

    /// What the leaves finished before `leaf` found, from the log: each one's tool
    /// results (or, when it has none, its answer) and, unless it was done, how it
    /// ended, cut to [`EARLIER_STEP_CHARS`] a step and, keeping the latest steps,
    /// [`EARLIER_CHARS`] in all.
    fn earlier_steps(&self, leaf: u32) -> Vec<EarlierStep> {
        let plan = self.find(as_plan);
        let title = |index: u32| {
            plan.as_ref()
                .and_then(|p| p.leaves.iter().find(|l| l.index == index))
                .map_or_else(|| format!("step {index}"), |l| l.title.clone())
        };
        let mut calls: HashMap<&str, (u32, &str)> = HashMap::new();
        let mut found: BTreeMap<u32, String> = BTreeMap::new();
        let mut finished = BTreeSet::new();
        for body in self.run.bodies() {
            match body {
                Body::ToolCallRequested(r) if r.leaf != leaf => {
                    calls.insert(&r.call_id, (r.leaf, &r.tool));
                }
                Body::ToolCallCompleted(c) => {
                    if let Some((at, tool)) = calls.get(c.call_id.as_str()) {
                        let text = found.entry(*at).or_default();
                        text.push_str(&returned(tool, &c.output));
                    }
                }
                Body::ToolCallFailed(f) => {
                    if let Some((at, tool)) = calls.get(f.call_id.as_str()) {
                        let text = found.entry(*at).or_default();
                        text.push_str(&format!("{tool} failed: {}\n", f.error));
                    }
                }
                Body::LeafFinished(f) if f.leaf != leaf => {
                    finished.insert(f.leaf);
                    let text = found.entry(f.leaf).or_default();
                    // A step's own words are passed on only when it has no results to
                    // show: a small model's "listed and written to REPORT.org" about
                    // a step that wrote nothing made the next step believe it done.
                    if text.is_empty() && !f.answer.trim().is_empty() {
                        text.push_str(&format!("Its answer: {}\n", f.answer.trim()));
                    }
                    // How a step that was not done ended; a done one's gate is left
                    // out: after a listing of three files, the 1.5B model counted the
                    // line "It ended: gate passed: …" as a fourth (2 answers in 3 said
                    // 4 with it, 1 in 4 without; errands, recorded).
                    if f.state() != LeafState::Done {
                        text.push_str(&format!("It ended: {}\n", f.reason));
                    }
                }
                _ => {}
            }
        }
        let mut steps: Vec<EarlierStep> = found
            .into_iter()
            .filter(|(index, _)| finished.contains(index))
            .map(|(index, text)| EarlierStep {
                title: title(index),
                found: slice_chars(&text, EARLIER_STEP_CHARS),
            })
            .collect();
        let mut total = 0;
        let keep = steps
            .iter()
            .rev()
            .take_while(|s| {
                total += s.title.chars().count() + s.found.chars().count();
                total <= EARLIER_CHARS
            })
            .count();
        steps.drain(..steps.len() - keep);
        steps
    }

    /// Request → policy decision → connector result, each step found in the log or
    /// asked for over the bus and awaited there.
    async fn tool_call(
        &mut self,
        leaf: u32,
        call: &ToolCall,
    ) -> Result<Result<String, String>, Stop> {
        let span = tracing::info_span!(
            "tool_call",
            otel.name = %format_args!("tool_call {}", call.tool),
            run_id = %self.run.run_id(),
            leaf,
            tool = call.tool.as_str(),
            call_id = call.call_id.as_str(),
            decision = tracing::field::Empty,
        );
        self.call_in_span(leaf, call).instrument(span).await
    }

    async fn call_in_span(
        &mut self,
        leaf: u32,
        call: &ToolCall,
    ) -> Result<Result<String, String>, Stop> {
        let call = &self.recorded_form(call);
        let call_id = call.call_id.clone();
        let at_request = self.request(leaf, call, false).await?;
        let decision = match self.find(decision_for(&call_id)) {
            Some(decision) => decision,
            // Denied before in this run: denied again, with no check and no new request.
            None => match self.memo(call) {
                Some(memo) => {
                    self.ensure(decision_for(&call_id), Body::PolicyDecided(memo))
                        .await?
                }
                None => self.decide(call, at_request).await?,
            },
        };
        tracing::Span::current().record("decision", decision.decision().as_str_name());
        match decision.decision() {
            Decision::Allow => {}
            Decision::Ask => {
                if let Err(denied) = self.approval(&call_id).await? {
                    return Ok(Err(denied));
                }
            }
            _ => {
                return Ok(Err(format!(
                    "denied by policy rule {}: {}",
                    decision.rule, decision.reason
                )));
            }
        }
        if let Some(result) = self.find(result_for(&call_id)) {
            return Ok(result);
        }
        let command = CallTool {
            run_id: self.command.run_id.clone(),
            call_id: call_id.clone(),
            tool: call.tool.clone(),
            args_json: call.args_json.clone(),
            from_stream_seq: at_request,
        };
        self.send(subject::cmd::tool(), &format!("{call_id}/tool"), &command)
            .await?;
        self.wait_for(Awaited::Tool(&call_id), result_for(&call_id))
            .await
    }

    /// The call as it is (or will be) recorded: its arguments in canonical form, the one
    /// form the policy checks, a person is shown and a connector runs
    /// (`dispatch_runlog::args`). Arguments that have no such form (a key given twice,
    /// not one object, too big) are recorded as written, cut to 16 KiB, and the policy
    /// refuses the call, saying why. A call recorded already keeps its recorded form.
    fn recorded_form(&self, call: &ToolCall) -> ToolCall {
        let recorded = self.run.bodies().find_map(|b| match b {
            Body::ToolCallRequested(r) if r.call_id == call.call_id => Some(r.args_json.clone()),
            _ => None,
        });
        let args_json =
            recorded.unwrap_or_else(|| match dispatch_runlog::args::canonical(&call.args_json) {
                Ok(canonical) => canonical.json,
                Err(_) => slice_bytes(&call.args_json, UNREADABLE_ARGS_BYTES).to_owned(),
            });
        ToolCall {
            args_json,
            ..call.clone()
        }
    }

    /// Waits for a person's answer to the approval request of `call_id`, and denies it
    /// at its expiry if nobody answers first. The wait holds only this run's lease and
    /// its feed subscription; a dispatcher that takes the run over waits on the same
    /// request instead of asking again.
    async fn approval(&mut self, call_id: &str) -> Result<Result<(), String>, Stop> {
        let asked = self
            .wait_for(Awaited::Policy(call_id), approval_requested(call_id))
            .await?;
        // Waiting for a person takes none of the copy's room for running work.
        match self.slot.clone() {
            Some(slot) => slot.idle(self.answer(call_id, &asked)).await,
            None => self.answer(call_id, &asked).await,
        }
    }

    /// Waits for the answer to `asked`, or records its expiry.
    async fn answer(
        &mut self,
        call_id: &str,
        asked: &ApprovalRequested,
    ) -> Result<Result<(), String>, Stop> {
        loop {
            if let Some(resolved) = self.find(approval_resolved(call_id)) {
                return Ok(match resolved.decision() {
                    Decision::Allow => Ok(()),
                    _ if resolved.expired => Err(format!(
                        "denied: nobody answered the approval request {} before it expired",
                        resolved.approval_id
                    )),
                    _ => Err(format!(
                        "denied by {}: {}",
                        resolved.resolved_by,
                        if resolved.reason.is_empty() {
                            "no reason given"
                        } else {
                            &resolved.reason
                        }
                    )),
                });
            }
            if self.run.is_finished() {
                return Err(Stop::Finished);
            }
            let left = asked.expires_unix_ms.saturating_sub(now_unix_ms());
            if left <= 0 {
                let expired = ApprovalResolved {
                    approval_id: asked.approval_id.clone(),
                    call_id: call_id.to_owned(),
                    decision: Decision::Deny as i32,
                    resolved_by: "expiry".into(),
                    reason: "nobody answered in time".into(),
                    expired: true,
                };
                self.ensure(approval_resolved(call_id), Body::ApprovalResolved(expired))
                    .await?;
                continue;
            }
            let nap = Duration::from_millis(left as u64).min(APPROVAL_POLL);
            self.run.wait_for_more(nap).await?;
        }
    }

    /// True while an approval request of this run has no answer.
    fn waiting_for_approval(&self) -> bool {
        self.run.bodies().any(|b| {
            matches!(b, Body::ApprovalRequested(a)
                if self.find(approval_resolved(&a.call_id)).is_none())
        })
    }

    /// The denial that stands for `call`: an earlier call of this run with the same tool
    /// and the same arguments (as JSON values, whatever their spacing or key order) was
    /// denied, by the policy or by a person.
    fn memo(&self, call: &ToolCall) -> Option<PolicyDecided> {
        let same = normalized(&call.args_json);
        self.run.bodies().find_map(|b| {
            let Body::ToolCallRequested(earlier) = b else {
                return None;
            };
            // A gate's call is denied by rules of its own.
            if earlier.gate
                || earlier.call_id == call.call_id
                || earlier.tool != call.tool
                || normalized(&earlier.args_json) != same
            {
                return None;
            }
            let decided = self.find(decision_for(&earlier.call_id))?;
            let why = match decided.decision() {
                Decision::Deny => format!("rule {}: {}", decided.rule, decided.reason),
                Decision::Ask => {
                    let resolved = self.find(approval_resolved(&earlier.call_id))?;
                    if resolved.decision() == Decision::Allow {
                        return None;
                    }
                    match resolved.expired {
                        true => "nobody approved it in time".to_owned(),
                        false => format!("{}: {}", resolved.resolved_by, resolved.reason),
                    }
                }
                _ => return None,
            };
            Some(PolicyDecided {
                call_id: call.call_id.clone(),
                decision: Decision::Deny as i32,
                rule: MEMO_RULE.into(),
                reason: slice_chars(
                    &format!(
                        "the same call ({}) was denied earlier in this run, by {why}",
                        earlier.call_id
                    ),
                    1024,
                ),
                policy_version: decided.policy_version,
                policy_hash: decided.policy_hash.clone(),
                memo_of: earlier.call_id.clone(),
                ..Default::default()
            })
        })
    }

    /// Checks the leaf's gate for the `nth` time (from 0), or finds that check's result
    /// in the log.
    async fn gate(&mut self, leaf: &PlanLeaf, nth: u32) -> Result<GateChecked, Stop> {
        let check_id = match nth {
            0 => format!("gate-l{}", leaf.index),
            n => format!("gate-l{}-{n}", leaf.index),
        };
        if let Some(checked) = self.find(gate_for(&check_id)) {
            return Ok(checked);
        }
        let span = tracing::info_span!(
            "gate",
            run_id = %self.run.run_id(),
            leaf = leaf.index,
            command = leaf.done_when.as_str(),
        );
        self.check_gate(leaf, check_id).instrument(span).await
    }

    async fn check_gate(&mut self, leaf: &PlanLeaf, check_id: String) -> Result<GateChecked, Stop> {
        // A call gate's call is requested and decided like any call, and then checked
        // by the connectors, which make it only if it was allowed as a read.
        // Its result can only come after what this copy has read.
        let mut from_stream_seq = self.run.events().last().map_or(0, |e| e.stream_seq);
        if let Ok(gate) = dispatch_plan::gate::parse(&leaf.done_when)
            && let Some(call) = gate.call()
        {
            self.gate_call(leaf.index, &check_id, call).await?;
            // The connectors read the call's request and decision too.
            from_stream_seq = self.position(requested_call(&check_id));
        }
        let command = CheckGate {
            run_id: self.command.run_id.clone(),
            check_id: check_id.clone(),
            leaf: leaf.index,
            command: leaf.done_when.clone(),
            from_stream_seq,
        };
        let asked = (Awaited::Gate(&check_id), subject::ask::gate());
        self.asking(asked, &command, gate_for(&check_id)).await
    }

    /// Requests the call of a leaf's call gate (its call id is the check's id) and waits
    /// for the policy's decision on it. Whatever the decision, the gate is then checked:
    /// the connectors fail it closed if the call may not run.
    async fn gate_call(
        &mut self,
        leaf: u32,
        check_id: &str,
        call: &dispatch_plan::gate::CallCheck,
    ) -> Result<(), Stop> {
        if self.find(decision_for(check_id)).is_some() {
            return Ok(());
        }
        let form = self.recorded_form(&ToolCall {
            call_id: check_id.to_owned(),
            tool: call.tool.clone(),
            args_json: call.args_json.clone(),
        });
        let at_request = self.request(leaf, &form, true).await?;
        self.decide(&form, at_request).await?;
        Ok(())
    }

    /// Records that `call` (in its recorded form) is requested, marked as a gate's or
    /// not, unless the log holds its request; returns where the request is stored.
    async fn request(&mut self, leaf: u32, call: &ToolCall, gate: bool) -> Result<u64, Stop> {
        let call_id = call.call_id.as_str();
        let risk = match self.find(requested_call(call_id)) {
            Some(()) => Risk::Unspecified,
            None => risk_of(
                self.ctx
                    .offer
                    .current()
                    .await
                    .risk(&call.tool, &call.args_json),
            ),
        };
        let requested = Body::ToolCallRequested(ToolCallRequested {
            call_id: call_id.to_owned(),
            leaf,
            tool: call.tool.clone(),
            args_json: call.args_json.clone(),
            risk: risk as i32,
            gate,
        });
        self.ensure(requested_call(call_id), requested).await?;
        Ok(self.position(requested_call(call_id)))
    }

    /// Asks the policy about the call requested at stream sequence `at_request`, and
    /// waits for its decision in the log.
    async fn decide(&mut self, call: &ToolCall, at_request: u64) -> Result<PolicyDecided, Stop> {
        let call_id = call.call_id.as_str();
        let command = CheckPolicy {
            run_id: self.command.run_id.clone(),
            call_id: call_id.to_owned(),
            tool: call.tool.clone(),
            args_json: call.args_json.clone(),
            from_stream_seq: at_request,
            origin: self
                .find(as_requested)
                .map(|r| r.origin)
                .unwrap_or_default(),
        };
        let asked = (Awaited::Policy(call_id), subject::ask::policy());
        self.asking(asked, &command, decision_for(call_id)).await
    }

    /// Publishes a command for this run. Its message id is `<run_id>/<key>`, so sending it
    /// again (a resumed run) inside the duplicate window is dropped by the server.
    async fn send(
        &self,
        subject: subject::Subject,
        key: &str,
        command: &impl prost::Message,
    ) -> Result<(), Stop> {
        let msg_id = format!("{}/{key}", self.command.run_id);
        self.ctx
            .bus
            .append(subject, &msg_id, None, command.encode_to_vec().into())
            .await?;
        Ok(())
    }

    async fn finish(
        &mut self,
        status: RunStatus,
        reason: String,
        summary: String,
    ) -> Result<(), Stop> {
        self.finish_with(status, reason, summary, Report::default())
            .await
    }

    async fn finish_with(
        &mut self,
        status: RunStatus,
        reason: String,
        summary: String,
        report: Report,
    ) -> Result<(), Stop> {
        self.run
            .finish_with(status, &reason, &summary, report, &self.command.run_id)
            .await?;
        tracing::Span::current().record("status", status.word());
        tracing::info!(run_id = %self.run.run_id(), status = status.word(), reason, "run finished");
        let labels = [
            KeyValue::new("status", status.word()),
            KeyValue::new("origin", self.command.origin.clone()),
        ];
        let metrics = telemetry::metrics();
        metrics.finished.add(1, &labels);
        if let Some(requested) = self.run.events().first() {
            let ms = now_unix_ms()
                .saturating_sub(requested.event.time_unix_ms)
                .max(0);
            metrics.duration.record(ms as f64 / 1000.0, &labels);
        }
        Ok(())
    }

    /// Why the run's plan did not succeed, if a leaf did not end DONE: `2 of 4 steps
    /// failed: step 2 ("Compare the prices"): gate failed: …` (and how many were not run).
    fn unfinished(&self) -> Option<String> {
        let plan = self.find(as_plan)?;
        let ended: Vec<LeafFinished> = self.all(|b| match b {
            Body::LeafFinished(f) => Some(f.clone()),
            _ => None,
        });
        let of = |state: LeafState| ended.iter().filter(|f| f.state() == state).count();
        let (done, failed, skipped) = (
            of(LeafState::Done),
            of(LeafState::Failed),
            of(LeafState::Skipped),
        );
        let total = plan.leaves.len();
        if done == total {
            return None;
        }
        let first = ended.iter().find(|f| f.state() == LeafState::Failed);
        let mut reason = format!("{failed} of {total} steps failed");
        if skipped > 0 {
            reason.push_str(&format!(", {skipped} not run"));
        }
        if let Some(first) = first {
            let title = plan
                .leaves
                .iter()
                .find(|l| l.index == first.leaf)
                .map_or("", |l| l.title.as_str());
            reason.push_str(&format!(
                ": step {} ({title:?}): {}",
                first.leaf + 1,
                first.reason
            ));
        }
        Some(slice_chars(&reason, SUMMARY_CHARS))
    }

    /// What the run has to show: `scratch/REPORT.org` if it wrote one, else the last
    /// answer a leaf gave.
    fn report(&self) -> Report {
        let run_id = self.run.run_id();
        let run_dir = layout::run_dir(&self.ctx.workspace, run_id);
        if let Some(text) = read_report(&run_dir).map(|text| self.ctx.known.scrub(&text)) {
            let path = run_dir.join(layout::SCRATCH).join(REPORT_FILE);
            let path = path
                .strip_prefix(&self.ctx.workspace)
                .unwrap_or(&path)
                .display()
                .to_string();
            return Report { text, path };
        }
        let last_answer = self
            .run
            .bodies()
            .filter_map(|b| match b {
                Body::LeafFinished(f) if !f.answer.trim().is_empty() => Some(f.answer.clone()),
                _ => None,
            })
            .last();
        Report {
            text: last_answer.unwrap_or_default(),
            path: String::new(),
        }
    }

    fn find<T>(&self, pick: impl Fn(&Body) -> Option<T>) -> Option<T> {
        self.run.bodies().find_map(pick)
    }

    /// The stream sequence of the event `pick` finds (0: none).
    fn position<T>(&self, pick: impl Fn(&Body) -> Option<T>) -> u64 {
        self.run
            .events()
            .iter()
            .find(|e| e.event.body.as_ref().and_then(&pick).is_some())
            .map_or(0, |e| e.stream_seq)
    }

    fn all<T>(&self, pick: impl Fn(&Body) -> Option<T>) -> Vec<T> {
        self.run.bodies().filter_map(pick).collect()
    }

    async fn ensure<T>(
        &mut self,
        pick: impl Fn(&Body) -> Option<T>,
        body: Body,
    ) -> Result<T, Stop> {
        Ok(self.run.ensure(pick, body, &self.command.run_id).await?)
    }

    /// Waits until another service appends the event `pick` finds. If the service
    /// gave the command up instead, the run ends `blocked` with its reason.
    async fn wait_for<T>(
        &mut self,
        awaited: Awaited<'_>,
        pick: impl Fn(&Body) -> Option<T>,
    ) -> Result<T, Stop> {
        loop {
            if let Some(settled) = self.settled(awaited, &pick) {
                return settled;
            }
            self.run.wait_for_more(Duration::from_secs(5)).await?;
        }
    }

    /// How the awaited step stands in the log: answered (what `pick` finds), given up
    /// (the run ends `blocked` with the reason), the run over, or `None` while open.
    fn settled<T>(
        &self,
        awaited: Awaited<'_>,
        pick: &impl Fn(&Body) -> Option<T>,
    ) -> Option<Result<T, Stop>> {
        if let Some(found) = self.find(pick) {
            return Some(Ok(found));
        }
        if let Some(reason) = self.find(|b| awaited.abandoned(b)) {
            return Some(Err(Stop::Blocked(slice_chars(&reason, SUMMARY_CHARS))));
        }
        self.run.is_finished().then_some(Err(Stop::Finished))
    }

    /// Asks the service that carries out `awaited` for it (`dispatch_bus::ask`), and
    /// waits for its answer in the log, asking again each time the log stays quiet for
    /// a while: the ask is stored nowhere, so an ask nobody took, or whose taker died, is
    /// made again. A step that [`ASK_TAKES`] asks were taken for and that is still
    /// unanswered is given up, and the run ends `blocked` saying so.
    async fn asking<T>(
        &mut self,
        (awaited, subject): (Awaited<'_>, subject::Subject),
        ask: &impl prost::Message,
        pick: impl Fn(&Body) -> Option<T>,
    ) -> Result<T, Stop> {
        let payload = bytes::Bytes::from(ask.encode_to_vec());
        let mut takes = 0;
        let mut quiet = self.ctx.lease.min(ASK_QUIET_FIRST);
        let mut said_nobody = false;
        loop {
            if let Some(settled) = self.settled(awaited, &pick) {
                return settled;
            }
            // Each take had its quiet time to be answered in.
            if takes >= ASK_TAKES {
                return Err(Stop::Blocked(slice_chars(
                    &format!("{awaited}: taken {takes} times and never answered"),
                    SUMMARY_CHARS,
                )));
            }
            match dispatch_bus::ask::ask(&self.ctx.bus, subject.clone(), payload.clone()).await {
                Ok(Asked::Taken) => takes += 1,
                Ok(Asked::InHand) => {}
                Ok(Asked::Nobody) if !said_nobody => {
                    said_nobody = true;
                    tracing::info!(run_id = %self.run.run_id(), step = %awaited, "no copy took the step; asking again until one does");
                }
                Ok(Asked::Nobody) => {}
                Err(e) => {
                    tracing::debug!(run_id = %self.run.run_id(), step = %awaited, error = %e, "cannot ask; asking again")
                }
            }
            let until = tokio::time::Instant::now() + quiet;
            while self.settled(awaited, &pick).is_none() {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                self.run.wait_for_more(left).await?;
            }
            quiet = (quiet * 2).min(ASK_QUIET_MAX.min(self.ctx.lease * 4));
        }
    }
}

/// How long the log may stay quiet before a step is first asked for again (or the
/// dispatcher's lease, if shorter); each time after, twice as long.
const ASK_QUIET_FIRST: Duration = Duration::from_secs(5);
/// The longest the log may stay quiet before a step is asked for again (or four of the
/// dispatcher's leases, if shorter).
const ASK_QUIET_MAX: Duration = Duration::from_secs(60);
/// How many asks may be taken, each by a copy that then never answered, before the step
/// is given up: as many as the tries of a work-queue command.
const ASK_TAKES: u32 = dispatch_bus::work::WORK_ATTEMPTS as u32;

impl std::fmt::Display for Awaited<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Awaited::Policy(key) => write!(f, "the policy check of call {key}"),
            Awaited::Tool(key) => write!(f, "the tool call {key}"),
            Awaited::Gate(key) => write!(f, "the gate check {key}"),
        }
    }
}

/// A step another service carries out, named as its `CommandAbandoned` names it.
#[derive(Clone, Copy)]
enum Awaited<'a> {
    Policy(&'a str),
    Tool(&'a str),
    Gate(&'a str),
}

impl Awaited<'_> {
    /// The reason, if `body` records that this step's command was given up.
    fn abandoned(self, body: &Body) -> Option<String> {
        let (command, key) = match self {
            Awaited::Policy(key) => ("policy", key),
            Awaited::Tool(key) => ("tool", key),
            Awaited::Gate(key) => ("gate", key),
        };
        match body {
            Body::CommandAbandoned(a) if a.command == command && a.key == key => {
                Some(format!("{command} {key}: {}", a.reason))
            }
            _ => None,
        }
    }
}

fn as_stop(b: &Body) -> Option<StopRequested> {
    match b {
        Body::StopRequested(s) => Some(s.clone()),
        _ => None,
    }
}

fn stop_reason(stop: &StopRequested) -> String {
    format!("stopped by {}", stop.requested_by)
}

/// Resolves when a stop request is stored in the run's log after stream sequence
/// `after`; never, if none is before the run ends. It follows the run's feed without a
/// handle of its own, so the executor's handle stays the one that verifies and appends;
/// `shared`, the feed it passes on to that handle, until the first error (the handle
/// then subscribes itself).
async fn watch_for_stop(
    log: dispatch_runlog::RunLog,
    run_id: RunId,
    after: u64,
    mut shared: Option<dispatch_runlog::SharedFeed>,
) -> StopRequested {
    let seen = |b: &Body| match b {
        Body::StopRequested(stop) => Some(Some(stop.clone())),
        Body::RunFinished(_) => Some(None),
        _ => None,
    };
    loop {
        let found = match shared.take() {
            Some(shared) => {
                log.wait_for_shared(shared, after, STOP_WATCH_QUIET, seen)
                    .await
            }
            None => log.wait_for(&run_id, after, STOP_WATCH_QUIET, seen).await,
        };
        match found {
            Ok(Some(stop)) => return stop,
            Ok(None) => return std::future::pending().await,
            Err(e) => {
                tracing::warn!(run_id = %run_id, error = %e, "cannot watch the run for a stop; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn as_plan(b: &Body) -> Option<PlanAuthored> {
    match b {
        Body::PlanAuthored(p) => Some(p.clone()),
        _ => None,
    }
}

fn as_rejected(b: &Body) -> Option<PlanRejected> {
    match b {
        Body::PlanRejected(r) => Some(r.clone()),
        _ => None,
    }
}

fn as_started(b: &Body) -> Option<RunStarted> {
    match b {
        Body::RunStarted(s) => Some(s.clone()),
        _ => None,
    }
}

/// A turn's text being streamed into the log.
struct Part {
    leaf: u32,
    turn: u32,
    part: u32,
    /// Bytes appended so far.
    offset: u64,
    /// Text appended so far.
    sent: String,
    /// Text not appended yet.
    pending: String,
    /// The model's text as it streams, scrubbed of secrets.
    scrubbed: dispatch_secrets::Streaming,
}

impl Part {
    fn new(leaf: u32, turn: u32, part: u32) -> Self {
        Self {
            leaf,
            turn,
            part,
            offset: 0,
            sent: String::new(),
            pending: String::new(),
            scrubbed: Default::default(),
        }
    }

    fn delta(&self, text: String, abandoned: bool) -> OutputDelta {
        OutputDelta {
            leaf: self.leaf,
            turn: self.turn,
            part: self.part,
            offset: self.offset,
            text,
            abandoned,
        }
    }
}

/// A recorded model answer as the model is shown it again: its text and its calls.
fn assistant_exchange(turn: &ModelTurn) -> Exchange {
    Exchange::Assistant {
        text: turn.text.clone(),
        tool_calls: turn
            .tool_calls
            .iter()
            .map(|c| dispatch_models::ToolCall {
                id: c.call_id.clone(),
                tool: c.tool.clone(),
                args_json: c.args_json.clone(),
            })
            .collect(),
    }
}

/// The `ModelTurn` recording `reply`, its calls given ids from the leaf and turn.
fn model_turn_body(
    leaf: u32,
    turn: u32,
    reply: TurnReply,
    streamed: Option<u32>,
    model: &str,
) -> Body {
    Body::ModelTurn(ModelTurn {
        leaf,
        turn,
        text: reply.text,
        tool_calls: reply
            .tool_calls
            .into_iter()
            .enumerate()
            .map(|(i, call)| ToolCall {
                call_id: format!("l{leaf}-t{turn}-c{i}"),
                tool: call.tool,
                args_json: call.args_json,
            })
            .collect(),
        model: model.to_owned(),
        usage: Some(usage(reply.usage)),
        call_form: reply.form.word().to_owned(),
        streamed: streamed.is_some(),
        streamed_part: streamed.unwrap_or_default(),
    })
}

fn started_leaf(leaf: u32) -> impl Fn(&Body) -> Option<()> {
    move |b| matches!(b, Body::LeafStarted(s) if s.leaf == leaf).then_some(())
}

/// The index of a leaf that ended FAILED.
fn failed_leaf(b: &Body) -> Option<u32> {
    match b {
        Body::LeafFinished(f) if f.state() == LeafState::Failed => Some(f.leaf),
        _ => None,
    }
}

fn finished_leaf(leaf: u32) -> impl Fn(&Body) -> Option<()> {
    move |b| matches!(b, Body::LeafFinished(f) if f.leaf == leaf).then_some(())
}

fn model_turn(leaf: u32, turn: u32) -> impl Fn(&Body) -> Option<ModelTurn> {
    move |b| match b {
        Body::ModelTurn(t) if t.leaf == leaf && t.turn == turn => Some(t.clone()),
        _ => None,
    }
}

fn requested_call(call_id: &str) -> impl Fn(&Body) -> Option<()> + '_ {
    move |b| matches!(b, Body::ToolCallRequested(r) if r.call_id == call_id).then_some(())
}

fn decision_for(
    call_id: &str,
) -> impl Fn(&Body) -> Option<dispatch_proto::run::v1::PolicyDecided> + '_ {
    move |b| match b {
        Body::PolicyDecided(d) if d.call_id == call_id => Some(d.clone()),
        _ => None,
    }
}

fn result_for(call_id: &str) -> impl Fn(&Body) -> Option<Result<String, String>> + '_ {
    move |b| match b {
        Body::ToolCallCompleted(c) if c.call_id == call_id => Some(Ok(c.output.clone())),
        Body::ToolCallFailed(f) if f.call_id == call_id => Some(Err(f.error.clone())),
        _ => None,
    }
}

fn approval_requested(call_id: &str) -> impl Fn(&Body) -> Option<ApprovalRequested> + '_ {
    move |b| match b {
        Body::ApprovalRequested(a) if a.call_id == call_id => Some(a.clone()),
        _ => None,
    }
}

fn approval_resolved(call_id: &str) -> impl Fn(&Body) -> Option<ApprovalResolved> + '_ {
    move |b| match b {
        Body::ApprovalResolved(r) if r.call_id == call_id => Some(r.clone()),
        _ => None,
    }
}

fn as_requested(b: &Body) -> Option<RunRequested> {
    match b {
        Body::RunRequested(r) => Some(r.clone()),
        _ => None,
    }
}

/// Arguments as one canonical JSON text (keys sorted, no spacing); the text itself if
/// it is not JSON.
fn normalized(args_json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(args_json)
        .map_or_else(|_| args_json.to_owned(), |v| v.to_string())
}

fn gate_for(check_id: &str) -> impl Fn(&Body) -> Option<GateChecked> + '_ {
    move |b| match b {
        Body::GateChecked(g) if g.check_id == check_id => Some(g.clone()),
        _ => None,
    }
}

fn usage(usage: dispatch_models::Usage) -> dispatch_proto::run::v1::Usage {
    dispatch_proto::run::v1::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

fn to_proto_leaf(leaf: &dispatch_plan::Leaf) -> PlanLeaf {
    PlanLeaf {
        index: leaf.index,
        keyword: leaf.keyword.clone(),
        title: leaf.title.clone(),
        body: leaf.body.clone(),
        done_when: leaf.done_when.clone().unwrap_or_default(),
        ordered: leaf.ordered,
        tools: leaf.tools.clone(),
    }
}

fn from_proto_leaf(leaf: &PlanLeaf) -> dispatch_plan::Leaf {
    dispatch_plan::Leaf {
        index: leaf.index,
        keyword: leaf.keyword.clone(),
        title: leaf.title.clone(),
        body: leaf.body.clone(),
        done_when: Some(leaf.done_when.clone()).filter(|g| !g.is_empty()),
        ordered: leaf.ordered,
        tools: leaf.tools.clone(),
    }
}

/// `{"DONE": 3, "FAILED": 0}`
pub(crate) fn tally_json(tally: &[TallyEntry]) -> String {
    let parts: Vec<String> = tally
        .iter()
        .map(|t| format!("{}: {}", serde_json::Value::from(t.state.clone()), t.count))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Writes the plan to `workflows/<slug>.org`, or to `<slug>-<short run id>.org` if
/// another plan holds that name, and returns the workspace-relative path. The same plan
/// text written again reuses its file, so a resumed run does not leave copies. Two
/// names at most are tried, however many runs share the slug.
///
/// The plan is the author model's text: the file gets it with its lines and tabs, and
/// every other control character escaped (`dispatch_runlog::many_lines`), so opening
/// or `cat`ing it cannot drive a terminal. The log keeps the text as the model wrote it.
fn write_workflow(
    workspace: &Path,
    slug: &str,
    run_id: &RunId,
    text: &str,
) -> std::io::Result<String> {
    let text = dispatch_runlog::many_lines(text);
    let text = text.as_str();
    let dir = layout::workflows_dir(workspace);
    std::fs::create_dir_all(&dir)?;
    for name in [
        format!("{slug}.org"),
        format!("{slug}-{}.org", run_id.short()),
    ] {
        let path = dir.join(&name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                std::io::Write::write_all(&mut file, text.as_bytes())?;
                file.sync_all()?;
                return Ok(format!("workflows/{name}"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::read_to_string(&path).is_ok_and(|existing| existing == text) {
                    return Ok(format!("workflows/{name}"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    // The run's own name holds another text: a plan of this run that was rejected
    // after writing, or a file someone edited. Replace it; the log keeps the plan.
    let name = format!("{slug}-{}.org", run_id.short());
    std::fs::write(dir.join(&name), text)?;
    Ok(format!("workflows/{name}"))
}

/// `2s`, `35m`, `1h`, `1500ms`: how a timeout reads in a reason.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        s if s > 0 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s > 0 && s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// An earlier call's result as a later step is told it: with how many lines it had
/// when it had more than one. Told "fs.list_directory returned:" and a listing of three
/// files, the 1.5B model wrote that there were 4 (10 answers in 12 at temperature 0.2);
/// told "returned (3 lines):", it wrote 3 in 10 of 10 (errands, recorded). Said as
/// "returned 3 lines:", it helped the count as much but made the model answer a
/// listing's next step without its call 5 times in 10 (1 in 10 without a count, 3 in
/// 10 in parentheses).
fn returned(tool: &str, output: &str) -> String {
    match output.trim_end().lines().count() {
        lines @ 2.. => format!("{tool} returned ({lines} lines):\n{output}\n"),
        _ => format!("{tool} returned:\n{output}\n"),
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `scratch/REPORT.org` of `run_dir`, at most [`MAX_REPORT_BYTES`] of it, if it is a
/// regular file. The run's tools wrote it, so it is reached through `dispatch_confine`:
/// no symbolic link is followed on the way (a report linked to a secret file is not
/// read) and a FIFO cannot stall the read.
fn read_report(run_dir: &Path) -> Option<String> {
    use std::io::Read as _;
    let run = dispatch_confine::Root::open(run_dir, "the run directory").ok()?;
    let scratch = run.subdir(layout::SCRATCH, "scratch/").ok()?;
    let file = scratch.open_file(REPORT_FILE).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_REPORT_BYTES as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (!text.trim().is_empty()).then_some(text)
}

/// The first lines of a report that say something, as they fit a feedback note
/// (`#+` keyword lines such as `#+TITLE:` are skipped).
fn opening_lines(report: &str) -> String {
    let lines: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("#+"))
        .take(4)
        .collect();
    slice_chars(&lines.join("\n"), SUMMARY_CHARS)
}

/// The catalogue's risk class as the event records it.
fn risk_of(risk: dispatch_bus::catalogue::Risk) -> Risk {
    use dispatch_bus::catalogue::Risk as R;
    match risk {
        R::Read => Risk::Read,
        R::Write => Risk::Write,
        R::Destructive => Risk::Destructive,
        R::External => Risk::External,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_result_of_several_lines_says_how_many() {
        assert_eq!(
            returned(
                "fs.list_directory",
                "[FILE] a.txt\n[FILE] b.txt\n[FILE] c.md\n"
            ),
            "fs.list_directory returned (3 lines):\n[FILE] a.txt\n[FILE] b.txt\n[FILE] c.md\n\n"
        );
        assert_eq!(
            returned("files.write_file", "wrote 4 bytes to scratch/a"),
            "files.write_file returned:\nwrote 4 bytes to scratch/a\n"
        );
        assert_eq!(returned("t", ""), "t returned:\n\n");
    }

    #[test]
    fn a_note_opens_with_the_report_s_first_lines() {
        let report =
            "#+TITLE: Kill switches\n\n* Summary\nA kill switch ends a run.\n\nMore.\nAnd more.\n";
        assert_eq!(
            opening_lines(report),
            "* Summary\nA kill switch ends a run.\nMore.\nAnd more."
        );
        assert_eq!(
            opening_lines(&"x".repeat(400)).chars().count(),
            SUMMARY_CHARS
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human(Duration::from_secs(2)), "2s");
        assert_eq!(human(Duration::from_secs(35 * 60)), "35m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn the_tally_reads_as_json() {
        let tally = vec![
            TallyEntry {
                state: "DONE".into(),
                count: 4,
            },
            TallyEntry {
                state: "FAILED".into(),
                count: 2,
            },
        ];
        assert_eq!(tally_json(&tally), r#"{"DONE": 4, "FAILED": 2}"#);
    }

    #[test]
    fn workflows_get_unique_names_and_reuse_their_own() {
        let dir = tempfile_dir();
        let (a, b, c) = (RunId::new(), RunId::new(), RunId::new());
        assert_eq!(
            write_workflow(&dir, "x", &a, "a").unwrap(),
            "workflows/x.org"
        );
        let other = format!("workflows/x-{}.org", b.short());
        assert_eq!(write_workflow(&dir, "x", &b, "b").unwrap(), other);
        // A resumed run finds its own file again.
        assert_eq!(
            write_workflow(&dir, "x", &a, "a").unwrap(),
            "workflows/x.org"
        );
        assert_eq!(write_workflow(&dir, "x", &b, "b").unwrap(), other);
        assert_eq!(std::fs::read_to_string(dir.join(&other)).unwrap(), "b");
        // Any number of plans under one slug costs two names at most.
        let third = format!("workflows/x-{}.org", c.short());
        assert_eq!(write_workflow(&dir, "x", &c, "c").unwrap(), third);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_workflow_file_keeps_the_plan_lines_and_no_control_character() {
        let dir = tempfile_dir();
        let run = RunId::new();
        let plan = "#+TITLE: \u{1b}]52;c;aGk=\u{7}\r\n* TODO \u{9b}2J\u{202e}fdp.exe\n\t- step\n";
        let path = write_workflow(&dir, "x", &run, plan).unwrap();
        let written = std::fs::read_to_string(dir.join(&path)).unwrap();
        assert_eq!(
            written,
            "#+TITLE: \\u{1b}]52;c;aGk=\\u{7}\n* TODO \\u{9b}2J\\u{202e}fdp.exe\n\t- step\n"
        );
        // Resumed, the run finds its own file, not a second one.
        assert_eq!(write_workflow(&dir, "x", &run, plan).unwrap(), path);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dispatch-wf-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn uuid_like() -> u128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }
}
