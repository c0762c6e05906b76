//! Redis snapshots against a real `redis-server` started by each test on a free port:
//! continuity across a graceful restart and across `kill -9`, duplicates after a
//! crash, Analyze from another replica, a Redis outage during a stream, corrupt
//! values, restore-once under concurrent first samples, eviction, startup logs.

use std::{
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::common::{
    ServerProcess, TestServer, connect, redis_server::RedisServer, sample, verdicts_of,
};
use tidewatch_proto::v1::{
    AnalyzeRequest, IngestRequest, Sample, Source, Verdict,
    telemetry_service_client::TelemetryServiceClient,
};
use tidewatch_server::{config::Config, telemetry::Transport};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

const DEVICE: &str = "pump-7";

/// `n` samples of one device with two metrics, seq 1..=n: noise with the odd spike
/// and a level shift, so that windows evict, re-centre and flag anomalies.
fn samples(device: &str, n: u64) -> Vec<Sample> {
    (1..=n)
        .map(|seq| {
            let noise = ((seq * 7919) % 101) as f64 * 0.37;
            let spike = if seq % 37 == 0 { 400.0 } else { 0.0 };
            let shift = if seq > 180 { 1e6 } else { 0.0 };
            sample(
                device,
                seq,
                &[
                    ("rps", 420.0 + noise + spike + shift),
                    ("cpu", 0.5 + noise / 1000.0),
                ],
            )
        })
        .collect()
}

/// Streams `samples` one per message on one Ingest stream; every verdict, in order.
async fn stream(client: &mut TelemetryServiceClient<Channel>, samples: &[Sample]) -> Vec<Verdict> {
    let requests: Vec<IngestRequest> = samples
        .iter()
        .map(|s| IngestRequest {
            samples: vec![s.clone()],
            ..IngestRequest::default()
        })
        .collect();
    let verdicts = verdicts_of(client, requests).await;
    assert_eq!(verdicts.len(), samples.len());
    verdicts
}

/// The verdicts of one uninterrupted server without Redis.
async fn reference(samples: &[Sample]) -> Vec<Verdict> {
    let server = TestServer::start().await;
    let verdicts = stream(&mut server.client().await, samples).await;
    server.stop().await.expect("stop");
    verdicts
}

async fn with_redis(redis: &RedisServer, configure: impl FnOnce(&mut Config)) -> TestServer {
    let url = redis.url();
    TestServer::start_with(move |c| {
        c.redis_url = Some(url.into());
        configure(c);
    })
    .await
}

/// Polls `condition` until it holds (a readiness signal, not a sleep); fails after 30 s.
async fn wait_until<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a series of the Prometheus exposition: metric `name` with a label
/// set containing `label` (the exporter may add scope labels).
fn metric(server: &TestServer, name: &str, label: &str) -> f64 {
    let text = server.state.metrics.render();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(label))
        })
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no {name} with {label} in\n{text}"))
}

