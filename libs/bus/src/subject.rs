//! Every subject Dispatch uses, built here and nowhere else.
//!
//! Layout:
//! - `dispatch.goal.<run_id>`: a submitted goal (stream `DISPATCH_GOALS`);
//! - `dispatch.run.<account>.<run_id>.<role>`: one run's event log (stream
//!   `DISPATCH_RUNS`), each writer role appending on its own subject (see [`LogWriter`]);
//!   the stream keeps the run's events in one order across the three;
//! - `dispatch.feed.<account>.<run_id>`: the events of that log the server stored,
//!   republished with their stream sequences and stored subjects (written by the
//!   server only);
//! - `dispatch.cmd.<kind>`: commands on the work-queue stream `DISPATCH_COMMANDS`;
//! - `dispatch.ask.<kind>`: asks to carry out a step the run's log requests (core
//!   requests to a queue group, stored nowhere: see `ask`);
//! - `dispatch.ledger.drain.<conversation>`: feedback drains (stream `DISPATCH_LEDGER`);
//! - `dispatch.query.<name>`: core request/reply answered by the ledger;
//! - `dispatch.conv.<account>.<agent>.<conv_token>`: a conversation's stream of output
//!   chunks (stream `DISPATCH_CONVERSATIONS`, written by the streamer);
//! - `dispatch.health.<service>[.<instance>]`: core request/reply health checks.

pub use async_nats::Subject;

use crate::{ConversationId, RunId};

const RUN_PREFIX: &str = "dispatch.run.";

/// The account every subject names until tenancy gives each its own.
pub const DEFAULT_ACCOUNT: &str = "default";

/// All run logs, for stream declaration and projections: account, run, writer role.
pub const RUNS_ALL: &str = "dispatch.run.*.*.*";
/// All submitted goals.
pub const GOALS_ALL: &str = "dispatch.goal.*";
const GOAL_PREFIX: &str = "dispatch.goal.";

/// The subject a run's goal is submitted on.
pub fn goal(run_id: &RunId) -> Subject {
    Subject::from(format!("{GOAL_PREFIX}{run_id}"))
}

/// The run id a goal subject belongs to, if it is one.
pub fn run_id_of_goal(subject: &str) -> Option<RunId> {
    subject.strip_prefix(GOAL_PREFIX)?.parse().ok()
}
/// All commands.
pub const COMMANDS_ALL: &str = "dispatch.cmd.*";
/// All ledger-owned events.
pub const LEDGER_ALL: &str = "dispatch.ledger.>";

/// Who appends to run logs: each role on a subject of its own under the run, which only
/// that role's identity may publish to, so the server itself vouches for who wrote
/// each stored event. Which event kinds each role may write is the run log's rule
/// (`dispatch_runlog::roles`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogWriter {
    Dispatcher,
    Policy,
    Connectors,
}

impl LogWriter {
    pub const ALL: [LogWriter; 3] = [
        LogWriter::Dispatcher,
        LogWriter::Policy,
        LogWriter::Connectors,
    ];

    /// The subject token naming this role.
    pub fn token(self) -> &'static str {
        match self {
            LogWriter::Dispatcher => "dispatcher",
            LogWriter::Policy => "policy",
            LogWriter::Connectors => "connectors",
        }
    }

    pub fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.token() == token)
    }
}

/// A run-log (or feed) subject taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSubject {
    pub account: String,
    pub run_id: RunId,
    pub writer: LogWriter,
}

/// The subject `writer` appends a run's events on.
pub fn run(run_id: &RunId, writer: LogWriter) -> Subject {
    Subject::from(format!(
        "{RUN_PREFIX}{DEFAULT_ACCOUNT}.{run_id}.{}",
        writer.token()
    ))
}

/// Every subject of one run's log (a filter: the run's events from every writer, in
/// the stream's order). It is also the subject an append's expected sequence is
/// checked against (`Nats-Expected-Last-Subject-Sequence-Subject`), so the run keeps
/// one order however many writers append.
pub fn run_log(run_id: &RunId) -> String {
    format!("{RUN_PREFIX}{DEFAULT_ACCOUNT}.{run_id}.*")
}

/// Every run-log subject `writer` may publish to: the publish permission of its
/// identity. Tenancy narrows the account token.
pub fn runs_written_by(writer: LogWriter) -> String {
    format!("{RUN_PREFIX}{DEFAULT_ACCOUNT}.*.{}", writer.token())
}

