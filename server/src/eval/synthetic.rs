//! Reproducible synthetic metrics with labeled anomalies.
//!
//! Each series is one sample per minute: a base level, Gaussian noise, a daily cycle
//! (period 1,440 samples) and a linear trend, with four injected anomalies in random
//! order — a spike, a dip, a level shift and a variance burst — each labeled with the
//! span in which flagging it counts as finding it. Everything comes from one seed
//! (SplitMix64), so a seed names a data set.

/// Samples per simulated day.
pub const DAY: usize = 1440;

/// Time of the first sample of every series (2024-01-01T00:00:00Z).
pub const EPOCH: i64 = 1_704_067_200;

/// The kind of an injected anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// One sample 7–12 noise deviations above the expected value.
    Spike,
    /// Three samples 7–12 noise deviations below it.
    Dip,
    /// The level moves by 6–10 deviations and stays; the first 120 samples after
    /// the move are the labeled span.
    LevelShift,
    /// The noise grows 4–6 times for 60–120 samples.
    VarianceBurst,
}

impl EventKind {
    /// Lowercase name for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spike => "spike",
            Self::Dip => "dip",
            Self::LevelShift => "level_shift",
            Self::VarianceBurst => "variance_burst",
        }
    }
}

/// One labeled anomaly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// What was injected.
    pub kind: EventKind,
    /// First sample of the span.
    pub start: usize,
    /// One past the last sample of the span.
    pub end: usize,
}

/// One generated series.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSeries {
    /// A name for reports (`synthetic-<seed>-<index>`).
    pub name: String,
    /// Sample times, unix seconds (one a minute from [`EPOCH`]).
    pub times: Vec<i64>,
    /// The values.
    pub values: Vec<f64>,
    /// The injected anomalies, in time order.
    pub events: Vec<Event>,
}

/// Shape of a generated data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticSpec {
    /// Seed of the generator.
    pub seed: u64,
    /// Number of series.
    pub series: usize,
    /// Samples per series.
    pub length: usize,
    /// Leading samples without events and not scored (detector warm-up).
    pub warm_up: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            seed: 42,
            series: 20,
            length: 8000,
            warm_up: 1000,
        }
    }
}

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Generates the data set of `spec`.
pub fn generate(spec: &SyntheticSpec) -> Vec<SyntheticSeries> {
    (0..spec.series)
        .map(|index| {
            let mut rng = Rng::new(spec.seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            series(spec, index, &mut rng)
        })
        .collect()
}

fn series(spec: &SyntheticSpec, index: usize, rng: &mut Rng) -> SyntheticSeries {
    let n = spec.length;
    let base = rng.range(50.0, 500.0);
    let sigma = base * rng.range(0.01, 0.05);
    let amplitude = sigma * rng.range(0.0, 3.0);
    let phase = rng.range(0.0, std::f64::consts::TAU);
    // Total drift over the series: up to ±5 noise deviations.
    let slope = sigma * rng.range(-5.0, 5.0) / n as f64;
    let mut kinds = [
        EventKind::Spike,
        EventKind::Dip,
        EventKind::LevelShift,
        EventKind::VarianceBurst,
    ];
    for i in (1..kinds.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        kinds.swap(i, j);
    }
    // Events evenly spread after the warm-up, with jitter, at least ~1,200 apart.
    let usable = n.saturating_sub(spec.warm_up + 300);
    let slot = usable / kinds.len();
    let mut noise_gain = vec![1.0; n];
    let mut offset = vec![0.0; n];
    let mut events = Vec::with_capacity(kinds.len());
    for (k, kind) in kinds.iter().enumerate() {
        let at = spec.warm_up + k * slot + (rng.unit() * slot as f64 * 0.4) as usize + slot / 10;
        let magnitude = rng.range(7.0, 12.0) * sigma;
        let (start, end) = match kind {
            EventKind::Spike => {
                offset[at] += magnitude;
                (at, at + 1)
            }
            EventKind::Dip => {
                for o in &mut offset[at..at + 3] {
                    *o -= magnitude;
                }
                (at, at + 3)
            }
            EventKind::LevelShift => {
                let step = rng.range(6.0, 10.0) * sigma * if rng.unit() < 0.5 { -1.0 } else { 1.0 };
                for o in &mut offset[at..] {
                    *o += step;
                }
                (at, at + 120)
            }
            EventKind::VarianceBurst => {
                let len = 60 + (rng.next_u64() % 61) as usize;
                let gain = rng.range(4.0, 6.0);
                for g in &mut noise_gain[at..at + len] {
                    *g = gain;
                }
                (at, at + len)
            }
        };
        events.push(Event {
            kind: *kind,
            start,
            end: end.min(n),
        });
    }
    let values = (0..n)
        .map(|t| {
            let season = amplitude * (std::f64::consts::TAU * t as f64 / DAY as f64 + phase).sin();
            base + slope * t as f64 + season + offset[t] + sigma * noise_gain[t] * rng.normal()
        })
        .collect();
    SyntheticSeries {
        name: format!("synthetic-{}-{index}", spec.seed),
        times: (0..n as i64).map(|t| EPOCH + 60 * t).collect(),
        values,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let spec = SyntheticSpec {
            series: 3,
            ..SyntheticSpec::default()
        };
        assert_eq!(generate(&spec), generate(&spec));
        let other = generate(&SyntheticSpec { seed: 7, ..spec });
        assert_ne!(generate(&spec)[0].values, other[0].values);
    }

    #[test]
    fn every_series_has_one_event_of_each_kind_after_warm_up() {
        let spec = SyntheticSpec::default();
        for s in generate(&spec) {
            assert_eq!(s.values.len(), spec.length);
            let mut kinds: Vec<_> = s.events.iter().map(|e| e.kind).collect();
            kinds.sort();
            assert_eq!(
                kinds,
                [
                    EventKind::Spike,
                    EventKind::Dip,
                    EventKind::LevelShift,
                    EventKind::VarianceBurst
                ]
            );
            for pair in s.events.windows(2) {
                assert!(pair[0].end + 500 < pair[1].start, "{:?}", s.events);
            }
            assert!(s.events[0].start >= spec.warm_up);
            assert!(s.values.iter().all(|v| v.is_finite()));
        }
    }
}
