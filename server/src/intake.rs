//! Bounds on what clients are still sending: request bytes that cannot be used yet (an
//! incomplete gRPC message, an HTTP body not fully received) are held in memory, so
//! they are bounded in total and in time (`docs/operations.md`, "Overload").
//!
//! - **In total**: every such byte is charged to one [`Budget`] of
//!   `MAX_INCOMPLETE_BYTES`, across all streams and requests of both listeners. A
//!   message or body that would go past it ends its stream or request with
//!   `RESOURCE_EXHAUSTED` / `503` (counted in `tidewatch_load_shed_total`), and its
//!   bytes are released.
//! - **In time**: an incomplete message must keep arriving at `MIN_UPLOAD_RATE` bytes
//!   per second on average, after `MIN_UPLOAD_RATE_GRACE`; slower, the stream or
//!   request ends with `DEADLINE_EXCEEDED` / `408`, as the server's other timeouts
//!   (tonic's own server timeout answers `CANCELLED`, which reads as the client
//!   giving up). Only time spent waiting for the client counts.
//! - **Whole requests** (unary and server-streaming gRPC calls, HTTP requests): the
//!   request counts as incomplete until its end, and a `deadline` bounds it
//!   (`FIRST_MESSAGE_TIMEOUT` for gRPC): a call that sends its headers and nothing
//!   more ends within it.
//!
//! [`IntakeBody`] wraps a request body and enforces all three as it is read; in
//! stream mode it follows the gRPC framing (5-byte prefixes) to know where each
//! message ends, without copying anything. Its timer is armed only while a message
//! is incomplete and the client is the one being waited for, and re-armed only when
//! it fires, so a stream of whole messages pays no timer per message.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::BoxError;

use crate::{
    connections::Activity,
    error::{ApiError, ErrorKind},
};

/// The bytes of incomplete messages and bodies held at once, across all requests.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes; 0 means no limit.
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes, unless that would pass the limit.
    fn take(&self, n: usize) -> bool {
        let previous = self.used.fetch_add(n, Ordering::Relaxed);
        if self.limit > 0 && previous + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives `n` bytes back.
    fn give(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// The rules every request body is read under (from the configuration).
#[derive(Debug)]
pub struct IntakeRules {
    /// `MAX_INCOMPLETE_BYTES`.
    pub budget: Budget,
    /// `MIN_UPLOAD_RATE`, bytes per second; 0 disables the rate rule.
    pub min_rate: u64,
    /// `MIN_UPLOAD_RATE_GRACE`: waiting time allowed before the rate applies.
    pub grace: Duration,
}

impl IntakeRules {
    /// The rules of the configuration.
    pub fn new(max_incomplete: usize, min_rate: u64, grace: Duration) -> Self {
        Self {
            budget: Budget::new(max_incomplete),
            min_rate,
            grace,
        }
    }
}

/// Why a request body was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    /// `MAX_INCOMPLETE_BYTES` is used up.
    #[error("the server holds too many incomplete requests (MAX_INCOMPLETE_BYTES); retry shortly")]
    OverBudget,
    /// The message arrives slower than `MIN_UPLOAD_RATE`.
    #[error("request data arrived slower than MIN_UPLOAD_RATE; request closed")]
    TooSlow,
    /// The whole request did not arrive within its deadline.
    #[error("the request did not arrive within {0}")]
    Deadline(&'static str),
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        let kind = match e {
            IntakeError::OverBudget => ErrorKind::Overloaded,
            IntakeError::TooSlow | IntakeError::Deadline(_) => ErrorKind::SlowClient,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl IntakeError {
    /// The intake error inside a body error, if it is one.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(intake) = e.downcast_ref::<Self>() {
                return Some(*intake);
            }
            current = e.source();
        }
        None
    }
}

/// How a body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A stream of gRPC messages: each incomplete message is held and timed.
    Messages,
    /// A whole request: incomplete until its end, within `deadline`.
    Whole {
        /// When the whole request must be in.
        deadline: Option<Instant>,
        /// The setting that sets the deadline, for the error message.
        setting: &'static str,
    },
}

