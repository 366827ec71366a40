//! A verifiable audit trail: sealed logs, exported steps, replay and offline verify.

use std::time::Duration;

use dispatch_proto::run::v1::{LeafStarted, RunEvent, WriterRole, run_event::Body};
use dispatch_tests::{ALL, Stack};
use prost::Message as _;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn finished_runs_are_sealed_exported_and_verifiable_offline() -> anyhow::Result<()> {
    let stack = Stack::start(&ALL).await?;
    let run_id = stack.submit("Audit this errand", "default", 0).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let last = &events.last().unwrap().event;
    let key = stack.cli(&["key"])?;
    assert_eq!(key.code, Some(0));
    assert_eq!(
        key.stdout.trim(),
        hex::encode(&last.signer),
        "sealed by the workspace key"
    );
    assert_eq!(last.signature.len(), 64);

    let steps = stack
        .root()
        .join(format!(".dispatch/runs/{run_id}/_steps.jsonl"));
    let trail = stack
        .eventually(LIMIT, || async {
            let text = std::fs::read_to_string(&steps).ok()?;
            (text.lines().count() == events.len()).then_some(text)
        })
        .await?;
    let ok = stack.cli(&["verify", steps.to_str().unwrap()])?;
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    assert!(
        ok.stdout
            .contains(&format!("verified {} events of run {run_id}", events.len())),
        "{}",
        ok.stdout
    );

    // Edit one line: verify fails and names that sequence.
    let lines: Vec<&str> = trail.lines().collect();
    for (line, from, to) in [
        (0, "Audit this errand", "Audit that errand"),
        (4, "\"seq\":5", "\"seq\":6"),
    ] {
        let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        assert!(
            edited[line].contains(from),
            "{from:?} not in line {}",
            line + 1
        );
        edited[line] = edited[line].replacen(from, to, 1);
        let path = stack.root().join("edited.jsonl");
        std::fs::write(&path, edited.join("\n") + "\n")?;
        let bad = stack.cli(&["verify", path.to_str().unwrap()])?;
        assert_eq!(bad.code, Some(1), "{bad:?}");
        assert!(
            bad.stderr
                .contains(&format!("verification failed at seq {}", line + 1)),
            "{}",
            bad.stderr
        );
    }
    // A trail checked against another key is refused at the seal.
    let stranger = "11".repeat(32);
    let wrong = stack.cli(&["verify", "--public-key", &stranger, steps.to_str().unwrap()])?;
    assert_eq!(wrong.code, Some(1));
    assert!(
        wrong.stderr.contains("which is not a trusted key"),
        "{}",
        wrong.stderr
    );

    // Replay rebuilds the run's views and its trail from the log.
    std::fs::remove_file(&steps)?;
    let replay = stack.cli(&["replay", &run_id.to_string()[..10]])?;
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    assert!(
        replay.stdout.contains("hash chain verified, sealed by"),
        "{}",
        replay.stdout
    );
    assert!(
        replay.stdout.contains("views rebuilt (done)"),
        "{}",
        replay.stdout
    );
    assert_eq!(std::fs::read_to_string(&steps)?, trail);
    Ok(())
}

#[tokio::test]
async fn replay_names_the_first_event_that_breaks_the_chain() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    // A run that sleeps in its call: still live, so the forgery lands inside its record.
    let run_id = stack
        .submit(
            "#+TITLE: Slow\n* TODO Sleep\n  - call: test.sleep {\"ms\": 30000}\n  :done-when: true\n",
            "default",
            0,
        )
        .await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    let events = stack.log().await?.read(&run_id).await?;
    // A rogue writer appends an event that does not link to the log.
    let forged = RunEvent {
        event_id: "forged".into(),
        run_id: run_id.to_string(),
        seq: events.len() as u64 + 1,
        prev_hash: vec![7; 32],
        hash: vec![7; 32],
        role: WriterRole::Dispatcher as i32,
        body: Some(Body::LeafStarted(LeafStarted {
            leaf: 9,
            title: "forged".into(),
        })),
        ..Default::default()
    };
    stack
        .bus
        .append(
            dispatch_tests::subject_of(&forged),
            "forged",
            None,
            forged.encode_to_vec().into(),
        )
        .await?;
    let replay = stack.cli(&["replay", &run_id.to_string()])?;
    assert_eq!(replay.code, Some(1), "{replay:?}");
    assert!(
        replay.stderr.contains(&format!(
            "event seq {} fails verification",
            events.len() + 1
        )),
        "{}",
        replay.stderr
    );
    Ok(())
}

