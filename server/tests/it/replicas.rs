//! Several real servers (the binary) on one real `redis-server`: one history per
//! device whatever replica its samples reach. Each test feeds one uninterrupted
//! server the same samples and compares verdict by verdict: A→B→A, three replicas in
//! turn, two replicas fed the same samples at once, a replica killed with `kill -9`
//! between moves, Redis restarting empty between moves, and a write that loses to
//! another owner.

use std::time::{Duration, Instant};

use crate::common::{
    ServerProcess, TestServer, connect, redis_server::RedisServer, sample, verdicts_of,
};
use tidewatch_proto::v1::{
    AnalyzeRequest, IngestRequest, Sample, Verdict,
    telemetry_service_client::TelemetryServiceClient,
};
use tonic::transport::Channel;

const DEVICE: &str = "pump-7";

/// `n` samples of one device, seq 1..=n: noise, spikes and a level shift, so that
/// verdicts depend on the whole history.
fn samples(n: u64) -> Vec<Sample> {
    (1..=n)
        .map(|seq| {
            let noise = ((seq * 7919) % 101) as f64 * 0.37;
            let spike = if seq % 17 == 0 { 400.0 } else { 0.0 };
            let shift = if seq > 70 { 1e4 } else { 0.0 };
            sample(DEVICE, seq, &[("rps", 420.0 + noise + spike + shift)])
        })
        .collect()
}

/// One sample on its own Ingest stream; its verdict.
async fn send(client: &mut TelemetryServiceClient<Channel>, s: &Sample) -> Verdict {
    let request = IngestRequest {
        samples: vec![s.clone()],
        ..IngestRequest::default()
    };
    let mut verdicts = verdicts_of(client, vec![request]).await;
    assert_eq!(verdicts.len(), 1);
    verdicts.remove(0)
}

/// A task that sends `samples` in order to the server at `url`, each until it is
/// not answered `moved`; their verdicts.
fn writer(url: String, samples: Vec<Sample>) -> tokio::task::JoinHandle<Vec<Verdict>> {
    tokio::spawn(async move {
        let mut client = connect(&url).await;
        let mut verdicts = Vec::new();
        for s in &samples {
            verdicts.push(send_retrying(&mut client, s).await);
        }
        verdicts
    })
}

/// Sends a sample until its verdict is not `moved` (what the SDKs do); fails after
/// 20 s.
async fn send_retrying(client: &mut TelemetryServiceClient<Channel>, s: &Sample) -> Verdict {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let verdict = send(client, s).await;
        if !verdict.error.starts_with("moved:") {
            return verdict;
        }
        assert!(Instant::now() < deadline, "seq {} stays moved", s.seq);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The verdicts of one uninterrupted server without Redis.
async fn reference(all: &[Sample]) -> Vec<Verdict> {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut verdicts = Vec::new();
    for s in all {
        verdicts.push(send(&mut client, s).await);
    }
    server.stop().await.expect("stop");
    verdicts
}

fn replica(redis: &RedisServer) -> ServerProcess {
    ServerProcess::spawn(
        &[],
        &[("REDIS_URL", &redis.url()), ("SNAPSHOT_INTERVAL", "100ms")],
    )
}

fn assert_same(got: &[Verdict], want: &[Verdict]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g, w, "seq {}", w.seq);
    }
    assert!(want.iter().any(|v| v.anomaly), "the data has anomalies");
}

