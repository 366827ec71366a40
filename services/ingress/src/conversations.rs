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
use dispatch_bus::{ConversationId, streams, subject};
use dispatch_ledger::api::{QueryError, Reply, TranscriptQuery, TranscriptReply, TranscriptRun};
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
struct Cursor {
    seq: u64,
    run: Option<String>,
}

impl Cursor {
    fn parse(text: &str) -> Option<Self> {
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
    let cursor = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(text)) => match Cursor::parse(text) {
            Some(cursor) => Some(cursor),
            None => return bad_cursor("Last-Event-ID is the id of an event this stream sent"),
        },
        Some(Err(_)) => return bad_cursor("Last-Event-ID is not text"),
    };
    let to = subject::conv::of(&conversation);
    let js = app.bus.jetstream();
    let buffer = match js.get_stream(streams::CONVERSATIONS).await {
        Ok(buffer) => buffer,
        Err(e) => return unavailable(&e),
    };
    // Where the client was, and whether the buffer still holds it.
    let mut resumed = Vec::new();
    let mut served = HashMap::new();
    let deliver = match (&cursor, params.from) {
        (Some(cursor), _) => match buffer.direct_get(cursor.seq).await {
            Ok(message) if message.subject.as_str() == to.as_str() => {
                DeliverPolicy::ByStartSequence {
                    start_sequence: cursor.seq.saturating_add(1),
                }
            }
            Ok(_) => return bad_cursor("Last-Event-ID is not a chunk of this conversation"),
            Err(_) => match &cursor.run {
                // Gone: the runs from the cursor's on come from their transcripts.
                Some(run) => {
                    let runs = match transcripts_since(&app, &conversation, run).await {
                        Ok(runs) => runs,
                        Err(response) => return response,
                    };
                    let id = format!("{}-{run}", cursor.seq);
                    for transcript in runs {
                        served.insert(transcript.run_id.clone(), transcript.last_seq);
                        resumed.extend(transcript.chunks.iter().map(|chunk| {
                            Ok(Event::default().id(id.clone()).data(chunk.to_string()))
                        }));
                    }
                    DeliverPolicy::All
                }
                None => DeliverPolicy::ByStartSequence {
                    start_sequence: cursor.seq.saturating_add(1),
                },
            },
        },
        (None, Some(0) | None) => DeliverPolicy::All,
        (None, Some(seq)) => DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
    };
    let consumer = buffer
        .create_consumer(pull::OrderedConfig {
            filter_subject: to.to_string(),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await;
    let live = match consumer {
        Ok(consumer) => match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return unavailable(&e),
        },
        Err(e) => return unavailable(&e),
    };
    let live = live.filter_map(move |message| {
        let event = message.ok().and_then(|message| {
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
            let data = std::str::from_utf8(&message.payload).ok()?;
            let id = match run {
                Some(run) => format!("{seq}-{run}"),
                None => seq.to_string(),
            };
            Some(Ok::<_, Infallible>(Event::default().id(id).data(data)))
        });
        async move { event }
    });
    let stopping = app.stopping.clone();
    let events = futures::stream::iter(resumed)
        .chain(live)
        .take_until(async move { stopping.cancelled_owned().await });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        "x-vercel-ai-ui-message-stream",
        HeaderValue::from_static("v1"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
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
        let query = TranscriptQuery {
            conversation: conversation.to_string(),
            limit: None,
            after: after.take(),
            since: Some(run.to_owned()),
        };
        let reply: Result<Reply<TranscriptReply>, _> = app
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
    status: dispatch_ledger::view::TaskStatus,
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
    let query = TranscriptQuery {
        conversation: id.clone(),
        limit: params.limit,
        after: params.after,
        since: None,
    };
    let reply: Result<Reply<TranscriptReply>, _> = app
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
                messages: dispatch_chunks::messages(&run.run_id, &run.goal, &run.chunks),
                run_id: run.run_id,
                status: run.status,
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
