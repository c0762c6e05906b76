//! `GET /openapi.json`: the gateway's OpenAPI 3.1 document, generated with `utoipa` from
//! the handlers' `#[utoipa::path]` attributes, the query types' `IntoParams` and the
//! gateway's own response types' `ToSchema`.
//!
//! The proto messages (samples in, verdicts and `AnalyzeResponse` out) are generated
//! code that carries no derive, so their JSON Schemas are written here, after the proto3
//! JSON mapping the gateway speaks (`docs/architecture.md`, "Gateway mapping"): default
//! values are left out (every field is optional), `uint64` is a decimal string, a
//! `double` is a number or `"NaN"`/`"Infinity"`/`"-Infinity"`, a timestamp is RFC 3339
//! ending in `Z`. `scripts/checks/openapi.sh` holds the real server to the document with
//! schemathesis; the integration tests check that every route is in it.

use std::sync::OnceLock;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;
use utoipa::{
    Modify, OpenApi,
    openapi::{
        OpenApi as Document,
        path::{HttpMethod, PathItem},
    },
};

use super::{
    devices::{DevicePage, MetricWindow, WindowDocument},
    schema_names::AnomalyEventBody,
};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tidewatch gateway",
        description = "The HTTP/JSON gateway of tidewatch: samples in, verdicts out, \
                       device statistics, the live anomaly feed, probes, metrics and the \
                       web console. Bodies are the proto3 JSON of the tidewatch.v1 messages.",
    ),
    paths(
        super::ingest,
        super::analyze,
        super::live,
        super::ready,
        super::metrics,
        super::sse::anomalies,
        super::devices::devices,
        super::devices::window,
        super::devices::delete,
        super::console::index,
        super::console::redirect,
        super::console::asset,
        openapi_json,
    ),
    components(schemas(DevicePage, WindowDocument, MetricWindow, AnomalyEventBody)),
    modifiers(&Aliases),
    tags(
        (name = "ingest", description = "Samples in, verdicts out"),
        (name = "query", description = "Device statistics and the anomaly feed"),
        (name = "operations", description = "Probes, metrics and this document"),
        (name = "console", description = "The web console and what it reads"),
        (name = "admin", description = "Administrative calls (the admin scope)"),
    )
)]
pub(crate) struct ApiDoc;

/// The serialized document, built once: utoipa's, with the proto schemas put in as
/// written (utoipa's `Schema` type has no `not`, which they need).
pub(crate) fn document() -> &'static [u8] {
    static DOCUMENT: OnceLock<Vec<u8>> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let built = serde_json::to_value(ApiDoc::openapi()).map(|mut doc| {
            if let Some(schemas) = doc
                .pointer_mut("/components/schemas")
                .and_then(serde_json::Value::as_object_mut)
            {
                for (name, schema) in proto_schemas() {
                    schemas.insert(name.to_owned(), schema);
                }
            }
            doc
        });
        built
            .and_then(|doc| serde_json::to_vec(&doc))
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "openapi document serialization failed");
                b"{}".to_vec()
            })
    })
}

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of the gateway",
               content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document(),
    )
        .into_response()
}

/// Routes served by the same handler as another documented route: (alias, route,
/// operation id of the alias).
const ALIASES: [(&str, &str, &str); 2] = [
    ("/metric", "/ingest", "metric"),
    ("/healthz", "/health", "healthz"),
];

/// Adds the alias routes as copies of the routes they share a handler with.
struct Aliases;

impl Modify for Aliases {
    fn modify(&self, openapi: &mut Document) {
        for (alias, route, operation_id) in ALIASES {
            let Some(item) = openapi.paths.paths.get(route).cloned() else {
                continue;
            };
            let mut item: PathItem = item;
            for method in [HttpMethod::Get, HttpMethod::Post] {
                let operation = match method {
                    HttpMethod::Get => item.get.as_mut(),
                    _ => item.post.as_mut(),
                };
                if let Some(operation) = operation {
                    operation.operation_id = Some(operation_id.to_owned());
                    operation.summary = Some(format!("Alias of {route}"));
                }
            }
            openapi.paths.paths.insert(alias.to_owned(), item);
        }
    }
}

