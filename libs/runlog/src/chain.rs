//! The hash chain: each event's hash covers the previous event's hash and the event's
//! own encoding, so editing, dropping or reordering any event breaks every later link.

use dispatch_bus::RunId;
use dispatch_bus::subject::LogWriter;
use dispatch_proto::run::v1::RunEvent;
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::seal::Trust;
use crate::{Error, ErrorKind, StoredEvent};
use dispatch_proto::run::v1::run_event::Body;

/// `prev_hash` of a run's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// The hash of `event`: SHA-256 over its `prev_hash` and its encoding with `hash` and
/// `signature` empty.
pub fn hash(event: &RunEvent) -> [u8; 32] {
    let mut unsealed = event.clone();
    unsealed.hash.clear();
    unsealed.signature.clear();
    let mut digest = Sha256::new();
    digest.update(&event.prev_hash);
    digest.update(unsealed.encode_to_vec());
    digest.finalize().into()
}

/// Checks `events` as a contiguous stretch of `run_id`'s log following `before`
/// (or starting the log when `before` is `None`): sequences without gaps, every
/// `prev_hash` linking to its predecessor, every `hash` recomputing, every event written
/// by the role its kind belongs to, on that role's subject ([`crate::roles`]), and the
/// terminal event sealed by a key `trust` accepts.
///
/// Returns how many of `events` are the run's record: all of them, or those up to and
/// including the terminal event. Whatever was stored after a valid seal is outside the
/// record; it is not checked, and the caller leaves it out (and may say it is there).
pub fn verify(
    run_id: &RunId,
    before: Option<&RunEvent>,
    events: &[StoredEvent],
    trust: &Trust,
) -> Result<usize, Error> {
    if before.is_some_and(is_terminal) {
        return Ok(0);
    }
    let (mut seq, mut prev) = match before {
        Some(event) => (event.seq, event.hash.clone()),
        None => (0, GENESIS.to_vec()),
    };
    for (i, stored) in events.iter().enumerate() {
        let event = &stored.event;
        let fail = |reason: &str| corrupt(run_id, event.seq, reason);
        if event.seq != seq + 1 {
            return Err(fail(&format!("expected seq {}", seq + 1)));
        }
        if event.prev_hash != prev {
            return Err(fail("prev_hash does not link to the previous event"));
        }
        if event.hash != hash(event) {
            return Err(fail("hash does not match the event's content"));
        }
        check_link(event, Some(stored.stored_as), trust).map_err(|reason| fail(&reason))?;
        if is_terminal(event) {
            return Ok(i + 1);
        }
        seq = event.seq;
        prev = event.hash.clone();
    }
    Ok(events.len())
}

fn corrupt(run_id: &RunId, seq: u64, reason: &str) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("run {run_id}: event seq {seq} fails verification: {reason}"),
    )
}

/// Checks `events` as a contiguous stretch of `run_id`'s log that starts somewhere
/// inside it: like [`verify`], except that the first event's link to its predecessor,
/// which the caller does not hold, is taken as it is.
pub fn verify_from(run_id: &RunId, events: &[StoredEvent], trust: &Trust) -> Result<usize, Error> {
    let Some((first, rest)) = events.split_first() else {
        return Ok(0);
    };
    let event = &first.event;
    if event.hash != hash(event) {
        return Err(corrupt(
            run_id,
            event.seq,
            "hash does not match the event's content",
        ));
    }
    check_link(event, Some(first.stored_as), trust)
        .map_err(|reason| corrupt(run_id, event.seq, &reason))?;
    Ok(1 + verify(run_id, Some(event), rest, trust)?)
}

/// Fills in the envelope of `events` so they form a valid log from seq 1: `seq`,
/// `prev_hash`, `hash`, and, on a terminal event when a `sealer` is given, `signer` and
/// `signature`. For tools and tests that write whole logs without a [`RunHandle`]
/// (which does this one append at a time).
///
/// [`RunHandle`]: crate::RunHandle
pub fn link(events: &mut [RunEvent], sealer: Option<&crate::seal::Sealer>) {
    let mut prev = GENESIS.to_vec();
    for (i, event) in events.iter_mut().enumerate() {
        event.seq = i as u64 + 1;
        event.prev_hash = prev;
        let sealer = sealer.filter(|_| is_terminal(event));
        event.signer = sealer.map_or_else(Vec::new, |s| s.public_key().to_vec());
        event.signature.clear();
        event.hash = hash(event).to_vec();
        if let Some(sealer) = sealer {
            event.signature = sealer.sign(&event.hash).to_vec();
        }
        prev = event.hash.clone();
    }
}

