//! A stand-in for an OpenAI-compatible model server, for tests: it speaks the real
//! wire protocol, and its successful answers are bodies and SSE streams recorded from
//! real servers (`captures/openai/record.py`: llama-server with Qwen2.5-Coder-0.5B, and
//! llama-cpp-python for native streamed tool calls), replayed byte for byte. Its
//! failures (a status with `Retry-After`, a stream cut off, a stream too slow) are made
//! on purpose, and so is a hostile server's stream (a line that never ends, sent at
//! full speed or one byte at a time, a stream that never answers). Each request takes
//! the next scripted [`Reply`] (a request beyond the script gets a 500 saying so), or
//! the reply a route picks for it ([`StandIn::routed`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use futures::StreamExt as _;
use serde_json::Value;

/// What the stand-in does with one request.
pub enum Reply {
    /// Replays a recorded body (`.sse` as an event stream, `.json` as JSON).
    Replay(&'static str),
    /// Replays a recorded answer with some text swapped (`(from, to)`: a recording's
    /// temporary directory and port for today's), its streamed text and calls put
    /// together in one chunk first, so a swap cannot fall between two chunks.
    Rewritten(&'static str, Vec<(String, String)>),
    /// Answers with a status, an optional `Retry-After` and a body.
    Status(u16, Option<&'static str>, String),
    /// Sends the first `n` bytes of a recorded stream, then breaks the connection.
    CutAfter(&'static str, usize),
    /// Sends a recorded stream one event per interval.
    Slowly(&'static str, Duration),
    /// Opens an event stream's `data:` line and sends `n` bytes of it with no line end,
    /// as fast as the client takes them, then holds the connection open, silent.
    Unterminated(usize),
    /// Sends a `data:` line that never ends, one byte per interval, for ever.
    Trickle(Duration),
    /// Sends a comment line per interval, for ever: a stream alive that never answers.
    KeepAlive(Duration),
    /// Sends chunks that add nothing to an answer (`data: {"choices":[]}`), as fast as
    /// the client takes them, for ever.
    Endless,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Replay(name) => write!(f, "Replay({name})"),
            Reply::Rewritten(name, swaps) => write!(f, "Rewritten({name}, {swaps:?})"),
            Reply::Status(code, ..) => write!(f, "Status({code})"),
            Reply::CutAfter(name, n) => write!(f, "CutAfter({name}, {n})"),
            Reply::Slowly(name, every) => write!(f, "Slowly({name}, {every:?})"),
            Reply::Unterminated(n) => write!(f, "Unterminated({n})"),
            Reply::Trickle(every) => write!(f, "Trickle({every:?})"),
            Reply::KeepAlive(every) => write!(f, "KeepAlive({every:?})"),
            Reply::Endless => write!(f, "Endless"),
        }
    }
}

/// A request as the stand-in saw it: its `Authorization` header and JSON body.
pub type Seen = (Option<String>, Value);

/// Picks the reply to a request from its JSON body.
pub type Route = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

#[derive(Clone)]
pub struct StandIn {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    route: Option<Route>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Set when a response body is dropped before it was sent whole.
    pub hung_up: Arc<AtomicBool>,
    /// Time spent in the handler, summed over requests: what the stand-in itself costs
    /// a caller, to take out of figures about the caller.
    busy: Arc<Mutex<Duration>>,
}

impl StandIn {
    /// Serves `replies` on a random loopback port; returns the stand-in and its base
    /// URL (`http://127.0.0.1:<port>/v1`).
    pub async fn start(replies: Vec<Reply>) -> (Self, String) {
        Self::serve(replies, None).await
    }

    /// Serves the reply `route` picks for each request, by its body (the goal in its
    /// messages, say); returns the stand-in and its base URL.
    pub async fn routed(route: impl Fn(&Value) -> Reply + Send + Sync + 'static) -> (Self, String) {
        Self::serve(Vec::new(), Some(Arc::new(route))).await
    }

    async fn serve(replies: Vec<Reply>, route: Option<Route>) -> (Self, String) {
        let stand_in = StandIn {
            replies: Arc::new(Mutex::new(VecDeque::from(replies))),
            route,
            seen: Arc::default(),
            hung_up: Arc::default(),
            busy: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(answer))
            .with_state(stand_in.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (stand_in, url)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Adds replies to the end of the script.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.replies.lock().unwrap().extend(replies);
    }

    /// The time its handler took, summed over every request so far.
    pub fn busy(&self) -> Duration {
        *self.busy.lock().unwrap()
    }
}

/// A recorded body, by its path under `captures/openai/`.
pub fn capture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("captures/openai")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A recorded answer with `swaps` made: a JSON body as it is; an event stream with its
/// text and tool calls gathered into its first chunk, then its closing chunks (finish
/// reason, usage) with their deltas emptied, then `[DONE]`.
fn rewritten(name: &str, swaps: &[(String, String)]) -> Vec<u8> {
    let swap = |text: &str| {
        swaps
            .iter()
            .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
    };
    let text = String::from_utf8(capture(name)).expect("a recording is text");
    if !name.ends_with(".sse") {
        return swap(&text).into_bytes();
    }
    let mut content = String::new();
    let mut calls: std::collections::BTreeMap<u64, (Value, String)> = Default::default();
    let mut first: Option<Value> = None;
    let mut closing = Vec::new();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        // A chunk with no choice (the usage at the end) reads as an empty one.
        let choice = chunk["choices"].get(0).cloned().unwrap_or_default();
        let delta = &choice["delta"];
        content.push_str(delta["content"].as_str().unwrap_or_default());
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or_default();
            let entry = calls
                .entry(index)
                .or_insert_with(|| (call.clone(), String::new()));
            entry
                .1
                .push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        first.get_or_insert_with(|| chunk.clone());
        let closes = !choice["finish_reason"].is_null()
            || !chunk["usage"].is_null()
            || chunk["choices"].as_array().is_some_and(|c| c.is_empty());
        if closes {
            if let Some(delta) = chunk
                .get_mut("choices")
                .and_then(|c| c.get_mut(0))
                .and_then(|c| c.get_mut("delta"))
            {
                *delta = serde_json::json!({});
            }
            closing.push(chunk);
        }
    }
    let mut merged = first.unwrap_or_default();
    let mut delta = serde_json::json!({"role": "assistant", "content": swap(&content)});
    if !calls.is_empty() {
        delta["tool_calls"] = calls
            .into_values()
            .map(|(mut call, arguments)| {
                call["function"]["arguments"] = Value::String(swap(&arguments));
                call
            })
            .collect();
    }
    merged["choices"] = serde_json::json!([{"index": 0, "delta": delta, "finish_reason": null}]);
    if let Some(object) = merged.as_object_mut() {
        object.remove("usage");
    }
    let mut out = format!("data: {merged}\n\n");
    for chunk in closing {
        out.push_str(&format!("data: {chunk}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn kind_of(name: &str) -> &'static str {
    if name.ends_with(".sse") {
        "text/event-stream"
    } else {
        "application/json"
    }
}

/// Sets the stand-in's flag if dropped before `done` is called: the client hung up.
struct HangUp(Arc<AtomicBool>, bool);

impl HangUp {
    /// The body was sent whole.
    fn finish(mut self) {
        self.1 = true;
    }
}

impl Drop for HangUp {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

async fn answer(
    axum::extract::State(stand_in): axum::extract::State<StandIn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let busy = stand_in.busy.clone();
    let response = respond(stand_in, headers, body);
    *busy.lock().unwrap() += started.elapsed();
    response
}

fn respond(stand_in: StandIn, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let routed = stand_in.route.as_ref().map(|route| route(&json));
    stand_in.seen.lock().unwrap().push((auth.clone(), json));
    let reply = routed.unwrap_or_else(|| {
        stand_in
            .replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| {
                Reply::Status(500, None, "the stand-in has no reply scripted".into())
            })
    });
    let builder = Response::builder();
    match reply {
        Reply::Replay(name) => builder
            .header(header::CONTENT_TYPE, kind_of(name))
            .body(Body::from(capture(name)))
            .unwrap(),
        Reply::Rewritten(name, swaps) => builder
            .header(header::CONTENT_TYPE, kind_of(name))
            .body(Body::from(rewritten(name, &swaps)))
            .unwrap(),
        Reply::Status(code, retry_after, body) => {
            let mut builder = builder.status(StatusCode::from_u16(code).unwrap());
            if let Some(seconds) = retry_after {
                builder = builder.header(header::RETRY_AFTER, seconds);
            }
            builder.body(Body::from(body)).unwrap()
        }
        Reply::CutAfter(name, n) => {
            let head = Bytes::from(capture(name)[..n].to_vec());
            let chunks = futures::stream::iter([
                Ok(head),
                Err(std::io::Error::other("the stand-in cuts the stream")),
            ]);
            builder
                .header(header::CONTENT_TYPE, kind_of(name))
                .body(Body::from_stream(chunks))
                .unwrap()
        }
        Reply::Slowly(name, every) => {
            let text = String::from_utf8(capture(name)).unwrap();
            let events: Vec<String> = text.split_inclusive("\n\n").map(str::to_owned).collect();
            let guard = HangUp(stand_in.hung_up.clone(), false);
            let chunks = futures::stream::unfold(
                (events.into_iter(), guard),
                move |(mut events, guard)| async move {
                    tokio::time::sleep(every).await;
                    match events.next() {
                        Some(event) => {
                            Some((Ok::<_, std::io::Error>(Bytes::from(event)), (events, guard)))
                        }
                        None => {
                            guard.finish();
                            None
                        }
                    }
                },
            );
            builder
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(chunks))
                .unwrap()
        }
        Reply::Unterminated(n) => {
            const PIECE: usize = 64 * 1024;
            let head = Bytes::from_static(br#"data: {"choices":[{"delta":{"content":""#);
            let piece = Bytes::from(vec![b'x'; PIECE]);
            let pieces =
                (0..n.div_ceil(PIECE)).map(move |i| piece.slice(..PIECE.min(n - i * PIECE)));
            let chunks = futures::stream::iter(std::iter::once(head).chain(pieces))
                .chain(futures::stream::pending());
            hostile(builder, stand_in.hung_up.clone(), chunks)
        }
        Reply::Trickle(every) => {
            let head = Bytes::from_static(br#"data: {"choices":[{"delta":{"content":""#);
            let bytes = futures::stream::unfold((), move |()| async move {
                tokio::time::sleep(every).await;
                Some((Bytes::from_static(b"x"), ()))
            });
            hostile(
                builder,
                stand_in.hung_up.clone(),
                futures::stream::iter([head]).chain(bytes),
            )
        }
        Reply::KeepAlive(every) => {
            let lines = futures::stream::unfold((), move |()| async move {
                tokio::time::sleep(every).await;
                Some((Bytes::from_static(b": still thinking\n"), ()))
            });
            hostile(builder, stand_in.hung_up.clone(), lines)
        }
        Reply::Endless => {
            let chunk = Bytes::from(b"data: {\"choices\":[]}\n\n".repeat(2048));
            hostile(
                builder,
                stand_in.hung_up.clone(),
                futures::stream::repeat(chunk),
            )
        }
    }
}

/// An event stream of `chunks` that never ends by itself; `hung_up` is set when the
/// client drops it.
fn hostile(
    builder: axum::http::response::Builder,
    hung_up: Arc<AtomicBool>,
    chunks: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    let guard = HangUp(hung_up, false);
    let chunks = chunks.map(move |chunk| {
        let _held = &guard;
        Ok::<_, std::io::Error>(chunk)
    });
    builder
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}
