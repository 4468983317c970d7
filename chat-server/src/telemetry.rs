//! Logs and traces: the process's `tracing` subscriber, and the W3C trace context each message carries
//! through the bus, from `sendMessage` through the translators and the fanout to the gateways'
//! delivery.
//!
//! Every message is handled inside a span whose parent is the context the message arrived with, so a
//! message and each of its translations and deliveries share one trace id. Log lines written inside
//! those spans carry it as the span field `trace_id`. Spans are exported over OTLP/HTTP when
//! `--otlp-endpoint` is set; otherwise they only give the logs their ids and are dropped.

use std::time::Duration;

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer as _};

use crate::config::LogFormat;

/// How long exporting the spans still buffered may hold up the exit.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// The headers the W3C trace context propagator reads and writes.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Longest `tracestate` a message carries on: a client's may be large, and it would be copied into
/// every translation and delivery.
const MAX_TRACESTATE: usize = 512;

/// The W3C trace context of one message (`traceparent`, and `tracestate` when set): AMQP headers on
/// RabbitMQ, and HTTP headers on a `sendMessage` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders(Vec<(String, String)>);

impl TraceHeaders {
    /// The context of `span`, for a message published from inside it.
    pub fn of(span: &tracing::Span) -> Self {
        let mut headers = Self::default();
        TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
        headers
    }

    /// The headers of the names the propagator reads, from any set of (name, value) pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .filter(|(name, value)| {
                    TRACE_HEADERS.iter().any(|w| w.eq_ignore_ascii_case(name))
                        && !(name.eq_ignore_ascii_case("tracestate") && value.len() > MAX_TRACESTATE)
                })
                .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
                .collect(),
        )
    }

    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// Makes `span` a child of this context (a new trace when there is none) and records its trace id
    /// in the span's `trace_id` field, which every log line inside it shows. Call it before the span
    /// is first entered.
    pub fn continue_in(&self, span: &tracing::Span) {
        let parent = TraceContextPropagator::new().extract(self);
        if parent.span().span_context().is_valid() {
            if let Err(err) = span.set_parent(parent) {
                tracing::debug!(error = %err, "a span could not join its message's trace");
            }
        }
        let context = span.context();
        let ids = context.span().span_context().clone();
        if ids.is_valid() {
            span.record("trace_id", tracing::field::display(ids.trace_id()));
        }
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(name, _)| name != key);
        self.0.push((key.to_owned(), value));
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)).map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// Follows the caller's sampling decision, and samples `ratio` of the traces that start here. An
/// unsampled span still has its ids, so logs and the headers a message carries keep its trace.
fn sampler(ratio: f64) -> opentelemetry_sdk::trace::Sampler {
    use opentelemetry_sdk::trace::Sampler;
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

/// Exports the spans still buffered when dropped (the end of `main`).
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // The exporter's HTTP client blocks: off the runtime's threads.
        let provider = self.provider.clone();
        let flushed = std::thread::spawn(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT)).join();
        if let Ok(Err(err)) = flushed {
            eprintln!("exporting the last spans failed: {err}");
        }
    }
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
#[error("cannot export spans to {endpoint}: {reason}")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

/// Installs the process's subscriber: logs to stderr in `format`, filtered by `RUST_LOG`, and spans
/// to `otlp_endpoint` (an OTLP/HTTP traces URL) when given, named `service` there: of the traces
/// started here, `sample_ratio` of them; of those continued, as their caller decided.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    sample_ratio: f64,
    service: &str,
) -> Result<Telemetry, TelemetryError> {
    let mut provider = SdkTracerProvider::builder()
        .with_sampler(sampler(sample_ratio))
        .with_resource(Resource::builder().with_service_name(service.to_owned()).build());
    if let Some(endpoint) = otlp_endpoint {
        let failed = |reason: String| TelemetryError { endpoint: endpoint.to_owned(), reason };
        let endpoint_owned = endpoint.to_owned();
        // The exporter's blocking HTTP client must be built (and used) off the async runtime: the
        // batch processor sends from a thread of its own.
        let exporter = std::thread::spawn(move || {
            use opentelemetry_otlp::WithExportConfig;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint_owned)
                .with_timeout(Duration::from_secs(10))
                .build()
        })
        .join()
        .map_err(|_| failed("building the exporter panicked".into()))?
        .map_err(|err| failed(err.to_string()))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer("chat-server");
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn"));
    // Colours only for a person at a terminal: a pod's log (or a file) gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    // The message spans whatever `RUST_LOG` says: a quiet log must not break the traces.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(EnvFilter::new("chat_server=info"));
    let registry = tracing_subscriber::registry().with(spans);
    match format {
        LogFormat::Json => registry.with(logs.json().with_filter(filter())).init(),
        LogFormat::Text => registry.with(logs.with_filter(filter())).init(),
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_trace_context_headers_are_kept_and_read_whatever_their_case() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let huge = "k=".to_owned() + &"v".repeat(MAX_TRACESTATE);
        let pairs = [("TraceParent", parent), ("content-type", "application/json"), ("tracestate", huge.as_str())];
        let headers = TraceHeaders::from_pairs(pairs);
        assert_eq!(
            headers.pairs().collect::<Vec<_>>(),
            vec![("traceparent", parent)],
            "an oversized tracestate is dropped"
        );
        let context = TraceContextPropagator::new().extract(&headers);
        assert_eq!(context.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn an_unsampled_trace_is_not_exported_and_a_sampled_caller_is_followed() {
        use opentelemetry::trace::{SpanKind, TraceId};
        use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample};
        let never = sampler(0.0);
        let id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let decide = |parent: Option<&opentelemetry::Context>| -> SamplingResult {
            never.should_sample(parent, id, "send_message", &SpanKind::Internal, &[], &[])
        };
        assert_eq!(decide(None).decision, SamplingDecision::Drop, "a new trace at ratio 0 is not exported");
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let caller = TraceContextPropagator::new().extract(&TraceHeaders::from_pairs([("traceparent", parent)]));
        assert_eq!(decide(Some(&caller)).decision, SamplingDecision::RecordAndSample, "a sampled caller is followed");
    }
}
