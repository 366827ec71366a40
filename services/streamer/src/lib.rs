//! The streamer: every run's events, turned into chunks of the AI SDK's UI message
//! stream protocol ([`chunks`]) and published on the subject of the conversation the
//! run reports to, `dispatch.conv.<account>.<agent>.<conv_token>`. The conversation
//! stream `DISPATCH_CONVERSATIONS` captures each chunk once, for clients that resume;
//! core subscribers on the subject get the same message live.
//!
//! Copies: the service reads the run logs through one durable consumer with a pinned
//! client, so one copy at a time streams (in order: a run's chunks follow its log) and
//! the others wait on standby. An event is acknowledged only after the stream stored
//! all its chunks. When the pinned copy dies the server pins another, and hands it new
//! events at once while the dead copy's unacknowledged ones would come back only after
//! the acknowledgement wait — out of order. So a copy that has just been pinned first
//! reads the events between the consumer's acknowledgement floor and the first one it
//! was handed straight from the run-log stream, and relays those, in order. When the
//! server delivers them again later they are relayed again: every chunk carries a
//! `Nats-Msg-Id` of `<event_id>:<index>`, so the stream's duplicate window collapses
//! them, and a client reading the stream sees each chunk once, in the log's order.

pub mod delivery;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dispatch_chunks as chunks;
use std::time::Duration;

use dispatch_bus::async_nats::jetstream;
use dispatch_bus::async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use dispatch_bus::async_nats::{HeaderMap, Subject};
use dispatch_bus::health::{self, Health};
use dispatch_bus::streams::{self, ConversationKnobs};
use dispatch_bus::{Bus, ConversationId, RunId, subject};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub const SERVICE: &str = "streamer";

/// The priority group every copy pulls in.
const GROUP: &str = "streamer";
/// How long the pinned copy may go without pulling before another is pinned.
const PIN_TIMEOUT: Duration = Duration::from_secs(6);
/// How long one pull waits; well below [`PIN_TIMEOUT`], so a live copy keeps its pin.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long an event may go unacknowledged before it is delivered again.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Deliveries of one event before the server gives up on it (a copy that keeps dying
/// on it); the relay itself never hands an event back.
const MAX_DELIVER: i64 = 20;
/// Tries at relaying one event, in place and backing off (about 3 s in all, well
/// inside [`PIN_TIMEOUT`], so the copy keeps its pin), before it is given up and said.
const RELAY_ATTEMPTS: u32 = 6;
/// Events handed to the streaming copy and not yet acknowledged, at most; a copy that
/// takes over catches up at most this many.
const MAX_UNACKED: i64 = 1000;
/// Most runs whose conversation is remembered; past it the memory is cleared and
/// conversations are looked up again (one direct get each).
const MAX_REMEMBERED_RUNS: usize = 100_000;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "dispatch-streamer",
    about = "Dispatch conversation streams",
    version
)]
pub struct Config {
    #[command(flatten)]
    pub common: dispatch_service::CommonArgs,
    /// Keep the conversation stream in memory (`true`, the default: no disk write or
    /// sync per chunk; a single server that restarts loses it, and readers resume from
    /// the transcripts) or on disk (`false`). A stream with the other storage is made
    /// again (it holds only a resume buffer).
    #[arg(long, env = "DISPATCH_CONVERSATIONS_MEMORY", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub memory: bool,
    /// Backstop: chunks of a turn that never persisted expire after this long.
    #[arg(long, env = "DISPATCH_CONVERSATIONS_MAX_AGE", default_value = "3m", value_parser = parse_duration)]
    pub max_age: Duration,
    /// Most chunks kept per conversation.
    #[arg(long, env = "DISPATCH_CONVERSATIONS_MAX_MSGS_PER_SUBJECT", default_value_t = 100_000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub max_msgs_per_subject: i64,
    /// How long after a run's last chunk its conversation's buffer is purged (when no
    /// other run of the conversation is streaming): time for live readers to take the
    /// last chunks. A reader back later gets the finished run from its transcript.
    #[arg(long, env = "DISPATCH_CONVERSATIONS_PURGE_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub purge_after: Duration,
    /// Hosts finished runs' results may be POSTed to (a goal's `callback_url`): names
    /// or addresses, `*.suffix`, either with `:port`; none by default.
    #[arg(long, env = "DISPATCH_CALLBACK_HOSTS", value_delimiter = ',')]
    pub callback_hosts: Vec<String>,
    /// Lease on a delivery being tried, in milliseconds: a copy that dies mid-try has
    /// the delivery taken over this long after it stopped renewing it.
    #[arg(long, env = "DISPATCH_DELIVERY_LEASE_MS", default_value_t = 5_000)]
    pub delivery_lease_ms: u64,
    /// When a delivery is tried: the wait before each try, the first from the run's end
    /// (or an operator's re-send), each later one from the try before; after the last
    /// the delivery is given up until re-sent (`dispatch deliveries resend`). The
    /// default is the schedule Standard Webhooks suggests.
    #[arg(long, env = "DISPATCH_DELIVERY_SCHEDULE",
          default_value = delivery::Schedule::STANDARD_WEBHOOKS,
          value_parser = delivery::Schedule::parse)]
    pub delivery_schedule: delivery::Schedule,
    /// Replicas of the conversation stream; by default as many as every other stream
    /// (3 on a cluster, 1 on a single server: `DISPATCH_STREAM_REPLICAS`), so that
    /// conversations keep streaming when a node goes. Fewer saves storage on a cluster.
    #[arg(long, env = "DISPATCH_CONVERSATIONS_REPLICAS",
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: Option<u8>,
}

