//! Ingress: the HTTP front door.
//!
//! `POST /v1/goals` answers `202 {run_id, status_url}` with a `Location` header as soon
//! as the goal command is stored in JetStream — before any planning — and everything
//! else is a query the ledger answers over the bus. Every `/v1` request needs an API key
//! ([`access`]); the socket has connection, header, body and request limits
//! ([`serve`]). Bad requests get an RFC 9457 problem with a specific `code` and publish
//! nothing; so does a goal with a `callback_url` while no `webhook-signing` secret
//! could sign its result (`no_signing_secret`), rather than a delivery given up later.

pub mod access;
pub mod approvals;
mod conversations;
mod memory;

use dispatch_runlog::turn::Busy;
mod grpc;
mod listeners;
mod mcp;
pub mod openapi;
pub mod problem;
mod schedules;
pub mod serve;
mod stops;
pub mod writes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dispatch_bus::health::{self, Health};
use dispatch_bus::{Bus, ConversationId, subject};
use dispatch_proto::api::v1::RunView;
use dispatch_proto::api::v1::{
    GetRunRequest, ListRunsRequest, ListRunsResponse, ListTasksRequest, ListTasksResponse,
};
use dispatch_proto::api::{QueryError, Reply};
use dispatch_runlog::submit::{Goal, Submission, Submitted};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "ingress";

/// The origin of every run a goal over HTTP or gRPC starts.
pub const ORIGIN: &str = "api";

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a query waits for the ledger.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "dispatch-ingress", about = "Dispatch HTTP front door", version)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "DISPATCH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address to serve gRPC on (port 0 picks a free one); none without it.
    #[arg(long, env = "DISPATCH_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// The API key store (default: .dispatch/auth/api-keys.json in the workspace).
    #[arg(long, env = "DISPATCH_API_KEYS")]
    pub api_keys: Option<std::path::PathBuf>,
    /// Origins (`https://app.example`) whose browser pages may call the API; requests
    /// with any other `Origin` header are refused.
    #[arg(long, env = "DISPATCH_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Connections served at once; one more is answered 503.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and the longest a kept-alive
    /// connection may sit idle.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Longest pause while a client sends a request body.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// Longest a whole request may take (answered 408 after that).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),

    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Ingress {
    config: Config,
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    grpc: Option<tokio::net::TcpListener>,
}

struct App {
    bus: Bus,
    access: Arc<access::Access>,
    writes: Arc<writes::Writes>,
    /// Cancelled when the service stops, to end the streams it serves.
    stopping: CancellationToken,
    /// Service runs' webhook listeners.
    listeners: Arc<listeners::Listeners>,
    /// Whose seals the run logs it serves are checked against.
    trust: dispatch_runlog::seal::Trust,
    /// Run logs, read (approval requests whole); ingress writes none.
    log: dispatch_runlog::RunLog,
    /// The conversations' heads: whether a conversation has a turn running.
    turns: dispatch_bus::reads::Reader,
    /// What the agents remember.
    memory: dispatch_memory::Memory,
}

