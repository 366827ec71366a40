//! The policy document: what the permission gate decides for a tool call.
//!
//! A document is ordered rules and a default. A rule matches a call by tool name (a
//! name, every tool of a connector, or every tool), risk class, the run's origin, and
//! predicates on the call's arguments (path prefixes, URL hosts); the first rule that
//! matches decides, with one of four effects: `allow`, `deny`, `ask` (a person
//! decides) or `validate` (a validator model decides, and may hand it to a person).
//!
//! This crate owns the document's form, its checks and its matching, including how a
//! call's arguments are read for paths and URLs ([`arguments`], [`path`], [`host`]).
//! Where documents are stored and versioned, and who may change them, belongs to the
//! policy service; the version of a document is its content hash ([`Document::hash`]).

mod arguments;
mod host;
mod path;
pub mod store;

use dispatch_bus::catalogue::Risk;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The most rules a document may hold.
pub const MAX_RULES: usize = 256;
/// The largest document, as written.
pub const MAX_DOCUMENT_BYTES: usize = 48 * 1024;
/// The longest approval wait a rule may ask for: a week.
pub const MAX_APPROVAL_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// What a rule does with a call it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
    /// A person decides.
    Ask,
    /// The validator model decides; it may escalate to a person.
    Validate,
}

impl Effect {
    pub fn word(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::Ask => "ask",
            Effect::Validate => "validate",
        }
    }
}

/// Conditions on a call's arguments. Every one given must hold.
///
/// Both look at every argument: the ones the tool's schema marks as paths
/// (`"format": "path"`) or URLs (`"format": "uri"`), or, where it marks none, every
/// string; and everything the schema does not describe ([`arguments`]). How a
/// condition holds depends on the rule's effect, so that an argument the gate cannot
/// read is never a reason to allow and never a way around a denial:
///
/// - in a rule that allows (`allow`, `validate`), the call must name at least one
///   path (URL), and every one, read strictly, must lie under a prefix (on a host);
///   one that cannot be read strictly ([`path`], [`host`]) makes the condition fail;
/// - in a rule that stops (`deny`, `ask`), the condition holds when any path (URL),
///   read any way a tool might read it, lies under a prefix (on a host), or when the
///   arguments cannot be read at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// Paths lie under one of these. A relative prefix (`scratch/`) matches relative
    /// paths, an absolute one (`/srv/shared/`) absolute paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefix: Vec<String>,
    /// The connectors a relative prefix speaks for: those that read a relative path
    /// inside the run's own directory. Left out, the built-in `files` connector
    /// ([`RUN_PATH_CONNECTORS`]). Another connector's server makes of a relative path
    /// whatever it makes of it (the filesystem MCP server: a path in its shared
    /// folder), so `scratch/` allows none of its calls unless it is named here. An
    /// absolute prefix speaks for every connector; a rule that stops a call (`deny`,
    /// `ask`) applies every prefix to every connector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_connectors: Vec<String>,
    /// URLs are http(s) URLs whose host is one of these: a name (`api.example.com`),
    /// an IP address, or every name under a domain (`*.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub url_host: Vec<String>,
}

/// The connectors whose relative paths are inside the run's directory, when a rule
/// names none: the built-in `files`.
pub const RUN_PATH_CONNECTORS: [&str; 1] = ["files"];

impl When {
    fn is_empty(&self) -> bool {
        self.path_prefix.is_empty() && self.url_host.is_empty()
    }

    /// Whether a relative prefix speaks for the calls of `tool`'s connector.
    fn relative_prefixes_speak_for(&self, tool: &str) -> bool {
        let connector = tool.split_once('.').map_or(tool, |(c, _)| c);
        match self.path_connectors.is_empty() {
            true => RUN_PATH_CONNECTORS.contains(&connector),
            false => self.path_connectors.iter().any(|c| c == connector),
        }
    }
}

