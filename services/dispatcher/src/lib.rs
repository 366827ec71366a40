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
//!
//! It also takes stop commands (`dispatch.cmd.stop`) for the front doors that write no
//! run logs: it records the request, and ends the run itself if the owner does not.

mod answer;
mod execute;
pub mod model;
mod service;
mod stops;
mod telemetry;
mod tools;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::{self, AckKind};
use dispatch_bus::health::{self, Health};
use dispatch_bus::work::{self, Delivery, Slot, WorkQueue};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_runlog::RunLog;
use dispatch_runlog::seal::Sealer;
use dispatch_runlog::submit::check_command;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub const SERVICE: &str = "dispatcher";

/// The default kill-switch budget of a run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(35 * 60);

/// The default ownership lease: how long a goal may go without a progress ack before
/// the server hands it to another copy. A run whose dispatcher dies is resumed by
/// another copy within one lease (plus one fetch, at most 2 s).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

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
    /// Ownership lease in milliseconds: a run whose owner stops renewing it for this
    /// long is taken over by another copy. Renewed every third of it.
    #[arg(long, env = "DISPATCH_LEASE_MS", default_value_t = DEFAULT_LEASE.as_millis() as u64)]
    pub lease_ms: u64,
    /// The most characters of earlier turns a chat turn's model is shown (about four
    /// to a token); older turns are left out, and the model is told how many.
    #[arg(long, env = "DISPATCH_CHAT_HISTORY_CHARS", default_value_t = 24_000)]
    pub chat_history_chars: usize,
    /// The most earlier turns a chat turn's model is shown.
    #[arg(long, env = "DISPATCH_CHAT_HISTORY_TURNS", default_value_t = 50)]
    pub chat_history_turns: usize,
    #[command(flatten)]
    pub model: model::ModelArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error(transparent)]
    Log(#[from] dispatch_runlog::Error),
    #[error("run task cancelled: {0}")]
    Cancelled(String),
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
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
    providers: model::Providers,
    /// The most model turns one leaf may take.
    max_turns: u32,
    workspace: PathBuf,
    owner: String,
    lease: Duration,
    /// The tools leaves are offered.
    offer: tools::Offer,
    /// Every secret's value, to scrub what models write (`dispatch_secrets::Known`).
    known: Arc<dispatch_secrets::Known>,
    /// The conversations' heads (`KV_DISPATCH_TURNS`): where each chat turn takes its
    /// place.
    turns: jetstream::kv::Store,
    /// Finished chat turns as their conversations' history shows them.
    turn_cache: execute::TurnCache,
    /// How much of its conversation a chat turn's model is shown.
    chat_budget: execute::Budget,
}

/// How often the secrets scrubbed from models' text are read again.
const SECRETS_REFRESH: Duration = Duration::from_secs(10);

impl Dispatcher {
    pub async fn build(config: Config, providers: model::Providers) -> Result<Self, Error> {
        let instance = config.common.instance.clone();
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Dispatcher)
            .await?;
        let owner = format!("{SERVICE}/{instance}");
        let sealer = Sealer::load_or_create(&dispatch_service::layout::seal_key(
            &config.common.workspace,
        ))?;
        let log = RunLog::open(&bus, &owner)
            .await?
            .writing_as(dispatch_bus::subject::LogWriter::Dispatcher)
            .with_trust(config.common.trust())
            .with_sealer(sealer);
        let offer = tools::Offer::new(dispatch_bus::catalogue::open(&bus).await?);
        // A model that decoded a secret it saw must not put it in the log: what models
        // write is scrubbed of every stored secret, in every form it may take.
        let key_path = dispatch_secrets::key_path(&config.common.workspace);
        let key = dispatch_secrets::Key::load(&key_path).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the secrets key; stored secrets are not scrubbed from models' text");
            None
        });
        let store = dispatch_secrets::Store::open(&bus, key_path, key)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the secrets", e))?;
        let known = dispatch_secrets::Known::watch(store, SECRETS_REFRESH).await;
        let turns = bus
            .jetstream()
            .get_key_value(streams::TURNS_BUCKET)
            .await
            .map_err(|e| dispatch_bus::Error::other("open the conversations' turns", e))?;
        Ok(Self {
            ctx: Arc::new(Context {
                turns,
                turn_cache: execute::TurnCache::default(),
                chat_budget: execute::Budget {
                    chars: config.chat_history_chars,
                    turns: config.chat_history_turns,
                },
                offer,
                known,
                bus,
                log,
                providers,
                max_turns: config.model.max_turns,
                workspace: config.common.workspace.clone(),
                owner,
                lease: Duration::from_millis(config.lease_ms.max(300)),
            }),
            config,
        })
    }

    /// Supervises runs until `shutdown` fires. Runs in flight then are left at their
    /// last durable step and their goals handed back for another copy to resume.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
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
        let stops_shutdown = shutdown.child_token();
        let stops = tokio::spawn(stops::serve(self.ctx.clone(), stops_shutdown.clone()));
        let ctx = self.ctx.clone();
        let stop = shutdown.clone();
        let goals = work::consume(
            &self.ctx.bus,
            WorkQueue {
                stream: streams::GOALS,
                consumer: streams::consumers::DISPATCHER_GOALS,
                filter_subjects: vec![subject::GOALS_ALL.to_owned()],
                ack_wait: self.ctx.lease,
            },
            self.config.max_runs,
            shutdown,
            move |message, slot| handle_goal(ctx.clone(), message, slot, stop.clone()),
        )
        .await;
        // The goals end only at shutdown or when their consumer fails: the stops go too.
        stops_shutdown.cancel();
        let stops = stops.await.unwrap_or(Ok(()));
        let _ = health.await;
        goals?;
        stops?;
        Ok(())
    }
}

