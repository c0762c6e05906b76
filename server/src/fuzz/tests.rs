//! The committed seed corpus replayed through the fuzz checks, and the generator that
//! wrote its first files (from the shapes of the conformance corpus, the REST body
//! tests and the snapshot fixtures).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use prost::Message as _;
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{DetectorConfig, IngestRequest, Sample},
};

use super::{wire::*, *};
use crate::snapshot::codec::{LEGACY_VERSION, MAGIC, VERSION};

/// Files each target's corpus must hold at least: a missing or emptied folder fails.
const MIN_FILES: usize = 20;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_committed_corpus_file_passes_its_check() {
    for (target, check) in TARGETS {
        let dir = corpus_dir(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("dir entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(
            files.len() >= MIN_FILES,
            "{}: {} files, fewer than {MIN_FILES}",
            dir.display(),
            files.len()
        );
        for file in files {
            let data = std::fs::read(&file).expect("read corpus file");
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                panic!("{target}: {} fails its check", file.display());
            }
        }
    }
}

#[test]
fn the_reused_message_is_what_prost_reads() {
    let prost = IngestRequest::decode(REUSED).expect("prost decodes it");
    assert_eq!(prost.samples.len(), 2);
    assert_eq!(prost.samples[0].metrics["m"], 1.0);
    assert_eq!(
        prost.detector.map(|d| d.name).as_deref(),
        Some("robust"),
        "the detector section"
    );
    ingest_codec(REUSED);
}

// ---- The seed generator ---------------------------------------------------------

/// Writes the generated seeds into `fuzz/corpus/<target>/seed-*` (files already there,
/// such as crash inputs added since, stay):
/// `cargo test -p tidewatch-server --lib fuzz::tests::write_seed_corpus -- --ignored`.
#[test]
#[ignore = "writes files into fuzz/corpus"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("ingest_codec", codec_seeds()),
        ("rest_body", body_seeds()),
        ("snapshot", snapshot_seeds()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        }
    }
}

#[test]
fn every_generated_seed_passes_its_check() {
    for seeds in [codec_seeds(), body_seeds(), snapshot_seeds()] {
        assert!(seeds.len() >= MIN_FILES);
    }
    for (_, bytes) in codec_seeds() {
        ingest_codec(&bytes);
    }
    for (_, bytes) in body_seeds() {
        rest_body(&bytes);
    }
    for (_, bytes) in snapshot_seeds() {
        snapshot(&bytes);
    }
}

fn sample(device: &str, seq: u64, metrics: &[(&str, f64)]) -> Sample {
    Sample {
        device_id: device.into(),
        time: None,
        metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
        seq,
    }
}

