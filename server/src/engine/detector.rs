//! Detectors: which rule turns a metric's values into `anomaly`, `score` and `alert`.
//!
//! - `zscore` is the seed rule (`docs/architecture.md`, "Engine semantics"), unchanged:
//!   `anomaly` is `|z| > threshold` over the last `window_size` values. Its `score` is
//!   `|z| / (|z| + threshold)` (0.5 exactly at the threshold, towards 1 far beyond it).
//! - `robust` ([`robust`]) judges a value against the median and interquartile range of
//!   a longer window (outliers do not drag the baseline along), and adds a sustained
//!   signal in the spirit of Numenta's anomaly likelihood: a short average of the
//!   surprise compared with its own long-run distribution, so one global setting adapts
//!   to quiet and to noisy metrics alike.
//!
//! Every detector shares the episode logic of [`Episode`]: `alert` is the first
//! anomalous sample of an episode; the episode lasts while the score stays above half
//! the anomaly level (hysteresis) and ends only after `cooldown` quiet samples. One
//! page per incident, not one per sample.
//!
//! Per-metric state beyond the rolling window lives in one [`DetectorState`], which a
//! snapshot holds beside the window.

pub mod robust;
mod score;

use tidewatch_proto::v1::DetectorConfig;

use crate::error::{ApiError, ErrorKind};

pub use robust::{RobustParams, RobustState};
pub use score::{MAX_WINDOW, squash};

/// Names accepted in `DetectorConfig.name` and `DETECTOR`.
pub const DETECTOR_NAMES: [&str; 2] = ["zscore", "robust"];

/// A detector family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorKind {
    /// The seed z-score (`docs/architecture.md`, "Engine semantics"; the default).
    ZScore,
    /// Median/IQR baseline plus a sustained-surprise likelihood (recommended).
    Robust,
}

impl DetectorKind {
    /// Parses a detector name; the empty name is the default `zscore`.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim() {
            "" | "zscore" => Some(Self::ZScore),
            "robust" => Some(Self::Robust),
            _ => None,
        }
    }

    /// The name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ZScore => "zscore",
            Self::Robust => "robust",
        }
    }
}

/// Everything one judgement needs: the detector and its settings, resolved from the
/// server's defaults and a stream's overrides. Small and `Copy`: it rides along with
/// every batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorSpec {
    /// Which rule decides `anomaly`.
    pub kind: DetectorKind,
    /// Values of the rolling window behind `mean`/`stddev`/`z_score` (and the
    /// z-score rule itself).
    pub window_size: usize,
    /// Values needed before anything can be an anomaly.
    pub min_samples: usize,
    /// For `zscore`: |z| strictly above it is an anomaly. For `robust`: the robust
    /// z (|x − median| / (IQR/1.349)) above it is an anomaly.
    pub threshold: f64,
    /// Quiet samples (score below half the anomaly level) that end an episode.
    pub cooldown: u32,
    /// Settings of the `robust` detector.
    pub robust: RobustParams,
}

/// The server's settings for every detector, from which a stream's [`DetectorSpec`]
/// is resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorDefaults {
    /// The detector of streams that name none (`DETECTOR`).
    pub kind: DetectorKind,
    /// `WINDOW_SIZE`.
    pub window_size: usize,
    /// `MIN_SAMPLES`.
    pub min_samples: usize,
    /// `Z_THRESHOLD`.
    pub z_threshold: f64,
    /// `ALERT_COOLDOWN`.
    pub cooldown: u32,
    /// `ROBUST_*` settings; `robust.window` and `robust_threshold` are overridable per stream.
    pub robust: RobustParams,
    /// `ROBUST_THRESHOLD`.
    pub robust_threshold: f64,
    /// `ROBUST_MIN_SAMPLES`.
    pub robust_min_samples: usize,
    /// `MAX_STREAM_WINDOW`: the largest `window_size` a stream may ask for.
    pub max_window: usize,
}

impl Default for DetectorDefaults {
    fn default() -> Self {
        Self {
            kind: DetectorKind::ZScore,
            window_size: 50,
            min_samples: 5,
            z_threshold: 2.0,
            cooldown: DEFAULT_COOLDOWN,
            robust: RobustParams::default(),
            robust_threshold: robust::DEFAULT_THRESHOLD,
            robust_min_samples: robust::DEFAULT_MIN_SAMPLES,
            max_window: MAX_WINDOW,
        }
    }
}

/// Default `ALERT_COOLDOWN`: quiet samples that end an episode.
pub const DEFAULT_COOLDOWN: u32 = 60;

