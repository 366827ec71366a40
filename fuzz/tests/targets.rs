//! Fuzz targets: every parser of untrusted input, fed hostile input. See the crate docs
//! for budgets; a target fails on any panic or crash.

use dispatch_bus::RunId;
use dispatch_fuzz::fuzz;
use dispatch_ledger::view::Fold as _;
use dispatch_proto::api::v1::RunView;
use dispatch_proto::run::v1::{
    LeafStarted, ModelTurn, RunEvent, RunFinished, RunRequested, ToolCall, run_event::Body,
};
use proptest::prelude::*;
use prost::Message as _;

/// Pieces that real plans and gates are made of, so generated input reaches deep into
/// the parsers instead of failing on the first byte.
const GATE_WORDS: &[&str] = &[
    "test",
    "[",
    "]",
    "grep",
    "-q",
    "-s",
    "-f",
    "-d",
    "-e",
    "-r",
    "-n",
    "-z",
    "-E",
    "-i",
    "-F",
    "-w",
    "-x",
    "-qiE",
    "--",
    "=",
    "!=",
    "!",
    "&&",
    "||",
    "cat",
    "ls",
    "true",
    "false",
    "scratch",
    "scratch/REPORT.org",
    "scratch/dir",
    "scratch/link",
    "scratch/empty",
    "..",
    "../x",
    "/etc/passwd",
    "'a b'",
    "\"q\\\"\"",
    "\\",
    "$",
    "|",
    ";",
    "(",
    ")",
    "*",
    "~",
    "x{1,3}",
    "[a-",
    "a\\+",
    "(((",
    "\u{0}",
    "é",
    "`",
    ">",
];

const PLAN_LINES: &[&str] = &[
    "#+TITLE: x",
    "#+title:",
    "* TODO a",
    "** NEXT b",
    "*** DOING c",
    "* BLOCKED",
    "*",
    "**** WAITING :tag:",
    ":PROPERTIES:",
    ":END:",
    ":ORDERED: t",
    ":DONE-WHEN: true",
    ":done-when: test -s scratch/x",
    ":done-when:",
    "```org",
    "```",
    "body text",
    "  - item",
    "",
    "* Notes",
    "*TODO nospace",
    "* TODO \u{1b}[31mred",
];

fn words(vocabulary: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(vocabulary), 0..max)
        .prop_map(|w| w.join(" "))
}

#[test]
fn gate_parser_and_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    std::fs::create_dir_all(run.join("scratch/dir")).unwrap();
    std::fs::write(run.join("scratch/REPORT.org"), "Total: 3\n").unwrap();
    std::fs::write(run.join("scratch/empty"), "").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", run.join("scratch/link")).unwrap();
    let gates = prop_oneof![
        words(GATE_WORDS, 40),
        ".{0,300}",
        // Deep nesting, far past every bound: never a stack overflow.
        (0usize..5000).prop_map(|n| format!("{}true", "! ".repeat(n))),
        (0usize..2000).prop_map(|n| vec!["true"; n].join(" && ")),
    ];
    fuzz("gate", gates, |source| {
        let outcome = dispatch_connectors::gate::check(run, &source);
        if outcome.passed {
            // Nothing that leaves the run directory or follows the symlink passes.
            assert!(!source.contains("/etc/passwd"), "{source:?}");
        }
    });
}

#[test]
fn plan_parser() {
    let plans = prop_oneof![
        proptest::collection::vec(proptest::sample::select(PLAN_LINES), 0..200)
            .prop_map(|lines| lines.join("\n")),
        ".{0,2000}",
        (1usize..3000).prop_map(|depth| format!("{} TODO deep\n", "*".repeat(depth))),
    ];
    fuzz("plan", plans, |answer| {
        if let Ok(plan) = dispatch_plan::parse(&answer) {
            assert!(!plan.leaves.is_empty());
            assert!(plan.leaves.len() <= dispatch_plan::MAX_LEAVES);
        }
    });
}

