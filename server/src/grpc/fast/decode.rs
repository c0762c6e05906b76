//! `IngestRequest` decoding without prost's allocations. prost decodes each `Sample`
//! into a heap `String` device id and a `BTreeMap<String, f64>` (three allocations and
//! a tree insert per two-metric sample); at a million samples per second that is most
//! of the time. [`WireRequest`] reads the request as views into the received buffer
//! instead (no allocation for the usual request of one sample with up to 4 metrics),
//! and the engine reads its samples through [`SampleLike`].
//!
//! It reads exactly what prost reads for `proto/tidewatch/v1/telemetry.proto`, and
//! fails where prost fails with prost's text (see the contract in [`super`]): it
//! walks the fields in prost's order, bounds-checks every length against the whole
//! message as prost does (a field may run past the end of the sub-message that holds
//! it, which is then "delimited length exceeded"), and pushes the same
//! `Message.field` names on the way out.

use std::ops::Range;

use bytes::Bytes;
use prost::encoding::{DecodeContext, WireType};
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{DetectorConfig, Sample},
};
use tonic::Status;

use super::{EGROUP, I32, I64, LEN, SGROUP, VARINT, canonical::canonical_entry};
use crate::engine::{SampleLike, text};

#[cfg(test)]
mod tests;

/// Why a request is not a valid `IngestRequest`. Its text is prost's `DecodeError`
/// text for the same bytes: "failed to decode Protobuf message: ", the fields from
/// the innermost out, the description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(Box<ErrorInner>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum ErrorInner {
    /// Found by this decoder.
    Own {
        kind: WireErrorKind,
        /// `(message, field)` pairs, innermost first, as prost pushes them.
        stack: Vec<(&'static str, &'static str)>,
    },
    /// Found by prost itself (the `detector` section, which prost decodes).
    Prost(prost::DecodeError),
}

/// What is wrong, in prost's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireErrorKind {
    /// A length or fixed-size field runs past the end of the message.
    #[error("buffer underflow")]
    BufferUnderflow,
    /// A field runs past the end of the sub-message that holds it.
    #[error("delimited length exceeded")]
    DelimitedLengthExceeded,
    /// A varint longer than 10 bytes, beyond 64 bits, or cut off.
    #[error("invalid varint")]
    Varint,
    /// Wire type 6 or 7.
    #[error("invalid wire type value: {0}")]
    WireTypeValue(u64),
    /// A key beyond 32 bits.
    #[error("invalid key value: {0}")]
    Key(u64),
    /// Field number 0.
    #[error("invalid tag value: 0")]
    FieldZero,
    /// A string is not UTF-8.
    #[error("invalid string value: data is not UTF-8 encoded")]
    Utf8,
    /// A known field with another wire type than its own.
    #[error("invalid wire type: {} (expected {})", wire_type_name(*found), wire_type_name(*expected))]
    WireType {
        /// The wire type found.
        found: u64,
        /// The field's wire type.
        expected: u64,
    },
    /// An end-group tag without its start, or for another field.
    #[error("unexpected end group tag")]
    EndGroup,
    /// Groups nested deeper than prost's recursion limit.
    #[error("recursion limit reached")]
    RecursionLimit,
    /// A message of 4 GiB or more (ranges into it are `u32`).
    #[error("message of 4 GiB or more")]
    TooLong,
}

/// prost's name of a wire type (`WireType`'s `Debug`).
fn wire_type_name(wire_type: u64) -> &'static str {
    match wire_type {
        VARINT => "Varint",
        I64 => "SixtyFourBit",
        LEN => "LengthDelimited",
        SGROUP => "StartGroup",
        EGROUP => "EndGroup",
        _ => "ThirtyTwoBit",
    }
}

impl WireError {
    #[cold]
    fn new(kind: WireErrorKind) -> Self {
        Self(Box::new(ErrorInner::Own {
            kind,
            stack: Vec::new(),
        }))
    }

    /// Adds the field that held the failing bytes, as prost's generated code does on
    /// the way out of each known field.
    #[cold]
    fn at(mut self, message: &'static str, field: &'static str) -> Self {
        match &mut *self.0 {
            ErrorInner::Own { stack, .. } => stack.push((message, field)),
            ErrorInner::Prost(e) => e.push(message, field),
        }
        self
    }

