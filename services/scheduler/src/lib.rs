//! The scheduler: goals started on cron expressions, each fire exactly once however
//! many copies run.
//!
//! Schedules live in the key-value bucket `DISPATCH_SCHEDULES` (one protobuf
//! [`Schedule`] per key, the key its id), not in any process: every copy watches the
//! whole bucket into its [`book::Book`] and sleeps until the earliest fire time. At a
//! fire time every copy that holds the schedule fires it the same way:
//!
//! 1. it stores the run's goal on `dispatch.goal.<run_id>` with the `Nats-Msg-Id`
//!    `<schedule_id>:<fire_ms>`, and a run id made from the same two (a UUIDv7 whose
//!    time is the fire time), so the goal stream keeps one, and the dispatcher starts
//!    one run, whoever stored it and however often;
//! 2. it moves `next_fire_at` on with the entry's revision as the expected one: one
//!    copy's update lands, the others are told the schedule moved and take the new
//!    entry.
//!
//! A copy that dies between the two leaves the schedule at the fire it stored; the next
//! copy to look stores the same goal again (a duplicate, dropped) and moves it on. Fire
//! times missed while no copy ran follow the schedule's [`MissedFires`]; a fire while the
//! schedule's previous run is still going follows its [`Overlap`].
//!
//! Requests on `dispatch.req.schedule.*` (queue group: one copy answers) add, list,
//! pause, resume and remove schedules; see [`requests`].

pub mod book;
mod fire;
mod requests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::health::{self, Health};
use dispatch_bus::{Bus, streams};
use dispatch_proto::api::v1::Schedule;
use futures::StreamExt as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub use dispatch_proto::api::v1::{MissedFires, Overlap};

pub const SERVICE: &str = "scheduler";

/// The most fire times one schedule catches up under `all`.
pub const MAX_CATCH_UP: usize = 100;
/// Schedules fired at once by one copy.
const CONCURRENCY: usize = 64;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "dispatch-scheduler",
    about = "Dispatch scheduler: cron schedules, each fire once",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error("{0}")]
    Nats(String),
}

pub struct Scheduler {
    config: Config,
    bus: Bus,
    schedules: kv::Store,
    runs: dispatch_bus::reads::Reader,
}

/// What the fire loop, the fires it starts and the request handlers share.
#[derive(Clone)]
struct Shared {
    bus: Bus,
    schedules: kv::Store,
    /// The run-log stream, for a run's last event (has the last run ended?).
    runs: dispatch_bus::reads::Reader,
    /// True once the book holds the whole bucket: requests wait for it.
    loaded: tokio::sync::watch::Receiver<bool>,
    book: Arc<Mutex<book::Book>>,
    /// Wakes the fire loop when the book changed under it.
    changed: Arc<tokio::sync::Notify>,
}

impl Shared {
    fn book(&self) -> std::sync::MutexGuard<'_, book::Book> {
        // The book is whole after every call into it: a panic elsewhere while it is
        // held leaves nothing half-written.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `entry` into the book (a newer revision replaces an older one), and wakes
    /// the fire loop.
    fn hold(&self, id: &str, entry: Option<(Schedule, u64)>, revision: u64) {
        self.book().hold(id, entry, revision);
        self.changed.notify_one();
    }
}

impl Scheduler {
    pub async fn build(config: Config) -> Result<Self, Error> {
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Scheduler)
            .await?;
        let schedules = bus
            .jetstream()
            .get_key_value(streams::SCHEDULES_BUCKET)
            .await
            .map_err(|e| Error::Nats(format!("open the schedules bucket: {e}")))?;
        let runs = bus
            .jetstream()
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| Error::Nats(format!("open the run-log stream: {e}")))?;
        let runs = dispatch_bus::reads::Reader::new(runs);
        Ok(Self {
            config,
            bus,
            schedules,
            runs,
        })
    }

    /// Fires schedules and answers requests until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
        let health = tokio::spawn(health::serve(
            self.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        let (loaded_tx, loaded) = tokio::sync::watch::channel(false);
        let shared = Shared {
            bus: self.bus.clone(),
            schedules: self.schedules.clone(),
            runs: self.runs.clone(),
            loaded,
            book: Arc::new(Mutex::new(book::Book::default())),
            changed: Arc::new(tokio::sync::Notify::new()),
        };
        let watch = tokio::spawn(watch(shared.clone(), loaded_tx, shutdown.clone()));
        let requests = tokio::spawn(requests::serve(shared.clone(), shutdown.clone()));
        tracing::info!(instance, "scheduler ready");
        fire::run(shared, shutdown).await;
        let _ = tokio::join!(watch, requests, health);
        Ok(())
    }
}

/// Follows the bucket into the book: every schedule as it is, then every change, again
/// from the start whenever the watch ends (a NATS restart, say). `loaded` turns true
/// once the book has caught up with the bucket the first time.
async fn watch(
    shared: Shared,
    loaded: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    // An empty bucket has nothing to deliver: it is caught up at once. Asked again
    // while nothing arrives, so a failed first ask does not leave requests waiting.
    let empty =
        || async { matches!(shared.schedules.status().await, Ok(status) if status.values() == 0) };
    loop {
        if empty().await {
            loaded.send_replace(true);
        }
        match shared.schedules.watch_with_history(">").await {
            Ok(mut entries) => loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = entries.next() => entry,
                    _ = tokio::time::sleep(Duration::from_secs(2)), if !*loaded.borrow() => {
                        if empty().await {
                            loaded.send_replace(true);
                        }
                        continue;
                    }
                };
                match entry {
                    Some(Ok(entry)) => {
                        let caught_up = entry.delta == 0;
                        take(&shared, entry);
                        if caught_up {
                            loaded.send_replace(true);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the schedules watch failed; watching again");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot watch the schedules; trying again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn take(shared: &Shared, entry: kv::Entry) {
    match entry.operation {
        kv::Operation::Put => match Schedule::decode(entry.value.as_ref()) {
            Ok(mut schedule) => {
                // The key is the id, whatever a forged value says.
                schedule.schedule_id = entry.key.clone();
                let revision = entry.revision;
                shared.hold(&entry.key, Some((schedule, revision)), revision);
            }
            Err(e) => {
                tracing::warn!(key = entry.key, error = %e, "a schedule that does not decode; left alone");
                shared.hold(&entry.key, None, entry.revision);
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => {
            shared.hold(&entry.key, None, entry.revision)
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}
