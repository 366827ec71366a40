use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispatch_bus::{RunId, async_nats, subject};
use dispatch_proto::run::v1::{
    FeedbackQueued, LeafState, RunEvent, RunFinished, RunStatus, TallyEntry, run_event::Body,
};
use futures::{FutureExt as _, StreamExt};
use prost::Message as _;
use tokio::sync::broadcast;

use crate::{
    Error, ErrorKind, FOLLOW_POLL, RunLog, SUMMARY_CHARS, StoredEvent, chain, slice_chars,
};

/// What a run has to show for itself, recorded on its terminal event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The report's text (its writer bounds it).
    pub text: String,
    /// Where it is, relative to the workspace; empty when it lives only in the log.
    pub path: String,
}

/// One run's log as this process knows it: the verified events so far, and the means
/// to append the next one or wait for others' appends.
pub struct RunHandle {
    log: RunLog,
    run_id: RunId,
    events: Vec<StoredEvent>,
    /// False for a handle opened at a position ([`RunLog::handle_at`]): `events` then
    /// starts there, not at the run's first event.
    whole: bool,
    live: Option<Live>,
}

/// Where a handle's feed messages come from.
enum Live {
    /// Its own subscription to the run's feed.
    Own(async_nats::Subscriber),
    /// A watcher's, passed on ([`RunLog::share_feed`]); `caught_up` once the handle
    /// has read the log since it was handed the feed.
    Shared {
        messages: broadcast::Receiver<Arc<async_nats::Message>>,
        caught_up: bool,
    },
}

