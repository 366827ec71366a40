//! What Dispatch adds to one model turn, beyond the model's own time: the request built
//! from the leaf, its history and the offered tools, sent to an OpenAI-compatible
//! server over loopback HTTP, the SSE stream read and parsed (text deltas, calls written
//! in the text), and the `ModelTurn` event appended to the run's log — everything the
//! dispatcher does between deciding to ask the model and having its answer in the log.
//!
//! Measured in this process with the provider the dispatcher uses, against the stand-in
//! model server replaying a recorded llama-server stream (Qwen2.5-Coder-0.5B, 100
//! deltas). The stand-in's own handler time is measured and taken out, and the append
//! is the same `RunHandle::ensure` the dispatcher makes, on the same nats-server.
//!
//! Whole runs through the stack cannot isolate this: the offline provider, the only
//! other worker, makes tool calls of its own, so it is no baseline with the same steps.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use dispatch_bus::{Bus, RunId};
use dispatch_models::openai::{Config, OpenAi};
use dispatch_models::{Exchange, Provider, ToolSpec, TurnRequest};
use dispatch_proto::run::v1::{ModelTurn, RunRequested, ToolCall, Usage, run_event::Body};
use dispatch_runlog::RunLog;
use dispatch_testkit::model::{Reply, StandIn};
use serde_json::json;

use crate::{Results, percentile};

/// Turns measured, after a warm-up of `WARM_UP`.
const TURNS: usize = 300;
const WARM_UP: usize = 20;
/// The recorded stream each turn replays.
const STREAM: &str = "llama-server/final.sse";

/// A leaf halfway through its work: one call made and answered, three tools on offer.
fn request() -> TurnRequest {
    let schema = |props: serde_json::Value| json!({"type": "object", "properties": props});
    let tools = vec![
        ToolSpec {
            name: "files.read_file".into(),
            description: "Read a file of the run's workspace".into(),
            parameters: schema(json!({"path": {"type": "string"}})).into(),
        },
        ToolSpec {
            name: "files.write_file".into(),
            description: "Write a file of the run's workspace".into(),
            parameters: schema(json!({"path": {"type": "string"}, "content": {"type": "string"}}))
                .into(),
        },
        ToolSpec {
            name: "files.list_files".into(),
            description: "List a directory of the run's workspace".into(),
            parameters: schema(json!({"path": {"type": "string"}})).into(),
        },
    ];
    TurnRequest {
        chat: None,
        earlier: Vec::new(),
        goal: "Write the word hello into scratch/hello.txt".into(),
        leaf: dispatch_plan::Leaf {
            index: 0,
            keyword: "TODO".into(),
            title: "Write hello to scratch/hello.txt".into(),
            body: String::new(),
            done_when: Some("test -s scratch/hello.txt".into()),
            ordered: false,
            tools: Vec::new(),
        },
        history: vec![
            Exchange::Assistant {
                text: "Listing scratch.".into(),
                tool_calls: vec![dispatch_models::ToolCall {
                    id: "l0-t0-c0".into(),
                    tool: "files.list_files".into(),
                    args_json: r#"{"path":"scratch"}"#.into(),
                }],
            },
            Exchange::ToolResult {
                call_id: "l0-t0-c0".into(),
                tool: "files.list_files".into(),
                result: Ok("goal.org\nnotes.org\n".into()),
            },
        ],
        tools,
        deltas: None,
    }
}

pub async fn run(bus: &Bus, lines: &mut Vec<String>, results: &mut Results) -> Result<()> {
    let (stand_in, url) = StandIn::start(Vec::new()).await;
    stand_in.script((0..TURNS + WARM_UP).map(|_| Reply::Replay(STREAM)));
    let provider: Arc<dyn Provider> = Arc::new(OpenAi::new(Config::new(&url, "bench"))?);
    let log = RunLog::open(bus, "bench/turns")
        .await?
        .writing_as(dispatch_bus::subject::LogWriter::Dispatcher);
    let mut run = log.new_run(RunId::new());
    run.append(
        Body::RunRequested(RunRequested {
            goal: "bench".into(),
            ..Default::default()
        }),
        "bench",
    )
    .await?;

    let (mut exchange, mut append) = (Vec::new(), Vec::new());
    for turn in 0..TURNS + WARM_UP {
        let busy = stand_in.busy();
        let started = Instant::now();
        let reply = provider.turn(request()).await?;
        let asked = started.elapsed().as_secs_f64() - (stand_in.busy() - busy).as_secs_f64();
        let body = Body::ModelTurn(ModelTurn {
            leaf: 0,
            turn: turn as u32,
            text: reply.text,
            tool_calls: reply
                .tool_calls
                .into_iter()
                .map(|c| ToolCall {
                    call_id: format!("l0-t{turn}-c0"),
                    tool: c.tool,
                    args_json: c.args_json,
                })
                .collect(),
            model: provider.name().to_owned(),
            usage: Some(Usage {
                prompt_tokens: reply.usage.prompt_tokens,
                completion_tokens: reply.usage.completion_tokens,
            }),
            call_form: reply.form.word().to_owned(),
            ..Default::default()
        });
        let started = Instant::now();
        let at = turn as u32;
        run.ensure(
            |b| matches!(b, Body::ModelTurn(t) if t.turn == at).then_some(()),
            body,
            "bench",
        )
        .await?;
        let appended = started.elapsed().as_secs_f64();
        if turn >= WARM_UP {
            exchange.push(asked * 1e3);
            append.push(appended * 1e3);
        }
    }
    let (exchange_p50, append_p50) = (percentile(&exchange, 50.0), percentile(&append, 50.0));
    let (exchange_p99, append_p99) = (percentile(&exchange, 99.0), percentile(&append, 99.0));
    let per_turn = exchange_p50 + append_p50;
    lines.push(format!(
        "turns     {per_turn:.2} ms per model turn in Dispatch (p50): {exchange_p50:.2} ms the model exchange (request built, sent, SSE read and parsed; p99 {exchange_p99:.2}), {append_p50:.2} ms the ModelTurn append (p99 {append_p99:.2}); {TURNS} turns against the stand-in replaying a recorded stream, its own time taken out"
    ));
    results.insert(
        "turns".into(),
        json!({
            "turns": TURNS, "stream": STREAM,
            "exchange_p50_ms": exchange_p50, "exchange_p99_ms": exchange_p99,
            "append_p50_ms": append_p50, "append_p99_ms": append_p99,
            "per_turn_ms": per_turn,
        }),
    );
    Ok(())
}
