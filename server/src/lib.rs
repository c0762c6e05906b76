//! tidewatch: streaming anomaly detection for device metrics.
//!
//! Devices hold long-lived gRPC `Ingest` streams and get a verdict (rolling average,
//! z-score, anomaly or not) for every sample; REST clients get the same through the
//! HTTP/JSON gateway.
//!
//! # Layout
//!
//! - [`config`]: every setting, as a flag and an environment variable.
//! - [`engine`]: the sharded per-(device, metric) windows and the z-score semantics;
//!   every transport ends up in [`engine::Engine::ingest_batch`].
//! - [`grpc`]: `TelemetryService` (`Ingest`, `Analyze`, `WatchAnomalies`), health and
//!   reflection.
//! - [`gateway`]: the HTTP/JSON gateway (`/ingest`, `/analyze`, probes, `/metrics`),
//!   speaking the proto3 JSON of the same messages.
//! - [`overload`]: concurrency limits with load shedding and request timeouts for both
//!   servers.
//! - [`engine::detector`]: the detectors (`zscore`, `robust`), scores and alert episodes.
//! - [`eval`]: detection quality on labeled data (`tidewatch-eval`).
//! - [`error`]: sample errors and the one mapping of error kinds to gRPC codes and
//!   HTTP statuses.
//! - [`telemetry`]: logging and the OpenTelemetry metrics with their Prometheus
//!   exposition.
//! - [`snapshot`]: Redis snapshots of the windows (flush, restore, Analyze from a
//!   snapshot), on when `REDIS_URL` is set.
//! - [`shutdown`]: signals; the drain sequence itself is [`Server::serve`].
//!
//! A request's path: a socket accepted by [`Server::serve`] → tonic → [`overload`] →
//! [`grpc`] (or axum → [`gateway`]) → [`AppState::answer`] → [`engine`] → verdicts
//! back on the same stream or response, anomalies broadcast to watchers.
//!
//! Tests start the real server on `127.0.0.1:0` with [`Server::bind`] and their own
//! shutdown future; the binary does the same with SIGTERM/SIGINT.

pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gateway;
pub mod grpc;
pub mod overload;
pub mod security;
pub mod shutdown;
pub mod snapshot;
pub mod telemetry;

use std::{
    future::{Future, IntoFuture as _},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{Sample, Verdict},
};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc},
};
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::{
    config::{Config, nonzero},
    engine::{DetectorSpec, Engine, SampleLike, Tee, VerdictSink, now_timestamp},
    snapshot::{SnapshotConfig, Snapshots},
    telemetry::{Metrics, Transport},
};

/// Requests with at least this many samples are judged on the blocking pool.
const BLOCKING_BATCH: usize = 2048;

/// One anomalous verdict on its way to watchers.
#[derive(Debug, Clone)]
pub struct AnomalyEvent {
    /// The verdict, as the ingesting client got it.
    pub verdict: Verdict,
    /// When the server judged it.
    pub time: Timestamp,
}

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The settings the server runs with.
    pub config: Arc<Config>,
    /// The windows.
    pub engine: Arc<Engine>,
    /// Metrics and their exposition.
    pub metrics: Metrics,
    /// The anomaly feed; ingestion sends, watchers subscribe.
    pub anomalies: broadcast::Sender<Arc<AnomalyEvent>>,
    /// Cancelled when shutdown starts; every stream selects on it.
    pub shutdown: CancellationToken,
    /// Readiness: false while starting and while draining (`/readyz`).
    pub ready: AtomicBool,
    /// Redis snapshots, when `REDIS_URL` is set.
    pub snapshots: Option<Arc<Snapshots>>,
}