/// Largest finite double: JSON numbers past it do not fit one and are refused.
const MAX_DOUBLE: f64 = f64::MAX;

/// Unix seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of a
/// numeric `timestamp`.
const TIMESTAMP_SECONDS: (f64, f64) = (-62_135_596_800.0, 253_402_300_799.0);

/// The JSON Schemas of the proto messages, by component name.
fn proto_schemas() -> Vec<(&'static str, serde_json::Value)> {
    let r = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let finite = json!({
        "type": "number", "minimum": -MAX_DOUBLE, "maximum": MAX_DOUBLE,
        "description": "A finite double",
    });
    let seq_in = json!({
        "description": "Per-device sequence number: an integer or a decimal string",
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": u64::MAX},
            {"type": "string", "pattern": "^[0-9]{1,19}$"},
        ],
    });
    let time_in = json!({"type": "string", "format": "date-time",
                         "description": "RFC 3339 time"});
    vec![
        (
            "Double",
            json!({
                "description": "A double in proto3 JSON: a number, or NaN and the \
                                infinities as strings",
                "anyOf": [
                    {"type": "number"},
                    {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
                ],
            }),
        ),
        (
            "Uint64",
            json!({"type": "string", "pattern": "^[0-9]+$",
                   "description": "A uint64 in proto3 JSON: a decimal string"}),
        ),
        (
            "Timestamp",
            json!({"type": "string", "format": "date-time",
                   "pattern": "Z$",
                   "description": "RFC 3339 in UTC, ending in Z"}),
        ),
        (
            "Error",
            json!({
                "type": "object",
                "description": "Every error of the gateway",
                "required": ["error"],
                "additionalProperties": false,
                "properties": {"error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": false,
                    "properties": {
                        "code": {"type": "string", "enum": [
                            "invalid_argument", "too_large", "not_found", "overloaded",
                            "unavailable", "timeout", "internal", "unauthenticated",
                            "permission_denied", "rate_limited",
                        ]},
                        "message": {"type": "string"},
                    },
                }},
            }),
        ),
        (
            "Status",
            json!({
                "type": "object", "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok", "ready"]}},
            }),
        ),
        (
            "Sample",
            json!({
                "type": "object",
                "description": "A canonical sample (tidewatch.v1.Sample): it has `metrics`; \
                                null stands for a field's default, as in proto3 JSON",
                "required": ["metrics"],
                "additionalProperties": false,
                "properties": {
                    "deviceId": {"type": ["string", "null"]},
                    "device_id": {"type": ["string", "null"]},
                    "time": {"anyOf": [time_in, {"type": "null"}]},
                    "metrics": {"type": ["object", "null"], "additionalProperties": finite},
                    "seq": {"anyOf": [seq_in, {"type": "null"}]},
                },
                "not": {"required": ["deviceId", "device_id"]},
            }),
        ),
        (
            "FlatSample",
            json!({
                "type": "object",
                "description": "A flat sample: `device_id`, `timestamp` (unix seconds or \
                                RFC 3339), `seq`, and every other field a metric",
                "properties": {
                    "deviceId": {"type": "string"},
                    "device_id": {"type": "string"},
                    "timestamp": {"anyOf": [
                        {"type": "number", "minimum": TIMESTAMP_SECONDS.0,
                         "maximum": TIMESTAMP_SECONDS.1},
                        time_in,
                    ]},
                    "time": {"anyOf": [
                        {"type": "number", "minimum": TIMESTAMP_SECONDS.0,
                         "maximum": TIMESTAMP_SECONDS.1},
                        time_in,
                    ]},
                    "seq": seq_in,
                },
                "additionalProperties": finite,
                "not": {"anyOf": [
                    {"required": ["metrics"]},
                    {"required": ["deviceId", "device_id"]},
                    {"required": ["timestamp", "time"]},
                ]},
            }),
        ),
        (
            "AnySample",
            json!({"oneOf": [r("Sample"), r("FlatSample")]}),
        ),
        (
            "IngestBody",
            json!({
                "description": "One sample, an array of samples, or {\"samples\": [...]}; \
                                as application/x-ndjson, one such document per line. At \
                                most MAX_SAMPLES_PER_REQUEST samples and MAX_BODY_BYTES \
                                bytes.",
                "oneOf": [
                    r("AnySample"),
                    {"type": "array", "items": r("AnySample")},
                    {
                        "type": "object",
                        "required": ["samples"],
                        "additionalProperties": false,
                        "properties": {"samples": {"type": "array", "items": r("AnySample")}},
                    },
                ],
            }),
        ),
        (
            "MetricVerdict",
            json!({
                "type": "object",
                "properties": {
                    "metric": {"type": "string"},
                    "value": r("Double"),
                    "mean": r("Double"),
                    "stddev": r("Double"),
                    "zScore": r("Double"),
                    "anomaly": {"type": "boolean"},
                    "windowCount": {"type": "integer", "minimum": 0},
                    "score": r("Double"),
                    "alert": {"type": "boolean"},
                },
                "additionalProperties": false,
            }),
        ),
        (
            "Verdict",
            json!({
                "type": "object",
                "properties": {
                    "deviceId": {"type": "string"},
                    "seq": r("Uint64"),
                    "anomaly": {"type": "boolean"},
                    "metrics": {"type": "array", "items": r("MetricVerdict")},
                    "duplicate": {"type": "boolean"},
                    "error": {"type": "string"},
                    "alert": {"type": "boolean"},
                    "score": r("Double"),
                },
                "additionalProperties": false,
            }),
        ),
        (
            "IngestResponse",
            json!({
                "type": "object",
                "description": "One verdict per sample, in order",
                "properties": {"verdicts": {"type": "array", "items": r("Verdict")}},
                "additionalProperties": false,
            }),
        ),
        (
            "MetricStats",
            json!({
                "type": "object",
                "properties": {
                    "metric": {"type": "string"},
                    "rollingAverage": r("Double"),
                    "stddev": r("Double"),
                    "windowCount": {"type": "integer", "minimum": 0},
                    "lastValue": r("Double"),
                    "lastZScore": r("Double"),
                    "lastAnomaly": {"type": "boolean"},
                    "anomaliesTotal": r("Uint64"),
                },
                "additionalProperties": false,
            }),
        ),
        (
            "AnalyzeDocument",
            json!({
                "type": "object",
                "description": "The AnalyzeResponse JSON plus the flat fields `anomaly` \
                                and `<metric>_avg` per metric",
                "properties": {
                    "deviceId": {"type": "string"},
                    "metrics": {"type": "array", "items": r("MetricStats")},
                    "updatedAt": r("Timestamp"),
                    "source": {"type": "string",
                               "enum": ["SOURCE_UNSPECIFIED", "SOURCE_MEMORY",
                                        "SOURCE_SNAPSHOT"]},
                    "lastSeq": r("Uint64"),
                    "anomaly": {"type": "boolean"},
                },
                "required": ["anomaly"],
                "additionalProperties": r("Double"),
            }),
        ),
        (
            "DeleteDeviceResponse",
            json!({
                "type": "object",
                "description": "What DELETE /devices/{id} did",
                "properties": {
                    "deviceId": {"type": "string"},
                    "deleted": {"type": "boolean"},
                },
                "additionalProperties": false,
            }),
        ),
        (
            "WatchAnomaliesResponse",
            json!({
                "type": "object",
                "description": "The data of one `anomaly` event of GET /anomalies",
                "properties": {
                    "verdict": r("Verdict"),
                    "missed": r("Uint64"),
                    "time": r("Timestamp"),
                },
                "additionalProperties": false,
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_slice(document()).unwrap();
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"").skip(1) {
            let target = &reference[..reference.find('"').unwrap()];
            let name = target.strip_prefix("#/components/schemas/").unwrap();
            let schema = &doc["components"]["schemas"][name];
            assert!(
                schema.is_object() && schema.as_object().is_some_and(|o| !o.is_empty()),
                "{target} is missing or empty"
            );
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_aliases() {
        let doc: serde_json::Value = serde_json::from_slice(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["paths"]["/metric"]["post"]["operationId"], "metric");
        assert_eq!(doc["paths"]["/healthz"]["get"]["operationId"], "healthz");
        assert!(doc["components"]["schemas"]["IngestBody"].is_object());
    }
}
