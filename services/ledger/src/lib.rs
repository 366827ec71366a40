//! The ledger: Dispatch's projections.
//!
//! It follows submitted goals (stream `DISPATCH_GOALS`), every run's log (stream
//! `DISPATCH_RUNS`) and the ledger's own events (stream `DISPATCH_LEDGER`) with ordered
//! consumers that start after the last
//! sequence committed to its sled views, so deleting the views and restarting rebuilds
//! them from the logs. From the views it answers `dispatch.query.*` (run status for
//! `ps`/`inspect`, a conversation's tasks with a read-once drain of its feedback
//! notes) and renders `TASKS.org`, atomically, after every change.
//!
//! Every copy keeps its own views; drains are serialised through the log with
//! optimistic concurrency, so copies agree on which notes are gone.

mod metrics;
mod project;
pub mod render;
pub mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispatch_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use dispatch_bus::health::{self, Health};
use dispatch_bus::reads::Reader;
use dispatch_bus::{Bus, ConversationId, ErrorKind, streams, subject};
use dispatch_proto::ledger::v1::FeedbackDrained;
use dispatch_proto::run::v1::ListenerEntry;
use dispatch_service::layout;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use dispatch_proto::api::v1::{
    GetRunRequest, GetTranscriptRequest, GetTranscriptResponse, LedgerStatusResponse,
    ListApprovalsRequest, ListApprovalsResponse, ListRunsRequest, ListRunsResponse,
    ListTasksRequest, ListTasksResponse, Note, ReplayRunRequest, ReplayRunResponse, RunView,
    SearchRunsRequest, TrailOutcome, TranscriptRun,
};
use dispatch_proto::api::{self, QueryError, Reply};
use dispatch_runlog::RunLog;
use project::{Pending, Views};
use view::Fold;

pub const SERVICE: &str = "ledger";

/// How many messages one view transaction takes at most while catching up.
const COMMIT_EVERY: usize = 4096;

/// How long a caught-up projection gathers messages into one view transaction: the
/// most a view lags its stream, traded for one commit per window under load.
const COMMIT_WINDOW: Duration = Duration::from_millis(10);

/// How often a projection that has received nothing looks at its stream's last
/// sequence. Two looks in a row that find the stream grown while nothing arrived mean
/// the consumer is stuck (its server died, the stream's leader moved and the consumer
/// did not follow): it is recreated from the views' cursor.
const STALL_CHECK: Duration = Duration::from_secs(3);

/// The least time between two renders of TASKS.org: a change is in the file within
/// this long, and a busy stack renders once per interval, not once per change.
const RENDER_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "dispatch-ledger",
    about = "Dispatch projections: run status, feedback, TASKS.org",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// Where the sled views live (default: .dispatch/state/ledger under the workspace).
    #[arg(long, env = "DISPATCH_LEDGER_STATE")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error(transparent)]
    Views(#[from] dispatch_views::Error),
}

pub struct Ledger {
    config: Config,
    bus: Bus,
    views: Views,
}

/// What the ledger's tasks share.
struct State {
    bus: Bus,
    log: RunLog,
    views: Views,
    workspace: PathBuf,
    /// Wakes the exporter when trails become due (they are listed in the views).
    trails: Notify,
    render: Notify,
    drains_applied: watch::Sender<u64>,
    /// Where services' listeners are bound (ingress keeps it), for their views.
    listeners: dispatch_bus::async_nats::jetstream::kv::Store,
}

impl Ledger {
    pub async fn build(config: Config) -> Result<Self, Error> {
        let state_dir = config
            .state_dir
            .clone()
            .unwrap_or_else(|| layout::state_dir(&config.common.workspace).join("state/ledger"));
        std::fs::create_dir_all(&state_dir).map_err(|e| dispatch_views::Error::Sled(e.into()))?;
        let views = Views::open(&state_dir, config.common.trust())?;
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Ledger)
            .await?;
        Ok(Self { config, bus, views })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
        let drains_cursor = self.views.cursor(streams::LEDGER)?;
        let log = RunLog::open(&self.bus, &format!("{SERVICE}/{instance}"))
            .await
            .map_err(|e| dispatch_bus::Error::new(ErrorKind::Other, e.to_string()))?
            .with_trust(self.views.trust().clone());
        let listeners = self
            .bus
            .jetstream()
            .get_key_value(streams::LISTENERS_BUCKET)
            .await
            .map_err(|e| dispatch_bus::Error::new(ErrorKind::Other, e.to_string()))?;
        let state = Arc::new(State {
            listeners,
            log,
            trails: Notify::new(),
            bus: self.bus.clone(),
            views: self.views.clone(),
            workspace: self.config.common.workspace.clone(),
            render: Notify::new(),
            drains_applied: watch::channel(drains_cursor).0,
        });
        let _gauges = metrics::register(self.views.clone());
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(health::serve(
            self.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        tasks.spawn(project_stream(
            state.clone(),
            streams::GOALS,
            shutdown.clone(),
        ));
        tasks.spawn(project_stream(
            state.clone(),
            streams::RUNS,
            shutdown.clone(),
        ));
        tasks.spawn(project_stream(
            state.clone(),
            streams::LEDGER,
            shutdown.clone(),
        ));
        tasks.spawn(answer_queries(state.clone(), shutdown.clone()));
        tasks.spawn(export_trails(state.clone(), shutdown.clone()));
        tasks.spawn(find_ghosts(state.clone(), shutdown.clone()));
        let tasks_file = layout::tasks_file(&self.config.common.workspace);
        tasks.spawn(render_tasks(state.clone(), tasks_file, shutdown.clone()));
        state.render.notify_one();
        tracing::info!(instance, "ledger ready");
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "ledger task failed");
                    shutdown.cancel();
                }
                Err(e) => {
                    tracing::error!(error = %e, "ledger task panicked");
                    shutdown.cancel();
                }
            }
        }
        // sled also flushes on its own; a clean stop should not leave work to redo.
        self.views.flush()?;
        Ok(())
    }
}

