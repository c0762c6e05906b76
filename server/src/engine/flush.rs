//! What the snapshot flusher and the idle evictor ask of the engine: the dirty devices
//! of a shard, written in place under its lock, and the devices that left memory.

use std::time::Instant;

use smallvec::SmallVec;

use super::device::DeviceState;
use super::names::Names;
use super::pool::ValuePool;
use super::resident::Device;
use super::sharded::Engine;

impl Engine {
    /// Takes a device out of memory and returns its state (a replica hands it to
    /// another, or its snapshot write lost to another replica's).
    pub fn remove(&self, device_id: &str) -> Option<DeviceState> {
        let id = super::normalize_device_id(device_id).as_bytes();
        let hash = self.hash_id(id);
        let mut table = self.shard(hash).lock();
        let pos = table.find(hash, id)?;
        let state = self.remove_state_at(&mut table, pos);
        table.compact_values_if_wasteful();
        Some(state)
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
        let now_tick = self.clock.seconds_at(now);
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
                evicted.push(self.remove_state_at(&mut table, pos));
            }
            table.compact_values_if_wasteful();
        }
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
                    .map(|d| DeviceKey(self.hash_id(d.id.as_bytes()))),
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
    pool: &'a ValuePool,
    names: &'a Names,
    key: DeviceKey,
}

impl DirtyDevice<'_> {
    /// The device id.
    pub fn id(&self) -> &str {
        self.device.id.as_str()
    }

    /// Appends the device's snapshot message as [`DeviceState::encode`] would (the
    /// bytes prost writes for `DeviceState::to_snapshot`).
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
