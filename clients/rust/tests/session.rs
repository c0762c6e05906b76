//! The SDK against the real server in-process: one verdict per sample over 100,000
//! samples, `seq` assignment across sessions, a non-retryable error ending the session,
//! `analyze`, `watch_anomalies` and `delete_device`.

mod common;

use std::{collections::HashMap, time::Duration};

use common::TestServer;
use futures::StreamExt;
use tidewatch_client::{Client, Error, SampleExt, SessionConfig, sample};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_samples_get_exactly_one_verdict_each() {
    const SAMPLES: u64 = 100_000;
    const DEVICES: u64 = 100;
    let server = TestServer::start_with(|_| {}).await;
    let client = Client::connect(server.url()).await.expect("connect");
    let mut session = client.ingest_with(SessionConfig {
        max_batch: 500,
        linger: Duration::from_millis(2),
        ..SessionConfig::default()
    });
    let sender = session.sender().expect("sender");
    session.close_input();
    let feeder = tokio::spawn(async move {
        for i in 0..SAMPLES {
            let device = format!("dev-{}", i % DEVICES);
            let value = 100.0 + (i % 7) as f64;
            sender
                .send(sample(device).metric("cpu", value))
                .await
                .expect("send");
        }
    });

    let mut seen: HashMap<(String, u64), u32> = HashMap::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut answers = 0u64;
    while let Some(answered) = session.next().await {
        let answered = answered.expect("answer");
        let v = &answered.verdict;
        assert_eq!(v.device_id, answered.sample.device_id);
        assert_eq!(v.seq, answered.sample.seq);
        assert!(v.seq > 0, "the session assigns a seq");
        assert!(v.error.is_empty(), "error: {}", v.error);
        assert!(!v.duplicate);
        assert_eq!(v.metrics.len(), 1);
        assert_eq!(v.metrics[0].value, answered.sample.metrics["cpu"]);
        // Per device, answers come in the order the samples were sent.
        let last = last_seq.entry(v.device_id.clone()).or_default();
        assert!(v.seq > *last, "seq {} after {}", v.seq, last);
        *last = v.seq;
        *seen.entry((v.device_id.clone(), v.seq)).or_default() += 1;
        answers += 1;
    }
    feeder.await.expect("feeder");
    assert_eq!(answers, SAMPLES);
    assert_eq!(
        seen.len() as u64,
        SAMPLES,
        "one verdict per distinct sample"
    );
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(session.reconnects(), 0);

    // The server applied each sample once: every device's last seq is the last sent.
    for d in 0..DEVICES {
        let device = format!("dev-{d}");
        let stats = client.analyze(&device).await.expect("analyze");
        assert_eq!(stats.last_seq, last_seq[&device]);
        assert_eq!(stats.metrics[0].window_count, 50);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_and_watch_anomalies_see_the_seed_check() {
    let server = TestServer::start_with(|_| {}).await;
    let client = Client::connect(server.url()).await.expect("connect");

    match client.analyze("sensor-1").await {
        Err(Error::NotFound { device_id }) => assert_eq!(device_id, "sensor-1"),
        other => panic!("expected NotFound, got {other:?}"),
    }

    let mut anomalies = client
        .watch_anomalies(&["sensor-1"], &["rps"])
        .await
        .expect("watch");
    let mut session = client.ingest();
    for rps in [420.0, 430.0, 410.0, 440.0, 425.0, 900.0] {
        session
            .send(sample("sensor-1").metric("rps", rps))
            .await
            .expect("send");
        // Another device's anomaly must not reach this filtered watcher.
        session
            .send(sample("other").metric("rps", if rps > 500.0 { 1e6 } else { 1.0 }))
            .await
            .expect("send");
    }
    session.close_input();
    let mut verdicts = Vec::new();
    while let Some(answered) = session.next().await {
        verdicts.push(answered.expect("answer").verdict);
    }
    assert_eq!(verdicts.len(), 12);
    let last = &verdicts[10];
    assert!(last.anomaly);
    assert!((last.metrics[0].z_score - 47.5).abs() < 1e-9);

    let event = tokio::time::timeout(Duration::from_secs(10), anomalies.next())
        .await
        .expect("an anomaly event")
        .expect("stream open")
        .expect("event");
    let verdict = event.verdict.expect("verdict");
    assert_eq!(verdict.device_id, "sensor-1");
    assert_eq!(verdict.seq, last.seq);
    assert_eq!(event.missed, 0);

    let stats = client.analyze("sensor-1").await.expect("analyze");
    assert_eq!(stats.device_id, "sensor-1");
    let rps = &stats.metrics[0];
    assert_eq!((rps.metric.as_str(), rps.window_count), ("rps", 6));
    assert_eq!(rps.last_value, 900.0);
    assert!(rps.last_anomaly);
    assert_eq!(rps.anomalies_total, 1);
    assert!((rps.rolling_average - (425.0 * 5.0 + 900.0) / 6.0).abs() < 1e-9);
    assert_eq!(stats.last_seq, last.seq);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_is_not_taken_for_a_duplicate() {
    let server = TestServer::start_with(|_| {}).await;
    let client = Client::connect(server.url()).await.expect("connect");
    let mut all = Vec::new();
    for _ in 0..2 {
        let mut session = client.ingest();
        for v in 0..10 {
            session
                .send(sample("d").metric("x", f64::from(v)))
                .await
                .expect("send");
        }
        session.close_input();
        while let Some(answered) = session.next().await {
            all.push(answered.expect("answer").verdict);
        }
    }
    assert_eq!(all.len(), 20);
    assert!(all.iter().all(|v| !v.duplicate), "{all:?}");
    assert!(all.windows(2).all(|w| w[1].seq > w[0].seq));
    let stats = client.analyze("d").await.expect("analyze");
    assert_eq!(stats.metrics[0].window_count, 20);

    // An explicit seq the server has seen is answered as a duplicate.
    let mut session = client.ingest();
    let old = all[3].seq;
    session
        .send(sample("d").metric("x", 1.0).with_seq(old))
        .await
        .expect("send");
    session.close_input();
    let answered = session.next().await.expect("an answer").expect("ok");
    assert!(answered.verdict.duplicate);
    assert_eq!(answered.verdict.seq, old);
    assert_eq!(
        client.analyze("d").await.expect("analyze").metrics[0].window_count,
        20
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_sample_limit_ends_the_session_with_its_status() {
    let server = TestServer::start_with(|c| c.max_samples_per_request = 10).await;
    let client = Client::connect(server.url()).await.expect("connect");
    let mut session = client.ingest_with(SessionConfig {
        max_batch: 20,
        linger: Duration::from_secs(60),
        ..SessionConfig::default()
    });
    for v in 0..20 {
        session
            .send(sample("d").metric("x", f64::from(v)))
            .await
            .expect("send");
    }
    let error = session
        .next()
        .await
        .expect("an item")
        .expect_err("the session fails");
    match &error {
        Error::SessionFailed { unanswered, source } => {
            assert_eq!(*unanswered, 20);
            assert_eq!(source.code(), Some(Code::InvalidArgument));
            assert!(!source.is_retryable());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(session.next().await.is_none());
    assert!(matches!(
        session.send(sample("d").metric("x", 1.0)).await,
        Err(Error::Closed)
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_typed_connect_error() {
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    match Client::connect(format!("http://127.0.0.1:{port}")).await {
        Err(e @ Error::Connect { .. }) => assert!(e.is_retryable()),
        other => panic!("expected Connect error, got {other:?}"),
    }
    assert!(matches!(
        Client::connect("not a url").await,
        Err(Error::InvalidEndpoint { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_device_forgets_a_device() {
    let server = TestServer::start_with(|_| {}).await;
    let client = Client::connect(server.url()).await.expect("connect");
    let mut session = client.ingest();
    for rps in [1.0, 2.0, 3.0] {
        session
            .send(sample("to-delete").metric("rps", rps))
            .await
            .expect("send");
    }
    session.close_input();
    while let Some(answered) = session.next().await {
        answered.expect("answer");
    }
    let deleted = client.delete_device("to-delete").await.expect("delete");
    assert_eq!(
        (deleted.device_id.as_str(), deleted.deleted),
        ("to-delete", true)
    );
    assert!(matches!(
        client.analyze("to-delete").await,
        Err(Error::NotFound { .. })
    ));
    let again = client.delete_device("to-delete").await.expect("delete");
    assert!(!again.deleted);
    server.stop().await;
}
