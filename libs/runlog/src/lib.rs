//! The run log: one run's events, in order, hash-chained, on
//! `dispatch.run.<account>.<run_id>.<role>` (one subject per writer role, one order).
//!
//! This crate owns how an event gets into a run's log (envelope, hash chain, dedupe by
//! event id, optimistic concurrency over the run's subjects), who may write which event
//! ([`roles`]), how a log is read back and verified, and how a reader follows a live
//! run. It does not decide what a run does next: that is the dispatcher's job, and
//! projections belong to the ledger.

pub mod approvals;
pub mod args;
pub mod chain;
mod handle;
pub mod roles;
pub mod seal;
pub mod service;
pub mod steps;
pub mod stop;
pub mod submit;
pub mod turn;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use dispatch_bus::reads::Reader;
use dispatch_bus::subject::LogWriter;
use dispatch_bus::{Bus, RunId, async_nats, streams, subject};
use dispatch_proto::run::v1::{RunEvent, run_event::Body};
use futures::{StreamExt as _, TryStreamExt as _};
use prost::Message as _;

pub use handle::{Report, RunHandle};

/// What went wrong, for callers that must branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Another writer appended first; refresh and decide again.
    Conflict,
    /// The run already has its terminal event; nothing may follow it.
    Finished,
    /// The stored log does not verify: a broken chain, a gap, an undecodable event.
    Corrupt,
    /// NATS is not reachable.
    Unreachable,
    /// The server dropped the append as a duplicate of an event stored before the part
    /// of the log the handle holds: the event is in the log already.
    Duplicate,
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<dispatch_bus::Error> for Error {
    fn from(err: dispatch_bus::Error) -> Self {
        let kind = match err.kind() {
            dispatch_bus::ErrorKind::Conflict => ErrorKind::Conflict,
            dispatch_bus::ErrorKind::Unreachable => ErrorKind::Unreachable,
            _ => ErrorKind::Other,
        };
        Self::new(kind, err.to_string())
    }
}

/// An event as stored: the decoded envelope, where the stream keeps it, and whose
/// subject the server stored it on (which only that role's identity may publish to).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event: RunEvent,
    pub stream_seq: u64,
    pub stored_as: LogWriter,
}

/// Messages stored on a sealed run's subjects after its seal. They are outside the
/// record: readers show the run as it was sealed and say that these are there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterSeal {
    /// The stream sequence of the first one.
    pub stream_seq: u64,
    /// How many there are.
    pub messages: u64,
}

/// A run's record as an auditor reads it ([`RunLog::read_every`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Audited {
    /// The verified record: the whole log, or up to and including its seal.
    pub events: Vec<StoredEvent>,
    /// What was stored after the seal, if anything.
    pub after_seal: Option<AfterSeal>,
}

/// Access to every run's log. Cheap to clone.
#[derive(Clone)]
pub struct RunLog {
    // Every handle holds a clone: one pointer, not the stream's whole configuration.
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    bus: Bus,
    stream: Stream,
    /// Single events, read as the stream's leader has them (`dispatch_bus::reads`).
    reader: Reader,
    writer: String,
    /// The role this process appends as; `None`: it writes no run log.
    role: Option<LogWriter>,
    sealer: Option<seal::Sealer>,
    trust: seal::Trust,
}

