//! The dispatcher driven by real models' answers: a stand-in OpenAI-compatible server
//! replays what llama-server answered to a plan request (`libs/testkit/captures/openai`),
//! and the dispatcher, a real process, talks to it with an API key. The first plan, by
//! Qwen2.5-Coder-0.5B, ran into its token limit while repeating its headlines, so the
//! run shows the author's retry with that reason; the second, by the 1.5B model, ended by
//! itself and is taken (one leaf, gated on `test -s scratch/hello.txt`), and the leaf's
//! worker answers with text, so its gate fails; told so, twice, it answers with text
//! again — with each answer's tokens recorded and summed, and the key nowhere but on the
//! wire.
//!
//! And a hostile server: runs whose worker is sent one endless line end `blocked` with
//! the limit it broke, while another run on the same dispatcher still stops when asked.

use std::time::Duration;

use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_testkit::model::{Reply, StandIn};
use dispatch_tests::{Stack, finished};
use prost::Message as _;

const LIMIT: Duration = Duration::from_secs(60);
const KEY: &str = "sk-e2e-do-not-leak-4f1c9a";
/// Leaves in the recorded plan the author's second answer holds.
const LEAVES: usize = 1;
/// The worker's turns on a leaf whose model never makes a call: its first answer, then
/// one after it is told it has used no tool.
const TURNS: usize = 2;

#[tokio::test]
async fn a_real_models_answers_are_recorded_with_their_tokens_and_the_key_leaks_nowhere()
-> anyhow::Result<()> {
    // The recorded author answers: one cut off at its token limit, one that ended by
    // itself; then the recorded worker answer, text and no call, for each leaf.
    let mut script = vec![
        Reply::Replay("llama-server/author.sse"),
        Reply::Replay("llama-server-1.5b/author.json"),
    ];
    script.extend((0..LEAVES * TURNS).map(|_| Reply::Replay("llama-server/final.sse")));
    let (stand_in, url) = StandIn::start(script).await;
    let mut stack = Stack::start(&["ledger", "policy", "connectors"]).await?;
    stack
        .add_with_env(
            "dispatcher",
            &[
                "--model-url",
                &url,
                "--model",
                "recorded",
                "--model-api-key-env",
                "E2E_MODEL_KEY",
            ],
            &[("E2E_MODEL_KEY", KEY)],
        )
        .await?;
    let run_id = stack
        .submit("Write the word hello into scratch/hello.txt", "default", 0)
        .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;

    // The author was asked twice, the second time with the first answer's error; then
    // the worker for each leaf, told after its first answer that it has used no tool.
    let asked = stand_in.requests();
    assert_eq!(asked.len(), 2 + LEAVES * TURNS, "{asked:?}");
    let told = asked[2 + TURNS - 1].1["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    assert!(
        told.contains("You have called no tool in this step"),
        "{told}"
    );
    assert!(
        asked
            .iter()
            .all(|(auth, _)| auth.as_deref() == Some(&*format!("Bearer {KEY}")))
    );
    let retry = asked[1].1["messages"][1]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(retry.contains("previous outline was invalid"), "{retry}");
    assert!(retry.contains("stopped at the token limit"), "{retry}");

    let rejected: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::PlanRejected(r)) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].code, "cut_off");
    assert!(
        rejected[0].answer.contains("*: TODO:"),
        "{}",
        rejected[0].answer
    );
    // Every answer, refused, taken or a worker's turn, records the model and its tokens.
    let usages: Vec<(String, dispatch_proto::run::v1::Usage)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::PlanRejected(r)) => Some((r.model.clone(), r.usage?)),
            Some(Body::PlanAuthored(p)) => Some((p.model.clone(), p.usage?)),
            Some(Body::ModelTurn(t)) => Some((t.model.clone(), t.usage?)),
            _ => None,
        })
        .collect();
    assert_eq!(usages.len(), 2 + LEAVES * TURNS, "{usages:?}");
    for (model, usage) in &usages {
        assert_eq!(model, "openai:recorded");
        assert!(
            usage.prompt_tokens > 0 && usage.completion_tokens > 0,
            "{usage:?}"
        );
    }
    // The leaf's answers were text and made no call, so nothing could show it done: its
    // gate was not even checked.
    let gates = events
        .iter()
        .filter(|e| matches!(&e.event.body, Some(Body::GateChecked(_))))
        .count();
    assert_eq!(gates, 0);
    // A leaf that was not shown done leaves the run blocked, not done.
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32, "{}", end.reason);
    assert!(
        end.summary
            .starts_with(r#"workflow finished: {"DONE": 0, "FAILED": 1}"#),
        "{}",
        end.summary
    );
    assert!(
        end.reason.starts_with("1 of 1 steps failed: step 1 ")
            && end
                .reason
                .contains("the model made no tool call in the step"),
        "{}",
        end.reason
    );

    // `inspect` sums the tokens.
    let expected: u64 = usages.iter().map(|(_, u)| u.completion_tokens).sum();
    let inspect = stack
        .eventually(LIMIT, || async {
            let out = stack.cli(&["inspect", &run_id.to_string()]).ok()?;
            let view: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
            (view["status"] == "blocked").then_some(out.stdout)
        })
        .await?;
    let view: serde_json::Value = serde_json::from_str(&inspect)?;
    assert_eq!(view["completion_tokens"], serde_json::json!(expected));

    // The key is in no event, no log line, no answer, no file the run left.
    let mut places = vec![("inspect".to_owned(), inspect.into_bytes())];
    for event in &events {
        places.push((
            format!("event {}", event.event.seq),
            event.event.encode_to_vec(),
        ));
    }
    stack
        .eventually(LIMIT, || async {
            let trail = dispatch_service::layout::steps_file(stack.root(), &run_id);
            trail.exists().then_some(())
        })
        .await?;
    for entry in walk(stack.root()) {
        places.push((entry.display().to_string(), std::fs::read(&entry)?));
    }
    for (place, bytes) in &places {
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the API key leaked into {place}"
        );
    }
    assert!(
        places.iter().any(|(p, _)| p.ends_with(".log")),
        "service logs were scanned"
    );
    Ok(())
}

