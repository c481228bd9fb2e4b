//! EROFS on-disk structures and constants, as plain little-endian types.
//!
//! Every struct here is `#[repr(C)]` over unaligned little-endian integers, so it can be
//! read from and written to any byte slice with zerocopy, without unsafe casts. Field names
//! follow the Linux `fs/erofs/erofs_fs.h` header (6.12); see shared/spec/erofs-format.md.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Byte offset of the superblock in the primary device.
pub const SUPER_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Block address meaning "no block" (a hole in chunk maps).
pub const NULL_ADDR: u32 = 0xFFFF_FFFF;
/// Size of one nid slot: inode addresses are `meta_blkaddr * bs + nid * 32`.
pub const ISLOT_SIZE: u64 = 32;
/// Size of one device-table slot; `devt_slotoff` counts these.
pub const DEVT_SLOT_SIZE: u64 = 128;

/// `feature_compat` bits.
pub mod compat {
    pub const SB_CHKSUM: u32 = 0x1;
    pub const MTIME: u32 = 0x2;
    pub const XATTR_FILTER: u32 = 0x4;
}

/// `feature_incompat` bits. 6.12 accepts exactly the bits in [`incompat::KNOWN_6_12`].
pub mod incompat {
    pub const ZERO_PADDING: u32 = 0x01;
    pub const COMPR_CFGS: u32 = 0x02;
    pub const CHUNKED_FILE: u32 = 0x04;
    pub const DEVICE_TABLE: u32 = 0x08;
    pub const ZTAILPACKING: u32 = 0x10;
    pub const FRAGMENTS: u32 = 0x20;
    pub const XATTR_PREFIXES: u32 = 0x40;
    pub const KNOWN_6_12: u32 = 0x7F;
}

/// The data layout stored in bits 1..=3 of `i_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataLayout {
    FlatPlain,
    CompressedFull,
    FlatInline,
    CompressedCompact,
    ChunkBased,
}

impl DataLayout {
    pub fn from_raw(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::FlatPlain,
            1 => Self::CompressedFull,
            2 => Self::FlatInline,
            3 => Self::CompressedCompact,
            4 => Self::ChunkBased,
            _ => return None,
        })
    }
    pub fn raw(self) -> u16 {
        match self {
            Self::FlatPlain => 0,
            Self::CompressedFull => 1,
            Self::FlatInline => 2,
            Self::CompressedCompact => 3,
            Self::ChunkBased => 4,
        }
    }
}

/// `i_format` bit 0: extended (64-byte) inode.
pub const I_VERSION_EXTENDED: u16 = 1;
/// Highest `i_format` value 6.12 accepts.
pub const I_FORMAT_ALL: u16 = 0xF;

/// Chunk format (`i_u` of a CHUNK_BASED inode): bits 0..=4 are `chunkbits - blkszbits`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1F;
/// Chunk format bit: 8-byte chunk indexes instead of a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;

/// The superblock, 128 bytes at [`SUPER_OFFSET`].
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SuperBlock {
    pub magic: U32,
    pub checksum: U32,
    pub feature_compat: U32,
    pub blkszbits: u8,
    pub sb_extslots: u8,
    pub root_nid: U16,
    pub inos: U64,
    pub build_time: U64,
    pub build_time_nsec: U32,
    pub blocks: U32,
    pub meta_blkaddr: U32,
    pub xattr_blkaddr: U32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: U32,
    /// `available_compr_algs` or `lz4_max_distance`; 0 for uncompressed images.
    pub u1: U16,
    pub extra_devices: U16,
    pub devt_slotoff: U16,
    pub dirblkbits: u8,
    pub xattr_prefix_count: u8,
    pub xattr_prefix_start: U32,
    pub packed_nid: U64,
    pub xattr_filter_reserved: u8,
    pub reserved2: [u8; 23],
}