/// Takes a run-log subject apart; `None` for anything else (another shape, a token
/// that is no run id or no writer role).
pub fn parse_run(subject: &str) -> Option<RunSubject> {
    parse_three(subject.strip_prefix(RUN_PREFIX)?)
}

fn parse_three(rest: &str) -> Option<RunSubject> {
    let mut tokens = rest.split('.');
    let (account, run_id, writer) = (tokens.next()?, tokens.next()?, tokens.next()?);
    if tokens.next().is_some() || account.is_empty() {
        return None;
    }
    Some(RunSubject {
        account: account.to_owned(),
        run_id: run_id.parse().ok()?,
        writer: LogWriter::from_token(writer)?,
    })
}

/// The run id a run-log subject belongs to, if it is one.
pub fn run_id_of(subject: &str) -> Option<RunId> {
    parse_run(subject).map(|s| s.run_id)
}

/// Every run's feed: the server republishes each event it stores on a run's log to
/// `dispatch.feed.<account>.<run_id>`, with headers naming its stream sequence
/// (`Nats-Sequence`) and the subject it was stored on (`Nats-Subject`, which says whose
/// role wrote it); the run's previous event is named by the event itself, in
/// `prev_stream_seq`. Only stored events appear there (a refused append never does),
/// and no identity may publish to it. One literal subject per run, not one per writer:
/// a follower's subscription is then a literal one, which the server files in its
/// subject cache at no cost, where each wildcard subscription made and dropped walks it.
pub const FEEDS_ALL: &str = "dispatch.feed.*.*";
const FEED_PREFIX: &str = "dispatch.feed.";

/// One run's feed, every writer's (see [`FEEDS_ALL`]).
pub fn feed(run_id: &RunId) -> Subject {
    Subject::from(format!("{FEED_PREFIX}{DEFAULT_ACCOUNT}.{run_id}"))
}

/// The run a feed subject belongs to, if it is one.
pub fn feed_run(subject: &str) -> Option<RunId> {
    let rest = subject.strip_prefix(FEED_PREFIX)?;
    let (account, run_id) = rest.split_once('.')?;
    if account.is_empty() || run_id.contains('.') {
        return None;
    }
    run_id.parse().ok()
}

/// The republish destination for the run-log stream:
/// `dispatch.run.<a>.<r>.<w>` → `dispatch.feed.<a>.<r>` (the writer's subject rides
/// along in the `Nats-Subject` header).
pub const FEED_TEMPLATE: &str = "dispatch.feed.{{wildcard(1)}}.{{wildcard(2)}}";

/// Command subjects; each is consumed by exactly one service's durable consumer.
pub mod cmd {
    use super::Subject;

    pub const TOOL: &str = "dispatch.cmd.tool";
    pub const DELIVER: &str = "dispatch.cmd.deliver";
    /// Stop a run: how the front doors, which write no run logs, stop one.
    pub const STOP: &str = "dispatch.cmd.stop";
    /// End a run no goal asked for (the ledger finds them; the dispatcher checks).
    pub const GHOST: &str = "dispatch.cmd.ghost";

    pub fn tool() -> Subject {
        Subject::from_static(TOOL)
    }
    pub fn deliver() -> Subject {
        Subject::from_static(DELIVER)
    }
    pub fn stop() -> Subject {
        Subject::from_static(STOP)
    }
    pub fn ghost() -> Subject {
        Subject::from_static(GHOST)
    }
}

/// Ask subjects (`dispatch_bus::ask`): core requests, stored nowhere, each taken by one
/// copy of its service in the service's queue group.
pub mod ask {
    use super::Subject;

    /// Decide the call a run's log requests (`CheckPolicy`).
    pub const POLICY: &str = "dispatch.ask.policy";
    /// The policy's queue group, for asks as for its requests.
    pub const POLICY_GROUP: &str = super::policy::POLICY_GROUP;
    /// Check the gate of a leaf (`CheckGate`).
    pub const GATE: &str = "dispatch.ask.gate";
    /// The connectors' queue group for asks.
    pub const CONNECTORS_GROUP: &str = "dispatch-connectors";

    pub fn policy() -> Subject {
        Subject::from_static(POLICY)
    }
    pub fn gate() -> Subject {
        Subject::from_static(GATE)
    }
}

/// All drain subjects.
pub const DRAINS_ALL: &str = "dispatch.ledger.drain.*";

