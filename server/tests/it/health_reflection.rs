//! gRPC health for `""` and `tidewatch.v1.TelemetryService` (tonic-health's client),
//! and server reflection in both versions (tonic-reflection's generated clients): v1
//! for current tools, v1alpha for grpcurl 1.8.

use crate::common::{TestServer, channel};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

const SERVICE: &str = "tidewatch.v1.TelemetryService";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_the_server_and_the_service() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(channel(&server.grpc_url()).await);
    for service in ["", SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("check {service:?}: {e:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_shutdown_begins() {
    let mut server = TestServer::start().await;
    let mut health = HealthClient::new(channel(&server.grpc_url()).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first status").expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    server.begin_shutdown();
    let next = watch
        .next()
        .await
        .expect("a status change")
        .expect("status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    server.stop().await.expect("clean shutdown");
}

/// Every service name reflection v1 lists.
async fn list_v1(url: String) -> Vec<String> {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel(&url).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected v1 response {other:?}"),
    }
}

/// Every service name reflection v1alpha lists.
async fn list_v1alpha(url: String) -> Vec<String> {
    use v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel(&url).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected v1alpha response {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_in_both_versions() {
    let server = TestServer::start().await;
    for (version, services) in [
        ("v1", list_v1(server.grpc_url()).await),
        ("v1alpha", list_v1alpha(server.grpc_url()).await),
    ] {
        for want in [SERVICE, "grpc.health.v1.Health"] {
            assert!(
                services.iter().any(|s| s == want),
                "{version} lists {services:?}, not {want}"
            );
        }
    }
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_service_file() {
    use prost::Message as _;
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(channel(&server.grpc_url()).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(SERVICE.into())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected response {:?}", response.message_response);
    };
    let described: Vec<(String, Vec<String>)> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("decode");
            let methods = file
                .service
                .iter()
                .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
                .collect();
            (file.name().to_string(), methods)
        })
        .collect();
    let (_, methods) = described
        .iter()
        .find(|(name, _)| name == "tidewatch/v1/telemetry.proto")
        .unwrap_or_else(|| panic!("no telemetry.proto in {described:?}"));
    assert_eq!(
        methods,
        &["Ingest", "Analyze", "WatchAnomalies", "DeleteDevice"]
    );
    server.stop().await.expect("clean shutdown");
}
