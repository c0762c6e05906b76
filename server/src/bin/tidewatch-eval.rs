//! `tidewatch-eval`: detection quality of the tidewatch detectors on labeled data
//! (synthetic series and NAB-format files). See `QUALITY.md`; its description is
//! `EvalArgs`'s doc comment, not the package's (which is the server's).

use clap::Parser;
use tidewatch_server::eval::app::{EvalArgs, run};

fn main() -> std::process::ExitCode {
    let args = EvalArgs::parse();
    match run(&args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tidewatch-eval: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
