//! The tool catalogue: which tools the connectors serve, and the policy in force, in
//! one JetStream key-value bucket every service reads.
//!
//! - `tools.<connector>.<tool>`: a [`ToolEntry`], put by each connectors copy that
//!   serves the tool and put again every [`REFRESH`] while it does. Copies serving the
//!   same connector put the same entry, so the last put wins harmlessly. An entry not
//!   refreshed for [`STALE_AFTER`] is no longer offered: its connector stopped, or its
//!   server dropped the tool.
//! - `policy`: the policy document in force, put by the policy service when it starts,
//!   so whoever offers tools can leave out the ones it denies outright.
//!
//! Only the connectors may put tools and only the policy service the policy (subject
//! permissions on `$KV.<bucket>.…`, see [`crate::auth`]); everyone else reads.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};

use crate::{Bus, Error};

/// The bucket's name; its stream is `KV_DISPATCH_CATALOGUE`.
pub const BUCKET: &str = "DISPATCH_CATALOGUE";
/// The stream behind the bucket.
pub const STREAM: &str = "KV_DISPATCH_CATALOGUE";
/// Key prefix of tool entries.
pub const TOOLS_PREFIX: &str = "tools.";
/// Key of the policy document.
pub const POLICY_KEY: &str = "policy";

/// How often a connectors copy puts its entries again.
pub const REFRESH: Duration = Duration::from_secs(60);
/// An entry older than this is no longer served by anyone.
pub const STALE_AFTER: Duration = Duration::from_secs(3 * 60);
/// The largest entry: a tool's description and schema, or the policy document.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// What a tool may do to the world. A tool that says nothing, or that no connector
/// serves, is [`Risk::Destructive`]: unknown is risky.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    /// Reads and changes nothing.
    Read,
    /// Adds or changes things, never destroys them.
    Write,
    /// May delete or overwrite.
    Destructive,
    /// Reaches beyond Dispatch's own machines.
    External,
}

impl Risk {
    pub fn word(self) -> &'static str {
        match self {
            Risk::Read => "read",
            Risk::Write => "write",
            Risk::Destructive => "destructive",
            Risk::External => "external",
        }
    }

    /// The risk of an MCP tool from its annotations, read with the defaults the MCP
    /// specification gives them (`readOnlyHint` false, `destructiveHint` true,
    /// `openWorldHint` true). No annotations at all is [`Risk::Destructive`].
    pub fn from_hints(hints: Option<Hints>) -> Self {
        let Some(hints) = hints else {
            return Risk::Destructive;
        };
        if hints.read_only == Some(true) {
            Risk::Read
        } else if hints.open_world != Some(false) {
            Risk::External
        } else if hints.destructive != Some(false) {
            Risk::Destructive
        } else {
            Risk::Write
        }
    }
}

impl std::fmt::Display for Risk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// The MCP tool annotations that decide a risk class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hints {
    pub read_only: Option<bool>,
    pub destructive: Option<bool>,
    pub open_world: Option<bool>,
}

/// One tool as its connector serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolEntry {
    /// Namespaced: `<connector>.<tool>`.
    pub name: String,
    pub connector: String,
    pub description: String,
    /// JSON schema of the arguments (an object schema).
    pub parameters: serde_json::Value,
    pub risk: Risk,
    /// The connector's version (an MCP server's `serverInfo.version`).
    pub version: String,
    /// When it was last put, by the putter's clock.
    pub refreshed_unix_ms: u64,
    /// A call whose argument is one of these values is only a `read`, whatever the
    /// tool's own risk (`http.request` with `method` GET or HEAD, and no `body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_when: Option<ArgumentIn>,
}

/// An argument and the values (compared without case) that make a call a read, and
/// arguments that keep it from being one whatever that argument says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgumentIn {
    pub argument: String,
    pub values: Vec<String>,
    /// Arguments whose presence, with any value but `null` or `""`, makes the call the
    /// tool's own risk (a GET with a body is not a read; one with `"body": ""`, as small
    /// models write it, has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unless: Vec<String>,
}

impl ToolEntry {
    /// A tool of a connector built into Dispatch, versioned as Dispatch.
    pub fn builtin(
        connector: &str,
        tool: &str,
        description: &str,
        parameters: serde_json::Value,
        risk: Risk,
    ) -> Self {
        Self {
            name: format!("{connector}.{tool}"),
            connector: connector.into(),
            description: description.into(),
            parameters,
            risk,
            version: env!("CARGO_PKG_VERSION").into(),
            refreshed_unix_ms: now_unix_ms(),
            read_when: None,
        }
    }