impl Live {
    /// The next feed message; `None` when the feed has ended. Messages a shared feed
    /// dropped while the handle did not read (the oldest go first) are skipped: the
    /// handle finds the gap at the next one.
    async fn next(&mut self) -> Option<Arc<async_nats::Message>> {
        match self {
            Live::Own(subscriber) => subscriber.next().await.map(Arc::new),
            Live::Shared { messages, .. } => loop {
                match messages.recv().await {
                    Ok(message) => return Some(message),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
        }
    }

    fn next_ready(&mut self) -> Option<Arc<async_nats::Message>> {
        match self {
            Live::Own(subscriber) => subscriber.next().now_or_never().flatten().map(Arc::new),
            Live::Shared { messages, .. } => loop {
                match messages.try_recv() {
                    Ok(message) => return Some(message),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            },
        }
    }
}

impl RunHandle {
    pub(crate) async fn load(log: RunLog, run_id: RunId) -> Result<Self, Error> {
        let events = log.read(&run_id).await?;
        Ok(Self {
            log,
            run_id,
            events,
            whole: true,
            live: None,
        })
    }

    pub(crate) fn partial(log: RunLog, run_id: RunId, events: Vec<StoredEvent>) -> Self {
        Self {
            log,
            run_id,
            events,
            whole: false,
            live: None,
        }
    }

    pub(crate) fn empty(log: RunLog, run_id: RunId) -> Self {
        Self {
            log,
            run_id,
            events: Vec::new(),
            whole: true,
            live: None,
        }
    }

    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }

    /// The events this handle holds: the whole log so far, or for a handle opened at a
    /// position, the log from there.
    pub fn events(&self) -> &[StoredEvent] {
        &self.events
    }

    pub fn bodies(&self) -> impl Iterator<Item = &Body> {
        self.events.iter().filter_map(|e| e.event.body.as_ref())
    }

    /// True once the log holds the run's terminal event.
    pub fn is_finished(&self) -> bool {
        self.bodies().any(|b| matches!(b, Body::RunFinished(_)))
    }

    /// Reads events appended since this handle last looked; returns how many.
    pub async fn refresh(&mut self) -> Result<usize, Error> {
        // Past the run's seal nothing more belongs to its record.
        if self.is_finished() {
            return Ok(0);
        }
        let after = self.events.last().map_or(0, |e| e.stream_seq);
        let mut fresh = self.log.read_after(&self.run_id, after).await?;
        let record = chain::verify(
            &self.run_id,
            self.events.last().map(|e| &e.event),
            &fresh,
            self.log.trust(),
        )?;
        fresh.truncate(record);
        let n = fresh.len();
        self.events.extend(fresh);
        Ok(n)
    }

    /// Appends `body` as the next event, with a fresh event id.
    ///
    /// Fails with [`ErrorKind::Conflict`] when another writer appended since this handle
    /// last read the log (the handle is refreshed, so the caller can decide again), and
    /// with [`ErrorKind::Finished`] after the terminal event.
    pub async fn append(&mut self, body: Body, causation_id: &str) -> Result<&StoredEvent, Error> {
        self.append_with_id(uuid::Uuid::now_v7().to_string(), body, causation_id)
            .await
    }

    /// Like [`Self::append`], with the event id chosen by the caller: an id that is
    /// already in the log makes this a no-op returning the stored event.
    pub async fn append_with_id(
        &mut self,
        event_id: String,
        body: Body,
        causation_id: &str,
    ) -> Result<&StoredEvent, Error> {
        if let Some(i) = self.position_of(&event_id) {
            return Ok(&self.events[i]);
        }
        if self.is_finished() {
            return Err(Error::new(
                ErrorKind::Finished,
                format!("run {} is finished; nothing can be appended", self.run_id),
            ));
        }
        let Some(writer) = self.log.role() else {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "run {}: this process writes no run log (it has no writer role)",
                    self.run_id
                ),
            ));
        };
        let role = crate::roles::role_of(writer);
        // Whatever this role may not write, readers would take for a forgery: it is
        // never sent.
        crate::roles::may_write(role, &body)
            .map_err(|why| Error::new(ErrorKind::Other, format!("run {}: {why}", self.run_id)))?;
        let (seq, prev_hash, expected) = match self.events.last() {
            Some(last) => (last.event.seq + 1, last.event.hash.clone(), last.stream_seq),
            None => (1, chain::GENESIS.to_vec(), 0),
        };
        let mut event = RunEvent {
            event_id,
            run_id: self.run_id.to_string(),
            seq,
            time_unix_ms: now_unix_ms(),
            causation_id: causation_id.to_owned(),
            prev_hash,
            hash: Vec::new(),
            writer: self.log.writer().to_owned(),
            signer: Vec::new(),
            signature: Vec::new(),
            prev_stream_seq: expected,
            role: role as i32,
            body: Some(body),
        };
        let sealer = matches!(event.body, Some(Body::RunFinished(_)))
            .then(|| self.log.sealer())
            .flatten();
        if let Some(sealer) = sealer {
            event.signer = sealer.public_key().to_vec();
        }
        event.hash = chain::hash(&event).to_vec();
        if let Some(sealer) = sealer {
            event.signature = sealer.sign(&event.hash).to_vec();
        }
        let result = self
            .log
            .bus()
            .append_over(
                subject::run(&self.run_id, writer),
                &event.event_id,
                expected,
                &subject::run_log(&self.run_id),
                event.encode_to_vec().into(),
            )
            .await;
        match result {
            Ok(ack) if !ack.duplicate => {
                self.events.push(StoredEvent {
                    event,
                    stream_seq: ack.stream_seq,
                    stored_as: writer,
                });
                Ok(self.events.last().expect("just pushed"))
            }
            // The server already holds an event with this id: ours was a retry.
            Ok(_) => {
                self.refresh().await?;
                if !self.whole && self.position_of(&event.event_id).is_none() {
                    return Err(Error::new(
                        ErrorKind::Duplicate,
                        format!(
                            "run {}: event {} was stored before",
                            self.run_id, event.event_id
                        ),
                    ));
                }
                let i = self.position_of(&event.event_id).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "run {}: event {} acknowledged as duplicate but not in the log",
                            self.run_id, event.event_id
                        ),
                    )
                })?;
                Ok(&self.events[i])
            }
            Err(err) => {
                let err = Error::from(err);
                if err.kind() == ErrorKind::Conflict {
                    self.refresh().await?;
                    // A writer that chose the same id got there first: same event.
                    if let Some(i) = self.position_of(&event.event_id) {
                        return Ok(&self.events[i]);
                    }
                }
                Err(err)
            }
        }
    }

    /// Returns what `pick` finds in the log, appending `body` first if it finds nothing.
    /// A lost race re-reads the log, where the winner's event may already be the answer;
    /// so however many writers try, the event is recorded once.
    pub async fn ensure<T>(
        &mut self,
        pick: impl Fn(&Body) -> Option<T>,
        body: Body,
        causation_id: &str,
    ) -> Result<T, Error> {
        loop {
            if let Some(found) = self.bodies().find_map(&pick) {
                return Ok(found);
            }
            match self.append(body.clone(), causation_id).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Conflict => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the log grows or `timeout` passes; returns how many events arrived.
    ///
    /// Events come from the run's feed, which carries each stored event with its stream
    /// sequence and its predecessor's: an event that follows the last one this handle
    /// holds is verified and taken as it is, with no read. A gap (a feed message lost
    /// across a reconnect) or a quiet [`FOLLOW_POLL`] makes the handle read the log.
    pub async fn wait_for_more(&mut self, timeout: Duration) -> Result<usize, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let catch_up = match &mut self.live {
            None => {
                self.live = Some(Live::Own(self.log.subscribe(&self.run_id).await?));
                true
            }
            Some(Live::Shared { caught_up, .. }) => !std::mem::replace(caught_up, true),
            Some(Live::Own(_)) => false,
        };
        if catch_up {
            // Whatever was stored before the subscription took effect.
            let n = self.refresh().await?;
            if n > 0 {
                return Ok(n);
            }
        }
        let mut live = self.live.take().expect("subscribed above");
        let result = self.follow(&mut live, deadline).await;
        self.live = Some(live);
        result
    }

    /// Feeds this handle the messages of a watcher's subscription
    /// ([`RunLog::share_feed`]) instead of its own.
    pub(crate) fn follow_shared(
        &mut self,
        messages: broadcast::Receiver<Arc<async_nats::Message>>,
    ) {
        self.live = Some(Live::Shared {
            messages,
            caught_up: false,
        });
    }

    async fn follow(
        &mut self,
        live: &mut Live,
        deadline: tokio::time::Instant,
    ) -> Result<usize, Error> {
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(0);
            }
            let nap = (deadline - now).min(FOLLOW_POLL);
            let n = match tokio::time::timeout(nap, live.next()).await {
                Ok(Some(message)) => {
                    let mut n = self.take_fed(&message).await?;
                    // Take whatever else is already here in the same pass.
                    while let Some(message) = live.next_ready() {
                        n += self.take_fed(&message).await?;
                    }
                    n
                }
                // The watcher sharing its feed is gone: the handle subscribes itself,
                // and reads what it may have missed meanwhile.
                Ok(None) if matches!(live, Live::Shared { .. }) => {
                    *live = Live::Own(self.log.subscribe(&self.run_id).await?);
                    self.refresh().await?
                }
                // The subscription ended (the client is closing) or the feed was quiet:
                // the log itself has the answer.
                Ok(None) | Err(_) => self.refresh().await?,
            };
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// Takes one feed message: the next event if it follows what this handle holds,
    /// nothing if the handle has it already, and a read of the log after a gap.
    async fn take_fed(&mut self, message: &async_nats::Message) -> Result<usize, Error> {
        let (Some(stream_seq), Some(on)) = (
            crate::fed_sequence(message),
            crate::fed_subject(message).filter(|on| on.run_id == self.run_id),
        ) else {
            return self.refresh().await;
        };
        let known = self.events.last().map_or(0, |e| e.stream_seq);
        // Nothing stored after the run's seal is part of its record.
        if stream_seq <= known || self.is_finished() {
            return Ok(0);
        }
        let event = crate::decode(&self.run_id, stream_seq, &message.payload)?;
        if event.prev_stream_seq != known {
            return self.refresh().await;
        }
        let fed = [StoredEvent {
            event,
            stream_seq,
            stored_as: on.writer,
        }];
        chain::verify(
            &self.run_id,
            self.events.last().map(|e| &e.event),
            &fed,
            self.log.trust(),
        )?;
        let [event] = fed;
        self.events.push(event);
        Ok(1)
    }

    /// The leaf tally so far: `DONE` and `FAILED` counts, in that order.
    pub fn tally(&self) -> Vec<TallyEntry> {
        let (mut done, mut failed, mut skipped) = (0, 0, 0);
        for body in self.bodies() {
            if let Body::LeafFinished(f) = body {
                match f.state() {
                    LeafState::Done => done += 1,
                    LeafState::Skipped => skipped += 1,
                    _ => failed += 1,
                }
            }
        }
        let mut tally = vec![
            TallyEntry {
                state: "DONE".into(),
                count: done,
            },
            TallyEntry {
                state: "FAILED".into(),
                count: failed,
            },
        ];
        // Said only when there were some, so a tally reads as it always has.
        if skipped > 0 {
            tally.push(TallyEntry {
                state: "SKIPPED".into(),
                count: skipped,
            });
        }
        tally
    }

    /// Ends the run: the feedback note for its conversation, then the one terminal
    /// event, reason and summary cut to [`SUMMARY_CHARS`]. Whoever gets there first
    /// wins; if the run has ended already this changes nothing.
    pub async fn finish(
        &mut self,
        status: RunStatus,
        reason: &str,
        summary: &str,
        causation_id: &str,
    ) -> Result<(), Error> {
        self.finish_with(status, reason, summary, Report::default(), causation_id)
            .await
    }

    /// [`Self::finish`] for a handle on the log's tail (a service's): the note is drawn
    /// from `requested` (the run's first event), and the tally is empty (a service has
    /// no leaves). Before it seals, the whole log is read and verified once (the seal
    /// vouches for all of it): a cost paid once, when a service ends.
    pub async fn finish_tail(
        &mut self,
        status: RunStatus,
        reason: &str,
        requested: &dispatch_proto::run::v1::RunRequested,
        causation_id: &str,
    ) -> Result<(), Error> {
        let reason = slice_chars(reason, SUMMARY_CHARS);
        let note = Body::FeedbackQueued(FeedbackQueued {
            conversation_id: requested.conversation_id.clone(),
            status: status as i32,
            summary: reason.clone(),
            goal: requested.goal.clone(),
        });
        let terminal = Body::RunFinished(RunFinished {
            status: status as i32,
            reason: reason.clone(),
            summary: reason,
            ..Default::default()
        });
        // The note is the event just before the end: on the tail if it was written.
        self.end(note, terminal, causation_id).await
    }

    /// Appends the note, then the terminal event, each once; an end someone else wrote
    /// first stands. The seal certifies the whole chain and who wrote each event, so a
    /// handle that holds only part of the log reads and verifies all of it first.
    async fn end(&mut self, note: Body, terminal: Body, causation_id: &str) -> Result<(), Error> {
        if !self.whole {
            self.events = self.log.read(&self.run_id).await?;
            self.whole = true;
        }
        let noted = |b: &Body| matches!(b, Body::FeedbackQueued(_)).then_some(());
        let ended = |b: &Body| matches!(b, Body::RunFinished(_)).then_some(());
        let result = async {
            self.ensure(noted, note, causation_id).await?;
            self.ensure(ended, terminal, causation_id).await
        }
        .await;
        match result {
            Err(e) if e.kind() == ErrorKind::Finished => Ok(()),
            other => other,
        }
    }

    /// [`Self::finish`], recording what the run has to show for itself.
    pub async fn finish_with(
        &mut self,
        status: RunStatus,
        reason: &str,
        summary: &str,
        report: Report,
        causation_id: &str,
    ) -> Result<(), Error> {
        // The note and the tally are drawn from the whole log.
        if !self.whole {
            self.events = self.log.read(&self.run_id).await?;
            self.whole = true;
        }
        let reason = slice_chars(reason, SUMMARY_CHARS);
        let summary = slice_chars(summary, SUMMARY_CHARS);
        let (goal, conversation_id) = self
            .bodies()
            .find_map(|b| match b {
                Body::RunRequested(r) => Some((r.goal.clone(), r.conversation_id.clone())),
                _ => None,
            })
            .unwrap_or_default();
        let note = Body::FeedbackQueued(FeedbackQueued {
            conversation_id,
            status: status as i32,
            summary: summary.clone(),
            goal,
        });
        let terminal = Body::RunFinished(RunFinished {
            status: status as i32,
            reason,
            summary,
            tally: self.tally(),
            report: report.text,
            report_path: report.path,
        });
        self.end(note, terminal, causation_id).await
    }

    /// Records that a command about this run was given up after `deliveries`
    /// deliveries, once; the dispatcher waiting for its step ends the run `blocked`.
    /// Nothing happens if the run has ended already.
    pub async fn abandon(
        &mut self,
        command: &str,
        key: &str,
        deliveries: u32,
        reason: &str,
    ) -> Result<(), Error> {
        let body = Body::CommandAbandoned(dispatch_proto::run::v1::CommandAbandoned {
            command: command.to_owned(),
            key: key.to_owned(),
            deliveries,
            reason: slice_chars(reason, SUMMARY_CHARS),
        });
        let recorded = |b: &Body| {
            matches!(b, Body::CommandAbandoned(a) if a.command == command && a.key == key)
                .then_some(())
        };
        match self.ensure(recorded, body, key).await {
            Err(e) if e.kind() == ErrorKind::Finished => Ok(()),
            other => other,
        }
    }

    /// Returns once the log holds the terminal event.
    pub async fn wait_until_finished(&mut self) -> Result<(), Error> {
        while !self.is_finished() {
            self.wait_for_more(Duration::from_secs(5)).await?;
        }
        Ok(())
    }

    fn position_of(&self, event_id: &str) -> Option<usize> {
        self.events
            .iter()
            .position(|e| e.event.event_id == event_id)
    }
}

pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
