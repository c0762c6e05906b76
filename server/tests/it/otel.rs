//! OpenTelemetry against a real OTLP receiver: the `tidewatch` binary, configured only
//! through the standard `OTEL_*` variables, exports to an OTLP/gRPC server this test
//! starts, built on the official OTLP protobufs (`opentelemetry-proto`'s generated
//! tonic services), which keeps every request it receives and counts connections.
//! (No OpenTelemetry Collector can be installed from the registries this project
//! uses, see `docs/metrics.md`.)
//!
//! Checked: a unary `Analyze` continuing the caller's `traceparent` is one server span
//! of that trace and parent, named on the response; an `Ingest` stream is one span
//! with its message and sample counts (never a span per message); parent-based
//! sampling with a ratio; the HTTP gateway's spans; metrics with the semantic
//! conventions' names and attributes; the resource (`service.name`,
//! `service.version`, `service.instance.id`, `OTEL_RESOURCE_ATTRIBUTES`); the trace id
//! in the logs; and that nothing at all reaches the receiver when export is off.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{KeyValue, any_value::Value},
    metrics::v1::{Metric, metric::Data, number_data_point},
    trace::v1::{Span, span::SpanKind},
};
use prost::Message as _;
use tidewatch_proto::v1::{AnalyzeRequest, IngestRequest};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::common::{ServerProcess, connect, drain, http_send, sample};

/// What the receiver got.
#[derive(Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    /// TCP connections accepted: zero means nothing was even attempted.
    connections: Arc<AtomicUsize>,
    /// The `content-type` of every OTLP/HTTP request.
    content_types: Arc<Mutex<Vec<String>>>,
}

/// `POST /v1/traces` of OTLP/HTTP: a protobuf `ExportTraceServiceRequest`.
async fn http_traces(
    axum::extract::State(received): axum::extract::State<Received>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    http_export(
        &received,
        &headers,
        &body,
        |r: ExportTraceServiceRequest| {
            received.traces.lock().unwrap().push(r);
            ExportTraceServiceResponse::default().encode_to_vec()
        },
    )
}

/// `POST /v1/metrics` of OTLP/HTTP: a protobuf `ExportMetricsServiceRequest`.
async fn http_metrics(
    axum::extract::State(received): axum::extract::State<Received>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    http_export(
        &received,
        &headers,
        &body,
        |r: ExportMetricsServiceRequest| {
            received.metrics.lock().unwrap().push(r);
            ExportMetricsServiceResponse::default().encode_to_vec()
        },
    )
}

