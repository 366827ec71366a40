//! Hosts as the `url_host` condition reads them, and the patterns it matches them
//! with.
//!
//! A host is normalised the way an HTTP client will use it: the WHATWG URL parser
//! (the `url` crate, which reqwest uses too) lowercases names, turns every numeric
//! IPv4 form (`2130706433`, `0x7f.1`, `127.1`) into dotted decimal and compresses
//! IPv6; then one trailing dot is dropped (`api.example.com.` is `api.example.com`)
//! and an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is its IPv4 address.
//!
//! Strictly (a rule that allows), a URL must be `http://` or `https://` with `//`
//! written out, plain ASCII with no whitespace, control character or backslash, no
//! user info and no `%` in its authority; the host the parser finds must be the host
//! as written. Anything else is refused rather than guessed at. Every reading (a rule
//! that denies or asks) takes the parser's host, the host after the last `@` of
//! the authority as written (with and without backslashes ending it), and a string
//! with no scheme as if it had one; IPv4-compatible and NAT64 IPv6 addresses count
//! as their IPv4 address too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest URL read.
const MAX_URL_BYTES: usize = 8192;

/// A host, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Name(String),
    Ip(IpAddr),
}

/// A `url_host` pattern, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    Exact(Host),
    /// `*.suffix`: every name under the suffix, not the suffix itself.
    Under(String),
}

impl Pattern {
    /// Reads a pattern as a rule's author writes it: a name, an IP address (IPv6 in
    /// brackets or not), or `*.domain`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("url host {text:?} is not a host name, an IP address or *.domain");
        if !text.is_ascii() || text.is_empty() || text.len() > 255 {
            return Err(bad());
        }
        let (wildcard, bare) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let labels_ok = |name: &str| {
            !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        if !wildcard {
            let unbracketed = bare.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = unbracketed.parse::<Ipv6Addr>() {
                return Ok(Pattern::Exact(Host::Ip(ipv6(ip))));
            }
        }
        let name = bare.strip_suffix('.').unwrap_or(bare);
        if !labels_ok(name) {
            return Err(bad());
        }
        match url::Host::parse(name).map_err(|_| bad())? {
            url::Host::Domain(d) if wildcard => Ok(Pattern::Under(d)),
            _ if wildcard => Err(bad()),
            url::Host::Domain(d) => Ok(Pattern::Exact(Host::Name(d))),
            url::Host::Ipv4(ip) => Ok(Pattern::Exact(Host::Ip(IpAddr::V4(ip)))),
            url::Host::Ipv6(ip) => Ok(Pattern::Exact(Host::Ip(ipv6(ip)))),
        }
    }

    pub fn admits(&self, host: &Host) -> bool {
        match (self, host) {
            (Pattern::Exact(want), host) => want == host,
            (Pattern::Under(domain), Host::Name(name)) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            (Pattern::Under(_), Host::Ip(_)) => false,
        }
    }
}

/// An IPv6 address, or the IPv4 address it maps.
fn ipv6(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

fn borrowed(host: &url::Host<String>) -> url::Host<&str> {
    match host {
        url::Host::Domain(d) => url::Host::Domain(d.as_str()),
        url::Host::Ipv4(ip) => url::Host::Ipv4(*ip),
        url::Host::Ipv6(ip) => url::Host::Ipv6(*ip),
    }
}

/// `host` as the parser gave it, normalised; `None` for a name that is only dots.
fn normal(host: url::Host<&str>) -> Option<Host> {
    Some(match host {
        url::Host::Domain(d) => {
            let d = d.strip_suffix('.').unwrap_or(d);
            if d.is_empty() || d.ends_with('.') {
                return None;
            }
            Host::Name(d.to_ascii_lowercase())
        }
        url::Host::Ipv4(ip) => Host::Ip(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Host::Ip(ipv6(ip)),
    })
}

/// Whether `text` is written as a URL: `scheme://…`, `scheme:\\…`, `//…`, or an
/// http(s) URL without its slashes, which parsers still accept.
pub(crate) fn looks_like_url(text: &str) -> bool {
    let text = text.trim_start_matches(|c: char| c <= ' ');
    if text.starts_with("//") || text.starts_with("\\\\") {
        return true;
    }
    let Some((scheme, rest)) = text.split_once(':') else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    scheme_ok
        && (rest.starts_with("//")
            || rest.starts_with("\\\\")
            || matches!(
                scheme.to_ascii_lowercase().as_str(),
                "http" | "https" | "ws" | "wss" | "ftp"
            ))
}

/// The host of an http(s) URL read strictly, or why it is refused.
pub(crate) fn strict(text: &str) -> Result<Host, &'static str> {
    if text.len() > MAX_URL_BYTES {
        return Err("too long");
    }
    if let Some(c) = text
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_whitespace() || c.is_control() || *c == '\\')
    {
        return Err(if c.is_ascii() {
            "holds whitespace, a control character or a backslash"
        } else {
            "holds a character that is not ASCII (write a name in punycode)"
        });
    }
    let (scheme, rest) = text.split_once("://").ok_or("is not scheme://host/…")?;
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return Err("is not http or https");
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.contains('@') {
        return Err("has user info");
    }
    if authority.contains('%') {
        return Err("percent-encodes its host");
    }
    let url = url::Url::parse(text).map_err(|_| "does not parse as a URL")?;
    let parsed = url.host().and_then(normal).ok_or("names no host")?;
    let written = authority_host(authority).ok_or("names no host")?;
    let as_written = url::Host::parse(written)
        .ok()
        .and_then(|h| normal(borrowed(&h)));
    if as_written.as_ref() != Some(&parsed) {
        return Err("is read by its parser as another host than written");
    }
    Ok(parsed)
}

