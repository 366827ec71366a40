//! When nats-server flushes JetStream writes to disk: the sync policy a server that
//! Dispatch starts runs with, and so what an acknowledged write survives.
//!
//! - `always`: every write is `fsync`ed before it is acknowledged. An acked goal or
//!   event survives a power loss of the machine. The default for a single server
//!   (`dispatch up`), where no replica holds a second copy.
//! - an interval (nats-server's own default is 2 minutes): writes are acknowledged from
//!   the page cache and flushed every interval. An acked write survives the server being
//!   killed (the kernel still has it), not a power loss of the machine within the
//!   interval. On a cluster with R3 streams an acked write is on a quorum of two nodes'
//!   page caches, so it survives any one machine losing power, not all of them at once.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How often nats-server syncs JetStream's files to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// Every write, before its acknowledgement.
    #[default]
    Always,
    /// Every interval; acknowledgements come from the page cache.
    Every(Duration),
}

/// The shortest interval accepted: below it `always` is what is meant.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest interval accepted; nats-server's default is 2 minutes.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

impl SyncPolicy {
    /// nats-server's `jetstream.sync_interval` value.
    pub fn server_value(self) -> String {
        match self {
            Self::Always => "always".into(),
            Self::Every(every) => format!("{}ms", every.as_millis()),
        }
    }
}

impl fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Every(every) => write!(f, "{}", humantime::format_duration(*every)),
        }
    }
}

impl FromStr for SyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("always") {
            return Ok(Self::Always);
        }
        let every = humantime::parse_duration(text).map_err(|e| {
            format!("sync policy {text:?}: expected `always` or a duration such as `2m` ({e})")
        })?;
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&every) {
            return Err(format!(
                "sync policy {text:?}: an interval must be between {} and {}",
                humantime::format_duration(MIN_INTERVAL),
                humantime::format_duration(MAX_INTERVAL)
            ));
        }
        Ok(Self::Every(every))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_and_intervals_parse_and_bad_ones_are_named() {
        assert_eq!("always".parse(), Ok(SyncPolicy::Always));
        assert_eq!(" ALWAYS ".parse(), Ok(SyncPolicy::Always));
        let two = SyncPolicy::Every(Duration::from_secs(120));
        assert_eq!("2m".parse(), Ok(two));
        assert_eq!(two.server_value(), "120000ms");
        assert_eq!(SyncPolicy::Always.server_value(), "always");
        assert_eq!(two.to_string(), "2m");
        for bad in ["", "sometimes", "1ms", "2h", "-1s"] {
            let error = bad.parse::<SyncPolicy>().unwrap_err();
            assert!(error.contains("sync policy"), "{bad}: {error}");
        }
    }
}
