//! The run log against a real nats-server: races, dedupe, chain checks.

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{LeafStarted, run_event::Body};
use dispatch_runlog::{ErrorKind, RunLog};
use dispatch_testkit::NatsServer;

fn leaf(n: u32) -> Body {
    Body::LeafStarted(LeafStarted {
        leaf: n,
        title: format!("leaf {n}"),
    })
}

#[tokio::test]
async fn racing_writers_get_exactly_one_append_per_sequence() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let run_id = RunId::new();
    let mut writers = Vec::new();
    for name in ["writer-a", "writer-b", "writer-c"] {
        // Separate connections, as separate processes would have.
        let log = RunLog::open(&nats.bus().await?, name).await?;
        writers.push(log);
    }

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

    let log = RunLog::open(&nats.bus().await?, "reader").await?;
    let events = log.read(&run_id).await?; // verifies the chain: no gap, no fork
    assert_eq!(events.len(), 60);
    for (i, stored) in events.iter().enumerate() {
        assert_eq!(stored.event.seq, i as u64 + 1);
    }
    let mut ids: Vec<_> = events.iter().map(|e| e.event.event_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 60, "an event was stored twice");
    Ok(())
}

#[tokio::test]
async fn republishing_an_event_id_stores_it_once() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let log = RunLog::open(&nats.bus().await?, "writer").await?;
    let run_id = RunId::new();
    // A writer that read the (empty) log before the append, then retries the same event.
    let mut stale = log.handle(run_id).await?;
    let mut first = log.handle(run_id).await?;
    first
        .append_with_id("fixed-id".into(), leaf(1), "c")
        .await?;
    let again = stale
        .append_with_id("fixed-id".into(), leaf(1), "c")
        .await?;
    assert_eq!(again.event.seq, 1);
    assert_eq!(stale.events().len(), 1);

    // Raw republish of the same bytes with the same Nats-Msg-Id is dropped by the server.
    let stored = log.read(&run_id).await?;
    let raw = prost::Message::encode_to_vec(&stored[0].event);
    let ack = log
        .bus()
        .append(
            dispatch_bus::subject::run(&run_id),
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
    let log = RunLog::open(&nats.bus().await?, "writer").await?;
    let mut handle = log.handle(RunId::new()).await?;
    handle.append(leaf(0), "").await?;
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
        let log = RunLog::open(&nats.bus().await?, "writer").await?;
        let mut handle = log.handle(run_id).await?;
        handle.append(leaf(0), "").await?;
        handle.append(leaf(1), "").await?;
    }
    let url = nats.url();
    nats.restart().await?;
    assert_eq!(
        nats.url(),
        url,
        "a restart keeps the port, so clients reconnect"
    );
    let log = RunLog::open(&nats.bus().await?, "reader").await?;
    let events = log.read(&run_id).await?;
    assert_eq!(events.len(), 2);
    Ok(())
}
