//! The Redis side of snapshots, one key per device, every operation bounded by
//! `REDIS_COMMAND_TIMEOUT`: a bb8 pool of redis-rs multiplexed connections for reads
//! (restores, `Analyze`, `PING`), and a bb8 pool of plain connections for the flush,
//! which sends batches of `SET`s it packed itself (see [`super::resp`]): redis-rs
//! cannot send bytes that are already packed on an async connection. Both speak TLS
//! for `rediss://` and log in as [`super::target`] resolved.

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use bb8_redis::{
    bb8::{self, Pool, RunError},
    redis::{self, ConnectionAddr, ConnectionInfo, RedisError},
};
use futures::FutureExt as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

pub mod cluster;
mod read;

use cluster::Cluster;
use read::ReadManager;

use super::{
    fence,
    resp::{self, ProtocolError, Reply},
    target::{RedisSettings, RedisTarget, TargetError},
};

pub use super::{HEX_KEY_PREFIX, KEY_PREFIX, key, keyed_in_hex, legacy_key, write_key};

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection within `REDIS_CONNECT_TIMEOUT`, or the connection attempt failed.
    #[error("no redis connection: {0}")]
    Connect(String),
    /// Redis answered with an error, or the connection broke.
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
    /// The whole operation took longer than `REDIS_COMMAND_TIMEOUT`.
    #[error("redis did not answer within {0:?} (REDIS_COMMAND_TIMEOUT)")]
    Timeout(Duration),
    /// A snapshot write connection broke.
    #[error("redis connection failed: {0}")]
    Io(#[from] io::Error),
    /// Redis refused the credentials of `REDIS_URL` (`AUTH`: wrong password or user).
    #[error("redis refused authentication (check the user and password of REDIS_URL): {0}")]
    Auth(String),
    /// The TLS handshake with Redis failed: its certificate is not signed by
    /// `REDIS_CA_FILE` (or does not name the host), or it wants a client certificate.
    #[error(
        "redis TLS handshake failed (check REDIS_CA_FILE, the host name of REDIS_URL against redis's certificate, and REDIS_CLIENT_CERT): {0}"
    )]
    Tls(String),
    /// A Redis setting cannot be used.
    #[error(transparent)]
    Setting(#[from] TargetError),
    /// Redis refused a command (out of memory, read-only replica, ...).
    #[error("redis refused the command: {0}")]
    Refused(String),
    /// Redis answered something the command cannot answer.
    #[error("redis protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

impl From<RunError<RedisError>> for StoreError {
    fn from(e: RunError<RedisError>) -> Self {
        match e {
            RunError::User(e) if e.kind() == redis::ErrorKind::AuthenticationFailed => {
                Self::Auth(e.to_string())
            }
            RunError::User(e) if is_tls_failure(&e.to_string()) => Self::Tls(e.to_string()),
            RunError::User(e) => Self::login_refused(e.to_string()),
            RunError::TimedOut => Self::connect_timed_out(),
        }
    }
}

impl From<RunError<StoreError>> for StoreError {
    fn from(e: RunError<StoreError>) -> Self {
        match e {
            RunError::User(e @ (Self::Auth(_) | Self::Tls(_))) => e,
            RunError::User(Self::Refused(e)) => Self::login_refused(e),
            RunError::User(e) => Self::Connect(e.to_string()),
            RunError::TimedOut => Self::connect_timed_out(),
        }
    }
}

/// Whether a connection error is the TLS handshake's (rustls's messages, as redis-rs
/// passes them on in an I/O error).
fn is_tls_failure(message: &str) -> bool {
    [
        "invalid peer certificate",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
        "certificate",
    ]
    .iter()
    .any(|marker| message.contains(marker))
}

impl StoreError {
    fn connect_timed_out() -> Self {
        Self::Connect("timed out (REDIS_CONNECT_TIMEOUT)".into())
    }

    /// A connection attempt Redis answered with an error: an authentication failure
    /// when it names one (`WRONGPASS`, `NOAUTH`, or the older "invalid password").
    fn login_refused(e: String) -> Self {
        let auth = [
            "WRONGPASS",
            "NOAUTH",
            "invalid password",
            "invalid username",
        ]
        .iter()
        .any(|marker| e.contains(marker));
        if auth {
            Self::Auth(e)
        } else {
            Self::Connect(e)
        }
    }
}

/// Where snapshots are written and read.
#[derive(Debug, Clone)]
pub struct Store {
    /// Connections for reads; each is multiplexed, so concurrent restores share one.
    pool: Pool<ReadManager>,
    /// Connections for the flush's batches of `SET`s, one batch on a connection at a time.
    writers: Pool<WriteManager>,
    /// Bound on one operation, connection wait included.
    command_timeout: Duration,
    /// Where Redis is, how to log in, and the TLS to speak.
    target: RedisTarget,
    /// The Redis Cluster of `REDIS_CLUSTER_NODES`: reads and writes go to the master
    /// of their key's slot (the two pools above are then unused).
    cluster: Option<Arc<Cluster>>,
    /// The last authentication or TLS failure of either pool's connection attempts (made in
    /// the background, where a caller only sees its wait time out).
    refused: RefusedLogin,
}

/// Keeps the last connection attempt Redis refused the credentials of (or whose TLS
/// handshake failed), so that a caller whose wait timed out is told why.
#[derive(Debug, Clone, Default)]
struct RefusedLogin(Arc<Mutex<Option<Refusal>>>);

/// Why a connection attempt was refused: (TLS, message); not TLS is authentication.
type Refusal = (bool, String);

impl RefusedLogin {
    fn record(&self, e: StoreError) {
        let refusal = match e {
            StoreError::Auth(message) => (false, message),
            StoreError::Tls(message) => (true, message),
            _ => return,
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(refusal);
    }

    /// `e`, or the authentication or TLS failure behind it when a connection attempt
    /// was refused since the last connection that worked.
    fn explain(&self, e: StoreError) -> StoreError {
        match (&e, self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()) {
            (StoreError::Timeout(_) | StoreError::Connect(_), Some((tls, message))) => {
                if tls {
                    StoreError::Tls(message)
                } else {
                    StoreError::Auth(message)
                }
            }
            _ => e,
        }
    }

    fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl bb8::ErrorSink<RedisError> for RefusedLogin {
    fn sink(&self, e: RedisError) {
        self.record(RunError::User(e).into());
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<RedisError>> {
        Box::new(self.clone())
    }
}

impl bb8::ErrorSink<StoreError> for RefusedLogin {
    fn sink(&self, e: StoreError) {
        self.record(RunError::User(e).into());
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<StoreError>> {
        Box::new(self.clone())
    }
}

impl Store {
    /// A store for `url`, with its credentials and TLS against the system's CA
    /// certificates (see [`Store::with_target`]).
    pub fn new(
        url: &str,
        pool_size: u32,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let target = RedisTarget::load(&RedisSettings::url(url))?;
        Self::with_target(target, pool_size, connect_timeout, command_timeout)
    }

    /// A store for `target`. No connection is made yet: a Redis that is down at start
    /// does not keep the service from starting (ingestion runs from memory meanwhile).
    pub fn with_target(
        target: RedisTarget,
        pool_size: u32,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        // The connection info carries the TLS parameters the target resolved.
        let manager = ReadManager::new(target.info().clone());
        let refused = RefusedLogin::default();
        let pool = bb8::Pool::builder()
            .max_size(pool_size)
            // bb8 waits 30 s for a connection by default; a caller must never wait
            // longer than the command timeout, which wraps this one.
            .connection_timeout(connect_timeout)
            // No PING on checkout: a command that finds its connection dropped
            // retires it and is sent again on a new one (see `read`).
            .test_on_check_out(false)
            .error_sink(Box::new(refused.clone()))
            .build_unchecked(manager);
        let writers = bb8::Pool::builder()
            .max_size(pool_size)
            .connection_timeout(connect_timeout)
            // The check costs no round trip here: it only looks whether the server
            // closed the socket (see `WriteConnection::check_open`).
            .test_on_check_out(true)
            .error_sink(Box::new(refused.clone()))
            .build_unchecked(WriteManager {
                target: target.clone(),
            });
        Ok(Self {
            pool,
            writers,
            command_timeout,
            target,
            cluster: None,
            refused,
        })
    }

    /// A store in the Redis Cluster reached through `seeds` (`REDIS_CLUSTER_NODES`,
    /// see [`cluster::parse_seeds`]). No connection is made yet.
    pub fn cluster(
        seeds: &str,
        pool_size: u32,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let seeds = cluster::parse_seeds(seeds).map_err(StoreError::Connect)?;
        let first = seeds[0].clone();
        let url = match first.addr() {
            ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
            other => other.to_string(),
        };
        let mut store = Self::new(&url, 1, connect_timeout, command_timeout)?;
        store.cluster = Some(Arc::new(Cluster::new(seeds, pool_size, connect_timeout)));
        Ok(store)
    }

    /// The cluster, when the store is one.
    pub fn cluster_of(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// `work` within the command timeout, a refused login explained.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| StoreError::Timeout(self.command_timeout))
            .and_then(|r| r)
            .map_err(|e| self.refused.explain(e))
    }

    /// Sends `cmd` to the one Redis, or to the cluster master that serves `key` (any
    /// master without a key), without a timeout of its own.
    async fn query<T: redis::FromRedisValue>(
        &self,
        key: Option<&[u8]>,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        if let Some(cluster) = &self.cluster {
            return cluster.query(key, cmd).await;
        }
        let reply = read::query(&self.pool, cmd).await;
        // Anything but a failed connection attempt means the login went through.
        if !matches!(
            reply,
            Err(StoreError::Connect(_) | StoreError::Auth(_) | StoreError::Tls(_))
        ) {
            self.refused.clear();
        }
        reply
    }

    /// Sends `count` commands packed by the flusher and hands each reply to
    /// `on_reply` with its command's index; an `Err` means none of them is known to
    /// be written.
    pub async fn write_commands(
        &self,
        commands: &[u8],
        count: usize,
        on_reply: impl FnMut(usize, Reply),
    ) -> Result<(), StoreError> {
        self.write_commands_on(None, commands, count, on_reply)
            .await
    }

    /// [`Store::write_commands`] on the cluster master `node` (every command's keys
    /// in its slots), or on the one Redis when `None`. A connection that fails marks
    /// the cluster's slot map out of date.
    pub async fn write_commands_on(
        &self,
        node: Option<&cluster::Node>,
        commands: &[u8],
        count: usize,
        on_reply: impl FnMut(usize, Reply),
    ) -> Result<(), StoreError> {
        let writers = node.map_or(&self.writers, |n| &n.writes);
        // On a cluster, wait for a free connection of this master first (the one
        // Redis gets only as many batches at once as it has connections).
        let _turn = match node {
            Some(node) => node.batches.acquire().await.ok(),
            None => None,
        };
        let work = async {
            let mut conn = writers.get().await?;
            self.refused.clear();
            conn.request(commands, count, on_reply).await
        };
        let result = tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| StoreError::Timeout(self.command_timeout))
            .and_then(|r| r)
            .map_err(|e| self.refused.explain(e));
        if let (Err(_), Some(cluster)) = (&result, &self.cluster) {
            cluster.mark_stale();
        }
        result
    }

    /// The cluster master that serves `device_id`, or `None` without a cluster.
    pub async fn writer_for(
        &self,
        device_id: &str,
    ) -> Result<Option<Arc<cluster::Node>>, StoreError> {
        match &self.cluster {
            None => Ok(None),
            Some(cluster) => Ok(Some(
                cluster.node_for(Some(key(device_id).as_bytes())).await?,
            )),
        }
    }

    /// Runs a script of [`fence`] by `EVALSHA`, loading it first when Redis does not
    /// know it (a restarted Redis forgets scripts).
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &'static str,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let sha = fence::sha1_hex(script.as_bytes());
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&sha).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        for arg in args {
            cmd.arg(*arg);
        }
        let key = keys.first().map(|k| k.as_bytes());
        self.bounded(async {
            match self.query(key, &cmd).await {
                Err(StoreError::Redis(e))
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let mut load = redis::cmd("SCRIPT");
                    load.arg("LOAD").arg(script);
                    self.query::<String>(key, &load).await?;
                    self.query(key, &cmd).await
                }
                other => other,
            }
        })
        .await
    }

    /// Publishes `message` on `channel`; returns how many subscribers got it.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        self.bounded(self.query(None, &cmd)).await
    }

    /// How long `key` lives on, or `None` when it does not exist.
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>, StoreError> {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(key);
        let millis: i64 = self.bounded(self.query(Some(key.as_bytes()), &cmd)).await?;
        Ok(match millis {
            -2 => None,
            -1 => Some(Duration::MAX),
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        })
    }

    /// The redis-rs client of this store's Redis (the hand-off listener opens its own
    /// subscription connection).
    pub fn client(&self) -> &redis::Client {
        self.target.client()
    }

    /// Whether connections speak TLS.
    pub fn tls(&self) -> bool {
        self.target.tls()
    }

    /// Where this store's Redis is, its password replaced, for logs.
    pub fn shown(&self) -> &str {
        self.target.shown()
    }

    /// A client for the hand-off subscription: the one Redis, or on a cluster the
    /// masters in turn (a `PUBLISH` on any node reaches every node's subscribers).
    pub fn subscriber(&self) -> Result<redis::Client, RedisError> {
        match self.cluster.as_ref().and_then(|c| c.subscribe_info()) {
            Some(info) => redis::Client::open(info),
            None => Ok(self.target.client().clone()),
        }
    }

    /// The value of one key (`GET`), routed by the key.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.bounded(self.query(Some(key.as_bytes()), &cmd)).await
    }

    /// Reads the values of `ids` in one `MGET`, in order; `None` where there is none.
    /// On a cluster, one `GET` per device, each to its slot's master.
    pub async fn read(&self, ids: &[Box<str>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if self.cluster.is_some() {
            let reads = ids.iter().map(|id| async move {
                let key = key(id);
                let mut cmd = redis::cmd("GET");
                cmd.arg(&key);
                self.query(Some(key.as_bytes()), &cmd).await
            });
            return self.bounded(futures::future::try_join_all(reads)).await;
        }
        let mut cmd = redis::cmd("MGET");
        for id in ids {
            cmd.arg(key(id));
        }
        self.bounded(self.query(None, &cmd)).await
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.query::<String>(None, &redis::cmd("PING")))
            .await
            .map(drop)
    }
}

