//! The HTTP edge as a hostile or careless client meets it: idle, slow and surplus
//! connections, bad framing, missing keys, other origins, retried submits.

use std::time::Duration;

use dispatch_bus::streams::GOALS;
use dispatch_tests::Stack;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far longer than any limit under test: a connection still open then was not closed.
const PATIENCE: Duration = Duration::from_secs(15);

async fn stack_with_ingress(args: &[&str]) -> anyhow::Result<Stack> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    stack.add_with("ingress", &all).await?;
    Ok(stack)
}

fn addr(stack: &Stack) -> String {
    stack.url("").trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection; returns what it sent. Fails if the
/// connection is still open after [`PATIENCE`].
async fn read_until_closed(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .map_err(|_| anyhow::anyhow!("the server kept the connection open"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn idle_and_slow_clients_are_closed_after_the_timeouts() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&["--header-timeout", "1s", "--body-timeout", "1s"]).await?;
    let addr = addr(&stack);

    // Connects and says nothing.
    let mut idle = TcpStream::connect(&addr).await?;
    read_until_closed(&mut idle).await?;

    // Sends half a header and stalls (slowloris).
    let mut slow = TcpStream::connect(&addr).await?;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await?;
    read_until_closed(&mut slow).await?;

    // Finishes one request, then sits on the kept-alive connection.
    let mut kept = TcpStream::connect(&addr).await?;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let answered = read_until_closed(&mut kept).await?;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // Promises a body and stops sending it: 408.
    let mut trickle = TcpStream::connect(&addr).await?;
    let head = format!(
        "POST /v1/goals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"goal\":",
        stack.api_key
    );
    trickle.write_all(head.as_bytes()).await?;
    let answered = read_until_closed(&mut trickle).await?;
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    assert!(answered.contains("body_timeout"), "{answered}");
    assert_eq!(stack.stream_messages(GOALS).await?, 0);
    Ok(())
}

#[tokio::test]
async fn connections_over_the_limit_get_503_not_a_hang() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&["--max-connections", "2", "--header-timeout", "30s"]).await?;
    let addr = addr(&stack);
    let _held: Vec<TcpStream> = vec![
        TcpStream::connect(&addr).await?,
        TcpStream::connect(&addr).await?,
    ];
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = TcpStream::connect(&addr).await?;
    let answered = read_until_closed(&mut third).await?;
    assert!(answered.starts_with("HTTP/1.1 503"), "{answered}");
    assert!(answered.contains("retry-after: 1"), "{answered}");
    assert!(answered.contains("too_many_connections"), "{answered}");
    drop(_held);
    // Slots come back when connections close.
    stack
        .eventually(PATIENCE, || async {
            let ok = stack.http.get(stack.url("/healthz")).send().await.ok()?;
            (ok.status() == 200).then_some(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn bad_chunked_framing_is_a_bad_request() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&[]).await?;
    let mut stream = TcpStream::connect(addr(&stack)).await?;
    let request = format!(
        "POST /v1/goals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        stack.api_key
    );
    stream.write_all(request.as_bytes()).await?;
    let answered = read_until_closed(&mut stream).await?;
    assert!(answered.starts_with("HTTP/1.1 400"), "{answered}");
    assert!(answered.contains("invalid_body"), "{answered}");
    Ok(())
}

#[tokio::test]
async fn requests_need_a_known_api_key() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&[]).await?;
    let anonymous = reqwest::Client::new();
    let goal = serde_json::json!({ "goal": "Count the spoons" });
    for (key, why) in [
        (None, "send an API key"),
        (Some("dsk_nope_0000"), "not known"),
    ] {
        let mut request = anonymous.post(stack.url("/v1/goals")).json(&goal);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await?;
        assert_eq!(problem["code"], "unauthorized");
        assert_eq!(problem["status"], 401);
        assert!(
            problem["detail"].as_str().unwrap().contains(why),
            "{problem}"
        );
    }
    let response = anonymous.get(stack.url("/v1/runs")).send().await?;
    assert_eq!(response.status(), 401, "reads need a key too");
    let response = anonymous.get(stack.url("/healthz")).send().await?;
    assert_eq!(response.status(), 200, "health checks do not");
    assert_eq!(stack.stream_messages(GOALS).await?, 0);

    // Keys made with the CLI work at once, and stop working once revoked.
    let made = stack.cli(&["api-key", "create", "--name", "laptop"])?;
    assert_eq!(made.code, Some(0), "{}", made.stderr);
    let key = made.stdout.trim().to_owned();
    let with_key = || {
        anonymous
            .get(stack.url("/v1/runs"))
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(with_key().await?.status(), 200);
    let listed = stack.cli(&["api-key", "ls"])?;
    assert!(listed.stdout.contains("laptop"), "{}", listed.stdout);
    assert!(!listed.stdout.contains(&key), "keys are never shown again");
    let id = key.split('_').nth(1).expect("dsk_<id>_<secret>");
    let revoked = stack.cli(&["api-key", "rm", id])?;
    assert_eq!(revoked.code, Some(0), "{}", revoked.stderr);
    assert_eq!(with_key().await?.status(), 401);
    Ok(())
}

#[tokio::test]
async fn browser_posts_from_other_origins_are_refused() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&["--allowed-origins", "https://app.example"]).await?;
    let post = |origin: Option<&str>, content_type: &str| {
        let mut request = stack
            .http
            .post(stack.url("/v1/goals"))
            .header("content-type", content_type)
            .body(r#"{"goal":"Send the newsletter"}"#);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    // What a page on another site can send without a preflight: text/plain.
    let response = post(Some("https://evil.example"), "text/plain").await?;
    assert_eq!(response.status(), 403);
    assert_eq!(response.json::<Value>().await?["code"], "cross_origin");
    let response = post(Some("https://evil.example"), "application/json").await?;
    assert_eq!(response.status(), 403);
    let response = post(None, "text/plain").await?;
    assert_eq!(response.status(), 415);
    assert_eq!(
        response.json::<Value>().await?["code"],
        "unsupported_media_type"
    );
    assert_eq!(stack.stream_messages(GOALS).await?, 0, "nothing was stored");
    let response = post(Some("https://app.example"), "application/json").await?;
    assert_eq!(response.status(), 202, "an allowed origin is served");
    Ok(())
}

#[tokio::test]
async fn a_retried_submit_with_the_same_idempotency_key_is_one_run() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&[]).await?;
    let post = |key: &str, goal: &str| {
        stack
            .http
            .post(stack.url("/v1/goals"))
            .header("idempotency-key", key)
            .json(&serde_json::json!({ "goal": goal }))
            .send()
    };
    let first = post("order-1138", "Book the meeting room").await?;
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].to_str()?.to_owned();
    let first: Value = first.json().await?;
    let run_id = first["run_id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/runs/{run_id}"));

    for _ in 0..3 {
        let again = post("order-1138", "Book the meeting room").await?;
        assert_eq!(again.status(), 202);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: Value = again.json().await?;
        assert_eq!(again["run_id"], run_id.as_str());
    }
    assert_eq!(stack.stream_messages(GOALS).await?, 1, "one goal stored");

    // The same key for another goal is a client bug, said so.
    let reused = post("order-1138", "Book a different room").await?;
    assert_eq!(reused.status(), 422);
    let problem: Value = reused.json().await?;
    assert_eq!(problem["code"], "idempotency_key_reused");
    assert_eq!(problem["run_id"], run_id.as_str());
    // Another key is another run.
    let other: Value = post("order-1139", "Book the meeting room")
        .await?
        .json()
        .await?;
    assert_ne!(other["run_id"], run_id.as_str());
    assert_eq!(stack.stream_messages(GOALS).await?, 2);
    let bad = post("", "x").await?;
    assert_eq!(bad.status(), 400);
    Ok(())
}

#[tokio::test]
async fn the_api_describes_itself_in_openapi() -> anyhow::Result<()> {
    let stack = stack_with_ingress(&[]).await?;
    let doc: Value = reqwest::Client::new()
        .get(stack.url("/v1/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let post = &doc["paths"]["/v1/goals"]["post"];
    assert!(
        post["responses"]["202"]["headers"]["Location"].is_object(),
        "{post}"
    );
    assert!(post["responses"]["401"].is_object(), "{post}");
    assert_eq!(post["security"][0]["api_key"], serde_json::json!([]));
    for path in ["/v1/runs", "/v1/runs/{id}", "/v1/tasks", "/healthz"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} is described");
    }
    for path in [
        "/v1/conversations/{id}/messages",
        "/hooks/{account}/{agent}/{channel}",
    ] {
        assert!(
            doc["paths"][path]["post"].is_object(),
            "{path} is described"
        );
    }
    let hook = &doc["paths"]["/hooks/{account}/{agent}/{channel}"]["post"];
    for status in ["202", "401", "404", "405", "413", "431", "500"] {
        assert!(hook["responses"][status].is_object(), "{status}: {hook}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
    for schema in ["RunView", "ListTasksResponse", "Problem", "GoalRequest"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    Ok(())
}