/// Follows `stream` from the views' cursor and folds its messages into the views.
async fn project_stream(
    state: Arc<State>,
    stream_name: &'static str,
    shutdown: CancellationToken,
) -> Result<(), dispatch_bus::Error> {
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match follow(&state, stream_name, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(stream = stream_name, error = %e, "projection interrupted, resuming from the views' cursor");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

async fn follow(
    state: &State,
    stream_name: &'static str,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let cursor = state.views.cursor(stream_name).map_err(|e| e.to_string())?;
    let stream = state
        .bus
        .jetstream()
        .get_stream(stream_name)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: if cursor == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: cursor + 1,
                }
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut pending = Pending::default();
    let (started, mut applied, mut caught_up) = (std::time::Instant::now(), 0u64, false);
    // Once caught up, messages are committed in groups: the first one that leaves
    // nothing pending opens a window of `COMMIT_WINDOW`, and whatever arrives in it
    // joins the same transaction, so a busy stack pays for one commit per window
    // rather than one per event.
    let mut window: Option<tokio::time::Instant> = None;
    let mut last_seq = cursor;
    let mut stall_check = tokio::time::interval(STALL_CHECK);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stall_check.reset();
    // The stream's last sequence at the previous look, if nothing arrived since.
    let mut quiet_since: Option<u64> = None;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = stall_check.tick() => {
                let Ok(info) = stream.get_info().await else {
                    // Cannot tell now; the next look will.
                    continue;
                };
                let end = info.state.last_sequence;
                metrics::stream_end(stream_name, end, last_seq);
                match quiet_since {
                    Some(before) if end > before && end > last_seq => {
                        commit(state, stream_name, &mut pending, last_seq)?;
                        return Err(format!(
                            "no message for {STALL_CHECK:?} while the stream grew from {before} to {end}; following again from {last_seq}"
                        ));
                    }
                    _ => quiet_since = Some(end),
                }
                continue;
            }
            _ = tokio::time::sleep_until(window.unwrap_or_else(tokio::time::Instant::now)), if window.is_some() => {
                window = None;
                commit(state, stream_name, &mut pending, last_seq)?;
                // The views have everything the stream held a moment ago.
                state.render.notify_one();
                if !caught_up {
                    caught_up = true;
                    let ms = started.elapsed().as_millis() as u64;
                    tracing::info!(
                        stream = stream_name,
                        from = cursor,
                        to = last_seq,
                        messages = applied,
                        ms,
                        "views caught up"
                    );
                }
                continue;
            }
            message = messages.next() => message,
        };
        let Some(message) = message else {
            return Err("consumer ended".into());
        };
        let message = message.map_err(|e| e.to_string())?;
        quiet_since = None;
        stall_check.reset();
        applied += 1;
        let (seq, left) = {
            let info = message.info().map_err(|e| e.to_string())?;
            (info.stream_sequence, info.pending)
        };
        last_seq = seq;
        metrics::applied(stream_name, left);
        // Live, each event's fold is a span in the trace of the run it belongs to;
        // catching up (a rebuild, thousands of old events) makes none.
        let span = if caught_up {
            let span = tracing::info_span!(
                "apply",
                otel.name = %format_args!("ledger.apply {stream_name}"),
                otel.kind = "consumer",
                messaging.system = "nats",
                messaging.operation.type = "process",
                messaging.destination.name = %message.subject,
                seq,
            );
            dispatch_bus::trace::follow(&span, message.headers.as_ref());
            span
        } else {
            tracing::Span::none()
        };
        let _applying = span.enter();
        match stream_name {
            streams::RUNS => {
                state
                    .views
                    .apply_run_event(&mut pending, seq, &message.subject, &message.payload)
            }
            streams::GOALS => {
                state
                    .views
                    .apply_goal(&mut pending, seq, &message.subject, &message.payload)
            }
            _ => state.views.apply_ledger_event(
                &mut pending,
                seq,
                &message.subject,
                &message.payload,
            ),
        }
        if pending.len() >= COMMIT_EVERY {
            // While catching up, render once at the end rather than at every batch.
            commit(state, stream_name, &mut pending, seq)?;
        }
        if left == 0 && window.is_none() {
            window = Some(tokio::time::Instant::now() + COMMIT_WINDOW);
        }
    }
}

