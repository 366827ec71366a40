//! Service runs' webhook listeners: the wake's front door.
//!
//! The dispatcher stores each listener of a service it starts in the `DISPATCH_LISTENERS`
//! bucket. Every ingress copy follows the bucket:
//! - a **bound** listener (`--listen ADDR`) is served by one copy at a time. A copy
//!   claims it by writing its name into the entry with the revision it read (so one
//!   claim wins), binds the address, records where it listens, and renews the claim
//!   every few seconds; a claim not renewed within [`LEASE`] is taken over by another
//!   copy. A copy that finds someone else's claim on a listener it serves lets it go.
//! - a **hook** (`--hook account/agent/channel`) is served by every copy at
//!   `/hooks/{account}/{agent}/{channel}` (there is no root webhook), read from the
//!   bucket per request.
//!
//! A request wakes the service only if it passes the listener's checks, in this order,
//! each with its own answer: the path (404), the method (405), the size of its head
//! (431), the shared secret (401), the size of its body (413), the Standard Webhooks
//! signature (401). It then becomes the wake's payload — an envelope of where it came
//! from, its method and target, its headers (lowercased, auth-bearing ones redacted)
//! and its body as text — and the wake's goal is stored: `202` with the run id, or `500`
//! if it could not be. A signed request's `webhook-id` fixes the run id, so a redelivery
//! makes no second run.
//!
//! When a listener's service has ended, the copy that notices removes its entries and
//! stops serving it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::{RunId, streams};
use dispatch_proto::run::v1::ListenerEntry;
use dispatch_runlog::service::{
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, WAKE_WEBHOOK, hook_key, listener_key,
};
use dispatch_runlog::submit::{Goal, MAX_PAYLOAD_BYTES, Submission};
use futures::StreamExt as _;
use prost::Message as _;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;

use crate::{App, accepted, error, serve};

/// The origin of every wake a webhook starts.
pub const ORIGIN: &str = "automation";

/// How long a claim on a bound listener lasts without renewal, and how often the loop
/// looks at the bucket's listeners (claims, renewals, ended services).
pub const LEASE: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_secs(2);
/// A claim is renewed once it is this old.
const RENEW: Duration = Duration::from_secs(5);
/// How often the holder of a bound listener looks whether its service has ended, and
/// how often a hook's is looked at by some copy (a request to an ended service's
/// listener finds out for itself, so hooks are only tidied up).
const ENDED_CHECK: Duration = Duration::from_secs(5);
const HOOK_ENDED_CHECK: Duration = Duration::from_secs(60);
/// How long this copy leaves a listener it could not bind before claiming it again.
const BIND_BACKOFF: Duration = Duration::from_secs(30);
/// Connections one bound listener serves at once.
const MAX_CONNECTIONS: usize = 64;

/// Headers whose names contain one of these are redacted in the wake's envelope.
const AUTH_BEARING: [&str; 8] = [
    "auth",
    "secret",
    "token",
    "signature",
    "cookie",
    "key",
    "password",
    "session",
];
const REDACTED: &str = "********";

/// What every listener shares: the bucket, the claims this copy holds, and the secrets
/// signed listeners' keys come from.
pub(crate) struct Listeners {
    bucket: kv::Store,
    runs: dispatch_bus::reads::Reader,
    /// Opened at the first signed request: the workspace's secrets key may be made
    /// after ingress starts (by the first `dispatch secret set`).
    secrets: tokio::sync::OnceCell<dispatch_secrets::Store>,
    bus: dispatch_bus::Bus,
    workspace: std::path::PathBuf,
    me: String,
    /// Which run each signed delivery woke.
    webhooks: kv::Store,
    /// Every listener entry, as the watch last delivered it, by key: the entry, its
    /// revision, and when the server stored it (unix ms; claims are judged by the
    /// server's clock, not by the claiming copy's).
    entries: Mutex<HashMap<String, Stored>>,
    /// The listeners this copy serves on their own address, by key.
    bound: Mutex<HashMap<String, Bound>>,
    /// When each entry's service was last seen not to have ended (unix ms).
    checked: Mutex<HashMap<String, i64>>,
    /// Listeners this copy could not bind, and when it may claim them again.
    backoff: Mutex<HashMap<String, i64>>,
}

