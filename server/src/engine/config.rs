//! The engine's settings.

use std::time::Duration;

use super::detector::{self, DetectorDefaults, DetectorKind, RobustParams};

/// Engine settings (`docs/architecture.md`, "Engine semantics"); each is a flag and an
/// environment variable.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Values kept per (device, metric).
    pub window_size: usize,
    /// Values needed before a value can be an anomaly.
    pub min_samples: usize,
    /// |z| strictly above this is an anomaly.
    pub z_threshold: f64,
    /// Number of shards of the device table.
    pub shards: usize,
    /// A message of at least as many samples as there are shards takes every shard's
    /// lock once (let go and taken again every 128 samples, see `locks.rs`) instead of a
    /// lock per sample. Default: on when the process may run on one core, where no
    /// second runtime worker waits for a shard meanwhile. With one shard, a message
    /// always holds its lock.
    pub hold_shards: bool,
    /// Devices held in memory at most; a new device beyond it is refused per sample.
    pub max_devices: usize,
    /// Distinct metrics per device at most.
    pub max_metrics_per_device: usize,
    /// How far a `seq` may jump past its device's last one (`MAX_SEQ_JUMP`).
    pub max_seq_jump: u64,
    /// How far a `seq` may run ahead of the server's clock in microseconds when it
    /// jumps further than `max_seq_jump` (`MAX_SEQ_CLOCK_SKEW`).
    pub max_seq_clock_skew: Duration,
    /// Longest device id, in bytes.
    pub max_device_id_len: usize,
    /// Longest metric name, in bytes.
    pub max_metric_name_len: usize,
    /// A device without samples for this long is evicted from memory.
    pub idle_timeout: Duration,
    /// Detector of streams that name none (`DETECTOR`).
    pub detector: DetectorKind,
    /// Quiet samples that end an anomalous episode (`ALERT_COOLDOWN`).
    pub alert_cooldown: u32,
    /// Settings of the `robust` detector (`ROBUST_*`).
    pub robust: RobustParams,
    /// Instantaneous robust-z threshold of the `robust` detector (`ROBUST_THRESHOLD`).
    pub robust_threshold: f64,
    /// Warm-up of the `robust` detector (`ROBUST_MIN_SAMPLES`).
    pub robust_min_samples: usize,
    /// Bytes the devices in memory may hold (`MEMORY_BUDGET`).
    pub memory_budget: usize,
    /// Largest `window_size` a stream may ask for (`MAX_STREAM_WINDOW`).
    pub max_stream_window: usize,
    /// Devices are snapshotted: probation eviction takes only devices whose newest
    /// state is in Redis, and only when a device is admitted through a restore.
    pub snapshots: bool,
}

/// `MEMORY_BUDGET` when neither the setting nor a cgroup memory limit gives one.
pub const DEFAULT_MEMORY_BUDGET: usize = 2 << 30;

impl EngineConfig {
    /// The detector settings streams are resolved against.
    pub fn detector_defaults(&self) -> DetectorDefaults {
        DetectorDefaults {
            kind: self.detector,
            window_size: self.window_size.max(1),
            min_samples: self.min_samples,
            z_threshold: self.z_threshold,
            cooldown: self.alert_cooldown,
            robust: self.robust,
            robust_threshold: self.robust_threshold,
            robust_min_samples: self.robust_min_samples,
            max_window: self.max_stream_window,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        // Read once: on Linux it reads the process's affinity and cgroup CPU quota.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            window_size: 50,
            min_samples: 5,
            z_threshold: 2.0,
            shards: 4 * cores,
            hold_shards: cores == 1,
            max_devices: 1_000_000,
            max_metrics_per_device: 32,
            max_seq_jump: 1 << 32,
            max_seq_clock_skew: Duration::from_secs(3600),
            max_device_id_len: 128,
            max_metric_name_len: 64,
            idle_timeout: Duration::from_secs(3600),
            detector: DetectorKind::ZScore,
            alert_cooldown: detector::DEFAULT_COOLDOWN,
            robust: RobustParams::default(),
            robust_threshold: detector::robust::DEFAULT_THRESHOLD,
            robust_min_samples: detector::robust::DEFAULT_MIN_SAMPLES,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_stream_window: detector::MAX_WINDOW,
            snapshots: false,
        }
    }
}
