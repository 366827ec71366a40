//! Conversations: a chat message is a turn, the agent loop over the conversation's
//! history, one turn at a time per conversation (real nats-server, real service
//! processes; the model is the OpenAI-compatible stand-in replaying answers the local
//! Qwen2.5-Coder-1.5B gave, or the offline provider where only the runtime is tried).

use std::time::Duration;

use anyhow::Context as _;
use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, TurnContext, TurnOrdered, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_testkit::model::{Reply, StandIn};
use dispatch_tests::{Stack, finished};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

/// Sends `text` to `conversation` (with `busy` if given); the answer's status and body.
async fn say(
    stack: &Stack,
    conversation: &str,
    text: &str,
    busy: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let mut body = json!({ "text": text });
    if let Some(busy) = busy {
        body["busy"] = json!(busy);
    }
    let answer = stack
        .http
        .post(stack.url(&format!("/v1/conversations/{conversation}/messages")))
        .json(&body)
        .send()
        .await?;
    let status = answer.status().as_u16();
    Ok((status, answer.json().await.unwrap_or(Value::Null)))
}

/// Sends `text` and returns the turn's run id (the message must be taken).
async fn turn(stack: &Stack, conversation: &str, text: &str) -> anyhow::Result<RunId> {
    let (status, body) = say(stack, conversation, text, None).await?;
    anyhow::ensure!(status == 202, "{status}: {body}");
    Ok(body["run_id"].as_str().context("a run id")?.parse()?)
}

fn bodies(events: &[StoredEvent]) -> impl Iterator<Item = &Body> {
    events.iter().filter_map(|e| e.event.body.as_ref())
}

fn ordered(events: &[StoredEvent]) -> TurnOrdered {
    bodies(events)
        .find_map(|b| match b {
            Body::TurnOrdered(t) => Some(t.clone()),
            _ => None,
        })
        .expect("a turn records its place")
}

fn context(events: &[StoredEvent]) -> TurnContext {
    bodies(events)
        .find_map(|b| match b {
            Body::TurnContext(c) => Some(c.clone()),
            _ => None,
        })
        .expect("a turn records its context")
}

/// Waits until the log of `run` holds an event `pick` accepts.
async fn recorded(stack: &Stack, run: RunId, pick: impl Fn(&Body) -> bool) -> anyhow::Result<()> {
    stack
        .eventually(LIMIT, || async {
            let events = stack.log().await.ok()?.read(&run).await.ok()?;
            bodies(&events).any(&pick).then_some(())
        })
        .await
}

/// How many of a run's calls completed, and the errors of those that failed.
fn completed_and_refused(events: &[StoredEvent]) -> (usize, Vec<String>) {
    let completed = bodies(events)
        .filter(|b| matches!(b, Body::ToolCallCompleted(_)))
        .count();
    let refused = bodies(events)
        .filter_map(|b| match b {
            Body::ToolCallFailed(f) => Some(f.error.clone()),
            _ => None,
        })
        .collect();
    (completed, refused)
}

/// The time (unix ms) of the first event `pick` accepts.
fn time_of(events: &[StoredEvent], pick: impl Fn(&Body) -> bool) -> i64 {
    events
        .iter()
        .find(|e| e.event.body.as_ref().is_some_and(&pick))
        .map(|e| e.event.time_unix_ms)
        .expect("the event is there")
}

/// The recorded answers of the two-turn conversation (Qwen2.5-Coder-1.5B on
/// llama-server, `cargo xtask test --real-model` with `DISPATCH_RECORD_DIR`).
/// Its first turn called `files.write_file` to note the colour, then answered; the
/// second answered from the first.
const REMEMBERED: [&str; 3] = [
    "llama-server-1.5b/chat/remembers/01.sse",
    "llama-server-1.5b/chat/remembers/02.sse",
    "llama-server-1.5b/chat/remembers/03.sse",
];

