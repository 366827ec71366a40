//! Only Dispatch writes to Dispatch's bus. Each forgery a local process could try is
//! replayed against a stack started the way `dispatch up` starts it (every process with
//! its own nkey and subject permissions), and shown refused by the server itself:
//! - no credentials, or a key the server does not know: no connection at all;
//! - with the credentials of a service that has no business doing it (the HTTP-facing
//!   ingress first of all): appending to a live run, writing a sealed run, sending a
//!   tool command, recording a removal, answering the ledger's queries, purging or
//!   deleting the log.
//!
//! What an identity that may write (the admin, or a stolen service key) can still do
//! is bounded by the seals: see `trust.rs`, whose forgeries are written as the admin.

use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        raw.publish_refused(subject::run(&live).as_str(), stop.encode_to_vec())
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
            .publish_refused(subject::run(&forged).as_str(), event.encode_to_vec())
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
