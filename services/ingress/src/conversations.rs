//! Conversations over HTTP.
//!
//! `GET /v1/conversations/{id}/stream`: the conversation's chunks as server-sent
//! events, in the AI SDK's UI message stream protocol (`x-vercel-ai-ui-message-stream:
//! v1`). Each event's `id` is its cursor, `<sequence>-<run id>`: the chunk's sequence
//! in the conversation stream and the run it belongs to. A client that reconnects with
//! `Last-Event-ID` gets exactly the chunks after it and then the live ones, from one
//! ordered consumer, so there is no gap between replay and live and no chunk twice.
//! When the buffer no longer holds its place (the runs it was reading finished and
//! were purged, or it was away longer than the buffer keeps chunks), it first gets
//! those runs, from the cursor's run on, from their transcripts, and then what the
//! buffer holds of later events. `?from=N` starts at sequence `N`; with neither, the
//! stream starts at the oldest chunk buffered.
//!
//! `GET /v1/conversations/{id}/transcript`: the conversation's runs, newest first, each
//! as the user's goal and the assistant's message (AI SDK `UIMessage`s), built from
//! the runs' logs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse as _, Response};
use dispatch_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull};
use dispatch_bus::reads::Reader;
use dispatch_bus::{ConversationId, streams, subject};
use dispatch_proto::api::v1::{GetTranscriptRequest, GetTranscriptResponse, TranscriptRun};
use dispatch_proto::api::{QueryError, Reply};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::{App, QUERY_TIMEOUT, error, respond};

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Most transcript pages a resuming stream reads before it goes on with the buffer.
const MAX_RESUME_PAGES: usize = 10;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// The sequence to start at (inclusive); `Last-Event-ID` wins over it.
    #[serde(default)]
    from: Option<u64>,
}

/// Where a client was: a chunk's sequence, and its run when the client knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    seq: u64,
    run: Option<String>,
}

impl Cursor {
    /// A cursor before the first chunk of `run`.
    pub(crate) fn of_run(run: &str) -> Self {
        Self {
            seq: 0,
            run: Some(run.to_owned()),
        }
    }

    /// Whether `message` is a chunk of the cursor's run (true for a cursor that names
    /// none).
    fn names_run_of(
        &self,
        message: &dispatch_bus::async_nats::jetstream::message::StreamMessage,
    ) -> bool {
        self.run.as_deref().is_none_or(|run| {
            message
                .headers
                .get(subject::conv::RUN_HEADER)
                .is_some_and(|value| value.as_str() == run)
        })
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (seq, run) = match text.split_once('-') {
            Some((seq, run)) => (seq, Some(run)),
            None => (text, None),
        };
        let run = match run {
            Some(run) if run.parse::<dispatch_bus::RunId>().is_ok() => Some(run.to_owned()),
            Some(_) => return None,
            None => None,
        };
        Some(Self {
            seq: seq.parse().ok()?,
            run,
        })
    }
}

/// One chunk read from the conversation stream.
pub(crate) struct Chunk {
    /// Its cursor: `<sequence>-<run id>`.
    pub id: String,
    /// The run it belongs to.
    pub run: Option<String>,
    /// The chunk, JSON.
    pub data: String,
}

/// A conversation's chunks from a client's position on: what the transcripts give
/// (when the buffer no longer holds the position), then the buffer's, live.
pub(crate) type Chunks = futures::stream::BoxStream<'static, Chunk>;

/// Where a reader starts: after a cursor, at a sequence, or at the oldest chunk
/// buffered, or only at what comes next.
pub(crate) enum Start {
    After(Cursor),
    At(u64),
    Oldest,
    Next,
}

