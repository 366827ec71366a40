//! The tools as a client sees them (names, descriptions, input schemas) and the
//! checking of a call's arguments. Pure: a bad call is refused here, before anything
//! reaches the bus.

use std::sync::Arc;

use dispatch_bus::ConversationId;
use dispatch_runlog::submit::{Goal, MAX_TIMEOUT_MS, MIN_TIMEOUT_MS};
use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

/// Every tool, in the order they are listed.
pub(crate) const NAMES: [&str; 7] = [
    "dispatch",
    "tasks",
    "status",
    "stop",
    "approvals",
    "approve",
    "deny",
];

/// The longest reason a denial may carry (as over HTTP).
const MAX_REASON_BYTES: usize = 1024;

/// The longest approval id taken (`<run id>.<call id>`).
const MAX_APPROVAL_ID_BYTES: usize = 256;

/// The longest digest taken (`sha256:` and 64 hex digits fit well within it).
const MAX_DIGEST_BYTES: usize = 128;

/// The longest run id taken: a whole one (a UUID); a short id or a prefix is shorter.
const MAX_RUN_ID_CHARS: usize = 36;

/// The tools, with their input schemas (no property a schema does not name is taken).
pub(crate) fn all() -> Vec<Tool> {
    vec![
        tool(
            "dispatch",
            "Hand a goal to Dispatch. Answers at once with the run id; the run goes on \
             without you. Its note (how it ended) comes through `tasks` of the same \
             conversation.",
            json!({
                "goal": {"type": "string", "description": "What you want done."},
                "conversation": {"type": "string", "description":
                    "The conversation the run's note goes to (default: mcp): letters, digits, - and _."},
                "timeout": {"type": "string", "description":
                    "Kill-switch budget such as 90s, 10m or 1h (default 35m; at least 1s, at most 24h)."},
            }),
            &["goal"],
            ToolAnnotations::new().read_only(false).destructive(false),
        ),
        tool(
            "tasks",
            "The conversation's tasks (run id, status, goal) and the notes of its runs that \
             ended since the last call: each note is handed out once.",
            json!({
                "conversation": {"type": "string", "description": "The conversation (default: mcp)."},
            }),
            &[],
            ToolAnnotations::new().read_only(false).destructive(false),
        ),
        tool(
            "status",
            "One run as the ledger shows it: status, goal, why it ended, its summary.",
            json!({
                "run_id": {"type": "string", "description": "A run id, its 12-character short form, or the start of either."},
            }),
            &["run_id"],
            ToolAnnotations::new().read_only(true),
        ),
        tool(
            "stop",
            "Stop a run: the dispatcher ends it `stopped`, after a 10 s grace period for its \
             owner to end it itself.",
            json!({
                "run_id": {"type": "string", "description": "A run id, its 12-character short form, or the start of either."},
            }),
            &["run_id"],
            ToolAnnotations::new().destructive(true).idempotent(true),
        ),
        tool(
            "approvals",
            "Tool calls waiting for a person's answer: approval id, run, tool, risk, the \
             call's arguments (clipped) and their digest.",
            json!({}),
            &[],
            ToolAnnotations::new().read_only(true),
        ),
        tool(
            "approve",
            "Let a waiting tool call go ahead, with exactly the arguments whose digest you name.",
            json!({
                "approval_id": {"type": "string", "description": "The approval id, as `approvals` lists it."},
                "args_digest": {"type": "string", "description":
                    "The digest of the arguments you looked at (`sha256:<hex>`, as `approvals` lists it)."},
            }),
            &["approval_id", "args_digest"],
            ToolAnnotations::new().destructive(true),
        ),
        tool(
            "deny",
            "Refuse a waiting tool call; the run's model is told the reason.",
            json!({
                "approval_id": {"type": "string", "description": "The approval id, as `approvals` lists it."},
                "reason": {"type": "string", "description": "Why (told to the run's model); at most 1 KiB."},
            }),
            &["approval_id", "reason"],
            ToolAnnotations::new().destructive(false),
        ),
    ]
}

