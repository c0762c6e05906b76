//! Redis Cluster (`REDIS_CLUSTER_NODES`): the hash slot of each key, the cluster's slot
//! map, and a read pool and a write pool per master (`docs/snapshots.md`, "Redis
//! Cluster"; `docs/architecture.md`, "Snapshot protocol").
//!
//! Every script touches the keys of one device only, and those keys share one slot
//! (see [`super::key`]), so every command goes to exactly one master. The slot
//! map comes from `CLUSTER SLOTS`, asked of any node that answers (the masters last
//! known, then the seeds), and is asked again after any reply that says it is stale:
//! `MOVED`, a connection that fails, `CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`,
//! `READONLY` (a master demoted by a failover). A read follows `MOVED` and `ASK`
//! at once and retries the rest with a short backoff, all within
//! `REDIS_COMMAND_TIMEOUT`; a flush batch that meets them leaves its devices dirty
//! for the next flush, which routes them by the new map.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bb8_redis::{
    bb8::Pool,
    redis::{self, ConnectionAddr, ConnectionInfo, Value},
};

use super::{
    StoreError, WriteManager,
    read::{self, ReadManager},
};
#[cfg(test)]
use crate::config::MAX_CLUSTER_SEEDS as MAX_SEEDS;

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// Most masters a slot map may name (Redis Cluster's own documented ceiling is 1,000
/// nodes); a bigger reply is refused rather than given a pool per entry.
pub const MAX_NODES: usize = 1_000;

/// Most times one read is sent again (redirects and retries) within its timeout.
const MAX_ATTEMPTS: u32 = 16;

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of `key`: of its hash tag (what is between the first `{` and the
/// first `}` after it, when not empty), else of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tag.unwrap_or(key)) % SLOTS as u16
}

pub use crate::config::parse_cluster_nodes as parse_seeds;

/// One master: where it is, and its pools.
pub struct Node {
    /// `host:port`, as the cluster names it.
    pub addr: String,
    /// How to reach it (the seeds' credentials, this node's address).
    info: ConnectionInfo,
    /// Multiplexed connections for reads and scripts.
    pub(super) reads: Pool<ReadManager>,
    /// Plain connections for flush batches.
    pub(super) writes: Pool<WriteManager>,
    /// One permit per write connection: a flush sends batches to all masters at
    /// once, and a batch waits here, not in the pool (whose wait is the connect
    /// timeout), for its master to have a connection free.
    pub(super) batches: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("addr", &self.addr).finish()
    }
}

/// The slot map: which master serves each slot.
#[derive(Debug, Default)]
pub struct Routing {
    /// Index into `nodes` per slot (0 for a slot no master serves: its commands fail
    /// and the map is asked again).
    slots: Vec<u16>,
    /// The masters.
    pub nodes: Vec<Arc<Node>>,
}

impl Routing {
    /// The index of the master that serves `slot`.
    pub fn node_index(&self, slot: u16) -> usize {
        self.slots
            .get(usize::from(slot))
            .map_or(0, |&i| usize::from(i))
    }
}

/// A Redis Cluster as the snapshot store sees it.
pub struct Cluster {
    /// `REDIS_CLUSTER_NODES`.
    seeds: Vec<ConnectionInfo>,
    /// The current slot map (empty until the first operation asks for it).
    routing: RwLock<Arc<Routing>>,
    /// A reply said the map is out of date.
    stale: AtomicBool,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// Pools by address, kept across refreshes.
    pools: Mutex<HashMap<String, Arc<Node>>>,
    /// Rotates commands without a key (and subscriptions) over the masters.
    next: AtomicUsize,
    /// `REDIS_POOL_SIZE`, per master.
    pool_size: u32,
    /// `REDIS_CONNECT_TIMEOUT`.
    connect_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the seeds: they hold the password.
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// What to do after a failed read.
enum Retry {
    /// Send it to that node (`MOVED`), and ask for the map again.
    Moved(String),
    /// Send it to that node after `ASKING` (a slot being migrated).
    Ask(String),
    /// Ask for the map again and retry after a pause (failover in progress).
    Later,
    /// Give up: the error is the answer.
    No,
}

fn retry_kind(e: &StoreError) -> Retry {
    match e {
        StoreError::Redis(e) => {
            let redirect = || e.redirect_node().map(|(addr, _)| addr.to_owned());
            match e.kind() {
                redis::ErrorKind::Server(redis::ServerErrorKind::Moved) => {
                    redirect().map_or(Retry::Later, Retry::Moved)
                }
                redis::ErrorKind::Server(redis::ServerErrorKind::Ask) => {
                    redirect().map_or(Retry::Later, Retry::Ask)
                }
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::ReadOnly
                    | redis::ServerErrorKind::BusyLoading,
                ) => Retry::Later,
                _ if e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout() =>
                {
                    Retry::Later
                }
                _ => Retry::No,
            }
        }
        StoreError::Connect(_) | StoreError::Io(_) => Retry::Later,
        _ => Retry::No,
    }
}

