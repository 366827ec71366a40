//! Chat turns: a message to a conversation runs the agent loop over the conversation
//! (no plan), one turn at a time per conversation.
//!
//! A turn takes its place in its conversation's chain (`TurnOrdered`, the head kept in
//! `KV_DISPATCH_TURNS` by compare-and-set) and runs only once the turn before it has
//! ended. What a message does when a turn of its conversation is still running is its
//! [`Busy`] mode.

use std::fmt;
use std::str::FromStr;

/// The kind of a chat turn's run.
pub const KIND: &str = "turn";

/// What a message does when a turn of its conversation is still running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Busy {
    /// It waits: its turn runs when the one before it has ended.
    #[default]
    Queue,
    /// The running turn is asked to stop; this one runs after it, with both messages.
    Interrupt,
    /// It is refused: its run ends `blocked` without running (ingress answers 409 when
    /// it can tell at the door).
    Reject,
}

impl Busy {
    pub const WORDS: [&'static str; 3] = ["queue", "interrupt", "reject"];

    pub fn word(self) -> &'static str {
        match self {
            Busy::Queue => "queue",
            Busy::Interrupt => "interrupt",
            Busy::Reject => "reject",
        }
    }

    /// The mode a run's request records: empty means [`Busy::Queue`]; anything unknown
    /// is queued too (a bad mode is refused at every door before it is stored).
    pub fn of_recorded(word: &str) -> Self {
        word.parse().unwrap_or_default()
    }
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

impl FromStr for Busy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "queue" => Ok(Busy::Queue),
            "interrupt" => Ok(Busy::Interrupt),
            "reject" => Ok(Busy::Reject),
            other => Err(format!(
                "busy must be one of {} (got {:?})",
                Self::WORDS.join(", "),
                crate::slice_chars(other, 32)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_mode_is_one_of_three_words() {
        for word in Busy::WORDS {
            assert_eq!(word.parse::<Busy>().unwrap().word(), word);
        }
        assert_eq!("".parse::<Busy>(), Ok(Busy::Queue));
        let err = "later".parse::<Busy>().unwrap_err();
        assert!(err.contains("queue, interrupt, reject"), "{err}");
        assert_eq!(Busy::of_recorded("later"), Busy::Queue);
    }
}