/// The subject recording feedback drains of one conversation.
pub fn drain(conversation: &ConversationId) -> Subject {
    Subject::from(format!("dispatch.ledger.drain.{conversation}"))
}

/// The conversation a drain subject belongs to, if it is one.
pub fn conversation_of_drain(subject: &str) -> Option<ConversationId> {
    subject.strip_prefix("dispatch.ledger.drain.")?.parse().ok()
}

/// Conversation streams: chunks of model output and run progress, one subject per
/// conversation, `dispatch.conv.<account>.<agent>.<conv_token>`.
pub mod conv {
    use base64::Engine as _;

    use super::Subject;
    use crate::ConversationId;

    /// Every conversation's subject.
    pub const ALL: &str = "dispatch.conv.>";
    /// The account and agent of every conversation until tenancy lands.
    pub const DEFAULT_ACCOUNT: &str = super::DEFAULT_ACCOUNT;
    pub const DEFAULT_AGENT: &str = "default";

    /// The conversation key as one NATS-safe token: its base64url, without padding.
    pub fn token(conversation: &ConversationId) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(conversation.as_str())
    }

    /// The subject of one conversation's stream.
    pub fn subject(account: &str, agent: &str, conversation: &ConversationId) -> Subject {
        Subject::from(format!(
            "dispatch.conv.{account}.{agent}.{}",
            token(conversation)
        ))
    }

    /// The subject of a conversation of the default account and agent.
    pub fn of(conversation: &ConversationId) -> Subject {
        subject(DEFAULT_ACCOUNT, DEFAULT_AGENT, conversation)
    }

    /// Headers every chunk carries besides `Nats-Msg-Id` (`<event_id>:<index>`): the
    /// run it belongs to, the sequence of the run event it came from and its index among
    /// that event's chunks — together a cursor that grows monotonically within a run, for
    /// core subscribers that dedupe against what they read from the stream.
    pub const RUN_HEADER: &str = "Dispatch-Run-Id";
    pub const RUN_SEQ_HEADER: &str = "Dispatch-Run-Seq";
    pub const INDEX_HEADER: &str = "Dispatch-Chunk";
}

/// Every run's delivery record.
pub const DELIVERIES_ALL: &str = "dispatch.delivery.*";

/// Where the attempts to deliver a run's result to its callback are recorded.
pub fn delivery(run_id: &RunId) -> Subject {
    Subject::from(format!("dispatch.delivery.{run_id}"))
}

/// Where removals of runs from the views are recorded.
pub const REMOVED: &str = "dispatch.ledger.removed";

pub fn removed() -> Subject {
    Subject::from_static(REMOVED)
}

/// Queries the ledger answers (queue group [`QUERY_GROUP`]).
pub mod query {
    use super::Subject;

    /// Queue group every ledger copy joins, so one copy answers each query.
    pub const QUERY_GROUP: &str = "dispatch-ledger";
    /// Every query subject.
    pub const ALL: &str = "dispatch.query.*";
    pub const RUNS: &str = "dispatch.query.runs";
    pub const RUN: &str = "dispatch.query.run";
    pub const TASKS: &str = "dispatch.query.tasks";
    pub const REPLAY: &str = "dispatch.query.replay";
    pub const STATUS: &str = "dispatch.query.status";
    pub const APPROVALS: &str = "dispatch.query.approvals";
    pub const TRANSCRIPT: &str = "dispatch.query.transcript";
    pub const SEARCH: &str = "dispatch.query.search";

    pub fn search() -> Subject {
        Subject::from_static(SEARCH)
    }

    pub fn transcript() -> Subject {
        Subject::from_static(TRANSCRIPT)
    }

    pub fn approvals() -> Subject {
        Subject::from_static(APPROVALS)
    }

    pub fn status() -> Subject {
        Subject::from_static(STATUS)
    }

    pub fn replay() -> Subject {
        Subject::from_static(REPLAY)
    }

    pub fn runs() -> Subject {
        Subject::from_static(RUNS)
    }
    pub fn run() -> Subject {
        Subject::from_static(RUN)
    }
    pub fn tasks() -> Subject {
        Subject::from_static(TASKS)
    }
}

/// The policy document's versions (stream `DISPATCH_POLICY`): the last message is the
/// document in force.
pub const POLICY_DOCUMENT: &str = "dispatch.policy.document";

pub fn policy_document() -> Subject {
    Subject::from_static(POLICY_DOCUMENT)
}

