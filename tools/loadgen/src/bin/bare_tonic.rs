//! `bare-tonic`: the gRPC baseline of the benchmark suite. An idiomatic tonic server on
//! the same proto whose `Ingest` answers every sample with a constant verdict (device
//! id and seq echoed, one zero-statistics entry per metric), without any engine. It
//! shares tidewatch's allocator, tokio runtime, socket options, HTTP/2 keepalive and
//! message size limits (see the crate documentation), so `scripts/bench.sh`, running
//! both on the same core, shows what the engine and the service around it cost.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use clap::Parser;
use futures::{Stream, StreamExt};
use tidewatch_proto::v1::{
    AnalyzeRequest, AnalyzeResponse, DeleteDeviceRequest, DeleteDeviceResponse, IngestRequest,
    IngestResponse, WatchAnomaliesRequest, WatchAnomaliesResponse,
    telemetry_service_server::{TelemetryService, TelemetryServiceServer},
};
use tonic::{Request, Response, Status, Streaming};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "bare-tonic",
    version,
    about = "Constant-verdict tonic TelemetryService on tidewatch's allocator, runtime and socket options (gRPC benchmark baseline)"
)]
struct Args {
    /// Listen address.
    #[arg(long, env = "GRPC_ADDR", default_value = "127.0.0.1:50052")]
    addr: SocketAddr,
}

/// The constant-verdict service.
#[derive(Debug, Default, Clone, Copy)]
struct Bare;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TelemetryService for Bare {
    type IngestStream = BoxStream<IngestResponse>;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let responses = request
            .into_inner()
            .map(|request| request.map(|r| tidewatch_loadgen::constant_verdicts(r.samples)));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn analyze(
        &self,
        request: Request<AnalyzeRequest>,
    ) -> Result<Response<AnalyzeResponse>, Status> {
        Ok(Response::new(AnalyzeResponse {
            device_id: request.into_inner().device_id,
            ..AnalyzeResponse::default()
        }))
    }

    async fn delete_device(
        &self,
        request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        Ok(Response::new(DeleteDeviceResponse {
            device_id: request.into_inner().device_id,
            deleted: false,
        }))
    }

    type WatchAnomaliesStream = BoxStream<WatchAnomaliesResponse>;

    async fn watch_anomalies(
        &self,
        _request: Request<WatchAnomaliesRequest>,
    ) -> Result<Response<Self::WatchAnomaliesStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tidewatch_loadgen::server_runtime()?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    // The same line tidewatch logs, so scripts wait for both the same way.
    println!("grpc listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            TelemetryServiceServer::new(Bare)
                .max_decoding_message_size(4 * 1024 * 1024)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(
            // `Server::tcp_nodelay` applies only to listeners tonic binds itself; an
            // incoming built from our listener needs its own, or Nagle holds back
            // small responses until the client's delayed ACK (40 ms on Linux).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
