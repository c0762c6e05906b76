//! Logs (`tracing`), metrics (the OpenTelemetry API, exposed to Prometheus and, when
//! an endpoint is set, exported over OTLP) and traces ([`trace`], [`rpc`]).
//!
//! Counters on the ingest path are plain atomics added to once per message (never once
//! per sample) and handed to OpenTelemetry as observable instruments read at scrape
//! time, so recording costs a few relaxed atomic adds. Latencies go into OpenTelemetry
//! histograms, once per call or request, except the per-message latency of `Ingest`:
//! it has one lock-free histogram of its own that `/metrics` merges into the
//! exposition (`ingest_histogram`, which holds the reason and the contract). The
//! durations of calls and requests follow the semantic conventions
//! (`rpc.server.call.duration`, `http.server.request.duration`). No device id and no
//! metric name is ever a label or an attribute: their cardinality is unbounded.

mod http_duration;
mod ingest_histogram;
mod otlp_http;
pub mod rpc;
pub mod trace;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry::{
    Key, KeyValue, Value,
    metrics::{Histogram, Meter, MeterProvider},
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    metrics::SdkMeterProvider,
    resource::{EnvResourceDetector, ResourceDetector, TelemetryResourceDetector},
    trace::{IdGenerator as _, RandomIdGenerator},
};
use prometheus::{Encoder, TextEncoder};

use self::{
    http_duration::{HttpDurations, HttpSeries},
    ingest_histogram::IngestHistogram,
    rpc::{RpcCall, RpcMethod},
    trace::Tracing,
};
use crate::{
    config::{Config, LogFormat, OtelSettings, OtlpProtocol},
    engine::{BatchOutcome, Engine},
    error::SampleError,
};

/// Installs the global `tracing` subscriber: human-readable or JSON lines on stdout.
pub fn init_logging(config: &Config) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_target(false);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Latency buckets in seconds: 50 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The OpenTelemetry meter and tracer; the exporter adds it as the `otel_scope_name`
/// label.
const METER_NAME: &str = "tidewatch";

/// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` say
/// otherwise.
const SERVICE_NAME: &str = "tidewatch";

/// The duration of a `TelemetryService` call (semantic conventions; Prometheus:
/// `rpc_server_call_duration_seconds`).
const RPC_DURATION: &str = "rpc.server.call.duration";

/// The duration of an HTTP request (semantic conventions; Prometheus:
/// `http_server_request_duration_seconds`).
const HTTP_DURATION: &str = "http.server.request.duration";

/// The per-message latency of `Ingest`, as OpenTelemetry would name it.
#[cfg(test)]
const INGEST_DURATION: &str = "tidewatch.ingest.message.duration";

/// Its Prometheus name (the exporter's conversion of `INGEST_DURATION` with unit
/// `s`).
const INGEST_DURATION_PROMETHEUS: &str = "tidewatch_ingest_message_duration_seconds";

/// Its description (`# HELP`).
const INGEST_DURATION_HELP: &str = "Time to judge one Ingest stream message";

/// The resource every exported span and metric carries, and `target_info` shows:
/// `OTEL_RESOURCE_ATTRIBUTES`, then `service.name` (`OTEL_SERVICE_NAME`, else the
/// attribute, else `tidewatch`), `service.version` (this build's) and
/// `service.instance.id` (the attribute, else a random UUID per process).
pub fn resource(settings: &OtelSettings) -> Resource {
    let from_env = Resource::builder_empty()
        .with_detector(Box::new(EnvResourceDetector::new()))
        .build();
    let attribute = |key: &'static str| {
        from_env
            .get(&Key::from_static_str(key))
            .map(|v| v.as_str().into_owned())
            .filter(|v| !v.is_empty())
    };
    let name = settings
        .service_name
        .clone()
        .or_else(|| attribute("service.name"))
        .unwrap_or_else(|| SERVICE_NAME.to_owned());
    let instance = attribute("service.instance.id").unwrap_or_else(random_uuid);
    let detectors: [Box<dyn ResourceDetector>; 2] = [
        Box::new(TelemetryResourceDetector),
        Box::new(EnvResourceDetector::new()),
    ];
    Resource::builder_empty()
        .with_detectors(&detectors)
        .with_attributes([
            KeyValue::new("service.name", name),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", Value::from(instance)),
        ])
        .build()
}

