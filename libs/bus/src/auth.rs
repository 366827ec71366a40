//! Who may do what on Dispatch's bus.
//!
//! Every process connects as one [`Identity`]: a service, the operator's CLI, or the
//! admin identity that `dispatch up` and the test harness use to declare streams. Each
//! identity is an nkey pair; the server knows only the public keys, and each process
//! holds its own seed (a file with mode 0600). What an identity may publish and
//! subscribe to is [`Identity::permissions`], written into the nats-server
//! configuration by [`server_config`], so the matrix lives in code, next to the subjects
//! it names, and ARCHITECTURE.md documents it.
//!
//! Three rules hold for every identity but admin:
//! - it subscribes only to its own inbox prefix (`_INBOX_<identity>.>`) for replies, so
//!   no process reads or forges another's replies; it answers requests through
//!   `allow_responses` (one reply per request received), never by publishing to inboxes;
//! - it reaches the JetStream API only for the streams and durable consumers it needs,
//!   and never for a stream delete, purge, message delete or update;
//! - readers create only unnamed (ephemeral) consumers, so none can take over a
//!   service's durable work-queue consumer.
//!
//! All identities live in one NATS account, [`ACCOUNT`]. Tenancy adds one account per
//! tenant with the same users and permissions inside it; nothing here names the
//! account in a subject.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::catalogue;
use crate::durability::SyncPolicy;
use crate::streams::{self, consumers};
use crate::subject::LogWriter;
use crate::{Error, ErrorKind, subject};

/// The NATS account Dispatch's identities live in.
pub const ACCOUNT: &str = "DISPATCH";

/// File name suffix of a seed file: `<identity>.nk`.
const SEED_SUFFIX: &str = "nk";

/// A process's identity on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    Ingress,
    Dispatcher,
    Policy,
    Connectors,
    Ledger,
    Streamer,
    Scheduler,
    /// The operator's `dispatch` CLI: submits, asks for stops, prunes; writes no run log.
    Cli,
    /// Declares and updates streams (`dispatch up`, the test harness, an operator's
    /// tools). Never given to a service.
    Admin,
}

