//! Sealing: the terminal event of a run carries an Ed25519 signature over its hash,
//! and so over the whole chain before it.
//!
//! The key pair lives in one file (`.dispatch/keys/seal.ed25519`, the 32-byte secret
//! seed in hex), created by whichever process needs it first.

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
                return Ok(Self { key: fresh });
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