/// The client of the OTLP/HTTP exporters, on the current runtime.
fn http_client() -> anyhow::Result<otlp_http::RuntimeHttpClient> {
    otlp_http::RuntimeHttpClient::current()
        .context("OTLP over HTTP must be set up inside the Tokio runtime")
}

/// A random (version 4) UUID.
fn random_uuid() -> String {
    let mut bytes = RandomIdGenerator::default().new_trace_id().to_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The `http.request.method` value: the standard methods, else `_OTHER`.
pub(crate) fn http_method(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The transport a sample or request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC `Ingest` or other RPCs.
    Grpc,
    /// The HTTP/JSON gateway.
    Http,
}

impl Transport {
    const ALL: [Transport; 2] = [Transport::Grpc, Transport::Http];

    fn index(self) -> usize {
        self as usize
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }
}

/// Reasons a sample is rejected, as labels (the prefixes of `SampleError`).
const REJECT_REASONS: [&str; SampleError::REASONS.len()] = SampleError::REASONS;

/// Index of `memory_budget` in [`REJECT_REASONS`].
const MEMORY_BUDGET_REASON: usize = 9;
const _: () = assert!(matches!(
    REJECT_REASONS[MEMORY_BUDGET_REASON].as_bytes(),
    b"memory_budget"
));

/// Per-transport counters.
#[derive(Debug, Default)]
struct TransportCounters {
    /// Samples applied to windows.
    samples: AtomicU64,
    /// Samples whose verdict is an anomaly.
    anomalies: AtomicU64,
    /// Samples answered as duplicates.
    duplicates: AtomicU64,
    /// Rejected samples, by reason (index into `REJECT_REASONS`).
    rejected: [AtomicU64; REJECT_REASONS.len()],
    /// Requests or streams refused by overload protection.
    shed: AtomicU64,
}

/// The atomics behind the observable instruments.
#[derive(Debug, Default)]
pub struct Counters {
    /// One set per transport.
    transports: [TransportCounters; 2],
    /// Open Ingest streams.
    ingest_streams: AtomicI64,
    /// Open WatchAnomalies streams.
    watchers: AtomicI64,
    /// Events watchers missed because they read too slowly.
    watch_missed: AtomicU64,
    /// Snapshot flushes that failed (Redis down, timeout).
    pub snapshot_failures: AtomicU64,
    /// Device snapshots written.
    pub snapshot_writes: AtomicU64,
    /// Devices restored from a snapshot.
    pub snapshot_restores: AtomicU64,
    /// Snapshot reads (restore, analyze) that failed against Redis.
    pub snapshot_read_failures: AtomicU64,
    /// Snapshots that could not be decoded (other version, garbage, above
    /// `SNAPSHOT_MAX_BYTES`).
    pub snapshot_decode_errors: AtomicU64,
    /// Snapshot keys that held another Redis type than a string.
    pub snapshot_wrong_type: AtomicU64,
    /// Devices deleted by `DeleteDevice` (or `DELETE /devices/{id}`) that had state.
    pub devices_deleted: AtomicU64,
}

/// The service's metrics; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    /// The atomics read at scrape time.
    counters: Arc<Counters>,
    /// Where the exporter registers; `/metrics` gathers from it.
    registry: prometheus::Registry,
    /// Keeps the OpenTelemetry pipeline (and its callbacks) alive.
    provider: SdkMeterProvider,
    /// Whether metrics are also exported over OTLP.
    otlp: bool,
    /// `rpc.server.call.duration`: one `TelemetryService` call, a whole stream
    /// included.
    rpc_duration: Histogram<f64>,
    /// Time to judge one Ingest message (`tidewatch_ingest_message_duration_seconds`).
    ingest_latency: IngestHistogram,
    /// `http.server.request.duration`: one HTTP request.
    http_duration: HttpDurations,
    /// Time one snapshot flush took.
    snapshot_flush: Histogram<f64>,
}

/// Decrements an active gauge when dropped (an open stream or watcher).
#[derive(Debug)]
pub struct ActiveGauge {
    /// The counters the gauge lives in.
    counters: Arc<Counters>,
    /// Which gauge.
    watcher: bool,
}

