//! The remote form of a data blob: its chunks (compressed one by one, or not) followed by a
//! chunk table and a fixed-size trailer.
//!
//! ```text
//! [chunk payloads][chunk table: count × ChunkEntry][BlobTrailer (64 bytes)]
//! ```
//!
//! The kernel always reads the *uncompressed layout*: chunk `i` at block `blkaddr` of a file of
//! `uncompressed_size` bytes. Without compression the payloads are stored exactly there
//! (block-aligned, zero-padded), so the blob's first `uncompressed_size` bytes *are* the
//! uncompressed layout and the file can be handed to the kernel as is. With compression the
//! payloads are packed back to back and the table says where each one is; a fetcher turns a
//! miss on an uncompressed range into a Range request for the covering payloads, decompresses
//! them and checks each chunk's blake3 digest before the bytes become visible.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const BLOB_MAGIC: [u8; 8] = *b"LODEBLOB";
pub const BLOB_VERSION: u32 = 1;
pub const CHUNK_ENTRY_SIZE: usize = 56;
pub const BLOB_TRAILER_SIZE: usize = 64;
/// Block size of the uncompressed layout (lode images always use 4 KiB blocks).
pub const BLOB_BLOCK_SIZE: u64 = 4096;

/// How chunk payloads are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    #[default]
    Zstd,
    Lz4,
}

impl Compression {
    pub fn raw(self) -> u32 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }
    pub fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            0 => Compression::None,
            1 => Compression::Zstd,
            2 => Compression::Lz4,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            _ => Err(format!("unknown compression {s:?} (zstd, lz4 or none)")),
        }
    }
}

/// Chunk flag: the payload is the raw bytes (compression did not make it smaller).
pub const CHUNK_FLAG_RAW: u32 = 1;

/// One chunk of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ChunkEntry {
    /// First block of the chunk in the uncompressed layout.
    pub blkaddr: U32,
    /// Length of the chunk's data (the rest of its last block is zero).
    pub uncompressed_len: U32,
    /// Where the payload starts in the remote blob.
    pub compressed_offset: U64,
    pub compressed_len: U32,
    pub flags: U32,
    /// blake3 of the uncompressed bytes.
    pub digest: [u8; 32],
}

/// The last 64 bytes of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BlobTrailer {
    pub magic: [u8; 8],
    pub version: U32,
    pub compression: U32,
    pub chunk_count: U64,
    pub table_offset: U64,
    /// Size of the uncompressed layout (a whole number of blocks).
    pub uncompressed_size: U64,
    /// First 24 bytes of the blake3 of the chunk table.
    pub table_digest: [u8; 24],
}

const _: () = {
    assert!(size_of::<ChunkEntry>() == CHUNK_ENTRY_SIZE);
    assert!(size_of::<BlobTrailer>() == BLOB_TRAILER_SIZE);
};

/// Why a chunk table or trailer was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BlobFormatError {
    #[error("not a lode blob (bad trailer magic)")]
    Magic,
    #[error("lode blob version {0} is not supported")]
    Version(u32),
    #[error("unknown compression {0}")]
    Compression(u32),
    #[error("chunk table: {0}")]
    Table(String),
}

/// A parsed, validated chunk table.
#[derive(Debug, Clone)]
pub struct ChunkTable {
    pub compression: Compression,
    pub uncompressed_size: u64,
    /// Sorted by `blkaddr`, non-overlapping.
    pub entries: Vec<ChunkEntry>,
}

impl BlobTrailer {
    /// Parses the last [`BLOB_TRAILER_SIZE`] bytes of a blob of `blob_size` bytes.
    pub fn parse(bytes: &[u8], blob_size: u64) -> Result<BlobTrailer, BlobFormatError> {
        let t = BlobTrailer::read_from_bytes(bytes)
            .map_err(|_| BlobFormatError::Table("trailer is not 64 bytes".into()))?;
        if t.magic != BLOB_MAGIC {
            return Err(BlobFormatError::Magic);
        }
        if t.version.get() != BLOB_VERSION {
            return Err(BlobFormatError::Version(t.version.get()));
        }
        Compression::from_raw(t.compression.get())
            .ok_or(BlobFormatError::Compression(t.compression.get()))?;
        let table_len = t
            .chunk_count
            .get()
            .checked_mul(CHUNK_ENTRY_SIZE as u64)
            .ok_or_else(|| BlobFormatError::Table("chunk count overflows".into()))?;
        let end = t
            .table_offset
            .get()
            .checked_add(table_len)
            .and_then(|e| e.checked_add(BLOB_TRAILER_SIZE as u64));
        if end != Some(blob_size) {
            return Err(BlobFormatError::Table(format!(
                "table at {} with {} entries does not end where the trailer starts (blob is {blob_size} bytes)",
                t.table_offset.get(),
                t.chunk_count.get()
            )));
        }
        Ok(t)
    }

