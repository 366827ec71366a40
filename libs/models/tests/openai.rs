//! The OpenAI-compatible provider against a stand-in server that speaks the real wire
//! protocol: its successful answers are bodies and SSE streams recorded from real
//! servers (`libs/testkit/captures/openai/record.py`: llama-server with Qwen2.5-Coder-0.5B, and
//! llama-cpp-python for native streamed tool calls), replayed byte for byte; its
//! failures (429 with Retry-After, 500, a stream cut off, a stream too slow for the
//! deadline) are made on purpose, and so are a hostile server's streams (a line that
//! never ends, bytes trickled for ever, chunks that add nothing, sent without end).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dispatch_models::openai::{Config, OpenAi, Secret};
use dispatch_models::{
    AUTHOR_TEMPERATURE, AuthorRequest, CallForm, Delta, Exchange, Provider, Retry, ToolCall,
    ToolSpec, TurnRequest,
};
use dispatch_testkit::model::{Reply, StandIn};
use serde_json::{Value, json};

const KEY: &str = "sk-test-0123456789abcdef";

fn provider(url: &str) -> OpenAi {
    let mut config = Config::new(url, "recorded");
    config.api_key = Some(Secret::new(KEY));
    config.backoff = Duration::from_millis(20);
    OpenAi::new(config).unwrap()
}

fn tools() -> Vec<ToolSpec> {
    ["read_file", "write_file", "list_files"]
        .into_iter()
        .map(|name| ToolSpec {
            name: name.into(),
            description: format!("{name} under scratch/").into(),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}})
                .into(),
        })
        .collect()
}

/// A turn's history of one `write_file` call with `args_json`, answered `result`.
fn wrote(args_json: &str, result: &str) -> Vec<Exchange> {
    vec![
        Exchange::Assistant {
            text: String::new(),
            tool_calls: vec![ToolCall {
                id: "l0-t0-c0".into(),
                tool: "write_file".into(),
                args_json: args_json.into(),
            }],
        },
        Exchange::ToolResult {
            call_id: "l0-t0-c0".into(),
            tool: "write_file".into(),
            result: Ok(result.into()),
        },
    ]
}

fn turn_request(history: Vec<Exchange>) -> TurnRequest {
    TurnRequest {
        chat: None,
        earlier: Vec::new(),
        goal: "Write the word hello into a file".into(),
        leaf: dispatch_plan::parse(
            "#+TITLE: t\n* TODO Write hello to scratch/hello.txt\n  :done-when: test -s scratch/hello.txt\n",
        )
        .unwrap()
        .leaves[0]
            .clone(),
        history,
        tools: tools(),
        deltas: None,
    }
}

fn author_request() -> AuthorRequest {
    AuthorRequest {
        goal: "Write the word hello into scratch/hello.txt".into(),
        grammar: dispatch_plan::GRAMMAR,
        retry: None,
        temperature: AUTHOR_TEMPERATURE,
        tools: vec![ToolSpec {
            name: "fs.list_directory".into(),
            description: "List a directory.\nMore detail the author does not need.".into(),
            parameters: json!({"type": "object"}).into(),
        }],
    }
}

#[tokio::test]
async fn a_recorded_plan_is_read_streamed_or_whole() {
    // The 0.5B model's plans ran into their token limit; the 1.5B model's ended.
    for (name, cut_off) in [
        ("llama-server/author.sse", true),
        ("llama-server/author.json", true),
        ("llama-server-1.5b/author.json", false),
    ] {
        let (stand_in, url) = StandIn::start(vec![Reply::Replay(name)]).await;
        let reply = provider(&url).author(author_request()).await.unwrap();
        assert!(reply.text.contains("#+TITLE"), "{name}: {}", reply.text);
        assert_eq!(reply.cut_off, cut_off, "{name}");
        assert!(
            reply.usage.completion_tokens > 0,
            "{name}: {:?}",
            reply.usage
        );
        let (auth, body) = &stand_in.requests()[0];
        assert_eq!(auth.as_deref(), Some(format!("Bearer {KEY}").as_str()));
        let temperature = body["temperature"].as_f64().unwrap();
        assert!(
            (temperature - f64::from(AUTHOR_TEMPERATURE)).abs() < 1e-6,
            "{temperature}"
        );
        assert_eq!(body["stream"], json!(true));
        // The grammar, then the tools the steps can use, by name and first line.
        let system = body["messages"][0]["content"].as_str().unwrap();
        assert_eq!(
            system,
            format!(
                "{}\n\nTools the steps can use:\n- fs.list_directory: List a directory.",
                dispatch_plan::GRAMMAR
            )
        );
        // It writes a plan, not calls: no tools are offered to it as functions.
        assert!(body.get("tools").is_none());
    }
}

