//! A broken Ingest stream mid-session: the session reconnects with backoff, re-sends
//! every unanswered sample, and finishes with exactly one verdict per sample, while no
//! sample is counted twice in the server's window.
//!
//! Three ways to break it, each real:
//! - the `tidewatch` binary is killed (SIGKILL) and restarted on the same port; without
//!   Redis the new process has no memory, so nothing is a duplicate and its window
//!   holds exactly the samples it answered;
//! - the connection is reset (a proxy drops it) while the server lives on and had
//!   applied samples whose verdicts were lost; re-sent, they come back `duplicate`;
//! - a graceful shutdown (`UNAVAILABLE` after answering what was received), then a new
//!   server on the same port; the two windows together hold every sample once.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Proxy, ServerProcess, TestServer, server_binary};
use tidewatch_client::{
    Answered, Backoff, Client, IngestSession, SampleExt, SessionConfig, sample,
};

/// Reconnect fast: the tests wait for it.
fn session_config() -> SessionConfig {
    SessionConfig {
        max_batch: 100,
        linger: Duration::from_millis(1),
        max_in_flight: 2_000,
        output_buffer: 64,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(500),
            multiplier: 2.0,
            max_attempts: Some(100),
        },
        ..SessionConfig::default()
    }
}

/// Feeds `n` samples of one device (metric `v` = the sample's index) with explicit,
/// consecutive seqs 1..=n, so the tests know which sample is which.
fn feed(session: &IngestSession, n: u64) -> tokio::task::JoinHandle<()> {
    let sender = session.sender().expect("sender");
    tokio::spawn(async move {
        for i in 1..=n {
            sender
                .send(sample("d").metric("v", i as f64).with_seq(i))
                .await
                .expect("send");
        }
    })
}

