//! The binary encoding of a device snapshot: framing, primitives and the decode error.
//!
//! A value is `b"TW"`, one version byte ([`VERSION`]), then the device (see
//! `DeviceState::encode` in `engine/device.rs`, written next to the type it encodes).
//! Every variable part is length-prefixed, and each metric is a length-prefixed
//! section: a later version that appends a field to a metric (detector state, say)
//! changes one section, and a decoder skips the bytes of a section it does not know.
//! Numbers are little-endian; floats are stored bit for bit, so a restored window
//! continues exactly where the old one stopped.

use crate::engine::{DeviceState, DirtyDevice};

/// First bytes of every snapshot value: garbage rarely starts with them.
pub const MAGIC: [u8; 2] = *b"TW";

/// The encoding version this build writes and reads.
pub const VERSION: u8 = 1;

/// Why a snapshot value could not be decoded. The device then starts fresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value does not start with [`MAGIC`].
    #[error("not a tidewatch snapshot (bad magic)")]
    Magic,
    /// Written by another encoding version.
    #[error("snapshot encoding version {0} is not supported (this build reads {VERSION})")]
    Version(u8),
    /// The value ends in the middle of a field.
    #[error("snapshot is truncated while reading {0}")]
    Truncated(&'static str),
    /// A field holds a value the engine cannot have produced.
    #[error("snapshot field {field} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes are left after the device.
    #[error("snapshot has {0} trailing bytes")]
    Trailing(usize),
    /// The value under a device's key holds another device.
    #[error("snapshot holds device {found:?}, expected {expected:?}")]
    WrongDevice {
        /// The device whose key was read.
        expected: String,
        /// The device the value holds.
        found: String,
    },
}

/// A device that can be written as a snapshot: the owned [`DeviceState`], or a device
/// in the engine's memory as the flusher visits it (both write the same bytes).
pub trait EncodeDevice {
    /// Appends the device (without magic and version).
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

/// Decodes a complete snapshot value read under the key of `expected_id`.
pub fn decode_value(value: &[u8], expected_id: &str) -> Result<DeviceState, DecodeError> {
    let mut buf = value;
    if take(&mut buf, MAGIC.len(), "magic")? != MAGIC {
        return Err(DecodeError::Magic);
    }
    let version = get_u8(&mut buf, "version")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let device = DeviceState::decode(&mut buf)?;
    if !buf.is_empty() {
        return Err(DecodeError::Trailing(buf.len()));
    }
    if &*device.id != expected_id {
        return Err(DecodeError::WrongDevice {
            expected: expected_id.to_owned(),
            found: device.id.to_string(),
        });
    }
    Ok(device)
}

/// Appends a `u8`.
#[inline]
pub fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

/// Appends a little-endian `u32`.
#[inline]
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a little-endian `u64`.
#[inline]
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a little-endian `i64`.
#[inline]
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends a float, bit for bit.
#[inline]
pub fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

/// Appends a string with a `u32` length prefix.
#[inline]
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// Starts a length-prefixed section; returns where its length goes for [`end_section`].
#[inline]
pub fn begin_section(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    put_u32(out, 0);
    at
}

/// Writes the length of the section started at `at`.
#[inline]
pub fn end_section(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Splits the next length-prefixed section off `buf`.
pub fn section<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], DecodeError> {
    let len = get_u32(buf, what)? as usize;
    take(buf, len, what)
}

/// Takes `n` bytes off the front of `buf`.
#[inline]
pub fn take<'a>(buf: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated(what));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn array<const N: usize>(buf: &mut &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    let bytes = take(buf, N, what)?;
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    Ok(out)
}

/// Reads a `u8`.
pub fn get_u8(buf: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    Ok(array::<1>(buf, what)?[0])
}

/// Reads a little-endian `u32`.
pub fn get_u32(buf: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    Ok(u32::from_le_bytes(array(buf, what)?))
}

/// Reads a little-endian `u64`.
pub fn get_u64(buf: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    Ok(u64::from_le_bytes(array(buf, what)?))
}

