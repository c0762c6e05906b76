//! `IngestResponse` encoding straight from the engine: [`WireSink`] is the engine's
//! [`VerdictSink`] for the fast path, and writes each verdict once, in place, into
//! the buffer of framed responses that goes to HTTP/2. prost would build a `Verdict`
//! with `String`s per sample, then encode it into tonic's buffer, then tonic would
//! copy it into a frame. The bytes decode with prost to the verdicts the engine
//! judged (`encode/tests.rs` holds it to prost field by field).

use bytes::{BufMut, Bytes, BytesMut};
use tonic::Status;

use super::{GRPC_HEADER, I64, LEN, VARINT, compression::Compressor};
use crate::{
    engine::{MetricOutcome, VerdictSink},
    error::SampleError,
};

#[cfg(test)]
mod tests;

#[inline]
pub(super) fn put_varint(out: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[inline]
fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least 1.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
pub(super) fn put_key(out: &mut impl BufMut, field: u64, wire_type: u64) {
    put_varint(out, (field << 3) | wire_type);
}

#[inline]
fn put_string(out: &mut impl BufMut, field: u64, s: &[u8]) {
    if !s.is_empty() {
        put_key(out, field, LEN);
        put_varint(out, s.len() as u64);
        out.put_slice(s);
    }
}

#[inline]
fn put_double(out: &mut impl BufMut, field: u64, v: f64) {
    // proto3: 0.0 (and -0.0, as prost compares with `!=`) is not written.
    if v != 0.0 {
        put_key(out, field, I64);
        out.put_u64_le(v.to_bits());
    }
}

#[inline]
fn put_bool(out: &mut impl BufMut, field: u64, v: bool) {
    if v {
        put_key(out, field, VARINT);
        out.put_u8(1);
    }
}

#[inline]
fn put_uint(out: &mut impl BufMut, field: u64, v: u64) {
    if v != 0 {
        put_key(out, field, VARINT);
        put_varint(out, v);
    }
}

/// Writes the verdicts of one request as an encoded `IngestResponse` (each verdict is
/// field 1 of the response; a response is the concatenation of its verdicts).
///
/// Each verdict is written once, in place: its length is not known until its last
/// metric is judged, so `begin` leaves room for it and `end` fills it in. The room
/// left is what the previous judged verdict's length took (verdicts of a stream are
/// usually alike): a wrong guess moves the verdict's body by a byte or two.
///
/// Each verdict part (head, metric entry, tail) is written into a fixed-size window
/// appended to the output (a [`Window`]), not with one capacity check and write per
/// field.
#[derive(Debug, Default)]
pub struct WireSink {
    /// The encoded response so far.
    out: BytesMut,
    /// Where the current verdict's key is in `out`.
    start: usize,
    /// Bytes left after the key for the current verdict's length.
    slot: usize,
    /// Bytes the last judged verdict's length took (0 before the first): the room
    /// `begin` leaves for the next one.
    guess: usize,
    /// Where the gRPC message opened by [`WireSink::begin_message`] starts in `out`
    /// (its 5-byte prefix), while it is open.
    message: Option<usize>,
    /// The responses' compression, when the call has one: each message is compressed
    /// in place when it is finished.
    compressor: Option<Compressor>,
}

/// Most bytes `begin` leaves for a verdict's length (a 2 MiB verdict); a longer one
/// is moved by `close`.
const MAX_SLOT: usize = 3;

/// Names and device ids up to this length take the [`Window`] path of [`WireSink`];
/// with them every length inside a `MetricVerdict` and a verdict's head fits one byte.
const SHORT: usize = 64;

/// Most bytes a verdict's head takes on the [`Window`] path: the key, the length's
/// slot, the device id with its key and length, and `seq` (key and up to 10 bytes).
const HEAD: usize = 1 + MAX_SLOT + 2 + SHORT + 11;

/// Most bytes a `MetricVerdict` entry takes on the [`Window`] path: its key and
/// length, the name with its key and length, five doubles, two bools and
/// `window_count` (key and up to 5 bytes). Under 128, so its length is one byte.
const ENTRY: usize = 2 + 2 + SHORT + 5 * 9 + 2 * 2 + 6;

/// Most bytes a verdict's tail takes: `anomaly`, `alert` and `score`.
const TAIL: usize = 2 + 2 + 9;

/// A field's key as its one-byte varint (field numbers below 16).
const fn key(field: u8, wire_type: u64) -> u8 {
    (field << 3) | wire_type as u8
}

/// A fixed-size window of zeros appended to the output, that a verdict part's fields
/// are written into and that is then cut to what they took ([`WireSink::window`]).
///
/// Not a stack buffer appended with `extend_from_slice`: that is a call to `memcpy`
/// per part (its length varies), whose wide loads wait on the narrow stores just
/// made, a large share of the ingest bench's time. Zeros of a length known at compile time are a few inlined vector stores
/// (the crate is built for baseline x86-64, where LLVM inlines fixed-size fills and
/// copies up to about 128 bytes: keep `N` within that), the fields are then written
/// once, in place, and one bounds check on the window covers them. Fixed-size fields
/// are written whether present or not and kept only when present, without a branch.
struct Window<'a, const N: usize> {
    /// The appended bytes: zeros where nothing is written, which `open`'s length
    /// slot relies on.
    buf: &'a mut [u8; N],
    /// Where the window starts in the output.
    start: usize,
    /// Bytes written so far: what the window is cut to.
    len: usize,
}

