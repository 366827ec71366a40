//! Errands people run, each with a deterministic checker of its result: files through
//! the official filesystem MCP server, research on a small local web site through the
//! http connector, writes outside the run that wait for a person (approved, and
//! denied), an impossible errand, one that needs two sources.
//!
//! `cargo xtask errands --model-url URL` runs them all against a model server and
//! prints a table (and JSON per errand: status, whether the result is correct, wall
//! time, the model's time and Dispatch's, tokens, and the first cause of a failure).
//! `--record DIR` also keeps the model's answers, which is how the errands that run
//! by default (against the stand-in, in CI) were recorded: the stand-in replays what
//! the real model said, in order, so the whole runtime runs as it ran then.
//!
//! The target: no run ends `done` with a wrong result, and no failure is the runtime's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dispatch_bus::RunId;
use dispatch_proto::run::v1::{LeafState, RunStatus, run_event::Body};
use dispatch_runlog::StoredEvent;
use dispatch_testkit::mcp_servers;
use dispatch_testkit::model::{Reply, StandIn};
use dispatch_tests::Stack;
use serde_json::{Value, json};

/// A small model on two cores: an errand takes minutes.
const LIMIT: Duration = Duration::from_secs(12 * 60);

/// The errands recorded from a real model (Qwen2.5-Coder-1.5B) and replayed by default.
const RECORDED: &[&str] = &["impossible"];

/// Where the recorded answers are, under the stand-in's captures.
const CAPTURES: &str = "errands";

/// What a run should end as, for its result to be right.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Done,
    Blocked,
}

/// What the suite does when the run asks a person.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Person {
    Absent,
    Approves,
    Denies,
}

struct Errand {
    name: &'static str,
    goal: fn(&Fixture) -> String,
    expect: Expect,
    person: Person,
    /// Whether the result is right, given the run's report and what it left.
    check: fn(&Fixture, &Ended) -> Result<(), String>,
}

/// The world the errands act on: a shared folder the filesystem server serves, and a
/// small web site.
struct Fixture {
    shared: PathBuf,
    site: String,
}

struct Ended {
    status: RunStatus,
    report: String,
    /// Approval requests the run made.
    asked: usize,
}

fn docs(f: &Fixture) -> String {
    f.shared.join("docs").display().to_string()
}

fn has(report: &str, words: &[&str]) -> Result<(), String> {
    let lower = report.to_lowercase();
    match words.iter().find(|w| !lower.contains(&w.to_lowercase())) {
        Some(missing) => Err(format!("the report does not name {missing:?}")),
        None => Ok(()),
    }
}

fn lacks(report: &str, words: &[&str]) -> Result<(), String> {
    let lower = report.to_lowercase();
    match words.iter().find(|w| lower.contains(&w.to_lowercase())) {
        Some(found) => Err(format!("the report names {found:?}, which is wrong")),
        None => Ok(()),
    }
}

