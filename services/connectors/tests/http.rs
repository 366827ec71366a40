//! The `http.request` tool against a real HTTP server on this machine.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use dispatch_bus::catalogue::Risk;
use dispatch_connectors::http::{Http, HttpConfig, Leasing};

async fn serve() -> SocketAddr {
    let app = Router::new()
        .route("/hello", get(|| async { "hello over http" }))
        .route(
            "/echo",
            post(|headers: HeaderMap, body: String| async move {
                let team = headers
                    .get("x-team")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                (StatusCode::CREATED, format!("{team}:{body}"))
            }),
        )
        .route("/big", get(|| async { "x".repeat(10_000) }))
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/away",
            get(|| async { Redirect::temporary("http://127.0.0.2:9/elsewhere") }),
        )
        .route(
            "/here",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/hello")]).into_response() }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn connector(addr: SocketAddr, max_body_bytes: Option<usize>) -> Http {
    Http::new(HttpConfig {
        allow_hosts: vec![format!("127.0.0.1:{}", addr.port())],
        max_body_bytes,
        timeout_ms: Some(5_000),
        credentials: Vec::new(),
    })
    .unwrap()
    .expect("a connector with hosts")
}

#[tokio::test]
async fn requests_reach_allowed_hosts_only() {
    let addr = serve().await;
    let http = connector(addr, Some(1_000));
    let call = |args: serde_json::Value| {
        let http = &http;
        async move {
            http.call("request", &args.to_string(), Leasing::none())
                .await
        }
    };
    let base = format!("http://127.0.0.1:{}", addr.port());

    let hello = call(serde_json::json!({"method": "GET", "url": format!("{base}/hello")}))
        .await
        .unwrap();
    assert!(hello.starts_with("HTTP 200 OK\n"), "{hello}");
    assert!(hello.contains("content-type: text/plain"), "{hello}");
    assert!(hello.ends_with("\n\nhello over http"), "{hello}");

    let posted = call(serde_json::json!({
        "method": "post", "url": format!("{base}/echo"),
        "headers": {"X-Team": "ops"}, "body": "payload"
    }))
    .await
    .unwrap();
    assert!(posted.starts_with("HTTP 201 Created"), "{posted}");
    assert!(posted.ends_with("ops:payload"), "{posted}");

    let big = call(serde_json::json!({"method": "GET", "url": format!("{base}/big")}))
        .await
        .unwrap();
    assert!(
        big.contains(&"x".repeat(1_000)) && !big.contains(&"x".repeat(1_001)),
        "cut at 1000"
    );
    assert!(
        big.ends_with("[cut: the body is longer than 1000 bytes]"),
        "{big}"
    );

    let missing = call(serde_json::json!({"method": "GET", "url": format!("{base}/missing")}))
        .await
        .unwrap();
    assert!(missing.starts_with("HTTP 404 Not Found"), "{missing}");

    // A redirect within the allowlist is followed; one out of it is refused.
    let here = call(serde_json::json!({"method": "GET", "url": format!("{base}/here")}))
        .await
        .unwrap();
    assert!(here.ends_with("hello over http"), "{here}");
    let away = call(serde_json::json!({"method": "GET", "url": format!("{base}/away")}))
        .await
        .unwrap_err();
    assert!(
        away.contains("which the allowlist does not admit"),
        "{away}"
    );

    for (args, expect) in [
        (
            serde_json::json!({"method": "GET", "url": "http://127.0.0.1:9/x"}),
            "not an allowed host",
        ),
        (
            serde_json::json!({"method": "GET", "url": format!("http://localhost:{}/hello", addr.port())}),
            "not an allowed host",
        ),
        (
            serde_json::json!({"method": "GET", "url": format!("http://u:p@127.0.0.1:{}/", addr.port())}),
            "credentials",
        ),
        (
            serde_json::json!({"method": "GET", "url": "file:///etc/passwd"}),
            "only http and https",
        ),
        (
            serde_json::json!({"url": format!("{base}/hello")}),
            "missing field `method`",
        ),
        (
            serde_json::json!({"url": format!("{base}/hello"), "method": "CONNECT"}),
            "not one http.request makes",
        ),
        (
            serde_json::json!({"method": "GET", "url": format!("{base}/hello"), "headers": {"a b": "c"}}),
            "header",
        ),
        (
            serde_json::json!({"method": "GET", "url": format!("{base}/hello"), "verbose": true}),
            "unknown field",
        ),
    ] {
        let err = call(args.clone()).await.unwrap_err();
        assert!(err.contains(expect), "{args}: {err}");
    }
}

