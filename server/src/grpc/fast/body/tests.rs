//! Unit tests of the `Ingest` response body, over in-memory request bodies.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures::StreamExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use prost::Message as _;
use tidewatch_proto::v1::{IngestRequest, IngestResponse, Sample};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use std::sync::Arc;

use super::*;
use crate::config::Config;
use crate::service::AppState;

fn state_with(configure: impl FnOnce(&mut Config)) -> Arc<AppState> {
    let mut config = Config::for_tests();
    configure(&mut config);
    Arc::new(AppState::new(config).expect("state"))
}

fn state() -> Arc<AppState> {
    state_with(|_| {})
}

/// One single-sample request, length-prefixed.
fn framed(device: &str, value: f64) -> Vec<u8> {
    let request = IngestRequest {
        samples: vec![Sample {
            device_id: device.into(),
            metrics: BTreeMap::from([("cpu".to_string(), value)]),
            ..Sample::default()
        }],
        ..IngestRequest::default()
    };
    prefixed(0, &request.encode_to_vec())
}

fn prefixed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

fn request_of<S>(stream: S) -> http::Request<StreamBody<S>> {
    http::Request::post(INGEST_PATH_FOR_TESTS)
        .header("content-type", "application/grpc")
        .body(StreamBody::new(stream))
        .expect("request")
}

const INGEST_PATH_FOR_TESTS: &str = "/tidewatch.v1.TelemetryService/Ingest";

/// Request frames, all ready at once.
type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

/// A request body of these DATA frames, then its end.
fn frames(chunks: Vec<Vec<u8>>) -> http::Request<StreamBody<Frames>> {
    let frames: Vec<_> = chunks
        .into_iter()
        .map(|c| Ok(Frame::data(Bytes::from(c))))
        .collect();
    request_of(futures::stream::iter(frames))
}

/// The answer of a whole call: the decoded responses and the trailers' status.
struct Answer {
    responses: Vec<IngestResponse>,
    status: Status,
}

async fn answer(response: http::Response<tonic::body::Body>) -> Answer {
    assert_eq!(
        response.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(&b"application/grpc"[..])
    );
    if let Some(status) = Status::from_header_map(response.headers()) {
        // Trailers-only.
        return Answer {
            responses: Vec::new(),
            status,
        };
    }
    let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends")
        .expect("no body error");
    let trailers = collected.trailers().cloned().expect("trailers");
    let status = Status::from_header_map(&trailers).expect("grpc-status");
    let mut data = collected.to_bytes();
    let mut responses = Vec::new();
    while !data.is_empty() {
        assert_eq!(data[0], 0, "uncompressed");
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        data.advance(GRPC_HEADER);
        responses.push(IngestResponse::decode(data.split_to(len)).expect("a response"));
    }
    Answer { responses, status }
}

fn devices(responses: &[IngestResponse]) -> Vec<String> {
    responses
        .iter()
        .map(|r| {
            assert_eq!(r.verdicts.len(), 1);
            r.verdicts[0].device_id.clone()
        })
        .collect()
}

#[tokio::test]
async fn every_split_of_the_body_gives_the_same_answers() {
    let state = state();
    let body: Vec<u8> = ["a", "bb", "ccc"]
        .iter()
        .enumerate()
        .flat_map(|(i, d)| framed(d, i as f64))
        .collect();
    let expected = vec!["a".to_string(), "bb".into(), "ccc".into()];
    let mut splits: Vec<Vec<Vec<u8>>> = (0..=body.len())
        .map(|i| vec![body[..i].to_vec(), body[i..].to_vec()])
        .collect();
    splits.push(body.iter().map(|&b| vec![b]).collect());
    for chunks in splits {
        let described = format!("{:?}", chunks.iter().map(Vec::len).collect::<Vec<_>>());
        let got = answer(crate::grpc::serve_ingest(&state, &[], frames(chunks))).await;
        assert_eq!(got.status.code(), Code::Ok, "{described}: {:?}", got.status);
        assert_eq!(devices(&got.responses), expected, "{described}");
    }
}

