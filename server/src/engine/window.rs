//! The rolling window of one (device, metric): the last `capacity` values with their
//! mean and population variance, updated in O(1) per value.
//!
//! The window keeps a shift `k` (a recent mean), a power-of-two scale `2^e` (about the
//! window's largest deviation from `k`), and the running sums of `d = (x - k) / 2^e`
//! and `d²`. Subtracting a nearby shift is exact for floats of similar magnitude
//! (Sterbenz), so values around 1e9 with a spread of 1 lose nothing to cancellation,
//! which is what breaks naive running sums of squares and plain Welford updates.
//! Dividing by a power of two is exact, and keeps `d²` and its sum inside the range of
//! a double for every finite value: a window holding 1e300 and -1e300 has sums near 1,
//! and so does one whose values differ by 1e-300.
//!
//! Adding and removing values rounds a little each time; so every `capacity` evictions,
//! and whenever the sums would lose precision (the data wandered far from `k`, a value
//! lies far outside the scale, or the evicted value carried most of the variance), the
//! window re-centres `k` on the mean, picks the scale again and recomputes both sums
//! from its values. That is O(n) once per n updates: O(1) amortized. Mean and standard
//! deviation stay within 1e-9 (relative) of an exact two-pass computation, or within
//! 1e-12 of the window's largest magnitude when that is larger (the rounding of the
//! values themselves); see the property tests.

use tidewatch_proto::v1::WindowSnapshot;

use super::persist::{self, StateError, finite};

/// Re-centre when the mean is this many standard deviations away from the shift:
/// beyond it, `s2/n - (s1/n)²` would cancel away more than ~1e-9 of the variance.
const RECENTER_RATIO_SQ: f64 = 1e4 * 1e4;

/// The scaled deviation of a value above which the sums re-scale first: with at most
/// 2^16 values, `s1²` and `n · s2` stay below 2^840, far from overflowing.
const HIGH: f64 = pow2(400);

/// A sum of squares below this, with a value that differs from the shift, means the
/// scale is far too coarse for the window's spread: squares would underflow.
const LOW: f64 = pow2(-600);

/// Re-scale when an eviction leaves less than this share of the sum of squares: the
/// rest would carry the removed value's rounding (2^-52 of it) as error.
const EVICT_SHARE: f64 = 1.0 / 1024.0;

/// Bounds of the scale exponent: `2^-e` and `2^e` stay normal doubles.
pub(crate) const MAX_SCALE: i16 = 1000;

/// `2^e` for `e` in -1022..=1023, exactly.
const fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

/// The exponent of `v` (`v` finite, positive, normal or not): `2^e <= v < 2^(e+1)`.
fn exponent(v: f64) -> i32 {
    let bits = v.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i32;
    if e == 0 {
        // Subnormal: the exponent of its highest set bit.
        -1074 + (63 - (bits & ((1 << 52) - 1)).leading_zeros() as i32)
    } else {
        e - 1023
    }
}

