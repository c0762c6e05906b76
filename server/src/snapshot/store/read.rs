//! The read pools' connections (restores, `Analyze`, scripts, `PING`): redis-rs
//! multiplexed connections, checked out without a round trip.
//!
//! bb8-redis's manager sends a `PING` on every checkout to find connections whose
//! server went away, which doubled the round trips of every restore. Here a connection
//! is trusted until a command on it finds it dropped: it is then discarded on its
//! return, and the command is sent once more on a new connection made for it (not
//! another pooled one, which a Redis restart left as stale). A connection whose
//! server closed it while it sat idle fails before its command leaves (its reader has
//! seen the end of the stream), so that second send is the command's first; only a
//! connection that breaks while a command is in flight can send it twice, and every
//! command here is a read or a fenced script, which a repeat cannot apply twice
//! (docs/architecture.md, "Snapshot protocol": fenced writes).

use bb8_redis::{
    bb8::{ManageConnection, Pool},
    redis::{self, ConnectionInfo, FromRedisValue, RedisError, aio::MultiplexedConnection},
};

use super::StoreError;

/// Opens the multiplexed connections of a read pool.
#[derive(Debug, Clone)]
pub(crate) struct ReadManager {
    /// Where Redis is, with its credentials and TLS.
    info: ConnectionInfo,
}

impl ReadManager {
    /// Opens connections to `info`.
    pub(crate) fn new(info: ConnectionInfo) -> Self {
        Self { info }
    }
}

/// A pooled read connection, and whether a command found it dropped.
pub(crate) struct ReadConnection {
    conn: MultiplexedConnection,
    dropped: bool,
}

impl ManageConnection for ReadManager {
    type Connection = ReadConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<ReadConnection, RedisError> {
        let conn = redis::Client::open(self.info.clone())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(ReadConnection {
            conn,
            dropped: false,
        })
    }

    /// No round trip (the pools do not test on checkout): see the module's
    /// documentation.
    async fn is_valid(&self, _: &mut ReadConnection) -> Result<(), RedisError> {
        Ok(())
    }

    fn has_broken(&self, conn: &mut ReadConnection) -> bool {
        conn.dropped
    }
}

/// Sends `cmd` on a connection of `pool`, and once more on a new connection when the
/// first one turns out dropped (see the module's documentation).
pub(crate) async fn query<T: FromRedisValue>(
    pool: &Pool<ReadManager>,
    cmd: &redis::Cmd,
) -> Result<T, StoreError> {
    let mut conn = pool.get().await?;
    let reply = match cmd.query_async(&mut conn.conn).await {
        Err(e) if e.is_connection_dropped() || e.is_unrecoverable_error() => {
            conn.dropped = true;
            drop(conn);
            let mut fresh = pool.dedicated_connection().await?;
            cmd.query_async(&mut fresh.conn).await
        }
        other => other,
    };
    reply.map_err(|e| match e.code() {
        // A Redis that wants a password this URL does not give lets the connection
        // in and refuses its first command.
        Some("NOAUTH" | "WRONGPASS") => StoreError::Auth(e.to_string()),
        _ => e.into(),
    })
}
