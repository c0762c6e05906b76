//! Configuration: every setting is a flag and an environment variable named as the
//! seed deployments name them (`WINDOW_SIZE`, `Z_THRESHOLD`, `GRPC_ADDR`, ...).
//!
//! Bad configuration is reported as one line naming the setting, and the binary exits
//! with code 64 (`EX_USAGE`), as linkerd's proxy does.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, ValueEnum};

use crate::engine::{
    DetectorKind, EngineConfig, RobustParams,
    detector::{self, DETECTOR_NAMES, MAX_WINDOW},
};

/// Exit code for invalid configuration (`EX_USAGE` of sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A value of `GRPC_COMPRESSION`: an encoding gRPC responses may use, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GrpcCompression {
    /// gzip (RFC 1952), as grpcio, grpc-js, Connect and tonic clients send it.
    Gzip,
    /// zlib-wrapped deflate (RFC 1950), gRPC's `deflate`.
    Deflate,
    /// Zstandard (RFC 8878).
    Zstd,
    /// No response is compressed.
    Off,
}

/// Every setting of the service.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tidewatch",
    version,
    about = "Streaming anomaly detection for device metrics"
)]
pub struct Config {
    /// Address of the gRPC server (TelemetryService, health, reflection).
    #[arg(
        help_heading = "Network",
        long,
        env = "GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP/JSON gateway (REST, /metrics, health probes).
    #[arg(
        help_heading = "Network",
        long,
        env = "LISTEN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen_addr: SocketAddr,

