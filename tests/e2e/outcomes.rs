//! A run says `done` only when every step was shown done: a step needs a gate, a step
//! whose model says it could not finish or whose last call failed is FAILED, a step
//! after a failed one in an ordered plan is not run, and a run with a step not DONE
//! ends `blocked`, saying how many and which came first.

use dispatch_models::{CallForm, Exchange, ToolCall, TurnReply, TurnRequest};
use dispatch_proto::run::v1::{LeafFinished, LeafState, RunStatus, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_tests::scripted::{Scripted, run_scripted};
use dispatch_tests::{Stack, finished};

fn leaves(events: &[StoredEvent]) -> Vec<LeafFinished> {
    events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::LeafFinished(f)) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn said(text: &str, tool_calls: Vec<ToolCall>) -> TurnReply {
    TurnReply {
        text: text.into(),
        tool_calls,
        usage: Default::default(),
        form: CallForm::Native,
    }
}

fn results(request: &TurnRequest) -> usize {
    request
        .history
        .iter()
        .filter(|e| matches!(e, Exchange::ToolResult { .. }))
        .count()
}

#[tokio::test]
async fn a_plan_with_a_step_without_a_gate_is_sent_back_then_refused() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let gateless = "#+TITLE: Notes\n\
        * TODO Read the notes\n  Read scratch/notes.org.\n  :done-when: test -d scratch\n\
        * TODO Think them over\n  Nothing to check.\n";
    let model = Scripted::new(&[gateless, gateless]);
    let events = run_scripted(&stack, model.clone(), "Think it over").await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with(
            "plan rejected: no_gate: 1 of 2 steps have no `:done-when:` line (\"Think them over\")"
        ),
        "{}",
        end.reason
    );
    let retry = model.asked.lock().unwrap()[1].retry.clone();
    assert!(
        retry.is_some_and(|r| r.error.contains("no_gate") && r.error.contains("Think them over")),
        "the second request was not told why"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event.body, Some(Body::LeafStarted(_)))),
        "a step of a refused plan ran"
    );

    // Told, an author that adds the gate gets its plan run.
    let gated = "#+TITLE: Notes\n\
        * TODO Read the notes\n  :done-when: test -d scratch\n\
        * TODO Think them over\n  :done-when: test -s scratch/thoughts.org\n";
    let model = Scripted::new(&[gateless, gated]);
    let events = run_scripted(&stack, model, "Think it over").await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    Ok(())
}

/// A model's gate that passes whatever the step did shows nothing done: sent back like
/// a missing one, and refused on the last attempt. The same plan given as the goal (the
/// offline provider runs it as written) is its writer's choice, and runs.
#[tokio::test]
async fn a_model_plan_whose_gate_passes_whatever_happens_is_sent_back() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let blind = "#+TITLE: Notes\n\
        * TODO Read the notes\n  :done-when: test -d scratch\n\
        * TODO Think them over\n  :done-when: test -s scratch/thoughts.org || true\n";
    let model = Scripted::new(&[blind, blind]);
    let events = run_scripted(&stack, model.clone(), "Think it over").await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with(
            "plan rejected: blind_gate: 1 of 2 steps have a check that passes whatever the \
             step did (\"Think them over\""
        ),
        "{}",
        end.reason
    );
    let retry = model.asked.lock().unwrap()[1].retry.clone();
    assert!(
        retry.is_some_and(|r| r.error.contains("blind_gate")),
        "the second request was not told why"
    );

    let mut stack = stack;
    stack.add("dispatcher").await?;
    let run_id = stack.submit(blind, "default", 0).await?;
    let events = stack
        .wait_finished(run_id, std::time::Duration::from_secs(60))
        .await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    Ok(())
}

