//! The process lifecycle: bind both sockets, start the gRPC server (with health and
//! reflection), the background tasks and the HTTP gateway, serve until the shutdown
//! future resolves, then drain and write the final snapshot flush, all inside
//! `SHUTDOWN_TIMEOUT` (`docs/architecture.md`, "Shutdown and drain").

use std::{
    convert::Infallible,
    future::{Future, IntoFuture as _},
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tidewatch_proto::v1::telemetry_service_server::TelemetryServiceServer;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};
use tower::{
    ServiceExt as _,
    layer::util::{Identity, Stack},
};

use crate::{
    config::{Config, OtlpProtocol, Reflection, nonzero},
    connections::{ActiveBody, Admission, Conn, HasConn as _, IdleWatch, PROBE_HEADROOM},
    gateway, grpc, overload,
    security::tls,
    service::AppState,
    tasks::Background,
};

/// A server whose sockets are bound; [`Server::serve`] runs it.
#[derive(Debug)]
pub struct Server {
    /// Shared by every handler.
    state: Arc<AppState>,
    /// The gRPC listener.
    grpc: TcpListener,
    /// The HTTP gateway listener.
    http: TcpListener,
    /// The admin listener (`ADMIN_ADDR`), when set.
    admin: Option<TcpListener>,
}

/// The running gRPC server.
struct GrpcTask {
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Ends when every closed connection has finished lingering (see
    /// `grpc::incoming`): the drain waits for them too.
    lingered: mpsc::Receiver<()>,
}

/// The running HTTP gateway.
struct HttpTask {
    task: JoinHandle<io::Result<()>>,
    /// Stops accepting; in-flight requests finish.
    stop: CancellationToken,
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
        let admin = match config.admin_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot bind ADMIN_ADDR {addr}"))?,
            ),
            None => None,
        };
        let state = Arc::new(AppState::new(config)?);
        Ok(Self {
            state,
            grpc,
            http,
            admin,
        })
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
    /// 4. with both servers closed nothing can change a window any more: the final
    ///    snapshot flush writes what is dirty.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            state,
            grpc,
            http,
            admin,
        } = self;
        // Probes and scrapes answer until the process ends, draining included.
        let admin = match admin {
            Some(listener) => {
                let addr = listener.local_addr()?;
                tracing::info!(%addr, "admin listening");
                let router = gateway::admin_router(Arc::clone(&state));
                Some(tokio::spawn(axum::serve(listener, router).into_future()))
            }
            None => None,
        };
        let config = Arc::clone(&state.config);
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;

        let (health, grpc) = start_grpc(&state, grpc).await?;
        let background = Background::start(&state);
        announce_storage(&state);
        announce_telemetry(&state);
        announce_memory(&state);
        // Ready before the gateway answers its first request: `/readyz` is 503 only
        // while the server is not serving yet (connections wait in the backlog until
        // here) and while it drains.
        state.ready.store(true, Ordering::Relaxed);
        let http = start_http(&state, http)?;
        announce_security(&state);
        check_file_limit(&config);
        tracing::info!(%http_addr, "http listening");
        tracing::info!(%grpc_addr, "grpc listening");

        shutdown.await;
        let started = Instant::now();
        tracing::info!(timeout = ?config.shutdown_timeout, "shutting down: draining streams");
        not_ready(&state, &health).await;
        let reserve = flush_reserve(&state);
        drain(
            &state,
            grpc,
            http,
            &background,
            config.shutdown_timeout - reserve,
        )
        .await;
        final_flush(&state, background, started, reserve).await;
        stop_telemetry(&state).await;
        if let Some(admin) = admin {
            admin.abort();
        }
        tracing::info!(elapsed = ?started.elapsed(), "shutdown complete");
        Ok(())
    }
}

/// Binds and serves until `shutdown` resolves: what the binary runs.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::bind(config).await?.serve(shutdown).await
}

