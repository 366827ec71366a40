//! What a service process tells the outside about itself: logs, traces and metrics.
//!
//! - **Logs** go to stderr as text, or as one JSON object per line with
//!   `--log-format json` (`DISPATCH_LOG_FORMAT`), each carrying the trace and span ids
//!   of the span it was logged in. `RUST_LOG` filters them (default `info`).
//! - **Traces** are exported over OTLP (HTTP/protobuf) when the standard variables ask
//!   for it: `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, with
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`,
//!   `OTEL_EXPORTER_OTLP_HEADERS` and the rest read by the OpenTelemetry SDK itself.
//!   Spans come from `tracing` through `tracing-opentelemetry`; only Dispatch's own
//!   spans (targets `dispatch_*`) at `info` and above are exported. With no endpoint,
//!   no OpenTelemetry layer is installed at all (JSON logs install one that exports
//!   nothing, for the ids), so tracing costs what `tracing` costs.
//! - **Metrics** are OpenTelemetry instruments (`opentelemetry::global::meter`),
//!   served in the Prometheus text format at `/metrics` on `--metrics-listen`
//!   (`DISPATCH_METRICS_LISTEN`; the bound address is in the health reply as
//!   `metrics_addr`) and exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set. With neither, the global meter is
//!   the no-op one.

use std::net::SocketAddr;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, FilterFn, LevelFilter};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id`.
    Json,
}

/// The telemetry flags every service takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// How log lines are written: `text` or `json` (each line with its trace and span
    /// ids). `RUST_LOG` filters them.
    #[arg(long, env = "DISPATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at `http://<ADDR>/metrics` (port 0: any free port, told
    /// in the health reply). Off when unset.
    #[arg(long, env = "DISPATCH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// What [`init`] set up; flushes and stops the exporters when dropped, so spans and
/// metrics of a process that stops cleanly are not lost.
#[must_use = "dropping it flushes and stops the exporters"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.shutdown();
        }
        if let Some(meter) = self.meter.take() {
            let _ = meter.shutdown();
        }
    }
}

/// Why telemetry could not be set up: a bad endpoint, a metrics port taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("metrics listener on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Whether the standard variables ask for OTLP export of `signal` (`TRACES`, `METRICS`):
/// an endpoint is set, the SDK is not disabled and the signal's exporter is not `none`.
fn otlp_wanted(signal: &str) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    let exporter_none = std::env::var(format!("OTEL_{signal}_EXPORTER"))
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled
        && !exporter_none
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
}

/// The resource every span and metric of this process carries: `service.name` from
/// `OTEL_SERVICE_NAME`, else `dispatch-<service>`; `service.instance.id` the copy's name.
fn resource(service: &str, instance: &str) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        builder = builder.with_service_name(format!("dispatch-{service}"));
    }
    builder
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance.to_owned(),
        ))
        .build()
}

/// Sets up logs, traces and metrics for `service` (copy `instance`). Call once, at the
/// start of `main`, inside the Tokio runtime (the metrics listener is a task); keep the
/// returned value until the process ends.
pub fn init(service: &str, instance: &str, args: &TelemetryArgs) -> Result<Telemetry, Error> {
    // The OTLP exporter's HTTP client (reqwest with rustls, no provider of its own, as
    // rmcp wants it) needs the process's crypto provider; ring, as the connectors use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resource = resource(service, instance);
    let export_traces = otlp_wanted("TRACES");
    let tracer = if export_traces {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_batch_exporter(exporter)
                .build(),
        )
    } else if args.log_format == LogFormat::Json {
        // Ids for the log lines, and context to pass on; nothing exported.
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .build(),
        )
    } else {
        None
    };

    let levels = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn,opentelemetry_sdk=warn"));
    let _ = subscriber(levels, args.log_format, tracer.as_ref()).try_init();

    let export_metrics = otlp_wanted("METRICS");
    let meter = if args.metrics_listen.is_some() || export_metrics {
        let mut builder = SdkMeterProvider::builder().with_resource(resource);
        if let Some(addr) = args.metrics_listen {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .map_err(|e| Error::Exporter(e.to_string()))?;
            builder = builder.with_reader(exporter);
            let bound = serve_metrics(addr, registry)?;
            dispatch_bus::health::set_metrics_addr(bound);
        }
        if export_metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .build()
                .map_err(|e| Error::Exporter(e.to_string()))?;
            builder = builder.with_periodic_exporter(exporter);
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Some(provider)
    } else {
        None
    };
    Ok(Telemetry { tracer, meter })
}

