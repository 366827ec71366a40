//! A chat turn: the agent loop over its conversation, one turn at a time.
//!
//! 1. **Its place.** The turn takes the head of its conversation in `KV_DISPATCH_TURNS`
//!    by compare-and-set and records the turn it follows (`TurnOrdered`), so the
//!    conversation's turns form one chain, whichever dispatcher copies run them.
//! 2. **Its wait.** It runs only once every turn before it has ended (queued by
//!    default; `interrupt` asks them to stop first; `reject` ends it instead, and it
//!    never joins the chain). A turn that started did so after the ones before it
//!    ended, so the wait walks back only past turns that ended without starting. A
//!    waiting turn holds no share of the copy's `--max-runs`.
//! 3. **Its context** (`TurnContext`): the feedback notes drained at its top (drain id
//!    = the turn's run id, so asking again hands out the same notes), and the earlier
//!    turns that fit the history budget, newest first until the budget or the turn cap
//!    is reached. Recorded before the first model request; a resumed turn rebuilds the
//!    same context from it, since earlier turns are finished logs that do not change.
//! 4. **Its loop**: the model answers, calls tools (through the policy and the
//!    connectors like any step), and the turn ends `done` when the model answers
//!    without a call. There is no plan and no gate: a turn's work is its answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::{ConversationId, RunId, streams, subject};
use dispatch_models::{Chat, ChatTurn, Exchange};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{ListTasksRequest, ListTasksResponse};
use dispatch_proto::run::v1::{
    ConversationHead, LeafState, ModelTurn, RunRequested, RunStatus, TurnContext, TurnNote,
    TurnOrdered, run_event::Body,
};
use dispatch_runlog::turn::Busy;
use dispatch_runlog::{SUMMARY_CHARS, StoredEvent, slice_chars};
use futures::StreamExt as _;
use prost::Message as _;

use super::{Exec, Stop, now_unix_ms};

/// The most of an earlier turn's message, answer text or call arguments its history
/// shows, in characters.
const HISTORY_TEXT_CHARS: usize = 4_000;
/// The most of an earlier turn's tool result its history shows, in characters.
const HISTORY_RESULT_CHARS: usize = 1_500;
/// How long the ledger has to answer a drain, and how many times it is asked.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
const DRAIN_TRIES: u32 = 4;
/// How long a turn asking the ones before it to stop gives each to end by itself.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// The most rendered turns a dispatcher copy keeps (finished turns never change).
const CACHED_TURNS: usize = 4_096;

/// How much of the conversation a turn's model is shown.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// The most characters of earlier turns (about four to a token).
    pub chars: usize,
    /// The most earlier turns.
    pub turns: usize,
}

/// Finished turns as their history shows them, by run id: a conversation's next turn
/// reads one new log, not every earlier one again.
#[derive(Default)]
pub(crate) struct TurnCache(Mutex<HashMap<RunId, Arc<Rendered>>>);

impl TurnCache {
    fn get(&self, run_id: &RunId) -> Option<Arc<Rendered>> {
        self.0.lock().expect("cache lock").get(run_id).cloned()
    }

    fn put(&self, run_id: RunId, rendered: Arc<Rendered>) {
        let mut map = self.0.lock().expect("cache lock");
        // Bounded the simplest way: what is dropped is read again from its log.
        if map.len() >= CACHED_TURNS {
            map.clear();
        }
        map.insert(run_id, rendered);
    }
}

/// One finished turn, read from its log.
#[derive(Debug)]
pub(crate) struct Rendered {
    turn: ChatTurn,
    /// The turn before it in the conversation, if any.
    previous: Option<RunId>,
    /// Its size as the budget counts it, in characters.
    chars: usize,
}

/// Where a turn stands in its conversation.
#[derive(Debug, Clone)]
struct Place {
    previous: Option<RunId>,
    number: u64,
}

