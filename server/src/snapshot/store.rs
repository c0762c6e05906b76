//! The Redis side of snapshots: a bb8 pool of multiplexed connections, one key per
//! device, every operation bounded by `REDIS_COMMAND_TIMEOUT`.

use std::time::Duration;

use bb8_redis::{
    RedisConnectionManager,
    bb8::{self, Pool, RunError},
    redis::{self, RedisError},
};

/// Prefix of every device key; the device id follows as is.
pub const KEY_PREFIX: &str = "tidewatch:v1:device:";

/// The Redis key of a device's snapshot.
pub fn key(device_id: &str) -> String {
    format!("{KEY_PREFIX}{device_id}")
}

/// Appends the key of `device_id` to `out` (the flusher reuses one buffer).
pub fn write_key(out: &mut Vec<u8>, device_id: &str) {
    out.clear();
    out.extend_from_slice(KEY_PREFIX.as_bytes());
    out.extend_from_slice(device_id.as_bytes());
}

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
}

impl From<RunError<RedisError>> for StoreError {
    fn from(e: RunError<RedisError>) -> Self {
        match e {
            RunError::User(e) => Self::Connect(e.to_string()),
            RunError::TimedOut => Self::Connect("timed out (REDIS_CONNECT_TIMEOUT)".into()),
        }
    }
}

/// Where snapshots are written and read.
#[derive(Debug, Clone)]
pub struct Store {
    /// Connections; each is multiplexed, so a pipeline and a restore read can share one.
    pool: Pool<RedisConnectionManager>,
    /// Bound on one operation, connection wait included.
    command_timeout: Duration,
}

impl Store {
    /// A store for `url`. No connection is made yet: a Redis that is down at start does
    /// not keep the service from starting (ingestion runs from memory meanwhile).
    pub fn new(
        url: &str,
        pool_size: u32,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let manager = RedisConnectionManager::new(url)?;
        let pool = bb8::Pool::builder()
            .max_size(pool_size)
            // bb8 waits 30 s for a connection by default; a caller must never wait
            // longer than the command timeout, which wraps this one.
            .connection_timeout(connect_timeout)
            // A multiplexed connection whose server went away stays broken; the PING
            // on checkout finds that out and bb8 replaces it.
            .test_on_check_out(true)
            .build_unchecked(manager);
        Ok(Self {
            pool,
            command_timeout,
        })
    }

    /// Runs `op` on a pooled connection within the command timeout.
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut redis::aio::MultiplexedConnection) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let work = async {
            let mut conn = self.pool.get().await?;
            Ok(op(&mut conn).await?)
        };
        tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| StoreError::Timeout(self.command_timeout))?
    }

    /// Sends a pipeline whose replies are all ignored (a batch of `SET ... EX`).
    pub async fn write(&self, pipeline: &redis::Pipeline) -> Result<(), StoreError> {
        self.run(async |conn| pipeline.exec_async(conn).await).await
    }

    /// Reads the values of `ids` in one `MGET`, in order; `None` where there is none.
    pub async fn read(&self, ids: &[Box<str>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for id in ids {
            cmd.arg(key(id));
        }
        self.run(async |conn| cmd.query_async(conn).await).await
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(async |conn| redis::cmd("PING").query_async::<String>(conn).await)
            .await
            .map(drop)
    }
}

/// `url` with any password (and query, which may carry one) replaced by `***`, for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, _)) => (rest, "?***"),
        None => (rest, ""),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{path}{query}")
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
    }
}
