//! TLS for both listeners with rustls: TLS 1.2 and 1.3 only, ALPN `h2` (and
//! `http/1.1` on the gateway), the certificate chain and key read from PEM files and
//! re-read when they change (cert-manager rotates them in place). With a client CA
//! the server asks for a client certificate and refuses one that CA did not sign.
//!
//! The identity of a client certificate is its first URI SAN (a SPIFFE id, say), else
//! its first DNS SAN, else its subject CN.
//!
//! A reload swaps the configuration new handshakes use; a connection keeps the
//! session it negotiated, so open streams never drop.

use std::{
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::Stamps;
use crate::connections::{Admission, AdmittedTcp, Conn, HasConn};

/// The files of one TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates; set for mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// A TLS configuration that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{path}: {error}")]
    Io {
        /// The files.
        path: String,
        /// What went wrong.
        error: io::Error,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration (key does not match the certificate, ...).
    #[error("{0}")]
    Rustls(String),
}

/// A server TLS configuration reloaded from its files.
pub struct ReloadingTls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    config: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Stamps>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Builds the configuration from `files`, offering the ALPN protocols `alpn`
    /// (e.g. `[b"h2"]`).
    pub fn load(files: TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let (stamps, config) = build(&files, &alpn)?;
        Ok(Self {
            files,
            alpn,
            config: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files; `Ok(true)` when a new configuration is in force. On an
    /// error (say a key written before its certificate) the old one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let paths = self.paths();
        let (stamps, _) = Stamps::read(&paths).map_err(|error| io_error(&paths, error))?;
        let mut current = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        if *current == stamps {
            return Ok(false);
        }
        let (stamps, config) = build(&self.files, &self.alpn)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *current = stamps;
        Ok(true)
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.config.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    fn paths(&self) -> Vec<&PathBuf> {
        [&self.files.cert, &self.files.key]
            .into_iter()
            .chain(&self.files.client_ca)
            .collect()
    }
}

fn io_error(paths: &[&PathBuf], error: io::Error) -> TlsError {
    TlsError::Io {
        path: paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        error,
    }
}

/// rustls with *ring*: no C toolchain beyond a compiler to build it. rustls marks
/// this provider deprecated because it lacks the post-quantum key exchange its
/// aws-lc-rs provider offers; TLS 1.3 with X25519 is what clients negotiate here.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<(Stamps, ServerConfig), TlsError> {
    let paths: Vec<&PathBuf> = [&files.cert, &files.key]
        .into_iter()
        .chain(&files.client_ca)
        .collect();
    let (stamps, contents) = Stamps::read(&paths).map_err(|error| io_error(&paths, error))?;
    let chain = certificates(&contents[0], &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents[1])
        .map_err(|e| TlsError::Pem(format!("{}: no private key ({e})", files.key.display())))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&files.client_ca, contents.get(2)) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(pem, path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Pem(format!("{}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("{}: {e}", files.cert.display())))?;
    config.alpn_protocols = alpn.to_vec();
    Ok((stamps, config))
}

fn certificates(
    pem: &[u8],
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{}: no certificate", path.display())));
    }
    Ok(certs)
}

/// The identity of a client certificate (see the module documentation).
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        });
        let dns = || {
            names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
        };
        if let Some(name) = uri.or_else(dns) {
            return Some(name);
        }
    }
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// The identity of the peer's certificate on a server TLS stream, if it sent one.
pub fn peer_identity<S>(stream: &TlsStream<S>) -> Option<Arc<str>> {
    let certs = stream.get_ref().1.peer_certificates()?;
    certificate_identity(certs.first()?).map(Arc::from)
}

/// Turns a stream of accepted connections into a stream of TLS connections whose
/// handshake completed: each handshake runs in its own task, at most `max_in_flight`
/// at once, each within `timeout`, so a slow or silent client holds up nobody.
/// Failed handshakes are logged at debug level and dropped.
pub fn handshakes<S, I>(
    incoming: I,
    tls: Arc<ReloadingTls>,
    timeout: Duration,
    max_in_flight: usize,
) -> impl Stream<Item = io::Result<TlsStream<S>>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Stream<Item = io::Result<S>> + Send + 'static,
{
    let (done, ready) = mpsc::channel(max_in_flight.max(1));
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(next) = incoming.next().await {
            let stream = match next {
                Ok(stream) => stream,
                Err(e) => {
                    if done.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let acceptor = tls.acceptor();
            let handshaken = done.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = handshaken.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "tls handshake failed"),
                    Err(_) => tracing::debug!(?timeout, "tls handshake timed out"),
                }
            });
            if done.is_closed() {
                return;
            }
        }
    });
    Handshaken { ready }
}

