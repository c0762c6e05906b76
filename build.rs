//! Compiles `proto/tidewatch/v1/*.proto` into Rust (prost messages, tonic stubs, and
//! pbjson serde impls for the canonical proto3 JSON mapping) and writes the file
//! descriptor set that gRPC reflection serves. protoc comes from `protoc-bin-vendored`,
//! so no system protoc is needed.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("tidewatch_descriptor.bin");
    let protos = [
        "proto/tidewatch/v1/telemetry.proto",
        "proto/tidewatch/v1/snapshot.proto",
    ];

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        // Deterministic order of `metrics` everywhere: verdicts, JSON, snapshots.
        .btree_map(".tidewatch.v1.Sample.metrics")
        .extern_path(".google.protobuf.Timestamp", "::pbjson_types::Timestamp")
        .compile_with_config(config, &protos, &["proto"])?;

    let descriptors = fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .btree_map([".tidewatch.v1.Sample.metrics"])
        .emit_fields()
        .build(&[".tidewatch.v1"])?;
    finite_safe_doubles(&out_dir.join("tidewatch.v1.serde.rs"))?;
    z_timestamps(&out_dir.join("tidewatch.v1.serde.rs"))?;

    println!("cargo:rerun-if-changed=proto/tidewatch");
    Ok(())
}

/// pbjson hands `double` fields to serde as plain `f64`, and serde_json writes a
/// non-finite `f64` as `null`. The proto3 JSON mapping writes them as the strings
/// `"NaN"`, `"Infinity"` and `"-Infinity"` (what grpcurl prints for a z-score of ±inf),
/// so every double field is serialized through `crate::json::ProtoDouble`.
fn finite_safe_doubles(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    const DOUBLE_FIELDS: [(&str, &str); 9] = [
        ("value", "value"),
        ("mean", "mean"),
        ("stddev", "stddev"),
        ("zScore", "z_score"),
        ("rollingAverage", "rolling_average"),
        ("lastValue", "last_value"),
        ("lastZScore", "last_z_score"),
        ("threshold", "threshold"),
        ("score", "score"),
    ];
    let mut code = fs::read_to_string(path)?;
    for (json, field) in DOUBLE_FIELDS {
        let from = format!("serialize_field(\"{json}\", &self.{field})?");
        let to = format!("serialize_field(\"{json}\", &crate::json::ProtoDouble(self.{field}))?");
        if !code.contains(&from) {
            return Err(format!("pbjson output has no double field {field}").into());
        }
        code = code.replace(&from, &to);
    }
    fs::write(path, code)?;
    Ok(())
}

/// pbjson-types writes a `Timestamp` with chrono's `to_rfc3339`, which ends in
/// `+00:00`; the proto3 JSON mapping (and grpcurl) writes `Z` with 0, 3, 6 or 9
/// fractional digits, so every timestamp field is serialized through
/// `crate::json::ProtoTimestamp`.
fn z_timestamps(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    const TIMESTAMP_FIELDS: [&str; 2] = ["updatedAt", "time"];
    let mut code = fs::read_to_string(path)?;
    for json in TIMESTAMP_FIELDS {
        let from = format!("serialize_field(\"{json}\", v)?");
        let to = format!("serialize_field(\"{json}\", &crate::json::ProtoTimestamp(*v))?");
        if !code.contains(&from) {
            return Err(format!("pbjson output has no timestamp field {json}").into());
        }
        code = code.replace(&from, &to);
    }
    fs::write(path, code)?;
    Ok(())
}
