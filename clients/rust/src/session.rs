//! The Ingest session: batching, per-device `seq`, verdicts matched to samples, and
//! reconnection with re-sending of everything unanswered.
//!
//! One background task owns the stream. Samples from the caller collect into a batch
//! that is sent when it holds [`SessionConfig::max_batch`] samples or when it is
//! [`SessionConfig::linger`] old. Every sent batch waits in an in-order queue until its
//! response arrives (the server answers requests in order, one response each), so
//! verdict `i` of the response belongs to sample `i` of the oldest waiting batch. When
//! the stream breaks, the waiting batches go back to the front of the send queue and
//! are sent again, in order, on the next stream. The server recognises samples it had
//! already applied by their `seq` and answers them with `duplicate: true`.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::Stream;
use tidewatch_proto::v1::{
    DetectorConfig, IngestRequest, IngestResponse, Sample, Verdict,
    telemetry_service_client::TelemetryServiceClient,
};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;

use crate::{Backoff, Error};

/// Settings of an Ingest session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Samples per message at most.
    pub max_batch: usize,
    /// Longest time a sample waits for its batch to fill before the batch is sent.
    pub linger: Duration,
    /// Samples sent (or queued for re-sending) but not yet answered, at most; the
    /// session stops taking samples from the caller at this limit (backpressure).
    pub max_in_flight: usize,
    /// Capacity of the caller → session channel, in samples.
    pub input_buffer: usize,
    /// Capacity of the session → caller channel, in answers. The session waits when it
    /// is full, so read answers while sending more than this many samples.
    pub output_buffer: usize,
    /// Assign a `seq` to samples whose `seq` is 0: per device, the larger of the
    /// device's previous seq + 1 and the current Unix time in microseconds, so seqs
    /// keep increasing across sessions and process restarts of the client.
    pub auto_seq: bool,
    /// Reconnect delays and limit.
    pub backoff: Backoff,
    /// Detector for the stream (sent on the first message of every stream).
    pub detector: Option<DetectorConfig>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_batch: 500,
            linger: Duration::from_millis(5),
            max_in_flight: 10_000,
            input_buffer: 1024,
            output_buffer: 10_000,
            auto_seq: true,
            backoff: Backoff::default(),
            detector: None,
        }
    }
}

/// The reason a server gives for a sample whose device another replica holds
/// (`docs/architecture.md`, "Ownership"): nothing was applied, send it again.
const MOVED: &str = "moved:";

/// How long a sample answered `moved` waits before it is sent again.
const MOVED_RETRY: Duration = Duration::from_millis(50);

/// A sample and the server's verdict for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// The sample as sent (with the `seq` the session assigned).
    pub sample: Sample,
    /// The server's verdict. `duplicate` is true when the server had already applied
    /// this sample (possible for re-sent samples after a broken stream).
    pub verdict: Verdict,
    /// Times the sample was sent: more than 1 when a broken stream made the session
    /// re-send it.
    pub attempts: u32,
}

/// A running Ingest session; see the [module docs](self).
///
/// Send samples with [`IngestSession::send`] (or through a [`SampleSender`] from
/// another task), read answers with [`IngestSession::next`] (it is also a
/// [`Stream`]). After [`IngestSession::close_input`] the session sends what is left,
/// waits for every answer, and then the answer stream ends.
#[derive(Debug)]
pub struct IngestSession {
    /// Into the session task; `None` after `close_input`.
    input: Option<mpsc::Sender<Sample>>,
    /// Answers out of the session task, then at most one error.
    output: mpsc::Receiver<Result<Answered, Error>>,
    /// Counters shared with the task.
    stats: Arc<Stats>,
    /// The task, aborted when the session is dropped.
    task: JoinHandle<()>,
}

/// Sends samples into a session from any task; cheap to clone.
#[derive(Debug, Clone)]
pub struct SampleSender {
    /// Into the session task.
    input: mpsc::Sender<Sample>,
}

impl SampleSender {
    /// Queues a sample; waits while the session is at its in-flight limit.
    pub async fn send(&self, sample: Sample) -> Result<(), Error> {
        self.input.send(sample).await.map_err(|_| Error::Closed)
    }
}

/// Counters of a session.
#[derive(Debug, Default)]
struct Stats {
    /// Streams opened after a break.
    reconnects: AtomicU64,
    /// Samples sent again after a break.
    resent: AtomicU64,
}

