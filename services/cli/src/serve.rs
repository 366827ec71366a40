//! `dispatch serve [AGENTFILE]`: start a service run.
//!
//! The spec is the Agentfile's with the flags on top: scalar settings (the goal, the
//! interval, a listener's path, secret and size limits) are the flag's when given;
//! schedules, listeners and methods are merged without duplicates. A shared secret is
//! resolved here — from the flag, or the `SECRET` the file names, read from the
//! environment and then the secret store — and only its SHA-256 leaves this process.
//! The run id is printed at once; then `serve` waits for a dispatcher to start the
//! service (or refuse it: a hook another service holds, a schedule the scheduler
//! refuses) and says which, unless `--detach`. The service lives in the stack until
//! `dispatch stop`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dispatch_bus::{Bus, ConversationId, RunId};
use dispatch_proto::run::v1::{Listener, ServiceSchedule, ServiceSpec};
use dispatch_runlog::RunLog;
use dispatch_runlog::submit::{Goal, submit_goal};
use sha2::Digest as _;
use zeroize::Zeroizing;

use crate::agentfile::{self, Agentfile};
use crate::{Failure, exit, parse_duration};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// An Agentfile declaring the service (see examples/Agentfile).
    agentfile: Option<PathBuf>,
    /// What each wake does (overrides the Agentfile's GOAL).
    #[arg(long)]
    goal: Option<String>,
    /// Wake on this cron expression (5, 6 or 7 fields; repeatable), added to the
    /// Agentfile's.
    #[arg(long, value_name = "CRON")]
    schedule: Vec<String>,
    /// The time zone of the --schedule expressions (IANA name; default UTC).
    #[arg(long, value_name = "ZONE", default_value = "")]
    tz: String,
    /// An idle heartbeat: wake every this long (on each multiple of it since the epoch,
    /// whatever else woke it), e.g. 30s, 10m.
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// Listen for webhooks on this address (served by ingress; port 0: any free one;
    /// repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Take webhooks at ingress's /hooks/{account}/{agent}/{channel} (repeatable).
    #[arg(long, value_name = "ACCOUNT/AGENT/CHANNEL")]
    hook: Vec<String>,
    /// Only requests to this path wake the service (404 otherwise).
    #[arg(long, value_name = "PATH")]
    listen_path: Option<String>,
    /// Only these methods (405 otherwise; repeatable; default POST).
    #[arg(long, value_name = "METHOD")]
    listen_method: Vec<String>,
    /// Requests must carry this (16 characters at least) in `x-dispatch-secret` or
    /// `Authorization: Bearer` (401 otherwise). Only its SHA-256 is recorded.
    #[arg(long, value_name = "TOKEN")]
    listen_shared_secret: Option<String>,
    /// Requests must be signed per Standard Webhooks with the key (`whsec_…`) stored
    /// as this secret (`dispatch secret set NAME`); its name starts with `WEBHOOK_` or
    /// `webhook-` (ingress reads no other secrets).
    #[arg(long, value_name = "NAME")]
    listen_signing_secret: Option<String>,
    /// Largest request body taken (413 beyond it; default 8192).
    #[arg(long, value_name = "BYTES")]
    listen_max_body_bytes: Option<u32>,
    /// Largest request head taken (431 beyond it; default 4096).
    #[arg(long, value_name = "BYTES")]
    listen_max_header_bytes: Option<u32>,
    /// Conversation the wakes' feedback notes go to.
    #[arg(long)]
    conversation: Option<String>,
    /// Each wake's kill-switch budget, e.g. 90s, 35m.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Print the service's run id and return, without waiting to see it started.
    #[arg(short = 'd', long)]
    detach: bool,
}

/// How long `serve` waits for a dispatcher to start the service or refuse it.
const START_WAIT: Duration = Duration::from_secs(30);

