//! A device and its metrics as a snapshot holds them (the owned form: restore,
//! eviction, `Analyze` from a snapshot, tests), their conversion to and from the
//! generated snapshot message, and the message's bytes written from either this form
//! or the compact form the engine keeps in memory (`resident.rs`).

use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{AnalyzeResponse, DeviceSnapshot, MetricSnapshot, MetricStats, Source};

use super::detector::{DetectorState, Episode, RobustState};
use super::persist::{self, StateError, finite};
use super::window::{Ring, Window};

/// State of one metric of one device, as a snapshot holds it (the engine keeps the
/// compact form in `resident.rs`, and converts at restore, eviction and `Analyze` of a
/// snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricState {
    /// The metric's name.
    pub name: Box<str>,
    /// The last values and their statistics.
    pub window: Window,
    /// The last value applied (what `Analyze` reports as `last_value`).
    pub last_value: f64,
    /// The z-score of the last value.
    pub last_z: f64,
    /// Whether the last value was anomalous.
    pub last_anomaly: bool,
    /// Anomalous values since this state was created.
    pub anomalies_total: u64,
    /// Episode and detector-specific state (snapshotted with the window).
    pub detector: DetectorState,
}

impl MetricState {
    /// A metric that has seen nothing yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            window: Window::new(),
            last_value: 0.0,
            last_z: 0.0,
            last_anomaly: false,
            anomalies_total: 0,
            detector: DetectorState::default(),
        }
    }

    /// The metric as a snapshot message.
    pub fn to_snapshot(&self) -> MetricSnapshot {
        MetricSnapshot {
            name: String::from(&*self.name),
            last_value: Some(self.last_value),
            last_z_score: Some(self.last_z),
            last_anomaly: self.last_anomaly,
            anomalies_total: self.anomalies_total,
            window: Some(self.window.to_snapshot()),
            episode_active: self.detector.episode.active,
            episode_quiet: self.detector.episode.quiet,
            robust: self
                .detector
                .robust
                .as_deref()
                .map(RobustState::to_snapshot),
        }
    }

    /// The metric a snapshot message holds.
    pub fn from_snapshot(message: MetricSnapshot) -> Result<Self, StateError> {
        if message.name.is_empty() {
            return Err(StateError::empty("metric name"));
        }
        Ok(Self {
            name: message.name.into(),
            last_value: finite(message.last_value.unwrap_or_default(), "last value")?,
            last_z: message.last_z_score.unwrap_or_default(),
            last_anomaly: message.last_anomaly,
            anomalies_total: message.anomalies_total,
            window: Window::from_snapshot(message.window.unwrap_or_default())?,
            detector: DetectorState {
                episode: Episode {
                    active: message.episode_active,
                    quiet: message.episode_quiet,
                },
                robust: match message.robust {
                    Some(robust) => Some(Box::new(RobustState::from_snapshot(robust)?)),
                    None => None,
                },
            },
        })
    }

    /// The fields [`write_device`] writes.
    fn fields(&self) -> MetricFields<'_> {
        MetricFields {
            name: &self.name,
            last_value: self.last_value,
            last_z: self.last_z,
            last_anomaly: self.last_anomaly,
            anomalies_total: self.anomalies_total,
            ring: &self.window.ring,
            values: &self.window.values,
            episode: self.detector.episode,
            robust: self.detector.robust.as_deref(),
        }
    }

    /// The metric's statistics as `Analyze` reports them.
    pub fn stats(&self) -> MetricStats {
        MetricStats {
            metric: String::from(&*self.name),
            rolling_average: self.window.mean(),
            stddev: self.window.stddev(),
            window_count: self.window.len() as u32,
            last_value: self.last_value,
            last_z_score: self.last_z,
            last_anomaly: self.last_anomaly,
            anomalies_total: self.anomalies_total,
        }
    }
}

/// State of one device, as a snapshot holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// The device id (after "" became "default").
    pub id: Box<str>,
    /// Highest `seq` applied; samples at or below it are duplicates.
    pub last_seq: u64,
    /// Metrics in the order they were first seen (at most `MAX_METRICS_PER_DEVICE`).
    pub metrics: Vec<MetricState>,
    /// Time of the last applied sample (the sample's own time, or receive time).
    pub updated_at: Timestamp,
    /// Changed since the last snapshot flush.
    pub dirty: bool,
}

