//! A real local Redis Cluster for a test: six `redis-server --cluster-enabled yes`
//! processes on free ports in temporary directories, joined by
//! `redis-cli --cluster create ... --cluster-replicas 1` (three masters, three
//! replicas), with a short node timeout so that a failover takes a few seconds.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;
use tidewatch_server::{
    engine::DeviceState,
    snapshot::{
        cluster::{key_slot, parse_slots},
        codec, store,
    },
};

/// One `redis-server` of the cluster.
struct ClusterNode {
    port: u16,
    child: Option<Child>,
}

/// Six `redis-server` processes forming one cluster.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
fn free_pair(taken: &[u16]) -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if port >= 55_000 || taken.contains(&port) || taken.contains(&(port + 10_000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node says
    /// `cluster_state:ok`.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tidewatch-cluster-{}-{:x}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ fastrand::u64(..) as u128
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut ports = Vec::new();
        for _ in 0..6 {
            ports.push(free_pair(&ports));
        }
        let mut cluster = Self {
            nodes: ports
                .iter()
                .map(|&port| ClusterNode { port, child: None })
                .collect(),
            dir,
        };
        for i in 0..6 {
            cluster.spawn(i);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("redis-cli must be installed");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.live_ports().iter().all(|&p| state_ok(p, 6)) {
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        // A replica that never synced cannot be promoted: wait until each master
        // has its replica online.
        let online = |p: u16| {
            redis_cli(p, &["INFO", "replication"])
                .is_some_and(|info| !info.contains("role:master") || info.contains("state=online"))
        };
        while !cluster.live_ports().into_iter().all(online) {
            assert!(Instant::now() < deadline, "the replicas never synced");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let port = self.nodes[i].port;
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("node dir");
        let dir = dir.to_str().expect("utf-8 temp dir");
        let child = super::redis_server::spawn(
            port,
            &[
                "--dir",
                dir,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
            ],
        );
        self.nodes[i].child = Some(child);
    }

    /// `host:port` of the first three nodes, comma-separated: `REDIS_CLUSTER_NODES`.
    pub fn seeds(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// A connection to a live node.
    async fn any(&self) -> MultiplexedConnection {
        let port = self.live_ports()[0];
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to a cluster node")
    }

    /// The port of the master that serves `slot`, as a live node sees it.
    pub async fn master_of(&self, slot: u16) -> u16 {
        let mut conn = self.any().await;
        let reply: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER SLOTS");
        parse_slots(reply)
            .expect("slot map")
            .into_iter()
            .find(|(start, end, _, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, _, port)| port)
            .expect("slot served")
    }

    /// `kill -9` of the master that serves `device_id`'s keys; returns its port.
    pub async fn kill_master_of(&mut self, device_id: &str) -> u16 {
        let port = self
            .master_of(key_slot(store::key(device_id).as_bytes()))
            .await;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        port
    }

    /// Waits until a replica took over the slots of the killed master `port` and
    /// the cluster is ok again; returns how long that took.
    pub async fn wait_for_failover(&self, device_id: &str, port: u16) -> Duration {
        let started = Instant::now();
        let slot = key_slot(store::key(device_id).as_bytes());
        loop {
            let ok = self.live_ports().iter().all(|&p| state_ok(p, 0));
            if ok && self.master_of(slot).await != port {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no failover within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The raw value of `key`, from the master that serves it.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let port = self.master_of(key_slot(key.as_bytes())).await;
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the master");
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("GET")
    }

    /// The decoded snapshot of a device.
    pub async fn snapshot(&self, device_id: &str) -> Option<DeviceState> {
        let raw = self.get(&store::key(device_id)).await?;
        Some(codec::decode_value(&raw, device_id).expect("snapshot decodes"))
    }

    /// The ports of the live masters.
    #[allow(dead_code, reason = "the snapshot benchmark reads their memory")]
    pub fn master_ports(&self) -> Vec<u16> {
        self.live_ports()
            .into_iter()
            .filter(|&p| redis_cli(p, &["ROLE"]).is_some_and(|r| r.starts_with("master")))
            .collect()
    }

    /// Empties every master (`FLUSHALL SYNC`; replicas follow).
    #[allow(
        dead_code,
        reason = "the snapshot benchmark empties the cluster between rounds"
    )]
    pub fn flushall(&self) {
        for port in self.master_ports() {
            redis_cli(port, &["FLUSHALL", "SYNC"]);
        }
    }

    /// The process ids of the live nodes.
    #[allow(dead_code, reason = "the snapshot benchmark reads their CPU time")]
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p port args...`, its output when it ran.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether the node at `port` says `cluster_state:ok` (and knows at least `known`
/// nodes).
fn state_ok(port: u16, known: usize) -> bool {
    let Some(info) = redis_cli(port, &["CLUSTER", "INFO"]) else {
        return false;
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_owned)
    };
    field("cluster_state:").as_deref() == Some("ok")
        && field("cluster_known_nodes:")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= known)
}