impl Ingress {
    /// Connects to NATS and binds the listener, so [`Self::local_addr`] is known.
    pub async fn build(config: Config) -> Result<Self, Error> {
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Ingress)
            .await?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?;
        let grpc = match config.grpc_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Listen { addr, source })?,
            ),
            None => None,
        };
        let keys = config
            .api_keys
            .clone()
            .unwrap_or_else(|| dispatch_service::api_keys::store_path(&config.common.workspace));
        if !keys.exists() {
            tracing::warn!(path = %keys.display(), "no API key store yet: every /v1 request is refused until a key is created (`dispatch api-key create`)");
        }
        let access = Arc::new(access::Access::new(keys, config.allowed_origins.clone()));
        let listeners = listeners::Listeners::open(
            &bus,
            &config.common.workspace,
            format!("{SERVICE}/{}", config.common.instance),
        )
        .await?;
        let trust = config.common.trust();
        let log =
            dispatch_runlog::RunLog::open(&bus, &format!("{SERVICE}/{}", config.common.instance))
                .await
                .map_err(|e| dispatch_bus::Error::other("open the run log", e))?
                .with_trust(trust.clone());
        let turns = bus
            .jetstream()
            .get_stream(dispatch_bus::streams::TURNS)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the conversations' turns", e))?;
        let turns = dispatch_bus::reads::Reader::new(turns);
        let memory = dispatch_memory::Memory::open(&bus)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the memory", e))?;
        Ok(Self {
            config,
            app: Arc::new(App {
                bus,
                access,
                writes: Default::default(),
                stopping: CancellationToken::new(),
                listeners,
                trust,
                log,
                turns,
                memory,
            }),
            listener,
            grpc,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let addr = self.local_addr();
        let mut me = Health::new(SERVICE, &self.config.common.instance);
        me.detail
            .insert("http_addr".into(), json!(addr.to_string()));
        let grpc = match self.grpc {
            Some(listener) => {
                let grpc_addr = listener
                    .local_addr()
                    .map_err(|source| Error::Listen { addr, source })?;
                me.detail
                    .insert("grpc_addr".into(), json!(grpc_addr.to_string()));
                tracing::info!(%grpc_addr, "gRPC listening");
                let limits = grpc::Limits {
                    max_connections: self.config.max_connections,
                };
                let serving = grpc::serve(self.app.clone(), listener, limits, shutdown.clone());
                Some(tokio::spawn(async move {
                    if let Err(e) = serving.await {
                        tracing::error!(error = %e, "the gRPC server stopped");
                    }
                }))
            }
            None => None,
        };
        let health = tokio::spawn(health::serve(self.app.bus.clone(), me, shutdown.clone()));
        let listening = tokio::spawn(
            self.app
                .listeners
                .clone()
                .run(self.app.clone(), shutdown.clone()),
        );
        let probe = tokio::spawn(writes::watch(
            self.app.bus.clone(),
            SERVICE,
            self.app.writes.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%addr, "ingress listening");
        let limits = serve::Limits {
            max_connections: self.config.max_connections.max(1),
            header_timeout: self.config.header_timeout,
            body_timeout: self.config.body_timeout,
        };
        let stopping = self.app.stopping.clone();
        let stop_streams = shutdown.clone();
        tokio::spawn(async move {
            stop_streams.cancelled().await;
            stopping.cancel();
        });
        let router = router(self.app, self.config.request_timeout);
        serve::serve(
            self.listener,
            router,
            limits,
            shutdown.clone(),
            Duration::from_secs(10),
        )
        .await;
        shutdown.cancel();
        let _ = health.await;
        let _ = probe.await;
        let _ = listening.await;
        if let Some(mut grpc) = grpc {
            // A client that stops reading a stream must not hold the shutdown.
            if tokio::time::timeout(Duration::from_secs(10), &mut grpc)
                .await
                .is_err()
            {
                tracing::warn!("gRPC connections still open after the grace period; closing them");
                grpc.abort();
            }
        }
        Ok(())
    }
}

fn router(app: Arc<App>, request_timeout: Duration) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    let api = Router::new()
        .route("/v1/goals", post(post_goal))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/stop", post(stops::stop_run))
        .route("/v1/schedules", get(schedules::list).post(schedules::add))
        .route(
            "/v1/schedules/{id}",
            get(schedules::get).delete(schedules::remove),
        )
        .route("/v1/schedules/{id}/pause", post(schedules::pause))
        .route("/v1/schedules/{id}/resume", post(schedules::resume))
        .route("/v1/runs/{id}/events", get(conversations::run_events))
        .route("/v1/tasks", get(get_tasks))
        .route("/v1/memory", get(memory::list))
        .route("/v1/approvals", get(approvals::list))
        .route(
            "/v1/approvals/{id}",
            get(approvals::get_one).post(approvals::answer),
        )
        .route("/v1/conversations/{id}/stream", get(conversations::stream))
        .route(
            "/v1/conversations/{id}/transcript",
            get(conversations::transcript),
        )
        .route("/v1/conversations/{id}/ws", get(conversations::websocket))
        .route("/v1/conversations/{id}/messages", post(post_message))
        // MCP over streamable HTTP; nested before the layer below, so it needs the key too.
        .nest_service("/mcp", mcp::service(&app))
        .route_layer(axum::middleware::from_fn_with_state(
            app.access.clone(),
            access::check,
        ));
    let request_id = header::HeaderName::from_static("x-request-id");
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        // Service runs' hooks: each checks its own secret or signature, not an API key.
        .route(
            "/hooks/{account}/{agent}/{channel}",
            axum::routing::any(listeners::hook_wake),
        )
        .route("/v1/openapi.json", get(openapi::serve))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(app)
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    tower_http::trace::TraceLayer::new_for_http()
                        .make_span_with(http_span)
                        .on_response(http_response),
                )
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    request_timeout,
                )),
        )
}