/// Whether a flush reply refused by Redis means the slot map is out of date.
pub fn is_routing_error(message: &str) -> bool {
    [
        "MOVED",
        "ASK",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
    ]
    .iter()
    .any(|code| message.starts_with(code))
}

impl Cluster {
    /// A cluster reached through `seeds`; connects lazily.
    pub fn new(seeds: Vec<ConnectionInfo>, pool_size: u32, connect_timeout: Duration) -> Self {
        Self {
            seeds,
            routing: RwLock::new(Arc::default()),
            stale: AtomicBool::new(true),
            refreshing: tokio::sync::Mutex::new(()),
            pools: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            pool_size,
            connect_timeout,
        }
    }

    /// The current slot map, asked for first when there is none or it is stale.
    pub async fn routing(&self) -> Result<Arc<Routing>, StoreError> {
        if self.stale.load(Ordering::Relaxed) {
            let refreshed = self.refresh().await;
            let current = self.current();
            if current.nodes.is_empty() {
                refreshed?;
            }
            return Ok(current);
        }
        Ok(self.current())
    }

    fn current(&self) -> Arc<Routing> {
        Arc::clone(&self.routing.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Marks the slot map out of date: the next operation asks for it again.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Asks any node that answers for the slot map (the known masters first, then
    /// the seeds). One refresh at a time; a caller that waited for another's uses it.
    async fn refresh(&self) -> Result<(), StoreError> {
        let _one = self.refreshing.lock().await;
        if !self.stale.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut candidates: Vec<ConnectionInfo> = self
            .current()
            .nodes
            .iter()
            .map(|n| n.info.clone())
            .collect();
        candidates.extend(self.seeds.iter().cloned());
        let mut last = StoreError::Connect("no cluster node answered CLUSTER SLOTS".into());
        for info in candidates {
            let asked = tokio::time::timeout(self.connect_timeout, slots_of(&info)).await;
            match asked {
                Ok(Ok(map)) => match self.build(&info, map) {
                    Ok(routing) => {
                        *self.routing.write().unwrap_or_else(PoisonError::into_inner) =
                            Arc::new(routing);
                        self.stale.store(false, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(e) => last = e,
                },
                Ok(Err(e)) => last = e,
                Err(_) => last = StoreError::Timeout(self.connect_timeout),
            }
        }
        Err(last)
    }

    /// The routing for a `CLUSTER SLOTS` answer from the node at `asked`.
    fn build(
        &self,
        asked: &ConnectionInfo,
        ranges: Vec<(u16, u16, String, u16)>,
    ) -> Result<Routing, StoreError> {
        let asked_host = match asked.addr() {
            ConnectionAddr::Tcp(host, _) => host.clone(),
            _ => String::new(),
        };
        let mut routing = Routing {
            slots: vec![0; SLOTS],
            nodes: Vec::new(),
        };
        let mut index: HashMap<String, u16> = HashMap::new();
        for (start, end, host, port) in ranges {
            // An unknown endpoint ("" or "?") is the node that answered.
            let host = if host.is_empty() || host == "?" {
                asked_host.clone()
            } else {
                host
            };
            let addr = format!("{host}:{port}");
            let i = match index.get(&addr) {
                Some(&i) => i,
                None => {
                    if routing.nodes.len() >= MAX_NODES {
                        return Err(StoreError::Refused(format!(
                            "CLUSTER SLOTS names more than {MAX_NODES} masters"
                        )));
                    }
                    let i = routing.nodes.len() as u16;
                    routing.nodes.push(self.node(&host, port, asked));
                    index.insert(addr, i);
                    i
                }
            };
            let (start, end) = (usize::from(start), usize::from(end).min(SLOTS - 1));
            for slot in routing.slots.get_mut(start..=end).unwrap_or_default() {
                *slot = i;
            }
        }
        if routing.nodes.is_empty() {
            return Err(StoreError::Refused("CLUSTER SLOTS names no master".into()));
        }
        Ok(routing)
    }

    /// The pools of the master at `host:port` (made once, kept across refreshes).
    fn node(&self, host: &str, port: u16, template: &ConnectionInfo) -> Arc<Node> {
        let addr = format!("{host}:{port}");
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(node) = pools.get(&addr) {
            return Arc::clone(node);
        }
        let info = template
            .clone()
            .set_addr(ConnectionAddr::Tcp(host.to_owned(), port));
        let reads = Pool::builder()
            .max_size(self.pool_size)
            .connection_timeout(self.connect_timeout)
            // No PING on checkout (see `read`).
            .test_on_check_out(false)
            // A dead master must fail the caller at once (who then asks for the map
            // again), not keep it waiting for a connection.
            .retry_connection(false)
            .build_unchecked(ReadManager::new(info.clone()));
        let writes = Pool::builder()
            .max_size(self.pool_size)
            .connection_timeout(self.connect_timeout)
            .test_on_check_out(true)
            .retry_connection(false)
            .build_unchecked(WriteManager::new(info.clone()));
        let node = Arc::new(Node {
            addr,
            info,
            reads,
            writes,
            batches: tokio::sync::Semaphore::new(self.pool_size as usize),
        });
        pools.insert(node.addr.clone(), Arc::clone(&node));
        node
    }

    /// The node of a redirect (`host:port`).
    fn redirected(&self, addr: &str) -> Result<Arc<Node>, StoreError> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse().ok()?)))
            .ok_or_else(|| StoreError::Refused(format!("bad redirect {addr:?}")))?;
        let template = self
            .seeds
            .first()
            .ok_or_else(|| StoreError::Connect("REDIS_CLUSTER_NODES names no node".into()))?;
        Ok(self.node(host, port, template))
    }

    /// The master for `key`, or the next master in turn without a key.
    pub async fn node_for(&self, key: Option<&[u8]>) -> Result<Arc<Node>, StoreError> {
        let routing = self.routing().await?;
        let i = match key {
            Some(key) => routing.node_index(key_slot(key)),
            None => self.next.fetch_add(1, Ordering::Relaxed) % routing.nodes.len().max(1),
        };
        routing
            .nodes
            .get(i)
            .cloned()
            .ok_or_else(|| StoreError::Connect("no cluster master known".into()))
    }

    /// Where a subscription connects: the masters in turn, else the first seed.
    pub fn subscribe_info(&self) -> Option<ConnectionInfo> {
        let routing = self.current();
        if routing.nodes.is_empty() {
            self.mark_stale();
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            return self.seeds.get(i % self.seeds.len().max(1)).cloned();
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % routing.nodes.len();
        Some(routing.nodes[i].info.clone())
    }

    /// Sends `cmd` to the master that serves `key` (any master without a key),
    /// following redirects and retrying through a failover. The caller bounds the
    /// time.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        key: Option<&[u8]>,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut redirect: Option<(String, bool)> = None;
        let mut attempt = 0;
        loop {
            let result = match redirect.take() {
                None => match self.node_for(key).await {
                    Ok(node) => Self::once(&node, cmd).await,
                    Err(e) => Err(e),
                },
                Some((addr, false)) => match self.redirected(&addr) {
                    Ok(node) => Self::once(&node, cmd).await,
                    Err(e) => Err(e),
                },
                Some((addr, true)) => match self.redirected(&addr) {
                    Ok(node) => Self::asking(&node, cmd).await,
                    Err(e) => Err(e),
                },
            };
            let e = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            attempt += 1;
            if attempt >= MAX_ATTEMPTS {
                return Err(e);
            }
            match retry_kind(&e) {
                Retry::Moved(addr) => {
                    self.mark_stale();
                    redirect = Some((addr, false));
                }
                Retry::Ask(addr) => redirect = Some((addr, true)),
                Retry::Later => {
                    self.mark_stale();
                    // 20, 40 ... 200 ms: a failover takes about the cluster's node
                    // timeout, and the caller's timeout bounds the whole.
                    let pause =
                        Duration::from_millis(10 << attempt.min(4)).min(Duration::from_millis(200));
                    tokio::time::sleep(pause).await;
                }
                Retry::No => return Err(e),
            }
        }
    }

    async fn once<T: redis::FromRedisValue>(
        node: &Node,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        read::query(&node.reads, cmd).await
    }

    /// `ASKING` then `cmd`, on a connection of its own (the flag is per connection
    /// and applies to the next command, which on a shared connection could be
    /// another caller's). Only while a slot migrates.
    async fn asking<T: redis::FromRedisValue>(
        node: &Node,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let client = redis::Client::open(node.info.clone())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("ASKING").query_async::<()>(&mut conn).await?;
        Ok(cmd.query_async(&mut conn).await?)
    }
}

/// `CLUSTER SLOTS` of the node at `info`: (first slot, last slot, master host, port).
async fn slots_of(info: &ConnectionInfo) -> Result<Vec<(u16, u16, String, u16)>, StoreError> {
    let client = redis::Client::open(info.clone())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await?;
    parse_slots(reply)
}

/// Reads a `CLUSTER SLOTS` reply.
pub fn parse_slots(reply: Value) -> Result<Vec<(u16, u16, String, u16)>, StoreError> {
    let bad = || StoreError::Refused("unexpected reply to CLUSTER SLOTS".into());
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(bad());
        };
        let (Some(start), Some(end), Some(Value::Array(master))) = (
            items.first().and_then(int),
            items.get(1).and_then(int),
            items.get(2),
        ) else {
            return Err(bad());
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            Some(Value::Nil) => String::new(),
            _ => return Err(bad()),
        };
        let port = master.get(1).and_then(int).ok_or_else(bad)?;
        if start > end || usize::from(end) >= SLOTS {
            return Err(bad());
        }
        out.push((start, end, host, port));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // The check value of CRC16/XMODEM, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"bar"), 5_061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16_384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn seeds_are_urls_or_host_ports_within_a_limit() {
        let seeds = parse_seeds("127.0.0.1:7000, redis://:pw@10.0.0.2:7001,").unwrap();
        assert_eq!(seeds.len(), 2);
        assert_eq!(
            seeds[0].addr(),
            &ConnectionAddr::Tcp("127.0.0.1".into(), 7000)
        );
        assert_eq!(seeds[1].redis_settings().password(), Some("pw"));
        assert!(parse_seeds(" , ").unwrap_err().contains("no node"));
        assert!(
            parse_seeds("redis://127.0.0.1:7000/2")
                .unwrap_err()
                .contains("database 0")
        );
        assert!(
            parse_seeds("redis+unix:///tmp/r.sock")
                .unwrap_err()
                .contains("host:port")
        );
        let many = vec!["127.0.0.1:7000"; MAX_SEEDS + 1].join(",");
        assert!(parse_seeds(&many).unwrap_err().contains("at most 64"));
        let err = parse_seeds("redis://:s3cret@[bad").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn a_slot_map_is_read_and_checked() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16_383),
                node("", 7001),
                node("10.0.0.9", 7009),
            ]),
        ]);
        assert_eq!(
            parse_slots(reply).unwrap(),
            vec![
                (0, 5460, "10.0.0.1".into(), 7000),
                (5461, 16_383, String::new(), 7001)
            ]
        );
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(10),
            Value::Int(16_384),
            node("a", 1),
        ])]);
        assert!(parse_slots(bad).is_err());
        assert!(parse_slots(Value::Int(1)).is_err());
    }

    #[test]
    fn routing_errors_are_recognised() {
        assert!(is_routing_error("MOVED 3999 127.0.0.1:6381"));
        assert!(is_routing_error("CLUSTERDOWN The cluster is down"));
        assert!(!is_routing_error("OOM command not allowed"));
    }
}
