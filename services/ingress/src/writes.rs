//! Whether JetStream is storing writes now, as `/healthz` reports it.
//!
//! A connected NATS is not a working one: when the disk under nats-server's store
//! fills, the server keeps answering reads and info requests while it refuses writes
//! ("insufficient resources") or stops acknowledging them on a stream whose write
//! failed. Two signals tell: a probe written every [`PROBE_EVERY`] to `DISPATCH_PROBE`,
//! and the outcome of the last goal this copy tried to store (a stream can fail while
//! the probe's does not).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dispatch_bus::Bus;
use dispatch_bus::health::{WriteRefused, probe_writes};
use tokio_util::sync::CancellationToken;

/// How often the probe is written.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// How long a goal that was not stored keeps `/healthz` degraded. Bounded, so that a
/// copy taken out of a load balancer, which then gets no goals to prove itself with,
/// comes back; a stream that still fails fails the next goal again.
pub const GOAL_FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// What an operator should do when writes are refused.
pub const HINT: &str = "nats-server is not storing writes, most often because the disk under \
its store is (or was) full. Free space there; `dispatch up` restarts its own nats-server once \
space comes back, an external nats-server must be restarted (`nats-server --signal stop`, \
then start it again)";

/// While writes fail, how often one goal is tried all the same.
pub const CANARY_EVERY: Duration = Duration::from_secs(10);

/// How a goal is to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// As usual, trying again after a failure.
    Tries,
    /// Once: writes are failing, and this goal tells whether they still do.
    Once,
}

#[derive(Debug, Default)]
pub struct Writes {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    probe: Option<Probe>,
    /// Goals not stored: since when, the last failure, and why (cleared by one stored
    /// goal, forgotten [`GOAL_FAILURE_MEMORY`] after the last failure).
    goals_failing: Option<GoalsFailing>,
    /// When a goal was last let through to be tried while writes were failing.
    tried: Option<Instant>,
}

#[derive(Debug)]
struct GoalsFailing {
    since: Instant,
    last: Instant,
    why: String,
    /// Goals answered 503 since.
    goals: u64,
}

#[derive(Debug)]
struct Probe {
    at: Instant,
    outcome: Result<(), WriteRefused>,
}

/// The `/healthz` view of writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Writes are known to be stored (the last probe was, and goals are).
    pub accepting: bool,
    /// Why not, in words.
    pub problem: Option<String>,
    /// How long ago the last probe finished.
    pub probed_ago: Option<Duration>,
}

impl Writes {
    /// A goal was stored: an outage of goal writes, if there was one, is over (and
    /// said once, with how many goals it turned away).
    pub fn goal_stored(&self) {
        if let Some(failing) = self.lock().goals_failing.take() {
            tracing::info!(
                goals = failing.goals,
                secs = failing.since.elapsed().as_secs(),
                "goals are stored again"
            );
        }
    }

    /// A goal could not be stored. Said once when goals start failing, not per goal:
    /// during an outage every goal fails the same way.
    pub fn goal_not_stored(&self, why: String) {
        let mut state = self.lock();
        let now = Instant::now();
        let ongoing = state
            .goals_failing
            .take()
            .filter(|f| f.last.elapsed() < GOAL_FAILURE_MEMORY);
        if ongoing.is_none() {
            tracing::warn!(
                error = why,
                "goals are not being stored; answering 503 until they are"
            );
        }
        let (since, goals) = ongoing.map_or((now, 0), |f| (f.since, f.goals));
        state.goals_failing = Some(GoalsFailing {
            since,
            last: now,
            why,
            goals: goals + 1,
        });
    }

    fn probed(&self, outcome: Result<(), WriteRefused>) {
        let mut state = self.lock();
        let was_refused = matches!(
            state.probe,
            Some(Probe {
                outcome: Err(WriteRefused::Refused(_)),
                ..
            })
        );
        match &outcome {
            Err(WriteRefused::Refused(why)) if !was_refused => {
                tracing::error!(reason = %why, "JetStream refuses writes; {HINT}");
            }
            Ok(()) if was_refused => tracing::info!("JetStream stores writes again"),
            _ => {}
        }
        state.probe = Some(Probe {
            at: Instant::now(),
            outcome,
        });
    }

