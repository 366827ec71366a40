//! Dispatch on a NATS cluster: three nats-servers clustered on loopback. Streams and
//! buckets are declared with three replicas there and one on a single server, and a
//! goal runs to its end through services connected to one node while the streams live
//! on all three.

use std::time::Duration;

use anyhow::Result;
use dispatch_bus::{Identity, RunId, streams};
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_runlog::RunLog;
use dispatch_runlog::submit::{Goal, submit_goal};
use dispatch_testkit::{NatsCluster, NatsServer, Service};

const LIMIT: Duration = Duration::from_secs(60);

async fn replicas(bus: &dispatch_bus::Bus, stream: &str) -> Result<usize> {
    let mut stream = bus.jetstream().get_stream(stream).await?;
    Ok(stream.info().await?.config.num_replicas)
}

#[tokio::test]
async fn streams_are_replicated_on_a_cluster_and_a_goal_runs_there() -> Result<()> {
    let single = NatsServer::start().await?;
    let bus = single.bus().await?;
    for stream in [streams::RUNS, streams::GOALS, streams::SCHEDULES] {
        assert_eq!(replicas(&bus, stream).await?, 1, "{stream} on one server");
    }
    drop(bus);
    drop(single);

    let cluster = NatsCluster::start(3).await?;
    let bus = cluster.bus().await?;
    for stream in [
        streams::RUNS,
        streams::GOALS,
        streams::COMMANDS,
        streams::LEDGER,
        streams::SCHEDULES,
        streams::LISTENERS,
    ] {
        assert_eq!(replicas(&bus, stream).await?, 3, "{stream} on the cluster");
    }

    // The services on one node, the streams on all three: a goal runs to its end.
    let workspace = tempfile::Builder::new().prefix("dispatch-ws-").tempdir()?;
    let seal = dispatch_service::layout::seal_key(workspace.path());
    dispatch_runlog::seal::Sealer::load_or_create(&seal)?;
    let node = &cluster.nodes[1];
    let mut services = Vec::new();
    for name in ["ledger", "policy", "connectors", "dispatcher"] {
        services.push(Service::start(name, node, workspace.path(), &[]).await?);
    }
    let cli = dispatch_bus::Bus::connect(
        &cluster.urls(),
        Identity::Cli,
        &node.credentials(Identity::Cli)?,
    )
    .await?;
    let run_id: RunId = submit_goal(
        &cli,
        Goal::new("Tidy the cluster notes", "default", 0, "cli")?,
    )
    .await?;
    let log = RunLog::open(&bus, "test")
        .await?
        .with_trust(dispatch_runlog::seal::Trust::default().with_workspace_key(&seal));
    let deadline = tokio::time::Instant::now() + LIMIT;
    let end = loop {
        let events = log.read(&run_id).await?;
        let end = events.iter().find_map(|e| match &e.event.body {
            Some(Body::RunFinished(f)) => Some(f.clone()),
            _ => None,
        });
        if let Some(end) = end {
            break end;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the run did not end on the cluster"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(end.status, RunStatus::Done as i32, "{}", end.reason);
    Ok(())
}
