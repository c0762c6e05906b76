//! The `tidewatch-bench` binary against the real server in-process: closed loop with a
//! message count, open loop at a small rate, per-sample errors, a stream the server
//! refuses, an unreachable server, injected anomalies judged and watched with both
//! detectors, gzip both ways, and h2load bodies that reach the devices they say. Each run's
//! ghz-compatible JSON report is checked against what the server itself counted.

use std::{path::Path, process::Output};

use serde_json::Value;

use crate::common::{TestServer, test_dir};
use tidewatch_server::config::GrpcCompression;

/// Runs the bench binary with `args` plus `--url` and `--output` (off the runtime's
/// threads: the server runs on them).
async fn bench(url: &str, report: &Path, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tidewatch-bench"));
    command
        .args(["--url", url, "--threads", "1", "--output"])
        .arg(report)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run tidewatch-bench"))
        .await
        .expect("join")
}

/// [`bench`] for a run that must succeed: its standard output and its report.
async fn bench_ok(url: &str, path: &Path, args: &[&str]) -> (String, Value) {
    let out = bench(url, path, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, report(path))
}

fn report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

/// Samples the server answered over gRPC, from its own Prometheus counter.
fn server_samples(server: &TestServer) -> u64 {
    server.grpc_counter("tidewatch_samples_total")
}