/// Starts the gRPC server on `listener`, reporting the API as serving in gRPC health;
/// it stops accepting when `state.shutdown` is cancelled.
async fn start_grpc(
    state: &Arc<AppState>,
    listener: TcpListener,
) -> anyhow::Result<(HealthReporter, GrpcTask)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TelemetryServiceServer<grpc::TelemetryApi>>()
        .await;
    let services = grpc_services(state, health_service)?;
    let drained = state.shutdown.clone();
    let (lingering, lingered) = mpsc::channel::<()>(1);
    let admission = Admission::new(
        state.config.max_connections,
        nonzero(state.config.connection_idle_timeout),
        state.config.header_read_timeout,
    );
    let incoming = tls::maybe_tls(
        grpc::incoming(
            listener,
            state.config.shutdown_timeout,
            state.config.flush_consolidation,
            lingering,
            admission,
        ),
        state.security.grpc_tls.clone(),
        state.config.tls_handshake_timeout,
    );
    let server = services.serve_with_incoming_shutdown(incoming, async move {
        drained.cancelled().await;
    });
    let task = tokio::spawn(server);
    Ok((health, GrpcTask { task, lingered }))
}

/// The gRPC services: health, reflection (v1, and v1alpha since grpcurl 1.8 speaks
/// only that) and the API behind its overload guard, all behind the intake layer
/// (`overload::GrpcIntakeLayer`), with `MAX_CONCURRENT_STREAMS`, keepalive PINGs and
/// the connection age limit.
fn grpc_services(
    state: &Arc<AppState>,
    health: HealthServer<impl Health>,
) -> anyhow::Result<Router<Stack<overload::GrpcIntakeLayer, Identity>>> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidewatch_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let config = &state.config;
    // The compressions of every generated service (`grpc::compression`): each type has
    // its own `accept_compressed`/`send_compressed`, so a macro applies them.
    let (accept, send) = grpc::compression(config);
    macro_rules! compressed {
        ($service:expr) => {{
            let mut service = $service;
            for &encoding in &accept {
                service = service.accept_compressed(encoding);
            }
            for &encoding in &send {
                service = service.send_compressed(encoding);
            }
            service
        }};
    }
    let health = compressed!(health);
    let reflection_v1 = compressed!(reflection().build_v1()?);
    let reflection_v1alpha = compressed!(reflection().build_v1alpha()?);
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(nonzero(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .layer(overload::GrpcIntakeLayer::new(state));
    if let Some(age) = nonzero(config.max_connection_age) {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(config.max_connection_age_grace);
    }
    let api = grpc::TelemetryApi::new(Arc::clone(state)).into_server();
    let mut router = builder.add_service(health);
    match config.reflection {
        Reflection::Auth => {
            router = router
                .add_service(grpc::Authenticated::new(state, reflection_v1))
                .add_service(grpc::Authenticated::new(state, reflection_v1alpha));
        }
        Reflection::Open => {
            router = router
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha);
        }
        Reflection::Off => {}
    }
    Ok(router.add_service(overload::guard_grpc(state, api)))
}

/// Starts the HTTP gateway on `listener`; it runs until its `stop` is cancelled.
fn start_http(state: &Arc<AppState>, listener: TcpListener) -> io::Result<HttpTask> {
    let config = &state.config;
    let stop = CancellationToken::new();
    let admission = Admission::new(
        config.max_connections,
        nonzero(config.connection_idle_timeout),
        config.header_read_timeout,
    );
    let listener = tls::GatewayListener::new(
        listener,
        state.security.http_tls.clone(),
        config.tls_handshake_timeout,
        admission,
    )?;
    let apps = HttpApps {
        full: gateway::router(Arc::clone(state)),
        probes: gateway::probe_only_router(Arc::clone(state)),
    };
    let task = tokio::spawn(serve_http(
        listener,
        apps,
        http_builder(config),
        stop.clone(),
    ));
    Ok(HttpTask { task, stop })
}

