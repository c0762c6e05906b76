//! A real `redis-server` for a test: spawned on a free port without persistence,
//! killed (and restartable on the same port) by the test.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;
use tidewatch_server::{
    engine::DeviceState,
    snapshot::{codec, store},
};

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// Starts a Redis on a free port and waits until it answers PING.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = Self { child: None, port };
        server.restart();
        server
    }

    /// The process id of the running `redis-server`.
    #[allow(
        dead_code,
        reason = "`benches/snapshot.rs` includes this file and reads the CPU time of the process"
    )]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis is gone, mid-whatever.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Redis (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.port, &[]));
    }

    /// A client connection.
    pub async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// The raw snapshot value of a device.
    pub async fn raw(&self, device_id: &str) -> Option<Vec<u8>> {
        let mut conn = self.connection().await;
        redis::cmd("GET")
            .arg(store::key(device_id))
            .query_async(&mut conn)
            .await
            .expect("GET")
    }

    /// The decoded snapshot of a device.
    pub async fn snapshot(&self, device_id: &str) -> Option<DeviceState> {
        let raw = self.raw(device_id).await?;
        Some(codec::decode_value(&raw, device_id).expect("snapshot decodes"))
    }

    /// Stores `value` under a device's key.
    pub async fn set_raw(&self, device_id: &str, value: &[u8]) {
        let mut conn = self.connection().await;
        let () = redis::cmd("SET")
            .arg(store::key(device_id))
            .arg(value)
            .query_async(&mut conn)
            .await
            .expect("SET");
    }

    /// How many times Redis ran `command` (from `INFO commandstats`).
    pub async fn calls(&self, command: &str) -> u64 {
        self.commands().await.get(command).copied().unwrap_or(0)
    }

    /// How many times Redis ran each command so far, by lower-case name (`INFO
    /// commandstats`; the `INFO` that asks counts from the next call on).
    pub async fn commands(&self) -> std::collections::BTreeMap<String, u64> {
        let mut conn = self.connection().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO");
        info.lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `redis-server` on `127.0.0.1:port` without persistence (no RDB, no AOF), with
/// `extra` arguments after those, and waits until it answers PING.
pub fn spawn(port: u16, extra: &[&str]) -> Child {
    let port_arg = port.to_string();
    let child = Command::new("redis-server")
        .args(["--port", &port_arg, "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers_ping(port) {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Whether a Redis on `127.0.0.1:port` answers PING with PONG within a second.
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
