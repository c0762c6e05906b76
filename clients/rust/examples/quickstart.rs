//! The crate docs' example as a program: the seed check over a batching, reconnecting
//! Ingest session, then `Analyze`.
//!
//! ```sh
//! cargo run --release &                      # the service, in the repository root
//! cargo run -p tidewatch-client --example quickstart -- http://127.0.0.1:50051
//! ```

use tidewatch_client::{Client, Error, SampleExt, sample};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
    let client = Client::connect(url).await?;
    let mut session = client.ingest();
    for rps in [420.0, 430.0, 410.0, 440.0, 425.0, 900.0] {
        session.send(sample("sensor-1").metric("rps", rps)).await?;
    }
    session.close_input();
    while let Some(answered) = session.next().await {
        let v = answered?.verdict;
        let m = &v.metrics[0];
        println!(
            "seq {} rps {} mean {:.1} stddev {:.1} z {:.2} anomaly {}",
            v.seq, m.value, m.mean, m.stddev, m.z_score, v.anomaly
        );
    }
    let stats = client.analyze("sensor-1").await?;
    let rps = &stats.metrics[0];
    println!(
        "sensor-1 rps: rolling average {:.2} over {} values, {} anomalies",
        rps.rolling_average, rps.window_count, rps.anomalies_total
    );
    Ok(())
}
