//! `Analyze` and `WatchAnomalies` over the real gRPC server: statistics of a device and
//! `NOT_FOUND`; a watcher sees the anomalies its filters select, and a watcher that
//! never reads neither slows nor stops ingestion and is told how much it missed.

use std::time::Duration;

use crate::common::{TestServer, metric_total, one, run_ingest, small_window_channel, wait_until};
use tidewatch_proto::v1::{
    AnalyzeRequest, IngestRequest, Source, WatchAnomaliesRequest,
    telemetry_service_client::TelemetryServiceClient,
};
use tonic::Code;

/// Ingests `requests` on one stream and returns after every response arrived.
async fn ingest_all(server: &TestServer, requests: Vec<IngestRequest>) -> usize {
    let mut client = server.client().await;
    let (responses, status) = run_ingest(&mut client, requests).await;
    assert!(status.is_none(), "{status:?}");
    responses.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_reports_the_window_and_unknown_devices_are_not_found() {
    let server = TestServer::start().await;
    let mut requests: Vec<_> = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]
        .into_iter()
        .enumerate()
        .map(|(i, v)| one("sensor-1", i as u64 + 1, &[("rps", v), ("cpu", 0.5)]))
        .collect();
    requests.push(one("", 0, &[("rps", 1.0)]));
    ingest_all(&server, requests).await;

    let mut client = server.client().await;
    let stats = client
        .analyze(AnalyzeRequest {
            device_id: "sensor-1".into(),
        })
        .await
        .expect("analyze")
        .into_inner();
    assert_eq!(stats.device_id, "sensor-1");
    assert_eq!(stats.source, Source::Memory as i32);
    assert_eq!(stats.last_seq, 6);
    assert!(stats.updated_at.is_some());
    let names: Vec<&str> = stats.metrics.iter().map(|m| m.metric.as_str()).collect();
    assert_eq!(names, ["cpu", "rps"], "sorted by name");
    let rps = &stats.metrics[1];
    let values = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0];
    let mean = values.iter().sum::<f64>() / 6.0;
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0).sqrt();
    assert_eq!(rps.window_count, 6);
    assert!(
        (rps.rolling_average - mean).abs() < 1e-9,
        "{}",
        rps.rolling_average
    );
    assert!((rps.stddev - sd).abs() < 1e-9, "{}", rps.stddev);
    assert_eq!(rps.last_value, 900.0);
    assert!((rps.last_z_score - 47.5).abs() < 1e-9);
    assert!(rps.last_anomaly);
    assert_eq!(rps.anomalies_total, 1);
    let cpu = &stats.metrics[0];
    assert_eq!(
        (cpu.rolling_average, cpu.stddev, cpu.anomalies_total),
        (0.5, 0.0, 0)
    );

    // The empty id is the "default" device, as in Ingest.
    let default = client
        .analyze(AnalyzeRequest::default())
        .await
        .expect("analyze default")
        .into_inner();
    assert_eq!(default.device_id, "default");

    let missing = client
        .analyze(AnalyzeRequest {
            device_id: "nobody".into(),
        })
        .await
        .expect_err("unknown device");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(
        missing.message().contains("nobody"),
        "{}",
        missing.message()
    );
    server.stop().await.expect("clean shutdown");
}

