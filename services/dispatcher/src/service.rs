//! Service runs and their wakes.
//!
//! Starting a service sets up its wake sources — each schedule of its spec, and its
//! interval, becomes a schedule in the scheduler that wakes it — and records
//! `RunStarted` with their ids and no deadline. Then the goal is acknowledged: an idle
//! service holds no dispatcher, and stays `doing` until it is stopped.
//!
//! A wake is a heartbeat run whose goal names its service. Before its first event, the
//! service's log records it (`ServiceWoken`); a wake of a service that has ended, or of
//! a run that is no service, ends `blocked` without running.

use std::time::Duration;

use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::{RunId, streams, subject};
use dispatch_proto::api::v1::{AddScheduleRequest, Schedule};
use dispatch_proto::api::{QueryError, Reply};
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_proto::run::v1::{
    ListenerEntry, RunRequested, RunStarted, RunStatus, ServiceSchedule, run_event::Body,
};
use dispatch_runlog::RunHandle;
use dispatch_runlog::service::{hook_key, listener_key};
use dispatch_runlog::submit::record_request;
use prost::Message as _;

use crate::{Context, Error};

/// How long the scheduler has to answer for a service's schedule.
const SCHEDULER_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the service run `run_id`: its schedules are in the scheduler and its log says
/// `RunStarted` when this returns. Safe to repeat after any failure.
pub(crate) async fn start(ctx: &Context, run_id: RunId, command: &SubmitGoal) -> Result<(), Error> {
    let mut run = ctx.log.handle(run_id).await?;
    if run.is_finished() || run.bodies().any(|b| matches!(b, Body::RunStarted(_))) {
        return Ok(());
    }
    let requested = record_request(&mut run, command).await?;
    let spec = requested.service.clone().unwrap_or_default();
    let mut sources: Vec<ServiceSchedule> = spec.schedules.clone();
    if spec.interval_ms > 0 {
        let every = humantime::format_duration(Duration::from_millis(spec.interval_ms));
        sources.push(ServiceSchedule {
            expression: format!("{} {every}", dispatch_cron::EVERY),
            ..Default::default()
        });
    }
    // Listeners first: a hook another service holds refuses the start before any
    // schedule is made.
    let listeners = ctx
        .bus
        .jetstream()
        .get_key_value(streams::LISTENERS_BUCKET)
        .await;
    let listeners = listeners.map_err(|e| dispatch_bus::Error::other("open the listeners", e))?;
    for (i, listener) in spec.listeners.iter().enumerate() {
        let entry = ListenerEntry {
            service_run_id: run_id.to_string(),
            index: i as u32 + 1,
            listener: Some(listener.clone()),
            goal: requested.goal.clone(),
            conversation_id: requested.conversation_id.clone(),
            timeout_ms: requested.timeout_ms,
            ..Default::default()
        };
        if let Err(why) = put_listener(ctx, &listeners, &entry).await? {
            return refuse(ctx, &mut run, format!("listener {}: {why}", i + 1)).await;
        }
    }
    let mut schedule_ids = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        match add_schedule(ctx, &run_id, i, source, &requested).await? {
            Ok(schedule) => schedule_ids.push(schedule.schedule_id),
            // Not stored this time: the start is tried again.
            Err(QueryError::Unavailable(e)) => {
                return Err(dispatch_bus::Error::other("a service's schedule", e).into());
            }
            // The spec was checked on its way in; only a scheduler that disagrees gets
            // here, and asking again will not change its mind.
            Err(e) => return refuse(ctx, &mut run, format!("schedule {}: {e}", i + 1)).await,
        }
    }
    let started = Body::RunStarted(RunStarted {
        owner: ctx.owner.clone(),
        deadline_unix_ms: 0,
        schedule_ids,
    });
    match run
        .ensure(
            |b| matches!(b, Body::RunStarted(_)).then_some(()),
            started,
            &command.run_id,
        )
        .await
    {
        Ok(()) => {}
        // Stopped while it was being set up: its schedules go at their next fire.
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(run_id = %run_id, schedules = sources.len(), "service started");
    Ok(())
}

