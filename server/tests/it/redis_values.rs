//! What Redis itself may do wrong, against a real `redis-server`: refuse the password
//! of `REDIS_URL` (reported as an authentication failure, not as a timeout), hold a
//! value far above `SNAPSHOT_MAX_BYTES` or a key of another type at a device's key
//! (`docs/snapshots.md`, "Values Redis should not hold"), also under a brace id's
//! old key; and the start-up log's one true line about the storage mode.

use std::time::{Duration, Instant};

use crate::common::{
    ServerProcess, TestServer, connect, metric_total, one, redis_server::RedisServer, run_ingest,
};
use tidewatch_proto::v1::AnalyzeRequest;
use tidewatch_server::snapshot::{
    codec, fence,
    resp::Reply,
    store::{self, Store, StoreError},
};

#[tokio::test]
async fn a_refused_password_is_an_authentication_failure() {
    let redis = RedisServer::start();
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query_async(&mut admin)
        .await
        .unwrap();
    let timeout = Duration::from_millis(500);
    let set = redis::cmd("SET").arg("k").arg("v").get_packed_command();
    for url in [
        format!("redis://:wrong@127.0.0.1:{}", redis.port),
        format!("redis://127.0.0.1:{}", redis.port),
    ] {
        let store = Store::new(&url, 2, timeout, timeout).unwrap();
        let started = Instant::now();
        // The read pool (redis-rs connections) ...
        let e = store.ping().await.unwrap_err();
        assert!(matches!(e, StoreError::Auth(_)), "{url}: {e:?}");
        assert!(
            e.to_string().starts_with("redis refused authentication"),
            "{e}"
        );
        assert!(
            started.elapsed() < 3 * timeout,
            "waited {:?}",
            started.elapsed()
        );
    }
    // ... and the flusher's own connections: a wrong password fails the login...
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let store = Store::new(&url, 2, timeout, timeout).unwrap();
    let mut refused = Vec::new();
    let mut on_reply = |i: usize, reply: Reply| {
        if let Reply::Error(e) = reply {
            refused.push((i, e));
        }
    };
    let e = store
        .write_commands(&set, 1, &mut on_reply)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Auth(_)), "{e:?}");
    // ... and without one, the write connection's setup (it loads the fencing
    // scripts as it opens) is refused NOAUTH: an authentication failure too.
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let store = Store::new(&url, 2, timeout, timeout).unwrap();
    let e = store
        .write_commands(&set, 1, &mut on_reply)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Auth(m) if m.starts_with("NOAUTH")),
        "{e:?}"
    );
    assert!(refused.is_empty(), "nothing was sent: {refused:?}");
    // The right password works.
    let store = Store::new(
        &format!("redis://:right@127.0.0.1:{}", redis.port),
        2,
        timeout,
        timeout,
    )
    .unwrap();
    store.ping().await.unwrap();
}

/// Writes an 8 MiB string at `key` (zeros up to one `x`), eight times the 1 MiB cap
/// of [`with_redis`]'s servers in these tests.
async fn write_oversized(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: i64 = redis::cmd("SETRANGE")
        .arg(key)
        .arg((8 << 20) - 1)
        .arg("x")
        .query_async(conn)
        .await
        .unwrap();
}

/// `total_net_output_bytes` of Redis: what it has sent to all clients so far.
async fn bytes_sent(redis: &RedisServer) -> u64 {
    let mut conn = redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_net_output_bytes")
}

async fn with_redis(redis: &RedisServer, max_bytes: u64) -> TestServer {
    let url = redis.url();
    TestServer::start_with(move |c| {
        c.redis_url = Some(url.into());
        c.snapshot_interval = Duration::from_millis(100);
        c.snapshot_max_bytes = max_bytes;
    })
    .await
}

