//! Rust client for [tidewatch](https://github.com/tidewatch/tidewatch), the streaming
//! anomaly-detection service.
//!
//! - [`Client::connect`] opens an HTTP/2 connection with keepalive pings every 30 s
//!   (never more often: servers answer ping floods with `GOAWAY`).
//! - [`Client::ingest`] starts an [`IngestSession`]: push [`Sample`]s, receive one
//!   [`Answered`] (the sample and its [`Verdict`]) per sample, in order. The session
//!   batches samples (at most [`SessionConfig::max_batch`] per message, waiting at most
//!   [`SessionConfig::linger`] for a batch to fill), assigns a per-device `seq` when the
//!   caller leaves it 0, and when the stream breaks (server shutdown, connection reset,
//!   server killed) reconnects with exponential backoff and jitter and re-sends every
//!   sample not yet answered. Re-sending is safe: the server answers a sample whose
//!   `seq` it has already applied with `duplicate: true` and leaves the window alone.
//! - [`Client::analyze`] returns the window statistics of a device.
//! - [`Client::delete_device`] deletes a device's state on every replica and in Redis
//!   (the `admin` scope when the server authenticates).
//! - [`Client::watch_anomalies`] streams anomalous verdicts as they happen.
//! - TLS ([`ClientConfig::tls`], an `https://` URL) and a bearer token
//!   ([`ClientConfig::token`]: static, or a callback that returns a refreshed one) for
//!   a server with authentication on; see [`auth`].
//!
//! # Example
//!
//! Start the service (`cargo run --release` in the repository), then:
//!
//! ```no_run
//! use tidewatch_client::{Client, SampleExt, sample};
//!
//! # async fn example() -> Result<(), tidewatch_client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let mut session = client.ingest();
//! for rps in [420.0, 430.0, 410.0, 440.0, 425.0, 900.0] {
//!     session.send(sample("sensor-1").metric("rps", rps)).await?;
//! }
//! session.close_input();
//! while let Some(answered) = session.next().await {
//!     let answered = answered?;
//!     let v = &answered.verdict;
//!     println!("seq {} anomaly {} z {:?}", v.seq, v.anomaly, v.metrics[0].z_score);
//! }
//! let stats = client.analyze("sensor-1").await?;
//! println!("rolling average {}", stats.metrics[0].rolling_average);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/quickstart.rs` is the same program: `cargo run -p tidewatch-client
//! --example quickstart -- http://127.0.0.1:50051`.
//!
//! With TLS and a token:
//!
//! ```no_run
//! use tidewatch_client::{Client, ClientConfig, auth::{Token, tls_from_pem}};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = std::fs::read("ca.pem")?;
//! let mut config = ClientConfig::new("https://tidewatch.example.com:50051");
//! config.tls = Some(tls_from_pem(ca, None::<(Vec<u8>, Vec<u8>)>));
//! config.token = Some(Token::fixed(std::env::var("TIDEWATCH_TOKEN")?));
//! let client = Client::connect_with(config).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`Client`] (this file): connection, `Analyze`, `DeleteDevice`, `WatchAnomalies`.
//! - [`auth`]: TLS settings and the token interceptor.
//! - [`session`]: the batching, reconnecting Ingest session.
//! - [`backoff`]: reconnect delays.
//! - [`error`]: the typed [`Error`].
//!
//! The load generator and the baseline servers of the benchmark suite live in
//! `tools/loadgen`, so an SDK user compiles none of their dependencies.

pub mod auth;
pub mod backoff;
pub mod error;
pub mod session;

use std::{collections::BTreeMap, time::Duration};

