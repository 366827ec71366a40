//! The dispatcher: supervises runs.
//!
//! It takes goal commands from a durable consumer shared by all its copies (so a goal
//! runs once however many copies there are), and for each goal drives the run to one
//! terminal event: ask the author model for a plan, validate it (one retry with the
//! error fed back), write `workflows/<slug>.org`, then run each leaf's agent loop —
//! model turn, tool call, policy decision, connector result — and its `:done-when:`
//! gate, all through the bus and all recorded in the run's log.
//!
//! Every step first looks in the log for its own result, so a run picked up again
//! (after a crash, by another copy) continues from its last durable step and never
//! repeats a recorded model turn or tool call. The goal command stays unacknowledged
//! (with progress acks) until the terminal event is written: if this copy dies, the
//! server hands the goal to another copy once the ack wait runs out.

mod execute;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::health::{self, Health};
use dispatch_bus::work::{self, WorkQueue};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_models::Provider;
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_runlog::RunLog;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "dispatcher";

/// The default kill-switch budget of a run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(35 * 60);

/// How long a goal may go without a progress ack before another copy takes it over.
/// This bounds how long a run owned by a dead dispatcher waits to be resumed.
pub const GOAL_ACK_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "dispatch-dispatcher",
    about = "Dispatch run supervisor",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// Most runs this copy supervises at once.
    #[arg(long, env = "DISPATCH_MAX_RUNS", default_value_t = 32)]
    pub max_runs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error(transparent)]
    Log(#[from] dispatch_runlog::Error),
}

/// A built dispatcher, ready to [`Dispatcher::run`].
pub struct Dispatcher {
    config: Config,
    ctx: Arc<Context>,
}

/// What every run task shares.
struct Context {
    bus: Bus,
    log: RunLog,
    provider: Arc<dyn Provider>,
    workspace: PathBuf,
    owner: String,
}

impl Dispatcher {
    pub async fn build(config: Config, provider: Arc<dyn Provider>) -> Result<Self, Error> {
        let instance = config.common.instance();
        let bus = Bus::connect(&config.common.nats_url, &format!("dispatch-{SERVICE}")).await?;
        let owner = format!("{SERVICE}/{instance}");
        let log = RunLog::open(&bus, &owner).await?;
        let mut config = config;
        config.common.instance = Some(instance);
        Ok(Self {
            ctx: Arc::new(Context {
                bus,
                log,
                provider,
                workspace: config.common.workspace.clone(),
                owner,
            }),
            config,
        })
    }

    /// Supervises runs until `shutdown` fires. Runs in flight then are left at their
    /// last durable step and their goals handed back for another copy to resume.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance();
        let health = tokio::spawn(health::serve(
            self.ctx.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        tracing::info!(
            instance,
            max_runs = self.config.max_runs,
            "dispatcher ready"
        );
        let ctx = self.ctx.clone();
        let stop = shutdown.clone();
        work::consume(
            &self.ctx.bus,
            WorkQueue {
                consumer: streams::consumers::DISPATCHER_GOALS,
                filter_subjects: vec![subject::cmd::GOAL.to_owned()],
                ack_wait: GOAL_ACK_WAIT,
            },
            self.config.max_runs,
            shutdown,
            move |message| handle_goal(ctx.clone(), message, stop.clone()),
        )
        .await?;
        let _ = health.await;
        Ok(())
    }
}

async fn handle_goal(ctx: Arc<Context>, message: jetstream::Message, shutdown: CancellationToken) {
    let command = match SubmitGoal::decode(message.payload.as_ref()) {
        Ok(command) => command,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a goal command that is not a SubmitGoal");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let run_id: RunId = match command.run_id.parse() {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a goal command with a bad run id");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };

    let message = Arc::new(message);
    let keepalive = {
        let message = message.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GOAL_ACK_WAIT / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "progress ack failed");
                }
            }
        })
    };
    let outcome = tokio::select! {
        outcome = execute::run(&ctx, run_id, &command) => Some(outcome),
        _ = shutdown.cancelled() => None,
    };
    keepalive.abort();
    match outcome {
        Some(Ok(())) => {
            if let Err(e) = message.double_ack().await {
                // The run is finished in the log; a redelivery will see that and stop.
                tracing::warn!(run_id = %run_id, error = %e, "ack of a finished goal failed");
            }
        }
        Some(Err(e)) => {
            tracing::warn!(run_id = %run_id, error = %e, "run interrupted, handing the goal back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
        None => {
            tracing::info!(run_id = %run_id, "shutting down, handing the goal back");
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}
