//! Graceful shutdown: open streams get the verdict of every message the server
//! received, in order, and then end with `UNAVAILABLE`; watchers end with
//! `UNAVAILABLE`; the binary exits 0 on SIGTERM within `SHUTDOWN_TIMEOUT`, and its
//! health turns NOT_SERVING while it drains.

use std::time::Duration;

use crate::common::{ServerProcess, TestServer, channel, drain, one, wait_until};
use tidewatch_proto::v1::{IngestRequest, WatchAnomaliesRequest};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVICE: &str = "tidewatch.v1.TelemetryService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_messages_are_answered_before_unavailable() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel::<IngestRequest>(2048);
    let mut responses = client
        .ingest(ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    let mut watcher = client
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // 1,000 messages, none of their verdicts read yet.
    for seq in 1..=1000u64 {
        tx.send(one("inflight", seq, &[("v", 1.0)]))
            .await
            .expect("send");
    }
    let state = server.state.clone();
    wait_until(
        "the server to judge all 1,000",
        Duration::from_secs(20),
        || {
            state
                .engine
                .analyze("inflight")
                .is_some_and(|s| s.last_seq == 1000)
        },
    )
    .await;

    server.begin_shutdown();
    let (answered, status) = drain(&mut responses).await;
    let seqs: Vec<u64> = answered.iter().map(|r| r.verdicts[0].seq).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
    let status = status.expect("a final status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("shutting down"),
        "{}",
        status.message()
    );

    let (events, status) = drain(&mut watcher).await;
    assert!(events.is_empty());
    assert_eq!(status.expect("a final status").code(), Code::Unavailable);
    drop(tx);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_busy_during_shutdown_ends_answered_and_unavailable() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel::<IngestRequest>(16);
    // The client never stops sending; shutdown comes in the middle of its stream.
    let sender = tokio::spawn(async move {
        for seq in 1.. {
            if tx.send(one("busy", seq, &[("v", 1.0)])).await.is_err() {
                break;
            }
        }
    });
    let mut responses = client
        .ingest(ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    let mut seqs = Vec::new();
    while seqs.len() < 500 {
        let response = responses.message().await.expect("response").expect("open");
        seqs.push(response.verdicts[0].seq);
    }
    server.begin_shutdown();
    let (rest, status) = drain(&mut responses).await;
    seqs.extend(rest.iter().map(|r| r.verdicts[0].seq));
    // In order, nothing skipped, and exactly what the server applied was answered.
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let applied = server.state.engine.analyze("busy").expect("busy").last_seq;
    assert_eq!(
        applied,
        seqs.len() as u64,
        "every applied message was answered"
    );
    let status = status.expect("a final status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    server.stop().await.expect("clean shutdown");
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_reports_not_serving_and_exits_zero() {
    let mut process = ServerProcess::spawn(&[], &[("SHUTDOWN_TIMEOUT", "10s")]);
    let url = process.grpc_url();
    let mut client = crate::common::connect(&url).await;
    let (tx, rx) = mpsc::channel::<IngestRequest>(16);
    let mut responses = client
        .ingest(ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    for seq in 1..=10u64 {
        tx.send(one("term", seq, &[("v", 1.0)]))
            .await
            .expect("send");
        let response = responses.message().await.expect("response").expect("open");
        assert_eq!(response.verdicts[0].seq, seq);
    }
    let mut health = HealthClient::new(channel(&url).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = watch.next().await.expect("status").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    process.sigterm();
    let draining = watch.next().await.expect("status change").expect("ok");
    assert_eq!(draining.status, ServingStatus::NotServing as i32);
    drop(watch);
    let (rest, status) = drain(&mut responses).await;
    assert!(rest.is_empty());
    assert_eq!(status.expect("final status").code(), Code::Unavailable);
    drop(tx);

    let exit = tokio::task::block_in_place(|| process.wait_exit(Duration::from_secs(10)))
        .expect("exits within SHUTDOWN_TIMEOUT");
    assert!(exit.success(), "{exit:?}");
    let log = process.json_log();
    let messages: Vec<&str> = log.iter().filter_map(|v| v["message"].as_str()).collect();
    assert!(
        messages.contains(&"received SIGTERM, shutting down"),
        "{messages:?}"
    );
    assert!(messages.contains(&"shutdown complete"), "{messages:?}");
    assert!(
        !messages.iter().any(|m| m.starts_with("shutdown timed out")),
        "the drain finished on its own: {messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_leaves_cannot_hold_the_exit_past_shutdown_timeout() {
    let mut process = ServerProcess::spawn(&[], &[("SHUTDOWN_TIMEOUT", "1s")]);
    let url = process.grpc_url();
    // A health watch never ends on its own: it keeps its connection in the drain.
    let mut health = HealthClient::new(channel(&url).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    assert!(watch.next().await.is_some());
    process.sigterm();
    let exit = tokio::task::block_in_place(|| process.wait_exit(Duration::from_secs(10)))
        .expect("exits once SHUTDOWN_TIMEOUT is spent");
    assert!(exit.success(), "{exit:?}");
    let log = process.json_log();
    assert!(
        log.iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutdown timed out"))),
        "{log:?}"
    );
    drop(watch);
}