pub async fn run(
    bus: &Bus,
    log: &RunLog,
    workspace: &Path,
    args: ServeArgs,
) -> Result<u8, Failure> {
    let file = match &args.agentfile {
        Some(path) => agentfile::read(path).map_err(Failure::new)?,
        None => Agentfile::default(),
    };
    let goal = args.goal.clone().or(file.goal.clone()).ok_or_else(|| {
        Failure::new(
            "say what each wake does: a GOAL in the Agentfile, or --goal \"…\" \
             (see examples/Agentfile)",
        )
    })?;
    let timeout = duration(args.timeout, file.timeout.as_deref())?;
    let timeout_ms = match timeout {
        None => 0,
        Some(d) if d < Duration::from_secs(1) => {
            return Err(Failure::new("the timeout must be at least 1s"));
        }
        Some(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    };
    let conversation = args
        .conversation
        .clone()
        .or(file.conversation.clone())
        .unwrap_or_else(|| ConversationId::DEFAULT.to_owned());
    let secret = shared_secret(bus, workspace, &args, &file).await?;
    let spec = spec(&args, &file, secret.as_ref().map(|s| s.as_str()))?;
    let goal = Goal::new(&goal, &conversation, timeout_ms, "cli")
        .and_then(|goal| goal.with_service(spec))
        .map_err(|e| Failure::new(e.to_string()))?;
    let run_id = submit_goal(bus, goal).await?;
    outln!("{run_id}");
    if args.detach {
        return Ok(exit::DONE);
    }
    match started(log, run_id).await? {
        Some(Ok(())) => {
            errln!(
                "service {run_id} started: `dispatch inspect {}` shows its wakes, `dispatch \
                 stop {}` ends it",
                run_id.short(),
                run_id.short()
            );
            Ok(exit::DONE)
        }
        Some(Err(reason)) => Err(Failure::new(format!(
            "service {run_id} was refused: {reason}"
        ))),
        None => {
            errln!(
                "service {run_id} is queued, not started yet: is a dispatcher running \
                 (`dispatch status`)? `dispatch inspect {}` shows when it starts",
                run_id.short()
            );
            Ok(exit::WAIT_TIMEOUT)
        }
    }
}

/// Whether the service run started (`Ok`), was refused (`Err` with the reason), or
/// neither within [`START_WAIT`] (`None`).
async fn started(log: &RunLog, run_id: RunId) -> Result<Option<Result<(), String>>, Failure> {
    use dispatch_proto::run::v1::run_event::Body;
    let deadline = tokio::time::Instant::now() + START_WAIT;
    let mut handle = log.handle(run_id).await?;
    loop {
        for body in handle.bodies() {
            match body {
                Body::RunStarted(_) => return Ok(Some(Ok(()))),
                Body::RunFinished(f) => return Ok(Some(Err(f.reason.clone()))),
                _ => {}
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        handle.wait_for_more(deadline - now).await?;
    }
}

/// `dispatch wake SERVICE [PAYLOAD]`: a manual wake, a run of the service's goal.
pub async fn wake(bus: &Bus, log: &RunLog, service: RunId, payload: &str) -> Result<u8, Failure> {
    let first = log.first_event(&service).await?;
    let requested = match first.and_then(|e| e.event.body) {
        Some(dispatch_proto::run::v1::run_event::Body::RunRequested(r))
            if r.kind == dispatch_runlog::service::KIND =>
        {
            r
        }
        _ => return Err(Failure::new(format!("run {service} is not a service run"))),
    };
    let goal = Goal::new(
        &requested.goal,
        &requested.conversation_id,
        requested.timeout_ms,
        "cli",
    )
    .and_then(|goal| goal.with_payload(payload))
    .and_then(|goal| goal.woken(service, dispatch_runlog::service::WAKE_MANUAL))
    .map_err(|e| Failure::new(e.to_string()))?;
    let run_id = submit_goal(bus, goal).await?;
    outln!("{run_id}");
    Ok(exit::DONE)
}

/// The shortest shared secret taken: its digest is in the service's log, where a short
/// one could be guessed back from it.
const MIN_SECRET_CHARS: usize = 16;

/// The service's spec from the file and the flags.
fn spec(args: &ServeArgs, file: &Agentfile, secret: Option<&str>) -> Result<ServiceSpec, Failure> {
    if let Some(secret) = secret
        && secret.chars().count() < MIN_SECRET_CHARS
    {
        return Err(Failure::new(format!(
            "the listeners' shared secret is too short: at least {MIN_SECRET_CHARS} characters \
             (say `openssl rand -hex 16`)"
        )));
    }
    let flag_schedules = args.schedule.iter().map(|e| (e.clone(), args.tz.clone()));
    let mut schedules = Vec::new();
    for (expression, time_zone) in file.schedules.iter().cloned().chain(flag_schedules) {
        dispatch_cron::Expr::parse(&expression, &time_zone)
            .map_err(|e| Failure::new(format!("--schedule: {e}")))?;
        schedules.push(ServiceSchedule {
            expression,
            time_zone,
            payload: String::new(),
        });
    }
    let interval = duration(args.interval, file.interval.as_deref())?;
    let flag_methods = args.listen_method.iter().map(|m| m.to_ascii_uppercase());
    let methods = merged(file.listen_methods.iter().cloned().chain(flag_methods));
    let policy = Listener {
        path: args
            .listen_path
            .clone()
            .or(file.listen_path.clone())
            .unwrap_or_default(),
        methods,
        secret_sha256: secret
            .map_or_else(Vec::new, |s| sha2::Sha256::digest(s.as_bytes()).to_vec()),
        signing_secret: args
            .listen_signing_secret
            .clone()
            .or(file.listen_signing_secret.clone())
            .unwrap_or_default(),
        max_body_bytes: args
            .listen_max_body_bytes
            .or(file.listen_max_body_bytes)
            .unwrap_or(0),
        max_header_bytes: args
            .listen_max_header_bytes
            .or(file.listen_max_header_bytes)
            .unwrap_or(0),
        ..Default::default()
    };
    // Every listener has the same policy: two are the same when their address or hook is.
    let bound = file.listen.iter().chain(&args.listen).map(|addr| Listener {
        listen_addr: addr.clone(),
        ..policy.clone()
    });
    let hooks = file.hooks.iter().chain(&args.hook).map(|hook| Listener {
        hook: hook.clone(),
        ..policy.clone()
    });
    let listeners = merged(bound.chain(hooks));
    let has_policy = !policy.path.is_empty()
        || !policy.methods.is_empty()
        || secret.is_some()
        || !policy.signing_secret.is_empty();
    if listeners.is_empty() && has_policy {
        return Err(Failure::new(
            "listener settings without a listener: add --listen ADDR or --hook A/B/C",
        ));
    }
    Ok(ServiceSpec {
        source: args
            .agentfile
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        schedules: merged(schedules),
        interval_ms: interval.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        listeners,
    })
}

/// `items` in order, each once: how the Agentfile's and the flags' lists combine.
fn merged<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut kept = Vec::new();
    for item in items {
        if !kept.contains(&item) {
            kept.push(item);
        }
    }
    kept
}

/// A duration from its flag, else from the Agentfile's text of it, else none.
fn duration(flag: Option<Duration>, file: Option<&str>) -> Result<Option<Duration>, Failure> {
    match (flag, file) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(text)) => parse_duration(text).map(Some).map_err(Failure::new),
        (None, None) => Ok(None),
    }
}

