//! A device as the engine keeps it in memory, and how one sample is judged.
//!
//! Compact on purpose: a million devices × 2 metrics × 50 values must fit in a GiB,
//! and 800 of the ≈1,000 bytes per device are the window values themselves. So the
//! values live in the shard's [`ValuePool`] (exact runs, no allocator rounding), metric
//! names in the shard's [`Names`] (one copy per distinct name, 4 bytes per metric),
//! device ids up to 38 bytes inline (a UUID, or `fleet-eu-west/gw-000123/dev-012345`,
//! is 34–36 bytes), and the first two metrics inline in the device. The
//! owned [`DeviceState`] is what snapshots hold; a device converts to and from it at
//! restore and eviction, and writes exactly its snapshot bytes.

use smallvec::SmallVec;
use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{AnalyzeResponse, MetricStats, Source};

use super::detector::{DetectorKind, DetectorSpec, DetectorState, Episode, RobustState, squash};
use super::device::{DeviceState, MetricFields, MetricState, analyze_response_of, write_device};
use super::holders::NOBODY;
use super::io::MetricOutcome;
use super::names::Names;
use super::pool::ValuePool;
use super::prefetch::prefetch;
use super::window::{Ring, Slots, Window};

/// Longest device id kept inline: a UUID (36 bytes) and the 34–36-byte hierarchical
/// ids of the benchmark fleet fit. On the heap, such an id cost a 48-byte allocation
/// besides the 16-byte pointer; inline it costs 16 bytes more in every device. With
/// 34-byte ids, 1M devices x 2 metrics took 1,041 MiB on the heap and 1,010 MiB inline
/// (BENCHMARKS.md, goal (d)).
pub(crate) const INLINE_ID: usize = 38;

/// A device id: up to [`INLINE_ID`] bytes inline (40 bytes in all, no allocation),
/// longer ones on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeviceId {
    /// A short id.
    Inline {
        /// Bytes used of `bytes`.
        len: u8,
        /// The id's UTF-8 bytes, then zeros.
        bytes: [u8; INLINE_ID],
    },
    /// A long id.
    Heap(Box<str>),
}

impl DeviceId {
    /// The id `id`.
    pub(crate) fn new(id: &str) -> Self {
        if id.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            Self::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(id.into())
        }
    }

    /// Whether this is the id whose bytes are `id`.
    #[inline]
    pub(crate) fn is(&self, id: &[u8]) -> bool {
        match self {
            Self::Inline { len, bytes } => {
                usize::from(*len) == id.len() && same_bytes(&bytes[..id.len()], id)
            }
            Self::Heap(own) => own.as_bytes() == id,
        }
    }

    /// The id's bytes (what hashing reads).
    #[inline]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(id) => id.as_bytes(),
        }
    }

    /// The id.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Built from a `str` in `new`, so always UTF-8.
            Self::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Self::Heap(id) => id,
        }
    }
}

/// Whether `a` and `b` are the same bytes. Ids and names are short, and a `memcmp`
/// call for a few bytes cost more than the comparison: up to 16 bytes compare as two
/// overlapping loads of each, without a call.
#[inline]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    fn first<const N: usize>(s: &[u8]) -> Option<&[u8; N]> {
        s.first_chunk::<N>()
    }
    fn last<const N: usize>(s: &[u8]) -> Option<&[u8; N]> {
        s.last_chunk::<N>()
    }
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        // Positions 0, n/2 and n-1 cover every byte of 1 to 3.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => first::<4>(a) == first::<4>(b) && last::<4>(a) == last::<4>(b),
        8..=16 => first::<8>(a) == first::<8>(b) && last::<8>(a) == last::<8>(b),
        _ => a == b,
    }
}

/// The run of a window's values in a shard's pool, as [`Slots`] for [`Ring::push`].
struct InPool<'a> {
    pool: &'a mut ValuePool,
    at: &'a mut u32,
}

