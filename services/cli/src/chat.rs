//! `dispatch chat [CONVERSATION]`: talk to a conversation in a terminal.
//!
//! Each line typed is a message: a turn of the conversation (the agent loop over its
//! history), queued behind a turn still running. The answer is shown as it streams,
//! with a line per tool call and result, read from the turn's own log (as chunks of the
//! conversation stream, `dispatch-chunks`, printed as `dispatch attach` prints them), so
//! it needs no streamer. End of input or Ctrl-C leaves; a turn still running goes on.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::time::Duration;

use dispatch_bus::{Bus, ConversationId, RunId};
use dispatch_runlog::RunLog;
use dispatch_runlog::submit::{Goal, Submission};
use dispatch_runlog::turn::Busy;

use crate::{Failure, exit};

/// The origin of the turns typed here.
const ORIGIN: &str = "chat";

pub async fn chat(bus: &Bus, log: &RunLog, conversation: Option<String>) -> Result<u8, Failure> {
    let conversation: ConversationId = match conversation {
        Some(c) => c
            .parse()
            .map_err(|e: dispatch_bus::IdError| Failure::new(e.to_string()))?,
        None => format!("chat-{}", &RunId::new().to_string()[24..])
            .parse()
            .expect("a conversation id"),
    };
    let terminal = std::io::stdin().is_terminal();
    if terminal {
        errln!("conversation {conversation} (Ctrl-D or Ctrl-C leaves)");
    }
    // Lines are read on a thread of their own: stdin blocks.
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(1);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            if terminal {
                err!("> ");
            }
            line.clear();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if lines_tx.blocking_send(line.clone()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut code = exit::DONE;
    while let Some(line) = lines.recv().await {
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let goal = Goal::new(text, conversation.as_str(), 0, ORIGIN)
            .map_err(|e| Failure::new(e.to_string()))?
            .turn(Busy::Queue);
        let submission = Submission::new(goal);
        submission.submit(bus).await?;
        code = show_turn(log, submission.run_id()).await?;
    }
    Ok(code)
}

/// Prints the turn `run_id` as it goes, until it ends; the exit code of how it ended.
async fn show_turn(log: &RunLog, run_id: RunId) -> Result<u8, Failure> {
    let mut handle = log.handle(run_id).await?;
    let mut shown = 0;
    let mut at_line_start = true;
    let mut out = std::io::stdout().lock();
    let run = run_id.to_string();
    loop {
        for stored in &handle.events()[shown..] {
            for chunk in dispatch_chunks::of(&run, &stored.event) {
                // The turn's own start and a plain `done` say nothing a person needs.
                let quiet = chunk["type"] == "data-run"
                    && matches!(
                        chunk["data"]["status"].as_str(),
                        Some("queued" | "running" | "done")
                    );
                if quiet || chunk["type"] == "data-leaf" {
                    continue;
                }
                let text = crate::attach::show(&chunk, &mut at_line_start);
                // What reaches the terminal goes through its one way out, escaped.
                let written = out.write_all(crate::terminal::safe(&text).as_bytes());
                if written.and_then(|()| out.flush()).is_err() {
                    return Ok(exit::PIPE_CLOSED);
                }
            }
            if let Some(dispatch_proto::run::v1::run_event::Body::RunFinished(f)) =
                &stored.event.body
            {
                if !at_line_start {
                    let _ = writeln!(out);
                }
                return Ok(match f.status() {
                    dispatch_proto::run::v1::RunStatus::Done => exit::DONE,
                    dispatch_proto::run::v1::RunStatus::Stopped => exit::STOPPED,
                    _ => exit::BLOCKED,
                });
            }
        }
        shown = handle.events().len();
        handle.wait_for_more(Duration::from_secs(5)).await?;
    }
}