fn tool(
    name: &'static str,
    description: &'static str,
    properties: serde_json::Value,
    required: &[&str],
    annotations: ToolAnnotations,
) -> Tool {
    let schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    let schema: JsonObject = match schema {
        serde_json::Value::Object(object) => object,
        _ => JsonObject::new(),
    };
    Tool::new(name, description, Arc::new(schema)).with_annotations(annotations)
}

/// A checked call of one of the tools.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Call {
    Dispatch(Box<Goal>),
    Tasks(ConversationId),
    Status(String),
    Stop(String),
    Approvals,
    Approve {
        approval_id: String,
        args_digest: String,
    },
    Deny {
        approval_id: String,
        reason: String,
    },
}

/// Why a call was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No tool has that name: a protocol error.
    UnknownTool(String),
    /// The arguments are not what the tool takes: the tool's error, for the caller to read.
    Arguments(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchArgs {
    goal: String,
    #[serde(default)]
    conversation: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksArgs {
    #[serde(default)]
    conversation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    run_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveArgs {
    approval_id: String,
    args_digest: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyArgs {
    approval_id: String,
    reason: String,
}

impl Call {
    /// Checks a call of the tool `name` with `arguments` (none: an empty object).
    pub(crate) fn parse(name: &str, arguments: Option<&JsonObject>) -> Result<Self, Refused> {
        let bad = Refused::Arguments;
        match name {
            "dispatch" => {
                let args: DispatchArgs = arguments_of(name, arguments)?;
                let timeout_ms = timeout_ms(args.timeout.as_deref()).map_err(bad)?;
                let conversation = args.conversation.as_deref().unwrap_or(crate::CONVERSATION);
                Goal::new(&args.goal, conversation, timeout_ms, crate::ORIGIN)
                    .map(|goal| Call::Dispatch(Box::new(goal)))
                    .map_err(|e| bad(format!("{}: {e}", e.code())))
            }
            "tasks" => {
                let args: TasksArgs = arguments_of(name, arguments)?;
                let conversation = args.conversation.as_deref().unwrap_or(crate::CONVERSATION);
                conversation
                    .parse::<ConversationId>()
                    .map(Call::Tasks)
                    .map_err(|e| bad(format!("conversation: {e}")))
            }
            "status" | "stop" => {
                let args: RunArgs = arguments_of(name, arguments)?;
                let run = run_ref(&args.run_id).map_err(bad)?;
                Ok(if name == "status" {
                    Call::Status(run)
                } else {
                    Call::Stop(run)
                })
            }
            "approvals" => {
                let NoArgs {} = arguments_of(name, arguments)?;
                Ok(Call::Approvals)
            }
            "approve" => {
                let args: ApproveArgs = arguments_of(name, arguments)?;
                let approval_id = approval_id(&args.approval_id).map_err(bad)?;
                let args_digest = args.args_digest.trim();
                if args_digest.is_empty() {
                    return Err(bad(
                        "args_digest: name the digest of the arguments you were shown (as \
                         `approvals` lists it); the answer holds only for those"
                            .into(),
                    ));
                }
                if args_digest.len() > MAX_DIGEST_BYTES || !is_token(args_digest) {
                    return Err(bad("args_digest: it is sha256:<64 hex digits>".into()));
                }
                Ok(Call::Approve {
                    approval_id,
                    args_digest: args_digest.to_owned(),
                })
            }
            "deny" => {
                let args: DenyArgs = arguments_of(name, arguments)?;
                let approval_id = approval_id(&args.approval_id).map_err(bad)?;
                let reason = args.reason.trim();
                if reason.is_empty() {
                    return Err(bad(
                        "reason: say why when denying (the run's model is told)".into(),
                    ));
                }
                if reason.len() > MAX_REASON_BYTES {
                    return Err(bad(format!(
                        "reason: at most {MAX_REASON_BYTES} bytes (it has {})",
                        reason.len()
                    )));
                }
                Ok(Call::Deny {
                    approval_id,
                    reason: reason.to_owned(),
                })
            }
            other => Err(Refused::UnknownTool(dispatch_runlog::one_line(other, 64))),
        }
    }
}

/// The arguments as the tool's type, or why not (an unknown or missing field, a wrong
/// type), naming the tool.
fn arguments_of<T: DeserializeOwned>(
    tool: &str,
    arguments: Option<&JsonObject>,
) -> Result<T, Refused> {
    let object = serde_json::Value::Object(arguments.cloned().unwrap_or_default());
    serde_json::from_value(object).map_err(|e| {
        Refused::Arguments(format!(
            "{tool}: {}",
            dispatch_runlog::one_line(&e.to_string(), 300)
        ))
    })
}

/// A `timeout` such as `10m` in milliseconds; none or empty: 0, the default.
fn timeout_ms(timeout: Option<&str>) -> Result<u64, String> {
    let Some(text) = timeout.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    let shown = dispatch_runlog::one_line(text, 40);
    let duration = humantime::parse_duration(text).map_err(|e| {
        format!("timeout: {shown:?} is not a duration such as 90s, 10m or 1h ({e})")
    })?;
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&ms) {
        return Err(format!(
            "timeout: must be between 1s and 24h (got {shown:?})"
        ));
    }
    Ok(ms)
}

/// A run id as people give one: whole, its short form, or a prefix of either.
fn run_ref(run_id: &str) -> Result<String, String> {
    let run_id = run_id.trim();
    if run_id.is_empty() {
        return Err("run_id: must not be empty".into());
    }
    let ok = run_id.chars().count() <= MAX_RUN_ID_CHARS
        && run_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if !ok {
        return Err(format!(
            "run_id: a run id (hex digits and hyphens) or the start of one, not {:?}",
            dispatch_runlog::one_line(run_id, 64)
        ));
    }
    Ok(run_id.to_owned())
}

/// An approval id (`<run id>.<call id>`): visible ASCII, within bounds.
fn approval_id(approval_id: &str) -> Result<String, String> {
    let approval_id = approval_id.trim();
    if approval_id.is_empty() {
        return Err("approval_id: must not be empty".into());
    }
    if approval_id.len() > MAX_APPROVAL_ID_BYTES || !is_token(approval_id) {
        return Err(format!(
            "approval_id: an id as `approvals` lists it, not {:?}",
            dispatch_runlog::one_line(approval_id, 64)
        ));
    }
    Ok(approval_id.to_owned())
}

/// Visible ASCII only: no spaces, no controls.
fn is_token(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: serde_json::Value) -> Result<Call, Refused> {
        let args = args.as_object().cloned();
        Call::parse(name, args.as_ref())
    }

    fn refused(name: &str, args: serde_json::Value) -> String {
        match call(name, args.clone()) {
            Err(Refused::Arguments(why)) => why,
            other => panic!("{name} {args}: expected refused arguments, got {other:?}"),
        }
    }

    #[test]
    fn every_tool_is_listed_once_with_a_closed_object_schema() {
        let tools = all();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, NAMES);
        for tool in &tools {
            assert_eq!(tool.input_schema["type"], "object", "{}", tool.name);
            assert_eq!(
                tool.input_schema["additionalProperties"], false,
                "{}",
                tool.name
            );
            let properties = tool.input_schema["properties"].as_object().unwrap();
            for required in tool.input_schema["required"].as_array().unwrap() {
                assert!(
                    properties.contains_key(required.as_str().unwrap()),
                    "{}: {required} is required but not a property",
                    tool.name
                );
            }
        }
    }

    #[test]
    fn a_goal_is_checked_as_every_door_checks_it() {
        let Ok(Call::Dispatch(goal)) = call("dispatch", json!({"goal": "  tidy up  "})) else {
            panic!("a goal alone is a call")
        };
        assert_eq!(
            (goal.goal(), goal.conversation().as_str(), goal.timeout_ms()),
            ("tidy up", "mcp", 0)
        );
        let Ok(Call::Dispatch(goal)) = call(
            "dispatch",
            json!({"goal": "g", "conversation": "c-1", "timeout": "10m"}),
        ) else {
            panic!("a goal with a conversation and a timeout is a call")
        };
        assert_eq!(
            (goal.conversation().as_str(), goal.timeout_ms()),
            ("c-1", 600_000)
        );

        assert!(refused("dispatch", json!({})).contains("missing field `goal`"));
        assert!(refused("dispatch", json!({"goal": "   "})).contains("invalid_goal"));
        assert!(refused("dispatch", json!({"goal": 3})).contains("invalid type"));
        assert!(refused("dispatch", json!({"goal": "g", "extra": 1})).contains("unknown field"));
        assert!(
            refused("dispatch", json!({"goal": "g", "timeout": "soon"})).contains("not a duration")
        );
        assert!(refused("dispatch", json!({"goal": "g", "timeout": "500ms"})).contains("1s"));
        assert!(refused("dispatch", json!({"goal": "g", "timeout": "2d"})).contains("24h"));
        assert!(
            refused("dispatch", json!({"goal": "g", "conversation": "a.b"}))
                .contains("invalid_conversation")
        );
        let long = "x".repeat(dispatch_runlog::submit::MAX_GOAL_CHARS + 1);
        assert!(refused("dispatch", json!({ "goal": long })).contains("invalid_goal"));
    }

    #[test]
    fn tasks_default_to_the_mcp_conversation() {
        assert_eq!(
            call("tasks", json!({})),
            Ok(Call::Tasks("mcp".parse().unwrap()))
        );
        assert_eq!(
            Call::parse("tasks", None),
            Ok(Call::Tasks("mcp".parse().unwrap()))
        );
        assert_eq!(
            call("tasks", json!({"conversation": "chat-1"})),
            Ok(Call::Tasks("chat-1".parse().unwrap()))
        );
        assert!(refused("tasks", json!({"conversation": "a b"})).starts_with("conversation"));
        assert!(refused("tasks", json!({"all": true})).contains("unknown field"));
    }

    #[test]
    fn run_ids_are_whole_short_or_prefixes_and_nothing_else() {
        let whole = dispatch_bus::RunId::new().to_string();
        assert_eq!(
            call("status", json!({ "run_id": whole })),
            Ok(Call::Status(whole.clone()))
        );
        assert_eq!(
            call("stop", json!({"run_id": " 0a1b2c3d4e5f "})),
            Ok(Call::Stop("0a1b2c3d4e5f".into()))
        );
        assert!(refused("status", json!({"run_id": ""})).contains("empty"));
        assert!(refused("status", json!({"run_id": "x; rm -rf"})).contains("hex digits"));
        assert!(refused("stop", json!({ "run_id": format!("{whole}0") })).contains("hex digits"));
        assert!(refused("stop", json!({})).contains("missing field `run_id`"));
    }

    #[test]
    fn answers_need_their_digest_or_their_reason() {
        assert_eq!(call("approvals", json!({})), Ok(Call::Approvals));
        assert!(refused("approvals", json!({"limit": 3})).contains("unknown field"));
        assert_eq!(
            call(
                "approve",
                json!({"approval_id": "r.c1", "args_digest": "sha256:00"})
            ),
            Ok(Call::Approve {
                approval_id: "r.c1".into(),
                args_digest: "sha256:00".into()
            })
        );
        assert!(
            refused(
                "approve",
                json!({"approval_id": "r.c1", "args_digest": " "})
            )
            .contains("digest")
        );
        assert!(refused("approve", json!({"approval_id": "r.c1"})).contains("args_digest"));
        assert!(
            refused(
                "approve",
                json!({"approval_id": "r c1", "args_digest": "sha256:00"})
            )
            .starts_with("approval_id")
        );
        assert_eq!(
            call(
                "deny",
                json!({"approval_id": "r.c1", "reason": " not today "})
            ),
            Ok(Call::Deny {
                approval_id: "r.c1".into(),
                reason: "not today".into()
            })
        );
        assert!(
            refused("deny", json!({"approval_id": "r.c1", "reason": "  "})).contains("say why")
        );
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        assert!(
            refused("deny", json!({"approval_id": "r.c1", "reason": long})).contains("at most")
        );
    }

    #[test]
    fn an_unknown_tool_is_not_an_argument_error() {
        assert_eq!(
            call("launch", json!({})),
            Err(Refused::UnknownTool("launch".into()))
        );
    }
}
