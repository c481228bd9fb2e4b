//! A reader for uncompressed EROFS images, following the Linux 6.12 semantics described in
//! shared/spec/erofs-format.md.
//!
//! [`Image`] reads the primary device (the bootstrap / image file) and, optionally, the extra
//! devices listed in its device table. It parses the superblock, inodes, directories, xattrs
//! and the three uncompressed data layouts (FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED with block
//! maps or chunk indexes). Compressed inodes can be listed and their metadata read, but
//! reading their data returns [`Error::Unsupported`].
//!
//! Everything read from disk is treated as untrusted: arithmetic is checked, sizes are
//! validated before allocating, and every loop is bounded by the data it consumes, so a
//! corrupt image yields an error, never a panic or a hang.

use std::cmp::Ordering;
use std::io;
use std::sync::Arc;

use serde::Serialize;
use zerocopy::FromBytes;

pub use crate::error::{Error, Result};
use crate::format::{
    checksum_region_len, compat, decode_rdev, incompat, superblock_checksum, xattr_entry_size,
    xattr_ibody_size, xattr_index, xattr_prefix, ChunkIndex, DataLayout, DeviceSlot, Dirent,
    FileType, InodeCompact, InodeExtended, SuperBlock, XattrEntry, XattrIbodyHeader,
    CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, DEVT_SLOT_SIZE, DIRENT_SIZE,
    INODE_COMPACT_SIZE, INODE_EXTENDED_SIZE, ISLOT_SIZE, I_FORMAT_ALL, I_VERSION_EXTENDED,
    NULL_ADDR, SUPERBLOCK_SIZE, SUPER_MAGIC, SUPER_OFFSET, S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK,
    S_IFMT, S_IFREG, XATTR_ENTRY_SIZE, XATTR_IBODY_HEADER_SIZE,
};

/// Longest symlink target Linux can return (PATH_MAX - 1); longer ones are treated as corrupt.
pub const MAX_SYMLINK_LEN: u64 = 4095;
/// Longest directory entry name.
pub const MAX_NAME_LEN: usize = 255;
/// Chunk format bits 6.12 knows (blkbits mask and INDEXES).
const CHUNK_FORMAT_ALL: u16 = CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES;
/// 6.12 limits `sb_extslots` so the superblock stays within the first page.
const MAX_SB_SIZE: u64 = 4096 - SUPER_OFFSET;

/// Positional reads from a backing store (an image file, a blob, an in-memory buffer).
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; a read past the end is an error, never zeros.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|range| range.end <= self.len());
        match range {
            Some(range) => {
                buf.copy_from_slice(&self[range]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at offset {offset} is past the end ({} bytes)",
                    buf.len(),
                    self.len()
                ),
            )),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// The superblock, parsed into plain values.
#[derive(Debug, Clone, Serialize)]
pub struct SuperInfo {
    pub checksum: u32,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub blkszbits: u8,
    pub block_size: u32,
    pub sb_extslots: u8,
    pub root_nid: u64,
    pub inos: u64,
    /// Seconds; also the mtime of every compact inode.
    pub build_time: u64,
    pub build_time_nsec: u32,
    /// Blocks in the primary device.
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    #[serde(serialize_with = "serialize_uuid")]
    pub uuid: [u8; 16],
    /// NUL-trimmed, lossily decoded label.
    pub volume_name: String,
    /// Superblock offset 84 (`available_compr_algs` / `lz4_max_distance`); 0 if uncompressed.
    pub available_compr_algs: u16,
    /// As stored; only meaningful with incompat DEVICE_TABLE (see [`Image::devices`]).
    pub extra_devices: u16,
    pub devt_slotoff: u16,
    pub xattr_prefix_count: u8,
    pub xattr_prefix_start: u32,
    pub packed_nid: u64,
    pub xattr_filter_reserved: u8,
}

fn serialize_uuid<S: serde::Serializer>(
    uuid: &[u8; 16],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_uuid(uuid))
}

/// Formats a UUID in the usual 8-4-4-4-12 hex form.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (i, byte) in uuid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

const COMPAT_NAMES: &[(u32, &str)] = &[
    (compat::SB_CHKSUM, "sb_chksum"),
    (compat::MTIME, "mtime"),
    (compat::XATTR_FILTER, "xattr_filter"),
    (0x8, "shared_ea_in_metabox"),
    (0x10, "plain_xattr_pfx"),
];

const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (incompat::ZERO_PADDING, "zero_padding"),
    (incompat::COMPR_CFGS, "compr_cfgs"),
    (incompat::CHUNKED_FILE, "chunked_file"),
    (incompat::DEVICE_TABLE, "device_table"),
    (incompat::ZTAILPACKING, "ztailpacking"),
    (incompat::FRAGMENTS, "fragments"),
    (incompat::XATTR_PREFIXES, "xattr_prefixes"),
    (0x80, "48bit"),
    (0x100, "metabox"),
];

fn feature_names(bits: u32, table: &[(u32, &str)]) -> Vec<String> {
    let mut names = Vec::new();
    let mut known = 0;
    for &(bit, name) in table {
        known |= bit;
        if bits & bit != 0 {
            names.push(name.to_string());
        }
    }
    if bits & !known != 0 {
        names.push(format!("unknown(0x{:x})", bits & !known));
    }
    names
}

impl SuperInfo {
    /// Names of the set `feature_compat` bits.
    pub fn compat_feature_names(&self) -> Vec<String> {
        feature_names(self.feature_compat, COMPAT_NAMES)
    }
    /// Names of the set `feature_incompat` bits.
    pub fn incompat_feature_names(&self) -> Vec<String> {
        feature_names(self.feature_incompat, INCOMPAT_NAMES)
    }
}

