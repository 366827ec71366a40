//! Where the policy document lives: the stream `DISPATCH_POLICY`, one message per
//! version on `dispatch.policy.document`. The last message is the document in force;
//! the ones before it are its history and the audit of every change (who, when, what
//! it replaced). A new version is appended with the last version's stream sequence as
//! the expected one, so two changes made at once cannot both take the same number:
//! one wins, the other is told and may try again on top of it.
//!
//! A message on the subject that is not a usable version (it does not decode, its
//! document does not parse, or it does not match its hash) is damage, whoever wrote it:
//! it is skipped with an alarm (a log line and `dispatch_policy_damaged_versions_total`),
//! the newest good version before it stays in force, `dispatch policy history` lists
//! it, and the next change is appended after it, superseding it. One bad record can
//! neither stop the policy service nor lock the document.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Document;
use dispatch_bus::async_nats::jetstream;
use dispatch_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use dispatch_bus::{Bus, ErrorKind, streams, subject};
use dispatch_proto::policy::v1::PolicyVersion;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A version of the document, decoded.
#[derive(Debug, Clone)]
pub struct InForce {
    pub record: PolicyVersion,
    pub document: Document,
    /// Its stream sequence: what the next version expects.
    pub stream_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error("the policy store: {0}")]
    Store(String),
    /// Another change was made first; nothing was written.
    #[error("another change to the policy was made at the same time; nothing changed, try again")]
    Conflict,
}

fn store_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("{what}: {e}"))
}

/// A message on the policy subject that is not a usable version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub stream_seq: u64,
    /// Why it is not a version.
    pub reason: String,
}

/// One message of the policy's history.
#[derive(Debug, Clone)]
pub enum Entry {
    Version(InForce),
    Damaged(Damaged),
}

/// The document in force and where the policy's subject ends.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// The newest version that checks out; `None` if none was ever set.
    pub in_force: Option<InForce>,
    /// The stream sequence of the subject's last message, good or not: what the next
    /// version is appended after.
    pub head: u64,
    /// The damaged messages after the version in force, newest first.
    pub skipped: Vec<Damaged>,
}

/// The most messages [`current`] looks back over for a good version: the stream keeps
/// no more than this on the subject.
const LOOK_BACK: u64 = streams::POLICY_HISTORY as u64;

/// Decodes one stored version. A record that does not decode, or whose document does
/// not parse or does not match its hash, is not a version: it is reported, never used.
fn decode(payload: &[u8], stream_seq: u64) -> Result<InForce, Damaged> {
    let damaged = |reason: String| Damaged { stream_seq, reason };
    let record = PolicyVersion::decode(payload)
        .map_err(|e| damaged(format!("not a policy version: {e}")))?;
    let document = Document::parse(&record.document_json)
        .map_err(|e| damaged(format!("version {}: {e}", record.version)))?;
    if document.hash() != record.hash {
        return Err(damaged(format!(
            "version {} does not match its hash",
            record.version
        )));
    }
    Ok(InForce {
        record,
        document,
        stream_seq,
    })
}

/// Says, once per message seen, that a damaged one is skipped.
pub fn alarm(damaged: &Damaged) {
    tracing::error!(
        stream_seq = damaged.stream_seq,
        reason = damaged.reason,
        "skipping a damaged policy version; the last good version stays in force"
    );
    static DAMAGED: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    DAMAGED
        .get_or_init(|| {
            opentelemetry::global::meter(dispatch_bus::metrics::METER)
                .u64_counter("dispatch.policy.damaged_versions")
                .with_description("Messages on the policy subject that are not usable versions")
                .build()
        })
        .add(1, &[]);
}

async fn stream(bus: &Bus) -> Result<jetstream::stream::Stream, Error> {
    bus.jetstream()
        .get_stream(streams::POLICY)
        .await
        .map_err(|e| store_error("open", e))
}

/// The newest version's message, if there is one.
async fn last(
    stream: &jetstream::stream::Stream,
) -> Result<Option<jetstream::message::StreamMessage>, Error> {
    dispatch_bus::reads::Reader::new(stream.clone())
        .last(subject::POLICY_DOCUMENT)
        .await
        .map_err(|e| store_error("read", e))
}

