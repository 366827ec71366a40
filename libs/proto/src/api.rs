//! The front doors' contract: what people see of a run, the queries about runs and
//! their answers, and the gRPC service. HTTP, gRPC and the CLI use these types; the
//! ledger answers the queries as JSON on `dispatch.query.*`.

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/dispatch.api.v1.rs"));

    impl TaskStatus {
        pub fn is_terminal(self) -> bool {
            matches!(
                self,
                TaskStatus::Done | TaskStatus::Blocked | TaskStatus::Stopped | TaskStatus::Corrupt
            )
        }

        /// The lowercase word people see, as in JSON.
        pub fn word(self) -> &'static str {
            match self {
                TaskStatus::Unspecified => "unspecified",
                TaskStatus::Queued => "queued",
                TaskStatus::Doing => "doing",
                TaskStatus::Waiting => "waiting",
                TaskStatus::Done => "done",
                TaskStatus::Blocked => "blocked",
                TaskStatus::Stopped => "stopped",
                TaskStatus::Corrupt => "corrupt",
            }
        }

        /// The org keyword in TASKS.org.
        pub fn keyword(self) -> &'static str {
            match self {
                TaskStatus::Unspecified | TaskStatus::Queued => "TODO",
                TaskStatus::Doing => "DOING",
                TaskStatus::Waiting => "WAITING",
                TaskStatus::Done => "DONE",
                TaskStatus::Blocked => "BLOCKED",
                TaskStatus::Stopped => "STOPPED",
                TaskStatus::Corrupt => "CORRUPT",
            }
        }
    }
}

/// The encoded descriptors of every `.proto` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Runs in a page when a query names no limit.
pub const DEFAULT_PAGE: u32 = 100;
/// The most runs one page may hold. Pages are also cut by size, so that no answer can
/// outgrow a NATS message, whatever the runs hold.
pub const MAX_PAGE: u32 = 1000;
/// The most feedback notes one tasks query drains.
pub const MAX_NOTES: u32 = 200;

/// Why a query could not be answered. In JSON: `{"code": "not_found", "message": …}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[serde(tag = "code", content = "message", rename_all = "snake_case")]
pub enum QueryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    /// The log does not verify.
    #[error("{0}")]
    Corrupt(String),
}

/// Every answer on `dispatch.query.*`: the answer or why there is none.
pub type Reply<T> = Result<T, QueryError>;

/// How the generated types read and write JSON where the field's protobuf type is not
/// what a JSON reader wants (named by the build script's field attributes).
pub(crate) mod json {
    /// An enum field (an `i32` in the generated struct) as the enum's word.
    macro_rules! enumeration {
        ($module:ident, $enum:ty) => {
            pub mod $module {
                use serde::{Deserialize, Deserializer, Serialize, Serializer};

                pub fn serialize<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                    <$enum>::try_from(*value).unwrap_or_default().serialize(s)
                }

                pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                    Ok(<$enum>::deserialize(d)? as i32)
                }
            }
        };
    }

    enumeration!(task_status, crate::api::v1::TaskStatus);
    enumeration!(trail_outcome, crate::api::v1::TrailOutcome);
    enumeration!(missed_fires, crate::api::v1::MissedFires);
    enumeration!(overlap, crate::api::v1::Overlap);

    /// JSON texts as the JSON values they hold.
    pub mod raw {
        use serde::ser::{Error as _, SerializeSeq};
        use serde::{Deserialize, Deserializer, Serializer};
        use serde_json::value::RawValue;

        pub fn serialize<S: Serializer>(texts: &[String], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(texts.len()))?;
            for text in texts {
                let value: &RawValue =
                    serde_json::from_str(text).map_err(|e| S::Error::custom(e.to_string()))?;
                seq.serialize_element(value)?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
            let values = Vec::<Box<RawValue>>::deserialize(d)?;
            Ok(values.into_iter().map(|v| v.get().to_owned()).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn a_view_reads_and_writes_the_json_people_see() {
        let view = RunView {
            run_id: "r".into(),
            status: TaskStatus::Done as i32,
            title: Some("t".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["status"], "done");
        assert_eq!(json["title"], "t");
        assert_eq!(json["summary"], serde_json::Value::Null);
        assert!(json.get("corrupt").is_none() && json.get("approvals").is_none());
        let back: RunView = serde_json::from_value(json).unwrap();
        assert_eq!(back, view);
        let bad = serde_json::from_str::<RunView>(r#"{"status": "finished"}"#);
        assert!(bad.is_err(), "an unknown status is an error, not a default");
    }

    #[test]
    fn chunks_are_objects_in_json_and_text_in_protobuf() {
        let run = TranscriptRun {
            chunks: vec![r#"{"type":"start"}"#.into(), r#"{"type":"finish"}"#.into()],
            ..Default::default()
        };
        let text = serde_json::to_string(&run).unwrap();
        assert!(
            text.contains(r#""chunks":[{"type":"start"},{"type":"finish"}]"#),
            "{text}"
        );
        let back: TranscriptRun = serde_json::from_str(&text).unwrap();
        assert_eq!(back.chunks, run.chunks);
    }

    #[test]
    fn a_query_with_a_misspelt_field_is_refused() {
        let bad = serde_json::from_str::<ListRunsRequest>(r#"{"al": true}"#);
        assert!(bad.unwrap_err().to_string().contains("unknown field"));
        let ok: ListRunsRequest = serde_json::from_str(r#"{"all": true}"#).unwrap();
        assert!(ok.all && ok.limit.is_none());
    }
}
