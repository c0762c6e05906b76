//! The `tidewatch` binary: parse configuration, set up logging, run the library until
//! SIGTERM/SIGINT. Everything else lives in the `tidewatch_server` library.

use std::process::ExitCode;

use clap::Parser;
use tidewatch_server::config::{Config, EXIT_CONFIG};

/// mimalloc instead of glibc malloc: the ingest path allocates and frees small
/// objects per sample (prost's decoded device ids and metric maps, the verdicts),
/// which glibc's `_int_malloc`/`_int_free`/`malloc_consolidate` made ~30 % of a
/// batched-ingest profile (BENCHMARKS.md, gRPC server).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the setting (clap's first line does).
            let rendered = e.to_string();
            let line = rendered.lines().next().unwrap_or("invalid configuration");
            eprintln!("{line}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    tidewatch_server::telemetry::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        // Signal handlers first, so that a SIGTERM during start-up still drains.
        let signal = tidewatch_server::shutdown::signal();
        tidewatch_server::run(config, signal).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tidewatch failed");
            ExitCode::FAILURE
        }
    }
}
