//! Secrets: named values that tools need (an API token) and nothing else may see.
//!
//! Where they live:
//! - environment variables `DISPATCH_SECRET_<NAME>` of the process that uses them (the
//!   connectors, the streamer), for local use (they win, as environment wins over
//!   files everywhere in Dispatch);
//! - the JetStream KV bucket `DISPATCH_SECRETS`, each value sealed with
//!   XChaCha20-Poly1305 under a 256-bit key kept in `.dispatch/keys/secrets.key`
//!   (mode 0600; a key file others can read is refused). The value's name is bound
//!   into the seal, so a value moved under another name does not open. NATS holds only
//!   ciphertext; only the CLI may write the bucket. The connectors and the streamer
//!   lease from it, ingress reads Standard Webhooks keys from it, and the front doors
//!   ask whether the delivery signing secret is set.
//!
//! How they are used: connector configuration names a secret; for each call that needs
//! it the connectors take a [`Lease`] scoped to that connector, that run and that call,
//! which hands the value out only until the call's deadline and wipes it when dropped.
//! Whatever the call answers is passed through [`Lease::scrub`] before it goes into an
//! event, so a server that echoes the credential back shows [`MASK`]. A connector that
//! serves every run over one connection (an MCP server) takes a lease per connection
//! instead, and checks with [`Store::still_current`] that its values were not changed.
//!
//! The streamer signs deliveries of run results with [`DELIVERY_SIGNING`] (leased like
//! a connector's secret); the front doors only ask whether it is set ([`check_signing`]).
//!
//! What this crate does not do: decide which connector may use which secret (the
//! connectors' configuration does, see `Grants`), or keep a value out of a process
//! started with it in its environment (a stdio MCP server holds what it was given).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::{Bus, streams};
use futures::StreamExt as _;
use zeroize::Zeroizing;

/// What a secret's value is shown as, everywhere. Sent back in an update, it means
/// "keep the stored value".
pub const MASK: &str = "********";

/// The environment variable prefix of local secrets.
pub const ENV_PREFIX: &str = "DISPATCH_SECRET_";

/// The longest value accepted.
pub const MAX_VALUE_BYTES: usize = 8 * 1024;

/// The shortest value scrubbed from output. Shorter ones would mask ordinary words,
/// and are too short to be credentials worth the name.
pub const MIN_SCRUBBED_BYTES: usize = 4;

/// The secret every delivery of a run's result to its callback is signed with
/// (Standard Webhooks, a `whsec_…` value). The streamer signs with it; the front doors
/// refuse a goal with a callback while it is not set ([`check_signing`]).
pub const DELIVERY_SIGNING: &str = "webhook-signing";

/// Version byte of the sealed format: `1 | nonce (24) | ciphertext+tag`.
const SEALED_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secret name {0:?}: use 1-64 of A-Z, a-z, 0-9, '_' and '-', starting with a letter")]
    BadName(String),
    #[error("secret {name}: {why}")]
    BadValue { name: String, why: String },
    #[error("no secret named {0} (set it with `dispatch secret set {0}`)")]
    NotFound(String),
    #[error("secret {name} is not granted to the {connector} connector")]
    NotGranted { name: String, connector: String },
    #[error("secret {0} could not be opened: it was sealed with another key, or altered")]
    Unsealable(String),
    #[error("secrets key {path}: {why}")]
    Key { path: String, why: String },
    #[error("secrets bucket: {0}")]
    Bucket(String),
}

/// Why a result delivered now could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum Unsignable {
    #[error(
        "results cannot be delivered: no secret named {DELIVERY_SIGNING} signs them (set one with \
         `dispatch secret set {DELIVERY_SIGNING}`, a whsec_… value), so a goal with a callback \
         is refused"
    )]
    Missing,
    #[error("cannot tell whether results can be delivered signed: {0}")]
    Unknown(String),
}

impl Unsignable {
    /// The stable, matchable name of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Unsignable::Missing => "no_signing_secret",
            Unsignable::Unknown(_) => "secrets_unavailable",
        }
    }
}

