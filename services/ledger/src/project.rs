//! The projector: applies stream messages to the sled views, many per transaction,
//! each transaction carrying the stream sequence it reached.

use std::collections::HashMap;

use dispatch_bus::{ConversationId, subject};
use dispatch_proto::ledger::v1::{FeedbackDrained, RunsRemoved};
use dispatch_proto::run::v1::{RunEvent, RunStatus, run_event::Body};
use dispatch_views::{Batch, ViewStore};
use prost::Message as _;

use crate::view::Fold;
use dispatch_proto::api::v1::{Note, PendingApproval, RunView, TaskStatus};

pub const RUNS: &str = "runs";
pub const NOTES: &str = "notes";
pub const DRAINED: &str = "drained";
/// Tombstones of runs removed with `rm`/`prune`, so replaying their events later (a
/// rebuild reads the two streams independently) does not bring them back.
pub const REMOVED: &str = "removed";
/// Index: ids of runs that have not ended (queued or doing), so listing live runs
/// costs what is live, not what was ever run.
pub const ACTIVE: &str = "active";
/// Index: `<conversation>\0<run id>` for every run, so a conversation's tasks are a
/// prefix scan.
pub const BY_CONVERSATION: &str = "by_conversation";
/// Index: `<conversation>\0<queued at, 8 bytes BE><run id>` for notes not drained yet,
/// oldest first.
pub const UNDRAINED: &str = "undrained";
/// `<conversation>\0<drain id>` → the run ids that drain handed out, so a client that
/// retries a drain whose answer it lost gets the same notes again.
pub const DRAIN_IDS: &str = "drain_ids";
/// Ids of finished runs whose trail (`_steps.jsonl`) may not be on disk yet. Written in
/// the same commit as the terminal event's view, emptied by the exporter once the trail
/// is written, so a ledger killed at any point catches up on start.
pub const TRAILS_DUE: &str = "trails_due";
/// Ids of runs whose log has started, that have not ended, and whose goal has not been
/// looked for yet (put with the run's request, taken out when it ends or is checked). A
/// log only a forger could have started (no goal on DISPATCH_GOALS names it) has no
/// owner; the ledger hands such a run to the dispatcher to end (`dispatch.cmd.ghost`).
pub const GHOSTS_DUE: &str = "ghosts_due";
/// Index: `<short id><run id>` for every run, so the short id people type (the random
/// tail of the id, see [`dispatch_bus::short_id`]) resolves by a prefix scan.
pub const BY_SHORT_ID: &str = "by_short_id";
/// Days (`YYYY-MM-DD`) whose archive file may be out of date → a change token. Put in
/// the same commit as a run of that day ending or being removed; taken out by the
/// renderer, only if no newer change came meanwhile (compare-and-swap on the token).
pub const ARCHIVE_DUE: &str = "archive_due";
/// Index: ids of runs that have not ended and wait for at least one approval, so
/// listing what waits for a person costs what waits, not what is live.
pub const WAITING: &str = "waiting";
/// Index: `<origin>\0<run id>` for every run, so the runs of one origin (`schedule`,
/// `cli`, …) are a prefix scan.
pub const BY_ORIGIN: &str = "by_origin";
/// Index: `<word>\0<run id>` for every word of a finished run's goal and summary
/// ([`index_words`]), so a search costs the runs that hold its words, not every run.
pub const WORDS: &str = "words";
pub const TREES: [&str; 15] = [
    RUNS,
    NOTES,
    DRAINED,
    REMOVED,
    ACTIVE,
    BY_CONVERSATION,
    UNDRAINED,
    DRAIN_IDS,
    TRAILS_DUE,
    BY_SHORT_ID,
    ARCHIVE_DUE,
    WAITING,
    BY_ORIGIN,
    GHOSTS_DUE,
    WORDS,
];
/// The layout of the trees above; a store of another layout is rebuilt from the log.
pub const SCHEMA: u32 = 9;

/// The most words of one run indexed.
const INDEXED_WORDS: usize = 64;
/// The most runs one word of a search reads from the index.
const SEARCHED_PER_WORD: usize = 2_000;
/// The most words of a query searched.
const QUERY_WORDS: usize = 8;

/// The words a run is found by: lower-case, letters and digits, three or more, a
/// plural's `s` dropped, each once, at most [`INDEXED_WORDS`] (and at most 32 bytes
/// each), in the order they first appear.
pub fn index_words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if word.chars().count() < 3 || word.len() > 32 {
            continue;
        }
        let word = word.to_lowercase();
        let word = match word.strip_suffix('s') {
            Some(stem) if stem.chars().count() >= 3 => stem.to_owned(),
            _ => word,
        };
        if !out.contains(&word) {
            out.push(word);
        }
        if out.len() >= INDEXED_WORDS {
            break;
        }
    }
    out
}

