//! The server's background tasks, beside ingestion and never inside a request: the
//! snapshot flusher (which also evicts idle devices, once their state is in Redis) or,
//! without snapshots, the idle evictor. `docs/architecture.md`, "Snapshot protocol",
//! says why an evicted device's newest state must be in Redis first.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    service::AppState,
    snapshot::{FlushReport, Snapshots},
};

/// The background tasks of a running server: one of the two is running.
#[derive(Debug)]
pub(crate) struct Background {
    /// Without snapshots: evicts idle devices until aborted.
    evictor: Option<JoinHandle<()>>,
    /// With snapshots: flushes and evicts until `stop_flusher` is cancelled.
    flusher: Option<JoinHandle<()>>,
    stop_flusher: CancellationToken,
    /// With snapshots: answers other replicas' hand-off requests until shutdown.
    handoffs: Option<JoinHandle<()>>,
}

impl Background {
    /// Starts the flusher when `state` has snapshots, else the evictor.
    pub(crate) fn start(state: &Arc<AppState>) -> Self {
        let security = &state.security;
        if security.grpc_tls.is_some() || security.authenticates() {
            tokio::spawn(Arc::clone(security).reload_periodically(
                state.config.credentials_reload_interval,
                state.shutdown.clone(),
            ));
        }
        let stop_flusher = CancellationToken::new();
        match &state.snapshots {
            Some(snapshots) => Self {
                evictor: None,
                handoffs: Some(tokio::spawn(
                    Arc::clone(snapshots).serve_handoffs(state.shutdown.clone()),
                )),
                flusher: Some(tokio::spawn(flusher(
                    Arc::clone(state),
                    Arc::clone(snapshots),
                    stop_flusher.clone(),
                ))),
                stop_flusher,
            },
            None => Self {
                evictor: Some(tokio::spawn(evict_idle(Arc::clone(state)))),
                handoffs: None,
                flusher: None,
                stop_flusher,
            },
        }
    }

    /// Stops the evictor at once (the flusher's eviction ends with the flusher).
    pub(crate) fn stop_evictor(&self) {
        if let Some(evictor) = &self.evictor {
            evictor.abort();
        }
    }

    /// With snapshots: stops the periodic flush (a flush in progress finishes) and
    /// returns the final flush, which writes everything still dirty. Call it once
    /// nothing can change a window any more.
    pub(crate) fn final_flush(
        self,
        state: &AppState,
    ) -> Option<impl Future<Output = FlushReport> + '_> {
        let (Some(snapshots), Some(flusher)) = (&state.snapshots, self.flusher) else {
            return None;
        };
        self.stop_flusher.cancel();
        if let Some(handoffs) = self.handoffs {
            handoffs.abort();
        }
        Some(async move {
            let _ = flusher.await;
            let report = flush_and_record(state, snapshots).await;
            if report.failed == 0 {
                // Everything is written: other replicas may take every device now.
                snapshots.retire().await;
            }
            report
        })
    }
}

/// How often idle devices are looked for.
fn eviction_period(config: &Config) -> Duration {
    (config.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// Evicts idle devices periodically (without snapshots; with them, the flusher does).
async fn evict_idle(state: Arc<AppState>) {
    let every = eviction_period(&state.config);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let engine = Arc::clone(&state.engine);
        let evicted = tokio::task::spawn_blocking(move || engine.evict_idle(Instant::now()))
            .await
            .unwrap_or_default();
        if !evicted.is_empty() {
            tracing::debug!(devices = evicted.len(), "evicted idle devices");
        }
    }
}

/// The flusher: flushes every `SNAPSHOT_INTERVAL` and evicts idle (clean) devices,
/// until `stop` is cancelled. The final flush at shutdown is [`Background::final_flush`].
async fn flusher(state: Arc<AppState>, snapshots: Arc<Snapshots>, stop: CancellationToken) {
    // The first flush is one interval after start, not at once (`interval`'s first
    // tick is immediate): at start nothing is dirty, and a flush racing with the first
    // samples would write them earlier than SNAPSHOT_INTERVAL says.
    let period = snapshots.config().interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let evict_every = eviction_period(&state.config);
    let mut last_eviction = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        flush_and_record(&state, &snapshots).await;
        snapshots.forget_evicted(&state.engine.take_evicted());
        if last_eviction.elapsed() >= evict_every {
            last_eviction = Instant::now();
            let engine = Arc::clone(&state.engine);
            let evicted =
                tokio::task::spawn_blocking(move || engine.evict_idle_flushed(Instant::now()))
                    .await
                    .unwrap_or_default();
            snapshots.forget(&evicted);
            let evicted = evicted.len();
            if evicted > 0 {
                tracing::debug!(
                    devices = evicted,
                    "evicted idle devices (snapshots written)"
                );
            }
        }
    }
}

/// One flush with its duration and result recorded in metrics.
async fn flush_and_record(state: &AppState, snapshots: &Arc<Snapshots>) -> FlushReport {
    let started = Instant::now();
    let report = snapshots.flush().await;
    if report.written + report.failed > 0 {
        state
            .metrics
            .record_snapshot_flush(started.elapsed(), report.failed == 0);
        tracing::debug!(
            written = report.written,
            failed = report.failed,
            elapsed = ?started.elapsed(),
            "snapshot flush"
        );
    }
    report
}
