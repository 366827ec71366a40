//! `dispatch attach CONVERSATION`: follow a conversation's stream in a terminal.
//!
//! Reads the conversation stream straight from the bus (an ordered consumer on the
//! conversation's subject), from what comes next, or with `--all` from the oldest
//! chunk still buffered. As text it prints the model's words as they arrive, a line
//! per tool call and result, and each run's start and end; `--format json` prints each
//! chunk as a JSON line with its cursor. `--exit` returns after the next run ends, with
//! the exit code of `dispatch wait` (0 done, 1 blocked, 2 stopped). It ends with an
//! error when the connection to NATS is lost (the buffer may have lost what it had not
//! shown yet).

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
    // The buffer may be kept in memory: a connection lost may have lost chunks not yet
    // read, and going on past them would show the conversation with a hole.
    let mut losses = bus.connection_losses();
    losses.borrow_and_update();
    loop {
        let message = tokio::select! {
            message = chunks.next() => message,
            _ = losses.changed() => {
                return Err(Failure::new(
                    "lost the connection to NATS; chunks not yet shown may be gone from the buffer \
                     (`dispatch logs RUN` has every event of a run): attach again to go on",
                ));
            }
        };
        let Some(message) = message else { break };
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
        let shown = match format {
            Format::Json => {
                let line = serde_json::json!({"id": format!("{seq}-{run}"), "chunk": chunk});
                crate::terminal::json_line(&line) + "\n"
            }
            Format::Table => show(&chunk, &mut at_line_start),
        };
        // What reaches the terminal goes through its one way out, escaped.
        let written = out.write_all(crate::terminal::safe(&shown).as_bytes());
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

/// One chunk as a person reads it: text as it comes (its lines kept), everything else
/// on a line of its own. Model and tool text is untrusted: nothing in it reaches the
/// terminal raw (see [`crate::terminal`]).
pub(crate) fn show(chunk: &Value, at_line_start: &mut bool) -> String {
    let mut line = |text: String| {
        let before = if *at_line_start { "" } else { "\n" };
        *at_line_start = true;
        format!("{before}{text}\n")
    };
    let word = |v: &Value| crate::format::clip(v.as_str().unwrap_or_default(), 120);
    match chunk["type"].as_str().unwrap_or_default() {
        "text-delta" => {
            let delta = dispatch_runlog::many_lines(chunk["delta"].as_str().unwrap_or_default());
            *at_line_start = delta.ends_with('\n');
            delta
        }
        "tool-input-available" => line(format!(
            "→ {} {}",
            word(&chunk["toolName"]),
            first_line(&chunk["input"].to_string())
        )),
        "tool-output-available" => line(format!(
            "← {}",
            first_line(chunk["output"].as_str().unwrap_or_default())
        )),
        "tool-output-error" => line(format!(
            "✗ {}",
            first_line(chunk["errorText"].as_str().unwrap_or_default())
        )),
        "tool-output-denied" => line("✗ denied".to_owned()),
        "data-approval" if chunk["data"]["state"] == "waiting" => line(format!(
            "… waiting for approval {} ({})",
            word(&chunk["data"]["approval"]),
            word(&chunk["data"]["tool"])
        )),
        "data-run" => {
            let data = &chunk["data"];
            match data["status"].as_str().unwrap_or_default() {
                "queued" => line(format!("● run {} queued", word(&data["run"]))),
                "running" => String::new(),
                _ => line(format!(
                    "● run {} {}: {}",
                    word(&data["run"]),
                    word(&data["status"]),
                    crate::format::clip(data["reason"].as_str().unwrap_or_default(), 300)
                )),
            }
        }
        "data-leaf" if chunk["data"]["state"] == "doing" => {
            line(format!("▸ {}", word(&chunk["data"]["title"])))
        }
        _ => String::new(),
    }
}

/// The first line of `text`, at most 120 characters, escaped; `…` when more was cut.
fn first_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let cut = crate::format::clip(first, 120);
    if first.len() < text.trim_end().len() || first.chars().count() > 120 {
        format!("{cut}…")
    } else {
        cut
    }
}