impl Config {
    fn knobs(&self, bus: &Bus) -> ConversationKnobs {
        ConversationKnobs {
            memory: self.memory,
            max_age: self.max_age,
            max_msgs_per_subject: self.max_msgs_per_subject,
            replicas: self
                .replicas
                .map_or_else(|| streams::replicas(bus), usize::from),
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(d),
        Ok(_) => Err(format!("{text:?}: at least 1s")),
        Err(e) => Err(format!("{text:?} is not a duration like 90s or 3m ({e})")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] dispatch_bus::Error),
    #[error("{0}")]
    Nats(String),
    #[error("{0}")]
    Config(String),
}

fn nats(what: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Nats(format!("{what}: {e}"))
}

pub struct Streamer {
    config: Config,
    bus: Bus,
}

impl Streamer {
    pub async fn build(config: Config) -> Result<Self, Error> {
        let bus = config
            .common
            .connect(dispatch_bus::Identity::Streamer)
            .await?;
        Ok(Self { config, bus })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let instance = self.config.common.instance.clone();
        let health = tokio::spawn(health::serve(
            self.bus.clone(),
            Health::new(SERVICE, &instance),
            shutdown.clone(),
        ));
        self.sync_knobs().await?;
        let keeper = tokio::spawn(keep_buffer(
            self.bus.clone(),
            self.config.knobs(&self.bus),
            shutdown.clone(),
        ));
        let js = self.bus.jetstream();
        let runs = js
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| nats("open the run-log stream")(&e))?;
        let consumer: consumer::PullConsumer = runs
            .get_or_create_consumer(
                streams::consumers::STREAMER,
                pull::Config {
                    durable_name: Some(streams::consumers::STREAMER.to_owned()),
                    description: Some("the streamer: run events to conversation chunks".into()),
                    deliver_policy: DeliverPolicy::New,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: MAX_DELIVER,
                    filter_subject: subject::RUNS_ALL.to_owned(),
                    priority_policy: consumer::PriorityPolicy::PinnedClient,
                    priority_groups: vec![GROUP.to_owned()],
                    priority_timeout: PIN_TIMEOUT,
                    max_ack_pending: MAX_UNACKED,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats("declare the streamer's consumer")(&e))?;
        tracing::info!(
            instance,
            "streamer ready (streams while pinned, on standby otherwise)"
        );
        let allowed = self
            .config
            .callback_hosts
            .iter()
            .map(|entry| {
                dispatch_service::hosts::AllowedHost::parse(entry).map_err(|why| {
                    Error::Config(format!("--callback-hosts entry {entry:?}: {why}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let deliverer = delivery::Deliverer::new(
            &self.bus,
            &self.config.common.workspace,
            allowed,
            self.config.delivery_schedule.clone(),
        )
        .await
        .map_err(Error::Config)?;
        let deliveries = tokio::spawn(Arc::new(deliverer).serve(
            Duration::from_millis(self.config.delivery_lease_ms.max(300)),
            shutdown.clone(),
        ));
        let conversations = js
            .get_stream(streams::CONVERSATIONS)
            .await
            .map_err(|e| nats("open the conversation stream")(&e))?;
        let mut relay = Relay {
            bus: self.bus.clone(),
            js: js.clone(),
            runs: dispatch_bus::reads::Reader::new(runs),
            buffer: conversations,
            purge_after: self.config.purge_after,
            purges_failing: Arc::default(),
            consumer: consumer.clone(),
            conversations: HashMap::new(),
            streaming: HashMap::new(),
            fresh: true,
        };
        while !shutdown.is_cancelled() {
            relay.fresh = true;
            let mut messages = match consumer
                .stream()
                .group(GROUP)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_EXPIRES / 4)
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull run events; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    message = messages.next() => message,
                };
                match message {
                    Some(Ok(message)) => relay.relay(message).await,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "pulling run events");
                    }
                    None => break,
                }
            }
        }
        let _ = health.await;
        let _ = deliveries.await;
        let _ = keeper.await;
        Ok(())
    }

