//! W3C trace context on the bus: every message Dispatch publishes carries the
//! `traceparent` (and `tracestate`) of the span publishing it, and every consumer
//! continues that trace, so one run is one trace across services.
//!
//! The headers are the bus's business, not each call site's: [`crate::Bus::append`]
//! injects them into every append, [`inject`] serves the few publishes that do not go
//! through it, and [`follow`] makes a consumer's span a child of the message it took.
//! When no OpenTelemetry layer is installed (tracing export off, the default), the
//! current span has no trace context and nothing is written: no header, no cost beyond
//! looking.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header carrying a span's identity: `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";

struct Headers<'a>(&'a mut HeaderMap);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct ReadHeaders<'a>(&'a HeaderMap);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        [TRACEPARENT, "tracestate"]
            .into_iter()
            .filter(|k| self.0.get(*k).is_some())
            .collect()
    }
}

/// Writes the current span's trace context into `headers`, if it has one.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut Headers(headers));
    }
}

/// The trace context a message carries (an empty one without valid headers).
pub fn extract(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&ReadHeaders(headers)),
        None => opentelemetry::Context::new(),
    }
}

/// The span a message's `traceparent` names, if it names a valid one.
pub fn span_context(headers: Option<&HeaderMap>) -> Option<SpanContext> {
    let cx = extract(headers);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Makes `span` (not yet entered) a child of the span the message with `headers` was
/// published in. A message without trace context leaves `span` a root.
pub fn follow(span: &tracing::Span, headers: Option<&HeaderMap>) {
    set_parent(span, extract(headers));
}

/// [`follow`] for any carrier of W3C headers (an HTTP request's, say): `get` looks a
/// header up by its lowercase name.
pub fn follow_with<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    let carried: std::collections::HashMap<String, String> = [TRACEPARENT, "tracestate"]
        .into_iter()
        .filter_map(|key| get(key).map(|value| (key.to_owned(), value.to_owned())))
        .collect();
    set_parent(span, TraceContextPropagator::new().extract(&carried));
}

fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    if cx.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer, where there is nothing to continue.
        let _ = span.set_parent(cx);
    }
}

/// The trace id of a `traceparent` header value, if it is a well-formed one.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0'))
    .then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_names_its_trace_and_malformed_ones_name_none() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn headers_carry_a_context_there_and_back() {
        let mut headers = HeaderMap::new();
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(TRACEPARENT, value);
        let span = span_context(Some(&headers)).expect("a valid context");
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = HeaderMap::new();
        let cx = opentelemetry::Context::new().with_remote_span_context(span);
        TraceContextPropagator::new().inject_context(&cx, &mut Headers(&mut out));
        assert_eq!(out.get(TRACEPARENT).map(|v| v.as_str()), Some(value));
        assert!(span_context(None).is_none());
        assert!(span_context(Some(&HeaderMap::new())).is_none());
    }
}
