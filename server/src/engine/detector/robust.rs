//! The `robust` detector: a median/IQR baseline over a sliding window, and a
//! sustained-surprise likelihood on top of it.
//!
//! Two signals, both in "standard deviations":
//! 1. **Instantaneous**: `s = |x − median| / scale` over the last `window` values,
//!    where `scale` is IQR/1.349 (the normal-equivalent standard deviation, blind to
//!    the outliers themselves), floored by a slow mean absolute deviation so that
//!    quantized or mostly-flat metrics do not divide by zero. It counts only when `x`
//!    also leaves the metric's recent range (a peak not reached again for half the
//!    long span is forgotten, for a quarter if an anomaly set it: the range falls
//!    back towards the window's own). Spikes, dips and fresh level shifts show up
//!    here at once.
//! 2. **Sustained** (after Numenta's anomaly likelihood, Ahmad & Purdy 2016): the
//!    surprise `ln(1 + s)` (the larger of two: against the daily profile once a bucket
//!    is trusted, and against a trend predictor, Holt's level plus trend) is
//!    averaged over a short span, and that average is compared with its own long-run
//!    mean and deviation (exponentially weighted). A metric that is always jittery has
//!    a high long-run surprise and stops paging; a quiet one pages on a modest but
//!    lasting change (variance bursts, slow drifts). It is an anomaly only while the
//!    short average stands above everything it reached recently (a decaying envelope,
//!    as for the values): a metric whose bursts come back again and again pages for
//!    the first, not for each. A peak the average has not reached again for half
//!    the long span is forgotten.
//!
//! `anomaly` is `s > threshold` or `likelihood z > sustained_threshold`; `score` is the
//! larger of the two squashed ratios, so 0.5 sits exactly at the anomaly level.
//!
//! Memory per metric at the default window of 128: the ring of values (8 bytes each),
//! their order (2-byte positions), a daily profile of 48 buckets (9 bytes each) and
//! eighteen numbers: about 1.89 KB. Cost per value: two binary searches, one memmove
//! of at most `2 × window` bytes and a dozen floating-point operations.

use tidewatch_proto::v1::{HoltSnapshot, RobustSnapshot, SeasonBucket};

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
    /// decay of the recent-range envelopes; a peak of an envelope not reached again
    /// for half of it is forgotten, for a quarter if an instantaneous anomaly set it
    /// (`ROBUST_LONG_SPAN`).
    pub long_span: u32,
    /// How far beyond the recent range, as a fraction of that range, a value must go
    /// to be an instantaneous surprise (`ROBUST_TOLERANCE`); wider early in a series
    /// (× (1 + 2/√n) after n values).
    pub tolerance: f64,
}

impl Default for RobustParams {
    fn default() -> Self {
        Self {
            window: 128,
            sustained_threshold: 3.0,
            short_span: 10,
            long_span: 2000,
            tolerance: 0.3,
        }
    }
}

/// Buckets of the daily profile (30 minutes each, UTC time of day).
const BUCKETS: usize = 48;
/// Seconds per bucket.
const BUCKET_SECS: i64 = 86_400 / BUCKETS as i64;
/// Visits a bucket needs before it is trusted. With samples every few minutes a
/// bucket is visited several times a day, so on the first day a trusted bucket is a
/// short local baseline (the last half hour's typical offset), and it becomes a
/// time-of-day profile as the days repeat.
const SEASON_WARM: u8 = 3;
/// Slowest learning rate of a bucket: roughly the last 32 visits count.
const SEASON_SPAN: f64 = 16.0;
/// Values the long-run statistics of the sustained signal need before it can page
/// (after `min_samples`): with the defaults, the sustained signal is live from the
/// 97th value of a series.
const LIKELIHOOD_WARM: u64 = 64;
/// Largest z that feeds the sustained signal (its surprise is at most ln 51 ≈ 3.9).
/// One value, however extreme, then adds at most a tenth of that to the short average
/// at the default span: a lone spike is the instantaneous signal's to report, the
/// sustained one is for what lasts. It also keeps a jump off a zero scale (z ≈ 10^300,
/// then infinity) from making the long-run statistics infinite, and then NaN.
const MAX_SURPRISE_Z: f64 = 50.0;
/// How much wider the range tolerance is early in a series: it is multiplied by
/// `1 + EARLY_TOLERANCE / √n` after n values.
const EARLY_TOLERANCE: f64 = 2.0;
/// Smoothing of the trend predictor's level: a value moves it by 3 % of its error.
const HOLT_LEVEL: f64 = 0.03;
/// Smoothing of the trend predictor's trend.
const HOLT_TREND: f64 = 0.02;
/// Slowest learning rate of the predictor's typical error (roughly the last 200
/// values count).
const HOLT_ERROR: f64 = 0.005;
/// Values the trend predictor sees before its surprise counts (its typical error is
/// a running mean until then).
const HOLT_WARM: u32 = 32;