/// A request body read under [`IntakeRules`]; see the module documentation.
pub struct IntakeBody<B> {
    inner: B,
    rules: Arc<IntakeRules>,
    mode: Mode,
    /// Prefix bytes of the current message seen so far (stream mode).
    prefix: [u8; 5],
    prefix_len: usize,
    /// Body bytes of the current message still to come (stream mode).
    remaining: usize,
    /// A message (or, in whole mode, the request) is incomplete.
    incomplete: bool,
    /// Bytes of the incomplete message (or request) received.
    received: u64,
    /// Time spent waiting for the client while it was incomplete.
    waited: Duration,
    /// When the current wait for the client began.
    waiting_since: Option<Instant>,
    /// Bytes charged to the budget now.
    charged: usize,
    /// Wakes the task when a limit may have passed.
    timer: Option<Pin<Box<Sleep>>>,
    /// The body ended (or failed): nothing more is charged or timed.
    finished: bool,
    /// Keeps the connection active while the body lives (a stream's request body
    /// lives as long as the stream; see `connections`).
    activity: Option<Activity>,
}

impl<B> std::fmt::Debug for IntakeBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntakeBody")
            .field("mode", &self.mode)
            .field("received", &self.received)
            .field("charged", &self.charged)
            .finish_non_exhaustive()
    }
}

impl<B> IntakeBody<B> {
    /// Reads `inner` under `rules` in `mode`.
    pub fn new(inner: B, rules: Arc<IntakeRules>, mode: Mode) -> Self {
        let whole = matches!(mode, Mode::Whole { .. });
        Self {
            inner,
            rules,
            mode,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            incomplete: whole,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            charged: 0,
            timer: None,
            finished: false,
            activity: None,
        }
    }

    /// The same body, keeping `activity` (its connection busy) until it is dropped.
    pub fn keeping(mut self, activity: Option<Activity>) -> Self {
        self.activity = activity;
        self
    }

    /// Accounts for received `data`: framing, budget.
    fn account(&mut self, data: &[u8]) -> Result<(), IntakeError> {
        match self.mode {
            Mode::Whole { .. } => self.received += data.len() as u64,
            Mode::Messages => self.follow_frames(data),
        }
        let wanted = if self.incomplete {
            usize::try_from(self.received).unwrap_or(usize::MAX)
        } else {
            0
        };
        self.charge(wanted)
    }

    /// Follows the gRPC framing through `data`.
    fn follow_frames(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining == 0 {
                if !self.incomplete {
                    // A new message starts.
                    self.incomplete = true;
                    self.received = 0;
                    self.waited = Duration::ZERO;
                }
                let take = (5 - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                self.received += take as u64;
                data = &data[take..];
                if self.prefix_len < 5 {
                    return;
                }
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
                if self.remaining == 0 {
                    self.incomplete = false;
                }
                continue;
            }
            let take = self.remaining.min(data.len());
            self.remaining -= take;
            self.received += take as u64;
            data = &data[take..];
            if self.remaining == 0 {
                self.incomplete = false;
            }
        }
    }

    /// Sets the bytes charged to the budget to `wanted`.
    fn charge(&mut self, wanted: usize) -> Result<(), IntakeError> {
        if wanted > self.charged {
            if !self.rules.budget.take(wanted - self.charged) {
                self.release();
                return Err(IntakeError::OverBudget);
            }
        } else {
            self.rules.budget.give(self.charged - wanted);
        }
        self.charged = wanted;
        Ok(())
    }

    /// Gives every charged byte back.
    fn release(&mut self) {
        self.rules.budget.give(self.charged);
        self.charged = 0;
    }

    /// Ends the body: nothing more is held.
    fn finish(&mut self) {
        self.finished = true;
        self.incomplete = false;
        self.release();
        self.timer = None;
    }

