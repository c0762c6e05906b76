//! `WatchAnomalies`: a live feed of anomalous verdicts.
//!
//! The feed is a `tokio::sync::broadcast` channel: ingestion sends into a ring of
//! `WATCH_BUFFER` events and never waits for a watcher. A watcher that falls behind
//! loses the oldest events; its next event carries how many it missed.

use std::sync::Arc;

use tidewatch_proto::v1::{WatchAnomaliesRequest, WatchAnomaliesResponse};
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::BoxStream;
use crate::{
    error::{ApiError, ErrorKind},
    service::{AnomalyEvent, AppState},
};

/// Whether `event` passes the watcher's filters.
fn wanted(filter: &WatchAnomaliesRequest, event: &AnomalyEvent) -> bool {
    let verdict = &event.verdict;
    (filter.device_ids.is_empty() || filter.device_ids.contains(&verdict.device_id))
        && (filter.metrics.is_empty()
            || verdict
                .metrics
                .iter()
                .any(|m| m.anomaly && filter.metrics.contains(&m.metric)))
}

/// The stream of one watcher; ends with `UNAVAILABLE` at shutdown.
pub(crate) fn watch(
    state: &Arc<AppState>,
    filter: WatchAnomaliesRequest,
) -> BoxStream<WatchAnomaliesResponse> {
    let mut receiver = state.anomalies.subscribe();
    let gauge = state.metrics.open_watcher();
    let state = Arc::clone(state);
    Box::pin(async_stream::stream! {
        let _gauge = gauge;
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
                        if wanted(&filter, &event) {
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
    })
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