/// The daily profile: per time-of-day bucket, the typical offset from the rolling
/// median and its typical absolute deviation, in single precision (offsets and
/// deviations need no more than 7 digits), and the bucket's visits.
#[derive(Debug, Clone, PartialEq)]
struct Season {
    /// Typical offset from the rolling median at this time of day.
    mean: [f32; BUCKETS],
    /// Typical absolute deviation from it (normal-equivalent).
    dev: [f32; BUCKETS],
    /// Visits (saturating), for trust and the early running mean.
    visits: [u8; BUCKETS],
}

impl Default for Season {
    fn default() -> Self {
        Self {
            mean: [0.0; BUCKETS],
            dev: [0.0; BUCKETS],
            visits: [0; BUCKETS],
        }
    }
}

/// `v` in single precision, saturating at the largest finite f32 (a value beyond it
/// must not turn a bucket into infinity and then NaN).
fn single(v: f64) -> f32 {
    v.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32
}

/// Smallest long-run deviation of the averaged surprise: keeps a perfectly regular
/// metric from paging on the first rounding error.
const MIN_LIKELIHOOD_SD: f64 = 0.05;

/// What the robust detector says about one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RobustJudgement {
    /// Instantaneous robust z (`|x − median| / scale`; 0 during warm-up and inside
    /// the recent range).
    pub robust_z: f64,
    /// Likelihood z of the short-term surprise (0 until the long run is warm).
    pub likelihood_z: f64,
    /// Continuous score in [0, 1]; 0.5 at the anomaly level.
    pub score: f64,
    /// Whether either signal is above its threshold.
    pub anomaly: bool,
}

/// Bytes of a [`RobustState`] itself (it is boxed) and of its daily profile (boxed
/// too), for what a metric's state costs (`engine/budget.rs`): beside them, 10 bytes
/// per value of its window (a value and its position in the order).
pub(crate) const STATE_BYTES: (usize, usize) = (size_of::<RobustState>(), size_of::<Season>());

/// Per-metric state of the robust detector.
#[derive(Debug, Clone)]
pub struct RobustState {
    /// The last values in arrival order (a ring once full).
    ring: Vec<f64>,
    /// Positions in `ring`, ordered by value: median and quartiles are lookups, and
    /// keeping the order moves 2-byte positions instead of 8-byte values.
    order: Vec<u16>,
    /// Index of the oldest value in `ring` once it is full.
    head: usize,
    /// Window capacity the ring was built for (at most `MAX_WINDOW`, so a position
    /// fits in u16).
    capacity: usize,
    /// Slow mean absolute deviation from the median (scale floor).
    mad: f64,
    /// Short exponentially weighted average of `ln(1 + s)`.
    short: f64,
    /// Envelope of `short`: its highest recent value, decaying towards `lt_mean`.
    short_hi: f64,
    /// Values since `short_hi` last rose; at half the long span it is forgotten.
    short_hi_age: u32,
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
    /// Values since `hi` last rose; at half the long span it is forgotten.
    hi_age: u32,
    /// Values since `lo` last fell; at half the long span it is forgotten.
    lo_age: u32,
    /// Level of the trend predictor.
    holt_level: f64,
    /// Trend (per value) of the trend predictor.
    holt_trend: f64,
    /// Typical absolute error of the trend predictor (clipped errors).
    holt_error: f64,
    /// Values the trend predictor has seen (saturates; 0: it starts afresh).
    holt_count: u32,
    /// Daily profile; absent until the first judged value.
    season: Option<Box<Season>>,
}

