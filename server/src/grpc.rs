//! The gRPC server: `tidewatch.v1.TelemetryService`, gRPC health and reflection (v1 and
//! v1alpha, since grpcurl 1.8 speaks only v1alpha).

pub(crate) mod analyze;
mod incoming;
mod ingest;
mod watch;

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tidewatch_proto::v1::{
    AnalyzeRequest, AnalyzeResponse, IngestRequest, WatchAnomaliesRequest, WatchAnomaliesResponse,
    telemetry_service_server::{TelemetryService, TelemetryServiceServer},
};
use tonic::{Request, Response, Status, Streaming};

use crate::AppState;
pub(crate) use incoming::incoming;

/// The name under which health reports the service.
pub const SERVICE_NAME: &str = "tidewatch.v1.TelemetryService";

/// The `TelemetryService` implementation; cheap to clone.
#[derive(Debug, Clone)]
pub struct TelemetryApi {
    /// Engine, limits, broadcaster and shutdown token shared with the gateway.
    state: Arc<AppState>,
}

impl TelemetryApi {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// The tonic server for this service, with message size limits applied.
    pub fn into_server(self) -> TelemetryServiceServer<Self> {
        let max = self.state.config.max_message_bytes;
        TelemetryServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TelemetryService for TelemetryApi {
    type IngestStream = ingest::IngestStream;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        ingest::start(&self.state, request).map(Response::new)
    }

    async fn analyze(
        &self,
        request: Request<AnalyzeRequest>,
    ) -> Result<Response<AnalyzeResponse>, Status> {
        analyze::analyze(&self.state, request.get_ref())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type WatchAnomaliesStream = BoxStream<WatchAnomaliesResponse>;

    async fn watch_anomalies(
        &self,
        request: Request<WatchAnomaliesRequest>,
    ) -> Result<Response<Self::WatchAnomaliesStream>, Status> {
        Ok(Response::new(watch::watch(
            &self.state,
            request.into_inner(),
        )))
    }
}