    /// Whether to try storing a goal now, and how; `Err` says why not. While writes
    /// are known to fail — the last probe (within three probe intervals) was refused,
    /// or goals have failed and none was stored since — a goal is answered at once
    /// instead of after every try to store it has timed out; one goal per
    /// [`CANARY_EVERY`] is still tried, once, so that the goals' own stream coming back
    /// is seen (the probe's may never have failed).
    pub fn admit(&self) -> Result<Admit, String> {
        let mut state = self.lock();
        let probe = match &state.probe {
            Some(Probe {
                at,
                outcome: Err(WriteRefused::Refused(why)),
            }) if at.elapsed() < 3 * PROBE_EVERY => {
                Some(format!("a probe write was refused: {why}"))
            }
            _ => None,
        };
        let Some(why) = probe.or_else(|| goals_failing(&state)) else {
            return Ok(Admit::Tries);
        };
        match state.tried {
            Some(at) if at.elapsed() < CANARY_EVERY => Err(why),
            _ => {
                state.tried = Some(Instant::now());
                Ok(Admit::Once)
            }
        }
    }

    pub fn report(&self) -> Report {
        let state = self.lock();
        let probe_problem = match &state.probe {
            None => Some("not probed yet".to_owned()),
            Some(Probe {
                outcome: Ok(()), ..
            }) => None,
            Some(Probe {
                outcome: Err(e), ..
            }) => Some(format!("a probe write was not stored: {e}")),
        };
        let goal_problem = goals_failing(&state);
        let problem = match (probe_problem, goal_problem) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        Report {
            accepting: problem.is_none(),
            problem,
            probed_ago: state.probe.as_ref().map(|p| p.at.elapsed()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data, whole after every assignment: a panic elsewhere
        // while holding the lock leaves nothing half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why goals are failing, if a goal was not stored within [`GOAL_FAILURE_MEMORY`] and
/// none has been since.
fn goals_failing(state: &State) -> Option<String> {
    state
        .goals_failing
        .as_ref()
        .filter(|f| f.last.elapsed() < GOAL_FAILURE_MEMORY)
        .map(|f| {
            format!(
                "goals have not been stored for {}s: {}",
                f.since.elapsed().as_secs(),
                f.why
            )
        })
}

/// Writes the probe every [`PROBE_EVERY`] until `shutdown`.
pub async fn watch(
    bus: Bus,
    service: &str,
    writes: std::sync::Arc<Writes>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => writes.probed(probe_writes(&bus, service).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn while_writes_fail_goals_are_answered_at_once_but_one_per_interval_is_tried() {
        let writes = Writes::default();
        assert_eq!(writes.admit(), Ok(Admit::Tries));
        writes.probed(Err(WriteRefused::Refused("insufficient resources".into())));
        assert_eq!(writes.admit(), Ok(Admit::Once), "the first is tried, once");
        let why = writes.admit().unwrap_err();
        assert!(why.contains("insufficient resources"), "{why}");
        writes.probed(Err(WriteRefused::Disconnected));
        assert_eq!(writes.admit(), Ok(Admit::Tries), "not a JetStream refusal");
        // The goals' stream fails while the probe's does not.
        writes.probed(Ok(()));
        writes.goal_not_stored("timed out".into());
        assert!(writes.admit().unwrap_err().contains("timed out"));
        writes.goal_stored();
        assert_eq!(writes.admit(), Ok(Admit::Tries));
    }

    #[test]
    fn a_refused_probe_or_unstored_goals_mean_not_accepting() {
        let writes = Writes::default();
        assert!(!writes.report().accepting, "healthy before the first probe");
        writes.probed(Ok(()));
        assert_eq!(writes.report().problem, None);

        writes.goal_not_stored("timed out".into());
        let report = writes.report();
        assert!(!report.accepting);
        assert!(report.problem.unwrap().contains("timed out"));
        writes.goal_stored();
        assert!(writes.report().accepting);

        writes.probed(Err(WriteRefused::Refused("insufficient resources".into())));
        let report = writes.report();
        assert!(!report.accepting);
        assert!(report.problem.unwrap().contains("insufficient resources"));
        writes.probed(Ok(()));
        assert!(writes.report().accepting);
    }
}
