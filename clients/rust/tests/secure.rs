//! The SDK against the real `tidewatch` binary with TLS and authentication on:
//! certificates made at test time (a CA, a server leaf for `localhost`, a client leaf
//! whose URI SAN names a policy entry), API keys from a policy file, and the calls a
//! tenant may and may not make.

mod common;

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use common::{ServerProcess, server_binary};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tidewatch_client::{
    Client, ClientConfig, Error, SampleExt,
    auth::{Token, tls_from_pem},
    sample,
};
use tidewatch_server::security::policy::hash_key_hex;
use tonic::Code;

const KEY: &str = "tw_test_fleet_a_5f0c2b8e9d174a3b8c61e2f4a7d9b013";
const CLIENT_IDENTITY: &str = "spiffe://tidewatch.test/device/fleet-a-7";

/// A CA that signs leaf certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `san` (a URI when it contains "://", else a DNS name): (cert, key) PEM.
    fn leaf(&self, san: &str) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names.push(if san.contains("://") {
            SanType::URI(san.to_string().try_into().unwrap())
        } else {
            SanType::DnsName(san.to_string().try_into().unwrap())
        });
        params.distinguished_name.push(DnType::CommonName, san);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tidewatch-client-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, content: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server with TLS (and mutual TLS when `mutual`) and the policy on; returns the
/// process, the CA that signed everything, and the files' directory.
fn secure_server(mutual: bool) -> (ServerProcess, Ca, TempDir) {
    let dir = TempDir::new("secure");
    let ca = Ca::new("tidewatch test ca");
    let (cert, key) = ca.leaf("localhost");
    let policy = serde_json::json!({"principals": [
        {"name": "fleet-a", "scopes": ["ingest", "analyze", "watch"],
         "devices": ["fleet-a/*"], "api_keys_sha256": [hash_key_hex(KEY)]},
        {"name": CLIENT_IDENTITY, "scopes": ["ingest", "analyze"],
         "devices": ["fleet-a/*"]},
    ]});
    let cert = dir.write("server.pem", &cert);
    let key = dir.write("server.key", &key);
    let policy = dir.write("policy.json", &policy.to_string());
    let ca_file = dir.write("ca.pem", &ca.pem);
    let mut envs = vec![
        ("TLS_CERT", cert.as_str()),
        ("TLS_KEY", key.as_str()),
        ("AUTH_POLICY", policy.as_str()),
    ];
    if mutual {
        envs.push(("TLS_CLIENT_CA", ca_file.as_str()));
    }
    let server = ServerProcess::spawn(&server_binary(), "127.0.0.1:0", &envs);
    (server, ca, dir)
}

fn config(server: &ServerProcess, ca: &Ca, token: Option<Token>) -> ClientConfig {
    let mut config = ClientConfig::new(format!("https://localhost:{}", server.grpc_addr.port()));
    config.tls = Some(tls_from_pem(&ca.pem, None::<(String, String)>));
    config.token = token;
    config
}

fn code(result: Result<impl std::fmt::Debug, Error>) -> Code {
    result
        .expect_err("the call must be refused")
        .code()
        .expect("a status")
}

#[tokio::test]
async fn api_key_over_tls_ingests_and_analyzes_its_own_devices() {
    let (server, ca, _dir) = secure_server(false);
    let client = Client::connect_with(config(&server, &ca, Some(Token::fixed(KEY))))
        .await
        .expect("TLS handshake against the test CA");

    let mut session = client.ingest();
    for value in [1.0, 2.0, 3.0] {
        session
            .send(sample("fleet-a/pump-1").metric("rps", value))
            .await
            .unwrap();
    }
    session.close_input();
    let mut answered = 0;
    while let Some(item) = session.next().await {
        item.expect("verdict");
        answered += 1;
    }
    assert_eq!(answered, 3);
    let stats = client.analyze("fleet-a/pump-1").await.expect("analyze");
    assert_eq!(stats.metrics.len(), 1);

    // Outside the namespace: refused, whether or not the device exists.
    assert_eq!(
        code(client.analyze("fleet-b/pump-1").await),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthenticated() {
    let (server, ca, _dir) = secure_server(false);
    let wrong = Client::connect_with(config(&server, &ca, Some(Token::fixed("not-the-key"))))
        .await
        .unwrap();
    assert_eq!(
        code(wrong.analyze("fleet-a/pump-1").await),
        Code::Unauthenticated
    );

    let mut session = wrong.ingest();
    session
        .send(sample("fleet-a/pump-1").metric("rps", 1.0))
        .await
        .unwrap();
    session.close_input();
    let error = session
        .next()
        .await
        .expect("the session reports the refusal")
        .expect_err("ingest with a wrong token is refused");
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("Unauthenticated"), "{error}");

    let none = Client::connect_with(config(&server, &ca, None))
        .await
        .unwrap();
    assert_eq!(
        code(none.analyze("fleet-a/pump-1").await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn a_refreshing_token_is_read_when_each_call_opens() {
    let (server, ca, _dir) = secure_server(false);
    let current = Arc::new(RwLock::new("expired-token".to_string()));
    let source = Arc::clone(&current);
    let token = Token::refreshing(move || source.read().unwrap().clone());
    let client = Client::connect_with(config(&server, &ca, Some(token)))
        .await
        .unwrap();
    assert_eq!(
        code(client.analyze("fleet-a/none").await),
        Code::Unauthenticated
    );
    *current.write().unwrap() = KEY.to_string();
    // Authenticated now: the device is simply unknown.
    assert!(matches!(
        client.analyze("fleet-a/none").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn mutual_tls_identity_names_the_policy_entry() {
    let (server, ca, _dir) = secure_server(true);
    let (cert, key) = ca.leaf(CLIENT_IDENTITY);
    let mut with_cert = config(&server, &ca, None);
    with_cert.tls = Some(tls_from_pem(&ca.pem, Some((cert, key))));
    let client = Client::connect_with(with_cert).await.expect("mutual TLS");
    assert!(matches!(
        client.analyze("fleet-a/none").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        code(client.analyze("fleet-b/none").await),
        Code::PermissionDenied
    );

    // A certificate from another CA fails the handshake.
    let other = Ca::new("someone else");
    let (cert, key) = other.leaf(CLIENT_IDENTITY);
    let mut foreign = config(&server, &ca, None);
    foreign.tls = Some(tls_from_pem(&ca.pem, Some((cert, key))));
    // With TLS 1.3 the client may finish its side of the handshake before the server
    // rejects the certificate, so the refusal shows at connect or at the first call.
    match Client::connect_with(foreign).await {
        Err(Error::Connect { .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(client) => {
            let refused = code(client.analyze("fleet-a/none").await);
            assert!(
                matches!(refused, Code::Unavailable | Code::Unknown),
                "{refused:?}"
            );
        }
    }
}