/// `IngestRequest` messages: what prost writes, and the conformance corpus's shapes
/// (unknown fields and groups everywhere, repeated keys, bad UTF-8, wrong wire types,
/// cuts, nesting at and past the recursion limit).
fn codec_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| seeds.push((name.to_owned(), bytes));
    add("empty", Vec::new());
    let one = IngestRequest {
        samples: vec![sample("sensor-1", 1, &[("rps", 420.0)])],
        detector: None,
    }
    .encode_to_vec();
    add("one-sample", one.clone());
    add("cut-inside-a-sample", one[..one.len() - 4].to_vec());
    let rich = IngestRequest {
        samples: vec![
            sample("dev-1", 7, &[("rps", 420.0), ("cpu", 55.5)]),
            Sample {
                time: Some(Timestamp {
                    seconds: 1_710_000_000,
                    nanos: 123_456_789,
                }),
                ..sample("", 0, &[("b", -1.0), ("a", -0.0), ("c", f64::NAN)])
            },
            sample("température", u64::MAX, &[("∞", f64::INFINITY)]),
        ],
        detector: Some(DetectorConfig {
            name: "robust".into(),
            window_size: 64,
            threshold: 3.5,
            min_samples: 10,
        }),
    }
    .encode_to_vec();
    add("three-samples-and-a-detector", rich.clone());
    add("cut-in-half", rich[..rich.len() / 2].to_vec());
    let batch = IngestRequest {
        samples: (0..40)
            .map(|i| sample(&format!("batch-{i}"), i, &[("a", 1.0), ("b", i as f64)]))
            .collect(),
        detector: None,
    }
    .encode_to_vec();
    add("forty-samples", batch);
    let many_metrics = IngestRequest {
        samples: vec![Sample {
            device_id: "wide".into(),
            metrics: (0..40)
                .map(|i| (format!("m{i:02}"), f64::from(i)))
                .collect(),
            ..Sample::default()
        }],
        detector: None,
    }
    .encode_to_vec();
    add("forty-metrics", many_metrics);
    let mut bad_id = Vec::new();
    len_field(&mut bad_id, 1, &[0xff, 0xfe]);
    add("device-id-not-utf8", raw_sample(&bad_id));
    let mut bad_name = Vec::new();
    len_field(&mut bad_name, 1, b"dev");
    len_field(&mut bad_name, 3, &entry(&[b'c', 0xc3], 1.0));
    add("metric-name-not-utf8", raw_sample(&bad_name));
    let mut r = raw_sample(&sample_fields("detector-bad"));
    let mut bad_detector = Vec::new();
    len_field(&mut bad_detector, 1, &[0xe2, 0x82]);
    len_field(&mut r, 2, &bad_detector);
    add("detector-name-not-utf8", r);
    add(
        "field-runs-past-its-sample",
        vec![0x0A, 4, 0x0A, 6, b'a', b'b', 0x20, 1, 0x20, 1],
    );
    add("samples-wrong-wire-type", vec![0x08, 0x01]);
    add("invalid-varint", vec![0x0A, 0xff]);
    add(
        "overlong-varint",
        [0x78].into_iter().chain([0xff; 11]).collect(),
    );
    add("field-number-0", vec![0x02, 0x00]);
    add("wire-type-7", vec![0x0F]);
    let mut metrics_as_varint = Vec::new();
    len_field(&mut metrics_as_varint, 1, b"dev");
    key(&mut metrics_as_varint, 3, 0);
    varint(&mut metrics_as_varint, 3);
    metrics_as_varint.extend_from_slice(&[0x0a, 0x01, b'm']);
    add("metrics-wrong-wire-type", raw_sample(&metrics_as_varint));
    let mut top = unknowns();
    top.extend(raw_sample(&sample_fields("unknown-top")));
    top.extend(unknowns());
    add("unknown-fields-and-groups-at-the-top", top);
    let mut in_sample = unknowns();
    in_sample.extend(sample_fields("unknown-sample"));
    in_sample.extend(unknowns());
    add(
        "unknown-fields-and-groups-in-a-sample",
        raw_sample(&in_sample),
    );
    let mut e = entry(b"rps", 3.0);
    e.extend(unknowns());
    let mut t = Timestamp {
        seconds: 1_710_000_000,
        nanos: 7,
    }
    .encode_to_vec();
    t.extend(unknowns());
    let mut s = sample_fields("unknown-entry");
    len_field(&mut s, 3, &e);
    len_field(&mut s, 2, &t);
    add("unknown-fields-in-an-entry-and-a-timestamp", raw_sample(&s));
    let nested = |depth: usize| (0..depth).fold(Vec::new(), |inner, _| group(7, &inner));
    for depth in [99, 100, 101] {
        let mut r = raw_sample(&sample_fields("nested"));
        r.extend(nested(depth));
        add(&format!("group-nested-{depth}-deep"), r);
    }
    let mut in_sample = sample_fields("nested-in-sample");
    in_sample.extend(nested(99));
    add("group-nested-99-deep-in-a-sample", raw_sample(&in_sample));
    let mut r = raw_sample(&sample_fields("end-group"));
    key(&mut r, 9, 4);
    add("end-group-alone", r);
    let mut r = raw_sample(&sample_fields("unterminated"));
    key(&mut r, 9, 3);
    add("group-without-its-end", r);
    let mut r = raw_sample(&sample_fields("wrong-end"));
    key(&mut r, 9, 3);
    key(&mut r, 8, 4);
    add("group-ended-by-another-field", r);
    let mut s = Vec::new();
    len_field(&mut s, 3, &entry(b"rps", 1.0));
    varint(&mut s, 0x20);
    varint(&mut s, 7);
    len_field(&mut s, 1, b"ignored");
    len_field(&mut s, 3, &entry(b"cpu", 2.0));
    len_field(&mut s, 3, &entry(b"rps", 3.0));
    len_field(&mut s, 1, b"repeated-keys");
    len_field(&mut s, 3, &entry(b"cpu", 4.0));
    add("repeated-map-keys-fields-out-of-order", raw_sample(&s));
    let mut s = sample_fields("entry-shapes");
    let mut e = vec![0x11];
    e.extend_from_slice(&9.5f64.to_le_bytes());
    len_field(&mut e, 1, b"mem");
    len_field(&mut s, 3, &e);
    let mut e = Vec::new();
    len_field(&mut e, 1, b"disk");
    len_field(&mut s, 3, &e);
    let mut e = entry(b"abc", 1.0);
    len_field(&mut e, 1, b"net");
    len_field(&mut s, 3, &e);
    add("map-entries-off-prost-shape", raw_sample(&s));
    seeds
}

