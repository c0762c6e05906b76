//! `GET /devices` (a page of the device ids in memory, by prefix) and `GET /window` (the
//! values in one device's windows): what the console needs to find a device and chart
//! its recent values. `DELETE /devices/{id}`: the admin call that deletes a device
//! (`DeleteDevice` over HTTP).

use std::sync::Arc;

use axum::{
    extract::{
        Path, Query, State,
        rejection::{PathRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tidewatch_proto::{
    json::{ProtoDouble, ProtoTimestamp},
    v1::DeleteDeviceRequest,
};
use utoipa::{
    IntoParams, ToSchema,
    openapi::{Ref, schema::ArrayBuilder},
};

use super::{
    guard::Admitted,
    json_response,
    schema_names::{DeleteDeviceBody, ErrorBody},
};
use crate::{
    AppState,
    engine::normalize_device_id,
    error::{ApiError, ErrorKind},
    security::policy::Scope,
};

/// Ids per page when the request names no `limit`.
const DEFAULT_PAGE: usize = 100;

/// Most ids in one page.
pub(crate) const MAX_PAGE: usize = 1000;

/// With more devices than this in memory, a listing runs on the blocking pool.
const BLOCKING_SCAN: usize = 10_000;

/// Query of `GET /devices`.
#[derive(Debug, serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DevicesQuery {
    /// Only ids that start with this.
    #[serde(default)]
    prefix: String,
    /// Only ids that sort after this one (bytewise): the `next` of the previous page.
    #[serde(default)]
    after: String,
    /// Most ids in the page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of device ids.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DevicePage {
    /// Device ids in memory, in bytewise order.
    device_ids: Vec<String>,
    /// Present when more ids follow: pass it as `after` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// `GET /devices?prefix=P&after=A&limit=N`: the device ids in memory that start with
/// `P`, after `A`, at most `N`. Devices only in Redis snapshots are not listed.
#[utoipa::path(
    get,
    path = "/devices",
    tag = "console",
    params(DevicesQuery),
    responses(
        (status = 200, description = "A page of device ids", body = DevicePage),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
    )
)]
pub(crate) async fn devices(
    State(state): State<Arc<AppState>>,
    Admitted { principal, .. }: Admitted,
    query: Result<Query<DevicesQuery>, QueryRejection>,
) -> Response {
    if let Err(e) = principal.require(Scope::Analyze) {
        return ApiError::from(e).into_response();
    }
    let Query(query) = match query {
        Ok(query) => query,
        Err(e) => {
            return ApiError::new(ErrorKind::InvalidArgument, e.body_text()).into_response();
        }
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return ApiError::new(
            ErrorKind::InvalidArgument,
            format!("limit must be between 1 and {MAX_PAGE}, got {limit}"),
        )
        .into_response();
    }
    let scan = {
        let state = Arc::clone(&state);
        move || state.engine.device_ids(&query.prefix, &query.after, limit)
    };
    let (ids, more) = if state.engine.device_count() > BLOCKING_SCAN {
        match tokio::task::spawn_blocking(scan).await {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(error = %e, "device listing task failed");
                return ApiError::new(ErrorKind::Internal, "internal error").into_response();
            }
        }
    } else {
        scan()
    };
    let next = if more { ids.last().cloned() } else { None };
    // A page of a namespace-bound caller holds its own devices only; `next` still
    // walks the whole listing, so a page may hold fewer than `limit` ids.
    let ids = if principal.devices.is_everything() {
        ids
    } else {
        ids.into_iter()
            .filter(|id| principal.may_touch(id))
            .collect()
    };
    json_response(
        StatusCode::OK,
        &DevicePage {
            device_ids: ids,
            next,
        },
    )
}

/// Query of `GET /window`.
#[derive(Debug, serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WindowQuery {
    /// The device; absent or empty means `default`.
    #[serde(default, alias = "deviceId")]
    device_id: String,
}

/// The values in one device's windows, with what the z-score detector judges the
/// next value against.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WindowDocument {
    /// The device id.
    device_id: String,
    /// Highest `seq` applied (a decimal string, as proto3 JSON writes uint64).
    #[schema(value_type = String, pattern = "^[0-9]+$")]
    last_seq: String,
    /// Time of the last applied sample (RFC 3339, UTC).
    #[schema(value_type = String, format = DateTime)]
    updated_at: ProtoTimestamp,
    /// The server's z-score threshold (`Z_THRESHOLD`): the band is
    /// `mean ± threshold · stddev`.
    #[schema(value_type = f64)]
    threshold: ProtoDouble,
    /// Values a window needs before it judges (`MIN_SAMPLES`).
    min_samples: usize,
    /// Values a window holds (`WINDOW_SIZE`).
    window_size: usize,
    /// One entry per metric, in the order the device first sent them.
    metrics: Vec<MetricWindow>,
}

