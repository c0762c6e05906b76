//! Credentials the client presents: TLS settings for the channel and a bearer token
//! added to every call's metadata by an interceptor.

use std::{fmt, sync::Arc};

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::Interceptor,
};

pub use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A bearer token, sent as `authorization: Bearer <token>` on every call.
///
/// The server checks the token when a call opens (once per Ingest stream, not per
/// message), so a refreshed token takes effect on the next call or reconnect; an open
/// stream keeps the token it opened with.
#[derive(Clone)]
pub enum Token {
    /// The same token on every call: an API key, or a long-lived JWT.
    Static(String),
    /// Called when each call opens; returns the current token. It runs on the calling
    /// task and must not block: keep the token in memory (an `Arc<RwLock<String>>` a
    /// background task refreshes before `exp`, say) and return a copy.
    Refresh(Arc<dyn Fn() -> String + Send + Sync>),
}

impl Token {
    /// A token that never changes.
    pub fn fixed(token: impl Into<String>) -> Self {
        Self::Static(token.into())
    }

    /// A token read from `current` when each call opens.
    pub fn refreshing(current: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self::Refresh(Arc::new(current))
    }

    fn current(&self) -> String {
        match self {
            Self::Static(token) => token.clone(),
            Self::Refresh(current) => current(),
        }
    }
}

impl fmt::Debug for Token {
    // Never prints the token itself: configurations end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(_) => f.write_str("Token::Static(<redacted>)"),
            Self::Refresh(_) => f.write_str("Token::Refresh(<callback>)"),
        }
    }
}

/// The interceptor that adds the token to each call; without a token it adds nothing.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    token: Option<Token>,
}

impl Credentials {
    /// Adds `token` to every call (none: calls carry no `authorization`).
    pub fn new(token: Option<Token>) -> Self {
        Self { token }
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.token {
            // A token that is not a valid header value would be refused by the server
            // anyway; failing here names the cause instead of sending a mangled header.
            let value: AsciiMetadataValue =
                MetadataValue::try_from(format!("Bearer {}", token.current()))
                    .map_err(|_| Status::unauthenticated("token is not a valid metadata value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// TLS settings from PEM bytes: the CA that signed the server's certificate (none: the
/// system roots are not consulted, so pass it unless the CA is public and you configure
/// roots yourself), and a client certificate chain and key for mutual TLS.
pub fn tls_from_pem(
    ca: impl AsRef<[u8]>,
    client: Option<(impl AsRef<[u8]>, impl AsRef<[u8]>)>,
) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tls
}
