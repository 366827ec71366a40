//! Conversation streams end to end: the streamer turning a run's events into UI message
//! stream chunks on the conversation's subject, ingress serving them over SSE, a client
//! that drops and resumes with `Last-Event-ID`, and a streamer SIGKILLed mid-run.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_tests::{SseEvent, Stack, finished, read_sse};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(90);

/// Three leaves, each waiting a little, so the run streams for a while.
const PLAN: &str = "#+TITLE: Streamed\n\
* TODO First\n  - call: test.sleep {\"ms\": 400}\n  :done-when: true\n\
* TODO Second\n  - call: test.sleep {\"ms\": 400}\n  :done-when: true\n\
* TODO Third\n  - call: test.sleep {\"ms\": 400}\n  :done-when: true\n";

/// Streamer flags that keep a finished run's chunks buffered while a test reads them.
const KEEP_BUFFER: &[&str] = &["--purge-after", "5m"];

/// The test tools, the streamer(s), a dispatcher and ingress.
async fn stack(streamers: usize) -> Result<Stack> {
    let mut stack = Stack::with_test_tools().await?;
    for _ in 0..streamers {
        stack.add_with("streamer", KEEP_BUFFER).await?;
    }
    // The offline model writes a word every 30 ms, so its text streams in pieces.
    stack
        .add_with("dispatcher", &["--offline-pace-ms", "30"])
        .await?;
    stack.add("ingress").await?;
    Ok(stack)
}

/// Opens the conversation's SSE stream, resuming after `after` if given.
async fn open(stack: &Stack, conversation: &str, after: Option<&str>) -> Result<reqwest::Response> {
    let mut request = stack
        .http
        .get(stack.url(&format!("/v1/conversations/{conversation}/stream")));
    if let Some(after) = after {
        request = request.header("Last-Event-ID", after);
    }
    let response = request.send().await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    Ok(response)
}

/// Is this the chunk that ends `run_id`'s message? (`finish` follows the run's final
/// `data-run`; the message's last chunk.)
fn ends(run_id: RunId) -> impl Fn(&SseEvent) -> bool {
    let seen_end = std::cell::Cell::new(false);
    move |event| {
        if event.data["type"] == "data-run"
            && event.data["id"] == run_id.to_string()
            && event.data["data"]["status"]
                .as_str()
                .is_some_and(|s| s != "queued" && s != "running")
        {
            seen_end.set(true);
        }
        seen_end.get() && event.data["type"] == "finish"
    }
}

/// The chunks the run's events should have become, in order.
fn expected(run_id: RunId, events: &[dispatch_runlog::StoredEvent]) -> Vec<Value> {
    events
        .iter()
        .flat_map(|e| dispatch_chunks::of(&run_id.to_string(), &e.event))
        .collect()
}

/// The text the model wrote in the run, as the log has it.
fn model_text(events: &[dispatch_runlog::StoredEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ModelTurn(t)) => Some(t.text.clone()),
            _ => None,
        })
        .collect()
}

fn text_of(chunks: &[SseEvent]) -> String {
    chunks
        .iter()
        .filter(|c| c.data["type"] == "text-delta")
        .filter_map(|c| c.data["delta"].as_str())
        .collect()
}

/// Every chunk of the conversation's buffer, read from its start to `run_id`'s end.
async fn whole(stack: &Stack, conversation: &str, run_id: RunId) -> Result<Vec<SseEvent>> {
    read_sse(
        open(stack, conversation, None).await?,
        10_000,
        LIMIT,
        ends(run_id),
    )
    .await
}

/// What a client back with `cursor` reads up to the end of `run_id`'s message, and
/// the run's log once it has ended `done`.
async fn resume_to_the_end(
    stack: &Stack,
    conversation: &str,
    cursor: &str,
    run_id: RunId,
) -> Result<(Vec<SseEvent>, Vec<dispatch_runlog::StoredEvent>)> {
    let rest = read_sse(
        open(stack, conversation, Some(cursor)).await?,
        10_000,
        LIMIT,
        ends(run_id),
    )
    .await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    Ok((rest, events))
}

