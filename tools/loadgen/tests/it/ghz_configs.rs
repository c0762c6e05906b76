//! Checks every ghz config in `ghz/`: valid JSON with only ghz's own keys (with the
//! types ghz expects), `proto` and `import-paths` that exist from the repository root,
//! a `call` that names an RPC of the proto (read from the compiled descriptor set), and
//! `data` that, after rendering ghz's template actions with sample values, decodes as
//! that RPC's request type through the canonical proto3 JSON mapping.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use prost::Message;
use prost_types::{FileDescriptorSet, MethodDescriptorProto};
use serde_json::Value;
use tidewatch_proto::v1::{AnalyzeRequest, IngestRequest, WatchAnomaliesRequest};

/// What a ghz config key holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Str,
    Bool,
    Uint,
    Int,
    /// A Go duration string such as `500ms`, `30s`, `1m30s`.
    Duration,
    StrList,
    StrMap,
    /// Message data: an object, or an array of objects.
    Data,
}

/// Every key of ghz's JSON config (`runner/config.go` of bojand/ghz), with its type.
fn ghz_keys() -> BTreeMap<&'static str, Kind> {
    use Kind::*;
    BTreeMap::from([
        ("proto", Str),
        ("protoset", Str),
        ("call", Str),
        ("cacert", Str),
        ("cert", Str),
        ("key", Str),
        ("count-errors", Bool),
        ("skipTLS", Bool),
        ("skipFirst", Uint),
        ("cname", Str),
        ("authority", Str),
        ("insecure", Bool),
        ("total", Uint),
        ("async", Bool),
        ("concurrency", Uint),
        ("concurrency-schedule", Str),
        ("concurrency-start", Uint),
        ("concurrency-end", Uint),
        ("concurrency-step", Int),
        ("concurrency-step-duration", Duration),
        ("concurrency-max-duration", Duration),
        ("connections", Uint),
        ("rps", Uint),
        ("duration", Duration),
        ("duration-stop", Str),
        ("max-duration", Duration),
        ("timeout", Duration),
        ("data", Data),
        ("data-file", Str),
        ("binary-file", Str),
        ("metadata", StrMap),
        ("metadata-file", Str),
        ("stream-interval", Duration),
        ("stream-call-duration", Duration),
        ("stream-call-count", Uint),
        ("stream-dynamic-messages", Bool),
        ("output", Str),
        ("format", Str),
        ("connect-timeout", Duration),
        ("keepalive", Duration),
        ("cpus", Uint),
        ("import-paths", StrList),
        ("name", Str),
        ("tags", StrMap),
        ("reflect-metadata", StrMap),
        ("debug", Str),
        ("host", Str),
        ("enable-compression", Bool),
        ("load-schedule", Str),
        ("load-start", Uint),
        ("load-end", Uint),
        ("load-step", Int),
        ("load-step-duration", Duration),
        ("load-max-duration", Duration),
        ("lb-strategy", Str),
        ("max-recv-message-size", Str),
        ("max-send-message-size", Str),
        ("disable-template-functions", Bool),
        ("disable-template-data", Bool),
    ])
}

/// Whether `s` is a Go duration: one or more `<number><unit>`.
fn is_go_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len());
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

fn check_kind(file: &str, key: &str, kind: Kind, value: &Value) {
    let ok = match kind {
        Kind::Str => value.is_string(),
        Kind::Bool => value.is_boolean(),
        Kind::Uint => value.is_u64(),
        Kind::Int => value.is_i64(),
        Kind::Duration => value.as_str().is_some_and(is_go_duration),
        Kind::StrList => value
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string)),
        Kind::StrMap => value
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string)),
        Kind::Data => {
            value.is_object()
                || value
                    .as_array()
                    .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_object))
        }
    };
    assert!(ok, "{file}: {key:?} has the wrong type for ghz: {value}");
}

