//! `image.json`: the small manifest of a lode image directory.
//!
//! An image directory holds `bootstrap` (EROFS metadata), `blobs/<hex digest>` (data blobs,
//! named by the sha256 of their bytes, in device-table order) and this manifest.

use serde::{Deserialize, Serialize};

/// Version of the image directory layout this code writes.
pub const FORMAT_VERSION: u32 = 1;
pub const BOOTSTRAP_FILE: &str = "bootstrap";
pub const MANIFEST_FILE: &str = "image.json";
pub const BLOBS_DIR: &str = "blobs";

/// A content-addressed file of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// `sha256:<64 hex digits>`.
    pub digest: String,
    pub size: u64,
}

impl BlobRef {
    /// The hex part of the digest: the blob's file name and its device-table tag.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format_version: u32,
    pub block_size: u32,
    pub chunk_size: u32,
    pub bootstrap: BlobRef,
    /// Blob `i` is device `i + 1` of the bootstrap's device table.
    pub blobs: Vec<BlobRef>,
}
