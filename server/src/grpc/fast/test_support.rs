//! Builders of raw protobuf bytes for the fast path's unit tests.

use bytes::{BufMut as _, Bytes};

use super::{
    I64, LEN, WireError, WireRequest,
    encode::{put_key, put_varint},
};

pub(super) fn decode(bytes: Vec<u8>) -> Result<WireRequest, WireError> {
    WireRequest::decode(Bytes::from(bytes))
}

/// Appends a raw length-delimited field to `out`.
pub(super) fn raw_len(out: &mut Vec<u8>, field: u64, payload: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// A `map<string, double>` entry as prost writes it.
pub(super) fn entry(key: &str, value: f64) -> Vec<u8> {
    let mut e = Vec::new();
    raw_len(&mut e, 1, key.as_bytes());
    put_key(&mut e, 2, I64);
    e.put_u64_le(value.to_bits());
    e
}

/// Decodes `bytes` with this decoder and with prost and asserts the same outcome: the
/// same samples and detector, or the same error text (tonic sends that text to the
/// client). `Err` carries the text.
pub(super) fn same_as_prost(bytes: &[u8]) -> Result<WireRequest, String> {
    use prost::Message as _;
    use tidewatch_proto::v1::IngestRequest;
    let ours = decode(bytes.to_vec());
    let theirs = IngestRequest::decode(bytes);
    match (ours, theirs) {
        (Ok(ours), Ok(theirs)) => {
            assert_eq!(
                IngestRequest {
                    samples: ours.to_samples(),
                    detector: ours.detector.as_deref().cloned(),
                }
                .encode_to_vec(),
                theirs.encode_to_vec(),
                "{bytes:02x?}"
            );
            Ok(ours)
        }
        (Err(ours), Err(theirs)) => {
            assert_eq!(ours.to_string(), theirs.to_string(), "{bytes:02x?}");
            Err(ours.to_string())
        }
        (ours, theirs) => panic!("{bytes:02x?}: ours {ours:?}, prost {theirs:?}"),
    }
}
