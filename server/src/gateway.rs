//! The HTTP/JSON gateway (axum on tower, its own port, the same runtime as gRPC).
//!
//! | route | what |
//! |---|---|
//! | `POST /ingest`, `POST /metric` | samples in (JSON or NDJSON, see [`body`]), `{"verdicts":[...]}` out |
//! | `GET /analyze?device_id=X` | `AnalyzeResponse` JSON plus the seed's flat `anomaly` and `<metric>_avg` |
//! | `GET /health`, `GET /healthz` | liveness: `200` while the process serves |
//! | `GET /readyz` | readiness: `503` while starting and while draining |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /anomalies` | the live anomaly feed as Server-Sent Events ([`sse`]) |
//! | `GET /devices`, `GET /window` | device ids by prefix, one device's window values ([`devices`]) |
//! | `DELETE /devices/{id}` | `DeleteDevice`: the device's state gone from every replica and Redis |
//! | `GET /console/` | the web console ([`console`]) |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of all of these ([`openapi`]) |
//!
//! The JSON is the proto3 JSON mapping of the gRPC messages (the generated pbjson
//! impls), so grpcurl and REST clients read the same documents. Every error is
//! `{"error":{"code","message"}}` with the status of its [`ErrorKind`]. Ingestion goes
//! through [`AppState::judge_now`] and [`AppState::judge`] like every transport; a body
//! is parsed and checked as a whole first, so nothing of a refused request is ingested.
//! How each route maps onto the gRPC messages is in `docs/architecture.md`, "Gateway
//! mapping".

mod answer;
pub(crate) mod body;
mod console;
mod devices;
mod guard;
pub(crate) mod openapi;
mod schema_names;
mod sse;
mod track;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Query, Request, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use serde::Serialize;
use tidewatch_proto::{
    json::ProtoDouble,
    v1::{AnalyzeRequest, AnalyzeResponse, DetectorConfig},
};

use self::{
    answer::JsonVerdicts,
    guard::{Admitted, Guard},
};
use crate::{
    error::{ApiError, ErrorKind},
    intake::IntakeError,
    overload::RETRY_AFTER_SECONDS,
    security::policy::Scope,
    service::AppState,
    telemetry::Transport,
};

/// The gateway's routes with their middleware, ready to serve.
pub fn router(state: Arc<AppState>) -> Router {
    // The feed is a long-lived stream: bounded by MAX_WATCHERS, not by the API's
    // concurrency limit and timeout.
    let feed = Router::new()
        .route("/anomalies", get(sse::anomalies))
        .with_state(sse::Feed::new(Arc::clone(&state)))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ));
    // The guard (authentication, the body, shedding, the timeout) applies to the API
    // only; probes and scrapes always answer. One route layer: each boxes the routes
    // once more, and a boxed route is cloned for every request.
    let api = Router::new()
        .route("/ingest", post(ingest))
        .route("/metric", post(ingest))
        .route("/analyze", get(analyze))
        .route("/devices", get(devices::devices))
        .route("/window", get(devices::window))
        .route("/devices/{*id}", delete(devices::delete))
        .route_layer(middleware::from_fn_with_state(
            Guard::new(Arc::clone(&state)),
            guard::guard,
        ));
    Router::new()
        .merge(api)
        .merge(feed)
        .route("/health", get(live))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/console", get(console::redirect))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .fallback(not_found)
        .layer(track::TrackLayer::new(Arc::clone(&state)))
        .with_state(state)
}

/// The routes of a connection admitted past `MAX_CONNECTIONS` (see
/// `connections`): probes and metrics; anything else gets `503` and the connection
/// is closed.
pub fn probe_only_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(live))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(connection_limit)
        .with_state(state)
}

/// What a probe-only connection answers outside the probes.
async fn connection_limit(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.record_shed(Transport::Http);
    let mut response = ApiError::new(
        ErrorKind::Overloaded,
        "the server is at its connection limit (MAX_CONNECTIONS); retry shortly",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The admin listener's routes: probes and metrics only (see `ADMIN_ADDR`).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Finds the caller of a feed request (see [`guard::caller`]) and hands it to the
/// handler; `401` without valid credentials. The API routes get theirs from the
/// [`guard`]; probes, `/metrics`, the OpenAPI document and the console's files are
/// outside both: they carry no device data.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    match guard::caller(&state, &request) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(e) => guard::unauthenticated(request, e),
    }
}