impl Exec<'_> {
    /// A chat turn, within the run's deadline: its place, its wait, its context, its
    /// loop. Returns the tally of its one leaf (the loop).
    pub(super) async fn drive_turn(
        &mut self,
    ) -> Result<Vec<dispatch_proto::run::v1::TallyEntry>, Stop> {
        let requested = self.requested().await?;
        let timeout = self.timeout_of(&requested);
        let deadline_ms = self.deadline_ms(timeout);
        let left = deadline_ms.saturating_sub(now_unix_ms()).max(0) as u64;
        let wall = tokio::time::Instant::now() + Duration::from_millis(left);
        let mut waiting_for = None;
        let work = async {
            let place = self.place(&requested).await?;
            self.wait_for_earlier(&place, &requested, &mut waiting_for)
                .await?;
            self.started(deadline_ms).await?;
            let context = self.turn_context(&requested, &place).await?;
            self.turn_loop(&requested, &context).await
        };
        match tokio::time::timeout_at(wall, work).await {
            Ok(result) => result,
            Err(_) if self.waiting_for_approval() => {
                Err(Stop::Blocked("timed out waiting for approval".into()))
            }
            Err(_) if self.find(super::as_started).is_none() => Err(Stop::Blocked(format!(
                "timed out after {} waiting for the turn before it{}",
                super::human(timeout),
                waiting_for.map_or_else(String::new, |r: RunId| format!(" (run {r})"))
            ))),
            Err(_) => Err(Stop::Blocked(format!(
                "timed out after {}",
                super::human(timeout)
            ))),
        }
    }

    /// The turn's place in its conversation: recorded, or taken now. A turn that must
    /// not wait (`reject`) and finds one running ends `blocked` without a place.
    async fn place(&mut self, requested: &RunRequested) -> Result<Place, Stop> {
        let placed = |b: &Body| match b {
            Body::TurnOrdered(t) => Some(t.clone()),
            _ => None,
        };
        if let Some(ordered) = self.find(placed) {
            return Ok(place_of(&ordered));
        }
        let conversation: ConversationId = requested.conversation_id.parse().unwrap_or_default();
        let key = streams::turns_key(&conversation);
        let me = *self.run.run_id();
        let busy = Busy::of_recorded(&requested.busy);
        let heads = self.ctx.turns.clone();
        let failed = |e: &dyn std::fmt::Display| {
            Stop::Infra(dispatch_bus::Error::other("the conversation's head", e).into())
        };
        let ordered = loop {
            let head = heads.entry(&key).await.map_err(|e| failed(&e))?;
            let head = head.filter(|e| e.operation == kv::Operation::Put);
            let (last, number, revision) = match &head {
                Some(entry) => {
                    let head = ConversationHead::decode(entry.value.as_ref()).unwrap_or_default();
                    if head.last_run_id == me.to_string() {
                        break TurnOrdered {
                            previous_run_id: head.previous_run_id,
                            number: head.number,
                        };
                    }
                    // Taken before and lost before it was recorded: found in the history.
                    if let Some(mine) = self.lost_place(&heads, &key, &me).await {
                        break mine;
                    }
                    (
                        head.last_run_id.parse::<RunId>().ok(),
                        head.number,
                        Some(entry.revision),
                    )
                }
                None => (None, 0, None),
            };
            if busy == Busy::Reject
                && let Some(last) = last
                && let Some(running) = self.running_before(last).await?
            {
                return Err(Stop::Blocked(format!(
                    "rejected: turn {running} of the conversation is still running"
                )));
            }
            let value: bytes::Bytes = ConversationHead {
                last_run_id: me.to_string(),
                previous_run_id: last.map(|r| r.to_string()).unwrap_or_default(),
                number: number + 1,
            }
            .encode_to_vec()
            .into();
            let taken = match revision {
                None => heads.create(&key, value).await.map(|_| ()).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
                Some(revision) => heads
                    .update(&key, value, revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
            };
            match taken {
                Ok(()) => {
                    break TurnOrdered {
                        previous_run_id: last.map(|r| r.to_string()).unwrap_or_default(),
                        number: number + 1,
                    };
                }
                // Another turn took the head first: this one goes after it.
                Err((true, _)) => continue,
                Err((false, e)) => return Err(failed(&e)),
            }
        };
        let recorded = self.ensure(placed, Body::TurnOrdered(ordered)).await?;
        tracing::info!(run_id = %me, number = recorded.number, previous = recorded.previous_run_id, "turn placed in its conversation");
        Ok(place_of(&recorded))
    }

    /// The place this turn took in an earlier attempt that ended before recording it,
    /// from the head's history (its last [`streams::TURNS_HISTORY`] values).
    async fn lost_place(&self, heads: &kv::Store, key: &str, me: &RunId) -> Option<TurnOrdered> {
        // Only a turn that was tried before can have lost its place.
        if !self.resumed {
            return None;
        }
        let head = head_naming(heads, key, me).await?;
        Some(TurnOrdered {
            previous_run_id: head.previous_run_id,
            number: head.number,
        })
    }

    /// Waits until no turn before this one runs; with `interrupt`, asks each to stop.
    async fn wait_for_earlier(
        &mut self,
        place: &Place,
        requested: &RunRequested,
        waiting_for: &mut Option<RunId>,
    ) -> Result<(), Stop> {
        let Some(previous) = place.previous else {
            return Ok(());
        };
        // Started already: it waited before, in an earlier attempt.
        if self.find(super::as_started).is_some() {
            return Ok(());
        }
        let interrupt = Busy::of_recorded(&requested.busy) == Busy::Interrupt;
        while let Some(running) = self.running_before(previous).await? {
            *waiting_for = Some(running);
            let me = self.run.run_id().to_string();
            if interrupt {
                let by = format!("turn {me} (interrupt)");
                dispatch_runlog::stop::stop(&self.ctx.log, running, INTERRUPT_GRACE, false, &by)
                    .await?;
            }
            tracing::info!(run_id = %me, %running, "waiting for the conversation's running turn");
            let mut handle = self.ctx.log.handle(running).await?;
            // A queued turn only waits: it gives its share of `--max-runs` back meanwhile,
            // so a busy conversation cannot crowd out other runs.
            match self.slot.clone() {
                Some(slot) => slot.idle(handle.wait_until_finished()).await?,
                None => handle.wait_until_finished().await?,
            }
        }
        Ok(())
    }

    /// The first turn that has not ended, walking the chain back from `from`; none
    /// once a turn that started (and so ran after the ones before it had ended) has
    /// ended, or the chain begins.
    async fn running_before(&self, from: RunId) -> Result<Option<RunId>, Stop> {
        let mut at = Some(from);
        while let Some(run) = at {
            let events = match self.ctx.log.read(&run).await {
                Ok(events) => events,
                // A log that does not verify is never continued: nothing runs it.
                Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let ended = events
                .iter()
                .any(|e| matches!(e.event.body, Some(Body::RunFinished(_))));
            if !ended {
                return Ok(Some(run));
            }
            let started = events
                .iter()
                .any(|e| matches!(e.event.body, Some(Body::RunStarted(_))));
            if started {
                return Ok(None);
            }
            let ordered = events.iter().find_map(|e| match &e.event.body {
                Some(Body::TurnOrdered(t)) => Some(t.previous_run_id.parse().ok()),
                _ => None,
            });
            at = match ordered {
                Some(previous) => previous,
                // Stopped after it took the head and before it recorded its place: the
                // head's history still says which turn it followed.
                None => self.previous_in_history(&events, &run).await,
            };
        }
        Ok(None)
    }

    /// The turn `run` followed, from its conversation head's history, for a turn that
    /// took the head but never recorded it (`events` is its log).
    async fn previous_in_history(&self, events: &[StoredEvent], run: &RunId) -> Option<RunId> {
        let conversation = events.iter().find_map(|e| match &e.event.body {
            Some(Body::RunRequested(r)) => r.conversation_id.parse::<ConversationId>().ok(),
            _ => None,
        })?;
        let key = streams::turns_key(&conversation);
        head_naming(&self.ctx.turns, &key, run)
            .await?
            .previous_run_id
            .parse()
            .ok()
    }

    /// The turn's context: recorded, or put together now (the notes drained, the
    /// earlier turns chosen) and recorded.
    async fn turn_context(
        &mut self,
        requested: &RunRequested,
        place: &Place,
    ) -> Result<Chat, Stop> {
        let recorded = |b: &Body| match b {
            Body::TurnContext(c) => Some(c.clone()),
            _ => None,
        };
        let context = match self.find(recorded) {
            Some(context) => context,
            None => {
                let notes = self.drain(requested).await;
                let (earlier, left_out) = self.choose_earlier(place).await?;
                let context = TurnContext {
                    earlier_run_ids: earlier.iter().map(|(r, _)| r.to_string()).collect(),
                    left_out,
                    notes,
                };
                self.ensure(recorded, Body::TurnContext(context)).await?
            }
        };
        let mut earlier = Vec::with_capacity(context.earlier_run_ids.len());
        for id in &context.earlier_run_ids {
            let Ok(run) = id.parse::<RunId>() else {
                continue;
            };
            earlier.push(self.rendered(run).await?.turn.clone());
        }
        Ok(Chat {
            left_out: context.left_out,
            earlier,
            notes: context.notes.iter().map(note_line).collect(),
            message: dispatch_runlog::submit::prompt_goal(requested),
        })
    }

    /// The earlier turns the budget holds, oldest first, and how many are left out.
    async fn choose_earlier(
        &self,
        place: &Place,
    ) -> Result<(Vec<(RunId, Arc<Rendered>)>, u64), Stop> {
        let budget = self.ctx.chat_budget;
        let mut chosen = Vec::new();
        let mut used = 0;
        let mut at = place.previous;
        while let Some(run) = at {
            if chosen.len() >= budget.turns {
                break;
            }
            let rendered = self.rendered(run).await?;
            if used + rendered.chars > budget.chars {
                break;
            }
            used += rendered.chars;
            at = rendered.previous;
            chosen.push((run, rendered));
        }
        chosen.reverse();
        let left_out = place.number.saturating_sub(1 + chosen.len() as u64);
        Ok((chosen, left_out))
    }

    /// An earlier (finished) turn as its history shows it: from the cache, or its log.
    async fn rendered(&self, run: RunId) -> Result<Arc<Rendered>, Stop> {
        if let Some(rendered) = self.ctx.turn_cache.get(&run) {
            return Ok(rendered);
        }
        let events = match self.ctx.log.read(&run).await {
            Ok(events) => events,
            // A log that does not verify is shown as what it is, never its content.
            Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
                return Ok(Arc::new(Rendered {
                    turn: ChatTurn {
                        message: String::new(),
                        exchanges: Vec::new(),
                        cut_short: Some("its log does not verify".into()),
                    },
                    previous: None,
                    chars: 64,
                }));
            }
            Err(e) => return Err(e.into()),
        };
        let rendered = Arc::new(render(&events));
        if events
            .iter()
            .any(|e| matches!(e.event.body, Some(Body::RunFinished(_))))
        {
            self.ctx.turn_cache.put(run, rendered.clone());
        }
        Ok(rendered)
    }

    /// The conversation's feedback notes, drained once for this turn (the drain id is
    /// the turn's run id: asked again, the ledger hands out the same notes). A ledger
    /// that does not answer leaves the notes for the next turn.
    async fn drain(&self, requested: &RunRequested) -> Vec<TurnNote> {
        let query = ListTasksRequest {
            conversation_id: requested.conversation_id.clone(),
            limit: Some(1),
            after: None,
            drain_id: Some(self.run.run_id().to_string()),
        };
        for attempt in 0..DRAIN_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let reply: Result<Reply<ListTasksResponse>, _> = self
                .ctx
                .bus
                .request_json(subject::query::tasks(), &query, DRAIN_TIMEOUT)
                .await;
            match reply {
                Ok(Ok(page)) => {
                    return page
                        .feedback
                        .into_iter()
                        .map(|n| TurnNote {
                            run_id: n.run_id,
                            status: n.status,
                            summary: n.summary,
                            goal: n.goal,
                        })
                        .collect();
                }
                Ok(Err(e)) => {
                    tracing::warn!(run_id = %self.run.run_id(), error = %e, "the ledger refused the turn's drain");
                }
                Err(e) => {
                    tracing::warn!(run_id = %self.run.run_id(), attempt, error = %e, "no answer to the turn's drain");
                }
            }
        }
        tracing::warn!(run_id = %self.run.run_id(), "the turn goes on without its conversation's notes");
        Vec::new()
    }

    /// The turn's agent loop: model answers and tool calls until the model answers
    /// without a call, or its turns run out.
    async fn turn_loop(
        &mut self,
        requested: &RunRequested,
        chat: &Chat,
    ) -> Result<Vec<dispatch_proto::run::v1::TallyEntry>, Stop> {
        let title = dispatch_runlog::one_line(&requested.goal, 80);
        let started = Body::LeafStarted(dispatch_proto::run::v1::LeafStarted {
            leaf: 0,
            title: title.clone(),
        });
        self.ensure(super::started_leaf(0), started).await?;
        if self.find(super::finished_leaf(0)).is_some() {
            return Ok(self.run.tally());
        }
        let leaf = dispatch_plan::Leaf {
            index: 0,
            keyword: "TODO".into(),
            title,
            body: chat.message.clone(),
            done_when: None,
            ordered: false,
            tools: Vec::new(),
        };
        let mut history: Vec<Exchange> = Vec::new();
        let mut answered: Option<String> = None;
        let max_turns = self.ctx.max_turns;
        for turn in 0..max_turns {
            let model_turn = match self.find(super::model_turn(0, turn)) {
                Some(recorded) => recorded,
                None => self.chat_model_turn(&leaf, chat, turn, &history).await?,
            };
            history.push(super::assistant_exchange(&model_turn));
            if model_turn.tool_calls.is_empty() {
                answered = Some(model_turn.text.clone());
                break;
            }
            self.turn_calls(0, &model_turn.tool_calls, &mut history)
                .await?;
        }
        let (state, reason, answer) = match answered {
            Some(answer) => (LeafState::Done, "answered".to_owned(), answer),
            None => (
                LeafState::Failed,
                format!("the model did not answer within {max_turns} turns"),
                String::new(),
            ),
        };
        let finished = Body::LeafFinished(dispatch_proto::run::v1::LeafFinished {
            leaf: 0,
            state: state as i32,
            reason: slice_chars(&reason, SUMMARY_CHARS),
            answer: dispatch_runlog::slice_bytes(&answer, super::MAX_ANSWER_BYTES).to_owned(),
        });
        self.ensure(super::finished_leaf(0), finished).await?;
        Ok(self.run.tally())
    }

    /// Asks the model for turn `turn` of the chat loop and records its answer.
    async fn chat_model_turn(
        &mut self,
        leaf: &dispatch_plan::Leaf,
        chat: &Chat,
        turn: u32,
        history: &[Exchange],
    ) -> Result<ModelTurn, Stop> {
        let request = dispatch_models::TurnRequest {
            goal: chat.message.clone(),
            leaf: leaf.clone(),
            chat: Some(chat.clone()),
            earlier: Vec::new(),
            history: history.to_vec(),
            tools: self.ctx.offer.current().await.specs(),
            deltas: None,
        };
        let (reply, streamed) = self.streamed_turn(0, turn, request).await?;
        let body =
            super::model_turn_body(0, turn, reply, streamed, self.ctx.providers.worker.name());
        self.ensure(super::model_turn(0, turn), body).await
    }

    /// How a finished turn ends the run: `done` with its answer, or `blocked`.
    pub(super) fn turn_outcome(&self) -> (RunStatus, String, String) {
        let finished = self.find(|b| match b {
            Body::LeafFinished(f) if f.leaf == 0 => Some(f.clone()),
            _ => None,
        });
        match finished {
            Some(f) if f.state() == LeafState::Done => (
                RunStatus::Done,
                "answered".to_owned(),
                slice_chars(f.answer.trim(), SUMMARY_CHARS),
            ),
            Some(f) => (RunStatus::Blocked, f.reason.clone(), f.reason),
            None => {
                let reason = "the turn ended without an answer".to_owned();
                (RunStatus::Blocked, reason.clone(), reason)
            }
        }
    }
}

