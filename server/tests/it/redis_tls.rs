//! `rediss://` against a real `redis-server` that speaks only TLS (`--port 0
//! --tls-port`, certificates made with rcgen at test time, client certificates
//! required) and knows only an ACL user (the default user is off): snapshots are
//! written and restored through TLS as that user with the password from a file; a
//! server certificate from another CA is refused with a log line that says where to
//! look; the password shows up nowhere (logs, `--help`, errors).

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tidewatch_proto::v1::{AnalyzeRequest, Source};
use tidewatch_server::snapshot::{
    Store,
    target::{RedisSettings, RedisTarget},
};

use crate::common::{
    ServerProcess, TestServer,
    certs::{Ca, tempdir, write},
    one, run_ingest,
};

const USER: &str = "tidewatch";
const PASSWORD: &str = "s3cret-acl-password-7f1e";

/// A TLS-only `redis-server` with an ACL user, its files in `dir`.
struct TlsRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = tempdir("redis-tls");
        let ca = Ca::new("redis it ca");
        let (cert, key) = ca.leaf(&["localhost"], "redis");
        write(&dir, "ca.pem", &ca.pem);
        write(&dir, "redis.pem", &cert);
        write(&dir, "redis.key", &key);
        let (cert, key) = ca.leaf(&["tidewatch"], "tidewatch");
        write(&dir, "client.pem", &cert);
        write(&dir, "client.key", &key);
        write(&dir, "password", &format!("{PASSWORD}\n"));
        let other = Ca::new("some other ca");
        write(&dir, "other-ca.pem", &other.pem);
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &path("redis.pem")])
            .args(["--tls-key-file", &path("redis.key")])
            .args(["--tls-ca-cert-file", &path("ca.pem")])
            .args(["--tls-auth-clients", "yes"])
            .args(["--user", "default", "off"])
            // The rules docs/snapshots.md gives.
            .args(["--user", USER, "on", &format!(">{PASSWORD}")])
            .args(["~tidewatch:*", "~{tidewatch:*", "&tidewatch:*"])
            .args(["+@all", "-@admin", "-@dangerous"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let redis = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while redis.cli(&["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    /// `redis-cli` over TLS as the ACL user.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .current_dir(&self.dir)
            .args(["--tls", "--cacert", "ca.pem", "--cert", "client.pem"])
            .args(["--key", "client.key", "-h", "localhost"])
            .args([
                "-p",
                &self.port.to_string(),
                "--user",
                USER,
                "--pass",
                PASSWORD,
            ])
            .arg("--no-auth-warning")
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The URL: user in it, password not (it comes from the file).
    fn url(&self) -> String {
        format!("rediss://{USER}@localhost:{}", self.port)
    }

    /// The settings as a deployment gives them, with `ca` as `REDIS_CA_FILE`.
    fn settings(&self, ca: &str) -> RedisSettings {
        let mut settings = RedisSettings::url(&self.url());
        settings.ca_file = Some(self.file(ca));
        settings.client_cert = Some(self.file("client.pem"));
        settings.client_key = Some(self.file("client.key"));
        settings.password_file = Some(self.file("password"));
        settings
    }

    fn envs(&self, ca: &str) -> Vec<(&'static str, String)> {
        let path = |name: &str| self.file(name).to_str().unwrap().to_owned();
        vec![
            ("REDIS_URL", self.url()),
            ("REDIS_CA_FILE", path(ca)),
            ("REDIS_CLIENT_CERT", path("client.pem")),
            ("REDIS_CLIENT_KEY", path("client.key")),
            ("REDIS_PASSWORD_FILE", path("password")),
            ("SNAPSHOT_INTERVAL", "100ms".into()),
        ]
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_server(redis: &TlsRedis) -> TestServer {
    let settings = redis.settings("ca.pem");
    TestServer::start_with(move |c| {
        c.redis_url = Some(settings.url.expose().into());
        c.redis_ca_file = settings.ca_file;
        c.redis_client_cert = settings.client_cert;
        c.redis_client_key = settings.client_key;
        c.redis_password_file = settings.password_file;
        c.snapshot_interval = Duration::from_millis(100);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_through_tls_as_an_acl_user() {
    let redis = TlsRedis::start();
    let server = start_server(&redis).await;
    let (responses, status) = run_ingest(
        &mut server.client().await,
        (1..=6)
            .map(|seq| one("tls-dev", seq, &[("rps", 400.0 + seq as f64)]))
            .collect(),
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(responses.len(), 6);

    // Written through the flush's own TLS connections, read through redis-rs's.
    let store = Store::with_target(
        RedisTarget::load(&redis.settings("ca.pem")).unwrap(),
        2,
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = store
            .read(&["tls-dev".into()])
            .await
            .expect("read over TLS");
        if read[0].is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot written over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        redis
            .cli(&["EXISTS", "tidewatch:v1:device:tls-dev"])
            .contains('1')
    );
    server.stop().await.unwrap();

    // A new server restores the device from Redis, over TLS.
    let server = start_server(&redis).await;
    let analyzed = server
        .client()
        .await
        .analyze(AnalyzeRequest {
            device_id: "tls-dev".into(),
        })
        .await
        .expect("analyze")
        .into_inner();
    assert_eq!(analyzed.source(), Source::Snapshot);
    assert_eq!(analyzed.last_seq, 6);
    server.stop().await.unwrap();
}

/// A JSON log line that mentions `what`.
fn mentions(line: &serde_json::Value, what: &str) -> bool {
    line.to_string().contains(what)
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_says_so() {
    let redis = TlsRedis::start();
    let envs = redis.envs("other-ca.pem");
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = ServerProcess::spawn(&[], &envs);
    let refused = server.log.wait_for(
        |l| mentions(l, "redis TLS handshake failed") && mentions(l, "REDIS_CA_FILE"),
        Duration::from_secs(10),
    );
    let lines = server.log.lines();
    assert!(refused.is_some(), "{lines:#?}");
    let refused = refused.unwrap().to_string();
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("certificate"),
        "{refused}"
    );
    for line in server.startup_log.iter().chain(&lines) {
        assert!(!line.contains(PASSWORD), "the password was logged: {line}");
    }
    server.kill9();
}

#[test]
fn the_password_is_printed_nowhere() {
    let redis = TlsRedis::start();
    let url = format!("rediss://{USER}:{PASSWORD}@localhost:{}", redis.port);
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
            .env_clear()
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("REDIS_URL", &url)
            .envs(envs.iter().copied())
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let help = run(&["--help"], &[]);
    assert!(help.contains("REDIS_URL"), "{help}");
    assert!(!help.contains(PASSWORD), "{help}");
    // Invalid settings beside it: the error names the setting, not the URL's secret.
    let ca = redis.file("ca.pem");
    let errors = [
        run(&[], &[("REDIS_CLIENT_CERT", ca.to_str().unwrap())]),
        run(
            &[
                "--redis-url",
                &format!("redis://{USER}:{PASSWORD}@localhost:1"),
            ],
            &[("REDIS_CA_FILE", ca.to_str().unwrap())],
        ),
        run(&[], &[("REDIS_CA_FILE", "/nonexistent/ca.pem")]),
    ];
    for e in &errors {
        assert!(e.contains("REDIS_"), "{e}");
        assert!(!e.contains(PASSWORD), "{e}");
    }
    // A running server with the password in the URL and a wrong CA logs neither.
    let server = ServerProcess::spawn(
        &[],
        &[
            ("REDIS_URL", &url),
            (
                "REDIS_CA_FILE",
                redis.file("other-ca.pem").to_str().unwrap(),
            ),
            (
                "REDIS_CLIENT_CERT",
                redis.file("client.pem").to_str().unwrap(),
            ),
            (
                "REDIS_CLIENT_KEY",
                redis.file("client.key").to_str().unwrap(),
            ),
        ],
    );
    let shown = server.log.wait_for(
        |l| mentions(l, "redis TLS handshake failed"),
        Duration::from_secs(10),
    );
    assert!(shown.is_some(), "{:#?}", server.log.lines());
    let logged = server.startup_log.join("\n") + &server.log.lines().join("\n");
    assert!(
        logged.contains(&format!("rediss://{USER}:***@localhost")),
        "{logged}"
    );
    assert!(!logged.contains(PASSWORD), "{logged}");
    server.kill9();
}