fn sample_events(run_id: &RunId) -> Vec<Vec<u8>> {
    let bodies = [
        Body::RunRequested(RunRequested {
            goal: "g".into(),
            conversation_id: "c".into(),
            timeout_ms: 1000,
            origin: "http".into(),
            callback_url: "https://h/x".into(),
            payload: "p".into(),
            kind: String::new(),
            ..Default::default()
        }),
        Body::ServiceWoken(dispatch_proto::run::v1::ServiceWoken {
            run_id: run_id.to_string(),
            wake: "webhook".into(),
            listener: 1,
        }),
        Body::OutputDelta(dispatch_proto::run::v1::OutputDelta {
            leaf: 0,
            turn: 0,
            part: 0,
            offset: 0,
            text: "Hel".into(),
            abandoned: false,
        }),
        Body::LeafStarted(LeafStarted {
            leaf: 0,
            title: "t".into(),
        }),
        Body::ModelTurn(ModelTurn {
            tool_calls: vec![ToolCall {
                call_id: "l0-t0-c0".into(),
                tool: "files.write_file".into(),
                args_json: "{}".into(),
            }],
            ..Default::default()
        }),
        Body::RunFinished(RunFinished {
            status: 1,
            reason: "r".into(),
            summary: "s".into(),
            tally: vec![],
            report: "r".into(),
            report_path: String::new(),
        }),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            RunEvent {
                event_id: format!("e{i}"),
                run_id: run_id.to_string(),
                seq: i as u64 + 1,
                prev_hash: vec![0; 32],
                hash: vec![1; 32],
                body: Some(body),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect()
}

#[test]
fn event_decoding_and_projection() {
    let run_id = RunId::new();
    let samples = sample_events(&run_id);
    let mutated = (
        proptest::sample::select(samples),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    )
        .prop_map(|(mut bytes, edits)| {
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            bytes
        });
    let payloads = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        mutated,
        // Nested groups and huge lengths, the classic protobuf decoder traps.
        (1usize..5000).prop_map(|n| [0x0bu8].repeat(n)),
        (1usize..64).prop_map(|n| [0xa2u8, 0x01].repeat(n)),
    ];
    fuzz("event", payloads, |payload| {
        if let Ok(event) = dispatch_runlog::decode(&run_id, 1, &payload) {
            let trust = dispatch_runlog::seal::Trust::default();
            let on = dispatch_bus::subject::LogWriter::Dispatcher;
            let view = RunView::apply(None, &event, on, 1, &trust);
            let again = RunView::apply(Some(view.clone()), &event, on, 1, &trust);
            assert_eq!(view, again, "re-applying an event changed the view");
        }
        let _ = RunEvent::decode(payload.as_slice());
    });
}

#[test]
fn exported_trails() {
    let lines = prop_oneof![
        ".{0,400}",
        proptest::collection::vec(
            proptest::sample::select(
                &[
                    "{}",
                    "{\"seq\":1}",
                    "[1,2",
                    "{\"event\":\"zz\"}",
                    "\n",
                    "{\"seq\":18446744073709551615,\"event\":\"\"}",
                ][..]
            ),
            0..20
        )
        .prop_map(|l| l.join("\n")),
    ];
    fuzz("trail", lines, |text| {
        let trust = dispatch_runlog::seal::Trust::default();
        assert!(dispatch_runlog::steps::verify(&text, &trust).is_err());
    });
}

fn json_values() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("goal".to_owned()),
                    Just("conversation_id".to_owned()),
                    Just("timeout_ms".to_owned()),
                    ".{0,8}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn ingress_request_bodies() {
    let bodies = prop_oneof![
        json_values().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        proptest::collection::vec(any::<u8>(), 0..512),
        // Nesting past serde_json's recursion limit.
        (1usize..100_000).prop_map(|n| "[".repeat(n).into_bytes()),
    ];
    fuzz("ingress body", bodies, |body| {
        if let Ok(goal) = dispatch_ingress::validate(&body) {
            assert!(!goal.goal().is_empty());
            assert!(goal.goal().chars().count() <= dispatch_runlog::submit::MAX_GOAL_CHARS);
        }
    });
}
