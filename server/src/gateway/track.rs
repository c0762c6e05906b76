//! The gateway's outermost layer: every request's duration
//! (`http.server.request.duration`) by method, route and status, and with traces on
//! its server span.
//!
//! A tower layer rather than `middleware::from_fn`: axum clones a route's whole
//! stack for every request, and a `from_fn` layer clones what it wraps once more and
//! boxes it into a `Next` as well, on every request of every route. This one calls
//! what it wraps directly and boxes only its own future.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderMap, Method},
    response::Response,
};
use opentelemetry::KeyValue;
use tower::{Layer, Service};
use tracing::Instrument as _;

use super::route_label;
use crate::{
    service::AppState,
    telemetry::{self, trace::CallSpan},
};

/// Wraps every route in a [`Track`].
#[derive(Debug, Clone)]
pub(super) struct TrackLayer {
    /// The service: its metrics, tracing and scheme.
    state: Arc<AppState>,
}

impl TrackLayer {
    /// Tracks into `state`'s metrics and traces.
    pub(super) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// Records the duration of every request to `inner`, outermost, so shed and refused
/// requests are counted with the status they got. With traces on, a request also
/// gets a server span (except probes and `/metrics`), child of its `traceparent`,
/// named on the response's.
#[derive(Debug, Clone)]
pub(super) struct Track<S> {
    /// The route.
    inner: S,
    /// The service: its metrics, tracing and scheme.
    state: Arc<AppState>,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let state = Arc::clone(&self.state);
        let route = route_label(
            request
                .extensions()
                .get::<MatchedPath>()
                .map(MatchedPath::as_str),
        );
        let method = request.method().clone();
        let scheme = if state.config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let started = Instant::now();
        let span = match route {
            Some("/health" | "/healthz" | "/readyz" | "/metrics") => None,
            _ => http_span(&state, scheme, &method, route, request.headers()),
        };
        let log_span = span.as_ref().map(CallSpan::log_span);
        let answer = match &log_span {
            Some(log_span) => log_span.in_scope(|| self.inner.call(request)),
            None => self.inner.call(request),
        };
        Box::pin(async move {
            let Ok(mut response) = match log_span {
                Some(log_span) => answer.instrument(log_span).await,
                None => answer.await,
            };
            let status = response.status().as_u16();
            state
                .metrics
                .record_http(scheme, &method, route, status, started.elapsed());
            if let Some(span) = span {
                span.inject(response.headers_mut());
                span.set_attributes([KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                )]);
                let reason = response
                    .status()
                    .canonical_reason()
                    .unwrap_or("server error");
                span.end((status >= 500).then_some(reason));
                tracing::debug!(
                    trace_id = %span.trace_id(),
                    method = %method,
                    route = route.unwrap_or_default(),
                    status,
                    "http request finished"
                );
            }
            Ok(response)
        })
    }
}

/// The server span of an HTTP request (`{method} {route}`), when traces are on.
fn http_span(
    state: &AppState,
    scheme: &'static str,
    method: &Method,
    route: Option<&'static str>,
    headers: &HeaderMap,
) -> Option<CallSpan> {
    if !state.tracing.is_on() {
        return None;
    }
    let method = telemetry::http_method(method);
    let mut attributes = vec![
        KeyValue::new("http.request.method", method),
        KeyValue::new("url.scheme", scheme),
    ];
    // `{method} {route}`, or `HTTP` for a method outside the standard ones.
    let method = if method == "_OTHER" { "HTTP" } else { method };
    let name = match route {
        Some(route) => {
            attributes.push(KeyValue::new("http.route", route));
            format!("{method} {route}")
        }
        None => method.to_owned(),
    };
    state.tracing.server_span(name, headers, attributes)
}