/// The gateway's HTTP/1 and HTTP/2 settings: `HEADER_READ_TIMEOUT`,
/// `MAX_CONCURRENT_STREAMS`, keepalive PINGs.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.max_concurrent_streams)
        .keep_alive_interval(nonzero(config.http2_keepalive_interval))
        .keep_alive_timeout(config.http2_keepalive_timeout);
    builder
}

/// The gateway's routes: all of them, and those a probe-only connection gets.
#[derive(Clone)]
struct HttpApps {
    full: axum::Router,
    probes: axum::Router,
}

/// The gateway's accept loop, as `axum::serve` runs it, with the connection settings
/// axum does not expose: each connection is served with `builder`, gets its
/// [`tls::PeerInfo`] (in each request's extensions as
/// `axum::extract::ConnectInfo<Arc<PeerInfo>>`), keeps itself active while a request
/// is answered, and is closed gracefully once idle for `CONNECTION_IDLE_TIMEOUT` or
/// when `stop` is cancelled (which also stops accepting); returns once every
/// connection is closed.
async fn serve_http(
    mut listener: tls::GatewayListener,
    apps: HttpApps,
    builder: auto::Builder<TokioExecutor>,
    stop: CancellationToken,
) -> io::Result<()> {
    use axum::serve::Listener as _;
    let (open, mut closed) = mpsc::channel::<()>(1);
    loop {
        let (io, addr) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let conn = io.inner().conn();
        // Shared by the connection's requests: each one's extension is an `Arc` clone.
        let peer = Arc::new(tls::PeerInfo {
            remote_addr: Some(addr),
            identity: io.identity().cloned(),
            conn: conn.clone(),
        });
        let app = if conn.as_ref().is_some_and(|c| c.probe_only()) {
            apps.probes.clone()
        } else {
            apps.full.clone()
        };
        let active = conn.clone();
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(Arc::clone(&peer)));
            let activity = active.as_ref().map(Conn::enter);
            let answer = app.clone().oneshot(request);
            async move {
                let response = answer.await?;
                // Hyper takes the wrapper as it is: no second boxing of the body.
                Ok::<_, Infallible>(response.map(|body| ActiveBody::new(body, activity)))
            }
        });
        let builder = builder.clone();
        let stop = stop.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let _open = open;
            // The stop token and the idle watch are awaited in a task of their own,
            // which wakes only when one of them fires: polled beside the connection,
            // they would be polled again at each of its wake-ups, several per request.
            let (close, closing) = oneshot::channel();
            tokio::spawn(close_when(
                stop,
                conn.as_ref().and_then(Conn::idle_watch),
                close,
            ));
            let connection = builder.serve_connection(TokioIo::new(io), service);
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                biased;
                result = connection.as_mut() => result,
                _ = closing => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(open);
    while closed.recv().await.is_some() {}
    Ok(())
}

/// Tells the connection task through `close` to close its connection gracefully,
/// once `stop` is cancelled or the connection is idle for its timeout (see
/// [`IdleWatch`]); returns without a word when the connection task ends first.
async fn close_when(
    stop: CancellationToken,
    mut idle: Option<IdleWatch>,
    mut close: oneshot::Sender<()>,
) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = idle_of(&mut idle) => {}
        () = close.closed() => return,
    }
    let _ = close.send(());
}

/// Resolves when the connection of `watch` is idle for its timeout; never without one.
async fn idle_of(watch: &mut Option<IdleWatch>) {
    match watch {
        Some(watch) => watch.idle().await,
        None => std::future::pending().await,
    }
}

/// Warns when the process may open fewer files than `MAX_CONNECTIONS` needs on both
/// listeners, with their probe headroom and a margin for the rest (Redis, OTLP): past
/// the file limit, accepting fails and probes stop answering.
fn check_file_limit(config: &Config) {
    if config.max_connections == 0 {
        return;
    }
    let needed = 2 * (config.max_connections + PROBE_HEADROOM) + FILE_MARGIN;
    let Some(limit) = open_files_limit() else {
        return;
    };
    if needed > limit {
        tracing::warn!(
            max_connections = config.max_connections,
            needed,
            limit,
            "MAX_CONNECTIONS needs more file descriptors than the process may open (ulimit -n): raise the limit or lower MAX_CONNECTIONS"
        );
    }
}

