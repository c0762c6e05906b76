//! A snapshot value: its framing, which reader each version takes, and the decode
//! error (see `docs/architecture.md`, "Snapshot protocol").
//!
//! A value is `b"TW"`, one version byte, then the device. Version 2, which this build
//! writes, is the protobuf message `tidewatch.v1.DeviceSnapshot`
//! (`proto/tidewatch/v1/snapshot.proto`); restore decodes it with the generated code.
//! Version 1, the fixed little-endian layout of earlier builds, is still read
//! (`legacy.rs`) into the same message. Either way the engine then checks that the
//! message holds a state it can have written, and builds the device from it.

use prost::Message;
use tidewatch_proto::v1::DeviceSnapshot;

pub use super::error::DecodeError;
use super::legacy;
use crate::engine::{DeviceState, DirtyDevice};

/// First bytes of every snapshot value: garbage rarely starts with them.
pub const MAGIC: [u8; 2] = *b"TW";

/// The encoding version this build writes: a `DeviceSnapshot` message.
pub const VERSION: u8 = 2;

/// The fixed layout of earlier builds, still read.
pub const LEGACY_VERSION: u8 = 1;

/// A device that can be written as a snapshot: the owned [`DeviceState`], or a device
/// in the engine's memory as the flusher visits it (both write the same bytes).
pub trait EncodeDevice {
    /// Appends the device's `DeviceSnapshot` message (without magic and version).
    fn encode_device(&self, out: &mut Vec<u8>);
}

impl EncodeDevice for DeviceState {
    fn encode_device(&self, out: &mut Vec<u8>) {
        self.encode(out);
    }
}

impl EncodeDevice for DirtyDevice<'_> {
    fn encode_device(&self, out: &mut Vec<u8>) {
        self.encode(out);
    }
}

/// Encodes a device as a complete snapshot value (magic, version, device).
pub fn encode_value(device: &impl EncodeDevice, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    device.encode_device(out);
}

/// Decodes a complete snapshot value of either version read under the key of
/// `expected_id`.
pub fn decode_value(value: &[u8], expected_id: &str) -> Result<DeviceState, DecodeError> {
    let message = decode_message(value)?;
    let device = DeviceState::from_snapshot(message)?;
    if &*device.id != expected_id {
        return Err(DecodeError::WrongDevice {
            expected: expected_id.to_owned(),
            found: device.id.to_string(),
        });
    }
    Ok(device)
}

