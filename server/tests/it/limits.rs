//! Request limits over the real gRPC server: too many samples in a message, a message
//! over `MAX_MESSAGE_BYTES`, too many open streams, a silent stream and a stream past
//! its lifetime each end with their status and a message naming the setting.

use std::time::Duration;

use crate::common::{TestServer, drain, metric_total, one, run_ingest, sample, wait_until};
use tidewatch_proto::v1::{IngestRequest, IngestResponse};
use tidewatch_server::telemetry::Transport;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

fn batch(device: &str, count: usize) -> IngestRequest {
    IngestRequest {
        samples: (0..count)
            .map(|i| sample(device, 0, &[("v", i as f64)]))
            .collect(),
        ..IngestRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_samples_end_the_stream_with_invalid_argument() {
    // The default limit, 10,000: a full batch is answered (on the blocking pool), one
    // more sample ends the stream, and what came after it is not judged.
    let server = TestServer::start().await;
    let limit = server.state.config.max_samples_per_request;
    assert_eq!(limit, 10_000);
    let mut client = server.client().await;
    let requests = vec![
        batch("full", limit),
        batch("over", limit + 1),
        one("after", 0, &[("v", 1.0)]),
    ];
    let (responses, status) = run_ingest(&mut client, requests).await;
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].verdicts.len(), limit);
    assert!(responses[0].verdicts.iter().all(|v| v.error.is_empty()));
    assert_eq!(
        responses[0].verdicts[limit - 1].metrics[0].value,
        (limit - 1) as f64
    );
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("MAX_SAMPLES_PER_REQUEST") && status.message().contains("10001"),
        "{}",
        status.message()
    );
    assert!(!server.state.engine.contains("over"));
    assert!(!server.state.engine.contains("after"));
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_sample_limit_applies() {
    let server = TestServer::start_with(|c| c.max_samples_per_request = 3).await;
    let mut client = server.client().await;
    let mut stream = client
        .ingest(tokio_stream::iter(vec![batch("a", 3), batch("a", 4)]))
        .await
        .expect("ingest")
        .into_inner();
    let (responses, status) = drain(&mut stream).await;
    assert_eq!(responses.len(), 1);
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("limit is 3 (MAX_SAMPLES_PER_REQUEST)"),
        "{}",
        status.message()
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_the_stream_with_resource_exhausted() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 1024).await;
    let mut client = server.client().await;
    let small = one("a", 0, &[("v", 1.0)]);
    // Forty samples with 40-byte ids: well over 1024 bytes encoded.
    let big = IngestRequest {
        samples: (0..40)
            .map(|i| sample(&format!("{i:040}"), 0, &[("v", 1.0)]))
            .collect(),
        ..IngestRequest::default()
    };
    let mut stream = client
        .ingest(tokio_stream::iter(vec![small.clone(), big, small]))
        .await
        .expect("ingest")
        .into_inner();
    let (responses, status) = drain(&mut stream).await;
    assert_eq!(
        responses.len(),
        1,
        "the message before the big one is answered"
    );
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("MAX_MESSAGE_BYTES") && status.message().contains("1024"),
        "{}",
        status.message()
    );
    assert_eq!(server.state.engine.device_count(), 1);
    server.stop().await.expect("clean shutdown");
}

/// Opens an Ingest stream fed from a channel and waits for the answer to a first
/// message, so the stream is known to be open on the server.
async fn open_stream(
    server: &TestServer,
    device: &str,
) -> (mpsc::Sender<IngestRequest>, Streaming<IngestResponse>) {
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(one(device, 0, &[("v", 1.0)])).await.expect("send");
    let mut stream = client
        .ingest(ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    let first = stream.message().await.expect("first response");
    assert!(first.is_some());
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_ingest_streams_are_refused() {
    let server = TestServer::start_with(|c| c.max_ingest_streams = 2).await;
    let (tx1, mut s1) = open_stream(&server, "a").await;
    let (tx2, _s2) = open_stream(&server, "b").await;

    let mut client = server.client().await;
    let refused = client
        .ingest(tokio_stream::iter(vec![one("c", 0, &[("v", 1.0)])]))
        .await
        .expect_err("a third stream is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("MAX_INGEST_STREAMS"),
        "{}",
        refused.message()
    );
    assert!(!server.state.engine.contains("c"));

    // The open streams still work.
    tx2.send(one("b", 0, &[("v", 2.0)])).await.expect("send");
    // Closing one frees its slot.
    drop(tx1);
    let (rest, status) = drain(&mut s1).await;
    assert!(rest.is_empty() && status.is_none(), "{status:?}");
    let state = server.state.clone();
    wait_until(
        "the closed stream to be released",
        Duration::from_secs(10),
        || metric_total(&state, "tidewatch_ingest_streams_active") < 2.0,
    )
    .await;
    let (_tx3, _s3) = open_stream(&server, "c").await;
    assert!(server.state.engine.contains("c"));
    drop((tx2, _tx3));
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_ends_after_stream_idle_timeout() {
    let server =
        TestServer::start_with(|c| c.stream_idle_timeout = Duration::from_millis(200)).await;
    let (_tx, mut stream) = open_stream(&server, "quiet").await;
    // The client keeps its side open but sends nothing more.
    let (rest, status) = drain(&mut stream).await;
    assert!(rest.is_empty());
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("STREAM_IDLE_TIMEOUT"),
        "{}",
        status.message()
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_talking_outlives_stream_idle_timeout() {
    // The idle timer is re-armed lazily (when it fires, from the last message), not
    // per message: a stream that sends every 100 ms must survive many 250 ms timeouts,
    // and still end once it goes quiet.
    let server =
        TestServer::start_with(|c| c.stream_idle_timeout = Duration::from_millis(250)).await;
    let (tx, mut stream) = open_stream(&server, "chatty").await;
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(one("chatty", 0, &[("v", f64::from(i))]))
            .await
            .expect("the stream is still open");
        let answer = stream.message().await.expect("answered, not timed out");
        assert_eq!(answer.map(|r| r.verdicts.len()), Some(1), "message {i}");
    }
    let quiet = std::time::Instant::now();
    let (rest, status) = drain(&mut stream).await;
    assert!(rest.is_empty());
    assert_eq!(status.map(|s| s.code()), Some(Code::DeadlineExceeded));
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
        "ended {waited:?} after the last message"
    );
    drop(tx);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_stream_max_lifetime_ends_with_unavailable() {
    let server =
        TestServer::start_with(|c| c.stream_max_lifetime = Duration::from_millis(300)).await;
    let (tx, mut stream) = open_stream(&server, "old").await;
    // Keep talking: every message sent is answered until the lifetime ends the stream.
    let sender = tokio::spawn(async move {
        let mut sent = 1u64;
        loop {
            if tx.send(one("old", 0, &[("v", 1.0)])).await.is_err() {
                return sent;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let (rest, status) = drain(&mut stream).await;
    let status = status.expect("an error status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("STREAM_MAX_LIFETIME"),
        "{}",
        status.message()
    );
    // Every message the server applied was answered.
    let answered = 1 + rest.len() as u64;
    assert!(answered > 1, "the stream lived a while");
    assert_eq!(server.state.metrics.samples(Transport::Grpc), answered);
    drop(stream);
    sender.abort();
    server.stop().await.expect("clean shutdown");
}