/// The shared secret listeners require, if any: the flag's, or the value of the
/// `SECRET` the Agentfile's `LISTEN_SECRET` names (its environment variable, then the
/// secret store).
async fn shared_secret(
    bus: &Bus,
    workspace: &Path,
    args: &ServeArgs,
    file: &Agentfile,
) -> Result<Option<Zeroizing<String>>, Failure> {
    if let Some(token) = &args.listen_shared_secret {
        if token.is_empty() {
            return Err(Failure::new("--listen-shared-secret is empty"));
        }
        return Ok(Some(Zeroizing::new(token.clone())));
    }
    let Some(name) = &file.listen_secret else {
        return Ok(None);
    };
    if let Ok(value) = std::env::var(name)
        && !value.is_empty()
    {
        return Ok(Some(Zeroizing::new(value)));
    }
    let path = dispatch_secrets::key_path(workspace);
    let key = dispatch_secrets::Key::load(&path).map_err(|e| Failure::new(e.to_string()))?;
    let store = dispatch_secrets::Store::open(bus, path, key)
        .await
        .map_err(|e| Failure::new(e.to_string()))?;
    match store.value(name).await {
        Ok(value) => Ok(Some(value)),
        Err(dispatch_secrets::Error::NotFound(_)) => Err(Failure::new(format!(
            "LISTEN_SECRET {name}: set the environment variable {name}, or store it with \
             `dispatch secret set {name}`"
        ))),
        Err(e) => Err(Failure::new(format!("LISTEN_SECRET {name}: {e}"))),
    }
}
