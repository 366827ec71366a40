//! `GET /v1/memory`: what the agents remember, for people (the `memory` tools keep
//! it; `dispatch-memory` holds the store).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::{App, error};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MemoryParams {
    /// Only entries of this kind (preference, note, person, document, todo).
    #[serde(default)]
    kind: Option<String>,
    /// Words to find, as `memory.recall` finds them (best first, at most 10).
    #[serde(default)]
    q: Option<String>,
}

/// One remembered entry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemoryEntry {
    pub key: String,
    pub kind: String,
    pub text: String,
    pub updated_at_ms: i64,
    /// The run whose call remembered it last.
    pub run_id: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemoryPage {
    pub entries: Vec<MemoryEntry>,
}

#[utoipa::path(get, path = "/v1/memory", tag = "memory", params(MemoryParams),
    responses(
        (status = 200, description = "What is remembered: every entry by key, or those matching q", body = MemoryPage),
        (status = 400, description = "Bad query", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The memory bucket cannot be read now", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    params: Result<Query<MemoryParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()),
    };
    let owner = dispatch_memory::Owner::default();
    let all = match app.memory.list(&owner).await {
        Ok(all) => all,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
    };
    let chosen: Vec<&dispatch_memory::Entry> = match &params.q {
        Some(q) => dispatch_memory::recall(&all, Some(q), params.kind.as_deref()),
        None => all
            .iter()
            .filter(|e| params.kind.as_deref().is_none_or(|k| e.kind == k))
            .collect(),
    };
    let entries = chosen
        .into_iter()
        .map(|e| MemoryEntry {
            key: e.key.clone(),
            kind: e.kind.clone(),
            text: e.text.clone(),
            updated_at_ms: e.updated_at_ms,
            run_id: e.run_id.clone(),
        })
        .collect();
    axum::Json(MemoryPage { entries }).into_response()
}
