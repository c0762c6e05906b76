//! The traffic a benchmark offers: what a fleet of devices sends, generated and
//! encoded once before the run.
//!
//! Sample k of the generated sequence belongs to device `k % devices` and is that
//! device's value number `k / devices` (its round): every device appears once per
//! round, in the same order, so the first n samples reach `min(n, devices)` distinct
//! devices. A pool of `rounds` rounds is replayed in a cycle; each (device, metric)
//! series is therefore periodic with period `rounds`, and the values are made so that
//! the cycle has no seam (the drift is a sine over exactly one cycle).
//!
//! Each series has a base value (its own, drawn per device and metric), noise of ±5 %
//! of it, a drift of ±1 % over the cycle, and, with probability `anomaly_rate` per
//! sample, a spike on one of the sample's metrics of 50–100 % of the base (tens of
//! standard deviations). The noise is `sin` of a uniform phase: bounded, it lies
//! within √2 standard deviations of its mean, so that a z-score detector at its
//! default threshold of 2 flags little besides the spikes once a window is warm (a
//! uniform variable reaches √3, and a window's estimate of the deviation errs, so
//! uniform noise alone made about 3 % of a series anomalous at z = 2).

use std::{collections::BTreeMap, fmt, str::FromStr, time::SystemTime};

use prost::Message;
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{DetectorConfig, IngestRequest, Sample},
};

/// Metric names in the order a device's metrics take them; past these, `m8`, `m9`, ...
const METRIC_NAMES: [&str; 8] = [
    "cpu",
    "rps",
    "mem_used",
    "temp_c",
    "latency_ms",
    "errors",
    "disk_io",
    "net_rx",
];

/// Noise, as a fraction of a series' base value: uniform in ±NOISE.
const NOISE: f64 = 0.05;

/// Drift amplitude, as a fraction of the base value, over one cycle of the pool.
const DRIFT: f64 = 0.01;

/// Samples a pool holds at most when `rounds` is left to the generator.
pub const AUTO_SAMPLE_BUDGET: usize = 1 << 19;

/// Rounds of an automatic pool at most: more than a default window (50), so that an
/// injected spike is in a window at most once.
pub const AUTO_MAX_ROUNDS: usize = 64;

/// How device ids look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdStyle {
    /// `fleet-eu-west/gw-000123/dev-012345`: 34 bytes up to a million devices.
    Fleet,
    /// A UUID-shaped id, 36 bytes.
    Uuid,
    /// `dev-N`: short ids, for comparison with older runs.
    Short,
}

impl FromStr for IdStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fleet" => Ok(Self::Fleet),
            "uuid" => Ok(Self::Uuid),
            "short" => Ok(Self::Short),
            _ => Err(format!("{s:?}: expected fleet, uuid or short")),
        }
    }
}

/// How many metrics a device sends: each device has a fixed count in `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricRange {
    /// Fewest metrics of a device.
    pub min: usize,
    /// Most metrics of a device.
    pub max: usize,
}

impl FromStr for MetricRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|e| format!("{s:?}: {e} (expected N or MIN-MAX, e.g. 2-8)"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for MetricRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Distinct devices.
    pub devices: usize,
    /// Samples per message.
    pub batch: usize,
    /// Values per device in the pool; 0 lets [`Traffic::rounds`] choose.
    pub rounds: usize,
    /// Metrics per device.
    pub metrics: MetricRange,
    /// Device id shape.
    pub ids: IdStyle,
    /// Probability that a sample carries an injected spike.
    pub anomaly_rate: f64,
    /// Set each sample's `time` (one round per second, ending now).
    pub timestamps: bool,
    /// Detector named in every message (the server reads the first of each stream; a
    /// stream may start anywhere in the pool).
    pub detector: Option<String>,
    /// Seed of the values.
    pub seed: u64,
}

/// What a generated pool holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Messages in the pool.
    pub messages: usize,
    /// Samples in the pool.
    pub samples: usize,
    /// Rounds the pool covers (values per device, the last round possibly partial).
    pub rounds: usize,
    /// Samples with an injected spike.
    pub anomalous: usize,
    /// Metric values in the pool.
    pub values: usize,
    /// Shortest and longest device id, in bytes.
    pub id_bytes: (usize, usize),
}

/// SplitMix64: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform value in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Metric `i`'s name.
pub fn metric_name(i: usize) -> String {
    METRIC_NAMES
        .get(i)
        .map_or_else(|| format!("m{i}"), |n| (*n).to_string())
}