#[tokio::test]
async fn the_second_turn_is_given_the_first_and_answers_from_it() -> anyhow::Result<()> {
    let (stand_in, url) =
        StandIn::start(REMEMBERED.iter().map(|name| Reply::Replay(name)).collect()).await;
    let mut stack = Stack::start(&["ledger", "policy", "connectors", "ingress"]).await?;
    stack
        .add_with_env(
            "dispatcher",
            &["--model-url", &url, "--model", "recorded"],
            &[],
        )
        .await?;
    let first = turn(&stack, "colours", FIRST).await?;
    let one = stack.wait_finished_or_show(first, LIMIT).await?;
    assert_eq!(finished(&one).status(), RunStatus::Done);
    let second = turn(&stack, "colours", SECOND).await?;
    let two = stack.wait_finished_or_show(second, LIMIT).await?;
    let end = finished(&two);
    assert_eq!(end.status(), RunStatus::Done, "{}", end.reason);

    // On the wire: the second turn's request holds the first turn as it went — the
    // message, the call and its result, the answer — in order, then the new message.
    // No plan was written for either.
    let asked = stand_in.requests();
    assert_eq!(
        asked.len(),
        3,
        "two model requests in turn 1, one in turn 2"
    );
    let answer_one = finished(&one).summary.clone();
    let messages = asked[2].1["messages"]
        .as_array()
        .context("messages")?
        .clone();
    let said: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default(),
                m["content"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(said.len(), 6, "{said:?}");
    assert_eq!(said[0].0, "system");
    assert_eq!(said[1], ("user", FIRST));
    assert_eq!(said[2].0, "assistant");
    let call = &messages[2]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "files__write_file", "{call}");
    assert_eq!(said[3].0, "tool");
    assert_eq!(messages[3]["tool_call_id"], call["id"]);
    assert_eq!(said[4], ("assistant", answer_one.as_str()));
    assert_eq!(said[5], ("user", SECOND));
    // The first turn was given no history: the instructions and its message.
    assert_eq!(asked[0].1["messages"].as_array().map(Vec::len), Some(2));
    for events in [&one, &two] {
        assert!(!bodies(events).any(|b| matches!(b, Body::PlanAuthored(_))));
    }
    // The answer that refers back is recorded.
    assert!(
        end.summary.to_lowercase().contains("teal"),
        "the recorded answer: {:?}",
        end.summary
    );
    assert_eq!(ordered(&two).previous_run_id, first.to_string());
    assert_eq!(context(&two).earlier_run_ids, vec![first.to_string()]);
    // After a reload, a `useChat` client gets the whole conversation from the
    // transcript, as UI messages: each turn's message and its answer, oldest first.
    let page: Value = stack
        .http
        .get(stack.url("/v1/conversations/colours/transcript"))
        .send()
        .await?
        .json()
        .await?;
    let mut said = Vec::new();
    for run in page["runs"].as_array().context("runs")?.iter().rev() {
        for message in run["messages"].as_array().context("messages")? {
            let text: String = message["parts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect();
            said.push((
                message["role"].as_str().unwrap_or_default().to_owned(),
                text,
            ));
        }
    }
    assert_eq!(said.len(), 4, "{said:?}");
    assert_eq!(said[0], ("user".to_owned(), FIRST.to_owned()));
    assert_eq!(said[2], ("user".to_owned(), SECOND.to_owned()));
    assert_eq!(said[3].0, "assistant");
    assert!(said[3].1.contains(end.summary.trim()), "{said:?}");
    // A turn leaves no feedback note to drain: its answer is the conversation.
    let out = stack.cli(&["tasks", "--conversation", "colours", "--format", "json"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let tasks: Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(
        tasks["feedback"].as_array().map(Vec::len),
        Some(0),
        "{tasks}"
    );
    Ok(())
}

const FIRST: &str = "My favourite colour is teal. Please remember that.";
const SECOND: &str = "What is my favourite colour? Answer in one word.";

/// A stack whose dispatchers run the offline provider, 60 ms a word: only the runtime
/// is tried, and a turn takes a second or two.
async fn offline_stack(dispatchers: usize, extra: &[&str]) -> anyhow::Result<Stack> {
    paced_stack(dispatchers, extra, "60").await
}

async fn paced_stack(dispatchers: usize, extra: &[&str], pace_ms: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::start(&["ledger", "policy", "connectors", "ingress"]).await?;
    for _ in 0..dispatchers {
        stack
            .add_with_env(
                "dispatcher",
                extra,
                &[("DISPATCH_OFFLINE_PACE_MS", pace_ms)],
            )
            .await?;
    }
    Ok(stack)
}

#[tokio::test]
async fn messages_sent_at_once_run_one_turn_at_a_time_across_two_dispatchers() -> anyhow::Result<()>
{
    let stack = offline_stack(2, &[]).await?;
    let mut runs = Vec::new();
    for i in 1..=4 {
        runs.push(turn(&stack, "busy", &format!("Message number {i}")).await?);
    }
    let mut logs = Vec::new();
    for run in &runs {
        let events = stack.wait_finished_or_show(*run, LIMIT).await?;
        assert_eq!(finished(&events).status(), RunStatus::Done);
        logs.push(events);
    }
    // One chain: each turn names the one before it, numbered 1 to 4.
    let mut by_number: Vec<(u64, &Vec<StoredEvent>, RunId)> = logs
        .iter()
        .zip(&runs)
        .map(|(events, run)| (ordered(events).number, events, *run))
        .collect();
    by_number.sort_by_key(|(n, ..)| *n);
    let numbers: Vec<u64> = by_number.iter().map(|(n, ..)| *n).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4]);
    for pair in by_number.windows(2) {
        let (_, before, before_id) = &pair[0];
        let (_, after, _) = &pair[1];
        assert_eq!(ordered(after).previous_run_id, before_id.to_string());
        // Never two at once: a turn starts after the one before it has ended.
        let ended = time_of(before, |b| matches!(b, Body::RunFinished(_)));
        let started = time_of(after, |b| matches!(b, Body::RunStarted(_)));
        assert!(
            started >= ended,
            "a turn started at {started}, before {ended}"
        );
        // And it was given the turns before it.
        assert_eq!(
            context(after).earlier_run_ids.len() as u64,
            ordered(after).number - 1
        );
    }
    // Both dispatchers took turns (they share the goals), yet none overlapped.
    let owners: std::collections::BTreeSet<String> = logs
        .iter()
        .filter_map(|events| {
            bodies(events).find_map(|b| match b {
                Body::RunStarted(s) => Some(s.owner.clone()),
                _ => None,
            })
        })
        .collect();
    eprintln!("turns run by {owners:?}");
    Ok(())
}

#[tokio::test]
async fn a_busy_conversation_rejects_or_is_interrupted_as_the_message_asks() -> anyhow::Result<()> {
    let stack = offline_stack(1, &[]).await?;
    // A long first turn: its answer repeats a long message, a word every 60 ms.
    let long = format!("Please listen: {}", "word ".repeat(120));
    let first = turn(&stack, "talk", &long).await?;
    recorded(&stack, first, |b| matches!(b, Body::RunStarted(_))).await?;
    // `reject`: 409, naming the running turn; nothing stored.
    let (status, body) = say(&stack, "talk", "Are you there?", Some("reject")).await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "turn_running", "{body}");
    assert_eq!(body["run_id"], first.to_string(), "{body}");
    // A bad mode changes nothing either.
    let (status, body) = say(&stack, "talk", "x", Some("later")).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_busy", "{body}");

    // `interrupt`: the running turn ends `stopped`, and the new one runs after it,
    // given both messages.
    let (status, body) = say(&stack, "talk", "Stop, new question.", Some("interrupt")).await?;
    assert_eq!(status, 202, "{body}");
    let second: RunId = body["run_id"].as_str().context("run id")?.parse()?;
    let one = stack.wait_finished_or_show(first, LIMIT).await?;
    let end = finished(&one);
    assert_eq!(end.status(), RunStatus::Stopped, "{}", end.reason);
    assert!(end.reason.contains("interrupt"), "{}", end.reason);
    let two = stack.wait_finished_or_show(second, LIMIT).await?;
    assert_eq!(finished(&two).status(), RunStatus::Done);
    assert_eq!(context(&two).earlier_run_ids, vec![first.to_string()]);
    // The offline model says what it was given: the stopped turn's message.
    assert!(
        finished(&two).summary.contains("1 earlier turns"),
        "{}",
        finished(&two).summary
    );
    // Once nothing runs, `reject` is taken.
    let (status, body) = say(&stack, "talk", "And now?", Some("reject")).await?;
    assert_eq!(status, 202, "{body}");
    let third: RunId = body["run_id"].as_str().context("run id")?.parse()?;
    let three = stack.wait_finished_or_show(third, LIMIT).await?;
    assert_eq!(finished(&three).status(), RunStatus::Done);
    Ok(())
}

