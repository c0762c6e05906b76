//! `Analyze`: the current window statistics of one device, from memory or, when
//! another replica holds the device, from its Redis snapshot.

use tidewatch_proto::v1::{AnalyzeRequest, AnalyzeResponse, Source};

use crate::{
    AppState,
    engine::{analyze_response, normalize_device_id},
    error::{ApiError, ErrorKind},
};

/// Statistics of the device from memory, else from its snapshot (`source` says
/// which), else `NOT_FOUND`; `UNAVAILABLE` when only Redis could tell and it does not
/// answer. Shared by the gateway's `GET /analyze`.
pub(crate) async fn analyze(
    state: &AppState,
    request: &AnalyzeRequest,
) -> Result<AnalyzeResponse, ApiError> {
    let id = normalize_device_id(&request.device_id);
    if let Some(found) = state.engine.analyze(id) {
        return Ok(found);
    }
    if let Some(snapshots) = &state.snapshots {
        match snapshots.read(id).await {
            Ok(Some(device)) => return Ok(analyze_response(&device, Source::Snapshot)),
            Ok(None) => {}
            Err(_) => {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "device {id:?} is not in memory and the snapshot store does not answer; retry"
                    ),
                ));
            }
        }
    }
    Err(ApiError::new(
        ErrorKind::NotFound,
        format!("device {id:?} is unknown: no sample in memory and no snapshot"),
    ))
}
