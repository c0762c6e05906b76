//! The ingest workload of the snapshot and replicas benchmarks (included by path).

use tidewatch_proto::v1::{IngestRequest, Sample};

/// Requests for one stream: `messages` messages of `batch` samples over `devices`
/// devices of its own, two metrics each.
pub(crate) fn workload(
    stream: usize,
    messages: usize,
    batch: usize,
    devices: usize,
) -> Vec<IngestRequest> {
    (0..messages)
        .map(|m| IngestRequest {
            samples: (0..batch)
                .map(|s| {
                    let n = m * batch + s;
                    Sample {
                        device_id: format!("s{stream}-d{}", n % devices),
                        metrics: [
                            ("cpu".to_string(), 50.0 + (n % 17) as f64),
                            ("rps".to_string(), 400.0 + (n % 31) as f64),
                        ]
                        .into_iter()
                        .collect(),
                        ..Sample::default()
                    }
                })
                .collect(),
            ..IngestRequest::default()
        })
        .collect()
}