#[derive(Clone)]
struct Stored {
    entry: ListenerEntry,
    revision: u64,
    stored_ms: i64,
}

struct Bound {
    stop: CancellationToken,
    addr: SocketAddr,
}

impl Listeners {
    pub(crate) async fn open(
        bus: &dispatch_bus::Bus,
        workspace: &std::path::Path,
        me: String,
    ) -> Result<Arc<Self>, dispatch_bus::Error> {
        let bucket = bus
            .jetstream()
            .get_key_value(streams::LISTENERS_BUCKET)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the listeners bucket", e))?;
        let runs = bus
            .jetstream()
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the run logs", e))?;
        let runs = dispatch_bus::reads::Reader::new(runs);
        let webhooks = bus
            .jetstream()
            .get_key_value(streams::WEBHOOKS_BUCKET)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the webhook deliveries", e))?;
        Ok(Arc::new(Self {
            bucket,
            runs,
            secrets: tokio::sync::OnceCell::new(),
            bus: bus.clone(),
            workspace: workspace.to_path_buf(),
            me,
            webhooks,
            entries: Mutex::default(),
            bound: Mutex::default(),
            checked: Mutex::default(),
            backoff: Mutex::default(),
        }))
    }

    /// Follows the bucket and keeps this copy's share of the bound listeners served,
    /// until `shutdown`; then every bound listener is let go.
    pub(crate) async fn run(self: Arc<Self>, app: Arc<App>, shutdown: CancellationToken) {
        let watch = tokio::spawn(self.clone().watch(shutdown.clone()));
        loop {
            self.tick(&app).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        let _ = watch.await;
        let bound: Vec<(String, Bound)> =
            self.bound.lock().expect("not poisoned").drain().collect();
        for (key, bound) in bound {
            bound.stop.cancel();
            // Let another copy take it over at once rather than after the lease.
            self.release(&key).await;
        }
    }

    async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            match self.bucket.watch_with_history(">").await {
                Ok(mut updates) => loop {
                    let update = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        update = updates.next() => update,
                    };
                    match update {
                        Some(Ok(entry)) => self.take(entry),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the listeners watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot watch the listeners; trying again"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn take(&self, entry: kv::Entry) {
        let mut entries = self.entries.lock().expect("not poisoned");
        // Hooks are read per request; only the services' own keys are followed.
        if entry.key.starts_with("hook.") {
            return;
        }
        match entry.operation {
            kv::Operation::Put => match ListenerEntry::decode(entry.value.as_ref()) {
                Ok(listener) => {
                    let newer = entries
                        .get(&entry.key)
                        .is_none_or(|held| held.revision < entry.revision);
                    if newer {
                        let stored_ms = (entry.created.unix_timestamp_nanos() / 1_000_000) as i64;
                        entries.insert(
                            entry.key,
                            Stored {
                                entry: listener,
                                revision: entry.revision,
                                stored_ms,
                            },
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(key = entry.key, error = %e, "a listener entry that does not decode; left alone");
                    entries.remove(&entry.key);
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                entries.remove(&entry.key);
            }
        }
    }

    /// One look at every listener: claim, bind, renew, let go, and clear out the ones
    /// whose service has ended.
    async fn tick(&self, app: &Arc<App>) {
        let now = now_ms();
        let entries: Vec<(String, Stored)> = self
            .entries
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(k, stored)| (k.clone(), stored.clone()))
            .collect();
        // Bound listeners whose entry is gone, and bookkeeping of entries that are.
        let gone: Vec<String> = self
            .bound
            .lock()
            .expect("not poisoned")
            .keys()
            .filter(|k| !entries.iter().any(|(key, _)| key == *k))
            .cloned()
            .collect();
        for key in gone {
            self.unbind(&key);
        }
        let live = |k: &String| entries.iter().any(|(key, _)| key == k);
        self.checked
            .lock()
            .expect("not poisoned")
            .retain(|k, _| live(k));
        self.backoff
            .lock()
            .expect("not poisoned")
            .retain(|k, until| live(k) && *until > now);
        for (key, stored) in entries {
            let Stored {
                entry,
                revision,
                stored_ms,
            } = stored;
            let listener = entry.listener.clone().unwrap_or_default();
            let mine = entry.bound_by == self.me;
            // Judged by when the server stored the claim: copies' clocks may differ.
            let age = now.saturating_sub(stored_ms);
            let lapsed = age > LEASE.as_millis() as i64;
            let free = entry.bound_by.is_empty() || lapsed;
            let hook = listener.listen_addr.is_empty();
            // The holder of a bound listener (or anyone, for one nobody holds) looks
            // now and then whether its service has ended; hooks, seldom.
            let every = if hook { HOOK_ENDED_CHECK } else { ENDED_CHECK };
            if (mine || free) && self.due_for_check(&key, now, every) {
                match self.service_ended(&entry.service_run_id).await {
                    Ok(true) => {
                        self.remove(&key, &entry, revision).await;
                        continue;
                    }
                    Ok(false) => {
                        self.checked
                            .lock()
                            .expect("not poisoned")
                            .insert(key.clone(), now);
                    }
                    Err(e) => {
                        tracing::warn!(key, error = %e, "cannot tell whether a listener's service has ended")
                    }
                }
            }
            if hook {
                continue;
            }
            let serving = self.bound.lock().expect("not poisoned").contains_key(&key);
            if mine && lapsed && serving {
                // This copy's claim ran out unrenewed (NATS away, say): another copy
                // may hold the listener now, so this one stops serving it.
                tracing::warn!(key, "this copy's claim on a listener lapsed; letting it go");
                self.unbind(&key);
            } else if mine && !lapsed && !serving {
                self.bind(app, &key, entry, revision).await;
            } else if mine && !lapsed && age > RENEW.as_millis() as i64 {
                let mut renewed = entry;
                renewed.claimed_at_ms = now;
                if self.store(&key, renewed, revision).await.is_none() {
                    tracing::info!(key, "a listener's claim changed under this copy");
                }
            } else if free && !serving && !self.backing_off(&key, now) {
                let mut claimed = entry;
                claimed.bound_by = self.me.clone();
                claimed.bound_addr = String::new();
                claimed.claimed_at_ms = now;
                if let Some(revision) = self.store(&key, claimed.clone(), revision).await {
                    self.bind(app, &key, claimed, revision).await;
                }
            } else if !mine && !free && serving {
                tracing::info!(
                    key,
                    holder = entry.bound_by,
                    "another copy holds this listener; letting it go"
                );
                self.unbind(&key);
            }
        }
    }

    fn backing_off(&self, key: &str, now: i64) -> bool {
        self.backoff
            .lock()
            .expect("not poisoned")
            .get(key)
            .is_some_and(|until| *until > now)
    }

    fn due_for_check(&self, key: &str, now: i64, every: Duration) -> bool {
        self.checked
            .lock()
            .expect("not poisoned")
            .get(key)
            .is_none_or(|at| now.saturating_sub(*at) >= every.as_millis() as i64)
    }

    /// Binds a listener this copy has claimed and records where it listens.
    async fn bind(&self, app: &Arc<App>, key: &str, mut entry: ListenerEntry, revision: u64) {
        let listener = entry.listener.clone().unwrap_or_default();
        let Ok(addr) = listener.listen_addr.parse::<SocketAddr>() else {
            return;
        };
        let socket = match tokio::net::TcpListener::bind(addr).await {
            Ok(socket) => socket,
            Err(e) => {
                // Let another copy (on another host, say) try it, and leave it a while.
                tracing::warn!(key, %addr, error = %e, "cannot bind a listener; leaving it to other copies for a while");
                self.backoff
                    .lock()
                    .expect("not poisoned")
                    .insert(key.to_owned(), now_ms() + BIND_BACKOFF.as_millis() as i64);
                entry.bound_by.clear();
                entry.claimed_at_ms = 0;
                let _ = self.store(key, entry, revision).await;
                return;
            }
        };
        let Ok(bound_addr) = socket.local_addr() else {
            return;
        };
        entry.bound_addr = bound_addr.to_string();
        entry.claimed_at_ms = now_ms();
        if self.store(key, entry, revision).await.is_none() {
            // Lost the claim meanwhile: the socket closes as it drops.
            return;
        }
        let stop = CancellationToken::new();
        let router = Router::new().fallback(bound_wake).with_state(Target {
            app: app.clone(),
            key: key.to_owned(),
        });
        let limits = serve::Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        };
        let serving = stop.clone();
        tokio::spawn(async move {
            serve::serve(
                socket,
                router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(30),
                )),
                limits,
                serving,
                Duration::from_secs(5),
            )
            .await;
        });
        tracing::info!(key, %bound_addr, "listener bound");
        let replaced = self.bound.lock().expect("not poisoned").insert(
            key.to_owned(),
            Bound {
                stop,
                addr: bound_addr,
            },
        );
        if let Some(replaced) = replaced {
            replaced.stop.cancel();
        }
    }

    fn unbind(&self, key: &str) {
        if let Some(bound) = self.bound.lock().expect("not poisoned").remove(key) {
            tracing::info!(key, addr = %bound.addr, "listener closed");
            bound.stop.cancel();
        }
    }

    /// Gives up this copy's claim on `key`, if it still holds it.
    async fn release(&self, key: &str) {
        let held = self.entries.lock().expect("not poisoned").get(key).cloned();
        if let Some(Stored {
            mut entry,
            revision,
            ..
        }) = held
            && entry.bound_by == self.me
        {
            entry.bound_by.clear();
            entry.bound_addr.clear();
            entry.claimed_at_ms = 0;
            let _ = self.store(key, entry, revision).await;
        }
    }

    /// Writes `entry` if the bucket still holds `revision`; the new revision, or `None`
    /// when someone wrote first.
    async fn store(&self, key: &str, entry: ListenerEntry, revision: u64) -> Option<u64> {
        match self
            .bucket
            .update(key, entry.encode_to_vec().into(), revision)
            .await
        {
            Ok(new) => {
                let mut entries = self.entries.lock().expect("not poisoned");
                let newer = entries.get(key).is_none_or(|held| held.revision < new);
                if newer {
                    let stored = Stored {
                        entry,
                        revision: new,
                        stored_ms: now_ms(),
                    };
                    entries.insert(key.to_owned(), stored);
                }
                Some(new)
            }
            Err(e) => {
                if e.kind() != kv::UpdateErrorKind::WrongLastRevision {
                    tracing::warn!(key, error = %e, "cannot update a listener");
                }
                None
            }
        }
    }

    /// Removes an ended service's listener (and its hook's key, if the hook is still
    /// this service's) and stops serving it.
    async fn remove(&self, key: &str, entry: &ListenerEntry, revision: u64) {
        self.unbind(key);
        let hook = entry.listener.as_ref().map_or("", |l| l.hook.as_str());
        if !hook.is_empty() {
            let hook_key = hook_key(hook);
            if let Ok(Some(held)) = self.bucket.entry(&hook_key).await
                && ListenerEntry::decode(held.value.as_ref())
                    .is_ok_and(|h| h.service_run_id == entry.service_run_id)
            {
                let _ = self
                    .bucket
                    .delete_expect_revision(&hook_key, Some(held.revision))
                    .await;
            }
        }
        match self
            .bucket
            .delete_expect_revision(key, Some(revision))
            .await
        {
            Ok(()) => tracing::info!(key, "its service has ended; listener removed"),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => {}
            Err(e) => tracing::warn!(key, error = %e, "cannot remove a listener"),
        }
        self.checked.lock().expect("not poisoned").remove(key);
    }

    /// Whether the run `service` has ended (one read: its last event).
    async fn service_ended(&self, service: &str) -> Result<bool, String> {
        dispatch_runlog::has_ended(&self.runs, service).await
    }

    /// The run the delivery `id` to the service's `index`th listener wakes: the one
    /// remembered for it, or a new one, remembered now. A sender re-signs each retry
    /// with a new timestamp; its `webhook-id` stays, and so does the run.
    async fn delivery_run(&self, service: &RunId, index: u32, id: &str) -> Result<RunId, String> {
        let digest = hex::encode(&sha2::Sha256::digest(id.as_bytes())[..16]);
        let key = format!("{}.{digest}", listener_key(service, index));
        let fresh = RunId::new();
        match self.webhooks.create(&key, fresh.to_string().into()).await {
            Ok(_) => Ok(fresh),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let held = self
                    .webhooks
                    .get(&key)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("a remembered delivery vanished")?;
                std::str::from_utf8(&held)
                    .ok()
                    .and_then(|text| text.parse::<RunId>().ok())
                    .ok_or_else(|| "a remembered delivery names no run".to_owned())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The Standard Webhooks key stored as secret `name`.
    async fn signing_key(&self, name: &str) -> Result<standardwebhooks::Webhook, String> {
        // Ingress faces the internet: it reads only secrets named for webhooks.
        if !dispatch_runlog::service::is_signing_secret_name(name) {
            return Err(format!("secret {name} is not a webhook signing secret"));
        }
        let store = self
            .secrets
            .get_or_try_init(|| async {
                let path = dispatch_secrets::key_path(&self.workspace);
                let key = dispatch_secrets::Key::load(&path).map_err(|e| e.to_string())?;
                if key.is_none() {
                    return Err(format!(
                        "no secrets key at {} (`dispatch secret set` makes one)",
                        path.display()
                    ));
                }
                dispatch_secrets::Store::open(&self.bus, path, key)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?;
        let value = store.value(name).await.map_err(|e| e.to_string())?;
        standardwebhooks::Webhook::new(&value)
            .map_err(|_| format!("secret {name} is not a Standard Webhooks key (whsec_…)"))
    }
}

/// The listener a bound socket serves.
#[derive(Clone)]
struct Target {
    app: Arc<App>,
    key: String,
}

/// A request to a bound listener.
async fn bound_wake(State(target): State<Target>, request: Request) -> Response {
    let listeners = &target.app.listeners;
    let found = listeners
        .entries
        .lock()
        .expect("not poisoned")
        .get(&target.key)
        .map(|held| held.entry.clone());
    let Some(entry) = found else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this listener has closed",
        );
    };
    let local = entry.bound_addr.clone();
    wake(&target.app, listeners, &entry, local, request, true).await
}

/// `/hooks/{account}/{agent}/{channel}`: a request to a service's hook.
#[utoipa::path(post, path = "/hooks/{account}/{agent}/{channel}", tag = "hooks",
    params(("account" = String, Path), ("agent" = String, Path), ("channel" = String, Path)),
    request_body(content = String, description = "Any body the hook's service takes (its text is the wake's payload)"),
    responses(
        (status = 202, description = "The service woke; the wake's run", body = crate::Accepted),
        (status = 400, description = "Malformed HTTP or an unreadable body"),
        (status = 401, description = "A missing or wrong shared secret, or a Standard Webhooks signature that does not verify", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such hook (there is no root webhook)", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 405, description = "A method the hook does not take", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "A body over the hook's limit", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 431, description = "A request head over the hook's limit", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
        (status = 500, description = "The wake could not be dispatched", body = crate::problem::ProblemDoc, content_type = "application/problem+json"),
    ))]
pub(crate) async fn hook_wake(
    State(app): State<Arc<App>>,
    Path((account, agent, channel)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "no such hook");
    let hook = format!("{account}/{agent}/{channel}");
    let listeners = &app.listeners;
    if dispatch_runlog::service::check_hook(&hook).is_err() {
        return not_found();
    }
    let entry = match listeners.bucket.entry(&hook_key(&hook)).await {
        Ok(Some(held)) if held.operation == kv::Operation::Put => {
            match ListenerEntry::decode(held.value.as_ref()) {
                Ok(entry) => entry,
                Err(_) => return not_found(),
            }
        }
        Ok(_) => return not_found(),
        Err(e) => {
            tracing::warn!(hook, error = %e, "cannot read a hook");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "hooks cannot be read right now; retry shortly",
            );
        }
    };
    let at = format!("/hooks/{hook}");
    wake(&app, listeners, &entry, at, request, false).await
}

/// Checks a request against its listener and, if it passes, stores the wake's goal.
async fn wake(
    app: &Arc<App>,
    listeners: &Listeners,
    entry: &ListenerEntry,
    listener_at: String,
    request: Request,
    check_path: bool,
) -> Response {
    let listener = entry.listener.clone().unwrap_or_default();
    // The entry comes from a bucket: held to the same rules as a spec.
    if let Err(e) = dispatch_runlog::service::check_listener(&listener) {
        tracing::warn!(
            service = entry.service_run_id,
            error = e,
            "a listener entry that does not check out"
        );
        return error(StatusCode::NOT_FOUND, "not_found", "no such listener");
    }
    let (parts, body) = request.into_parts();
    let remote = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if check_path && !listener.path.is_empty() && parts.uri.path() != listener.path {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no listener on this path",
        );
    }
    let methods: Vec<String> = if listener.methods.is_empty() {
        vec!["POST".to_owned()]
    } else {
        listener.methods.clone()
    };
    if !methods.iter().any(|m| m == parts.method.as_str()) {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this listener takes {}", methods.join(", ")),
        );
        if let Ok(allow) = HeaderValue::from_str(&methods.join(", ")) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        return response;
    }
    let max_header = match listener.max_header_bytes {
        0 => DEFAULT_MAX_HEADER_BYTES,
        n => n,
    } as usize;
    let head_bytes = parts.method.as_str().len()
        + parts.uri.to_string().len()
        + parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if head_bytes > max_header {
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request's head is {head_bytes} bytes; this listener takes {max_header}"),
        );
    }
    if !listener.secret_sha256.is_empty()
        && !secret_matches(&parts.headers, &listener.secret_sha256)
    {
        return unauthorized("a missing or wrong shared secret");
    }
    let max_body = match listener.max_body_bytes {
        0 => DEFAULT_MAX_BODY_BYTES,
        n => n,
    } as usize;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("this listener takes bodies of at most {max_body} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        return too_large();
    }
    let body = match axum::body::to_bytes(Body::new(body), max_body).await {
        Ok(body) => body,
        Err(e) if is_length_limit(&e) => return too_large(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the request's body could not be read",
            );
        }
    };
    // A signed request names its delivery: its id fixes the wake's run.
    let mut delivery: Option<String> = None;
    if !listener.signing_secret.is_empty() {
        let webhook = match listeners.signing_key(&listener.signing_secret).await {
            Ok(webhook) => webhook,
            Err(e) => {
                tracing::error!(
                    service = entry.service_run_id,
                    error = e,
                    "a signed listener cannot verify"
                );
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "listener_misconfigured",
                    "this listener cannot check signatures; its owner has been told",
                );
            }
        };
        if let Err(e) = webhook.verify(&body, &parts.headers) {
            return unauthorized(&format!("the Standard Webhooks signature: {e}"));
        }
        let id = header_text(&parts.headers, "webhook-id").unwrap_or_default();
        delivery = Some(id.to_owned());
    }
    let envelope = envelope(
        &listener_at,
        remote,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &body,
    );
    if envelope.len() > MAX_PAYLOAD_BYTES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request makes a wake payload of {} bytes; at most {MAX_PAYLOAD_BYTES}",
                envelope.len()
            ),
        );
    }
    let Ok(service) = entry.service_run_id.parse::<RunId>() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such listener");
    };
    // Only now, past the checks a stranger cannot pass: is the service still there?
    match listeners.service_ended(&entry.service_run_id).await {
        Ok(false) => {}
        Ok(true) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "this listener's service has ended",
            );
        }
        Err(e) => {
            tracing::warn!(service = %service, error = e, "cannot tell whether a listener's service has ended");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "dispatch_failed",
                "the wake could not be dispatched; retry",
            );
        }
    }
    let goal = Goal::new(
        &entry.goal,
        &entry.conversation_id,
        entry.timeout_ms,
        ORIGIN,
    )
    .and_then(|goal| goal.with_payload(&envelope))
    .and_then(|goal| goal.woken_by(service, WAKE_WEBHOOK, entry.index));
    let goal = match goal {
        Ok(goal) => goal,
        Err(e) => {
            tracing::error!(service = %service, error = %e, "a listener's wake does not check out");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "dispatch_failed",
                "the wake could not be dispatched",
            );
        }
    };
    let submission = match delivery {
        Some(id) => match listeners.delivery_run(&service, entry.index, &id).await {
            Ok(run_id) => Submission::for_run(goal, run_id),
            Err(e) => {
                tracing::warn!(service = %service, error = e, "cannot look up a webhook delivery");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "dispatch_failed",
                    "the wake could not be dispatched; retry",
                );
            }
        },
        None => Submission::new(goal),
    };
    match crate::store(app, &submission).await {
        Ok(_) => accepted(submission.run_id().to_string(), false),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "dispatch_failed",
            "the wake could not be dispatched; retry",
        ),
    }
}