#[tokio::test]
async fn a_client_that_drops_and_resumes_gets_exactly_the_rest() -> Result<()> {
    let stack = stack(1).await?;
    let conversation = "chat-resume";
    // Connected before the run starts: it sees the run from its first chunk.
    let first = open(&stack, conversation, None).await?;
    let run_id = stack.submit(PLAN, conversation, 60_000).await?;
    let head = read_sse(first, 6, LIMIT, |_| false).await?;
    assert_eq!(head.len(), 6, "{head:?}");
    assert_eq!(head[0].data["type"], "start");
    assert_eq!(head[0].data["messageId"], run_id.to_string());
    let cursor = head.last().and_then(|e| e.id.clone()).context("an id")?;

    // Dropped mid-run; back with the cursor, it gets the rest as it happens.
    let (rest, events) = resume_to_the_end(&stack, conversation, &cursor, run_id).await?;

    // Together: exactly what the buffer holds, which is exactly what the log says.
    let all = whole(&stack, conversation, run_id).await?;
    let resumed: Vec<SseEvent> = head.iter().chain(&rest).cloned().collect();
    assert_eq!(resumed, all, "a gap or a duplicate across the reconnect");
    let data: Vec<Value> = all.iter().map(|e| e.data.clone()).collect();
    assert_eq!(data, expected(run_id, &events));
    assert!(!model_text(&events).is_empty());
    assert_eq!(text_of(&resumed), model_text(&events));
    // The text came as it was written: a part in more than one piece.
    let starts = all
        .iter()
        .filter(|e| e.data["type"] == "text-start")
        .count();
    let pieces = all
        .iter()
        .filter(|e| e.data["type"] == "text-delta")
        .count();
    assert!(pieces > starts, "{pieces} pieces in {starts} parts");
    // Cursors only grow.
    let ids: Vec<u64> = all
        .iter()
        .map(|e| {
            let id = e.id.as_deref().unwrap_or("");
            id.split_once('-')
                .map_or(id, |(seq, _)| seq)
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // A bad cursor is refused, clearly.
    let bad = stack
        .http
        .get(stack.url(&format!("/v1/conversations/{conversation}/stream")))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let problem: Value = bad.json().await?;
    assert_eq!(problem["code"], "invalid_cursor");
    let bad = stack
        .http
        .get(stack.url("/v1/conversations/no%20spaces/stream"))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    Ok(())
}

#[tokio::test]
async fn a_streamer_killed_mid_run_loses_no_chunk_and_two_copies_do_not_double() -> Result<()> {
    // Two copies from the start: one streams, the other stands by.
    let mut stack = stack(2).await?;
    let conversation = "chat-crash";
    let live = open(&stack, conversation, None).await?;
    let run_id = stack.submit(PLAN, conversation, 60_000).await?;
    let head = read_sse(live, 4, LIMIT, |_| false).await?;
    assert_eq!(head.len(), 4);
    // Both are SIGKILLed mid-run, whichever was streaming; a new copy takes over.
    for service in stack.services.iter_mut().filter(|s| s.name == "streamer") {
        service.kill().await?;
    }
    stack.services.retain(|s| s.name != "streamer");
    stack.add_with("streamer", KEEP_BUFFER).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let all = whole(&stack, conversation, run_id).await?;
    let data: Vec<Value> = all.iter().map(|e| e.data.clone()).collect();
    assert_eq!(data, expected(run_id, &events), "a chunk lost or doubled");
    assert_eq!(all[..4], head[..]);
    Ok(())
}

#[tokio::test]
async fn a_turn_cut_short_by_a_dispatcher_crash_streams_again_in_a_new_part() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add_with("streamer", KEEP_BUFFER).await?;
    // Slow enough that the dispatcher dies with a turn's text half out.
    let slow = ["--offline-pace-ms", "400", "--lease-ms", "1000"];
    stack.add_with("dispatcher", &slow).await?;
    stack.add("ingress").await?;
    let conversation = "chat-resumed";
    let plan = "#+TITLE: Cut\n* TODO Only\n  - call: test.sleep {\"ms\": 10}\n  :done-when: true\n";
    let run_id = stack.submit(plan, conversation, 60_000).await?;
    let log = stack.log().await?;
    stack
        .eventually(LIMIT, || async {
            let events = log.read(&run_id).await.ok()?;
            events
                .iter()
                .any(|e| matches!(&e.event.body, Some(Body::OutputDelta(_))))
                .then_some(())
        })
        .await?;
    stack.service("dispatcher")?.kill().await?;
    stack.services.retain(|s| s.name != "dispatcher");
    stack.add_with("dispatcher", &slow).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    // The part the dead copy was streaming ended as void; the turn streamed again.
    let deltas: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::OutputDelta(d)) => Some(d.clone()),
            _ => None,
        })
        .collect();
    let void = deltas
        .iter()
        .find(|d| d.abandoned)
        .context("the cut part is ended")?;
    let turn = events
        .iter()
        .find_map(|e| match &e.event.body {
            Some(Body::ModelTurn(t)) if t.leaf == void.leaf && t.turn == void.turn => Some(t),
            _ => None,
        })
        .context("the turn was taken")?;
    assert!(turn.streamed && turn.streamed_part > void.part, "{turn:?}");
    let all = whole(&stack, conversation, run_id).await?;
    let data: Vec<Value> = all.iter().map(|e| e.data.clone()).collect();
    assert_eq!(data, expected(run_id, &events));
    let ended = format!("text-{}-{}-{}", void.leaf, void.turn, void.part);
    assert!(
        all.iter()
            .any(|e| e.data["type"] == "text-end" && e.data["id"] == ended),
        "the void part is closed for clients"
    );
    Ok(())
}