impl<const N: usize> Window<'_, N> {
    /// Where the bytes written end in the output: its length once the window is cut.
    #[inline(always)]
    fn end(&self) -> usize {
        self.start + self.len
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    #[inline(always)]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    /// Up to [`SHORT`] bytes, copied as two overlapping fixed-size moves (the largest
    /// power of two not over the length, from the start and to the end) instead of a
    /// call to `memcpy`: names and device ids are a few bytes long, for which the
    /// call and its size dispatch cost more than the copy.
    #[inline(always)]
    fn short(&mut self, s: &[u8]) {
        let n = s.len();
        let dst = &mut self.buf[self.len..self.len + n];
        match n {
            0 => {}
            1..=3 => {
                dst[0] = s[0];
                dst[n / 2] = s[n / 2];
                dst[n - 1] = s[n - 1];
            }
            4..=7 => {
                dst[..4].copy_from_slice(&s[..4]);
                dst[n - 4..].copy_from_slice(&s[n - 4..]);
            }
            8..=15 => {
                dst[..8].copy_from_slice(&s[..8]);
                dst[n - 8..].copy_from_slice(&s[n - 8..]);
            }
            16..=31 => {
                dst[..16].copy_from_slice(&s[..16]);
                dst[n - 16..].copy_from_slice(&s[n - 16..]);
            }
            32..=SHORT => {
                dst[..32].copy_from_slice(&s[..32]);
                dst[n - 32..].copy_from_slice(&s[n - 32..]);
            }
            _ => dst.copy_from_slice(s),
        }
        self.len += n;
    }

    /// A double field, unless it is 0 (or -0, as prost compares with `!=`).
    #[inline(always)]
    fn double(&mut self, key: u8, v: f64) {
        let field = &mut self.buf[self.len..self.len + 9];
        field[0] = key;
        field[1..].copy_from_slice(&v.to_le_bytes());
        self.len += if v != 0.0 { 9 } else { 0 };
    }

    /// A bool field, unless it is false.
    #[inline(always)]
    fn bool(&mut self, key: u8, v: bool) {
        let field = &mut self.buf[self.len..self.len + 2];
        field[0] = key;
        field[1] = 1;
        self.len += 2 * usize::from(v);
    }
}

