//! `tidewatch-bench`: the load generator of tidewatch's benchmark suite.
//!
//! It opens C connections × S `Ingest` streams and offers messages of B samples over
//! D devices, open-loop at a target rate (`--rate`, messages/s over all streams) or as
//! fast as a window of outstanding messages per stream allows (`--rate 0`), for a
//! duration or a message count. The latency of every message (send → its response) goes
//! into an HdrHistogram. In open-loop mode it is measured from the message's *intended*
//! send time, so a server stall that delays later sends counts in full (no coordinated
//! omission). It prints a summary and writes a ghz-compatible JSON report.
//!
//! Other modes: `--idle-streams N` holds N streams open (one message each) so the
//! server's memory per stream can be measured; `--write-h2load-body FILE` writes a
//! request body of length-prefixed `IngestRequest`s for h2load.
//!
//! Messages are encoded once, before the run, into a pool that covers every device;
//! the hot loop only clones `Bytes`, so one client core can offer far more load than
//! one server core takes.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use prost::Message;
use serde_json::{Value, json};
use tidewatch_proto::v1::{IngestRequest, Sample};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
};

/// The Ingest method path.
const INGEST_PATH: &str = "/tidewatch.v1.TelemetryService/Ingest";

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tidewatch-bench",
    about = "Load generator for tidewatch's Ingest stream: per-message latency without coordinated omission, ghz-compatible JSON report"
)]
struct Args {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    /// HTTP/2 connections.
    #[arg(short = 'c', long, default_value_t = 1)]
    connections: usize,
    /// Ingest streams per connection.
    #[arg(short = 's', long, default_value_t = 1)]
    streams: usize,
    /// Target messages per second over all streams; 0 = as fast as possible (closed
    /// loop with --window outstanding messages per stream).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    rate: f64,
    /// Samples per message.
    #[arg(short = 'b', long, default_value_t = 1)]
    batch: usize,
    /// Distinct devices.
    #[arg(short = 'd', long, default_value_t = 1000)]
    devices: usize,
    /// Metrics per sample (named cpu, rps, m2, m3, ...).
    #[arg(long, default_value_t = 2)]
    metrics: usize,
    /// How long to offer load (e.g. 10s).
    #[arg(short = 'z', long, default_value = "10s", value_parser = humantime_parse)]
    duration: Duration,
    /// Stop after this many messages in total instead (0 = use --duration).
    #[arg(short = 'n', long, default_value_t = 0)]
    messages: u64,
    /// Outstanding messages per stream in as-fast-as-possible mode.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Write the ghz-compatible JSON report here.
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Hold this many idle Ingest streams open instead of offering load.
    #[arg(long)]
    idle_streams: Option<usize>,
    /// How long to hold idle streams (with --idle-streams).
    #[arg(long, default_value = "30s", value_parser = humantime_parse)]
    hold: Duration,
    /// Tokio worker threads (0: one per core the process may run on). With one core
    /// (`taskset -c 1`), 1 runs everything on a single-threaded runtime: no second
    /// thread competes for the core, which otherwise shows as millisecond latency tails.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write an h2load request body (--body-messages length-prefixed IngestRequests of
    /// --batch samples) to this file and exit.
    #[arg(long)]
    write_h2load_body: Option<PathBuf>,
    /// Messages in the h2load body.
    #[arg(long, default_value_t = 100)]
    body_messages: usize,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e} (e.g. 500ms, 10s, 1m)"))
}

/// Sends pre-encoded requests, decodes responses only as far as counting needs.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

/// Encodes a pre-encoded message by copying it.
#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;

/// Decodes an `IngestResponse` into verdict counts.
#[derive(Debug, Clone, Copy, Default)]
struct CountDecoder;

/// What the bench reads of an `IngestResponse`: its verdicts, undecoded.
#[derive(Clone, PartialEq, prost::Message)]
struct CountedResponse {
    /// Field 1 of `IngestResponse`.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    verdicts: Vec<Bytes>,
}

/// What the bench reads of a `Verdict`.
#[derive(Clone, PartialEq, prost::Message)]
struct VerdictFlags {
    /// Field 6 of `Verdict`.
    #[prost(string, tag = "6")]
    error: String,
}

