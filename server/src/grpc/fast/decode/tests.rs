//! Differential tests of the decoder against prost: the same samples, or the same
//! error text, for hand-made, generated and mutated requests.

use std::collections::BTreeMap;

use bytes::BufMut as _;
use proptest::prelude::*;
use prost::Message as _;
use tidewatch_proto::v1::IngestRequest;

use super::*;
use crate::{
    engine::tests::sample,
    grpc::fast::{
        encode::{put_key, put_varint},
        test_support::{decode, entry, raw_len, same_as_prost},
    },
};

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
        same_as_prost(&r).unwrap_err(),
        "failed to decode Protobuf message: Sample.device_id: IngestRequest.samples: \
         invalid string value: data is not UTF-8 encoded"
    );
    // A known field with the wrong wire type.
    let mut r = Vec::new();
    put_key(&mut r, 1, VARINT);
    put_varint(&mut r, 3);
    assert_eq!(
        same_as_prost(&r).unwrap_err(),
        "failed to decode Protobuf message: IngestRequest.samples: \
         invalid wire type: Varint (expected LengthDelimited)"
    );
    // A ten-byte varint whose last byte overflows 64 bits (prost refuses it too).
    let mut overflow = vec![0x20];
    overflow.extend([0x80; 9]);
    overflow.push(0x02);
    let mut r = Vec::new();
    raw_len(&mut r, 1, &overflow);
    assert_eq!(
        same_as_prost(&r).unwrap_err(),
        "failed to decode Protobuf message: Sample.seq: IngestRequest.samples: invalid varint"
    );
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
    let overlong: Vec<u8> = [0x78].into_iter().chain([0xff; 11]).collect();
    assert_eq!(
        same_as_prost(&overlong).unwrap_err(),
        "failed to decode Protobuf message: invalid varint"
    );
    // Every prefix of a request: prost's errors, whatever the cut.
    let rich = IngestRequest {
        samples: vec![Sample {
            time: Some(Timestamp {
                seconds: 1_710_000_000,
                nanos: 5,
            }),
            ..sample("dev-1", 300, &[("cpu", 1.5), ("température", -2.0)])
        }],
        detector: Some(DetectorConfig {
            name: "robust".into(),
            window_size: 64,
            threshold: 3.5,
            min_samples: 10,
        }),
    }
    .encode_to_vec();
    for cut in 0..=rich.len() {
        let _ = same_as_prost(&rich[..cut]);
    }
    let status = Status::from(decode(overlong).unwrap_err());
    assert_eq!(status.code(), tonic::Code::Internal);
    assert_eq!(
        status.message(),
        "failed to decode Protobuf message: invalid varint"
    );
}

/// A generated sample: device id, seq, time, metrics.
type RawParts = (String, u64, Option<(i64, i32)>, BTreeMap<String, f64>);

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
        agrees_with_prost(&bytes)?;
    }

    #[test]
    fn garbage_decodes_as_prost_decodes_it(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        agrees_with_prost(&bytes)?;
    }

    #[test]
    fn unknown_fields_and_groups_anywhere_are_skipped_as_prost_skips_them(
        samples in prop::collection::vec(
            (
                "[a-z0-9-]{0,12}",
                any::<u64>(),
                prop::collection::vec(("[a-z]{1,6}", any::<f64>(), prop::option::of(unknown_field())), 0..4),
                prop::option::of(unknown_field()),
                prop::option::of((any::<i64>(), any::<i32>(), prop::option::of(unknown_field()))),
            ),
            1..4,
        ),
        between in prop::option::of(unknown_field()),
    ) {
        let mut request = Vec::new();
        for (id, seq, metrics, in_sample, time) in samples {
            let mut s = Vec::new();
            for (name, value, in_entry) in metrics {
                let mut e = entry(&name, value);
                e.extend(in_entry.unwrap_or_default());
                raw_len(&mut s, 3, &e);
            }
            s.extend(in_sample.unwrap_or_default());
            raw_len(&mut s, 1, id.as_bytes());
            if let Some((seconds, nanos, in_time)) = time {
                let mut t = Timestamp { seconds, nanos }.encode_to_vec();
                t.extend(in_time.unwrap_or_default());
                raw_len(&mut s, 2, &t);
            }
            put_key(&mut s, 4, VARINT);
            put_varint(&mut s, seq);
            raw_len(&mut request, 1, &s);
            request.extend(between.clone().unwrap_or_default());
        }
        prop_assert!(same_as_prost(&request).is_ok());
    }
}