impl Identity {
    pub const ALL: [Identity; 9] = [
        Identity::Ingress,
        Identity::Dispatcher,
        Identity::Policy,
        Identity::Connectors,
        Identity::Ledger,
        Identity::Streamer,
        Identity::Scheduler,
        Identity::Cli,
        Identity::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Identity::Ingress => "ingress",
            Identity::Dispatcher => "dispatcher",
            Identity::Policy => "policy",
            Identity::Connectors => "connectors",
            Identity::Ledger => "ledger",
            Identity::Streamer => "streamer",
            Identity::Scheduler => "scheduler",
            Identity::Cli => "cli",
            Identity::Admin => "admin",
        }
    }

    /// The identity of the service called `name`, if there is one.
    pub fn of_service(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.name() == name)
    }

    /// The prefix of this identity's reply subjects.
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }

    /// What this identity may publish and subscribe to.
    pub fn permissions(self) -> Permissions {
        let mut p = Permissions::default();
        if self == Identity::Admin {
            p.publish.allow.push(">".into());
            p.subscribe.allow.push(">".into());
            // Even the admin cannot delete a stream or rewrite the logs of truth, nor
            // speak for the server on the run feeds.
            p.publish.deny.push(format!("{JS_API}.STREAM.DELETE.>"));
            p.publish.deny.push(FEEDS_ANY.into());
            for stream in [streams::RUNS, streams::LEDGER] {
                p.publish
                    .deny
                    .push(format!("{JS_API}.STREAM.PURGE.{stream}"));
                p.publish
                    .deny
                    .push(format!("{JS_API}.STREAM.MSG.DELETE.{stream}"));
            }
            return p;
        }
        p.subscribe.allow.push(format!("{}.>", self.inbox_prefix()));
        p.publish.allow.push(format!("{JS_API}.INFO"));
        // Bus::connect declares any missing stream (create only: an existing stream
        // with another configuration is refused by the server, never changed).
        for stream in streams::ALL {
            p.publish
                .allow
                .push(format!("{JS_API}.STREAM.INFO.{stream}"));
            p.publish
                .allow
                .push(format!("{JS_API}.STREAM.CREATE.{stream}"));
        }
        let service = |p: &mut Permissions, name: &str| {
            p.publish.allow.push(subject::probe(name).to_string());
            p.subscribe.allow.push(subject::health(name).to_string());
            p.subscribe
                .allow
                .push(format!("{}.*", subject::health(name)));
            p.allow_responses = true;
        };
        match self {
            Identity::Ingress => {
                service(&mut p, "ingress");
                p.publish.allow.push(subject::GOALS_ALL.into());
                // Reading back the goal an idempotency key already stored.
                p.publish
                    .allow
                    .push(format!("{JS_API}.DIRECT.GET.{}", streams::GOALS));
                p.publish.allow.push(subject::query::ALL.into());
                // Answering approvals; changing the policy stays with the CLI.
                p.publish.allow.push(subject::policy::RESOLVE.into());
                // Stopping runs, through the dispatcher: ingress writes no run log.
                p.publish.allow.push(subject::cmd::STOP.into());
                p.publish.allow.push(subject::schedule::ALL.into());
                // Serving conversation streams and run logs to clients.
                p.read(&[streams::CONVERSATIONS, streams::RUNS]);
                // Serving service runs' listeners: watched, claimed, removed once their
                // service has ended; a signed listener's key read from the secrets.
                p.read(&[streams::LISTENERS, streams::SECRETS]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::LISTENERS_BUCKET));
                // Which run each signed webhook delivery woke.
                p.look_up(&[streams::WEBHOOKS]);
                // Whether a conversation has a turn running (a message that must not
                // wait is refused at the door).
                p.look_up(&[streams::TURNS]);
                // What agents remember, for people to read (`GET /v1/memory`).
                p.read(&[streams::MEMORY]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::WEBHOOKS_BUCKET));
            }
            Identity::Dispatcher => {
                service(&mut p, "dispatcher");
                // The secrets' values, sealed: to scrub them from what models write.
                p.read(&[
                    streams::RUNS,
                    streams::GOALS,
                    catalogue::STREAM,
                    streams::SECRETS,
                ]);
                p.work(streams::GOALS, consumers::DISPATCHER_GOALS);
                p.work(streams::COMMANDS, consumers::DISPATCHER_STOPS);
                p.publish
                    .allow
                    .push(subject::runs_written_by(LogWriter::Dispatcher));
                for command in [subject::cmd::TOOL, subject::ask::POLICY, subject::ask::GATE] {
                    p.publish.allow.push(command.into());
                }
                // Chat turns: their conversations' heads, and the feedback notes drained
                // at the top of each turn.
                p.read(&[streams::TURNS]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::TURNS_BUCKET));
                p.publish.allow.push(subject::query::TASKS.into());
                // A service run's schedules and listeners.
                p.publish.allow.push(subject::schedule::ADD.into());
                p.look_up(&[streams::LISTENERS]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::LISTENERS_BUCKET));
            }
            Identity::Policy => {
                service(&mut p, "policy");
                p.read(&[streams::RUNS, streams::POLICY, catalogue::STREAM]);
                p.publish.allow.push(catalogue_key(catalogue::POLICY_KEY));
                p.publish.allow.push(subject::POLICY_DOCUMENT.into());
                p.subscribe.allow.push(format!(
                    "{} {}",
                    subject::ask::POLICY,
                    subject::ask::POLICY_GROUP
                ));
                p.publish
                    .allow
                    .push(subject::runs_written_by(LogWriter::Policy));
                p.subscribe.allow.push(format!(
                    "{} {}",
                    subject::policy::ALL,
                    subject::policy::POLICY_GROUP
                ));
            }
            Identity::Connectors => {
                // Asking whether the copy that started an unfinished call still runs.
                p.publish
                    .allow
                    .push(format!("{}.*", subject::health("connectors")));
                service(&mut p, "connectors");
                p.read(&[streams::RUNS, catalogue::STREAM, streams::SECRETS]);
                p.publish
                    .allow
                    .push(catalogue_key(&format!("{}>", catalogue::TOOLS_PREFIX)));
                p.work(streams::COMMANDS, consumers::CONNECTOR_CALLS);
                p.subscribe.allow.push(format!(
                    "{} {}",
                    subject::ask::GATE,
                    subject::ask::CONNECTORS_GROUP
                ));
                p.publish
                    .allow
                    .push(subject::runs_written_by(LogWriter::Connectors));
                // The hand-off tools of chat turns (`dispatch.*`): a goal for the
                // conversation (read back when its id was stored already), its tasks
                // and notes, one of its runs, a stop through the dispatcher.
                p.publish.allow.push(subject::GOALS_ALL.into());
                p.look_up(&[streams::GOALS]);
                p.publish.allow.push(subject::query::TASKS.into());
                p.publish.allow.push(subject::query::RUN.into());
                p.publish.allow.push(subject::cmd::STOP.into());
                // The history tools: earlier runs found by words, a conversation's runs.
                p.publish.allow.push(subject::query::SEARCH.into());
                p.publish.allow.push(subject::query::RUNS.into());
                // The memory tools: the owners' entries, read and written.
                p.read(&[streams::MEMORY]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::MEMORY_BUCKET));
            }
            Identity::Ledger => {
                service(&mut p, "ledger");
                p.read(&[streams::RUNS, streams::GOALS, streams::LEDGER]);
                // Where a service's listeners are bound, for its view.
                p.look_up(&[streams::LISTENERS]);
                p.publish.allow.push(subject::DRAINS_ALL.into());
                // Runs it finds that no goal asked for, for the dispatcher to end.
                p.publish.allow.push(subject::cmd::GHOST.into());
                p.subscribe.allow.push(format!(
                    "{} {}",
                    subject::query::ALL,
                    subject::query::QUERY_GROUP
                ));
            }
            Identity::Streamer => {
                service(&mut p, "streamer");
                p.read(&[streams::RUNS, streams::SECRETS, streams::DELIVERIES]);
                p.work(streams::RUNS, consumers::STREAMER);
                p.publish.allow.push(subject::conv::ALL.into());
                // Deliveries of results to callbacks: queued, worked, recorded.
                p.publish.allow.push(subject::cmd::DELIVER.into());
                p.work(streams::COMMANDS, consumers::DELIVERIES);
                p.publish.allow.push(subject::DELIVERIES_ALL.into());
                // Keeping its stream's knobs in line (and its storage: made again),
                // and purging persisted turns.
                for api in ["UPDATE", "PURGE", "DELETE"] {
                    p.publish
                        .allow
                        .push(format!("{JS_API}.STREAM.{api}.{}", streams::CONVERSATIONS));
                }
            }
            Identity::Scheduler => {
                service(&mut p, "scheduler");
                p.subscribe.allow.push(format!(
                    "{} {}",
                    subject::schedule::ALL,
                    subject::schedule::GROUP
                ));
                // Its bucket: watched, created in, updated with expected revisions; a
                // run's last event and a stored goal, by direct get only.
                p.read(&[streams::SCHEDULES]);
                p.look_up(&[streams::RUNS, streams::GOALS]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::SCHEDULES_BUCKET));
                // Each fire stores its run's goal.
                p.publish.allow.push(subject::GOALS_ALL.into());
            }
            Identity::Cli => {
                // `dispatch status`: how far behind each durable consumer is.
                for (stream, consumer, _) in DURABLES {
                    p.publish
                        .allow
                        .push(format!("{JS_API}.CONSUMER.INFO.{stream}.{consumer}"));
                }
                p.read(&[
                    streams::RUNS,
                    streams::GOALS,
                    streams::LEDGER,
                    streams::POLICY,
                    catalogue::STREAM,
                    streams::CONVERSATIONS,
                ]);
                p.publish.allow.push(subject::GOALS_ALL.into());
                p.publish.allow.push(subject::policy::ALL.into());
                p.publish.allow.push(subject::schedule::ALL.into());
                // Stopping runs, through the dispatcher: the CLI writes no run log.
                p.publish.allow.push(subject::cmd::STOP.into());
                p.publish.allow.push(subject::REMOVED.into());
                p.publish.allow.push(subject::query::ALL.into());
                p.publish.allow.push(subject::HEALTH_ALL.into());
                // `dispatch deliveries`: the record read, a given-up delivery queued again
                // (the streamer records it; the CLI writes no record).
                p.read(&[streams::DELIVERIES]);
                p.publish.allow.push(subject::cmd::DELIVER.into());
                // `dispatch secret set/rm/ls` (values sealed with the workspace's key).
                p.read(&[streams::SECRETS]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.*", streams::SECRETS_BUCKET));
                // `dispatch memory ls/rm`: what agents remember, read and removed.
                p.read(&[streams::MEMORY]);
                p.publish
                    .allow
                    .push(format!("$KV.{}.>", streams::MEMORY_BUCKET));
            }
            Identity::Admin => unreachable!("handled above"),
        }
        // Readers pull from their ephemeral consumers by name, which a wildcard
        // matches; a service's durable consumer is named, so deny it to everyone else.
        // Nobody but the admin deletes a durable, its owner included.
        for (stream, consumer, owner) in DURABLES {
            let deny = &mut p.publish.deny;
            deny.push(format!("{JS_API}.CONSUMER.DELETE.{stream}.{consumer}"));
            if owner != self {
                for api in ["MSG.NEXT", "CREATE"] {
                    deny.push(format!("{JS_API}.CONSUMER.{api}.{stream}.{consumer}"));
                }
                deny.push(format!("{JS_API}.CONSUMER.CREATE.{stream}.{consumer}.>"));
            }
        }
        p
    }
}

