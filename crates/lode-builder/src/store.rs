//! The chunk store: deduplicates chunks by content and appends new ones to a blob.
//!
//! Chunks are placed block-aligned in the blob, in the order they are first seen, so the
//! blob is the uncompressed layout the kernel reads through chunk indexes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lode_format::manifest::BlobRef;
use lode_format::tree::ChunkAddr;
use sha2::{Digest, Sha256};

/// Identity of a chunk's content (blake3 of its bytes).
pub type ChunkDigest = [u8; 32];

/// Appends deduplicated chunks to one blob being written.
pub struct ChunkStore {
    block_size: u64,
    device: u16,
    known: HashMap<ChunkDigest, u32>,
    tmp: tempfile::NamedTempFile<BufWriter<File>>,
    sha: Sha256,
    /// Bytes written so far (always a multiple of the block size).
    len: u64,
    pub stats: StoreStats,
}

#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub chunks: u64,
    pub unique_chunks: u64,
    pub stored_bytes: u64,
    pub deduplicated_bytes: u64,
}

impl ChunkStore {
    /// A store writing a new blob into `dir` as device `device` of the image.
    pub fn new(dir: &Path, block_size: u32, device: u16) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(".blob-")
            .make_in(dir, |p| {
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .map(|f| BufWriter::with_capacity(1 << 20, f))
            })
            .with_context(|| format!("creating a blob in {}", dir.display()))?;
        Ok(ChunkStore {
            block_size: block_size as u64,
            device,
            known: HashMap::new(),
            tmp,
            sha: Sha256::new(),
            len: 0,
            stats: StoreStats::default(),
        })
    }

    /// Stores one chunk (unless the same bytes are stored already) and returns its address.
    pub fn put(&mut self, digest: &ChunkDigest, data: &[u8]) -> Result<ChunkAddr> {
        self.stats.chunks += 1;
        if let Some(&blkaddr) = self.known.get(digest) {
            self.stats.deduplicated_bytes += data.len() as u64;
            return Ok(ChunkAddr {
                device: self.device,
                blkaddr,
            });
        }
        let blkaddr = u32::try_from(self.len / self.block_size)
            .context("blob exceeds 2^32 blocks")?;
        let padded = (data.len() as u64).next_multiple_of(self.block_size);
        let pad = &ZEROS[..(padded - data.len() as u64) as usize];
        let w = self.tmp.as_file_mut();
        w.write_all(data)
            .and_then(|_| w.write_all(pad))
            .context("writing blob")?;
        self.sha.update(data);
        self.sha.update(pad);
        self.len += padded;
        self.known.insert(*digest, blkaddr);
        self.stats.unique_chunks += 1;
        self.stats.stored_bytes += data.len() as u64;
        Ok(ChunkAddr {
            device: self.device,
            blkaddr,
        })
    }

    /// Size of the blob so far, in blocks.
    pub fn blocks(&self) -> u64 {
        self.len / self.block_size
    }

    /// Finishes the blob: names it `<dir>/<hex sha256>` and returns its reference,
    /// or `None` (and no file) if no chunk was stored.
    pub fn finish(self) -> Result<Option<(BlobRef, PathBuf)>> {
        if self.len == 0 {
            return Ok(None);
        }
        let hex = hex::encode(self.sha.finalize());
        let dir = self
            .tmp
            .path()
            .parent()
            .expect("blob has a parent dir")
            .to_path_buf();
        let path = dir.join(&hex);
        let (writer, tmp_path) = self.tmp.into_parts();
        let file = writer.into_inner().context("flushing blob")?;
        drop(file);
        std::fs::set_permissions(&tmp_path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .with_context(|| format!("writing blob {}", path.display()))?;
        tmp_path
            .persist(&path)
            .with_context(|| format!("naming blob {}", path.display()))?;
        Ok(Some((
            BlobRef {
                digest: format!("sha256:{hex}"),
                size: self.len,
            },
            path,
        )))
    }
}

/// 64 KiB of zeros: padding source (block sizes are at most 4 KiB).
static ZEROS: [u8; 65536] = [0; 65536];
