//! The permission gate end to end: real nats-server, real service processes, the real
//! CLI. A destructive call waits for a person; approvals, denials, expiry, a deadline
//! while waiting, two people answering at once, the denial memo, policy versions
//! across policy copies, and the validator's three verdicts and its failures.

use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_bus::RunId;
use dispatch_proto::run::v1::{Decision, RunStatus, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_tests::{Stack, count, finished};

const LIMIT: Duration = Duration::from_secs(60);

/// The built-in rules, and the test tools: count allowed, erase sent to a person.
const POLICY: &str = r#"{"default": "ask", "rules": [
  {"name": "reads", "effect": "allow", "risk": ["read"]},
  {"name": "run-writes", "effect": "allow", "risk": ["write"], "when": {"path_prefix": ["scratch/"]}},
  {"name": "counting", "effect": "allow", "tools": ["test.count"]},
  {"name": "erasing", "effect": "ask", "tools": ["test.erase"], "reason": "erasing needs a person"}
]}"#;

/// A plan whose leaves each make one call (the offline author takes an outline as
/// the plan, and the offline worker makes its `call:` lines).
fn plan(calls: &[&str]) -> String {
    let mut plan = String::from("#+TITLE: Gate\n");
    for (i, call) in calls.iter().enumerate() {
        plan.push_str(&format!(
            "* TODO Step {i}\n  - call: {call}\n  :done-when: true\n"
        ));
    }
    plan
}

async fn stack(policy: &str, policy_args: &[&str]) -> Result<Stack> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let path = stack.root().join("gate-policy.json");
    std::fs::write(&path, policy)?;
    let path = path.to_str().context("utf-8")?.to_owned();
    let mut args = vec!["--policy", path.as_str()];
    args.extend_from_slice(policy_args);
    stack.add_with("policy", &args).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    stack.add("dispatcher").await?;
    Ok(stack)
}

/// Waits until `dispatch approvals` lists a request of `run_id`; returns its id.
async fn waiting_approval(stack: &Stack, run_id: RunId) -> Result<String> {
    let run = run_id.to_string();
    stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["approvals", "--format", "json"]).ok()?;
            let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).ok()?;
            listed
                .iter()
                .find(|a| a["run_id"] == run.as_str())
                .and_then(|a| a["approval_id"].as_str().map(str::to_owned))
        })
        .await
}

fn bodies(events: &[StoredEvent]) -> impl Iterator<Item = &Body> {
    events.iter().filter_map(|e| e.event.body.as_ref())
}