impl Drop for ActiveGauge {
    fn drop(&mut self) {
        let gauge = if self.watcher {
            &self.counters.watchers
        } else {
            &self.counters.ingest_streams
        };
        gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Builds the OpenTelemetry pipeline with a Prometheus exporter (and an OTLP one
    /// when `settings` name an endpoint for metrics) over `resource`, and registers
    /// every instrument. `engine` feeds the devices gauge. With OTLP on, it must run
    /// inside the Tokio runtime (the exporter's channel lives there).
    pub fn new(
        engine: Arc<Engine>,
        settings: &OtelSettings,
        resource: Resource,
    ) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(exporter);
        if let Some(endpoint) = &settings.metrics_endpoint {
            let otlp = match settings.protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build(),
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_http_client(http_client()?)
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .build(),
            }
            .context("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")?;
            builder = builder.with_periodic_exporter(otlp);
        }
        let provider = builder.build();
        let meter = provider.meter(METER_NAME);
        let counters = Arc::new(Counters::default());
        register_observables(&meter, &counters, engine);
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        Ok(Self {
            rpc_duration: histogram(
                RPC_DURATION,
                "Time from a gRPC call's request to its final status (a whole stream included)",
            ),
            ingest_latency: IngestHistogram::default(),
            http_duration: HttpDurations::new(histogram(
                HTTP_DURATION,
                "Time to answer one HTTP request",
            )),
            snapshot_flush: histogram(
                "tidewatch_snapshot_flush_duration",
                "Time one snapshot flush took, successful or not",
            ),
            counters,
            registry,
            provider,
            otlp: settings.metrics_endpoint.is_some(),
        })
    }

    /// Whether metrics are also exported over OTLP.
    pub fn exports_otlp(&self) -> bool {
        self.otlp
    }

    /// The counters, for modules that count directly (snapshots).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counters, shared (the snapshot tasks outlive any one request).
    pub fn shared_counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Records one judged message (or the part of it judged in one go): counters once,
    /// and the latency once, when given (a message split between the fast path and a
    /// restore is timed where it is finished).
    pub fn record_batch(
        &self,
        transport: Transport,
        outcome: &BatchOutcome,
        elapsed: Option<Duration>,
    ) {
        let c = &self.counters.transports[transport.index()];
        c.samples.fetch_add(outcome.applied, Ordering::Relaxed);
        if outcome.anomalies > 0 {
            c.anomalies.fetch_add(outcome.anomalies, Ordering::Relaxed);
        }
        if outcome.duplicates > 0 {
            c.duplicates
                .fetch_add(outcome.duplicates, Ordering::Relaxed);
        }
        if outcome.rejected > 0 {
            for (counter, &n) in c.rejected.iter().zip(&outcome.rejected_by_reason) {
                if n > 0 {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
            // A sample refused by the memory budget is load shed too (one per sample).
            let over_budget = outcome.rejected_by_reason[MEMORY_BUDGET_REASON];
            if over_budget > 0 {
                c.shed.fetch_add(over_budget, Ordering::Relaxed);
            }
        }
        if transport == Transport::Grpc
            && let Some(elapsed) = elapsed
        {
            self.ingest_latency.record(elapsed);
        }
    }

    /// Records a whole request that was refused before any sample was judged (HTTP
    /// 400/413), counted as rejected under `reason`.
    pub fn record_rejected_request(
        &self,
        transport: Transport,
        reason: &'static str,
        samples: u64,
    ) {
        let c = &self.counters.transports[transport.index()];
        if let Some(i) = REJECT_REASONS.iter().position(|r| *r == reason) {
            c.rejected[i].fetch_add(samples, Ordering::Relaxed);
        }
    }

    /// Starts observing a `TelemetryService` call to `method` whose request carries
    /// `headers`: its duration, and its server span when `tracing` is on.
    pub fn start_rpc(
        &self,
        tracing: &Tracing,
        method: RpcMethod,
        headers: &http::HeaderMap,
    ) -> RpcCall {
        RpcCall::start(self.rpc_duration.clone(), tracing, method, headers)
    }

    /// Records the duration of an HTTP request; `route` is its route pattern, `None`
    /// when no route matched (the attribute is left out then); `scheme` is `http`
    /// or `https`.
    pub fn record_http(
        &self,
        scheme: &'static str,
        method: &http::Method,
        route: Option<&'static str>,
        status: u16,
        elapsed: Duration,
    ) {
        let series = HttpSeries {
            method: http_method(method),
            route,
            status,
            scheme,
        };
        self.http_duration.record(series, elapsed);
    }

    /// Records one snapshot flush.
    pub fn record_snapshot_flush(&self, elapsed: Duration, ok: bool) {
        self.snapshot_flush.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("result", if ok { "ok" } else { "error" })],
        );
    }