/// Every durable consumer, with the one identity that takes work from it.
pub const DURABLES: [(&str, &str, Identity); 5] = [
    (
        streams::GOALS,
        consumers::DISPATCHER_GOALS,
        Identity::Dispatcher,
    ),
    (
        streams::COMMANDS,
        consumers::DISPATCHER_STOPS,
        Identity::Dispatcher,
    ),
    (
        streams::COMMANDS,
        consumers::CONNECTOR_CALLS,
        Identity::Connectors,
    ),
    (streams::RUNS, consumers::STREAMER, Identity::Streamer),
    (streams::COMMANDS, consumers::DELIVERIES, Identity::Streamer),
];

/// The subject a put of catalogue key `key` is published on.
fn catalogue_key(key: &str) -> String {
    format!("$KV.{}.{key}", catalogue::BUCKET)
}

/// Every feed subject, of any shape: only the server publishes there.
const FEEDS_ANY: &str = "dispatch.feed.>";

/// The JetStream API prefix (no domain: Dispatch's streams are in its own account).
const JS_API: &str = "$JS.API";

/// Subject permissions in nats-server's configuration shape.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Rule,
    pub subscribe: Rule,
    /// May answer requests it received (one reply each), whatever their reply subject.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_responses: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Rule {
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl Permissions {
    /// Reading streams: single messages ([`Self::look_up`]), unnamed ordered consumers
    /// (create, pull, info), live run events.
    fn read(&mut self, read: &[&str]) {
        self.look_up(read);
        for stream in read {
            let allow = &mut self.publish.allow;
            allow.push(format!("{JS_API}.CONSUMER.CREATE.{stream}"));
            // An ordered consumer that lost its server (a node killed, a leader moved)
            // recreates itself under a name of its own (`<name>_<n>`, with its filter)
            // and deletes the one it had; durables stay denied to all but their owner.
            allow.push(format!("{JS_API}.CONSUMER.CREATE.{stream}.*"));
            allow.push(format!("{JS_API}.CONSUMER.CREATE.{stream}.*.>"));
            allow.push(format!("{JS_API}.CONSUMER.DELETE.{stream}.*"));
            allow.push(format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.*"));
            // An ordered consumer asks for its own state when heartbeats stop (a NATS
            // restart); without this it stalls until the next restart.
            allow.push(format!("{JS_API}.CONSUMER.INFO.{stream}.*"));
            if *stream == streams::RUNS {
                self.subscribe.allow.push(subject::RUNS_ALL.into());
                self.subscribe.allow.push(subject::FEEDS_ALL.into());
            }
        }
    }

    /// Single messages of `streams` by sequence or subject (direct gets, and the
    /// leader's answer where a follower's may be behind), nothing else of them: no
    /// consumers, no subscriptions.
    fn look_up(&mut self, streams: &[&str]) {
        for stream in streams {
            let allow = &mut self.publish.allow;
            allow.push(format!("{JS_API}.DIRECT.GET.{stream}"));
            allow.push(format!("{JS_API}.DIRECT.GET.{stream}.>"));
            // The leader's own answer, where a follower's may be behind (`reads`).
            allow.push(format!("{JS_API}.STREAM.MSG.GET.{stream}"));
        }
    }

    /// Taking work from one durable consumer: declare it, pull, and acknowledge.
    fn work(&mut self, stream: &str, consumer: &str) {
        let allow = &mut self.publish.allow;
        allow.push(format!("{JS_API}.CONSUMER.CREATE.{stream}.{consumer}"));
        allow.push(format!("{JS_API}.CONSUMER.CREATE.{stream}.{consumer}.>"));
        allow.push(format!("{JS_API}.CONSUMER.INFO.{stream}.{consumer}"));
        allow.push(format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
        allow.push(format!("$JS.ACK.{stream}.{consumer}.>"));
    }
}

/// How a process proves its identity to NATS.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials: for a server without authentication.
    #[default]
    None,
    /// An nkey seed (`SU…`).
    Nkey(String),
    /// A credentials file (user JWT and seed), for servers run in operator mode.
    CredsFile(PathBuf),
}

// The seed is a secret: never print it.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Nkey(_) => f.write_str("Nkey(********)"),
            Credentials::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

impl Credentials {
    /// Reads an nkey seed file, refusing one that others may read.
    pub fn nkey_file(path: &Path) -> Result<Self, Error> {
        let fail = |m: String| Error::new(ErrorKind::Other, format!("{}: {m}", path.display()));
        check_private(path).map_err(fail)?;
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let seed = text.trim();
        nkeys::KeyPair::from_seed(seed).map_err(|e| fail(format!("not an nkey seed ({e})")))?;
        Ok(Credentials::Nkey(seed.to_owned()))
    }

    pub(crate) async fn apply(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, Error> {
        Ok(match self {
            Credentials::None => options,
            Credentials::Nkey(seed) => options.nkey(seed.clone()),
            Credentials::CredsFile(path) => {
                check_private(path).map_err(|m| {
                    Error::new(ErrorKind::Other, format!("{}: {m}", path.display()))
                })?;
                options
                    .credentials_file(path)
                    .await
                    .map_err(|e| Error::new(ErrorKind::Other, format!("{}: {e}", path.display())))?
            }
        })
    }
}

/// A secret file must be readable by its owner only.
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {mode:o} lets others read this secret; run `chmod 600` on it"
        ));
    }
    Ok(())
}

