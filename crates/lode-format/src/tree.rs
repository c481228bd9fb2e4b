//! An in-memory filesystem tree: what the builder produces and the bootstrap writer lays out.
//!
//! Nodes live in one arena and are referred to by [`NodeId`]; a directory maps names to
//! node ids, so a hard link is simply a second entry naming the same node.

use std::collections::BTreeMap;

/// Index of a node in a [`Tree`].
pub type NodeId = usize;

/// Inode metadata common to every file type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Permission bits including setuid/setgid/sticky (`0o7777`); the type comes from the content.
    pub permissions: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes by full name (`user.foo`), kept sorted by name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Where a chunk of a chunk-based file lives: a block on one of the image's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkAddr {
    /// 0 is the bootstrap itself; blob `k` of the device table is device `k + 1`.
    pub device: u16,
    pub blkaddr: u32,
}

impl ChunkAddr {
    /// A chunk that is a hole: it reads as zeros and is stored nowhere.
    pub const HOLE: ChunkAddr = ChunkAddr {
        device: 0,
        blkaddr: crate::format::NULL_ADDR,
    };

    pub fn is_hole(&self) -> bool {
        self.blkaddr == crate::format::NULL_ADDR
    }
}

/// The bytes of a regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Stored in the bootstrap (small files): the writer tail-packs it after the inode when it fits.
    Inline(Vec<u8>),
    /// Stored in blobs, one [`ChunkAddr`] per `1 << chunk_bits` bytes of the file.
    Chunked {
        size: u64,
        chunk_bits: u8,
        chunks: Vec<ChunkAddr>,
    },
}

impl FileData {
    pub fn size(&self) -> u64 {
        match self {
            FileData::Inline(data) => data.len() as u64,
            FileData::Chunked { size, .. } => *size,
        }
    }
}

/// What a node is, with its type-specific payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Directory(BTreeMap<Vec<u8>, NodeId>),
    File(FileData),
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

impl Content {
    pub fn file_type(&self) -> crate::format::FileType {
        use crate::format::FileType;
        match self {
            Content::Directory(_) => FileType::Directory,
            Content::File(_) => FileType::Regular,
            Content::Symlink(_) => FileType::Symlink,
            Content::CharDevice { .. } => FileType::CharDevice,
            Content::BlockDevice { .. } => FileType::BlockDevice,
            Content::Fifo => FileType::Fifo,
            Content::Socket => FileType::Socket,
        }
    }

    /// The `S_IFMT` bits of this content's type.
    pub fn type_bits(&self) -> u32 {
        use crate::format::*;
        match self {
            Content::Directory(_) => S_IFDIR,
            Content::File(_) => S_IFREG,
            Content::Symlink(_) => S_IFLNK,
            Content::CharDevice { .. } => S_IFCHR,
            Content::BlockDevice { .. } => S_IFBLK,
            Content::Fifo => S_IFIFO,
            Content::Socket => S_IFSOCK,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Metadata,
    pub content: Content,
}

/// A tree of nodes; node 0 is the root directory.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    pub const ROOT: NodeId = 0;

    pub fn new(root_meta: Metadata) -> Self {
        Tree {
            nodes: vec![Node {
                meta: root_meta,
                content: Content::Directory(BTreeMap::new()),
            }],
        }
    }

    /// Adds a node without linking it anywhere yet.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The entries of a directory node, or `None` if it is not a directory.
    pub fn entries(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match &self.nodes[dir].content {
            Content::Directory(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn entries_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        match &mut self.nodes[dir].content {
            Content::Directory(entries) => Some(entries),
            _ => None,
        }
    }

    /// Links `child` into directory `dir` under `name`, replacing any previous entry.
    /// Returns the node the name used to refer to.
    ///
    /// # Panics
    /// If `dir` is not a directory (a builder bug, not bad input).
    pub fn link(&mut self, dir: NodeId, name: Vec<u8>, child: NodeId) -> Option<NodeId> {
        self.entries_mut(dir)
            .expect("link target is a directory")
            .insert(name, child)
    }
}
