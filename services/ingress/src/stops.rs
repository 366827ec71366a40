//! Stopping runs from HTTP (`POST /v1/runs/{id}/stop`) and gRPC (`StopRun`). Ingress
//! writes no run log: it checks the run, then hands a `StopRun` command to the
//! dispatcher, which records the request and ends the run if its owner does not.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dispatch_bus::subject;
use dispatch_proto::api::v1::{GetRunRequest, RunView};
use dispatch_proto::api::{QueryError, Reply};
use dispatch_runlog::stop::{DEFAULT_GRACE, MAX_GRACE};
use serde::Deserialize;

use crate::{App, QUERY_TIMEOUT, error, problem};

/// Why a stop was not handed on.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The ledger could not name the run.
    Query(QueryError),
    /// The run has ended; the status it ended with.
    Ended { run_id: String, status: String },
    /// The grace period is out of bounds.
    BadGrace(String),
    /// Neither the ledger nor NATS answered.
    Unavailable(String),
}

/// Checks the run and hands its stop to the dispatcher. `grace_ms` 0 is the default
/// grace period. Returns the run's whole id.
pub(crate) async fn stop(
    app: &App,
    id: &str,
    grace_ms: u64,
    force: bool,
    by: String,
) -> Result<String, Refused> {
    let grace = match grace_ms {
        0 => DEFAULT_GRACE,
        ms if Duration::from_millis(ms) > MAX_GRACE => {
            return Err(Refused::BadGrace(format!(
                "grace_ms must be at most {} (10 minutes)",
                MAX_GRACE.as_millis()
            )));
        }
        ms => Duration::from_millis(ms),
    };
    let query = GetRunRequest { id: id.to_owned() };
    let reply: Result<Reply<RunView>, _> = app
        .bus
        .request_json(subject::query::run(), &query, QUERY_TIMEOUT)
        .await;
    let view = match reply {
        Ok(Ok(view)) => view,
        Ok(Err(e)) => return Err(Refused::Query(e)),
        Err(e) => {
            return Err(Refused::Unavailable(format!(
                "the ledger did not answer: {e}"
            )));
        }
    };
    if view.status().is_terminal() {
        return Err(Refused::Ended {
            status: view.status().word().to_owned(),
            run_id: view.run_id,
        });
    }
    let run_id = view
        .run_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| Refused::Unavailable(e.to_string()))?;
    // The ledger's view trails the log by a commit: a run whose log has its end has
    // ended, whatever the view says yet.
    if let Ok(Some(end)) = app.log.ended_as(&run_id).await {
        return Err(Refused::Ended {
            status: end.status().word().to_owned(),
            run_id: view.run_id,
        });
    }
    match dispatch_runlog::stop::hand_over(&app.bus, &run_id, grace, force, &by).await {
        Ok(()) => Ok(view.run_id),
        Err(e) => Err(Refused::Unavailable(e.to_string())),
    }
}

/// The body of `POST /v1/runs/{id}/stop`; it may be empty.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    /// How long the run's owner has to end it before the dispatcher does (default
    /// 10000, at most 600000).
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// End it now, without waiting for the owner.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/runs/{id}/stop`.
#[utoipa::path(post, path = "/v1/runs/{id}/stop", tag = "runs",
    params(("id" = String, Path, description = "A run id or a unique prefix of one")),
    request_body(content = Option<StopBody>, description = "Optional: the grace period and whether to force"),
    responses(
        (status = 202, description = "The stop is handed to the dispatcher; the run ends `stopped`", body = crate::Accepted),
        (status = 400, description = "A bad body or grace period, or an ambiguous id", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The run has ended already", body = problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The ledger or NATS did not answer; ask again", body = problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn stop_run(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let caller = crate::access::Caller::id(request.extensions().get());
    let json = crate::is_json(request.headers());
    let body = match axum::body::to_bytes(request.into_body(), crate::MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => return crate::body_error(e),
    };
    let asked = if body.iter().all(u8::is_ascii_whitespace) {
        StopBody::default()
    } else if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the stop's options as JSON with `Content-Type: application/json`, or no body",
        );
    } else {
        match serde_json::from_slice::<StopBody>(&body) {
            Ok(asked) => asked,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_stop", e.to_string()),
        }
    };
    let by = requested_by("http", &caller);
    match stop(&app, &id, asked.grace_ms.unwrap_or(0), asked.force, by).await {
        Ok(run_id) => crate::accepted(run_id, false),
        Err(Refused::Query(e)) => crate::respond::<()>(Ok(Err(e))),
        Err(Refused::Ended { run_id, status }) => problem::Problem::new(
            StatusCode::CONFLICT,
            "run_ended",
            format!("run {run_id} has ended already ({status})"),
        )
        .with_run(run_id)
        .into_response(),
        Err(Refused::BadGrace(m)) => error(StatusCode::BAD_REQUEST, "invalid_stop", m),
        Err(Refused::Unavailable(m)) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
    }
}

/// Who asked, as the run's log records it: the door and the caller's key id.
pub(crate) fn requested_by(door: &str, caller: &str) -> String {
    if caller.is_empty() {
        door.to_owned()
    } else {
        format!("{door}:{caller}")
    }
}