impl AppState {
    /// Builds the shared state for `config`.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let engine = Arc::new(Engine::new(config.engine()));
        let metrics = Metrics::new(Arc::clone(&engine))?;
        let (anomalies, _) = broadcast::channel(config.watch_buffer);
        let snapshots = match SnapshotConfig::from_config(&config) {
            Some(snapshot_config) => Some(Arc::new(
                Snapshots::new(
                    snapshot_config,
                    Arc::clone(&engine),
                    metrics.shared_counters(),
                )
                .context("REDIS_URL")?,
            )),
            None => None,
        };
        Ok(Self {
            config: Arc::new(config),
            engine,
            metrics,
            anomalies,
            shutdown: CancellationToken::new(),
            ready: AtomicBool::new(false),
            snapshots,
        })
    }

    /// Judges a request right here when that needs no waiting (the usual case: a small
    /// batch). `None` means the caller must use [`AppState::answer`] instead.
    ///
    /// Every transport goes through this pair, so restore-before-judge, metrics and the
    /// anomaly broadcast happen the same way for gRPC and HTTP.
    ///
    /// `detector` comes from [`engine::Engine::detector`] (the stream's or request's
    /// detector section, or the server default).
    pub fn try_answer_now(
        &self,
        samples: &[Sample],
        detector: &DetectorSpec,
        transport: Transport,
    ) -> Option<Vec<Verdict>> {
        self.try_answer_now_at(samples, detector, transport, Instant::now())
    }

    /// [`AppState::try_answer_now`] for a request received at `received`: the one clock
    /// read of a message gives the engine's idle tick and receive time and starts its
    /// latency measurement.
    pub fn try_answer_now_at(
        &self,
        samples: &[Sample],
        detector: &DetectorSpec,
        transport: Transport,
        received: Instant,
    ) -> Option<Vec<Verdict>> {
        if samples.len() >= BLOCKING_BATCH {
            return None;
        }
        if let Some(snapshots) = &self.snapshots
            && snapshots.needs_restore(samples)
        {
            return None;
        }
        Some(self.judge(samples, detector, transport, received))
    }

    /// The gRPC `Ingest` path: judges the samples into `out` in one pass and returns
    /// how many it judged, and the clock read that ended the message's latency (a
    /// caller judging the next message right away starts that one from it: one clock
    /// read per message). Fewer than all means the rest must go through
    /// [`AppState::answer`] (and their verdicts after the ones in `out`): with
    /// snapshots, the first sample of a device that is not in memory stops the pass so
    /// that the device is restored before it is judged; a batch of `BLOCKING_BATCH`
    /// samples or more is judged on the blocking pool from the start.
    pub fn try_answer_prefix<S: SampleLike>(
        &self,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        transport: Transport,
        received: Instant,
        out: &mut impl VerdictSink,
    ) -> (usize, Instant) {
        let samples = samples.into_iter();
        if samples.len() >= BLOCKING_BATCH {
            return (0, received);
        }
        let restore = self.snapshots.is_some();
        self.judge_into(samples, detector, transport, received, out, restore)
    }

    /// Judges a request, waiting where needed: the path for what
    /// [`AppState::try_answer_now`] refused, so it does not ask again (that would scan
    /// the request for unknown devices a second time). Missing devices are restored
    /// first; large batches run on the blocking pool so that a 10,000-sample batch does
    /// not hold a runtime worker for milliseconds.
    pub async fn answer(
        self: Arc<Self>,
        samples: Vec<Sample>,
        detector: DetectorSpec,
        transport: Transport,
    ) -> Vec<Verdict> {
        if let Some(snapshots) = &self.snapshots {
            // Restore before judge: a device's first sample here continues the
            // window its snapshot holds.
            snapshots.restore_missing(&samples).await;
        }
        if samples.len() < BLOCKING_BATCH {
            return self.judge(&samples, &detector, transport, Instant::now());
        }
        let state = Arc::clone(&self);
        match tokio::task::spawn_blocking(move || {
            state.judge(&samples, &detector, transport, Instant::now())
        })
        .await
        {
            Ok(verdicts) => verdicts,
            Err(e) => {
                // Only a panic in the engine gets here; the task is gone with its batch.
                tracing::error!(error = %e, "ingest batch task failed");
                Vec::new()
            }
        }
    }

    /// The synchronous core: engine, metrics once per message, anomaly broadcast.
    /// `started` is the message's one clock read (engine tick, receive time, latency).
    fn judge(
        &self,
        samples: &[Sample],
        detector: &DetectorSpec,
        transport: Transport,
        started: Instant,
    ) -> Vec<Verdict> {
        let mut verdicts = Vec::with_capacity(samples.len());
        let _ = self.judge_into(samples, detector, transport, started, &mut verdicts, false);
        verdicts
    }

    /// [`AppState::judge`] into any sink; returns how many samples were judged (all,
    /// unless `stop_at_unknown`: see [`Engine::ingest_batch_with`]) and when the
    /// judging ended. While
    /// anomaly watchers are subscribed, the verdicts are also kept as prost messages
    /// for them (unless `out` keeps them already). The message's latency is recorded
    /// when it is answered whole here.
    fn judge_into<S: SampleLike>(
        &self,
        samples: impl IntoIterator<Item = S, IntoIter: ExactSizeIterator>,
        detector: &DetectorSpec,
        transport: Transport,
        started: Instant,
        out: &mut impl VerdictSink,
        stop_at_unknown: bool,
    ) -> (usize, Instant) {
        let samples = samples.into_iter();
        let total = samples.len();
        let engine = &self.engine;
        let (outcome, judged) = if !self.metrics.watching() {
            engine.ingest_batch_with(samples, detector, out, started, stop_at_unknown)
        } else if let Some(before) = out.verdicts().map(<[Verdict]>::len) {
            let result = engine.ingest_batch_with(samples, detector, out, started, stop_at_unknown);
            let verdicts = out.verdicts().unwrap_or_default();
            self.publish_anomalies(&verdicts[before.min(verdicts.len())..], result.0.anomalies);
            result
        } else {
            let mut kept: Vec<Verdict> = Vec::new();
            let result = engine.ingest_batch_with(
                samples,
                detector,
                &mut Tee(out, &mut kept),
                started,
                stop_at_unknown,
            );
            self.publish_anomalies(&kept, result.0.anomalies);
            result
        };
        let finished = Instant::now();
        let latency = (judged == total).then(|| finished.saturating_duration_since(started));
        self.metrics.record_batch(transport, &outcome, latency);
        (judged, finished)
    }

    /// Sends the anomalous verdicts of a batch to watchers, if there are any.
    pub fn publish_anomalies(&self, verdicts: &[Verdict], anomalies: u64) {
        if anomalies == 0 || self.anomalies.receiver_count() == 0 {
            return;
        }
        let time = now_timestamp();
        for verdict in verdicts.iter().filter(|v| v.anomaly) {
            // An error means no watcher is left; nobody to tell.
            let _ = self.anomalies.send(Arc::new(AnomalyEvent {
                verdict: verdict.clone(),
                time,
            }));
        }
    }
}

