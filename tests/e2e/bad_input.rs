//! Bad input gets a specific error and changes nothing.

use std::time::Duration;

use dispatch_bus::streams::{COMMANDS, GOALS, RUNS};
use dispatch_models::{Exchange, TurnReply, TurnRequest};
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_tests::scripted::{Scripted, run_scripted};
use dispatch_tests::{Stack, count, finished};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn malformed_http_requests_get_specific_errors_and_publish_nothing() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger", "ingress"]).await?;
    let post = |body: Vec<u8>| {
        stack
            .http
            .post(stack.url("/v1/goals"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"goal\": ".to_vec(), 400, "invalid_json"),
        (b"not json at all".to_vec(), 400, "invalid_json"),
        (b"{}".to_vec(), 400, "invalid_goal"),
        (br#"{"goal": "   "}"#.to_vec(), 400, "invalid_goal"),
        (
            br#"{"goal": "x", "colour": "red"}"#.to_vec(),
            400,
            "invalid_goal",
        ),
        (
            br#"{"goal": "x", "timeout_ms": 10}"#.to_vec(),
            400,
            "invalid_timeout",
        ),
        (
            br#"{"goal": "x", "conversation_id": "a.*"}"#.to_vec(),
            400,
            "invalid_conversation",
        ),
        (
            format!(r#"{{"goal": "{}"}}"#, "x".repeat(70 * 1024)).into_bytes(),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let response = post(body.clone()).await?;
        assert_eq!(
            response.status().as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        let error: Value = response.json().await?;
        assert_eq!(error["code"], code, "{error}");
        assert!(!error["detail"].as_str().unwrap().is_empty());
    }

    let unknown = dispatch_bus::RunId::new();
    let response = stack
        .http
        .get(stack.url(&format!("/v1/runs/{unknown}")))
        .send()
        .await?;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await?;
    assert_eq!(error["code"], "not_found");
    assert!(
        error["detail"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string())
    );

    let response = stack
        .http
        .get(stack.url("/v1/runs/not-hex!"))
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    let response = stack
        .http
        .get(stack.url("/v1/tasks?conversation=a.b"))
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    let response = stack.http.get(stack.url("/v1/nothing-here")).send().await?;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await?;
    assert_eq!(error["code"], "not_found");

    assert_eq!(
        stack.stream_messages(GOALS).await?,
        0,
        "a rejected request stored a goal"
    );
    assert_eq!(
        stack.stream_messages(COMMANDS).await?,
        0,
        "a rejected request published a command"
    );
    assert_eq!(
        stack.stream_messages(RUNS).await?,
        0,
        "a rejected request wrote an event"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_cli_input_gets_a_message_and_a_nonzero_exit() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger"]).await?;
    let cases: [(&[&str], &str); 7] = [
        (&["run"], "give a goal"),
        (&["run", "   "], "give a goal"),
        (&["run", "--timeout", "10", "x"], "time unit needed"),
        (&["run", "--timeout", "500ms", "x"], "at least 1s"),
        (&["run", "--conversation", "a.b", "x"], "conversation id"),
        (&["inspect", "0000dead"], "no run matches 0000dead"),
        (
            &["wait", "01234567-89ab-7def-8123-456789abcdef"],
            "no run matches",
        ),
    ];
    for (args, message) in cases {
        let out = stack.cli(args)?;
        assert_eq!(out.code, Some(125), "{args:?}: {out:?}");
        assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
    }
    let bad_flag = stack.cli(&["ps", "--format", "yaml"])?;
    assert_eq!(bad_flag.code, Some(125), "{bad_flag:?}");
    assert_eq!(stack.stream_messages(GOALS).await?, 0);
    assert_eq!(stack.stream_messages(COMMANDS).await?, 0);
    assert_eq!(stack.stream_messages(RUNS).await?, 0);

    // With NATS gone, the CLI says so and how to start it.
    let out = std::process::Command::new(dispatch_testkit::bin_dir().join("dispatch"))
        .args(["ps"])
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr.contains("cannot reach NATS at nats://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("dispatch up"), "{stderr}");

    // A list of servers (a cluster's), the first of them down, is taken; a malformed
    // URL is called that, not unreachable.
    let list = format!("nats://127.0.0.1:1, {}", stack.nats.url());
    let out = stack.cli_with_env(&["ps"], &[("NATS_URL", &list)])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = stack.cli_with_env(&["ps"], &[("NATS_URL", "nats://127.0.0.1:42x2")])?;
    assert_eq!(out.code, Some(125));
    assert!(out.stderr.contains("bad NATS URL"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn a_plan_without_todo_headlines_is_retried_once_with_the_error_then_blocks()
-> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let model = Scripted::new(&[
        "```org\n#+TITLE: Thoughts\n* Some notes\nno tasks here\n```",
        "* TODO",
    ]);
    let events = run_scripted(&stack, model.clone(), "Plan nothing").await?;

    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with("plan rejected: no_todo_headings"),
        "{}",
        end.reason
    );
    let rejections: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::PlanRejected(r)) => Some((r.attempt, r.code.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejections,
        [
            (1, "no_todo_headings".into()),
            (2, "no_todo_headings".into())
        ]
    );
    let asked = model.asked.lock().unwrap();
    assert_eq!(asked.len(), 2, "exactly one retry");
    assert!(asked[0].retry.is_none());
    assert!((asked[0].temperature - 0.2).abs() < f32::EPSILON);
    let retry = asked[1].retry.as_ref().unwrap();
    assert_eq!(
        retry.answer.as_deref(),
        Some("```org\n#+TITLE: Thoughts\n* Some notes\nno tasks here\n```"),
        "the model is shown what it answered"
    );
    let fed_back = &retry.error;
    assert!(fed_back.contains("no_todo_headings"), "{fed_back}");
    assert_eq!(count(&events, "plan_authored"), 0);
    assert!(
        !stack.root().join("workflows").exists(),
        "a rejected plan was written"
    );
    Ok(())
}

#[tokio::test]
async fn a_plan_whose_gates_can_never_pass_is_sent_back_then_refused() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let plan = "#+TITLE: Sneaky\n\
        * TODO Fetch with curl\n  Download it.\n  :done-when: curl -s https://example.com\n\
        * TODO Look outside\n  Peek.\n  :done-when: test -s ../../../../etc/passwd\n\
        * TODO Write a note\n  Write scratch/note.org.\n  :done-when: test -s scratch/note.org\n";
    // The author is told which gates can never pass; answering the same plan again, it
    // is refused: a step whose gate can never pass can never be shown done.
    let model = Scripted::new(&[plan, plan]);
    let events = run_scripted(&stack, model.clone(), "Try to escape").await?;

    let rejected: Vec<(u32, String, String)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::PlanRejected(r)) => Some((r.attempt, r.code.clone(), r.message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    let (attempt, code, message) = &rejected[0];
    assert_eq!((*attempt, code.as_str()), (1, "unusable_gate"));
    assert!(
        message.contains("\"Fetch with curl\"") && message.contains("\"Look outside\""),
        "{message}"
    );
    assert!(!message.contains("Write a note"), "{message}");
    let fed_back = model.asked.lock().unwrap()[1].retry.clone();
    assert!(
        fed_back.is_some_and(|r| r.error.contains("unusable_gate") && r.error.contains("curl")),
        "the second request was not told why"
    );
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with("plan rejected: unusable_gate: "),
        "{}",
        end.reason
    );
    assert!(
        !events.iter().any(|e| matches!(
            e.event.body,
            Some(Body::LeafStarted(_) | Body::GateChecked(_))
        )),
        "a step of a refused plan ran"
    );
    Ok(())
}

#[tokio::test]
async fn an_author_told_its_gate_can_never_pass_corrects_the_plan() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let model = Scripted::new(&[
        "#+TITLE: Note\n* TODO Write a note\n  Write scratch/note.org.\n  :done-when: test -s /tmp/note.org\n",
        "#+TITLE: Note\n* TODO Write a note\n  Write scratch/note.org.\n  :done-when: test -s scratch/note.org\n",
    ]);
    let events = run_scripted(&stack, model.clone(), "Write a note").await?;

    let plan = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::PlanAuthored(p)) => Some(p.clone()),
            _ => None,
        })
        .expect("the corrected plan was accepted");
    assert_eq!(plan.attempt, 2);
    assert_eq!(plan.leaves[0].done_when, "test -s scratch/note.org");
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    assert!(
        end.summary
            .starts_with(r#"workflow finished: {"DONE": 1, "FAILED": 0}"#),
        "{}",
        end.summary
    );
    Ok(())
}

/// A worker that writes a draft, says it is done before writing the note, and writes the
/// note only once told that the leaf's gate does not pass.
fn hasty(request: &TurnRequest) -> TurnReply {
    let told = request
        .history
        .iter()
        .any(|e| matches!(e, Exchange::GateFailed { .. }));
    let wrote = request
        .history
        .iter()
        .filter(|e| matches!(e, Exchange::ToolResult { .. }))
        .count();
    let write = |path: &str| {
        vec![dispatch_models::ToolCall::new(
            "files.write_file",
            format!(r#"{{"path": "{path}", "content": "a note"}}"#),
        )]
    };
    let (text, tool_calls) = match (told, wrote) {
        (false, 0) => ("Writing a draft.", write("scratch/draft.org")),
        (true, 1) => ("Writing it now.", write("scratch/note.org")),
        _ => ("The step is done.", vec![]),
    };
    TurnReply {
        text: text.into(),
        tool_calls,
        usage: Default::default(),
        form: dispatch_models::CallForm::Native,
    }
}

#[tokio::test]
async fn a_model_that_finishes_before_its_gate_passes_is_told_and_goes_on() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let plan = "#+TITLE: Note\n* TODO Write a note\n  Write scratch/note.org.\n  :done-when: test -s scratch/note.org\n";
    let model = Scripted::with_worker(&[plan], hasty);
    let events = run_scripted(&stack, model.clone(), "Write a note").await?;

    let gates: Vec<(String, bool, String)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::GateChecked(g)) => Some((g.check_id.clone(), g.passed, g.detail.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(gates.len(), 2, "{gates:?}");
    assert_eq!((gates[0].0.as_str(), gates[0].1), ("gate-l0", false));
    assert_eq!((gates[1].0.as_str(), gates[1].1), ("gate-l0-1", true));
    // The model's third turn was told which check failed and why.
    let turns = model.turns.lock().unwrap();
    assert_eq!(turns.len(), 4, "draft, finish, write, finish");
    let told = turns[2].history.last().cloned();
    assert!(
        matches!(&told, Some(Exchange::GateFailed { command, detail })
            if command == "test -s scratch/note.org" && detail == &gates[0].2),
        "{told:?}"
    );
    let end = finished(&events);
    assert!(
        end.summary
            .starts_with(r#"workflow finished: {"DONE": 1, "FAILED": 0}"#),
        "{}",
        end.summary
    );
    Ok(())
}

#[tokio::test]
async fn malformed_goals_on_the_bus_are_dropped_and_change_nothing() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let (garbage, claimed, actual) = (
        dispatch_bus::RunId::new(),
        dispatch_bus::RunId::new(),
        dispatch_bus::RunId::new(),
    );
    let publish = |subject_of: dispatch_bus::RunId, payload: Vec<u8>| {
        let bus = stack.bus.clone();
        async move {
            bus.append(
                dispatch_bus::subject::goal(&subject_of),
                &dispatch_bus::RunId::new().to_string(),
                None,
                payload.into(),
            )
            .await
        }
    };
    publish(garbage, b"\xff\xfenot protobuf".to_vec()).await?;
    // A well-formed goal that names another run than its subject.
    let mismatched = dispatch_proto::command::v1::SubmitGoal {
        run_id: claimed.to_string(),
        request_event_id: "r".into(),
        goal: "sneak in".into(),
        ..Default::default()
    };
    publish(actual, prost::Message::encode_to_vec(&mismatched)).await?;

    let good = stack.submit("A proper errand", "default", 0).await?;
    stack.wait_finished(good, LIMIT).await?;
    stack.commands_drained(LIMIT).await?;
    let log = stack.log().await?;
    for id in [garbage, claimed, actual] {
        assert!(
            log.read(&id).await?.is_empty(),
            "a malformed goal started run {id}"
        );
    }
    let good_id = good.to_string();
    let runs = stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["ps", "-a", "--format", "json"]).ok()?;
            let runs: Vec<Value> = serde_json::from_str(&out.stdout).ok()?;
            runs.iter()
                .any(|r| r["run_id"] == good_id && r["status"] == "done")
                .then_some(runs)
        })
        .await?;
    assert_eq!(
        runs.len(),
        1,
        "a malformed goal shows up as a run: {runs:?}"
    );
    Ok(())
}

/// A run cannot write outside its `scratch/`: not through a symlink planted at the
/// file's name or at the name a temporary file would take, not by naming `scratch/`
/// itself; and `cat` of a directory fails its gate, as real cat fails.
#[tokio::test]
async fn file_tools_stay_inside_scratch_whatever_is_planted() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let plan = "#+TITLE: Escape\n\
        * TODO Wait\n  :PROPERTIES:\n  :ORDERED: t\n  :END:\n  - call: test.sleep {\"ms\": 1500}\n  :done-when: true\n\
        * TODO Write\n  - call: files.write_file {\"path\": \"scratch/\", \"content\": \"x\"}\n  - call: files.write_file {\"path\": \"scratch/.\", \"content\": \"x\"}\n  - call: files.write_file {\"path\": \"scratch/notes.org\", \"content\": \"owned\"}\n  :done-when: cat scratch\n";
    let run_id = stack.submit(plan, "default", 0).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    // While the first leaf sleeps, plant symlinks to a file outside the workspace.
    let outside = tempfile::tempdir()?;
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "keep")?;
    let run_dir = dispatch_service::layout::run_dir(stack.root(), &run_id);
    let scratch = run_dir.join("scratch");
    std::os::unix::fs::symlink(&victim, scratch.join("notes.org"))?;
    std::os::unix::fs::symlink(&victim, scratch.join(".notes.org.tmp"))?;

    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(
        std::fs::read_to_string(&victim)?,
        "keep",
        "written through a symlink"
    );
    assert!(
        !run_dir.join(".scratch.tmp").exists(),
        "wrote outside scratch/"
    );
    let notes = scratch.join("notes.org");
    assert!(!notes.symlink_metadata()?.is_symlink());
    assert_eq!(std::fs::read_to_string(notes)?, "owned");
    let failed: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ToolCallFailed(f)) => Some(f.error.as_str()),
            _ => None,
        })
        .collect();
    // Ours, and the offline worker's own try to make `cat scratch` pass by writing it.
    for path in ["scratch/", "scratch"] {
        let refusal = format!("path {path:?} names a directory, not a file");
        assert!(failed.contains(&refusal.as_str()), "{failed:?}");
    }
    // A path with a `.` step never reaches the tool: the policy's path_prefix does not
    // read it as inside scratch/, so the gate stops it.
    let dotted = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r)) if r.args_json.contains(r#""scratch/.""#) => {
                Some(r.call_id.clone())
            }
            _ => None,
        })
        .expect("the scratch/. write was requested");
    let decided = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::PolicyDecided(d)) if d.call_id == dotted => Some(d.clone()),
            _ => None,
        })
        .expect("the scratch/. write was decided");
    assert_eq!(
        decided.decision(),
        dispatch_proto::run::v1::Decision::Deny,
        "{decided:?}"
    );
    // The step's last call failed and was not tried again: it is FAILED, and so the
    // run is blocked, however its gate would read.
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32, "{}", end.reason);
    assert!(end.summary.contains("\"FAILED\": 1"), "{}", end.summary);
    assert!(
        end.reason
            .starts_with("1 of 2 steps failed: step 2 (\"Write\"): "),
        "{}",
        end.reason
    );
    Ok(())
}

