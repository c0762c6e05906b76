//! Overload protection for both servers: a global concurrency limit per server (one
//! shared semaphore) behind which a request over the limit is refused at once instead
//! of queueing, and a per-request timeout. The gRPC server stacks tower's own
//! middleware for it (`GlobalConcurrencyLimit` behind `LoadShed`, `Timeout`); the
//! gateway applies the same rules in one middleware of its own (`gateway::guard`,
//! which says why), with the same errors ([`overloaded`], [`timed_out`]). Refusals
//! become `ErrorKind::Overloaded` (HTTP `503` with `Retry-After`, gRPC
//! `RESOURCE_EXHAUSTED`) and are counted in
//! `tidewatch_load_shed_total{transport}`; timeouts become `ErrorKind::Timeout`.
//!
//! # Long-lived streams and the concurrency limit
//!
//! A concurrency limit holds its slot until the response *future* resolves. For
//! a unary call or an HTTP request that is the whole handling of the request; the
//! request itself is read before the slot is taken (the gateway's guard,
//! [`prefetch`] here), under the [`crate::intake`] bounds, so a client that uploads
//! slowly or sends nothing holds no slot. For a gRPC stream it is only the opening of
//! the stream: tonic resolves the response
//! as soon as the handler returns the stream, so an Ingest stream open for hours does
//! not hold a slot for hours (a limit of 1,024 would otherwise be used up by 1,024
//! idle devices and refuse everything else). Streams are bounded separately by
//! `MAX_INGEST_STREAMS`, and each stream holds at most one request in flight (see
//! `grpc::ingest`), so the work streams can put on the server at once is bounded by
//! that setting. The timeout likewise covers unary calls and stream openings only.
//!
//! Health checks and reflection on gRPC, and probes and `/metrics` on HTTP, are never
//! shed: an overloaded replica must not be restarted by its liveness probe.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body_util::BodyExt as _;
use hyper::body::{Body as HttpBody, Frame};
use tokio::sync::Semaphore;
use tonic::{body::Body, server::NamedService};
use tower::{
    BoxError, Service, ServiceBuilder, ServiceExt as _, limit::GlobalConcurrencyLimitLayer,
    load_shed::LoadShedLayer, timeout::TimeoutLayer, util::BoxCloneSyncService,
};
use tracing::Instrument as _;

use crate::{
    config::nonzero,
    connections::{ActiveBody, Conn},
    error::{ApiError, ErrorKind},
    grpc::{TelemetryRouter, fast::GRPC_HEADER},
    intake::{IntakeBody, IntakeError, Mode},
    security::tls::PeerInfo,
    service::AppState,
    telemetry::{
        Transport,
        rpc::{CallBody, RpcMethod, grpc_status},
        trace::CallSpan,
    },
};

/// Seconds a shed client is told to wait before retrying (`Retry-After`).
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The error a request over the limit or past its time gets, counting sheds.
pub(crate) fn refusal(state: &AppState, error: &BoxError, transport: Transport) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        overloaded(state, transport)
    } else if error.is::<tower::timeout::error::Elapsed>() {
        timed_out()
    } else {
        tracing::error!(error = %error, transport = transport.as_str(), "request failed in middleware");
        ApiError::new(ErrorKind::Internal, "internal error")
    }
}

/// The error of a request refused at the concurrency limit, counted as shed.
pub(crate) fn overloaded(state: &AppState, transport: Transport) -> ApiError {
    state.metrics.record_shed(transport);
    let setting = match transport {
        Transport::Grpc => "GRPC_CONCURRENCY_LIMIT",
        Transport::Http => "HTTP_CONCURRENCY_LIMIT",
    };
    ApiError::new(
        ErrorKind::Overloaded,
        format!("server is at its concurrency limit ({setting}); retry shortly"),
    )
}

/// The error of a request that took longer than `REQUEST_TIMEOUT`.
pub(crate) fn timed_out() -> ApiError {
    ApiError::new(
        ErrorKind::Timeout,
        "request took longer than REQUEST_TIMEOUT",
    )
}

/// The semaphore behind a concurrency limit, unless the limit is 0 (none).
pub(crate) fn semaphore(limit: usize) -> Option<Arc<Semaphore>> {
    (limit > 0).then(|| Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))))
}