    /// Puts the configured knobs on the conversation stream, making it if it is
    /// missing. Its storage cannot change in place: a stream with the other storage is
    /// deleted and made again. It is only a resume buffer: readers of the old one end,
    /// and resume from the runs' transcripts.
    async fn sync_knobs(&self) -> Result<(), Error> {
        let want = streams::conversations(&self.config.knobs(&self.bus));
        let js = self.bus.jetstream();
        let mut stream = streams::get_or_create_conversations(js, want.clone())
            .await
            .map_err(|e| nats("declare the conversation stream")(&e))?;
        let mut have = stream
            .info()
            .await
            .map_err(|e| nats("read the conversation stream")(&e))?
            .config
            .clone();
        if have.storage != want.storage {
            tracing::warn!(
                have = ?have.storage,
                want = ?want.storage,
                "the conversation stream has another storage; making it again (it holds only a resume buffer)"
            );
            js.delete_stream(streams::CONVERSATIONS)
                .await
                .map_err(|e| nats("delete the conversation stream")(&e))?;
            have = streams::get_or_create_conversations(js, want.clone())
                .await
                .map_err(|e| nats("make the conversation stream again")(&e))?
                .cached_info()
                .config
                .clone();
        }
        let changed = have.max_age != want.max_age
            || have.max_messages_per_subject != want.max_messages_per_subject
            || have.num_replicas != want.num_replicas
            || have.duplicate_window != want.duplicate_window;
        if changed {
            let update = jetstream::stream::Config {
                storage: have.storage,
                first_sequence: have.first_sequence,
                ..want
            };
            js.update_stream(update)
                .await
                .map_err(|e| nats("update the conversation stream's knobs")(&e))?;
            tracing::info!("conversation stream knobs updated");
        }
        Ok(())
    }
}

/// How often the conversation stream is looked for.
const KEEP_EVERY: Duration = Duration::from_secs(1);

/// Makes the conversation stream again whenever it is missing: a single nats-server
/// that restarts comes back without a stream kept in memory. Every copy does this (a
/// standby copy too, so readers find the stream while nothing streams); when two make
/// it at once, one is made and the other finds it.
async fn keep_buffer(bus: Bus, knobs: ConversationKnobs, shutdown: CancellationToken) {
    let js = bus.jetstream();
    let mut missing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(KEEP_EVERY) => {}
        }
        match js.get_stream(streams::CONVERSATIONS).await {
            Ok(_) => missing = false,
            Err(e) if stream_not_found(&e) => {
                // Made now, so it counts from above every sequence the lost one used.
                let config = streams::conversations(&knobs);
                match streams::get_or_create_conversations(js, config).await {
                    Ok(_) => tracing::warn!(
                        "the conversation stream was gone (a nats-server restarted with it in memory); made it again"
                    ),
                    Err(e) if !missing => {
                        tracing::warn!(error = %e, "cannot make the conversation stream again")
                    }
                    Err(_) => {}
                }
                missing = true;
            }
            // NATS away: nothing to tell yet.
            Err(_) => {}
        }
    }
}

fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(error)
        if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// What the pinned copy keeps while relaying.
struct Relay {
    bus: Bus,
    js: jetstream::Context,
    runs: dispatch_bus::reads::Reader,
    /// The conversation stream, to purge.
    buffer: jetstream::stream::Stream,
    purge_after: Duration,
    /// Purges failing now (said once when they start failing and once when they work
    /// again, not per conversation: an outage fails them all the same way).
    purges_failing: Arc<AtomicBool>,
    consumer: consumer::PullConsumer,
    /// Each run's conversation, and whether it has a callback, learned from its
    /// first event.
    conversations: HashMap<RunId, (ConversationId, bool)>,
    /// How many of those runs each conversation has: a run's end purges only when it
    /// was its conversation's last (looked up, not counted, per event).
    streaming: HashMap<ConversationId, usize>,
    /// Nothing handed to this copy yet since it (re)started pulling: the next event it
    /// gets may follow ones a copy that died left unacknowledged.
    fresh: bool,
}

/// Why an event's chunks were not all stored.
struct Retry(String);

