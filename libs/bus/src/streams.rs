//! The streams Dispatch keeps, declared idempotently by whichever process starts first.

use std::time::Duration;

use async_nats::jetstream::stream::{
    Config, DiscardPolicy, Republish, RetentionPolicy, StorageType,
};

use crate::{Bus, Error, subject};

/// Submitted goals, one subject per run. Limits retention, so the ledger can show a
/// goal as queued before any dispatcher takes it; the dispatchers' shared durable
/// consumer still hands each goal to one copy.
pub const GOALS: &str = "DISPATCH_GOALS";
/// Every run's append-only event log, one subject per run.
pub const RUNS: &str = "DISPATCH_RUNS";
/// Commands (policy check, tool call, gate check): each handled once.
pub const COMMANDS: &str = "DISPATCH_COMMANDS";
/// Events the ledger itself owns: feedback drains.
pub const LEDGER: &str = "DISPATCH_LEDGER";

/// The policy document, one message per version (`dispatch.policy.document`).
pub const POLICY: &str = "DISPATCH_POLICY";
/// How many versions of the policy document are kept.
pub const POLICY_HISTORY: i64 = 1000;

/// Conversation streams: chunks of output, one subject per conversation. A resume
/// buffer, not a record: the streamer purges a conversation once its runs' transcripts
/// are persisted, and `max_age` expires what never was.
pub const CONVERSATIONS: &str = "DISPATCH_CONVERSATIONS";

/// Deliveries of finished runs' results to their callbacks: every attempt, one
/// subject per run (`dispatch.delivery.<run_id>`).
pub const DELIVERIES: &str = "DISPATCH_DELIVERIES";

/// One tiny message per service: written to learn whether JetStream accepts writes
/// (see [`crate::health::probe_writes`]). Holds nothing anyone reads.
pub const PROBE: &str = "DISPATCH_PROBE";

/// Every stream, in declaration order; from the tool catalogue's ([`crate::catalogue`])
/// on, the streams behind key-value buckets.
pub const ALL: [&str; 15] = [
    GOALS,
    RUNS,
    COMMANDS,
    LEDGER,
    PROBE,
    POLICY,
    CONVERSATIONS,
    DELIVERIES,
    crate::catalogue::STREAM,
    SECRETS,
    SCHEDULES,
    LISTENERS,
    WEBHOOKS,
    TURNS,
    MEMORY,
];

/// The secrets bucket: names → values encrypted with the workspace's secrets key
/// (`dispatch-secrets` holds the cipher; the bus only declares the bucket). Only the
/// CLI writes it; the connectors read it, and ingress reads the signing keys of
/// listeners that check Standard Webhooks signatures.
pub const SECRETS_BUCKET: &str = "DISPATCH_SECRETS";
/// The stream behind [`SECRETS_BUCKET`].
pub const SECRETS: &str = "KV_DISPATCH_SECRETS";
/// The largest stored (encrypted) secret.
pub const MAX_SECRET_BYTES: i32 = 16 * 1024;

fn secrets() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: SECRETS_BUCKET.to_owned(),
        description: "Dispatch secrets, encrypted with the workspace's key".to_owned(),
        history: 1,
        max_value_size: MAX_SECRET_BYTES,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// The schedules bucket: one `Schedule` (protobuf) per key, the key its id.
pub const SCHEDULES_BUCKET: &str = "DISPATCH_SCHEDULES";
/// The stream behind [`SCHEDULES_BUCKET`].
pub const SCHEDULES: &str = "KV_DISPATCH_SCHEDULES";
/// The largest stored schedule (a goal and a payload of at most 4 KiB each fit).
pub const MAX_SCHEDULE_BYTES: i32 = 32 * 1024;
/// The most schedules the bucket holds.
pub const MAX_SCHEDULES: i64 = 100_000;

