//! Tests of the encoder: its bytes decode with prost to the verdicts the engine
//! judged, and the fast window path writes the bytes the field-by-field path writes.

use proptest::prelude::*;
use prost::Message as _;
use tidewatch_proto::v1::{DetectorConfig, IngestRequest, IngestResponse, Sample, Verdict};

use super::*;
use crate::{
    engine::{Engine, EngineConfig, tests::sample},
    grpc::fast::test_support::decode,
};

/// Judges `requests` on two engines, one writing prost verdicts and one writing
/// wire bytes, and checks that prost decodes the bytes to the same verdicts.
fn same_verdicts(requests: &[Vec<Sample>], spec: &str) {
    let config = EngineConfig {
        max_metrics_per_device: 3,
        max_devices: 5,
        ..EngineConfig::default()
    };
    let (a, b) = (Engine::new(config.clone()), Engine::new(config));
    let detector = a
        .detector(Some(&DetectorConfig {
            name: spec.into(),
            ..DetectorConfig::default()
        }))
        .expect("detector");
    let now = std::time::Instant::now();
    let mut sink = WireSink::new();
    for samples in requests {
        let mut expected: Vec<Verdict> = Vec::new();
        a.ingest_batch_at(samples, &detector, &mut expected, now);
        let wire = decode(
            IngestRequest {
                samples: samples.clone(),
                detector: None,
            }
            .encode_to_vec(),
        )
        .expect("decode");
        b.ingest_batch_at(wire.samples(), &detector, &mut sink, now);
        let got = IngestResponse::decode(sink.take()).expect("prost decodes the response");
        assert_eq!(got.verdicts.len(), samples.len());
        for (g, e) in got.verdicts.iter().zip(&expected) {
            // NaN != NaN: compare the encodings instead.
            assert_eq!(g.encode_to_vec(), e.encode_to_vec(), "{g:?} vs {e:?}");
        }
    }
}

#[test]
fn wire_verdicts_equal_prost_verdicts() {
    let mut requests = Vec::new();
    for i in 0..120u64 {
        let v = 400.0 + (i % 7) as f64 * 3.0 + if i % 40 == 39 { 500.0 } else { 0.0 };
        requests.push(vec![
            sample(
                &format!("dev-{}", i % 3),
                i + 1,
                &[("rps", v), ("cpu", v / 10.0)],
            ),
            sample("", 0, &[("x", -v)]),
        ]);
    }
    // Duplicates, per-sample errors of every kind, a new device over the limit.
    requests.push(vec![
        sample("dev-0", 1, &[("rps", 1.0)]),
        sample("dev-1", 0, &[]),
        sample("dev-1", 0, &[("bad name", 1.0)]),
        sample("dev-1", 0, &[("rps", f64::INFINITY)]),
        sample("dev-1", 0, &[("a", 1.0), ("b", 1.0), ("c", 1.0)]),
        sample(&"x".repeat(200), 0, &[("rps", 1.0)]),
        sample("new-1", 0, &[("rps", 1.0)]),
        sample("new-2", 0, &[("rps", 1.0)]),
        sample("new-3", 0, &[("rps", 1.0)]),
    ]);
    same_verdicts(&requests, "zscore");
    same_verdicts(&requests, "robust");
}

#[test]
fn verdicts_of_every_length_class_decode() {
    // 1-byte, 2-byte and 3-byte verdict lengths, each between other verdicts.
    let mut sink = WireSink::new();
    let outcome = MetricOutcome {
        value: 1.5,
        mean: 2.5,
        stddev: 0.5,
        z_score: -2.0,
        anomaly: true,
        window_count: 300,
        score: 0.75,
        alert: true,
    };
    let long = "m".repeat(120);
    let cases: [(&str, usize); 4] = [("a", 1), ("b", 3), (&long, 200), ("c", 0)];
    for (i, (name, metrics)) in cases.iter().enumerate() {
        sink.begin(format!("dev-{i}").as_bytes(), i as u64 + 1, *metrics);
        for k in 0..*metrics {
            sink.metric(format!("{name}{k}").as_bytes(), &outcome);
        }
        sink.end(true, false, 0.75);
    }
    sink.duplicate(b"", 9);
    sink.error(b"x", 0, &SampleError::NoMetrics);
    let response = IngestResponse::decode(sink.take()).expect("decodes");
    let v = &response.verdicts;
    assert_eq!(v.len(), 6);
    for (i, (name, metrics)) in cases.iter().enumerate() {
        assert_eq!(v[i].device_id, format!("dev-{i}"));
        assert_eq!(v[i].seq, i as u64 + 1);
        assert_eq!(v[i].metrics.len(), *metrics);
        assert!(v[i].anomaly && !v[i].alert && v[i].score == 0.75);
        for (k, m) in v[i].metrics.iter().enumerate() {
            assert_eq!(*m, outcome.to_proto(&format!("{name}{k}")));
        }
    }
    assert!(
        v[2].encoded_len() > 16_384,
        "the 3-byte length case is covered"
    );
    assert!(
        v[0].encoded_len() < 128,
        "the 1-byte length case is covered"
    );
    assert!((v[4].duplicate, v[4].seq, v[4].device_id.as_str()) == (true, 9, ""));
    assert!(v[5].error.starts_with("no_metrics"));
    assert!(sink.take().is_empty());
}