impl PartialEq for RobustState {
    /// Equal when they judge alike: same values in the same order (wherever the ring
    /// starts), same statistics.
    fn eq(&self, other: &Self) -> bool {
        self.capacity == other.capacity
            && self.values().eq(other.values())
            && self.mad == other.mad
            && self.short == other.short
            && self.short_hi == other.short_hi
            && self.short_hi_age == other.short_hi_age
            && self.lt_mean == other.lt_mean
            && self.lt_var == other.lt_var
            && self.lt_count == other.lt_count
            && self.hi == other.hi
            && self.lo == other.lo
            && self.hi_age == other.hi_age
            && self.lo_age == other.lo_age
            && self.holt_level == other.holt_level
            && self.holt_trend == other.holt_trend
            && self.holt_error == other.holt_error
            && self.holt_count == other.holt_count
            && self.season == other.season
    }
}

impl RobustState {
    /// An empty state for a window of `capacity` values.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Vec::new(),
            order: Vec::new(),
            head: 0,
            capacity: capacity.clamp(1, super::MAX_WINDOW),
            mad: 0.0,
            short: 0.0,
            short_hi: 0.0,
            short_hi_age: 0,
            lt_mean: 0.0,
            lt_var: 0.0,
            lt_count: 0,
            hi: f64::NEG_INFINITY,
            lo: f64::INFINITY,
            hi_age: 0,
            lo_age: 0,
            holt_level: 0.0,
            holt_trend: 0.0,
            holt_error: 0.0,
            holt_count: 0,
            season: None,
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

    /// The window capacity the state is built for.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes this state holds on the heap beside itself (its allocations as sized).
    pub fn heap_bytes(&self) -> usize {
        self.ring.capacity() * size_of::<f64>()
            + self.order.capacity() * size_of::<u16>()
            + self.season.as_ref().map_or(0, |_| size_of::<Season>())
    }

    /// The `k`-th smallest value of the window.
    #[inline]
    fn ranked(&self, k: usize) -> f64 {
        self.ring[usize::from(self.order[k])]
    }

