//! Reading single messages of a stream so that a cluster answers as one server would.
//!
//! A direct get (`$JS.API.DIRECT.GET`) is answered by whichever replica of the stream
//! takes the request, and nats-server lets a follower answer as soon as it is within 90%
//! of its leader. So on a replicated stream a direct get right after a write, or while a
//! node that came back catches up, can miss the newest messages: a reader would conclude
//! that a run never requested a call it did request, and drop the command about it.
//!
//! [`Reader`] keeps the cheap direct get wherever its answer cannot be stale and asks
//! the stream's leader (`$JS.API.STREAM.MSG.GET`, which only the leader answers)
//! wherever it could be: the newest message on a subject always comes from the leader,
//! and "no such message" from a follower is asked of the leader again before it is
//! believed. A message that is there never changes, so any replica holding one gives the
//! right answer. On a stream of one replica every answer is the leader's, and nothing is
//! asked twice.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    DirectGetError, DirectGetErrorKind, RawMessageError, RawMessageErrorKind, Stream,
};

use crate::{Error, ErrorKind};

/// Single-message reads of one stream, consistent with its leader. Cheap to clone.
#[derive(Clone)]
pub struct Reader {
    stream: Stream,
    replicated: bool,
}

impl Reader {
    /// Reads `stream`, asking its leader where a follower may be behind. Whether the
    /// stream is replicated is taken from the info it was opened with.
    pub fn new(stream: Stream) -> Self {
        let replicated = stream.cached_info().config.num_replicas > 1;
        Self { stream, replicated }
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The newest message stored on `subject`, if any.
    pub async fn last(&self, subject: &str) -> Result<Option<StreamMessage>, Error> {
        if !self.replicated {
            return direct(self.stream.direct_get_last_for_subject(subject).await);
        }
        leader(self.stream.get_last_raw_message_by_subject(subject).await)
    }

    /// The message stored at stream sequence `seq`, if any.
    pub async fn at(&self, seq: u64) -> Result<Option<StreamMessage>, Error> {
        match direct(self.stream.direct_get(seq).await)? {
            None if self.replicated => leader(self.stream.get_raw_message(seq).await),
            found => Ok(found),
        }
    }

    /// The first message stored on `subject` at stream sequence `from` or after it.
    pub async fn next(&self, subject: &str, from: u64) -> Result<Option<StreamMessage>, Error> {
        let from = from.max(1);
        match direct(
            self.stream
                .direct_get_next_for_subject(subject, Some(from))
                .await,
        )? {
            None if self.replicated => leader(
                self.stream
                    .get_first_raw_message_by_subject(subject, from)
                    .await,
            ),
            found => Ok(found),
        }
    }
}

fn direct(got: Result<StreamMessage, DirectGetError>) -> Result<Option<StreamMessage>, Error> {
    match got {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_error(e)),
    }
}

fn leader(got: Result<StreamMessage, RawMessageError>) -> Result<Option<StreamMessage>, Error> {
    match got {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(read_error(e)),
    }
}

fn read_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Other, e.to_string())
}