/// File descriptors kept for everything but the two listeners' connections.
const FILE_MARGIN: usize = 256;

/// The soft limit on open files (Linux `/proc/self/limits`), if known and finite.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Logs how the listeners are protected, once; an exposed listener without TLS or
/// authentication (allowed by `ALLOW_INSECURE`) is a warning at every start.
fn announce_security(state: &AppState) {
    let config = &state.config;
    let security = &state.security;
    tracing::info!(
        tls = security.grpc_tls.is_some(),
        mutual_tls = config.tls_client_ca.is_some(),
        authentication = security.authenticates(),
        reflection = config.reflection.as_str(),
        "security"
    );
    if config.insecure_exposure() {
        tracing::warn!(
            grpc_addr = %config.grpc_addr,
            listen_addr = %config.listen_addr,
            "ALLOW_INSECURE: serving outside loopback without TLS or without authentication"
        );
    }
}

/// Logs the memory budget and where it came from, once at start.
fn announce_memory(state: &AppState) {
    let (_, source) = state.config.memory_budget();
    tracing::info!(
        memory_budget = state.engine.memory_budget(),
        source = %source.describe(),
        max_devices = state.config.max_devices,
        max_stream_window = state.config.max_stream_window,
        "memory budget"
    );
}

/// Says where OpenTelemetry data goes, once at start (endpoints may carry
/// credentials in their user info: only scheme, host and port are logged).
fn announce_telemetry(state: &AppState) {
    let Ok(otel) = state.config.otel() else {
        return;
    };
    let shown = |endpoint: &Option<String>| {
        endpoint.as_deref().map_or_else(
            || "off".to_owned(),
            |e| match e.parse::<http::Uri>() {
                Ok(uri) => format!(
                    "{}://{}{}{}",
                    uri.scheme_str().unwrap_or("http"),
                    uri.host().unwrap_or_default(),
                    uri.port().map_or(String::new(), |p| format!(":{p}")),
                    uri.path().trim_end_matches('/'),
                ),
                Err(_) => "set".to_owned(),
            },
        )
    };
    let protocol = match otel.protocol {
        OtlpProtocol::Grpc => "grpc",
        OtlpProtocol::HttpProtobuf => "http/protobuf",
    };
    if otel.traces_endpoint.is_none() && otel.metrics_endpoint.is_none() {
        tracing::info!(
            "opentelemetry export off (no OTEL_EXPORTER_OTLP_ENDPOINT): metrics on /metrics only"
        );
        return;
    }
    tracing::info!(
        traces = %shown(&otel.traces_endpoint),
        metrics = %shown(&otel.metrics_endpoint),
        protocol,
        sampler = %state.config.otel_traces_sampler,
        ratio = otel.ratio,
        "opentelemetry export on"
    );
}

/// Exports the spans and metrics still buffered and stops both pipelines, off the
/// runtime's threads (the exports need the runtime) and within
/// [`TELEMETRY_SHUTDOWN`].
async fn stop_telemetry(state: &Arc<AppState>) {
    let state = Arc::clone(state);
    let stop = tokio::task::spawn_blocking(move || {
        state.tracing.shutdown(TELEMETRY_SHUTDOWN);
        state.metrics.shutdown();
    });
    if tokio::time::timeout(TELEMETRY_SHUTDOWN * 2, stop)
        .await
        .is_err()
    {
        tracing::warn!("opentelemetry export did not finish at shutdown");
    }
}

/// Longest wait for each pipeline's last export at shutdown.
const TELEMETRY_SHUTDOWN: Duration = Duration::from_secs(5);

