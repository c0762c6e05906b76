//! Redis snapshots: window state follows a device across restarts, rolling updates and
//! replicas (`docs/architecture.md`, "Snapshot protocol").
//!
//! - **Flush** ([`Snapshots::flush`], run by the flusher task every `SNAPSHOT_INTERVAL`,
//!   beside ingestion, never inside a request): on the blocking pool, the dirty
//!   devices of each shard are encoded under the shard lock a few hundred at a time
//!   (so ingestion on that shard waits at most that long) and their `dirty` flag is
//!   cleared; each device is encoded straight into a batch of packed
//!   `SET key value EX ttl` commands ([`resp`]), and the batches go to Redis as
//!   pipelines, `REDIS_POOL_SIZE` at a time, their buffers reused. A device whose
//!   `SET` fails (the batch broke, or Redis refused that command) is marked dirty
//!   again, so the next flush retries it: a Redis outage delays snapshots, it never
//!   loses what is in memory.
//! - **Restore** ([`Snapshots::restore_missing`]): the first sample of a device that
//!   is not in memory waits for its snapshot to be read and inserted before it is
//!   judged. Concurrent first samples of one device share one read.
//! - **Analyze** of a device not in memory reads its snapshot ([`Snapshots::read`]).
//! - **Eviction** runs in the flusher right after a flush, and evicts only idle
//!   devices that are clean: an evicted device's newest state is always in Redis.
//! - **Shutdown** ([`Snapshots::flush`] once more after streams drained) writes
//!   everything that is dirty.
//!
//! Redis being slow or down costs a caller at most `REDIS_COMMAND_TIMEOUT`; the outage
//! is logged once when it starts and once when it ends, and counted.

pub mod codec;
mod error;
#[cfg(test)]
mod fixtures;
mod legacy;
pub mod resp;
pub mod store;

use std::{
    collections::{HashMap, HashSet},
    mem,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
};
use tidewatch_proto::v1::Sample;
use tokio::sync::mpsc;

use crate::{
    config::Config,
    engine::{DeviceKey, DeviceState, Engine, normalize_device_id},
    telemetry::Counters,
};
pub use store::{Store, StoreError};

/// Devices encoded per shard-lock hold: bounds how long a flush can make an ingest
/// request on that shard wait. A message of many samples touches every shard, so
/// during a flush nearly every message meets the shard being encoded: with 256
/// devices per hold (~0.5 ms) ingestion crawled while a flush ran; 32 (~70 µs, about
/// what the message itself takes) keeps the wait small, and taking an uncontended
/// lock costs nothing next to encoding 32 KB.
const LOCK_CHUNK: usize = 32;

/// Restores of at least this many devices decode on the blocking pool.
const BLOCKING_DECODE: usize = 64;

/// Snapshot settings, from [`Config`].
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// `REDIS_URL`.
    pub url: String,
    /// `SNAPSHOT_INTERVAL`.
    pub interval: Duration,
    /// `SNAPSHOT_TTL`, in whole seconds (at least 1).
    pub ttl_secs: u64,
    /// `SNAPSHOT_BATCH`: devices per pipeline.
    pub batch: usize,
    /// `REDIS_POOL_SIZE`.
    pub pool_size: u32,
    /// `REDIS_CONNECT_TIMEOUT`.
    pub connect_timeout: Duration,
    /// `REDIS_COMMAND_TIMEOUT`.
    pub command_timeout: Duration,
}

impl SnapshotConfig {
    /// The snapshot settings, or `None` when `REDIS_URL` is unset.
    pub fn from_config(config: &Config) -> Option<Self> {
        Some(Self {
            url: config.redis_url()?.to_owned(),
            interval: config.snapshot_interval,
            ttl_secs: config.snapshot_ttl.as_secs().max(1),
            batch: config.snapshot_batch.max(1),
            pool_size: config.redis_pool_size.max(1),
            connect_timeout: config.redis_connect_timeout,
            command_timeout: config.redis_command_timeout,
        })
    }
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Devices written.
    pub written: u64,
    /// Devices whose write failed (dirty again, retried by the next flush).
    pub failed: u64,
}

/// Whether Redis answered last time, so that an outage is logged once when it starts
/// and once when it ends instead of once per flush or per device.
#[derive(Debug)]
struct Link {
    /// True until an operation fails.
    up: AtomicBool,
}

