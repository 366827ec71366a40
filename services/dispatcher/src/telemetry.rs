//! The dispatcher's spans and metrics beyond the bus's own: a span per run, plan, leaf,
//! model turn (OpenTelemetry's GenAI conventions), tool call and gate; counters of runs
//! started and finished, a histogram of run durations, and model tokens by model.

use std::sync::OnceLock;

use dispatch_models::Usage;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use tracing::Span;

/// Whether prompts and completions go into spans (`gen_ai.input.messages`,
/// `gen_ai.output.messages`): only when
/// `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT` is `true`.
pub(crate) fn capture_content() -> bool {
    static CAPTURE: OnceLock<bool> = OnceLock::new();
    *CAPTURE.get_or_init(|| {
        std::env::var("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
    })
}

/// A provider's recorded name as (`gen_ai.provider.name`, `gen_ai.request.model`):
/// `openai:<model>` is the OpenAI-compatible client, anything else names itself.
pub(crate) fn provider_and_model(name: &str) -> (&str, &str) {
    name.split_once(':').unwrap_or((name, name))
}

/// The span of one model call (`operation` is `chat`), to be entered around it.
pub(crate) fn model_span(provider: &str, purpose: &'static str) -> Span {
    let (provider, model) = provider_and_model(provider);
    tracing::info_span!(
        "model",
        otel.name = %format_args!("chat {model}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        dispatch.purpose = purpose,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = provider,
        gen_ai.request.model = model,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.input.messages = tracing::field::Empty,
        gen_ai.output.messages = tracing::field::Empty,
    )
}

/// Records what a model call cost on its span and in the token counter.
pub(crate) fn model_used(span: &Span, provider: &str, usage: Usage) {
    span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
    span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
    let (_, model) = provider_and_model(provider);
    let tokens = &metrics().tokens;
    tokens.add(
        usage.prompt_tokens,
        &[
            KeyValue::new("model", model.to_owned()),
            KeyValue::new("type", "input"),
        ],
    );
    tokens.add(
        usage.completion_tokens,
        &[
            KeyValue::new("model", model.to_owned()),
            KeyValue::new("type", "output"),
        ],
    );
}

/// Records the prompt (`input`) and the answer (`output`) on a model span, as the GenAI
/// conventions' message lists, when content capture is on.
pub(crate) fn model_content(span: &Span, input: &str, output: &str) {
    if !capture_content() {
        return;
    }
    let message = |role: &str, text: &str| {
        serde_json::json!([{ "role": role, "parts": [{ "type": "text", "content": text }] }])
            .to_string()
    };
    span.record("gen_ai.input.messages", message("user", input));
    span.record("gen_ai.output.messages", message("assistant", output));
}

pub(crate) struct Metrics {
    pub started: Counter<u64>,
    pub finished: Counter<u64>,
    pub duration: Histogram<f64>,
    tokens: Counter<u64>,
}

pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter(dispatch_bus::metrics::METER);
        Metrics {
            started: meter
                .u64_counter("dispatch.runs.started")
                .with_description("Runs whose start this copy recorded, by origin")
                .build(),
            finished: meter
                .u64_counter("dispatch.runs.finished")
                .with_description("Runs this copy ended, by status and origin")
                .build(),
            duration: meter
                .f64_histogram("dispatch.run.duration")
                .with_unit("s")
                .with_description("From a run's request to its end, by status and origin")
                .with_boundaries(vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                ])
                .build(),
            tokens: meter
                .u64_counter("dispatch.model.tokens")
                .with_description("Tokens models read (input) and wrote (output), by model")
                .build(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_split_into_provider_and_model() {
        assert_eq!(
            provider_and_model("openai:qwen2.5-coder-1.5b-instruct"),
            ("openai", "qwen2.5-coder-1.5b-instruct")
        );
        assert_eq!(provider_and_model("offline"), ("offline", "offline"));
    }
}