impl Relay {
    /// Publishes one run event's chunks, and acknowledges it once they are stored;
    /// an event that cannot be read is acknowledged and said (never redelivered
    /// forever), one whose chunks were refused comes back later.
    async fn relay(&mut self, message: jetstream::Message) {
        // The chunks carry on the trace of the event they come from.
        let span = tracing::info_span!(
            "relay",
            otel.name = "publish dispatch.conv",
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.template = "dispatch.conv.{account}.{agent}.{conversation}",
            run_id = subject::run_id_of(&message.subject).map(|id| id.to_string()),
        );
        dispatch_bus::trace::follow(&span, message.headers.as_ref());
        self.relay_in_span(message).instrument(span).await
    }

    async fn relay_in_span(&mut self, message: jetstream::Message) {
        let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        if std::mem::take(&mut self.fresh) {
            self.catch_up(stream_seq).await;
        }
        // Tried again here, not handed back: the events after it must not go first.
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=RELAY_ATTEMPTS {
            match self
                .forward(message.subject.as_str(), stream_seq, &message.payload)
                .await
            {
                Ok(()) => break,
                Err(Retry(why)) if attempt == RELAY_ATTEMPTS => {
                    tracing::error!(
                        stream_seq,
                        error = why,
                        "gave up relaying a run event: its chunks are not in the conversation stream (the run's transcript has them)"
                    );
                }
                Err(Retry(why)) => {
                    tracing::warn!(
                        stream_seq,
                        attempt,
                        error = why,
                        "chunks not stored; trying again"
                    );
                    // The pull keeps the pin: this copy is alive, only waiting.
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        if let Err(e) = message.ack().await {
            tracing::debug!(error = %e, "ack of a relayed event");
        }
    }

    /// Relays, in order, the events after the consumer's acknowledgement floor and
    /// before `first` (the first event this copy was handed): those a copy that died
    /// was handed and did not finish.
    async fn catch_up(&mut self, first: u64) {
        let floor = match self.consumer.info().await {
            // Only `first` unacknowledged: nothing was left behind (and a consumer just
            // made has no floor worth reading from).
            Ok(info) if info.num_ack_pending <= 1 => return,
            Ok(info) => info.ack_floor.stream_sequence,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the consumer's acknowledgement floor");
                return;
            }
        };
        if floor + 1 >= first {
            return;
        }
        // At most what the consumer lets be unacknowledged: a floor further behind is
        // not a dead copy's leftovers, and is not walked event by event.
        let from = (floor + 1).max(first.saturating_sub(MAX_UNACKED as u64));
        if from > floor + 1 {
            tracing::warn!(
                floor,
                first,
                "the acknowledgement floor is further behind than anything left in flight; \
                 catching up only the last {MAX_UNACKED} events"
            );
        }
        tracing::info!(
            from,
            to = first - 1,
            "taking over: relaying what the last copy left unacknowledged"
        );
        for seq in from..first {
            let message = match self.runs.at(seq).await {
                Ok(Some(message)) => message,
                // Gone (expired, or never a run event); nothing to relay.
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(seq, error = %e, "not in the run-log stream");
                    continue;
                }
            };
            if let Err(Retry(why)) = self
                .forward(message.subject.as_str(), seq, &message.payload)
                .await
            {
                // The server delivers it again after the acknowledgement wait.
                tracing::warn!(seq, error = why, "catching up: chunks not stored");
            }
        }
    }

    /// The chunks of the run event stored at `stream_seq` on `subject`, published and
    /// stored. An event that cannot be read is said and skipped (`Ok`).
    async fn forward(
        &mut self,
        subject: &str,
        stream_seq: u64,
        payload: &[u8],
    ) -> Result<(), Retry> {
        let Some(on) = subject::parse_run(subject) else {
            tracing::warn!(subject, "not a run log subject; skipped");
            return Ok(());
        };
        let run_id = on.run_id;
        let event = match dispatch_runlog::decode(&run_id, stream_seq, payload) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "an event that does not decode; skipped");
                return Ok(());
            }
        };
        // Nothing a role may not write reaches a conversation.
        if let Err(why) = dispatch_runlog::roles::check(&event, Some(on.writer)) {
            tracing::warn!(%run_id, stream_seq, why, "an event by the wrong writer; skipped");
            return Ok(());
        }
        let chunks = chunks::of(&run_id.to_string(), &event);
        if !chunks.is_empty() {
            let (conversation, callback) = self
                .conversation(&run_id, &event)
                .await
                .map_err(|e| Retry(format!("cannot learn run {run_id}'s conversation: {e}")))?;
            let to = subject::conv::of(&conversation);
            let last = self
                .publish(&to, &run_id, &event, &chunks)
                .await
                .map_err(Retry)?;
            if chunks::is_terminal(&event) {
                if callback {
                    delivery::queue(&self.bus, &run_id).await.map_err(|e| {
                        Retry(format!("cannot queue the delivery of run {run_id}: {e}"))
                    })?;
                }
                self.forget(&run_id);
                self.purge_later(&conversation, to, last);
            }
        }
        Ok(())
    }

    /// Purge on persist: a finished run is in its log, which is its transcript, so its
    /// chunks need not stay. After [`Config::purge_after`] the conversation's buffer up
    /// to `last` (the run's last chunk) is purged — unless another run of the
    /// conversation is still streaming, whose own end purges both.
    fn purge_later(&self, conversation: &ConversationId, to: Subject, last: u64) {
        if self.streaming.contains_key(conversation) {
            return;
        }
        let buffer = self.buffer.clone();
        let after = self.purge_after;
        let failing = self.purges_failing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            match buffer
                .purge()
                .filter(to.to_string())
                .sequence(last + 1)
                .await
            {
                Ok(purged) => {
                    tracing::debug!(subject = %to, purged = purged.purged, "conversation buffer purged");
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("conversation buffers are purged again");
                    }
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "cannot purge conversation buffers; their max_age will until purges work again");
                    }
                    tracing::debug!(subject = %to, error = %e, "conversation buffer not purged");
                }
            }
        });
    }

    /// Sends every chunk, then waits for the stream to have stored them all; returns the
    /// stream sequence of the last.
    async fn publish(
        &self,
        to: &Subject,
        run_id: &RunId,
        event: &dispatch_proto::run::v1::RunEvent,
        chunks: &[serde_json::Value],
    ) -> Result<u64, String> {
        let mut acks = Vec::with_capacity(chunks.len());
        for (index, chunk) in chunks.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{}:{index}", event.event_id).as_str(),
            );
            headers.insert(subject::conv::RUN_HEADER, run_id.to_string().as_str());
            headers.insert(
                subject::conv::RUN_SEQ_HEADER,
                event.seq.to_string().as_str(),
            );
            headers.insert(subject::conv::INDEX_HEADER, index.to_string().as_str());
            dispatch_bus::trace::inject(&mut headers);
            let payload = serde_json::to_vec(chunk).map_err(|e| e.to_string())?;
            let ack = self
                .js
                .publish_with_headers(to.clone(), headers, payload.into())
                .await
                .map_err(|e| e.to_string())?;
            acks.push(ack);
        }
        let mut last = 0;
        for ack in acks {
            last = ack.await.map_err(|e| e.to_string())?.sequence;
        }
        Ok(last)
    }

    /// The conversation `run_id` reports to, and whether its result goes to a
    /// callback: from its first event, remembered.
    async fn conversation(
        &mut self,
        run_id: &RunId,
        event: &dispatch_proto::run::v1::RunEvent,
    ) -> Result<(ConversationId, bool), String> {
        use dispatch_proto::run::v1::run_event::Body;
        if let Some(known) = self.conversations.get(run_id) {
            return Ok(known.clone());
        }
        let requested = match &event.body {
            Some(Body::RunRequested(r)) => r.clone(),
            _ => {
                let first = self
                    .runs
                    .next(&subject::run_log(run_id), 1)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the run has no events")?;
                let first = dispatch_runlog::decode(run_id, first.sequence, &first.payload)
                    .map_err(|e| e.to_string())?;
                match first.body {
                    Some(Body::RunRequested(r)) => r,
                    _ => return Err("the run's first event is not its request".into()),
                }
            }
        };
        let conversation: ConversationId = requested.conversation_id.parse().unwrap_or_default();
        if self.conversations.len() >= MAX_REMEMBERED_RUNS {
            self.conversations.clear();
            self.streaming.clear();
        }
        *self.streaming.entry(conversation.clone()).or_default() += 1;
        let known = (conversation, !requested.callback_url.is_empty());
        self.conversations.insert(*run_id, known.clone());
        Ok(known)
    }

    /// Drops an ended run from what is remembered.
    fn forget(&mut self, run_id: &RunId) {
        let Some((conversation, _)) = self.conversations.remove(run_id) else {
            return;
        };
        if let std::collections::hash_map::Entry::Occupied(mut runs) =
            self.streaming.entry(conversation)
        {
            *runs.get_mut() -= 1;
            if *runs.get() == 0 {
                runs.remove();
            }
        }
    }
}
