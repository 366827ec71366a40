//! The fire loop: sleeps until the earliest schedule is due, fires it, and moves it on.

use std::collections::HashMap;
use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_bus::async_nats::jetstream::kv;
use dispatch_proto::api::v1::{MissedFires, Overlap, Schedule};
use dispatch_runlog::submit::{Goal, Submission};
use prost::Message as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::book::RECHECK_MS;
use crate::{CONCURRENCY, MAX_CATCH_UP, Shared, now_ms};
use dispatch_cron::Expr;

/// The longest the loop sleeps without looking at the book.
const IDLE: Duration = Duration::from_secs(60);

/// The origin recorded on every run a schedule starts.
pub const ORIGIN: &str = "schedule";
/// The origin recorded on a todo's run.
pub const TODO_ORIGIN: &str = "todo";

/// What firing a schedule came to.
enum Outcome {
    /// Updated to this revision.
    Moved(Box<Schedule>, u64),
    /// Look again at this time (a queued fire still waits, or NATS failed).
    Retry(i64),
    /// Another copy moved it first: its update is on its way through the watch, and
    /// the entry is read afresh before it is fired again.
    Raced,
    /// It was removed meanwhile.
    Gone(u64),
}

pub(crate) async fn run(shared: Shared, shutdown: CancellationToken) {
    let mut fires: JoinSet<Outcome> = JoinSet::new();
    // Which schedule each fire is of, so even a fire that panicked gives it back.
    let mut firing: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        let now = now_ms();
        let room = CONCURRENCY.saturating_sub(fires.len());
        for (id, schedule, revision) in shared.book().take_due(now, room) {
            let shared = shared.clone();
            let task = fires.spawn(async move { fire(&shared, &schedule, revision).await });
            firing.insert(task.id(), id);
        }
        let wait = shared
            .book()
            .next_due()
            .map_or(IDLE, |at| {
                Duration::from_millis(at.saturating_sub(now).max(0) as u64)
            })
            .min(IDLE);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(wait), if fires.len() < CONCURRENCY => {}
            Some(done) = fires.join_next_with_id(), if !fires.is_empty() => {
                let (task, outcome) = match done {
                    Ok((task, outcome)) => (task, outcome),
                    Err(e) => {
                        tracing::error!(error = %e, "a fire panicked; its schedule is looked at again in a moment");
                        (e.id(), Outcome::Retry(now_ms() + RECHECK_MS))
                    }
                };
                let Some(id) = firing.remove(&task) else { continue };
                let mut book = shared.book();
                match outcome {
                    Outcome::Moved(schedule, revision) => book.adopt(&id, *schedule, revision),
                    Outcome::Retry(at) => book.retry(&id, at),
                    Outcome::Raced => {}
                    Outcome::Gone(revision) => book.hold(&id, None, revision),
                }
                book.done(&id);
            }
        }
    }
    fires.shutdown().await;
}