/// Whether a request the stand-in saw is the worker's, for the goal holding `word`.
fn worker_asked(body: &serde_json::Value, word: &str) -> bool {
    let messages = &body["messages"];
    let author = messages[0]["content"]
        .as_str()
        .is_some_and(|system| system.starts_with(dispatch_plan::GRAMMAR));
    !author
        && messages[1]["content"]
            .as_str()
            .is_some_and(|step| step.contains(word))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_model_server_blocks_its_runs_and_another_runs_stop_still_works()
-> anyhow::Result<()> {
    // Every run gets a one-leaf plan; then the worker of a "hostile" goal is sent 12 MiB
    // of one line at full speed (what cost a dispatcher 46 CPU-seconds a run, and
    // other runs their stops), and the worker of the "patient" one a stream that is
    // alive and never answers.
    let (stand_in, url) = StandIn::routed(|body| {
        if worker_asked(body, "hostile") {
            Reply::Unterminated(12 << 20)
        } else if worker_asked(body, "patient") {
            Reply::KeepAlive(Duration::from_millis(200))
        } else {
            Reply::Replay("llama-server-1.5b/author.json")
        }
    })
    .await;
    let stack = stack_on(&url, "120000").await?;
    let seen = |word: &'static str| {
        let stand_in = stand_in.clone();
        move || {
            let stand_in = stand_in.clone();
            async move {
                let n = stand_in
                    .requests()
                    .iter()
                    .filter(|(_, body)| worker_asked(body, word))
                    .count();
                (n > 0).then_some(n)
            }
        }
    };
    let patient = stack
        .submit("Wait for the patient model to answer", "default", 0)
        .await?;
    stack.eventually(LIMIT, seen("patient")).await?;
    let mut hostile = Vec::new();
    const HOSTILE: usize = 3;
    for n in 0..HOSTILE {
        hostile.push(
            stack
                .submit(&format!("Listen to hostile server {n}"), "default", 0)
                .await?,
        );
    }
    stack
        .eventually(LIMIT, || {
            let count = seen("hostile");
            async move { count().await.filter(|n| *n >= HOSTILE) }
        })
        .await?;

    // The patient run, on the same dispatcher, still stops when asked.
    let out = stack.cli(&["stop", &patient.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let events = stack.wait_finished(patient, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Stopped as i32, "{}", end.reason);
    assert_eq!(end.reason, "stopped by cli");

    // Each hostile run ends blocked with the limit its server broke, long before the
    // deadline, and its server is asked once.
    for run_id in hostile {
        let events = stack.wait_finished(run_id, LIMIT).await?;
        let end = finished(&events);
        assert_eq!(end.status, RunStatus::Blocked as i32, "{}", end.reason);
        assert!(
            end.reason.contains(&format!(
                "a line of the event stream is longer than {} bytes",
                dispatch_models::sse::MAX_LINE_BYTES
            )),
            "{}",
            end.reason
        );
    }
    assert_eq!(
        seen("hostile")().await,
        Some(HOSTILE),
        "a broken server is not asked again"
    );
    Ok(())
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out
}

/// ledger, policy and connectors, and a dispatcher on the model server at `url` whose
/// calls may take `timeout_ms`.
async fn stack_on(url: &str, timeout_ms: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::start(&["ledger", "policy", "connectors"]).await?;
    stack
        .add_with(
            "dispatcher",
            &["--model-url", url, "--model-timeout-ms", timeout_ms],
        )
        .await?;
    Ok(stack)
}

/// Whether a request the stand-in saw is the author's (asked for an outline).
fn author_asked(body: &serde_json::Value) -> bool {
    body["messages"][0]["content"]
        .as_str()
        .is_some_and(|system| system.contains("org-mode outline"))
}

/// The kill switch is a wall for the whole run: an author that never answers is cut by
/// the run's deadline, not kept past it by the model client's own longer timeout.
#[tokio::test]
async fn a_slow_author_is_cut_by_the_run_s_deadline() -> anyhow::Result<()> {
    let (stand_in, url) = StandIn::routed(|body| {
        if author_asked(body) {
            Reply::KeepAlive(Duration::from_millis(200))
        } else {
            Reply::Replay("llama-server/final.sse")
        }
    })
    .await;
    let stack = stack_on(&url, "300000").await?;
    let begun = std::time::Instant::now();
    let run_id = stack.submit("Plan slowly", "default", 3_000).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32, "{}", end.reason);
    assert_eq!(
        end.reason,
        "timed out after 3s while the plan was being written"
    );
    assert!(
        begun.elapsed() < Duration::from_secs(30),
        "ended after {:?}",
        begun.elapsed()
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event.body, Some(Body::RunStarted(_)))),
        "the run started without a plan"
    );
    assert_eq!(stand_in.requests().len(), 1);
    Ok(())
}