/// Reads a little-endian `i64`.
pub fn get_i64(buf: &mut &[u8], what: &'static str) -> Result<i64, DecodeError> {
    Ok(i64::from_le_bytes(array(buf, what)?))
}

/// Reads a float, bit for bit.
pub fn get_f64(buf: &mut &[u8], what: &'static str) -> Result<f64, DecodeError> {
    Ok(f64::from_bits(get_u64(buf, what)?))
}

/// Reads a finite float (window values and sums are always finite).
pub fn get_finite(buf: &mut &[u8], what: &'static str) -> Result<f64, DecodeError> {
    let v = get_f64(buf, what)?;
    if !v.is_finite() {
        return Err(DecodeError::Invalid {
            field: what,
            reason: format!("{v} is not finite"),
        });
    }
    Ok(v)
}

/// Reads a bool stored as 0 or 1.
pub fn get_bool(buf: &mut &[u8], what: &'static str) -> Result<bool, DecodeError> {
    match get_u8(buf, what)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::Invalid {
            field: what,
            reason: format!("{other} is not a bool"),
        }),
    }
}

/// Reads a UTF-8 string with a `u32` length prefix.
pub fn get_str<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a str, DecodeError> {
    let len = get_u32(buf, what)? as usize;
    let bytes = take(buf, len, what)?;
    std::str::from_utf8(bytes).map_err(|e| DecodeError::Invalid {
        field: what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MetricState, Window};
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

    #[test]
    fn round_trip_is_exact() {
        let d = device(&(1..=73).map(f64::from).collect::<Vec<_>>(), 50);
        let back = decode_value(&encoded(&d), "sensor-1").unwrap();
        assert_eq!(back, d);
        assert!(!back.dirty);
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
        let mut v2 = encoded(&d);
        v2[2] = 2;
        assert_eq!(decode_value(&v2, "sensor-1"), Err(DecodeError::Version(2)));
        assert_eq!(
            decode_value(b"hello world", "sensor-1"),
            Err(DecodeError::Magic)
        );
        let full = encoded(&d);
        for cut in 0..full.len() {
            assert!(
                decode_value(&full[..cut], "sensor-1").is_err(),
                "cut at {cut}"
            );
        }
        let mut trailing = full.clone();
        trailing.push(0);
        assert_eq!(
            decode_value(&trailing, "sensor-1"),
            Err(DecodeError::Trailing(1))
        );
        assert!(matches!(
            decode_value(&full, "sensor-2"),
            Err(DecodeError::WrongDevice { .. })
        ));
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

    #[test]
    fn unknown_trailing_metric_fields_are_skipped() {
        // A later version appends a field to each metric section: this build still
        // reads what it knows.
        let d = device(&[1.0, 2.0, 3.0], 50);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        let mut body = Vec::new();
        d.encode(&mut body);
        // Re-encode by hand with 5 extra bytes in every metric section.
        let mut buf = &body[..];
        let header = section(&mut buf, "device").unwrap();
        let at = begin_section(&mut out);
        out.extend_from_slice(header);
        end_section(&mut out, at);
        let count = get_u32(&mut buf, "metric count").unwrap();
        put_u32(&mut out, count);
        for _ in 0..count {
            let metric = section(&mut buf, "metric").unwrap();
            let at = begin_section(&mut out);
            out.extend_from_slice(metric);
            out.extend_from_slice(&[9; 5]);
            end_section(&mut out, at);
        }
        assert_eq!(decode_value(&out, "sensor-1").unwrap(), d);
    }

    proptest! {
        #[test]
        fn any_window_round_trips(
            capacity in 1usize..=200,
            values in prop::collection::vec(-1e9f64..1e9, 0..500),
        ) {
            let w = {
                let mut w = Window::new();
                for &v in &values { w.push(v, capacity); }
                w
            };
            let mut out = Vec::new();
            w.encode(&mut out);
            let mut buf = &out[..];
            let back = Window::decode(&mut buf).unwrap();
            prop_assert!(buf.is_empty());
            prop_assert_eq!(back, w);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut value = MAGIC.to_vec();
            value.push(VERSION);
            value.extend_from_slice(&bytes);
            let _ = decode_value(&value, "sensor-1");
        }
    }
}
