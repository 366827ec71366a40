//! Host allowlists (the HTTP connector's `allow_hosts`, the streamer's callback hosts):
//! entries are a host name or address, `*.suffix` for any name under it, either with
//! `:port`; without a port an entry admits the scheme's default one.

/// One allowed host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// A name, or the suffix after `*.`.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl AllowedHost {
    /// Parses one entry; the error says what is wrong with it.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (
                host,
                Some(
                    port.parse::<u16>()
                        .map_err(|_| "the port is not a number".to_owned())?,
                ),
            ),
            _ => (entry, None),
        };
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (host, false),
        };
        let fits = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        if host.is_empty() || !host.bytes().all(fits) || host.starts_with('.') {
            return Err("give a host name or address, `*.suffix`, or either with :port".into());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            wildcard,
            port,
        })
    }

    /// Whether this entry admits `host` on `port`, for a scheme whose default port is
    /// `default_port`.
    pub fn admits(&self, host: &str, port: u16, default_port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let name = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
        } else {
            host == self.host
        };
        name && port == self.port.unwrap_or(default_port)
    }
}

/// The entry as it is written: `host`, `*.suffix`, either with `:port`.
impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.host)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_admit_names_suffixes_and_ports() {
        let exact = AllowedHost::parse("api.example.com").unwrap();
        assert!(exact.admits("API.example.com", 443, 443));
        assert!(!exact.admits("api.example.com", 8443, 443));
        let any = AllowedHost::parse("*.example.org").unwrap();
        assert!(any.admits("a.b.example.org", 80, 80));
        assert!(!any.admits("example.org", 80, 80));
        assert!(!any.admits("badexample.org", 80, 80));
        let local = AllowedHost::parse("127.0.0.1:8080").unwrap();
        assert!(local.admits("127.0.0.1", 8080, 80));
        assert!(!local.admits("127.0.0.1", 80, 80));
        assert_eq!(any.to_string(), "*.example.org");
        assert_eq!(local.to_string(), "127.0.0.1:8080");
        for bad in ["", "*.", "a b", "h:port", ".x"] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad}");
        }
    }
}