/// One rule. Every condition given must hold for it to match; a condition left out
/// matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub effect: Effect,
    /// Tool patterns: `files.write_file`, `fs.*` (every tool of the connector `fs`),
    /// or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Risk classes, as the tool catalogue gives them for the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub risk: Vec<Risk>,
    /// Origins of the run (`cli`, `http`, `cron`, `webhook`, `todo`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origin: Vec<String>,
    #[serde(default, skip_serializing_if = "When::is_empty")]
    pub when: When,
    /// Why the rule is there, in words: told to the model on a denial, to the person
    /// asked, and to the validator.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// For `ask` (and `validate` escalations): how long a person has to answer before
    /// the request is denied; the service's default when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_ttl_ms: Option<u64>,
}

impl Rule {
    /// What is wrong with the rule, if anything.
    fn check(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "rule name {name:?} must be 1-64 letters, digits, '-' or '_'"
            ));
        }
        if [DEFAULT_RULE, MEMO_RULE, ARGUMENTS_RULE, GATE_RULE].contains(&name.as_str()) {
            return Err(format!("{name:?} is a name the gate uses itself"));
        }
        for pattern in &self.tools {
            if !valid_pattern(pattern) {
                return Err(format!(
                    "tool pattern {pattern:?} is not a tool name (connector.tool), connector.* or *"
                ));
            }
        }
        for origin in &self.origin {
            if origin.is_empty()
                || origin.len() > 32
                || !origin.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            {
                return Err(format!(
                    "origin {origin:?} must be 1-32 lowercase letters or '-'"
                ));
            }
        }
        for prefix in &self.when.path_prefix {
            if prefix.trim_matches('/').is_empty() && !prefix.starts_with('/') {
                return Err("an empty path prefix matches nothing".into());
            }
            if path::prefix(prefix).is_none() {
                return Err(format!(
                    "path prefix {prefix:?} may not climb with '..' or hold a backslash or control character"
                ));
            }
        }
        for connector in &self.when.path_connectors {
            if connector.is_empty()
                || connector.len() > 64
                || !connector
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "path connector {connector:?} must be a connector's name (1-64 letters, digits, '-' or '_')"
                ));
            }
        }
        if !self.when.path_connectors.is_empty()
            && !self.when.path_prefix.iter().any(|p| !p.starts_with('/'))
        {
            return Err(
                "path_connectors names the connectors a relative path_prefix speaks for; \
                 this rule has no relative path_prefix"
                    .into(),
            );
        }
        for host in &self.when.url_host {
            host::Pattern::parse(host)?;
        }
        if self.reason.len() > 1024 {
            return Err("a reason may be at most 1024 bytes".into());
        }
        match self.approval_ttl_ms {
            Some(0) => Err("approval_ttl_ms must be more than 0".into()),
            Some(ms) if ms > MAX_APPROVAL_TTL_MS => Err(format!(
                "approval_ttl_ms may be at most {MAX_APPROVAL_TTL_MS} (a week)"
            )),
            _ => Ok(()),
        }
    }
}

/// The rule name a decision by the document's default carries.
pub const DEFAULT_RULE: &str = "default";
/// The rule name a decision carries when an identical call was denied earlier in the
/// run, and that denial stands for it.
pub use dispatch_proto::run::v1::MEMO_RULE;
/// The rule name a denial carries when the call's arguments have no canonical form (a
/// key given twice, not one JSON object, too big): such a call is never judged by the
/// document.
pub const ARGUMENTS_RULE: &str = "arguments";
/// The rule name a denial carries when a gate's call is one a gate may not make: not a
/// read, or one the document would not allow outright (a gate never waits for a person).
pub const GATE_RULE: &str = "gate";
/// The rule name a denial carries when the call names a tool its connector does not
/// serve (a model that guessed a name): no person could make it run, so none is asked.
pub const NO_SUCH_TOOL_RULE: &str = "no-such-tool";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// What the policy is for, in words: given to the validator model with each call
    /// it judges.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guidance: String,
    pub rules: Vec<Rule>,
    /// The effect when no rule matches.
    pub default: Effect,
}