/// The process's subscriber: log lines filtered by `levels`, and spans for `tracer`.
fn subscriber(
    levels: EnvFilter,
    format: LogFormat,
    tracer: Option<&SdkTracerProvider>,
) -> impl tracing::Subscriber + Send + Sync {
    // Log lines are events only: the spans go to traces, and a line names its run,
    // call or leaf in its own fields (and, in JSON, its trace and span ids).
    //
    // Every filter says how verbose it can be at most: one that does not makes the
    // whole subscriber's hint "anything", and then neither `tracing` nor the `log`
    // crate can skip a disabled line at its call site. sled's `log::trace!` lines alone
    // were 6% of the ledger's CPU, each one asked of every filter (perf). The events
    // filter lets every level through; joined, the stricter hint (the levels') holds.
    let events = FilterFn::new(|meta| meta.is_event()).with_max_level_hint(LevelFilter::TRACE);
    let lines = levels.and(events);
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(lines)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(JsonWithTrace)
            .with_filter(lines)
            .boxed(),
    };
    let otel = tracer.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("dispatch"))
            .with_location(false)
            .with_threads(false)
            .with_filter(
                FilterFn::new(|meta| {
                    meta.target().starts_with("dispatch_") && *meta.level() <= tracing::Level::INFO
                })
                .with_max_level_hint(LevelFilter::INFO),
            )
    });
    tracing_subscriber::registry().with(fmt).with(otel)
}

/// Binds `addr` and serves `GET /metrics` from `registry` on a task of its own.
fn serve_metrics(addr: SocketAddr, registry: prometheus::Registry) -> Result<SocketAddr, Error> {
    let listen = |source| Error::Listen { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    listener.set_nonblocking(true).map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(listen)?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                let families = registry.gather();
                match prometheus::TextEncoder::new().encode_utf8(&families, &mut body) {
                    Ok(()) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode the metrics: {e}"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(bound)
}

use axum::response::IntoResponse as _;

/// Log lines as JSON objects: time, level, target, the event's fields (`message`
/// among them), the name of the span it happened in, and that span's trace and span
/// ids when it has them.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        line.extend(fields.0);
        // The span the event happened in, as the registry knows it (this layer sees no
        // spans of its own), and its OpenTelemetry identity.
        let span = tracing::Span::current();
        if let Some(meta) = span.metadata() {
            line.insert("span".into(), meta.name().into());
            let span_cx = span.context().span().span_context().clone();
            if span_cx.is_valid() {
                line.insert("trace_id".into(), span_cx.trace_id().to_string().into());
                line.insert("span_id".into(), span_cx.span_id().to_string().into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Subscriber as _;

    /// A line below every filter's level is skipped where it is written: the subscriber
    /// says how verbose it can be, with spans exported or not, in either format.
    #[test]
    fn the_subscriber_says_how_verbose_it_can_be() {
        let tracer = SdkTracerProvider::builder().build();
        for format in [LogFormat::Text, LogFormat::Json] {
            for exported in [None, Some(&tracer)] {
                let levels = EnvFilter::new("info,opentelemetry=warn");
                let hint = subscriber(levels, format, exported).max_level_hint();
                let spans = exported.is_some();
                assert_eq!(hint, Some(LevelFilter::INFO), "{format:?}, spans {spans}");
            }
            let hint = subscriber(EnvFilter::new("warn"), format, None).max_level_hint();
            assert_eq!(hint, Some(LevelFilter::WARN), "{format:?}");
            let hint =
                subscriber(EnvFilter::new("dispatch_ledger=debug"), format, None).max_level_hint();
            assert_eq!(hint, Some(LevelFilter::DEBUG), "{format:?}");
        }
    }
}
