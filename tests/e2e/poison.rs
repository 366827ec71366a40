//! No poison messages: hostile input cannot crash a service or be redelivered forever.

use std::time::Duration;

use dispatch_bus::{RunId, subject};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_proto::run::v1::RunStatus;
use dispatch_tests::{ALL, Stack, finished};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

/// The goal that once overflowed the gate parser's stack and took the stack down:
/// 3,950 `!` before `true`, 7,949 characters, under the 8,000 limit.
fn poison_gate_goal() -> String {
    format!(
        "#+TITLE: b\n* TODO x\n  :done-when: {}true\n",
        "! ".repeat(3950)
    )
}

#[tokio::test]
async fn the_poison_gate_goal_ends_blocked_and_the_stack_keeps_serving() -> anyhow::Result<()> {
    let mut stack = Stack::start(&ALL).await?;
    let goal = poison_gate_goal();
    assert!(goal.chars().count() < 8000);
    let response = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&json!({ "goal": goal }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let reply: serde_json::Value = response.json().await?;
    let run_id: RunId = reply["run_id"].as_str().unwrap().parse()?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32, "{}", end.reason);
    assert!(
        end.reason.starts_with("plan rejected: gate_too_large"),
        "{}",
        end.reason
    );
    for name in ALL {
        assert!(
            !stack.service(name)?.has_exited(),
            "{name} died on the poison goal"
        );
    }
    let next = stack.submit("An ordinary errand", "default", 0).await?;
    let events = stack.wait_finished(next, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    Ok(())
}

#[tokio::test]
async fn goals_that_skip_ingress_are_checked_by_the_dispatcher() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let good = |goal: &str| SubmitGoal {
        run_id: String::new(),
        request_event_id: uuid_v7(),
        goal: goal.to_owned(),
        conversation_id: "default".into(),
        timeout_ms: 0,
        origin: "bus".into(),
        submitted_at_unix_ms: 1,
        callback_url: String::new(),
        payload: String::new(),
        kind: String::new(),
        ..Default::default()
    };
    let cases = [
        (
            SubmitGoal {
                timeout_ms: i64::MAX as u64,
                ..good("Take forever")
            },
            "rejected: invalid_timeout",
        ),
        (good(""), "rejected: invalid_goal: goal must not be empty"),
        (good(&"x".repeat(900 * 1024)), "rejected: invalid_goal"),
        (
            SubmitGoal {
                conversation_id: "a.>".into(),
                ..good("Somewhere odd")
            },
            "rejected: invalid_conversation",
        ),
        (
            SubmitGoal {
                request_event_id: "not an id".into(),
                ..good("Odd id")
            },
            "rejected: invalid_request_id",
        ),
        (
            SubmitGoal {
                callback_url: "file:///etc/passwd".into(),
                ..good("Call me back")
            },
            "rejected: invalid_callback",
        ),
        (
            SubmitGoal {
                kind: "service".into(),
                ..good("A service with no spec")
            },
            "rejected: invalid_service",
        ),
        (
            SubmitGoal {
                kind: "heartbeat".into(),
                parent_run_id: RunId::new().to_string(),
                wake: "because".into(),
                ..good("An odd wake")
            },
            "rejected: invalid_wake",
        ),
    ];
    let rejected = cases.len();
    for (mut command, reason) in cases {
        let run_id = RunId::new();
        command.run_id = run_id.to_string();
        stack
            .bus
            .append(
                subject::goal(&run_id),
                &run_id.to_string(),
                None,
                prost::Message::encode_to_vec(&command).into(),
            )
            .await?;
        let events = stack.wait_finished(run_id, LIMIT).await?;
        let end = finished(&events);
        assert_eq!(end.status, RunStatus::Blocked as i32);
        assert!(end.reason.starts_with(reason), "{}", end.reason);
        assert_eq!(events.len(), 3, "only the request, the note and the end");
    }
    let root = stack.root().to_path_buf();
    let log = stack.service("dispatcher")?.log_path(&root);
    let text = std::fs::read_to_string(log)?;
    assert_eq!(
        text.matches("rejecting a goal").count(),
        rejected,
        "every rejection is logged with its reason"
    );
    // A wake of a run that is no service never runs, and changes nothing there.
    let next = stack.submit("An ordinary errand", "default", 0).await?;
    let events = stack.wait_finished(next, LIMIT).await?;
    let wake = RunId::new();
    let command = SubmitGoal {
        run_id: wake.to_string(),
        kind: "heartbeat".into(),
        parent_run_id: next.to_string(),
        wake: "manual".into(),
        ..good("Wake a job")
    };
    stack
        .bus
        .append(
            subject::goal(&wake),
            &wake.to_string(),
            None,
            prost::Message::encode_to_vec(&command).into(),
        )
        .await?;
    let woken = stack.wait_finished(wake, LIMIT).await?;
    let end = finished(&woken);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert_eq!(end.reason, format!("run {next} is not a service run"));
    assert_eq!(stack.log().await?.read(&next).await?.len(), events.len());
    let next = stack.submit("An ordinary errand", "default", 0).await?;
    let events = stack.wait_finished(next, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    Ok(())
}

#[tokio::test]
async fn a_command_that_crashes_its_handler_every_time_is_given_up() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let policy = stack.test_policy()?;
    let policy = policy.to_str().unwrap().to_owned();
    stack.add_with("policy", &["--policy", &policy]).await?;
    let connectors = ["--test-tools", "--lease-ms", "300"];
    stack.add_with("connectors", &connectors).await?;
    stack.add("dispatcher").await?;
    let plan = "#+TITLE: Poison\n* TODO Crash the connector\n  - call: test.crash {}\n  :done-when: true\n";
    let run_id = stack.submit(plan, "default", 0).await?;

    // Like a supervisor would, restart the connector each time the command kills it.
    let log = stack.log().await?;
    let mut crashes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let events = log.read(&run_id).await?;
        if dispatch_tests::count(&events, "run_finished") == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poison command was not given up ({crashes} crashes)"
        );
        if stack.service("connectors")?.has_exited() {
            crashes += 1;
            stack.services.retain(|s| s.name != "connectors");
            stack.add_with("connectors", &connectors).await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason
            .contains("gave up on the tool command after 7 deliveries"),
        "{}",
        end.reason
    );
    assert_eq!(crashes, 7, "one crash per delivery that attempted the work");
    assert_eq!(dispatch_tests::count(&events, "command_abandoned"), 1);
    assert_eq!(dispatch_tests::count(&events, "tool_call_started"), 0);

    // The rest of the stack kept working throughout.
    let next = stack.submit("An ordinary errand", "default", 0).await?;
    let events = stack.wait_finished(next, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    Ok(())
}

fn uuid_v7() -> String {
    RunId::new().to_string()
}
