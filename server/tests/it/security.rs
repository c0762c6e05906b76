//! TLS and authentication end to end: the real server with TLS, mutual TLS and a
//! policy file, driven by a tonic client over real handshakes and by curl.

use std::{path::PathBuf, process::Command, time::Duration};

use tidewatch_proto::v1::{
    AnalyzeRequest, IngestRequest, WatchAnomaliesRequest,
    telemetry_service_client::TelemetryServiceClient,
};
use tidewatch_server::security::policy::hash_key_hex;
use tokio_stream::StreamExt as _;
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::common::{
    ServerProcess, TestServer,
    certs::{Ca, tempdir, write},
    sample,
};

const KEY_A: &str = "tw-test-key-tenant-a-0123456789abcdef";
const KEY_B: &str = "tw-test-key-tenant-b-0123456789abcdef";
const KEY_SLOW: &str = "tw-test-key-slow-tenant-0123456789abc";

/// A server with TLS (client certificates optional is not a mode: with a client CA
/// they are required, so the fixture has two servers' worth of files), a policy with
/// tenants a and b, a certificate principal, and a rate-limited tenant.
struct Fixture {
    dir: PathBuf,
    ca: Ca,
    server: TestServer,
}

fn policy() -> String {
    format!(
        r#"{{"principals": [
            {{"name": "tenant-a", "scopes": ["ingest", "analyze", "watch"], "devices": ["a/*"],
              "api_keys_sha256": ["{}"]}},
            {{"name": "tenant-b", "scopes": ["ingest", "analyze", "watch"], "devices": ["b/*"],
              "api_keys_sha256": ["{}"]}},
            {{"name": "slow", "scopes": ["ingest"], "devices": ["s/*"],
              "api_keys_sha256": ["{}"],
              "quota": {{"samples_per_second": 1, "burst": 3, "streams": 1}}}},
            {{"name": "spiffe://fleet-c/gw-1", "scopes": ["ingest", "analyze"], "devices": ["c/*"]}}
        ]}}"#,
        hash_key_hex(KEY_A),
        hash_key_hex(KEY_B),
        hash_key_hex(KEY_SLOW)
    )
}

impl Fixture {
    async fn start(mutual: bool) -> Self {
        let dir = tempdir("security-it");
        let ca = Ca::new("tidewatch it ca");
        let (cert, key) = ca.leaf(&["localhost"], "tidewatch");
        let cert = write(&dir, "tls.crt", &cert);
        let key = write(&dir, "tls.key", &key);
        let client_ca = mutual.then(|| write(&dir, "ca.crt", &ca.pem));
        let policy = write(&dir, "policy.json", &policy());
        let server = TestServer::start_with(|c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.tls_client_ca = client_ca;
            c.auth_policy = Some(policy);
            c.credentials_reload_interval = Duration::from_millis(100);
        })
        .await;
        Self { dir, ca, server }
    }

    async fn client(
        &self,
        identity: Option<(String, String)>,
    ) -> Result<TelemetryServiceClient<Channel>, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca.pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Channel::from_shared(format!("https://{}", self.server.grpc_addr))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(TelemetryServiceClient::new(channel))
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn one_message(
    samples: Vec<tidewatch_proto::v1::Sample>,
) -> impl tokio_stream::Stream<Item = IngestRequest> {
    tokio_stream::iter([IngestRequest {
        samples,
        ..IngestRequest::default()
    }])
}

