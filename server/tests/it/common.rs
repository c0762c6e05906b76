//! Helpers shared by the integration tests: the real server in-process on
//! `127.0.0.1:0`, the real `tidewatch` binary as a child process, and gRPC clients.

#![allow(unreachable_pub)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use tidewatch_proto::v1::{
    IngestRequest, Sample, Verdict, telemetry_service_client::TelemetryServiceClient,
};
use tidewatch_server::{AppState, Server, config::Config};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The real server, in this process, on free ports.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// Starts a server with the test defaults.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server with the test defaults changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_tests();
        configure(&mut config);
        let server = Server::bind(config).await.expect("bind");
        let grpc_addr = server.grpc_addr();
        let http_addr = server.http_addr();
        let state = server.state();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self {
            grpc_addr,
            http_addr,
            state,
            shutdown: Some(tx),
            task,
        }
    }

    /// The gRPC endpoint URL.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// A connected client.
    pub async fn client(&self) -> TelemetryServiceClient<Channel> {
        TelemetryServiceClient::connect(self.grpc_url())
            .await
            .expect("connect")
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down gracefully and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.task.await.expect("server task")
    }
}

/// The real `tidewatch` binary as a child process, logging JSON so the test can read
/// the addresses it bound.
pub struct ServerProcess {
    pub child: Child,
    pub grpc_addr: SocketAddr,
    /// Every log line the server printed up to "grpc listening".
    pub startup_log: Vec<String>,
    /// Every log line the server printed after "grpc listening", as it arrives.
    pub log: LogLines,
}

impl ServerProcess {
    /// Starts the binary with `args` and `envs` on free ports unless they say otherwise.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tidewatch"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn tidewatch");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut startup_log = Vec::new();
        // The gateway binds first: "http listening", with its address, comes before
        // "grpc listening".
        let mut http_listening = false;
        let grpc_addr = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("read log");
            startup_log.push(line.clone());
            let value: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if value["message"] == "http listening" {
                http_listening = value["http_addr"]
                    .as_str()
                    .is_some_and(|a| a.parse::<SocketAddr>().is_ok());
            }
            if value["message"] == "grpc listening" {
                break value["grpc_addr"]
                    .as_str()
                    .expect("grpc_addr field")
                    .parse()
                    .expect("socket address");
            }
        };
        assert!(
            http_listening,
            "\"http listening\" logged before \"grpc listening\""
        );
        // Keep draining stdout so the server never blocks on a full pipe.
        let log = LogLines::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.by_ref().map_while(Result::ok) {
                sink.push(line);
            }
        });
        Self {
            child,
            grpc_addr,
            startup_log,
            log,
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every log line so far (startup and later) parsed as JSON.
    pub fn json_log(&self) -> Vec<serde_json::Value> {
        self.startup_log
            .iter()
            .cloned()
            .chain(self.log.lines())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// SIGKILL: a crash.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident set size of the server process in bytes (from /proc).
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Connects to a gRPC URL, retrying briefly while the server comes up.
pub async fn connect(url: &str) -> TelemetryServiceClient<Channel> {
    let mut last = None;
    for _ in 0..50 {
        match TelemetryServiceClient::connect(url.to_string()).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot connect to {url}: {last:?}");
}

/// A sample of one device with the given metrics.
pub fn sample(device: &str, seq: u64, metrics: &[(&str, f64)]) -> Sample {
    Sample {
        device_id: device.to_string(),
        time: None,
        metrics: metrics
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
        seq,
    }
}

/// A request with one sample.
pub fn one(device: &str, seq: u64, metrics: &[(&str, f64)]) -> IngestRequest {
    IngestRequest {
        samples: vec![sample(device, seq, metrics)],
        ..IngestRequest::default()
    }
}

/// Log lines of a child process, collected by a reader thread.
#[derive(Clone, Default)]
pub struct LogLines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl LogLines {
    fn push(&self, line: String) {
        let (lines, changed) = &*self.0;
        lines.lock().expect("log lock").push(line);
        changed.notify_all();
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().expect("log lock").clone()
    }

    /// Waits up to `timeout` for a JSON line for which `predicate` holds.
    pub fn wait_for(
        &self,
        predicate: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.0;
        let mut guard = lines.lock().expect("log lock");
        loop {
            let found = guard
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| predicate(v));
            if found.is_some() {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = changed.wait_timeout(guard, left).expect("log lock").0;
        }
    }
}

/// The value of a gauge or counter (summed over its label sets) in the server's
/// Prometheus exposition (counters carry the `_total` suffix there). Panics when the
/// exposition has no such metric, so a renamed metric fails loudly.
pub fn metric_total(state: &AppState, name: &str) -> f64 {
    let text = state.metrics.render();
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    assert!(!values.is_empty(), "no metric {name} in:\n{text}");
    values.iter().sum()
}

/// Polls `condition` every few milliseconds until it holds; panics naming `what`
/// after `timeout`. For readiness signals that have no notification.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A plain channel to `url`, for the generated clients without `connect` (health,
/// reflection).
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// A channel to `url` with a small HTTP/2 receive window, for clients that want the
/// server to feel backpressure early (a watcher or reader that does not read).
pub async fn small_window_channel(url: &str, window: u32) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("endpoint")
        .initial_stream_window_size(Some(window))
        .initial_connection_window_size(Some(window))
        .connect()
        .await
        .expect("connect")
}

/// The grpcurl the tests drive: `.venv/bin/grpcurl` of the workspace, else the one on
/// `PATH`. Panics (the test fails, it is not skipped) when there is none.
pub fn grpcurl() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/grpcurl");
    if venv.is_file() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "grpcurl not found at {} nor on PATH: run .ci/run, or \
             python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-dev.txt",
            venv.display()
        )
    })
}