impl RunLog {
    /// Opens the run-log stream for reading; `writer` names this process in the events
    /// it appends once it is given a role ([`Self::writing_as`]).
    pub async fn open(bus: &Bus, writer: &str) -> Result<Self, Error> {
        let stream = bus
            .jetstream()
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Other,
                    format!("open stream {}: {e}", streams::RUNS),
                )
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                reader: Reader::new(stream.clone()),
                stream,
                writer: writer.to_owned(),
                role: None,
                sealer: None,
                trust: seal::Trust::default(),
            }),
        })
    }

    /// Appends as `role`: on that role's subject of each run, which this process's
    /// identity must be allowed to publish to, and only events that role may write
    /// ([`roles::may_write`]).
    pub fn writing_as(mut self, role: LogWriter) -> Self {
        Arc::make_mut(&mut self.inner).role = Some(role);
        self
    }

    /// Accepts seals by the keys of `trust` when reading. Until this is called no seal
    /// is trusted, so a finished run reads as corrupt: a reader must say whom it trusts.
    pub fn with_trust(mut self, trust: seal::Trust) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        let own = inner.sealer.as_ref().map(seal::Sealer::public_key);
        inner.trust = trust;
        if let Some(own) = own {
            inner.trust.add(own);
        }
        self
    }

    /// Seals the terminal events this log handle appends with `sealer` (whose seals it
    /// then trusts).
    pub fn with_sealer(mut self, sealer: seal::Sealer) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        inner.trust.add(sealer.public_key());
        inner.sealer = Some(sealer);
        self
    }

    pub fn trust(&self) -> &seal::Trust {
        &self.inner.trust
    }

    /// The run's terminal event, if its log has one ([`ended_as`]).
    pub async fn ended_as(
        &self,
        run_id: &RunId,
    ) -> Result<Option<dispatch_proto::run::v1::RunFinished>, String> {
        ended_as(&self.inner.reader, run_id).await
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The span the run's first event was appended in, if its message carries one (its
    /// `traceparent`, written when tracing is on): the run's trace, and the first
    /// attempt's span a resumed run links to. One read, however long the log.
    pub async fn trace_of(
        &self,
        run_id: &RunId,
    ) -> Result<Option<opentelemetry::trace::SpanContext>, Error> {
        let first = self.first_message(run_id).await?;
        Ok(first.and_then(|m| dispatch_bus::trace::span_context(Some(&m.headers))))
    }

    /// The first message stored on the run's subjects, as it is stored.
    async fn first_message(
        &self,
        run_id: &RunId,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, Error> {
        self.inner
            .reader
            .next(&subject::run_log(run_id), 1)
            .await
            .map_err(|e| unreachable(run_id, e))
    }

    /// Reads a run's whole log and verifies its chain. An unknown run has an empty log.
    /// A sealed run's log ends at its seal: anything stored after it is not returned.
    pub async fn read(&self, run_id: &RunId) -> Result<Vec<StoredEvent>, Error> {
        let mut events = self.read_after(run_id, 0).await?;
        let record = chain::verify(run_id, None, &events, &self.inner.trust)?;
        events.truncate(record);
        Ok(events)
    }

    /// Opens a handle for appending to and following one run.
    pub async fn handle(&self, run_id: RunId) -> Result<RunHandle, Error> {
        RunHandle::load(self.clone(), run_id).await
    }

    /// Opens a handle holding the run's log from the event stored at stream sequence
    /// `from` on, if that event is the run's and `anchor` accepts it. A command names
    /// where its business in the log begins (the request it answers), so the service
    /// serving it reads a few events rather than the whole log. Anything else (0, a
    /// sequence that is not the run's, an event `anchor` refuses) opens the whole log,
    /// as [`Self::handle`] does.
    ///
    /// Such a handle verifies the chain from its first event on, and appends and
    /// follows like any other; what it does not see is the log before `from`.
    pub async fn handle_at(
        &self,
        run_id: RunId,
        from: u64,
        anchor: impl Fn(&Body) -> bool,
    ) -> Result<RunHandle, Error> {
        if from > 0
            && let Some(mut events) = self.read_from(&run_id, from).await?
            && events
                .first()
                .and_then(|e| e.event.body.as_ref())
                .is_some_and(&anchor)
        {
            let record = chain::verify_from(&run_id, &events, &self.inner.trust)?;
            events.truncate(record);
            return Ok(RunHandle::partial(self.clone(), run_id, events));
        }
        self.handle(run_id).await
    }

    /// Opens a handle holding only the run's last event: enough to append after it, or
    /// to see that the run has ended, for one read however long the log is. For
    /// appending to a long-lived run (a service's wakes) without reading all of it.
    ///
    /// If the last message is not an event that checks out on its own (something stored
    /// after the run's seal, say), the whole log is read instead, which knows where the
    /// record ends.
    pub async fn handle_tail(&self, run_id: RunId) -> Result<RunHandle, Error> {
        let last = self.inner.reader.last(&subject::run_log(&run_id)).await;
        match self.one_event(&run_id, last) {
            Ok(Some(last)) => Ok(RunHandle::partial(self.clone(), run_id, vec![last])),
            Ok(None) => Ok(RunHandle::empty(self.clone(), run_id)),
            Err(e) if e.kind() == ErrorKind::Corrupt => self.handle(run_id).await,
            Err(e) => Err(e),
        }
    }

    /// The run's first event, if it has one: one read, however long the log is. It is
    /// not verified against the rest of the log; a reader acting on it alone trusts
    /// only what the envelope's own hash covers.
    pub async fn first_event(&self, run_id: &RunId) -> Result<Option<StoredEvent>, Error> {
        let first = self.inner.reader.next(&subject::run_log(run_id), 1).await;
        let first = self.one_event(run_id, first)?;
        if let Some(first) = &first
            && first.event.seq != 1
        {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "run {run_id}: its first stored event has seq {}",
                    first.event.seq
                ),
            ));
        }
        Ok(first)
    }

    /// When the server stored the run's first message (unix ms), if it has one: a time
    /// no writer chooses, unlike the times events carry.
    pub async fn first_stored_at_ms(&self, run_id: &RunId) -> Result<Option<u64>, Error> {
        let first = self.first_message(run_id).await?;
        Ok(first.map(|m| u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)))
    }

    /// One message a direct get found on the run's subject, decoded and checked on its
    /// own (its hash, its seal); `None` when the subject holds none.
    fn one_event(
        &self,
        run_id: &RunId,
        got: Result<Option<async_nats::jetstream::message::StreamMessage>, dispatch_bus::Error>,
    ) -> Result<Option<StoredEvent>, Error> {
        let Some(message) = got.map_err(|e| unreachable(run_id, e))? else {
            return Ok(None);
        };
        let events = [stored(run_id, &message)?];
        chain::verify_from(run_id, &events, &self.inner.trust)?;
        let [event] = events;
        Ok(Some(event))
    }

    /// A handle for a run id this process just made up, so its log is known to be empty:
    /// no read needed. If the log is not empty after all, the first append is refused as
    /// a conflict, as with any stale handle.
    pub fn new_run(&self, run_id: RunId) -> RunHandle {
        RunHandle::empty(self.clone(), run_id)
    }

    /// Reads a run's whole log the way an auditor does: every message stored on the
    /// run's subjects, verified. [`Self::read`] follows the chain back from the last
    /// message, so it would not see a message that is off the chain (one a forger
    /// appended without the concurrency check); this also asks the server how many
    /// messages the run's subjects hold, and if the chain does not account for all of
    /// them it reads the subjects front to back, where the stray message makes the log
    /// corrupt, unless it was stored after a valid seal: then the record is the log up
    /// to the seal, and what follows is counted in [`Audited::after_seal`].
    /// For the ledger's trails, `replay` and `dispatch logs`.
    pub async fn read_every(&self, run_id: &RunId) -> Result<Audited, Error> {
        let mut events = self.read_after(run_id, 0).await?;
        let stored = self.stored_on_subjects(run_id).await?;
        if stored != events.len() as u64 {
            events = self.scan_after(run_id, 0).await?;
        }
        let record = chain::verify(run_id, None, &events, &self.inner.trust)?;
        events.truncate(record);
        let after_seal = match events.last() {
            Some(last) if chain::is_terminal(&last.event) && stored > record as u64 => {
                let next = self
                    .inner
                    .reader
                    .next(&subject::run_log(run_id), last.stream_seq + 1)
                    .await
                    .map_err(|e| unreachable(run_id, e))?;
                next.map(|message| AfterSeal {
                    stream_seq: message.sequence,
                    messages: stored - record as u64,
                })
            }
            _ => None,
        };
        Ok(Audited { events, after_seal })
    }

    /// How many messages the stream holds on the run's subjects (every writer's).
    async fn stored_on_subjects(&self, run_id: &RunId) -> Result<u64, Error> {
        let filter = subject::run_log(run_id);
        let mut subjects = self
            .inner
            .stream
            .info_with_subjects(filter.as_str())
            .await
            .map_err(|e| unreachable(run_id, e))?;
        let mut count = 0;
        while let Some((name, n)) = subjects
            .try_next()
            .await
            .map_err(|e| unreachable(run_id, e))?
        {
            if subject::run_id_of(&name).as_ref() == Some(run_id) {
                count += n as u64;
            }
        }
        Ok(count)
    }

    /// Reads the events of a run stored after stream sequence `after`, in order,
    /// without checking their chain (callers check it against what they hold).
    ///
    /// The run's last message is one direct get; each event names the stream sequence
    /// of the one before it (`prev_stream_seq`), so the new events are fetched by
    /// sequence, walking back to `after`: a cost of one get per new event, whatever else
    /// the stream holds. Anything the walk cannot follow (an event from before the
    /// pointer existed, a pointer off the run's subject) falls back to scanning the
    /// subject forward.
    pub async fn read_after(&self, run_id: &RunId, after: u64) -> Result<Vec<StoredEvent>, Error> {
        match self.walk_back(run_id, Floor::After(after)).await? {
            Some(events) => Ok(events),
            None => self.scan_after(run_id, after).await,
        }
    }

    /// Reads a run's events from the one stored at stream sequence `from` on, in order,
    /// or `None` if no event of this run is stored there. Costs one get per event read.
    async fn read_from(
        &self,
        run_id: &RunId,
        from: u64,
    ) -> Result<Option<Vec<StoredEvent>>, Error> {
        self.walk_back(run_id, Floor::At(from)).await
    }

    /// Walks a run's log back from its newest event along `prev_stream_seq` down to
    /// `floor`, and returns what it passed, oldest first; `None` where the pointers do
    /// not lead to the floor (a pointer off the run's subjects, a floor that is not one
    /// of the run's events, a message that is not an event: whatever a forward scan
    /// must sort out).
    async fn walk_back(
        &self,
        run_id: &RunId,
        floor: Floor,
    ) -> Result<Option<Vec<StoredEvent>>, Error> {
        let last = self
            .inner
            .reader
            .last(&subject::run_log(run_id))
            .await
            .map_err(|e| unreachable(run_id, e))?;
        let Some(last) = last else {
            return Ok(matches!(floor, Floor::After(_)).then(Vec::new));
        };
        match floor {
            Floor::After(after) if last.sequence <= after => return Ok(Some(Vec::new())),
            Floor::At(at) if last.sequence < at => return Ok(None),
            _ => {}
        }
        let Ok(newest) = stored(run_id, &last) else {
            return Ok(None);
        };
        let mut walked = vec![newest];
        loop {
            let current = walked.last().expect("one at least");
            let prev = current.event.prev_stream_seq;
            let reached = match floor {
                // `prev_stream_seq` 0 is also what an event from before the pointer
                // existed says: only a first event (seq 1) really has nothing before it.
                Floor::After(after) => prev == after && (prev != 0 || current.event.seq == 1),
                Floor::At(at) => current.stream_seq == at,
            };
            if reached {
                walked.reverse();
                return Ok(Some(walked));
            }
            let below = match floor {
                Floor::After(after) => prev <= after,
                Floor::At(at) => prev < at,
            };
            if below || prev >= current.stream_seq {
                return Ok(None);
            }
            let message = match self.inner.reader.at(prev).await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(None),
                Err(e) => return Err(unreachable(run_id, e)),
            };
            match stored(run_id, &message) {
                Ok(event) => walked.push(event),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Reads the run's subjects front to back from after stream sequence `after`, up to
    /// and including the first terminal event: whatever follows it is outside the
    /// record if its seal holds, which the caller's verification decides.
    async fn scan_after(&self, run_id: &RunId, after: u64) -> Result<Vec<StoredEvent>, Error> {
        let filter = subject::run_log(run_id);
        let mut next = after + 1;
        let mut out = Vec::new();
        loop {
            let message = match self.inner.reader.next(&filter, next).await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(out),
                Err(e) => return Err(unreachable(run_id, e)),
            };
            next = message.sequence + 1;
            let event = stored(run_id, &message)?;
            let terminal = chain::is_terminal(&event.event);
            out.push(event);
            if terminal {
                return Ok(out);
            }
        }
    }

    pub(crate) fn writer(&self) -> &str {
        &self.inner.writer
    }

    pub(crate) fn role(&self) -> Option<LogWriter> {
        self.inner.role
    }

    pub(crate) fn sealer(&self) -> Option<&seal::Sealer> {
        self.inner.sealer.as_ref()
    }

    /// Waits until an event `pick` accepts is stored in the run's log after stream
    /// sequence `after`, and returns what `pick` made of it.
    ///
    /// It follows the run's feed and decodes each event only to show it to `pick`; the
    /// chain is not checked, so what it finds is a signal to act on through a
    /// [`RunHandle`], not a record. The log itself is read once at the start and
    /// whenever the feed has been quiet for `quiet` (a feed message can be lost across a
    /// reconnect), so a long wait costs one read per `quiet`.
    pub async fn wait_for<T>(
        &self,
        run_id: &RunId,
        after: u64,
        quiet: Duration,
        pick: impl Fn(&Body) -> Option<T>,
    ) -> Result<T, Error> {
        let mut feed = self.subscribe(run_id).await?;
        self.wait_on(&mut feed, None, run_id, after, quiet, pick)
            .await
    }

    /// Subscribes to the run's feed once for two readers: a watcher that waits with
    /// [`Self::wait_for_shared`], and `handle`, which is handed every feed message the
    /// watcher receives instead of subscribing itself. A run's executor watches for a
    /// stop while its handle follows the run: one subscription, so each event is
    /// delivered to the process once, not twice.
    pub async fn share_feed(&self, handle: &mut RunHandle) -> Result<SharedFeed, Error> {
        let feed = self.subscribe(handle.run_id()).await?;
        let (to_handle, from_watcher) = tokio::sync::broadcast::channel(SHARED_FEED_BUFFER);
        handle.follow_shared(from_watcher);
        Ok(SharedFeed {
            run_id: *handle.run_id(),
            feed,
            to_handle,
        })
    }

    /// [`Self::wait_for`] on a feed shared with a handle ([`Self::share_feed`]): every
    /// message is passed on to the handle after `pick` has seen it. When this returns,
    /// the handle is fed no more and subscribes by itself when it next waits.
    pub async fn wait_for_shared<T>(
        &self,
        mut shared: SharedFeed,
        after: u64,
        quiet: Duration,
        pick: impl Fn(&Body) -> Option<T>,
    ) -> Result<T, Error> {
        let run_id = shared.run_id;
        self.wait_on(
            &mut shared.feed,
            Some(&shared.to_handle),
            &run_id,
            after,
            quiet,
            pick,
        )
        .await
    }

    async fn wait_on<T>(
        &self,
        feed: &mut async_nats::Subscriber,
        to_handle: Option<&tokio::sync::broadcast::Sender<Arc<async_nats::Message>>>,
        run_id: &RunId,
        mut after: u64,
        quiet: Duration,
        pick: impl Fn(&Body) -> Option<T>,
    ) -> Result<T, Error> {
        loop {
            for stored in self.read_after(run_id, after).await? {
                after = stored.stream_seq;
                if let Some(found) = stored.event.body.as_ref().and_then(&pick) {
                    return Ok(found);
                }
            }
            loop {
                let message = match tokio::time::timeout(quiet, feed.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => {
                        // The client is closing: no more feed; keep reading the log.
                        tokio::time::sleep(quiet).await;
                        break;
                    }
                    Err(_) => break,
                };
                let stream_seq = fed_sequence(&message);
                let found = match stream_seq {
                    Some(stream_seq) if stream_seq > after => {
                        after = stream_seq;
                        let event = decode(run_id, stream_seq, &message.payload)?;
                        event.body.as_ref().and_then(&pick)
                    }
                    _ => None,
                };
                // A handle that is behind is not waited for: past the buffer its oldest
                // messages are dropped, and it reads the log when it finds the gap.
                if let Some(to_handle) = to_handle {
                    let _ = to_handle.send(Arc::new(message));
                }
                if let Some(found) = found {
                    return Ok(found);
                }
                if stream_seq.is_none() {
                    break;
                }
            }
        }
    }

    /// Subscribes to the run's feed: its events as the server stores them.
    pub(crate) async fn subscribe(&self, run_id: &RunId) -> Result<async_nats::Subscriber, Error> {
        self.inner
            .bus
            .client()
            .subscribe(subject::feed(run_id))
            .await
            .map_err(|e| Error::new(ErrorKind::Unreachable, format!("follow run {run_id}: {e}")))
    }
}

