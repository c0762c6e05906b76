//! No sample can poison a device: any finite value is judged with finite statistics,
//! every state the engine reaches survives a snapshot and a restore with the same next
//! verdicts, and a `seq` jumping too far ahead is refused (docs/architecture.md,
//! "Engine semantics" and "Snapshot protocol").

use proptest::prelude::*;
use tidewatch_proto::v1::{DetectorConfig, Sample, Verdict};
use tidewatch_server::engine::{Engine, EngineConfig};
use tidewatch_server::snapshot::codec::{decode_value, encode_value};

fn sample(device: &str, seq: u64, metrics: &[(&str, f64)]) -> Sample {
    Sample {
        device_id: device.into(),
        // A fixed time: the robust detector's profile follows it, and a live and a
        // restored engine must see the same.
        time: Some(tidewatch_proto::pbjson_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
        seq,
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        shards: 2,
        ..EngineConfig::default()
    }
}

/// Every finite double, each binary exponent about as likely as any other, mixed with
/// ordinary readings.
fn value() -> impl Strategy<Value = f64> {
    use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        3 => (-1.0f64..1.0).prop_map(|u| 100.0 + u * 10.0),
        1 => POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO,
        1 => Just(f64::MAX),
        1 => Just(-f64::MAX),
        1 => prop::sample::select(vec![1e300, -1e300, 1e-300, 1e200, 0.0]),
    ]
}

/// A sequence number: none, the next one, a repeat, or anything.
fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0u64),
        4 => Just(u64::MAX - 1), // stands for "the device's next": see `resolve`
        1 => 1u64..100,
        1 => any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
struct Step {
    device: u8,
    seq: u64,
    a: f64,
    b: Option<f64>,
}

fn step() -> impl Strategy<Value = Step> {
    (0u8..3, seq(), value(), prop::option::of(value())).prop_map(|(device, seq, a, b)| Step {
        device,
        seq,
        a,
        b,
    })
}

/// A stream's detector: each detector, default or overridden.
fn detector() -> impl Strategy<Value = Option<DetectorConfig>> {
    prop_oneof![
        Just(None),
        (
            prop::sample::select(vec!["zscore", "robust"]),
            prop::sample::select(vec![0u32, 1, 3, 7, 64]),
            prop::sample::select(vec![0.0f64, 0.5, 3.0]),
            prop::sample::select(vec![1u32, 2, 5]),
        )
            .prop_map(|(name, window_size, threshold, min_samples)| {
                Some(DetectorConfig {
                    name: name.into(),
                    window_size,
                    threshold,
                    // Explicit: a default warm-up may exceed a small window.
                    min_samples: if window_size > 0 {
                        min_samples.min(window_size)
                    } else {
                        min_samples
                    },
                })
            }),
    ]
}

/// Judges `steps` one message each, with the stream's detector; `next` tracks the
/// seq each device would send next.
fn drive(
    engine: &Engine,
    detector: &Option<DetectorConfig>,
    steps: &[Step],
    next: &mut [u64; 3],
) -> Vec<Verdict> {
    let spec = engine
        .detector(detector.as_ref())
        .expect("a valid detector");
    let mut out = Vec::new();
    for step in steps {
        let d = usize::from(step.device);
        let seq = if step.seq == u64::MAX - 1 {
            next[d] += 1;
            next[d]
        } else {
            step.seq
        };
        let mut metrics = vec![("a", step.a)];
        if let Some(b) = step.b {
            metrics.push(("b", b));
        }
        let device = format!("dev-{d}");
        engine.ingest_batch(&[sample(&device, seq, &metrics)], &spec, &mut out);
    }
    out
}

