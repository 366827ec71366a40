//! The policy service: the permission gate every tool call passes.
//!
//! - It keeps the policy document ([`dispatch_rules::Document`]) in the stream
//!   `DISPATCH_POLICY` ([`store`]): every copy follows the version in force, and a
//!   change (`dispatch policy set`) is checked, numbered, hashed and appended there as
//!   its own audited record. The version in force is mirrored into the tool catalogue,
//!   where dispatchers read which tools not to offer at all.
//! - It takes policy checks asked of its queue group (`dispatch.ask.policy`, see
//!   `dispatch_bus::ask`), decides each call (`allow`, `deny`, `ask`, or `validate` by
//!   the validator model, which fails closed to `ask`), and appends the decision, naming
//!   the version and the rule, to the run's log, once, however many times it is asked.
//!   An `ask` also appends an `ApprovalRequested` the run then waits on.
//! - It answers requests on `dispatch.req.policy.*`: set a document, dry-run a call,
//!   and resolve an approval, where of two answers given at once exactly one is
//!   recorded (optimistic concurrency on the run's log).
//!
//! The per-run denial memo is kept by the dispatcher, which holds the run's log: an
//! identical call denied before is denied again without a check ([`MEMO_RULE`]).

pub mod requests;

pub mod validator;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dispatch_bus::async_nats::{self, jetstream::kv};
use dispatch_bus::catalogue::{Risk, ToolEntry};
use dispatch_bus::health::{self, Health};
use dispatch_bus::work;
use dispatch_bus::{Bus, RunId, subject};
use dispatch_proto::command::v1::CheckPolicy;
use dispatch_proto::run::v1::{ApprovalRequested, Decision, PolicyDecided, run_event::Body};
pub use dispatch_rules::{DEFAULT_RULE, Document, Effect, MEMO_RULE};
use dispatch_runlog::RunLog;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use dispatch_rules::store::{self, InForce};