struct Handshaken<T> {
    ready: mpsc::Receiver<io::Result<T>>,
}

impl<T> Stream for Handshaken<T> {
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx)
    }
}

/// A connection that is TLS or plain, as the listener was configured.
#[derive(Debug)]
pub enum MaybeTls<S> {
    /// Plain TCP (loopback development, or TLS terminated in front).
    Plain(S),
    /// TLS, with the client certificate identity when mutual TLS is on.
    Tls(Box<TlsStream<S>>, Option<Arc<str>>),
}

impl<S> MaybeTls<S> {
    /// The client certificate identity, when mutual TLS proved one.
    pub fn identity(&self) -> Option<&Arc<str>> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(_, identity) => identity.as_ref(),
        }
    }

    /// The underlying connection.
    pub fn inner(&self) -> &S {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s, _) => s.get_ref().0,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s, _) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s, _) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s, _) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s, _) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// What a connection tells the handlers: its TCP addresses and, with mutual TLS,
/// the client certificate identity.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The client certificate identity (see the module documentation).
    pub identity: Option<Arc<str>>,
    /// The connection's admission and activity (`MAX_CONNECTIONS`, idle timeout).
    pub conn: Option<Arc<Conn>>,
}

impl<S> tonic::transport::server::Connected for MaybeTls<S>
where
    S: tonic::transport::server::Connected<ConnectInfo = tonic::transport::server::TcpConnectInfo>
        + HasConn,
{
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            remote_addr: self.inner().connect_info().remote_addr,
            identity: self.identity().cloned(),
            conn: self.inner().conn(),
        }
    }
}

/// The gateway's listener: plain TCP, or TLS with each handshake off the accept
/// loop ([`handshakes`]). Every connection gets `TCP_NODELAY` (small JSON answers go
/// out at once).
pub struct GatewayListener {
    local: std::net::SocketAddr,
    accepted: Pin<Box<dyn Stream<Item = io::Result<MaybeTls<AdmittedTcp>>> + Send>>,
}

impl std::fmt::Debug for GatewayListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl GatewayListener {
    /// Serves `listener`, through `tls` when it is set; `admission` decides, before
    /// any handshake, whether each connection is served, probe-only or closed at once.
    pub fn new(
        listener: tokio::net::TcpListener,
        tls: Option<Arc<ReloadingTls>>,
        handshake_timeout: Duration,
        admission: Arc<Admission>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let tcp = futures::stream::unfold(listener, move |listener| {
            let admission = Arc::clone(&admission);
            async move {
                loop {
                    let next = match listener.accept().await {
                        Ok((stream, peer)) => {
                            let Some(conn) = admission.admit() else {
                                tracing::debug!(%peer, "http connection refused: MAX_CONNECTIONS and the probe headroom are in use");
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            Ok(AdmittedTcp::new(stream, conn))
                        }
                        Err(e) => Err(e),
                    };
                    return Some((next, listener));
                }
            }
        });
        Ok(Self {
            local,
            accepted: maybe_tls(tcp, tls, handshake_timeout),
        })
    }
}

/// The connections of `incoming`, through TLS handshakes when `tls` is set (each off
/// the accept loop, see [`handshakes`]), as they are otherwise.
pub fn maybe_tls<S, I>(
    incoming: I,
    tls: Option<Arc<ReloadingTls>>,
    handshake_timeout: Duration,
) -> Pin<Box<dyn Stream<Item = io::Result<MaybeTls<S>>> + Send>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Stream<Item = io::Result<S>> + Send + 'static,
{
    match tls {
        Some(tls) => Box::pin(
            handshakes(incoming, tls, handshake_timeout, MAX_HANDSHAKES).map(|tls| {
                tls.map(|tls| {
                    let identity = peer_identity(&tls);
                    MaybeTls::Tls(Box::new(tls), identity)
                })
            }),
        ),
        None => Box::pin(incoming.map(|plain| plain.map(MaybeTls::Plain))),
    }
}

/// TLS handshakes in progress on one listener at most; further connections wait in
/// the accept backlog.
pub const MAX_HANDSHAKES: usize = 256;

impl axum::serve::Listener for GatewayListener {
    type Io = MaybeTls<AdmittedTcp>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.accepted.next().await {
                Some(Ok(io)) => {
                    let addr = io.inner().peer_addr().unwrap_or(self.local);
                    return (io, addr);
                }
                Some(Err(e)) => {
                    // Out of file descriptors and the like: back off instead of
                    // spinning, as axum's own TCP listener does.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GatewayListener>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GatewayListener>) -> Self {
        PeerInfo {
            remote_addr: Some(*stream.remote_addr()),
            identity: stream.io().identity().cloned(),
            conn: stream.io().inner().conn(),
        }
    }
}
