//! Judging a message: the hot loop of `Ingest` and of the gateway.
//!
//! A message's samples enter the look-ahead queue (`lookahead.rs`) a few samples before
//! they are judged, under the locks its lock policy holds (`locks.rs`); each is then
//! checked and judged in its shard's table ([`Engine::judge`]), with what is constant
//! for the message in a [`BatchContext`] and what is known of the sample in a
//! [`SampleContext`].

use std::{sync::atomic::Ordering, time::Instant};

use smallvec::SmallVec;
use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{Sample, Verdict};

use super::budget::{capacity_after, device_bytes, metric_bytes, records_bytes};
use super::detector::{DetectorKind, DetectorSpec, MAX_WINDOW};
use super::holders::{NOBODY, Owner};
use super::io::{SampleLike, VerdictSink, text};
use super::locks::{LockPolicy, Locks, ShardTable};
use super::lookahead::{DETECTOR_AT, DEVICE_AT, LookAhead, Prefetch, Queued, SLOTS_AT, prefetch};
use super::resident::{Device, Metric};
use super::shard::Table;
use super::sharded::Engine;
use super::validate::{check_shape, normalize_id, validate_metric_name};
use super::window::MAX_WINDOW_SIZE;
use crate::error::SampleError;

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

/// What every sample of one message is judged with, and what it is counted and
/// written into.
struct BatchContext<'a, O> {
    detector: &'a DetectorSpec,
    /// The message's receive time: the time of samples that carry none.
    received: Timestamp,
    /// The engine tick the message arrived in (devices' last-seen for eviction).
    tick: u32,
    /// Stop at the first sample of a device not in memory (see
    /// [`Engine::ingest_batch_with`]).
    stop_at_unknown: bool,
    /// The rolling window the detector keeps, as a device's charge records it.
    window: u16,
    /// The robust baseline it keeps (0: none), likewise.
    robust_window: u16,
    /// A device was evicted to admit another: positions found ahead are stale.
    evicted: bool,
    /// Whose `devices` quota counts the devices the message creates (read only when
    /// one is created).
    owner: Option<Owner<'a>>,
    out: &'a mut O,
    outcome: BatchOutcome,
}

/// One sample being judged and what the loop knows of it.
struct SampleContext<'s, S> {
    sample: &'s S,
    /// The normalized device id.
    id: &'s [u8],
    /// Its hash.
    hash: u64,
    /// The device's position, if a look-ahead step found it under the same lock.
    found: Option<usize>,
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

/// What [`Engine::judge`] did with a sample it did not refuse.
enum Judged {
    /// Judged (a verdict or a duplicate was written).
    Yes,
    /// Not judged: its device is not in memory and the caller asked to stop there.
    UnknownDevice,
}