fn unauthorized(why: &str) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!("refused: {why}"),
    )
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the request carries the secret whose SHA-256 is `digest`, in
/// `x-dispatch-secret` or `Authorization: Bearer`, compared in constant time.
fn secret_matches(headers: &HeaderMap, digest: &[u8]) -> bool {
    let bearer = header_text(headers, "authorization").and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    });
    [header_text(headers, "x-dispatch-secret"), bearer]
        .into_iter()
        .flatten()
        .any(|token| {
            bool::from(
                sha2::Sha256::digest(token.as_bytes())
                    .as_slice()
                    .ct_eq(digest),
            )
        })
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The wake's payload: the request as data, its auth-bearing headers redacted.
pub fn envelope(
    listener: &str,
    remote: Option<SocketAddr>,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> String {
    let mut shown = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.as_str().to_ascii_lowercase();
        let value = if AUTH_BEARING.iter().any(|word| name.contains(word)) {
            REDACTED.to_owned()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        match shown.get_mut(&name) {
            Some(serde_json::Value::String(earlier)) => {
                earlier.push_str(", ");
                earlier.push_str(&value);
            }
            _ => {
                shown.insert(name, serde_json::Value::String(value));
            }
        }
    }
    serde_json::json!({
        "wake": WAKE_WEBHOOK,
        "listener": listener,
        "remote_addr": remote.map(|r| r.to_string()),
        "method": method.as_str(),
        "target": uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": shown,
        "body": String::from_utf8_lossy(body),
    })
    .to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_redacts_auth_bearing_headers() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer hunter2"),
            ("x-dispatch-secret", "hunter2"),
            ("webhook-signature", "v1,abc"),
            ("x-api-key", "k"),
            ("cookie", "session=1"),
            ("x-hub-signature-256", "sha256=1"),
            ("content-type", "application/json"),
            ("x-github-event", "issues"),
        ] {
            headers.insert(
                axum::http::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let text = envelope(
            "127.0.0.1:9000",
            Some("10.0.0.1:5555".parse().unwrap()),
            &Method::POST,
            &"/hook?x=1".parse().unwrap(),
            &headers,
            b"{\"a\": 1}",
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("v1,abc"), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["headers"]["content-type"], "application/json");
        assert_eq!(value["headers"]["x-github-event"], "issues");
        assert_eq!(value["headers"]["authorization"], REDACTED);
        assert_eq!(value["headers"]["x-hub-signature-256"], REDACTED);
        assert_eq!(value["target"], "/hook?x=1");
        assert_eq!(value["method"], "POST");
        assert_eq!(value["remote_addr"], "10.0.0.1:5555");
        assert_eq!(value["body"], "{\"a\": 1}");
    }

    #[test]
    fn the_shared_secret_is_taken_from_either_header() {
        let digest = sha2::Sha256::digest(b"hunter2").to_vec();
        let with = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            secret_matches(&headers, &digest)
        };
        assert!(with("x-dispatch-secret", "hunter2"));
        assert!(with("authorization", "Bearer hunter2"));
        assert!(with("authorization", "bearer hunter2"));
        assert!(!with("authorization", "Basic hunter2"));
        assert!(!with("x-dispatch-secret", "hunter3"));
        assert!(!secret_matches(&HeaderMap::new(), &digest));
    }
}