/// The span of one HTTP request (OpenTelemetry's HTTP server conventions), a child of
/// the caller's span when the request carries a W3C `traceparent`.
fn http_span(request: &axum::extract::Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let method = request.method().as_str();
    let span = tracing::info_span!(
        "http",
        otel.name = %format_args!("{method} {}", route.as_deref().unwrap_or("")),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route.as_deref(),
        url.path = request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    dispatch_bus::trace::follow_with(&span, |name| {
        request.headers().get(name).and_then(|v| v.to_str().ok())
    });
    span
}

fn http_response(response: &Response, _latency: Duration, span: &tracing::Span) {
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// A problem response (RFC 9457) with `status` and the matchable `code`.
fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    problem::Problem::new(status, code, message).into_response()
}

/// A goal to hand to Dispatch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GoalRequest {
    goal: String,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Where the run's result is POSTed when it ends, signed per Standard Webhooks.
    #[serde(default)]
    callback_url: Option<String>,
}

/// Checks a goal request body; the error is `(code, message)`. Public so the fuzz
/// targets can drive it with hostile bodies.
pub fn validate(body: &[u8]) -> Result<Goal, (&'static str, String)> {
    let request: GoalRequest = serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            "invalid_goal"
        } else {
            "invalid_json"
        };
        (code, e.to_string())
    })?;
    Goal::new(
        &request.goal,
        request
            .conversation_id
            .as_deref()
            .unwrap_or(ConversationId::DEFAULT),
        request.timeout_ms.unwrap_or(0),
        ORIGIN,
    )
    .and_then(|goal| goal.with_callback(request.callback_url.as_deref().unwrap_or_default()))
    .map_err(|e| (e.code(), e.to_string()))
}

/// How long ingress keeps retrying to store a goal before it answers 503.
const STORE_ATTEMPTS: usize = 4;