    /// What is wrong; `None` for an error prost found in the `detector` section.
    pub fn kind(&self) -> Option<WireErrorKind> {
        match &*self.0 {
            ErrorInner::Own { kind, .. } => Some(*kind),
            ErrorInner::Prost(_) => None,
        }
    }

    /// The innermost field that held the failing bytes, as `(message, field)`.
    pub fn field(&self) -> Option<(&'static str, &'static str)> {
        match &*self.0 {
            ErrorInner::Own { stack, .. } => stack.first().copied(),
            ErrorInner::Prost(_) => None,
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            ErrorInner::Own { kind, stack } => {
                f.write_str("failed to decode Protobuf message: ")?;
                for (message, field) in stack {
                    write!(f, "{message}.{field}: ")?;
                }
                write!(f, "{kind}")
            }
            ErrorInner::Prost(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WireError {}

impl From<WireErrorKind> for WireError {
    #[cold]
    fn from(kind: WireErrorKind) -> Self {
        Self::new(kind)
    }
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Self {
        // As tonic-prost reports a prost decode error.
        Status::internal(e.to_string())
    }
}

/// prost's recursion budget at the top of a message it decodes: each nested message,
/// map entry or group takes one, and skipping a field with none left fails.
const RECURSION_LIMIT: u32 = 100;

/// Samples reserved up front at most (a guess from the first sample's size must not
/// let a small first sample in a large request allocate far more than the request).
const RESERVE_SAMPLES: usize = 4096;

/// Metrics of one sample up to which an insertion sort orders them.
const INSERTION_SORT_MAX: usize = 16;

/// A cursor over the fields of a message, or of a sub-message inside it.
pub(super) struct Reader<'a> {
    /// The whole message: lengths are checked against its end, as prost checks them
    /// against the end of the buffer it decodes.
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    /// Where the (sub-)message being read ends.
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    /// A reader at `pos` of `buf` (for the canonical path's `seq`).
    pub(super) fn at(buf: &'a [u8], pos: usize) -> Self {
        Self {
            buf,
            pos,
            end: buf.len(),
        }
    }

    fn done(&self) -> bool {
        self.pos >= self.end
    }

    /// prost's check once a sub-message's fields are read: the last one must end
    /// where the sub-message does.
    fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.end {
            Ok(())
        } else {
            Err(WireErrorKind::DelimitedLengthExceeded.into())
        }
    }

    #[inline(always)]
    pub(super) fn varint(&mut self) -> Result<u64, WireError> {
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
            let byte = *self.buf.get(self.pos).ok_or(WireErrorKind::Varint)?;
            self.pos += 1;
            if shift == 9 && byte > 1 {
                // The tenth byte holds bit 63 only: more would overflow 64 bits.
                return Err(WireErrorKind::Varint.into());
            }
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(WireErrorKind::Varint.into())
    }

    /// The next key as (field number, wire type), checked in prost's order.
    #[inline]
    fn key(&mut self) -> Result<(u64, u64), WireError> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(WireErrorKind::Key(key).into());
        }
        let wire_type = key & 7;
        if wire_type > I32 {
            return Err(WireErrorKind::WireTypeValue(wire_type).into());
        }
        let field = key >> 3;
        if field == 0 {
            return Err(WireErrorKind::FieldZero.into());
        }
        Ok((field, wire_type))
    }

    /// A length-delimited field's range in the buffer.
    #[inline]
    fn len_delimited(&mut self) -> Result<Range<usize>, WireError> {
        let len = self.varint()?;
        let start = self.pos;
        if len > (self.buf.len() - start) as u64 {
            return Err(WireErrorKind::BufferUnderflow.into());
        }
        self.pos = start + len as usize;
        Ok(start..self.pos)
    }