#[tokio::test]
async fn a_call_the_model_wrote_as_json_in_its_text_is_a_call() {
    let (stand_in, url) = StandIn::start(vec![Reply::Replay("llama-server/text-call.sse")]).await;
    let reply = provider(&url).turn(turn_request(vec![])).await.unwrap();
    assert_ne!(
        reply.form,
        CallForm::Native,
        "recorded from a server that writes calls as text"
    );
    assert_ne!(reply.form, CallForm::None, "{}", reply.text);
    assert_eq!(reply.tool_calls.len(), 1, "{reply:?}");
    assert_eq!(reply.tool_calls[0].tool, "write_file");
    let args: Value = serde_json::from_str(&reply.tool_calls[0].args_json).unwrap();
    assert!(args["path"].as_str().unwrap().contains("hello"), "{args}");
    // The request offered the tools with their schemas.
    let (_, body) = &stand_in.requests()[0];
    assert_eq!(body["tools"][1]["function"]["name"], json!("write_file"));
    assert_eq!(
        body["tools"][1]["function"]["parameters"]["type"],
        json!("object")
    );
    assert_eq!(body["tool_choice"], json!("auto"));
}

#[tokio::test]
async fn native_streamed_tool_calls_are_put_together_from_their_deltas() {
    for name in [
        "llama-cpp-python/native-call.sse",
        "llama-cpp-python/native-call.json",
    ] {
        let (_stand_in, url) = StandIn::start(vec![Reply::Replay(name)]).await;
        let reply = provider(&url).turn(turn_request(vec![])).await.unwrap();
        assert_eq!(reply.form, CallForm::Native, "{name}");
        assert_eq!(reply.tool_calls.len(), 1, "{name}: {reply:?}");
        assert_eq!(reply.tool_calls[0].tool, "write_file");
        let args: Value = serde_json::from_str(&reply.tool_calls[0].args_json)
            .unwrap_or_else(|e| panic!("{name}: {e}: {}", reply.tool_calls[0].args_json));
        assert!(args.is_object());
    }
}

#[tokio::test]
async fn the_history_goes_back_with_call_ids() {
    let (stand_in, url) = StandIn::start(vec![Reply::Replay("llama-server/final.sse")]).await;
    let history = wrote(
        r#"{"path":"scratch/hello.txt","content":"hello"}"#,
        "wrote 5 bytes",
    );
    let reply = provider(&url).turn(turn_request(history)).await.unwrap();
    // The recorded model answered with one JSON call per line until its token limit cut
    // the last one off: that is text, not calls.
    assert!(reply.text.contains("write_file"), "{}", reply.text);
    assert_eq!((reply.tool_calls.len(), reply.form), (0, CallForm::None));
    let (_, body) = &stand_in.requests()[0];
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages[2]["tool_calls"][0]["id"], json!("l0-t0-c0"));
    assert_eq!(messages[3]["role"], json!("tool"));
    assert_eq!(messages[3]["tool_call_id"], json!("l0-t0-c0"));
}

#[tokio::test]
async fn a_long_answer_that_made_calls_is_shown_again_cut() {
    let (stand_in, url) = StandIn::start(vec![Reply::Replay("llama-server/final.sse")]).await;
    let call = "```json\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"scratch/hello.txt\", \"content\": \"hello\"}}\n```\n";
    let mut history = wrote(
        r#"{"path":"scratch/hello.txt","content":"hello"}"#,
        "wrote 5 bytes",
    );
    // As the 1.5B model wrote it: the same call over and over to its token limit.
    history[0] = match &history[0] {
        Exchange::Assistant { tool_calls, .. } => Exchange::Assistant {
            text: call.repeat(40),
            tool_calls: tool_calls.clone(),
        },
        other => other.clone(),
    };
    provider(&url).turn(turn_request(history)).await.unwrap();
    let (_, body) = &stand_in.requests()[0];
    let shown = body["messages"][2]["content"].as_str().unwrap();
    assert!(shown.starts_with(call), "{shown}");
    assert!(shown.chars().count() <= 1_002, "{}", shown.len());
    assert!(shown.ends_with(" …"), "{shown}");
    assert_eq!(
        body["messages"][2]["tool_calls"][0]["id"],
        json!("l0-t0-c0")
    );
}

