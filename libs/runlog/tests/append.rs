//! The run log against a real nats-server: races, dedupe, chain checks.

use dispatch_bus::RunId;
use dispatch_bus::subject::LogWriter;
use dispatch_proto::run::v1::{LeafStarted, RunRequested, WriterRole, run_event::Body};
use dispatch_runlog::{ErrorKind, RunLog};
use dispatch_testkit::NatsServer;

fn leaf(n: u32) -> Body {
    Body::LeafStarted(LeafStarted {
        leaf: n,
        title: format!("leaf {n}"),
    })
}

/// The first event of every run.
fn requested() -> Body {
    Body::RunRequested(RunRequested {
        goal: "a goal".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn racing_writers_get_exactly_one_append_per_sequence() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let run_id = RunId::new();
    let mut writers = Vec::new();
    for name in ["writer-a", "writer-b", "writer-c"] {
        // Separate connections, as separate processes would have.
        let log = RunLog::open(&nats.bus().await?, name)
            .await?
            .writing_as(LogWriter::Dispatcher);
        writers.push(log);
    }

    writers[0]
        .handle(run_id)
        .await?
        .append(requested(), "")
        .await?;
    let mut tasks = Vec::new();
    for (w, log) in writers.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut handle = log.handle(run_id).await?;
            let (mut won, mut lost) = (0u32, 0u32);
            while won < 20 {
                match handle.append(leaf(w as u32 * 100 + won), "race").await {
                    Ok(_) => won += 1,
                    Err(e) if e.kind() == ErrorKind::Conflict => lost += 1,
                    Err(e) => return Err(anyhow::anyhow!(e)),
                }
            }
            anyhow::Ok((won, lost))
        }));
    }
    let mut total_lost = 0;
    for task in tasks {
        let (won, lost) = task.await??;
        assert_eq!(won, 20);
        total_lost += lost;
    }
    assert!(
        total_lost > 0,
        "three writers on one subject never collided"
    );

    let log = RunLog::open(&nats.bus().await?, "reader")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let events = log.read(&run_id).await?; // verifies the chain: no gap, no fork
    assert_eq!(events.len(), 61);
    for (i, stored) in events.iter().enumerate() {
        assert_eq!(stored.event.seq, i as u64 + 1);
    }
    let mut ids: Vec<_> = events.iter().map(|e| e.event.event_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 61, "an event was stored twice");
    Ok(())
}

#[tokio::test]
async fn republishing_an_event_id_stores_it_once() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let run_id = RunId::new();
    // A writer that read the (empty) log before the append, then retries the same event.
    let mut stale = log.handle(run_id).await?;
    let mut first = log.handle(run_id).await?;
    first
        .append_with_id("fixed-id".into(), requested(), "c")
        .await?;
    let again = stale
        .append_with_id("fixed-id".into(), requested(), "c")
        .await?;
    assert_eq!(again.event.seq, 1);
    assert_eq!(stale.events().len(), 1);

    // Raw republish of the same bytes with the same Nats-Msg-Id is dropped by the server.
    let stored = log.read(&run_id).await?;
    let raw = prost::Message::encode_to_vec(&stored[0].event);
    let ack = log
        .bus()
        .append(
            dispatch_bus::subject::run(&run_id, LogWriter::Dispatcher),
            "fixed-id",
            None,
            raw.into(),
        )
        .await?;
    assert!(ack.duplicate);
    assert_eq!(log.read(&run_id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn nothing_follows_the_terminal_event() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let mut handle = log.handle(RunId::new()).await?;
    handle.append(requested(), "").await?;
    handle
        .append(
            Body::RunFinished(dispatch_proto::run::v1::RunFinished {
                status: dispatch_proto::run::v1::RunStatus::Done as i32,
                reason: "workflow finished".into(),
                ..Default::default()
            }),
            "",
        )
        .await?;
    let err = handle.append(leaf(1), "").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Finished);
    Ok(())
}