#[tokio::test]
async fn a_persisted_run_is_purged_and_a_late_client_gets_it_from_the_transcript() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add_with("streamer", &["--purge-after", "1s"]).await?;
    stack
        .add_with("dispatcher", &["--offline-pace-ms", "30"])
        .await?;
    stack.add("ingress").await?;
    let conversation = "chat-late";
    let live = open(&stack, conversation, None).await?;
    let run_id = stack.submit(PLAN, conversation, 60_000).await?;
    let head = read_sse(live, 5, LIMIT, |_| false).await?;
    let cursor = head.last().and_then(|e| e.id.clone()).context("an id")?;
    assert!(cursor.ends_with(&run_id.to_string()), "{cursor}");
    let events = stack.wait_finished(run_id, LIMIT).await?;

    // Once the run is in its log for good, its chunks leave the buffer.
    let buffer = stack
        .bus
        .jetstream()
        .get_stream(dispatch_bus::streams::CONVERSATIONS)
        .await?;
    let subject = dispatch_bus::subject::conv::of(&conversation.parse()?).to_string();
    stack
        .eventually(LIMIT, || async {
            buffer
                .direct_get_last_for_subject(subject.as_str())
                .await
                .is_err()
                .then_some(())
        })
        .await?;

    // Back with its old cursor, the client gets the run whole from its transcript.
    let resumed = read_sse(
        open(&stack, conversation, Some(&cursor)).await?,
        10_000,
        LIMIT,
        ends(run_id),
    )
    .await?;
    let data: Vec<Value> = resumed.iter().map(|e| e.data.clone()).collect();
    let whole = dispatch_chunks::transcript(&run_id.to_string(), events.iter().map(|e| &e.event));
    assert_eq!(data, whole);
    assert_eq!(text_of(&resumed), model_text(&events));

    // The transcript endpoint has it as messages.
    let response = stack
        .http
        .get(stack.url(&format!("/v1/conversations/{conversation}/transcript")))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await?;
    let run = &page["runs"][0];
    assert_eq!(run["run_id"], run_id.to_string());
    assert_eq!(run["status"], "done");
    assert_eq!(run["messages"][0]["role"], "user");
    assert_eq!(run["messages"][0]["parts"][0]["text"], PLAN.trim_end());
    let said: String = run["messages"][1]["parts"]
        .as_array()
        .context("parts")?
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(said, model_text(&events));
    Ok(())
}

