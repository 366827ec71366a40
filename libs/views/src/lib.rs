//! Projection plumbing: a sled-backed store for views rebuilt from streams.
//!
//! A view is a set of sled trees plus, per source stream, the last stream sequence
//! applied to it. [`ViewStore::commit`] writes a [`Batch`] of changes and the new
//! sequence in one transaction, so a crash never leaves data without its cursor or the
//! other way round, and a re-delivered message (sequence at or below the cursor) is
//! skipped. Deleting the store's directory and replaying the streams from sequence 1
//! rebuilds the same views. What the views contain is the ledger's business.

use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("view store: {0}")]
    Sled(#[from] sled::Error),
    #[error("view store: unknown tree {0:?}")]
    UnknownTree(String),
    #[error("view store: corrupt cursor for {0:?}")]
    CorruptCursor(String),
}

const CURSORS: &str = "__cursors";
const META: &str = "__meta";
const SCHEMA: &str = "schema";

/// A set of named trees with per-source cursors. Cheap to clone.
#[derive(Clone)]
pub struct ViewStore {
    db: sled::Db,
    cursors: sled::Tree,
    trees: Vec<(String, sled::Tree)>,
}

/// One change: put or remove `key` in `tree`, unless one of the `guards` (a tree and a
/// key in it) is present when the batch commits.
#[derive(Debug, Clone)]
struct Op {
    tree: String,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    guards: Vec<Guard>,
}

/// A key in a tree whose presence skips an op: `(tree, key)`.
type Guard = (String, Vec<u8>);

