//! Overload protection over real sockets: with a concurrency limit of 1 and a real
//! slow request in flight (one that waits on a stalled Redis), the next request is
//! shed at once — HTTP `503` with `Retry-After`, gRPC `RESOURCE_EXHAUSTED` — and
//! counted; probes and health checks are never shed; long-lived streams and slow
//! uploads do not hold a slot; `REQUEST_TIMEOUT` and `MAX_INGEST_STREAMS` hold.

use std::time::Duration;

use crate::common::{
    TestServer, channel_body, http_get, http_send, ingest_json, metric_value, one,
    redis_server::RedisServer,
};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use prost::Message as _;
use tidewatch_proto::v1::{AnalyzeRequest, IngestRequest};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Code;

/// Load shed counter of `transport`, read from the live `/metrics`.
async fn shed_count(server: &TestServer, transport: &str) -> f64 {
    let exposition = http_get(server.http_addr, "/metrics").await.text();
    metric_value(
        &exposition,
        "tidewatch_load_shed_total",
        &[("transport", transport)],
    )
    .unwrap_or_else(|| panic!("no tidewatch_load_shed_total in {exposition}"))
}

type FrameSender = mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;

/// Starts an upload of `first` to `POST /ingest` (NDJSON) and leaves it open: a slow
/// client holding its request in flight. Returns the sender for the rest and the
/// pending answer.
fn slow_upload(
    server: &TestServer,
    first: &str,
) -> (
    FrameSender,
    tokio::task::JoinHandle<crate::common::HttpAnswer>,
) {
    let (tx, body) = channel_body();
    tx.try_send(Ok(Frame::data(Bytes::from(first.to_string()))))
        .expect("first chunk");
    let request = http::Request::post("/ingest")
        .header("content-type", "application/x-ndjson")
        .body(body)
        .expect("request");
    let addr = server.http_addr;
    (
        tx,
        tokio::spawn(async move { http_send(addr, request).await }),
    )
}

/// A `redis-server` stopped (SIGSTOP) until this is dropped: every Redis command
/// waits for `REDIS_COMMAND_TIMEOUT`, so a request that needs Redis is a real slow
/// request holding its concurrency slot.
struct Stalled(u32);

