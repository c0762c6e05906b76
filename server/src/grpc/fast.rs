//! The `Ingest` fast path: a hand-written replacement for tonic's streaming codec and
//! prost's `IngestRequest`/`IngestResponse` code, for the one method that carries the
//! load. Everything else (`Analyze`, `WatchAnomalies`, health, reflection) is tonic's.
//!
//! # Layout
//! - [`decode`]: an `IngestRequest` read as views into the received bytes
//!   ([`WireRequest`]), with prost's semantics and error texts.
//! - [`canonical`]: the shortcut for samples in the exact shape prost writes them.
//! - [`encode`]: `IngestResponse`s written straight from the engine ([`WireSink`]).
//! - [`compression`]: gzip, deflate and zstd messages, in and out, as tonic's.
//! - [`body`]: the call as an HTTP body of its own: gRPC framing of the requests, one
//!   output chunk of framed responses per batch of received messages, the final
//!   status as trailers.
//! - [`connection`]: accepted TCP connections: `TCP_NODELAY`, flush consolidation
//!   (switched by `FLUSH_CONSOLIDATION`), lingering close.
//!
//! Each has its unit tests in a sibling `tests.rs`. `server/tests/it/conformance.rs` sends
//! one corpus of raw request bodies over HTTP/2 to a plain tonic server of the same
//! proto and to the real server, and compares what comes back.
//!
//! # Contract
//!
//! Checked against tonic 0.14.9 and tonic-prost 0.14.9, prost 0.14.4, h2 0.4.20,
//! hyper 1.12.0, flate2 and zstd (the versions in `Cargo.lock`, one of each, the ones
//! tonic's `gzip`, `deflate` and `zstd` features use). A client cannot tell this path from
//! tonic's generated `TelemetryService` server with prost messages, except for the
//! differences listed below.
//!
//! From tonic (`codec/decode.rs`, `codec/compression.rs`, `server/grpc.rs`, `status.rs`):
//! - Framing: each message has a 5-byte prefix (flag, big-endian `u32` length);
//!   messages may span DATA frames and a frame may hold many. Responses are flag 0,
//!   one per request, in order; `content-type: application/grpc` on the response.
//! - `grpc-encoding`: `gzip`, `deflate` and `zstd` (exactly so spelled) are accepted,
//!   as the generated services accept them (`accept_compressed`); `identity` or none is
//!   no encoding; any other: trailers-only `UNIMPLEMENTED` "Content is compressed with
//!   `X` which isn't supported", with `grpc-accept-encoding:
//!   gzip,deflate,zstd,identity`.
//! - Flag 1 with an encoding: the message is decompressed on its own, with flate2's
//!   `read::GzDecoder` or `read::ZlibDecoder` or zstd's `stream::read::Decoder` copied
//!   into a buffer limited to `MAX_MESSAGE_BYTES`. Past the limit, decompression stops
//!   (a bomb is never expanded further) with `RESOURCE_EXHAUSTED` "Error
//!   decompressing: size limit, of N bytes, exceeded while decompressing message";
//!   bytes that do not decompress: `INTERNAL` "Error decompressing: E, while sending
//!   request" with the crate's error (a zlib stream cut short is not one: it ends
//!   where it ends, and its protobuf is judged). The length in the prefix is held to
//!   `MAX_MESSAGE_BYTES` as received, compressed. Flag 0 with an encoding: as is.
//! - Flag 1 without an encoding: `INTERNAL` "protocol error: received message with
//!   compressed-flag but no grpc-encoding was specified"; any other flag but 0:
//!   `INTERNAL` "protocol error: received message with invalid compression flag: N
//!   (valid flags are 0 and 1), while sending request". The messages before it are
//!   answered.
//! - Responses: compressed when `GRPC_COMPRESSION` holds an encoding the client lists
//!   in `grpc-accept-encoding` (the first it lists, tonic's
//!   `from_accept_encoding_header`): `grpc-encoding` names it in the response headers
//!   and every response is compressed (flag 1, even an empty one), at tonic's levels
//!   (flate2's 6, zstd's default); otherwise flag 0. Trailers-only answers name none.
//! - A body that ends inside a message or its prefix: `INTERNAL` "Unexpected EOF
//!   decoding stream.", after the complete messages are answered. A client reset
//!   ends the stream quietly; request trailers end it with `OK`.
//! - A message that does not decode: `INTERNAL` with prost's `DecodeError` text, as
//!   tonic-prost reports it.
//! - The final status goes out as trailers (`Status::add_header`); errors before the
//!   stream starts as trailers-only responses (`Status::into_http`).
//! - Backpressure: the request body is read only when the answers so far are handed
//!   to HTTP/2 (less than tonic's 32 KiB yield threshold waits), so a client that does
//!   not read its answers stalls on its own flow-control window.
//!
//! From prost (decoding `IngestRequest`, `codec/decode` tests compare with prost on
//! hand-made, generated and mutated input): fields in any order; unknown fields of
//! every wire type skipped, groups included, nested up to prost's recursion limit of
//! 100; the last value wins for scalars and for repeated map keys; a map entry's
//! missing key or value is the default; strings are checked for UTF-8; the error
//! texts, with their `Message.field: ` stacks. On output, proto3 defaults are omitted.
//!
//! Bounds on what is still arriving are not this path's: the gRPC listener's intake
//! layer (`overload::GrpcIntake`, rules in `intake`) wraps the request body of every
//! method, this one included, and ends a stream whose incomplete message goes past
//! `MAX_INCOMPLETE_BYTES` (`RESOURCE_EXHAUSTED`) or arrives slower than
//! `MIN_UPLOAD_RATE` (`DEADLINE_EXCEEDED`); here such a body error ends the stream as
//! any other does, after the answers to the messages before it. A message that spans
//! DATA frames is copied together as its bytes arrive, never reserved at the length
//! its prefix announces, so an incomplete message holds only what was received.
//!
//! Deliberate differences (each one asserted by `server/tests/it/conformance.rs`):
//! - A message over `MAX_MESSAGE_BYTES`: `RESOURCE_EXHAUSTED` (tonic: `OUT_OF_RANGE`)
//!   with tonic's text followed by " (MAX_MESSAGE_BYTES)", decided from its prefix
//!   before its bytes arrive, as tonic does. One that decompresses past it: tonic's
//!   `RESOURCE_EXHAUSTED` and text, followed by the same.
//! - A request whose `content-type` is not `application/grpc` or
//!   `application/grpc+proto` (tonic serves anything as gRPC): HTTP 415 with
//!   `INTERNAL`, as the gRPC HTTP/2 protocol asks and grpc-go answers.
//! - A `Sample.metrics` field with a wire type other than length-delimited: prost
//!   reads the varint that follows as the entry's length; this path refuses it as a
//!   wrong wire type.
//! - Response bytes: verdict fields in another order than prost writes them (valid
//!   protobuf, decoded to the same message), so compressed responses differ in their
//!   bytes too; verdicts are the engine's.
//!
//! A dependency upgrade must re-check: the conformance test (it reads live tonic,
//! so a changed text or code fails it; flate2 and zstd must stay the crates tonic
//! uses, one version each); the codec's differential tests (prost's
//! texts, recursion limit, map and group handling); tonic's default yield threshold
//! ([`YIELD_THRESHOLD`]) and decoder limits; and, for the connection wrapper, h2's
//! write path (`codec/framed_write.rs`: a flush per run of the connection task, in
//! the middle of a run after each DATA frame of 256 bytes or more and when its
//! 16 KiB buffer fills) and hyper's connection task (reads until a read finds
//! nothing, then writes and flushes). Measure with `FLUSH_CONSOLIDATION=false` beside
//! the default: if a new h2 stops flushing per stream, the wrapper may be dead weight.

