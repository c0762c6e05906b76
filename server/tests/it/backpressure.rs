//! Backpressure on `Ingest`, against the real binary: a client that sends 100,000
//! messages without reading a single verdict stalls on HTTP/2 flow control, and the
//! server's memory stays bounded meanwhile; once the client reads, all 100,000 are
//! answered, in order.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::common::{ServerProcess, drain, one};
use futures::StreamExt as _;
use tidewatch_proto::v1::IngestRequest;

const MESSAGES: usize = 100_000;

/// Messages of the warm-up stream: more than the client gets out before it stalls
/// (≈ 8,600–9,300), so the baseline already includes the allocator's working set for
/// that much traffic and what grows after it is what the stalled stream holds.
const WARM_UP: u64 = 10_000;

/// Growth of the server's resident memory allowed while the client is stalled, over
/// the baseline after the warm-up. Had the server buffered what the client sent, the
/// growth would be the messages themselves: ≈ 24 MiB of requests (≈ 250 bytes each)
/// and ≈ 60 MiB of verdicts (≈ 600 bytes each). What a stalled stream may hold is the
/// HTTP/2 windows and send buffer (1 MiB receive window, 400 KiB send buffer) and
/// tonic's buffers, ≈ 2 MiB; with the system allocator that measured +1.4–1.8 MiB.
/// mimalloc (the binary's allocator since the performance work) grows its heap in
/// 2 MiB steps: with a 2,000-message warm-up a run measured +8,236 KiB on CI and here;
/// with the 10,000-message warm-up, three runs measured +2,092, +4,140 and +6,188 KiB
/// (the RSS at the stall was 42.9–43.0 MiB each time; the baseline varied). The bound
/// leaves room for those steps and stays far below what buffering would cost.
const MAX_GROWTH: u64 = 12 * 1024 * 1024;

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
    let mut client = crate::common::connect(&process.grpc_url()).await;

    // Warm-up: one ordinary stream, so the baseline includes the allocator's and
    // the runtime's working set for a stream of these messages.
    let warm: Vec<_> = (1..=WARM_UP).map(message).collect();
    let mut responses = client
        .ingest(tokio_stream::iter(warm))
        .await
        .expect("warm-up")
        .into_inner();
    let (answered, status) = drain(&mut responses).await;
    assert_eq!(
        (answered.len() as u64, status.map(|s| s.code())),
        (WARM_UP, None)
    );
    let baseline = process.rss_bytes();
    assert!(baseline > 0, "cannot read the server's RSS");

    // The client sends 100,000 messages (seq continues after the warm-up) and reads
    // nothing; the counter says how many messages tonic pulled to send.
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let requests = futures::stream::iter(0..MESSAGES).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        message(WARM_UP + 1 + i as u64)
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
    let mut expected = WARM_UP + 1;
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
    assert_eq!(
        expected - WARM_UP - 1,
        MESSAGES as u64,
        "every message answered"
    );
    assert_eq!(pulled.load(Ordering::Relaxed), MESSAGES);
    let exit = process.terminate();
    assert!(exit.success(), "{exit:?}");
}
