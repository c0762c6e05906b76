//! Transport security and access control.
//!
//! - [`tls`]: rustls on both listeners, with the certificate chain and key (and the
//!   client CA, for mutual TLS) re-read from disk when the files change. Open
//!   connections keep the session they started with; new handshakes get the new files.
//! - [`policy`]: principals and what each may do: scopes, the device namespace, quotas;
//!   the policy file with hashed API keys, reloaded when it changes.
//! - [`tokens`]: who a caller is: a static API key, a JWT verified against a JWKS
//!   file, or the identity of a client certificate.
//! - [`quota`]: per-principal rate and usage limits (a token bucket for samples, and
//!   counted streams, watchers and devices).
//!
//! The rules are written down in `docs/security.md`.

pub mod policy;
pub mod quota;
pub mod tls;
pub mod tokens;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    error::{ApiError, ErrorKind},
};
use policy::{AccessError, Principal};
use quota::{QuotaError, Quotas, Usage};
use tls::{ReloadingTls, TlsError, TlsFiles};
use tokens::{AuthError, Authenticator, LoadError, TokenSettings};

/// Security as the server runs it: the TLS configurations of both listeners, the
/// authenticator (none: every caller is the anonymous principal with every right),
/// and per-principal usage.
#[derive(Debug)]
pub struct Security {
    /// The gRPC listener's TLS (ALPN `h2`).
    pub grpc_tls: Option<Arc<ReloadingTls>>,
    /// The gateway's TLS (ALPN `h2`, `http/1.1`).
    pub http_tls: Option<Arc<ReloadingTls>>,
    auth: Option<Authenticator>,
    anonymous: Arc<Principal>,
    quotas: Quotas,
}

/// Why the security settings cannot be used; names the setting.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `TLS_CERT`, `TLS_KEY` or `TLS_CLIENT_CA`.
    #[error("TLS_CERT: {0}")]
    Tls(#[from] TlsError),
    /// `AUTH_POLICY` or `AUTH_JWKS`.
    #[error("AUTH_POLICY: {0}")]
    Auth(#[from] LoadError),
}

impl Security {
    /// Loads what `config` names.
    pub fn from_config(config: &Config) -> Result<Self, SetupError> {
        let tls = |alpn: &[&[u8]]| -> Result<Option<Arc<ReloadingTls>>, TlsError> {
            match (&config.tls_cert, &config.tls_key) {
                (Some(cert), Some(key)) => Ok(Some(Arc::new(ReloadingTls::load(
                    TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: config.tls_client_ca.clone(),
                    },
                    alpn,
                )?))),
                _ => Ok(None),
            }
        };
        let auth = if config.authenticates() {
            Some(Authenticator::load(TokenSettings {
                policy: config.auth_policy.clone(),
                jwks: config.auth_jwks.clone(),
                issuers: config.auth_jwt_issuer.clone(),
                audiences: config.auth_jwt_audience.clone(),
                leeway_secs: 30,
            })?)
        } else {
            None
        };
        Ok(Self {
            grpc_tls: tls(&[b"h2"])?,
            http_tls: tls(&[b"h2", b"http/1.1"])?,
            auth,
            anonymous: Arc::new(Principal::anonymous()),
            quotas: Quotas::default(),
        })
    }

    /// Whether calls need credentials.
    pub fn authenticates(&self) -> bool {
        self.auth.is_some()
    }

    /// The caller behind an `authorization` header value and a client certificate
    /// identity; the anonymous principal when authentication is off.
    pub fn principal(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&str>,
    ) -> Result<Arc<Principal>, ApiError> {
        match &self.auth {
            None => Ok(Arc::clone(&self.anonymous)),
            Some(auth) => auth
                .authenticate(authorization, certificate)
                .map_err(ApiError::from),
        }
    }

    /// What `principal` uses now; `None` when it has no limits.
    pub fn usage(&self, principal: &Principal) -> Option<Arc<Usage>> {
        if principal.quota == policy::QuotaLimits::default() {
            None
        } else {
            Some(self.quotas.usage(principal))
        }
    }

    /// Re-reads every credential file that changed, every `every`, until `stop`.
    pub async fn reload_periodically(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let this = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
        }
    }

    fn reload(&self) {
        for (listener, tls) in [("grpc", &self.grpc_tls), ("http", &self.http_tls)] {
            if let Some(tls) = tls {
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!(listener, "tls certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(listener, error = %e, "tls reload failed; the previous certificate stays")
                    }
                }
            }
        }
        if let Some(auth) = &self.auth {
            match auth.reload_if_changed() {
                Ok(true) => tracing::info!("credentials reloaded (AUTH_POLICY, AUTH_JWKS)"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "credentials reload failed; the previous ones stay")
                }
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(ErrorKind::Unauthenticated, e.to_string())
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        ApiError::new(ErrorKind::PermissionDenied, e.to_string())
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        let retry = e.retry_after();
        let error = ApiError::new(ErrorKind::RateLimited, e.to_string());
        match retry {
            Some(delay) => error.retry_after(delay),
            None => error,
        }
    }
}

/// What a watched file looked like when it was last read: a change of any of these
/// makes the next poll read it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    /// FNV-1a of the content: catches a rewrite within the file system's
    /// timestamp resolution (cert-manager swaps a symlink, kubelet an atomic dir).
    digest: u64,
}

impl FileStamp {
    /// Reads `path` and returns its stamp with its content.
    pub fn read(path: &Path) -> std::io::Result<(Self, Vec<u8>)> {
        let bytes = std::fs::read(path)?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        Ok((
            Self {
                modified,
                len: bytes.len() as u64,
                digest,
            },
            bytes,
        ))
    }
}

/// The stamps of a set of files, for a reload check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stamps(Vec<FileStamp>);

impl Stamps {
    /// Reads every file in `paths`; the contents come back in the same order.
    pub fn read(paths: &[&PathBuf]) -> std::io::Result<(Self, Vec<Vec<u8>>)> {
        let mut stamps = Vec::with_capacity(paths.len());
        let mut contents = Vec::with_capacity(paths.len());
        for path in paths {
            let (stamp, bytes) = FileStamp::read(path)?;
            stamps.push(stamp);
            contents.push(bytes);
        }
        Ok((Self(stamps), contents))
    }
}