#[utoipa::path(post, path = "/v1/goals", tag = "goals",
    request_body(content = GoalRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Retries with the same key (within 10 minutes) return the same run")),
    responses(
        (status = 202, description = "Stored; the run starts soon", body = Accepted,
            headers(("Location" = String, description = "The run's status URL"))),
        (status = 400, description = "Invalid goal, body or key; or a callback_url while no webhook-signing secret could sign its delivery (`no_signing_secret`)", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Origin not allowed", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 408, description = "Body or request too slow", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key reused for another goal", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Not confirmed stored (see detail), or whether a callback's delivery could be signed cannot be told now (`secrets_unavailable`)", body = problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
async fn post_goal(State(app): State<Arc<App>>, request: Request) -> Response {
    let asked = match Asked::read(request, "goal").await {
        Ok(asked) => asked,
        Err(response) => return *response,
    };
    let goal = match validate(&asked.body) {
        Ok(goal) => goal,
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
    };
    if let Err(refused) = deliverable(&app, &goal).await {
        let status = match refused {
            dispatch_secrets::Unsignable::Missing => StatusCode::BAD_REQUEST,
            dispatch_secrets::Unsignable::Unknown(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        return error(status, refused.code(), format!("callback_url: {refused}"));
    }
    asked.hand_over(&app, goal).await
}

/// A goal with a callback is taken only while its result could be delivered signed:
/// refused at the door, nothing stored, rather than accepted and given up later. One
/// read of the secrets bucket (is `webhook-signing` there), only for such goals.
pub(crate) async fn deliverable(
    app: &App,
    goal: &Goal,
) -> Result<(), dispatch_secrets::Unsignable> {
    if goal.callback_url().is_none() {
        return Ok(());
    }
    dispatch_secrets::check_signing(&app.bus).await
}

/// A request to start a run, as `POST /v1/goals` and a chat message both take one: a
/// JSON body, an optional `Idempotency-Key`, and whether the caller wants the run's
/// output as it streams.
struct Asked {
    body: axum::body::Bytes,
    idempotency_key: Option<String>,
    caller: String,
    direct: bool,
}

impl Asked {
    /// Reads it, or answers why not (`what` names the body in the message).
    async fn read(request: Request, what: &str) -> Result<Self, Box<Response>> {
        if !is_json(request.headers()) {
            return Err(Box::new(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send the {what} as JSON with `Content-Type: application/json`"),
            )));
        }
        let idempotency_key = idempotency_key(request.headers())?;
        let direct = wants_events(request.headers());
        let caller = access::Caller::id(request.extensions().get());
        let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| Box::new(body_error(e)))?;
        Ok(Self {
            body,
            idempotency_key,
            caller,
            direct,
        })
    }

    async fn hand_over(self, app: &Arc<App>, goal: Goal) -> Response {
        hand_over(app, goal, self.idempotency_key, &self.caller, self.direct).await
    }
}

/// A chat message: a turn of the path's conversation, the agent loop over the
/// conversation with this text as its newest message.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    text: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// What to do while a turn of the conversation is still running: `queue` (the
    /// default: this turn runs after it), `interrupt` (that turn is asked to stop; this
    /// one runs after it, with both messages) or `reject` (409, nothing stored).
    #[serde(default)]
    busy: Option<String>,
}

/// The origin of every run a chat message starts.
pub const CHAT_ORIGIN: &str = "chat";

#[utoipa::path(post, path = "/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = String, Path, description = "The conversation"),
        ("Idempotency-Key" = Option<String>, Header,
        description = "Retries with the same key (within 10 minutes) return the same run")),
    request_body(content = MessageRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Stored; the turn starts once the one before it has ended (with `Accept: text/event-stream`, its output streams instead)", body = Accepted,
            headers(("Location" = String, description = "The run's status URL"))),
        (status = 400, description = "Invalid message, conversation, busy mode or key", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "`busy: reject` and a turn of the conversation is running (`turn_running`, naming it); nothing stored", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Not confirmed stored (see detail)", body = problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
async fn post_message(
    State(app): State<Arc<App>>,
    Path(conversation): Path<String>,
    request: Request,
) -> Response {
    let asked = match Asked::read(request, "message").await {
        Ok(asked) => asked,
        Err(response) => return *response,
    };
    let message: MessageRequest = match serde_json::from_slice(&asked.body) {
        Ok(message) => message,
        Err(e) if e.is_data() => {
            return error(StatusCode::BAD_REQUEST, "invalid_goal", e.to_string());
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()),
    };
    let busy = match message.busy.as_deref().unwrap_or_default().parse::<Busy>() {
        Ok(busy) => busy,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_busy", e),
    };
    let goal = Goal::new(
        &message.text,
        &conversation,
        message.timeout_ms.unwrap_or(0),
        CHAT_ORIGIN,
    );
    let goal = match goal {
        Ok(goal) => goal.turn(busy),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
    };
    if busy == Busy::Reject {
        match running_turn(&app, goal.conversation()).await {
            Ok(None) => {}
            Ok(Some(running)) => {
                return problem::Problem::new(
                    StatusCode::CONFLICT,
                    "turn_running",
                    format!("turn {running} of this conversation is still running; send the message again once it has ended, or with busy: queue or interrupt"),
                )
                .with_run(running.to_string())
                .into_response();
            }
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("cannot tell whether a turn of this conversation runs: {e}"),
                );
            }
        }
    }
    asked.hand_over(&app, goal).await
}

