//! The bootstrap writer: lays out a [`Tree`] as EROFS metadata the kernel mounts.
//!
//! Layout of the bootstrap (block size `bs`, `meta_blkaddr = 0`):
//!
//! ```text
//! block 0 : [0..1024) zero | superblock | device table | inodes ...
//!           inodes in breadth-first order, each followed by its inline xattrs and either
//!           its tail-packed data or its chunk indexes
//! then    : block-aligned data of directories / symlinks / small files that did not
//!           fit inline
//! then    : shared xattrs (xattr_blkaddr)
//! ```
//!
//! Everything is decided from the tree alone, so the same tree gives the same bytes.

use std::collections::{HashMap, VecDeque};

use zerocopy::IntoBytes;

use crate::format::*;
use crate::tree::{Content, FileData, NodeId, Tree};

/// One extra device (blob) in the device table.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Up to 64 bytes; lode uses the blob's hex sha256 digest.
    pub tag: Vec<u8>,
    /// Size of the blob in blocks.
    pub blocks: u32,
}

#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub block_bits: u8,
    pub devices: Vec<DeviceSpec>,
    pub volume_name: Vec<u8>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            block_bits: 12,
            devices: Vec::new(),
            volume_name: b"lode".to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("xattr {name:?} cannot be stored in EROFS (only user., trusted., security. and POSIX ACLs can)")]
    UnsupportedXattr { name: String },
    #[error("xattr {name:?} is too large ({len} bytes; EROFS allows names up to 255 and values up to 65535 bytes)")]
    XattrTooLarge { name: String, len: usize },
    #[error("xattrs of one inode take {0} bytes, more than EROFS can index")]
    TooManyXattrs(usize),
    #[error("device {major}:{minor} cannot be encoded in 32 bits")]
    DeviceNumber { major: u32, minor: u32 },
    #[error("symlink target is empty or longer than 4095 bytes ({0} bytes)")]
    SymlinkTarget(usize),
    #[error("directory node {0} is linked more than once (directories cannot be hard links)")]
    DirectoryHardlink(NodeId),
    #[error("invalid entry name {0:?} (empty, '.', '..', or contains '/' or NUL, or longer than 255 bytes)")]
    BadName(String),
    #[error("chunk table of node {node} has {got} entries, expected {expected}")]
    ChunkCount {
        node: NodeId,
        got: usize,
        expected: u64,
    },
    #[error("chunk of node {node} names device {device}, but the image has {devices} blobs")]
    ChunkDevice {
        node: NodeId,
        device: u16,
        devices: usize,
    },
    #[error("chunk size 2^{0} is not between the block size and 2^31")]
    ChunkBits(u8),
    #[error("{0} blobs do not fit in the device table (the root inode would lie past nid 65535)")]
    TooManyDevices(usize),
    #[error("device tag longer than 64 bytes: {0:?}")]
    DeviceTag(String),
    #[error("image too large: {0}")]
    TooLarge(&'static str),
    #[error("nlink of node {0} does not fit in 32 bits")]
    Nlink(NodeId),
}

/// What the writer produced, besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct WriteSummary {
    pub inodes: u64,
    pub compact_inodes: u64,
    pub inline_bytes: u64,
    pub shared_xattrs: u64,
    pub root_nid: u64,
    pub blocks: u32,
}

/// How one node's data is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// No data (devices, fifos, sockets, empty files).
    None,
    /// `full_blocks` in the data area, no tail.
    Plain,
    /// `full_blocks` in the data area and the tail right after the inode.
    Inline,
    /// 8-byte chunk indexes right after the inode.
    Chunks,
}

struct Plan {
    node: NodeId,
    parent: NodeId,
    nlink: u32,
    extended: bool,
    /// Inline xattr area (header + shared ids + entries) without the filter filled in.
    xattr_area: Vec<u8>,
    placement: Placement,
    /// Bytes stored in the bootstrap for this node (directory blocks, symlink target, file).
    data_len: u64,
    nid: u64,
    /// First block of the data area part (valid when `full_blocks(..) > 0`).
    blkaddr: u32,
}

