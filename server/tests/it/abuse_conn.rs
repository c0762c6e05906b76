//! Connection and incomplete-request abuse (issue #19, items 2 and 4), against the
//! real binary on loopback: each test replays one attack and asserts its bound —
//! memory under a stated ceiling that comes back, the attacker's connections and
//! requests closed in time, probes answering within a second, and other clients
//! keeping their service. Counts are sized for a 2-core CI machine.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use prost::Message as _;
use tidewatch_proto::v1::AnalyzeRequest;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tonic::Code;

use crate::common::{ServerProcess, channel_body, connect, one, run_ingest};

/// The gateway address the binary logged.
fn http_addr(server: &ServerProcess) -> SocketAddr {
    server
        .json_log()
        .iter()
        .find(|l| l["message"] == "http listening")
        .and_then(|l| l["http_addr"].as_str()?.parse().ok())
        .expect("http listening line")
}

/// `GET /healthz` on a new connection, within `limit`.
async fn healthz_within(addr: SocketAddr, limit: Duration) -> Result<u16, String> {
    let started = Instant::now();
    let answer = tokio::time::timeout(limit, async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response).into_owned();
        text.split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("no status in {text:?}"))
    })
    .await
    .map_err(|_| format!("no answer within {limit:?}"))??;
    let _ = started;
    Ok(answer)
}

/// An HTTP/2 connection to the gRPC listener.
async fn h2(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<crate::common::ChannelBody> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(64 << 20)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// A gRPC request on `path` whose body the caller feeds.
fn grpc_request(
    addr: SocketAddr,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>,
    http::Request<crate::common::ChannelBody>,
) {
    let (tx, body) = channel_body();
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request");
    (tx, request)
}

/// The `grpc-status` of a response (trailers, or trailers-only headers).
async fn grpc_status(response: http::Response<hyper::body::Incoming>) -> Option<i32> {
    let header = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let collected = response.into_body().collect().await.ok()?;
    collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or(header)
}

/// A gRPC message prefix announcing `len` bytes.
fn prefix(len: u32) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&len.to_be_bytes());
    v
}

const MIB: u64 = 1024 * 1024;

