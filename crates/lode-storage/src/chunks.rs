//! Chunk access on a blob in its remote form: the table, and verified uncompressed chunks.

use std::io;
use std::sync::Mutex;

use lode_format::blob::{
    BlobTrailer, ChunkEntry, ChunkTable, Compression, BLOB_BLOCK_SIZE, BLOB_TRAILER_SIZE,
    CHUNK_FLAG_RAW,
};
use lode_format::manifest::DataBlob;
use lode_format::reader::ReadAt;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("blob {blob}: {source}")]
    Io { blob: String, source: io::Error },
    #[error("blob {blob}: {source}")]
    Format {
        blob: String,
        source: lode_format::blob::BlobFormatError,
    },
    #[error("blob {blob}: chunk at block {blkaddr}: {what}")]
    Chunk {
        blob: String,
        blkaddr: u32,
        what: String,
    },
}

impl From<ChunkError> for io::Error {
    fn from(e: ChunkError) -> io::Error {
        io::Error::other(e)
    }
}

/// Reads the chunk table of a remote-form blob of `size` bytes.
pub fn read_table(src: &dyn ReadAt, blob: &DataBlob) -> Result<ChunkTable, ChunkError> {
    let len = blob
        .size
        .checked_sub(blob.table_offset)
        .filter(|&l| l >= BLOB_TRAILER_SIZE as u64 && l <= (1 << 32))
        .ok_or_else(|| ChunkError::Chunk {
            blob: blob.digest.clone(),
            blkaddr: 0,
            what: format!(
                "table offset {} does not fit a blob of {} bytes",
                blob.table_offset, blob.size
            ),
        })?;
    let mut bytes = vec![0u8; len as usize];
    src.read_exact_at(&mut bytes, blob.table_offset)
        .map_err(|source| ChunkError::Io {
            blob: blob.digest.clone(),
            source,
        })?;
    parse_table(blob, &bytes)
}

/// Parses and checks a blob's chunk table followed by its trailer (the last
/// `size - table_offset` bytes of the remote form) against the image manifest: the table's
/// digest, its trailer, its size and chunk count must all match.
pub fn parse_table(blob: &DataBlob, bytes: &[u8]) -> Result<ChunkTable, ChunkError> {
    let bad = |what: String| ChunkError::Chunk {
        blob: blob.digest.clone(),
        blkaddr: 0,
        what,
    };
    if bytes.len() < BLOB_TRAILER_SIZE {
        return Err(bad("chunk table too short".into()));
    }
    let (table, trailer) = bytes.split_at(bytes.len() - BLOB_TRAILER_SIZE);
    blob.verify_table(table).map_err(bad)?;
    let fmt = |source| ChunkError::Format {
        blob: blob.digest.clone(),
        source,
    };
    let trailer = BlobTrailer::parse(trailer, blob.size).map_err(fmt)?;
    let t = ChunkTable::parse(&trailer, table).map_err(fmt)?;
    if t.uncompressed_size != blob.uncompressed_size || t.entries.len() as u64 != blob.chunk_count {
        return Err(bad(format!(
            "chunk table ({} chunks, {} bytes) does not match the image manifest ({} chunks, {} bytes)",
            t.entries.len(),
            t.uncompressed_size,
            blob.chunk_count,
            blob.uncompressed_size
        )));
    }
    Ok(t)
}

/// Turns a chunk's payload into its verified uncompressed bytes.
pub fn decode_chunk(
    blob: &str,
    compression: Compression,
    entry: &ChunkEntry,
    payload: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let blkaddr = entry.blkaddr.get();
    let bad = |what: String| ChunkError::Chunk {
        blob: blob.to_string(),
        blkaddr,
        what,
    };
    let len = entry.uncompressed_len.get() as usize;
    let data = if entry.flags.get() & CHUNK_FLAG_RAW != 0 {
        payload.to_vec()
    } else {
        match compression {
            Compression::None => payload.to_vec(),
            Compression::Zstd => {
                zstd::bulk::decompress(payload, len).map_err(|e| bad(format!("zstd: {e}")))?
            }
            Compression::Lz4 => {
                lz4_flex::block::decompress(payload, len).map_err(|e| bad(format!("lz4: {e}")))?
            }
        }
    };
    if data.len() != len {
        return Err(bad(format!(
            "{} bytes after decompression, expected {len}",
            data.len()
        )));
    }
    if blake3::hash(&data).as_bytes() != &entry.digest {
        return Err(bad("digest mismatch: the data is corrupt".into()));
    }
    Ok(data)
}

/// The uncompressed layout of a remote-form blob, read on demand (decompressing and
/// verifying whole chunks) — what the reader uses for `lode cat/unpack` on a local image.
pub struct UncompressedView<R> {
    src: R,
    blob: DataBlob,
    table: ChunkTable,
    /// The last chunk decoded: sequential reads decode each chunk once.
    last: Mutex<Option<(usize, std::sync::Arc<Vec<u8>>)>>,
}

impl<R: ReadAt> UncompressedView<R> {
    pub fn open(src: R, blob: DataBlob) -> Result<Self, ChunkError> {
        let table = read_table(&src, &blob)?;
        Ok(UncompressedView {
            src,
            blob,
            table,
            last: Mutex::new(None),
        })
    }

    pub fn table(&self) -> &ChunkTable {
        &self.table
    }

    /// Verified bytes of entry `i`.
    pub fn chunk(&self, i: usize) -> Result<std::sync::Arc<Vec<u8>>, ChunkError> {
        if let Some((j, data)) = &*self.last.lock().expect("lock") {
            if *j == i {
                return Ok(data.clone());
            }
        }
        let e = &self.table.entries[i];
        let mut payload = vec![0u8; e.compressed_len.get() as usize];
        self.src
            .read_exact_at(&mut payload, e.compressed_offset.get())
            .map_err(|source| ChunkError::Io {
                blob: self.blob.digest.clone(),
                source,
            })?;
        let data = std::sync::Arc::new(decode_chunk(
            &self.blob.digest,
            self.table.compression,
            e,
            &payload,
        )?);
        *self.last.lock().expect("lock") = Some((i, data.clone()));
        Ok(data)
    }
}

impl<R: ReadAt> ReadAt for UncompressedView<R> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.table.uncompressed_size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "blob {}: read past the end of the uncompressed layout",
                        self.blob.digest
                    ),
                )
            })?;
        let mut pos = offset;
        while pos < end {
            let out = &mut buf[(pos - offset) as usize..];
            match self.table.find(pos) {
                Some(i) => {
                    let e = self.table.entries[i];
                    let start = e.blkaddr.get() as u64 * BLOB_BLOCK_SIZE;
                    let block_end =
                        start + (e.uncompressed_len.get() as u64).next_multiple_of(BLOB_BLOCK_SIZE);
                    let n = (block_end.min(end) - pos) as usize;
                    let data = self.chunk(i)?;
                    let within = (pos - start) as usize;
                    for (k, b) in out[..n].iter_mut().enumerate() {
                        *b = data.get(within + k).copied().unwrap_or(0);
                    }
                    pos += n as u64;
                }
                None => {
                    // Not in any chunk: blocks no chunk uses read as zeros.
                    let next = self
                        .table
                        .entries
                        .iter()
                        .map(|e| e.blkaddr.get() as u64 * BLOB_BLOCK_SIZE)
                        .find(|&s| s > pos)
                        .unwrap_or(end)
                        .min(end);
                    out[..(next - pos) as usize].fill(0);
                    pos = next;
                }
            }
        }
        Ok(())
    }
}
