//! Service runs: `dispatch serve` starts a long-lived run that its schedules and its
//! interval wake, each wake a run of its own recorded in the service's log; it stays
//! `doing` while idle, ends `stopped` when stopped (its schedules go with it), and a
//! restart rebuilds it from its log. An Agentfile with a mistake is refused by line.

use std::time::Duration;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::{RunId, streams};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_proto::run::v1::{
    ListenerEntry, RunRequested, RunStatus, ServiceWoken, run_event::Body,
};
use dispatch_runlog::StoredEvent;
use dispatch_tests::{Stack, finished};
use serde_json::Value;
use sha2::Digest as _;

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "s3cret-token-for-the-hook";

fn requested(events: &[StoredEvent]) -> Result<RunRequested> {
    events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::RunRequested(r)) => Some(r.clone()),
            _ => None,
        })
        .context("the run was requested")
}

fn wakes(events: &[StoredEvent]) -> Vec<ServiceWoken> {
    events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ServiceWoken(w)) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

/// Every goal stored that wakes `service`.
async fn wake_goals(stack: &Stack, service: &str) -> Result<Vec<SubmitGoal>> {
    let goals = dispatch_tests::stored_goals(&stack.bus).await?;
    Ok(goals
        .into_iter()
        .filter(|g| g.parent_run_id == service)
        .collect())
}

