//! `dispatch deliveries [ls] | show RUN | resend RUN… | resend --given-up`: the results
//! POSTed to goals' callbacks, as the streamer's record has them.
//!
//! The record (`dispatch.delivery.<run_id>`, stream `DISPATCH_DELIVERIES`) holds every
//! try, written by the streamer alone. `ls` reads the newest entry of each run's record
//! (one per run, from an ordered consumer that starts at the last message per subject),
//! `show` every entry of one run. `resend` queues a delivery again: a `DeliverRun` of the
//! record's next round on `dispatch.cmd.deliver`, whose tries start at once and follow
//! the streamer's schedule again; the streamer records them, so the record stays append
//! only. It is refused for a run that named no callback, has not ended, or was
//! delivered, and while no `webhook-signing` secret could sign the result.

use std::time::Duration;

use dispatch_bus::async_nats::jetstream::consumer::{DeliverPolicy, pull};
use dispatch_bus::{Bus, RunId, streams, subject};
use dispatch_proto::command::v1::{DeliverRun, DeliveryAttempt};
use dispatch_proto::run::v1::run_event::Body;
use dispatch_runlog::RunLog;
use futures::StreamExt as _;
use prost::Message as _;

use crate::format::{age, clip, plain_table, utc};
use crate::{Failure, Format, exit};

/// How long the record's stream may stay silent while it is read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Subcommand)]
pub enum DeliveriesCommand {
    /// Every run's delivery as its record has it now (the default).
    Ls(ListArgs),
    /// Every try of one run's delivery, oldest first.
    Show {
        run: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Queue a delivery again: its tries start at once and follow the streamer's
    /// schedule again. For a given-up delivery, or a pending one not worth waiting for;
    /// prints the run ids queued.
    Resend {
        #[arg(required_unless_present = "given_up")]
        runs: Vec<String>,
        /// Every delivery that is given up now.
        #[arg(long, conflicts_with = "runs")]
        given_up: bool,
        /// Who is asking; default: $USER.
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only deliveries in this state.
    #[arg(long, value_enum)]
    state: Option<State>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

impl Default for ListArgs {
    fn default() -> Self {
        Self {
            state: None,
            format: Format::Table,
        }
    }
}

/// Where a delivery is, by its record's newest entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Delivered,
    /// Tried and failed, with another try due.
    Pending,
    /// Tried as often as the schedule allows, or never callable: waits for `resend`.
    GivenUp,
}

impl State {
    fn of(last: &DeliveryAttempt) -> Self {
        if last.delivered {
            State::Delivered
        } else if last.gave_up {
            State::GivenUp
        } else {
            State::Pending
        }
    }

    fn words(self) -> &'static str {
        match self {
            State::Delivered => "delivered",
            State::Pending => "pending",
            State::GivenUp => "given up",
        }
    }
}

/// One run's delivery, as `ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub run_id: String,
    pub state: State,
    /// 1 for the first round of tries, each re-send the next.
    pub round: u32,
    /// Tries made in this round, and how many it has at most.
    pub tries: u32,
    pub max_tries: u32,
    /// The last try's HTTP status; 0 when no answer came.
    pub last_status: u32,
    pub last_error: String,
    pub last_try_at_unix_ms: i64,
    /// When the next try is due (pending only).
    pub next_try_at_unix_ms: Option<i64>,
    /// The callback, without its query string.
    pub url: String,
}

impl Listed {
    fn of(last: &DeliveryAttempt) -> Self {
        Self {
            run_id: last.run_id.clone(),
            state: State::of(last),
            round: last.round.max(1),
            tries: last.attempt,
            max_tries: last.tries,
            last_status: last.status,
            last_error: last.error.clone(),
            last_try_at_unix_ms: last.at_unix_ms,
            next_try_at_unix_ms: (last.next_try_unix_ms > 0).then_some(last.next_try_unix_ms),
            url: last.url.clone(),
        }
    }
}

