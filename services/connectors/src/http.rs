//! The built-in `http` connector: one tool, `http.request` (method, URL, headers,
//! body), reaching only the hosts `dispatch.toml` allows:
//!
//! ```toml
//! [connectors.http]
//! allow_hosts = ["api.example.com", "*.example.org", "127.0.0.1:8080"]
//! max_body_bytes = 262144     # the most of a response body kept
//! timeout_ms = 30000
//! ```
//!
//! A host can be given a credential from the secrets (`dispatch secret set NAME`); the
//! connector leases it for the one call that goes there, adds it as a header, follows
//! no redirect with it, and masks it (`********`) in whatever comes back:
//!
//! ```toml
//! [[connectors.http.credentials]]
//! host = "api.example.com"     # an allow_hosts entry's form
//! header = "Authorization"
//! secret = "example-token"     # a secret's name, never its value
//! prefix = "Bearer "           # put before the value (optional)
//! ```
//!
//! Nothing is reachable by default: without `allow_hosts` the connector serves no tool.
//! A host entry without a port allows the scheme's default port only; `*.example.org`
//! allows the subdomains of `example.org`, not `example.org` itself. Every redirect is
//! checked against the same list. A call is a `read` for GET and HEAD without a body,
//! and `external` otherwise. A call may not set the headers that would make the request
//! another one than its arguments say ([`FORBIDDEN_HEADERS`], and any header naming a
//! method): where it goes, how it is framed, which method the server acts on. A `Host`
//! naming the url's own host and port, `Connection: keep-alive` or `close`, and
//! `Content-Length: 0` without a body say only what is sent anyway, and are left out
//! rather than refused. The
//! answer is the status line, a few headers and the body as text, cut at
//! `max_body_bytes` (read no further than that).

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch_bus::catalogue::{ArgumentIn, Risk, ToolEntry};
use dispatch_service::hosts::AllowedHost;
use futures::StreamExt as _;
use serde::Deserialize;

/// The connector's name: the namespace of its tool.
pub const CONNECTOR: &str = "http";
/// Its one tool.
const TOOL: &str = "request";
/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;
/// Response headers shown to the model.
const SHOWN_HEADERS: [&str; 4] = ["content-type", "content-length", "location", "retry-after"];

/// Request headers a call may not set, with why. The policy judged the call by its
/// URL and method, and a credential is leased for the URL's host; these would send it
/// elsewhere (another virtual host, behind a proxy another host or path), frame it
/// other than the client does (a wrong length hangs or smuggles), or hold the
/// connection. Headers naming a method (`X-HTTP-Method-Override`, `X-HTTP-Method`,
/// `X-Method-Override`, …) are refused by [`forbidden`] as well.
pub const FORBIDDEN_HEADERS: [(&str, &str); 14] = [
    ("host", ROUTED),
    ("forwarded", ROUTED),
    ("x-forwarded-host", ROUTED),
    ("x-original-url", ROUTED),
    ("x-rewrite-url", ROUTED),
    ("content-length", FRAMED),
    ("transfer-encoding", FRAMED),
    ("te", FRAMED),
    ("trailer", FRAMED),
    ("expect", FRAMED),
    ("connection", FRAMED),
    ("keep-alive", FRAMED),
    ("proxy-connection", FRAMED),
    ("upgrade", FRAMED),
];
const ROUTED: &str = "the request goes where its url says";
const FRAMED: &str = "the connector frames the request and holds the connection itself";

/// Whether the header `name: value` says only what the connector sends anyway (and
/// can be left out): a `Host` of the url's own ([`own_host`]), a `Connection` that
/// asks for the connection the client keeps or closes as it sees fit, a
/// `Content-Length: 0` on a request with no body, or a `Transfer-Encoding: identity`
/// (no coding, which is how the connector sends any body).
fn sent_anyway(url: &reqwest::Url, bodiless: bool, name: &str, value: &str) -> bool {
    match name.to_ascii_lowercase().as_str() {
        "host" => own_host(url, value),
        "content-length" => bodiless && value.trim() == "0",
        "transfer-encoding" => value.trim().eq_ignore_ascii_case("identity"),
        "connection" => {
            value.trim().eq_ignore_ascii_case("keep-alive")
                || value.trim().eq_ignore_ascii_case("close")
        }
        _ => false,
    }
}

/// Whether `value`, a `Host` header, names `url`'s own host and port: `host:port`, or
/// the host alone when the url's port is its scheme's default.
fn own_host(url: &reqwest::Url, value: &str) -> bool {
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    let value = value.trim();
    value.eq_ignore_ascii_case(&format!("{host}:{port}"))
        || url.port().is_none() && value.eq_ignore_ascii_case(host)
}

