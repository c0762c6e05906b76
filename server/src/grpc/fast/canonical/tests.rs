//! Tests of the canonical shortcut: every shape on and off it decodes as prost
//! decodes it.

use prost::Message as _;
use tidewatch_proto::v1::IngestRequest;

use crate::{
    engine::SampleLike as _,
    grpc::fast::{
        encode::put_varint,
        test_support::{decode, entry, raw_len, same_as_prost},
    },
};

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
            (Err(ours), Err(prost)) => assert_eq!(ours.to_string(), prost.to_string(), "case {i}"),
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
        same_as_prost(&r).unwrap_err(),
        "failed to decode Protobuf message: Sample.metrics: IngestRequest.samples: \
         invalid string value: data is not UTF-8 encoded"
    );
    // The value with another wire type, the length of a fixed64 entry: prost takes the
    // varint, then reads the rest as a field.
    let r = one_entry(&[&[0x0A, 3][..], b"cpu", &[0x10], &value].concat());
    assert!(same_as_prost(&r).is_err());
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
            (Err(ours), Err(prost)) => assert_eq!(ours.to_string(), prost.to_string(), "case {i}"),
            (ours, prost) => panic!("case {i}: {ours:?} vs {prost:?}"),
        }
    }
}
