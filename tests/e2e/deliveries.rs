//! A result is never silently undeliverable (issue 28, point 13): a goal with a
//! callback is refused at every door while no `webhook-signing` secret could sign its
//! result.

use anyhow::{Context as _, Result};
use base64::Engine as _;
use dispatch_bus::RunId;
use dispatch_tests::Stack;
use serde_json::Value;

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
    use dispatch_proto::api::v1::dispatch_client::DispatchClient;
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
    let channel = tonic::transport::Channel::from_shared(stack.grpc_url())?
        .connect()
        .await?;
    let key: tonic::metadata::MetadataValue<_> = format!("Bearer {}", stack.api_key).parse()?;
    let mut client =
        DispatchClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", key.clone());
            Ok(request)
        });
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