/// The layered gRPC service, type-erased.
type Boxed = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>;

/// `TelemetryService` behind the gRPC overload layers, still routed by tonic under
/// its service name (so health and reflection stay outside the limit). Turns the
/// layers' errors into gRPC statuses, as axum's `HandleError` does for HTTP.
#[derive(Clone)]
pub struct GuardedTelemetry {
    /// The layered service.
    inner: Boxed,
    /// For counting sheds.
    state: Arc<AppState>,
}

impl std::fmt::Debug for GuardedTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedTelemetry").finish_non_exhaustive()
    }
}

impl NamedService for GuardedTelemetry {
    const NAME: &'static str = <TelemetryRouter as NamedService>::NAME;
}

impl Service<http::Request<Body>> for GuardedTelemetry {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call drives its own clone of the layers (`oneshot`), after its request
        // is in: a slot is taken only then.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let state = Arc::clone(&self.state);
        let method = RpcMethod::from_path(request.uri().path());
        let call = state
            .metrics
            .start_rpc(&state.tracing, method, request.headers());
        if method == RpcMethod::Ingest {
            // The stream finishes the call (`grpc::ingest`), with its counts.
            request.extensions_mut().insert(call.clone());
        }
        let log_span = call.span().map(CallSpan::log_span);
        let inner = self.inner.clone();
        let answer = async move {
            // Every method but Ingest takes one request message: it is read (within
            // FIRST_MESSAGE_TIMEOUT, see `GrpcIntake`) before the call takes a
            // concurrency slot, so a call that sends nothing holds none.
            let request = if method == RpcMethod::Ingest {
                Ok(request)
            } else {
                prefetch(request).await
            };
            let response = match request {
                Ok(request) => inner.oneshot(request).await,
                Err(status) => Ok(status.into_http()),
            };
            let mut response = response.unwrap_or_else(|e| {
                let refused = refusal(&state, &e, Transport::Grpc);
                let overloaded = refused.kind == ErrorKind::Overloaded;
                let mut response = tonic::Status::from(refused).into_http::<Body>();
                if overloaded {
                    // The gRPC retry throttling hint (gRFC A6).
                    response.headers_mut().insert(
                        "grpc-retry-pushback-ms",
                        HeaderValue::from(RETRY_AFTER_SECONDS * 1000),
                    );
                }
                response
            });
            if let Some(span) = call.span() {
                span.inject(response.headers_mut());
            }
            if let Some(status) = grpc_status(response.headers()) {
                // A trailers-only answer: the call is over.
                call.finish(status.code(), status.message());
            } else if method != RpcMethod::Ingest {
                response = response.map(|body| Body::new(CallBody::new(body, call)));
            }
            Ok::<_, Infallible>(response)
        };
        match log_span {
            Some(span) => Box::pin(answer.instrument(span)),
            None => Box::pin(answer),
        }
    }
}

/// Reads a one-message request up to its end (or past its first message), so that
/// the call holds no concurrency slot while the client takes its time: the request
/// body is an [`IntakeBody`] in whole mode, so this ends within
/// `FIRST_MESSAGE_TIMEOUT` and `MIN_UPLOAD_RATE`.
async fn prefetch(request: http::Request<Body>) -> Result<http::Request<Body>, tonic::Status> {
    let (parts, mut body) = request.into_parts();
    let mut head = BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                head.extend_from_slice(&data);
                // Data past the first message: the method's own decoder deals with it.
                if head.len() >= GRPC_HEADER {
                    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                    if head.len() > GRPC_HEADER + len {
                        break;
                    }
                }
            }
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                ended = true;
                break;
            }
        }
    }
    if body.is_end_stream() || trailers.is_some() {
        ended = true;
    }
    let rest = if ended { None } else { Some(body) };
    let body = Prefetched {
        head: Some(head.freeze()),
        trailers,
        rest,
    };
    Ok(http::Request::from_parts(parts, Body::new(body)))
}

/// A request body read ahead: the bytes read, then the trailers or the rest.
struct Prefetched {
    head: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    rest: Option<Body>,
}

impl HttpBody for Prefetched {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(head) = self.head.take()
            && !head.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.as_ref().is_none_or(Bytes::is_empty)
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}