/// Commits what `pending` holds (up to stream sequence `seq`), then does what waited
/// for it: working directories of removed runs go, the exporter hears of ended runs,
/// and drains are announced as applied.
fn commit(
    state: &State,
    stream_name: &'static str,
    pending: &mut Pending,
    seq: u64,
) -> Result<(), String> {
    let batch = std::mem::take(pending);
    let removed = batch.removed().to_vec();
    let finished = batch.finished();
    state
        .views
        .commit(stream_name, batch)
        .map_err(|e| e.to_string())?;
    for (run_id, trail) in removed {
        remove_run_dir(&state.workspace, &run_id, trail);
    }
    if finished > 0 {
        state.trails.notify_one();
    }
    if stream_name == streams::LEDGER {
        state.drains_applied.send_replace(seq);
    }
    Ok(())
}

/// How often the runs whose start is new are checked against the goals. Most runs end
/// before their first check, and an ended run needs no read.
const GHOST_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Looks for the goal of every run whose log started (the views' `ghosts_due`): a run
/// that has not ended, and that no goal on DISPATCH_GOALS names, was started by no
/// dispatcher taking a goal, so nothing owns it. It goes to the dispatcher, which
/// checks the same for itself and ends it `blocked` (`dispatch.cmd.ghost`).
async fn find_ghosts(
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<(), dispatch_bus::Error> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(GHOST_CHECK_EVERY) => {}
        }
        loop {
            let due = state.views.ghosts_due(256);
            if due.is_empty() || shutdown.is_cancelled() {
                break;
            }
            let mut checked = 0;
            for run_id in &due {
                match check_ghost(&state, run_id).await {
                    Ok(()) => {
                        checked += 1;
                        if let Err(e) = state.views.ghost_checked(run_id) {
                            tracing::warn!(run_id, error = %e, "cannot mark a run's goal looked for");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(run_id, error = %e, "cannot look for a run's goal yet")
                    }
                }
            }
            if checked < due.len() {
                break;
            }
        }
    }
}