/// The checks every report of a successful run passes, ghz's keys and units:
/// durations in nanoseconds, percentiles 10..99, `rps` per second.
fn check_ghz_shape(r: &Value, count: u64) {
    assert_eq!(r["count"], count, "{r:#}");
    let total = r["total"].as_u64().expect("total ns");
    let fastest = r["fastest"].as_u64().expect("fastest ns");
    let average = r["average"].as_u64().expect("average ns");
    let slowest = r["slowest"].as_u64().expect("slowest ns");
    assert!(
        fastest > 0 && fastest <= average && average <= slowest,
        "{r:#}"
    );
    // A loopback answer takes more than 1 µs and less than the whole run.
    assert!(fastest > 1_000 && slowest < total, "{r:#}");
    let rps = r["rps"].as_f64().expect("rps");
    let expected = count as f64 / (total as f64 / 1e9);
    assert!(
        (rps - expected).abs() < expected * 0.01,
        "rps {rps} vs {expected}"
    );
    let latencies = r["latencyDistribution"]
        .as_array()
        .expect("latencyDistribution");
    let percentages: Vec<u64> = latencies
        .iter()
        .map(|d| d["percentage"].as_u64().expect("percentage"))
        .collect();
    assert_eq!(percentages, [10, 25, 50, 75, 90, 95, 99]);
    let values: Vec<u64> = latencies
        .iter()
        .map(|d| d["latency"].as_u64().expect("latency ns"))
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert!(values[0] >= fastest && values[6] <= slowest, "{values:?}");
    let histogram = r["histogram"].as_array().expect("histogram");
    let in_buckets: u64 = histogram.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(in_buckets, count);
    assert_eq!(r["options"]["call"], "tidewatch.v1.TelemetryService.Ingest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_answers_exactly_the_messages_asked_for() {
    let server = TestServer::start_with(|_| {}).await;
    let dir = test_dir("closed");
    let path = dir.join("closed.json");
    let before = server_samples(&server);
    // 2 × 3 streams do not divide 2,000 messages: the count must still be exact.
    let (stdout, r) = bench_ok(
        &server.url(),
        &path,
        &[
            "-c",
            "2",
            "-s",
            "3",
            "--rate",
            "0",
            "--window",
            "8",
            "--batch",
            "3",
            "--devices",
            "50",
            "--messages",
            "2000",
        ],
    )
    .await;
    check_ghz_shape(&r, 2000);
    assert_eq!(r["statusCodeDistribution"], serde_json::json!({"OK": 2000}));
    assert_eq!(r["errorDistribution"], serde_json::json!({}));
    assert_eq!(r["endReason"], "normal");
    assert_eq!(r["tags"]["samples_answered"], "6000");
    assert_eq!(r["tags"]["sample_errors"], "0");
    assert_eq!(r["tags"]["latency_from"], "send time");
    assert!(
        stdout.contains("samples answered    6000 (0 with a per-sample error)"),
        "{stdout}"
    );
    assert_eq!(
        server_samples(&server) - before,
        6000,
        "the server's own count"
    );
    server.stop().await;
}

/// `--gzip --accept-gzip` against a server that compresses its answers: every message
/// goes out compressed, every answer comes back compressed and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_both_ways_is_counted_as_plain() {
    let server = TestServer::start_with(|c| c.grpc_compression = vec![GrpcCompression::Gzip]).await;
    let dir = test_dir("gzip");
    let path = dir.join("gzip.json");
    let args = [
        "-s",
        "2",
        "--rate",
        "0",
        "--window",
        "4",
        "--batch",
        "20",
        "--devices",
        "50",
        "--messages",
        "200",
        "--gzip",
        "--accept-gzip",
    ];
    let (stdout, r) = bench_ok(&server.url(), &path, &args).await;
    check_ghz_shape(&r, 200);
    assert_eq!(r["tags"]["samples_answered"], "4000", "{stdout}");
    assert!(stdout.contains("answers gzipped     200"), "{stdout}");
    assert_eq!(r["tags"]["sample_errors"], "0");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_offers_the_rate_for_the_duration() {
    let server = TestServer::start_with(|_| {}).await;
    let dir = test_dir("open");
    let path = dir.join("open.json");
    let timeline = dir.join("open.csv");
    let before = server_samples(&server);
    let (_, r) = bench_ok(
        &server.url(),
        &path,
        &[
            "-c",
            "1",
            "-s",
            "2",
            "--rate",
            "2000",
            "--duration",
            "1s",
            "--devices",
            "100",
            "--timeline",
            timeline.to_str().expect("utf-8 path"),
            "--timeline-interval",
            "250ms",
        ],
    )
    .await;
    // 2,000 msg/s for 1 s, the streams' schedules offset by less than one interval.
    let count = r["count"].as_u64().expect("count");
    assert!((1995..=2000).contains(&count), "count {count}");
    check_ghz_shape(&r, count);
    assert_eq!(
        r["statusCodeDistribution"],
        serde_json::json!({"OK": count})
    );
    assert_eq!(r["endReason"], "timeout");
    assert_eq!(r["options"]["rps"], 2000);
    assert_eq!(r["options"]["duration"], 1_000_000_000u64);
    assert_eq!(r["tags"]["latency_from"], "intended send time");
    // Paced, not a burst: the run lasts about the duration.
    let total = r["total"].as_u64().unwrap();
    assert!(
        (950_000_000..3_000_000_000).contains(&total),
        "total {total} ns"
    );
    assert_eq!(r["tags"]["samples_answered"], count.to_string());
    assert_eq!(
        server_samples(&server) - before,
        count,
        "the server's own count"
    );
    // The timeline: by intended send time, 500 messages in each 250 ms of the second.
    let csv = std::fs::read_to_string(&timeline).expect("timeline written");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("start_ms,messages,over_1ms,mean_us,max_us")
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|f| f.parse().expect("number")).collect())
        .collect();
    assert_eq!(rows.len(), 4, "{csv}");
    let mut messages = 0.0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], 250.0 * i as f64, "{csv}");
        assert!((495.0..=505.0).contains(&row[1]), "{csv}");
        assert!(row[2] <= row[1], "{csv}");
        assert!(row[3] > 1.0 && row[3] <= row[4], "{csv}");
        messages += row[1];
    }
    assert_eq!(messages, count as f64, "every answer is in one row: {csv}");
    let slowest_us = r["slowest"].as_u64().unwrap() as f64 / 1e3;
    let max_us = rows.iter().map(|row| row[4]).fold(0.0, f64::max);
    assert!(
        (max_us - slowest_us).abs() <= slowest_us * 0.01 + 0.1,
        "{max_us} vs {slowest_us}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_sample_errors_are_counted() {
    // 33 metrics per sample: one more than the server's MAX_METRICS_PER_DEVICE (32).
    let server = TestServer::start_with(|_| {}).await;
    let dir = test_dir("errors");
    let path = dir.join("errors.json");
    let (stdout, r) = bench_ok(
        &server.url(),
        &path,
        &[
            "-c",
            "1",
            "-s",
            "2",
            "--metrics",
            "33",
            "--batch",
            "2",
            "--messages",
            "100",
        ],
    )
    .await;
    check_ghz_shape(&r, 100);
    assert_eq!(r["statusCodeDistribution"], serde_json::json!({"OK": 100}));
    assert_eq!(r["tags"]["samples_answered"], "200");
    assert_eq!(r["tags"]["sample_errors"], "200");
    assert!(stdout.contains("(200 with a per-sample error)"), "{stdout}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_reported_with_its_status() {
    let server = TestServer::start_with(|c| c.max_samples_per_request = 4).await;
    let dir = test_dir("refused");
    let path = dir.join("refused.json");
    // 5 samples per message: every stream ends with INVALID_ARGUMENT at once.
    let out = bench(
        &server.url(),
        &path,
        &[
            "-c",
            "1",
            "-s",
            "2",
            "--batch",
            "5",
            "--window",
            "1",
            "--messages",
            "10",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nothing was answered, yet it succeeded"
    );
    assert!(stderr.contains("no message was answered"), "{stderr}");
    let r = report(&path);
    let statuses = r["statusCodeDistribution"].as_object().expect("statuses");
    assert_eq!(
        statuses.keys().collect::<Vec<_>>(),
        ["InvalidArgument"],
        "{r:#}"
    );
    let errors = r["errorDistribution"].as_object().expect("errors");
    assert_eq!(errors.len(), 1, "{r:#}");
    let (error, n) = errors.iter().next().unwrap();
    assert!(
        error.starts_with("rpc error: code = InvalidArgument desc = ")
            && error.contains("MAX_SAMPLES_PER_REQUEST"),
        "{error}"
    );
    assert_eq!(n, &statuses["InvalidArgument"]);
    assert_eq!(r["tags"]["samples_answered"], "0");
    assert_eq!(server_samples(&server), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = test_dir("unreachable");
    let path = dir.join("unreachable.json");
    let out = bench(&url, &path, &["--messages", "10"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot connect to {url}")),
        "stderr: {stderr}"
    );
    assert!(!path.exists(), "no report for a run that never started");
}

/// Device ids of a written h2load body, decoded independently of the tool.
fn body_devices(path: &Path) -> (usize, std::collections::HashSet<String>) {
    use prost::Message as _;
    let body = std::fs::read(path).expect("body written");
    let mut at = 0;
    let mut messages = 0;
    let mut ids = std::collections::HashSet::new();
    while at < body.len() {
        assert_eq!(body[at], 0, "uncompressed frame");
        let len = u32::from_be_bytes(body[at + 1..at + 5].try_into().unwrap()) as usize;
        let message =
            tidewatch_proto::v1::IngestRequest::decode(&body[at + 5..at + 5 + len]).unwrap();
        for sample in message.samples {
            assert!(sample.time.is_some(), "timestamps are set");
            assert!(
                (2..=8).contains(&sample.metrics.len()),
                "{:?}",
                sample.metrics
            );
            ids.insert(sample.device_id);
        }
        messages += 1;
        at += 5 + len;
    }
    (messages, ids)
}

/// Runs the bench binary for a body; its standard output and error.
fn write_body(path: &Path, args: &[&str]) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidewatch-bench"))
        .arg("--write-h2load-body")
        .arg(path)
        .args(args)
        .output()
        .expect("run tidewatch-bench");
    assert!(out.status.success());
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_h2load_body_reaches_the_devices_it_reports() {
    let dir = test_dir("body");
    let path = dir.join("single.body");
    // By default the body reaches every device: 10,000 single-sample messages.
    let (stdout, stderr) = write_body(&path, &["--batch", "1", "--devices", "10000"]);
    let (messages, ids) = body_devices(&path);
    assert_eq!((messages, ids.len()), (10_000, 10_000), "{stdout}");
    assert!(
        stdout.contains("traffic: 10000 distinct devices reached (of --devices 10000)"),
        "{stdout}"
    );
    assert!(
        ids.iter().all(|id| (20..=36).contains(&id.len())),
        "{ids:?}"
    );
    assert!(stderr.is_empty(), "{stderr}");
    // 100 single-sample messages cannot reach 10,000 devices, and the tool says so.
    let (stdout, stderr) = write_body(
        &path,
        &[
            "--batch",
            "1",
            "--devices",
            "10000",
            "--body-messages",
            "100",
        ],
    );
    let (messages, ids) = body_devices(&path);
    assert_eq!((messages, ids.len()), (100, 100));
    assert!(
        stdout.contains("traffic: 100 distinct devices reached (of --devices 10000)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("reaches only 100 of 10000 devices"),
        "{stderr}"
    );
    // 100 messages of 100 samples reach all 10,000.
    let (stdout, _) = write_body(
        &path,
        &[
            "--batch",
            "100",
            "--devices",
            "10000",
            "--body-messages",
            "100",
        ],
    );
    let (_, ids) = body_devices(&path);
    assert_eq!(ids.len(), 10_000);
    assert!(
        stdout.contains("traffic: 10000 distinct devices reached"),
        "{stdout}"
    );
}

/// Runs four cycles of a 20-device pool of 64 rounds with one watcher (256 values per
/// series, so the first windows' warm-up weighs little); checks the anomalies the tool
/// counted against the server's counter and the injection rate, and returns the share
/// judged anomalous.
async fn judged_share(server: &TestServer, name: &str, detector: &str) -> f64 {
    let dir = test_dir(name);
    let path = dir.join("report.json");
    let (stdout, r) = bench_ok(
        &server.url(),
        &path,
        &[
            "-c",
            "1",
            "-s",
            "2",
            "--window",
            "4",
            "--batch",
            "10",
            "--devices",
            "20",
            "--rounds",
            "64",
            "--messages",
            "512",
            "--watchers",
            "1",
            "--detector",
            detector,
        ],
    )
    .await;
    let tag = |k: &str| -> u64 { r["tags"][k].as_str().unwrap().parse().unwrap() };
    assert_eq!(tag("samples_answered"), 5_120);
    assert_eq!(tag("devices_reached"), 20);
    let injected = tag("injected_anomalies") as f64 / tag("pool_samples") as f64;
    assert!((0.005..=0.02).contains(&injected), "injected {injected}");
    let anomalous = tag("anomalous_samples");
    assert_eq!(
        anomalous,
        server.grpc_counter("tidewatch_anomalies_total"),
        "the tool's count is the server's"
    );
    assert!(tag("alerts") > 0 && tag("alerts") <= anomalous, "{stdout}");
    let watched = tag("watch_events");
    assert!(watched > 0 && watched <= anomalous, "{stdout}");
    anomalous as f64 / 5_120.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_anomalies_are_judged_and_watched_zscore() {
    let server = TestServer::start_with(|_| {}).await;
    let share = judged_share(&server, "zscore", "zscore").await;
    // Every spike (tens of standard deviations) is caught, and the bounded noise
    // passes the default z = 2 mostly while windows are still short (the first of
    // each series' 256 values): about 5 % of samples of 2-8 metrics in all.
    assert!((0.01..=0.08).contains(&share), "zscore judged {share}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_anomalies_are_judged_and_watched_robust() {
    let server = TestServer::start_with(|_| {}).await;
    let share = judged_share(&server, "robust", "robust").await;
    // robust judges nothing in its first 32 values and takes a spike that recurs
    // within its range window (the pool is a 64-value cycle) as the metric's range:
    // it flags the first occurrences only, and never the noise.
    assert!((0.0005..=0.01).contains(&share), "robust judged {share}");
    server.stop().await;
}
