//! `dispatch`, the command line. A client of the bus like any origin: it publishes goal
//! commands, reads run logs straight from JetStream, and asks the ledger for views.
//! `dispatch up` also supervises a local stack (nats-server and every service).
//!
//! Exit codes scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; for `run` (attached) and `wait`: the run ended `done` |
//! | 1 | the run ended `blocked` |
//! | 2 | the run ended `stopped` |
//! | 3 | `wait --timeout-ms` ran out before the run ended |
//! | 4 | `run`, `wait`, `logs`: the run's log does not verify (corrupt or untrusted) |
//! | 1 | `verify`, `replay`: the trail or log does not check out |
//! | 125 | dispatch itself failed: bad arguments, NATS unreachable, unknown run |

#[macro_use]
mod terminal;

mod agentfile;
mod api_key;
mod attach;
mod chat;
mod deliveries;
mod format;
mod gate;
mod mcp;
mod memory;
mod schedule;
mod secret;
mod serve;
mod status;
mod store_watch;
mod supervise;
mod todo;
mod up;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dispatch_bus::{Bus, ConversationId, RunId, subject};
use dispatch_proto::api::Reply;
use dispatch_proto::api::v1::ReplayRunResponse;
use dispatch_proto::api::v1::RunView;
use dispatch_proto::api::v1::{
    GetRunRequest, ListRunsRequest, ListRunsResponse, ListTasksRequest, ListTasksResponse,
};
use dispatch_proto::ledger::v1::RunsRemoved;
use dispatch_proto::run::v1::{RunStatus, run_event::Body};
use dispatch_runlog::RunLog;
use dispatch_runlog::seal::{Sealer, Trust};
use dispatch_runlog::submit::{Goal, submit_goal};