/// A fixed label per route (the route's pattern): paths of unknown routes never
/// become label values (`None`).
fn route_label(path: Option<&str>) -> Option<&'static str> {
    Some(match path? {
        "/ingest" => "/ingest",
        "/metric" => "/metric",
        "/analyze" => "/analyze",
        "/health" => "/health",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/anomalies" => "/anomalies",
        "/devices" => "/devices",
        "/window" => "/window",
        "/devices/{*id}" => "/devices/{id}",
        "/openapi.json" => "/openapi.json",
        "/console" => "/console",
        "/console/" => "/console/",
        "/console/{file}" => "/console/{file}",
        _ => return None,
    })
}

/// The HTTP form of every error: `{"error":{"code","message"}}` with the status of its
/// kind, and `Retry-After` when retrying later helps.
pub(crate) fn error_response(error: ApiError) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        code: &'static str,
        message: &'a str,
    }
    let status =
        StatusCode::from_u16(error.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(
        status,
        &Body {
            error: Detail {
                code: error.kind.as_str(),
                message: &error.message,
            },
        },
    );
    let retry_after = match error.retry_after {
        Some(delay) => Some(delay.as_secs() + u64::from(delay.subsec_nanos() > 0)),
        None if matches!(error.kind, ErrorKind::Overloaded | ErrorKind::Unavailable) => {
            Some(RETRY_AFTER_SECONDS)
        }
        None => None,
    };
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    if error.kind == ErrorKind::Unauthenticated {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self)
    }
}

/// A JSON response.
fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "response serialization failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                r#"{"error":{"code":"internal","message":"internal error"}}"#,
            )
                .into_response()
        }
    }
}

/// Query of `POST /ingest`: the detector for this request's samples, as the
/// `detector` section of an Ingest stream's first message does over gRPC.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct IngestQuery {
    /// Detector name (`zscore`, `robust`); absent means the server's `DETECTOR`.
    #[param(pattern = "^(zscore|robust)?$")]
    detector: Option<String>,
    /// Window size override (0 keeps the detector's).
    #[serde(default)]
    #[param(minimum = 0, maximum = 4096)]
    window_size: u32,
    /// Threshold override (0 keeps the detector's).
    #[serde(default)]
    #[param(minimum = 0)]
    threshold: f64,
    /// Warm-up override (0 keeps the detector's); at most the window size.
    #[serde(default)]
    #[param(minimum = 0)]
    min_samples: u32,
}

impl IngestQuery {
    /// The detector section, or `None` when the query names no detector setting.
    fn detector(self) -> Option<DetectorConfig> {
        let overrides = self.window_size != 0 || self.threshold != 0.0 || self.min_samples != 0;
        (self.detector.is_some() || overrides).then(|| DetectorConfig {
            name: self.detector.unwrap_or_default(),
            window_size: self.window_size,
            threshold: self.threshold,
            min_samples: self.min_samples,
        })
    }
}