/// 50 Ingest streams each start a 4 MiB message and never finish it (today: 4 MiB
/// reserved per stream at the prefix, held for `STREAM_IDLE_TIMEOUT`). Now only the
/// bytes received are held, at most `MAX_INCOMPLETE_BYTES` (16 MiB here) in total:
/// the streams past it end at once with `RESOURCE_EXHAUSTED`, the others with
/// `DEADLINE_EXCEEDED` once they fall below `MIN_UPLOAD_RATE` (after the grace),
/// RSS stays under the ceiling throughout, and the memory comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_messages_are_bounded_in_bytes_and_time() {
    let server = ServerProcess::spawn(
        &[],
        &[
            ("MAX_INCOMPLETE_BYTES", "16777216"),
            ("MIN_UPLOAD_RATE", "1048576"),
            ("MIN_UPLOAD_RATE_GRACE", "2s"),
        ],
    );
    let grpc = server.grpc_addr;
    let mut client = connect(&server.grpc_url()).await;
    let (answers, status) = run_ingest(&mut client, vec![one("warm", 1, &[("x", 1.0)])]).await;
    assert!(status.is_none() && answers.len() == 1);
    let baseline = server.rss_bytes();

    // 5 connections × 10 streams; each sends the prefix of a 4 MiB message and then
    // 1 MiB of it, and stalls.
    let started = Instant::now();
    let mut calls = Vec::new();
    let mut feeders = Vec::new();
    for _ in 0..5 {
        let mut sender = h2(grpc).await;
        for _ in 0..10 {
            let (tx, request) = grpc_request(grpc, "/tidewatch.v1.TelemetryService/Ingest");
            sender.ready().await.expect("ready");
            let response = sender.send_request(request);
            calls.push(tokio::spawn(async move {
                match response.await {
                    Ok(response) => grpc_status(response).await,
                    Err(_) => None,
                }
            }));
            feeders.push(tokio::spawn(async move {
                let mut first = prefix(4 * MIB as u32);
                first.extend(vec![1u8; 256 * 1024 - 5]);
                if tx.send(Ok(Frame::data(Bytes::from(first)))).await.is_err() {
                    return tx;
                }
                for _ in 0..3 {
                    let chunk = Bytes::from(vec![2u8; 256 * 1024]);
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        break;
                    }
                }
                tx
            }));
        }
    }
    // Peak RSS while the attack runs.
    let mut peak = baseline;
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    for call in calls {
        loop {
            peak = peak.max(server.rss_bytes());
            if call.is_finished() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(call.is_finished(), "every attacking stream ends in time");
        statuses.push(call.await.expect("call"));
    }
    let took = started.elapsed();
    let exhausted = statuses
        .iter()
        .filter(|s| **s == Some(Code::ResourceExhausted as i32))
        .count();
    let slow = statuses
        .iter()
        .filter(|s| **s == Some(Code::DeadlineExceeded as i32))
        .count();
    assert_eq!(
        exhausted + slow,
        50,
        "every stream ends with RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED: {statuses:?}"
    );
    assert!(
        exhausted >= 30,
        "16 MiB hold at most 16 streams' 1 MiB: {statuses:?}"
    );
    assert!(slow >= 1, "the streams within the budget end when too slow");
    assert!(took < Duration::from_secs(10), "ended after {took:?}");
    eprintln!(
        "RSS: baseline {} MiB, peak {} MiB; {exhausted} streams RESOURCE_EXHAUSTED, {slow} DEADLINE_EXCEEDED, all ended after {took:?}",
        baseline / MIB,
        peak / MIB
    );
    // The ceiling: the budget, twice for buffer growth, plus HTTP/2 buffers.
    let ceiling = 64 * MIB;
    assert!(
        peak < baseline + ceiling,
        "RSS peaked at {} MiB over a {} MiB baseline (ceiling +{} MiB)",
        peak / MIB,
        baseline / MIB,
        ceiling / MIB
    );
    // The memory comes back (but for what the allocator keeps cached).
    let settle = Instant::now() + Duration::from_secs(10);
    while server.rss_bytes() > baseline + 24 * MIB && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = server.rss_bytes();
    eprintln!("RSS after the attack: {} MiB", after / MIB);
    assert!(
        after <= baseline + 24 * MIB,
        "RSS {} MiB after the attack, baseline {} MiB",
        after / MIB,
        baseline / MIB
    );
    // Legitimate clients were served all along, and still are.
    let (answers, status) = run_ingest(&mut client, vec![one("after", 1, &[("x", 1.0)])]).await;
    assert!(status.is_none() && answers.len() == 1, "{status:?}");
    drop(feeders);
}

