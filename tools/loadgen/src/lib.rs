//! tidewatch's benchmark tools: the library behind the `tidewatch-bench` load generator
//! and the two baseline servers.
//!
//! # Layout
//!
//! - [`traffic`]: the generated traffic (device ids, metrics, timestamps, values with
//!   noise, drift and injected anomalies), encoded once before a run, and what it
//!   really covers.
//! - [`tls`]: `https://` for the load generator (rustls, `--cacert`).
//! - `src/bin/tidewatch_bench.rs`: the load generator (raw HTTP/2, open or closed loop,
//!   HdrHistogram latency, ghz-compatible report, h2load bodies).
//! - `src/bin/bare_tonic.rs`: the gRPC baseline, a constant-verdict tonic server.
//! - `src/bin/bare_axum.rs`: the HTTP baseline, an axum handler doing the gateway's
//!   JSON parse and no detection.
//!
//! # What the baselines share with tidewatch
//!
//! Both baselines run on the allocator tidewatch runs on (mimalloc, the workspace's
//! feature set), on the same tokio runtime (multi-threaded, one worker per core the
//! process may run on, every driver enabled), with `TCP_NODELAY` on accepted sockets,
//! and `bare-tonic` with the same HTTP/2 keepalive and message size limits. What
//! differs is only the work: no engine, no metrics, no overload layers.

pub mod tls;
pub mod traffic;

/// The tokio runtime the `tidewatch` binary builds (`server/src/main.rs`): the
/// baselines build theirs here so that the comparison is of the work alone.
pub fn server_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The answer both baselines give: one verdict per sample echoing its device, seq and
/// metric values, nothing computed.
pub fn constant_verdicts(
    samples: Vec<tidewatch_proto::v1::Sample>,
) -> tidewatch_proto::v1::IngestResponse {
    use tidewatch_proto::v1::{IngestResponse, MetricVerdict, Verdict};
    IngestResponse {
        verdicts: samples
            .into_iter()
            .map(|s| Verdict {
                device_id: s.device_id,
                seq: s.seq,
                metrics: s
                    .metrics
                    .into_iter()
                    .map(|(metric, value)| MetricVerdict {
                        metric,
                        value,
                        ..MetricVerdict::default()
                    })
                    .collect(),
                ..Verdict::default()
            })
            .collect(),
    }
}
