//! Detection quality on labeled data: the library behind `tidewatch-eval`.
//!
//! Labeled series (synthetic ones from [`synthetic`], NAB-format files from [`nab`])
//! are replayed through the real engine — in this process, or through a running
//! server over gRPC — and the verdicts are scored by [`score`]: event recall, false
//! positives over normal samples, precision and F1 on synthetic data; the NAB score
//! for its three profiles on NAB data. Both the per-sample `anomaly` flag and the
//! paging `alert` are scored, with one configuration for every file.

pub mod app;
pub mod nab;
pub mod plot;
pub mod progress;
pub mod score;
pub mod synthetic;

use std::fmt::Write as _;

use tidewatch_proto::v1::{
    DetectorConfig, IngestRequest, Sample, telemetry_service_client::TelemetryServiceClient,
};

use crate::engine::{DetectorKind, DetectorSpec, Engine, EngineConfig};
use score::{EventCounts, FileScore, PROFILES};
use synthetic::{EventKind, SyntheticSeries};

/// Samples per replayed request (one `ingest_batch` call or one Ingest message).
pub const BATCH: usize = 1000;

/// The metric name series are replayed under.
pub const METRIC: &str = "value";

/// What a detector said about every sample of one series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judged {
    /// Per-sample `anomaly`.
    pub anomaly: Vec<bool>,
    /// Per-sample `alert`.
    pub alert: Vec<bool>,
    /// Per-sample `score`.
    pub score: Vec<f64>,
}

impl Judged {
    fn push(&mut self, verdict: &tidewatch_proto::v1::Verdict) {
        self.anomaly.push(verdict.anomaly);
        self.alert.push(verdict.alert);
        self.score.push(verdict.score);
    }

    /// The flags of one signal.
    pub fn signal(&self, signal: Signal) -> &[bool] {
        match signal {
            Signal::Anomaly => &self.anomaly,
            Signal::Alert => &self.alert,
        }
    }

    /// Rows where two replays disagree (flags, or score beyond 1e-12).
    pub fn mismatches(&self, other: &Judged) -> usize {
        if self.anomaly.len() != other.anomaly.len() {
            return self.anomaly.len().max(other.anomaly.len());
        }
        (0..self.anomaly.len())
            .filter(|&i| {
                self.anomaly[i] != other.anomaly[i]
                    || self.alert[i] != other.alert[i]
                    || (self.score[i] - other.score[i]).abs() > 1e-12
            })
            .count()
    }
}

/// Which verdict field counts as a detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Every anomalous sample.
    Anomaly,
    /// The first sample of each anomalous episode.
    Alert,
}

impl Signal {
    /// Both signals, in report order.
    pub const ALL: [Signal; 2] = [Signal::Anomaly, Signal::Alert];

    /// Name for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anomaly => "anomaly",
            Self::Alert => "alert",
        }
    }
}

/// One series to replay: name, sample times (unix seconds), values.
pub type Series<'a> = (&'a str, &'a [i64], &'a [f64]);

fn sample(device: &str, seq: usize, time: i64, value: f64) -> Sample {
    Sample {
        device_id: device.to_owned(),
        time: Some(tidewatch_proto::pbjson_types::Timestamp {
            seconds: time,
            nanos: 0,
        }),
        metrics: [(METRIC.to_owned(), value)].into_iter().collect(),
        seq: seq as u64 + 1,
    }
}

/// Replays each series (name, values) through a fresh in-process engine with
/// `detector`.
pub fn replay_in_process(
    config: &EngineConfig,
    detector: &DetectorSpec,
    series: &[Series<'_>],
) -> Vec<Judged> {
    replay_in_process_with(config, detector, series, &mut |_| {})
}

/// [`replay_in_process`], calling `done(n)` after the n-th series (for progress).
pub fn replay_in_process_with(
    config: &EngineConfig,
    detector: &DetectorSpec,
    series: &[Series<'_>],
    done: &mut dyn FnMut(usize),
) -> Vec<Judged> {
    let engine = Engine::new(config.clone());
    let mut verdicts = Vec::with_capacity(BATCH);
    series
        .iter()
        .enumerate()
        .map(|(n, (name, times, values))| {
            let mut judged = Judged::default();
            for (c, chunk) in values.chunks(BATCH).enumerate() {
                let batch: Vec<Sample> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let at = c * BATCH + i;
                        sample(name, at, times[at], v)
                    })
                    .collect();
                verdicts.clear();
                engine.ingest_batch(&batch, detector, &mut verdicts);
                verdicts.iter().for_each(|v| judged.push(v));
            }
            done(n + 1);
            judged
        })
        .collect()
}