#[tokio::test]
async fn an_event_after_the_seal_spoils_nothing_and_is_flagged() -> anyhow::Result<()> {
    let stack = Stack::start(&ALL).await?;
    let run_id = stack.submit("Seal me", "default", 0).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    // The ledger's view follows the log a moment later.
    stack
        .eventually(LIMIT, || async {
            let view = stack.get_json(&format!("/v1/runs/{run_id}")).await.ok()?;
            (view["status"] == "done").then_some(())
        })
        .await?;
    // Well linked to the seal, on policy's subject, as a stolen policy key could write it.
    let last = &events.last().unwrap();
    let mut late = RunEvent {
        event_id: "late".into(),
        run_id: run_id.to_string(),
        seq: last.event.seq + 1,
        prev_hash: last.event.hash.clone(),
        prev_stream_seq: last.stream_seq,
        role: WriterRole::Policy as i32,
        body: Some(Body::PolicyDecided(Default::default())),
        ..Default::default()
    };
    late.hash = dispatch_runlog::chain::hash(&late).to_vec();
    let stored = stack
        .bus
        .append(
            dispatch_tests::subject_of(&late),
            "late",
            None,
            late.encode_to_vec().into(),
        )
        .await?;
    // The view stays as sealed and says what follows, from where.
    let view = stack
        .eventually(LIMIT, || async {
            let view = stack.get_json(&format!("/v1/runs/{run_id}")).await.ok()?;
            (!view["tampered_after_seal"].is_null()).then_some(view)
        })
        .await?;
    assert_eq!(view["status"], "done", "{view}");
    assert_eq!(
        view["tampered_after_seal"]["stream_seq"], stored.stream_seq,
        "{view}"
    );
    assert_eq!(view["tampered_after_seal"]["messages"], 1, "{view}");
    let inspect = stack.cli(&["inspect", &run_id.to_string()])?;
    assert!(
        inspect.stdout.contains("tampered_after_seal"),
        "{inspect:?}"
    );
    // Replay, logs and wait read the record as sealed.
    let replay = stack.cli(&["replay", &run_id.to_string()])?;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    assert!(
        replay.stdout.contains("tampered after seal: 1 message(s)"),
        "{replay:?}"
    );
    let wait = stack.cli(&["wait", &run_id.to_string()])?;
    assert_eq!(wait.code, Some(0), "{wait:?}");
    let logs = stack.cli(&["logs", &run_id.to_string()])?;
    assert_eq!(logs.code, Some(0), "{logs:?}");
    assert_eq!(logs.stdout.lines().count(), events.len(), "{logs:?}");
    assert!(logs.stderr.contains("after the run's seal"), "{logs:?}");
    Ok(())
}

/// The trail exporter catches up from the views on start: a ledger SIGKILLed again and
/// again while runs finish still leaves every finished run a verifiable `_steps.jsonl`.
#[tokio::test]
async fn every_finished_run_gets_a_trail_though_the_ledger_is_killed() -> anyhow::Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("dispatcher").await?;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            stack
                .submit(&format!("Errand number {i}"), "default", 0)
                .await?,
        );
    }
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let at = stack
            .services
            .iter()
            .position(|s| s.name == "ledger")
            .expect("a ledger");
        stack.services.remove(at).kill().await?;
        stack.add("ledger").await?;
    }
    for id in &ids {
        stack.wait_finished(*id, LIMIT).await?;
    }
    let trust = dispatch_runlog::seal::Trust::default()
        .with_workspace_key(&dispatch_service::layout::seal_key(stack.root()));
    let missing = || {
        ids.iter()
            .filter(|id| {
                let path = dispatch_service::layout::steps_file(stack.root(), id);
                let text = std::fs::read_to_string(path).unwrap_or_default();
                dispatch_runlog::steps::verify(&text, &trust).is_err()
            })
            .count()
    };
    let result = stack
        .eventually(LIMIT, || async { (missing() == 0).then_some(()) })
        .await;
    assert!(
        result.is_ok(),
        "{} of {} runs have no verifiable trail",
        missing(),
        ids.len()
    );
    Ok(())
}