    /// While the client is waited for: the limit that passed, or when to look again.
    fn check(&mut self, now: Instant) -> Result<Option<Instant>, IntakeError> {
        let mut wake: Option<Instant> = None;
        if let Mode::Whole {
            deadline: Some(deadline),
            setting,
        } = self.mode
        {
            if now >= deadline {
                return Err(IntakeError::Deadline(setting));
            }
            wake = Some(deadline);
        }
        if self.rules.min_rate > 0 && self.incomplete {
            let since = self.waiting_since.unwrap_or(now);
            let waited = self.waited + now.saturating_duration_since(since);
            let allowed = self.rules.grace
                + Duration::from_secs_f64(self.received as f64 / self.rules.min_rate as f64);
            if waited > allowed {
                return Err(IntakeError::TooSlow);
            }
            let at = now + (allowed - waited) + Duration::from_millis(1);
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        Ok(wake)
    }

    /// Whether a wait for the client is timed now.
    fn timed(&self) -> bool {
        !self.finished
            && (matches!(
                self.mode,
                Mode::Whole {
                    deadline: Some(_),
                    ..
                }
            ) || (self.incomplete && self.rules.min_rate > 0))
    }
}

impl<B> Drop for IntakeBody<B> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<B> Body for IntakeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if this.finished {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    if let Some(since) = this.waiting_since.take() {
                        this.waited += since.elapsed();
                    }
                    if let Some(data) = frame.data_ref() {
                        if let Err(e) = this.account(data) {
                            this.finish();
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    } else if frame.is_trailers() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if !this.timed() {
                        return Poll::Pending;
                    }
                    let now = Instant::now();
                    this.waiting_since.get_or_insert(now);
                    let wake = match this.check(now) {
                        Ok(wake) => wake,
                        Err(e) => {
                            this.finish();
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    };
                    let Some(wake) = wake else {
                        return Poll::Pending;
                    };
                    // Re-armed only when it fired or would fire too late: a check
                    // that finds time left just waits for the next one.
                    match this.timer.as_mut() {
                        Some(timer) if timer.deadline() <= wake && !timer.is_elapsed() => {}
                        Some(timer) => timer.as_mut().reset(wake),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(wake))),
                    }
                    let timer = this.timer.as_mut().expect("armed above");
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The timer fired: look again.
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    fn framed(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    type Chunks = StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    fn body(chunks: Vec<Vec<u8>>) -> Chunks {
        StreamBody::new(futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from(c))))
                .collect::<Vec<_>>(),
        ))
    }

    #[tokio::test]
    async fn whole_messages_hold_nothing_and_split_ones_are_charged() {
        let rules = Arc::new(IntakeRules::new(1000, 0, Duration::ZERO));
        let mut two = framed(10);
        two.extend(framed(20));
        let message = framed(100);
        let (head, tail) = message.split_at(40);
        let mut b = IntakeBody::new(
            body(vec![two, head.to_vec(), tail.to_vec()]),
            Arc::clone(&rules),
            Mode::Messages,
        );
        b.frame().await.unwrap().unwrap();
        assert_eq!(rules.budget.used(), 0, "two whole messages");
        b.frame().await.unwrap().unwrap();
        assert_eq!(rules.budget.used(), 40, "the split message's first part");
        b.frame().await.unwrap().unwrap();
        assert_eq!(rules.budget.used(), 0, "complete");
    }

    #[tokio::test]
    async fn over_budget_ends_the_body_and_releases() {
        let rules = Arc::new(IntakeRules::new(64, 0, Duration::ZERO));
        let message = framed(100);
        let (head, tail) = message.split_at(60);
        let (more, _) = tail.split_at(20);
        let mut b = IntakeBody::new(
            body(vec![head.to_vec(), more.to_vec()]),
            Arc::clone(&rules),
            Mode::Messages,
        );
        b.frame().await.unwrap().unwrap();
        assert_eq!(rules.budget.used(), 60);
        let e = b.frame().await.unwrap().unwrap_err();
        assert_eq!(IntakeError::find(&*e), Some(IntakeError::OverBudget));
        assert_eq!(rules.budget.used(), 0);
    }

    #[tokio::test]
    async fn a_stalled_message_ends_after_the_grace() {
        let rules = Arc::new(IntakeRules::new(0, 100, Duration::from_millis(300)));
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        let mut b = IntakeBody::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            Arc::clone(&rules),
            Mode::Messages,
        );
        // Whole messages: a quiet stream is not timed.
        tx.send(Ok(Frame::data(Bytes::from(framed(3)))))
            .await
            .unwrap();
        b.frame().await.unwrap().unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(800), b.frame()).await;
        assert!(quiet.is_err(), "an idle stream between messages is not cut");
        // 20 bytes of a message allow 300 ms + 200 ms of waiting.
        tx.send(Ok(Frame::data(Bytes::from(framed(1000)[..20].to_vec()))))
            .await
            .unwrap();
        b.frame().await.unwrap().unwrap();
        let started = Instant::now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert_eq!(IntakeError::find(&*e), Some(IntakeError::TooSlow));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500),
            "{waited:?}"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_whole_request_has_a_deadline() {
        let rules = Arc::new(IntakeRules::new(0, 0, Duration::ZERO));
        let (_tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut b = IntakeBody::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            rules,
            Mode::Whole {
                deadline: Some(deadline),
                setting: "FIRST_MESSAGE_TIMEOUT",
            },
        );
        let e = b.frame().await.unwrap().unwrap_err();
        assert_eq!(
            IntakeError::find(&*e),
            Some(IntakeError::Deadline("FIRST_MESSAGE_TIMEOUT"))
        );
        assert!(Instant::now() >= deadline);
    }
}