/// The feed's header naming the event's stream sequence.
const FEED_SEQUENCE: &str = "Nats-Sequence";

/// The feed's header naming the subject the event was stored on.
const FEED_SUBJECT: &str = "Nats-Subject";

/// Which run's subject, and so which writer's, a feed message was stored on: from the
/// header the server's republish sets (no client may publish on a feed); `None` if it
/// is missing, given more than once, or not a run-log subject.
pub(crate) fn fed_subject(message: &async_nats::Message) -> Option<subject::RunSubject> {
    subject::parse_run(republished(message, FEED_SUBJECT)?)
}

/// The value of a header the server's republish sets, if the feed message holds it
/// exactly once. The republish keeps the stored message's own headers and adds its
/// after them, so a writer that set one of these names itself would put a second
/// value on the feed: such a message is not taken at its word, and the reader falls
/// back to reading the log, where the server's own account of the subject stands.
fn republished<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    let headers = message.headers.as_ref()?;
    let mut values = headers.get_all(name);
    let value = values.next()?;
    values.next().is_none().then_some(value.as_str())
}

/// A feed message's stream sequence, from the header the server's republish sets;
/// `None` if it is missing or given more than once. (The republish also names the
/// previous message on the same subject, but a run's log spans its writers' subjects:
/// the run's previous event is the one the event itself names, `prev_stream_seq`.)
pub(crate) fn fed_sequence(message: &async_nats::Message) -> Option<u64> {
    republished(message, FEED_SEQUENCE)?.parse().ok()
}

