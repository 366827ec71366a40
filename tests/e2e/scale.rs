//! Many copies, many goals: each goal runs exactly once.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_testkit::Service;
use dispatch_tests::{Stack, count, finished};

#[tokio::test]
async fn two_dispatchers_carry_fifty_goals_each_exactly_once() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger", "policy", "connectors"]).await?;
    for _ in 0..2 {
        let dispatcher = Service::start(
            "dispatcher",
            &stack.nats.url(),
            stack.root(),
            &["--max-runs", "8"],
        )
        .await?;
        stack.services.push(dispatcher);
    }
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(
            stack
                .submit(&format!("Errand number {n}"), "default", 0)
                .await?,
        );
    }

    let mut owners = BTreeSet::new();
    for id in &ids {
        let events = stack.wait_finished(*id, Duration::from_secs(180)).await?;
        assert_eq!(finished(&events).status, RunStatus::Done as i32, "run {id}");
        assert_eq!(count(&events, "run_requested"), 1, "run {id}");
        assert_eq!(count(&events, "run_started"), 1, "run {id} started twice");
        assert_eq!(count(&events, "plan_authored"), 1, "run {id}");
        assert_eq!(count(&events, "run_finished"), 1, "run {id}");
        assert_eq!(count(&events, "feedback_queued"), 1, "run {id}");
        let mut per_call: HashMap<String, [u32; 3]> = HashMap::new();
        let mut turns = BTreeSet::new();
        for stored in &events {
            match &stored.event.body {
                Some(Body::RunStarted(s)) => {
                    owners.insert(s.owner.clone());
                }
                Some(Body::ModelTurn(t)) => assert!(
                    turns.insert((t.leaf, t.turn)),
                    "run {id}: turn recorded twice"
                ),
                Some(Body::ToolCallRequested(c)) => {
                    per_call.entry(c.call_id.clone()).or_default()[0] += 1
                }
                Some(Body::PolicyDecided(d)) => {
                    per_call.entry(d.call_id.clone()).or_default()[1] += 1
                }
                Some(Body::ToolCallCompleted(c)) => {
                    per_call.entry(c.call_id.clone()).or_default()[2] += 1
                }
                _ => {}
            }
        }
        assert!(!per_call.is_empty());
        for (call, seen) in per_call {
            assert_eq!(
                seen,
                [1, 1, 1],
                "run {id}: call {call} requested/decided/executed {seen:?} times"
            );
        }
    }
    assert_eq!(
        owners.len(),
        2,
        "both dispatchers should have taken goals: {owners:?}"
    );
    stack.commands_drained(Duration::from_secs(30)).await?;
    Ok(())
}