    /// Byte length of the chunk table.
    pub fn table_len(&self) -> u64 {
        self.chunk_count.get() * CHUNK_ENTRY_SIZE as u64
    }
}

impl ChunkTable {
    /// Parses and checks the table bytes against their trailer.
    pub fn parse(trailer: &BlobTrailer, table: &[u8]) -> Result<ChunkTable, BlobFormatError> {
        let bad = |m: String| BlobFormatError::Table(m);
        if table.len() as u64 != trailer.table_len() {
            return Err(bad(format!(
                "{} bytes, expected {}",
                table.len(),
                trailer.table_len()
            )));
        }
        if blake3::hash(table).as_bytes()[..24] != trailer.table_digest {
            return Err(bad("digest mismatch".into()));
        }
        let compression = Compression::from_raw(trailer.compression.get())
            .ok_or(BlobFormatError::Compression(trailer.compression.get()))?;
        let uncompressed_size = trailer.uncompressed_size.get();
        let entries: Vec<ChunkEntry> = table
            .chunks_exact(CHUNK_ENTRY_SIZE)
            .map(|b| ChunkEntry::read_from_bytes(b).expect("exact size"))
            .collect();
        let mut next_free = 0u64;
        for (i, e) in entries.iter().enumerate() {
            let start = e.blkaddr.get() as u64 * BLOB_BLOCK_SIZE;
            let len = e.uncompressed_len.get() as u64;
            if start < next_free || len == 0 || start + len > uncompressed_size {
                return Err(bad(format!(
                    "entry {i} (block {}) overlaps or is out of range",
                    e.blkaddr.get()
                )));
            }
            let cend = e
                .compressed_offset
                .get()
                .checked_add(e.compressed_len.get() as u64);
            if cend.is_none_or(|c| c > trailer.table_offset.get()) {
                return Err(bad(format!("entry {i} payload runs past the table")));
            }
            next_free = start + len;
        }
        Ok(ChunkTable {
            compression,
            uncompressed_size,
            entries,
        })
    }

    /// Index of the entry holding uncompressed byte `offset`, if any (else it is padding/hole).
    pub fn find(&self, offset: u64) -> Option<usize> {
        let block_size = BLOB_BLOCK_SIZE;
        let blk = offset / block_size;
        let i = self
            .entries
            .partition_point(|e| (e.blkaddr.get() as u64) <= blk)
            .checked_sub(1)?;
        let e = &self.entries[i];
        let start = e.blkaddr.get() as u64 * block_size;
        let end = start + (e.uncompressed_len.get() as u64).next_multiple_of(block_size);
        (offset < end).then_some(i)
    }
}

/// Builds a table + trailer for entries written so far (used by the builder).
pub fn encode_table(
    entries: &[ChunkEntry],
    compression: Compression,
    table_offset: u64,
    uncompressed_size: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * CHUNK_ENTRY_SIZE + BLOB_TRAILER_SIZE);
    for e in entries {
        out.extend_from_slice(e.as_bytes());
    }
    let mut table_digest = [0u8; 24];
    table_digest.copy_from_slice(&blake3::hash(&out).as_bytes()[..24]);
    let trailer = BlobTrailer {
        magic: BLOB_MAGIC,
        version: BLOB_VERSION.into(),
        compression: compression.raw().into(),
        chunk_count: (entries.len() as u64).into(),
        table_offset: table_offset.into(),
        uncompressed_size: uncompressed_size.into(),
        table_digest,
    };
    out.extend_from_slice(trailer.as_bytes());
    out
}
