//! Server spans: one per gRPC call (a whole stream is one call) and one per HTTP
//! request, exported over OTLP, with W3C trace context (`traceparent`, `tracestate`)
//! read from the request's headers and written on the response's.
//!
//! With no OTLP endpoint for traces (or `OTEL_SDK_DISABLED`, or
//! `OTEL_TRACES_EXPORTER=none`) there is no tracer: [`Tracing::server_span`] returns
//! `None` before reading a header, and nothing else is done per call. Work inside a
//! call (an `Ingest` stream's messages and samples) is never a span of its own: the
//! call's span carries it as counts when the call ends (`docs/metrics.md`, "Traces").

use std::{borrow::Cow, fmt, time::Duration};

use anyhow::Context as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::{SpanKind, Status, TraceContextExt as _, TraceId, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};

use super::{METER_NAME, http_client};
use crate::config::{OtelSettings, OtlpProtocol};

/// Longest `traceparent` read; a longer one is ignored (a new trace starts). Version
/// `00` is 55 bytes; later versions may append fields.
const MAX_TRACEPARENT: usize = 256;

/// Longest `tracestate` read; a longer one is dropped (W3C: 512 bytes is what every
/// propagator must pass on, and it may drop the rest).
const MAX_TRACESTATE: usize = 512;

/// The tracer, when traces are exported.
pub struct Tracing {
    /// Makes the spans; `None` when traces are off.
    tracer: Option<SdkTracer>,
    /// Exports them in batches from its own thread; flushed at shutdown.
    provider: Option<SdkTracerProvider>,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("on", &self.is_on())
            .finish()
    }
}

impl Tracing {
    /// Traces off: no span is ever made.
    pub fn off() -> Self {
        Self {
            tracer: None,
            provider: None,
        }
    }

    /// The tracer `settings` ask for: spans of `resource`, sampled as set, exported
    /// in batches to the OTLP endpoint (gRPC or HTTP); off without an endpoint.
    /// Must run inside the Tokio runtime (the exporter's connections live there).
    pub fn new(settings: &OtelSettings, resource: Resource) -> anyhow::Result<Self> {
        let Some(endpoint) = &settings.traces_endpoint else {
            return Ok(Self::off());
        };
        let exporter = match settings.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(http_client()?)
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .build(),
        }
        .context("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
        let ratio = Sampler::TraceIdRatioBased(settings.ratio);
        let sampler = if settings.parent_based {
            Sampler::ParentBased(Box::new(ratio))
        } else {
            ratio
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        Ok(Self {
            tracer: Some(provider.tracer(METER_NAME)),
            provider: Some(provider),
        })
    }

    /// Whether spans are made.
    pub fn is_on(&self) -> bool {
        self.tracer.is_some()
    }

    /// Starts a server span named `name`, child of the trace context in `headers`
    /// when they carry a valid one (a new trace otherwise); `None` when traces are
    /// off.
    pub fn server_span(
        &self,
        name: impl Into<Cow<'static, str>>,
        headers: &HeaderMap,
        attributes: Vec<KeyValue>,
    ) -> Option<CallSpan> {
        let tracer = self.tracer.as_ref()?;
        let parent = TraceContextPropagator::new().extract(&Incoming(headers));
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Some(CallSpan {
            cx: parent.with_span(span),
        })
    }

    /// Exports what is still buffered and stops, within `timeout` (blocking: call
    /// it off the runtime's threads).
    pub fn shutdown(&self, timeout: Duration) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.shutdown_with_timeout(timeout)
        {
            tracing::warn!(error = %e, "trace export shutdown failed");
        }
    }
}

/// The server span of one call; clones share it. It ends at [`CallSpan::end`], or
/// when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct CallSpan {
    /// The span, in the context its parent came in.
    cx: Context,
}

impl CallSpan {
    /// The span's trace id (also the caller's when it sent one).
    pub fn trace_id(&self) -> TraceId {
        self.cx.span().span_context().trace_id()
    }

    /// A `tracing` span carrying the trace and span ids, so that every log line
    /// written inside it names them.
    pub fn log_span(&self) -> tracing::Span {
        let span = self.cx.span();
        let context = span.span_context();
        tracing::info_span!(
            "trace",
            trace_id = %context.trace_id(),
            span_id = %context.span_id(),
        )
    }

