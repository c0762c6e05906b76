//! `Ingest` served as an HTTP body of its own, instead of tonic's `Streaming` decoder
//! and `EncodeBody` encoder.
//!
//! tonic handles a streaming call one message at a time: it copies each received DATA
//! frame into its decode buffer, splits each message out of it, moves the decoded
//! request through the response stream, copies each encoded response into its encode
//! buffer, and polls every layer once per message. At a million single-sample messages
//! per second those steps cost about as much as judging the sample. [`IngestBody`]
//! does the same work per received chunk instead: it slices every complete gRPC
//! message out of the DATA frame (copying only a message that spans frames), judges
//! each one straight into one output buffer of framed responses (one response per
//! request, in order, each with its own 5-byte prefix) and hands that buffer to
//! HTTP/2 as one chunk; the final status goes out as trailers, as tonic sends it.
//!
//! What it keeps from tonic, with tonic's codes and texts: a `grpc-encoding` other
//! than `identity` is refused before the stream starts (`UNIMPLEMENTED`, trailers-only,
//! like every error before the stream starts); a compressed message (flag 1) or an
//! unknown flag ends the stream with `INTERNAL`; a message over `MAX_MESSAGE_BYTES`
//! with `RESOURCE_EXHAUSTED` (checked on its prefix, before its bytes are read); a
//! body that ends inside a message with `INTERNAL` "Unexpected EOF decoding stream.";
//! a client reset ends the stream quietly. Backpressure is tonic's too: the request
//! body is read only when every received message is answered and less than
//! [`YIELD_THRESHOLD`] of responses waits, and hyper asks for the next chunk only
//! when HTTP/2 flow control let the last one out.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use hyper::body::Frame;
use tonic::{Code, Status, codegen::Body};

use super::{
    ingest::{StreamCore, too_large},
    wire::{GRPC_HEADER, WireRequest, WireSink, YIELD_THRESHOLD},
};
use crate::service::AppState;

/// The least a new output chunk reserves.
const MIN_CHUNK: usize = 512;

/// The request header that names a message compression.
const ENCODING_HEADER: &str = "grpc-encoding";