/// Polls Redis until the device's snapshot holds `seq`.
async fn wait_for_flush(redis: &RedisServer, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis
        .snapshot(DEVICE)
        .await
        .is_none_or(|d| d.last_seq < seq)
    {
        assert!(Instant::now() < deadline, "no flush with seq {seq}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b_a_keeps_one_history() {
    let redis = RedisServer::start();
    let all = samples(90);
    let want = reference(&all).await;
    let (a, b) = (replica(&redis), replica(&redis));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    let mut got = Vec::new();
    // No pause between moves: the hand-off, not the flush interval, carries state.
    for (i, s) in all.iter().enumerate() {
        let client = if (i / 30) % 2 == 0 { &mut ca } else { &mut cb };
        got.push(send_retrying(client, s).await);
    }
    assert_same(&got, &want);
    // Analyze on the replica that no longer holds it answers the durable state.
    let stats = ca
        .analyze(AnalyzeRequest {
            device_id: DEVICE.into(),
        })
        .await
        .expect("analyze")
        .into_inner();
    assert_eq!(stats.last_seq, 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_in_turn_keep_one_history() {
    let redis = RedisServer::start();
    let all = samples(90);
    let want = reference(&all).await;
    let servers = [replica(&redis), replica(&redis), replica(&redis)];
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(connect(&server.grpc_url()).await);
    }
    let mut got = Vec::new();
    for (i, s) in all.iter().enumerate() {
        got.push(send_retrying(&mut clients[(i / 7) % 3], s).await);
    }
    assert_same(&got, &want);
}

/// Two writers send every sample, in order, one to A and one to B, at the same
/// time: each seq is applied exactly once (on one replica; the other answers it as
/// a duplicate), in order, so the applied verdicts are one server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_writers_apply_each_sample_once() {
    let redis = RedisServer::start();
    let all = samples(80);
    let want = reference(&all).await;
    let (a, b) = (replica(&redis), replica(&redis));
    let mut writers = Vec::new();
    for url in [a.grpc_url(), b.grpc_url()] {
        writers.push(writer(url, all.clone()));
    }
    let mut applied: Vec<Option<Verdict>> = vec![None; all.len()];
    for writer in writers {
        for verdict in writer.await.expect("writer") {
            assert!(verdict.error.is_empty(), "{}", verdict.error);
            if verdict.duplicate {
                continue;
            }
            let slot = &mut applied[verdict.seq as usize - 1];
            assert!(slot.is_none(), "seq {} applied twice", verdict.seq);
            *slot = Some(verdict);
        }
    }
    let applied: Vec<Verdict> = applied
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.unwrap_or_else(|| panic!("seq {} never applied", i + 1)))
        .collect();
    assert_same(&applied, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_between_moves_costs_nothing_flushed() {
    let redis = RedisServer::start();
    let all = samples(90);
    let want = reference(&all).await;
    let a = replica(&redis);
    let mut got = Vec::new();
    let mut ca = connect(&a.grpc_url()).await;
    for s in &all[..30] {
        got.push(send_retrying(&mut ca, s).await);
    }
    // Outside the crash window: everything A answered is flushed, then A dies.
    wait_for_flush(&redis, 30).await;
    a.kill9();
    let b = replica(&redis);
    let mut cb = connect(&b.grpc_url()).await;
    // B waits for A's lease to run out (samples meanwhile are `moved`).
    for s in &all[30..60] {
        got.push(send_retrying(&mut cb, s).await);
    }
    let a2 = replica(&redis);
    let mut ca2 = connect(&a2.grpc_url()).await;
    for s in &all[60..] {
        got.push(send_retrying(&mut ca2, s).await);
    }
    assert_same(&got, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_empty_between_moves_loses_nothing() {
    let mut redis = RedisServer::start();
    let all = samples(90);
    let want = reference(&all).await;
    let (a, b) = (replica(&redis), replica(&redis));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    let mut got = Vec::new();
    for s in &all[..30] {
        got.push(send_retrying(&mut ca, s).await);
    }
    wait_for_flush(&redis, 30).await;
    redis.restart();
    // A finds its lease gone at its next flush and writes every device again.
    wait_for_flush(&redis, 30).await;
    for s in &all[30..60] {
        got.push(send_retrying(&mut cb, s).await);
    }
    for s in &all[60..] {
        got.push(send_retrying(&mut ca, s).await);
    }
    assert_same(&got, &want);
}

/// A write that finds another live owner loses: the replica drops its copy, and its
/// next sample of the device is answered `moved` until the owner lets go; then it
/// reloads the newer state instead of judging against its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_loses_drops_the_copy() {
    let redis = RedisServer::start();
    let all = samples(20);
    let a = replica(&redis);
    let mut ca = connect(&a.grpc_url()).await;
    for s in &all[..10] {
        send_retrying(&mut ca, s).await;
    }
    wait_for_flush(&redis, 10).await;
    // Another replica ("ghost", alive) took the device and wrote seq 15.
    let mut conn = redis.connection().await;
    let mut newer = redis.snapshot(DEVICE).await.expect("snapshot");
    newer.last_seq = 15;
    let mut value = Vec::new();
    tidewatch_server::snapshot::codec::encode_value(&newer, &mut value);
    let owner = format!("{{tidewatch:v1:device:{DEVICE}}}:owner");
    let version = format!("{{tidewatch:v1:device:{DEVICE}}}:version");
    let () = redis::pipe()
        .cmd("SET")
        .arg("tidewatch:v1:replica:ghost")
        .arg("1")
        .ignore()
        .cmd("SET")
        .arg(&owner)
        .arg("ghost")
        .ignore()
        .cmd("INCR")
        .arg(&version)
        .ignore()
        .cmd("SET")
        .arg(format!("tidewatch:v1:device:{DEVICE}"))
        .arg(value)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("ghost write");
    // A still holds seq 10 and judges seq 11 from memory (no round trip per
    // sample); its next flush loses and drops the copy.
    assert!(send(&mut ca, &all[10]).await.error.is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    let moved = loop {
        let verdict = send(&mut ca, &all[11]).await;
        if verdict.error.starts_with("moved:") {
            break verdict;
        }
        assert!(Instant::now() < deadline, "A never gave its copy up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(moved.metrics.is_empty());
    assert_eq!(redis.snapshot(DEVICE).await.expect("kept").last_seq, 15);
    // The ghost dies: A takes the device and continues from seq 15.
    let () = redis::cmd("DEL")
        .arg("tidewatch:v1:replica:ghost")
        .query_async(&mut conn)
        .await
        .unwrap();
    let verdict = send_retrying(&mut ca, &all[12]).await;
    assert!(verdict.duplicate, "seq 13 is below the newer history's 15");
    let verdict = send_retrying(&mut ca, &all[16]).await;
    assert!(!verdict.duplicate && verdict.error.is_empty());
}

/// Three writers send every sample, in order, each to its own replica, at the same
/// time, and one replica is killed with `kill -9` halfway: each seq is still applied
/// exactly once, in order, so the applied verdicts are one server's. (What A had
/// not flushed when it died is the documented crash window; every sample A answered
/// is flushed before the kill, so nothing falls into it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_simultaneous_writers_and_a_kill_apply_each_sample_once() {
    let redis = RedisServer::start();
    let all = samples(80);
    let want = reference(&all).await;
    let servers = [replica(&redis), replica(&redis), replica(&redis)];
    let urls: Vec<String> = servers.iter().map(ServerProcess::grpc_url).collect();
    let [a, b, c] = servers;
    let mut applied: Vec<Option<Verdict>> = vec![None; all.len()];
    let mut record = |verdicts: Vec<Verdict>| {
        for verdict in verdicts {
            assert!(verdict.error.is_empty(), "{}", verdict.error);
            if verdict.duplicate {
                continue;
            }
            let slot = &mut applied[verdict.seq as usize - 1];
            assert!(slot.is_none(), "seq {} applied twice", verdict.seq);
            *slot = Some(verdict);
        }
    };
    let race = |range: std::ops::Range<usize>, urls: Vec<String>| {
        let all = all.clone();
        async move {
            let mut writers = Vec::new();
            for url in urls {
                writers.push(writer(url, all[range.clone()].to_vec()));
            }
            let mut out = Vec::new();
            for writer in writers {
                out.push(writer.await.expect("writer"));
            }
            out
        }
    };
    for verdicts in race(0..40, urls.clone()).await {
        record(verdicts);
    }
    // Every sample is answered and flushed; then A dies, holding the device or not.
    wait_for_flush(&redis, 40).await;
    a.kill9();
    for verdicts in race(40..80, urls[1..].to_vec()).await {
        record(verdicts);
    }
    let applied: Vec<Verdict> = applied
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.unwrap_or_else(|| panic!("seq {} never applied", i + 1)))
        .collect();
    assert_same(&applied, &want);
    drop((b, c));
}

/// Every command Redis ran so far, `INFO` itself left out.
async fn redis_commands(redis: &RedisServer) -> u64 {
    let mut commands = redis.commands().await;
    commands.remove("info");
    commands.values().sum()
}

/// The steady path of a device that stays on one replica costs no Redis round trip
/// per sample: after the first sample took the device, a hundred more (no flush in
/// between) run no command at all; the flush then writes it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steady_path_costs_no_redis_round_trip() {
    let redis = RedisServer::start();
    let a = ServerProcess::spawn(
        &[],
        &[("REDIS_URL", &redis.url()), ("SNAPSHOT_INTERVAL", "1h")],
    );
    let mut ca = connect(&a.grpc_url()).await;
    let all = samples(101);
    send(&mut ca, &all[0]).await;
    let before = redis_commands(&redis).await;
    let scripts = redis.calls("evalsha").await;
    for s in &all[1..] {
        assert!(send(&mut ca, s).await.error.is_empty());
    }
    assert_eq!(redis_commands(&redis).await, before, "commands per sample");
    // SIGTERM: the final flush writes the device once (scripts: the lease renewal,
    // the write, the retirement).
    assert!(a.terminate().success());
    assert_eq!(redis.snapshot(DEVICE).await.expect("flushed").last_seq, 101);
    assert_eq!(redis.calls("evalsha").await - scripts, 3);
}

/// Taking a device costs its restore's commands and no `PING`: the read pool trusts a
/// connection until a command finds it dropped (an earlier pool sent a `PING` on every
/// checkout, one more round trip per restore). A Redis restart in between still fails
/// no restore: the stale connection is retired and the read sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_sends_no_ping_and_survives_a_redis_restart() {
    let mut redis = RedisServer::start();
    let a = ServerProcess::spawn(
        &[],
        &[("REDIS_URL", &redis.url()), ("SNAPSHOT_INTERVAL", "1h")],
    );
    let mut ca = connect(&a.grpc_url()).await;
    let pings = redis.calls("ping").await;
    let gets = redis.calls("get").await + redis.calls("mget").await;
    for i in 0..20 {
        let s = sample(&format!("fresh-{i}"), 1, &[("rps", 1.0)]);
        assert!(send(&mut ca, &s).await.error.is_empty());
    }
    assert_eq!(redis.calls("ping").await, pings, "PINGs for 20 restores");
    assert!(
        redis.calls("get").await + redis.calls("mget").await > gets,
        "the restores read Redis"
    );
    redis.restart();
    for i in 20..40 {
        let s = sample(&format!("fresh-{i}"), 1, &[("rps", 1.0)]);
        let verdict = send(&mut ca, &s).await;
        assert!(verdict.error.is_empty(), "after the restart: {verdict:?}");
    }
    drop(a);
}
