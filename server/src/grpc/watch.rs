//! `WatchAnomalies`: a live feed of anomalous verdicts.
//!
//! The feed is a `tokio::sync::broadcast` channel: ingestion sends into a ring of
//! `WATCH_BUFFER` events and never waits for a watcher. A watcher that falls behind
//! loses the oldest events; its next event carries how many it missed.
//!
//! Watchers are bounded the same way over gRPC and HTTP (`GET /anomalies`, see
//! `gateway/sse.rs`): at most `MAX_WATCHERS` open at once, refused as overloaded past
//! it, and at most `MAX_WATCH_FILTER` device ids plus metrics in one filter. Either
//! refusal is counted in `tidewatch_load_shed_total` ([`refused`]).

use std::sync::Arc;

use tidewatch_proto::v1::{WatchAnomaliesRequest, WatchAnomaliesResponse};
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::BoxStream;
use crate::{
    error::{ApiError, ErrorKind},
    security::{
        policy::{Principal, Scope},
        quota::Slot,
    },
    service::{AnomalyEvent, AppState},
    telemetry::{ActiveGauge, Transport},
};

/// Admits one more watcher whose filter has `filter_len` device ids plus metrics, or
/// refuses it: `InvalidArgument` past `MAX_WATCH_FILTER`, `Overloaded` when
/// `MAX_WATCHERS` are open. The gauge counts the watcher while it lives. A refusal
/// the caller does not recover from goes through [`refused`].
pub(crate) fn admit(state: &AppState, filter_len: usize) -> Result<ActiveGauge, ApiError> {
    let max_filter = state.config.max_watch_filter;
    if filter_len > max_filter {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "filter has {filter_len} device ids and metrics, more than {max_filter} \
                 (MAX_WATCH_FILTER)"
            ),
        ));
    }
    state
        .metrics
        .try_open_watcher(state.config.max_watchers)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::Overloaded,
                format!(
                    "{} anomaly watchers are open (MAX_WATCHERS); retry later",
                    state.config.max_watchers
                ),
            )
        })
}

/// A watcher refusal of [`admit`] that stands, counted as shed on `transport`.
pub(crate) fn refused(state: &AppState, transport: Transport, error: ApiError) -> ApiError {
    state.metrics.record_shed(transport);
    error
}

/// Admits a watcher of `principal`: it needs the `watch` scope, every device it names
/// must be in its namespace (a watcher without device ids sees only its namespace's
/// devices), and its watcher quota must have room. The slot counts the watcher while
/// it lives.
pub(crate) fn admit_principal(
    state: &AppState,
    principal: &Principal,
    device_ids: &[String],
) -> Result<Option<Slot>, ApiError> {
    principal.require(Scope::Watch)?;
    for id in device_ids {
        principal.require_device(id)?;
    }
    match state.security.usage(principal) {
        Some(usage) => Ok(Some(usage.open_watcher(&principal.name)?)),
        None => Ok(None),
    }
}

/// Whether `event` passes the watcher's filters.
pub(crate) fn wanted(filter: &WatchAnomaliesRequest, event: &AnomalyEvent) -> bool {
    let verdict = &event.verdict;
    (filter.device_ids.is_empty() || filter.device_ids.contains(&verdict.device_id))
        && (filter.metrics.is_empty()
            || verdict
                .metrics
                .iter()
                .any(|m| m.anomaly && filter.metrics.contains(&m.metric)))
}

/// The stream of one watcher, once [`admit`]ted; ends with `UNAVAILABLE` at shutdown.
pub(crate) fn watch(
    state: &Arc<AppState>,
    principal: Arc<Principal>,
    filter: WatchAnomaliesRequest,
) -> Result<BoxStream<WatchAnomaliesResponse>, ApiError> {
    let slot = admit_principal(state, &principal, &filter.device_ids)?;
    let gauge = admit(state, filter.device_ids.len() + filter.metrics.len())
        .map_err(|e| refused(state, Transport::Grpc, e))?;
    let mut receiver = state.anomalies.subscribe();
    let state = Arc::clone(state);
    Ok(Box::pin(async_stream::stream! {
        let _gauge = gauge;
        let _slot = slot;
        let mut missed = 0u64;
        loop {
            tokio::select! {
                biased;
                () = state.shutdown.cancelled() => {
                    yield Err(Status::from(ApiError::new(
                        ErrorKind::Unavailable,
                        "server is shutting down; reconnect",
                    )));
                    break;
                }
                received = receiver.recv() => match received {
                    Ok(event) => {
                        if wanted(&filter, &event) && principal.may_touch(&event.verdict.device_id) {
                            yield Ok(WatchAnomaliesResponse {
                                verdict: Some(event.verdict.clone()),
                                missed: std::mem::take(&mut missed),
                                time: Some(event.time),
                            });
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        state.metrics.record_watch_missed(n);
                        missed += n;
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewatch_proto::v1::{MetricVerdict, Verdict};

    fn event(device: &str, metrics: &[(&str, bool)]) -> AnomalyEvent {
        AnomalyEvent {
            verdict: Verdict {
                device_id: device.into(),
                anomaly: true,
                metrics: metrics
                    .iter()
                    .map(|(m, a)| MetricVerdict {
                        metric: (*m).into(),
                        anomaly: *a,
                        ..MetricVerdict::default()
                    })
                    .collect(),
                ..Verdict::default()
            },
            time: Default::default(),
        }
    }

    #[test]
    fn filters() {
        let all = WatchAnomaliesRequest::default();
        assert!(wanted(&all, &event("a", &[("cpu", true)])));
        let by_device = WatchAnomaliesRequest {
            device_ids: vec!["b".into()],
            ..Default::default()
        };
        assert!(!wanted(&by_device, &event("a", &[("cpu", true)])));
        assert!(wanted(&by_device, &event("b", &[("cpu", true)])));
        let by_metric = WatchAnomaliesRequest {
            metrics: vec!["rps".into()],
            ..Default::default()
        };
        // rps is present but not anomalous: not wanted.
        assert!(!wanted(
            &by_metric,
            &event("a", &[("cpu", true), ("rps", false)])
        ));
        assert!(wanted(&by_metric, &event("a", &[("rps", true)])));
    }
}