impl DeviceState {
    /// A device with no history.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            last_seq: 0,
            metrics: Vec::new(),
            updated_at: Timestamp::default(),
            dirty: false,
        }
    }

    /// Appends the device's `DeviceSnapshot` message: exactly the bytes prost
    /// writes for [`DeviceState::to_snapshot`], without building it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_device(
            out,
            &self.id,
            self.last_seq,
            &self.updated_at,
            self.metrics.iter().map(MetricState::fields),
        );
    }

    /// The device as a snapshot message.
    pub fn to_snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot {
            device_id: String::from(&*self.id),
            last_seq: self.last_seq,
            updated_at_seconds: self.updated_at.seconds,
            updated_at_nanos: self.updated_at.nanos,
            metrics: self.metrics.iter().map(MetricState::to_snapshot).collect(),
        }
    }

    /// The device a snapshot message holds, if the engine can have written it. The
    /// result is clean (not dirty); the engine sets its clock when it takes it in.
    pub fn from_snapshot(message: DeviceSnapshot) -> Result<Self, StateError> {
        if message.device_id.is_empty() {
            return Err(StateError::empty("device id"));
        }
        let mut device = Self::new(&message.device_id);
        device.last_seq = message.last_seq;
        device.updated_at = Timestamp {
            seconds: message.updated_at_seconds,
            nanos: message.updated_at_nanos,
        };
        device.metrics.reserve_exact(message.metrics.len());
        for metric in message.metrics {
            let metric = MetricState::from_snapshot(metric)?;
            if device.metric_index(&metric.name).is_some() {
                return Err(StateError {
                    field: "metric name",
                    reason: format!("{:?} appears twice", metric.name),
                });
            }
            device.metrics.push(metric);
        }
        Ok(device)
    }

    /// Index of a metric by name.
    #[inline]
    pub(crate) fn metric_index(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|m| &*m.name == name)
    }
}

/// Writes a `DeviceSnapshot` message (see `persist.rs`): id, `seq`, `updated_at`, then
/// each metric.
#[inline]
pub(crate) fn write_device<'a>(
    out: &mut Vec<u8>,
    id: &str,
    last_seq: u64,
    updated_at: &Timestamp,
    metrics: impl Iterator<Item = MetricFields<'a>>,
) {
    persist::string(out, 1, id);
    persist::varint(out, 2, last_seq);
    persist::varint(out, 3, updated_at.seconds as u64);
    // An `int32` is sign-extended to 64 bits on the wire.
    persist::varint(out, 4, i64::from(updated_at.nanos) as u64);
    for metric in metrics {
        write_metric(out, 5, metric);
    }
}

/// What a metric's snapshot message holds, wherever the metric lives.
pub(crate) struct MetricFields<'a> {
    pub(crate) name: &'a str,
    pub(crate) last_value: f64,
    pub(crate) last_z: f64,
    pub(crate) last_anomaly: bool,
    pub(crate) anomalies_total: u64,
    pub(crate) ring: &'a Ring,
    /// The ring's slots.
    pub(crate) values: &'a [f64],
    pub(crate) episode: Episode,
    pub(crate) robust: Option<&'a RobustState>,
}

/// Writes a metric as the `MetricSnapshot` field `tag`.
#[inline]
fn write_metric(out: &mut Vec<u8>, tag: u8, m: MetricFields<'_>) {
    let window = m.ring.snapshot_len();
    let robust = m.robust.map(RobustState::snapshot_len);
    let len = persist::string_len(m.name)
        + 2 * persist::DOUBLE_LEN
        + persist::boolean_len(m.last_anomaly)
        + persist::varint_len(m.anomalies_total)
        + persist::message_len(window)
        + persist::boolean_len(m.episode.active)
        + persist::varint_len(u64::from(m.episode.quiet))
        + robust.map_or(0, persist::message_len);
    persist::message(out, tag, len);
    persist::string(out, 1, m.name);
    persist::double(out, 2, m.last_value);
    persist::double(out, 3, m.last_z);
    persist::boolean(out, 4, m.last_anomaly);
    persist::varint(out, 5, m.anomalies_total);
    persist::message(out, 6, window);
    m.ring.write_snapshot(m.values, out);
    persist::boolean(out, 7, m.episode.active);
    persist::varint(out, 8, u64::from(m.episode.quiet));
    if let (Some(state), Some(len)) = (m.robust, robust) {
        persist::message(out, 9, len);
        state.write_snapshot(out);
    }
}

/// The `AnalyzeResponse` of a device state.
pub fn analyze_response(device: &DeviceState, source: Source) -> AnalyzeResponse {
    analyze_response_of(
        &device.id,
        device.metrics.iter().map(MetricState::stats).collect(),
        device.updated_at,
        device.last_seq,
        source,
    )
}

/// The `AnalyzeResponse` of a device, whichever form it is in: its metrics' statistics
/// sorted by name.
pub(crate) fn analyze_response_of(
    id: &str,
    mut metrics: Vec<MetricStats>,
    updated_at: Timestamp,
    last_seq: u64,
    source: Source,
) -> AnalyzeResponse {
    metrics.sort_by(|a, b| a.metric.cmp(&b.metric));
    AnalyzeResponse {
        device_id: id.to_owned(),
        metrics,
        updated_at: Some(updated_at),
        source: source as i32,
        last_seq,
    }
}