/// Control characters in a goal never reach a terminal or TASKS.org raw, and the CLI
/// keeps Unix habits: a closed pipe ends it quietly, durations read like `90s`, and it
/// prints shell completions.
#[tokio::test]
async fn hostile_text_is_escaped_and_the_cli_keeps_unix_habits() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let run_id = stack
        .submit(
            "Ring the \x07 bell \x1b[2J\x1b[31m now\u{202e}",
            "default",
            0,
        )
        .await?;
    stack.wait_finished(run_id, LIMIT).await?;
    let id = run_id.to_string();
    let waited = stack.cli(&["wait", &id, "--timeout", "90s"])?;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let raw = |text: &str| {
        text.chars()
            .any(|c| matches!(c, '\x07' | '\x1b' | '\u{202e}'))
    };
    let ps = stack
        .eventually(LIMIT, || async {
            let ps = stack.cli(&["ps", "-a"]).ok()?;
            ps.stdout.contains(&run_id.short()).then_some(ps)
        })
        .await?;
    assert!(!raw(&ps.stdout), "{:?}", ps.stdout);
    assert!(
        ps.stdout.contains("Ring the \\u{7} bell \\u{1b}[2J"),
        "{}",
        ps.stdout
    );
    let logs = stack.cli(&["logs", &id])?;
    assert!(!raw(&logs.stdout), "{:?}", logs.stdout);
    let tasks = stack.tasks_org_with_finished(1, LIMIT).await?;
    assert!(!raw(&tasks), "{tasks:?}");

    // `dispatch logs X | head -0`: the reader is gone before the first line.
    let mut child = std::process::Command::new(dispatch_testkit::bin_dir().join("dispatch"))
        .args(["logs", &id])
        .env("NATS_URL", stack.nats.url())
        .env(
            "DISPATCH_NATS_NKEY",
            stack.nats.seed(dispatch_bus::Identity::Cli),
        )
        .env("DISPATCH_WORKSPACE", stack.root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let completions = stack.cli(&["completions", "bash"])?;
    assert_eq!(completions.code, Some(0));
    assert!(
        completions.stdout.contains("dispatch"),
        "{}",
        completions.stdout
    );
    let bad = stack.cli(&["wait", &id, "--timeout", "10"])?;
    assert_eq!(bad.code, Some(125));
    assert!(bad.stderr.contains("not a duration"), "{}", bad.stderr);
    Ok(())
}
