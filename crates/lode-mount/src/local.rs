//! `--mode local`: mount an image whose blobs are all present, with no daemon.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use lode_format::manifest::{self, ImageManifest};

use crate::kernel::ErofsMount;

/// Reads `image.json` of an image directory.
pub fn read_manifest(image_dir: &Path) -> Result<ImageManifest> {
    let path = image_dir.join(manifest::MANIFEST_FILE);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let m: ImageManifest =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    if m.format_version != manifest::FORMAT_VERSION {
        bail!(
            "{}: format version {} is not supported (this lode reads version {})",
            path.display(),
            m.format_version,
            manifest::FORMAT_VERSION
        );
    }
    Ok(m)
}

/// Mounts the image directory `image_dir` at `target` with every blob local. Blobs stored
/// compressed are expanded into `cache_dir` first; uncompressed ones are used in place.
pub fn mount(image_dir: &Path, target: &Path, cache_dir: &Path) -> Result<()> {
    let image_dir = fs::canonicalize(image_dir)
        .with_context(|| format!("image directory {}", image_dir.display()))?;
    let m = read_manifest(&image_dir)?;
    let bootstrap = image_dir.join(manifest::BOOTSTRAP_FILE);
    check_size(&bootstrap, m.bootstrap.size)?;
    let mut devices = Vec::new();
    for blob in &m.blobs {
        let path = image_dir.join(manifest::BLOBS_DIR).join(blob.hex());
        check_size(&path, blob.size).with_context(|| {
            format!(
                "blob {} is not complete locally; `--mode local` needs every blob (pull it with --all)",
                blob.digest
            )
        })?;
        if blob.is_direct() {
            devices.push(path);
        } else {
            devices.push(
                lode_storage::fetch::materialize_from_dir(
                    cache_dir,
                    blob,
                    &image_dir.join(manifest::BLOBS_DIR),
                )
                .with_context(|| format!("expanding blob {} into the cache", blob.digest))?,
            );
        }
    }
    ErofsMount { bootstrap, devices }.mount(target)
}

fn check_size(path: &Path, expected: u64) -> Result<()> {
    let st = fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if st.len() != expected {
        bail!(
            "{} has {} bytes, the manifest says {expected}",
            path.display(),
            st.len()
        );
    }
    Ok(())
}
