//! A result is never silently undeliverable (issue 28, point 13). A goal with a
//! callback is refused at every door while no `webhook-signing` secret could sign its
//! result; once accepted, a delivery is tried on a schedule (Standard Webhooks' by
//! default; shortened here), whatever the failure, a secret removed meanwhile
//! included; after its last try it is given up, listed, and re-sent by an operator
//! with `dispatch deliveries resend`. Receivers verify every delivery with the official
//! Standard Webhooks library (`tests/mcp/webhook_receiver.py`).

use std::time::Duration;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use dispatch_bus::RunId;
use dispatch_proto::command::v1::DeliveryAttempt;
use dispatch_tests::Stack;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

/// The streamer's schedule here: four tries, the waits before them 0, 1, 4 and 4 s.
const SCHEDULE: &str = "0s,1s,4s,4s";
const WAITS_MS: [i64; 4] = [0, 1_000, 4_000, 4_000];

/// A short plan the offline model runs as it is.
const PLAN: &str = "#+TITLE: Delivered\n* TODO Wait a little\n  - call: test.sleep {\"ms\": 50}\n  :done-when: true\n";

/// A fresh Standard Webhooks secret.
fn whsec() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::now_v7().as_bytes())
    )
}

/// The workspace's secrets, as `dispatch secret set` keeps them.
async fn secrets(stack: &Stack) -> Result<dispatch_secrets::Store> {
    let key_path = dispatch_secrets::key_path(stack.root());
    let key = dispatch_secrets::Key::load_or_create(&key_path)?;
    Ok(dispatch_secrets::Store::open(&stack.bus, key_path, Some(key)).await?)
}

/// What a receiver got so far.
fn received(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every entry of a run's delivery record, oldest first.
async fn record(stack: &Stack, run_id: &RunId) -> Result<Vec<DeliveryAttempt>> {
    let stream = stack
        .bus
        .jetstream()
        .get_stream(dispatch_bus::streams::DELIVERIES)
        .await?;
    let subject = dispatch_bus::subject::delivery(run_id).to_string();
    let mut tries = Vec::new();
    let mut seq = 1;
    while let Ok(message) = stream
        .direct_get_next_for_subject(subject.as_str(), Some(seq))
        .await
    {
        seq = message.sequence + 1;
        tries.push(<DeliveryAttempt as prost::Message>::decode(
            &message.payload[..],
        )?);
    }
    Ok(tries)
}

/// Waits until the run's record satisfies `done`, and returns it.
async fn record_until(
    stack: &Stack,
    run_id: &RunId,
    done: impl Fn(&[DeliveryAttempt]) -> bool,
) -> Result<Vec<DeliveryAttempt>> {
    stack
        .eventually(LIMIT, || async {
            let tries = record(stack, run_id).await.ok()?;
            done(&tries).then_some(tries)
        })
        .await
}

/// No try came sooner after the one before than the schedule says (none came in
/// milliseconds, as they did when deliveries were retried on the command's backoff).
fn spaced_by_the_schedule(tries: &[DeliveryAttempt]) {
    for pair in tries.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        if after.round != before.round {
            continue;
        }
        let wait = WAITS_MS[after.attempt as usize - 1];
        assert!(
            after.at_unix_ms - before.at_unix_ms >= wait,
            "try {} came {} ms after try {}, before its {wait} ms: {tries:?}",
            after.attempt,
            after.at_unix_ms - before.at_unix_ms,
            before.attempt
        );
        assert_eq!(
            before.next_try_unix_ms,
            before.at_unix_ms + wait,
            "{before:?}"
        );
    }
}

async fn post_goal(stack: &Stack, callback: &str) -> Result<reqwest::Response> {
    Ok(stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&serde_json::json!({"goal": PLAN, "callback_url": callback}))
        .send()
        .await?)
}

async fn run_id_of(response: reqwest::Response) -> Result<RunId> {
    anyhow::ensure!(response.status() == 202, "status {}", response.status());
    Ok(response.json::<Value>().await?["run_id"]
        .as_str()
        .context("a run id")?
        .parse()?)
}

