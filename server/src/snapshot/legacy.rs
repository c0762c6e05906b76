//! The reader of version-1 snapshot values, which builds written before the snapshot
//! schema left in Redis: it reads their fixed layout into the schema's message, and the
//! engine then checks that message as it checks a version-2 one.
//!
//! The version-1 device (after magic and version) is a length-prefixed header section
//! (id, `seq`, `updated_at` seconds and nanoseconds), a `u32` metric count, then one
//! length-prefixed section per metric: name, last value, last z-score, last anomaly,
//! anomalies total, the window (length, head, evictions since the last recompute,
//! shift, the two sums, the values in storage order), then, when the section goes on,
//! the detector state (a version byte, flags: bit 0 episode active, bit 1 robust state
//! follows; the episode's quiet count; the robust state). Bytes left in a section
//! belong to fields this reader does not know and are skipped. Integers are
//! little-endian, strings and sections carry a `u32` length, floats are stored bit for
//! bit.

use tidewatch_proto::v1::{
    DeviceSnapshot, MetricSnapshot, RobustSnapshot, SeasonBucket, WindowSnapshot,
};

use super::error::DecodeError;

/// Version byte of the detector state inside a version-1 metric section.
const DETECTOR_VERSION: u8 = 1;

/// Reads a version-1 device (the bytes after magic and version), all of `value`.
pub(crate) fn read_device(mut value: &[u8]) -> Result<DeviceSnapshot, DecodeError> {
    let buf = &mut value;
    let mut header = section(buf, "device header")?;
    let mut device = DeviceSnapshot {
        device_id: get_str(&mut header, "device id")?.to_owned(),
        last_seq: get_u64(&mut header, "last seq")?,
        updated_at_seconds: get_u64(&mut header, "updated_at seconds")? as i64,
        updated_at_nanos: get_u32(&mut header, "updated_at nanos")? as i32,
        metrics: Vec::new(),
    };
    let count = get_u32(buf, "metric count")? as usize;
    // Each metric takes at least its 4-byte length: a huge count in a short value is
    // garbage, not a reason to allocate.
    device.metrics.reserve(count.min(buf.len() / 4));
    for _ in 0..count {
        device.metrics.push(read_metric(section(buf, "metric")?)?);
    }
    if !buf.is_empty() {
        return Err(DecodeError::Trailing(buf.len()));
    }
    Ok(device)
}

/// Reads one metric section.
fn read_metric(mut section: &[u8]) -> Result<MetricSnapshot, DecodeError> {
    let buf = &mut section;
    let mut metric = MetricSnapshot {
        name: get_str(buf, "metric name")?.to_owned(),
        last_value: Some(get_f64(buf, "last value")?),
        last_z_score: Some(get_f64(buf, "last z-score")?),
        last_anomaly: get_bool(buf, "last anomaly")?,
        anomalies_total: get_u64(buf, "anomalies total")?,
        window: Some(read_window(buf)?),
        ..MetricSnapshot::default()
    };
    // A section without detector state was written before detectors had state: a
    // fresh detector over the restored window.
    if !buf.is_empty() {
        let version = get_u8(buf, "detector encoding version")?;
        if version != DETECTOR_VERSION {
            return Err(unexpected("detector encoding version", version));
        }
        let flags = get_u8(buf, "detector flags")?;
        if flags & !0b11 != 0 {
            return Err(unexpected("detector flags", flags));
        }
        metric.episode_active = flags & 1 != 0;
        metric.episode_quiet = get_u32(buf, "alert episode")?;
        if flags & 0b10 != 0 {
            metric.robust = Some(read_robust(buf)?);
        }
    }
    // Whatever is left belongs to fields of a later version.
    Ok(metric)
}

