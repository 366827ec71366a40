//! Compiles `proto/` with protox, so building Dispatch needs no `protoc`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("dispatch/run/v1/events.proto"),
        root.join("dispatch/command/v1/commands.proto"),
        root.join("dispatch/ledger/v1/ledger.proto"),
        root.join("dispatch/policy/v1/policy.proto"),
        root.join("dispatch/api/v1/queries.proto"),
        root.join("dispatch/api/v1/schedules.proto"),
        root.join("dispatch/api/v1/api.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root]).expect("proto files compile");
    // For gRPC server reflection: grpcurl needs no .proto files.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )
    .expect("OUT_DIR is writable");
    let mut build = tonic_prost_build::configure()
        // Events and commands can be shown as JSON (logs, exported trails).
        .type_attribute(".", "#[derive(serde::Serialize)]")
        // The front doors' contract is JSON too (HTTP bodies, the ledger's queries on
        // the bus): read back, described in the OpenAPI document, absent fields default.
        .message_attribute(
            ".dispatch.api.v1",
            "#[derive(serde::Deserialize, utoipa::ToSchema)] #[serde(default)]",
        )
        .enum_attribute(
            ".dispatch.api.v1",
            "#[derive(serde::Deserialize, utoipa::ToSchema)] #[serde(rename_all = \"snake_case\")]",
        );
    // A query names only what it knows: a misspelt field is an error, not ignored.
    for query in [
        "ListRunsRequest",
        "GetRunRequest",
        "ListTasksRequest",
        "SearchRunsRequest",
        "ListApprovalsRequest",
        "GetTranscriptRequest",
        "ReplayRunRequest",
        "AddScheduleRequest",
        "ScheduleIdRequest",
        "ListSchedulesRequest",
    ] {
        build = build.message_attribute(
            format!(".dispatch.api.v1.{query}"),
            "#[serde(deny_unknown_fields)]",
        );
    }
    // An enum field is its word in JSON (`"status": "done"`), not its number.
    for (field, module, schema) in [
        ("RunView.status", "task_status", "TaskStatus"),
        ("TranscriptRun.status", "task_status", "TaskStatus"),
        ("ReplayRunResponse.trail", "trail_outcome", "TrailOutcome"),
        ("Schedule.missed", "missed_fires", "MissedFires"),
        ("Schedule.overlap", "overlap", "Overlap"),
        ("AddScheduleRequest.missed", "missed_fires", "MissedFires"),
        ("AddScheduleRequest.overlap", "overlap", "Overlap"),
    ] {
        build = build.field_attribute(
            format!(".dispatch.api.v1.{field}"),
            format!(
                "#[serde(with = \"crate::api::json::{module}\")] #[schema(value_type = {schema})]"
            ),
        );
    }
    // Chunks are JSON objects kept as text; in JSON they are the objects themselves.
    build = build.field_attribute(
        ".dispatch.api.v1.TranscriptRun.chunks",
        "#[serde(with = \"crate::api::json::raw\")] #[schema(value_type = Vec<Object>)]",
    );
    for (field, skip) in [
        ("RunView.corrupt", "Option::is_none"),
        ("RunView.report_path", "Option::is_none"),
        ("RunView.approvals", "Vec::is_empty"),
    ] {
        build = build.field_attribute(
            format!(".dispatch.api.v1.{field}"),
            format!("#[serde(skip_serializing_if = \"{skip}\")]"),
        );
    }
    // A listener's shared-secret digest stays in the log (protobuf) and out of every
    // JSON view of events (the events API, `logs --format json`).
    build = build.field_attribute(
        ".dispatch.run.v1.Listener.secret_sha256",
        "#[serde(skip_serializing)]",
    );
    build
        .compile_fds(descriptors)
        .expect("prost and tonic code generation");
}