pub(crate) fn is_terminal(event: &RunEvent) -> bool {
    matches!(event.body, Some(Body::RunFinished(_)))
}

/// The rules one event must meet on its own: it was written by a role that may write
/// it, on that role's subject (`stored_as`; `None` for an exported trail, where the
/// event's own `role`, which the seal covers, is checked alone — see [`crate::roles`]),
/// the terminal event is sealed, and a seal is valid and by a trusted key.
pub fn check_link(
    event: &RunEvent,
    stored_as: Option<LogWriter>,
    trust: &Trust,
) -> Result<(), String> {
    crate::roles::check(event, stored_as)?;
    if is_terminal(event) && event.signature.is_empty() {
        return Err("the terminal event is not sealed".into());
    }
    if !event.signature.is_empty() || !event.signer.is_empty() {
        crate::seal::verify(&event.signer, &event.hash, &event.signature)?;
        if !trust.trusts(&event.signer) {
            return Err(format!(
                "sealed by {}, which is not a trusted key",
                hex::encode(&event.signer)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::{LeafStarted, RunFinished, RunRequested, WriterRole};
    use proptest::prelude::*;

    use super::*;

    /// A run's request (its goal the first title), then a leaf per other title, all by
    /// the dispatcher.
    fn chain(run_id: &RunId, titles: &[String]) -> Vec<StoredEvent> {
        let mut prev = GENESIS.to_vec();
        titles
            .iter()
            .enumerate()
            .map(|(i, title)| {
                let body = match i {
                    0 => Body::RunRequested(RunRequested {
                        goal: title.clone(),
                        ..Default::default()
                    }),
                    _ => Body::LeafStarted(LeafStarted {
                        leaf: i as u32,
                        title: title.clone(),
                    }),
                };
                let mut event = RunEvent {
                    event_id: format!("e{i}"),
                    run_id: run_id.to_string(),
                    seq: i as u64 + 1,
                    prev_hash: prev.clone(),
                    role: WriterRole::Dispatcher as i32,
                    body: Some(body),
                    ..Default::default()
                };
                event.hash = hash(&event).to_vec();
                prev = event.hash.clone();
                StoredEvent {
                    event,
                    stream_seq: i as u64 + 10,
                    stored_as: LogWriter::Dispatcher,
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn an_untouched_chain_verifies(titles in proptest::collection::vec(".{0,20}", 1..20)) {
            let run_id = RunId::new();
            prop_assert!(verify(&run_id, None, &chain(&run_id, &titles), &Trust::default()).is_ok());
        }

        #[test]
        fn any_edit_is_caught_at_its_sequence(
            titles in proptest::collection::vec("[a-z]{1,8}", 2..20),
            victim in any::<prop::sample::Index>(),
        ) {
            let run_id = RunId::new();
            let mut events = chain(&run_id, &titles);
            let i = victim.index(events.len());
            match events[i].event.body.as_mut() {
                Some(Body::LeafStarted(leaf)) => leaf.title.push('!'),
                Some(Body::RunRequested(r)) => r.goal.push('!'),
                _ => unreachable!("chain makes only these"),
            }
            let err = verify(&run_id, None, &events, &Trust::default()).unwrap_err();
            prop_assert_eq!(err.kind(), ErrorKind::Corrupt);
            let expected = format!("event seq {} fails", i + 1);
            prop_assert!(err.to_string().contains(&expected), "{}", err);
        }
    }

    /// Appends a terminal event to `events`, sealed by `key` if given.
    fn finish(events: &mut Vec<StoredEvent>, key: Option<&crate::seal::Sealer>) {
        let last = &events.last().unwrap().event;
        let mut event = RunEvent {
            event_id: "end".into(),
            run_id: last.run_id.clone(),
            seq: last.seq + 1,
            prev_hash: last.hash.clone(),
            role: WriterRole::Dispatcher as i32,
            body: Some(Body::RunFinished(RunFinished::default())),
            ..Default::default()
        };
        if let Some(key) = key {
            event.signer = key.public_key().to_vec();
        }
        event.hash = hash(&event).to_vec();
        if let Some(key) = key {
            event.signature = key.sign(&event.hash).to_vec();
        }
        let stream_seq = events.last().unwrap().stream_seq + 1;
        events.push(StoredEvent {
            event,
            stream_seq,
            stored_as: LogWriter::Dispatcher,
        });
    }

    #[test]
    fn a_seal_counts_only_by_a_trusted_key_and_ends_the_log() {
        let run_id = RunId::new();
        let dir = tempfile_dir();
        let ours = crate::seal::Sealer::load_or_create(&dir.join("ours")).unwrap();
        let theirs = crate::seal::Sealer::load_or_create(&dir.join("theirs")).unwrap();
        let trust = Trust::keys([ours.public_key()]);
        let titles = ["a".to_owned(), "b".to_owned()];

        let mut sealed = chain(&run_id, &titles);
        finish(&mut sealed, Some(&ours));
        assert_eq!(verify(&run_id, None, &sealed, &trust).unwrap(), 3);
        // The workspace key, found by its file, is trusted too.
        let workspace = Trust::default().with_workspace_key(&dir.join("ours"));
        assert!(verify(&run_id, None, &sealed, &workspace).is_ok());

        let mut forged = chain(&run_id, &titles);
        finish(&mut forged, Some(&theirs));
        let err = verify(&run_id, None, &forged, &trust).unwrap_err();
        assert!(
            err.to_string()
                .contains("seq 3 fails verification: sealed by"),
            "{err}"
        );
        assert!(err.to_string().contains("not a trusted key"), "{err}");

        let mut unsealed = chain(&run_id, &titles);
        finish(&mut unsealed, None);
        let err = verify(&run_id, None, &unsealed, &trust).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");

        // Anything after the seal is outside the record, even a well-linked event, and
        // spoils nothing: the record is the log up to the seal.
        let mut after = sealed.clone();
        let last = after.last().unwrap().event.clone();
        let mut extra = RunEvent {
            event_id: "late".into(),
            run_id: last.run_id.clone(),
            seq: last.seq + 1,
            prev_hash: last.hash.clone(),
            role: WriterRole::Dispatcher as i32,
            body: Some(Body::LeafStarted(LeafStarted::default())),
            ..Default::default()
        };
        extra.hash = hash(&extra).to_vec();
        after.push(StoredEvent {
            event: extra,
            stream_seq: 99,
            stored_as: LogWriter::Dispatcher,
        });
        assert_eq!(verify(&run_id, None, &after, &trust).unwrap(), 3);
        assert_eq!(
            verify(&run_id, Some(&after[2].event), &after[3..], &trust).unwrap(),
            0
        );
        // ...unless the seal itself is bad: then the log is corrupt where it is.
        let mut forged_after = forged.clone();
        forged_after.push(after[3].clone());
        assert!(verify(&run_id, None, &forged_after, &trust).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dispatch-chain-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_event_by_the_wrong_role_or_on_the_wrong_subject_is_caught() {
        let run_id = RunId::new();
        let trust = Trust::default();
        let mut events = chain(&run_id, &["goal".into(), "a".into()]);
        // Stored on the policy subject, though it names the dispatcher.
        events[1].stored_as = LogWriter::Policy;
        let err = verify(&run_id, None, &events, &trust).unwrap_err();
        assert!(err.to_string().contains("seq 2 fails"), "{err}");
        assert!(
            err.to_string().contains("stored on the policy subject"),
            "{err}"
        );
        // Named and stored as policy's, but a kind only the dispatcher writes.
        let mut events = chain(&run_id, &["goal".into(), "a".into()]);
        events[1].event.role = WriterRole::Policy as i32;
        events[1].event.hash = hash(&events[1].event).to_vec();
        events[1].stored_as = LogWriter::Policy;
        let err = verify(&run_id, None, &events, &trust).unwrap_err();
        assert!(
            err.to_string()
                .contains("leaf_started event written by policy"),
            "{err}"
        );
    }

    #[test]
    fn dropping_an_event_is_a_gap() {
        let run_id = RunId::new();
        let mut events = chain(&run_id, &["a".into(), "b".into(), "c".into()]);
        events.remove(1);
        let err = verify(&run_id, None, &events, &Trust::default()).unwrap_err();
        assert!(err.to_string().contains("expected seq 2"), "{err}");
    }
}
