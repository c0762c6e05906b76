//! The look-ahead queue: the samples of a message entered a few steps before they are
//! judged, so that one sample's cache misses overlap the judging of the samples before
//! it (see `prefetch.rs`).
//!
//! A sample's lines are fetched in four steps, each needing the previous one's line:
//! its index bucket when it enters the queue, its device's lines [`DEVICE_AT`] samples
//! before it is judged, its window slots and its detectors' state [`SLOTS_AT`] before,
//! and the lines that state points to (the robust detector's ring, order and daily
//! profile) [`DETECTOR_AT`] before. Each step has a sample's judging time or more (a
//! few hundred nanoseconds each) for its lines to arrive. With a lock per sample only
//! the window slots' step runs (see [`prefetch`]).

use super::io::SampleLike;
use super::locks::Guard;
use super::shard::Shard;
use super::validate::normalize_id;

/// How many samples ahead of the one being judged a message's samples enter.
pub(super) const LOOK: usize = 8;

/// Slots of the queue: room for the `LOOK + 1` samples between entering and being
/// judged, rounded up so that a sample's slot is a mask, not a division.
const QUEUE: usize = (LOOK + 1).next_power_of_two();

/// Samples ahead of the judged one whose device lines are prefetched.
pub(super) const DEVICE_AT: usize = 5;

/// Samples ahead of the judged one whose window slots are prefetched.
pub(super) const SLOTS_AT: usize = 2;

/// Samples ahead of the judged one whose detector state's lines are prefetched.
pub(super) const DETECTOR_AT: usize = 1;

/// A sample in the queue.
pub(super) struct Queued<S> {
    pub(super) sample: S,
    /// Its normalized device id's hash.
    pub(super) hash: u64,
    /// Its shard's index.
    pub(super) shard: usize,
    /// Its device's position, as the window slots' step found it with the locks held
    /// (the judging does not look the device up again: no device leaves a locked
    /// table but by probation eviction, after which the positions are forgotten).
    pub(super) found: Option<usize>,
}

/// The look-ahead steps.
#[derive(Debug, Clone, Copy)]
pub(super) enum Prefetch {
    /// The index bucket the device's lookup starts at.
    Index,
    /// The lines of the device the index names.
    Device,
    /// The window slots the sample's values will replace, and the robust detector's
    /// state of each metric.
    Slots,
    /// The lines the robust detector's state of each metric points to, for a sample
    /// whose device the window slots' step found.
    Detector,
}

/// The queue. Sample `k` sits in `slots[k % QUEUE]` from when it entered (at step `k`)
/// until it is judged (at step `k + LOOK`).
pub(super) struct LookAhead<S> {
    slots: [Option<Queued<S>>; QUEUE],
    /// Samples entered so far.
    entered: usize,
    /// Steps taken so far.
    step: usize,
    /// The message has no more samples.
    exhausted: bool,
}

impl<S> LookAhead<S> {
    /// An empty queue.
    #[inline]
    pub(super) fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| None),
            entered: 0,
            step: 0,
            exhausted: false,
        }
    }

    /// Whether the message may have more samples to enter.
    #[inline]
    pub(super) fn wants_more(&self) -> bool {
        !self.exhausted
    }

    /// Enters the next sample of the message.
    #[inline]
    pub(super) fn enter(&mut self, queued: Queued<S>) {
        self.slots[self.entered % QUEUE] = Some(queued);
        self.entered += 1;
    }

    /// The message has no more samples: judge what is queued now.
    #[inline]
    pub(super) fn exhaust(&mut self) {
        self.exhausted = true;
        self.step = self.step.max(LOOK);
    }

    /// The queued sample `at` samples ahead of the one judged at this step, if any.
    #[inline]
    pub(super) fn ahead(&mut self, at: usize) -> Option<&mut Queued<S>> {
        let k = (self.step + at)
            .checked_sub(LOOK)
            .filter(|&k| k < self.entered)?;
        self.slots[k % QUEUE].as_mut()
    }

    /// Ends the step: `None` while the queue fills, else the sample to judge now
    /// (`Some(None)` once every sample was judged).
    #[inline]
    pub(super) fn next_judged(&mut self) -> Option<Option<Queued<S>>> {
        self.step += 1;
        let j = (self.step - 1).checked_sub(LOOK)?;
        Some(self.slots[j % QUEUE].take())
    }

    /// Forgets every device position found (the locks were let go).
    #[inline]
    pub(super) fn forget_positions(&mut self) {
        for queued in self.slots.iter_mut().flatten() {
            queued.found = None;
        }
    }
}

/// One look-ahead step for a queued sample, in its shard's table: in `held` (every
/// shard, locked for the message) or locked for the step. The window slots' step
/// returns the position of the sample's device, if it is in the table.
#[inline]
pub(super) fn prefetch<S: SampleLike>(
    shards: &[Shard],
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
        // With a lock per sample, every step takes the sample's shard lock once more:
        // two more atomic read-modify-writes, each a full barrier. Only the window
        // slots' step pays for them (measured at a million devices: see
        // `BENCHMARKS.md`).
        (None, Prefetch::Slots) => {
            own = shards[*shard].lock();
            &*own
        }
        (None, Prefetch::Index | Prefetch::Device | Prefetch::Detector) => return None,
    };
    match step {
        Prefetch::Index => table.prefetch_index(*hash),
        Prefetch::Device => table.prefetch_device(*hash),
        Prefetch::Slots => return table.prefetch_for(*hash, normalize_id(sample.device_id())),
        Prefetch::Detector => {
            if let Some(pos) = queued.found {
                table.prefetch_detector(pos);
            }
            return queued.found;
        }
    }
    None
}