/// Exit codes; see the crate docs.
pub mod exit {
    pub const DONE: u8 = 0;
    pub const BLOCKED: u8 = 1;
    pub const STOPPED: u8 = 2;
    pub const WAIT_TIMEOUT: u8 = 3;
    /// The run's log fails verification: a broken chain, or a seal by no trusted key.
    pub const CORRUPT: u8 = 4;
    /// `verify`/`replay`: the trail or log does not check out.
    pub const CHECK_FAILED: u8 = 1;
    /// `status`: a stream cannot be read, has no leader, or has a replica offline.
    pub const DEGRADED: u8 = 1;
    pub const ERROR: u8 = 125;
    /// Whoever read the output went away (as if by SIGPIPE).
    pub const PIPE_CLOSED: u8 = 141;
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "dispatch",
    version,
    about = "Hand goals to Dispatch and watch them run"
)]
pub struct Cli {
    /// NATS server of the Dispatch stack.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Workspace root (TASKS.org, workflows/, .dispatch/). Default: the nearest of the
    /// current directory and its parents that has a .dispatch/ directory, else the
    /// current directory.
    #[arg(long, global = true, env = "DISPATCH_WORKSPACE")]
    workspace: Option<PathBuf>,
    /// Ed25519 public keys (hex, comma-separated) whose seals are trusted besides the
    /// workspace's own key.
    #[arg(long, global = true, env = "DISPATCH_TRUSTED_KEYS", value_delimiter = ',', value_parser = dispatch_runlog::seal::parse_public_key)]
    trusted_keys: Vec<[u8; 32]>,
    #[command(flatten)]
    nats_auth: dispatch_service::NatsAuth,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the local stack in the foreground: nats-server (unless NATS_URL is set) and
    /// every service, each started again if it dies (one that keeps dying is left down
    /// and reported; SIGUSR1 starts it again). Ctrl-C or SIGTERM stops everything.
    Up(up::UpArgs),
    /// Write what a NATS deployment of your own needs to admit Dispatch: an nkey seed per
    /// identity (`<identity>.nk`, kept if present) and `nats.conf`, the server
    /// configuration that admits exactly those identities with their permissions and
    /// syncs JetStream as `--sync` says. Give every nats-server `-c nats.conf` and every
    /// service its own seed (`--nats-nkey` / `DISPATCH_NATS_NKEY`).
    #[command(name = "nats-config")]
    NatsConfig {
        /// The directory to write to (created with mode 0700).
        #[arg(long)]
        out: PathBuf,
        /// `always` (fsync before every ack) or an interval such as `2m`.
        #[arg(long, default_value = "always")]
        sync: dispatch_bus::durability::SyncPolicy,
    },
    /// Print a shell completion script: `dispatch completions bash > /etc/bash_completion.d/dispatch`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Manage the secrets tools use (values from stdin, never shown).
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// What the agents remember: list it, or forget entries.
    #[command(subcommand)]
    Memory(memory::MemoryCommand),
    /// Manage the API keys HTTP clients authenticate with.
    #[command(subcommand, name = "api-key")]
    ApiKey(api_key::ApiKeyCommand),
    /// Hand a goal to Dispatch.
    Run {
        /// Print the run id and return at once.
        #[arg(short, long)]
        detach: bool,
        /// Conversation the feedback note goes to.
        #[arg(long, default_value = ConversationId::DEFAULT)]
        conversation: String,
        /// Kill-switch budget, e.g. 90s, 35m, 1h (default 35m).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// POST the run's result here when it ends (signed per Standard Webhooks).
        #[arg(long)]
        callback: Option<String>,
        /// Run it as a job with this payload (data the run gets beside its goal).
        #[arg(long, value_name = "PAYLOAD", conflicts_with = "heartbeat")]
        job: Option<String>,
        /// Run it as a heartbeat, woken by this payload: `--heartbeat=PAYLOAD`, or
        /// `--heartbeat` alone for none (the `=` keeps the goal from being taken for it).
        #[arg(
            long,
            value_name = "PAYLOAD",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = ""
        )]
        heartbeat: Option<String>,
        /// What you want done.
        goal: Vec<String>,
    },
    /// List runs (queued and doing; -a for all).
    Ps {
        #[arg(short, long)]
        all: bool,
        /// Only print run ids (in full).
        #[arg(short, long)]
        quiet: bool,
        /// Show full run ids in the table, not their 12-character short form.
        #[arg(long)]
        no_trunc: bool,
        /// Only runs that match, e.g. `origin=schedule` or `conversation=chat-1`
        /// (repeatable: all must match).
        #[arg(long, value_parser = RunFilter::parse)]
        filter: Vec<RunFilter>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print a run's event log.
    Logs {
        /// Keep printing until the run ends.
        #[arg(short, long)]
        follow: bool,
        run: String,
    },
    /// Wait for a run to end; the exit code says how it ended.
    Wait {
        run: String,
        /// Give up after this long, e.g. 90s or 5m (exit code 3).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// The same in milliseconds (older spelling).
        #[arg(long, hide = true, conflicts_with = "timeout")]
        timeout_ms: Option<u64>,
    },
    /// Show everything the ledger knows about a run, as JSON.
    Inspect { run: String },
    /// Stop a run: the stop goes to the dispatcher, which records it; the run's owner
    /// ends it `stopped`, and after the grace period (or at once with --force) the
    /// dispatcher ends it without waiting for the owner. Waits until the run has ended
    /// (exit 3 if it has not within --timeout; the stop stays queued).
    Stop {
        run: String,
        /// How long the owner gets to end the run itself, e.g. 5s.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        grace_period: Duration,
        /// The same in milliseconds (older spelling).
        #[arg(long, hide = true, conflicts_with = "grace_period")]
        grace_period_ms: Option<u64>,
        #[arg(long)]
        force: bool,
        /// Hand the stop to the dispatcher and return at once.
        #[arg(short = 'd', long)]
        detach: bool,
        /// How long to wait for the run to end (default: the grace period and 30s).
        #[arg(long, value_parser = parse_duration, conflicts_with = "detach")]
        timeout: Option<Duration>,
    },
    /// Stop a run if it is live, then run its goal again as a new run (prints its id).
    Restart {
        run: String,
        /// How long the owner gets to end the run itself, e.g. 5s.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        grace_period: Duration,
        /// The same in milliseconds (older spelling).
        #[arg(long, hide = true, conflicts_with = "grace_period")]
        grace_period_ms: Option<u64>,
        #[arg(long)]
        force: bool,
    },
    /// Remove runs from the views and delete their working directories (their logs
    /// and audit trails stay). Refuses a live run unless --force, which stops it first.
    Rm {
        #[arg(required = true)]
        runs: Vec<String>,
        #[arg(short, long)]
        force: bool,
    },
    /// Remove every finished run from the views, with its working directory. Audit
    /// trails (`_steps.jsonl`) are kept unless --trails.
    Prune {
        /// Delete the runs' audit trails too (asks first, unless --force).
        #[arg(long)]
        trails: bool,
        /// Do not ask before deleting trails.
        #[arg(short, long, requires = "trails")]
        force: bool,
    },
    /// Rebuild one run's views from its log, verifying its hash chain and seal.
    Replay { run: String },
    /// Check an exported trail (`.dispatch/runs/<id>/_steps.jsonl`) offline. Exit 1
    /// names the first sequence that fails.
    Verify {
        file: PathBuf,
        /// The Ed25519 public key (hex) that must have sealed it; default: the
        /// workspace's key and any --trusted-keys.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Print the public key that seals this workspace's runs (never creates one).
    Key,
    /// The bus as JetStream reports it: each stream's replicas, leader, followers (and
    /// how far behind they are) and size; each durable consumer's waiting, in-flight
    /// and redelivered work. Exit code 1 when a stream has no leader or a replica is
    /// offline.
    Status {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// The tool catalogue: every tool a connector serves now, its risk class, and what
    /// the policy in force says of it before seeing any arguments.
    Tools {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// The permission gate's policy document: show, set, history, test.
    Policy {
        #[command(subcommand)]
        command: gate::PolicyCommand,
    },
    /// Goals started on cron expressions: add, ls, rm, pause, resume.
    Schedule {
        #[command(subcommand)]
        command: schedule::ScheduleCommand,
    },
    /// Start a service: a long-lived run woken by schedules, an interval and webhooks,
    /// each wake a run of its own. Prints its run id; `dispatch stop` ends it.
    Serve(serve::ServeArgs),
    /// Wake a service by hand: a run of its goal with this payload (prints its id).
    Wake {
        service: String,
        /// Data the wake gets beside the service's goal.
        #[arg(default_value = "")]
        payload: String,
    },
    /// Todos that become runs when due: add, ls, done.
    Todo {
        #[command(subcommand)]
        command: todo::TodoCommand,
    },
    /// Talk to a conversation: each line typed is a turn (the agent loop over the
    /// conversation); its answer streams, tool calls shown. Ctrl-D or Ctrl-C leaves.
    Chat {
        /// The conversation (default: a new one, named when it starts).
        conversation: Option<String>,
    },
    /// Follow a conversation's stream: the model's words as they come, tool calls and
    /// results, each run's start and end.
    Attach {
        /// The conversation.
        conversation: String,
        /// Start at the oldest chunk still buffered, not at what comes next.
        #[arg(long)]
        all: bool,
        /// Return when the next run ends, with its exit code (0 done, 1 blocked, 2
        /// stopped).
        #[arg(long)]
        exit: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Tool calls waiting for a person's approval (arguments clipped, and marked so).
    Approvals {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Each call's arguments whole, as they will run, with their digest.
        #[arg(long)]
        full: bool,
    },
    /// Let a waiting tool call go ahead, with the arguments it was asked with.
    Approve {
        /// The approval's id (`dispatch approvals` lists them).
        id: String,
        /// The digest of the arguments you looked at (`dispatch approvals --full`): the
        /// answer holds only for those. Without it, the call's arguments are printed
        /// and allowed as they stand.
        #[arg(long)]
        digest: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
        /// Who is answering; default: $USER.
        #[arg(long)]
        by: Option<String>,
    },
    /// Refuse a waiting tool call; the run's model is told why.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        by: Option<String>,
    },
    /// Results POSTed to goals' callbacks: delivered, pending or given up (`ls`, the
    /// default), every try of one run (`show RUN`), queued again (`resend RUN`).
    Deliveries {
        #[command(subcommand)]
        command: Option<deliveries::DeliveriesCommand>,
        #[command(flatten)]
        list: deliveries::ListArgs,
    },
    /// Serve Dispatch to an MCP client over stdio (Claude Desktop, an IDE): the tools
    /// dispatch, tasks, status, stop, approvals, approve and deny, and each finished
    /// run's report as a resource. Logs go to stderr.
    Mcp,
    /// The conversation's tasks, and its feedback notes (each shown once).
    Tasks {
        #[arg(long, default_value = ConversationId::DEFAULT)]
        conversation: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// A failure that ends the command with [`exit::ERROR`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(String);

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl From<dispatch_bus::Error> for Failure {
    fn from(e: dispatch_bus::Error) -> Self {
        Self(e.to_string())
    }
}

impl From<dispatch_runlog::Error> for Failure {
    fn from(e: dispatch_runlog::Error) -> Self {
        Self(e.to_string())
    }
}

/// Runs the CLI on `args` and returns its exit code.
pub async fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    quiet_on_closed_pipe();
    let cli: Cli = match dispatch_service::config::parse_from("dispatch", args) {
        Ok(cli) => cli,
        Err(dispatch_service::config::Error::Args(e)) => {
            if !e.use_stderr() {
                // --help, --version: the CLI's own words, in colour where it can.
                let _ = e.print();
                return ExitCode::from(exit::DONE);
            }
            // An error quotes what was typed, which may hold anything: plain, escaped.
            err!("{}", e.render());
            return ExitCode::from(exit::ERROR);
        }
        Err(e) => {
            errln!("dispatch: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            errln!("dispatch: {e}");
            ExitCode::from(exit::ERROR)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let here =
        std::env::current_dir().map_err(|e| Failure::new(format!("current directory: {e}")))?;
    // Named, found by walking up, or (for `up`, which makes one) the current directory.
    let found = match &cli.workspace {
        Some(named) => Some(named.clone()),
        None => dispatch_service::layout::find_workspace(&here),
    };
    let workspace = found.clone().unwrap_or_else(|| here.clone());
    let key_path = dispatch_service::layout::seal_key(&workspace);
    let trust = Trust::keys(cli.trusted_keys.iter().copied()).with_workspace_key(&key_path);
    let nats = Nats {
        url: cli.nats_url.clone(),
        auth: cli.nats_auth.clone(),
        workspace: workspace.clone(),
    };
    let open_log = |bus: &Bus| {
        let (bus, trust) = (bus.clone(), trust.clone());
        async move { Ok::<_, Failure>(RunLog::open(&bus, "cli").await?.with_trust(trust)) }
    };
    match cli.command {
        Command::ApiKey(command) => api_key::run(&workspace, command),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "dispatch", &mut std::io::stdout());
            Ok(exit::DONE)
        }
        Command::NatsConfig { out, sync } => {
            let config = out.join("nats.conf");
            dispatch_bus::auth::write_server_config(&out, &config, sync)?;
            outln!("{}", config.display());
            Ok(exit::DONE)
        }
        Command::Up(args) => {
            let external = std::env::var("NATS_URL").ok();
            up::up(&workspace, external, &cli.nats_auth, args).await
        }
        Command::Run {
            detach,
            conversation,
            timeout,
            callback,
            job,
            heartbeat,
            goal,
        } => {
            let goal = goal.join(" ");
            if goal.trim().is_empty() {
                return Err(Failure::new(
                    "give a goal: dispatch run \"what you want done\"",
                ));
            }
            let timeout_ms = match timeout {
                None => 0,
                Some(d) if d < Duration::from_secs(1) => {
                    return Err(Failure::new("--timeout must be at least 1s"));
                }
                Some(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            };
            let (kind, payload) = match (job, heartbeat) {
                (_, Some(payload)) => ("heartbeat", payload),
                (Some(payload), None) => ("job", payload),
                (None, None) => ("job", String::new()),
            };
            let goal = Goal::new(&goal, &conversation, timeout_ms, "cli")
                .and_then(|goal| goal.with_callback(callback.as_deref().unwrap_or_default()))
                .and_then(|goal| goal.with_kind(kind))
                .and_then(|goal| goal.with_payload(&payload))
                .map_err(|e| Failure::new(e.to_string()))?;
            let bus = nats.connect().await?;
            if goal.callback_url().is_some() {
                // As at every door: a result that could not be signed is refused now,
                // not given up after its last try.
                dispatch_secrets::check_signing(&bus)
                    .await
                    .map_err(|e| Failure::new(format!("--callback: {e}")))?;
            }
            let log = open_log(&bus).await?;
            let run_id = submit_goal(&bus, goal).await?;
            if detach {
                outln!("{run_id}");
                return Ok(exit::DONE);
            }
            errln!("run {run_id}");
            follow(&log, run_id, true, None).await
        }
        Command::Ps {
            all,
            quiet,
            no_trunc,
            filter,
            format,
        } => {
            let bus = nats.connect().await?;
            let mut request = ListRunsRequest {
                all,
                ..Default::default()
            };
            for f in filter {
                match f {
                    RunFilter::Origin(origin) => request.origin = Some(origin),
                    RunFilter::Conversation(c) => request.conversation_id = Some(c),
                }
            }
            let runs = list_runs(&bus, request).await?;
            if runs.is_empty() && !all {
                errln!(
                    "dispatch: no queued or running runs; `dispatch ps -a` shows finished ones too"
                );
            }
            if quiet {
                for run in &runs {
                    outln!("{}", run.run_id);
                }
            } else {
                match format {
                    Format::Json => crate::terminal::json(&runs),
                    Format::Table => {
                        out!("{}", format::ps_table(&runs, format::now_ms(), !no_trunc))
                    }
                }
            }
            Ok(exit::DONE)
        }
        Command::Logs { follow: keep, run } => {
            let bus = nats.connect().await?;
            let run_id = resolve(&bus, &run).await?;
            let log = open_log(&bus).await?;
            if keep {
                follow(&log, run_id, true, None).await.map(|_| exit::DONE)
            } else {
                let audited = match log.read_every(&run_id).await {
                    Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
                        errln!("dispatch: {e}");
                        return Ok(exit::CORRUPT);
                    }
                    read => read?,
                };
                if audited.events.is_empty() {
                    return Err(Failure::new(format!("run {run_id} has no events")));
                }
                for stored in &audited.events {
                    outln!("{}", format::event_line(&stored.event));
                }
                if let Some(after) = audited.after_seal {
                    errln!(
                        "dispatch: {} message(s) stored after the run's seal, from stream \
                         sequence {}, are not part of its record",
                        after.messages,
                        after.stream_seq
                    );
                }
                Ok(exit::DONE)
            }
        }
        Command::Wait {
            run,
            timeout,
            timeout_ms,
        } => {
            let timeout = timeout.or(timeout_ms.map(Duration::from_millis));
            let bus = nats.connect().await?;
            let run_id = resolve(&bus, &run).await?;
            let log = open_log(&bus).await?;
            follow(&log, run_id, false, timeout).await
        }
        Command::Inspect { run } => {
            let bus = nats.connect().await?;
            let view: RunView =
                query(&bus, subject::query::run(), &GetRunRequest { id: run }).await?;
            let mut shown = serde_json::to_value(&view).expect("views serialize");
            // Where the run is in a trace backend, when it ran with tracing on.
            if let Ok(run_id) = view.run_id.parse::<RunId>()
                && let Ok(Some(trace)) = open_log(&bus).await?.trace_of(&run_id).await
            {
                shown["trace_id"] = trace.trace_id().to_string().into();
            }
            crate::terminal::json(&shown);
            Ok(exit::DONE)
        }
        Command::Stop {
            run,
            grace_period,
            grace_period_ms,
            force,
            detach,
            timeout,
        } => {
            let grace = grace_period_ms.map_or(grace_period, Duration::from_millis);
            let bus = nats.connect().await?;
            let run_id = resolve(&bus, &run).await?;
            let log = open_log(&bus).await?;
            let wait = match (detach, timeout) {
                (true, _) => None,
                (false, timeout) => Some(
                    timeout
                        .unwrap_or(grace.min(dispatch_runlog::stop::MAX_GRACE) + STOP_TAKEN_WITHIN),
                ),
            };
            let ended = stop(&log, run_id, grace, force, wait).await?;
            outln!("{run_id}");
            if !ended && !detach {
                errln!(
                    "dispatch: the stop of run {run_id} is queued for the dispatcher, but the \
                     run has not ended yet; is a dispatcher running (`dispatch status`)? It is \
                     carried out when one takes it"
                );
                return Ok(exit::WAIT_TIMEOUT);
            }
            Ok(exit::DONE)
        }
        Command::Restart {
            run,
            grace_period,
            grace_period_ms,
            force,
        } => {
            let grace = grace_period_ms.map_or(grace_period, Duration::from_millis);
            let bus = nats.connect().await?;
            let run_id = resolve(&bus, &run).await?;
            let log = open_log(&bus).await?;
            let wait = grace.min(dispatch_runlog::stop::MAX_GRACE) + STOP_TAKEN_WITHIN;
            if !stop(&log, run_id, grace, force, Some(wait)).await? {
                return Err(Failure::new(format!(
                    "run {run_id} has not ended within {}s of asking it to stop; is a \
                     dispatcher running (`dispatch status`)?",
                    wait.as_secs()
                )));
            }
            // The request is the log's first event: one read, however long the log.
            let requested = match log.first_event(&run_id).await?.and_then(|e| e.event.body) {
                Some(Body::RunRequested(r)) => r,
                _ => {
                    return Err(Failure::new(format!(
                        "run {run_id} has no request to restart"
                    )));
                }
            };
            let goal = Goal::new(
                &requested.goal,
                &requested.conversation_id,
                requested.timeout_ms,
                &format!("restart of {run_id}"),
            )
            .and_then(|goal| goal.with_payload(&requested.payload))
            // A service comes back with every wake source its log recorded.
            .and_then(|goal| match (requested.kind.as_str(), &requested.service) {
                ("service", Some(spec)) => goal.with_service(spec.clone()),
                (_, _) if !requested.wake.is_empty() => {
                    let parent = requested.parent_run_id.parse().map_err(|e| {
                        dispatch_runlog::submit::GoalError::Wake(format!("its service: {e}"))
                    })?;
                    goal.woken(parent, dispatch_runlog::service::WAKE_MANUAL)
                }
                ("" | "service", _) => Ok(goal),
                (kind, _) => goal.with_kind(kind),
            })
            .map_err(|e| Failure::new(format!("run {run_id} cannot be restarted: {e}")))?;
            let new_id = submit_goal(&bus, goal).await?;
            outln!("{new_id}");
            Ok(exit::DONE)
        }
        Command::Rm { runs, force } => {
            let bus = nats.connect().await?;
            let log = open_log(&bus).await?;
            let mut ids = Vec::new();
            for run in &runs {
                let run_id = resolve(&bus, run).await?;
                let handle = log.handle(run_id).await?;
                if !handle.is_finished() {
                    if !force {
                        return Err(Failure::new(format!(
                            "run {run_id} has not ended; stop it first (dispatch stop) or use rm --force"
                        )));
                    }
                    if !stop(&log, run_id, Duration::ZERO, true, Some(STOP_TAKEN_WITHIN)).await? {
                        return Err(Failure::new(format!(
                            "run {run_id} has not ended within {}s of stopping it; is a \
                             dispatcher running (`dispatch status`)?",
                            STOP_TAKEN_WITHIN.as_secs()
                        )));
                    }
                }
                ids.push(run_id);
            }
            remove(&bus, &ids, false).await?;
            for id in &ids {
                outln!("{id}");
            }
            Ok(exit::DONE)
        }
        Command::Replay { run } => {
            let bus = nats.connect().await?;
            let reply: Reply<ReplayRunResponse> = bus
                .request_json(
                    subject::query::replay(),
                    &GetRunRequest { id: run },
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| {
                    Failure::new(format!("{e}; is the ledger running (`dispatch up`)?"))
                })?;
            match reply {
                Ok(replayed) => {
                    outln!("{}", format::replayed(&replayed));
                    Ok(exit::DONE)
                }
                Err(dispatch_proto::api::QueryError::Corrupt(message)) => {
                    errln!("dispatch: {message}");
                    Ok(exit::CHECK_FAILED)
                }
                Err(e) => Err(Failure::new(e.to_string())),
            }
        }
        Command::Verify { file, public_key } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failure::new(format!("{}: {e}", file.display())))?;
            // `--public-key` alone, or the configured keys and the workspace key.
            let (trust, whose) = match public_key {
                Some(hex_key) => (
                    Trust::keys([parse_key(&hex_key)?]),
                    "the key given with --public-key".to_owned(),
                ),
                None => {
                    let mut whose = Vec::new();
                    if !cli.trusted_keys.is_empty() {
                        whose.push("DISPATCH_TRUSTED_KEYS".to_owned());
                    }
                    if found.is_some() && trust.workspace_public().is_some() {
                        whose.push(format!("the workspace key ({})", key_path.display()));
                    }
                    if whose.is_empty() {
                        return Err(Failure::new(format!(
                            "no trusted key to check the seal against: no workspace with a key \
                             in {} or its parents, and no --trusted-keys; pass --public-key KEY \
                             (the sealing workspace's `dispatch key`)",
                            here.display()
                        )));
                    }
                    (trust.clone(), whose.join(" and "))
                }
            };
            match dispatch_runlog::steps::verify(&text, &trust) {
                Ok(verified) => {
                    // The trail is a file from anywhere: what it says is one line.
                    outln!(
                        "verified {} events of run {}, sealed by {} (trusted: {whose})",
                        verified.events,
                        format::clip(&verified.run_id, 64),
                        format::clip(&verified.signer, 128)
                    );
                    Ok(exit::DONE)
                }
                Err(failed) => {
                    errln!(
                        "dispatch: {}: {failed} (trusted keys: {whose})",
                        file.display()
                    );
                    Ok(exit::CHECK_FAILED)
                }
            }
        }
        Command::Key => match Sealer::load(&key_path) {
            Ok(sealer) => {
                outln!("{}", sealer.public_hex());
                Ok(exit::DONE)
            }
            Err(_) if found.is_none() => Err(Failure::new(format!(
                "no Dispatch workspace in {} or its parents (looked for .dispatch/); pass \
                 --workspace, or run `dispatch up` there first",
                here.display()
            ))),
            Err(e) => Err(Failure::new(format!(
                "{e}; the workspace has no seal key yet: `dispatch up` (or the first \
                 dispatcher) creates it"
            ))),
        },
        Command::Prune { trails, force } => {
            let bus = nats.connect().await?;
            let every = ListRunsRequest {
                all: true,
                ..Default::default()
            };
            let ids: Vec<RunId> = list_runs(&bus, every)
                .await?
                .iter()
                .filter(|r| r.status().is_terminal())
                .filter_map(|r| r.run_id.parse().ok())
                .collect();
            if trails && !force && !ids.is_empty() && !confirm_trail_removal(ids.len())? {
                errln!("nothing removed");
                return Ok(exit::DONE);
            }
            remove(&bus, &ids, trails).await?;
            for id in &ids {
                outln!("{id}");
            }
            errln!("removed {} finished run(s)", ids.len());
            Ok(exit::DONE)
        }
        Command::Status { format } => status::run(&nats.connect().await?, format).await,
        Command::Tools { format } => {
            let bus = nats.connect().await?;
            let store = dispatch_bus::catalogue::open(&bus).await?;
            let snapshot = dispatch_bus::catalogue::Snapshot::read(&store).await?;
            let rows = format::tool_rows(&snapshot);
            match format {
                Format::Json => crate::terminal::json(&rows),
                Format::Table => out!("{}", format::tools_table(&rows)),
            }
            Ok(exit::DONE)
        }
        Command::Policy { command } => gate::policy(&nats.connect().await?, command).await,
        Command::Schedule { command } => schedule::run(&nats.connect().await?, command).await,
        Command::Todo { command } => todo::run(&nats.connect().await?, command).await,
        Command::Serve(args) => {
            let bus = nats.connect().await?;
            let log = open_log(&bus).await?;
            serve::run(&bus, &log, &nats.workspace, args).await
        }
        Command::Wake { service, payload } => {
            let bus = nats.connect().await?;
            let service = resolve(&bus, &service).await?;
            let log = open_log(&bus).await?;
            serve::wake(&bus, &log, service, &payload).await
        }
        Command::Memory(command) => memory::run(&nats.connect().await?, command).await,
        Command::Secret(command) => {
            secret::run(&nats.connect().await?, &nats.workspace, command).await
        }
        Command::Approvals { format, full } => {
            let bus = nats.connect().await?;
            let log = full.then_some(open_log(&bus).await?);
            gate::approvals(&bus, log.as_ref(), format).await
        }
        Command::Chat { conversation } => {
            let bus = nats.connect().await?;
            let log = open_log(&bus).await?;
            chat::chat(&bus, &log, conversation).await
        }
        Command::Attach {
            conversation,
            all,
            exit,
            format,
        } => attach::attach(&nats.connect().await?, &conversation, all, exit, format).await,
        Command::Approve {
            id,
            digest,
            note,
            by,
        } => {
            let bus = nats.connect().await?;
            let digest = match digest {
                Some(digest) => digest,
                None => gate::digest_of(&open_log(&bus).await?, &id).await?,
            };
            gate::resolve(&bus, id, Some(digest), note, by).await
        }
        Command::Deny { id, reason, by } => {
            if reason.trim().is_empty() {
                return Err(Failure::new("say why: --reason is told to the run's model"));
            }
            gate::resolve(&nats.connect().await?, id, None, reason, by).await
        }
        Command::Deliveries { command, list } => {
            let bus = nats.connect().await?;
            let log = open_log(&bus).await?;
            deliveries::run(&bus, &log, command, list).await
        }
        Command::Mcp => {
            let bus = nats.connect().await?;
            let log = open_log(&bus).await?;
            mcp::serve(bus, log).await
        }
        Command::Tasks {
            conversation,
            format,
        } => {
            conversation
                .parse::<ConversationId>()
                .map_err(|e| Failure::new(e.to_string()))?;
            let bus = nats.connect().await?;
            let reply = all_tasks(&bus, &conversation).await?;
            match format {
                Format::Json => crate::terminal::json(&reply),
                Format::Table => out!("{}", format::tasks(&reply)),
            }
            Ok(exit::DONE)
        }
    }
}

/// `dispatch logs X | head -1`: when whoever reads the output goes away, stop at once
/// and quietly, as Unix tools do (exit 141, as if by SIGPIPE), instead of panicking.
/// Rust ignores SIGPIPE, so the write fails and `println!` panics with this message.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if text.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Where the CLI's bus is and how it signs in: as the `cli` identity, with the seed
/// given by flag or environment, else the workspace's own.
struct Nats {
    url: String,
    auth: dispatch_service::NatsAuth,
    workspace: PathBuf,
}

impl Nats {
    async fn connect(&self) -> Result<Bus, Failure> {
        Ok(self
            .auth
            .connect(&self.url, &self.workspace, dispatch_bus::Identity::Cli)
            .await?)
    }
}

pub(crate) async fn query<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
    bus: &Bus,
    subject: dispatch_bus::subject::Subject,
    q: &Q,
) -> Result<R, Failure> {
    let reply: Reply<R> = bus
        .request_json(subject, q, QUERY_TIMEOUT)
        .await
        .map_err(|e| Failure::new(format!("{e}; is the ledger running (`dispatch up`)?")))?;
    reply.map_err(|e| Failure::new(e.to_string()))
}

/// Every run the ledger lists (`all`: finished ones too), page after page.
/// Every run `request` asks for, page after page.
pub(crate) async fn list_runs(
    bus: &Bus,
    mut request: ListRunsRequest,
) -> Result<Vec<RunView>, Failure> {
    request.limit = Some(dispatch_proto::api::MAX_PAGE);
    let mut runs = Vec::new();
    loop {
        let page: ListRunsResponse = query(bus, subject::query::runs(), &request).await?;
        runs.extend(page.runs);
        match page.next {
            Some(next) => request.after = Some(next),
            None => return Ok(runs),
        }
    }
}

/// A `ps --filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunFilter {
    Origin(String),
    Conversation(String),
}

impl RunFilter {
    fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some(("origin", v)) if !v.is_empty() => Ok(Self::Origin(v.to_owned())),
            Some(("conversation", v)) if !v.is_empty() => Ok(Self::Conversation(v.to_owned())),
            _ => Err(format!(
                "{text:?}: a filter is origin=VALUE or conversation=VALUE"
            )),
        }
    }
}

