//! The local blob cache: uncompressed layouts of blobs, one file per blob, named by digest.
//!
//! A cache file only appears under its final name once complete: it is built as a temporary
//! file in the cache directory, synced, and renamed into place at the end. (The chunk-granular,
//! crash-safe sparse cache of the lazy modes replaces this.)

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lode_format::manifest::DataBlob;

use crate::chunks::UncompressedView;

/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/lode/cache";

/// Path of a blob's complete uncompressed layout in `cache_dir`.
pub fn cached_blob_path(cache_dir: &Path, blob: &DataBlob) -> PathBuf {
    cache_dir.join("blobs").join(blob.hex())
}

/// Makes sure the uncompressed layout of `blob` (whose remote form is the local file
/// `remote`) is complete in the cache, and returns its path.
pub fn materialize(cache_dir: &Path, blob: &DataBlob, remote: &Path) -> Result<PathBuf> {
    let dest = cached_blob_path(cache_dir, blob);
    if fs::metadata(&dest).is_ok_and(|m| m.len() == blob.uncompressed_size) {
        return Ok(dest);
    }
    let dir = dest.parent().expect("blobs dir");
    fs::create_dir_all(dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;
    let src = File::open(remote).with_context(|| format!("opening blob {}", remote.display()))?;
    let view = UncompressedView::open(src, blob.clone())?;
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a cache file in {}", dir.display()))?;
    let out: &File = tmp.as_file();
    out.set_len(blob.uncompressed_size)
        .context("sizing cache file")?;
    for i in 0..view.table().entries.len() {
        let e = view.table().entries[i];
        let data = view.chunk(i)?;
        out.write_all_at(
            &data,
            e.blkaddr.get() as u64 * lode_format::blob::BLOB_BLOCK_SIZE,
        )
        .with_context(|| format!("writing cache file for blob {}", blob.digest))?;
    }
    out.sync_all().context("syncing cache file")?;
    tmp.persist(&dest)
        .with_context(|| format!("naming cache file {}", dest.display()))?;
    Ok(dest)
}
