//! The `Ingest` hot path's own protobuf codec. prost decodes each `Sample` into a heap
//! `String` device id and a `BTreeMap<String, f64>` (three allocations and a tree
//! insert per two-metric sample) and the engine's verdicts into `String`s again; at a
//! million samples per second that is most of the time. This codec reads an
//! `IngestRequest` as views into the received buffer (no allocation for the usual
//! request of one sample with up to 4 metrics) and writes
//! `IngestResponse`s straight from the engine into the response buffer.
//!
//! It speaks exactly the wire format of `proto/tidewatch/v1/telemetry.proto`: fields in
//! any order, unknown fields skipped, repeated scalars last-wins, repeated map keys
//! last-wins, strings checked for UTF-8 (as prost does), proto3 defaults omitted on
//! output. The tests decode its output with prost and compare field by field.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{DetectorConfig, Sample},
};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::{
    engine::{MetricOutcome, SampleLike, VerdictSink, text},
    error::SampleError,
};

/// Why a request is not a valid `IngestRequest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends inside a field.
    #[error("buffer ends inside a field")]
    Truncated,
    /// A varint longer than 10 bytes.
    #[error("invalid varint")]
    Varint,
    /// A wire type this message cannot have (or a group).
    #[error("unsupported wire type {0}")]
    WireType(u64),
    /// Field number 0.
    #[error("invalid field number 0")]
    FieldZero,
    /// A key beyond 32 bits.
    #[error("invalid key value: {0}")]
    Key(u64),
    /// A string field is not UTF-8.
    #[error("{0}: invalid string value: data is not UTF-8 encoded")]
    Utf8(&'static str),
    /// A known field with the wrong wire type.
    #[error("{field}: invalid wire type {found}")]
    FieldType {
        /// Which field.
        field: &'static str,
        /// The wire type found.
        found: u64,
    },
    /// The `detector` section does not decode.
    #[error("IngestRequest.detector: {0}")]
    Detector(String),
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Self {
        // As tonic reports a prost decode error.
        Status::internal(format!("failed to decode Protobuf message: {e}"))
    }
}

const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

/// Samples reserved up front at most (a guess from the first sample's size must not
/// let a small first sample in a large request allocate far more than the request).
const RESERVE_SAMPLES: usize = 4096;

/// Metrics of one sample up to which an insertion sort orders them.
const INSERTION_SORT_MAX: usize = 16;

/// A cursor over a protobuf message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline(always)]
    fn varint(&mut self) -> Result<u64, WireError> {
        // Keys, lengths and most `seq`s fit in one byte: that case inline, the rest
        // out of line.
        if let Some(&byte) = self.buf.get(self.pos)
            && byte < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(byte));
        }
        self.varint_slow()
    }

    #[inline(never)]
    fn varint_slow(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for shift in 0..10 {
            let byte = *self.buf.get(self.pos).ok_or(WireError::Truncated)?;
            self.pos += 1;
            if shift == 9 && byte > 1 {
                // The tenth byte holds bit 63 only: more would overflow 64 bits.
                return Err(WireError::Varint);
            }
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(WireError::Varint)
    }

    /// The next key as (field number, wire type).
    #[inline]
    fn key(&mut self) -> Result<(u64, u64), WireError> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            // Field numbers have 29 bits.
            return Err(WireError::Key(key));
        }
        let field = key >> 3;
        if field == 0 {
            return Err(WireError::FieldZero);
        }
        Ok((field, key & 7))
    }

    /// A length-delimited field's range in the buffer.
    #[inline]
    fn len_delimited(&mut self) -> Result<Range<usize>, WireError> {
        let len = usize::try_from(self.varint()?).map_err(|_| WireError::Truncated)?;
        let start = self.pos;
        let end = start.checked_add(len).ok_or(WireError::Truncated)?;
        if end > self.buf.len() {
            return Err(WireError::Truncated);
        }
        self.pos = end;
        Ok(start..end)
    }

    #[inline]
    fn fixed64(&mut self) -> Result<u64, WireError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos + 8)
            .ok_or(WireError::Truncated)?;
        self.pos += 8;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// Skips a field of an unknown number.
    fn skip(&mut self, wire_type: u64) -> Result<(), WireError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            I64 => self.fixed64().map(drop),
            LEN => self.len_delimited().map(drop),
            I32 => {
                if self.pos + 4 > self.buf.len() {
                    return Err(WireError::Truncated);
                }
                self.pos += 4;
                Ok(())
            }
            other => Err(WireError::WireType(other)),
        }
    }

    /// A sub-reader over `range` of the same buffer, with positions in it.
    fn sub(&self, range: Range<usize>) -> Reader<'a> {
        Reader {
            buf: &self.buf[..range.end],
            pos: range.start,
        }
    }
}

fn expect(field: &'static str, found: u64, wanted: u64) -> Result<(), WireError> {
    if found == wanted {
        Ok(())
    } else {
        Err(WireError::FieldType { field, found })
    }
}

/// A sample's place in the request buffer.
#[derive(Debug, Clone)]
struct RawSample {
    device_id: Range<u32>,
    seq: u64,
    time: Option<Timestamp>,
    /// Range of `WireRequest::metrics`: sorted by name, one entry per name.
    metrics: Range<u32>,
}

/// One metric: the name's range in the buffer and the value.
#[derive(Debug, Clone)]
struct RawMetric {
    name: Range<u32>,
    value: f64,
}

/// Samples whose vectors a reused [`WireRequest`] keeps between messages.
const KEEP_SAMPLES: usize = 16;

/// A decoded `IngestRequest` that borrows every string from the received bytes.
#[derive(Debug, Clone, Default)]
pub struct WireRequest {
    buf: Bytes,
    /// Plain vectors: a stream reuses its request, so they are allocated once, and a
    /// push into a `Vec` is cheaper than into a `SmallVec` (no inline-or-heap branch).
    samples: Vec<RawSample>,
    metrics: Vec<RawMetric>,
    /// The `detector` section, when the request has one (boxed: few requests have
    /// one, and a stream's request is reused for every message it sends).
    pub detector: Option<Box<DetectorConfig>>,
}

impl WireRequest {
    /// Decodes an `IngestRequest`.
    pub fn decode(buf: Bytes) -> Result<Self, WireError> {
        let mut request = Self::default();
        request.decode_into(buf)?;
        Ok(request)
    }

    /// Decodes an `IngestRequest` into this one, reusing its vectors: a stream keeps
    /// one request for all its messages instead of building, moving and dropping one
    /// per message. On error the request is left empty.
    pub fn decode_into(&mut self, buf: Bytes) -> Result<(), WireError> {
        self.samples.clear();
        self.metrics.clear();
        self.detector = None;
        self.buf = Bytes::new();
        if buf.len() > u32::MAX as usize {
            return Err(WireError::Truncated);
        }
        let result = self.decode_fields(&buf);
        if result.is_err() {
            self.samples.clear();
            self.metrics.clear();
            self.detector = None;
        } else {
            self.buf = buf;
        }
        result
    }