mod body;
mod canonical;
mod compression;
mod connection;
mod decode;
mod encode;
#[cfg(test)]
mod test_support;

pub(crate) use body::serve;

use std::{
    task::{Context, Poll},
    time::Instant,
};

use tonic::Status;

use crate::error::{ApiError, ErrorKind};
pub use compression::Encoding;
pub(crate) use connection::incoming;
pub use decode::{Samples, WireError, WireMetrics, WireRequest, WireSample};
pub use encode::WireSink;

/// Protobuf wire types.
const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const SGROUP: u64 = 3;
const EGROUP: u64 = 4;
const I32: u64 = 5;

/// The gRPC message prefix: a compression flag and a big-endian `u32` length.
pub const GRPC_HEADER: usize = 5;

/// tonic's default yield threshold: encoded responses are handed to HTTP/2 once this
/// much is ready.
pub(crate) const YIELD_THRESHOLD: usize = 32 * 1024;

/// What the [`serve`]d body needs of the stream it carries: judging one message into
/// the sink, the asynchronous rest of a message, and the stream's end when the client
/// is quiet (idle and lifetime limits, shutdown). The service's `Ingest` stream
/// (`grpc::ingest::StreamCore`) is it; the fast path knows nothing of the service.
pub(crate) trait IngestCore: std::fmt::Debug + Send + Unpin + 'static {
    /// Judges one request into `sink`. `Ok(Some(t))`: answered whole at `t`;
    /// `Ok(None)`: the rest is pending; `Err` ends the stream.
    fn judge(
        &mut self,
        request: &WireRequest,
        received: Instant,
        sink: &mut WireSink,
    ) -> Result<Option<Instant>, Status>;
    /// Whether a message is being judged asynchronously.
    fn has_pending(&self) -> bool;
    /// Drives the pending message; ready once its verdicts are in `sink`.
    fn poll_pending(&mut self, cx: &mut Context<'_>, sink: &mut WireSink) -> Poll<()>;
    /// Ready with the status to end the stream with while the client sends nothing.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<Status>;
    /// The stream ends with `status` (its trailers are about to go out, or the
    /// client left): called once per stream, before the body is dropped.
    fn end(&mut self, status: &Status);
}

/// The status of a message over `MAX_MESSAGE_BYTES`: `RESOURCE_EXHAUSTED` naming the
/// setting, as the issue asks, with tonic's text.
pub(crate) fn too_large(len: usize, limit: usize) -> Status {
    ApiError::new(
        ErrorKind::TooLarge,
        format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {limit} bytes (MAX_MESSAGE_BYTES)"
        ),
    )
    .into()
}

/// The status of a compressed message that decompresses to more than
/// `MAX_MESSAGE_BYTES`: tonic's code and text, naming the setting as [`too_large`] does.
pub(crate) fn too_large_decompressed(limit: usize) -> Status {
    ApiError::new(
        ErrorKind::TooLarge,
        format!(
            "Error decompressing: size limit, of {limit} bytes, exceeded while decompressing message (MAX_MESSAGE_BYTES)"
        ),
    )
    .into()
}
