//! The scheduler: cron schedules fired exactly once across copies, missed fires after a
//! SIGKILL under `skip` and `all`, schedules that outlive every process and NATS, and
//! bad expressions refused without a trace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dispatch_bus::Bus;
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_tests::Stack;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
const EVERY_TWO: &str = "*/2 * * * * * *";

/// Every goal the schedules stored, by fire time (its run id's time), with how many
/// were stored for that time.
async fn fired(bus: &Bus) -> Result<BTreeMap<i64, Vec<SubmitGoal>>> {
    let mut by_time: BTreeMap<i64, Vec<SubmitGoal>> = BTreeMap::new();
    for goal in dispatch_tests::stored_goals(bus).await? {
        if goal.origin == "schedule" {
            let id = uuid::Uuid::parse_str(&goal.run_id)?;
            let (secs, nanos) = id.get_timestamp().context("a v7 id")?.to_unix();
            let ms = secs as i64 * 1000 + i64::from(nanos / 1_000_000);
            by_time.entry(ms).or_default().push(goal);
        }
    }
    Ok(by_time)
}

fn add(stack: &Stack, args: &[&str]) -> Result<String> {
    let mut all = vec!["schedule", "add", "-q"];
    all.extend_from_slice(args);
    let out = stack.cli(&all)?;
    anyhow::ensure!(out.code == Some(0), "schedule add: {}", out.stderr);
    Ok(out.stdout.trim().to_owned())
}

fn listed(stack: &Stack) -> Result<Vec<Value>> {
    let out = stack.cli(&["schedule", "ls", "--format", "json"])?;
    anyhow::ensure!(out.code == Some(0), "schedule ls: {}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

fn schedule(stack: &Stack, id: &str) -> Result<Value> {
    listed(stack)?
        .into_iter()
        .find(|s| s["schedule_id"] == id)
        .context("the schedule is listed")
}

/// The fire times of the goal `goal` (each schedule here has its own).
async fn times_of(stack: &Stack, goal: &str) -> Result<Vec<i64>> {
    let fires = fired(&stack.bus).await?;
    Ok(fires
        .iter()
        .filter_map(|(t, goals)| {
            let of_goal = goals.iter().filter(|g| g.goal == goal).count();
            assert!(of_goal <= 1, "one goal per fire time: {goals:?}");
            (of_goal == 1).then_some(*t)
        })
        .collect())
}

#[tokio::test]
async fn a_two_second_schedule_fires_once_per_time_across_three_copies() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    for service in ["scheduler", "scheduler", "scheduler", "dispatcher"] {
        stack.add(service).await?;
    }
    let id = add(
        &stack,
        &[
            EVERY_TWO,
            "Quick errand",
            "--overlap",
            "allow",
            "--payload",
            r#"{"n": 1}"#,
        ],
    )?;
    let began = Instant::now();
    let times = stack
        .eventually(LIMIT, || async {
            let times = times_of(&stack, "Quick errand").await.ok()?;
            (times.len() >= 3).then_some(times)
        })
        .await?;
    let took = began.elapsed();
    let first_three = &times[..3];
    assert!(
        first_three.windows(2).all(|w| w[1] - w[0] == 2000),
        "fires two seconds apart: {first_three:?}"
    );
    assert!(first_three.iter().all(|t| t % 2000 == 0));
    assert!(took < Duration::from_secs(9), "three fires took {took:?}");
    eprintln!("three fires in {took:?}");

    // Removing it stops it; every fire started one run, and the runs ran.
    let out = stack.cli(&["schedule", "rm", &id])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let fires = fired(&stack.bus).await?;
    let runs: Vec<String> = fires.values().flatten().map(|g| g.run_id.clone()).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fired(&stack.bus).await?.len(),
        fires.len(),
        "no fire after rm"
    );
    for run in &runs {
        let events = stack.wait_finished(run.parse()?, LIMIT).await?;
        let requested = events
            .iter()
            .find_map(|e| match &e.event.body {
                Some(dispatch_proto::run::v1::run_event::Body::RunRequested(r)) => Some(r),
                _ => None,
            })
            .context("requested")?;
        assert_eq!(
            (requested.origin.as_str(), requested.payload.as_str()),
            ("schedule", r#"{"n": 1}"#)
        );
    }
    // One run per fire, each recorded with its origin, which `ps` filters on.
    let ps = stack.cli(&[
        "ps",
        "-a",
        "--filter",
        "origin=schedule",
        "--format",
        "json",
    ])?;
    assert_eq!(ps.code, Some(0), "{}", ps.stderr);
    let ps: Vec<Value> = serde_json::from_str(&ps.stdout)?;
    assert_eq!(ps.len(), runs.len(), "{ps:?}");
    assert!(
        ps.iter()
            .all(|r| r["origin"] == "schedule" && r["status"] == "done")
    );
    let other = stack.cli(&["ps", "-a", "--filter", "origin=cli", "--format", "json"])?;
    assert_eq!(other.stdout.trim(), "[]");
    let bad = stack.cli(&["ps", "--filter", "colour=red"])?;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("origin=VALUE"), "{}", bad.stderr);
    assert!(listed(&stack)?.is_empty());
    Ok(())
}

