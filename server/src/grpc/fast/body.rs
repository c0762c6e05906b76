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
//! What it reproduces from tonic, and where it differs on purpose, is the contract
//! in [`super`]. A compressed message is decompressed on its own ([`compression`]);
//! with a response encoding, each response is compressed when it is finished
//! ([`WireSink::finish_message`]). Errors before the stream starts (a `content-type`
//! that is not gRPC, an unknown `grpc-encoding`, `MAX_INGEST_STREAMS` reached) are
//! trailers-only responses; the
//! others end the stream after the answers to every message before the failing one.
//! Backpressure is tonic's: the request body is read only when every received
//! message is answered and less than [`YIELD_THRESHOLD`] of responses waits, and
//! hyper asks for the next chunk only when HTTP/2 flow control let the last one out.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE};
use hyper::body::Frame;
use tonic::{Code, Status, codegen::Body};

use super::{
    GRPC_HEADER, IngestCore, WireRequest, WireSink, YIELD_THRESHOLD,
    compression::{self, Compressor, Decompressor, Encoding},
    too_large,
};

#[cfg(test)]
mod tests;

/// The least a new output chunk reserves.
const MIN_CHUNK: usize = 512;

/// Serves one `Ingest` call: the response, whose body judges the request body's
/// messages as HTTP/2 asks for answers. `max_message` is `MAX_MESSAGE_BYTES`, compressed
/// or not; `send` the encodings responses may use (`GRPC_COMPRESSION`). Errors before
/// the stream starts (a `content-type` that is not gRPC, an unknown `grpc-encoding`,
/// `MAX_INGEST_STREAMS` reached) are trailers-only responses.
pub(crate) fn serve<B, C>(
    request: http::Request<B>,
    max_message: usize,
    send: &[Encoding],
    start: impl FnOnce(&http::Request<B>) -> Result<C, Status>,
) -> http::Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    C: IngestCore,
{
    if let Err(status) = check_content_type(request.headers()) {
        let mut response = status.into_http();
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return response;
    }
    let decoding = match compression::request_encoding(request.headers()) {
        Ok(decoding) => decoding,
        Err(status) => return status.into_http(),
    };
    let encoding = compression::response_encoding(request.headers(), send);
    let core = match start(&request) {
        Ok(core) => core,
        Err(status) => return status.into_http(),
    };
    let mut sink = WireSink::new();
    if let Some(encoding) = encoding {
        sink.compress_with(Compressor::new(encoding));
    }
    let body = IngestBody {
        inbound: Box::pin(request.into_body()),
        core,
        inbox: Inbox::default(),
        decompressor: decoding.map(Decompressor::new),
        sink,
        request: WireRequest::default(),
        max_message,
        chunk_hint: MIN_CHUNK,
        end: None,
        done: false,
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    if let Some(encoding) = encoding {
        let (name, value) = compression::encoding_header(encoding);
        headers.insert(name, value);
    }
    response
}

/// Refuses a request that does not say it carries protobuf gRPC messages: as the
/// gRPC HTTP/2 protocol asks (and grpc-go answers), HTTP 415 (set by the caller)
/// with `INTERNAL`, so
/// that neither a gRPC client nor another HTTP client takes it for a success. tonic
/// serves any `content-type` as gRPC (see the contract in [`super`]).
fn check_content_type(headers: &HeaderMap) -> Result<(), Status> {
    let value = headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    if let Some(value) = value {
        let media = value.split(|&b| b == b';').next().unwrap_or_default();
        let media = media.trim_ascii();
        if media.eq_ignore_ascii_case(b"application/grpc")
            || media.eq_ignore_ascii_case(b"application/grpc+proto")
        {
            return Ok(());
        }
    }
    let shown = value.map_or_else(
        || "none".to_owned(),
        |v| format!("{:?}", String::from_utf8_lossy(v)),
    );
    Err(Status::internal(format!(
        "invalid gRPC request content-type {shown}"
    )))
}

/// The response body of one `Ingest` call; see the module documentation.
pub(crate) struct IngestBody<B, C> {
    /// The request body: length-prefixed `IngestRequest`s.
    inbound: Pin<Box<B>>,
    /// Limits, timers, detector, the asynchronous path.
    core: C,
    /// Received bytes not yet judged.
    inbox: Inbox,
    /// The request's `grpc-encoding`, if not `identity`: what a message with the
    /// compressed flag is decompressed with.
    decompressor: Option<Decompressor>,
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

impl<B, C: std::fmt::Debug> std::fmt::Debug for IngestBody<B, C> {
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

/// The length of the message whose prefix is `header`, or why it is refused;
/// `encoded`: the request named a `grpc-encoding`, so the compressed flag is valid. The
/// limit is on the bytes received here, compressed or not, as tonic's.
fn message_len(header: &[u8], limit: usize, encoded: bool) -> Result<usize, Status> {
    match header[0] {
        0 => {}
        1 if encoded => {}
        1 => {
            // tonic's text: the flag says compressed, the request named no encoding.
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

    /// The next complete message, without its prefix, and whether it is compressed;
    /// `None` when more bytes are needed (the frame is used up then). `encoded`: see
    /// [`message_len`].
    fn next_message(
        &mut self,
        limit: usize,
        encoded: bool,
    ) -> Result<Option<(Bytes, bool)>, Status> {
        if self.partial.is_empty() {
            if self.frame.len() >= GRPC_HEADER {
                let len = message_len(&self.frame[..GRPC_HEADER], limit, encoded)?;
                let end = GRPC_HEADER + len;
                if self.frame.len() >= end {
                    let compressed = self.frame[0] == 1;
                    let message = self.frame.slice(GRPC_HEADER..end);
                    self.frame.advance(end);
                    return Ok(Some((message, compressed)));
                }
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
        let end = GRPC_HEADER + message_len(&self.partial[..GRPC_HEADER], limit, encoded)?;
        // Grows with what arrives, never to the length the prefix announces: an
        // incomplete message holds only the bytes received (bounded in total by
        // `MAX_INCOMPLETE_BYTES`, see `intake`).
        let take = (end - self.partial.len()).min(self.frame.len());
        self.partial.extend_from_slice(&self.frame[..take]);
        self.frame.advance(take);
        if self.partial.len() < end {
            return Ok(None);
        }
        let mut message = self.partial.split().freeze();
        let compressed = message[0] == 1;
        message.advance(GRPC_HEADER);
        Ok(Some((message, compressed)))
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

impl<B, C: IngestCore> IngestBody<B, C> {
    /// Judges the complete messages held, into the sink. `clock` is the last clock
    /// read of this poll (the end of the previous message's latency and the start of
    /// the next one's), `None` when none is fresh.
    fn judge_received(&mut self, clock: &mut Option<Instant>) -> Result<Judged, Status> {
        if self.sink.is_empty() && !self.inbox.is_empty() {
            self.sink.reserve_bytes(self.chunk_hint);
        }
        while self.sink.len() < YIELD_THRESHOLD {
            let encoded = self.decompressor.is_some();
            let Some((mut message, compressed)) =
                self.inbox.next_message(self.max_message, encoded)?
            else {
                return Ok(Judged::All);
            };
            if compressed && let Some(decompressor) = self.decompressor.as_mut() {
                message = decompressor.decompress(&message, self.max_message)?;
            }
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

impl<B, C> Body for IngestBody<B, C>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
    C: IngestCore,
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
                this.core.end(&status);
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
                    // The client reset the stream: nobody is left to tell (the
                    // call itself ends as cancelled).
                    this.end = Some(if status.code() == Code::Cancelled {
                        this.core.end(&status);
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