/// The chunks of `conversation` from `start` on. A cursor the buffer no longer holds
/// is resumed from the transcripts of the runs from its run on.
pub(crate) async fn chunks(
    app: &App,
    conversation: &ConversationId,
    start: Start,
) -> Result<Chunks, Response> {
    let to = subject::conv::of(conversation);
    let buffer = app
        .bus
        .jetstream()
        .get_stream(streams::CONVERSATIONS)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut resumed = Vec::new();
    let mut served = HashMap::new();
    let deliver = match start {
        Start::After(cursor) => match Reader::new(buffer.clone()).at(cursor.seq).await {
            // The chunk the client read last, still buffered: what follows it is too.
            Ok(Some(message))
                if message.subject.as_str() == to.as_str() && cursor.names_run_of(&message) =>
            {
                DeliverPolicy::ByStartSequence {
                    start_sequence: cursor.seq.saturating_add(1),
                }
            }
            Ok(Some(message)) if message.subject.as_str() != to.as_str() => {
                return Err(bad_cursor("the cursor is not a chunk of this conversation"));
            }
            // Purged from the buffer, or in a buffer made since (this sequence holds
            // another run's chunk), or unreadable now: the transcripts have it.
            Ok(_) | Err(_) => match &cursor.run {
                Some(run) => {
                    let id = format!("{}-{run}", cursor.seq);
                    for transcript in transcripts_since(app, conversation, run).await? {
                        served.insert(transcript.run_id.clone(), transcript.last_seq);
                        resumed.extend(transcript.chunks.iter().map(|chunk| Chunk {
                            id: id.clone(),
                            run: Some(transcript.run_id.clone()),
                            data: chunk.clone(),
                        }));
                    }
                    DeliverPolicy::All
                }
                None => DeliverPolicy::ByStartSequence {
                    start_sequence: cursor.seq.saturating_add(1),
                },
            },
        },
        Start::At(0) | Start::Oldest => DeliverPolicy::All,
        Start::At(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        Start::Next => DeliverPolicy::New,
    };
    let live = buffer
        .create_consumer(pull::OrderedConfig {
            filter_subject: to.to_string(),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?
        .messages()
        .await
        .map_err(|e| unavailable(&e))?;
    // A stream made again (its storage changed) deletes the consumer; the client
    // resumes from its cursor.
    let live = live.take_while(|message| {
        std::future::ready(!matches!(message, Err(e)
            if e.kind() == pull::OrderedErrorKind::ConsumerDeleted))
    });
    let live = live.filter_map(move |message| {
        let chunk = message.ok().and_then(|message| {
            let seq = message.info().ok()?.stream_sequence;
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let run = header(subject::conv::RUN_HEADER);
            let run_seq: u64 = header(subject::conv::RUN_SEQ_HEADER)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            // Already given from the run's transcript.
            if let Some(run) = &run
                && served.get(run).is_some_and(|&last| run_seq <= last)
            {
                return None;
            }
            let data = std::str::from_utf8(&message.payload).ok()?.to_owned();
            let id = match &run {
                Some(run) => format!("{seq}-{run}"),
                None => seq.to_string(),
            };
            Some(Chunk { id, run, data })
        });
        async move { chunk }
    });
    let stopping = app.stopping.clone();
    // A lost connection may have lost buffered chunks this reader had not taken yet (a
    // single server keeps the buffer in memory): the stream ends there, and the client
    // resumes from its cursor, exactly, from the transcripts if need be.
    let mut losses = app.bus.connection_losses();
    losses.borrow_and_update();
    let lost = async move {
        let _ = losses.changed().await;
    };
    let ended = futures::future::select(Box::pin(stopping.cancelled_owned()), Box::pin(lost));
    Ok(futures::stream::iter(resumed)
        .chain(live)
        .take_until(ended)
        .boxed())
}

/// `chunks` as a server-sent event response in the UI message stream protocol.
pub(crate) fn sse(chunks: impl futures::Stream<Item = Event> + Send + 'static) -> Response {
    let mut response = event_stream(chunks);
    response.headers_mut().insert(
        "x-vercel-ai-ui-message-stream",
        HeaderValue::from_static("v1"),
    );
    response
}

/// `events` as a server-sent event response: kept alive while idle, cached and
/// buffered by no proxy.
fn event_stream(events: impl futures::Stream<Item = Event> + Send + 'static) -> Response {
    let mut response = Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Direct mode: the chunks of one run as the response, ending with its `finish` and
/// the protocol's `[DONE]`.
pub(crate) fn one_run(chunks: Chunks, run_id: String) -> Response {
    let ours = chunks
        .filter(move |chunk| std::future::ready(chunk.run.as_deref() == Some(run_id.as_str())));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = finished.clone();
    let events = until(ours, move |chunk: &Chunk| {
        let last = serde_json::from_str::<serde_json::Value>(&chunk.data)
            .is_ok_and(|c| c["type"] == "finish");
        if last {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        last
    })
    .map(event)
    // `[DONE]` only after the run's `finish`: a stream cut short (ingress stopping)
    // must not look complete.
    .chain(
        futures::stream::once(async move {
            finished
                .load(std::sync::atomic::Ordering::Relaxed)
                .then(|| Event::default().data("[DONE]"))
        })
        .filter_map(std::future::ready),
    );
    sse(events)
}

/// `items` up to and including the first that `last` says is the last; the stream
/// ends right after it, without waiting for another.
pub(crate) fn until<T: Send + 'static>(
    items: impl futures::Stream<Item = T> + Send + 'static,
    last: impl Fn(&T) -> bool + Send + 'static,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(
        (Box::pin(items), last, false),
        |(mut items, last, done)| async move {
            if done {
                return None;
            }
            let item = items.next().await?;
            let done = last(&item);
            Some((item, (items, last, done)))
        },
    )
}

fn event(chunk: Chunk) -> Event {
    Event::default().id(chunk.id).data(chunk.data)
}

/// `GET /v1/conversations/{id}/stream`.
#[utoipa::path(get, path = "/v1/conversations/{id}/stream", tag = "conversations",
    params(("id" = String, Path, description = "The conversation"), StreamParams,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this chunk: the id of the last event read")),
    responses(
        (status = 200, description = "The conversation's chunks (UI message stream protocol), then live ones", content_type = "text/event-stream"),
        (status = 400, description = "A bad conversation id, cursor or query", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The conversation stream or the ledger cannot be read", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn stream(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    params: Result<Query<StreamParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let Ok(conversation) = id.parse::<ConversationId>() else {
        return bad_conversation();
    };
    let start = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None => match params.from {
            Some(seq) => Start::At(seq),
            None => Start::Oldest,
        },
        Some(Ok(text)) => match Cursor::parse(text) {
            Some(cursor) => Start::After(cursor),
            None => return bad_cursor("Last-Event-ID is the id of an event this stream sent"),
        },
        Some(Err(_)) => return bad_cursor("Last-Event-ID is not text"),
    };
    match chunks(&app, &conversation, start).await {
        Ok(chunks) => sse(chunks.map(event)),
        Err(response) => response,
    }
}

/// What a WebSocket client sends first: where to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hello {
    /// The `id` of the last chunk it read.
    #[serde(default)]
    resume: Option<String>,
    /// A sequence to start at.
    #[serde(default)]
    from: Option<u64>,
}

/// How long a WebSocket client has to say where it starts.
const HELLO_WAIT: Duration = Duration::from_secs(10);
/// The largest message a WebSocket client may send (it only ever says where it starts).
const MAX_CLIENT_MESSAGE: usize = 4 * 1024;

/// `GET /v1/conversations/{id}/ws`: the same chunks over a WebSocket. The client's
/// first message says where to start — `{"resume": "<id>"}`, `{"from": N}` or `{}` —
/// and each server message is `{"id": "<cursor>", "chunk": {...}}`. A bad first
/// message closes the socket with 1008 and the reason.
pub(crate) async fn websocket(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    slot: Option<axum::Extension<crate::serve::ConnectionSlot>>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    use axum::extract::ws::{CloseFrame, Message, close_code};
    let Ok(conversation) = id.parse::<ConversationId>() else {
        return bad_conversation();
    };
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |mut socket| async move {
            // The socket holds its connection's slot until it ends: hyper lets the
            // connection go once it is upgraded.
            let _slot = slot;
            let close = |reason: String| {
                Message::Close(Some(CloseFrame {
                    code: close_code::POLICY,
                    // A close frame's reason is at most 123 bytes.
                    reason: dispatch_runlog::slice_bytes(&reason, 120).to_owned().into(),
                }))
            };
            let stopping = app.stopping.clone();
            let first = tokio::select! {
                _ = stopping.cancelled() => return,
                first = tokio::time::timeout(HELLO_WAIT, socket.recv()) => first,
            };
            let hello = match first {
                Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<Hello>(&text)
                    .map_err(|e| format!("the first message says where to start: {e}")),
                Ok(Some(Ok(_))) => Err("the first message is JSON text".to_owned()),
                Ok(_) => return,
                Err(_) => Err(format!("nothing said within {HELLO_WAIT:?}")),
            };
            let start = match hello {
                Ok(Hello {
                    resume: Some(cursor),
                    ..
                }) => match Cursor::parse(&cursor) {
                    Some(cursor) => Ok(Start::After(cursor)),
                    None => Err("resume is the id of a chunk this stream sent".to_owned()),
                },
                Ok(Hello { from: Some(seq), .. }) => Ok(Start::At(seq)),
                Ok(_) => Ok(Start::Oldest),
                Err(e) => Err(e),
            };
            let start = match start {
                Ok(start) => start,
                Err(why) => {
                    let _ = socket.send(close(why)).await;
                    return;
                }
            };
            let mut chunks = match chunks(&app, &conversation, start).await {
                Ok(chunks) => chunks,
                Err(_) => {
                    let _ = socket
                        .send(close("the conversation cannot be read now".into()))
                        .await;
                    return;
                }
            };
            loop {
                tokio::select! {
                    chunk = chunks.next() => {
                        let Some(chunk) = chunk else { break };
                        let text = format!("{{\"id\":{},\"chunk\":{}}}", serde_json::json!(chunk.id), chunk.data);
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            return;
                        }
                    }
                    incoming = socket.recv() => match incoming {
                        // Pings are answered by axum; anything else is ignored.
                        Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                        Some(Ok(_)) => {}
                    },
                }
            }
            let _ = socket.send(Message::Close(None)).await;
        })
}

