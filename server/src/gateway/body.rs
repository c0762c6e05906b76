//! Request bodies of `POST /ingest`: every accepted shape turned into proto `Sample`s.
//!
//! A JSON body is one sample, an array of samples, or `{"samples":[...]}`; an NDJSON
//! body (`Content-Type: application/x-ndjson`) has one such document per line. A
//! sample is either canonical — the proto3 JSON of `Sample`, parsed by the generated
//! pbjson impl, so there is one definition — or flat, as the seed clients send it:
//! `{"timestamp": 1710000000, "device_id": "sensor-1", "cpu": 55.0}` (a numeric
//! `timestamp` is unix seconds, a string one RFC 3339; every other top-level field is a
//! metric and must be a number).
//!
//! The whole body is checked before anything is judged: one bad sample refuses the
//! request (`400`), so a client never has to guess which half of a body went in.

use serde::Deserialize as _;
use serde_json::{Map, Value};
use tidewatch_proto::{pbjson_types::Timestamp, v1::Sample};

use crate::error::{ApiError, ErrorKind};

/// Earliest and latest seconds a `google.protobuf.Timestamp` may hold (years 1 to 9999).
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<f64> = -62_135_596_800.0..=253_402_300_799.0;

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// One JSON document (anything that is not NDJSON, so `curl -d` works as is).
    Json,
    /// One JSON document per line.
    NdJson,
}

impl Framing {
    /// The framing announced by a `Content-Type` value.
    pub(crate) fn from_content_type(content_type: Option<&str>) -> Self {
        const NDJSON: [&str; 5] = [
            "application/x-ndjson",
            "application/ndjson",
            "application/jsonl",
            "application/x-jsonlines",
            "application/jsonlines",
        ];
        let essence = content_type
            .and_then(|v| v.split(';').next())
            .map_or("", str::trim);
        if NDJSON.iter().any(|t| essence.eq_ignore_ascii_case(t)) {
            Self::NdJson
        } else {
            Self::Json
        }
    }
}

/// Why a body was refused as a whole.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum BodyError {
    /// Not JSON at all (or a number JSON cannot hold, such as `1e999`).
    #[error("malformed JSON{at}: {message}")]
    Malformed {
        /// Where (` on line 3` for NDJSON), or empty.
        at: String,
        /// serde_json's description, with line and column.
        message: String,
    },
    /// JSON, but not a shape of sample this endpoint takes.
    #[error("{at}{message}")]
    WrongShape {
        /// Which sample (`sample 2: `), or empty.
        at: String,
        /// What is wrong.
        message: String,
    },
    /// More samples than `MAX_SAMPLES_PER_REQUEST`.
    #[error("request has more than {limit} samples (MAX_SAMPLES_PER_REQUEST)")]
    TooManySamples {
        /// The configured limit.
        limit: usize,
    },
    /// A value that is NaN or infinite (possible through the proto3 JSON strings
    /// `"NaN"`, `"Infinity"`, `"-Infinity"`).
    #[error("invalid_value: sample {index} metric {metric:?} is {value}")]
    NonFinite {
        /// Position of the sample in the body, from 0.
        index: usize,
        /// The metric.
        metric: String,
        /// The value.
        value: f64,
        /// Samples in the request, all refused with it.
        samples: usize,
    },
}