impl Slots for InPool<'_> {
    #[inline]
    fn values(&mut self, slots: usize) -> &mut [f64] {
        self.pool.run_mut(*self.at, slots)
    }

    fn resize(&mut self, slots: usize, keep: usize, to: usize) {
        let new = self.pool.alloc(to as u16);
        for i in 0..keep {
            let v = self.pool.run(*self.at, slots)[i];
            self.pool.run_mut(new, to)[i] = v;
        }
        self.pool.free(*self.at, slots as u16);
        *self.at = new;
    }
}

/// One metric of a device in memory (72 bytes).
#[derive(Debug)]
pub(crate) struct Metric {
    /// The window's statistics and shape; its values are `ring.slots()` slots of the
    /// shard's pool at `at`.
    ring: Ring,
    /// The z-score of the last value.
    last_z: f64,
    /// Anomalous values since this state was created.
    anomalies_total: u64,
    /// The robust detector's state, once a stream used it.
    robust: Option<Box<RobustState>>,
    /// Where the window's values start in the pool.
    at: u32,
    /// The metric's name in the shard's [`Names`].
    pub(crate) name: u32,
    /// Episode: consecutive quiet samples.
    quiet: u32,
    /// Episode: inside one.
    active: bool,
    /// Whether the last value was anomalous.
    last_anomaly: bool,
}

impl Metric {
    /// A metric that has seen nothing yet, named `name` (already interned).
    pub(crate) fn new(name: u32) -> Self {
        Self {
            ring: Ring::default(),
            last_z: 0.0,
            anomalies_total: 0,
            robust: None,
            at: 0,
            name,
            quiet: 0,
            active: false,
            last_anomaly: false,
        }
    }

    /// Judges `x` (seen at `time`, unix seconds) with `spec`'s detector against the
    /// state as it is, then pushes `x`.
    /// For `zscore` this is exactly the seed rule (`docs/architecture.md`, "Engine
    /// semantics"); every detector also keeps the rolling window behind `mean`,
    /// `stddev` and `z_score`.
    #[inline]
    pub(crate) fn observe(
        &mut self,
        x: f64,
        time: i64,
        spec: &DetectorSpec,
        pool: &mut ValuePool,
    ) -> MetricOutcome {
        let n = self.ring.len();
        let mean = self.ring.mean();
        let stddev = self.ring.stddev();
        // Warm-up as `docs/architecture.md` ("Engine semantics") says (a robust stream
        // may ask for a warm-up longer than the rolling window; the z-score it reports
        // then starts once the window is full).
        let z = if n < spec.min_samples.min(spec.window_size.max(1)) {
            0.0
        } else if stddev == 0.0 {
            if x == mean {
                0.0
            } else {
                f64::INFINITY.copysign(x - mean)
            }
        } else {
            let z = (x - mean) / stddev;
            if z.is_finite() {
                z
            } else {
                // x − mean beyond a double (x and mean near opposite ends of the range):
                // halve both first, exactly.
                (x * 0.5 - mean * 0.5) / stddev * 2.0
            }
        };
        let (z, anomaly, score) = match spec.kind {
            DetectorKind::ZScore => {
                let anomaly = n >= spec.min_samples && z.abs() > spec.threshold;
                (z, anomaly, squash(z.abs() / spec.threshold))
            }
            DetectorKind::Robust => {
                let robust = self
                    .robust
                    .get_or_insert_with(|| Box::new(RobustState::new(spec.robust.window)));
                let j = robust.observe(x, time, &spec.robust, spec.threshold, spec.min_samples);
                (z, j.anomaly, j.score)
            }
        };
        let mut episode = self.episode();
        let alert = episode.step(anomaly, score, spec.cooldown);
        (self.active, self.quiet) = (episode.active, episode.quiet);
        self.ring.push(
            x,
            spec.window_size,
            &mut InPool {
                pool,
                at: &mut self.at,
            },
        );
        self.last_z = z;
        self.last_anomaly = anomaly;
        self.anomalies_total += u64::from(anomaly);
        MetricOutcome {
            value: x,
            mean,
            stddev,
            z_score: z,
            anomaly,
            window_count: n as u32,
            score,
            alert,
        }
    }

