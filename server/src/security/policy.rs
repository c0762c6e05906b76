//! Principals and what each may do: scopes, the device namespace, and quotas, as the
//! policy file states them (JSON, reloaded when it changes; see `docs/security.md`):
//!
//! ```json
//! {"principals": [{
//!     "name": "fleet-a",
//!     "scopes": ["ingest", "analyze", "watch"],
//!     "devices": ["fleet-a/*"],
//!     "api_keys_sha256": ["<hex SHA-256 of the key>"],
//!     "quota": {"devices": 10000, "samples_per_second": 50000, "burst": 100000,
//!               "streams": 64, "watchers": 4}
//! }],
//!  "default_quota": {"samples_per_second": 10000, "streams": 16, "watchers": 2}}
//! ```
//!
//! `default_quota` applies to JWT principals that have no entry of their own.
//!
//! API keys are stored as their SHA-256 only: the server never holds a key it could
//! leak. Keys are random tokens of at least 128 bits, so a plain hash is the right
//! tool (a password hash would only slow every stream's first request down).

use std::{collections::HashMap, fmt, sync::Arc};

use serde::Deserialize;

/// Longest accepted API key or token, in bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a principal may do; a set of [`Scope`]s.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

/// One permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `Ingest` and `POST /ingest`.
    Ingest,
    /// `Analyze` and `GET /analyze`.
    Analyze,
    /// `WatchAnomalies` and the live feed.
    Watch,
    /// Administrative calls (deleting a device).
    Admin,
}

impl Scope {
    /// Every scope, in the order of its bit.
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Analyze, Scope::Watch, Scope::Admin];

    /// The scope's name in the policy file and in a JWT's `scope` claim.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Analyze => "analyze",
            Self::Watch => "watch",
            Self::Admin => "admin",
        }
    }

    /// The scope called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl Scopes {
    /// Every scope.
    pub const ALL: Scopes = Scopes(0b1111);

    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Adds `scope`.
    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    /// Parses scope names; unknown names are an error.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, PolicyError> {
        let mut scopes = Scopes::default();
        for name in names {
            let scope = Scope::parse(name).ok_or_else(|| PolicyError::UnknownScope(name.into()))?;
            scopes.insert(scope);
        }
        Ok(scopes)
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(
                Scope::ALL
                    .iter()
                    .filter(|s| self.contains(**s))
                    .map(|s| s.name()),
            )
            .finish()
    }
}

/// The devices a principal may touch: exact ids, prefixes (`fleet-a/*`), or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceNamespace {
    any: bool,
    prefixes: Vec<Box<str>>,
    exact: Vec<Box<str>>,
}

impl DeviceNamespace {
    /// Every device.
    pub fn everything() -> Self {
        Self {
            any: true,
            ..Self::default()
        }
    }

    /// Parses patterns: `*` is every device, `p*` every id starting with `p`, anything
    /// else one exact id. A `*` anywhere but at the end is an error.
    pub fn parse<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Self, PolicyError> {
        let mut namespace = Self::default();
        for pattern in patterns {
            match pattern.find('*') {
                _ if pattern.is_empty() => return Err(PolicyError::BadPattern(pattern.into())),
                Some(0) if pattern.len() == 1 => namespace.any = true,
                Some(at) if at == pattern.len() - 1 => {
                    namespace.prefixes.push(pattern[..at].into());
                }
                Some(_) => return Err(PolicyError::BadPattern(pattern.into())),
                None => namespace.exact.push(pattern.into()),
            }
        }
        Ok(namespace)
    }

    /// Whether the device `id` is inside the namespace.
    pub fn allows(&self, id: &str) -> bool {
        self.any
            || self.prefixes.iter().any(|p| id.starts_with(&**p))
            || self.exact.iter().any(|e| **e == *id)
    }

    /// Whether the namespace holds every device.
    pub fn is_everything(&self) -> bool {
        self.any
    }
}