/// Opens [`WriteConnection`]s for the pool.
#[derive(Debug)]
struct WriteManager {
    /// Where Redis is, how to log in, and the TLS to speak.
    target: RedisTarget,
}

impl WriteManager {
    /// Opens connections to `info` (a cluster master: no TLS, credentials from the info).
    pub(super) fn new(info: ConnectionInfo) -> Self {
        Self {
            target: RedisTarget::plain(info),
        }
    }
}

impl bb8::ManageConnection for WriteManager {
    type Connection = WriteConnection;
    type Error = StoreError;

    async fn connect(&self) -> Result<WriteConnection, StoreError> {
        WriteConnection::connect(&self.target).await
    }

    async fn is_valid(&self, conn: &mut WriteConnection) -> Result<(), StoreError> {
        conn.check_open()
    }

    fn has_broken(&self, conn: &mut WriteConnection) -> bool {
        conn.busy
    }
}

/// The socket under a [`WriteConnection`].
enum Stream {
    /// `redis://host:port`.
    Tcp(TcpStream),
    /// `rediss://host:port`.
    Tls(Box<TlsStream<TcpStream>>),
    /// `redis+unix:///path` (or `unix:///path`).
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.write_all(bytes).await,
            Self::Tls(s) => s.write_all(bytes).await,
            #[cfg(unix)]
            Self::Unix(s) => s.write_all(bytes).await,
        }
    }

    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read_buf(buf).await,
            Self::Tls(s) => s.read_buf(buf).await,
            #[cfg(unix)]
            Self::Unix(s) => s.read_buf(buf).await,
        }
    }

    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            // Through TLS: the socket's bytes are records, so only a read of the TLS
            // stream says whether data (or the end) came; one poll, never a wait.
            Self::Tls(s) => s
                .read(buf)
                .now_or_never()
                .unwrap_or_else(|| Err(io::ErrorKind::WouldBlock.into())),
            #[cfg(unix)]
            Self::Unix(s) => s.try_read(buf),
        }
    }
}