/// The host part of an authority (`host`, `host:port`, `[v6]:port`).
fn authority_host(authority: &str) -> Option<&str> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        return Some(&authority[..=end]);
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    (!host.is_empty()).then_some(host)
}

/// Every host a client might take `text` to name, for a rule that stops.
pub(crate) fn readings(text: &str) -> Vec<Host> {
    let text = &text[..floor(text, MAX_URL_BYTES)];
    let mut hosts = Vec::new();
    if let Ok(url) = url::Url::parse(text)
        && let Some(host) = url.host().and_then(normal)
    {
        hosts.push(host);
    }
    let trimmed = text.trim_matches(|c: char| c <= ' ');
    let after_scheme = match trimmed.split_once("://") {
        Some((_, rest)) => rest,
        None => trimmed
            .strip_prefix("//")
            .or_else(|| trimmed.strip_prefix("\\\\"))
            .unwrap_or(trimmed),
    };
    for ends in [&['/', '?', '#'][..], &['/', '?', '#', '\\'][..]] {
        let authority = &after_scheme[..after_scheme.find(ends).unwrap_or(after_scheme.len())];
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        // A client may decode the host; the URL parser does.
        let decoded = percent_encoding::percent_decode_str(host).decode_utf8_lossy();
        if let Some(host) = authority_host(&decoded)
            && let Ok(parsed) = url::Host::parse(host)
        {
            hosts.extend(normal(borrowed(&parsed)));
        }
    }
    // IPv6 forms that reach an IPv4 host: IPv4-compatible, and NAT64's 64:ff9b::/96.
    let mut more = Vec::new();
    for host in &hosts {
        if let Host::Ip(IpAddr::V6(v6)) = host {
            let o = v6.octets();
            if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || v6.to_ipv4().is_some() {
                more.push(Host::Ip(IpAddr::V4(Ipv4Addr::new(
                    o[12], o[13], o[14], o[15],
                ))));
            }
        }
    }
    hosts.extend(more);
    hosts.dedup();
    hosts
}

/// The largest char boundary of `text` at or below `at`.
fn floor(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    let mut at = at;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> Host {
        Host::Name(n.into())
    }

    fn ip(text: &str) -> Host {
        Host::Ip(text.parse().unwrap())
    }

    #[test]
    fn patterns_are_names_addresses_or_domains() {
        assert_eq!(
            Pattern::parse("API.Example.com.").unwrap(),
            Pattern::Exact(name("api.example.com"))
        );
        assert_eq!(
            Pattern::parse("[::ffff:127.0.0.1]").unwrap(),
            Pattern::Exact(ip("127.0.0.1"))
        );
        assert_eq!(Pattern::parse("::1").unwrap(), Pattern::Exact(ip("::1")));
        assert_eq!(
            Pattern::parse("*.internal.example").unwrap(),
            Pattern::Under("internal.example".into())
        );
        for bad in [
            "",
            "a b",
            "*.",
            "*.1.2.3.4",
            "é.example",
            "a..b",
            "*.*.x",
            "h:80",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strict_hosts_are_normalised_and_tricks_refused() {
        for (url, host) in [
            ("https://API.example.com./x", name("api.example.com")),
            ("http://api.example.com:8080", name("api.example.com")),
            ("http://[::ffff:127.0.0.1]/", ip("127.0.0.1")),
            ("http://[::ffff:7f00:1]:80/", ip("127.0.0.1")),
            ("http://2130706433/", ip("127.0.0.1")),
            ("http://0x7f.1/", ip("127.0.0.1")),
            ("http://127.1/", ip("127.0.0.1")),
            ("http://[::1]/", ip("::1")),
        ] {
            assert_eq!(strict(url), Ok(host), "{url}");
        }
        for (url, why) in [
            ("https://api.example.com\\@evil.net/", "backslash"),
            ("https://api.example.com@evil.net/", "user info"),
            ("https://evil.net#@api.example.com", "host"),
            ("https://api%2eexample.com/", "percent"),
            ("https://api.exam\tple.com/", "whitespace"),
            ("https://ａpi.example.com/", "ASCII"),
            ("https:api.example.com", "scheme://"),
            ("ftp://api.example.com/", "http or https"),
            ("https://api.example.com../", "no host"),
            ("https:///x", "host"),
        ] {
            match strict(url) {
                Err(e) => assert!(e.contains(why), "{url}: {e}"),
                Ok(h) if why == "host" => assert_ne!(h, name("api.example.com"), "{url}"),
                Ok(h) => panic!("{url} read as {h:?}"),
            }
        }
    }

    #[test]
    fn every_reading_finds_where_a_client_might_go() {
        let metadata = ip("169.254.169.254");
        for text in [
            "http://169.254.169.254/latest",
            "http://evil.net\\@169.254.169.254/",
            "http://2852039166/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "169.254.169.254/latest",
            "//169.254.169.254",
            "http://169.254.169.254\t/",
            "http://169%2e254%2e169%2e254/",
            "http://1６9.254.169.254/",
        ] {
            assert!(
                readings(text).contains(&metadata),
                "{text}: {:?}",
                readings(text)
            );
        }
        assert!(!readings("hello there").contains(&metadata));
        assert!(looks_like_url("https://x") && looks_like_url("//x") && looks_like_url("http:x"));
        assert!(!looks_like_url("scratch/a") && !looks_like_url("note: hi"));
    }
}
