//! Memory: what a conversation's agent keeps between conversations, per owner
//! (preferences, notes, people, documents, todos).
//!
//! One entry per key in the `DISPATCH_MEMORY` key-value bucket, under
//! `<account>.<agent>.<key>` (the owner is the conversation's account and agent, both
//! `default` until tenancy lands), its value a small JSON [`Entry`]. The `memory`
//! connector writes it from tool calls (so every change is a call in some run's log);
//! people read and remove entries with `dispatch memory` and `GET /v1/memory`.
//!
//! Bounded: a text is at most [`MAX_TEXT_CHARS`], a key [`MAX_KEY_CHARS`], an owner
//! keeps at most [`MAX_ENTRIES`] (a new key past that is refused; replacing one is
//! not), and a run may change memory [`MAX_CHANGES_PER_RUN`] times. Recall matches
//! words; it reads the owner's entries only, never another owner's.
//!
//! It does not own: the bucket's declaration (`dispatch_bus::streams`), who may call
//! the tools (the policy), or the per-run count (the connector reads it from the log).

use std::time::{SystemTime, UNIX_EPOCH};

use dispatch_bus::async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull, kv};
use dispatch_bus::{Bus, streams};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

/// What an entry is about.
pub const KINDS: [&str; 5] = ["preference", "note", "person", "document", "todo"];
/// The longest text an entry keeps, in characters.
pub const MAX_TEXT_CHARS: usize = 2_000;
/// The longest key, in characters (letters, digits and `-` once normalised).
pub const MAX_KEY_CHARS: usize = 64;
/// The most entries one owner keeps.
pub const MAX_ENTRIES: usize = 500;
/// The most changes (remember, forget) one run may make.
pub const MAX_CHANGES_PER_RUN: usize = 20;
/// The most entries one recall answers with.
pub const RECALLED: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong: what to fix is in the message.
    #[error("{0}")]
    Invalid(String),
    /// The owner keeps [`MAX_ENTRIES`] already.
    #[error(
        "memory is full: it keeps at most {MAX_ENTRIES} entries; forget some before remembering new ones"
    )]
    Full,
    #[error("memory: {0}")]
    Store(String),
}

/// Whose memory: an account's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub account: String,
    pub agent: String,
}

impl Default for Owner {
    fn default() -> Self {
        Self {
            account: dispatch_bus::subject::conv::DEFAULT_ACCOUNT.to_owned(),
            agent: dispatch_bus::subject::conv::DEFAULT_AGENT.to_owned(),
        }
    }
}

impl Owner {
    /// The owner of every conversation until tenancy lands: the default account's
    /// default agent.
    pub fn of_conversation(_conversation: &str) -> Self {
        Self::default()
    }

    fn prefix(&self) -> String {
        format!("{}.{}", self.account, self.agent)
    }
}

/// One thing remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub kind: String,
    pub text: String,
    pub updated_at_ms: i64,
    /// The run whose call remembered it last (empty when a person wrote it).
    #[serde(default)]
    pub run_id: String,
}

/// The memory bucket, opened.
#[derive(Clone)]
pub struct Memory {
    kv: kv::Store,
    stream: jetstream::stream::Stream,
}

impl Memory {
    pub async fn open(bus: &Bus) -> Result<Self, Error> {
        let js = bus.jetstream();
        let kv = js
            .get_key_value(streams::MEMORY_BUCKET)
            .await
            .map_err(|e| Error::Store(format!("open the memory bucket: {e}")))?;
        let stream = js
            .get_stream(streams::MEMORY)
            .await
            .map_err(|e| Error::Store(format!("open the memory bucket's stream: {e}")))?;
        Ok(Self { kv, stream })
    }

    /// Every entry `owner` keeps, by key.
    pub async fn list(&self, owner: &Owner) -> Result<Vec<Entry>, Error> {
        let failed = |e: &dyn std::fmt::Display| Error::Store(format!("read memory: {e}"));
        let filter = format!("$KV.{}.{}.>", streams::MEMORY_BUCKET, owner.prefix());
        let mut consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let mut entries = Vec::new();
        let pending = consumer.info().await.map_err(|e| failed(&e))?.num_pending;
        if pending == 0 {
            return Ok(entries);
        }
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| failed(&e))?;
            let left = message.info().map_err(|e| failed(&e))?.pending;
            let removed = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            if !removed && let Ok(entry) = serde_json::from_slice::<Entry>(&message.payload) {
                entries.push(entry);
            }
            if left == 0 {
                break;
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// Keeps `text` under `key` (made from the text when none is given), replacing
    /// what the key held. Returns what is kept.
    pub async fn remember(
        &self,
        owner: &Owner,
        kind: &str,
        key: Option<&str>,
        text: &str,
        run_id: &str,
    ) -> Result<Entry, Error> {
        if !KINDS.contains(&kind) {
            return Err(Error::Invalid(format!(
                "kind must be one of {} (got {:?})",
                KINDS.join(", "),
                kind.chars().take(32).collect::<String>()
            )));
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::Invalid("text must not be empty".into()));
        }
        let chars = text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(Error::Invalid(format!(
                "text must be at most {MAX_TEXT_CHARS} characters (it has {chars}); keep the gist"
            )));
        }
        let key = match key.map(str::trim).filter(|k| !k.is_empty()) {
            Some(key) => normalise(key)?,
            None => normalise(&format!(
                "{kind} {}",
                text.split_whitespace()
                    .take(6)
                    .collect::<Vec<_>>()
                    .join(" ")
            ))?,
        };
        let path = format!("{}.{key}", owner.prefix());
        if !self.holds(&path).await? && self.list(owner).await?.len() >= MAX_ENTRIES {
            return Err(Error::Full);
        }
        let entry = Entry {
            key,
            kind: kind.to_owned(),
            text: text.to_owned(),
            updated_at_ms: now_ms(),
            run_id: run_id.to_owned(),
        };
        let value = serde_json::to_vec(&entry).expect("an entry serialises");
        self.kv
            .put(&path, value.into())
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        Ok(entry)
    }

    /// Removes `key`; whether it was there.
    pub async fn forget(&self, owner: &Owner, key: &str) -> Result<bool, Error> {
        let key = normalise(key)?;
        let path = format!("{}.{key}", owner.prefix());
        let known = self.holds(&path).await?;
        if known {
            self.kv
                .purge(&path)
                .await
                .map_err(|e| Error::Store(e.to_string()))?;
        }
        Ok(known)
    }
}

