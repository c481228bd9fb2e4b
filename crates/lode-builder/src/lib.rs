//! The lode image builder: turns a directory tree into an image directory.
//!
//! - [`walk`] scans the source into an in-memory [`Tree`](lode_format::tree::Tree);
//! - [`pipeline`] reads file data on worker threads, chunked and hashed;
//! - [`store`] deduplicates chunks and writes the blob;
//! - the bootstrap comes from [`lode_format::writer`], and [`build_dir`] ties it together.
//!
//! OCI layers take another road to the same tree: [`layers`] applies layer tarballs (read by
//! [`tarstream`]) in order, one blob per layer, and [`build_layers`], [`build_layer_streams`]
//! and [`build_oci_layout`] (input: [`oci_layout`]) write the image.
//!
//! Long builds report batched [`progress`] events to [`BuildOptions::progress`].

pub mod layers;
pub mod oci_layout;
pub mod pipeline;
pub mod prefetch;
pub mod progress;
pub mod store;
pub mod tarstream;
pub mod walk;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lode_format::blob::{BlobTrailer, ChunkTable, Compression, BLOB_TRAILER_SIZE};
use lode_format::manifest::{self, BlobRef, DataBlob, ImageManifest};
use lode_format::tree::{Content, FileData, Tree};
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
    /// An access trace to store as the image's prefetch list (see [`prefetch`]).
    pub prefetch: Option<std::path::PathBuf>,
    /// Where progress events go (default: nowhere).
    pub progress: progress::Progress,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            prefetch: None,
            progress: progress::Progress::default(),
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
    /// Builds from layers: what each layer read and added, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<layers::LayerReport>,
    /// Blobs of a chunk dictionary that the image references (copied into `blobs/`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dict_blobs: Vec<String>,
    /// The prefetch list stored from `--prefetch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<prefetch::PrefetchReport>,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl BuildReport {
    /// Takes in the totals of the data phase and the chunk store.
    fn absorb(
        &mut self,
        dict_blobs: Vec<String>,
        data: &pipeline::PipelineStats,
        store: &store::StoreStats,
    ) {
        self.dict_blobs = dict_blobs;
        self.files = data.files;
        self.inlined_files = data.inlined_files;
        self.input_bytes = data.input_bytes;
        self.hole_chunks = data.hole_chunks;
        self.chunks = store.chunks;
        self.unique_chunks = store.unique_chunks;
        self.deduplicated_bytes = store.deduplicated_bytes;
        self.stored_bytes = store.stored_bytes;
    }
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
    build_dir_with_dict(src, out, opts, None)
}