/// Requests the policy service answers (queue group [`POLICY_GROUP`]): changing the
/// document, dry-running a decision, resolving an approval.
pub mod policy {
    use super::Subject;

    /// Queue group every policy copy joins, so one copy answers each request.
    pub const POLICY_GROUP: &str = "dispatch-policy";
    pub const ALL: &str = "dispatch.req.policy.*";
    pub const SET: &str = "dispatch.req.policy.set";
    pub const TEST: &str = "dispatch.req.policy.test";
    pub const RESOLVE: &str = "dispatch.req.policy.resolve";

    pub fn set() -> Subject {
        Subject::from_static(SET)
    }
    pub fn test() -> Subject {
        Subject::from_static(TEST)
    }
    pub fn resolve() -> Subject {
        Subject::from_static(RESOLVE)
    }
}

/// Every write-probe subject (stream `DISPATCH_PROBE`).
/// Managing schedules (`dispatch.req.schedule.*`), answered by one scheduler copy.
pub mod schedule {
    use super::Subject;

    /// The queue group the scheduler copies answer in.
    pub const GROUP: &str = "dispatch-scheduler";
    pub const ALL: &str = "dispatch.req.schedule.*";
    pub const ADD: &str = "dispatch.req.schedule.add";
    pub const GET: &str = "dispatch.req.schedule.get";
    pub const LIST: &str = "dispatch.req.schedule.list";
    pub const RM: &str = "dispatch.req.schedule.rm";
    pub const PAUSE: &str = "dispatch.req.schedule.pause";
    pub const RESUME: &str = "dispatch.req.schedule.resume";

    pub fn add() -> Subject {
        Subject::from_static(ADD)
    }
    pub fn get() -> Subject {
        Subject::from_static(GET)
    }
    pub fn list() -> Subject {
        Subject::from_static(LIST)
    }
    pub fn rm() -> Subject {
        Subject::from_static(RM)
    }
    pub fn pause() -> Subject {
        Subject::from_static(PAUSE)
    }
    pub fn resume() -> Subject {
        Subject::from_static(RESUME)
    }
}

pub const PROBE_ALL: &str = "dispatch.probe.*";

/// Where `service` writes the probe that tells whether JetStream accepts writes.
pub fn probe(service: &str) -> Subject {
    Subject::from(format!("dispatch.probe.{service}"))
}

/// Every health subject.
pub const HEALTH_ALL: &str = "dispatch.health.>";

/// The health subject every copy of `service` answers.
pub fn health(service: &str) -> Subject {
    Subject::from(format!("dispatch.health.{service}"))
}

/// The health subject only one copy (`instance`) of `service` answers.
pub fn health_instance(service: &str, instance: &str) -> Subject {
    Subject::from(format!("dispatch.health.{service}.{instance}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_subject_round_trips() {
        let id = RunId::new();
        for writer in LogWriter::ALL {
            let subject = run(&id, writer);
            let parsed = parse_run(subject.as_str()).unwrap();
            assert_eq!(parsed.run_id, id);
            assert_eq!(parsed.writer, writer);
            assert_eq!(parsed.account, DEFAULT_ACCOUNT);
            assert_eq!(feed_run(feed(&id).as_str()), Some(id));
        }
        assert_eq!(run_id_of("dispatch.cmd.goal"), None);
        assert_eq!(
            run_id_of("dispatch.run.default.not-a-uuid.dispatcher"),
            None
        );
        assert_eq!(run_id_of(&format!("dispatch.run.default.{id}")), None);
        assert_eq!(
            run_id_of(&format!("dispatch.run.default.{id}.ledger")),
            None
        );
        assert_eq!(
            run_id_of(&format!("dispatch.run.default.{id}.policy.x")),
            None
        );
        assert_eq!(run_log(&id), format!("dispatch.run.default.{id}.*"));
    }

    #[test]
    fn goal_subject_round_trips() {
        let id = RunId::new();
        assert_eq!(run_id_of_goal(goal(&id).as_str()), Some(id));
        assert_eq!(run_id_of_goal(run(&id, LogWriter::Policy).as_str()), None);
    }

    #[test]
    fn drain_subject_round_trips() {
        let conversation: ConversationId = "chat-42".parse().unwrap();
        let subject = drain(&conversation);
        assert_eq!(conversation_of_drain(subject.as_str()), Some(conversation));
    }
}
