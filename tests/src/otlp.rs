//! An OTLP/HTTP receiver for the tests: what a collector is to a deployment. It takes
//! `POST /v1/traces` and `/v1/metrics` (protobuf), decodes them with the official
//! OpenTelemetry protobuf definitions (the `opentelemetry-proto` crate), and keeps the
//! spans, the metric names and every body as it came.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;

/// One span as a receiver sees it, ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Metric names with the service that sent them.
    metrics: Vec<(String, String)>,
    bodies: Vec<Vec<u8>>,
}

/// A running receiver; stops with the test's runtime.
pub struct Receiver {
    /// `http://127.0.0.1:<port>`: what `OTEL_EXPORTER_OTLP_ENDPOINT` is set to.
    pub endpoint: String,
    received: Arc<Mutex<Received>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn service_of(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .map(|r| attributes(&r.attributes))
        .and_then(|a| a.get("service.name").cloned())
        .unwrap_or_default()
}

impl Receiver {
    pub async fn start() -> Result<Self> {
        let received = Arc::new(Mutex::new(Received::default()));
        let traces = received.clone();
        let metrics = received.clone();
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(move |body: Bytes| async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body.as_ref()) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let mut received = traces.lock().unwrap();
                    received.bodies.push(body.to_vec());
                    for resource in &request.resource_spans {
                        let service = service_of(resource.resource.as_ref());
                        for scope in &resource.scope_spans {
                            for span in &scope.spans {
                                received.spans.push(Span {
                                    service: service.clone(),
                                    name: span.name.clone(),
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_span_id: hex(&span.parent_span_id),
                                    attributes: attributes(&span.attributes),
                                    links: span
                                        .links
                                        .iter()
                                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                                        .collect(),
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }),
            )
            .route(
                "/v1/metrics",
                post(move |body: Bytes| async move {
                    let Ok(request) = ExportMetricsServiceRequest::decode(body.as_ref()) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let mut received = metrics.lock().unwrap();
                    received.bodies.push(body.to_vec());
                    for resource in &request.resource_metrics {
                        let service = service_of(resource.resource.as_ref());
                        for scope in &resource.scope_metrics {
                            for metric in &scope.metrics {
                                received
                                    .metrics
                                    .push((service.clone(), metric.name.clone()));
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { endpoint, received })
    }

    /// The environment a service exports to this receiver with: spans sent within
    /// a tenth of a second, metrics every half second.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".into()),
        ]
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    /// (service, metric name) of every metric received.
    pub fn metrics(&self) -> Vec<(String, String)> {
        self.received.lock().unwrap().metrics.clone()
    }

    /// Whether any request this receiver took holds `needle`, byte for byte.
    pub fn holds(&self, needle: &[u8]) -> bool {
        self.received
            .lock()
            .unwrap()
            .bodies
            .iter()
            .any(|body| body.windows(needle.len()).any(|w| w == needle))
    }
}