fn outcome(value: f64, window_count: u32, flags: bool) -> MetricOutcome {
    MetricOutcome {
        value,
        mean: value / 2.0,
        stddev: if flags { 0.0 } else { 1.5 },
        z_score: -value,
        anomaly: flags,
        window_count,
        score: if flags { 0.5 } else { 0.0 },
        alert: flags,
    }
}

#[test]
fn each_verdict_is_written_the_same_whatever_came_before() {
    // Verdicts whose lengths take 1, 2 and 3 bytes, each after each (so the
    // length slot is guessed short, right and long), and duplicates and errors
    // in between; long device ids and names take the field-by-field path.
    let long_name = "m".repeat(SHORT + 1);
    let long_id = "d".repeat(SHORT + 1);
    type Write = Box<dyn Fn(&mut dyn VerdictSink)>;
    let judged = |id: String, name: String, metrics: usize| -> Write {
        Box::new(move |sink: &mut dyn VerdictSink| {
            sink.begin(id.as_bytes(), metrics as u64, metrics);
            for k in 0..metrics {
                let m = outcome(k as f64, k as u32 * 100, k.is_multiple_of(3));
                sink.metric(format!("{name}{k}").as_bytes(), &m);
            }
            sink.end(metrics.is_multiple_of(2), metrics.is_multiple_of(3), 0.25);
        })
    };
    let kinds: Vec<Write> = vec![
        judged("a".into(), String::new(), 1),
        judged(String::new(), "x".into(), 0),
        judged("dev-1".into(), "cpu".into(), 2),
        judged("dev-2".into(), "c".into(), 4),
        judged("dev-3".into(), "metric".into(), 400),
        judged(long_id.clone(), long_name.clone(), 2),
        judged("dev-4".into(), long_name, 1),
        Box::new(|sink: &mut dyn VerdictSink| sink.duplicate(b"dev-5", 3)),
        Box::new(move |sink: &mut dyn VerdictSink| sink.duplicate(long_id.as_bytes(), u64::MAX)),
        Box::new(|sink: &mut dyn VerdictSink| sink.error(b"e", 0, &SampleError::NoMetrics)),
    ];
    let alone: Vec<Bytes> = kinds
        .iter()
        .map(|write| {
            let mut sink = WireSink::new();
            write(&mut sink);
            sink.take()
        })
        .collect();
    // Bytes of each verdict's length: every class is there.
    let classes: Vec<usize> = alone
        .iter()
        .map(|b| 1 + b[1..].iter().take_while(|&&byte| byte >= 0x80).count())
        .collect();
    assert!([1, 2, 3].iter().all(|n| classes.contains(n)), "{classes:?}");
    let mut sink = WireSink::new();
    let mut expected = Vec::new();
    for i in 0..kinds.len() {
        for j in 0..kinds.len() {
            kinds[i](&mut sink);
            kinds[j](&mut sink);
            expected.extend_from_slice(&alone[i]);
            expected.extend_from_slice(&alone[j]);
        }
    }
    assert_eq!(sink.take(), expected);
    // And each alone is what prost reads as the verdict written.
    for (write, bytes) in kinds.iter().zip(&alone) {
        let mut verdicts: Vec<Verdict> = Vec::new();
        write(&mut verdicts);
        let response = IngestResponse::decode(bytes.clone()).expect("decodes");
        assert_eq!(response.verdicts, verdicts);
    }
}

proptest! {
    #[test]
    fn metrics_in_a_window_are_the_bytes_written_field_by_field(
        name in "[a-z_]{0,64}",
        doubles in prop::array::uniform5(prop_oneof![
            Just(0.0),
            Just(-0.0),
            Just(f64::NAN),
            any::<f64>(),
        ]),
        window_count in prop_oneof![Just(0u32), 1u32..200, any::<u32>()],
        anomaly in any::<bool>(),
        alert in any::<bool>(),
    ) {
        let [value, mean, stddev, z_score, score] = doubles;
        let m = MetricOutcome { value, mean, stddev, z_score, anomaly, window_count, score, alert };
        let (mut window, mut fields) = (WireSink::new(), WireSink::new());
        window.metric(name.as_bytes(), &m);
        fields.long_metric(name.as_bytes(), &m);
        prop_assert_eq!(window.take(), fields.take());
    }

    #[test]
    fn heads_in_a_window_are_the_bytes_written_field_by_field(
        // Every length the window's short copy tells apart, and multi-byte UTF-8.
        device_id in "[a-zé0-9-]{0,32}|[a-z0-9-]{33,64}",
        seq in prop_oneof![Just(0u64), 1u64..300, any::<u64>()],
        slot in 1..=MAX_SLOT,
    ) {
        prop_assume!(device_id.len() <= SHORT);
        let (mut window, mut fields) = (WireSink::new(), WireSink::new());
        window.open(device_id.as_bytes(), seq, slot);
        fields.long_head(device_id.as_bytes(), seq, slot);
        prop_assert_eq!(window.take(), fields.take());
    }

}