/// A call as the gate sees it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub tool: &'a str,
    pub args_json: &'a str,
    pub risk: Risk,
    /// The run's origin; empty if unknown.
    pub origin: &'a str,
    /// The tool's input schema (its catalogue entry's `parameters`), which says which
    /// arguments are paths and URLs; `None` when unknown, and then every string may
    /// be either.
    pub schema: Option<&'a serde_json::Value>,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub effect: Effect,
    pub rule: String,
    pub reason: String,
    /// From the rule, for an `ask`.
    pub approval_ttl_ms: Option<u64>,
}

/// What the policy says of a tool before seeing a call's arguments or origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// The effect every call gets, or `None` when it depends on the call.
    pub effect: Option<Effect>,
    /// The rule that decides, or the first that looks at the call.
    pub rule: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The document is not one: why, with its line and column where there is one.
    #[error("{0}")]
    Invalid(String),
}

impl Document {
    /// The policy in force when none was ever set: reads are allowed, and writes
    /// inside the run's scratch directory, a conversation's hand-off and the agent's
    /// own memory; destructive and external calls, and anything else, wait for a
    /// person.
    pub fn builtin() -> Self {
        let rule = |name: &str, effect, risk: Vec<Risk>, when: When, reason: &str| Rule {
            name: name.into(),
            effect,
            tools: Vec::new(),
            risk,
            origin: Vec::new(),
            when,
            reason: reason.into(),
            approval_ttl_ms: None,
        };
        Self {
            guidance: "Dispatch acts on real systems. Reads are free; writes stay inside \
                       the run's own scratch directory unless a person allows more."
                .into(),
            rules: vec![
                rule(
                    "reads",
                    Effect::Allow,
                    vec![Risk::Read],
                    When::default(),
                    "reading changes nothing",
                ),
                rule(
                    "run-writes",
                    Effect::Allow,
                    vec![Risk::Write],
                    When {
                        path_prefix: vec!["scratch/".into()],
                        ..When::default()
                    },
                    "writes inside the run's own scratch/",
                ),
                Rule {
                    tools: vec!["dispatch.dispatch".into(), "dispatch.stop".into()],
                    ..rule(
                        "hand-off",
                        Effect::Allow,
                        Vec::new(),
                        When::default(),
                        "a conversation hands work to a run of its own, which has its own gate",
                    )
                },
                Rule {
                    tools: vec!["memory.remember".into(), "memory.forget".into()],
                    ..rule(
                        "memory",
                        Effect::Allow,
                        Vec::new(),
                        When::default(),
                        "what the agent keeps for itself: recorded in the run's log, not gated",
                    )
                },
                rule(
                    "risky",
                    Effect::Ask,
                    vec![Risk::Destructive, Risk::External],
                    When::default(),
                    "destructive and external calls need a person's approval",
                ),
            ],
            default: Effect::Ask,
        }
    }

