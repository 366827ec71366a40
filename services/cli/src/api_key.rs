//! `dispatch api-key`: the keys HTTP clients send as `Authorization: Bearer <key>`.

use std::path::Path;

use dispatch_service::api_keys::{self, Store};

use crate::{Failure, exit};

#[derive(Debug, clap::Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it (the only time it is shown; only its digest is kept).
    Create {
        /// What the key is for, e.g. the client's name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// List the keys: id, name, created (never the keys themselves).
    Ls,
    /// Revoke a key by id; ingress refuses it from the next request on.
    Rm { id: String },
}

pub fn run(workspace: &Path, command: ApiKeyCommand) -> Result<u8, Failure> {
    let path = api_keys::store_path(workspace);
    let mut store = Store::load(&path).map_err(|e| Failure::new(e.to_string()))?;
    match command {
        ApiKeyCommand::Create { name } => {
            let key = store
                .create(&name)
                .map_err(|e| Failure::new(e.to_string()))?;
            store.save(&path).map_err(|e| Failure::new(e.to_string()))?;
            outln!("{key}");
        }
        ApiKeyCommand::Ls => {
            let now = crate::format::now_ms();
            for key in &store.keys {
                let age = crate::format::age(key.created_unix_ms, now);
                outln!("{}  {:<24} created {age} ago", key.id, key.name);
            }
        }
        ApiKeyCommand::Rm { id } => {
            let removed = store.remove(&id).map_err(|e| Failure::new(e.to_string()))?;
            store.save(&path).map_err(|e| Failure::new(e.to_string()))?;
            errln!("revoked {} ({})", removed.id, removed.name);
        }
    }
    Ok(exit::DONE)
}

/// Makes sure the local user has a key: on first `dispatch up`, creates one called
/// `local` and leaves it in `.dispatch/auth/http-token` (mode 0600).
pub fn ensure_local(workspace: &Path) -> Result<(), Failure> {
    let token = api_keys::local_key_path(workspace);
    let path = api_keys::store_path(workspace);
    let mut store = Store::load(&path).map_err(|e| Failure::new(e.to_string()))?;
    let known = std::fs::read_to_string(&token)
        .ok()
        .is_some_and(|key| store.check(key.trim()).is_some());
    if !known {
        let key = store
            .create("local")
            .map_err(|e| Failure::new(e.to_string()))?;
        store.save(&path).map_err(|e| Failure::new(e.to_string()))?;
        api_keys::write_secret(&token, format!("{key}\n").as_bytes())
            .map_err(|e| Failure::new(e.to_string()))?;
    }
    Ok(())
}