    fn quantile(&self, q: f64) -> f64 {
        let n = self.order.len();
        let pos = q * (n - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let frac = pos - lo as f64;
        let low = self.ranked(lo);
        low + (self.ranked(hi) - low) * frac
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
        let window = params.window.clamp(1, super::MAX_WINDOW);
        if window != self.capacity {
            self.resize(window);
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
            // The range of the first values understates how far the metric reaches
            // (the extremes of n values grow with n), so the tolerance starts wider
            // and narrows as values come: × (1 + 2/√n), 1.35 at the 32nd value,
            // 1.06 at the 1,000th.
            let seen = self.lt_count as f64 + min_samples.max(1) as f64;
            let tolerance = params.tolerance * (1.0 + EARLY_TOLERANCE / seen.sqrt());
            let margin = tolerance * (self.hi - self.lo).max(0.0);
            let beyond = x > self.hi + margin || x < self.lo - margin;
            raw_z = deviation / scale;
            robust_z = if beyond { raw_z } else { 0.0 };
            let decay = 1.0 / f64::from(params.long_span.max(2));
            // A peak not reached again for half the long span is forgotten: the
            // envelope falls to twice the window's reach from the median. A burst long
            // past (or the start-up transient of a series) no longer hides what the
            // metric does now; what the window still holds stays inside the range.
            let forget = params.long_span.max(2) / 2;
            // A peak set by a value that was itself an instantaneous anomaly starts
            // half-way to being forgotten: an anomaly is not evidence of how far the
            // metric normally reaches, so it hides what follows for a quarter of the
            // long span, not half. Reached again by an ordinary value, it is normal
            // after all and kept for the full half.
            let start = if robust_z > threshold { forget / 2 } else { 0 };
            self.hi_age = if x >= self.hi {
                start
            } else {
                self.hi_age.saturating_add(1)
            };
            self.lo_age = if x <= self.lo {
                start
            } else {
                self.lo_age.saturating_add(1)
            };
            self.hi = self.hi.max(x);
            self.lo = self.lo.min(x);
            if self.hi_age > forget {
                let reach = median + 2.0 * (self.ranked(n - 1) - median);
                self.hi = self.hi.min(reach.max(x));
                self.hi_age = 0;
            }
            if self.lo_age > forget {
                let reach = median + 2.0 * (self.ranked(0) - median);
                self.lo = self.lo.max(reach.min(x));
                self.lo_age = 0;
            }
            self.hi -= (self.hi - median).max(0.0) * decay;
            self.lo += (median - self.lo).max(0.0) * decay;
            // The slow deviation floor learns from clipped deviations only, so one
            // outlier does not inflate it.
            let clipped = deviation.min(4.0 * scale * 1.2533);
            let alpha = 1.0 / self.capacity as f64;
            self.mad += (clipped * 1.2533 - self.mad) * alpha;
        } else {
            self.hi = self.hi.max(x);
            self.lo = self.lo.min(x);
        }
        let mut likelihood_z = 0.0;
        let mut sustained_news = false;
        if warm {
            // The larger of two surprises: against the time-of-day profile (or the
            // median) and against the trend. A metric that often surprises one of them
            // has a higher long-run surprise, so it pages only on what stands out
            // above that; a change that surprises both pages as before.
            let seasonal = self.seasonal(x - median, time).unwrap_or(raw_z);
            let z = seasonal.max(self.trend_surprise(x));
            // Capped: one value off by 10^300 against a zero scale must not make the
            // long-run statistics infinite, and then NaN for good.
            let z = if z.is_nan() {
                0.0
            } else {
                z.clamp(0.0, MAX_SURPRISE_Z)
            };
            let surprise = z.ln_1p();
            self.short += (surprise - self.short) / f64::from(params.short_span.max(1));
            let long = f64::from(params.long_span.max(2));
            if self.lt_count >= LIKELIHOOD_WARM {
                let sd = self.lt_var.sqrt().max(MIN_LIKELIHOOD_SD);
                likelihood_z = (self.short - self.lt_mean) / sd;
                // News only above everything the average reached recently: bursts
                // that come back again and again page once, not each time.
                sustained_news = self.short > self.short_hi;
            }
            if self.short >= self.short_hi {
                self.short_hi = self.short;
                self.short_hi_age = 0;
            } else {
                self.short_hi_age += 1;
                // A peak not reached again for half the long span is forgotten: the
                // envelope of a burst long past does not hide a new change.
                if self.short_hi_age > params.long_span.max(2) / 2 {
                    self.short_hi = self.short_hi.min(self.lt_mean);
                    self.short_hi_age = 0;
                }
            }
            self.short_hi -= (self.short_hi - self.lt_mean).max(0.0) / long;
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
        let mut r2 = likelihood_z.max(0.0) / params.sustained_threshold;
        if !sustained_news {
            // At most the anomaly level: keeps an episode alive without being one.
            r2 = r2.min(1.0);
        }
        RobustJudgement {
            robust_z,
            likelihood_z,
            score: squash(r1.max(r2)),
            anomaly: r1 > 1.0 || r2 > 1.0,
        }
    }

    /// Compares `x` (an offset from the rolling median) with the daily profile at its
    /// time of day once that bucket has `SEASON_WARM` visits, then updates the
    /// bucket. A quarter of the slow deviation is the floor of a bucket's deviation.
    fn seasonal(&mut self, x: f64, time: i64) -> Option<f64> {
        let floor = (self.mad * 0.25).max(1e-9 * x.abs()).max(f64::MIN_POSITIVE);
        let season = self.season.get_or_insert_with(Box::default);
        let b = (time.rem_euclid(86_400) / BUCKET_SECS) as usize % BUCKETS;
        let visits = season.visits[b];
        let trusted = visits >= SEASON_WARM;
        let dev = f64::from(season.dev[b]).max(floor);
        let mean = f64::from(season.mean[b]);
        let d = x - mean;
        if visits == 0 {
            season.mean[b] = single(x);
        } else {
            let alpha = (1.0 / (f64::from(visits) + 1.0)).max(1.0 / SEASON_SPAN);
            // Clipped once trusted: an anomaly barely moves what is normal at this
            // time of day.
            let limit = 4.0 * dev;
            let step = if trusted { d.clamp(-limit, limit) } else { d };
            season.mean[b] = single(mean + alpha * step);
            let old = f64::from(season.dev[b]);
            season.dev[b] = single(old + alpha * (step.abs() * 1.2533 - old));
        }
        season.visits[b] = visits.saturating_add(1);
        trusted.then(|| d.abs() / dev)
    }

    /// Compares `x` with the trend predictor (Holt's linear method: an exponentially
    /// smoothed level plus trend), in typical errors, once it has seen `HOLT_WARM`
    /// values (0 before), then updates it. Errors are clipped at four typical errors
    /// once warm, so an anomaly barely moves the level, the trend or the typical error.
    fn trend_surprise(&mut self, x: f64) -> f64 {
        let floor = (self.mad * 0.25).max(1e-9 * x.abs()).max(f64::MIN_POSITIVE);
        let predicted = self.holt_level + self.holt_trend;
        let error = x - predicted;
        let warm = self.holt_count >= HOLT_WARM;
        let z = if warm {
            error.abs() / (self.holt_error * 1.2533).max(floor)
        } else {
            0.0
        };
        if self.holt_count == 0 {
            self.holt_level = x;
        } else {
            let limit = 4.0 * self.holt_error.max(floor);
            let step = if warm {
                error.clamp(-limit, limit)
            } else {
                error
            };
            let level = predicted + HOLT_LEVEL * step;
            self.holt_trend += HOLT_TREND * (level - self.holt_level - self.holt_trend);
            self.holt_level = level;
            let rate = (1.0 / (f64::from(self.holt_count) + 1.0)).max(HOLT_ERROR);
            self.holt_error += (step.abs() - self.holt_error) * rate;
        }
        self.holt_count = self.holt_count.saturating_add(1);
        let predictor = [self.holt_level, self.holt_trend, self.holt_error];
        if !predictor.iter().all(|v| v.is_finite()) {
            // Values at the ends of the double range: start again from the next one.
            (self.holt_level, self.holt_trend, self.holt_error) = (0.0, 0.0, 0.0);
            self.holt_count = 0;
        }
        z
    }

    fn push(&mut self, x: f64) {
        let ring = &mut self.ring;
        if ring.len() < self.capacity {
            if ring.capacity() == 0 {
                // Exact sizes: a window that grows by doubling leaves freed blocks behind.
                ring.reserve_exact(self.capacity);
                self.order.reserve_exact(self.capacity);
            }
            let slot = ring.len() as u16;
            let at = self.order.partition_point(|&i| ring[usize::from(i)] < x);
            ring.push(x);
            self.order.insert(at, slot);
            return;
        }
        let slot = self.head as u16;
        let old = ring[self.head];
        // The oldest value's rank: the first of its equals, then along them to its slot.
        let mut from = self.order.partition_point(|&i| ring[usize::from(i)] < old);
        while self.order[from] != slot {
            from += 1;
        }
        ring[self.head] = x;
        self.head += 1;
        if self.head == self.capacity {
            self.head = 0;
        }
        // Move the slot from its old rank to its new one in a single shift.
        let below = self.order[..from].partition_point(|&i| ring[usize::from(i)] < x);
        if below < from {
            self.order.copy_within(below..from, below + 1);
            self.order[below] = slot;
        } else {
            let after = self.order[from + 1..].partition_point(|&i| ring[usize::from(i)] < x);
            let to = from + after;
            self.order.copy_within(from + 1..=to, from);
            self.order[to] = slot;
        }
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
        self.ring = Vec::new();
        self.order = Vec::new();
        self.head = 0;
        for v in values.into_iter().skip(skip) {
            self.push(v);
        }
    }

    /// Length of the `RobustSnapshot` body [`RobustState::write_snapshot`] writes.
    pub(crate) fn snapshot_len(&self) -> usize {
        let season = self.season.as_ref().map_or(0, |season| {
            season
                .visits
                .iter()
                .map(|&v| persist::message_len(bucket_len(v)))
                .sum::<usize>()
        });
        persist::varint_len(self.capacity as u64)
            + persist::doubles_len(self.ring.len())
            + 7 * persist::DOUBLE_LEN
            + persist::varint_len(self.lt_count)
            + season
            + self.holt_len().map_or(0, persist::message_len)
            + persist::varint_len(u64::from(self.short_hi_age))
            + persist::varint_len(u64::from(self.hi_age))
            + persist::varint_len(u64::from(self.lo_age))
    }

    /// Length of the `HoltSnapshot` body, if the trend predictor has seen a value.
    fn holt_len(&self) -> Option<usize> {
        (self.holt_count > 0)
            .then(|| 3 * persist::DOUBLE_LEN + persist::varint_len(u64::from(self.holt_count)))
    }

    /// Writes the state as a `RobustSnapshot` body: capacity, values oldest first,
    /// the statistics, the daily profile, the envelope of the short average, the
    /// trend predictor, then the ages of the envelopes.
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
        if let Some(season) = &self.season {
            for b in 0..BUCKETS {
                let visits = season.visits[b];
                persist::message(out, 10, bucket_len(visits));
                persist::double(out, 1, f64::from(season.mean[b]));
                persist::double(out, 2, f64::from(season.dev[b]));
                persist::varint(out, 3, u64::from(visits));
            }
        }
        persist::double(out, 11, self.short_hi);
        if let Some(len) = self.holt_len() {
            persist::message(out, 12, len);
            persist::double(out, 1, self.holt_level);
            persist::double(out, 2, self.holt_trend);
            persist::double(out, 3, self.holt_error);
            persist::varint(out, 4, u64::from(self.holt_count));
        }
        persist::varint(out, 13, u64::from(self.short_hi_age));
        persist::varint(out, 14, u64::from(self.hi_age));
        persist::varint(out, 15, u64::from(self.lo_age));
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
            season: self.season.as_ref().map_or_else(Vec::new, |season| {
                (0..BUCKETS)
                    .map(|b| SeasonBucket {
                        mean: Some(f64::from(season.mean[b])),
                        deviation: Some(f64::from(season.dev[b])),
                        count: u32::from(season.visits[b]),
                    })
                    .collect()
            }),
            short_term_high: Some(self.short_hi),
            holt: (self.holt_count > 0).then_some(HoltSnapshot {
                level: Some(self.holt_level),
                trend: Some(self.holt_trend),
                error: Some(self.holt_error),
                count: self.holt_count,
            }),
            short_term_high_age: self.short_hi_age,
            range_high_age: self.hi_age,
            range_low_age: self.lo_age,
        }
    }