    /// Lets go of the message's bytes (a view into a received frame) and of vectors
    /// grown past [`KEEP_SAMPLES`] samples for a large message, so that a quiet stream
    /// holds neither. The request is empty afterwards.
    pub fn reset(&mut self) {
        if self.samples.capacity() > KEEP_SAMPLES || self.metrics.capacity() > 4 * KEEP_SAMPLES {
            *self = Self::default();
        } else {
            self.samples.clear();
            self.metrics.clear();
            self.detector = None;
            self.buf = Bytes::new();
        }
    }

    fn decode_fields(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let request = self;
        let mut reader = Reader::new(bytes);
        while !reader.done() {
            let (field, wire_type) = reader.key()?;
            match field {
                1 => {
                    expect("IngestRequest.samples", wire_type, LEN)?;
                    let range = reader.len_delimited()?;
                    if request.samples.is_empty() {
                        // Size the vectors once from the first sample: the samples of
                        // a request are usually alike.
                        let per_sample = range.len() + 2;
                        let samples = (bytes.len() - reader.pos + per_sample) / per_sample;
                        request.samples.reserve_exact(samples.min(RESERVE_SAMPLES));
                    }
                    let before = request.metrics.len();
                    if !request.canonical_sample(bytes, range.clone()) {
                        request.decode_sample(reader.sub(range))?;
                    }
                    if request.samples.len() == 1 {
                        let metrics = request.metrics.len() - before;
                        let more = metrics * (request.samples.capacity() - 1);
                        request.metrics.reserve_exact(more.min(2 * RESERVE_SAMPLES));
                    }
                }
                2 => {
                    expect("IngestRequest.detector", wire_type, LEN)?;
                    let range = reader.len_delimited()?;
                    request
                        .detector
                        .get_or_insert_default()
                        .merge(&bytes[range])
                        .map_err(|e| WireError::Detector(e.to_string()))?;
                }
                _ => reader.skip(wire_type)?,
            }
        }
        Ok(())
    }

    /// Reads a sample in the shape prost writes it, without the field loop: an ASCII
    /// device id (field 1) and the metrics (field 3, each a [`canonical_entry`]) in
    /// ascending name order, then `seq` (field 4); one-byte lengths, no `time`. That
    /// is what devices send, and it skips a key dispatch per field and the separate
    /// pass that checks the names' order. `false` (nothing kept) for any other shape:
    /// [`WireRequest::decode_sample`] reads it then, with every check.
    #[inline]
    fn canonical_sample(&mut self, buf: &[u8], range: Range<usize>) -> bool {
        let first_metric = self.metrics.len();
        match self.canonical_fields(buf, range, first_metric) {
            Some(sample) => {
                self.samples.push(sample);
                true
            }
            None => {
                self.metrics.truncate(first_metric);
                false
            }
        }
    }

    /// [`WireRequest::canonical_sample`]'s reading: the sample, its metrics pushed
    /// from `first_metric` on; `None` at the first field off the shape (the caller
    /// drops the metrics pushed).
    #[inline]
    fn canonical_fields(
        &mut self,
        buf: &[u8],
        range: Range<usize>,
        first_metric: usize,
    ) -> Option<RawSample> {
        let base = range.start;
        let s = &buf[range];
        let mut sample = RawSample {
            device_id: 0..0,
            seq: 0,
            time: None,
            metrics: 0..0,
        };
        let mut pos = 0;
        if let Some(&[0x0A, len]) = s.first_chunk::<2>()
            && len < 0x80
        {
            let end = 2 + usize::from(len);
            if !s.get(2..end)?.is_ascii() {
                return None;
            }
            sample.device_id = (base + 2) as u32..(base + end) as u32;
            pos = end;
        }
        while let Some(&[0x1A, len]) = s.get(pos..).and_then(<[u8]>::first_chunk::<2>) {
            let (start, end) = (pos + 2, pos + 2 + usize::from(len));
            if len >= 0x80 || end > s.len() {
                return None;
            }
            let metric = canonical_entry(buf, base + start..base + end)?;
            let ascending = self.metrics[first_metric..]
                .last()
                .is_none_or(|prev| name_before(buf, &prev.name, &metric.name));
            if !ascending {
                return None;
            }
            self.metrics.push(metric);
            pos = end;
        }
        if s.get(pos) == Some(&0x20) {
            let mut reader = Reader {
                buf: s,
                pos: pos + 1,
            };
            sample.seq = reader.varint().ok()?;
            pos = reader.pos;
        }
        if pos != s.len() {
            return None;
        }
        sample.metrics = first_metric as u32..self.metrics.len() as u32;
        Some(sample)
    }

    fn decode_sample(&mut self, mut reader: Reader<'_>) -> Result<(), WireError> {
        let first_metric = self.metrics.len();
        let mut sample = RawSample {
            device_id: 0..0,
            seq: 0,
            time: None,
            metrics: 0..0,
        };
        while !reader.done() {
            let (field, wire_type) = reader.key()?;
            match field {
                1 => {
                    expect("Sample.device_id", wire_type, LEN)?;
                    let range = reader.len_delimited()?;
                    utf8(&reader.buf[range.clone()], "Sample.device_id")?;
                    sample.device_id = range.start as u32..range.end as u32;
                }
                2 => {
                    expect("Sample.time", wire_type, LEN)?;
                    let range = reader.len_delimited()?;
                    let time = sample.time.get_or_insert_with(Timestamp::default);
                    merge_timestamp(time, reader.sub(range))?;
                }
                3 => {
                    expect("Sample.metrics", wire_type, LEN)?;
                    let range = reader.len_delimited()?;
                    let metric = match canonical_entry(reader.buf, range.clone()) {
                        Some(metric) => metric,
                        None => decode_entry(reader.sub(range))?,
                    };
                    self.metrics.push(metric);
                }
                4 => {
                    expect("Sample.seq", wire_type, VARINT)?;
                    sample.seq = reader.varint()?;
                }
                _ => reader.skip(wire_type)?,
            }
        }
        // Map semantics: ascending names (as the BTreeMap prost decodes into), and a
        // repeated key keeps its last value. Both sorts are stable (equal names stay in
        // arrival order). Samples usually carry a handful of metrics, for which an
        // insertion sort is the fastest; a message with thousands (refused later as
        // `too_many_metrics`, but decoded first) must not cost quadratic time.
        // The reader's buffer is the request's up to the end of this sample, with the
        // same positions, so the names' ranges index it.
        let buf = reader.buf;
        let metrics = &mut self.metrics[first_metric..];
        let name = |m: &RawMetric| &buf[m.name.start as usize..m.name.end as usize];
        // Names that arrive strictly ascending (as prost writes a map) need neither.
        if metrics.windows(2).all(|w| name(&w[0]) < name(&w[1])) {
            sample.metrics = first_metric as u32..self.metrics.len() as u32;
            self.samples.push(sample);
            return Ok(());
        }
        if metrics.len() <= INSERTION_SORT_MAX {
            for i in 1..metrics.len() {
                let mut j = i;
                while j > 0 && name(&metrics[j - 1]) > name(&metrics[j]) {
                    metrics.swap(j - 1, j);
                    j -= 1;
                }
            }
        } else {
            metrics.sort_by(|a, b| name(a).cmp(name(b)));
        }
        let mut kept = first_metric;
        for i in first_metric..self.metrics.len() {
            let next_same =
                i + 1 < self.metrics.len() && name(&self.metrics[i]) == name(&self.metrics[i + 1]);
            if !next_same {
                self.metrics.swap(kept, i);
                kept += 1;
            }
        }
        self.metrics.truncate(kept);
        sample.metrics = first_metric as u32..kept as u32;
        self.samples.push(sample);
        Ok(())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the request has no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples, in order.
    pub fn samples(&self) -> Samples<'_> {
        Samples {
            request: self,
            next: 0,
        }
    }

