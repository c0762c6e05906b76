//! The cost of one history per device across replicas (`docs/capacity.md`): gRPC
//! ingest throughput of two real servers on one real `redis-server` (spawned on a
//! free port), every stream moving to the other replica every `1/MOVES` of its
//! messages (its devices follow by hand-off), against the same load on one replica,
//! in the same run, alternating, so the machine's noise hits both alike. Beside each
//! run, the Redis commands it cost (`INFO commandstats`, before and after) per
//! sample, and the samples answered `moved` (not counted as served).
//!
//! Both servers run in this process (as the snapshot benchmark's do), each with its
//! own replica id, store and hand-off listener, exactly as two pods would.
//!
//! Run: `cargo bench -p tidewatch-server --bench replicas` (`ROUNDS=3`,
//! `MESSAGES=2500` per stream, `MOVES=5` moves per run).

#[path = "../tests/it/common/redis_server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod redis_server;

#[path = "common/workload.rs"]
mod workload;

use std::time::{Duration, Instant};

use redis_server::RedisServer;
use tidewatch_proto::v1::{IngestRequest, telemetry_service_client::TelemetryServiceClient};
use tidewatch_server::{Server, config::Config};
use tokio_stream::StreamExt;
use workload::workload;

const STREAMS: usize = 4;
const BATCH: usize = 100;
const DEVICES_PER_STREAM: usize = 2_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A server in this process on `redis`; its gRPC URL and its stop signal.
async fn start(redis: &RedisServer) -> (String, tokio::sync::oneshot::Sender<()>) {
    let mut config = Config::for_tests();
    config.redis_url = Some(redis.url().into());
    config.snapshot_interval = Duration::from_secs(1);
    let server = Server::bind(config).await.expect("bind");
    let url = format!("http://{}", server.grpc_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    (url, tx)
}

/// One run: every stream sends its messages in `moves` parts, part `k` of stream `i`
/// to replica `(i + k) % urls.len()`. Returns samples served per second and the
/// samples answered `moved`.
async fn run(urls: &[String], requests: &[Vec<IngestRequest>], moves: usize) -> (f64, u64) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, requests) in requests.iter().enumerate() {
        let urls = urls.to_vec();
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let (mut served, mut moved) = (0u64, 0u64);
            let part = requests.len().div_ceil(moves.max(1));
            for (k, chunk) in requests.chunks(part).enumerate() {
                let url = urls[(i + k) % urls.len()].clone();
                let mut client = TelemetryServiceClient::connect(url).await.expect("connect");
                let mut responses = client
                    .ingest(tokio_stream::iter(chunk.to_vec()))
                    .await
                    .expect("ingest")
                    .into_inner();
                while let Some(r) = responses.next().await {
                    for v in r.expect("response").verdicts {
                        if v.error.starts_with("moved:") {
                            moved += 1;
                        } else {
                            assert!(v.error.is_empty(), "{}", v.error);
                            served += 1;
                        }
                    }
                }
            }
            (served, moved)
        }));
    }
    let (mut served, mut moved) = (0, 0);
    for task in tasks {
        let (s, m) = task.await.expect("stream");
        served += s;
        moved += m;
    }
    (served as f64 / started.elapsed().as_secs_f64(), moved)
}

#[tokio::main]
async fn main() {
    let rounds = env("ROUNDS", 3);
    let messages = env("MESSAGES", 2_500);
    let moves = env("MOVES", 5);
    let requests: Vec<Vec<IngestRequest>> = (0..STREAMS)
        .map(|s| workload(s, messages, BATCH, DEVICES_PER_STREAM))
        .collect();
    let samples = (STREAMS * messages * BATCH) as f64;
    println!(
        "== {STREAMS} streams x {messages} messages x {BATCH} samples (2 metrics), {} devices, SNAPSHOT_INTERVAL=1s; two replicas: every stream moves {} times",
        STREAMS * DEVICES_PER_STREAM,
        moves.saturating_sub(1)
    );
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for replicas in [1, 2] {
            let redis = RedisServer::start();
            let mut servers = Vec::new();
            for _ in 0..replicas {
                servers.push(start(&redis).await);
            }
            let urls: Vec<String> = servers.iter().map(|(u, _)| u.clone()).collect();
            // Warm-up on the first replica: every device's first sample (a restore
            // miss) is outside the timed run.
            let warmup: Vec<Vec<IngestRequest>> = requests
                .iter()
                .map(|r| r[..DEVICES_PER_STREAM / BATCH].to_vec())
                .collect();
            run(&urls[..1], &warmup, 1).await;
            let before = redis.commands().await;
            let (rate, moved) = run(&urls, &requests, if replicas == 1 { 1 } else { moves }).await;
            let after = redis.commands().await;
            let used: Vec<String> = after
                .iter()
                .filter(|(name, _)| name.as_str() != "info")
                .map(|(name, n)| (name, n - before.get(name).copied().unwrap_or(0)))
                .filter(|&(_, n)| n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let total: u64 = after
                .iter()
                .filter(|(name, _)| name.as_str() != "info")
                .map(|(name, n)| n - before.get(name).copied().unwrap_or(0))
                .sum();
            println!(
                "round {round}: {replicas} replica(s): {rate:>10.0} samples/s, {moved} answered moved; redis commands {total} ({:.4} per sample: {})",
                total as f64 / samples,
                used.join(", ")
            );
            if replicas == 1 {
                one.push(rate);
            } else {
                two.push(rate);
            }
            for (_, stop) in servers {
                let _ = stop.send(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, two) = (median(&mut one), median(&mut two));
    println!(
        "median of {rounds} rounds: one replica {one:.0} samples/s, two replicas with moves {two:.0} samples/s (ratio {:.3})",
        two / one
    );
}
