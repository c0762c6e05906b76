//! The per-principal `devices` quota (`docs/security.md`, "Quotas") end to end: the
//! real binary with a policy file, driven over gRPC with two tenants' tokens. A
//! tenant past its quota gets the `device_quota` verdict error for samples of new
//! devices, keeps ingesting into the devices it holds, and gets its room back when its
//! devices leave memory (idle eviction); another tenant never notices. With Redis,
//! devices restored from snapshots count as well.

use std::{net::SocketAddr, time::Duration};

use tidewatch_proto::v1::{
    AnalyzeRequest, IngestRequest, Source, Verdict,
    telemetry_service_client::TelemetryServiceClient,
};
use tidewatch_server::security::policy::hash_key_hex;
use tonic::{Request, transport::Channel};

use crate::common::{
    ServerProcess, certs::tempdir, certs::write, connect, drain, http_send,
    redis_server::RedisServer, sample,
};

const KEY_A: &str = "tw-test-key-quota-a-0123456789abcdef";
const KEY_B: &str = "tw-test-key-quota-b-0123456789abcdef";

/// Tenant a may hold 3 devices (`a/*`), tenant b has no device quota (`b/*`).
fn policy() -> String {
    format!(
        r#"{{"principals": [
            {{"name": "tenant-a", "scopes": ["ingest", "analyze"], "devices": ["a/*"],
              "api_keys_sha256": ["{}"], "quota": {{"devices": 3}}}},
            {{"name": "tenant-b", "scopes": ["ingest", "analyze"], "devices": ["b/*"],
              "api_keys_sha256": ["{}"]}}
        ]}}"#,
        hash_key_hex(KEY_A),
        hash_key_hex(KEY_B),
    )
}

fn spawn(envs: &[(&str, &str)]) -> ServerProcess {
    let dir = tempdir("quota-devices-it");
    let policy = write(&dir, "policy.json", &policy());
    let policy = policy.to_string_lossy().into_owned();
    let mut all = vec![("AUTH_POLICY", policy.as_str())];
    all.extend_from_slice(envs);
    ServerProcess::spawn(&[], &all)
}

/// One `Ingest` stream of one message with one sample per device of `ids` (at `seq`),
/// as `key`; the verdicts in order.
async fn ingest(
    client: &mut TelemetryServiceClient<Channel>,
    key: &str,
    ids: &[String],
    seq: u64,
) -> Vec<Verdict> {
    let message = IngestRequest {
        samples: ids
            .iter()
            .map(|id| sample(id, seq, &[("temp", 20.0)]))
            .collect(),
        ..IngestRequest::default()
    };
    let mut request = Request::new(tokio_stream::iter([message]));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut stream = client.ingest(request).await.expect("stream").into_inner();
    let (responses, status) = drain(&mut stream).await;
    assert!(status.is_none(), "{status:?}");
    let verdicts: Vec<Verdict> = responses.into_iter().flat_map(|r| r.verdicts).collect();
    assert_eq!(verdicts.len(), ids.len());
    verdicts
}

/// The gateway's address, from the server's start-up log.
fn http_addr(process: &ServerProcess) -> SocketAddr {
    process
        .startup_log
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|value| value["message"] == "http listening")
        .and_then(|value| value["http_addr"].as_str()?.parse().ok())
        .expect("http listening")
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}/{i}")).collect()
}

fn errors(verdicts: &[Verdict]) -> Vec<&str> {
    verdicts.iter().map(|v| v.error.as_str()).collect()
}