/// Looks for one run's goal, and hands the run to the dispatcher if none names it.
async fn check_ghost(state: &State, run_id: &str) -> Result<(), String> {
    let Some(view) = state.views.run(run_id) else {
        return Ok(());
    };
    if view.status().is_terminal() {
        return Ok(());
    }
    let id: dispatch_bus::RunId = run_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| e.to_string())?;
    if dispatch_runlog::submit::find_goal(&state.bus, &id)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(());
    }
    tracing::warn!(
        run_id,
        "a run's log started with no goal; asking the dispatcher to end it"
    );
    let command = dispatch_proto::command::v1::EndGhost {
        run_id: run_id.to_owned(),
    };
    state
        .bus
        .append(
            subject::cmd::ghost(),
            &format!("ghost-{run_id}"),
            None,
            prost::Message::encode_to_vec(&command).into(),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Trails exported at the same time.
const TRAILS_AT_ONCE: usize = 16;

/// How long the exporter waits before trying a trail that could not be written again.
const TRAIL_RETRY: Duration = Duration::from_secs(5);

/// Writes `.dispatch/runs/<id>/_steps.jsonl` for runs that ended, from their verified
/// logs: every run in the views' `trails_due` tree, on start (catching up on whatever a
/// killed ledger left) and whenever runs end; the ones that fail are tried again.
async fn export_trails(
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<(), dispatch_bus::Error> {
    loop {
        let failed = export_due(&state, &shutdown).await;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = state.trails.notified() => {}
            _ = tokio::time::sleep(TRAIL_RETRY), if failed > 0 => {}
        }
    }
}

/// One pass over the due trails; returns how many could not be written.
async fn export_due(state: &State, shutdown: &CancellationToken) -> usize {
    let (mut after, mut failed, mut first_error) = (None::<String>, 0usize, None);
    loop {
        let due = state.views.trails_due(after.as_deref(), 256);
        if due.is_empty() || shutdown.is_cancelled() {
            break;
        }
        after = due.last().cloned();
        // A trail is a few reads of the log, each a round trip: several at once keep
        // the exporter from falling behind a busy stack.
        let mut exports = futures::stream::iter(due)
            .map(|run_id| async move {
                let result = export_trail(state, &run_id, false).await;
                (run_id, result)
            })
            .buffer_unordered(TRAILS_AT_ONCE);
        while let Some((run_id, result)) = exports.next().await {
            match result {
                Ok(_) => {
                    if let Err(e) = state.views.trail_written(&run_id) {
                        tracing::warn!(run_id, error = %e, "cannot mark the trail written");
                    }
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert((run_id, e));
                }
            }
        }
    }
    if let Some((run_id, error)) = first_error {
        // One line per pass, not one per run: an outage fails them all the same way.
        tracing::warn!(
            failed,
            run_id,
            error,
            retry_s = TRAIL_RETRY.as_secs(),
            "cannot export trails yet; will retry"
        );
    }
    failed
}

/// Exports one finished run's trail. Nothing can follow a terminal event, so a trail
/// already on disk is complete and is only rewritten when `force`d (`dispatch replay`).
async fn export_trail(state: &State, run_id: &str, force: bool) -> Result<u64, String> {
    let id: dispatch_bus::RunId = run_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| e.to_string())?;
    if state.views.trail_removed(run_id) {
        return Ok(0);
    }
    let path = layout::steps_file(&state.workspace, &id);
    if !force && path.exists() {
        return Ok(0);
    }
    let events = match state.log.read_every(&id).await {
        // The trail is the record: up to the seal, whatever was stored after it.
        Ok(audited) => audited.events,
        // No trail can ever be written for a log that does not verify: trying again
        // every few seconds would only repeat this line forever.
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
            tracing::warn!(run_id, error = %e, "the run's log does not verify; it gets no trail");
            return Ok(0);
        }
        Err(e) => return Err(e.to_string()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    render::write_atomically(&path, &dispatch_runlog::steps::export(&events))
        .map_err(|e| e.to_string())?;
    Ok(events.len() as u64)
}

/// Deletes a removed run's working directory (already gone is fine), all of it with
/// `trail`, else everything but the audit trail `_steps.jsonl`.
fn remove_run_dir(workspace: &std::path::Path, run_id: &str, trail: bool) {
    let Ok(id) = run_id.parse::<dispatch_bus::RunId>() else {
        tracing::warn!(run_id, "not removing a directory for a malformed run id");
        return;
    };
    let dir = layout::run_dir(workspace, &id);
    let steps = layout::steps_file(workspace, &id);
    let removed = if trail {
        std::fs::remove_dir_all(&dir)
    } else {
        std::fs::read_dir(&dir).and_then(|entries| {
            for entry in entries {
                let path = entry?.path();
                if path == steps {
                    continue;
                }
                // Not following symlinks: a link in the run's directory goes, not its target.
                if path.symlink_metadata()?.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
            Ok(())
        })
    };
    match removed {
        Ok(()) => tracing::info!(run_id, trail, "removed the run's directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(run_id, error = %e, "cannot remove the run's directory"),
    }
}

/// Re-renders TASKS.org whenever the views change (coalescing bursts), and writes the
/// dated archives that are due.
async fn render_tasks(
    state: Arc<State>,
    path: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), dispatch_bus::Error> {
    let mut last = None;
    let mut entries = render::Entries::default();
    let mut archives = Archives::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = state.render.notified() => {}
        }
        let (runs, oldest_shown) = state.views.for_tasks_org(render::RECENT);
        let content = entries.tasks_org(&runs);
        if last.as_ref() != Some(&content) {
            match render::write_atomically(&path, &content) {
                Ok(()) => last = Some(content),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write TASKS.org")
                }
            }
        }
        let boundary = oldest_shown.as_deref().and_then(render::day_of_run);
        let state = state.clone();
        archives = tokio::task::spawn_blocking(move || {
            archives.write_due(&state, boundary);
            archives
        })
        .await
        .unwrap_or_default();
        // Changes meanwhile are coalesced into the next render.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RENDER_INTERVAL) => {}
        }
    }
}

/// The dated archives (`archive/YYYY-MM-DD.org`): every ended run made on a day before
/// the day of the oldest run TASKS.org shows. Each is written when its day falls behind
/// that boundary and again only when one of its runs ends late or is removed, so a run
/// costs one archive render, whatever the size of the log. A file is a function of the
/// views alone, so a rebuild writes the same bytes.
#[derive(Default)]
struct Archives {
    /// The boundary of the last pass; `None` before the first.
    boundary: Option<Option<String>>,
}

impl Archives {
    fn write_due(&mut self, state: &State, boundary: Option<String>) {
        let workspace = &state.workspace;
        // When the boundary moves back (runs removed), archives at or after it would
        // repeat what TASKS.org shows now: those files go, and their days are due
        // again once they fall behind it.
        let moved_back = match (&self.boundary, &boundary) {
            (None, _) => true,
            (Some(Some(before)), Some(now)) => now < before,
            (Some(Some(_)), None) => true,
            (Some(None), _) => false,
        };
        if moved_back {
            remove_archives_from(workspace, boundary.as_deref());
        }
        self.boundary = Some(boundary.clone());
        let Some(boundary) = boundary else { return };
        for (day, token) in state.views.archives_due(&boundary) {
            let file = render::archive_path(workspace, &day);
            match write_archive(state, &file, &day) {
                Ok(()) => {
                    if let Err(e) = state.views.archive_written(&day, &token) {
                        tracing::warn!(day, error = %e, "cannot mark an archive written");
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %file.display(), error = %e, "cannot write an archive");
                }
            }
        }
    }
}

