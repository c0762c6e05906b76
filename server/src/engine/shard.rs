//! One shard of the device table: a plain mutex over the shard's devices, their window
//! values and their metric names.
//!
//! The lock is never held across an `.await` (every method here is synchronous), so a
//! `std::sync::Mutex` is the right tool: it is cheaper than an async mutex and a task
//! can never be parked while holding it (mini-redis `db.rs` explains the reasoning).
//!
//! Devices are stored densely, in chunks of [`CHUNK`], and found through a hash index
//! of their positions (8 bytes a bucket, see `index.rs`). A hash table holding the
//! devices themselves sits between half and seven-eighths full, so at a million
//! devices it kept up to 200 bytes of empty slot per device; the index keeps 9 to 18.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::index::Index;
use super::names::Names;
use super::pool::ValuePool;
use super::resident::Device;
use super::seed::IdHasher;

/// Devices per chunk of the dense store.
const CHUNK: usize = 2048;

/// Probation entries one eviction looks at, at most: bounds the time a new device's
/// admission can take when the oldest entries are devices being admitted or, with
/// snapshots, not yet written.
const PROBATION_SCAN: usize = 64;

/// Stale probation entries dropped from the queue's front per graduation at most.
const STALE_PER_GRADUATION: usize = 4;

/// A shard, padded to its own cache lines so that two cores working on neighbouring
/// shards do not fight over one line.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Shard {
    table: Mutex<Table>,
}

impl Shard {
    /// An empty shard whose index hashes ids with `hasher` (the engine's).
    pub(crate) fn new(hasher: IdHasher) -> Self {
        Self {
            table: Mutex::new(Table {
                index: Index::default(),
                chunks: Vec::new(),
                len: 0,
                pool: ValuePool::default(),
                names: Names::new(hasher.clone()),
                probation: VecDeque::new(),
                hasher,
            }),
        }
    }

    /// Locks the shard. A panic while holding the lock cannot leave a device half
    /// updated in a way that matters more than losing the shard would, so poisoning is
    /// ignored instead of turning every later request into a panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The devices of one shard.
#[derive(Debug)]
pub(crate) struct Table {
    /// Positions of the devices, by the hash of their id.
    index: Index,
    /// The devices, densely: position `p` is `chunks[p / CHUNK][p % CHUNK]`.
    chunks: Vec<Vec<Device>>,
    /// Number of devices.
    len: usize,
    /// The devices' window values.
    pub(crate) pool: ValuePool,
    /// The devices' metric names.
    pub(crate) names: Names,
    /// The id hashes of devices that came in on probation (fewer than two samples
    /// applied), oldest first: the order probation eviction follows. An entry whose
    /// device graduated or left stays until it is met or the queue is trimmed.
    probation: VecDeque<u64>,
    /// The engine's id hasher (the index is rehashed with it when it grows).
    hasher: IdHasher,
}

impl Table {
    /// Number of devices.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The position of the device whose id is the bytes `id` (whose hash is `hash`).
    #[inline]
    pub(crate) fn find(&self, hash: u64, id: &[u8]) -> Option<usize> {
        let chunks = &self.chunks;
        self.index
            .candidates(hash)
            .find(|&p| device_at(chunks, p).id.is(id))
    }

    /// Prefetches the index bucket a lookup of `hash` starts at.
    #[inline]
    pub(crate) fn prefetch_index(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Prefetches the lines of the device the index names first under `hash`. The id
    /// is not compared (that would wait for the line): a wrong guess costs one
    /// prefetch.
    #[inline]
    pub(crate) fn prefetch_device(&self, hash: u64) {
        if let Some(pos) = self.index.candidates(hash).next() {
            self.device(pos).prefetch();
        }
    }

    /// Prefetches the window slots the next sample of the device whose id is `id`
    /// (hashing to `hash`) will replace, and its metrics' robust detector state, if the
    /// device is here, and returns its position. Looking it up reads the index and the
    /// device's lines, so those are in the cache afterwards as well.
    #[inline]
    pub(crate) fn prefetch_for(&self, hash: u64, id: &[u8]) -> Option<usize> {
        let pos = self.find(hash, id)?;
        for metric in &self.device(pos).metrics {
            metric.prefetch_slot(&self.pool);
        }
        Some(pos)
    }

    /// Prefetches the lines the robust detector's state of each metric of the device
    /// at `pos` points to (see [`Table::prefetch_for`], which fetched the states).
    #[inline]
    pub(crate) fn prefetch_detector(&self, pos: usize) {
        for metric in &self.device(pos).metrics {
            metric.prefetch_detector();
        }
    }

    /// The positions of the devices whose id hashes to `hash` (almost always one).
    pub(crate) fn find_hash(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        self.index
            .candidates(hash)
            .filter(move |&p| self.hash_of(p) == hash)
    }

    /// The device at `pos`.
    #[inline]
    pub(crate) fn device(&self, pos: usize) -> &Device {
        device_at(&self.chunks, pos)
    }

    /// The device at `pos` with the shard's pool and names, to change it.
    #[inline]
    pub(crate) fn entry(&mut self, pos: usize) -> (&mut Device, &mut ValuePool, &mut Names) {
        (
            &mut self.chunks[pos / CHUNK][pos % CHUNK],
            &mut self.pool,
            &mut self.names,
        )
    }

    /// All devices, in storage order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Device> {
        self.chunks.iter().flatten()
    }

