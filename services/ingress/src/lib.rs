//! Ingress: the HTTP front door.
//!
//! `POST /v1/goals` answers `202 {run_id, status_url}` as soon as the goal command is
//! stored in JetStream — before any planning — and everything else is a query the
//! ledger answers over the bus. Bad requests get a JSON error with a specific code and
//! publish nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dispatch_bus::health::{self, Health};
use dispatch_bus::{Bus, ConversationId, subject};
use dispatch_ledger::api::{
    QueryError, Reply, RunQuery, RunsQuery, RunsReply, TasksQuery, TasksReply,
};
use dispatch_ledger::view::RunView;
use dispatch_runlog::submit::{Goal, submit_goal};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "ingress";

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
}

struct App {
    bus: Bus,
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
        Ok(Self {
            config,
            app: Arc::new(App { bus }),
            listener,
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
        let health = tokio::spawn(health::serve(self.app.bus.clone(), me, shutdown.clone()));
        tracing::info!(%addr, "ingress listening");
        let stop = shutdown.clone();
        axum::serve(self.listener, router(self.app))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        shutdown.cancel();
        let _ = health.await;
        Ok(())
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/goals", post(post_goal))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/tasks", get(get_tasks))
        .route("/healthz", get(healthz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(app)
}

/// `{"error": {"code": ..., "message": ...}}` with `status`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code, "message": message.into() } });
    (status, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoalRequest {
    goal: String,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
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
        "http",
    )
    .map_err(|e| (e.code(), e.to_string()))
}

async fn post_goal(State(app): State<Arc<App>>, request: Request) -> Response {
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body must be at most {MAX_BODY_BYTES} bytes"),
            );
        }
    };
    let goal = match validate(&body) {
        Ok(goal) => goal,
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
    };
    match submit_goal(&app.bus, goal).await {
        Ok(run_id) => (
            StatusCode::ACCEPTED,
            axum::Json(
                json!({ "run_id": run_id.to_string(), "status_url": format!("/v1/runs/{run_id}") }),
            ),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "goal not stored");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                "the goal could not be stored; try again",
            )
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    all: Option<bool>,
    #[serde(default)]
    conversation: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    after: Option<String>,
}

/// `GET /v1/runs`: a page of runs, newest first; a `Link: <…>; rel="next"` header (and
/// `next` in the body) leads to the next page.
async fn list_runs(
    State(app): State<Arc<App>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let all = params.all.unwrap_or(true);
    let query = RunsQuery {
        all,
        conversation: params.conversation.clone(),
        limit: params.limit,
        after: params.after,
    };
    let reply: Result<Reply<RunsReply>, _> = app
        .bus
        .request_json(subject::query::runs(), &query, QUERY_TIMEOUT)
        .await;
    let next = match &reply {
        Ok(Ok(page)) => page.next.as_ref().map(|after| {
            let mut link = format!("/v1/runs?all={all}&after={after}");
            if let Some(limit) = params.limit {
                link.push_str(&format!("&limit={limit}"));
            }
            if let Some(c) = &params.conversation {
                link.push_str(&format!("&conversation={c}"));
            }
            link
        }),
        _ => None,
    };
    with_next_link(respond(reply), next)
}

/// Adds `Link: <next>; rel="next"` (RFC 8288) to a page's response.
fn with_next_link(mut response: Response, next: Option<String>) -> Response {
    if let Some(next) = next
        && let Ok(value) = axum::http::HeaderValue::from_str(&format!("<{next}>; rel=\"next\""))
    {
        response
            .headers_mut()
            .insert(axum::http::header::LINK, value);
    }
    response
}

async fn get_run(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let reply: Result<Reply<RunView>, _> = app
        .bus
        .request_json(subject::query::run(), &RunQuery { id }, QUERY_TIMEOUT)
        .await;
    respond(reply)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksParams {
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
    let query = TasksQuery {
        conversation: conversation.clone(),
        limit: params.limit,
        after: params.after,
        drain_id: params.drain_id,
    };
    let reply: Result<Reply<TasksReply>, _> = app
        .bus
        .request_json(subject::query::tasks(), &query, QUERY_TIMEOUT)
        .await;
    let next = match &reply {
        Ok(Ok(page)) => page
            .next
            .as_ref()
            .map(|after| format!("/v1/tasks?conversation={conversation}&after={after}")),
        _ => None,
    };
    with_next_link(respond(reply), next)
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let state = app.bus.client().connection_state();
    let connected = matches!(
        state,
        dispatch_bus::async_nats::connection::State::Connected
    );
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({ "status": if connected { "ok" } else { "degraded" }, "nats": state.to_string() }))).into_response()
}

fn respond<T: serde::Serialize>(reply: Result<Reply<T>, dispatch_bus::Error>) -> Response {
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
            tracing::warn!(error = %e, "the ledger did not answer");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                e.to_string(),
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
