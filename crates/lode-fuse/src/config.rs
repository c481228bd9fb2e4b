//! What `lode mount` hands the supervisor and the supervisor hands each worker. Both travel
//! as JSON over the child's stdin (never argv or the environment: they may hold registry
//! credentials).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lode_format::manifest::{self, ImageManifest};
use lode_storage::backend::http::HttpBackend;
use lode_storage::backend::local::LocalDirBackend;
use lode_storage::backend::registry::{backend_client_options, RegistryBackend};
use lode_storage::backend::Backend;
use lode_storage::image::ImageSource;
use serde::{Deserialize, Serialize};

use crate::abi::Negotiated;

pub use lode_storage::image::RegistryOptions;

/// `lode mount IMAGE MNT --mode fuse …`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountConfig {
    /// IMAGE as given: a directory, an http(s) URL or a registry reference.
    pub image: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub registry: RegistryOptions,
    /// Use FUSE passthrough for files whose data is local.
    pub passthrough: bool,
    /// Only files of at least this size get passthrough; smaller ones are read through lode
    /// (and then kept in the FUSE page cache).
    #[serde(default = "default_passthrough_min_size")]
    pub passthrough_min_size: u64,
    /// Request-serving threads per worker.
    pub threads: usize,
    /// `--record-trace`: record which files (and ranges) are read into this file (the
    /// format of `lode_format::trace`). Emptied at mount; each worker resumes it.
    #[serde(default)]
    pub record_trace: Option<PathBuf>,
}

/// Passthrough pays off for big files (no copy through lode, no READ round trips); a small
/// file is one READ, its data lies next to its neighbours' in the blob (readahead reads
/// them together, where separate backing files cost a disk read each), and its backing file
/// would cost an inode and at least a block.
pub const DEFAULT_PASSTHROUGH_MIN_SIZE: u64 = 64 << 10;

fn default_passthrough_min_size() -> u64 {
    DEFAULT_PASSTHROUGH_MIN_SIZE
}

/// Everything a worker needs; nothing in it requires the network, so a worker restarted
/// while the remote is unreachable still serves what is cached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub mount: MountConfig,
    /// The image as it was resolved when mounting (a moved tag does not change it).
    pub manifest: ImageManifest,
    /// The verified bootstrap in the cache.
    pub bootstrap: PathBuf,
    pub negotiated: Negotiated,
    /// Passthrough wanted, negotiated and allowed.
    pub passthrough: bool,
    /// Descriptor numbers the worker inherits.
    pub fuse_fd: i32,
    pub state_fd: i32,
}

/// The backend blobs are read from, built without any network access.
pub fn blob_backend(mount: &MountConfig) -> Result<Arc<dyn Backend>> {
    let source = ImageSource::parse(&mount.image)?;
    Ok(match source {
        ImageSource::Dir(dir) => Arc::new(LocalDirBackend::new(dir.join(manifest::BLOBS_DIR))),
        ImageSource::Http(url) => Arc::new(
            HttpBackend::new(&url, mount.registry.source_options().http)
                .with_context(|| format!("image at {url}"))?,
        ),
        ImageSource::Registry(reference) => {
            // Blobs are addressed by digest: the repository is all that matters.
            let client = lode_registry::RegistryClient::new(backend_client_options(
                mount.registry.client_options(),
            ))?;
            Arc::new(RegistryBackend::new(client, reference))
        }
    })
}
