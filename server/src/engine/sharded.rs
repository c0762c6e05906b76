//! [`Engine`]: the device table split in shards by device id, and what reads or writes
//! one whole device (`Analyze`, restore). Judging messages is in `ingest.rs`; what the
//! snapshot flusher and the evictor ask is in `flush.rs`.

use std::{
    hash::BuildHasher,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tidewatch_proto::v1::{AnalyzeResponse, DetectorConfig, Source};

use super::budget::{Budget, device_cost};
use super::clock::Clock;
use super::config::EngineConfig;
use super::detector::{DetectorDefaults, DetectorSpec};
use super::device::DeviceState;
use super::holders::{Holders, NOBODY, Owner};
use super::resident::Device;
use super::shard::{Shard, Table};
use super::validate::normalize_device_id;
use crate::error::{ApiError, SampleError};

/// The sharded device table and the detector settings.
///
/// Every transport (gRPC `Ingest`, the HTTP gateway, snapshot restore) goes through it.
/// It is synchronous on purpose: each call locks one shard for the time it takes to
/// judge one sample (well under a microsecond) and never awaits.
#[derive(Debug)]
pub struct Engine {
    /// The settings this engine was built with.
    pub(super) config: EngineConfig,
    /// Detector settings that stream specs are resolved against.
    detectors: DetectorDefaults,
    /// The shards; a device lives in `shards[shard_index(hash)]`.
    pub(super) shards: Box<[Shard]>,
    /// Devices in memory, for `MAX_DEVICES` and the devices gauge.
    pub(super) devices: AtomicUsize,
    /// Hasher for device ids (fixed seed: shard placement is stable within a process).
    hasher: foldhash::fast::FixedState,
    /// The idle tick and receive times.
    pub(super) clock: Clock,
    /// `MEMORY_BUDGET` and what the devices in memory hold of it.
    pub(super) budget: Budget,
    /// The devices each principal holds, against its `devices` quota.
    pub(super) holders: Holders,
    /// Devices evicted on probation (to make room for a new one).
    probation_evictions: AtomicU64,
    /// With snapshots: the ids of devices evicted on probation, for the snapshot
    /// module to forget (see [`Engine::take_evicted`]).
    evicted: Mutex<Vec<Box<str>>>,
}

/// Probation devices one admission evicts at most (a device of 32 metrics × 4,096
/// values takes the room of about a thousand small ones, not the other way round).
const MAX_VICTIMS: usize = 16;

impl Engine {
    /// An empty engine.
    pub fn new(config: EngineConfig) -> Self {
        let hasher = foldhash::fast::FixedState::with_seed(0x7469_6465_7761_7463);
        let shards = (0..config.shards.max(1))
            .map(|_| Shard::new(hasher.clone()))
            .collect();
        Self {
            detectors: config.detector_defaults(),
            budget: Budget::new(config.memory_budget),
            config,
            shards,
            devices: AtomicUsize::new(0),
            hasher,
            clock: Clock::new(),
            holders: Holders::default(),
            probation_evictions: AtomicU64::new(0),
            evicted: Mutex::new(Vec::new()),
        }
    }

    /// `MEMORY_BUDGET`, in bytes.
    pub fn memory_budget(&self) -> usize {
        self.budget.limit()
    }

    /// Bytes the devices in memory hold, as the budget counts them.
    pub fn memory_used(&self) -> usize {
        self.budget.used()
    }

    /// Devices `principal` holds in memory now, as its `devices` quota counts them
    /// (0 for one without that quota).
    pub fn devices_held(&self, principal: &str) -> u64 {
        self.holders.held(principal)
    }

    /// The principal whose `devices` quota counts the device, if any (a hand-off
    /// that fails puts the device back counted for it again).
    pub fn holder_of(&self, device_id: &str) -> Option<Box<str>> {
        let id = normalize_device_id(device_id).as_bytes();
        let hash = self.hash_id(id);
        let holder = {
            let table = self.shard(hash).lock();
            table.device(table.find(hash, id)?).holder
        };
        self.holders.name(holder)
    }

    /// Devices evicted on probation so far.
    pub fn probation_evictions(&self) -> u64 {
        self.probation_evictions.load(Ordering::Relaxed)
    }

    /// The ids of the devices evicted on probation since the last call (kept only
    /// with snapshots, whose fences of them must go).
    pub fn take_evicted(&self) -> Vec<Box<str>> {
        std::mem::take(&mut *self.evicted.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Admits a new device of id `id` costing `need` bytes into `table` (its shard,
    /// locked): when `MAX_DEVICES` or the budget leaves no room and `evict` allows,
    /// evicts the shard's oldest devices on probation first (`docs/operations.md`,
    /// "Memory"), as many as make room (at most [`MAX_VICTIMS`]), and none when that
    /// many would not. On success the device is counted and its bytes are taken; the
    /// caller inserts it. Returns whether anything was evicted (positions in `table`
    /// moved), with the refusal when there is no room.
    pub(super) fn admit(
        &self,
        table: &mut Table,
        id: &[u8],
        need: usize,
        evict: bool,
    ) -> (bool, Result<(), SampleError>) {
        let full = self.devices.load(Ordering::Relaxed) >= self.config.max_devices;
        let refusal = if full {
            SampleError::DeviceLimit {
                limit: self.config.max_devices,
            }
        } else {
            match self.budget.take(need) {
                Ok(()) => {
                    self.devices.fetch_add(1, Ordering::Relaxed);
                    return (false, Ok(()));
                }
                Err(used) => SampleError::MemoryBudget {
                    device: super::io::text(id),
                    need,
                    used,
                    budget: self.budget.limit(),
                },
            }
        };
        if !evict {
            return (false, Err(refusal));
        }
        // The fewest of the oldest devices on probation whose bytes make room.
        let candidates = table.probation_victims(self.config.snapshots, MAX_VICTIMS);
        let used = self.budget.used();
        let mut freed = 0;
        let mut enough = None;
        for (n, &pos) in candidates.iter().enumerate() {
            freed += device_cost(table.device(pos));
            if used.saturating_sub(freed).saturating_add(need) <= self.budget.limit() {
                enough = Some(n + 1);
                break;
            }
        }
        let Some(n) = enough else {
            return (false, Err(refusal));
        };
        let mut victims = candidates[..n].to_vec();
        // Highest position first: a removal moves the last device into the hole,
        // which is then never one of the lower positions still to remove.
        victims.sort_unstable_by(|a, b| b.cmp(a));
        for pos in victims {
            let device = self.remove_at(table, pos);
            self.probation_evictions.fetch_add(1, Ordering::Relaxed);
            if self.config.snapshots {
                self.evicted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(device.id.as_str().into());
            }
        }
        // Taken again: another shard may have admitted a device meanwhile.
        let admitted = match self.budget.take(need) {
            Ok(()) => {
                self.devices.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(used) => Err(SampleError::MemoryBudget {
                device: super::io::text(id),
                need,
                used,
                budget: self.budget.limit(),
            }),
        };
        (true, admitted)
    }

    /// Removes the device at `pos` of `table` and gives back what it held: its values
    /// and names to the shard, its bytes to the budget, its place to `MAX_DEVICES`.
    /// Returns it (its values are gone: convert it first when they matter, with
    /// [`Engine::remove_state_at`]).
    pub(super) fn remove_at(&self, table: &mut Table, pos: usize) -> Device {
        let device = table.remove(pos);
        self.release(table, &device);
        device
    }

    /// [`Engine::remove_at`], returning the device's state as a snapshot holds it.
    pub(super) fn remove_state_at(&self, table: &mut Table, pos: usize) -> DeviceState {
        let device = table.remove(pos);
        let state = device.to_state(&table.pool, &table.names);
        self.release(table, &device);
        state
    }

    /// Gives back what a device that left `table` held, its principal's quota
    /// included.
    fn release(&self, table: &mut Table, device: &Device) {
        self.holders.give(device.holder);
        let names = table.names.bytes();
        device.release(&mut table.pool, &mut table.names);
        self.budget
            .give(device_cost(device) + (names - table.names.bytes()));
        self.devices.fetch_sub(1, Ordering::Relaxed);
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

    /// A page of the device ids in memory: up to `limit` ids that start with `prefix`
    /// and sort after `after` (bytewise), in order, and whether more follow. Walks every
    /// shard under its lock, one shard at a time: linear in the devices, so callers
    /// with many devices run it on the blocking pool.
    pub fn device_ids(&self, prefix: &str, after: &str, limit: usize) -> (Vec<String>, bool) {
        let mut page = std::collections::BTreeSet::<Box<str>>::new();
        for shard in &self.shards {
            let table = shard.lock();
            for device in table.iter() {
                let id = device.id.as_str();
                if !id.starts_with(prefix) || id <= after {
                    continue;
                }
                // Keep the `limit + 1` smallest: the extra one says whether more follow.
                if page.len() > limit {
                    match page.last() {
                        Some(last) if id < &**last => {
                            page.pop_last();
                        }
                        _ => continue,
                    }
                }
                page.insert(id.into());
            }
        }
        let more = page.len() > limit;
        (
            page.into_iter().take(limit).map(String::from).collect(),
            more,
        )
    }

    /// Whether the device is in memory.
    pub fn contains(&self, device_id: &str) -> bool {
        let id = normalize_device_id(device_id).as_bytes();
        let hash = self.hash_id(id);
        self.shard(hash).lock().find(hash, id).is_some()
    }

    /// The hash of a device id (the shard's index hashes the same bytes).
    #[inline]
    pub(super) fn hash_id(&self, id: &[u8]) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The shard of a device id's hash.
    pub(super) fn shard(&self, hash: u64) -> &Shard {
        &self.shards[self.shard_index(hash)]
    }

    /// The index of the shard of a device id's hash.
    #[inline]
    pub(super) fn shard_index(&self, hash: u64) -> usize {
        // The high 32 bits pick the shard (the shard's index uses the low 32),
        // scaled to the shard count by a multiplication instead of a division.
        (((hash >> 32) * self.shards.len() as u64) >> 32) as usize
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
    ///
    /// It is admitted as a new device is (`MAX_DEVICES`, `MEMORY_BUDGET`, probation
    /// eviction: see [`Engine::admit`]); with snapshots, this is where devices on
    /// probation are evicted to make room.
    pub fn insert_if_absent(&self, state: DeviceState) -> bool {
        self.insert_if_absent_for(state, None)
    }

    /// [`Engine::insert_if_absent`] for `owner`, whose `devices` quota counts the
    /// device: not inserted when the quota is full.
    pub fn insert_if_absent_for(&self, state: DeviceState, owner: Option<Owner<'_>>) -> bool {
        let hash = self.hash_id(state.id.as_bytes());
        let mut table = self.shard(hash).lock();
        if table.find(hash, state.id.as_bytes()).is_some() {
            return false;
        }
        let full = self.devices.load(Ordering::Relaxed) >= self.config.max_devices;
        if full && !table.has_probation() {
            return false;
        }
        let holder = match owner.map(|owner| self.holders.take(owner)) {
            Some(Ok(holder)) => holder,
            Some(Err(_)) => return false,
            None => NOBODY,
        };
        let table = &mut *table;
        let names = table.names.bytes();
        let mut device = Device::from_state(state, &mut table.pool, &mut table.names);
        device.holder = holder;
        let need = device_cost(&device) + (table.names.bytes() - names);
        let (evicted, admitted) = self.admit(table, device.id.as_bytes(), need, true);
        if admitted.is_err() {
            self.holders.give(holder);
            device.release(&mut table.pool, &mut table.names);
            if evicted {
                table.compact_values_if_wasteful();
            }
            return false;
        }
        device.last_seen = self.clock.tick();
        table.insert(hash, device);
        if evicted {
            table.compact_values_if_wasteful();
        }
        true
    }
}