    /// Writes the span's `traceparent` (and `tracestate`) into response headers,
    /// so the caller can find the server's span.
    pub fn inject(&self, headers: &mut HeaderMap) {
        TraceContextPropagator::new().inject_context(&self.cx, &mut Outgoing(headers));
    }

    /// Sets attributes of the span.
    pub fn set_attributes(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attributes);
    }

    /// Ends the span, as a failure with `error` when given.
    pub fn end(&self, error: Option<&str>) {
        let span = self.cx.span();
        if let Some(error) = error {
            span.set_status(Status::error(error.to_owned()));
        }
        span.end();
    }
}

/// Request headers as the propagator reads them: only `traceparent` and
/// `tracestate`, each up to its bound.
struct Incoming<'a>(&'a HeaderMap);

impl Extractor for Incoming<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let limit = match key {
            "traceparent" => MAX_TRACEPARENT,
            "tracestate" => MAX_TRACESTATE,
            _ => return None,
        };
        let value = self.0.get(key)?;
        if value.len() > limit {
            return None;
        }
        value.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|k| self.0.contains_key(*k))
            .collect()
    }
}

/// Response headers as the propagator writes them.
struct Outgoing<'a>(&'a mut HeaderMap);

impl Injector for Outgoing<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            // An empty `tracestate` says nothing.
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::SpanId;
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        trace::{SpanData, SpanExporter},
    };

    use super::*;

    /// Finished spans, kept in memory.
    #[derive(Debug, Clone, Default)]
    struct Memory(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Memory {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("spans").extend(batch);
            Ok(())
        }
    }

    impl Memory {
        fn spans(&self) -> Vec<SpanData> {
            self.0.lock().expect("spans").clone()
        }
    }

    /// A tracer exporting to memory, sampling as the parent says (else always).
    fn tracing() -> (Tracing, Memory) {
        let exporter = Memory::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .build();
        let tracing = Tracing {
            tracer: Some(provider.tracer(METER_NAME)),
            provider: Some(provider),
        };
        (tracing, exporter)
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn off_makes_no_span() {
        let span = Tracing::off().server_span("x", &headers(&[("traceparent", PARENT)]), vec![]);
        assert!(span.is_none());
    }

    #[test]
    fn a_span_continues_the_callers_trace_and_says_so_on_the_response() {
        let (tracing, exporter) = tracing();
        let incoming = headers(&[("traceparent", PARENT), ("tracestate", "vendor=1")]);
        let span = tracing
            .server_span("call", &incoming, vec![KeyValue::new("k", "v")])
            .expect("a span");
        assert_eq!(
            span.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        let mut response = HeaderMap::new();
        span.inject(&mut response);
        let traceparent = response["traceparent"].to_str().unwrap();
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && traceparent.ends_with("-01")
                && !traceparent.contains("00f067aa0ba902b7"),
            "{traceparent}"
        );
        assert_eq!(response["tracestate"], "vendor=1");
        span.end(Some("boom"));
        let spans = exporter.spans();
        assert_eq!(spans.len(), 1);
        let data = &spans[0];
        assert_eq!(data.span_kind, SpanKind::Server);
        assert_eq!(
            data.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(data.parent_span_is_remote);
        assert_eq!(data.status, Status::error("boom"));
        assert!(data.attributes.contains(&KeyValue::new("k", "v")));
    }

    #[test]
    fn bad_or_oversized_context_starts_a_new_trace() {
        let (tracing, _exporter) = tracing();
        let long_state = format!("a={}", "x".repeat(MAX_TRACESTATE));
        for incoming in [
            headers(&[("traceparent", "00-zz-00f067aa0ba902b7-01")]),
            headers(&[("traceparent", &format!("{PARENT}-{}", "0".repeat(300)))]),
            headers(&[]),
        ] {
            let span = tracing.server_span("call", &incoming, vec![]).unwrap();
            assert_ne!(
                span.trace_id(),
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
            );
            assert_ne!(span.trace_id(), TraceId::INVALID);
        }
        let span = tracing
            .server_span(
                "call",
                &headers(&[("traceparent", PARENT), ("tracestate", &long_state)]),
                vec![],
            )
            .unwrap();
        let mut response = HeaderMap::new();
        span.inject(&mut response);
        assert!(!response.contains_key("tracestate"), "{response:?}");
    }
}