/// Whether results delivered now could be signed: [`DELIVERY_SIGNING`] is set (see
/// [`is_set`]). For the front doors, which refuse a goal with a callback otherwise; the
/// value itself is the streamer's business (a value that does not open fails its tries).
pub async fn check_signing(bus: &Bus) -> Result<(), Unsignable> {
    match is_set(bus, DELIVERY_SIGNING).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Unsignable::Missing),
        Err(e) => Err(Unsignable::Unknown(e.to_string())),
    }
}

/// Whether a secret named `name` is set: in this process's environment
/// ([`env_var`]), or stored in the bucket. One read of the bucket's entry; nothing is
/// opened, so no key is needed, and no value is read into memory beyond its ciphertext.
pub async fn is_set(bus: &Bus, name: &str) -> Result<bool, Error> {
    check_name(name)?;
    if std::env::var_os(env_var(name)).is_some() {
        return Ok(true);
    }
    let bucket = bus
        .jetstream()
        .get_key_value(streams::SECRETS_BUCKET)
        .await
        .map_err(|e| Error::Bucket(e.to_string()))?;
    match bucket.entry(name).await {
        Ok(Some(entry)) => Ok(entry.operation == kv::Operation::Put),
        Ok(None) => Ok(false),
        Err(e) => Err(Error::Bucket(e.to_string())),
    }
}

/// Checks a secret's name.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.chars().take(80).collect()))
    }
}

/// The environment variable that holds secret `name` locally.
pub fn env_var(name: &str) -> String {
    format!("{ENV_PREFIX}{}", env_suffix(name))
}

/// What follows [`ENV_PREFIX`] in the variable of secret `name`.
fn env_suffix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// Where the workspace's secrets key lives.
pub fn key_path(workspace: &Path) -> PathBuf {
    workspace.join(".dispatch").join("keys").join("secrets.key")
}

/// The key that seals values in the bucket.
pub struct Key(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(********)")
    }
}

impl Key {
    /// Reads the key at `path`; `None` if there is none yet. A key that others may
    /// read, or that is not one, is an error.
    pub fn load(path: &Path) -> Result<Option<Self>, Error> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |why: String| Error::Key {
            path: path.display().to_string(),
            why,
        };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:o} lets others read it; `chmod 600 {}`",
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), bytes.as_mut())
            .map_err(|_| bad("not a 64-digit hex key".into()))?;
        Ok(Some(Self(bytes)))
    }

    /// Reads the key at `path`, making one (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, Error> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(key) = Self::load(path)? {
            return Ok(key);
        }
        let bad = |e: std::io::Error| Error::Key {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bad)?;
        }
        let key = XChaCha20Poly1305::generate_key(&mut rand_core::OsRng);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut file) => {
                let text = Zeroizing::new(hex::encode(key.as_slice()));
                file.write_all(text.as_bytes()).map_err(bad)?;
                file.sync_all().map_err(bad)?;
            }
            // Made by someone else meanwhile: theirs is the key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(bad(e)),
        }
        Self::load(path)?.ok_or_else(|| Error::Key {
            path: path.display().to_string(),
            why: "vanished right after it was made".into(),
        })
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.0.as_ref().into())
    }

    /// Seals `value` for the name `name`.
    pub fn seal(&self, name: &str, value: &str) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut rand_core::OsRng);
        let sealed = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: value.as_bytes(),
                    aad: aad(name).as_bytes(),
                },
            )
            .expect("sealing a bounded value cannot fail");
        let mut out = Vec::with_capacity(1 + nonce.len() + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`Self::seal`] sealed for `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<String>, Error> {
        let unsealable = || Error::Unsealable(name.to_owned());
        let (version, rest) = sealed.split_first().ok_or_else(unsealable)?;
        if *version != SEALED_V1 || rest.len() < 24 {
            return Err(unsealable());
        }
        let (nonce, ciphertext) = rest.split_at(24);
        let plain = self
            .cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: aad(name).as_bytes(),
                },
            )
            .map_err(|_| unsealable())?;
        let plain = Zeroizing::new(plain);
        Ok(Zeroizing::new(
            std::str::from_utf8(&plain)
                .map_err(|_| unsealable())?
                .to_owned(),
        ))
    }
}

fn aad(name: &str) -> String {
    format!("dispatch-secret/v1/{name}")
}

/// Checks a value before it is stored.
pub fn check_value(name: &str, value: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::BadValue {
        name: name.to_owned(),
        why: why.to_owned(),
    };
    if value.is_empty() {
        return Err(bad("the value is empty"));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad(&format!("the value is over {MAX_VALUE_BYTES} bytes")));
    }
    if value.len() < MIN_SCRUBBED_BYTES {
        return Err(bad(&format!(
            "the value is under {MIN_SCRUBBED_BYTES} bytes, too short to be kept out of output"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(bad(
            "the value holds control characters (a trailing newline?)",
        ));
    }
    Ok(())
}

/// Where a listed secret comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Store,
    Env,
}

/// A secret as `dispatch secret ls` shows it: never its value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub name: String,
    /// Always [`MASK`].
    pub value: &'static str,
    pub source: Source,
    /// When it was last set (the store's own time; 0 for environment variables).
    pub updated_unix_ms: i64,
}

/// What [`Store::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    Stored,
    /// The value sent was [`MASK`]: the stored one stays.
    Kept,
}