/// `POST /ingest` bodies: every shape the gateway takes (docs/api.md) and the
/// refusals of its tests.
fn body_seeds() -> Vec<(String, Vec<u8>)> {
    let bodies: &[(&str, &str)] = &[
        (
            "flat",
            r#"{"device_id": "sensor-1", "timestamp": 1710000000, "cpu": 55.0}"#,
        ),
        (
            "flat-no-id",
            r#"{"timestamp": 1710000000, "cpu": 55.0, "rps": 420.0}"#,
        ),
        (
            "flat-rfc3339",
            r#"{"timestamp": "2024-01-15T10:30:00Z", "device_id": "sensor-1", "cpu": 0.75, "rps": 150}"#,
        ),
        ("flat-fraction", r#"{"timestamp": 1710000000.25, "cpu": 1}"#),
        (
            "canonical",
            r#"{"deviceId":"a","time":"2024-01-15T10:30:00Z","metrics":{"rps":1},"seq":"7"}"#,
        ),
        (
            "canonical-snake",
            r#"{"device_id":"b","metrics":{"x":1},"seq":3}"#,
        ),
        (
            "array",
            r#"[{"deviceId":"a","metrics":{"rps":1},"seq":"7"}, {"cpu": 2}]"#,
        ),
        (
            "wrapper",
            r#"{"samples": [{"deviceId":"a","metrics":{"rps":1}}, {"device_id":"b","cpu":2}]}"#,
        ),
        (
            "float-seq",
            r#"[{"seq": 7.0, "cpu": 1}, {"seq": 8.0, "metrics": {"cpu": 1}}]"#,
        ),
        (
            "nulls",
            r#"{"seq": null, "time": null, "deviceId": null, "metrics": {"cpu": 1}}"#,
        ),
        ("samples-as-metric", r#"{"samples": 3, "cpu": 1}"#),
        (
            "ndjson",
            "{\"rps\": 1}\n\n{\"metrics\":{\"rps\":2}}\r\n[{\"rps\":3},{\"rps\":4}]\n",
        ),
        ("ndjson-bad-line", "{\"rps\": 1}\n{oops\n"),
        (
            "both-ids",
            r#"{"device_id": "a", "deviceId": "b", "cpu": 1}"#,
        ),
        ("unclosed", "{"),
        ("too-large-number", r#"{"cpu": 1e999}"#),
        ("string-metric", r#"{"cpu": "high"}"#),
        ("canonical-string-value", r#"{"metrics": {"cpu": "x"}}"#),
        ("canonical-extra", r#"{"metrics": {"cpu": 1}, "extra": 1}"#),
        ("number-array", "[1]"),
        ("wrapper-extra", r#"{"samples": [], "other": 1}"#),
        ("bad-time", r#"{"timestamp": "yesterday", "cpu": 1}"#),
        ("huge-time", r#"{"timestamp": 1e300, "cpu": 1}"#),
        ("negative-seq", r#"{"seq": -1, "cpu": 1}"#),
        ("fraction-seq", r#"{"seq": 7.5, "cpu": 1}"#),
        ("nan", r#"[{"cpu": 1}, {"metrics": {"cpu": "NaN"}}]"#),
        ("minus-infinity", r#"{"metrics": {"cpu": "-Infinity"}}"#),
        (
            "time-nanos",
            r#"{"deviceId":"n","time":"2024-02-29T23:59:59.999999999Z","metrics":{"m":-0.0}}"#,
        ),
        (
            "unicode",
            r#"{"device_id": "capteur-é", "température": -2.5e-300}"#,
        ),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = bodies
        .iter()
        .map(|(name, body)| ((*name).to_owned(), body.as_bytes().to_vec()))
        .collect();
    let over: Vec<String> = (0..=BODY_LIMIT).map(|i| format!("{{\"m\":{i}}}")).collect();
    seeds.push((
        "over-the-limit".into(),
        format!("[{}]", over.join(",")).into_bytes(),
    ));
    seeds
}

/// Snapshot values: the committed version-1 fixtures, the fixture devices and a
/// hand-made one as version 2, and cut, extended and mislabelled variants.
fn snapshot_seeds() -> Vec<(String, Vec<u8>)> {
    let v1: [(&str, &[u8]); 4] = [
        (
            "by-hand",
            include_bytes!("../snapshot/testdata/v1-by-hand.bin"),
        ),
        (
            "zscore",
            include_bytes!("../snapshot/testdata/v1-zscore.bin"),
        ),
        (
            "robust",
            include_bytes!("../snapshot/testdata/v1-robust.bin"),
        ),
        ("empty", include_bytes!("../snapshot/testdata/v1-empty.bin")),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, bytes) in v1 {
        seeds.push((format!("v1-{name}"), bytes.to_vec()));
        seeds.push((
            format!("v1-{name}-cut"),
            bytes[..bytes.len() * 2 / 3].to_vec(),
        ));
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        seeds.push((format!("v1-{name}-trailing"), trailing));
    }
    for (name, device) in crate::snapshot::fixtures::devices() {
        let mut value = Vec::new();
        encode_value(&device, &mut value);
        assert_eq!(value[2], VERSION);
        seeds.push((format!("v2-{name}-cut"), value[..value.len() / 2].to_vec()));
        let mut unknown = value.clone();
        unknown.extend_from_slice(&[15 << 3, 7]);
        seeds.push((format!("v2-{name}-unknown-field"), unknown));
        let mut as_v1 = value.clone();
        as_v1[2] = LEGACY_VERSION;
        seeds.push((format!("v2-{name}-labelled-v1"), as_v1));
        seeds.push((format!("v2-{name}"), value));
    }
    let mut v3 = MAGIC.to_vec();
    v3.push(3);
    seeds.push(("version-3".into(), v3));
    seeds.push(("not-a-snapshot".into(), b"hello world".to_vec()));
    seeds.push(("magic-only".into(), MAGIC.to_vec()));
    seeds
}