/// The conversation's runs from `run` (included) to the newest, oldest first, with
/// their transcripts.
async fn transcripts_since(
    app: &App,
    conversation: &ConversationId,
    run: &str,
) -> Result<Vec<TranscriptRun>, Response> {
    let mut runs = Vec::new();
    let mut after = None;
    for _ in 0..MAX_RESUME_PAGES {
        let query = GetTranscriptRequest {
            conversation_id: conversation.to_string(),
            limit: None,
            after: after.take(),
            since: Some(run.to_owned()),
        };
        let reply: Result<Reply<GetTranscriptResponse>, _> = app
            .bus
            .request_json(subject::query::transcript(), &query, QUERY_TIMEOUT)
            .await;
        match reply {
            Ok(Ok(page)) => {
                runs.extend(page.runs);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            other => return Err(respond(other)),
        }
    }
    runs.reverse();
    Ok(runs)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TranscriptParams {
    /// At most this many runs (default 50, at most 500).
    #[serde(default)]
    limit: Option<u32>,
    /// Start after this run: the `next` of the previous page.
    #[serde(default)]
    after: Option<String>,
}

/// A page of a conversation's transcript.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TranscriptPage {
    /// Newest first.
    runs: Vec<TranscriptEntry>,
    /// Where the next (older) page starts.
    next: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TranscriptEntry {
    run_id: String,
    status: dispatch_proto::api::v1::TaskStatus,
    /// The goal as the user's message and the run as the assistant's (AI SDK
    /// `UIMessage`s).
    #[schema(value_type = Vec<Object>)]
    messages: Vec<serde_json::Value>,
    /// Part of the run was left out to keep the answer bounded; `dispatch logs` has
    /// all of it.
    cut: bool,
}

/// `GET /v1/conversations/{id}/transcript`.
#[utoipa::path(get, path = "/v1/conversations/{id}/transcript", tag = "conversations",
    params(("id" = String, Path, description = "The conversation"), TranscriptParams),
    responses(
        (status = 200, description = "A page of the conversation's runs, newest first, as messages", body = TranscriptPage),
        (status = 400, description = "A bad conversation id or query", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The ledger cannot answer", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn transcript(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    params: Result<Query<TranscriptParams>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    if id.parse::<ConversationId>().is_err() {
        return bad_conversation();
    }
    let query = GetTranscriptRequest {
        conversation_id: id.clone(),
        limit: params.limit,
        after: params.after,
        since: None,
    };
    let reply: Result<Reply<GetTranscriptResponse>, _> = app
        .bus
        .request_json(subject::query::transcript(), &query, QUERY_TIMEOUT)
        .await;
    let page = match reply {
        Ok(Ok(page)) => page,
        other => return respond(other),
    };
    let next = page.next.clone();
    let body = TranscriptPage {
        runs: page
            .runs
            .into_iter()
            .map(|run| TranscriptEntry {
                messages: {
                    let chunks: Vec<serde_json::Value> = run
                        .chunks
                        .iter()
                        .filter_map(|chunk| serde_json::from_str(chunk).ok())
                        .collect();
                    dispatch_chunks::messages(&run.run_id, &run.goal, &chunks)
                },
                status: run.status(),
                run_id: run.run_id,
                cut: run.cut,
            })
            .collect(),
        next: next.clone(),
    };
    let mut response = respond::<TranscriptPage>(Ok(Ok::<_, QueryError>(body)));
    if let Some(next) = next {
        let mut link = format!("/v1/conversations/{id}/transcript?after={next}");
        if let Some(limit) = params.limit {
            link.push_str(&format!("&limit={limit}"));
        }
        if let Ok(value) = HeaderValue::from_str(&format!("<{link}>; rel=\"next\"")) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

fn bad_conversation() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_conversation",
        "a conversation id is 1-128 of A-Z, a-z, 0-9, '-' and '_'",
    )
}

fn bad_cursor(why: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_cursor", why.to_owned())
}

fn unavailable(e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "cannot read a conversation stream");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "stream_unavailable",
        "the conversation stream cannot be read now; try again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_a_sequence_and_maybe_a_run() {
        let run = "01a20247-24bf-71b6-bfd6-ef59cd22c09a";
        assert_eq!(
            Cursor::parse(&format!("412-{run}")),
            Some(Cursor {
                seq: 412,
                run: Some(run.into())
            })
        );
        assert_eq!(Cursor::parse(" 7 "), Some(Cursor { seq: 7, run: None }));
        for bad in ["", "yesterday", "-1", "12-not-a-run", "1.5"] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
    }
}