    /// The state a `RobustSnapshot` holds. The daily profile comes back in single
    /// precision with visits saturating at 255 (exact for what this state writes); a
    /// message without the envelope of the short average (older snapshots) starts it
    /// at the average, one without the trend predictor starts it afresh.
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
        state.short_hi = message.short_term_high.unwrap_or(state.short);
        state.lt_mean = message.long_term_mean.unwrap_or_default();
        state.lt_var = message.long_term_variance.unwrap_or_default();
        state.hi = message.range_high.unwrap_or_default();
        state.lo = message.range_low.unwrap_or_default();
        state.lt_count = message.long_term_count;
        state.short_hi_age = message.short_term_high_age;
        state.hi_age = message.range_high_age;
        state.lo_age = message.range_low_age;
        if let Some(holt) = message.holt.filter(|holt| holt.count > 0) {
            state.holt_level = finite(holt.level.unwrap_or_default(), "robust trend level")?;
            state.holt_trend = finite(holt.trend.unwrap_or_default(), "robust trend")?;
            state.holt_error = finite(holt.error.unwrap_or_default(), "robust trend error")?;
            state.holt_count = holt.count;
        }
        let buckets = message.season.len();
        if buckets != 0 && buckets != BUCKETS {
            return Err(StateError::unexpected("robust season buckets", buckets));
        }
        if buckets == BUCKETS {
            let mut season = Box::<Season>::default();
            for (b, bucket) in message.season.iter().enumerate() {
                season.mean[b] = single(bucket.mean.unwrap_or_default());
                season.dev[b] = single(bucket.deviation.unwrap_or_default());
                season.visits[b] = bucket.count.min(u32::from(u8::MAX)) as u8;
            }
            state.season = Some(season);
        }
        Ok(state)
    }

    /// Prefetches every line [`RobustState::observe`] reads beside the state itself:
    /// the ring, the order and the daily profile (see `engine/prefetch.rs`).
    #[inline]
    pub(crate) fn prefetch(&self) {
        /// Every line of `items`: the addresses asked for are at most a line apart,
        /// the last element included.
        #[inline(always)]
        fn lines<T>(items: &[T]) {
            use crate::engine::prefetch::prefetch;
            items
                .iter()
                .step_by((64 / size_of::<T>()).max(1))
                .chain(items.last())
                .for_each(prefetch);
        }
        lines(&self.ring);
        lines(&self.order);
        if let Some(season) = &self.season {
            lines(&season.mean);
            lines(&season.dev);
            lines(&season.visits);
        }
    }
}