/// Asserts that tenant a holds 3 devices and cannot create a 4th, while it keeps
/// ingesting into its own and tenant b creates devices freely.
async fn a_is_full(client: &mut TelemetryServiceClient<Channel>, held: &[String], seq: u64) {
    let verdicts = ingest(client, KEY_A, &ids("a", 100..102), seq).await;
    for v in &verdicts {
        assert!(
            v.error
                .starts_with("device_quota: principal \"tenant-a\" holds its quota of 3 devices"),
            "{}",
            v.error
        );
    }
    let verdicts = ingest(client, KEY_A, held, seq + 1).await;
    assert!(
        verdicts.iter().all(|v| v.error.is_empty()),
        "{:?}",
        errors(&verdicts)
    );
    let verdicts = ingest(
        client,
        KEY_B,
        &ids("b", (seq as usize) * 100..(seq as usize) * 100 + 20),
        1,
    )
    .await;
    assert!(
        verdicts.iter().all(|v| v.error.is_empty()),
        "{:?}",
        errors(&verdicts)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_its_devices_quota_is_refused_until_its_devices_leave() {
    let process = spawn(&[("IDLE_TIMEOUT", "1s")]);
    let mut client = connect(&process.grpc_url()).await;

    // Three devices fit; in one message the 4th and 5th are refused, per sample.
    let verdicts = ingest(&mut client, KEY_A, &ids("a", 0..5), 1).await;
    let refused: Vec<usize> = (0..5).filter(|&i| !verdicts[i].error.is_empty()).collect();
    assert_eq!(refused, vec![3, 4], "{:?}", errors(&verdicts));
    assert!(verdicts[3].error.starts_with("device_quota:"));
    a_is_full(&mut client, &ids("a", 0..3), 2).await;

    // Over HTTP: the same per-sample refusal, in the 200 answer.
    let answer = http_send(
        http_addr(&process),
        http::Request::post("/ingest")
            .header("authorization", format!("Bearer {KEY_A}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"[{"device_id":"a/0","seq":5,"t":1},{"device_id":"a/200","t":1}]"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["verdicts"][0]["error"], "", "{body}");
    assert!(
        body["verdicts"][1]["error"]
            .as_str()
            .unwrap()
            .starts_with("device_quota:"),
        "{body}"
    );

    // Once a's devices are evicted as idle (IDLE_TIMEOUT=1s), it has room again.
    let mut freed = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let verdicts = ingest(&mut client, KEY_A, &ids("a", 10..13), 1).await;
        if verdicts.iter().all(|v| v.error.is_empty()) {
            freed = true;
            break;
        }
    }
    assert!(freed, "a's devices were never given back");
    a_is_full(&mut client, &ids("a", 10..13), 4).await;
    process.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_restored_from_snapshots_count_against_the_quota() {
    let redis = RedisServer::start();
    let url = redis.url();
    let process = spawn(&[
        ("REDIS_URL", url.as_str()),
        ("SNAPSHOT_INTERVAL", "100ms"),
        ("IDLE_TIMEOUT", "1s"),
    ]);
    let mut client = connect(&process.grpc_url()).await;
    let verdicts = ingest(&mut client, KEY_A, &ids("a", 0..4), 1).await;
    assert_eq!(
        verdicts.iter().filter(|v| v.error.is_empty()).count(),
        3,
        "{:?}",
        errors(&verdicts)
    );
    assert!(
        verdicts[3].error.starts_with("device_quota:"),
        "{:?}",
        errors(&verdicts)
    );
    a_is_full(&mut client, &ids("a", 0..3), 2).await;

    // Written and evicted (`Analyze` answers from the snapshot), a's devices come
    // back from Redis: they fit again, and a restored device counts as much as a
    // created one.
    let mut evicted = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut sources = Vec::new();
        for id in ids("a", 0..3) {
            let mut request = Request::new(AnalyzeRequest { device_id: id });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {KEY_A}").parse().unwrap());
            sources.push(
                client
                    .analyze(request)
                    .await
                    .expect("analyze")
                    .into_inner()
                    .source,
            );
        }
        if sources.iter().all(|&s| s == Source::Snapshot as i32) {
            evicted = true;
            break;
        }
    }
    assert!(evicted, "a's devices were never evicted");
    let verdicts = ingest(&mut client, KEY_A, &ids("a", 0..3), 10).await;
    assert!(
        verdicts.iter().all(|v| v.error.is_empty()),
        "{:?}",
        errors(&verdicts)
    );
    assert!(
        verdicts
            .iter()
            .all(|v| v.metrics.iter().all(|m| m.window_count > 1)),
        "restored with their history: {verdicts:?}"
    );
    a_is_full(&mut client, &ids("a", 0..3), 12).await;
    process.terminate();
}
