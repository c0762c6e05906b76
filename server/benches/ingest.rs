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

use std::{collections::BTreeMap, hint::black_box, time::Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use tidewatch_proto::v1::{IngestRequest, Sample};
use tidewatch_server::{
    engine::{Engine, EngineConfig},
    grpc::wire::{WireRequest, WireSink},
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

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest");
    for batch in [1, 100] {
        let messages = messages(batch);
        group.throughput(Throughput::Elements((MESSAGES * batch) as u64));
        let engine = Engine::new(EngineConfig::default());
        let detector = engine.default_detector();
        let mut request = WireRequest::default();
        let mut sink = WireSink::new();
        let mut judge_all = || {
            for message in &messages {
                request
                    .decode_into(message.clone())
                    .expect("a valid request");
                sink.begin_message();
                engine.ingest_batch_at(request.samples(), &detector, &mut sink, Instant::now());
                sink.finish_message().expect("a small response");
                request.reset();
            }
            black_box(sink.take().len())
        };
        // Every device's windows full, as in a long-running server.
        for _ in 0..50 * DEVICES.div_ceil(MESSAGES * batch) {
            judge_all();
        }
        group.bench_function(format!("decode_judge_encode_{batch}_per_message"), |b| {
            b.iter(&mut judge_all)
        });
    }
    group.finish();
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, ingest);
}
criterion_main!(group::benches);
