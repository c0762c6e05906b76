//! The detection engine: per (device, metric) rolling windows, sharded by device id.
//!
//! Every transport (gRPC `Ingest`, the HTTP gateway, snapshot restore) goes through
//! [`Engine`]. It is synchronous on purpose: each call locks one shard for the time
//! it takes to judge one sample (well under a microsecond) and never awaits.

pub mod detector;
mod device;
mod index;
mod io;
mod names;
mod pool;
mod prefetch;
mod resident;
mod shard;
mod window;

use std::{
    hash::BuildHasher,
    sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{AnalyzeResponse, DetectorConfig, Sample, Source, Verdict},
};

pub use detector::{DetectorDefaults, DetectorKind, DetectorSpec, DetectorState, RobustParams};
pub use device::{DeviceState, MetricState};
pub(crate) use io::text;
pub use io::{MetricOutcome, SampleLike, Tee, VerdictSink};
use resident::{Device, Metric};
use shard::{Shard, Table};
use smallvec::SmallVec;
pub use window::{MAX_WINDOW_SIZE, Window};

use crate::error::{ApiError, SampleError};

/// The shard locks a message holds: every shard's in shard order, or none.
type Held<'a> = SmallVec<[Guard<'a>; 4]>;

/// A locked shard's table.
type Guard<'a> = std::sync::MutexGuard<'a, Table>;

/// The device id a sample without one belongs to (the seed clients send none).
pub const DEFAULT_DEVICE: &str = "default";

/// Engine settings (DESIGN §3); each is a flag and an environment variable.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Values kept per (device, metric).
    pub window_size: usize,
    /// Values needed before a value can be an anomaly.
    pub min_samples: usize,
    /// |z| strictly above this is an anomaly.
    pub z_threshold: f64,
    /// Number of shards of the device table.
    pub shards: usize,
    /// A message of at least as many samples as there are shards takes every shard's
    /// lock once (let go and taken again every [`HOLD_SAMPLES`] samples) instead of a
    /// lock per sample. Default: on when the process may run on one core, where no
    /// second runtime worker waits for a shard meanwhile. With one shard, a message
    /// always holds its lock.
    pub hold_shards: bool,
    /// Devices held in memory at most; a new device beyond it is refused per sample.
    pub max_devices: usize,
    /// Distinct metrics per device at most.
    pub max_metrics_per_device: usize,
    /// How far a `seq` may jump past its device's last one (`MAX_SEQ_JUMP`).
    pub max_seq_jump: u64,
    /// How far a `seq` may run ahead of the server's clock in microseconds when it
    /// jumps further than `max_seq_jump` (`MAX_SEQ_CLOCK_SKEW`).
    pub max_seq_clock_skew: Duration,
    /// Longest device id, in bytes.
    pub max_device_id_len: usize,
    /// Longest metric name, in bytes.
    pub max_metric_name_len: usize,
    /// A device without samples for this long is evicted from memory.
    pub idle_timeout: Duration,
    /// Detector of streams that name none (`DETECTOR`).
    pub detector: DetectorKind,
    /// Quiet samples that end an anomalous episode (`ALERT_COOLDOWN`).
    pub alert_cooldown: u32,
    /// Settings of the `robust` detector (`ROBUST_*`).
    pub robust: RobustParams,
    /// Instantaneous robust-z threshold of the `robust` detector (`ROBUST_THRESHOLD`).
    pub robust_threshold: f64,
    /// Warm-up of the `robust` detector (`ROBUST_MIN_SAMPLES`).
    pub robust_min_samples: usize,
}

impl EngineConfig {
    /// The detector settings streams are resolved against.
    pub fn detector_defaults(&self) -> DetectorDefaults {
        DetectorDefaults {
            kind: self.detector,
            window_size: self.window_size.max(1),
            min_samples: self.min_samples,
            z_threshold: self.z_threshold,
            cooldown: self.alert_cooldown,
            robust: self.robust,
            robust_threshold: self.robust_threshold,
            robust_min_samples: self.robust_min_samples,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        // Read once: on Linux it reads the process's affinity and cgroup CPU quota.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            window_size: 50,
            min_samples: 5,
            z_threshold: 2.0,
            shards: 4 * cores,
            hold_shards: cores == 1,
            max_devices: 1_000_000,
            max_metrics_per_device: 32,
            max_seq_jump: 1 << 32,
            max_seq_clock_skew: Duration::from_secs(3600),
            max_device_id_len: 128,
            max_metric_name_len: 64,
            idle_timeout: Duration::from_secs(3600),
            detector: DetectorKind::ZScore,
            alert_cooldown: detector::DEFAULT_COOLDOWN,
            robust: RobustParams::default(),
            robust_threshold: detector::robust::DEFAULT_THRESHOLD,
            robust_min_samples: detector::robust::DEFAULT_MIN_SAMPLES,
        }
    }
}

/// Counts of one `ingest_batch` call, for metrics (recorded once per message).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Samples applied to a window.
    pub applied: u64,
    /// Samples whose verdict is an anomaly.
    pub anomalies: u64,
    /// Samples recognized as duplicates.
    pub duplicates: u64,
    /// Samples rejected with an error.
    pub rejected: u64,
    /// Rejected samples by reason (index into [`SampleError::REASONS`]).
    pub rejected_by_reason: [u64; SampleError::REASONS.len()],
}

/// One metric of a sample being judged.
struct SampleMetric<'a> {
    /// The name's bytes.
    name: &'a [u8],
    /// The value.
    value: f64,
    /// Its index in the device's metrics, once known (`None` for a new metric).
    index: Option<usize>,
}

/// Samples judged at most under one hold of the shards' locks (`SHARDS=1`, or
/// [`EngineConfig::hold_shards`]): about 20 µs of work, what another stream may wait.
const HOLD_SAMPLES: usize = 128;