/// Opens an Ingest stream that sends `requests`, then reads every response and the
/// final status (`None` when the stream ended with OK).
pub async fn run_ingest(
    client: &mut TelemetryServiceClient<Channel>,
    requests: Vec<IngestRequest>,
) -> (
    Vec<tidewatch_proto::v1::IngestResponse>,
    Option<tonic::Status>,
) {
    let mut stream = client
        .ingest(tokio_stream::iter(requests))
        .await
        .expect("ingest")
        .into_inner();
    drain(&mut stream).await
}

/// Sends `requests` on one Ingest stream, which must end with OK; every verdict, in
/// order.
pub async fn verdicts_of(
    client: &mut TelemetryServiceClient<Channel>,
    requests: Vec<IngestRequest>,
) -> Vec<Verdict> {
    let (responses, status) = run_ingest(client, requests).await;
    assert!(status.is_none(), "{status:?}");
    responses.into_iter().flat_map(|r| r.verdicts).collect()
}

/// Reads a whole response stream: every message, then the final status (`None` when
/// the stream ended with OK).
pub async fn drain<T>(stream: &mut tonic::Streaming<T>) -> (Vec<T>, Option<tonic::Status>) {
    let mut items = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return (items, None),
            Err(status) => return (items, Some(status)),
        }
    }
}
/// One HTTP response, read whole.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl HttpAnswer {
    /// The body as JSON (panics with the body text when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: body is not JSON: {}", self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the gateway's error body `{"error":{"code","message"}}` with `status`
    /// and `code`, and returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "body: {body}");
        let message = body["error"]["message"].as_str().expect("error.message");
        assert!(!message.is_empty());
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "only \"error\": {body}"
        );
        message.to_string()
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and reads the whole answer.
pub async fn http_send<B>(addr: SocketAddr, request: http::Request<B>) -> HttpAnswer
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("http handshake");
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    parts
        .headers
        .entry(http::header::HOST)
        .or_insert_with(|| addr.to_string().parse().expect("host header"));
    let response = sender
        .send_request(http::Request::from_parts(parts, body))
        .await
        .expect("http request");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("http body").to_bytes();
    HttpAnswer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// `GET path`.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpAnswer {
    let request = http::Request::get(path)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    http_send(addr, request).await
}

/// `POST path` with a body of `content_type` (none when `None`, like `curl -d` without
/// a header sends a form type; the gateway treats anything but NDJSON as JSON).
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<bytes::Bytes>,
) -> HttpAnswer {
    let mut request = http::Request::post(path);
    if let Some(content_type) = content_type {
        request = request.header(http::header::CONTENT_TYPE, content_type);
    }
    let request = request
        .body(http_body_util::Full::new(body.into()))
        .expect("request");
    http_send(addr, request).await
}

/// `POST /ingest` with a JSON body.
pub async fn ingest_json(addr: SocketAddr, body: &str) -> HttpAnswer {
    http_post(addr, "/ingest", Some("application/json"), body.to_string()).await
}

/// A request body fed chunk by chunk by the test, for slow uploads.
pub type ChannelBody = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >,
>;

/// A body the test writes to through the returned sender; dropping the sender ends it.
pub fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>,
    ChannelBody,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    (
        tx,
        http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

/// The value of an unlabelled-or-labelled sample line of a Prometheus exposition:
/// the first line starting with `name` whose labels include every `labels` pair.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let (label_part, value) = rest.rsplit_once(' ')?;
        labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}
pub mod certs;
pub mod redis_cluster;
pub mod redis_server;
