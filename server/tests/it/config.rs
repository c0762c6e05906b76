//! Configuration of the real binary: an invalid setting exits 64 with one line on
//! stderr naming the setting; no setting at all runs in memory without Redis (what
//! `cargo run --release` does), and says so.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::common::ServerProcess;

/// Runs the binary with only `envs` and `args` set; returns (exit code, stderr).
fn run_invalid(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .env_clear()
        .env("GRPC_ADDR", "127.0.0.1:0")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(envs.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tidewatch");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Flags, environment, and the setting the error line must name.
type Case = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn invalid_settings_exit_64_with_one_line_naming_the_setting() {
    let cases: &[Case] = &[
        (&[], &[("WINDOW_SIZE", "0")], "WINDOW_SIZE"),
        (&[], &[("Z_THRESHOLD", "abc")], "Z_THRESHOLD"),
        (&[], &[("LOG_LEVEL", "info,=nonsense[")], "LOG_LEVEL"),
        (&[], &[("Z_THRESHOLD", "-1")], "Z_THRESHOLD"),
        (&[], &[("MIN_SAMPLES", "60")], "MIN_SAMPLES"),
        (&[], &[("WINDOW_SIZE", "-5")], "WINDOW_SIZE"),
        (&[], &[("GRPC_ADDR", "localhost")], "GRPC_ADDR"),
        (
            &[],
            &[("STREAM_IDLE_TIMEOUT", "forever")],
            "STREAM_IDLE_TIMEOUT",
        ),
        (&[], &[("MAX_MESSAGE_BYTES", "10")], "MAX_MESSAGE_BYTES"),
        (&[], &[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
        (&[], &[("GRPC_COMPRESSION", "brotli")], "GRPC_COMPRESSION"),
        (&[], &[("GRPC_COMPRESSION", "gzip,off")], "GRPC_COMPRESSION"),
        (&["--window-size", "0"], &[], "WINDOW_SIZE"),
        (&["--shutdown-timeout", "0"], &[], "SHUTDOWN_TIMEOUT"),
    ];
    for (args, envs, setting) in cases {
        let (code, stderr) = run_invalid(args, envs);
        assert_eq!(code, Some(64), "{args:?} {envs:?}: stderr {stderr:?}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?} {envs:?}: one line, got {stderr:?}"
        );
        assert!(
            lines[0].contains(setting),
            "{args:?} {envs:?}: {:?} does not name {setting}",
            lines[0]
        );
    }
}

#[test]
fn help_and_version_exit_zero() {
    for flag in ["--help", "--version"] {
        let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
            .env_clear()
            .arg(flag)
            .output()
            .expect("run tidewatch");
        assert!(output.status.success(), "{flag}: {:?}", output.status);
        assert!(!output.stdout.is_empty());
    }
}

#[test]
fn no_settings_runs_in_memory_without_redis_and_says_so() {
    // Only free ports and JSON logs (so the test can read them): like `cargo run`.
    let process = ServerProcess::spawn(&[], &[]);
    assert!(
        process.grpc_addr.ip().is_loopback(),
        "{}",
        process.grpc_addr
    );
    // The mode line comes before "grpc listening" (in the startup log) so that
    // readiness-watching tools see it; look there first, then in what follows.
    let says_in_memory = |v: &serde_json::Value| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("in memory") && m.contains("without Redis"))
    };
    let line = process
        .startup_log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| says_in_memory(v))
        .or_else(|| {
            process
                .log
                .wait_for(says_in_memory, Duration::from_secs(20))
        })
        .unwrap_or_else(|| {
            panic!(
                "no in-memory line in {:?} {:?}",
                process.startup_log,
                process.log.lines()
            )
        });
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["window_size"], 50, "{line}");
    process.terminate();
}