/// The secrets of a workspace: the bucket (opened with its key) and the environment.
pub struct Store {
    bucket: kv::Store,
    /// Loaded when first needed if it was not there at start (`dispatch secret set`
    /// makes it after the services are up).
    key: std::sync::Mutex<Option<std::sync::Arc<Key>>>,
    key_path: PathBuf,
    env: BTreeMap<String, Zeroizing<String>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the bucket; `key` is the workspace's key (see [`key_path`]), if it has
    /// one. Secrets in the environment are read once, now.
    pub async fn open(bus: &Bus, key_path: PathBuf, key: Option<Key>) -> Result<Self, Error> {
        let bucket = bus
            .jetstream()
            .get_key_value(streams::SECRETS_BUCKET)
            .await
            .map_err(|e| Error::Bucket(e.to_string()))?;
        let env = std::env::vars()
            .filter_map(|(var, value)| {
                let name = var.strip_prefix(ENV_PREFIX)?;
                Some((name.to_ascii_uppercase(), Zeroizing::new(value)))
            })
            .collect();
        Ok(Self {
            bucket,
            key: std::sync::Mutex::new(key.map(std::sync::Arc::new)),
            key_path,
            env,
        })
    }

    fn key(&self) -> Result<std::sync::Arc<Key>, Error> {
        // Plain data assigned whole: nothing half-written to recover from.
        let mut key = self.key.lock().unwrap_or_else(|e| e.into_inner());
        if key.is_none() {
            *key = Key::load(&self.key_path)?.map(std::sync::Arc::new);
        }
        key.clone().ok_or_else(|| Error::Key {
            path: self.key_path.display().to_string(),
            why: "there is no secrets key here (`dispatch secret set` makes one)".into(),
        })
    }