    /// Where the window's values are in the pool and how many slots they take, to
    /// move them (`None` before the first value).
    pub(crate) fn run_mut(&mut self) -> Option<(&mut u32, usize)> {
        let slots = self.ring.slots();
        (slots > 0).then_some((&mut self.at, slots))
    }

    /// Prefetches the window slot the next value will go to (see [`Ring::next_slot`]),
    /// and the robust detector's state, if the metric has one.
    #[inline]
    pub(crate) fn prefetch_slot(&self, pool: &ValuePool) {
        let slots = self.ring.slots();
        if slots > 0 {
            prefetch(&pool.run(self.at, slots)[self.ring.next_slot()]);
        }
        if let Some(robust) = &self.robust {
            prefetch(&**robust);
        }
    }

    /// Prefetches what the robust detector's state points to (its ring, order and
    /// daily profile), if the metric has one. Reads the state: best after
    /// [`Metric::prefetch_slot`] fetched it.
    #[inline]
    pub(crate) fn prefetch_detector(&self) {
        if let Some(robust) = &self.robust {
            robust.prefetch();
        }
    }

    fn episode(&self) -> Episode {
        Episode {
            active: self.active,
            quiet: self.quiet,
        }
    }

    /// The window's slots.
    fn values<'a>(&self, pool: &'a ValuePool) -> &'a [f64] {
        pool.run(self.at, self.ring.slots())
    }

    /// Takes in a metric from a snapshot: its values move into the pool.
    fn from_state(state: MetricState, pool: &mut ValuePool, names: &mut Names) -> Self {
        let MetricState {
            name,
            window: Window { ring, values },
            last_value: _,
            last_z,
            last_anomaly,
            anomalies_total,
            detector: DetectorState { episode, robust },
        } = state;
        let at = if ring.slots() > 0 {
            let at = pool.alloc(ring.slots() as u16);
            pool.run_mut(at, ring.slots())
                .copy_from_slice(&values[..ring.slots()]);
            at
        } else {
            0
        };
        Self {
            ring,
            last_z,
            anomalies_total,
            robust,
            at,
            name: names.intern(&name),
            quiet: episode.quiet,
            active: episode.active,
            last_anomaly,
        }
    }

    /// The metric as a snapshot holds it. `last_value` is the newest value of the
    /// window (every judged value is pushed), 0 before the first.
    fn to_state(&self, pool: &ValuePool, names: &Names) -> MetricState {
        let values = self.values(pool);
        MetricState {
            name: names.get(self.name).into(),
            window: Window {
                ring: self.ring,
                values: values.to_vec(),
            },
            last_value: self.ring.newest(values),
            last_z: self.last_z,
            last_anomaly: self.last_anomaly,
            anomalies_total: self.anomalies_total,
            detector: DetectorState {
                episode: self.episode(),
                robust: self.robust.clone(),
            },
        }
    }

    /// Gives the values and the name back to the shard.
    fn release(&self, pool: &mut ValuePool, names: &mut Names) {
        if self.ring.slots() > 0 {
            pool.free(self.at, self.ring.slots() as u16);
        }
        names.release(self.name);
    }

    /// The metric's statistics as `Analyze` reports them.
    fn stats(&self, pool: &ValuePool, names: &Names) -> MetricStats {
        MetricStats {
            metric: names.get(self.name).to_owned(),
            rolling_average: self.ring.mean(),
            stddev: self.ring.stddev(),
            window_count: self.ring.len() as u32,
            last_value: self.ring.newest(self.values(pool)),
            last_z_score: self.last_z,
            last_anomaly: self.last_anomaly,
            anomalies_total: self.anomalies_total,
        }
    }
}