/// Checks one answer per seq 1..=n and returns them by seq.
fn one_each(answers: Vec<Answered>, n: u64) -> BTreeMap<u64, Answered> {
    let mut by_seq = BTreeMap::new();
    for a in answers {
        assert!(a.verdict.error.is_empty(), "error: {}", a.verdict.error);
        assert_eq!(a.verdict.seq, a.sample.seq);
        let seq = a.verdict.seq;
        assert!(by_seq.insert(seq, a).is_none(), "seq {seq} answered twice");
    }
    assert_eq!(by_seq.len() as u64, n);
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    by_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_on_the_same_port() {
    const N: u64 = 20_000;
    let binary = server_binary();
    // The largest window (MAX_WINDOW_SIZE): far larger than N.
    let envs = [("WINDOW_SIZE", "65535")];
    let mut server = ServerProcess::spawn(&binary, "127.0.0.1:0", &envs);
    let addr = server.grpc_addr;
    let client = Client::connect(server.url()).await.expect("connect");
    let mut session = client.ingest_with(session_config());
    let feeder = feed(&session, N);
    session.close_input();

    let mut answers = Vec::new();
    let mut restarted = None;
    while let Some(answered) = session.next().await {
        answers.push(answered.expect("answer"));
        if answers.len() == 5_000 {
            server.kill9();
            // Same port: the session's channel reconnects to the address it knows.
            restarted = Some(ServerProcess::spawn(&binary, &addr.to_string(), &envs));
        }
    }
    feeder.await.expect("feeder");
    let restarted = restarted.expect("the server was restarted mid-session");
    assert_eq!(restarted.grpc_addr, addr);

    let by_seq = one_each(answers, N);
    // Without Redis the new process remembers nothing: no answer is a duplicate.
    assert!(by_seq.values().all(|a| !a.verdict.duplicate));
    // The window is far larger than N, so a verdict's window_count is the number of
    // samples the answering server had applied before it. The old server answered
    // seqs 1..r with counts 0..r-1; the new one answered r..=N with counts from 0.
    let counts: Vec<u32> = by_seq
        .values()
        .map(|a| a.verdict.metrics[0].window_count)
        .collect();
    let r = counts
        .iter()
        .enumerate()
        .position(|(i, &c)| c as usize != i)
        .expect("some samples were answered by the restarted server");
    assert!(
        r >= 5_000,
        "the first 5,000 answers came from the first server"
    );
    for (i, &c) in counts.iter().enumerate().skip(r) {
        assert_eq!(
            c as usize,
            i - r,
            "seq {} applied once, in order, after the restart",
            i + 1
        );
    }
    let stats = client.analyze("d").await.expect("analyze after restart");
    assert_eq!(
        u64::from(stats.metrics[0].window_count),
        N - r as u64,
        "no sample counted twice"
    );
    assert_eq!(stats.last_seq, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_resends_and_the_server_marks_duplicates() {
    const N: u64 = 10_000;
    let server =
        TestServer::start_with(|c| c.window_size = tidewatch_server::engine::MAX_WINDOW_SIZE).await;
    let proxy = Proxy::start(server.grpc_addr).await;
    let direct = Client::connect(server.url()).await.expect("connect direct");
    let client = Client::connect(proxy.url())
        .await
        .expect("connect via proxy");
    let mut session = client.ingest_with(SessionConfig {
        max_in_flight: 5_000,
        // Room for every answer, so the session never waits on this test's reading.
        output_buffer: 10_000,
        ..session_config()
    });
    let sender = session.sender().expect("sender");
    session.close_input();
    // Feeds the seqs of each range it is given, in order.
    let (ranges, mut todo) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let feeder = tokio::spawn(async move {
        while let Some((from, to)) = todo.recv().await {
            for i in from..=to {
                sender
                    .send(sample("d").metric("v", i as f64).with_seq(i))
                    .await
                    .expect("send");
            }
        }
    });
    let mut answers = Vec::new();

    // 1..=3000 answered normally.
    ranges.send((1, 3_000)).expect("feed");
    while answers.len() < 3_000 {
        answers.push(session.next().await.expect("an answer").expect("ok"));
    }
    // Nothing is in flight now. Hold responses back, send 3001..=5000, and wait until
    // the server has applied them all: their verdicts sit in the proxy.
    proxy.hold_responses();
    ranges.send((3_001, 5_000)).expect("feed");
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let applied = direct.analyze("d").await.expect("analyze").metrics[0].window_count;
        if applied == 5_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the server applied {applied} samples, not 5000, with responses held back"
        );
        tokio::task::yield_now().await;
    }
    // Reset the connection: those verdicts are lost; the session re-sends 3001..=5000.
    proxy.cut_connections();
    ranges.send((5_001, N)).expect("feed");
    drop(ranges);
    while let Some(answered) = session.next().await {
        answers.push(answered.expect("answer"));
    }
    feeder.await.expect("feeder");
    assert!(session.reconnects() >= 1, "the session reconnected");
    assert!(session.resent() >= 2_000, "unanswered samples were re-sent");

    let by_seq = one_each(answers, N);
    for (seq, a) in &by_seq {
        let had_it = (3_001..=5_000).contains(seq);
        assert_eq!(
            a.verdict.duplicate, had_it,
            "seq {seq}: duplicate exactly when the server had it"
        );
        if had_it {
            assert!(a.attempts >= 2, "seq {seq} was re-sent");
        }
    }
    let stats = direct.analyze("d").await.expect("analyze");
    assert_eq!(
        u64::from(stats.metrics[0].window_count),
        N,
        "every sample applied exactly once"
    );
    assert_eq!(stats.last_seq, N);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_then_a_new_server_on_the_same_port() {
    const N: u64 = 10_000;
    let first =
        TestServer::start_with(|c| c.window_size = tidewatch_server::engine::MAX_WINDOW_SIZE).await;
    let addr = first.grpc_addr;
    let first_state = first.state.clone();
    let client = Client::connect(first.url()).await.expect("connect");
    let mut session = client.ingest_with(session_config());
    let feeder = feed(&session, N);
    session.close_input();

    let mut first = Some(first);
    let mut second = None;
    let mut answers = Vec::new();
    while let Some(answered) = session.next().await {
        answers.push(answered.expect("answer"));
        if answers.len() == 3_000
            && let Some(server) = first.take()
        {
            server.stop().await;
            second = Some(
                TestServer::start_with(|c| {
                    c.grpc_addr = addr;
                    c.window_size = tidewatch_server::engine::MAX_WINDOW_SIZE;
                })
                .await,
            );
        }
    }
    feeder.await.expect("feeder");
    let second = second.expect("second server");
    let by_seq = one_each(answers, N);
    // A graceful drain answers everything received, so nothing re-sent was applied
    // before and nothing is a duplicate; each server's window holds its own share.
    assert!(by_seq.values().all(|a| !a.verdict.duplicate));
    let old = first_state
        .engine
        .analyze("d")
        .expect("first server's window");
    let new = second
        .state
        .engine
        .analyze("d")
        .expect("second server's window");
    assert_eq!(
        u64::from(old.metrics[0].window_count + new.metrics[0].window_count),
        N,
        "every sample in exactly one window"
    );
    assert_eq!(new.last_seq, N);
    second.stop().await;
}