/// A plain RESP2 connection that sends packed requests and reads their replies, one
/// request at a time.
pub struct WriteConnection {
    /// The socket.
    stream: Stream,
    /// Replies read but not parsed yet (reused from request to request).
    replies: Vec<u8>,
    /// A request is on the wire: set before writing, cleared once every reply is read.
    /// A request cut short (timeout, error) leaves replies unread, so the pool drops
    /// the connection instead of reusing it out of step.
    busy: bool,
}

impl WriteConnection {
    /// Connects (with TLS for `rediss://`) and logs in (`AUTH`, `SELECT`) as the
    /// target says.
    async fn connect(target: &RedisTarget) -> Result<Self, StoreError> {
        let info = target.info();
        let stream = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            ConnectionAddr::TcpTls { host, port, .. } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                match target.handshake(stream).await {
                    Ok(Some(tls)) => Stream::Tls(Box::new(tls)),
                    Ok(None) => {
                        return Err(StoreError::Connect("rediss:// without TLS settings".into()));
                    }
                    Err(e) => return Err(StoreError::Tls(e.to_string())),
                }
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => {
                Stream::Unix(tokio::net::UnixStream::connect(path).await?)
            }
            other => {
                return Err(StoreError::Connect(format!(
                    "snapshot writes cannot connect to {other}: use redis://, rediss:// or redis+unix://"
                )));
            }
        };
        let mut conn = Self {
            stream,
            replies: Vec::with_capacity(16 * 1024),
            busy: false,
        };
        let settings = info.redis_settings();
        let mut login = Vec::new();
        let mut count = 0;
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            login.extend_from_slice(&auth.arg(password).get_packed_command());
            count += 1;
        }
        if settings.db() != 0 {
            login.extend_from_slice(&redis::cmd("SELECT").arg(settings.db()).get_packed_command());
            count += 1;
        }
        // Every connection loads the scripts: a restarted Redis has forgotten them.
        let (scripts, script_count) = fence::load_scripts();
        login.extend_from_slice(&scripts);
        count += script_count;
        if count > 0 {
            let mut refused = None;
            conn.request(&login, count, |_, reply| {
                if let Reply::Error(e) = reply {
                    refused.get_or_insert(e);
                }
            })
            .await?;
            if let Some(e) = refused {
                return Err(StoreError::login_refused(e));
            }
        }
        Ok(conn)
    }

    /// Whether the connection can take a request, without a round trip: the server
    /// has not closed it (a restarted or killed Redis has) and nothing unasked-for
    /// is waiting to be read.
    fn check_open(&mut self) -> Result<(), StoreError> {
        if self.busy {
            return Err(ProtocolError::Unfinished.into());
        }
        let mut probe = [0u8; 64];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
            Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => Err(ProtocolError::unexpected(&probe[..n]).into()),
        }
    }

    /// Sends `request` (`count` commands) and hands each reply to `on_reply` with the
    /// index of its command.
    async fn request(
        &mut self,
        request: &[u8],
        count: usize,
        mut on_reply: impl FnMut(usize, Reply),
    ) -> Result<(), StoreError> {
        self.busy = true;
        self.stream.write_all(request).await?;
        self.replies.clear();
        let (mut answered, mut at) = (0, 0);
        while answered < count {
            match resp::parse_reply(&self.replies[at..])? {
                Some((reply, used)) => {
                    at += used;
                    on_reply(answered, reply);
                    answered += 1;
                }
                None => {
                    self.replies.drain(..at);
                    at = 0;
                    self.replies.reserve(16 * 1024);
                    if self.stream.read_buf(&mut self.replies).await? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "redis closed the connection",
                        )
                        .into());
                    }
                }
            }
        }
        if at != self.replies.len() {
            return Err(ProtocolError::unexpected(&self.replies[at..]).into());
        }
        self.busy = false;
        Ok(())
    }
}