/// Ends a service that cannot start `blocked` with `reason`.
async fn refuse(ctx: &Context, run: &mut RunHandle, reason: String) -> Result<(), Error> {
    tracing::warn!(run_id = %run.run_id(), reason, "a service cannot start");
    match run
        .finish(RunStatus::Blocked, &reason, &reason, &ctx.owner)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Stores a listener for ingress to serve: under the service's key, and a hook also
/// under its own, which one live service at a time may hold. `Ok(Err(why))`: a hook
/// another live service holds.
async fn put_listener(
    ctx: &Context,
    bucket: &kv::Store,
    entry: &ListenerEntry,
) -> Result<Result<(), String>, Error> {
    let service: RunId = entry.service_run_id.parse().expect("a run id");
    let value: bytes::Bytes = entry.encode_to_vec().into();
    let failed = |e: &dyn std::fmt::Display| dispatch_bus::Error::other("store a listener", e);
    let hook = entry.listener.as_ref().map_or("", |l| l.hook.as_str());
    if !hook.is_empty() {
        let key = hook_key(hook);
        loop {
            match bucket.create(&key, value.clone()).await {
                Ok(_) => break,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(failed(&e).into()),
            }
            let Some(held) = bucket.entry(&key).await.map_err(|e| failed(&e))? else {
                continue;
            };
            let holder = ListenerEntry::decode(held.value.as_ref()).unwrap_or_default();
            if holder.service_run_id == entry.service_run_id {
                break;
            }
            // A hook outlives a service only until ingress notices; an ended holder's
            // hook is free.
            let ended = match holder.service_run_id.parse::<RunId>() {
                Ok(other) => ctx.log.handle_tail(other).await?.is_finished(),
                Err(_) => true,
            };
            if !ended {
                return Ok(Err(format!(
                    "hook {hook} is taken by service {}",
                    holder.service_run_id
                )));
            }
            match bucket.update(&key, value.clone(), held.revision).await {
                Ok(_) => break,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(failed(&e).into()),
            }
        }
    }
    match bucket
        .create(&listener_key(&service, entry.index), value)
        .await
    {
        Ok(_) => Ok(Ok(())),
        // Stored by an earlier try of this start.
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Ok(())),
        Err(e) => Err(failed(&e).into()),
    }
}

/// Asks the scheduler for the service's `i`th schedule, under an id made from the run
/// and `i`, so that asking again finds the one stored.
async fn add_schedule(
    ctx: &Context,
    run_id: &RunId,
    i: usize,
    source: &ServiceSchedule,
    requested: &RunRequested,
) -> Result<Reply<Schedule>, Error> {
    let id = run_id.to_string();
    let request = AddScheduleRequest {
        expression: source.expression.clone(),
        time_zone: source.time_zone.clone(),
        goal: requested.goal.clone(),
        conversation_id: requested.conversation_id.clone(),
        payload: source.payload.clone(),
        timeout_ms: requested.timeout_ms,
        created_by: format!("service {id}"),
        service_run_id: id.clone(),
        schedule_id: dispatch_runlog::derived_uuid(
            dispatch_runlog::uuid_millis(&id),
            &format!("{id}/schedule/{i}"),
        )
        .to_string(),
        ..Default::default()
    };
    Ok(ctx
        .bus
        .request_json(subject::schedule::add(), &request, SCHEDULER_TIMEOUT)
        .await?)
}

/// Records the wake `run_id` in its service's log. `Ok(Err(reason))`: it may not run.
pub(crate) async fn record_wake(
    ctx: &Context,
    run_id: RunId,
    command: &SubmitGoal,
) -> Result<Result<(), String>, Error> {
    let parent: RunId = match command.parent_run_id.parse() {
        Ok(parent) => parent,
        Err(e) => return Ok(Err(format!("its service run: {e}"))),
    };
    debug_assert_eq!(command.run_id, run_id.to_string());
    Ok(dispatch_runlog::service::record_wake(&ctx.log, parent, command).await?)
}