/// Serves one `Ingest` call: the response, whose body judges the request body's
/// messages as HTTP/2 asks for answers. Errors before the stream starts (an unknown
/// `grpc-encoding`, `MAX_INGEST_STREAMS` reached) are trailers-only responses.
pub(crate) fn serve<B>(
    state: &Arc<AppState>,
    request: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    if let Err(status) = check_encoding(request.headers()) {
        return status.into_http();
    }
    let core = match StreamCore::start(state) {
        Ok(core) => core,
        Err(status) => return status.into_http(),
    };
    let body = IngestBody {
        inbound: Box::pin(request.into_body()),
        core,
        inbox: Inbox::default(),
        sink: WireSink::new(),
        request: WireRequest::default(),
        max_message: state.config.max_message_bytes,
        chunk_hint: MIN_CHUNK,
        end: None,
        done: false,
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// Refuses a request whose messages are compressed: the server accepts no encoding
/// (tonic's answer for an encoding it has not enabled).
fn check_encoding(headers: &HeaderMap) -> Result<(), Status> {
    let Some(value) = headers.get(ENCODING_HEADER) else {
        return Ok(());
    };
    if value.as_bytes() == b"identity" {
        return Ok(());
    }
    let name = match std::str::from_utf8(value.as_bytes()) {
        Ok(name) => name.to_owned(),
        Err(_) => format!("{:?}", value.as_bytes()),
    };
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{name}` which isn't supported"
    ));
    status
        .metadata_mut()
        .insert("grpc-accept-encoding", "identity".parse().expect("ascii"));
    Err(status)
}

/// The response body of one `Ingest` call; see the module documentation.
pub(crate) struct IngestBody<B> {
    /// The request body: length-prefixed `IngestRequest`s.
    inbound: Pin<Box<B>>,
    /// Limits, timers, detector, the asynchronous path.
    core: StreamCore,
    /// Received bytes not yet judged.
    inbox: Inbox,
    /// Framed responses not yet handed to HTTP/2.
    sink: WireSink,
    /// The request being judged, reused for every message of the stream.
    request: WireRequest,
    /// `MAX_MESSAGE_BYTES`.
    max_message: usize,
    /// The size of the last chunk handed out: what the sink reserves when it starts
    /// the next one, instead of growing by doubling (a copy each time) while
    /// responses are written.
    chunk_hint: usize,
    /// The status the stream ends with, once known: sent as trailers once every
    /// response before it is out.
    end: Option<Status>,
    /// The trailers are out.
    done: bool,
}

impl<B> std::fmt::Debug for IngestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestBody")
            .field("core", &self.core)
            .field("end", &self.end)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// Received request bytes that are not judged yet.
#[derive(Debug, Default)]
struct Inbox {
    /// The rest of the last DATA frame: complete messages are sliced out of it
    /// without copying.
    frame: Bytes,
    /// A message whose bytes span frames, prefix included, copied together.
    partial: BytesMut,
}

/// The length of the message whose prefix is `header`, or why it is refused.
fn message_len(header: &[u8], limit: usize) -> Result<usize, Status> {
    match header[0] {
        0 => {}
        1 => {
            // tonic's text: no encoding is accepted, so no message may be compressed.
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        flag => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1), while sending request"
            )));
        }
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > limit {
        return Err(too_large(len, limit));
    }
    Ok(len)
}

impl Inbox {
    /// Takes the next DATA frame; only called once the last one is used up.
    fn push(&mut self, data: Bytes) {
        debug_assert!(self.frame.is_empty());
        self.frame = data;
    }

    /// Whether no received byte is left (at the body's end: whether it ended
    /// between messages).
    fn is_empty(&self) -> bool {
        self.frame.is_empty() && self.partial.is_empty()
    }

    /// The next complete message, without its prefix; `None` when more bytes are
    /// needed (the frame is used up then).
    fn next_message(&mut self, limit: usize) -> Result<Option<Bytes>, Status> {
        if self.partial.is_empty() {
            if self.frame.len() >= GRPC_HEADER {
                let len = message_len(&self.frame[..GRPC_HEADER], limit)?;
                let end = GRPC_HEADER + len;
                if self.frame.len() >= end {
                    let message = self.frame.slice(GRPC_HEADER..end);
                    self.frame.advance(end);
                    return Ok(Some(message));
                }
                self.partial.reserve(end);
            }
            self.partial.extend_from_slice(&self.frame);
            self.frame.clear();
            return Ok(None);
        }
        if self.partial.len() < GRPC_HEADER {
            let take = (GRPC_HEADER - self.partial.len()).min(self.frame.len());
            self.partial.extend_from_slice(&self.frame[..take]);
            self.frame.advance(take);
            if self.partial.len() < GRPC_HEADER {
                return Ok(None);
            }
        }
        let end = GRPC_HEADER + message_len(&self.partial[..GRPC_HEADER], limit)?;
        let take = (end - self.partial.len()).min(self.frame.len());
        self.partial.reserve(end - self.partial.len());
        self.partial.extend_from_slice(&self.frame[..take]);
        self.frame.advance(take);
        if self.partial.len() < end {
            return Ok(None);
        }
        let mut message = self.partial.split().freeze();
        message.advance(GRPC_HEADER);
        Ok(Some(message))
    }
}

/// What judging the received messages came to.
enum Judged {
    /// Every complete message is answered.
    All,
    /// [`YIELD_THRESHOLD`] of responses wait: hand them out before judging more.
    Full,
    /// A request is being judged asynchronously.
    Pending,
}

impl<B> IngestBody<B> {
    /// Judges the complete messages held, into the sink. `clock` is the last clock
    /// read of this poll (the end of the previous message's latency and the start of
    /// the next one's), `None` when none is fresh.
    fn judge_received(&mut self, clock: &mut Option<Instant>) -> Result<Judged, Status> {
        if self.sink.is_empty() && !self.inbox.is_empty() {
            self.sink.reserve_bytes(self.chunk_hint);
        }
        while self.sink.len() < YIELD_THRESHOLD {
            let Some(message) = self.inbox.next_message(self.max_message)? else {
                return Ok(Judged::All);
            };
            self.request.decode_into(message)?;
            let received = clock.unwrap_or_else(Instant::now);
            self.sink.begin_message();
            let judged = self.core.judge(&self.request, received, &mut self.sink);
            self.request.reset();
            match judged {
                Ok(Some(finished)) => {
                    *clock = Some(finished);
                    self.sink.finish_message()?;
                }
                Ok(None) => return Ok(Judged::Pending),
                Err(status) => {
                    self.sink.abandon_message();
                    return Err(status);
                }
            }
        }
        Ok(Judged::Full)
    }

    /// The responses ready so far as a DATA frame, if there are any.
    fn flush(&mut self) -> Option<Frame<Bytes>> {
        let data = self.sink.take_finished();
        if data.is_empty() {
            return None;
        }
        self.chunk_hint = data.len().clamp(MIN_CHUNK, 2 * YIELD_THRESHOLD);
        Some(Frame::data(data))
    }
}

impl<B> Body for IngestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut clock = None;
        loop {
            if this.end.is_some() {
                if let Some(frame) = this.flush() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                this.done = true;
                let status = this.end.take().unwrap_or_else(|| Status::ok(""));
                let mut trailers = HeaderMap::new();
                return Poll::Ready(Some(
                    status
                        .add_header(&mut trailers)
                        .map(|()| Frame::trailers(trailers)),
                ));
            }
            if this.core.has_pending() {
                if this.core.poll_pending(cx, &mut this.sink).is_pending() {
                    return match this.flush() {
                        Some(frame) => Poll::Ready(Some(Ok(frame))),
                        None => Poll::Pending,
                    };
                }
                clock = None;
                if let Err(status) = this.sink.finish_message() {
                    this.end = Some(status);
                    continue;
                }
            }
            match this.judge_received(&mut clock) {
                Ok(Judged::All) => {}
                Ok(Judged::Pending) => continue,
                Ok(Judged::Full) => {
                    let frame = this.flush().expect("a full sink");
                    return Poll::Ready(Some(Ok(frame)));
                }
                Err(status) => {
                    this.end = Some(status);
                    continue;
                }
            }
            match this.inbound.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers of a request (gRPC clients send none) end it, as in
                    // tonic.
                    match frame.into_data() {
                        Ok(data) => {
                            this.inbox.push(data);
                            clock = None;
                        }
                        Err(frame) if frame.is_trailers() => this.end = Some(Status::ok("")),
                        Err(_) => {}
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let status = Status::from_error(e.into());
                    // The client reset the stream: nobody is left to tell.
                    this.end = Some(if status.code() == Code::Cancelled {
                        Status::ok("")
                    } else {
                        status
                    });
                }
                Poll::Ready(None) => {
                    this.end = Some(if !this.inbox.is_empty() {
                        Status::internal("Unexpected EOF decoding stream.")
                    } else {
                        Status::ok("")
                    });
                }
                Poll::Pending => {
                    if let Some(frame) = this.flush() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    match this.core.poll_quiet(cx) {
                        Poll::Ready(status) => this.end = Some(status),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
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

    use super::*;
    use crate::config::Config;

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
        let collected =
            tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
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
            let got = answer(serve(&state, frames(chunks))).await;
            assert_eq!(got.status.code(), Code::Ok, "{described}: {:?}", got.status);
            assert_eq!(devices(&got.responses), expected, "{described}");
        }
    }

    #[tokio::test]
    async fn a_compressed_message_ends_the_stream_as_tonic_ends_it() {
        let state = state();
        let mut body = framed("first", 1.0);
        body.extend(prefixed(1, &[0x0a, 0x00]));
        body.extend(framed("never", 1.0));
        let got = answer(serve(&state, frames(vec![body]))).await;
        assert_eq!(devices(&got.responses), ["first"]);
        assert_eq!(got.status.code(), Code::Internal);
        assert_eq!(
            got.status.message(),
            "protocol error: received message with compressed-flag but no grpc-encoding was specified"
        );
        assert!(!state.engine.contains("never"));

        let got = answer(serve(&state, frames(vec![prefixed(7, &[])]))).await;
        assert_eq!(got.status.code(), Code::Internal);
        assert!(
            got.status.message().contains("invalid compression flag: 7"),
            "{:?}",
            got.status
        );
    }

    #[tokio::test]
    async fn a_grpc_encoding_is_refused_before_the_stream_starts() {
        let state = state();
        let mut request = frames(vec![framed("x", 1.0)]);
        request
            .headers_mut()
            .insert(ENCODING_HEADER, HeaderValue::from_static("gzip"));
        let response = serve(&state, request);
        let status = Status::from_header_map(response.headers()).expect("trailers-only");
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(
            status.message(),
            "Content is compressed with `gzip` which isn't supported"
        );
        assert_eq!(
            response
                .headers()
                .get("grpc-accept-encoding")
                .map(|v| v.as_bytes()),
            Some(&b"identity"[..])
        );
        assert!(!state.engine.contains("x"));

        let mut request = frames(vec![framed("y", 1.0)]);
        request
            .headers_mut()
            .insert(ENCODING_HEADER, HeaderValue::from_static("identity"));
        let got = answer(serve(&state, request)).await;
        assert_eq!(
            (got.status.code(), devices(&got.responses)),
            (Code::Ok, vec!["y".to_string()])
        );
    }

    #[tokio::test]
    async fn an_oversized_prefix_ends_the_stream_before_its_bytes_arrive() {
        let state = state_with(|c| c.max_message_bytes = 1024);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut first = framed("small", 1.0);
        first.extend_from_slice(&[0, 0, 0, 4, 1]); // 1025 bytes announced
        tx.send(Ok(Frame::data(Bytes::from(first)))).await.unwrap();
        // The sender stays open: the server must not wait for the 1025 bytes.
        let got = answer(serve(&state, request_of(ReceiverStream::new(rx)))).await;
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
    async fn a_body_ending_inside_a_message_is_internal_after_the_complete_ones() {
        let state = state();
        let mut body = framed("whole", 1.0);
        let cut = framed("cut", 1.0);
        body.extend_from_slice(&cut[..cut.len() - 1]);
        let got = answer(serve(&state, frames(vec![body]))).await;
        assert_eq!(devices(&got.responses), ["whole"]);
        assert_eq!(got.status.code(), Code::Internal);
        assert_eq!(got.status.message(), "Unexpected EOF decoding stream.");
        // Three bytes of a prefix are a message begun, too.
        let got = answer(serve(&state, frames(vec![vec![0, 0, 0]]))).await;
        assert_eq!(got.status.code(), Code::Internal);
    }

    #[tokio::test]
    async fn a_malformed_message_is_internal_and_the_next_stream_is_served() {
        let state = state();
        let mut body = framed("good", 1.0);
        body.extend(prefixed(0, &[0x0a, 0x05, 0x01]));
        let got = answer(serve(&state, frames(vec![body]))).await;
        assert_eq!(devices(&got.responses), ["good"]);
        assert_eq!(got.status.code(), Code::Internal);
        assert!(
            got.status
                .message()
                .starts_with("failed to decode Protobuf message")
        );
        let got = answer(serve(&state, frames(vec![framed("again", 1.0)]))).await;
        assert_eq!(
            (got.status.code(), devices(&got.responses)),
            (Code::Ok, vec!["again".to_string()])
        );
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_get_a_trailers_only_answer() {
        let state = state_with(|c| c.max_ingest_streams = 1);
        let (_tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let open = serve(&state, request_of(ReceiverStream::new(rx)));
        assert!(Status::from_header_map(open.headers()).is_none());
        let refused = answer(serve(&state, frames(vec![framed("x", 1.0)]))).await;
        assert_eq!(refused.status.code(), Code::ResourceExhausted);
        assert!(refused.status.message().contains("MAX_INGEST_STREAMS"));
        assert!(!state.engine.contains("x"));
        drop(open);
        let got = answer(serve(&state, frames(vec![framed("x", 1.0)]))).await;
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
        let mut body = serve(&state, request_of(stream)).into_body();
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
        let got = answer(serve(&state, request_of(ReceiverStream::new(rx)))).await;
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
        let got = answer(serve(&state, request_of(ReceiverStream::new(rx)))).await;
        assert_eq!(devices(&got.responses), ["idle"]);
        assert_eq!(got.status.code(), Code::DeadlineExceeded);
        drop(tx);
    }
}
