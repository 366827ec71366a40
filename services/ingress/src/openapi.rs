//! The OpenAPI document of the HTTP API, generated from the handlers and types
//! themselves (utoipa), served at `/v1/openapi.json` without a key.

use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

#[derive(OpenApi)]
#[openapi(
    info(title = "Dispatch", description = "Hand goals to Dispatch and watch them run"),
    paths(
        crate::post_goal,
        crate::post_message,
        crate::listeners::hook_wake,
        crate::list_runs,
        crate::get_run,
        crate::stops::stop_run,
        crate::schedules::list,
        crate::schedules::add,
        crate::schedules::get,
        crate::schedules::remove,
        crate::schedules::pause,
        crate::schedules::resume,
        crate::get_tasks,
        crate::memory::list,
        crate::approvals::list,
        crate::approvals::answer,
        crate::approvals::get_one,
        crate::conversations::stream,
        crate::conversations::transcript,
        crate::conversations::run_events,
        crate::healthz
    ),
    components(schemas(
        crate::GoalRequest,
        crate::MessageRequest,
        dispatch_proto::api::v1::ServiceView,
        dispatch_proto::api::v1::ListenerView,
        crate::Accepted,
        crate::problem::ProblemDoc,
        dispatch_proto::api::v1::RunView,
        dispatch_proto::api::v1::TaskStatus,
        dispatch_proto::api::v1::Corruption,
        dispatch_proto::api::v1::Note,
        dispatch_proto::api::v1::ListRunsResponse,
        dispatch_proto::api::v1::ListTasksResponse,
        dispatch_proto::api::v1::ListApprovalsResponse,
        dispatch_proto::api::v1::PendingApproval,
        crate::stops::StopBody,
        dispatch_proto::api::v1::Schedule,
        dispatch_proto::api::v1::AddScheduleRequest,
        dispatch_proto::api::v1::ListSchedulesResponse,
        dispatch_proto::api::v1::MissedFires,
        dispatch_proto::api::v1::Overlap,
        crate::approvals::Answer,
        crate::approvals::Answered,
        crate::approvals::ApprovalDetail,
        crate::conversations::TranscriptPage,
        crate::conversations::TranscriptEntry,
        crate::memory::MemoryPage,
        crate::memory::MemoryEntry
    )),
    modifiers(&BearerKeys)
)]
pub struct Doc;

/// Declares the `api_key` scheme the paths require: `Authorization: Bearer <key>`.
struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub async fn serve() -> axum::response::Response {
    axum::Json(Doc::openapi()).into_response()
}