/// [`build_dir`], deduplicating against the chunks of an existing image (see
/// [`build_layers`] for what `chunk_dict` does).
pub fn build_dir_with_dict(
    src: &Path,
    out: &Path,
    opts: &BuildOptions,
    chunk_dict: Option<&Path>,
) -> Result<BuildReport> {
    let started = Instant::now();
    let chunk_bits = chunk_bits(opts.chunk_size)?;
    let blobs_dir = out.join(manifest::BLOBS_DIR);
    fs::create_dir_all(&blobs_dir).with_context(|| format!("creating {}", blobs_dir.display()))?;

    let (mut tree, mut jobs) = walk::scan(src)?;
    // The files an access trace names are stored first, in trace order: a mount prefetches
    // them with a few large requests.
    prefetch::order_jobs(&mut jobs, src, opts.prefetch.as_deref())?;
    opts.progress.emit(progress::Event::Scanned {
        files: jobs.len() as u64,
        bytes: jobs.iter().map(|j| j.size).sum(),
    });
    let mut store = store::ChunkStore::new(&blobs_dir, 1 << BLOCK_BITS, opts.compression);
    let dict = match chunk_dict {
        Some(dir) => load_chunk_dict(dir, &mut store)?,
        None => Vec::new(),
    };
    let stats = pipeline::run(
        &mut tree,
        &jobs,
        &mut store,
        &pipeline::PipelineOptions {
            chunk_bits,
            inline_max: opts.inline_max,
            threads: opts.threads,
            progress: opts.progress.clone(),
        },
    )?;
    let store_stats = store.stats.clone();
    let blobs = store.finish()?;
    let (blobs, dict_blobs) = place_dict_blobs(&mut tree, blobs, &dict, &blobs_dir)?;
    let mut report = write_image(&tree, out, opts, &blobs)?;
    report.absorb(dict_blobs, &stats, &store_stats);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Builds an image directory at `out` from OCI layer tarballs (tar, tar+gzip or tar+zstd,
/// told apart by their first bytes), applied in order; each layer's new chunks go into a blob
/// of their own.
///
/// `chunk_dict` names an existing lode image directory: chunks already in its blobs are
/// referenced instead of stored again, and the dictionary blobs the new image uses become
/// devices of it, so they are placed in `out/blobs/` too (hard-linked, or copied when a hard
/// link is not possible).
pub fn build_layers(
    layers: &[PathBuf],
    out: &Path,
    opts: &BuildOptions,
    chunk_dict: Option<&Path>,
) -> Result<BuildReport> {
    let mut inputs = Vec::with_capacity(layers.len());
    for path in layers {
        let file = File::open(path).with_context(|| format!("opening layer {}", path.display()))?;
        ensure!(
            !file.metadata()?.is_dir(),
            "{} is a directory, not a layer tarball",
            path.display()
        );
        let size = file.metadata()?.len();
        inputs.push(
            layers::LayerInput::new(path.display().to_string(), Box::new(file)).with_size(size),
        );
    }
    build_layer_inputs(inputs, out, opts, chunk_dict)
}

/// [`build_layers`] from readers (e.g. registry downloads), named `stream N` in messages.
pub fn build_layer_streams(
    layers: Vec<Box<dyn Read + Send>>,
    out: &Path,
    opts: &BuildOptions,
    chunk_dict: Option<&Path>,
) -> Result<BuildReport> {
    let inputs = layers
        .into_iter()
        .enumerate()
        .map(|(i, r)| layers::LayerInput::new(format!("stream {}", i + 1), r))
        .collect();
    build_layer_inputs(inputs, out, opts, chunk_dict)
}

/// [`build_layers`] from the image `tag` (or the only image) of an OCI image layout
/// directory; every layer blob's size and sha256 are checked while it is read.
pub fn build_oci_layout(
    layout: &Path,
    tag: Option<&str>,
    out: &Path,
    opts: &BuildOptions,
    chunk_dict: Option<&Path>,
) -> Result<BuildReport> {
    let inputs = oci_layout::open_layers(layout, tag)?;
    build_layer_inputs(inputs, out, opts, chunk_dict)
}

/// [`build_layers`] from named readers.
pub fn build_layer_inputs(
    inputs: Vec<layers::LayerInput>,
    out: &Path,
    opts: &BuildOptions,
    chunk_dict: Option<&Path>,
) -> Result<BuildReport> {
    let started = Instant::now();
    let chunk_bits = chunk_bits(opts.chunk_size)?;
    ensure!(!inputs.is_empty(), "no layers to build from");
    let blobs_dir = out.join(manifest::BLOBS_DIR);
    fs::create_dir_all(&blobs_dir).with_context(|| format!("creating {}", blobs_dir.display()))?;
    let mut store = store::ChunkStore::new(&blobs_dir, 1 << BLOCK_BITS, opts.compression);
    let dict = match chunk_dict {
        Some(dir) => load_chunk_dict(dir, &mut store)?,
        None => Vec::new(),
    };
    let applied = layers::apply_layers(
        inputs,
        &mut store,
        &layers::LayerOptions {
            chunk_bits,
            inline_max: opts.inline_max,
            threads: opts.threads,
            progress: opts.progress.clone(),
            hot: std::sync::Arc::new(prefetch::traced_paths(opts.prefetch.as_deref())?),
        },
    )?;
    let mut tree = applied.tree;
    let store_stats = store.stats.clone();
    let blobs = store.finish()?;
    let (blobs, dict_blobs) = place_dict_blobs(&mut tree, blobs, &dict, &blobs_dir)?;
    let mut report = write_image(&tree, out, opts, &blobs)?;
    report.absorb(dict_blobs, &applied.stats, &store_stats);
    report.layers = applied.layers;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Where the file of a chunk dictionary's blob is.
struct DictBlob {
    path: PathBuf,
}

/// Makes the chunks of every blob of the image at `dir` known to `store` (they take the first
/// device ids, in the dictionary's order).
fn load_chunk_dict(dir: &Path, store: &mut store::ChunkStore) -> Result<Vec<DictBlob>> {
    let manifest_path = dir.join(manifest::MANIFEST_FILE);
    let image: ImageManifest = serde_json::from_slice(
        &fs::read(&manifest_path)
            .with_context(|| format!("chunk dictionary: reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("chunk dictionary: parsing {}", manifest_path.display()))?;
    ensure!(
        image.block_size == 1 << BLOCK_BITS,
        "chunk dictionary {}: block size {} is not {}",
        dir.display(),
        image.block_size,
        1 << BLOCK_BITS
    );
    let mut out = Vec::new();
    for blob in &image.blobs {
        let hex = blob.hex();
        ensure!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "chunk dictionary {}: malformed blob digest {}",
            dir.display(),
            blob.digest
        );
        let path = dir.join(manifest::BLOBS_DIR).join(hex);
        let table = (|| -> Result<ChunkTable> {
            let f = File::open(&path)?;
            let len = f.metadata()?.len();
            ensure!(
                len == blob.size,
                "{len} bytes, image.json says {}",
                blob.size
            );
            ensure!(len >= BLOB_TRAILER_SIZE as u64, "too short for a lode blob");
            let mut tb = [0u8; BLOB_TRAILER_SIZE];
            f.read_exact_at(&mut tb, len - BLOB_TRAILER_SIZE as u64)?;
            let trailer = BlobTrailer::parse(&tb, len)?;
            let mut table = vec![0u8; trailer.table_len() as usize];
            f.read_exact_at(&mut table, trailer.table_offset.get())?;
            // The table must be the one image.json names (as lode-storage insists too).
            blob.verify_table(&table).map_err(anyhow::Error::msg)?;
            let table = ChunkTable::parse(&trailer, &table)?;
            ensure!(
                table.uncompressed_size == blob.uncompressed_size,
                "its table says {} uncompressed bytes, image.json {}",
                table.uncompressed_size,
                blob.uncompressed_size
            );
            Ok(table)
        })()
        .with_context(|| format!("chunk dictionary: blob {}", path.display()))?;
        store.add_known_blob(
            blob.clone(),
            table.entries.iter().map(|e| (e.digest, e.blkaddr.get())),
        );
        out.push(DictBlob { path });
    }
    Ok(out)
}

/// Drops the dictionary blobs no file uses from the device table (renumbering the chunk
/// addresses) and puts the used ones into `blobs_dir`. Returns the image's blobs and the
/// digests of the dictionary blobs kept.
fn place_dict_blobs(
    tree: &mut Tree,
    blobs: Vec<DataBlob>,
    dict: &[DictBlob],
    blobs_dir: &Path,
) -> Result<(Vec<DataBlob>, Vec<String>)> {
    if dict.is_empty() {
        return Ok((blobs, Vec::new()));
    }
    // Devices the reachable tree uses.
    let mut used = vec![false; blobs.len() + 1];
    let mut stack = vec![Tree::ROOT];
    let mut seen = std::collections::HashSet::new();
    while let Some(id) = stack.pop() {
        match &tree.node(id).content {
            Content::Directory(entries) => stack.extend(entries.values().copied()),
            Content::File(FileData::Chunked { chunks, .. }) if seen.insert(id) => {
                for c in chunks.iter().filter(|c| !c.is_hole()) {
                    used[c.device as usize] = true;
                }
            }
            _ => {}
        }
    }
    let mut new_id = vec![0u16; blobs.len() + 1];
    let mut kept = Vec::new();
    let mut kept_dict = Vec::new();
    for (i, blob) in blobs.into_iter().enumerate() {
        let device = i + 1;
        if device <= dict.len() && !used[device] {
            continue;
        }
        if device <= dict.len() {
            let src = &dict[i].path;
            let dst = blobs_dir.join(blob.hex());
            let present = fs::metadata(&dst).is_ok_and(|m| m.len() == blob.size);
            if !present && fs::hard_link(src, &dst).is_err() {
                fs::copy(src, &dst).with_context(|| {
                    format!(
                        "copying chunk dictionary blob {} to {}",
                        src.display(),
                        dst.display()
                    )
                })?;
            }
            kept_dict.push(blob.digest.clone());
        }
        kept.push(blob);
        new_id[device] = kept.len() as u16;
    }
    for id in 0..tree.len() {
        if let Content::File(FileData::Chunked { chunks, .. }) = &mut tree.node_mut(id).content {
            for c in chunks.iter_mut().filter(|c| !c.is_hole()) {
                c.device = new_id[c.device as usize];
            }
        }
    }
    Ok((kept, kept_dict))
}

/// Writes `bootstrap` and `image.json` for a tree whose chunks are in `blobs`.
pub fn write_image(
    tree: &Tree,
    out: &Path,
    opts: &BuildOptions,
    blobs: &[DataBlob],
) -> Result<BuildReport> {
    let (prefetch, prefetch_report) = match &opts.prefetch {
        Some(trace) => {
            let (list, report) = prefetch::resolve(tree, trace)?;
            (list, Some(report))
        }
        None => (Vec::new(), None),
    };
    let devices = blobs
        .iter()
        .map(|b| DeviceSpec {
            tag: b.hex().as_bytes().to_vec(),
            blocks: (b.uncompressed_size >> BLOCK_BITS) as u32,
        })
        .collect();
    opts.progress.emit(progress::Event::Writing);
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
        chunk_size: opts.chunk_size,
        bootstrap: bootstrap_ref,
        blobs: blobs.to_vec(),
        prefetch,
    };
    let mut json = serde_json::to_vec_pretty(&image).expect("manifest serializes");
    json.push(b'\n');
    write_atomic(&out.join(manifest::MANIFEST_FILE), &json)?;
    Ok(BuildReport {
        inodes: summary.inodes,
        bootstrap_bytes: bootstrap.len() as u64,
        blob_bytes: blobs.iter().map(|b| b.size).sum(),
        prefetch: prefetch_report,
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
