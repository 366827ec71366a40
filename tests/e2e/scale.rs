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
            &stack.nats,
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

/// With thousands of runs in the log, every listing still answers, page by page, and
/// no page outgrows a NATS message.
#[tokio::test]
async fn five_thousand_runs_are_listed_in_full_over_the_cli_and_http() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger", "ingress"]).await?;
    // 1,000-character goals: 5,000 runs are ~5 MB of views, five times a NATS message.
    let seeded = stack.seed_finished_runs(5000, "default", 1000).await?;
    let want: BTreeSet<String> = seeded.iter().map(ToString::to_string).collect();
    stack
        .eventually(Duration::from_secs(120), || async {
            let out = stack.cli(&["ps", "-a", "-q"]).ok()?;
            (out.stdout.lines().count() == 5000).then_some(())
        })
        .await?;

    let out = stack.cli(&["ps", "-a", "--format", "json"])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
    let ids: BTreeSet<String> = listed
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed.len(), 5000);
    assert_eq!(ids, want);

    // Over HTTP, following `Link: rel="next"` from page to page.
    let mut url = stack.url("/v1/runs?limit=1000");
    let (mut seen, mut pages) = (Vec::new(), 0);
    loop {
        let response = stack.http.get(&url).send().await?;
        assert_eq!(response.status(), 200);
        let link = response
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_owned());
        let page: serde_json::Value = response.json().await?;
        pages += 1;
        let runs = page["runs"].as_array().unwrap();
        assert!(!runs.is_empty() && runs.len() <= 1000);
        seen.extend(
            runs.iter()
                .map(|r| r["run_id"].as_str().unwrap().to_owned()),
        );
        match link {
            Some(link) => {
                let next = link
                    .strip_prefix('<')
                    .and_then(|l| l.split_once(">; rel=\"next\""))
                    .map(|(path, _)| path.to_owned())
                    .expect("a Link header to the next page");
                url = stack.url(&next);
            }
            None => break,
        }
    }
    assert!(
        pages > 5,
        "pages are cut by size, not only by count: {pages}"
    );
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, across pages");
    assert_eq!(seen.len(), 5000, "every run listed once");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), want);

    // Only finished runs: `ps` without -a lists nothing, and says why.
    let live = stack.cli(&["ps", "--format", "json"])?;
    assert_eq!(live.stdout.trim(), "[]");
    assert!(live.stderr.contains("dispatch ps -a"), "{}", live.stderr);
    Ok(())
}

