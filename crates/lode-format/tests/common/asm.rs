//! A tiny EROFS assembler for tests: it places hand-specified inodes, directories, xattrs
//! and data, so tests can cover what mkfs.erofs 1.5 never emits (block sizes below 4096,
//! holes, long xattr prefixes, 255-byte names, extra devices) and hand-made corruption.
//!
//! Layout: metadata (superblock, device table, prefixes, inodes) in blocks
//! `[0, meta_blocks)`, one block of shared xattrs at `meta_blocks`, data after that.

use lode_format::format::{
    checksum_region_len, compat, incompat, superblock_checksum, xattr_ibody_size, DeviceSlot,
    Dirent, FileType, InodeCompact, InodeExtended, SuperBlock, XattrEntry, DIRENT_SIZE,
    SUPER_MAGIC,
};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

/// One inode as the test wants it on disk.
#[derive(Debug, Clone)]
pub struct InodeSpec {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub extended: bool,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Raw data layout (0 plain, 2 inline, 4 chunk, 1/3 compressed).
    pub layout: u16,
    /// Extra `i_format` bits (to test rejection).
    pub format_extra: u16,
    /// The `i_u` union.
    pub u: u32,
    /// Inline xattrs: (name index, stored suffix, value).
    pub xattrs: Vec<(u8, Vec<u8>, Vec<u8>)>,
    /// Shared xattr ids.
    pub shared: Vec<u32>,
    /// Forces `i_xattr_icount` (to test rejection).
    pub icount_override: Option<u16>,
    /// Bytes right after the inode and xattrs: an inline tail or a chunk map.
    pub body: Vec<u8>,
    /// Alignment of the body start (4/8 for chunk maps, 1 for tails).
    pub body_align: usize,
}

impl InodeSpec {
    pub fn new(mode: u32, size: u64) -> Self {
        InodeSpec {
            mode,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            extended: false,
            mtime: 0,
            mtime_nsec: 0,
            layout: 0,
            format_extra: 0,
            u: 0,
            xattrs: Vec::new(),
            shared: Vec::new(),
            icount_override: None,
            body: Vec::new(),
            body_align: 1,
        }
    }

    fn xattr_area(&self) -> Vec<u8> {
        if self.xattrs.is_empty() && self.shared.is_empty() {
            return Vec::new();
        }
        let mut area = vec![0u8; 12];
        area[4] = self.shared.len() as u8;
        for id in &self.shared {
            area.extend_from_slice(&id.to_le_bytes());
        }
        for (index, suffix, value) in &self.xattrs {
            area.extend_from_slice(&encode_xattr(*index, suffix, value));
        }
        area
    }

    fn icount(&self, area: &[u8]) -> u16 {
        self.icount_override.unwrap_or(if area.is_empty() {
            0
        } else {
            ((area.len() - 12) / 4 + 1) as u16
        })
    }

    fn inode_size(&self) -> usize {
        if self.extended {
            64
        } else {
            32
        }
    }

    /// Bytes the inode needs in the metadata area, with room for body alignment.
    fn reserved_len(&self) -> usize {
        self.inode_size() + self.xattr_area().len() + self.body_align - 1 + self.body.len()
    }
}

/// One xattr entry: header, suffix, value, zero padding to 4.
pub fn encode_xattr(index: u8, suffix: &[u8], value: &[u8]) -> Vec<u8> {
    let mut entry = XattrEntry {
        name_len: suffix.len() as u8,
        name_index: index,
        value_size: U16::new(value.len() as u16),
    }
    .as_bytes()
    .to_vec();
    entry.extend_from_slice(suffix);
    entry.extend_from_slice(value);
    entry.resize(entry.len().next_multiple_of(4), 0);
    entry
}