impl Engine {
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
        self.ingest_batch_for(samples, detector, out, received, stop_at_unknown, None)
    }

    /// [`Engine::ingest_batch_with`] for `owner`: the devices the message creates
    /// count against its `devices` quota, and a sample that would create one past it
    /// is refused (`device_quota`). Devices already in memory are judged as for
    /// anybody: the quota is looked at only when a device is created.
    pub fn ingest_batch_for<S: SampleLike>(
        &self,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        out: &mut impl VerdictSink,
        received: Instant,
        stop_at_unknown: bool,
        owner: Option<Owner<'_>>,
    ) -> (BatchOutcome, usize) {
        let (received, tick) = self.clock.read(received);
        let mut samples = samples.into_iter();
        out.reserve(samples.len());
        let mut batch = BatchContext {
            detector,
            received,
            tick,
            stop_at_unknown,
            window: detector.window_size.clamp(1, MAX_WINDOW_SIZE) as u16,
            robust_window: match detector.kind {
                DetectorKind::ZScore => 0,
                DetectorKind::Robust => detector.robust.window.clamp(1, MAX_WINDOW) as u16,
            },
            evicted: false,
            owner,
            out,
            outcome: BatchOutcome::default(),
        };
        let policy =
            LockPolicy::for_message(self.shards.len(), self.config.hold_shards, samples.len());
        let mut locks = Locks::take(&self.shards, policy);
        let mut tables = locks.tables();
        let mut ahead = LookAhead::new();
        let mut judged = 0;
        loop {
            if ahead.wants_more() {
                match samples.next() {
                    Some(sample) => {
                        let hash = self.hash_id(normalize_id(sample.device_id()));
                        let queued = Queued {
                            sample,
                            hash,
                            shard: self.shard_index(hash),
                            found: None,
                        };
                        prefetch(&self.shards, tables, Prefetch::Index, &queued);
                        ahead.enter(queued);
                    }
                    None => ahead.exhaust(),
                }
            }
            for (stage, at) in [
                (Prefetch::Device, DEVICE_AT),
                (Prefetch::Slots, SLOTS_AT),
                (Prefetch::Detector, DETECTOR_AT),
            ] {
                if let Some(queued) = ahead.ahead(at) {
                    let found = prefetch(&self.shards, tables, stage, queued);
                    if !tables.is_empty() {
                        queued.found = found;
                    }
                }
            }
            let Some(next) = ahead.next_judged() else {
                continue;
            };
            let Some(Queued {
                sample,
                hash,
                shard,
                mut found,
            }) = next
            else {
                break;
            };
            if Locks::relock_due(tables, judged) {
                locks.relock();
                tables = locks.tables();
                found = None;
                ahead.forget_positions();
            }
            let id = normalize_id(sample.device_id());
            let mut table = ShardTable::get(tables, &self.shards, shard);
            let cx = SampleContext {
                sample: &sample,
                id,
                hash,
                found,
            };
            match self.judge(&mut table, cx, &mut batch) {
                Ok(Judged::Yes) => {}
                Ok(Judged::UnknownDevice) => break,
                Err(error) => {
                    batch.outcome.rejected += 1;
                    batch.outcome.rejected_by_reason[error.index()] += 1;
                    batch.out.error(id, sample.seq(), &error);
                }
            }
            if batch.evicted {
                // A device left its table: positions found ahead may name another.
                batch.evicted = false;
                ahead.forget_positions();
            }
            judged += 1;
        }
        (batch.outcome, judged)
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

    /// Judges one sample (`docs/architecture.md`, "Engine semantics") in its shard's
    /// locked `table`, into the batch's sink, and counts it; or refuses it (the caller
    /// writes the error verdict). Validation happens before anything is changed, in
    /// the order of the sample's metrics (name, then value), and a sample that is
    /// refused never creates its device.
    fn judge<S: SampleLike, O: VerdictSink>(
        &self,
        table: &mut Table,
        cx: SampleContext<'_, S>,
        batch: &mut BatchContext<'_, O>,
    ) -> Result<Judged, SampleError> {
        let SampleContext {
            sample,
            id,
            hash,
            found,
        } = cx;
        let count = sample.metric_count();
        check_shape(&self.config, id, count)?;
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
                    metric: text(name),
                    value: *value,
                });
            }
        }
        let seq = sample.seq();
        if seq > 0 {
            let last = found.map_or(0, |p| table.device(p).last_seq);
            if seq > last.saturating_add(self.config.max_seq_jump) {
                self.check_seq_against_clock(seq, last, &batch.received)?;
            }
        }
        let created = found.is_none();
        let pos = match found {
            Some(pos) => pos,
            None => match self.create(table, id, hash, new_metrics, batch)? {
                Some(pos) => pos,
                None => return Ok(Judged::UnknownDevice),
            },
        };
        let (device, pool, names) = table.entry(pos);
        device.last_seen = batch.tick;
        if seq > 0 && seq <= device.last_seq {
            batch.outcome.duplicates += 1;
            batch.out.duplicate(id, seq);
            return Ok(Judged::Yes);
        }
        if batch.window > device.window || batch.robust_window > device.robust_window {
            self.charge_windows(device, id, batch)?;
        }
        if new_metrics > 0 {
            if device.metrics.len() + new_metrics > self.config.max_metrics_per_device {
                return Err(SampleError::TooManyMetrics {
                    device: text(id),
                    count: device.metrics.len() + new_metrics,
                    limit: self.config.max_metrics_per_device,
                });
            }
            if !created {
                self.charge_metrics(device, id, new_metrics)?;
            }
        }
        let names_before = names.bytes();
        batch.out.begin(id, seq, count);
        let (mut anomaly, mut alert, mut score) = (false, false, 0.0f64);
        let time = sample.time().unwrap_or(batch.received);
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
            let metric = device.metrics[index].observe(value, time.seconds, batch.detector, pool);
            anomaly |= metric.anomaly;
            alert |= metric.alert;
            score = score.max(metric.score);
            batch.out.metric(name, &metric);
        }
        batch.out.end(anomaly, alert, score);
        if new_metrics > 0 {
            // The names new metrics interned (admitted with their metrics above).
            self.budget.force(names.bytes() - names_before);
        }
        batch.outcome.applied += 1;
        batch.outcome.anomalies += u64::from(anomaly);
        if seq > 0 {
            device.last_seq = seq;
        }
        device.set_updated_at(time);
        device.dirty = true;
        if device.visited() {
            table.graduated();
        }
        Ok(Judged::Yes)
    }

    /// Creates the device of a sample with `new_metrics` metrics, not in `table`
    /// (whose id is `id`, hashing to `hash`), charging the budget for it and its
    /// metrics at the batch's windows, evicting devices on probation when there is no
    /// room (without snapshots: with them, a restore admits devices, see
    /// [`Engine::insert_if_absent`]). `None`: the caller asked to stop at unknown
    /// devices and there may be room for it. With an owner, its `devices` quota must
    /// have room first, and the device counts against it.
    #[cold]
    fn create<O: VerdictSink>(
        &self,
        table: &mut Table,
        id: &[u8],
        hash: u64,
        new_metrics: usize,
        batch: &mut BatchContext<'_, O>,
    ) -> Result<Option<usize>, SampleError> {
        let holder = match batch.owner {
            Some(owner) => self.holders.take(owner)?,
            None => NOBODY,
        };
        let created = self.create_for(table, id, hash, new_metrics, batch, holder);
        if !matches!(created, Ok(Some(_))) {
            self.holders.give(holder);
        }
        created
    }

    /// [`Engine::create`] once the owner's quota counts the device (as `holder`).
    fn create_for<O: VerdictSink>(
        &self,
        table: &mut Table,
        id: &[u8],
        hash: u64,
        new_metrics: usize,
        batch: &mut BatchContext<'_, O>,
        holder: u16,
    ) -> Result<Option<usize>, SampleError> {
        let need = device_bytes(id.len())
            + records_bytes(capacity_after(0, 2, new_metrics))
            + new_metrics
                * metric_bytes(usize::from(batch.window), usize::from(batch.robust_window));
        let full = self.devices.load(Ordering::Relaxed) >= self.config.max_devices;
        if full && !table.has_probation() {
            // Nothing to evict: refused whether or not a snapshot would restore it.
            return Err(SampleError::DeviceLimit {
                limit: self.config.max_devices,
            });
        }
        if !self.budget.fits(need) && !table.has_probation() {
            return Err(self.over_budget(id, need, self.budget.used()));
        }
        if batch.stop_at_unknown {
            return Ok(None);
        }
        let (evicted, admitted) = self.admit(table, id, need, !self.config.snapshots);
        if evicted {
            batch.evicted = true;
            table.compact_values_if_wasteful();
        }
        admitted?;
        self.insert_new(table, id, hash, batch, holder).map(Some)
    }

    /// Inserts an admitted device (charged at the batch's windows).
    fn insert_new<O: VerdictSink>(
        &self,
        table: &mut Table,
        id: &[u8],
        hash: u64,
        batch: &BatchContext<'_, O>,
        holder: u16,
    ) -> Result<usize, SampleError> {
        let mut device = match std::str::from_utf8(id) {
            Ok(id) => Device::new(id),
            // Not reached: every SampleLike hands over UTF-8 (its decoder checked it).
            Err(_) => Device::new(&text(id)),
        };
        device.window = batch.window;
        device.robust_window = batch.robust_window;
        device.holder = holder;
        Ok(table.insert(hash, device))
    }

    /// Charges a device's metrics for the larger window (or robust baseline) a
    /// stream keeps, or refuses the sample.
    #[cold]
    fn charge_windows<O: VerdictSink>(
        &self,
        device: &mut Device,
        id: &[u8],
        batch: &BatchContext<'_, O>,
    ) -> Result<(), SampleError> {
        let (window, robust) = (
            batch.window.max(device.window),
            batch.robust_window.max(device.robust_window),
        );
        let before = metric_bytes(device.window.into(), device.robust_window.into());
        let after = metric_bytes(window.into(), robust.into());
        let need = device.metrics.len() * (after - before);
        self.budget
            .take(need)
            .map_err(|used| self.over_budget(id, need, used))?;
        device.window = window;
        device.robust_window = robust;
        Ok(())
    }

    /// Charges `new` metrics about to be added to a device, or refuses the sample.
    #[cold]
    fn charge_metrics(&self, device: &Device, id: &[u8], new: usize) -> Result<(), SampleError> {
        let capacity = device.metrics.capacity();
        let need = records_bytes(capacity_after(device.metrics.len(), capacity, new))
            - records_bytes(capacity)
            + new * metric_bytes(device.window.into(), device.robust_window.into());
        self.budget
            .take(need)
            .map_err(|used| self.over_budget(id, need, used))
    }

    fn over_budget(&self, id: &[u8], need: usize, used: usize) -> SampleError {
        SampleError::MemoryBudget {
            device: text(id),
            need,
            used,
            budget: self.budget.limit(),
        }
    }
}