    #[inline]
    fn fixed64(&mut self) -> Result<u64, WireError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos + 8)
            .ok_or(WireErrorKind::BufferUnderflow)?;
        self.pos += 8;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// Skips a field this message does not know, as prost's `skip_field` does: a
    /// group is skipped up to the end-group tag of its own number, with one unit of
    /// `depth` (the recursion budget left) per level of nesting.
    fn skip(&mut self, wire_type: u64, field: u64, depth: u32) -> Result<(), WireError> {
        if depth == 0 {
            return Err(WireErrorKind::RecursionLimit.into());
        }
        match wire_type {
            VARINT => self.varint().map(drop),
            I64 => self.fixed64().map(drop),
            LEN => self.len_delimited().map(drop),
            I32 => {
                if self.pos + 4 > self.buf.len() {
                    return Err(WireErrorKind::BufferUnderflow.into());
                }
                self.pos += 4;
                Ok(())
            }
            SGROUP => loop {
                let (inner, inner_type) = self.key()?;
                if inner_type == EGROUP {
                    if inner != field {
                        return Err(WireErrorKind::EndGroup.into());
                    }
                    return Ok(());
                }
                self.skip(inner_type, inner, depth - 1)?;
            },
            _ => Err(WireErrorKind::EndGroup.into()),
        }
    }

    /// A reader over `range` of the same buffer, with positions in it.
    fn sub(&self, range: Range<usize>) -> Reader<'a> {
        Reader {
            buf: self.buf,
            pos: range.start,
            end: range.end,
        }
    }
}

/// prost's wire type check of a known field.
#[inline]
fn expect(found: u64, wanted: u64) -> Result<(), WireError> {
    if found == wanted {
        Ok(())
    } else {
        Err(WireErrorKind::WireType {
            found,
            expected: wanted,
        }
        .into())
    }
}

/// A sample's place in the request buffer.
#[derive(Debug, Clone)]
pub(super) struct RawSample {
    pub(super) device_id: Range<u32>,
    pub(super) seq: u64,
    pub(super) time: Option<Timestamp>,
    /// Range of `WireRequest::metrics`: sorted by name, one entry per name.
    pub(super) metrics: Range<u32>,
}

/// One metric: the name's range in the buffer and the value.
#[derive(Debug, Clone)]
pub(super) struct RawMetric {
    pub(super) name: Range<u32>,
    pub(super) value: f64,
}

/// Samples whose vectors a reused [`WireRequest`] keeps between messages.
const KEEP_SAMPLES: usize = 16;