#[tokio::test]
async fn the_log_survives_a_nats_server_restart_on_its_store() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let run_id = RunId::new();
    {
        let log = RunLog::open(&nats.bus().await?, "writer")
            .await?
            .writing_as(LogWriter::Dispatcher);
        let mut handle = log.handle(run_id).await?;
        handle.append(requested(), "").await?;
        handle.append(leaf(1), "").await?;
    }
    let url = nats.url();
    nats.restart().await?;
    assert_eq!(
        nats.url(),
        url,
        "a restart keeps the port, so clients reconnect"
    );
    let log = RunLog::open(&nats.bus().await?, "reader")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let events = log.read(&run_id).await?;
    assert_eq!(events.len(), 2);
    Ok(())
}

/// Appends `n` events to `run_id` with each one's pointer to its predecessor left
/// out, as a log written before pointers existed reads.
async fn append_without_pointers(log: &RunLog, run_id: &RunId, n: u32) -> anyhow::Result<()> {
    let mut prev = (dispatch_runlog::chain::GENESIS.to_vec(), 0u64);
    for i in 0..n {
        let mut event = dispatch_proto::run::v1::RunEvent {
            event_id: RunId::new().to_string(),
            run_id: run_id.to_string(),
            seq: u64::from(i) + 1,
            prev_hash: prev.0.clone(),
            role: WriterRole::Dispatcher as i32,
            body: Some(if i == 0 { requested() } else { leaf(i) }),
            ..Default::default()
        };
        event.hash = dispatch_runlog::chain::hash(&event).to_vec();
        let ack = log
            .bus()
            .append(
                dispatch_bus::subject::run(run_id, LogWriter::Dispatcher),
                &event.event_id,
                Some(prev.1),
                prost::Message::encode_to_vec(&event).into(),
            )
            .await?;
        prev = (event.hash, ack.stream_seq);
    }
    Ok(())
}

#[tokio::test]
async fn a_log_is_read_back_along_its_pointers_between_other_runs_events() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let (ours, other) = (RunId::new(), RunId::new());
    let mut mine = log.handle(ours).await?;
    let mut theirs = log.handle(other).await?;
    for n in 0..5 {
        mine.append(if n == 0 { requested() } else { leaf(n) }, "")
            .await?;
        theirs
            .append(if n == 0 { requested() } else { leaf(n) }, "")
            .await?;
        theirs.append(leaf(n + 100), "").await?;
    }
    let events = log.read(&ours).await?;
    assert_eq!(events.len(), 5);
    for pair in events.windows(2) {
        assert_eq!(pair[1].event.prev_stream_seq, pair[0].stream_seq);
        assert_eq!(pair[1].event.seq, pair[0].event.seq + 1);
    }
    assert_eq!(events[0].event.prev_stream_seq, 0);
    // Reading on from the middle returns exactly what came after.
    let rest = log.read_after(&ours, events[2].stream_seq).await?;
    assert_eq!(rest, events[3..].to_vec());
    assert!(
        log.read_after(&ours, events[4].stream_seq)
            .await?
            .is_empty()
    );
    let audited = log.read_every(&ours).await?;
    assert_eq!(audited.events, events);
    assert_eq!(audited.after_seal, None);
    Ok(())
}

#[tokio::test]
async fn a_log_without_pointers_is_read_by_scanning() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let run_id = RunId::new();
    append_without_pointers(&log, &run_id, 4).await?;
    let events = log.read(&run_id).await?;
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e.event.prev_stream_seq == 0));
    // A handle appends after it, pointer and all.
    let mut handle = log.handle(run_id).await?;
    handle.append(leaf(9), "").await?;
    assert_eq!(log.read(&run_id).await?.len(), 5);
    Ok(())
}

#[tokio::test]
async fn a_message_off_the_chain_makes_the_audit_read_corrupt() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    for n in 1..3 {
        handle.append(leaf(n), "").await?;
    }
    let events = log.read(&run_id).await?;
    // A forger with write access appends a second seq 3 after the first, without the
    // concurrency check: a fork whose pointers skip the real seq 3.
    let mut fork = events[2].event.clone();
    fork.event_id = RunId::new().to_string();
    fork.body = Some(leaf(66));
    fork.hash = Vec::new();
    fork.hash = dispatch_runlog::chain::hash(&fork).to_vec();
    log.bus()
        .append(
            dispatch_bus::subject::run(&run_id, LogWriter::Dispatcher),
            &fork.event_id,
            None,
            prost::Message::encode_to_vec(&fork).into(),
        )
        .await?;
    // The walk from the last message sees a consistent chain without the real seq 3;
    // the audit read counts the subject's messages, scans, and finds the fork.
    assert_eq!(log.read(&run_id).await?.len(), 3);
    let err = log.read_every(&run_id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    Ok(())
}