/// Directory content: entries sorted and packed into blocks; the last block is cut to its
/// used length, so the result's length is the directory's i_size.
pub fn dir_data(bs: usize, mut entries: Vec<(Vec<u8>, u64, FileType)>) -> Vec<u8> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<&(Vec<u8>, u64, FileType)> = Vec::new();
    let used = |group: &[&(Vec<u8>, u64, FileType)]| {
        group.iter().map(|e| DIRENT_SIZE + e.0.len()).sum::<usize>()
    };
    let mut groups = Vec::new();
    for entry in &entries {
        current.push(entry);
        if used(&current) > bs {
            let last = current.pop().unwrap();
            groups.push(std::mem::take(&mut current));
            current.push(last);
        }
    }
    groups.push(current);
    for group in &groups {
        let mut block = Vec::new();
        let mut nameoff = DIRENT_SIZE * group.len();
        for (name, nid, file_type) in group.iter().map(|e| (&e.0, e.1, e.2)) {
            let dirent = Dirent {
                nid: U64::new(nid),
                nameoff: U16::new(nameoff as u16),
                file_type: file_type.raw(),
                reserved: 0,
            };
            block.extend_from_slice(dirent.as_bytes());
            nameoff += name.len();
        }
        for entry in group {
            block.extend_from_slice(&entry.0);
        }
        blocks.push(block);
    }
    let last = blocks.len() - 1;
    let mut data = Vec::new();
    for (i, mut block) in blocks.into_iter().enumerate() {
        if i != last {
            block.resize(bs, 0);
        }
        data.extend_from_slice(&block);
    }
    data
}

pub struct Asm {
    pub bs: usize,
    pub image: Vec<u8>,
    meta_blocks: usize,
    meta_end: usize,
    shared_end: usize,
    pub devices: Vec<(Vec<u8>, u32, u32)>,
    pub prefixes: Vec<(u8, Vec<u8>)>,
    pub checksum: bool,
    pub build_time: u64,
    pub incompat_extra: u32,
}

impl Asm {
    pub fn new(bs: usize, meta_blocks: usize) -> Self {
        assert!(
            meta_blocks * bs >= 4096,
            "leave room for the superblock area"
        );
        Asm {
            bs,
            image: vec![0u8; (meta_blocks + 1) * bs],
            meta_blocks,
            // After the superblock, a device table (2 slots) and a prefix table.
            meta_end: 2048,
            shared_end: 0,
            devices: Vec::new(),
            prefixes: Vec::new(),
            checksum: true,
            build_time: 1_700_000_000,
            incompat_extra: 0,
        }
    }

    /// Adds a shared xattr and returns its id.
    pub fn shared_xattr(&mut self, index: u8, suffix: &[u8], value: &[u8]) -> u32 {
        let entry = encode_xattr(index, suffix, value);
        let at = self.meta_blocks * self.bs + self.shared_end;
        assert!(self.shared_end + entry.len() <= self.bs);
        self.image[at..at + entry.len()].copy_from_slice(&entry);
        let id = (self.shared_end / 4) as u32;
        self.shared_end += entry.len();
        id
    }

    /// Appends block-aligned data and returns its first block.
    pub fn data(&mut self, bytes: &[u8]) -> u32 {
        let blkaddr = (self.image.len() / self.bs) as u32;
        self.image.extend_from_slice(bytes);
        self.image
            .resize(self.image.len().next_multiple_of(self.bs), 0);
        blkaddr
    }

    /// Reserves metadata space of `len` bytes that does not cross a block.
    pub fn reserve(&mut self, len: usize) -> u64 {
        let mut at = self.meta_end.next_multiple_of(32);
        if at % self.bs + len > self.bs {
            at = at.next_multiple_of(self.bs);
        }
        assert!(at + len <= self.meta_blocks * self.bs, "metadata area full");
        self.meta_end = at + len;
        (at / 32) as u64
    }

    pub fn reserve_for(&mut self, spec: &InodeSpec) -> u64 {
        self.reserve(spec.reserved_len())
    }