/// Where `identity`'s seed is kept in a directory of seeds.
pub fn seed_path(dir: &Path, identity: Identity) -> PathBuf {
    dir.join(format!("{}.{SEED_SUFFIX}", identity.name()))
}

/// Makes sure `dir` holds a seed for every identity (mode 0600, in a 0700 directory),
/// keeping the ones already there, and returns each identity's public key.
pub fn ensure_seeds(dir: &Path) -> Result<Vec<(Identity, String)>, Error> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail =
        |p: &Path, e: std::io::Error| Error::new(ErrorKind::Other, format!("{}: {e}", p.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(dir, e))?;
    let mut out = Vec::new();
    for identity in Identity::ALL {
        let path = seed_path(dir, identity);
        if !path.exists() {
            let pair = nkeys::KeyPair::new_user();
            let seed = pair
                .seed()
                .map_err(|e| Error::new(ErrorKind::Other, format!("nkey seed: {e}")))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| fail(&path, e))?;
            file.write_all(format!("{seed}\n").as_bytes())
                .map_err(|e| fail(&path, e))?;
        }
        let Credentials::Nkey(seed) = Credentials::nkey_file(&path)? else {
            unreachable!("nkey_file reads a seed");
        };
        let pair = nkeys::KeyPair::from_seed(&seed)
            .map_err(|e| Error::new(ErrorKind::Other, format!("{}: {e}", path.display())))?;
        out.push((identity, pair.public_key()));
    }
    Ok(out)
}