#[tokio::test]
async fn a_destructive_call_waits_until_a_person_approves_it() -> Result<()> {
    let stack = stack(POLICY, &[]).await?;
    let run_id = stack
        .submit(
            &plan(&[r#"test.erase {"key": "approved"}"#]),
            "default",
            60_000,
        )
        .await?;
    let id = waiting_approval(&stack, run_id).await?;
    // Waiting: nothing ran, the run shows as waiting, TASKS.org says WAITING.
    assert!(stack.counted("approved").is_empty());
    let ps = stack.cli(&["ps", "--format", "json"])?;
    assert!(ps.stdout.contains("\"waiting\""), "{}", ps.stdout);
    let listed = stack.cli(&["approvals"])?.stdout;
    assert!(
        listed.contains(&id) && listed.contains("test.erase") && listed.contains("destructive"),
        "{listed}"
    );

    let approved = stack.cli(&["approve", &id, "--by", "ada", "--note", "fine"])?;
    assert_eq!(approved.code, Some(0), "{}", approved.stderr);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    assert_eq!(stack.counted("approved").len(), 1);
    let resolved = bodies(&events)
        .find_map(|b| match b {
            Body::ApprovalResolved(r) => Some(r.clone()),
            _ => None,
        })
        .context("no resolution in the log")?;
    assert_eq!(resolved.decision(), Decision::Allow);
    assert_eq!(resolved.resolved_by, "ada (cli)");
    let decided = bodies(&events)
        .find_map(|b| match b {
            Body::PolicyDecided(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (decided.decision(), decided.rule.as_str()),
        (Decision::Ask, "erasing")
    );
    assert!(decided.policy_version >= 1 && decided.policy_hash.starts_with("sha256:"));
    // Answering again is refused, saying who answered first.
    let again = stack.cli(&["deny", &id, "--reason", "late"])?;
    assert_ne!(again.code, Some(0));
    assert!(
        again.stderr.contains("already decided") || again.stderr.contains("ended"),
        "{}",
        again.stderr
    );
    Ok(())
}

#[tokio::test]
async fn a_denied_call_is_told_to_the_model_and_the_same_call_is_denied_again_without_asking()
-> Result<()> {
    let stack = stack(POLICY, &[]).await?;
    let erase = r#"test.erase {"key": "denied"}"#;
    // The same call twice, written differently: the second is the memo's.
    let run_id = stack
        .submit(
            &plan(&[erase, r#"test.erase {  "key":"denied" }"#]),
            "default",
            60_000,
        )
        .await?;
    let id = waiting_approval(&stack, run_id).await?;
    let denied = stack.cli(&["deny", &id, "--reason", "not today", "--by", "bob"])?;
    assert_eq!(denied.code, Some(0), "{}", denied.stderr);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert!(stack.counted("denied").is_empty(), "a denied call ran");
    assert_eq!(
        count(&events, "approval_requested"),
        1,
        "the memo asked again"
    );
    let erases: Vec<&str> = bodies(&events)
        .filter_map(|b| match b {
            Body::ToolCallRequested(r) if r.tool == "test.erase" => Some(r.call_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(erases.len(), 2);
    assert!(
        !bodies(&events)
            .any(|b| matches!(b, Body::ToolCallStarted(s) if erases.contains(&s.call_id.as_str()))),
        "a denied call started"
    );
    let memo = bodies(&events)
        .find_map(|b| match b {
            Body::PolicyDecided(d) if d.rule == dispatch_rules::MEMO_RULE => Some(d.clone()),
            _ => None,
        })
        .context("no memo decision")?;
    assert_eq!(memo.decision(), Decision::Deny);
    assert!(
        memo.reason.contains("bob (cli): not today"),
        "{}",
        memo.reason
    );
    // The model was handed the denial as the call's result: the offline worker's next
    // turn is built from it.
    assert!(
        bodies(&events).any(|b| matches!(b, Body::ModelTurn(t)
            if t.text.contains("denied by bob (cli): not today"))),
        "no model turn after the denial says it"
    );
    Ok(())
}

#[tokio::test]
async fn an_unanswered_request_expires_to_deny_and_a_deadline_while_waiting_blocks_the_run()
-> Result<()> {
    let policy = POLICY.replace(
        r#""reason": "erasing needs a person"}"#,
        r#""reason": "erasing needs a person", "approval_ttl_ms": 1500}"#,
    );
    let stack = stack(&policy, &[]).await?;
    let expiring = stack
        .submit(
            &plan(&[r#"test.erase {"key": "expired"}"#]),
            "default",
            60_000,
        )
        .await?;
    let events = stack.wait_finished(expiring, LIMIT).await?;
    let resolved = bodies(&events)
        .find_map(|b| match b {
            Body::ApprovalResolved(r) => Some(r.clone()),
            _ => None,
        })
        .context("the request never expired")?;
    assert!(resolved.expired);
    assert_eq!(
        (resolved.decision(), resolved.resolved_by.as_str()),
        (Decision::Deny, "expiry")
    );
    assert!(stack.counted("expired").is_empty());

    // A run whose own deadline comes first ends blocked, saying why.
    let stack = self::stack(POLICY, &[]).await?;
    let waiting = stack
        .submit(&plan(&[r#"test.erase {"key": "late"}"#]), "default", 3_000)
        .await?;
    let events = stack.wait_finished(waiting, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status(), RunStatus::Blocked);
    assert_eq!(end.reason, "timed out waiting for approval");
    assert!(stack.counted("late").is_empty());
    Ok(())
}

#[tokio::test]
async fn of_two_people_answering_at_once_exactly_one_wins() -> Result<()> {
    let stack = stack(POLICY, &[]).await?;
    let run_id = stack
        .submit(&plan(&[r#"test.erase {"key": "race"}"#]), "default", 60_000)
        .await?;
    let id = waiting_approval(&stack, run_id).await?;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| stack.cli(&["approve", &id, "--by", "ann"]));
        let b = s.spawn(|| stack.cli(&["deny", &id, "--reason", "no", "--by", "ben"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a?, b?);
    let wins = [&a, &b].iter().filter(|o| o.code == Some(0)).count();
    assert_eq!(wins, 1, "ann: {a:?}\nben: {b:?}");
    let loser = if a.code == Some(0) { &b } else { &a };
    assert!(loser.stderr.contains("already decided"), "{}", loser.stderr);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(count(&events, "approval_resolved"), 1);
    Ok(())
}

#[tokio::test]
async fn a_policy_change_reaches_every_copy_and_decisions_name_their_version() -> Result<()> {
    let mut stack = stack(POLICY, &[]).await?;
    // A second copy, started with no document: it follows the one in force.
    stack.add("policy").await?;
    let before = stack
        .submit(&plan(&[r#"test.count {"key": "v1"}"#]), "default", 60_000)
        .await?;
    let events = stack.wait_finished(before, LIMIT).await?;
    let version = |events: &[StoredEvent]| {
        bodies(events)
            .find_map(|b| match b {
                Body::PolicyDecided(d) => Some((d.policy_version, d.decision(), d.rule.clone())),
                _ => None,
            })
            .unwrap()
    };
    let (v1, decision, _) = version(&events);
    assert_eq!(decision, Decision::Allow);

    // A bad document is refused precisely, and nothing changes.
    let bad = stack.root().join("bad.json");
    std::fs::write(
        &bad,
        "{\"default\": \"deny\", \"rules\": [\n  {\"name\": \"x\", \"effect\": \"perhaps\"}\n]}",
    )?;
    let refused = stack.cli(&["policy", "set", bad.to_str().unwrap()])?;
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("line 2") && refused.stderr.contains("perhaps"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("nothing changed"),
        "{}",
        refused.stderr
    );

    let stricter = stack.root().join("stricter.json");
    std::fs::write(
        &stricter,
        POLICY.replace(
            r#""name": "counting", "effect": "allow""#,
            r#""name": "counting", "effect": "deny""#,
        ),
    )?;
    let set = stack.cli(&[
        "policy",
        "set",
        stricter.to_str().unwrap(),
        "--note",
        "no counting",
        "--by",
        "cy",
    ])?;
    assert_eq!(set.code, Some(0), "{}", set.stderr);
    assert!(
        set.stdout.contains(&format!("version {}", v1 + 1)),
        "{}",
        set.stdout
    );
    // Every copy answers with the new version (requests go to either copy).
    for _ in 0..6 {
        let test = stack.cli(&[
            "policy",
            "test",
            "test.count",
            r#"{"key":"x"}"#,
            "--format",
            "json",
        ])?;
        let test: serde_json::Value = serde_json::from_str(&test.stdout)?;
        assert_eq!(test["effect"], "deny", "{test}");
        assert_eq!(test["policy_version"], v1 + 1);
    }
    let after = stack
        .submit(&plan(&[r#"test.count {"key": "v2"}"#]), "default", 60_000)
        .await?;
    let events = stack.wait_finished(after, LIMIT).await?;
    assert_eq!(
        version(&events),
        (v1 + 1, Decision::Deny, "counting".into())
    );
    assert!(stack.counted("v2").is_empty());
    let history = stack.cli(&["policy", "history", "--format", "json"])?;
    let history: Vec<serde_json::Value> = serde_json::from_str(&history.stdout)?;
    let last = history.last().unwrap();
    assert_eq!(
        (last["changed_by"].as_str(), last["note"].as_str()),
        (Some("cy (cli)"), Some("no counting"))
    );
    assert_eq!(history.len() as u32, v1 + 1);
    let shown = stack.cli(&["policy", "show"])?.stdout;
    assert!(shown.contains(last["hash"].as_str().unwrap()), "{shown}");
    Ok(())
}

const VALIDATED: &str = r#"{"default": "ask", "guidance": "test calls", "rules": [
  {"name": "reads", "effect": "allow", "risk": ["read"]},
  {"name": "run-writes", "effect": "allow", "risk": ["write"], "when": {"path_prefix": ["scratch/"]}},
  {"name": "judged", "effect": "validate", "tools": ["test.*"]}
]}"#;

fn decision_of(events: &[StoredEvent]) -> dispatch_proto::run::v1::PolicyDecided {
    bodies(events)
        .find_map(|b| match b {
            Body::PolicyDecided(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn the_validator_allows_denies_and_escalates_and_fails_closed() -> Result<()> {
    let stack = stack(VALIDATED, &[]).await?;
    let allowed = stack
        .submit(
            &plan(&[r#"test.count {"key": "judged"}"#]),
            "default",
            60_000,
        )
        .await?;
    let events = stack.wait_finished(allowed, LIMIT).await?;
    let d = decision_of(&events);
    assert_eq!(
        (
            d.decision(),
            d.validator_verdict.as_str(),
            d.validator.as_str()
        ),
        (Decision::Allow, "allow", "offline")
    );
    assert_eq!(stack.counted("judged").len(), 1);

    let denied = stack
        .submit(&plan(&[r#"test.send {"key": "sent"}"#]), "default", 60_000)
        .await?;
    let events = stack.wait_finished(denied, LIMIT).await?;
    let d = decision_of(&events);
    assert_eq!(
        (d.decision(), d.validator_verdict.as_str()),
        (Decision::Deny, "deny")
    );
    assert!(stack.counted("sent").is_empty());

    let escalated = stack
        .submit(
            &plan(&[r#"test.erase {"key": "escalated"}"#]),
            "default",
            60_000,
        )
        .await?;
    let id = waiting_approval(&stack, escalated).await?;
    stack.cli(&["approve", &id])?;
    let events = stack.wait_finished(escalated, LIMIT).await?;
    let d = decision_of(&events);
    assert_eq!(
        (d.decision(), d.validator_verdict.as_str()),
        (Decision::Ask, "escalate")
    );
    assert_eq!(stack.counted("escalated").len(), 1);

    // A validator that answers nothing in time, and one that cannot be reached: a
    // person decides.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_url = format!("http://{}/v1", silent.local_addr()?);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let closed_url = format!("http://{}/v1", closed.local_addr()?);
    drop(closed);
    for (url, said) in [
        (silent_url, "no complete answer within 700 ms"),
        (closed_url, "the validator failed"),
    ] {
        let stack = self::stack(
            VALIDATED,
            &["--validator-url", &url, "--validator-timeout-ms", "700"],
        )
        .await?;
        let run = stack
            .submit(
                &plan(&[r#"test.count {"key": "closed"}"#]),
                "default",
                60_000,
            )
            .await?;
        let id = waiting_approval(&stack, run).await?;
        stack.cli(&["deny", &id, "--reason", "checked by hand"])?;
        let events = stack.wait_finished(run, LIMIT).await?;
        let d = decision_of(&events);
        assert_eq!(
            (d.decision(), d.validator_verdict.as_str()),
            (Decision::Ask, "error")
        );
        assert!(d.reason.contains(said), "{}", d.reason);
        assert!(stack.counted("closed").is_empty());
    }
    Ok(())
}

/// The approval id of `run_id`'s request as `GET /v1/approvals` lists it.
async fn listed_over_http(stack: &Stack, run_id: RunId) -> Result<String> {
    let run = run_id.to_string();
    stack
        .eventually(LIMIT, || async {
            let page = stack.get_json("/v1/approvals").await.ok()?;
            page["approvals"]
                .as_array()?
                .iter()
                .find(|a| a["run_id"] == run.as_str())
                .and_then(|a| a["approval_id"].as_str().map(str::to_owned))
        })
        .await
}

async fn answer_over_http(stack: &Stack, id: &str, body: &str) -> Result<(u16, serde_json::Value)> {
    let response = stack
        .http
        .post(stack.url(&format!("/v1/approvals/{id}")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

#[tokio::test]
async fn approvals_are_listed_page_by_page_and_answered_over_http() -> Result<()> {
    let mut stack = stack(POLICY, &[]).await?;
    stack.add("ingress").await?;
    let first = stack
        .submit(
            &plan(&[r#"test.erase {"key": "http-a"}"#]),
            "default",
            60_000,
        )
        .await?;
    let second = stack
        .submit(
            &plan(&[r#"test.erase {"key": "http-b"}"#]),
            "default",
            60_000,
        )
        .await?;
    let a = listed_over_http(&stack, first).await?;
    let b = listed_over_http(&stack, second).await?;

    // One per page: the Link header leads to the other, and the last page has none.
    let response = stack
        .http
        .get(stack.url("/v1/approvals?limit=1"))
        .send()
        .await?;
    let link = response
        .headers()
        .get("link")
        .context("a first page of one links on")?
        .to_str()?
        .to_owned();
    let page: serde_json::Value = response.json().await?;
    assert_eq!(page["approvals"][0]["approval_id"], a.as_str(), "{page}");
    assert_eq!(page["approvals"][0]["tool"], "test.erase");
    assert_eq!(page["approvals"][0]["risk"], "destructive");
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .context("a link")?;
    let rest = stack.get_json(next).await?;
    assert_eq!(rest["approvals"][0]["approval_id"], b.as_str(), "{rest}");
    assert_eq!(rest["next"], serde_json::Value::Null);

    // Bad answers change nothing.
    for (id, body, status, code) in [
        (a.as_str(), r#"{"decision":"deny"}"#, 400, "invalid_reason"),
        (
            a.as_str(),
            r#"{"decision":"perhaps"}"#,
            400,
            "invalid_decision",
        ),
        (a.as_str(), "{", 400, "invalid_json"),
        (
            "not-an-id",
            r#"{"decision":"allow","args_digest":"sha256:00"}"#,
            400,
            "invalid_approval",
        ),
        // An allowance must name the arguments the person saw...
        (
            a.as_str(),
            r#"{"decision":"allow"}"#,
            400,
            "digest_required",
        ),
        // ...and holds only for those.
        (
            a.as_str(),
            r#"{"decision":"allow","args_digest":"sha256:0123"}"#,
            409,
            "digest_mismatch",
        ),
    ] {
        let (got, problem) = answer_over_http(&stack, id, body).await?;
        assert_eq!(
            (got, problem["code"].as_str()),
            (status, Some(code)),
            "{body}: {problem}"
        );
    }
    let unknown = format!("{}.l0-t0-c0", RunId::new());
    let (got, problem) = answer_over_http(
        &stack,
        &unknown,
        r#"{"decision":"allow","args_digest":"sha256:00"}"#,
    )
    .await?;
    assert_eq!(
        (got, problem["code"].as_str()),
        (404, Some("not_found")),
        "{problem}"
    );
    assert!(stack.counted("http-a").is_empty());

    // The request whole: the arguments as they will run, and their digest.
    let detail = stack.get_json(&format!("/v1/approvals/{a}")).await?;
    assert_eq!(detail["args_json"], r#"{"key":"http-a"}"#, "{detail}");
    let digest = detail["args_digest"]
        .as_str()
        .context("a digest")?
        .to_owned();
    assert_eq!(page["approvals"][0]["args_digest"], digest.as_str());
    assert_eq!(page["approvals"][0]["args_clipped"], false);
    let allow = format!(r#"{{"decision":"allow","args_digest":"{digest}"}}"#);
    let (got, answered) = answer_over_http(&stack, &a, &allow).await?;
    assert_eq!(got, 200, "{answered}");
    assert!(
        answered["resolved_by"]
            .as_str()
            .unwrap()
            .ends_with("(http)"),
        "{answered}"
    );
    let (got, late) =
        answer_over_http(&stack, &a, r#"{"decision":"deny","reason":"too late"}"#).await?;
    assert_eq!(
        (got, late["code"].as_str()),
        (409, Some("already_decided")),
        "{late}"
    );
    assert!(
        late["detail"].as_str().unwrap().contains("(http)"),
        "{late}"
    );
    let (got, denied) = answer_over_http(
        &stack,
        &b,
        r#"{"decision":"deny","reason":"not over http"}"#,
    )
    .await?;
    assert_eq!(got, 200, "{denied}");

    let events = stack.wait_finished(first, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    assert_eq!(stack.counted("http-a").len(), 1);
    let events = stack.wait_finished(second, LIMIT).await?;
    let resolved = bodies(&events)
        .find_map(|b| match b {
            Body::ApprovalResolved(r) => Some(r.clone()),
            _ => None,
        })
        .context("no resolution")?;
    assert_eq!(resolved.decision(), Decision::Deny);
    assert_eq!(resolved.reason, "not over http");
    assert!(resolved.resolved_by.ends_with("(http)"));
    assert!(stack.counted("http-b").is_empty());
    let page = stack.get_json("/v1/approvals").await?;
    assert_eq!(page["approvals"], serde_json::json!([]), "{page}");
    Ok(())
}

#[tokio::test]
async fn a_dispatcher_killed_while_its_run_waits_is_replaced_and_the_run_keeps_waiting()
-> Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let path = stack.root().join("gate-policy.json");
    std::fs::write(&path, POLICY)?;
    let path = path.to_str().context("utf-8")?.to_owned();
    stack.add_with("policy", &["--policy", &path]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    stack
        .add_with("dispatcher", &["--lease-ms", "1000"])
        .await?;
    let run_id = stack
        .submit(&plan(&[r#"test.erase {"key": "kept"}"#]), "default", 60_000)
        .await?;
    let id = waiting_approval(&stack, run_id).await?;
    stack.service("dispatcher")?.kill().await?;
    stack.services.retain(|s| s.name != "dispatcher");
    stack
        .add_with("dispatcher", &["--lease-ms", "1000"])
        .await?;
    // Well past one lease: the new copy has taken the run over, and waits.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let events = stack.log().await?.read(&run_id).await?;
    assert!(!finished_yet(&events), "the run ended without an answer");
    assert_eq!(count(&events, "approval_requested"), 1, "asked again");
    assert_eq!(count(&events, "policy_decided"), 1, "checked again");
    assert!(stack.counted("kept").is_empty());

    let approved = stack.cli(&["approve", &id])?;
    assert_eq!(approved.code, Some(0), "{}", approved.stderr);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    assert_eq!(count(&events, "approval_requested"), 1);
    assert_eq!(stack.counted("kept").len(), 1);
    let finisher = &events.last().unwrap().event.writer;
    let started_by = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::RunStarted(s)) => Some(s.owner.clone()),
            _ => None,
        })
        .unwrap();
    assert_ne!(finisher, &started_by, "the killed copy finished the run");
    Ok(())
}

fn finished_yet(events: &[StoredEvent]) -> bool {
    bodies(events).any(|b| matches!(b, Body::RunFinished(_)))
}

#[tokio::test]
async fn a_write_whose_audit_event_cannot_be_stored_does_not_happen() -> Result<()> {
    use dispatch_bus::async_nats::jetstream::stream::DiscardPolicy;
    let stack = stack(POLICY, &[]).await?;
    let run_id = stack
        .submit(
            &plan(&[r#"test.erase {"key": "audited"}"#]),
            "default",
            60_000,
        )
        .await?;
    let id = waiting_approval(&stack, run_id).await?;

    // From now on the run log takes exactly one more event: the answer (this is the
    // only run). The connector's audit event (ToolCallStarted) is refused by the server.
    let js = stack.bus.jetstream();
    let mut runs = js.get_stream(dispatch_bus::streams::RUNS).await?;
    let info = runs.info().await?;
    let original = info.config.clone();
    let mut refusing = original.clone();
    refusing.max_messages = info.state.messages as i64 + 1;
    refusing.discard = DiscardPolicy::New;
    js.update_stream(refusing).await?;

    let approved = stack.cli(&["approve", &id])?;
    assert_eq!(approved.code, Some(0), "{}", approved.stderr);
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ApprovalResolved(_)))
        .await?;
    // The connector keeps trying to record the start; the write never goes out.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let events = stack.log().await?.read(&run_id).await?;
    assert!(
        !bodies(&events).any(|b| matches!(b, Body::ToolCallStarted(_))),
        "the refused audit event is in the log"
    );
    assert!(
        stack.counted("audited").is_empty(),
        "the write happened without its audit event"
    );

    // Once the log takes events again, the audit event comes first, then the write.
    js.update_stream(original).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    assert_eq!(stack.counted("audited").len(), 1);
    let position = |kind: fn(&Body) -> bool| {
        events
            .iter()
            .position(|e| e.event.body.as_ref().is_some_and(kind))
    };
    let started = position(|b| matches!(b, Body::ToolCallStarted(_))).context("no audit")?;
    let completed = position(|b| matches!(b, Body::ToolCallCompleted(_))).context("no result")?;
    assert!(started < completed);
    Ok(())
}

/// A call whose arguments name a key twice (a person would be shown one value and the
/// tool would run with the other) is refused when it is requested; long arguments are
/// listed clipped, marked so, and whole one request away; an approval from the CLI
/// names the digest it was shown, and another digest is refused.
#[tokio::test]
async fn approvals_show_exactly_what_will_run() -> Result<()> {
    let stack = stack(POLICY, &[]).await?;
    // The spoof: a safe-looking target, padding past the listing's clip, the real one.
    let spoof = format!(
        r#"test.erase {{"key": "spoofed", "target": "/srv/cache (routine, safe)", "pad": "{}", "target": "/"}}"#,
        "x".repeat(2000)
    );
    let spoofed = stack.submit(&plan(&[&spoof]), "default", 60_000).await?;
    let events = stack.wait_finished(spoofed, LIMIT).await?;
    let decided = bodies(&events)
        .find_map(|b| match b {
            Body::PolicyDecided(d) => Some(d.clone()),
            _ => None,
        })
        .context("a decision")?;
    assert_eq!(decided.decision(), Decision::Deny);
    assert_eq!(decided.rule, "arguments");
    assert!(
        decided.reason.contains("\"target\" is given twice"),
        "{}",
        decided.reason
    );
    assert!(
        !bodies(&events).any(|b| matches!(b, Body::ApprovalRequested(_))),
        "nobody was asked about it"
    );
    assert!(stack.counted("spoofed").is_empty());

    // Long arguments, honestly given: listed clipped and marked, whole with --full.
    let long = format!(
        r#"test.erase {{"key": "long", "note": "{}"}}"#,
        "y".repeat(3000)
    );
    let run_id = stack.submit(&plan(&[&long]), "default", 60_000).await?;
    let id = waiting_approval(&stack, run_id).await?;
    let listed = stack.cli(&["approvals"])?;
    assert!(listed.stdout.contains("[clipped: 3"), "{}", listed.stdout);
    let json = stack.cli(&["approvals", "--format", "json"])?;
    let pending: Vec<serde_json::Value> = serde_json::from_str(&json.stdout)?;
    let shown = pending
        .iter()
        .find(|p| p["approval_id"] == id.as_str())
        .context("listed")?;
    assert_eq!(shown["args_clipped"], true);
    assert!(shown["args_json"].as_str().unwrap().len() <= 1024);
    let full = stack.cli(&["approvals", "--full", "--format", "json"])?;
    let pending: Vec<serde_json::Value> = serde_json::from_str(&full.stdout)?;
    let whole = pending
        .iter()
        .find(|p| p["approval_id"] == id.as_str())
        .context("listed")?;
    assert_eq!(whole["args_clipped"], false);
    assert!(
        whole["args_json"]
            .as_str()
            .unwrap()
            .contains(&"y".repeat(3000))
    );
    let digest = whole["args_digest"]
        .as_str()
        .context("a digest")?
        .to_owned();
    assert_eq!(digest, shown["args_digest"].as_str().unwrap());

    // Another digest is refused and changes nothing; the shown one is taken.
    let wrong = stack.cli(&["approve", &id, "--digest", "sha256:feed"])?;
    assert_ne!(wrong.code, Some(0));
    assert!(wrong.stderr.contains("not sha256:feed"), "{}", wrong.stderr);
    assert!(stack.counted("long").is_empty());
    let right = stack.cli(&["approve", &id, "--digest", &digest])?;
    assert_eq!(right.code, Some(0), "{}", right.stderr);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    assert_eq!(stack.counted("long").len(), 1);
    Ok(())
}