/// A reader written from ARCHITECTURE.md alone — nats-py and a protobuf wire reader,
/// no code of ours — applies the writer rule to the logs on the bus and agrees with the
/// ledger: a genuine run passes; an approval written by connectors, one that claims
/// policy from connectors' subject, and a log that starts without its request fail, at
/// the sequence the ledger names.
#[tokio::test]
async fn an_independent_reader_applies_the_writer_rule_and_agrees() -> anyhow::Result<()> {
    use dispatch_bus::Identity;
    use dispatch_bus::subject::LogWriter;
    use dispatch_proto::run::v1::{ApprovalResolved, Decision, RunStarted};
    let stack = Stack::start(&ALL).await?;
    let genuine = stack.submit("Read me independently", "default", 0).await?;
    let events = stack.wait_finished(genuine, LIMIT).await?;

    // Forgeries written as the admin (who may write anywhere): each breaks the rule.
    let approve = Body::ApprovalResolved(ApprovalResolved {
        approval_id: "x.l0-t0-c0".into(),
        decision: Decision::Allow as i32,
        ..Default::default()
    });
    let mut forged = Vec::new();
    for (role, on) in [
        (WriterRole::Connectors, LogWriter::Connectors),
        (WriterRole::Policy, LogWriter::Connectors),
    ] {
        let run_id = dispatch_bus::RunId::new();
        let mut log = vec![
            dispatch_tests::forged_event(
                &run_id,
                Body::RunRequested(dispatch_proto::run::v1::RunRequested {
                    goal: "forged".into(),
                    ..Default::default()
                }),
            ),
            dispatch_tests::forged_event(&run_id, approve.clone()),
        ];
        log[1].role = role as i32;
        dispatch_runlog::chain::link(&mut log, None);
        for (event, on) in log.iter().zip([LogWriter::Dispatcher, on]) {
            stack
                .bus
                .append(
                    dispatch_bus::subject::run(&run_id, on),
                    &event.event_id,
                    None,
                    event.encode_to_vec().into(),
                )
                .await?;
        }
        forged.push(run_id);
    }
    let headless = dispatch_bus::RunId::new();
    let mut start = vec![dispatch_tests::forged_event(
        &headless,
        Body::RunStarted(RunStarted::default()),
    )];
    dispatch_runlog::chain::link(&mut start, None);
    stack
        .bus
        .append(
            dispatch_tests::subject_of(&start[0]),
            &start[0].event_id,
            None,
            start[0].encode_to_vec().into(),
        )
        .await?;
    forged.push(headless);

    // The reader connects as the CLI, which may read the run logs.
    let seed = std::fs::read_to_string(stack.nats.seed(Identity::Cli))?;
    let (_, raw) = nkeys::decode_seed(seed.trim())?;
    let public = nkeys::KeyPair::from_seed(seed.trim())?.public_key();
    let mut ids = vec![genuine.to_string()];
    ids.extend(forged.iter().map(ToString::to_string));
    let out = std::process::Command::new(dispatch_testkit::mcp_servers().join("venv/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/audit_reader.py"))
        .arg(stack.nats.url())
        .args(&ids)
        .env("DISPATCH_AUDIT_NKEY", public)
        .env("DISPATCH_AUDIT_SEED_HEX", hex::encode(raw))
        .env("DISPATCH_AUDIT_INBOX", Identity::Cli.inbox_prefix())
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let verdicts: serde_json::Value = serde_json::from_slice(&out.stdout)?;

    let genuine_verdict = &verdicts[genuine.to_string()];
    assert_eq!(genuine_verdict["verdict"], "ok", "{verdicts}");
    assert_eq!(genuine_verdict["events"], events.len(), "{verdicts}");
    for run_id in &forged {
        let verdict = &verdicts[run_id.to_string()];
        assert_eq!(verdict["verdict"], "corrupt", "{verdicts}");
        // The ledger says the same, at the same sequence.
        let view = stack
            .eventually(LIMIT, || async {
                let view = stack.get_json(&format!("/v1/runs/{run_id}")).await.ok()?;
                (view["status"] == "corrupt").then_some(view)
            })
            .await?;
        assert_eq!(view["corrupt"]["seq"], verdict["seq"], "{view} {verdicts}");
    }
    Ok(())
}
