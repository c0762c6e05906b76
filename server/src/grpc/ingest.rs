//! `Ingest`: one response per request, in order, for as long as the stream lives.
//!
//! [`StreamCore`] is what every `Ingest` stream has whatever carries its messages: the
//! stream limit, the detector, the idle and lifetime timers, the shutdown drain and
//! the asynchronous path of a request that must wait (a restore, a large batch).
//! [`super::fast`] serves the method with it as an HTTP body of its own (what the
//! server mounts); [`IngestStream`] maps a tonic request stream through it (the
//! generated server's `Ingest`, for hosts that mount that instead).
//!
//! Either way the response stream *is* the request stream mapped through the engine:
//! the next request is read only when the next response is asked for, which happens
//! only when HTTP/2 flow control has room to send it. A client that sends without
//! reading verdicts therefore stalls on its own send window.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::Stream;
use opentelemetry::KeyValue;
use tidewatch_proto::v1::IngestResponse;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Code, Request, Status};
use tracing::Instrument as _;

use super::fast::{IngestCore, WireRequest, WireSink};

use crate::{
    config::nonzero,
    engine::DetectorSpec,
    error::{ApiError, ErrorKind},
    security::{
        policy::{Principal, Scope},
        quota::{Slot, Usage},
    },
    service::AppState,
    telemetry::{ActiveGauge, Transport, rpc::RpcCall, trace::CallSpan},
};

/// A request being judged asynchronously (large batch, or a restore to wait for).
type Pending = Pin<Box<dyn Future<Output = Vec<tidewatch_proto::v1::Verdict>> + Send>>;

/// The state of one `Ingest` stream that does not depend on how its messages are
/// framed.
pub(crate) struct StreamCore {
    /// Engine, limits, metrics.
    state: Arc<AppState>,
    /// Resolves when the server starts shutting down. Polled only when the client has
    /// nothing more to read (see [`StreamCore::poll_quiet`]), not per message.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Ends the stream when the client sends nothing for `STREAM_IDLE_TIMEOUT`.
    /// It is not reset per message (a timer-wheel update per message is measurable):
    /// when it fires, it is re-armed for `last_received + STREAM_IDLE_TIMEOUT` if a
    /// message came meanwhile.
    idle: Option<Pin<Box<Sleep>>>,
    /// `STREAM_IDLE_TIMEOUT`, to re-arm `idle`.
    idle_timeout: Option<Duration>,
    /// When the last message arrived.
    last_received: Instant,
    /// Ends the stream at `STREAM_MAX_LIFETIME`.
    lifetime: Option<Pin<Box<Sleep>>>,
    /// A request being judged asynchronously; its verdicts go after the ones the
    /// sink holds already.
    pending: Option<Pending>,
    /// The stream's detector, resolved from its first message.
    detector: Option<DetectorSpec>,
    /// Keeps the active-streams gauge up while the stream lives.
    _active: ActiveGauge,
    /// Who opened the stream (authenticated once, when it opened).
    principal: Arc<Principal>,
    /// The principal's quotas, when it has any.
    usage: Option<Arc<Usage>>,
    /// The principal's stream slot, given back when the stream ends.
    _slot: Option<Slot>,
    /// The call as OpenTelemetry sees it (its duration, its span), finished when
    /// the stream ends; `None` when the service is mounted without the overload
    /// layer that starts it.
    call: Option<RpcCall>,
    /// The `tracing` span naming the call's trace, when it has a span: the
    /// asynchronous work of the stream logs inside it.
    log_span: Option<tracing::Span>,
    /// Messages received, for the call's span.
    messages: u64,
    /// Samples received, for the call's span.
    samples: u64,
    /// Messages judged asynchronously (a restore or a large batch), for the span.
    waited: u64,
}

impl std::fmt::Debug for StreamCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCore")
            .field("pending", &self.pending.is_some())
            .field("detector", &self.detector)
            .finish_non_exhaustive()
    }
}

