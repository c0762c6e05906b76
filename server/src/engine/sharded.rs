//! [`Engine`]: the device table split in shards by device id, and what reads or writes
//! one whole device (`Analyze`, restore). Judging messages is in `ingest.rs`; what the
//! snapshot flusher and the evictor ask is in `flush.rs`.

use std::{
    hash::BuildHasher,
    sync::atomic::{AtomicUsize, Ordering},
};

use tidewatch_proto::v1::{AnalyzeResponse, DetectorConfig, Source};

use super::clock::Clock;
use super::config::EngineConfig;
use super::detector::{DetectorDefaults, DetectorSpec};
use super::device::DeviceState;
use super::resident::Device;
use super::seed::{IdHasher, id_hasher};
use super::shard::Shard;
use super::validate::normalize_device_id;
use crate::error::ApiError;

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
    /// Hasher for device ids (seeded at random once per process, `seed.rs`: shard
    /// placement is stable within a process).
    hasher: IdHasher,
    /// The idle tick and receive times.
    pub(super) clock: Clock,
}

impl Engine {
    /// An empty engine.
    pub fn new(config: EngineConfig) -> Self {
        let hasher = id_hasher();
        let shards = (0..config.shards.max(1))
            .map(|_| Shard::new(hasher.clone()))
            .collect();
        Self {
            detectors: config.detector_defaults(),
            config,
            shards,
            devices: AtomicUsize::new(0),
            hasher,
            clock: Clock::new(),
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
        device.last_seen = self.clock.tick();
        self.devices.fetch_add(1, Ordering::Relaxed);
        table.insert(hash, device);
        true
    }
}