/// The first verdict of `device`, sent on its own stream.
async fn first_verdict(server: &TestServer, device: &str) -> tidewatch_proto::v1::Verdict {
    let (verdicts, status) = run_ingest(
        &mut server.client().await,
        vec![one(device, 1, &[("rps", 420.0)])],
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    verdicts
        .into_iter()
        .flat_map(|r| r.verdicts)
        .next()
        .expect("one verdict")
}

/// Waits until the device's key holds a snapshot this build decodes with `last_seq`.
async fn wait_for_snapshot(redis: &RedisServer, device: &str, last_seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = redis.connection().await;
        let kind: String = redis::cmd("TYPE")
            .arg(store::key(device))
            .query_async(&mut conn)
            .await
            .unwrap();
        if kind == "string"
            && let Some(raw) = redis.raw(device).await
            && codec::decode_value(&raw, device).is_ok_and(|d| d.last_seq == last_seq)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{device}: key is still a {kind} without the new snapshot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A value above `SNAPSHOT_MAX_BYTES` is never transferred, neither by a restore nor
/// by `Analyze`: it counts as a decode error, the device starts fresh, and its first
/// write replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_above_the_cap_is_never_read() {
    let redis = RedisServer::start();
    let mut conn = redis.connection().await;
    for device in ["huge", "huge-analyzed"] {
        write_oversized(&mut conn, &store::key(device)).await;
    }
    let server = with_redis(&redis, 1 << 20).await;
    let sent = bytes_sent(&redis).await;
    let verdict = first_verdict(&server, "huge").await;
    assert!(verdict.error.is_empty(), "{verdict:?}");
    assert_eq!(verdict.metrics[0].window_count, 0, "started fresh");
    let e = server
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: "huge-analyzed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let transferred = bytes_sent(&redis).await - sent;
    assert!(
        transferred < 64 * 1024,
        "{transferred} bytes came from redis"
    );
    let state = &server.state;
    assert_eq!(
        metric_total(state, "tidewatch_snapshot_decode_errors_total"),
        2.0
    );
    assert_eq!(
        metric_total(state, "tidewatch_snapshot_read_failures_total"),
        0.0
    );
    wait_for_snapshot(&redis, "huge", 1).await;
    server.stop().await.unwrap();
}

/// A key of another type than a string (a hash, a list) is counted and logged, the
/// device starts fresh (a restore) or is unknown (`Analyze`) instead of Redis being
/// reported unavailable, and the device's first write replaces the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_counted_and_replaced() {
    let redis = RedisServer::start();
    let mut conn = redis.connection().await;
    let _: i64 = redis::cmd("HSET")
        .arg(store::key("hashed"))
        .arg("field")
        .arg("value")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("RPUSH")
        .arg(store::key("listed"))
        .arg("item")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The fencing keys beside a snapshot key: deleted, or they would fail every
    // script of their device.
    let _: i64 = redis::cmd("HSET")
        .arg(fence::owner_key("fenced"))
        .arg("field")
        .arg("value")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("SADD")
        .arg(fence::version_key("fenced"))
        .arg("member")
        .query_async(&mut conn)
        .await
        .unwrap();
    let server = with_redis(&redis, 1 << 20).await;
    let verdict = first_verdict(&server, "hashed").await;
    assert!(verdict.error.is_empty(), "{verdict:?}");
    assert_eq!(verdict.metrics[0].window_count, 0);
    let e = server
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: "listed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let state = &server.state;
    assert_eq!(
        metric_total(state, "tidewatch_snapshot_wrong_type_total"),
        2.0
    );
    let verdict = first_verdict(&server, "fenced").await;
    assert!(verdict.error.is_empty(), "{verdict:?}");
    assert_eq!(
        metric_total(state, "tidewatch_snapshot_wrong_type_total"),
        4.0
    );
    assert_eq!(
        metric_total(state, "tidewatch_snapshot_read_failures_total"),
        0.0
    );
    assert_eq!(
        metric_total(state, "tidewatch_snapshot_decode_errors_total"),
        0.0
    );
    wait_for_snapshot(&redis, "hashed", 1).await;
    wait_for_snapshot(&redis, "fenced", 1).await;
    server.stop().await.unwrap();
}

/// The binary says its storage mode in one line, and truly: with `REDIS_URL` set
/// (even to a Redis that refuses the password) `snapshots on` and never `running in
/// memory`; without it, or empty, the reverse. A refused password is then reported as
/// an authentication failure by the start-up check, not as a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_log_states_the_mode_once_and_truly() {
    let count = |log: &[String], text: &str| log.iter().filter(|l| l.contains(text)).count();
    for envs in [vec![], vec![("REDIS_URL", "")]] {
        let memory = ServerProcess::spawn(&[], &envs);
        let log = &memory.startup_log;
        assert_eq!(count(log, "running in memory without Redis"), 1, "{log:?}");
        assert_eq!(count(log, "snapshots on"), 0, "{log:?}");
    }
    let redis = RedisServer::start();
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let server = ServerProcess::spawn(&[], &[("REDIS_URL", &url)]);
    let log = &server.startup_log;
    assert_eq!(count(log, "snapshots on"), 1, "{log:?}");
    assert_eq!(count(log, "running in memory"), 0, "{log:?}");
    let refused = server.log.wait_for(
        |line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("redis unavailable"))
        },
        Duration::from_secs(10),
    );
    let refused = refused.expect("the start-up check reports the refused password");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("redis refused authentication"),
        "{refused}"
    );
    assert!(
        !error.contains("wrong"),
        "the password is logged: {refused}"
    );
    let later = server.json_log();
    assert!(later.iter().all(|l| {
        !l["message"]
            .as_str()
            .unwrap_or_default()
            .contains("running in memory")
    }));
}