/// Why a call may not set the header `name`, if it may not.
fn forbidden(name: &str) -> Option<&'static str> {
    let name = name.trim().to_ascii_lowercase();
    if name.contains("method") {
        return Some("the method is the call's method argument");
    }
    FORBIDDEN_HEADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

/// `[connectors.http]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Hosts (`name`, `name:port`, `*.suffix`) calls may reach.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// The most of a response body kept, in bytes (default 256 KiB).
    pub max_body_bytes: Option<usize>,
    /// How long one request may take, redirects included (default 30 s).
    pub timeout_ms: Option<u64>,
    /// Credentials added to requests to given hosts, from the secrets.
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
}

/// One `[[connectors.http.credentials]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub host: String,
    pub header: String,
    /// The secret's name.
    pub secret: String,
    #[serde(default)]
    pub prefix: String,
}

/// A credential, checked.
#[derive(Debug, Clone)]
struct Credential {
    host: Allowed,
    header: reqwest::header::HeaderName,
    secret: String,
    prefix: String,
}

/// What a call may lease, and for whom.
pub struct Leasing<'a> {
    pub store: Option<&'a dispatch_secrets::Store>,
    pub grants: &'a dispatch_secrets::Grants,
    pub run_id: &'a str,
    pub call_id: &'a str,
}

static NO_GRANTS: dispatch_secrets::Grants = dispatch_secrets::Grants::none();

impl Leasing<'static> {
    /// For a call that may lease nothing.
    pub fn none() -> Self {
        Self {
            store: None,
            grants: &NO_GRANTS,
            run_id: "",
            call_id: "",
        }
    }
}

/// One allowed host, as `[connectors.http] allow_hosts` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed(AllowedHost);

impl Allowed {
    fn parse(entry: &str) -> Result<Self, String> {
        AllowedHost::parse(entry)
            .map(Self)
            .map_err(|why| format!("[connectors.http] allow_hosts entry {entry:?}: {why}"))
    }

    fn admits(&self, host: &str, port: u16, default_port: u16) -> bool {
        self.0.admits(host, port, default_port)
    }
}

/// The arguments of `http.request`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    /// Required, so that a call's risk can be read from its arguments alone.
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

/// The configured connector.
pub struct Http {
    allowed: Vec<Allowed>,
    credentials: Vec<Credential>,
    max_body_bytes: usize,
    timeout: Duration,
    client: reqwest::Client,
    /// For requests that carry a credential: it follows no redirect, so the
    /// credential goes to the host it was configured for and nowhere else.
    credentialed: reqwest::Client,
}

impl Http {
    /// The connector `config` describes; `None` when it allows no host.
    pub fn new(config: HttpConfig) -> Result<Option<Self>, String> {
        if config.allow_hosts.is_empty() {
            return Ok(None);
        }
        let allowed = config
            .allow_hosts
            .iter()
            .map(|e| Allowed::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        let max_body_bytes = config.max_body_bytes.unwrap_or(256 * 1024);
        if max_body_bytes == 0 || max_body_bytes > crate::mcp::MAX_OUTPUT_BYTES {
            return Err(format!(
                "[connectors.http] max_body_bytes must be 1 to {}",
                crate::mcp::MAX_OUTPUT_BYTES
            ));
        }
        let timeout = Duration::from_millis(config.timeout_ms.unwrap_or(30_000).max(1));
        let policy_hosts = allowed.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if admitted(&policy_hosts, attempt.url()) {
                attempt.follow()
            } else {
                let to = attempt.url().to_string();
                attempt.error(format!(
                    "redirected to {to}, which the allowlist does not admit"
                ))
            }
        });
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(redirects)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let credentialed = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let credentials = config
            .credentials
            .iter()
            .map(|c| {
                let bad =
                    |why: String| format!("[[connectors.http.credentials]] {}: {why}", c.host);
                let host = Allowed::parse(&c.host)?;
                if !allowed.contains(&host) {
                    return Err(bad("the host is not one of allow_hosts".into()));
                }
                let header = reqwest::header::HeaderName::from_bytes(c.header.as_bytes())
                    .map_err(|e| bad(format!("header {:?}: {e}", c.header)))?;
                dispatch_secrets::check_name(&c.secret).map_err(|e| bad(e.to_string()))?;
                reqwest::header::HeaderValue::from_str(&c.prefix)
                    .map_err(|e| bad(format!("prefix: {e}")))?;
                Ok(Credential {
                    host,
                    header,
                    secret: c.secret.clone(),
                    prefix: c.prefix.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Some(Self {
            allowed,
            credentials,
            max_body_bytes,
            timeout,
            client,
            credentialed,
        }))
    }

    /// The secrets this connector's configuration names.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.credentials.iter().map(|c| c.secret.as_str())
    }

    /// The catalogue entry of `http.request`.
    pub fn entry(&self) -> ToolEntry {
        let hosts: Vec<String> = self.allowed.iter().map(|a| a.0.to_string()).collect();
        let mut entry = ToolEntry::builtin(
            CONNECTOR,
            TOOL,
            &format!(
                "Make an HTTP request to one of these hosts: {}. Returns the status, a few \
                 headers and the body as text (at most {} bytes).",
                hosts.join(", "),
                self.max_body_bytes
            ),
            serde_json::json!({
                "type": "object",
                "properties": {
                    "method": {"type": "string", "description": "GET, HEAD, POST, PUT, PATCH or DELETE"},
                    "url": {"type": "string", "format": "uri", "description": "http:// or https:// URL"},
                    "headers": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "request headers; not Host, Content-Length, Transfer-Encoding, Connection or method overrides",
                    },
                    "body": {"type": "string", "description": "the request body, as text (a GET or HEAD with one is not a read)"},
                },
                "required": ["method", "url"],
                "additionalProperties": false,
            }),
            Risk::External,
        );
        entry.read_when = Some(ArgumentIn {
            argument: "method".into(),
            values: vec!["GET".into(), "HEAD".into()],
            unless: vec!["body".into()],
        });
        entry
    }