/// `POST /ingest` and `POST /metric`.
#[utoipa::path(
    post,
    path = "/ingest",
    tag = "ingest",
    params(IngestQuery),
    request_body(
        description = "Samples: one, an array, or {\"samples\": [...]}; NDJSON takes one \
                       such document per line",
        content(
            (schema_names::IngestBody = "application/json"),
            (String = "application/x-ndjson"),
        ),
    ),
    responses(
        (status = 200, description = "One verdict per sample, in order; a bad sample gets \
                                      an `error` in its verdict", body = schema_names::IngestResponseBody),
        (status = 400, description = "Malformed body or query; nothing was ingested",
         body = schema_names::ErrorBody),
        (status = 408, description = "Body uploaded slower than MIN_UPLOAD_RATE, or not \
                                      within REQUEST_TIMEOUT", body = schema_names::ErrorBody),
        (status = 413, description = "Body larger than MAX_BODY_BYTES", body = schema_names::ErrorBody),
        (status = 503, description = "Overloaded (HTTP_CONCURRENCY_LIMIT, \
                                      MAX_INCOMPLETE_BYTES) or shutting down; retry after \
                                      Retry-After", body = schema_names::ErrorBody),
        (status = 504, description = "REQUEST_TIMEOUT passed", body = schema_names::ErrorBody),
    )
)]
async fn ingest(
    State(state): State<Arc<AppState>>,
    Admitted {
        principal,
        body: bytes,
    }: Admitted,
    query: Result<Query<IngestQuery>, QueryRejection>,
    request: Request,
) -> Response {
    // The headers as the request has them (the `HeaderMap` extractor would copy them).
    let headers = request.headers();
    if let Err(e) = principal.require(Scope::Ingest) {
        return ApiError::from(e).into_response();
    }
    let detector = match query {
        Ok(Query(query)) => state.engine.detector(query.detector().as_ref()),
        Err(e) => Err(ApiError::new(ErrorKind::InvalidArgument, e.body_text())),
    };
    let detector = match detector {
        Ok(detector) => detector,
        Err(e) => return e.into_response(),
    };
    let framing = body::Framing::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let mut samples = match body::parse(&bytes, framing, state.config.max_samples_per_request) {
        Ok(samples) => samples,
        Err(e) => {
            if let Some((reason, samples)) = e.rejected_samples() {
                state
                    .metrics
                    .record_rejected_request(Transport::Http, reason, samples);
            }
            return ApiError::from(e).into_response();
        }
    };
    drop(bytes);
    if let Some(usage) = state.security.usage(&principal)
        && let Err(e) = usage.take_samples(&principal.name, samples.len(), Instant::now())
    {
        return ApiError::from(e).into_response();
    }
    let mut verdicts = JsonVerdicts::new();
    let judged = state.judge_now(
        &principal,
        &samples,
        &detector,
        Transport::Http,
        Instant::now(),
        &mut verdicts,
    );
    if judged.count < samples.len() {
        // A device to restore first, or a batch for the blocking pool: the rest waits,
        // and its verdicts follow the ones judged so far.
        let rest = samples.split_off(judged.count);
        let later = Arc::clone(&state)
            .judge(Arc::clone(&principal), rest, detector, Transport::Http)
            .await;
        verdicts.extend(&later);
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        verdicts.finish(),
    )
        .into_response()
}

/// A refused body at most this large is read and discarded after the `413` (see
/// [`linger`]); a larger one gets the connection closed.
const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// Longest time spent discarding a refused body.
const LINGER_TIME: Duration = Duration::from_secs(10);

/// Reads the whole body, refusing it with `413` past `MAX_BODY_BYTES`: from the
/// `Content-Length` before reading anything when there is one, else as soon as the
/// bytes read pass the limit.
async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::TooLarge,
            format!("request body is larger than {limit} bytes (MAX_BODY_BYTES)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared
        && declared > limit as u64
    {
        linger(headers, body, declared);
        return Err(too_large());
    }
    // A body that arrives in one chunk is kept as it is (no copy); otherwise the
    // chunks are copied together as they come, never reserved at the announced
    // length: an incomplete body holds what was received.
    let mut first: Option<Bytes> = None;
    let mut bytes = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e = e.into_inner();
            match IntakeError::find(&*e) {
                Some(intake) => ApiError::from(intake),
                None => ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!("cannot read the request body: {e}"),
                ),
            }
        })?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total > limit {
                linger(headers, body, 0);
                return Err(too_large());
            }
            match first.take() {
                None if bytes.is_empty() => first = Some(data),
                Some(earlier) => {
                    bytes.extend_from_slice(&earlier);
                    bytes.extend_from_slice(&data);
                }
                None => bytes.extend_from_slice(&data),
            }
        }
    }
    Ok(first.unwrap_or_else(|| bytes.freeze()))
}

/// Reads and discards the rest of a refused body in the background, within
/// [`LINGER_BYTES`] and [`LINGER_TIME`], as nginx's lingering close does: a client that
/// is still uploading when the `413` comes would otherwise get a broken pipe instead
/// of the answer. A client that sent `Expect: 100-continue` (curl does for large
/// bodies) never sends the body, and an announced body past the bound is not worth
/// reading: both just get the answer and a closed connection.
fn linger(headers: &HeaderMap, mut body: Body, declared: u64) {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || declared > LINGER_BYTES {
        return;
    }
    tokio::spawn(async move {
        let discard = async {
            let mut discarded = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                discarded += frame.data_ref().map_or(0, |d| d.len() as u64);
                if discarded > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, discard).await;
    });
}

