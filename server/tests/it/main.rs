//! The server's integration tests, one module per concern, linked into one test binary
//! (`it`) so the server and its dependencies link once. Each module starts the real
//! server (in-process on `127.0.0.1:0`, or the `tidewatch` binary as a child) and talks
//! to it over real sockets; `common` holds the shared helpers.
//!
//! Run one concern with a filter: `cargo nextest run -p tidewatch-server --test it snapshot::`.

mod common;

mod abuse;
mod abuse_conn;
mod abuse_memory;
mod analyze_watch;
mod backpressure;
mod bad_samples;
mod cluster;
mod config;
mod conformance;
mod delete_device;
mod detectors;
mod gateway;
mod grpcurl;
mod health_reflection;
mod ingest_stream;
mod integrity;
mod limits;
mod metrics;
mod module_graph;
mod otel;
mod overload;
mod quota_devices;
mod redis_tls;
mod redis_values;
mod replicas;
mod security;
mod security_reflection;
mod security_tls;
mod seed;
mod shutdown;
mod snapshot;
mod sse;