fn schedules() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: SCHEDULES_BUCKET.to_owned(),
        description: "Dispatch schedules, kept by the scheduler".to_owned(),
        history: 1,
        max_value_size: MAX_SCHEDULE_BYTES,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// The listeners bucket: one `ListenerEntry` (protobuf) per live listener of a service
/// run, under `<run_id>.<n>`, and a hook's also under `hook.<account>.<agent>.<channel>`.
/// The dispatcher writes them when a service starts; ingress serves, claims and
/// removes them.
pub const LISTENERS_BUCKET: &str = "DISPATCH_LISTENERS";
/// The stream behind [`LISTENERS_BUCKET`].
pub const LISTENERS: &str = "KV_DISPATCH_LISTENERS";
/// The largest stored listener entry (a goal of at most 8000 characters fits).
pub const MAX_LISTENER_BYTES: i32 = 48 * 1024;

fn listeners() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: LISTENERS_BUCKET.to_owned(),
        description: "Dispatch service runs' webhook listeners, served by ingress".to_owned(),
        history: 1,
        max_value_size: MAX_LISTENER_BYTES,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// The conversations' turns bucket: one `ConversationHead` (protobuf) per conversation,
/// under [`turns_key`]: its newest chat turn and the one before. Dispatchers take the
/// head by compare-and-set when a turn joins the conversation, so its turns form one
/// chain; the history kept lets a turn that was interrupted between taking the head and
/// recording its place find the place again.
pub const TURNS_BUCKET: &str = "DISPATCH_TURNS";
/// The stream behind [`TURNS_BUCKET`].
pub const TURNS: &str = "KV_DISPATCH_TURNS";
/// How many heads of one conversation are kept. They are read only by a turn that took
/// the head and stopped before recording its place (or by a turn walking past such a
/// one), a window of milliseconds in which few other turns of the same conversation can
/// take the head; the store grows with conversations times this, not with their turns.
pub const TURNS_HISTORY: i64 = 8;

fn turns() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: TURNS_BUCKET.to_owned(),
        description: "Dispatch conversations: the newest turn of each".to_owned(),
        history: TURNS_HISTORY,
        max_value_size: 1024,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// The memory bucket: what conversations' agents keep, one JSON entry per key under
/// `<account>.<agent>.<key>` (`dispatch-memory`). The connectors write it from the
/// `memory` tools; ingress and the CLI read it, and the CLI removes entries.
pub const MEMORY_BUCKET: &str = "DISPATCH_MEMORY";
/// The stream behind [`MEMORY_BUCKET`].
pub const MEMORY: &str = "KV_DISPATCH_MEMORY";

fn memory() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: MEMORY_BUCKET.to_owned(),
        description: "Dispatch memory: what agents keep per owner".to_owned(),
        history: 1,
        max_value_size: 4 * 1024,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// The key of `conversation`'s head in [`TURNS_BUCKET`]: account, agent and the
/// conversation's token, as in its stream's subject.
pub fn turns_key(conversation: &crate::ConversationId) -> String {
    format!(
        "{}.{}.{}",
        crate::subject::conv::DEFAULT_ACCOUNT,
        crate::subject::conv::DEFAULT_AGENT,
        crate::subject::conv::token(conversation)
    )
}

/// The webhook deliveries bucket: which run each signed delivery (a listener's
/// `webhook-id`) woke, so that its retries — re-signed, with a new timestamp, for as
/// long as [`WEBHOOK_MEMORY`] — wake the same run. Ingress only.
pub const WEBHOOKS_BUCKET: &str = "DISPATCH_WEBHOOKS";
/// The stream behind [`WEBHOOKS_BUCKET`].
pub const WEBHOOKS: &str = "KV_DISPATCH_WEBHOOKS";
/// How long a delivery is remembered: longer than senders retry (Standard Webhooks
/// senders retry for up to a few days).
pub const WEBHOOK_MEMORY: Duration = Duration::from_secs(7 * 24 * 3600);