#[tokio::test]
async fn a_nats_restart_ends_open_streams_and_clients_resume_without_a_gap() -> Result<()> {
    let mut stack = stack(1).await?;
    let conversation = "chat-restart";
    // The buffer is kept in memory: a single server that restarts comes back without it.
    let mut buffer = stack
        .bus
        .jetstream()
        .get_stream(dispatch_bus::streams::CONVERSATIONS)
        .await?;
    let before = buffer.info().await?.clone();
    assert_eq!(
        before.config.storage,
        dispatch_bus::async_nats::jetstream::stream::StorageType::Memory
    );
    let first = open(&stack, conversation, None).await?;
    let watcher = open(&stack, conversation, None).await?;
    let run_id = stack.submit(PLAN, conversation, 120_000).await?;
    let head = read_sse(first, 6, LIMIT, |_| false).await?;
    let cursor = head.last().and_then(|e| e.id.clone()).context("an id")?;

    stack.nats.restart().await?;
    // An open stream ends with the connection (chunks it had not taken may be gone),
    // rather than going on past a gap.
    let cut = read_sse(watcher, 10_000, LIMIT, |_| false).await?;
    assert!(
        !cut.iter().any(|e| e.data["type"] == "finish"),
        "the run cannot have ended yet: {cut:?}"
    );

    // The streamer makes the buffer again, counting on from above the lost one.
    stack
        .eventually(LIMIT, || async {
            let mut stream = stack
                .bus
                .jetstream()
                .get_stream(dispatch_bus::streams::CONVERSATIONS)
                .await
                .ok()?;
            let info = stream.info().await.ok()?;
            (info.created != before.created).then_some(())
        })
        .await?;
    buffer = stack
        .bus
        .jetstream()
        .get_stream(dispatch_bus::streams::CONVERSATIONS)
        .await?;
    assert!(buffer.info().await?.state.first_sequence > before.state.last_sequence);

    // Back with its cursor, the client gets its run whole from the transcript, then
    // the rest live: together, every chunk of the run, none twice.
    let (rest, events) = resume_to_the_end(&stack, conversation, &cursor, run_id).await?;
    // (The transcript gives each turn's text whole, so the pieces differ from the
    // live ones; what they say and do may not.)
    let of_kind = |chunks: &[Value], kind: &str, field: &str| -> Vec<Value> {
        chunks
            .iter()
            .filter(|c| c["type"] == kind)
            .map(|c| c[field].clone())
            .collect()
    };
    let data: Vec<Value> = rest.iter().map(|e| e.data.clone()).collect();
    let want = expected(run_id, &events);
    assert_eq!(
        of_kind(&data, "start", "messageId"),
        [json!(run_id.to_string())]
    );
    assert_eq!(
        data.last().map(|c| c["type"].clone()),
        Some(json!("finish"))
    );
    for (kind, field) in [
        ("tool-input-available", "toolCallId"),
        ("tool-output-available", "toolCallId"),
        ("start-step", "type"),
        ("finish-step", "type"),
    ] {
        assert_eq!(
            of_kind(&data, kind, field),
            of_kind(&want, kind, field),
            "a gap or a duplicate in {kind} after the restart"
        );
    }
    assert_eq!(text_of(&rest), model_text(&events));
    Ok(())
}

/// A WebSocket to the conversation, started with `hello`.
async fn websocket(
    stack: &Stack,
    conversation: &str,
    hello: Value,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    use futures::SinkExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let url = stack
        .url(&format!("/v1/conversations/{conversation}/ws"))
        .replacen("http://", "ws://", 1);
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", stack.api_key).parse()?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            hello.to_string().into(),
        ))
        .await?;
    Ok(socket)
}

/// Reads `{id, chunk}` messages until `last` says one is the last wanted, or `max`.
async fn read_ws(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    max: usize,
    last: impl Fn(&SseEvent) -> bool,
) -> Result<Vec<SseEvent>> {
    use futures::StreamExt as _;
    let mut read = Vec::new();
    while read.len() < max {
        let message = tokio::time::timeout(LIMIT, socket.next())
            .await?
            .context("the socket closed")??;
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text)?;
        let event = SseEvent {
            id: value["id"].as_str().map(str::to_owned),
            data: value["chunk"].clone(),
        };
        let done = last(&event);
        read.push(event);
        if done {
            break;
        }
    }
    Ok(read)
}

