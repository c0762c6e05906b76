//! Overload protection for both servers, built from tower's own middleware: a global
//! concurrency limit per server (`GlobalConcurrencyLimit` over one shared semaphore)
//! behind `LoadShed`, so a request over the limit is refused at once instead of
//! queueing, and a per-request `Timeout`. Refusals become `ErrorKind::Overloaded`
//! (HTTP `503` with `Retry-After`, gRPC `RESOURCE_EXHAUSTED`) and are counted in
//! `tidewatch_load_shed_total{transport}`; timeouts become `ErrorKind::Timeout`.
//!
//! # Long-lived streams and the concurrency limit
//!
//! A tower concurrency limit holds its slot until the response *future* resolves. For
//! a unary call or an HTTP request that is the whole request, body upload included.
//! For a gRPC stream it is only the opening of the stream: tonic resolves the response
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

use http::HeaderValue;
use tokio::sync::Semaphore;
use tonic::{body::Body, server::NamedService};
use tower::{
    BoxError, Service, ServiceBuilder, limit::GlobalConcurrencyLimitLayer,
    load_shed::LoadShedLayer, timeout::TimeoutLayer, util::BoxCloneSyncService,
};
use tracing::Instrument as _;

use crate::{
    config::nonzero,
    error::{ApiError, ErrorKind},
    grpc::TelemetryRouter,
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
        state.metrics.record_shed(transport);
        let setting = match transport {
            Transport::Grpc => "GRPC_CONCURRENCY_LIMIT",
            Transport::Http => "HTTP_CONCURRENCY_LIMIT",
        };
        ApiError::new(
            ErrorKind::Overloaded,
            format!("server is at its concurrency limit ({setting}); retry shortly"),
        )
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            ErrorKind::Timeout,
            "request took longer than REQUEST_TIMEOUT",
        )
    } else {
        tracing::error!(error = %error, transport = transport.as_str(), "request failed in middleware");
        ApiError::new(ErrorKind::Internal, "internal error")
    }
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // `LoadShed` is always ready: when the limit is reached it says so in `call`.
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                tracing::error!(error = %e, "grpc middleware not ready");
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
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
        let response = self.inner.call(request);
        let answer = async move {
            let mut response = response.await.unwrap_or_else(|e| {
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