    /// Runs `http.request` with `args_json`, leasing the credentials of its host for
    /// this call only; whatever it answers has them masked.
    pub async fn call(
        &self,
        tool: &str,
        args_json: &str,
        leasing: Leasing<'_>,
    ) -> Result<String, String> {
        if tool != TOOL {
            return Err(format!(
                "unknown tool {tool:?}; the http connector has request"
            ));
        }
        let mut request: Request = serde_json::from_str(args_json)
            .map_err(|e| format!("bad arguments for http.request: {e}"))?;
        let method = request.method.to_ascii_uppercase();
        let method = match method.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" => {
                reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?
            }
            other => return Err(format!("method {other:?} is not one http.request makes")),
        };
        let url =
            reqwest::Url::parse(&request.url).map_err(|e| format!("url {:?}: {e}", request.url))?;
        // What the connector sends anyway, small models write as browsers do: a `Host`
        // naming the url's own host, `Connection: keep-alive` or `close`, `Content-Length:
        // 0` without a body, `Transfer-Encoding: identity`. Left out, not
        // refused; any other value of those is refused below.
        let bodiless = request.body.as_deref().is_none_or(str::is_empty);
        request
            .headers
            .retain(|name, value| !sent_anyway(&url, bodiless, name, value));
        for name in request.headers.keys() {
            if let Some(why) = forbidden(name) {
                return Err(format!("header {name:?} may not be set by a call: {why}"));
            }
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url {url}: only http and https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("url {url}: credentials in the URL are refused"));
        }
        if !admitted(&self.allowed, &url) {
            return Err(format!(
                "{} is not an allowed host (allow it under [connectors.http] allow_hosts)",
                url.host_str().unwrap_or_default()
            ));
        }
        let credentials: Vec<&Credential> = self
            .credentials
            .iter()
            .filter(|c| admitted(std::slice::from_ref(&c.host), &url))
            .collect();
        let lease = if credentials.is_empty() {
            None
        } else {
            Some(self.lease(&credentials, &leasing).await?)
        };
        let client = if lease.is_some() {
            &self.credentialed
        } else {
            &self.client
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &request.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header {name:?}: {e}"))?;
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|e| format!("header {name}: {e}"))?;
            headers.insert(name, value);
        }
        if let Some(lease) = &lease {
            for credential in &credentials {
                let secret = lease.value(&credential.secret).map_err(|e| e.to_string())?;
                let mut value = reqwest::header::HeaderValue::from_str(&format!(
                    "{}{secret}",
                    credential.prefix
                ))
                .map_err(|_| {
                    format!(
                        "secret {} cannot go in a header (it holds characters headers cannot)",
                        credential.secret
                    )
                })?;
                value.set_sensitive(true);
                // The configured credential wins over a header the model sent.
                headers.insert(credential.header.clone(), value);
            }
        }
        let mut builder = client.request(method, url).headers(headers);
        // An empty body is none: such a GET was judged a read, and is sent as one.
        if let Some(body) = request.body.filter(|b| !b.is_empty()) {
            builder = builder.body(body);
        }
        let scrub = |text: String| match &lease {
            Some(lease) => lease.scrub(&text),
            None => text,
        };
        let response = builder.send().await.map_err(|e| scrub(describe(&e)))?;
        let mut out = format!("HTTP {}\n", response.status());
        for name in SHOWN_HEADERS {
            if let Some(value) = response.headers().get(name).and_then(|v| v.to_str().ok()) {
                out.push_str(&format!("{name}: {value}\n"));
            }
        }
        out.push('\n');
        let (body, cut) = self.read_body(response).await.map_err(scrub)?;
        out.push_str(&String::from_utf8_lossy(&body));
        // Masked before the note, so a credential cut off at the end is masked too.
        let mut out = scrub(out);
        if cut {
            out.push_str(&format!(
                "\n[cut: the body is longer than {} bytes]",
                self.max_body_bytes
            ));
        }
        Ok(out)
    }

    /// A lease of `credentials`' secrets for this call, ending with its timeout.
    async fn lease(
        &self,
        credentials: &[&Credential],
        leasing: &Leasing<'_>,
    ) -> Result<dispatch_secrets::Lease, String> {
        let store = leasing.store.ok_or_else(|| {
            "this host needs a credential, and the connectors cannot reach the secrets".to_owned()
        })?;
        let names: Vec<&str> = credentials.iter().map(|c| c.secret.as_str()).collect();
        let scope = dispatch_secrets::Scope {
            connector: CONNECTOR.to_owned(),
            run_id: leasing.run_id.to_owned(),
            call_id: leasing.call_id.to_owned(),
        };
        let until = std::time::Instant::now() + self.timeout;
        store
            .lease(leasing.grants, scope, &names, until)
            .await
            .map_err(|e| e.to_string())
    }

    /// At most `max_body_bytes` of the body, and whether there was more.
    async fn read_body(&self, response: reqwest::Response) -> Result<(Vec<u8>, bool), String> {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| describe(&e))?;
            let room = self.max_body_bytes - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                return Ok((body, true));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, false))
    }
}