/// A server whose sockets are bound; [`Server::serve`] runs it.
#[derive(Debug)]
pub struct Server {
    /// Shared by every handler.
    state: Arc<AppState>,
    /// The gRPC listener.
    grpc: TcpListener,
    /// The HTTP gateway listener.
    http: TcpListener,
}

impl Server {
    /// Binds the gRPC and HTTP sockets (port 0 picks a free port).
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot bind GRPC_ADDR {}", config.grpc_addr))?;
        let http = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot bind LISTEN_ADDR {}", config.listen_addr))?;
        let state = Arc::new(AppState::new(config)?);
        Ok(Self { state, grpc, http })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or(self.state.config.grpc_addr)
    }

    /// The bound HTTP gateway address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .unwrap_or(self.state.config.listen_addr)
    }

    /// The shared state (tests read counters through it).
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` resolves, then drains within `SHUTDOWN_TIMEOUT`:
    ///
    /// 1. readiness fails (`/readyz` 503, gRPC health NOT_SERVING) while both servers
    ///    keep serving for `SHUTDOWN_DELAY`, so load balancers stop sending first;
    /// 2. gRPC stops accepting; open streams answer what they received and end with
    ///    `UNAVAILABLE`; the HTTP server stays up meanwhile, so probes keep seeing 503;
    /// 3. HTTP stops accepting and finishes its in-flight requests;
    /// 4. with both servers closed nothing can change a window any more.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let config = Arc::clone(&state.config);
        let grpc_addr = self.grpc.local_addr()?;
        let http_addr = self.http.local_addr()?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<tidewatch_proto::v1::telemetry_service_server::TelemetryServiceServer<
                grpc::TelemetryApi,
            >>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidewatch_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidewatch_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(age) = nonzero(config.max_connection_age) {
            builder = builder
                .max_connection_age(age)
                .max_connection_age_grace(config.max_connection_age_grace);
        }
        let drained = state.shutdown.clone();
        // Closed connections linger until their peer has read everything (see
        // `grpc::incoming`); the drain waits for them too.
        let (lingering, mut lingered) = mpsc::channel::<()>(1);
        let incoming = grpc::incoming(self.grpc, config.shutdown_timeout, lingering);
        let grpc_server = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(overload::guard_grpc(
                &state,
                grpc::TelemetryApi::new(Arc::clone(&state)).into_server(),
            ))
            .serve_with_incoming_shutdown(incoming, async move {
                drained.cancelled().await;
            });
        let mut grpc_task = tokio::spawn(grpc_server);

        // With snapshots, eviction runs in the flusher, right after a flush.
        let stop_flusher = CancellationToken::new();
        let (eviction, flusher) = match &state.snapshots {
            Some(snapshots) => (
                None,
                Some(tokio::spawn(snapshot::flusher(
                    Arc::clone(&state),
                    Arc::clone(snapshots),
                    stop_flusher.clone(),
                ))),
            ),
            None => (Some(tokio::spawn(evict_idle(Arc::clone(&state)))), None),
        };

        match &state.snapshots {
            Some(snapshots) => {
                let sc = snapshots.config();
                tracing::info!(
                    redis = %snapshot::store::redact(&sc.url),
                    interval = ?sc.interval,
                    ttl_secs = sc.ttl_secs,
                    window_size = config.window_size,
                    z_threshold = config.z_threshold,
                    min_samples = config.min_samples,
                    "snapshots on: window state is written to Redis every SNAPSHOT_INTERVAL and restored on a device's first sample"
                );
                let snapshots = Arc::clone(snapshots);
                // Reports an unreachable Redis at start without delaying startup.
                tokio::spawn(async move {
                    let _ = snapshots.check().await;
                });
            }
            None => tracing::info!(
                window_size = config.window_size,
                z_threshold = config.z_threshold,
                min_samples = config.min_samples,
                "running in memory without Redis (REDIS_URL unset): window state is lost on restart"
            ),
        }
        // Ready before the gateway answers its first request: `/readyz` is 503 only
        // while the server is not serving yet (connections wait in the backlog until
        // here) and while it drains.
        state.ready.store(true, Ordering::Relaxed);

        let http_stop = CancellationToken::new();
        let http_stopped = http_stop.clone();
        let http_server = axum::serve(
            self.http.tap_io(|tcp| {
                // Small JSON answers: send them now, not after Nagle's delay.
                let _ = tcp.set_nodelay(true);
            }),
            gateway::router(Arc::clone(&state)).into_make_service(),
        )
        .with_graceful_shutdown(async move { http_stopped.cancelled().await });
        let mut http_task = tokio::spawn(http_server.into_future());

        tracing::info!(%http_addr, "http listening");
        tracing::info!(%grpc_addr, "grpc listening");
        tracing::info!(
            window_size = config.window_size,
            z_threshold = config.z_threshold,
            min_samples = config.min_samples,
            detector = %config.detectors.detector,
            "running in memory without Redis (REDIS_URL unset): window state is lost on restart"
        );

        shutdown.await;
        let started = Instant::now();
        tracing::info!(timeout = ?config.shutdown_timeout, "shutting down: draining streams");
        state.ready.store(false, Ordering::Relaxed);
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<tidewatch_proto::v1::telemetry_service_server::TelemetryServiceServer<grpc::TelemetryApi>>()
            .await;

        let drain = async {
            if let Some(delay) = nonzero(config.shutdown_delay) {
                tracing::info!(?delay, "not ready; serving on while load balancers notice");
                tokio::time::sleep(delay).await;
            }
            state.shutdown.cancel();
            if let Some(eviction) = &eviction {
                eviction.abort();
            }
            match (&mut grpc_task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "grpc server ended with an error"),
                Err(e) => tracing::warn!(error = %e, "grpc server task failed"),
            }
            // Every sender is gone once the last connection finished lingering.
            while lingered.recv().await.is_some() {}
            http_stop.cancel();
            match (&mut http_task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "http server ended with an error"),
                Err(e) => tracing::warn!(error = %e, "http server task failed"),
            }
        };
        // Streams get the budget minus a reserve for the final snapshot flush.
        let flush_reserve = if state.snapshots.is_some() {
            (config.shutdown_timeout / 4).min(Duration::from_secs(5))
        } else {
            Duration::ZERO
        };
        if tokio::time::timeout(config.shutdown_timeout - flush_reserve, drain)
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?config.shutdown_timeout, "shutdown timed out; closing what is left");
            state.shutdown.cancel();
            if let Some(eviction) = &eviction {
                eviction.abort();
            }
            grpc_task.abort();
            http_task.abort();
        }
        if let (Some(snapshots), Some(flusher)) = (&state.snapshots, flusher) {
            // Streams are drained: nothing changes any more. Stop the periodic flush
            // (letting one in progress finish), then write everything still dirty.
            stop_flusher.cancel();
            let final_flush = async {
                let _ = flusher.await;
                snapshot::flush_and_record(&state, snapshots).await
            };
            let left = config.shutdown_timeout.saturating_sub(started.elapsed());
            match tokio::time::timeout(left.max(flush_reserve), final_flush).await {
                Ok(report) if report.failed == 0 => {
                    tracing::info!(devices = report.written, "final snapshot flush done");
                }
                Ok(report) => tracing::warn!(
                    written = report.written,
                    failed = report.failed,
                    "final snapshot flush incomplete: the failed devices lose their updates since the last flush"
                ),
                Err(_) => tracing::warn!("final snapshot flush timed out (SHUTDOWN_TIMEOUT)"),
            }
        }
        state.metrics.shutdown();
        tracing::info!(elapsed = ?started.elapsed(), "shutdown complete");
        Ok(())
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

/// Binds and serves until `shutdown` resolves: what the binary runs.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::bind(config).await?.serve(shutdown).await
}