    /// Values kept per (device, metric).
    #[arg(
        help_heading = "Engine",
        long,
        env = "WINDOW_SIZE",
        default_value_t = 50
    )]
    pub window_size: usize,

    /// Values in the window before a value can be an anomaly.
    #[arg(
        help_heading = "Engine",
        long,
        env = "MIN_SAMPLES",
        default_value_t = 5
    )]
    pub min_samples: usize,

    /// A value whose |z-score| is strictly above this is an anomaly.
    #[arg(
        help_heading = "Engine",
        long,
        env = "Z_THRESHOLD",
        default_value_t = 2.0
    )]
    pub z_threshold: f64,

    /// Shards of the device table; 0 means 4 × available cores.
    #[arg(help_heading = "Engine", long, env = "SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// Devices held in memory at most; samples of further new devices are refused.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_DEVICES",
        default_value_t = 1_000_000
    )]
    pub max_devices: usize,

    /// Distinct metrics per device at most.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_METRICS_PER_DEVICE",
        default_value_t = 32
    )]
    pub max_metrics_per_device: usize,

    /// A device's `seq` may exceed its last one by this much at most, unless it stays
    /// within the clock bound of `MAX_SEQ_CLOCK_SKEW`.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_SEQ_JUMP",
        default_value_t = 1 << 32
    )]
    pub max_seq_jump: u64,

    /// A `seq` further ahead than its device's last one plus `MAX_SEQ_JUMP` is still
    /// accepted up to the server's clock in microseconds plus this (e.g. `1h`).
    #[arg(help_heading = "Limits", long, env = "MAX_SEQ_CLOCK_SKEW", default_value = "1h", value_parser = parse_duration)]
    pub max_seq_clock_skew: Duration,

    /// Longest device id in bytes.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_DEVICE_ID_LEN",
        default_value_t = 128
    )]
    pub max_device_id_len: usize,

    /// Longest metric name in bytes.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_METRIC_NAME_LEN",
        default_value_t = 64
    )]
    pub max_metric_name_len: usize,

    /// Bytes the devices in memory may hold, as docs/operations.md ("Memory") counts
    /// them (e.g. `384MiB`, `2GiB`); unset: 3/4 of the cgroup memory limit when there
    /// is one, else 2GiB. A new device, new metric or larger window past it is
    /// refused with a `memory_budget` error.
    #[arg(help_heading = "Limits", long, env = "MEMORY_BUDGET", value_parser = parse_bytes)]
    pub memory_budget: Option<usize>,

    /// Largest `window_size` a stream's `detector` section may ask for (the zscore
    /// window or the robust baseline), 1 to 4096; beyond it the stream or request is
    /// refused (`INVALID_ARGUMENT`, HTTP 400).
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_STREAM_WINDOW",
        default_value_t = MAX_WINDOW
    )]
    pub max_stream_window: usize,

    /// Devices without samples for this long are evicted from memory (e.g. `1h`).
    #[arg(help_heading = "Engine", long, env = "IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Samples per request (Ingest message or HTTP body) at most.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_SAMPLES_PER_REQUEST",
        default_value_t = 10_000
    )]
    pub max_samples_per_request: usize,

    /// Largest gRPC message accepted, in bytes.
    #[arg(help_heading = "Limits", long, env = "MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Ingest streams open at once at most; further ones get RESOURCE_EXHAUSTED; 0 means
    /// no limit.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MAX_INGEST_STREAMS",
        default_value_t = 50_000
    )]
    pub max_ingest_streams: usize,

    /// An Ingest stream with no message for this long is ended; 0 disables.
    #[arg(help_heading = "Network", long, env = "STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub stream_idle_timeout: Duration,

    /// An Ingest stream older than this is ended with UNAVAILABLE after answering what
    /// it received, so the client reconnects (possibly to another replica); 0 disables.
    #[arg(help_heading = "Network", long, env = "STREAM_MAX_LIFETIME", default_value = "0s", value_parser = parse_duration)]
    pub stream_max_lifetime: Duration,

    /// HTTP/2 connections older than this get a GOAWAY so load rebalances; 0 disables.
    #[arg(help_heading = "Network", long, env = "MAX_CONNECTION_AGE", default_value = "0s", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// Time a connection past `MAX_CONNECTION_AGE` gets to finish before it is closed.
    #[arg(help_heading = "Network", long, env = "MAX_CONNECTION_AGE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// Connections each main listener (gRPC, HTTP) serves at once; a few more are
    /// admitted for probes only, and any further one is closed at once; 0 means no
    /// limit.
    #[arg(
        help_heading = "Network",
        long,
        env = "MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_connections: usize,

    /// A connection with no request or stream in progress for this long is closed;
    /// 0 disables.
    #[arg(help_heading = "Network", long, env = "CONNECTION_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub connection_idle_timeout: Duration,

    /// Time an HTTP/1 client gets to send a request's headers, counted from when the
    /// connection starts waiting for them (so an idle keep-alive connection is also
    /// closed after it); on both listeners, a new connection without a first request
    /// (an HTTP/2 stream) within it is closed too.
    #[arg(help_heading = "Network", long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// HTTP/2 streams one connection may have open at once, on both listeners.
    #[arg(
        help_heading = "Network",
        long,
        env = "MAX_CONCURRENT_STREAMS",
        default_value_t = 200
    )]
    pub max_concurrent_streams: u32,

    /// Interval of the HTTP/2 keepalive PINGs both listeners send; 0 disables them.
    #[arg(help_heading = "Network", long, env = "HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// A peer that does not acknowledge a keepalive PING within this is closed.
    #[arg(help_heading = "Network", long, env = "HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// gRPC connections batch their writes across the streams that answer in one turn
    /// of the runtime and send them with one system call, instead of one per stream
    /// (`grpc::fast::connection`); `false` sends at every HTTP/2 flush.
    #[arg(
        help_heading = "Network",
        long,
        env = "FLUSH_CONSOLIDATION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub flush_consolidation: bool,

    /// Bytes of incomplete gRPC messages and HTTP request bodies held at once across
    /// all streams and requests; past it the request ends with RESOURCE_EXHAUSTED /
    /// `503`; 0 means no limit.
    #[arg(help_heading = "Limits", long, env = "MAX_INCOMPLETE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_incomplete_bytes: usize,

    /// An incomplete gRPC message or HTTP body must arrive at this many bytes per
    /// second at least (after `MIN_UPLOAD_RATE_GRACE`), else DEADLINE_EXCEEDED /
    /// `408`; 0 disables.
    #[arg(
        help_heading = "Limits",
        long,
        env = "MIN_UPLOAD_RATE",
        default_value_t = 1024
    )]
    pub min_upload_rate: u64,

    /// Waiting time an incomplete message or body is allowed before
    /// `MIN_UPLOAD_RATE` applies.
    #[arg(help_heading = "Limits", long, env = "MIN_UPLOAD_RATE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub min_upload_rate_grace: Duration,

    /// A unary or server-streaming gRPC call (Analyze, WatchAnomalies, health) must
    /// send its whole request within this, before it takes a concurrency slot
    /// (DEADLINE_EXCEEDED otherwise); 0 disables.
    #[arg(help_heading = "Limits", long, env = "FIRST_MESSAGE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub first_message_timeout: Duration,

    /// Encodings gRPC responses may be compressed with, when the client lists one in
    /// `grpc-accept-encoding` (the first it lists that is here is used): `gzip`,
    /// `deflate`, `zstd`, comma-separated, or `off`. Compressed requests (gzip, deflate,
    /// zstd) are accepted whatever this says.
    #[arg(
        help_heading = "Network",
        long,
        env = "GRPC_COMPRESSION",
        value_enum,
        value_delimiter = ',',
        default_value = "off"
    )]
    pub grpc_compression: Vec<GrpcCompression>,

    /// Largest HTTP request body accepted, in bytes; larger bodies get `413`.
    #[arg(help_heading = "Limits", long, env = "MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Time one HTTP request or unary gRPC call may take once its request is in
    /// (HTTP `504`, gRPC `DEADLINE_EXCEEDED`); an HTTP body must also be uploaded
    /// within it (`408`); streams only count their opening; 0 disables.
    #[arg(help_heading = "Limits", long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// HTTP API requests (`/ingest`, `/metric`, `/analyze`) handled at once at most;
    /// further ones are shed at once with `503` and `Retry-After`; 0 means no limit.
    /// Probes and `/metrics` are never shed.
    #[arg(
        help_heading = "Limits",
        long,
        env = "HTTP_CONCURRENCY_LIMIT",
        default_value_t = 1024
    )]
    pub http_concurrency_limit: usize,

    /// `TelemetryService` calls being handled at once at most (unary calls for their
    /// whole duration, streams while they open); further ones are shed at once with
    /// `RESOURCE_EXHAUSTED`; 0 means no limit. Health checks are never shed.
    #[arg(
        help_heading = "Limits",
        long,
        env = "GRPC_CONCURRENCY_LIMIT",
        default_value_t = 1024
    )]
    pub grpc_concurrency_limit: usize,

    /// Time between failing readiness (`/readyz` 503, gRPC health NOT_SERVING) and
    /// closing the listeners at shutdown, so load balancers stop sending first; part
    /// of `SHUTDOWN_TIMEOUT`.
    #[arg(help_heading = "Network", long, env = "SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Anomaly events buffered per watcher before it starts missing events.
    #[arg(
        help_heading = "Limits",
        long,
        env = "WATCH_BUFFER",
        default_value_t = 1024
    )]
    pub watch_buffer: usize,

    /// Time allowed for a graceful shutdown (drain streams, flush snapshots).
    #[arg(help_heading = "Network", long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Redis for window snapshots (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS); unset or empty runs in memory only. Never printed: logs
    /// show it with the password replaced.
    #[arg(
        help_heading = "Snapshots (Redis)",
        long,
        env = "REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<RedisUrl>,

    /// PEM CA certificates that sign the Redis server's certificate (`rediss://`);
    /// unset: the system's CA certificates.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// PEM client certificate chain for Redis (`rediss://` with `tls-auth-clients`).
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<std::path::PathBuf>,

    /// PEM private key of `REDIS_CLIENT_CERT`.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<std::path::PathBuf>,

    /// Redis ACL user (instead of the URL's).
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// File holding the Redis password (instead of the URL's), e.g. a mounted
    /// Kubernetes Secret; one trailing newline is ignored.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,

    /// A Redis Cluster for window snapshots instead of `REDIS_URL`: comma-separated
    /// seed nodes, `host:port` or `redis://[:password@]host:port` (at most 64; the
    /// other masters are discovered). The first entry's credentials log in everywhere.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_CLUSTER_NODES")]
    pub redis_cluster_nodes: Option<String>,

    /// How often changed devices are written to Redis; a crash loses at most this much.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "SNAPSHOT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub snapshot_interval: Duration,

    /// Expiry of a device snapshot in Redis (whole seconds), renewed at every write.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "SNAPSHOT_TTL", default_value = "1h", value_parser = parse_duration)]
    pub snapshot_ttl: Duration,

    /// Devices per pipelined Redis write.
    #[arg(
        help_heading = "Snapshots (Redis)",
        long,
        env = "SNAPSHOT_BATCH",
        default_value_t = 1000
    )]
    pub snapshot_batch: usize,

    /// Largest snapshot value read from Redis, in bytes (at least 1024): a larger value
    /// is never transferred; it counts as undecodable and the device starts fresh.
    /// Keep it above the largest snapshot the limits allow.
    #[arg(
        help_heading = "Snapshots (Redis)",
        long,
        env = "SNAPSHOT_MAX_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    pub snapshot_max_bytes: u64,

    /// Redis connections in the pool (flush batches run this many at once).
    #[arg(
        help_heading = "Snapshots (Redis)",
        long,
        env = "REDIS_POOL_SIZE",
        default_value_t = 8
    )]
    pub redis_pool_size: u32,

    /// Longest wait for a Redis connection (bb8's connection timeout).
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_connect_timeout: Duration,

    /// Longest wait for one Redis operation (restore read, Analyze read, one flush
    /// batch), connection included: a caller never waits longer on Redis.
    #[arg(help_heading = "Snapshots (Redis)", long, env = "REDIS_COMMAND_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub redis_command_timeout: Duration,

    /// Log format.
    #[arg(help_heading = "Logging", long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in `tracing` `EnvFilter` syntax (`RUST_LOG` is honoured too).
    #[arg(
        help_heading = "Logging",
        long,
        env = "LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,

    /// OpenTelemetry off entirely: no spans, no OTLP export (`/metrics` stays).
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_SDK_DISABLED",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub otel_sdk_disabled: bool,

    /// OTLP collector for traces and metrics (`http://host:4317` for gRPC,
    /// `http://host:4318` for HTTP); unset: nothing is exported and no span is made.
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// OTLP collector for traces only, the full URL (wins over
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )]
    pub otel_exporter_otlp_traces_endpoint: Option<String>,

    /// OTLP collector for metrics only, the full URL (wins over
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
    )]
    pub otel_exporter_otlp_metrics_endpoint: Option<String>,

    /// OTLP transport: `grpc` or `http/protobuf`.
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "grpc"
    )]
    pub otel_exporter_otlp_protocol: String,

    /// Where spans go: `otlp` or `none`.
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_TRACES_EXPORTER",
        default_value = "otlp"
    )]
    pub otel_traces_exporter: String,

    /// Where metrics go besides `/metrics`, comma-separated: `otlp`, `prometheus`
    /// (`/metrics` only) or `none`.
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_METRICS_EXPORTER",
        default_value = "otlp"
    )]
    pub otel_metrics_exporter: String,

    /// Which calls are traced: `parentbased_always_on`, `parentbased_traceidratio`,
    /// `parentbased_always_off`, `always_on`, `always_off` or `traceidratio`.
    #[arg(
        help_heading = "OpenTelemetry",
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub otel_traces_sampler: String,

    /// The ratio of the `traceidratio` samplers, 0 to 1 (default 1).
    #[arg(help_heading = "OpenTelemetry", long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otel_traces_sampler_arg: Option<String>,

    /// `service.name` of every span and metric (default: `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`, else `tidewatch`).
    #[arg(help_heading = "OpenTelemetry", long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// Detector choice and per-detector settings.
    #[command(flatten)]
    pub detectors: DetectorSettings,

    /// Anomaly watchers open at once: `WatchAnomalies` streams and `GET /anomalies`
    /// feeds together (0 means no limit); one more is refused as overloaded.
    #[arg(long, env = "MAX_WATCHERS", default_value_t = 256)]
    pub max_watchers: usize,

    /// Device ids plus metrics in one watcher's filter; a larger filter is refused.
    #[arg(long, env = "MAX_WATCH_FILTER", default_value_t = 1024)]
    pub max_watch_filter: usize,

    /// Anomaly events kept for `GET /anomalies` clients that resume with
    /// `Last-Event-ID`.
    #[arg(long, env = "FEED_REPLAY_BUFFER", default_value_t = 1024)]
    pub feed_replay_buffer: usize,

    /// How long the `GET /anomalies` feed keeps recording after its last client left,
    /// so that a client reconnecting within it resumes without a gap.
    #[arg(long, env = "FEED_RESUME_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub feed_resume_window: Duration,
    /// PEM certificate chain: with `TLS_KEY`, both listeners speak TLS (1.2+; the
    /// files are re-read when they change).
    #[arg(help_heading = "Security", long, env = "TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `TLS_CERT`.
    #[arg(help_heading = "Security", long, env = "TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificates: clients must present a certificate one of them signed
    /// (mutual TLS); its identity names a policy entry.
    #[arg(help_heading = "Security", long, env = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Time a client gets to complete its TLS handshake.
    #[arg(help_heading = "Security", long, env = "TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// The policy file (principals, scopes, device namespaces, quotas, hashed API
    /// keys); with it or `AUTH_JWKS`, every API call needs credentials.
    #[arg(help_heading = "Security", long, env = "AUTH_POLICY")]
    pub auth_policy: Option<std::path::PathBuf>,

    /// JWKS file of the public keys that sign accepted JWTs.
    #[arg(help_heading = "Security", long, env = "AUTH_JWKS")]
    pub auth_jwks: Option<std::path::PathBuf>,

    /// Accepted JWT issuers (`iss`), comma-separated; empty accepts any.
    #[arg(
        help_heading = "Security",
        long,
        env = "AUTH_JWT_ISSUER",
        value_delimiter = ','
    )]
    pub auth_jwt_issuer: Vec<String>,

    /// Accepted JWT audiences (`aud`), comma-separated; empty skips the check.
    #[arg(
        help_heading = "Security",
        long,
        env = "AUTH_JWT_AUDIENCE",
        value_delimiter = ','
    )]
    pub auth_jwt_audience: Vec<String>,

    /// How often the certificate, key, CA, policy and JWKS files are checked for
    /// changes.
    #[arg(help_heading = "Security", long, env = "CREDENTIALS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub credentials_reload_interval: Duration,

    /// Serve on a non-loopback address without TLS or without authentication.
    /// Logged at every start.
    #[arg(
        help_heading = "Security",
        long,
        env = "ALLOW_INSECURE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub allow_insecure: bool,

    /// Address of the admin listener: plain HTTP with only `/healthz`, `/readyz` and
    /// `/metrics`, never authenticated and outside every connection and concurrency
    /// limit of the API, for the kubelet and Prometheus. Unset: none.
    #[arg(help_heading = "Security", long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// gRPC reflection (it describes the API, never device data): `auth` needs the
    /// credentials of any principal when authentication is on, `open` needs none,
    /// `off` does not serve it.
    #[arg(help_heading = "Security", long, env = "REFLECTION", value_enum, default_value_t = Reflection::Auth)]
    pub reflection: Reflection,
}