impl StreamCore {
    /// Starts a stream for `principal`, or refuses it: without the `ingest` scope,
    /// past the principal's stream quota, or when `MAX_INGEST_STREAMS` are open.
    /// `call` is the observed call it finishes when it ends.
    pub(crate) fn start(
        state: &Arc<AppState>,
        principal: Arc<Principal>,
        call: Option<RpcCall>,
    ) -> Result<Self, Status> {
        principal.require(Scope::Ingest).map_err(ApiError::from)?;
        let usage = state.security.usage(&principal);
        let slot = match &usage {
            Some(usage) => Some(usage.open_stream(&principal.name).map_err(ApiError::from)?),
            None => None,
        };
        let active = state
            .metrics
            .try_open_stream(state.config.max_ingest_streams)
            .ok_or_else(|| {
                state.metrics.record_shed(Transport::Grpc);
                Status::from(ApiError::new(
                    ErrorKind::Overloaded,
                    format!(
                        "{} Ingest streams are open; limit is MAX_INGEST_STREAMS",
                        state.config.max_ingest_streams
                    ),
                ))
            })?;
        let idle_timeout = nonzero(state.config.stream_idle_timeout);
        Ok(Self {
            shutdown: Box::pin(state.shutdown.clone().cancelled_owned()),
            idle: idle_timeout.map(|d| Box::pin(tokio::time::sleep(d))),
            idle_timeout,
            last_received: Instant::now(),
            lifetime: nonzero(state.config.stream_max_lifetime)
                .map(|d| Box::pin(tokio::time::sleep(d))),
            pending: None,
            detector: None,
            state: Arc::clone(state),
            _active: active,
            principal,
            usage,
            _slot: slot,
            log_span: call
                .as_ref()
                .and_then(RpcCall::span)
                .map(CallSpan::log_span),
            call,
            messages: 0,
            samples: 0,
            waited: 0,
        })
    }

    /// Judges one request into `sink`, which the caller has opened a response in.
    /// `received` is the clock read that starts the message (engine tick, receive
    /// time, latency). `Ok(Some(t))`: answered whole; `t` is the clock read that
    /// ended its latency, which a caller judging the next message right away can use
    /// as that one's start. `Ok(None)`: the rest is judged asynchronously; poll
    /// [`StreamCore::poll_pending`] until it is ready. `Err` ends the stream.
    pub(crate) fn judge(
        &mut self,
        request: &WireRequest,
        received: Instant,
        sink: &mut WireSink,
    ) -> Result<Option<Instant>, Status> {
        self.last_received = received;
        self.messages += 1;
        self.samples += request.len() as u64;
        let detector = match self.detector {
            Some(detector) => detector,
            None => *self
                .detector
                .insert(self.state.engine.detector(request.detector.as_deref())?),
        };
        let limit = self.state.config.max_samples_per_request;
        if request.len() > limit {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "request has {} samples; limit is {limit} (MAX_SAMPLES_PER_REQUEST)",
                    request.len()
                ),
            )
            .into());
        }
        if let Some(usage) = &self.usage {
            usage
                .take_samples(&self.principal.name, request.len(), received)
                .map_err(ApiError::from)?;
        }
        let judged = self.state.judge_now(
            &self.principal,
            request.samples(),
            &detector,
            Transport::Grpc,
            received,
            sink,
        );
        if judged.count == request.len() {
            return Ok(Some(judged.finished));
        }
        // The rest waits for a restore (or is a large batch for the blocking pool);
        // the sink keeps the verdicts so far, and theirs follow in the same response.
        self.waited += 1;
        let state = Arc::clone(&self.state);
        let pending = state.judge(
            Arc::clone(&self.principal),
            request.to_samples_from(judged.count),
            detector,
            Transport::Grpc,
        );
        let pending: Pending = match &self.log_span {
            Some(span) => Box::pin(pending.instrument(span.clone())),
            None => Box::pin(pending),
        };
        self.pending = Some(pending);
        Ok(None)
    }

    /// Finishes the call with the stream's final status (once; later calls do
    /// nothing): its duration, and its span with the stream's counts.
    pub(crate) fn end(&mut self, status: &Status) {
        let Some(call) = self.call.take() else {
            return;
        };
        if let Some(span) = call.span() {
            span.set_attributes([
                KeyValue::new("tidewatch.ingest.messages", saturating_i64(self.messages)),
                KeyValue::new("tidewatch.ingest.samples", saturating_i64(self.samples)),
                KeyValue::new(
                    "tidewatch.ingest.waited_messages",
                    saturating_i64(self.waited),
                ),
            ]);
        }
        call.finish(status.code(), status.message());
    }

    /// Whether a request is being judged asynchronously.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Drives the asynchronous request, if any: ready (with its verdicts appended to
    /// `sink`) when there is none left.
    pub(crate) fn poll_pending(&mut self, cx: &mut Context<'_>, sink: &mut WireSink) -> Poll<()> {
        if let Some(pending) = self.pending.as_mut() {
            let verdicts = ready!(pending.as_mut().poll(cx));
            self.pending = None;
            sink.put_encoded(&IngestResponse { verdicts });
        }
        Poll::Ready(())
    }

    /// Asked when the client has sent nothing more for now (and everything received
    /// is answered): `Ready(status)` when the stream must end with `status` (shutdown
    /// or `STREAM_MAX_LIFETIME`: what was received is answered, then the stream ends;
    /// `STREAM_IDLE_TIMEOUT`), `Pending` with the timers registered otherwise. Polling
    /// the timers here and not per message keeps their cost per batch of messages.
    pub(crate) fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(
                ApiError::new(
                    ErrorKind::Unavailable,
                    "server is shutting down; reconnect to another replica",
                )
                .into(),
            );
        }
        if let Some(lifetime) = self.lifetime.as_mut()
            && lifetime.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(
                ApiError::new(
                    ErrorKind::Unavailable,
                    "stream reached its maximum lifetime (STREAM_MAX_LIFETIME); reconnect",
                )
                .into(),
            );
        }
        if let (Some(idle), Some(timeout)) = (self.idle.as_mut(), self.idle_timeout)
            && idle.as_mut().poll(cx).is_ready()
        {
            let deadline = self.last_received + timeout;
            if deadline > Instant::now() {
                // Messages came since the timer was set: wait for the rest.
                idle.as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
                if idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            return Poll::Ready(
                ApiError::new(
                    ErrorKind::Timeout,
                    "no message within STREAM_IDLE_TIMEOUT; stream closed",
                )
                .into(),
            );
        }
        Poll::Pending
    }
}