#[tokio::test]
async fn a_long_conversation_gives_the_model_only_what_its_budget_holds() -> anyhow::Result<()> {
    let stack = paced_stack(1, &["--chat-history-turns", "3"], "0").await?;
    let mut last = None;
    for i in 1..=7 {
        let run = turn(&stack, "long", &format!("Message {i}")).await?;
        last = Some(stack.wait_finished_or_show(run, LIMIT).await?);
    }
    let events = last.expect("seven turns");
    let given = context(&events);
    assert_eq!(given.earlier_run_ids.len(), 3);
    assert_eq!(given.left_out, 3);
    let summary = finished(&events).summary.clone();
    assert!(summary.contains("3 older turns were left out"), "{summary}");
    assert!(
        summary.contains("the last one said: Message 6"),
        "{summary}"
    );
    Ok(())
}

#[tokio::test]
async fn a_turn_resumed_after_its_dispatcher_is_killed_asks_with_the_same_context()
-> anyhow::Result<()> {
    // Turn 1 as recorded; turn 2's first request is answered slowly, and its
    // dispatcher is killed while it waits; the next copy asks again.
    let (stand_in, url) = StandIn::start(vec![
        Reply::Replay(REMEMBERED[0]),
        Reply::Replay(REMEMBERED[1]),
        Reply::Slowly(REMEMBERED[2], Duration::from_secs(5)),
        Reply::Replay(REMEMBERED[2]),
    ])
    .await;
    let mut stack = Stack::start(&["ledger", "policy", "connectors", "ingress"]).await?;
    let dispatcher = [
        "--model-url",
        url.as_str(),
        "--model",
        "recorded",
        "--lease-ms",
        "1500",
    ];
    stack.add_with_env("dispatcher", &dispatcher, &[]).await?;
    let first = turn(&stack, "again", FIRST).await?;
    stack.wait_finished_or_show(first, LIMIT).await?;
    let second = turn(&stack, "again", SECOND).await?;
    stack
        .eventually(LIMIT, || async {
            (stand_in.requests().len() == 3).then_some(())
        })
        .await?;
    stack.service("dispatcher")?.kill().await?;
    stack.services.retain(|s| s.name != "dispatcher");
    stack.add_with_env("dispatcher", &dispatcher, &[]).await?;
    let events = stack.wait_finished_or_show(second, LIMIT).await?;
    assert_eq!(finished(&events).status(), RunStatus::Done);
    let asked = stand_in.requests();
    assert_eq!(asked.len(), 4);
    // Byte for byte the same conversation, rebuilt from the logs by another process.
    let before = serde_json::to_string(&asked[2].1["messages"])?;
    let after = serde_json::to_string(&asked[3].1["messages"])?;
    assert_eq!(before, after);
    assert!(before.contains(FIRST) && before.contains(SECOND));
    // Placed and given its context once, by the first copy.
    assert_eq!(
        bodies(&events)
            .filter(|b| matches!(b, Body::TurnOrdered(_) | Body::TurnContext(_)))
            .count(),
        2
    );
    Ok(())
}

