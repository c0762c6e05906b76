//! Snapshot costs against a real `redis-server` (spawned on a free port):
//!
//! 1. the time to flush 1,000,000 dirty devices with 2 metrics each (full windows of
//!    50 values, 34-byte ids as the load generator writes them), first into an empty
//!    Redis, then overwriting;
//! 2. gRPC ingest throughput of the real server with snapshots off and on, in the
//!    same run, alternating, so the machine's noise hits both alike.
//!
//! Beside each flush, the CPU time of `redis-server` and of this process (the flusher)
//! during it, and `redis-benchmark` against the same `redis-server` with the same value
//! size, TTL and pipeline depth (when it is installed): Redis' own ceiling in this run.
//!
//! With `CLUSTER=N`, the flush also runs N times against a local Redis Cluster (three
//! masters, three replicas, `REDIS_CLUSTER_NODES`), alternating with the single Redis
//! (N rounds each), with the CPU of every cluster node and the Redis memory per
//! device.
//!
//! Run: `cargo bench -p tidewatch-server --bench snapshot` (`DEVICES=100000` for a
//! quicker flush run, `DEVICES=0` for the throughput part only, `ROUNDS=9` for more
//! throughput rounds than the default 3, `ROUNDS=0` for the flush part only,
//! `MESSAGES=10000` for runs four times as long as the default 2,500 messages per
//! stream).

#[path = "../tests/it/common/redis_server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod redis_server;

#[path = "common/workload.rs"]
mod workload;

#[path = "../tests/it/common/redis_cluster.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod redis_cluster;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use redis_cluster::RedisCluster;
use redis_server::RedisServer;
use tidewatch_loadgen::traffic::{IdStyle, MetricRange, Traffic};
use tidewatch_proto::v1::{IngestRequest, telemetry_service_client::TelemetryServiceClient};
use tidewatch_server::{
    Server,
    config::Config,
    engine::{DeviceState, Engine, EngineConfig, MetricState, Window},
    snapshot::{SnapshotConfig, Snapshots},
    telemetry::Counters,
};
use tokio_stream::StreamExt;
use workload::workload;

/// The ids of the load generator's realistic traffic (34 bytes up to a million
/// devices: `fleet-eu-west/gw-000123/dev-012345`).
const FLEET: Traffic = Traffic {
    devices: 0,
    batch: 1,
    rounds: 0,
    metrics: MetricRange { min: 2, max: 2 },
    ids: IdStyle::Fleet,
    anomaly_rate: 0.0,
    timestamps: true,
    detector: None,
    seed: 0,
};

/// Builds `devices` dirty devices with two full windows each, ids as [`FLEET`]'s.
fn populate(engine: &Engine, devices: usize) {
    for i in 0..devices {
        let mut device = DeviceState::new(&FLEET.device_id(i));
        device.last_seq = 1000;
        for (m, name) in ["cpu", "rps"].into_iter().enumerate() {
            let mut metric = MetricState::new(name);
            metric.window = Window::from_values((0..50).map(|j| (i + j * 7 + m) as f64 * 0.5), 50);
            metric.last_value = 1.0;
            device.metrics.push(metric);
        }
        device.dirty = true;
        engine.insert_if_absent(device);
    }
}