/// The 32-byte compact inode.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct InodeCompact {
    pub format: U16,
    pub xattr_icount: U16,
    pub mode: U16,
    pub nlink: U16,
    pub size: U32,
    /// Written 0: 6.12 ignores it, 6.15+ adds it to the superblock epoch.
    pub mtime_delta: U32,
    pub u: U32,
    pub ino: U32,
    pub uid: U16,
    pub gid: U16,
    pub reserved2: U32,
}

/// The 64-byte extended inode.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct InodeExtended {
    pub format: U16,
    pub xattr_icount: U16,
    pub mode: U16,
    pub reserved: U16,
    pub size: U64,
    pub u: U32,
    pub ino: U32,
    pub uid: U32,
    pub gid: U32,
    pub mtime: U64,
    pub mtime_nsec: U32,
    pub nlink: U32,
    pub reserved2: [u8; 16],
}

/// An 8-byte chunk index entry (chunk format bit [`CHUNK_FORMAT_INDEXES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ChunkIndex {
    pub advise: U16,
    pub device_id: U16,
    pub blkaddr: U32,
}

/// One 128-byte slot of the device table.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DeviceSlot {
    pub tag: [u8; 64],
    pub blocks: U32,
    pub mapped_blkaddr: U32,
    pub reserved: [u8; 56],
}

/// A 12-byte directory entry; names follow the entry array in the same block.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Dirent {
    pub nid: U64,
    pub nameoff: U16,
    pub file_type: u8,
    pub reserved: u8,
}

/// The 12-byte header of an inode's inline xattr area.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrIbodyHeader {
    pub name_filter: U32,
    pub shared_count: u8,
    pub reserved: [u8; 7],
}

/// The 4-byte header of one xattr entry; name and value bytes follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrEntry {
    pub name_len: u8,
    pub name_index: u8,
    pub value_size: U16,
}

pub const SUPERBLOCK_SIZE: usize = 128;
pub const INODE_COMPACT_SIZE: usize = 32;
pub const INODE_EXTENDED_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
pub const XATTR_ENTRY_SIZE: usize = 4;

const _: () = {
    assert!(size_of::<SuperBlock>() == SUPERBLOCK_SIZE);
    assert!(size_of::<InodeCompact>() == INODE_COMPACT_SIZE);
    assert!(size_of::<InodeExtended>() == INODE_EXTENDED_SIZE);
    assert!(size_of::<ChunkIndex>() == 8);
    assert!(size_of::<DeviceSlot>() == 128);
    assert!(size_of::<Dirent>() == DIRENT_SIZE);
    assert!(size_of::<XattrIbodyHeader>() == XATTR_IBODY_HEADER_SIZE);
    assert!(size_of::<XattrEntry>() == XATTR_ENTRY_SIZE);
};

/// Directory entry file types (`EROFS_FT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    Unknown,
    Regular,
    Directory,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    Symlink,
}

impl FileType {
    pub fn raw(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Regular => 1,
            Self::Directory => 2,
            Self::CharDevice => 3,
            Self::BlockDevice => 4,
            Self::Fifo => 5,
            Self::Socket => 6,
            Self::Symlink => 7,
        }
    }
    pub fn from_raw(v: u8) -> Self {
        match v {
            1 => Self::Regular,
            2 => Self::Directory,
            3 => Self::CharDevice,
            4 => Self::BlockDevice,
            5 => Self::Fifo,
            6 => Self::Socket,
            7 => Self::Symlink,
            _ => Self::Unknown,
        }
    }
    /// The type encoded in the `S_IFMT` bits of a mode, if it is one EROFS can hold.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & S_IFMT {
            S_IFREG => Self::Regular,
            S_IFDIR => Self::Directory,
            S_IFCHR => Self::CharDevice,
            S_IFBLK => Self::BlockDevice,
            S_IFIFO => Self::Fifo,
            S_IFSOCK => Self::Socket,
            S_IFLNK => Self::Symlink,
            _ => return None,
        })
    }
}

pub const S_IFMT: u32 = 0o170000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;