/// Fires what of `schedule` is due now and moves it on, with `revision` as the
/// expected one. The entry is read first: a schedule another copy moved, or a person
/// paused or removed, since this copy's book heard of it is not fired from the old
/// copy.
async fn fire(shared: &Shared, schedule: &Schedule, revision: u64) -> Outcome {
    let id = schedule.schedule_id.clone();
    match shared.schedules.entry(&id).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
            if entry.revision != revision {
                return match Schedule::decode(entry.value.as_ref()) {
                    Ok(mut fresh) => {
                        fresh.schedule_id = id;
                        Outcome::Moved(Box::new(fresh), entry.revision)
                    }
                    Err(_) => Outcome::Retry(now_ms() + RECHECK_MS),
                };
            }
        }
        Ok(Some(entry)) => return Outcome::Gone(entry.revision),
        Ok(None) => return Outcome::Gone(revision + 1),
        Err(e) => return retry(&id, now_ms(), &e.to_string()),
    }
    let now = now_ms();
    let mut moved = schedule.clone();
    if schedule.todo {
        // A todo fires once, when due, and is spent.
        if moved.next_fire_at_ms == 0 || moved.next_fire_at_ms > now {
            return Outcome::Retry(now + RECHECK_MS);
        }
        match start(shared, schedule, moved.next_fire_at_ms).await {
            Ok(run_id) => {
                moved.last_run_id = run_id.to_string();
                moved.last_fired_at_ms = moved.next_fire_at_ms;
                moved.next_fire_at_ms = 0;
                moved.fires += 1;
            }
            Err(e) => return not_started(shared, schedule, revision, now, e).await,
        }
        return update(shared, moved, revision).await;
    }
    // A service's schedule lasts as long as its service: once that has ended, it goes.
    if !schedule.service_run_id.is_empty() {
        match finished(shared, &schedule.service_run_id).await {
            Ok(true) => return remove(shared, &id, revision).await,
            Ok(false) => {}
            Err(e) => return retry(&id, now, &e),
        }
    }
    let expr = match Expr::parse(&schedule.expression, &schedule.time_zone) {
        Ok(expr) => expr,
        Err(e) => {
            // Only a write past the scheduler's checks stores such a schedule.
            tracing::warn!(
                schedule_id = id,
                error = e,
                "a stored schedule does not parse; pausing it"
            );
            moved.paused = true;
            return update(shared, moved, revision).await;
        }
    };
    // A fire held back for the previous run goes once that run has ended.
    if schedule.queued_fire_at_ms != 0 {
        match finished(shared, &schedule.last_run_id).await {
            Ok(true) => match start(shared, schedule, schedule.queued_fire_at_ms).await {
                Ok(run_id) => {
                    moved.last_run_id = run_id.to_string();
                    moved.last_fired_at_ms = schedule.queued_fire_at_ms;
                    moved.queued_fire_at_ms = 0;
                    moved.fires += 1;
                }
                Err(e) => return not_started(shared, schedule, revision, now, e).await,
            },
            Ok(false) if schedule.next_fire_at_ms == 0 || schedule.next_fire_at_ms > now => {
                return Outcome::Retry(now + RECHECK_MS);
            }
            Ok(false) => {}
            Err(e) => return retry(&id, now, &e),
        }
    }
    if moved.next_fire_at_ms != 0 && moved.next_fire_at_ms <= now {
        // Every fire time from the due one up to now: more than one after downtime.
        let (missed, more) = expr.between(moved.next_fire_at_ms - 1, now, MAX_CATCH_UP);
        let last = missed.last().copied().unwrap_or(moved.next_fire_at_ms);
        let latest = if more {
            expr.latest_at_or_before(now).unwrap_or(last)
        } else {
            last
        };
        let times: Vec<i64> = match moved.missed() {
            MissedFires::All => missed.clone(),
            MissedFires::Skip | MissedFires::Unspecified => vec![latest],
        };
        // Under `skip`, the missed times before the latest are not started.
        moved.skipped += (missed.len() - times.len().min(missed.len())) as u64;
        let running = match moved.overlap() {
            Overlap::Allow => false,
            _ => match finished(shared, &moved.last_run_id).await {
                Ok(done) => !done,
                Err(e) => return retry(&id, now, &e),
            },
        };
        match (running, moved.overlap()) {
            (true, Overlap::Queue) => {
                moved.skipped += (times.len() as u64).saturating_sub(1);
                moved.queued_fire_at_ms = latest;
            }
            (true, _) => moved.skipped += times.len() as u64,
            (false, _) => {
                for &at in &times {
                    match start(shared, &moved, at).await {
                        Ok(run_id) => {
                            moved.last_run_id = run_id.to_string();
                            moved.last_fired_at_ms = at;
                            moved.fires += 1;
                        }
                        Err(e) => return not_started(shared, schedule, revision, now, e).await,
                    }
                }
            }
        }
        moved.next_fire_at_ms = expr.next_after(latest.max(now)).unwrap_or(0);
    }
    if moved == *schedule {
        return Outcome::Retry(now + RECHECK_MS);
    }
    update(shared, moved, revision).await
}

/// A fire that did not start: tried again in a moment, or, when the schedule itself is
/// bad (only a write past the scheduler's checks makes one), paused.
async fn not_started(
    shared: &Shared,
    schedule: &Schedule,
    revision: u64,
    now: i64,
    why: NotStarted,
) -> Outcome {
    match why {
        NotStarted::Failed(e) => retry(&schedule.schedule_id, now, &e),
        NotStarted::Bad(e) => {
            tracing::warn!(
                schedule_id = schedule.schedule_id,
                error = e,
                "pausing a schedule that cannot start a run"
            );
            let mut paused = schedule.clone();
            paused.paused = true;
            update(shared, paused, revision).await
        }
    }
}

