//! What the engine reads and writes, independent of a message type: samples come in as
//! anything that implements [`SampleLike`] (the prost `Sample` of the gateway and the
//! SDKs, or the zero-copy view the gRPC `Ingest` path decodes), and verdicts go out to
//! a [`VerdictSink`] (a `Vec` of prost `Verdict`s, or protobuf bytes written straight
//! into a response buffer). One engine, no second copy of the semantics.

use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{MetricVerdict, Sample, Verdict};

use crate::error::SampleError;

/// One sample, whatever it was decoded into.
///
/// Device ids and metric names are handed over as bytes that are UTF-8: a decoder
/// checks that once, when it reads the message, and the engine compares, hashes and
/// copies bytes. Turning them back into `&str` on every read cost a UTF-8 check per
/// id and name per sample (≈ 200 instructions of ≈ 2,500 per sample); the engine does
/// that only where it keeps or reports one (a new device, a new metric, an error).
pub trait SampleLike {
    /// The metrics of the sample: `(name, value)` in ascending name order, each name
    /// once (protobuf map semantics: a repeated key keeps its last value). Names are
    /// UTF-8.
    type Metrics<'a>: Iterator<Item = (&'a [u8], f64)>
    where
        Self: 'a;

    /// The device id as sent ("" is the default device), UTF-8.
    fn device_id(&self) -> &[u8];
    /// The sample's `seq` (0: none).
    fn seq(&self) -> u64;
    /// The sample's own time, if it has one.
    fn time(&self) -> Option<Timestamp>;
    /// Number of distinct metrics.
    fn metric_count(&self) -> usize;
    /// The metrics.
    fn metrics(&self) -> Self::Metrics<'_>;
}

impl SampleLike for Sample {
    type Metrics<'a> = std::iter::Map<
        std::collections::btree_map::Iter<'a, String, f64>,
        fn((&'a String, &'a f64)) -> (&'a [u8], f64),
    >;

    fn device_id(&self) -> &[u8] {
        self.device_id.as_bytes()
    }

    fn seq(&self) -> u64 {
        self.seq
    }

    fn time(&self) -> Option<Timestamp> {
        self.time
    }

    fn metric_count(&self) -> usize {
        self.metrics.len()
    }

    fn metrics(&self) -> Self::Metrics<'_> {
        self.metrics.iter().map(|(k, v)| (k.as_bytes(), *v))
    }
}

impl<T: SampleLike> SampleLike for &T {
    type Metrics<'a>
        = T::Metrics<'a>
    where
        Self: 'a;

    fn device_id(&self) -> &[u8] {
        (**self).device_id()
    }

    fn seq(&self) -> u64 {
        (**self).seq()
    }

    fn time(&self) -> Option<Timestamp> {
        (**self).time()
    }

    fn metric_count(&self) -> usize {
        (**self).metric_count()
    }

    fn metrics(&self) -> Self::Metrics<'_> {
        (**self).metrics()
    }
}

/// The judgement of one value of one metric (a `MetricVerdict` without its name).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricOutcome {
    /// The value judged.
    pub value: f64,
    /// Mean of the window before the value.
    pub mean: f64,
    /// Population standard deviation of the window before the value.
    pub stddev: f64,
    /// The z-score (0 during warm-up).
    pub z_score: f64,
    /// Whether the detector calls it an anomaly.
    pub anomaly: bool,
    /// Values in the window before this one.
    pub window_count: u32,
    /// Continuous anomaly score in [0, 1].
    pub score: f64,
    /// First anomaly of an episode.
    pub alert: bool,
}

impl MetricOutcome {
    /// The prost message, with the metric's name.
    pub fn to_proto(&self, metric: &str) -> MetricVerdict {
        self.with_name(metric.to_owned())
    }

    /// The prost message, with the metric's name as given.
    fn with_name(&self, metric: String) -> MetricVerdict {
        MetricVerdict {
            metric,
            value: self.value,
            mean: self.mean,
            stddev: self.stddev,
            z_score: self.z_score,
            anomaly: self.anomaly,
            window_count: self.window_count,
            score: self.score,
            alert: self.alert,
        }
    }
}

