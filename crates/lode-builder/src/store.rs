//! The chunk store: deduplicates chunks by content and appends new ones to the current blob.
//!
//! Each blob is written in its remote form (see [`lode_format::blob`]): payloads, then the
//! chunk table and trailer. A build may write several blobs (one per OCI layer); a chunk
//! already stored in any of them, or in a chunk dictionary, is referenced, not stored again.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lode_format::blob::{encode_table, ChunkEntry, Compression, CHUNK_FLAG_RAW};
use lode_format::manifest::DataBlob;
use lode_format::tree::ChunkAddr;
use sha2::{Digest, Sha256};

/// Identity of a chunk's content (blake3 of its bytes).
pub type ChunkDigest = [u8; 32];

/// zstd level for blob payloads: fast to build, and most of the size win.
pub const ZSTD_LEVEL: i32 = 3;

/// A chunk hashed (and compressed) off the storing thread.
pub struct PreparedChunk {
    pub digest: ChunkDigest,
    /// The compressed payload, or `None` to store the raw bytes.
    pub payload: Option<Vec<u8>>,
}

/// Per-thread compression state (zstd contexts are worth reusing).
pub struct Compressor {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(compression: Compression) -> Result<Self> {
        let zstd = match compression {
            Compression::Zstd => {
                Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).context("creating a zstd context")?)
            }
            _ => None,
        };
        Ok(Compressor { compression, zstd })
    }

    /// Hashes `data` and compresses it if that makes it smaller.
    pub fn prepare(&mut self, data: &[u8]) -> Result<PreparedChunk> {
        let digest = *blake3::hash(data).as_bytes();
        let payload = match self.compression {
            Compression::None => None,
            Compression::Zstd => Some(
                self.zstd
                    .as_mut()
                    .expect("zstd context")
                    .compress(data)
                    .context("zstd compression")?,
            ),
            Compression::Lz4 => Some(lz4_flex::block::compress(data)),
        };
        Ok(PreparedChunk {
            digest,
            payload: payload.filter(|p| p.len() < data.len()),
        })
    }
}

/// The blob being written.
struct BlobWriter {
    device: u16,
    tmp: tempfile::NamedTempFile<BufWriter<File>>,
    sha: Sha256,
    /// Bytes of the remote form written so far.
    written: u64,
    /// Blocks of the uncompressed layout so far.
    blocks: u64,
    entries: Vec<ChunkEntry>,
}

impl BlobWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.tmp
            .as_file_mut()
            .write_all(bytes)
            .context("writing blob")?;
        self.sha.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub chunks: u64,
    pub unique_chunks: u64,
    /// Uncompressed bytes of the unique chunks.
    pub stored_bytes: u64,
    /// Bytes of payloads written (after compression).
    pub payload_bytes: u64,
    pub deduplicated_bytes: u64,
}

pub struct ChunkStore {
    dir: PathBuf,
    block_size: u64,
    compression: Compression,
    known: HashMap<ChunkDigest, ChunkAddr>,
    current: Option<BlobWriter>,
    /// The prefetch blob: chunks of the files an access trace names, kept together so a mount
    /// fetches them with a few large requests instead of one per file. Open for the whole build.
    hot: Option<BlobWriter>,
    /// Blobs this store wrote, in the order they were finished, with their device ids.
    blobs: Vec<DataBlob>,
    devices: Vec<u16>,
    /// Blobs started so far (device ids are handed out in that order, after the dictionary's).
    started: usize,
    /// Device ids taken by blobs of a chunk dictionary (they come first in the table).
    dict_blobs: Vec<DataBlob>,
    pub stats: StoreStats,
}

