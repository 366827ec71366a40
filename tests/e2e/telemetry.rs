//! What an operator's stack sees of Dispatch: traces over OTLP, metrics at `/metrics`,
//! JSON logs. Every service is a real process exporting to a real OTLP/HTTP receiver in
//! this test (decoded with the official OpenTelemetry protobuf definitions); metrics are
//! parsed with the Prometheus project's own Python client.
//!
//! - one run is one trace from `POST /v1/goals` to its end, with spans from ingress,
//!   the dispatcher, policy, connectors, the streamer and the ledger, each a child of
//!   the span that published the message it took;
//! - a run taken over by a second dispatcher after the first was SIGKILLed stays in
//!   that trace and links back to the first attempt's span;
//! - a model turn against the OpenAI-compatible stand-in is a GenAI `chat` span with
//!   its token counts, and the API key is in no span, metric or log;
//! - each service's `/metrics` counts what ran; JSON log lines carry trace ids.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use dispatch_bus::RunId;
use dispatch_proto::run::v1::{Decision, RunStatus, run_event::Body};
use dispatch_testkit::model::{Reply, StandIn};
use dispatch_tests::otlp::{Receiver, Span};
use dispatch_tests::{Stack, finished};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
const RUNS: usize = 3;

fn plan(n: usize) -> String {
    format!(
        "#+TITLE: Traced {n}\n* TODO Count once\n  - call: test.count {{\"key\": \"traced\"}}\n  :done-when: true\n"
    )
}

/// The flags and environment every service of these stacks gets: metrics on a free
/// port, JSON logs, and OTLP export to `receiver`.
fn telemetry_env(receiver: &Receiver) -> Vec<(&'static str, String)> {
    let mut env = receiver.env();
    env.push(("DISPATCH_LOG_FORMAT", "json".into()));
    env.push(("DISPATCH_METRICS_LISTEN", "127.0.0.1:0".into()));
    env
}

/// A stack of every service but the dispatcher, exporting to `receiver`.
async fn traced_stack(receiver: &Receiver) -> Result<Stack> {
    let env = telemetry_env(receiver);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut stack = Stack::start(&[]).await?;
    let policy = stack.test_policy()?;
    let policy = policy.to_str().context("utf-8")?.to_owned();
    stack.add_env("ledger", &env).await?;
    stack
        .add_with_env("policy", &["--policy", &policy], &env)
        .await?;
    stack
        .add_with_env("connectors", &["--test-tools"], &env)
        .await?;
    stack.add_env("streamer", &env).await?;
    stack.add_env("ingress", &env).await?;
    Ok(stack)
}

async fn add_dispatcher(stack: &mut Stack, receiver: &Receiver, args: &[&str]) -> Result<()> {
    let env = telemetry_env(receiver);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    stack.add_with_env("dispatcher", args, &env).await?;
    Ok(())
}

async fn post_goal(stack: &Stack, goal: &str) -> Result<RunId> {
    let response = stack
        .http
        .post(stack.url("/v1/goals"))
        .json(&serde_json::json!({ "goal": goal }))
        .send()
        .await?;
    ensure!(response.status() == 202, "{}", response.text().await?);
    let body: Value = response.json().await?;
    Ok(body["run_id"].as_str().context("a run id")?.parse()?)
}

/// The spans of `trace`, by span id.
fn of_trace(spans: &[Span], trace: &str) -> BTreeMap<String, Span> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .map(|s| (s.span_id.clone(), s.clone()))
        .collect()
}

/// Whether `span` descends from a span named `name` (of `service`) in `spans`.
fn descends_from(spans: &BTreeMap<String, Span>, span: &Span, service: &str, name: &str) -> bool {
    let mut at = span;
    for _ in 0..64 {
        let Some(parent) = spans.get(&at.parent_span_id) else {
            return false;
        };
        if parent.service == service && parent.name == name {
            return true;
        }
        at = parent;
    }
    false
}

fn one<'a>(spans: &'a BTreeMap<String, Span>, service: &str, name: &str) -> Result<&'a Span> {
    spans
        .values()
        .find(|s| s.service == service && s.name == name)
        .with_context(|| {
            let seen: BTreeSet<_> = spans
                .values()
                .map(|s| format!("{}: {}", s.service, s.name))
                .collect();
            format!("no {service} span {name:?} in the trace; it has {seen:?}")
        })
}

