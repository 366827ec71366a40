//! The ledger's metrics: how far each projection is behind its stream
//! (`dispatch_ledger_lag{stream}`: messages stored that the views do not hold yet) and
//! how many approval requests wait for a person (`dispatch_approvals_waiting`).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::ObservableGauge;

use crate::project::Views;

/// Each projection's lag, as the last message or look at its stream left it.
fn lags() -> &'static Mutex<BTreeMap<&'static str, u64>> {
    static LAGS: OnceLock<Mutex<BTreeMap<&'static str, u64>>> = OnceLock::new();
    LAGS.get_or_init(Default::default)
}

fn set_lag(stream: &'static str, lag: u64) {
    lags()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(stream, lag);
}

/// A message of `stream` was applied and `left` more follow it.
pub(crate) fn applied(stream: &'static str, left: u64) {
    set_lag(stream, left);
}

/// The stream's last sequence, looked at while nothing arrived: the views hold what
/// they applied; anything beyond is lag (the stall check acts on it).
pub(crate) fn stream_end(stream: &'static str, end: u64, applied: u64) {
    set_lag(stream, end.saturating_sub(applied));
}

/// Registers the gauges; keep the value for as long as they should be reported.
pub(crate) fn register(views: Views) -> [ObservableGauge<u64>; 2] {
    let meter = opentelemetry::global::meter(dispatch_bus::metrics::METER);
    [
        meter
            .u64_observable_gauge("dispatch.ledger.lag")
            .with_description("Messages of the stream the ledger's views do not hold yet")
            .with_callback(|observer| {
                let lags = lags().lock().unwrap_or_else(|e| e.into_inner());
                for (stream, lag) in lags.iter() {
                    observer.observe(*lag, &[KeyValue::new("stream", *stream)]);
                }
            })
            .build(),
        meter
            .u64_observable_gauge("dispatch.approvals.waiting")
            .with_description("Approval requests nobody has answered yet")
            .with_callback(move |observer| observer.observe(views.approvals_waiting(), &[]))
            .build(),
    ]
}
