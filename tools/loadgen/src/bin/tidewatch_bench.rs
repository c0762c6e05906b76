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
//! The traffic is a fleet's (see `tidewatch_loadgen::traffic`): realistic device ids,
//! timestamps, 2-8 metrics per device, values with noise, drift and injected
//! anomalies, optionally a detector named per stream. The tool prints how many
//! distinct devices the traffic really reaches and, from the responses, how many
//! samples the server judged anomalous. `--watchers N` attaches N `WatchAnomalies`
//! subscribers for the run and counts their events.
//!
//! Other modes: `--idle-streams N` holds N streams open (one message each) so the
//! server's memory per stream can be measured; `--write-h2load-body FILE` writes a
//! request body of length-prefixed `IngestRequest`s for h2load; `--watch-only` holds
//! the watchers for `--duration` and offers no load (beside an h2load run).
//!
//! The load path speaks gRPC over the raw `h2` crate, so that one load core can offer
//! far more load than one server core takes and its own queueing stays out of the
//! numbers:
//! - messages are encoded and framed (5-byte gRPC prefix) once, before the run, into
//!   one contiguous buffer that covers every device; sending k due messages of a stream
//!   is one `send_data` of a slice of that buffer (no copy, no allocation);
//! - responses are counted by scanning the protobuf wire format of each gRPC frame in
//!   place (verdicts, and verdicts whose `error` is set), without decoding;
//! - intended send times wait in a `VecDeque` per stream; no channels;
//! - one task per connection drives the connection and all its streams, so a
//!   single-threaded runtime schedules one task per connection, not several per stream.

use std::{
    collections::{BTreeMap, VecDeque},
    future::{Future, poll_fn},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use h2::{
    RecvStream, SendStream,
    client::{Connection, ResponseFuture, SendRequest},
};
use hdrhistogram::Histogram;
use http::{HeaderMap, Method, Request, Uri};
use serde_json::{Value, json};
use tidewatch_loadgen::traffic::{IdStyle, MetricRange, Stats, Traffic};
use tidewatch_proto::v1::{
    WatchAnomaliesRequest, telemetry_service_client::TelemetryServiceClient,
};
use tokio::{net::TcpStream, sync::Semaphore, time::Sleep};
use tonic::{Code, Status};

/// The Ingest method path.
const INGEST_PATH: &str = "/tidewatch.v1.TelemetryService/Ingest";

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tidewatch-bench",
    version,
    about = "Load generator for tidewatch's Ingest stream: realistic fleet traffic, per-message latency without coordinated omission, ghz-compatible JSON report"
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
    /// Metrics per device: N, or MIN-MAX for a fixed count per device drawn in that
    /// range (named cpu, rps, mem_used, temp_c, latency_ms, errors, disk_io, net_rx,
    /// then m8, m9, ...).
    #[arg(long, default_value = "2-8")]
    metrics: MetricRange,
    /// Device id shape: fleet (`fleet-eu-west/gw-000123/dev-012345`, 34 bytes), uuid
    /// (36 bytes) or short (`dev-N`).
    #[arg(long, default_value = "fleet")]
    ids: IdStyle,
    /// Values per device in the message pool (replayed in a cycle); 0 chooses as many
    /// as fit 524,288 samples, at most 64.
    #[arg(long, default_value_t = 0)]
    rounds: usize,
    /// Share of samples with an injected spike on one metric (50-100 % of its base).
    #[arg(long, default_value_t = 0.01)]
    anomaly_rate: f64,
    /// Leave the samples' `time` unset (the server then uses its receive time).
    #[arg(long)]
    no_timestamps: bool,
    /// Detector named in every message (e.g. zscore, robust); unset: the server's.
    #[arg(long)]
    detector: Option<String>,
    /// Seed of the generated values.
    #[arg(long, default_value_t = 0x7469_6465)]
    seed: u64,
    /// WatchAnomalies subscribers attached for the run (all devices, all metrics).
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// Hold --watchers subscribers for --duration and offer no load.
    #[arg(long)]
    watch_only: bool,
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
    /// Write latency over time here, as CSV: one row per --timeline-interval of
    /// intended send time (start_ms, messages, over_1ms, mean_us, max_us). A tail
    /// from a few stalls and one from steady queueing look the same in percentiles,
    /// and different here.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Width of a --timeline row.
    #[arg(long, default_value = "100ms", value_parser = humantime_parse)]
    timeline_interval: Duration,
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
    /// Messages in the h2load body; 0: enough to reach every device once.
    #[arg(long, default_value_t = 0)]
    body_messages: usize,
    /// Send every Ingest message gzip-compressed (`grpc-encoding: gzip`, compressed
    /// once before the run, at tonic's level 6).
    #[arg(long)]
    gzip: bool,
    /// Ask for gzip-compressed answers (`grpc-accept-encoding: gzip`; the server
    /// compresses them when its `GRPC_COMPRESSION` allows gzip); they are decompressed
    /// to be counted.
    #[arg(long)]
    accept_gzip: bool,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e} (e.g. 500ms, 10s, 1m)"))
}

/// The traffic the arguments ask for.
fn traffic(args: &Args) -> Traffic {
    Traffic {
        devices: args.devices.max(1),
        batch: args.batch.max(1),
        rounds: args.rounds,
        metrics: args.metrics,
        ids: args.ids,
        anomaly_rate: args.anomaly_rate,
        timestamps: !args.no_timestamps,
        detector: args.detector.clone(),
        seed: args.seed,
    }
}