fn errands() -> Vec<Errand> {
    vec![
        Errand {
            name: "list-files",
            goal: |f| {
                format!(
                    "List the names of the files in the folder {} and write them to \
                     scratch/REPORT.org, one per line.",
                    docs(f)
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| has(&e.report, &["changelog.txt", "safety.md", "budget.txt"]),
        },
        Errand {
            name: "find-word",
            goal: |f| {
                format!(
                    "Find which file in the folder {} mentions a kill switch, and write its \
                     name to scratch/REPORT.org.",
                    docs(f)
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| {
                has(&e.report, &["safety.md"])?;
                lacks(&e.report, &["changelog.txt"])
            },
        },
        Errand {
            name: "summarise",
            goal: |f| {
                format!(
                    "Summarise the release history in {}/changelog.txt in a few lines in \
                     scratch/REPORT.org, naming each version.",
                    docs(f)
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| has(&e.report, &["1.0", "1.1"]),
        },
        Errand {
            name: "count-files",
            goal: |f| {
                format!(
                    "How many files are in the folder {}? Write the number to \
                     scratch/REPORT.org.",
                    docs(f)
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| has(&e.report, &["3"]),
        },
        Errand {
            name: "page-title",
            goal: |f| {
                format!(
                    "What company is the web page {}/about about? Fetch it with \
                     http.request and write the company's name to scratch/REPORT.org.",
                    f.site
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| has(&e.report, &["Acme Supplies"]),
        },
        Errand {
            name: "cheaper-product",
            goal: |f| {
                format!(
                    "Two products are sold at {site}/products/boxfleet and \
                     {site}/products/cratebox. Fetch both pages with http.request and write \
                     to scratch/REPORT.org which one is cheaper and its price.",
                    site = f.site
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| {
                has(&e.report, &["CrateBox", "35.50"])?;
                lacks(
                    &e.report,
                    &["BoxFleet is cheaper", "cheaper product is BoxFleet"],
                )
            },
        },
        Errand {
            name: "two-sources",
            goal: |f| {
                format!(
                    "The budget is in {}/budget.txt. Fetch {site}/products/boxfleet and \
                     {site}/products/cratebox with http.request, and write to \
                     scratch/REPORT.org which products fit the budget.",
                    docs(f),
                    site = f.site
                )
            },
            expect: Expect::Done,
            person: Person::Absent,
            check: |_, e| {
                has(&e.report, &["CrateBox"])?;
                lacks(
                    &e.report,
                    &["BoxFleet fits", "both fit", "both products fit"],
                )
            },
        },
        Errand {
            name: "write-approved",
            goal: |f| {
                format!(
                    "Write the text 'release 1.1 approved' to the file {}/out/approval.txt.",
                    f.shared.display()
                )
            },
            expect: Expect::Done,
            person: Person::Approves,
            check: |f, _| {
                let written = std::fs::read_to_string(f.shared.join("out/approval.txt"))
                    .map_err(|e| format!("out/approval.txt: {e}"))?;
                has(&written, &["release 1.1 approved"])
            },
        },
        Errand {
            name: "write-denied",
            goal: |f| {
                format!(
                    "Write the text 'delete everything' to the file {}/out/orders.txt.",
                    f.shared.display()
                )
            },
            expect: Expect::Blocked,
            person: Person::Denies,
            check: |f, _| match f.shared.join("out/orders.txt").exists() {
                true => Err("the denied file was written".into()),
                false => Ok(()),
            },
        },
        Errand {
            name: "impossible",
            goal: |f| {
                format!(
                    "Summarise the file {}/minutes-2019.txt in scratch/REPORT.org.",
                    docs(f)
                )
            },
            expect: Expect::Blocked,
            person: Person::Absent,
            check: |_, _| Ok(()),
        },
    ]
}

/// The files and pages the errands work on.
async fn fixture() -> anyhow::Result<(tempfile::TempDir, Fixture)> {
    let dir = tempfile::tempdir()?;
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs)?;
    std::fs::create_dir_all(dir.path().join("out"))?;
    std::fs::write(
        docs.join("changelog.txt"),
        "Release history\n\nv1.0 (March): the first release, with goals over HTTP.\n\
         v1.1 (June): schedules and webhooks.\n",
    )?;
    std::fs::write(
        docs.join("safety.md"),
        "# Safety\n\nEvery run has a kill switch: after 35 minutes it is stopped.\n",
    )?;
    std::fs::write(
        docs.join("budget.txt"),
        "Budget for one product: 40.00 EUR\n",
    )?;

    let page = |title: &str, body: &str| {
        axum::response::Html(format!(
            "<html><head><title>{title}</title></head><body>{body}</body></html>"
        ))
    };
    let boxfleet = page(
        "BoxFleet",
        "<h1>BoxFleet</h1><p>A fleet of storage boxes.</p><p>Price: 49.00 EUR</p>",
    );
    let cratebox = page(
        "CrateBox",
        "<h1>CrateBox</h1><p>One sturdy crate.</p><p>Price: 35.50 EUR</p>",
    );
    let about = page(
        "About us",
        "<h1>Acme Supplies</h1><p>Acme Supplies sells boxes and crates since 1999.</p>",
    );
    let app = axum::Router::new()
        .route(
            "/products/boxfleet",
            axum::routing::get(move || async move { boxfleet.clone() }),
        )
        .route(
            "/products/cratebox",
            axum::routing::get(move || async move { cratebox.clone() }),
        )
        .route(
            "/about",
            axum::routing::get(move || async move { about.clone() }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let site = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let shared = dir.path().to_path_buf();
    Ok((dir, Fixture { shared, site }))
}

/// The policy a careful user would set: reads are free, writes in the run's scratch/,
/// everything else asks.
const POLICY: &str = r#"{"default": "ask", "rules": [
  {"name": "reads", "effect": "allow", "risk": ["read"]},
  {"name": "run-writes", "effect": "allow", "risk": ["write"], "when": {"path_prefix": ["scratch/"]}},
  {"name": "risky", "effect": "ask", "risk": ["destructive", "external"], "approval_ttl_ms": 600000}
]}"#;

/// Ledger, policy, connectors (the filesystem server on the shared folder, the http
/// connector on the site) and a dispatcher on `model_url`.
async fn stack(fixture: &Fixture, model_url: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let host = fixture.site.trim_start_matches("http://");
    let server =
        mcp_servers().join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    std::fs::write(
        stack.root().join("dispatch.toml"),
        format!(
            "[[connectors.mcp]]\nname = \"fs\"\ncommand = \"node\"\nargs = [{:?}, {:?}]\n\
             trust_annotations = true\n\n[connectors.http]\nallow_hosts = [{host:?}]\n",
            server.display().to_string(),
            fixture.shared.display().to_string(),
        ),
    )?;
    let policy = stack.root().join("policy.json");
    std::fs::write(&policy, POLICY)?;
    stack
        .add_with("policy", &["--policy", policy.to_str().context("utf-8")?])
        .await?;
    stack.add("connectors").await?;
    stack
        .add_with(
            "dispatcher",
            &[
                "--model-url",
                model_url,
                "--max-turns",
                "6",
                "--model-timeout-ms",
                "600000",
            ],
        )
        .await?;
    stack
        .eventually(Duration::from_secs(60), || async {
            let out = stack.cli(&["tools"]).ok()?;
            out.stdout.contains("fs.read_text_file").then_some(())
        })
        .await?;
    Ok(stack)
}

/// One errand's outcome, as printed and written.
#[derive(serde::Serialize)]
struct Outcome {
    errand: &'static str,
    run_id: String,
    status: String,
    expected: String,
    correct: bool,
    /// Ended `done` with a result the checker refused: the worst outcome.
    done_but_wrong: bool,
    why_wrong: Option<String>,
    wall_ms: u64,
    model_ms: u64,
    dispatch_ms: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// For a wrong result: what first went wrong, and whose it was.
    first_cause: Option<Value>,
}

/// Waits for the run, answering its approval requests as `person` would.
async fn carry_out(
    stack: &Stack,
    run_id: RunId,
    person: Person,
) -> anyhow::Result<Vec<StoredEvent>> {
    let run = run_id.to_string();
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = stack.wait_finished_or_show(run_id, LIMIT);
    let answer = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(out) = stack.cli(&["approvals", "--format", "json"]) else {
                continue;
            };
            let listed: Vec<Value> = serde_json::from_str(&out.stdout).unwrap_or_default();
            for approval in listed.iter().filter(|a| a["run_id"] == run.as_str()) {
                let id = approval["approval_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if answered.lock().unwrap().contains(&id) {
                    continue;
                }
                let verb = match person {
                    Person::Approves => "approve",
                    Person::Denies | Person::Absent => "deny",
                };
                let _ = stack.cli(&[verb, &id, "--by", "errands"]);
                answered.lock().unwrap().push(id);
            }
        }
    };
    tokio::select! {
        events = done => events,
        () = answer => unreachable!("the approver never ends"),
    }
}

/// The model's time: from the event before each answer to the answer.
fn model_ms(events: &[StoredEvent]) -> u64 {
    let mut total = 0;
    for pair in events.windows(2) {
        if matches!(
            pair[1].event.body,
            Some(Body::PlanAuthored(_) | Body::PlanRejected(_) | Body::ModelTurn(_))
        ) {
            total += (pair[1].event.time_unix_ms - pair[0].event.time_unix_ms).max(0) as u64;
        }
    }
    total
}

fn tokens(events: &[StoredEvent]) -> (u64, u64) {
    let mut sum = (0, 0);
    for e in events {
        let usage = match &e.event.body {
            Some(Body::PlanAuthored(p)) => p.usage,
            Some(Body::PlanRejected(p)) => p.usage,
            Some(Body::ModelTurn(t)) => t.usage,
            _ => None,
        };
        if let Some(u) = usage {
            sum.0 += u.prompt_tokens;
            sum.1 += u.completion_tokens;
        }
    }
    sum
}

/// Whose a failure's reason says it was: the runtime's when a service gave up, a run
/// was orphaned, a process panicked or something could not be reached or done; the
/// model's otherwise. What the model itself said (its "NOT DONE: … cannot be read"),
/// and a refused plan (quoting the author's gates), are the model's whatever their
/// words.
fn whose(reason: &str) -> &'static str {
    const MODEL_SAID: [&str; 2] = ["the model said the step is not done: ", "plan rejected: "];
    const RUNTIME_WORDS: [&str; 5] = [
        "abandoned",
        "orphaned",
        "panicked",
        "unreachable",
        "cannot ",
    ];
    // A run's reason names its first failed step's: look at the step's own words.
    let own = reason.split_once("): ").map_or(reason, |(_, step)| step);
    if MODEL_SAID
        .iter()
        .any(|m| own.starts_with(m) || reason.starts_with(m))
    {
        return "model";
    }
    match RUNTIME_WORDS.iter().any(|w| reason.contains(w)) {
        true => "runtime",
        false => "model",
    }
}

/// What first went wrong in a run whose result is wrong, and whose it was: the
/// runtime's when a service gave up a command, or a step or the run failed for a
/// reason of the runtime's ([`whose`]); the model's when its plan was refused, a step
/// it ran failed its gate or it said it could not finish, or it wrote a wrong report.
fn first_cause(events: &[StoredEvent]) -> Value {
    for e in events {
        let (kind, text) = match &e.event.body {
            Some(Body::CommandAbandoned(a)) => {
                ("runtime", format!("{} {}: {}", a.command, a.key, a.reason))
            }
            Some(Body::LeafFinished(f)) if f.state() == LeafState::Failed => (
                whose(&f.reason),
                format!("leaf {} failed: {}", f.leaf + 1, f.reason),
            ),
            Some(Body::RunFinished(f)) if f.status() != RunStatus::Done => {
                (whose(&f.reason), f.reason.clone())
            }
            _ => continue,
        };
        return json!({"whose": kind, "seq": e.event.seq, "event": e.event.body.as_ref().map(|b| b.kind()), "what": text});
    }
    json!({"whose": "model", "what": "the run ended done with a report its checker refused"})
}

#[test]
fn whose_a_failure_was_is_read_from_the_runtime_s_words_not_the_model_s() {
    // Run 12's write-denied: the model's own words said "cannot".
    assert_eq!(
        whose(
            "the model said the step is not done: NOT DONE: The path \"/tmp/x\" is outside \
             scratch/ and cannot be read."
        ),
        "model"
    );
    assert_eq!(
        whose(
            "1 of 2 steps failed, 1 not run: step 1 (\"Read /tmp/x\"): the model said the step \
             is not done: it cannot be read"
        ),
        "model"
    );
    assert_eq!(
        whose("plan rejected: unusable_gate: `test -s /x` cannot pass"),
        "model"
    );
    assert_eq!(
        whose("its last tool call failed and was not tried again: fs.read: server unreachable"),
        "runtime"
    );
    assert_eq!(whose("run orphaned: its owner stopped"), "runtime");
    assert_eq!(whose("gate failed: scratch/a does not exist"), "model");
}

async fn run_errand(
    fixture: &Fixture,
    model_url: &str,
    errand: &Errand,
) -> anyhow::Result<Outcome> {
    let stack = stack(fixture, model_url).await?;
    let began = Instant::now();
    let run_id = stack
        .submit(&(errand.goal)(fixture), "errands", LIMIT.as_millis() as u64)
        .await?;
    let events = carry_out(&stack, run_id, errand.person).await?;
    let wall_ms = began.elapsed().as_millis() as u64;
    let end = dispatch_tests::finished(&events);
    let report = std::fs::read_to_string(
        stack
            .root()
            .join(format!(".dispatch/runs/{run_id}/scratch/REPORT.org")),
    )
    .unwrap_or_else(|_| end.report.clone());
    let ended = Ended {
        status: end.status(),
        report,
        asked: events
            .iter()
            .filter(|e| matches!(e.event.body, Some(Body::ApprovalRequested(_))))
            .count(),
    };
    let status_right = match errand.expect {
        Expect::Done => ended.status == RunStatus::Done,
        Expect::Blocked => ended.status == RunStatus::Blocked,
    };
    // An errand a person answers is right only if the run got as far as asking.
    let checked = match errand.person {
        Person::Approves | Person::Denies if ended.asked == 0 => {
            Err("no approval was asked: the write never reached the gate".to_owned())
        }
        _ => (errand.check)(fixture, &ended),
    };
    let why_wrong = match (&checked, status_right) {
        (Err(why), _) => Some(why.clone()),
        (Ok(()), false) => Some(format!(
            "ended {} ({}), where {} is right",
            ended.status.word(),
            end.reason,
            format!("{:?}", errand.expect).to_lowercase()
        )),
        (Ok(()), true) => None,
    };
    let correct = why_wrong.is_none();
    let model_ms = model_ms(&events);
    let (prompt_tokens, completion_tokens) = tokens(&events);
    if !correct {
        eprintln!("errand {} was not right; its log:", errand.name);
        if let Ok(logs) = stack.cli(&["logs", &run_id.to_string()]) {
            eprintln!("{}", logs.stdout);
        }
        eprintln!("report: {:?}", ended.report);
    }
    Ok(Outcome {
        errand: errand.name,
        run_id: run_id.to_string(),
        status: ended.status.word().to_owned(),
        expected: format!("{:?}", errand.expect).to_lowercase(),
        correct,
        done_but_wrong: ended.status == RunStatus::Done && !correct,
        why_wrong,
        wall_ms,
        model_ms,
        dispatch_ms: wall_ms.saturating_sub(model_ms),
        prompt_tokens,
        completion_tokens,
        first_cause: (!correct).then(|| first_cause(&events)),
    })
}

fn print_table(outcomes: &[Outcome]) {
    eprintln!(
        "\n{:<16} {:<8} {:<8} {:>8} {:>9} {:>9} {:>8} {:>7}  first cause",
        "ERRAND", "STATUS", "CORRECT", "WALL s", "MODEL s", "DISPATCH", "PROMPT", "COMPL"
    );
    for o in outcomes {
        eprintln!(
            "{:<16} {:<8} {:<8} {:>8.1} {:>9.1} {:>8.1}s {:>8} {:>7}  {}",
            o.errand,
            o.status,
            if o.correct { "yes" } else { "NO" },
            o.wall_ms as f64 / 1000.0,
            o.model_ms as f64 / 1000.0,
            o.dispatch_ms as f64 / 1000.0,
            o.prompt_tokens,
            o.completion_tokens,
            o.first_cause.as_ref().map_or(String::new(), |c| format!(
                "{}: {}",
                c["whose"],
                c["what"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(90)
                    .collect::<String>()
            )),
        );
    }
    let right = outcomes.iter().filter(|o| o.correct).count();
    let wrong_done = outcomes.iter().filter(|o| o.done_but_wrong).count();
    eprintln!(
        "{right} of {} right; {wrong_done} ended done with a wrong result",
        outcomes.len()
    );
}

/// The recorded answers of `errand`, in order, as the stand-in replays them: the
/// recording's folder and site address, which its goal names, swapped for `fixture`'s.
fn recorded(errand: &str, fixture: &Fixture) -> Vec<Reply> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../libs/testkit/captures/openai")
        .join(CAPTURES)
        .join(errand);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let first_request = names
        .iter()
        .find(|n| n.ends_with(".request.json"))
        .expect("a recording starts with a request");
    let asked: Value = serde_json::from_slice(&std::fs::read(dir.join(first_request)).unwrap())
        .expect("a recorded request is JSON");
    let goal = asked["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let mut swaps = Vec::new();
    // The folder: the temporary directory the goal names (`…/.tmpXXXXXX`).
    if let Some(at) = goal.find("/.tmp") {
        let start = goal[..at].rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let end = goal[at + 1..]
            .find(|c: char| c == '/' || c.is_whitespace())
            .map_or(goal.len(), |i| at + 1 + i);
        swaps.push((
            goal[start..end].to_owned(),
            fixture.shared.display().to_string(),
        ));
    }
    // The site: `http://127.0.0.1:<port>`.
    if let Some(at) = goal.find("http://127.0.0.1:") {
        let rest = &goal[at + "http://".len()..];
        let end = rest
            .char_indices()
            .find(|(i, c)| *i > "127.0.0.1:".len() - 1 && !c.is_ascii_digit())
            .map_or(rest.len(), |(i, _)| i);
        swaps.push((
            rest[..end].to_owned(),
            fixture.site.trim_start_matches("http://").to_owned(),
        ));
    }
    names
        .into_iter()
        .filter(|n| n.ends_with(".sse") || n.ends_with(".json") && !n.ends_with(".request.json"))
        .map(|n| {
            let name: &'static str = Box::leak(format!("{CAPTURES}/{errand}/{n}").into_boxed_str());
            Reply::Rewritten(name, swaps.clone())
        })
        .collect()
}

/// The recorded errands, replayed: the whole runtime runs on what the 1.5B model
/// said, and each must come out as it did then, right.
#[tokio::test]
async fn recorded_errands_end_right() -> anyhow::Result<()> {
    let mut outcomes = Vec::new();
    for name in RECORDED {
        let errand = errands()
            .into_iter()
            .find(|e| e.name == *name)
            .expect("a recorded errand is an errand");
        let (_dir, fixture) = fixture().await?;
        let (stand_in, url) = StandIn::start(recorded(name, &fixture)).await;
        outcomes.push(run_errand(&fixture, &url, &errand).await?);
        // Each step named its tools: its model was offered those and tools.search,
        // not every tool on offer.
        for (_, body) in stand_in.requests() {
            let offered: Vec<&str> = body["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["function"]["name"].as_str())
                .collect();
            if offered.is_empty() {
                continue;
            }
            assert!(
                offered.contains(&"tools__search") && offered.len() <= 3,
                "{name}: a worker was offered {offered:?}"
            );
        }
    }
    print_table(&outcomes);
    for o in &outcomes {
        assert!(o.correct, "{}: {:?}", o.errand, o.why_wrong);
    }
    Ok(())
}

/// Told its step's check had not passed, the 1.5B model searched for tools and wrote the
/// same listing three times in one answer (recorded in `count-files`, whose gate the
/// model had made one no step could pass). Replayed: the answer makes two calls, the
/// search and the listing, and the listing runs once; the search widens what the step
/// is offered; and the run ends blocked, not done.
#[tokio::test]
async fn a_recorded_turn_that_searches_and_repeats_a_call() -> anyhow::Result<()> {
    let errand = errands()
        .into_iter()
        .find(|e| e.name == "count-files")
        .expect("count-files is an errand");
    let (_dir, fixture) = fixture().await?;
    let (stand_in, url) = StandIn::start(recorded(errand.name, &fixture)).await;
    let outcome = run_errand(&fixture, &url, &errand).await?;
    assert_eq!(outcome.status, "blocked", "{:?}", outcome.why_wrong);
    assert!(!outcome.done_but_wrong);
    let requests: Vec<Value> = stand_in.requests().into_iter().map(|(_, b)| b).collect();
    let offered = |body: &Value| -> Vec<String> {
        let mut names: Vec<String> = body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["function"]["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    let results = |body: &Value| -> Vec<(String, String)> {
        body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["role"] == "tool")
            .map(|m| {
                (
                    m["tool_call_id"].as_str().unwrap_or_default().to_owned(),
                    m["content"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    // The request after the answer that wrote four calls is the first to answer its
    // second call.
    let after = requests
        .iter()
        .position(|b| results(b).iter().any(|(id, _)| id == "l0-t2-c1"))
        .expect("the answer that wrote four calls was answered");
    let told = results(&requests[after]);
    let of = |id: &str| {
        told.iter()
            .find(|(i, _)| i == id)
            .map(|(_, text)| text.as_str())
            .unwrap_or_default()
    };
    assert!(
        of("l0-t2-c0").starts_with("tools that match \"read file\""),
        "{told:?}"
    );
    assert!(of("l0-t2-c1").contains("budget.txt"), "{told:?}");
    assert!(
        told.iter().all(|(id, _)| id != "l0-t2-c2"),
        "the repeats were made: {told:?}"
    );
    let made: Vec<&str> = requests[after]["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["tool_calls"].as_array())
        .flatten()
        .filter(|c| c["id"].as_str().is_some_and(|id| id.starts_with("l0-t2-")))
        .filter_map(|c| c["function"]["name"].as_str())
        .collect();
    assert_eq!(made, ["tools__search", "fs__list_directory"]);
    // Before the search the step had the tool it named, the search, and the write of the
    // scratch file its check looks for; after it, what the search found as well.
    assert_eq!(
        offered(&requests[after - 1]),
        ["files__write_file", "fs__list_directory", "tools__search"]
    );
    let widened = offered(&requests[after]);
    for found in ["files__read_file", "fs__read_text_file"] {
        assert!(widened.iter().any(|n| n == found), "{widened:?}");
    }
    Ok(())
}

/// Every errand against the model server of `DISPATCH_ERRANDS_MODEL_URL`
/// (`cargo xtask errands --model-url URL`).
#[tokio::test]
#[ignore = "needs a model server: cargo xtask errands --model-url URL"]
async fn errands_against_a_model() -> anyhow::Result<()> {
    let url = std::env::var("DISPATCH_ERRANDS_MODEL_URL").context(
        "DISPATCH_ERRANDS_MODEL_URL is not set: run cargo xtask errands --model-url URL",
    )?;
    let only: Vec<String> = std::env::var("DISPATCH_ERRANDS_ONLY")
        .map(|o| o.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let record = std::env::var_os("DISPATCH_ERRANDS_RECORD").map(PathBuf::from);
    let out = std::env::var_os("DISPATCH_ERRANDS_OUT")
        .map_or_else(|| PathBuf::from("errands.json"), PathBuf::from);
    let mut outcomes = Vec::new();
    for errand in errands() {
        if !only.is_empty() && !only.iter().any(|o| o == errand.name) {
            continue;
        }
        let (_dir, fixture) = fixture().await?;
        let model_url = match &record {
            Some(dir) => dispatch_tests::recorder(url.clone(), dir.join(errand.name)).await?,
            None => url.clone(),
        };
        eprintln!("errand {} …", errand.name);
        let outcome = run_errand(&fixture, &model_url, &errand).await?;
        eprintln!(
            "errand {}: {} ({})",
            errand.name,
            outcome.status,
            if outcome.correct { "right" } else { "WRONG" }
        );
        outcomes.push(outcome);
        std::fs::write(&out, serde_json::to_vec_pretty(&outcomes)?)?;
    }
    print_table(&outcomes);
    eprintln!("written to {}", out.display());
    Ok(())
}