impl Traffic {
    /// Device `d`'s id.
    pub fn device_id(&self, d: usize) -> String {
        match self.ids {
            IdStyle::Short => format!("dev-{d}"),
            IdStyle::Fleet => {
                const REGIONS: [&str; 4] = ["eu-west", "us-east", "ap-east", "sa-east"];
                let gateway = d / 100;
                format!(
                    "fleet-{}/gw-{gateway:06}/dev-{d:06}",
                    REGIONS[gateway % REGIONS.len()]
                )
            }
            IdStyle::Uuid => {
                // Random-looking, and unique: the last group is `d` itself.
                let h = mix(d as u64 ^ 0x7469_6465_7761_7463);
                format!(
                    "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                    h >> 32,
                    (h >> 16) & 0xffff,
                    (h >> 4) & 0xfff,
                    mix(h) & 0xfff,
                    d as u64 & 0xffff_ffff_ffff
                )
            }
        }
    }

    /// Metrics of device `d`.
    pub fn metrics_of(&self, d: usize) -> usize {
        let span = (self.metrics.max - self.metrics.min + 1) as u64;
        self.metrics.min + (mix(d as u64 ^ 0x6d65_7472_6963) % span) as usize
    }

    /// Rounds in the pool: `rounds` when set, otherwise as many as fit
    /// [`AUTO_SAMPLE_BUDGET`] samples, between 1 and [`AUTO_MAX_ROUNDS`].
    pub fn rounds(&self) -> usize {
        if self.rounds > 0 {
            return self.rounds;
        }
        (AUTO_SAMPLE_BUDGET / self.devices.max(1)).clamp(1, AUTO_MAX_ROUNDS)
    }

    /// Messages of the pool: enough to hold every round of every device, the last
    /// message filled from the next round so every message has `batch` samples.
    pub fn pool_messages(&self) -> usize {
        (self.devices.max(1) * self.rounds()).div_ceil(self.batch.max(1))
    }

    /// Distinct devices the first `messages` messages of the pool (cycled) reach.
    pub fn devices_reached(&self, messages: usize) -> usize {
        messages
            .saturating_mul(self.batch.max(1))
            .min(self.devices.max(1))
    }