/// The protobuf `sint32` encoding of `v`.
fn zigzag(v: i16) -> u64 {
    let v = i32::from(v);
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

/// Windows of at most this many values (512 bytes) are allocated whole at their first
/// value. Growing them on demand (4, 8, 16, 32, 50 slots) cost five reallocations per
/// metric and left the freed steps as holes in the heap: 1M devices × 2 metrics of
/// full 50-value windows took 1,635 MiB of RSS for 800 MB of values.
const WHOLE_UP_FRONT: usize = 64;

/// Slots a larger window starts with before it is allocated whole.
const FIRST_SLOTS: usize = 8;

/// Largest window: lengths and positions are 16-bit (the engine keeps a million
/// devices' windows, and every byte of per-window bookkeeping is a megabyte).
pub const MAX_WINDOW_SIZE: usize = u16::MAX as usize;

/// Where the values of a [`Ring`] live: `slots` consecutive `f64`s (the first `len`
/// are the values, in storage order), which the ring asks to resize when it grows.
pub(crate) trait Slots {
    /// The ring's `slots` slots.
    fn values(&mut self, slots: usize) -> &mut [f64];
    /// Moves the values to `to` slots, keeping the first `keep` of the current
    /// `slots` (`slots` is 0 when there are none yet).
    fn resize(&mut self, slots: usize, keep: usize, to: usize);
}

/// Everything of a rolling window but its values: the shift, the running sums, the
/// ring's length and head, and how many slots the values have. Kept by the engine
/// beside its values (which live in a shard's pool), and by [`Window`] beside a `Vec`.
///
/// Packed to an alignment of 2 so that the scale takes no padding: a [`Ring`] is 34
/// bytes, and a metric in memory stays 72 (unaligned loads of the sums cost nothing
/// measurable on the CPUs we run on).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(Rust, packed(2))]
pub(crate) struct Ring {
    /// The shift the sums are taken against.
    k: f64,
    /// Sum of `(x - k) / 2^scale`.
    s1: f64,
    /// Sum of `((x - k) / 2^scale)²`.
    s2: f64,
    /// Exponent of the scale, within ±[`MAX_SCALE`].
    scale: i16,
    /// Number of values.
    len: u16,
    /// Index of the oldest value once the buffer is full (0 while it grows).
    head: u16,
    /// Evictions since the last exact recomputation.
    since_exact: u16,
    /// Slots allocated for the values: fills up to the capacity, then is overwritten
    /// in ring order. Allocated at the first value: all at once (exactly the
    /// capacity) when the window is at most [`WHOLE_UP_FRONT`] values, else
    /// [`FIRST_SLOTS`] slots first and the exact capacity once those are full. So a
    /// full window costs exactly its capacity and is allocated at most twice, while a
    /// large window that saw a handful of values still costs a handful of slots.
    slots: u16,
}

impl Ring {
    /// Number of values.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Slots allocated for the values.
    #[inline]
    pub(crate) fn slots(&self) -> usize {
        usize::from(self.slots)
    }

    /// Mean of the values (0 when empty).
    #[inline]
    pub(crate) fn mean(&self) -> f64 {
        let n = self.len();
        if n == 0 {
            0.0
        } else {
            self.k + self.s1 / n as f64 * pow2(self.scale.into())
        }
    }

    /// Population variance of the scaled deviations (divides by n; 0 when empty).
    #[inline]
    fn scaled_variance(&self) -> f64 {
        let n = self.len();
        if n == 0 {
            return 0.0;
        }
        let n = n as f64;
        let d = self.s1 / n;
        (self.s2 / n - d * d).max(0.0)
    }

    /// Population standard deviation (divides by n; 0 when empty).
    #[inline]
    pub(crate) fn stddev(&self) -> f64 {
        self.scaled_variance().sqrt() * pow2(self.scale.into())
    }

    /// The values (of `slots`), oldest first.
    pub(crate) fn iter<'a>(&self, slots: &'a [f64]) -> impl Iterator<Item = f64> + 'a {
        let (newer, older) = slots[..self.len()].split_at(self.head.into());
        older.iter().chain(newer.iter()).copied()
    }

    /// The slot the next [`Ring::push`] writes (and, once the window is full, reads
    /// the value it replaces from): the first unused slot while the window grows, else
    /// the oldest value's. Only a hint where the push will also resize.
    #[inline]
    pub(crate) fn next_slot(&self) -> usize {
        if self.len < self.slots {
            self.len()
        } else {
            usize::from(self.head)
        }
    }

    /// The newest value (0 when empty).
    pub(crate) fn newest(&self, slots: &[f64]) -> f64 {
        match (self.len(), self.head) {
            (0, _) => 0.0,
            (n, 0) => slots[n - 1],
            (_, head) => slots[usize::from(head) - 1],
        }
    }

    /// Appends `x`, evicting the oldest value when the window holds `capacity` values
    /// (at most [`MAX_WINDOW_SIZE`]).
    #[inline]
    pub(crate) fn push(&mut self, x: f64, capacity: usize, store: &mut impl Slots) {
        let capacity = capacity.clamp(1, MAX_WINDOW_SIZE);
        let n = self.len();
        // What the sum of squares held before an eviction took a value out (0 while the
        // window grows): the rounding of the sums is proportional to it.
        let mut before = 0.0;
        if n < capacity {
            if n == 0 {
                self.k = x;
                self.scale = 0;
            }
            if self.slots() == n {
                // Exactly the capacity, at most in two steps (see `slots`).
                let want = if n == 0 && capacity > WHOLE_UP_FRONT {
                    FIRST_SLOTS
                } else {
                    capacity
                };
                store.resize(self.slots(), n, want);
                self.slots = want as u16;
            }
            store.values(self.slots())[n] = x;
            self.len += 1;
            let d = (x - self.k) * pow2(-i32::from(self.scale));
            if d.abs() > HIGH {
                // Far outside the scale (or beyond a double's range from the shift).
                self.recompute(store.values(self.slots()));
                return;
            }
            self.s1 += d;
            self.s2 += d * d;
            if self.s2 < LOW && d != 0.0 && self.scale > -MAX_SCALE {
                self.recompute(store.values(self.slots()));
                return;
            }
        } else if n > capacity {
            // The capacity shrank (a restore under a smaller WINDOW_SIZE): rebuild
            // from the newest values, as a fresh window would have been built.
            let kept: Vec<f64> = self
                .iter(store.values(self.slots()))
                .skip(n - capacity)
                .collect();
            *self = Self {
                slots: self.slots,
                ..Self::default()
            };
            for v in kept {
                self.push(v, capacity, store);
            }
            self.recompute(store.values(self.slots()));
            self.push(x, capacity, store);
            return;
        } else {
            let values = store.values(self.slots());
            let head = usize::from(self.head);
            let old = std::mem::replace(&mut values[head], x);
            self.head = if head + 1 == n { 0 } else { self.head + 1 };
            let c = pow2(-i32::from(self.scale));
            let (dx, dold) = ((x - self.k) * c, (old - self.k) * c);
            before = self.s2;
            self.s1 += dx - dold;
            self.s2 += (dx - dold) * (dx + dold);
            self.since_exact += 1;
            // An overflowed deviation is infinite (never NaN: both operands are finite).
            if usize::from(self.since_exact) >= n
                || dx.abs() > HIGH
                || dold.abs() > HIGH
                || (self.s2 < LOW && dx != 0.0 && self.scale > -MAX_SCALE)
            {
                self.recompute(values);
                return;
            }
        }
        // Far from the shift, the variance formula cancels: re-centre. The test is
        // (s1/n)² > R · (s2/n − (s1/n)²), multiplied through by n² so that a push
        // divides nothing (it runs for every value; the judgement before it has
        // divided already). Likewise when an eviction left a variance that is a small
        // share of the sums it was taken from (it took the value that carried them).
        let len = f64::from(self.len);
        let s1_sq = self.s1 * self.s1;
        let spread = self.s2 * len - s1_sq;
        if (s1_sq > RECENTER_RATIO_SQ * spread.max(0.0) && self.s1 != 0.0)
            || spread < before * len * EVICT_SHARE
        {
            self.recompute(store.values(self.slots()));
        }
    }

    /// Re-centres the shift on the mean, picks the scale from the largest deviation,
    /// and recomputes both sums from the values.
    fn recompute(&mut self, slots: &[f64]) {
        self.since_exact = 0;
        let values = &slots[..self.len()];
        let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if largest == 0.0 {
            *self = Self {
                slots: self.slots,
                len: self.len,
                head: self.head,
                ..Self::default()
            };
            return;
        }
        // Two passes over the values brought near 1 (a power of two: exact, but for
        // values below 2^-1022 of the largest, which cannot move the mean).
        let e = exponent(largest).clamp(-1022, 1022);
        let (down, up) = (pow2(-e), pow2(e));
        let n = values.len() as f64;
        let mut mean = values.iter().map(|v| v * down).sum::<f64>() / n;
        mean += values.iter().map(|v| v * down - mean).sum::<f64>() / n;
        let spread = values
            .iter()
            .fold(0.0f64, |m, v| m.max((v * down - mean).abs()));
        let k = mean * up;
        let scale = if spread == 0.0 {
            0
        } else {
            (exponent(spread) + e).clamp(-i32::from(MAX_SCALE), i32::from(MAX_SCALE))
        };
        // With a scale above 0 the deviations may exceed a double: scale each term
        // first (exact but below 2^-1022 of the spread). Otherwise the difference of
        // two values within a double's range of each other is taken first (exact for
        // nearby values), then scaled up.
        let c = pow2(-scale);
        let deviation = |v: f64| {
            if scale > 0 {
                v * c - k * c
            } else {
                (v - k) * c
            }
        };
        let (mut s1, mut s2) = (0.0, 0.0);
        for &v in values {
            let d = deviation(v);
            s1 += d;
            s2 += d * d;
        }
        self.k = k;
        self.scale = scale as i16;
        self.s1 = s1;
        self.s2 = s2;
    }

    /// Length of the `WindowSnapshot` body [`Ring::write_snapshot`] writes.
    #[inline]
    pub(crate) fn snapshot_len(&self) -> usize {
        persist::doubles_len(self.len())
            + persist::varint_len(u64::from(self.head))
            + persist::varint_len(u64::from(self.since_exact))
            + 3 * persist::DOUBLE_LEN
            + persist::varint_len(zigzag(self.scale))
    }

    /// Writes the window (with its values `slots`) as a `WindowSnapshot` body: the
    /// ring exactly as it is in memory (storage order, head, shift, sums), so that a
    /// restored window rounds exactly as this one would have and verdicts after a
    /// restore equal those of an uninterrupted run.
    #[inline]
    pub(crate) fn write_snapshot(&self, slots: &[f64], out: &mut Vec<u8>) {
        persist::doubles(out, 1, &slots[..self.len()]);
        persist::varint(out, 2, u64::from(self.head));
        persist::varint(out, 3, u64::from(self.since_exact));
        persist::double(out, 4, self.k);
        persist::double(out, 5, self.s1);
        persist::double(out, 6, self.s2);
        persist::varint(out, 7, zigzag(self.scale));
    }

    /// The message [`Ring::write_snapshot`] writes.
    pub(crate) fn snapshot(&self, slots: &[f64]) -> WindowSnapshot {
        WindowSnapshot {
            values: slots[..self.len()].to_vec(),
            head: u32::from(self.head),
            since_exact: u32::from(self.since_exact),
            shift: Some(self.k),
            sum: Some(self.s1),
            sum_of_squares: Some(self.s2),
            scale: self.scale.into(),
        }
    }

    /// The ring and its values (exactly as many slots as values) of a window message.
    fn from_snapshot(window: WindowSnapshot) -> Result<(Self, Vec<f64>), StateError> {
        let WindowSnapshot {
            values,
            head,
            since_exact,
            shift,
            sum,
            sum_of_squares,
            scale,
        } = window;
        let k = finite(shift.unwrap_or_default(), "window shift")?;
        let s1 = finite(sum.unwrap_or_default(), "window sum")?;
        let s2 = finite(sum_of_squares.unwrap_or_default(), "window sum of squares")?;
        let len = values.len();
        if len > MAX_WINDOW_SIZE {
            return Err(StateError {
                field: "window length",
                reason: format!("{len} is above the largest window, {MAX_WINDOW_SIZE}"),
            });
        }
        let head = head as usize;
        if head >= len.max(1) {
            return Err(StateError {
                field: "window head",
                reason: format!("{head} is outside a window of {len} values"),
            });
        }
        if !(-i32::from(MAX_SCALE)..=i32::from(MAX_SCALE)).contains(&scale) {
            return Err(StateError {
                field: "window scale",
                reason: format!("2^{scale} is outside 2^±{MAX_SCALE}"),
            });
        }
        for &v in &values {
            finite(v, "window value")?;
        }
        let ring = Self {
            k,
            s1,
            s2,
            len: len as u16,
            head: head as u16,
            // A count at or above the length means "recompute at the next eviction",
            // which one below the length says as well (and cannot overflow).
            since_exact: (since_exact as usize).min(len.saturating_sub(1)) as u16,
            slots: len as u16,
            scale: scale as i16,
        };
        Ok((ring, values))
    }
}