/// One metric's window.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MetricWindow {
    /// The metric's name.
    metric: String,
    /// The window's values, oldest first (the newest is the last applied value).
    #[schema(schema_with = doubles)]
    values: Vec<ProtoDouble>,
    /// Mean of the values (`"NaN"` or an infinity where their sum overflows, as in
    /// `GET /analyze`).
    #[schema(schema_with = double)]
    mean: ProtoDouble,
    /// Population standard deviation of the values.
    #[schema(schema_with = double)]
    stddev: ProtoDouble,
}

/// The proto3 JSON double schema of the document (`Double`).
fn double() -> Ref {
    Ref::from_schema_name("Double")
}

/// An array of [`double`]s.
fn doubles() -> ArrayBuilder {
    ArrayBuilder::new().items(double())
}

/// `GET /window?device_id=X`: the values in device `X`'s windows. Only devices in
/// memory: `404` otherwise (`GET /analyze` also reads Redis snapshots).
#[utoipa::path(
    get,
    path = "/window",
    tag = "console",
    params(WindowQuery),
    responses(
        (status = 200, description = "The device's windows", body = WindowDocument),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 404, description = "The device is not in memory", body = ErrorBody),
    )
)]
pub(crate) async fn window(
    State(state): State<Arc<AppState>>,
    Admitted { principal, .. }: Admitted,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> Response {
    if let Err(e) = principal.require(Scope::Analyze) {
        return ApiError::from(e).into_response();
    }
    let Query(query) = match query {
        Ok(query) => query,
        Err(e) => {
            return ApiError::new(ErrorKind::InvalidArgument, e.body_text()).into_response();
        }
    };
    let id = normalize_device_id(&query.device_id);
    if let Err(e) = principal.require_device(id) {
        return ApiError::from(e).into_response();
    }
    let Some(device) = state.engine.device_state(id) else {
        return ApiError::new(
            ErrorKind::NotFound,
            format!("device {id:?} is not in memory"),
        )
        .into_response();
    };
    let config = &state.config;
    let document = WindowDocument {
        device_id: device.id.to_string(),
        last_seq: device.last_seq.to_string(),
        updated_at: ProtoTimestamp(device.updated_at),
        threshold: ProtoDouble(config.z_threshold),
        min_samples: config.min_samples,
        window_size: config.window_size,
        metrics: device
            .metrics
            .iter()
            .map(|m| MetricWindow {
                metric: m.name.to_string(),
                values: m.window.iter().map(ProtoDouble).collect(),
                mean: ProtoDouble(m.window.mean()),
                stddev: ProtoDouble(m.window.stddev()),
            })
            .collect(),
    };
    json_response(StatusCode::OK, &document)
}

/// `DELETE /devices/{id}`: deletes the device's state from memory on every replica and
/// from Redis, as `DeleteDevice` does; the answer is its proto3 JSON. The id is the
/// rest of the path, percent-decoded (`fleet-a/pump-1` or `fleet-a%2Fpump-1`).
#[utoipa::path(
    delete,
    path = "/devices/{id}",
    tag = "admin",
    params(("id" = String, Path, min_length = 1,
            description = "The device id (percent-encoded; a `/` may stay as it is)")),
    responses(
        (status = 200, description = "`deleted` says whether the device had state",
         body = DeleteDeviceBody),
        (status = 400, description = "A device id longer than MAX_DEVICE_ID_LEN, or not \
                                      UTF-8", body = ErrorBody),
        (status = 401, description = "No valid credentials (with authentication on)",
         body = ErrorBody),
        (status = 403, description = "No admin scope, or a device outside the caller's \
                                      namespace (whether or not it exists)", body = ErrorBody),
        (status = 404, description = "No device id in the path (`/devices/`)", body = ErrorBody),
        (status = 503, description = "Overloaded, or the device could not be deleted \
                                      everywhere (Redis does not answer, its owner did not \
                                      let go in time): nothing was deleted; retry",
         body = ErrorBody),
        (status = 504, description = "REQUEST_TIMEOUT passed", body = ErrorBody),
    )
)]
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Admitted { principal, .. }: Admitted,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(id) = match id {
        Ok(id) => id,
        Err(e) => {
            return ApiError::new(ErrorKind::InvalidArgument, e.body_text()).into_response();
        }
    };
    let request = DeleteDeviceRequest { device_id: id };
    match state.delete_device(&principal, &request).await {
        Ok(response) => json_response(StatusCode::OK, &response),
        Err(e) => e.into_response(),
    }
}