use futures::{Stream, StreamExt};
use tidewatch_proto::v1::{
    AnalyzeRequest, DeleteDeviceRequest, WatchAnomaliesRequest,
    telemetry_service_client::TelemetryServiceClient,
};
use tonic::{
    Code,
    service::interceptor::InterceptedService,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use auth::{Credentials, Token};

pub use backoff::Backoff;
pub use error::Error;
pub use session::{Answered, IngestSession, SessionConfig};
pub use tidewatch_proto::v1::{
    AnalyzeResponse, DeleteDeviceResponse, MetricStats, MetricVerdict, Sample, Verdict,
    WatchAnomaliesResponse,
};
/// The generated protobuf types and stubs, for what this API does not wrap.
pub use tidewatch_proto::{self as proto, pbjson_types::Timestamp};

/// HTTP/2 keepalive ping interval. gRPC servers (grpc-go's default enforcement policy)
/// answer pings more frequent than every 5 minutes on idle connections, or every
/// 10 s on busy ones, with `GOAWAY too_many_pings`; 30 s keeps NATs and load balancers
/// from dropping idle streams without tripping any common policy.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// The channel every call goes through: the connection plus the token interceptor.
pub type Transport = InterceptedService<Channel, Credentials>;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server URL, such as `http://127.0.0.1:50051`, or `https://...` with [`Self::tls`].
    pub url: String,
    /// TLS settings (CA, client certificate for mutual TLS, server name); required for
    /// an `https://` URL. See [`auth::tls_from_pem`].
    pub tls: Option<ClientTlsConfig>,
    /// Bearer token sent on every call (`authorization: Bearer <token>`).
    pub token: Option<Token>,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval; raised to [`KEEPALIVE_INTERVAL`] when lower.
    pub keepalive_interval: Duration,
    /// A ping not answered within this closes the connection (then sessions reconnect).
    pub keepalive_timeout: Duration,
    /// Deadline of unary calls (`Analyze`).
    pub request_timeout: Duration,
}

impl ClientConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            token: None,
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// The tonic endpoint for these settings.
    fn endpoint(&self) -> Result<Endpoint, Error> {
        let endpoint =
            Endpoint::from_shared(self.url.clone()).map_err(|source| Error::InvalidEndpoint {
                url: self.url.clone(),
                source,
            })?;
        let endpoint = match &self.tls {
            Some(tls) => {
                endpoint
                    .tls_config(tls.clone())
                    .map_err(|source| Error::InvalidEndpoint {
                        url: self.url.clone(),
                        source,
                    })?
            }
            None => endpoint,
        };
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(self.keepalive_interval.max(KEEPALIVE_INTERVAL))
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true))
    }
}

/// A connection to a tidewatch server; cheap to clone (clones share the connection).
///
/// The underlying channel reconnects by itself when the connection drops; calls made
/// while the server is unreachable fail with a retryable [`Error`].
#[derive(Debug, Clone)]
pub struct Client {
    /// The generated stub over the shared channel.
    grpc: TelemetryServiceClient<Transport>,
    /// Settings, for sessions and deadlines.
    config: ClientConfig,
}

impl Client {
    /// Connects to `url` with the default settings.
    pub async fn connect(url: impl Into<String>) -> Result<Self, Error> {
        Self::connect_with(ClientConfig::new(url)).await
    }

    /// Connects with `config`; fails when the server cannot be reached now.
    pub async fn connect_with(config: ClientConfig) -> Result<Self, Error> {
        let channel = config
            .endpoint()?
            .connect()
            .await
            .map_err(|source| Error::Connect {
                url: config.url.clone(),
                source,
            })?;
        Ok(Self::from_channel(channel, config))
    }

    /// A client that connects on first use (and keeps reconnecting): for devices that
    /// start before the server is reachable.
    pub fn connect_lazy(config: ClientConfig) -> Result<Self, Error> {
        let channel = config.endpoint()?.connect_lazy();
        Ok(Self::from_channel(channel, config))
    }

    fn from_channel(channel: Channel, config: ClientConfig) -> Self {
        let credentials = Credentials::new(config.token.clone());
        let grpc = TelemetryServiceClient::with_interceptor(channel, credentials)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        Self { grpc, config }
    }

    /// The generated stub, for calls this API does not wrap (it sends the token too).
    pub fn raw(&self) -> TelemetryServiceClient<Transport> {
        self.grpc.clone()
    }