/// Per-principal limits; an absent field is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Devices in memory that the principal's samples created or restored (counted
    /// by the engine, `engine/holders.rs`).
    pub devices: Option<u64>,
    /// Samples per second, sustained.
    pub samples_per_second: Option<f64>,
    /// Samples in one burst (default: one second's worth).
    pub burst: Option<f64>,
    /// Open `Ingest` streams.
    pub streams: Option<u32>,
    /// Open watchers (`WatchAnomalies` and the live feed).
    pub watchers: Option<u32>,
}

/// An authenticated caller and what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The name (policy entry, JWT `sub`, or client certificate identity).
    pub name: Arc<str>,
    /// Permissions.
    pub scopes: Scopes,
    /// Devices it may ingest into, analyze and watch.
    pub devices: DeviceNamespace,
    /// Its limits.
    pub quota: QuotaLimits,
}

impl Principal {
    /// The caller when authentication is off: every scope, every device, no quota.
    pub fn anonymous() -> Self {
        Self {
            name: Arc::from("anonymous"),
            scopes: Scopes::ALL,
            devices: DeviceNamespace::everything(),
            quota: QuotaLimits::default(),
        }
    }

    /// `Ok` when the principal holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), AccessError> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(AccessError::MissingScope {
                principal: self.name.to_string(),
                scope: scope.name(),
            })
        }
    }

    /// Whether the principal may touch the device `id`.
    pub fn may_touch(&self, id: &str) -> bool {
        self.devices.allows(id)
    }

    /// `Ok` when the principal may touch the device `id`; the refusal says nothing of
    /// whether the device exists.
    pub fn require_device(&self, id: &str) -> Result<(), AccessError> {
        if self.may_touch(id) {
            Ok(())
        } else {
            Err(AccessError::Device {
                principal: self.name.to_string(),
                device: id.to_owned(),
            })
        }
    }
}

/// A refused permission (gRPC `PERMISSION_DENIED`, HTTP 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The principal lacks a scope the call needs.
    #[error("principal {principal:?} lacks the {scope:?} scope")]
    MissingScope {
        /// Who asked.
        principal: String,
        /// What it lacks.
        scope: &'static str,
    },
    /// The device is outside the principal's namespace. The message does not say
    /// whether the device exists.
    #[error("device {device:?} is outside the namespace of principal {principal:?}")]
    Device {
        /// Who asked.
        principal: String,
        /// The device asked for.
        device: String,
    },
}

/// A policy file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not JSON of the documented shape.
    #[error("policy file: {0}")]
    Syntax(String),
    /// A scope name that does not exist.
    #[error("unknown scope {0:?} (scopes: ingest, analyze, watch, admin)")]
    UnknownScope(String),
    /// A device pattern with `*` anywhere but at its end, or empty.
    #[error("bad device pattern {0:?} (an exact id, a prefix ending in *, or *)")]
    BadPattern(String),
    /// An `api_keys_sha256` entry that is not 64 hex digits.
    #[error("principal {0:?}: api_keys_sha256 entries are 64 hex digits")]
    BadKeyHash(String),
    /// Two entries share a name or a key.
    #[error("duplicate {0}")]
    Duplicate(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    principals: Vec<PrincipalEntry>,
    #[serde(default)]
    default_quota: QuotaLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    name: String,
    scopes: Vec<String>,
    devices: Vec<String>,
    #[serde(default)]
    api_keys_sha256: Vec<String>,
    #[serde(default)]
    quota: QuotaLimits,
}

/// The principals of a policy file, by name and by API key hash.
#[derive(Debug, Default)]
pub struct Policy {
    by_name: HashMap<Arc<str>, Arc<Principal>>,
    by_key: HashMap<[u8; 32], Arc<Principal>>,
    /// The quota of a JWT principal without an entry.
    pub default_quota: QuotaLimits,
}