    /// Generates and encodes the pool.
    pub fn generate(&self) -> (Vec<Vec<u8>>, Stats) {
        let devices = self.devices.max(1);
        let batch = self.batch.max(1);
        let rounds = self.rounds();
        let messages = self.pool_messages();
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let first_second = now - rounds as i64;
        let ids: Vec<String> = (0..devices).map(|d| self.device_id(d)).collect();
        let names: Vec<String> = (0..self.metrics.max).map(metric_name).collect();
        let mut stats = Stats {
            messages,
            samples: messages * batch,
            rounds: (messages * batch).div_ceil(devices),
            values: 0,
            anomalous: 0,
            id_bytes: (
                ids.iter().map(String::len).min().unwrap_or(0),
                ids.iter().map(String::len).max().unwrap_or(0),
            ),
        };
        let detector = self.detector.as_ref().map(|name| DetectorConfig {
            name: name.clone(),
            ..DetectorConfig::default()
        });
        let mut k = 0usize;
        let pool = (0..messages)
            .map(|_| {
                let samples = (0..batch)
                    .map(|_| {
                        let d = k % devices;
                        let round = k / devices;
                        k += 1;
                        let count = self.metrics_of(d);
                        let spike = (rng.f64() < self.anomaly_rate).then(|| rng.usize(..count));
                        stats.anomalous += usize::from(spike.is_some());
                        stats.values += count;
                        let metrics = names[..count]
                            .iter()
                            .enumerate()
                            .map(|(i, name)| {
                                let h = mix(((d as u64) << 6) ^ i as u64);
                                let base = 10.0 * (i + 1) as f64 * (0.5 + unit(h));
                                let phase = unit(mix(h));
                                let cycle = (round % rounds) as f64 / rounds as f64 + phase;
                                let drift = DRIFT * (std::f64::consts::TAU * cycle).sin();
                                let noise = NOISE * (std::f64::consts::TAU * rng.f64()).sin();
                                let mut value = base * (1.0 + drift + noise);
                                if spike == Some(i) {
                                    let size = 0.5 + 0.5 * rng.f64();
                                    value = if rng.bool() {
                                        base * (1.0 + size)
                                    } else {
                                        base * (1.0 - size)
                                    };
                                }
                                (name.clone(), value)
                            })
                            .collect::<BTreeMap<_, _>>();
                        Sample {
                            device_id: ids[d].clone(),
                            time: self.timestamps.then(|| Timestamp {
                                seconds: first_second + (round % rounds) as i64,
                                nanos: ((d % 1000) * 1_000_000) as i32,
                            }),
                            metrics,
                            seq: 0,
                        }
                    })
                    .collect();
                IngestRequest {
                    samples,
                    detector: detector.clone(),
                }
                .encode_to_vec()
            })
            .collect();
        (pool, stats)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn traffic(devices: usize, batch: usize) -> Traffic {
        Traffic {
            devices,
            batch,
            rounds: 0,
            metrics: "2-8".parse().unwrap(),
            ids: IdStyle::Fleet,
            anomaly_rate: 0.01,
            timestamps: true,
            detector: None,
            seed: 7,
        }
    }

    fn decode(pool: &[Vec<u8>]) -> Vec<IngestRequest> {
        pool.iter()
            .map(|m| IngestRequest::decode(m.as_slice()).unwrap())
            .collect()
    }

    #[test]
    fn the_pool_reaches_every_device_and_counts_what_prefixes_reach() {
        assert_eq!(traffic(10_000, 1).rounds(), 52);
        assert_eq!(traffic(1_000_000, 1).rounds(), 1);
        let t = Traffic {
            rounds: 3,
            ..traffic(10_000, 1)
        };
        let (pool, stats) = t.generate();
        assert_eq!((stats.rounds, stats.samples), (3, 30_000));
        assert_eq!(pool.len(), 30_000);
        let decoded = decode(&pool);
        let reached = |n: usize| {
            decoded
                .iter()
                .take(n)
                .flat_map(|m| m.samples.iter().map(|s| s.device_id.as_str()))
                .collect::<HashSet<_>>()
                .len()
        };
        // The old body's shape: 100 single-sample messages reach 100 devices, and
        // the count says so.
        assert_eq!((reached(100), t.devices_reached(100)), (100, 100));
        assert_eq!(
            (reached(10_000), t.devices_reached(10_000)),
            (10_000, 10_000)
        );
        assert_eq!(reached(pool.len()), 10_000);
    }

    #[test]
    fn batches_reach_devices_at_batch_times_messages() {
        let t = Traffic {
            rounds: 1,
            ..traffic(10_000, 100)
        };
        let (pool, _) = t.generate();
        assert_eq!(pool.len(), 100);
        let decoded = decode(&pool);
        let ids: HashSet<_> = decoded
            .iter()
            .flat_map(|m| m.samples.iter().map(|s| s.device_id.clone()))
            .collect();
        assert!(decoded.iter().all(|m| m.samples.len() == 100));
        assert_eq!(ids.len(), 10_000);
        assert_eq!(t.devices_reached(100), 10_000);
        assert_eq!(t.devices_reached(50), 5_000);
    }

    #[test]
    fn ids_metrics_and_timestamps_are_realistic() {
        let t = traffic(1_000_000, 1);
        for style in [IdStyle::Fleet, IdStyle::Uuid] {
            let t = Traffic {
                ids: style,
                ..t.clone()
            };
            let ids: HashSet<String> = (0..1_000_000)
                .step_by(997)
                .map(|d| t.device_id(d))
                .collect();
            assert_eq!(
                ids.len(),
                1_000_000usize.div_ceil(997),
                "{style:?} ids collide"
            );
            assert!(
                ids.iter().all(|id| (20..=36).contains(&id.len())),
                "{style:?}: {ids:?}"
            );
        }
        let counts: Vec<usize> = (0..10_000).map(|d| t.metrics_of(d)).collect();
        assert!(counts.iter().all(|c| (2..=8).contains(c)));
        for c in 2..=8 {
            assert!(counts.contains(&c), "no device with {c} metrics");
        }
        let small = Traffic { devices: 50, ..t };
        let (pool, _) = small.generate();
        let first = IngestRequest::decode(pool[0].as_slice()).unwrap();
        let sample = &first.samples[0];
        assert!(sample.time.is_some());
        assert_eq!(sample.metrics.len(), small.metrics_of(0));
    }

    #[test]
    fn anomaly_injection_rate_is_within_bounds() {
        for rate in [0.005, 0.01, 0.02] {
            let t = Traffic {
                anomaly_rate: rate,
                rounds: 64,
                ..traffic(1_000, 100)
            };
            let (pool, stats) = t.generate();
            let share = stats.anomalous as f64 / stats.samples as f64;
            assert!(
                (share - rate).abs() < rate * 0.15,
                "rate {rate}: {} of {} samples",
                stats.anomalous,
                stats.samples
            );
            // Count the spikes in the encoded values, independently of the counter:
            // a value more than 40 % from its series' median is a spike; noise and
            // drift stay within 6 %.
            let mut series: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
            for m in decode(&pool) {
                for s in m.samples {
                    for (metric, v) in s.metrics {
                        series
                            .entry((s.device_id.clone(), metric))
                            .or_default()
                            .push(v);
                    }
                }
            }
            let mut spikes = 0;
            for values in series.values() {
                let mut sorted = values.clone();
                sorted.sort_by(f64::total_cmp);
                let median = sorted[sorted.len() / 2];
                spikes += values
                    .iter()
                    .filter(|v| (*v - median).abs() > 0.4 * median)
                    .count();
            }
            assert_eq!(spikes, stats.anomalous, "rate {rate}");
        }
    }

    #[test]
    fn metric_ranges_parse() {
        assert_eq!("2-8".parse(), Ok(MetricRange { min: 2, max: 8 }));
        assert_eq!("33".parse(), Ok(MetricRange { min: 33, max: 33 }));
        assert!("0-3".parse::<MetricRange>().is_err());
        assert!("5-3".parse::<MetricRange>().is_err());
    }
}
