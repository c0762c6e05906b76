//! Logs (`tracing`) and metrics (the OpenTelemetry API with the Prometheus exporter).
//!
//! Counters on the ingest path are plain atomics added to once per message (never once
//! per sample) and handed to OpenTelemetry as observable instruments read at scrape
//! time, so recording costs a few relaxed atomic adds. Latencies go into OpenTelemetry
//! histograms, once per request, except the per-message latency of `Ingest`: it has
//! one lock-free histogram of its own that `/metrics` merges into the family it
//! belongs to (`ingest_histogram`, which holds the reason and the contract). No device
//! id and no metric name is ever a label: their cardinality is unbounded.

mod ingest_histogram;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    KeyValue,
    metrics::{Histogram, Meter, MeterProvider},
};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use self::ingest_histogram::IngestHistogram;
use crate::{
    config::{Config, LogFormat},
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

/// The OpenTelemetry meter; the exporter adds it as the `otel_scope_name` label.
const METER_NAME: &str = "tidewatch";

/// The gRPC latency histogram (the exporter appends `_seconds` from the unit).
const GRPC_DURATION: &str = "tidewatch_grpc_duration";

/// Its description (`# HELP`).
const GRPC_DURATION_HELP: &str = "Time to answer one gRPC unary call or one Ingest stream message";

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
    /// Snapshots that could not be decoded (other version, garbage).
    pub snapshot_decode_errors: AtomicU64,
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
    /// Time to answer one unary RPC (`Ingest` messages go to `ingest_latency`).
    grpc_latency: Histogram<f64>,
    /// Time to judge one Ingest message, the `method="Ingest"` series of
    /// `tidewatch_grpc_duration_seconds`.
    ingest_latency: IngestHistogram,
    /// Time to answer one HTTP request.
    http_latency: Histogram<f64>,
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
    /// Builds the OpenTelemetry pipeline with a Prometheus exporter and registers every
    /// instrument. `engine` feeds the devices gauge.
    pub fn new(engine: Arc<Engine>) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
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
            grpc_latency: histogram(GRPC_DURATION, GRPC_DURATION_HELP),
            ingest_latency: IngestHistogram::default(),
            http_latency: histogram(
                "tidewatch_http_request_duration",
                "Time to answer one HTTP request",
            ),
            snapshot_flush: histogram(
                "tidewatch_snapshot_flush_duration",
                "Time one snapshot flush took, successful or not",
            ),
            counters,
            registry,
            provider,
        })
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

    /// Records the latency of a unary gRPC call.
    pub fn record_rpc(&self, method: &'static str, elapsed: Duration) {
        self.grpc_latency
            .record(elapsed.as_secs_f64(), &[KeyValue::new("method", method)]);
    }

    /// Records the latency of an HTTP request.
    pub fn record_http(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.http_latency.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("route", route),
                KeyValue::new("status", i64::from(status)),
            ],
        );
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

    /// Stops the pipeline (at exit).
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
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
    let totals: [(&'static str, &'static str, ReadAll); 6] = [
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
    meter
        .u64_observable_gauge("tidewatch_devices")
        .with_description("Devices held in memory")
        .with_callback(move |o| o.observe(engine.device_count() as u64, &[]))
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;

    fn metrics() -> Metrics {
        Metrics::new(Arc::new(Engine::new(EngineConfig::default()))).expect("metrics")
    }

    /// The lines of `tidewatch_grpc_duration_seconds` in an exposition.
    fn grpc_duration_lines(exposition: &str) -> Vec<&str> {
        exposition
            .lines()
            .filter(|l| l.contains("tidewatch_grpc_duration_seconds"))
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
        // The same observations, recorded the old way (an OpenTelemetry record with
        // the method label) and through the atomic histogram, with and without an
        // OpenTelemetry-recorded series of another method in the same family.
        for with_analyze in [false, true] {
            let (otel, atomic) = (metrics(), metrics());
            for d in DURATIONS {
                otel.grpc_latency
                    .record(d.as_secs_f64(), &[KeyValue::new("method", "Ingest")]);
                atomic.record_batch(Transport::Grpc, &BatchOutcome::default(), Some(d));
            }
            if with_analyze {
                for m in [&otel, &atomic] {
                    m.record_rpc("Analyze", Duration::from_millis(1));
                }
            }
            let (expected, got) = (otel.render(), atomic.render());
            let expected_lines = grpc_duration_lines(&expected);
            assert!(
                expected_lines
                    .iter()
                    .any(|l| l.contains(r#"method="Ingest""#) && l.ends_with(" 6")),
                "{expected}"
            );
            assert_eq!(grpc_duration_lines(&got), expected_lines, "{got}");
        }
    }

    #[test]
    fn no_ingest_series_before_the_first_message() {
        let m = metrics();
        assert!(grpc_duration_lines(&m.render()).is_empty());
        m.record_batch(Transport::Grpc, &BatchOutcome::default(), None);
        assert!(grpc_duration_lines(&m.render()).is_empty());
        assert_eq!(m.ingest_latency.count(), 0);
    }
}