impl DetectorDefaults {
    /// The spec of a named detector with the server's settings.
    pub fn spec(&self, kind: DetectorKind) -> DetectorSpec {
        match kind {
            DetectorKind::ZScore => DetectorSpec {
                kind,
                window_size: self.window_size,
                min_samples: self.min_samples,
                threshold: self.z_threshold,
                cooldown: self.cooldown,
                robust: self.robust,
            },
            DetectorKind::Robust => DetectorSpec {
                kind,
                window_size: self.window_size,
                min_samples: self.robust_min_samples,
                threshold: self.robust_threshold,
                cooldown: self.cooldown,
                robust: self.robust,
            },
        }
    }

    /// The server's default detector.
    pub fn default_spec(&self) -> DetectorSpec {
        self.spec(self.kind)
    }

    /// Resolves a stream's (or a REST request's) detector section. `None` is the
    /// server's default. Unknown names and out-of-range overrides are
    /// `InvalidArgument` naming what is wrong; both transports call this.
    pub fn resolve(&self, config: Option<&DetectorConfig>) -> Result<DetectorSpec, ApiError> {
        let Some(config) = config else {
            return Ok(self.default_spec());
        };
        let kind = if config.name.trim().is_empty() {
            self.kind
        } else {
            DetectorKind::parse(&config.name).ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "unknown detector {:?}; known detectors: {}",
                        config.name,
                        DETECTOR_NAMES.join(", ")
                    ),
                )
            })?
        };
        let mut spec = self.spec(kind);
        let invalid = |message: String| ApiError::new(ErrorKind::InvalidArgument, message);
        if config.window_size > 0 {
            let w = config.window_size as usize;
            let limit = self.max_window.min(MAX_WINDOW);
            if w > limit {
                return Err(invalid(format!(
                    "detector {}: window_size {w} is above the server's limit {limit} (MAX_STREAM_WINDOW)",
                    kind.as_str()
                )));
            }
            match kind {
                DetectorKind::ZScore => spec.window_size = w,
                DetectorKind::Robust => spec.robust.window = w,
            }
        }
        if config.threshold != 0.0 {
            if !config.threshold.is_finite() || config.threshold < 0.0 {
                return Err(invalid(format!(
                    "detector {}: threshold must be a positive number, got {}",
                    kind.as_str(),
                    config.threshold
                )));
            }
            spec.threshold = config.threshold;
        }
        if config.min_samples > 0 {
            spec.min_samples = config.min_samples as usize;
        }
        let window = match kind {
            DetectorKind::ZScore => spec.window_size,
            DetectorKind::Robust => spec.robust.window,
        };
        if spec.min_samples > window {
            return Err(invalid(format!(
                "detector {}: min_samples {} is above the window size {window}",
                kind.as_str(),
                spec.min_samples
            )));
        }
        Ok(spec)
    }
}

/// A score at or above this keeps an episode going (half the anomaly level: the
/// hysteresis that stops a value hovering around the threshold from paging again
/// and again).
pub const SUSTAIN_SCORE: f64 = 1.0 / 3.0;

/// The anomalous-episode tracker behind `alert`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Episode {
    /// Inside an episode (an alert was raised and it has not cooled down).
    pub active: bool,
    /// Consecutive quiet samples inside the current episode.
    pub quiet: u32,
}

impl Episode {
    /// Feeds one judgement; returns whether it is an alert (the episode's first anomaly).
    #[inline]
    pub fn step(&mut self, anomaly: bool, score: f64, cooldown: u32) -> bool {
        if anomaly {
            self.quiet = 0;
            let alert = !self.active;
            self.active = true;
            return alert;
        }
        if self.active {
            if score >= SUSTAIN_SCORE {
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= cooldown {
                    self.active = false;
                    self.quiet = 0;
                }
            }
        }
        false
    }
}