impl Slots for Vec<f64> {
    fn values(&mut self, _slots: usize) -> &mut [f64] {
        self
    }

    fn resize(&mut self, _slots: usize, keep: usize, to: usize) {
        self.truncate(keep);
        self.reserve_exact(to - keep);
        self.resize(to, 0.0);
    }
}

/// A ring buffer of the most recent values with running statistics, owning its values:
/// the form a window has in a snapshot (the engine keeps a [`Ring`] and its values in a
/// shard's pool instead).
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// The statistics and the ring's shape.
    pub(crate) ring: Ring,
    /// The ring's slots (`ring.slots` of them; the first `ring.len` are values).
    pub(crate) values: Vec<f64>,
}

impl PartialEq for Window {
    /// Same values in the same ring order, same sums; free slots do not count.
    fn eq(&self, other: &Self) -> bool {
        let Self {
            ring: a,
            values: va,
        } = self;
        let Self {
            ring: b,
            values: vb,
        } = other;
        (a.k, a.s1, a.s2, a.scale, a.len, a.head, a.since_exact)
            == (b.k, b.s1, b.s2, b.scale, b.len, b.head, b.since_exact)
            && va[..a.len()] == vb[..b.len()]
    }
}

impl Window {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a window from its values, oldest first (a snapshot restore). Keeps the
    /// newest `capacity` values when there are more.
    pub fn from_values(values: impl IntoIterator<Item = f64>, capacity: usize) -> Self {
        let mut w = Self::new();
        for v in values {
            w.push(v, capacity);
        }
        w.ring.recompute(&w.values);
        w
    }