/// One line saying what the traffic is and what it reaches.
fn describe(traffic: &Traffic, stats: &Stats, reached: usize) -> String {
    format!(
        "traffic: {reached} distinct devices reached (of --devices {}), {} values each in a pool of {} messages; {} metrics per device ({:.1} on average); ids of {}-{} bytes; timestamps {}; {} of {} samples ({:.2} %) with an injected anomaly; detector {}",
        traffic.devices,
        stats.rounds,
        stats.messages,
        traffic.metrics,
        stats.values as f64 / stats.samples.max(1) as f64,
        stats.id_bytes.0,
        stats.id_bytes.1,
        if traffic.timestamps { "set" } else { "unset" },
        stats.anomalous,
        stats.samples,
        100.0 * stats.anomalous as f64 / stats.samples.max(1) as f64,
        traffic.detector.as_deref().unwrap_or("the server's"),
    )
}

/// CPU time this process has used (user + system), from `/proc/self/stat`; `None`
/// where there is no such file.
fn own_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at the state, the
    // third field; utime and stime are the 14th and 15th, in clock ticks of 1/100 s
    // (USER_HZ on every Linux target).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ').skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// Events the watchers received, and the events the server said they missed.
#[derive(Debug, Default)]
struct WatchCounts {
    events: AtomicU64,
    missed: AtomicU64,
    failed: AtomicU64,
}

/// Attaches `n` WatchAnomalies subscribers on their own connection; they count until
/// the runtime ends.
async fn start_watchers(
    url: &str,
    n: usize,
) -> Result<Arc<WatchCounts>, Box<dyn std::error::Error>> {
    let counts = Arc::new(WatchCounts::default());
    if n == 0 {
        return Ok(counts);
    }
    let mut client = TelemetryServiceClient::connect(url.to_string())
        .await
        .map_err(|e| format!("cannot connect the watchers to {url}: {e}"))?;
    for _ in 0..n {
        let mut stream = client
            .watch_anomalies(WatchAnomaliesRequest::default())
            .await?
            .into_inner();
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        counts.events.fetch_add(1, Ordering::Relaxed);
                        counts.missed.fetch_add(event.missed, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }
    Ok(counts)
}

/// The watchers' line of the summary.
fn watch_line(n: usize, counts: &WatchCounts) -> String {
    format!(
        "  watch events        {} on {n} watchers ({} missed, {} watchers failed)",
        counts.events.load(Ordering::Relaxed),
        counts.missed.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed)
    )
}

/// `messages` with their 5-byte gRPC prefixes, back to back.
fn framed(messages: impl Iterator<Item = impl AsRef<[u8]>>) -> BytesMut {
    let mut body = BytesMut::new();
    for message in messages {
        let message = message.as_ref();
        body.put_u8(0);
        body.put_u32(message.len() as u32);
        body.put_slice(message);
    }
    body
}

/// `message` gzip-compressed as tonic compresses it (level 6).
fn gzip(message: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    encoder.write_all(message).expect("in memory");
    encoder.finish().expect("in memory")
}

/// The message pool as one buffer of gRPC frames: a run of consecutive messages is one
/// slice of it.
struct Pool {
    /// Every message, framed, back to back.
    frames: Bytes,
    /// Where message i starts in `frames`; one more entry for the end.
    offsets: Vec<usize>,
}

impl Pool {
    /// The pool of `messages`, gzip-compressed (flag 1) when `compressed`.
    fn new(messages: &[Vec<u8>], compressed: bool) -> Self {
        let compressed_messages: Vec<Vec<u8>>;
        let messages = if compressed {
            compressed_messages = messages.iter().map(|m| gzip(m)).collect();
            &compressed_messages
        } else {
            messages
        };
        let mut offsets = Vec::with_capacity(messages.len() + 1);
        let mut at = 0;
        for m in messages {
            offsets.push(at);
            at += 5 + m.len();
        }
        offsets.push(at);
        let mut frames = framed(messages.iter());
        if compressed {
            for &offset in &offsets[..messages.len()] {
                frames[offset] = 1;
            }
        }
        Self {
            frames: frames.freeze(),
            offsets,
        }
    }

    fn len(&self) -> usize {
        self.offsets.len() - 1
    }
}

/// Per response: verdicts, and those carrying an error, an anomaly, an alert.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    verdicts: u64,
    errors: u64,
    anomalies: u64,
    alerts: u64,
    /// Answers that came compressed (`--accept-gzip`).
    compressed: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.verdicts += other.verdicts;
        self.errors += other.errors;
        self.anomalies += other.anomalies;
        self.alerts += other.alerts;
        self.compressed += other.compressed;
    }
}

/// Reads a protobuf varint at `*at`.
fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// A field [`scan_fields`] hands over.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Walks the fields of one protobuf message, calling `on_field(field, value)` for
/// every varint and length-delimited field; `None` when the message is malformed.
fn scan_fields(buf: &[u8], mut on_field: impl FnMut(u64, Field<'_>) -> Option<()>) -> Option<()> {
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        match key & 7 {
            0 => {
                let value = varint(buf, &mut at)?;
                on_field(key >> 3, Field::Varint(value))?;
            }
            1 => at += 8,
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?).ok()?;
                let end = at.checked_add(len)?;
                on_field(key >> 3, Field::Bytes(buf.get(at..end)?))?;
                at = end;
            }
            5 => at += 4,
            _ => return None,
        }
    }
    (at == buf.len()).then_some(())
}

/// Counts the verdicts of an encoded `IngestResponse` (field 1) and those whose
/// `error` (field 6 of `Verdict`), `anomaly` (3) or `alert` (7) is set, without
/// decoding or allocating.
fn count_verdicts(response: &[u8]) -> Option<Counts> {
    let mut counts = Counts::default();
    scan_fields(response, |field, verdict| {
        if let (1, Field::Bytes(verdict)) = (field, verdict) {
            counts.verdicts += 1;
            let (mut error, mut anomaly, mut alert) = (false, false, false);
            scan_fields(verdict, |field, value| {
                match (field, value) {
                    (6, Field::Bytes(text)) => error |= !text.is_empty(),
                    (3, Field::Varint(v)) => anomaly |= v != 0,
                    (7, Field::Varint(v)) => alert |= v != 0,
                    _ => {}
                }
                Some(())
            })?;
            counts.errors += u64::from(error);
            counts.anomalies += u64::from(anomaly);
            counts.alerts += u64::from(alert);
        }
        Some(())
    })?;
    Some(counts)
}

