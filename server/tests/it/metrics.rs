//! `/metrics` after real traffic over both transports: every documented metric is
//! there with the value the traffic implies, no device id or metric name is a label,
//! and the real `promtool check metrics` (Debian package `prometheus`) finds nothing.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use crate::common::{TestServer, http_get, ingest_json, metric_value, one};
use tidewatch_proto::v1::{AnalyzeRequest, IngestRequest, WatchAnomaliesRequest};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// Runs `promtool check metrics` on `exposition`; returns its exit success and output.
fn promtool_check(exposition: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic_pass_promtool() {
    let server = TestServer::start().await;
    let addr = server.http_addr;

    // gRPC: a watcher, a stream kept open with the seed check, an Analyze.
    let mut client = server.client().await;
    let mut watcher = client
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let (tx, rx) = mpsc::channel::<IngestRequest>(8);
    let mut verdicts = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    for (seq, rps) in [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]
        .into_iter()
        .enumerate()
    {
        tx.send(one("grpc-dev", seq as u64 + 1, &[("rps", rps)]))
            .await
            .unwrap();
        verdicts.next().await.expect("answer").expect("ok");
    }
    tx.send(one("grpc-dev", 3, &[("rps", 1.0)])).await.unwrap(); // a duplicate
    verdicts.next().await.expect("answer").expect("ok");
    let event = watcher.next().await.expect("event").expect("ok");
    assert_eq!(event.verdict.unwrap().device_id, "grpc-dev");
    client
        .analyze(AnalyzeRequest {
            device_id: "grpc-dev".into(),
        })
        .await
        .expect("analyze");

    // HTTP: the seed check, a per-sample error, a refused body, a 404, probes.
    for rps in [420, 430, 410, 440, 425, 900] {
        let body = format!(r#"{{"timestamp": 1710000000, "device_id": "http-dev", "rps": {rps}}}"#);
        assert_eq!(ingest_json(addr, &body).await.status, 200);
    }
    ingest_json(addr, r#"{"device_id":"http-dev","bad name":1}"#).await;
    ingest_json(addr, r#"{"metrics":{"rps":"NaN"}}"#)
        .await
        .assert_error(400, "invalid_argument");
    http_get(addr, "/analyze?device_id=nobody")
        .await
        .assert_error(404, "not_found");
    http_get(addr, "/analyze?device_id=http-dev").await;
    http_get(addr, "/healthz").await;

    let answer = http_get(addr, "/metrics").await;
    assert_eq!(answer.status, 200);
    let exposition = answer.text();

    let (ok, output) = promtool_check(&exposition);
    assert!(
        ok && output.trim().is_empty(),
        "promtool: {output}\n{exposition}"
    );

    let value = |name: &str, labels: &[(&str, &str)]| {
        metric_value(&exposition, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{exposition}"))
    };
    assert_eq!(
        value("tidewatch_samples_total", &[("transport", "grpc")]),
        6.0
    );
    assert_eq!(
        value("tidewatch_samples_total", &[("transport", "http")]),
        6.0
    );
    assert_eq!(
        value("tidewatch_anomalies_total", &[("transport", "grpc")]),
        1.0
    );
    assert_eq!(
        value("tidewatch_anomalies_total", &[("transport", "http")]),
        1.0
    );
    assert_eq!(
        value(
            "tidewatch_duplicate_samples_total",
            &[("transport", "grpc")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "tidewatch_samples_rejected_total",
            &[("transport", "http"), ("reason", "invalid_metric_name")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "tidewatch_samples_rejected_total",
            &[("transport", "http"), ("reason", "invalid_value")]
        ),
        1.0
    );
    assert_eq!(
        value("tidewatch_load_shed_total", &[("transport", "http")]),
        0.0
    );
    assert_eq!(
        value("tidewatch_load_shed_total", &[("transport", "grpc")]),
        0.0
    );
    assert_eq!(value("tidewatch_ingest_streams_active", &[]), 1.0);
    assert_eq!(value("tidewatch_watchers_active", &[]), 1.0);
    assert_eq!(value("tidewatch_devices", &[]), 2.0);
    assert_eq!(value("tidewatch_watch_events_missed_total", &[]), 0.0);
    assert_eq!(
        value("tidewatch_ingest_message_duration_seconds_count", &[]),
        7.0
    );
    assert_eq!(
        value(
            "rpc_server_call_duration_seconds_count",
            &[
                ("rpc_system", "grpc"),
                ("rpc_service", "tidewatch.v1.TelemetryService"),
                ("rpc_method", "Analyze"),
                ("rpc_grpc_status_code", "0"),
            ]
        ),
        1.0
    );
    // The Ingest stream and the watcher are still open: a stream is one call, timed
    // when it ends.
    assert!(
        !exposition.contains(r#"rpc_method="Ingest""#),
        "{exposition}"
    );
    assert_eq!(
        value(
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "POST"),
                ("http_route", "/ingest"),
                ("http_response_status_code", "200")
            ]
        ),
        7.0
    );
    assert_eq!(
        value(
            "http_server_request_duration_seconds_count",
            &[
                ("http_route", "/ingest"),
                ("http_response_status_code", "400")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "GET"),
                ("http_route", "/analyze"),
                ("http_response_status_code", "404")
            ]
        ),
        1.0
    );
    // The resource, as Prometheus sees it.
    assert_eq!(
        value(
            "target_info",
            &[
                ("service_name", "tidewatch"),
                ("service_version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        1.0
    );
    // Buckets from 50 µs to 10 s.
    assert!(exposition.contains(r#"le="0.00005""#), "{exposition}");
    assert!(exposition.contains(r#"le="10""#), "{exposition}");
    for name in [
        "tidewatch_snapshot_failures_total",
        "tidewatch_snapshot_writes_total",
        "tidewatch_snapshot_restores_total",
        "tidewatch_snapshot_read_failures_total",
        "tidewatch_snapshot_decode_errors_total",
    ] {
        assert_eq!(value(name, &[]), 0.0);
    }
    // Never a device id or a metric name as a label.
    for forbidden in [
        "grpc-dev",
        "http-dev",
        "nobody",
        "device_id=",
        "metric=",
        "\"rps\"",
    ] {
        assert!(
            !exposition.contains(forbidden),
            "{forbidden} appears in\n{exposition}"
        );
    }

    // Both streams, once over, are one call each with their final status.
    drop(tx);
    drop(verdicts);
    drop(watcher);
    for method in ["Ingest", "WatchAnomalies"] {
        crate::common::wait_until(
            &format!("the {method} call's duration"),
            std::time::Duration::from_secs(5),
            || {
                metric_value(
                    &server.state.metrics.render(),
                    "rpc_server_call_duration_seconds_count",
                    &[("rpc_method", method)],
                ) == Some(1.0)
            },
        )
        .await;
    }
    server.stop().await.expect("clean shutdown");
}

#[test]
fn promtool_catches_a_bad_exposition() {
    // The check can fail: a counter without `_total` is a lint problem.
    let (ok, output) =
        promtool_check("# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n");
    assert!(!ok, "{output}");
    assert!(output.contains("_total"), "{output}");
}