#[tokio::test]
async fn websocket_direct_and_run_event_clients_get_the_same_chunks() -> Result<()> {
    let stack = stack(1).await?;

    // WebSocket: half a run, a reconnect with the cursor, the rest.
    let conversation = "chat-ws";
    let mut socket = websocket(&stack, conversation, serde_json::json!({})).await?;
    let run_id = stack.submit(PLAN, conversation, 60_000).await?;
    let head = read_ws(&mut socket, 5, |_| false).await?;
    drop(socket);
    let cursor = head.last().and_then(|e| e.id.clone()).context("an id")?;
    let mut socket = websocket(&stack, conversation, serde_json::json!({"resume": cursor})).await?;
    let rest = read_ws(&mut socket, 10_000, ends(run_id)).await?;
    let all = whole(&stack, conversation, run_id).await?;
    let resumed: Vec<SseEvent> = head.iter().chain(&rest).cloned().collect();
    assert_eq!(resumed, all, "a gap or a duplicate across the reconnect");
    // A first message that is not a start is refused, saying why.
    let mut socket = websocket(&stack, conversation, serde_json::json!({"resume": "x"})).await?;
    let closed = tokio::time::timeout(LIMIT, futures::StreamExt::next(&mut socket))
        .await?
        .context("a close")??;
    let tokio_tungstenite::tungstenite::Message::Close(Some(frame)) = closed else {
        anyhow::bail!("expected a close, got {closed:?}");
    };
    assert_eq!(u16::from(frame.code), 1008);
    assert!(frame.reason.contains("resume"), "{}", frame.reason);

    // Direct mode: the goal's answer is its run's stream, to [DONE].
    let response = stack
        .http
        .post(stack.url("/v1/goals"))
        .header("accept", "text/event-stream")
        .json(&serde_json::json!({"goal": PLAN, "conversation_id": "chat-direct"}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let direct = read_sse(response, 10_000, LIMIT, |e| e.data == "[DONE]").await?;
    assert_eq!(direct.last().map(|e| &e.data), Some(&Value::from("[DONE]")));
    let direct_run: RunId = direct[0].data["messageId"]
        .as_str()
        .context("a start")?
        .parse()?;
    let events = stack.wait_finished(direct_run, LIMIT).await?;
    let data: Vec<Value> = direct[..direct.len() - 1]
        .iter()
        .map(|e| e.data.clone())
        .collect();
    assert_eq!(data, expected(direct_run, &events));

    // The run's log as events, resumable by sequence.
    let url = stack.url(&format!("/v1/runs/{direct_run}/events"));
    let log = read_sse(stack.http.get(&url).send().await?, 10_000, LIMIT, |e| {
        e.data["body"]["RunFinished"].is_object()
    })
    .await?;
    assert_eq!(log.len(), events.len());
    assert_eq!(log[0].id.as_deref(), Some("1"));
    let later = read_sse(
        stack
            .http
            .get(&url)
            .header("Last-Event-ID", "3")
            .send()
            .await?,
        10_000,
        LIMIT,
        |e| e.data["body"]["RunFinished"].is_object(),
    )
    .await?;
    assert_eq!(later[0].id.as_deref(), Some("4"));
    assert_eq!(later.len(), events.len() - 3);
    Ok(())
}

#[tokio::test]
async fn dispatch_attach_follows_a_conversation_in_a_terminal() -> Result<()> {
    let stack = stack(1).await?;
    let conversation = "chat-attach";
    let run_id = stack.submit(PLAN, conversation, 60_000).await?;
    // From the oldest chunk buffered, until the run ends; its exit code says how.
    let out = stack.cli(&[
        "attach",
        conversation,
        "--all",
        "--exit",
        "--format",
        "json",
    ])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<SseEvent> = out
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            SseEvent {
                id: v["id"].as_str().map(str::to_owned),
                data: v["chunk"].clone(),
            }
        })
        .collect();
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(text_of(&lines), model_text(&events));
    assert!(
        lines[0]
            .id
            .as_deref()
            .unwrap()
            .ends_with(&run_id.to_string())
    );
    let out = stack.cli(&["attach", conversation, "--all", "--exit"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("● run {run_id} done")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("→ test.sleep"), "{}", out.stdout);
    let bad = stack.cli(&["attach", "no spaces"])?;
    assert_eq!(bad.code, Some(125));
    Ok(())
}

#[tokio::test]
async fn a_background_result_reaches_the_stream_and_a_signed_callback_that_failed_twice()
-> Result<()> {
    use base64::Engine as _;
    let mut stack = Stack::with_test_tools().await?;
    // The signing secret, stored as `dispatch secret set webhook-signing` would.
    let key_path = dispatch_secrets::key_path(stack.root());
    let key = dispatch_secrets::Key::load_or_create(&key_path)?;
    let secrets = dispatch_secrets::Store::open(&stack.bus, key_path, Some(key)).await?;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::now_v7().as_bytes())
    );
    secrets.set("webhook-signing", &secret).await?;
    // A receiver on the Standard Webhooks library that answers 500 twice first.
    let log = stack.root().join("received.jsonl");
    let (_receiver, port) = dispatch_tests::webhook_receiver(&secret, 2, &log).await?;
    let hosts = format!("127.0.0.1:{port}");
    stack
        .add_with(
            "streamer",
            &[
                "--purge-after",
                "5m",
                "--callback-hosts",
                &hosts,
                // Three tries half a second apart (the default schedule's waits are
                // 5 s, then 5 min: see tests/e2e/deliveries.rs).
                "--delivery-schedule",
                "0s,500ms,500ms",
            ],
        )
        .await?;
    stack.add("dispatcher").await?;
    stack.add("ingress").await?;

    // Started from a conversation whose client goes away at once.
    let conversation = "chat-background";
    let client = open(&stack, conversation, None).await?;
    let response = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&serde_json::json!({
            "goal": PLAN,
            "conversation_id": conversation,
            "callback_url": format!("http://127.0.0.1:{port}/hooks/dispatch?tenant=7"),
        }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let run_id: RunId = response.json::<Value>().await?["run_id"]
        .as_str()
        .context("a run id")?
        .parse()?;
    drop(client);
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);

    // Back later: the result is in the conversation stream.
    let back = whole(&stack, conversation, run_id).await?;
    let end = back
        .iter()
        .find(|e| e.data["type"] == "data-run" && e.data["data"]["status"] == "done")
        .context("the result in the stream")?;
    assert_eq!(end.data["data"]["summary"], finished(&events).summary);

    // The callback got it once, signed, after two failures.
    let received = stack
        .eventually(LIMIT, || async {
            let text = std::fs::read_to_string(&log).ok()?;
            let lines: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            lines.iter().any(|l| l["verified"] == true).then_some(lines)
        })
        .await?;
    let statuses: Vec<i64> = received
        .iter()
        .filter_map(|l| l["status"].as_i64())
        .collect();
    assert_eq!(statuses, [500, 500, 204], "{received:?}");
    let delivered = &received[2];
    assert_eq!(delivered["headers"]["webhook-id"], run_id.to_string());
    let body: Value = serde_json::from_str(delivered["body"].as_str().context("a body")?)?;
    assert_eq!(body["type"], "run.finished");
    assert_eq!(body["data"]["run_id"], run_id.to_string());
    assert_eq!(body["data"]["status"], "done");
    assert_eq!(body["data"]["conversation_id"], conversation);
    // Every try is on the run's delivery record.
    let deliveries = stack
        .bus
        .jetstream()
        .get_stream(dispatch_bus::streams::DELIVERIES)
        .await?;
    let mut attempts = Vec::new();
    let subject = dispatch_bus::subject::delivery(&run_id).to_string();
    let mut seq = 1;
    while let Ok(message) = deliveries
        .direct_get_next_for_subject(subject.as_str(), Some(seq))
        .await
    {
        seq = message.sequence + 1;
        attempts.push(
            <dispatch_proto::command::v1::DeliveryAttempt as prost::Message>::decode(
                &message.payload[..],
            )?,
        );
    }
    let summary: Vec<(u32, u32, bool)> = attempts
        .iter()
        .map(|a| (a.attempt, a.status, a.delivered))
        .collect();
    assert_eq!(summary, [(1, 500, false), (2, 500, false), (3, 204, true)]);
    assert_eq!(
        attempts[0].url,
        format!("http://127.0.0.1:{port}/hooks/dispatch")
    );
    // And nothing more comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = std::fs::read_to_string(&log)?;
    assert_eq!(text.lines().count(), 3);

    // A host the streamer does not allow is not called: given up, and said so.
    let elsewhere = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&serde_json::json!({"goal": PLAN, "callback_url": "http://127.0.0.1:1/x"}))
        .send()
        .await?;
    let elsewhere: RunId = elsewhere.json::<Value>().await?["run_id"]
        .as_str()
        .context("a run id")?
        .parse()?;
    stack.wait_finished(elsewhere, LIMIT).await?;
    let subject = dispatch_bus::subject::delivery(&elsewhere).to_string();
    let refused = stack
        .eventually(LIMIT, || async {
            let message = deliveries
                .direct_get_last_for_subject(subject.as_str())
                .await
                .ok()?;
            <dispatch_proto::command::v1::DeliveryAttempt as prost::Message>::decode(
                &message.payload[..],
            )
            .ok()
        })
        .await?;
    assert!(refused.gave_up && !refused.delivered, "{refused:?}");
    assert!(
        refused.error.contains("--callback-hosts"),
        "{}",
        refused.error
    );

    // A callback that is not an http(s) URL is refused at the door.
    let refused = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&serde_json::json!({"goal": "x", "callback_url": "ftp://h/x"}))
        .send()
        .await?;
    assert_eq!(refused.status(), 400);
    let problem: Value = refused.json().await?;
    assert_eq!(problem["code"], "invalid_callback");
    Ok(())
}