    /// The samples as prost messages (for the path that must own them: restores and
    /// batches judged on the blocking pool).
    pub fn to_samples(&self) -> Vec<Sample> {
        self.to_samples_from(0)
    }

    /// [`WireRequest::to_samples`] from the `first`-th sample on.
    pub fn to_samples_from(&self, first: usize) -> Vec<Sample> {
        self.samples()
            .skip(first)
            .map(|s| Sample {
                device_id: text(s.device_id()),
                time: s.time(),
                metrics: s.metrics().map(|(k, v)| (text(k), v)).collect(),
                seq: s.seq(),
            })
            .collect()
    }

    /// The bytes of a device id or a metric name (UTF-8: checked when decoded).
    fn text(&self, range: &Range<u32>) -> &[u8] {
        &self.buf[range.start as usize..range.end as usize]
    }
}

fn utf8(bytes: &[u8], field: &'static str) -> Result<(), WireError> {
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(WireError::Utf8(field))
    }
}

fn merge_timestamp(time: &mut Timestamp, mut reader: Reader<'_>) -> Result<(), WireError> {
    while !reader.done() {
        let (field, wire_type) = reader.key()?;
        match field {
            1 => {
                expect("Timestamp.seconds", wire_type, VARINT)?;
                time.seconds = reader.varint()? as i64;
            }
            2 => {
                expect("Timestamp.nanos", wire_type, VARINT)?;
                time.nanos = reader.varint()? as i32;
            }
            _ => reader.skip(wire_type)?,
        }
    }
    Ok(())
}

/// A `map<string, double>` entry in the shape prost writes for an ASCII name of 1 to
/// 127 bytes and a non-zero value, `0x0A len name 0x11 <8 bytes>`, read without the
/// field loop; `None` for any other shape, which [`decode_entry`] reads.
#[inline]
fn canonical_entry(buf: &[u8], range: Range<usize>) -> Option<RawMetric> {
    let entry = &buf[range.clone()];
    let len = entry.len().checked_sub(11)?;
    let (&[0x0A, name_len], rest) = entry.split_first_chunk::<2>()? else {
        return None;
    };
    let (name, value) = rest.split_at_checked(len)?;
    let &[0x11, ref value @ ..] = value else {
        return None;
    };
    if usize::from(name_len) != len || name_len >= 0x80 || !name.is_ascii() {
        return None;
    }
    let value: [u8; 8] = value.try_into().ok()?;
    let start = range.start + 2;
    Some(RawMetric {
        name: start as u32..(start + len) as u32,
        value: f64::from_le_bytes(value),
    })
}

/// Whether the name at `a` sorts strictly before the name at `b` (both ranges of
/// `buf`). Names of up to 8 bytes with 8 bytes of the buffer from their start (an
/// entry's value follows its name) compare as big-endian words, their bytes past the
/// name masked off, without a `memcmp` call; equal words (equal names, or a name
/// that is the other's prefix followed by zero bytes) compare as slices.
#[inline]
fn name_before(buf: &[u8], a: &Range<u32>, b: &Range<u32>) -> bool {
    let word = |r: &Range<u32>| -> Option<u64> {
        let len = (r.end - r.start) as usize;
        let bytes = buf.get(r.start as usize..)?.first_chunk::<8>()?;
        (len <= 8).then(|| {
            u64::from_be_bytes(*bytes) & (!0u64).checked_shl(8 * (8 - len) as u32).unwrap_or(0)
        })
    };
    match (word(a), word(b)) {
        (Some(x), Some(y)) if x != y => x < y,
        _ => buf[a.start as usize..a.end as usize] < buf[b.start as usize..b.end as usize],
    }
}

/// One `map<string, double>` entry; a missing key or value is the default.
fn decode_entry(mut reader: Reader<'_>) -> Result<RawMetric, WireError> {
    let mut metric = RawMetric {
        name: 0..0,
        value: 0.0,
    };
    while !reader.done() {
        let (field, wire_type) = reader.key()?;
        match field {
            1 => {
                expect("Sample.metrics key", wire_type, LEN)?;
                let range = reader.len_delimited()?;
                utf8(&reader.buf[range.clone()], "Sample.metrics key")?;
                metric.name = range.start as u32..range.end as u32;
            }
            2 => {
                expect("Sample.metrics value", wire_type, I64)?;
                metric.value = f64::from_bits(reader.fixed64()?);
            }
            _ => reader.skip(wire_type)?,
        }
    }
    Ok(metric)
}

/// The samples of a [`WireRequest`].
#[derive(Debug, Clone)]
pub struct Samples<'a> {
    request: &'a WireRequest,
    next: usize,
}

impl<'a> Iterator for Samples<'a> {
    type Item = WireSample<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let raw = self.request.samples.get(self.next)?;
        self.next += 1;
        Some(WireSample {
            request: self.request,
            raw,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.request.samples.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Samples<'_> {}

/// One sample of a [`WireRequest`].
#[derive(Debug, Clone, Copy)]
pub struct WireSample<'a> {
    request: &'a WireRequest,
    raw: &'a RawSample,
}

/// The metrics of a [`WireSample`].
#[derive(Debug, Clone)]
pub struct WireMetrics<'a> {
    request: &'a WireRequest,
    metrics: std::slice::Iter<'a, RawMetric>,
}

impl<'a> Iterator for WireMetrics<'a> {
    type Item = (&'a [u8], f64);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let metric = self.metrics.next()?;
        Some((self.request.text(&metric.name), metric.value))
    }
}

impl SampleLike for WireSample<'_> {
    type Metrics<'b>
        = WireMetrics<'b>
    where
        Self: 'b;

