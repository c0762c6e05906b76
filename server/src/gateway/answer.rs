//! The JSON answer of `POST /ingest`, written straight from the engine's verdicts.
//!
//! The answer is the proto3 JSON of an `IngestResponse` exactly as the generated
//! pbjson impl and `serde_json::to_vec` write it (every field, in field order; `seq` as
//! a string; doubles through `ProtoDouble`, so non-finite ones are `"NaN"`,
//! `"Infinity"`, `"-Infinity"`), byte for byte: the test below runs the same verdicts
//! through both. Writing it as the engine judges avoids a prost `Verdict` per sample
//! with a `String` per id and metric name, and serde's walk over them afterwards.

use serde_json::ser::{CompactFormatter, Formatter as _};
use tidewatch_proto::v1::Verdict;

use crate::{
    engine::{MetricOutcome, VerdictSink},
    error::SampleError,
};

/// What the answer opens with.
const HEAD: &[u8] = b"{\"verdicts\":[";

/// A judged sample's fields after its metrics, up to its `alert`.
const JUDGED_TAIL: &[u8] = b"],\"duplicate\":false,\"error\":\"\",\"alert\":";

/// An `IngestResponse` being written as JSON: [`VerdictSink`] calls in, the body of
/// the answer out of [`JsonVerdicts::finish`].
#[derive(Debug)]
pub(crate) struct JsonVerdicts {
    out: Vec<u8>,
    /// Verdicts written so far.
    count: usize,
    /// Verdicts announced by `reserve`, until the first judged verdict is written:
    /// then room for the rest is reserved at its size (the samples of one request
    /// usually have as many metrics), so the buffer grows once, not by doubling and
    /// copying.
    announced: usize,
    /// Where the current verdict starts in `out`.
    started: usize,
    /// The current judged sample's metric objects, comma-separated: `anomaly` comes
    /// before `metrics` in the verdict, and is known only at its end.
    metrics: Vec<u8>,
}

impl JsonVerdicts {
    /// An empty answer.
    pub(crate) fn new() -> Self {
        // Room for the answer of one sample with a few metrics.
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(HEAD);
        Self {
            out,
            count: 0,
            announced: 0,
            started: 0,
            metrics: Vec::new(),
        }
    }

    /// Appends verdicts judged elsewhere (as prost messages), in order.
    pub(crate) fn extend(&mut self, verdicts: &[Verdict]) {
        for verdict in verdicts {
            self.separate();
            // A `Verdict` holds no timestamp: its serialization cannot fail.
            let _ = serde_json::to_writer(&mut self.out, verdict);
        }
    }

    /// The answer's bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(b"]}");
        self.out
    }

    /// A comma before every verdict but the first.
    fn separate(&mut self) {
        if self.count > 0 {
            self.out.push(b',');
        }
        self.count += 1;
    }

    /// Opens a verdict: `{"deviceId":…,"seq":"…","anomaly":`.
    fn open(&mut self, device_id: &[u8], seq: u64) {
        self.separate();
        let out = &mut self.out;
        out.extend_from_slice(b"{\"deviceId\":");
        string(out, device_id);
        out.extend_from_slice(b",\"seq\":\"");
        let _ = CompactFormatter.write_u64(out, seq);
        out.extend_from_slice(b"\",\"anomaly\":");
    }

    /// The verdict of a sample that was not judged: no metrics, no anomaly.
    fn unjudged(&mut self, device_id: &[u8], seq: u64, duplicate: bool, error: &str) {
        self.open(device_id, seq);
        let out = &mut self.out;
        out.extend_from_slice(b"false,\"metrics\":[],\"duplicate\":");
        boolean(out, duplicate);
        out.extend_from_slice(b",\"error\":");
        string(out, error.as_bytes());
        out.extend_from_slice(b",\"alert\":false,\"score\":0.0}");
    }
}

impl VerdictSink for JsonVerdicts {
    fn reserve(&mut self, n: usize) {
        self.announced += n;
    }

    fn begin(&mut self, device_id: &[u8], seq: u64, metrics: usize) {
        let start = self.out.len();
        self.open(device_id, seq);
        self.started = start;
        self.metrics.clear();
        self.metrics.reserve(metrics * 160);
    }

    fn metric(&mut self, name: &[u8], m: &MetricOutcome) {
        let out = &mut self.metrics;
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"metric\":");
        string(out, name);
        out.extend_from_slice(b",\"value\":");
        double(out, m.value);
        out.extend_from_slice(b",\"mean\":");
        double(out, m.mean);
        out.extend_from_slice(b",\"stddev\":");
        double(out, m.stddev);
        out.extend_from_slice(b",\"zScore\":");
        double(out, m.z_score);
        out.extend_from_slice(b",\"anomaly\":");
        boolean(out, m.anomaly);
        out.extend_from_slice(b",\"windowCount\":");
        let _ = CompactFormatter.write_u32(out, m.window_count);
        out.extend_from_slice(b",\"score\":");
        double(out, m.score);
        out.extend_from_slice(b",\"alert\":");
        boolean(out, m.alert);
        out.push(b'}');
    }

    fn end(&mut self, anomaly: bool, alert: bool, score: f64) {
        let out = &mut self.out;
        boolean(out, anomaly);
        out.extend_from_slice(b",\"metrics\":[");
        out.extend_from_slice(&self.metrics);
        out.extend_from_slice(JUDGED_TAIL);
        boolean(out, alert);
        out.extend_from_slice(b",\"score\":");
        double(out, score);
        out.push(b'}');
        if self.announced > 0 {
            let written = self.out.len() - self.started;
            let rest = self.announced.saturating_sub(self.count);
            self.announced = 0;
            // An eighth more: later values may print longer.
            self.out.reserve(rest * (written + written / 8));
        }
    }

    fn duplicate(&mut self, device_id: &[u8], seq: u64) {
        self.unjudged(device_id, seq, true, "");
    }

    fn error(&mut self, device_id: &[u8], seq: u64, error: &SampleError) {
        self.unjudged(device_id, seq, false, &error.to_string());
    }
}