#[tokio::test]
async fn an_oversized_prefix_ends_the_stream_before_its_bytes_arrive() {
    let state = state_with(|c| c.max_message_bytes = 1024);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let mut first = framed("small", 1.0);
    first.extend_from_slice(&[0, 0, 0, 4, 1]); // 1025 bytes announced
    tx.send(Ok(Frame::data(Bytes::from(first)))).await.unwrap();
    // The sender stays open: the server must not wait for the 1025 bytes.
    let got = answer(crate::grpc::serve_ingest(
        &state,
        &[],
        request_of(ReceiverStream::new(rx)),
    ))
    .await;
    assert_eq!(devices(&got.responses), ["small"]);
    assert_eq!(
        got.status.code(),
        Code::ResourceExhausted,
        "{:?}",
        got.status
    );
    assert!(
        got.status
            .message()
            .contains("found 1025 bytes, the limit is: 1024 bytes (MAX_MESSAGE_BYTES)"),
        "{:?}",
        got.status
    );
    drop(tx);
}

#[tokio::test]
async fn streams_beyond_the_limit_get_a_trailers_only_answer() {
    let state = state_with(|c| c.max_ingest_streams = 1);
    let (_tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let open = crate::grpc::serve_ingest(&state, &[], request_of(ReceiverStream::new(rx)));
    assert!(Status::from_header_map(open.headers()).is_none());
    let refused = answer(crate::grpc::serve_ingest(
        &state,
        &[],
        frames(vec![framed("x", 1.0)]),
    ))
    .await;
    assert_eq!(refused.status.code(), Code::ResourceExhausted);
    assert!(refused.status.message().contains("MAX_INGEST_STREAMS"));
    assert!(!state.engine.contains("x"));
    drop(open);
    let got = answer(crate::grpc::serve_ingest(
        &state,
        &[],
        frames(vec![framed("x", 1.0)]),
    ))
    .await;
    assert_eq!(got.status.code(), Code::Ok);
}

#[tokio::test]
async fn one_poll_reads_no_more_than_it_can_answer() {
    // 1,000 frames of 10 messages each, all ready at once: one poll of the
    // response reads a few frames (until YIELD_THRESHOLD of answers wait), not all.
    let state = state();
    let read = Arc::new(AtomicUsize::new(0));
    let chunk: Vec<u8> = (0..10).flat_map(|i| framed("bp", f64::from(i))).collect();
    let counted = Arc::clone(&read);
    let stream = futures::stream::iter(0..1000).map(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
        Ok::<_, Infallible>(Frame::data(Bytes::from(chunk.clone())))
    });
    let mut body = crate::grpc::serve_ingest(&state, &[], request_of(stream)).into_body();
    let frame = body.frame().await.expect("a frame").expect("data");
    let data = frame.into_data().expect("data");
    assert!(data.len() >= YIELD_THRESHOLD, "{}", data.len());
    let frames_read = read.load(Ordering::Relaxed);
    assert!(
        frames_read < 100,
        "read {frames_read} frames for one chunk of answers"
    );
    // Every message of the frames read is answered, in order, by what follows.
    let samples = state.metrics.samples(crate::telemetry::Transport::Grpc);
    assert!(samples <= frames_read as u64 * 10);
}

#[tokio::test]
async fn shutdown_answers_what_was_received_then_ends_with_unavailable() {
    let state = state();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let mut two = framed("s1", 1.0);
    two.extend(framed("s2", 2.0));
    tx.send(Ok(Frame::data(Bytes::from(two)))).await.unwrap();
    state.shutdown.cancel();
    // The client is still connected and quiet.
    let got = answer(crate::grpc::serve_ingest(
        &state,
        &[],
        request_of(ReceiverStream::new(rx)),
    ))
    .await;
    assert_eq!(devices(&got.responses), ["s1", "s2"]);
    assert_eq!(got.status.code(), Code::Unavailable);
    assert!(got.status.message().contains("shutting down"));
    drop(tx);
}

#[tokio::test]
async fn a_quiet_stream_ends_at_the_idle_timeout() {
    let state = state_with(|c| c.stream_idle_timeout = Duration::from_millis(200));
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tx.send(Ok(Frame::data(Bytes::from(framed("idle", 1.0)))))
        .await
        .unwrap();
    let got = answer(crate::grpc::serve_ingest(
        &state,
        &[],
        request_of(ReceiverStream::new(rx)),
    ))
    .await;
    assert_eq!(devices(&got.responses), ["idle"]);
    assert_eq!(got.status.code(), Code::DeadlineExceeded);
    drop(tx);
}

