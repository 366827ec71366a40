//! `dispatch todo add|ls|done`: the fourth origin. A todo becomes a run when it is due
//! (at once without a due time), started by the scheduler like a schedule's fire, with
//! origin `todo`; `ls` shows each todo with the state of its run.

use std::time::Duration;

use dispatch_bus::{Bus, subject};
use dispatch_proto::api::v1::{
    AddScheduleRequest, GetRunRequest, RunView, Schedule, ScheduleIdRequest,
};
use dispatch_proto::api::{QueryError, Reply};

use crate::schedule::{ask, when};
use crate::{Failure, Format, exit};

#[derive(Debug, clap::Subcommand)]
pub enum TodoCommand {
    /// Add a todo; it becomes a run when due. Prints its id.
    Add {
        /// What is to be done.
        text: String,
        /// When: a time (`2026-11-22T15:00:00Z`) or a wait from now (`10m`); none: now.
        #[arg(long)]
        due: Option<String>,
        #[arg(long, default_value = "default")]
        conversation: String,
    },
    /// Every todo, with the state of its run (`pending` until it is due).
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check a todo off (its id, last 12 characters, or a unique prefix): it leaves the
    /// list; its run, if it has one, stays.
    Done { todo: String },
}

/// A todo as `ls` shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Listed {
    pub(crate) todo_id: String,
    pub(crate) text: String,
    pub(crate) due_at_ms: i64,
    /// `pending` until it is due, then its run's status.
    pub(crate) state: String,
    pub(crate) run_id: Option<String>,
}

pub async fn run(bus: &Bus, command: TodoCommand) -> Result<u8, Failure> {
    match command {
        TodoCommand::Add {
            text,
            due,
            conversation,
        } => {
            let due_at_ms = match due.as_deref() {
                None => 0,
                Some(due) => parse_due(due, crate::format::now_ms())?,
            };
            let request = AddScheduleRequest {
                goal: text,
                conversation_id: conversation,
                todo: true,
                due_at_ms,
                created_by: crate::gate::person(None),
                ..Default::default()
            };
            let todo: Schedule = ask(bus, subject::schedule::add(), &request).await?;
            outln!("{}", todo.schedule_id);
            Ok(exit::DONE)
        }
        TodoCommand::Ls { format } => {
            let mut listed = Vec::new();
            for todo in crate::schedule::every(bus).await? {
                if todo.todo {
                    listed.push(listed_of(bus, todo).await?);
                }
            }
            match format {
                Format::Json => crate::terminal::json(&listed),
                Format::Table => out!("{}", table(&listed)),
            }
            Ok(exit::DONE)
        }
        TodoCommand::Done { todo } => {
            let found: Schedule = ask(
                bus,
                subject::schedule::get(),
                &ScheduleIdRequest {
                    schedule_id: todo.clone(),
                },
            )
            .await?;
            if !found.todo {
                return Err(Failure::new(format!(
                    "{todo} is a schedule, not a todo; `dispatch schedule rm` removes it"
                )));
            }
            let done: Schedule = ask(
                bus,
                subject::schedule::rm(),
                &ScheduleIdRequest {
                    schedule_id: found.schedule_id,
                },
            )
            .await?;
            outln!("{}", done.schedule_id);
            Ok(exit::DONE)
        }
    }
}

/// `dispatch todo ls` as a table.
pub(crate) fn table(listed: &[Listed]) -> String {
    let rows = listed.iter().map(|t| {
        [
            dispatch_bus::short_id(&t.todo_id).to_owned(),
            when(t.due_at_ms),
            t.state.clone(),
            crate::format::clip(&t.text, 60),
        ]
    });
    crate::format::plain_table(["ID", "DUE", "STATE", "TODO"], rows)
}

/// The todo with the state of its run, as the ledger has it.
async fn listed_of(bus: &Bus, todo: Schedule) -> Result<Listed, Failure> {
    let run_id = (!todo.last_run_id.is_empty()).then(|| todo.last_run_id.clone());
    let state = match &run_id {
        None => "pending".to_owned(),
        Some(id) => {
            let reply: Result<Reply<RunView>, _> = bus
                .request_json(
                    subject::query::run(),
                    &GetRunRequest { id: id.clone() },
                    Duration::from_secs(10),
                )
                .await;
            match reply {
                Ok(Ok(view)) => view.status().word().to_owned(),
                // Stored, and not in the ledger's views yet.
                Ok(Err(QueryError::NotFound(_))) => "queued".to_owned(),
                Ok(Err(e)) => return Err(Failure::new(e.to_string())),
                Err(e) => {
                    return Err(Failure::new(format!(
                        "{e}; is the ledger running (`dispatch up`)?"
                    )));
                }
            }
        }
    };
    Ok(Listed {
        todo_id: todo.schedule_id,
        text: todo.goal,
        due_at_ms: todo.last_fired_at_ms.max(todo.next_fire_at_ms),
        state,
        run_id,
    })
}

/// A due time: an RFC 3339 time, or a wait from `now_ms` such as `90s` or `2h`.
fn parse_due(text: &str, now_ms: i64) -> Result<i64, Failure> {
    if let Ok(wait) = humantime::parse_duration(text.trim()) {
        return Ok(now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)));
    }
    let at = humantime::parse_rfc3339_weak(text.trim()).map_err(|_| {
        Failure::new(format!(
            "--due {text:?}: give a time like 2026-11-22T15:00:00Z or a wait like 10m"
        ))
    })?;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| Failure::new(format!("--due {text:?} is before 1970")))?
        .as_millis();
    i64::try_from(ms).map_err(|_| Failure::new(format!("--due {text:?} is too far ahead")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_time_is_a_time_or_a_wait() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_due("90s", now).unwrap(), now + 90_000);
        assert_eq!(
            parse_due("2026-11-22T15:00:00Z", now).unwrap(),
            1_795_359_600_000
        );
        assert!(parse_due("tomorrowish", now).is_err());
    }
}
