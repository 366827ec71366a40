//! `dispatch policy show | set FILE | history | test TOOL ARGS`, `dispatch approvals`,
//! `dispatch approve ID`, `dispatch deny ID`: the permission gate from the terminal.
//!
//! Changes and answers go to the policy service (`dispatch.req.policy.*`), which checks
//! and records them; versions are read from the policy stream, and waiting approvals
//! from the ledger's view of the runs in progress.

use dispatch_runlog::RunLog;
use std::path::PathBuf;
use std::time::Duration;

use dispatch_bus::{Bus, subject};
use dispatch_proto::api::v1::{ListApprovalsRequest, ListApprovalsResponse};
use dispatch_proto::policy::v1::{
    ResolveApprovalRequest, ResolveApprovalResponse, SetPolicyRequest, SetPolicyResponse,
    TestPolicyRequest, TestPolicyResponse, resolve_approval_response::Outcome,
};

use crate::{Failure, Format, exit};

/// How long the policy service has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// The policy document in force, with its version and hash.
    Show {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Put a JSON document in force. It is checked first: a bad one is refused with
    /// the line and the reason, and nothing changes.
    Set {
        file: PathBuf,
        /// Why, kept with the version.
        #[arg(long, default_value = "")]
        note: String,
        /// Who is changing it; default: $USER.
        #[arg(long)]
        by: Option<String>,
    },
    /// Every version, newest last: who changed it, when and why.
    History {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// What the policy in force decides for a call, recording nothing.
    Test {
        /// The tool, e.g. files.write_file.
        tool: String,
        /// Its arguments as JSON.
        #[arg(default_value = "{}")]
        args: String,
        /// The run's origin (cli, http, cron, ...).
        #[arg(long, default_value = "cli")]
        origin: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// Who the person at the terminal is.
pub(crate) fn person(by: Option<String>) -> String {
    let name = by
        .or_else(|| std::env::var("USER").ok())
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "someone".into());
    format!("{} (cli)", name.trim())
}

async fn no_policy_service<T>(result: Result<T, dispatch_bus::Error>) -> Result<T, Failure> {
    result.map_err(|e| {
        Failure::new(format!(
            "{e}; is the policy service running (`dispatch up`)?"
        ))
    })
}

pub async fn policy(bus: &Bus, command: PolicyCommand) -> Result<u8, Failure> {
    match command {
        PolicyCommand::Show { format } => {
            let current = dispatch_rules::store::current(bus)
                .await
                .map_err(|e| Failure::new(e.to_string()))?;
            if !current.skipped.is_empty() {
                errln!(
                    "dispatch: {} damaged message(s) after this version are skipped (see \
                     `dispatch policy history`); the next `dispatch policy set` supersedes them",
                    current.skipped.len()
                );
            }
            let Some(version) = current.in_force else {
                return Err(Failure::new(
                    "no policy was ever set; the policy service puts the built-in one in force when it starts",
                ));
            };
            match format {
                Format::Json => outln!(
                    "{}",
                    crate::terminal::json_line(&serde_json::json!({
                        "version": version.record.version,
                        "hash": version.record.hash,
                        "changed_by": version.record.changed_by,
                        "changed_at_unix_ms": version.record.changed_at_unix_ms,
                        "document": version.document,
                    }))
                ),
                Format::Table => {
                    outln!(
                        "# version {} {} (by {})",
                        version.record.version,
                        crate::format::clip(&version.record.hash, usize::MAX),
                        crate::format::clip(&version.record.changed_by, 200)
                    );
                    outln!("{}", version.record.document_json);
                }
            }
            Ok(exit::DONE)
        }
        PolicyCommand::Set { file, note, by } => {
            let document = std::fs::read_to_string(&file)
                .map_err(|e| Failure::new(format!("{}: {e}", file.display())))?;
            let reply: SetPolicyResponse = no_policy_service(
                bus.request_proto(
                    subject::policy::set(),
                    &SetPolicyRequest {
                        document,
                        changed_by: person(by),
                        note,
                    },
                    TIMEOUT,
                )
                .await,
            )
            .await?;
            if !reply.error.is_empty() {
                return Err(Failure::new(format!(
                    "{}: {}; nothing changed",
                    file.display(),
                    reply.error
                )));
            }
            let version = reply.version.unwrap_or_default();
            if reply.unchanged {
                outln!(
                    "unchanged: version {} ({}) is already in force",
                    version.version,
                    version.hash
                );
            } else {
                outln!("version {} in force ({})", version.version, version.hash);
            }
            Ok(exit::DONE)
        }
        PolicyCommand::History { format } => {
            let versions =
                dispatch_rules::store::history(bus, dispatch_bus::streams::POLICY_HISTORY as usize)
                    .await
                    .map_err(|e| Failure::new(e.to_string()))?;
            use dispatch_rules::store::Entry;
            let rows: Vec<serde_json::Value> = versions
                .iter()
                .map(|entry| match entry {
                    Entry::Version(v) => serde_json::json!({
                        "version": v.record.version,
                        "hash": v.record.hash,
                        "previous_hash": v.record.previous_hash,
                        "changed_by": v.record.changed_by,
                        "changed_at_unix_ms": v.record.changed_at_unix_ms,
                        "note": v.record.note,
                        "rules": v.document.rules.len(),
                    }),
                    Entry::Damaged(d) => serde_json::json!({
                        "damaged": true,
                        "stream_seq": d.stream_seq,
                        "reason": d.reason,
                    }),
                })
                .collect();
            match format {
                Format::Json => crate::terminal::json(&rows),
                Format::Table => out!("{}", crate::format::policy_history(&versions)),
            }
            Ok(exit::DONE)
        }
        PolicyCommand::Test {
            tool,
            args,
            origin,
            format,
        } => {
            let reply: TestPolicyResponse = no_policy_service(
                bus.request_proto(
                    subject::policy::test(),
                    &TestPolicyRequest {
                        tool,
                        args_json: args,
                        origin,
                    },
                    TIMEOUT,
                )
                .await,
            )
            .await?;
            if !reply.error.is_empty() {
                return Err(Failure::new(reply.error));
            }
            match format {
                Format::Json => outln!(
                    "{}",
                    crate::terminal::json_line(&serde_json::json!({
                        "effect": reply.effect, "rule": reply.rule, "reason": reply.reason,
                        "risk": reply.risk, "policy_version": reply.policy_version,
                        "policy_hash": reply.policy_hash,
                    }))
                ),
                Format::Table => outln!("{}", crate::format::policy_tested(&reply)),
            }
            Ok(exit::DONE)
        }
    }
}

/// `dispatch approvals`: every approval request nobody has answered, oldest run first,
/// asked of the ledger page by page.
/// `dispatch approvals`: every request waiting for a person, its arguments clipped
/// (and marked so), or with `log` (`--full`) read whole from each run's log, with
/// their digest.
pub async fn approvals(bus: &Bus, log: Option<&RunLog>, format: Format) -> Result<u8, Failure> {
    let mut pending = Vec::new();
    let mut after = None;
    loop {
        let page: ListApprovalsResponse = crate::query(
            bus,
            subject::query::approvals(),
            &ListApprovalsRequest {
                limit: Some(dispatch_proto::api::MAX_PAGE),
                after: after.take(),
            },
        )
        .await?;
        pending.extend(page.approvals);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if let Some(log) = log {
        for p in &mut pending {
            if let Some(found) = dispatch_runlog::approvals::find(log, &p.approval_id).await? {
                p.args_digest = dispatch_runlog::args::digest(&found.request.args_json);
                p.args_bytes = found.request.args_json.len() as u64;
                p.args_json = found.request.args_json;
                p.args_clipped = false;
            }
        }
    }
    match format {
        Format::Json => crate::terminal::json(&pending),
        Format::Table if log.is_some() => out!("{}", crate::format::approvals_full(&pending)),
        Format::Table => out!(
            "{}",
            crate::format::approvals_table(&pending, crate::format::now_ms())
        ),
    }
    Ok(exit::DONE)
}

/// The digest of the arguments approval `id` asks about, after showing them: for an
/// `approve` that names none, the person allows what is printed here.
pub async fn digest_of(log: &RunLog, id: &str) -> Result<String, Failure> {
    let found = dispatch_runlog::approvals::find(log, id)
        .await?
        .ok_or_else(|| {
            Failure::new(format!(
                "no approval request {}",
                crate::format::clip(id, 120)
            ))
        })?;
    let digest = dispatch_runlog::args::digest(&found.request.args_json);
    errln!(
        "allowing {} with {} ({digest})",
        crate::format::clip(&found.request.tool, 80),
        found.request.args_json
    );
    Ok(digest)
}

/// `dispatch approve ID` / `dispatch deny ID --reason`: exactly one answer is recorded;
/// whoever comes second is told who came first.
/// `allow` carries the digest of the arguments allowed; `None` denies.
pub async fn resolve(
    bus: &Bus,
    id: String,
    allow: Option<String>,
    reason: String,
    by: Option<String>,
) -> Result<u8, Failure> {
    let reply: ResolveApprovalResponse = no_policy_service(
        bus.request_proto(
            subject::policy::resolve(),
            &ResolveApprovalRequest {
                approval_id: id,
                decision: if allow.is_some() { "allow" } else { "deny" }.into(),
                resolved_by: person(by),
                reason,
                args_digest: allow.unwrap_or_default(),
            },
            TIMEOUT,
        )
        .await,
    )
    .await?;
    match reply.outcome() {
        Outcome::Resolved => {
            outln!("{}", crate::format::clip(&reply.message, usize::MAX));
            Ok(exit::DONE)
        }
        _ => Err(Failure::new(reply.message)),
    }
}