/// The conversation's newest turn, if it has not ended. (The dispatcher checks again
/// when the turn takes its place: a turn that got in between still rejects it.)
async fn running_turn(
    app: &App,
    conversation: &dispatch_bus::ConversationId,
) -> Result<Option<dispatch_bus::RunId>, String> {
    let key = dispatch_bus::streams::turns_key(conversation);
    let subject = format!("$KV.{}.{key}", dispatch_bus::streams::TURNS_BUCKET);
    let head = app.turns.last(&subject).await.map_err(|e| e.to_string())?;
    // None, or the head deleted (a KV delete marker has no payload).
    let Some(head) = head.filter(|m| !m.payload.is_empty()) else {
        return Ok(None);
    };
    let head = <dispatch_proto::run::v1::ConversationHead as prost::Message>::decode(
        head.payload.as_ref(),
    )
    .map_err(|e| format!("the conversation's head does not decode: {e}"))?;
    let Ok(last) = head.last_run_id.parse::<dispatch_bus::RunId>() else {
        return Ok(None);
    };
    let tail = app.log.handle_tail(last).await.map_err(|e| e.to_string())?;
    Ok((!tail.is_finished()).then_some(last))
}

/// True when the client asks for the run's output as it streams.
fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Stores a checked goal and answers: `202` with the run, or the run's output as it
/// streams (`direct`), or why it may not be stored.
async fn hand_over(
    app: &Arc<App>,
    goal: Goal,
    idempotency_key: Option<String>,
    caller: &str,
    direct: bool,
) -> Response {
    let conversation = goal.conversation().clone();
    // Direct mode: following the conversation before the goal is stored, so none of
    // the run's chunks can come before the reader.
    let live = if direct {
        match conversations::chunks(app, &conversation, conversations::Start::Next).await {
            Ok(live) => Some(live),
            Err(response) => return response,
        }
    } else {
        None
    };
    let submission = match &idempotency_key {
        // Scoped to the caller's key, so two clients cannot collide on a key.
        Some(key) => Submission::idempotent(goal, &format!("{caller}\0{key}")),
        None => Submission::new(goal),
    };
    match store(app, &submission).await {
        Ok(Submitted::Stored(run_id)) => {
            return match live {
                Some(live) => conversations::one_run(live, run_id.to_string()),
                None => accepted(run_id.to_string(), false),
            };
        }
        Ok(Submitted::Earlier(earlier)) if submission.same_request(&earlier) => {
            if direct {
                // Asked again: the run so far from its transcript, then the rest.
                let cursor = conversations::Cursor::of_run(&earlier.run_id);
                let start = conversations::Start::After(cursor);
                return match conversations::chunks(app, &conversation, start).await {
                    Ok(chunks) => conversations::one_run(chunks, earlier.run_id),
                    Err(response) => response,
                };
            }
            return accepted(earlier.run_id, true);
        }
        Ok(Submitted::Earlier(earlier)) => {
            return problem::Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different goal; use a new key",
            )
            .with_run(earlier.run_id)
            .into_response();
        }
        Err(StoreError::Refused(why)) => {
            let mut response = problem::Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "writes_refused",
                format!(
                    "JetStream is refusing writes ({why}); the goal was not stored. {}",
                    writes::HINT
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return response;
        }
        Err(StoreError::NotConfirmed(_)) => {}
    }
    let run_id = submission.run_id();
    let detail = if idempotency_key.is_some() {
        "NATS did not confirm the goal; it may or may not be stored. Retry with the same \
         Idempotency-Key: that never makes a second run"
    } else {
        "NATS did not confirm the goal; it may or may not be stored. Check GET \
         /v1/runs/<run_id> before sending it again, or send goals with an Idempotency-Key, \
         whose retries never make a second run"
    };
    let mut response =
        problem::Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_confirmed", detail)
            .with_run(run_id)
            .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Stores `submission`, trying [`STORE_ATTEMPTS`] times: storing it again is safe (the
/// server drops the duplicate), so the answer is definite: stored, or not known to be
/// stored after every try. `/healthz` hears of the outcome.
async fn store(app: &App, submission: &Submission) -> Result<Submitted, StoreError> {
    // With JetStream refusing writes (its disk full), trying would only time out.
    let attempts = match app.writes.admit().map_err(StoreError::Refused)? {
        writes::Admit::Tries => STORE_ATTEMPTS,
        writes::Admit::Once => 1,
    };
    let mut last_error = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        match submission.submit(&app.bus).await {
            Ok(submitted) => {
                app.writes.goal_stored();
                if matches!(submitted, Submitted::Stored(_)) {
                    submitted_goals().add(
                        1,
                        &[opentelemetry::KeyValue::new(
                            "origin",
                            submission.origin().to_owned(),
                        )],
                    );
                }
                return Ok(submitted);
            }
            Err(e) => {
                tracing::debug!(attempt, error = %e, "goal not stored yet");
                last_error = Some(e);
            }
        }
    }
    let error = last_error.expect("at least one attempt");
    tracing::debug!(run_id = %submission.run_id(), error = %error, "goal not known to be stored");
    app.writes.goal_not_stored(error.to_string());
    Err(StoreError::NotConfirmed(error))
}

/// Why a goal was not stored.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    /// JetStream is known to refuse writes: not tried, so certainly not stored.
    #[error("JetStream is refusing writes ({0}); the goal was not stored")]
    Refused(String),
    /// Tried, and not confirmed: it may or may not be stored.
    #[error(transparent)]
    NotConfirmed(dispatch_runlog::Error),
}