/// Writes the archive of `day`, or removes it when no ended run of that day is left.
fn write_archive(state: &State, file: &std::path::Path, day: &str) -> std::io::Result<()> {
    let mut any = false;
    state.views.each_ended_run_of_day(day, |_| {
        any = true;
        false
    });
    if !any {
        return match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    render::write_atomically_with(file, |out| {
        out.write_all(render::archive_header(day).as_bytes())?;
        let mut result = Ok(());
        state.views.each_ended_run_of_day(day, |run| {
            result = out.write_all(render::entry(run).as_bytes());
            result.is_ok()
        });
        result
    })
}

/// Removes the archives of `from` and later days (all of them when `from` is `None`).
fn remove_archives_from(workspace: &std::path::Path, from: Option<&str>) {
    let dir = workspace.join(render::ARCHIVE_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(day) = name.strip_suffix(".org") else {
            continue;
        };
        if render::day_key_range(day).is_some() && from.is_none_or(|from| day >= from) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

async fn answer_queries(
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<(), dispatch_bus::Error> {
    let client = state.bus.client().clone();
    let mut requests = client
        .queue_subscribe("dispatch.query.*", subject::query::QUERY_GROUP.to_owned())
        .await
        .map_err(|e| dispatch_bus::Error::new(ErrorKind::Unreachable, e.to_string()))?;
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            request = requests.next() => request,
        };
        let Some(request) = request else {
            return Ok(());
        };
        let Some(reply_to) = request.reply.clone() else {
            continue;
        };
        let state = state.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let body = match request.subject.as_str() {
                subject::query::RUNS => {
                    encode(parse(&request.payload).and_then(|q| runs(&state, q)))
                }
                subject::query::RUN => {
                    let view = match parse::<GetRunRequest>(&request.payload) {
                        Ok(q) => run_or_goal(&state, q).await,
                        Err(e) => Err(e),
                    };
                    encode(match view {
                        Ok(view) => Ok(with_listeners(&state, view).await),
                        Err(e) => Err(e),
                    })
                }
                subject::query::STATUS => encode(status(&state)),
                subject::query::APPROVALS => {
                    encode(parse(&request.payload).and_then(|q| approvals(&state, q)))
                }
                subject::query::REPLAY => {
                    let answer = match parse::<ReplayRunRequest>(&request.payload) {
                        Ok(q) => replay(&state, q).await,
                        Err(e) => Err(e),
                    };
                    encode(answer)
                }
                subject::query::TRANSCRIPT => {
                    let answer = match parse::<GetTranscriptRequest>(&request.payload) {
                        Ok(q) => transcript(&state, q).await,
                        Err(e) => Err(e),
                    };
                    encode(answer)
                }
                subject::query::SEARCH => encode(
                    parse::<SearchRunsRequest>(&request.payload).and_then(|q| search(&state, q)),
                ),
                subject::query::TASKS => {
                    let answer = match parse::<ListTasksRequest>(&request.payload) {
                        Ok(q) => tasks(&state, q).await,
                        Err(e) => Err(e),
                    };
                    encode(answer)
                }
                other => encode::<()>(Err(QueryError::BadRequest(format!(
                    "unknown query {other}"
                )))),
            };
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::warn!(subject = %request.subject, error = %e, "cannot send a query's answer");
            }
        });
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Reply<T> {
    serde_json::from_slice(payload)
        .map_err(|e| QueryError::BadRequest(format!("malformed query: {e}")))
}

fn encode<T: serde::Serialize>(reply: Reply<T>) -> Vec<u8> {
    if let Err(e) = &reply {
        tracing::info!(error = %e, "query refused");
    }
    serde_json::to_vec(&reply).expect("replies serialize")
}

/// The most bytes of JSON one reply may carry: half the server's message limit, so an
/// envelope never tips it over.
fn reply_budget(state: &State) -> usize {
    let max_payload = state.bus.client().server_info().max_payload;
    (max_payload / 2).clamp(16 * 1024, 4 * 1024 * 1024)
}

fn page_bounds(limit: Option<u32>, bytes: usize) -> Result<project::Bounds, QueryError> {
    let limit = limit.unwrap_or(api::DEFAULT_PAGE);
    if !(1..=api::MAX_PAGE).contains(&limit) {
        return Err(QueryError::BadRequest(format!(
            "limit must be between 1 and {}",
            api::MAX_PAGE
        )));
    }
    Ok(project::Bounds {
        limit: limit as usize,
        bytes,
    })
}

/// A page cursor is a run id (or a prefix of one, for hand-written queries).
fn cursor(after: Option<&str>) -> Result<Option<&str>, QueryError> {
    match after {
        None => Ok(None),
        Some(a)
            if !a.is_empty()
                && a.len() <= 36
                && a.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') =>
        {
            Ok(Some(a))
        }
        Some(a) => Err(QueryError::BadRequest(format!(
            "after {a:?} is not a run id; pass the `next` of the previous page"
        ))),
    }
}

fn runs(state: &State, query: ListRunsRequest) -> Reply<ListRunsResponse> {
    let bounds = page_bounds(query.limit, reply_budget(state))?;
    if let Some(c) = &query.conversation_id {
        c.parse::<ConversationId>()
            .map_err(|e| QueryError::BadRequest(e.to_string()))?;
    }
    if let Some(origin) = &query.origin
        && (origin.is_empty() || origin.len() > dispatch_runlog::submit::MAX_ORIGIN_CHARS)
    {
        return Err(QueryError::BadRequest(format!(
            "origin must be 1 to {} characters",
            dispatch_runlog::submit::MAX_ORIGIN_CHARS
        )));
    }
    let filter = project::Filter {
        all: query.all,
        conversation: query.conversation_id.as_deref(),
        origin: query.origin.as_deref(),
    };
    let page = state
        .views
        .page(filter, cursor(query.after.as_deref())?, bounds);
    Ok(ListRunsResponse {
        runs: page.runs,
        next: page.next,
    })
}

fn approvals(state: &State, query: ListApprovalsRequest) -> Reply<ListApprovalsResponse> {
    let bounds = page_bounds(query.limit, reply_budget(state))?;
    let after = match query.after.as_deref() {
        None => None,
        Some(a)
            if !a.is_empty()
                && a.len() <= 256
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            Some(a)
        }
        Some(a) => {
            return Err(QueryError::BadRequest(format!(
                "after {a:?} is not an approval id; pass the `next` of the previous page"
            )));
        }
    };
    let (approvals, next) = state.views.approvals(after, bounds);
    Ok(ListApprovalsResponse { approvals, next })
}