impl Stalled {
    fn new(redis: &RedisServer) -> Self {
        let pid = redis.pid().expect("redis runs");
        signal(pid, "-STOP");
        Self(pid)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// A test server with `configure`, snapshots on a real Redis, and Redis command and
/// connection timeouts of `stall`: how long a request that needs the stalled Redis
/// holds its slot.
async fn with_redis(
    redis: &RedisServer,
    stall: Duration,
    configure: impl FnOnce(&mut tidewatch_server::config::Config),
) -> TestServer {
    let url = redis.url();
    TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.redis_command_timeout = stall;
        c.redis_connect_timeout = stall;
        configure(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sheds_beyond_the_concurrency_limit() {
    let redis = RedisServer::start();
    let server = with_redis(&redis, Duration::from_secs(4), |c| {
        c.http_concurrency_limit = 1;
    })
    .await;
    let addr = server.http_addr;
    assert_eq!(shed_count(&server, "http").await, 0.0);
    let known = ingest_json(addr, r#"{"device_id":"slow","rps":1}"#).await;
    assert_eq!(known.status, 200, "{}", known.text());

    // A slow upload does not take the slot: its body is read first.
    let (tx, upload) = slow_upload(&server, "{\"device_id\":\"slow\",\"rps\":2}\n");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = http_get(addr, "/analyze?device_id=slow").await;
    assert_eq!(
        answer.status,
        200,
        "served during an upload: {}",
        answer.text()
    );
    drop(tx);
    let uploaded = upload.await.expect("upload");
    assert_eq!(uploaded.status, 200, "{}", uploaded.text());

    // With Redis stalled, reading a device that is not in memory waits: that request
    // takes the only slot; from then on every API request is shed at once (200 =
    // served from memory, 503 = shed).
    let stalled = Stalled::new(&redis);
    let elsewhere = move || tokio::spawn(http_get(addr, "/analyze?device_id=elsewhere"));
    let mut slow = elsewhere();
    let mut shed = 0;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut answer = http_get(addr, "/analyze?device_id=slow").await;
    for _ in 0..1000 {
        if answer.status == 503 {
            break;
        }
        assert_eq!(answer.status, 200, "{}", answer.text());
        if slow.is_finished() {
            // A probe held the slot when the slow request arrived: that one was
            // shed. It counts as shed, and starts again.
            let lost = (&mut slow).await.expect("slow request");
            lost.assert_error(503, "overloaded");
            shed += 1;
            slow = elsewhere();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        answer = http_get(addr, "/analyze?device_id=slow").await;
    }
    let message = answer.assert_error(503, "overloaded");
    shed += 1;
    assert!(message.contains("HTTP_CONCURRENCY_LIMIT"), "{message}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    let refused = ingest_json(addr, r#"{"device_id":"shed","rps":1}"#).await;
    refused.assert_error(503, "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    shed += 1;

    // Probes and scrapes are never shed.
    for path in ["/healthz", "/health", "/readyz", "/metrics"] {
        assert_eq!(http_get(addr, path).await.status, 200, "{path}");
    }
    assert_eq!(shed_count(&server, "http").await, f64::from(shed));
    assert_eq!(shed_count(&server, "grpc").await, 0.0);
    assert!(!slow.is_finished(), "the slow request is still in flight");

    // The slow request ends when Redis does not answer in time; then the slot is
    // free again.
    let answer = slow.await.expect("slow request");
    answer.assert_error(503, "unavailable");
    drop(stalled);
    let answer = http_get(addr, "/analyze?device_id=slow").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["rps_avg"], 1.5);
    // The shed request ingested nothing.
    http_get(addr, "/analyze?device_id=shed")
        .await
        .assert_error(404, "not_found");
    server.stop().await.expect("clean shutdown");
}

/// An Analyze call over raw HTTP/2 whose request message the test sends in two parts:
/// a slow gRPC client. Returns the sender of the rest and the pending answer (HTTP
/// status, body, `grpc-status`).
async fn slow_analyze(
    server: &TestServer,
    device_id: &str,
) -> (
    Vec<u8>,
    FrameSender,
    tokio::task::JoinHandle<(u16, Bytes, Option<String>)>,
) {
    let message = AnalyzeRequest {
        device_id: device_id.into(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let rest = frame.split_off(3);

    let stream = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let (tx, body) = channel_body();
    tx.try_send(Ok(Frame::data(Bytes::from(frame))))
        .expect("first part");
    let request = http::Request::post(format!(
        "http://{}/tidewatch.v1.TelemetryService/Analyze",
        server.grpc_addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(body)
    .expect("request");
    let answer = tokio::spawn(async move {
        let response = sender.send_request(request).await.expect("h2 request");
        let status = response.status().as_u16();
        let header_status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let collected = response.into_body().collect().await.expect("h2 body");
        let trailer_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        (
            status,
            collected.to_bytes(),
            trailer_status.or(header_status),
        )
    });
    (rest, tx, answer)
}

/// An Analyze call over raw HTTP/2 whose request is sent whole at once (see
/// [`slow_analyze`] for the shape of the answer).
async fn slow_analyze_whole(
    server: &TestServer,
    device_id: &str,
) -> tokio::task::JoinHandle<(u16, Bytes, Option<String>)> {
    let (rest, tx, answer) = slow_analyze(server, device_id).await;
    tx.send(Ok(Frame::data(Bytes::from(rest)))).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_sheds_beyond_the_concurrency_limit() {
    let redis = RedisServer::start();
    let server = with_redis(&redis, Duration::from_secs(4), |c| {
        c.grpc_concurrency_limit = 1;
    })
    .await;
    let mut client = server.client().await;

    // A long-lived Ingest stream does not hold the only slot: it stays open all along.
    let (stream_tx, stream_rx) = mpsc::channel::<IngestRequest>(4);
    stream_tx
        .send(one("known", 1, &[("rps", 5.0)]))
        .await
        .unwrap();
    let mut verdicts = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(stream_rx))
        .await
        .expect("ingest")
        .into_inner();
    let first = verdicts.next().await.expect("a response").expect("ok");
    assert_eq!(first.verdicts[0].device_id, "known");
    let found = client
        .analyze(AnalyzeRequest {
            device_id: "known".into(),
        })
        .await
        .expect("analyze is not shed while a stream is open");
    assert_eq!(found.get_ref().metrics[0].window_count, 1);

    // A call whose request arrives slowly does not take the slot: it is read first.
    let (rest, tx, slow_request) = slow_analyze(&server, "known").await;
    client
        .analyze(AnalyzeRequest {
            device_id: "known".into(),
        })
        .await
        .expect("served while a request trickles");
    tx.send(Ok(Frame::data(Bytes::from(rest)))).await.unwrap();
    drop(tx);
    let (http_status, body, grpc_status) = slow_request.await.expect("slow call");
    assert_eq!(http_status, 200);
    assert_eq!(grpc_status.as_deref(), Some("0"));
    assert!(body.len() > 5, "an AnalyzeResponse message");

    // Probe with calls that answer OK: tonic releases their slot before the client
    // sees the end of the answer, so a probe is shed only while the slow call (an
    // Analyze that waits on the stalled Redis) holds the slot. The slow call itself
    // may arrive while a probe holds it and be shed: that is a shed too; start
    // another.
    let stalled = Stalled::new(&redis);
    let mut shed = 0;
    let mut slow = slow_analyze_whole(&server, "elsewhere").await;
    let mut result = client
        .analyze(AnalyzeRequest {
            device_id: "known".into(),
        })
        .await;
    for _ in 0..1000 {
        if slow.is_finished() {
            let (_, _, grpc_status) = slow.await.expect("slow call");
            let exhausted = (Code::ResourceExhausted as i32).to_string();
            assert_eq!(grpc_status.as_deref(), Some(exhausted.as_str()));
            shed += 1;
            slow = slow_analyze_whole(&server, "elsewhere").await;
        }
        match &result {
            Err(status) if status.code() == Code::ResourceExhausted => break,
            Err(status) => panic!("unexpected {status:?}"),
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        result = client
            .analyze(AnalyzeRequest {
                device_id: "known".into(),
            })
            .await;
    }
    let status = result.expect_err("shed");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("GRPC_CONCURRENCY_LIMIT"),
        "{status:?}"
    );
    assert!(!slow.is_finished(), "the slow call holds the slot");
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()),
        Some("1000")
    );
    shed += 1;
    // A new stream cannot open either...
    let (_new_tx, new_rx) = mpsc::channel::<IngestRequest>(1);
    let refused = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(new_rx))
        .await
        .expect_err("stream opening is shed");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    shed += 1;
    // ...but the open one goes on, and health checks are never shed.
    stream_tx
        .send(one("known", 2, &[("rps", 7.0)]))
        .await
        .unwrap();
    let second = verdicts.next().await.expect("a response").expect("ok");
    assert_eq!(second.verdicts[0].metrics[0].window_count, 1);
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tidewatch.v1.TelemetryService".into(),
        })
        .await
        .expect("health is not shed");
    assert_eq!(
        health.get_ref().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(shed_count(&server, "grpc").await, f64::from(shed));
    assert_eq!(shed_count(&server, "http").await, 0.0);

    // The slow call ends when Redis does not answer in time; then the slot is free.
    let (http_status, _, grpc_status) = slow.await.expect("slow call");
    assert_eq!(http_status, 200);
    assert_eq!(
        grpc_status.as_deref(),
        Some((Code::Unavailable as i32).to_string().as_str())
    );
    drop(stalled);
    client
        .analyze(AnalyzeRequest {
            device_id: "known".into(),
        })
        .await
        .expect("the slot is free again");
    drop(stream_tx);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_ends_slow_requests() {
    let redis = RedisServer::start();
    let server = with_redis(&redis, Duration::from_secs(5), |c| {
        c.request_timeout = Duration::from_millis(300);
        c.first_message_timeout = Duration::from_millis(300);
    })
    .await;
    // An upload that never finishes: 408 within REQUEST_TIMEOUT.
    let (_tx, slow) = slow_upload(&server, "{\"device_id\":\"late\",\"rps\":1}\n");
    let answer = slow.await.expect("slow request");
    let message = answer.assert_error(408, "request_timeout");
    assert!(message.contains("REQUEST_TIMEOUT"), "{message}");
    // A gRPC call whose message never completes: FIRST_MESSAGE_TIMEOUT.
    let (_rest, _grpc_tx, slow) = slow_analyze(&server, "late").await;
    let (_, _, grpc_status) = slow.await.expect("slow call");
    assert_eq!(
        grpc_status.as_deref(),
        Some((Code::DeadlineExceeded as i32).to_string().as_str())
    );
    // Requests that are in but take too long (Redis stalled): 504 and
    // DEADLINE_EXCEEDED after REQUEST_TIMEOUT.
    {
        let _stalled = Stalled::new(&redis);
        let started = std::time::Instant::now();
        let message = http_get(server.http_addr, "/analyze?device_id=elsewhere")
            .await
            .assert_error(504, "timeout");
        assert!(message.contains("REQUEST_TIMEOUT"), "{message}");
        let slow = slow_analyze_whole(&server, "elsewhere").await;
        let (_, _, grpc_status) = slow.await.expect("slow call");
        assert_eq!(
            grpc_status.as_deref(),
            Some((Code::DeadlineExceeded as i32).to_string().as_str())
        );
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    // Nothing of the late upload was ingested; streams outlive the timeout.
    http_get(server.http_addr, "/analyze?device_id=late")
        .await
        .assert_error(404, "not_found");
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel::<IngestRequest>(4);
    let mut verdicts = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    tx.send(one("long", 1, &[("rps", 1.0)])).await.unwrap();
    verdicts.next().await.expect("first").expect("ok");
    tokio::time::sleep(Duration::from_millis(600)).await;
    tx.send(one("long", 2, &[("rps", 2.0)])).await.unwrap();
    let later = verdicts.next().await.expect("second").expect("ok");
    assert_eq!(later.verdicts[0].metrics[0].window_count, 1);
    drop(tx);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_streams_are_capped() {
    let server = TestServer::start_with(|c| c.max_ingest_streams = 1).await;
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel::<IngestRequest>(1);
    let mut open = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("first stream")
        .into_inner();
    tx.send(one("s", 1, &[("x", 1.0)])).await.unwrap();
    open.next().await.expect("answer").expect("ok");
    let (_tx2, rx2) = mpsc::channel::<IngestRequest>(1);
    let status = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx2))
        .await
        .expect_err("second stream");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("MAX_INGEST_STREAMS"),
        "{status:?}"
    );
    assert_eq!(shed_count(&server, "grpc").await, 1.0);
    drop(tx);
    server.stop().await.expect("clean shutdown");
}