/// Splits the response body into gRPC messages; a message may span DATA chunks.
#[derive(Default)]
struct FrameReader {
    /// The 5-byte prefix being read, when a chunk ended inside it.
    header: [u8; 5],
    /// Bytes of `header` read so far.
    header_len: usize,
    /// True while the body of a message that spans chunks is being collected.
    in_body: bool,
    /// Body bytes the current message still misses.
    need: usize,
    /// The body collected so far (reused: no allocation once it has grown).
    partial: Vec<u8>,
    /// Whether the message being read is compressed (gzip, `--accept-gzip`).
    compressed: bool,
    /// A compressed message decompressed (reused).
    inflated: Vec<u8>,
}

/// Counts the verdicts of one response message, gzip-decompressed first when
/// `compressed`.
fn count_message(message: &[u8], compressed: bool, inflated: &mut Vec<u8>) -> Option<Counts> {
    if !compressed {
        return count_verdicts(message);
    }
    use std::io::Read as _;
    inflated.clear();
    flate2::read::GzDecoder::new(message)
        .read_to_end(inflated)
        .ok()?;
    let mut counts = count_verdicts(inflated)?;
    counts.compressed = 1;
    Some(counts)
}

impl FrameReader {
    /// Feeds one chunk; `on_message` gets the counts of every complete message.
    fn feed(&mut self, mut chunk: &[u8], mut on_message: impl FnMut(Counts)) -> Result<(), Status> {
        let bad = || Status::internal("cannot decode IngestResponse");
        while !chunk.is_empty() {
            if self.in_body {
                let take = self.need.min(chunk.len());
                self.partial.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                self.need -= take;
                if self.need == 0 {
                    self.in_body = false;
                    on_message(
                        count_message(&self.partial, self.compressed, &mut self.inflated)
                            .ok_or_else(bad)?,
                    );
                }
                continue;
            }
            let len = if self.header_len == 0 && chunk.len() >= 5 {
                self.header.copy_from_slice(&chunk[..5]);
                chunk = &chunk[5..];
                self.message_len()?
            } else {
                let take = (5 - self.header_len).min(chunk.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&chunk[..take]);
                self.header_len += take;
                chunk = &chunk[take..];
                if self.header_len < 5 {
                    continue;
                }
                self.header_len = 0;
                self.message_len()?
            };
            if chunk.len() >= len {
                on_message(
                    count_message(&chunk[..len], self.compressed, &mut self.inflated)
                        .ok_or_else(bad)?,
                );
                chunk = &chunk[len..];
            } else {
                self.partial.clear();
                self.partial.extend_from_slice(chunk);
                self.need = len - chunk.len();
                self.in_body = true;
                chunk = &[];
            }
        }
        Ok(())
    }

    /// The length of the message whose prefix is in `header`; notes whether it is
    /// compressed (the server compresses only what `--accept-gzip` asked for).
    fn message_len(&mut self) -> Result<usize, Status> {
        self.compressed = self.header[0] == 1;
        if self.header[0] > 1 {
            return Err(Status::internal(
                "response with an invalid compression flag",
            ));
        }
        let len = u32::from_be_bytes([
            self.header[1],
            self.header[2],
            self.header[3],
            self.header[4],
        ]);
        Ok(len as usize)
    }

    /// True when a message was cut off by the end of the body.
    fn mid_message(&self) -> bool {
        self.in_body || self.header_len > 0
    }
}

/// What one stream measured.
struct StreamResult {
    /// Latency of every answered message, nanoseconds.
    histogram: Histogram<u64>,
    /// Latency by intended send time, one slice per `Plan::timeline` (with
    /// `--timeline`).
    timeline: Vec<Slice>,
    /// Messages answered.
    answered: u64,
    /// Messages sent but never answered.
    unanswered: u64,
    /// Verdicts received, and those carrying a per-sample error.
    counts: Counts,
    /// The status that ended the stream, if not OK.
    status: Option<Status>,
}

/// The messages of one `--timeline` row: those intended to be sent in it.
#[derive(Debug, Default, Clone, Copy)]
struct Slice {
    /// Messages answered.
    messages: u64,
    /// Of those, answered more than [`SLOW`] after their intended send time.
    slow: u64,
    /// Sum of their latencies, nanoseconds.
    sum_ns: u64,
    /// The largest of their latencies, nanoseconds.
    max_ns: u64,
}

/// A message slower than this counts in a `--timeline` row's `over_1ms`.
const SLOW: Duration = Duration::from_millis(1);

impl Slice {
    fn record(&mut self, nanos: u64) {
        self.messages += 1;
        self.slow += u64::from(nanos > SLOW.as_nanos() as u64);
        self.sum_ns = self.sum_ns.saturating_add(nanos);
        self.max_ns = self.max_ns.max(nanos);
    }

    fn add(&mut self, other: &Slice) {
        self.messages += other.messages;
        self.slow += other.slow;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }
}

/// Records a latency of `nanos` for a message intended at `at` in `timeline`, whose
/// slices are `width` wide from `start`.
fn record_slice(
    timeline: &mut Vec<Slice>,
    start: Instant,
    width: Duration,
    at: Instant,
    nanos: u64,
) {
    let index = (at.saturating_duration_since(start).as_nanos() / width.as_nanos().max(1)) as usize;
    if timeline.len() <= index {
        timeline.resize(index + 1, Slice::default());
    }
    timeline[index].record(nanos);
}