/// Length of one `SeasonBucket` body: two doubles and the visits.
fn bucket_len(visits: u8) -> usize {
    2 * persist::DOUBLE_LEN + persist::varint_len(u64::from(visits))
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
            let ranked: Vec<f64> = (0..s.len()).map(|k| s.ranked(k)).collect();
            assert_eq!(want, ranked);
        }
        assert_eq!(s.len(), 16);
        let p8 = RobustParams { window: 8, ..p };
        s.observe(0.0, 0, &p8, 6.0, 4);
        assert_eq!(s.len(), 8);
    }

    #[test]
    fn extreme_values_do_not_poison_the_state() {
        let p = RobustParams::default();
        let mut s = RobustState::new(p.window);
        // A flat metric, then values far beyond f32 and the scale, then flat again.
        for i in 0..400 {
            let x = match i {
                200 => 1e300,
                201 => -1e39,
                _ => 0.0,
            };
            let j = s.observe(x, i * 60, &p, 3.0, 32);
            assert!(
                j.score.is_finite() && j.likelihood_z.is_finite(),
                "{i}: {j:?}"
            );
        }
        assert!(s.short.is_finite() && s.lt_mean.is_finite() && s.lt_var.is_finite());
        let season = s.season.as_ref().unwrap();
        assert!(season.mean.iter().chain(&season.dev).all(|v| v.is_finite()));
        // The sustained signal still works: a lasting change pages.
        let paged = (400..600).any(|i| s.observe(5.0, i * 60, &p, 3.0, 32).anomaly);
        assert!(paged);
    }

    #[test]
    fn the_trend_predictor_expects_a_ramp_and_not_a_jump_off_it() {
        let mut s = RobustState::new(128);
        for i in 0..500 {
            s.trend_surprise(100.0 + 0.5 * i as f64 + noise(i));
        }
        // On the ramp: within a few typical errors (the median would lag it by 32).
        let on = s.trend_surprise(100.0 + 0.5 * 500.0);
        assert!(on < 3.0, "{on}");
        let off = s.trend_surprise(100.0 + 0.5 * 501.0 + 30.0);
        assert!(off > 10.0, "{off}");
        // The jump barely moved the prediction.
        let back = s.trend_surprise(100.0 + 0.5 * 502.0);
        assert!(back < 4.0, "{back}");
    }

    #[test]
    fn the_trend_predictor_starts_again_after_values_beyond_its_range() {
        let mut s = RobustState::new(128);
        for x in [f64::MAX, -f64::MAX, f64::MAX] {
            s.trend_surprise(x);
        }
        assert!(s.holt_level.is_finite() && s.holt_trend.is_finite());
        assert!(s.holt_error.is_finite());
    }

    /// Feeds `n` noisy values around `level`, one a minute from `*t` on.
    fn feed(s: &mut RobustState, p: &RobustParams, t: &mut u64, n: usize, level: f64) {
        for _ in 0..n {
            s.observe(level + noise(*t), *t as i64 * 60, p, 3.0, 32);
            *t += 1;
        }
    }

    #[test]
    fn a_peak_not_reached_again_for_half_the_long_span_is_forgotten() {
        let p = RobustParams {
            long_span: 400,
            ..RobustParams::default()
        };
        let mut s = RobustState::new(p.window);
        let mut t = 0;
        feed(&mut s, &p, &mut t, 600, 100.0);
        feed(&mut s, &p, &mut t, 20, 104.0);
        feed(&mut s, &p, &mut t, 20, 100.0);
        let held = s.short_hi - s.lt_mean;
        assert!(held > 0.5, "{held}");
        // Decay alone would keep about 60 % of it after 210 more values.
        feed(&mut s, &p, &mut t, 210, 100.0);
        let after = s.short_hi - s.lt_mean;
        assert!(after < 0.2 * held, "{held} then {after}");
    }

    #[test]
    fn a_burst_long_past_no_longer_hides_a_spike() {
        let p = RobustParams {
            long_span: 400,
            ..RobustParams::default()
        };
        let mut s = RobustState::new(p.window);
        let mut t = 0;
        feed(&mut s, &p, &mut t, 100, 100.0);
        feed(&mut s, &p, &mut t, 5, 200.0);
        // 300 values later the decaying range alone would still reach about 147
        // (plus its tolerance); forgotten after 200, it holds what the window does.
        feed(&mut s, &p, &mut t, 300, 100.0);
        assert!(s.hi < 110.0, "{}", s.hi);
        let spike = s.observe(150.0, t as i64 * 60, &p, 3.0, 32);
        assert!(spike.anomaly && spike.robust_z > 3.0, "{spike:?}");
    }

    #[test]
    fn a_peak_set_by_an_anomaly_is_forgotten_in_a_quarter_of_the_long_span() {
        let p = RobustParams {
            long_span: 1000,
            ..RobustParams::default()
        };
        let mut s = RobustState::new(p.window);
        let mut t = 0;
        feed(&mut s, &p, &mut t, 1200, 100.0);
        let first = s.observe(200.0, t as i64 * 60, &p, 3.0, 32);
        t += 1;
        assert!(first.robust_z > 3.0, "{first:?}");
        // 300 values later a peak of ordinary values would still be remembered (it
        // is forgotten after 500), and its decayed height (about 174) would hide a
        // spike to 150; this one was forgotten after 250, once it left the window.
        feed(&mut s, &p, &mut t, 300, 100.0);
        assert!(s.hi < 110.0, "{}", s.hi);
        let second = s.observe(150.0, t as i64 * 60, &p, 3.0, 32);
        assert!(second.anomaly && second.robust_z > 3.0, "{second:?}");
    }

    #[test]
    fn the_range_tolerance_is_wider_early_in_a_series() {
        let p = RobustParams::default();
        let mut early = RobustState::new(p.window);
        // A quiet metric whose first values reached 90 and 110: range 20.
        for i in 0..40u64 {
            let x = match i {
                3 => 110.0,
                5 => 90.0,
                _ => 100.0 + 0.5 * noise(i),
            };
            early.observe(x, i as i64 * 60, &p, 3.0, 32);
        }
        let mut late = early.clone();
        late.lt_count = 1_000_000;
        // 117 leaves the range by 35 % of it: beyond the tolerance of 0.3 once many
        // values have been seen, within the wider one after 40 (0.3 × 1.32).
        let x = 117.0;
        let judged = late.observe(x, 40 * 60, &p, 3.0, 32);
        assert!(judged.robust_z > 3.0, "{judged:?}");
        let judged = early.observe(x, 40 * 60, &p, 3.0, 32);
        assert_eq!(judged.robust_z, 0.0, "{judged:?}");
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