#[tokio::test]
async fn the_feed_carries_each_stored_event_with_its_sequences() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let nats = NatsServer::start().await?;
    let bus = nats.bus().await?;
    let log = RunLog::open(&bus, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let run_id = RunId::new();
    let mut feed = bus
        .client()
        .subscribe(dispatch_bus::subject::feed(&run_id))
        .await?;
    bus.client().flush().await?;
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    handle.append(leaf(1), "").await?;
    // A refused append (a stale expectation) is never on the feed.
    let refused = log
        .bus()
        .append_over(
            dispatch_bus::subject::run(&run_id, LogWriter::Dispatcher),
            "stale",
            0,
            &dispatch_bus::subject::run_log(&run_id),
            prost::Message::encode_to_vec(&handle.events()[0].event).into(),
        )
        .await;
    assert!(refused.is_err());
    for stored in handle.events().to_vec() {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), feed.next())
            .await?
            .expect("feed open");
        assert_eq!(
            message.subject.as_str(),
            format!("dispatch.feed.default.{run_id}")
        );
        let headers = message.headers.expect("feed headers");
        let header = |name: &str| headers.get_last(name).map(|v| v.as_str().to_owned());
        assert_eq!(header("Nats-Sequence"), Some(stored.stream_seq.to_string()));
        // Whose subject it was stored on: the writer's role, said by the server.
        assert_eq!(
            header("Nats-Subject"),
            Some(format!("dispatch.run.default.{run_id}.dispatcher"))
        );
        assert_eq!(
            message.payload.as_ref(),
            prost::Message::encode_to_vec(&stored.event)
        );
    }
    let nothing_more =
        tokio::time::timeout(std::time::Duration::from_millis(300), feed.next()).await;
    assert!(nothing_more.is_err(), "a refused append reached the feed");

    // A follower takes the events from the feed.
    let mut follower = log.handle(run_id).await?;
    let mut writer = log.handle(run_id).await?;
    let wait = tokio::spawn(async move {
        let n = follower
            .wait_for_more(std::time::Duration::from_secs(5))
            .await?;
        anyhow::Ok((n, follower.events().len()))
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    writer.append(leaf(2), "").await?;
    let (n, len) = wait.await??;
    assert_eq!((n, len), (1, 3));
    Ok(())
}

#[tokio::test]
async fn a_handle_opened_at_a_position_reads_from_there_and_appends_on() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let (ours, other) = (RunId::new(), RunId::new());
    let mut mine = log.handle(ours).await?;
    let mut theirs = log.handle(other).await?;
    for n in 0..4 {
        let body = || if n == 0 { requested() } else { leaf(n) };
        mine.append(body(), "").await?;
        theirs.append(body(), "").await?;
    }
    let whole = log.read(&ours).await?;
    let is_leaf = |n: u32| move |b: &Body| matches!(b, Body::LeafStarted(l) if l.leaf == n);

    // At the event the anchor names: that event and everything after it.
    let mut at = log.handle_at(ours, whole[2].stream_seq, is_leaf(2)).await?;
    assert_eq!(at.events(), &whole[2..]);
    // It appends on the chain as a whole handle would.
    at.append(leaf(4), "").await?;
    let after = log.read(&ours).await?;
    assert_eq!(after.len(), 5);
    assert_eq!(after[4].event.prev_stream_seq, whole[3].stream_seq);

    // Anything it cannot trust as the start opens the whole log instead: no position,
    // another run's event, an event the anchor does not accept, a sequence past the end.
    let theirs_seq = log.read(&other).await?[1].stream_seq;
    for (from, anchor) in [
        (0, is_leaf(2)),
        (theirs_seq, is_leaf(1)),
        (whole[1].stream_seq, is_leaf(2)),
        (u64::MAX, is_leaf(2)),
    ] {
        let handle = log.handle_at(ours, from, anchor).await?;
        assert_eq!(handle.events(), &after[..], "opened at {from}");
    }
    Ok(())
}