impl Policy {
    /// Parses a policy file.
    pub fn parse(bytes: &[u8]) -> Result<Self, PolicyError> {
        let file: PolicyFile =
            serde_json::from_slice(bytes).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        let mut policy = Self {
            default_quota: file.default_quota,
            ..Self::default()
        };
        for entry in file.principals {
            let principal = Arc::new(Principal {
                name: Arc::from(entry.name.as_str()),
                scopes: Scopes::parse(entry.scopes.iter().map(String::as_str))?,
                devices: DeviceNamespace::parse(entry.devices.iter().map(String::as_str))?,
                quota: entry.quota,
            });
            for hex in &entry.api_keys_sha256 {
                let hash =
                    parse_hex32(hex).ok_or_else(|| PolicyError::BadKeyHash(entry.name.clone()))?;
                if policy.by_key.insert(hash, Arc::clone(&principal)).is_some() {
                    return Err(PolicyError::Duplicate(format!("api key hash {hex}")));
                }
            }
            if policy
                .by_name
                .insert(Arc::clone(&principal.name), principal)
                .is_some()
            {
                return Err(PolicyError::Duplicate(format!(
                    "principal {:?}",
                    entry.name
                )));
            }
        }
        Ok(policy)
    }

    /// The principal holding the API key `key`.
    pub fn by_api_key(&self, key: &str) -> Option<Arc<Principal>> {
        self.by_key.get(&hash_key(key)).cloned()
    }

    /// The principal called `name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<Principal>> {
        self.by_name.get(name).cloned()
    }

    /// Number of principals.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the policy has no principal.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// SHA-256 of an API key, as the policy file stores it.
pub fn hash_key(key: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The lowercase hex form of [`hash_key`], for writing a policy file.
pub fn hash_key_hex(key: &str) -> String {
    hash_key(key).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_match_exact_prefix_and_everything() {
        let ns = DeviceNamespace::parse(["fleet-a/*", "gw-7"]).unwrap();
        assert!(ns.allows("fleet-a/dev-1"));
        assert!(ns.allows("gw-7"));
        assert!(!ns.allows("gw-77"));
        assert!(!ns.allows("fleet-b/dev-1"));
        assert!(!ns.allows("fleet-a"));
        assert!(DeviceNamespace::parse(["*"]).unwrap().allows("anything"));
        assert!(!DeviceNamespace::default().allows("x"));
        for bad in ["", "a*b", "**", "*a"] {
            assert_eq!(
                DeviceNamespace::parse([bad]),
                Err(PolicyError::BadPattern(bad.into()))
            );
        }
    }

    #[test]
    fn policy_finds_principals_by_hashed_key() {
        let key = "tw_live_0123456789abcdef0123456789abcdef";
        let file = format!(
            r#"{{"principals": [
                {{"name": "a", "scopes": ["ingest"], "devices": ["a/*"],
                  "api_keys_sha256": ["{}"], "quota": {{"streams": 2}}}},
                {{"name": "ops", "scopes": ["admin", "analyze"], "devices": ["*"]}}
            ]}}"#,
            hash_key_hex(key)
        );
        let policy = Policy::parse(file.as_bytes()).unwrap();
        let a = policy.by_api_key(key).unwrap();
        assert_eq!(&*a.name, "a");
        assert_eq!(a.quota.streams, Some(2));
        assert!(a.require(Scope::Ingest).is_ok());
        assert!(a.require(Scope::Analyze).is_err());
        assert!(policy.by_api_key("tw_live_wrong").is_none());
        assert!(policy.by_name("ops").unwrap().scopes.contains(Scope::Admin));
        assert_eq!(policy.len(), 2);
    }

    #[test]
    fn bad_policies_are_refused_with_their_reason() {
        let cases = [
            (
                r#"{"principals": [{"name": "a", "scopes": ["root"], "devices": []}]}"#,
                "unknown scope",
            ),
            (
                r#"{"principals": [{"name": "a", "scopes": [], "devices": [], "api_keys_sha256": ["zz"]}]}"#,
                "64 hex",
            ),
            (
                r#"{"principals": [{"name": "a", "scopes": [], "devices": []}, {"name": "a", "scopes": [], "devices": []}]}"#,
                "duplicate",
            ),
            (
                r#"{"principals": [{"name": "a", "scopes": [], "devices": [], "extra": 1}]}"#,
                "unknown field",
            ),
            ("not json", "policy file"),
        ];
        for (file, expected) in cases {
            let e = Policy::parse(file.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(expected), "{file}: {e}");
        }
    }
}