    /// Number of values in the window.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the window holds no value.
    pub fn is_empty(&self) -> bool {
        self.ring.len == 0
    }

    /// Mean of the values (0 when empty).
    #[inline]
    pub fn mean(&self) -> f64 {
        self.ring.mean()
    }

    /// Population standard deviation (divides by n; 0 when empty).
    #[inline]
    pub fn stddev(&self) -> f64 {
        self.ring.stddev()
    }

    /// The values, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = f64> + '_ {
        self.ring.iter(&self.values)
    }

    /// Appends `x`, evicting the oldest value when the window holds `capacity` values
    /// (at most [`MAX_WINDOW_SIZE`]).
    #[inline]
    pub fn push(&mut self, x: f64, capacity: usize) {
        self.ring.push(x, capacity, &mut self.values);
    }

    /// The window as a snapshot message (see [`Ring::write_snapshot`]).
    pub fn to_snapshot(&self) -> WindowSnapshot {
        self.ring.snapshot(&self.values)
    }

    /// The window a snapshot message holds.
    pub fn from_snapshot(window: WindowSnapshot) -> Result<Self, StateError> {
        let (ring, values) = Ring::from_snapshot(window)?;
        Ok(Self { ring, values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: mean and population stddev by two passes.
    fn naive(values: &[f64]) -> (f64, f64) {
        if values.is_empty() {
            return (0.0, 0.0);
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    /// The reference for any finite values: two passes over the values scaled by a
    /// power of two near the largest (exact), so nothing overflows or cancels.
    fn exact(values: &[f64]) -> (f64, f64) {
        let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if largest == 0.0 {
            return (0.0, 0.0);
        }
        let e = exponent(largest).clamp(-1022, 1022);
        let scaled: Vec<f64> = values.iter().map(|v| v * pow2(-e)).collect();
        let (mean, stddev) = naive(&scaled);
        let n = scaled.len() as f64;
        let mean = mean + scaled.iter().map(|v| v - mean).sum::<f64>() / n;
        (mean * pow2(e), stddev * pow2(e))
    }

    /// Every finite double, each binary exponent about as likely as any other.
    fn any_finite() -> impl Strategy<Value = f64> {
        use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
    }

    /// Values of a few very different magnitudes, mixed: 1e300 beside 1e-300.
    fn mixed_magnitudes() -> impl Strategy<Value = f64> {
        (
            -1.0f64..1.0,
            prop::sample::select(vec![
                f64::MAX,
                1e300,
                1e150,
                1e9,
                1.0,
                1e-9,
                1e-150,
                1e-300,
                f64::MIN_POSITIVE,
            ]),
        )
            .prop_map(|(u, m)| u * m)
    }

    /// The stated error: 1e-9 relative, or 1e-12 of the window's largest magnitude
    /// (what rounding the values themselves costs), whichever is larger.
    fn within(got: f64, want: f64, values: &[f64]) -> bool {
        let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        got.is_finite() && (got - want).abs() <= (1e-9 * want.abs()).max(1e-12 * largest)
    }

    fn check_every_step(values: &[f64], capacity: usize) -> Result<(), TestCaseError> {
        let mut w = Window::new();
        for (i, &x) in values.iter().enumerate() {
            w.push(x, capacity);
            let window = &values[(i + 1).saturating_sub(capacity)..=i];
            let (mean, stddev) = exact(window);
            prop_assert!(
                within(w.mean(), mean, window),
                "mean {:e} vs {:e} at {i}",
                w.mean(),
                mean
            );
            prop_assert!(
                within(w.stddev(), stddev, window),
                "stddev {:e} vs {:e} at {i}",
                w.stddev(),
                stddev
            );
            // The flusher's hand-written encoding is the message, and restores.
            let mut out = Vec::new();
            w.ring.write_snapshot(&w.values, &mut out);
            prop_assert_eq!(out.len(), w.ring.snapshot_len());
            let message = <WindowSnapshot as prost::Message>::decode(out.as_slice());
            prop_assert_eq!(message.as_ref().ok(), Some(&w.to_snapshot()));
            let back = Window::from_snapshot(message.unwrap());
            prop_assert!(
                back.is_ok(),
                "the decoder refused what the encoder wrote: {back:?}"
            );
            prop_assert!(back.unwrap() == w);
        }
        Ok(())
    }

    #[test]
    fn huge_values_do_not_poison_the_window() {
        // One 1e200 among ordinary values, then ordinary values again: the statistics
        // are those of the window, and once it has left they are ordinary again.
        let mut values: Vec<f64> = (0..60).map(|i| 100.0 + f64::from(i % 7)).collect();
        values.insert(20, 1e200);
        values.extend([f64::MAX, -f64::MAX, f64::MAX, 1e-300, -1e-300]);
        values.extend((0..60).map(|i| 1e-300 * f64::from(i % 5)));
        check_every_step(&values, 50).unwrap();
    }

    fn close(got: f64, want: f64, scale: f64) -> bool {
        // Relative error 1e-9; `scale` is the smallest magnitude that counts as
        // relative (a mean of exactly 0 cannot be matched relatively).
        (got - want).abs() <= 1e-9 * want.abs().max(scale)
    }

    #[test]
    fn seed_check() {
        let mut w = Window::new();
        for v in [420.0, 430.0, 410.0, 440.0, 425.0] {
            w.push(v, 50);
        }
        assert_eq!(w.mean(), 425.0);
        assert!((w.stddev() - 10.0).abs() < 1e-12, "{}", w.stddev());
        assert!(((900.0 - w.mean()) / w.stddev() - 47.5).abs() < 1e-9);
    }

    #[test]
    fn evicts_oldest_in_order() {
        let mut w = Window::new();
        for v in 1..=7 {
            w.push(f64::from(v), 3);
        }
        assert_eq!(w.iter().collect::<Vec<_>>(), vec![5.0, 6.0, 7.0]);
        assert_eq!(w.mean(), 6.0);
        let restored = Window::from_values(w.iter(), 3);
        assert_eq!(restored.iter().collect::<Vec<_>>(), vec![5.0, 6.0, 7.0]);
        assert_eq!(restored.mean(), w.mean());
    }

    #[test]
    fn shrinking_capacity_keeps_newest() {
        let w = Window::from_values((1..=10).map(f64::from), 10);
        let mut w2 = w.clone();
        w2.push(11.0, 4);
        assert_eq!(w2.iter().collect::<Vec<_>>(), vec![8.0, 9.0, 10.0, 11.0]);
    }

    #[test]
    fn memory_grows_with_use_not_with_capacity() {
        // A large window that saw a handful of values costs a handful of slots...
        let mut w = Window::new();
        for v in 0..FIRST_SLOTS {
            w.push(v as f64, 1000);
            assert_eq!(w.values.capacity(), FIRST_SLOTS);
            assert_eq!(w.ring.slots(), FIRST_SLOTS);
        }
        // ...and once it fills those, exactly its capacity, allocated once more.
        w.push(1.0, 1000);
        assert_eq!(w.values.capacity(), 1000);
        assert_eq!(w.ring.slots(), 1000);
        // An empty window costs nothing.
        assert_eq!(Window::new().values.capacity(), 0);
    }

    #[test]
    fn small_window_is_allocated_whole_at_its_first_value() {
        // Growing a 50-value window through 4, 8, 16, 32 slots fragmented the heap
        // (1M devices x 2 metrics took 1,635 MiB); a small window is allocated once,
        // at exactly its capacity, and never again.
        let mut w = Window::new();
        w.push(1.0, 50);
        assert_eq!(w.values.capacity(), 50);
        let slots = w.values.as_ptr();
        for v in 0..1000 {
            w.push(f64::from(v), 50);
        }
        assert_eq!(w.values.capacity(), 50);
        assert_eq!(w.values.as_ptr(), slots, "the window was reallocated");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_two_pass(
            capacity in 1usize..=1000,
            scale_exp in -3i32..=9,
            unit in prop::collection::vec(-1.0f64..1.0, 1..3000),
        ) {
            let scale = 10f64.powi(scale_exp);
            let values: Vec<f64> = unit.iter().map(|u| u * scale).collect();
            let mut w = Window::new();
            for (i, &x) in values.iter().enumerate() {
                w.push(x, capacity);
                let start = (i + 1).saturating_sub(capacity);
                let (mean, stddev) = naive(&values[start..=i]);
                // Values are drawn from [-scale, scale]: a mean near 0 is judged
                // relative to the spread of the data, which is what its rounding
                // error is proportional to.
                let floor = scale * 1e-3;
                prop_assert!(close(w.mean(), mean, floor), "mean {} vs {} at {}", w.mean(), mean, i);
                prop_assert!(close(w.stddev(), stddev, floor), "stddev {} vs {} at {}", w.stddev(), stddev, i);
            }
            prop_assert_eq!(w.iter().collect::<Vec<_>>(), values[values.len().saturating_sub(capacity)..].to_vec());
        }

        #[test]
        fn any_finite_values_match_two_pass(
            capacity in 1usize..=200,
            values in prop::collection::vec(any_finite(), 1..400),
        ) {
            check_every_step(&values, capacity)?;
        }

        #[test]
        fn mixed_magnitudes_match_two_pass(
            capacity in 1usize..=200,
            values in prop::collection::vec(mixed_magnitudes(), 1..400),
        ) {
            check_every_step(&values, capacity)?;
        }

        #[test]
        fn large_offset_small_spread(
            capacity in 1usize..=1000,
            offset in -1e9f64..1e9,
            unit in prop::collection::vec(-1.0f64..1.0, 1..2000),
        ) {
            // Values near ±1e9 with a spread of 1e3: the case that breaks naive
            // running sums of squares.
            let values: Vec<f64> = unit.iter().map(|u| offset + u * 1e3).collect();
            let mut w = Window::new();
            for (i, &x) in values.iter().enumerate() {
                w.push(x, capacity);
                let start = (i + 1).saturating_sub(capacity);
                let (mean, stddev) = naive(&values[start..=i]);
                prop_assert!(close(w.mean(), mean, 1.0), "mean {} vs {}", w.mean(), mean);
                // Both computations round the deviations at the magnitude of the
                // values (1e9 · 2⁻⁵² ≈ 2e-7); relative 1e-9 of the stddev is the bar
                // once the spread is not itself at rounding level.
                prop_assert!(close(w.stddev(), stddev, 1.0), "stddev {} vs {}", w.stddev(), stddev);
            }
        }
    }
}