#[tokio::test]
async fn tokens_decide_who_may_ingest_analyze_and_watch_what() {
    let f = Fixture::start(false).await;
    let mut client = f.client(None).await.unwrap();

    // No token, a wrong token: UNAUTHENTICATED on every method.
    for token in [None, Some("not-a-key")] {
        let e = client
            .analyze(with_token(
                AnalyzeRequest {
                    device_id: "a/1".into(),
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
        let e = client
            .ingest(with_token(
                one_message(vec![sample("a/1", 1, &[("t", 1.0)])]),
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
    }

    // Tenant a watches everything it may see, then both tenants ingest spikes.
    let mut watch = client
        .watch_anomalies(with_token(WatchAnomaliesRequest::default(), Some(KEY_A)))
        .await
        .unwrap()
        .into_inner();
    let series = |device: &str, spike: f64| -> Vec<_> {
        (1..=8)
            .map(|seq| {
                sample(
                    device,
                    seq,
                    &[(
                        "t",
                        if seq == 8 {
                            spike
                        } else {
                            10.0 + (seq % 2) as f64
                        },
                    )],
                )
            })
            .collect()
    };
    let mut mixed = series("a/1", 900.0);
    mixed.push(sample("b/1", 1, &[("t", 1.0)]));
    let mut verdicts = client
        .ingest(with_token(one_message(mixed), Some(KEY_A)))
        .await
        .unwrap()
        .into_inner();
    let response = verdicts.next().await.unwrap().unwrap();
    assert_eq!(response.verdicts.len(), 9);
    assert!(response.verdicts[..8].iter().all(|v| v.error.is_empty()));
    assert!(
        response.verdicts[8]
            .error
            .starts_with("permission_denied: device \"b/1\""),
        "{:?}",
        response.verdicts[8]
    );
    let mut b = client
        .ingest(with_token(one_message(series("b/2", 5000.0)), Some(KEY_B)))
        .await
        .unwrap()
        .into_inner();
    assert!(b.next().await.unwrap().unwrap().verdicts[7].anomaly);
    assert!(
        !f.server.state.engine.contains("b/1"),
        "refused samples leave no trace"
    );

    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.verdict.unwrap().device_id, "a/1");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.next())
            .await
            .is_err(),
        "tenant a must not see b/2's anomaly"
    );

    // Analyze and watch of another tenant's device: PERMISSION_DENIED, existing or not.
    for device in ["b/2", "b/never"] {
        let e = client
            .analyze(with_token(
                AnalyzeRequest {
                    device_id: device.into(),
                },
                Some(KEY_A),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{device}");
    }
    let e = client
        .watch_anomalies(with_token(
            WatchAnomaliesRequest {
                device_ids: vec!["b/2".into()],
                ..Default::default()
            },
            Some(KEY_A),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let own = client
        .analyze(with_token(
            AnalyzeRequest {
                device_id: "b/2".into(),
            },
            Some(KEY_B),
        ))
        .await
        .unwrap();
    assert_eq!(own.into_inner().device_id, "b/2");
}

#[tokio::test]
async fn a_rate_limited_tenant_is_pushed_back_and_nobody_else_notices() {
    let f = Fixture::start(false).await;
    let mut client = f.client(None).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut verdicts = client
        .ingest(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(KEY_SLOW),
        ))
        .await
        .unwrap()
        .into_inner();
    let message = |seq: u64, n: u64| IngestRequest {
        samples: (0..n)
            .map(|i| sample("s/1", seq * 10 + i, &[("t", 1.0)]))
            .collect(),
        ..IngestRequest::default()
    };
    tx.send(message(1, 3)).await.unwrap();
    assert_eq!(verdicts.next().await.unwrap().unwrap().verdicts.len(), 3);
    // A second stream is over the principal's stream quota.
    let e = client
        .ingest(with_token(
            one_message(vec![sample("s/2", 1, &[("t", 1.0)])]),
            Some(KEY_SLOW),
        ))
        .await;
    let e = match e {
        Err(e) => e,
        Ok(response) => response.into_inner().next().await.unwrap().unwrap_err(),
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // The bucket is empty: the stream ends with RESOURCE_EXHAUSTED and a pushback.
    tx.send(message(2, 2)).await.unwrap();
    let e = verdicts.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let pushback: u64 = e
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2000).contains(&pushback), "{pushback}");
    // Tenant a is not limited meanwhile.
    let mut a = client
        .ingest(with_token(
            one_message((1..=50).map(|s| sample("a/9", s, &[("t", 1.0)])).collect()),
            Some(KEY_A),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.next().await.unwrap().unwrap().verdicts.len(), 50);
}

#[tokio::test]
async fn client_certificates_name_principals_and_other_cas_are_refused() {
    let f = Fixture::start(true).await;
    let mut client = f
        .client(Some(f.ca.leaf(&["spiffe://fleet-c/gw-1"], "gw-1")))
        .await
        .unwrap();
    let mut verdicts = client
        .ingest(Request::new(one_message(vec![
            sample("c/1", 1, &[("t", 1.0)]),
            sample("a/1", 1, &[("t", 1.0)]),
        ])))
        .await
        .unwrap()
        .into_inner();
    let response = verdicts.next().await.unwrap().unwrap();
    assert!(response.verdicts[0].error.is_empty());
    assert!(response.verdicts[1].error.starts_with("permission_denied"));
    // A certificate the policy does not name: UNAUTHENTICATED.
    let mut stranger = f
        .client(Some(f.ca.leaf(&["gw-9.example"], "gw-9")))
        .await
        .unwrap();
    let e = stranger
        .analyze(Request::new(AnalyzeRequest {
            device_id: "c/1".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A certificate from another CA, or none: no connection at all.
    let other = Ca::new("someone else");
    let refused = match f
        .client(Some(other.leaf(&["spiffe://fleet-c/gw-1"], "x")))
        .await
    {
        Err(_) => true,
        Ok(mut c) => c
            .analyze(Request::new(AnalyzeRequest {
                device_id: "c/1".into(),
            }))
            .await
            .is_err_and(|e| e.code() == Code::Unavailable || e.code() == Code::Unknown),
    };
    assert!(refused);
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_leaves_open_streams_running() {
    let f = Fixture::start(false).await;
    let mut client = f.client(None).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut verdicts = client
        .ingest(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(KEY_A),
        ))
        .await
        .unwrap()
        .into_inner();
    let send = |seq: u64| IngestRequest {
        samples: vec![sample("a/rot", seq, &[("t", 1.0)])],
        ..IngestRequest::default()
    };
    tx.send(send(1)).await.unwrap();
    assert!(verdicts.next().await.unwrap().is_ok());

    // Rotate to a certificate of a new CA: new connections must trust the new CA.
    let new_ca = Ca::new("rotated ca");
    let (cert, key) = new_ca.leaf(&["localhost"], "tidewatch");
    write(&f.dir, "tls.key", &key);
    write(&f.dir, "tls.crt", &cert);
    let mut connected = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let channel = Channel::from_shared(format!("https://{}", f.server.grpc_addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&new_ca.pem))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await;
        if channel.is_ok() {
            connected = true;
            break;
        }
    }
    assert!(
        connected,
        "the server never presented the rotated certificate"
    );
    // The stream opened under the old certificate goes on.
    tx.send(send(2)).await.unwrap();
    let response = verdicts.next().await.unwrap().unwrap();
    assert_eq!(response.verdicts[0].seq, 2);
}

/// curl blocks its thread: the server runs on the runtime's other workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_tls_with_a_bearer_token() {
    let f = Fixture::start(false).await;
    let ca = write(&f.dir, "ca.pem", &f.ca.pem);
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "-m", "10", "--cacert"])
            .arg(&ca)
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    };
    let url = |path: &str| format!("https://localhost:{}{path}", f.server.http_addr.port());
    let ingest = url("/ingest");
    let body = r#"{"device_id": "a/curl", "t": 1.5}"#;
    let bearer = format!("authorization: Bearer {KEY_A}");
    let (code, text) = curl(&[
        "-H",
        &bearer,
        "-H",
        "content-type: application/json",
        "-d",
        body,
        &ingest,
    ]);
    assert_eq!(code, "200", "{text}");
    let (code, text) = curl(&["-H", "content-type: application/json", "-d", body, &ingest]);
    assert_eq!(code, "401", "{text}");
    assert!(text.contains("\"code\":\"unauthenticated\""), "{text}");
    let (code, text) = curl(&["-H", &bearer, &url("/analyze?device_id=b/1")]);
    assert_eq!(code, "403", "{text}");
    // Probes and metrics need no token.
    assert_eq!(curl(&[&url("/healthz")]).0, "200");
    assert_eq!(curl(&[&url("/metrics")]).0, "200");
    // Plain HTTP to the TLS port gets nowhere.
    let plain = Command::new("curl")
        .args(["-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "http://127.0.0.1:{}/healthz",
            f.server.http_addr.port()
        ))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}

#[test]
fn a_public_address_without_tls_and_auth_refuses_to_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .env_clear()
        .env("GRPC_ADDR", "0.0.0.0:0")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TLS_CERT") && stderr.contains("ALLOW_INSECURE"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // The explicit switch starts it, with a warning at every start.
    let server = ServerProcess::spawn(
        &[],
        &[("GRPC_ADDR", "0.0.0.0:0"), ("ALLOW_INSECURE", "true")],
    );
    assert!(
        server
            .startup_log
            .iter()
            .any(|line| line.contains("ALLOW_INSECURE") && line.contains("WARN")),
        "{:?}",
        server.startup_log
    );
    server.kill9();
}
