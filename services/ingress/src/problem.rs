//! Errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Every error body has `type` (`/problems/<code>`), `title`, `status`, `detail`, and the
//! extension member `code`, the stable, matchable name of the problem (`invalid_goal`,
//! `unauthorized`, …). Some add members of their own (`run_id`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use problem_details::ProblemDetails;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Extensions {
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// One problem, ready to answer with.
#[derive(Debug, Clone)]
pub struct Problem(ProblemDetails<Extensions>);

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        let kind = format!("/problems/{code}")
            .parse::<axum::http::Uri>()
            .expect("codes are URI-safe");
        Self(
            ProblemDetails::from_status_code(status)
                .with_type(kind)
                .with_detail(detail)
                .with_extensions(Extensions { code, run_id: None }),
        )
    }

    /// Names the run the problem is about.
    pub fn with_run(mut self, run_id: impl ToString) -> Self {
        self.0.extensions.run_id = Some(run_id.to_string());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.0.status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The body, as JSON bytes.
    pub fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("problems serialize")
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.json()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// The wire shape of a problem, for the OpenAPI document (the `problem_details` crate
/// writes it; this type only describes it).
#[derive(utoipa::ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)]
pub struct ProblemDoc {
    /// `/problems/<code>`.
    r#type: String,
    title: String,
    status: u16,
    detail: String,
    /// The matchable name of the problem, e.g. `invalid_goal`, `unauthorized`.
    code: String,
    /// The run the problem is about, when there is one.
    run_id: Option<String>,
}