/// Renders ghz's template actions (Go `text/template` over ghz's call data and
/// functions) with sample values, failing on any action ghz would not know.
fn render(file: &str, template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .unwrap_or_else(|| panic!("{file}: unclosed template action"));
        let action = after[..end].trim();
        let words: Vec<&str> = action.split_whitespace().collect();
        let value = match words.as_slice() {
            [".WorkerID"] => "g1c0".to_string(),
            [".RequestNumber"] => "7".to_string(),
            [".FullyQualifiedName"] => "tidewatch.v1.TelemetryService.Ingest".to_string(),
            [".MethodName"] => "Ingest".to_string(),
            [".ServiceName"] => "TelemetryService".to_string(),
            [".InputName"] => "IngestRequest".to_string(),
            [".OutputName"] => "IngestResponse".to_string(),
            [".IsClientStreaming"] | [".IsServerStreaming"] => "true".to_string(),
            [".Timestamp"] => "2024-01-15T10:30:00Z".to_string(),
            [".TimestampUnix"] => "1705314600".to_string(),
            [".TimestampUnixMilli"] => "1705314600000".to_string(),
            [".TimestampUnixNano"] => "1705314600000000000".to_string(),
            [".UUID"] | ["newUUID"] => "6f1c1c8e-8a55-4d8e-9a57-9a2f7c1b2d3e".to_string(),
            ["randomInt", min, max] => {
                let min: i64 = min.parse().unwrap_or_else(|_| panic!("{file}: {action}"));
                let max: i64 = max.parse().unwrap_or_else(|_| panic!("{file}: {action}"));
                assert!(min < max, "{file}: {action}: empty range");
                // Both ends, to catch a value that is out of range at one of them.
                ((min + max) / 2).to_string()
            }
            ["randomString", n] => {
                let n: usize = n.parse().unwrap_or_else(|_| panic!("{file}: {action}"));
                "x".repeat(n.max(1))
            }
            _ => panic!("{file}: template action {{{{{action}}}}} is not one ghz provides"),
        };
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The repository root (two levels above this crate).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `package.Service.Method` or `package.Service/Method` → the method descriptor and
/// whether it streams from the client.
fn find_method(file: &str, call: &str) -> MethodDescriptorProto {
    let set = FileDescriptorSet::decode(tidewatch_proto::FILE_DESCRIPTOR_SET)
        .expect("decode the descriptor set");
    let (service, method) = call
        .rsplit_once('/')
        .or_else(|| call.rsplit_once('.'))
        .unwrap_or_else(|| panic!("{file}: call {call:?} is not package.Service.Method"));
    for proto in &set.file {
        let package = proto.package();
        for s in &proto.service {
            if format!("{package}.{}", s.name()) != service {
                continue;
            }
            if let Some(m) = s.method.iter().find(|m| m.name() == method) {
                return m.clone();
            }
        }
    }
    panic!("{file}: call {call:?} names no RPC of proto/tidewatch/v1/telemetry.proto");
}

/// Decodes one rendered data message as `input_type` (a fully qualified name).
fn decode_as(file: &str, input_type: &str, message: &Value) {
    let text = message.to_string();
    let result = match input_type {
        ".tidewatch.v1.IngestRequest" => serde_json::from_str::<IngestRequest>(&text)
            .map(|r| assert!(!r.samples.is_empty(), "{file}: a message without samples")),
        ".tidewatch.v1.AnalyzeRequest" => serde_json::from_str::<AnalyzeRequest>(&text)
            .map(|r| assert!(!r.device_id.is_empty(), "{file}: no deviceId")),
        ".tidewatch.v1.WatchAnomaliesRequest" => {
            serde_json::from_str::<WatchAnomaliesRequest>(&text).map(|_| ())
        }
        other => panic!("{file}: no decoder for request type {other}"),
    };
    if let Err(e) = result {
        panic!("{file}: data does not decode as {input_type}: {e}\n{text}");
    }
}

fn check_config(path: &Path) {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).expect("read config");
    let config: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: invalid JSON: {e}"));
    let object = config
        .as_object()
        .unwrap_or_else(|| panic!("{file}: not a JSON object"));
    let keys = ghz_keys();
    for (key, value) in object {
        let kind = keys
            .get(key.as_str())
            .unwrap_or_else(|| panic!("{file}: {key:?} is not a ghz config key"));
        check_kind(&file, key, *kind, value);
    }

    let root = repo_root();
    let proto = object["proto"].as_str().expect("proto is set");
    let imports: Vec<&str> = object["import-paths"]
        .as_array()
        .expect("import-paths is set")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        root.join(proto).is_file() || imports.iter().any(|i| root.join(i).join(proto).is_file()),
        "{file}: proto {proto} not found from the repository root"
    );
    for import in &imports {
        assert!(
            root.join(import).is_dir(),
            "{file}: import path {import} missing"
        );
    }
    assert!(
        imports
            .iter()
            .any(|i| root.join(i).join("tidewatch/v1/telemetry.proto").is_file()),
        "{file}: import-paths must contain the proto root so `tidewatch/v1/...` resolves"
    );
    assert!(
        object.get("host").and_then(Value::as_str).is_some(),
        "{file}: no host"
    );

    let call = object["call"].as_str().expect("call is set");
    let method = find_method(&file, call);
    if object.contains_key("stream-call-count") {
        assert!(
            method.client_streaming(),
            "{file}: stream-call-count on a call that does not stream requests"
        );
    }
    if object.contains_key("stream-call-duration") {
        assert!(
            method.client_streaming() || method.server_streaming(),
            "{file}: stream-call-duration on a unary call"
        );
    }

    // ghz renders the data as one JSON text: render it, parse it, decode every message.
    let data = object.get("data").expect("data is set");
    let rendered = render(&file, &data.to_string());
    let rendered: Value = serde_json::from_str(&rendered)
        .unwrap_or_else(|e| panic!("{file}: data is not JSON after rendering: {e}"));
    let messages = match &rendered {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    for message in &messages {
        decode_as(&file, method.input_type(), message);
    }
}

#[test]
fn every_ghz_config_is_valid() {
    let dir = repo_root().join("ghz");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("ghz/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    configs.sort();
    let names: Vec<String> = configs
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in ["analyze.json", "ingest.json", "watch-anomalies.json"] {
        assert!(
            names.iter().any(|n| n == expected),
            "ghz/{expected} missing"
        );
    }
    for config in &configs {
        check_config(config);
    }
}

#[test]
fn the_checker_rejects_what_ghz_would() {
    assert!(is_go_duration("30s") && is_go_duration("1m30s") && is_go_duration("500ms"));
    assert!(!is_go_duration("30") && !is_go_duration("thirty seconds"));
    assert_eq!(render("t", r#"{"a":"{{randomInt 1 3}}"}"#), r#"{"a":"2"}"#);
    let unknown = std::panic::catch_unwind(|| render("t", "{{.NoSuchField}}"));
    assert!(unknown.is_err());
    let bad_data = std::panic::catch_unwind(|| {
        decode_as(
            "t",
            ".tidewatch.v1.IngestRequest",
            &serde_json::json!({"samples": [{"metrics": {"cpu": "not a number"}}]}),
        )
    });
    assert!(bad_data.is_err());
    let no_rpc =
        std::panic::catch_unwind(|| find_method("t", "tidewatch.v1.TelemetryService.Nope"));
    assert!(no_rpc.is_err());
    let ingest = find_method("t", "tidewatch.v1.TelemetryService.Ingest");
    assert!(ingest.client_streaming() && ingest.server_streaming());
}