impl BodyError {
    /// The `reason` and sample count under which the refusal is counted in
    /// `tidewatch_samples_rejected_total`, when it is a sample-level reason.
    pub(crate) fn rejected_samples(&self) -> Option<(&'static str, u64)> {
        match self {
            Self::NonFinite { samples, .. } => Some(("invalid_value", *samples as u64)),
            _ => None,
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        ApiError::new(ErrorKind::InvalidArgument, e.to_string())
    }
}

/// Parses a whole body into samples, in order, or refuses it.
pub(crate) fn parse(
    bytes: &[u8],
    framing: Framing,
    limit: usize,
) -> Result<Vec<Sample>, BodyError> {
    let mut samples = Vec::new();
    match framing {
        Framing::Json => {
            let value =
                serde_json::from_slice::<Value>(bytes).map_err(|e| BodyError::Malformed {
                    at: String::new(),
                    message: e.to_string(),
                })?;
            document(value, "", &mut samples, limit)?;
        }
        Framing::NdJson => {
            for (number, line) in bytes.split(|b| *b == b'\n').enumerate() {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let at = format!("line {}: ", number + 1);
                let value =
                    serde_json::from_slice::<Value>(line).map_err(|e| BodyError::Malformed {
                        at: format!(" on line {}", number + 1),
                        message: e.to_string(),
                    })?;
                document(value, &at, &mut samples, limit)?;
            }
        }
    }
    check_finite(&samples)?;
    Ok(samples)
}

/// One JSON document: a sample, an array of samples, or `{"samples":[...]}`.
fn document(value: Value, at: &str, out: &mut Vec<Sample>, limit: usize) -> Result<(), BodyError> {
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut map) if is_wrapper(&map) => {
            if let Some(other) = map.keys().find(|k| *k != "samples") {
                return Err(BodyError::WrongShape {
                    at: at.to_owned(),
                    message: format!(
                        "unknown field {other:?} next to \"samples\" (expected only \"samples\")"
                    ),
                });
            }
            match map.remove("samples") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            }
        }
        single => vec![single],
    };
    if out.len() + items.len() > limit {
        return Err(BodyError::TooManySamples { limit });
    }
    for item in items {
        let index = out.len();
        let sample = sample(item).map_err(|message| BodyError::WrongShape {
            at: format!("{at}sample {index}: "),
            message,
        })?;
        out.push(sample);
    }
    Ok(())
}

/// `{"samples":[...]}`: an object whose `samples` is an array and that is no canonical
/// sample (a flat sample may have a numeric metric called `samples`).
fn is_wrapper(map: &Map<String, Value>) -> bool {
    matches!(map.get("samples"), Some(Value::Array(_))) && !map.contains_key("metrics")
}

/// One sample, canonical (it has `metrics`) or flat.
fn sample(value: Value) -> Result<Sample, String> {
    match value {
        Value::Object(mut map) if map.contains_key("metrics") => {
            // proto3 JSON: null is a field's default value (pbjson refuses it for some
            // types); `seq` by the same rules as a flat sample's (pbjson takes no `7.0`).
            map.retain(|_, value| !value.is_null());
            if let Some(value) = map.get_mut("seq") {
                *value = Value::String(seq(value.take())?.to_string());
            }
            // An RFC 3339 time by the same rules as a flat sample's (a leap second
            // is the next second's first instant, which pbjson would keep as nanos
            // past a second that no proto3 JSON writer accepts).
            let time = match map.remove("time") {
                Some(value @ Value::String(_)) => Some(timestamp("time", value)?),
                Some(other) => {
                    map.insert("time".into(), other);
                    None
                }
                None => None,
            };
            let mut sample = Sample::deserialize(Value::Object(map)).map_err(|e| e.to_string())?;
            if time.is_some() {
                sample.time = time;
            }
            Ok(sample)
        }
        Value::Object(map) => flat(map),
        other => Err(format!(
            "expected a sample object, got {}",
            json_type(&other)
        )),
    }
}