/// Who may use gRPC reflection (`REFLECTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reflection {
    /// Served under the API's rule: with authentication on, a caller needs valid
    /// credentials (of any principal, whatever its scopes).
    #[value(alias = "true")]
    Auth,
    /// Served to anyone who reaches the gRPC port.
    Open,
    /// Not served.
    #[value(alias = "false")]
    Off,
}

impl Reflection {
    /// The setting's value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Open => "open",
            Self::Off => "off",
        }
    }
}

/// The detector settings (shared with `tidewatch-eval`, which takes the same flags).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Detectors")]
pub struct DetectorSettings {
    /// Detector of streams that name none: `zscore` (the seed rule, default) or
    /// `robust` (median/IQR baseline and sustained-surprise likelihood; recommended).
    #[arg(long, env = "DETECTOR", default_value = "zscore")]
    pub detector: String,

    /// Quiet samples (score below a third) that end an anomalous episode; the next
    /// anomaly after that is a new `alert`.
    #[arg(long, env = "ALERT_COOLDOWN", default_value_t = detector::DEFAULT_COOLDOWN)]
    pub alert_cooldown: u32,

    /// `robust`: values of the median/IQR baseline window.
    #[arg(long, env = "ROBUST_WINDOW", default_value_t = RobustParams::default().window)]
    pub robust_window: usize,

    /// `robust`: a value more than this many robust standard deviations (IQR/1.349)
    /// from the median is an anomaly.
    #[arg(long, env = "ROBUST_THRESHOLD", default_value_t = detector::robust::DEFAULT_THRESHOLD)]
    pub robust_threshold: f64,

    /// `robust`: likelihood z of the short-term surprise above which a sustained
    /// change is an anomaly.
    #[arg(long, env = "ROBUST_SUSTAINED_THRESHOLD", default_value_t = RobustParams::default().sustained_threshold)]
    pub robust_sustained_threshold: f64,

    /// `robust`: span, in samples, of the short-term average of surprise.
    #[arg(long, env = "ROBUST_SHORT_SPAN", default_value_t = RobustParams::default().short_span)]
    pub robust_short_span: u32,

    /// `robust`: span, in samples, of the long-run distribution of that average and of
    /// the decay of the recent range; a peak not reached again for half of it is
    /// forgotten (for a quarter if an anomaly set it).
    #[arg(long, env = "ROBUST_LONG_SPAN", default_value_t = RobustParams::default().long_span)]
    pub robust_long_span: u32,

    /// `robust`: how far beyond the recent range of the metric (as a fraction of that
    /// range) a value must go to be an instantaneous anomaly; wider early in a series
    /// (× (1 + 2/√n) after n values).
    #[arg(long, env = "ROBUST_TOLERANCE", default_value_t = RobustParams::default().tolerance)]
    pub robust_tolerance: f64,

    /// `robust`: values needed before anything can be an anomaly.
    #[arg(long, env = "ROBUST_MIN_SAMPLES", default_value_t = detector::robust::DEFAULT_MIN_SAMPLES)]
    pub robust_min_samples: usize,
}

impl DetectorSettings {
    /// Checks the detector settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn fail(setting: &'static str, message: String) -> Result<(), ConfigError> {
            Err(ConfigError { setting, message })
        }
        if DetectorKind::parse(&self.detector).is_none() {
            return fail(
                "DETECTOR",
                format!(
                    "unknown detector {:?}; known detectors: {}",
                    self.detector,
                    DETECTOR_NAMES.join(", ")
                ),
            );
        }
        if self.robust_window < 4 || self.robust_window > MAX_WINDOW {
            return fail(
                "ROBUST_WINDOW",
                format!(
                    "must be between 4 and {MAX_WINDOW}, got {}",
                    self.robust_window
                ),
            );
        }
        if self.robust_min_samples == 0 || self.robust_min_samples > self.robust_window {
            return fail(
                "ROBUST_MIN_SAMPLES",
                format!(
                    "must be between 1 and ROBUST_WINDOW ({}), got {}",
                    self.robust_window, self.robust_min_samples
                ),
            );
        }
        for (setting, value) in [
            ("ROBUST_THRESHOLD", self.robust_threshold),
            (
                "ROBUST_SUSTAINED_THRESHOLD",
                self.robust_sustained_threshold,
            ),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return fail(setting, format!("must be a positive number, got {value}"));
            }
        }
        if !self.robust_tolerance.is_finite() || self.robust_tolerance < 0.0 {
            return fail(
                "ROBUST_TOLERANCE",
                format!("must be 0 or more, got {}", self.robust_tolerance),
            );
        }
        if self.robust_short_span == 0 {
            return fail("ROBUST_SHORT_SPAN", "must be at least 1".into());
        }
        if self.robust_long_span < 2 {
            return fail("ROBUST_LONG_SPAN", "must be at least 2".into());
        }
        Ok(())
    }

    /// Copies the settings into an engine configuration (after [`Self::validate`]).
    pub fn apply(&self, engine: &mut EngineConfig) {
        engine.detector = DetectorKind::parse(&self.detector).unwrap_or(DetectorKind::ZScore);
        engine.alert_cooldown = self.alert_cooldown;
        engine.robust = RobustParams {
            window: self.robust_window,
            sustained_threshold: self.robust_sustained_threshold,
            short_span: self.robust_short_span,
            long_span: self.robust_long_span,
            tolerance: self.robust_tolerance,
        };
        engine.robust_threshold = self.robust_threshold;
        engine.robust_min_samples = self.robust_min_samples;
    }
}