#[tokio::test]
async fn a_get_is_a_read_and_anything_else_external() {
    let addr = serve().await;
    let entry = connector(addr, None).entry();
    assert_eq!(entry.name, "http.request");
    assert!(
        entry
            .description
            .contains(&format!("127.0.0.1:{}", addr.port()))
    );
    assert_eq!(entry.risk_of_call(r#"{"url":"x"}"#), Risk::External);
    assert_eq!(
        entry.risk_of_call(r#"{"url":"x","method":"GET"}"#),
        Risk::Read
    );
    assert_eq!(
        entry.risk_of_call(r#"{"url":"x","method":"head"}"#),
        Risk::Read
    );
    assert_eq!(
        entry.risk_of_call(r#"{"url":"x","method":"DELETE"}"#),
        Risk::External
    );
}

/// A server that counts every request it receives, whatever its method and path.
async fn counting() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let app = Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            "counted"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

#[tokio::test]
async fn a_call_may_not_set_where_a_request_goes_how_it_is_framed_or_its_method() {
    use std::sync::atomic::Ordering;
    let (addr, seen) = counting().await;
    let http = connector(addr, None);
    let url = format!("http://127.0.0.1:{}/notes", addr.port());
    let tricks = [
        ("Host", "other.example"),
        ("host", "127.0.0.1"),
        (" HOST", "other.example"),
        ("Content-Length", "1000"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, Upgrade"),
        ("Keep-Alive", "timeout=600"),
        ("Upgrade", "websocket"),
        ("TE", "trailers"),
        ("Trailer", "X-Late"),
        ("Expect", "100-continue"),
        ("Proxy-Connection", "keep-alive"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("X-Method-Override", "PUT"),
        ("X-Original-Method", "DELETE"),
        ("X-Forwarded-Host", "other.example"),
        ("Forwarded", "host=other.example"),
        ("X-Original-URL", "/admin/delete"),
        ("X-Rewrite-URL", "/admin/delete"),
    ];
    for (name, value) in tricks {
        for method in ["GET", "POST"] {
            let args = serde_json::json!({"method": method, "url": url, "headers": {name: value}});
            let err = http
                .call("request", &args.to_string(), Leasing::none())
                .await
                .unwrap_err();
            assert!(
                err.contains("may not be set by a call") && err.contains(name),
                "{args}: {err}"
            );
        }
    }
    assert_eq!(seen.load(Ordering::SeqCst), 0, "a refused request was sent");
    // Ordinary headers still go.
    let args = serde_json::json!({"method": "GET", "url": url, "headers": {"Accept": "text/plain", "X-Team": "ops"}});
    let ok = http
        .call("request", &args.to_string(), Leasing::none())
        .await
        .unwrap();
    assert!(ok.ends_with("counted"), "{ok}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    // A length of 0 on a request with a body is a framing trick still.
    let args = serde_json::json!({"method": "POST", "url": url, "body": "x", "headers": {"Content-Length": "0"}});
    let err = http
        .call("request", &args.to_string(), Leasing::none())
        .await
        .unwrap_err();
    assert!(err.contains("may not be set by a call"), "{err}");
    // So does a call that sets only what is sent anyway, as a small model copies it
    // from a browser: its own host and port, a connection kept alive or closed, no
    // body's length or coding.
    for (name, value) in [
        ("Host", format!("127.0.0.1:{}", addr.port())),
        ("host", format!("127.0.0.1:{}", addr.port())),
        ("Connection", "keep-alive".to_owned()),
        ("Connection", "close".to_owned()),
        ("Content-Length", "0".to_owned()),
        ("Transfer-Encoding", "identity".to_owned()),
    ] {
        let args = serde_json::json!({"method": "GET", "url": url, "headers": {name: value}});
        let ok = http
            .call("request", &args.to_string(), Leasing::none())
            .await
            .unwrap();
        assert!(ok.ends_with("counted"), "{args}: {ok}");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn a_get_or_head_with_a_body_is_not_a_read() {
    let addr = serve().await;
    let entry = connector(addr, None).entry();
    for (args, risk) in [
        (r#"{"method":"GET","url":"x"}"#, Risk::Read),
        (r#"{"method":"HEAD","url":"x","body":null}"#, Risk::Read),
        (
            r#"{"method":"GET","url":"x","headers":{"Accept":"*/*"}}"#,
            Risk::Read,
        ),
        (
            r#"{"method":"GET","url":"x","body":"DELETE everything"}"#,
            Risk::External,
        ),
        // An empty body is none (the connector sends no body for it).
        (r#"{"method":"GET","url":"x","body":""}"#, Risk::Read),
        (r#"{"method":"get","url":"x","body":""}"#, Risk::Read),
        (r#"{"method":"get","url":"x","body":" "}"#, Risk::External),
        (r#"{"method":"HEAD","url":"x","body":"x"}"#, Risk::External),
        (
            r#"{"method":"GET","url":"x","body":{"a":1}}"#,
            Risk::External,
        ),
    ] {
        assert_eq!(entry.risk_of_call(args), risk, "{args}");
    }
    assert_eq!(entry.parameters["properties"]["url"]["format"], "uri");
}
