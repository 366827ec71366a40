//! `dispatch secret set NAME | ls | rm NAME`: the secrets tools lease.
//!
//! A value is read from standard input (hidden when it is a terminal), never from the
//! command line, where `ps` and shell history would keep it. It is sealed with the
//! workspace's secrets key before it reaches NATS. Nothing here ever prints a value:
//! `ls` shows names and `********`, and `set` given `********` keeps the stored value,
//! so a listing pasted back into a script changes nothing.

use std::io::{IsTerminal as _, Read as _};
use std::path::Path;

use dispatch_bus::Bus;
use dispatch_secrets::{Key, MASK, Set, Store, key_path};
use zeroize::Zeroizing;

use crate::{Failure, Format, exit};

#[derive(Debug, clap::Subcommand)]
pub enum SecretCommand {
    /// Store a secret; its value is read from standard input (`********` keeps the
    /// stored one).
    Set {
        /// 1-64 of A-Z, a-z, 0-9, '_' and '-', starting with a letter.
        name: String,
    },
    /// The secrets' names, where each comes from and when it was set; never values.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a stored secret.
    Rm { name: String },
}

fn failure(e: dispatch_secrets::Error) -> Failure {
    Failure::new(e.to_string())
}

pub async fn run(bus: &Bus, workspace: &Path, command: SecretCommand) -> Result<u8, Failure> {
    let path = key_path(workspace);
    match command {
        SecretCommand::Set { name } => {
            dispatch_secrets::check_name(&name).map_err(failure)?;
            let value = read_value(&name)?;
            let key = Key::load_or_create(&path).map_err(failure)?;
            let store = Store::open(bus, path, Some(key)).await.map_err(failure)?;
            match store.set(&name, &value).await.map_err(failure)? {
                Set::Stored => errln!("secret {name} stored"),
                Set::Kept => errln!("secret {name} unchanged ({MASK} keeps the stored value)"),
            }
            Ok(exit::DONE)
        }
        SecretCommand::Ls { format } => {
            let key = Key::load(&path).map_err(failure)?;
            let store = Store::open(bus, path, key).await.map_err(failure)?;
            let listed = store.list().await.map_err(failure)?;
            match format {
                Format::Json => crate::terminal::json(&listed),
                Format::Table => {
                    outln!("{:<32} {:<10} {:<6} UPDATED", "NAME", "VALUE", "SOURCE");
                    let now = crate::format::now_ms();
                    for secret in &listed {
                        let updated = if secret.updated_unix_ms > 0 {
                            format!("{} ago", crate::format::age(secret.updated_unix_ms, now))
                        } else {
                            "-".to_owned()
                        };
                        let source = match secret.source {
                            dispatch_secrets::Source::Store => "store",
                            dispatch_secrets::Source::Env => "env",
                        };
                        outln!(
                            "{:<32} {:<10} {:<6} {updated}",
                            secret.name,
                            secret.value,
                            source
                        );
                    }
                }
            }
            Ok(exit::DONE)
        }
        SecretCommand::Rm { name } => {
            let key = Key::load(&path).map_err(failure)?;
            let store = Store::open(bus, path, key).await.map_err(failure)?;
            if store.remove(&name).await.map_err(failure)? {
                errln!("secret {name} removed");
                Ok(exit::DONE)
            } else {
                Err(Failure::new(format!("no stored secret named {name}")))
            }
        }
    }
}

/// The value on standard input: typed without echo at a terminal, otherwise all of
/// it, less one trailing line break.
fn read_value(name: &str) -> Result<Zeroizing<String>, Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let value = rpassword::prompt_password(format!("value of {name} (not shown): "))
            .map_err(|e| Failure::new(format!("cannot read the value: {e}")))?;
        return Ok(Zeroizing::new(value));
    }
    let mut value = Zeroizing::new(String::new());
    stdin
        .lock()
        .take(dispatch_secrets::MAX_VALUE_BYTES as u64 + 2)
        .read_to_string(&mut value)
        .map_err(|e| Failure::new(format!("cannot read the value from stdin: {e}")))?;
    let trimmed = value
        .strip_suffix("\r\n")
        .or_else(|| value.strip_suffix('\n'))
        .unwrap_or(&value);
    Ok(Zeroizing::new(trimmed.to_owned()))
}