#[tokio::test]
async fn a_handle_opened_at_a_position_refuses_a_broken_chain_and_finishes_from_the_whole_log()
-> anyhow::Result<()> {
    use dispatch_proto::run::v1::RunStatus;
    let nats = NatsServer::start().await?;
    let keys = tempfile::tempdir()?;
    let sealer = dispatch_runlog::seal::Sealer::load_or_create(&keys.path().join("seal"))?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher)
        .with_sealer(sealer);
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    let request = Body::RunRequested(RunRequested {
        goal: "the goal".into(),
        conversation_id: "conv".into(),
        ..Default::default()
    });
    handle.append(request, "").await?;
    handle.append(leaf(0), "").await?;
    let from = handle.events()[1].stream_seq;

    // Finishing through a handle that never saw the request still notes the goal.
    let mut partial = log.handle_at(run_id, from, |_| true).await?;
    assert_eq!(partial.events().len(), 1);
    partial
        .finish(RunStatus::Done, "all done", "all done", "")
        .await?;
    let events = log.read(&run_id).await?;
    let note = events.iter().find_map(|e| match &e.event.body {
        Some(Body::FeedbackQueued(note)) => Some(note.clone()),
        _ => None,
    });
    let note = note.expect("a feedback note");
    assert_eq!(
        (note.goal.as_str(), note.conversation_id.as_str()),
        ("the goal", "conv")
    );

    // An event after the position whose link is broken is refused.
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    let last = handle.events()[0].clone();
    let mut forged = last.event.clone();
    forged.event_id = RunId::new().to_string();
    forged.seq = 2;
    forged.body = Some(leaf(1));
    forged.prev_hash = vec![7; 32];
    forged.prev_stream_seq = last.stream_seq;
    forged.hash = dispatch_runlog::chain::hash(&forged).to_vec();
    log.bus()
        .append_over(
            dispatch_bus::subject::run(&run_id, LogWriter::Dispatcher),
            &forged.event_id,
            last.stream_seq,
            &dispatch_bus::subject::run_log(&run_id),
            prost::Message::encode_to_vec(&forged).into(),
        )
        .await?;
    let err = match log.handle_at(run_id, last.stream_seq, |_| true).await {
        Ok(_) => anyhow::bail!("a broken link was accepted"),
        Err(err) => err,
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    Ok(())
}

#[tokio::test]
async fn wait_for_finds_an_event_stored_before_or_after_it_starts() -> anyhow::Result<()> {
    use std::time::Duration;
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    let start = handle.events()[0].stream_seq;
    handle.append(leaf(1), "").await?;
    let leaf_no = |b: &Body| match b {
        Body::LeafStarted(l) if l.leaf > 0 => Some(l.leaf),
        _ => None,
    };
    // Stored after the position but before the wait began: found by reading the log.
    let found = log
        .wait_for(&run_id, start, Duration::from_secs(5), leaf_no)
        .await?;
    assert_eq!(found, 1);

    // Stored while it waits: found on the feed, well before the quiet period.
    let after = handle.events()[1].stream_seq;
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move {
            let begun = std::time::Instant::now();
            let found = log
                .wait_for(&run_id, after, Duration::from_secs(30), leaf_no)
                .await?;
            anyhow::Ok((found, begun.elapsed()))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    handle.append(leaf(2), "").await?;
    let (found, waited) = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
    assert_eq!(found, 2);
    assert!(
        waited < Duration::from_secs(30),
        "took the quiet period: {waited:?}"
    );
    Ok(())
}

/// A watcher and a handle on one subscription: the watcher finds what it waits for and
/// the handle is fed the same messages; once the watcher is gone the handle follows
/// the run by itself.
#[tokio::test]
async fn a_shared_feed_serves_the_watcher_and_the_handle() -> anyhow::Result<()> {
    use std::time::Duration;
    let nats = NatsServer::start().await?;
    let open = |name: &'static str| {
        let nats = &nats;
        async move {
            anyhow::Ok(
                RunLog::open(&nats.bus().await?, name)
                    .await?
                    .writing_as(LogWriter::Dispatcher),
            )
        }
    };
    let (log, other) = (open("executor").await?, open("other").await?);
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    let after = handle.events()[0].stream_seq;
    let shared = log.share_feed(&mut handle).await?;
    let leaf_no = |b: &Body| match b {
        Body::LeafStarted(l) if l.leaf == 2 => Some(l.leaf),
        _ => None,
    };
    let watcher = {
        let log = log.clone();
        tokio::spawn(async move {
            log.wait_for_shared(shared, after, Duration::from_secs(30), leaf_no)
                .await
        })
    };
    // Another process appends; the handle takes each event from the watcher's feed.
    let mut writer = other.handle(run_id).await?;
    writer.append(leaf(1), "").await?;
    assert_eq!(handle.wait_for_more(Duration::from_secs(5)).await?, 1);
    writer.append(leaf(2), "").await?;
    let found = tokio::time::timeout(Duration::from_secs(10), watcher).await???;
    assert_eq!(found, 2);
    assert_eq!(handle.wait_for_more(Duration::from_secs(5)).await?, 1);
    // The watcher returned and dropped the feed: the handle subscribes by itself and
    // still sees the next event, well before the wait runs out.
    writer.append(leaf(3), "").await?;
    let begun = std::time::Instant::now();
    assert_eq!(handle.wait_for_more(Duration::from_secs(20)).await?, 1);
    assert!(begun.elapsed() < Duration::from_secs(20));
    assert_eq!(handle.events().len(), 4);
    Ok(())
}

