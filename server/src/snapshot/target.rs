//! Where Redis is and how to reach it: `REDIS_URL` with the credentials and TLS
//! settings beside it (`docs/snapshots.md`, "TLS and credentials"), resolved once into
//! what both kinds of connection need: a redis-rs [`Client`] for the read pool and the
//! hand-off subscription, and a rustls connector for the flush's own connections.
//!
//! The password (from the URL or `REDIS_PASSWORD_FILE`) is never printed: `Debug`
//! shows the URL with it replaced, and no error message quotes it.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use bb8_redis::redis::{
    self, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{config::RedisUrl, security::tls::provider};

/// The largest certificate, key or password file read (a CA bundle of a few hundred
/// certificates fits).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The Redis settings, from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `REDIS_URL` (its `Debug` hides the password).
    pub url: RedisUrl,
    /// `REDIS_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// `REDIS_CLIENT_CERT`.
    pub client_cert: Option<PathBuf>,
    /// `REDIS_CLIENT_KEY`.
    pub client_key: Option<PathBuf>,
    /// `REDIS_USERNAME`.
    pub username: Option<String>,
    /// `REDIS_PASSWORD_FILE`.
    pub password_file: Option<PathBuf>,
}

impl RedisSettings {
    /// Only a URL: credentials from it, TLS (for `rediss://`) against the system's CA
    /// certificates.
    pub fn url(url: &str) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password_file: None,
        }
    }
}

/// A Redis setting that cannot be used; names it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TargetError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What is wrong (never the password).
    pub message: String,
}

fn error(setting: &'static str, message: impl fmt::Display) -> TargetError {
    TargetError {
        setting,
        message: message.to_string(),
    }
}

/// Redis, resolved: the connection info with its credentials, and the TLS to speak.
#[derive(Clone)]
pub struct RedisTarget {
    /// Connections of the read pool and the hand-off subscription.
    client: Client,
    /// For `rediss://`: the connector and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The URL with its password replaced.
    shown: String,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.shown)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// Reads the files the settings name and checks that they go together.
    pub fn load(settings: &RedisSettings) -> Result<Self, TargetError> {
        let url = settings.url.expose().trim();
        let mut info = url
            .into_connection_info()
            .map_err(|e| error("REDIS_URL", e))?;
        let mut login = info.redis_settings().clone();
        if let Some(username) = &settings.username {
            login = login.set_username(username);
        }
        if let Some(path) = &settings.password_file {
            let password = read("REDIS_PASSWORD_FILE", path)?;
            let password = String::from_utf8(password)
                .map_err(|_| error("REDIS_PASSWORD_FILE", "is not UTF-8"))?;
            let password = password
                .strip_suffix('\n')
                .map(|p| p.strip_suffix('\r').unwrap_or(p))
                .unwrap_or(&password);
            if password.is_empty() {
                return Err(error("REDIS_PASSWORD_FILE", "is empty"));
            }
            login = login.set_password(password);
        }
        info = info.set_redis_settings(login);
        let shown = settings.url.redacted();
        let (client, tls) = match info.addr().clone() {
            ConnectionAddr::TcpTls { host, insecure, .. } => {
                if insecure {
                    return Err(error(
                        "REDIS_URL",
                        "#insecure (no certificate check) is not supported: set REDIS_CA_FILE",
                    ));
                }
                let roots = match &settings.ca_file {
                    Some(path) => Some(read("REDIS_CA_FILE", path)?),
                    None => None,
                };
                let identity = match (&settings.client_cert, &settings.client_key) {
                    (Some(cert), Some(key)) => Some((
                        read("REDIS_CLIENT_CERT", cert)?,
                        read("REDIS_CLIENT_KEY", key)?,
                    )),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(error(
                            "REDIS_CLIENT_KEY",
                            "must be set with REDIS_CLIENT_CERT",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(error(
                            "REDIS_CLIENT_CERT",
                            "must be set with REDIS_CLIENT_KEY",
                        ));
                    }
                };
                let config = client_config(roots.as_deref(), identity.as_ref())?;
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| error("REDIS_URL", format!("host {host:?}: {e}")))?;
                let client = Client::build_with_tls(
                    info,
                    TlsCertificates {
                        client_tls: identity.map(|(client_cert, client_key)| {
                            redis::ClientTlsConfig {
                                client_cert,
                                client_key,
                            }
                        }),
                        root_cert: roots,
                    },
                )
                .map_err(|e| error("REDIS_CA_FILE", e))?;
                (client, Some((TlsConnector::from(Arc::new(config)), name)))
            }
            _ => {
                for (setting, set) in [
                    ("REDIS_CA_FILE", settings.ca_file.is_some()),
                    ("REDIS_CLIENT_CERT", settings.client_cert.is_some()),
                    ("REDIS_CLIENT_KEY", settings.client_key.is_some()),
                ] {
                    if set {
                        return Err(error(
                            setting,
                            format!("needs a rediss:// REDIS_URL (it is {shown})"),
                        ));
                    }
                }
                (Client::open(info).map_err(|e| error("REDIS_URL", e))?, None)
            }
        };
        Ok(Self { client, tls, shown })
    }

    /// A plain-TCP target at `info` (a Redis Cluster master found in the slot map),
    /// with the credentials `info` carries.
    pub fn plain(info: ConnectionInfo) -> Self {
        let shown = match info.addr() {
            ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
            other => other.to_string(),
        };
        Self {
            client: Client::open(info).expect("a connection info always opens"),
            tls: None,
            shown,
        }
    }

    /// The redis-rs client (read pool, hand-off subscription).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Where Redis is and how to log in.
    pub fn info(&self) -> &ConnectionInfo {
        self.client.get_connection_info()
    }

    /// The URL with its password replaced, for logs.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether connections speak TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Runs the TLS handshake on `tcp`, for `rediss://`.
    pub(super) async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<Option<TlsStream<TcpStream>>, io::Error> {
        match &self.tls {
            Some((connector, name)) => connector.connect(name.clone(), tcp).await.map(Some),
            None => Ok(None),
        }
    }
}

