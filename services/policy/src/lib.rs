//! The policy service: the permission gate every tool call passes.
//!
//! It takes policy-check commands from a durable consumer shared by its copies,
//! decides each call against the policy document ([`document::Document`]; a built-in
//! default allows read-only tools and writes inside the run's scratch directory and
//! denies the rest) and appends the decision to the run's log, once, whatever the
//! number of deliveries. Approval queues and per-run denial memos come later.

pub mod document;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::health::{self, Health};
use dispatch_bus::work::{self, Delivery, WorkQueue};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_proto::command::v1::CheckPolicy;
use dispatch_proto::run::v1::{Decision, PolicyDecided, run_event::Body};
use dispatch_runlog::RunLog;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use document::{Document, Effect};

pub const SERVICE: &str = "policy";

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "dispatch-policy", about = "Dispatch permission gate", version)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// JSON policy document; without it the built-in policy applies.
    #[arg(long, env = "DISPATCH_POLICY")]
    pub policy: Option<PathBuf>,
    /// Lease on a command in milliseconds: if this copy dies mid-command, another copy
    /// gets it this long after the last renewal.
    #[arg(long, env = "DISPATCH_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Most checks this copy handles at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error(transparent)]
    Log(#[from] dispatch_runlog::Error),
    #[error(transparent)]
    Document(#[from] document::Error),
}

pub struct PolicyService {
    config: Config,
    bus: Bus,
    log: RunLog,
    document: Arc<Document>,
}

impl PolicyService {
    pub async fn build(config: Config) -> Result<Self, Error> {
        let document = match &config.policy {
            Some(path) => Document::load(path)?,
            None => Document::builtin(),
        };
        let instance = config.common.instance.clone();
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Policy)
            .await?;
        let log = RunLog::open(&bus, &format!("{SERVICE}/{instance}"))
            .await?
            .with_trust(config.common.trust());
        Ok(Self {
            config,
            bus,
            log,
            document: Arc::new(document),
        })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
        let health = tokio::spawn(health::serve(
            self.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        publish_document(&self.bus, &self.document).await?;
        tracing::info!(instance, version = self.document.version, "policy ready");
        let (log, document, stop) = (self.log.clone(), self.document.clone(), shutdown.clone());
        work::consume(
            &self.bus,
            WorkQueue {
                stream: streams::COMMANDS,
                consumer: streams::consumers::POLICY_CHECKS,
                filter_subjects: vec![subject::cmd::POLICY.to_owned()],
                ack_wait: Duration::from_millis(self.config.lease_ms.max(300)),
            },
            self.config.concurrency,
            shutdown,
            move |message| handle(log.clone(), document.clone(), message, stop.clone()),
        )
        .await?;
        let _ = health.await;
        Ok(())
    }
}

/// Puts the document in force into the tool catalogue, where the dispatcher reads
/// which tools not to offer at all and `dispatch tools` shows each tool's standing.
async fn publish_document(bus: &Bus, document: &Document) -> Result<(), Error> {
    let store = dispatch_bus::catalogue::open(bus).await?;
    let value = serde_json::to_value(document).expect("a policy document is JSON");
    dispatch_bus::catalogue::put_policy(&store, &value).await?;
    Ok(())
}

async fn handle(
    log: RunLog,
    document: Arc<Document>,
    message: jetstream::Message,
    shutdown: CancellationToken,
) {
    let delivery = Delivery::of(&message);
    let check = match CheckPolicy::decode(message.payload.as_ref()) {
        Ok(check) => check,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a policy command that is not a CheckPolicy");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let what = format!("policy check {}/{}", check.run_id, check.call_id);
    let outcome = work::retry(&what, &shutdown, transient, || async {
        if delivery.give_up() {
            give_up(&log, &check, delivery).await
        } else {
            decide(&log, &document, &check).await
        }
    })
    .await;
    work::settle(&message, &what, outcome, transient).await;
}

/// Everything but a log that does not verify may go away if tried again.
fn transient(e: &Error) -> bool {
    !matches!(e, Error::Log(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt)
}

/// Records in the run's log that its check was given up, so the run ends `blocked`.
async fn give_up(log: &RunLog, check: &CheckPolicy, delivery: Delivery) -> Result<(), Error> {
    let Ok(run_id) = check.run_id.parse::<RunId>() else {
        return Ok(());
    };
    let reason = delivery.give_up_reason("the policy check");
    tracing::error!(run_id = %run_id, call_id = check.call_id, reason, "giving up");
    let mut run = log
        .handle_at(run_id, check.from_stream_seq, |b| requests(b, check))
        .await?;
    run.abandon(
        "policy",
        &check.call_id,
        (delivery.number - 1) as u32,
        &reason,
    )
    .await?;
    Ok(())
}

/// True for the event requesting the call `check` is about, where the log is read from.
fn requests(body: &Body, check: &CheckPolicy) -> bool {
    matches!(body, Body::ToolCallRequested(r) if r.call_id == check.call_id)
}

async fn decide(log: &RunLog, document: &Document, check: &CheckPolicy) -> Result<(), Error> {
    let Ok(run_id) = check.run_id.parse::<RunId>() else {
        tracing::warn!(
            run_id = check.run_id,
            "policy check names no valid run; ignored"
        );
        return Ok(());
    };
    let mut run = log
        .handle_at(run_id, check.from_stream_seq, |b| requests(b, check))
        .await?;
    let call_id = check.call_id.as_str();
    // The decision is about the call the run's log requested, not whatever the command
    // claims: a command for a call the log does not hold is ignored.
    let requested = run.bodies().find_map(|b| match b {
        Body::ToolCallRequested(r) if r.call_id == call_id => Some(r.clone()),
        _ => None,
    });
    let Some(requested) = requested else {
        tracing::warn!(run_id = %run_id, call_id, "policy check for a call the log never requested; ignored");
        return Ok(());
    };
    let verdict = document.decide(&requested.tool, &requested.args_json);
    tracing::info!(run_id = %run_id, call_id, tool = requested.tool, effect = ?verdict.effect, rule = verdict.rule, "decided");
    let body = Body::PolicyDecided(PolicyDecided {
        call_id: call_id.to_owned(),
        decision: match verdict.effect {
            Effect::Allow => Decision::Allow,
            Effect::Deny => Decision::Deny,
        } as i32,
        rule: verdict.rule,
        reason: verdict.reason,
        policy_version: document.version,
    });
    let decided =
        |b: &Body| matches!(b, Body::PolicyDecided(d) if d.call_id == call_id).then_some(());
    match run.ensure(decided, body, call_id).await {
        Ok(()) => Ok(()),
        // A run that ended meanwhile needs no decision.
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => Ok(()),
        Err(e) => Err(e.into()),
    }
}