/// Per response: verdicts and verdicts carrying an error.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    verdicts: u64,
    errors: u64,
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for CountDecoder {
    type Item = Counts;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Counts>, Status> {
        let len = src.remaining();
        let bytes = src.copy_to_bytes(len);
        let response = CountedResponse::decode(bytes)
            .map_err(|e| Status::internal(format!("cannot decode IngestResponse: {e}")))?;
        let mut counts = Counts {
            verdicts: response.verdicts.len() as u64,
            errors: 0,
        };
        for verdict in response.verdicts {
            let flags = VerdictFlags::decode(verdict)
                .map_err(|e| Status::internal(format!("cannot decode Verdict: {e}")))?;
            if !flags.error.is_empty() {
                counts.errors += 1;
            }
        }
        Ok(Some(counts))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Counts;
    type Encoder = RawEncoder;
    type Decoder = CountDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> CountDecoder {
        CountDecoder
    }
}

/// Metric names: cpu, rps, then m2, m3, ...
fn metric_name(i: usize) -> String {
    match i {
        0 => "cpu".into(),
        1 => "rps".into(),
        n => format!("m{n}"),
    }
}

/// Encoded messages that together cover every device once per cycle.
fn message_pool(args: &Args) -> Vec<Bytes> {
    let batch = args.batch.max(1);
    let devices = args.devices.max(1);
    let messages = devices.div_ceil(batch).clamp(64, 1 << 20);
    let names: Vec<String> = (0..args.metrics.max(1)).map(metric_name).collect();
    let mut rng = fastrand::Rng::with_seed(0x7469_6465);
    let mut device = 0usize;
    (0..messages)
        .map(|_| {
            let samples = (0..batch)
                .map(|_| {
                    let id = format!("dev-{device}");
                    device = (device + 1) % devices;
                    Sample {
                        device_id: id,
                        time: None,
                        metrics: names
                            .iter()
                            .enumerate()
                            .map(|(i, name)| {
                                let base = 50.0 * (i + 1) as f64;
                                (name.clone(), base + rng.f64() * base * 0.2)
                            })
                            .collect::<BTreeMap<_, _>>(),
                        seq: 0,
                    }
                })
                .collect();
            Bytes::from(
                IngestRequest {
                    samples,
                    detector: None,
                }
                .encode_to_vec(),
            )
        })
        .collect()
}

/// The gRPC body h2load posts: `count` messages, each with the 5-byte gRPC prefix.
fn h2load_body(pool: &[Bytes], count: usize) -> Vec<u8> {
    let mut body = BytesMut::new();
    for message in pool.iter().cycle().take(count) {
        body.put_u8(0);
        body.put_u32(message.len() as u32);
        body.put_slice(message);
    }
    body.to_vec()
}

/// What one stream measured.
struct StreamResult {
    /// Latency of every answered message, nanoseconds.
    histogram: Histogram<u64>,
    /// Messages answered.
    answered: u64,
    /// Messages sent but never answered.
    unanswered: u64,
    /// Verdicts received, and those carrying a per-sample error.
    counts: Counts,
    /// The status that ended the stream, if not OK.
    status: Option<Status>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// The plan every stream follows.
#[derive(Clone)]
struct Plan {
    /// Messages to cycle through.
    pool: Arc<Vec<Bytes>>,
    /// Interval between this stream's intended sends (`None` = closed loop).
    interval: Option<Duration>,
    /// When offering load started.
    start: Instant,
    /// When to stop offering load.
    deadline: Instant,
    /// Messages this stream sends at most.
    max_messages: u64,
    /// Outstanding messages in closed-loop mode.
    window: usize,
    /// Wakes paced senders every [`TICK`] (open loop only).
    ticker: Option<Arc<Notify>>,
}

/// Period of the pacing ticker. tokio's timer has a 1 ms resolution, which would add up
/// to 1 ms to every latency measured from the intended send time; spinning on
/// `yield_now` until the send time instead burns the load generator's core (each
/// yield polls the I/O driver) and shows as millisecond tails. A thread that sleeps
/// `TICK` and wakes the senders gives ≈ 0.1 ms precision (nanosleep's slack included)
/// for almost no CPU; each wake sends every message that is due, so at high rates
/// several messages share one write.
const TICK: Duration = Duration::from_micros(50);

/// Starts the pacing ticker thread; it stops when `stop` is set.
fn start_ticker(stop: Arc<AtomicBool>) -> Arc<Notify> {
    let notify = Arc::new(Notify::new());
    let ticks = Arc::clone(&notify);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            ticks.notify_waiters();
        }
    });
    notify
}