/// Where a backward walk through a run's log stops.
#[derive(Clone, Copy)]
enum Floor {
    /// Above this stream sequence: the event there is not read (0: read the whole log).
    After(u64),
    /// At the event stored at this stream sequence, which is read.
    At(u64),
}

/// One message of a run's subjects as a stored event: decoded, and the role whose
/// subject it is on. A message on no writer's subject, or one that is not an event of
/// this run, is corrupt.
pub fn stored(
    run_id: &RunId,
    message: &async_nats::jetstream::message::StreamMessage,
) -> Result<StoredEvent, Error> {
    stored_at(run_id, &message.subject, message.sequence, &message.payload)
}

/// [`stored`] for a message as a consumer delivers it: its subject, stream sequence
/// and payload.
pub fn stored_at(
    run_id: &RunId,
    on: &str,
    stream_seq: u64,
    payload: &[u8],
) -> Result<StoredEvent, Error> {
    let writer = subject::parse_run(on)
        .filter(|parsed| parsed.run_id == *run_id)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "run {run_id}: stream sequence {stream_seq} is on {on}, no subject of \
                     the run's log"
                ),
            )
        })?
        .writer;
    Ok(StoredEvent {
        event: decode(run_id, stream_seq, payload)?,
        stream_seq,
        stored_as: writer,
    })
}