/// One device in memory (224 bytes with its first two metrics).
///
/// In declaration order (`repr(C)`), so that [`Device::prefetch`] knows which lines
/// the fields it can name without reading anything fall in: the metrics first (152
/// bytes), the rest in the last 56.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Device {
    /// Metrics in the order they were first seen (at most `MAX_METRICS_PER_DEVICE`).
    pub(crate) metrics: SmallVec<[Metric; 2]>,
    /// The device id (after "" became "default").
    pub(crate) id: DeviceId,
    /// Highest `seq` applied; samples at or below it are duplicates.
    pub(crate) last_seq: u64,
    /// Time of the last applied sample: seconds.
    updated_seconds: i64,
    /// Time of the last applied sample: nanoseconds.
    updated_nanos: i32,
    /// Engine clock tick (seconds since start) of the last sample, for idle eviction.
    pub(crate) last_seen: u32,
    /// Changed since the last snapshot flush.
    pub(crate) dirty: bool,
    /// Samples applied, up to 2: a device at 0 or 1 is on probation, the first to be
    /// evicted when the table is full (`docs/operations.md`, "Memory").
    pub(crate) visits: u8,
    /// The rolling window its metrics are charged for (`budget.rs`).
    pub(crate) window: u16,
    /// The robust baseline its metrics are charged for; 0: none.
    pub(crate) robust_window: u16,
    /// The slot of the principal whose `devices` quota counts it (`holders.rs`);
    /// [`NOBODY`]: none. Sits in what was padding.
    pub(crate) holder: u16,
}

impl Device {
    /// A device with no history.
    pub(crate) fn new(id: &str) -> Self {
        Self {
            id: DeviceId::new(id),
            last_seq: 0,
            updated_seconds: 0,
            updated_nanos: 0,
            last_seen: 0,
            dirty: false,
            visits: 0,
            window: 0,
            robust_window: 0,
            holder: NOBODY,
            metrics: SmallVec::new(),
        }
    }

    /// Applied one more sample (graduates it from probation at the second); whether
    /// this one graduated it.
    #[inline]
    pub(crate) fn visited(&mut self) -> bool {
        if self.visits < 2 {
            self.visits += 1;
            return self.visits == 2;
        }
        false
    }

    /// Prefetches the device's lines: the first (the metrics' length and the first
    /// metric's window), the id's and the last field's. A device spans four lines at
    /// most; the one left out is the second, which the core's adjacent-line
    /// prefetcher fetches with the first.
    #[inline]
    pub(crate) fn prefetch(&self) {
        prefetch(&self.metrics);
        prefetch(&self.id);
        prefetch(&self.dirty);
    }

    /// Records the time of the last applied sample.
    #[inline]
    pub(crate) fn set_updated_at(&mut self, time: Timestamp) {
        self.updated_seconds = time.seconds;
        self.updated_nanos = time.nanos;
    }

    fn updated_at(&self) -> Timestamp {
        Timestamp {
            seconds: self.updated_seconds,
            nanos: self.updated_nanos,
        }
    }

    /// [`Device::metric_index`], trying `hint` first: a device's samples usually
    /// carry the same metrics in the same (ascending) order, so the `i`-th metric of a
    /// sample is usually the device's `i`-th.
    #[inline]
    pub(crate) fn metric_index_from(
        &self,
        name: &[u8],
        hint: usize,
        names: &Names,
    ) -> Option<usize> {
        match self.metrics.get(hint) {
            Some(m) if same_bytes(names.get(m.name).as_bytes(), name) => Some(hint),
            _ => self
                .metrics
                .iter()
                .position(|m| same_bytes(names.get(m.name).as_bytes(), name)),
        }
    }

    /// Takes in a device from a snapshot (clean; the caller sets its clock).
    pub(crate) fn from_state(state: DeviceState, pool: &mut ValuePool, names: &mut Names) -> Self {
        let mut device = Self::new(&state.id);
        device.last_seq = state.last_seq;
        device.set_updated_at(state.updated_at);
        device.dirty = state.dirty;
        // Charged for the windows it holds (a larger one is charged when a stream
        // asks for it); a device with history is no longer on probation.
        device.window = state
            .metrics
            .iter()
            .map(|m| m.window.ring.slots())
            .max()
            .unwrap_or(0) as u16;
        device.robust_window = state
            .metrics
            .iter()
            .filter_map(|m| m.detector.robust.as_ref().map(|r| r.capacity()))
            .max()
            .unwrap_or(0) as u16;
        if !state.metrics.is_empty() || state.last_seq > 0 {
            device.visits = 2;
        }
        device.metrics = state
            .metrics
            .into_iter()
            .map(|m| Metric::from_state(m, pool, names))
            .collect();
        device
    }