/// Goals stored, by origin (`dispatch_runs_submitted_total{origin}`).
fn submitted_goals() -> &'static opentelemetry::metrics::Counter<u64> {
    static SUBMITTED: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    SUBMITTED.get_or_init(|| {
        opentelemetry::global::meter(dispatch_bus::metrics::METER)
            .u64_counter("dispatch.runs.submitted")
            .with_description("Goals stored through this copy, by origin")
            .build()
    })
}

/// The answer to a stored goal.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub run_id: String,
    /// Where the run's status is (also the `Location` header).
    pub status_url: String,
}

/// `202 Accepted` with the run's id and where to watch it.
fn accepted(run_id: String, replayed: bool) -> Response {
    let location = format!("/v1/runs/{run_id}");
    let body = Accepted {
        run_id,
        status_url: location.clone(),
    };
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// True for `application/json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
#[allow(clippy::result_large_err)]
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Box<Response>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ))),
    }
}

/// Why a request body could not be read: too large (413), too slow (408), or not
/// valid HTTP framing, such as bad chunked encoding (400).
fn body_error(e: axum::Error) -> Response {
    let inner = e.into_inner();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
    while let Some(failure) = cause {
        if failure.is::<http_body_util::LengthLimitError>() {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body must be at most {MAX_BODY_BYTES} bytes"),
            );
        }
        if failure.is::<tower_http::timeout::TimeoutError>() {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body stopped arriving".to_owned(),
            );
        }
        cause = failure.source();
    }
    error(
        StatusCode::BAD_REQUEST,
        "invalid_body",
        format!("the request body is not valid HTTP framing: {inner}"),
    )
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    #[serde(default)]
    all: Option<bool>,
    #[serde(default)]
    conversation: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    after: Option<String>,
    /// Only runs from this origin (`api`, `cli`, `schedule`, `todo`, …).
    #[serde(default)]
    origin: Option<String>,
}