pub async fn run(
    bus: &Bus,
    log: &RunLog,
    command: Option<DeliveriesCommand>,
    list: ListArgs,
) -> Result<u8, Failure> {
    match command.unwrap_or(DeliveriesCommand::Ls(list)) {
        DeliveriesCommand::Ls(ListArgs { state, format }) => {
            let mut listed: Vec<Listed> = every_last(bus)
                .await?
                .iter()
                .map(Listed::of)
                .filter(|l| state.is_none_or(|s| l.state == s))
                .collect();
            listed.sort_by_key(|l| std::cmp::Reverse(l.last_try_at_unix_ms));
            match format {
                Format::Json => crate::terminal::json(&listed),
                Format::Table => out!("{}", table(&listed, crate::format::now_ms())),
            }
            Ok(exit::DONE)
        }
        DeliveriesCommand::Show { run, format } => {
            let run_id = crate::resolve(bus, &run).await?;
            let tries = record(bus, &run_id).await?;
            if tries.is_empty() {
                return Err(Failure::new(format!(
                    "run {run_id} has no delivery record: it named no callback_url, has not \
                     ended, or its first try has not been made yet"
                )));
            }
            match format {
                Format::Json => crate::terminal::json(&tries),
                Format::Table => out!("{}", tries_table(&tries)),
            }
            Ok(exit::DONE)
        }
        DeliveriesCommand::Resend { runs, given_up, by } => {
            let by = crate::gate::person(by);
            let ids: Vec<RunId> = if given_up {
                every_last(bus)
                    .await?
                    .iter()
                    .filter(|last| State::of(last) == State::GivenUp)
                    .filter_map(|last| last.run_id.parse().ok())
                    .collect()
            } else {
                let mut ids = Vec::new();
                for run in &runs {
                    ids.push(crate::resolve(bus, run).await?);
                }
                ids
            };
            if !ids.is_empty() {
                // Queued again with nothing to sign it, it would only be given up again.
                dispatch_secrets::check_signing(bus)
                    .await
                    .map_err(|e| Failure::new(e.to_string()))?;
            }
            for run_id in &ids {
                let round = resend(bus, log, run_id, &by).await?;
                outln!("{run_id}");
                errln!("run {run_id}: delivery queued again (round {round})");
            }
            if given_up && ids.is_empty() {
                errln!("no delivery is given up");
            }
            Ok(exit::DONE)
        }
    }
}

/// Queues `run_id`'s delivery again as the record's next round; returns the round.
async fn resend(bus: &Bus, log: &RunLog, run_id: &RunId, by: &str) -> Result<u32, Failure> {
    let requested = match log.first_event(run_id).await?.and_then(|e| e.event.body) {
        Some(Body::RunRequested(requested)) => requested,
        _ => return Err(Failure::new(format!("run {run_id} has no request"))),
    };
    if requested.callback_url.is_empty() {
        return Err(Failure::new(format!(
            "run {run_id} named no callback_url: there is nothing to deliver"
        )));
    }
    if !log.handle_tail(*run_id).await?.is_finished() {
        return Err(Failure::new(format!(
            "run {run_id} has not ended; its result is delivered when it does"
        )));
    }
    let last = last(bus, run_id).await?;
    if let Some(delivered) = last.as_ref().filter(|l| l.delivered) {
        return Err(Failure::new(format!(
            "run {run_id}'s result was delivered (HTTP {}, try {} at {}); nothing to re-send",
            delivered.status,
            delivered.attempt,
            utc(delivered.at_unix_ms)
        )));
    }
    let round = last.map_or(1, |l| l.round.max(1)) + 1;
    let command = DeliverRun {
        run_id: run_id.to_string(),
        round,
        requested_by: by.to_owned(),
    };
    bus.append(
        subject::cmd::deliver(),
        &format!("deliver-{run_id}-{round}"),
        None,
        command.encode_to_vec().into(),
    )
    .await?;
    Ok(round)
}

/// The newest entry of every run's record.
async fn every_last(bus: &Bus) -> Result<Vec<DeliveryAttempt>, Failure> {
    let unreadable =
        |e: &dyn std::fmt::Display| Failure::new(format!("cannot read the delivery record: {e}"));
    let mut stream = bus
        .jetstream()
        .get_stream(streams::DELIVERIES)
        .await
        .map_err(|e| unreadable(&e))?;
    if stream
        .info()
        .await
        .map_err(|e| unreadable(&e))?
        .state
        .messages
        == 0
    {
        return Ok(Vec::new());
    }
    let mut messages = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject::DELIVERIES_ALL.to_owned(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| unreadable(&e))?
        .messages()
        .await
        .map_err(|e| unreadable(&e))?;
    let mut every = Vec::new();
    loop {
        let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(unreadable(&e)),
            Ok(None) => return Ok(every),
            Err(_) => return Err(unreadable(&"no answer within 10s")),
        };
        let pending = message.info().map_or(0, |i| i.pending);
        // An entry that does not decode is not a try anyone made: skipped.
        if let Ok(attempt) = DeliveryAttempt::decode(&message.payload[..]) {
            every.push(attempt);
        }
        if pending == 0 {
            return Ok(every);
        }
    }
}