/// A planned errand that takes a few seconds: a call of the test connector's `sleep`.
const SLOW_ERRAND: &str = "#+TITLE: Slow errand\\n* TODO Wait a while\\n  - call: test.sleep {\\\"ms\\\": 3000, \\\"marker\\\": \\\"scratch/slept.txt\\\"}\\n  :done-when: test -s scratch/slept.txt";

#[tokio::test]
async fn a_turn_hands_an_errand_off_and_the_next_turn_hears_how_it_ended() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger", "policy", "ingress", "dispatcher"]).await?;
    stack.add_with("connectors", &["--test-tools"]).await?;
    // Turn 1 hands the errand off (the offline model makes the `call:` line's call).
    let handing = turn(
        &stack,
        "seam",
        &format!("Please do this in the background.\ncall: dispatch.dispatch {{\"goal\": \"{SLOW_ERRAND}\"}}"),
    )
    .await?;
    let one = stack.wait_finished_or_show(handing, LIMIT).await?;
    assert_eq!(finished(&one).status(), RunStatus::Done);
    let started = result_of(&one).context("dispatch.dispatch ran")?;
    let errand: RunId = started
        .split("started run ")
        .nth(1)
        .and_then(|rest| rest.get(..36))
        .context("the call's result names the errand's run")?
        .parse()?;
    // The errand is the conversation's, its parent the turn; the turn ended first.
    let errand_log = stack.wait_finished_or_show(errand, LIMIT).await?;
    let requested = bodies(&errand_log)
        .find_map(|b| match b {
            Body::RunRequested(r) => Some(r.clone()),
            _ => None,
        })
        .context("a request")?;
    assert_eq!(requested.conversation_id, "seam");
    assert_eq!(requested.origin, "chat");
    assert_eq!(requested.parent_run_id, handing.to_string());
    assert_eq!(
        finished(&errand_log).status(),
        RunStatus::Done,
        "{}",
        finished(&errand_log).reason
    );
    let turn_ended = time_of(&one, |b| matches!(b, Body::RunFinished(_)));
    let errand_ended = time_of(&errand_log, |b| matches!(b, Body::RunFinished(_)));
    assert!(turn_ended < errand_ended, "the turn waited for the errand");

    // Turn 2 starts with the errand's note drained into its context, and relays it.
    let two = stack
        .wait_finished_or_show(turn(&stack, "seam", "Anything new?").await?, LIMIT)
        .await?;
    let notes = context(&two).notes;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].run_id, errand.to_string());
    assert_eq!(notes[0].status, "done");
    // (The whole answer is the run's report; its summary is the first 300 characters.)
    let relayed = finished(&two).report.clone();
    assert!(
        relayed.contains(&format!("(run {errand}) ended done")),
        "{relayed}"
    );

    // A second drain is empty: the note was handed out once.
    let three = stack
        .wait_finished_or_show(
            turn(&stack, "seam", "call: dispatch.tasks {}").await?,
            LIMIT,
        )
        .await?;
    assert!(context(&three).notes.is_empty());
    let listed = result_of(&three).context("dispatch.tasks ran")?;
    assert!(listed.contains("No new notes."), "{listed}");
    assert!(
        listed.contains(&format!("run {errand} is done")),
        "{listed}"
    );

    // Only this conversation's runs: another's is not found.
    let other = stack
        .submit("Someone else's errand", "elsewhere", 0)
        .await?;
    let four = stack
        .wait_finished_or_show(
            turn(
                &stack,
                "seam",
                &format!("call: dispatch.status {{\"run_id\": \"{other}\"}}"),
            )
            .await?,
            LIMIT,
        )
        .await?;
    let refused = bodies(&four)
        .find_map(|b| match b {
            Body::ToolCallFailed(f) => Some(f.error.clone()),
            _ => None,
        })
        .context("dispatch.status refused")?;
    assert!(refused.contains("in this conversation"), "{refused}");
    Ok(())
}

