//! Only Dispatch writes to Dispatch's bus. Each forgery a local process could try is
//! replayed against a stack started the way `dispatch up` starts it (every process with
//! its own nkey and subject permissions), and shown refused by the server itself:
//! - no credentials, or a key the server does not know: no connection at all;
//! - with the credentials of a service that has no business doing it (the HTTP-facing
//!   ingress first of all): appending to a live run, writing a sealed run, sending a
//!   tool command, recording a removal, answering the ledger's queries, purging or
//!   deleting the log.
//!
//! What a service's own key can write is bounded by its role: each writer role appends
//! on its own subject of a run, and readers refuse any event its role may not write
//! (`forgeries_with_each_services_own_key_are_refused_or_caught`). What the admin can
//! write is bounded by the seals: see `trust.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_bus::subject::LogWriter;
use dispatch_bus::{Identity, RunId, subject};
use dispatch_proto::command::v1::CallTool;
use dispatch_proto::ledger::v1::RunsRemoved;
use dispatch_proto::run::v1::{
    RunFinished, RunRequested, RunStatus, StopRequested, run_event::Body,
};
use dispatch_runlog::chain;
use dispatch_runlog::seal::Sealer;
use dispatch_tests::{Stack, forged_event};
use prost::Message as _;

const LIMIT: Duration = Duration::from_secs(60);
const SLOW: &str =
    "#+TITLE: Slow\n* TODO Sleep\n  - call: test.sleep {\"ms\": 30000}\n  :done-when: true\n";

/// A raw NATS client signed in as `identity` that collects the server's complaints.
struct Raw {
    client: dispatch_bus::async_nats::Client,
    complaints: Arc<Mutex<Vec<String>>>,
}

impl Raw {
    async fn connect(stack: &Stack, identity: Identity) -> anyhow::Result<Self> {
        let seed = std::fs::read_to_string(stack.nats.seed(identity))?;
        let complaints = Arc::new(Mutex::new(Vec::new()));
        let seen = complaints.clone();
        let client = dispatch_bus::async_nats::ConnectOptions::with_nkey(seed.trim().into())
            .custom_inbox_prefix(identity.inbox_prefix())
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let dispatch_bus::async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(stack.nats.url())
            .await?;
        Ok(Self { client, complaints })
    }

    /// Publishes and waits for the server to refuse it.
    async fn publish_refused(&self, subject: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(subject.to_owned(), payload.into())
            .await?;
        self.client.flush().await?;
        self.refused("Publish", subject).await
    }

