//! The `tidewatch-eval` command: flags, the replays, the tables, the bars.

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Parser;

use super::{
    Bars, Judged, NabResult, Series, Signal, SyntheticResult, describe, nab, nab_table, plot,
    progress::Progress, replay_grpc_with, replay_in_process_with, score_nab, score_synthetic,
    synthetic, synthetic_table,
};
use crate::{
    config::DetectorSettings,
    engine::{DetectorKind, DetectorSpec, Engine, EngineConfig},
};

/// The corpus used when neither `--nab-dir` nor `NAB_DIR` names one, relative to the
/// working directory: the repository's copy of the NAB development subset.
pub const DEFAULT_NAB_DIR: &str = "data/nab-dev";

/// Detection quality of the tidewatch detectors on labeled data: replays synthetic
/// series and NAB-format files through the engine (and optionally a running server)
/// and scores the verdicts.
#[derive(Debug, Clone, Parser)]
#[command(name = "tidewatch-eval", version)]
pub struct EvalArgs {
    /// NAB-format corpus (a directory with windows.json). Default: data/nab-dev when
    /// it exists under the working directory (the repository root), else NAB is skipped.
    #[arg(long, env = "NAB_DIR")]
    pub nab_dir: Option<PathBuf>,

    /// Skip the NAB corpus, even data/nab-dev.
    #[arg(long, conflicts_with = "nab_dir")]
    pub no_nab: bool,

    /// Skip the synthetic data set.
    #[arg(long)]
    pub no_synthetic: bool,

    /// Seed of the synthetic data set.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Synthetic series.
    #[arg(long, default_value_t = 20)]
    pub series: usize,

    /// Samples per synthetic series.
    #[arg(long, default_value_t = 8000)]
    pub length: usize,

    /// Leading samples of each synthetic series without events and not scored. A
    /// short one (e.g. `--warm-up 100 --length 1100 --series 50`) measures early
    /// detection: events from the first ~100 samples on.
    #[arg(long, default_value_t = 1000)]
    pub warm_up: usize,

    /// Detectors to evaluate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "zscore,robust")]
    pub detectors: Vec<String>,

    /// The detector held to the quality bars (with --check-bars).
    #[arg(long, default_value = "robust")]
    pub recommended: String,

    /// Exit with status 1 when the recommended detector misses a bar (`Bars` in
    /// eval.rs): synthetic `anomaly` event recall >= 98 % with <= 0.01 % false
    /// positives over normal samples; NAB `alert` scores >= 69 standard, 63.5
    /// low-FP, 74.5 low-FN; NAB `anomaly` on <= 0.3 % of normal rows. Requires --nab-dir.
    #[arg(long)]
    pub check_bars: bool,

    /// Also replay every series through a running server over gRPC (e.g.
    /// http://127.0.0.1:50051) and compare its verdicts with the in-process ones. The
    /// server must run with the same detector settings (ALERT_COOLDOWN, ROBUST_*).
    #[arg(long)]
    pub grpc: Option<String>,

    /// Print the NAB standard-profile score of every file.
    #[arg(long)]
    pub per_file: bool,

    /// Draw one SVG per series and detector into this directory (created if missing):
    /// the values, the labelled windows shaded, a dot on every `anomaly`, a line at
    /// every `alert`.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,

    /// z-score window (the seed's 50).
    #[arg(long, default_value_t = 50)]
    pub window_size: usize,

    /// z-score warm-up (the seed's 5).
    #[arg(long, default_value_t = 5)]
    pub min_samples: usize,

    /// z-score threshold (the seed's 2.0).
    #[arg(long, default_value_t = 2.0)]
    pub z_threshold: f64,

    /// Detector settings, as the server takes them.
    #[command(flatten)]
    pub settings: DetectorSettings,
}

impl EvalArgs {
    /// The NAB corpus to score: `--nab-dir`/`NAB_DIR`, else [`DEFAULT_NAB_DIR`] if it
    /// holds a `windows.json`, else none.
    pub fn nab_corpus(&self) -> Option<PathBuf> {
        if self.no_nab {
            return None;
        }
        self.nab_dir.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_NAB_DIR);
            default.join("windows.json").is_file().then_some(default)
        })
    }
}

