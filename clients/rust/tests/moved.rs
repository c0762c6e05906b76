//! A sample answered `moved` (its device is held by another replica of the server) is
//! sent again by the session until it is applied, against a real server on a real
//! `redis-server` where a live "other replica" holds the device for a while.

mod common;

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::TestServer;
use tidewatch_client::{Client, SampleExt, sample};

/// A `redis-server` on a free port, killed on drop.
struct Redis(Child, u16);

impl Redis {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let redis = Self(child, port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.1.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_samples_are_sent_again_until_applied() {
    let redis = Redis::start();
    // Another live replica ("ghost") holds the device for the first 3 s.
    redis.cli(&["SET", "tidewatch:v1:replica:ghost", "1", "PX", "3000"]);
    redis.cli(&["SET", "{tidewatch:v1:device:held}:owner", "ghost"]);
    let url = format!("redis://127.0.0.1:{}", redis.1);
    let server = TestServer::start_with(|c| c.redis_url = Some(url.into())).await;
    let client = Client::connect(server.url()).await.expect("connect");
    let mut session = client.ingest();
    for value in [1.0, 2.0, 3.0] {
        session
            .send(sample("held").metric("t", value))
            .await
            .expect("send");
    }
    session.close_input();
    let mut values = Vec::new();
    while let Some(answer) = session.next().await {
        let answer = answer.expect("answer");
        assert!(answer.verdict.error.is_empty(), "{}", answer.verdict.error);
        assert!(answer.attempts >= 1);
        values.push(answer.verdict.metrics[0].value);
    }
    assert_eq!(values, [1.0, 2.0, 3.0], "each applied once, in order");
    assert!(
        !redis
            .cli(&["GET", "{tidewatch:v1:device:held}:owner"])
            .is_empty(),
        "the server owns the device now"
    );
    server.stop().await;
}
