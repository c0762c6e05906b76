//! The `robust` detector: a median/IQR baseline over a sliding window, and a
//! sustained-surprise likelihood on top of it.
//!
//! Two signals, both in "standard deviations":
//! 1. **Instantaneous**: `s = |x − median| / scale` over the last `window` values,
//!    where `scale` is IQR/1.349 (the normal-equivalent standard deviation, blind to
//!    the outliers themselves), floored by a slow mean absolute deviation so that
//!    quantized or mostly-flat metrics do not divide by zero. Spikes, dips and fresh
//!    level shifts show up here at once.
//! 2. **Sustained** (after Numenta's anomaly likelihood, Ahmad & Purdy 2016): the
//!    surprise `ln(1 + s)` is averaged over a short span, and that average is compared
//!    with its own long-run mean and deviation (exponentially weighted). A metric that is
//!    always jittery has a high long-run surprise and stops paging; a quiet one pages
//!    on a modest but lasting change (variance bursts, slow drifts).
//!
//! `anomaly` is `s > threshold` or `likelihood z > sustained_threshold`; `score` is the
//! larger of the two squashed ratios, so 0.5 sits exactly at the anomaly level.
//!
//! Memory per metric: two arrays of `window` f64 (the ring and its sorted copy), a
//! daily profile of 48 buckets (20 bytes each), and a dozen numbers. Cost per value: two binary searches and two short memmoves.

use tidewatch_proto::v1::{RobustSnapshot, SeasonBucket};

use super::score::{MAX_WINDOW, squash};
use crate::engine::persist::{self, StateError, finite};

/// Default `ROBUST_THRESHOLD` (instantaneous robust z).
pub const DEFAULT_THRESHOLD: f64 = 3.0;
/// Default `ROBUST_MIN_SAMPLES`.
pub const DEFAULT_MIN_SAMPLES: usize = 32;

/// Settings of the robust detector (server-wide; `window` overridable per stream).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustParams {
    /// Values of the median/IQR baseline (`ROBUST_WINDOW`).
    pub window: usize,
    /// Likelihood z above which a sustained surprise is an anomaly
    /// (`ROBUST_SUSTAINED_THRESHOLD`).
    pub sustained_threshold: f64,
    /// Span (in samples) of the short average of surprise (`ROBUST_SHORT_SPAN`).
    pub short_span: u32,
    /// Span (in samples) of the long-run distribution of that average, and of the
    /// decay of the recent-range envelope (`ROBUST_LONG_SPAN`).
    pub long_span: u32,
    /// How far beyond the recent range, as a fraction of that range, a value must go
    /// to be an instantaneous surprise (`ROBUST_TOLERANCE`).
    pub tolerance: f64,
}

impl Default for RobustParams {
    fn default() -> Self {
        Self {
            window: 128,
            sustained_threshold: 3.0,
            short_span: 10,
            long_span: 2000,
            tolerance: 0.2,
        }
    }
}

/// Buckets of the daily profile (30 minutes each, UTC time of day).
const BUCKETS: usize = 48;
/// Seconds per bucket.
const BUCKET_SECS: i64 = 86_400 / BUCKETS as i64;
/// Days a bucket needs before its profile is trusted.
const SEASON_WARM: u32 = 3;
/// Slowest learning rate of a bucket: roughly the last 32 visits count.
const SEASON_SPAN: f64 = 16.0;

/// One time-of-day bucket of the daily profile.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bucket {
    /// Typical value at this time of day.
    mean: f64,
    /// Typical absolute deviation from it (normal-equivalent).
    dev: f64,
    /// Visits (saturating), for warm-up and the early running mean.
    count: u32,
}

/// Smallest long-run deviation of the averaged surprise: keeps a perfectly regular
/// metric from paging on the first rounding error.
const MIN_LIKELIHOOD_SD: f64 = 0.05;

/// What the robust detector says about one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustJudgement {
    /// Instantaneous robust z (`|x − median| / scale`; 0 during warm-up).
    pub robust_z: f64,
    /// Likelihood z of the short-term surprise (0 until the long run is warm).
    pub likelihood_z: f64,
    /// Continuous score in [0, 1]; 0.5 at the anomaly level.
    pub score: f64,
    /// Whether either signal is above its threshold.
    pub anomaly: bool,
}