    fn device_id(&self) -> &[u8] {
        self.request.text(&self.raw.device_id)
    }

    fn seq(&self) -> u64 {
        self.raw.seq
    }

    fn time(&self) -> Option<Timestamp> {
        self.raw.time
    }

    fn metric_count(&self) -> usize {
        self.raw.metrics.len()
    }

    fn metrics(&self) -> Self::Metrics<'_> {
        let range = self.raw.metrics.start as usize..self.raw.metrics.end as usize;
        WireMetrics {
            request: self.request,
            metrics: self.request.metrics[range].iter(),
        }
    }
}

#[inline]
fn put_varint(out: &mut impl BufMut, mut v: u64) {
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
fn put_key(out: &mut impl BufMut, field: u64, wire_type: u64) {
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
}

/// The gRPC message prefix: a compression flag and a big-endian `u32` length.
pub const GRPC_HEADER: usize = 5;

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
/// Parts used to be assembled in a stack buffer and appended with
/// `extend_from_slice`: a call to `memcpy` per part (its length varies), whose wide
/// loads also waited on the narrow stores just made (≈ 17 % of the ingest bench's
/// time). Zeros of a length known at compile time are a few inlined vector stores
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

    /// Closes the message opened by [`WireSink::begin_message`]: uncompressed, its
    /// length in the prefix. A response over 4 GiB cannot be framed (it would take a
    /// request of a million samples with hundreds of metrics each); it is dropped and
    /// reported as tonic reports it.
    pub fn finish_message(&mut self) -> Result<(), Status> {
        let Some(start) = self.message.take() else {
            return Ok(());
        };
        let len = self.out.len() - start - GRPC_HEADER;
        let Ok(len32) = u32::try_from(len) else {
            self.out.truncate(start);
            return Err(Status::resource_exhausted(format!(
                "Cannot return body with more than 4GB of data but got {len} bytes"
            )));
        };
        self.out[start] = 0;
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

/// A tonic codec for the `Ingest` method: [`WireRequest`]s in, encoded
/// `IngestResponse`s (from a [`WireSink`]) out. The server itself frames `Ingest`
/// without tonic's codec machinery (`grpc::ingest_body`); this is for hosts that serve
/// or call the method through tonic with this crate's codec (the tests send raw
/// requests with its encoder).
#[derive(Debug, Clone, Copy, Default)]
pub struct WireCodec;

/// Decoder half of [`WireCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WireDecoder;

/// Encoder half of [`WireCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WireEncoder;

impl Codec for WireCodec {
    type Encode = Bytes;
    type Decode = WireRequest;
    type Encoder = WireEncoder;
    type Decoder = WireDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder
    }
}

/// Initial size of each stream's encode and decode buffers (tonic's default is 8 KiB
/// each). Devices hold streams open for days and send small messages: an idle stream
/// should cost little, and a buffer grows when a large message needs it. Outgoing
/// frames are still cut at tonic's 32 KiB yield threshold.
const STREAM_BUFFER: usize = 1024;

/// tonic's default: encoded responses are handed to HTTP/2 once this much is ready.
pub(crate) const YIELD_THRESHOLD: usize = 32 * 1024;

impl Encoder for WireEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
    }
}

