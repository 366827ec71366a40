//! Identifiers that end up inside subjects, validated once at the edge so that no
//! user input can add a token or a wildcard to a subject.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("run id {0:?} is not a UUID")]
    BadRunId(String),
    #[error("conversation id {0:?} must be 1 to 128 characters of letters, digits, '-' or '_'")]
    BadConversation(String),
}

/// A run's id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(uuid::Uuid);

impl RunId {
    /// How many characters a short id has.
    pub const SHORT_LEN: usize = 12;

    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// The id people see and type: its last 12 hex digits. A UUIDv7 begins with a
    /// millisecond timestamp, so runs started together share a prefix; its tail is
    /// random bits and the low bits of a counter that starts at a random value each
    /// millisecond, so they do not share a tail.
    pub fn short(&self) -> String {
        short_id(&self.to_string()).to_owned()
    }
}

/// The short form of a run id written out in full: its last 12 characters, the random
/// tail. Anything that is not a hyphenated UUID is returned as it is.
pub fn short_id(run_id: &str) -> &str {
    match run_id.len() {
        // 36 bytes need not be 36 characters: a string from elsewhere is not cut
        // inside a character.
        36 => run_id.get(36 - RunId::SHORT_LEN..).unwrap_or(run_id),
        _ => run_id,
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for RunId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the canonical hyphenated lowercase form, so one run has one subject.
        match uuid::Uuid::try_parse(s) {
            Ok(id) if id.hyphenated().to_string() == s => Ok(Self(id)),
            _ => Err(IdError::BadRunId(s.to_owned())),
        }
    }
}

/// The conversation a run reports back to. Used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConversationId(String);

impl ConversationId {
    /// The conversation used when an origin names none.
    pub const DEFAULT: &'static str = "default";

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ConversationId {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ConversationId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::BadConversation(s.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_id_is_the_tail_of_a_run_id_and_never_cuts_a_character() {
        let id = "0197a0c8-0000-7000-8000-0123456789ab";
        assert_eq!(short_id(id), "0123456789ab");
        // 36 bytes, with a character across the cut: returned whole, not a panic.
        let odd = format!("{}é{}", "x".repeat(23), "y".repeat(11));
        assert_eq!(odd.len(), 36);
        assert_eq!(short_id(&odd), odd);
        assert_eq!(short_id("abc"), "abc");
    }

    #[test]
    fn run_ids_parse_only_canonical_uuids() {
        let id = RunId::new();
        assert_eq!(id.to_string().parse::<RunId>(), Ok(id));
        assert!("nope".parse::<RunId>().is_err());
        assert!(id.to_string().to_uppercase().parse::<RunId>().is_err());
        assert!("dispatch.run.*".parse::<RunId>().is_err());
    }

    #[test]
    fn short_ids_are_the_random_tail() {
        let a = RunId::new();
        let b = RunId::new();
        assert_eq!(a.short().len(), RunId::SHORT_LEN);
        assert!(a.to_string().ends_with(&a.short()));
        assert!(!a.short().contains('-'));
        assert_ne!(a.short(), b.short());
        assert_eq!(short_id("not-an-id"), "not-an-id");
    }

    #[test]
    fn conversation_ids_cannot_carry_subject_syntax() {
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(129)] {
            assert!(bad.parse::<ConversationId>().is_err(), "{bad:?} accepted");
        }
        assert!("chat_7-A".parse::<ConversationId>().is_ok());
    }
}