fn counter(
    server: &TestServer,
    read: impl Fn(&tidewatch_server::telemetry::Counters) -> u64,
) -> u64 {
    read(server.state.metrics.counters())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_continues_exactly() {
    let redis = RedisServer::start();
    let all = samples(DEVICE, 300);
    let want = reference(&all).await;

    // No periodic flush: what B sees was written by A's shutdown flush.
    let a = with_redis(&redis, |c| c.snapshot_interval = Duration::from_secs(3600)).await;
    let first = stream(&mut a.client().await, &all[..150]).await;
    assert!(redis.raw(DEVICE).await.is_none(), "nothing flushed yet");
    a.stop().await.expect("stop A");
    assert_eq!(
        redis.snapshot(DEVICE).await.expect("final flush").last_seq,
        150
    );

    let b = with_redis(&redis, |_| {}).await;
    let rest = stream(&mut b.client().await, &all[150..]).await;
    assert_eq!(first, want[..150]);
    assert_eq!(rest, want[150..], "B continues exactly as one server would");
    assert!(
        want.iter().any(|v| v.anomaly),
        "the data has anomalies to compare"
    );
    assert_eq!(
        counter(&b, |c| c.snapshot_restores.load(Ordering::Relaxed)),
        1
    );
    b.stop().await.expect("stop B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_at_most_one_interval_and_duplicates_stay_duplicates() {
    let redis = RedisServer::start();
    let all = samples(DEVICE, 300);
    let want = reference(&all).await;

    let a = ServerProcess::spawn(
        &[],
        &[("REDIS_URL", &redis.url()), ("SNAPSHOT_INTERVAL", "100ms")],
    );
    let mut client = connect(&a.grpc_url()).await;
    stream(&mut client, &all[..150]).await;
    // A flush that holds everything answered so far has happened...
    wait_until("a flush with seq 150", || async {
        redis
            .snapshot(DEVICE)
            .await
            .is_some_and(|d| d.last_seq == 150)
    })
    .await;
    // ...then ten more samples, and the crash, likely before the next flush.
    stream(&mut client, &all[150..160]).await;
    a.kill9();

    let b = with_redis(&redis, |_| {}).await;
    let mut client = b.client().await;
    let stats = client
        .analyze(AnalyzeRequest {
            device_id: DEVICE.into(),
        })
        .await
        .expect("analyze from snapshot")
        .into_inner();
    assert_eq!(stats.source, Source::Snapshot as i32);
    let kept = stats.last_seq;
    assert!(
        (150..=160).contains(&kept),
        "lost more than the last interval: snapshot has seq {kept}"
    );

    // The client re-sends from seq 141: what B already has is a duplicate.
    let resent = stream(&mut client, &all[140..]).await;
    for (verdict, sample) in resent.iter().zip(&all[140..]) {
        if sample.seq <= kept {
            assert!(verdict.duplicate, "seq {} must be a duplicate", sample.seq);
            assert!(verdict.metrics.is_empty());
        } else {
            assert_eq!(
                *verdict,
                want[sample.seq as usize - 1],
                "seq {}",
                sample.seq
            );
        }
    }
    let duplicates = kept - 140;
    assert_eq!(b.state.metrics.samples(Transport::Grpc), 300 - kept);
    assert_eq!(
        metric(
            &b,
            "tidewatch_duplicate_samples_total",
            "transport=\"grpc\""
        ),
        duplicates as f64
    );
    b.stop().await.expect("stop B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_on_another_replica_answers_from_the_snapshot() {
    let redis = RedisServer::start();
    let a = with_redis(&redis, |c| c.snapshot_interval = Duration::from_millis(100)).await;
    let b = with_redis(&redis, |_| {}).await;
    stream(&mut a.client().await, &samples(DEVICE, 60)).await;
    wait_until("a flush with seq 60", || async {
        redis
            .snapshot(DEVICE)
            .await
            .is_some_and(|d| d.last_seq == 60)
    })
    .await;

    let request = AnalyzeRequest {
        device_id: DEVICE.into(),
    };
    let from_a = a
        .client()
        .await
        .analyze(request.clone())
        .await
        .unwrap()
        .into_inner();
    let from_b = b
        .client()
        .await
        .analyze(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_a.source, Source::Memory as i32);
    assert_eq!(from_b.source, Source::Snapshot as i32);
    assert_eq!(from_b.metrics, from_a.metrics);
    assert_eq!(from_b.updated_at, from_a.updated_at);
    assert_eq!(from_b.last_seq, 60);
    assert!(
        !b.state.engine.contains(DEVICE),
        "Analyze does not adopt the device"
    );

    let unknown = b
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_during_a_stream_loses_no_verdict() {
    let mut redis = RedisServer::start();
    let a = with_redis(&redis, |c| {
        c.snapshot_interval = Duration::from_millis(100);
        c.redis_command_timeout = Duration::from_millis(200);
        c.redis_connect_timeout = Duration::from_millis(200);
    })
    .await;
    let writes = |s: &TestServer| counter(s, |c| c.snapshot_writes.load(Ordering::Relaxed));
    let failures = |s: &TestServer| counter(s, |c| c.snapshot_failures.load(Ordering::Relaxed));

    // 20 seconds, a sample every 20 ms.
    let total = 1000u64;
    let all = samples(DEVICE, total);
    let (tx, rx) = tokio::sync::mpsc::channel::<IngestRequest>(16);
    let sender = tokio::spawn({
        let all = all.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for s in all {
                tick.tick().await;
                let request = IngestRequest {
                    samples: vec![s],
                    ..IngestRequest::default()
                };
                if tx.send(request).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut client = a.client().await;
    let mut responses = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    let receiver = tokio::spawn(async move {
        let mut verdicts = Vec::new();
        while let Some(response) = responses.next().await {
            verdicts.extend(
                response
                    .expect("no stream error during the outage")
                    .verdicts,
            );
        }
        verdicts
    });

    wait_until("a first snapshot write", || async { writes(&a) > 0 }).await;
    redis.kill();
    wait_until("a failed flush", || async { failures(&a) > 0 }).await;
    let failed_at = failures(&a);
    let written_before = writes(&a);
    redis.restart();
    wait_until("a write after Redis came back", || async {
        writes(&a) > written_before && redis.raw(DEVICE).await.is_some()
    })
    .await;
    sender.await.unwrap();
    let verdicts = receiver.await.unwrap();
    assert_eq!(verdicts.len() as u64, total);
    assert!(
        verdicts
            .iter()
            .all(|v| v.error.is_empty() && !v.duplicate && !v.metrics.is_empty()),
        "every sample got a verdict"
    );
    assert!(failed_at >= 1);
    let exposition = a.state.metrics.render();
    for name in [
        "tidewatch_snapshot_failures_total",
        "tidewatch_snapshot_writes_total",
        "tidewatch_snapshot_flush_duration_seconds_bucket",
    ] {
        assert!(
            exposition.contains(name),
            "{name} missing from\n{exposition}"
        );
    }
    assert!(metric(&a, "tidewatch_snapshot_failures_total", "") >= 1.0);

    let newest = a
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: DEVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    a.stop().await.unwrap();
    let b = with_redis(&redis, |_| {}).await;
    let restored = b
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: DEVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.last_seq, total);
    assert_eq!(restored.metrics, newest.metrics);
    // And ingestion on B continues from that state.
    let next = stream(
        &mut b.client().await,
        &samples(DEVICE, total + 1)[total as usize..],
    )
    .await;
    assert_eq!(next[0].metrics[0].window_count, 50);
    assert_eq!(
        counter(&b, |c| c.snapshot_restores.load(Ordering::Relaxed)),
        1
    );
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshots_are_counted_and_the_device_starts_fresh() {
    let redis = RedisServer::start();
    redis.set_raw("garbage", b"definitely not a snapshot").await;
    // A snapshot of a later encoding version.
    let mut future = b"TW".to_vec();
    future.push(99);
    future.extend_from_slice(&[0; 32]);
    redis.set_raw("future", &future).await;
    let server = with_redis(&redis, |_| {}).await;
    let decode_errors =
        |s: &TestServer| counter(s, |c| c.snapshot_decode_errors.load(Ordering::Relaxed));

    let analyze = server
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(analyze.code(), Code::NotFound);
    assert_eq!(decode_errors(&server), 1);

    let mut client = server.client().await;
    for (i, device) in ["garbage", "future"].into_iter().enumerate() {
        let verdicts = stream(&mut client, &samples(device, 3)).await;
        assert!(verdicts.iter().all(|v| v.error.is_empty() && !v.duplicate));
        assert_eq!(
            verdicts[0].metrics[0].window_count, 0,
            "{device} starts fresh"
        );
        assert_eq!(decode_errors(&server), 2 + i as u64);
    }
    assert_eq!(
        counter(&server, |c| c.snapshot_restores.load(Ordering::Relaxed)),
        0
    );
    // The fresh state replaces the bad value at shutdown.
    server.stop().await.unwrap();
    assert_eq!(redis.snapshot("garbage").await.unwrap().last_seq, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_samples_restore_once() {
    let redis = RedisServer::start();
    let a = with_redis(&redis, |_| {}).await;
    stream(&mut a.client().await, &samples(DEVICE, 20)).await;
    a.stop().await.unwrap();

    // No periodic flush on B: every script B runs is its restore's.
    let b = Arc::new(
        with_redis(&redis, |c| {
            c.redis_command_timeout = Duration::from_secs(2);
            c.snapshot_interval = Duration::from_secs(3600);
        })
        .await,
    );
    let reads_before = redis.calls("evalsha").await;
    let streams = 8;
    let barrier = Arc::new(tokio::sync::Barrier::new(streams as usize + 1));
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let b = Arc::clone(&b);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut client = b.client().await;
            barrier.wait().await;
            stream(&mut client, &[sample(DEVICE, 0, &[("rps", 421.0)])]).await
        }));
    }
    // Redis holds every command for 300 ms: all first samples arrive while the
    // restore's read is still waiting, so they must share it.
    let mut conn = redis.connection().await;
    let () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "300", "ALL"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    barrier.wait().await;
    let mut counts = Vec::new();
    for task in tasks {
        let verdicts = task.await.unwrap();
        assert!(verdicts[0].error.is_empty());
        counts.push(
            verdicts[0]
                .metrics
                .iter()
                .find(|m| m.metric == "rps")
                .unwrap()
                .window_count,
        );
    }
    counts.sort_unstable();
    assert_eq!(counts, (20..20 + streams).collect::<Vec<u32>>());
    // One acquire for the device, after B's first lease renewal; A retired at
    // shutdown, so it costs a take-over (compare-and-delete of A's ownership) and
    // the acquire again.
    assert_eq!(
        redis.calls("evalsha").await - reads_before,
        4,
        "one read for the device"
    );
    assert_eq!(
        counter(&b, |c| c.snapshot_restores.load(Ordering::Relaxed)),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_eviction_writes_before_dropping() {
    let redis = RedisServer::start();
    let server = with_redis(&redis, |c| {
        c.idle_timeout = Duration::from_secs(1);
        c.snapshot_interval = Duration::from_millis(100);
    })
    .await;
    let all = samples(DEVICE, 11);
    stream(&mut server.client().await, &all[..10]).await;
    wait_until("the device to be evicted", || async {
        !server.state.engine.contains(DEVICE)
    })
    .await;
    assert_eq!(redis.snapshot(DEVICE).await.unwrap().last_seq, 10);
    let next = stream(&mut server.client().await, &all[10..]).await;
    assert_eq!(
        next[0].metrics[0].window_count, 10,
        "restored after eviction"
    );
    assert_eq!(
        counter(&server, |c| c.snapshot_restores.load(Ordering::Relaxed)),
        1
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_says_which_mode_and_hides_the_password() {
    let memory = ServerProcess::spawn(&[], &[]);
    assert!(
        memory
            .startup_log
            .iter()
            .any(|l| l.contains("running in memory without Redis")),
        "{:?}",
        memory.startup_log
    );
    drop(memory);

    let redis = RedisServer::start();
    let url = format!("redis://:hunter2@127.0.0.1:{}", redis.port);
    let with = ServerProcess::spawn(&[], &[("REDIS_URL", &url)]);
    let line = with
        .startup_log
        .iter()
        .find(|l| l.contains("snapshots on"))
        .unwrap_or_else(|| panic!("{:?}", with.startup_log));
    assert!(
        line.contains(&format!("127.0.0.1:{}", redis.port)),
        "{line}"
    );
    assert!(with.startup_log.iter().all(|l| !l.contains("hunter2")));
}

/// The flusher packs its own `SET`s on connections of its own: the URL's database is
/// selected on them, and every reply is checked, so a `SET` Redis refuses (here: out
/// of memory) leaves its device dirty and counted as failed until a later flush
/// writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_stay_dirty_and_the_url_database_is_used() {
    use tidewatch_server::{
        engine::{DeviceState, Engine, EngineConfig, MetricState, Window},
        snapshot::{SnapshotConfig, Snapshots, store},
        telemetry::Counters,
    };
    let redis = RedisServer::start();
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    for i in 0..25 {
        let mut device = DeviceState::new(&format!("d{i}"));
        let mut metric = MetricState::new("cpu");
        metric.window = Window::from_values((0..50).map(f64::from), 50);
        device.metrics.push(metric);
        device.dirty = true;
        assert!(engine.insert_if_absent(device));
    }
    let mut config = Config::defaults();
    config.redis_url = Some(format!("{}/3", redis.url()).into());
    config.snapshot_batch = 10;
    let snapshots = Arc::new(
        Snapshots::new(
            SnapshotConfig::from_config(&config).unwrap(),
            Arc::clone(&engine),
            Arc::new(Counters::default()),
        )
        .unwrap(),
    );
    let mut admin = redis.connection().await;
    let set_maxmemory = |limit: &'static str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(limit)
            .clone()
    };
    let () = set_maxmemory("1").query_async(&mut admin).await.unwrap();
    let report = snapshots.flush().await;
    assert_eq!(
        (report.written, report.failed),
        (0, 25),
        "every SET refused"
    );
    let () = set_maxmemory("0").query_async(&mut admin).await.unwrap();
    let report = snapshots.flush().await;
    assert_eq!(
        (report.written, report.failed),
        (25, 0),
        "retried and written"
    );
    assert_eq!(snapshots.flush().await.written, 0, "nothing dirty any more");
    // Written to database 3, not 0.
    assert!(redis.raw("d7").await.is_none());
    let mut db3 = redis::Client::open(format!("{}/3", redis.url()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(store::key("d7"))
        .query_async(&mut db3)
        .await
        .unwrap();
    let restored =
        tidewatch_server::snapshot::codec::decode_value(&value.expect("in db 3"), "d7").unwrap();
    assert_eq!(restored.metrics[0].window.len(), 50);
}

/// One message mixing devices in memory, a device with a snapshot and a new device:
/// the server judges up to the device that needs its snapshot, restores it, judges the
/// rest, and answers all in one response, in order, exactly as one server would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_in_the_middle_of_a_message_keeps_order_and_continuity() {
    let redis = RedisServer::start();
    let restored = samples(DEVICE, 120);
    let known = samples("in-memory", 120);
    let fresh = samples("brand-new", 3);
    // The message on B: a sample of a device B already has, the restored device's
    // next sample, a new device's, the restored device's next, the known device's.
    let mixed = vec![
        known[60].clone(),
        restored[100].clone(),
        fresh[0].clone(),
        restored[101].clone(),
        known[61].clone(),
    ];
    // What one uninterrupted server answers for the same history and message.
    let one = TestServer::start().await;
    let mut client = one.client().await;
    stream(&mut client, &restored[..100]).await;
    stream(&mut client, &known[..60]).await;
    let want = client
        .ingest(tokio_stream::iter([IngestRequest {
            samples: mixed.clone(),
            ..IngestRequest::default()
        }]))
        .await
        .expect("ingest")
        .into_inner()
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .verdicts;
    one.stop().await.expect("stop");

    let a = with_redis(&redis, |c| c.snapshot_interval = Duration::from_secs(3600)).await;
    stream(&mut a.client().await, &restored[..100]).await;
    a.stop()
        .await
        .expect("stop A: the final flush writes the snapshot");

    let b = with_redis(&redis, |_| {}).await;
    let mut client = b.client().await;
    stream(&mut client, &known[..60]).await;
    let mut responses = client
        .ingest(tokio_stream::iter([IngestRequest {
            samples: mixed,
            ..IngestRequest::default()
        }]))
        .await
        .expect("ingest")
        .into_inner();
    let got = responses
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .verdicts;
    assert!(responses.next().await.is_none(), "one response per request");
    assert_eq!(got, want, "same verdicts, same order, as one server");
    assert_eq!(
        got[1].metrics[0].window_count, 50,
        "continued from the snapshot"
    );
    assert_eq!(
        got[2].metrics[0].window_count, 0,
        "the new device starts fresh"
    );
    assert_eq!(
        counter(&b, |c| c.snapshot_restores.load(Ordering::Relaxed)),
        1,
        "one restore: the device that had a snapshot"
    );
    b.stop().await.expect("stop B");
}