    /// Reads and checks a document written as JSON. A bad one is refused with the
    /// reason and, where it has one, the line and column.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(Error::Invalid(format!(
                "the document is {} bytes; a policy document may be at most {MAX_DOCUMENT_BYTES}",
                text.len()
            )));
        }
        let doc: Self = serde_json::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?;
        if doc.rules.len() > MAX_RULES {
            return Err(Error::Invalid(format!(
                "{} rules; a document may hold at most {MAX_RULES}",
                doc.rules.len()
            )));
        }
        if doc.guidance.len() > 4096 {
            return Err(Error::Invalid(
                "guidance may be at most 4096 bytes".to_owned(),
            ));
        }
        for (i, rule) in doc.rules.iter().enumerate() {
            if let Err(why) = rule.check() {
                let at = line_of_rule(text, &rule.name)
                    .map(|line| format!(" at line {line}"))
                    .unwrap_or_default();
                return Err(Error::Invalid(format!(
                    "rule {} {:?}{at}: {why}",
                    i + 1,
                    rule.name
                )));
            }
            if let Some(j) = doc.rules[..i].iter().position(|r| r.name == rule.name) {
                return Err(Error::Invalid(format!(
                    "rules {} and {} are both named {:?}; names must be unique, decisions name them",
                    j + 1,
                    i + 1,
                    rule.name
                )));
            }
        }
        Ok(doc)
    }

    /// The document the policy service mirrors into the tool catalogue (`{"version",
    /// "hash", "document"}`), if `value` reads as one.
    pub fn from_mirror(value: &serde_json::Value) -> Option<Self> {
        serde_json::from_value(value.get("document")?.clone()).ok()
    }

    /// The canonical form: what is stored and hashed.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a document is JSON")
    }

    /// `sha256:<hex>` of the canonical form: the version's identity.
    pub fn hash(&self) -> String {
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(self.to_json().as_bytes()))
        )
    }

    /// Decides one call: the first rule that matches, else the default.
    pub fn decide(&self, call: Call<'_>) -> Verdict {
        let args: Option<serde_json::Value> = serde_json::from_str(call.args_json).ok();
        if let Some(rule) = self.rules.iter().find(|r| r.matches(&call, args.as_ref())) {
            let reason = match rule.reason.as_str() {
                "" => format!("{} by rule {}", rule.effect.word(), rule.name),
                why => format!("{} by rule {}: {why}", rule.effect.word(), rule.name),
            };
            return Verdict {
                effect: rule.effect,
                rule: rule.name.clone(),
                reason,
                approval_ttl_ms: rule.approval_ttl_ms,
            };
        }
        // Say what would have allowed it, if a rule came close.
        let near = self
            .rules
            .iter()
            .find(|r| r.effect == Effect::Allow && r.covers(call.tool) && r.risk_ok(call.risk));
        let reason = match near {
            Some(rule) if !rule.when.is_empty() => format!(
                "{} by default: {} (risk {}) is allowed only when {}",
                self.default.word(),
                call.tool,
                call.risk.word(),
                rule.when.describe()
            ),
            _ => format!(
                "{} by default: no rule matches {} (risk {})",
                self.default.word(),
                call.tool,
                call.risk.word()
            ),
        };
        Verdict {
            effect: self.default,
            rule: DEFAULT_RULE.into(),
            reason,
            approval_ttl_ms: None,
        }
    }

    /// What every call of `tool` gets, whatever its arguments and origin, given the
    /// risks its calls can have (`risks`: the catalogue's class, and `read` too for a
    /// tool some of whose calls are reads).
    pub fn standing(&self, tool: &str, risks: &[Risk]) -> Standing {
        for rule in self.rules.iter().filter(|r| r.covers(tool)) {
            let some = risks.iter().any(|r| rule.risk_ok(*r));
            if !some {
                continue;
            }
            let all = risks.iter().all(|r| rule.risk_ok(*r));
            if all && rule.origin.is_empty() && rule.when.is_empty() {
                return Standing {
                    effect: Some(rule.effect),
                    rule: rule.name.clone(),
                };
            }
            // A conditional deny lets other calls through to later rules; anything
            // else conditional makes the tool's fate depend on the call.
            if rule.effect != Effect::Deny {
                return Standing {
                    effect: None,
                    rule: rule.name.clone(),
                };
            }
        }
        Standing {
            effect: Some(self.default),
            rule: DEFAULT_RULE.into(),
        }
    }

    /// The rule named `name`, if any.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

impl Rule {
    fn covers(&self, tool: &str) -> bool {
        self.tools.is_empty()
            || self
                .tools
                .iter()
                .any(|pattern| match pattern.strip_suffix(".*") {
                    _ if pattern == "*" => true,
                    Some(connector) => tool
                        .strip_prefix(connector)
                        .is_some_and(|rest| rest.starts_with('.')),
                    None => pattern == tool,
                })
    }

    fn risk_ok(&self, risk: Risk) -> bool {
        self.risk.is_empty() || self.risk.contains(&risk)
    }

    fn matches(&self, call: &Call<'_>, args: Option<&serde_json::Value>) -> bool {
        self.covers(call.tool)
            && self.risk_ok(call.risk)
            && (self.origin.is_empty() || self.origin.iter().any(|o| o == call.origin))
            && self.when.holds(call.tool, args, call.schema, self.effect)
    }
}