/// Thousands of waiting notes are drained over several calls, concurrently, with none
/// lost and none handed out twice.
#[tokio::test]
async fn two_thousand_notes_drain_completely_and_once() -> anyhow::Result<()> {
    let stack = Stack::start(&["ledger", "ingress"]).await?;
    let seeded = stack.seed_finished_runs(2000, "busy", 500).await?;
    let want: BTreeSet<String> = seeded.iter().map(ToString::to_string).collect();
    // Each seeded run is three events; wait until the ledger has folded them all.
    stack
        .eventually(Duration::from_secs(120), || async {
            let status: Result<Result<serde_json::Value, serde_json::Value>, _> = stack
                .bus
                .request_json(
                    dispatch_bus::subject::query::status(),
                    &(),
                    Duration::from_secs(5),
                )
                .await;
            let status = status.ok()?.ok()?;
            (status["runs_cursor"].as_u64()? >= 6000).then_some(())
        })
        .await?;

    // Three clients drain at once; each keeps asking while more notes wait.
    let drainer = |n: usize| {
        let http = stack.http.clone();
        let url = stack.url("/v1/tasks?conversation=busy&limit=1");
        async move {
            let mut got = Vec::new();
            let mut calls = 0;
            loop {
                let reply: serde_json::Value = http
                    .get(format!("{url}&drain_id=d{n}-{calls}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                calls += 1;
                let notes = reply["feedback"].as_array().expect("feedback").clone();
                got.extend(
                    notes
                        .iter()
                        .map(|n| n["run_id"].as_str().unwrap().to_owned()),
                );
                if !reply["more_feedback"].as_bool().unwrap_or(false) {
                    return anyhow::Ok((got, calls));
                }
            }
        }
    };
    let results = futures::future::join_all((0..3).map(drainer)).await;
    let mut all = Vec::new();
    let mut calls = 0;
    for result in results {
        let (got, n) = result?;
        all.extend(got);
        calls += n;
    }
    assert!(
        calls > 3,
        "one call cannot carry 2,000 notes: {calls} calls"
    );
    assert_eq!(all.len(), 2000, "{} notes handed out", all.len());
    assert_eq!(
        all.iter().cloned().collect::<BTreeSet<_>>(),
        want,
        "none lost, none twice"
    );

    // A retried drain (the answer was lost) gets the same notes again, not new ones.
    let again: serde_json::Value = stack
        .get_json("/v1/tasks?conversation=busy&limit=1&drain_id=d0-0")
        .await?;
    assert!(!again["feedback"].as_array().unwrap().is_empty());
    let after: serde_json::Value = stack
        .get_json("/v1/tasks?conversation=busy&limit=1&drain_id=fresh")
        .await?;
    assert!(after["feedback"].as_array().unwrap().is_empty());
    Ok(())
}

/// Runs older than TASKS.org's window go to one archive file per day, written once,
/// rewritten when one of its runs is removed, and rebuilt byte for byte.
#[tokio::test]
async fn older_runs_are_archived_by_day_and_rebuilt_byte_for_byte() -> anyhow::Result<()> {
    let mut stack = Stack::start(&["ledger"]).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    const DAY: u64 = 24 * 3600 * 1000;
    let three_days_ago: Vec<_> = (0..30)
        .map(|i| dispatch_tests::run_id_at(now - 3 * DAY + i))
        .collect();
    let two_days_ago: Vec<_> = (0..20)
        .map(|i| dispatch_tests::run_id_at(now - 2 * DAY + i))
        .collect();
    stack
        .seed_finished_runs_with_ids(&three_days_ago, "default", 10)
        .await?;
    stack
        .seed_finished_runs_with_ids(&two_days_ago, "default", 10)
        .await?;
    // Today's runs fill TASKS.org's window (500) and then some.
    stack.seed_finished_runs(520, "default", 10).await?;

    let day = |id: &dispatch_bus::RunId| dispatch_ledger::render::day_of_run(&id.to_string());
    let (old, older) = (
        day(&two_days_ago[0]).unwrap(),
        day(&three_days_ago[0]).unwrap(),
    );
    let root = stack.root().to_path_buf();
    let archive = |d: &str| root.join(format!("archive/{d}.org"));
    let entries = |text: &str| text.matches("\n* DONE ").count();
    let read_both = || async {
        let a = std::fs::read_to_string(archive(&older)).ok()?;
        let b = std::fs::read_to_string(archive(&old)).ok()?;
        let tasks = std::fs::read_to_string(root.join("TASKS.org")).ok()?;
        Some((a, b, tasks))
    };
    let (a, _, tasks) = stack
        .eventually(Duration::from_secs(120), || async {
            let (a, b, tasks) = read_both().await?;
            (entries(&a) == 30 && entries(&b) == 20 && entries(&tasks) == 500)
                .then_some((a, b, tasks))
        })
        .await?;
    assert!(a.starts_with(&format!(
        "#+TITLE: Dispatch — tasks of {older} (UTC), archived\n"
    )));
    for id in &three_days_ago {
        assert!(
            a.contains(&format!(":ID: {id}\n")),
            "{id} is not in {older}'s archive"
        );
        assert!(!tasks.contains(&id.to_string()));
    }
    // Newest first, as in TASKS.org.
    let first = a.find(&three_days_ago[29].to_string()).unwrap();
    let last = a.find(&three_days_ago[0].to_string()).unwrap();
    assert!(first < last);
    let days: Vec<_> = std::fs::read_dir(stack.root().join("archive"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(days.len(), 2, "{days:?}: today is still TASKS.org's");

    // Removing an archived run rewrites its day's file without it.
    let gone = two_days_ago[5];
    let out = stack.cli(&["rm", &gone.to_string()])?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let b = stack
        .eventually(Duration::from_secs(60), || async {
            let text = std::fs::read_to_string(archive(&old)).ok()?;
            (entries(&text) == 19).then_some(text)
        })
        .await?;
    assert!(!b.contains(&gone.to_string()));

    // A rebuild from the log writes the same bytes.
    stack.stop("ledger").await?;
    std::fs::remove_dir_all(stack.root().join(".dispatch/state/ledger"))?;
    std::fs::remove_dir_all(stack.root().join("archive"))?;
    std::fs::remove_file(stack.root().join("TASKS.org"))?;
    stack.add("ledger").await?;
    let (a2, b2, tasks2) = stack
        .eventually(Duration::from_secs(120), || async {
            let (a, b, tasks) = read_both().await?;
            (entries(&a) == 30 && entries(&b) == 19 && entries(&tasks) == 500)
                .then_some((a, b, tasks))
        })
        .await?;
    assert_eq!(a2, a);
    assert_eq!(b2, b);
    assert_eq!(tasks2, tasks);
    Ok(())
}