/// The nats-server configuration (JSON, which nats-server reads as its own format)
/// that admits exactly `users` with their permissions, JetStream enabled for the
/// account, and JetStream syncing its files to disk as `sync` says. Listen address,
/// port and store are left to the command line.
pub fn server_config(users: &[(Identity, String)], sync: SyncPolicy) -> serde_json::Value {
    let users: Vec<serde_json::Value> = users
        .iter()
        .map(|(identity, public)| {
            serde_json::json!({ "nkey": public, "permissions": identity.permissions() })
        })
        .collect();
    serde_json::json!({
        "jetstream": { "sync_interval": sync.server_value() },
        "accounts": { ACCOUNT: { "jetstream": "enabled", "users": users } }
    })
}

/// Writes [`server_config`] for the seeds in `seeds` to `path` (mode 0600).
pub fn write_server_config(seeds: &Path, path: &Path, sync: SyncPolicy) -> Result<(), Error> {
    let users = ensure_seeds(seeds)?;
    let text = serde_json::to_vec_pretty(&server_config(&users, sync))
        .map_err(|e| Error::new(ErrorKind::Other, format!("encode server config: {e}")))?;
    write_private(path, &text)
        .map_err(|e| Error::new(ErrorKind::Other, format!("{}: {e}", path.display())))
}