/// Runs the evaluation and prints the tables; `Ok(false)` when a bar was missed.
pub fn run(args: &EvalArgs) -> anyhow::Result<bool> {
    let nab_dir = args.nab_corpus();
    // The generator spreads its four events over what follows the warm-up, keeping
    // the last 300 samples clear for the longest of them.
    if !args.no_synthetic && args.length < args.warm_up + 300 {
        anyhow::bail!(
            "--length {} leaves no room for events after --warm-up {}: it must be at least the warm-up + 300",
            args.length,
            args.warm_up
        );
    }
    args.settings
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = EngineConfig {
        window_size: args.window_size,
        min_samples: args.min_samples,
        z_threshold: args.z_threshold,
        ..EngineConfig::default()
    };
    args.settings.apply(&mut config);
    let defaults = Engine::new(config.clone());
    let mut specs: Vec<DetectorSpec> = Vec::new();
    for name in &args.detectors {
        let kind = DetectorKind::parse(name)
            .with_context(|| format!("unknown detector {name:?} in --detectors"))?;
        specs.push(config.detector_defaults().spec(kind));
    }
    drop(defaults);
    let recommended = DetectorKind::parse(&args.recommended)
        .with_context(|| format!("unknown detector {:?} in --recommended", args.recommended))?;
    if args.check_bars && nab_dir.is_none() {
        anyhow::bail!(
            "--check-bars needs the NAB corpus: run from the repository root (data/nab-dev), pass --nab-dir or set NAB_DIR"
        );
    }
    let runtime = match &args.grpc {
        Some(_) => Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        ),
        None => None,
    };
    let run_id = format!(
        "eval-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the plot directory {}", dir.display()))?;
    }
    let draw = |spec: &DetectorSpec,
                name: &str,
                values: &[f64],
                windows: &[(usize, usize)],
                judged: &Judged|
     -> anyhow::Result<()> {
        let Some(dir) = &args.plot else {
            return Ok(());
        };
        let title = format!("{name} — {}", describe(spec));
        let path = dir.join(plot::file_name(spec.kind.as_str(), name));
        plot::draw(
            &path,
            &plot::PlotInput {
                title: &title,
                values,
                windows,
                judged,
            },
        )?;
        Ok(())
    };
    let mut ok = true;
    let mut check = |what: &str, failed: Vec<String>| {
        for f in &failed {
            eprintln!("BAR MISSED ({what}): {f}");
        }
        ok &= failed.is_empty();
    };
    let replay = |data: &str,
                  spec: &DetectorSpec,
                  series: &[Series<'_>]|
     -> anyhow::Result<Vec<Judged>> {
        let mut progress = Progress::new(
            format!("{data}: {} in process", spec.kind.as_str()),
            series.len(),
            "series",
        );
        let local = replay_in_process_with(&config, spec, series, &mut |n| progress.update(n));
        progress.finish();
        if let (Some(url), Some(rt)) = (&args.grpc, &runtime) {
            let mut progress = Progress::new(
                format!("{data}: {} over gRPC", spec.kind.as_str()),
                series.len(),
                "series",
            );
            let remote = rt.block_on(replay_grpc_with(url, &run_id, spec, series, &mut |n| {
                progress.update(n)
            }))?;
            progress.finish();
            let rows: usize = local.iter().map(|j| j.anomaly.len()).sum();
            let mismatches: usize = local
                .iter()
                .zip(&remote)
                .map(|(a, b)| a.mismatches(b))
                .sum();
            println!(
                "gRPC replay of {} ({} series, {rows} samples) against {url}: {mismatches} verdicts differ from in-process",
                describe(spec),
                series.len()
            );
            if mismatches > 0 {
                anyhow::bail!("gRPC and in-process verdicts differ in {mismatches} samples");
            }
        }
        Ok(local)
    };

    if !args.no_synthetic {
        let spec = synthetic::SyntheticSpec {
            seed: args.seed,
            series: args.series,
            length: args.length,
            warm_up: args.warm_up,
        };
        let data = synthetic::generate(&spec);
        let series: Vec<Series<'_>> = data
            .iter()
            .map(|s| (s.name.as_str(), s.times.as_slice(), s.values.as_slice()))
            .collect();
        let mut rows: Vec<(String, Signal, SyntheticResult)> = Vec::new();
        for d in &specs {
            let started = Instant::now();
            let judged = replay("synthetic", d, &series)?;
            let elapsed = started.elapsed();
            for (s, j) in data.iter().zip(&judged) {
                let spans: Vec<(usize, usize)> = s
                    .events
                    .iter()
                    .map(|e| (e.start, e.end.saturating_sub(1).max(e.start)))
                    .collect();
                draw(d, &format!("synthetic/{}", s.name), &s.values, &spans, j)?;
            }
            for signal in Signal::ALL {
                let result = score_synthetic(&data, &judged, signal, spec.warm_up);
                if args.check_bars && d.kind == recommended && signal == Signal::Anomaly {
                    check("synthetic", Bars::default().check(Some(&result), None));
                }
                rows.push((describe(d), signal, result));
            }
            eprintln!("synthetic: {} replayed in {elapsed:?}", describe(d));
        }
        println!(
            "\n### Synthetic data (seed {}, {} series × {} samples, 4 labeled events each, first {} samples not scored)\n",
            spec.seed, spec.series, spec.length, spec.warm_up
        );
        print!("{}", synthetic_table(&rows));
    }

    if let Some(dir) = &nab_dir {
        let files =
            nab::load(dir).with_context(|| format!("loading NAB corpus {}", dir.display()))?;
        let series: Vec<Series<'_>> = files
            .iter()
            .map(|f| (f.name.as_str(), f.times.as_slice(), f.values.as_slice()))
            .collect();
        let rows_total: usize = files.iter().map(|f| f.values.len()).sum();
        let mut rows: Vec<(String, Signal, NabResult)> = Vec::new();
        for d in &specs {
            let judged = replay("NAB", d, &series)?;
            for (f, j) in files.iter().zip(&judged) {
                draw(d, &f.name, &f.values, &f.windows, j)?;
            }
            for signal in Signal::ALL {
                let result = score_nab(&files, &judged, signal);
                if args.check_bars && d.kind == recommended {
                    match signal {
                        Signal::Alert => check("NAB", Bars::default().check(None, Some(&result))),
                        Signal::Anomaly => check("NAB", Bars::default().check_anomaly(&result)),
                    }
                }
                rows.push((describe(d), signal, result));
            }
        }
        println!(
            "\n### NAB ({}: {} files, {rows_total} rows, {} windows; one configuration for all files)\n",
            dir.display(),
            files.len(),
            rows.first().map_or(0, |r| r.2.windows)
        );
        print!("{}", nab_table(&rows));
        if args.per_file {
            for (name, signal, result) in &rows {
                println!("\n{name} / {}:", signal.as_str());
                for (file, s) in &result.per_file {
                    println!(
                        "  {file:<60} raw {:>7.3}  windows {}  false rows {}",
                        s.raw, s.windows_detected, s.false_rows
                    );
                }
            }
        }
    }
    Ok(ok)
}