/// Appends `event` as stored on `writer`'s subject of its run, without any check:
/// what a process holding a writer's key (or the admin's) can put on the bus.
async fn forge(log: &RunLog, writer: LogWriter, event: &dispatch_proto::run::v1::RunEvent) {
    let run_id: RunId = event.run_id.parse().unwrap();
    log.bus()
        .append(
            dispatch_bus::subject::run(&run_id, writer),
            &event.event_id,
            None,
            prost::Message::encode_to_vec(event).into(),
        )
        .await
        .unwrap();
}

/// The next event after the handle's last, linked and hashed, with `role` and `body`.
fn next_event(
    handle: &dispatch_runlog::RunHandle,
    role: WriterRole,
    body: Body,
) -> dispatch_proto::run::v1::RunEvent {
    let last = handle.events().last().unwrap();
    let mut event = dispatch_proto::run::v1::RunEvent {
        event_id: RunId::new().to_string(),
        run_id: handle.run_id().to_string(),
        seq: last.event.seq + 1,
        prev_hash: last.event.hash.clone(),
        prev_stream_seq: last.stream_seq,
        role: role as i32,
        body: Some(body),
        ..Default::default()
    };
    event.hash = dispatch_runlog::chain::hash(&event).to_vec();
    event
}

#[tokio::test]
async fn an_event_written_by_the_wrong_role_makes_the_log_corrupt() -> anyhow::Result<()> {
    use dispatch_proto::run::v1::{ApprovalResolved, Decision};
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let approve = Body::ApprovalResolved(ApprovalResolved {
        approval_id: "a".into(),
        call_id: "c".into(),
        decision: Decision::Allow as i32,
        resolved_by: "policy".into(),
        ..Default::default()
    });
    // Each forgery: the role the event names, and the subject it is stored on.
    for (role, on, expected) in [
        // connectors' key, honest about itself: a kind it may not write.
        (
            WriterRole::Connectors,
            LogWriter::Connectors,
            "approval_resolved event written by connectors",
        ),
        // connectors' key, claiming to be policy: the subject says otherwise.
        (
            WriterRole::Policy,
            LogWriter::Connectors,
            "stored on the connectors subject but names policy",
        ),
        // No role at all.
        (
            WriterRole::Unspecified,
            LogWriter::Policy,
            "stored on the policy subject but names no role",
        ),
    ] {
        let run_id = RunId::new();
        let mut handle = log.handle(run_id).await?;
        handle.append(requested(), "").await?;
        forge(&log, on, &next_event(&handle, role, approve.clone())).await;
        let err = log.read(&run_id).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("seq 2 fails"), "{err}");
        assert!(err.to_string().contains(expected), "{err}");
        // A handle following the run refuses it too.
        let err = handle
            .wait_for_more(std::time::Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert_eq!(
            log.read_every(&run_id).await.unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
    // The same approval, by policy on its own subject, is an event like any other.
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    forge(
        &log,
        LogWriter::Policy,
        &next_event(&handle, WriterRole::Policy, approve),
    )
    .await;
    assert_eq!(log.read(&run_id).await?.len(), 2);
    // And this process refuses to send what its role may not write.
    let err = handle
        .append(Body::ToolCallCompleted(Default::default()), "")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("tool_call_completed event written by the dispatcher"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn each_identity_may_append_only_on_its_roles_subject() -> anyhow::Result<()> {
    use dispatch_bus::Identity;
    let nats = NatsServer::start().await?;
    let run_id = RunId::new();
    let dispatcher = RunLog::open(&nats.bus_as(Identity::Dispatcher).await?, "d")
        .await?
        .writing_as(LogWriter::Dispatcher);
    let mut handle = dispatcher.handle(run_id).await?;
    handle.append(requested(), "").await?;
    // The policy identity writing as if it were connectors: the server refuses.
    let policy_bus = nats.bus_as(Identity::Policy).await?;
    let event = next_event(
        &handle,
        WriterRole::Connectors,
        Body::ToolCallCompleted(Default::default()),
    );
    for (bus, on) in [
        (&policy_bus, LogWriter::Connectors),
        (&policy_bus, LogWriter::Dispatcher),
    ] {
        let refused = bus
            .append(
                dispatch_bus::subject::run(&run_id, on),
                &event.event_id,
                None,
                prost::Message::encode_to_vec(&event).into(),
            )
            .await;
        assert!(
            refused.is_err(),
            "policy appended on the {} subject",
            on.token()
        );
    }
    assert_eq!(dispatcher.read(&run_id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn what_follows_a_valid_seal_is_outside_the_record() -> anyhow::Result<()> {
    use dispatch_proto::run::v1::RunStatus;
    let nats = NatsServer::start().await?;
    let keys = tempfile::tempdir()?;
    let sealer = dispatch_runlog::seal::Sealer::load_or_create(&keys.path().join("seal"))?;
    let log = RunLog::open(&nats.bus().await?, "writer")
        .await?
        .writing_as(LogWriter::Dispatcher)
        .with_sealer(sealer);
    let run_id = RunId::new();
    let mut handle = log.handle(run_id).await?;
    handle.append(requested(), "").await?;
    handle.append(leaf(1), "").await?;
    handle
        .finish(RunStatus::Done, "workflow finished", "all good", "")
        .await?;
    let sealed = log.read(&run_id).await?;
    assert_eq!(sealed.len(), 4);

    // A well-linked event on policy's subject, then bytes that are no event at all.
    forge(
        &log,
        LogWriter::Policy,
        &next_event(&handle, WriterRole::Policy, leaf(9)),
    )
    .await;
    let garbage = log
        .bus()
        .append(
            dispatch_bus::subject::run(&run_id, LogWriter::Connectors),
            "garbage",
            None,
            b"not an event".to_vec().into(),
        )
        .await?;

    // Every reader shows the run as it was sealed...
    assert_eq!(log.read(&run_id).await?, sealed);
    let mut fresh = log.handle(run_id).await?;
    assert!(fresh.is_finished());
    assert_eq!(fresh.events(), &sealed[..]);
    assert_eq!(fresh.refresh().await?, 0);
    assert!(log.handle_tail(run_id).await?.is_finished());
    // ...and the auditor's read says what follows, from where.
    let audited = log.read_every(&run_id).await?;
    assert_eq!(audited.events, sealed);
    let after = audited.after_seal.expect("flagged");
    assert_eq!(after.messages, 2);
    assert_eq!(after.stream_seq, sealed[3].stream_seq + 1);
    assert!(after.stream_seq < garbage.stream_seq);
    // Nothing can be appended after it through a handle.
    let err = fresh.append(leaf(3), "").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Finished);
    let ended = dispatch_bus::reads::Reader::new(
        log.bus()
            .jetstream()
            .get_stream(dispatch_bus::streams::RUNS)
            .await?,
    );
    assert_eq!(
        dispatch_runlog::has_ended(&ended, &run_id.to_string()).await,
        Ok(true)
    );
    Ok(())
}