/// Where the engine writes verdicts, one per sample, in order. A judged sample is
/// `begin`, one `metric` per metric, `end`; a duplicate or a refused sample is one call.
/// Device ids and metric names are the sample's UTF-8 bytes (see [`SampleLike`]).
pub trait VerdictSink {
    /// Room for `n` more verdicts.
    fn reserve(&mut self, n: usize) {
        let _ = n;
    }
    /// A judged sample starts; `metrics` of them follow.
    fn begin(&mut self, device_id: &[u8], seq: u64, metrics: usize);
    /// One metric of the current sample.
    fn metric(&mut self, name: &[u8], outcome: &MetricOutcome);
    /// The current sample is complete.
    fn end(&mut self, anomaly: bool, alert: bool, score: f64);
    /// A sample whose `seq` was applied before.
    fn duplicate(&mut self, device_id: &[u8], seq: u64);
    /// A sample refused with `error`; nothing changed.
    fn error(&mut self, device_id: &[u8], seq: u64, error: &SampleError);
    /// The verdicts written so far, when this sink keeps them as prost messages.
    fn verdicts(&self) -> Option<&[Verdict]> {
        None
    }
}

impl VerdictSink for Vec<Verdict> {
    fn reserve(&mut self, n: usize) {
        Vec::reserve(self, n);
    }

    fn begin(&mut self, device_id: &[u8], seq: u64, metrics: usize) {
        self.push(Verdict {
            device_id: text(device_id),
            seq,
            metrics: Vec::with_capacity(metrics),
            ..Verdict::default()
        });
    }

    fn metric(&mut self, name: &[u8], outcome: &MetricOutcome) {
        if let Some(verdict) = self.last_mut() {
            verdict.metrics.push(outcome.with_name(text(name)));
        }
    }

    fn end(&mut self, anomaly: bool, alert: bool, score: f64) {
        if let Some(verdict) = self.last_mut() {
            verdict.anomaly = anomaly;
            verdict.alert = alert;
            verdict.score = score;
        }
    }

    fn duplicate(&mut self, device_id: &[u8], seq: u64) {
        self.push(Verdict {
            device_id: text(device_id),
            seq,
            duplicate: true,
            ..Verdict::default()
        });
    }

    fn error(&mut self, device_id: &[u8], seq: u64, error: &SampleError) {
        self.push(Verdict {
            device_id: text(device_id),
            seq,
            error: error.to_string(),
            ..Verdict::default()
        });
    }

    fn verdicts(&self) -> Option<&[Verdict]> {
        Some(self)
    }
}

/// An id or a name for a prost message. The bytes are UTF-8 (see [`SampleLike`]), so
/// nothing is replaced.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The prost verdicts of the anomalous samples only, for the anomaly watchers. A
/// sample's metric outcomes wait in reused buffers until its `end` says whether it is
/// an anomaly, so a normal sample costs two copies of a few bytes and no allocation
/// (building a prost `Verdict` for every sample was about 15 % of the server's time
/// once a watcher was attached; see BENCHMARKS.md). Duplicates and refused samples are
/// never anomalies and are not kept.
#[derive(Debug, Default)]
pub struct AnomalyKeeper {
    device: Vec<u8>,
    seq: u64,
    /// The current sample's metric names, back to back.
    names: Vec<u8>,
    /// Where each metric's name ends in `names`, and its outcome.
    metrics: Vec<(usize, MetricOutcome)>,
    /// The anomalous verdicts so far, in order.
    pub kept: Vec<Verdict>,
}

impl VerdictSink for AnomalyKeeper {
    fn begin(&mut self, device_id: &[u8], seq: u64, metrics: usize) {
        self.device.clear();
        self.device.extend_from_slice(device_id);
        self.seq = seq;
        self.names.clear();
        self.metrics.clear();
        self.metrics.reserve(metrics);
    }

    fn metric(&mut self, name: &[u8], outcome: &MetricOutcome) {
        self.names.extend_from_slice(name);
        self.metrics.push((self.names.len(), *outcome));
    }