/// Per-metric detector state besides the rolling window: the episode, and the state
/// of the `robust` detector once a stream used it (boxed: z-score-only metrics pay
/// one pointer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DetectorState {
    /// The episode tracker behind `alert`.
    pub episode: Episode,
    /// The robust detector's baseline and likelihood state.
    pub robust: Option<Box<RobustState>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_unknown_is_invalid_argument() {
        let d = DetectorDefaults::default();
        assert_eq!(d.resolve(None).unwrap().kind, DetectorKind::ZScore);
        let robust = DetectorConfig {
            name: "robust".into(),
            ..DetectorConfig::default()
        };
        assert_eq!(d.resolve(Some(&robust)).unwrap().kind, DetectorKind::Robust);
        let bad = DetectorConfig {
            name: "magic".into(),
            ..DetectorConfig::default()
        };
        let e = d.resolve(Some(&bad)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("\"magic\""), "{}", e.message);
        assert!(e.message.contains("zscore, robust"), "{}", e.message);
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let d = DetectorDefaults::default();
        let cfg = DetectorConfig {
            name: "zscore".into(),
            window_size: 10,
            threshold: 3.0,
            min_samples: 2,
        };
        let spec = d.resolve(Some(&cfg)).unwrap();
        assert_eq!(
            (spec.window_size, spec.threshold, spec.min_samples),
            (10, 3.0, 2)
        );
        let too_big = DetectorConfig {
            window_size: 100_000,
            ..cfg.clone()
        };
        assert!(d.resolve(Some(&too_big)).is_err());
        let neg = DetectorConfig {
            threshold: -1.0,
            ..cfg.clone()
        };
        assert!(d.resolve(Some(&neg)).is_err());
        let warm = DetectorConfig {
            min_samples: 11,
            ..cfg
        };
        assert!(d.resolve(Some(&warm)).is_err());
    }

    #[test]
    fn episode_alerts_once_then_cools_down() {
        let mut e = Episode::default();
        assert!(e.step(true, 0.9, 3));
        assert!(!e.step(true, 0.9, 3));
        // Hovering above the sustain level keeps the episode alive.
        assert!(!e.step(false, 0.4, 3));
        assert!(!e.step(false, 0.1, 3));
        assert!(!e.step(false, 0.1, 3));
        assert!(
            !e.step(true, 0.9, 3),
            "two quiet samples are not a cool-down"
        );
        for _ in 0..3 {
            assert!(!e.step(false, 0.0, 3));
        }
        assert!(!e.active);
        assert!(e.step(true, 0.9, 3), "a new episode alerts again");
    }

    #[test]
    fn squash_is_half_at_threshold() {
        assert_eq!(squash(1.0), 0.5);
        assert_eq!(squash(0.0), 0.0);
        assert_eq!(squash(f64::INFINITY), 1.0);
        assert_eq!(squash(f64::NAN), 0.0);
        assert!(squash(10.0) > 0.9 && squash(10.0) < 1.0);
    }

    #[test]
    fn robust_state_round_trips_through_its_message_and_rejects_garbage() {
        use tidewatch_proto::v1::{HoltSnapshot, RobustSnapshot};
        let params = RobustParams::default();
        let mut robust = RobustState::new(params.window);
        for i in 0..300 {
            robust.observe(f64::from(i % 17), i64::from(i) * 600, &params, 4.0, 16);
        }
        let message = robust.to_snapshot();
        assert_eq!(message.season.len(), 48);
        assert!(message.holt.is_some_and(|holt| holt.count > 0));
        let back = RobustState::from_snapshot(message.clone()).unwrap();
        assert_eq!(back, robust);
        let mut written = Vec::new();
        robust.write_snapshot(&mut written);
        assert_eq!(written.len(), robust.snapshot_len());
        assert_eq!(written, prost::Message::encode_to_vec(&message));
        for bad in [
            RobustSnapshot {
                capacity: 0,
                ..message.clone()
            },
            RobustSnapshot {
                capacity: 8,
                ..message.clone()
            },
            RobustSnapshot {
                capacity: MAX_WINDOW as u32 + 1,
                ..message.clone()
            },
            RobustSnapshot {
                season: message.season[..3].to_vec(),
                ..message.clone()
            },
            RobustSnapshot {
                values: vec![f64::NAN],
                ..message.clone()
            },
            RobustSnapshot {
                holt: message.holt.map(|holt| HoltSnapshot {
                    trend: Some(f64::INFINITY),
                    ..holt
                }),
                ..message.clone()
            },
        ] {
            assert!(RobustState::from_snapshot(bad).is_err());
        }
    }

    #[test]
    fn robust_messages_without_the_envelope_start_it_at_the_short_average() {
        use tidewatch_proto::v1::RobustSnapshot;
        let params = RobustParams::default();
        let mut robust = RobustState::new(params.window);
        for i in 0..300 {
            robust.observe(f64::from(i % 17), i64::from(i) * 600, &params, 4.0, 16);
        }
        let mut message = robust.to_snapshot();
        assert!(message.short_term_high.is_some());
        // Version-1 snapshots, and version-2 ones written before the envelope existed.
        message.short_term_high = None;
        let again = RobustState::from_snapshot(message.clone())
            .unwrap()
            .to_snapshot();
        assert_eq!(again.short_term_high, message.short_term);
        assert_eq!(
            RobustSnapshot {
                short_term_high: None,
                ..again
            },
            message
        );
        // Messages written before the trend predictor existed start it afresh.
        assert!(message.holt.is_some());
        let mut old = message.clone();
        (old.holt, old.short_term_high_age) = (None, 0);
        (old.range_high_age, old.range_low_age) = (0, 0);
        let again = RobustState::from_snapshot(old.clone())
            .unwrap()
            .to_snapshot();
        assert_eq!(
            again,
            RobustSnapshot {
                short_term_high: old.short_term,
                ..old
            }
        );
        // Memory counts visits up to 255.
        message.season[5].count = 1000;
        let again = RobustState::from_snapshot(message).unwrap().to_snapshot();
        assert_eq!(again.season[5].count, 255);
    }
}
