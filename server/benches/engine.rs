//! Engine throughput: value updates per second on one thread and on two threads with
//! distinct devices, for the raw window and for the full sample path (validation,
//! shard lock, device lookup, verdict).
//!
//! The `detector` group gives the cost per value of each detector (zscore, robust).
//!
//! Run: `cargo bench -p tidewatch-server --bench engine`

use std::{hint::black_box, sync::Arc, thread};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_proto::v1::Sample;
use tidewatch_server::engine::{DetectorKind, Engine, EngineConfig, Window};

const BATCH: usize = 10_000;

fn values() -> Vec<f64> {
    // Deterministic noise around 100 with the occasional spike.
    (0..BATCH)
        .map(|i| 100.0 + ((i * 7919) % 101) as f64 * 0.1 + if i % 997 == 0 { 50.0 } else { 0.0 })
        .collect()
}

fn samples(devices: usize, offset: usize) -> Vec<Sample> {
    values()
        .into_iter()
        .enumerate()
        .map(|(i, v)| Sample {
            device_id: format!("device-{}", offset + i % devices),
            metrics: [("rps".to_string(), v)].into_iter().collect(),
            ..Sample::default()
        })
        .collect()
}

fn window(c: &mut Criterion) {
    let mut group = c.benchmark_group("window");
    group.throughput(Throughput::Elements(BATCH as u64));
    let values = values();
    group.bench_function("push_and_judge_w50", |b| {
        let mut w = Window::new();
        b.iter(|| {
            let mut anomalies = 0u32;
            for &x in &values {
                let mean = w.mean();
                let sd = w.stddev();
                anomalies += u32::from(sd > 0.0 && ((x - mean) / sd).abs() > 2.0);
                w.push(x, 50);
            }
            black_box(anomalies)
        });
    });
    group.finish();
}

fn engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(BATCH as u64));
    for devices in [1, 1000] {
        let engine = Engine::new(EngineConfig::default());
        let detector = engine.default_detector();
        let batch = samples(devices, 0);
        let mut out = Vec::with_capacity(BATCH);
        group.bench_function(format!("ingest_1thread_{devices}dev"), |b| {
            b.iter(|| {
                out.clear();
                black_box(engine.ingest_batch(&batch, &detector, &mut out))
            });
        });
    }
    // Two threads, distinct devices: each iteration judges BATCH values on each thread.
    group.throughput(Throughput::Elements(2 * BATCH as u64));
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let batches = [Arc::new(samples(1000, 0)), Arc::new(samples(1000, 1000))];
    group.bench_function("ingest_2threads_1000dev_each", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            thread::scope(|scope| {
                for batch in &batches {
                    let engine = Arc::clone(&engine);
                    let batch = Arc::clone(batch);
                    let detector = engine.default_detector();
                    scope.spawn(move || {
                        let mut out = Vec::with_capacity(BATCH);
                        for _ in 0..iters {
                            out.clear();
                            black_box(engine.ingest_batch(&batch, &detector, &mut out));
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    group.finish();
}

/// Cost per value of each detector on the full sample path (one device, one metric;
/// the throughput criterion prints is values per second, its time per iteration
/// divided by BATCH is the cost per value).
fn detectors(c: &mut Criterion) {
    let mut group = c.benchmark_group("detector");
    group.throughput(Throughput::Elements(BATCH as u64));
    let base = 1_700_000_000i64;
    let batch: Vec<Sample> = values()
        .into_iter()
        .enumerate()
        .map(|(i, v)| Sample {
            device_id: "device-0".into(),
            time: Some(tidewatch_proto::pbjson_types::Timestamp {
                seconds: base + 60 * i as i64,
                nanos: 0,
            }),
            metrics: [("rps".to_string(), v)].into_iter().collect(),
            ..Sample::default()
        })
        .collect();
    for kind in [DetectorKind::ZScore, DetectorKind::Robust] {
        let config = EngineConfig::default();
        let detector = config.detector_defaults().spec(kind);
        let engine = Engine::new(config);
        let mut out = Vec::with_capacity(BATCH);
        group.bench_function(format!("{}_per_value", kind.as_str()), |b| {
            b.iter(|| {
                out.clear();
                black_box(engine.ingest_batch(&batch, &detector, &mut out))
            });
        });
    }
    group.finish();
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, window, engine, detectors);
}
criterion_main!(group::benches);