/// Runs one Ingest stream to the end of the plan and until every answer is in.
async fn run_stream(
    channel: Channel,
    plan: Plan,
    offset: usize,
    stop: Arc<AtomicBool>,
) -> StreamResult {
    let mut result = StreamResult {
        histogram: new_histogram(),
        answered: 0,
        unanswered: 0,
        counts: Counts::default(),
        status: None,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let (times_tx, mut times_rx) = mpsc::unbounded_channel::<Instant>();
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        result.status = Some(Status::unavailable(format!("connection not ready: {e}")));
        return result;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(INGEST_PATH);
    let window = Arc::new(Semaphore::new(plan.window.max(1)));
    let closed_loop = plan.interval.is_none();
    let sender_window = Arc::clone(&window);
    let sender_plan = plan.clone();
    let sender = tokio::spawn(async move {
        let plan = sender_plan;
        let mut sent = 0u64;
        let mut index = offset % plan.pool.len();
        // Stagger streams across the first interval so they do not send in lockstep.
        let phase = plan
            .interval
            .map_or(Duration::ZERO, |i| i.mul_f64((offset % 997) as f64 / 997.0));
        while sent < plan.max_messages && !stop.load(Ordering::Relaxed) {
            let intended = match plan.interval {
                Some(interval) => {
                    let at = plan.start + phase + interval.mul_f64(sent as f64);
                    if at >= plan.deadline {
                        break;
                    }
                    wait_until(at, plan.ticker.as_deref()).await;
                    at
                }
                None => {
                    match Arc::clone(&sender_window).acquire_owned().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => break,
                    }
                    let now = Instant::now();
                    if now >= plan.deadline {
                        break;
                    }
                    now
                }
            };
            if times_tx.send(intended).is_err() {
                break;
            }
            if tx.send(plan.pool[index].clone()).await.is_err() {
                break;
            }
            index = (index + 1) % plan.pool.len();
            sent += 1;
        }
        sent
    });
    let request = tonic::Request::new(ReceiverStream::new(rx));
    let mut responses = match grpc.streaming(request, path, RawCodec).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            result.status = Some(status);
            let sent = sender.await.unwrap_or(0);
            result.unanswered = sent;
            return result;
        }
    };
    loop {
        match responses.message().await {
            Ok(Some(counts)) => {
                let now = Instant::now();
                let Some(intended) = times_rx.recv().await else {
                    break;
                };
                let nanos = now.saturating_duration_since(intended).as_nanos() as u64;
                result.histogram.saturating_record(nanos.max(1));
                result.answered += 1;
                result.counts.verdicts += counts.verdicts;
                result.counts.errors += counts.errors;
                if closed_loop {
                    window.add_permits(1);
                }
            }
            Ok(None) => break,
            Err(status) => {
                result.status = Some(status);
                break;
            }
        }
    }
    window.close();
    let sent = sender.await.unwrap_or(result.answered);
    result.unanswered = sent.saturating_sub(result.answered);
    result
}

/// Waits until `at`: the timer for the coarse part, then the pacing ticker (see
/// [`TICK`]) for the last millisecond.
async fn wait_until(at: Instant, ticker: Option<&Notify>) {
    let now = Instant::now();
    if at > now + Duration::from_millis(2) {
        tokio::time::sleep_until((at - Duration::from_millis(1)).into()).await;
    }
    loop {
        // Created before the check, so a tick between the check and the await is
        // not lost (`notify_waiters` wakes every `Notified` created before it).
        let tick = ticker.map(Notify::notified);
        if Instant::now() >= at {
            return;
        }
        match tick {
            Some(tick) => tick.await,
            None => tokio::task::yield_now().await,
        }
    }
}