/// `REDIS_URL`: the URL as given, which may hold a password. `Debug` and `Display`
/// show it with the password (and any query, which may carry one) replaced by `***`;
/// [`RedisUrl::expose`] gives it whole, for connecting only.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL whole, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl From<String> for RedisUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for RedisUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `url` with any password (and query, which may carry one) replaced by `***`.
pub fn redact_url(url: &str) -> String {
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

/// A setting with an invalid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {setting}: {message}")]
pub struct ConfigError {
    /// The environment variable name of the setting.
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Most seed nodes `REDIS_CLUSTER_NODES` may list.
pub const MAX_CLUSTER_SEEDS: usize = 64;

/// The entries of `REDIS_CLUSTER_NODES`: comma-separated `host:port` or `redis://`
/// URLs (a bare `host:port` is read as `redis://host:port`).
pub fn parse_cluster_nodes(list: &str) -> Result<Vec<redis::ConnectionInfo>, String> {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let entries: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        return Err("names no node".into());
    }
    if entries.len() > MAX_CLUSTER_SEEDS {
        return Err(format!(
            "names {} nodes, at most {MAX_CLUSTER_SEEDS} are read (a few seeds are enough: the \
             others are discovered)",
            entries.len()
        ));
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let url = if entry.contains("://") {
                entry.to_owned()
            } else {
                format!("redis://{entry}")
            };
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| format!("node {}: {e}", i + 1))?;
            match info.addr() {
                ConnectionAddr::Tcp(..) if info.redis_settings().db() == 0 => Ok(info),
                ConnectionAddr::Tcp(..) => Err(format!(
                    "node {}: a Redis Cluster has only database 0",
                    i + 1
                )),
                _ => Err(format!(
                    "node {}: cluster nodes are reached over redis:// (host:port)",
                    i + 1
                )),
            }
        })
        .collect()
}

/// A size in bytes: a number, optionally followed by `KiB`, `MiB` or `GiB` (or `K`,
/// `M`, `G`, `Ki`, `Mi`, `Gi`: all powers of 1024).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "Ki" | "KiB" => 10,
        "M" | "Mi" | "MiB" => 20,
        "G" | "Gi" | "GiB" => 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} (expected e.g. 512MiB, 2GiB)"
            ));
        }
    };
    let number: usize = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (expected e.g. 512MiB, 2GiB)"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// Share of a cgroup memory limit `MEMORY_BUDGET` defaults to: the rest is for what
/// the budget does not count (streams, buffers, snapshot batches, allocator slack and
/// the window-value pool's free runs: `docs/operations.md`, "Memory").
pub const CGROUP_BUDGET_SHARE: (usize, usize) = (3, 4);

/// Where `MEMORY_BUDGET` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// The setting.
    Setting,
    /// 3/4 of this cgroup memory limit, in bytes.
    Cgroup(u64),
    /// Neither: the built-in default.
    Default,
}

impl BudgetSource {
    /// How the start-up log names it.
    pub fn describe(self) -> String {
        match self {
            Self::Setting => "MEMORY_BUDGET".into(),
            Self::Cgroup(limit) => format!("3/4 of the cgroup memory limit ({limit} bytes)"),
            Self::Default => "default (no cgroup memory limit)".into(),
        }
    }
}

/// The memory limit of this process's cgroup, if it has one: `memory.max` (cgroup
/// v2) or `memory.limit_in_bytes` (v1), of its own cgroup as `/proc/self/cgroup`
/// names it, else at the root of `/sys/fs/cgroup` (a container's own cgroup).
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_limit_in(std::path::Path::new("/sys/fs/cgroup"), &own)
}

/// [`cgroup_memory_limit`] under the cgroup mount `root`, for the `/proc/self/cgroup`
/// text `own`.
fn cgroup_limit_in(root: &std::path::Path, own: &str) -> Option<u64> {
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            candidates.push(root.join(path).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(path).join("memory.limit_in_bytes"));
        }
    }
    candidates.push(root.join("memory.max"));
    candidates.push(root.join("memory").join("memory.limit_in_bytes"));
    candidates.into_iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        // "max" (v2), or a number near 2^63 (v1), means no limit.
        let limit: u64 = text.trim().parse().ok()?;
        (limit > 0 && limit < 1 << 60).then_some(limit)
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 5m, 1h)"))
}

impl Config {
    /// The defaults, as if nothing were set (tests start from here). Reads no
    /// environment variable.
    pub fn defaults() -> Self {
        let matches = <Self as clap::CommandFactory>::command()
            .mut_args(|a| a.env(None::<&str>))
            .get_matches_from(["tidewatch"]);
        <Self as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("the built-in defaults always parse")
    }

    /// Defaults for a test: both servers on `127.0.0.1:0`.
    pub fn for_tests() -> Self {
        let mut config = Self::defaults();
        config.grpc_addr = ([127, 0, 0, 1], 0).into();
        config.listen_addr = ([127, 0, 0, 1], 0).into();
        config
    }

