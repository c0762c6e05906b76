//! tidewatch: streaming anomaly detection for device metrics.
//!
//! Devices hold long-lived gRPC `Ingest` streams and get a verdict (rolling average,
//! z-score, anomaly or not) for every sample; REST clients get the same through the
//! HTTP/JSON gateway. The rules the code relies on are in `docs/architecture.md`.
//!
//! # Layout
//!
//! - [`server`]: the process lifecycle: [`Server::bind`], [`Server::serve`] (start
//!   gRPC with health and reflection, start HTTP, the background tasks, the drain and
//!   the final flush) and [`run`], what the binary calls.
//! - [`service`]: the request core every transport shares: [`AppState`], its two ways
//!   into judging ([`AppState::judge_now`], [`AppState::judge`]) and `Analyze`.
//! - [`grpc`]: `TelemetryService` (`Ingest` through its own fast path: the wire codec,
//!   HTTP body and connection wrapper; `Analyze`, `WatchAnomalies`).
//! - [`gateway`]: the HTTP/JSON gateway (`/ingest`, `/analyze`, probes, `/metrics`),
//!   speaking the proto3 JSON of the same messages.
//! - [`overload`]: concurrency limits with load shedding and request timeouts for both
//!   servers.
//! - [`intake`]: bounds on request data still arriving (incomplete messages and
//!   bodies: a byte budget, a minimum rate, a deadline for whole requests).
//! - [`connections`]: `MAX_CONNECTIONS` with probe headroom, connection activity and
//!   the idle timeout.
//! - [`engine`]: the sharded per-(device, metric) windows, the detectors
//!   ([`engine::detector`]) and their semantics; it knows no transport.
//! - [`security`]: TLS with certificates reloaded from disk, mutual TLS, bearer
//!   tokens (API keys, JWTs), principals with scopes, device namespaces and quotas.
//! - [`snapshot`]: Redis snapshots of the windows (flush, restore, a device's snapshot
//!   for `Analyze`), on when `REDIS_URL` is set.
//! - `tasks` (private): the background tasks: the snapshot flusher, or the idle
//!   evictor without snapshots.
//! - [`config`]: every setting, as a flag and an environment variable.
//! - [`error`]: sample errors and the one mapping of error kinds to gRPC codes and
//!   HTTP statuses.
//! - [`telemetry`]: logging, the OpenTelemetry metrics with their Prometheus
//!   exposition and OTLP export, and the server spans with W3C trace context.
//! - [`shutdown`]: the signals that start the drain.
//! - [`eval`]: detection quality on labeled data (`tidewatch-eval`).
//!
//! # A request's path
//!
//! A socket accepted by [`Server::serve`] → tonic → [`overload`] → [`grpc`] (or axum →
//! [`gateway`]) → [`AppState::judge_now`] (and [`AppState::judge`] for what must wait:
//! a restore, a large batch) → [`engine`] → verdicts back on the same stream or
//! response, anomalies broadcast to watchers.
//!
//! Tests start the real server on `127.0.0.1:0` with [`Server::bind`] and their own
//! shutdown future; the binary does the same with SIGTERM/SIGINT.

pub mod config;
pub mod connections;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gateway;
pub mod grpc;
pub mod intake;
pub mod overload;
pub mod security;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod snapshot;
mod tasks;
pub mod telemetry;

pub use server::{Server, run};
pub use service::{AnomalyEvent, AppState, Judged};
