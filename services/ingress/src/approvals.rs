//! `GET /v1/approvals`, `GET /v1/approvals/{id}` and `POST /v1/approvals/{id}`: the
//! approval queue over HTTP.
//!
//! The list is the ledger's (`dispatch.query.approvals`), paged like runs, each
//! request's arguments clipped to 1 KiB and marked so; one request, read from its
//! run's log, has them whole, with their digest. An answer goes to the policy service
//! (`dispatch.req.policy.resolve`), which records it in the run's log, so an answer
//! over HTTP and one from the CLI race on the same log and exactly one wins; an answer
//! that allows must name the digest of the arguments the person was shown, and
//! applies only to those.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dispatch_bus::subject;
use dispatch_proto::api::v1::{ListApprovalsRequest, ListApprovalsResponse};
use dispatch_proto::policy::v1::{
    ResolveApprovalRequest, ResolveApprovalResponse, resolve_approval_response::Outcome,
};
use serde::{Deserialize, Serialize};

use crate::{App, MAX_BODY_BYTES, access, body_error, error, is_json};

/// The longest reason an answer may carry.
pub const MAX_REASON_BYTES: usize = 1024;

/// How long the policy service has to record an answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ApprovalsParams {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    after: Option<String>,
}

/// `GET /v1/approvals`: a page of the approval requests nobody has answered, oldest
/// run first; `Link: <…>; rel="next"` (and `next` in the body) leads on.
#[utoipa::path(get, path = "/v1/approvals", tag = "approvals", params(ApprovalsParams),
    responses(
        (status = 200, description = "A page of unanswered approval requests", body = ListApprovalsResponse),
        (status = 400, description = "Bad limit or cursor", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    params: Result<Query<ApprovalsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let query = ListApprovalsRequest {
        limit: params.limit,
        after: params.after,
    };
    crate::page::<_, ListApprovalsResponse>(&app, subject::query::approvals(), &query, |after| {
        let mut link = format!("/v1/approvals?after={after}");
        if let Some(limit) = params.limit {
            link.push_str(&format!("&limit={limit}"));
        }
        link
    })
    .await
}

/// A person's answer to an approval request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// `allow` or `deny`.
    decision: String,
    /// Why; required to deny (the model is told it).
    #[serde(default)]
    reason: String,
    /// The digest of the arguments the person was shown (`args_digest` of the listing
    /// or of `GET /v1/approvals/{id}`): required to allow; the answer applies only to
    /// those arguments.
    #[serde(default)]
    args_digest: String,
}

/// One approval request, its arguments whole.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalDetail {
    pub approval_id: String,
    pub run_id: String,
    pub tool: String,
    /// The call's arguments exactly as they will run (canonical JSON), whole.
    pub args_json: String,
    /// `sha256:<hex>` of `args_json`: what an answer that allows names.
    pub args_digest: String,
    pub risk: String,
    pub rule: String,
    pub reason: String,
    pub expires_at_ms: i64,
    /// `allow` or `deny` once answered.
    pub answered: Option<String>,
    pub run_ended: bool,
}

/// What was recorded.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Answered {
    pub approval_id: String,
    pub decision: String,
    pub resolved_by: String,
    pub message: String,
}

/// Checks an answer's body; the error is `(code, message)`.
pub fn validate(body: &[u8]) -> Result<Answer, (&'static str, String)> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            "invalid_answer"
        } else {
            "invalid_json"
        };
        (code, e.to_string())
    })?;
    if !matches!(answer.decision.as_str(), "allow" | "deny") {
        return Err((
            "invalid_decision",
            format!("decision must be allow or deny, not {:?}", answer.decision),
        ));
    }
    if answer.reason.len() > MAX_REASON_BYTES {
        return Err((
            "invalid_reason",
            format!("reason must be at most {MAX_REASON_BYTES} bytes"),
        ));
    }
    if answer.decision == "deny" && answer.reason.trim().is_empty() {
        return Err((
            "invalid_reason",
            "say why when denying (reason): the run's model is told".into(),
        ));
    }
    if answer.decision == "allow" && answer.args_digest.trim().is_empty() {
        return Err((
            "digest_required",
            "to allow, name the digest of the arguments you were shown (args_digest, as \
             GET /v1/approvals/{id} gives it)"
                .into(),
        ));
    }
    if answer.args_digest.len() > 128 {
        return Err((
            "invalid_digest",
            "args_digest is sha256:<64 hex digits>".into(),
        ));
    }
    Ok(answer)
}