/// Xattr name indexes (`e_name_index`) and the prefixes they stand for.
pub mod xattr_index {
    pub const USER: u8 = 1;
    pub const POSIX_ACL_ACCESS: u8 = 2;
    pub const POSIX_ACL_DEFAULT: u8 = 3;
    pub const TRUSTED: u8 = 4;
    pub const LUSTRE: u8 = 5;
    pub const SECURITY: u8 = 6;
    /// Bit marking a long-prefix index (`0x80 | k`).
    pub const LONG_PREFIX: u8 = 0x80;
}

/// The short prefixes EROFS can encode, longest match first within a namespace.
pub const XATTR_PREFIXES: &[(u8, &[u8])] = &[
    (xattr_index::USER, b"user."),
    (xattr_index::POSIX_ACL_ACCESS, b"system.posix_acl_access"),
    (xattr_index::POSIX_ACL_DEFAULT, b"system.posix_acl_default"),
    (xattr_index::TRUSTED, b"trusted."),
    (xattr_index::SECURITY, b"security."),
];

/// Splits a full xattr name into its EROFS name index and the stored suffix.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for &(index, prefix) in XATTR_PREFIXES {
        if let Some(rest) = name.strip_prefix(prefix) {
            let is_acl = matches!(
                index,
                xattr_index::POSIX_ACL_ACCESS | xattr_index::POSIX_ACL_DEFAULT
            );
            if is_acl && !rest.is_empty() {
                continue;
            }
            if !is_acl && rest.is_empty() {
                return None;
            }
            return Some((index, rest));
        }
    }
    None
}

/// The prefix an xattr name index stands for, if it is a short one.
pub fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    XATTR_PREFIXES
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, p)| *p)
}

/// Seed of the xattr name bloom filter hash; the handler index is added to it.
pub const XATTR_FILTER_SEED: u32 = 0x25BB_E08F;

/// The bloom filter bit of one xattr (index + stored suffix) in `h_name_filter`.
pub fn xattr_filter_bit(index: u8, suffix: &[u8]) -> u32 {
    xxhash_rust::xxh32::xxh32(suffix, XATTR_FILTER_SEED.wrapping_add(index as u32)) & 31
}

/// Size of the inline xattr area for a given `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + 4 * (icount as usize - 1)
    }
}

/// Size an xattr entry occupies on disk (header, name, value, padded to 4).
pub fn xattr_entry_size(name_len: usize, value_len: usize) -> usize {
    (XATTR_ENTRY_SIZE + name_len + value_len).next_multiple_of(4)
}

/// Encodes a device number in the Linux "new" 32-bit form that `i_u.rdev` holds.
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Decodes `i_u.rdev` into (major, minor).
pub fn decode_rdev(rdev: u32) -> (u32, u32) {
    (
        (rdev & 0xfff00) >> 8,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

/// The superblock checksum over `block0[1024..end]` with the checksum field zeroed:
/// CRC-32C with initial state !0 and no final xor (the complement of the standard value).
pub fn superblock_checksum(region: &[u8]) -> u32 {
    let mut copy = region.to_vec();
    copy[4..8].fill(0);
    !crc32c::crc32c(&copy)
}

/// Length of the region [`superblock_checksum`] covers for a block size.
pub fn checksum_region_len(block_size: u32) -> usize {
    if block_size > SUPER_OFFSET as u32 {
        (block_size - SUPER_OFFSET as u32) as usize
    } else {
        block_size as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_round_trip() {
        assert_eq!(encode_rdev(1, 3), 0x103);
        for (ma, mi) in [(0, 0), (1, 3), (259, 65536), (4095, 0xfffff)] {
            assert_eq!(decode_rdev(encode_rdev(ma, mi)), (ma, mi));
        }
    }

    #[test]
    fn xattr_names_split() {
        assert_eq!(split_xattr_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(
            split_xattr_name(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(split_xattr_name(b"system.posix_acl_accessx"), None);
        assert_eq!(split_xattr_name(b"system.other"), None);
        assert_eq!(split_xattr_name(b"user."), None);
        assert_eq!(
            split_xattr_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
    }

    #[test]
    fn checksum_matches_standard_crc_complement() {
        // The check value of standard CRC-32C for "123456789" is 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