impl Decoder for WireDecoder {
    type Item = WireRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WireRequest>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(WireRequest::decode(bytes)?))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tidewatch_proto::v1::{IngestRequest, IngestResponse, Verdict};

    use super::*;
    use crate::engine::{Engine, EngineConfig, tests::sample};

    fn decode(bytes: Vec<u8>) -> Result<WireRequest, WireError> {
        WireRequest::decode(Bytes::from(bytes))
    }

    /// Appends a raw field to `out`.
    fn raw_len(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
        put_key(out, field, LEN);
        put_varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    fn entry(key: &str, value: f64) -> Vec<u8> {
        let mut e = Vec::new();
        raw_len(&mut e, 1, key.as_bytes());
        put_key(&mut e, 2, I64);
        e.put_u64_le(value.to_bits());
        e
    }

    #[test]
    fn decodes_what_prost_encodes() {
        let request = IngestRequest {
            samples: vec![
                sample("dev-1", 7, &[("rps", 420.0), ("cpu", 55.5)]),
                Sample {
                    time: Some(Timestamp {
                        seconds: 1_710_000_000,
                        nanos: 123_456_789,
                    }),
                    ..sample("", 0, &[("b", -1.0), ("a", 0.0), ("c", f64::NAN)])
                },
            ],
            detector: Some(DetectorConfig {
                name: "robust".into(),
                window_size: 64,
                threshold: 3.5,
                min_samples: 10,
            }),
        };
        let wire = decode(request.encode_to_vec()).expect("decode");
        let samples = wire.to_samples();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0], request.samples[0]);
        assert_eq!(samples[1].time, request.samples[1].time);
        assert_eq!(
            samples[1].metrics.keys().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(samples[1].metrics["c"].is_nan());
        assert_eq!(wire.detector.as_deref(), request.detector.as_ref());
        let first = wire.samples().next().expect("a sample");
        assert_eq!(
            first.metrics().collect::<Vec<_>>(),
            [(&b"cpu"[..], 55.5), (&b"rps"[..], 420.0)],
            "ascending names, as the BTreeMap prost decodes into"
        );
    }

    #[test]
    fn a_reused_request_decodes_each_message_as_a_fresh_one() {
        let big = IngestRequest {
            samples: (0..40)
                .map(|i| {
                    sample(
                        &format!("d{i}"),
                        i,
                        &[("a", 1.0), ("b", f64::from(i as u32))],
                    )
                })
                .collect(),
            detector: Some(DetectorConfig {
                name: "robust".into(),
                ..DetectorConfig::default()
            }),
        };
        let small = IngestRequest {
            samples: vec![sample("x", 9, &[("m", 2.5)])],
            detector: None,
        };
        let mut reused = WireRequest::default();
        for request in [&small, &big, &small, &small, &big] {
            let bytes = Bytes::from(request.encode_to_vec());
            reused.decode_into(bytes.clone()).expect("decode");
            let fresh = WireRequest::decode(bytes).expect("decode");
            assert_eq!(reused.to_samples(), fresh.to_samples());
            assert_eq!(reused.to_samples(), request.samples);
            assert_eq!(reused.detector, fresh.detector);
            reused.reset();
            assert_eq!(reused.len(), 0);
            assert!(reused.buf.is_empty(), "no view into the frame is kept");
            assert!(
                reused.samples.capacity() <= KEEP_SAMPLES,
                "large vectors are dropped"
            );
        }
        // A message that fails leaves the request empty, and the next one decodes.
        let mut truncated = big.encode_to_vec();
        truncated.truncate(truncated.len() - 3);
        assert!(reused.decode_into(Bytes::from(truncated)).is_err());
        assert_eq!((reused.len(), reused.detector.is_none()), (0, true));
        reused
            .decode_into(Bytes::from(small.encode_to_vec()))
            .expect("decode");
        assert_eq!(reused.to_samples(), small.samples);
    }

    #[test]
    fn repeated_keys_keep_the_last_value_and_unknown_fields_are_skipped() {
        let mut s = Vec::new();
        raw_len(&mut s, 3, &entry("rps", 1.0));
        put_key(&mut s, 4, VARINT);
        put_varint(&mut s, 5);
        raw_len(&mut s, 1, b"first");
        raw_len(&mut s, 3, &entry("cpu", 2.0));
        raw_len(&mut s, 3, &entry("rps", 3.0));
        // Unknown fields of every wire type.
        put_key(&mut s, 99, VARINT);
        put_varint(&mut s, u64::MAX);
        put_key(&mut s, 98, I64);
        s.put_u64_le(1);
        put_key(&mut s, 97, I32);
        s.put_u32_le(1);
        raw_len(&mut s, 96, b"whatever");
        raw_len(&mut s, 1, b"dev");
        put_key(&mut s, 4, VARINT);
        put_varint(&mut s, 9);
        let mut r = Vec::new();
        raw_len(&mut r, 1, &s);
        put_key(&mut r, 15, VARINT);
        put_varint(&mut r, 1);

        let prost = IngestRequest::decode(r.as_slice()).expect("prost decodes it");
        let wire = decode(r).expect("decode");
        assert_eq!(wire.to_samples(), prost.samples);
        assert_eq!(
            wire.to_samples()[0],
            sample("dev", 9, &[("cpu", 2.0), ("rps", 3.0)])
        );
    }

    #[test]
    fn many_metrics_are_sorted_and_deduplicated_like_a_map() {
        // More than the insertion sort handles: names in descending order, each
        // sent twice (the second value counts).
        let mut s = Vec::new();
        for round in 0..2 {
            for i in (0..500).rev() {
                raw_len(
                    &mut s,
                    3,
                    &entry(&format!("m{i:03}"), f64::from(i + round * 1000)),
                );
            }
        }
        let mut r = Vec::new();
        raw_len(&mut r, 1, &s);
        let prost = IngestRequest::decode(r.as_slice()).expect("prost");
        let wire = decode(r).expect("decode");
        assert_eq!(wire.to_samples(), prost.samples);
        let first = wire.samples().next().expect("sample");
        assert_eq!(first.metric_count(), 500);
        assert_eq!(first.metrics().next(), Some((&b"m000"[..], 1000.0)));
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let good = IngestRequest {
            samples: vec![sample("d", 1, &[("m", 1.0)])],
            detector: None,
        }
        .encode_to_vec();
        for cut in 1..good.len() {
            assert!(
                decode(good[..cut].to_vec()).is_err(),
                "a request cut at byte {cut} decoded"
            );
        }
        // Device id that is not UTF-8.
        let mut s = Vec::new();
        raw_len(&mut s, 1, &[0xff, 0xfe]);
        let mut r = Vec::new();
        raw_len(&mut r, 1, &s);
        assert_eq!(
            decode(r.clone()).unwrap_err(),
            WireError::Utf8("Sample.device_id")
        );
        assert!(IngestRequest::decode(r.as_slice()).is_err(), "prost agrees");
        // A known field with the wrong wire type.
        let mut r = Vec::new();
        put_key(&mut r, 1, VARINT);
        put_varint(&mut r, 3);
        assert!(matches!(
            decode(r).unwrap_err(),
            WireError::FieldType { found: 0, .. }
        ));
        // A ten-byte varint whose last byte overflows 64 bits (prost refuses it too).
        let mut overflow = vec![0x20];
        overflow.extend([0x80; 9]);
        overflow.push(0x02);
        let mut r = Vec::new();
        raw_len(&mut r, 1, &overflow);
        assert!(IngestRequest::decode(r.as_slice()).is_err());
        assert_eq!(decode(r).unwrap_err(), WireError::Varint);
        // u64::MAX itself is fine.
        let mut max = vec![0x20];
        put_varint(&mut max, u64::MAX);
        let mut r = Vec::new();
        raw_len(&mut r, 1, &max);
        assert_eq!(
            decode(r)
                .expect("u64::MAX")
                .samples()
                .next()
                .map(|s| s.seq()),
            Some(u64::MAX)
        );
        // An overlong varint.
        assert_eq!(
            decode(vec![0x78; 1].into_iter().chain([0xff; 11]).collect()).unwrap_err(),
            WireError::Varint
        );
        let status = Status::from(WireError::Truncated);
        assert_eq!(status.code(), tonic::Code::Internal);
    }

    /// Judges `requests` on two engines, one writing prost verdicts and one writing
    /// wire bytes, and checks that prost decodes the bytes to the same verdicts.
    fn same_verdicts(requests: &[Vec<Sample>], spec: &str) {
        let config = EngineConfig {
            max_metrics_per_device: 3,
            max_devices: 5,
            ..EngineConfig::default()
        };
        let (a, b) = (Engine::new(config.clone()), Engine::new(config));
        let detector = a
            .detector(Some(&DetectorConfig {
                name: spec.into(),
                ..DetectorConfig::default()
            }))
            .expect("detector");
        let now = std::time::Instant::now();
        let mut sink = WireSink::new();
        for samples in requests {
            let mut expected: Vec<Verdict> = Vec::new();
            a.ingest_batch_at(samples, &detector, &mut expected, now);
            let wire = decode(
                IngestRequest {
                    samples: samples.clone(),
                    detector: None,
                }
                .encode_to_vec(),
            )
            .expect("decode");
            b.ingest_batch_at(wire.samples(), &detector, &mut sink, now);
            let got = IngestResponse::decode(sink.take()).expect("prost decodes the response");
            assert_eq!(got.verdicts.len(), samples.len());
            for (g, e) in got.verdicts.iter().zip(&expected) {
                // NaN != NaN: compare the encodings instead.
                assert_eq!(g.encode_to_vec(), e.encode_to_vec(), "{g:?} vs {e:?}");
            }
        }
    }

    #[test]
    fn wire_verdicts_equal_prost_verdicts() {
        let mut requests = Vec::new();
        for i in 0..120u64 {
            let v = 400.0 + (i % 7) as f64 * 3.0 + if i % 40 == 39 { 500.0 } else { 0.0 };
            requests.push(vec![
                sample(
                    &format!("dev-{}", i % 3),
                    i + 1,
                    &[("rps", v), ("cpu", v / 10.0)],
                ),
                sample("", 0, &[("x", -v)]),
            ]);
        }
        // Duplicates, per-sample errors of every kind, a new device over the limit.
        requests.push(vec![
            sample("dev-0", 1, &[("rps", 1.0)]),
            sample("dev-1", 0, &[]),
            sample("dev-1", 0, &[("bad name", 1.0)]),
            sample("dev-1", 0, &[("rps", f64::INFINITY)]),
            sample("dev-1", 0, &[("a", 1.0), ("b", 1.0), ("c", 1.0)]),
            sample(&"x".repeat(200), 0, &[("rps", 1.0)]),
            sample("new-1", 0, &[("rps", 1.0)]),
            sample("new-2", 0, &[("rps", 1.0)]),
            sample("new-3", 0, &[("rps", 1.0)]),
        ]);
        same_verdicts(&requests, "zscore");
        same_verdicts(&requests, "robust");
    }

    /// A generated sample: device id, seq, time, metrics.
    type RawParts = (String, u64, Option<(i64, i32)>, BTreeMap<String, f64>);

    #[test]
    fn verdicts_of_every_length_class_decode() {
        // 1-byte, 2-byte and 3-byte verdict lengths, each between other verdicts.
        let mut sink = WireSink::new();
        let outcome = MetricOutcome {
            value: 1.5,
            mean: 2.5,
            stddev: 0.5,
            z_score: -2.0,
            anomaly: true,
            window_count: 300,
            score: 0.75,
            alert: true,
        };
        let long = "m".repeat(120);
        let cases: [(&str, usize); 4] = [("a", 1), ("b", 3), (&long, 200), ("c", 0)];
        for (i, (name, metrics)) in cases.iter().enumerate() {
            sink.begin(format!("dev-{i}").as_bytes(), i as u64 + 1, *metrics);
            for k in 0..*metrics {
                sink.metric(format!("{name}{k}").as_bytes(), &outcome);
            }
            sink.end(true, false, 0.75);
        }
        sink.duplicate(b"", 9);
        sink.error(b"x", 0, &SampleError::NoMetrics);
        let response = IngestResponse::decode(sink.take()).expect("decodes");
        let v = &response.verdicts;
        assert_eq!(v.len(), 6);
        for (i, (name, metrics)) in cases.iter().enumerate() {
            assert_eq!(v[i].device_id, format!("dev-{i}"));
            assert_eq!(v[i].seq, i as u64 + 1);
            assert_eq!(v[i].metrics.len(), *metrics);
            assert!(v[i].anomaly && !v[i].alert && v[i].score == 0.75);
            for (k, m) in v[i].metrics.iter().enumerate() {
                assert_eq!(*m, outcome.to_proto(&format!("{name}{k}")));
            }
        }
        assert!(
            v[2].encoded_len() > 16_384,
            "the 3-byte length case is covered"
        );
        assert!(
            v[0].encoded_len() < 128,
            "the 1-byte length case is covered"
        );
        assert!((v[4].duplicate, v[4].seq, v[4].device_id.as_str()) == (true, 9, ""));
        assert!(v[5].error.starts_with("no_metrics"));
        assert!(sink.take().is_empty());
    }

    /// A request of one sample `dev` whose only field besides the id is one
    /// `metrics` entry with these raw bytes.
    fn one_entry(entry: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        raw_len(&mut s, 1, b"dev");
        raw_len(&mut s, 3, entry);
        let mut r = Vec::new();
        raw_len(&mut r, 1, &s);
        r
    }

    #[test]
    fn entries_off_the_canonical_shape_decode_as_prost_decodes_them() {
        let value = 2.5f64.to_bits().to_le_bytes();
        let long = "n".repeat(130);
        let mut cases: Vec<Vec<u8>> = vec![
            // The canonical shape itself, and with a multi-byte UTF-8 name.
            entry("cpu", 2.5),
            entry("température", 2.5),
            // Value before key.
            [&[0x11][..], &value, &[0x0A, 3], b"cpu"].concat(),
            // A two-byte name length.
            entry(&long, 2.5),
            // Unknown fields inside the entry, before, between and after.
            [&[0x18, 7, 0x0A, 3][..], b"cpu", &[0x11], &value].concat(),
            [&[0x0A, 3][..], b"cpu", &[0x25, 1, 2, 3, 4, 0x11], &value].concat(),
            [&[0x0A, 3][..], b"cpu", &[0x11], &value, &[0x18, 1]].concat(),
            // A repeated key or value inside the entry: the last wins.
            [&[0x0A, 3][..], b"abc", &[0x0A, 3], b"cpu", &[0x11], &value].concat(),
            [&[0x0A, 3][..], b"cpu", &[0x11], &[0; 8], &[0x11], &value].concat(),
            // Missing key, missing value, both missing.
            [&[0x11][..], &value].concat(),
            [&[0x0A, 3][..], b"cpu"].concat(),
            Vec::new(),
            // An empty key written out.
            [&[0x0A, 0, 0x11][..], &value].concat(),
            // A non-canonical (two-byte) encoding of a short name's length.
            [&[0x0A, 0x83, 0x00][..], b"cpu", &[0x11], &value].concat(),
        ];
        // The canonical length byte, but one byte short of or past the entry.
        let mut short = entry("cpu", 2.5);
        short.pop();
        cases.push(short);
        let mut past = entry("cpu", 2.5);
        past.push(0);
        cases.push(past);
        for (i, entry) in cases.iter().enumerate() {
            let r = one_entry(entry);
            let prost = IngestRequest::decode(r.as_slice());
            let ours = decode(r);
            match (ours, prost) {
                (Ok(ours), Ok(prost)) => assert_eq!(ours.to_samples(), prost.samples, "case {i}"),
                (Err(_), Err(_)) => {}
                (ours, prost) => panic!("case {i}: {ours:?} vs {prost:?}"),
            }
        }
    }

    #[test]
    fn entries_of_the_canonical_shape_with_bad_contents_are_the_same_errors() {
        let value = 2.5f64.to_bits().to_le_bytes();
        // A name that is not UTF-8.
        let r = one_entry(&[&[0x0A, 2][..], &[0xff, 0xfe], &[0x11], &value].concat());
        assert_eq!(
            decode(r).unwrap_err(),
            WireError::Utf8("Sample.metrics key")
        );
        // The value with another wire type, the length of a fixed64 entry.
        let r = one_entry(&[&[0x0A, 3][..], b"cpu", &[0x10], &value].concat());
        assert!(matches!(
            decode(r).unwrap_err(),
            WireError::FieldType {
                field: "Sample.metrics value",
                found: VARINT
            }
        ));
    }

    #[test]
    fn names_in_any_order_read_as_a_map() {
        let orders: [&[(&str, f64)]; 6] = [
            &[("cpu", 1.0), ("rps", 2.0)],
            &[("rps", 2.0), ("cpu", 1.0)],
            &[("cpu", 1.0), ("cpu", 3.0)],
            &[("c", 1.0), ("b", 2.0), ("a", 3.0)],
            &[("a", 1.0), ("b", 2.0), ("a", 3.0), ("b", 4.0)],
            &[("a", 1.0), ("ab", 2.0), ("a", 3.0), ("b", 4.0), ("b", 5.0)],
        ];
        for order in orders {
            let mut s = Vec::new();
            raw_len(&mut s, 1, b"dev");
            for (name, value) in order {
                raw_len(&mut s, 3, &entry(name, *value));
            }
            let mut r = Vec::new();
            raw_len(&mut r, 1, &s);
            // And a second sample, so that the first one's metrics are not the last.
            r.extend_from_slice(&r.clone());
            let prost = IngestRequest::decode(r.as_slice()).expect("prost");
            let wire = decode(r).expect("decode");
            assert_eq!(wire.to_samples(), prost.samples, "{order:?}");
            for sample in wire.samples() {
                let names: Vec<_> = sample.metrics().map(|(n, _)| n).collect();
                assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
                assert_eq!(sample.metric_count(), names.len());
            }
        }
    }

    #[test]
    fn samples_on_and_off_the_canonical_shape_decode_as_prost_decodes_them() {
        let metrics = |names: &[&str]| -> Vec<u8> {
            let mut s = Vec::new();
            for (i, name) in names.iter().enumerate() {
                raw_len(&mut s, 3, &entry(name, i as f64 + 1.5));
            }
            s
        };
        let seq = |v: u64| -> Vec<u8> {
            let mut s = vec![0x20];
            put_varint(&mut s, v);
            s
        };
        let id = |id: &[u8]| -> Vec<u8> {
            let mut s = Vec::new();
            raw_len(&mut s, 1, id);
            s
        };
        let cases: Vec<Vec<u8>> = vec![
            // The canonical shape, with and without an id and a seq.
            [id(b"dev-1"), metrics(&["cpu", "rps"]), seq(7)].concat(),
            metrics(&["cpu", "rps"]),
            [id(b"dev-1"), metrics(&["cpu"])].concat(),
            [id(b""), metrics(&["cpu"]), seq(0)].concat(),
            [id(b"dev-1"), metrics(&["cpu", "rps"]), seq(300), seq(5)].concat(),
            [id(b"dev-1"), seq(u64::MAX)].concat(),
            // Names whose first 8 bytes tell the order, and names they do not:
            // prefixes, equal 8-byte heads, a name with a zero byte.
            [
                id(b"d"),
                metrics(&["a", "ab", "abcdefgh", "abcdefghi", "b"]),
            ]
            .concat(),
            [id(b"d"), metrics(&["abcdefghz", "abcdefgha"])].concat(),
            [id(b"d"), metrics(&["ab\0", "ab"])].concat(),
            [id(b"d"), metrics(&["ab", "ab\0"])].concat(),
            [id(b"d"), metrics(&["zz", "a"])].concat(),
            [id(b"d"), metrics(&["cpu", "cpu"])].concat(),
            // Off the shape: the id after the metrics or twice, a time, a non-ASCII
            // id, an unknown field, a seq before the metrics.
            [metrics(&["cpu"]), id(b"dev-1")].concat(),
            [id(b"dev-1"), id(b"dev-2"), metrics(&["cpu"])].concat(),
            [id(b"dev-1"), vec![0x12, 2, 0x08, 5], metrics(&["cpu"])].concat(),
            [id("capteur-é".as_bytes()), metrics(&["cpu"])].concat(),
            [id(b"dev-1"), metrics(&["cpu"]), vec![0x28, 1]].concat(),
            [id(b"dev-1"), seq(3), metrics(&["cpu"])].concat(),
            // Broken: a truncated seq, an id that is not UTF-8, an id past the end.
            [id(b"dev-1"), metrics(&["cpu"]), vec![0x20, 0x80]].concat(),
            [id(&[0xff, 0xfe]), metrics(&["cpu"])].concat(),
            vec![0x0A, 9, b'd'],
        ];
        for (i, sample) in cases.iter().enumerate() {
            let mut r = Vec::new();
            raw_len(&mut r, 1, sample);
            // A second copy, so that the first sample's metrics are not the last.
            r.extend_from_slice(&r.clone());
            let prost = IngestRequest::decode(r.as_slice());
            match (decode(r), prost) {
                (Ok(ours), Ok(prost)) => {
                    assert_eq!(ours.to_samples(), prost.samples, "case {i}");
                    // What the engine reads: each name once, ascending.
                    for (sample, theirs) in ours.samples().zip(&prost.samples) {
                        let names: Vec<_> = sample.metrics().map(|(n, _)| n).collect();
                        assert!(names.windows(2).all(|w| w[0] < w[1]), "case {i}");
                        assert_eq!(sample.metric_count(), theirs.metrics.len(), "case {i}");
                    }
                }
                (Err(_), Err(_)) => {}
                (ours, prost) => panic!("case {i}: {ours:?} vs {prost:?}"),
            }
        }
    }

    fn outcome(value: f64, window_count: u32, flags: bool) -> MetricOutcome {
        MetricOutcome {
            value,
            mean: value / 2.0,
            stddev: if flags { 0.0 } else { 1.5 },
            z_score: -value,
            anomaly: flags,
            window_count,
            score: if flags { 0.5 } else { 0.0 },
            alert: flags,
        }
    }

    #[test]
    fn each_verdict_is_written_the_same_whatever_came_before() {
        // Verdicts whose lengths take 1, 2 and 3 bytes, each after each (so the
        // length slot is guessed short, right and long), and duplicates and errors
        // in between; long device ids and names take the field-by-field path.
        let long_name = "m".repeat(SHORT + 1);
        let long_id = "d".repeat(SHORT + 1);
        type Write = Box<dyn Fn(&mut dyn VerdictSink)>;
        let judged = |id: String, name: String, metrics: usize| -> Write {
            Box::new(move |sink: &mut dyn VerdictSink| {
                sink.begin(id.as_bytes(), metrics as u64, metrics);
                for k in 0..metrics {
                    let m = outcome(k as f64, k as u32 * 100, k.is_multiple_of(3));
                    sink.metric(format!("{name}{k}").as_bytes(), &m);
                }
                sink.end(metrics.is_multiple_of(2), metrics.is_multiple_of(3), 0.25);
            })
        };
        let kinds: Vec<Write> = vec![
            judged("a".into(), String::new(), 1),
            judged(String::new(), "x".into(), 0),
            judged("dev-1".into(), "cpu".into(), 2),
            judged("dev-2".into(), "c".into(), 4),
            judged("dev-3".into(), "metric".into(), 400),
            judged(long_id.clone(), long_name.clone(), 2),
            judged("dev-4".into(), long_name, 1),
            Box::new(|sink: &mut dyn VerdictSink| sink.duplicate(b"dev-5", 3)),
            Box::new(move |sink: &mut dyn VerdictSink| {
                sink.duplicate(long_id.as_bytes(), u64::MAX)
            }),
            Box::new(|sink: &mut dyn VerdictSink| sink.error(b"e", 0, &SampleError::NoMetrics)),
        ];
        let alone: Vec<Bytes> = kinds
            .iter()
            .map(|write| {
                let mut sink = WireSink::new();
                write(&mut sink);
                sink.take()
            })
            .collect();
        // Bytes of each verdict's length: every class is there.
        let classes: Vec<usize> = alone
            .iter()
            .map(|b| 1 + b[1..].iter().take_while(|&&byte| byte >= 0x80).count())
            .collect();
        assert!([1, 2, 3].iter().all(|n| classes.contains(n)), "{classes:?}");
        let mut sink = WireSink::new();
        let mut expected = Vec::new();
        for i in 0..kinds.len() {
            for j in 0..kinds.len() {
                kinds[i](&mut sink);
                kinds[j](&mut sink);
                expected.extend_from_slice(&alone[i]);
                expected.extend_from_slice(&alone[j]);
            }
        }
        assert_eq!(sink.take(), expected);
        // And each alone is what prost reads as the verdict written.
        for (write, bytes) in kinds.iter().zip(&alone) {
            let mut verdicts: Vec<Verdict> = Vec::new();
            write(&mut verdicts);
            let response = IngestResponse::decode(bytes.clone()).expect("decodes");
            assert_eq!(response.verdicts, verdicts);
        }
    }

    proptest! {
        #[test]
        fn any_request_decodes_as_prost_decodes_it(
            samples in prop::collection::vec(
                (
                    "[a-z]{0,12}",
                    any::<u64>(),
                    prop::option::of((any::<i64>(), any::<i32>())),
                    prop::collection::btree_map("[a-z_]{0,6}", any::<f64>(), 0..5),
                ),
                0..6,
            )
        ) {
            let request = IngestRequest {
                samples: samples
                    .into_iter()
                    .map(|(device_id, seq, time, metrics): RawParts| Sample {
                        device_id,
                        seq,
                        time: time.map(|(seconds, nanos)| Timestamp { seconds, nanos }),
                        metrics,
                    })
                    .collect(),
                detector: None,
            };
            let wire = decode(request.encode_to_vec()).expect("decode");
            prop_assert_eq!(
                IngestRequest { samples: wire.to_samples(), detector: None }.encode_to_vec(),
                request.encode_to_vec()
            );
        }

        #[test]
        fn mutated_requests_decode_as_prost_decodes_them(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)
        ) {
            // A real request with a few bytes replaced, inserted or removed: mostly
            // still well-framed, so the nested decoders get exercised, not just the
            // first key.
            let mut bytes = IngestRequest {
                samples: vec![
                    sample("dev-1", 7, &[("rps", 420.0), ("cpu", 55.5)]),
                    Sample {
                        time: Some(Timestamp { seconds: 1_710_000_000, nanos: 5 }),
                        ..sample("dev-2", 300, &[("temp", -1.0)])
                    },
                ],
                detector: Some(DetectorConfig { name: "zscore".into(), ..DetectorConfig::default() }),
            }
            .encode_to_vec();
            for (at, byte, op) in edits {
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => {
                        bytes.remove(i);
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let ours = decode(bytes.clone());
            let prost = IngestRequest::decode(bytes.as_slice());
            match (&ours, &prost) {
                (Ok(ours), Ok(prost)) => {
                    prop_assert_eq!(
                        IngestRequest { samples: ours.to_samples(), detector: None }.encode_to_vec(),
                        IngestRequest { samples: prost.samples.clone(), detector: None }.encode_to_vec()
                    );
                    prop_assert_eq!(ours.detector.as_deref(), prost.detector.as_ref());
                }
                (Ok(ours), Err(e)) => prop_assert!(false, "we accepted what prost refuses ({}): {:?}", e, ours),
                // We refuse groups (wire types 3 and 4), which prost skips, and a map
                // entry without the length-delimited wire type, which prost reads
                // anyway (its map decoder does not check the field's wire type and
                // takes whatever varint follows as the entry's length).
                (Err(e), Ok(_)) => prop_assert!(
                    matches!(
                        e,
                        WireError::WireType(3 | 4)
                            | WireError::FieldType { field: "Sample.metrics", .. }
                    ),
                    "we refused what prost accepts: {}", e
                ),
                (Err(_), Err(_)) => {}
            }
        }

        #[test]
        fn metrics_in_a_window_are_the_bytes_written_field_by_field(
            name in "[a-z_]{0,64}",
            doubles in prop::array::uniform5(prop_oneof![
                Just(0.0),
                Just(-0.0),
                Just(f64::NAN),
                any::<f64>(),
            ]),
            window_count in prop_oneof![Just(0u32), 1u32..200, any::<u32>()],
            anomaly in any::<bool>(),
            alert in any::<bool>(),
        ) {
            let [value, mean, stddev, z_score, score] = doubles;
            let m = MetricOutcome { value, mean, stddev, z_score, anomaly, window_count, score, alert };
            let (mut window, mut fields) = (WireSink::new(), WireSink::new());
            window.metric(name.as_bytes(), &m);
            fields.long_metric(name.as_bytes(), &m);
            prop_assert_eq!(window.take(), fields.take());
        }

        #[test]
        fn heads_in_a_window_are_the_bytes_written_field_by_field(
            // Every length the window's short copy tells apart, and multi-byte UTF-8.
            device_id in "[a-zé0-9-]{0,32}|[a-z0-9-]{33,64}",
            seq in prop_oneof![Just(0u64), 1u64..300, any::<u64>()],
            slot in 1..=MAX_SLOT,
        ) {
            prop_assume!(device_id.len() <= SHORT);
            let (mut window, mut fields) = (WireSink::new(), WireSink::new());
            window.open(device_id.as_bytes(), seq, slot);
            fields.long_head(device_id.as_bytes(), seq, slot);
            prop_assert_eq!(window.take(), fields.take());
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let ours = decode(bytes.clone());
            let prost = IngestRequest::decode(bytes.as_slice());
            // Whatever prost accepts we accept with the same samples; groups and
            // other wire types prost skips we may refuse.
            if let (Ok(ours), Ok(prost)) = (&ours, &prost) {
                prop_assert_eq!(ours.to_samples(), prost.samples.clone());
            }
            if let Ok(ours) = &ours {
                prop_assert!(prost.is_ok(), "we accepted what prost refuses: {:?}", ours);
            }
        }
    }
}
