//! The properties the fuzz targets check on one input (`fuzz/`, see
//! `docs/fuzzing.md`). Each function takes arbitrary bytes and panics when a property
//! fails; refusing the input is always allowed. The same functions replay the
//! committed seed corpus in the unit tests, so `scripts/test` keeps every input that
//! once failed on the stable toolchain, without libFuzzer.
//!
//! - [`ingest_codec`]: the `Ingest` fast path's decoder (`grpc/fast/decode.rs`)
//!   against prost, the oracle: the same samples and detector, or the same error
//!   text, except for the difference its contract lists (`grpc/fast.rs`).
//! - [`rest_body`]: the `POST /ingest` body parser (`gateway/body.rs`): never panics;
//!   what it accepts is within `MAX_SAMPLES_PER_REQUEST`, finite, and parses back to
//!   the same samples once written as canonical proto3 JSON.
//! - [`snapshot`]: the snapshot decoder (`snapshot/codec.rs`, both versions): never
//!   panics; a value that decodes re-encodes to bytes that decode to the same device
//!   and encode the same again, and those bytes are prost's for the device's message.

use bytes::Bytes;
use prost::Message as _;
use tidewatch_proto::v1::{IngestRequest, Sample};

use crate::{
    engine::DeviceState,
    gateway::body::{Framing, parse},
    grpc::fast::{WireErrorKind, WireRequest},
    snapshot::codec::{decode_message, decode_value, encode_value},
};

#[cfg(test)]
mod tests;
pub mod wire;

/// A property checked on one input: panics when it fails.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name: the folder of each one's corpus under `fuzz/corpus/`.
pub const TARGETS: [(&str, Check); 3] = [
    ("ingest_codec", ingest_codec),
    ("rest_body", rest_body),
    ("snapshot", snapshot),
];

/// Samples a body may hold in [`rest_body`]: small, so the limit is reached too.
const BODY_LIMIT: usize = 64;

/// The fast path decodes `data` as prost does: the same request, or the same error.
/// Decoded fresh and into a request that held another message first (a stream reuses
/// its request), with the same outcome.
pub fn ingest_codec(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    let ours = WireRequest::decode(bytes.clone());
    let mut reused = WireRequest::decode(Bytes::from_static(REUSED)).expect("the fixed message");
    let again = reused.decode_into(bytes);
    match (&ours, &again) {
        // Compared as bytes: a NaN value is not equal to itself.
        (Ok(ours), Ok(())) => assert_eq!(
            as_prost(ours).encode_to_vec(),
            as_prost(&reused).encode_to_vec()
        ),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("fresh {ours:?}, reused {again:?}"),
    }
    let theirs = IngestRequest::decode(data);
    match (ours, theirs) {
        // The contract's difference: prost reads a `Sample.metrics` field of another
        // wire type as an entry anyway (and may then decode it, or fail elsewhere with
        // another text); this path refuses it.
        (Err(ours), _)
            if matches!(ours.kind(), Some(WireErrorKind::WireType { .. }))
                && ours.field() == Some(("Sample", "metrics")) => {}
        (Ok(ours), Ok(theirs)) => {
            assert_eq!(as_prost(&ours).encode_to_vec(), theirs.encode_to_vec());
        }
        (Err(ours), Err(theirs)) => assert_eq!(ours.to_string(), theirs.to_string()),
        (ours, theirs) => panic!("fast path {ours:?}, prost {theirs:?}"),
    }
}

/// A message with two samples, a group and a detector: what [`ingest_codec`]'s reused
/// request holds before the input.
const REUSED: &[u8] = &[
    0x0a, 0x15, 0x0a, 0x03, b'd', b'-', b'1', 0x1a, 0x0c, 0x0a, 0x01, b'm', 0x11, 0, 0, 0, 0, 0, 0,
    0xf0, 0x3f, 0x20, 0x07, 0x0a, 0x07, 0x0a, 0x01, b'x', 0x5b, 0x5c, 0x20, 0x01, 0x12, 0x08, 0x0a,
    0x06, b'r', b'o', b'b', b'u', b's', b't',
];

/// A decoded request as the prost message it stands for.
fn as_prost(request: &WireRequest) -> IngestRequest {
    IngestRequest {
        samples: request.to_samples(),
        detector: request.detector.as_deref().cloned(),
    }
}

/// The REST body parser, as JSON and as NDJSON: an accepted body holds at most the
/// limit of samples, every value finite, and written back as canonical proto3 JSON
/// (`{"samples":[...]}`, what a client could send) it parses to the same samples.
pub fn rest_body(data: &[u8]) {
    for framing in [Framing::Json, Framing::NdJson] {
        let samples = match parse(data, framing, BODY_LIMIT) {
            Ok(samples) => samples,
            Err(e) => {
                // Its message and sample count are what the gateway answers with.
                let _ = (e.to_string(), e.rejected_samples());
                continue;
            }
        };
        assert!(samples.len() <= BODY_LIMIT, "{} samples", samples.len());
        for sample in &samples {
            assert!(sample.metrics.values().all(|v| v.is_finite()), "{sample:?}");
        }
        let written = canonical_json(&samples);
        let back = parse(written.as_bytes(), Framing::Json, BODY_LIMIT)
            .unwrap_or_else(|e| panic!("{written}: {e}"));
        assert_eq!(back, samples, "{written}");
    }
}

/// Samples as the `{"samples":[...]}` body of canonical proto3 JSON.
fn canonical_json(samples: &[Sample]) -> String {
    let body = serde_json::json!({ "samples": samples });
    serde_json::to_string(&body).expect("samples serialize")
}

/// The snapshot decoder never panics; what decodes to a device re-encodes to bytes
/// that decode to the same device (compared by its bytes: a NaN is not equal to
/// itself), written exactly as prost writes the device's message.
pub fn snapshot(data: &[u8]) {
    let Ok(message) = decode_message(data) else {
        return;
    };
    let Ok(device) = DeviceState::from_snapshot(message) else {
        return;
    };
    let mut bytes = Vec::new();
    encode_value(&device, &mut bytes);
    assert_eq!(bytes[3..], device.to_snapshot().encode_to_vec()[..]);
    // The value itself decodes under the device's own key.
    decode_value(data, &device.id).expect("a value whose device decodes");
    let again = decode_value(&bytes, &device.id).expect("a re-encoded device decodes");
    let mut twice = Vec::new();
    encode_value(&again, &mut twice);
    assert_eq!(bytes, twice);
}
