//! `http.server.request.duration`: one OpenTelemetry histogram, recorded through a
//! bound series per attribute set.
//!
//! Every HTTP request records its duration under four attributes (method, route,
//! status, scheme). `Histogram::record` builds them, hashes them (SipHash over every
//! key and value) and looks the set up in the SDK's map under a lock, on every
//! request: on a one-sample `/ingest`, about as much work as parsing the sample. A
//! series bound once (`Histogram::bind`, the SDK's bound instruments, still behind
//! an experimental feature) is recorded straight into its buckets; [`HttpDurations`]
//! keeps one per attribute set seen, found by a key of four words. Prometheus and
//! OTLP get the same series as from unbound records (the test below compares the
//! expositions).
//!
//! The sets are few: routes are the gateway's fixed labels, methods the nine
//! standard ones and `_OTHER`, statuses those the server answers with. A bound
//! series is never evicted (under delta temporality an idle one exports nothing),
//! so each set seen keeps its few hundred bytes for the life of the process.

use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
    time::Duration,
};

use opentelemetry::{
    KeyValue,
    metrics::{BoundHistogram, Histogram},
};

/// One series of `http.server.request.duration`: its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct HttpSeries {
    /// `http.request.method`: a standard method or `_OTHER`.
    pub(super) method: &'static str,
    /// `http.route`, left out when no route matched.
    pub(super) route: Option<&'static str>,
    /// `http.response.status_code`.
    pub(super) status: u16,
    /// `url.scheme`: `http` or `https`.
    pub(super) scheme: &'static str,
}

impl HttpSeries {
    /// The attributes, in the order the gateway has always recorded them.
    fn attributes(&self) -> Vec<KeyValue> {
        let mut attributes = Vec::with_capacity(4);
        attributes.push(KeyValue::new("http.request.method", self.method));
        if let Some(route) = self.route {
            attributes.push(KeyValue::new("http.route", route));
        }
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(self.status),
        ));
        attributes.push(KeyValue::new("url.scheme", self.scheme));
        attributes
    }
}

/// The histogram and its bound series.
#[derive(Debug)]
pub(super) struct HttpDurations {
    /// `http.server.request.duration`.
    histogram: Histogram<f64>,
    /// A series per attribute set recorded so far.
    bound: RwLock<HashMap<HttpSeries, BoundHistogram<f64>, foldhash::fast::RandomState>>,
}

impl HttpDurations {
    /// Records into `histogram`.
    pub(super) fn new(histogram: Histogram<f64>) -> Self {
        Self {
            histogram,
            bound: RwLock::default(),
        }
    }

    /// Records one request of `series` that took `elapsed`.
    pub(super) fn record(&self, series: HttpSeries, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bound) = self
            .bound
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&series)
        {
            bound.record(seconds);
            return;
        }
        // The first request of its set. Two at once each bind the same series in the
        // SDK; one handle is kept.
        let bound = self.histogram.bind(&series.attributes());
        bound.record(seconds);
        self.bound
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(series)
            .or_insert(bound);
    }

    /// The series bound so far.
    #[cfg(test)]
    pub(super) fn bound(&self) -> usize {
        self.bound
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;
    use crate::telemetry::LATENCY_BUCKETS;

    /// A histogram of the gateway's name and buckets, exported to a registry of its own.
    fn histogram() -> (Histogram<f64>, prometheus::Registry, SdkMeterProvider) {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .expect("exporter");
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let histogram = provider
            .meter("tidewatch")
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_description("Time to answer one HTTP request")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build();
        (histogram, registry, provider)
    }

    fn exposition(registry: &prometheus::Registry) -> String {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .expect("encode");
        String::from_utf8(text).expect("utf-8")
    }

    #[test]
    fn bound_series_export_what_unbound_records_would() {
        let series = [
            (
                HttpSeries {
                    method: "POST",
                    route: Some("/ingest"),
                    status: 200,
                    scheme: "http",
                },
                [30u64, 70, 400, 2_000_000],
            ),
            (
                HttpSeries {
                    method: "_OTHER",
                    route: None,
                    status: 404,
                    scheme: "https",
                },
                [50, 50, 1, 10_000_000_000],
            ),
            (
                HttpSeries {
                    method: "POST",
                    route: Some("/ingest"),
                    status: 413,
                    scheme: "http",
                },
                [100, 250, 250, 11_000_000_000],
            ),
        ];
        let (plain, plain_registry, _plain_provider) = histogram();
        let (bound, bound_registry, _bound_provider) = histogram();
        let durations = HttpDurations::new(bound);
        // Interleaved, so that sets are bound between records of others.
        for round in 0..4 {
            for (set, micros) in &series {
                let elapsed = Duration::from_micros(micros[round]);
                plain.record(elapsed.as_secs_f64(), &set.attributes());
                durations.record(*set, elapsed);
            }
        }
        assert_eq!(durations.bound(), series.len());
        let expected = exposition(&plain_registry);
        assert!(
            expected.contains(r#"http_route="/ingest""#) && expected.contains("_OTHER"),
            "{expected}"
        );
        assert_eq!(exposition(&bound_registry), expected);
    }
}
