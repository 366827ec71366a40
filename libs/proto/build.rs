//! Compiles `proto/` with protox, so building Dispatch needs no `protoc`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("dispatch/run/v1/events.proto"),
        root.join("dispatch/command/v1/commands.proto"),
        root.join("dispatch/ledger/v1/ledger.proto"),
        root.join("dispatch/policy/v1/policy.proto"),
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
    tonic_prost_build::configure()
        // Events and commands can be shown as JSON (logs, exported trails).
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)
        .expect("prost and tonic code generation");
}