/// Writes `timeline` (slices `width` wide) as CSV.
fn write_timeline(path: &Path, timeline: &[Slice], width: Duration) -> std::io::Result<()> {
    let mut csv = String::from("start_ms,messages,over_1ms,mean_us,max_us\n");
    for (i, slice) in timeline.iter().enumerate() {
        let mean_us = if slice.messages == 0 {
            0.0
        } else {
            slice.sum_ns as f64 / slice.messages as f64 / 1e3
        };
        csv.push_str(&format!(
            "{},{},{},{:.1},{:.1}\n",
            (width * i as u32).as_millis(),
            slice.messages,
            slice.slow,
            mean_us,
            slice.max_ns as f64 / 1e3
        ));
    }
    std::fs::write(path, csv)
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// The plan every stream follows.
struct Plan {
    /// Messages to cycle through.
    pool: Pool,
    /// Interval between one stream's intended sends, in nanoseconds (`None` = closed
    /// loop).
    interval_ns: Option<f64>,
    /// When offering load started.
    start: Instant,
    /// When to stop offering load.
    deadline: Instant,
    /// Outstanding messages per stream in closed-loop mode.
    window: usize,
    /// Keep each stream open after its last message is answered (idle streams).
    hold_open: bool,
    /// Set by Ctrl-C: stop sending, let what was sent be answered.
    stop: Arc<AtomicBool>,
    /// Wakes paced connections every [`TICK`] (open loop only).
    ticker: Option<Arc<Ticker>>,
    /// Width of a `--timeline` slice, if one is written.
    timeline: Option<Duration>,
    /// Idle mode: one permit per stream that got its answer (or failed).
    ready: Option<Arc<Semaphore>>,
    /// Idle mode: streams that failed before their answer.
    failed: AtomicU64,
}

/// Period of the pacing ticker. tokio's timer has a 1 ms resolution, which would add up
/// to 1 ms to every latency measured from the intended send time; spinning on
/// `yield_now` until the send time instead burns the load generator's core (each
/// yield polls the I/O driver) and shows as millisecond tails. A thread that sleeps
/// `TICK` and wakes the connections that asked for it gives ≈ 0.1 ms precision
/// (nanosleep's slack included) for little CPU; each wake sends every message that is
/// due, as one write per stream, so at high rates several messages share one write.
const TICK: Duration = Duration::from_micros(50);

/// Largest DATA frame payload sent as one piece. h2 copies a payload under 256 bytes
/// (its `CHAIN_THRESHOLD` with vectored I/O) into its 16 KiB write buffer, so the
/// frames of every stream of a connection leave in one `writev`; a larger payload is
/// chained instead and costs a `writev` of its own (one per stream per tick, and a
/// system call in this VM costs more than copying a few hundred bytes).
const COPIED_FRAME: usize = 255;

/// The pacing ticker: a thread that wakes, every [`TICK`], the connection tasks that
/// registered since the last tick.
struct Ticker {
    /// One slot per connection task: its waker while it waits for a tick.
    slots: Mutex<Vec<Option<Waker>>>,
    /// Ticks that woke at least one task (for the summary).
    ticks: AtomicU64,
    /// Ticks so far: a driver paces only when it has changed since its last poll.
    generation: AtomicU64,
}

impl Ticker {
    /// Starts the thread; it ends when `stop` is set.
    fn start(connections: usize, stop: Arc<AtomicBool>) -> Arc<Self> {
        let ticker = Arc::new(Self {
            slots: Mutex::new(vec![None; connections]),
            ticks: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        });
        let shared = Arc::clone(&ticker);
        std::thread::spawn(move || {
            let mut due = Vec::with_capacity(connections);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                shared.generation.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut slots) = shared.slots.lock() {
                    due.extend(slots.iter_mut().filter_map(Option::take));
                }
                if !due.is_empty() {
                    shared.ticks.fetch_add(1, Ordering::Relaxed);
                }
                due.drain(..).for_each(Waker::wake);
            }
        });
        ticker
    }

    /// Asks for a wake of connection `id` at the next tick.
    fn register(&self, id: usize, waker: &Waker) {
        if let Ok(mut slots) = self.slots.lock() {
            match &slots[id] {
                Some(w) if w.will_wake(waker) => {}
                _ => slots[id] = Some(waker.clone()),
            }
        }
    }
}

/// Where a stream is.
enum Phase {
    /// Waiting for the response headers.
    Headers(ResponseFuture),
    /// Reading response messages.
    Body(RecvStream),
    /// Response messages are over: waiting for the trailers.
    Trailers(RecvStream),
    /// Finished (`result.status` says how).
    Done,
}

/// One Ingest stream of a connection.
struct Stream {
    /// The request body; `None` once half-closed.
    send: Option<SendStream<Bytes>>,
    /// The response side.
    phase: Phase,
    /// gRPC frames of the response body.
    reader: FrameReader,
    /// Intended send time of every message not yet answered, oldest first.
    intended: VecDeque<Instant>,
    /// Messages sent so far.
    sent: u64,
    /// Messages this stream sends at most.
    max_messages: u64,
    /// Next pool message to send.
    index: usize,
    /// Offset of this stream's schedule in the open loop, in nanoseconds, so streams do
    /// not send in lockstep.
    phase_ns: f64,
    /// What it measured.
    result: StreamResult,
    /// Idle mode: whether this stream has been counted as ready.
    reported: bool,
}

/// gRPC status for an HTTP/2 error (as tonic maps them; see grpc's PROTOCOL-HTTP2.md).
fn h2_status(e: &h2::Error) -> Status {
    let code = match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        Some(_) => Code::Internal,
        // The connection broke (I/O error, GOAWAY without a stream reason).
        None => Code::Unavailable,
    };
    Status::new(code, format!("h2 protocol error: {e}"))
}

/// gRPC status for a non-200 HTTP status (grpc's http-grpc-status-mapping.md).
fn http_status(status: http::StatusCode) -> Status {
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {status}"))
}