/// How many samples ahead of the one being judged a message's samples are looked at.
/// A sample's lines are fetched in three steps, each needing the previous one's line:
/// its index bucket when it enters the look-ahead, its device's lines
/// [`DEVICE_AT`] samples before it is judged, its window slots [`SLOTS_AT`] before.
/// Each step has a few samples' judging time (a few hundred nanoseconds each) for
/// its lines to arrive. With a lock per sample only the last step runs (see
/// [`Engine::prefetch`]).
const LOOK: usize = 8;

/// Slots of the look-ahead queue: room for the `LOOK + 1` samples between entering
/// and being judged, rounded up so that a sample's slot is a mask, not a division.
const QUEUE: usize = (LOOK + 1).next_power_of_two();

/// A sample in the look-ahead (see [`Engine::ingest_batch_with`]).
struct Queued<S> {
    sample: S,
    /// Its normalized device id's hash.
    hash: u64,
    /// Its shard's index.
    shard: usize,
    /// Its device's position, as the window slots' step found it with the locks held.
    found: Option<usize>,
}

/// Samples ahead of the judged one whose device lines are prefetched.
const DEVICE_AT: usize = 5;

/// Samples ahead of the judged one whose window slots are prefetched.
const SLOTS_AT: usize = 2;

/// The look-ahead steps (see [`LOOK`]).
#[derive(Debug, Clone, Copy)]
enum Prefetch {
    /// The index bucket the device's lookup starts at.
    Index,
    /// The lines of the device the index names.
    Device,
    /// The window slots the sample's values will replace.
    Slots,
}

/// What [`Engine::ingest_one`] did with a sample it did not refuse.
enum Judged {
    /// Judged (a verdict or a duplicate was written).
    Yes,
    /// Not judged: its device is not in memory and the caller asked to stop there.
    UnknownDevice,
}

/// The sharded device table and the detector settings.
#[derive(Debug)]
pub struct Engine {
    /// The settings this engine was built with.
    config: EngineConfig,
    /// Detector settings that stream specs are resolved against.
    detectors: DetectorDefaults,
    /// The shards; a device lives in `shards[hash % len]`.
    shards: Box<[Shard]>,
    /// Devices in memory, for `MAX_DEVICES` and the devices gauge.
    devices: AtomicUsize,
    /// Hasher for device ids (fixed seed: shard placement is stable within a process).
    hasher: foldhash::fast::FixedState,
    /// Start of the engine clock that idle eviction counts in.
    epoch: Instant,
    /// Unix time of `epoch` in nanoseconds, as of the last re-anchoring: receive times
    /// are this plus the monotonic time since `epoch`, so a message reads the clock
    /// once (see [`Engine::clock`]).
    wall_at_epoch: AtomicI64,
    /// The tick (second of the engine clock) `wall_at_epoch` was last taken in;
    /// `u32::MAX` before the first message.
    wall_tick: AtomicU32,
}