/// One unknown field of any wire type, groups nested up to 4 deep included.
fn unknown_field() -> impl Strategy<Value = Vec<u8>> {
    let leaf = (
        5u64..3000,
        0u8..4,
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(field, kind, v, bytes)| {
            let mut out = Vec::new();
            match kind {
                0 => {
                    put_key(&mut out, field, VARINT);
                    put_varint(&mut out, v);
                }
                1 => {
                    put_key(&mut out, field, I64);
                    out.put_u64_le(v);
                }
                2 => raw_len(&mut out, field, &bytes),
                _ => {
                    put_key(&mut out, field, I32);
                    out.put_u32_le(v as u32);
                }
            }
            out
        });
    leaf.prop_recursive(4, 32, 4, |inner| {
        (5u64..3000, prop::collection::vec(inner, 0..4)).prop_map(|(field, fields)| {
            let mut out = Vec::new();
            put_key(&mut out, field, SGROUP);
            out.extend(fields.concat());
            put_key(&mut out, field, EGROUP);
            out
        })
    })
}

/// This decoder and prost agree on `bytes` (the same samples, or the same error
/// text), except past a `Sample.metrics` field of another wire type than
/// length-delimited, which prost reads anyway (its map decoder does not check the
/// field's wire type and takes whatever varint follows as the entry's length) and
/// this decoder refuses.
fn agrees_with_prost(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Err(e) = decode(bytes.to_vec())
        && matches!(e.kind(), Some(WireErrorKind::WireType { .. }))
        && e.field() == Some(("Sample", "metrics"))
    {
        return Ok(());
    }
    let _ = same_as_prost(bytes);
    Ok(())
}

/// A group of field `field` holding `inner`.
fn group(field: u64, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_key(&mut out, field, SGROUP);
    out.extend_from_slice(inner);
    put_key(&mut out, field, EGROUP);
    out
}

#[test]
fn well_formed_groups_are_skipped_as_prost_skips_them() {
    let mut inner = Vec::new();
    put_key(&mut inner, 1, VARINT);
    put_varint(&mut inner, 5);
    raw_len(&mut inner, 2, b"x");
    put_key(&mut inner, 3, I32);
    inner.put_u32_le(7);
    inner.extend(group(4, &group(5, &[])));
    let g = group(9, &inner);
    let good = |s: &mut Vec<u8>| {
        raw_len(s, 1, b"dev");
        raw_len(s, 3, &entry("cpu", 1.5));
    };
    // At the top, in a sample, in a map entry, in a timestamp.
    let mut top = g.clone();
    let mut s = Vec::new();
    good(&mut s);
    raw_len(&mut top, 1, &s);
    top.extend(&g);
    let mut in_sample = Vec::new();
    good(&mut in_sample);
    in_sample.extend(&g);
    let mut in_entry = entry("rps", 2.0);
    in_entry.extend(&g);
    let mut in_time = Timestamp {
        seconds: 3,
        nanos: 4,
    }
    .encode_to_vec();
    in_time.extend(&g);
    let mut s2 = Vec::new();
    good(&mut s2);
    raw_len(&mut s2, 3, &in_entry);
    raw_len(&mut s2, 2, &in_time);
    for sample_bytes in [s, in_sample, s2] {
        let mut r = top.clone();
        raw_len(&mut r, 1, &sample_bytes);
        let ours = same_as_prost(&r).expect("decodes");
        assert_eq!(ours.len(), 2);
    }
}

#[test]
fn broken_groups_fail_as_prost_fails() {
    let sample = {
        let mut s = Vec::new();
        raw_len(&mut s, 1, b"dev");
        raw_len(&mut s, 3, &entry("cpu", 1.5));
        let mut r = Vec::new();
        raw_len(&mut r, 1, &s);
        r
    };
    let nested = |depth: usize| (0..depth).fold(Vec::new(), |inner, _| group(7, &inner));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // An end without a start.
        ([&[0x4C][..], &sample].concat(), "unexpected end group tag"),
        // An end of another field.
        (
            [&[0x4B, 0x44][..], &sample].concat(),
            "unexpected end group tag",
        ),
        // No end.
        (
            [&sample[..], &[0x4B, 0x08, 0x01]].concat(),
            "invalid varint",
        ),
        // Nested beyond prost's recursion limit, and just within it.
        (
            [&sample[..], &nested(101)].concat(),
            "recursion limit reached",
        ),
        ([&sample[..], &nested(100)].concat(), ""),
    ];
    for (bytes, expected) in cases {
        match same_as_prost(&bytes) {
            Ok(_) => assert_eq!(expected, "", "{bytes:02x?}"),
            Err(text) => assert!(text.ends_with(expected) && !expected.is_empty(), "{text}"),
        }
    }
    // Inside a sample the budget is one less, as in prost.
    for depth in [98, 99, 100] {
        let mut s = Vec::new();
        raw_len(&mut s, 1, b"dev");
        s.extend(nested(depth));
        let mut r = Vec::new();
        raw_len(&mut r, 1, &s);
        let _ = same_as_prost(&r);
    }
}
