//! `Ingest`: one response per request, in order, for as long as the stream lives.
//!
//! The response stream *is* the request stream mapped through the engine: the next
//! request is read only when tonic asks for the next response, which it does only when
//! HTTP/2 flow control has room to send it. A client that sends without reading
//! verdicts therefore stalls on its own send window; the server holds at most one
//! request and one encoded response per stream, whatever the client does.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::Stream;
use tidewatch_proto::v1::IngestResponse;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Code, Request, Status};

use super::wire::{WireRequest, WireSink};

use crate::{
    AppState,
    config::nonzero,
    engine::DetectorSpec,
    error::{ApiError, ErrorKind},
    telemetry::{ActiveGauge, Transport},
};

/// A request being judged asynchronously (large batch, or a restore to wait for).
type Pending = Pin<Box<dyn Future<Output = Vec<tidewatch_proto::v1::Verdict>> + Send>>;

/// Why the stream is draining: answer what was received, then end with this status.
#[derive(Debug, Clone, Copy)]
enum Drain {
    Shutdown,
    Lifetime,
}

/// The response stream of one `Ingest` call: encoded `IngestResponse`s.
pub(crate) struct IngestStream<In> {
    /// Requests from the client.
    inbound: In,
    /// Encodes the verdicts of each response; its buffer is reused.
    sink: WireSink,
    /// Engine, limits, metrics.
    state: Arc<AppState>,
    /// Resolves when the server starts shutting down.
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
    /// Set once shutdown or the lifetime limit is reached.
    draining: Option<Drain>,
    /// A request being judged asynchronously.
    pending: Option<Pending>,
    /// The stream's detector, resolved from its first message.
    detector: Option<DetectorSpec>,
    /// No more items after the final status.
    done: bool,
    /// Keeps the active-streams gauge up while the stream lives.
    _active: ActiveGauge,
}

impl<In> std::fmt::Debug for IngestStream<In> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestStream")
            .field("draining", &self.draining)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// Starts an Ingest stream, or refuses it when `MAX_INGEST_STREAMS` are open.
pub(crate) fn start<In>(
    state: &Arc<AppState>,
    request: Request<In>,
) -> Result<IngestStream<In>, Status> {
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
    Ok(IngestStream {
        inbound: request.into_inner(),
        sink: WireSink::new(),
        shutdown: Box::pin(state.shutdown.clone().cancelled_owned()),
        idle: idle_timeout.map(|d| Box::pin(tokio::time::sleep(d))),
        idle_timeout,
        last_received: Instant::now(),
        lifetime: nonzero(state.config.stream_max_lifetime)
            .map(|d| Box::pin(tokio::time::sleep(d))),
        draining: None,
        pending: None,
        detector: None,
        done: false,
        state: Arc::clone(state),
        _active: active,
    })
}

impl<In> IngestStream<In> {
    /// Handles one request; `Err` ends the stream.
    fn handle(
        &mut self,
        request: WireRequest,
        received: Instant,
    ) -> Poll<Option<Result<Bytes, Status>>> {
        let detector = match self.detector {
            Some(detector) => detector,
            None => match self.state.engine.detector(request.detector.as_deref()) {
                Ok(detector) => *self.detector.insert(detector),
                Err(e) => return self.finish(e.into()),
            },
        };
        let limit = self.state.config.max_samples_per_request;
        if request.len() > limit {
            self.done = true;
            return Poll::Ready(Some(Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "request has {} samples; limit is {limit} (MAX_SAMPLES_PER_REQUEST)",
                    request.len()
                ),
            )
            .into())));
        }
        let answered = self.state.try_answer_prefix(
            request.samples(),
            &detector,
            Transport::Grpc,
            received,
            &mut self.sink,
        );
        if answered == request.len() {
            return Poll::Ready(Some(Ok(self.sink.take())));
        }
        // The rest waits for a restore (or is a large batch for the blocking pool);
        // the sink keeps the verdicts so far, and theirs follow in the same response.
        let state = Arc::clone(&self.state);
        self.pending = Some(Box::pin(state.answer(
            request.to_samples_from(answered),
            detector,
            Transport::Grpc,
        )));
        Poll::Pending
    }

    fn finish(&mut self, status: Status) -> Poll<Option<Result<Bytes, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }
}

/// Maps a receive error to the status the client sees: a message over the size limit
/// is `RESOURCE_EXHAUSTED` naming the setting, as the issue asks.
fn receive_error(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("too large") {
        return ApiError::new(
            ErrorKind::TooLarge,
            format!("{} (MAX_MESSAGE_BYTES)", status.message()),
        )
        .into();
    }
    status
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
        if let Some(pending) = this.pending.as_mut() {
            let verdicts = ready!(pending.as_mut().poll(cx));
            this.pending = None;
            this.sink.put_encoded(&IngestResponse { verdicts });
            return Poll::Ready(Some(Ok(this.sink.take())));
        }
        if this.draining.is_none() {
            if this.shutdown.as_mut().poll(cx).is_ready() {
                this.draining = Some(Drain::Shutdown);
            } else if let Some(lifetime) = this.lifetime.as_mut()
                && lifetime.as_mut().poll(cx).is_ready()
            {
                this.draining = Some(Drain::Lifetime);
            }
        }
        match Pin::new(&mut this.inbound).poll_next(cx) {
            Poll::Ready(Some(Ok(request))) => {
                // The message's one clock read: idle timer, engine tick, receive time
                // and latency start.
                let received = Instant::now();
                this.last_received = received;
                let poll = this.handle(request, received);
                if poll.is_pending() {
                    // Judging asynchronously: poll the future now so it registers
                    // this task for wake-up.
                    return self.poll_next(cx);
                }
                poll
            }
            Poll::Ready(Some(Err(status))) => this.finish(receive_error(status)),
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match this.draining {
                Some(Drain::Shutdown) => this.finish(
                    ApiError::new(
                        ErrorKind::Unavailable,
                        "server is shutting down; reconnect to another replica",
                    )
                    .into(),
                ),
                Some(Drain::Lifetime) => this.finish(
                    ApiError::new(
                        ErrorKind::Unavailable,
                        "stream reached its maximum lifetime (STREAM_MAX_LIFETIME); reconnect",
                    )
                    .into(),
                ),
                None => {
                    if let (Some(idle), Some(timeout)) = (this.idle.as_mut(), this.idle_timeout)
                        && idle.as_mut().poll(cx).is_ready()
                    {
                        let deadline = this.last_received + timeout;
                        if deadline > Instant::now() {
                            // Messages came since the timer was set: wait for the rest.
                            idle.as_mut()
                                .reset(tokio::time::Instant::from_std(deadline));
                            if idle.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                        return this.finish(
                            ApiError::new(
                                ErrorKind::Timeout,
                                "no message within STREAM_IDLE_TIMEOUT; stream closed",
                            )
                            .into(),
                        );
                    }
                    Poll::Pending
                }
            },
        }
    }
}