    /// The risk of one call with `args_json`: [`ToolEntry::read_when`] may make it a
    /// read; otherwise it is the tool's.
    pub fn risk_of_call(&self, args_json: &str) -> Risk {
        let Some(read_when) = &self.read_when else {
            return self.risk;
        };
        let args: serde_json::Value = serde_json::from_str(args_json).unwrap_or_default();
        let read = args
            .get(&read_when.argument)
            .and_then(|v| v.as_str())
            .is_some_and(|v| read_when.values.iter().any(|r| r.eq_ignore_ascii_case(v)))
            && read_when
                .unless
                .iter()
                .all(|a| args.get(a).is_none_or(|v| v.is_null() || v == ""));
        if read { Risk::Read } else { self.risk }
    }

    /// The risk classes its calls can have: its own, and `read` for the calls
    /// [`ToolEntry::read_when`] makes reads.
    pub fn possible_risks(&self) -> Vec<Risk> {
        match &self.read_when {
            Some(_) if self.risk != Risk::Read => vec![self.risk, Risk::Read],
            _ => vec![self.risk],
        }
    }

    fn is_live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.refreshed_unix_ms) < STALE_AFTER.as_millis() as u64
    }
}

/// Is `name` fit to be a connector's name: 1–32 of `a-z`, `0-9`, `-`, starting with a
/// letter. It is the first part of every tool name it serves, so it holds no `.` and
/// no `_` (model APIs see `<connector>__<tool>`).
pub fn valid_connector_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 32
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Is `name` fit to be a tool's name inside its connector: 1–64 of letters, digits,
/// `_` and `-` (what model APIs accept in a function name).
pub fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The bucket's configuration. One value per key; values are small.
pub(crate) fn config() -> kv::Config {
    kv::Config {
        bucket: BUCKET.to_owned(),
        description: "Dispatch tool catalogue and policy in force".to_owned(),
        history: 1,
        // Entries are put again every REFRESH; one nobody puts any more goes away.
        max_age: Duration::from_secs(24 * 3600),
        max_value_size: MAX_ENTRY_BYTES as i32,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// The catalogue bucket (declared by [`crate::streams::ensure`]).
pub async fn open(bus: &Bus) -> Result<kv::Store, Error> {
    bus.jetstream()
        .get_key_value(BUCKET)
        .await
        .map_err(|e| Error::other("open the tool catalogue", e))
}

/// Puts `entry` under its key. Refuses an entry larger than [`MAX_ENTRY_BYTES`].
pub async fn put_tool(store: &kv::Store, entry: &ToolEntry) -> Result<(), Error> {
    let value = serde_json::to_vec(entry).map_err(|e| Error::other("encode a tool entry", e))?;
    if value.len() > MAX_ENTRY_BYTES {
        return Err(Error::other(
            &format!("tool {}", entry.name),
            format!(
                "its description and schema take {} bytes; the catalogue holds at most {MAX_ENTRY_BYTES}",
                value.len()
            ),
        ));
    }
    store
        .put(format!("{TOOLS_PREFIX}{}", entry.name), value.into())
        .await
        .map_err(|e| Error::other(&format!("put tool {}", entry.name), e))?;
    Ok(())
}

/// Puts the policy document in force (JSON).
pub async fn put_policy(store: &kv::Store, document: &serde_json::Value) -> Result<(), Error> {
    let value = serde_json::to_vec(document).map_err(|e| Error::other("encode the policy", e))?;
    if value.len() > MAX_ENTRY_BYTES {
        return Err(Error::other(
            "the policy document",
            format!(
                "{} bytes; the catalogue holds at most {MAX_ENTRY_BYTES}",
                value.len()
            ),
        ));
    }
    store
        .put(POLICY_KEY, value.into())
        .await
        .map_err(|e| Error::other("put the policy", e))?;
    Ok(())
}

/// The live entry of the tool `name` (`connector.tool`), if a connector serves it now.
/// A name that is no tool's name is served by nobody.
pub async fn tool(store: &kv::Store, name: &str) -> Result<Option<ToolEntry>, Error> {
    let Some((connector, tool)) = name.split_once('.') else {
        return Ok(None);
    };
    if !valid_connector_name(connector) || !valid_tool_name(tool) {
        return Ok(None);
    }
    let key = format!("{TOOLS_PREFIX}{name}");
    let value = store
        .get(&key)
        .await
        .map_err(|e| Error::other(&format!("read catalogue entry {key}"), e))?;
    Ok(value.and_then(|value| live_entry(&key, &value, now_unix_ms())))
}

/// A tool entry as stored, if it parses and is live.
fn live_entry(key: &str, value: &[u8], now: u64) -> Option<ToolEntry> {
    match serde_json::from_slice::<ToolEntry>(value) {
        Ok(entry) if entry.is_live(now) => Some(entry),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(key, error = %e, "skipping a catalogue entry that does not parse");
            None
        }
    }
}

/// What the catalogue holds now.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Live tools by name.
    pub tools: BTreeMap<String, ToolEntry>,
    /// The policy document in force, if the policy service has put one.
    pub policy: Option<serde_json::Value>,
}