/// `GET /v1/approvals/{id}`: one approval request with its arguments whole and their
/// digest, read from its run's log.
#[utoipa::path(get, path = "/v1/approvals/{id}", tag = "approvals",
    params(("id" = String, Path, description = "The approval id (`<run id>.<call id>`)")),
    responses(
        (status = 200, description = "The request, arguments whole", body = ApprovalDetail),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such approval request", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The run log cannot be read", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn get_one(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match dispatch_runlog::approvals::find(&app.log, &id).await {
        Ok(Some(found)) => {
            let request = found.request;
            let risk = dispatch_proto::run::v1::Risk::try_from(request.risk)
                .map_or("destructive", |r| r.word());
            axum::Json(ApprovalDetail {
                approval_id: request.approval_id,
                run_id: id.split_once('.').map_or("", |(run, _)| run).to_owned(),
                tool: request.tool,
                args_digest: dispatch_runlog::args::digest(&request.args_json),
                args_json: request.args_json,
                risk: risk.to_owned(),
                rule: request.rule,
                reason: request.reason,
                expires_at_ms: request.expires_unix_ms,
                answered: found.answered,
                run_ended: found.run_ended,
            })
            .into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no approval request {}",
                dispatch_runlog::one_line(&id, 120)
            ),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the run's log cannot be read: {e}"),
        ),
    }
}

/// `POST /v1/approvals/{id}`: allow or deny one request. Exactly one answer is
/// recorded; a later one gets `409 already_decided` naming the first.
#[utoipa::path(post, path = "/v1/approvals/{id}", tag = "approvals",
    params(("id" = String, Path, description = "The approval id (`<run id>.<call id>`)")),
    request_body(content = Answer, content_type = "application/json"),
    responses(
        (status = 200, description = "Recorded", body = Answered),
        (status = 400, description = "Bad body, decision or id", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such approval request", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "Already decided, or the run has ended", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The policy service did not answer", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn answer(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    if !is_json(request.headers()) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the answer as JSON with `Content-Type: application/json`",
        );
    }
    let caller = access::Caller::id(request.extensions().get());
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => return body_error(e),
    };
    let answer = match validate(&body) {
        Ok(answer) => answer,
        Err((code, message)) => return error(StatusCode::BAD_REQUEST, code, message),
    };
    let resolved_by = format!("api key {caller} (http)");
    let reply: Result<ResolveApprovalResponse, _> = app
        .bus
        .request_proto(
            subject::policy::resolve(),
            &ResolveApprovalRequest {
                approval_id: id.clone(),
                decision: answer.decision.clone(),
                resolved_by: resolved_by.clone(),
                reason: answer.reason,
                args_digest: answer.args_digest,
            },
            RESOLVE_TIMEOUT,
        )
        .await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            tracing::warn!(error = %e, "the policy service did not answer");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "policy_unavailable",
                format!("the policy service did not answer: {e}; nothing was recorded"),
            );
        }
    };
    match reply.outcome() {
        Outcome::Resolved => (
            StatusCode::OK,
            axum::Json(Answered {
                approval_id: id,
                decision: answer.decision,
                resolved_by,
                message: reply.message,
            }),
        )
            .into_response(),
        Outcome::AlreadyDecided => error(StatusCode::CONFLICT, "already_decided", reply.message),
        Outcome::RunEnded => error(StatusCode::CONFLICT, "run_ended", reply.message),
        Outcome::NotFound => error(StatusCode::NOT_FOUND, "not_found", reply.message),
        Outcome::Invalid => error(StatusCode::BAD_REQUEST, "invalid_approval", reply.message),
        Outcome::DigestMismatch => error(StatusCode::CONFLICT, "digest_mismatch", reply.message),
        Outcome::Unspecified => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "policy_unavailable",
            reply.message,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_field_by_field() {
        let long = format!(r#"{{"decision":"allow","reason":"{}"}}"#, "x".repeat(1025));
        let cases: [(&str, &str); 8] = [
            ("{", "invalid_json"),
            ("{}", "invalid_answer"),
            (r#"{"decision":"maybe"}"#, "invalid_decision"),
            (r#"{"decision":"deny"}"#, "invalid_reason"),
            (r#"{"decision":"deny","reason":"  "}"#, "invalid_reason"),
            (r#"{"decision":"allow","by":"me"}"#, "invalid_answer"),
            (&long, "invalid_reason"),
            (r#"{"decision":"allow"}"#, "digest_required"),
        ];
        for (body, code) in cases {
            let err = validate(body.as_bytes()).expect_err(body);
            assert_eq!(err.0, code, "{body}: {}", err.1);
        }
        let ok = validate(br#"{"decision":"deny","reason":"not today"}"#).unwrap();
        assert_eq!(
            (ok.decision.as_str(), ok.reason.as_str()),
            ("deny", "not today")
        );
        assert!(validate(br#"{"decision":"allow","args_digest":"sha256:00"}"#).is_ok());
    }
}