fn unreachable(run_id: &RunId, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unreachable, format!("read run {run_id}: {e}"))
}

/// Decodes one stored event; a payload that is not a `RunEvent` of this run is corrupt.
pub fn decode(run_id: &RunId, stream_seq: u64, payload: &[u8]) -> Result<RunEvent, Error> {
    let event = RunEvent::decode(payload).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("run {run_id}: stream sequence {stream_seq} is not a run event: {e}"),
        )
    })?;
    if event.run_id != run_id.to_string() {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "run {run_id}: stream sequence {stream_seq} belongs to run {:?}",
                event.run_id
            ),
        ));
    }
    if event.body.is_none() {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("run {run_id}: event {} has no body", event.seq),
        ));
    }
    Ok(event)
}

/// The longest reason or summary a terminal event carries, in characters.
pub const SUMMARY_CHARS: usize = 300;

/// Whether the run `run_id` has ended, by one read of the last message on its
/// dispatcher's subject (where its terminal event is, and nothing after it but what a
/// forger holding the dispatcher's key could put there) on the run-log stream `runs`:
/// for services that only look up (the scheduler, ingress), as a signal, unverified. A
/// run with no event yet (queued) has not ended; an id that is no run id names nothing
/// that could still run, so it has.
pub async fn has_ended(runs: &Reader, run_id: &str) -> Result<bool, String> {
    let Ok(run_id) = run_id.parse::<RunId>() else {
        return Ok(true);
    };
    Ok(ended_as(runs, &run_id).await?.is_some())
}