impl Engine {
    /// An empty engine.
    pub fn new(config: EngineConfig) -> Self {
        let hasher = foldhash::fast::FixedState::with_seed(0x7469_6465_7761_7463);
        let shards = (0..config.shards.max(1))
            .map(|_| Shard::new(hasher.clone()))
            .collect();
        Self {
            detectors: config.detector_defaults(),
            config,
            shards,
            devices: AtomicUsize::new(0),
            hasher,
            epoch: Instant::now(),
            wall_at_epoch: AtomicI64::new(0),
            wall_tick: AtomicU32::new(u32::MAX),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The server's default detector (what a stream without a `detector` section gets).
    pub fn default_detector(&self) -> DetectorSpec {
        self.detectors.default_spec()
    }

    /// Resolves a stream's or request's detector section against the server's
    /// settings: `None` is the default; an unknown name is `InvalidArgument`.
    pub fn detector(&self, config: Option<&DetectorConfig>) -> Result<DetectorSpec, ApiError> {
        self.detectors.resolve(config)
    }

    /// Devices currently in memory.
    pub fn device_count(&self) -> usize {
        self.devices.load(Ordering::Relaxed)
    }

    /// Whether the device is in memory.
    pub fn contains(&self, device_id: &str) -> bool {
        let id = normalize_device_id(device_id).as_bytes();
        let hash = self.hash_id(id);
        self.shard(hash).lock().find(hash, id).is_some()
    }

    /// The hash of a device id (the shard's index hashes the same bytes).
    #[inline]
    fn hash_id(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[self.shard_index(hash)]
    }

    fn shard_index(&self, hash: u64) -> usize {
        // The high 32 bits pick the shard (the shard's index uses the low 32),
        // scaled to the shard count by a multiplication instead of a division.
        (((hash >> 32) * self.shards.len() as u64) >> 32) as usize
    }

    fn tick(&self) -> u32 {
        self.epoch.elapsed().as_secs().min(u64::from(u32::MAX - 1)) as u32
    }

    /// The engine tick (for idle eviction) and the wall-clock receive time of a
    /// message received at `now`, from that one monotonic clock read. The wall clock
    /// itself is read once per second of the engine clock (to follow adjustments of
    /// the system time); in between, the receive time is the last reading plus the
    /// monotonic time since, which differs from a fresh reading only by the clock's
    /// slew within that second.
    fn clock(&self, now: Instant) -> (Timestamp, u32) {
        let since = now.saturating_duration_since(self.epoch);
        let tick = since.as_secs().min(u64::from(u32::MAX - 1)) as u32;
        let since_nanos = i64::try_from(since.as_nanos()).unwrap_or(i64::MAX);
        let wall_at_epoch = if self.wall_tick.load(Ordering::Relaxed) == tick {
            self.wall_at_epoch.load(Ordering::Relaxed)
        } else {
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let at_epoch = i64::try_from(wall)
                .unwrap_or(i64::MAX)
                .saturating_sub(since_nanos);
            self.wall_at_epoch.store(at_epoch, Ordering::Relaxed);
            self.wall_tick.store(tick, Ordering::Relaxed);
            at_epoch
        };
        let wall = wall_at_epoch.saturating_add(since_nanos);
        let received = Timestamp {
            seconds: wall.div_euclid(1_000_000_000),
            nanos: wall.rem_euclid(1_000_000_000) as i32,
        };
        (received, tick)
    }

    /// Judges every sample of a request, appending one verdict per sample to `out`, in
    /// order, with `detector` (see [`Engine::detector`]). Samples that fail validation
    /// get an error verdict and change nothing.
    pub fn ingest_batch(
        &self,
        samples: &[Sample],
        detector: &DetectorSpec,
        out: &mut Vec<Verdict>,
    ) -> BatchOutcome {
        self.ingest_batch_at(samples, detector, out, Instant::now())
    }

    /// [`Engine::ingest_batch`] for any samples and any verdict sink, for a request
    /// received at `received` (the caller's one clock read of the message; it gives
    /// the idle tick and the receive time).
    pub fn ingest_batch_at<S: SampleLike>(
        &self,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        out: &mut impl VerdictSink,
        received: Instant,
    ) -> BatchOutcome {
        self.ingest_batch_with(samples, detector, out, received, false)
            .0
    }

    /// [`Engine::ingest_batch_at`], returning also how many samples were judged. With
    /// `stop_at_unknown`, it stops at the first sample of a device that is not in
    /// memory (and could be: the device limit is not reached), before judging it. With
    /// snapshots, such a device must be restored first; the caller restores it and
    /// judges the rest. One pass: the lookup that finds a device is the one that
    /// judges its sample.
    pub fn ingest_batch_with<S: SampleLike>(
        &self,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        out: &mut impl VerdictSink,
        received: Instant,
        stop_at_unknown: bool,
    ) -> (BatchOutcome, usize) {
        let (now, tick) = self.clock(received);
        let mut outcome = BatchOutcome::default();
        let mut samples = samples.into_iter();
        out.reserve(samples.len());
        let mut judged = 0;
        // With one shard every sample needs its lock: it is taken once for the
        // message. A lock and an unlock per sample are two atomic read-modify-writes,
        // each a full barrier, so one sample's cache misses could not overlap the
        // next one's (measured: 5-9 % less server CPU per sample at 100 samples per
        // message, `SHARDS=1`). It is let go every [`HOLD_SAMPLES`] samples, so that a
        // large batch does not keep other streams waiting for all of its time. With
        // more shards and `hold_shards` (one core), a message of at least as many
        // samples as shards takes every shard's lock the same way (measured: see
        // BENCHMARKS.md, session 7); otherwise each sample locks its own.
        let hold = self.shards.len() == 1
            || (self.config.hold_shards && samples.len() >= self.shards.len());
        let mut held: Held<'_> = if hold {
            self.shards.iter().map(Shard::lock).collect()
        } else {
            Held::new()
        };
        // Read through a plain slice: every access to the `SmallVec` itself first
        // checks where its items are (measured: about 40 instructions per sample).
        let mut tables: &mut [Guard<'_>] = &mut held;
        // Samples are looked ahead of the one being judged, in up to three steps that
        // each prefetch what the next one will read (see `LOOK`), so that one sample's
        // cache misses overlap the judging of the samples before it. Sample `k` sits
        // in `queue[k % QUEUE]` with its id's hash from when it entered (at step `k`)
        // until it is judged (at step `k + LOOK`), and, while the locks are held, its
        // device's position as the window slots' step found it (the judging does not
        // look the device up again: no device leaves a locked table).
        let mut queue: [Option<Queued<S>>; QUEUE] = std::array::from_fn(|_| None);
        let (mut entered, mut exhausted) = (0, false);
        let mut step = 0;
        loop {
            if !exhausted {
                match samples.next() {
                    Some(sample) => {
                        let hash = self.hash_id(normalize_id(sample.device_id()));
                        let queued = Queued {
                            sample,
                            hash,
                            shard: self.shard_index(hash),
                            found: None,
                        };
                        self.prefetch(tables, Prefetch::Index, &queued);
                        queue[entered % QUEUE] = Some(queued);
                        entered += 1;
                    }
                    None => {
                        exhausted = true;
                        // Nothing left to look ahead at: judge what is queued now.
                        step = step.max(LOOK);
                    }
                }
            }
            for (stage, at) in [(Prefetch::Device, DEVICE_AT), (Prefetch::Slots, SLOTS_AT)] {
                if let Some(k) = (step + at).checked_sub(LOOK).filter(|&k| k < entered)
                    && let Some(queued) = &mut queue[k % QUEUE]
                {
                    let found = self.prefetch(tables, stage, queued);
                    if !tables.is_empty() {
                        queued.found = found;
                    }
                }
            }
            step += 1;
            let Some(j) = (step - 1).checked_sub(LOOK) else {
                continue;
            };
            let Some(Queued {
                sample,
                hash,
                shard: index,
                mut found,
            }) = queue[j % QUEUE].take()
            else {
                break;
            };
            if judged % HOLD_SAMPLES == HOLD_SAMPLES - 1 && !tables.is_empty() {
                // Every lock let go, then taken again in shard order: meanwhile other
                // threads may have evicted devices, so positions found are stale.
                held.clear();
                held.extend(self.shards.iter().map(Shard::lock));
                tables = &mut held;
                found = None;
                for queued in queue.iter_mut().flatten() {
                    queued.found = None;
                }
            }
            let id = normalize_id(sample.device_id());
            let mut own;
            let table = match tables.get_mut(index) {
                Some(table) => &mut **table,
                None => {
                    own = self.shards[index].lock();
                    &mut *own
                }
            };
            match self.ingest_one(
                table,
                &sample,
                (id, hash, found),
                detector,
                &now,
                tick,
                out,
                &mut outcome,
                stop_at_unknown,
            ) {
                Ok(Judged::Yes) => {}
                Ok(Judged::UnknownDevice) => break,
                Err(error) => {
                    outcome.rejected += 1;
                    outcome.rejected_by_reason[error.index()] += 1;
                    out.error(id, sample.seq(), &error);
                }
            }
            judged += 1;
        }
        (outcome, judged)
    }

    /// One look-ahead step for a queued sample, in its shard's table: in `held`
    /// (every shard, locked for the message) or locked for the step.
    /// The window slots' step returns the position of the sample's device, if it is
    /// in the table.
    #[inline]
    fn prefetch<S: SampleLike>(
        &self,
        held: &[Guard<'_>],
        step: Prefetch,
        queued: &Queued<S>,
    ) -> Option<usize> {
        let Queued {
            sample,
            hash,
            shard,
            ..
        } = queued;
        let own;
        let table = match (held.get(*shard), step) {
            (Some(table), _) => &**table,
            // With a lock per sample, every step takes the sample's shard lock once
            // more: two more atomic read-modify-writes, each a full barrier. Only the
            // window slots' step pays for them (measured at a million devices: see
            // BENCHMARKS.md, session 6).
            (None, Prefetch::Slots) => {
                own = self.shards[*shard].lock();
                &*own
            }
            (None, Prefetch::Index | Prefetch::Device) => return None,
        };
        match step {
            Prefetch::Index => table.prefetch_index(*hash),
            Prefetch::Device => table.prefetch_device(*hash),
            Prefetch::Slots => return table.prefetch_for(*hash, normalize_id(sample.device_id())),
        }
        None
    }

    /// Judges one sample (DESIGN §3) with normalized device id `id`, its hash, and
    /// `found`, its device's position if a look-ahead found it under the same lock,
    /// in its shard's locked `table`, into `out`, and counts it in `outcome`; or
    /// refuses it (the caller writes the error verdict). Validation
    /// happens before anything is changed, in the order of the sample's metrics
    /// (name, then value), and a sample that is refused never creates its device.
    #[allow(clippy::too_many_arguments)]
    fn ingest_one(
        &self,
        table: &mut Table,
        sample: &impl SampleLike,
        (id, hash, found): (&[u8], u64, Option<usize>),
        detector: &DetectorSpec,
        received: &Timestamp,
        tick: u32,
        out: &mut impl VerdictSink,
        outcome: &mut BatchOutcome,
        stop_at_unknown: bool,
    ) -> Result<Judged, SampleError> {
        if id.len() > self.config.max_device_id_len {
            return Err(SampleError::DeviceIdTooLong {
                len: id.len(),
                limit: self.config.max_device_id_len,
            });
        }
        let count = sample.metric_count();
        if count == 0 {
            return Err(SampleError::NoMetrics);
        }
        if count > self.config.max_metrics_per_device {
            return Err(SampleError::TooManyMetrics {
                device: io::text(id),
                count,
                limit: self.config.max_metrics_per_device,
            });
        }
        // The sample's metrics, read once, each with its index in the device's
        // metrics once known.
        // Filled in place and read by reference: collecting it returned it by value,
        // and it was moved again by the loop below, two copies of its 320 bytes per
        // sample.
        let mut metrics: SmallVec<[SampleMetric<'_>; 8]> = SmallVec::new();
        metrics.extend(sample.metrics().map(|(name, value)| SampleMetric {
            name,
            value,
            index: None,
        }));
        let found = found.or_else(|| table.find(hash, id));
        let mut new_metrics = 0;
        for (i, SampleMetric { name, value, index }) in metrics.iter_mut().enumerate() {
            // A name the device already has was validated when it was added.
            *index = found.and_then(|p| table.device(p).metric_index_from(name, i, &table.names));
            if index.is_none() {
                validate_metric_name(name, self.config.max_metric_name_len)?;
                new_metrics += 1;
            }
            if !value.is_finite() {
                return Err(SampleError::InvalidValue {
                    metric: io::text(name),
                    value: *value,
                });
            }
        }
        let seq = sample.seq();
        if seq > 0 {
            let last = found.map_or(0, |p| table.device(p).last_seq);
            if seq > last.saturating_add(self.config.max_seq_jump) {
                self.check_seq_against_clock(seq, last, received)?;
            }
        }
        let pos = match found {
            Some(pos) => pos,
            None => {
                if self.devices.load(Ordering::Relaxed) >= self.config.max_devices {
                    return Err(SampleError::DeviceLimit {
                        limit: self.config.max_devices,
                    });
                }
                if stop_at_unknown {
                    return Ok(Judged::UnknownDevice);
                }
                self.devices.fetch_add(1, Ordering::Relaxed);
                let device = match std::str::from_utf8(id) {
                    Ok(id) => Device::new(id),
                    // Not reached: every SampleLike hands over UTF-8 (its decoder
                    // checked it).
                    Err(_) => Device::new(&io::text(id)),
                };
                table.insert(hash, device)
            }
        };
        let (device, pool, names) = table.entry(pos);
        device.last_seen = tick;
        if seq > 0 && seq <= device.last_seq {
            outcome.duplicates += 1;
            out.duplicate(id, seq);
            return Ok(Judged::Yes);
        }
        if new_metrics > 0
            && device.metrics.len() + new_metrics > self.config.max_metrics_per_device
        {
            return Err(SampleError::TooManyMetrics {
                device: io::text(id),
                count: device.metrics.len() + new_metrics,
                limit: self.config.max_metrics_per_device,
            });
        }
        out.begin(id, seq, count);
        let (mut anomaly, mut alert, mut score) = (false, false, 0.0f64);
        let time = sample.time().unwrap_or(*received);
        for &SampleMetric { name, value, index } in &metrics {
            let index = match index {
                Some(index) => index,
                None => {
                    // Room for exactly the new metrics, once per device and sample.
                    if device.metrics.len() == device.metrics.capacity() {
                        device.metrics.reserve_exact(new_metrics);
                    }
                    // Validated above: ASCII.
                    let name = std::str::from_utf8(name).unwrap_or_default();
                    device.metrics.push(Metric::new(names.intern(name)));
                    device.metrics.len() - 1
                }
            };
            let metric = device.metrics[index].observe(value, time.seconds, detector, pool);
            anomaly |= metric.anomaly;
            alert |= metric.alert;
            score = score.max(metric.score);
            out.metric(name, &metric);
        }
        out.end(anomaly, alert, score);
        outcome.applied += 1;
        outcome.anomalies += u64::from(anomaly);
        if seq > 0 {
            device.last_seq = seq;
        }
        device.set_updated_at(time);
        device.dirty = true;
        Ok(Judged::Yes)
    }

    /// The slow half of the `seq` rule (docs/architecture.md, "Engine semantics"): a
    /// `seq` past its device's last plus `MAX_SEQ_JUMP` is still accepted up to the
    /// server's clock (`received`) in microseconds plus `MAX_SEQ_CLOCK_SKEW`.
    #[cold]
    fn check_seq_against_clock(
        &self,
        seq: u64,
        last: u64,
        received: &Timestamp,
    ) -> Result<(), SampleError> {
        let now_us = u64::try_from(received.seconds)
            .unwrap_or(0)
            .saturating_mul(1_000_000)
            .saturating_add(u64::try_from(received.nanos / 1000).unwrap_or(0));
        let skew = u64::try_from(self.config.max_seq_clock_skew.as_micros()).unwrap_or(u64::MAX);
        let limit = now_us
            .saturating_add(skew)
            .max(last.saturating_add(self.config.max_seq_jump));
        if seq > limit {
            return Err(SampleError::InvalidSeq { seq, last, limit });
        }
        Ok(())
    }

    /// Current statistics of a device in memory, or `None`.
    pub fn analyze(&self, device_id: &str) -> Option<AnalyzeResponse> {
        let id = normalize_device_id(device_id).as_bytes();
        let hash = self.hash_id(id);
        let table = self.shard(hash).lock();
        let pos = table.find(hash, id)?;
        Some(
            table
                .device(pos)
                .analyze(&table.pool, &table.names, Source::Memory),
        )
    }

    /// A copy of a device's state in memory, as a snapshot would hold it.
    pub fn device_state(&self, device_id: &str) -> Option<DeviceState> {
        let id = normalize_device_id(device_id).as_bytes();
        let hash = self.hash_id(id);
        let table = self.shard(hash).lock();
        let pos = table.find(hash, id)?;
        Some(table.device(pos).to_state(&table.pool, &table.names))
    }

    /// Inserts a device's state unless the device is already in memory (a restore
    /// racing with a first sample loses to the sample). Returns whether it was inserted.
    pub fn insert_if_absent(&self, state: DeviceState) -> bool {
        let hash = self.hash_id(state.id.as_bytes());
        let mut table = self.shard(hash).lock();
        if table.find(hash, state.id.as_bytes()).is_some() {
            return false;
        }
        if self.devices.load(Ordering::Relaxed) >= self.config.max_devices {
            return false;
        }
        let table = &mut *table;
        let mut device = Device::from_state(state, &mut table.pool, &mut table.names);
        device.last_seen = self.tick();
        self.devices.fetch_add(1, Ordering::Relaxed);
        table.insert(hash, device);
        true
    }

    /// Marks every device in memory dirty (the next flush writes them all).
    pub fn mark_all_dirty(&self) {
        for shard in &self.shards {
            for device in shard.lock().iter_mut() {
                device.dirty = true;
            }
        }
    }

    /// Removes devices idle for longer than `IDLE_TIMEOUT` (as of `now`, an instant
    /// of the engine clock) and returns them so that the caller can write their
    /// final snapshot.
    pub fn evict_idle(&self, now: Instant) -> Vec<DeviceState> {
        self.evict_idle_if(now, true)
    }

    /// Like [`Engine::evict_idle`], but keeps devices whose latest state is not in a
    /// snapshot yet (dirty). With snapshots on, the flusher writes first and evicts
    /// after, so an evicted device's newest state is in Redis before it leaves memory
    /// and a restore can never read an older one.
    pub fn evict_idle_flushed(&self, now: Instant) -> Vec<DeviceState> {
        self.evict_idle_if(now, false)
    }

    fn evict_idle_if(&self, now: Instant, evict_dirty: bool) -> Vec<DeviceState> {
        let now_tick = now.saturating_duration_since(self.epoch).as_secs();
        let idle = self.config.idle_timeout.as_secs();
        let mut evicted = Vec::new();
        for shard in &self.shards {
            let mut table = shard.lock();
            let mut pos = 0;
            while pos < table.len() {
                let device = table.device(pos);
                if now_tick.saturating_sub(u64::from(device.last_seen)) < idle
                    || (device.dirty && !evict_dirty)
                {
                    pos += 1;
                    continue;
                }
                // The last device moves into `pos`: look at `pos` again.
                let device = table.remove(pos);
                evicted.push(device.to_state(&table.pool, &table.names));
                let table = &mut *table;
                device.release(&mut table.pool, &mut table.names);
            }
        }
        self.devices.fetch_sub(evicted.len(), Ordering::Relaxed);
        evicted
    }

    /// Number of shards (the snapshot flusher walks them one at a time).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Appends the keys of the dirty devices of shard `shard` to `out`. The lock is
    /// held for one pass over the shard reading a flag per device, no copying.
    pub fn dirty_keys(&self, shard: usize, out: &mut Vec<DeviceKey>) {
        if let Some(shard) = self.shards.get(shard) {
            let table = shard.lock();
            out.extend(
                table
                    .iter()
                    .filter(|d| d.dirty)
                    .map(|d| DeviceKey(self.hasher.hash_one(d.id.as_bytes()))),
            );
        }
    }

    /// Runs `f` on each device of `keys` (all of shard `shard`, from
    /// [`Engine::dirty_keys`]) that is still dirty, under one lock of that shard. `f`
    /// must be quick (an encode into a buffer), and usually marks it clean.
    pub fn visit_dirty(
        &self,
        shard: usize,
        keys: &[DeviceKey],
        mut f: impl FnMut(DirtyDevice<'_>),
    ) {
        let Some(shard) = self.shards.get(shard) else {
            return;
        };
        let mut table = shard.lock();
        let mut positions: SmallVec<[usize; 2]> = SmallVec::new();
        for &DeviceKey(hash) in keys {
            positions.clear();
            positions.extend(table.find_hash(hash));
            for &pos in &positions {
                let (device, pool, names) = table.entry(pos);
                if device.dirty {
                    f(DirtyDevice {
                        device,
                        pool,
                        names,
                        key: DeviceKey(hash),
                    });
                }
            }
        }
    }

    /// Marks devices dirty again (their snapshot write failed, so the next flush
    /// retries them). Devices that left memory meanwhile are skipped.
    pub fn mark_dirty(&self, keys: &[DeviceKey]) {
        let mut positions: SmallVec<[usize; 2]> = SmallVec::new();
        for &DeviceKey(hash) in keys {
            let mut table = self.shard(hash).lock();
            positions.clear();
            positions.extend(table.find_hash(hash));
            for &pos in &positions {
                table.entry(pos).0.dirty = true;
            }
        }
    }
}

/// A dirty device the snapshot flusher visits (see [`Engine::visit_dirty`]).
#[derive(Debug)]
pub struct DirtyDevice<'a> {
    device: &'a mut Device,
    pool: &'a pool::ValuePool,
    names: &'a names::Names,
    key: DeviceKey,
}

impl DirtyDevice<'_> {
    /// The device id.
    pub fn id(&self) -> &str {
        self.device.id.as_str()
    }

    /// Appends the device as [`DeviceState::encode`] would.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.device.encode(self.pool, self.names, out);
    }

    /// The device's key, for [`Engine::mark_dirty`].
    pub fn key(&self) -> DeviceKey {
        self.key
    }

    /// Marks the device clean (its state is on its way to a snapshot).
    pub fn mark_clean(&mut self) {
        self.device.dirty = false;
    }
}

/// Names a device in memory by the hash of its id: cheap to collect for a million
/// devices. Two ids with one hash are both visited, which is harmless (an extra
/// snapshot write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKey(u64);

/// The `AnalyzeResponse` of a device state.
pub fn analyze_response(device: &DeviceState, source: Source) -> AnalyzeResponse {
    device::analyze_response_of(
        &device.id,
        device.metrics.iter().map(MetricState::stats).collect(),
        device.updated_at,
        device.last_seq,
        source,
    )
}

/// `""` is the default device.
pub fn normalize_device_id(id: &str) -> &str {
    if id.is_empty() { DEFAULT_DEVICE } else { id }
}

/// [`normalize_device_id`] for an id's bytes.
#[inline]
fn normalize_id(id: &[u8]) -> &[u8] {
    if id.is_empty() {
        DEFAULT_DEVICE.as_bytes()
    } else {
        id
    }
}

/// Metric names are 1..=`limit` bytes of `[A-Za-z0-9_.:-]` (`name` is UTF-8).
pub fn validate_metric_name(name: &[u8], limit: usize) -> Result<(), SampleError> {
    if name.is_empty() || name.len() > limit {
        return Err(SampleError::InvalidMetricName {
            name: io::text(name),
            reason: format!("must be 1 to {limit} bytes"),
        });
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
    if !name.iter().all(allowed) {
        // The message names the character, not the byte (it may be multi-byte).
        let name = io::text(name);
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

/// The current wall-clock time as a protobuf timestamp.
pub fn now_timestamp() -> Timestamp {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A prost sample (also used by the wire codec's tests).
    pub(crate) fn sample(device: &str, seq: u64, metrics: &[(&str, f64)]) -> Sample {
        Sample {
            device_id: device.into(),
            time: None,
            metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            seq,
        }
    }

    fn ingest(engine: &Engine, s: Sample) -> Verdict {
        let mut out = Vec::new();
        engine.ingest_batch(&[s], &engine.default_detector(), &mut out);
        out.pop().unwrap()
    }

    #[test]
    fn one_clock_read_gives_wall_receive_time_and_tick() {
        let engine = Engine::new(EngineConfig::default());
        let before = now_timestamp();
        let now = Instant::now();
        let (received, tick) = engine.clock(now);
        let after = now_timestamp();
        let nanos = |t: &Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
        // Anchored in this very call: between two wall-clock readings around it.
        assert!(nanos(&before) <= nanos(&received) && nanos(&received) <= nanos(&after));
        assert_eq!(tick, engine.tick());
        // Later reads in the same second follow the monotonic clock from that anchor.
        let later = now + Duration::from_millis(300);
        let (again, later_tick) = engine.clock(later);
        if later_tick == tick {
            assert_eq!(nanos(&again) - nanos(&received), 300_000_000);
        }
        assert!((0..1_000_000_000).contains(&again.nanos));
    }

    #[test]
    fn held_shards_judge_a_batch_as_a_lock_per_sample_does() {
        // A batch longer than one hold of the shards' locks, with new and known
        // devices, duplicates, refused samples and a device limit reached midway; in
        // messages longer than the shard count (held) and shorter (a lock per sample).
        let config = |shards, hold_shards| EngineConfig {
            shards,
            hold_shards,
            max_devices: 40,
            ..EngineConfig::default()
        };
        let batch: Vec<Sample> = (0..3 * HOLD_SAMPLES as u64 + 7)
            .map(|i| match i % 11 {
                3 => sample(&format!("dev-{}", i % 50), 1, &[("cpu", 1.0)]),
                7 => sample("dev-1", i, &[("bad name", 1.0)]),
                9 => sample(&format!("dev-{}", i % 50), i, &[]),
                _ => sample(&format!("dev-{}", i % 50), i, &[("cpu", (i % 13) as f64)]),
            })
            .collect();
        // One shard (always held), four held, four with a lock per sample.
        let engines = [
            Engine::new(config(1, false)),
            Engine::new(config(4, true)),
            Engine::new(config(4, false)),
        ];
        let mut verdicts = [Vec::new(), Vec::new(), Vec::new()];
        let mut rest = &batch[..];
        for n in [HOLD_SAMPLES + 3, 3].into_iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            let at = Instant::now();
            let outcomes: Vec<_> = engines
                .iter()
                .zip(&mut verdicts)
                .map(|(e, out)| e.ingest_batch_at(chunk, &e.default_detector(), out, at))
                .collect();
            assert_eq!(outcomes[0], outcomes[2]);
            assert_eq!(outcomes[1], outcomes[2]);
        }
        let [one, held, each] = &verdicts;
        assert_eq!(each.len(), batch.len());
        assert_eq!(one, each);
        assert_eq!(held, each);
        let refused = each
            .iter()
            .filter(|v| v.error.contains("device_limit"))
            .count();
        assert!(
            refused > 0 && each.iter().any(|v| v.duplicate),
            "the batch exercises both"
        );
        for engine in &engines {
            assert_eq!(engine.device_count(), 40);
        }
    }

    #[test]
    fn seed_check() {
        let engine = Engine::new(EngineConfig::default());
        for v in [420.0, 430.0, 410.0, 440.0, 425.0] {
            let verdict = ingest(&engine, sample("", 0, &[("rps", v)]));
            assert!(!verdict.anomaly);
            assert_eq!(verdict.device_id, "default");
        }
        let v = ingest(&engine, sample("", 0, &[("rps", 900.0)]));
        assert!(v.anomaly);
        let m = &v.metrics[0];
        assert_eq!((m.mean, m.window_count), (425.0, 5));
        assert!((m.stddev - 10.0).abs() < 1e-12);
        assert!((m.z_score - 47.5).abs() < 1e-9);
    }

    #[test]
    fn warm_up_and_flat_window() {
        let engine = Engine::new(EngineConfig::default());
        for i in 0..5 {
            let v = ingest(&engine, sample("d", 0, &[("x", 1.0)]));
            assert_eq!(v.metrics[0].window_count, i);
            assert!(!v.anomaly);
        }
        let same = ingest(&engine, sample("d", 0, &[("x", 1.0)]));
        assert_eq!((same.metrics[0].z_score, same.anomaly), (0.0, false));
        let below = ingest(&engine, sample("d", 0, &[("x", 0.5)]));
        assert_eq!(below.metrics[0].z_score, f64::NEG_INFINITY);
        assert!(below.anomaly);
    }

    #[test]
    fn threshold_is_strict() {
        let engine = Engine::new(EngineConfig {
            min_samples: 2,
            ..EngineConfig::default()
        });
        ingest(&engine, sample("d", 0, &[("x", 1.0)]));
        ingest(&engine, sample("d", 0, &[("x", 3.0)]));
        // mean 2, stddev 1: 4 has z exactly 2, not above the threshold.
        let v = ingest(&engine, sample("d", 0, &[("x", 4.0)]));
        assert_eq!(v.metrics[0].z_score, 2.0);
        assert!(!v.anomaly);
    }

    #[test]
    fn duplicates_leave_the_window_alone() {
        let engine = Engine::new(EngineConfig::default());
        ingest(&engine, sample("d", 5, &[("x", 1.0)]));
        for seq in [5, 3] {
            let v = ingest(&engine, sample("d", seq, &[("x", 100.0)]));
            assert!(v.duplicate);
            assert!(v.metrics.is_empty());
        }
        let stats = engine.analyze("d").unwrap();
        assert_eq!(stats.metrics[0].window_count, 1);
        assert_eq!(stats.last_seq, 5);
        // seq 0 is "none": never a duplicate.
        assert!(!ingest(&engine, sample("d", 0, &[("x", 1.0)])).duplicate);
        assert!(!ingest(&engine, sample("d", 6, &[("x", 1.0)])).duplicate);
    }

    #[test]
    fn invalid_samples_are_rejected_without_side_effects() {
        let engine = Engine::new(EngineConfig::default());
        let cases: Vec<(Sample, &str)> = vec![
            (
                sample("d", 1, &[("cpu", f64::NAN)]),
                "invalid_value: metric \"cpu\" is NaN",
            ),
            (sample("d", 1, &[("cpu", f64::INFINITY)]), "invalid_value"),
            (sample("d", 1, &[]), "no_metrics"),
            (
                sample(&"x".repeat(200), 1, &[("cpu", 1.0)]),
                "invalid_device_id",
            ),
            (sample("d", 1, &[("cpu load", 1.0)]), "invalid_metric_name"),
            (sample("d", 1, &[("", 1.0)]), "invalid_metric_name"),
        ];
        for (s, want) in cases {
            let v = ingest(&engine, s);
            assert!(
                v.error.starts_with(want),
                "{} does not start with {want}",
                v.error
            );
            assert!(v.metrics.is_empty());
        }
        let many: Vec<(String, f64)> = (0..33).map(|i| (format!("m{i}"), 1.0)).collect();
        let s = Sample {
            device_id: "d".into(),
            metrics: many.into_iter().collect(),
            ..Sample::default()
        };
        assert!(ingest(&engine, s).error.starts_with("too_many_metrics"));
        // Nothing was created by any of the rejected samples, and seq 1 is still new.
        assert_eq!(engine.device_count(), 0);
        assert!(!ingest(&engine, sample("d", 1, &[("cpu", 1.0)])).duplicate);
    }

    #[test]
    fn metric_limit_counts_across_samples() {
        let engine = Engine::new(EngineConfig {
            max_metrics_per_device: 2,
            ..EngineConfig::default()
        });
        ingest(&engine, sample("d", 0, &[("a", 1.0), ("b", 1.0)]));
        assert!(
            ingest(&engine, sample("d", 0, &[("a", 1.0)]))
                .error
                .is_empty()
        );
        let v = ingest(&engine, sample("d", 0, &[("a", 2.0), ("c", 1.0)]));
        assert!(v.error.starts_with("too_many_metrics"), "{}", v.error);
        assert_eq!(engine.analyze("d").unwrap().metrics[0].window_count, 2);
    }

    #[test]
    fn device_limit_refuses_new_devices_only() {
        let engine = Engine::new(EngineConfig {
            max_devices: 2,
            ..EngineConfig::default()
        });
        ingest(&engine, sample("a", 0, &[("x", 1.0)]));
        ingest(&engine, sample("b", 0, &[("x", 1.0)]));
        assert!(
            ingest(&engine, sample("c", 0, &[("x", 1.0)]))
                .error
                .starts_with("device_limit")
        );
        assert!(
            ingest(&engine, sample("a", 0, &[("x", 1.0)]))
                .error
                .is_empty()
        );
        assert_eq!(engine.device_count(), 2);
    }

    #[test]
    fn idle_devices_are_evicted() {
        let engine = Engine::new(EngineConfig {
            idle_timeout: Duration::from_secs(10),
            ..EngineConfig::default()
        });
        ingest(&engine, sample("a", 0, &[("x", 1.0)]));
        assert!(engine.evict_idle(Instant::now()).is_empty());
        let evicted = engine.evict_idle(Instant::now() + Duration::from_secs(11));
        assert_eq!(evicted.len(), 1);
        assert_eq!(&*evicted[0].id, "a");
        assert_eq!(engine.device_count(), 0);
        assert!(engine.analyze("a").is_none());
    }

    /// Ingests a mix: three devices, windows of 3 (shrinking later), 50 and 100
    /// values, a robust stream, a device with a long id, duplicates and errors.
    fn busy_engine() -> Engine {
        let engine = Engine::new(EngineConfig::default());
        let small = engine
            .detector(Some(&DetectorConfig {
                window_size: 3,
                min_samples: 2,
                ..DetectorConfig::default()
            }))
            .unwrap();
        let large = engine
            .detector(Some(&DetectorConfig {
                window_size: 100,
                ..DetectorConfig::default()
            }))
            .unwrap();
        let robust = engine
            .detector(Some(&DetectorConfig {
                name: "robust".into(),
                ..DetectorConfig::default()
            }))
            .unwrap();
        let default = engine.default_detector();
        let long_id = "a-device-id-longer-than-twenty-two-bytes";
        let mut out = Vec::new();
        for i in 0..130u32 {
            let v = f64::from(i % 7) * 1.5 + f64::from(i);
            let spec = [&small, &large, &robust, &default][i as usize % 4];
            let samples = [
                sample("a", u64::from(i) + 1, &[("cpu", v), ("mem", -v)]),
                sample("a", 1, &[("cpu", 1.0)]),
                sample(long_id, 0, &[("x", v * 1e6)]),
                sample("b", 0, &[("cpu", v), ("disk", f64::from(i % 3))]),
                sample("b", 0, &[("bad name", 1.0)]),
            ];
            engine.ingest_batch(&samples, spec, &mut out);
        }
        engine
    }

    #[test]
    fn devices_in_memory_encode_as_their_snapshot_state() {
        let engine = busy_engine();
        let mut encoded = Vec::new();
        for shard in 0..engine.shard_count() {
            let mut keys = Vec::new();
            engine.dirty_keys(shard, &mut keys);
            engine.visit_dirty(shard, &keys, |mut device| {
                let mut bytes = Vec::new();
                device.encode(&mut bytes);
                encoded.push((device.id().to_owned(), bytes));
                device.mark_clean();
            });
        }
        assert_eq!(encoded.len(), 3);
        for (id, from_memory) in encoded {
            let state = engine.device_state(&id).unwrap();
            assert!(!state.dirty, "visited and marked clean");
            let mut from_state = Vec::new();
            state.encode(&mut from_state);
            assert_eq!(from_memory, from_state, "{id}");
        }
        // Clean devices are not visited again.
        let mut keys = Vec::new();
        for shard in 0..engine.shard_count() {
            engine.dirty_keys(shard, &mut keys);
        }
        assert!(keys.is_empty());
    }

    #[test]
    fn restored_devices_continue_exactly() {
        let engine = busy_engine();
        let other = Engine::new(EngineConfig::default());
        for id in ["a", "b", "a-device-id-longer-than-twenty-two-bytes"] {
            let state = engine.device_state(id).unwrap();
            let last_value = state.metrics[0].last_value;
            assert_eq!(last_value, state.metrics[0].window.iter().last().unwrap());
            assert!(other.insert_if_absent(state.clone()));
            assert_eq!(other.device_state(id).unwrap(), state);
            assert_eq!(other.analyze(id), engine.analyze(id));
        }
        let next = [
            sample("a", 500, &[("cpu", 3.0), ("mem", 4.0), ("new", 1.0)]),
            sample("b", 0, &[("cpu", 1e3), ("disk", 2.0)]),
            sample("a-device-id-longer-than-twenty-two-bytes", 0, &[("x", 5.0)]),
        ];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        engine.ingest_batch(&next, &engine.default_detector(), &mut a);
        other.ingest_batch(&next, &other.default_detector(), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn evicted_devices_give_back_their_values_and_names() {
        let engine = Engine::new(EngineConfig {
            idle_timeout: Duration::from_secs(10),
            shards: 1,
            ..EngineConfig::default()
        });
        let ingest_all = |prefix: &str| {
            let samples: Vec<_> = (0..100)
                .map(|i| {
                    sample(
                        &format!("{prefix}{i}"),
                        0,
                        &[("cpu", 1.0), (&format!("m{i}"), 2.0)],
                    )
                })
                .collect();
            let mut out = Vec::new();
            engine.ingest_batch(&samples, &engine.default_detector(), &mut out);
        };
        ingest_all("first-");
        let (runs, names) = {
            let table = engine.shards[0].lock();
            (table.pool.bump(), table.names.len())
        };
        assert_eq!(names, 101);
        let evicted = engine.evict_idle(Instant::now() + Duration::from_secs(11));
        assert_eq!(evicted.len(), 100);
        assert_eq!(engine.shards[0].lock().names.len(), 0);
        // A second fleet of the same shape reuses the freed runs.
        ingest_all("second-");
        let table = engine.shards[0].lock();
        assert_eq!(table.pool.bump(), runs);
        assert_eq!(table.names.len(), 101);
        assert_eq!(table.len(), 100);
    }

    #[test]
    fn metrics_in_verdict_are_sorted_by_name() {
        let engine = Engine::new(EngineConfig::default());
        let v = ingest(
            &engine,
            sample("d", 0, &[("rps", 1.0), ("cpu", 2.0), ("mem", 3.0)]),
        );
        let names: Vec<_> = v.metrics.iter().map(|m| m.metric.as_str()).collect();
        assert_eq!(names, ["cpu", "mem", "rps"]);
    }
}
