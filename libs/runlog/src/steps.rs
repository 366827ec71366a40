//! `_steps.jsonl`: a run's log exported one event per line, checkable offline.
//!
//! Each line carries the event's readable fields (kind, body as JSON, hashes in hex)
//! and the exact protobuf encoding (`event`, hex), so [`verify`] can recompute every
//! hash and the seal, and also catch an edit to the readable fields alone.

use dispatch_proto::run::v1::{RunEvent, run_event::Body};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::{StoredEvent, chain, seal};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub seq: u64,
    pub event_id: String,
    pub run_id: String,
    pub kind: String,
    pub time_unix_ms: i64,
    /// The role that wrote the event (`dispatcher`, `policy`, `connectors`): the last
    /// token of the subject it was stored on, and the event's own `role`.
    pub role: String,
    pub writer: String,
    pub causation_id: String,
    pub prev_hash: String,
    pub hash: String,
    pub body: serde_json::Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
    /// The event exactly as stored (protobuf, hex).
    pub event: String,
}

impl Step {
    fn of(event: &RunEvent) -> Self {
        Self {
            seq: event.seq,
            event_id: event.event_id.clone(),
            run_id: event.run_id.clone(),
            kind: event.body.as_ref().map_or("", Body::kind).to_owned(),
            time_unix_ms: event.time_unix_ms,
            role: crate::roles::writer_of(event.role())
                .map_or("", |w| w.token())
                .to_owned(),
            writer: event.writer.clone(),
            causation_id: event.causation_id.clone(),
            prev_hash: hex::encode(&event.prev_hash),
            hash: hex::encode(&event.hash),
            body: serde_json::to_value(&event.body).expect("events serialize"),
            signer: hex::encode(&event.signer),
            signature: hex::encode(&event.signature),
            event: hex::encode(event.encode_to_vec()),
        }
    }
}

/// The whole log as JSON lines.
pub fn export(events: &[StoredEvent]) -> String {
    let mut out = String::new();
    for stored in events {
        out.push_str(&serde_json::to_string(&Step::of(&stored.event)).expect("steps serialize"));
        out.push('\n');
    }
    out
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub run_id: String,
    pub events: u64,
    /// The key that sealed the trail, hex.
    pub signer: String,
}

/// Why a trail failed: the first sequence that does not check out, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("verification failed at seq {seq}: {reason}")]
pub struct Failed {
    pub seq: u64,
    pub reason: String,
}