impl IngestSession {
    /// Starts the session task on the current Tokio runtime.
    pub(crate) fn start(
        grpc: TelemetryServiceClient<crate::Transport>,
        config: SessionConfig,
    ) -> Self {
        let (input_tx, input_rx) = mpsc::channel(config.input_buffer.max(1));
        let (output_tx, output_rx) = mpsc::channel(config.output_buffer.max(1));
        let stats = Arc::new(Stats::default());
        let worker = Worker {
            grpc,
            config,
            input: input_rx,
            input_open: true,
            output: output_tx,
            seqs: HashMap::new(),
            batch: Vec::new(),
            linger_deadline: None,
            waiting: VecDeque::new(),
            to_send: VecDeque::new(),
            moved: Vec::new(),
            retry_at: None,
            unanswered: 0,
            stream: None,
            failures: 0,
            last_error: None,
            stats: Arc::clone(&stats),
        };
        let task = tokio::spawn(worker.run());
        Self {
            input: Some(input_tx),
            output: output_rx,
            stats,
            task,
        }
    }

    /// Queues a sample; waits while the session is at its in-flight limit.
    /// [`Error::Closed`] after `close_input` or when the session has failed (the
    /// failure itself comes out of [`IngestSession::next`]).
    pub async fn send(&self, sample: Sample) -> Result<(), Error> {
        match &self.input {
            Some(input) => input.send(sample).await.map_err(|_| Error::Closed),
            None => Err(Error::Closed),
        }
    }

    /// A handle to send samples from another task, `None` after `close_input`. The
    /// session ends only when every sender is gone and `close_input` was called.
    pub fn sender(&self) -> Option<SampleSender> {
        self.input.as_ref().map(|input| SampleSender {
            input: input.clone(),
        })
    }

    /// No more samples from this handle: the session sends what is queued, waits for
    /// every answer, and then [`IngestSession::next`] returns `None`.
    pub fn close_input(&mut self) {
        self.input = None;
    }

    /// The next answer, in the order the samples were sent; `None` when the session is
    /// over. An `Err` is final: the session has stopped.
    pub async fn next(&mut self) -> Option<Result<Answered, Error>> {
        self.output.recv().await
    }

    /// Streams re-opened after a break so far.
    pub fn reconnects(&self) -> u64 {
        self.stats.reconnects.load(Ordering::Relaxed)
    }

    /// Samples re-sent after a break so far.
    pub fn resent(&self) -> u64 {
        self.stats.resent.load(Ordering::Relaxed)
    }
}

impl Stream for IngestSession {
    type Item = Result<Answered, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.output.poll_recv(cx)
    }
}

impl Drop for IngestSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A batch sent on a stream (or to be sent), waiting for its response.
#[derive(Debug)]
struct Batch {
    /// The samples, kept for matching verdicts and for re-sending.
    samples: Vec<Sample>,
    /// Times sent so far.
    attempts: u32,
}

/// An open Ingest stream.
struct Open {
    /// Requests to the server (unbounded: the in-flight limit bounds it).
    requests: mpsc::UnboundedSender<IngestRequest>,
    /// Responses from the server.
    responses: Streaming<IngestResponse>,
    /// No request sent yet (the first one carries the detector).
    fresh: bool,
}

/// The session task's state.
struct Worker {
    /// The stub over the shared channel.
    grpc: TelemetryServiceClient<crate::Transport>,
    /// Settings.
    config: SessionConfig,
    /// Samples from the caller.
    input: mpsc::Receiver<Sample>,
    /// False once every sender is gone.
    input_open: bool,
    /// Answers to the caller.
    output: mpsc::Sender<Result<Answered, Error>>,
    /// Last seq per device, for `auto_seq`.
    seqs: HashMap<String, u64>,
    /// The batch being filled.
    batch: Vec<Sample>,
    /// When the batch being filled must be sent.
    linger_deadline: Option<Instant>,
    /// Batches sent on the current stream, oldest first, waiting for responses.
    waiting: VecDeque<Batch>,
    /// Batches to send when a stream is open, oldest first.
    to_send: VecDeque<Batch>,
    /// Samples answered `moved` (their device is held by another replica of the
    /// server), to send again once `retry_at` comes.
    moved: Vec<Sample>,
    /// When `moved` goes out again.
    retry_at: Option<Instant>,
    /// Samples in `waiting`, `to_send`, `batch` and `moved`.
    unanswered: usize,
    /// The current stream, if one is open.
    stream: Option<Open>,
    /// Consecutive failures (breaks with samples unanswered, failed opens); reset by a
    /// response.
    failures: u32,
    /// Why the stream last broke or failed to open, for `ReconnectExhausted`.
    last_error: Option<Error>,
    /// Counters shared with the handle.
    stats: Arc<Stats>,
}