/// Reads a file of at most [`MAX_FILE_BYTES`].
fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TargetError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| error(setting, format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| error(setting, format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(error(
            setting,
            format!("{} is larger than {MAX_FILE_BYTES} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// The rustls configuration of the flush's connections: the same roots and client
/// certificate redis-rs is given, on the process's crypto provider.
fn client_config(
    roots: Option<&[u8]>,
    identity: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<ClientConfig, TargetError> {
    let mut store = RootCertStore::empty();
    match roots {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| error("REDIS_CA_FILE", format!("not PEM: {e}")))?;
                store
                    .add(cert)
                    .map_err(|e| error("REDIS_CA_FILE", format!("not a CA certificate: {e}")))?;
            }
            if store.is_empty() {
                return Err(error("REDIS_CA_FILE", "holds no certificate"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // The system's bundle may hold a certificate rustls cannot use; the
                // others still count.
                let _ = store.add(cert);
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("REDIS_URL", e))?
        .with_root_certificates(store);
    match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error("REDIS_CLIENT_CERT", format!("not PEM: {e}")))?;
            if chain.is_empty() {
                return Err(error("REDIS_CLIENT_CERT", "holds no certificate"));
            }
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|_| error("REDIS_CLIENT_KEY", "holds no PEM private key"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| error("REDIS_CLIENT_KEY", e))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, content: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("tidewatch-target-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn the_password_file_replaces_the_urls_and_is_never_shown() {
        let mut settings = RedisSettings::url("redis://app:from-url@127.0.0.1:6379/2");
        settings.password_file = Some(temp("password", b"from-file\n"));
        settings.username = Some("tidewatch".into());
        let target = RedisTarget::load(&settings).unwrap();
        let login = target.info().redis_settings();
        assert_eq!(login.password(), Some("from-file"));
        assert_eq!(login.username(), Some("tidewatch"));
        assert_eq!(login.db(), 2);
        for printed in [
            format!("{target:?}"),
            format!("{settings:?}"),
            format!("{:?}", target.info()),
            target.shown().to_owned(),
        ] {
            assert!(!printed.contains("from-url"), "{printed}");
            assert!(!printed.contains("from-file"), "{printed}");
        }
    }

    #[test]
    fn bad_files_name_their_setting() {
        let mut settings = RedisSettings::url("rediss://127.0.0.1:6380");
        settings.ca_file = Some(temp("not-pem", b"hello"));
        assert_eq!(
            RedisTarget::load(&settings).unwrap_err().setting,
            "REDIS_CA_FILE"
        );
        settings.ca_file = Some("/nonexistent/ca.pem".into());
        let e = RedisTarget::load(&settings).unwrap_err();
        assert_eq!(e.setting, "REDIS_CA_FILE");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
        let mut settings = RedisSettings::url("redis://127.0.0.1:6379");
        settings.password_file = Some(temp("empty", b"\n"));
        assert_eq!(
            RedisTarget::load(&settings).unwrap_err().setting,
            "REDIS_PASSWORD_FILE"
        );
        settings.password_file = None;
        settings.ca_file = Some(temp("ca-for-plain", b""));
        let e = RedisTarget::load(&settings).unwrap_err();
        assert_eq!(e.setting, "REDIS_CA_FILE");
        assert!(e.message.contains("rediss://"), "{e}");
        let big = temp("big", &vec![b'x'; MAX_FILE_BYTES as usize + 1]);
        let mut settings = RedisSettings::url("redis://127.0.0.1:6379");
        settings.password_file = Some(big);
        let e = RedisTarget::load(&settings).unwrap_err();
        assert!(e.message.contains("larger than"), "{e}");
    }

    #[test]
    fn insecure_tls_is_refused() {
        let e = RedisTarget::load(&RedisSettings::url("rediss://127.0.0.1:6380/#insecure"))
            .unwrap_err();
        assert_eq!(e.setting, "REDIS_URL");
    }
}
