//! The lode image builder: turns a directory tree into an image directory.
//!
//! - [`walk`] scans the source into an in-memory [`Tree`](lode_format::tree::Tree);
//! - [`pipeline`] reads file data on worker threads, chunked and hashed;
//! - [`store`] deduplicates chunks and writes the blob;
//! - the bootstrap comes from [`lode_format::writer`], and [`build_dir`] ties it together.

pub mod pipeline;
pub mod store;
pub mod walk;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lode_format::blob::Compression;
use lode_format::manifest::{self, BlobRef, DataBlob, ImageManifest};
use lode_format::tree::Tree;
use lode_format::writer::{self, DeviceSpec, WriteOptions};
use sha2::{Digest, Sha256};

pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Files up to this size go into the bootstrap rather than a blob (see docs/ARCHITECTURE.md).
pub const DEFAULT_INLINE_MAX: u64 = 512;
pub const BLOCK_BITS: u8 = 12;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub chunk_size: u32,
    pub inline_max: u64,
    pub threads: usize,
    pub compression: Compression,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            compression: Compression::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            inline_max: DEFAULT_INLINE_MAX,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

/// What a build did, for the summary line and benchmarks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BuildReport {
    pub inodes: u64,
    pub files: u64,
    pub inlined_files: u64,
    pub input_bytes: u64,
    pub chunks: u64,
    pub unique_chunks: u64,
    pub hole_chunks: u64,
    pub deduplicated_bytes: u64,
    pub bootstrap_bytes: u64,
    pub blob_bytes: u64,
    /// Uncompressed bytes of the unique chunks stored.
    pub stored_bytes: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Checks a chunk size and returns its log2.
pub fn chunk_bits(chunk_size: u32) -> Result<u8> {
    if !chunk_size.is_power_of_two() || !(4096..=64 << 20).contains(&chunk_size) {
        bail!("chunk size {chunk_size} must be a power of two from 4 KiB to 64 MiB");
    }
    Ok(chunk_size.trailing_zeros() as u8)
}

/// Builds an image directory at `out` from the directory tree at `src`.
pub fn build_dir(src: &Path, out: &Path, opts: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    let chunk_bits = chunk_bits(opts.chunk_size)?;
    let blobs_dir = out.join(manifest::BLOBS_DIR);
    fs::create_dir_all(&blobs_dir).with_context(|| format!("creating {}", blobs_dir.display()))?;

    let (mut tree, jobs) = walk::scan(src)?;
    let mut store = store::ChunkStore::new(&blobs_dir, 1 << BLOCK_BITS, opts.compression);
    let stats = pipeline::run(
        &mut tree,
        &jobs,
        &mut store,
        &pipeline::PipelineOptions {
            chunk_bits,
            inline_max: opts.inline_max,
            threads: opts.threads,
        },
    )?;
    let store_stats = store.stats.clone();
    let blobs = store.finish()?;
    let mut report = write_image(&tree, out, opts.chunk_size, &blobs)?;
    report.files = stats.files;
    report.inlined_files = stats.inlined_files;
    report.input_bytes = stats.input_bytes;
    report.hole_chunks = stats.hole_chunks;
    report.chunks = store_stats.chunks;
    report.unique_chunks = store_stats.unique_chunks;
    report.deduplicated_bytes = store_stats.deduplicated_bytes;
    report.stored_bytes = store_stats.stored_bytes;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Writes `bootstrap` and `image.json` for a tree whose chunks are in `blobs`.
pub fn write_image(
    tree: &Tree,
    out: &Path,
    chunk_size: u32,
    blobs: &[DataBlob],
) -> Result<BuildReport> {
    let devices = blobs
        .iter()
        .map(|b| DeviceSpec {
            tag: b.hex().as_bytes().to_vec(),
            blocks: (b.uncompressed_size >> BLOCK_BITS) as u32,
        })
        .collect();
    let (bootstrap, summary) = writer::write_bootstrap(
        tree,
        &WriteOptions {
            block_bits: BLOCK_BITS,
            devices,
            ..Default::default()
        },
    )
    .context("laying out the bootstrap")?;
    let bootstrap_ref = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&bootstrap))),
        size: bootstrap.len() as u64,
    };
    write_atomic(&out.join(manifest::BOOTSTRAP_FILE), &bootstrap)?;
    let image = ImageManifest {
        format_version: manifest::FORMAT_VERSION,
        block_size: 1 << BLOCK_BITS,
        chunk_size,
        bootstrap: bootstrap_ref,
        blobs: blobs.to_vec(),
    };
    let mut json = serde_json::to_vec_pretty(&image).expect("manifest serializes");
    json.push(b'\n');
    write_atomic(&out.join(manifest::MANIFEST_FILE), &json)?;
    Ok(BuildReport {
        inodes: summary.inodes,
        bootstrap_bytes: bootstrap.len() as u64,
        blob_bytes: blobs.iter().map(|b| b.size).sum(),
        ..Default::default()
    })
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("output files live in a directory");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, data)
        .with_context(|| format!("writing {}", path.display()))?;
    // Image files are meant to be shared and served: readable by all, like mkfs output.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