fn retry(id: &str, now: i64, error: &str) -> Outcome {
    tracing::warn!(
        schedule_id = id,
        error,
        "a fire did not go through; trying again"
    );
    Outcome::Retry(now + RECHECK_MS)
}

/// Removes the schedule `id` if the bucket still holds `revision`.
async fn remove(shared: &Shared, id: &str, revision: u64) -> Outcome {
    match shared
        .schedules
        .delete_expect_revision(id, Some(revision))
        .await
    {
        Ok(()) => {
            tracing::info!(schedule_id = id, "its service has ended; schedule removed");
            Outcome::Gone(revision + 1)
        }
        Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Outcome::Raced,
        Err(e) => retry(id, now_ms(), &e.to_string()),
    }
}

/// Stores `schedule` if the bucket still holds `revision`.
async fn update(shared: &Shared, schedule: Schedule, revision: u64) -> Outcome {
    let id = schedule.schedule_id.clone();
    match shared
        .schedules
        .update(&id, schedule.encode_to_vec().into(), revision)
        .await
    {
        Ok(revision) => Outcome::Moved(Box::new(schedule), revision),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Outcome::Raced,
        Err(e) => retry(&id, now_ms(), &e.to_string()),
    }
}

/// Why a fire's goal was not stored.
enum NotStarted {
    /// The stored schedule's goal does not check out: it never will.
    Bad(String),
    /// NATS did not store it; another try may.
    Failed(String),
}

/// Stores the goal of `schedule`'s fire at `at`: the same run whoever stores it.
async fn start(shared: &Shared, schedule: &Schedule, at: i64) -> Result<RunId, NotStarted> {
    let origin = if schedule.todo { TODO_ORIGIN } else { ORIGIN };
    let service = match schedule.service_run_id.as_str() {
        "" => None,
        id => Some(
            id.parse::<RunId>()
                .map_err(|e| NotStarted::Bad(format!("its service run id: {e}")))?,
        ),
    };
    let payload = match (&service, schedule.payload.as_str()) {
        (Some(_), "") => wake_payload(schedule, at),
        _ => schedule.payload.clone(),
    };
    let goal = Goal::new(
        &schedule.goal,
        &schedule.conversation_id,
        schedule.timeout_ms,
        origin,
    )
    .and_then(|goal| goal.with_payload(&payload))
    .and_then(|goal| match service {
        Some(parent) => goal.woken(parent, wake_reason(schedule)),
        None => Ok(goal),
    })
    .map_err(|e| NotStarted::Bad(format!("the schedule's goal does not check out: {e}")))?;
    let submission = Submission::fired(goal, &schedule.schedule_id, at);
    let run_id = submission.run_id();
    submission
        .submit(&shared.bus)
        .await
        .map_err(|e| NotStarted::Failed(e.to_string()))?;
    tracing::info!(schedule_id = schedule.schedule_id, %run_id, fire_at_ms = at, "fired");
    Ok(run_id)
}

/// Why a service's schedule woke it: its interval, or its cron expression.
fn wake_reason(schedule: &Schedule) -> &'static str {
    if schedule
        .expression
        .trim_start()
        .starts_with(dispatch_cron::EVERY)
    {
        dispatch_runlog::service::WAKE_INTERVAL
    } else {
        dispatch_runlog::service::WAKE_SCHEDULE
    }
}

/// The payload of a service's wake by a schedule that names none: why, and when.
fn wake_payload(schedule: &Schedule, at: i64) -> String {
    serde_json::json!({
        "wake": wake_reason(schedule),
        "schedule_id": schedule.schedule_id,
        "expression": schedule.expression,
        "fire_at_ms": at,
    })
    .to_string()
}

/// Whether the run `run_id` has ended (no run at all has).
async fn finished(shared: &Shared, run_id: &str) -> Result<bool, String> {
    dispatch_runlog::has_ended(&shared.runs, run_id).await
}
