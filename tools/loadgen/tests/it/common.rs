//! Helpers shared by the modules of this test binary: the real server in-process and a
//! directory for reports.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tidewatch_server::{AppState, Server, config::Config};
use tokio::{sync::oneshot, task::JoinHandle};

/// The real server, in this process.
pub(crate) struct TestServer {
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// A server with the test defaults changed by `configure` (port 0 unless set).
    pub(crate) async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
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

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The value of the Prometheus counter `name` for gRPC, summed over its series.
    pub(crate) fn grpc_counter(&self, name: &str) -> u64 {
        let prefix = format!("{name}{{");
        self.state
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("transport=\"grpc\""))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .expect("counter value") as u64
            })
            .sum()
    }

    /// Graceful shutdown: streams answer what they received, then end with UNAVAILABLE.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .expect("server task")
            .expect("clean shutdown");
    }
}

/// A fresh directory under the target directory for one test's files.
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("loadgen-test")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create test directory");
    dir
}
