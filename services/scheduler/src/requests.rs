//! Requests on `dispatch.req.schedule.*` (JSON, one copy answers each): `add`, `get`,
//! `list`, `pause`, `resume`, `rm`. Each answer is a `Reply`: the schedule (or the page)
//! as it is afterwards, or why not. A bad request changes nothing.

use dispatch_bus::async_nats::jetstream::kv;
use dispatch_bus::{ConversationId, RunId, subject};
use dispatch_proto::api::v1::{
    AddScheduleRequest, ListSchedulesRequest, ListSchedulesResponse, MissedFires, Overlap,
    Schedule, ScheduleIdRequest,
};
use dispatch_proto::api::{DEFAULT_PAGE, MAX_PAGE, QueryError, Reply};
use dispatch_runlog::submit::Goal;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use dispatch_cron::Expr;

use crate::book::Lookup;
use crate::fire::{ORIGIN, TODO_ORIGIN};
use crate::{Shared, now_ms};

/// Requests this copy answers at once.
const CONCURRENCY: usize = 32;
/// The most schedules the bucket holds: every copy keeps all of them in memory.
pub const MAX_SCHEDULES: usize = dispatch_bus::streams::MAX_SCHEDULES as usize;
/// The longest name of who made a schedule.
const MAX_WHO_CHARS: usize = 128;
/// How many lost races a pause or resume rides out.
const MAX_RACES: usize = 8;