/// Where a flush benchmark writes.
enum Target<'a> {
    /// One `redis-server`.
    Single(&'a RedisServer),
    /// A local Redis Cluster.
    Cluster(&'a RedisCluster),
}

impl Target<'_> {
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Single(redis) => redis.pid().into_iter().collect(),
            Self::Cluster(cluster) => cluster.pids(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Single(_) => "single redis",
            Self::Cluster(_) => "redis cluster (3 masters + 3 replicas)",
        }
    }

    /// `used_memory` summed over the masters (a single Redis is its own master).
    fn used_memory(&self) -> u64 {
        let ports = match self {
            Self::Single(redis) => vec![redis.port],
            Self::Cluster(cluster) => cluster.master_ports(),
        };
        ports
            .into_iter()
            .map(|port| {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "INFO", "memory"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                out.lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// Flushes `devices` dirty devices into `target`, into an empty store then
/// overwriting; prints time, CPU and Redis memory per device.
async fn flush_into(target: &Target<'_>, devices: usize) {
    let engine = Arc::new(Engine::new(EngineConfig {
        max_devices: devices.max(1),
        ..EngineConfig::default()
    }));
    populate(&engine, devices);
    let mut config = Config::defaults();
    match target {
        Target::Single(redis) => config.redis_url = Some(redis.url().into()),
        Target::Cluster(cluster) => config.redis_cluster_nodes = Some(cluster.seeds()),
    }
    config.redis_command_timeout = Duration::from_secs(30);
    let snapshots = Arc::new(
        Snapshots::new(
            SnapshotConfig::from_config(&config).expect("redis"),
            Arc::clone(&engine),
            Arc::new(Counters::default()),
        )
        .expect("snapshots"),
    );
    snapshots.check().await.expect("redis answers");
    let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let memory_before = target.used_memory();
    for round in ["into an empty store", "overwriting"] {
        if round == "overwriting" {
            engine.mark_all_dirty();
        }
        let pids = target.pids();
        let (redis_cpu, own_cpu) = (cpu(&pids), own_cpu_seconds());
        let started = Instant::now();
        let report = snapshots.flush().await;
        let elapsed = started.elapsed();
        assert_eq!(report.failed, 0, "flush failed");
        assert_eq!(report.written, devices as u64);
        println!(
            "{}: flush {round}: {} devices in {:.3} s ({:.0} devices/s); cpu: redis {:.2} s (every node), flusher process {:.2} s",
            target.name(),
            report.written,
            elapsed.as_secs_f64(),
            report.written as f64 / elapsed.as_secs_f64(),
            cpu(&pids) - redis_cpu,
            own_cpu_seconds() - own_cpu,
        );
    }
    println!(
        "{}: used_memory of the masters: {:.0} bytes per device (value, version, owner, with their TTLs)",
        target.name(),
        (target.used_memory().saturating_sub(memory_before)) as f64 / devices.max(1) as f64
    );
    drop(snapshots);
}

async fn flush_benchmark(redis: &RedisServer, devices: usize) {
    let engine = Arc::new(Engine::new(EngineConfig {
        max_devices: devices.max(1),
        ..EngineConfig::default()
    }));
    let started = Instant::now();
    populate(&engine, devices);
    println!(
        "populated {devices} devices x 2 metrics in {:.2?}",
        started.elapsed()
    );
    let mut config = Config::defaults();
    config.redis_url = Some(redis.url().into());
    // A throughput figure, not a timeout test: on a loaded machine a batch of fenced
    // writes can take longer than the default 500 ms.
    config.redis_command_timeout = Duration::from_secs(30);
    let snapshot_config = SnapshotConfig::from_config(&config).expect("redis url");
    println!(
        "flush settings: SNAPSHOT_BATCH={} REDIS_POOL_SIZE={}",
        snapshot_config.batch, snapshot_config.pool_size
    );
    let snapshots = Arc::new(
        Snapshots::new(
            snapshot_config,
            Arc::clone(&engine),
            Arc::new(Counters::default()),
        )
        .expect("snapshots"),
    );
    snapshots.check().await.expect("redis answers");
    let redis_pid = redis.pid().expect("redis runs");
    for round in ["into an empty redis", "overwriting"] {
        if round == "overwriting" {
            engine.mark_all_dirty();
        }
        let (redis_cpu, own_cpu) = (cpu_split(redis_pid), own_cpu_seconds());
        let started = Instant::now();
        let report = snapshots.flush().await;
        let elapsed = started.elapsed();
        assert_eq!(report.failed, 0, "flush failed");
        assert_eq!(report.written, devices as u64);
        let redis_after = cpu_split(redis_pid);
        println!(
            "flush {round}: {} devices in {:.3} s ({:.0} devices/s); cpu: redis-server {:.2} s (user {:.2}, sys {:.2}), flusher process {:.2} s",
            report.written,
            elapsed.as_secs_f64(),
            report.written as f64 / elapsed.as_secs_f64(),
            redis_after.0 + redis_after.1 - redis_cpu.0 - redis_cpu.1,
            redis_after.0 - redis_cpu.0,
            redis_after.1 - redis_cpu.1,
            own_cpu_seconds() - own_cpu,
        );
    }
    let value = redis.raw(&FLEET.device_id(0)).await.expect("written");
    println!("snapshot value size: {} bytes per device", value.len());
    redis_benchmark(redis, devices, value.len()).await;
}

/// Redis' own pipelined client against the same `redis-server`: `SET key value EX 3600`
/// with the snapshot's value size, `SNAPSHOT_BATCH` commands per pipeline over
/// `REDIS_POOL_SIZE` connections. Keys are random: `-r 100000000` into an empty
/// Redis makes nearly every key new; `-r DEVICES` twice, the second run timed,
/// rewrites mostly existing keys (1 - 1/e² ≈ 86 % of them).
async fn redis_benchmark(redis: &RedisServer, devices: usize, value_size: usize) {
    let config = Config::defaults();
    let (batch, pool) = (config.snapshot_batch, config.redis_pool_size);
    let value = "x".repeat(value_size);
    let run = |range: usize| {
        let started = Instant::now();
        let redis_cpu = cpu_seconds(redis.pid().expect("redis runs"));
        let output = std::process::Command::new("redis-benchmark")
            .args(["-p", &redis.port.to_string(), "-q"])
            .args(["-n", &devices.to_string(), "-r", &range.to_string()])
            .args(["-P", &batch.to_string()])
            .args(["-c", &pool.to_string()])
            .args([
                "SET",
                // An id of 34 bytes, as the flush's: 22 + 12 digits.
                "tidewatch:v1:device:fleet-eu-west/gw0/dev-__rand_int__",
                &value,
                "EX",
                "3600",
            ])
            .output();
        match output {
            Ok(output) if output.status.success() => {
                let elapsed = started.elapsed().as_secs_f64();
                Some((
                    elapsed,
                    cpu_seconds(redis.pid().expect("redis runs")) - redis_cpu,
                ))
            }
            Ok(output) => {
                println!(
                    "redis-benchmark failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                None
            }
            Err(e) => {
                println!("redis-benchmark not run ({e}): no same-run redis baseline");
                None
            }
        }
    };
    flushall(redis).await;
    let p = redis.port;
    println!(
        "baseline: redis-benchmark -p {p} -q -n {devices} -r R -P {batch} -c {pool} SET tidewatch:v1:device:fleet-eu-west/gw0/dev-__rand_int__ <{value_size} bytes> EX 3600"
    );
    if let Some((elapsed, cpu)) = run(100_000_000) {
        println!(
            "  R=100000000 into an empty redis (nearly all keys new): {elapsed:.3} s ({:.0} SET/s); cpu: redis-server {cpu:.2} s",
            devices as f64 / elapsed
        );
    } else {
        return;
    }
    flushall(redis).await;
    run(devices);
    if let Some((elapsed, cpu)) = run(devices) {
        println!(
            "  R={devices}, second run (mostly overwriting): {elapsed:.3} s ({:.0} SET/s); cpu: redis-server {cpu:.2} s",
            devices as f64 / elapsed
        );
    }
    flushall(redis).await;
}

/// Empties Redis in the foreground (a background free would run during the next
/// measurement and count as redis-server CPU there).
async fn flushall(redis: &RedisServer) {
    let mut conn = redis.connection().await;
    conn.set_response_timeout(Duration::from_secs(120));
    let () = redis::cmd("FLUSHALL")
        .arg("SYNC")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
}

/// Samples per second through `streams` concurrent Ingest streams of a fresh server.
async fn throughput(
    redis_url: Option<String>,
    interval: Duration,
    requests: &[Vec<IngestRequest>],
) -> Run {
    let mut config = Config::for_tests();
    config.redis_url = redis_url.map(Into::into);
    config.snapshot_interval = interval;
    let server = Server::bind(config).await.expect("bind");
    let url = format!("http://{}", server.grpc_addr());
    let state = server.state();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    let run = |requests: Vec<Vec<IngestRequest>>| {
        let url = url.clone();
        async move {
            let mut tasks = Vec::new();
            for requests in requests {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let mut client = TelemetryServiceClient::connect(url).await.expect("connect");
                    let mut responses = client
                        .ingest(tokio_stream::iter(requests))
                        .await
                        .expect("ingest")
                        .into_inner();
                    let mut verdicts = 0usize;
                    while let Some(r) = responses.next().await {
                        verdicts += r.expect("response").verdicts.len();
                    }
                    verdicts
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.expect("stream");
            }
            total
        }
    };
    // Warm-up: every device's first sample (a restore miss with snapshots on).
    let warmup: Vec<Vec<IngestRequest>> = requests
        .iter()
        .map(|r| r[..r.len() / 10].to_vec())
        .collect();
    run(warmup).await;
    let cpu = own_cpu_seconds();
    let started = Instant::now();
    let samples = run(requests.to_vec()).await;
    let rate = samples as f64 / started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu;
    let writes = state
        .snapshots
        .as_ref()
        .map(|_| {
            state
                .metrics
                .counters()
                .snapshot_writes
                .load(Ordering::Relaxed)
        })
        .unwrap_or(0);
    let _ = tx.send(());
    task.await.expect("server").expect("serve");
    Run {
        rate,
        writes,
        cpu_per_sample: cpu / samples as f64,
    }
}

/// What one throughput run measured.
struct Run {
    /// Samples per second.
    rate: f64,
    /// Device snapshots written during the run (0 without snapshots).
    writes: u64,
    /// CPU time of this process (server, flusher and load generator) per sample.
    cpu_per_sample: f64,
}

#[tokio::main]
async fn main() {
    let devices: usize = std::env::var("DEVICES")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(1_000_000);
    let redis = RedisServer::start();
    if devices > 0 {
        println!(
            "== flush of {devices} dirty devices (redis-server on port {})",
            redis.port
        );
        flush_benchmark(&redis, devices).await;
    }
    flushall(&redis).await;
    let cluster_rounds: usize = std::env::var("CLUSTER")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    if devices > 0 && cluster_rounds > 0 {
        println!(
            "\n== flush of {devices} dirty devices: single redis vs redis cluster, alternating"
        );
        let cluster = RedisCluster::start();
        for _ in 0..cluster_rounds {
            flush_into(&Target::Single(&redis), devices).await;
            flushall(&redis).await;
            flush_into(&Target::Cluster(&cluster), devices).await;
            cluster.flushall();
        }
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    if rounds == 0 {
        return;
    }

    let streams = 4;
    let messages: usize = std::env::var("MESSAGES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(2_500);
    let batch = 100;
    let per_stream_devices = 5_000;
    println!(
        "\n== ingest throughput: {streams} streams x {messages} messages x {batch} samples (2 metrics), {} devices, SNAPSHOT_INTERVAL=1s",
        streams * per_stream_devices
    );
    let requests: Vec<Vec<IngestRequest>> = (0..streams)
        .map(|s| workload(s, messages, batch, per_stream_devices))
        .collect();
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut no_flush = Vec::new();
    let second = Duration::from_secs(1);
    let redis_cpu = || cpu_seconds(redis.pid().expect("redis runs"));
    for round in 0..rounds {
        let run = throughput(None, second, &requests).await;
        println!(
            "round {round}: snapshots off:                  {:>10.0} samples/s ({:.2} us cpu/sample)",
            run.rate,
            run.cpu_per_sample * 1e6
        );
        off.push(run.rate);
        let cpu = redis_cpu();
        let run = throughput(Some(redis.url()), second, &requests).await;
        println!(
            "round {round}: snapshots on:                   {:>10.0} samples/s ({:.2} us cpu/sample; {} device snapshots written, redis-server cpu {:.2} s)",
            run.rate,
            run.cpu_per_sample * 1e6,
            run.writes,
            redis_cpu() - cpu
        );
        on.push(run.rate);
        let run = throughput(Some(redis.url()), Duration::from_secs(3600), &requests).await;
        println!(
            "round {round}: snapshots on, no flush in run: {:>10.0} samples/s ({:.2} us cpu/sample)",
            run.rate,
            run.cpu_per_sample * 1e6
        );
        no_flush.push(run.rate);
        flushall(&redis).await;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on, no_flush) = (median(&mut off), median(&mut on), median(&mut no_flush));
    println!(
        "median of {rounds} rounds: off {off:.0} samples/s, on {on:.0} samples/s (ratio {:.3}), on without flushes {no_flush:.0} samples/s (ratio {:.3})",
        on / off,
        no_flush / off
    );
}

/// CPU time (user + system) a process has used, in seconds, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// User and system CPU time of a process, in seconds, from /proc.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 11 and 12 after the command name.
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// CPU time (user + system) this process has used, in seconds.
fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id())
}