    /// Stores `value` under `name`; [`MASK`] keeps the stored value (and is refused
    /// when there is none).
    pub async fn set(&self, name: &str, value: &str) -> Result<Set, Error> {
        check_name(name)?;
        if value == MASK {
            return match self.bucket.entry(name).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => Ok(Set::Kept),
                Ok(_) => Err(Error::BadValue {
                    name: name.to_owned(),
                    why: format!("{MASK} keeps a stored value, and none is stored"),
                }),
                Err(e) => Err(Error::Bucket(e.to_string())),
            };
        }
        check_value(name, value)?;
        let sealed = self.key()?.seal(name, value);
        self.bucket
            .put(name, sealed.into())
            .await
            .map_err(|e| Error::Bucket(e.to_string()))?;
        Ok(Set::Stored)
    }

    /// Removes `name` from the bucket; false if it was not there.
    pub async fn remove(&self, name: &str) -> Result<bool, Error> {
        check_name(name)?;
        let there = matches!(
            self.bucket.entry(name).await,
            Ok(Some(entry)) if entry.operation == kv::Operation::Put
        );
        if there {
            self.bucket
                .purge(name)
                .await
                .map_err(|e| Error::Bucket(e.to_string()))?;
        }
        Ok(there)
    }

    /// Every secret's name, where it comes from and when it was set; no values.
    pub async fn list(&self) -> Result<Vec<Listed>, Error> {
        let mut listed: BTreeMap<String, Listed> = BTreeMap::new();
        let mut keys = self
            .bucket
            .keys()
            .await
            .map_err(|e| Error::Bucket(e.to_string()))?;
        while let Some(name) = keys.next().await {
            let name = name.map_err(|e| Error::Bucket(e.to_string()))?;
            let updated = match self.bucket.entry(&name).await {
                Ok(Some(entry)) => entry.created.unix_timestamp_nanos() / 1_000_000,
                _ => 0,
            };
            listed.insert(
                name.clone(),
                Listed {
                    name,
                    value: MASK,
                    source: Source::Store,
                    updated_unix_ms: updated as i64,
                },
            );
        }
        for name in self.env.keys() {
            listed.insert(
                name.clone(),
                Listed {
                    name: name.clone(),
                    value: MASK,
                    source: Source::Env,
                    updated_unix_ms: 0,
                },
            );
        }
        Ok(listed.into_values().collect())
    }

    /// The value of `name`, from the environment or the bucket. For the workspace's
    /// owner (`dispatch serve` reads a listener's secret); tools get values only through
    /// a [`Lease`].
    pub async fn value(&self, name: &str) -> Result<Zeroizing<String>, Error> {
        check_name(name)?;
        if let Some(value) = self.env.get(&env_suffix(name)) {
            return Ok(value.clone());
        }
        match self.bucket.entry(name).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                self.key()?.open(name, &entry.value)
            }
            Ok(_) => Err(Error::NotFound(name.to_owned())),
            Err(e) => Err(Error::Bucket(e.to_string())),
        }
    }

    /// A lease of the secrets `grants` gives `scope.connector` and the call names:
    /// each value is readable until `until` and wiped when the lease is dropped.
    pub async fn lease(
        &self,
        grants: &Grants,
        scope: Scope,
        names: &[&str],
        until: Instant,
    ) -> Result<Lease, Error> {
        let mut values = Vec::with_capacity(names.len());
        for name in names {
            if !grants.allows(&scope.connector, name) {
                return Err(Error::NotGranted {
                    name: (*name).to_owned(),
                    connector: scope.connector.clone(),
                });
            }
            values.push(((*name).to_owned(), self.value(name).await?));
        }
        tracing::info!(
            connector = scope.connector,
            run_id = scope.run_id,
            call_id = scope.call_id,
            secrets = ?names,
            "secrets leased"
        );
        Ok(Lease {
            scope,
            values,
            until,
        })
    }
}