/// Query of `GET /analyze`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AnalyzeQuery {
    /// The device; absent or empty means `default`.
    #[serde(default, alias = "deviceId")]
    device_id: String,
}

/// `GET /analyze?device_id=X`: the `AnalyzeResponse` JSON plus the seed's flat fields.
#[utoipa::path(
    get,
    path = "/analyze",
    tag = "query",
    params(AnalyzeQuery),
    responses(
        (status = 200, description = "Current window statistics of the device",
         body = schema_names::AnalyzeBody),
        (status = 400, description = "A bad query parameter", body = schema_names::ErrorBody),
        (status = 404, description = "Unknown device", body = schema_names::ErrorBody),
        (status = 503, description = "Overloaded, or Redis unreachable for a device only in \
                                      a snapshot", body = schema_names::ErrorBody),
        (status = 504, description = "REQUEST_TIMEOUT passed", body = schema_names::ErrorBody),
    )
)]
async fn analyze(
    State(state): State<Arc<AppState>>,
    Admitted { principal, .. }: Admitted,
    query: Result<Query<AnalyzeQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(e) => {
            return ApiError::new(ErrorKind::InvalidArgument, e.body_text()).into_response();
        }
    };
    let request = AnalyzeRequest {
        device_id: query.device_id,
    };
    let found = match state.analyze(&principal, &request).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    json_response(StatusCode::OK, &AnalyzeDocument::new(&found))
}

/// The `AnalyzeResponse` JSON followed by the seed's flat fields: `anomaly` (the last
/// value of some metric was anomalous) and `<metric>_avg` (its rolling average).
#[derive(Serialize)]
struct AnalyzeDocument<'a> {
    /// The canonical document, field for field.
    #[serde(flatten)]
    response: &'a AnalyzeResponse,
    /// Whether the device's last sample was an anomaly.
    anomaly: bool,
    /// `<metric>_avg` per metric.
    #[serde(flatten)]
    averages: BTreeMap<String, ProtoDouble>,
}

impl<'a> AnalyzeDocument<'a> {
    fn new(response: &'a AnalyzeResponse) -> Self {
        Self {
            response,
            anomaly: response.metrics.iter().any(|m| m.last_anomaly),
            averages: response
                .metrics
                .iter()
                .map(|m| (format!("{}_avg", m.metric), ProtoDouble(m.rolling_average)))
                .collect(),
        }
    }
}

/// `GET /health` and `GET /healthz`: the process is alive and serving.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "Alive", body = schema_names::StatusBody))
)]
async fn live() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: `200` when serving, `503` while starting or draining.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Serving", body = schema_names::StatusBody),
        (status = 503, description = "Starting or shutting down", body = schema_names::ErrorBody),
    )
)]
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(std::sync::atomic::Ordering::Relaxed) {
        json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    } else {
        ApiError::new(
            ErrorKind::Unavailable,
            "not ready: starting up or shutting down",
        )
        .into_response()
    }
}

/// `GET /metrics`: the Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4",
               content_type = "text/plain", body = String))
)]
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Any other path.
async fn not_found(request: Request) -> Response {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no route for {} {}; see the REST API in the README",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewatch_proto::v1::MetricStats;

    #[test]
    fn seed_fields() {
        let found = AnalyzeResponse {
            device_id: "d".into(),
            metrics: vec![
                MetricStats {
                    metric: "cpu".into(),
                    rolling_average: 0.5,
                    ..MetricStats::default()
                },
                MetricStats {
                    metric: "rps".into(),
                    rolling_average: 425.0,
                    last_anomaly: true,
                    ..MetricStats::default()
                },
            ],
            ..AnalyzeResponse::default()
        };
        let json = serde_json::to_string(&AnalyzeDocument::new(&found)).unwrap();
        assert!(
            json.starts_with(r#"{"deviceId":"d","metrics":["#),
            "canonical fields first: {json}"
        );
        assert!(
            json.ends_with(r#","anomaly":true,"cpu_avg":0.5,"rps_avg":425.0}"#),
            "{json}"
        );
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(route_label(Some("/ingest")), Some("/ingest"));
        assert_eq!(
            route_label(Some("/console/{file}")),
            Some("/console/{file}")
        );
        assert_eq!(route_label(Some("/elsewhere")), None);
        assert_eq!(route_label(None), None);
    }
}