fn inspect(stack: &Stack, run: &str) -> Result<Value> {
    let out = stack.cli(&["inspect", run])?;
    anyhow::ensure!(out.code == Some(0), "inspect: {}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

fn ps_status(stack: &Stack, run: &str) -> Result<Option<String>> {
    let out = stack.cli(&["ps", "-a", "--format", "json"])?;
    anyhow::ensure!(out.code == Some(0), "ps: {}", out.stderr);
    let runs: Vec<Value> = serde_json::from_str(&out.stdout)?;
    Ok(runs
        .iter()
        .find(|r| r["run_id"] == run)
        .and_then(|r| r["status"].as_str().map(str::to_owned)))
}

#[tokio::test]
async fn a_service_wakes_on_its_schedule_and_interval_and_ends_stopped() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    for service in ["scheduler", "dispatcher"] {
        stack.add(service).await?;
    }
    let out = stack.cli(&[
        "serve",
        "--goal",
        "Service errand",
        "--schedule",
        "*/2 * * * * * *",
        "--interval",
        "3s",
    ])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let service: RunId = out.stdout.trim().parse()?;
    let id = service.to_string();
    let log = stack.log().await?;

    // It wakes for both reasons, each wake a heartbeat run recorded in its log first.
    let woke = stack
        .eventually(LIMIT, || async {
            let events = log.read(&service).await.ok()?;
            let woke = wakes(&events);
            let reasons = |r: &str| woke.iter().filter(|w| w.wake == r).count();
            (reasons("schedule") >= 2 && reasons("interval") >= 1).then_some(woke)
        })
        .await?;
    assert_eq!(ps_status(&stack, &id)?.as_deref(), Some("doing"));
    for wake in &woke {
        let events = stack.wait_finished(wake.run_id.parse()?, LIMIT).await?;
        assert_eq!(finished(&events).status, RunStatus::Done as i32);
        let child = requested(&events)?;
        assert_eq!(child.kind, "heartbeat");
        assert_eq!(child.parent_run_id, id);
        assert_eq!(child.wake, wake.wake);
        assert_eq!(child.goal, "Service errand");
        let payload: Value = serde_json::from_str(&child.payload)?;
        assert_eq!(payload["wake"], wake.wake.as_str(), "{payload}");
        assert!(payload["fire_at_ms"].as_i64().is_some(), "{payload}");
    }
    let view = inspect(&stack, &id)?;
    assert_eq!(view["kind"], "service");
    assert_eq!(view["status"], "doing");
    assert_eq!(view["service"]["schedules"][0], "*/2 * * * * * * UTC");
    assert_eq!(view["service"]["interval_ms"], 3000);
    assert_eq!(
        view["service"]["schedule_ids"].as_array().map(Vec::len),
        Some(2),
        "{view}"
    );
    assert!(view["service"]["wakes"].as_u64() >= Some(woke.len() as u64));
    assert!(
        view.get("deadline_at_ms").is_none_or(Value::is_null),
        "{view}"
    );
    let listed = stack.cli(&["schedule", "ls", "--format", "json"])?;
    let schedules: Vec<Value> = serde_json::from_str(&listed.stdout)?;
    assert_eq!(schedules.len(), 2, "{schedules:?}");
    assert!(schedules.iter().all(|s| s["service_run_id"] == id.as_str()));

    // A wake by hand, with a payload of its own.
    let out = stack.cli(&["wake", &id, r#"{"by": "hand"}"#])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let manual: RunId = out.stdout.trim().parse()?;
    let events = stack.wait_finished(manual, LIMIT).await?;
    let child = requested(&events)?;
    assert_eq!(
        (child.wake.as_str(), child.payload.as_str()),
        ("manual", r#"{"by": "hand"}"#)
    );
    assert!(
        wakes(&log.read(&service).await?)
            .iter()
            .any(|w| w.run_id == manual.to_string() && w.wake == "manual")
    );

    // A goal from the bus that names the service but is not its goal never runs.
    let forged = RunId::new();
    let command = SubmitGoal {
        run_id: forged.to_string(),
        request_event_id: uuid::Uuid::now_v7().to_string(),
        goal: "Something else entirely".into(),
        conversation_id: "default".into(),
        origin: "bus".into(),
        kind: "heartbeat".into(),
        parent_run_id: id.clone(),
        wake: "schedule".into(),
        ..Default::default()
    };
    stack
        .bus
        .append(
            dispatch_bus::subject::goal(&forged),
            &forged.to_string(),
            None,
            prost::Message::encode_to_vec(&command).into(),
        )
        .await?;
    let events = stack.wait_finished(forged, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Blocked as i32);
    assert_eq!(
        finished(&events).reason,
        format!("the wake is not of service {id}'s goal and sources")
    );
    assert!(
        !wakes(&log.read(&service).await?)
            .iter()
            .any(|w| w.run_id == forged.to_string())
    );

    // A stop ends it at once (nothing runs an idle service), and its schedules go.
    let began = std::time::Instant::now();
    let out = stack.cli(&["stop", &id])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "a stop does not wait out a grace period: {:?}",
        began.elapsed()
    );
    let events = stack.wait_finished(service, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32);
    assert_eq!(end.reason, "stopped by cli");
    assert_eq!(ps_status(&stack, &id)?.as_deref(), Some("stopped"));
    stack
        .eventually(LIMIT, || async {
            let listed = stack.cli(&["schedule", "ls", "--format", "json"]).ok()?;
            let schedules: Vec<Value> = serde_json::from_str(&listed.stdout).ok()?;
            schedules.is_empty().then_some(())
        })
        .await?;
    // No wake after the end: no schedule fires for it any more; a wake asked for now
    // ends blocked without running.
    let woken_so_far = wake_goals(&stack, &id).await?.len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(wake_goals(&stack, &id).await?.len(), woken_so_far);
    assert_eq!(log.read(&service).await?.len(), events.len());
    let out = stack.cli(&["wake", &id])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let late = stack
        .wait_finished(out.stdout.trim().parse()?, LIMIT)
        .await?;
    assert_eq!(finished(&late).status, RunStatus::Blocked as i32);
    assert_eq!(
        finished(&late).reason,
        format!("its service run {id} has ended")
    );
    let out = stack.cli(&["wake", &woke[0].run_id])?;
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr.contains("is not a service run"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn the_example_agentfile_serves_restarts_from_its_log_and_keeps_its_secret() -> Result<()> {
    let stack = Stack::start(&["ledger", "scheduler", "dispatcher"]).await?;
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/Agentfile");
    let env = [("DISPATCH_WEBHOOK_SECRET", SECRET)];

    // Without its secret, it says where to put it and starts nothing.
    let out = stack.cli(&["serve", example])?;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("DISPATCH_WEBHOOK_SECRET"),
        "{}",
        out.stderr
    );
    let out = stack.cli_with_env(&["serve", example], &env)?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let service: RunId = out.stdout.trim().parse()?;
    let id = service.to_string();
    stack
        .eventually(LIMIT, || async {
            (inspect(&stack, &id).ok()?["status"] == "doing").then_some(())
        })
        .await?;
    let view = inspect(&stack, &id)?;
    assert_eq!(
        view["service"]["schedules"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(view["service"]["source"], example);
    let listener = &view["service"]["listeners"][0];
    assert_eq!(listener["listen_addr"], "127.0.0.1:0");
    assert_eq!(listener["path"], "/hook");
    assert_eq!(listener["methods"][0], "POST");
    assert_eq!(listener["shared_secret"], true);
    assert_eq!(listener["max_body_bytes"], 8192);

    // The log holds the secret's digest, never the secret.
    let log = stack.log().await?;
    let events = log.read(&service).await?;
    let spec = requested(&events)?.service.context("a service spec")?;
    assert_eq!(
        spec.listeners[0].secret_sha256,
        sha2::Sha256::digest(SECRET.as_bytes()).to_vec()
    );
    for dir in [stack.nats.store_dir(), stack.root().to_path_buf()] {
        assert_eq!(
            dispatch_tests::files_holding(&dir, SECRET.as_bytes(), &dir.join("none")),
            Vec::<String>::new(),
            "the secret is stored nowhere"
        );
    }

    // A restart stops it and starts it again from what its log recorded.
    let out = stack.cli(&["restart", &id])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let again: RunId = out.stdout.trim().parse()?;
    let events = stack.wait_finished(service, LIMIT).await?;
    assert_eq!(finished(&events).status, RunStatus::Stopped as i32);
    let restarted = stack
        .eventually(LIMIT, || async {
            let events = log.read(&again).await.ok()?;
            events
                .iter()
                .any(|e| matches!(e.event.body, Some(Body::RunStarted(_))))
                .then_some(events)
        })
        .await?;
    let respec = requested(&restarted)?;
    assert_eq!(respec.kind, "service");
    assert_eq!(respec.service, Some(spec));
    assert_eq!(
        ps_status(&stack, &again.to_string())?.as_deref(),
        Some("doing")
    );
    let out = stack.cli(&["stop", &again.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // A mistake in an Agentfile is refused with its file and line; nothing starts.
    let goals_before = stack.stream_messages(streams::GOALS).await?;
    let bad = stack.root().join("Agentfile.bad");
    std::fs::write(
        &bad,
        "GOAL \"Watch\"\nSCHEDULE \"*/2 * * * * * *\"\nSCHEDULE \"61 * * * *\"\n",
    )?;
    let out = stack.cli(&["serve", bad.to_str().context("utf-8")?])?;
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr
            .contains(&format!("{}:3: SCHEDULE: `61 * * * *`", bad.display())),
        "{}",
        out.stderr
    );
    let out = stack.cli(&["serve", "--goal", "x", "--listen", "nowhere"])?;
    assert_eq!(out.code, Some(125));
    assert!(
        out.stderr.contains("`nowhere` is not an address"),
        "{}",
        out.stderr
    );
    assert_eq!(stack.stream_messages(streams::GOALS).await?, goals_before);
    Ok(())
}

/// A client with no API key: listeners check their own secrets.
fn plain() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// Signs `body` with the Standard Webhooks Python library and POSTs it to `url`:
/// the answer's status and body.
async fn send_signed(
    url: &str,
    secret: &str,
    id: &str,
    body: &str,
    skew_secs: i64,
    tamper: bool,
) -> Result<(u16, Value)> {
    let out = tokio::process::Command::new(dispatch_testkit::mcp_servers().join("venv/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/mcp/webhook_sender.py"
        ))
        .args([
            url,
            secret,
            id,
            body,
            &skew_secs.to_string(),
            if tamper { "tamper" } else { "honest" },
        ])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "webhook_sender.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    let status = answer["status"].as_u64().context("a status")? as u16;
    let body =
        serde_json::from_str(answer["body"].as_str().unwrap_or("null")).unwrap_or(Value::Null);
    Ok((status, body))
}

async fn wake_payload(stack: &Stack, run: &str) -> Result<(RunRequested, Value)> {
    let log = stack.log().await?;
    let run: RunId = run.parse()?;
    let requested = stack
        .eventually(LIMIT, || async {
            requested(&log.read(&run).await.ok()?).ok()
        })
        .await?;
    let payload = serde_json::from_str(&requested.payload)?;
    Ok((requested, payload))
}

#[tokio::test]
async fn a_bound_listener_answers_each_case_as_specified_and_never_keeps_the_secret() -> Result<()>
{
    let mut stack = Stack::start(&["ledger", "dispatcher", "ingress"]).await?;
    let out = stack.cli(&[
        "serve",
        "--goal",
        "Hook errand",
        "--listen",
        "127.0.0.1:0",
        "--listen-path",
        "/hook",
        "--listen-method",
        "post",
        "--listen-shared-secret",
        SECRET,
        "--listen-max-body-bytes",
        "64",
        "--listen-max-header-bytes",
        "1024",
    ])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let service = out.stdout.trim().to_owned();
    let bound = stack
        .eventually(LIMIT, || async {
            let view = inspect(&stack, &service).ok()?;
            let addr = view["service"]["listeners"][0]["bound_addr"].as_str()?;
            (!addr.is_empty()).then(|| addr.to_owned())
        })
        .await?;
    let url = |path: &str| format!("http://{bound}{path}");
    let client = plain()?;

    // 202 with the secret in either header; each request is a wake of its own.
    let mut woken = Vec::new();
    for (name, value) in [
        ("x-dispatch-secret", SECRET.to_owned()),
        ("authorization", format!("Bearer {SECRET}")),
    ] {
        let answer = client
            .post(url("/hook?source=test"))
            .header(name, value)
            .header("x-github-event", "issues")
            .body(r#"{"n": 1}"#)
            .send()
            .await?;
        assert_eq!(answer.status(), 202);
        let body: Value = answer.json().await?;
        woken.push(body["run_id"].as_str().context("a run id")?.to_owned());
    }
    let (child, payload) = wake_payload(&stack, &woken[0]).await?;
    assert_eq!(
        (
            child.origin.as_str(),
            child.kind.as_str(),
            child.wake.as_str()
        ),
        ("automation", "heartbeat", "webhook")
    );
    assert_eq!(child.parent_run_id, service);
    assert_eq!(payload["method"], "POST");
    assert_eq!(payload["target"], "/hook?source=test");
    assert_eq!(payload["listener"], bound.as_str());
    assert_eq!(payload["body"], r#"{"n": 1}"#);
    assert_eq!(payload["headers"]["x-github-event"], "issues");
    assert_eq!(payload["headers"]["x-dispatch-secret"], "********");
    assert!(
        payload["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    let (_, payload) = wake_payload(&stack, &woken[1]).await?;
    assert_eq!(payload["headers"]["authorization"], "********");

    // Every refusal, each with its own status, and none makes a run.
    let goals_before = stack.stream_messages(streams::GOALS).await?;
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (client.post(url("/hook")).body("{}"), 401),
        (
            client
                .post(url("/hook"))
                .header("x-dispatch-secret", "wrong")
                .body("{}"),
            401,
        ),
        (
            client
                .post(url("/hook"))
                .header("authorization", "Basic abc")
                .body("{}"),
            401,
        ),
        (
            client
                .post(url("/elsewhere"))
                .header("x-dispatch-secret", SECRET),
            404,
        ),
        (
            client.get(url("/hook")).header("x-dispatch-secret", SECRET),
            405,
        ),
        (
            client
                .post(url("/hook"))
                .header("x-dispatch-secret", SECRET)
                .body("x".repeat(65)),
            413,
        ),
        (
            client
                .post(url("/hook"))
                .header("x-dispatch-secret", SECRET)
                .header("x-padding", "p".repeat(2000)),
            431,
        ),
    ];
    for (request, status) in cases {
        let answer = request.send().await?;
        let allow = answer.headers().get("allow").cloned();
        assert_eq!(
            answer.status().as_u16(),
            status,
            "{:?}",
            answer.text().await
        );
        if status == 405 {
            assert_eq!(allow.as_ref().and_then(|a| a.to_str().ok()), Some("POST"));
        }
    }
    assert_eq!(stack.stream_messages(streams::GOALS).await?, goals_before);
    // Malformed HTTP is answered 400 by the server itself.
    let mut raw = tokio::net::TcpStream::connect(&bound).await?;
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"THIS IS NOT HTTP\r\n\r\n").await?;
    let mut head = vec![0; 64];
    let n = tokio::io::AsyncReadExt::read(&mut raw, &mut head).await?;
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );

    // The service's log has the two wakes, by its first listener; inspect counts them.
    let log = stack.log().await?;
    let service_id: RunId = service.parse()?;
    let woke = stack
        .eventually(LIMIT, || async {
            let woke = wakes(&log.read(&service_id).await.ok()?);
            (woke.len() >= 2).then_some(woke)
        })
        .await?;
    assert_eq!(woke.len(), 2, "{woke:?}");
    assert!(woke.iter().all(|w| w.wake == "webhook" && w.listener == 1));
    let view = inspect(&stack, &service)?;
    let listener = &view["service"]["listeners"][0];
    assert_eq!(listener["requests_handled"], 2);
    assert!(listener["last_request_at_ms"].as_i64().is_some());

    // 500 when the wake cannot be stored (NATS is down), and it serves again after.
    stack.nats.kill().await?;
    let answer = client
        .post(url("/hook"))
        .header("x-dispatch-secret", SECRET)
        .body("{}")
        .send()
        .await?;
    assert_eq!(answer.status(), 500);
    stack.nats.restart().await?;
    stack
        .eventually(LIMIT, || async {
            let answer = client
                .post(url("/hook"))
                .header("x-dispatch-secret", SECRET)
                .body("{}")
                .send()
                .await
                .ok()?;
            (answer.status() == 202).then_some(())
        })
        .await?;

    // Stopped, the service's listener closes; the secret was never stored anywhere.
    let out = stack.cli(&["stop", &service])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    stack
        .eventually(LIMIT, || async {
            client
                .post(url("/hook"))
                .send()
                .await
                .is_err()
                .then_some(())
        })
        .await?;
    for dir in [stack.nats.store_dir(), stack.root().to_path_buf()] {
        assert_eq!(
            dispatch_tests::files_holding(&dir, SECRET.as_bytes(), &dir.join("none")),
            Vec::<String>::new(),
            "the secret is stored nowhere"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_hook_takes_standard_webhooks_signed_by_the_python_library_once_per_id() -> Result<()> {
    let stack = Stack::start(&["ledger", "dispatcher", "ingress"]).await?;
    let key_path = dispatch_secrets::key_path(stack.root());
    let key = dispatch_secrets::Key::load_or_create(&key_path)?;
    let secrets = dispatch_secrets::Store::open(&stack.bus, key_path, Some(key)).await?;
    let signing = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::now_v7().as_bytes())
    );
    secrets.set("WEBHOOK_GITHUB", &signing).await?;
    let out = stack.cli(&[
        "serve",
        "--goal",
        "Signed errand",
        "--hook",
        "acme/triage/github",
        "--listen-signing-secret",
        "WEBHOOK_GITHUB",
    ])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("started"), "{}", out.stderr);
    let service = out.stdout.trim().to_owned();
    stack
        .eventually(LIMIT, || async {
            (inspect(&stack, &service).ok()?["status"] == "doing").then_some(())
        })
        .await?;
    // A second service on the same hook is refused, and `serve` says so.
    let taken = stack.cli(&[
        "serve",
        "--goal",
        "Same hook",
        "--hook",
        "acme/triage/github",
        "--listen-signing-secret",
        "WEBHOOK_GITHUB",
    ])?;
    assert_ne!(taken.code, Some(0), "{taken:?}");
    assert!(taken.stderr.contains("was refused"), "{}", taken.stderr);
    assert!(!taken.stderr.contains("started"), "{}", taken.stderr);
    let hook = stack.url("/hooks/acme/triage/github");
    let body = r#"{"action": "opened"}"#;

    // Signed by the library: accepted; the same webhook-id again is the same run.
    let (status, first) = send_signed(&hook, &signing, "msg_1", body, 0, false).await?;
    assert_eq!(status, 202, "{first}");
    // A sender re-signs each retry with a new timestamp: still the same delivery.
    for skew in [-3, -90] {
        let (status, again) = send_signed(&hook, &signing, "msg_1", body, skew, false).await?;
        assert_eq!(status, 202, "{again}");
        assert_eq!(first["run_id"], again["run_id"], "one run per webhook-id");
    }
    let (status, other) = send_signed(&hook, &signing, "msg_2", body, 0, false).await?;
    assert_eq!(status, 202);
    assert_ne!(other["run_id"], first["run_id"]);
    let (child, payload) = wake_payload(&stack, first["run_id"].as_str().context("id")?).await?;
    assert_eq!(child.origin, "automation");
    assert_eq!(payload["listener"], "/hooks/acme/triage/github");
    assert_eq!(payload["body"], body);
    assert_eq!(payload["headers"]["webhook-signature"], "********");
    assert_eq!(payload["headers"]["webhook-id"], "msg_1");

    // Tampered, signed with another key, or stale: refused.
    let wrong = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"another key entirely")
    );
    for (secret, skew, tamper) in [
        (signing.as_str(), 0, true),
        (wrong.as_str(), 0, false),
        (signing.as_str(), -600, false),
        (signing.as_str(), 600, false),
    ] {
        let (status, answer) = send_signed(&hook, secret, "msg_3", body, skew, tamper).await?;
        assert_eq!(status, 401, "{secret} {skew} {tamper}: {answer}");
    }
    let unsigned = plain()?.post(&hook).body(body).send().await?;
    assert_eq!(unsigned.status(), 401);

    // Two wakes in the service's log: the retries made none.
    let log = stack.log().await?;
    let service_id: RunId = service.parse()?;
    stack
        .eventually(LIMIT, || async {
            (wakes(&log.read(&service_id).await.ok()?).len() >= 2).then_some(())
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wakes(&log.read(&service_id).await?).len(), 2);
    let mut stored: Vec<String> = wake_goals(&stack, &service)
        .await?
        .into_iter()
        .map(|g| g.run_id)
        .collect();
    stored.dedup();
    assert_eq!(stored.len(), 2, "{stored:?}");

    // A service's schedules are Dispatch's to make, not an API client's.
    let forged = stack
        .http
        .post(stack.url("/v1/schedules"))
        .json(&serde_json::json!({
            "expression": "*/2 * * * * * *",
            "goal": "Not the service's goal",
            "service_run_id": service,
        }))
        .send()
        .await?;
    assert_eq!(forged.status(), 400);

    // No root webhook, no unknown hook; and none once the service has ended.
    for path in ["/hooks", "/hooks/acme/triage", "/hooks/acme/triage/gitlab"] {
        let answer = plain()?.post(stack.url(path)).body(body).send().await?;
        assert_eq!(answer.status(), 404, "{path}");
    }
    let out = stack.cli(&["stop", &service])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let (status, _) = send_signed(&hook, &signing, "msg_4", body, 0, false).await?;
    assert_eq!(status, 404);

    // A chat message is a run of its conversation, recorded with origin `chat`.
    let answer = stack
        .http
        .post(stack.url("/v1/conversations/chat-7/messages"))
        .json(&serde_json::json!({"text": "Chat errand"}))
        .send()
        .await?;
    assert_eq!(answer.status(), 202);
    let run: Value = answer.json().await?;
    let chats = stack
        .eventually(LIMIT, || async {
            let ps = stack
                .cli(&["ps", "-a", "--filter", "origin=chat", "--format", "json"])
                .ok()?;
            let runs: Vec<Value> = serde_json::from_str(&ps.stdout).ok()?;
            (!runs.is_empty()).then_some(runs)
        })
        .await?;
    assert_eq!(chats.len(), 1);
    assert_eq!(chats[0]["run_id"], run["run_id"]);
    assert_eq!(chats[0]["conversation_id"], "chat-7");
    let bad = stack
        .http
        .post(stack.url("/v1/conversations/a.b/messages"))
        .json(&serde_json::json!({"text": "x"}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    Ok(())
}

#[tokio::test]
async fn a_bound_listener_moves_to_another_ingress_copy_when_its_holder_dies() -> Result<()> {
    let mut stack = Stack::start(&["ledger", "dispatcher", "ingress", "ingress"]).await?;
    let out = stack.cli(&[
        "serve",
        "--goal",
        "Moving errand",
        "--listen",
        "127.0.0.1:0",
        "--listen-shared-secret",
        SECRET,
    ])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let service: RunId = out.stdout.trim().parse()?;
    let bucket = stack
        .bus
        .jetstream()
        .get_key_value(streams::LISTENERS_BUCKET)
        .await?;
    let key = dispatch_runlog::service::listener_key(&service, 1);
    let held = |bucket: kv::Store| {
        let key = key.clone();
        async move {
            let entry = bucket.get(&key).await.ok()??;
            let entry = <ListenerEntry as prost::Message>::decode(entry.as_ref()).ok()?;
            (!entry.bound_addr.is_empty()).then_some((entry.bound_by, entry.bound_addr))
        }
    };
    let (holder, addr) = stack.eventually(LIMIT, || held(bucket.clone())).await?;
    let client = plain()?;
    let post = |addr: String| {
        client
            .post(format!("http://{addr}/"))
            .header("x-dispatch-secret", SECRET)
            .body("{}")
            .send()
    };
    assert_eq!(post(addr.clone()).await?.status(), 202);
    // Exactly one copy serves it: the holder.
    let instance = holder.strip_prefix("ingress/").context("an ingress copy")?;
    let copy = stack
        .services
        .iter_mut()
        .find(|s| s.instance == instance)
        .context("the holder is one of the copies")?;
    copy.kill().await?;
    let (taker, moved) = stack
        .eventually(LIMIT, || async {
            let (by, at) = held(bucket.clone()).await?;
            (by != holder).then_some((by, at))
        })
        .await?;
    assert_ne!(taker, holder);
    let answer = stack
        .eventually(LIMIT, || async { post(moved.clone()).await.ok() })
        .await?;
    assert_eq!(answer.status(), 202);
    // Both requests woke the service, one through each copy.
    let log = stack.log().await?;
    stack
        .eventually(LIMIT, || async {
            (wakes(&log.read(&service).await.ok()?).len() == 2).then_some(())
        })
        .await?;
    Ok(())
}
