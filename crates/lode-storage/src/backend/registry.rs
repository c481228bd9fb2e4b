//! Blobs from an OCI registry: `GET /v2/<repo>/blobs/<digest>` with a Range header, through
//! [`lode_registry::RegistryClient`] (Bearer tokens and their refresh, Basic auth,
//! credentials from auth files, the storage redirect cached per blob).
//!
//! The client retries on its own (`ClientOptions::retries`); the fetcher retries too, so
//! build the client for a backend with `retries: 0` (or 1) — see [`backend_client_options`].
//! Errors are mapped to kinds:
//!
//! | `lode_registry::Error` | kind |
//! |---|---|
//! | `Status` 404/410/416 | NotFound |
//! | `Status` 408/429/5xx | Transient |
//! | `Status` other (401, 403, 400, …), `Auth`, `Credentials`, bad reference/digest | Permanent |
//! | `Transport` (connect, TLS, timeout), `Io` (body), `Protocol` (bad/short range answer) | Transient |
//!
//! A result shorter than asked (the blob ends inside the range) is NotFound.

use std::sync::Arc;

use lode_registry::{ClientOptions, Error, Reference, RegistryClient};

use super::{digest_hex, Backend, BackendError, BackendErrorKind};

/// `opts` with the client's own retries off (the fetcher retries).
pub fn backend_client_options(opts: ClientOptions) -> ClientOptions {
    ClientOptions { retries: 0, ..opts }
}

/// The blobs of one repository of a registry. `Send + Sync`.
pub struct RegistryBackend {
    client: Arc<RegistryClient>,
    reference: Reference,
}

impl RegistryBackend {
    /// Blobs of `reference`'s repository (its tag or digest does not matter).
    pub fn new(client: RegistryClient, reference: Reference) -> Self {
        Self::with_shared_client(Arc::new(client), reference)
    }

    /// Share one client (connection pool, tokens) with other users, e.g. the code that
    /// fetched the manifest.
    pub fn with_shared_client(client: Arc<RegistryClient>, reference: Reference) -> Self {
        if client.options().retries > 1 {
            tracing::debug!(
                retries = client.options().retries,
                "registry backend: the client retries on its own; the fetcher retries too"
            );
        }
        RegistryBackend { client, reference }
    }

    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }
}

/// The kind of a registry client error.
pub fn error_kind(e: &Error) -> BackendErrorKind {
    match e {
        Error::Status { status, .. } => super::http::status_kind(*status),
        Error::Transport { .. } | Error::Io { .. } | Error::Protocol { .. } => {
            BackendErrorKind::Transient
        }
        // Not for ranges, but if they ever come back: the bytes were bad in transit.
        Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => BackendErrorKind::Transient,
        _ => BackendErrorKind::Permanent,
    }
}

impl Backend for RegistryBackend {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let digest = format!("sha256:{}", digest_hex(digest));
        let ctx = || {
            format!(
                "registry {}/{} blob {digest} bytes {offset}+{len}",
                self.reference.registry(),
                self.reference.repository()
            )
        };
        if len == 0 {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .get_blob_range(&self.reference, &digest, offset, len)
            .map_err(|e| {
                BackendError::new(
                    error_kind(&e),
                    format!("{}: {}", ctx(), super::http::error_chain(&e)),
                )
            })?;
        let got = out.len() as u64;
        if got < len {
            return Err(BackendError::new(
                BackendErrorKind::NotFound,
                format!(
                    "{}: past the end of the blob (it ends at {})",
                    ctx(),
                    offset + got
                ),
            ));
        }
        if got > len {
            return Err(BackendError::transient(format!(
                "{}: long body: {got} bytes",
                ctx()
            )));
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!(
            "registry {}/{}",
            self.reference.registry(),
            self.reference.repository()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let status = |s| Error::Status {
            method: "GET".into(),
            url: "u".into(),
            status: s,
            errors: Default::default(),
        };
        assert_eq!(error_kind(&status(404)), BackendErrorKind::NotFound);
        assert_eq!(error_kind(&status(503)), BackendErrorKind::Transient);
        assert_eq!(error_kind(&status(429)), BackendErrorKind::Transient);
        assert_eq!(error_kind(&status(403)), BackendErrorKind::Permanent);
        let auth = Error::Auth {
            registry: "r".into(),
            reason: "no".into(),
        };
        assert_eq!(error_kind(&auth), BackendErrorKind::Permanent);
        let proto = Error::Protocol {
            url: "u".into(),
            reason: "short".into(),
        };
        assert_eq!(error_kind(&proto), BackendErrorKind::Transient);
    }

    #[test]
    fn send_sync() {
        fn is<T: Send + Sync>() {}
        is::<RegistryBackend>();
    }
}
