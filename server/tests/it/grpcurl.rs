//! The real grpcurl (1.8.6, which speaks only reflection v1alpha) against the real
//! server: `list` shows the service, a stream of JSON samples through `-d @` gets its
//! verdicts (the seed check), and every grpcurl example of the README works exactly
//! as printed, with only the address replaced by the test server's.
//!
//! grpcurl comes from `.venv/bin` of the workspace or from `PATH`; without it these
//! tests fail (they are never skipped).

use std::{
    io::{Read, Write},
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::common::{TestServer, grpcurl, metric_total, wait_until};
use serde_json::Value;

/// The address the README's examples use.
const README_ADDR: &str = "127.0.0.1:50051";

/// Runs grpcurl with `args`, feeding `stdin`.
fn run_grpcurl(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(grpcurl())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grpcurl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("grpcurl output")
}

/// The JSON documents grpcurl printed, one per response message.
fn documents(stdout: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!(
                "grpcurl printed non-JSON ({e}): {}",
                String::from_utf8_lossy(stdout)
            )
        })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_the_service() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let out = tokio::task::block_in_place(|| run_grpcurl(&["-plaintext", &addr, "list"], ""));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let services: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert!(
        services
            .iter()
            .any(|s| s == "tidewatch.v1.TelemetryService"),
        "{services:?}"
    );
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_json_samples_gets_verdicts() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let mut input = String::new();
    for (i, v) in [420, 430, 410, 440, 425, 900].iter().enumerate() {
        input += &format!(
            "{{\"samples\":[{{\"deviceId\":\"seed\",\"seq\":\"{}\",\"metrics\":{{\"rps\":{v}}}}}]}}\n",
            i + 1
        );
    }
    // A bad sample answers with its error, and the stream goes on.
    input += "{\"samples\":[{\"deviceId\":\"seed\",\"metrics\":{\"rps\":\"NaN\"}}]}\n";
    let out = tokio::task::block_in_place(|| {
        run_grpcurl(
            &[
                "-plaintext",
                "-d",
                "@",
                &addr,
                "tidewatch.v1.TelemetryService/Ingest",
            ],
            &input,
        )
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let responses = documents(&out.stdout);
    assert_eq!(responses.len(), 7, "{}", text(&out.stdout));
    for (i, r) in responses[..5].iter().enumerate() {
        let v = &r["verdicts"][0];
        assert_eq!(v["deviceId"], "seed");
        assert_eq!(v["seq"], (i + 1).to_string(), "uint64 is a JSON string");
        // grpcurl leaves out fields at their default (false, 0) without -emit-defaults.
        assert!(!v["anomaly"].as_bool().unwrap_or(false), "{r}");
    }
    let seed = &responses[5]["verdicts"][0];
    assert_eq!(seed["anomaly"], true, "{seed}");
    let m = &seed["metrics"][0];
    assert_eq!(m["metric"], "rps");
    assert_eq!(m["mean"], 425.0);
    assert_eq!(m["windowCount"], 5);
    assert!(
        (m["zScore"].as_f64().expect("zScore") - 47.5).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (m["stddev"].as_f64().expect("stddev") - 10.0).abs() < 1e-12,
        "{m}"
    );
    let bad = &responses[6]["verdicts"][0];
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("invalid_value")),
        "{bad}"
    );
    server.stop().await.expect("clean shutdown");
}

/// The grpcurl commands against `README_ADDR` in the README's `sh` blocks, in order;
/// a command with a here-document includes it.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        // Only the examples against a local `cargo run` (deployment sections may show
        // other addresses).
        if !in_sh || !line.starts_with("grpcurl ") || !line.contains(README_ADDR) {
            continue;
        }
        let mut command = line.to_string();
        if let Some(tag) = line.split("<<'").nth(1).and_then(|t| t.strip_suffix('\'')) {
            for body in lines.by_ref() {
                command += "\n";
                command += body;
                if body == tag {
                    break;
                }
            }
        }
        commands.push(command);
    }
    commands
}

/// Runs a README command in bash with grpcurl first on `PATH`.
fn shell(command: &str) -> Command {
    let dir = grpcurl().parent().expect("grpcurl dir").to_path_buf();
    let path = std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!("exec {command}")).env("PATH", path);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_examples_work_as_printed() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let commands = readme_commands();
    let kinds = [
        " list",
        " describe tidewatch.v1.TelemetryService",
        "grpc.health.v1.Health/Check",
        "TelemetryService/Ingest",
        "TelemetryService/Analyze",
        "TelemetryService/WatchAnomalies",
    ];
    for kind in kinds {
        assert!(
            commands.iter().any(|c| c.contains(kind)),
            "the README has no{kind} example: {commands:#?}"
        );
    }
    let local = |c: &str| c.replace(README_ADDR, &addr);

    // The live feed runs until interrupted: start it first, in the background.
    let watch = commands
        .iter()
        .find(|c| c.contains("WatchAnomalies"))
        .expect("watch example");
    let mut watcher = shell(&local(watch))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grpcurl watch");
    let mut watch_out = watcher.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = watch_out.read(&mut buf) {
            if tx.send(text(&buf[..n])).is_err() {
                break;
            }
        }
    });
    let state = server.state.clone();
    wait_until("grpcurl to subscribe", Duration::from_secs(20), || {
        metric_total(&state, "tidewatch_watchers_active") >= 1.0
    })
    .await;

    for command in commands.iter().filter(|c| !c.contains("WatchAnomalies")) {
        let out = tokio::task::block_in_place(|| shell(&local(command)).output().expect("run"));
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{command}\nfailed: {}{stdout}",
            text(&out.stderr)
        );
        if command.contains(" list") {
            assert!(stdout.contains("tidewatch.v1.TelemetryService"), "{stdout}");
        } else if command.contains(" describe ") {
            assert!(stdout.contains("rpc Ingest ( stream"), "{stdout}");
        } else if command.contains("Health/Check") {
            assert_eq!(
                documents(&out.stdout),
                [serde_json::json!({"status": "SERVING"})]
            );
        } else if command.contains("/Ingest") {
            let responses = documents(&out.stdout);
            let last = &responses.last().expect("responses")["verdicts"][0];
            assert_eq!(last["anomaly"], true, "{stdout}");
            assert_eq!(last["metrics"][0]["zScore"], 47.5, "{stdout}");
        } else if command.contains("/Analyze") {
            let stats = &documents(&out.stdout)[0];
            assert_eq!(stats["deviceId"], "sensor-1", "{stdout}");
            assert_eq!(stats["metrics"][0]["lastAnomaly"], true, "{stdout}");
        } else {
            // An example added later: it must at least succeed and print something.
            assert!(!stdout.trim().is_empty(), "{command} printed nothing");
        }
    }

    // The feed printed the README stream's anomaly.
    let mut seen = String::new();
    while !seen.contains("\"zScore\": 47.5") {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(chunk) => seen += &chunk,
            Err(e) => panic!("no anomaly on the README's watch example ({e}): {seen}"),
        }
    }
    assert!(seen.contains("\"deviceId\": \"sensor-1\""), "{seen}");
    let _ = watcher.kill();
    let _ = watcher.wait();
    server.stop().await.expect("clean shutdown");
}