    /// The device as a snapshot holds it.
    pub(crate) fn to_state(&self, pool: &ValuePool, names: &Names) -> DeviceState {
        DeviceState {
            id: self.id.as_str().into(),
            last_seq: self.last_seq,
            metrics: self
                .metrics
                .iter()
                .map(|m| m.to_state(pool, names))
                .collect(),
            updated_at: self.updated_at(),
            dirty: self.dirty,
        }
    }

    /// Gives every metric's values and name back to the shard (the device is leaving).
    pub(crate) fn release(&self, pool: &mut ValuePool, names: &mut Names) {
        for metric in &self.metrics {
            metric.release(pool, names);
        }
    }

    /// Appends the device's snapshot message: exactly the bytes of
    /// `self.to_state(..).encode(out)`, without building the copy.
    pub(crate) fn encode(&self, pool: &ValuePool, names: &Names, out: &mut Vec<u8>) {
        write_device(
            out,
            self.id.as_str(),
            self.last_seq,
            &self.updated_at(),
            self.metrics.iter().map(|m| {
                let values = m.values(pool);
                MetricFields {
                    name: names.get(m.name),
                    last_value: m.ring.newest(values),
                    last_z: m.last_z,
                    last_anomaly: m.last_anomaly,
                    anomalies_total: m.anomalies_total,
                    ring: &m.ring,
                    values,
                    episode: m.episode(),
                    robust: m.robust.as_deref(),
                }
            }),
        );
    }

    /// The device's statistics as `Analyze` reports them.
    pub(crate) fn analyze(
        &self,
        pool: &ValuePool,
        names: &Names,
        source: Source,
    ) -> AnalyzeResponse {
        analyze_response_of(
            self.id.as_str(),
            self.metrics.iter().map(|m| m.stats(pool, names)).collect(),
            self.updated_at(),
            self.last_seq,
            source,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stay_compact() {
        // The budget behind "1M devices x 2 metrics in 1 GiB": 800 bytes of values,
        // 224 bytes of device, 9 to 18 bytes of index per device.
        assert_eq!(std::mem::size_of::<DeviceId>(), 40);
        assert_eq!(std::mem::size_of::<Metric>(), 72);
        assert_eq!(std::mem::size_of::<Device>(), 224);
    }

    #[test]
    fn ids_compare_and_print_inline_and_on_the_heap() {
        for id in [
            "",
            "d",
            "exactly-38-bytes-long-device-id-000001",
            "thirty-nine-bytes-long-device-id-000001",
            &"x".repeat(128),
        ] {
            let d = DeviceId::new(id);
            assert_eq!(d.as_str(), id);
            assert_eq!(d.as_bytes(), id.as_bytes());
            assert_eq!(matches!(d, DeviceId::Inline { .. }), id.len() <= INLINE_ID);
            assert!(d.is(id.as_bytes()));
        }
        // Same length, other bytes; a prefix; inline against heap.
        assert!(!DeviceId::new("sensor-1").is(b"sensor-2"));
        assert!(!DeviceId::new("sensor-1").is(b"sensor-"));
        let long = "x".repeat(60);
        assert!(!DeviceId::new(&long).is(b"x"));
        assert!(!DeviceId::new("x").is(long.as_bytes()));
        assert!(!DeviceId::new(&long).is("x".repeat(41).as_bytes()));
        assert!(!DeviceId::new("exactly-22-bytes-long!").is(b"exactly-22-bytes-long?"));
        assert_eq!(DeviceId::new("é-capteur").as_str(), "é-capteur");
    }

    #[test]
    fn same_bytes_compares_every_byte_of_every_length() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
            assert!(same_bytes(&a, &a.clone()), "{n}");
            for i in 0..n {
                let mut b = a.clone();
                b[i] ^= 0x20;
                assert!(!same_bytes(&a, &b), "length {n}, byte {i} differs");
            }
            assert!(!same_bytes(&a, &a[..n.saturating_sub(1)]) || n == 0);
        }
    }
}