/// Floats compared bit for bit (a NaN would not equal itself; none may appear); an
/// error by its reason (an `invalid_seq` names the clock, read at each message).
fn same(a: &[Verdict], b: &[Verdict]) -> bool {
    let plain = |v: &[Verdict]| {
        let v: Vec<Verdict> = v
            .iter()
            .map(|v| Verdict {
                error: v.error.split(':').next().unwrap_or_default().into(),
                ..v.clone()
            })
            .collect();
        format!("{v:?}")
    };
    plain(a) == plain(b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_reachable_state_restores_with_the_same_next_verdicts(
        detector in detector(),
        before in prop::collection::vec(step(), 1..150),
        after in prop::collection::vec(step(), 1..60),
    ) {
        let live = Engine::new(config());
        let mut next = [0u64; 3];
        let verdicts = drive(&live, &detector, &before, &mut next);
        for v in &verdicts {
            for m in &v.metrics {
                prop_assert!(m.mean.is_finite() && m.stddev.is_finite(), "{v:?}");
                prop_assert!(!m.z_score.is_nan(), "{v:?}");
            }
        }

        // Snapshot every device, restore it into a fresh engine.
        let restored = Engine::new(config());
        for d in 0..3 {
            let id = format!("dev-{d}");
            let Some(state) = live.device_state(&id) else { continue };
            let mut bytes = Vec::new();
            encode_value(&state, &mut bytes);
            let back = decode_value(&bytes, &id);
            prop_assert!(back.is_ok(), "the decoder refused what the encoder wrote: {back:?}");
            prop_assert!(restored.insert_if_absent(back.unwrap()));
        }

        let mut next_restored = next;
        let a = drive(&live, &detector, &after, &mut next);
        let b = drive(&restored, &detector, &after, &mut next_restored);
        prop_assert!(same(&a, &b), "live {a:?}\nrestored {b:?}");
    }
}

#[test]
fn a_huge_value_does_not_poison_the_next_verdicts() {
    let engine = Engine::new(config());
    let spec = engine.default_detector();
    let mut out = Vec::new();
    for i in 0..60u64 {
        let v = 100.0 + (i % 7) as f64;
        engine.ingest_batch(&[sample("d", 0, &[("cpu", v)])], &spec, &mut out);
    }
    for v in [1e200, f64::MAX, f64::MAX, -f64::MAX] {
        engine.ingest_batch(&[sample("d", 0, &[("cpu", v)])], &spec, &mut out);
    }
    out.clear();
    // 50 ordinary values push the huge ones out of the 50-value window.
    for i in 0..100u64 {
        let v = 100.0 + (i % 7) as f64;
        engine.ingest_batch(&[sample("d", 0, &[("cpu", v)])], &spec, &mut out);
    }
    for v in &out {
        let m = &v.metrics[0];
        assert!(m.stddev.is_finite() && m.mean.is_finite(), "{v:?}");
    }
    let late = &out[60..];
    assert!(late.iter().all(|v| !v.anomaly), "false anomalies: {late:?}");
    let m = &late.last().unwrap().metrics[0];
    assert!((m.mean - 103.0).abs() < 1.0, "{m:?}");
    assert!(m.stddev > 1.0 && m.stddev < 3.0, "{m:?}");
}

#[test]
fn a_seq_far_ahead_is_refused_and_changes_nothing() {
    let engine = Engine::new(config());
    let spec = engine.default_detector();
    let mut out = Vec::new();
    engine.ingest_batch(&[sample("d", 5, &[("cpu", 1.0)])], &spec, &mut out);
    engine.ingest_batch(&[sample("d", u64::MAX, &[("cpu", 2.0)])], &spec, &mut out);
    engine.ingest_batch(&[sample("new", u64::MAX, &[("cpu", 2.0)])], &spec, &mut out);
    engine.ingest_batch(&[sample("d", 6, &[("cpu", 3.0)])], &spec, &mut out);
    let errors: Vec<&str> = out.iter().map(|v| v.error.as_str()).collect();
    assert!(
        errors[1].starts_with("invalid_seq: seq 18446744073709551615 is above "),
        "{errors:?}"
    );
    assert!(errors[2].starts_with("invalid_seq: "), "{errors:?}");
    assert_eq!(errors[3], "", "the refused seq was stored: {:?}", out[3]);
    assert!(!out[3].duplicate);
    assert!(
        !engine.contains("new"),
        "a refused sample created its device"
    );
    assert_eq!(engine.device_state("d").unwrap().last_seq, 6);
}

#[test]
fn seq_may_follow_the_clock_or_jump_within_the_bound() {
    let engine = Engine::new(EngineConfig {
        max_seq_jump: 1000,
        max_seq_clock_skew: std::time::Duration::from_secs(60),
        ..config()
    });
    let spec = engine.default_detector();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let mut out = Vec::new();
    let ok = |out: &Vec<Verdict>| out.last().unwrap().error.clone();
    // What the SDKs send: microseconds since the epoch, for a new device.
    engine.ingest_batch(&[sample("sdk", now_us, &[("x", 1.0)])], &spec, &mut out);
    assert_eq!(ok(&out), "");
    // A counter jumping by at most MAX_SEQ_JUMP.
    engine.ingest_batch(&[sample("fw", 1000, &[("x", 1.0)])], &spec, &mut out);
    assert_eq!(ok(&out), "");
    engine.ingest_batch(&[sample("fw", 1001, &[("x", 1.0)])], &spec, &mut out);
    assert_eq!(ok(&out), "");
    // Up to the clock plus the skew, but not beyond.
    let skew = 60_000_000;
    engine.ingest_batch(
        &[sample("fw", now_us + skew - 1_000_000, &[("x", 1.0)])],
        &spec,
        &mut out,
    );
    assert_eq!(ok(&out), "");
    engine.ingest_batch(
        &[sample("sdk", now_us + 10 * skew, &[("x", 1.0)])],
        &spec,
        &mut out,
    );
    assert!(ok(&out).starts_with("invalid_seq: "), "{:?}", out.last());
}