/// The status in trailers (or in the headers of a trailers-only response); `None` for OK.
fn grpc_status(headers: &HeaderMap) -> Option<Status> {
    match Status::from_header_map(headers) {
        Some(status) if status.code() == Code::Ok => None,
        Some(status) => Some(status),
        None => Some(Status::internal("response ended without grpc-status")),
    }
}

impl Stream {
    /// True when this stream may send another message at `now`. Paced, a message whose
    /// intended send time is before the deadline is sent even when the task got to it
    /// after the deadline (a late wake-up on a busy machine): dropping it would leave
    /// out exactly the messages that waited, the coordinated omission the intended
    /// send times are there to avoid ([`Stream::send_due`] stops at the deadline).
    fn may_send(&self, plan: &Plan, now: Instant) -> bool {
        self.send.is_some()
            && self.sent < self.max_messages
            && (plan.interval_ns.is_some() || now < plan.deadline)
            && !plan.stop.load(Ordering::Relaxed)
    }

    /// Sends `k` messages from the pool as slices of it, in DATA frames of at most
    /// [`COPIED_FRAME`] bytes where messages are that small.
    fn send_messages(&mut self, plan: &Plan, mut k: usize) {
        let pool = &plan.pool;
        while k > 0 {
            let first = self.index;
            let limit = (first + k).min(pool.len());
            let mut end = first + 1;
            while end < limit && pool.offsets[end + 1] - pool.offsets[first] <= COPIED_FRAME {
                end += 1;
            }
            let data = pool.frames.slice(pool.offsets[first]..pool.offsets[end]);
            if let Some(send) = &mut self.send
                && send.send_data(data, false).is_err()
            {
                // Reset by the server: the response side reports why.
                self.send = None;
                return;
            }
            k -= end - first;
            self.index = end % pool.len();
        }
    }

    /// Sends everything due at `now`; returns when the next message is due (open loop).
    fn send_due(&mut self, plan: &Plan, now: Instant) -> Option<Instant> {
        let mut next = None;
        if self.may_send(plan, now) {
            let due = match plan.interval_ns {
                Some(interval) => {
                    let elapsed = now.saturating_duration_since(plan.start).as_nanos() as f64;
                    let due_total = if now < plan.start || elapsed < self.phase_ns {
                        0
                    } else {
                        ((elapsed - self.phase_ns) / interval) as u64 + 1
                    };
                    let mut due = 0;
                    while self.sent + due < due_total.min(self.max_messages) {
                        let at = plan.start
                            + Duration::from_nanos(
                                (self.phase_ns + (self.sent + due) as f64 * interval) as u64,
                            );
                        if at >= plan.deadline {
                            self.max_messages = self.sent + due;
                            break;
                        }
                        self.intended.push_back(at);
                        due += 1;
                    }
                    if self.sent + due < self.max_messages {
                        let at = plan.start
                            + Duration::from_nanos(
                                (self.phase_ns + (self.sent + due) as f64 * interval) as u64,
                            );
                        if at < plan.deadline {
                            next = Some(at);
                        }
                    }
                    due
                }
                None => {
                    let room = plan.window.max(1).saturating_sub(self.intended.len()) as u64;
                    let due = room.min(self.max_messages - self.sent);
                    for _ in 0..due {
                        self.intended.push_back(now);
                    }
                    due
                }
            };
            if due > 0 {
                self.send_messages(plan, due as usize);
                self.sent += due;
            }
        }
        // Done sending: half-close, so the server ends the stream once it has answered.
        let finished = !self.may_send(plan, now) || (plan.interval_ns.is_some() && next.is_none());
        if finished && !plan.hold_open {
            if let Some(mut send) = self.send.take() {
                let _ = send.send_data(Bytes::new(), true);
            }
            next = None;
        }
        next
    }

    /// Reads what has arrived; records the latency of every answered message.
    fn poll_recv(&mut self, cx: &mut Context<'_>, plan: &Plan) {
        loop {
            match &mut self.phase {
                Phase::Headers(response) => match Pin::new(response).poll(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Err(e)) => self.finish(Some(h2_status(&e))),
                    Poll::Ready(Ok(response)) => {
                        let (parts, body) = response.into_parts();
                        if parts.status != http::StatusCode::OK {
                            self.finish(Some(http_status(parts.status)));
                        } else if parts.headers.contains_key("grpc-status") {
                            // Trailers-only: the call ended before any message.
                            self.finish(grpc_status(&parts.headers));
                        } else {
                            self.phase = Phase::Body(body);
                        }
                    }
                },
                Phase::Body(body) => match body.poll_data(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Some(Ok(chunk))) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        let now = Instant::now();
                        let result = &mut self.result;
                        let intended = &mut self.intended;
                        let mut extra = false;
                        let fed = self.reader.feed(&chunk, |counts| {
                            let Some(at) = intended.pop_front() else {
                                extra = true;
                                return;
                            };
                            let nanos = now.saturating_duration_since(at).as_nanos() as u64;
                            result.histogram.saturating_record(nanos.max(1));
                            if let Some(width) = plan.timeline {
                                record_slice(&mut result.timeline, plan.start, width, at, nanos);
                            }
                            result.answered += 1;
                            result.counts.add(&counts);
                        });
                        if let Err(status) = fed {
                            self.finish(Some(status));
                        } else if extra {
                            self.finish(Some(Status::internal("more responses than requests")));
                        } else if plan.hold_open && !self.reported && self.result.answered > 0 {
                            self.reported = true;
                            if let Some(ready) = &plan.ready {
                                ready.add_permits(1);
                            }
                        }
                    }
                    Poll::Ready(Some(Err(e))) => self.finish(Some(h2_status(&e))),
                    Poll::Ready(None) => {
                        let Phase::Body(body) = std::mem::replace(&mut self.phase, Phase::Done)
                        else {
                            unreachable!()
                        };
                        if self.reader.mid_message() {
                            self.finish(Some(Status::internal("response body cut mid-message")));
                        } else {
                            self.phase = Phase::Trailers(body);
                        }
                    }
                },
                Phase::Trailers(body) => match body.poll_trailers(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Ok(Some(trailers))) => self.finish(grpc_status(&trailers)),
                    Poll::Ready(Ok(None)) => {
                        self.finish(Some(Status::internal("response ended without trailers")))
                    }
                    Poll::Ready(Err(e)) => self.finish(Some(h2_status(&e))),
                },
                Phase::Done => return,
            }
        }
    }

    /// Ends the stream with `status` (`None` = OK).
    fn finish(&mut self, status: Option<Status>) {
        self.phase = Phase::Done;
        self.send = None;
        self.result.status = status;
        self.result.unanswered = self.sent - self.result.answered;
    }
}

