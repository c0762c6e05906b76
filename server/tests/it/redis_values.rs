//! What Redis itself may do wrong, against a real `redis-server`: refuse the password
//! of `REDIS_URL` (reported as an authentication failure, not as a timeout).

use std::time::{Duration, Instant};

use crate::common::redis_server::RedisServer;
use tidewatch_server::snapshot::{
    resp::Reply,
    store::{Store, StoreError},
};

#[tokio::test]
async fn a_refused_password_is_an_authentication_failure() {
    let redis = RedisServer::start();
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query_async(&mut admin)
        .await
        .unwrap();
    let timeout = Duration::from_millis(500);
    let set = redis::cmd("SET").arg("k").arg("v").get_packed_command();
    for url in [
        format!("redis://:wrong@127.0.0.1:{}", redis.port),
        format!("redis://127.0.0.1:{}", redis.port),
    ] {
        let store = Store::new(&url, 2, timeout, timeout).unwrap();
        let started = Instant::now();
        // The read pool (redis-rs connections) ...
        let e = store.ping().await.unwrap_err();
        assert!(matches!(e, StoreError::Auth(_)), "{url}: {e:?}");
        assert!(
            e.to_string().starts_with("redis refused authentication"),
            "{e}"
        );
        assert!(
            started.elapsed() < 3 * timeout,
            "waited {:?}",
            started.elapsed()
        );
    }
    // ... and the flusher's own connections: a wrong password fails the login...
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let store = Store::new(&url, 2, timeout, timeout).unwrap();
    let mut refused = Vec::new();
    let mut on_reply = |i: usize, reply: Reply| {
        if let Reply::Error(e) = reply {
            refused.push((i, e));
        }
    };
    let e = store
        .write_commands(&set, 1, &mut on_reply)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Auth(_)), "{e:?}");
    // ... and without one, the write connection's setup (it loads the fencing
    // scripts as it opens) is refused NOAUTH: an authentication failure too.
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let store = Store::new(&url, 2, timeout, timeout).unwrap();
    let e = store
        .write_commands(&set, 1, &mut on_reply)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Auth(m) if m.starts_with("NOAUTH")),
        "{e:?}"
    );
    assert!(refused.is_empty(), "nothing was sent: {refused:?}");
    // The right password works.
    let store = Store::new(
        &format!("redis://:right@127.0.0.1:{}", redis.port),
        2,
        timeout,
        timeout,
    )
    .unwrap();
    store.ping().await.unwrap();
}