pub const SERVICE: &str = "policy";

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "dispatch-policy", about = "Dispatch permission gate", version)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// A JSON policy document to put in force at start, if it is not already. Without
    /// it, the document in force stays; when none was ever set, the built-in one is.
    #[arg(long, env = "DISPATCH_POLICY")]
    pub policy: Option<PathBuf>,
    /// Most checks this copy handles at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long a person has to answer an approval request before it is denied, in
    /// milliseconds, unless its rule says otherwise.
    #[arg(long, env = "DISPATCH_APPROVAL_TTL_MS", default_value_t = 3_600_000,
          value_parser = clap::value_parser!(u64).range(1..=dispatch_rules::MAX_APPROVAL_TTL_MS))]
    pub approval_ttl_ms: u64,
    #[command(flatten)]
    pub validator: validator::ValidatorArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error(transparent)]
    Log(#[from] dispatch_runlog::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("policy document {path}: {message}")]
    Document { path: String, message: String },
    #[error(transparent)]
    Model(#[from] dispatch_models::Error),
}

/// What a check needs, shared by every task of this copy.
#[derive(Clone)]
pub(crate) struct Gate {
    pub log: RunLog,
    pub bus: Bus,
    pub catalogue: Catalogue,
    pub in_force: watch::Receiver<Arc<InForce>>,
    pub validator: validator::Validator,
    pub approval_ttl: Duration,
}

pub struct PolicyService {
    config: Config,
    bus: Bus,
    log: RunLog,
    seed: Option<(Document, String)>,
    validator: validator::Validator,
}

impl PolicyService {
    pub async fn build(config: Config) -> Result<Self, Error> {
        let seed = match &config.policy {
            Some(path) => {
                let invalid = |message: String| Error::Document {
                    path: path.display().to_string(),
                    message,
                };
                let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
                let document = Document::parse(&text).map_err(|e| invalid(e.to_string()))?;
                Some((document, format!("--policy {}", path.display())))
            }
            None => None,
        };
        let validator = config.validator.build()?;
        let instance = config.common.instance.clone();
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Policy)
            .await?;
        let log = RunLog::open(&bus, &format!("{SERVICE}/{instance}"))
            .await?
            .writing_as(dispatch_bus::subject::LogWriter::Policy)
            .with_trust(config.common.trust());
        Ok(Self {
            config,
            bus,
            log,
            seed,
            validator,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
        let health = tokio::spawn(health::serve(
            self.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        let first = seed(&self.bus, self.seed.as_ref(), &instance).await?;
        let in_force = store::follow(&self.bus, first, shutdown.clone());
        let catalogue = dispatch_bus::catalogue::open(&self.bus).await?;
        tokio::spawn(mirror(
            catalogue.clone(),
            in_force.clone(),
            shutdown.clone(),
        ));
        let version = in_force.borrow().record.clone();
        tracing::info!(
            instance,
            version = version.version,
            hash = version.hash,
            "policy ready"
        );
        let gate = Gate {
            log: self.log.clone(),
            bus: self.bus.clone(),
            catalogue: Catalogue::new(catalogue),
            in_force,
            validator: self.validator.clone(),
            approval_ttl: Duration::from_millis(self.config.approval_ttl_ms),
        };
        let requests = tokio::spawn(requests::serve(gate.clone(), shutdown.clone()));
        let stop = shutdown.clone();
        dispatch_bus::ask::serve(
            &self.bus,
            subject::ask::POLICY,
            subject::ask::POLICY_GROUP,
            self.config.concurrency,
            shutdown,
            move |message| handle(gate.clone(), message, stop.clone()),
        )
        .await?;
        let _ = requests.await;
        let _ = health.await;
        Ok(())
    }
}

/// The version in force once this copy starts: the stored one, replaced by the
/// `--policy` document if that differs, or the built-in document if none was ever set.
/// Copies starting at once race with optimistic concurrency; a loser reads the winner's.
async fn seed(
    bus: &Bus,
    seed: Option<&(Document, String)>,
    instance: &str,
) -> Result<InForce, Error> {
    for _ in 0..5 {
        // Damaged messages after the version in force are skipped (and said): the last
        // good version stays in force, and the next change supersedes them.
        let current = store::current(bus).await?;
        let (document, note) = match (seed, &current.in_force) {
            (Some((document, from)), _) => (document.clone(), from.clone()),
            (None, Some(in_force)) => return Ok(in_force.clone()),
            (None, None) => (Document::builtin(), "the built-in policy".to_owned()),
        };
        let by = format!("{SERVICE}/{instance}");
        match store::set(bus, &current, &document, &by, &note).await {
            Ok((version, _)) => return Ok(version),
            Err(store::Error::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Five lost races in a row: whoever won is in force.
    store::current(bus).await?.in_force.ok_or_else(|| {
        Error::Store(store::Error::Store(
            "the policy document could not be put in force".into(),
        ))
    })
}

/// Mirrors the version in force into the tool catalogue whenever it changes.
async fn mirror(
    catalogue: kv::Store,
    mut in_force: watch::Receiver<Arc<InForce>>,
    shutdown: CancellationToken,
) {
    loop {
        let version = in_force.borrow_and_update().clone();
        let value = serde_json::json!({
            "version": version.record.version,
            "hash": version.record.hash,
            "document": version.document,
        });
        if let Err(e) = dispatch_bus::catalogue::put_policy(&catalogue, &value).await {
            tracing::warn!(error = %e, "cannot mirror the policy into the catalogue");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = in_force.changed() => if changed.is_err() { return },
        }
    }
}

/// Decides the call an ask names. Transient failures are tried again here; if they
/// last, the dispatcher asks again later, and gives the run up after a few copies took
/// the check and none answered.
async fn handle(gate: Gate, message: async_nats::Message, shutdown: CancellationToken) {
    let check = match CheckPolicy::decode(message.payload.as_ref()) {
        Ok(check) => check,
        Err(e) => {
            tracing::warn!(error = %e, "dropping a policy ask that is not a CheckPolicy");
            return;
        }
    };
    let what = format!("policy check {}/{}", check.run_id, check.call_id);
    let outcome = work::retry(&what, &shutdown, transient, || decide(&gate, &check)).await;
    if let Some(Err(e)) = outcome {
        tracing::warn!(run_id = check.run_id, call_id = check.call_id, error = %e, "cannot decide the call; the dispatcher will ask again");
    }
}

/// Everything but a log that does not verify may go away if tried again.
fn transient(e: &Error) -> bool {
    !matches!(e, Error::Log(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt)
}

/// True for the event requesting the call `check` is about, where the log is read from.
fn requests_call(body: &Body, check: &CheckPolicy) -> bool {
    matches!(body, Body::ToolCallRequested(r) if r.call_id == check.call_id)
}

pub use dispatch_runlog::approvals::{approval_id, parse_approval_id};

/// Decisions made, by effect (`dispatch_policy_decisions_total{decision}`).
fn decisions() -> &'static opentelemetry::metrics::Counter<u64> {
    static DECISIONS: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    DECISIONS.get_or_init(|| {
        opentelemetry::global::meter(dispatch_bus::metrics::METER)
            .u64_counter("dispatch.policy.decisions")
            .with_description("Policy decisions made, by effect")
            .build()
    })
}

/// A decision as its policy rule names the effect: allow, deny, ask.
fn effect_word(decision: Decision) -> &'static str {
    match decision {
        Decision::Allow => "allow",
        Decision::Deny => "deny",
        Decision::Ask => "ask",
        Decision::Unspecified => "unspecified",
    }
}

fn risk_of(risk: i32) -> Risk {
    use dispatch_proto::run::v1::Risk as R;
    match R::try_from(risk).unwrap_or(R::Unspecified) {
        R::Read => Risk::Read,
        R::Write => Risk::Write,
        R::External => Risk::External,
        // Unrecorded is unknown, and unknown is risky.
        R::Destructive | R::Unspecified => Risk::Destructive,
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long a catalogue entry read for a decision is used again: the entries change
/// when a connector starts or a server changes its tools, not between one call and
/// the next, and a read per decision is a round trip on every call's path.
const CATALOGUE_FRESH: Duration = Duration::from_secs(2);

/// The most entries kept; past it the cache starts over.
const CATALOGUE_CACHED: usize = 1024;

/// The tool catalogue, each entry read at most every [`CATALOGUE_FRESH`]. Cheap to
/// clone.
#[derive(Clone)]
pub(crate) struct Catalogue {
    store: kv::Store,
    cached: Arc<Mutex<HashMap<String, Cached>>>,
}

/// An entry (or that there is none) and when it was read.
type Cached = (Instant, Option<ToolEntry>);

impl Catalogue {
    fn new(store: kv::Store) -> Self {
        Self {
            store,
            cached: Default::default(),
        }
    }

    /// The live entry of `tool`, if a connector serves it.
    pub(crate) async fn tool(&self, tool: &str) -> Result<Option<ToolEntry>, dispatch_bus::Error> {
        let fresh = {
            let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            cached
                .get(tool)
                .filter(|(at, _)| at.elapsed() < CATALOGUE_FRESH)
                .map(|(_, entry)| entry.clone())
        };
        if let Some(entry) = fresh {
            return Ok(entry);
        }
        let entry = dispatch_bus::catalogue::tool(&self.store, tool).await?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.len() >= CATALOGUE_CACHED {
            cached.clear();
        }
        cached.insert(tool.to_owned(), (Instant::now(), entry.clone()));
        Ok(entry)
    }
}

/// How many of a connector's tools a denial of a tool it does not serve names.
const TOOLS_NAMED: usize = 12;

impl Catalogue {
    /// Why `tool` is no tool at all, when its connector is live and serves others
    /// (`None` when the connector serves nothing now: it may be starting, and the call
    /// is decided as any other).
    async fn no_such_tool(&self, tool: &str) -> Option<String> {
        let (connector, _) = tool.split_once('.')?;
        let snapshot = match dispatch_bus::catalogue::Snapshot::read(&self.store).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the tool catalogue");
                return None;
            }
        };
        let served: Vec<&str> = snapshot
            .tools
            .keys()
            .filter(|name| name.split_once('.').is_some_and(|(c, _)| c == connector))
            .map(String::as_str)
            .collect();
        if served.is_empty() {
            return None;
        }
        let mut named = served
            .iter()
            .take(TOOLS_NAMED)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if served.len() > TOOLS_NAMED {
            named.push_str(&format!(" and {} more", served.len() - TOOLS_NAMED));
        }
        let shown: String = tool.chars().take(80).collect();
        Some(format!(
            "the {connector} connector has no tool {shown:?}; it serves {named}"
        ))
    }
}

/// Decides `check` in a span of its own (a child of the span that asked for it).
async fn decide(gate: &Gate, check: &CheckPolicy) -> Result<(), Error> {
    let span = tracing::info_span!(
        "decide",
        otel.name = "policy.decide",
        run_id = check.run_id.as_str(),
        call_id = check.call_id.as_str(),
        tool = check.tool.as_str(),
        decision = tracing::field::Empty,
        rule = tracing::field::Empty,
        version = tracing::field::Empty,
    );
    decide_in_span(gate, check).instrument(span).await
}

async fn decide_in_span(gate: &Gate, check: &CheckPolicy) -> Result<(), Error> {
    let Ok(run_id) = check.run_id.parse::<RunId>() else {
        tracing::warn!(
            run_id = check.run_id,
            "policy check names no valid run; ignored"
        );
        return Ok(());
    };
    let mut run = gate
        .log
        .handle_at(run_id, check.from_stream_seq, |b| requests_call(b, check))
        .await?;
    let call_id = check.call_id.as_str();
    // The decision is about the call the run's log requested, not whatever the command
    // claims: a command for a call the log does not hold is ignored.
    let requested = run.bodies().find_map(|b| match b {
        Body::ToolCallRequested(r) if r.call_id == call_id => Some(r.clone()),
        _ => None,
    });
    let Some(requested) = requested else {
        tracing::warn!(run_id = %run_id, call_id, "policy check for a call the log never requested; ignored");
        return Ok(());
    };
    let decided = |b: &Body| match b {
        Body::PolicyDecided(d) if d.call_id == call_id => Some(d.clone()),
        _ => None,
    };
    let existing = run.bodies().find_map(decided);
    let decision = match existing {
        Some(decision) => decision,
        None => {
            // The tool's schema says which arguments are paths and URLs; a tool no
            // connector serves now has none, and then every string may be either.
            let entry = gate.catalogue.tool(&requested.tool).await?;
            let in_force = gate.in_force.borrow().clone();
            let risk = risk_of(requested.risk);
            // Only arguments in their one form are judged: what is checked here is then
            // what a person is shown and what runs.
            let verdict = match dispatch_runlog::args::is_canonical(&requested.args_json) {
                Ok(()) => in_force.document.decide(dispatch_rules::Call {
                    tool: &requested.tool,
                    args_json: &requested.args_json,
                    risk,
                    origin: &check.origin,
                    schema: entry.as_ref().map(|e| &e.parameters),
                }),
                Err(why) => dispatch_rules::Verdict {
                    effect: Effect::Deny,
                    rule: dispatch_rules::ARGUMENTS_RULE.to_owned(),
                    reason: format!("the call's arguments are refused: {why}"),
                    approval_ttl_ms: None,
                },
            };
            // A tool its connector does not serve (while that connector serves others)
            // is a name the model guessed: refused with the names there are, rather
            // than put to a person whose yes could run nothing.
            let verdict = match entry {
                Some(_) => verdict,
                None => match gate.catalogue.no_such_tool(&requested.tool).await {
                    Some(reason) => dispatch_rules::Verdict {
                        effect: Effect::Deny,
                        rule: dispatch_rules::NO_SUCH_TOOL_RULE.to_owned(),
                        reason,
                        approval_ttl_ms: None,
                    },
                    None => verdict,
                },
            };
            // A gate's call is a read the document allows outright, or nothing: a gate
            // never writes and never waits for a person.
            let verdict = match (requested.gate, verdict.effect) {
                (false, _) | (true, Effect::Deny) => verdict,
                (true, _) if risk != Risk::Read => dispatch_rules::Verdict {
                    effect: Effect::Deny,
                    rule: dispatch_rules::GATE_RULE.to_owned(),
                    reason: format!(
                        "a gate may only read, and {} is {}",
                        requested.tool,
                        risk.word()
                    ),
                    approval_ttl_ms: None,
                },
                (true, Effect::Allow) => verdict,
                (true, effect) => dispatch_rules::Verdict {
                    effect: Effect::Deny,
                    rule: dispatch_rules::GATE_RULE.to_owned(),
                    reason: format!(
                        "a gate's call runs only when the policy allows it outright; rule {} \
                         would {} ({})",
                        verdict.rule,
                        effect.word(),
                        verdict.reason
                    ),
                    approval_ttl_ms: None,
                },
            };
            let mut body = PolicyDecided {
                call_id: call_id.to_owned(),
                rule: verdict.rule.clone(),
                reason: verdict.reason.clone(),
                policy_version: in_force.record.version,
                policy_hash: in_force.record.hash.clone(),
                ..Default::default()
            };
            let decision = match verdict.effect {
                Effect::Allow => Decision::Allow,
                Effect::Deny => Decision::Deny,
                Effect::Ask => Decision::Ask,
                Effect::Validate => {
                    let judged = gate
                        .validator
                        .judge(&in_force.document, &verdict, &requested, risk)
                        .await;
                    body.validator = judged.validator;
                    body.validator_verdict = judged.verdict.to_owned();
                    body.reason = judged.reason;
                    judged.decision
                }
            };
            body.decision = decision as i32;
            tracing::info!(run_id = %run_id, call_id, tool = requested.tool, decision = ?body.decision(), rule = body.rule, version = body.policy_version, "decided");
            let span = tracing::Span::current();
            span.record("decision", body.decision().as_str_name());
            span.record("rule", body.rule.as_str());
            span.record("version", body.policy_version);
            decisions().add(
                1,
                &[opentelemetry::KeyValue::new(
                    "decision",
                    effect_word(body.decision()),
                )],
            );
            match run
                .ensure(decided, Body::PolicyDecided(body), call_id)
                .await
            {
                Ok(decision) => decision,
                // A run that ended meanwhile needs no decision.
                Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if decision.decision() != Decision::Ask {
        return Ok(());
    }
    // Asked: the request a person answers. A redelivered check finds it there.
    let ttl = gate
        .in_force
        .borrow()
        .document
        .rule(&decision.rule)
        .and_then(|rule| rule.approval_ttl_ms)
        .map_or(gate.approval_ttl, Duration::from_millis);
    let body = Body::ApprovalRequested(ApprovalRequested {
        approval_id: approval_id(&run_id, call_id),
        call_id: call_id.to_owned(),
        tool: requested.tool.clone(),
        args_json: requested.args_json.clone(),
        risk: requested.risk,
        rule: decision.rule.clone(),
        reason: decision.reason.clone(),
        expires_unix_ms: now_unix_ms().saturating_add(ttl.as_millis() as i64),
        args_digest: dispatch_runlog::args::digest(&requested.args_json),
    });
    let asked =
        |b: &Body| matches!(b, Body::ApprovalRequested(a) if a.call_id == call_id).then_some(());
    match run.ensure(asked, body, call_id).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Finished => Ok(()),
        Err(e) => Err(e.into()),
    }
}