impl WireSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Compresses every message finished from now on with `compressor` (the call's
    /// response encoding).
    pub(crate) fn compress_with(&mut self, compressor: Compressor) {
        self.compressor = Some(compressor);
    }

    /// Takes the encoded response written so far, leaving the sink empty (its buffer
    /// is reused once the response has been sent).
    pub fn take(&mut self) -> Bytes {
        self.out.split().freeze()
    }

    /// Opens a gRPC message: reserves its prefix, filled in by
    /// [`WireSink::finish_message`]. Responses written between the two are one
    /// length-prefixed message of the response body, so a sink can collect many
    /// framed responses and hand them to HTTP/2 as one chunk.
    pub fn begin_message(&mut self) {
        debug_assert!(self.message.is_none(), "a message is open already");
        self.message = Some(self.out.len());
        self.out.put_bytes(0, GRPC_HEADER);
    }

    /// Closes the message opened by [`WireSink::begin_message`]: compressed in place
    /// when the sink has a compression ([`WireSink::compress_with`]), its flag and
    /// length in the prefix. A response over 4 GiB cannot be framed (it would take a
    /// request of a million samples with hundreds of metrics each); it is dropped and
    /// reported as tonic reports it.
    pub fn finish_message(&mut self) -> Result<(), Status> {
        let Some(start) = self.message.take() else {
            return Ok(());
        };
        let mut flag = 0;
        if let Some(compressor) = self.compressor.as_mut() {
            if let Err(status) = compressor.compress_tail(&mut self.out, start + GRPC_HEADER) {
                self.out.truncate(start);
                return Err(status);
            }
            flag = 1;
        }
        let len = self.out.len() - start - GRPC_HEADER;
        let Ok(len32) = u32::try_from(len) else {
            self.out.truncate(start);
            return Err(Status::resource_exhausted(format!(
                "Cannot return body with more than 4GB of data but got {len} bytes"
            )));
        };
        self.out[start] = flag;
        self.out[start + 1..start + GRPC_HEADER].copy_from_slice(&len32.to_be_bytes());
        Ok(())
    }

    /// Drops the message opened by [`WireSink::begin_message`] (its request ended
    /// the stream instead of being answered).
    pub fn abandon_message(&mut self) {
        if let Some(start) = self.message.take() {
            self.out.truncate(start);
        }
    }

    /// Makes room for `n` more bytes at once (a caller that knows roughly how much
    /// it will write saves the buffer's doubling steps, each a copy).
    pub fn reserve_bytes(&mut self, n: usize) {
        self.out.reserve(n);
    }

    /// Bytes written so far (finished messages and the open one).
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Takes the finished messages, leaving an open one (waiting for a restore) in
    /// the sink.
    pub fn take_finished(&mut self) -> Bytes {
        match self.message {
            Some(start) => {
                self.message = Some(0);
                self.out.split_to(start).freeze()
            }
            None => self.take(),
        }
    }

    /// Appends a response encoded elsewhere (the slow path's prost verdicts).
    pub fn put_encoded(&mut self, response: &impl prost::Message) {
        self.out.reserve(response.encoded_len());
        response
            .encode(&mut self.out)
            .expect("reserved the encoded length");
    }

    /// Appends `N` zeros as a [`Window`] to write a part into; the caller then
    /// truncates the output to the window's [`Window::end`]. (Not a method taking
    /// the writing as a closure: LLVM left such closures out of line.)
    #[inline(always)]
    fn window<const N: usize>(&mut self) -> Window<'_, N> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; N]);
        Window {
            buf: (&mut self.out[start..])
                .try_into()
                .expect("N bytes appended"),
            start,
            len: 0,
        }
    }

    /// Starts a verdict: key, `slot` bytes for its length, device id, `seq`.
    #[inline]
    fn open(&mut self, device_id: &[u8], seq: u64, slot: usize) {
        debug_assert!((1..=MAX_SLOT).contains(&slot));
        self.start = self.out.len();
        self.slot = slot;
        if device_id.len() <= SHORT {
            let mut head = self.window::<HEAD>();
            // IngestResponse.verdicts = 1; the slot's bytes are the zeros there.
            head.byte(key(1, LEN));
            head.len += slot;
            if !device_id.is_empty() {
                head.byte(key(1, LEN));
                head.byte(device_id.len() as u8);
                head.short(device_id);
            }
            if seq != 0 {
                head.byte(key(2, VARINT));
                head.varint(seq);
            }
            let end = head.end();
            self.out.truncate(end);
        } else {
            self.long_head(device_id, seq, slot);
        }
    }

    /// [`WireSink::open`]'s fields one by one, for a device id over [`SHORT`] bytes
    /// (and the reference the tests hold the [`Window`] path to).
    #[cold]
    fn long_head(&mut self, device_id: &[u8], seq: u64, slot: usize) {
        self.out
            .reserve(1 + slot + 1 + 10 + device_id.len() + 11 + 96);
        put_key(&mut self.out, 1, LEN);
        self.out.put_bytes(0, slot);
        put_string(&mut self.out, 1, device_id);
        put_uint(&mut self.out, 2, seq);
    }

    /// Completes the verdict started by `open`: writes its length into the slot,
    /// moving the body when the length takes more or fewer bytes than the slot.
    /// Returns the bytes the length took.
    #[inline]
    fn close(&mut self) -> usize {
        let slot = self.start + 1;
        let len = self.out.len() - (slot + self.slot);
        let n = varint_len(len as u64);
        if n != self.slot {
            self.resize_slot(n);
        }
        // Lengths of one and two bytes (verdicts under 16 KiB) written at once;
        // the loop is for the rest.
        match &mut self.out[slot..slot + n] {
            [b0] => *b0 = len as u8,
            [b0, b1] => {
                *b0 = (len as u8) | 0x80;
                *b1 = (len >> 7) as u8;
            }
            bytes => {
                let mut v = len;
                let (last, rest) = bytes.split_last_mut().expect("n >= 1");
                for byte in rest {
                    *byte = (v as u8) | 0x80;
                    v >>= 7;
                }
                *last = v as u8;
            }
        }
        n
    }

    /// Moves the current verdict's body so that the slot is `n` bytes: the guess
    /// was wrong (rare: verdicts of a stream are usually alike), so out of line.
    #[cold]
    fn resize_slot(&mut self, n: usize) {
        let slot = self.start + 1;
        let body = slot + self.slot;
        let end = self.out.len();
        if n > self.slot {
            let extra = n - self.slot;
            self.out.put_bytes(0, extra);
            self.out.copy_within(body..end, body + extra);
        } else {
            self.out.copy_within(body..end, slot + n);
            self.out.truncate(end - (self.slot - n));
        }
        self.slot = n;
    }

    /// [`VerdictSink::metric`] field by field, for a name over [`SHORT`] bytes (and
    /// the reference the tests hold the [`Window`] path to).
    #[cold]
    fn long_metric(&mut self, name: &[u8], m: &MetricOutcome) {
        let mut len = 0;
        if !name.is_empty() {
            len += 1 + varint_len(name.len() as u64) + name.len();
        }
        for v in [m.value, m.mean, m.stddev, m.z_score, m.score] {
            if v != 0.0 {
                len += 9;
            }
        }
        len += 2 * usize::from(m.anomaly) + 2 * usize::from(m.alert);
        if m.window_count != 0 {
            len += 1 + varint_len(u64::from(m.window_count));
        }
        let out = &mut self.out;
        out.reserve(1 + 2 + len);
        // Verdict.metrics = 4
        put_key(out, 4, LEN);
        put_varint(out, len as u64);
        put_string(out, 1, name);
        put_double(out, 2, m.value);
        put_double(out, 3, m.mean);
        put_double(out, 4, m.stddev);
        put_double(out, 5, m.z_score);
        put_bool(out, 6, m.anomaly);
        put_uint(out, 7, u64::from(m.window_count));
        put_double(out, 8, m.score);
        put_bool(out, 9, m.alert);
    }
}