#[tokio::test]
async fn a_goal_with_a_callback_is_refused_at_every_door_while_nothing_could_sign_its_result()
-> Result<()> {
    use dispatch_proto::api::v1::SubmitGoalRequest;
    let mut stack = Stack::start(&["ledger"]).await?;
    stack.add("ingress").await?;
    let callback = "http://127.0.0.1:9/hooks/dispatch";

    // HTTP: 400 with a code a client can match, and what to do about it.
    let refused = post_goal(&stack, callback).await?;
    assert_eq!(refused.status(), 400);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await?;
    assert_eq!(problem["code"], "no_signing_secret", "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("dispatch secret set webhook-signing"),
        "{problem}"
    );

    // gRPC: FAILED_PRECONDITION, its message led by the same code.
    let mut client = stack.grpc_client().await?;
    let status = client
        .submit_goal(SubmitGoalRequest {
            goal: PLAN.into(),
            callback_url: callback.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with("no_signing_secret: "),
        "{status:?}"
    );

    // The CLI: exit 125 and why.
    let cli = stack.cli(&["run", "-d", "--callback", callback, "tidy the drive"])?;
    assert_eq!(cli.code, Some(125), "{cli:?}");
    assert!(
        cli.stderr.contains("no secret named webhook-signing"),
        "{}",
        cli.stderr
    );
    // Refused means nothing stored: no goal, so no run.
    assert!(dispatch_tests::stored_goals(&stack.bus).await?.is_empty());

    // Goals without a callback are taken as ever.
    let plain = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&serde_json::json!({"goal": PLAN}))
        .send()
        .await?;
    assert_eq!(plain.status(), 202);

    // A secret in the environment of the process at the door counts, as it does for
    // the streamer that signs with it.
    let env = stack.cli_with_env(
        &["run", "-d", "--callback", callback, "tidy the drive"],
        &[("DISPATCH_SECRET_WEBHOOK_SIGNING", &whsec())],
    )?;
    assert_eq!(env.code, Some(0), "{env:?}");

    // With the secret stored, every door takes it.
    secrets(&stack)
        .await?
        .set(dispatch_secrets::DELIVERY_SIGNING, &whsec())
        .await?;
    run_id_of(post_goal(&stack, callback).await?).await?;
    let accepted = client
        .submit_goal(SubmitGoalRequest {
            goal: PLAN.into(),
            callback_url: callback.into(),
            ..Default::default()
        })
        .await?;
    assert!(!accepted.into_inner().run_id.is_empty());
    let cli = stack.cli(&["run", "-d", "--callback", callback, "tidy the drive"])?;
    assert_eq!(cli.code, Some(0), "{cli:?}");
    assert_eq!(dispatch_tests::stored_goals(&stack.bus).await?.len(), 5);
    Ok(())
}

