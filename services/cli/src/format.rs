//! How runs and events read on a terminal.

use std::time::{SystemTime, UNIX_EPOCH};

use dispatch_proto::api::v1::ListTasksResponse;
use dispatch_proto::api::v1::RunView;
use dispatch_proto::run::v1::{Decision, LeafState, RunEvent, RunStatus, run_event::Body};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One event as one line: `#seq kind details`.
pub fn event_line(event: &RunEvent) -> String {
    let Some(body) = &event.body else {
        return format!("#{:<3} (empty)", event.seq);
    };
    let detail = match body {
        Body::RunRequested(r) => format!(
            "{}goal {:?} (conversation {}, via {}){}",
            if r.kind == dispatch_runlog::service::KIND {
                "service, "
            } else {
                ""
            },
            r.goal,
            r.conversation_id,
            r.origin,
            match (r.parent_run_id.is_empty(), r.wake.is_empty()) {
                (true, _) => String::new(),
                (false, true) => format!(", handed off by turn {}", r.parent_run_id),
                (false, false) => format!(", a {} wake of {}", r.wake, r.parent_run_id),
            }
        ),
        Body::PlanAuthored(p) => format!(
            "plan {:?}: {} leaves → {}",
            p.title,
            p.leaves.len(),
            p.workflow_path
        ),
        Body::PlanRejected(r) => {
            format!("attempt {} rejected: {}: {}", r.attempt, r.code, r.message)
        }
        Body::RunStarted(s) if s.deadline_unix_ms == 0 => format!(
            "owner {}, no deadline, {} schedule(s)",
            s.owner,
            s.schedule_ids.len()
        ),
        Body::RunStarted(s) => format!("owner {}", s.owner),
        Body::ServiceWoken(w) => format!("woke ({}): run {}", w.wake, w.run_id),
        Body::TurnOrdered(t) if t.previous_run_id.is_empty() => {
            format!("turn {} of its conversation", t.number)
        }
        Body::TurnOrdered(t) => format!(
            "turn {} of its conversation, after run {}",
            t.number, t.previous_run_id
        ),
        Body::TurnContext(c) => format!(
            "context: {} earlier turns{}, {} notes drained",
            c.earlier_run_ids.len(),
            match c.left_out {
                0 => String::new(),
                n => format!(" ({n} older left out)"),
            },
            c.notes.len()
        ),
        Body::LeafStarted(l) => format!("leaf {}: {}", l.leaf + 1, l.title),
        Body::OutputDelta(d) if d.abandoned => format!(
            "leaf {} turn {} part {}: streamed text void (asked again)",
            d.leaf + 1,
            d.turn + 1,
            d.part
        ),
        Body::OutputDelta(d) => format!(
            "leaf {} turn {} streaming: {}",
            d.leaf + 1,
            d.turn + 1,
            clip(&d.text, 100)
        ),
        Body::ModelTurn(t) => format!(
            "leaf {} turn {}: {}{}",
            t.leaf + 1,
            t.turn + 1,
            clip(&t.text, 100),
            if t.tool_calls.is_empty() {
                String::new()
            } else {
                format!(" [{} tool call(s)]", t.tool_calls.len())
            }
        ),
        Body::ToolCallRequested(c) => {
            format!("{} {} {}", c.call_id, c.tool, clip(&c.args_json, 80))
        }
        Body::PolicyDecided(d) => format!(
            "{} {} by {} (policy v{}): {}",
            d.call_id,
            match d.decision() {
                Decision::Allow => "allowed",
                Decision::Ask => "sent to a person",
                _ => "denied",
            },
            d.rule,
            d.policy_version,
            d.reason
        ),
        Body::ApprovalRequested(a) => format!(
            "{} waits for approval: {} {} ({})",
            a.approval_id,
            a.tool,
            clip(&a.args_json, 80),
            a.reason
        ),
        Body::ApprovalResolved(r) => format!(
            "{} {} by {}{}",
            r.approval_id,
            if r.decision() == Decision::Allow {
                "approved"
            } else {
                "denied"
            },
            r.resolved_by,
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        ),
        Body::StopRequested(s) => format!(
            "by {}{}",
            s.requested_by,
            if s.force {
                ", forced".to_owned()
            } else {
                format!(", grace {} ms", s.grace_ms)
            }
        ),
        Body::ToolCallStarted(c) => format!("{} executing on {}", c.call_id, c.executor),
        Body::CommandAbandoned(a) => format!("{} {}: {}", a.command, a.key, a.reason),
        Body::ToolCallCompleted(c) => format!("{} ok: {}", c.call_id, clip(&c.output, 100)),
        Body::ToolCallFailed(f) => format!("{} failed: {}", f.call_id, f.error),
        Body::GateChecked(g) => format!(
            "leaf {} gate {}: {} ({})",
            g.leaf + 1,
            if g.passed { "passed" } else { "failed" },
            g.command,
            g.detail
        ),
        Body::LeafFinished(f) => format!(
            "leaf {} {}: {}",
            f.leaf + 1,
            match f.state() {
                LeafState::Done => "DONE",
                LeafState::Skipped => "SKIPPED",
                _ => "FAILED",
            },
            f.reason
        ),
        Body::FeedbackQueued(f) => format!("note for conversation {}", f.conversation_id),
        Body::RunFinished(f) => format!(
            "{}: {}{}",
            RunStatus::try_from(f.status).map_or("unknown", |s| s.word()),
            clip(&f.reason, 300),
            if f.summary != f.reason {
                format!(" — {}", clip(&f.summary, 300))
            } else {
                String::new()
            }
        ),
    };
    // Every field above is untrusted (a goal, a title, a model's words, a tool's
    // output, a name from the bus): the whole detail is put on one line, escaped.
    format!(
        "#{:<3} {:<20} {}",
        event.seq,
        body.kind(),
        clip(&detail, usize::MAX)
    )
}