/// A decoded `IngestRequest` that borrows every string from the received bytes.
#[derive(Debug, Clone, Default)]
pub struct WireRequest {
    buf: Bytes,
    /// Plain vectors: a stream reuses its request, so they are allocated once, and a
    /// push into a `Vec` is cheaper than into a `SmallVec` (no inline-or-heap branch).
    pub(super) samples: Vec<RawSample>,
    pub(super) metrics: Vec<RawMetric>,
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
            return Err(WireErrorKind::TooLong.into());
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
                    let range = expect(wire_type, LEN)
                        .and_then(|()| reader.len_delimited())
                        .map_err(|e| e.at("IngestRequest", "samples"))?;
                    if request.samples.is_empty() {
                        // Size the vectors once from the first sample: the samples of
                        // a request are usually alike.
                        let per_sample = range.len() + 2;
                        let samples = (bytes.len() - reader.pos + per_sample) / per_sample;
                        request.samples.reserve_exact(samples.min(RESERVE_SAMPLES));
                    }
                    let before = request.metrics.len();
                    if !request.canonical_sample(bytes, range.clone()) {
                        request
                            .decode_sample(reader.sub(range))
                            .map_err(|e| e.at("IngestRequest", "samples"))?;
                    }
                    if request.samples.len() == 1 {
                        let metrics = request.metrics.len() - before;
                        let more = metrics * (request.samples.capacity() - 1);
                        request.metrics.reserve_exact(more.min(2 * RESERVE_SAMPLES));
                    }
                }
                2 => reader.pos += request.merge_detector(&bytes[reader.pos..], wire_type)?,
                _ => reader.skip(wire_type, field, RECURSION_LIMIT)?,
            }
        }
        Ok(())
    }

    /// Merges a `detector` field whose value starts `rest` into the request's, with
    /// prost itself (few requests have one); the bytes it took.
    #[cold]
    fn merge_detector(&mut self, rest: &[u8], wire_type: u64) -> Result<usize, WireError> {
        let mut buf = rest;
        let wire_type = WireType::try_from(wire_type).expect("checked by `key`");
        prost::encoding::message::merge(
            wire_type,
            self.detector.get_or_insert_default().as_mut(),
            &mut buf,
            DecodeContext::default(),
        )
        .map_err(|mut e| {
            e.push("IngestRequest", "detector");
            WireError(Box::new(ErrorInner::Prost(e)))
        })?;
        Ok(rest.len() - buf.len())
    }

    /// Reads a sample field by field, with every check (the canonical path in
    /// [`super::canonical`] takes the usual shape without them).
    pub(super) fn decode_sample(&mut self, mut reader: Reader<'_>) -> Result<(), WireError> {
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
                    let range = expect(wire_type, LEN)
                        .and_then(|()| reader.len_delimited())
                        .and_then(|range| utf8(&reader.buf[range.clone()]).map(|()| range))
                        .map_err(|e| e.at("Sample", "device_id"))?;
                    sample.device_id = range.start as u32..range.end as u32;
                }
                2 => {
                    let time = sample.time.get_or_insert_with(Timestamp::default);
                    expect(wire_type, LEN)
                        .and_then(|()| reader.len_delimited())
                        .and_then(|range| merge_timestamp(time, reader.sub(range)))
                        .map_err(|e| e.at("Sample", "time"))?;
                }
                3 => {
                    // prost's map decoder does not check the field's wire type (it
                    // reads whatever varint follows as the entry's length); this one
                    // refuses another wire type (see the contract).
                    let metric = expect(wire_type, LEN)
                        .and_then(|()| reader.len_delimited())
                        .and_then(|range| match canonical_entry(reader.buf, range.clone()) {
                            Some(metric) => Ok(metric),
                            None => decode_entry(reader.sub(range)),
                        })
                        .map_err(|e| e.at("Sample", "metrics"))?;
                    self.metrics.push(metric);
                }
                4 => {
                    sample.seq = expect(wire_type, VARINT)
                        .and_then(|()| reader.varint())
                        .map_err(|e| e.at("Sample", "seq"))?;
                }
                _ => reader.skip(wire_type, field, RECURSION_LIMIT - 1)?,
            }
        }
        reader.finish()?;
        // Map semantics: ascending names (as the BTreeMap prost decodes into), and a
        // repeated key keeps its last value. Both sorts are stable (equal names stay in
        // arrival order). Samples usually carry a handful of metrics, for which an
        // insertion sort is the fastest; a message with thousands (refused later as
        // `too_many_metrics`, but decoded first) must not cost quadratic time.
        // The names' ranges index the reader's buffer, the whole request.
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

fn utf8(bytes: &[u8]) -> Result<(), WireError> {
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(WireErrorKind::Utf8.into())
    }
}

/// A `google.protobuf.Timestamp`, merged into `time` as prost merges it.
fn merge_timestamp(time: &mut Timestamp, mut reader: Reader<'_>) -> Result<(), WireError> {
    while !reader.done() {
        let (field, wire_type) = reader.key()?;
        match field {
            1 => {
                time.seconds = expect(wire_type, VARINT)
                    .and_then(|()| reader.varint())
                    .map_err(|e| e.at("Timestamp", "seconds"))?
                    as i64;
            }
            2 => {
                time.nanos = expect(wire_type, VARINT)
                    .and_then(|()| reader.varint())
                    .map_err(|e| e.at("Timestamp", "nanos"))? as i32;
            }
            _ => reader.skip(wire_type, field, RECURSION_LIMIT - 2)?,
        }
    }
    reader.finish()
}

/// One `map<string, double>` entry; a missing key or value is the default. prost
/// pushes no field names inside an entry.
fn decode_entry(mut reader: Reader<'_>) -> Result<RawMetric, WireError> {
    let mut metric = RawMetric {
        name: 0..0,
        value: 0.0,
    };
    while !reader.done() {
        let (field, wire_type) = reader.key()?;
        match field {
            1 => {
                expect(wire_type, LEN)?;
                let range = reader.len_delimited()?;
                utf8(&reader.buf[range.clone()])?;
                metric.name = range.start as u32..range.end as u32;
            }
            2 => {
                expect(wire_type, I64)?;
                metric.value = f64::from_bits(reader.fixed64()?);
            }
            _ => reader.skip(wire_type, field, RECURSION_LIMIT - 2)?,
        }
    }
    reader.finish()?;
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