    pub fn write_inode(&mut self, nid: u64, spec: &InodeSpec) {
        let at = nid as usize * 32;
        let area = spec.xattr_area();
        let icount = spec.icount(&area);
        let format = (spec.layout << 1) | spec.extended as u16 | spec.format_extra;
        let header: Vec<u8> = if spec.extended {
            let mut inode = InodeExtended::new_zeroed();
            inode.format = U16::new(format);
            inode.xattr_icount = U16::new(icount);
            inode.mode = U16::new(spec.mode as u16);
            inode.size = U64::new(spec.size);
            inode.u = U32::new(spec.u);
            inode.ino = U32::new(nid as u32);
            inode.uid = U32::new(spec.uid);
            inode.gid = U32::new(spec.gid);
            inode.mtime = U64::new(spec.mtime as u64);
            inode.mtime_nsec = U32::new(spec.mtime_nsec);
            inode.nlink = U32::new(spec.nlink);
            inode.as_bytes().to_vec()
        } else {
            let mut inode = InodeCompact::new_zeroed();
            inode.format = U16::new(format);
            inode.xattr_icount = U16::new(icount);
            inode.mode = U16::new(spec.mode as u16);
            inode.nlink = U16::new(spec.nlink as u16);
            inode.size = U32::new(spec.size as u32);
            inode.u = U32::new(spec.u);
            inode.ino = U32::new(nid as u32);
            inode.uid = U16::new(spec.uid as u16);
            inode.gid = U16::new(spec.gid as u16);
            inode.as_bytes().to_vec()
        };
        let mut bytes = header;
        bytes.extend_from_slice(&area);
        let body_at = (at + bytes.len()).next_multiple_of(spec.body_align);
        bytes.resize(body_at - at, 0);
        bytes.extend_from_slice(&spec.body);
        self.image[at..at + bytes.len()].copy_from_slice(&bytes);
    }

    /// Reserves and writes an inode.
    pub fn inode(&mut self, spec: &InodeSpec) -> u64 {
        let nid = self.reserve_for(spec);
        self.write_inode(nid, spec);
        nid
    }

    /// A regular file (or symlink, by `mode`) stored FLAT_PLAIN.
    pub fn plain(&mut self, mode: u32, data: &[u8]) -> InodeSpec {
        let mut spec = InodeSpec::new(mode, data.len() as u64);
        spec.layout = 0;
        spec.u = if data.is_empty() { 0 } else { self.data(data) };
        spec
    }

    /// FLAT_INLINE: all blocks but the last in the data area, the tail after the inode.
    pub fn inline(&mut self, mode: u32, data: &[u8]) -> InodeSpec {
        let mut spec = InodeSpec::new(mode, data.len() as u64);
        spec.layout = 2;
        let tail_start = (data.len().div_ceil(self.bs).max(1) - 1) * self.bs;
        if tail_start > 0 {
            spec.u = self.data(&data[..tail_start]);
        }
        spec.body = data[tail_start..].to_vec();
        spec
    }

    /// CHUNK_BASED with a 4-byte block map; `chunks[i]` None is a hole.
    pub fn block_map(&mut self, data: &[u8], chunk_blkbits: u16, holes: &[usize]) -> InodeSpec {
        let chunk = self.bs << chunk_blkbits;
        let mut spec = InodeSpec::new(0o100644, data.len() as u64);
        spec.layout = 4;
        spec.u = chunk_blkbits as u32;
        spec.body_align = 4;
        for (i, piece) in data.chunks(chunk).enumerate() {
            let blkaddr = if holes.contains(&i) {
                u32::MAX
            } else {
                self.data(piece)
            };
            spec.body.extend_from_slice(&blkaddr.to_le_bytes());
        }
        spec
    }

    /// CHUNK_BASED with 8-byte indexes: `placement[i]` is (device_id, blkaddr) or None for
    /// a hole; the caller stores the chunk bytes where it says.
    pub fn chunk_indexes(
        &mut self,
        size: u64,
        chunk_blkbits: u16,
        placement: &[Option<(u16, u32)>],
    ) -> InodeSpec {
        let mut spec = InodeSpec::new(0o100644, size);
        spec.layout = 4;
        spec.u = (chunk_blkbits | 0x20) as u32;
        spec.body_align = 8;
        for place in placement {
            let (device_id, blkaddr) = place.unwrap_or((0, u32::MAX));
            spec.body.extend_from_slice(&0u16.to_le_bytes());
            spec.body.extend_from_slice(&device_id.to_le_bytes());
            spec.body.extend_from_slice(&blkaddr.to_le_bytes());
        }
        spec
    }

