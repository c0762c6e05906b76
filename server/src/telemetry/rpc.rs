//! A `TelemetryService` call as OpenTelemetry's RPC semantic conventions see it: its
//! `rpc.server.call.duration` (from its start to its final status: a whole stream is
//! one call) and, when traces are on, its server span.
//!
//! The overload layer (`overload::GuardedTelemetry`) starts an [`RpcCall`] for every
//! call. A trailers-only answer (a refusal) finishes it at once; a unary call or a
//! `WatchAnomalies` stream is finished by [`CallBody`] when its trailers pass; an
//! `Ingest` stream is finished by the stream itself (`grpc::ingest`), which adds its
//! message and sample counts to the span, so the fast path's body is not wrapped.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use opentelemetry::{KeyValue, metrics::Histogram};
use tonic::{Code, Status};

use super::trace::{CallSpan, Tracing};

/// `rpc.service` of every call.
pub const RPC_SERVICE: &str = "tidewatch.v1.TelemetryService";

/// The methods of [`RPC_SERVICE`], as `rpc.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcMethod {
    /// The bidirectional stream of samples and verdicts.
    Ingest,
    /// The unary window statistics.
    Analyze,
    /// The anomaly feed.
    WatchAnomalies,
    /// The admin call that deletes a device.
    DeleteDevice,
    /// A path naming no method of the service (answered `UNIMPLEMENTED`).
    Other,
}

impl RpcMethod {
    /// The method of a request path (`/tidewatch.v1.TelemetryService/Analyze`).
    pub fn from_path(path: &str) -> Self {
        let method = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(RPC_SERVICE))
            .and_then(|p| p.strip_prefix('/'));
        match method {
            Some("Ingest") => Self::Ingest,
            Some("Analyze") => Self::Analyze,
            Some("WatchAnomalies") => Self::WatchAnomalies,
            Some("DeleteDevice") => Self::DeleteDevice,
            _ => Self::Other,
        }
    }

    /// The `rpc.method` value; `_OTHER` for unknown methods, so a client cannot
    /// add series.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "Ingest",
            Self::Analyze => "Analyze",
            Self::WatchAnomalies => "WatchAnomalies",
            Self::DeleteDevice => "DeleteDevice",
            Self::Other => "_OTHER",
        }
    }

    /// The span name: `{rpc.service}/{rpc.method}`.
    fn span_name(self) -> &'static str {
        match self {
            Self::Ingest => "tidewatch.v1.TelemetryService/Ingest",
            Self::Analyze => "tidewatch.v1.TelemetryService/Analyze",
            Self::WatchAnomalies => "tidewatch.v1.TelemetryService/WatchAnomalies",
            Self::DeleteDevice => "tidewatch.v1.TelemetryService/DeleteDevice",
            Self::Other => "tidewatch.v1.TelemetryService/_OTHER",
        }
    }
}

/// One call being observed; clones share its span (an `Ingest` call is held by the
/// overload layer and by its stream, and finished by one of them).
#[derive(Debug, Clone)]
pub struct RpcCall {
    /// Which method.
    method: RpcMethod,
    /// When the call arrived.
    started: Instant,
    /// `rpc.server.call.duration`.
    duration: Histogram<f64>,
    /// The server span, when traces are on.
    span: Option<CallSpan>,
}

impl RpcCall {
    /// Starts observing a call to `method` whose request carries `headers`.
    pub(super) fn start(
        duration: Histogram<f64>,
        tracing: &Tracing,
        method: RpcMethod,
        headers: &HeaderMap,
    ) -> Self {
        let span = tracing.server_span(
            method.span_name(),
            headers,
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", RPC_SERVICE),
                KeyValue::new("rpc.method", method.as_str()),
            ],
        );
        Self {
            method,
            started: Instant::now(),
            duration,
            span,
        }
    }

    /// The method.
    pub fn method(&self) -> RpcMethod {
        self.method
    }

    /// The server span, when traces are on.
    pub fn span(&self) -> Option<&CallSpan> {
        self.span.as_ref()
    }

    /// Finishes the call with its final status: records its duration and ends its
    /// span, as an error for the codes that mean the server failed.
    pub fn finish(&self, code: Code, message: &str) {
        self.duration.record(
            self.started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", RPC_SERVICE),
                KeyValue::new("rpc.method", self.method.as_str()),
                KeyValue::new("rpc.grpc.status_code", code as i64),
            ],
        );
        if let Some(span) = &self.span {
            span.set_attributes([KeyValue::new("rpc.grpc.status_code", code as i64)]);
            span.end(server_error(code).then_some(message));
            tracing::debug!(
                trace_id = %span.trace_id(),
                method = self.method.as_str(),
                code = code as i32,
                "grpc call finished"
            );
        }
    }
}

/// Whether a gRPC status means the server failed (the semantic conventions' list
/// for server spans); other codes are the caller's doing and leave the span unset.
fn server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The status in `grpc-status` / `grpc-message`, when these headers carry one (the
/// trailers, or the headers of a trailers-only answer).
pub fn grpc_status(headers: &HeaderMap) -> Option<Status> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    Some(Status::new(Code::from_i32(code), message))
}

/// A gRPC response body that finishes its call when the trailers pass; without
/// them, when it fails (its error's code) or is dropped (`CANCELLED`: the client
/// left).
pub struct CallBody {
    /// The response body.
    inner: tonic::body::Body,
    /// The call, until finished.
    call: Option<RpcCall>,
}

impl std::fmt::Debug for CallBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBody")
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

impl CallBody {
    /// Wraps `inner`, the body of `call`'s response.
    pub fn new(inner: tonic::body::Body, call: RpcCall) -> Self {
        Self {
            inner,
            call: Some(call),
        }
    }

    fn finish(&mut self, code: Code, message: &str) {
        if let Some(call) = self.call.take() {
            call.finish(code, message);
        }
    }
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = grpc_status(trailers)
                        .unwrap_or_else(|| Status::unknown("trailers without grpc-status"));
                    self.finish(status.code(), status.message());
                }
            }
            Poll::Ready(Some(Err(status))) => self.finish(status.code(), status.message()),
            Poll::Ready(None) => self.finish(Code::Unknown, "ended without a status"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CallBody {
    fn drop(&mut self) {
        self.finish(Code::Cancelled, "the client went away");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_path_and_unknown_ones_are_one_value() {
        for (path, method) in [
            ("/tidewatch.v1.TelemetryService/Ingest", RpcMethod::Ingest),
            ("/tidewatch.v1.TelemetryService/Analyze", RpcMethod::Analyze),
            (
                "/tidewatch.v1.TelemetryService/WatchAnomalies",
                RpcMethod::WatchAnomalies,
            ),
            (
                "/tidewatch.v1.TelemetryService/DeleteDevice",
                RpcMethod::DeleteDevice,
            ),
            ("/tidewatch.v1.TelemetryService/Nope", RpcMethod::Other),
            ("/other.Service/Analyze", RpcMethod::Other),
            ("/tidewatch.v1.TelemetryService/Analyze/x", RpcMethod::Other),
        ] {
            assert_eq!(RpcMethod::from_path(path), method, "{path}");
        }
        assert_eq!(RpcMethod::Other.as_str(), "_OTHER");
    }

    #[test]
    fn statuses_are_read_from_headers() {
        let mut headers = HeaderMap::new();
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", "8".parse().unwrap());
        headers.insert("grpc-message", "full".parse().unwrap());
        let status = grpc_status(&headers).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "full");
        assert!(server_error(Code::Internal) && !server_error(Code::InvalidArgument));
    }
}