/// Serialized directory: entries sorted, split into blocks.
struct DirLayout {
    /// (name, nid-source) per block, in order.
    blocks: Vec<Vec<(Vec<u8>, DirTarget)>>,
    size: u64,
}

#[derive(Clone, Copy)]
enum DirTarget {
    SelfDir,
    Parent,
    Child(NodeId),
}

fn dir_layout(tree: &Tree, dir: NodeId, block_size: usize) -> DirLayout {
    let entries = tree.entries(dir).expect("directory");
    let mut all: Vec<(Vec<u8>, DirTarget)> = Vec::with_capacity(entries.len() + 2);
    all.push((b".".to_vec(), DirTarget::SelfDir));
    all.push((b"..".to_vec(), DirTarget::Parent));
    all.extend(
        entries
            .iter()
            .map(|(name, &id)| (name.clone(), DirTarget::Child(id))),
    );
    all.sort_by(|a, b| a.0.cmp(&b.0));

    let mut blocks = Vec::new();
    let mut current: Vec<(Vec<u8>, DirTarget)> = Vec::new();
    let mut used = 0usize;
    for entry in all {
        let need = DIRENT_SIZE + entry.0.len();
        if used + need > block_size {
            blocks.push(std::mem::take(&mut current));
            used = 0;
        }
        used += need;
        current.push(entry);
    }
    blocks.push(current);
    let size = (blocks.len() as u64 - 1) * block_size as u64 + used as u64;
    DirLayout { blocks, size }
}