/// A conversation's tasks and every feedback note waiting for it, asking page after
/// page. Each ask drains with an id of its own and repeats it if the answer is lost,
/// so a note is never drained into an answer nobody read.
async fn all_tasks(bus: &Bus, conversation: &str) -> Result<ListTasksResponse, Failure> {
    let mut all = ListTasksResponse {
        tasks: Vec::new(),
        next: None,
        feedback: Vec::new(),
        more_feedback: false,
    };
    let mut after = None;
    loop {
        let ask = ListTasksRequest {
            conversation_id: conversation.to_owned(),
            limit: Some(dispatch_proto::api::MAX_PAGE),
            after: after.clone(),
            drain_id: Some(RunId::new().to_string()),
        };
        let mut page: Result<ListTasksResponse, Failure> = Err(Failure::new("not asked"));
        for _ in 0..3 {
            page = query(bus, subject::query::tasks(), &ask).await;
            if page.is_ok() {
                break;
            }
        }
        let page = page?;
        all.tasks.extend(page.tasks);
        all.feedback.extend(page.feedback);
        after = page.next.clone();
        if page.next.is_none() && !page.more_feedback {
            return Ok(all);
        }
    }
}

/// A full run id with a log is used as is; anything else must be a unique prefix the
/// ledger knows.
pub(crate) async fn resolve(bus: &Bus, id: &str) -> Result<RunId, Failure> {
    if let Ok(run_id) = id.parse::<RunId>() {
        let log = RunLog::open(bus, "cli").await?;
        let known = !log.read_after(&run_id, 0).await?.is_empty()
            || dispatch_runlog::submit::find_goal(bus, &run_id)
                .await?
                .is_some();
        if known {
            return Ok(run_id);
        }
    }
    let view: RunView = query(
        bus,
        subject::query::run(),
        &GetRunRequest { id: id.to_owned() },
    )
    .await?;
    view.run_id
        .parse()
        .map_err(|e: dispatch_bus::IdError| Failure::new(e.to_string()))
}