/// Replaces `path` with `bytes` atomically, readable by its owner only: a fresh
/// temporary file beside it (random name, `O_EXCL`, mode 0600), synced, then renamed
/// over `path`. A missing directory is created with mode 0700.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let temp = path.with_extension(format!("{}.tmp", uuid::Uuid::now_v7().simple()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RunId;

    fn may_publish(identity: Identity, subject: &str) -> bool {
        let p = identity.permissions();
        let hit = |patterns: &[String]| patterns.iter().any(|pat| matches(pat, subject));
        hit(&p.publish.allow) && !hit(&p.publish.deny)
    }

    /// NATS subject matching: `*` one token, `>` one or more trailing tokens.
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn each_writer_appends_only_on_its_own_subject() {
        let run: RunId = "0197a0c8-0000-7000-8000-000000000000".parse().unwrap();
        for writer in LogWriter::ALL {
            let on = subject::run(&run, writer);
            for identity in Identity::ALL {
                let expected = identity == Identity::Admin
                    || matches!(
                        (identity, writer),
                        (Identity::Dispatcher, LogWriter::Dispatcher)
                            | (Identity::Policy, LogWriter::Policy)
                            | (Identity::Connectors, LogWriter::Connectors)
                    );
                assert_eq!(
                    may_publish(identity, on.as_str()),
                    expected,
                    "{identity:?} {on}"
                );
            }
        }
        // Nobody but the admin writes outside the three roles' subjects of a run, nor
        // under another account (tenancy gives each its own).
        for stray in [
            format!("dispatch.run.default.{run}.cli"),
            format!("dispatch.run.default.{run}"),
            format!("dispatch.run.acme.{run}.dispatcher"),
        ] {
            for identity in Identity::ALL {
                assert_eq!(
                    may_publish(identity, &stray),
                    identity == Identity::Admin,
                    "{identity:?} {stray}"
                );
            }
        }
        // ...and nobody at all, the admin included, speaks for the server on a feed.
        for identity in Identity::ALL {
            let feed = format!("dispatch.feed.default.{run}");
            assert!(!may_publish(identity, &feed), "{identity:?}");
        }
        for identity in Identity::ALL {
            let expected = identity == Identity::Dispatcher || identity == Identity::Admin;
            assert_eq!(
                may_publish(identity, subject::cmd::TOOL),
                expected,
                "{identity:?}"
            );
        }
    }

    #[test]
    fn only_the_streamer_records_deliveries_and_the_cli_queues_them_again() {
        use Identity::*;
        let run: RunId = "0197a0c8-0000-7000-8000-000000000000".parse().unwrap();
        let record = subject::delivery(&run);
        let read_record = format!("$JS.API.DIRECT.GET.{}", streams::DELIVERIES);
        for identity in Identity::ALL {
            assert_eq!(
                may_publish(identity, record.as_str()),
                matches!(identity, Streamer | Admin),
                "{identity:?}"
            );
            assert_eq!(
                may_publish(identity, subject::cmd::DELIVER),
                matches!(identity, Streamer | Cli | Admin),
                "{identity:?}"
            );
            assert_eq!(
                may_publish(identity, &read_record),
                matches!(identity, Streamer | Cli | Admin),
                "{identity:?}"
            );
        }
        // Whether the signing secret is set, asked at the doors that take callbacks:
        // one direct get of its entry (the dispatcher reads every secret, sealed, to
        // scrub them from what models write). Only the CLI writes the bucket.
        let secret = format!(
            "$JS.API.DIRECT.GET.{}.$KV.{}.webhook-signing",
            streams::SECRETS,
            streams::SECRETS_BUCKET
        );
        let put = format!("$KV.{}.webhook-signing", streams::SECRETS_BUCKET);
        for identity in Identity::ALL {
            assert_eq!(
                may_publish(identity, &secret),
                matches!(
                    identity,
                    Ingress | Cli | Connectors | Streamer | Dispatcher | Admin
                ),
                "{identity:?}"
            );
            assert_eq!(
                may_publish(identity, &put),
                matches!(identity, Cli | Admin),
                "{identity:?}"
            );
        }
    }

    #[test]
    fn nobody_deletes_or_purges_the_logs() {
        for identity in Identity::ALL {
            for stream in [streams::RUNS, streams::LEDGER] {
                for api in [
                    "STREAM.DELETE",
                    "STREAM.PURGE",
                    "STREAM.MSG.DELETE",
                    "STREAM.UPDATE",
                ] {
                    let subject = format!("$JS.API.{api}.{stream}");
                    let admin_may = identity == Identity::Admin && api == "STREAM.UPDATE";
                    assert_eq!(
                        may_publish(identity, &subject),
                        admin_may,
                        "{identity:?} {subject}"
                    );
                }
            }
        }
    }

    #[test]
    fn readers_cannot_take_over_a_durable_consumer() {
        for (stream, consumer, owner) in DURABLES {
            for api in ["CONSUMER.CREATE", "CONSUMER.MSG.NEXT", "CONSUMER.DELETE"] {
                let subject = format!("$JS.API.{api}.{stream}.{consumer}");
                for identity in Identity::ALL {
                    // Even the owner only declares and takes from its durable.
                    let owns = identity == owner && api != "CONSUMER.DELETE";
                    let expected = owns || identity == Identity::Admin;
                    assert_eq!(
                        may_publish(identity, &subject),
                        expected,
                        "{identity:?} {subject}"
                    );
                }
            }
        }
        // ...while pulling from an ephemeral consumer of a stream it reads is fine, and
        // so is an ordered consumer recreating itself by name after its node went away.
        assert!(may_publish(
            Identity::Ledger,
            "$JS.API.CONSUMER.MSG.NEXT.DISPATCH_GOALS.x1Yz"
        ));
        for subject in [
            "$JS.API.CONSUMER.CREATE.KV_DISPATCH_LISTENERS.FLx2WV4a_1.$KV.DISPATCH_LISTENERS.>",
            "$JS.API.CONSUMER.DELETE.KV_DISPATCH_LISTENERS.FLx2WV4a",
        ] {
            assert!(may_publish(Identity::Ingress, subject), "{subject}");
        }
    }

    #[test]
    fn seeds_are_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let seeds = dir.path().join("auth");
        let first = ensure_seeds(&seeds).unwrap();
        let again = ensure_seeds(&seeds).unwrap();
        assert_eq!(first, again);
        for identity in Identity::ALL {
            let mode = std::fs::metadata(seed_path(&seeds, identity))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let path = seed_path(&seeds, Identity::Cli);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credentials::nkey_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let shown = format!("{:?}", Credentials::Nkey("SUsecret".into()));
        assert!(!shown.contains("secret"));
    }
}