    fn end(&mut self, anomaly: bool, alert: bool, score: f64) {
        if !anomaly {
            return;
        }
        let mut start = 0;
        let metrics = self
            .metrics
            .iter()
            .map(|&(end, outcome)| {
                let name = text(&self.names[start..end]);
                start = end;
                outcome.with_name(name)
            })
            .collect();
        self.kept.push(Verdict {
            device_id: text(&self.device),
            seq: self.seq,
            metrics,
            anomaly,
            alert,
            score,
            ..Verdict::default()
        });
    }

    fn duplicate(&mut self, _device_id: &[u8], _seq: u64) {}

    fn error(&mut self, _device_id: &[u8], _seq: u64, _error: &SampleError) {}
}

/// Two sinks fed the same verdicts (the wire encoder plus, while anomaly watchers are
/// subscribed, an [`AnomalyKeeper`] of the verdicts they are sent).
#[derive(Debug)]
pub struct Tee<'a, A, B>(pub &'a mut A, pub &'a mut B);

impl<A: VerdictSink, B: VerdictSink> VerdictSink for Tee<'_, A, B> {
    fn reserve(&mut self, n: usize) {
        self.0.reserve(n);
        self.1.reserve(n);
    }

    fn begin(&mut self, device_id: &[u8], seq: u64, metrics: usize) {
        self.0.begin(device_id, seq, metrics);
        self.1.begin(device_id, seq, metrics);
    }

    fn metric(&mut self, name: &[u8], outcome: &MetricOutcome) {
        self.0.metric(name, outcome);
        self.1.metric(name, outcome);
    }

    fn end(&mut self, anomaly: bool, alert: bool, score: f64) {
        self.0.end(anomaly, alert, score);
        self.1.end(anomaly, alert, score);
    }

    fn duplicate(&mut self, device_id: &[u8], seq: u64) {
        self.0.duplicate(device_id, seq);
        self.1.duplicate(device_id, seq);
    }

    fn error(&mut self, device_id: &[u8], seq: u64, error: &SampleError) {
        self.0.error(device_id, seq, error);
        self.1.error(device_id, seq, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metric of a test sample: name, value, whether it is anomalous.
    type Metric<'a> = (&'a [u8], f64, bool);

    fn outcome(value: f64, anomaly: bool) -> MetricOutcome {
        MetricOutcome {
            value,
            mean: 1.5,
            stddev: 0.25,
            z_score: if anomaly { 9.0 } else { 0.5 },
            anomaly,
            window_count: 7,
            score: if anomaly { 0.99 } else { 0.1 },
            alert: anomaly,
        }
    }

    /// The keeper holds exactly the anomalous verdicts a `Vec<Verdict>` fed the same
    /// calls holds, field for field, and nothing of the normal, duplicate or refused ones.
    #[test]
    fn anomaly_keeper_keeps_the_anomalous_verdicts_whole() {
        let mut all: Vec<Verdict> = Vec::new();
        let mut keeper = AnomalyKeeper::default();
        let mut sink = Tee(&mut all, &mut keeper);
        let samples: [(&[u8], u64, &[Metric<'_>]); 5] = [
            (b"dev-a", 1, &[(b"cpu", 1.0, false), (b"temp", 2.0, false)]),
            (
                b"dev-bb",
                2,
                &[(b"cpu", 50.0, true), (b"temperature", 2.0, false)],
            ),
            (b"dev-a", 3, &[(b"x", 3.0, false)]),
            (
                b"",
                0,
                &[(b"a", 1.0, true), (b"bb", 2.0, true), (b"ccc", 3.0, false)],
            ),
            (b"dev-c", 9, &[]),
        ];
        for (device, seq, metrics) in samples {
            sink.begin(device, seq, metrics.len());
            for &(name, value, anomaly) in metrics {
                sink.metric(name, &outcome(value, anomaly));
            }
            let anomaly = metrics.iter().any(|m| m.2);
            sink.end(anomaly, anomaly, if anomaly { 0.99 } else { 0.1 });
            sink.duplicate(device, seq);
            sink.error(device, seq, &SampleError::NoMetrics);
        }
        let expected: Vec<Verdict> = all.into_iter().filter(|v| v.anomaly).collect();
        assert_eq!(expected.len(), 2);
        assert_eq!(keeper.kept, expected);
    }
}