/// Follows a run until its terminal event, printing events if `print`. Returns the
/// exit code for how it ended.
async fn follow(
    log: &RunLog,
    run_id: RunId,
    print: bool,
    limit: Option<Duration>,
) -> Result<u8, Failure> {
    match follow_log(log, run_id, print, limit).await {
        Err(e) if e.kind() == dispatch_runlog::ErrorKind::Corrupt => {
            errln!("dispatch: {e}");
            Ok(exit::CORRUPT)
        }
        other => other.map_err(Failure::from),
    }
}

async fn follow_log(
    log: &RunLog,
    run_id: RunId,
    print: bool,
    limit: Option<Duration>,
) -> Result<u8, dispatch_runlog::Error> {
    let deadline = limit.map(|d| tokio::time::Instant::now() + d);
    let mut handle = log.handle(run_id).await?;
    let mut shown = 0;
    loop {
        for stored in &handle.events()[shown..] {
            if print {
                outln!("{}", format::event_line(&stored.event));
            }
            if let Some(Body::RunFinished(f)) = &stored.event.body {
                let status = RunStatus::try_from(f.status).unwrap_or(RunStatus::Blocked);
                if !print {
                    outln!("{}", status.word());
                } else if let Some(report) = format::report(f) {
                    out!("{report}");
                }
                return Ok(match status {
                    RunStatus::Done => exit::DONE,
                    RunStatus::Stopped => exit::STOPPED,
                    _ => exit::BLOCKED,
                });
            }
        }
        shown = handle.events().len();
        let wait = match deadline {
            Some(deadline) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    errln!("dispatch: run {run_id} has not ended yet");
                    return Ok(exit::WAIT_TIMEOUT);
                }
                (deadline - now).min(Duration::from_secs(5))
            }
            None => Duration::from_secs(5),
        };
        handle.wait_for_more(wait).await?;
    }
}

