//! What a sample must be before it changes anything: device ids (and the default
//! device), metric names, and the limits of one sample.

use super::config::EngineConfig;
use super::io::text;
use crate::error::SampleError;

/// The device id a sample without one belongs to (the seed clients send none).
pub const DEFAULT_DEVICE: &str = "default";

/// `""` is the default device.
pub fn normalize_device_id(id: &str) -> &str {
    if id.is_empty() { DEFAULT_DEVICE } else { id }
}

/// [`normalize_device_id`] for an id's bytes.
#[inline]
pub(super) fn normalize_id(id: &[u8]) -> &[u8] {
    if id.is_empty() {
        DEFAULT_DEVICE.as_bytes()
    } else {
        id
    }
}

/// The checks of a sample that need neither its device nor its metrics' names: the
/// (normalized) id's length and the number of metrics.
#[inline]
pub(super) fn check_shape(
    config: &EngineConfig,
    id: &[u8],
    metric_count: usize,
) -> Result<(), SampleError> {
    if id.len() > config.max_device_id_len {
        return Err(SampleError::DeviceIdTooLong {
            len: id.len(),
            limit: config.max_device_id_len,
        });
    }
    if metric_count == 0 {
        return Err(SampleError::NoMetrics);
    }
    if metric_count > config.max_metrics_per_device {
        return Err(SampleError::TooManyMetrics {
            device: text(id),
            count: metric_count,
            limit: config.max_metrics_per_device,
        });
    }
    Ok(())
}

/// Metric names are 1..=`limit` bytes of `[A-Za-z0-9_.:-]` (`name` is UTF-8).
pub fn validate_metric_name(name: &[u8], limit: usize) -> Result<(), SampleError> {
    if name.is_empty() || name.len() > limit {
        return Err(SampleError::InvalidMetricName {
            name: text(name),
            reason: format!("must be 1 to {limit} bytes"),
        });
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
    if !name.iter().all(allowed) {
        // The message names the character, not the byte (it may be multi-byte).
        let name = text(name);
        let bad = name
            .chars()
            .find(|&c| !c.is_ascii() || !allowed(&(c as u8)))
            .unwrap_or(char::REPLACEMENT_CHARACTER);
        return Err(SampleError::InvalidMetricName {
            reason: format!("character {bad:?} is not one of [A-Za-z0-9_.:-]"),
            name,
        });
    }
    Ok(())
}