impl Link {
    /// Records a failure; true when this starts an outage (and was logged).
    fn failed(&self, operation: &'static str, error: &StoreError) -> bool {
        let was_up = self.up.swap(false, Ordering::Relaxed);
        if was_up {
            tracing::warn!(
                operation,
                error = %error,
                "redis unavailable: snapshots pause, ingestion goes on from memory"
            );
        }
        was_up
    }

    /// Records a success; true when this ends an outage (and was logged).
    fn succeeded(&self) -> bool {
        let was_down = !self.up.swap(true, Ordering::Relaxed);
        if was_down {
            tracing::info!("redis available again: snapshots resume");
        }
        was_down
    }
}

/// A restore in flight, awaited by every request that needs one of its devices.
type Restore = Shared<BoxFuture<'static, ()>>;

/// One pipeline of encoded devices on its way to Redis.
#[derive(Default)]
struct Batch {
    /// `SET key value EX ttl` per device, packed ([`resp::SetCommands`]).
    commands: Vec<u8>,
    /// The devices in it, in command order, to mark dirty again if a write fails.
    keys: Vec<DeviceKey>,
}

/// Emptied batches, back from the writers for the encoder to fill again: a batch of
/// 1,000 devices is a megabyte, and a fresh one per batch cost a page fault per 4 KiB.
type Recycled = Mutex<Vec<Batch>>;

/// Snapshots of one server: the store, and what connects it to the engine.
#[derive(Debug)]
pub struct Snapshots {
    /// The windows being snapshotted.
    engine: Arc<Engine>,
    /// Redis.
    store: Store,
    /// The settings.
    config: SnapshotConfig,
    /// Snapshot counters (writes, restores, failures) exported as metrics.
    counters: Arc<Counters>,
    /// Device id → its restore in flight; an entry lives until the device is in
    /// memory (or known to have no usable snapshot).
    restores: Mutex<HashMap<Box<str>, Restore>>,
    /// Outage tracking for logs.
    link: Link,
    /// Longer ids are refused by validation; no point reading them.
    max_device_id_len: usize,
}