/// The `detector` section that asks a server for `spec` (the server's other
/// detector settings, such as `ALERT_COOLDOWN`, must match the in-process ones).
pub fn detector_config(spec: &DetectorSpec) -> DetectorConfig {
    DetectorConfig {
        name: spec.kind.as_str().to_owned(),
        window_size: match spec.kind {
            DetectorKind::ZScore => spec.window_size as u32,
            DetectorKind::Robust => spec.robust.window as u32,
        },
        threshold: spec.threshold,
        min_samples: spec.min_samples as u32,
    }
}

/// A gRPC replay failure.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Could not connect.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The server ended the stream with an error.
    #[error("ingest of {series} failed: {status}")]
    Status {
        /// The series being replayed.
        series: String,
        /// The status.
        status: tonic::Status,
    },
    /// A verdict carried an error or the counts did not match.
    #[error("ingest of {series}: {message}")]
    Verdict {
        /// The series being replayed.
        series: String,
        /// What went wrong.
        message: String,
    },
}

/// Replays each series over gRPC `Ingest` (one stream per series, the detector in its
/// first message), under device ids prefixed with `run_id` and the detector name so
/// that every replay (and every rerun against the same server) starts from empty
/// windows, as the in-process replay does.
pub async fn replay_grpc(
    url: &str,
    run_id: &str,
    detector: &DetectorSpec,
    series: &[Series<'_>],
) -> Result<Vec<Judged>, ReplayError> {
    replay_grpc_with(url, run_id, detector, series, &mut |_| {}).await
}

/// [`replay_grpc`], calling `done(n)` after the n-th series (for progress).
pub async fn replay_grpc_with(
    url: &str,
    run_id: &str,
    detector: &DetectorSpec,
    series: &[Series<'_>],
    done: &mut (dyn FnMut(usize) + Send),
) -> Result<Vec<Judged>, ReplayError> {
    let mut client = TelemetryServiceClient::connect(url.to_owned())
        .await
        .map_err(|source| ReplayError::Connect {
            url: url.to_owned(),
            source,
        })?
        .max_decoding_message_size(64 * 1024 * 1024);
    let mut out = Vec::with_capacity(series.len());
    for (name, times, values) in series {
        let device = format!("{run_id}/{}/{name}", detector.kind.as_str());
        let requests: Vec<IngestRequest> = values
            .chunks(BATCH)
            .enumerate()
            .map(|(c, chunk)| IngestRequest {
                samples: chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let at = c * BATCH + i;
                        sample(&device, at, times[at], v)
                    })
                    .collect(),
                detector: (c == 0).then(|| detector_config(detector)),
            })
            .collect();
        let status = |status| ReplayError::Status {
            series: (*name).to_owned(),
            status,
        };
        let mut responses = client
            .ingest(tokio_stream::iter(requests))
            .await
            .map_err(status)?
            .into_inner();
        let mut judged = Judged::default();
        while let Some(response) = responses.message().await.map_err(status)? {
            for v in &response.verdicts {
                if !v.error.is_empty() {
                    return Err(ReplayError::Verdict {
                        series: (*name).to_owned(),
                        message: v.error.clone(),
                    });
                }
                judged.push(v);
            }
        }
        if judged.anomaly.len() != values.len() {
            return Err(ReplayError::Verdict {
                series: (*name).to_owned(),
                message: format!(
                    "{} verdicts for {} samples",
                    judged.anomaly.len(),
                    values.len()
                ),
            });
        }
        out.push(judged);
        done(out.len());
    }
    Ok(out)
}