/// The output of the turn's one completed call.
fn result_of(events: &[StoredEvent]) -> Option<String> {
    bodies(events).find_map(|b| match b {
        Body::ToolCallCompleted(c) => Some(c.output.clone()),
        _ => None,
    })
}

#[tokio::test]
async fn memory_kept_in_one_conversation_is_recalled_in_another_and_bounded() -> anyhow::Result<()>
{
    let stack = paced_stack(1, &[], "0").await?;
    let remember = r#"call: memory.remember {"kind": "preference", "key": "Favourite colour", "text": "The user's favourite colour is teal"}"#;
    let one = stack
        .wait_finished_or_show(turn(&stack, "monday", remember).await?, LIMIT)
        .await?;
    assert_eq!(
        result_of(&one).as_deref(),
        Some("remembered under \"favourite-colour\" (preference)")
    );
    // The change is in the turn's log: the call, the policy's allow, the result.
    let allowed = bodies(&one).any(|b| {
        matches!(b, Body::PolicyDecided(d) if d.rule == "memory"
            && d.decision() == dispatch_proto::run::v1::Decision::Allow)
    });
    assert!(allowed, "the memory rule allowed the change");

    // Another conversation of the same owner recalls it by words.
    let recall = r#"call: memory.recall {"query": "What colours does the user like?"}"#;
    let two = stack
        .wait_finished_or_show(turn(&stack, "tuesday", recall).await?, LIMIT)
        .await?;
    let found = result_of(&two).context("memory.recall ran")?;
    assert!(
        found.contains("[preference] favourite-colour: The user's favourite colour is teal"),
        "{found}"
    );

    // Another agent's memory is another prefix: it sees none of this one's. (Agents
    // come with accounts; the store keeps owners apart already.)
    let store = dispatch_memory::Memory::open(&stack.bus).await?;
    let other = dispatch_memory::Owner {
        account: "default".into(),
        agent: "helpdesk".into(),
    };
    assert!(store.list(&other).await?.is_empty());
    store
        .remember(
            &other,
            "note",
            Some("favourite colour"),
            "The helpdesk's own note",
            "",
        )
        .await?;
    let mine = store.list(&dispatch_memory::Owner::default()).await?;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].text, "The user's favourite colour is teal");
    assert!(store.forget(&other, "favourite colour").await?);

    // People see it too, over HTTP and in the CLI, and can remove it.
    let page: Value = stack
        .http
        .get(stack.url("/v1/memory?q=teal"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page["entries"][0]["key"], "favourite-colour", "{page}");
    let out = stack.cli(&["memory", "ls", "--format", "json"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let listed: Vec<Value> = serde_json::from_str(&out.stdout)?;
    assert_eq!(listed.len(), 1);
    let out = stack.cli(&["memory", "rm", "favourite-colour"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = stack.cli(&["memory", "rm", "favourite-colour"])?;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr
            .contains("nothing is remembered under favourite-colour"),
        "{}",
        out.stderr
    );

    // An agent writing in a loop is stopped with a clear error: 20 changes a run.
    let lines: Vec<String> = (0..22)
        .map(|i| {
            format!(
                r#"call: memory.remember {{"kind": "note", "key": "n{i}", "text": "note {i}"}}"#
            )
        })
        .collect();
    let many = stack
        .wait_finished_or_show(turn(&stack, "loop", &lines.join("\n")).await?, LIMIT)
        .await?;
    let (completed, refused) = completed_and_refused(&many);
    assert_eq!(completed, 20, "{refused:?}");
    assert_eq!(refused.len(), 2);
    assert!(
        refused[0].contains("the most one run may (20)"),
        "{}",
        refused[0]
    );
    // Bad input changes nothing.
    let bad = stack
        .wait_finished_or_show(
            turn(
                &stack,
                "loop",
                r#"call: memory.remember {"kind": "secret", "text": "x"}"#,
            )
            .await?,
            LIMIT,
        )
        .await?;
    let why = bodies(&bad)
        .find_map(|b| match b {
            Body::ToolCallFailed(f) => Some(f.error.clone()),
            _ => None,
        })
        .context("refused")?;
    assert!(why.contains("kind must be one of"), "{why}");
    let out = stack.cli(&["memory", "ls", "--format", "json"])?;
    let listed: Vec<Value> = serde_json::from_str(&out.stdout)?;
    assert_eq!(listed.len(), 20);
    Ok(())
}

#[tokio::test]
async fn a_turn_finds_and_reads_earlier_conversations_through_history() -> anyhow::Result<()> {
    let stack = paced_stack(1, &[], "0").await?;
    let earlier = turn(&stack, "week-1", "We settled on quince jam for the picnic.").await?;
    stack.wait_finished_or_show(earlier, LIMIT).await?;
    // The ledger has it (the index is written with the run's view).
    stack
        .eventually(LIMIT, || async {
            let view: Value = stack
                .http
                .get(stack.url(&format!("/v1/runs/{earlier}")))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (view["status"] == "done").then_some(())
        })
        .await?;
    let searched = stack
        .wait_finished_or_show(
            turn(
                &stack,
                "week-2",
                r#"call: history.search {"query": "What jam did we pick?"}"#,
            )
            .await?,
            LIMIT,
        )
        .await?;
    let found = result_of(&searched).context("history.search ran")?;
    assert!(
        found.contains(&format!("- turn {earlier} in week-1 (done)")),
        "{found}"
    );
    assert!(found.contains("quince jam"), "{found}");
    let read = stack
        .wait_finished_or_show(
            turn(
                &stack,
                "week-2",
                &format!(r#"call: history.read {{"run_id": "{earlier}"}}"#),
            )
            .await?,
            LIMIT,
        )
        .await?;
    let text = result_of(&read).context("history.read ran")?;
    assert!(
        text.starts_with("asked: We settled on quince jam for the picnic."),
        "{text}"
    );
    assert!(text.contains("it ended done"), "{text}");
    let whole = stack
        .wait_finished_or_show(
            turn(
                &stack,
                "week-2",
                r#"call: history.read {"conversation": "week-1"}"#,
            )
            .await?,
            LIMIT,
        )
        .await?;
    let text = result_of(&whole).context("history.read ran")?;
    assert!(text.contains(&earlier.to_string()), "{text}");
    let nothing = stack
        .wait_finished_or_show(
            turn(
                &stack,
                "week-2",
                r#"call: history.search {"query": "zeppelin"}"#,
            )
            .await?,
            LIMIT,
        )
        .await?;
    assert_eq!(
        result_of(&nothing).as_deref(),
        Some("nothing earlier matches \"zeppelin\"")
    );
    Ok(())
}

#[tokio::test]
async fn dispatch_chat_in_a_terminal_sends_each_line_as_a_turn_and_shows_the_answers()
-> anyhow::Result<()> {
    let stack = paced_stack(1, &[], "0").await?;
    let input = "Hello there, I am Ada.\n\ncall: files.write_file {\"path\": \"scratch/hi.txt\", \"content\": \"hi\"}\n";
    let out = stack.cli_with_input(&["chat", "terminal-1"], input)?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // The first answer, then the second turn's call, its result and its answer, which
    // was given the first turn.
    assert!(
        out.stdout.contains("You said: Hello there, I am Ada."),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("→ files.write_file"), "{}", out.stdout);
    assert!(out.stdout.contains("← "), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("the last one said: Hello there, I am Ada."),
        "{}",
        out.stdout
    );
    // Both are turns of that conversation, recorded with origin chat.
    let ps = stack.cli(&[
        "ps",
        "-a",
        "--filter",
        "conversation=terminal-1",
        "--format",
        "json",
    ])?;
    let runs: Vec<Value> = serde_json::from_str(&ps.stdout)?;
    assert_eq!(runs.len(), 2, "{}", ps.stdout);
    assert!(
        runs.iter()
            .all(|r| r["origin"] == "chat" && r["kind"] == "turn")
    );
    // A bad conversation is refused before anything is sent.
    let out = stack.cli_with_input(&["chat", "a.b"], "hi\n")?;
    assert_ne!(out.code, Some(0));
    Ok(())
}

#[tokio::test]
async fn a_500_turn_conversation_keeps_the_model_request_within_its_budget() -> anyhow::Result<()> {
    // Every turn's answer is the recorded "Teal": the stand-in sees each request.
    let (stand_in, url) = StandIn::routed(|_| Reply::Replay(REMEMBERED[2])).await;
    let mut stack = Stack::start(&["ledger", "policy", "connectors", "ingress"]).await?;
    stack
        .add_with_env(
            "dispatcher",
            &["--model-url", &url, "--model", "recorded"],
            &[],
        )
        .await?;
    let mut sizes = Vec::new();
    let mut last = Vec::new();
    for i in 1..=500 {
        // A long message each time, so that the characters run out before the turns.
        let text = format!("Message {i}: {}", "tell me about teal. ".repeat(40));
        last = stack
            .wait_finished_or_show(turn(&stack, "long-500", &text).await?, LIMIT)
            .await?;
        let asked = stand_in.requests();
        let body = &asked.last().context("a request")?.1;
        sizes.push(serde_json::to_string(&body["messages"])?.len());
    }
    let given = context(&last);
    assert!(given.left_out > 400, "{given:?}");
    assert!(!given.earlier_run_ids.is_empty());
    // What the model is shown stops growing once the budget is full: the history part
    // of the request at turn 500 is no larger than at turn 100, and within the budget
    // (24,000 characters of history, the instructions and the new message besides).
    let (at_100, at_500) = (sizes[99], sizes[499]);
    assert!(at_500 <= at_100 + 1_000, "{at_100} → {at_500}");
    assert!(at_500 < 24_000 + 8_000, "{at_500}");
    let asked = stand_in.requests();
    let system = asked.last().context("a request")?.1["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        system.contains(&format!(
            "({} older turns of this conversation are left out here.)",
            given.left_out
        )),
        "{system}"
    );
    Ok(())
}

#[tokio::test]
async fn a_turn_after_one_stopped_while_queued_still_waits_for_the_running_one()
-> anyhow::Result<()> {
    let stack = offline_stack(1, &[]).await?;
    let long = format!("Please listen: {}", "word ".repeat(80));
    let running = turn(&stack, "queue", &long).await?;
    recorded(&stack, running, |b| matches!(b, Body::RunStarted(_))).await?;
    // Queued behind it, then stopped before it ever started.
    let queued = turn(&stack, "queue", "Second").await?;
    recorded(&stack, queued, |b| matches!(b, Body::TurnOrdered(_))).await?;
    let stopped = stack
        .http
        .post(stack.url(&format!("/v1/runs/{queued}/stop")))
        .send()
        .await?;
    assert_eq!(stopped.status(), 202);
    let queued_log = stack.wait_finished_or_show(queued, LIMIT).await?;
    assert_eq!(finished(&queued_log).status(), RunStatus::Stopped);
    assert!(!bodies(&queued_log).any(|b| matches!(b, Body::RunStarted(_))));
    // The next one follows the stopped one in the chain, and still waits for the
    // running one: never two at once.
    let third = turn(&stack, "queue", "Third").await?;
    let third_log = stack.wait_finished_or_show(third, LIMIT).await?;
    let first_log = stack.wait_finished_or_show(running, LIMIT).await?;
    assert_eq!(ordered(&third_log).previous_run_id, queued.to_string());
    let ended = time_of(&first_log, |b| matches!(b, Body::RunFinished(_)));
    let started = time_of(&third_log, |b| matches!(b, Body::RunStarted(_)));
    assert!(
        started >= ended,
        "the third turn started at {started}, before {ended}"
    );
    // Its context holds both earlier turns, the stopped one shown as it ended.
    assert_eq!(
        context(&third_log).earlier_run_ids,
        vec![running.to_string(), queued.to_string()]
    );
    Ok(())
}

#[tokio::test]
async fn a_turn_that_hands_off_in_a_loop_is_stopped_at_ten_runs() -> anyhow::Result<()> {
    let stack = paced_stack(1, &[], "0").await?;
    let lines: Vec<String> = (0..12)
        .map(|i| format!(r#"call: dispatch.dispatch {{"goal": "Errand number {i}"}}"#))
        .collect();
    let events = stack
        .wait_finished_or_show(turn(&stack, "loop-off", &lines.join("\n")).await?, LIMIT)
        .await?;
    let (started, refused) = completed_and_refused(&events);
    assert_eq!(started, 10, "{refused:?}");
    assert_eq!(refused.len(), 2);
    assert!(
        refused[0].contains("the most one turn may (10)"),
        "{}",
        refused[0]
    );
    Ok(())
}