fn run(state: &State, query: GetRunRequest) -> Reply<RunView> {
    let id = query.id.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(QueryError::BadRequest(format!(
            "{id:?} is not a run id, a short id, or a prefix of either"
        )));
    }
    let mut found = state.views.runs_with_prefix(id, 6);
    match found.len() {
        0 => Err(QueryError::NotFound(format!("no run matches {id}"))),
        1 => Ok(found.remove(0)),
        _ => {
            let ids: Vec<_> = found.iter().take(5).map(|r| r.run_id.as_str()).collect();
            Err(QueryError::Ambiguous(format!(
                "{id} matches several runs: {}",
                ids.join(", ")
            )))
        }
    }
}

/// The run `query` names; for a whole run id the views do not hold yet, its goal: a
/// goal accepted a moment ago (its 202 sent, the projection not there yet) reads
/// `queued`, never "no such run".
async fn run_or_goal(state: &State, query: GetRunRequest) -> Reply<RunView> {
    let found = run(state, query.clone());
    let Err(QueryError::NotFound(_)) = &found else {
        return found;
    };
    let Ok(run_id) = query.id.trim().parse::<dispatch_bus::RunId>() else {
        return found;
    };
    if state.views.is_removed(&run_id.to_string()) {
        return found;
    }
    match dispatch_runlog::submit::find_goal(&state.bus, &run_id).await {
        // Read as the views read goals: one that does not name its own run is none.
        Ok(Some(goal)) if goal.run_id == run_id.to_string() => Ok(RunView::queued(&goal)),
        Ok(_) => found,
        Err(e) => Err(QueryError::Unavailable(e.to_string())),
    }
}

/// A service's view with where its listeners listen now: runtime state ingress keeps
/// in the listeners bucket, not history (the log has the requests they handled).
async fn with_listeners(state: &State, mut view: RunView) -> RunView {
    let Some(service) = view.service.as_mut() else {
        return view;
    };
    if service.listeners.iter().all(|l| l.listen_addr.is_empty()) || view.finished_at_ms.is_some() {
        return view;
    }
    let Ok(run_id) = view.run_id.parse::<dispatch_bus::RunId>() else {
        return view;
    };
    for (i, listener) in service.listeners.iter_mut().enumerate() {
        if listener.listen_addr.is_empty() {
            continue;
        }
        let key = dispatch_runlog::service::listener_key(&run_id, i as u32 + 1);
        if let Ok(Some(entry)) = state.listeners.entry(&key).await
            && let Ok(entry) = ListenerEntry::decode(entry.value.as_ref())
        {
            listener.bound_addr = entry.bound_addr;
        }
    }
    view
}

fn status(state: &State) -> Reply<LedgerStatusResponse> {
    let cursor = |source| {
        state
            .views
            .cursor(source)
            .map_err(|e| QueryError::Unavailable(e.to_string()))
    };
    Ok(LedgerStatusResponse {
        runs_cursor: cursor(streams::RUNS)?,
        ledger_cursor: cursor(streams::LEDGER)?,
        trails_due: !state.views.trails_due(None, 1).is_empty(),
    })
}