/// The document in force: the newest stored version that checks out, looking back past
/// damaged messages (each said, see [`alarm`]), and where the subject ends.
pub async fn current(bus: &Bus) -> Result<Current, Error> {
    let stream = stream(bus).await?;
    let Some(newest) = last(&stream).await? else {
        return Ok(Current::default());
    };
    let reader = dispatch_bus::reads::Reader::new(stream);
    let head = newest.sequence;
    let mut current = Current {
        head,
        ..Default::default()
    };
    let mut message = Some(newest);
    // The stream holds nothing but this subject, so the message before is one back.
    while let Some(found) = message {
        match decode(&found.payload, found.sequence) {
            Ok(version) => {
                current.in_force = Some(version);
                break;
            }
            Err(damaged) => {
                alarm(&damaged);
                current.skipped.push(damaged);
            }
        }
        let before = found.sequence.saturating_sub(1);
        if before == 0 || head - before >= LOOK_BACK {
            break;
        }
        message = reader
            .at(before)
            .await
            .map_err(|e| store_error("read", e))?
            .filter(|m| m.subject.as_str() == subject::POLICY_DOCUMENT);
    }
    Ok(current)
}

/// Appends `document` as the next version after the one in force in `current` (none:
/// the first), after whatever the subject holds (damaged messages included, which it
/// supersedes), unless it is the document in force already with nothing damaged after
/// it. Returns the version now in force and whether it is new.
pub async fn set(
    bus: &Bus,
    current: &Current,
    document: &Document,
    changed_by: &str,
    note: &str,
) -> Result<(InForce, bool), Error> {
    let hash = document.hash();
    let previous = current.in_force.as_ref();
    if let Some(previous) = previous
        && previous.record.hash == hash
        && current.skipped.is_empty()
    {
        return Ok((previous.clone(), false));
    }
    let record = PolicyVersion {
        version: previous.map_or(1, |p| p.record.version + 1),
        hash: hash.clone(),
        previous_hash: previous.map(|p| p.record.hash.clone()).unwrap_or_default(),
        changed_by: changed_by.to_owned(),
        changed_at_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        document_json: document.to_json(),
        note: note.to_owned(),
    };
    let expected = current.head;
    // The message id names the version and its content: a retry of this very append
    // is dropped as a duplicate, and a different change for the same number is not.
    let msg_id = format!("policy-v{}-{hash}", record.version);
    match bus
        .append(
            subject::policy_document(),
            &msg_id,
            Some(expected),
            record.encode_to_vec().into(),
        )
        .await
    {
        Ok(appended) => Ok((
            InForce {
                record,
                document: document.clone(),
                stream_seq: appended.stream_seq,
            },
            true,
        )),
        Err(e) if e.kind() == ErrorKind::Conflict => Err(Error::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Every message kept on the policy subject, versions and damaged ones, oldest first,
/// at most `limit` (the newest ones).
pub async fn history(bus: &Bus, limit: usize) -> Result<Vec<Entry>, Error> {
    let stream = stream(bus).await?;
    let Some(last) = last(&stream).await?.map(|m| m.sequence) else {
        return Ok(Vec::new());
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject::POLICY_DOCUMENT.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| store_error("read", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| store_error("read", e))?;
    let mut versions = std::collections::VecDeque::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .map_err(|_| Error::Store("reading the history timed out".into()))?
    {
        let message = message.map_err(|e| store_error("read", e))?;
        let seq = message
            .info()
            .map_err(|e| store_error("read", e))?
            .stream_sequence;
        versions.push_back(match decode(&message.payload, seq) {
            Ok(version) => Entry::Version(version),
            Err(damaged) => Entry::Damaged(damaged),
        });
        if versions.len() > limit {
            versions.pop_front();
        }
        if seq >= last {
            break;
        }
    }
    Ok(versions.into())
}

/// Follows the document in force: the receiver holds the newest version this copy has
/// seen, from the stream's last message on, and changes whenever a version is added.
pub fn follow(
    bus: &Bus,
    first: InForce,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<InForce>> {
    let (tx, rx) = watch::channel(Arc::new(first));
    let bus = bus.clone();
    tokio::spawn(async move {
        loop {
            let after = tx.borrow().stream_seq;
            let followed = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = follow_from(&bus, after, &tx) => result,
            };
            if let Err(e) = followed {
                tracing::warn!(error = %e, "lost the policy document's stream; following again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    rx
}

async fn follow_from(bus: &Bus, after: u64, tx: &watch::Sender<Arc<InForce>>) -> Result<(), Error> {
    let stream = bus
        .jetstream()
        .get_stream(streams::POLICY)
        .await
        .map_err(|e| store_error("open", e))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject::POLICY_DOCUMENT.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| store_error("follow", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| store_error("follow", e))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| store_error("follow", e))?;
        let seq = message
            .info()
            .map_err(|e| store_error("follow", e))?
            .stream_sequence;
        match decode(&message.payload, seq) {
            Ok(version) => {
                tracing::info!(
                    version = version.record.version,
                    hash = version.record.hash,
                    changed_by = version.record.changed_by,
                    "policy version in force"
                );
                tx.send_replace(Arc::new(version));
            }
            Err(damaged) => alarm(&damaged),
        }
    }
    Err(Error::Store("the stream ended".into()))
}
