//! Terminal output is safe everywhere (issue 28, point 10). A goal whose plan's title,
//! leaf titles and bodies hold terminal escape sequences (OSC 52, which set a
//! clipboard through `dispatch logs`; CSI, in its 7- and 8-bit forms; BEL; a lone CR;
//! bidi overrides), a tool call waiting for approval with such arguments, a denial
//! with such a reason, and a schedule and a todo with such goals, read back with the
//! real `dispatch` binary through every command that prints them: no byte a terminal
//! would act on reaches stdout or stderr (but line feeds and tabs), JSON output reads
//! back to the very text, and TASKS.org and `workflows/*.org` hold none either.

use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_bus::RunId;
use dispatch_proto::run::v1::RunStatus;
use dispatch_tests::{Cli, Stack, finished};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

/// Sets the clipboard to `rm -rf ~` in a terminal that honours OSC 52.
const OSC52: &str = "\u{1b}]52;c;cm0gLXJmIH4K\u{7}";

/// The policy: the test tools run, except erasing, which waits for a person.
const POLICY: &str = r#"{"default": "deny", "rules": [
  {"name": "erasing", "effect": "ask", "tools": ["test.erase"]},
  {"name": "test-tools", "effect": "allow", "tools": ["test.*"]}
]}"#;

fn hostile_plan() -> String {
    format!(
        "#+TITLE: Report {OSC52}\u{9b}2J\n\
         * TODO Fetch {OSC52}the \u{1b}[8mhidden\u{1b}[0m part \u{202e}txt.exe\u{7}\n\
         \x20 - call: test.sleep {{\"ms\": 10}}\n\
         \x20 - then \u{9d}0;title\u{9c} this\r over\u{8}\u{8}\n\
         \x20 :done-when: true\n"
    )
}

/// Nothing a terminal acts on but line feeds and tabs.
fn assert_safe(what: &str, text: &str) {
    let raw: Vec<char> = text
        .chars()
        .filter(|c| dispatch_runlog::is_terminal_control(*c) && *c != '\n' && *c != '\t')
        .collect();
    assert!(raw.is_empty(), "{what} printed {raw:?} raw: {text:?}");
}

/// Runs the CLI, checks both its streams, and returns what it printed.
fn cli(stack: &Stack, args: &[&str]) -> Result<Cli> {
    let out = stack.cli(args)?;
    let what = format!("dispatch {}", args.join(" "));
    assert_safe(&what, &out.stdout);
    assert_safe(&what, &out.stderr);
    Ok(out)
}

/// [`cli`], succeeding, with JSON on stdout.
fn cli_json(stack: &Stack, args: &[&str]) -> Result<Value> {
    let out = cli(stack, args)?;
    assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
    serde_json::from_str(&out.stdout).with_context(|| format!("{args:?}: {}", out.stdout))
}