    /// Counts a request or stream refused by overload protection.
    pub fn record_shed(&self, transport: Transport) {
        self.counters.transports[transport.index()]
            .shed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts events a watcher missed.
    pub fn record_watch_missed(&self, missed: u64) {
        self.counters
            .watch_missed
            .fetch_add(missed, Ordering::Relaxed);
    }

    /// Opens an Ingest stream unless `limit` are open already (0 means no limit).
    pub fn try_open_stream(&self, limit: usize) -> Option<ActiveGauge> {
        let streams = &self.counters.ingest_streams;
        let previous = streams.fetch_add(1, Ordering::Relaxed);
        if limit > 0 && previous >= limit as i64 {
            streams.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ActiveGauge {
            counters: Arc::clone(&self.counters),
            watcher: false,
        })
    }

    /// Whether any anomaly watcher is open (an atomic load: the ingest path asks once
    /// per message, where the broadcast channel's `receiver_count` takes a lock).
    pub fn watching(&self) -> bool {
        self.counters.watchers.load(Ordering::Relaxed) > 0
    }

    /// Opens a watcher unless `limit` are open already (0 means no limit).
    pub fn try_open_watcher(&self, limit: usize) -> Option<ActiveGauge> {
        let watchers = &self.counters.watchers;
        let previous = watchers.fetch_add(1, Ordering::Relaxed);
        if limit > 0 && previous >= limit as i64 {
            watchers.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ActiveGauge {
            counters: Arc::clone(&self.counters),
            watcher: true,
        })
    }

    /// Opens a watcher.
    pub fn open_watcher(&self) -> ActiveGauge {
        self.counters.watchers.fetch_add(1, Ordering::Relaxed);
        ActiveGauge {
            counters: Arc::clone(&self.counters),
            watcher: true,
        }
    }

    /// Samples applied so far over `transport`.
    pub fn samples(&self, transport: Transport) -> u64 {
        self.counters.transports[transport.index()]
            .samples
            .load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        let mut families = self.registry.gather();
        self.ingest_latency.merge_into(&mut families);
        if let Err(e) = encoder.encode(&families, &mut buffer) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Exports what is left over OTLP, when on, and stops the pipeline (at exit;
    /// blocking: call it off the runtime's threads).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown()
            && self.otlp
        {
            tracing::warn!(error = %e, "metrics export shutdown failed");
        }
    }
}

fn register_observables(meter: &Meter, counters: &Arc<Counters>, engine: Arc<Engine>) {
    type Read = fn(&TransportCounters) -> u64;
    let per_transport: [(&'static str, &'static str, Read); 4] = [
        ("tidewatch_samples", "Samples applied to windows", |c| {
            c.samples.load(Ordering::Relaxed)
        }),
        (
            "tidewatch_anomalies",
            "Samples whose verdict is an anomaly",
            |c| c.anomalies.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_duplicate_samples",
            "Samples answered as duplicates (seq already seen)",
            |c| c.duplicates.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_load_shed",
            "Requests and streams refused by overload protection",
            |c| c.shed.load(Ordering::Relaxed),
        ),
    ];
    for (name, description, read) in per_transport {
        let counters = Arc::clone(counters);
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| {
                for t in Transport::ALL {
                    observer.observe(
                        read(&counters.transports[t.index()]),
                        &[KeyValue::new("transport", t.as_str())],
                    );
                }
            })
            .build();
    }
    let c = Arc::clone(counters);
    meter
        .u64_observable_counter("tidewatch_samples_rejected")
        .with_description("Samples refused with an error verdict or a 4xx, by reason")
        .with_callback(move |observer| {
            for t in Transport::ALL {
                for (i, reason) in REJECT_REASONS.iter().enumerate() {
                    observer.observe(
                        c.transports[t.index()].rejected[i].load(Ordering::Relaxed),
                        &[
                            KeyValue::new("transport", t.as_str()),
                            KeyValue::new("reason", *reason),
                        ],
                    );
                }
            }
        })
        .build();
    type ReadAll = fn(&Counters) -> u64;
    let totals: [(&'static str, &'static str, ReadAll); 8] = [
        (
            "tidewatch_watch_events_missed",
            "Anomaly events watchers missed by reading too slowly",
            |c| c.watch_missed.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_snapshot_failures",
            "Snapshot flushes that failed",
            |c| c.snapshot_failures.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_snapshot_writes",
            "Device snapshots written to Redis",
            |c| c.snapshot_writes.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_snapshot_restores",
            "Devices restored from a snapshot",
            |c| c.snapshot_restores.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_snapshot_read_failures",
            "Snapshot reads that failed against Redis",
            |c| c.snapshot_read_failures.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_snapshot_decode_errors",
            "Snapshots that could not be decoded",
            |c| c.snapshot_decode_errors.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_snapshot_wrong_type",
            "Snapshot keys that held another Redis type than a string",
            |c| c.snapshot_wrong_type.load(Ordering::Relaxed),
        ),
        (
            "tidewatch_devices_deleted",
            "Devices deleted through DeleteDevice that had state",
            |c| c.devices_deleted.load(Ordering::Relaxed),
        ),
    ];
    for (name, description, read) in totals {
        let c = Arc::clone(counters);
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(read(&c), &[]))
            .build();
    }
    let c = Arc::clone(counters);
    meter
        .i64_observable_gauge("tidewatch_ingest_streams_active")
        .with_description("Open Ingest streams")
        .with_callback(move |o| o.observe(c.ingest_streams.load(Ordering::Relaxed), &[]))
        .build();
    let c = Arc::clone(counters);
    meter
        .i64_observable_gauge("tidewatch_watchers_active")
        .with_description("Open WatchAnomalies streams")
        .with_callback(move |o| o.observe(c.watchers.load(Ordering::Relaxed), &[]))
        .build();
    let e = Arc::clone(&engine);
    meter
        .u64_observable_gauge("tidewatch_devices")
        .with_description("Devices held in memory")
        .with_callback(move |o| o.observe(e.device_count() as u64, &[]))
        .build();
    let e = Arc::clone(&engine);
    meter
        .u64_observable_gauge("tidewatch_memory_budget_bytes")
        .with_description("MEMORY_BUDGET: bytes the devices in memory may hold")
        .with_callback(move |o| o.observe(e.memory_budget() as u64, &[]))
        .build();
    let e = Arc::clone(&engine);
    meter
        .u64_observable_gauge("tidewatch_memory_used_bytes")
        .with_description("Bytes the devices in memory hold, as MEMORY_BUDGET counts them")
        .with_callback(move |o| o.observe(e.memory_used() as u64, &[]))
        .build();
    meter
        .u64_observable_counter("tidewatch_devices_evicted_on_probation")
        .with_description(
            "Devices with one sample evicted to admit a new device when MAX_DEVICES or MEMORY_BUDGET was reached",
        )
        .with_callback(move |o| o.observe(engine.probation_evictions(), &[]))
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;