/// A model request that times out is made again while the run has time: the worker's
/// first answer never comes within the model timeout, the second is the recorded one.
#[tokio::test]
async fn a_model_request_that_times_out_is_asked_again_within_the_deadline() -> anyhow::Result<()> {
    let worker_calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = worker_calls.clone();
    let (_stand_in, url) = StandIn::routed(move |body| {
        if author_asked(body) {
            Reply::Replay("llama-server-1.5b/author.json")
        } else if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Reply::KeepAlive(Duration::from_millis(200))
        } else {
            Reply::Replay("llama-server/final.sse")
        }
    })
    .await;
    let stack = stack_on(&url, "1500").await?;
    let run_id = stack
        .submit("Write the word hello into scratch/hello.txt", "default", 0)
        .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let first_turn = events.iter().find_map(|e| match &e.event.body {
        Some(Body::ModelTurn(t)) if t.leaf == 0 && t.turn == 0 => Some(t.clone()),
        _ => None,
    });
    assert!(first_turn.is_some(), "{}", finished(&events).reason);
    assert!(worker_calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(
        !finished(&events).reason.contains("no complete answer"),
        "{}",
        finished(&events).reason
    );
    Ok(())
}

/// A plan the 1.5B model wrote (for "which file in a folder mentions a kill switch")
/// whose first step has no gate: sent back with the reason, and, written the same
/// again, refused, so no step runs that nothing could show done.
#[tokio::test]
async fn a_real_plan_with_a_step_without_a_gate_is_sent_back_then_refused() -> anyhow::Result<()> {
    let (stand_in, url) = StandIn::start(vec![
        Reply::Replay("llama-server-1.5b/gateless-plan.sse"),
        Reply::Replay("llama-server-1.5b/gateless-plan.sse"),
    ])
    .await;
    let stack = stack_on(&url, "120000").await?;
    let run_id = stack
        .submit("Find which file mentions a kill switch", "default", 0)
        .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let codes: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::PlanRejected(r)) => Some(r.code.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(codes, ["no_gate", "no_gate"]);
    let retry = stand_in.requests()[1].1["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        retry.contains("no_gate") && retry.contains("\"Read the notes\""),
        "{retry}"
    );
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason
            .starts_with("plan rejected: no_gate: 1 of 2 steps"),
        "{}",
        end.reason
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event.body, Some(Body::LeafStarted(_)))),
        "a step of a refused plan ran"
    );
    Ok(())
}