/// How one step of the loop ended.
enum Step {
    /// Keep going.
    Continue,
    /// The session is over (all answered, or the caller left).
    Done,
}

impl Worker {
    async fn run(mut self) {
        if let Err(error) = self.run_inner().await {
            let unanswered = self.unanswered;
            let error = match error {
                e @ Error::ReconnectExhausted { .. } => e,
                e => Error::SessionFailed {
                    unanswered,
                    source: Box::new(e),
                },
            };
            tracing::warn!(error = %error, "ingest session failed");
            // The caller may be gone already; nobody to tell then.
            let _ = self.output.send(Err(error)).await;
        }
    }

    async fn run_inner(&mut self) -> Result<(), Error> {
        loop {
            if self.output.is_closed() {
                return Ok(());
            }
            if self.stream.is_none() && !self.to_send.is_empty() {
                self.open().await?;
            }
            if !self.input_open
                && self.batch.is_empty()
                && self.to_send.is_empty()
                && self.waiting.is_empty()
                && self.moved.is_empty()
            {
                return Ok(());
            }
            match self.step().await? {
                Step::Continue => {}
                Step::Done => return Ok(()),
            }
        }
    }

    /// Waits for one event: a response, a sample, or the linger deadline.
    async fn step(&mut self) -> Result<Step, Error> {
        let can_take = self.input_open && self.unanswered < self.config.max_in_flight;
        let linger = self.linger_deadline;
        let retry_at = self.retry_at;
        let has_stream = self.stream.is_some();
        tokio::select! {
            biased;
            response = async {
                match self.stream.as_mut() {
                    Some(open) => open.responses.message().await,
                    None => std::future::pending().await,
                }
            }, if has_stream => self.on_response(response).await,
            sample = self.input.recv(), if can_take => {
                match sample {
                    Some(sample) => self.take(sample),
                    None => {
                        self.input_open = false;
                        self.flush();
                    }
                }
                Ok(Step::Continue)
            }
            () = async {
                match linger {
                    Some(deadline) => sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            }, if linger.is_some() => {
                self.flush();
                Ok(Step::Continue)
            }
            () = async {
                match retry_at {
                    Some(deadline) => sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            }, if retry_at.is_some() => {
                self.retry_at = None;
                let samples = std::mem::take(&mut self.moved);
                self.to_send.push_back(Batch { samples, attempts: 1 });
                self.send_queued();
                Ok(Step::Continue)
            }
        }
    }

    /// Adds a caller's sample to the batch.
    fn take(&mut self, mut sample: Sample) {
        if self.config.auto_seq {
            let last = self.seqs.get(&sample.device_id).copied().unwrap_or(0);
            if sample.seq == 0 {
                sample.seq = (last + 1).max(unix_micros());
            }
            if sample.seq > last {
                self.seqs.insert(sample.device_id.clone(), sample.seq);
            }
        }
        if self.batch.is_empty() {
            self.linger_deadline = Some(Instant::now() + self.config.linger);
        }
        self.batch.push(sample);
        self.unanswered += 1;
        if self.batch.len() >= self.config.max_batch.max(1) {
            self.flush();
        }
    }

    /// Sends the batch being filled (or queues it when no stream is open).
    fn flush(&mut self) {
        self.linger_deadline = None;
        if self.batch.is_empty() {
            return;
        }
        let batch = Batch {
            samples: std::mem::take(&mut self.batch),
            attempts: 0,
        };
        self.to_send.push_back(batch);
        self.send_queued();
    }

    /// Sends every queued batch on the open stream, if there is one.
    fn send_queued(&mut self) {
        let Some(open) = self.stream.as_mut() else {
            return;
        };
        while let Some(mut batch) = self.to_send.pop_front() {
            let detector = if open.fresh {
                // The detector is read from the first message of a stream only.
                open.fresh = false;
                self.config.detector.clone()
            } else {
                None
            };
            let request = IngestRequest {
                samples: batch.samples.clone(),
                detector,
            };
            if batch.attempts > 0 {
                self.stats
                    .resent
                    .fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
            }
            batch.attempts += 1;
            // A closed request channel means the stream is broken; the response side
            // reports why, and the batch is re-sent on the next stream.
            let _ = open.requests.send(request);
            self.waiting.push_back(batch);
        }
    }

    /// Handles what the response stream yielded.
    async fn on_response(
        &mut self,
        response: Result<Option<IngestResponse>, tonic::Status>,
    ) -> Result<Step, Error> {
        match response {
            Ok(Some(response)) => {
                self.failures = 0;
                let Some(batch) = self.waiting.pop_front() else {
                    return Err(Error::Protocol(format!(
                        "a response with {} verdicts arrived for no request",
                        response.verdicts.len()
                    )));
                };
                if response.verdicts.len() != batch.samples.len() {
                    return Err(Error::Protocol(format!(
                        "{} verdicts for a request of {} samples",
                        response.verdicts.len(),
                        batch.samples.len()
                    )));
                }
                self.unanswered -= batch.samples.len();
                for (sample, verdict) in batch.samples.into_iter().zip(response.verdicts) {
                    if sample.seq != 0 && verdict.seq != sample.seq {
                        return Err(Error::Protocol(format!(
                            "verdict for seq {} where seq {} was sent",
                            verdict.seq, sample.seq
                        )));
                    }
                    if verdict.error.starts_with(MOVED) {
                        // Nothing was applied: the device is moving between replicas
                        // of the server. Sent again shortly, in order.
                        self.moved.push(sample);
                        self.unanswered += 1;
                        self.retry_at
                            .get_or_insert_with(|| Instant::now() + MOVED_RETRY);
                        continue;
                    }
                    let answered = Answered {
                        sample,
                        verdict,
                        attempts: batch.attempts,
                    };
                    if self.output.send(Ok(answered)).await.is_err() {
                        return Ok(Step::Done);
                    }
                }
                Ok(Step::Continue)
            }
            Ok(None) => {
                if self.waiting.is_empty() {
                    // The server ended an idle stream; the next sample opens a new one.
                    self.stream = None;
                    return Ok(Step::Continue);
                }
                self.broken(Error::Protocol(
                    "stream ended with requests unanswered".into(),
                ));
                Ok(Step::Continue)
            }
            Err(status) => {
                let error = Error::from(status);
                if !error.is_retryable() {
                    return Err(error);
                }
                self.broken(error);
                Ok(Step::Continue)
            }
        }
    }

    /// The stream is broken: everything waiting goes back to the front of the queue.
    fn broken(&mut self, error: Error) {
        self.stream = None;
        if self.waiting.is_empty() {
            tracing::debug!(error = %error, "idle ingest stream ended");
            return;
        }
        tracing::info!(
            error = %error,
            unanswered = self.unanswered,
            "ingest stream broken; reconnecting"
        );
        self.failures += 1;
        self.last_error = Some(error);
        while let Some(batch) = self.waiting.pop_back() {
            self.to_send.push_front(batch);
        }
    }

    /// Opens a stream, waiting out the backoff and retrying until it opens, then sends
    /// what is queued.
    async fn open(&mut self) -> Result<(), Error> {
        loop {
            if self.failures > 0 {
                if let Some(max) = self.config.backoff.max_attempts
                    && self.failures > max
                {
                    let last = self
                        .last_error
                        .take()
                        .unwrap_or_else(|| Error::Protocol("stream broken".into()));
                    return Err(Error::ReconnectExhausted {
                        attempts: self.failures - 1,
                        unanswered: self.unanswered,
                        last: Box::new(last),
                    });
                }
                let delay = self.config.backoff.delay(self.failures - 1);
                tokio::time::sleep(delay).await;
            }
            let (requests, outbound) = mpsc::unbounded_channel();
            match self
                .grpc
                .ingest(UnboundedReceiverStream::new(outbound))
                .await
            {
                Ok(response) => {
                    let reconnect = self.failures > 0;
                    self.stream = Some(Open {
                        requests,
                        responses: response.into_inner(),
                        fresh: true,
                    });
                    if reconnect {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    self.send_queued();
                    return Ok(());
                }
                Err(status) => {
                    let error = Error::from(status);
                    if !error.is_retryable() {
                        return Err(error);
                    }
                    self.failures += 1;
                    tracing::debug!(error = %error, failures = self.failures, "cannot open ingest stream; backing off");
                    self.last_error = Some(error);
                }
            }
        }
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