    /// Checks what clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn fail(setting: &'static str, message: String) -> Result<(), ConfigError> {
            Err(ConfigError { setting, message })
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return fail(
                "LOG_LEVEL",
                format!("{e} (expected e.g. info, debug, tidewatch_server=debug)"),
            );
        }
        if self.window_size == 0 || self.window_size > crate::engine::MAX_WINDOW_SIZE {
            return fail(
                "WINDOW_SIZE",
                format!(
                    "must be between 1 and {}, got {}",
                    crate::engine::MAX_WINDOW_SIZE,
                    self.window_size
                ),
            );
        }
        if self.min_samples == 0 || self.min_samples > self.window_size {
            return fail(
                "MIN_SAMPLES",
                format!(
                    "must be between 1 and WINDOW_SIZE ({}), got {}",
                    self.window_size, self.min_samples
                ),
            );
        }
        if !self.z_threshold.is_finite() || self.z_threshold <= 0.0 {
            return fail(
                "Z_THRESHOLD",
                format!("must be a positive number, got {}", self.z_threshold),
            );
        }
        if self.max_devices == 0 {
            return fail("MAX_DEVICES", "must be at least 1".into());
        }
        if let Some(budget) = self.memory_budget
            && budget < 1 << 20
        {
            return fail(
                "MEMORY_BUDGET",
                format!("must be at least 1MiB, got {budget} bytes"),
            );
        }
        if self.max_stream_window == 0 || self.max_stream_window > MAX_WINDOW {
            return fail(
                "MAX_STREAM_WINDOW",
                format!(
                    "must be between 1 and {MAX_WINDOW}, got {}",
                    self.max_stream_window
                ),
            );
        }
        if self.max_metrics_per_device == 0 {
            return fail("MAX_METRICS_PER_DEVICE", "must be at least 1".into());
        }
        if self.max_device_id_len == 0 {
            return fail("MAX_DEVICE_ID_LEN", "must be at least 1".into());
        }
        if self.max_metric_name_len == 0 {
            return fail("MAX_METRIC_NAME_LEN", "must be at least 1".into());
        }
        if self.max_samples_per_request == 0 {
            return fail("MAX_SAMPLES_PER_REQUEST", "must be at least 1".into());
        }
        if self.max_message_bytes < 1024 {
            return fail(
                "MAX_MESSAGE_BYTES",
                format!("must be at least 1024, got {}", self.max_message_bytes),
            );
        }
        if self.idle_timeout.is_zero() {
            return fail("IDLE_TIMEOUT", "must be above 0".into());
        }
        if self.watch_buffer == 0 {
            return fail("WATCH_BUFFER", "must be at least 1".into());
        }
        if self.max_watch_filter == 0 {
            return fail("MAX_WATCH_FILTER", "must be at least 1".into());
        }
        if self.feed_replay_buffer == 0 {
            return fail("FEED_REPLAY_BUFFER", "must be at least 1".into());
        }
        if self.max_concurrent_streams == 0 {
            return fail("MAX_CONCURRENT_STREAMS", "must be at least 1".into());
        }
        if self.header_read_timeout.is_zero() {
            return fail("HEADER_READ_TIMEOUT", "must be above 0".into());
        }
        if !self.http2_keepalive_interval.is_zero() && self.http2_keepalive_timeout.is_zero() {
            return fail(
                "HTTP2_KEEPALIVE_TIMEOUT",
                "must be above 0 while HTTP2_KEEPALIVE_INTERVAL is set".into(),
            );
        }
        if self.shutdown_timeout.is_zero() {
            return fail("SHUTDOWN_TIMEOUT", "must be above 0".into());
        }
        if self.grpc_compression.contains(&GrpcCompression::Off) && self.grpc_compression.len() > 1
        {
            return fail(
                "GRPC_COMPRESSION",
                "`off` cannot be listed with an encoding".into(),
            );
        }
        if self.max_body_bytes < 1024 {
            return fail(
                "MAX_BODY_BYTES",
                format!("must be at least 1024, got {}", self.max_body_bytes),
            );
        }
        if self.shutdown_delay >= self.shutdown_timeout {
            return fail(
                "SHUTDOWN_DELAY",
                format!(
                    "must be below SHUTDOWN_TIMEOUT ({:?}), got {:?}",
                    self.shutdown_timeout, self.shutdown_delay
                ),
            );
        }
        self.validate_redis()?;
        if let Some(nodes) = self.redis_cluster_nodes() {
            if self.redis_url().is_some() {
                return fail(
                    "REDIS_CLUSTER_NODES",
                    "set REDIS_URL (one Redis) or REDIS_CLUSTER_NODES (a Redis Cluster), not both"
                        .into(),
                );
            }
            if let Err(e) = parse_cluster_nodes(nodes) {
                return fail("REDIS_CLUSTER_NODES", e);
            }
        }
        if self.snapshot_interval.is_zero() {
            return fail("SNAPSHOT_INTERVAL", "must be above 0".into());
        }
        if self.snapshot_ttl < Duration::from_secs(1) {
            return fail("SNAPSHOT_TTL", "must be at least 1s".into());
        }
        if self.snapshot_batch == 0 {
            return fail("SNAPSHOT_BATCH", "must be at least 1".into());
        }
        if self.snapshot_max_bytes < 1024 {
            return fail(
                "SNAPSHOT_MAX_BYTES",
                format!("must be at least 1024, got {}", self.snapshot_max_bytes),
            );
        }
        if self.redis_pool_size == 0 {
            return fail("REDIS_POOL_SIZE", "must be at least 1".into());
        }
        if self.redis_connect_timeout.is_zero() {
            return fail("REDIS_CONNECT_TIMEOUT", "must be above 0".into());
        }
        if self.redis_command_timeout.is_zero() {
            return fail("REDIS_COMMAND_TIMEOUT", "must be above 0".into());
        }
        self.detectors.validate()?;
        self.validate_security()?;
        self.otel()?;
        if self.grpc_addr.port() != 0 && self.grpc_addr == self.listen_addr {
            return fail(
                "LISTEN_ADDR",
                format!("must differ from GRPC_ADDR ({})", self.grpc_addr),
            );
        }
        Ok(())
    }

    /// `REDIS_URL` parses (its error never shows the URL); the TLS files go with
    /// `rediss://`, the client certificate with its key. The files themselves are read
    /// when the snapshot store is built (`snapshot::target`).
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let fail = |setting, message: String| Err(ConfigError { setting, message });
        let Some(url) = self.redis_url() else {
            for (setting, set) in [
                ("REDIS_CA_FILE", self.redis_ca_file.is_some()),
                ("REDIS_CLIENT_CERT", self.redis_client_cert.is_some()),
                ("REDIS_CLIENT_KEY", self.redis_client_key.is_some()),
                ("REDIS_USERNAME", self.redis_username.is_some()),
                ("REDIS_PASSWORD_FILE", self.redis_password_file.is_some()),
            ] {
                if set && self.redis_cluster_nodes().is_some() {
                    return fail(
                        setting,
                        "applies to REDIS_URL only: REDIS_CLUSTER_NODES speaks plain TCP, \
                         with the credentials of its first entry"
                            .into(),
                    );
                }
                if set {
                    return fail(setting, "is set but REDIS_URL is not".into());
                }
            }
            return Ok(());
        };
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
            return fail("REDIS_URL", format!("{e}"));
        }
        let tls = url.starts_with("rediss://") || url.starts_with("valkeys://");
        if tls && url.contains('#') {
            return fail(
                "REDIS_URL",
                "a fragment such as #insecure (no certificate check) is not supported: set REDIS_CA_FILE to the CA that signed Redis's certificate".into(),
            );
        }
        for (setting, set) in [
            ("REDIS_CA_FILE", self.redis_ca_file.is_some()),
            ("REDIS_CLIENT_CERT", self.redis_client_cert.is_some()),
            ("REDIS_CLIENT_KEY", self.redis_client_key.is_some()),
        ] {
            if set && !tls {
                return fail(
                    setting,
                    format!("needs a rediss:// REDIS_URL (it is {})", redact_url(url)),
                );
            }
        }
        match (&self.redis_client_cert, &self.redis_client_key) {
            (Some(_), None) => fail(
                "REDIS_CLIENT_KEY",
                "must be set with REDIS_CLIENT_CERT".into(),
            ),
            (None, Some(_)) => fail(
                "REDIS_CLIENT_CERT",
                "must be set with REDIS_CLIENT_KEY".into(),
            ),
            _ => Ok(()),
        }
    }

    /// TLS needs both files; mutual TLS needs TLS; a listener outside loopback needs
    /// TLS and authentication unless `ALLOW_INSECURE` says otherwise.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let fail = |setting, message: &str| {
            Err(ConfigError {
                setting,
                message: message.into(),
            })
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return fail("TLS_KEY", "must be set with TLS_CERT"),
            (None, Some(_)) => return fail("TLS_CERT", "must be set with TLS_KEY"),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return fail("TLS_CLIENT_CA", "needs TLS_CERT and TLS_KEY");
        }
        if self.tls_handshake_timeout.is_zero() {
            return fail("TLS_HANDSHAKE_TIMEOUT", "must be above 0");
        }
        if self.credentials_reload_interval.is_zero() {
            return fail("CREDENTIALS_RELOAD_INTERVAL", "must be above 0");
        }
        if self.allow_insecure {
            return Ok(());
        }
        for (setting, addr) in [
            ("GRPC_ADDR", self.grpc_addr),
            ("LISTEN_ADDR", self.listen_addr),
        ] {
            if addr.ip().is_loopback() {
                continue;
            }
            if self.tls_cert.is_none() {
                return fail(
                    "TLS_CERT",
                    &format!(
                        "{setting} {addr} is not a loopback address: set TLS_CERT and TLS_KEY (or ALLOW_INSECURE=true)"
                    ),
                );
            }
            if !self.authenticates() {
                return fail(
                    "AUTH_POLICY",
                    &format!(
                        "{setting} {addr} is not a loopback address: set AUTH_POLICY or AUTH_JWKS (or ALLOW_INSECURE=true)"
                    ),
                );
            }
        }
        Ok(())
    }

    /// Whether API calls need credentials.
    pub fn authenticates(&self) -> bool {
        self.auth_policy.is_some() || self.auth_jwks.is_some()
    }

    /// Whether a listener outside loopback runs without TLS or authentication.
    pub fn insecure_exposure(&self) -> bool {
        let exposed = !self.grpc_addr.ip().is_loopback() || !self.listen_addr.ip().is_loopback();
        exposed && (self.tls_cert.is_none() || !self.authenticates())
    }

    /// `REDIS_URL` when snapshots are on (set and not empty), password included.
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url
            .as_ref()
            .map(|u| u.expose().trim())
            .filter(|u| !u.is_empty())
    }

    /// `REDIS_CLUSTER_NODES` when set and not empty.
    pub fn redis_cluster_nodes(&self) -> Option<&str> {
        self.redis_cluster_nodes
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
    }

    /// `MEMORY_BUDGET` in bytes, and where it came from: the setting, else 3/4 of the
    /// cgroup memory limit, else 2 GiB.
    pub fn memory_budget(&self) -> (usize, BudgetSource) {
        if let Some(budget) = self.memory_budget {
            return (budget, BudgetSource::Setting);
        }
        match cgroup_memory_limit() {
            Some(limit) => {
                let (share, of) = CGROUP_BUDGET_SHARE;
                let budget = usize::try_from(limit).unwrap_or(usize::MAX) / of * share;
                (budget, BudgetSource::Cgroup(limit))
            }
            None => (crate::engine::DEFAULT_MEMORY_BUDGET, BudgetSource::Default),
        }
    }

    /// The engine's part of the configuration.
    pub fn engine(&self) -> EngineConfig {
        let defaults = EngineConfig::default();
        let mut engine = EngineConfig {
            window_size: self.window_size,
            min_samples: self.min_samples,
            z_threshold: self.z_threshold,
            shards: if self.shards == 0 {
                defaults.shards
            } else {
                self.shards
            },
            max_devices: self.max_devices,
            max_metrics_per_device: self.max_metrics_per_device,
            max_seq_jump: self.max_seq_jump,
            max_seq_clock_skew: self.max_seq_clock_skew,
            max_device_id_len: self.max_device_id_len,
            max_metric_name_len: self.max_metric_name_len,
            idle_timeout: self.idle_timeout,
            memory_budget: self.memory_budget().0,
            max_stream_window: self.max_stream_window,
            snapshots: self.redis_url().is_some(),
            ..defaults
        };
        self.detectors.apply(&mut engine);
        engine
    }
}