/// A compressed call: each encoding's compressed messages, an uncompressed one among
/// them (flag 0 stays valid with an encoding), answered with compressed responses in
/// the encoding the client accepts, named in `grpc-encoding`.
#[tokio::test]
async fn compressed_messages_in_and_out() {
    let state = state();
    for encoding in [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd] {
        let name = encoding.name();
        let mut compressor = Compressor::new(encoding);
        let mut compressed = |device: &str| {
            let plain = framed(device, 1.0);
            let mut message = BytesMut::from(&plain[GRPC_HEADER..]);
            compressor
                .compress_tail(&mut message, 0)
                .expect("compressed");
            prefixed(1, &message)
        };
        let body = [
            compressed(&format!("{name}-1")),
            framed(&format!("{name}-plain"), 2.0),
            compressed(&format!("{name}-2")),
        ]
        .concat();
        let request = http::Request::post(INGEST_PATH_FOR_TESTS)
            .header("content-type", "application/grpc")
            .header("grpc-encoding", name)
            .header("grpc-accept-encoding", format!("br,{name},identity"))
            .body(StreamBody::new(futures::stream::iter(vec![Ok::<
                _,
                Infallible,
            >(
                Frame::data(Bytes::from(body)),
            )])))
            .expect("request");
        let response = crate::grpc::serve_ingest(&state, &[Encoding::Zstd, encoding], request);
        let named = response
            .headers()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap());
        assert_eq!(named, Some(name));
        let collected = response.into_body().collect().await.expect("no body error");
        let status = Status::from_header_map(collected.trailers().expect("trailers")).unwrap();
        assert_eq!(status.code(), Code::Ok, "{name}: {status:?}");
        let mut data = collected.to_bytes();
        let mut decompressor = Decompressor::new(encoding);
        let mut got = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 1, "{name}: every response is compressed");
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            data.advance(GRPC_HEADER);
            let message = decompressor
                .decompress(&data.split_to(len), 1 << 20)
                .expect("a response");
            let response = IngestResponse::decode(message).expect("a response");
            got.extend(response.verdicts.into_iter().map(|v| v.device_id));
        }
        assert_eq!(
            got,
            [
                format!("{name}-1"),
                format!("{name}-plain"),
                format!("{name}-2")
            ]
        );
    }
}

/// A compressed message that decompresses past `MAX_MESSAGE_BYTES` ends the stream
/// with `RESOURCE_EXHAUSTED` after the answers before it; one with the compressed flag
/// but no `grpc-encoding` is tonic's `INTERNAL`.
#[tokio::test]
async fn a_decompression_bomb_ends_the_stream() {
    let state = state_with(|c| c.max_message_bytes = 1024);
    let mut bomb = BytesMut::from(&vec![0u8; 512 << 10][..]);
    Compressor::new(Encoding::Gzip)
        .compress_tail(&mut bomb, 0)
        .expect("compressed");
    assert!(bomb.len() < 1024, "{} bytes", bomb.len());
    let body = [
        framed("before-bomb", 1.0),
        prefixed(1, &bomb),
        framed("never", 1.0),
    ]
    .concat();
    let request = http::Request::post(INGEST_PATH_FOR_TESTS)
        .header("content-type", "application/grpc")
        .header("grpc-encoding", "gzip")
        .body(StreamBody::new(futures::stream::iter(vec![Ok::<
            _,
            Infallible,
        >(
            Frame::data(Bytes::from(body.clone())),
        )])))
        .expect("request");
    let got = answer(crate::grpc::serve_ingest(&state, &[], request)).await;
    assert_eq!(devices(&got.responses), ["before-bomb"]);
    assert_eq!(
        got.status.code(),
        Code::ResourceExhausted,
        "{:?}",
        got.status
    );
    assert_eq!(
        got.status.message(),
        "Error decompressing: size limit, of 1024 bytes, exceeded while decompressing message (MAX_MESSAGE_BYTES)"
    );
    assert!(!state.engine.contains("never"));
    let got = answer(crate::grpc::serve_ingest(&state, &[], frames(vec![body]))).await;
    assert_eq!(got.status.code(), Code::Internal, "{:?}", got.status);
    assert!(
        got.status
            .message()
            .contains("compressed-flag but no grpc-encoding")
    );
}