/// The first step's gate can never pass: the ordered steps after it are not run, the
/// unordered one is, and the run is blocked with the tally.
#[tokio::test]
async fn a_failed_step_blocks_the_run_and_the_ordered_steps_after_it() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let ordered = "  :PROPERTIES:\n  :ORDERED: t\n  :END:\n";
    let plan = format!(
        "#+TITLE: Chain\n\
         * TODO Find the source\n{ordered}  - call: files.write_file {{\"path\": \"scratch/source.org\", \"content\": \"x\"}}\n  :done-when: false\n\
         * TODO Build on it\n{ordered}  :done-when: test -s scratch/built.org\n\
         * TODO Note the date\n  :done-when: test -s scratch/date.org\n\
         * TODO Report\n{ordered}  :done-when: test -s scratch/REPORT.org\n"
    );
    let model = Scripted::new(&[&plan]);
    let events = run_scripted(&stack, model, "Chain the steps").await?;
    let states: Vec<(u32, LeafState)> = leaves(&events)
        .iter()
        .map(|f| (f.leaf, f.state()))
        .collect();
    assert_eq!(
        states,
        [
            (0, LeafState::Failed),
            (1, LeafState::Skipped),
            (2, LeafState::Done),
            (3, LeafState::Skipped),
        ]
    );
    let skipped = &leaves(&events)[1];
    assert_eq!(
        skipped.reason,
        "not run: step 1 (\"Find the source\") before it failed"
    );
    assert!(
        !events.iter().any(
            |e| matches!(&e.event.body, Some(Body::LeafStarted(s)) if s.leaf == 1 || s.leaf == 3)
        ),
        "a step that was not run was started"
    );
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert!(
        end.reason.starts_with(
            "1 of 4 steps failed, 2 not run: step 1 (\"Find the source\"): gate failed: "
        ),
        "{}",
        end.reason
    );
    assert!(
        end.summary.starts_with(
            "workflow finished: {\"DONE\": 1, \"FAILED\": 1, \"SKIPPED\": 2}\n1 of 4 steps failed"
        ),
        "{}",
        end.summary
    );
    Ok(())
}

/// Says the step is not done, on a step whose gate would pass.
fn gives_up(_: &TurnRequest) -> TurnReply {
    said("I looked for the file. The step is not done.", vec![])
}

/// Reads a file that is not there, then says it is finished without trying again.
fn ignores_a_failure(request: &TurnRequest) -> TurnReply {
    match results(request) {
        0 => said(
            "Reading the notes.",
            vec![ToolCall::new(
                "files.read_file",
                r#"{"path": "scratch/missing.org"}"#,
            )],
        ),
        _ => said("I read the notes and summarised them.", vec![]),
    }
}

/// Reads a file that is not there, then writes it and reads it again.
fn tries_again(request: &TurnRequest) -> TurnReply {
    match results(request) {
        0 => said(
            "Reading the notes.",
            vec![ToolCall::new(
                "files.read_file",
                r#"{"path": "scratch/missing.org"}"#,
            )],
        ),
        1 => said(
            "It is not there; writing it.",
            vec![ToolCall::new(
                "files.write_file",
                r#"{"path": "scratch/missing.org", "content": "found"}"#,
            )],
        ),
        _ => said("I wrote the notes.", vec![]),
    }
}

#[tokio::test]
async fn a_step_is_failed_when_its_model_gives_up_or_ends_on_a_failed_call() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let plan = "#+TITLE: Notes\n* TODO Read the notes\n  :done-when: test -d scratch\n";

    let model = Scripted::with_worker(&[plan], gives_up);
    let events = run_scripted(&stack, model, "Give up").await?;
    let leaf = &leaves(&events)[0];
    assert_eq!(leaf.state(), LeafState::Failed);
    assert_eq!(
        leaf.reason,
        "the model said the step is not done: The step is not done."
    );
    // It said so: its gate, which would pass, was not what decided.
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event.body, Some(Body::GateChecked(_))))
    );
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Blocked as i32);
    assert_eq!(
        end.reason,
        "1 of 1 steps failed: step 1 (\"Read the notes\"): the model said the step is not \
         done: The step is not done."
    );

    let model = Scripted::with_worker(&[plan], ignores_a_failure);
    let events = run_scripted(&stack, model, "Ignore a failure").await?;
    let leaf = &leaves(&events)[0];
    assert_eq!(leaf.state(), LeafState::Failed);
    assert!(
        leaf.reason
            .starts_with("its last tool call failed and was not tried again: files.read_file: "),
        "{}",
        leaf.reason
    );
    assert_eq!(finished(&events).status, RunStatus::Blocked as i32);

    // A failure the model got past is no failure of the step.
    let model = Scripted::with_worker(&[plan], tries_again);
    let events = run_scripted(&stack, model, "Try again").await?;
    let end = finished(&events);
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    assert_eq!(leaves(&events)[0].reason, "gate passed: test -d scratch");
    Ok(())
}