/// A finished run's report, to print after its events: a heading saying where it is,
/// then the text, control characters escaped but lines kept. `None` if it has none.
pub fn report(finished: &dispatch_proto::run::v1::RunFinished) -> Option<String> {
    if finished.report.trim().is_empty() {
        return None;
    }
    let source = if finished.report_path.is_empty() {
        "the last leaf's answer".to_owned()
    } else {
        finished.report_path.clone()
    };
    let mut out = format!("\n── report ({}) ──\n", clip(&source, usize::MAX));
    out.push_str(&dispatch_runlog::many_lines(finished.report.trim_end()));
    out.push('\n');
    Some(out)
}

/// Untrusted text on one line, control characters escaped, at most `max` characters.
pub(crate) fn clip(text: &str, max: usize) -> String {
    dispatch_runlog::one_line(text, max)
}

pub fn age(since_ms: i64, now_ms: i64) -> String {
    let s = ((now_ms - since_ms).max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `dispatch ps` as a table (column widths by display width, so wide characters in a
/// goal do not shift the columns). Ids are shown short unless `!short`.
pub fn ps_table(runs: &[RunView], now_ms: i64, short: bool) -> String {
    let rows = runs.iter().map(|run| {
        let leaves = if run.leaves == 0 {
            "-".to_owned()
        } else {
            format!("{}/{}", run.leaves_done, run.leaves)
        };
        [
            if short {
                dispatch_bus::short_id(&run.run_id).to_owned()
            } else {
                run.run_id.clone()
            },
            run.status().word().to_owned(),
            leaves,
            age(run.requested_at_ms, now_ms),
            clip(&run.goal, 60),
        ]
    });
    plain_table(["RUN ID", "STATUS", "LEAVES", "AGE", "GOAL"], rows)
}

/// Rows under a header in Docker's look: no borders, columns two spaces apart,
/// nothing before the first. Every cell is put on one line, escaped: a row is a line.
pub fn plain_table<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(header);
    for row in rows {
        table.add_row(row.map(|cell| cell_text(&cell)));
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let mut out: String = table
        .lines()
        .map(|line| line.trim_end().to_owned() + "\n")
        .collect();
    if out.is_empty() {
        out.push('\n');
    }
    out
}

/// `2026-11-22T09:00:00Z`.
pub fn utc(unix_ms: i64) -> String {
    // RFC 3339 ends at the year 9999; a later time (only a forged record has one) is
    // shown as its number.
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    if !(0..YEAR_10000_MS).contains(&unix_ms) {
        return format!("{unix_ms} ms");
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// One line of `dispatch tools`.
#[derive(Debug, serde::Serialize)]
pub struct ToolRow {
    pub name: String,
    pub connector: String,
    pub risk: dispatch_bus::catalogue::Risk,
    /// `allow`, `deny`, `ask`, `validate`, `depends` (on the call), or `unknown` (no
    /// policy in the catalogue yet).
    pub policy: &'static str,
    /// The rule that says so.
    pub rule: String,
    pub version: String,
    pub description: String,
}

/// The catalogue's tools with the policy's standing on each.
pub fn tool_rows(snapshot: &dispatch_bus::catalogue::Snapshot) -> Vec<ToolRow> {
    let policy = snapshot
        .policy
        .as_ref()
        .and_then(dispatch_rules::Document::from_mirror);
    snapshot
        .tools
        .values()
        .map(|tool| {
            let standing = policy
                .as_ref()
                .map(|p| p.standing(&tool.name, &tool.possible_risks()));
            let (policy, rule) = match standing {
                Some(standing) => (
                    standing.effect.map_or("depends", |e| e.word()),
                    standing.rule,
                ),
                None => ("unknown", String::new()),
            };
            ToolRow {
                name: tool.name.clone(),
                connector: tool.connector.clone(),
                risk: tool.risk,
                policy,
                rule,
                version: tool.version.clone(),
                description: tool.description.clone(),
            }
        })
        .collect()
}

/// `dispatch tools` as a table.
pub fn tools_table(rows: &[ToolRow]) -> String {
    if rows.is_empty() {
        return "no tools: no connectors copy has put any in the catalogue (is dispatch-connectors running?)\n".into();
    }
    let rows = rows.iter().map(|row| {
        let policy = if row.rule.is_empty() {
            row.policy.to_owned()
        } else {
            format!("{} ({})", row.policy, row.rule)
        };
        let description = row.description.lines().next().unwrap_or_default();
        [
            row.name.clone(),
            row.connector.clone(),
            row.risk.word().to_owned(),
            policy,
            clip(description, 50),
        ]
    });
    plain_table(["TOOL", "CONNECTOR", "RISK", "POLICY", "DESCRIPTION"], rows)
}

/// `dispatch tasks` as text: notes first (they are shown once), then the tasks.
pub fn tasks(reply: &ListTasksResponse) -> String {
    let mut out = String::new();
    if reply.feedback.is_empty() {
        out.push_str("no new feedback\n");
    } else {
        out.push_str("feedback:\n");
        for note in &reply.feedback {
            out.push_str(&format!(
                "  {} {}: {} ({})\n",
                clip(&note.run_id, 36),
                clip(&note.status, 16),
                clip(&note.summary, 120),
                clip(&note.goal, 60)
            ));
        }
    }
    out.push('\n');
    out.push_str(&ps_table(&reply.tasks, now_ms(), true));
    out
}

/// What `replay` did, in one line: verified, sealed, and what it rebuilt or left alone.
pub fn replayed(replayed: &dispatch_proto::api::v1::ReplayRunResponse) -> String {
    use dispatch_proto::api::v1::TrailOutcome;
    let Some(run) = &replayed.run else {
        return format!(
            "{} events, hash chain verified; the ledger named no run",
            replayed.events
        );
    };
    let seal = match &replayed.sealed_by {
        Some(key) => format!("sealed by {key}"),
        None => "not sealed yet (the run has not ended)".to_owned(),
    };
    let views = if replayed.views_rebuilt {
        format!("views rebuilt ({})", run.status().word())
    } else {
        "views not rebuilt: the run was removed (rm/prune) and stays out of them".to_owned()
    };
    let trail = match replayed.trail() {
        TrailOutcome::Exported => {
            let path = run
                .run_id
                .parse()
                .map(|id| {
                    let relative =
                        dispatch_service::layout::steps_file(std::path::Path::new(""), &id);
                    relative.display().to_string()
                })
                .unwrap_or_else(|_| "_steps.jsonl".to_owned());
            format!("trail written to {path}")
        }
        TrailOutcome::NotEnded => "no trail yet".to_owned(),
        TrailOutcome::Removed => "trail not written: it was deleted by prune --trails".to_owned(),
        TrailOutcome::Unspecified => "the ledger did not say what became of the trail".to_owned(),
    };
    let after = match &run.tampered_after_seal {
        Some(after) => format!(
            "; tampered after seal: {} message(s) from stream sequence {} are not part of the \
             record",
            after.messages, after.stream_seq
        ),
        None => String::new(),
    };
    clip(
        &format!(
            "run {}: {} events, hash chain verified, {seal}; {views}; {trail}{after}",
            run.run_id, replayed.events
        ),
        usize::MAX,
    )
}

/// `dispatch policy test` as one line.
pub fn policy_tested(reply: &dispatch_proto::policy::v1::TestPolicyResponse) -> String {
    clip(
        &format!(
            "{} (risk {}, rule {}, policy version {}): {}",
            reply.effect, reply.risk, reply.rule, reply.policy_version, reply.reason
        ),
        usize::MAX,
    )
}

/// `dispatch approvals` as a table: each waiting call with what it would run with.
pub fn approvals_table(
    pending: &[dispatch_proto::api::v1::PendingApproval],
    now_ms: i64,
) -> String {
    let rows = pending.iter().map(|p| {
        let left = (p.expires_at_ms - now_ms).max(0) / 1000;
        [
            p.approval_id.clone(),
            p.tool.clone(),
            p.risk.clone(),
            p.rule.clone(),
            format!("in {left}s"),
            args_cell(p),
        ]
    });
    plain_table(["ID", "TOOL", "RISK", "RULE", "EXPIRES", "ARGS"], rows)
}

/// The most of a call's arguments the approvals table shows.
const ARGS_CELL_CHARS: usize = 60;

/// A call's arguments in the approvals table: whole when they fit, else their start
/// and a mark saying they are cut and where the rest is.
fn args_cell(p: &dispatch_proto::api::v1::PendingApproval) -> String {
    let shown = clip(&p.args_json, ARGS_CELL_CHARS);
    if p.args_clipped || p.args_json.chars().count() > ARGS_CELL_CHARS {
        format!(
            "{shown}… [clipped: {} bytes in all; dispatch approvals --full]",
            p.args_bytes.max(p.args_json.len() as u64)
        )
    } else {
        shown
    }
}

/// `dispatch approvals --full`: each request with its whole arguments, exactly as they
/// will run (the terminal's escaping keeps every space), and their digest.
pub fn approvals_full(pending: &[dispatch_proto::api::v1::PendingApproval]) -> String {
    let mut out = String::new();
    for p in pending {
        out.push_str(&format!(
            "{}  {}  {}  rule {}\n  digest {}\n  {}\n\n",
            clip(&p.approval_id, 120),
            clip(&p.tool, 80),
            clip(&p.risk, 16),
            clip(&p.rule, 64),
            clip(&p.args_digest, 80),
            p.args_json
        ));
    }
    out
}

/// `dispatch policy history` as a table, oldest first.
pub fn policy_history(versions: &[dispatch_rules::store::Entry]) -> String {
    use dispatch_rules::store::Entry;
    let rows = versions.iter().map(|entry| match entry {
        Entry::Version(v) => [
            v.record.version.to_string(),
            v.record.hash.chars().take(19).collect(),
            clip(&v.record.changed_by, 24),
            v.document.rules.len().to_string(),
            clip(&v.record.note, 200),
        ],
        Entry::Damaged(d) => [
            "DAMAGED".to_owned(),
            format!("stream seq {}", d.stream_seq),
            "-".to_owned(),
            "-".to_owned(),
            clip(&d.reason, 200),
        ],
    });
    plain_table(["VERSION", "HASH", "BY", "RULES", "NOTE"], rows)
}

/// A table cell: one line, escaped.
fn cell_text(cell: &str) -> String {
    clip(cell, usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clipped_approval_says_so_and_the_full_view_keeps_every_space() {
        let mut p = dispatch_proto::api::v1::PendingApproval {
            args_json: r#"{"target":"/srv/cache"}"#.into(),
            args_bytes: 23,
            ..Default::default()
        };
        assert_eq!(args_cell(&p), r#"{"target":"/srv/cache"}"#);
        p.args_json = format!(r#"{{"target":"{}"}}"#, "x".repeat(100));
        p.args_bytes = 5000;
        p.args_clipped = true;
        let cell = args_cell(&p);
        assert!(
            cell.contains("[clipped: 5000 bytes in all; dispatch approvals --full]"),
            "{cell}"
        );
        p.args_json = r#"{"a":"x   y"}"#.into();
        let full = approvals_full(&[p]);
        assert!(full.contains(r#"{"a":"x   y"}"#), "{full}");
        let safe = crate::terminal::safe(&approvals_full(&[
            dispatch_proto::api::v1::PendingApproval {
                args_json: "{\"a\":\"\u{1b}]52;c;x\u{7}\"}".into(),
                ..Default::default()
            },
        ]));
        assert!(
            !safe.chars().any(|c| c == '\u{1b}' || c == '\u{7}'),
            "{safe}"
        );
    }

    #[test]
    fn a_report_keeps_its_lines_and_escapes_what_would_hide_text() {
        let finished = dispatch_proto::run::v1::RunFinished {
            report: "* Findings\n\u{1b}[2Jgone\tok \u{202e}txt\n\n".into(),
            report_path: ".dispatch/runs/r/scratch/REPORT.org".into(),
            ..Default::default()
        };
        assert_eq!(
            report(&finished).unwrap(),
            "\n── report (.dispatch/runs/r/scratch/REPORT.org) ──\n* Findings\n\\u{1b}[2Jgone\tok \\u{202e}txt\n"
        );
        let answer = dispatch_proto::run::v1::RunFinished {
            report: "done".into(),
            ..Default::default()
        };
        assert!(
            report(&answer)
                .unwrap()
                .contains("(the last leaf's answer)")
        );
        assert!(report(&Default::default()).is_none());
    }

    #[test]
    fn the_ps_table_lines_up_wide_goals() {
        let view = |id: &str, goal: &str| RunView {
            run_id: id.into(),
            goal: goal.into(),
            conversation_id: "default".into(),
            origin: "cli".into(),
            status: dispatch_proto::api::v1::TaskStatus::Done as i32,
            leaves: 3,
            leaves_done: 3,
            last_seq: 1,
            kind: "job".into(),
            ..Default::default()
        };
        let table = ps_table(
            &[view("a", "整理共享驱动器"), view("bb", "tidy")],
            5_000,
            true,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("RUN ID  STATUS"), "{table}");
        // STATUS starts at the same display column on every line.
        let status_at = |line: &str| line.find("done").or_else(|| line.find("STATUS"));
        assert_eq!(status_at(lines[1]), status_at(lines[0]), "{table}");
        assert_eq!(status_at(lines[2]), status_at(lines[0]), "{table}");
    }
}