/// One connection and its streams, driven by one task.
struct Driver {
    /// Index of this connection (its ticker slot).
    id: usize,
    /// The HTTP/2 connection; `None` once it has ended.
    connection: Option<Connection<TcpStream, Bytes>>,
    /// Its streams.
    streams: Vec<Stream>,
    /// Coarse wait until the next send when it is more than 2 ms away.
    sleep: Pin<Box<Sleep>>,
    /// True while `sleep` is armed.
    sleeping: bool,
    /// When the next paced message of any stream is due (open loop).
    next_send: Option<Instant>,
    /// The ticker's generation at the last poll: a new one means a tick passed.
    seen_tick: u64,
    /// True until the first poll, which sends (closed loop) or schedules (open loop).
    first_poll: bool,
}

impl Driver {
    /// Polls the connection; an error ends it (its streams then report why).
    fn poll_connection(&mut self, cx: &mut Context<'_>) {
        if let Some(connection) = &mut self.connection
            && Pin::new(connection).poll(cx).is_ready()
        {
            self.connection = None;
        }
    }

    /// Drives everything once; `Ready` when every stream is done.
    fn poll(&mut self, cx: &mut Context<'_>, plan: &Plan) -> Poll<()> {
        self.poll_connection(cx);
        // Paced sends happen only on a tick (or when the coarse sleep ends), never on
        // a poll caused by a response or by h2 itself: `send_data` wakes this task, so
        // sending on every poll would spin, one message per write, as soon as a poll
        // takes longer than the interval between two messages of a stream.
        let mut pace = plan.interval_ns.is_none() || self.first_poll;
        self.first_poll = false;
        if let Some(ticker) = &plan.ticker {
            let tick = ticker.generation.load(Ordering::Relaxed);
            pace |= tick != self.seen_tick;
            self.seen_tick = tick;
        }
        if self.sleeping && self.sleep.as_mut().poll(cx).is_ready() {
            self.sleeping = false;
            pace = true;
        }
        let mut next: Option<Instant> = None;
        let mut pending = false;
        let now = Instant::now();
        for stream in &mut self.streams {
            stream.poll_recv(cx, plan);
            if matches!(stream.phase, Phase::Done) {
                if plan.hold_open && !stream.reported {
                    stream.reported = true;
                    plan.failed.fetch_add(1, Ordering::Relaxed);
                    if let Some(ready) = &plan.ready {
                        ready.add_permits(1);
                    }
                }
                continue;
            }
            pending = true;
            if pace && let Some(at) = stream.send_due(plan, now) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        // Flush what was just queued without waiting for a re-poll.
        self.poll_connection(cx);
        if !pending {
            return Poll::Ready(());
        }
        if pace {
            self.next_send = next;
        }
        if let Some(at) = self.next_send {
            if at > now + Duration::from_millis(2) {
                if !self.sleeping {
                    self.sleep
                        .as_mut()
                        .reset((at - Duration::from_millis(1)).into());
                    self.sleeping = true;
                    if self.sleep.as_mut().poll(cx).is_ready() {
                        cx.waker().wake_by_ref();
                    }
                }
            } else if let Some(ticker) = &plan.ticker {
                ticker.register(self.id, cx.waker());
            }
        }
        Poll::Pending
    }

    fn into_results(self) -> Vec<StreamResult> {
        self.streams.into_iter().map(|s| s.result).collect()
    }
}

/// The Ingest request head, naming gzip for the messages (`--gzip`) and the answers
/// (`--accept-gzip`) as asked.
fn ingest_request(base: &Uri, args: &Args) -> Result<Request<()>, http::Error> {
    let authority = base.authority().map_or("localhost", |a| a.as_str());
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{authority}{INGEST_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "tidewatch-bench");
    if args.gzip {
        request = request.header("grpc-encoding", "gzip");
    }
    if args.accept_gzip {
        request = request.header("grpc-accept-encoding", "gzip");
    }
    request.body(())
}

/// Opens one HTTP/2 connection (stream window 1 MiB, connection window 16 MiB,
/// TCP_NODELAY).
async fn connect_one(
    base: &Uri,
    url: &str,
) -> Result<(SendRequest<Bytes>, Connection<TcpStream, Bytes>), Box<dyn std::error::Error>> {
    let host = base.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = base.port_u16().unwrap_or(80);
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("cannot connect to {url}: timed out after 5 s"))?
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {url} failed: {e}"))?;
    Ok((send, connection))
}

/// Opens `streams` Ingest streams on a connection, driving the connection meanwhile
/// (the server may limit concurrent streams).
async fn open_streams(
    mut send: SendRequest<Bytes>,
    mut connection: Connection<TcpStream, Bytes>,
    request: &Request<()>,
    streams: usize,
) -> Result<
    (
        Connection<TcpStream, Bytes>,
        Vec<(ResponseFuture, SendStream<Bytes>)>,
    ),
    h2::Error,