impl VerdictSink for WireSink {
    fn reserve(&mut self, n: usize) {
        // A verdict with two metrics takes ≈ 190 bytes.
        self.out.reserve(n * 192);
    }

    fn begin(&mut self, device_id: &[u8], seq: u64, metrics: usize) {
        // ≈ 96 bytes a metric, and room for a whole window past the last one written
        // (a window is appended at its full size and then cut).
        self.out.reserve(metrics * 96 + ENTRY);
        self.open(device_id, seq, self.guess.clamp(1, MAX_SLOT));
    }

    fn metric(&mut self, name: &[u8], m: &MetricOutcome) {
        if name.len() > SHORT {
            return self.long_metric(name, m);
        }
        let mut entry = self.window::<ENTRY>();
        // Verdict.metrics = 4 and its length (one byte: under `ENTRY`), filled in
        // once the fields are written.
        entry.len = 2;
        if !name.is_empty() {
            entry.byte(key(1, LEN));
            entry.byte(name.len() as u8);
            entry.short(name);
        }
        entry.double(key(2, I64), m.value);
        entry.double(key(3, I64), m.mean);
        entry.double(key(4, I64), m.stddev);
        entry.double(key(5, I64), m.z_score);
        entry.bool(key(6, VARINT), m.anomaly);
        if m.window_count != 0 {
            entry.byte(key(7, VARINT));
            entry.varint(u64::from(m.window_count));
        }
        entry.double(key(8, I64), m.score);
        entry.bool(key(9, VARINT), m.alert);
        entry.buf[0] = key(4, LEN);
        entry.buf[1] = (entry.len - 2) as u8;
        let end = entry.end();
        self.out.truncate(end);
    }

    fn end(&mut self, anomaly: bool, alert: bool, score: f64) {
        // Fields 3 (anomaly) and 7, 8 go after the metrics (field 4): any order is
        // valid protobuf, and every decoder reads it as the same message.
        let mut tail = self.window::<TAIL>();
        tail.bool(key(3, VARINT), anomaly);
        tail.bool(key(7, VARINT), alert);
        tail.double(key(8, I64), score);
        let end = tail.end();
        self.out.truncate(end);
        self.guess = self.close();
    }

    fn duplicate(&mut self, device_id: &[u8], seq: u64) {
        self.open(device_id, seq, 1);
        put_bool(&mut self.out, 5, true);
        self.close();
    }

    fn error(&mut self, device_id: &[u8], seq: u64, error: &SampleError) {
        let error = error.to_string();
        self.out.reserve(error.len() + 4);
        self.open(device_id, seq, 1);
        put_string(&mut self.out, 6, error.as_bytes());
        self.close();
    }
}