async fn handle_goal(
    ctx: Arc<Context>,
    message: jetstream::Message,
    slot: Slot,
    shutdown: CancellationToken,
) {
    let delivery = Delivery::of(&message);
    let command = match SubmitGoal::decode(message.payload.as_ref()) {
        Ok(command) => command,
        Err(e) => {
            tracing::warn!(subject = %message.subject, error = %e, "dropping a goal command that is not a SubmitGoal");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    // Goals can reach the bus without passing ingress or the CLI, so they are checked
    // again here, by the same rules. One that names no usable run cannot have a run;
    // any other bad goal still gets one, ended `blocked` with the reason, so that
    // nothing stays queued forever.
    let settle_reason = match check_command(&message.subject, &command) {
        Ok(_) if delivery.give_up() => Some(delivery.give_up_reason("the goal")),
        Ok(_) => None,
        Err(e) => match subject::run_id_of_goal(&message.subject) {
            Some(id) if id.to_string() == command.run_id => {
                tracing::warn!(run_id = %id, code = e.code(), reason = %e, "rejecting a goal");
                Some(format!("rejected: {}: {e}", e.code()))
            }
            _ => {
                tracing::warn!(subject = %message.subject, code = e.code(), reason = %e, "dropping a goal that names no usable run");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        },
    };
    let run_id: RunId = command.run_id.parse().expect("checked above");
    if delivery.give_up() {
        tracing::error!(run_id = %run_id, deliveries = delivery.number, "giving up on a goal that never finished");
    }
    let what = format!("run {run_id}");
    let outcome = match settle_reason {
        Some(reason) => {
            let (ctx, command) = (ctx.clone(), command.clone());
            work::retry(&what, &shutdown, transient, move || {
                let (ctx, command, reason) = (ctx.clone(), command.clone(), reason.clone());
                async move { execute::block(&ctx, run_id, &command, reason).await }
            })
            .await
        }
        None => {
            let (ctx, command) = (ctx.clone(), command.clone());
            work::retry(&what, &shutdown, transient, move || {
                supervise(ctx.clone(), run_id, command.clone(), slot.clone())
            })
            .await
        }
    };
    match outcome {
        Some(Ok(())) => {
            if let Err(e) = message.double_ack().await {
                // The run is finished in the log; a redelivery will see that and stop.
                tracing::warn!(run_id = %run_id, error = %e, "ack of a finished goal failed");
            }
        }
        // A log that does not verify cannot be continued without blessing whatever broke
        // it: stop retrying and say so loudly. The ledger shows the run `corrupt`.
        Some(Err(Error::Log(e))) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
            tracing::error!(run_id = %run_id, error = %e, "the run's log does not verify; not continuing it");
            let _ = message.ack_with(AckKind::Term).await;
        }
        Some(Err(e)) => {
            // Retried within this delivery already; the server redelivers it on its
            // backoff schedule, and after the last attempt it is given up.
            tracing::warn!(run_id = %run_id, deliveries = delivery.number, error = %e, "run interrupted, handing the goal back");
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        None => {
            tracing::info!(run_id = %run_id, "shutting down, handing the goal back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_millis(1))))
                .await;
        }
    }
}

/// Drives the run in a task of its own, so that a panic inside it ends the run
/// `blocked` with the panic message instead of leaving it to nobody.
async fn supervise(
    ctx: Arc<Context>,
    run_id: RunId,
    command: SubmitGoal,
    slot: Slot,
) -> Result<(), Error> {
    let task = {
        let (ctx, command) = (ctx.clone(), command.clone());
        // In the span of the goal's delivery: the run continues the goal's trace.
        tokio::spawn(
            async move { execute::run(&ctx, run_id, &command, slot).await }.in_current_span(),
        )
    };
    // Dropping this future (shutdown) must not leave the run's task behind.
    let abort = task.abort_handle();
    let _guard = AbortOnDrop(abort);
    match task.await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => {
            let reason = panic_message(e.into_panic());
            tracing::error!(run_id = %run_id, reason, "run executor panicked");
            execute::block(
                &ctx,
                run_id,
                &command,
                format!("leaf executor panicked: {reason}"),
            )
            .await
        }
        Err(e) => Err(Error::Cancelled(e.to_string())),
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything but a log that does not verify may go away if tried again.
fn transient(e: &Error) -> bool {
    !matches!(e, Error::Log(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt)
}