/// The value of the head at `key` that named `run` as its last turn, from the head's
/// history (its last [`streams::TURNS_HISTORY`] values), if it is still there.
async fn head_naming(heads: &kv::Store, key: &str, run: &RunId) -> Option<ConversationHead> {
    let mut history = heads.history(key).await.ok()?;
    while let Some(Ok(entry)) = history.next().await {
        let head = ConversationHead::decode(entry.value.as_ref()).ok()?;
        if head.last_run_id == run.to_string() {
            return Some(head);
        }
    }
    None
}

fn place_of(ordered: &TurnOrdered) -> Place {
    Place {
        previous: ordered.previous_run_id.parse().ok(),
        number: ordered.number,
    }
}

/// A drained note as the model reads it.
fn note_line(note: &TurnNote) -> String {
    format!(
        "the errand {:?} (run {}) ended {}: {}",
        dispatch_runlog::one_line(&note.goal, 200),
        note.run_id,
        note.status,
        dispatch_runlog::one_line(&note.summary, 300)
    )
}

/// A turn's log as its conversation's history shows it: its message, its answers and
/// calls with their results (each bounded), and how it ended if not with an answer.
/// A pure function of the log, so a context built from it is the same every time.
pub(crate) fn render(events: &[StoredEvent]) -> Rendered {
    let bodies = || events.iter().filter_map(|e| e.event.body.as_ref());
    let mut turn = ChatTurn::default();
    let mut previous = None;
    let mut results: HashMap<&str, Result<String, String>> = HashMap::new();
    for body in bodies() {
        match body {
            Body::ToolCallCompleted(c) => {
                results.insert(&c.call_id, Ok(slice_chars(&c.output, HISTORY_RESULT_CHARS)));
            }
            Body::ToolCallFailed(f) => {
                results.insert(&f.call_id, Err(slice_chars(&f.error, HISTORY_RESULT_CHARS)));
            }
            Body::PolicyDecided(d)
                if d.decision() != dispatch_proto::run::v1::Decision::Allow
                    && d.decision() != dispatch_proto::run::v1::Decision::Ask =>
            {
                results
                    .entry(&d.call_id)
                    .or_insert_with(|| Err(format!("denied by policy rule {}", d.rule)));
            }
            _ => {}
        }
    }
    let mut finished = None;
    for body in bodies() {
        match body {
            Body::RunRequested(r) => turn.message = slice_chars(&r.goal, HISTORY_TEXT_CHARS),
            Body::TurnOrdered(t) => previous = t.previous_run_id.parse().ok(),
            Body::ModelTurn(m) if m.leaf == 0 => {
                turn.exchanges.push(Exchange::Assistant {
                    text: slice_chars(&m.text, HISTORY_TEXT_CHARS),
                    tool_calls: m
                        .tool_calls
                        .iter()
                        .map(|c| dispatch_models::ToolCall {
                            id: c.call_id.clone(),
                            tool: c.tool.clone(),
                            args_json: slice_chars(&c.args_json, HISTORY_TEXT_CHARS),
                        })
                        .collect(),
                });
                for call in &m.tool_calls {
                    let result = results
                        .get(call.call_id.as_str())
                        .cloned()
                        .unwrap_or_else(|| Err("not run".to_owned()));
                    turn.exchanges.push(Exchange::ToolResult {
                        call_id: call.call_id.clone(),
                        tool: call.tool.clone(),
                        result,
                    });
                }
            }
            Body::RunFinished(f) => finished = Some(f.clone()),
            _ => {}
        }
    }
    let answered = matches!(
        turn.exchanges.last(),
        Some(Exchange::Assistant { tool_calls, .. }) if tool_calls.is_empty()
    );
    if !answered {
        turn.cut_short = Some(match &finished {
            Some(f) => format!(
                "it ended {}: {}",
                RunStatus::try_from(f.status).map_or("blocked", |s| s.word()),
                dispatch_runlog::one_line(&f.reason, 200)
            ),
            None => "it had not ended".to_owned(),
        });
    }
    let chars = turn.message.chars().count()
        + turn
            .exchanges
            .iter()
            .map(|e| match e {
                Exchange::Assistant { text, tool_calls } => {
                    text.chars().count()
                        + tool_calls
                            .iter()
                            .map(|c| c.tool.len() + c.args_json.chars().count() + 16)
                            .sum::<usize>()
                }
                Exchange::ToolResult { result, .. } => match result {
                    Ok(s) | Err(s) => s.chars().count() + 16,
                },
                _ => 0,
            })
            .sum::<usize>()
        + turn.cut_short.as_ref().map_or(0, |s| s.chars().count());
    Rendered {
        turn,
        previous,
        chars,
    }
}
