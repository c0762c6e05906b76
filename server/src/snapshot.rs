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
//!   Every read checks the key's type and length in Redis first: a key of another
//!   type, or a value above `SNAPSHOT_MAX_BYTES`, is counted and never transferred.
//! - **Delete** ([`Snapshots::delete`], `DeleteDevice`): the device is taken like a
//!   first sample takes it, leaves memory, and its keys are deleted with the version
//!   bumped as a tombstone, so no older copy on any replica is judged or written back
//!   (`docs/snapshots.md`, "Deleting a device").
//! - **Eviction** runs in the flusher right after a flush, and evicts only idle
//!   devices that are clean: an evicted device's newest state is always in Redis.
//! - **Shutdown** ([`Snapshots::flush`] once more after streams drained) writes
//!   everything that is dirty.
//!
//! Redis being slow or down costs a caller at most `REDIS_COMMAND_TIMEOUT`; the outage
//! is logged once when it starts and once when it ends, and counted.

pub mod codec;
mod error;
pub mod fence;
#[cfg(test)]
pub(crate) mod fixtures;
mod legacy;
pub mod resp;
pub mod store;
pub mod target;

use std::{
    collections::{HashMap, HashSet},
    mem,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bb8_redis::redis;
use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
};
use tidewatch_proto::v1::Sample;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    engine::{DeviceKey, DeviceState, Engine, Owner, normalize_device_id},
    telemetry::Counters,
};
pub use store::{Store, StoreError, cluster};

/// Prefix of every device key; the device id follows as is. The snapshot store and
/// the fencing keys both build on it.
pub const KEY_PREFIX: &str = "tidewatch:v1:device:";

/// Prefix of the key of a device whose id holds a brace (`{` or `}`): the id follows
/// in lowercase hex, so that the key has no hash tag and its version and owner keys
/// (`{<key>}:...`) share its Redis Cluster slot.
pub const HEX_KEY_PREFIX: &str = "tidewatch:v1:device-hex:";

/// Whether `device_id` is keyed in hex (see [`HEX_KEY_PREFIX`]).
pub fn keyed_in_hex(device_id: &str) -> bool {
    device_id.bytes().any(|b| b == b'{' || b == b'}')
}

/// The Redis key of a device's snapshot: `tidewatch:v1:device:<id>`, or
/// `tidewatch:v1:device-hex:<id in hex>` when the id holds a brace.
pub fn key(device_id: &str) -> String {
    let mut out = Vec::new();
    write_key(&mut out, device_id);
    String::from_utf8(out).unwrap_or_default()
}

/// Where builds before Redis Cluster support kept the snapshot of a device whose id
/// holds a brace (read once when the new key has none).
pub fn legacy_key(device_id: &str) -> Option<String> {
    keyed_in_hex(device_id).then(|| format!("{KEY_PREFIX}{device_id}"))
}

/// Appends the key of `device_id` to `out` (the flusher reuses one buffer).
pub fn write_key(out: &mut Vec<u8>, device_id: &str) {
    out.clear();
    if keyed_in_hex(device_id) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(HEX_KEY_PREFIX.as_bytes());
        for b in device_id.bytes() {
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        }
    } else {
        out.extend_from_slice(KEY_PREFIX.as_bytes());
        out.extend_from_slice(device_id.as_bytes());
    }
}

/// Devices encoded per shard-lock hold: bounds how long a flush can make an ingest
/// request on that shard wait. A message of many samples touches every shard, so
/// during a flush nearly every message meets the shard being encoded: with 256
/// devices per hold (~0.5 ms) ingestion crawled while a flush ran; 32 (~70 µs, about
/// what the message itself takes) keeps the wait small, and taking an uncontended
/// lock costs nothing next to encoding 32 KB.
const LOCK_CHUNK: usize = 32;

/// Restores of at least this many devices decode on the blocking pool.
const BLOCKING_DECODE: usize = 64;

/// How long a first sample waits for another live replica to hand its device over
/// before its verdict says `moved` (the client sends it again).
const HANDOFF_WAIT: Duration = Duration::from_secs(2);

/// How often a waiting replica asks the owner again whether it has let go.
const HANDOFF_POLL: Duration = Duration::from_millis(10);

/// Snapshot settings, from [`Config`].
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// `REDIS_URL` and the TLS and credential settings beside it.
    pub redis: target::RedisSettings,
    /// `REDIS_CLUSTER_NODES`: the seeds of a Redis Cluster, when snapshots go to one
    /// (`redis` then holds the first seed's URL alone, for logs).
    pub cluster_nodes: Option<String>,
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
    /// `SNAPSHOT_MAX_BYTES`: a larger value is not read (it counts as undecodable).
    pub max_bytes: u64,
}

