//! What a call found started but unfinished is recorded as: a NATS outage when the
//! connectors process that started it still answers with the boot id it recorded, a
//! crash when it does not. Against a real nats-server and a real connectors process.

use dispatch_bus::Identity;
use dispatch_connectors::why_unfinished;
use dispatch_proto::run::v1::ToolCallStarted;
use dispatch_testkit::{NatsServer, Service};

#[tokio::test]
async fn an_unfinished_call_is_an_outage_while_its_executor_lives_and_a_crash_after()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let mut copy = Service::start("connectors", &nats, workspace.path(), &[]).await?;
    let bus = dispatch_testkit::connect(&nats, Identity::Connectors).await?;
    let started = ToolCallStarted {
        call_id: "l0-t0-c0".into(),
        executor: format!("connectors/{}", copy.instance),
        executor_boot: copy.health().boot.clone(),
    };

    let said = why_unfinished(&bus, &started).await;
    assert!(said.contains("NATS outage"), "{said}");
    assert!(said.contains(&started.executor), "{said}");

    // The same name answering from another boot is a restarted process: the call
    // died with the one before.
    let restarted = ToolCallStarted {
        executor_boot: "another-boot".into(),
        ..started.clone()
    };
    let said = why_unfinished(&bus, &restarted).await;
    assert!(said.contains("crashed"), "{said}");

    // A call recorded before boot ids were: nothing to tell an outage by.
    let older = ToolCallStarted {
        executor_boot: String::new(),
        ..started.clone()
    };
    assert!(why_unfinished(&bus, &older).await.contains("crashed"));

    copy.kill().await?;
    let said = why_unfinished(&bus, &started).await;
    assert!(said.contains("crashed"), "{said}");
    assert!(!said.contains("outage"), "{said}");
    Ok(())
}
