//! The TLS and token building blocks with real handshakes and real signatures: certificates made with rcgen at test time,
//! JWTs signed with a freshly generated P-256 key.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use futures::StreamExt as _;
use rcgen::KeyPair;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsConnector;

use tidewatch_server::security::{
    policy::{Scope, hash_key_hex},
    tls::{ReloadingTls, TlsFiles, handshakes, peer_identity, provider},
    tokens::{AuthError, Authenticator, TokenSettings},
};

use crate::common::certs::{Ca, tempdir, write};

fn client(ca_pem: &str, identity: Option<(String, String)>) -> TlsConnector {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Serves `tls` on a loopback port: each connection answers with the peer identity it
/// saw, then echoes bytes. Returns the address.
async fn serve(tls: Arc<ReloadingTls>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    });
    let mut conns = Box::pin(handshakes(accepted, tls, Duration::from_secs(2), 8));
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = conns.next().await {
            tokio::spawn(async move {
                let who = peer_identity(&conn)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                conn.write_all(format!("{who}\n").as_bytes()).await.unwrap();
                let mut buf = [0; 64];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn connect(
    addr: std::net::SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut line = Vec::new();
    let mut byte = [0; 1];
    loop {
        if tls.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok((tls, String::from_utf8(line).unwrap()))
}

fn server_cert_serial(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn mutual_tls_names_the_client_and_refuses_other_cas() {
    let dir = tempdir("security");
    let ca = Ca::new("tidewatch test ca");
    let (cert, key) = ca.leaf(&["localhost"], "server");
    let files = TlsFiles {
        cert: write(&dir, "tls.crt", &cert),
        key: write(&dir, "tls.key", &key),
        client_ca: Some(write(&dir, "ca.crt", &ca.pem)),
    };
    let tls = Arc::new(ReloadingTls::load(files, &[b"h2"]).unwrap());
    assert!(tls.mutual());
    let addr = serve(Arc::clone(&tls)).await;

    // URI SAN first, then DNS SAN, then CN.
    let by_uri = ca.leaf(&["gw-1.example", "spiffe://fleet-a/gw-1"], "cn-1");
    let (_, who) = connect(addr, &client(&ca.pem, Some(by_uri))).await.unwrap();
    assert_eq!(who, "spiffe://fleet-a/gw-1");
    let by_dns = ca.leaf(&["gw-2.example"], "cn-2");
    assert_eq!(
        connect(addr, &client(&ca.pem, Some(by_dns)))
            .await
            .unwrap()
            .1,
        "gw-2.example"
    );
    let by_cn = ca.leaf(&[], "gw-3");
    assert_eq!(
        connect(addr, &client(&ca.pem, Some(by_cn)))
            .await
            .unwrap()
            .1,
        "gw-3"
    );

    // No certificate, or one from another CA: the handshake fails.
    assert!(connect(addr, &client(&ca.pem, None)).await.is_err());
    let other = Ca::new("someone else");
    assert!(
        connect(addr, &client(&ca.pem, Some(other.leaf(&["x"], "x"))))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn certificates_swapped_on_disk_serve_new_handshakes_without_dropping_open_ones() {
    let dir = tempdir("security");
    let ca = Ca::new("tidewatch test ca");
    let (cert, key) = ca.leaf(&["localhost"], "first");
    let files = TlsFiles {
        cert: write(&dir, "tls.crt", &cert),
        key: write(&dir, "tls.key", &key),
        client_ca: None,
    };
    let tls = Arc::new(ReloadingTls::load(files, &[b"h2"]).unwrap());
    let addr = serve(Arc::clone(&tls)).await;
    let connector = client(&ca.pem, None);
    let (mut open, _) = connect(addr, &connector).await.unwrap();
    let first = server_cert_serial(&open);
    assert!(!tls.reload_if_changed().unwrap(), "nothing changed yet");

    let (cert, key) = ca.leaf(&["localhost"], "second");
    write(&dir, "tls.crt", &cert);
    write(&dir, "tls.key", &key);
    assert!(tls.reload_if_changed().unwrap());
    let (_, _) = connect(addr, &connector).await.unwrap();
    let (fresh, _) = connect(addr, &connector).await.unwrap();
    assert_ne!(
        server_cert_serial(&fresh),
        first,
        "new handshakes get the new certificate"
    );

    // The connection opened before the swap still carries data.
    open.write_all(b"ping").await.unwrap();
    let mut echo = [0; 4];
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");

    // A half-written rotation (a key that does not match) keeps the old config.
    let (_, other_key) = ca.leaf(&["localhost"], "third");
    write(&dir, "tls.key", &other_key);
    assert!(tls.reload_if_changed().is_err());
    assert!(connect(addr, &connector).await.is_ok());
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_other_handshakes() {
    let dir = tempdir("security");
    let ca = Ca::new("tidewatch test ca");
    let (cert, key) = ca.leaf(&["localhost"], "server");
    let files = TlsFiles {
        cert: write(&dir, "tls.crt", &cert),
        key: write(&dir, "tls.key", &key),
        client_ca: None,
    };
    let addr = serve(Arc::new(ReloadingTls::load(files, &[b"h2"]).unwrap())).await;
    let _silent: Vec<TcpStream> = futures::future::join_all(
        (0..4).map(|_| async { TcpStream::connect(addr).await.unwrap() }),
    )
    .await;
    let started = std::time::Instant::now();
    connect(addr, &client(&ca.pem, None)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A P-256 signing key as PEM and its public JWK set with `kid`.
fn es256_key(kid: &str) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed point");
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
    }]});
    (key.serialize_pem(), jwks.to_string())
}

fn jwt(key_pem: &str, kid: &str, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.into());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn jwts_are_verified_against_the_jwks_file() {
    let dir = tempdir("security");
    let (key, jwks) = es256_key("k1");
    let settings = TokenSettings {
        jwks: Some(write(&dir, "jwks.json", &jwks)),
        issuers: vec!["https://issuer.example".into()],
        audiences: vec!["tidewatch".into()],
        ..TokenSettings::default()
    };
    let auth = Authenticator::load(settings).unwrap();
    let good = serde_json::json!({
        "sub": "fleet-b", "iss": "https://issuer.example", "aud": "tidewatch",
        "exp": now() + 600, "nbf": now() - 10, "scope": "ingest watch", "devices": ["fleet-b/*"],
    });
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    let principal = auth
        .authenticate(Some(&bearer(&jwt(&key, "k1", good.clone()))), None)
        .unwrap();
    assert_eq!(&*principal.name, "fleet-b");
    assert!(principal.may_touch("fleet-b/7") && !principal.may_touch("fleet-a/7"));
    assert!(principal.require(Scope::Watch).is_ok());
    assert!(principal.require(Scope::Analyze).is_err());

    let mut cases = Vec::new();
    let mut expired = good.clone();
    expired["exp"] = (now() - 600).into();
    cases.push(("expired", jwt(&key, "k1", expired)));
    let mut early = good.clone();
    early["nbf"] = (now() + 600).into();
    cases.push(("not yet valid", jwt(&key, "k1", early)));
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = "someone-else".into();
    cases.push(("wrong audience", jwt(&key, "k1", wrong_aud)));
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = "https://evil.example".into();
    cases.push(("wrong issuer", jwt(&key, "k1", wrong_iss)));
    cases.push(("unknown kid", jwt(&key, "k2", good.clone())));
    let (other_key, _) = es256_key("k1");
    cases.push(("bad signature", jwt(&other_key, "k1", good.clone())));
    for (what, token) in cases {
        let e = auth.authenticate(Some(&bearer(&token)), None).unwrap_err();
        assert!(matches!(e, AuthError::InvalidJwt(_)), "{what}: {e:?}");
    }
}

#[test]
fn api_keys_rotate_when_the_policy_file_changes() {
    let dir = tempdir("security");
    let policy = |key: &str| {
        format!(
            r#"{{"principals": [{{"name": "fleet-a", "scopes": ["ingest"], "devices": ["fleet-a/*"],
                "api_keys_sha256": ["{}"]}}]}}"#,
            hash_key_hex(key)
        )
    };
    let path = write(&dir, "policy.json", &policy("key-one-0123456789abcdef"));
    let auth = Authenticator::load(TokenSettings {
        policy: Some(path.clone()),
        ..TokenSettings::default()
    })
    .unwrap();
    let one = b"Bearer key-one-0123456789abcdef".as_slice();
    let two = b"Bearer key-two-0123456789abcdef".as_slice();
    assert_eq!(
        &*auth.authenticate(Some(one), None).unwrap().name,
        "fleet-a"
    );
    assert_eq!(
        auth.authenticate(Some(two), None),
        Err(AuthError::UnknownKey)
    );
    assert_eq!(auth.authenticate(None, None), Err(AuthError::Missing));
    assert_eq!(
        auth.authenticate(Some(b"Basic x"), None),
        Err(AuthError::Malformed)
    );

    std::fs::write(&path, policy("key-two-0123456789abcdef")).unwrap();
    assert!(auth.reload_if_changed().unwrap());
    assert_eq!(
        auth.authenticate(Some(one), None),
        Err(AuthError::UnknownKey),
        "revoked"
    );
    assert!(auth.authenticate(Some(two), None).is_ok());

    // A broken file keeps the keys in force.
    std::fs::write(&path, "{").unwrap();
    assert!(auth.reload_if_changed().is_err());
    assert!(auth.authenticate(Some(two), None).is_ok());

    // A client certificate identity names a policy entry.
    assert_eq!(
        &*auth.authenticate(None, Some("fleet-a")).unwrap().name,
        "fleet-a"
    );
    assert_eq!(
        auth.authenticate(None, Some("fleet-z")),
        Err(AuthError::UnknownCertificate("fleet-z".into()))
    );
}