/// The gRPC listener's request layer, around every service (health and reflection
/// included): probe-only connections (past `MAX_CONNECTIONS`) answer gRPC health
/// only; each call keeps its connection active (`CONNECTION_IDLE_TIMEOUT`) until its
/// response ends; and its request body is read under the [`crate::intake`] rules:
/// Ingest and reflection streams message by message, every other call as a whole
/// request within `FIRST_MESSAGE_TIMEOUT`.
#[derive(Debug, Clone)]
pub struct GrpcIntakeLayer {
    state: Arc<AppState>,
}

impl GrpcIntakeLayer {
    /// The layer over `state`'s rules.
    pub fn new(state: &Arc<AppState>) -> Self {
        Self {
            state: Arc::clone(state),
        }
    }
}

impl<S> tower::Layer<S> for GrpcIntakeLayer {
    type Service = GrpcIntake<S>;

    fn layer(&self, inner: S) -> GrpcIntake<S> {
        GrpcIntake {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// See [`GrpcIntakeLayer`].
#[derive(Debug, Clone)]
pub struct GrpcIntake<S> {
    inner: S,
    state: Arc<AppState>,
}

/// Methods whose requests are streams of messages, each bounded on its own.
const STREAMING_PATHS: [&str; 3] = [
    "/tidewatch.v1.TelemetryService/Ingest",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What a probe-only connection may call.
const PROBE_PREFIX: &str = "/grpc.health.v1.Health/";

impl<S> Service<http::Request<Body>> for GrpcIntake<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let conn = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.conn.clone());
        let path = request.uri().path();
        if conn.as_ref().is_some_and(|c| c.probe_only()) && !path.starts_with(PROBE_PREFIX) {
            self.state.metrics.record_shed(Transport::Grpc);
            let status: tonic::Status = ApiError::new(
                ErrorKind::Unavailable,
                "the server is at its connection limit (MAX_CONNECTIONS); this connection answers health checks only",
            )
            .into();
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let config = &self.state.config;
        let mode = if STREAMING_PATHS.contains(&path) {
            Mode::Messages
        } else {
            Mode::Whole {
                deadline: nonzero(config.first_message_timeout)
                    .map(|t| tokio::time::Instant::now() + t),
                setting: "FIRST_MESSAGE_TIMEOUT",
            }
        };
        let activity = conn.as_ref().map(Conn::enter);
        // A stream's request body lives as long as the stream: it keeps the
        // connection active, and the response body (the hot path) is not wrapped.
        let (for_request, for_response) = match mode {
            Mode::Messages => (activity, None),
            Mode::Whole { .. } => (None, activity),
        };
        let state = Arc::clone(&self.state);
        let request = request.map(|body| {
            Body::new(
                IntakeBody::new(body, Arc::clone(&state.intake), mode)
                    .keeping(for_request)
                    .map_err(move |e| match IntakeError::find(&*e) {
                        Some(intake) => {
                            if intake == IntakeError::OverBudget {
                                state.metrics.record_shed(Transport::Grpc);
                            }
                            Box::new(tonic::Status::from(ApiError::from(intake))) as BoxError
                        }
                        None => e,
                    }),
            )
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match for_response {
                Some(activity) => {
                    response.map(|body| Body::new(ActiveBody::new(body, Some(activity))))
                }
                None => response,
            })
        })
    }
}

/// Wraps the tonic service in `GRPC_CONCURRENCY_LIMIT` shedding and `REQUEST_TIMEOUT`.
pub(crate) fn guard_grpc(state: &Arc<AppState>, service: TelemetryRouter) -> GuardedTelemetry {
    let config = &state.config;
    let stack = ServiceBuilder::new()
        .layer(LoadShedLayer::new())
        .option_layer(
            semaphore(config.grpc_concurrency_limit)
                .map(GlobalConcurrencyLimitLayer::with_semaphore),
        )
        .option_layer(nonzero(config.request_timeout).map(TimeoutLayer::new))
        .map_err(BoxError::from)
        .service(service);
    GuardedTelemetry {
        inner: BoxCloneSyncService::new(stack),
        state: Arc::clone(state),
    }
}