    /// Starts an Ingest session with the default [`SessionConfig`].
    pub fn ingest(&self) -> IngestSession {
        self.ingest_with(SessionConfig::default())
    }

    /// Starts an Ingest session. The stream opens with the first sample; the session
    /// runs in a background task of the current Tokio runtime.
    pub fn ingest_with(&self, config: SessionConfig) -> IngestSession {
        IngestSession::start(self.grpc.clone(), config)
    }

    /// Current window statistics of `device_id` (empty means `"default"`);
    /// [`Error::NotFound`] when the server has no state for it.
    pub async fn analyze(&self, device_id: &str) -> Result<AnalyzeResponse, Error> {
        let mut request = tonic::Request::new(AnalyzeRequest {
            device_id: device_id.to_string(),
        });
        request.set_timeout(self.config.request_timeout);
        match self.grpc.clone().analyze(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == Code::NotFound => Err(Error::NotFound {
                device_id: device_id.to_string(),
            }),
            Err(status) => Err(status.into()),
        }
    }

    /// Deletes the state of `device_id` (empty means `"default"`) from the memory of
    /// every replica and from Redis: its next sample starts fresh. `deleted` in the
    /// answer says whether it had any. Needs the `admin` scope when the server
    /// authenticates ([`Error::Status`] with `PERMISSION_DENIED` otherwise);
    /// `UNAVAILABLE` means nothing was deleted and the call may be sent again.
    pub async fn delete_device(&self, device_id: &str) -> Result<DeleteDeviceResponse, Error> {
        let mut request = tonic::Request::new(DeleteDeviceRequest {
            device_id: device_id.to_string(),
        });
        request.set_timeout(self.config.request_timeout);
        Ok(self.grpc.clone().delete_device(request).await?.into_inner())
    }

    /// The live feed of anomalous verdicts, filtered by device ids and metric names
    /// (empty lists mean everything). The stream ends with an error when the server
    /// goes away; call again to resubscribe (events in between are not replayed).
    /// Each event's `missed` counts events dropped because this watcher read slowly.
    pub async fn watch_anomalies(
        &self,
        device_ids: &[&str],
        metrics: &[&str],
    ) -> Result<impl Stream<Item = Result<WatchAnomaliesResponse, Error>> + Send + 'static, Error>
    {
        let request = WatchAnomaliesRequest {
            device_ids: device_ids.iter().map(|d| (*d).to_string()).collect(),
            metrics: metrics.iter().map(|m| (*m).to_string()).collect(),
        };
        let stream = self
            .grpc
            .clone()
            .watch_anomalies(request)
            .await?
            .into_inner();
        Ok(stream.map(|item| item.map_err(Error::from)))
    }
}

/// A sample of `device_id` with no metrics yet, no time (the server's receive time) and
/// no seq (the session assigns one); add metrics with [`SampleExt::metric`].
pub fn sample(device_id: impl Into<String>) -> Sample {
    Sample {
        device_id: device_id.into(),
        time: None,
        metrics: BTreeMap::new(),
        seq: 0,
    }
}

/// Builder methods for [`Sample`] (a generated type, hence a trait).
pub trait SampleExt {
    /// Adds a metric value.
    fn metric(self, name: impl Into<String>, value: f64) -> Self;
    /// Sets the time the sample was taken.
    fn at(self, time: std::time::SystemTime) -> Self;
    /// Sets the seq explicitly (per device, increasing); 0 lets the session assign one.
    fn with_seq(self, seq: u64) -> Self;
}

impl SampleExt for Sample {
    fn metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }

    fn at(mut self, time: std::time::SystemTime) -> Self {
        self.time = Some(timestamp(time));
        self
    }

    fn with_seq(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }
}

/// A protobuf timestamp for `time` (times before 1970 are clamped to the epoch).
pub fn timestamp(time: std::time::SystemTime) -> Timestamp {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}