/// Reads a window: length, head, evictions since the last recompute, shift, sums,
/// then the values.
fn read_window(buf: &mut &[u8]) -> Result<WindowSnapshot, DecodeError> {
    let len = get_u32(buf, "window length")? as usize;
    let head = get_u32(buf, "window head")?;
    let since_exact = get_u32(buf, "window since_exact")?;
    let shift = get_f64(buf, "window shift")?;
    let sum = get_f64(buf, "window sum")?;
    let sum_of_squares = get_f64(buf, "window sum of squares")?;
    Ok(WindowSnapshot {
        values: get_f64s(buf, len, "window values")?,
        head,
        since_exact,
        shift: Some(shift),
        sum: Some(sum),
        sum_of_squares: Some(sum_of_squares),
        // Version-1 windows were never scaled.
        scale: 0,
    })
}

/// Reads the robust detector's state: capacity, values oldest first, the statistics,
/// then the daily profile.
fn read_robust(buf: &mut &[u8]) -> Result<RobustSnapshot, DecodeError> {
    let capacity = get_u32(buf, "robust window capacity")?;
    let len = get_u32(buf, "robust window length")? as usize;
    let mut robust = RobustSnapshot {
        capacity,
        values: get_f64s(buf, len, "robust window value")?,
        spread: Some(get_f64(buf, "robust spread")?),
        short_term: Some(get_f64(buf, "robust short-term surprise")?),
        long_term_mean: Some(get_f64(buf, "robust long-term mean")?),
        long_term_variance: Some(get_f64(buf, "robust long-term variance")?),
        range_high: Some(get_f64(buf, "robust range high")?),
        range_low: Some(get_f64(buf, "robust range low")?),
        long_term_count: get_u64(buf, "robust long-term count")?,
        season: Vec::new(),
        // Version 1 had no envelope of the short average: the reader starts it at
        // the average.
        short_term_high: None,
        // Nor the trend predictor, nor the envelopes' ages: all start afresh.
        holt: None,
        short_term_high_age: 0,
        range_high_age: 0,
        range_low_age: 0,
    };
    let buckets = get_u32(buf, "robust season buckets")? as usize;
    // Each bucket takes 20 bytes.
    robust.season.reserve(buckets.min(buf.len() / 20));
    for _ in 0..buckets {
        robust.season.push(SeasonBucket {
            mean: Some(get_f64(buf, "robust season mean")?),
            deviation: Some(get_f64(buf, "robust season deviation")?),
            count: get_u32(buf, "robust season count")?,
        });
    }
    Ok(robust)
}

fn unexpected(field: &'static str, value: impl std::fmt::Display) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: format!("unexpected value {value}"),
    }
}

/// Splits the next length-prefixed section off `buf`.
pub(crate) fn section<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], DecodeError> {
    let len = get_u32(buf, what)? as usize;
    take(buf, len, what)
}

/// Takes `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated(what));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn array<const N: usize>(buf: &mut &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    let mut out = [0; N];
    out.copy_from_slice(take(buf, N, what)?);
    Ok(out)
}

fn get_u8(buf: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    Ok(array::<1>(buf, what)?[0])
}

pub(crate) fn get_u32(buf: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    Ok(u32::from_le_bytes(array(buf, what)?))
}

fn get_u64(buf: &mut &[u8], what: &'static str) -> Result<u64, DecodeError> {
    Ok(u64::from_le_bytes(array(buf, what)?))
}

fn get_f64(buf: &mut &[u8], what: &'static str) -> Result<f64, DecodeError> {
    Ok(f64::from_bits(get_u64(buf, what)?))
}

/// Reads `n` floats (only as many as `buf` holds are allocated for).
fn get_f64s(buf: &mut &[u8], n: usize, what: &'static str) -> Result<Vec<f64>, DecodeError> {
    let bytes = take(
        buf,
        n.checked_mul(8).ok_or(DecodeError::Truncated(what))?,
        what,
    )?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| f64::from_bits(u64::from_le_bytes(b.try_into().unwrap_or_default())))
        .collect())
}

/// Reads a bool stored as 0 or 1.
fn get_bool(buf: &mut &[u8], what: &'static str) -> Result<bool, DecodeError> {
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
fn get_str<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a str, DecodeError> {
    let len = get_u32(buf, what)? as usize;
    std::str::from_utf8(take(buf, len, what)?).map_err(|e| DecodeError::Invalid {
        field: what,
        reason: e.to_string(),
    })
}