#[tokio::test]
async fn deliveries_wait_out_a_missing_secret_keep_to_the_schedule_and_are_resent_after_giving_up()
-> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    let secret = whsec();
    let store = secrets(&stack).await?;
    store
        .set(dispatch_secrets::DELIVERY_SIGNING, &secret)
        .await?;
    // One receiver answers at once; the other fails its first four requests.
    let patient_log = stack.root().join("patient.jsonl");
    let failing_log = stack.root().join("failing.jsonl");
    let (_patient, patient_port) =
        dispatch_tests::webhook_receiver(&secret, 0, &patient_log).await?;
    let (_failing, failing_port) =
        dispatch_tests::webhook_receiver(&secret, 4, &failing_log).await?;
    let hosts = format!("127.0.0.1:{patient_port},127.0.0.1:{failing_port}");
    stack
        .add_with(
            "streamer",
            &["--callback-hosts", &hosts, "--delivery-schedule", SCHEDULE],
        )
        .await?;
    stack.add("ingress").await?;

    // Accepted while the secret was there; removed before the run ends (the run cannot
    // start before: no dispatcher runs yet).
    let patient = run_id_of(
        post_goal(
            &stack,
            &format!("http://127.0.0.1:{patient_port}/hooks/dispatch"),
        )
        .await?,
    )
    .await?;
    let removed = stack.cli(&["secret", "rm", dispatch_secrets::DELIVERY_SIGNING])?;
    assert_eq!(removed.code, Some(0), "{removed:?}");
    stack.add("dispatcher").await?;
    stack.wait_finished(patient, LIMIT).await?;

    // Tries without a secret wait their turn on the schedule instead of burning out.
    let unsigned = record_until(&stack, &patient, |tries| tries.len() >= 2).await?;
    spaced_by_the_schedule(&unsigned);
    for t in &unsigned[..2] {
        assert!(!t.delivered && !t.gave_up, "{t:?}");
        assert!(t.error.contains("no secret named webhook-signing"), "{t:?}");
        assert_eq!((t.round, t.tries), (1, 4), "{t:?}");
    }
    assert!(received(&patient_log).is_empty());
    // Re-sending it now would only burn tries again: refused, and why.
    let early = stack.cli(&["deliveries", "resend", &patient.to_string()])?;
    assert_eq!(early.code, Some(125), "{early:?}");
    assert!(
        early.stderr.contains("no secret named webhook-signing"),
        "{}",
        early.stderr
    );

    // Set again, the next try on the schedule delivers, signed.
    store
        .set(dispatch_secrets::DELIVERY_SIGNING, &secret)
        .await?;
    let tries = record_until(&stack, &patient, |tries| {
        tries.last().is_some_and(|t| t.delivered || t.gave_up)
    })
    .await?;
    spaced_by_the_schedule(&tries);
    let last = tries.last().context("a try")?;
    assert!(last.delivered, "{tries:?}");
    assert!(last.attempt >= 3, "{tries:?}");
    let got = received(&patient_log);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["verified"], true);
    assert_eq!(got[0]["headers"]["webhook-id"], patient.to_string());

    // A callback that keeps failing: four tries on the schedule, then given up.
    let failing = run_id_of(
        post_goal(
            &stack,
            &format!("http://127.0.0.1:{failing_port}/hooks/dispatch?token=x"),
        )
        .await?,
    )
    .await?;
    stack.wait_finished(failing, LIMIT).await?;
    let tries = record_until(&stack, &failing, |tries| {
        tries.last().is_some_and(|t| t.gave_up)
    })
    .await?;
    spaced_by_the_schedule(&tries);
    let summary: Vec<(u32, u32, bool)> = tries
        .iter()
        .map(|t| (t.attempt, t.status, t.gave_up))
        .collect();
    assert_eq!(
        summary,
        [
            (1, 500, false),
            (2, 500, false),
            (3, 500, false),
            (4, 500, true)
        ]
    );
    assert_eq!(tries[3].next_try_unix_ms, 0);

    // The operator sees it given up, with its tries and last answer...
    let listed = stack.cli(&["deliveries", "--state", "given-up", "--format", "json"])?;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let listed: Vec<Value> = serde_json::from_str(&listed.stdout)?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["run_id"], failing.to_string());
    assert_eq!(listed[0]["state"], "given_up");
    assert_eq!(
        (listed[0]["tries"].as_u64(), listed[0]["max_tries"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(listed[0]["last_status"], 500);
    assert_eq!(
        listed[0]["url"],
        format!("http://127.0.0.1:{failing_port}/hooks/dispatch")
    );
    let table = stack.cli(&["deliveries"])?.stdout;
    let row = |run: &RunId| {
        table
            .lines()
            .find(|l| l.starts_with(&run.short()))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        row(&failing).contains("given up") && row(&failing).contains("4/4"),
        "{table}"
    );
    assert!(row(&patient).contains("delivered"), "{table}");

    // ...and re-sends it: a new round, tried at once, delivered.
    let resent = stack.cli(&["deliveries", "resend", &failing.short(), "--by", "ada"])?;
    assert_eq!(resent.code, Some(0), "{resent:?}");
    assert_eq!(resent.stdout.trim(), failing.to_string());
    let tries = record_until(&stack, &failing, |tries| {
        tries
            .last()
            .is_some_and(|t| t.round == 2 && (t.delivered || t.gave_up))
    })
    .await?;
    let again = tries.last().context("a try")?;
    assert!(again.delivered && again.attempt == 1, "{tries:?}");
    assert_eq!(again.requested_by, "ada (cli)");
    // The record is appended to, never rewritten: the four given-up tries are still there.
    assert_eq!(tries.len(), 5);
    assert_eq!(
        &tries[..4].iter().map(|t| t.gave_up).collect::<Vec<_>>(),
        &[false, false, false, true]
    );
    let got = received(&failing_log);
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[4]["verified"], true);
    let shown = stack.cli(&["deliveries", "show", &failing.to_string()])?;
    assert_eq!(shown.stdout.lines().count(), 6, "{}", shown.stdout);
    assert!(shown.stdout.contains("ada (cli)"), "{}", shown.stdout);

    // Delivered is delivered: a re-send is refused, as is one for a run without a
    // callback, and nothing is queued for them.
    let twice = stack.cli(&["deliveries", "resend", &failing.to_string()])?;
    assert_eq!(twice.code, Some(125), "{twice:?}");
    assert!(twice.stderr.contains("was delivered"), "{}", twice.stderr);
    let quiet = run_id_of(
        stack
            .http
            .post(stack.url("/v1/goals"))
            .json(&serde_json::json!({"goal": PLAN}))
            .send()
            .await?,
    )
    .await?;
    stack.wait_finished(quiet, LIMIT).await?;
    let none = stack.cli(&["deliveries", "resend", &quiet.to_string()])?;
    assert_eq!(none.code, Some(125), "{none:?}");
    assert!(
        none.stderr.contains("named no callback_url"),
        "{}",
        none.stderr
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(record(&stack, &failing).await?.len(), 5);
    assert!(record(&stack, &quiet).await?.is_empty());
    Ok(())
}