/// How long `dispatch stop` waits, beyond the grace period, for a dispatcher to take
/// the stop and end the run.
const STOP_TAKEN_WITHIN: Duration = Duration::from_secs(30);

/// Asks a run to stop and, with `wait`, waits up to that long for it to end; returns
/// whether it has. The CLI writes no run log: the stop goes to the dispatcher as a
/// command (see [`dispatch_runlog::stop`]), which records it, and ends the run itself
/// if the run's owner does not within `grace`.
async fn stop(
    log: &RunLog,
    run_id: RunId,
    grace: Duration,
    force: bool,
    wait: Option<Duration>,
) -> Result<bool, Failure> {
    let mut handle = log.handle(run_id).await?;
    if handle.is_finished() {
        return Ok(true);
    }
    if handle.events().is_empty()
        && dispatch_runlog::submit::find_goal(log.bus(), &run_id)
            .await?
            .is_none()
    {
        return Err(Failure::new(format!("no run matches {run_id}")));
    }
    dispatch_runlog::stop::hand_over(log.bus(), &run_id, grace, force, "cli").await?;
    let Some(wait) = wait else {
        return Ok(false);
    };
    let deadline = tokio::time::Instant::now() + wait;
    while !handle.is_finished() {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        handle
            .wait_for_more((deadline - now).min(Duration::from_secs(5)))
            .await?;
    }
    Ok(true)
}

