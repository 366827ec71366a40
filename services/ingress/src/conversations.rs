//! `GET /v1/conversations/{id}/stream`: a conversation's chunks as server-sent events,
//! in the AI SDK's UI message stream protocol (`x-vercel-ai-ui-message-stream: v1`).
//!
//! Each event's `id` is the chunk's sequence in the conversation stream, the cursor: a
//! client that reconnects with `Last-Event-ID` gets exactly the chunks after it and then
//! the live ones, from one ordered consumer, so there is no gap between replay and live
//! and no chunk twice. `?from=N` starts at sequence `N` instead; with neither, the
//! stream starts at the oldest chunk still buffered.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse as _, Response};
use dispatch_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull};
use dispatch_bus::{ConversationId, streams, subject};
use futures::StreamExt as _;
use serde::Deserialize;

use crate::{App, error};

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// The sequence to start at (inclusive); `Last-Event-ID` wins over it.
    #[serde(default)]
    from: Option<u64>,
}

/// `GET /v1/conversations/{id}/stream`.
#[utoipa::path(get, path = "/v1/conversations/{id}/stream", tag = "conversations",
    params(("id" = String, Path, description = "The conversation"), StreamParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this chunk")),
    responses(
        (status = 200, description = "The conversation's chunks (UI message stream protocol), then live ones", content_type = "text/event-stream"),
        (status = 400, description = "A bad conversation id or cursor", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The conversation stream cannot be read", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn stream(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
) -> Response {
    let Ok(conversation) = id.parse::<ConversationId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_conversation",
            "a conversation id is 1-128 of A-Z, a-z, 0-9, '-' and '_'",
        );
    };
    let after = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(text)) => match text.trim().parse::<u64>() {
            Ok(seq) => Some(seq),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_cursor",
                    "Last-Event-ID is the id of a chunk this stream sent: a number",
                );
            }
        },
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "Last-Event-ID is not text",
            );
        }
    };
    let deliver = match (after, params.from) {
        (Some(seq), _) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.saturating_add(1),
        },
        (None, Some(0) | None) => DeliverPolicy::All,
        (None, Some(seq)) => DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
    };
    let chunks = match follow(&app, &conversation, deliver).await {
        Ok(chunks) => chunks,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a conversation stream");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "stream_unavailable",
                "the conversation stream cannot be read now; try again",
            );
        }
    };
    let stopping = app.stopping.clone();
    let events = chunks.take_until(async move { stopping.cancelled_owned().await });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        "x-vercel-ai-ui-message-stream",
        HeaderValue::from_static("v1"),
    );
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The conversation's chunks from `deliver` on, as SSE events, until the client goes.
async fn follow(
    app: &App,
    conversation: &ConversationId,
    deliver: DeliverPolicy,
) -> Result<impl futures::Stream<Item = Result<Event, Infallible>> + use<>, String> {
    let js = app.bus.jetstream();
    let stream = js
        .get_stream(streams::CONVERSATIONS)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject::conv::of(conversation).to_string(),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let messages = consumer.messages().await.map_err(|e| e.to_string())?;
    Ok(messages.filter_map(|message| async move {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "reading a conversation stream");
                return None;
            }
        };
        let seq = message.info().ok()?.stream_sequence;
        let data = std::str::from_utf8(&message.payload).ok()?;
        Some(Ok(Event::default().id(seq.to_string()).data(data)))
    }))
}
