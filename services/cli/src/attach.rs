//! `dispatch attach CONVERSATION`: follow a conversation's stream in a terminal.
//!
//! Reads the conversation stream straight from the bus (an ordered consumer on the
//! conversation's subject), from what comes next, or with `--all` from the oldest
//! chunk still buffered. As text it prints the model's words as they arrive, a line
//! per tool call and result, and each run's start and end; `--format json` prints each
//! chunk as a JSON line with its cursor. `--exit` returns after the next run ends, with
//! the exit code of `dispatch wait` (0 done, 1 blocked, 2 stopped).

use std::io::Write as _;

use dispatch_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull};
use dispatch_bus::{Bus, ConversationId, streams, subject};
use futures::StreamExt as _;
use serde_json::Value;

use crate::{Failure, Format, exit};

pub async fn attach(
    bus: &Bus,
    conversation: &str,
    all: bool,
    once: bool,
    format: Format,
) -> Result<u8, Failure> {
    let conversation: ConversationId = conversation
        .parse()
        .map_err(|e: dispatch_bus::IdError| Failure::new(e.to_string()))?;
    let stream = bus
        .jetstream()
        .get_stream(streams::CONVERSATIONS)
        .await
        .map_err(|e| Failure::new(format!("cannot open the conversation stream: {e}")))?;
    let mut chunks = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject::conv::of(&conversation).to_string(),
            deliver_policy: if all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Failure::new(format!("cannot follow the conversation: {e}")))?
        .messages()
        .await
        .map_err(|e| Failure::new(format!("cannot follow the conversation: {e}")))?;
    let mut out = std::io::stdout().lock();
    let mut at_line_start = true;
    while let Some(message) = chunks.next().await {
        let Ok(message) = message else { continue };
        let Ok(chunk) = serde_json::from_slice::<Value>(&message.payload) else {
            continue;
        };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let run = message
            .headers
            .as_ref()
            .and_then(|h| h.get(subject::conv::RUN_HEADER))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let ended = ended(&chunk);
        let written = match format {
            Format::Json => writeln!(
                out,
                "{}",
                serde_json::json!({"id": format!("{seq}-{run}"), "chunk": chunk})
            ),
            Format::Table => show(&mut out, &chunk, &mut at_line_start),
        };
        if written.and_then(|()| out.flush()).is_err() {
            // Whoever read the output went away, as `dispatch logs X | head` does.
            return Ok(exit::PIPE_CLOSED);
        }
        if once && let Some(code) = ended {
            return Ok(code);
        }
    }
    Ok(exit::DONE)
}

/// The exit code a run's final `data-run` chunk stands for.
fn ended(chunk: &Value) -> Option<u8> {
    if chunk["type"] != "data-run" {
        return None;
    }
    match chunk["data"]["status"].as_str()? {
        "done" => Some(exit::DONE),
        "blocked" => Some(exit::BLOCKED),
        "stopped" => Some(exit::STOPPED),
        _ => None,
    }
}

/// Prints one chunk for a person: text as it comes, everything else on its own line.
fn show(
    out: &mut impl std::io::Write,
    chunk: &Value,
    at_line_start: &mut bool,
) -> std::io::Result<()> {
    let mut line = |out: &mut dyn std::io::Write, text: String| {
        if !*at_line_start {
            writeln!(out)?;
        }
        *at_line_start = true;
        writeln!(out, "{text}")
    };
    // Model and tool text is untrusted: no terminal control sequences get through.
    let text = |v: &Value| printable(v.as_str().unwrap_or_default());
    match chunk["type"].as_str().unwrap_or_default() {
        "text-delta" => {
            let delta = text(&chunk["delta"]);
            *at_line_start = delta.ends_with('\n');
            write!(out, "{delta}")
        }
        "tool-input-available" => line(
            out,
            format!(
                "→ {} {}",
                text(&chunk["toolName"]),
                one_line(&printable(&chunk["input"].to_string()))
            ),
        ),
        "tool-output-available" => line(out, format!("← {}", one_line(&text(&chunk["output"])))),
        "tool-output-error" => line(out, format!("✗ {}", one_line(&text(&chunk["errorText"])))),
        "tool-output-denied" => line(out, "✗ denied".to_owned()),
        "data-approval" if chunk["data"]["state"] == "waiting" => line(
            out,
            format!(
                "… waiting for approval {} ({})",
                text(&chunk["data"]["approval"]),
                text(&chunk["data"]["tool"])
            ),
        ),
        "data-run" => {
            let data = &chunk["data"];
            match data["status"].as_str().unwrap_or_default() {
                "queued" => line(out, format!("● run {} queued", text(&data["run"]))),
                "running" => Ok(()),
                status => line(
                    out,
                    format!(
                        "● run {} {status}: {}",
                        text(&data["run"]),
                        text(&data["reason"])
                    ),
                ),
            }
        }
        "data-leaf" if chunk["data"]["state"] == "doing" => {
            line(out, format!("▸ {}", text(&chunk["data"]["title"])))
        }
        _ => Ok(()),
    }
}

/// `text` without control characters but newlines and tabs (an escape sequence from a
/// model or a tool could rewrite the terminal).
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

/// The first line of `text`, at most 120 characters.
fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let cut: String = first.chars().take(120).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}