impl Memory {
    /// Whether the bucket holds an entry at `path` (not removed).
    async fn holds(&self, path: &str) -> Result<bool, Error> {
        Ok(self
            .kv
            .entry(path)
            .await
            .map_err(|e| Error::Store(e.to_string()))?
            .is_some_and(|e| e.operation == kv::Operation::Put))
    }
}

/// A key as it is stored: lower case, words joined by `-`, at most [`MAX_KEY_CHARS`].
pub fn normalise(key: &str) -> Result<String, Error> {
    let mut out = String::new();
    for c in key.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out
        .trim_end_matches('-')
        .chars()
        .take(MAX_KEY_CHARS)
        .collect();
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "key {:?} has no letters or digits",
            key.chars().take(32).collect::<String>()
        )));
    }
    Ok(out)
}

/// The entries that match `query` (any of its words, in the key or the text), best
/// first, of `kind` if given; with no query, the latest. At most [`RECALLED`].
pub fn recall<'a>(entries: &'a [Entry], query: Option<&str>, kind: Option<&str>) -> Vec<&'a Entry> {
    let words: Vec<String> = query.map(words).unwrap_or_default();
    let mut scored: Vec<(usize, &Entry)> = entries
        .iter()
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .map(|e| {
            let have = words_of(e);
            (words.iter().filter(|w| have.contains(w)).count(), e)
        })
        .filter(|(score, _)| words.is_empty() || *score > 0)
        .collect();
    scored.sort_by(|(a, x), (b, y)| {
        b.cmp(a)
            .then_with(|| y.updated_at_ms.cmp(&x.updated_at_ms))
            .then_with(|| x.key.cmp(&y.key))
    });
    scored.into_iter().take(RECALLED).map(|(_, e)| e).collect()
}

/// Lower-case words of two letters or more, without a plural `s`, so "colours"
/// finds "colour".
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(|w| {
            let w = w.to_lowercase();
            match w.strip_suffix('s') {
                Some(stem) if stem.chars().count() >= 3 => stem.to_owned(),
                _ => w,
            }
        })
        .collect()
}

fn words_of(entry: &Entry) -> Vec<String> {
    let mut all = words(&entry.key);
    all.extend(words(&entry.text));
    all
}

/// One line per entry, as a model or a person reads them.
pub fn lines(entries: &[&Entry]) -> String {
    entries
        .iter()
        .map(|e| {
            let text: String = e.text.split_whitespace().collect::<Vec<_>>().join(" ");
            format!("- [{}] {}: {}", e.kind, e.key, text)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, kind: &str, text: &str, at: i64) -> Entry {
        Entry {
            key: key.into(),
            kind: kind.into(),
            text: text.into(),
            updated_at_ms: at,
            run_id: String::new(),
        }
    }

    #[test]
    fn keys_are_words_joined_by_dashes() {
        assert_eq!(normalise("Favourite Colour!").unwrap(), "favourite-colour");
        assert_eq!(normalise("  a..b  ").unwrap(), "a-b");
        assert!(normalise("!!!").is_err());
        assert_eq!(normalise(&"x".repeat(100)).unwrap().len(), MAX_KEY_CHARS);
        // Nothing that could reach another owner's subject.
        assert_eq!(
            normalise("*.>").map_err(|e| e.to_string()).unwrap_err(),
            "key \"*.>\" has no letters or digits"
        );
        assert_eq!(normalise("a.b.>").unwrap(), "a-b");
    }

    #[test]
    fn recall_finds_by_words_best_first_then_newest() {
        let all = vec![
            entry(
                "favourite-colour",
                "preference",
                "Their favourite colour is teal",
                1,
            ),
            entry("dentist", "todo", "Call the dentist on Monday", 2),
            entry("alice", "person", "Alice likes the colour red", 3),
        ];
        let found = recall(&all, Some("What colours do they like?"), None);
        assert_eq!(
            found.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["alice", "favourite-colour"]
        );
        let found = recall(&all, Some("favourite colour"), None);
        assert_eq!(found[0].key, "favourite-colour");
        assert_eq!(recall(&all, Some("colour"), Some("person")).len(), 1);
        assert_eq!(recall(&all, Some("holiday"), None).len(), 0);
        // No query: the latest first.
        assert_eq!(recall(&all, None, None)[0].key, "alice");
    }

    proptest::proptest! {
        #[test]
        fn a_normalised_key_is_one_subject_token(key in ".{0,200}") {
            if let Ok(k) = normalise(&key) {
                proptest::prop_assert!(!k.is_empty() && k.len() <= MAX_KEY_CHARS);
                proptest::prop_assert!(k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            }
        }
    }
}
