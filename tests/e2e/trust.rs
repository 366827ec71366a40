//! Seals that mean something: a run is trusted only if its log verifies and its seal is
//! by a trusted key. Forgeries written straight to the bus (as a process holding the
//! admin identity could) are shown `corrupt`, never `done`, everywhere.

use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{
    LeafStarted, RunEvent, RunFinished, RunRequested, RunStatus, run_event::Body,
};
use dispatch_runlog::chain;
use dispatch_runlog::seal::Sealer;
use dispatch_tests::Stack;
use prost::Message as _;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// A log of `bodies` with valid links and hashes, the terminal event sealed by `key`
/// (or not sealed at all).
fn forge(run_id: &RunId, bodies: Vec<Body>, key: Option<&Sealer>) -> Vec<RunEvent> {
    let mut events: Vec<RunEvent> = bodies
        .into_iter()
        .map(|body| dispatch_tests::forged_event(run_id, body))
        .collect();
    chain::link(&mut events, key);
    events
}

fn done_bodies(goal: &str) -> Vec<Body> {
    vec![
        Body::RunRequested(RunRequested {
            goal: goal.into(),
            conversation_id: "default".into(),
            timeout_ms: 0,
            origin: "forged".into(),
            callback_url: String::new(),
            payload: String::new(),
            kind: String::new(),
            ..Default::default()
        }),
        Body::RunFinished(RunFinished {
            status: RunStatus::Done as i32,
            reason: "workflow finished".into(),
            summary: "all good, honestly".into(),
            tally: vec![],
            ..Default::default()
        }),
    ]
}

async fn write(stack: &Stack, events: &[RunEvent]) -> anyhow::Result<()> {
    for event in events {
        stack
            .bus
            .append(
                dispatch_tests::subject_of(event),
                &event.event_id,
                None,
                event.encode_to_vec().into(),
            )
            .await?;
    }
    Ok(())
}

async fn view(stack: &Stack, run_id: &RunId, status: &str) -> anyhow::Result<Value> {
    let path = format!("/v1/runs/{run_id}");
    stack
        .eventually(LIMIT, || async {
            let view = stack.get_json(&path).await.ok()?;
            (view["status"] == status).then_some(view)
        })
        .await
}