/// Per-metric state of the robust detector.
#[derive(Debug, Clone)]
pub struct RobustState {
    /// The last values in arrival order (a ring once full).
    ring: Vec<f64>,
    /// Index of the oldest value in `ring` once it is full.
    head: usize,
    /// The same values, sorted: median and quartiles are lookups.
    sorted: Vec<f64>,
    /// Window capacity the ring was built for.
    capacity: usize,
    /// Slow mean absolute deviation from the median (scale floor).
    mad: f64,
    /// Short exponentially weighted average of `ln(1 + s)`.
    short: f64,
    /// Long-run mean of `short`.
    lt_mean: f64,
    /// Long-run variance of `short`.
    lt_var: f64,
    /// Values that updated the long-run statistics (saturates).
    lt_count: u64,
    /// Upper envelope: the highest value seen, decaying slowly towards the median.
    hi: f64,
    /// Lower envelope: the lowest value seen, decaying slowly towards the median.
    lo: f64,
    /// Daily profile (time-of-day buckets); empty until the first judged value.
    season: Vec<Bucket>,
}

impl PartialEq for RobustState {
    /// Equal when they judge alike: same values in the same order (wherever the ring
    /// starts), same statistics.
    fn eq(&self, other: &Self) -> bool {
        self.capacity == other.capacity
            && self.values().eq(other.values())
            && self.mad == other.mad
            && self.short == other.short
            && self.lt_mean == other.lt_mean
            && self.lt_var == other.lt_var
            && self.lt_count == other.lt_count
            && self.hi == other.hi
            && self.lo == other.lo
            && self.season == other.season
    }
}