/// Asks for the same write twice in one turn, its arguments spelt two ways.
fn repeats_itself(request: &TurnRequest) -> TurnReply {
    match results(request) {
        0 => said(
            "Writing the note.",
            vec![
                ToolCall::new(
                    "files.write_file",
                    r#"{"path": "scratch/note.org", "content": "a note"}"#,
                ),
                ToolCall::new(
                    "files.write_file",
                    r#"{"content":"a note","path":"scratch/note.org"}"#,
                ),
            ],
        ),
        _ => said("I wrote the note.", vec![]),
    }
}

#[tokio::test]
async fn a_call_asked_for_twice_in_one_turn_runs_once() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let plan = "#+TITLE: Note\n* TODO Write a note\n  :done-when: test -s scratch/note.org\n";
    let model = Scripted::with_worker(&[plan], repeats_itself);
    let events = run_scripted(&stack, model.clone(), "Write once").await?;
    let requested: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            Some(Body::ToolCallRequested(r)) => Some(r.call_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(requested, ["l0-t0-c0"]);
    let turns = model.turns.lock().unwrap();
    let told: Vec<String> = turns[1]
        .history
        .iter()
        .filter_map(|e| match e {
            Exchange::ToolResult {
                call_id,
                result: Ok(text),
                ..
            } => Some(format!("{call_id}: {text}")),
            _ => None,
        })
        .collect();
    assert_eq!(told.len(), 2, "{told:?}");
    assert_eq!(
        told[1],
        "l0-t0-c1: not run: this is the same call as l0-t0-c0, made once in this turn; \
         its result is above"
    );
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    Ok(())
}

/// Searches for a tool, then writes with the one its step names, then says it is done.
fn searches_then_writes(request: &TurnRequest) -> TurnReply {
    match results(request) {
        0 => said(
            "Looking for a reader.",
            vec![ToolCall::new("tools.search", r#"{"query": "read a file"}"#)],
        ),
        1 => said(
            "Writing it.",
            vec![ToolCall::new(
                "files.write_file",
                r#"{"path": "scratch/found.org", "content": "found"}"#,
            )],
        ),
        _ => said("I wrote it.", vec![]),
    }
}

/// A step whose author named its tools is offered those and `tools.search`, and then
/// what its searches found; a step that names none, every tool.
#[tokio::test]
async fn a_step_is_offered_the_tools_it_names_and_what_it_searches_for() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    stack
        .eventually(std::time::Duration::from_secs(30), || async {
            let out = stack.cli(&["tools"]).ok()?;
            out.stdout.contains("tools.search").then_some(())
        })
        .await?;
    let plan = "#+TITLE: Find\n* TODO Find and write\n  :PROPERTIES:\n  :TOOLS: files.write_file\n  :END:\n  :done-when: test -s scratch/found.org\n";
    let model = Scripted::with_worker(&[plan], searches_then_writes);
    let events = run_scripted(&stack, model.clone(), "Find a tool").await?;
    assert_eq!(finished(&events).status, RunStatus::Done as i32);
    let offered: Vec<Vec<String>> = model
        .turns
        .lock()
        .unwrap()
        .iter()
        .map(|t| {
            let mut names: Vec<String> = t.tools.iter().map(|s| s.name.clone()).collect();
            names.sort();
            names
        })
        .collect();
    assert_eq!(offered[0], ["files.write_file", "tools.search"]);
    assert!(
        offered[1].contains(&"files.read_file".to_owned()) && offered[1].len() < 8,
        "{:?}",
        offered[1]
    );
    let searched = events.iter().find_map(|e| match &e.event.body {
        Some(Body::ToolCallCompleted(c)) if c.call_id == "l0-t0-c0" => Some(c.output.clone()),
        _ => None,
    });
    assert!(
        searched
            .as_deref()
            .is_some_and(|s| s.contains("- files.read_file (read):")),
        "{searched:?}"
    );

    // A step checked on a file under scratch/ is offered the write that makes it, named
    // or not.
    let plan = "#+TITLE: Note\n* TODO Read and note\n  :PROPERTIES:\n  :TOOLS: files.read_file\n  :END:\n  :done-when: test -s scratch/found.org\n";
    let model = Scripted::with_worker(&[plan], searches_then_writes);
    run_scripted(&stack, model.clone(), "Read and note").await?;
    let mut first: Vec<String> = model.turns.lock().unwrap()[0]
        .tools
        .iter()
        .map(|t| t.name.clone())
        .collect();
    first.sort();
    assert_eq!(
        first,
        ["files.read_file", "files.write_file", "tools.search"]
    );

    // Named by no :TOOLS: line, a step is offered everything on offer.
    let plan = "#+TITLE: All\n* TODO Write\n  :done-when: test -s scratch/found.org\n";
    let model = Scripted::with_worker(&[plan], searches_then_writes);
    run_scripted(&stack, model.clone(), "Every tool").await?;
    let first = model.turns.lock().unwrap()[0].tools.len();
    assert!(first > 2, "{first} tools offered");
    Ok(())
}

/// Writes a file and then claims more than it did (the 1.5B model's "listed and written
/// to REPORT.org"); the second step answers without a call, even when told to make one;
/// the third looks on.
fn claims_more(request: &TurnRequest) -> TurnReply {
    match (request.leaf.index, results(request)) {
        (0, 0) => said(
            "Writing the list.",
            vec![ToolCall::new(
                "files.write_file",
                r#"{"path": "scratch/list.txt", "content": "a.txt"}"#,
            )],
        ),
        (0, _) => said("DONE: listed and written to scratch/REPORT.org.", vec![]),
        (1, _) => said("The list holds one file.", vec![]),
        _ => said("Nothing more to do.", vec![]),
    }
}

/// A later step is told what an earlier one's calls returned, and its words only when
/// it made no call: a claim beside real results is not passed on as a fact.
#[tokio::test]
async fn a_step_is_told_the_earlier_results_not_the_earlier_claims() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let plan = "#+TITLE: List\n\
        * TODO Write the list\n  :done-when: test -s scratch/list.txt\n\
        * TODO Count it\n  :done-when: test -s scratch/list.txt\n\
        * TODO Look\n  :done-when: test -s scratch/list.txt\n";
    let model = Scripted::with_worker(&[plan], claims_more);
    run_scripted(&stack, model.clone(), "List and count").await?;
    let turns = model.turns.lock().unwrap();
    let last = turns.last().expect("a turn");
    assert_eq!(last.leaf.index, 2);
    let told: Vec<&str> = last.earlier.iter().map(|s| s.found.as_str()).collect();
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(
        told[0].starts_with("files.write_file returned:"),
        "{}",
        told[0]
    );
    assert!(!told[0].contains("REPORT.org"), "{}", told[0]);
    assert!(
        told[1].starts_with("Its answer: The list holds one file."),
        "{}",
        told[1]
    );
    // How a step ended is said when it was not done: the second made no call, and was
    // told to once, so nothing showed it done, whatever its gate said.
    assert!(!told[0].contains("It ended"), "{}", told[0]);
    assert!(
        told[1].contains("It ended: the model made no tool call in the step"),
        "{}",
        told[1]
    );
    Ok(())
}

