//! The hash chain: each event's hash covers the previous event's hash and the event's
//! own encoding, so editing, dropping or reordering any event breaks every later link.

use dispatch_bus::RunId;
use dispatch_proto::run::v1::RunEvent;
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::{Error, ErrorKind, StoredEvent};

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
/// `prev_hash` linking to its predecessor, every `hash` recomputing.
pub fn verify(
    run_id: &RunId,
    before: Option<&RunEvent>,
    events: &[StoredEvent],
) -> Result<(), Error> {
    let (mut seq, mut prev) = match before {
        Some(event) => (event.seq, event.hash.clone()),
        None => (0, GENESIS.to_vec()),
    };
    for stored in events {
        let event = &stored.event;
        let fail = |reason: &str| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "run {run_id}: event seq {} fails verification: {reason}",
                    event.seq
                ),
            )
        };
        if event.seq != seq + 1 {
            return Err(fail(&format!("expected seq {}", seq + 1)));
        }
        if event.prev_hash != prev {
            return Err(fail("prev_hash does not link to the previous event"));
        }
        if event.hash != hash(event) {
            return Err(fail("hash does not match the event's content"));
        }
        if !event.signature.is_empty() || !event.signer.is_empty() {
            crate::seal::verify(&event.signer, &event.hash, &event.signature)
                .map_err(|e| fail(&e))?;
        }
        seq = event.seq;
        prev = event.hash.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::{LeafStarted, run_event::Body};
    use proptest::prelude::*;

    use super::*;

    fn chain(run_id: &RunId, titles: &[String]) -> Vec<StoredEvent> {
        let mut prev = GENESIS.to_vec();
        titles
            .iter()
            .enumerate()
            .map(|(i, title)| {
                let mut event = RunEvent {
                    event_id: format!("e{i}"),
                    run_id: run_id.to_string(),
                    seq: i as u64 + 1,
                    prev_hash: prev.clone(),
                    body: Some(Body::LeafStarted(LeafStarted {
                        leaf: i as u32,
                        title: title.clone(),
                    })),
                    ..Default::default()
                };
                event.hash = hash(&event).to_vec();
                prev = event.hash.clone();
                StoredEvent {
                    event,
                    stream_seq: i as u64 + 10,
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn an_untouched_chain_verifies(titles in proptest::collection::vec(".{0,20}", 1..20)) {
            let run_id = RunId::new();
            prop_assert!(verify(&run_id, None, &chain(&run_id, &titles)).is_ok());
        }

        #[test]
        fn any_edit_is_caught_at_its_sequence(
            titles in proptest::collection::vec("[a-z]{1,8}", 2..20),
            victim in any::<prop::sample::Index>(),
        ) {
            let run_id = RunId::new();
            let mut events = chain(&run_id, &titles);
            let i = victim.index(events.len());
            if let Some(Body::LeafStarted(leaf)) = events[i].event.body.as_mut() {
                leaf.title.push('!');
            }
            let err = verify(&run_id, None, &events).unwrap_err();
            prop_assert_eq!(err.kind(), ErrorKind::Corrupt);
            let expected = format!("event seq {} fails", i + 1);
            prop_assert!(err.to_string().contains(&expected), "{}", err);
        }
    }

    #[test]
    fn dropping_an_event_is_a_gap() {
        let run_id = RunId::new();
        let mut events = chain(&run_id, &["a".into(), "b".into(), "c".into()]);
        events.remove(1);
        let err = verify(&run_id, None, &events).unwrap_err();
        assert!(err.to_string().contains("expected seq 2"), "{err}");
    }
}