/// A flat seed-style sample: `timestamp`/`time`, `device_id`/`deviceId`, `seq`, and
/// every other field a numeric metric.
fn flat(map: Map<String, Value>) -> Result<Sample, String> {
    let mut sample = Sample::default();
    let mut seen_id = false;
    for (key, value) in map {
        match key.as_str() {
            "timestamp" | "time" => {
                if sample.time.is_some() {
                    return Err("both \"timestamp\" and \"time\" given".into());
                }
                sample.time = Some(timestamp(&key, value)?);
            }
            "device_id" | "deviceId" => match value {
                // Both spellings at once are a conflict, as they are for a canonical
                // sample (proto3 JSON calls it a duplicate field), not last-one-wins.
                Value::String(_) if seen_id => {
                    return Err("both \"device_id\" and \"deviceId\" given".into());
                }
                Value::String(id) => {
                    seen_id = true;
                    sample.device_id = id;
                }
                other => {
                    return Err(format!(
                        "field {key:?} must be a string, got {}",
                        json_type(&other)
                    ));
                }
            },
            "seq" => sample.seq = seq(value)?,
            _ => match value {
                Value::Number(n) => {
                    // Without serde_json's arbitrary_precision every number is an f64.
                    let v = n.as_f64().unwrap_or(f64::NAN);
                    sample.metrics.insert(key, v);
                }
                other => {
                    return Err(format!(
                        "field {key:?} must be a number (a metric value), got {}; \
                         non-numeric data goes nowhere in a flat sample",
                        json_type(&other)
                    ));
                }
            },
        }
    }
    Ok(sample)
}

/// A numeric `timestamp` is unix seconds (fractions allowed); a string one is RFC 3339.
fn timestamp(key: &str, value: Value) -> Result<Timestamp, String> {
    match value {
        Value::Number(n) => {
            let secs = n.as_f64().unwrap_or(f64::NAN);
            if !TIMESTAMP_SECONDS.contains(&secs) {
                return Err(format!(
                    "field {key:?} is {n}: not unix seconds between years 1 and 9999"
                ));
            }
            let whole = secs.floor();
            let nanos = ((secs - whole) * 1e9).round().min(999_999_999.0);
            Ok(Timestamp {
                seconds: whole as i64,
                nanos: nanos as i32,
            })
        }
        Value::String(s) => {
            let mut t = Timestamp::deserialize(Value::String(s))
                .map_err(|e| format!("field {key:?} is not an RFC 3339 time: {e}"))?;
            // A leap second (`23:59:60`) reads as nanos past 999,999,999, which no
            // Timestamp may hold: it is the first instant of the next second, as the
            // smeared clocks of protobuf's Timestamp count it.
            if t.nanos >= 1_000_000_000 {
                t.seconds += 1;
                t.nanos -= 1_000_000_000;
            }
            if !TIMESTAMP_SECONDS.contains(&(t.seconds as f64)) {
                return Err(format!(
                    "field {key:?} is after 9999-12-31T23:59:59Z, the latest time a sample may hold"
                ));
            }
            Ok(t)
        }
        other => Err(format!(
            "field {key:?} must be unix seconds or an RFC 3339 string, got {}",
            json_type(&other)
        )),
    }
}

/// `seq` as a non-negative integer, a number or a decimal string (proto3 JSON writes
/// uint64 as a string). A number written with a zero fraction or an exponent (`7.0`,
/// `7e2`) is an integer too, as JSON Schema and proto3 JSON parsers take it.
fn seq(value: Value) -> Result<u64, String> {
    // 2^64: every integral double below it converts to u64 exactly.
    const END: f64 = 18_446_744_073_709_551_616.0;
    let parsed = match &value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < END)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("field \"seq\" must be a non-negative integer, got {value}"))
}

