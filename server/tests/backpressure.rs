//! Backpressure on `Ingest`, against the real binary: a client that sends 100,000
//! messages without reading a single verdict stalls on HTTP/2 flow control, and the
//! server's memory stays bounded meanwhile; once the client reads, all 100,000 are
//! answered, in order.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{ServerProcess, drain, one};
use futures::StreamExt as _;
use tidewatch_proto::v1::IngestRequest;

const MESSAGES: usize = 100_000;

/// Growth of the server's resident memory allowed while the client is stalled, over
/// the baseline after a warm-up stream. Measured (debug binary, 2-core machine shared
/// with other builds, three runs): baseline 15.1–15.4 MiB; the client stalled after
/// 8,883–9,306 of the 100,000 messages; growth at the stall 1.4–1.8 MiB (the HTTP/2
/// windows and socket buffers of one stream). Had the server buffered what the
/// client sent, the growth would be the messages themselves: ≈ 24 MiB of requests
/// (≈ 250 bytes each) and ≈ 60 MiB of verdicts (≈ 600 bytes each). The bound leaves
/// room for allocator noise and stays far below either.
const MAX_GROWTH: u64 = 8 * 1024 * 1024;

/// A message of about 250 bytes: a 100-byte device id and eight metrics.
fn message(seq: u64) -> IngestRequest {
    let device = format!("backpressure-{}", "x".repeat(87));
    let v = (seq % 97) as f64;
    one(
        &device,
        seq,
        &[
            ("m0", v),
            ("m1", v + 1.0),
            ("m2", v + 2.0),
            ("m3", v + 3.0),
            ("m4", v + 4.0),
            ("m5", v + 5.0),
            ("m6", v + 6.0),
            ("m7", v + 7.0),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_stalls_and_server_memory_stays_bounded() {
    let process = ServerProcess::spawn(&[], &[]);
    let mut client = common::connect(&process.grpc_url()).await;

    // Warm-up: one ordinary stream, so the baseline includes the allocator's and
    // the runtime's working set for a stream of these messages.
    let warm: Vec<_> = (1..=2000).map(message).collect();
    let mut responses = client
        .ingest(tokio_stream::iter(warm))
        .await
        .expect("warm-up")
        .into_inner();
    let (answered, status) = drain(&mut responses).await;
    assert_eq!((answered.len(), status.map(|s| s.code())), (2000, None));
    let baseline = process.rss_bytes();
    assert!(baseline > 0, "cannot read the server's RSS");

    // The client sends 100,000 messages (seq continues after the warm-up) and reads
    // nothing; the counter says how many messages tonic pulled to send.
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let requests = futures::stream::iter(0..MESSAGES).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        message(2001 + i as u64)
    });
    let mut responses = client.ingest(requests).await.expect("ingest").into_inner();

    // Stalled: nothing more pulled for a full second.
    let mut last = 0;
    let mut quiet = 0;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = pulled.load(Ordering::Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
        if quiet >= 10 {
            break;
        }
    }
    assert!(quiet >= 10, "the sender never stalled ({last} pulled)");
    assert!(
        last < MESSAGES,
        "the client sent all {MESSAGES} messages without reading: nothing pushed back"
    );
    let stalled = process.rss_bytes();
    eprintln!(
        "backpressure: stalled after {last} of {MESSAGES} messages; server RSS baseline {} KiB, at the stall {} KiB (+{} KiB)",
        baseline / 1024,
        stalled / 1024,
        stalled.saturating_sub(baseline) / 1024
    );
    assert!(
        stalled.saturating_sub(baseline) < MAX_GROWTH,
        "server RSS grew from {baseline} to {stalled} bytes while the client did not read"
    );

    // Now read: every message is answered, in order, and the sender finishes.
    let mut expected = 2001u64;
    while let Some(response) = responses.message().await.expect("response") {
        assert_eq!(response.verdicts.len(), 1);
        let verdict = &response.verdicts[0];
        assert_eq!(verdict.seq, expected, "in order");
        assert!(
            verdict.error.is_empty() && !verdict.duplicate,
            "{verdict:?}"
        );
        expected += 1;
    }
    assert_eq!(expected - 2001, MESSAGES as u64, "every message answered");
    assert_eq!(pulled.load(Ordering::Relaxed), MESSAGES);
    let exit = process.terminate();
    assert!(exit.success(), "{exit:?}");
}
