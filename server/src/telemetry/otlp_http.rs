//! The HTTP client of the OTLP/HTTP exporters (`OTEL_EXPORTER_OTLP_PROTOCOL=
//! http/protobuf`): hyper's HTTP/1 client, run on the server's Tokio runtime.
//!
//! The SDK exports from threads of its own (the span batch processor, the periodic
//! metric reader) and waits for each export there, so the client hands every request
//! to the runtime and waits for its task. One connection per export: spans leave
//! every few seconds and metrics every minute, too seldom to keep one open. Each
//! export is bounded: [`EXPORT_TIMEOUT`] for all of it, [`MAX_RESPONSE_BYTES`] for
//! what the collector answers.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header::HOST};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use opentelemetry_http::{HttpClient, HttpError};
use tokio::{net::TcpStream, runtime::Handle};

/// Longest time one export may take, connection included.
pub(super) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest collector answer read (an `Export*ServiceResponse` is a few bytes; an
/// error page more).
pub(super) const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Sends OTLP/HTTP exports on the runtime it was made on.
#[derive(Debug, Clone)]
pub(super) struct RuntimeHttpClient {
    /// The server's runtime.
    runtime: Handle,
}

impl RuntimeHttpClient {
    /// A client on the current Tokio runtime; `None` outside one.
    pub(super) fn current() -> Option<Self> {
        Handle::try_current().ok().map(|runtime| Self { runtime })
    }
}

#[tonic::async_trait]
impl HttpClient for RuntimeHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The timer is made inside the task: this thread has no runtime.
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, send(request)).await });
        match task.await? {
            Ok(answer) => answer,
            Err(_) => Err(format!("export took longer than {EXPORT_TIMEOUT:?}").into()),
        }
    }
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the answer.
async fn send(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let (mut parts, body) = request.into_parts();
    let uri = parts.uri.clone();
    if uri.scheme_str() != Some("http") {
        return Err(format!("{uri}: only http:// endpoints are supported").into());
    }
    let host = uri.host().ok_or_else(|| format!("{uri}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    if let Some(authority) = uri.authority() {
        parts
            .headers
            .insert(HOST, HeaderValue::from_str(authority.as_str())?);
    }
    parts.uri = origin_form(&uri)?;
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// The path and query of `uri`, as an HTTP/1.1 request target.
fn origin_form(uri: &Uri) -> Result<Uri, HttpError> {
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    Ok(target.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_target_is_the_path() {
        let uri: Uri = "http://collector:4318/v1/traces?x=1".parse().unwrap();
        assert_eq!(origin_form(&uri).unwrap(), "/v1/traces?x=1");
        let uri: Uri = "http://collector:4318".parse().unwrap();
        assert_eq!(origin_form(&uri).unwrap(), "/");
    }

    #[tokio::test]
    async fn an_unreachable_collector_is_an_error_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = RuntimeHttpClient::current().unwrap();
        let request = Request::post(format!("http://{addr}/v1/traces"))
            .body(Bytes::from_static(b"x"))
            .unwrap();
        assert!(client.send_bytes(request).await.is_err());
    }
}
