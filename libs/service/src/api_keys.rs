//! API keys for the HTTP front door: created and revoked with the CLI, checked by
//! ingress, stored only as SHA-256 digests.
//!
//! The store is one JSON file (`.dispatch/auth/api-keys.json`, mode 0600) in the
//! workspace, which every ingress copy reads (re-reading it when it changes), so a key
//! revoked with `dispatch api-key rm` stops working without a restart. A key is
//! `dsk_<id>_<secret>`: the id names it in listings and logs, the secret is 32 random
//! bytes; only `sha256(key)` is stored, so the file reveals no usable key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the digests are kept.
pub fn store_path(workspace: &Path) -> PathBuf {
    crate::layout::auth_dir(workspace).join("api-keys.json")
}

/// Where `dispatch up` leaves the local user's own key (a secret, mode 0600).
pub fn local_key_path(workspace: &Path) -> PathBuf {
    crate::layout::auth_dir(workspace).join("http-token")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("no API key with id {0:?}")]
    Unknown(String),
    #[error("name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
}

/// One key as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    pub created_unix_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub keys: Vec<StoredKey>,
}

impl Store {
    /// Reads the store; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let fail = |message: String| Error::File {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The id of the key `presented`, if it is one of ours.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let digest = digest(presented);
        self.keys
            .iter()
            .find(|k| k.sha256 == digest)
            .map(|k| k.id.as_str())
    }

    /// Adds a new key called `name`; returns it (the only time it is ever shown).
    pub fn create(&mut self, name: &str) -> Result<String, Error> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(Error::BadName(name.to_owned()));
        }
        let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
        let mut secret = [0u8; 32];
        getrandom(&mut secret);
        let key = format!("dsk_{id}_{}", hex::encode(secret));
        self.keys.push(StoredKey {
            id,
            name: name.to_owned(),
            sha256: digest(&key),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        });
        Ok(key)
    }

    /// Revokes the key `id`.
    pub fn remove(&mut self, id: &str) -> Result<StoredKey, Error> {
        let at = self
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or_else(|| Error::Unknown(id.to_owned()))?;
        Ok(self.keys.remove(at))
    }

    /// Writes the store atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(self).expect("the store serializes");
        write_secret(path, &text)
    }
}

/// Writes `bytes` to `path` atomically, readable by the owner only.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    dispatch_bus::auth::write_private(path, bytes).map_err(|e| Error::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn getrandom(out: &mut [u8]) {
    use rand_core::RngCore;
    rand_core::OsRng.fill_bytes(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_as_digests_and_checked_revoked_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth/api-keys.json");
        let mut store = Store::load(&path).unwrap();
        let key = store.create("laptop").unwrap();
        store.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&key[20..]), "the secret is not stored");
        let store = Store::load(&path).unwrap();
        let id = store.check(&key).expect("our key").to_owned();
        assert!(key.starts_with(&format!("dsk_{id}_")));
        assert_eq!(store.check("dsk_nope"), None);
        let mut store = store;
        store.remove(&id).unwrap();
        assert_eq!(store.check(&key), None);
        assert!(matches!(store.remove(&id), Err(Error::Unknown(_))));
        assert!(matches!(store.create("a b"), Err(Error::BadName(_))));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