/// A snapshot above `SNAPSHOT_MAX_BYTES` is still written (it is the device's
/// history), and the flusher warns that it will not be restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flusher_warns_of_a_snapshot_above_the_cap() {
    let redis = RedisServer::start();
    let server = ServerProcess::spawn(
        &[],
        &[
            ("REDIS_URL", &redis.url()),
            ("SNAPSHOT_INTERVAL", "100ms"),
            ("SNAPSHOT_MAX_BYTES", "1024"),
        ],
    );
    let names: Vec<String> = (0..32).map(|i| format!("metric_{i:02}")).collect();
    let metrics: Vec<(&str, f64)> = names.iter().map(|n| (n.as_str(), 1.0)).collect();
    let mut client = connect(&server.grpc_url()).await;
    let (_, status) = run_ingest(&mut client, vec![one("wide", 1, &metrics)]).await;
    assert!(status.is_none(), "{status:?}");
    let warned = server
        .log
        .wait_for(
            |line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("snapshots larger than SNAPSHOT_MAX_BYTES"))
            },
            Duration::from_secs(10),
        )
        .expect("the flusher warns");
    assert_eq!(warned["devices"], 1, "{warned}");
    let written = redis.raw("wide").await.expect("written anyway");
    assert!(written.len() > 1024, "{} bytes", written.len());
}

/// A brace id's snapshot left under its key of builds before Redis Cluster support
/// (`docs/snapshots.md`, "Redis Cluster") is restored from there when the new key
/// has none, with the same checks as any read: a value there above
/// `SNAPSHOT_MAX_BYTES` is never transferred, and its device starts fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_key_of_a_brace_id_is_read_within_the_cap() {
    let redis = RedisServer::start();
    let (kept, huge) = ("valve{7}", "valve{8}");
    let server = with_redis(&redis, 1 << 20).await;
    let requests = (1..=3)
        .map(|seq| one(kept, seq, &[("rps", 420.0)]))
        .collect();
    let (_, status) = run_ingest(&mut server.client().await, requests).await;
    assert!(status.is_none(), "{status:?}");
    wait_for_snapshot(&redis, kept, 3).await;
    server.stop().await.unwrap();
    // As an older build left them: the snapshot under the id as is, no version.
    let mut conn = redis.connection().await;
    let old = |id: &str| store::legacy_key(id).expect("keyed in hex");
    let _: () = redis::cmd("RENAME")
        .arg(store::key(kept))
        .arg(old(kept))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(fence::version_key(kept))
        .arg(fence::owner_key(kept))
        .query_async(&mut conn)
        .await
        .unwrap();
    write_oversized(&mut conn, &old(huge)).await;
    let server = with_redis(&redis, 1 << 20).await;
    let sent = bytes_sent(&redis).await;
    let (verdicts, status) = run_ingest(
        &mut server.client().await,
        vec![
            one(kept, 4, &[("rps", 420.0)]),
            one(huge, 1, &[("rps", 420.0)]),
        ],
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    let verdicts: Vec<_> = verdicts.into_iter().flat_map(|r| r.verdicts).collect();
    assert_eq!(verdicts.len(), 2);
    for verdict in &verdicts {
        assert!(verdict.error.is_empty(), "{verdict:?}");
    }
    assert_eq!(verdicts[0].metrics[0].window_count, 3, "restored");
    assert_eq!(verdicts[1].metrics[0].window_count, 0, "started fresh");
    let transferred = bytes_sent(&redis).await - sent;
    assert!(
        transferred < 64 * 1024,
        "{transferred} bytes came from redis"
    );
    assert_eq!(
        metric_total(&server.state, "tidewatch_snapshot_decode_errors_total"),
        1.0
    );
    // The next write goes to the new key.
    wait_for_snapshot(&redis, kept, 4).await;
    server.stop().await.unwrap();
}