fn webhooks() -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: WEBHOOKS_BUCKET.to_owned(),
        description: "Dispatch webhook deliveries and the runs they woke".to_owned(),
        history: 1,
        max_age: WEBHOOK_MEMORY,
        max_value_size: 128,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Durable consumer names, one per command subject.
pub mod consumers {
    pub const DISPATCHER_GOALS: &str = "dispatcher-goals";
    /// The dispatcher's consumer of stop commands.
    pub const DISPATCHER_STOPS: &str = "dispatcher-stops";
    pub const CONNECTOR_CALLS: &str = "connector-calls";
    /// The streamer's consumer of every run's events (pinned: one copy at a time).
    pub const STREAMER: &str = "streamer";
    /// The streamer's consumer of delivery commands (every copy takes some).
    pub const DELIVERIES: &str = "deliveries";
}

/// The knobs of the conversation stream, which `streamer` keeps the existing stream in
/// line with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationKnobs {
    /// Memory (the default) costs no disk write or sync per chunk; a single server
    /// that restarts loses it (a cluster keeps it while a node restarts), and readers
    /// then resume from the runs' transcripts. File storage keeps it on disk.
    pub memory: bool,
    /// The backstop: chunks of a turn that never persisted expire after this long.
    pub max_age: Duration,
    /// Most chunks kept per conversation (-1: no limit).
    pub max_msgs_per_subject: i64,
    pub replicas: usize,
}

impl Default for ConversationKnobs {
    fn default() -> Self {
        Self {
            memory: true,
            max_age: Duration::from_secs(180),
            max_msgs_per_subject: 100_000,
            replicas: 1,
        }
    }
}

/// The conversation stream's configuration with `knobs`.
pub fn conversations(knobs: &ConversationKnobs) -> Config {
    Config {
        name: CONVERSATIONS.to_owned(),
        description: Some(
            "Dispatch conversation streams: a resume buffer of output chunks".to_owned(),
        ),
        subjects: vec![subject::conv::ALL.to_owned()],
        storage: if knobs.memory {
            StorageType::Memory
        } else {
            StorageType::File
        },
        retention: RetentionPolicy::Limits,
        max_age: knobs.max_age,
        max_messages_per_subject: knobs.max_msgs_per_subject,
        num_replicas: knobs.replicas,
        // Long enough to collapse a chunk published again after a streamer copy died.
        duplicate_window: Duration::from_secs(120).min(knobs.max_age),
        allow_direct: true,
        first_sequence: Some(fresh_first_sequence()),
        ..Default::default()
    }
}

