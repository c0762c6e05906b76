//! `tidewatch_ingest_message_duration_seconds`, the time to judge one `Ingest` stream
//! message: recorded outside OpenTelemetry, merged into the Prometheus exporter's
//! output at scrape time. It is the one duration outside the semantic conventions'
//! names (a stream's messages are not calls; the stream as a whole is, in
//! `rpc.server.call.duration`), and the one metric OTLP does not carry.
//!
//! # Why it is not an OpenTelemetry histogram
//!
//! `Ingest` records one latency per stream message, on the hot path. An OpenTelemetry
//! `Histogram::record` builds and hashes an attribute set, looks it up in a map under
//! a lock and updates the series under a mutex (a bound instrument skips the lookup
//! but keeps the mutex and the float bucket search). [`IngestHistogram::record`]
//! is a bucket search by integer compares and two relaxed atomic adds. Every other
//! latency (unary RPCs, HTTP, snapshot flushes) is recorded once per request and goes
//! into OpenTelemetry, HTTP's through bound series (`http_duration`). Fold it back
//! only after measuring both ways in one run (`BENCHMARKS.md` says how).
//!
//! # Contract
//!
//! Prometheus must not be able to tell this series from one OpenTelemetry would have
//! exported: the same family name, `# HELP` and `# TYPE`; the label the exporter adds
//! (`otel_scope_name="tidewatch"`); the buckets of
//! [`LATENCY_BUCKETS`] with `le` inclusive; `_sum` in seconds; `_count`; no series
//! before the first observation; the family's series in the registry's order. The
//! alert rules and dashboards under `k8s/` and the integration tests read this series.
//! The test `ingest_latency_is_exported_as_opentelemetry_exports_it` records the same
//! durations both ways and compares the exposition lines: it is what an upgrade of
//! `opentelemetry-prometheus` or `prometheus` must pass.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

use super::{INGEST_DURATION_HELP, INGEST_DURATION_PROMETHEUS, LATENCY_BUCKETS, METER_NAME};

/// [`LATENCY_BUCKETS`] in nanoseconds, to place a `Duration` without float maths.
const LATENCY_BUCKETS_NANOS: [u64; LATENCY_BUCKETS.len()] = {
    let mut nanos = [0; LATENCY_BUCKETS.len()];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// The labels of the series, as the exporter writes them for an OpenTelemetry record
/// without attributes.
const LABELS: [(&str, &str); 1] = [("otel_scope_name", METER_NAME)];

/// The latency of each `Ingest` message, over [`LATENCY_BUCKETS`], without a lock.
#[derive(Debug, Default)]
pub(super) struct IngestHistogram {
    /// Observations per bucket (not cumulative): `buckets[i]` counts values in
    /// `(LATENCY_BUCKETS[i - 1], LATENCY_BUCKETS[i]]`, the last one those above 10 s.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all observations, in nanoseconds (exact, unlike a float sum).
    sum_nanos: AtomicU64,
}

impl IngestHistogram {
    /// Records one observation. A value equal to a bound counts in that bound's
    /// bucket (Prometheus `le`), as in OpenTelemetry.
    pub(super) fn record(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    #[cfg(test)]
    pub(super) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Adds this histogram to `families` (a gathered, name-sorted exposition) as
    /// `tidewatch_ingest_message_duration_seconds`.
    pub(super) fn merge_into(&self, families: &mut Vec<MetricFamily>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return;
        }
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&counts)
            .map(|(&bound, &n)| {
                cumulative += n;
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        let mut histogram = Histogram::default();
        histogram.set_sample_sum(self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9);
        histogram.set_sample_count(count);
        histogram.set_bucket(buckets);
        let mut metric = Metric::default();
        metric.set_label(
            LABELS
                .iter()
                .map(|&(name, value)| {
                    let mut pair = LabelPair::default();
                    pair.set_name(name.to_owned());
                    pair.set_value(value.to_owned());
                    pair
                })
                .collect(),
        );
        metric.set_histogram(histogram);
        let name = INGEST_DURATION_PROMETHEUS.to_owned();
        let at = match families.binary_search_by(|f| f.name().cmp(&name)) {
            Ok(at) => at,
            Err(at) => {
                let mut family = MetricFamily::default();
                family.set_name(name);
                family.set_help(INGEST_DURATION_HELP.to_owned());
                family.set_field_type(MetricType::HISTOGRAM);
                families.insert(at, family);
                at
            }
        };
        let metrics = families[at].mut_metric();
        metrics.push(metric);
        // The registry's order: by label names and values.
        metrics.sort_by(|a, b| {
            let key = |m: &Metric| {
                m.get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().to_owned()))
                    .collect::<Vec<_>>()
            };
            key(a).cmp(&key(b))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_a_bound_counts_in_that_bucket() {
        let h = IngestHistogram::default();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_nanos(50_001));
        h.record(Duration::from_secs(10));
        h.record(Duration::from_secs(11));
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[0], 1, "{counts:?}");
        assert_eq!(counts[1], 1, "{counts:?}");
        assert_eq!(counts[LATENCY_BUCKETS.len() - 1], 1, "{counts:?}");
        assert_eq!(counts[LATENCY_BUCKETS.len()], 1, "{counts:?}");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn nothing_is_merged_before_the_first_observation() {
        let mut families = Vec::new();
        IngestHistogram::default().merge_into(&mut families);
        assert!(families.is_empty());
    }
}