    /// Waits for the server's permissions violation naming `subject`.
    async fn refused(&self, what: &str, subject: &str) -> anyhow::Result<()> {
        let expected = format!("Permissions Violation for {what} to \"{subject}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .complaints
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.contains(&expected))
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the server did not refuse {what} to {subject}; it said {:?}",
                    self.complaints.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A stack running a run whose 30-second call has started: a live run to forge against.
async fn stack_with_a_live_call() -> anyhow::Result<(Stack, RunId)> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    stack.add("ingress").await?;
    let live = stack.submit(SLOW, "default", 0).await?;
    stack
        .wait_for_event(live, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    Ok((stack, live))
}

#[tokio::test]
async fn a_process_without_a_known_key_cannot_connect() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let url = stack.nats.url();
    let none = dispatch_bus::Bus::connect(&url, Identity::Cli, &dispatch_bus::Credentials::None)
        .await
        .err()
        .expect("no credentials, no connection");
    assert_eq!(none.kind(), dispatch_bus::ErrorKind::Denied, "{none}");
    assert!(none.to_string().contains("refused"), "{none}");

    let strangers = tempfile::tempdir()?;
    dispatch_bus::auth::ensure_seeds(strangers.path())?;
    let stranger = dispatch_bus::Credentials::nkey_file(&dispatch_bus::auth::seed_path(
        strangers.path(),
        Identity::Cli,
    ))?;
    let unknown = dispatch_bus::Bus::connect(&url, Identity::Cli, &stranger)
        .await
        .err()
        .expect("an unknown key, no connection");
    assert_eq!(unknown.kind(), dispatch_bus::ErrorKind::Denied, "{unknown}");

    // The CLI, run outside the workspace with no key, says what to do.
    let out = std::process::Command::new(dispatch_testkit::bin_dir().join("dispatch"))
        .args(["ps"])
        .env("NATS_URL", &url)
        .env("DISPATCH_WORKSPACE", tempfile::tempdir()?.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains(".dispatch/auth/"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn every_forgery_is_refused_by_the_server() -> anyhow::Result<()> {
    let (stack, live) = stack_with_a_live_call().await?;
    let events_before = stack.log().await?.read(&live).await?.len();

    // Identities that are not writers of run logs, commands or removals.
    let ingress = Raw::connect(&stack, Identity::Ingress).await?;
    let ledger = Raw::connect(&stack, Identity::Ledger).await?;

    // 1. Append an event to a live run.
    let stop = forged_event(
        &live,
        Body::StopRequested(StopRequested {
            grace_ms: 0,
            force: true,
            requested_by: "forger".into(),
        }),
    );
    for raw in [&ingress, &ledger] {
        raw.publish_refused(
            dispatch_tests::subject_of(&stop).as_str(),
            stop.encode_to_vec(),
        )
        .await?;
    }

    // 2. A whole sealed run, as it would be shown `done`.
    let forged = RunId::new();
    let mut run = vec![
        forged_event(
            &forged,
            Body::RunRequested(RunRequested {
                goal: "forged".into(),
                conversation_id: "default".into(),
                timeout_ms: 0,
                origin: "forged".into(),
                callback_url: String::new(),
                payload: String::new(),
                kind: String::new(),
                ..Default::default()
            }),
        ),
        forged_event(
            &forged,
            Body::RunFinished(RunFinished {
                status: RunStatus::Done as i32,
                reason: "workflow finished".into(),
                summary: "all good".into(),
                tally: vec![],
                ..Default::default()
            }),
        ),
    ];
    let elsewhere = tempfile::tempdir()?;
    chain::link(
        &mut run,
        Some(&Sealer::load_or_create(&elsewhere.path().join("key"))?),
    );
    for event in &run {
        ingress
            .publish_refused(
                dispatch_tests::subject_of(event).as_str(),
                event.encode_to_vec(),
            )
            .await?;
    }

    // 3. A tool command for connectors to execute.
    let call = CallTool {
        run_id: live.to_string(),
        call_id: "forged-call".into(),
        tool: "test.count".into(),
        args_json: r#"{"key":"forged"}"#.into(),
        ..Default::default()
    };
    for identity in [
        Identity::Ingress,
        Identity::Ledger,
        Identity::Policy,
        Identity::Connectors,
    ] {
        let raw = Raw::connect(&stack, identity).await?;
        raw.publish_refused(subject::cmd::TOOL, call.encode_to_vec())
            .await?;
    }

    // 4. A removal of the live run (the ledger would delete its directory).
    let removed = RunsRemoved {
        run_ids: vec![live.to_string()],
        time_unix_ms: 1,
        trails: true,
    };
    for identity in [
        Identity::Ingress,
        Identity::Dispatcher,
        Identity::Connectors,
    ] {
        let raw = Raw::connect(&stack, identity).await?;
        raw.publish_refused(subject::REMOVED, removed.encode_to_vec())
            .await?;
    }

    // 5. Joining the ledger's query group to answer /v1/runs with nothing.
    let _sub = ingress
        .client
        .queue_subscribe(subject::query::RUNS, subject::query::QUERY_GROUP.into())
        .await?;
    ingress.client.flush().await?;
    ingress
        .refused("Subscription", subject::query::RUNS)
        .await?;

    // 6. Purging or deleting the log, even as the admin.
    let admin = Raw::connect(&stack, Identity::Admin).await?;
    for api in ["STREAM.PURGE", "STREAM.DELETE", "STREAM.MSG.DELETE"] {
        let subject = format!("$JS.API.{api}.{}", dispatch_bus::streams::RUNS);
        for raw in [&ingress, &admin] {
            raw.publish_refused(&subject, b"{}".to_vec()).await?;
        }
    }

    // Nothing of it landed: the live run's log is as it was, the forged run is not in
    // the log, nothing was counted, the run's directory is there, and /v1/runs still
    // answers with the live run.
    let log = stack.log().await?;
    assert_eq!(log.read(&live).await?.len(), events_before);
    assert!(log.read(&forged).await?.is_empty());
    assert!(stack.counted("forged").is_empty());
    assert!(dispatch_service::layout::run_dir(stack.root(), &live).is_dir());
    let runs = stack.get_json("/v1/runs?all=true").await?;
    let ids: Vec<&str> = runs["runs"]
        .as_array()
        .expect("a list of runs")
        .iter()
        .filter_map(|r| r["run_id"].as_str())
        .collect();
    assert!(ids.contains(&live.to_string().as_str()), "{runs}");
    assert!(!ids.contains(&forged.to_string().as_str()), "{runs}");
    Ok(())
}

/// A tool command names where in the log its call was requested, so the connectors
/// read a few events rather than the whole log. Pointing it at another call's request
/// gains a sender nothing: the connectors then read the whole log, find no request
/// for the call, and execute nothing.
#[tokio::test]
async fn a_tool_command_pointing_elsewhere_in_the_log_executes_nothing() -> anyhow::Result<()> {
    let (stack, live) = stack_with_a_live_call().await?;
    let events = stack.log().await?.read(&live).await?;
    let request = events
        .iter()
        .find(|e| matches!(e.event.body, Some(Body::ToolCallRequested(_))))
        .expect("the sleep call was requested");

    let dispatcher = Raw::connect(&stack, Identity::Dispatcher).await?;
    let smuggled = CallTool {
        run_id: live.to_string(),
        call_id: "smuggled".into(),
        tool: "test.count".into(),
        args_json: r#"{"key":"smuggled"}"#.into(),
        from_stream_seq: request.stream_seq,
    };
    dispatcher
        .client
        .publish(subject::cmd::TOOL, smuggled.encode_to_vec().into())
        .await?;
    dispatcher.client.flush().await?;
    let is_smuggled = |b: &Body| matches!(b, Body::ToolCallFailed(f) if f.call_id == "smuggled");
    stack.wait_for_event(live, LIMIT, is_smuggled).await?;
    let events = stack.log().await?.read(&live).await?;
    let failed = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ToolCallFailed(f)) if f.call_id == "smuggled" => Some(f.clone()),
            _ => None,
        })
        .expect("waited for it");
    assert!(failed.error.contains("never requested"), "{}", failed.error);
    assert!(
        stack.counted("smuggled").is_empty(),
        "the smuggled call ran"
    );
    Ok(())
}

/// The policy of the forgery test: counting and sleeping allowed, erasing sent to a
/// person.
const GATED: &str = r#"{"default": "deny", "rules": [
  {"name": "counting", "effect": "allow", "tools": ["test.count", "test.sleep"]},
  {"name": "erasing", "effect": "ask", "tools": ["test.erase"], "reason": "erasing needs a person"}
]}"#;

