//! Helpers shared by the SDK's integration tests: the real server in-process, the real
//! `tidewatch` binary as a child process (for kill -9 and restart on the same port),
//! and a TCP proxy that can hold back responses and reset connections.
//! Each test binary uses a different subset, hence the `dead_code` allowance.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
};

use tidewatch_server::{AppState, Server, config::Config};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// The real server, in this process.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// A server with the test defaults changed by `configure` (port 0 unless set).
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_tests();
        configure(&mut config);
        let server = Server::bind(config).await.expect("bind");
        let grpc_addr = server.grpc_addr();
        let state = server.state();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self {
            grpc_addr,
            state,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Graceful shutdown: streams answer what they received, then end with UNAVAILABLE.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .expect("server task")
            .expect("clean shutdown");
    }
}

/// The `tidewatch` binary of the workspace, built for this test profile first (a no-op
/// when it is up to date), so a test never runs a stale server.
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory")
        .to_path_buf();
    let binary = profile_dir.join("tidewatch");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(&workspace).args([
        "build",
        "--quiet",
        "-p",
        "tidewatch-server",
        "--bin",
        "tidewatch",
    ]);
    if release {
        build.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target_dir);
    }
    let status = build.status().expect("run cargo build for the server");
    assert!(status.success(), "cargo build -p tidewatch-server failed");
    assert!(binary.exists(), "{} not built", binary.display());
    binary
}

/// The real `tidewatch` binary as a child process, logging JSON so the test can read
/// the address it bound.
pub struct ServerProcess {
    pub child: Child,
    pub grpc_addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on `grpc_addr` (port 0 picks one) with extra environment.
    pub fn spawn(binary: &PathBuf, grpc_addr: &str, envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GRPC_ADDR", grpc_addr)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn tidewatch");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let grpc_addr = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("read log");
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let message = value["message"]
                .as_str()
                .or_else(|| value["fields"]["message"].as_str());
            if message == Some("grpc listening") {
                let addr = value["grpc_addr"]
                    .as_str()
                    .or_else(|| value["fields"]["grpc_addr"].as_str())
                    .expect("grpc_addr field");
                break addr.parse().expect("socket address");
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self { child, grpc_addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// SIGKILL: a crash, no drain.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP proxy in front of a server: it can hold back the server → client direction
/// (responses pile up in socket buffers) and reset every open connection, as a flaky
/// network does.
pub struct Proxy {
    pub addr: SocketAddr,
    /// True while responses are held back.
    hold: watch::Sender<bool>,
    /// Bumped to cut every connection open at that moment.
    cut: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (hold, _) = watch::channel(false);
        let (cut, _) = watch::channel(0u64);
        let cut_tx = cut.clone();
        let hold_tx = hold.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let mut hold = hold_tx.subscribe();
                let mut cut = cut_tx.subscribe();
                cut.mark_unchanged();
                let generation = *cut.borrow();
                let cut_check = cut.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    };
                    let downstream = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Checked after the read, so nothing read once the hold is
                            // on gets through before it is lifted (or the cut drops it).
                            if hold.wait_for(|held| !held).await.is_err() {
                                break;
                            }
                            // Released by a cut: what was held is dropped, not sent.
                            if *cut_check.borrow() != generation {
                                break;
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    // Either direction ending or a cut drops all four halves: the
                    // client sees a reset connection.
                    tokio::select! {
                        () = upstream => {}
                        () = downstream => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            hold,
            cut,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding responses (requests still flow).
    pub fn hold_responses(&self) {
        self.hold.send_replace(true);
    }

    /// Drops every open connection (what is held back is lost) and forwards again.
    pub fn cut_connections(&self) {
        self.cut.send_modify(|n| *n += 1);
        self.hold.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
