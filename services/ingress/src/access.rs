//! Who may call the API: a known API key (`Authorization: Bearer <key>`), and no
//! browser page of another origin.
//!
//! Keys are checked against the digests in the key store (`dispatch api-key`), which
//! is re-read when the file changes, so a new or revoked key takes effect on the next
//! request. A request that carries an `Origin` header not in the allowed list is
//! refused before its key is looked at: a page elsewhere cannot make a user's browser
//! submit goals, whatever it sends.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dispatch_service::api_keys::Store;

use crate::problem::Problem;

/// The id of the API key a request was made with (a request extension).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl Caller {
    /// The key id of the caller `found` among a request's extensions (none: empty).
    pub fn id(found: Option<&Caller>) -> String {
        found.map(|c| c.0.clone()).unwrap_or_default()
    }
}

pub struct Access {
    keys_path: PathBuf,
    allowed_origins: Vec<String>,
    cache: Mutex<Option<(SystemTime, Arc<Store>)>>,
}

impl Access {
    pub fn new(keys_path: PathBuf, allowed_origins: Vec<String>) -> Self {
        Self {
            keys_path,
            allowed_origins,
            cache: Mutex::new(None),
        }
    }

    /// The key store as it is on disk now (read again only when it changed).
    fn keys(&self) -> Result<Arc<Store>, String> {
        let modified = std::fs::metadata(&self.keys_path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut cache = self
            .cache
            .lock()
            .expect("the key cache lock is never poisoned");
        if let Some((at, store)) = cache.as_ref()
            && *at == modified
        {
            return Ok(store.clone());
        }
        let store = Arc::new(Store::load(&self.keys_path).map_err(|e| e.to_string())?);
        *cache = Some((modified, store.clone()));
        Ok(store)
    }

    /// The id of the key `presented` (a bearer token), if it is a known one.
    pub fn caller(&self, presented: Option<&str>) -> Result<String, Denied> {
        let presented = presented.ok_or(Denied::Missing)?;
        let keys = self.keys().map_err(|e| {
            tracing::error!(error = %e, "cannot read the API key store");
            Denied::Unavailable
        })?;
        keys.check(presented)
            .map(str::to_owned)
            .ok_or(Denied::Unknown)
    }

    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        origin
            .to_str()
            .is_ok_and(|o| self.allowed_origins.iter().any(|a| a == o))
    }
}

/// Why a request has no caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// It presented no key.
    Missing,
    /// The key is not one the store knows.
    Unknown,
    /// The store cannot be read.
    Unavailable,
}

/// Middleware: refuses foreign origins (403) and requests without a known key (401).
pub async fn check(
    State(access): State<Arc<Access>>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(origin) = request.headers().get(header::ORIGIN)
        && !access.origin_allowed(origin)
    {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            format!(
                "requests from origin {:?} are not allowed; an operator can allow it with \
                 --allowed-origins",
                origin.to_str().unwrap_or("(not text)")
            ),
        )
        .into_response();
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let id = match access.caller(presented) {
        Ok(id) => id,
        Err(Denied::Missing) => {
            return unauthorized(
                "send an API key as `Authorization: Bearer <key>`; create one with `dispatch api-key create`",
            );
        }
        Err(Denied::Unknown) => {
            return unauthorized("the API key is not known (revoked, or mistyped)");
        }
        Err(Denied::Unavailable) => {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "key_store_unavailable",
                "the API key store cannot be read",
            )
            .into_response();
        }
    };
    request.extensions_mut().insert(Caller(id));
    next.run(request).await
}

fn unauthorized(detail: &str) -> Response {
    let mut response =
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}