/// A series whose every value from the sixth on is an anomaly under a tiny
/// `Z_THRESHOLD`: after 0, 1, 0, 1, 0 it climbs, each value above the mean before it.
fn climbing(device: &str, metric: &str, count: usize, first_seq: u64) -> Vec<IngestRequest> {
    (0..count)
        .map(|i| {
            let x = if i < 5 { (i % 2) as f64 } else { i as f64 };
            one(device, first_seq + i as u64, &[(metric, x)])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_the_anomalies_their_filters_select() {
    let server = TestServer::start_with(|c| c.z_threshold = 1e-6).await;
    let mut client = server.client().await;
    let mut all = client
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .expect("watch all")
        .into_inner();
    let mut by_device = client
        .watch_anomalies(WatchAnomaliesRequest {
            device_ids: vec!["a".into()],
            metrics: vec![],
        })
        .await
        .expect("watch a")
        .into_inner();
    let mut by_metric = client
        .watch_anomalies(WatchAnomaliesRequest {
            device_ids: vec![],
            metrics: vec!["rps".into()],
        })
        .await
        .expect("watch rps")
        .into_inner();

    // Five warm-up values each, then: a/cpu anomalies, b/rps anomalies, a calm c, and
    // a final a/rps anomaly that every filter selects (the end marker).
    let mut requests = Vec::new();
    requests.extend(climbing("a", "cpu", 8, 1));
    requests.extend(climbing("b", "rps", 9, 1));
    requests.extend((0..10).map(|_| one("c", 0, &[("rps", 1.0)])));
    for i in 0..6 {
        requests.push(one(
            "a",
            100 + i,
            &[("rps", if i < 5 { 1.0 } else { 50.0 })],
        ));
    }
    ingest_all(&server, requests).await;

    for (stream, want) in [
        (
            &mut all,
            vec![
                ("a", 6),
                ("a", 7),
                ("a", 8),
                ("b", 6),
                ("b", 7),
                ("b", 8),
                ("b", 9),
                ("a", 105),
            ],
        ),
        (
            &mut by_device,
            vec![("a", 6), ("a", 7), ("a", 8), ("a", 105)],
        ),
        (
            &mut by_metric,
            vec![("b", 6), ("b", 7), ("b", 8), ("b", 9), ("a", 105)],
        ),
    ] {
        let mut got = Vec::new();
        while got.last() != Some(&("a".to_string(), 105)) {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("an event within 10 s")
                .expect("event")
                .expect("stream open");
            assert_eq!(event.missed, 0);
            assert!(event.time.is_some());
            let verdict = event.verdict.expect("verdict");
            assert!(verdict.anomaly);
            got.push((verdict.device_id, verdict.seq));
        }
        let want: Vec<(String, u64)> = want.into_iter().map(|(d, s)| (d.to_string(), s)).collect();
        assert_eq!(got, want);
    }
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_does_not_hold_up_ingestion() {
    const WATCH_BUFFER: usize = 16;
    const ANOMALIES: usize = 20_000;
    let server = TestServer::start_with(|c| {
        c.z_threshold = 1e-6;
        c.watch_buffer = WATCH_BUFFER;
    })
    .await;
    // A watcher on a connection with a 16 KiB receive window, so the server feels
    // that it does not read after a hundred or so events.
    let channel = small_window_channel(&server.grpc_url(), 16 * 1024).await;
    let mut slow = TelemetryServiceClient::new(channel)
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let state = server.state.clone();
    wait_until("the watcher to subscribe", Duration::from_secs(10), || {
        metric_total(&state, "tidewatch_watchers_active") >= 1.0
    })
    .await;

    // Far more anomalies than the watcher's buffer and its connection's window hold;
    // ingestion completes while the watcher reads nothing.
    let requests = climbing("w", "x", ANOMALIES + 5, 1);
    let answered = ingest_all(&server, requests).await;
    assert_eq!(answered, ANOMALIES + 5);
    assert_eq!(
        server.state.engine.analyze("w").expect("w").last_seq,
        (ANOMALIES + 5) as u64
    );

    // Now the watcher reads: the events that were in flight arrive in order, then one
    // that says how many were missed, and the sequence numbers account for them.
    let mut previous = 5u64;
    let mut missed_total = 0u64;
    let mut events = 0usize;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), slow.message())
            .await
            .expect("an event within 10 s")
            .expect("event")
            .expect("stream open");
        let seq = event.verdict.expect("verdict").seq;
        assert_eq!(seq, previous + 1 + event.missed, "missed counts the gap");
        missed_total += event.missed;
        previous = seq;
        events += 1;
        if seq == (ANOMALIES + 5) as u64 {
            break;
        }
    }
    assert!(missed_total > 0, "the watcher missed events");
    assert!(events < ANOMALIES, "{events} events delivered");
    assert_eq!(events as u64 + missed_total, ANOMALIES as u64);
    assert_eq!(
        metric_total(&server.state, "tidewatch_watch_events_missed_total") as u64,
        missed_total
    );
    server.stop().await.expect("clean shutdown");
}
