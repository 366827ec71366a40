//! The bus: everything Dispatch's services need to talk over NATS and JetStream.
//!
//! It owns the subject names ([`subject`]), the streams and their declarations
//! ([`streams`]), connecting with a useful error when NATS is not there, and the one
//! primitive every append goes through: publish with `Nats-Msg-Id` (dedupe),
//! `Nats-Expected-Last-Subject-Sequence` (optimistic concurrency), whose lost race is a
//! matchable [`ErrorKind::Conflict`], and the publishing span's W3C trace context
//! ([`trace`]); the one way single messages are read back ([`reads`]), so a cluster
//! answers as one server would; and the work-queue loop ([`work`]). It does not know
//! what an event means: the run log (`dispatch-runlog`) and the services do.

pub mod answer;
pub mod ask;
pub mod auth;
pub mod catalogue;
pub mod durability;
pub mod health;
pub mod ids;
pub mod metrics;
pub mod reads;
pub mod streams;
pub mod subject;
pub mod trace;
pub mod work;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;

pub use async_nats;
pub use auth::{Credentials, Identity};
pub use ids::{ConversationId, IdError, RunId, short_id};

/// What went wrong, for callers that must branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// NATS could not be reached at all.
    Unreachable,
    /// An optimistic append lost: the subject's last sequence was not the expected one.
    Conflict,
    /// A request got no answer in time, or nobody listens on the subject.
    NoResponders,
    /// The server refused the credentials, or the identity may not do this.
    Denied,
    /// A NATS URL that is not one (`--nats-url`, `NATS_URL`).
    BadUrl,
    /// Anything else the server or client reported.
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn other(context: &str, err: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Other, format!("{context}: {err}"))
    }
}

/// A connected bus: the core client and a JetStream context. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// How many times the connection has been lost so far.
    lost: tokio::sync::watch::Receiver<u64>,
}

/// The outcome of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Stream sequence the message is stored at.
    pub stream_seq: u64,
    /// True when the server already had a message with this id and dropped ours.
    pub duplicate: bool,
}

impl Bus {
    /// Connects to `url` as `identity` and declares every stream Dispatch uses
    /// (idempotently; an existing stream is left as it is).
    ///
    /// The first connection attempt fails fast with [`ErrorKind::Unreachable`] (or
    /// [`ErrorKind::Denied`] when the server refuses the credentials) and a message
    /// saying what to do; after that the client reconnects on its own.
    pub async fn connect(
        url: &str,
        identity: Identity,
        credentials: &Credentials,
    ) -> Result<Self, Error> {
        let servers = server_list(url)?;
        let (lost_tx, lost) = tokio::sync::watch::channel(0u64);
        let lost_tx = std::sync::Arc::new(lost_tx);
        let options = async_nats::ConnectOptions::new()
            .name(format!("dispatch-{}", identity.name()))
            .custom_inbox_prefix(identity.inbox_prefix())
            .connection_timeout(Duration::from_secs(3))
            .max_reconnects(None)
            // Said once per outage, not per attempt; a permission the server refuses is
            // logged by the process it refuses.
            .event_callback(move |event| {
                let lost_tx = lost_tx.clone();
                async move {
                    match event {
                        async_nats::Event::ServerError(error) => {
                            tracing::warn!(error = %error, "NATS server error");
                        }
                        async_nats::Event::Disconnected => {
                            lost_tx.send_modify(|n| *n += 1);
                            tracing::warn!("lost NATS; reconnecting");
                        }
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        _ => {}
                    }
                }
            });
        let client = credentials
            .apply(options)
            .await?
            .connect(servers)
            .await
            .map_err(|e| match e.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => Error::new(
                    ErrorKind::Denied,
                    format!(
                        "NATS at {url} refused {} ({e}); a stack started by `dispatch up` \
                         keeps each identity's nkey seed in .dispatch/auth/: run in that \
                         workspace, or pass --nats-nkey / --nats-creds",
                        identity.name()
                    ),
                ),
                _ => unreachable_error(url, e),
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        let bus = Self { client, js, lost };
        streams::ensure(&bus).await?;
        Ok(bus)
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Changes each time the connection to NATS is lost (the count so far). A reader
    /// that must not miss a message it was not acknowledged for (an ordered consumer
    /// over a buffer that a restarted server may have lost) ends when it changes, and
    /// its client resumes from its cursor.
    pub fn connection_losses(&self) -> tokio::sync::watch::Receiver<u64> {
        self.lost.clone()
    }

    /// Publishes `payload` to a stream subject and waits for the server's ack.
    ///
    /// `msg_id` becomes `Nats-Msg-Id`, so a retry inside the stream's duplicate window is
    /// stored once. With `expected_last_subject_seq`, the append only succeeds if the last
    /// message on `subject` is at that stream sequence (0: the subject is empty);
    /// otherwise it fails with [`ErrorKind::Conflict`].
    pub async fn append(
        &self,
        subject: subject::Subject,
        msg_id: &str,
        expected_last_subject_seq: Option<u64>,
        payload: Bytes,
    ) -> Result<Appended, Error> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        if let Some(seq) = expected_last_subject_seq {
            headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, seq.to_string().as_str());
        }
        self.store(subject, headers, payload).await
    }