/// Why a run's log cannot be followed.
pub(crate) enum RunLogError {
    NoRun,
    Unavailable(String),
}

/// `run_id`'s events after sequence `after`, verified one by one as they are read (the
/// chain, who wrote each, the seal), live until its terminal event (included) or until
/// ingress stops. An event that does not verify ends the stream before it.
pub(crate) async fn run_log(
    app: &App,
    run_id: dispatch_bus::RunId,
    after: u64,
) -> Result<futures::stream::BoxStream<'static, dispatch_proto::run::v1::RunEvent>, RunLogError> {
    let unavailable = |e: &dyn std::fmt::Display| RunLogError::Unavailable(e.to_string());
    let runs = app
        .bus
        .jetstream()
        .get_stream(streams::RUNS)
        .await
        .map_err(|e| unavailable(&e))?;
    let log = subject::run_log(&run_id);
    match Reader::new(runs.clone()).next(&log, 1).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(RunLogError::NoRun),
        Err(e) => return Err(unavailable(&e)),
    }
    let messages = runs
        .create_consumer(pull::OrderedConfig {
            filter_subject: log,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?
        .messages()
        .await
        .map_err(|e| unavailable(&e))?;
    let trust = app.trust.clone();
    let events = messages
        .scan(None, move |before: &mut Option<dispatch_proto::run::v1::RunEvent>, message| {
            let checked = message.ok().and_then(|message| {
                let stream_seq = message.info().ok()?.stream_sequence;
                let stored = dispatch_runlog::stored_at(
                    &run_id,
                    &message.subject,
                    stream_seq,
                    &message.payload,
                )
                .ok()?;
                let fresh = [stored];
                let record =
                    dispatch_runlog::chain::verify(&run_id, before.as_ref(), &fresh, &trust);
                if let Err(e) = &record {
                    tracing::warn!(%run_id, error = %e, "a run's log does not verify; its event stream ends");
                }
                (record.ok()? == 1).then(|| {
                    let [stored] = fresh;
                    stored.event
                })
            });
            *before = checked.clone();
            std::future::ready(checked.map(Some))
        })
        .filter_map(move |event| std::future::ready(event.filter(|e| e.seq > after)));
    let stopping = app.stopping.clone();
    Ok(until(events, |event| {
        matches!(
            event.body,
            Some(dispatch_proto::run::v1::run_event::Body::RunFinished(_))
        )
    })
    .take_until(async move { stopping.cancelled_owned().await })
    .boxed())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Start after the event with this sequence; `Last-Event-ID` wins over it.
    #[serde(default)]
    after: Option<u64>,
}

/// `GET /v1/runs/{id}/events`: one run's log as server-sent events, each event's `id`
/// its sequence in the run, its `event` its kind and its `data` the event as JSON;
/// live until the run's terminal event. `Last-Event-ID` (or `?after=`) resumes.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs",
    params(("id" = String, Path, description = "The run's id"), EventsParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "The run's events, then live ones until it ends", content_type = "text/event-stream"),
        (status = 400, description = "A bad run id, cursor or query", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The run log cannot be read", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn run_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    params: Result<Query<EventsParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let Ok(run_id) = id.parse::<dispatch_bus::RunId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_run_id",
            "a run id is a UUID in its hyphenated form",
        );
    };
    let after = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None => params.after.unwrap_or(0),
        Some(Ok(text)) => match text.trim().parse::<u64>() {
            Ok(seq) => seq,
            Err(_) => return bad_cursor("Last-Event-ID is the id of an event this stream sent"),
        },
        Some(Err(_)) => return bad_cursor("Last-Event-ID is not text"),
    };
    let events = match run_log(&app, run_id, after).await {
        Ok(events) => events,
        Err(RunLogError::NoRun) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no run {run_id}"),
            );
        }
        Err(RunLogError::Unavailable(e)) => return unavailable(&e),
    };
    let events = events.map(|event| {
        let kind = event.body.as_ref().map_or("event", |b| b.kind());
        let data = serde_json::to_string(&event).unwrap_or_default();
        Event::default()
            .id(event.seq.to_string())
            .event(kind)
            .data(data)
    });
    event_stream(events)
}