/// Rebuilds one run's views from its log: verifies the chain and seal, folds a fresh
/// view, re-exports its trail and re-renders TASKS.org. A run removed with `rm`/`prune`
/// stays out of the views, and one removed with its trail gets no trail back; the
/// reply says which.
async fn replay(state: &State, query: ReplayRunRequest) -> Reply<ReplayRunResponse> {
    let run_id = match query.id.parse::<dispatch_bus::RunId>() {
        Ok(id) => id,
        Err(_) => run(state, GetRunRequest { id: query.id })?
            .run_id
            .parse()
            .map_err(|e: dispatch_bus::IdError| QueryError::BadRequest(e.to_string()))?,
    };
    let audited = state
        .log
        .read_every(&run_id)
        .await
        .map_err(|e| match e.kind() {
            dispatch_runlog::ErrorKind::Corrupt => QueryError::Corrupt(e.to_string()),
            _ => QueryError::Unavailable(e.to_string()),
        })?;
    let events = audited.events;
    if events.is_empty() {
        return Err(QueryError::NotFound(format!("no run {run_id}")));
    }
    let mut view = events
        .iter()
        .fold(None, |view, stored| {
            Some(RunView::apply(
                view,
                &stored.event,
                stored.stored_as,
                stored.stream_seq,
                state.views.trust(),
            ))
        })
        .expect("at least one event");
    if let Some(after) = audited.after_seal {
        view.tampered_after_seal = Some(dispatch_proto::api::v1::TamperedAfterSeal {
            stream_seq: after.stream_seq,
            messages: after.messages,
        });
        view.last_stream_seq = view.last_stream_seq.max(after.stream_seq);
    }
    let key = run_id.to_string();
    let removed = state.views.is_removed(&key);
    state
        .views
        .replace_run(&view)
        .map_err(|e| QueryError::Unavailable(e.to_string()))?;
    let last = &events.last().expect("not empty").event;
    let sealed_by = (!last.signature.is_empty()).then(|| hex::encode(&last.signer));
    let trail = if sealed_by.is_none() {
        TrailOutcome::NotEnded
    } else if state.views.trail_removed(&key) {
        TrailOutcome::Removed
    } else {
        export_trail(state, &key, true)
            .await
            .map_err(QueryError::Unavailable)?;
        TrailOutcome::Exported
    };
    state.render.notify_one();
    Ok(ReplayRunResponse {
        run: Some(view),
        events: events.len() as u64,
        sealed_by,
        views_rebuilt: !removed,
        trail: trail as i32,
    })
}

/// A page of the conversation's runs, newest first, each with its transcript built
/// from its log now (the log is what persists a turn; nothing else is kept). Stops at
/// `since` when given, and before the answer would outgrow [`reply_budget`].
async fn transcript(state: &State, query: GetTranscriptRequest) -> Reply<GetTranscriptResponse> {
    let conversation: ConversationId = query
        .conversation_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| QueryError::BadRequest(e.to_string()))?;
    let budget = reply_budget(state);
    let bounds = page_bounds(query.limit, budget)?;
    let after = cursor(query.after.as_deref())?;
    let since = cursor(query.since.as_deref())?;
    let filter = project::Filter {
        all: true,
        conversation: Some(conversation.as_str()),
        origin: None,
    };
    let page = state.views.page(filter, after, bounds);
    let mut runs: Vec<TranscriptRun> = Vec::new();
    let mut used = 0;
    let mut next = page.next;
    for view in page.runs {
        if since.is_some_and(|since| view.run_id.as_str() < since) {
            next = None;
            break;
        }
        if used >= budget {
            // The rest start the next page.
            next = runs.last().map(|r| r.run_id.clone());
            break;
        }
        let run_id: dispatch_bus::RunId = view
            .run_id
            .parse()
            .map_err(|e: dispatch_bus::IdError| QueryError::Unavailable(e.to_string()))?;
        let events = state.log.read(&run_id).await.map_err(|e| match e.kind() {
            dispatch_runlog::ErrorKind::Corrupt => QueryError::Corrupt(e.to_string()),
            _ => QueryError::Unavailable(e.to_string()),
        })?;
        let mut run = TranscriptRun {
            run_id: view.run_id.clone(),
            goal: view.goal.clone(),
            status: view.status,
            chunks: Vec::new(),
            last_seq: events.last().map_or(0, |e| e.event.seq),
            cut: false,
        };
        let left = budget.saturating_sub(used);
        let mut size = 0;
        for chunk in dispatch_chunks::transcript(&view.run_id, events.iter().map(|e| &e.event)) {
            let chunk = chunk.to_string();
            let bytes = chunk.len() + 1;
            if size + bytes > left {
                run.cut = true;
                break;
            }
            size += bytes;
            run.chunks.push(chunk);
        }
        if run.cut && !runs.is_empty() {
            // The next page starts with it, whole if it fits there.
            next = runs.last().map(|r| r.run_id.clone());
            break;
        }
        used += size + view.goal.len() + 128;
        runs.push(run);
    }
    Ok(GetTranscriptResponse { runs, next })
}

/// The most runs one search answers with.
const MAX_SEARCHED: u32 = 50;

fn search(state: &State, query: SearchRunsRequest) -> Reply<ListRunsResponse> {
    let limit = query.limit.unwrap_or(10);
    if !(1..=MAX_SEARCHED).contains(&limit) {
        return Err(QueryError::BadRequest(format!(
            "limit must be between 1 and {MAX_SEARCHED}"
        )));
    }
    if query.query.chars().count() > 1_000 {
        return Err(QueryError::BadRequest(
            "the query is over 1,000 characters".into(),
        ));
    }
    // Bounded like any page: as many runs as fit half a reply.
    let budget = reply_budget(state);
    let mut used = 0;
    let runs = state
        .views
        .search(&query.query, limit as usize)
        .into_iter()
        .take_while(|view| {
            used += serde_json::to_vec(view).map_or(0, |b| b.len());
            used <= budget
        })
        .collect();
    Ok(ListRunsResponse { runs, next: None })
}