/// Asks on the terminal before audit evidence is deleted; refuses without one.
fn confirm_trail_removal(runs: usize) -> Result<bool, Failure> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            "prune --trails deletes audit trails; confirm on a terminal, or pass --force",
        ));
    }
    err!("delete the audit trails (_steps.jsonl) of {runs} run(s) too? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::new(format!("read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Records that runs leave the views; the ledger deletes their working directories,
/// keeping their trails unless `trails`. Many runs go in several records, each well
/// inside one NATS message.
async fn remove(bus: &Bus, ids: &[RunId], trails: bool) -> Result<(), Failure> {
    for chunk in ids.chunks(1000) {
        let removed = RunsRemoved {
            run_ids: chunk.iter().map(RunId::to_string).collect(),
            time_unix_ms: format::now_ms(),
            trails,
        };
        let msg_id = format!("removed-{}", RunId::new());
        bus.append(
            subject::removed(),
            &msg_id,
            None,
            prost::Message::encode_to_vec(&removed).into(),
        )
        .await?;
    }
    Ok(())
}

/// A 32-byte Ed25519 public key in hex.
fn parse_key(text: &str) -> Result<[u8; 32], Failure> {
    dispatch_runlog::seal::parse_public_key(text)
        .map_err(|e| Failure::new(format!("--public-key: {e}")))
}

/// `500ms`, `90s`, `35m`, `1h`, `1h 30m`: one format for every duration flag.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 90s, 35m or 1h ({e})"))
}

#[cfg(test)]
mod printed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("35m"), Ok(Duration::from_secs(35 * 60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(90 * 60)));
        for bad in ["10", "soon", "-5s", ""] {
            assert!(
                parse_duration(bad).unwrap_err().contains("not a duration"),
                "{bad:?}"
            );
        }
    }
}