/// One connection opens 1,100 `Analyze` calls and sends no request (today: each
/// holds a `GRPC_CONCURRENCY_LIMIT` slot for `REQUEST_TIMEOUT`, and every other call
/// gets `RESOURCE_EXHAUSTED`). Now a call takes a slot only once its request is in:
/// other clients' calls and new Ingest streams are served meanwhile, and the empty
/// calls end with `DEADLINE_EXCEEDED` after `FIRST_MESSAGE_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_request_do_not_lock_others_out() {
    let server = ServerProcess::spawn(
        &[],
        &[
            ("FIRST_MESSAGE_TIMEOUT", "5s"),
            ("MAX_CONCURRENT_STREAMS", "2000"),
            ("GRPC_CONCURRENCY_LIMIT", "1024"),
        ],
    );
    let grpc = server.grpc_addr;
    let mut sender = h2(grpc).await;
    let mut held = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..1100 {
        let (tx, request) = grpc_request(grpc, "/tidewatch.v1.TelemetryService/Analyze");
        sender.ready().await.expect("ready");
        let response = sender.send_request(request);
        held.push(tx);
        calls.push(tokio::spawn(async move {
            match response.await {
                Ok(response) => grpc_status(response).await,
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Everyone else is served while the 1,100 calls wait.
    let mut client = connect(&server.grpc_url()).await;
    for i in 0..20 {
        let status = client
            .analyze(AnalyzeRequest {
                device_id: format!("nobody-{i}"),
            })
            .await
            .expect_err("an unknown device");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let (answers, status) = run_ingest(&mut client, vec![one("fresh", 1, &[("x", 1.0)])]).await;
    assert!(status.is_none() && answers.len() == 1, "{status:?}");
    assert!(
        opened.elapsed() < Duration::from_secs(5),
        "checked while the calls wait"
    );

    // The empty calls end with DEADLINE_EXCEEDED after FIRST_MESSAGE_TIMEOUT.
    for call in calls {
        let status = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("ends in time")
            .expect("call");
        assert_eq!(status, Some(Code::DeadlineExceeded as i32));
    }
    assert!(opened.elapsed() >= Duration::from_secs(4));
    drop(held);
    // A call whose message does arrive is answered as always.
    let request = AnalyzeRequest {
        device_id: "fresh".into(),
    };
    let found = client.analyze(request.clone()).await.expect("analyze");
    assert_eq!(found.get_ref().device_id, "fresh");
    let _ = request.encode_to_vec();
}

/// Headers trickled one byte at a time (today: never closed): closed after
/// `HEADER_READ_TIMEOUT` on both listeners (HTTP/1: hyper's header timer; HTTP/2: a
/// new connection that has not made its first request in that time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_are_closed() {
    let server = ServerProcess::spawn(&[], &[("HEADER_READ_TIMEOUT", "1s")]);
    let http = http_addr(&server);
    let trickle = |addr: SocketAddr, text: &'static [u8]| async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        for byte in text.iter().cycle() {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf));
            if let Ok(Ok(0) | Err(_)) = read.await {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a trickling connection stays open"
            );
        }
        started.elapsed()
    };
    let (h1, h2) = tokio::join!(
        trickle(
            http,
            b"GET /healthz HTTP/1.1\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        ),
        trickle(
            server.grpc_addr,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        ),
    );
    assert!(
        h1 >= Duration::from_millis(900) && h1 < Duration::from_secs(3),
        "HTTP/1: {h1:?}"
    );
    assert!(
        h2 >= Duration::from_millis(900) && h2 < Duration::from_secs(3),
        "gRPC: {h2:?}"
    );
    assert_eq!(healthz_within(http, Duration::from_secs(1)).await, Ok(200));
}

/// 2,000 idle TCP connections to the gateway with `MAX_CONNECTIONS=1000` (today: all
/// held, never closed; 20,000 run the process out of file descriptors). Now 1,000 are
/// served, the probe headroom takes the newest others in turn, the rest are closed at
/// once; `/healthz` answers within a second all along; and the idle ones are closed
/// after `CONNECTION_IDLE_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed() {
    let server = ServerProcess::spawn(
        &[],
        &[
            ("MAX_CONNECTIONS", "1000"),
            ("CONNECTION_IDLE_TIMEOUT", "4s"),
            ("HEADER_READ_TIMEOUT", "30s"),
        ],
    );
    let http = http_addr(&server);
    let pid = server.child.id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let base_fds = fds();
    let started = Instant::now();
    let mut idle = Vec::new();
    for i in 0..2000 {
        idle.push(TcpStream::connect(http).await.expect("connect"));
        if i % 250 == 249 {
            assert_eq!(
                healthz_within(http, Duration::from_secs(1)).await,
                Ok(200),
                "after {} idle connections",
                i + 1
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = fds() - base_fds;
    assert!(
        open <= 1000 + 32 + 8,
        "{open} connections held with MAX_CONNECTIONS=1000"
    );
    assert_eq!(healthz_within(http, Duration::from_secs(1)).await, Ok(200));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "before the idle timeout"
    );
    // Every idle connection is closed after the idle timeout.
    let deadline = started + Duration::from_secs(12);
    let mut closed = 0;
    for mut stream in idle {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(left, stream.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 2000, "idle connections closed");
    assert!(fds() <= base_fds + 8, "sockets released");
    assert_eq!(healthz_within(http, Duration::from_secs(1)).await, Ok(200));
}

/// The gRPC listener past `MAX_CONNECTIONS`: a new connection still gets gRPC health
/// (within a second), and the API refuses it with `UNAVAILABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_answers_past_the_connection_limit() {
    let server = ServerProcess::spawn(&[], &[("MAX_CONNECTIONS", "50")]);
    let mut idle = Vec::new();
    for _ in 0..150 {
        let mut stream = TcpStream::connect(server.grpc_addr).await.expect("connect");
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        idle.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        health.get_ref().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let refused =
        tidewatch_proto::v1::telemetry_service_client::TelemetryServiceClient::new(channel)
            .analyze(AnalyzeRequest {
                device_id: "x".into(),
            })
            .await
            .expect_err("probe-only connection");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("MAX_CONNECTIONS"), "{refused:?}");
    drop(idle);
}

/// 1,024 HTTP uploads trickle one byte per second (today: they take all 1,024
/// `HTTP_CONCURRENCY_LIMIT` slots and every REST call gets `503`). Now a body is read
/// before its request takes a slot: REST calls are served meanwhile, and the trickles
/// end with `408` once below `MIN_UPLOAD_RATE` after the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_uploads_do_not_shed_rest_calls() {
    let server = ServerProcess::spawn(
        &[],
        &[
            ("MIN_UPLOAD_RATE", "100"),
            ("MIN_UPLOAD_RATE_GRACE", "3s"),
            ("HTTP_CONCURRENCY_LIMIT", "1024"),
        ],
    );
    let http = http_addr(&server);
    let head = b"POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
    let mut uploads = Vec::new();
    for _ in 0..1024 {
        let mut stream = TcpStream::connect(http).await.expect("connect");
        stream.write_all(head).await.expect("head");
        stream.write_all(b"[").await.expect("first byte");
        uploads.push(stream);
    }
    let started = Instant::now();
    // REST calls are served while the 1,024 uploads trickle.
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(2) {
        for stream in &mut uploads {
            let _ = stream.try_write(b" ");
        }
        let answer = crate::common::ingest_json(http, r#"{"device_id":"rest","rps":1}"#).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served >= 5);
    // The trickles end with 408 after the grace.
    let mut timed_out = 0;
    for mut stream in uploads {
        let mut response = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(15).saturating_sub(started.elapsed()),
            stream.read_to_end(&mut response),
        )
        .await;
        if response.starts_with(b"HTTP/1.1 408") {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 1024, "every trickling upload gets 408");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A peer that completes the HTTP/2 preface and then goes silent, answering nothing
/// (a dead peer behind a NAT looks the same): both listeners close it once a
/// keepalive PING goes unanswered for `HTTP2_KEEPALIVE_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_close_dead_peers() {
    let server = ServerProcess::spawn(
        &[],
        &[
            ("HTTP2_KEEPALIVE_INTERVAL", "1s"),
            ("HTTP2_KEEPALIVE_TIMEOUT", "1s"),
        ],
    );
    let silent = |addr: SocketAddr| async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The preface and an empty SETTINGS frame; then nothing, not even ACKs.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .expect("preface");
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    };
    let (grpc, http) = tokio::join!(silent(server.grpc_addr), silent(http_addr(&server)));
    for (name, closed) in [("grpc", grpc), ("http", http)] {
        let closed = closed.unwrap_or_else(|| panic!("{name}: a silent peer stays open"));
        assert!(
            closed < Duration::from_secs(6),
            "{name}: closed after {closed:?}"
        );
    }
}

/// A connection with a quiet stream open is busy, not idle: an Ingest stream and a
/// `WatchAnomalies` stream outlive `CONNECTION_IDLE_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_streams_keep_their_connection() {
    let server = ServerProcess::spawn(&[], &[("CONNECTION_IDLE_TIMEOUT", "1s")]);
    let mut client = connect(&server.grpc_url()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut verdicts = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    let mut watcher = connect(&server.grpc_url()).await;
    let mut events = watcher
        .watch_anomalies(tidewatch_proto::v1::WatchAnomaliesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    tx.send(one("quiet", 1, &[("x", 1.0)])).await.unwrap();
    verdicts.message().await.expect("verdict").expect("open");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tx.send(one("quiet", 2, &[("x", 1.0)])).await.unwrap();
    let later = verdicts.message().await.expect("still open").expect("open");
    assert_eq!(later.verdicts[0].device_id, "quiet");
    let waiting = tokio::time::timeout(Duration::from_millis(200), events.message()).await;
    assert!(
        waiting.is_err(),
        "the watcher is still open, waiting for anomalies"
    );
    drop(tx);
}