/// The conversation stream, made with `config` if it is missing. Makers ask with
/// different first sequences (the time), so when two make it at once the server
/// refuses one (the name is taken with another configuration), and that one takes the
/// stream the other made.
pub async fn get_or_create_conversations(
    js: &async_nats::jetstream::Context,
    config: Config,
) -> Result<async_nats::jetstream::stream::Stream, String> {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    match js.get_or_create_stream(config).await {
        Ok(stream) => Ok(stream),
        Err(e)
            if matches!(e.kind(), CreateStreamErrorKind::JetStream(error)
            if error.error_code() == async_nats::jetstream::ErrorCode::STREAM_NAME_EXIST) =>
        {
            js.get_stream(CONVERSATIONS)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Where a conversation stream made now starts counting: the time in microseconds.
/// The stream is a buffer that may be lost (memory storage on a server that restarts)
/// or replaced (its storage changed), and one made again starts above every sequence
/// an earlier one used (none stores a chunk a microsecond for its whole life), so a
/// client's cursor from before never names a chunk of the new one. Readers in
/// JavaScript keep such a number exactly (below 2^53 until the 23rd century).
fn fresh_first_sequence() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| since.as_micros() as u64)
        .max(1)
}

/// How long a re-published message with the same `Nats-Msg-Id` is recognised.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

fn runs() -> Config {
    Config {
        name: RUNS.to_owned(),
        description: Some(
            "Dispatch run event logs, one subject per run and writer role".to_owned(),
        ),
        subjects: vec![subject::RUNS_ALL.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        republish: Some(feed()),
        ..Default::default()
    }
}

/// Each stored run event, republished with its stream sequence to the run's feed.
fn feed() -> Republish {
    Republish {
        source: subject::RUNS_ALL.to_owned(),
        destination: subject::FEED_TEMPLATE.to_owned(),
        headers_only: false,
    }
}

fn goals() -> Config {
    Config {
        name: GOALS.to_owned(),
        description: Some("Dispatch goals, one subject per run".to_owned()),
        subjects: vec![subject::GOALS_ALL.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        max_age: Duration::from_secs(30 * 24 * 3600),
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

fn commands() -> Config {
    Config {
        name: COMMANDS.to_owned(),
        description: Some("Dispatch commands, each handled by one service copy".to_owned()),
        subjects: vec![subject::COMMANDS_ALL.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::WorkQueue,
        discard: DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

fn ledger() -> Config {
    Config {
        name: LEDGER.to_owned(),
        description: Some("Dispatch ledger events (feedback drains)".to_owned()),
        subjects: vec![subject::LEDGER_ALL.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

fn policy() -> Config {
    Config {
        name: POLICY.to_owned(),
        description: Some(
            "Dispatch policy document versions; the last is in force, the rest its audit"
                .to_owned(),
        ),
        subjects: vec![subject::POLICY_DOCUMENT.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        max_messages_per_subject: POLICY_HISTORY,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

fn deliveries() -> Config {
    Config {
        name: DELIVERIES.to_owned(),
        description: Some("Dispatch deliveries of run results to callbacks".to_owned()),
        subjects: vec![subject::DELIVERIES_ALL.to_owned()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_messages_per_subject: 100,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

fn probe() -> Config {
    Config {
        name: PROBE.to_owned(),
        description: Some("Dispatch write probes: is JetStream accepting writes".to_owned()),
        subjects: vec![subject::PROBE_ALL.to_owned()],
        // File storage, like the logs: a full disk refuses the probe as it refuses them.
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// How long a process keeps declaring its streams and consumers against a JetStream
/// that answers "timed out" or "not ready" (a cluster still electing its leaders when
/// every process starts at once) before it gives up.
pub const DECLARE_DEADLINE: Duration = Duration::from_secs(60);
/// The longest wait between two declaring attempts before jitter, which adds up to as
/// much again: declaring gives up when the next wait would pass the deadline, so up to
/// twice this before it.
const DECLARE_MAX_DELAY: Duration = Duration::from_secs(2);

/// How long one declaring request may take. A request that reaches a cluster still
/// electing its leaders may get no answer at all; waiting JetStream's usual 5 s for
/// each such request would stack up past any sensible start. Declaring twice is
/// harmless (get-or-create), so a slow answer costs a retry, not a failure.
pub const DECLARE_ATTEMPT: Duration = Duration::from_secs(3);

/// A JetStream context whose requests give up after [`DECLARE_ATTEMPT`], for declaring.
pub fn declaring(bus: &Bus) -> async_nats::jetstream::Context {
    let mut js = bus.jetstream().clone();
    js.set_timeout(DECLARE_ATTEMPT);
    js
}

/// Whether a failure to declare a stream, bucket or consumer may go away if asked
/// again: JetStream busy or still forming (a timeout, no responders, a 503, no leader
/// yet). A refused permission or a configuration the server rejects does not.
pub fn busy(error: &str) -> bool {
    let error = error.to_ascii_lowercase();
    [
        "timed out",
        "timeout",
        "no responders",
        "503",
        "not available",
        "no suitable peers",
        "insufficient resources",
        "leader",
        "temporarily",
        "not ready",
    ]
    .iter()
    .any(|word| error.contains(word))
}

/// Runs `declare` until it succeeds, fails for good, or [`DECLARE_DEADLINE`] passes,
/// backing off (100 ms doubling to 2 s, jittered) while JetStream is [`busy`]. Logs
/// once when it first has to wait and once when it got through.
pub async fn declare<T, E, F, Fut>(what: &str, mut declare: F) -> Result<T, Error>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use backon::BackoffBuilder as _;
    let mut delays = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(DECLARE_MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(DECLARE_DEADLINE))
        .build();
    let mut waited = false;
    loop {
        match declare().await {
            Ok(done) => {
                if waited {
                    tracing::info!(what, "declared once JetStream was ready");
                }
                return Ok(done);
            }
            Err(e) => {
                let error = e.to_string();
                match delays.next() {
                    Some(delay) if busy(&error) => {
                        if !waited {
                            tracing::warn!(
                                what,
                                error,
                                "JetStream is busy; declaring again shortly"
                            );
                            waited = true;
                        }
                        tokio::time::sleep(delay).await;
                    }
                    _ => return Err(Error::other(&format!("declare {what}"), error)),
                }
            }
        }
    }
}

/// The environment variable that sets how many replicas Dispatch's streams and buckets
/// get (1 to 5), over what [`replicas`] finds.
pub const REPLICAS_ENV: &str = "DISPATCH_STREAM_REPLICAS";

/// How many replicas Dispatch's streams and buckets get: [`REPLICAS_ENV`] if it is set,
/// else 3 when the server is part of a cluster and 1 on a single server. Every process
/// works it out the same way, so whoever declares first declares what the rest want.
/// (The conversation stream gets as many unless the streamer's `--replicas` says
/// otherwise.)
pub fn replicas(bus: &Bus) -> usize {
    let set = std::env::var(REPLICAS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=5).contains(n));
    set.unwrap_or_else(|| {
        if bus.client().server_info().cluster.is_some() {
            3
        } else {
            1
        }
    })
}

/// Declares every stream. Safe to call from many processes at once.
pub async fn ensure(bus: &Bus) -> Result<(), Error> {
    let replicas = replicas(bus);
    let js = declaring(bus);
    let defaults = conversations(&ConversationKnobs {
        replicas,
        ..Default::default()
    });
    let replicated = [
        goals(),
        runs(),
        commands(),
        ledger(),
        probe(),
        policy(),
        deliveries(),
    ]
    .map(|mut config| {
        config.num_replicas = replicas;
        config
    });
    for config in replicated.into_iter().chain([defaults]) {
        let name = config.name.clone();
        let stream = declare(&format!("stream {name}"), || async {
            if name == CONVERSATIONS {
                get_or_create_conversations(&js, config.clone()).await
            } else {
                js.get_or_create_stream(config.clone())
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await?;
        if name == RUNS && !has_writer_subjects(&stream.cached_info().config) {
            add_writer_subjects(bus, stream.cached_info().config.clone()).await;
        }
        // The conversation buffer's knobs are the streamer's to keep (`--replicas`).
        let have = stream.cached_info().config.num_replicas;
        if have != config.num_replicas && name != CONVERSATIONS {
            converge(bus, &stream.cached_info().config, config.num_replicas).await;
        }
    }
    // An existing bucket is left as it is (create only, as for the streams above).
    for (mut config, what) in [
        (crate::catalogue::config(), "the tool catalogue"),
        (secrets(), "the secrets bucket"),
        (schedules(), "the schedules bucket"),
        (listeners(), "the listeners bucket"),
        (webhooks(), "the webhook deliveries bucket"),
        (turns(), "the conversations' turns bucket"),
        (memory(), "the memory bucket"),
    ] {
        config.num_replicas = replicas;
        match js.get_key_value(&config.bucket).await {
            Ok(mut store) => {
                if let Ok(info) = store.stream.info().await
                    && info.config.num_replicas != replicas
                {
                    converge(bus, &info.config.clone(), replicas).await;
                }
            }
            Err(_) => {
                declare(what, || js.create_key_value(config.clone())).await?;
            }
        }
    }
    Ok(())
}

/// Brings an existing stream to `replicas` in place. Only the admin may change a
/// stream (`dispatch up`, or an operator connecting as admin); anyone else says what
/// differs and goes on with the stream as it is.
async fn converge(bus: &Bus, have: &Config, replicas: usize) {
    let mut want = have.clone();
    want.num_replicas = replicas;
    match bus.jetstream().update_stream(want).await {
        Ok(_) => tracing::info!(
            stream = have.name,
            from = have.num_replicas,
            to = replicas,
            "stream replicas changed"
        ),
        Err(e) => tracing::warn!(
            stream = have.name,
            have = have.num_replicas,
            want = replicas,
            error = %e,
            "the stream's replicas differ from what this deployment wants and this identity \
             cannot change them; connect as admin (`dispatch up`) once to change them"
        ),
    }
}

/// Whether a run-log stream has the subjects of writer roles and their feeds.
fn has_writer_subjects(config: &Config) -> bool {
    config.subjects == [subject::RUNS_ALL] && config.republish.as_ref() == Some(&feed())
}

/// A run-log stream declared before writer roles (one subject per run, or no feeds)
/// is moved to one subject per run and role, with their feeds. Logs written before
/// stay stored, under the retention, on subjects nothing reads any more. Only the
/// admin may change a stream; anyone else is told, and nothing can append until the
/// admin (`dispatch up`) has connected once.
async fn add_writer_subjects(bus: &Bus, mut config: Config) {
    config.subjects = vec![subject::RUNS_ALL.to_owned()];
    config.republish = Some(feed());
    match bus.jetstream().update_stream(config).await {
        Ok(_) => tracing::info!(
            stream = RUNS,
            "the run-log stream moved to one subject per run and writer role"
        ),
        Err(e) => tracing::warn!(
            stream = RUNS,
            error = %e,
            "the run-log stream is from before writer roles and this identity cannot move \
             it; run `dispatch up` (or connect as admin) once"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_jetstream_is_told_from_a_refusal() {
        for busy_error in [
            "jetstream request timed out",
            "timed out: didn't receive any response",
            "no responders",
            "JetStream system temporarily unavailable (503)",
            "no suitable peers for placement",
        ] {
            assert!(busy(busy_error), "{busy_error}");
        }
        for refusal in [
            "Permissions Violation for Publish to \"$JS.API.STREAM.CREATE.X\"",
            "stream name already in use with a different configuration",
        ] {
            assert!(!busy(refusal), "{refusal}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn declaring_rides_out_a_busy_spell_and_stops_at_a_refusal() {
        let mut tries = 0;
        let got = declare("stream X", || {
            tries += 1;
            let answer = if tries < 4 {
                Err("jetstream request timed out")
            } else {
                Ok(tries)
            };
            async move { answer }
        })
        .await
        .unwrap();
        assert_eq!(got, 4);
        let mut tries = 0;
        let refused = declare("stream X", || {
            tries += 1;
            async { Err::<(), _>("Permissions Violation") }
        })
        .await
        .unwrap_err();
        assert_eq!(tries, 1);
        assert!(refused.to_string().contains("declare stream X"));
        let started = tokio::time::Instant::now();
        let gave_up = declare("stream X", || async { Err::<(), _>("timed out") }).await;
        assert!(gave_up.is_err());
        let waited = started.elapsed();
        assert!(
            waited >= DECLARE_DEADLINE - 2 * DECLARE_MAX_DELAY,
            "{waited:?}"
        );
        assert!(
            waited <= DECLARE_DEADLINE + Duration::from_secs(3),
            "{waited:?}"
        );
    }
}