/// Decodes an OTLP/HTTP body, keeps it, answers as the protocol says (`400` for a
/// body that does not decode).
fn http_export<M: prost::Message + Default>(
    received: &Received,
    headers: &http::HeaderMap,
    body: &[u8],
    keep: impl FnOnce(M) -> Vec<u8>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    received.content_types.lock().unwrap().push(content_type);
    match M::decode(body) {
        Ok(message) => (
            [(http::header::CONTENT_TYPE, "application/x-protobuf")],
            keep(message),
        )
            .into_response(),
        Err(e) => (http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free loopback port.
struct Receiver {
    addr: SocketAddr,
    received: Received,
    _stop: oneshot::Sender<()>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Received::default();
        let connections = Arc::clone(&received.connections);
        let incoming = TcpListenerStream::new(listener).inspect(move |_| {
            connections.fetch_add(1, Ordering::SeqCst);
        });
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .add_service(MetricsServiceServer::new(received.clone()))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        Self {
            addr,
            received,
            _stop: stop,
        }
    }

    /// An OTLP/HTTP receiver (protobuf bodies) on a free loopback port.
    async fn start_http() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Received::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_traces))
            .route("/v1/metrics", axum::routing::post(http_metrics))
            .with_state(received.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            received,
            _stop: stop,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received, with the attributes of its resource.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let traces = self.received.traces.lock().unwrap();
        let mut spans = Vec::new();
        for request in traces.iter() {
            for resource_spans in &request.resource_spans {
                let resource = resource_spans
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push((resource.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// Every metric received, with the attributes of its resource.
    fn metrics(&self) -> Vec<(Vec<KeyValue>, Metric)> {
        let exports = self.received.metrics.lock().unwrap();
        let mut metrics = Vec::new();
        for request in exports.iter() {
            for resource_metrics in &request.resource_metrics {
                let resource = resource_metrics
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for scope in &resource_metrics.scope_metrics {
                    for metric in &scope.metrics {
                        metrics.push((resource.clone(), metric.clone()));
                    }
                }
            }
        }
        metrics
    }

    fn connections(&self) -> usize {
        self.received.connections.load(Ordering::SeqCst)
    }

    /// Waits up to 10 s for a span of `trace_id`.
    async fn span_of(&self, trace_id: &str) -> (Vec<KeyValue>, Span) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = self
                .spans()
                .into_iter()
                .find(|(_, s)| hex(&s.trace_id) == trace_id)
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no span of trace {trace_id}; received {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to 10 s for an export holding the metric `name` with a data point
    /// whose attributes include `attributes`; returns the metric and its resource.
    async fn metric(&self, name: &str, attributes: &[(&str, Value)]) -> (Vec<KeyValue>, Metric) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.metrics().into_iter().rev().find(|(_, m)| {
                m.name == name
                    && point_attributes(m).iter().any(|point| {
                        attributes
                            .iter()
                            .all(|(k, v)| attribute(point, k) == Some(v))
                    })
            });
            if let Some(found) = found {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} with {attributes:?}; received {:#?}",
                self.metrics()
                    .iter()
                    .map(|(_, m)| (&m.name, point_attributes(m)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The attribute sets of a metric's data points.
fn point_attributes(metric: &Metric) -> Vec<Vec<KeyValue>> {
    match &metric.data {
        Some(Data::Histogram(h)) => h.data_points.iter().map(|p| p.attributes.clone()).collect(),
        Some(Data::Sum(s)) => s.data_points.iter().map(|p| p.attributes.clone()).collect(),
        Some(Data::Gauge(g)) => g.data_points.iter().map(|p| p.attributes.clone()).collect(),
        _ => Vec::new(),
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn text(value: &str) -> Value {
    Value::StringValue(value.to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random trace id and span id, as hex.
fn ids() -> (String, String) {
    let trace = format!("{:032x}", fastrand::u128(1..));
    let span = format!("{:016x}", fastrand::u64(1..));
    (trace, span)
}

/// The gateway's address, from the "http listening" log line.
fn http_addr(server: &ServerProcess) -> SocketAddr {
    server
        .json_log()
        .iter()
        .find(|v| v["message"] == "http listening")
        .and_then(|v| v["http_addr"].as_str()?.parse().ok())
        .expect("http listening line")
}

/// The `traceparent` of a gRPC response's metadata.
fn traceparent<T>(response: &Response<T>) -> Option<String> {
    response
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Exports fast enough for a test: spans every 100 ms, metrics every 200 ms.
const FAST_EXPORT: [(&str, &str); 2] = [
    ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_metrics_and_logs_reach_a_real_otlp_receiver() {
    let receiver = Receiver::start().await;
    let endpoint = receiver.endpoint();
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "tidewatch-it"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test,service.name=ignored",
        ),
        // Root calls are never sampled, sampled callers always are.
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ("LOG_LEVEL", "info,tidewatch_server=debug"),
    ];
    envs.extend(FAST_EXPORT);
    let server = ServerProcess::spawn(&[], &envs);
    let started = server
        .json_log()
        .into_iter()
        .find(|v| v["message"] == "opentelemetry export on")
        .expect("the export is announced");
    assert_eq!(started["traces"], endpoint, "{started}");
    assert_eq!(started["protocol"], "grpc", "{started}");
    let mut client = connect(&server.grpc_url()).await;

    // An Ingest stream of a sampled caller: five messages of two samples.
    let (ingest_trace, ingest_parent) = ids();
    let requests: Vec<IngestRequest> = (0..5u64)
        .map(|i| IngestRequest {
            samples: vec![
                sample("otel-a", i + 1, &[("cpu", 10.0 + i as f64)]),
                sample("otel-b", i + 1, &[("cpu", 20.0 + i as f64)]),
            ],
            ..IngestRequest::default()
        })
        .collect();
    let mut request = Request::new(tokio_stream::iter(requests));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{ingest_trace}-{ingest_parent}-01")
            .parse()
            .unwrap(),
    );
    let response = client.ingest(request).await.expect("ingest");
    let ingest_answer = traceparent(&response).expect("traceparent on the Ingest response");
    let mut stream = response.into_inner();
    let (verdicts, status) = drain(&mut stream).await;
    assert_eq!((verdicts.len(), status.map(|s| s.code())), (5, None));

    // A unary Analyze of a sampled caller.
    let (analyze_trace, analyze_parent) = ids();
    let mut request = Request::new(AnalyzeRequest {
        device_id: "otel-a".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{analyze_trace}-{analyze_parent}-01")
            .parse()
            .unwrap(),
    );
    let response = client.analyze(request).await.expect("analyze");
    let analyze_answer = traceparent(&response).expect("traceparent on the Analyze response");

    // An unsampled caller, and a caller without a trace: answered, never exported.
    let (quiet_trace, quiet_parent) = ids();
    let mut request = Request::new(AnalyzeRequest {
        device_id: "otel-a".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{quiet_trace}-{quiet_parent}-00")
            .parse()
            .unwrap(),
    );
    let response = client.analyze(request).await.expect("analyze");
    let quiet_answer = traceparent(&response).expect("traceparent");
    assert!(
        quiet_answer.starts_with(&format!("00-{quiet_trace}-")) && quiet_answer.ends_with("-00"),
        "{quiet_answer}"
    );
    let response = client
        .analyze(AnalyzeRequest {
            device_id: "otel-a".into(),
        })
        .await
        .expect("analyze");
    let root_answer = traceparent(&response).expect("traceparent of a new trace");
    assert!(root_answer.ends_with("-00"), "ratio 0: {root_answer}");

    // The gateway, for a sampled caller.
    let (http_trace, http_parent) = ids();
    let http = http_addr(&server);
    let answer = http_send(
        http,
        http::Request::get("/analyze?device_id=otel-b")
            .header("traceparent", format!("00-{http_trace}-{http_parent}-01"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let http_answer = answer
        .header("traceparent")
        .expect("traceparent on the HTTP response")
        .to_owned();

    // Analyze: one server span, child of the caller's, named on the response.
    let (resource, span) = receiver.span_of(&analyze_trace).await;
    assert_eq!(span.name, "tidewatch.v1.TelemetryService/Analyze");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.parent_span_id), analyze_parent);
    assert_eq!(
        analyze_answer,
        format!("00-{analyze_trace}-{}-01", hex(&span.span_id))
    );
    for (key, value) in [
        ("rpc.system", text("grpc")),
        ("rpc.service", text("tidewatch.v1.TelemetryService")),
        ("rpc.method", text("Analyze")),
        ("rpc.grpc.status_code", Value::IntValue(0)),
    ] {
        assert_eq!(attribute(&span.attributes, key), Some(&value), "{key}");
    }
    assert_eq!(
        attribute(&resource, "service.name"),
        Some(&text("tidewatch-it"))
    );
    assert_eq!(
        attribute(&resource, "service.version"),
        Some(&text(env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        attribute(&resource, "deployment.environment.name"),
        Some(&text("test"))
    );
    let instance = match attribute(&resource, "service.instance.id") {
        Some(Value::StringValue(id)) if id.len() == 36 => id.clone(),
        other => panic!("service.instance.id: {other:?}"),
    };

    // Ingest: one span for the whole stream, carrying its counts.
    let (_, span) = receiver.span_of(&ingest_trace).await;
    assert_eq!(span.name, "tidewatch.v1.TelemetryService/Ingest");
    assert_eq!(hex(&span.parent_span_id), ingest_parent);
    assert_eq!(
        ingest_answer,
        format!("00-{ingest_trace}-{}-01", hex(&span.span_id))
    );
    for (key, value) in [
        ("rpc.method", text("Ingest")),
        ("rpc.grpc.status_code", Value::IntValue(0)),
        ("tidewatch.ingest.messages", Value::IntValue(5)),
        ("tidewatch.ingest.samples", Value::IntValue(10)),
        ("tidewatch.ingest.waited_messages", Value::IntValue(0)),
    ] {
        assert_eq!(attribute(&span.attributes, key), Some(&value), "{key}");
    }

    // The gateway: `GET /analyze`, child of the caller's span.
    let (_, span) = receiver.span_of(&http_trace).await;
    assert_eq!(span.name, "GET /analyze");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.parent_span_id), http_parent);
    assert_eq!(
        http_answer,
        format!("00-{http_trace}-{}-01", hex(&span.span_id))
    );
    for (key, value) in [
        ("http.request.method", text("GET")),
        ("http.route", text("/analyze")),
        ("http.response.status_code", Value::IntValue(200)),
    ] {
        assert_eq!(attribute(&span.attributes, key), Some(&value), "{key}");
    }

    // Metrics: the semantic conventions' durations and the service's counters,
    // from the same resource.
    let (metric_resource, metric) = receiver
        .metric(
            "rpc.server.call.duration",
            &[
                ("rpc.system", text("grpc")),
                ("rpc.service", text("tidewatch.v1.TelemetryService")),
                ("rpc.method", text("Analyze")),
                ("rpc.grpc.status_code", Value::IntValue(0)),
            ],
        )
        .await;
    assert_eq!(metric.unit, "s");
    assert_eq!(
        attribute(&metric_resource, "service.instance.id"),
        Some(&text(&instance))
    );
    assert_eq!(
        attribute(&metric_resource, "service.name"),
        Some(&text("tidewatch-it"))
    );
    receiver
        .metric(
            "rpc.server.call.duration",
            &[("rpc.method", text("Ingest"))],
        )
        .await;
    receiver
        .metric(
            "http.server.request.duration",
            &[
                ("http.request.method", text("GET")),
                ("http.route", text("/analyze")),
                ("http.response.status_code", Value::IntValue(200)),
            ],
        )
        .await;
    // The counters, cumulative: the ten samples of the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let applied = receiver.metrics().into_iter().any(|(_, m)| {
            m.name == "tidewatch_samples"
                && matches!(&m.data, Some(Data::Sum(sum)) if sum.data_points.iter().any(|p| {
                    attribute(&p.attributes, "transport") == Some(&text("grpc"))
                        && p.value == Some(number_data_point::Value::AsInt(10))
                }))
        });
        if applied {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no tidewatch_samples of 10 over grpc"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The logs name the trace of the call they were written in.
    for (trace, message) in [
        (&analyze_trace, "grpc call finished"),
        (&ingest_trace, "grpc call finished"),
        (&http_trace, "http request finished"),
    ] {
        server
            .log
            .wait_for(
                |v| v["message"] == message && v["trace_id"] == trace.as_str(),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("no {message:?} line with trace_id {trace}"));
    }

    // Nothing else was exported: no span of the unsampled calls, none per message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    let traces: Vec<String> = spans.iter().map(|(_, s)| hex(&s.trace_id)).collect();
    assert_eq!(spans.len(), 3, "{traces:?}");
    for trace in [&analyze_trace, &ingest_trace, &http_trace] {
        assert!(traces.contains(trace), "{trace} in {traces:?}");
    }
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_exported_when_export_is_off() {
    let receiver = Receiver::start().await;
    let endpoint = receiver.endpoint();
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for envs in [
        // No endpoint: the rest of the settings change nothing.
        vec![
            ("OTEL_SERVICE_NAME", "tidewatch-off"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ],
        // An endpoint, but the SDK is off.
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SDK_DISABLED", "true"),
        ],
        // An endpoint, but both signals' exporters are `none`.
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ],
    ] {
        let mut all = envs.clone();
        all.extend(FAST_EXPORT);
        all.push(("LOG_LEVEL", "info,tidewatch_server=debug"));
        let server = ServerProcess::spawn(&[], &all);
        assert!(
            server.json_log().iter().any(|v| v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("opentelemetry export off"))),
            "{envs:?}: {:?}",
            server.startup_log
        );
        let mut client = connect(&server.grpc_url()).await;
        let mut request = Request::new(AnalyzeRequest {
            device_id: "nobody".into(),
        });
        request
            .metadata_mut()
            .insert("traceparent", sampled.parse().unwrap());
        let status = client.analyze(request).await.expect_err("unknown device");
        assert!(
            !status.metadata().contains_key("traceparent"),
            "{envs:?}: {status:?}"
        );
        let answer = http_send(
            http_addr(&server),
            http::Request::get("/analyze?device_id=nobody")
                .header("traceparent", sampled)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, 404);
        assert!(answer.header("traceparent").is_none(), "{envs:?}");
        // Several export intervals pass; nothing connects, no log names a trace.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(receiver.connections(), 0, "{envs:?}");
        let log = server.json_log();
        assert!(
            log.iter().all(|v| !v.to_string().contains("trace_id")),
            "{envs:?}: {log:?}"
        );
        let status = server.terminate();
        assert!(status.success(), "{envs:?}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_alone_are_exported_when_traces_are_off() {
    let receiver = Receiver::start().await;
    let endpoint = receiver.endpoint();
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint.as_str()),
        ("OTEL_TRACES_EXPORTER", "none"),
    ];
    envs.extend(FAST_EXPORT);
    let server = ServerProcess::spawn(&[], &envs);
    let mut client = connect(&server.grpc_url()).await;
    let mut request = Request::new(AnalyzeRequest {
        device_id: "nobody".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let status = client.analyze(request).await.expect_err("unknown device");
    assert!(!status.metadata().contains_key("traceparent"));
    let (resource, _) = receiver
        .metric(
            "rpc.server.call.duration",
            &[
                ("rpc.method", text("Analyze")),
                ("rpc.grpc.status_code", Value::IntValue(5)),
            ],
        )
        .await;
    assert_eq!(
        attribute(&resource, "service.name"),
        Some(&text("tidewatch"))
    );
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(receiver.spans().is_empty(), "{:?}", receiver.spans());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_metrics_also_travel_over_otlp_http() {
    let receiver = Receiver::start_http().await;
    let endpoint = receiver.endpoint();
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_SERVICE_NAME", "tidewatch-http"),
    ];
    envs.extend(FAST_EXPORT);
    let server = ServerProcess::spawn(&[], &envs);
    let started = server
        .json_log()
        .into_iter()
        .find(|v| v["message"] == "opentelemetry export on")
        .expect("the export is announced");
    assert_eq!(started["protocol"], "http/protobuf", "{started}");
    assert_eq!(
        started["traces"],
        format!("{endpoint}/v1/traces"),
        "{started}"
    );
    assert_eq!(
        started["metrics"],
        format!("{endpoint}/v1/metrics"),
        "{started}"
    );

    let (trace, parent) = ids();
    let mut client = connect(&server.grpc_url()).await;
    let mut request = Request::new(AnalyzeRequest {
        device_id: "nobody".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    let status = client.analyze(request).await.expect_err("unknown device");
    assert!(status.metadata().contains_key("traceparent"), "{status:?}");

    let (resource, span) = receiver.span_of(&trace).await;
    assert_eq!(span.name, "tidewatch.v1.TelemetryService/Analyze");
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(
        attribute(&span.attributes, "rpc.grpc.status_code"),
        Some(&Value::IntValue(5))
    );
    assert_eq!(
        attribute(&resource, "service.name"),
        Some(&text("tidewatch-http"))
    );
    receiver
        .metric(
            "rpc.server.call.duration",
            &[
                ("rpc.method", text("Analyze")),
                ("rpc.grpc.status_code", Value::IntValue(5)),
            ],
        )
        .await;
    let content_types = receiver.received.content_types.lock().unwrap().clone();
    assert!(
        content_types.iter().all(|c| c == "application/x-protobuf"),
        "{content_types:?}"
    );
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}