/// Logs where window state lives; with snapshots, also checks Redis in the background
/// so that an unreachable Redis is reported at start without delaying it.
fn announce_storage(state: &AppState) {
    let config = &state.config;
    match &state.snapshots {
        Some(snapshots) => {
            let sc = snapshots.config();
            tracing::info!(
                redis = %sc.redis.url.redacted(),
                tls = snapshots.tls(),
                redis_cluster = sc.cluster_nodes.is_some(),
                interval = ?sc.interval,
                ttl_secs = sc.ttl_secs,
                window_size = config.window_size,
                z_threshold = config.z_threshold,
                min_samples = config.min_samples,
                detector = %config.detectors.detector,
                "snapshots on: window state is written to Redis every SNAPSHOT_INTERVAL and restored on a device's first sample"
            );
            let snapshots = Arc::clone(snapshots);
            tokio::spawn(async move {
                let _ = snapshots.check().await;
            });
        }
        None => tracing::info!(
            window_size = config.window_size,
            z_threshold = config.z_threshold,
            min_samples = config.min_samples,
            detector = %config.detectors.detector,
            "running in memory without Redis (REDIS_URL unset or empty): window state is lost on restart"
        ),
    }
}

/// Drain step 1: `/readyz` answers 503 and gRPC health NOT_SERVING.
async fn not_ready(state: &AppState, health: &HealthReporter) {
    state.ready.store(false, Ordering::Relaxed);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<TelemetryServiceServer<grpc::TelemetryApi>>()
        .await;
}

/// What the drain leaves of `SHUTDOWN_TIMEOUT` for the final snapshot flush.
fn flush_reserve(state: &AppState) -> Duration {
    if state.snapshots.is_some() {
        (state.config.shutdown_timeout / 4).min(Duration::from_secs(5))
    } else {
        Duration::ZERO
    }
}

/// Drain steps 1 to 3 within `budget`; past it, whatever is still open is closed.
async fn drain(
    state: &AppState,
    mut grpc: GrpcTask,
    mut http: HttpTask,
    background: &Background,
    budget: Duration,
) {
    let closing = close(state, &mut grpc, &mut http, background);
    if tokio::time::timeout(budget, closing).await.is_err() {
        tracing::warn!(timeout = ?state.config.shutdown_timeout, "shutdown timed out; closing what is left");
        state.shutdown.cancel();
        background.stop_evictor();
        grpc.task.abort();
        http.task.abort();
    }
}

/// Drain steps 1 to 3 in order: serve on for `SHUTDOWN_DELAY` while not ready, close
/// gRPC (open streams answer what they received and end), wait for its lingering
/// connections, then close HTTP.
async fn close(
    state: &AppState,
    grpc: &mut GrpcTask,
    http: &mut HttpTask,
    background: &Background,
) {
    if let Some(delay) = nonzero(state.config.shutdown_delay) {
        tracing::info!(?delay, "not ready; serving on while load balancers notice");
        tokio::time::sleep(delay).await;
    }
    state.shutdown.cancel();
    background.stop_evictor();
    match (&mut grpc.task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "grpc server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "grpc server task failed"),
    }
    // Every sender is gone once the last connection finished lingering.
    while grpc.lingered.recv().await.is_some() {}
    http.stop.cancel();
    match (&mut http.task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "http server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "http server task failed"),
    }
}

/// Drain step 4, with snapshots: streams are drained and nothing changes any more, so
/// the flusher stops and everything still dirty is written, within what is left of
/// `SHUTDOWN_TIMEOUT` (at least `reserve`).
async fn final_flush(
    state: &AppState,
    background: Background,
    started: Instant,
    reserve: Duration,
) {
    let Some(flush) = background.final_flush(state) else {
        return;
    };
    let left = state
        .config
        .shutdown_timeout
        .saturating_sub(started.elapsed());
    match tokio::time::timeout(left.max(reserve), flush).await {
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