/// Changes to apply together with a cursor move.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, tree: &str, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) {
        self.push(tree, key, Some(value.into()), Vec::new());
    }

    /// Puts `key` unless any `(tree, key)` of `guards` is present at commit (checked
    /// inside the transaction, like every guard).
    pub fn put_guarded(
        &mut self,
        guards: &[(&str, &[u8])],
        tree: &str,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
    ) {
        let guards = guards
            .iter()
            .map(|(t, k)| ((*t).to_owned(), k.to_vec()))
            .collect();
        self.push(tree, key, Some(value.into()), guards);
    }

    pub fn remove(&mut self, tree: &str, key: impl AsRef<[u8]>) {
        self.push(tree, key, None, Vec::new());
    }

    fn push(
        &mut self,
        tree: &str,
        key: impl AsRef<[u8]>,
        value: Option<Vec<u8>>,
        guards: Vec<Guard>,
    ) {
        self.ops.push(Op {
            tree: tree.to_owned(),
            key: key.as_ref().to_vec(),
            value,
            guards,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl ViewStore {
    /// Opens (or creates) a store at `path` with the given trees, whose layout is
    /// `schema`. A store written with another schema is emptied, cursors included, so
    /// its owner rebuilds every view from the streams: the log is the truth, and a view
    /// that gained an index must not be read half-filled.
    pub fn open(path: &Path, trees: &[&str], schema: u32) -> Result<Self, Error> {
        let db = open_db(path)?;
        let cursors = db.open_tree(CURSORS)?;
        let trees = trees
            .iter()
            .map(|name| Ok(((*name).to_owned(), db.open_tree(name)?)))
            .collect::<Result<Vec<_>, sled::Error>>()?;
        let meta = db.open_tree(META)?;
        let stored = meta
            .get(SCHEMA)?
            .and_then(|b| <[u8; 4]>::try_from(b.as_ref()).ok())
            .map(u32::from_be_bytes);
        if stored != Some(schema) {
            if stored.is_some() || !cursors.is_empty() {
                tracing::warn!(
                    ?stored,
                    schema,
                    "view store has another layout; rebuilding from the streams"
                );
            }
            cursors.clear()?;
            for (_, tree) in &trees {
                tree.clear()?;
            }
            meta.insert(SCHEMA, &schema.to_be_bytes())?;
            db.flush()?;
        }
        Ok(Self { db, cursors, trees })
    }

    pub fn tree(&self, name: &str) -> Result<&sled::Tree, Error> {
        self.trees
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::UnknownTree(name.to_owned()))
    }

    /// The last sequence of `source` applied to the views (0: none yet).
    pub fn cursor(&self, source: &str) -> Result<u64, Error> {
        match self.cursors.get(source)? {
            None => Ok(0),
            Some(bytes) => {
                let raw: [u8; 8] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| Error::CorruptCursor(source.to_owned()))?;
                Ok(u64::from_be_bytes(raw))
            }
        }
    }

    /// Applies `batch` and moves `source`'s cursor to `seq`, atomically. Returns false
    /// (and changes nothing) when `seq` was already applied.
    pub fn commit(&self, source: &str, seq: u64, batch: Batch) -> Result<bool, Error> {
        // The transaction spans the trees the batch reads or writes, not every tree:
        // sled's cost per transaction grows with the trees in it.
        let mut names: Vec<&str> = Vec::new();
        let mut all: Vec<&sled::Tree> = vec![&self.cursors];
        for op in &batch.ops {
            for name in std::iter::once(&op.tree).chain(op.guards.iter().map(|(g, _)| g)) {
                if !names.contains(&name.as_str()) {
                    all.push(self.tree(name)?);
                    names.push(name);
                }
            }
        }
        let result = all.as_slice().transaction(|txs| {
            let cursors = &txs[0];
            let current = cursors
                .get(source)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
                .map_or(0, u64::from_be_bytes);
            if seq <= current {
                return Ok(false);
            }
            let index = |tree: &str| {
                names
                    .iter()
                    .position(|n| *n == tree)
                    .expect("checked above")
                    + 1
            };
            // A view's entries come one after another under the same guards: those
            // are read once, not once per entry.
            let mut last: Option<(&[Guard], bool)> = None;
            for op in &batch.ops {
                let guarded = match last {
                    Some((guards, guarded)) if guards == op.guards.as_slice() => guarded,
                    _ => {
                        let mut guarded = false;
                        for (guard, key) in &op.guards {
                            guarded |= txs[index(guard)].get(key.as_slice())?.is_some();
                        }
                        last = Some((op.guards.as_slice(), guarded));
                        guarded
                    }
                };
                if guarded {
                    continue;
                }
                let tx = &txs[index(&op.tree)];
                match &op.value {
                    Some(value) => tx.insert(op.key.as_slice(), value.as_slice())?,
                    None => tx.remove(op.key.as_slice())?,
                };
            }
            cursors.insert(source, &seq.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<()>>(true)
        });
        match result {
            Ok(applied) => Ok(applied),
            Err(TransactionError::Storage(e)) => Err(Error::Sled(e)),
            Err(TransactionError::Abort(())) => unreachable!("the transaction never aborts"),
        }
    }

    /// Flushes to disk.
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
    }
}

/// Opens the sled database at `path`. sled holds a file lock that its background
/// flusher releases a moment after the last handle is dropped, so a store closed just
/// before (a copy handing over, a reopen in the same process) may still hold it: a
/// refused lock is tried again for up to a second before it is an error.
fn open_db(path: &Path) -> Result<sled::Db, sled::Error> {
    let mut tries = 0;
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(e))
                if tries < 20 && e.to_string().contains("could not acquire lock") =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_cursor_move_together_and_redelivery_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path(), &["runs"], 1).unwrap();
        assert_eq!(store.cursor("RUNS").unwrap(), 0);

        let mut batch = Batch::default();
        batch.put("runs", "a", b"1".to_vec());
        assert!(store.commit("RUNS", 1, batch).unwrap());

        let mut again = Batch::default();
        again.put("runs", "a", b"stale".to_vec());
        assert!(!store.commit("RUNS", 1, again).unwrap());
        assert_eq!(
            store
                .tree("runs")
                .unwrap()
                .get("a")
                .unwrap()
                .unwrap()
                .as_ref(),
            b"1"
        );
        assert_eq!(store.cursor("RUNS").unwrap(), 1);

        let mut bad = Batch::default();
        bad.put("nope", "a", b"x".to_vec());
        assert!(matches!(
            store.commit("RUNS", 2, bad),
            Err(Error::UnknownTree(_))
        ));
        assert_eq!(
            store.cursor("RUNS").unwrap(),
            1,
            "a rejected batch moved the cursor"
        );
    }

    #[test]
    fn a_guarded_put_yields_to_its_guard() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path(), &["runs", "removed"], 1).unwrap();
        let mut tombstone = Batch::default();
        tombstone.put("removed", "a", Vec::new());
        store.commit("LEDGER", 1, tombstone).unwrap();
        let mut late = Batch::default();
        late.put_guarded(&[("removed", b"a")], "runs", "a", b"back".to_vec());
        late.put_guarded(&[("removed", b"b")], "runs", "b", b"kept".to_vec());
        store.commit("RUNS", 1, late).unwrap();
        assert!(store.tree("runs").unwrap().get("a").unwrap().is_none());
        assert!(store.tree("runs").unwrap().get("b").unwrap().is_some());
    }

    #[test]
    fn the_store_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ViewStore::open(dir.path(), &["runs"], 1).unwrap();
            let mut batch = Batch::default();
            batch.put("runs", "a", b"1".to_vec());
            store.commit("RUNS", 7, batch).unwrap();
            store.flush().unwrap();
        }
        let store = ViewStore::open(dir.path(), &["runs"], 1).unwrap();
        assert_eq!(store.cursor("RUNS").unwrap(), 7);
    }

    #[test]
    fn another_schema_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ViewStore::open(dir.path(), &["runs"], 1).unwrap();
            let mut batch = Batch::default();
            batch.put("runs", "a", b"1".to_vec());
            store.commit("RUNS", 7, batch).unwrap();
            store.flush().unwrap();
        }
        let store = ViewStore::open(dir.path(), &["runs", "index"], 2).unwrap();
        assert_eq!(store.cursor("RUNS").unwrap(), 0);
        assert!(store.tree("runs").unwrap().is_empty());
    }
}