impl Snapshots {
    /// Snapshots for `engine` in the Redis of `config`; connects lazily.
    pub fn new(
        config: SnapshotConfig,
        engine: Arc<Engine>,
        counters: Arc<Counters>,
    ) -> Result<Self, StoreError> {
        let store = Store::new(
            &config.url,
            config.pool_size,
            config.connect_timeout,
            config.command_timeout,
        )?;
        let max_device_id_len = engine.config().max_device_id_len;
        Ok(Self {
            engine,
            store,
            config,
            counters,
            restores: Mutex::new(HashMap::new()),
            link: Link {
                up: AtomicBool::new(true),
            },
            max_device_id_len,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SnapshotConfig {
        &self.config
    }

    /// The Redis store (tests and benchmarks read keys through it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Checks that Redis answers, logging an outage if it does not.
    pub async fn check(&self) -> Result<(), StoreError> {
        match self.store.ping().await {
            Ok(()) => {
                self.link.succeeded();
                Ok(())
            }
            Err(e) => {
                self.link.failed("ping", &e);
                Err(e)
            }
        }
    }

    /// Writes every dirty device to Redis; returns once every batch has been answered
    /// (or has failed and been marked dirty again).
    pub async fn flush(self: &Arc<Self>) -> FlushReport {
        let concurrency = self.config.pool_size as usize;
        let (tx, rx) = mpsc::channel::<Batch>(concurrency);
        let recycled = Arc::new(Recycled::default());
        let this = Arc::clone(self);
        let producer = tokio::task::spawn_blocking({
            let recycled = Arc::clone(&recycled);
            move || this.collect_dirty(&tx, &recycled)
        });
        let mut report = FlushReport::default();
        let mut writes = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|batch| self.write_batch(batch, &recycled))
            .buffer_unordered(concurrency);
        while let Some((written, failed)) = writes.next().await {
            report.written += written;
            report.failed += failed;
        }
        if let Err(e) = producer.await {
            tracing::error!(error = %e, "snapshot encoding task failed");
        }
        if report.failed > 0 {
            self.counters
                .snapshot_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        report
    }

    /// Encodes the dirty devices shard by shard into batches (blocking pool).
    fn collect_dirty(&self, tx: &mpsc::Sender<Batch>, recycled: &Recycled) {
        let engine = &*self.engine;
        let mut sets = resp::SetCommands::new(self.config.ttl_secs);
        let prefix = store::KEY_PREFIX.as_bytes();
        let mut keys = Vec::new();
        let mut batch = Batch::default();
        for shard in 0..engine.shard_count() {
            keys.clear();
            engine.dirty_keys(shard, &mut keys);
            let mut rest = &keys[..];
            while !rest.is_empty() {
                let room = (self.config.batch - batch.keys.len()).clamp(1, LOCK_CHUNK);
                let (chunk, tail) = rest.split_at(room.min(rest.len()));
                rest = tail;
                engine.visit_dirty(shard, chunk, |mut device| {
                    sets.push(&mut batch.commands, prefix, device.id().as_bytes(), |out| {
                        codec::encode_value(&device, out);
                    });
                    batch.keys.push(device.key());
                    device.mark_clean();
                });
                if batch.keys.len() >= self.config.batch && !self.send(tx, &mut batch, recycled) {
                    return;
                }
            }
        }
        if !batch.keys.is_empty() {
            self.send(tx, &mut batch, recycled);
        }
    }

    /// Hands a full batch to the writers and takes an emptied one to fill next; false
    /// when the writers are gone (the flush was abandoned), in which case the batch's
    /// devices are dirty again.
    fn send(&self, tx: &mpsc::Sender<Batch>, batch: &mut Batch, recycled: &Recycled) -> bool {
        let next = recycled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        let full = mem::replace(batch, next);
        match tx.blocking_send(full) {
            Ok(()) => true,
            Err(mpsc::error::SendError(lost)) => {
                self.engine.mark_dirty(&lost.keys);
                false
            }
        }
    }

    /// Writes one batch and hands its emptied buffers back; returns (written, failed)
    /// device counts.
    async fn write_batch(&self, mut batch: Batch, recycled: &Recycled) -> (u64, u64) {
        let devices = batch.keys.len() as u64;
        let mut refused = Vec::new();
        let result = self
            .store
            .write_sets(&batch.commands, batch.keys.len(), &mut refused)
            .await;
        let counts = match result {
            Ok(()) if refused.is_empty() => {
                self.link.succeeded();
                (devices, 0)
            }
            Ok(()) => {
                // Redis refused some commands (out of memory, say): those devices stay
                // dirty, the rest are written.
                let keys: Vec<DeviceKey> = refused.iter().map(|&(i, _)| batch.keys[i]).collect();
                self.engine.mark_dirty(&keys);
                let (_, first) = refused.swap_remove(0);
                self.link.failed("flush", &StoreError::Refused(first));
                let failed = keys.len() as u64;
                (devices - failed, failed)
            }
            Err(e) => {
                self.link.failed("flush", &e);
                self.engine.mark_dirty(&batch.keys);
                (0, devices)
            }
        };
        self.counters
            .snapshot_writes
            .fetch_add(counts.0, Ordering::Relaxed);
        batch.commands.clear();
        batch.keys.clear();
        recycled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(batch);
        counts
    }

    /// Whether some device of `samples` must be restored before they are judged
    /// (it is not in memory). One shard lookup per run of samples of one device.
    pub fn needs_restore(&self, samples: &[Sample]) -> bool {
        if self.engine.device_count() >= self.engine.config().max_devices {
            // No room for a restored device: new devices are refused anyway.
            return false;
        }
        let mut previous: Option<&str> = None;
        for sample in samples {
            let id = normalize_device_id(&sample.device_id);
            if previous == Some(id) {
                continue;
            }
            previous = Some(id);
            if id.len() <= self.max_device_id_len && !self.engine.contains(id) {
                return true;
            }
        }
        false
    }

    /// Restores every device of `samples` that is not in memory, from its snapshot if
    /// it has one, and returns when all of them are settled. A device already being
    /// restored for another request is waited for, not read again.
    pub async fn restore_missing(self: &Arc<Self>, samples: &[Sample]) {
        let mut seen = HashSet::new();
        let mut waits: Vec<Restore> = Vec::new();
        let mut mine: Vec<Box<str>> = Vec::new();
        {
            let mut restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
            for sample in samples {
                let id = normalize_device_id(&sample.device_id);
                if id.len() > self.max_device_id_len || !seen.insert(id) {
                    continue;
                }
                if let Some(restore) = restores.get(id) {
                    if !waits.last().is_some_and(|w| w.ptr_eq(restore)) {
                        waits.push(restore.clone());
                    }
                    continue;
                }
                // Checked under the restores lock: a finished restore inserts the
                // device before it leaves the map, so nothing is read twice.
                if !self.engine.contains(id) {
                    mine.push(id.into());
                }
            }
            if !mine.is_empty() {
                let ids: Arc<[Box<str>]> = mine.into();
                let this = Arc::clone(self);
                let task = tokio::spawn({
                    let ids = Arc::clone(&ids);
                    async move { this.load(&ids).await }
                });
                // The read runs as its own task: a client that goes away does not
                // cancel a restore that other requests wait for.
                let restore: Restore = task.map(drop).boxed().shared();
                for id in ids.iter() {
                    restores.insert(id.clone(), restore.clone());
                }
                waits.push(restore);
            }
        }
        futures::future::join_all(waits).await;
    }

    /// Reads, decodes and inserts the snapshots of `ids`, then forgets the restore.
    async fn load(&self, ids: &[Box<str>]) {
        for chunk in ids.chunks(self.config.batch) {
            match self.store.read(chunk).await {
                Ok(values) => {
                    self.link.succeeded();
                    let found: Vec<(Box<str>, Vec<u8>)> = chunk
                        .iter()
                        .cloned()
                        .zip(values)
                        .filter_map(|(id, value)| Some((id, value?)))
                        .collect();
                    if found.len() >= BLOCKING_DECODE {
                        let decoded = tokio::task::spawn_blocking(move || decode_all(found)).await;
                        if let Ok(decoded) = decoded {
                            self.insert_all(decoded);
                        }
                    } else {
                        self.insert_all(decode_all(found));
                    }
                }
                Err(e) => {
                    self.counters
                        .snapshot_read_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.link.failed("restore", &e);
                }
            }
        }
        let mut restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            restores.remove(id);
        }
    }

    fn insert_all(&self, decoded: Vec<(Box<str>, Result<DeviceState, codec::DecodeError>)>) {
        for (id, result) in decoded {
            match result {
                Ok(device) => {
                    if self.engine.insert_if_absent(device) {
                        self.counters
                            .snapshot_restores
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => self.decode_failed(&id, &e),
            }
        }
    }

    fn decode_failed(&self, device_id: &str, error: &codec::DecodeError) {
        self.counters
            .snapshot_decode_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(device_id, error = %error, "snapshot cannot be decoded; device starts fresh");
    }

    /// The snapshot of a device, without taking it into memory (`Analyze` of a device
    /// another replica holds). A value that cannot be decoded counts as none.
    pub async fn read(&self, device_id: &str) -> Result<Option<DeviceState>, StoreError> {
        let ids = [Box::<str>::from(device_id)];
        let value = match self.store.read(&ids).await {
            Ok(mut values) => {
                self.link.succeeded();
                values.pop().flatten()
            }
            Err(e) => {
                self.counters
                    .snapshot_read_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.link.failed("analyze", &e);
                return Err(e);
            }
        };
        let Some(value) = value else {
            return Ok(None);
        };
        match codec::decode_value(&value, device_id) {
            Ok(device) => Ok(Some(device)),
            Err(e) => {
                self.decode_failed(device_id, &e);
                Ok(None)
            }
        }
    }
}

fn decode_all(
    found: Vec<(Box<str>, Vec<u8>)>,
) -> Vec<(Box<str>, Result<DeviceState, codec::DecodeError>)> {
    found
        .into_iter()
        .map(|(id, value)| {
            let decoded = codec::decode_value(&value, &id);
            (id, decoded)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_logged_once_per_change() {
        let link = Link {
            up: AtomicBool::new(true),
        };
        let e = StoreError::Timeout(Duration::from_millis(1));
        assert!(link.failed("flush", &e));
        assert!(!link.failed("flush", &e));
        assert!(!link.failed("restore", &e));
        assert!(link.succeeded());
        assert!(!link.succeeded());
        assert!(link.failed("flush", &e));
    }
}