#[tokio::test]
async fn how_a_step_is_given_up_is_said_only_after_a_call_failed() {
    let replies = vec![
        Reply::Replay("llama-server/final.sse"),
        Reply::Replay("llama-server/final.sse"),
    ];
    let (stand_in, url) = StandIn::start(replies).await;
    let good = wrote(
        r#"{"path":"scratch/hello.txt","content":"hello"}"#,
        "wrote 5 bytes",
    );
    let mut failed = good.clone();
    failed[1] = Exchange::ToolResult {
        call_id: "l0-t0-c0".into(),
        tool: "write_file".into(),
        result: Err("disk full".into()),
    };
    for history in [good, failed] {
        provider(&url).turn(turn_request(history)).await.unwrap();
    }
    let last_words: Vec<String> = stand_in
        .requests()
        .iter()
        .map(|(_, body)| {
            let messages = body["messages"].as_array().unwrap();
            let last = messages.last().unwrap();
            assert_eq!(last["role"], json!("user"));
            last["content"].as_str().unwrap().to_owned()
        })
        .collect();
    // Told how to give up after results that show the step done, a small model gives
    // up (recorded with the 1.5B model): the word after good results leaves it out.
    assert!(!last_words[0].contains("NOT DONE"), "{}", last_words[0]);
    assert!(
        last_words[0].contains("show the step done"),
        "{}",
        last_words[0]
    );
    assert!(last_words[1].contains("NOT DONE:"), "{}", last_words[1]);
    assert!(
        last_words[1].contains("try it another way"),
        "{}",
        last_words[1]
    );
}

