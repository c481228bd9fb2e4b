//! The crate's error type. Every variant names what was being done (URL, registry,
//! repository, digest) so a CLI can print it as is.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: String },

    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },

    /// Connection, TLS or timeout failure, after the retries. (Like every variant with a
    /// source, the message leaves the source out: print with `{:#}` (anyhow) or walk
    /// `source()`.)
    #[error("{method} {url}")]
    Transport {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// The registry answered with an unexpected status.
    #[error("{method} {url}: HTTP {status}{errors}")]
    Status {
        method: String,
        url: String,
        status: u16,
        /// The `errors[]` of the registry's error body, if it sent one.
        errors: RegistryErrors,
    },

    #[error("authentication to {registry} failed: {reason}")]
    Auth { registry: String, reason: String },

    #[error("reading credentials: {0}")]
    Credentials(String),

    #[error("{what} {url}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        url: String,
        expected: String,
        actual: String,
    },

    #[error("{what} {url}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        url: String,
        expected: u64,
        actual: u64,
    },

    /// The registry sent something that does not follow the distribution spec
    /// (bad JSON, missing or malformed headers, ...).
    #[error("{url}: invalid response from registry: {reason}")]
    Protocol { url: String, reason: String },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{reference} is not a lode image (config media type {media_type}); convert it with `lode convert`")]
    NotLodeImage {
        reference: String,
        media_type: String,
    },

    #[error("{reference}: {reason}")]
    UnsupportedImage { reference: String, reason: String },

    #[error("{reference}: no manifest for platform {platform} in the index (it has: {available})")]
    NoMatchingPlatform {
        reference: String,
        platform: String,
        available: String,
    },

    #[error("lode image {dir}: {reason}")]
    InvalidImageDir { dir: PathBuf, reason: String },
}

impl Error {
    /// HTTP status of a [`Error::Status`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the registry said the thing does not exist (HTTP 404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The registry's error codes (`MANIFEST_UNKNOWN`, `DENIED`, ...), if any.
    pub fn registry_codes(&self) -> Vec<&str> {
        match self {
            Error::Status { errors, .. } => errors.0.iter().map(|e| e.code.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// One entry of a registry error body: `{"errors":[{"code":..,"message":..,"detail":..}]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryError {
    pub code: String,
    pub message: String,
    /// `detail` as compact JSON (it may be any JSON value), empty if absent.
    pub detail: String,
}

/// The `errors[]` of a registry error body; displays as `: CODE: message (detail); ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryErrors(pub Vec<RegistryError>);

impl RegistryErrors {
    /// Parse an error body; never fails (a body that is not the spec's JSON gives an entry
    /// with the first bytes of the body as message, or nothing for an empty body).
    pub fn parse(body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            #[serde(default)]
            code: serde_json::Value,
            #[serde(default)]
            message: serde_json::Value,
            #[serde(default)]
            detail: serde_json::Value,
        }
        fn text(v: &serde_json::Value) -> String {
            match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }
        }
        if let Ok(b) = serde_json::from_slice::<Body>(body) {
            if !b.errors.is_empty() {
                return RegistryErrors(
                    b.errors
                        .iter()
                        .map(|e| RegistryError {
                            code: text(&e.code),
                            message: text(&e.message),
                            detail: text(&e.detail),
                        })
                        .collect(),
                );
            }
        }
        let s = String::from_utf8_lossy(body);
        let s = s.trim();
        if s.is_empty() {
            return RegistryErrors::default();
        }
        let mut short: String = s.chars().take(300).collect();
        if short.len() < s.len() {
            short.push('…');
        }
        RegistryErrors(vec![RegistryError {
            code: String::new(),
            message: short,
            detail: String::new(),
        }])
    }
}

impl fmt::Display for RegistryErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            if !e.code.is_empty() {
                write!(f, "{}", e.code)?;
                if !e.message.is_empty() {
                    f.write_str(": ")?;
                }
            }
            f.write_str(&e.message)?;
            if !e.detail.is_empty() {
                let d: String = e.detail.chars().take(300).collect();
                write!(f, " ({d})")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_error_body() {
        let e = RegistryErrors::parse(
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}"#,
        );
        assert_eq!(
            e.to_string(),
            r#": MANIFEST_UNKNOWN: manifest unknown ({"Tag":"x"})"#
        );
        assert_eq!(RegistryErrors::parse(b"").to_string(), "");
        assert_eq!(RegistryErrors::parse(b"oops\n").to_string(), ": oops");
        assert_eq!(
            RegistryErrors::parse(br#"{"errors":[{"code":5}]}"#).to_string(),
            ": 5"
        );
        // Not JSON at all, binary garbage: no panic.
        let _ = RegistryErrors::parse(&[0xff, 0xfe, 0x00]).to_string();
    }
}