    /// Like [`Self::append`], with the expected sequence checked against the last
    /// message on any subject `over` matches (a wildcard: every subject of one run's
    /// log), not only on `subject`: writers on sibling subjects keep one order, and of
    /// two appends after the same message exactly one is stored.
    pub async fn append_over(
        &self,
        subject: subject::Subject,
        msg_id: &str,
        expected_last_seq: u64,
        over: &str,
        payload: Bytes,
    ) -> Result<Appended, Error> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert(
            EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected_last_seq.to_string().as_str(),
        );
        headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, over);
        self.store(subject, headers, payload).await
    }

    async fn store(
        &self,
        subject: subject::Subject,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Appended, Error> {
        trace::inject(&mut headers);
        // A clustered stream answers "duplicate message id is in process" while another
        // publish of this very message is being replicated (two copies storing the same
        // command at once): asked again a moment later, it says duplicate or stores it.
        let mut in_process = 0;
        let ack = loop {
            let published = match self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match published {
                Ok(ack) => break ack,
                Err(e) if in_process < IN_PROCESS_RETRIES && e.to_string().contains("10158") => {
                    in_process += 1;
                    tokio::time::sleep(Duration::from_millis(20 * in_process)).await;
                }
                Err(e) => return Err(publish_error(e)),
            }
        };
        Ok(Appended {
            stream_seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Sends a protobuf request on a core subject and decodes the protobuf reply.
    pub async fn request_proto<Q, R>(
        &self,
        subject: subject::Subject,
        query: &Q,
        timeout: Duration,
    ) -> Result<R, Error>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let name = subject.as_str().to_owned();
        let reply = self
            .request(subject, query.encode_to_vec().into(), timeout)
            .await?;
        R::decode(reply.payload.as_ref())
            .map_err(|e| Error::other(&format!("decode reply on {name}"), e))
    }

    async fn request(
        &self,
        subject: subject::Subject,
        body: Bytes,
        timeout: Duration,
    ) -> Result<async_nats::Message, Error> {
        let name = subject.as_str().to_owned();
        tokio::time::timeout(timeout, self.client.request(subject, body))
            .await
            .map_err(|_| Error::new(ErrorKind::NoResponders, format!("no reply on {name}")))?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders
                | async_nats::RequestErrorKind::TimedOut => {
                    Error::new(ErrorKind::NoResponders, format!("nobody answers on {name}"))
                }
                _ => Error::other("request", e),
            })
    }

    /// Sends a JSON request on a core subject and decodes the JSON reply.
    pub async fn request_json<Q, R>(
        &self,
        subject: subject::Subject,
        query: &Q,
        timeout: Duration,
    ) -> Result<R, Error>
    where
        Q: serde::Serialize,
        R: serde::de::DeserializeOwned,
    {
        let body = serde_json::to_vec(query).map_err(|e| Error::other("encode request", e))?;
        let name = subject.as_str().to_owned();
        let reply = self.request(subject, body.into(), timeout).await?;
        serde_json::from_slice(&reply.payload)
            .map_err(|e| Error::other(&format!("decode reply on {name}"), e))
    }
}

/// The servers a NATS URL names: one URL, or several separated by commas (as compose
/// and `NATS_URL` write a cluster's). A malformed one is named as such.
pub fn server_list(url: &str) -> Result<Vec<async_nats::ServerAddr>, Error> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>().map_err(|e| {
                Error::new(
                    ErrorKind::BadUrl,
                    format!(
                        "bad NATS URL {u:?} ({e}); say nats://host:4222, or several \
                         separated by commas"
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    if servers.is_empty() {
        return Err(Error::new(
            ErrorKind::BadUrl,
            "no NATS URL given; say nats://host:4222",
        ));
    }
    Ok(servers)
}

fn unreachable_error(url: &str, cause: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unreachable,
        format!(
            "cannot reach NATS at {url} ({cause}); start the local stack with `dispatch up` \
             (or `cargo xtask up`), or point NATS_URL at a running nats-server with JetStream"
        ),
    )
}

/// How long a JetStream request (a publish's acknowledgement, a read, an info) waits
/// for its answer. Left to async-nats, a publish waits 5 s and any other request 10 s;
/// when a node dies, requests sent to it or to a stream still electing its next leader
/// get no answer at all, so every such wait is added to the outage a run sees. Healthy
/// answers come in well under a millisecond here, and every caller retries (appends are
/// deduplicated by `Nats-Msg-Id`), so a short wait costs a retry, not a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// How often an append that meets its own message still in process is tried again
/// (20 ms more each time: about 4 s in all).
const IN_PROCESS_RETRIES: u64 = 20;

fn publish_error(err: jetstream::context::PublishError) -> Error {
    match err.kind() {
        PublishErrorKind::WrongLastSequence => Error::new(
            ErrorKind::Conflict,
            "append lost the race: the subject moved past the expected sequence",
        ),
        PublishErrorKind::BrokenPipe => {
            Error::new(ErrorKind::Unreachable, "connection to NATS lost")
        }
        _ => Error::other("publish", err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_list_is_taken_and_a_bad_url_is_named() {
        assert_eq!(
            server_list("nats://a:4222, nats://b:4223").unwrap().len(),
            2
        );
        assert_eq!(server_list("nats://127.0.0.1:4222").unwrap().len(), 1);
        for bad in ["nats://a:42x2", " , ", ""] {
            let e = server_list(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::BadUrl, "{bad:?}");
        }
        assert!(
            server_list("nats://a:42x2")
                .unwrap_err()
                .to_string()
                .contains("bad NATS URL")
        );
    }
}