/// One slot of the device table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Up to 64 bytes, NUL-trimmed, lossily decoded (mkfs and lode write hex digests).
    pub tag: String,
    pub blocks: u32,
    /// Start in the unified block address space; 0 = not mapped (no flat mode).
    pub mapped_blkaddr: u32,
}

/// One inode, parsed. Private fields locate it and its data on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub nid: u64,
    pub layout: DataLayout,
    /// 64-byte extended inode (else 32-byte compact).
    pub extended: bool,
    /// Including the `S_IFMT` type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Compact inodes carry the superblock build time (6.12 semantics).
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    /// (major, minor) for character and block devices, (0, 0) otherwise.
    pub rdev: (u32, u32),
    pub xattr_icount: u16,
    /// The stored `i_ino` (unused by the kernel; mkfs writes a serial number).
    pub ino: u32,
    /// Byte offset of the inode in the primary device.
    offset: u64,
    /// The raw `i_u` union (raw_blkaddr, rdev or chunk format).
    raw_u: u32,
}

impl Inode {
    pub fn file_type(&self) -> FileType {
        // `inode()` only builds inodes with a valid type.
        FileType::from_mode(self.mode).unwrap_or(FileType::Unknown)
    }
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_regular(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    /// Whether this inode's type carries data (regular file, directory, symlink).
    pub fn has_data(&self) -> bool {
        self.is_regular() || self.is_dir() || self.is_symlink()
    }
    /// Byte offset of the inode in the primary device.
    pub fn meta_offset(&self) -> u64 {
        self.offset
    }
    /// 32 or 64.
    pub fn inode_size(&self) -> u64 {
        if self.extended {
            INODE_EXTENDED_SIZE as u64
        } else {
            INODE_COMPACT_SIZE as u64
        }
    }
    /// Size of the inline xattr area that follows the inode.
    pub fn xattr_size(&self) -> u64 {
        xattr_ibody_size(self.xattr_icount) as u64
    }
    /// The raw `i_u` union: first block for FLAT layouts, rdev, or chunk format.
    pub fn raw_u(&self) -> u32 {
        self.raw_u
    }
    /// The chunk format word of a CHUNK_BASED inode.
    pub fn chunk_format(&self) -> Option<u16> {
        (self.layout == DataLayout::ChunkBased).then_some(self.raw_u as u16)
    }
    /// Where the inline tail or the chunk map starts: right after the inode and its xattrs.
    fn body_offset(&self) -> Result<u64> {
        self.offset
            .checked_add(self.inode_size() + self.xattr_size())
            .ok_or_else(|| corrupt(format!("nid {}: inode offset overflows", self.nid)))
    }
}

/// One directory entry as stored (including "." and "..").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: FileType,
}

/// A run of a file's bytes that is stored in one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// First file offset of the run.
    pub logical: u64,
    /// Length in bytes; a run never extends past the file size.
    pub len: u64,
    pub kind: ExtentKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// Reads as zeros.
    Hole,
    /// Tail-packed data at this byte offset of the primary device.
    Inline { meta_offset: u64 },
    /// Data at byte `physical` of `device` (0 = primary, k = device-table slot k-1). Unified
    /// addresses (device 0 inside a slot's `mapped_blkaddr` range) are already translated to
    /// the slot's device; flat mode is a matter of backing and is not reflected here.
    Mapped { device: u16, physical: u64 },
}

/// A long xattr name prefix (§10.5).
#[derive(Debug, Clone)]
struct LongPrefix {
    base_index: u8,
    infix: Vec<u8>,
}

/// An opened EROFS image.
pub struct Image {
    primary: Box<dyn ReadAt>,
    devices: Vec<Option<Box<dyn ReadAt>>>,
    device_infos: Vec<DeviceInfo>,
    device_id_mask: u16,
    sb: SuperInfo,
    /// Err holds why the table could not be loaded (only when it is not corruption, e.g. a
    /// compressed packed inode); names using a long prefix then fail.
    long_prefixes: std::result::Result<Vec<LongPrefix>, String>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("superblock", &self.sb)
            .field("devices", &self.device_infos)
            .finish_non_exhaustive()
    }
}

fn corrupt(msg: String) -> Error {
    Error::Corrupt(msg)
}

/// Shows a name or path: as is when UTF-8, escaped otherwise.
pub fn display_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

fn read_from(
    store: &dyn ReadAt,
    buf: &mut [u8],
    offset: u64,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if offset.checked_add(buf.len() as u64).is_none() {
        return Err(corrupt(format!("{}: offset {offset} overflows", what())));
    }
    store
        .read_exact_at(buf, offset)
        .map_err(|source| Error::Io {
            context: format!(
                "reading {} bytes at offset {offset} for {}",
                buf.len(),
                what()
            ),
            source,
        })
}

fn align_up(value: u64, unit: u64) -> Option<u64> {
    value.checked_next_multiple_of(unit)
}