    fn metrics() -> Metrics {
        let settings = Config::defaults().otel().expect("settings");
        Metrics::new(
            Arc::new(Engine::new(EngineConfig::default())),
            &settings,
            resource(&settings),
        )
        .expect("metrics")
    }

    /// The lines of `tidewatch_ingest_message_duration_seconds` in an exposition.
    fn ingest_duration_lines(exposition: &str) -> Vec<&str> {
        exposition
            .lines()
            .filter(|l| l.contains(INGEST_DURATION_PROMETHEUS))
            .collect()
    }

    /// Durations whose sum is exact in both nanoseconds and `f64` seconds; one in
    /// the first bucket, one above the last bound.
    const DURATIONS: [Duration; 6] = [
        Duration::from_micros(20),
        Duration::from_millis(125),
        Duration::from_millis(250),
        Duration::from_millis(500),
        Duration::from_secs(2),
        Duration::from_secs(20),
    ];

    #[test]
    fn ingest_latency_is_exported_as_opentelemetry_exports_it() {
        // The same observations, recorded through an OpenTelemetry histogram of the
        // same name and through the atomic histogram.
        let (otel, atomic) = (metrics(), metrics());
        let histogram = otel
            .provider
            .meter(METER_NAME)
            .f64_histogram(INGEST_DURATION)
            .with_unit("s")
            .with_description(INGEST_DURATION_HELP)
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        for d in DURATIONS {
            histogram.record(d.as_secs_f64(), &[]);
            atomic.record_batch(Transport::Grpc, &BatchOutcome::default(), Some(d));
        }
        let (expected, got) = (otel.render(), atomic.render());
        let expected_lines = ingest_duration_lines(&expected);
        assert!(
            expected_lines.iter().any(|l| l
                .starts_with("tidewatch_ingest_message_duration_seconds_count")
                && l.ends_with(" 6")),
            "{expected}"
        );
        assert_eq!(ingest_duration_lines(&got), expected_lines, "{got}");
    }