impl RobustState {
    /// An empty state for a window of `capacity` values.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Vec::new(),
            head: 0,
            sorted: Vec::new(),
            capacity: capacity.max(1),
            mad: 0.0,
            short: 0.0,
            lt_mean: 0.0,
            lt_var: 0.0,
            lt_count: 0,
            hi: f64::NEG_INFINITY,
            lo: f64::INFINITY,
            season: Vec::new(),
        }
    }

    /// Values in the baseline window.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the baseline window is empty.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    fn quantile(&self, q: f64) -> f64 {
        let n = self.sorted.len();
        let pos = q * (n - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let frac = pos - lo as f64;
        self.sorted[lo] + (self.sorted[hi] - self.sorted[lo]) * frac
    }

    /// Judges `x`, seen at `time` (unix seconds), then adds it to the baseline.
    #[inline]
    pub fn observe(
        &mut self,
        x: f64,
        time: i64,
        params: &RobustParams,
        threshold: f64,
        min_samples: usize,
    ) -> RobustJudgement {
        if params.window.max(1) != self.capacity {
            self.resize(params.window.max(1));
        }
        let n = self.ring.len();
        let mut robust_z = 0.0;
        let mut raw_z = 0.0;
        let mut median = 0.0;
        let warm = n >= min_samples.max(1);
        if warm {
            median = self.quantile(0.5);
            let iqr = self.quantile(0.75) - self.quantile(0.25);
            let scale = (iqr / 1.349)
                .max(self.mad * 0.5)
                .max(1e-9 * median.abs())
                .max(f64::MIN_POSITIVE);
            let deviation = (x - median).abs();
            // Only a value beyond what the metric did recently is an instantaneous
            // surprise: a metric that spikes to 90 % every hour does not page for the
            // next spike to 90 %, but does for the first one to 99 %.
            let margin = params.tolerance * (self.hi - self.lo).max(0.0);
            let beyond = x > self.hi + margin || x < self.lo - margin;
            raw_z = deviation / scale;
            robust_z = if beyond { raw_z } else { 0.0 };
            let decay = 1.0 / f64::from(params.long_span.max(2));
            self.hi = self.hi.max(x);
            self.lo = self.lo.min(x);
            self.hi -= (self.hi - median).max(0.0) * decay;
            self.lo += (median - self.lo).max(0.0) * decay;
            // The slow deviation floor learns from clipped deviations only, so one
            // outlier does not inflate it.
            let clipped = deviation.min(4.0 * scale * 1.2533);
            let alpha = 1.0 / self.capacity as f64;
            self.mad += (clipped * 1.2533 - self.mad) * alpha;
        }
        if !warm {
            self.hi = self.hi.max(x);
            self.lo = self.lo.min(x);
        }
        let seasonal_z = if warm {
            self.seasonal(x - median, time)
        } else {
            None
        };
        let surprise = seasonal_z.unwrap_or(raw_z).ln_1p();
        let mut likelihood_z = 0.0;
        if warm {
            self.short += (surprise - self.short) / f64::from(params.short_span.max(1));
            let long = f64::from(params.long_span.max(2));
            if self.lt_count >= u64::from(params.long_span.max(2) / 4) {
                let sd = self.lt_var.sqrt().max(MIN_LIKELIHOOD_SD);
                likelihood_z = (self.short - self.lt_mean) / sd;
            }
            // Exponentially weighted mean/variance (West 1979), with a running mean
            // during the first `long` values so the start is not biased towards 0.
            self.lt_count = self.lt_count.saturating_add(1);
            let alpha = (1.0 / self.lt_count as f64).max(1.0 / long);
            let d = self.short - self.lt_mean;
            self.lt_mean += alpha * d;
            self.lt_var = (1.0 - alpha) * (self.lt_var + alpha * d * d);
        }
        self.push(x);
        let r1 = robust_z / threshold;
        let r2 = likelihood_z.max(0.0) / params.sustained_threshold;
        RobustJudgement {
            robust_z,
            likelihood_z,
            score: squash(r1.max(r2)),
            anomaly: r1 > 1.0 || r2 > 1.0,
        }
    }

    /// Compares `x` with the daily profile at its time of day (once that bucket has
    /// seen `SEASON_WARM` days), then updates the bucket. A quarter of the slow
    /// deviation is the floor of a bucket's deviation.
    fn seasonal(&mut self, x: f64, time: i64) -> Option<f64> {
        if self.season.is_empty() {
            self.season = vec![Bucket::default(); BUCKETS];
        }
        let index = (time.rem_euclid(86_400) / BUCKET_SECS) as usize % BUCKETS;
        let floor = (self.mad * 0.25).max(1e-9 * x.abs()).max(f64::MIN_POSITIVE);
        let bucket = &mut self.season[index];
        let dev = bucket.dev.max(floor);
        let d = x - bucket.mean;
        let z = (bucket.count >= SEASON_WARM).then(|| d.abs() / dev);
        if bucket.count == 0 {
            bucket.mean = x;
        } else {
            let alpha = (1.0 / f64::from(bucket.count + 1)).max(1.0 / SEASON_SPAN);
            // Clipped: an anomaly barely moves what is normal at this time of day.
            let limit = 4.0 * dev;
            let step = if bucket.count >= SEASON_WARM {
                d.clamp(-limit, limit)
            } else {
                d
            };
            bucket.mean += alpha * step;
            bucket.dev += alpha * (step.abs() * 1.2533 - bucket.dev);
        }
        bucket.count = bucket.count.saturating_add(1);
        z
    }

    fn push(&mut self, x: f64) {
        if self.ring.len() < self.capacity {
            self.ring.push(x);
        } else {
            let old = std::mem::replace(&mut self.ring[self.head], x);
            self.head += 1;
            if self.head == self.capacity {
                self.head = 0;
            }
            let at = self.sorted.partition_point(|&v| v < old);
            self.sorted.remove(at);
        }
        let at = self.sorted.partition_point(|&v| v < x);
        self.sorted.insert(at, x);
    }

    /// Values oldest first.
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        let (newer, older) = self.ring.split_at(self.head);
        older.iter().chain(newer.iter()).copied()
    }

    /// Changes the window capacity, keeping the newest values.
    fn resize(&mut self, capacity: usize) {
        let values: Vec<f64> = self.values().collect();
        let skip = values.len().saturating_sub(capacity);
        self.capacity = capacity;
        self.ring.clear();
        self.sorted.clear();
        self.head = 0;
        for v in values.into_iter().skip(skip) {
            self.push(v);
        }
    }

    /// Length of the `RobustSnapshot` body [`RobustState::write_snapshot`] writes.
    pub(crate) fn snapshot_len(&self) -> usize {
        let bucket = |b: &Bucket| 2 * persist::DOUBLE_LEN + persist::varint_len(u64::from(b.count));
        persist::varint_len(self.capacity as u64)
            + persist::doubles_len(self.ring.len())
            + 6 * persist::DOUBLE_LEN
            + persist::varint_len(self.lt_count)
            + self
                .season
                .iter()
                .map(|b| persist::message_len(bucket(b)))
                .sum::<usize>()
    }

    /// Writes the state as a `RobustSnapshot` body: capacity, values oldest first,
    /// then the statistics.
    pub(crate) fn write_snapshot(&self, out: &mut Vec<u8>) {
        persist::varint(out, 1, self.capacity as u64);
        let (newer, older) = self.ring.split_at(self.head);
        if !self.ring.is_empty() {
            persist::message(out, 2, self.ring.len() * 8);
            for v in older.iter().chain(newer) {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        for (tag, v) in [
            (3, self.mad),
            (4, self.short),
            (5, self.lt_mean),
            (6, self.lt_var),
            (7, self.hi),
            (8, self.lo),
        ] {
            persist::double(out, tag, v);
        }
        persist::varint(out, 9, self.lt_count);
        for b in &self.season {
            persist::message(
                out,
                10,
                2 * persist::DOUBLE_LEN + persist::varint_len(u64::from(b.count)),
            );
            persist::double(out, 1, b.mean);
            persist::double(out, 2, b.dev);
            persist::varint(out, 3, u64::from(b.count));
        }
    }

    /// The message [`RobustState::write_snapshot`] writes.
    pub(crate) fn to_snapshot(&self) -> RobustSnapshot {
        RobustSnapshot {
            capacity: self.capacity as u32,
            values: self.values().collect(),
            spread: Some(self.mad),
            short_term: Some(self.short),
            long_term_mean: Some(self.lt_mean),
            long_term_variance: Some(self.lt_var),
            range_high: Some(self.hi),
            range_low: Some(self.lo),
            long_term_count: self.lt_count,
            season: self
                .season
                .iter()
                .map(|b| SeasonBucket {
                    mean: Some(b.mean),
                    deviation: Some(b.dev),
                    count: b.count,
                })
                .collect(),
        }
    }

    /// The state a `RobustSnapshot` holds.
    pub(crate) fn from_snapshot(message: RobustSnapshot) -> Result<Self, StateError> {
        let capacity = message.capacity as usize;
        if capacity == 0 || capacity > MAX_WINDOW {
            return Err(StateError::unexpected("robust window capacity", capacity));
        }
        if message.values.len() > capacity {
            return Err(StateError::unexpected(
                "robust window length",
                message.values.len(),
            ));
        }
        let mut state = Self::new(capacity);
        for &v in &message.values {
            state.push(finite(v, "robust window value")?);
        }
        state.mad = message.spread.unwrap_or_default();
        state.short = message.short_term.unwrap_or_default();
        state.lt_mean = message.long_term_mean.unwrap_or_default();
        state.lt_var = message.long_term_variance.unwrap_or_default();
        state.hi = message.range_high.unwrap_or_default();
        state.lo = message.range_low.unwrap_or_default();
        state.lt_count = message.long_term_count;
        let buckets = message.season.len();
        if buckets != 0 && buckets != BUCKETS {
            return Err(StateError::unexpected("robust season buckets", buckets));
        }
        state.season = message
            .season
            .iter()
            .map(|b| Bucket {
                mean: b.mean.unwrap_or_default(),
                dev: b.deviation.unwrap_or_default(),
                count: b.count,
            })
            .collect();
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(i: u64) -> f64 {
        // Deterministic pseudo-noise in [-1, 1].
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
        (h as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn median_baseline_ignores_the_outlier_it_just_saw() {
        let p = RobustParams::default();
        let mut s = RobustState::new(p.window);
        for i in 0..200 {
            let j = s.observe(100.0 + noise(i), i as i64 * 60, &p, 6.0, 32);
            if i >= 32 {
                assert!(!j.anomaly, "ordinary value {i} flagged: {j:?}");
            }
        }
        let spike = s.observe(150.0, 200 * 60, &p, 6.0, 32);
        assert!(spike.anomaly && spike.score > 0.9, "{spike:?}");
        // The spike did not move the baseline: the next ordinary value is ordinary.
        let after = s.observe(100.0, 201 * 60, &p, 6.0, 32);
        assert!(after.robust_z < 2.0, "{after:?}");
    }

    #[test]
    fn sorted_copy_tracks_the_ring() {
        let p = RobustParams {
            window: 16,
            ..RobustParams::default()
        };
        let mut s = RobustState::new(16);
        for i in 0..100 {
            s.observe(noise(i) * 10.0, i as i64, &p, 6.0, 4);
            let mut want: Vec<f64> = s.values().collect();
            want.sort_by(f64::total_cmp);
            assert_eq!(want, s.sorted);
        }
        assert_eq!(s.len(), 16);
        let p8 = RobustParams { window: 8, ..p };
        s.observe(0.0, 0, &p8, 6.0, 4);
        assert_eq!(s.len(), 8);
    }

    #[test]
    fn warm_up_never_flags() {
        let p = RobustParams::default();
        let mut s = RobustState::new(p.window);
        for i in 0..31 {
            let j = s.observe(if i % 2 == 0 { 0.0 } else { 1e6 }, i, &p, 6.0, 32);
            assert_eq!((j.anomaly, j.score), (false, 0.0));
        }
    }
}