/// ghz's name for a gRPC code (Go's `codes.Code.String()`).
fn ghz_code(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Opens C connections.
async fn connect(args: &Args) -> Result<Vec<Channel>, Box<dyn std::error::Error>> {
    let endpoint = Endpoint::from_shared(args.url.clone())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(16 << 20));
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

/// Offers the load and reports.
async fn load(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let pool = Arc::new(message_pool(&args));
    let channels = connect(&args).await?;
    let streams = channels.len() * args.streams.max(1);
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(streams as f64 / args.rate));
    let per_stream = if args.messages > 0 {
        args.messages.div_ceil(streams as u64)
    } else {
        u64::MAX
    };
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = if args.messages > 0 {
        start + Duration::from_secs(3600)
    } else {
        start + args.duration
    };
    let plan = Plan {
        pool,
        interval,
        start,
        deadline,
        max_messages: per_stream,
        window: args.window,
        ticker: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut plan = plan;
    if interval.is_some() {
        plan.ticker = Some(start_ticker(Arc::clone(&stop)));
    }
    let date = SystemTime::now();
    let mut tasks = Vec::with_capacity(streams);
    for (c, channel) in channels.iter().enumerate() {
        for s in 0..args.streams.max(1) {
            let offset = (c * args.streams.max(1) + s) * 7919;
            tasks.push(tokio::spawn(run_stream(
                channel.clone(),
                plan.clone(),
                offset,
                Arc::clone(&stop),
            )));
        }
    }
    let stopper = Arc::clone(&stop);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopper.store(true, Ordering::Relaxed);
        }
    });
    let mut histogram = new_histogram();
    let mut answered = 0u64;
    let mut unanswered = 0u64;
    let mut counts = Counts::default();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await?);
    }
    // Every stream is done: the ticker thread may end.
    stop.store(true, Ordering::Relaxed);
    for result in results {
        histogram.add(&result.histogram)?;
        answered += result.answered;
        unanswered += result.unanswered;
        counts.verdicts += result.counts.verdicts;
        counts.errors += result.counts.errors;
        if result.answered > 0 {
            *statuses.entry("OK".into()).or_default() += result.answered;
        }
        if let Some(status) = result.status {
            let n = result.unanswered.max(1);
            *statuses.entry(ghz_code(status.code()).into()).or_default() += n;
            *errors
                .entry(format!(
                    "rpc error: code = {} desc = {}",
                    ghz_code(status.code()),
                    status.message()
                ))
                .or_default() += n;
        } else if result.unanswered > 0 {
            *statuses.entry("Unavailable".into()).or_default() += result.unanswered;
            *errors
                .entry("stream ended with messages unanswered".into())
                .or_default() += result.unanswered;
        }
    }
    let total = start.elapsed();
    let count = answered + unanswered;
    let rps = answered as f64 / total.as_secs_f64();
    let percentiles = [10u32, 25, 50, 75, 90, 95, 99];
    let nanos = |q: f64| {
        if answered == 0 {
            0
        } else {
            histogram.value_at_quantile(q)
        }
    };

    println!(
        "tidewatch-bench: {} connections x {} streams, {} samples/message, {} devices, rate {}",
        channels.len(),
        args.streams.max(1),
        args.batch,
        args.devices,
        if args.rate > 0.0 {
            format!("{:.0} msg/s", args.rate)
        } else {
            format!("max (window {})", args.window)
        }
    );
    println!("  messages answered   {answered} ({unanswered} unanswered)");
    println!(
        "  samples answered    {} ({} with a per-sample error)",
        counts.verdicts, counts.errors
    );
    println!("  elapsed             {:.3} s", total.as_secs_f64());
    println!(
        "  throughput          {:.0} messages/s, {:.0} samples/s",
        rps,
        counts.verdicts as f64 / total.as_secs_f64()
    );
    println!(
        "  latency (send -> verdict{}):",
        if args.rate > 0.0 {
            ", from intended send time"
        } else {
            ""
        }
    );
    for (label, q) in [
        ("p50", 0.5),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p99.9", 0.999),
        ("max", 1.0),
    ] {
        println!("    {label:<6} {:>10.1} µs", nanos(q) as f64 / 1000.0);
    }

    if let Some(path) = &args.output {
        let average = if answered == 0 {
            0
        } else {
            histogram.mean() as u64
        };
        let fastest = if answered == 0 { 0 } else { histogram.min() };
        let slowest = if answered == 0 { 0 } else { histogram.max() };
        let latency_distribution: Vec<Value> = percentiles
            .iter()
            .map(|p| json!({"percentage": p, "latency": nanos(f64::from(*p) / 100.0)}))
            .collect();
        let buckets = 10u64;
        let width = ((slowest.saturating_sub(fastest)) / buckets).max(1);
        let histogram_json: Vec<Value> = (0..=buckets)
            .map(|i| {
                let low = fastest + i * width;
                let high = low + width;
                let n: u64 = histogram
                    .iter_recorded()
                    .filter(|v| {
                        v.value_iterated_to() >= low
                            && (v.value_iterated_to() < high || i == buckets)
                    })
                    .map(|v| v.count_since_last_iteration())
                    .sum();
                json!({
                    "mark": low as f64 / 1e9,
                    "count": n,
                    "frequency": if answered == 0 { 0.0 } else { n as f64 / answered as f64 },
                })
            })
            .collect();
        let date = date
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let report = json!({
            "name": "tidewatch-bench",
            "endReason": if args.messages > 0 { "normal" } else { "timeout" },
            "date": rfc3339(date),
            "options": {
                "call": "tidewatch.v1.TelemetryService.Ingest",
                "host": args.url,
                "insecure": true,
                "rps": args.rate as u64,
                "connections": channels.len(),
                "concurrency": streams,
                "total": args.messages,
                "duration": args.duration.as_nanos() as u64,
                "binary": true,
                "CPUs": std::thread::available_parallelism().map_or(1, |n| n.get()),
                "load-schedule": "const",
                "concurrency-schedule": "const",
            },
            "count": count,
            "total": total.as_nanos() as u64,
            "average": average,
            "fastest": fastest,
            "slowest": slowest,
            "rps": rps,
            "errorDistribution": errors,
            "statusCodeDistribution": statuses,
            "latencyDistribution": latency_distribution,
            "histogram": histogram_json,
            "details": [],
            "tags": {
                "samples_per_message": args.batch.to_string(),
                "devices": args.devices.to_string(),
                "samples_answered": counts.verdicts.to_string(),
                "sample_errors": counts.errors.to_string(),
                "p99.9_ns": nanos(0.999).to_string(),
                "latency_from": if args.rate > 0.0 { "intended send time" } else { "send time" },
            },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("  report              {}", path.display());
    }
    if answered == 0 {
        return Err("no message was answered".into());
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (civil-from-days, Howard Hinnant).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Holds N idle streams open (each answered once, so it is known to be established).
async fn idle(args: Args, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    // Servers allow a limited number of concurrent streams per connection (hyper: 200).
    let per_connection = 100usize;
    let connections = n.div_ceil(per_connection).max(args.connections);
    let args = Args {
        connections,
        ..args
    };
    let channels = connect(&args).await?;
    let pool = Arc::new(message_pool(&Args {
        batch: 1,
        ..args.clone()
    }));
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let channel = channels[i % channels.len()].clone();
        let message = pool[i % pool.len()].clone();
        held.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(INGEST_PATH);
            let mut responses = grpc
                .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
                .await?
                .into_inner();
            tx.send(message)
                .await
                .map_err(|_| Status::cancelled("closed"))?;
            responses.message().await?;
            Ok::<_, Status>((tx, responses))
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for task in held {
        streams.push(task.await??);
    }
    println!(
        "idle streams open: {n} on {} connections; holding for {:?}",
        channels.len(),
        args.hold
    );
    tokio::select! {
        () = tokio::time::sleep(args.hold) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(streams);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.write_h2load_body {
        let pool = message_pool(&args);
        let body = h2load_body(&pool, args.body_messages.max(1));
        if let Err(e) = std::fs::write(path, &body) {
            eprintln!("cannot write {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
        println!(
            "wrote {} ({} bytes: {} messages of {} samples)",
            path.display(),
            body.len(),
            args.body_messages.max(1),
            args.batch
        );
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match args.idle_streams {
            Some(n) => idle(args, n).await,
            None => load(args).await,
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidewatch-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