/// `GET /v1/runs`: a page of runs, newest first; a `Link: <…>; rel="next"` header (and
/// `next` in the body) leads to the next page.
#[utoipa::path(get, path = "/v1/runs", tag = "runs", params(ListParams),
    responses(
        (status = 200, description = "A page of runs, newest first; `Link: <…>; rel=\"next\"` leads on", body = ListRunsResponse),
        (status = 401, description = "No or unknown API key", body = problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
async fn list_runs(
    State(app): State<Arc<App>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let all = params.all.unwrap_or(true);
    let query = ListRunsRequest {
        all,
        conversation_id: params.conversation.clone(),
        limit: params.limit,
        after: params.after,
        origin: params.origin.clone(),
    };
    page::<_, ListRunsResponse>(&app, subject::query::runs(), &query, |after| {
        let mut link = url::form_urlencoded::Serializer::new(String::new());
        link.append_pair("all", &all.to_string());
        link.append_pair("after", after);
        if let Some(limit) = params.limit {
            link.append_pair("limit", &limit.to_string());
        }
        if let Some(c) = &params.conversation {
            link.append_pair("conversation", c);
        }
        if let Some(origin) = &params.origin {
            link.append_pair("origin", origin);
        }
        format!("/v1/runs?{}", link.finish())
    })
    .await
}

/// A page of a listing: where the next one starts.
pub(crate) trait Paged {
    fn next(&self) -> Option<&str>;
}

impl Paged for ListRunsResponse {
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

impl Paged for ListTasksResponse {
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

impl Paged for dispatch_proto::api::v1::ListApprovalsResponse {
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

/// Asks the ledger for one page and answers with it, adding `Link: <next>;
/// rel="next"` (RFC 8288), the URL `link` makes of the next page's cursor.
async fn page<Q, R>(
    app: &App,
    subject: subject::Subject,
    query: &Q,
    link: impl FnOnce(&str) -> String,
) -> Response
where
    Q: serde::Serialize,
    R: Paged + serde::Serialize + serde::de::DeserializeOwned,
{
    page_of::<Q, R>(app, "ledger", subject, query, link).await
}

/// [`page`], from the service `who` (named when it does not answer).
async fn page_of<Q, R>(
    app: &App,
    who: &str,
    subject: subject::Subject,
    query: &Q,
    link: impl FnOnce(&str) -> String,
) -> Response
where
    Q: serde::Serialize,
    R: Paged + serde::Serialize + serde::de::DeserializeOwned,
{
    let reply: Result<Reply<R>, _> = app.bus.request_json(subject, query, QUERY_TIMEOUT).await;
    let next = match &reply {
        Ok(Ok(page)) => page.next().map(link),
        _ => None,
    };
    let mut response = respond_from(who, reply);
    if let Some(next) = next
        && let Ok(value) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\""))
    {
        response.headers_mut().insert(header::LINK, value);
    }
    response
}

#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "A run id or a unique prefix of one")),
    responses(
        (status = 200, description = "The run", body = RunView),
        (status = 404, description = "No such run", body = problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
async fn get_run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let reply: Result<Reply<RunView>, _> = app
        .bus
        .request_json(subject::query::run(), &GetRunRequest { id }, QUERY_TIMEOUT)
        .await;
    respond(reply)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TasksParams {
    #[serde(default)]
    conversation: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    drain_id: Option<String>,
}

/// `GET /v1/tasks`: a page of the conversation's tasks and its oldest feedback notes,
/// each handed out once (`more_feedback` says more are waiting). Pass a `drain_id` to
/// make a retry return the same notes.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(TasksParams),
    responses(
        (status = 200, description = "A page of the conversation's tasks and its undelivered feedback notes (each handed out once)", body = ListTasksResponse),
        (status = 401, description = "No or unknown API key", body = problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
async fn get_tasks(
    State(app): State<Arc<App>>,
    params: Result<Query<TasksParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let conversation = params
        .conversation
        .unwrap_or_else(|| ConversationId::DEFAULT.to_owned());
    if let Err(e) = conversation.parse::<ConversationId>() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_conversation",
            e.to_string(),
        );
    }
    let query = ListTasksRequest {
        conversation_id: conversation.clone(),
        limit: params.limit,
        after: params.after,
        drain_id: params.drain_id,
    };
    page::<_, ListTasksResponse>(&app, subject::query::tasks(), &query, |after| {
        format!("/v1/tasks?conversation={conversation}&after={after}")
    })
    .await
}

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses(
        (status = 200, description = "Connected to NATS, and JetStream stores writes"),
        (status = 503, description = "Not connected, or JetStream does not store writes (the body says why and what to do)"),
    ))]
async fn healthz(State(app): State<Arc<App>>) -> Response {
    let state = app.bus.client().connection_state();
    let connected = matches!(
        state,
        dispatch_bus::async_nats::connection::State::Connected
    );
    let writes = app.writes.report();
    let ok = connected && writes.accepting;
    let mut body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "nats": state.to_string(),
        "jetstream": if writes.accepting { "storing writes".to_owned() } else {
            writes.problem.clone().unwrap_or_default()
        },
        "probed_ms_ago": writes.probed_ago.map(|d| d.as_millis() as u64),
    });
    if connected && !writes.accepting {
        body["hint"] = json!(writes::HINT);
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

fn respond<T: serde::Serialize>(reply: Result<Reply<T>, dispatch_bus::Error>) -> Response {
    respond_from("ledger", reply)
}

/// An answer of the service `who` (the ledger, the scheduler) as an HTTP response.
fn respond_from<T: serde::Serialize>(
    who: &str,
    reply: Result<Reply<T>, dispatch_bus::Error>,
) -> Response {
    match reply {
        Ok(Ok(value)) => (StatusCode::OK, axum::Json(value)).into_response(),
        Ok(Err(QueryError::NotFound(m))) => error(StatusCode::NOT_FOUND, "not_found", m),
        Ok(Err(QueryError::Ambiguous(m))) => error(StatusCode::BAD_REQUEST, "ambiguous", m),
        Ok(Err(QueryError::BadRequest(m))) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        Ok(Err(QueryError::Unavailable(m))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
        }
        Ok(Err(QueryError::Corrupt(m))) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "log_corrupt", m)
        }
        Err(e) => {
            tracing::warn!(service = who, error = %e, "no answer");
            let code = if who == "scheduler" {
                "scheduler_unavailable"
            } else {
                "ledger_unavailable"
            };
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                code,
                format!("the {who} did not answer: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_requests_are_checked_field_by_field() {
        let cases: [(&str, &str); 9] = [
            ("{", "invalid_json"),
            ("[]", "invalid_goal"),
            ("{}", "invalid_goal"),
            (r#"{"goal":"   "}"#, "invalid_goal"),
            (r#"{"goal":3}"#, "invalid_goal"),
            (r#"{"goal":"x","extra":1}"#, "invalid_goal"),
            (r#"{"goal":"x","timeout_ms":5}"#, "invalid_timeout"),
            (
                r#"{"goal":"x","conversation_id":"a.b"}"#,
                "invalid_conversation",
            ),
            (r#"{"goal":"x","timeout_ms":-1}"#, "invalid_goal"),
        ];
        for (body, code) in cases {
            let err = validate(body.as_bytes()).unwrap_err();
            assert_eq!(err.0, code, "{body}: {}", err.1);
        }
        let goal =
            validate(br#"{"goal":" hello ","conversation_id":"c1","timeout_ms":2000}"#).unwrap();
        assert_eq!(
            (goal.goal(), goal.conversation().as_str(), goal.timeout_ms()),
            ("hello", "c1", 2000)
        );
    }
}