/// The OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`grpc`).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`).
    HttpProtobuf,
}

/// The OpenTelemetry settings, resolved from the `OTEL_*` ones.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelSettings {
    /// How exports travel.
    pub protocol: OtlpProtocol,
    /// Where spans go (for HTTP, the full URL: `/v1/traces` appended to
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); `None`: no span is made at all.
    pub traces_endpoint: Option<String>,
    /// Where metrics go besides `/metrics` (for HTTP, `/v1/metrics` appended to
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); `None`: none.
    pub metrics_endpoint: Option<String>,
    /// Whether a call with a sampled (or unsampled) parent follows its parent's
    /// decision (the `parentbased_*` samplers).
    pub parent_based: bool,
    /// The fraction of trace ids sampled otherwise: 1 for `always_on`, 0 for
    /// `always_off`, `OTEL_TRACES_SAMPLER_ARG` for `traceidratio`.
    pub ratio: f64,
    /// `OTEL_SERVICE_NAME`, when set.
    pub service_name: Option<String>,
}

/// A set, non-blank value.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The names in a comma-separated `OTEL_*_EXPORTER` list, each one of `known`.
fn exporters<'a>(
    setting: &'static str,
    value: &'a str,
    known: &[&str],
) -> Result<Vec<&'a str>, ConfigError> {
    let names: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    for name in &names {
        if !known.contains(name) {
            return Err(ConfigError {
                setting,
                message: format!(
                    "unknown exporter {name:?}; this build knows {}",
                    known.join(", ")
                ),
            });
        }
    }
    Ok(names)
}

/// An OTLP endpoint: an `http://` URL with a host.
fn otlp_endpoint(setting: &'static str, value: &str) -> Result<String, ConfigError> {
    let fail = |message: String| Err(ConfigError { setting, message });
    let uri: http::Uri = match value.parse() {
        Ok(uri) => uri,
        Err(e) => return fail(format!("{e} (expected e.g. http://otel-collector:4317)")),
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return fail(
                "https needs TLS toward the collector, which this build does not include; use http:// (a collector on the node or in the pod)".into(),
            );
        }
        _ => return fail(format!("{value:?} is not an http:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return fail(format!("{value:?} has no host"));
    }
    Ok(value.to_owned())
}

impl Config {
    /// The OpenTelemetry settings, or the first invalid one. Nothing is exported
    /// unless an endpoint is set, `OTEL_SDK_DISABLED` is not, and the signal's
    /// exporter is `otlp`.
    pub fn otel(&self) -> Result<OtelSettings, ConfigError> {
        let protocol = match self.otel_exporter_otlp_protocol.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                return Err(ConfigError {
                    setting: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    message: format!(
                        "{other:?} is not supported; this build speaks grpc and http/protobuf"
                    ),
                });
            }
        };
        // Over HTTP, the general endpoint is a base URL and each signal has its
        // path; a signal's own endpoint is used as it is.
        let signal_path = |endpoint: String, path: &str| match protocol {
            OtlpProtocol::Grpc => endpoint,
            OtlpProtocol::HttpProtobuf => format!("{}{path}", endpoint.trim_end_matches('/')),
        };
        let traces = exporters(
            "OTEL_TRACES_EXPORTER",
            &self.otel_traces_exporter,
            &["otlp", "none"],
        )?;
        let metrics = exporters(
            "OTEL_METRICS_EXPORTER",
            &self.otel_metrics_exporter,
            &["otlp", "prometheus", "none"],
        )?;
        let general = present(&self.otel_exporter_otlp_endpoint)
            .map(|e| otlp_endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", e))
            .transpose()?;
        let traces_endpoint = match present(&self.otel_exporter_otlp_traces_endpoint) {
            Some(e) => Some(otlp_endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e)?),
            None => general.clone().map(|e| signal_path(e, "/v1/traces")),
        };
        let metrics_endpoint = match present(&self.otel_exporter_otlp_metrics_endpoint) {
            Some(e) => Some(otlp_endpoint("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", e)?),
            None => general.map(|e| signal_path(e, "/v1/metrics")),
        };
        let sampler = self.otel_traces_sampler.trim();
        let ratio_arg = match present(&self.otel_traces_sampler_arg) {
            Some(arg) => match arg.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Some(r),
                _ => {
                    return Err(ConfigError {
                        setting: "OTEL_TRACES_SAMPLER_ARG",
                        message: format!("must be a number from 0 to 1, got {arg:?}"),
                    });
                }
            },
            None => None,
        };
        let (parent_based, ratio) = match sampler {
            "always_on" => (false, 1.0),
            "always_off" => (false, 0.0),
            "traceidratio" => (false, ratio_arg.unwrap_or(1.0)),
            "parentbased_always_on" => (true, 1.0),
            "parentbased_always_off" => (true, 0.0),
            "parentbased_traceidratio" => (true, ratio_arg.unwrap_or(1.0)),
            other => {
                return Err(ConfigError {
                    setting: "OTEL_TRACES_SAMPLER",
                    message: format!(
                        "unknown sampler {other:?}; known samplers: always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                    ),
                });
            }
        };
        let on = !self.otel_sdk_disabled;
        Ok(OtelSettings {
            protocol,
            traces_endpoint: traces_endpoint.filter(|_| on && traces.contains(&"otlp")),
            metrics_endpoint: metrics_endpoint.filter(|_| on && metrics.contains(&"otlp")),
            parent_based,
            ratio,
            service_name: present(&self.otel_service_name).map(str::to_owned),
        })
    }
}