#[tokio::test]
async fn a_gate_that_did_not_pass_is_said_to_the_model() {
    let (stand_in, url) = StandIn::start(vec![Reply::Replay("llama-server/final.sse")]).await;
    let history = vec![
        Exchange::Assistant {
            text: "The step is done.".into(),
            tool_calls: vec![],
        },
        Exchange::GateFailed {
            command: "test -s scratch/REPORT.org".into(),
            detail: "scratch/REPORT.org does not exist".into(),
        },
    ];
    provider(&url).turn(turn_request(history)).await.unwrap();
    let (_, body) = &stand_in.requests()[0];
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert_eq!(messages[2]["role"], json!("assistant"));
    assert_eq!(messages[3]["role"], json!("user"));
    let said = messages[3]["content"].as_str().unwrap();
    assert!(
        said.contains(
            "`test -s scratch/REPORT.org` does not pass (scratch/REPORT.org does not exist)"
        ),
        "{said}"
    );
    // It called no tool in the step, and is told so.
    assert!(
        said.contains("You have called no tool in this step"),
        "{said}"
    );

    // After a call, it is told to go on.
    let (stand_in, url) = StandIn::start(vec![Reply::Replay("llama-server/final.sse")]).await;
    let mut history = wrote(r#"{"path":"scratch/a.txt","content":"x"}"#, "wrote 1 byte");
    history.extend([Exchange::GateFailed {
        command: "test -s scratch/REPORT.org".into(),
        detail: "scratch/REPORT.org does not exist".into(),
    }]);
    provider(&url).turn(turn_request(history)).await.unwrap();
    let (_, body) = &stand_in.requests()[0];
    let said = body["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        said.ends_with("make the calls it still needs, then answer."),
        "{said}"
    );
}

#[tokio::test]
async fn a_step_is_told_what_the_earlier_steps_found() {
    let (stand_in, url) = StandIn::start(vec![Reply::Replay("llama-server/final.sse")]).await;
    let mut request = turn_request(vec![]);
    request.earlier = vec![dispatch_models::EarlierStep {
        title: "List the files".into(),
        found: "fs.list_directory returned:\n[FILE] notes.md\n[FILE] todo.txt\n".into(),
    }];
    provider(&url).turn(request).await.unwrap();
    let (_, body) = &stand_in.requests()[0];
    let step = body["messages"][1]["content"].as_str().unwrap();
    let (before, after) = step
        .split_once("This step: Write hello to scratch/hello.txt")
        .unwrap_or_else(|| panic!("{step}"));
    assert!(before.contains("What the earlier steps found:"), "{step}");
    assert!(
        before.contains("## List the files\nfs.list_directory returned:\n[FILE] notes.md"),
        "{step}"
    );
    assert!(!after.contains("notes.md"), "{step}");
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_it_asks_for() {
    let (stand_in, url) = StandIn::start(vec![
        Reply::Status(429, Some("1"), "slow down".into()),
        Reply::Replay("llama-server/author.sse"),
    ])
    .await;
    let started = Instant::now();
    let reply = provider(&url).author(author_request()).await.unwrap();
    assert!(reply.text.contains("#+TITLE"));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stand_in.requests().len(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_without_the_key() {
    let (stand_in, url) = StandIn::start(vec![
        Reply::Status(500, None, "oops".into()),
        Reply::Replay("llama-server/author.sse"),
    ])
    .await;
    provider(&url).author(author_request()).await.unwrap();
    assert_eq!(stand_in.requests().len(), 2);

    // A server that keeps failing, and echoes the key: 1 try + 3 retries, then an error
    // that names the status and masks the key.
    let echo = format!("internal error for Bearer {KEY}");
    let (stand_in, url) = StandIn::start(
        (0..4)
            .map(|_| Reply::Status(503, None, echo.clone()))
            .collect(),
    )
    .await;
    let err = provider(&url)
        .author(author_request())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(stand_in.requests().len(), 4);
    assert!(err.contains("503"), "{err}");
    assert!(!err.contains(KEY), "{err}");
    assert!(err.contains("********"), "{err}");
    assert!(!format!("{:?}", provider(&url)).contains(KEY));

    // A client error is not retried.
    let (stand_in, url) = StandIn::start(vec![Reply::Status(400, None, "bad".into())]).await;
    let err = provider(&url)
        .author(author_request())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
    assert_eq!(stand_in.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_cut_off_midway_is_asked_again() {
    let (stand_in, url) = StandIn::start(vec![
        Reply::CutAfter("llama-server/author.sse", 300),
        Reply::Replay("llama-server/author.sse"),
    ])
    .await;
    let reply = provider(&url).author(author_request()).await.unwrap();
    assert!(reply.text.contains("#+TITLE"));
    assert_eq!(stand_in.requests().len(), 2);
}

#[tokio::test]
async fn a_deadline_cancels_a_slow_stream_and_hangs_up() {
    let (stand_in, url) = StandIn::start(vec![Reply::Slowly(
        "llama-server/author.sse",
        Duration::from_millis(200),
    )])
    .await;
    let provider = provider(&url);
    let cut = tokio::time::timeout(
        Duration::from_millis(700),
        provider.author(author_request()),
    )
    .await;
    assert!(cut.is_err(), "the slow stream finished within the deadline");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stand_in.hung_up.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the request was not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn bad_configuration_is_refused_with_the_reason() {
    for (url, model, expected) in [
        ("not a url", "m", "model URL"),
        ("ftp://host/v1", "m", "not http(s)"),
        ("http://127.0.0.1:1/v1", " ", "no model name"),
    ] {
        let err = OpenAi::new(Config::new(url, model))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{url}: {err}");
    }
    assert_eq!(format!("{:?}", Secret::new(KEY)), "********");
}

#[tokio::test]
async fn an_answer_too_large_to_hold_is_refused_not_read() {
    let huge = "x".repeat(3 << 20);
    let (stand_in, url) = StandIn::start(vec![Reply::Status(200, None, huge)]).await;
    let err = provider(&url)
        .author(author_request())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("longer than"), "{err}");
    assert_eq!(
        stand_in.requests().len(),
        1,
        "a refused answer is not asked again"
    );
}

#[tokio::test]
async fn a_turn_streams_its_text_and_says_when_it_starts_over() {
    let (stand_in, url) = StandIn::start(vec![
        Reply::CutAfter("llama-server/text-call.sse", 1200),
        Reply::Replay("llama-server/text-call.sse"),
    ])
    .await;
    let (sink, mut received) = tokio::sync::mpsc::unbounded_channel();
    let mut request = turn_request(vec![]);
    request.deltas = Some(sink);
    let reply = provider(&url).turn(request).await.unwrap();
    assert_eq!(stand_in.requests().len(), 2);
    let mut deltas = Vec::new();
    while let Ok(delta) = received.try_recv() {
        deltas.push(delta);
    }
    let restart = deltas
        .iter()
        .rposition(|d| *d == Delta::Restart)
        .expect("the cut-off answer is said to be void");
    // (What the first try streamed before the cut, if the cut let any through, is
    // before the restart.)
    let text_of = |deltas: &[Delta]| -> String {
        deltas
            .iter()
            .map(|d| match d {
                Delta::Text(text) => text.as_str(),
                Delta::Restart => "",
            })
            .collect()
    };
    // After the restart, the pieces are the answer, exactly, in several pieces.
    assert_eq!(text_of(&deltas[restart + 1..]), reply.text);
    assert!(deltas[restart + 1..].len() > 2, "{deltas:?}");
}

#[tokio::test]
async fn a_retry_shows_the_model_its_outline_unless_it_was_cut_off() {
    let error = "Your previous outline was invalid (unusable_gate: ...). Emit a corrected org outline only.";
    for (answer, expected) in [
        (
            Some("* TODO x\n  :done-when: curl x"),
            json!(["system", "user", "assistant", "user"]),
        ),
        (None, json!(["system", "user"])),
    ] {
        let (stand_in, url) =
            StandIn::start(vec![Reply::Replay("llama-server-1.5b/author.json")]).await;
        let request = AuthorRequest {
            retry: Some(Retry {
                answer: answer.map(str::to_owned),
                error: error.into(),
            }),
            ..author_request()
        };
        provider(&url).author(request).await.unwrap();
        let (_, body) = &stand_in.requests()[0];
        let messages = body["messages"].as_array().unwrap();
        let roles: Vec<&Value> = messages.iter().map(|m| &m["role"]).collect();
        assert_eq!(json!(roles), expected, "{answer:?}");
        let last = messages.last().unwrap()["content"].as_str().unwrap();
        assert!(last.ends_with(error), "{last}");
        if let Some(answer) = answer {
            assert_eq!(messages[2]["content"], json!(answer));
            assert_eq!(
                messages[1]["content"],
                json!("Goal: Write the word hello into scratch/hello.txt")
            );
        }
    }
}

/// A provider whose whole call may take `timeout`.
fn provider_within(url: &str, timeout: Duration) -> OpenAi {
    let mut config = Config::new(url, "hostile");
    config.timeout = timeout;
    config.backoff = Duration::from_millis(20);
    OpenAi::new(config).unwrap()
}

/// Waits (generously) for the stand-in to see the client hang up.
async fn hangs_up(stand_in: &StandIn) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stand_in.hung_up.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the client did not hang up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_line_that_never_ends_fails_the_call_at_the_line_limit() {
    // 12 MiB of one line at full speed, then silence with the connection open: what
    // cost a dispatcher 46 CPU-seconds and outlived its deadline.
    let (stand_in, url) = StandIn::start(vec![Reply::Unterminated(12 << 20)]).await;
    let err = provider_within(&url, Duration::from_secs(60))
        .turn(turn_request(vec![]))
        .await
        .unwrap_err()
        .to_string();
    // Not the deadline: the limit, at once.
    assert!(
        err.contains(&format!(
            "a line of the event stream is longer than {} bytes",
            dispatch_models::sse::MAX_LINE_BYTES
        )),
        "{err}"
    );
    assert_eq!(
        stand_in.requests().len(),
        1,
        "a broken server is not asked again"
    );
    hangs_up(&stand_in).await;
}

#[tokio::test]
async fn a_server_that_trickles_is_cut_at_the_deadline_of_the_whole_call() {
    // One byte of a line every 100 ms: never silent, never an answer. Each attempt
    // would get it again.
    let (stand_in, url) = StandIn::start(
        (0..4)
            .map(|_| Reply::Trickle(Duration::from_millis(100)))
            .collect(),
    )
    .await;
    let started = Instant::now();
    let err = provider_within(&url, Duration::from_millis(1500))
        .turn(turn_request(vec![]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no complete answer within 1500 ms"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // The deadline is the call's, not each attempt's: no retry starts after it.
    assert_eq!(stand_in.requests().len(), 1);
    hangs_up(&stand_in).await;
}

#[tokio::test]
async fn a_retry_the_deadline_leaves_no_time_for_is_not_made() {
    let (stand_in, url) = StandIn::start(vec![
        Reply::Status(503, Some("30"), "busy".into()),
        Reply::Replay("llama-server/author.sse"),
    ])
    .await;
    let err = provider_within(&url, Duration::from_secs(5))
        .author(author_request())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("503"), "{err}");
    assert!(
        err.contains("not retried: no complete answer within 5000 ms"),
        "{err}"
    );
    assert_eq!(stand_in.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_of_chunks_that_add_nothing_is_cut_at_the_stream_limit() {
    let (stand_in, url) = StandIn::start(vec![Reply::Endless]).await;
    let err = provider_within(&url, Duration::from_secs(120))
        .turn(turn_request(vec![]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "the event stream is longer than {} bytes",
            dispatch_models::sse::MAX_STREAM_BYTES
        )),
        "{err}"
    );
    assert_eq!(stand_in.requests().len(), 1);
    hangs_up(&stand_in).await;
}
