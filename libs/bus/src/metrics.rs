//! The bus's own metrics: each work queue's backlog as JetStream counts it, reported
//! by every copy that takes work from it (`dispatch_consumer_*{consumer}`).
//!
//! Instruments come from OpenTelemetry's global meter, which the service's telemetry
//! set-up points at `/metrics` and OTLP; without either it is the no-op meter.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::consumer::{Consumer, pull};
use opentelemetry::KeyValue;
use opentelemetry::metrics::ObservableGauge;
use tokio_util::sync::CancellationToken;

/// How often a consumer's counts are asked for.
const EVERY: Duration = Duration::from_secs(5);

/// The instrumentation scope of Dispatch's metrics.
pub const METER: &str = "dispatch";

/// What JetStream last said of each consumer this process takes work from.
#[derive(Debug, Clone, Copy, Default)]
struct Backlog {
    pending: u64,
    ack_pending: u64,
    redelivered: u64,
}

fn backlogs() -> &'static Mutex<BTreeMap<&'static str, Backlog>> {
    static BACKLOGS: OnceLock<Mutex<BTreeMap<&'static str, Backlog>>> = OnceLock::new();
    BACKLOGS.get_or_init(Default::default)
}

/// The gauges, made once: each reads [`backlogs`] when metrics are collected.
fn gauges() -> &'static [ObservableGauge<u64>; 3] {
    static GAUGES: OnceLock<[ObservableGauge<u64>; 3]> = OnceLock::new();
    GAUGES.get_or_init(|| {
        let meter = opentelemetry::global::meter(METER);
        let gauge = |name: &'static str, description: &'static str, pick: fn(&Backlog) -> u64| {
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |observer| {
                    let backlogs = backlogs().lock().unwrap_or_else(|e| e.into_inner());
                    for (consumer, backlog) in backlogs.iter() {
                        observer.observe(pick(backlog), &[KeyValue::new("consumer", *consumer)]);
                    }
                })
                .build()
        };
        [
            gauge(
                "dispatch.consumer.pending",
                "Messages of the work queue not yet delivered to any copy",
                |b| b.pending,
            ),
            gauge(
                "dispatch.consumer.ack_pending",
                "Messages delivered and neither acknowledged nor given up yet",
                |b| b.ack_pending,
            ),
            gauge(
                "dispatch.consumer.redelivered",
                "Messages delivered more than once and still unacknowledged",
                |b| b.redelivered,
            ),
        ]
    })
}

/// Asks for `consumer`'s counts every few seconds until `shutdown`, for the gauges.
pub async fn watch_consumer(
    mut consumer: Consumer<pull::Config>,
    name: &'static str,
    shutdown: CancellationToken,
) {
    gauges();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A failed look leaves the last counts; the next look tries again.
        if let Ok(info) = consumer.info().await {
            let backlog = Backlog {
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
                redelivered: info.num_redelivered as u64,
            };
            backlogs()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name, backlog);
        }
    }
}