/// A plan of one leaf making one call.
fn one_call(call: &str) -> String {
    format!("#+TITLE: Forged\n* TODO Call\n  - call: {call}\n  :done-when: true\n")
}

/// The next event of `run_id`'s log as `role` would append it: linked to the log's
/// last event, hashed, claiming `role`.
async fn next_of(
    stack: &Stack,
    run_id: RunId,
    role: dispatch_proto::run::v1::WriterRole,
    body: Body,
) -> anyhow::Result<dispatch_proto::run::v1::RunEvent> {
    let events = stack.log().await?.read(&run_id).await?;
    let last = events.last().expect("a started run");
    let mut event = forged_event(&run_id, body);
    event.seq = last.event.seq + 1;
    event.prev_hash = last.event.hash.clone();
    event.prev_stream_seq = last.stream_seq;
    event.role = role as i32;
    event.hash = chain::hash(&event).to_vec();
    Ok(event)
}

/// Appends `event` on `on`'s subject of its run with the bus of whoever holds `raw`,
/// as the holder of that identity's seed could: stored, or refused by the server.
async fn append_as(
    raw: &Raw,
    on: LogWriter,
    event: &dispatch_proto::run::v1::RunEvent,
) -> anyhow::Result<()> {
    let run_id: RunId = event.run_id.parse()?;
    let subject = subject::run(&run_id, on);
    let js = dispatch_bus::async_nats::jetstream::new(raw.client.clone());
    let mut headers = dispatch_bus::async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        event.prev_stream_seq.to_string().as_str(),
    );
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence-Subject",
        subject::run_log(&run_id).as_str(),
    );
    js.publish_with_headers(subject, headers, event.encode_to_vec().into())
        .await?
        .await?;
    Ok(())
}

