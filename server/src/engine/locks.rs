//! The lock policy of a message: which shard locks its samples are judged under.
//!
//! With one shard every sample needs its lock: it is taken once for the message. A
//! lock and an unlock per sample are two atomic read-modify-writes, each a full
//! barrier, so one sample's cache misses could not overlap the next one's (measured:
//! 5-9 % less server CPU per sample at 100 samples per message, `SHARDS=1`). It is let
//! go every [`HOLD_SAMPLES`] samples, so that a large batch does not keep other streams
//! waiting for all of its time. With more shards and `hold_shards` (one core), a
//! message of at least as many samples as shards takes every shard's lock the same way
//! (see `BENCHMARKS.md`); otherwise each sample locks its own shard.

use std::ops::{Deref, DerefMut};
use std::sync::MutexGuard;

use smallvec::SmallVec;

use super::shard::{Shard, Table};

/// Samples judged at most under one hold of the shards' locks (`SHARDS=1`, or
/// `hold_shards`): about 20 µs of work, what another stream may wait.
pub(super) const HOLD_SAMPLES: usize = 128;

/// A locked shard's table.
pub(super) type Guard<'a> = MutexGuard<'a, Table>;

/// How the samples of one message take their shards' locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LockPolicy {
    /// Each sample (and each look-ahead step that needs it) locks its own shard.
    PerSample,
    /// Every shard is locked, in shard order, for up to [`HOLD_SAMPLES`] samples at a
    /// time.
    HeldShards,
}

impl LockPolicy {
    /// The policy of a message of `samples` samples over `shards` shards.
    #[inline]
    pub(super) fn for_message(shards: usize, hold_shards: bool, samples: usize) -> Self {
        if shards == 1 || (hold_shards && samples >= shards) {
            Self::HeldShards
        } else {
            Self::PerSample
        }
    }
}

/// The shard locks a message holds: every shard's in shard order, or none.
pub(super) struct Locks<'a> {
    shards: &'a [Shard],
    held: SmallVec<[Guard<'a>; 4]>,
}

impl<'a> Locks<'a> {
    /// Takes the locks `policy` holds for a whole message.
    pub(super) fn take(shards: &'a [Shard], policy: LockPolicy) -> Self {
        let held = match policy {
            LockPolicy::HeldShards => shards.iter().map(Shard::lock).collect(),
            LockPolicy::PerSample => SmallVec::new(),
        };
        Self { shards, held }
    }

    /// The held tables, by shard index (empty with a lock per sample). The loop reads
    /// them through this plain slice: every access to the `SmallVec` itself first
    /// checks where its items are (measured: about 40 instructions per sample).
    #[inline]
    pub(super) fn tables(&mut self) -> &mut [Guard<'a>] {
        &mut self.held
    }

    /// Whether the locks are to be let go and taken again before judging the sample
    /// after `judged` others.
    #[inline]
    pub(super) fn relock_due(tables: &[Guard<'_>], judged: usize) -> bool {
        judged % HOLD_SAMPLES == HOLD_SAMPLES - 1 && !tables.is_empty()
    }

    /// Lets every lock go, then takes them again in shard order. Meanwhile other
    /// threads may have evicted devices: positions found before are stale.
    pub(super) fn relock(&mut self) {
        self.held.clear();
        self.held.extend(self.shards.iter().map(Shard::lock));
    }
}

/// The table of shard `index`: held for the message, or locked for one sample.
pub(super) enum ShardTable<'t, 'a> {
    /// Held in [`Locks`].
    Held(&'t mut Table),
    /// Locked for this sample.
    Own(Guard<'a>),
}

impl<'t, 'a> ShardTable<'t, 'a> {
    /// The table of shard `index`, from `tables` (see [`Locks::tables`]) or locked now.
    #[inline]
    pub(super) fn get(tables: &'t mut [Guard<'a>], shards: &'a [Shard], index: usize) -> Self {
        match tables.get_mut(index) {
            Some(table) => Self::Held(table),
            None => Self::Own(shards[index].lock()),
        }
    }
}

impl Deref for ShardTable<'_, '_> {
    type Target = Table;

    #[inline]
    fn deref(&self) -> &Table {
        match self {
            Self::Held(table) => table,
            Self::Own(guard) => guard,
        }
    }
}

impl DerefMut for ShardTable<'_, '_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Table {
        match self {
            Self::Held(table) => table,
            Self::Own(guard) => guard,
        }
    }
}