/// Looks for a tool, finds one, and says the step is done without using it (the 1.5B
/// model's `tools.search` for "kill switch", then "The step is done.", recorded).
fn only_searches(request: &TurnRequest) -> TurnReply {
    match results(request) {
        0 => said(
            "Looking for a writer.",
            vec![ToolCall::new(
                "tools.search",
                r#"{"query": "write a file"}"#,
            )],
        ),
        _ => said("The step is done.", vec![]),
    }
}

/// Looking for tools is no part of a step's work: a step whose only call was
/// `tools.search` is told once that it has done nothing yet, then FAILED, and its gate
/// (here one that passes whatever happens, as a file an earlier step made would) is not
/// what decides.
#[tokio::test]
async fn a_step_that_only_looked_for_tools_has_not_done_its_work() -> anyhow::Result<()> {
    let stack = Stack::start(&["policy", "connectors"]).await?;
    let plan = "#+TITLE: Note\n* TODO Write the note\n  :done-when: test -d scratch\n";
    let model = Scripted::with_worker(&[plan], only_searches);
    let events = run_scripted(&stack, model.clone(), "Only search").await?;

    let turns = model.turns.lock().unwrap();
    assert_eq!(turns.len(), 3, "search, done, done when told");
    assert!(matches!(
        turns[2].history.last(),
        Some(Exchange::DoneUntried)
    ));
    let searched = events.iter().any(
        |e| matches!(&e.event.body, Some(Body::ToolCallCompleted(c)) if c.call_id == "l0-t0-c0"),
    );
    assert!(searched, "the search ran");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event.body, Some(Body::GateChecked(_))))
    );
    let leaf = &leaves(&events)[0];
    assert_eq!(leaf.state(), LeafState::Failed);
    assert!(
        leaf.reason
            .starts_with("the model made no tool call in the step other than looking for tools"),
        "{}",
        leaf.reason
    );
    assert_eq!(finished(&events).status, RunStatus::Blocked as i32);
    Ok(())
}