/// The tombstone of a run removed together with its trail (`prune --trails`).
const TRAIL_REMOVED: &[u8] = b"trail";

/// Views over the sled store.
#[derive(Clone)]
pub struct Views {
    store: ViewStore,
    /// Whose seals make a finished run trusted.
    trust: dispatch_runlog::seal::Trust,
}

/// Changes accumulated since the last commit, read through before the store.
#[derive(Default)]
pub struct Pending {
    runs: HashMap<String, RunView>,
    /// What the store held of each run in `runs` when the batch first touched it
    /// (`None`: no view), so the commit writes only the index entries that change.
    before: HashMap<String, Option<Indexed>>,
    /// Views of goals not yet taken, written only where no view exists.
    queued: Vec<(String, RunView)>,
    removed: Vec<(String, bool)>,
    finished: usize,
    batch: Batch,
    last_seq: u64,
    applied: usize,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.applied
    }

    /// Runs removed by this batch, whose working directories go once it is committed,
    /// each with whether its trail goes too.
    pub fn removed(&self) -> &[(String, bool)] {
        &self.removed
    }

    /// How many runs ended in this batch (their trails are due once it is committed).
    pub fn finished(&self) -> usize {
        self.finished
    }
}

/// What a stored view puts in the indexes beside its own entry: a run's index entries
/// are written with its view, in one commit, so they are what its stored view says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Indexed {
    conversation: String,
    origin: String,
    ended: bool,
    waiting: bool,
}

impl Indexed {
    fn of(view: &RunView) -> Self {
        let ended = view.status().is_terminal();
        Self {
            conversation: conversation_or_default(&view.conversation_id),
            origin: view.origin.clone(),
            ended,
            waiting: !ended && !view.approvals.is_empty(),
        }
    }
}

/// `<conversation>\0<rest>`: conversation ids cannot hold a NUL, so a conversation's
/// keys are exactly the prefix `<conversation>\0`.
fn note_key(conversation: &str, rest: &str) -> Vec<u8> {
    let mut key = conversation.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(rest.as_bytes());
    key
}

fn short_id_key(run_id: &str) -> Vec<u8> {
    [dispatch_bus::short_id(run_id), run_id]
        .concat()
        .into_bytes()
}

fn undrained_key(conversation: &str, note: &Note) -> Vec<u8> {
    let mut key = note_key(conversation, "");
    key.extend_from_slice(&(note.queued_at_ms.max(0) as u64).to_be_bytes());
    key.extend_from_slice(note.run_id.as_bytes());
    key
}

/// A page of a listing, newest first, and the cursor to the next page.
#[derive(Debug, Default)]
pub struct Page {
    pub runs: Vec<RunView>,
    /// The last run id of this page, if more runs follow it.
    pub next: Option<String>,
}

/// Which runs a listing shows.
#[derive(Debug, Clone, Copy)]
pub struct Filter<'a> {
    /// Finished runs too, not only queued and doing ones.
    pub all: bool,
    pub conversation: Option<&'a str>,
    pub origin: Option<&'a str>,
}

/// How big one page may grow: `limit` runs and `bytes` of JSON, whichever comes first
/// (a page holds at least one run).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub limit: usize,
    pub bytes: usize,
}

/// Keeps items while they fit in `bounds`; says whether the caller should stop.
struct Filler<T> {
    items: Vec<T>,
    used: usize,
    bounds: Bounds,
    full: bool,
}

impl<T: serde::Serialize> Filler<T> {
    fn new(bounds: Bounds) -> Self {
        Self {
            items: Vec::new(),
            used: 0,
            bounds,
            full: false,
        }
    }

    /// Takes `item` if it fits; false (and full from now on) if it does not.
    fn take(&mut self, item: T) -> bool {
        // Sized only where a bound on bytes can be reached: encoding a view just to
        // measure it costs as much as decoding it did.
        let size = if self.bounds.bytes == usize::MAX {
            0
        } else {
            serde_json::to_vec(&item).map_or(0, |b| b.len()) + 1
        };
        let fits = self.items.len() < self.bounds.limit
            && (self.items.is_empty() || self.used + size <= self.bounds.bytes);
        if fits {
            self.used += size;
            self.items.push(item);
        } else {
            self.full = true;
        }
        fits
    }
}

impl Views {
    pub fn open(
        path: &std::path::Path,
        trust: dispatch_runlog::seal::Trust,
    ) -> Result<Self, dispatch_views::Error> {
        Ok(Self {
            store: ViewStore::open(path, &TREES, SCHEMA)?,
            trust,
        })
    }