/// `url` with any password (and query, which may carry one) replaced by `***`, for logs.
pub fn redact(url: &str) -> String {
    crate::config::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis://:s3cret@redis:6379"),
            "redis://:***@redis:6379"
        );
        assert_eq!(
            redact("redis://app:s3cret@redis:6379/2"),
            "redis://app:***@redis:6379/2"
        );
        assert_eq!(
            redact("redis+unix:///run/redis.sock?pass=s3cret"),
            "redis+unix:///run/redis.sock?***"
        );
        assert_eq!(redact("s3cret"), "***");
    }

    #[test]
    fn keys_are_versioned_per_device() {
        assert_eq!(key("sensor-1"), "tidewatch:v1:device:sensor-1");
        let mut buf = b"junk".to_vec();
        write_key(&mut buf, "a");
        assert_eq!(buf, b"tidewatch:v1:device:a");
        // Ids with a brace are keyed in hex (one Redis Cluster slot for the device's
        // keys), distinct from every id keyed as is.
        assert_eq!(key("a{b}"), "tidewatch:v1:device-hex:617b627d");
        assert_eq!(
            legacy_key("a{b}").as_deref(),
            Some("tidewatch:v1:device:a{b}")
        );
        assert_eq!(legacy_key("ab"), None);
    }
}