#[tokio::test]
async fn forged_and_broken_logs_are_corrupt_everywhere() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger", "ingress"]).await?;
    // The workspace key exists, as `dispatch up` makes it; the forger has another.
    let ours = Sealer::load_or_create(&dispatch_service::layout::seal_key(stack.root()))?;
    let dir = tempfile::tempdir()?;
    let theirs = Sealer::load_or_create(&dir.path().join("key"))?;

    // 1. A whole run sealed by a key nobody trusts.
    let forged = RunId::new();
    write(
        &stack,
        &forge(&forged, done_bodies("Forged errand"), Some(&theirs)),
    )
    .await?;
    // 2. An unsealed terminal event.
    let unsealed = RunId::new();
    write(
        &stack,
        &forge(&unsealed, done_bodies("Unsealed errand"), None),
    )
    .await?;
    // 3. A genuine run, then an event appended after its seal: outside the record,
    // flagged, spoiling nothing.
    let late = RunId::new();
    let mut events = forge(&late, done_bodies("Genuine errand"), Some(&ours));
    let mut after_seal = RunEvent {
        event_id: RunId::new().to_string(),
        run_id: late.to_string(),
        seq: 3,
        prev_hash: events[1].hash.clone(),
        body: Some(Body::LeafStarted(LeafStarted {
            leaf: 0,
            title: "sneaked in".into(),
        })),
        ..Default::default()
    };
    after_seal.hash = chain::hash(&after_seal).to_vec();
    events.push(after_seal);
    write(&stack, &events).await?;
    // 4. A live run whose second event does not link to its first.
    let broken = RunId::new();
    let mut live = forge(
        &broken,
        vec![
            done_bodies("Live errand").remove(0),
            Body::LeafStarted(LeafStarted::default()),
        ],
        None,
    );
    live[1].prev_hash = vec![7; 32];
    live[1].hash = chain::hash(&live[1]).to_vec();
    write(&stack, &live).await?;

    let cases = [
        (forged, 2, "not a trusted key"),
        (unsealed, 2, "not sealed"),
        (broken, 2, "does not link"),
    ];
    for (run_id, seq, why) in cases {
        let view = view(&stack, &run_id, "corrupt").await?;
        assert_eq!(view["corrupt"]["seq"], seq, "{view}");
        assert!(
            view["corrupt"]["reason"].as_str().unwrap().contains(why),
            "{view}"
        );
        let inspect = stack.cli(&["inspect", &run_id.to_string()])?;
        assert!(
            inspect.stdout.contains("\"status\": \"corrupt\""),
            "{inspect:?}"
        );
        let wait = stack.cli(&["wait", &run_id.to_string()])?;
        assert_eq!(wait.code, Some(4), "wait on a corrupt run: {wait:?}");
        let replay = stack.cli(&["replay", &run_id.to_string()])?;
        assert_eq!(replay.code, Some(1), "{replay:?}");
        assert!(replay.stderr.contains(why), "{}", replay.stderr);
    }
    // The genuine run stands as it was sealed; what follows is flagged.
    let late_view = view(&stack, &late, "done").await?;
    assert_eq!(late_view["last_seq"], 2);
    assert_eq!(
        late_view["tampered_after_seal"]["messages"], 1,
        "{late_view}"
    );
    let wait = stack.cli(&["wait", &late.to_string()])?;
    assert_eq!(wait.code, Some(0), "{wait:?}");
    let replay = stack.cli(&["replay", &late.to_string()])?;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    assert!(replay.stdout.contains("tampered after seal"), "{replay:?}");

    let listed = stack.get_json("/v1/runs?all=true").await?;
    for run in listed["runs"].as_array().unwrap() {
        let expected = if run["run_id"] == late.to_string() {
            "done"
        } else {
            "corrupt"
        };
        assert_eq!(run["status"], expected, "{run}");
    }
    let ps = stack.cli(&["ps", "-a"])?;
    assert_eq!(ps.stdout.matches("corrupt").count(), 3, "{}", ps.stdout);
    let tasks = stack
        .eventually(LIMIT, || async {
            let text = std::fs::read_to_string(stack.root().join("TASKS.org")).ok()?;
            (text.matches("* CORRUPT ").count() == 3).then_some(text)
        })
        .await?;
    assert_eq!(tasks.matches("* DONE").count(), 1, "{tasks}");
    Ok(())
}

#[tokio::test]
async fn key_and_verify_find_the_workspace_and_never_make_a_key() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let cli = dispatch_testkit::bin_dir().join("dispatch");
    let nowhere = tempfile::tempdir()?;
    let out = std::process::Command::new(&cli)
        .arg("key")
        .current_dir(nowhere.path())
        .env_remove("DISPATCH_WORKSPACE")
        .output()?;
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no Dispatch workspace"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !nowhere.path().join(".dispatch").exists(),
        "`dispatch key` made a key where there is no workspace"
    );

    // Inside a workspace, from a subdirectory: found by walking up.
    let sealer = Sealer::load_or_create(&dispatch_service::layout::seal_key(stack.root()))?;
    let sub = stack.root().join("workflows/deeper");
    std::fs::create_dir_all(&sub)?;
    let out = std::process::Command::new(&cli)
        .arg("key")
        .current_dir(&sub)
        .env_remove("DISPATCH_WORKSPACE")
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sealer.public_hex()
    );

    // `verify` says which key it trusted.
    let run_id = RunId::new();
    let events = forge(&run_id, done_bodies("Offline check"), Some(&sealer));
    let stored: Vec<dispatch_runlog::StoredEvent> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| dispatch_runlog::StoredEvent {
            event,
            stream_seq: i as u64 + 1,
            stored_as: dispatch_bus::subject::LogWriter::Dispatcher,
        })
        .collect();
    let trail = sub.join("_steps.jsonl");
    std::fs::write(&trail, dispatch_runlog::steps::export(&stored))?;
    let out = std::process::Command::new(&cli)
        .args(["verify", "_steps.jsonl"])
        .current_dir(&sub)
        .env_remove("DISPATCH_WORKSPACE")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("trusted: the workspace key"), "{stdout}");

    // Outside any workspace, with no key given, verify refuses to guess.
    std::fs::copy(&trail, nowhere.path().join("_steps.jsonl"))?;
    let out = std::process::Command::new(&cli)
        .args(["verify", "_steps.jsonl"])
        .current_dir(nowhere.path())
        .env_remove("DISPATCH_WORKSPACE")
        .output()?;
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public-key"));
    Ok(())
}
