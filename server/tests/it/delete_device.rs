//! `DeleteDevice` and `DELETE /devices/{id}` end to end (`docs/snapshots.md`, "Deleting
//! a device"): two real server binaries on one real `redis-server`, so that a deletion
//! through one replica must reach the other one's memory and Redis; the admin scope
//! and the namespace with a real policy file; a device that does not exist.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tidewatch_proto::v1::{
    AnalyzeRequest, DeleteDeviceRequest, DeleteDeviceResponse, IngestRequest, Sample, Verdict,
    telemetry_service_client::TelemetryServiceClient,
};
use tidewatch_server::{
    security::policy::hash_key_hex,
    snapshot::{fence, store},
};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, transport::Channel};

use crate::common::{
    ServerProcess, TestServer,
    certs::{tempdir, write},
    connect, http_send, metric_total,
    redis_server::RedisServer,
    sample, verdicts_of,
};

const DEVICE: &str = "fleet/pump-9";

fn samples(from: u64, to: u64) -> Vec<Sample> {
    (from..=to)
        .map(|seq| sample(DEVICE, seq, &[("rps", 420.0 + (seq % 7) as f64)]))
        .collect()
}

/// One sample on its own Ingest stream, sent again while it is answered `moved` (what
/// the SDKs do); its verdict.
async fn send(client: &mut TelemetryServiceClient<Channel>, s: &Sample) -> Verdict {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let request = IngestRequest {
            samples: vec![s.clone()],
            ..IngestRequest::default()
        };
        let verdict = verdicts_of(client, vec![request]).await.remove(0);
        if !verdict.error.starts_with("moved:") {
            return verdict;
        }
        assert!(Instant::now() < deadline, "seq {} stays moved", s.seq);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn delete(
    client: &mut TelemetryServiceClient<Channel>,
    id: &str,
) -> Result<DeleteDeviceResponse, tonic::Status> {
    client
        .delete_device(DeleteDeviceRequest {
            device_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn analyze_code(client: &mut TelemetryServiceClient<Channel>, id: &str) -> Code {
    match client
        .analyze(AnalyzeRequest {
            device_id: id.into(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn replica(redis: &RedisServer) -> ServerProcess {
    ServerProcess::spawn(
        &[],
        &[("REDIS_URL", &redis.url()), ("SNAPSHOT_INTERVAL", "100ms")],
    )
}

/// The gateway address a binary logged at start.
fn http_addr(server: &ServerProcess) -> SocketAddr {
    server
        .startup_log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["http_addr"].as_str()?.parse().ok())
        .expect("http_addr in the start-up log")
}

/// `DELETE path` with an optional bearer token.
async fn http_delete(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> crate::common::HttpAnswer {
    let mut request = http::Request::delete(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    http_send(
        addr,
        request
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request"),
    )
    .await
}

/// A value of a Redis key, as text (`None` when there is no key).
async fn redis_get(redis: &RedisServer, key: &str) -> Option<String> {
    let mut conn = redis.connection().await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("GET")
}

/// Judged on A, moved to B, deleted through B: the state is gone from Redis and from
/// both replicas' memory, A neither answers from it nor writes it back, and the
/// device's next samples (any replica, any seq, even one below the old last seq)
/// start fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judged_on_a_moved_to_b_deleted_through_b_is_gone_everywhere() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis), replica(&redis));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    for s in samples(1, 30) {
        send(&mut ca, &s).await;
    }
    for s in samples(31, 40) {
        let verdict = send(&mut cb, &s).await;
        assert!(verdict.error.is_empty(), "{verdict:?}");
    }
    assert!(redis_get(&redis, &fence::owner_key(DEVICE)).await.is_some());
    let deleted = delete(&mut cb, DEVICE).await.expect("delete");
    assert_eq!(
        deleted,
        DeleteDeviceResponse {
            device_id: DEVICE.into(),
            deleted: true
        }
    );
    // Redis: no snapshot, no owner, the version left behind as a tombstone.
    assert!(redis.raw(DEVICE).await.is_none());
    assert!(redis_get(&redis, &fence::owner_key(DEVICE)).await.is_none());
    let tombstone: u64 = redis_get(&redis, &fence::version_key(DEVICE))
        .await
        .expect("the version stays")
        .parse()
        .unwrap();
    assert!(tombstone >= 2, "{tombstone}");
    // Neither replica answers from the old state.
    assert_eq!(analyze_code(&mut ca, DEVICE).await, Code::NotFound);
    assert_eq!(analyze_code(&mut cb, DEVICE).await, Code::NotFound);
    // Several flushes later A has written nothing back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        redis.raw(DEVICE).await.is_none(),
        "an old copy was written back"
    );
    // The next sample, on A and with a seq far below the old last one, starts fresh.
    let fresh = send(&mut ca, &sample(DEVICE, 3, &[("rps", 1.0)])).await;
    assert!(fresh.error.is_empty() && !fresh.duplicate, "{fresh:?}");
    assert_eq!(fresh.metrics[0].window_count, 0);
    let next = send(&mut cb, &sample(DEVICE, 4, &[("rps", 2.0)])).await;
    assert_eq!(next.metrics[0].window_count, 1, "moved with the new state");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(state) = redis.snapshot(DEVICE).await
            && state.last_seq == 4
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fresh state is never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new state is deleted too; after that, nothing is left to delete.
    let again = delete(&mut ca, DEVICE).await.expect("delete");
    assert!(again.deleted);
    let gone = delete(&mut ca, DEVICE).await.expect("delete");
    assert!(!gone.deleted);
}

/// The replica that holds the device in memory lets go of it at once when another
/// one deletes it (the deletion takes the device by hand-off, as a first sample does),
/// over gRPC and REST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_lets_go_when_another_replica_deletes() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis), replica(&redis));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    for s in samples(1, 20) {
        send(&mut ca, &s).await;
    }
    assert_eq!(analyze_code(&mut ca, DEVICE).await, Code::Ok);
    // Through B's gateway, the id as a path with its slash, then percent-encoded.
    let answer = http_delete(http_addr(&b), "/devices/fleet/pump-9", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json(),
        serde_json::json!({"deviceId": DEVICE, "deleted": true})
    );
    assert_eq!(analyze_code(&mut ca, DEVICE).await, Code::NotFound);
    assert_eq!(analyze_code(&mut cb, DEVICE).await, Code::NotFound);
    let answer = http_delete(http_addr(&b), "/devices/fleet%2Fpump-9", None).await;
    assert_eq!(
        answer.json(),
        serde_json::json!({"deviceId": DEVICE, "deleted": false})
    );
    let fresh = send(&mut ca, &samples(21, 21)[0]).await;
    assert_eq!(fresh.metrics[0].window_count, 0);
}

/// A copy a replica holds without owning it (here: Redis lost the owner key) is
/// dropped too: the deletion notice reaches every replica at once, and the copy could
/// not be written back anyway, since the tombstone's version is above the one it
/// started from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_held_without_ownership_is_dropped_and_cannot_be_written_back() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis), replica(&redis));
    let mut ca = connect(&a.grpc_url()).await;
    let mut cb = connect(&b.grpc_url()).await;
    for s in samples(1, 20) {
        send(&mut ca, &s).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.snapshot(DEVICE).await.is_none_or(|d| d.last_seq < 20) {
        assert!(Instant::now() < deadline, "no flush");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = redis.connection().await;
    let _: i64 = redis::cmd("DEL")
        .arg(fence::owner_key(DEVICE))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(delete(&mut cb, DEVICE).await.expect("delete").deleted);
    let deadline = Instant::now() + Duration::from_secs(5);
    while analyze_code(&mut ca, DEVICE).await != Code::NotFound {
        assert!(Instant::now() < deadline, "A still answers from its copy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = send(&mut ca, &samples(21, 21)[0]).await;
    assert_eq!(fresh.metrics[0].window_count, 0);
    // The fence itself: a write based on the version before the deletion loses.
    let store = store::Store::new(
        &redis.url(),
        1,
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .unwrap();
    let keys = [
        store::key("fleet/other"),
        fence::version_key("fleet/other"),
        fence::owner_key("fleet/other"),
    ];
    let keys = [keys[0].as_str(), keys[1].as_str(), keys[2].as_str()];
    // Another device: written once (ownership given up with it), deleted, then
    // written from the old base, and from none.
    let first: i64 = store
        .eval(
            fence::FLUSH,
            &keys,
            &[b"v1", b"60", b"0", b"stale-replica", b"1"],
        )
        .await
        .unwrap();
    assert_eq!(first, 1);
    let deleted: redis::Value = store
        .eval(fence::DELETE, &keys, &[b"deleter", b"60"])
        .await
        .unwrap();
    assert_eq!(
        deleted,
        redis::Value::Array(vec![
            redis::Value::Int(1),
            redis::Value::Int(1),
            redis::Value::Int(2)
        ])
    );
    let stale: i64 = store
        .eval(
            fence::FLUSH,
            &keys,
            &[b"v1-again", b"60", b"1", b"stale-replica", b"0"],
        )
        .await
        .unwrap();
    assert_eq!(stale, -1, "a copy older than the deletion is written back");
    let never: i64 = store
        .eval(
            fence::FLUSH,
            &keys,
            &[b"v0", b"60", b"0", b"stale-replica", b"0"],
        )
        .await
        .unwrap();
    assert_eq!(never, -1);
    assert!(redis.raw("fleet/other").await.is_none());
}

const OPS: &str = "tw-test-key-ops-0123456789abcdef012345";
const TENANT: &str = "tw-test-key-tenant-0123456789abcdef0123";
const READER: &str = "tw-test-key-reader-0123456789abcdef0123";

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// With authentication on: the admin scope is needed (`PERMISSION_DENIED`, 403), a
/// device outside the caller's namespace is refused the same way whether or not it
/// exists, and nothing is deleted by a refused call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_needs_the_admin_scope_and_the_namespace() {
    let dir = tempdir("delete-auth");
    let policy = format!(
        r#"{{"principals": [
            {{"name": "ops", "scopes": ["admin"], "devices": ["*"],
              "api_keys_sha256": ["{}"]}},
            {{"name": "tenant-a", "scopes": ["ingest", "analyze", "admin"], "devices": ["a/*"],
              "api_keys_sha256": ["{}"]}},
            {{"name": "reader", "scopes": ["ingest", "analyze"], "devices": ["*"],
              "api_keys_sha256": ["{}"]}}
        ]}}"#,
        hash_key_hex(OPS),
        hash_key_hex(TENANT),
        hash_key_hex(READER)
    );
    let policy = write(&dir, "policy.json", &policy);
    let server = TestServer::start_with(|c| c.auth_policy = Some(policy)).await;
    let mut client = server.client().await;
    for device in ["a/1", "b/1"] {
        let request = IngestRequest {
            samples: vec![sample(device, 1, &[("rps", 1.0)])],
            ..IngestRequest::default()
        };
        let mut stream = client
            .ingest(with_token(tokio_stream::iter([request]), Some(READER)))
            .await
            .unwrap()
            .into_inner();
        let verdict = stream.next().await.unwrap().unwrap().verdicts.remove(0);
        assert!(verdict.error.is_empty(), "{verdict:?}");
    }
    let request = |id: &str, token| {
        with_token(
            DeleteDeviceRequest {
                device_id: id.into(),
            },
            token,
        )
    };
    // No credentials; no admin scope.
    let e = client
        .delete_device(request("a/1", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = client
        .delete_device(request("a/1", Some(READER)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{}", e.message());
    // Outside the namespace: the same refusal for a device that exists and one that
    // does not.
    let mut messages = Vec::new();
    for id in ["b/1", "b/never-seen"] {
        let e = client
            .delete_device(request(id, Some(TENANT)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{id}");
        messages.push(e.message().replace(id, "<id>"));
    }
    assert_eq!(messages[0], messages[1]);
    assert!(server.state.engine.contains("a/1") && server.state.engine.contains("b/1"));
    // Over REST, the same answers in the JSON error shape.
    let addr = server.http_addr;
    http_delete(addr, "/devices/a/1", None)
        .await
        .assert_error(401, "unauthenticated");
    http_delete(addr, "/devices/a/1", Some(READER))
        .await
        .assert_error(403, "permission_denied");
    let exists = http_delete(addr, "/devices/b/1", Some(TENANT))
        .await
        .assert_error(403, "permission_denied");
    let never = http_delete(addr, "/devices/b/never-seen", Some(TENANT))
        .await
        .assert_error(403, "permission_denied");
    assert_eq!(
        exists.replace("b/1", "<id>"),
        never.replace("b/never-seen", "<id>")
    );
    assert!(server.state.engine.contains("a/1") && server.state.engine.contains("b/1"));
    // Inside its namespace, with the scope: deleted.
    let deleted = client
        .delete_device(request("a/1", Some(TENANT)))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert!(!server.state.engine.contains("a/1"));
    let answer = http_delete(addr, "/devices/b/1", Some(OPS)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["deleted"], true);
    assert!(!server.state.engine.contains("b/1"));
    assert_eq!(
        metric_total(&server.state, "tidewatch_devices_deleted_total"),
        2.0
    );
    server.stop().await.unwrap();
}

/// A device that does not exist is not an error (`deleted: false`), with and without
/// Redis; an id over `MAX_DEVICE_ID_LEN` is `INVALID_ARGUMENT` (400); an empty id is
/// the device `default`, as for `Analyze`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_exist_is_not_deleted() {
    let redis = RedisServer::start();
    let with_redis = TestServer::start_with(|c| c.redis_url = Some(redis.url().into())).await;
    let memory = TestServer::start().await;
    for server in [&with_redis, &memory] {
        let mut client = server.client().await;
        let answer = delete(&mut client, "never-seen").await.expect("delete");
        assert_eq!(
            answer,
            DeleteDeviceResponse {
                device_id: "never-seen".into(),
                deleted: false
            }
        );
        let answer = delete(&mut client, "").await.expect("delete");
        assert_eq!(answer.device_id, "default");
        let long = "x".repeat(129);
        let e = delete(&mut client, &long).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let answer = http_delete(server.http_addr, "/devices/never-seen", None).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.json(),
            serde_json::json!({"deviceId": "never-seen", "deleted": false})
        );
        http_delete(server.http_addr, &format!("/devices/{long}"), None)
            .await
            .assert_error(400, "invalid_argument");
        // A method the route does not serve.
        let get = crate::common::http_get(server.http_addr, "/devices/never-seen").await;
        assert_eq!(get.status, 405);
        assert_eq!(
            metric_total(&server.state, "tidewatch_devices_deleted_total"),
            0.0
        );
    }
    // Nothing was written for the device that does not exist, beyond its tombstone.
    assert!(redis.raw("never-seen").await.is_none());
    with_redis.stop().await.unwrap();
    memory.stop().await.unwrap();
}

/// A deletion that cannot reach everything deletes nothing: when the device's owner
/// is a live replica that does not let go (here: a replica that is only a liveness key
/// in Redis) the answer is `UNAVAILABLE` (503 over REST) after the hand-off wait, and
/// the snapshot, its version and the owner stay; when Redis is down, the device goes
/// back into memory as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_that_cannot_reach_everything_deletes_nothing() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let server = TestServer::start_with(|c| {
        c.redis_url = Some(url.into());
        c.snapshot_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = server.client().await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(fence::replica_key("ghost"))
        .arg("1")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (key, value) in [
        (fence::owner_key("held"), "ghost"),
        (fence::version_key("held"), "7"),
        (store::key("held"), "not read"),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let e = delete(&mut client, "held").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("retry"), "{}", e.message());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "gave up at once"
    );
    let answer = http_delete(server.http_addr, "/devices/held", None).await;
    answer.assert_error(503, "unavailable");
    assert!(answer.header("retry-after").is_some());
    assert_eq!(
        redis_get(&redis, &fence::owner_key("held"))
            .await
            .as_deref(),
        Some("ghost")
    );
    assert_eq!(
        redis_get(&redis, &fence::version_key("held"))
            .await
            .as_deref(),
        Some("7")
    );
    assert_eq!(redis.raw("held").await.as_deref(), Some(&b"not read"[..]));

    // Redis down: the device this server holds stays, with its state.
    let verdict = send(&mut client, &sample("kept", 1, &[("rps", 1.0)])).await;
    assert!(verdict.error.is_empty(), "{verdict:?}");
    redis.kill();
    let e = delete(&mut client, "kept").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let stats = client
        .analyze(AnalyzeRequest {
            device_id: "kept".into(),
        })
        .await
        .expect("still in memory")
        .into_inner();
    assert_eq!(stats.last_seq, 1);
    assert_eq!(
        metric_total(&server.state, "tidewatch_devices_deleted_total"),
        0.0
    );
    server.stop().await.unwrap();
}

/// The grpcurl example of `docs/api.md`, through reflection, as printed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpcurl_example_deletes() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let grpcurl = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::grpcurl())
            .args(args)
            .output()
            .expect("run grpcurl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")
    };
    tokio::task::block_in_place(|| {
        grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"samples":[{"deviceId":"api-grpc-9","metrics":{"rps":1}}]}"#,
            &addr,
            "tidewatch.v1.TelemetryService/Ingest",
        ]);
        let delete = [
            "-plaintext",
            "-d",
            r#"{"deviceId":"api-grpc-9"}"#,
            &addr,
            "tidewatch.v1.TelemetryService/DeleteDevice",
        ];
        assert_eq!(
            grpcurl(&delete),
            serde_json::json!({"deviceId": "api-grpc-9", "deleted": true})
        );
        // grpcurl leaves out fields at their default: `deleted: false` is not printed.
        assert_eq!(
            grpcurl(&delete),
            serde_json::json!({"deviceId": "api-grpc-9"})
        );
    });
    server.stop().await.unwrap();
}