impl SnapshotConfig {
    /// The snapshot settings, or `None` when neither `REDIS_URL` nor
    /// `REDIS_CLUSTER_NODES` is set.
    pub fn from_config(config: &Config) -> Option<Self> {
        let cluster_nodes = config.redis_cluster_nodes().map(str::to_owned);
        let url = match (config.redis_url(), &cluster_nodes) {
            (Some(url), _) => url.to_owned(),
            (None, Some(nodes)) => {
                let first = nodes.split(',').map(str::trim).find(|n| !n.is_empty())?;
                if first.contains("://") {
                    first.to_owned()
                } else {
                    format!("redis://{first}")
                }
            }
            (None, None) => return None,
        };
        Some(Self {
            redis: target::RedisSettings {
                url: url.into(),
                ca_file: config.redis_ca_file.clone(),
                client_cert: config.redis_client_cert.clone(),
                client_key: config.redis_client_key.clone(),
                username: config.redis_username.clone(),
                password_file: config.redis_password_file.clone(),
            },
            cluster_nodes,
            interval: config.snapshot_interval,
            ttl_secs: config.snapshot_ttl.as_secs().max(1),
            batch: config.snapshot_batch.max(1),
            pool_size: config.redis_pool_size.max(1),
            connect_timeout: config.redis_connect_timeout,
            command_timeout: config.redis_command_timeout,
            max_bytes: config.snapshot_max_bytes,
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

/// A restore (or a hand-off to another replica) in flight, awaited by every request
/// that needs one of its devices.
type Restore = Shared<BoxFuture<'static, Arc<Settled>>>;

/// How a restore or a hand-off ended.
#[derive(Debug, Default)]
pub struct Settled {
    /// Devices another live replica still holds: their samples are answered `moved`.
    pub blocked: Vec<Box<str>>,
    /// This was a hand-off: the device left memory, and a request that waited for it
    /// must take it back (acquire it again) before judging.
    pub handoff: bool,
}

/// What acquiring one device found.
enum Acquired {
    /// This replica owns it now: its version, what its key holds, and how many of its
    /// version and owner keys were of another type (deleted).
    Mine(u64, Fetched, u64),
    /// Another live replica kept it past [`HANDOFF_WAIT`].
    Held,
}

/// What a device's snapshot key held, as the read scripts report it
/// (`docs/architecture.md`, "Snapshot protocol", "Layout").
#[derive(Debug)]
enum Fetched {
    /// No key.
    Nothing,
    /// A value of at most `SNAPSHOT_MAX_BYTES`.
    Value(Vec<u8>),
    /// A key of another type than a string (a hash, a list, ...): never read.
    WrongType(String),
    /// A value of this many bytes, above `SNAPSHOT_MAX_BYTES`: never read.
    TooLarge(u64),
}

impl Fetched {
    /// From the value (or nil) and the optional problem of a read script's reply.
    fn from_reply(value: Option<Vec<u8>>, problem: Option<Vec<u8>>) -> Result<Self, StoreError> {
        let bad = || StoreError::Refused("unexpected reply to a snapshot read script".into());
        let Some(problem) = problem else {
            return Ok(value.map_or(Self::Nothing, Self::Value));
        };
        let problem = String::from_utf8_lossy(&problem);
        match problem.split_once(':') {
            Some(("type", kind)) => Ok(Self::WrongType(kind.to_owned())),
            Some(("size", len)) => Ok(Self::TooLarge(len.parse().map_err(|_| bad())?)),
            _ => Err(bad()),
        }
    }
}

/// What a deletion did, when it went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The device had state (in memory here, handed over by its owner, or in Redis).
    pub existed: bool,
    /// The tombstone version left in Redis.
    pub version: u64,
}

/// Why a deletion did not go through; nothing was deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// Another live replica kept the device past the hand-off wait.
    #[error("device {0:?} is held by another replica that did not let go in time; retry")]
    Held(String),
    /// Redis failed or did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One pipeline of encoded devices on its way to Redis.
#[derive(Default)]
struct Batch {
    /// `SET key value EX ttl` per device, packed ([`resp::SetCommands`]).
    commands: Vec<u8>,
    /// The devices in it, in command order, to mark dirty again if a write fails.
    keys: Vec<DeviceKey>,
    /// Their ids and fence tokens, in command order, to record the new version or
    /// drop a device whose write lost.
    ids: Vec<(Box<str>, u64)>,
    /// The Redis Cluster master every command of it goes to (`None`: the one Redis).
    node: Option<Arc<cluster::Node>>,
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
    /// This replica's id: the owner it writes into Redis.
    replica: String,
    /// The snapshot version each device in memory started from.
    versions: fence::Versions,
    /// The liveness key was renewed at least once (a later renewal that finds it gone
    /// means Redis lost it, and every device is written again).
    renewed: AtomicBool,
}

impl Snapshots {
    /// Snapshots for `engine` in the Redis of `config`; connects lazily.
    pub fn new(
        config: SnapshotConfig,
        engine: Arc<Engine>,
        counters: Arc<Counters>,
    ) -> Result<Self, StoreError> {
        let store = match &config.cluster_nodes {
            Some(nodes) => Store::cluster(
                nodes,
                config.pool_size,
                config.connect_timeout,
                config.command_timeout,
            )?,
            None => Store::with_target(
                target::RedisTarget::load(&config.redis)?,
                config.pool_size,
                config.connect_timeout,
                config.command_timeout,
            )?,
        };
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
            replica: fence::new_replica_id(),
            versions: fence::Versions::default(),
            renewed: AtomicBool::new(false),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SnapshotConfig {
        &self.config
    }

    /// Whether the connections to Redis speak TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.store.tls()
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

    /// Forgets the fences of devices that left memory (idle eviction). Their
    /// ownership stays in Redis until another replica asks for them: this replica
    /// then releases it without a write.
    pub fn forget(&self, evicted: &[DeviceState]) {
        for device in evicted {
            self.versions.remove(&device.id);
        }
    }

    /// Forgets the fences of devices evicted on probation ([`Engine::take_evicted`]),
    /// unless one came back meanwhile (it holds a fence of its own then).
    pub fn forget_evicted(&self, ids: &[Box<str>]) {
        for id in ids {
            if !self.engine.contains(id) {
                self.versions.remove(id);
            }
        }
    }

    /// This replica's id, as Redis knows it.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Renews this replica's liveness key; when Redis had lost it (Redis restarted
    /// empty, or this replica could not reach it for a whole lease), marks every
    /// device dirty so that this flush writes them all again.
    async fn renew(&self) {
        let lease = fence::lease(self.config.interval).as_millis().to_string();
        let key = fence::replica_key(&self.replica);
        match self
            .store
            .eval::<i64>(fence::RENEW, &[&key], &[lease.as_bytes()])
            .await
        {
            Ok(existed) => {
                if existed == 0 && self.renewed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "this replica's lease was gone from redis: writing every device again"
                    );
                    self.engine.mark_all_dirty();
                }
            }
            Err(e) => {
                self.link.failed("renew", &e);
            }
        }
    }

    /// Gives up this replica's lease (after the final flush): other replicas take
    /// its devices at once instead of waiting for the lease to run out.
    pub async fn retire(&self) {
        let key = fence::replica_key(&self.replica);
        let _ = self.store.eval::<i64>(fence::RENEW, &[&key], &[b"1"]).await;
    }

    /// Writes every dirty device to Redis; returns once every batch has been answered
    /// (or has failed and been marked dirty again).
    pub async fn flush(self: &Arc<Self>) -> FlushReport {
        self.renew().await;
        let mut report = FlushReport::default();
        // On a cluster, batches are made per master, by the slot map of this flush.
        let routing = match self.store.cluster_of() {
            None => None,
            Some(cluster) => match cluster.routing().await {
                Ok(routing) => Some(routing),
                Err(e) => {
                    // Nothing was taken: every dirty device stays dirty.
                    self.link.failed("flush", &e);
                    self.counters
                        .snapshot_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return report;
                }
            },
        };
        let concurrency = match &routing {
            Some(routing) => self.config.pool_size as usize * routing.nodes.len(),
            None => self.config.pool_size as usize,
        };
        let (tx, rx) = mpsc::channel::<Batch>(concurrency);
        let recycled = Arc::new(Recycled::default());
        let this = Arc::clone(self);
        let producer = tokio::task::spawn_blocking({
            let recycled = Arc::clone(&recycled);
            move || this.collect_dirty(&tx, &recycled, routing.as_deref())
        });
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

    /// Encodes the dirty devices shard by shard into batches (blocking pool): one
    /// batch being filled for the one Redis, or one per master of `routing`.
    fn collect_dirty(
        &self,
        tx: &mpsc::Sender<Batch>,
        recycled: &Recycled,
        routing: Option<&cluster::Routing>,
    ) {
        let engine = &*self.engine;
        let mut sets = fence::FlushCommands::new(self.config.ttl_secs, &self.replica);
        let mut keys = Vec::new();
        let node_of = |i: usize| routing.and_then(|r| r.nodes.get(i).cloned());
        let mut batches: Vec<Batch> = (0..routing.map_or(1, |r| r.nodes.len().max(1)))
            .map(|i| Batch {
                node: node_of(i),
                ..Batch::default()
            })
            .collect();
        let mut key = Vec::new();
        let mut oversized = 0u64;
        for shard in 0..engine.shard_count() {
            keys.clear();
            engine.dirty_keys(shard, &mut keys);
            let mut rest = &keys[..];
            while !rest.is_empty() {
                let room = match &batches[..] {
                    [one] => (self.config.batch - one.keys.len()).clamp(1, LOCK_CHUNK),
                    _ => LOCK_CHUNK,
                };
                let (chunk, tail) = rest.split_at(room.min(rest.len()));
                rest = tail;
                self.versions.with(|versions| {
                    engine.visit_dirty(shard, chunk, |mut device| {
                        let batch = match routing {
                            None => &mut batches[0],
                            Some(routing) => {
                                store::write_key(&mut key, device.id());
                                let i = routing.node_index(cluster::key_slot(&key));
                                let last = batches.len() - 1;
                                &mut batches[i.min(last)]
                            }
                        };
                        let fence = fence::Versions::begin_write(versions, device.id());
                        sets.push(
                            &mut batch.commands,
                            device.id(),
                            fence.version,
                            false,
                            |out| codec::encode_value(&device, out),
                        );
                        if sets.last_value_len() as u64 > self.config.max_bytes {
                            oversized += 1;
                        }
                        batch.keys.push(device.key());
                        batch.ids.push((device.id().into(), fence.token));
                        device.mark_clean();
                    });
                });
                for (i, batch) in batches.iter_mut().enumerate() {
                    if batch.keys.len() >= self.config.batch {
                        if !self.send(tx, batch, recycled) {
                            return;
                        }
                        batch.node = node_of(i);
                    }
                }
            }
        }
        for batch in &mut batches {
            if !batch.keys.is_empty() && !self.send(tx, batch, recycled) {
                return;
            }
        }
        if oversized > 0 {
            tracing::warn!(
                devices = oversized,
                limit = self.config.max_bytes,
                "snapshots larger than SNAPSHOT_MAX_BYTES written: they will not be restored; raise SNAPSHOT_MAX_BYTES"
            );
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
        let mut lost = Vec::new();
        let mut answered = vec![false; batch.ids.len()];
        let node = batch.node.take();
        let result = self
            .store
            .write_commands_on(
                node.as_deref(),
                &batch.commands,
                batch.keys.len(),
                |i, reply| {
                    answered[i] = true;
                    let (id, token) = &batch.ids[i];
                    match reply {
                        resp::Reply::Integer(version) if version > 0 => {
                            self.versions.end_write(id, *token, Some(version as u64));
                        }
                        resp::Reply::Integer(_) => {
                            // Another replica wrote this device after the state this
                            // one started from: its history wins, and this copy leaves
                            // memory (unless it was taken again since the write began).
                            if self.versions.end_write(id, *token, None) {
                                lost.push(i);
                            }
                        }
                        resp::Reply::Error(e) => {
                            self.versions.end_write(id, *token, None);
                            refused.push((i, e));
                        }
                        other => {
                            self.versions.end_write(id, *token, None);
                            refused.push((i, format!("unexpected reply {other:?}")));
                        }
                    }
                },
            )
            .await;
        for (i, (id, token)) in batch.ids.iter().enumerate() {
            if !answered[i] {
                self.versions.end_write(id, *token, None);
            }
        }
        if !lost.is_empty() {
            for &i in &lost {
                let (id, _) = &batch.ids[i];
                self.engine.remove(id);
                self.versions.remove(id);
            }
            tracing::info!(
                devices = lost.len(),
                "snapshot writes lost to another replica: those devices reload on their next sample"
            );
        }
        let counts = match result {
            Ok(()) if refused.is_empty() => {
                self.link.succeeded();
                (devices, 0)
            }
            Ok(()) => {
                // Redis refused some commands (out of memory, say, or a cluster slot
                // that moved): those devices stay dirty, the rest are written.
                if let Some(cluster) = self.store.cluster_of()
                    && refused.iter().any(|(_, e)| cluster::is_routing_error(e))
                {
                    cluster.mark_stale();
                }
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
        batch.ids.clear();
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
    /// it has one, taking ownership of it in Redis, and returns when all of them are
    /// settled, with the devices another live replica would not hand over (their
    /// samples are answered `moved`). A device already being restored for another
    /// request is waited for, not read again; one being handed to another replica is
    /// waited for and then taken back.
    ///
    /// With `owner` (a principal's name and `devices` quota), the devices restored
    /// count against that quota, and one that does not fit is not restored (its
    /// samples are refused with `device_quota` when judged).
    pub async fn restore_missing(
        self: &Arc<Self>,
        samples: &[Sample],
        owner: Option<(Arc<str>, u64)>,
    ) -> HashSet<Box<str>> {
        let mut blocked = HashSet::new();
        let mut ids: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for sample in samples {
            let id = normalize_device_id(&sample.device_id);
            if id.len() <= self.max_device_id_len && seen.insert(id) {
                ids.push(id);
            }
        }
        // A hand-off waited for sends its devices round again; two rounds are enough
        // unless the device keeps bouncing, and then its samples wait for the next try.
        for _ in 0..3 {
            let waited = self.restore_round(&ids, &owner).await;
            let mut again = Vec::new();
            for (id, settled) in waited {
                blocked.extend(settled.blocked.iter().cloned());
                if settled.handoff {
                    again.push(id);
                }
            }
            if again.is_empty() {
                return blocked;
            }
            ids = again;
        }
        blocked
    }

    /// One round of [`Snapshots::restore_missing`]: starts what is missing, waits for
    /// everything in flight, and returns each waited id with how it settled.
    async fn restore_round<'a>(
        self: &Arc<Self>,
        ids: &[&'a str],
        owner: &Option<(Arc<str>, u64)>,
    ) -> Vec<(&'a str, Arc<Settled>)> {
        let mut waits: Vec<(&'a str, Restore)> = Vec::new();
        let mut mine: Vec<Box<str>> = Vec::new();
        {
            let mut restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
            for &id in ids {
                if let Some(restore) = restores.get(id) {
                    waits.push((id, restore.clone()));
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
                let owner = owner.clone();
                let task = tokio::spawn({
                    let ids = Arc::clone(&ids);
                    async move { this.load(&ids, owner).await }
                });
                // The read runs as its own task: a client that goes away does not
                // cancel a restore that other requests wait for.
                let restore: Restore = task
                    .map(|settled| settled.unwrap_or_default())
                    .boxed()
                    .shared();
                for id in ids.iter() {
                    restores.insert(id.clone(), restore.clone());
                }
                waits.push(("", restore));
            }
        }
        let outcomes = futures::future::join_all(waits.iter().map(|(_, w)| w.clone())).await;
        waits.into_iter().map(|(id, _)| id).zip(outcomes).collect()
    }

    /// Acquires, reads, decodes and inserts the snapshots of `ids`, then forgets the
    /// restore.
    async fn load(&self, ids: &[Box<str>], owner: Option<(Arc<str>, u64)>) -> Arc<Settled> {
        let owner = owner.as_ref().map(|(name, limit)| Owner {
            name,
            limit: *limit,
        });
        if !self.renewed.load(Ordering::Relaxed) {
            // Others must see this replica live before it owns anything, or they
            // would take its devices for a dead replica's.
            self.renew().await;
        }
        let mut settled = Settled::default();
        for chunk in ids.chunks(self.config.batch) {
            let acquired = futures::future::join_all(chunk.iter().map(|id| self.acquire(id))).await;
            let mut found = Vec::new();
            for (id, result) in chunk.iter().zip(acquired) {
                match result {
                    Ok(Acquired::Mine(version, fetched, fixed)) => {
                        self.link.succeeded();
                        if fixed > 0 {
                            self.counters
                                .snapshot_wrong_type
                                .fetch_add(fixed, Ordering::Relaxed);
                            tracing::warn!(
                                device_id = &**id,
                                keys = fixed,
                                "version or owner key of the device held another redis type than a string: deleted"
                            );
                        }
                        match fetched {
                            Fetched::Value(value) => found.push((id.clone(), version, value)),
                            Fetched::Nothing => self.start_fresh(id, Some(version), owner),
                            unread => {
                                // Its first write replaces what could not be read.
                                self.unreadable(id, &unread);
                                self.start_fresh(id, Some(version), owner);
                            }
                        }
                    }
                    Ok(Acquired::Held) => settled.blocked.push(id.clone()),
                    Err(e) => {
                        self.counters
                            .snapshot_read_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.link.failed("restore", &e);
                        self.start_fresh(id, None, owner);
                    }
                }
            }
            if found.len() >= BLOCKING_DECODE {
                let decoded = tokio::task::spawn_blocking(move || decode_all(found)).await;
                if let Ok(decoded) = decoded {
                    self.insert_all(decoded, owner);
                }
            } else {
                self.insert_all(decode_all(found), owner);
            }
        }
        let mut restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            restores.remove(id);
        }
        Arc::new(settled)
    }

    /// Makes this replica the owner of `device_id` and reads its snapshot, in one
    /// round trip when nobody else owns it (see [`Snapshots::as_owner`]).
    async fn acquire(&self, device_id: &str) -> Result<Acquired, StoreError> {
        let ttl = self.config.ttl_secs.to_string();
        let cap = self.config.max_bytes.to_string();
        let args = [self.replica.as_bytes(), ttl.as_bytes(), cap.as_bytes()];
        match self
            .as_owner(device_id, fence::ACQUIRE, &args, parse_acquired)
            .await?
        {
            Some(Acquired::Mine(0, Fetched::Nothing, fixed)) => self.legacy(device_id, fixed).await,
            Some(mine) => Ok(mine),
            None => Ok(Acquired::Held),
        }
    }

    /// Runs `script` (`KEYS`: snapshot, version, owner) until it answers as the
    /// device's owner, or `None` when another live replica keeps it. The script
    /// refuses (`parse` gives `Err(owner)`) while another replica owns the device:
    /// then a live owner is asked to hand the device over, and asked again, for up to
    /// [`HANDOFF_WAIT`]; a dead one (its lease ran out) is cleared.
    async fn as_owner<T>(
        &self,
        device_id: &str,
        script: &'static str,
        args: &[&[u8]],
        parse: fn(redis::Value) -> Result<Result<T, String>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let keys = [
            store::key(device_id),
            fence::version_key(device_id),
            fence::owner_key(device_id),
        ];
        let keys = [keys[0].as_str(), keys[1].as_str(), keys[2].as_str()];
        let started = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut asked: Option<Instant> = None;
        loop {
            let reply: redis::Value = self.store.eval(script, &keys, args).await?;
            let owner = match parse(reply)? {
                Ok(mine) => return Ok(Some(mine)),
                Err(owner) => owner,
            };
            let Some(alive_for) = self.store.ttl(&fence::replica_key(&owner)).await? else {
                // The owner's lease ran out: it died, or lost Redis for a whole lease
                // (and then drops what it holds when its writes lose).
                self.store
                    .eval::<i64>(fence::TAKE_OVER, &[keys[2]], &[owner.as_bytes()])
                    .await?;
                continue;
            };
            // A live owner answers within milliseconds; one that does not is likely
            // dead, and its lease runs out within `alive_for`: wait for whichever
            // comes first, but never longer than a lease and a second.
            let lease = fence::lease(self.config.interval);
            let limit = *deadline.get_or_insert_with(|| {
                let until_dead = alive_for.saturating_add(HANDOFF_POLL * 5);
                started + HANDOFF_WAIT.max(until_dead.min(lease + Duration::from_secs(1)))
            });
            let now = Instant::now();
            if now >= limit {
                return Ok(None);
            }
            if asked.is_none_or(|at| now.duration_since(at) >= HANDOFF_WAIT / 4) {
                self.store
                    .publish(&fence::handoff_channel(&owner), device_id)
                    .await?;
                asked = Some(now);
            }
            tokio::time::sleep(HANDOFF_POLL).await;
        }
    }

    /// A device taken with no snapshot and no version: when its id holds a brace,
    /// builds before Redis Cluster support kept it under another key
    /// (`store::legacy_key`), read once here (checked as [`fence::READ`] checks any
    /// read); its first write goes to the new key.
    async fn legacy(&self, device_id: &str, fixed: u64) -> Result<Acquired, StoreError> {
        let fetched = match store::legacy_key(device_id) {
            Some(key) => {
                let cap = self.config.max_bytes.to_string();
                let reply = self
                    .store
                    .eval::<redis::Value>(fence::READ, &[&key], &[cap.as_bytes()])
                    .await?;
                parse_read(reply)?
            }
            None => Fetched::Nothing,
        };
        Ok(Acquired::Mine(0, fetched, fixed))
    }

    /// Deletes `device_id` everywhere (`DeleteDevice`; `docs/snapshots.md`, "Deleting
    /// a device"): takes it the way a first sample does (its owner, if another live
    /// replica, hands it over and drops its copy), removes it from memory here and
    /// from Redis, and leaves its version bumped in Redis, so a copy any replica
    /// still holds loses its next write and is dropped. Every replica is also told
    /// on [`fence::DELETED_CHANNEL`], and drops an older copy at once.
    ///
    /// Requests here for the device wait until it is done, then start it fresh. The
    /// work runs as its own task: a caller that goes away does not cut it in half.
    /// When it fails, nothing is deleted (a copy taken out of memory goes back).
    pub async fn delete(self: &Arc<Self>, device_id: &str) -> Result<Deleted, DeleteError> {
        let id: Box<str> = device_id.into();
        let (done, finished) = tokio::sync::oneshot::channel();
        loop {
            let waiting = {
                let mut restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
                match restores.get(&id) {
                    Some(restore) => restore.clone(),
                    None => {
                        let this = Arc::clone(self);
                        let task_id = id.clone();
                        self.hold_device(&mut restores, id.clone(), async move {
                            let _ = done.send(this.erase(&task_id).await);
                        });
                        break;
                    }
                }
            };
            // A restore or a hand-off of the device is in flight: let it finish first.
            waiting.await;
        }
        finished.await.unwrap_or_else(|_| {
            Err(DeleteError::Store(StoreError::Refused(
                "the deletion task failed".into(),
            )))
        })
    }

    /// The work of [`Snapshots::delete`].
    async fn erase(&self, device_id: &str) -> Result<Deleted, DeleteError> {
        let removed = self.engine.remove(device_id);
        let ttl = self.config.ttl_secs.to_string();
        let args = [self.replica.as_bytes(), ttl.as_bytes()];
        let result = match self
            .as_owner(device_id, fence::DELETE, &args, parse_deleted)
            .await
        {
            Ok(Some(deleted)) => Ok(deleted),
            Ok(None) => Err(DeleteError::Held(device_id.to_owned())),
            Err(e) => {
                self.link.failed("delete", &e);
                Err(DeleteError::Store(e))
            }
        };
        match result {
            Ok(mut deleted) => {
                self.link.succeeded();
                self.versions.remove(device_id);
                deleted.existed |= removed.is_some();
                let notice = format!("{} {device_id}", deleted.version);
                if let Err(e) = self.store.publish(fence::DELETED_CHANNEL, &notice).await {
                    tracing::debug!(device_id, error = %e, "deletion notice not published");
                }
                Ok(deleted)
            }
            Err(e) => {
                if let Some(mut state) = removed {
                    state.dirty = true;
                    self.engine.insert_if_absent(state);
                }
                Err(e)
            }
        }
    }

    /// A deletion notice from [`fence::DELETED_CHANNEL`]: drops this replica's copy
    /// of the device if it started from a version older than the deletion's.
    fn deleted_elsewhere(&self, notice: &str) {
        let Some((version, device_id)) = notice.split_once(' ') else {
            return;
        };
        let Ok(version) = version.parse::<u64>() else {
            return;
        };
        if self.versions.get(device_id).version >= version {
            return;
        }
        let restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
        if restores.contains_key(device_id) {
            // Being taken (or deleted) here right now: that reads the newer state.
            return;
        }
        if self.engine.remove(device_id).is_some() {
            self.versions.remove(device_id);
            tracing::info!(
                device_id,
                "device deleted by another replica: this copy is dropped"
            );
        }
    }

    /// Listens for hand-off requests addressed to this replica until `stop`, and
    /// hands each device asked for over (see [`Snapshots::hand_off`]).
    pub async fn serve_handoffs(self: Arc<Self>, stop: CancellationToken) {
        let channel = fence::handoff_channel(&self.replica);
        loop {
            let listen = async {
                let client = self.store.subscriber()?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                pubsub.subscribe(fence::DELETED_CHANNEL).await?;
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    if message.get_channel_name() == fence::DELETED_CHANNEL {
                        self.deleted_elsewhere(&payload);
                    } else {
                        self.hand_off(payload.into());
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = listen => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "hand-off subscription lost; reconnecting");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Hands `device_id` to the replica that asked: takes it out of memory, writes
    /// its final snapshot and gives ownership up in one fenced write (or only gives
    /// ownership up when it is not in memory). Requests here for that device wait
    /// until it is done and then take it back. When Redis does not answer, the device
    /// goes back into memory, still owned here.
    fn hand_off(self: &Arc<Self>, device_id: Box<str>) {
        let mut restores = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
        if restores.contains_key(&device_id) {
            // Being restored here right now: this replica is not the owner yet, or
            // is becoming it; the asker asks again.
            return;
        }
        let this = Arc::clone(self);
        let id = device_id.clone();
        self.hold_device(&mut restores, device_id, async move {
            this.give_up(&id).await;
        });
    }

    /// Runs `work` on `device_id` as a task of its own (a caller that goes away does
    /// not cut it in half) while holding the device's slot in `restores` (whose lock
    /// the caller holds, and which must be free): requests for the device wait for
    /// the work, then take the device again, as after a hand-off. The slot is freed
    /// when the work ends, and also if it panics.
    fn hold_device(
        self: &Arc<Self>,
        restores: &mut HashMap<Box<str>, Restore>,
        device_id: Box<str>,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        /// Frees the slot when dropped: after the work, or while a panic unwinds.
        struct Release(Arc<Snapshots>, Box<str>);
        impl Drop for Release {
            fn drop(&mut self) {
                let mut restores = self
                    .0
                    .restores
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                restores.remove(&self.1);
            }
        }
        let release = Release(Arc::clone(self), device_id.clone());
        let task = tokio::spawn(async move {
            let _release = release;
            work.await;
        });
        let held: Restore = task
            .map(|_| {
                Arc::new(Settled {
                    blocked: Vec::new(),
                    handoff: true,
                })
            })
            .boxed()
            .shared();
        restores.insert(device_id, held);
    }

    /// The work of [`Snapshots::hand_off`]. The device leaves memory first (so the
    /// flusher cannot begin another write of it), then the writes of it in flight
    /// are waited for (a hand-off written before an older flush would lose to it),
    /// then the final write goes with ownership.
    async fn give_up(&self, device_id: &str) {
        let holder = self.engine.holder_of(device_id);
        let removed = self.engine.remove(device_id);
        let deadline = Instant::now() + self.config.command_timeout;
        while self.versions.get(device_id).in_flight > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let Some(mut state) = removed else {
            let owner = fence::owner_key(device_id);
            let _ = self
                .store
                .eval::<i64>(fence::RELEASE, &[&owner], &[self.replica.as_bytes()])
                .await;
            self.versions.remove(device_id);
            return;
        };
        let base = self.versions.get(device_id).version;
        let mut command = Vec::new();
        fence::FlushCommands::new(self.config.ttl_secs, &self.replica).push(
            &mut command,
            device_id,
            base,
            true,
            |out| codec::encode_value(&state, out),
        );
        let mut answer = None;
        let result = match self.store.writer_for(device_id).await {
            Ok(node) => {
                self.store
                    .write_commands_on(node.as_deref(), &command, 1, |_, reply| {
                        answer = Some(reply);
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match (result, answer) {
            (Ok(()), Some(resp::Reply::Integer(version))) => {
                // Written (or lost to a newer history): either way not held here.
                self.versions.remove(device_id);
                if version > 0 {
                    self.counters
                        .snapshot_writes
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            (result, answer) => {
                tracing::warn!(device_id, ?answer, error = ?result.err(), "hand-off write failed; the device stays here");
                state.dirty = true;
                // Counted again for its principal, whatever its quota says now: it
                // never left this replica for the principal.
                let owner = holder.as_deref().map(|name| Owner {
                    name,
                    limit: u64::MAX,
                });
                if owner.is_none() || !self.engine.insert_if_absent_for(state.clone(), owner) {
                    // (Or uncounted, when the registry of principals is full.)
                    self.engine.insert_if_absent(state);
                }
            }
        }
    }

    fn insert_all(&self, decoded: Decoded, owner: Option<Owner<'_>>) {
        for (id, version, result) in decoded {
            match result {
                Ok(device) => {
                    if self.engine.insert_if_absent_for(device, owner) {
                        self.versions.taken(&id, version);
                        self.counters
                            .snapshot_restores
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    // The device starts fresh here, and its first write replaces
                    // what could not be read.
                    self.decode_failed(&id, &e);
                    self.start_fresh(&id, Some(version), owner);
                }
            }
        }
    }

    /// Puts a device with no history into memory (it had no snapshot, or Redis could
    /// not give it), so that the request that asked judges it as settled; `version`
    /// is what its first write expects, when Redis answered.
    fn start_fresh(&self, device_id: &str, version: Option<u64>, owner: Option<Owner<'_>>) {
        if self
            .engine
            .insert_if_absent_for(DeviceState::new(device_id), owner)
        {
            self.versions.taken(device_id, version.unwrap_or(0));
        }
    }

    fn decode_failed(&self, device_id: &str, error: &codec::DecodeError) {
        self.counters
            .snapshot_decode_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(device_id, error = %error, "snapshot cannot be decoded; device starts fresh");
    }

    /// Counts and logs a snapshot key that was not read: a value above
    /// `SNAPSHOT_MAX_BYTES` is a decode error, a key of another type is counted on
    /// its own. One line per read that finds it; a restore's first write replaces it.
    fn unreadable(&self, device_id: &str, fetched: &Fetched) {
        match fetched {
            Fetched::TooLarge(bytes) => {
                self.counters
                    .snapshot_decode_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    device_id,
                    bytes,
                    limit = self.config.max_bytes,
                    "snapshot is larger than SNAPSHOT_MAX_BYTES and was not read; device starts fresh"
                );
            }
            Fetched::WrongType(kind) => {
                self.counters
                    .snapshot_wrong_type
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    device_id,
                    key = %store::key(device_id),
                    redis_type = %kind,
                    "snapshot key holds a redis {kind}, not a string; device starts fresh"
                );
            }
            Fetched::Nothing | Fetched::Value(_) => {}
        }
    }

    /// The snapshot of a device, without taking it into memory (`Analyze` of a device
    /// another replica holds). A value that cannot be decoded counts as none.
    pub async fn read(&self, device_id: &str) -> Result<Option<DeviceState>, StoreError> {
        let key = store::key(device_id);
        let cap = self.config.max_bytes.to_string();
        let reply = self
            .store
            .eval::<redis::Value>(fence::READ, &[&key], &[cap.as_bytes()])
            .await
            .and_then(parse_read);
        let value = match reply {
            Ok(Fetched::Value(value)) => {
                self.link.succeeded();
                Some(value)
            }
            Ok(Fetched::Nothing) => {
                self.link.succeeded();
                None
            }
            Ok(unread) => {
                self.link.succeeded();
                self.unreadable(device_id, &unread);
                None
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

/// Decoded snapshots: device id, the version they were read at, the device.
type Decoded = Vec<(Box<str>, u64, Result<DeviceState, codec::DecodeError>)>;

fn decode_all(found: Vec<(Box<str>, u64, Vec<u8>)>) -> Decoded {
    found
        .into_iter()
        .map(|(id, version, value)| {
            let decoded = codec::decode_value(&value, &id);
            (id, version, decoded)
        })
        .collect()
}

/// The reply of [`fence::DELETE`]: `Ok` when it deleted, `Err(owner)` when another
/// replica owns the device.
fn parse_deleted(reply: redis::Value) -> Result<Result<Deleted, String>, StoreError> {
    let bad = || StoreError::Refused("unexpected reply to the delete script".into());
    let redis::Value::Array(items) = reply else {
        return Err(bad());
    };
    match items.as_slice() {
        [
            redis::Value::Int(1),
            redis::Value::Int(existed),
            redis::Value::Int(version),
        ] => Ok(Ok(Deleted {
            existed: *existed > 0,
            version: u64::try_from(*version).map_err(|_| bad())?,
        })),
        [redis::Value::Int(0), redis::Value::BulkString(owner)] => {
            Ok(Err(String::from_utf8_lossy(owner).into_owned()))
        }
        _ => Err(bad()),
    }
}

/// The reply of [`fence::READ`].
fn parse_read(reply: redis::Value) -> Result<Fetched, StoreError> {
    let bad = || StoreError::Refused("unexpected reply to the read script".into());
    let redis::Value::Array(items) = reply else {
        return Err(bad());
    };
    let mut items = items.into_iter().map(|item| match item {
        redis::Value::BulkString(bytes) => Ok(Some(bytes)),
        redis::Value::Nil => Ok(None),
        _ => Err(bad()),
    });
    let value = items.next().transpose()?.flatten();
    let problem = items.next().transpose()?.flatten();
    Fetched::from_reply(value, problem)
}

/// The reply of [`fence::ACQUIRE`]: `Ok` when this replica owns the device now,
/// `Err(owner)` when another one does.
fn parse_acquired(reply: redis::Value) -> Result<Result<Acquired, String>, StoreError> {
    let bad = || StoreError::Refused("unexpected reply to the acquire script".into());
    let redis::Value::Array(items) = reply else {
        return Err(bad());
    };
    let mut items = items.into_iter();
    let status = items.next().ok_or_else(bad)?;
    let text = |value: redis::Value| -> Result<Option<Vec<u8>>, StoreError> {
        match value {
            redis::Value::BulkString(bytes) => Ok(Some(bytes)),
            redis::Value::Nil => Ok(None),
            redis::Value::Int(n) => Ok(Some(n.to_string().into_bytes())),
            _ => Err(bad()),
        }
    };
    match status {
        redis::Value::Int(1) => {
            let version = text(items.next().ok_or_else(bad)?)?
                .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
                .ok_or_else(bad)?;
            let value = match items.next() {
                Some(value) => text(value)?,
                None => None,
            };
            let problem = match items.next() {
                Some(problem) => text(problem)?,
                None => None,
            };
            let fixed = match items.next() {
                Some(redis::Value::Int(n)) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            };
            Ok(Ok(Acquired::Mine(
                version,
                Fetched::from_reply(value, problem)?,
                fixed,
            )))
        }
        redis::Value::Int(0) => {
            let owner = text(items.next().ok_or_else(bad)?)?.ok_or_else(bad)?;
            Ok(Err(String::from_utf8_lossy(&owner).into_owned()))
        }
        _ => Err(bad()),
    }
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