    #[test]
    fn no_ingest_series_before_the_first_message() {
        let m = metrics();
        assert!(ingest_duration_lines(&m.render()).is_empty());
        m.record_batch(Transport::Grpc, &BatchOutcome::default(), None);
        assert!(ingest_duration_lines(&m.render()).is_empty());
        assert_eq!(m.ingest_latency.count(), 0);
    }

    #[test]
    fn durations_carry_the_semantic_convention_names_and_attributes() {
        let m = metrics();
        let headers = http::HeaderMap::new();
        let call = m.start_rpc(&Tracing::off(), RpcMethod::Analyze, &headers);
        assert!(call.span().is_none(), "no span without an endpoint");
        call.finish(tonic::Code::NotFound, "unknown device");
        m.record_http(
            "http",
            &http::Method::GET,
            Some("/analyze"),
            404,
            Duration::from_millis(1),
        );
        m.record_http(
            "https",
            &"BREW".parse().unwrap(),
            None,
            404,
            Duration::from_millis(1),
        );
        let exposition = m.render();
        let count = |prefix: &str| {
            exposition
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} in {exposition}"))
                .to_owned()
        };
        let rpc = count("rpc_server_call_duration_seconds_count");
        for label in [
            r#"rpc_system="grpc""#,
            r#"rpc_service="tidewatch.v1.TelemetryService""#,
            r#"rpc_method="Analyze""#,
            r#"rpc_grpc_status_code="5""#,
        ] {
            assert!(rpc.contains(label), "{label} in {rpc}");
        }
        let http = exposition
            .lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_count"))
            .collect::<Vec<_>>();
        assert_eq!(http.len(), 2, "{exposition}");
        assert!(http.iter().any(|l| l.contains(r#"http_route="/analyze""#)
            && l.contains(r#"http_request_method="GET""#)
            && l.contains(r#"http_response_status_code="404""#)
            && l.contains(r#"url_scheme="http""#)));
        assert!(http.iter().any(|l| !l.contains("http_route")
            && l.contains(r#"http_request_method="_OTHER""#)
            && l.contains(r#"url_scheme="https""#)));
        let target = count("target_info");
        for label in [
            r#"service_name="tidewatch""#,
            r#"service_version=""#,
            "service_instance_id=",
        ] {
            assert!(target.contains(label), "{label} in {target}");
        }
    }

    #[test]
    fn the_resource_names_the_service_and_this_instance() {
        let mut settings = Config::defaults().otel().expect("settings");
        let first = resource(&settings);
        let get =
            |r: &Resource, k: &'static str| r.get(&Key::from_static_str(k)).map(|v| v.to_string());
        assert_eq!(get(&first, "service.name").as_deref(), Some("tidewatch"));
        assert_eq!(
            get(&first, "service.version").as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        let instance = get(&first, "service.instance.id").expect("an instance id");
        assert_eq!(instance.len(), 36, "{instance}");
        assert_eq!(&instance[14..15], "4", "a version 4 UUID: {instance}");
        settings.service_name = Some("edge-1".into());
        let second = resource(&settings);
        assert_eq!(get(&second, "service.name").as_deref(), Some("edge-1"));
        assert_ne!(get(&second, "service.instance.id"), Some(instance));
    }
}
