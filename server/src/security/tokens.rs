//! Who a caller is. A request presents `authorization: Bearer <token>` (gRPC metadata
//! or HTTP header), a client certificate (mutual TLS), or both:
//!
//! 1. a bearer token with three dot-separated parts is a JWT, verified against the
//!    JWKS file (`kid` picks the key; `exp`, `nbf`, `iss` and `aud` are checked);
//! 2. any other bearer token is an API key, looked up by its SHA-256 in the policy;
//! 3. without a token, the client certificate's identity names a policy entry.
//!
//! A token wins over the certificate: the certificate then only proved the channel.
//! A JWT whose `sub` names a policy entry gets that entry's scopes, namespace and
//! quota; otherwise its `scope` claim (space-separated) and `devices` claim (a list of
//! patterns) decide, with the policy's `default_quota`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use super::{
    Stamps,
    policy::{DeviceNamespace, MAX_TOKEN_LEN, Policy, PolicyError, Principal, Scopes},
};

/// Where the credentials come from and what a JWT must say.
#[derive(Debug, Clone, Default)]
pub struct TokenSettings {
    /// The policy file (principals, hashed API keys).
    pub policy: Option<PathBuf>,
    /// The JWKS file of the keys that sign accepted JWTs.
    pub jwks: Option<PathBuf>,
    /// Accepted `iss` values (empty: any).
    pub issuers: Vec<String>,
    /// Accepted `aud` values (empty: the `aud` claim is not checked).
    pub audiences: Vec<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
}

/// Why a caller is not authenticated (gRPC `UNAUTHENTICATED`, HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token and no client certificate.
    #[error("missing credentials: send authorization: Bearer <token>")]
    Missing,
    /// The `authorization` value is not `Bearer <token>`.
    #[error("malformed authorization header: expected Bearer <token>")]
    Malformed,
    /// No principal holds this API key.
    #[error("unknown api key")]
    UnknownKey,
    /// A JWT that does not verify (signature, expiry, issuer, audience, ...).
    #[error("invalid token: {0}")]
    InvalidJwt(String),
    /// A client certificate whose identity has no policy entry.
    #[error("client certificate {0:?} has no policy entry")]
    UnknownCertificate(String),
}

/// Credential files that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file cannot be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The policy file is invalid.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// The JWKS file is invalid.
    #[error("jwks file: {0}")]
    Jwks(String),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    devices: Option<Vec<String>>,
}

struct Keys {
    policy: Policy,
    /// By `kid`, each with the one algorithm its JWK allows.
    jwks: HashMap<String, (DecodingKey, Algorithm)>,
}

/// Checks credentials against the policy and JWKS files, re-read when they change.
pub struct Authenticator {
    settings: TokenSettings,
    keys: RwLock<Arc<Keys>>,
    stamps: Mutex<Stamps>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("policy", &self.settings.policy)
            .field("jwks", &self.settings.jwks)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the files of `settings`; an unreadable or invalid file is an error.
    pub fn load(settings: TokenSettings) -> Result<Self, LoadError> {
        let (stamps, keys) = read(&settings)?;
        Ok(Self {
            settings,
            keys: RwLock::new(Arc::new(keys)),
            stamps: Mutex::new(stamps),
        })
    }

    /// Re-reads the files when any changed. `Ok(true)` when new credentials are in
    /// force; on an error the old ones stay.
    pub fn reload_if_changed(&self) -> Result<bool, LoadError> {
        let (stamps, keys) = read(&self.settings)?;
        let mut current = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        if *current == stamps {
            return Ok(false);
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *current = stamps;
        Ok(true)
    }

    /// The principal behind an `authorization` value and/or a client certificate
    /// identity.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&str>,
    ) -> Result<Arc<Principal>, AuthError> {
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()));
        match authorization {
            Some(value) => {
                let token = bearer(value)?;
                if token.split('.').count() == 3 && !keys.jwks.is_empty() {
                    self.verify_jwt(&keys, token)
                } else {
                    keys.policy.by_api_key(token).ok_or(AuthError::UnknownKey)
                }
            }
            None => match certificate {
                Some(identity) => keys
                    .policy
                    .by_name(identity)
                    .ok_or_else(|| AuthError::UnknownCertificate(identity.into())),
                None => Err(AuthError::Missing),
            },
        }
    }

    fn verify_jwt(&self, keys: &Keys, token: &str) -> Result<Arc<Principal>, AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::InvalidJwt(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let kid = header
            .kid
            .ok_or_else(|| AuthError::InvalidJwt("no kid in the header".into()))?;
        let (key, algorithm) = keys
            .jwks
            .get(&kid)
            .ok_or_else(|| AuthError::InvalidJwt(format!("unknown kid {kid:?}")))?;
        let mut validation = Validation::new(*algorithm);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if !self.settings.issuers.is_empty() {
            validation.set_issuer(&self.settings.issuers);
        }
        if self.settings.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.settings.audiences);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(invalid)?
            .claims;
        if let Some(entry) = keys.policy.by_name(&claims.sub) {
            return Ok(entry);
        }
        let scopes = Scopes::parse(claims.scope.as_deref().unwrap_or("").split_whitespace())
            .map_err(|e| AuthError::InvalidJwt(e.to_string()))?;
        let devices = DeviceNamespace::parse(claims.devices.iter().flatten().map(String::as_str))
            .map_err(|e| AuthError::InvalidJwt(e.to_string()))?;
        Ok(Arc::new(Principal {
            name: Arc::from(claims.sub.as_str()),
            scopes,
            devices,
            quota: keys.policy.default_quota,
        }))
    }
}

/// The token of a `Bearer <token>` value (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Result<&str, AuthError> {
    let value = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

fn read(settings: &TokenSettings) -> Result<(Stamps, Keys), LoadError> {
    let paths: Vec<&PathBuf> = settings.policy.iter().chain(&settings.jwks).collect();
    let (stamps, mut contents) = Stamps::read(&paths).map_err(|error| LoadError::Io {
        path: paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        error,
    })?;
    let jwks_bytes = settings.jwks.as_ref().and_then(|_| contents.pop());
    let policy = match settings.policy.as_ref().and_then(|_| contents.pop()) {
        Some(bytes) => Policy::parse(&bytes)?,
        None => Policy::default(),
    };
    let jwks = match jwks_bytes {
        Some(bytes) => parse_jwks(&bytes)?,
        None => HashMap::new(),
    };
    Ok((stamps, Keys { policy, jwks }))
}

fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, (DecodingKey, Algorithm)>, LoadError> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| LoadError::Jwks(e.to_string()))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| LoadError::Jwks("every key needs a kid".into()))?;
        let algorithm = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok())
            .ok_or_else(|| LoadError::Jwks(format!("key {kid:?} needs a signing alg")))?;
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| LoadError::Jwks(format!("key {kid:?}: {e}")))?;
        keys.insert(kid, (key, algorithm));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_parsed_strictly() {
        assert_eq!(bearer(b"Bearer abc"), Ok("abc"));
        assert_eq!(bearer(b"bearer  abc "), Ok("abc"));
        assert_eq!(bearer(b"Basic abc"), Err(AuthError::Malformed));
        assert_eq!(bearer(b"Bearer"), Err(AuthError::Malformed));
        assert_eq!(bearer(b"Bearer "), Err(AuthError::Malformed));
        assert_eq!(bearer(&[0xff, b' ', b'a']), Err(AuthError::Malformed));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(bearer(long.as_bytes()), Err(AuthError::Malformed));
    }
}