impl Image {
    /// Parses and validates the superblock and device table and checks that the root is a
    /// directory, like a 6.12 mount does.
    pub fn open(primary: Box<dyn ReadAt>) -> Result<Image> {
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        read_from(&*primary, &mut raw, SUPER_OFFSET, || {
            "the superblock".into()
        })?;
        let dsb = SuperBlock::read_from_bytes(&raw)
            .map_err(|_| corrupt("superblock has the wrong size".into()))?;

        let magic = dsb.magic.get();
        if magic != SUPER_MAGIC {
            return Err(corrupt(format!(
                "bad superblock magic 0x{magic:08x} at offset {SUPER_OFFSET} (expected 0x{SUPER_MAGIC:08x}): not an EROFS image"
            )));
        }
        let blkszbits = dsb.blkszbits;
        if !(9..=12).contains(&blkszbits) {
            return Err(Error::Unsupported(format!(
                "superblock blkszbits {blkszbits}: block size must be 512..4096"
            )));
        }
        let block_size = 1u32 << blkszbits;
        if dsb.dirblkbits != 0 {
            return Err(corrupt(format!(
                "superblock dirblkbits is {} (must be 0)",
                dsb.dirblkbits
            )));
        }
        let feature_compat = dsb.feature_compat.get();
        if feature_compat & compat::SB_CHKSUM != 0 {
            let mut region = vec![0u8; checksum_region_len(block_size)];
            read_from(&*primary, &mut region, SUPER_OFFSET, || {
                "the superblock checksum region".into()
            })?;
            let expected = superblock_checksum(&region);
            if expected != dsb.checksum.get() {
                return Err(corrupt(format!(
                    "superblock checksum 0x{:08x} does not match the computed 0x{expected:08x}",
                    dsb.checksum.get()
                )));
            }
        }
        let feature_incompat = dsb.feature_incompat.get();
        if feature_incompat & !incompat::KNOWN_6_12 != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible features 0x{:x}",
                feature_incompat & !incompat::KNOWN_6_12
            )));
        }
        let sb_size = SUPERBLOCK_SIZE as u64 + 16 * dsb.sb_extslots as u64;
        if sb_size > MAX_SB_SIZE {
            return Err(corrupt(format!(
                "superblock sb_extslots {} makes it {sb_size} bytes (max {MAX_SB_SIZE})",
                dsb.sb_extslots
            )));
        }
        let Some(name_len) = dsb.volume_name.iter().position(|&b| b == 0) else {
            return Err(corrupt(
                "superblock volume_name has no NUL terminator".into(),
            ));
        };

        let sb = SuperInfo {
            checksum: dsb.checksum.get(),
            feature_compat,
            feature_incompat,
            blkszbits,
            block_size,
            sb_extslots: dsb.sb_extslots,
            root_nid: dsb.root_nid.get() as u64,
            inos: dsb.inos.get(),
            build_time: dsb.build_time.get(),
            build_time_nsec: dsb.build_time_nsec.get(),
            blocks: dsb.blocks.get(),
            meta_blkaddr: dsb.meta_blkaddr.get(),
            xattr_blkaddr: dsb.xattr_blkaddr.get(),
            uuid: dsb.uuid,
            volume_name: String::from_utf8_lossy(&dsb.volume_name[..name_len]).into_owned(),
            available_compr_algs: dsb.u1.get(),
            extra_devices: dsb.extra_devices.get(),
            devt_slotoff: dsb.devt_slotoff.get(),
            xattr_prefix_count: dsb.xattr_prefix_count,
            xattr_prefix_start: dsb.xattr_prefix_start.get(),
            packed_nid: dsb.packed_nid.get(),
            xattr_filter_reserved: dsb.xattr_filter_reserved,
        };

        let device_infos = Self::read_device_table(&*primary, &sb)?;
        // The kernel masks chunk device ids with roundup_pow_of_two(extra_devices + 1) - 1.
        let device_id_mask = ((device_infos.len() as u32 + 1).next_power_of_two() - 1) as u16;
        let mut image = Image {
            primary,
            devices: (0..device_infos.len()).map(|_| None).collect(),
            device_infos,
            device_id_mask,
            sb,
            long_prefixes: Ok(Vec::new()),
        };

        let root = image.inode(image.sb.root_nid)?;
        if !root.is_dir() {
            return Err(corrupt(format!(
                "root nid {} is not a directory (mode 0o{:o})",
                root.nid, root.mode
            )));
        }
        image.long_prefixes = image.load_long_prefixes()?;
        Ok(image)
    }

    fn read_device_table(primary: &dyn ReadAt, sb: &SuperInfo) -> Result<Vec<DeviceInfo>> {
        if sb.feature_incompat & incompat::DEVICE_TABLE == 0 {
            return Ok(Vec::new());
        }
        let table_start = sb.devt_slotoff as u64 * DEVT_SLOT_SIZE;
        let mut infos = Vec::with_capacity(sb.extra_devices as usize);
        for slot_index in 0..sb.extra_devices as u64 {
            let mut raw = [0u8; DEVT_SLOT_SIZE as usize];
            let offset = table_start + slot_index * DEVT_SLOT_SIZE;
            read_from(primary, &mut raw, offset, || {
                format!("device table slot {slot_index}")
            })?;
            let slot = DeviceSlot::read_from_bytes(&raw)
                .map_err(|_| corrupt("device slot has the wrong size".into()))?;
            let tag_len = slot
                .tag
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(slot.tag.len());
            infos.push(DeviceInfo {
                tag: String::from_utf8_lossy(&slot.tag[..tag_len]).into_owned(),
                blocks: slot.blocks.get(),
                mapped_blkaddr: slot.mapped_blkaddr.get(),
            });
        }
        Ok(infos)
    }

    /// Loads the long xattr name prefix table (§10.5); malformed records fail the open, as
    /// they fail a mount.
    fn load_long_prefixes(&self) -> Result<std::result::Result<Vec<LongPrefix>, String>> {
        let count = self.sb.xattr_prefix_count as usize;
        if count == 0 {
            return Ok(Ok(Vec::new()));
        }
        let packed =
            if self.sb.feature_incompat & incompat::FRAGMENTS != 0 && self.sb.packed_nid != 0 {
                let packed = self.inode(self.sb.packed_nid)?;
                if matches!(
                    packed.layout,
                    DataLayout::CompressedFull | DataLayout::CompressedCompact
                ) {
                    return Ok(Err(format!(
                        "the long xattr prefixes live in the compressed packed inode (nid {})",
                        packed.nid
                    )));
                }
                Some(packed)
            } else {
                None
            };
        // Reads from the packed inode's data, or else from the primary device.
        let read = |buf: &mut [u8], pos: u64| -> Result<()> {
            match &packed {
                Some(inode) => {
                    let got = self.read_at(inode, pos, buf)?;
                    if got != buf.len() {
                        return Err(corrupt(format!(
                            "long xattr prefix at offset {pos} runs past the packed inode (nid {})",
                            inode.nid
                        )));
                    }
                    Ok(())
                }
                None => read_from(&*self.primary, buf, pos, || {
                    format!("the long xattr prefix table at offset {pos}")
                }),
            }
        };
        let mut prefixes = Vec::with_capacity(count);
        let mut pos = self.sb.xattr_prefix_start as u64 * 4;
        for index in 0..count {
            pos = align_up(pos, 4).ok_or_else(|| corrupt("prefix table overflows".into()))?;
            let mut len_raw = [0u8; 2];
            read(&mut len_raw, pos)?;
            let len = match u16::from_le_bytes(len_raw) {
                0 => 65536usize,
                n => n as usize,
            };
            if !(1..=MAX_NAME_LEN + 1).contains(&len) {
                return Err(corrupt(format!(
                    "long xattr prefix {index} at offset {pos} has length {len} (must be 1..=256)"
                )));
            }
            let mut data = vec![0u8; len];
            read(&mut data, pos + 2)?;
            prefixes.push(LongPrefix {
                base_index: data[0],
                infix: data[1..].to_vec(),
            });
            pos += 2 + len as u64;
        }
        Ok(Ok(prefixes))
    }

    pub fn superblock(&self) -> &SuperInfo {
        &self.sb
    }

    /// The device table (empty without incompat DEVICE_TABLE).
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.device_infos
    }

    /// Provides the backing store of extra device slot `index` (0-based; device_id index+1).
    /// A slot left unset is read in flat mode (from the primary at `mapped_blkaddr`) when
    /// its `mapped_blkaddr` is non-zero, else reading its data fails with
    /// [`Error::MissingDevice`].
    ///
    /// Panics if `index >= self.devices().len()`.
    pub fn set_device(&mut self, index: usize, dev: Box<dyn ReadAt>) {
        assert!(
            index < self.devices.len(),
            "device slot {index} out of range ({} slots)",
            self.devices.len()
        );
        self.devices[index] = Some(dev);
    }

    /// Whether slot `index` has been given a backing store with [`Image::set_device`].
    pub fn has_device(&self, index: usize) -> bool {
        self.devices.get(index).is_some_and(|d| d.is_some())
    }

    pub fn root_nid(&self) -> u64 {
        self.sb.root_nid
    }

    pub fn block_size(&self) -> u64 {
        self.sb.block_size as u64
    }

    fn read_primary(
        &self,
        buf: &mut [u8],
        offset: u64,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        read_from(&*self.primary, buf, offset, what)
    }

    /// Reads bytes at `physical` of device `device` (0 = primary), honouring flat mode.
    pub fn read_device(&self, device: u16, physical: u64, buf: &mut [u8]) -> Result<()> {
        if device == 0 {
            return self.read_primary(buf, physical, || "the primary device".into());
        }
        let index = device as usize - 1;
        let Some(info) = self.device_infos.get(index) else {
            return Err(corrupt(format!(
                "device_id {device} is beyond the {} extra devices",
                self.device_infos.len()
            )));
        };
        match &self.devices[index] {
            Some(store) => read_from(&**store, buf, physical, || {
                format!("extra device slot {index} (tag {:?})", info.tag)
            }),
            None if info.mapped_blkaddr != 0 => {
                let base = info.mapped_blkaddr as u64 * self.block_size();
                let offset = base.checked_add(physical).ok_or_else(|| {
                    corrupt(format!(
                        "flat-mode address of device slot {index} overflows"
                    ))
                })?;
                self.read_primary(buf, offset, || {
                    format!(
                        "extra device slot {index} (tag {:?}) in flat mode (primary block {})",
                        info.tag, info.mapped_blkaddr
                    )
                })
            }
            None => Err(Error::MissingDevice {
                index,
                tag: info.tag.clone(),
            }),
        }
    }

    /// Reads and validates the inode `nid`, as 6.12 does at inode load.
    pub fn inode(&self, nid: u64) -> Result<Inode> {
        let bs = self.block_size();
        let offset = nid
            .checked_mul(ISLOT_SIZE)
            .and_then(|o| o.checked_add(self.sb.meta_blkaddr as u64 * bs))
            .ok_or_else(|| corrupt(format!("nid {nid} is out of range")))?;
        let mut raw = [0u8; INODE_EXTENDED_SIZE];
        self.read_primary(&mut raw[..INODE_COMPACT_SIZE], offset, || {
            format!("inode nid {nid}")
        })?;
        let format = u16::from_le_bytes([raw[0], raw[1]]);
        if format & !I_FORMAT_ALL != 0 {
            return Err(Error::Unsupported(format!(
                "nid {nid}: i_format 0x{format:x} has bits unknown to Linux 6.12"
            )));
        }
        let layout_raw = (format >> 1) & 0x7;
        let layout = DataLayout::from_raw(layout_raw).ok_or_else(|| {
            Error::Unsupported(format!("nid {nid}: unknown data layout {layout_raw}"))
        })?;
        let extended = format & I_VERSION_EXTENDED != 0;

        let mut inode = if extended {
            self.read_primary(
                &mut raw[INODE_COMPACT_SIZE..],
                offset + INODE_COMPACT_SIZE as u64,
                || format!("the second half of extended inode nid {nid}"),
            )?;
            let di = InodeExtended::read_from_bytes(&raw[..])
                .map_err(|_| corrupt("extended inode has the wrong size".into()))?;
            let size = di.size.get();
            if size > i64::MAX as u64 {
                return Err(corrupt(format!("nid {nid}: negative i_size {size}")));
            }
            Inode {
                nid,
                layout,
                extended,
                mode: di.mode.get() as u32,
                uid: di.uid.get(),
                gid: di.gid.get(),
                size,
                mtime: di.mtime.get() as i64,
                mtime_nsec: di.mtime_nsec.get(),
                nlink: di.nlink.get(),
                rdev: (0, 0),
                xattr_icount: di.xattr_icount.get(),
                ino: di.ino.get(),
                offset,
                raw_u: di.u.get(),
            }
        } else {
            let dc = InodeCompact::read_from_bytes(&raw[..INODE_COMPACT_SIZE])
                .map_err(|_| corrupt("compact inode has the wrong size".into()))?;
            Inode {
                nid,
                layout,
                extended,
                mode: dc.mode.get() as u32,
                uid: dc.uid.get() as u32,
                gid: dc.gid.get() as u32,
                size: dc.size.get() as u64,
                mtime: self.sb.build_time as i64,
                mtime_nsec: self.sb.build_time_nsec,
                nlink: dc.nlink.get() as u32,
                rdev: (0, 0),
                xattr_icount: dc.xattr_icount.get(),
                ino: dc.ino.get(),
                offset,
                raw_u: dc.u.get(),
            }
        };
        if FileType::from_mode(inode.mode).is_none() {
            return Err(corrupt(format!(
                "nid {nid}: bogus i_mode 0o{:o} (unknown file type)",
                inode.mode
            )));
        }
        match inode.mode & S_IFMT {
            S_IFCHR | S_IFBLK => inode.rdev = decode_rdev(inode.raw_u),
            _ => {}
        }
        if layout == DataLayout::ChunkBased {
            let chunk_format = inode.raw_u as u16;
            if chunk_format & !CHUNK_FORMAT_ALL != 0 {
                return Err(Error::Unsupported(format!(
                    "nid {nid}: unsupported chunk format 0x{chunk_format:x}"
                )));
            }
        }
        Ok(inode)
    }

    /// Translates a device-0 block address through the unified address space (§8.3).
    fn unified(&self, physical: u64) -> (u16, u64) {
        let bs = self.block_size();
        for (index, info) in self.device_infos.iter().enumerate() {
            if info.mapped_blkaddr == 0 {
                continue;
            }
            let start = info.mapped_blkaddr as u64 * bs;
            let len = info.blocks as u64 * bs;
            if physical >= start && physical - start < len {
                // Slot count is bounded by a u16 field, so index + 1 fits.
                return ((index + 1) as u16, physical - start);
            }
        }
        (0, physical)
    }

    fn data_unsupported(inode: &Inode) -> Error {
        Error::Unsupported(format!(
            "nid {}: compressed data layout {:?} (datalayout {}) is not supported",
            inode.nid,
            inode.layout,
            inode.layout.raw()
        ))
    }

    /// The extent containing file offset `offset` (which must be below the file size).
    pub fn map(&self, inode: &Inode, offset: u64) -> Result<Extent> {
        if !inode.has_data() && inode.size != 0 {
            return Err(corrupt(format!(
                "nid {}: special file (mode 0o{:o}) has size {}",
                inode.nid, inode.mode, inode.size
            )));
        }
        if offset >= inode.size {
            return Err(Error::OutOfRange {
                nid: inode.nid,
                offset,
                size: inode.size,
            });
        }
        let bs = self.block_size();
        let nid = inode.nid;
        let size = inode.size;
        match inode.layout {
            DataLayout::CompressedFull | DataLayout::CompressedCompact => {
                Err(Self::data_unsupported(inode))
            }
            DataLayout::FlatPlain => {
                // 6.15+ reads an unaddressed FLAT_PLAIN file as one hole.
                if inode.raw_u == NULL_ADDR {
                    return Ok(Extent {
                        logical: 0,
                        len: size,
                        kind: ExtentKind::Hole,
                    });
                }
                let start = inode.raw_u as u64 * bs;
                start.checked_add(size).ok_or_else(|| {
                    corrupt(format!("nid {nid}: data end overflows (size {size})"))
                })?;
                let (device, physical) = self.unified(start);
                Ok(Extent {
                    logical: 0,
                    len: size,
                    kind: ExtentKind::Mapped { device, physical },
                })
            }
            DataLayout::FlatInline => {
                let full_blocks = size.div_ceil(bs) - 1;
                let tail_logical = full_blocks * bs;
                if offset < tail_logical {
                    let start = inode.raw_u as u64 * bs;
                    let (device, physical) = self.unified(start);
                    return Ok(Extent {
                        logical: 0,
                        len: tail_logical,
                        kind: ExtentKind::Mapped { device, physical },
                    });
                }
                let tail_len = size - tail_logical;
                let meta_offset = inode.body_offset()?;
                if meta_offset % bs + tail_len > bs {
                    return Err(corrupt(format!(
                        "nid {nid}: inline data of {tail_len} bytes at offset {meta_offset} crosses a block boundary"
                    )));
                }
                Ok(Extent {
                    logical: tail_logical,
                    len: tail_len,
                    kind: ExtentKind::Inline { meta_offset },
                })
            }
            DataLayout::ChunkBased => {
                let chunk_format = inode.raw_u as u16;
                let chunkbits =
                    self.sb.blkszbits as u32 + (chunk_format & CHUNK_FORMAT_BLKBITS_MASK) as u32;
                let chunk_nr = offset >> chunkbits;
                let logical = chunk_nr << chunkbits;
                let len = (1u64 << chunkbits).min(size - logical);
                let unit: u64 = if chunk_format & CHUNK_FORMAT_INDEXES != 0 {
                    8
                } else {
                    4
                };
                let entry_offset = align_up(inode.body_offset()?, unit)
                    .and_then(|base| base.checked_add(chunk_nr.checked_mul(unit)?))
                    .ok_or_else(|| {
                        corrupt(format!(
                            "nid {nid}: chunk {chunk_nr} entry offset overflows"
                        ))
                    })?;
                let mut raw = [0u8; 8];
                let raw = &mut raw[..unit as usize];
                self.read_primary(raw, entry_offset, || {
                    format!("chunk {chunk_nr} map entry of nid {nid}")
                })?;
                let (device_id, blkaddr) = if unit == 8 {
                    let index = ChunkIndex::read_from_bytes(raw)
                        .map_err(|_| corrupt("chunk index has the wrong size".into()))?;
                    (
                        index.device_id.get() & self.device_id_mask,
                        index.blkaddr.get(),
                    )
                } else {
                    (0, u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
                };
                if blkaddr == NULL_ADDR {
                    return Ok(Extent {
                        logical,
                        len,
                        kind: ExtentKind::Hole,
                    });
                }
                let start = blkaddr as u64 * bs;
                let (device, physical) = if device_id == 0 {
                    self.unified(start)
                } else if device_id as usize > self.device_infos.len() {
                    return Err(corrupt(format!(
                        "nid {nid}: chunk {chunk_nr} names device_id {device_id} but the image has {} extra devices",
                        self.device_infos.len()
                    )));
                } else {
                    (device_id, start)
                };
                Ok(Extent {
                    logical,
                    len,
                    kind: ExtentKind::Mapped { device, physical },
                })
            }
        }
    }

    /// Reads file data at `offset`. Returns fewer bytes than `buf.len()` only at end of file;
    /// holes read as zeros.
    pub fn read_at(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= inode.size || buf.is_empty() {
            return Ok(0);
        }
        let wanted = (buf.len() as u64).min(inode.size - offset) as usize;
        let mut done = 0usize;
        while done < wanted {
            let pos = offset + done as u64;
            let extent = self.map(inode, pos)?;
            let skip = pos - extent.logical;
            let available = extent.len.saturating_sub(skip);
            if extent.logical > pos || available == 0 {
                return Err(corrupt(format!(
                    "nid {}: extent {extent:?} does not contain offset {pos}",
                    inode.nid
                )));
            }
            let piece_len = ((wanted - done) as u64).min(available) as usize;
            let piece = &mut buf[done..done + piece_len];
            match extent.kind {
                ExtentKind::Hole => piece.fill(0),
                ExtentKind::Inline { meta_offset } => {
                    self.read_primary(piece, meta_offset + skip, || {
                        format!("inline data of nid {}", inode.nid)
                    })?;
                }
                ExtentKind::Mapped { device, physical } => {
                    let at = physical.checked_add(skip).ok_or_else(|| {
                        corrupt(format!("nid {}: data address overflows", inode.nid))
                    })?;
                    self.read_device(device, at, piece).map_err(|e| match e {
                        Error::Io { context, source } => Error::Io {
                            context: format!(
                                "{context} (data of nid {} at file offset {pos})",
                                inode.nid
                            ),
                            source,
                        },
                        other => other,
                    })?;
                }
            }
            done += piece_len;
        }
        Ok(wanted)
    }

    /// Reads and parses directory block `block_index` (validated as the kernel does).
    fn dir_block(
        &self,
        dir: &Inode,
        block_index: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Vec<RawDirent>> {
        let bs = self.block_size();
        let start = block_index * bs;
        let len = bs.min(dir.size - start) as usize;
        buf.resize(len, 0);
        let got = self.read_at(dir, start, buf)?;
        if got != len {
            return Err(corrupt(format!(
                "directory nid {}: short read of block {block_index}",
                dir.nid
            )));
        }
        parse_dir_block(dir.nid, block_index, buf, bs as usize)
    }

    fn dir_block_count(&self, dir: &Inode) -> Result<u64> {
        if !dir.is_dir() {
            return Err(Error::NotADirectory(format!("nid {}", dir.nid)));
        }
        Ok(dir.size.div_ceil(self.block_size()))
    }

    /// All entries of a directory in stored order, including "." and "..". Entries must be
    /// strictly sorted (lookups depend on it); a mis-sorted or duplicate name is reported as
    /// corruption.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let blocks = self.dir_block_count(dir)?;
        let mut entries: Vec<DirEntry> = Vec::new();
        let mut buf = Vec::new();
        for block_index in 0..blocks {
            for raw in self.dir_block(dir, block_index, &mut buf)? {
                let name = &buf[raw.name.clone()];
                if let Some(prev) = entries.last() {
                    if prev.name.as_slice() >= name {
                        return Err(corrupt(format!(
                            "directory nid {}: entry {:?} in block {block_index} is not sorted after {:?}",
                            dir.nid,
                            display_bytes(name),
                            display_bytes(&prev.name)
                        )));
                    }
                }
                entries.push(DirEntry {
                    name: name.to_vec(),
                    nid: raw.nid,
                    file_type: FileType::from_raw(raw.file_type),
                });
            }
        }
        Ok(entries)
    }

    /// Finds `name` in `dir` with the kernel's two-level binary search (§9.4).
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<u64>> {
        let blocks = self.dir_block_count(dir)?;
        if name.is_empty() || name.len() > MAX_NAME_LEN || blocks == 0 {
            return Ok(None);
        }
        let mut buf = Vec::new();
        // 1. The last block whose first name is <= name.
        let (mut head, mut back) = (0u64, blocks - 1);
        let mut candidate: Option<(Vec<u8>, Vec<RawDirent>)> = None;
        while head <= back {
            let mid = head + (back - head) / 2;
            let dirents = self.dir_block(dir, mid, &mut buf)?;
            let first = &dirents[0];
            match name.cmp(disk_name(&buf, first)) {
                Ordering::Equal => return Ok(Some(first.nid)),
                Ordering::Greater => {
                    head = mid + 1;
                    candidate = Some((std::mem::take(&mut buf), dirents));
                }
                Ordering::Less => {
                    if mid == 0 {
                        break;
                    }
                    back = mid - 1;
                }
            }
        }
        let Some((block, dirents)) = candidate else {
            return Ok(None);
        };
        // 2. Binary search over that block's entries 1..N.
        let rest = &dirents[1..];
        Ok(rest
            .binary_search_by(|d| disk_name(&block, d).cmp(name))
            .ok()
            .map(|i| rest[i].nid))
    }

    /// Resolves a path from the root without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Result<Inode> {
        let mut current = self.inode(self.root_nid())?;
        let mut walked: Vec<u8> = Vec::new();
        for component in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if !current.is_dir() {
                let shown = if walked.is_empty() {
                    b"/".to_vec()
                } else {
                    walked
                };
                return Err(Error::NotADirectory(display_bytes(&shown)));
            }
            walked.push(b'/');
            walked.extend_from_slice(component);
            match self.lookup(&current, component)? {
                Some(nid) => current = self.inode(nid)?,
                None => return Err(Error::NotFound(display_bytes(&walked))),
            }
        }
        Ok(current)
    }

    /// The target of a symlink.
    pub fn readlink(&self, inode: &Inode) -> Result<Vec<u8>> {
        if !inode.is_symlink() {
            return Err(Error::Unsupported(format!(
                "readlink of nid {} which is not a symlink (mode 0o{:o})",
                inode.nid, inode.mode
            )));
        }
        if inode.size > MAX_SYMLINK_LEN {
            return Err(corrupt(format!(
                "symlink nid {} has a {}-byte target (max {MAX_SYMLINK_LEN})",
                inode.nid, inode.size
            )));
        }
        let mut target = vec![0u8; inode.size as usize];
        let got = self.read_at(inode, 0, &mut target)?;
        target.truncate(got);
        Ok(target)
    }

    /// All xattrs with their full names, inline ones first, then shared ones, in the order
    /// the kernel lists them. Entries the kernel cannot list (unknown name index) are skipped.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let nid = inode.nid;
        match inode.xattr_icount {
            0 => return Ok(Vec::new()),
            1 => {
                return Err(Error::Unsupported(format!(
                    "nid {nid}: xattr_icount 1 (header without entries) is not supported"
                )))
            }
            _ => {}
        }
        // At most 12 + 4 * 65534 bytes, so reading it whole is bounded.
        let area_len = inode.xattr_size() as usize;
        let mut area = vec![0u8; area_len];
        let area_offset = inode.offset + inode.inode_size();
        self.read_primary(&mut area, area_offset, || {
            format!("inline xattrs of nid {nid}")
        })?;
        let header = XattrIbodyHeader::read_from_bytes(&area[..XATTR_IBODY_HEADER_SIZE])
            .map_err(|_| corrupt("xattr header has the wrong size".into()))?;
        let shared_count = header.shared_count as usize;
        let entries_start = XATTR_IBODY_HEADER_SIZE + 4 * shared_count;
        if entries_start > area_len {
            return Err(corrupt(format!(
                "nid {nid}: {shared_count} shared xattr ids do not fit the {area_len}-byte xattr area"
            )));
        }

        let mut out = Vec::new();
        let mut pos = entries_start;
        while pos < area_len {
            if area_len - pos < XATTR_ENTRY_SIZE {
                return Err(corrupt(format!(
                    "nid {nid}: inline xattr entry at byte {pos} of the xattr area is truncated"
                )));
            }
            let entry = XattrEntry::read_from_bytes(&area[pos..pos + XATTR_ENTRY_SIZE])
                .map_err(|_| corrupt("xattr entry has the wrong size".into()))?;
            let name_len = entry.name_len as usize;
            let value_len = entry.value_size.get() as usize;
            let entry_len = xattr_entry_size(name_len, value_len);
            if entry_len > area_len - pos {
                return Err(corrupt(format!(
                    "nid {nid}: inline xattr entry at byte {pos} ({entry_len} bytes) overflows the {area_len}-byte xattr area"
                )));
            }
            let name_start = pos + XATTR_ENTRY_SIZE;
            let suffix = &area[name_start..name_start + name_len];
            let value = &area[name_start + name_len..name_start + name_len + value_len];
            if let Some(name) = self.full_xattr_name(nid, entry.name_index, suffix)? {
                out.push((name, value.to_vec()));
            }
            pos += entry_len;
        }

        let bs = self.block_size();
        for i in 0..shared_count {
            let at = XATTR_IBODY_HEADER_SIZE + 4 * i;
            let id = u32::from_le_bytes([area[at], area[at + 1], area[at + 2], area[at + 3]]);
            let entry_offset = self.sb.xattr_blkaddr as u64 * bs + id as u64 * 4;
            let mut raw = [0u8; XATTR_ENTRY_SIZE];
            self.read_primary(&mut raw, entry_offset, || {
                format!("shared xattr id {id} of nid {nid}")
            })?;
            let entry = XattrEntry::read_from_bytes(&raw[..])
                .map_err(|_| corrupt("xattr entry has the wrong size".into()))?;
            let name_len = entry.name_len as usize;
            let mut body = vec![0u8; name_len + entry.value_size.get() as usize];
            self.read_primary(&mut body, entry_offset + XATTR_ENTRY_SIZE as u64, || {
                format!("shared xattr id {id} of nid {nid}")
            })?;
            if let Some(name) = self.full_xattr_name(nid, entry.name_index, &body[..name_len])? {
                out.push((name, body[name_len..].to_vec()));
            }
        }
        Ok(out)
    }

    /// Restores the prefix of an xattr name; None for indexes the kernel does not list.
    fn full_xattr_name(&self, nid: u64, name_index: u8, suffix: &[u8]) -> Result<Option<Vec<u8>>> {
        let (base_index, infix): (u8, &[u8]) = if name_index & xattr_index::LONG_PREFIX != 0 {
            let prefixes = self.long_prefixes.as_ref().map_err(|why| {
                Error::Unsupported(format!(
                    "nid {nid}: xattr uses a long name prefix, but {why}"
                ))
            })?;
            match prefixes.get((name_index & !xattr_index::LONG_PREFIX) as usize) {
                Some(prefix) => (prefix.base_index, &prefix.infix),
                None => return Ok(None),
            }
        } else {
            (name_index, &[])
        };
        Ok(xattr_prefix(base_index).map(|prefix| [prefix, infix, suffix].concat()))
    }
}

