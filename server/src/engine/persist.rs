//! Writing the snapshot message (`tidewatch.v1.DeviceSnapshot`, see
//! `proto/tidewatch/v1/snapshot.proto`) straight from the engine's memory, and the
//! error of a message holding a state the engine cannot have produced.
//!
//! The flusher writes every dirty device once a second: building the generated message
//! first would copy every window into a fresh `Vec`. So each part of a device writes
//! its own fields here, in field-number order, leaving out what proto3 leaves out, which
//! gives exactly the bytes prost writes for the same message (tests in `device.rs`
//! check it). Restore goes the other way through the generated code.
//!
//! Every field number used is below 16, so a field's key is one byte.

use prost::encoding::{encode_varint, encoded_len_varint};

/// A snapshot message holding a value the engine cannot have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot field {field} is invalid: {reason}")]
pub struct StateError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl StateError {
    /// A field holding `value`, which the engine never writes there.
    pub(crate) fn unexpected(field: &'static str, value: impl std::fmt::Display) -> Self {
        Self {
            field,
            reason: format!("unexpected value {value}"),
        }
    }

    /// A field that must not be empty.
    pub(crate) fn empty(field: &'static str) -> Self {
        Self {
            field,
            reason: "empty".into(),
        }
    }
}

/// `v`, if it is finite (window values and sums always are).
pub(crate) fn finite(v: f64, field: &'static str) -> Result<f64, StateError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(StateError {
            field,
            reason: format!("{v} is not finite"),
        })
    }
}

/// Wire type of varints.
const VARINT: u8 = 0;
/// Wire type of 64-bit fields.
const FIXED64: u8 = 1;
/// Wire type of length-delimited fields.
const LEN: u8 = 2;

#[inline]
fn key(out: &mut Vec<u8>, tag: u8, wire_type: u8) {
    debug_assert!(tag < 16);
    out.push((tag << 3) | wire_type);
}

/// A `uint64`/`uint32`/`int64`/`int32` field (as a `u64`: negative `int32` values are
/// sign-extended, as protobuf says). Left out when zero.
#[inline]
pub(crate) fn varint(out: &mut Vec<u8>, tag: u8, v: u64) {
    if v != 0 {
        key(out, tag, VARINT);
        encode_varint(v, out);
    }
}

/// Length of [`varint`].
#[inline]
pub(crate) fn varint_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + encoded_len_varint(v) }
}

/// A `bool` field; left out when false.
#[inline]
pub(crate) fn boolean(out: &mut Vec<u8>, tag: u8, v: bool) {
    if v {
        key(out, tag, VARINT);
        out.push(1);
    }
}

/// Length of [`boolean`].
#[inline]
pub(crate) fn boolean_len(v: bool) -> usize {
    if v { 2 } else { 0 }
}

/// An `optional double` field, always written (bit for bit: a negative zero stays one).
#[inline]
pub(crate) fn double(out: &mut Vec<u8>, tag: u8, v: f64) {
    key(out, tag, FIXED64);
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

/// Length of [`double`].
pub(crate) const DOUBLE_LEN: usize = 9;

/// A `string` field; left out when empty.
#[inline]
pub(crate) fn string(out: &mut Vec<u8>, tag: u8, s: &str) {
    if !s.is_empty() {
        key(out, tag, LEN);
        encode_varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }
}

/// Length of [`string`].
#[inline]
pub(crate) fn string_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        message_len(s.len())
    }
}

/// A packed `repeated double` field; left out when empty.
#[inline]
pub(crate) fn doubles(out: &mut Vec<u8>, tag: u8, values: &[f64]) {
    if values.is_empty() {
        return;
    }
    key(out, tag, LEN);
    encode_varint(values.len() as u64 * 8, out);
    // One resize and a copy loop the compiler turns into wide moves, instead of a
    // capacity check per value.
    let at = out.len();
    out.resize(at + values.len() * 8, 0);
    for (slot, v) in out[at..].chunks_exact_mut(8).zip(values) {
        slot.copy_from_slice(&v.to_bits().to_le_bytes());
    }
}

/// Length of [`doubles`] of `n` values.
#[inline]
pub(crate) fn doubles_len(n: usize) -> usize {
    if n == 0 { 0 } else { message_len(n * 8) }
}

/// The key and length of a message field whose body, `len` bytes, follows.
#[inline]
pub(crate) fn message(out: &mut Vec<u8>, tag: u8, len: usize) {
    key(out, tag, LEN);
    encode_varint(len as u64, out);
}

/// Length of a message field whose body is `len` bytes.
#[inline]
pub(crate) fn message_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}