impl Snapshot {
    /// Reads every key. Entries that do not parse (written by a newer Dispatch, or
    /// damaged) and stale ones are left out.
    pub async fn read(store: &kv::Store) -> Result<Self, Error> {
        let keys: Vec<String> = store
            .keys()
            .await
            .map_err(|e| Error::other("list the tool catalogue", e))?
            .try_collect()
            .await
            .map_err(|e| Error::other("list the tool catalogue", e))?;
        let now = now_unix_ms();
        let mut snapshot = Snapshot::default();
        for key in keys {
            let Some(value) = store
                .get(&key)
                .await
                .map_err(|e| Error::other(&format!("read catalogue entry {key}"), e))?
            else {
                continue;
            };
            if key == POLICY_KEY {
                snapshot.policy = serde_json::from_slice(&value).ok();
            } else if key.starts_with(TOOLS_PREFIX)
                && let Some(entry) = live_entry(&key, &value, now)
            {
                snapshot.tools.insert(entry.name.clone(), entry);
            }
        }
        Ok(snapshot)
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_follows_the_hints_and_their_defaults() {
        let hints = |read_only, destructive, open_world| {
            Some(Hints {
                read_only,
                destructive,
                open_world,
            })
        };
        assert_eq!(Risk::from_hints(None), Risk::Destructive);
        assert_eq!(Risk::from_hints(hints(Some(true), None, None)), Risk::Read);
        assert_eq!(
            Risk::from_hints(hints(Some(true), None, Some(true))),
            Risk::Read
        );
        // Annotated but silent on the open world: the specification's default is true.
        assert_eq!(Risk::from_hints(hints(None, None, None)), Risk::External);
        assert_eq!(
            Risk::from_hints(hints(Some(false), None, Some(false))),
            Risk::Destructive
        );
        assert_eq!(
            Risk::from_hints(hints(Some(false), Some(false), Some(false))),
            Risk::Write
        );
    }

    #[test]
    fn an_argument_can_make_a_call_a_read() {
        let mut entry = ToolEntry::builtin(
            "http",
            "request",
            "",
            serde_json::json!({"type": "object"}),
            Risk::External,
        );
        entry.read_when = Some(ArgumentIn {
            argument: "method".into(),
            values: vec!["GET".into(), "HEAD".into()],
            unless: vec!["body".into()],
        });
        assert_eq!(entry.risk_of_call(r#"{"method":"get"}"#), Risk::Read);
        assert_eq!(
            entry.risk_of_call(r#"{"method":"GET","body":null}"#),
            Risk::Read
        );
        // An empty text is no body (and the connector sends none); any other is one.
        assert_eq!(
            entry.risk_of_call(r#"{"method":"GET","body":""}"#),
            Risk::Read
        );
        assert_eq!(
            entry.risk_of_call(r#"{"method":"GET","body":" "}"#),
            Risk::External
        );
        assert_eq!(
            entry.risk_of_call(r#"{"method":"GET","body":0}"#),
            Risk::External
        );
        assert_eq!(entry.risk_of_call(r#"{"method":"POST"}"#), Risk::External);
        assert_eq!(entry.risk_of_call(r#"{"method":1}"#), Risk::External);
        assert_eq!(entry.risk_of_call("not json"), Risk::External);
    }

    #[test]
    fn names_are_checked() {
        for good in ["fs", "time", "my-server2"] {
            assert!(valid_connector_name(good), "{good}");
        }
        for bad in ["", "Fs", "2fs", "f.s", "f_s", &"x".repeat(33)] {
            assert!(!valid_connector_name(bad), "{bad}");
        }
        for good in ["read_file", "get-time", "A1"] {
            assert!(valid_tool_name(good), "{good}");
        }
        for bad in ["", "a.b", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_tool_name(bad), "{bad}");
        }
    }
}
