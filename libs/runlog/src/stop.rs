//! Stopping a run, the same way for every door. The front doors (the CLI, HTTP, gRPC)
//! write no run log: they hand a `StopRun` command to the dispatcher ([`hand_over`]),
//! which records the request and makes sure the run ends ([`stop`]).

use std::time::Duration;

use dispatch_bus::RunId;
use dispatch_proto::run::v1::{RunStatus, StopRequested, run_event::Body};

use crate::{Error, ErrorKind, RunLog};

/// The grace period of a stop that names none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The longest grace period a stop may ask for: past it, asking is waiting forever.
pub const MAX_GRACE: Duration = Duration::from_secs(600);

/// How many times a stop command is offered to NATS before the caller is told.
const STORE_ATTEMPTS: u32 = 3;

/// Hands the stop of `run_id` to the dispatcher: a `StopRun` command on
/// `dispatch.cmd.stop`, which one dispatcher copy takes and carries out with [`stop`],
/// naming `by`. One command per run and kind within the dedupe window: asking again
/// while the first is carried out changes nothing, and a forced stop still gets
/// through.
pub async fn hand_over(
    bus: &dispatch_bus::Bus,
    run_id: &RunId,
    grace: Duration,
    force: bool,
    by: &str,
) -> Result<(), Error> {
    let command = dispatch_proto::command::v1::StopRun {
        run_id: run_id.to_string(),
        grace_ms: u64::try_from(grace.min(MAX_GRACE).as_millis()).unwrap_or(u64::MAX),
        force,
        requested_by: by.to_owned(),
    };
    let msg_id = format!("stop-{run_id}-{}", if force { "forced" } else { "asked" });
    let payload = prost::Message::encode_to_vec(&command);
    let mut last_error = None;
    for attempt in 0..STORE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        match bus
            .append(
                dispatch_bus::subject::cmd::stop(),
                &msg_id,
                None,
                payload.clone().into(),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => last_error = Some(e),
        }
    }
    let e = crate::Error::from(last_error.expect("at least one attempt"));
    Err(Error::new(
        e.kind(),
        format!(
            "NATS did not store the stop command ({e}); ask again (it is never carried out \
             twice)"
        ),
    ))
}

/// What a stop found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The run has ended `stopped`: by its owner within the grace period, or here.
    Now,
    /// The run had ended already; it is left as it is.
    Already,
    /// No goal and no log name the run.
    NoSuchRun,
}

/// Asks a run to stop and makes sure it ends: the owner ends it `stopped` when it sees
/// the request; if it has not within `grace` (or `force`, or the run has not started),
/// the terminal event is written here, naming `by`. Asking twice records one request.
pub async fn stop(
    log: &RunLog,
    run_id: RunId,
    grace: Duration,
    force: bool,
    by: &str,
) -> Result<Stopped, Error> {
    let grace = grace.min(MAX_GRACE);
    // A service is stopped from its log's ends: its first event says what it is, and
    // its tail takes the request and the end, however many wakes lie between.
    if let Some(first) = log.first_event(&run_id).await?
        && let Some(Body::RunRequested(requested)) = &first.event.body
        && requested.kind == crate::service::KIND
    {
        return stop_service(log, run_id, requested, force, by).await;
    }
    let mut handle = log.handle(run_id).await?;
    if handle.is_finished() {
        return Ok(Stopped::Already);
    }
    // A goal no dispatcher has taken yet has no log: start it from the goal, so the
    // stop and the terminal event follow the run's request like in any other run.
    if handle.events().is_empty() {
        let Some(goal) = crate::submit::find_goal(log.bus(), &run_id).await? else {
            return Ok(Stopped::NoSuchRun);
        };
        crate::submit::record_request(&mut handle, &goal).await?;
    }
    let request = Body::StopRequested(StopRequested {
        grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        force,
        requested_by: by.to_owned(),
    });
    let asked = |b: &Body| matches!(b, Body::StopRequested(_)).then_some(());
    match handle.ensure(asked, request, by).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::Finished => return Ok(Stopped::Already),
        Err(e) => return Err(e),
    }
    // A run no dispatcher has started has no owner to wait for: it ends now (a
    // dispatcher starting it meanwhile finds it ended). Waiting would hold the stop for
    // its whole grace period for nothing.
    let started = handle.bodies().any(|b| matches!(b, Body::RunStarted(_)));
    // Nor has an idle service: nothing runs it between wakes (its wakes are runs of
    // their own, and go on).
    let service = handle
        .bodies()
        .any(|b| matches!(b, Body::RunRequested(r) if r.kind == crate::service::KIND));
    if !force && started && !service {
        let deadline = tokio::time::Instant::now() + grace;
        while !handle.is_finished() && tokio::time::Instant::now() < deadline {
            let left = deadline - tokio::time::Instant::now();
            handle
                .wait_for_more(left.min(Duration::from_secs(1)))
                .await?;
        }
    }
    if !handle.is_finished() {
        let reason = if service {
            format!("stopped by {by}")
        } else if force {
            format!("stopped by {by} (forced)")
        } else if !started {
            format!("stopped by {by} (before it started)")
        } else {
            format!(
                "stopped by {by} (forced: no owner ended it within {} ms)",
                grace.as_millis()
            )
        };
        match handle
            .finish(RunStatus::Stopped, &reason, &reason, by)
            .await
        {
            Ok(_) => {}
            // The owner ended it in the meantime: that ending stands.
            Err(e) if e.kind() == ErrorKind::Finished => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Stopped::Now)
}

/// Stops a service: nothing runs an idle service, so it ends now, `stopped by <by>`
/// (wakes already running are runs of their own, and go on).
async fn stop_service(
    log: &RunLog,
    run_id: RunId,
    requested: &dispatch_proto::run::v1::RunRequested,
    force: bool,
    by: &str,
) -> Result<Stopped, Error> {
    let mut tail = log.handle_tail(run_id).await?;
    let request = Body::StopRequested(StopRequested {
        grace_ms: 0,
        force,
        requested_by: by.to_owned(),
    });
    // Asked already (a stop that did not get to the end): on with the end. A wake that
    // gets in first is read, and the request goes after it.
    let asked =
        |b: &Body| matches!(b, Body::StopRequested(_) | Body::FeedbackQueued(_)).then_some(());
    match tail.ensure(asked, request, by).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::Finished => return Ok(Stopped::Already),
        Err(e) => return Err(e),
    }
    tail.finish_tail(
        RunStatus::Stopped,
        &format!("stopped by {by}"),
        requested,
        by,
    )
    .await?;
    Ok(Stopped::Now)
}
