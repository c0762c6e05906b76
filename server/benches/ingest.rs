//! The server's own work per `Ingest` message, without HTTP/2: decode the request's
//! protobuf bytes ([`WireRequest::decode_into`]), judge every sample in the engine and
//! write the framed `IngestResponse` ([`WireSink`]). This is what the gRPC suite's
//! (a) and (b) runs spend on the server core besides hyper, h2 and the kernel, so it
//! bounds the samples/s one core can answer, and it is steady enough on a shared
//! machine to compare changes (or to count instructions with
//! `valgrind --tool=callgrind`).
//!
//! The messages are those the suite posts with h2load (`tidewatch-bench
//! --write-h2load-body`): 10,000 devices `dev-N`, two metrics `cpu` and `rps`, 100
//! messages of B samples cycled.
//!
//! Run: `cargo bench -p tidewatch-server --bench ingest`
//!
//! On a machine whose cores other processes use, criterion's wall-clock times drift;
//! `INGEST_ROUNDS=N` instead judges every message of the 100-sample set N times (after
//! filling the windows) and exits, for `perf stat -e cycles:u,instructions:u`, whose
//! counts are the process's own: `INGEST_ROUNDS=200 perf stat -e
//! cycles:u,instructions:u target/release/deps/ingest-<hash>` (divide by N × 10,000
//! samples).

use std::{collections::BTreeMap, hint::black_box, time::Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group};
use prost::Message;
use tidewatch_proto::v1::{IngestRequest, Sample};
use tidewatch_server::{
    engine::{Engine, EngineConfig},
    grpc::fast::{WireRequest, WireSink},
};

const DEVICES: usize = 10_000;
const MESSAGES: usize = 100;

/// The suite's messages of `batch` samples each, encoded.
fn messages(batch: usize) -> Vec<Bytes> {
    let mut rng = fastrand::Rng::with_seed(0x7469_6465);
    let mut device = 0;
    (0..MESSAGES)
        .map(|_| {
            let samples = (0..batch)
                .map(|_| {
                    let id = format!("dev-{device}");
                    device = (device + 1) % DEVICES;
                    let metrics = [("cpu", 50.0), ("rps", 100.0)]
                        .into_iter()
                        .map(|(name, base)| (name.to_owned(), base + rng.f64() * base * 0.2))
                        .collect::<BTreeMap<_, _>>();
                    Sample {
                        device_id: id,
                        metrics,
                        ..Sample::default()
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

/// Decodes, judges and encodes every message once per call; returns the response bytes.
struct Judge {
    messages: Vec<Bytes>,
    engine: Engine,
    request: WireRequest,
    sink: WireSink,
}

impl Judge {
    /// The suite's messages of `batch` samples, against an engine whose windows are full.
    fn new(batch: usize) -> Self {
        let mut judge = Self {
            messages: messages(batch),
            engine: Engine::new(EngineConfig::default()),
            request: WireRequest::default(),
            sink: WireSink::new(),
        };
        for _ in 0..50 * DEVICES.div_ceil(MESSAGES * batch) {
            judge.all();
        }
        judge
    }

    fn all(&mut self) -> usize {
        let detector = self.engine.default_detector();
        for message in &self.messages {
            self.request
                .decode_into(message.clone())
                .expect("a valid request");
            self.sink.begin_message();
            self.engine.ingest_batch_at(
                self.request.samples(),
                &detector,
                &mut self.sink,
                Instant::now(),
            );
            self.sink.finish_message().expect("a small response");
            self.request.reset();
        }
        self.sink.take().len()
    }
}

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest");
    for batch in [1, 100] {
        group.throughput(Throughput::Elements((MESSAGES * batch) as u64));
        let mut judge = Judge::new(batch);
        group.bench_function(format!("decode_judge_encode_{batch}_per_message"), |b| {
            b.iter(|| black_box(judge.all()))
        });
    }
    group.finish();
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, ingest);
}
fn main() {
    if let Some(rounds) = std::env::var("INGEST_ROUNDS")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
    {
        let mut judge = Judge::new(100);
        let bytes: usize = (0..rounds).map(|_| judge.all()).sum();
        println!(
            "{} samples judged, {bytes} response bytes",
            rounds * MESSAGES * 100
        );
        return;
    }
    group::benches();
    Criterion::default().configure_from_args().final_summary();
}
