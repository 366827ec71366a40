//! `dispatch memory ls | rm KEY`: what the agents remember (the `memory` tools keep
//! it; `dispatch-memory` holds the store). A person reads and removes entries here;
//! the agents' own changes are calls in their runs' logs.

use dispatch_bus::Bus;
use dispatch_memory::{Memory, Owner};

use crate::{Failure, Format, exit};

#[derive(Debug, clap::Subcommand)]
pub enum MemoryCommand {
    /// What is remembered, by key.
    Ls {
        /// Only entries of this kind (preference, note, person, document, todo).
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Forget what keys hold.
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

fn failure(e: dispatch_memory::Error) -> Failure {
    Failure::new(e.to_string())
}

pub async fn run(bus: &Bus, command: MemoryCommand) -> Result<u8, Failure> {
    let memory = Memory::open(bus).await.map_err(failure)?;
    let owner = Owner::default();
    match command {
        MemoryCommand::Ls { kind, format } => {
            let mut entries = memory.list(&owner).await.map_err(failure)?;
            if let Some(kind) = &kind {
                entries.retain(|e| &e.kind == kind);
            }
            match format {
                Format::Json => crate::terminal::json(&entries),
                Format::Table => {
                    outln!("{:<32} {:<10} {:<10} TEXT", "KEY", "KIND", "UPDATED");
                    let now = crate::format::now_ms();
                    for entry in &entries {
                        let text: String =
                            entry.text.split_whitespace().collect::<Vec<_>>().join(" ");
                        outln!(
                            "{:<32} {:<10} {:<10} {}",
                            entry.key,
                            entry.kind,
                            format!("{} ago", crate::format::age(entry.updated_at_ms, now)),
                            crate::format::clip(&text, 100)
                        );
                    }
                }
            }
            Ok(exit::DONE)
        }
        MemoryCommand::Rm { keys } => {
            let mut missing = Vec::new();
            for key in &keys {
                match memory.forget(&owner, key).await.map_err(failure)? {
                    true => errln!("forgot {key}"),
                    false => missing.push(key.clone()),
                }
            }
            match missing.is_empty() {
                true => Ok(exit::DONE),
                false => Err(Failure::new(format!(
                    "nothing is remembered under {}",
                    missing.join(", ")
                ))),
            }
        }
    }
}