/// The `DeviceSnapshot` message of a complete snapshot value of either version, before
/// the engine checks it.
pub fn decode_message(value: &[u8]) -> Result<DeviceSnapshot, DecodeError> {
    let (magic, rest) = value.split_at(value.len().min(MAGIC.len()));
    if magic.len() < MAGIC.len() {
        return Err(DecodeError::Truncated("magic"));
    }
    if magic != MAGIC {
        return Err(DecodeError::Magic);
    }
    let Some((&version, device)) = rest.split_first() else {
        return Err(DecodeError::Truncated("version"));
    };
    match version {
        VERSION => DeviceSnapshot::decode(device).map_err(|e| DecodeError::Message(e.to_string())),
        LEGACY_VERSION => legacy::read_device(device),
        other => Err(DecodeError::Version(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MetricState;
    use crate::snapshot::fixtures;
    use proptest::prelude::*;
    use tidewatch_proto::pbjson_types::Timestamp;

    fn device(values: &[f64], capacity: usize) -> DeviceState {
        let mut d = DeviceState::new("sensor-1");
        d.last_seq = 42;
        d.updated_at = Timestamp {
            seconds: 1_710_000_000,
            nanos: 123,
        };
        let mut m = MetricState::new("rps");
        for &v in values {
            m.window.push(v, capacity);
        }
        m.last_value = 7.5;
        m.last_z = f64::NEG_INFINITY;
        m.last_anomaly = true;
        m.anomalies_total = 3;
        d.metrics.push(m);
        d.metrics.push(MetricState::new("cpu"));
        d
    }

    fn encoded(d: &DeviceState) -> Vec<u8> {
        let mut out = Vec::new();
        encode_value(d, &mut out);
        out
    }

    /// The version-1 values of `fixtures::devices()`, as the last build that wrote
    /// version 1 wrote them.
    const V1_FIXTURES: [(&str, &[u8]); 4] = [
        ("by-hand", include_bytes!("testdata/v1-by-hand.bin")),
        ("zscore", include_bytes!("testdata/v1-zscore.bin")),
        ("robust", include_bytes!("testdata/v1-robust.bin")),
        ("empty", include_bytes!("testdata/v1-empty.bin")),
    ];

    fn v1_fixtures() -> Vec<(DeviceState, &'static [u8])> {
        let devices = fixtures::devices();
        assert_eq!(devices.len(), V1_FIXTURES.len());
        devices
            .into_iter()
            .zip(V1_FIXTURES)
            .map(|((name, device), (file, bytes))| {
                assert_eq!(name, file);
                (device, bytes)
            })
            .collect()
    }

    /// The message a version-1 value holds once restored: the robust detector keeps its
    /// daily profile in single precision with visits up to 255, and starts the envelope
    /// of the short average (which version 1 did not hold) at the average.
    fn as_restored(mut message: DeviceSnapshot) -> DeviceSnapshot {
        for robust in message.metrics.iter_mut().filter_map(|m| m.robust.as_mut()) {
            for b in &mut robust.season {
                b.mean = b.mean.map(|v| f64::from(v as f32));
                b.deviation = b.deviation.map(|v| f64::from(v as f32));
                b.count = b.count.min(255);
            }
            robust.short_term_high = robust.short_term;
        }
        message
    }

    /// A message without what the robust detector decides: its verdicts, episodes,
    /// statistics, trend predictor and the ages of its envelopes. Left: the device,
    /// the windows, the last values and z-scores, and the robust baseline's values,
    /// spread and range.
    fn undecided(mut message: DeviceSnapshot) -> DeviceSnapshot {
        for m in &mut message.metrics {
            m.last_anomaly = false;
            m.anomalies_total = 0;
            m.episode_active = false;
            m.episode_quiet = 0;
            // Version 1 kept unscaled window sums; today's are scaled.
            if let Some(window) = &mut m.window {
                (window.shift, window.sum, window.sum_of_squares) = (None, None, None);
                window.scale = 0;
            }
            if let Some(robust) = &mut m.robust {
                robust.short_term = None;
                robust.short_term_high = None;
                robust.long_term_mean = None;
                robust.long_term_variance = None;
                robust.long_term_count = 0;
                robust.season.clear();
                robust.holt = None;
                robust.short_term_high_age = 0;
                robust.range_high_age = 0;
                robust.range_low_age = 0;
            }
        }
        message
    }

    #[test]
    fn version_1_values_restore_to_the_state_that_wrote_them() {
        for (device, bytes) in v1_fixtures() {
            assert_eq!(bytes[2], LEGACY_VERSION);
            let restored = decode_value(bytes, &device.id).unwrap();
            assert!(!restored.dirty);
            if device.metrics.iter().any(|m| m.detector.robust.is_some()) {
                // The robust detector judges differently from the build that wrote
                // version 1, so today's engine no longer reaches this state: the value
                // restores to what it holds, and holds what today's engine agrees on.
                let written = decode_message(bytes).unwrap();
                assert_eq!(restored.to_snapshot(), as_restored(written.clone()));
                assert_eq!(undecided(written), undecided(device.to_snapshot()));
                continue;
            }
            // Version 1 kept unscaled sums, today's engine scaled ones (scale 0 reads
            // them as they were): same values, same statistics to rounding.
            let mut restored = restored;
            for (r, d) in restored.metrics.iter_mut().zip(&device.metrics) {
                assert!(r.window.iter().eq(d.window.iter()), "{}", device.id);
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
                assert!(close(r.window.mean(), d.window.mean()), "{}", device.id);
                assert!(close(r.window.stddev(), d.window.stddev()), "{}", device.id);
                r.window = d.window.clone();
            }
            assert_eq!(restored, device, "{}", device.id);
            // Bit for bit, negative zeros and all: the version-2 bytes are the same.
            assert_eq!(encoded(&restored), encoded(&device), "{}", device.id);
        }
    }

    #[test]
    fn version_1_values_hold_what_the_fixtures_say() {
        let fixtures = v1_fixtures();
        let robust = &fixtures[2].0;
        assert!(robust.metrics.iter().all(|m| m.detector.robust.is_some()));
        assert!(robust.metrics.iter().any(|m| m.anomalies_total > 0));
        let by_hand = &fixtures[0].0;
        assert!(by_hand.metrics[0].last_value.is_sign_negative());
        assert!(fixtures[3].0.metrics.is_empty());
    }

    #[test]
    fn version_1_cuts_trailing_bytes_and_other_ids_are_refused() {
        for (device, full) in v1_fixtures() {
            for cut in 0..full.len() {
                assert!(
                    decode_value(&full[..cut], &device.id).is_err(),
                    "cut at {cut}"
                );
            }
            let mut trailing = full.to_vec();
            trailing.push(0);
            assert_eq!(
                decode_value(&trailing, &device.id),
                Err(DecodeError::Trailing(1))
            );
            assert!(matches!(
                decode_value(full, "another"),
                Err(DecodeError::WrongDevice { .. })
            ));
        }
    }

    #[test]
    fn version_1_skips_unknown_trailing_metric_fields() {
        // A later version-1 writer appending a field to each metric section: this
        // reader still reads what it knows.
        for (device, full) in v1_fixtures() {
            let mut out = full[..3].to_vec();
            let mut buf = &full[3..];
            let header = legacy::section(&mut buf, "device").unwrap();
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
            out.extend_from_slice(header);
            let count = legacy::get_u32(&mut buf, "metric count").unwrap();
            out.extend_from_slice(&count.to_le_bytes());
            for _ in 0..count {
                let metric = legacy::section(&mut buf, "metric").unwrap();
                out.extend_from_slice(&(metric.len() as u32 + 5).to_le_bytes());
                out.extend_from_slice(metric);
                out.extend_from_slice(&[9; 5]);
            }
            assert_eq!(
                decode_value(&out, &device.id).unwrap(),
                decode_value(full, &device.id).unwrap()
            );
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let d = device(&(1..=73).map(f64::from).collect::<Vec<_>>(), 50);
        let bytes = encoded(&d);
        assert_eq!(bytes[..3], [b'T', b'W', VERSION]);
        let back = decode_value(&bytes, "sensor-1").unwrap();
        assert_eq!(back, d);
        assert!(!back.dirty);
        assert_eq!(encoded(&back), bytes);
    }

    #[test]
    fn written_bytes_are_the_generated_encoding_of_the_message() {
        let mut devices: Vec<DeviceState> =
            fixtures::devices().into_iter().map(|(_, d)| d).collect();
        devices.push(device(&[1.0, -0.0, 3.0], 50));
        for d in devices {
            let bytes = encoded(&d);
            let message = d.to_snapshot();
            assert_eq!(bytes[3..], message.encode_to_vec(), "{}", d.id);
            assert_eq!(decode_message(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn restored_window_continues_bit_for_bit() {
        let values: Vec<f64> = (0..300)
            .map(|i| 1e6 + f64::from(i * 7919 % 101) * 0.37)
            .collect();
        let mut original = device(&values[..137], 50);
        let mut restored = decode_value(&encoded(&original), "sensor-1").unwrap();
        for &v in &values[137..] {
            original.metrics[0].window.push(v, 50);
            restored.metrics[0].window.push(v, 50);
            let (a, b) = (&original.metrics[0].window, &restored.metrics[0].window);
            assert_eq!(a.mean().to_bits(), b.mean().to_bits());
            assert_eq!(a.stddev().to_bits(), b.stddev().to_bits());
        }
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let d = device(&[1.0, 2.0], 50);
        let mut v3 = encoded(&d);
        v3[2] = 3;
        assert_eq!(decode_value(&v3, "sensor-1"), Err(DecodeError::Version(3)));
        assert_eq!(
            decode_value(b"hello world", "sensor-1"),
            Err(DecodeError::Magic)
        );
        let full = encoded(&d);
        for cut in 0..full.len() {
            // A protobuf message cut between two of its fields is a shorter message:
            // never the device that was written.
            assert_ne!(
                decode_value(&full[..cut], "sensor-1"),
                Ok(d.clone()),
                "cut at {cut}"
            );
        }
        let mut trailing = full.clone();
        trailing.push(0);
        assert!(matches!(
            decode_value(&trailing, "sensor-1"),
            Err(DecodeError::Message(_))
        ));
        assert!(matches!(
            decode_value(&full, "sensor-2"),
            Err(DecodeError::WrongDevice { .. })
        ));
        let mut message = d.to_snapshot();
        message.metrics[1].name = "rps".into();
        let mut twice = full[..3].to_vec();
        twice.extend_from_slice(&message.encode_to_vec());
        assert!(matches!(
            decode_value(&twice, "sensor-1"),
            Err(DecodeError::Invalid {
                field: "metric name",
                ..
            })
        ));
        let mut message = d.to_snapshot();
        message.metrics[0].window.as_mut().unwrap().head = 2;
        let mut outside = full[..3].to_vec();
        outside.extend_from_slice(&message.encode_to_vec());
        assert!(matches!(
            decode_value(&outside, "sensor-1"),
            Err(DecodeError::Invalid {
                field: "window head",
                ..
            })
        ));
    }

    #[test]
    fn unknown_fields_of_a_later_schema_are_skipped() {
        let d = device(&[1.0, 2.0, 3.0], 50);
        let mut value = encoded(&d);
        // Field 15, varint 7: unknown to this schema.
        value.extend_from_slice(&[15 << 3, 7]);
        assert_eq!(decode_value(&value, "sensor-1").unwrap(), d);
    }

    #[test]
    fn detector_state_round_trips_and_continues_the_same() {
        use crate::engine::{Engine, EngineConfig};
        use tidewatch_proto::v1::{DetectorConfig, Sample};
        let engine = Engine::new(EngineConfig::default());
        let robust = engine
            .detector(Some(&DetectorConfig {
                name: "robust".into(),
                ..DetectorConfig::default()
            }))
            .unwrap();
        let samples: Vec<Sample> = (0..400)
            .map(|i| Sample {
                device_id: "sensor-1".into(),
                time: Some(Timestamp {
                    seconds: 1_700_000_000 + i64::from(i) * 60,
                    nanos: 0,
                }),
                metrics: [(
                    "rps".to_string(),
                    100.0 + f64::from(i % 17) + if i == 300 { 80.0 } else { 0.0 },
                )]
                .into_iter()
                .collect(),
                seq: 0,
            })
            .collect();
        let mut out = Vec::new();
        engine.ingest_batch(&samples[..250], &robust, &mut out);
        let original = engine.device_state("sensor-1").unwrap();
        assert!(original.metrics[0].detector.robust.is_some());
        let restored = decode_value(&encoded(&original), "sensor-1").unwrap();
        assert_eq!(restored.metrics[0].detector, original.metrics[0].detector);
        // A second engine continuing from the snapshot judges the rest exactly as the
        // first one does.
        let other = Engine::new(EngineConfig::default());
        assert!(other.insert_if_absent(restored));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        engine.ingest_batch(&samples[250..], &robust, &mut a);
        other.ingest_batch(&samples[250..], &robust, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().any(|v| v.alert), "the spike at 300 alerts");
    }

    proptest! {
        #[test]
        fn any_device_writes_the_generated_bytes_and_round_trips(
            capacity in 1usize..=200,
            values in prop::collection::vec(-1e9f64..1e9, 0..500),
            seq in any::<u64>(),
            seconds in any::<i64>(),
            nanos in any::<i32>(),
        ) {
            let mut d = device(&values, capacity);
            d.last_seq = seq;
            d.updated_at = Timestamp { seconds, nanos };
            let bytes = encoded(&d);
            prop_assert_eq!(&bytes[3..], &d.to_snapshot().encode_to_vec()[..]);
            prop_assert_eq!(decode_value(&bytes, "sensor-1").unwrap(), d);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            for version in [LEGACY_VERSION, VERSION] {
                let mut value = MAGIC.to_vec();
                value.push(version);
                value.extend_from_slice(&bytes);
                let _ = decode_value(&value, "sensor-1");
            }
        }
    }
}