    pub fn trust(&self) -> &dispatch_runlog::seal::Trust {
        &self.trust
    }

    pub fn flush(&self) -> Result<(), dispatch_views::Error> {
        self.store.flush()
    }

    pub fn cursor(&self, source: &str) -> Result<u64, dispatch_views::Error> {
        self.store.cursor(source)
    }

    /// Finished runs holding the words of `query`: most words first, then newest; at
    /// most `limit`. Reads at most [`SEARCHED_PER_WORD`] index entries a word.
    pub fn search(&self, query: &str, limit: usize) -> Vec<RunView> {
        let Ok(words) = self.store.tree(WORDS) else {
            return Vec::new();
        };
        let mut hits: std::collections::HashMap<String, usize> = Default::default();
        for word in index_words(query).into_iter().take(QUERY_WORDS) {
            let prefix = format!("{word}\0");
            for entry in words.scan_prefix(prefix.as_bytes()).take(SEARCHED_PER_WORD) {
                let Ok((key, _)) = entry else { break };
                if let Some(run) = key
                    .get(prefix.len()..)
                    .and_then(|r| std::str::from_utf8(r).ok())
                {
                    *hits.entry(run.to_owned()).or_default() += 1;
                }
            }
        }
        let mut ranked: Vec<(usize, String)> = hits.into_iter().map(|(run, n)| (n, run)).collect();
        // Run ids are UUIDv7: a larger id is a newer run.
        ranked.sort_by(|(a, x), (b, y)| b.cmp(a).then_with(|| y.cmp(x)));
        ranked
            .into_iter()
            .filter_map(|(_, run)| self.run(&run))
            .take(limit)
            .collect()
    }

    pub fn run(&self, run_id: &str) -> Option<RunView> {
        let bytes = self.store.tree(RUNS).ok()?.get(run_id).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// One page of runs, newest first (run ids are UUIDv7, so id order is time order),
    /// starting after the run id `after`. What a page costs depends on its size and
    /// on the index it walks (live runs, or one conversation), never on every run ever.
    pub fn page(&self, filter: Filter<'_>, after: Option<&str>, bounds: Bounds) -> Page {
        let mut filler = Filler::new(bounds);
        let mut keep = |view: RunView| {
            let live = filter.all || !view.status().is_terminal();
            if live && filter.origin.is_none_or(|o| o == view.origin) {
                filler.take(view)
            } else {
                true
            }
        };
        let (Ok(runs), Ok(active), Ok(by_conversation), Ok(by_origin)) = (
            self.store.tree(RUNS),
            self.store.tree(ACTIVE),
            self.store.tree(BY_CONVERSATION),
            self.store.tree(BY_ORIGIN),
        ) else {
            return Page::default();
        };
        let decode = |bytes: &[u8]| serde_json::from_slice::<RunView>(bytes).ok();
        // The index walked is the narrowest at hand: one conversation's runs, live runs
        // (for a page without finished ones), or one origin's runs.
        let index = match (filter.conversation, filter.origin) {
            (Some(conversation), _) => Some((by_conversation, conversation)),
            (None, Some(origin)) if filter.all => Some((by_origin, origin)),
            _ => None,
        };
        match index {
            Some((by_key, key)) => {
                let start = note_key(key, "");
                let end = match after {
                    Some(after) => note_key(key, after),
                    None => {
                        let mut end = start.clone();
                        *end.last_mut().expect("ends in NUL") = 1;
                        end
                    }
                };
                for item in by_key.range(start.clone()..end).rev() {
                    let Ok((key, _)) = item else { continue };
                    let id = String::from_utf8_lossy(&key[start.len()..]).into_owned();
                    if let Some(view) = self.run(&id)
                        && !keep(view)
                    {
                        break;
                    }
                }
            }
            None => {
                let index = if filter.all { runs } else { active };
                let range = match after {
                    Some(after) => index.range(..after.as_bytes()),
                    None => index.range::<&[u8], _>(..),
                };
                for item in range.rev() {
                    let Ok((key, value)) = item else { continue };
                    let view = if filter.all {
                        decode(&value)
                    } else {
                        self.run(&String::from_utf8_lossy(&key))
                    };
                    if let Some(view) = view
                        && !keep(view)
                    {
                        break;
                    }
                }
            }
        }
        let next = filler
            .full
            .then(|| filler.items.last().map(|v| v.run_id.clone()))
            .flatten();
        Page {
            runs: filler.items,
            next,
        }
    }

    /// One page of the approval requests nobody has answered, in approval id order
    /// (`<run id>.<call id>`, so oldest run first), starting after the approval id
    /// `after`. It walks only the runs that wait for someone.
    pub fn approvals(
        &self,
        after: Option<&str>,
        bounds: Bounds,
    ) -> (Vec<PendingApproval>, Option<String>) {
        let mut filler = Filler::new(bounds);
        let Ok(waiting) = self.store.tree(WAITING) else {
            return (Vec::new(), None);
        };
        let after = after.unwrap_or("");
        // The run of the cursor may hold approvals after it; start there.
        let start = after.split('.').next().unwrap_or("");
        'runs: for item in waiting.range(start.as_bytes()..) {
            let Ok((key, _)) = item else { continue };
            let Some(view) = self.run(&String::from_utf8_lossy(&key)) else {
                continue;
            };
            let mut approvals = view.approvals;
            approvals.sort_by(|a, b| a.approval_id.cmp(&b.approval_id));
            for approval in approvals {
                if approval.approval_id.as_str() > after && !filler.take(approval) {
                    break 'runs;
                }
            }
        }
        let next = filler
            .full
            .then(|| filler.items.last().map(|a| a.approval_id.clone()))
            .flatten();
        (filler.items, next)
    }

