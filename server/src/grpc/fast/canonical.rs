//! The canonical fast decode: a sample in the exact shape prost writes it (what
//! devices send) is read without the field loop. Anything off that shape falls back
//! to [`WireRequest::decode_sample`], which reads every shape with every check, so
//! the shortcut decides speed only, never what a request means.

use std::ops::Range;

use super::decode::{RawMetric, RawSample, Reader, WireRequest};

#[cfg(test)]
mod tests;

impl WireRequest {
    /// Reads a sample in the shape prost writes it, without the field loop: an ASCII
    /// device id (field 1) and the metrics (field 3, each a [`canonical_entry`]) in
    /// ascending name order, then `seq` (field 4); one-byte lengths, no `time`. That
    /// is what devices send, and it skips a key dispatch per field and the separate
    /// pass that checks the names' order. `false` (nothing kept) for any other shape:
    /// [`WireRequest::decode_sample`] reads it then, with every check.
    #[inline]
    pub(super) fn canonical_sample(&mut self, buf: &[u8], range: Range<usize>) -> bool {
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
            let mut reader = Reader::at(s, pos + 1);
            sample.seq = reader.varint().ok()?;
            pos = reader.pos;
        }
        if pos != s.len() {
            return None;
        }
        sample.metrics = first_metric as u32..self.metrics.len() as u32;
        Some(sample)
    }
}

/// A `map<string, double>` entry in the shape prost writes for an ASCII name of 1 to
/// 127 bytes and a non-zero value, `0x0A len name 0x11 <8 bytes>`, read without the
/// field loop; `None` for any other shape, which the field loop reads.
#[inline]
pub(super) fn canonical_entry(buf: &[u8], range: Range<usize>) -> Option<RawMetric> {
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