pub(crate) async fn serve(shared: Shared, shutdown: CancellationToken) {
    // A copy answers only once its book holds the whole bucket: before that it would
    // not find schedules that exist, nor list them all.
    let mut loaded = shared.loaded.clone();
    tokio::select! {
        _ = shutdown.cancelled() => return,
        ready = loaded.wait_for(|loaded| *loaded) => if ready.is_err() { return },
    }
    // Taken again after a second whenever the subscription cannot be made.
    loop {
        let shared = shared.clone();
        let bus = shared.bus.clone();
        let answered = dispatch_bus::answer::serve(
            &bus,
            subject::schedule::ALL,
            subject::schedule::GROUP,
            CONCURRENCY,
            shutdown.clone(),
            move |message| {
                let shared = shared.clone();
                async move { Some(answer(&shared, &message).await) }
            },
        )
        .await;
        match answered {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "cannot take schedule requests yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// The answer to one request, by its subject.
async fn answer(shared: &Shared, message: &dispatch_bus::async_nats::Message) -> Vec<u8> {
    let body = &message.payload;
    match message.subject.as_str() {
        subject::schedule::ADD => json(match parse(body) {
            Ok(request) => add(shared, request).await,
            Err(e) => Err(e),
        }),
        subject::schedule::GET => json(parse(body).and_then(|r| get(shared, r))),
        subject::schedule::LIST => json(parse(body).and_then(|r| list(shared, r))),
        subject::schedule::RM => json(match parse(body) {
            Ok(request) => remove(shared, request).await,
            Err(e) => Err(e),
        }),
        verb @ (subject::schedule::PAUSE | subject::schedule::RESUME) => {
            let paused = verb == subject::schedule::PAUSE;
            json(match parse(body) {
                Ok(request) => pause(shared, request, paused).await,
                Err(e) => Err(e),
            })
        }
        other => json::<()>(Err(QueryError::BadRequest(format!(
            "no such schedule request: {other}"
        )))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, QueryError> {
    serde_json::from_slice(body).map_err(|e| QueryError::BadRequest(format!("the request: {e}")))
}

fn json<T: serde::Serialize>(answer: Reply<T>) -> Vec<u8> {
    serde_json::to_vec(&answer).unwrap_or_else(|e| {
        serde_json::to_vec(&Reply::<()>::Err(QueryError::Unavailable(e.to_string())))
            .expect("an error serializes")
    })
}

/// Checks a new schedule by every rule, works out its first fire time, and stores it.
async fn add(shared: &Shared, request: AddScheduleRequest) -> Reply<Schedule> {
    let bad = QueryError::BadRequest;
    let now = now_ms();
    // A todo has no expression: it fires once, when due (now, if that has passed).
    let (next, origin) = if request.todo {
        if !request.expression.trim().is_empty() {
            return Err(bad(
                "a todo has a due time, not an expression: leave `expression` empty".into(),
            ));
        }
        (request.due_at_ms.max(now), TODO_ORIGIN)
    } else {
        let expr = Expr::parse(&request.expression, &request.time_zone).map_err(bad)?;
        let next = expr.next_after(now).ok_or_else(|| {
            bad(format!(
                "`{}` has no fire time after now",
                request.expression
            ))
        })?;
        (next, ORIGIN)
    };
    let conversation = match request.conversation_id.as_str() {
        "" => ConversationId::DEFAULT,
        id => id,
    };
    let service = match request.service_run_id.as_str() {
        "" => None,
        id => Some(
            id.parse::<RunId>()
                .map_err(|e| bad(format!("service_run_id: {e}")))?,
        ),
    };
    if service.is_some() && request.todo {
        return Err(bad("a service's schedule is not a todo".into()));
    }
    let schedule_id = match request.schedule_id.as_str() {
        "" => uuid::Uuid::now_v7(),
        id => uuid::Uuid::try_parse(id)
            .map_err(|_| bad(format!("schedule_id {id:?} is not a UUID")))?,
    }
    .to_string();
    Goal::new(&request.goal, conversation, request.timeout_ms, origin)
        .and_then(|goal| goal.with_payload(&request.payload))
        .and_then(|goal| match service {
            Some(parent) => goal.woken(parent, dispatch_runlog::service::WAKE_SCHEDULE),
            None => Ok(goal),
        })
        .map_err(|e| bad(format!("{}: {e}", e.code())))?;
    if shared.book().len() >= MAX_SCHEDULES {
        return Err(bad(format!(
            "there are {MAX_SCHEDULES} schedules already; remove some first"
        )));
    }
    let schedule = Schedule {
        schedule_id,
        service_run_id: request.service_run_id.clone(),
        expression: request
            .expression
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        time_zone: match request.time_zone.trim() {
            "" => "UTC".to_owned(),
            zone => zone.to_owned(),
        },
        goal: request.goal.trim().to_owned(),
        conversation_id: conversation.to_owned(),
        payload: request.payload.clone(),
        // Stored as what they mean: unspecified is `skip` for both.
        missed: match request.missed() {
            MissedFires::Unspecified => MissedFires::Skip,
            missed => missed,
        } as i32,
        overlap: match request.overlap() {
            Overlap::Unspecified => Overlap::Skip,
            overlap => overlap,
        } as i32,
        timeout_ms: request.timeout_ms,
        todo: request.todo,
        next_fire_at_ms: next,
        created_at_ms: now,
        created_by: dispatch_runlog::one_line(&request.created_by, MAX_WHO_CHARS),
        ..Default::default()
    };
    // Room for what firing adds (a run id, times, counters) under the bucket's limit.
    let size = schedule.encoded_len() + 1024;
    if size > dispatch_bus::streams::MAX_SCHEDULE_BYTES as usize {
        return Err(bad(format!(
            "the schedule is {size} bytes with room to fire; at most {} (shorten the goal or \
             the payload)",
            dispatch_bus::streams::MAX_SCHEDULE_BYTES
        )));
    }
    let revision = match shared
        .schedules
        .create(&schedule.schedule_id, schedule.encode_to_vec().into())
        .await
    {
        Ok(revision) => revision,
        // Asked again (a retry): the one stored stands, if it is this one.
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            return same_as_stored(shared, &schedule).await;
        }
        Err(e) => {
            return Err(QueryError::Unavailable(format!(
                "the schedule was not stored: {e}"
            )));
        }
    };
    tracing::info!(
        schedule_id = schedule.schedule_id,
        expression = schedule.expression,
        "schedule added"
    );
    shared.hold(
        &schedule.schedule_id,
        Some((schedule.clone(), revision)),
        revision,
    );
    Ok(schedule)
}

/// The stored schedule with `wanted`'s id, if it asks for what `wanted` asks for.
async fn same_as_stored(shared: &Shared, wanted: &Schedule) -> Reply<Schedule> {
    let taken = || {
        QueryError::BadRequest(format!(
            "schedule {} exists and is another schedule",
            wanted.schedule_id
        ))
    };
    let entry = shared
        .schedules
        .entry(&wanted.schedule_id)
        .await
        .map_err(|e| QueryError::Unavailable(format!("read schedule: {e}")))?
        .filter(|entry| entry.operation == kv::Operation::Put)
        .ok_or_else(taken)?;
    let stored = Schedule::decode(entry.value.as_ref()).map_err(|_| taken())?;
    let same = stored.service_run_id == wanted.service_run_id
        && stored.expression == wanted.expression
        && stored.time_zone == wanted.time_zone
        && stored.goal == wanted.goal
        && stored.payload == wanted.payload;
    if same { Ok(stored) } else { Err(taken()) }
}

fn find(shared: &Shared, id: &str) -> Result<(Schedule, u64), QueryError> {
    shared.book().find(id).map_err(|lookup| match lookup {
        Lookup::None => QueryError::NotFound(format!("no schedule matches {id:?}")),
        Lookup::Ambiguous(ids) => QueryError::Ambiguous(format!(
            "{id:?} matches more than one schedule ({}…); give more of the id",
            ids.join(", ")
        )),
    })
}

fn get(shared: &Shared, request: ScheduleIdRequest) -> Reply<Schedule> {
    find(shared, &request.schedule_id).map(|(schedule, _)| schedule)
}

fn list(shared: &Shared, request: ListSchedulesRequest) -> Reply<ListSchedulesResponse> {
    let limit = request.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(QueryError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    // A schedule can be tens of KiB of JSON (a goal and a payload full of escapes):
    // pages are cut by size too, so no answer outgrows a message.
    let (mut schedules, mut next) = shared.book().page(request.after.as_deref(), limit as usize);
    let mut bytes = 0;
    if let Some(cut) = schedules.iter().position(|s| {
        bytes += serde_json::to_vec(s).map_or(REPLY_BUDGET, |json| json.len() + 1);
        bytes > REPLY_BUDGET
    }) {
        schedules.truncate(cut.max(1));
        next = schedules.last().map(|s| s.schedule_id.clone());
    }
    Ok(ListSchedulesResponse { schedules, next })
}

/// The most bytes of JSON one answer carries: well inside NATS's default 1 MiB.
const REPLY_BUDGET: usize = 512 * 1024;

async fn remove(shared: &Shared, request: ScheduleIdRequest) -> Reply<Schedule> {
    let (schedule, _) = find(shared, &request.schedule_id)?;
    shared
        .schedules
        .delete(&schedule.schedule_id)
        .await
        .map_err(|e| QueryError::Unavailable(format!("the schedule was not removed: {e}")))?;
    tracing::info!(schedule_id = schedule.schedule_id, "schedule removed");
    Ok(schedule)
}

/// Pauses or resumes a schedule. A resumed schedule fires next at its first time after
/// now: the times it was paused through are not missed fires.
async fn pause(shared: &Shared, request: ScheduleIdRequest, paused: bool) -> Reply<Schedule> {
    let (mut schedule, mut revision) = find(shared, &request.schedule_id)?;
    for _ in 0..MAX_RACES {
        if schedule.paused == paused {
            return Ok(schedule);
        }
        let mut changed = schedule.clone();
        changed.paused = paused;
        if !paused && !changed.todo {
            let expr = Expr::parse(&changed.expression, &changed.time_zone)
                .map_err(QueryError::BadRequest)?;
            changed.next_fire_at_ms = expr.next_after(now_ms()).ok_or_else(|| {
                QueryError::BadRequest(format!(
                    "`{}` has no fire time after now; remove the schedule instead",
                    changed.expression
                ))
            })?;
        }
        match shared
            .schedules
            .update(
                &changed.schedule_id,
                changed.encode_to_vec().into(),
                revision,
            )
            .await
        {
            Ok(new) => {
                shared.hold(&changed.schedule_id, Some((changed.clone(), new)), new);
                return Ok(changed);
            }
            Err(e)
                if e.kind()
                    == dispatch_bus::async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision =>
            {
                let entry = shared
                    .schedules
                    .entry(&changed.schedule_id)
                    .await
                    .map_err(|e| QueryError::Unavailable(e.to_string()))?
                    .filter(|e| e.operation == dispatch_bus::async_nats::jetstream::kv::Operation::Put)
                    .ok_or_else(|| QueryError::NotFound("the schedule was removed".into()))?;
                schedule = Schedule::decode(entry.value.as_ref())
                    .map_err(|e| QueryError::Unavailable(e.to_string()))?;
                revision = entry.revision;
            }
            Err(e) => return Err(QueryError::Unavailable(e.to_string())),
        }
    }
    Err(QueryError::Unavailable(
        "the schedule kept changing under this request; ask again".into(),
    ))
}