/// The run's view until `done` says it has settled.
async fn view_until(
    stack: &Stack,
    run_id: RunId,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let path = format!("/v1/runs/{run_id}");
    stack
        .eventually(LIMIT, || async {
            let view = stack.get_json(&path).await.ok()?;
            done(&view).then_some(view)
        })
        .await
}

/// Every forgery the review made, each with the seed of a service that holds write
/// access to run logs but not for that kind: refused by the server where the subject
/// is not the holder's, shown `corrupt` (and never acted on) where it is; an event
/// after a seal is flagged and the run stays as sealed; a run no goal asked for ends.
#[tokio::test]
async fn forgeries_with_each_services_own_key_are_refused_or_caught() -> anyhow::Result<()> {
    use dispatch_proto::run::v1::{
        ApprovalResolved, Decision, PolicyDecided, RunStarted, ToolCallCompleted, WriterRole,
    };
    let mut stack = Stack::start(&["ledger"]).await?;
    let path = stack.root().join("gated.json");
    std::fs::write(&path, GATED)?;
    let policy = path.to_str().unwrap().to_owned();
    stack.add_with("policy", &["--policy", &policy]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    stack.add("dispatcher").await?;
    stack.add("ingress").await?;
    let connectors = Raw::connect(&stack, Identity::Connectors).await?;
    let policy_key = Raw::connect(&stack, Identity::Policy).await?;
    let dispatcher = Raw::connect(&stack, Identity::Dispatcher).await?;
    let cli = Raw::connect(&stack, Identity::Cli).await?;

    // 1. An approval "from policy", with connectors' key, for a run waiting on a person.
    let waiting = stack
        .submit(
            &one_call(r#"test.erase {"key": "forged-approval"}"#),
            "default",
            0,
        )
        .await?;
    stack
        .wait_for_event(waiting, LIMIT, |b| matches!(b, Body::ApprovalRequested(_)))
        .await?;
    let events = stack.log().await?.read(&waiting).await?;
    let asked = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ApprovalRequested(a)) => Some(a.clone()),
            _ => None,
        })
        .expect("asked");
    let approve = Body::ApprovalResolved(ApprovalResolved {
        approval_id: asked.approval_id.clone(),
        call_id: asked.call_id.clone(),
        decision: Decision::Allow as i32,
        resolved_by: "policy".into(),
        ..Default::default()
    });
    // On policy's subject: the server refuses.
    let claimed = next_of(&stack, waiting, WriterRole::Policy, approve.clone()).await?;
    assert!(
        append_as(&connectors, LogWriter::Policy, &claimed)
            .await
            .is_err()
    );
    connectors
        .refused(
            "Publish",
            subject::run(&waiting, LogWriter::Policy).as_str(),
        )
        .await?;
    // On its own subject, claiming policy: stored, and the run shows corrupt.
    append_as(&connectors, LogWriter::Connectors, &claimed).await?;
    let view = view_until(&stack, waiting, |v| v["status"] == "corrupt").await?;
    let reason = view["corrupt"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("stored on the connectors subject"),
        "{view}"
    );

    // 2. A call's result, with policy's key, for a call that is running.
    let running = stack
        .submit(&one_call(r#"test.sleep {"ms": 30000}"#), "default", 0)
        .await?;
    stack
        .wait_for_event(running, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    let result = next_of(
        &stack,
        running,
        WriterRole::Policy,
        Body::ToolCallCompleted(ToolCallCompleted {
            call_id: "l0-t0-c0".into(),
            output: "FORGED OUTPUT".into(),
        }),
    )
    .await?;
    append_as(&policy_key, LogWriter::Policy, &result).await?;
    let view = view_until(&stack, running, |v| v["status"] == "corrupt").await?;
    assert!(
        view["corrupt"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("tool_call_completed event written by policy"),
        "{view}"
    );

    // 3. A decision allowing a call that waits for a person, with the dispatcher's key.
    let decided = stack
        .submit(
            &one_call(r#"test.erase {"key": "forged-decision"}"#),
            "default",
            0,
        )
        .await?;
    stack
        .wait_for_event(decided, LIMIT, |b| matches!(b, Body::ApprovalRequested(_)))
        .await?;
    let allow = next_of(
        &stack,
        decided,
        WriterRole::Dispatcher,
        Body::PolicyDecided(PolicyDecided {
            call_id: "l0-t0-c0".into(),
            decision: Decision::Allow as i32,
            rule: "counting".into(),
            ..Default::default()
        }),
    )
    .await?;
    append_as(&dispatcher, LogWriter::Dispatcher, &allow).await?;
    view_until(&stack, decided, |v| v["status"] == "corrupt").await?;

    // 4. A stop, with connectors' key on its subject (corrupt) and with the CLI's key,
    // which writes no run log at all (refused).
    let stopped = stack
        .submit(&one_call(r#"test.sleep {"ms": 30000}"#), "default", 0)
        .await?;
    stack
        .wait_for_event(stopped, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    let stop = next_of(
        &stack,
        stopped,
        WriterRole::Connectors,
        Body::StopRequested(StopRequested {
            grace_ms: 0,
            force: true,
            requested_by: "forger".into(),
        }),
    )
    .await?;
    for on in LogWriter::ALL {
        assert!(append_as(&cli, on, &stop).await.is_err(), "{on:?}");
    }
    append_as(&connectors, LogWriter::Connectors, &stop).await?;
    view_until(&stack, stopped, |v| v["status"] == "corrupt").await?;

    // None of it was acted on: nothing erased, no forged run ended `done` or `stopped`.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stack.counted("forged-approval").is_empty());
    assert!(stack.counted("forged-decision").is_empty());
    for run in [waiting, running, decided, stopped] {
        let view = stack.get_json(&format!("/v1/runs/{run}")).await?;
        assert_eq!(view["status"], "corrupt", "{view}");
    }

    // 5. An event after a genuine seal, with policy's key: flagged, the run stays done.
    let genuine = stack
        .submit(&one_call(r#"test.count {"key": "genuine"}"#), "default", 0)
        .await?;
    let sealed = stack.wait_finished(genuine, LIMIT).await?;
    let late = next_of(
        &stack,
        genuine,
        WriterRole::Policy,
        Body::PolicyDecided(PolicyDecided {
            call_id: "l0-t0-c0".into(),
            decision: Decision::Deny as i32,
            ..Default::default()
        }),
    )
    .await?;
    append_as(&policy_key, LogWriter::Policy, &late).await?;
    let view = view_until(&stack, genuine, |v| !v["tampered_after_seal"].is_null()).await?;
    assert_eq!(view["status"], "done", "{view}");
    assert_eq!(stack.log().await?.read(&genuine).await?, sealed);

    // 6. Ghosts, with the dispatcher's key: a run whose log starts without its request
    // is corrupt; one that starts with a request no goal names is ended.
    let headless = RunId::new();
    let mut started = forged_event(
        &headless,
        Body::RunStarted(RunStarted {
            owner: "forger".into(),
            deadline_unix_ms: i64::MAX,
            ..Default::default()
        }),
    );
    chain::link(std::slice::from_mut(&mut started), None);
    append_as(&dispatcher, LogWriter::Dispatcher, &started).await?;
    let view = view_until(&stack, headless, |v| v["status"] == "corrupt").await?;
    assert!(
        view["corrupt"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("starts with run_started"),
        "{view}"
    );

    let ghost = RunId::new();
    let mut log = [
        forged_event(
            &ghost,
            Body::RunRequested(RunRequested {
                goal: "nobody asked".into(),
                conversation_id: "default".into(),
                origin: "forged".into(),
                ..Default::default()
            }),
        ),
        forged_event(
            &ghost,
            Body::RunStarted(RunStarted {
                owner: "forger".into(),
                deadline_unix_ms: i64::MAX,
                ..Default::default()
            }),
        ),
    ];
    // Appended one by one, each naming where the one before it was stored.
    let js = dispatch_bus::async_nats::jetstream::new(dispatcher.client.clone());
    let (mut prev_hash, mut after) = (chain::GENESIS.to_vec(), 0);
    for (i, event) in log.iter_mut().enumerate() {
        event.seq = i as u64 + 1;
        event.prev_hash = prev_hash;
        event.prev_stream_seq = after;
        event.hash = chain::hash(event).to_vec();
        let ack = js
            .publish(
                subject::run(&ghost, LogWriter::Dispatcher),
                event.encode_to_vec().into(),
            )
            .await?
            .await?;
        (prev_hash, after) = (event.hash.clone(), ack.sequence);
    }
    let view = view_until(&stack, ghost, |v| v["status"] == "blocked").await?;
    assert!(
        view["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ghost:"),
        "{view}"
    );
    let ended = stack.wait_finished(ghost, LIMIT).await?;
    assert!(
        ended
            .last()
            .unwrap()
            .event
            .writer
            .starts_with("dispatcher/")
    );
    Ok(())
}

/// One message on the policy's subject that is not a version, with policy's own key:
/// the last good version stays in force, the policy service still starts, `policy
/// show` and `history` still answer (and say so), and the next `policy set` supersedes
/// it.
#[tokio::test]
async fn garbage_on_the_policy_stream_locks_nothing() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    let before = stack.cli(&["policy", "show", "--format", "json"])?;
    assert_eq!(before.code, Some(0), "{before:?}");
    let before: serde_json::Value = serde_json::from_str(&before.stdout)?;
    let policy = Raw::connect(&stack, Identity::Policy).await?;
    let js = dispatch_bus::async_nats::jetstream::new(policy.client.clone());
    js.publish(
        subject::POLICY_DOCUMENT,
        b"\xff\xff garbage".to_vec().into(),
    )
    .await?
    .await?;
    // A policy copy starting now starts, with the last good version.
    stack.service("policy")?.kill().await?;
    stack.services.retain(|s| s.name != "policy");
    stack.add("policy").await?;
    let show = stack.cli(&["policy", "show", "--format", "json"])?;
    assert_eq!(show.code, Some(0), "{show:?}");
    assert!(show.stderr.contains("1 damaged message"), "{show:?}");
    let shown: serde_json::Value = serde_json::from_str(&show.stdout)?;
    assert_eq!(shown["version"], before["version"]);
    let history = stack.cli(&["policy", "history", "--format", "json"])?;
    assert_eq!(history.code, Some(0), "{history:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&history.stdout)?;
    assert_eq!(rows.last().unwrap()["damaged"], true, "{rows:?}");
    // Decisions go on under the last good version...
    let run = stack
        .submit(
            &one_call(r#"test.count {"key": "still-decided"}"#),
            "default",
            0,
        )
        .await?;
    stack.add("dispatcher").await?;
    stack.wait_finished(run, LIMIT).await?;
    assert_eq!(stack.counted("still-decided").len(), 1);
    // ...and a change supersedes the damage.
    let file = stack.root().join("next.json");
    std::fs::write(&file, GATED)?;
    let set = stack.cli(&["policy", "set", file.to_str().unwrap()])?;
    assert_eq!(set.code, Some(0), "{set:?}");
    let after = stack.cli(&["policy", "show", "--format", "json"])?;
    assert!(!after.stderr.contains("damaged"), "{after:?}");
    let after: serde_json::Value = serde_json::from_str(&after.stdout)?;
    assert_eq!(after["version"], before["version"].as_u64().unwrap() + 1);
    Ok(())
}

/// Goals that name a run and little else, as a holder of a key that may submit goals
/// can store them: one that is no goal at all never shows; one that names its run but
/// nothing a run needs gets a run, ended `blocked` with the reason. Neither stays
/// `queued`.
#[tokio::test]
async fn a_goal_that_is_empty_or_names_only_its_run_never_stays_queued() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger", "ingress"]).await?;
    let cli = Raw::connect(&stack, Identity::Cli).await?;
    let js = dispatch_bus::async_nats::jetstream::new(cli.client.clone());
    let (empty, bare) = (RunId::new(), RunId::new());
    js.publish(subject::goal(&empty), Vec::new().into())
        .await?
        .await?;
    let only_id = dispatch_proto::command::v1::SubmitGoal {
        run_id: bare.to_string(),
        ..Default::default()
    };
    js.publish(subject::goal(&bare), only_id.encode_to_vec().into())
        .await?
        .await?;
    stack.add("dispatcher").await?;
    let view = view_until(&stack, bare, |v| v["status"] == "blocked").await?;
    assert!(
        view["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("rejected:"),
        "{view}"
    );
    stack.commands_drained(LIMIT).await?;
    let missing = stack
        .http
        .get(stack.url(&format!("/v1/runs/{empty}")))
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    let runs = stack.get_json("/v1/runs?all=true").await?;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["run_id"], bare.to_string());
    assert_eq!(runs[0]["status"], "blocked");
    Ok(())
}