    /// How many approval requests wait for a person: the pending approvals of the runs
    /// that wait for someone (a walk over those runs only).
    pub fn approvals_waiting(&self) -> u64 {
        let Ok(waiting) = self.store.tree(WAITING) else {
            return 0;
        };
        waiting
            .iter()
            .keys()
            .filter_map(Result::ok)
            .filter_map(|key| self.run(&String::from_utf8_lossy(&key)))
            .map(|view| view.approvals.len() as u64)
            .sum()
    }

    /// What TASKS.org shows: every run that has not ended, and the newest `recent` runs
    /// whatever their state, newest first, each as its stored view, undecoded (the
    /// renderer decodes only the views that changed since it last rendered them). Its
    /// cost is bounded by those two numbers. Also the id of the oldest of those newest
    /// runs when older runs exist (the archive boundary).
    pub fn for_tasks_org(
        &self,
        recent: usize,
    ) -> (Vec<(String, impl AsRef<[u8]> + use<>)>, Option<String>) {
        let (Ok(runs), Ok(active)) = (self.store.tree(RUNS), self.store.tree(ACTIVE)) else {
            return (Vec::new(), None);
        };
        let recent = recent.max(1);
        let mut shown = std::collections::BTreeMap::new();
        let mut oldest_shown = None;
        for (taken, item) in runs.iter().rev().enumerate() {
            let Ok((key, stored)) = item else { continue };
            let run_id = String::from_utf8_lossy(&key).into_owned();
            if taken == recent {
                // Older runs exist: the boundary is the oldest of the newest.
                oldest_shown = shown.keys().next().cloned();
                break;
            }
            shown.insert(run_id, stored);
        }
        // Live runs are in `active` until the commit of their end.
        for key in active.iter().keys().filter_map(Result::ok) {
            let run_id = String::from_utf8_lossy(&key).into_owned();
            if !shown.contains_key(&run_id)
                && let Ok(Some(stored)) = runs.get(&key)
            {
                shown.insert(run_id, stored);
            }
        }
        (shown.into_iter().rev().collect(), oldest_shown)
    }

    /// Days before `before` whose archives are due, each with its change token.
    pub fn archives_due(&self, before: &str) -> Vec<(String, Vec<u8>)> {
        let Ok(tree) = self.store.tree(ARCHIVE_DUE) else {
            return Vec::new();
        };
        tree.range(..before.as_bytes())
            .filter_map(|item| item.ok())
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            .collect()
    }

    /// The archive of `day` was written as of `token`: it is due no more, unless a
    /// change came since (then its token differs and it stays due).
    pub fn archive_written(&self, day: &str, token: &[u8]) -> Result<(), dispatch_views::Error> {
        let tree = self.store.tree(ARCHIVE_DUE)?;
        // A lost race leaves the day due; it is rendered again on the next pass.
        let _ = tree.compare_and_swap(day.as_bytes(), Some(token), None::<&[u8]>)?;
        Ok(())
    }

    /// Calls `each` with every ended run made on `day`, newest first, one at a time,
    /// until it returns false.
    pub fn each_ended_run_of_day(&self, day: &str, mut each: impl FnMut(&RunView) -> bool) {
        let (Some((start, end)), Ok(runs)) =
            (crate::render::day_key_range(day), self.store.tree(RUNS))
        else {
            return;
        };
        for item in runs.range(start.as_bytes()..end.as_bytes()).rev() {
            let Ok((_, value)) = item else { continue };
            if let Ok(view) = serde_json::from_slice::<RunView>(&value)
                && view.status().is_terminal()
                && !each(&view)
            {
                return;
            }
        }
    }