impl Drop for StreamCore {
    /// A stream dropped before its final status: the client went away.
    fn drop(&mut self) {
        self.end(&Status::cancelled("the client went away"));
    }
}

/// A count as an attribute value (OpenTelemetry integers are signed).
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Maps a receive error of tonic's decoder to the status the client sees: a message
/// over the size limit is [`super::fast::too_large`], one that decompresses past it
/// [`super::fast::too_large_decompressed`].
fn receive_error(status: Status) -> Status {
    let too_large = status.code() == Code::OutOfRange && status.message().contains("too large");
    let too_large_decompressed = status.code() == Code::ResourceExhausted
        && status
            .message()
            .starts_with("Error decompressing: size limit");
    if too_large || too_large_decompressed {
        return ApiError::new(
            ErrorKind::TooLarge,
            format!("{} (MAX_MESSAGE_BYTES)", status.message()),
        )
        .into();
    }
    status
}

/// Starts an Ingest stream over a tonic request stream, or refuses it when
/// `MAX_INGEST_STREAMS` are open.
pub(crate) fn start<In>(
    state: &Arc<AppState>,
    request: Request<In>,
) -> Result<IngestStream<In>, Status> {
    let principal = super::caller(state, request.extensions())?;
    let call = request.extensions().get::<RpcCall>().cloned();
    Ok(IngestStream {
        core: StreamCore::start(state, principal, call)?,
        inbound: request.into_inner(),
        sink: WireSink::new(),
        done: false,
    })
}

/// The response stream of one `Ingest` call over a tonic request stream: encoded
/// `IngestResponse`s.
pub(crate) struct IngestStream<In> {
    /// Limits, timers, detector, the asynchronous path.
    core: StreamCore,
    /// Requests from the client.
    inbound: In,
    /// Encodes the verdicts of each response; its buffer is reused.
    sink: WireSink,
    /// No more items after the final status.
    done: bool,
}

impl<In> std::fmt::Debug for IngestStream<In> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestStream")
            .field("core", &self.core)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<In> IngestStream<In> {
    fn finish(&mut self, status: Status) -> Poll<Option<Result<Bytes, Status>>> {
        self.done = true;
        self.core.end(&status);
        Poll::Ready(Some(Err(status)))
    }
}

impl<In> Stream for IngestStream<In>
where
    In: Stream<Item = Result<WireRequest, Status>> + Unpin,
{
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.core.has_pending() {
            ready!(this.core.poll_pending(cx, &mut this.sink));
            return Poll::Ready(Some(Ok(this.sink.take())));
        }
        match Pin::new(&mut this.inbound).poll_next(cx) {
            Poll::Ready(Some(Ok(request))) => {
                // The message's clock read: idle timer, engine tick, receive time and
                // latency start.
                match this.core.judge(&request, Instant::now(), &mut this.sink) {
                    Ok(Some(_)) => Poll::Ready(Some(Ok(this.sink.take()))),
                    // Judging asynchronously: poll the future now so it registers
                    // this task for wake-up.
                    Ok(None) => self.poll_next(cx),
                    Err(status) => this.finish(status),
                }
            }
            Poll::Ready(Some(Err(status))) => this.finish(receive_error(status)),
            Poll::Ready(None) => {
                this.done = true;
                this.core.end(&Status::ok(""));
                Poll::Ready(None)
            }
            Poll::Pending => match this.core.poll_quiet(cx) {
                Poll::Ready(status) => this.finish(status),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl IngestCore for StreamCore {
    fn judge(
        &mut self,
        request: &WireRequest,
        received: Instant,
        sink: &mut WireSink,
    ) -> Result<Option<Instant>, Status> {
        StreamCore::judge(self, request, received, sink)
    }

    fn has_pending(&self) -> bool {
        StreamCore::has_pending(self)
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>, sink: &mut WireSink) -> Poll<()> {
        StreamCore::poll_pending(self, cx, sink)
    }

    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        StreamCore::poll_quiet(self, cx)
    }

    fn end(&mut self, status: &Status) {
        StreamCore::end(self, status);
    }
}
