//! What every detector shares and the detector modules take from one place: the
//! largest window a stream may ask for, and how a ratio to the anomaly level becomes a
//! score.

/// Largest window a stream may ask for (bounded memory per metric).
pub const MAX_WINDOW: usize = 4096;

/// `|z| / (|z| + threshold)`: 0 for a perfectly ordinary value, 0.5 at the
/// threshold, towards 1 far beyond it.
#[inline]
pub fn squash(ratio: f64) -> f64 {
    if ratio.is_nan() || ratio <= 0.0 {
        0.0
    } else if ratio.is_infinite() {
        1.0
    } else {
        ratio / (1.0 + ratio)
    }
}
