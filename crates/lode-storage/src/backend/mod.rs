//! Backends: where the remote form of a blob is read from.
//!
//! A backend answers one question — "give me bytes `offset..offset+len` of blob `digest`" —
//! and says whether a failure is worth retrying. Everything above (caching, merging,
//! verification, retries) is the fetcher's job, so backends stay small.

use std::fmt;

/// Why a backend read failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// Network trouble, 5xx, 429, a short body: try again (maybe elsewhere).
    Transient,
    /// The blob (or the range) does not exist there.
    NotFound,
    /// Credentials, permissions, a malformed request: trying again will not help.
    Permanent,
}

#[derive(Debug, Clone)]
pub struct BackendError {
    pub kind: BackendErrorKind,
    /// Names the backend, the blob and the cause.
    pub message: String,
}

impl BackendError {
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Transient, message)
    }
    pub fn is_transient(&self) -> bool {
        self.kind == BackendErrorKind::Transient
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BackendError {}

/// A source of blob bytes. Implementations must be cheap to call from many threads at once
/// (connection reuse is theirs to manage).
pub trait Backend: Send + Sync {
    /// Exactly `len` bytes at `offset` of the blob whose digest is `digest`
    /// (`sha256:<hex>`), or an error. Never fewer bytes.
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError>;

    /// A short description for logs, metrics and error messages (e.g. `http://host/img`).
    fn describe(&self) -> String;
}

/// The hex part of a `sha256:<hex>` digest (file names and URLs use it).
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub mod http;
pub mod local;
pub mod mirror;
pub mod registry;
pub mod s3;
pub mod stats;