#[tokio::test]
async fn the_vercel_ai_sdk_reads_a_run_and_assembles_its_message() -> Result<()> {
    let stack = stack(1).await?;
    // The SDK resolves from where the script is: beside the installed packages.
    let script = dispatch_testkit::mcp_servers().join("ai_sdk_reader.mjs");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/ai_sdk_reader.mjs"),
        &script,
    )?;
    let body = serde_json::json!({"goal": PLAN, "conversation_id": "chat-sdk"}).to_string();
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .args([&stack.url("/v1/goals"), &stack.api_key, &body])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let message: Value = serde_json::from_slice(&out.stdout)?;
    let run_id: RunId = message["id"].as_str().context("an id")?.parse()?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(message["role"], "assistant");
    let parts = message["parts"].as_array().context("parts")?;
    let text: String = parts
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(text, model_text(&events));
    // Tool calls with their results, the run's own data parts, a step per leaf.
    let sleeps = parts
        .iter()
        .filter(|p| p["type"] == "tool-test.sleep" && p["state"] == "output-available")
        .count();
    assert_eq!(sleeps, 3, "{parts:?}");
    assert!(parts.iter().any(|p| p["type"] == "data-plan"));
    let run = parts
        .iter()
        .find(|p| p["type"] == "data-run")
        .context("the run's state")?;
    assert_eq!(run["data"]["status"], "done");
    assert_eq!(
        parts.iter().filter(|p| p["type"] == "step-start").count(),
        3
    );
    Ok(())
}