#[tokio::test]
async fn fires_missed_while_the_scheduler_was_killed_follow_skip_and_all() -> Result<()> {
    let mut stack = Stack::start(&["scheduler"]).await?;
    // No dispatcher: runs stay queued, so fires overlap (`allow` keeps them coming).
    let skip = add(
        &stack,
        &[
            EVERY_TWO,
            "Skip errand",
            "--missed",
            "skip",
            "--overlap",
            "allow",
        ],
    )?;
    let all = add(
        &stack,
        &[
            EVERY_TWO,
            "All errand",
            "--missed",
            "all",
            "--overlap",
            "allow",
        ],
    )?;
    stack
        .eventually(LIMIT, || async {
            let a = times_of(&stack, "Skip errand").await.ok()?;
            let b = times_of(&stack, "All errand").await.ok()?;
            (!a.is_empty() && !b.is_empty()).then_some(())
        })
        .await?;
    stack.service("scheduler")?.kill().await?;
    stack.services.retain(|s| s.name != "scheduler");
    let before_skip = times_of(&stack, "Skip errand").await?;
    let before_all = times_of(&stack, "All errand").await?;
    // At least three fire times pass with no scheduler.
    tokio::time::sleep(Duration::from_millis(7500)).await;
    stack.add("scheduler").await?;
    // Wait until both have caught up and fired once more on their own.
    let (after_skip, after_all) = stack
        .eventually(LIMIT, || async {
            let a = times_of(&stack, "Skip errand").await.ok()?;
            let b = times_of(&stack, "All errand").await.ok()?;
            let now = chrono_ms();
            let caught_up = |times: &[i64]| times.last().is_some_and(|t| now - t < 1500);
            (caught_up(&a) && caught_up(&b) && b.len() >= before_all.len() + 4).then_some((a, b))
        })
        .await?;
    // `all`: every time from the first on, none missing, none twice.
    assert!(
        after_all.windows(2).all(|w| w[1] - w[0] == 2000),
        "`all` fires every missed time: {after_all:?}"
    );
    // `skip`: one fire for the whole gap, then on schedule again.
    let gap_start = *before_skip.last().unwrap();
    let in_gap: Vec<i64> = after_skip
        .iter()
        .copied()
        .filter(|t| *t > gap_start)
        .collect();
    let first_gap = in_gap.windows(2).next().map(|w| w[1] - w[0]);
    assert!(
        in_gap[0] - gap_start >= 6000,
        "`skip` starts no run for the older missed times: {after_skip:?}"
    );
    assert_eq!(first_gap.unwrap_or(2000), 2000, "{after_skip:?}");
    let skipped = schedule(&stack, &skip)?;
    let missed = (in_gap[0] - gap_start) / 2000 - 1;
    assert_eq!(
        skipped["skipped"].as_u64(),
        Some(missed as u64),
        "{skipped}"
    );
    let counted = schedule(&stack, &all)?;
    assert_eq!(counted["skipped"].as_u64(), Some(0));
    assert_eq!(
        counted["fires"].as_u64().unwrap() as usize,
        times_of(&stack, "All errand").await?.len()
    );
    Ok(())
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_schedule_survives_every_process_and_nats_and_bad_ones_change_nothing() -> Result<()> {
    let mut stack = Stack::start(&["scheduler"]).await?;
    // New Year in Lisbon, in the 5-field form.
    let id = add(
        &stack,
        &["0 0 1 1 *", "Happy new year", "--tz", "Europe/Lisbon"],
    )?;
    let before = schedule(&stack, &id)?;
    let next = before["next_fire_at_ms"].as_i64().unwrap();
    assert!(next > chrono_ms());
    assert_eq!(before["time_zone"], "Europe/Lisbon");
    assert_eq!(before["missed"], "skip");

    stack.service("scheduler")?.kill().await?;
    stack.services.retain(|s| s.name != "scheduler");
    stack.nats.restart().await?;
    stack.add("scheduler").await?;
    let after = stack
        .eventually(LIMIT, || async { schedule(&stack, &id).ok() })
        .await?;
    assert_eq!(
        after, before,
        "the schedule and its next fire are as they were"
    );

    // Bad input: a precise reason, and nothing stored.
    for (args, said) in [
        (vec!["61 * * * *", "x"], "not a cron expression"),
        (vec!["* * *", "x"], "has 3 fields"),
        (
            vec!["0 9 * * *", "x", "--tz", "Mars/Olympus"],
            "not an IANA time zone",
        ),
        (vec!["0 9 * * *", "   "], "invalid_goal"),
        (vec!["0 0 0 1 1 * 2020", "x"], "no fire time after now"),
    ] {
        let mut all = vec!["schedule", "add"];
        all.extend_from_slice(&args);
        let out = stack.cli(&all)?;
        assert_ne!(out.code, Some(0), "{args:?} was accepted");
        assert!(
            out.stderr.contains(said) && out.stderr.contains("nothing changed"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(listed(&stack)?.len(), 1);

    // Paused, it is not due; resumed, it is again.
    let short = dispatch_bus::short_id(&id).to_owned();
    let out = stack.cli(&["schedule", "pause", &short])?;
    assert_eq!(
        (out.code, out.stdout.trim()),
        (Some(0), id.as_str()),
        "{}",
        out.stderr
    );
    assert_eq!(schedule(&stack, &id)?["paused"], true);
    let out = stack.cli(&["schedule", "resume", &id[..10]])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(schedule(&stack, &id)?["paused"], false);
    let table = stack.cli(&["schedule", "ls"])?;
    assert!(table.stdout.contains("Happy new year"), "{}", table.stdout);
    let unknown = stack.cli(&["schedule", "rm", "no-such"])?;
    assert_ne!(unknown.code, Some(0));
    assert!(
        unknown.stderr.contains("no schedule matches"),
        "{}",
        unknown.stderr
    );
    Ok(())
}

#[tokio::test]
async fn schedules_are_managed_over_http_too() -> Result<()> {
    let stack = Stack::start(&["scheduler", "ingress"]).await?;
    let post = |body: &'static str| {
        let request = stack
            .http
            .post(stack.url("/v1/schedules"))
            .header("content-type", "application/json")
            .body(body);
        async move { request.send().await }
    };
    let created = post(r#"{"expression": "0 30 9 * * MON-FRI", "time_zone": "Asia/Tokyo", "goal": "Morning digest", "overlap": "queue"}"#).await?;
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str()?.to_owned();
    let schedule: Value = created.json().await?;
    let id = schedule["schedule_id"]
        .as_str()
        .context("an id")?
        .to_owned();
    assert_eq!(location, format!("/v1/schedules/{id}"));
    assert_eq!(schedule["overlap"], "queue");
    assert_eq!(
        schedule["missed"], "skip",
        "unspecified is stored as what it means"
    );
    assert!(
        schedule["created_by"]
            .as_str()
            .unwrap()
            .starts_with("http:")
    );
    assert!(schedule["next_fire_at_ms"].as_i64().unwrap() > chrono_ms());

    for (body, code) in [
        (
            r#"{"expression": "0 99 * * *", "goal": "x"}"#,
            "bad_request",
        ),
        (
            r#"{"expression": "0 9 * * *", "goal": "x", "tz": "UTC"}"#,
            "invalid_schedule",
        ),
        (
            r#"{"expression": "0 9 * * *", "goal": "x", "overlap": "sometimes"}"#,
            "invalid_schedule",
        ),
        ("[", "invalid_schedule"),
    ] {
        let refused = post(body).await?;
        assert_eq!(refused.status(), 400, "{body}");
        let problem: Value = refused.json().await?;
        assert_eq!(problem["code"], code, "{body}: {problem}");
    }

    let listed: Value = stack.get_json("/v1/schedules").await?;
    assert_eq!(listed["schedules"].as_array().map(Vec::len), Some(1));
    let one: Value = stack.get_json(&location).await?;
    assert_eq!(one, schedule);
    let paused: Value = stack
        .http
        .post(stack.url(&format!("{location}/pause")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(paused["paused"], true);
    let removed = stack.http.delete(stack.url(&location)).send().await?;
    assert_eq!(removed.status(), 200);
    let gone = stack.http.get(stack.url(&location)).send().await?;
    assert_eq!(gone.status(), 404);
    Ok(())
}

/// A run that sleeps 3 s, on a schedule that fires every second.
const SLOW: &str =
    "#+TITLE: Slow\n* TODO Sleep\n  - call: test.sleep {\"ms\": 3000}\n  :done-when: true\n";

#[tokio::test]
async fn a_fire_while_the_last_run_goes_is_skipped_or_queued() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("scheduler").await?;
    stack.add("dispatcher").await?;
    let skip_goal = format!("{SLOW}  (skip)");
    let queue_goal = format!("{SLOW}  (queue)");
    let skip = add(&stack, &["* * * * * * *", &skip_goal, "--overlap", "skip"])?;
    let queue = add(
        &stack,
        &["* * * * * * *", &queue_goal, "--overlap", "queue"],
    )?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    stack.cli(&["schedule", "pause", &skip])?;
    stack.cli(&["schedule", "pause", &queue])?;
    for (id, goal) in [(&skip, &skip_goal), (&queue, &queue_goal)] {
        let fires = fired(&stack.bus).await?;
        let runs: Vec<(i64, String)> = fires
            .iter()
            .flat_map(|(t, goals)| goals.iter().map(move |g| (*t, g.clone())))
            .filter(|(_, g)| &g.goal == goal)
            .map(|(t, g)| (t, g.run_id))
            .collect();
        assert!(runs.len() >= 2, "{goal}: {runs:?}");
        // No run started while the one before it still went.
        let mut ended_at = Vec::new();
        for (_, run) in &runs {
            let events = stack.wait_finished(run.parse()?, LIMIT).await?;
            let started = events
                .iter()
                .find(|e| {
                    matches!(
                        e.event.body,
                        Some(dispatch_proto::run::v1::run_event::Body::RunStarted(_))
                    )
                })
                .map(|e| e.event.time_unix_ms)
                .context("started")?;
            let ended = events.last().context("ended")?.event.time_unix_ms;
            ended_at.push((started, ended));
        }
        for pair in ended_at.windows(2) {
            assert!(pair[1].0 >= pair[0].1, "{goal}: runs overlap: {ended_at:?}");
        }
        let schedule = schedule(&stack, id)?;
        if id == &skip {
            assert!(schedule["skipped"].as_u64().unwrap() >= 2, "{schedule}");
        } else {
            // A queued fire starts its run when the previous one ends, not at its time.
            let waited = runs
                .iter()
                .zip(&ended_at)
                .skip(1)
                .any(|((fired_at, _), (started, _))| started - fired_at > 1000);
            assert!(
                waited,
                "a queued fire waited for the run before: {runs:?} {ended_at:?}"
            );
        }
    }
    Ok(())
}

fn todos(stack: &Stack) -> Result<Vec<Value>> {
    let out = stack.cli(&["todo", "ls", "--format", "json"])?;
    anyhow::ensure!(out.code == Some(0), "todo ls: {}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

#[tokio::test]
async fn a_todo_becomes_a_run_when_due_and_follows_it() -> Result<()> {
    let mut stack = Stack::with_test_tools().await?;
    stack.add("scheduler").await?;
    stack.add("dispatcher").await?;
    let added = Instant::now();
    let out = stack.cli(&["todo", "add", "Quick errand", "--due", "4s"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let later = out.stdout.trim().to_owned();
    let out = stack.cli(&["todo", "add", "Quick errand"])?;
    let now = out.stdout.trim().to_owned();

    // Not due yet: pending, no run. The one without a due time runs at once.
    let listed = todos(&stack)?;
    let state = |listed: &[Value], id: &str| {
        listed
            .iter()
            .find(|t| t["todo_id"] == id)
            .map(|t| t["state"].as_str().unwrap_or_default().to_owned())
    };
    if added.elapsed() < Duration::from_secs(3) {
        assert_eq!(state(&listed, &later).as_deref(), Some("pending"));
    }
    stack
        .eventually(LIMIT, || async {
            let listed = todos(&stack).ok()?;
            (state(&listed, &now)? == "done").then_some(())
        })
        .await?;
    stack
        .eventually(LIMIT, || async {
            let listed = todos(&stack).ok()?;
            (state(&listed, &later)? == "done").then_some(())
        })
        .await?;
    assert!(
        added.elapsed() >= Duration::from_secs(4),
        "it waited until due"
    );
    let ps = stack.cli(&["ps", "-a", "--filter", "origin=todo", "--format", "json"])?;
    let ps: Vec<Value> = serde_json::from_str(&ps.stdout)?;
    assert_eq!(ps.len(), 2, "one run per todo, origin todo: {ps:?}");

    // Checked off, it leaves the list; a schedule is not a todo.
    let out = stack.cli(&["todo", "done", dispatch_bus::short_id(&later)])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(state(&todos(&stack)?, &later).is_none());
    let schedule = add(&stack, &["0 0 1 1 *", "Yearly"])?;
    let refused = stack.cli(&["todo", "done", &schedule])?;
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("not a todo"), "{}", refused.stderr);
    let bad = stack.cli(&["todo", "add", "x", "--due", "soonish"])?;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("--due"), "{}", bad.stderr);
    Ok(())
}
