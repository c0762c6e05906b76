//! gRPC message compression on the fast path, as tonic's `codec/compression.rs` does it
//! with its `gzip`, `deflate` and `zstd` features: the same crates (flate2's
//! `read::GzDecoder`/`ZlibDecoder`, zstd's `stream::read::Decoder`), the same levels
//! (flate2 6, zstd's default), the same limit on what a message decompresses to, and the
//! same statuses and texts, so that compressed calls behave as on the generated services
//! (the contract in [`super`]). An uncompressed message never comes here.

use std::io::{self, Read as _};

use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use tonic::Status;

use super::too_large_decompressed;

#[cfg(test)]
mod tests;

/// The request header that names a message compression.
pub(super) const ENCODING_HEADER: &str = "grpc-encoding";

/// The request header that lists the compressions a client can read.
const ACCEPT_ENCODING_HEADER: &str = "grpc-accept-encoding";

/// What the server accepts, in tonic's `grpc-accept-encoding` form (its encodings in the
/// order they were enabled, then `identity`).
pub(super) const ACCEPTED: &str = "gzip,deflate,zstd,identity";

/// tonic's decoder buffer size (`BufferSettings::buffer_size`, 8 KiB): the step its
/// decompression buffer grows by.
const GROWTH: usize = 8 * 1024;

/// The most a stream's decompression buffer keeps between messages: a stream that
/// once received a large message does not hold its size for its whole life.
const KEEP: usize = 64 * 1024;

/// A gRPC message compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `gzip`.
    Gzip,
    /// `deflate` (zlib-wrapped).
    Deflate,
    /// `zstd`.
    Zstd,
}

impl Encoding {
    /// Its name in `grpc-encoding` and `grpc-accept-encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Zstd => "zstd",
        }
    }

    fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"gzip" => Some(Self::Gzip),
            b"deflate" => Some(Self::Deflate),
            b"zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// The encoding of the request's messages (`grpc-encoding`): `None` for none or
/// `identity`; another name than the three is tonic's trailers-only `UNIMPLEMENTED`
/// with the accepted list in `grpc-accept-encoding`.
pub(super) fn request_encoding(headers: &HeaderMap) -> Result<Option<Encoding>, Status> {
    let Some(value) = headers.get(ENCODING_HEADER) else {
        return Ok(None);
    };
    let value = value.as_bytes();
    if value == b"identity" {
        return Ok(None);
    }
    if let Some(encoding) = Encoding::from_name(value) {
        return Ok(Some(encoding));
    }
    let name = match std::str::from_utf8(value) {
        Ok(name) => name.to_owned(),
        Err(_) => format!("{value:?}"),
    };
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{name}` which isn't supported"
    ));
    status.metadata_mut().insert(
        ACCEPT_ENCODING_HEADER,
        ACCEPTED.parse().expect("an ASCII header value"),
    );
    Err(status)
}

/// The encoding of the responses: the first of the client's `grpc-accept-encoding`
/// that `enabled` (`GRPC_COMPRESSION`) holds, as tonic picks it.
pub(super) fn response_encoding(headers: &HeaderMap, enabled: &[Encoding]) -> Option<Encoding> {
    if enabled.is_empty() {
        return None;
    }
    let value = headers.get(ACCEPT_ENCODING_HEADER)?.to_str().ok()?;
    value.split(',').find_map(|name| {
        Encoding::from_name(name.trim().as_bytes()).filter(|e| enabled.contains(e))
    })
}

/// The response header naming the responses' encoding.
pub(super) fn encoding_header(encoding: Encoding) -> (&'static str, HeaderValue) {
    (ENCODING_HEADER, HeaderValue::from_static(encoding.name()))
}

/// Decompresses the messages of one stream into a buffer it reuses (up to [`KEEP`]
/// bytes of it): a message's bytes are a view into it until the next message.
#[derive(Debug)]
pub(super) struct Decompressor {
    encoding: Encoding,
    buf: BytesMut,
}

impl Decompressor {
    pub(super) fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            buf: BytesMut::new(),
        }
    }

    /// The message `compressed` decompresses to, at most `limit` bytes
    /// (`MAX_MESSAGE_BYTES`): decompression stops at the first byte past it
    /// (`RESOURCE_EXHAUSTED`, tonic's text naming the setting); data that does not
    /// decompress is tonic's `INTERNAL` "Error decompressing: ...".
    pub(super) fn decompress(&mut self, compressed: &[u8], limit: usize) -> Result<Bytes, Status> {
        self.buf.clear();
        // tonic's first reservation: twice the compressed size rounded up to the growth
        // step, within the limit.
        let estimate = ((compressed.len() * 2 / GROWTH) + 1) * GROWTH;
        self.buf.reserve(estimate.min(limit));
        let mut out = (&mut self.buf).limit(limit).writer();
        let copied = match self.encoding {
            Encoding::Gzip => io::copy(&mut flate2::read::GzDecoder::new(compressed), &mut out),
            Encoding::Deflate => {
                io::copy(&mut flate2::read::ZlibDecoder::new(compressed), &mut out)
            }
            Encoding::Zstd => zstd::stream::read::Decoder::new(compressed)
                .and_then(|mut decoder| io::copy(&mut decoder, &mut out)),
        };
        let result = match copied {
            Ok(_) => Ok(self.buf.split().freeze()),
            Err(e) if e.kind() == io::ErrorKind::WriteZero => Err(too_large_decompressed(limit)),
            Err(e) => Err(Status::internal(format!(
                "Error decompressing: {e}, while sending request"
            ))),
        };
        // A large buffer goes with its message (freed when the message is judged), or
        // now.
        if result.as_ref().map_or(self.buf.capacity(), Bytes::len) > KEEP {
            self.buf = BytesMut::new();
        }
        self.buf.clear();
        result
    }
}

/// Compresses response messages in place in the output buffer, through a scratch
/// buffer it reuses.
#[derive(Debug)]
pub(crate) struct Compressor {
    encoding: Encoding,
    scratch: Vec<u8>,
}

impl Compressor {
    pub(super) fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            scratch: Vec::new(),
        }
    }

    /// Replaces `out[from..]`, one encoded message, by its compressed bytes.
    pub(super) fn compress_tail(&mut self, out: &mut BytesMut, from: usize) -> Result<(), Status> {
        self.scratch.clear();
        let message = &out[from..];
        let compressed = match self.encoding {
            Encoding::Gzip => flate2::read::GzEncoder::new(message, flate2::Compression::new(6))
                .read_to_end(&mut self.scratch),
            Encoding::Deflate => {
                flate2::read::ZlibEncoder::new(message, flate2::Compression::new(6))
                    .read_to_end(&mut self.scratch)
            }
            Encoding::Zstd => {
                zstd::stream::read::Encoder::new(message, zstd::DEFAULT_COMPRESSION_LEVEL)
                    .and_then(|mut encoder| encoder.read_to_end(&mut self.scratch))
            }
        };
        compressed.map_err(|e| Status::internal(format!("Error compressing: {e}")))?;
        out.truncate(from);
        out.extend_from_slice(&self.scratch);
        Ok(())
    }
}
