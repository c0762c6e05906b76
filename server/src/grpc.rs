//! The gRPC server: `tidewatch.v1.TelemetryService`, gRPC health and reflection (v1 and
//! v1alpha, since grpcurl 1.8 speaks only v1alpha).

pub mod fast;
mod ingest;
pub(crate) mod watch;

use std::{
    convert::Infallible,
    future::ready,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use prost::Message as _;
use tidewatch_proto::v1::{
    AnalyzeRequest, AnalyzeResponse, DeleteDeviceRequest, DeleteDeviceResponse, IngestRequest,
    IngestResponse, WatchAnomaliesRequest, WatchAnomaliesResponse,
    telemetry_service_server::{TelemetryService, TelemetryServiceServer},
};
use tonic::{
    Request, Response, Status, Streaming,
    body::Body,
    codec::CompressionEncoding,
    codegen::{BoxFuture, Service},
    server::NamedService,
};

use crate::{
    config::{Config, GrpcCompression},
    security::{policy::Principal, tls::PeerInfo},
    service::AppState,
    telemetry::rpc::RpcCall,
};
use fast::WireRequest;
pub(crate) use fast::incoming;

/// The path of the `Ingest` method, which [`TelemetryRouter`] serves with its own body
/// ([`fast`]).
const INGEST_PATH: &str = "/tidewatch.v1.TelemetryService/Ingest";

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

    /// The tonic service: `Ingest` through the [`fast`] path, the other methods through
    /// the generated server, with message size limits and compression applied.
    pub fn into_server(self) -> TelemetryRouter {
        let state = Arc::clone(&self.state);
        let max = state.config.max_message_bytes;
        let (accept, send) = compression(&state.config);
        let send_fast = response_encodings(&state.config);
        let mut generated = TelemetryServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX);
        for encoding in accept {
            generated = generated.accept_compressed(encoding);
        }
        for encoding in send {
            generated = generated.send_compressed(encoding);
        }
        TelemetryRouter {
            state,
            send: send_fast,
            generated,
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TelemetryService for TelemetryApi {
    type IngestStream = BoxStream<IngestResponse>;

    /// `Ingest` through prost types, for a host that mounts the generated server
    /// itself: the same stream as [`TelemetryRouter`] serves, with each message
    /// re-encoded on the way in and decoded on the way out.
    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let (metadata, extensions, inbound) = request.into_parts();
        let inbound = inbound.map(|request| {
            request.and_then(|r| {
                WireRequest::decode(Bytes::from(r.encode_to_vec())).map_err(Status::from)
            })
        });
        let stream = ingest::start(
            &self.state,
            Request::from_parts(metadata, extensions, inbound),
        )?;
        Ok(Response::new(Box::pin(stream.map(|response| {
            response.and_then(|bytes| {
                IngestResponse::decode(bytes).map_err(|e| Status::internal(e.to_string()))
            })
        }))))
    }

    async fn analyze(
        &self,
        request: Request<AnalyzeRequest>,
    ) -> Result<Response<AnalyzeResponse>, Status> {
        let principal = caller(&self.state, request.extensions())?;
        self.state
            .analyze(&principal, request.get_ref())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn delete_device(
        &self,
        request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        let principal = caller(&self.state, request.extensions())?;
        self.state
            .delete_device(&principal, request.get_ref())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type WatchAnomaliesStream = BoxStream<WatchAnomaliesResponse>;

    async fn watch_anomalies(
        &self,
        request: Request<WatchAnomaliesRequest>,
    ) -> Result<Response<Self::WatchAnomaliesStream>, Status> {
        let principal = caller(&self.state, request.extensions())?;
        watch::watch(&self.state, principal, request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// `tidewatch.v1.TelemetryService` as tonic serves it: `Ingest` by the [`fast`] path
/// (its own HTTP body and codec: no allocation per sample or verdict, one output
/// chunk per batch of received messages; its contract is in [`fast`]), `Analyze` and
/// `WatchAnomalies` by the generated prost server. Health, reflection and every client
/// see one ordinary service.
#[derive(Debug, Clone)]
pub struct TelemetryRouter {
    state: Arc<AppState>,
    /// The encodings `Ingest` responses may use (`GRPC_COMPRESSION`).
    send: Arc<[fast::Encoding]>,
    generated: TelemetryServiceServer<TelemetryApi>,
}

impl NamedService for TelemetryRouter {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for TelemetryRouter
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut request = request;
        if let Err(status) = authenticate(&self.state, &mut request) {
            return Box::pin(ready(Ok(status.into_http())));
        }
        if request.uri().path() != INGEST_PATH {
            return self.generated.call(request);
        }
        Box::pin(ready(Ok(serve_ingest(&self.state, &self.send, request))))
    }
}

/// The compressions of the generated services (tonic's): requests in gzip, deflate and
/// zstd are accepted; responses use those of `GRPC_COMPRESSION` that the client
/// accepts (docs/api.md, "Compression"). Health and reflection get the same.
pub(crate) fn compression(config: &Config) -> ([CompressionEncoding; 3], Vec<CompressionEncoding>) {
    // Accepted in this order: tonic's `grpc-accept-encoding` lists them so, as the fast
    // path's does.
    let accept = [
        CompressionEncoding::Gzip,
        CompressionEncoding::Deflate,
        CompressionEncoding::Zstd,
    ];
    let send = response_encodings(config)
        .iter()
        .map(|encoding| match encoding {
            fast::Encoding::Gzip => CompressionEncoding::Gzip,
            fast::Encoding::Deflate => CompressionEncoding::Deflate,
            fast::Encoding::Zstd => CompressionEncoding::Zstd,
        })
        .collect();
    (accept, send)
}

/// The encodings of `GRPC_COMPRESSION`, in its order; none for `off`.
fn response_encodings(config: &Config) -> Arc<[fast::Encoding]> {
    config
        .grpc_compression
        .iter()
        .filter_map(|c| match c {
            GrpcCompression::Gzip => Some(fast::Encoding::Gzip),
            GrpcCompression::Deflate => Some(fast::Encoding::Deflate),
            GrpcCompression::Zstd => Some(fast::Encoding::Zstd),
            GrpcCompression::Off => None,
        })
        .collect()
}

/// Serves an `Ingest` call through the [`fast`] path, carrying the service's stream;
/// `send`: the encodings its responses may use.
pub(crate) fn serve_ingest<B>(
    state: &Arc<AppState>,
    send: &[fast::Encoding],
    request: http::Request<B>,
) -> http::Response<Body>
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    fast::serve(request, state.config.max_message_bytes, send, |request| {
        let principal = caller(state, request.extensions())?;
        let call = request.extensions().get::<RpcCall>().cloned();
        ingest::StreamCore::start(state, principal, call)
    })
}

/// Finds the caller of a call from its `authorization` header and its connection's
/// client certificate, and puts it in the request's extensions for the method.
/// Once per call: an `Ingest` stream is authenticated when it opens, not per message.
fn authenticate<B>(state: &AppState, request: &mut http::Request<B>) -> Result<(), Status> {
    let identity = request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|peer| peer.identity.clone());
    let authorization = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(http::HeaderValue::as_bytes);
    let principal = state
        .security
        .principal(authorization, identity.as_deref())?;
    request.extensions_mut().insert(principal);
    Ok(())
}

/// The caller [`TelemetryRouter`] authenticated; without it (the generated server
/// mounted on its own) the anonymous principal when authentication is off.
pub(crate) fn caller(
    state: &AppState,
    extensions: &http::Extensions,
) -> Result<Arc<Principal>, Status> {
    match extensions.get::<Arc<Principal>>() {
        Some(principal) => Ok(Arc::clone(principal)),
        None => Ok(state.security.principal(None, None)?),
    }
}