/// Synthetic results of one signal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyntheticResult {
    /// All events together.
    pub total: EventCounts,
    /// Per event kind: (events, found).
    pub by_kind: Vec<(EventKind, usize, usize)>,
    /// The first event of each series: (series with one, found). With a short
    /// warm-up this is early detection proper; later events can also sit inside the
    /// range an earlier event set.
    pub first: (usize, usize),
}

/// Scores one signal on the synthetic series.
pub fn score_synthetic(
    data: &[SyntheticSeries],
    judged: &[Judged],
    signal: Signal,
    warm_up: usize,
) -> SyntheticResult {
    let mut result = SyntheticResult::default();
    let kinds = [
        EventKind::Spike,
        EventKind::Dip,
        EventKind::LevelShift,
        EventKind::VarianceBurst,
    ];
    let mut by_kind: Vec<(EventKind, usize, usize)> = kinds.iter().map(|&k| (k, 0, 0)).collect();
    for (series, judged) in data.iter().zip(judged) {
        let flags = judged.signal(signal);
        let spans: Vec<(usize, usize)> = series.events.iter().map(|e| (e.start, e.end)).collect();
        result.total.add(flags, &spans, warm_up);
        if let Some(first) = series.events.iter().min_by_key(|e| e.start) {
            result.first.0 += 1;
            result.first.1 += usize::from(flags[first.start..first.end].contains(&true));
        }
        for event in &series.events {
            let slot = &mut by_kind[kinds.iter().position(|&k| k == event.kind).unwrap_or(0)];
            slot.1 += 1;
            slot.2 += usize::from(flags[event.start..event.end].contains(&true));
        }
    }
    result.by_kind = by_kind;
    result
}

/// NAB results of one signal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NabResult {
    /// Normalized score per profile, in [`PROFILES`] order.
    pub scores: [f64; 3],
    /// Windows with a detection.
    pub windows_detected: usize,
    /// Windows in the corpus.
    pub windows: usize,
    /// Scored detections outside every window.
    pub false_rows: usize,
    /// Scored rows.
    pub scored_rows: usize,
    /// Scored rows outside every window.
    pub normal_rows: usize,
    /// Per file: name and standard-profile raw score, for `--per-file`.
    pub per_file: Vec<(String, FileScore)>,
}

impl NabResult {
    /// False detections per 1,000 scored rows.
    pub fn false_per_thousand(&self) -> f64 {
        if self.scored_rows == 0 {
            0.0
        } else {
            1000.0 * self.false_rows as f64 / self.scored_rows as f64
        }
    }

    /// Share of normal rows (scored, outside every window) that were flagged.
    pub fn normal_flag_rate(&self) -> f64 {
        if self.normal_rows == 0 {
            0.0
        } else {
            self.false_rows as f64 / self.normal_rows as f64
        }
    }
}

/// Scores one signal on the NAB files.
pub fn score_nab(files: &[nab::NabFile], judged: &[Judged], signal: Signal) -> NabResult {
    let windows: usize = files.iter().map(|f| f.windows.len()).sum();
    let mut result = NabResult {
        windows,
        ..NabResult::default()
    };
    for (p, profile) in PROFILES.iter().enumerate() {
        let mut raw = 0.0;
        for (file, judged) in files.iter().zip(judged) {
            let s = score::score_file(judged.signal(signal), &file.windows, profile);
            raw += s.raw;
            if p == 0 {
                result.windows_detected += s.windows_detected;
                result.false_rows += s.false_rows;
                result.scored_rows += s.scored_rows;
                result.normal_rows += s.normal_rows;
                result.per_file.push((file.name.clone(), s));
            }
        }
        result.scores[p] = score::normalized(raw, windows, profile);
    }
    result
}

/// A short label of a detector and its main settings.
pub fn describe(spec: &DetectorSpec) -> String {
    match spec.kind {
        DetectorKind::ZScore => format!(
            "zscore (window {}, threshold {}, min {})",
            spec.window_size, spec.threshold, spec.min_samples
        ),
        DetectorKind::Robust => format!(
            "robust (window {}, threshold {}, sustained {}, spans {}/{}, cooldown {})",
            spec.robust.window,
            spec.threshold,
            spec.robust.sustained_threshold,
            spec.robust.short_span,
            spec.robust.long_span,
            spec.cooldown
        ),
    }
}

