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
    time::SystemTime,
};

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

#[cfg(test)]
mod tests;
