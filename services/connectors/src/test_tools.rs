//! Tools for testing Dispatch itself, the `test` connector, offered only with
//! `--test-tools`: `test.sleep` (a slow call, to test deadlines and cancellation),
//! `test.count` (a side effect whose every execution is recorded, to prove no call runs
//! twice; `test.erase` and `test.send` do the same as destructive and external calls, for
//! the permission gate) and `test.crash` (aborts the connector process the moment the command
//! arrives, before anything is recorded: a poison message, to prove such a command is
//! given up after its last delivery).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use dispatch_bus::catalogue::{Risk, ToolEntry};
use serde::Deserialize;

/// The connector's name: the namespace of its tools.
pub const CONNECTOR: &str = "test";

/// The test tool whose command kills the process that takes it.
pub const CRASH: &str = "test.crash";

/// The catalogue entries of the test tools.
pub fn entries() -> Vec<ToolEntry> {
    let entry = |tool, description, parameters, risk| {
        ToolEntry::builtin(CONNECTOR, tool, description, parameters, risk)
    };
    vec![
        entry(
            "sleep",
            "Wait ms milliseconds, then write call's id to scratch file marker if given.",
            serde_json::json!({"type": "object", "required": ["ms"], "properties": {
                "ms": {"type": "integer"}, "marker": {"type": "string"}}}),
            Risk::Read,
        ),
        entry(
            "count",
            "Record one execution under key.",
            serde_json::json!({"type": "object", "required": ["key"], "properties": {
                "key": {"type": "string"}}}),
            Risk::Write,
        ),
        entry(
            "erase",
            "Record one execution under key, as a destructive call.",
            serde_json::json!({"type": "object", "required": ["key"], "properties": {
                "key": {"type": "string"}}}),
            Risk::Destructive,
        ),
        entry(
            "send",
            "Record one execution under key, as a call reaching outside.",
            serde_json::json!({"type": "object", "required": ["key"], "properties": {
                "key": {"type": "string"}}}),
            Risk::External,
        ),
        entry(
            "crash",
            "Abort the connector process that takes the call.",
            serde_json::json!({"type": "object"}),
            Risk::Destructive,
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
    /// A scratch file written once the sleep completes (absent if it was cancelled).
    #[serde(default)]
    marker: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountArgs {
    key: String,
    /// Any text, unused: for calls whose arguments are long (an approval's listing
    /// clips them).
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

/// Runs test tool `tool` (its name inside the connector) for call `call_id` of `run_id`.
pub async fn call(
    workspace: &Path,
    run_dir: &Path,
    run_id: &str,
    call_id: &str,
    tool: &str,
    args_json: &str,
) -> Result<String, String> {
    let bad = |e: serde_json::Error| format!("bad arguments for {tool}: {e}");
    match tool {
        "sleep" => {
            let args: SleepArgs = serde_json::from_str(args_json).map_err(bad)?;
            tokio::time::sleep(Duration::from_millis(args.ms)).await;
            if let Some(marker) = args.marker {
                let content = serde_json::json!({ "path": marker, "content": call_id }).to_string();
                crate::files::call(run_dir, "write_file", &content).map_err(|e| e.to_string())?;
            }
            Ok(format!("slept {} ms", args.ms))
        }
        // The same side effect under three risk classes, for the permission gate.
        "count" | "erase" | "send" => {
            let args: CountArgs = serde_json::from_str(args_json).map_err(bad)?;
            let safe = !args.key.is_empty()
                && args.key.len() <= 64
                && args
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !safe {
                return Err(format!(
                    "count key {:?} must be 1-64 letters, digits, '-' or '_'",
                    args.key
                ));
            }
            let dir = dispatch_service::layout::state_dir(workspace).join("counters");
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{}.log", args.key)))
                .map_err(|e| e.to_string())?;
            file.write_all(format!("{run_id} {call_id}\n").as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(format!("counted {}", args.key))
        }
        other => Err(format!("unknown test tool {other:?}")),
    }
}