/// Refuses the body when any value is NaN or infinite.
fn check_finite(samples: &[Sample]) -> Result<(), BodyError> {
    for (index, sample) in samples.iter().enumerate() {
        if let Some((metric, value)) = sample.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(BodyError::NonFinite {
                index,
                metric: metric.clone(),
                value: *value,
                samples: samples.len(),
            });
        }
    }
    Ok(())
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Result<Vec<Sample>, BodyError> {
        parse(body.as_bytes(), Framing::Json, 100)
    }

    #[test]
    fn seed_flat_shapes() {
        let s = json(r#"{"timestamp": 1710000000, "cpu": 55.0, "rps": 420.0}"#).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].device_id, "");
        assert_eq!(s[0].time.unwrap().seconds, 1_710_000_000);
        assert_eq!(s[0].metrics["cpu"], 55.0);
        assert_eq!(s[0].metrics["rps"], 420.0);

        let s = json(
            r#"{"timestamp": "2024-01-15T10:30:00Z", "device_id": "sensor-1", "cpu": 0.75, "rps": 150}"#,
        )
        .unwrap();
        assert_eq!(s[0].device_id, "sensor-1");
        assert_eq!(s[0].time.unwrap().seconds, 1_705_314_600);
        assert_eq!(s[0].metrics.len(), 2);
        assert_eq!(s[0].metrics["rps"], 150.0);
    }

    #[test]
    fn a_leap_second_is_the_first_instant_of_the_next_second() {
        // Found by the rest_body fuzz target: `:60` read as nanos of 1,000,000,000,
        // a Timestamp no proto3 JSON writer accepts.
        let s = json(r#"{"timestamp": "2016-12-31T23:59:60Z", "cpu": 1}"#).unwrap();
        let t = s[0].time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_483_228_800, 0));
        let s = json(r#"{"timestamp": "2016-12-31T23:59:60.5Z", "cpu": 1}"#).unwrap();
        let t = s[0].time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_483_228_800, 500_000_000));
        assert!(json(r#"{"timestamp": "9999-12-31T23:59:60Z", "cpu": 1}"#).is_err());
        // A canonical sample's `time` too (found by the fuzz target in CI).
        let s = json(r#"{"time": "2024-02-29T23:59:60.999999999Z", "metrics": {"m": 1}}"#);
        let t = s.unwrap()[0].time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_709_251_200, 999_999_999));
        let s = json(r#"{"time": "9999-12-31T23:59:60Z", "metrics": {"m": 1}}"#);
        assert!(s.unwrap_err().to_string().contains("9999-12-31T23:59:59Z"));
    }

    #[test]
    fn fractional_unix_seconds() {
        let s = json(r#"{"timestamp": 1710000000.25, "cpu": 1}"#).unwrap();
        let t = s[0].time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_710_000_000, 250_000_000));
    }

    #[test]
    fn canonical_array_and_wrapper() {
        let one = r#"{"deviceId":"a","time":"2024-01-15T10:30:00Z","metrics":{"rps":1},"seq":"7"}"#;
        let s = json(one).unwrap();
        assert_eq!((s[0].device_id.as_str(), s[0].seq), ("a", 7));
        let s = json(&format!("[{one}, {{\"cpu\": 2}}]")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].metrics["cpu"], 2.0);
        let s = json(&format!("{{\"samples\": [{one}, {one}]}}")).unwrap();
        assert_eq!(s.len(), 2);
        // snake_case field names are proto3 JSON too.
        let s = json(r#"{"device_id":"b","metrics":{"x":1},"seq":3}"#).unwrap();
        assert_eq!((s[0].device_id.as_str(), s[0].seq), ("b", 3));
    }

    #[test]
    fn integral_float_seq_is_an_integer() {
        let s = json(r#"[{"seq": 7.0, "cpu": 1}, {"seq": 8.0, "metrics": {"cpu": 1}}]"#).unwrap();
        assert_eq!((s[0].seq, s[1].seq), (7, 8));
        let s = json(r#"{"seq": null, "time": null, "deviceId": null, "metrics": {"cpu": 1}}"#);
        assert_eq!(s.unwrap()[0].seq, 0, "proto3 JSON: null is the default");
        for bad in [
            r#"{"seq": 7.5, "cpu": 1}"#,
            r#"{"seq": 1e300, "metrics": {}}"#,
        ] {
            assert!(
                matches!(json(bad), Err(BodyError::WrongShape { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn both_device_id_spellings_are_refused() {
        let e = json(r#"{"device_id": "a", "deviceId": "b", "cpu": 1}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sample 0: both \"device_id\" and \"deviceId\" given"
        );
        let e = json(r#"{"device_id": "a", "deviceId": "b", "metrics": {}}"#).unwrap_err();
        assert!(matches!(e, BodyError::WrongShape { .. }), "{e}");
    }

    #[test]
    fn a_numeric_samples_field_is_a_metric() {
        let s = json(r#"{"samples": 3, "cpu": 1}"#).unwrap();
        assert_eq!(s[0].metrics["samples"], 3.0);
    }

    #[test]
    fn ndjson_lines() {
        let body = "{\"rps\": 1}\n\n{\"metrics\":{\"rps\":2}}\r\n[{\"rps\":3},{\"rps\":4}]\n";
        let s = parse(body.as_bytes(), Framing::NdJson, 100).unwrap();
        let values: Vec<f64> = s.iter().map(|s| s.metrics["rps"]).collect();
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0]);
        let e = parse(b"{\"rps\": 1}\n{oops\n", Framing::NdJson, 100).unwrap_err();
        assert!(
            e.to_string().starts_with("malformed JSON on line 2:"),
            "{e}"
        );
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(
            Framing::from_content_type(Some("application/x-ndjson; charset=utf-8")),
            Framing::NdJson
        );
        assert_eq!(
            Framing::from_content_type(Some("application/json")),
            Framing::Json
        );
        assert_eq!(
            Framing::from_content_type(Some("application/x-www-form-urlencoded")),
            Framing::Json
        );
        assert_eq!(Framing::from_content_type(None), Framing::Json);
        assert_eq!(
            Framing::from_content_type(Some(" Application/JSONL ;q=1")),
            Framing::NdJson
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(json("{"), Err(BodyError::Malformed { .. })));
        assert!(matches!(
            json(r#"{"cpu": 1e999}"#),
            Err(BodyError::Malformed { .. })
        ));
        let e = json(r#"{"cpu": "high"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sample 0: field \"cpu\" must be a number (a metric value), got a string; \
             non-numeric data goes nowhere in a flat sample"
        );
        assert!(matches!(
            json(r#"{"metrics": {"cpu": "x"}}"#),
            Err(BodyError::WrongShape { .. })
        ));
        assert!(matches!(
            json(r#"{"metrics": {"cpu": 1}, "extra": 1}"#),
            Err(BodyError::WrongShape { .. })
        ));
        assert!(matches!(json("[1]"), Err(BodyError::WrongShape { .. })));
        assert!(matches!(
            json(r#"{"samples": [], "other": 1}"#),
            Err(BodyError::WrongShape { .. })
        ));
        assert!(matches!(
            json(r#"{"timestamp": "yesterday", "cpu": 1}"#),
            Err(BodyError::WrongShape { .. })
        ));
        assert!(matches!(
            json(r#"{"timestamp": 1e300, "cpu": 1}"#),
            Err(BodyError::WrongShape { .. })
        ));
        assert!(matches!(
            json(r#"{"seq": -1, "cpu": 1}"#),
            Err(BodyError::WrongShape { .. })
        ));
        let e = parse(b"[{\"a\":1},{\"a\":2},{\"a\":3}]", Framing::Json, 2).unwrap_err();
        assert_eq!(e, BodyError::TooManySamples { limit: 2 });
    }

    #[test]
    fn non_finite_values_refuse_the_whole_body() {
        let e = json(r#"[{"cpu": 1}, {"metrics": {"cpu": "NaN"}}]"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid_value: sample 1 metric \"cpu\" is NaN"
        );
        assert_eq!(e.rejected_samples(), Some(("invalid_value", 2)));
        let e = json(r#"{"metrics": {"cpu": "-Infinity"}}"#).unwrap_err();
        assert!(matches!(e, BodyError::NonFinite { .. }));
    }
}
