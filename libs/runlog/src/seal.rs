//! Sealing: the terminal event of a run carries an Ed25519 signature over its hash,
//! and so over the whole chain before it.
//!
//! The key pair lives in one file (`.dispatch/keys/seal.ed25519`, the 32-byte secret
//! seed in hex), created by whichever process needs it first; its public half is also
//! written beside it (`seal.ed25519.pub`) for readers that should not hold the secret.
//!
//! A seal is only worth the key that made it: readers check it against a [`Trust`],
//! the set of keys allowed to seal runs (the workspace key and keys from the config),
//! never against whatever key the event itself names.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::{Error, ErrorKind};

/// Signs terminal events. Cheap to clone.
#[derive(Clone)]
pub struct Sealer {
    key: SigningKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Sealer({})", self.public_hex())
    }
}

impl Sealer {
    /// Loads the key pair at `path`, creating it (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, Error> {
        let io = |e: std::io::Error| {
            Error::new(
                ErrorKind::Other,
                format!("seal key {}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let fresh = SigningKey::generate(&mut rand_core::OsRng);
        let created = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
        };
        match created {
            Ok(mut file) => {
                file.write_all(hex::encode(fresh.to_bytes()).as_bytes())
                    .map_err(io)?;
                file.sync_all().map_err(io)?;
                let sealer = Self { key: fresh };
                std::fs::write(public_path(path), sealer.public_hex()).map_err(io)?;
                return Ok(sealer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        // Someone else created it, maybe a moment ago: read theirs.
        let mut last = String::new();
        for _ in 0..50 {
            last = std::fs::read_to_string(path).map_err(io)?;
            let seed = hex::decode(last.trim())
                .ok()
                .and_then(|s| <[u8; 32]>::try_from(s.as_slice()).ok());
            if let Some(seed) = seed {
                return Ok(Self {
                    key: SigningKey::from_bytes(&seed),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(Error::new(
            ErrorKind::Other,
            format!(
                "seal key {} is not a 32-byte hex seed ({} bytes)",
                path.display(),
                last.len()
            ),
        ))
    }

    /// Loads the key pair at `path`; an error if there is none (nothing is created).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("seal key {}: {e}", path.display()),
            )
        })?;
        let seed = hex::decode(text.trim())
            .ok()
            .and_then(|s| <[u8; 32]>::try_from(s.as_slice()).ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Other,
                    format!("seal key {} is not a 32-byte hex seed", path.display()),
                )
            })?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    pub fn sign(&self, hash: &[u8]) -> [u8; 64] {
        self.key.sign(hash).to_bytes()
    }
}

/// Checks `signature` over `hash` by `signer`.
pub fn verify(signer: &[u8], hash: &[u8], signature: &[u8]) -> Result<(), String> {
    let signer: [u8; 32] = signer
        .try_into()
        .map_err(|_| "the signer is not a 32-byte Ed25519 key".to_owned())?;
    let key = VerifyingKey::from_bytes(&signer).map_err(|e| format!("bad signer key: {e}"))?;
    let signature: [u8; 64] = signature
        .try_into()
        .map_err(|_| "the signature is not 64 bytes".to_owned())?;
    key.verify(hash, &Signature::from_bytes(&signature))
        .map_err(|_| "the seal's signature does not match".to_owned())
}

/// Where the public half of the key at `secret` is kept.
pub fn public_path(secret: &Path) -> std::path::PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    name.into()
}

/// Parses a 32-byte Ed25519 public key written in hex.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    hex::decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
        .ok_or_else(|| {
            format!(
                "{:?} is not an Ed25519 public key (64 hex characters)",
                text.trim()
            )
        })
}

/// The keys whose seals a reader accepts. Cheap to clone.
///
/// The workspace key is read lazily: a reader that starts before any run was sealed
/// (so before the key exists) looks for it again when it meets a signer it does not
/// know yet.
#[derive(Clone, Default)]
pub struct Trust {
    configured: Vec<[u8; 32]>,
    /// The workspace's secret key file; its public half is trusted once it exists.
    workspace_key: Option<std::path::PathBuf>,
    loaded: std::sync::Arc<std::sync::Mutex<Option<[u8; 32]>>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field(
                "configured",
                &self.configured.iter().map(hex::encode).collect::<Vec<_>>(),
            )
            .field("workspace_key", &self.workspace_key)
            .finish()
    }
}

impl Trust {
    /// Trusts exactly `keys`.
    pub fn keys(keys: impl IntoIterator<Item = [u8; 32]>) -> Self {
        Self {
            configured: keys.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Also trusts `key`.
    pub fn add(&mut self, key: [u8; 32]) {
        if !self.configured.contains(&key) {
            self.configured.push(key);
        }
    }

    /// Also trusts the workspace key kept at `secret` (the public half is read, from
    /// `<secret>.pub` if present, else derived from the secret).
    pub fn with_workspace_key(mut self, secret: &Path) -> Self {
        self.workspace_key = Some(secret.to_path_buf());
        self
    }

    /// Whether a seal by `signer` is accepted.
    pub fn trusts(&self, signer: &[u8]) -> bool {
        let Ok(signer) = <[u8; 32]>::try_from(signer) else {
            return false;
        };
        if self.configured.contains(&signer) {
            return true;
        }
        self.workspace_public() == Some(signer)
    }

    /// The workspace key's public half, if there is one yet.
    pub fn workspace_public(&self) -> Option<[u8; 32]> {
        let path = self.workspace_key.as_ref()?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.is_none() {
            let public = std::fs::read_to_string(public_path(path))
                .ok()
                .and_then(|text| parse_public_key(&text).ok())
                .or_else(|| Sealer::load(path).ok().map(|s| s.public_key()));
            *loaded = public;
        }
        *loaded
    }

    /// Every trusted key, hex, for messages.
    pub fn describe(&self) -> Vec<String> {
        self.configured
            .iter()
            .copied()
            .chain(self.workspace_public())
            .map(hex::encode)
            .collect()
    }
}