/// The synthetic results table (markdown).
pub fn synthetic_table(rows: &[(String, Signal, SyntheticResult)]) -> String {
    let mut t = String::from(
        "| detector | signal | event recall | FP rate (normal samples) | precision | F1 | spike | dip | level shift | variance burst | first event |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, signal, r) in rows {
        let kinds: Vec<String> = r
            .by_kind
            .iter()
            .map(|(_, events, found)| format!("{found}/{events}"))
            .collect();
        let _ = writeln!(
            t,
            "| {name} | {} | {:.1} % ({}/{}) | {:.3} % | {:.3} | {:.3} | {} | {}/{} |",
            signal.as_str(),
            100.0 * r.total.recall(),
            r.total.found,
            r.total.events,
            100.0 * r.total.fp_rate(),
            r.total.precision(),
            r.total.f1(),
            kinds.join(" | "),
            r.first.1,
            r.first.0
        );
    }
    t
}

/// The NAB results table (markdown).
pub fn nab_table(rows: &[(String, Signal, NabResult)]) -> String {
    let mut t = String::from(
        "| detector | signal | standard | reward_low_FP | reward_low_FN | windows detected | false rows / 1,000 | normal rows flagged |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, signal, r) in rows {
        let _ = writeln!(
            t,
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {}/{} | {:.2} | {:.3} % |",
            signal.as_str(),
            r.scores[0],
            r.scores[1],
            r.scores[2],
            r.windows_detected,
            r.windows,
            r.false_per_thousand(),
            100.0 * r.normal_flag_rate()
        );
    }
    t
}

/// The quality bars of the recommended detector: the figures it reaches at its
/// defaults (rounded down for scores and recall, up for false positives), so that
/// a change that loses quality fails the check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bars {
    /// Minimum synthetic event recall of `anomaly`.
    pub recall: f64,
    /// Maximum synthetic false-positive rate of `anomaly` over normal samples.
    pub fp_rate: f64,
    /// Minimum NAB standard score of `alert`.
    pub nab_standard: f64,
    /// Minimum NAB reward_low_FP score of `alert`.
    pub nab_low_fp: f64,
    /// Minimum NAB reward_low_FN score of `alert`.
    pub nab_low_fn: f64,
    /// Maximum share of NAB's normal rows that `anomaly` flags.
    pub normal_flagged: f64,
}

impl Default for Bars {
    fn default() -> Self {
        Self {
            recall: 0.98,
            fp_rate: 0.0001,
            nab_standard: 69.0,
            nab_low_fp: 63.5,
            nab_low_fn: 74.5,
            normal_flagged: 0.003,
        }
    }
}

