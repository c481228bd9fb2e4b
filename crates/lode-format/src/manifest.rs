//! `image.json`: the small manifest of a lode image directory.
//!
//! An image directory holds `bootstrap` (EROFS metadata), `blobs/<hex digest>` (data blobs,
//! named by the sha256 of their bytes, in device-table order) and this manifest.

use serde::{Deserialize, Serialize};

use crate::blob::Compression;

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

/// A data blob in its remote form (see [`crate::blob`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataBlob {
    /// `sha256:<64 hex digits>` of the remote form; the hex part is the device-table tag.
    pub digest: String,
    /// Size of the remote form.
    pub size: u64,
    /// Size of the uncompressed layout the kernel reads (a whole number of blocks).
    pub uncompressed_size: u64,
    pub compression: Compression,
    /// Where the chunk table starts in the remote form; it runs to 64 bytes before the end.
    pub table_offset: u64,
    pub chunk_count: u64,
    /// `blake3:<hex>` of the chunk table (its entries, without the trailer). The manifest is
    /// verified (registry digest chain, or a local file), so this anchors every chunk digest:
    /// a range-fetched table that does not match is refused.
    #[serde(default)]
    pub table_digest: String,
}

impl DataBlob {
    /// The hex part of the digest: the blob's file name and its device-table tag.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }

    /// Checks chunk-table bytes (entries, without the trailer) against [`Self::table_digest`].
    pub fn verify_table(&self, table: &[u8]) -> Result<(), String> {
        let got = format!("blake3:{}", blake3::hash(table).to_hex());
        if self.table_digest.is_empty() {
            return Err(format!(
                "blob {}: the image manifest has no chunk-table digest (rebuild the image)",
                self.digest
            ));
        }
        if got != self.table_digest {
            return Err(format!(
                "blob {}: chunk table digest {got} does not match the image manifest's {}",
                self.digest, self.table_digest
            ));
        }
        Ok(())
    }

    /// The remote form doubles as the uncompressed layout (it is uncompressed).
    pub fn is_direct(&self) -> bool {
        self.compression == Compression::None
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format_version: u32,
    pub block_size: u32,
    pub chunk_size: u32,
    pub bootstrap: BlobRef,
    /// Blob `i` is device `i + 1` of the bootstrap's device table.
    pub blobs: Vec<DataBlob>,
    /// Ranges a mount fetches in the background at once, in this order (from a recorded
    /// access trace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<PrefetchExtent>,
}

/// A range of one blob's uncompressed layout to prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchExtent {
    /// Index into `blobs`.
    pub blob: u32,
    pub offset: u64,
    pub len: u64,
}