impl When {
    /// Whether the conditions hold for a call with `args` (`None`: not JSON) and the
    /// tool's `schema`, in a rule with `effect`.
    fn holds(
        &self,
        tool: &str,
        args: Option<&serde_json::Value>,
        schema: Option<&serde_json::Value>,
        effect: Effect,
    ) -> bool {
        if self.is_empty() {
            return true;
        }
        let stops = matches!(effect, Effect::Deny | Effect::Ask);
        let Some(Ok(named)) = args.map(|args| arguments::read(args, schema)) else {
            // Arguments the gate cannot read stop a call, and allow none.
            return stops;
        };
        (self.path_prefix.is_empty() || self.paths_hold(tool, &named, stops))
            && (self.url_host.is_empty() || self.hosts_hold(&named, stops))
    }

    fn paths_hold(&self, tool: &str, named: &arguments::Named<'_>, stops: bool) -> bool {
        // What allows a call reads a relative prefix only for the connectors it speaks
        // for; what stops one reads every prefix for every connector.
        let relative = stops || self.relative_prefixes_speak_for(tool);
        let prefixes: Vec<path::Steps> = self
            .path_prefix
            .iter()
            .filter(|p| relative || p.starts_with('/'))
            .filter_map(|p| path::prefix(p))
            .collect();
        let under = |steps: &path::Steps| prefixes.iter().any(|p| steps.is_under(p));
        if stops {
            return named.odd_path
                || named.paths().any(|p| {
                    path::readings(p)
                        .iter()
                        .any(|r| r.as_ref().is_none_or(under))
                });
        }
        let mut some = false;
        for p in named.paths() {
            some = true;
            match path::strict(p) {
                Ok(readings) if readings.iter().all(under) => {}
                _ => return false,
            }
        }
        some && !named.odd_path
    }

    fn hosts_hold(&self, named: &arguments::Named<'_>, stops: bool) -> bool {
        let patterns: Vec<host::Pattern> = self
            .url_host
            .iter()
            .filter_map(|h| host::Pattern::parse(h).ok())
            .collect();
        let admitted = |h: &host::Host| patterns.iter().any(|p| p.admits(h));
        if stops {
            return named.odd_url
                || named
                    .urls()
                    .any(|(u, _)| host::readings(u).iter().any(admitted));
        }
        let mut some = false;
        for (u, marked) in named.urls() {
            if !marked && !host::looks_like_url(u) {
                continue;
            }
            some = true;
            match host::strict(u) {
                Ok(h) if admitted(&h) => {}
                _ => return false,
            }
        }
        some && !named.odd_url
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.path_prefix.is_empty() {
            parts.push(format!(
                "every path it names is plainly under {} (no '.' or '..' steps, \
                 backslashes, lookalike characters or percent-encoding left after decoding)",
                self.path_prefix.join(" or ")
            ));
            if self.path_prefix.iter().any(|p| !p.starts_with('/')) {
                let connectors = match self.path_connectors.is_empty() {
                    true => RUN_PATH_CONNECTORS.join(", "),
                    false => self.path_connectors.join(", "),
                };
                parts.push(format!(
                    "a relative path is the run's own only for the {connectors} connector's \
                     tools"
                ));
            }
        }
        if !self.url_host.is_empty() {
            parts.push(format!(
                "every URL it names is plainly http(s) on {}",
                self.url_host.join(" or ")
            ));
        }
        parts.join(" and ")
    }
}

/// The line where the rule named `name` is written: where its `"name"` key is.
fn line_of_rule(text: &str, name: &str) -> Option<usize> {
    let quoted = serde_json::to_string(name).ok()?;
    text.match_indices("\"name\"").find_map(|(at, key)| {
        let rest = text[at + key.len()..].trim_start().strip_prefix(':')?;
        rest.trim_start()
            .starts_with(&quoted)
            .then(|| text[..at].matches('\n').count() + 1)
    })
}

fn valid_pattern(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some((connector, tool)) = pattern.split_once('.') else {
        return false;
    };
    dispatch_bus::catalogue::valid_connector_name(connector)
        && (tool == "*" || dispatch_bus::catalogue::valid_tool_name(tool))
}

#[cfg(test)]
mod tests;