impl Bars {
    /// The failed bars, as sentences (empty: all met).
    pub fn check(
        &self,
        synthetic: Option<&SyntheticResult>,
        nab: Option<&NabResult>,
    ) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(s) = synthetic {
            if s.total.recall() < self.recall {
                failed.push(format!(
                    "synthetic event recall {:.1} % is below {:.1} %",
                    100.0 * s.total.recall(),
                    100.0 * self.recall
                ));
            }
            if s.total.fp_rate() > self.fp_rate {
                failed.push(format!(
                    "synthetic false-positive rate {:.3} % is above {:.3} %",
                    100.0 * s.total.fp_rate(),
                    100.0 * self.fp_rate
                ));
            }
        }
        if let Some(n) = nab {
            if n.scores[0] < self.nab_standard {
                failed.push(format!(
                    "NAB standard score {:.1} is below {:.1}",
                    n.scores[0], self.nab_standard
                ));
            }
            if n.scores[1] < self.nab_low_fp {
                failed.push(format!(
                    "NAB reward_low_FP score {:.1} is below {:.1}",
                    n.scores[1], self.nab_low_fp
                ));
            }
            if n.scores[2] < self.nab_low_fn {
                failed.push(format!(
                    "NAB reward_low_FN score {:.1} is below {:.1}",
                    n.scores[2], self.nab_low_fn
                ));
            }
        }
        failed
    }

    /// The failed bars of the per-sample `anomaly` signal on NAB (empty: all met).
    pub fn check_anomaly(&self, nab: &NabResult) -> Vec<String> {
        let rate = nab.normal_flag_rate();
        if rate > self.normal_flagged {
            vec![format!(
                "NAB anomaly flags {:.3} % of normal rows, above {:.3} %",
                100.0 * rate,
                100.0 * self.normal_flagged
            )]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_in_process_runs_the_seed_check() {
        let config = EngineConfig::default();
        let spec = Engine::new(config.clone()).default_detector();
        let values = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0, 425.0];
        let times = [0, 60, 120, 180, 240, 300, 360];
        let judged = replay_in_process(&config, &spec, &[("seed", &times, &values)]);
        assert_eq!(
            judged[0].anomaly,
            [false, false, false, false, false, true, false]
        );
        assert_eq!(
            judged[0].alert,
            [false, false, false, false, false, true, false]
        );
        // z = 47.5 with threshold 2: score 47.5 / 49.5.
        assert!((judged[0].score[5] - 47.5 / 49.5).abs() < 1e-9);
        assert_eq!(judged[0].mismatches(&judged[0]), 0);
    }

    #[test]
    fn the_first_event_of_each_series_is_counted_apart() {
        use synthetic::Event;
        let series = |events: Vec<Event>| SyntheticSeries {
            name: "s".into(),
            times: (0..10).collect(),
            values: vec![0.0; 10],
            events,
        };
        let event = |kind, start, end| Event { kind, start, end };
        // Listed out of time order: the first is the one that starts first.
        let data = [
            series(vec![
                event(EventKind::Dip, 6, 9),
                event(EventKind::Spike, 2, 3),
            ]),
            series(vec![event(EventKind::LevelShift, 1, 4)]),
        ];
        let flags = |at: &[usize]| Judged {
            anomaly: (0..10).map(|i| at.contains(&i)).collect(),
            alert: vec![false; 10],
            score: vec![0.0; 10],
        };
        // The first series' later dip is found, not its first spike; the second
        // series' only event is found.
        let judged = [flags(&[7]), flags(&[3])];
        let result = score_synthetic(&data, &judged, Signal::Anomaly, 0);
        assert_eq!(result.first, (2, 1));
        assert_eq!(result.total.found, 2);
        assert!(synthetic_table(&[("d".into(), Signal::Anomaly, result)]).contains("| 1/2 |"));
    }

    #[test]
    fn a_synthetic_series_too_short_for_its_warm_up_is_refused() {
        use app::{EvalArgs, run};
        use clap::Parser as _;
        let args = EvalArgs::try_parse_from([
            "tidewatch-eval",
            "--no-nab",
            "--warm-up",
            "1000",
            "--length",
            "1299",
        ])
        .unwrap();
        let error = run(&args).unwrap_err().to_string();
        assert!(error.contains("--warm-up 1000"), "{error}");
    }

    #[test]
    fn bars_name_what_failed() {
        let mut s = SyntheticResult::default();
        s.total
            .add(&[true, false, false, true], &[(0, 1), (2, 3)], 0);
        let failed = Bars::default().check(Some(&s), None);
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0].contains("recall 50.0 %"));
        let nab = NabResult {
            scores: [69.0, 63.5, 74.5],
            false_rows: 3,
            normal_rows: 1000,
            ..NabResult::default()
        };
        assert!(Bars::default().check(None, Some(&nab)).is_empty());
        assert!(Bars::default().check_anomaly(&nab).is_empty());
        let nab = NabResult {
            scores: [59.0, -1.0, 68.0],
            false_rows: 4,
            normal_rows: 1000,
            ..NabResult::default()
        };
        let failed = Bars::default().check(None, Some(&nab));
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(failed[2].contains("reward_low_FN score 68.0"), "{failed:?}");
        let failed = Bars::default().check_anomaly(&nab);
        assert!(failed[0].contains("0.400 % of normal rows"), "{failed:?}");
    }
}
