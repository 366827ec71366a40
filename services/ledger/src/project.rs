//! The projector: applies stream messages to the sled views, many per transaction,
//! each transaction carrying the stream sequence it reached.

use std::collections::HashMap;

use dispatch_bus::{ConversationId, subject};
use dispatch_proto::ledger::v1::{FeedbackDrained, RunsRemoved};
use dispatch_proto::run::v1::{RunEvent, RunStatus, run_event::Body};
use dispatch_views::{Batch, ViewStore};
use prost::Message as _;

use crate::view::{Note, RunView, TaskStatus};

pub const RUNS: &str = "runs";
pub const NOTES: &str = "notes";
pub const DRAINED: &str = "drained";
pub const DRAINS: &str = "drains";
/// Tombstones of runs removed with `rm`/`prune`, so replaying their events later (a
/// rebuild reads the two streams independently) does not bring them back.
pub const REMOVED: &str = "removed";
pub const TREES: [&str; 5] = [RUNS, NOTES, DRAINED, DRAINS, REMOVED];

/// Views over the sled store.
#[derive(Clone)]
pub struct Views {
    store: ViewStore,
}

/// Changes accumulated since the last commit, read through before the store.
#[derive(Default)]
pub struct Pending {
    runs: HashMap<String, RunView>,
    /// Views of goals not yet taken, written only where no view exists.
    queued: Vec<(String, RunView)>,
    removed: Vec<String>,
    finished: Vec<String>,
    batch: Batch,
    last_seq: u64,
    applied: usize,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.applied
    }

    /// Runs removed by this batch, whose working directories go once it is committed.
    pub fn removed(&self) -> &[String] {
        &self.removed
    }

    /// Runs that ended in this batch, whose trails are exported once it is committed.
    pub fn finished(&self) -> &[String] {
        &self.finished
    }
}

fn note_key(conversation: &str, run_id: &str) -> Vec<u8> {
    let mut key = conversation.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(run_id.as_bytes());
    key
}

impl Views {
    pub fn open(path: &std::path::Path) -> Result<Self, dispatch_views::Error> {
        Ok(Self {
            store: ViewStore::open(path, &TREES)?,
        })
    }

    pub fn flush(&self) -> Result<(), dispatch_views::Error> {
        self.store.flush()
    }

    pub fn cursor(&self, source: &str) -> Result<u64, dispatch_views::Error> {
        self.store.cursor(source)
    }

    pub fn run(&self, run_id: &str) -> Option<RunView> {
        let bytes = self.store.tree(RUNS).ok()?.get(run_id).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every run, newest first (run ids are UUIDv7, so id order is time order).
    pub fn runs(&self) -> Vec<RunView> {
        let Ok(tree) = self.store.tree(RUNS) else {
            return Vec::new();
        };
        tree.iter()
            .rev()
            .filter_map(|item| item.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Runs whose id starts with `prefix`, at most `limit`.
    pub fn runs_with_prefix(&self, prefix: &str, limit: usize) -> Vec<RunView> {
        let Ok(tree) = self.store.tree(RUNS) else {
            return Vec::new();
        };
        tree.scan_prefix(prefix)
            .filter_map(|item| item.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .take(limit)
            .collect()
    }

    /// The conversation's notes not drained yet, oldest first.
    pub fn undrained(&self, conversation: &str) -> Vec<Note> {
        let (Ok(notes), Ok(drained)) = (self.store.tree(NOTES), self.store.tree(DRAINED)) else {
            return Vec::new();
        };
        let mut out: Vec<Note> = notes
            .scan_prefix(note_key(conversation, ""))
            .filter_map(|item| item.ok())
            .filter(|(k, _)| !drained.contains_key(k).unwrap_or(false))
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        out.sort_by(|a, b| (a.queued_at_ms, &a.run_id).cmp(&(b.queued_at_ms, &b.run_id)));
        out
    }

    /// Stream sequence of the conversation's last drain applied here (0: none).
    pub fn last_drain(&self, conversation: &str) -> u64 {
        self.store
            .tree(DRAINS)
            .ok()
            .and_then(|t| t.get(conversation).ok().flatten())
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes)
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
        let Some(run_id) = subject::run_id_of(subject_name) else {
            tracing::warn!(
                subject = subject_name,
                seq,
                "ignoring a message on a non-run subject"
            );
            return;
        };
        let event = match dispatch_runlog::decode(&run_id, seq, payload) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(seq, error = %e, "ignoring an undecodable run event");
                return;
            }
        };
        let key = event.run_id.clone();
        // Tombstones are looked up when a run first enters the batch; one written later
        // by the other stream's projection still wins at commit (guarded put).
        let current = match pending.runs.remove(&key) {
            Some(view) => Some(view),
            None if self.is_removed(&key) => return,
            None => self.run(&key),
        };
        let view = RunView::apply(current, &event);
        if matches!(event.body, Some(Body::RunFinished(_))) {
            pending.finished.push(key.clone());
        }
        if let Some(note) = note_of(&event) {
            let conversation = conversation_or_default(&view.conversation_id);
            pending.batch.put(
                NOTES,
                note_key(&conversation, &key),
                serde_json::to_vec(&note).expect("notes serialize"),
            );
        }
        // The view is written once per batch, at commit, however many events touched it.
        pending.runs.insert(key, view);
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
                for run_id in removed.run_ids {
                    pending.runs.remove(&run_id);
                    pending.batch.remove(RUNS, &run_id);
                    pending.batch.put(REMOVED, &run_id, Vec::new());
                    pending.removed.push(run_id);
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
        for run_id in &drained.run_ids {
            pending
                .batch
                .put(DRAINED, note_key(conversation.as_str(), run_id), Vec::new());
        }
        pending
            .batch
            .put(DRAINS, conversation.as_str(), seq.to_be_bytes().to_vec());
    }

    /// Commits `pending` under `source`'s cursor. Returns whether anything was applied.
    pub fn commit(&self, source: &str, pending: Pending) -> Result<bool, dispatch_views::Error> {
        if pending.applied == 0 {
            return Ok(false);
        }
        let mut batch = pending.batch;
        for (key, view) in &pending.queued {
            let json = serde_json::to_vec(view).expect("views serialize");
            batch.put_unless_any(&[REMOVED, RUNS], RUNS, key, json);
        }
        for (key, view) in &pending.runs {
            // A tombstone written meanwhile by the other stream's projection wins.
            batch.put_unless(
                REMOVED,
                RUNS,
                key,
                serde_json::to_vec(view).expect("views serialize"),
            );
        }
        self.store.commit(source, pending.last_seq, batch)
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
