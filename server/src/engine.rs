//! The detection engine: per (device, metric) rolling windows, sharded by device id.
//!
//! Every transport (gRPC `Ingest`, the HTTP gateway, snapshot restore) goes through
//! [`Engine`]. It is synchronous on purpose: each call locks one shard for the time
//! it takes to judge one sample (well under a microsecond) and never awaits. It knows
//! no transport and no storage: the snapshot module turns [`DeviceState`] into bytes
//! and back through the generated `DeviceSnapshot` message.
//!
//! # Layout
//!
//! - `sharded.rs`: [`Engine`], the device table split in shards, and whole-device
//!   reads and writes (`Analyze`, restore); `config.rs`: [`EngineConfig`].
//! - `ingest.rs`: judging a message, the hot loop. Its lock policy (a lock per sample,
//!   or every shard held for the message) is `locks.rs`; its look-ahead queue, which
//!   prefetches a sample's cache lines a few samples before it is judged, is
//!   `lookahead.rs` (with `prefetch.rs`, the hint itself); `validate.rs` says what a
//!   sample must be; `clock.rs` gives receive times and the idle tick.
//! - `flush.rs`: what the snapshot flusher and the idle evictor ask of the engine.
//! - `holders.rs`: the devices each principal holds, against its `devices` quota.
//! - `shard.rs` (one shard's table), `index.rs` (its hash index), `pool.rs` (its window
//!   values), `names.rs` (its metric names), `resident.rs` (a device in memory, and
//!   judging one value).
//! - `device.rs`: a device as a snapshot holds it, converted to and from the generated
//!   message; `persist.rs`: that message's bytes written straight from memory.
//! - `window.rs` (the rolling statistics), `detector.rs` (the rules behind `anomaly`,
//!   `score` and `alert`), `io.rs` (what samples come as and verdicts go to).

mod budget;
mod clock;
mod config;
pub mod detector;
mod device;
mod flush;
mod holders;
mod index;
mod ingest;
mod io;
mod locks;
mod lookahead;
mod names;
mod persist;
mod pool;
mod prefetch;
mod resident;
mod shard;
mod sharded;
#[cfg(test)]
pub(crate) mod tests;
mod validate;
mod window;

pub use clock::now_timestamp;
pub use config::{DEFAULT_MEMORY_BUDGET, EngineConfig};
pub use detector::{DetectorDefaults, DetectorKind, DetectorSpec, DetectorState, RobustParams};
pub use device::{DeviceState, MetricState, analyze_response};
pub use flush::{DeviceKey, DirtyDevice};
pub use holders::Owner;
pub use ingest::BatchOutcome;
pub(crate) use io::text;
pub use io::{AnomalyKeeper, MetricOutcome, SampleLike, Tee, VerdictSink};
pub use persist::StateError;
pub use sharded::Engine;
pub use validate::{DEFAULT_DEVICE, normalize_device_id, validate_metric_name};
pub use window::{MAX_WINDOW_SIZE, Window};
