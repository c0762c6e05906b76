//! The seed check over the real gRPC server: 420, 430, 410, 440, 425 then 900 for
//! `rps` is an anomaly with mean 425, stddev 10 and z-score 47.5.

use crate::common::{TestServer, one};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_check_over_grpc() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let requests: Vec<_> = [420.0, 430.0, 410.0, 440.0, 425.0, 900.0]
        .into_iter()
        .map(|v| one("", 0, &[("rps", v)]))
        .collect();
    let mut responses = client
        .ingest(tokio_stream::iter(requests))
        .await
        .expect("ingest")
        .into_inner();
    let mut verdicts = Vec::new();
    while let Some(response) = responses.next().await {
        let mut response = response.expect("response");
        assert_eq!(response.verdicts.len(), 1);
        verdicts.push(response.verdicts.remove(0));
    }
    assert_eq!(verdicts.len(), 6);
    assert!(
        verdicts[..5]
            .iter()
            .all(|v| !v.anomaly && v.error.is_empty())
    );
    let last = &verdicts[5];
    assert!(last.anomaly);
    assert_eq!(last.device_id, "default");
    let m = &last.metrics[0];
    assert_eq!(
        (m.metric.as_str(), m.mean, m.window_count),
        ("rps", 425.0, 5)
    );
    assert!((m.stddev - 10.0).abs() < 1e-12);
    assert!((m.z_score - 47.5).abs() < 1e-9, "z = {}", m.z_score);
    server.stop().await.expect("clean shutdown");
}