#[tokio::test]
async fn the_vercel_ai_sdk_reads_chat_turns_as_they_stream() -> Result<()> {
    let stack = stack(1).await?;
    let script = dispatch_testkit::mcp_servers().join("ai_sdk_reader.mjs");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/ai_sdk_reader.mjs"),
        &script,
    )?;
    let url = stack.url("/v1/conversations/sdk-chat/messages");
    let mut texts = Vec::new();
    for said in ["My name is Grace.", "What is my name?"] {
        let body = serde_json::json!({ "text": said }).to_string();
        let out = tokio::process::Command::new("node")
            .arg(&script)
            .args([&url, &stack.api_key, &body])
            .output()
            .await?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let message: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(message["role"], "assistant");
        let parts = message["parts"].as_array().context("parts")?;
        let run = parts
            .iter()
            .find(|p| p["type"] == "data-run")
            .context("the turn's state")?;
        assert_eq!(run["data"]["status"], "done", "{parts:?}");
        texts.push(
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<String>(),
        );
    }
    // The second turn's answer, as the SDK assembled it, was given the first.
    assert!(
        texts[0].contains("You said: My name is Grace."),
        "{texts:?}"
    );
    assert!(
        texts[1].contains("the last one said: My name is Grace."),
        "{texts:?}"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_clients_submit_read_watch_and_resume_with_the_same_keys() -> Result<()> {
    use dispatch_proto::api::v1::dispatch_client::DispatchClient;
    use dispatch_proto::api::v1::{
        GetRunRequest, ListRunsRequest, SubmitGoalRequest, SubscribeConversationRequest,
        WatchRunRequest,
    };
    let stack = stack(1).await?;
    let channel = tonic::transport::Channel::from_shared(stack.grpc_url())?
        .connect()
        .await?;
    let mut client = stack.grpc_client().await?;

    // Without a key: refused.
    let mut anonymous = DispatchClient::new(channel.clone());
    let refused = anonymous
        .get_run(GetRunRequest { id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Follow the conversation first, then submit.
    let conversation = "chat-grpc";
    let mut chunks = client
        .subscribe_conversation(SubscribeConversationRequest {
            conversation_id: conversation.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let submitted = client
        .submit_goal(SubmitGoalRequest {
            goal: PLAN.into(),
            conversation_id: conversation.into(),
            idempotency_key: "grpc-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let run_id: RunId = submitted.run_id.parse()?;
    assert!(!submitted.replayed);
    // The same key again: the same run.
    let again = client
        .submit_goal(SubmitGoalRequest {
            goal: PLAN.into(),
            conversation_id: conversation.into(),
            idempotency_key: "grpc-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        (again.run_id.as_str(), again.replayed),
        (submitted.run_id.as_str(), true)
    );
    let bad = client
        .submit_goal(SubmitGoalRequest::default())
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().starts_with("invalid_goal"),
        "{}",
        bad.message()
    );

    // Half the run's chunks, then a resume with the cursor: exactly the rest.
    let mut head = Vec::new();
    while head.len() < 5 {
        let chunk = chunks.message().await?.context("the stream ended")?;
        head.push(chunk);
    }
    drop(chunks);
    let cursor = head.last().map(|c| c.id.clone()).context("an id")?;
    let mut rest = Vec::new();
    let mut resumed = client
        .subscribe_conversation(SubscribeConversationRequest {
            conversation_id: conversation.into(),
            cursor,
            ..Default::default()
        })
        .await?
        .into_inner();
    let ended = ends(run_id);
    loop {
        let chunk = resumed.message().await?.context("the stream ended")?;
        let event = SseEvent {
            id: Some(chunk.id.clone()),
            data: serde_json::from_str(&chunk.chunk_json)?,
        };
        rest.push(event.clone());
        if ended(&event) {
            break;
        }
    }
    let all = whole(&stack, conversation, run_id).await?;
    let resumed: Vec<SseEvent> = head
        .iter()
        .map(|c| SseEvent {
            id: Some(c.id.clone()),
            data: serde_json::from_str(&c.chunk_json).unwrap(),
        })
        .chain(rest)
        .collect();
    assert_eq!(resumed, all, "a gap or a duplicate across the reconnect");

    // The run: watched to its end, read, listed.
    let mut watched = client
        .watch_run(WatchRunRequest {
            run_id: run_id.to_string(),
            after_seq: 2,
        })
        .await?
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(event) = watched.message().await? {
        seqs.push(event.seq);
    }
    let events = stack.wait_finished(run_id, LIMIT).await?;
    assert_eq!(seqs, (3..=events.len() as u64).collect::<Vec<_>>());
    let run = client
        .get_run(GetRunRequest {
            id: run_id.to_string(),
        })
        .await?
        .into_inner();
    assert_eq!(run.status(), dispatch_proto::api::v1::TaskStatus::Done);
    assert_eq!(
        run.origin, "api",
        "goals over gRPC (and HTTP) come from the api"
    );
    assert_eq!(run.leaves_done, 3);
    let listed = client
        .list_runs(ListRunsRequest {
            all: true,
            conversation_id: Some(conversation.into()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    assert_eq!(listed.runs[0].run_id, run_id.to_string());

    // Health and reflection, without a key, as grpcurl uses them.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dispatch.api.v1.Dispatch".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers.message().await?.context("an answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"dispatch.api.v1.Dispatch".to_owned()),
        "{names:?}"
    );
    Ok(())
}

#[tokio::test]
async fn websockets_count_against_the_connection_limit() -> Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    stack
        .add_with(
            "ingress",
            &["--listen", "127.0.0.1:0", "--max-connections", "2"],
        )
        .await?;
    let first = websocket(&stack, "chat-limit", serde_json::json!({})).await?;
    let second = websocket(&stack, "chat-limit", serde_json::json!({})).await?;
    // Both sockets hold their slots: an HTTP request finds none. (Ingress answers 503
    // and closes; a client racing that close may see a reset instead, so it asks again
    // until it reads the answer.)
    let http = dispatch_tests::http_client(&stack.api_key)?;
    stack
        .eventually(LIMIT, || async {
            let response = http.get(stack.url("/v1/runs")).send().await.ok()?;
            assert_ne!(
                response.status(),
                200,
                "a request got a slot the sockets hold"
            );
            (response.status() == 503).then_some(())
        })
        .await?;
    drop((first, second));
    stack
        .eventually(LIMIT, || async {
            let response = http.get(stack.url("/v1/runs")).send().await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await?;
    Ok(())
}