/// A JSON string of UTF-8 bytes (see `SampleLike`), escaped as serde_json escapes:
/// printable ASCII other than `"` and `\\` (ids and names, almost always) as it is.
fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes
        .iter()
        .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\')
    {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let text = String::from_utf8_lossy(bytes);
    // A string cannot fail to serialize.
    let _ = serde_json::to_writer(out, &*text);
}

/// `true` or `false`.
fn boolean(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

/// A double as `ProtoDouble` serializes it through serde_json.
fn double(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = CompactFormatter.write_f64(out, v);
    } else if v.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if v > 0.0 {
        out.extend_from_slice(b"\"Infinity\"");
    } else {
        out.extend_from_slice(b"\"-Infinity\"");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tidewatch_proto::v1::IngestResponse;

    use super::*;

    /// One sink call.
    #[derive(Debug, Clone)]
    enum Call {
        Judged {
            device: String,
            seq: u64,
            metrics: Vec<(String, MetricOutcome)>,
            anomaly: bool,
            alert: bool,
            score: f64,
        },
        Duplicate(String, u64),
        Error(String, u64),
    }

    fn play(calls: &[Call], sink: &mut impl VerdictSink) {
        sink.reserve(calls.len());
        for call in calls {
            match call {
                Call::Judged {
                    device,
                    seq,
                    metrics,
                    anomaly,
                    alert,
                    score,
                } => {
                    sink.begin(device.as_bytes(), *seq, metrics.len());
                    for (name, outcome) in metrics {
                        sink.metric(name.as_bytes(), outcome);
                    }
                    sink.end(*anomaly, *alert, *score);
                }
                Call::Duplicate(device, seq) => sink.duplicate(device.as_bytes(), *seq),
                Call::Error(device, seq) => sink.error(
                    device.as_bytes(),
                    *seq,
                    &SampleError::InvalidValue {
                        metric: device.clone(),
                        value: f64::NAN,
                    },
                ),
            }
        }
    }

    /// The answer through prost verdicts and serde, as the gateway wrote it before.
    fn through_serde(calls: &[Call], later: &[Verdict]) -> Vec<u8> {
        let mut verdicts: Vec<Verdict> = Vec::new();
        play(calls, &mut verdicts);
        verdicts.extend_from_slice(later);
        serde_json::to_vec(&IngestResponse { verdicts }).unwrap()
    }

    fn through_sink(calls: &[Call], later: &[Verdict]) -> Vec<u8> {
        let mut json = JsonVerdicts::new();
        play(calls, &mut json);
        json.extend(later);
        json.finish()
    }

    fn double() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::NAN),
            Just(1e21),
            Just(5e-324),
            -1e6..1e6f64,
        ]
    }

    fn outcome() -> impl Strategy<Value = MetricOutcome> {
        (
            double(),
            double(),
            double(),
            double(),
            any::<bool>(),
            any::<u32>(),
            double(),
            any::<bool>(),
        )
            .prop_map(
                |(value, mean, stddev, z_score, anomaly, window_count, score, alert)| {
                    MetricOutcome {
                        value,
                        mean,
                        stddev,
                        z_score,
                        anomaly,
                        window_count,
                        score,
                        alert,
                    }
                },
            )
    }

    /// Ids and names with what JSON must escape: quotes, backslashes, control
    /// characters, non-ASCII.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9/_.-]{0,40}",
            "[ -\u{7f}]{0,20}",
            any::<String>(),
            Just("q\"b\\s\n\t\u{1}\u{7f}é😀".to_owned()),
        ]
    }

    fn call() -> impl Strategy<Value = Call> {
        prop_oneof![
            6 => (
                text(),
                any::<u64>(),
                prop::collection::vec((text(), outcome()), 0..6),
                any::<bool>(),
                any::<bool>(),
                double(),
            )
                .prop_map(|(device, seq, metrics, anomaly, alert, score)| Call::Judged {
                    device,
                    seq,
                    metrics,
                    anomaly,
                    alert,
                    score,
                }),
            1 => (text(), any::<u64>()).prop_map(|(d, s)| Call::Duplicate(d, s)),
            1 => (text(), any::<u64>()).prop_map(|(d, s)| Call::Error(d, s)),
        ]
    }

    proptest! {
        #[test]
        fn writes_what_serde_writes(
            calls in prop::collection::vec(call(), 0..12),
            later_calls in prop::collection::vec(call(), 0..4),
        ) {
            let mut later = Vec::new();
            play(&later_calls, &mut later);
            prop_assert_eq!(
                String::from_utf8(through_sink(&calls, &later)).unwrap(),
                String::from_utf8(through_serde(&calls, &later)).unwrap()
            );
        }
    }

    #[test]
    fn an_empty_answer() {
        assert_eq!(through_sink(&[], &[]), b"{\"verdicts\":[]}");
        assert_eq!(through_sink(&[], &[]), through_serde(&[], &[]));
    }
}