async fn tasks(state: &State, query: ListTasksRequest) -> Reply<ListTasksResponse> {
    let conversation: ConversationId = query
        .conversation_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| QueryError::BadRequest(e.to_string()))?;
    if let Some(id) = &query.drain_id {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(QueryError::BadRequest(format!(
                "drain_id {id:?} must be 1 to 64 letters, digits, '-' or '_'"
            )));
        }
    }
    // Half the reply for the tasks, half for the notes: together they always fit.
    let half = reply_budget(state) / 2;
    let bounds = page_bounds(query.limit, half)?;
    let after = cursor(query.after.as_deref())?;
    let (feedback, more_feedback) =
        drain(state, &conversation, query.drain_id.as_deref(), half).await?;
    let filter = project::Filter {
        all: true,
        conversation: Some(conversation.as_str()),
        origin: None,
    };
    let page = state.views.page(filter, after, bounds);
    Ok(ListTasksResponse {
        tasks: page.runs,
        next: page.next,
        feedback,
        more_feedback,
    })
}

/// Takes a page of the conversation's oldest undrained notes, recording the drain in
/// the ledger stream first, with exactly the notes this answer carries. With optimistic
/// concurrency on the conversation's drain subject, two drains (here or in another
/// ledger copy) never hand out the same note. A drain id seen before returns what that
/// drain handed out.
async fn drain(
    state: &State,
    conversation: &ConversationId,
    drain_id: Option<&str>,
    bytes: usize,
) -> Reply<(Vec<Note>, bool)> {
    let unavailable =
        |e: &dyn std::fmt::Display| QueryError::Unavailable(format!("cannot drain feedback: {e}"));
    let bounds = project::Bounds {
        limit: api::MAX_NOTES as usize,
        bytes,
    };
    if let Some(id) = drain_id {
        // Another ledger copy may have recorded it: catch up with the drains first.
        if state.views.drained_by(conversation.as_str(), id).is_none()
            && let Ok(last) = last_drain_seq(state, conversation).await
        {
            wait_for_drains(state, last).await;
        }
        if let Some(notes) = state.views.drained_by(conversation.as_str(), id) {
            let (_, more) = state.views.undrained(conversation.as_str(), bounds);
            return Ok((notes, more));
        }
    }
    for _ in 0..20 {
        // The expected sequence comes from the stream, not the views, and the views are
        // read only once the commit that applied it has returned: a reader outside a
        // sled transaction could otherwise see part of a commit and hand a note out
        // twice.
        let expected = last_drain_seq(state, conversation)
            .await
            .map_err(|e| unavailable(&e))?;
        if !wait_for_drains(state, expected).await {
            return Err(QueryError::Unavailable(
                "the ledger is still catching up with earlier drains; try again".into(),
            ));
        }
        let (notes, more) = state.views.undrained(conversation.as_str(), bounds);
        if notes.is_empty() {
            return Ok((notes, false));
        }
        let event = FeedbackDrained {
            conversation_id: conversation.to_string(),
            run_ids: notes.iter().map(|n| n.run_id.clone()).collect(),
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            drain_id: drain_id.unwrap_or_default().to_owned(),
        };
        // A fresh id per attempt: two drains that race must not be taken for one retried
        // publish and both told they won.
        let msg_id = format!("drain-{}", dispatch_bus::RunId::new());
        let appended = state
            .bus
            .append(
                subject::drain(conversation),
                &msg_id,
                Some(expected),
                event.encode_to_vec().into(),
            )
            .await;
        match appended {
            Ok(ack) if !ack.duplicate => {
                wait_for_drains(state, ack.stream_seq).await;
                return Ok((notes, more));
            }
            // Another drain won, or ours was taken for a retry: look again.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Conflict => {}
            Err(e) => {
                tracing::warn!(conversation = %conversation, error = %e, "cannot record a feedback drain");
                return Err(unavailable(&e));
            }
        }
    }
    Err(QueryError::Unavailable(
        "feedback drain kept losing races; try again".into(),
    ))
}

/// The stream sequence of the conversation's last drain (0: none yet).
async fn last_drain_seq(state: &State, conversation: &ConversationId) -> Result<u64, String> {
    let stream = state
        .bus
        .jetstream()
        .get_stream(streams::LEDGER)
        .await
        .map_err(|e| e.to_string())?;
    let last = Reader::new(stream)
        .last(subject::drain(conversation).as_str())
        .await
        .map_err(|e| e.to_string())?;
    Ok(last.map_or(0, |message| message.sequence))
}

/// Waits (up to 5 s) until the views hold every ledger-stream message up to `seq`;
/// false if they did not get there in time.
async fn wait_for_drains(state: &State, seq: u64) -> bool {
    let mut applied = state.drains_applied.subscribe();
    tokio::time::timeout(Duration::from_secs(5), applied.wait_for(|s| *s >= seq))
        .await
        .is_ok_and(|r| r.is_ok())
}
