//! `/v1/schedules`: goals started on cron expressions, over HTTP. Every change goes to
//! the scheduler (`dispatch.req.schedule.*`), which checks it and answers with the
//! schedule as it is afterwards; ingress keeps nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dispatch_bus::subject;
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::{
    AddScheduleRequest, ListSchedulesRequest, ListSchedulesResponse, Schedule, ScheduleIdRequest,
};
use serde::Deserialize;

use crate::{App, MAX_BODY_BYTES, body_error, error, is_json};

/// How long the scheduler has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

impl crate::Paged for ListSchedulesResponse {
    fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SchedulesParams {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    after: Option<String>,
}

/// `GET /v1/schedules`: a page of schedules, oldest first.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", params(SchedulesParams),
    responses(
        (status = 200, description = "A page of schedules; `Link: <…>; rel=\"next\"` leads on", body = ListSchedulesResponse),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "No scheduler answered", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    params: Result<Query<SchedulesParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let request = ListSchedulesRequest {
        limit: params.limit,
        after: params.after,
    };
    crate::page_of::<_, ListSchedulesResponse>(
        &app,
        "scheduler",
        subject::schedule::list(),
        &request,
        |after| {
            let mut link = url::form_urlencoded::Serializer::new(String::new());
            link.append_pair("after", after);
            if let Some(limit) = params.limit {
                link.append_pair("limit", &limit.to_string());
            }
            format!("/v1/schedules?{}", link.finish())
        },
    )
    .await
}

/// `POST /v1/schedules`: a new schedule, checked by the scheduler.
#[utoipa::path(post, path = "/v1/schedules", tag = "schedules",
    request_body = AddScheduleRequest,
    responses(
        (status = 201, description = "The schedule, with its first fire time (also `Location`)", body = Schedule),
        (status = 400, description = "A bad expression, time zone or goal; nothing was stored", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "No scheduler answered", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn add(State(app): State<Arc<App>>, request: Request) -> Response {
    if !is_json(request.headers()) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the schedule as JSON with `Content-Type: application/json`",
        );
    }
    let caller = crate::access::Caller::id(request.extensions().get());
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => return body_error(e),
    };
    let mut asked: AddScheduleRequest = match serde_json::from_slice(&body) {
        Ok(asked) => asked,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_schedule", e.to_string()),
    };
    // A service's schedules are the dispatcher's to make, from the service's own spec.
    if !asked.service_run_id.is_empty() || !asked.schedule_id.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_schedule",
            "service_run_id and schedule_id are set by Dispatch for a service's schedules; \
             start a service with `dispatch serve`",
        );
    }
    asked.created_by = crate::stops::requested_by("http", &caller);
    let reply: Result<Reply<Schedule>, _> = app
        .bus
        .request_json(subject::schedule::add(), &asked, TIMEOUT)
        .await;
    match reply {
        Ok(Ok(schedule)) => {
            let location = format!("/v1/schedules/{}", schedule.schedule_id);
            let mut response = (StatusCode::CREATED, axum::Json(schedule)).into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        other => crate::respond_from("scheduler", other),
    }
}

/// `GET /v1/schedules/{id}`.
#[utoipa::path(get, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "A schedule id, its last 12 characters, or a unique prefix")),
    responses(
        (status = 200, description = "The schedule", body = Schedule),
        (status = 404, description = "No such schedule", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn get(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    one(&app, subject::schedule::get(), id).await
}

/// `DELETE /v1/schedules/{id}`: the schedule stops firing; runs it started stay.
#[utoipa::path(delete, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "A schedule id, its last 12 characters, or a unique prefix")),
    responses(
        (status = 200, description = "The schedule as it was", body = Schedule),
        (status = 404, description = "No such schedule", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn remove(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    one(&app, subject::schedule::rm(), id).await
}

/// `POST /v1/schedules/{id}/pause`.
#[utoipa::path(post, path = "/v1/schedules/{id}/pause", tag = "schedules",
    params(("id" = String, Path, description = "A schedule id, its last 12 characters, or a unique prefix")),
    responses(
        (status = 200, description = "The schedule, paused", body = Schedule),
        (status = 404, description = "No such schedule", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn pause(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    one(&app, subject::schedule::pause(), id).await
}

/// `POST /v1/schedules/{id}/resume`: it fires next at its first time after now.
#[utoipa::path(post, path = "/v1/schedules/{id}/resume", tag = "schedules",
    params(("id" = String, Path, description = "A schedule id, its last 12 characters, or a unique prefix")),
    responses(
        (status = 200, description = "The schedule, active", body = Schedule),
        (status = 404, description = "No such schedule", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn resume(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    one(&app, subject::schedule::resume(), id).await
}

async fn one(app: &App, to: subject::Subject, schedule_id: String) -> Response {
    let reply: Result<Reply<Schedule>, _> = app
        .bus
        .request_json(to, &ScheduleIdRequest { schedule_id }, TIMEOUT)
        .await;
    crate::respond_from("scheduler", reply)
}