/// Checks an exported trail: every line decodes, matches its readable fields, links to
/// the one before, recomputes its hash, and was written by a role that may write it
/// (the event's own `role`, which the seal covers: the subjects it was stored on are
/// not in the file, and the sealer checked them); the last is the terminal event,
/// sealed by a key `trust` accepts, and nothing follows it.
pub fn verify(text: &str, trust: &crate::seal::Trust) -> Result<Verified, Failed> {
    let mut previous: Option<RunEvent> = None;
    for (i, line) in text.lines().enumerate() {
        let seq = i as u64 + 1;
        let fail = |reason: String| Failed { seq, reason };
        let step: Step = serde_json::from_str(line)
            .map_err(|e| fail(format!("line {seq} is not a step: {e}")))?;
        let bytes =
            hex::decode(&step.event).map_err(|e| fail(format!("event bytes are not hex: {e}")))?;
        let event = RunEvent::decode(bytes.as_slice())
            .map_err(|e| fail(format!("event bytes do not decode: {e}")))?;
        if event.seq != seq {
            return Err(fail(format!("holds event seq {}, out of order", event.seq)));
        }
        if Step::of(&event) != step {
            return Err(fail(
                "the readable fields do not match the stored event".into(),
            ));
        }
        if previous
            .as_ref()
            .is_some_and(|before| before.run_id != event.run_id)
        {
            return Err(fail("belongs to another run".into()));
        }
        if previous.as_ref().is_some_and(chain::is_terminal) {
            return Err(fail("follows the run's terminal event".into()));
        }
        let stored_as = crate::roles::writer_of(event.role())
            .ok_or_else(|| fail("names no writer role".into()))?;
        let stored = [StoredEvent {
            event: event.clone(),
            stream_seq: seq,
            stored_as,
        }];
        chain::verify(
            &event
                .run_id
                .parse()
                .map_err(|_| fail("bad run id".into()))?,
            previous.as_ref(),
            &stored,
            trust,
        )
        .map_err(|e| fail(e.to_string()))?;
        previous = Some(event);
    }
    let last = previous.ok_or(Failed {
        seq: 0,
        reason: "the trail is empty".into(),
    })?;
    let seal_fail = |reason: &str| Failed {
        seq: last.seq,
        reason: reason.into(),
    };
    if !matches!(last.body, Some(Body::RunFinished(_))) {
        return Err(seal_fail(
            "the trail does not end with the run's terminal event",
        ));
    }
    // The chain check above refused an unsealed or untrusted terminal event already.
    debug_assert!(seal::verify(&last.signer, &last.hash, &last.signature).is_ok());
    Ok(Verified {
        run_id: last.run_id.clone(),
        events: last.seq,
        signer: hex::encode(&last.signer),
    })
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::{LeafStarted, RunFinished, RunRequested, WriterRole};

    use super::*;
    use crate::seal::{Sealer, Trust};

    fn sealed_trail(sealer: &Sealer) -> String {
        let run_id = dispatch_bus::RunId::new().to_string();
        let mut events: Vec<RunEvent> = (1..=4u64)
            .map(|seq| RunEvent {
                event_id: format!("e{seq}"),
                run_id: run_id.clone(),
                role: WriterRole::Dispatcher as i32,
                body: Some(if seq == 4 {
                    Body::RunFinished(RunFinished {
                        status: 1,
                        reason: "workflow finished".into(),
                        ..Default::default()
                    })
                } else if seq == 1 {
                    Body::RunRequested(RunRequested {
                        goal: "leaf 1".into(),
                        ..Default::default()
                    })
                } else {
                    Body::LeafStarted(LeafStarted {
                        leaf: seq as u32,
                        title: format!("leaf {seq}"),
                    })
                }),
                ..Default::default()
            })
            .collect();
        chain::link(&mut events, Some(sealer));
        let stored: Vec<StoredEvent> = events
            .into_iter()
            .map(|event| StoredEvent {
                stream_seq: event.seq,
                event,
                stored_as: dispatch_bus::subject::LogWriter::Dispatcher,
            })
            .collect();
        export(&stored)
    }

    fn sealer() -> Sealer {
        let dir = std::env::temp_dir().join(format!(
            "dispatch-seal-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let sealer = Sealer::load_or_create(&dir.join("seal.ed25519")).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        sealer
    }

    #[test]
    fn an_untouched_trail_verifies() {
        let sealer = sealer();
        let trail = sealed_trail(&sealer);
        let verified = verify(&trail, &Trust::keys([sealer.public_key()])).unwrap();
        assert_eq!(verified.events, 4);
        assert_eq!(verified.signer, sealer.public_hex());
    }

    #[test]
    fn any_edited_line_names_its_sequence() {
        let sealer = sealer();
        let trust = Trust::keys([sealer.public_key()]);
        let trail = sealed_trail(&sealer);
        let lines: Vec<&str> = trail.lines().collect();
        let edits: [(usize, &str, &str); 4] = [
            (1, "leaf 2", "leaf X"),              // a readable field
            (2, "\"leaf\":3", "\"leaf\":7"),      // a readable number
            (3, "workflow finished", "all good"), // the terminal event
            (0, "\"seq\":1", "\"seq\":9"),
        ];
        for (line, from, to) in edits {
            let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            assert!(edited[line].contains(from), "{from} not in line {line}");
            edited[line] = edited[line].replacen(from, to, 1);
            let err = verify(&(edited.join("\n") + "\n"), &trust).unwrap_err();
            assert_eq!(err.seq, line as u64 + 1, "{err}");
        }
        // Re-encoding a tampered event consistently still breaks the chain or the seal.
        let other = super::tests::sealer();
        let err = verify(&trail, &Trust::keys([other.public_key()])).unwrap_err();
        assert_eq!(err.seq, 4);
        assert!(err.reason.contains("not a trusted key"), "{err}");
        let truncated: String = lines[..3].iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(verify(&truncated, &trust).unwrap_err().seq, 3);
    }
}
