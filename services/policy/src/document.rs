//! The policy document: ordered rules, first match wins, a default for the rest.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

/// A condition on a call's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The call's `path` argument is relative and stays under the run's `scratch/`.
    PathInsideScratch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    /// Tools this rule covers: a name (`files.read_file`), every tool of a connector
    /// (`files.*`), or every tool (`*`).
    pub tools: Vec<String>,
    pub effect: Effect,
    /// All must hold for the rule to match.
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Recorded in every decision, so a decision can be traced to the policy that made it.
    pub version: u32,
    pub rules: Vec<Rule>,
    pub default: Effect,
}

impl Rule {
    fn covers(&self, tool: &str) -> bool {
        self.tools
            .iter()
            .any(|pattern| match pattern.strip_suffix(".*") {
                _ if pattern == "*" => true,
                Some(connector) => tool
                    .strip_prefix(connector)
                    .is_some_and(|rest| rest.starts_with('.')),
                None => pattern == tool,
            })
    }
}

/// What the policy says of a tool before seeing any call's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Every call is allowed, by this rule.
    Allowed(String),
    /// Every call is denied, by this rule (or `default`).
    Denied(String),
    /// It depends on the arguments; this is the first rule that looks at them.
    Depends(String),
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub effect: Effect,
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("policy document {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Document {
    /// The policy used when none is configured: read-only tools, and writes that stay
    /// inside the run's scratch directory; everything else is denied.
    pub fn builtin() -> Self {
        Self {
            version: 1,
            rules: vec![
                Rule {
                    name: "read-only-tools".into(),
                    tools: vec!["files.read_file".into(), "files.list_files".into()],
                    effect: Effect::Allow,
                    when: vec![Condition::PathInsideScratch],
                },
                Rule {
                    name: "writes-inside-run".into(),
                    tools: vec!["files.write_file".into()],
                    effect: Effect::Allow,
                    when: vec![Condition::PathInsideScratch],
                },
            ],
            default: Effect::Deny,
        }
    }

    /// Reads and checks a JSON policy document.
    pub fn load(path: &std::path::Path) -> Result<Self, Error> {
        let invalid = |message: String| Error::Invalid {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let doc: Self = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some(rule) = doc
            .rules
            .iter()
            .find(|r| r.tools.is_empty() || r.name.is_empty())
        {
            return Err(invalid(format!(
                "rule {:?} needs a name and at least one tool",
                rule.name
            )));
        }
        Ok(doc)
    }

    /// Decides one call. Arguments that are not a JSON object match no condition.
    pub fn decide(&self, tool: &str, args_json: &str) -> Verdict {
        let args: serde_json::Value = serde_json::from_str(args_json).unwrap_or_default();
        for rule in &self.rules {
            if !rule.covers(tool) {
                continue;
            }
            if let Some(failed) = rule.when.iter().find(|c| !holds(**c, &args)) {
                // A rule that names the tool but whose condition fails only denies if it
                // is the last word; keep looking for another rule.
                tracing::debug!(rule = rule.name, condition = ?failed, "condition does not hold");
                continue;
            }
            return Verdict {
                effect: rule.effect,
                rule: rule.name.clone(),
                reason: match rule.effect {
                    Effect::Allow => format!("{tool} is allowed by rule {}", rule.name),
                    Effect::Deny => format!("{tool} is denied by rule {}", rule.name),
                },
            };
        }
        let reason = match self
            .rules
            .iter()
            .find(|r| r.covers(tool) && !r.when.is_empty())
        {
            Some(rule) => format!("{tool} is only allowed when {}", describe(&rule.when)),
            None => format!("no rule allows the tool {tool:?}"),
        };
        Verdict {
            effect: self.default,
            rule: "default".into(),
            reason,
        }
    }
}

impl Document {
    /// The tool's standing whatever its arguments: the first rule covering it that
    /// has no conditions decides; a conditional allow before it makes it depend on
    /// the arguments (a conditional deny does not: calls it lets through go on to the
    /// next rules); with neither, the default decides.
    pub fn standing(&self, tool: &str) -> Standing {
        for rule in self.rules.iter().filter(|r| r.covers(tool)) {
            match (rule.when.is_empty(), rule.effect) {
                (true, Effect::Allow) => return Standing::Allowed(rule.name.clone()),
                (true, Effect::Deny) => return Standing::Denied(rule.name.clone()),
                (false, Effect::Allow) => return Standing::Depends(rule.name.clone()),
                (false, Effect::Deny) => {}
            }
        }
        match self.default {
            Effect::Allow => Standing::Allowed("default".into()),
            Effect::Deny => Standing::Denied("default".into()),
        }
    }
}

fn holds(condition: Condition, args: &serde_json::Value) -> bool {
    match condition {
        Condition::PathInsideScratch => args
            .get("path")
            .and_then(|p| p.as_str())
            .is_some_and(inside_scratch),
    }
}

fn describe(conditions: &[Condition]) -> String {
    conditions
        .iter()
        .map(|c| match c {
            Condition::PathInsideScratch => "its path stays inside the run's scratch/",
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

/// `scratch` or `scratch/...`, relative, never climbing with `..`.
pub fn inside_scratch(path: &str) -> bool {
    let mut parts = path.split('/').filter(|p| !p.is_empty() && *p != ".");
    !path.starts_with('/') && parts.next() == Some("scratch") && parts.all(|p| p != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_policy_allows_reads_and_scratch_writes_only() {
        let doc = Document::builtin();
        let allow = |tool: &str, args: &str| doc.decide(tool, args).effect == Effect::Allow;
        assert!(allow("files.read_file", r#"{"path":"scratch/a.org"}"#));
        assert!(allow("files.list_files", r#"{"path":"scratch"}"#));
        assert!(allow(
            "files.write_file",
            r#"{"path":"scratch/x/y.org","content":""}"#
        ));
        assert!(!allow("files.write_file", r#"{"path":"../../etc/passwd"}"#));
        assert!(!allow("files.write_file", r#"{"path":"scratch/../../x"}"#));
        assert!(!allow("files.write_file", r#"{"path":"/tmp/x"}"#));
        assert!(!allow("files.write_file", r#"{"path":"TASKS.org"}"#));
        assert!(!allow("files.write_file", "not json"));
        assert!(!allow(
            "write_file",
            r#"{"path":"scratch/x/y.org","content":""}"#
        ));
        assert!(!allow("send_email", "{}"));
        let verdict = doc.decide("send_email", "{}");
        assert_eq!(verdict.rule, "default");
        assert!(verdict.reason.contains("send_email"), "{}", verdict.reason);
        let verdict = doc.decide("files.write_file", r#"{"path":"/etc/x"}"#);
        assert!(verdict.reason.contains("scratch"), "{}", verdict.reason);
    }

    #[test]
    fn a_tool_s_standing_is_what_no_arguments_can_change() {
        let doc: Document = serde_json::from_str(
            r#"{"version":3,"default":"deny","rules":[
                {"name":"no-moves","tools":["fs.move_file"],"effect":"deny"},
                {"name":"fs-reads","tools":["fs.*"],"effect":"allow","when":["path_inside_scratch"]},
                {"name":"clock","tools":["time.*"],"effect":"allow"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            doc.standing("fs.move_file"),
            Standing::Denied("no-moves".into())
        );
        assert_eq!(
            doc.standing("fs.read_file"),
            Standing::Depends("fs-reads".into())
        );
        assert_eq!(
            doc.standing("time.get_current_time"),
            Standing::Allowed("clock".into())
        );
        assert_eq!(
            doc.standing("http.request"),
            Standing::Denied("default".into())
        );
        // `fs.*` covers the connector's tools only, not a connector whose name starts alike.
        assert_eq!(
            doc.standing("fsx.read_file"),
            Standing::Denied("default".into())
        );
        assert_eq!(doc.decide("time.convert_time", "{}").effect, Effect::Allow);
        let builtin = Document::builtin();
        assert!(matches!(
            builtin.standing("files.write_file"),
            Standing::Depends(_)
        ));
        assert!(matches!(
            builtin.standing("test.sleep"),
            Standing::Denied(_)
        ));
    }

    #[test]
    fn documents_are_checked_when_loaded() {
        let dir = std::env::temp_dir().join(format!("dispatch-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.json");
        std::fs::write(
            &path,
            r#"{"version":2,"rules":[],"default":"allow","extra":1}"#,
        )
        .unwrap();
        let err = Document::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
        std::fs::write(&path, r#"{"version":2,"rules":[{"name":"all","tools":["*"],"effect":"deny"}],"default":"allow"}"#).unwrap();
        let doc = Document::load(&path).unwrap();
        assert_eq!(doc.decide("read_file", "{}").effect, Effect::Deny);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
