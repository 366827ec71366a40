//! Which tools a leaf's model is offered: the catalogue's live tools, less those the
//! policy in force denies whatever their arguments, read at most every [`MAX_AGE`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::catalogue::{Risk, Snapshot, ToolEntry};
use dispatch_models::ToolSpec;
use dispatch_rules::{Document, Effect};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The tools of the hand-off connector (chat turns only).
const HAND_OFF_PREFIX: &str = "dispatch.";

/// How long one reading of the catalogue serves.
const MAX_AGE: Duration = Duration::from_secs(2);

/// The tool catalogue as this dispatcher last read it.
#[derive(Clone)]
pub struct Offer {
    store: kv::Store,
    cached: Arc<Mutex<Option<Reading>>>,
}

/// One reading of the catalogue, and when it was made.
type Reading = (Instant, Arc<Offered>);

/// What one reading found.
#[derive(Debug, Default)]
pub struct Offered {
    /// Live tools not denied outright, by name.
    pub tools: BTreeMap<String, ToolEntry>,
    /// Every live tool, offered or not.
    all: BTreeMap<String, ToolEntry>,
    /// [`Self::tools`] as a model is offered them, made once per reading: every turn
    /// of every run is offered them, and a spec's schema is shared, not copied.
    on_offer: Vec<ToolSpec>,
}

impl Offered {
    fn from_snapshot(snapshot: Snapshot) -> Self {
        let policy = snapshot.policy.as_ref().and_then(Document::from_mirror);
        let all = snapshot.tools;
        let tools = all
            .clone()
            .into_iter()
            .filter(|(name, entry)| {
                policy.as_ref().is_none_or(|p| {
                    p.standing(name, &entry.possible_risks()).effect != Some(Effect::Deny)
                })
            })
            .collect();
        Self::new(tools, all)
    }

    fn new(tools: BTreeMap<String, ToolEntry>, all: BTreeMap<String, ToolEntry>) -> Self {
        let on_offer = tools
            .values()
            .map(|t| ToolSpec {
                name: t.name.clone(),
                description: t.description.as_str().into(),
                parameters: Arc::new(t.parameters.clone()),
            })
            .collect();
        Self {
            tools,
            all,
            on_offer,
        }
    }

    /// The tools as a chat turn's model is offered them: every one on offer.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.specs_where(|_| true)
    }

    /// The tools as a plan's author and its steps are offered them: all but the
    /// hand-off (`dispatch.*`), which is a conversation's. A step that starts planned
    /// runs would be a loop with no person in it.
    pub fn plan_specs(&self) -> Vec<ToolSpec> {
        self.specs_where(|name| !name.starts_with(HAND_OFF_PREFIX))
    }

    fn specs_where(&self, keep: impl Fn(&str) -> bool) -> Vec<ToolSpec> {
        self.on_offer
            .iter()
            .filter(|t| keep(&t.name))
            .cloned()
            .collect()
    }

    /// Whether `tool` can make files in the run directory: a tool of the built-in
    /// `files` connector (the only one confined to the run) that is not a read.
    pub fn writes_in_run(&self, tool: &str) -> bool {
        tool.starts_with("files.")
            && self
                .all
                .get(tool)
                .is_some_and(|entry| entry.possible_risks() != [Risk::Read])
    }

    /// `outside`, a file check outside the run, written as a `call` gate of a read-only
    /// tool on offer that takes just a path: one that reads a file's text for a check of
    /// what it holds, one that describes a file (or reads it) for a check that it is
    /// there. `None` when no such tool is on offer.
    pub fn gate_call(&self, outside: &dispatch_plan::gate::Outside) -> Option<String> {
        let args = serde_json::json!({ "path": outside.path }).to_string();
        let takes_a_path = |entry: &ToolEntry| {
            let required = entry.parameters.get("required").and_then(|r| r.as_array());
            required.is_some_and(|r| r.len() == 1 && r[0] == "path")
        };
        let fitness = |name: &str| {
            let tool = name.split_once('.').map_or(name, |(_, tool)| tool);
            if outside.holds.is_none() && (tool.contains("info") || tool.contains("stat")) {
                return 3;
            }
            u8::from(tool.contains("read")) * (1 + u8::from(tool.contains("text")))
        };
        let (name, _) = self
            .tools
            .values()
            .filter(|entry| takes_a_path(entry) && entry.risk_of_call(&args) == Risk::Read)
            .map(|entry| (entry.name.as_str(), fitness(&entry.name)))
            .filter(|(_, fitness)| *fitness > 0)
            // The fittest; of equals, the first by name.
            .min_by_key(|(name, fitness)| (std::cmp::Reverse(*fitness), *name))?;
        Some(match &outside.holds {
            Some(text) => format!("call {name} {args} contains \"{text}\""),
            None => format!("call {name} {args}"),
        })
    }

    /// The risk of a call of `tool` with `args_json`: as its catalogue entry says, or
    /// destructive for a tool no connector serves.
    pub fn risk(&self, tool: &str, args_json: &str) -> Risk {
        self.all
            .get(tool)
            .map_or(Risk::Destructive, |t| t.risk_of_call(args_json))
    }
}