impl ChunkStore {
    /// A store writing blobs into `dir`.
    pub fn new(dir: &Path, block_size: u32, compression: Compression) -> Self {
        ChunkStore {
            dir: dir.to_path_buf(),
            block_size: block_size as u64,
            compression,
            known: HashMap::new(),
            current: None,
            hot: None,
            blobs: Vec::new(),
            devices: Vec::new(),
            started: 0,
            dict_blobs: Vec::new(),
            stats: StoreStats::default(),
        }
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Makes the chunks of an existing blob (of a chunk dictionary or an earlier image)
    /// available for deduplication. Must be called before anything is stored.
    pub fn add_known_blob(
        &mut self,
        blob: DataBlob,
        chunks: impl IntoIterator<Item = (ChunkDigest, u32)>,
    ) {
        assert!(self.started == 0);
        self.dict_blobs.push(blob);
        let device = self.dict_blobs.len() as u16;
        for (digest, blkaddr) in chunks {
            self.known
                .entry(digest)
                .or_insert(ChunkAddr { device, blkaddr });
        }
    }

    /// Stores one chunk (unless the same bytes are stored already) and returns its address.
    pub fn put(&mut self, prepared: &PreparedChunk, data: &[u8]) -> Result<ChunkAddr> {
        self.put_in(prepared, data, false)
    }

    /// Stores one chunk of a file an access trace names: into the prefetch blob.
    pub fn put_hot(&mut self, prepared: &PreparedChunk, data: &[u8]) -> Result<ChunkAddr> {
        self.put_in(prepared, data, true)
    }

    fn put_in(&mut self, prepared: &PreparedChunk, data: &[u8], hot: bool) -> Result<ChunkAddr> {
        self.stats.chunks += 1;
        if let Some(&addr) = self.known.get(&prepared.digest) {
            self.stats.deduplicated_bytes += data.len() as u64;
            return Ok(addr);
        }
        if self.writer(hot).is_none() {
            let w = self.new_blob()?;
            *self.writer(hot) = Some(w);
        }
        let bs = self.block_size;
        let compression = self.compression;
        let w = self.writer(hot).as_mut().expect("open blob");
        let blkaddr = u32::try_from(w.blocks).context("blob exceeds 2^32 blocks")?;
        let padded = (data.len() as u64).next_multiple_of(bs);
        let (offset, len, flags) = match (&prepared.payload, compression) {
            (_, Compression::None) => {
                // The remote form is the uncompressed layout: pad to the block.
                let offset = w.written;
                w.write(data)?;
                w.write(&ZEROS[..(padded - data.len() as u64) as usize])?;
                (offset, data.len(), CHUNK_FLAG_RAW)
            }
            (Some(payload), _) => {
                let offset = w.written;
                w.write(payload)?;
                (offset, payload.len(), 0)
            }
            (None, _) => {
                let offset = w.written;
                w.write(data)?;
                (offset, data.len(), CHUNK_FLAG_RAW)
            }
        };
        w.blocks += padded / bs;
        w.entries.push(ChunkEntry {
            blkaddr: blkaddr.into(),
            uncompressed_len: (data.len() as u32).into(),
            compressed_offset: offset.into(),
            compressed_len: (len as u32).into(),
            flags: flags.into(),
            digest: prepared.digest,
        });
        let addr = ChunkAddr {
            device: w.device,
            blkaddr,
        };
        self.known.insert(prepared.digest, addr);
        self.stats.unique_chunks += 1;
        self.stats.stored_bytes += data.len() as u64;
        self.stats.payload_bytes += len as u64;
        Ok(addr)
    }

    /// The blob new chunks go to: the prefetch blob for traced files, else the current one.
    fn writer(&mut self, hot: bool) -> &mut Option<BlobWriter> {
        if hot {
            &mut self.hot
        } else {
            &mut self.current
        }
    }

    fn new_blob(&mut self) -> Result<BlobWriter> {
        let tmp = tempfile::Builder::new()
            .prefix(".blob-")
            .make_in(&self.dir, |p| {
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .map(|f| BufWriter::with_capacity(1 << 20, f))
            })
            .with_context(|| format!("creating a blob in {}", self.dir.display()))?;
        let device = u16::try_from(self.dict_blobs.len() + self.started + 1)
            .ok()
            .filter(|&d| d < u16::MAX)
            .context("too many blobs for one image")?;
        self.started += 1;
        Ok(BlobWriter {
            device,
            tmp,
            sha: Sha256::new(),
            written: 0,
            blocks: 0,
            entries: Vec::new(),
        })
    }

    /// Closes the current blob (if any chunk went into it); the next chunk starts a new one.
    /// The prefetch blob stays open until [`ChunkStore::finish`].
    pub fn finish_blob(&mut self) -> Result<()> {
        match self.current.take() {
            Some(w) => self.close(w),
            None => Ok(()),
        }
    }

    fn close(&mut self, mut w: BlobWriter) -> Result<()> {
        let table_offset = w.written;
        let uncompressed_size = w.blocks * self.block_size;
        let table = encode_table(
            &w.entries,
            self.compression,
            table_offset,
            uncompressed_size,
        );
        w.write(&table)?;
        let table_digest = format!(
            "blake3:{}",
            blake3::hash(&table[..table.len() - lode_format::blob::BLOB_TRAILER_SIZE]).to_hex()
        );
        let hex = hex::encode(w.sha.finalize());
        let path = self.dir.join(&hex);
        let (writer, tmp_path) = w.tmp.into_parts();
        writer.into_inner().context("flushing blob")?;
        std::fs::set_permissions(
            &tmp_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .with_context(|| format!("writing blob {}", path.display()))?;
        tmp_path
            .persist(&path)
            .with_context(|| format!("naming blob {}", path.display()))?;
        self.blobs.push(DataBlob {
            digest: format!("sha256:{hex}"),
            size: w.written,
            uncompressed_size,
            compression: self.compression,
            table_offset,
            chunk_count: w.entries.len() as u64,
            table_digest,
        });
        self.devices.push(w.device);
        Ok(())
    }

    /// The blobs this store has finished so far (not those of a chunk dictionary), in the
    /// order they were finished.
    pub fn finished_blobs(&self) -> &[DataBlob] {
        &self.blobs
    }

    /// Finishes the last blob and the prefetch blob and returns every blob of the image in
    /// device order (chunk-dictionary blobs first).
    pub fn finish(mut self) -> Result<Vec<DataBlob>> {
        self.finish_blob()?;
        if let Some(w) = self.hot.take() {
            self.close(w)?;
        }
        let mut mine: Vec<(u16, DataBlob)> = self.devices.into_iter().zip(self.blobs).collect();
        mine.sort_by_key(|(d, _)| *d);
        let mut all = self.dict_blobs;
        all.extend(mine.into_iter().map(|(_, b)| b));
        Ok(all)
    }
}

/// Padding source (block sizes are at most 4 KiB).
static ZEROS: [u8; 4096] = [0; 4096];

/// Path of blob `hex` in an image directory's blobs dir.
pub fn blob_path(blobs_dir: &Path, blob: &DataBlob) -> PathBuf {
    blobs_dir.join(blob.hex())
}