/// A parsed dirent; `name` is a byte range in its block.
#[derive(Debug, Clone)]
struct RawDirent {
    nid: u64,
    file_type: u8,
    name: std::ops::Range<usize>,
}

/// The name as lookup compares it: up to the first NUL.
fn disk_name<'a>(block: &'a [u8], dirent: &RawDirent) -> &'a [u8] {
    let name = &block[dirent.name.clone()];
    match name.iter().position(|&b| b == 0) {
        Some(end) => &name[..end],
        None => name,
    }
}

/// Validates and splits one directory block (§9.2). `block` holds the bytes of the block
/// that lie inside the directory (all of it but for the last block).
fn parse_dir_block(nid: u64, block_index: u64, block: &[u8], bs: usize) -> Result<Vec<RawDirent>> {
    let bad = |what: String| corrupt(format!("directory nid {nid} block {block_index}: {what}"));
    if block.len() < DIRENT_SIZE {
        return Err(bad(format!(
            "only {} bytes, no room for a dirent",
            block.len()
        )));
    }
    let dirent_at = |i: usize| {
        Dirent::read_from_bytes(&block[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE])
            .map_err(|_| corrupt("dirent has the wrong size".into()))
    };
    let first_nameoff = dirent_at(0)?.nameoff.get() as usize;
    if first_nameoff < DIRENT_SIZE
        || first_nameoff >= bs
        || !first_nameoff.is_multiple_of(DIRENT_SIZE)
        || first_nameoff > block.len()
    {
        return Err(bad(format!("invalid de[0].nameoff {first_nameoff}")));
    }
    let count = first_nameoff / DIRENT_SIZE;
    let mut out = Vec::with_capacity(count);
    let mut dirent = dirent_at(0)?;
    for i in 0..count {
        let name_start = dirent.nameoff.get() as usize;
        let next = if i + 1 < count {
            Some(dirent_at(i + 1)?)
        } else {
            None
        };
        let name_end = match &next {
            Some(next) => next.nameoff.get() as usize,
            // The last name ends at the first NUL or the end of the directory data.
            None => {
                let rest = block.get(name_start..).unwrap_or(&[]);
                name_start + rest.iter().position(|&b| b == 0).unwrap_or(rest.len())
            }
        };
        if name_end < name_start || name_end > block.len() || name_start < first_nameoff {
            return Err(bad(format!(
                "dirent {i} name {name_start}..{name_end} lies outside the names area"
            )));
        }
        let name_len = name_end - name_start;
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(bad(format!("dirent {i} has a {name_len}-byte name")));
        }
        out.push(RawDirent {
            nid: dirent.nid.get(),
            file_type: dirent.file_type,
            name: name_start..name_end,
        });
        if let Some(next) = next {
            dirent = next;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Image>();
    }

    #[test]
    fn vec_read_past_end_is_an_error() {
        let data = vec![1u8, 2, 3];
        let mut buf = [0u8; 2];
        assert!(data.read_exact_at(&mut buf, 1).is_ok());
        assert_eq!(buf, [2, 3]);
        assert!(data.read_exact_at(&mut buf, 2).is_err());
        assert!(data.read_exact_at(&mut buf, u64::MAX).is_err());
    }

    #[test]
    fn feature_names_include_unknown_bits() {
        assert_eq!(
            feature_names(0x5 | 0x4000, COMPAT_NAMES),
            vec!["sb_chksum", "xattr_filter", "unknown(0x4000)"]
        );
    }

    #[test]
    fn uuid_format() {
        let uuid: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(format_uuid(&uuid), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }

    #[test]
    fn dir_block_rejects_bad_nameoff() {
        let mut block = vec![0u8; 64];
        // nameoff 13 is not a multiple of 12.
        block[8] = 13;
        assert!(parse_dir_block(1, 0, &block, 512).is_err());
        // A single entry whose name runs to the end of the data.
        block[8] = 12;
        block[12..15].copy_from_slice(b"abc");
        let entries = parse_dir_block(1, 0, &block, 512).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(&block[entries[0].name.clone()], b"abc");
    }
}