impl Offer {
    pub fn new(store: kv::Store) -> Self {
        Self {
            store,
            cached: Arc::new(Mutex::new(None)),
        }
    }

    /// The current offer. When the catalogue cannot be read, the last reading serves
    /// (or an empty one, before any).
    pub async fn current(&self) -> Arc<Offered> {
        let mut cached = self.cached.lock().await;
        if let Some((at, offered)) = cached.as_ref()
            && at.elapsed() < MAX_AGE
        {
            return offered.clone();
        }
        match Snapshot::read(&self.store).await {
            Ok(snapshot) => {
                let offered = Arc::new(Offered::from_snapshot(snapshot));
                *cached = Some((Instant::now(), offered.clone()));
                offered
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the tool catalogue; using the last reading");
                cached
                    .as_ref()
                    .map(|(_, offered)| offered.clone())
                    .unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, risk: Risk) -> ToolEntry {
        ToolEntry {
            name: name.into(),
            connector: name.split('.').next().unwrap().into(),
            description: String::new(),
            parameters: serde_json::json!({"type": "object"}),
            risk,
            version: "1".into(),
            refreshed_unix_ms: 0,
            read_when: None,
        }
    }

    #[test]
    fn tools_the_policy_denies_outright_are_not_offered() {
        let mut snapshot = Snapshot::default();
        for (name, risk) in [
            ("files.read_file", Risk::Read),
            ("files.write_file", Risk::Write),
            ("fs.move_file", Risk::Destructive),
        ] {
            snapshot.tools.insert(name.into(), entry(name, risk));
        }
        let policy = Document::parse(
            r#"{"default": "ask", "rules": [{"name": "no-moves", "effect": "deny", "tools": ["fs.move_file"]}]}"#,
        )
        .unwrap();
        snapshot.policy =
            Some(serde_json::json!({"version": 2, "hash": policy.hash(), "document": policy}));
        let offered = Offered::from_snapshot(snapshot.clone());
        let names: Vec<&str> = offered.tools.keys().map(String::as_str).collect();
        assert_eq!(names, ["files.read_file", "files.write_file"]);
        assert_eq!(offered.risk("fs.move_file", "{}"), Risk::Destructive);
        assert_eq!(offered.risk("files.read_file", "{}"), Risk::Read);
        assert_eq!(offered.risk("nobody.serves_this", "{}"), Risk::Destructive);
        // Without a policy in the catalogue, every live tool is offered.
        snapshot.policy = None;
        assert_eq!(Offered::from_snapshot(snapshot).tools.len(), 3);
    }

    #[test]
    fn a_file_check_outside_the_run_is_written_as_a_call_of_a_read_tool() {
        let path_only = serde_json::json!({
            "type": "object",
            "properties": {"path": {"type": "string"}, "head": {"type": "number"}},
            "required": ["path"],
        });
        let mut tools = BTreeMap::new();
        for (name, risk, parameters) in [
            ("fs.read_media_file", Risk::Read, path_only.clone()),
            ("fs.read_text_file", Risk::Read, path_only.clone()),
            ("fs.get_file_info", Risk::Read, path_only.clone()),
            // A write, or a read that needs more than a path: never offered.
            ("fs.write_file", Risk::Write, path_only.clone()),
            (
                "fs.search_files",
                Risk::Read,
                serde_json::json!({"type": "object", "required": ["path", "pattern"]}),
            ),
        ] {
            let mut entry = entry(name, risk);
            entry.parameters = parameters;
            tools.insert(name.to_owned(), entry);
        }
        let offered = Offered::new(tools.clone(), tools);
        let there = dispatch_plan::gate::outside("test -s '/srv/a b.txt'").unwrap();
        assert_eq!(
            offered.gate_call(&there).as_deref(),
            Some(r#"call fs.get_file_info {"path":"/srv/a b.txt"}"#)
        );
        let holds = dispatch_plan::gate::outside("grep -q v1.0 /srv/CHANGELOG.txt").unwrap();
        let call = offered.gate_call(&holds).unwrap();
        assert_eq!(
            call,
            r#"call fs.read_text_file {"path":"/srv/CHANGELOG.txt"} contains "v1.0""#
        );
        // What is offered parses as the gate it says.
        match dispatch_plan::gate::parse(&call).unwrap() {
            dispatch_plan::gate::Gate::Check(dispatch_plan::gate::Check::Call(c)) => {
                assert_eq!(c.contains.as_deref(), Some("v1.0"));
            }
            other => panic!("{other:?}"),
        }
        // No read tool that takes just a path: nothing to offer.
        let none = Offered::default();
        assert_eq!(none.gate_call(&holds), None);
    }
}