/// Waits until the receiver holds a trace through every listed service and, when
/// `whole`, every span of it has its parent there too; returns its spans.
async fn trace_through(
    stack: &Stack,
    receiver: &Receiver,
    trace: &str,
    services: &[&str],
    whole: bool,
) -> Result<BTreeMap<String, Span>> {
    let found = stack
        .eventually(LIMIT, || async {
            let spans = of_trace(&receiver.spans(), trace);
            let present: BTreeSet<&str> = spans.values().map(|s| s.service.as_str()).collect();
            let parented = spans
                .values()
                .all(|s| s.parent_span_id.is_empty() || spans.contains_key(&s.parent_span_id));
            ((parented || !whole) && services.iter().all(|s| present.contains(s))).then_some(spans)
        })
        .await;
    found.map_err(|e| {
        let spans = of_trace(&receiver.spans(), trace);
        let orphans: Vec<String> = spans
            .values()
            .filter(|s| !s.parent_span_id.is_empty() && !spans.contains_key(&s.parent_span_id))
            .map(|s| format!("{}: {} (parent {})", s.service, s.name, s.parent_span_id))
            .collect();
        let all: Vec<String> = spans
            .values()
            .map(|s| format!("{}: {} {} <- {}", s.service, s.name, s.span_id, s.parent_span_id))
            .collect();
        e.context(format!(
            "trace {trace}: {} spans received in all; of this trace {all:#?}; without their parent {orphans:#?}",
            receiver.spans().len()
        ))
    })
}

/// The samples of a service's `/metrics`, parsed by `prometheus_client`.
async fn scrape(stack: &mut Stack, service: &str) -> Result<Vec<Value>> {
    let addr = stack.service(service)?.health().detail["metrics_addr"]
        .as_str()
        .with_context(|| format!("{service} reports no metrics_addr"))?
        .to_owned();
    let response = reqwest::get(format!("http://{addr}/metrics")).await?;
    ensure!(
        response.status() == 200,
        "{service}: GET /metrics answered {}",
        response.status()
    );
    let text = response.bytes().await?;
    let mcp = dispatch_testkit::mcp_servers();
    let mut parse = std::process::Command::new(mcp.join("venv/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/metrics_parse.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut parse.stdin.take().context("stdin")?, &text)?;
    let out = parse.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{service}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The value of the sample `name` whose labels include `labels`, if there is one.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(v))
        })
        .and_then(|s| s["value"].as_f64())
}