> {
    let mut opened = Vec::with_capacity(streams);
    while opened.len() < streams {
        poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut connection).poll(cx) {
                return Poll::Ready(Err(result
                    .err()
                    .unwrap_or_else(|| h2::Error::from(h2::Reason::REFUSED_STREAM))));
            }
            send.poll_ready(cx)
        })
        .await?;
        let mut head = Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.headers_mut() = request.headers().clone();
        opened.push(send.send_request(head, false)?);
    }
    Ok((connection, opened))
}

/// Opens the connections and their streams, each connection as one [`Driver`].
async fn start_drivers(
    args: &Args,
    connections: usize,
    streams_per_connection: &[usize],
    plan: &Plan,
    max_messages: impl Fn(usize) -> u64,
) -> Result<Vec<Driver>, Box<dyn std::error::Error>> {
    let base: Uri = args
        .url
        .parse()
        .map_err(|e| format!("bad --url {:?}: {e}", args.url))?;
    let request = ingest_request(&base, args)?;
    let mut drivers = Vec::with_capacity(connections);
    let mut stream_index = 0usize;
    for (id, &streams) in streams_per_connection.iter().enumerate().take(connections) {
        let (send, connection) = connect_one(&base, &args.url).await?;
        let (connection, opened) = open_streams(send, connection, &request, streams)
            .await
            .map_err(|e| format!("cannot open Ingest streams on {}: {e}", args.url))?;
        let streams = opened
            .into_iter()
            .map(|(response, send)| {
                let offset = stream_index * 7919;
                let phase_ns = plan
                    .interval_ns
                    .map_or(0.0, |i| i * (offset % 997) as f64 / 997.0);
                let stream = Stream {
                    send: Some(send),
                    phase: Phase::Headers(response),
                    reader: FrameReader::default(),
                    intended: VecDeque::with_capacity(plan.window.max(16)),
                    sent: 0,
                    max_messages: max_messages(stream_index),
                    index: offset % plan.pool.len(),
                    phase_ns,
                    result: StreamResult {
                        histogram: new_histogram(),
                        timeline: Vec::new(),
                        answered: 0,
                        unanswered: 0,
                        counts: Counts::default(),
                        status: None,
                    },
                    reported: false,
                };
                stream_index += 1;
                stream
            })
            .collect();
        drivers.push(Driver {
            id,
            connection: Some(connection),
            streams,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            sleeping: false,
            next_send: None,
            seen_tick: 0,
            first_poll: true,
        });
    }
    Ok(drivers)
}