impl Store {
    /// Whether every value `lease` holds is still the one stored under its name (an
    /// error when one can no longer be had: removed, or not opening).
    pub async fn still_current(&self, lease: &Lease) -> Result<bool, Error> {
        for (name, value) in &lease.values {
            if self.value(name).await? != *value {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Which connector may lease which secrets: what its configuration names, nothing else.
#[derive(Debug, Clone, Default)]
pub struct Grants(BTreeMap<String, Vec<String>>);

impl Grants {
    /// Nothing granted to anyone.
    pub const fn none() -> Self {
        Self(BTreeMap::new())
    }

    pub fn grant(&mut self, connector: &str, name: &str) {
        let names = self.0.entry(connector.to_owned()).or_default();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }

    pub fn allows(&self, connector: &str, name: &str) -> bool {
        self.0
            .get(connector)
            .is_some_and(|names| names.iter().any(|n| n == name))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whose lease it is: one call of one connector in one run, or (with no run, and
/// `call_id` saying so) one connection of a connector that serves every run, such as
/// an MCP server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub connector: String,
    pub run_id: String,
    pub call_id: String,
}

/// Secret values for one call of one connector in one run, each wiped when the lease
/// is dropped (`Zeroizing`).
pub struct Lease {
    scope: Scope,
    values: Vec<(String, Zeroizing<String>)>,
    until: Instant,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("scope", &self.scope)
            .field(
                "secrets",
                &self.values.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The value of `name` while the lease lasts.
    pub fn value(&self, name: &str) -> Result<&str, Error> {
        if Instant::now() >= self.until {
            return Err(Error::NotGranted {
                name: name.to_owned(),
                connector: format!("{} (its lease has expired)", self.scope.connector),
            });
        }
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| Error::NotGranted {
                name: name.to_owned(),
                connector: self.scope.connector.clone(),
            })
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// `text` with every leased value replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        scrub(text, self.values.iter().map(|(_, v)| v.as_str()))
    }
}

/// `text` with every occurrence of each of `secrets` replaced by [`MASK`] — as it is,
/// and in the forms a tool, a server or a model is likely to pass it on in: with its
/// letters' case changed, in hex (either case), percent-encoded byte by byte, and in
/// base64 (standard and URL-safe, padded or not, and inside a longer base64 text at any
/// alignment) — and a start of one cut off at the end of `text` (at least
/// [`MIN_SCRUBBED_BYTES`] of it: output cut at a size limit) too. Values shorter than
/// [`MIN_SCRUBBED_BYTES`] are not looked for (none can be stored).
///
/// Hand-written, not a crate's: what must be found is ours to say (the forms above),
/// and the matching is plain substring search on each form.
pub fn scrub<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let secrets: Vec<&str> = secrets
        .into_iter()
        .filter(|s| s.len() >= MIN_SCRUBBED_BYTES)
        .collect();
    let mut out = mask(text, &spans(text, &secrets));
    for secret in secrets {
        let cut = (MIN_SCRUBBED_BYTES..secret.len())
            .rev()
            .filter(|&n| secret.is_char_boundary(n))
            .find(|&n| out.ends_with(&secret[..n]));
        if let Some(n) = cut {
            out.truncate(out.len() - n);
            out.push_str(MASK);
        }
    }
    out
}

/// The shortest encoded form looked for: shorter ones would mask ordinary text.
const MIN_FORM_CHARS: usize = 8;

/// How `secret` may appear: each form with whether it is matched without regard to
/// ASCII case.
fn forms(secret: &str) -> Vec<(String, bool)> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let bytes = secret.as_bytes();
    let mut forms = vec![(secret.to_owned(), true), (hex::encode(bytes), true)];
    let percent: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
    forms.push((percent, true));
    // Base64 of the secret inside a longer text: after 0, 1 or 2 bytes of whatever came
    // before, the characters that only the secret's bits decide.
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for before in 0..3usize {
            let mut shifted = vec![0u8; before];
            shifted.extend_from_slice(bytes);
            let encoded = engine.encode(&shifted);
            let first = (8 * before).div_ceil(6);
            let last = 8 * (before + bytes.len()) / 6;
            if last > first {
                forms.push((encoded[first..last].to_owned(), false));
            }
        }
    }
    forms.retain(|(form, _)| form.len() >= MIN_FORM_CHARS || form == secret);
    forms.sort();
    forms.dedup();
    forms
}

/// Where in `text` any form of any of `secrets` occurs: byte ranges, sorted, overlapping
/// ones merged.
fn spans(text: &str, secrets: &[&str]) -> Vec<(usize, usize)> {
    let folded = text.to_ascii_lowercase();
    let mut found: Vec<(usize, usize)> = Vec::new();
    for secret in secrets {
        for (form, any_case) in forms(secret) {
            let (haystack, needle) = if any_case {
                (folded.as_str(), form.to_ascii_lowercase())
            } else {
                (text, form)
            };
            let mut from = 0;
            while let Some(at) = haystack[from..].find(needle.as_str()) {
                let start = from + at;
                found.push((start, start + needle.len()));
                from = start + needle.len().max(1);
            }
        }
    }
    found.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(found.len());
    for (start, end) in found {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// `text` with each of `spans` (sorted, disjoint) replaced by [`MASK`]. ASCII case
/// folding keeps byte offsets, so the spans are the text's own, and their ends fall on
/// character boundaries (the forms are ASCII, or the secret itself).
fn mask(text: &str, spans: &[(usize, usize)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for &(start, end) in spans {
        out.push_str(&text[at..start]);
        out.push_str(MASK);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Every stored secret's value, kept current: for scrubbing text no lease covers, such
/// as what a model writes after it decoded something it saw. Cheap to share.
#[derive(Default)]
pub struct Known {
    values: std::sync::RwLock<Vec<Zeroizing<String>>>,
}

impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values.
        f.write_str("Known(********)")
    }
}

impl Known {
    /// Reads every secret `store` holds (the bucket's and the environment's), now and
    /// again every `every` for as long as the returned value is held; a read that
    /// fails keeps the last ones.
    pub async fn watch(store: Store, every: std::time::Duration) -> std::sync::Arc<Self> {
        let known = std::sync::Arc::new(Self::default());
        known.reload(&store).await;
        let held = std::sync::Arc::downgrade(&known);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match held.upgrade() {
                    Some(known) => known.reload(&store).await,
                    None => return,
                }
            }
        });
        known
    }

    async fn reload(&self, store: &Store) {
        let listed = match store.list().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the secrets to scrub; keeping the last ones");
                return;
            }
        };
        let mut values = Vec::with_capacity(listed.len());
        for entry in listed {
            match store.value(&entry.name).await {
                Ok(value) if value.len() >= MIN_SCRUBBED_BYTES => values.push(value),
                Ok(_) => {}
                // Removed meanwhile, or sealed with another key: nothing to look for.
                Err(e) => tracing::debug!(name = entry.name, error = %e, "a secret not read"),
            }
        }
        *self.values.write().unwrap_or_else(|e| e.into_inner()) = values;
    }

    /// A set of values, for tests and tools that hold them already.
    pub fn of(values: impl IntoIterator<Item = String>) -> Self {
        Self {
            values: std::sync::RwLock::new(values.into_iter().map(Zeroizing::new).collect()),
        }
    }

    /// [`scrub`] with every known value.
    pub fn scrub(&self, text: &str) -> String {
        let values = self.values.read().unwrap_or_else(|e| e.into_inner());
        scrub(text, values.iter().map(|v| v.as_str()))
    }

    /// How much text a streaming scrubber holds back: more than any form of any value
    /// is long.
    fn hold(&self) -> usize {
        let values = self.values.read().unwrap_or_else(|e| e.into_inner());
        values.iter().map(|v| v.len() * 3).max().unwrap_or(0)
    }
}

/// Scrubs text that arrives in pieces (a model's streamed answer): each piece yields
/// only text that no later piece can turn into part of a secret, and [`Self::finish`]
/// the rest, so what is passed on in pieces is what [`Known::scrub`] makes of the whole.
#[derive(Debug, Default)]
pub struct Streaming {
    raw: String,
    /// Bytes of `raw` passed on.
    passed: usize,
}

impl Streaming {
    /// Takes `piece`; returns the scrubbed text that is safe to pass on now.
    pub fn push(&mut self, piece: &str, known: &Known) -> String {
        self.raw.push_str(piece);
        let values = known.values.read().unwrap_or_else(|e| e.into_inner());
        if values.is_empty() {
            // Nothing to look for: everything passes as it comes.
            let out = self.raw[self.passed..].to_owned();
            self.passed = self.raw.len();
            return out;
        }
        let secrets: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
        let hold = known.hold();
        let mut cut = self.raw.len().saturating_sub(hold);
        while !self.raw.is_char_boundary(cut) {
            cut -= 1;
        }
        // Only the text not passed on yet is looked at (a form ending there could start
        // no earlier than a form's length before it): each piece costs what is held,
        // not what was said before it.
        let mut from = self.passed.saturating_sub(hold);
        while !self.raw.is_char_boundary(from) {
            from -= 1;
        }
        let spans: Vec<(usize, usize)> = spans(&self.raw[from..], &secrets)
            .into_iter()
            .map(|(start, end)| (start + from, end + from))
            .collect();
        // A secret's form across the cut waits whole for the next piece.
        for &(start, end) in &spans {
            if start < cut && end > cut {
                cut = start;
            }
        }
        if cut <= self.passed {
            return String::new();
        }
        let inside: Vec<(usize, usize)> = spans
            .iter()
            .filter(|(start, end)| *start >= self.passed && *end <= cut)
            .map(|(start, end)| (start - self.passed, end - self.passed))
            .collect();
        let out = mask(&self.raw[self.passed..cut], &inside);
        self.passed = cut;
        out
    }

    /// The rest, scrubbed as the end of a text is (a start of a secret cut off there
    /// is masked too).
    pub fn finish(&mut self, known: &Known) -> String {
        let rest = known.scrub(&self.raw[self.passed..]);
        self.passed = self.raw.len();
        rest
    }
}

#[cfg(test)]
mod tests;