    /// Runs whose id, or whose short id, starts with `prefix`; at most `limit`, each
    /// once.
    pub fn runs_with_prefix(&self, prefix: &str, limit: usize) -> Vec<RunView> {
        let (Ok(runs), Ok(by_short_id)) = (self.store.tree(RUNS), self.store.tree(BY_SHORT_ID))
        else {
            return Vec::new();
        };
        let by_id = runs
            .scan_prefix(prefix)
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned());
        let short = if prefix.len() <= dispatch_bus::RunId::SHORT_LEN {
            Some(
                by_short_id
                    .scan_prefix(prefix)
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter_map(|k| {
                        let id = k.get(dispatch_bus::RunId::SHORT_LEN..)?;
                        Some(String::from_utf8_lossy(id).into_owned())
                    }),
            )
        } else {
            None
        };
        let mut ids: Vec<String> = by_id.take(limit).collect();
        for id in short.into_iter().flatten() {
            if ids.len() >= limit {
                break;
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids.iter().filter_map(|id| self.run(id)).collect()
    }

    /// The conversation's oldest notes not drained yet, as many as fit in `bounds`;
    /// and whether more are waiting.
    pub fn undrained(&self, conversation: &str, bounds: Bounds) -> (Vec<Note>, bool) {
        let (Ok(undrained), Ok(notes), Ok(drained)) = (
            self.store.tree(UNDRAINED),
            self.store.tree(NOTES),
            self.store.tree(DRAINED),
        ) else {
            return (Vec::new(), false);
        };
        let mut filler = Filler::new(bounds);
        let prefix = note_key(conversation, "");
        for item in undrained.scan_prefix(&prefix) {
            let Ok((key, _)) = item else { continue };
            let Some(run_id) = key.get(prefix.len() + 8..) else {
                continue;
            };
            let note_key = [prefix.as_slice(), run_id].concat();
            // A drain and its note can commit in either order; the drained mark wins.
            if drained.contains_key(&note_key).unwrap_or(false) {
                continue;
            }
            let note = notes
                .get(&note_key)
                .ok()
                .flatten()
                .and_then(|bytes| serde_json::from_slice::<Note>(&bytes).ok());
            if let Some(note) = note
                && !filler.take(note)
            {
                break;
            }
        }
        let more = filler.full;
        (filler.items, more)
    }

    /// The notes an earlier drain with `drain_id` handed out, if there was one.
    pub fn drained_by(&self, conversation: &str, drain_id: &str) -> Option<Vec<Note>> {
        let ids = self
            .store
            .tree(DRAIN_IDS)
            .ok()?
            .get(note_key(conversation, drain_id))
            .ok()??;
        let ids: Vec<String> = serde_json::from_slice(&ids).ok()?;
        let notes = self.store.tree(NOTES).ok()?;
        Some(
            ids.iter()
                .filter_map(|id| notes.get(note_key(conversation, id)).ok().flatten())
                .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
                .collect(),
        )
    }

    /// Folds one run event (stream sequence `seq`) into `pending`. A payload that is
    /// not a run event changes no view; the cursor still moves past it.
    pub fn apply_run_event(
        &self,
        pending: &mut Pending,
        seq: u64,
        subject_name: &str,
        payload: &[u8],
    ) {
        pending.last_seq = seq;
        pending.applied += 1;
        let Some(on) = subject::parse_run(subject_name) else {
            tracing::warn!(
                subject = subject_name,
                seq,
                "ignoring a message on a non-run subject"
            );
            return;
        };
        let run_id = on.run_id;
        let key = run_id.to_string();
        let event = match dispatch_runlog::decode(&run_id, seq, payload) {
            Ok(event) => event,
            Err(e) => {
                // Something on this run's subject that is not one of its events: the
                // run's log no longer verifies.
                tracing::warn!(run_id = key, seq, error = %e, "a run's subject holds a message that is not its event");
                if self.is_removed(&key) {
                    return;
                }
                let current = self.take(pending, &key);
                let view = RunView::apply_garbage(current, &key, e.to_string(), seq);
                pending.runs.insert(key, view);
                return;
            }
        };
        // A trail is due for every run that ends, removed from the views or not (`prune`
        // keeps trails), unless its trail was removed too.
        if matches!(event.body, Some(Body::RunFinished(_))) && !self.trail_removed(&key) {
            pending.batch.put(TRAILS_DUE, &key, Vec::new());
            pending.finished += 1;
        }
        // Tombstones are looked up when a run first enters the batch; one written later
        // by the other stream's projection still wins at commit (guarded put).
        if !pending.runs.contains_key(&key) && self.is_removed(&key) {
            return;
        }
        let current = self.take(pending, &key);
        let view = RunView::apply(current, &event, on.writer, seq, &self.trust);
        let conversation = conversation_or_default(&view.conversation_id);
        // A chat turn's answer is in its conversation already (the next turn's history):
        // it leaves no note to drain.
        if let Some(note) = note_of(&event).filter(|_| view.kind != dispatch_runlog::turn::KIND) {
            let note_id = note_key(&conversation, &key);
            pending.batch.put(
                NOTES,
                &note_id,
                serde_json::to_vec(&note).expect("notes serialize"),
            );
            pending.batch.put_guarded(
                &[(DRAINED, &note_id)],
                UNDRAINED,
                undrained_key(&conversation, &note),
                Vec::new(),
            );
        }
        // A run's start is checked against the goals later, once the commit is in.
        if event.seq == 1
            && matches!(event.body, Some(Body::RunRequested(_)))
            && view.corrupt.is_none()
        {
            pending.batch.put(GHOSTS_DUE, &key, Vec::new());
        }
        // The view is written once per batch, at commit, however many events touched it.
        pending.runs.insert(key, view);
    }

    /// The run's view as this batch has it so far: from the batch, or else from the
    /// store, noting what the store held for the commit ([`Pending::before`]).
    fn take(&self, pending: &mut Pending, key: &str) -> Option<RunView> {
        if let Some(view) = pending.runs.remove(key) {
            return Some(view);
        }
        let stored = self.run(key);
        pending
            .before
            .insert(key.to_owned(), stored.as_ref().map(Indexed::of));
        stored
    }

    /// Up to `limit` runs whose goal is due to be looked for, in id order.
    pub fn ghosts_due(&self, limit: usize) -> Vec<String> {
        let Ok(tree) = self.store.tree(GHOSTS_DUE) else {
            return Vec::new();
        };
        tree.iter()
            .keys()
            .take(limit)
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect()
    }

    /// The run's goal was looked for (and the run handed on if it had none).
    pub fn ghost_checked(&self, run_id: &str) -> Result<(), dispatch_views::Error> {
        self.store.tree(GHOSTS_DUE)?.remove(run_id)?;
        Ok(())
    }

    /// Replaces a run's view with one folded from its whole log (`dispatch replay`).
    pub fn replace_run(&self, view: &RunView) -> Result<(), dispatch_views::Error> {
        if !self.is_removed(&view.run_id) {
            let json = serde_json::to_vec(view).expect("views serialize");
            self.store
                .tree(RUNS)?
                .insert(view.run_id.as_bytes(), json)?;
        }
        Ok(())
    }

    pub fn is_removed(&self, run_id: &str) -> bool {
        self.store
            .tree(REMOVED)
            .is_ok_and(|t| t.contains_key(run_id).unwrap_or(false))
    }

    /// True when the run was removed together with its trail.
    pub fn trail_removed(&self, run_id: &str) -> bool {
        self.store.tree(REMOVED).is_ok_and(|t| {
            t.get(run_id)
                .ok()
                .flatten()
                .is_some_and(|v| v.as_ref() == TRAIL_REMOVED)
        })
    }

    /// Up to `limit` runs whose trails are due, in id order after `after`.
    pub fn trails_due(&self, after: Option<&str>, limit: usize) -> Vec<String> {
        let Ok(tree) = self.store.tree(TRAILS_DUE) else {
            return Vec::new();
        };
        let range = match after {
            Some(after) => tree.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.iter(),
        };
        range
            .keys()
            .take(limit)
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect()
    }

    /// The run's trail is on disk (or never will be): it is no longer due.
    pub fn trail_written(&self, run_id: &str) -> Result<(), dispatch_views::Error> {
        self.store.tree(TRAILS_DUE)?.remove(run_id)?;
        Ok(())
    }

    /// Folds one submitted goal into `pending`: a queued view, unless the run has one.
    pub fn apply_goal(&self, pending: &mut Pending, seq: u64, subject_name: &str, payload: &[u8]) {
        pending.last_seq = seq;
        pending.applied += 1;
        let command = match dispatch_proto::command::v1::SubmitGoal::decode(payload) {
            Ok(command) => command,
            Err(e) => {
                tracing::warn!(seq, error = %e, "ignoring an undecodable goal");
                return;
            }
        };
        let from_subject = subject::run_id_of_goal(subject_name).map(|id| id.to_string());
        if from_subject.as_deref() != Some(command.run_id.as_str()) {
            tracing::warn!(
                seq,
                subject = subject_name,
                "ignoring a goal whose run id does not match its subject"
            );
            return;
        }
        pending
            .queued
            .push((command.run_id.clone(), RunView::queued(&command)));
    }

    /// Folds one ledger-stream message (a drain or a removal) into `pending`.
    pub fn apply_ledger_event(
        &self,
        pending: &mut Pending,
        seq: u64,
        subject_name: &str,
        payload: &[u8],
    ) {
        if subject_name != subject::REMOVED {
            return self.apply_drain(pending, seq, subject_name, payload);
        }
        pending.last_seq = seq;
        pending.applied += 1;
        match RunsRemoved::decode(payload) {
            Ok(removed) => {
                let trails = removed.trails;
                for run_id in removed.run_ids {
                    // The entries the store holds: those of the stored view (the
                    // batch's own changes to it were never written).
                    let pending_view = pending.runs.remove(&run_id);
                    let stored = match pending.before.remove(&run_id) {
                        Some(before) => before,
                        None => pending_view
                            .or_else(|| self.run(&run_id))
                            .as_ref()
                            .map(Indexed::of),
                    };
                    if let Some(stored) = stored {
                        pending
                            .batch
                            .remove(BY_CONVERSATION, note_key(&stored.conversation, &run_id));
                        pending
                            .batch
                            .remove(BY_ORIGIN, note_key(&stored.origin, &run_id));
                    }
                    pending.batch.remove(RUNS, &run_id);
                    pending.batch.remove(ACTIVE, &run_id);
                    pending.batch.remove(WAITING, &run_id);
                    pending.batch.remove(BY_SHORT_ID, short_id_key(&run_id));
                    mark_archive_due(&mut pending.batch, &run_id);
                    let tombstone = if trails {
                        TRAIL_REMOVED.to_vec()
                    } else {
                        Vec::new()
                    };
                    pending.batch.put(REMOVED, &run_id, tombstone);
                    if trails {
                        pending.batch.remove(TRAILS_DUE, &run_id);
                    }
                    pending.removed.push((run_id, trails));
                }
            }
            Err(e) => tracing::warn!(seq, error = %e, "ignoring an undecodable removal"),
        }
    }

    /// Folds one drain into `pending`.
    fn apply_drain(&self, pending: &mut Pending, seq: u64, subject_name: &str, payload: &[u8]) {
        pending.last_seq = seq;
        pending.applied += 1;
        let Some(conversation) = subject::conversation_of_drain(subject_name) else {
            tracing::warn!(
                subject = subject_name,
                seq,
                "ignoring a ledger message that is neither a drain nor a removal"
            );
            return;
        };
        let drained = match FeedbackDrained::decode(payload) {
            Ok(drained) => drained,
            Err(e) => {
                tracing::warn!(seq, error = %e, "ignoring an undecodable drain");
                return;
            }
        };
        let notes = self.store.tree(NOTES).ok();
        for run_id in &drained.run_ids {
            let note_id = note_key(conversation.as_str(), run_id);
            let note = notes
                .as_ref()
                .and_then(|t| t.get(&note_id).ok().flatten())
                .and_then(|bytes| serde_json::from_slice::<Note>(&bytes).ok());
            if let Some(note) = note {
                pending
                    .batch
                    .remove(UNDRAINED, undrained_key(conversation.as_str(), &note));
            }
            pending.batch.put(DRAINED, note_id, Vec::new());
        }
        if !drained.drain_id.is_empty() {
            pending.batch.put(
                DRAIN_IDS,
                note_key(conversation.as_str(), &drained.drain_id),
                serde_json::to_vec(&drained.run_ids).expect("ids serialize"),
            );
        }
    }

    /// Commits `pending` under `source`'s cursor. Returns whether anything was applied.
    pub fn commit(&self, source: &str, pending: Pending) -> Result<bool, dispatch_views::Error> {
        if pending.applied == 0 {
            return Ok(false);
        }
        let mut batch = pending.batch;
        for (key, view) in &pending.queued {
            // A queued goal only creates a run where none exists; its index entries are
            // written first, while that is still the question.
            let unknown: [(&str, &[u8]); 2] = [(REMOVED, key.as_bytes()), (RUNS, key.as_bytes())];
            let conversation = conversation_or_default(&view.conversation_id);
            batch.put_guarded(&unknown, ACTIVE, key, Vec::new());
            batch.put_guarded(
                &unknown,
                BY_CONVERSATION,
                note_key(&conversation, key),
                Vec::new(),
            );
            batch.put_guarded(&unknown, BY_SHORT_ID, short_id_key(key), Vec::new());
            batch.put_guarded(&unknown, BY_ORIGIN, note_key(&view.origin, key), Vec::new());
            let json = serde_json::to_vec(view).expect("views serialize");
            batch.put_guarded(&unknown, RUNS, key, json);
        }
        for (key, view) in &pending.runs {
            // A tombstone written meanwhile by the other stream's projection wins.
            let kept: [(&str, &[u8]); 1] = [(REMOVED, key.as_bytes())];
            let json = serde_json::to_vec(view).expect("views serialize");
            batch.put_guarded(&kept, RUNS, key, json);
            // The index entries are written where they change: a run's first view, a
            // conversation or origin replaced (a bad one by the default), its end, an
            // approval waiting or answered. Most commits of a run write its view alone.
            let now = Indexed::of(view);
            let before = pending.before.get(key).cloned().flatten();
            if now.ended {
                mark_archive_due(&mut batch, key);
            }
            if before.as_ref().is_none_or(|b| !b.ended) {
                if now.ended {
                    batch.remove(ACTIVE, key);
                    // A run that ended (or shows corrupt) needs no look for its goal.
                    batch.remove(GHOSTS_DUE, key);
                } else if before.is_none() {
                    batch.put_guarded(&kept, ACTIVE, key, Vec::new());
                }
            }
            match (before.as_ref().map(|b| b.waiting), now.waiting) {
                (Some(true), false) => batch.remove(WAITING, key),
                (None | Some(false), true) => batch.put_guarded(&kept, WAITING, key, Vec::new()),
                _ => {}
            }
            if before
                .as_ref()
                .is_none_or(|b| b.conversation != now.conversation)
            {
                if let Some(b) = &before {
                    batch.remove(BY_CONVERSATION, note_key(&b.conversation, key));
                }
                batch.put_guarded(
                    &kept,
                    BY_CONVERSATION,
                    note_key(&now.conversation, key),
                    Vec::new(),
                );
            }
            if before.as_ref().is_none_or(|b| b.origin != now.origin) {
                if let Some(b) = &before {
                    batch.remove(BY_ORIGIN, note_key(&b.origin, key));
                }
                batch.put_guarded(&kept, BY_ORIGIN, note_key(&now.origin, key), Vec::new());
            }
            if before.is_none() {
                batch.put_guarded(&kept, BY_SHORT_ID, short_id_key(key), Vec::new());
            }
            // A finished run is found by the words of its goal and its summary, indexed
            // once, when it ends.
            let ends_now = now.ended && before.as_ref().is_none_or(|b| !b.ended);
            if ends_now && view.corrupt.is_none() {
                let text = format!(
                    "{} {}",
                    view.goal,
                    view.summary.as_deref().unwrap_or_default()
                );
                for word in index_words(&text) {
                    batch.put_guarded(&kept, WORDS, note_key(&word, key), Vec::new());
                }
            }
        }
        self.store.commit(source, pending.last_seq, batch)
    }
}

/// The archive of the day `run_id` was made on must be rendered again.
fn mark_archive_due(batch: &mut Batch, run_id: &str) {
    if let Some(day) = crate::render::day_of_run(run_id) {
        let token = uuid::Uuid::now_v7();
        batch.put(ARCHIVE_DUE, day, token.as_bytes().to_vec());
    }
}

fn note_of(event: &RunEvent) -> Option<Note> {
    match &event.body {
        Some(Body::FeedbackQueued(f)) => Some(Note {
            run_id: event.run_id.clone(),
            status: RunStatus::try_from(f.status)
                .map_or(TaskStatus::Blocked.word(), |s| s.word())
                .to_owned(),
            summary: f.summary.clone(),
            goal: f.goal.clone(),
            queued_at_ms: event.time_unix_ms,
        }),
        _ => None,
    }
}

/// Runs without a conversation report to the default one.
pub fn conversation_or_default(conversation: &str) -> String {
    if conversation.is_empty() {
        ConversationId::DEFAULT.to_owned()
    } else {
        conversation.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::index_words;

    #[test]
    fn runs_are_indexed_by_their_words_once_each() {
        assert_eq!(
            index_words("Summarise the TODOs in notes.md; the todos, again!"),
            ["summarise", "the", "todo", "note", "again"]
        );
        // Short words and very long tokens are left out; the count is bounded.
        assert!(index_words("a an ok").is_empty());
        assert!(index_words(&"x".repeat(40)).is_empty());
        let many: String = (0..200).map(|i| format!("word{i} ")).collect();
        assert_eq!(index_words(&many).len(), 64);
    }
}