/// Does the allowlist admit `url`'s host and port?
fn admitted(allowed: &[Allowed], url: &reqwest::Url) -> bool {
    let (Some(host), Some(port), Some(default)) = (
        url.host_str(),
        url.port_or_known_default(),
        match url.scheme() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        },
    ) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    allowed.iter().any(|a| a.admits(host, port, default))
}

/// A request error with its causes, none of which holds a secret (the URL has no
/// credentials; headers are not in errors).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[&str]) -> Vec<Allowed> {
        entries.iter().map(|e| Allowed::parse(e).unwrap()).collect()
    }

    #[test]
    fn the_allowlist_admits_hosts_ports_and_subdomains_it_names() {
        let list = allowed(&["api.example.com", "*.example.org", "127.0.0.1:8080"]);
        let admits = |url: &str| admitted(&list, &reqwest::Url::parse(url).unwrap());
        assert!(admits("https://api.example.com/v1"));
        assert!(admits("http://API.EXAMPLE.COM/"));
        assert!(admits("https://a.b.example.org/"));
        assert!(admits("http://127.0.0.1:8080/x"));
        assert!(!admits("https://api.example.com:8443/"), "another port");
        assert!(!admits("https://example.org/"), "the wildcard's own domain");
        assert!(!admits("https://badexample.org/"));
        assert!(!admits("https://api.example.com.evil.net/"));
        assert!(!admits("http://127.0.0.1/"));
        assert!(!admits("http://localhost:8080/"));
        assert!(!admits("ftp://api.example.com/"));
        for bad in ["", "*.", "a b", "host:port", "http://x", ".example.com"] {
            assert!(Allowed::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_header_is_the_url_s_own_or_refused() {
        let own = |url: &str, host: &str| own_host(&reqwest::Url::parse(url).unwrap(), host);
        assert!(own("http://127.0.0.1:41155/about", "127.0.0.1:41155"));
        assert!(own("https://API.example.com/v1", "api.example.com"));
        assert!(own("https://api.example.com/v1", "api.example.com:443"));
        assert!(own("http://[::1]:8080/", "[::1]:8080"));
        // Another host, another port, the host without its explicit port, or padding.
        assert!(!own("http://127.0.0.1:41155/", "other.example"));
        assert!(!own("http://127.0.0.1:41155/", "127.0.0.1:41156"));
        assert!(!own("http://127.0.0.1:41155/", "127.0.0.1"));
        assert!(!own("https://api.example.com/", "api.example.com:80"));
        assert!(!own("https://api.example.com/", "api.example.com.evil.net"));
    }

    #[test]
    fn nothing_is_reachable_by_default() {
        assert!(Http::new(HttpConfig::default()).unwrap().is_none());
        let err = Http::new(HttpConfig {
            allow_hosts: vec!["x".into()],
            max_body_bytes: Some(0),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.contains("max_body_bytes"), "{err}");
    }
}
