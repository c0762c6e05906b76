//! A device and its metrics as a snapshot holds them (the owned form: restore,
//! eviction, `Analyze` from a snapshot, tests), and the snapshot encoding shared with
//! the compact form the engine keeps in memory (`resident.rs`).

use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::{AnalyzeResponse, MetricStats, Source};

use super::detector::{DetectorState, Episode, RobustState};
use super::window::{Ring, Window};
use crate::snapshot::codec::{
    DecodeError, begin_section, end_section, get_bool, get_f64, get_finite, get_i64, get_str,
    get_u32, get_u64, put_f64, put_i64, put_str, put_u8, put_u32, put_u64, section,
};

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

    /// Appends the metric to a snapshot as one length-prefixed section. A field added
    /// later goes at the end of the section; older readers skip what they do not know.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_metric(
            out,
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
            },
        );
    }

    /// Reads a metric section written by [`MetricState::encode`].
    pub fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let mut section = section(buf, "metric")?;
        let name = get_str(&mut section, "metric name")?;
        if name.is_empty() {
            return Err(DecodeError::Invalid {
                field: "metric name",
                reason: "empty".into(),
            });
        }
        Ok(Self {
            name: name.into(),
            last_value: get_finite(&mut section, "last value")?,
            last_z: get_f64(&mut section, "last z-score")?,
            last_anomaly: get_bool(&mut section, "last anomaly")?,
            anomalies_total: get_u64(&mut section, "anomalies total")?,
            window: Window::decode(&mut section)?,
            detector: if section.is_empty() {
                DetectorState::default()
            } else {
                DetectorState::decode(&mut section)?
            },
            // Whatever is left belongs to fields of a later version.
        })
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

    /// Appends the device to a snapshot: a length-prefixed header section (id, `seq`,
    /// `updated_at`), the metric count, then one section per metric.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_header(out, &self.id, self.last_seq, &self.updated_at);
        put_u32(out, self.metrics.len() as u32);
        for metric in &self.metrics {
            metric.encode(out);
        }
    }

    /// Reads a device written by [`DeviceState::encode`]. The result is clean (not
    /// dirty); the engine sets its clock when it takes it in.
    pub fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let mut header = section(buf, "device header")?;
        let id = get_str(&mut header, "device id")?;
        if id.is_empty() {
            return Err(DecodeError::Invalid {
                field: "device id",
                reason: "empty".into(),
            });
        }
        let mut device = Self::new(id);
        device.last_seq = get_u64(&mut header, "last seq")?;
        device.updated_at.seconds = get_i64(&mut header, "updated_at seconds")?;
        device.updated_at.nanos = get_u32(&mut header, "updated_at nanos")? as i32;
        let count = get_u32(buf, "metric count")? as usize;
        // Each metric takes at least its 4-byte length: a huge count in a short value
        // is garbage, not a reason to allocate.
        device.metrics.reserve(count.min(buf.len() / 4));
        for _ in 0..count {
            let metric = MetricState::decode(buf)?;
            if device.metric_index(&metric.name).is_some() {
                return Err(DecodeError::Invalid {
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

/// The device header section of a snapshot: id, `seq`, `updated_at`.
pub(crate) fn encode_header(out: &mut Vec<u8>, id: &str, last_seq: u64, updated_at: &Timestamp) {
    let at = begin_section(out);
    put_str(out, id);
    put_u64(out, last_seq);
    put_i64(out, updated_at.seconds);
    put_u32(out, updated_at.nanos as u32);
    end_section(out, at);
}

/// What a metric's snapshot section holds, wherever the metric lives.
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

/// Appends a metric as one length-prefixed section. A field added later goes at the
/// end of the section; older readers skip what they do not know.
pub(crate) fn encode_metric(out: &mut Vec<u8>, m: MetricFields<'_>) {
    let at = begin_section(out);
    put_str(out, m.name);
    put_f64(out, m.last_value);
    put_f64(out, m.last_z);
    put_u8(out, u8::from(m.last_anomaly));
    put_u64(out, m.anomalies_total);
    m.ring.encode(m.values, out);
    // Episode and detector state; a section without it (written before detectors
    // had state) decodes to a fresh detector over the restored window.
    DetectorState::encode_parts(m.episode, m.robust, out);
    end_section(out, at);
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