fn serialize_dir_block(
    out: &mut [u8],
    entries: &[(Vec<u8>, DirTarget)],
    self_nid: u64,
    parent_nid: u64,
    nid_of: &dyn Fn(NodeId) -> u64,
    tree: &Tree,
) {
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for (i, (name, target)) in entries.iter().enumerate() {
        let (nid, ft) = match *target {
            DirTarget::SelfDir => (self_nid, FileType::Directory),
            DirTarget::Parent => (parent_nid, FileType::Directory),
            DirTarget::Child(id) => (nid_of(id), tree.node(id).content.file_type()),
        };
        let de = Dirent {
            nid: nid.into(),
            nameoff: (nameoff as u16).into(),
            file_type: ft.raw(),
            reserved: 0,
        };
        out[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE].copy_from_slice(de.as_bytes());
        out[nameoff..nameoff + name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
}

fn check_name(name: &[u8]) -> Result<(), WriteError> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name.len() > 255
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return Err(WriteError::BadName(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    Ok(())
}

/// A node's xattrs split into shared ids and inline entries.
fn xattr_entry_bytes(index: u8, suffix: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xattr_entry_size(suffix.len(), value.len()));
    let e = XattrEntry {
        name_len: suffix.len() as u8,
        name_index: index,
        value_size: (value.len() as u16).into(),
    };
    out.extend_from_slice(e.as_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(xattr_entry_size(suffix.len(), value.len()), 0);
    out
}

fn split_checked(name: &[u8], value: &[u8]) -> Result<(u8, Vec<u8>), WriteError> {
    let lossy = || String::from_utf8_lossy(name).into_owned();
    let (index, suffix) =
        split_xattr_name(name).ok_or_else(|| WriteError::UnsupportedXattr { name: lossy() })?;
    if suffix.len() > 255 {
        return Err(WriteError::XattrTooLarge {
            name: lossy(),
            len: suffix.len(),
        });
    }
    if value.len() > 65535 {
        return Err(WriteError::XattrTooLarge {
            name: lossy(),
            len: value.len(),
        });
    }
    Ok((index, suffix.to_vec()))
}

/// Reachable nodes in breadth-first order, with each node's parent and link count
/// (indexed by node id).
struct Order {
    nodes: Vec<NodeId>,
    parent: Vec<NodeId>,
    nlink: Vec<u32>,
}

fn order_nodes(tree: &Tree) -> Result<Order, WriteError> {
    const UNSEEN: NodeId = usize::MAX;
    let mut parent = vec![UNSEEN; tree.len()];
    let mut nlink = vec![0u32; tree.len()];
    let mut order = vec![Tree::ROOT];
    parent[Tree::ROOT] = Tree::ROOT;
    let mut queue = VecDeque::from([Tree::ROOT]);
    while let Some(dir) = queue.pop_front() {
        let entries = tree.entries(dir).expect("queued nodes are directories");
        let mut subdirs = 0u32;
        for (name, &child) in entries {
            check_name(name)?;
            let is_dir = matches!(tree.node(child).content, Content::Directory(_));
            if is_dir {
                subdirs += 1;
                if parent[child] != UNSEEN {
                    return Err(WriteError::DirectoryHardlink(child));
                }
                queue.push_back(child);
            } else {
                nlink[child] = nlink[child]
                    .checked_add(1)
                    .ok_or(WriteError::Nlink(child))?;
            }
            if parent[child] == UNSEEN {
                parent[child] = dir;
                order.push(child);
            }
        }
        nlink[dir] = 2 + subdirs;
    }
    Ok(Order {
        nodes: order,
        parent,
        nlink,
    })
}

/// The (mtime, nsec) most inodes share; compact inodes can only carry this one.
fn pick_epoch(tree: &Tree, order: &[NodeId]) -> (i64, u32) {
    let mut counts: HashMap<(i64, u32), u64> = HashMap::new();
    for &id in order {
        let m = &tree.node(id).meta;
        *counts.entry((m.mtime, m.mtime_nsec)).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(t, _)| t)
        .unwrap_or((0, 0))
}

/// Writes the bootstrap for `tree` and returns its bytes (a whole number of blocks).
pub fn write_bootstrap(
    tree: &Tree,
    opts: &WriteOptions,
) -> Result<(Vec<u8>, WriteSummary), WriteError> {
    let bs = 1usize << opts.block_bits;
    let bs64 = bs as u64;
    for d in &opts.devices {
        if d.tag.len() > 64 {
            return Err(WriteError::DeviceTag(
                String::from_utf8_lossy(&d.tag).into_owned(),
            ));
        }
    }

    let Order {
        nodes: order,
        parent,
        nlink,
    } = order_nodes(tree)?;
    let epoch = pick_epoch(tree, &order);

    // Shared xattrs: every (name, value) pair that more than one inode carries.
    let mut pair_count: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
    for &id in &order {
        for (k, v) in &tree.node(id).meta.xattrs {
            *pair_count.entry((k, v)).or_default() += 1;
        }
    }
    let mut shared_area: Vec<u8> = Vec::new();
    let mut shared_ids: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
    for &id in &order {
        for (k, v) in &tree.node(id).meta.xattrs {
            if pair_count[&(k.as_slice(), v.as_slice())] > 1
                && !shared_ids.contains_key(&(k.as_slice(), v.as_slice()))
            {
                let (index, suffix) = split_checked(k, v)?;
                let xid = u32::try_from(shared_area.len() / 4)
                    .map_err(|_| WriteError::TooLarge("shared xattrs"))?;
                shared_area.extend_from_slice(&xattr_entry_bytes(index, &suffix, v));
                shared_ids.insert((k, v), xid);
            }
        }
    }

    let mut plans: Vec<Plan> = Vec::with_capacity(order.len());
    let mut dir_layouts: HashMap<NodeId, DirLayout> = HashMap::new();
    let mut any_chunked = false;
    let mut any_xattr = false;
    for &id in &order {
        let node = tree.node(id);
        let m = &node.meta;
        // Inline xattr area.
        let mut xattr_area = Vec::new();
        if !m.xattrs.is_empty() {
            any_xattr = true;
            let mut shared: Vec<u32> = Vec::new();
            let mut inline: Vec<u8> = Vec::new();
            let mut filter_bits = 0u32;
            for (k, v) in &m.xattrs {
                let (index, suffix) = split_checked(k, v)?;
                filter_bits |= 1 << xattr_filter_bit(index, &suffix);
                match shared_ids.get(&(k.as_slice(), v.as_slice())) {
                    Some(&xid) if shared.len() < 255 => shared.push(xid),
                    _ => inline.extend_from_slice(&xattr_entry_bytes(index, &suffix, v)),
                }
            }
            let header = XattrIbodyHeader {
                name_filter: (!filter_bits).into(),
                shared_count: shared.len() as u8,
                reserved: [0; 7],
            };
            xattr_area.extend_from_slice(header.as_bytes());
            for xid in shared {
                xattr_area.extend_from_slice(&xid.to_le_bytes());
            }
            xattr_area.extend_from_slice(&inline);
            if (xattr_area.len() - XATTR_IBODY_HEADER_SIZE) / 4 + 1 > u16::MAX as usize {
                return Err(WriteError::TooManyXattrs(xattr_area.len()));
            }
        }

        let (data_len, placement, size) = match &node.content {
            Content::Directory(_) => {
                let layout = dir_layout(tree, id, bs);
                let size = layout.size;
                dir_layouts.insert(id, layout);
                (size, Placement::Inline, size)
            }
            Content::Symlink(target) => {
                if target.is_empty() || target.len() > 4095 {
                    return Err(WriteError::SymlinkTarget(target.len()));
                }
                let len = target.len() as u64;
                (len, Placement::Inline, len)
            }
            Content::File(FileData::Inline(data)) => {
                let len = data.len() as u64;
                let p = if len == 0 {
                    Placement::None
                } else {
                    Placement::Inline
                };
                (len, p, len)
            }
            Content::File(FileData::Chunked {
                size,
                chunk_bits,
                chunks,
            }) => {
                if *chunk_bits < opts.block_bits || *chunk_bits > 31 {
                    return Err(WriteError::ChunkBits(*chunk_bits));
                }
                let expected = size.div_ceil(1u64 << chunk_bits);
                if chunks.len() as u64 != expected {
                    return Err(WriteError::ChunkCount {
                        node: id,
                        got: chunks.len(),
                        expected,
                    });
                }
                for c in chunks {
                    if !c.is_hole() && (c.device == 0 || c.device as usize > opts.devices.len()) {
                        return Err(WriteError::ChunkDevice {
                            node: id,
                            device: c.device,
                            devices: opts.devices.len(),
                        });
                    }
                }
                any_chunked = true;
                (0, Placement::Chunks, *size)
            }
            Content::CharDevice { major, minor } | Content::BlockDevice { major, minor } => {
                if *major > 0xfff || *minor > 0xfffff {
                    return Err(WriteError::DeviceNumber {
                        major: *major,
                        minor: *minor,
                    });
                }
                (0, Placement::None, 0)
            }
            Content::Fifo | Content::Socket => (0, Placement::None, 0),
        };
        let extended = m.uid > u16::MAX as u32
            || m.gid > u16::MAX as u32
            || nlink[id] > u16::MAX as u32
            || size > u32::MAX as u64
            || (m.mtime, m.mtime_nsec) != epoch;
        plans.push(Plan {
            node: id,
            parent: parent[id],
            nlink: nlink[id],
            extended,
            xattr_area,
            placement,
            data_len,
            nid: 0,
            blkaddr: 0,
        });
    }

    // Pass 1: place inodes. Inline tails must not cross a block boundary.
    let devt_off = SUPER_OFFSET as usize + SUPERBLOCK_SIZE;
    let mut cursor = (devt_off + opts.devices.len() * DEVT_SLOT_SIZE as usize) as u64;
    cursor = cursor.next_multiple_of(ISLOT_SIZE);
    let mut inline_bytes = 0u64;
    for plan in plans.iter_mut() {
        let isize = if plan.extended {
            INODE_EXTENDED_SIZE
        } else {
            INODE_COMPACT_SIZE
        } as u64;
        let base = isize + plan.xattr_area.len() as u64;
        let mut record = base;
        match plan.placement {
            Placement::Inline => {
                let tail = tail_len(plan.data_len, bs64);
                let rem = bs64 - cursor % bs64;
                if base + tail <= rem {
                    record += tail;
                } else if base + tail <= bs64 && rem < bs64 - tail {
                    // Padding to the next block wastes less than giving the tail a block.
                    cursor += rem;
                    record += tail;
                } else {
                    plan.placement = Placement::Plain;
                }
                if plan.placement == Placement::Inline {
                    inline_bytes += tail;
                }
            }
            Placement::Chunks => {
                let Content::File(FileData::Chunked { chunks, .. }) = &tree.node(plan.node).content
                else {
                    unreachable!()
                };
                record = (cursor + base).next_multiple_of(8) - cursor + 8 * chunks.len() as u64;
            }
            Placement::Plain | Placement::None => {}
        }
        plan.nid = cursor / ISLOT_SIZE;
        cursor = (cursor + record).next_multiple_of(ISLOT_SIZE);
    }
    let root_nid = plans[0].nid;
    if root_nid > u16::MAX as u64 {
        return Err(WriteError::TooManyDevices(opts.devices.len()));
    }

    // Pass 2: the data area, then shared xattrs.
    let mut next_blk = cursor.div_ceil(bs64);
    for plan in plans.iter_mut() {
        let blocks = full_blocks(plan.placement, plan.data_len, bs64);
        if blocks > 0 {
            plan.blkaddr =
                u32::try_from(next_blk).map_err(|_| WriteError::TooLarge("bootstrap blocks"))?;
            next_blk += blocks;
        }
    }
    let xattr_blkaddr = if shared_area.is_empty() {
        0
    } else {
        let b = next_blk;
        next_blk += (shared_area.len() as u64).div_ceil(bs64);
        u32::try_from(b).map_err(|_| WriteError::TooLarge("bootstrap blocks"))?
    };
    let total_blocks =
        u32::try_from(next_blk).map_err(|_| WriteError::TooLarge("bootstrap blocks"))?;
    let mut img = vec![0u8; next_blk as usize * bs];

    let nid_of_node: HashMap<NodeId, u64> = plans.iter().map(|p| (p.node, p.nid)).collect();
    let nid_of = |id: NodeId| nid_of_node[&id];

    let mut summary = WriteSummary {
        inodes: plans.len() as u64,
        inline_bytes,
        shared_xattrs: shared_ids.len() as u64,
        root_nid,
        blocks: total_blocks,
        ..Default::default()
    };

    for (serial, plan) in plans.iter().enumerate() {
        let node = tree.node(plan.node);
        let m = &node.meta;
        let iloc = (plan.nid * ISLOT_SIZE) as usize;
        let mode = (node.content.type_bits() | (m.permissions as u32 & 0o7777)) as u16;
        let layout = match plan.placement {
            Placement::None | Placement::Plain => DataLayout::FlatPlain,
            Placement::Inline => DataLayout::FlatInline,
            Placement::Chunks => DataLayout::ChunkBased,
        };
        let i_u: u32 = match &node.content {
            Content::CharDevice { major, minor } | Content::BlockDevice { major, minor } => {
                encode_rdev(*major, *minor)
            }
            Content::File(FileData::Chunked { chunk_bits, .. }) => {
                ((*chunk_bits - opts.block_bits) as u32 & CHUNK_FORMAT_BLKBITS_MASK as u32)
                    | CHUNK_FORMAT_INDEXES as u32
            }
            _ => plan.blkaddr,
        };
        let size = match &node.content {
            Content::File(d) => d.size(),
            _ => plan.data_len,
        };
        let xattr_icount = if plan.xattr_area.is_empty() {
            0
        } else {
            ((plan.xattr_area.len() - XATTR_IBODY_HEADER_SIZE) / 4 + 1) as u16
        };
        let format = (layout.raw() << 1) | plan.extended as u16;
        let isize = if plan.extended {
            let inode = InodeExtended {
                format: format.into(),
                xattr_icount: xattr_icount.into(),
                mode: mode.into(),
                reserved: 0.into(),
                size: size.into(),
                u: i_u.into(),
                ino: (serial as u32 + 1).into(),
                uid: m.uid.into(),
                gid: m.gid.into(),
                mtime: (m.mtime as u64).into(),
                mtime_nsec: m.mtime_nsec.into(),
                nlink: plan.nlink.into(),
                reserved2: [0; 16],
            };
            img[iloc..iloc + INODE_EXTENDED_SIZE].copy_from_slice(inode.as_bytes());
            INODE_EXTENDED_SIZE
        } else {
            summary.compact_inodes += 1;
            let inode = InodeCompact {
                format: format.into(),
                xattr_icount: xattr_icount.into(),
                mode: mode.into(),
                nlink: (plan.nlink as u16).into(),
                size: (size as u32).into(),
                mtime_delta: 0.into(),
                u: i_u.into(),
                ino: (serial as u32 + 1).into(),
                uid: (m.uid as u16).into(),
                gid: (m.gid as u16).into(),
                reserved2: 0.into(),
            };
            img[iloc..iloc + INODE_COMPACT_SIZE].copy_from_slice(inode.as_bytes());
            INODE_COMPACT_SIZE
        };
        let xloc = iloc + isize;
        img[xloc..xloc + plan.xattr_area.len()].copy_from_slice(&plan.xattr_area);
        let after = xloc + plan.xattr_area.len();

        // The node's bootstrap-resident data, laid out logically.
        let data: Option<Vec<u8>> = match &node.content {
            Content::Directory(_) => {
                let layout = &dir_layouts[&plan.node];
                let mut bytes = vec![0u8; layout.blocks.len() * bs];
                for (b, entries) in layout.blocks.iter().enumerate() {
                    serialize_dir_block(
                        &mut bytes[b * bs..(b + 1) * bs],
                        entries,
                        plan.nid,
                        nid_of(plan.parent),
                        &nid_of,
                        tree,
                    );
                }
                bytes.truncate(layout.size as usize);
                Some(bytes)
            }
            Content::Symlink(t) => Some(t.clone()),
            Content::File(FileData::Inline(d)) if !d.is_empty() => Some(d.clone()),
            _ => None,
        };
        match (plan.placement, data) {
            (Placement::Inline, Some(data)) => {
                let tail = tail_len(plan.data_len, bs64) as usize;
                let head = data.len() - tail;
                let start = plan.blkaddr as usize * bs;
                img[start..start + head].copy_from_slice(&data[..head]);
                img[after..after + tail].copy_from_slice(&data[head..]);
            }
            (Placement::Plain, Some(data)) => {
                let start = plan.blkaddr as usize * bs;
                img[start..start + data.len()].copy_from_slice(&data);
            }
            (Placement::Chunks, _) => {
                let Content::File(FileData::Chunked { chunks, .. }) = &node.content else {
                    unreachable!()
                };
                let mut at = (after as u64).next_multiple_of(8) as usize;
                for c in chunks {
                    let ci = ChunkIndex {
                        advise: 0.into(),
                        device_id: if c.is_hole() { 0 } else { c.device }.into(),
                        blkaddr: c.blkaddr.into(),
                    };
                    img[at..at + 8].copy_from_slice(ci.as_bytes());
                    at += 8;
                }
            }
            _ => {}
        }
    }

    if !shared_area.is_empty() {
        let at = xattr_blkaddr as usize * bs;
        img[at..at + shared_area.len()].copy_from_slice(&shared_area);
    }

    // Device table: blobs follow the bootstrap in the unified address space, so that a mount
    // without `device=` (flat mode) reads past the bootstrap and fails instead of reading
    // wrong blocks.
    let mut mapped = total_blocks as u64;
    for (i, d) in opts.devices.iter().enumerate() {
        let mut tag = [0u8; 64];
        tag[..d.tag.len()].copy_from_slice(&d.tag);
        let slot = DeviceSlot {
            tag,
            blocks: d.blocks.into(),
            mapped_blkaddr: u32::try_from(mapped)
                .map_err(|_| WriteError::TooLarge("blob address space"))?
                .into(),
            reserved: [0; 56],
        };
        mapped += d.blocks as u64;
        let at = devt_off + i * DEVT_SLOT_SIZE as usize;
        img[at..at + DEVT_SLOT_SIZE as usize].copy_from_slice(slot.as_bytes());
    }
    if mapped > u32::MAX as u64 {
        return Err(WriteError::TooLarge("blob address space"));
    }

    let mut feature_incompat = 0;
    if any_chunked {
        feature_incompat |= incompat::CHUNKED_FILE;
    }
    if !opts.devices.is_empty() {
        feature_incompat |= incompat::DEVICE_TABLE;
    }
    let mut feature_compat = compat::SB_CHKSUM | compat::MTIME;
    if any_xattr {
        feature_compat |= compat::XATTR_FILTER;
    }
    let mut volume_name = [0u8; 16];
    let vn = &opts.volume_name[..opts.volume_name.len().min(15)];
    volume_name[..vn.len()].copy_from_slice(vn);
    let mut sb = SuperBlock {
        magic: SUPER_MAGIC.into(),
        checksum: 0.into(),
        feature_compat: feature_compat.into(),
        blkszbits: opts.block_bits,
        sb_extslots: 0,
        root_nid: (root_nid as u16).into(),
        inos: (plans.len() as u64).into(),
        build_time: (epoch.0 as u64).into(),
        build_time_nsec: epoch.1.into(),
        blocks: total_blocks.into(),
        meta_blkaddr: 0.into(),
        xattr_blkaddr: xattr_blkaddr.into(),
        uuid: [0; 16],
        volume_name,
        feature_incompat: feature_incompat.into(),
        u1: 0.into(),
        extra_devices: (opts.devices.len() as u16).into(),
        devt_slotoff: ((devt_off as u64 / DEVT_SLOT_SIZE) as u16).into(),
        dirblkbits: 0,
        xattr_prefix_count: 0,
        xattr_prefix_start: 0.into(),
        packed_nid: 0.into(),
        xattr_filter_reserved: 0,
        reserved2: [0; 23],
    };
    let so = SUPER_OFFSET as usize;
    img[so..so + SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
    // A deterministic UUID: a hash of the whole image with the UUID still zero.
    let h = xxhash_rust::xxh3::xxh3_128(&img);
    sb.uuid = h.to_le_bytes();
    img[so..so + SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
    let region_len = checksum_region_len(bs as u32);
    let crc = superblock_checksum(&img[so..so + region_len]);
    img[so + 4..so + 8].copy_from_slice(&crc.to_le_bytes());
    Ok((img, summary))
}

/// Length of the last logical block of `len` bytes of data (0 for no data).
fn tail_len(len: u64, bs: u64) -> u64 {
    if len == 0 {
        0
    } else {
        len - (len - 1) / bs * bs
    }
}

/// Blocks a node needs in the data area for its placement.
fn full_blocks(placement: Placement, len: u64, bs: u64) -> u64 {
    match placement {
        Placement::Plain => len.div_ceil(bs),
        Placement::Inline => len.div_ceil(bs).saturating_sub(1),
        Placement::None | Placement::Chunks => 0,
    }
}
