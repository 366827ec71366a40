//! `dispatch schedule add|ls|rm|pause|resume`: goals started on cron expressions, kept
//! by the scheduler service (`dispatch.req.schedule.*`), which checks every change and
//! answers with the schedule as it is afterwards.

use std::time::Duration;

use dispatch_bus::{Bus, subject};
use dispatch_proto::api::v1::{
    AddScheduleRequest, ListSchedulesRequest, ListSchedulesResponse, MissedFires, Overlap,
    Schedule, ScheduleIdRequest,
};
use dispatch_proto::api::{MAX_PAGE, QueryError, Reply};

use crate::{Failure, Format, exit};

/// How long the scheduler has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Subcommand)]
pub enum ScheduleCommand {
    /// Start GOAL on a cron expression: 5 fields (`*/15 * * * *`), 6 with seconds first
    /// (`*/30 * * * * *`) or 7 with a year. Prints the schedule's id.
    Add {
        /// The cron expression (quote it).
        expression: String,
        /// What each fire's run is asked to do.
        goal: String,
        /// The IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        #[arg(long, default_value = "default")]
        conversation: String,
        /// Data each run gets beside its goal.
        #[arg(long, default_value = "")]
        payload: String,
        /// Fire times missed while no scheduler ran: `skip` fires once for the latest,
        /// `all` fires each (at most 100).
        #[arg(long, value_enum, default_value_t = Missed::Skip)]
        missed: Missed,
        /// A fire while the previous run still goes: `skip` it, `queue` it until that
        /// run ends, or `allow` it.
        #[arg(long, value_enum, default_value_t = Overlapping::Skip)]
        overlap: Overlapping,
        /// Each run's kill switch, e.g. 10m (default 35m).
        #[arg(long, value_parser = crate::parse_duration)]
        timeout: Option<Duration>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Every schedule: its next and last fire, and how many runs it started.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a schedule (its id, or a unique prefix of it). Runs it started stay.
    Rm { schedule: String },
    /// Stop firing a schedule until it is resumed.
    Pause { schedule: String },
    /// Fire a paused schedule again, from its next time after now.
    Resume { schedule: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Missed {
    Skip,
    All,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Overlapping {
    Skip,
    Queue,
    Allow,
}

pub async fn run(bus: &Bus, command: ScheduleCommand) -> Result<u8, Failure> {
    match command {
        ScheduleCommand::Add {
            expression,
            goal,
            tz,
            conversation,
            payload,
            missed,
            overlap,
            timeout,
            quiet,
        } => {
            let request = AddScheduleRequest {
                expression,
                time_zone: tz,
                goal,
                conversation_id: conversation,
                payload,
                missed: match missed {
                    Missed::Skip => MissedFires::Skip,
                    Missed::All => MissedFires::All,
                } as i32,
                overlap: match overlap {
                    Overlapping::Skip => Overlap::Skip,
                    Overlapping::Queue => Overlap::Queue,
                    Overlapping::Allow => Overlap::Allow,
                } as i32,
                timeout_ms: timeout.map_or(0, |t| t.as_millis() as u64),
                created_by: crate::gate::person(None),
                ..Default::default()
            };
            let schedule: Schedule = ask(bus, subject::schedule::add(), &request).await?;
            if quiet {
                outln!("{}", schedule.schedule_id);
            } else {
                outln!(
                    "{}  next fire {}",
                    schedule.schedule_id,
                    when(schedule.next_fire_at_ms)
                );
            }
            Ok(exit::DONE)
        }
        ScheduleCommand::Ls { format } => {
            let all: Vec<Schedule> = every(bus).await?.into_iter().filter(|s| !s.todo).collect();
            match format {
                Format::Json => crate::terminal::json(&all),
                Format::Table => out!("{}", table(&all)),
            }
            Ok(exit::DONE)
        }
        ScheduleCommand::Rm { schedule } => one(bus, subject::schedule::rm(), schedule).await,
        ScheduleCommand::Pause { schedule } => one(bus, subject::schedule::pause(), schedule).await,
        ScheduleCommand::Resume { schedule } => {
            one(bus, subject::schedule::resume(), schedule).await
        }
    }
}

/// Every schedule and todo, page after page.
pub(crate) async fn every(bus: &Bus) -> Result<Vec<Schedule>, Failure> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page: ListSchedulesResponse = ask(
            bus,
            subject::schedule::list(),
            &ListSchedulesRequest {
                limit: Some(MAX_PAGE),
                after,
            },
        )
        .await?;
        all.extend(page.schedules);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(all),
        }
    }
}

async fn one(bus: &Bus, to: subject::Subject, schedule_id: String) -> Result<u8, Failure> {
    let schedule: Schedule = ask(bus, to, &ScheduleIdRequest { schedule_id }).await?;
    outln!("{}", schedule.schedule_id);
    Ok(exit::DONE)
}

pub(crate) async fn ask<Q, R>(bus: &Bus, to: subject::Subject, request: &Q) -> Result<R, Failure>
where
    Q: serde::Serialize,
    R: serde::de::DeserializeOwned,
{
    let reply: Reply<R> = bus
        .request_json(to, request, TIMEOUT)
        .await
        .map_err(|e| Failure::new(format!("{e}; is the scheduler running (`dispatch up`)?")))?;
    reply.map_err(|e| match e {
        QueryError::BadRequest(m) => Failure::new(format!("{m}; nothing changed")),
        other => Failure::new(other.to_string()),
    })
}

/// `2026-11-22T09:00:00Z`, or `never`.
pub(crate) fn when(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    crate::format::utc(unix_ms)
}

pub(crate) fn table(schedules: &[Schedule]) -> String {
    let rows = schedules.iter().map(|s| {
        [
            dispatch_bus::short_id(&s.schedule_id).to_owned(),
            s.expression.clone(),
            s.time_zone.clone(),
            if s.paused {
                "-".into()
            } else {
                when(s.next_fire_at_ms)
            },
            when(s.last_fired_at_ms),
            s.fires.to_string(),
            if s.paused { "paused" } else { "active" }.to_owned(),
            crate::format::clip(&s.goal, 48),
        ]
    });
    crate::format::plain_table(
        [
            "ID",
            "EXPRESSION",
            "ZONE",
            "NEXT",
            "LAST",
            "RUNS",
            "STATE",
            "GOAL",
        ],
        rows,
    )
}