/// The terminal event of run `run_id`, if its log has one: [`has_ended`]'s one read,
/// as unverified.
pub async fn ended_as(
    runs: &Reader,
    run_id: &RunId,
) -> Result<Option<dispatch_proto::run::v1::RunFinished>, String> {
    match runs
        .last(subject::run(run_id, LogWriter::Dispatcher).as_str())
        .await
    {
        Ok(Some(message)) => Ok(match RunEvent::decode(message.payload.as_ref()) {
            Ok(RunEvent {
                body: Some(Body::RunFinished(finished)),
                ..
            }) => Some(finished),
            _ => None,
        }),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("read run {run_id}: {e}")),
    }
}

/// A UUIDv7 made from `key` and a time: the same key and time give the same id,
/// whoever makes it. For ids that every try of one thing must share (a fire's run,
/// a wake's event, a service's schedules).
pub fn derived_uuid(millis: u64, key: &str) -> uuid::Uuid {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let random: [u8; 10] = digest[..10].try_into().expect("ten bytes");
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// The time (unix ms) in a UUIDv7 `id`; 0 for any other id.
pub fn uuid_millis(id: &str) -> u64 {
    uuid::Uuid::parse_str(id)
        .ok()
        .and_then(|u| u.get_timestamp())
        .map_or(0, |t| {
            let (secs, nanos) = t.to_unix();
            secs * 1000 + u64::from(nanos) / 1_000_000
        })
}

/// Cuts `text` to at most `max` characters, marking the cut with `…`.
pub fn slice_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// At most `max` bytes of `text`, cut on a character boundary: for text bounded by
/// what it costs in an event rather than by what a person reads.
pub fn slice_bytes(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max)]
}