/// `Some(d)` unless `d` is zero (the "disabled" value of optional durations).
pub fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("384MiB"), Ok(384 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes(" 512Mi "), Ok(512 << 20));
        assert!(parse_bytes("2GB").is_err());
        assert!(parse_bytes("MiB").is_err());
        let c = Config::try_parse_from(["tidewatch", "--memory-budget", "64MiB"]).unwrap();
        assert_eq!(c.memory_budget(), (64 << 20, BudgetSource::Setting));
        assert_eq!(c.engine().memory_budget, 64 << 20);
        let small = Config::try_parse_from(["tidewatch", "--memory-budget", "1000"]).unwrap();
        assert_eq!(small.validate().unwrap_err().setting, "MEMORY_BUDGET");
        let wide = Config::try_parse_from(["tidewatch", "--max-stream-window", "4097"]).unwrap();
        assert_eq!(wide.validate().unwrap_err().setting, "MAX_STREAM_WINDOW");
    }

    #[test]
    fn the_cgroup_memory_limit_is_found_for_v1_and_v2() {
        let root = std::env::temp_dir().join(format!("tidewatch-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // v2: the process's own cgroup, "max" at the root.
        std::fs::create_dir_all(root.join("pod/app")).unwrap();
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("pod/app/memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_limit_in(&root, "0::/pod/app\n"), Some(512 << 20));
        assert_eq!(cgroup_limit_in(&root, "0::/\n"), None, "max is no limit");
        // v1: the memory controller's hierarchy; the unlimited value is no limit.
        std::fs::create_dir_all(root.join("memory/job")).unwrap();
        std::fs::write(
            root.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        std::fs::write(root.join("memory/job/memory.limit_in_bytes"), "1073741824").unwrap();
        let v1 = "5:memory:/job\n4:cpu,cpuacct:/job\n";
        std::fs::remove_file(root.join("memory.max")).unwrap();
        assert_eq!(cgroup_limit_in(&root, v1), Some(1 << 30));
        assert_eq!(cgroup_limit_in(&root, "5:memory:/elsewhere\n"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn defaults_are_valid_and_local() {
        let c = Config::defaults();
        c.validate().unwrap();
        assert_eq!(c.grpc_addr, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.listen_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((c.window_size, c.min_samples, c.z_threshold), (50, 5, 2.0));
        assert_eq!(c.redis_url(), None);
        assert_eq!(c.snapshot_interval, Duration::from_secs(1));
        assert_eq!(c.snapshot_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn flags_parse() {
        let c =
            Config::try_parse_from(["tidewatch", "--window-size", "10", "--idle-timeout", "90s"])
                .unwrap();
        assert_eq!(c.window_size, 10);
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert!(c.flush_consolidation, "on by default");
        for (value, expected) in [("false", false), ("0", false), ("true", true), ("on", true)] {
            let c = Config::try_parse_from(["tidewatch", "--flush-consolidation", value]).unwrap();
            assert_eq!(c.flush_consolidation, expected, "{value}");
        }
    }

    #[test]
    fn grpc_compression_parses() {
        assert_eq!(Config::defaults().grpc_compression, [GrpcCompression::Off]);
        let c = Config::try_parse_from(["tidewatch", "--grpc-compression", "zstd,gzip"]).unwrap();
        assert_eq!(
            c.grpc_compression,
            [GrpcCompression::Zstd, GrpcCompression::Gzip]
        );
        c.validate().unwrap();
        assert!(Config::try_parse_from(["tidewatch", "--grpc-compression", "br"]).is_err());
        let c = Config::try_parse_from(["tidewatch", "--grpc-compression", "gzip,off"]).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "GRPC_COMPRESSION");
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let mut c = Config::defaults();
        c.min_samples = 60;
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "MIN_SAMPLES");
        assert!(
            e.to_string()
                .starts_with("invalid configuration: MIN_SAMPLES:")
        );
        let mut c = Config::defaults();
        c.z_threshold = f64::NAN;
        assert_eq!(c.validate().unwrap_err().setting, "Z_THRESHOLD");
        let mut c = Config::defaults();
        c.redis_url = Some("http://nope".into());
        assert_eq!(c.validate().unwrap_err().setting, "REDIS_URL");
        c.redis_url = Some("redis://127.0.0.1:6379".into());
        c.redis_cluster_nodes = Some("127.0.0.1:7000".into());
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "REDIS_CLUSTER_NODES");
        assert!(e.to_string().contains("not both"), "{e}");
        c.redis_url = None;
        c.validate().expect("a cluster alone is fine");
        c.redis_cluster_nodes = Some(vec!["127.0.0.1:7000"; 65].join(","));
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
        c.redis_cluster_nodes = None;
        let mut c = Config::defaults();
        c.snapshot_ttl = Duration::from_millis(10);
        assert_eq!(c.validate().unwrap_err().setting, "SNAPSHOT_TTL");
        let mut c = Config::defaults();
        c.snapshot_max_bytes = 1023;
        assert_eq!(c.validate().unwrap_err().setting, "SNAPSHOT_MAX_BYTES");
        c.snapshot_max_bytes = 1024;
        c.validate().unwrap();
        let mut c = Config::defaults();
        c.redis_command_timeout = Duration::ZERO;
        assert_eq!(c.validate().unwrap_err().setting, "REDIS_COMMAND_TIMEOUT");
        let mut c = Config::defaults();
        c.window_size = 65_536;
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "WINDOW_SIZE");
        assert!(e.to_string().contains("between 1 and 65535"), "{e}");
        c.window_size = 65_535;
        c.validate().unwrap();
    }

    #[test]
    fn redis_settings_go_together_and_the_password_is_never_shown() {
        let secret = "pa55-w0rd";
        let c = Config::try_parse_from([
            "tidewatch",
            "--redis-url",
            &format!("rediss://app:{secret}@redis:6380/1"),
        ])
        .unwrap();
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains(secret), "{c:?}");
        assert!(format!("{c:?}").contains("rediss://app:***@redis:6380/1"));
        assert!(!c.redis_url.as_ref().unwrap().to_string().contains(secret));
        type Change = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "REDIS_CLIENT_KEY",
                Box::new(|c| c.redis_client_cert = Some("c.pem".into())),
            ),
            (
                "REDIS_CLIENT_CERT",
                Box::new(|c| c.redis_client_key = Some("c.key".into())),
            ),
            (
                "REDIS_URL",
                Box::new(|c| c.redis_url = Some("rediss://redis:6380/#insecure".into())),
            ),
            (
                "REDIS_CA_FILE",
                Box::new(move |c| {
                    c.redis_url = Some(format!("redis://:{secret}@redis:6379").into());
                    c.redis_ca_file = Some("ca.pem".into());
                }),
            ),
            (
                "REDIS_PASSWORD_FILE",
                Box::new(|c| {
                    c.redis_url = None;
                    c.redis_password_file = Some("password".into());
                }),
            ),
        ];
        for (setting, change) in cases {
            let mut c = c.clone();
            change(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.setting, setting, "{e}");
            assert!(!e.to_string().contains(secret), "{e}");
        }
    }

    #[test]
    fn reflection_modes_parse_with_the_old_booleans() {
        assert_eq!(Config::defaults().reflection, Reflection::Auth);
        for (value, expected) in [
            ("auth", Reflection::Auth),
            ("open", Reflection::Open),
            ("off", Reflection::Off),
            ("true", Reflection::Auth),
            ("false", Reflection::Off),
        ] {
            let c = Config::try_parse_from(["tidewatch", "--reflection", value]).unwrap();
            assert_eq!(c.reflection, expected, "{value}");
        }
        assert!(Config::try_parse_from(["tidewatch", "--reflection", "maybe"]).is_err());
    }

    #[test]
    fn overload_settings() {
        let c = Config::try_parse_from([
            "tidewatch",
            "--max-body-bytes",
            "2048",
            "--request-timeout",
            "0",
            "--http-concurrency-limit",
            "1",
            "--grpc-concurrency-limit",
            "0",
            "--shutdown-delay",
            "5s",
        ])
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_body_bytes, 2048);
        assert_eq!(c.request_timeout, Duration::ZERO);
        assert_eq!((c.http_concurrency_limit, c.grpc_concurrency_limit), (1, 0));
        let mut c = Config::defaults();
        c.shutdown_delay = c.shutdown_timeout;
        assert_eq!(c.validate().unwrap_err().setting, "SHUTDOWN_DELAY");
        let mut c = Config::defaults();
        c.max_body_bytes = 10;
        assert_eq!(c.validate().unwrap_err().setting, "MAX_BODY_BYTES");
    }

    #[test]
    fn connection_and_intake_settings() {
        let c = Config::try_parse_from([
            "tidewatch",
            "--max-connections",
            "100",
            "--connection-idle-timeout",
            "0",
            "--max-concurrent-streams",
            "50",
            "--http2-keepalive-interval",
            "0",
            "--max-incomplete-bytes",
            "1048576",
            "--min-upload-rate",
            "0",
            "--first-message-timeout",
            "2s",
        ])
        .unwrap();
        c.validate().unwrap();
        assert_eq!((c.max_connections, c.max_concurrent_streams), (100, 50));
        assert_eq!(c.connection_idle_timeout, Duration::ZERO);
        assert_eq!(c.max_incomplete_bytes, 1 << 20);
        assert_eq!(c.first_message_timeout, Duration::from_secs(2));
        let d = Config::defaults();
        assert_eq!(d.header_read_timeout, Duration::from_secs(10));
        assert_eq!(d.min_upload_rate, 1024);
        for (setting, change) in [
            (
                "MAX_CONCURRENT_STREAMS",
                (|c: &mut Config| c.max_concurrent_streams = 0) as fn(&mut Config),
            ),
            ("HEADER_READ_TIMEOUT", |c: &mut Config| {
                c.header_read_timeout = Duration::ZERO
            }),
            ("HTTP2_KEEPALIVE_TIMEOUT", |c: &mut Config| {
                c.http2_keepalive_timeout = Duration::ZERO;
            }),
        ] {
            let mut c = Config::defaults();
            change(&mut c);
            assert_eq!(c.validate().unwrap_err().setting, setting);
        }
    }

    #[test]
    fn unknown_detector_names_the_setting() {
        let mut c = Config::defaults();
        c.detectors.detector = "magic".into();
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "DETECTOR");
        assert!(e.to_string().contains("zscore, robust"), "{e}");
    }

    #[test]
    fn detector_flags_reach_the_engine() {
        let c = Config::try_parse_from([
            "tidewatch",
            "--detector",
            "robust",
            "--robust-window",
            "64",
            "--alert-cooldown",
            "5",
        ])
        .unwrap();
        c.validate().unwrap();
        let e = c.engine();
        assert_eq!(e.detector, DetectorKind::Robust);
        assert_eq!((e.robust.window, e.alert_cooldown), (64, 5));
        assert_eq!(Config::defaults().engine().detector, DetectorKind::ZScore);
    }

    #[test]
    fn otel_exports_only_with_an_endpoint() {
        let c = Config::defaults();
        let otel = c.otel().unwrap();
        assert_eq!(otel.traces_endpoint, None);
        assert_eq!(otel.metrics_endpoint, None);
        assert!(otel.parent_based);
        assert_eq!(otel.ratio, 1.0);
        let endpoint = "http://127.0.0.1:4317";
        let mut c = Config::defaults();
        c.otel_exporter_otlp_endpoint = Some(endpoint.into());
        let otel = c.otel().unwrap();
        assert_eq!(otel.traces_endpoint.as_deref(), Some(endpoint));
        assert_eq!(otel.metrics_endpoint.as_deref(), Some(endpoint));
        for (field, traces, metrics) in [
            ("sdk", None, None),
            ("traces", None, Some(endpoint)),
            ("metrics", Some(endpoint), None),
            ("both-none", None, None),
        ] {
            let mut c = c.clone();
            match field {
                "sdk" => c.otel_sdk_disabled = true,
                "traces" => c.otel_traces_exporter = "none".into(),
                "metrics" => c.otel_metrics_exporter = "prometheus".into(),
                _ => {
                    c.otel_traces_exporter = "none".into();
                    c.otel_metrics_exporter = "none".into();
                }
            }
            let otel = c.otel().unwrap();
            assert_eq!(otel.traces_endpoint.as_deref(), traces, "{field}");
            assert_eq!(otel.metrics_endpoint.as_deref(), metrics, "{field}");
        }
        let mut c = c.clone();
        c.otel_exporter_otlp_traces_endpoint = Some("http://traces:4317".into());
        c.otel_exporter_otlp_endpoint = Some("  ".into());
        let otel = c.otel().unwrap();
        assert_eq!(otel.traces_endpoint.as_deref(), Some("http://traces:4317"));
        assert_eq!(otel.metrics_endpoint, None, "a blank endpoint is unset");
        // Over HTTP the general endpoint is a base URL; a signal's is used as is.
        let mut c = Config::defaults();
        c.otel_exporter_otlp_protocol = "http/protobuf".into();
        c.otel_exporter_otlp_endpoint = Some("http://collector:4318/".into());
        let otel = c.otel().unwrap();
        assert_eq!(otel.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            otel.traces_endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            otel.metrics_endpoint.as_deref(),
            Some("http://collector:4318/v1/metrics")
        );
        c.otel_exporter_otlp_metrics_endpoint = Some("http://m:4318/custom".into());
        let otel = c.otel().unwrap();
        assert_eq!(
            otel.metrics_endpoint.as_deref(),
            Some("http://m:4318/custom")
        );
    }

    #[test]
    fn otel_samplers_parse() {
        let mut c = Config::defaults();
        c.otel_traces_sampler = "parentbased_traceidratio".into();
        c.otel_traces_sampler_arg = Some("0.25".into());
        let otel = c.otel().unwrap();
        assert!(otel.parent_based);
        assert_eq!(otel.ratio, 0.25);
        c.otel_traces_sampler = "always_off".into();
        let otel = c.otel().unwrap();
        assert!(!otel.parent_based);
        assert_eq!(otel.ratio, 0.0);
        c.otel_traces_sampler = "traceidratio".into();
        c.otel_traces_sampler_arg = None;
        assert_eq!(c.otel().unwrap().ratio, 1.0);
    }

    #[test]
    fn invalid_otel_settings_name_the_setting() {
        for (setting, value) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_METRICS_EXPORTER", "otlp,console"),
            ("OTEL_TRACES_SAMPLER", "xray"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ("OTEL_TRACES_SAMPLER_ARG", "half"),
        ] {
            let mut c = Config::defaults();
            match setting {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => c.otel_exporter_otlp_endpoint = Some(value.into()),
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => {
                    c.otel_exporter_otlp_traces_endpoint = Some(value.into())
                }
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" => {
                    c.otel_exporter_otlp_metrics_endpoint = Some(value.into())
                }
                "OTEL_EXPORTER_OTLP_PROTOCOL" => c.otel_exporter_otlp_protocol = value.into(),
                "OTEL_TRACES_EXPORTER" => c.otel_traces_exporter = value.into(),
                "OTEL_METRICS_EXPORTER" => c.otel_metrics_exporter = value.into(),
                "OTEL_TRACES_SAMPLER" => c.otel_traces_sampler = value.into(),
                _ => {
                    c.otel_traces_sampler = "traceidratio".into();
                    c.otel_traces_sampler_arg = Some(value.into());
                }
            }
            let e = c.validate().unwrap_err();
            assert_eq!(e.setting, setting, "{value}: {e}");
        }
    }
}