#[tokio::test]
async fn one_run_is_one_trace_and_the_metrics_count_what_ran() -> Result<()> {
    let receiver = Receiver::start().await?;
    let mut stack = traced_stack(&receiver).await?;
    add_dispatcher(&mut stack, &receiver, &[]).await?;

    // What the metrics must count, from the runs' logs: decisions by effect, and
    // executions by connector and outcome.
    let mut runs = Vec::new();
    let mut allowed = 0.0;
    let mut executed: BTreeMap<(String, &str), f64> = BTreeMap::new();
    for n in 0..RUNS {
        let run_id = post_goal(&stack, &plan(n)).await?;
        let events = stack.wait_finished(run_id, LIMIT).await?;
        ensure!(
            finished(&events).status == RunStatus::Done as i32,
            "{}",
            finished(&events).reason
        );
        let tool_of: BTreeMap<String, String> = events
            .iter()
            .filter_map(|e| match &e.event.body {
                Some(Body::ToolCallRequested(r)) => Some((r.call_id.clone(), r.tool.clone())),
                _ => None,
            })
            .collect();
        for event in &events {
            let (call, outcome) = match &event.event.body {
                Some(Body::PolicyDecided(d)) => {
                    allowed += f64::from(u8::from(d.decision() == Decision::Allow));
                    continue;
                }
                Some(Body::ToolCallCompleted(c)) => (&c.call_id, "ok"),
                Some(Body::ToolCallFailed(f)) => (&f.call_id, "error"),
                _ => continue,
            };
            let connector = tool_of[call]
                .split('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            *executed.entry((connector, outcome)).or_default() += 1.0;
        }
        runs.push(run_id);
    }
    ensure!(
        executed.contains_key(&("test".to_owned(), "ok")),
        "{executed:?}"
    );

    // The run's trace id, as `inspect` shows it.
    let shown = stack.cli(&["inspect", &runs[0].to_string()])?;
    let view: Value = serde_json::from_str(&shown.stdout)?;
    let trace = view["trace_id"]
        .as_str()
        .context("inspect shows no trace_id")?
        .to_owned();
    let spans = trace_through(
        &stack,
        &receiver,
        &trace,
        &[
            "dispatch-ingress",
            "dispatch-dispatcher",
            "dispatch-policy",
            "dispatch-connectors",
            "dispatch-streamer",
            "dispatch-ledger",
        ],
        true,
    )
    .await?;

    // The request is the root; the goal's publish is its child; the dispatcher's take
    // of the goal and the run follow from it.
    let request = one(&spans, "dispatch-ingress", "POST /v1/goals")?;
    assert!(request.parent_span_id.is_empty(), "{request:?}");
    assert_eq!(request.attributes["http.request.method"], "POST");
    assert_eq!(request.attributes["http.route"], "/v1/goals");
    assert_eq!(request.attributes["http.response.status_code"], "202");
    let publish = one(&spans, "dispatch-ingress", "publish dispatch.goal")?;
    assert_eq!(publish.parent_span_id, request.span_id);
    assert_eq!(publish.attributes["messaging.system"], "nats");
    let run = one(&spans, "dispatch-dispatcher", "run")?;
    assert!(descends_from(
        &spans,
        run,
        "dispatch-ingress",
        "publish dispatch.goal"
    ));
    assert_eq!(run.attributes["run_id"], runs[0].to_string());
    assert_eq!(run.attributes["status"], "done");
    for name in ["plan", "leaf", "tool_call test.count", "gate"] {
        let span = one(&spans, "dispatch-dispatcher", name)?;
        assert!(
            descends_from(&spans, span, "dispatch-dispatcher", "run"),
            "{name}"
        );
    }
    assert_eq!(
        one(&spans, "dispatch-dispatcher", "tool_call test.count")?.attributes["decision"],
        "DECISION_ALLOW"
    );
    // The offline worker's turns are GenAI chat spans too.
    let chat = one(&spans, "dispatch-dispatcher", "chat offline")?;
    assert_eq!(chat.attributes["gen_ai.operation.name"], "chat");
    assert_eq!(chat.attributes["gen_ai.provider.name"], "offline");
    assert!(chat.attributes.contains_key("gen_ai.usage.input_tokens"));
    // The policy's decision and the connector's execution are children, across NATS,
    // of the dispatcher's tool call.
    let decide = spans
        .values()
        .find(|s| s.name == "policy.decide" && s.attributes["tool"] == "test.count")
        .context("no decision on test.count")?;
    assert!(descends_from(
        &spans,
        decide,
        "dispatch-dispatcher",
        "tool_call test.count"
    ));
    assert_eq!(decide.attributes["decision"], "DECISION_ALLOW");
    let execute = one(&spans, "dispatch-connectors", "execute_tool test.count")?;
    assert!(descends_from(
        &spans,
        execute,
        "dispatch-dispatcher",
        "tool_call test.count"
    ));
    assert_eq!(execute.attributes["gen_ai.operation.name"], "execute_tool");
    assert_eq!(execute.attributes["gen_ai.tool.name"], "test.count");
    assert!(!execute.attributes["gen_ai.tool.call.id"].is_empty());
    // The ledger folds and the streamer relays the run's events in the same trace.
    let apply = one(&spans, "dispatch-ledger", "ledger.apply DISPATCH_RUNS")?;
    assert!(descends_from(&spans, apply, "dispatch-dispatcher", "run"));
    let relay = one(&spans, "dispatch-streamer", "publish dispatch.conv")?;
    assert!(descends_from(&spans, relay, "dispatch-dispatcher", "run"));
    // The other runs are traces of their own.
    let others: BTreeSet<String> = receiver
        .spans()
        .iter()
        .filter(|s| s.name == "POST /v1/goals")
        .map(|s| s.trace_id.clone())
        .collect();
    assert_eq!(others.len(), RUNS, "{others:?}");

    // JSON logs: every line parses, and the dispatcher's lines about the run carry its
    // trace id.
    let root = stack.root().to_path_buf();
    let log = std::fs::read_to_string(stack.service("dispatcher")?.log_path(&root))?;
    let mut traced = 0;
    for line in log.lines() {
        let entry: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        assert!(
            entry["level"].is_string() && entry["target"].is_string(),
            "{line}"
        );
        if entry["trace_id"] == trace.as_str() {
            assert!(
                entry["span_id"].as_str().is_some_and(|s| s.len() == 16),
                "{line}"
            );
            traced += 1;
        }
    }
    assert!(
        traced > 0,
        "no log line of the dispatcher carries the run's trace id"
    );

    // Metrics: each service counts what ran.
    let ingress = scrape(&mut stack, "ingress").await?;
    assert_eq!(
        sample(
            &ingress,
            "dispatch_runs_submitted_total",
            &[("origin", "api")]
        ),
        Some(RUNS as f64)
    );
    let dispatcher = scrape(&mut stack, "dispatcher").await?;
    assert_eq!(
        sample(
            &dispatcher,
            "dispatch_runs_started_total",
            &[("origin", "api")]
        ),
        Some(RUNS as f64)
    );
    assert_eq!(
        sample(
            &dispatcher,
            "dispatch_runs_finished_total",
            &[("origin", "api"), ("status", "done")]
        ),
        Some(RUNS as f64)
    );
    assert_eq!(
        sample(
            &dispatcher,
            "dispatch_run_duration_seconds_count",
            &[("status", "done")]
        ),
        Some(RUNS as f64)
    );
    assert!(
        sample(
            &dispatcher,
            "dispatch_model_tokens_total",
            &[("model", "offline"), ("type", "output")]
        )
        .is_some()
    );
    assert!(
        sample(
            &dispatcher,
            "dispatch_consumer_pending",
            &[("consumer", "dispatcher-goals")]
        )
        .is_some()
    );
    let policy = scrape(&mut stack, "policy").await?;
    assert_eq!(
        sample(
            &policy,
            "dispatch_policy_decisions_total",
            &[("decision", "allow")]
        ),
        Some(allowed)
    );
    let connectors = scrape(&mut stack, "connectors").await?;
    for ((connector, outcome), count) in &executed {
        assert_eq!(
            sample(
                &connectors,
                "dispatch_tool_duration_seconds_count",
                &[("connector", connector), ("outcome", outcome)]
            ),
            Some(*count),
            "{connector} {outcome}"
        );
    }
    let ledger = scrape(&mut stack, "ledger").await?;
    assert!(
        sample(
            &ledger,
            "dispatch_ledger_lag",
            &[("stream", "DISPATCH_RUNS")]
        )
        .is_some()
    );
    assert_eq!(
        sample(&ledger, "dispatch_approvals_waiting", &[]),
        Some(0.0)
    );
    // ... and the same instruments go out over OTLP.
    stack
        .eventually(LIMIT, || async {
            receiver
                .metrics()
                .iter()
                .any(|(service, name)| {
                    service == "dispatch-dispatcher" && name == "dispatch.runs.finished"
                })
                .then_some(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_run_taken_over_after_a_crash_links_back_to_its_first_attempt() -> Result<()> {
    let receiver = Receiver::start().await?;
    let mut stack = traced_stack(&receiver).await?;
    add_dispatcher(&mut stack, &receiver, &["--lease-ms", "2000"]).await?;
    let plan = "#+TITLE: Taken over\n* TODO Wait\n  - call: test.sleep {\"ms\": 3000}\n  :done-when: true\n";
    let run_id = post_goal(&stack, plan).await?;
    stack
        .wait_for_event(run_id, LIMIT, |b| matches!(b, Body::ToolCallStarted(_)))
        .await?;
    stack.service("dispatcher")?.kill().await?;
    add_dispatcher(&mut stack, &receiver, &["--lease-ms", "2000"]).await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let end = finished(&events);
    ensure!(end.status == RunStatus::Done as i32, "{}", end.reason);

    // The first attempt's span, as its first event recorded it.
    let log = dispatch_runlog::RunLog::open(&stack.bus, "test").await?;
    let first = log
        .trace_of(&run_id)
        .await?
        .context("the run's first event has no trace")?;
    let trace = first.trace_id().to_string();
    let first_span = first.span_id().to_string();
    let resumed = stack
        .eventually(LIMIT, || async {
            receiver
                .spans()
                .into_iter()
                .find(|s| s.name == "run" && s.span_id != first_span && s.trace_id == trace)
        })
        .await?;
    assert!(
        resumed.links.contains(&(trace.clone(), first_span.clone())),
        "the resumed run's span does not link to the first attempt's: {resumed:?}"
    );
    // The take-over is in the request's trace (whose spans from the killed copy never
    // left it).
    let spans = trace_through(&stack, &receiver, &trace, &["dispatch-ingress"], false).await?;
    assert!(descends_from(
        &spans,
        &resumed,
        "dispatch-ingress",
        "publish dispatch.goal"
    ));
    Ok(())
}

const KEY: &str = "sk-otel-do-not-leak-7d2e0b";

#[tokio::test]
async fn a_model_turn_is_a_genai_span_with_its_tokens_and_no_key() -> Result<()> {
    // The recorded author answer (a plan of one leaf) and the recorded worker answer,
    // which writes no file: given again each of the two times the worker is told that
    // the leaf's gate does not pass.
    let mut script = vec![Reply::Replay("llama-server-1.5b/author.json")];
    script.extend((0..3).map(|_| Reply::Replay("llama-server/final.sse")));
    let (_stand_in, url) = StandIn::start(script).await;
    let receiver = Receiver::start().await?;
    let mut stack = traced_stack(&receiver).await?;
    let mut env = telemetry_env(&receiver);
    env.push(("E2E_MODEL_KEY", KEY.into()));
    // Content capture on: the prompt and answer go into the span, the key never.
    env.push((
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        "true".into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
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
            &env,
        )
        .await?;
    let run_id = post_goal(&stack, "Write the word hello into scratch/hello.txt").await?;
    let events = stack.wait_finished(run_id, LIMIT).await?;
    let turns: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ModelTurn(t)) => t.usage,
            _ => None,
        })
        .collect();
    ensure!(!turns.is_empty(), "no model turn recorded");

    let chats = stack
        .eventually(LIMIT, || async {
            let chats: Vec<Span> = receiver
                .spans()
                .into_iter()
                .filter(|s| s.name == "chat recorded")
                .collect();
            (chats.len() > turns.len()).then_some(chats)
        })
        .await?;
    for chat in &chats {
        assert_eq!(chat.service, "dispatch-dispatcher");
        assert_eq!(chat.attributes["gen_ai.operation.name"], "chat");
        assert_eq!(chat.attributes["gen_ai.provider.name"], "openai");
        assert_eq!(chat.attributes["gen_ai.request.model"], "recorded");
        assert!(
            chat.attributes.contains_key("gen_ai.output.messages"),
            "{chat:?}"
        );
    }
    // A worker turn's span carries the tokens its ModelTurn recorded.
    let tokens: BTreeSet<(String, String)> = chats
        .iter()
        .map(|c| {
            (
                c.attributes["gen_ai.usage.input_tokens"].clone(),
                c.attributes["gen_ai.usage.output_tokens"].clone(),
            )
        })
        .collect();
    for usage in &turns {
        ensure!(usage.completion_tokens > 0, "{usage:?}");
        let pair = (
            usage.prompt_tokens.to_string(),
            usage.completion_tokens.to_string(),
        );
        assert!(tokens.contains(&pair), "{pair:?} not among {tokens:?}");
    }
    // The key went to the model server and nowhere else.
    stack
        .eventually(LIMIT, || async {
            receiver
                .metrics()
                .iter()
                .any(|(_, name)| name == "dispatch.model.tokens")
                .then_some(())
        })
        .await?;
    if receiver.holds(KEY.as_bytes()) {
        bail!("the API key reached the OTLP receiver");
    }
    let dispatcher = scrape(&mut stack, "dispatcher").await?;
    assert!(
        sample(
            &dispatcher,
            "dispatch_model_tokens_total",
            &[("model", "recorded"), ("type", "input")]
        )
        .is_some_and(|n| n > 0.0)
    );
    assert!(!serde_json::to_string(&dispatcher)?.contains(KEY));
    let root = stack.root().to_path_buf();
    let log = std::fs::read_to_string(stack.service("dispatcher")?.log_path(&root))?;
    assert!(!log.contains(KEY), "the dispatcher's log holds the key");
    Ok(())
}