/// Runs a driver to the end on its own task.
fn spawn_driver(mut driver: Driver, plan: Arc<Plan>) -> tokio::task::JoinHandle<Vec<StreamResult>> {
    tokio::spawn(async move {
        poll_fn(|cx| driver.poll(cx, &plan)).await;
        driver.into_results()
    })
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

/// Offers the load and reports.
async fn load(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let connections = args.connections.max(1);
    let per_connection = args.streams.max(1);
    let streams = connections * per_connection;
    let interval_ns = (args.rate > 0.0).then(|| streams as f64 * 1e9 / args.rate);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = traffic(&args);
    let (messages, stats) = traffic.generate();
    println!(
        "{}",
        describe(&traffic, &stats, traffic.devices_reached(stats.messages))
    );
    let watchers = start_watchers(&args.url, args.watchers).await?;
    let mut plan = Plan {
        pool: Pool::new(&messages, args.gzip),
        interval_ns,
        // Set again below, once every connection is open.
        start: Instant::now(),
        deadline: Instant::now(),
        window: args.window,
        hold_open: false,
        stop: Arc::clone(&stop),
        ticker: None,
        timeline: args.timeline.is_some().then_some(args.timeline_interval),
        ready: None,
        failed: AtomicU64::new(0),
    };
    // Exactly --messages in total: the first (messages % streams) streams send one more.
    let messages = args.messages;
    let max_messages = |i: usize| {
        if messages == 0 {
            u64::MAX
        } else {
            messages / streams as u64 + u64::from((i as u64) < messages % streams as u64)
        }
    };
    let drivers = start_drivers(
        &args,
        connections,
        &vec![per_connection; connections],
        &plan,
        max_messages,
    )
    .await?;
    // Open loop: the schedule starts once every driver task has been spawned, so the
    // first intended sends are not late from the start. Closed loop sends at once.
    let start = Instant::now() + Duration::from_millis(if interval_ns.is_some() { 50 } else { 0 });
    plan.start = start;
    plan.deadline = if args.messages > 0 {
        start + Duration::from_secs(3600)
    } else {
        start + args.duration
    };
    if interval_ns.is_some() {
        plan.ticker = Some(Ticker::start(connections, Arc::clone(&stop)));
    }
    let plan = Arc::new(plan);
    let date = SystemTime::now();
    let cpu_at_start = own_cpu();
    let tasks: Vec<_> = drivers
        .into_iter()
        .map(|driver| spawn_driver(driver, Arc::clone(&plan)))
        .collect();
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
    let mut results = Vec::with_capacity(streams);
    for task in tasks {
        results.extend(task.await?);
    }
    // Every stream is done: the ticker thread may end.
    stop.store(true, Ordering::Relaxed);
    let total = start.elapsed();
    // The load generator's own share of a core while it offered load (pool
    // generation excluded): near 100 %, its own queueing is in the numbers.
    let cpu_share = cpu_at_start
        .zip(own_cpu())
        .map(|(a, b)| 100.0 * (b - a).as_secs_f64() / total.as_secs_f64());
    let mut timeline: Vec<Slice> = Vec::new();
    for result in results {
        histogram.add(&result.histogram)?;
        if timeline.len() < result.timeline.len() {
            timeline.resize(result.timeline.len(), Slice::default());
        }
        for (all, slice) in timeline.iter_mut().zip(&result.timeline) {
            all.add(slice);
        }
        answered += result.answered;
        unanswered += result.unanswered;
        counts.add(&result.counts);
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
        connections,
        per_connection,
        args.batch,
        args.devices,
        if args.rate > 0.0 {
            format!("{:.0} msg/s", args.rate)
        } else {
            format!("max (window {})", args.window)
        }
    );
    println!("  messages answered   {answered} ({unanswered} unanswered)");
    if args.accept_gzip {
        println!("  answers gzipped     {}", counts.compressed);
    }
    println!(
        "  samples answered    {} ({} with a per-sample error)",
        counts.verdicts, counts.errors
    );
    println!(
        "  anomalous verdicts  {} ({:.2} % of samples answered; {} alerts)",
        counts.anomalies,
        100.0 * counts.anomalies as f64 / counts.verdicts.max(1) as f64,
        counts.alerts
    );
    if args.watchers > 0 {
        // Events of the last answers may still be on their way.
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!("{}", watch_line(args.watchers, &watchers));
    }
    for (error, n) in &errors {
        println!("  error               {n} x {error}");
    }
    println!("  elapsed             {:.3} s", total.as_secs_f64());
    if let Some(share) = cpu_share {
        println!("  load generator CPU  {share:.0} % of one core");
    }
    println!(
        "  throughput          {:.0} messages/s, {:.0} samples/s",
        rps,
        counts.verdicts as f64 / total.as_secs_f64()
    );
    if let Some(ticker) = &plan.ticker {
        println!(
            "  pacing ticks        {} ({:.1} messages per tick)",
            ticker.ticks.load(Ordering::Relaxed),
            count as f64 / ticker.ticks.load(Ordering::Relaxed).max(1) as f64
        );
    }
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
                "connections": connections,
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
                "anomalous_samples": counts.anomalies.to_string(),
                "alerts": counts.alerts.to_string(),
                "devices_reached": traffic.devices_reached(stats.messages).to_string(),
                "injected_anomalies": stats.anomalous.to_string(),
                "pool_samples": stats.samples.to_string(),
                "watch_events": watchers.events.load(Ordering::Relaxed).to_string(),
                "loadgen_cpu_percent": cpu_share.map_or_else(String::new, |s| format!("{s:.0}")),
                "p99.9_ns": nanos(0.999).to_string(),
                "latency_from": if args.rate > 0.0 { "intended send time" } else { "send time" },
            },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("  report              {}", path.display());
    }
    if let Some(path) = &args.timeline {
        write_timeline(path, &timeline, args.timeline_interval)?;
        println!("  timeline            {}", path.display());
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
    let connections = n.div_ceil(per_connection).max(args.connections).max(1);
    let split: Vec<usize> = (0..connections)
        .map(|c| n / connections + usize::from(c < n % connections))
        .collect();
    let ready = Arc::new(Semaphore::new(0));
    let plan = Plan {
        pool: Pool::new(
            &traffic(&Args {
                batch: 1,
                rounds: 1,
                ..args.clone()
            })
            .generate()
            .0,
            false,
        ),
        interval_ns: None,
        start: Instant::now(),
        deadline: Instant::now() + Duration::from_secs(365 * 86_400),
        window: 1,
        hold_open: true,
        stop: Arc::new(AtomicBool::new(false)),
        ticker: None,
        timeline: None,
        ready: Some(Arc::clone(&ready)),
        failed: AtomicU64::new(0),
    };
    let drivers = start_drivers(&args, connections, &split, &plan, |_| 1).await?;
    let plan = Arc::new(plan);
    let tasks: Vec<_> = drivers
        .into_iter()
        .map(|driver| spawn_driver(driver, Arc::clone(&plan)))
        .collect();
    let wanted = u32::try_from(n).map_err(|_| "too many idle streams")?;
    let _ = ready.acquire_many(wanted).await?;
    let failed = plan.failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(
            format!("{failed} of {n} idle streams failed before their first answer").into(),
        );
    }
    println!(
        "idle streams open: {n} on {connections} connections; holding for {:?}",
        args.hold
    );
    tokio::select! {
        () = tokio::time::sleep(args.hold) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// Writes an h2load body and says which devices it reaches.
fn write_body(args: &Args, path: &Path) -> std::process::ExitCode {
    let traffic = traffic(args);
    let count = match args.body_messages {
        0 => traffic.devices.div_ceil(traffic.batch),
        n => n,
    };
    // The body is the start of the pool: no more rounds than it holds.
    let traffic = Traffic {
        rounds: if traffic.rounds == 0 {
            (count * traffic.batch).div_ceil(traffic.devices).max(1)
        } else {
            traffic.rounds
        },
        ..traffic
    };
    let (pool, stats) = traffic.generate();
    let body = framed(pool.iter().cycle().take(count));
    if let Err(e) = std::fs::write(path, &body) {
        eprintln!("cannot write {}: {e}", path.display());
        return std::process::ExitCode::FAILURE;
    }
    let reached = traffic.devices_reached(count);
    println!(
        "wrote {} ({} bytes: {} messages of {} samples)",
        path.display(),
        body.len(),
        count,
        traffic.batch
    );
    println!("{}", describe(&traffic, &stats, reached));
    if reached < traffic.devices {
        eprintln!(
            "note: the body reaches only {reached} of {} devices; --body-messages {} reaches them all",
            traffic.devices,
            traffic.devices.div_ceil(traffic.batch)
        );
    }
    std::process::ExitCode::SUCCESS
}

/// Holds the watchers for the duration and reports what they received.
async fn watch_only(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let n = args.watchers.max(1);
    let counts = start_watchers(&args.url, n).await?;
    println!("watchers attached: {n}");
    tokio::select! {
        () = tokio::time::sleep(args.duration) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!("{}", watch_line(n, &counts));
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.write_h2load_body {
        return write_body(&args, path);
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
            None if args.watch_only => watch_only(args).await,
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
