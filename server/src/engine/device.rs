//! What the engine keeps per device and per metric, and how one sample is judged.

use tidewatch_proto::pbjson_types::Timestamp;
use tidewatch_proto::v1::MetricStats;

use super::MetricOutcome;
use super::detector::{DetectorKind, DetectorSpec, DetectorState, RobustState, squash};
use super::window::Window;
use crate::snapshot::codec::{
    DecodeError, begin_section, end_section, get_bool, get_f64, get_finite, get_i64, get_str,
    get_u32, get_u64, put_f64, put_i64, put_str, put_u8, put_u32, put_u64, section,
};

/// State of one metric of one device.
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

    /// Judges `x` (seen at `time`, unix seconds) with `spec`'s detector against the
    /// state as it is, then pushes `x`.
    /// For `zscore` this is exactly DESIGN §3; every detector also keeps the rolling
    /// window behind `mean`, `stddev` and `z_score`.
    #[inline]
    pub(crate) fn observe(&mut self, x: f64, time: i64, spec: &DetectorSpec) -> MetricOutcome {
        let n = self.window.len();
        let mean = self.window.mean();
        let stddev = self.window.stddev();
        // Warm-up as DESIGN §3 (a robust stream may ask for a warm-up longer than the
        // rolling window; the z-score it reports then starts once the window is full).
        let z = if n < spec.min_samples.min(spec.window_size.max(1)) {
            0.0
        } else if stddev == 0.0 {
            if x == mean {
                0.0
            } else {
                f64::INFINITY.copysign(x - mean)
            }
        } else {
            (x - mean) / stddev
        };
        let (z, anomaly, score) = match spec.kind {
            DetectorKind::ZScore => {
                let anomaly = n >= spec.min_samples && z.abs() > spec.threshold;
                (z, anomaly, squash(z.abs() / spec.threshold))
            }
            DetectorKind::Robust => {
                let robust = self
                    .detector
                    .robust
                    .get_or_insert_with(|| Box::new(RobustState::new(spec.robust.window)));
                let j = robust.observe(x, time, &spec.robust, spec.threshold, spec.min_samples);
                (z, j.anomaly, j.score)
            }
        };
        let alert = self.detector.episode.step(anomaly, score, spec.cooldown);
        self.window.push(x, spec.window_size.max(1));
        self.last_value = x;
        self.last_z = z;
        self.last_anomaly = anomaly;
        self.anomalies_total += u64::from(anomaly);
        MetricOutcome {
            value: x,
            mean,
            stddev,
            z_score: z,
            anomaly,
            window_count: n as u32,
            score,
            alert,
        }
    }

    /// Appends the metric to a snapshot as one length-prefixed section. A field added
    /// later goes at the end of the section; older readers skip what they do not know.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = begin_section(out);
        put_str(out, &self.name);
        put_f64(out, self.last_value);
        put_f64(out, self.last_z);
        put_u8(out, u8::from(self.last_anomaly));
        put_u64(out, self.anomalies_total);
        self.window.encode(out);
        // Episode and detector state; a section without it (written before detectors
        // had state) decodes to a fresh detector over the restored window.
        self.detector.encode(out);
        end_section(out, at);
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

/// State of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// The device id (after "" became "default").
    pub id: Box<str>,
    /// Hash of `id`, kept so rehashing the table never rehashes strings.
    pub(crate) hash: u64,
    /// Highest `seq` applied; samples at or below it are duplicates.
    pub last_seq: u64,
    /// Metrics in the order they were first seen (at most `MAX_METRICS_PER_DEVICE`).
    pub metrics: Vec<MetricState>,
    /// Time of the last applied sample (the sample's own time, or receive time).
    pub updated_at: Timestamp,
    /// Engine clock tick (seconds since start) of the last sample, for idle eviction.
    pub(crate) last_seen: u32,
    /// Changed since the last snapshot flush.
    pub dirty: bool,
}

impl DeviceState {
    /// A device with no history.
    pub fn new(id: &str, hash: u64) -> Self {
        Self {
            id: id.into(),
            hash,
            last_seq: 0,
            metrics: Vec::new(),
            updated_at: Timestamp::default(),
            last_seen: 0,
            dirty: false,
        }
    }

    /// Appends the device to a snapshot: a length-prefixed header section (id, `seq`,
    /// `updated_at`), the metric count, then one section per metric.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = begin_section(out);
        put_str(out, &self.id);
        put_u64(out, self.last_seq);
        put_i64(out, self.updated_at.seconds);
        put_u32(out, self.updated_at.nanos as u32);
        end_section(out, at);
        put_u32(out, self.metrics.len() as u32);
        for metric in &self.metrics {
            metric.encode(out);
        }
    }

    /// Reads a device written by [`DeviceState::encode`]. The result is clean (not
    /// dirty); the engine sets its hash and clock when it takes it in.
    pub fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let mut header = section(buf, "device header")?;
        let id = get_str(&mut header, "device id")?;
        if id.is_empty() {
            return Err(DecodeError::Invalid {
                field: "device id",
                reason: "empty".into(),
            });
        }
        let mut device = Self::new(id, 0);
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

    /// [`DeviceState::metric_index`], trying `hint` first: a device's samples usually
    /// carry the same metrics in the same (ascending) order, so the `i`-th metric of a
    /// sample is usually the device's `i`-th.
    #[inline]
    pub(crate) fn metric_index_from(&self, name: &str, hint: usize) -> Option<usize> {
        match self.metrics.get(hint) {
            Some(m) if &*m.name == name => Some(hint),
            _ => self.metric_index(name),
        }
    }
}