    /// A FLAT_PLAIN directory holding `entries` (which should include "." and "..").
    pub fn dir(&mut self, entries: Vec<(Vec<u8>, u64, FileType)>) -> InodeSpec {
        let data = dir_data(self.bs, entries);
        let mut spec = self.plain(0o40755, &data);
        spec.nlink = 2;
        spec
    }

    /// Writes the superblock and tables; returns the image bytes.
    pub fn finish(mut self, root_nid: u64) -> Vec<u8> {
        let bs = self.bs;
        let blocks = (self.image.len() / bs) as u32;
        let mut sb = SuperBlock::new_zeroed();
        sb.magic = U32::new(SUPER_MAGIC);
        sb.feature_compat =
            U32::new(compat::MTIME | if self.checksum { compat::SB_CHKSUM } else { 0 });
        sb.blkszbits = bs.trailing_zeros() as u8;
        sb.root_nid = U16::new(root_nid as u16);
        sb.inos = U64::new(self.meta_end as u64 / 32);
        sb.build_time = U64::new(self.build_time);
        sb.build_time_nsec = U32::new(42);
        sb.blocks = U32::new(blocks);
        sb.meta_blkaddr = U32::new(0);
        sb.xattr_blkaddr = U32::new(self.meta_blocks as u32);
        sb.uuid = [7; 16];
        sb.volume_name[..4].copy_from_slice(b"test");
        let mut incompat_bits = incompat::CHUNKED_FILE | self.incompat_extra;
        if !self.devices.is_empty() {
            incompat_bits |= incompat::DEVICE_TABLE;
            sb.extra_devices = U16::new(self.devices.len() as u16);
            // Slots right after the superblock: byte 1152 = slot 9.
            sb.devt_slotoff = U16::new(9);
            for (i, (tag, dev_blocks, mapped)) in self.devices.iter().enumerate() {
                let mut slot = DeviceSlot::new_zeroed();
                slot.tag[..tag.len()].copy_from_slice(tag);
                slot.blocks = U32::new(*dev_blocks);
                slot.mapped_blkaddr = U32::new(*mapped);
                let at = 1152 + i * 128;
                assert!(at + 128 <= 1664, "at most 4 device slots");
                self.image[at..at + 128].copy_from_slice(slot.as_bytes());
            }
        }
        if !self.prefixes.is_empty() {
            incompat_bits |= incompat::XATTR_PREFIXES;
            // The prefix table lives at byte 1664 (before the first inode at 2048).
            let mut at = 1664usize;
            sb.xattr_prefix_start = U32::new(at as u32 / 4);
            sb.xattr_prefix_count = self.prefixes.len() as u8;
            for (base, infix) in &self.prefixes {
                at = at.next_multiple_of(4);
                let len = (1 + infix.len()) as u16;
                self.image[at..at + 2].copy_from_slice(&len.to_le_bytes());
                self.image[at + 2] = *base;
                self.image[at + 3..at + 3 + infix.len()].copy_from_slice(infix);
                at += 2 + len as usize;
            }
            assert!(at <= 2048);
        }
        sb.feature_incompat = U32::new(incompat_bits);
        self.image[1024..1152].copy_from_slice(sb.as_bytes());
        if self.checksum {
            refresh_checksum(&mut self.image);
        }
        self.image
    }
}

/// Recomputes the superblock checksum after a test edited the checksummed region.
pub fn refresh_checksum(image: &mut [u8]) {
    let bs = 1u32 << image[1024 + 12];
    let len = checksum_region_len(bs);
    let sum = superblock_checksum(&image[1024..1024 + len]);
    image[1028..1032].copy_from_slice(&sum.to_le_bytes());
}

/// Size in bytes of an inode's inline xattr area for a spec (for tests that patch bytes).
pub fn xattr_area_len(spec: &InodeSpec) -> usize {
    let area = spec.xattr_area();
    xattr_ibody_size(spec.icount(&area))
}