    /// All devices, to change.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Device> {
        self.chunks.iter_mut().flatten()
    }

    /// The hash of the id of the device at `pos`.
    pub(crate) fn hash_of(&self, pos: usize) -> u64 {
        self.hasher.hash_one(self.device(pos).id.as_bytes())
    }

    /// Adds a device that is not in the shard (its id hashes to `hash`); returns its
    /// position.
    pub(crate) fn insert(&mut self, hash: u64, device: Device) -> usize {
        let pos = self.len;
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(device);
        }
        self.len += 1;
        self.index.insert(hash, pos);
        if self.device(pos).visits < 2 {
            self.probation.push_back(hash);
            if self.probation.len() > 2 * self.len + 64 {
                self.trim_probation();
            }
        }
        pos
    }

    /// Drops the queue's entries of devices no longer on probation (amortized: the
    /// queue is trimmed when it reaches twice the shard's devices).
    fn trim_probation(&mut self) {
        let mut queue = std::mem::take(&mut self.probation);
        queue.retain(|&hash| self.on_probation(hash).is_some());
        self.probation = queue;
    }

    /// A device has just left probation: drops the stale entries at the queue's front
    /// (devices no longer on probation), a few per graduation. Devices mostly graduate
    /// in the order they came, so a fleet whose devices have all graduated keeps no
    /// entries, and new devices reuse the queue's room instead of growing it to twice
    /// the shard's devices before a trim (8 to 16 bytes a device). Each
    /// graduation drops up to [`STALE_PER_GRADUATION`] entries and makes at most one
    /// stale, so a backlog behind a device that stays on probation drains once it
    /// leaves; one lookup per graduation, once in a device's life.
    pub(crate) fn graduated(&mut self) {
        for _ in 0..STALE_PER_GRADUATION {
            match self.probation.front() {
                Some(&front) if self.on_probation(front).is_none() => {
                    self.probation.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The position of a device with id hash `hash` still on probation, if any.
    fn on_probation(&self, hash: u64) -> Option<usize> {
        self.find_hash(hash).find(|&p| self.device(p).visits < 2)
    }

    /// Entries in the probation queue, stale ones included.
    #[cfg(test)]
    pub(crate) fn probation_entries(&self) -> usize {
        self.probation.len()
    }

    /// Whether some device may be on probation (the queue is not empty).
    pub(crate) fn has_probation(&self) -> bool {
        !self.probation.is_empty()
    }

    /// The positions of the devices to evict first, in order, at most `max`: the
    /// oldest on probation that have had a sample applied (one admitted for a request
    /// that has not judged it yet is passed over) and, with `clean_only`, whose newest
    /// state is in a snapshot. Looks at the [`PROBATION_SCAN`] oldest entries at most,
    /// dropping stale ones; the entries of the devices returned go when they are met
    /// again after the devices left.
    pub(crate) fn probation_victims(&mut self, clean_only: bool, max: usize) -> Vec<usize> {
        let mut victims = Vec::new();
        let mut i = 0;
        while i < self.probation.len().min(PROBATION_SCAN) && victims.len() < max {
            let hash = self.probation[i];
            let mut stale = true;
            for pos in self.find_hash(hash) {
                let device = self.device(pos);
                if device.visits >= 2 {
                    continue;
                }
                stale = false;
                if device.visits == 1 && !(clean_only && device.dirty) && !victims.contains(&pos) {
                    victims.push(pos);
                    break;
                }
            }
            if stale {
                self.probation.remove(i);
            } else {
                i += 1;
            }
        }
        victims
    }

    /// Compacts the shard's window values when freed runs have piled up (see
    /// [`ValuePool::wasteful`]): O(values in the shard), under the shard's lock, and
    /// only once removals have freed an eighth of them. Devices keep their positions.
    pub(crate) fn compact_values_if_wasteful(&mut self) {
        if !self.pool.wasteful() {
            return;
        }
        let mut runs: Vec<(u32, u16, u32, u32)> = Vec::new();
        for (pos, device) in self.chunks.iter_mut().flatten().enumerate() {
            for (i, metric) in device.metrics.iter_mut().enumerate() {
                if let Some((at, slots)) = metric.run_mut() {
                    runs.push((*at, slots as u16, pos as u32, i as u32));
                }
            }
        }
        runs.sort_unstable_by_key(|&(at, ..)| at);
        let positions: Vec<(u32, u16)> = runs.iter().map(|&(at, len, ..)| (at, len)).collect();
        let moved = self.pool.compact(&positions);
        for (&(_, _, pos, i), at) in runs.iter().zip(moved) {
            let pos = pos as usize;
            let device = &mut self.chunks[pos / CHUNK][pos % CHUNK];
            if let Some((slot, _)) = device.metrics[i as usize].run_mut() {
                *slot = at;
            }
        }
    }

    /// Removes the device at `pos` and returns it; the last device takes its place.
    /// The caller releases its values and names.
    pub(crate) fn remove(&mut self, pos: usize) -> Device {
        let hash = self.hash_of(pos);
        self.index.remove(hash, pos);
        let last = self.len - 1;
        if last != pos {
            self.index.replace(self.hash_of(last), last, pos);
        }
        let Some(mut tail) = self.chunks.last_mut().and_then(Vec::pop) else {
            unreachable!("remove from an empty shard");
        };
        if self.chunks.last().is_some_and(Vec::is_empty) {
            self.chunks.pop();
        }
        self.len -= 1;
        if last != pos {
            std::mem::swap(&mut self.chunks[pos / CHUNK][pos % CHUNK], &mut tail);
        }
        tail
    }
}

#[inline]
fn device_at(chunks: &[Vec<Device>], pos: usize) -> &Device {
    &chunks[pos / CHUNK][pos % CHUNK]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_and_remove_keep_the_index_right() {
        let hasher = crate::engine::seed::id_hasher();
        let shard = Shard::new(hasher.clone());
        let mut table = shard.lock();
        let n = 3 * CHUNK + 5;
        let id = |i: usize| format!("device-{i}");
        for i in 0..n {
            let hash = hasher.hash_one(id(i).as_bytes());
            assert_eq!(table.insert(hash, Device::new(&id(i))), i);
        }
        // Remove every third device, from the front, so the tail keeps moving in.
        for i in (0..n).step_by(3) {
            let hash = hasher.hash_one(id(i).as_bytes());
            let pos = table.find(hash, id(i).as_bytes()).expect("present");
            let removed = table.remove(pos);
            assert_eq!(removed.id.as_str(), id(i));
        }
        assert_eq!(table.len(), n - n.div_ceil(3));
        assert_eq!(table.iter().count(), table.len());
        for i in 0..n {
            let hash = hasher.hash_one(id(i).as_bytes());
            let found = table.find(hash, id(i).as_bytes());
            if i % 3 == 0 {
                assert_eq!(found, None, "{i} was removed");
            } else {
                let pos = found.expect("still present");
                assert_eq!(table.device(pos).id.as_str(), id(i));
                assert_eq!(table.find_hash(hash).collect::<Vec<_>>(), vec![pos]);
            }
        }
    }

    #[test]
    fn graduating_devices_leave_no_probation_queue_behind() {
        let hasher = crate::engine::seed::id_hasher();
        let shard = Shard::new(hasher.clone());
        let mut table = shard.lock();
        let id = |i: usize| format!("device-{i}");
        let hash = |i: usize| hasher.hash_one(id(i).as_bytes());
        let visit = |table: &mut Table, i: usize| {
            let pos = table.find(hash(i), id(i).as_bytes()).expect("present");
            if table.entry(pos).0.visited() {
                table.graduated();
            }
        };
        // Devices graduating in arrival order empty the queue as they go.
        let n = 10_000;
        for i in 0..n {
            table.insert(hash(i), Device::new(&id(i)));
        }
        assert_eq!(table.probation.len(), n, "every new device is on probation");
        for i in 0..n {
            visit(&mut table, i);
            assert_eq!(table.probation.len(), n - i, "one sample keeps it there");
            visit(&mut table, i);
        }
        assert!(table.probation.is_empty());
        // A device that stays on probation holds the front: graduations behind it
        // leave their entries, which drain, four per graduation, once it leaves.
        let (first, last) = (n, 2 * n);
        for i in first..last {
            table.insert(hash(i), Device::new(&id(i)));
            visit(&mut table, i);
        }
        for i in first + 1..last {
            visit(&mut table, i);
        }
        assert_eq!(table.probation.len(), n, "the front device is on probation");
        assert_eq!(table.probation_victims(false, 1).len(), 1);
        visit(&mut table, first);
        assert_eq!(table.probation.len(), n - STALE_PER_GRADUATION);
        // Each graduation adds one stale entry and drops up to four: (n - 4) / 3 of
        // them empty the queue.
        for i in last..last + n / 2 {
            table.insert(hash(i), Device::new(&id(i)));
            visit(&mut table, i);
            visit(&mut table, i);
        }
        assert!(table.probation.is_empty(), "{}", table.probation.len());
    }
}