/// Every entry of `run_id`'s record, oldest first.
async fn record(bus: &Bus, run_id: &RunId) -> Result<Vec<DeliveryAttempt>, Failure> {
    let reader = reader(bus).await?;
    let on = subject::delivery(run_id);
    let mut tries = Vec::new();
    let mut from = 1;
    while let Some(message) = reader.next(on.as_str(), from).await? {
        from = message.sequence + 1;
        if let Ok(attempt) = DeliveryAttempt::decode(&message.payload[..]) {
            tries.push(attempt);
        }
    }
    Ok(tries)
}

/// The newest entry of `run_id`'s record.
async fn last(bus: &Bus, run_id: &RunId) -> Result<Option<DeliveryAttempt>, Failure> {
    let message = reader(bus)
        .await?
        .last(subject::delivery(run_id).as_str())
        .await?;
    Ok(message.and_then(|m| DeliveryAttempt::decode(&m.payload[..]).ok()))
}

async fn reader(bus: &Bus) -> Result<dispatch_bus::reads::Reader, Failure> {
    let stream = bus
        .jetstream()
        .get_stream(streams::DELIVERIES)
        .await
        .map_err(|e| Failure::new(format!("cannot read the delivery record: {e}")))?;
    Ok(dispatch_bus::reads::Reader::new(stream))
}

/// `dispatch deliveries` as a table, newest try first.
pub fn table(listed: &[Listed], now_ms: i64) -> String {
    let rows = listed.iter().map(|l| {
        let tries = match l.round {
            1 => of(l.tries, l.max_tries),
            round => format!("{} (round {round})", of(l.tries, l.max_tries)),
        };
        [
            dispatch_bus::short_id(&l.run_id).to_owned(),
            l.state.words().to_owned(),
            tries,
            answer(l.last_status, &l.last_error),
            format!("{} ago", age(l.last_try_at_unix_ms, now_ms)),
            l.next_try_at_unix_ms
                .map_or_else(|| "-".to_owned(), |at| format!("in {}", age(now_ms, at))),
            clip(&l.url, 60),
        ]
    });
    plain_table(
        [
            "RUN ID",
            "STATE",
            "TRIES",
            "LAST ANSWER",
            "LAST TRY",
            "NEXT TRY",
            "CALLBACK",
        ],
        rows,
    )
}

/// `dispatch deliveries show RUN` as a table, a try a line.
pub fn tries_table(tries: &[DeliveryAttempt]) -> String {
    let rows = tries.iter().map(|t| {
        let outcome = if t.delivered {
            "delivered"
        } else if t.gave_up {
            "given up"
        } else {
            "failed"
        };
        [
            t.round.max(1).to_string(),
            of(t.attempt, t.tries),
            utc(t.at_unix_ms),
            outcome.to_owned(),
            answer(t.status, &t.error),
            if t.next_try_unix_ms > 0 {
                utc(t.next_try_unix_ms)
            } else {
                "-".to_owned()
            },
            if t.requested_by.is_empty() {
                "-".to_owned()
            } else {
                clip(&t.requested_by, 40)
            },
        ]
    });
    plain_table(
        [
            "ROUND",
            "TRY",
            "AT",
            "OUTCOME",
            "ANSWER",
            "NEXT TRY",
            "RE-SENT BY",
        ],
        rows,
    )
}

/// `3/8`: the try and how many the round has (`3` from a record that does not say).
fn of(attempt: u32, tries: u32) -> String {
    if tries == 0 {
        attempt.to_string()
    } else {
        format!("{attempt}/{tries}")
    }
}

/// The HTTP status, or why there was none.
fn answer(status: u32, error: &str) -> String {
    match (status, error) {
        (0, "") => "-".to_owned(),
        (0, error) => clip(error, 80),
        (status, _) => status.to_string(),
    }
}