#[tokio::test]
async fn no_printer_of_the_cli_and_no_org_file_passes_a_control_character_on() -> Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let policy = stack.root().join("policy.json");
    std::fs::write(&policy, POLICY)?;
    let policy = policy.to_str().context("utf-8")?.to_owned();
    stack.add_with("policy", &["--policy", &policy]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    stack.add_with("streamer", &["--purge-after", "5m"]).await?;
    stack.add("dispatcher").await?;
    stack.add("scheduler").await?;

    // `dispatch run`, attached: every event as it comes, then the report.
    let plan = hostile_plan();
    let run = cli(&stack, &["run", &plan])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    // The leaf's title is shown, escaped, not dropped.
    assert!(
        run.stdout
            .contains("Fetch \\u{1b}]52;c;cm0gLXJmIH4K\\u{7}the"),
        "{}",
        run.stdout
    );
    let run_id: RunId = run
        .stderr
        .trim()
        .strip_prefix("run ")
        .context("run prints its id")?
        .parse()?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    let id = run_id.to_string();

    for args in [
        vec!["logs", id.as_str()],
        vec!["logs", "-f", id.as_str()],
        vec!["ps", "-a"],
        vec!["ps", "-a", "--no-trunc"],
        vec!["ps", "-a", "-q"],
        vec!["tasks"],
        vec!["replay", id.as_str()],
        vec!["attach", "default", "--all", "--exit"],
        vec!["deliveries"],
    ] {
        let out = cli(&stack, &args)?;
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
    }
    let logs = cli(&stack, &["logs", &id])?.stdout;
    assert_eq!(
        logs.lines().count(),
        events.len(),
        "an event a line: {logs}"
    );

    // JSON: escaped for the terminal, and still the very text once parsed.
    let shown = cli_json(&stack, &["inspect", &id])?;
    assert_eq!(shown["goal"], plan.trim());
    let listed = cli_json(&stack, &["ps", "-a", "--format", "json"])?;
    assert_eq!(listed[0]["goal"], plan.trim());
    cli_json(&stack, &["tasks", "--format", "json"])?;
    let attached = cli(
        &stack,
        &["attach", "default", "--all", "--exit", "--format", "json"],
    )?;
    for line in attached.stdout.lines() {
        serde_json::from_str::<Value>(line).with_context(|| line.to_owned())?;
    }

    // A call waiting for a person, with hostile arguments; denied with a hostile reason.
    let erase = "#+TITLE: Erase\n* TODO Erase it\n  - call: test.erase {\"key\": \"k\u{9b}2J\u{202e}\"}\n  :done-when: true\n";
    let waiting = cli(&stack, &["run", "-d", erase])?;
    let waiting: RunId = waiting.stdout.trim().parse()?;
    let approval = stack
        .eventually(LIMIT, || async {
            let listed = cli_json(&stack, &["approvals", "--format", "json"]).ok()?;
            let a = listed
                .as_array()?
                .iter()
                .find(|a| a["run_id"] == waiting.to_string())?;
            Some((
                a["approval_id"].as_str()?.to_owned(),
                a["args_json"].clone(),
            ))
        })
        .await?;
    let args: Value = serde_json::from_str(approval.1.as_str().context("args")?)?;
    assert_eq!(args["key"], "k\u{9b}2J\u{202e}");
    let table = cli(&stack, &["approvals"])?.stdout;
    assert!(table.contains("k\\u{9b}2J\\u{202e}"), "{table}");
    let denied = cli(
        &stack,
        &["deny", &approval.0, "--reason", &format!("no {OSC52}")],
    )?;
    assert_eq!(denied.code, Some(0), "{denied:?}");
    stack.wait_finished(waiting, LIMIT).await?;
    cli(&stack, &["logs", &waiting.to_string()])?;

    // Schedules and todos with hostile goals.
    let goal = format!("tidy {OSC52}\u{1b}[2J the drive");
    let added = cli(&stack, &["schedule", "add", "0 0 1 1 *", &goal])?;
    assert_eq!(added.code, Some(0), "{added:?}");
    cli(&stack, &["schedule", "ls"])?;
    let schedules = cli_json(&stack, &["schedule", "ls", "--format", "json"])?;
    assert_eq!(schedules[0]["goal"], goal.as_str());
    let todo = cli(&stack, &["todo", "add", &goal, "--due", "1h"])?;
    assert_eq!(todo.code, Some(0), "{todo:?}");
    cli(&stack, &["todo", "ls"])?;
    cli_json(&stack, &["todo", "ls", "--format", "json"])?;

    // Errors that quote what was typed.
    let unknown = cli(&stack, &["inspect", OSC52])?;
    assert_eq!(unknown.code, Some(125), "{unknown:?}");
    let bad_flag = cli(&stack, &["ps", "--filter", OSC52])?;
    assert_eq!(bad_flag.code, Some(125), "{bad_flag:?}");
    assert!(
        bad_flag.stderr.contains("\\u{1b}]52"),
        "{}",
        bad_flag.stderr
    );

    // The files people open: TASKS.org, and the accepted plan.
    let tasks = stack.tasks_org_with_finished(2, LIMIT).await?;
    assert_safe("TASKS.org", &tasks);
    assert!(tasks.contains("\\u{1b}]52"), "{tasks}");
    let workflows = stack.root().join("workflows");
    let mut plans = 0;
    for entry in std::fs::read_dir(&workflows)? {
        let text = std::fs::read_to_string(entry?.path())?;
        assert_safe("workflows/", &text);
        plans += 1;
    }
    assert_eq!(plans, 2);
    Ok(())
}