/// Untrusted text (goals, plans, model output, tool results) made safe for one line of
/// a terminal or an org file: whitespace runs become one space, and every character a
/// terminal would act on ([`is_terminal_control`]) is written as a `\u{…}` escape
/// instead of reaching it raw. At most `max` characters are kept.
///
/// The rule, here and in [`many_lines`]: text Dispatch did not write itself reaches a
/// terminal or a file people read either as one line (this function) or as lines (a
/// report: only its line feeds and tabs kept); in both, every other C0 control, DEL,
/// every C1 control (U+0080–U+009F, U+009B CSI among them) and every bidirectional
/// formatting character is escaped. A backslash is left as it is, so `\u{1b}` written
/// by a model reads the same as an escaped ESC: it is text either way.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    let mut chars = 0;
    for word in text.split_whitespace() {
        if chars > 0 {
            if chars + 1 >= max {
                return out;
            }
            out.push(' ');
            chars += 1;
        }
        for c in word.chars() {
            if chars >= max {
                return out;
            }
            if is_terminal_control(c) {
                let escaped = format!("\\u{{{:x}}}", c as u32);
                chars += escaped.len();
                out.push_str(&escaped);
            } else {
                out.push(c);
                chars += 1;
            }
        }
    }
    out
}

/// Untrusted text that keeps its lines (a run's report, a plan written to
/// `workflows/`): line feeds and tabs stay, a CR LF is a line feed, and every other
/// character [`is_terminal_control`] names is written as a `\u{…}` escape (a lone CR
/// too: it would let a line overwrite the one before it). See [`one_line`] for the rule.
pub fn many_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' if chars.peek() == Some(&'\n') => {}
            c if is_terminal_control(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Characters a terminal acts on instead of showing, or that change how the text
/// around them is shown: C0 controls, DEL, C1 controls (`char::is_control`), and the
/// bidirectional formatting characters ([`is_bidi_control`]).
pub fn is_terminal_control(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

/// Characters that reorder how the text around them is displayed: the bidirectional
/// marks (ALM, LRM, RLM), embeddings and overrides (LRE…RLO), and isolates (LRI…PDI).
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// How often a follower re-reads the log when no live notification arrives. Live
/// notifications ride core NATS and can be missed across a reconnect; the poll makes
/// that a delay, never a hang.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// How many feed messages a shared feed holds for its handle ([`RunLog::share_feed`])
/// while the handle is not reading; past that the oldest are dropped (most are the
/// handle's own appends), and the handle reads the log when it finds a gap. The
/// channel allocates every slot up front, for every run the dispatcher holds: 256
/// slots were 10 KiB per run waiting for approval (`cargo xtask bench gate`, 57 → 67
/// KiB per waiting run); a one-leaf run appends 14 events in all.
const SHARED_FEED_BUFFER: usize = 32;

/// A run's feed subscribed once for a watcher and a handle ([`RunLog::share_feed`]).
pub struct SharedFeed {
    run_id: RunId,
    feed: async_nats::Subscriber,
    to_handle: tokio::sync::broadcast::Sender<Arc<async_nats::Message>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feed message as the server's republish builds it: the stored message's own
    /// headers first, then the server's.
    fn fed(own: &[(&str, &str)]) -> async_nats::Message {
        let mut headers = async_nats::HeaderMap::new();
        let run = "01a24d4a-7e16-728a-b61b-d6b88d3764bd";
        let stored = format!("dispatch.run.default.{run}.connectors");
        for (name, value) in own {
            headers.append(*name, *value);
        }
        headers.append(FEED_SUBJECT, stored.as_str());
        headers.append(FEED_SEQUENCE, "7");
        async_nats::Message {
            subject: format!("dispatch.feed.default.{run}").into(),
            reply: None,
            payload: Default::default(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_feed_header_a_writer_set_itself_is_not_believed() {
        let honest = fed(&[]);
        let on = fed_subject(&honest).expect("the server's subject");
        assert_eq!(on.writer, LogWriter::Connectors);
        assert_eq!(fed_sequence(&honest), Some(7));
        // A connectors seed claiming the dispatcher's subject, or another sequence:
        // two values, and neither is taken (the reader reads the log instead).
        let claim = "dispatch.run.default.01a24d4a-7e16-728a-b61b-d6b88d3764bd.dispatcher";
        assert_eq!(fed_subject(&fed(&[(FEED_SUBJECT, claim)])), None);
        assert_eq!(fed_sequence(&fed(&[(FEED_SEQUENCE, "1")])), None);
    }

    #[test]
    fn control_characters_never_reach_the_file_raw() {
        let hostile = "ring\x07 the \x1b[2Jbell\0 and \u{202e}flip\u{9b}31m\nnow";
        let line = one_line(hostile, 200);
        assert!(
            !line.chars().any(|c| c.is_control() || is_bidi_control(c)),
            "{line:?}"
        );
        assert_eq!(
            line,
            "ring\\u{7} the \\u{1b}[2Jbell\\u{0} and \\u{202e}flip\\u{9b}31m now"
        );
        assert_eq!(one_line("a  b\tc", 3), "a b");
    }

    #[test]
    fn lines_are_kept_and_everything_else_a_terminal_acts_on_is_escaped() {
        let hostile =
            "* Findings\r\n\u{1b}]52;c;aGk=\u{7}ok\tnow\rover \u{9b}2J \u{61c}\u{2067}x\u{7f}\n";
        assert_eq!(
            many_lines(hostile),
            "* Findings\n\\u{1b}]52;c;aGk=\\u{7}ok\tnow\\u{d}over \\u{9b}2J \\u{61c}\\u{2067}x\\u{7f}\n"
        );
        // Escaping twice changes nothing: an escape is plain text.
        assert_eq!(many_lines(&many_lines(hostile)), many_lines(hostile));
    }

    #[test]
    fn text_is_cut_on_character_boundaries() {
        assert_eq!(slice_bytes("é", 1), "");
        assert_eq!(slice_bytes("aé", 2), "a");
        assert_eq!(slice_bytes("abc", 10), "abc");
        assert_eq!(slice_chars("abcdef", 4), "abc…");
    }
}
