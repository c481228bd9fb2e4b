//! The reverse of an image's chunk indexes: which file (and which bytes of it) a range of a
//! blob holds, and which path an inode has. Lazy mounts use it to record access traces
//! (`lode mount --record-trace`): the kernel reports reads as (blob, byte range) in fanotify
//! mode and as inode numbers in FUSE mode, a trace names files.
//!
//! Built by walking the whole tree once ([`FileIndex::build`]). A blob range holds one file's
//! bytes, except a deduplicated chunk shared by several files: the first file of the walk
//! (depth first, entries in name order) owns it. A hard-linked file gets its first path.

use std::collections::HashMap;

use crate::reader::{ExtentKind, Image};
use crate::{Error, Result};

/// Bytes of one file that a blob range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRange<'a> {
    /// Absolute image path.
    pub path: &'a [u8],
    /// The file's size.
    pub size: u64,
    pub offset: u64,
    pub len: u64,
}

/// A run of a blob that holds file bytes `logical..` of file `file`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: u64,
    end: u64,
    file: u32,
    logical: u64,
}

/// Regular files of an image by inode and by blob range.
#[derive(Debug, Default)]
pub struct FileIndex {
    paths: Vec<Vec<u8>>,
    sizes: Vec<u64>,
    by_nid: HashMap<u64, u32>,
    /// Per blob (device-table slot; blob `i` is device `i + 1`): disjoint pieces by start.
    blobs: Vec<Vec<Piece>>,
}

impl FileIndex {
    /// Walks every directory of `image` and maps each regular file's blob extents.
    pub fn build(image: &Image) -> Result<FileIndex> {
        let bs = image.block_size();
        let mut idx = FileIndex {
            blobs: vec![Vec::new(); image.devices().len()],
            ..Default::default()
        };
        let mut seen_dirs = std::collections::HashSet::new();
        let mut stack: Vec<(u64, Vec<u8>)> = vec![(image.root_nid(), Vec::new())];
        while let Some((dir_nid, dir_path)) = stack.pop() {
            if !seen_dirs.insert(dir_nid) {
                return Err(Error::Corrupt(format!(
                    "directory nid {dir_nid} is reachable twice (a directory loop)"
                )));
            }
            let dir = image.inode(dir_nid)?;
            let mut subdirs = Vec::new();
            for e in image.read_dir(&dir)? {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut path = dir_path.clone();
                path.push(b'/');
                path.extend_from_slice(&e.name);
                let inode = image.inode(e.nid)?;
                if inode.is_dir() {
                    subdirs.push((e.nid, path));
                    continue;
                }
                if !inode.is_regular() || idx.by_nid.contains_key(&e.nid) {
                    continue;
                }
                let file = u32::try_from(idx.paths.len())
                    .map_err(|_| Error::Unsupported("more than 2^32 files".into()))?;
                idx.by_nid.insert(e.nid, file);
                idx.paths.push(path);
                idx.sizes.push(inode.size);
                let mut off = 0;
                while off < inode.size {
                    let ext = image.map(&inode, off)?;
                    if let ExtentKind::Mapped { device, physical } = ext.kind {
                        if let Some(pieces) = (device as usize)
                            .checked_sub(1)
                            .and_then(|b| idx.blobs.get_mut(b))
                        {
                            pieces.push(Piece {
                                start: physical,
                                end: physical.saturating_add(ext.len.next_multiple_of(bs)),
                                file,
                                logical: ext.logical,
                            });
                        }
                    }
                    let next = ext.logical.saturating_add(ext.len);
                    if next <= off {
                        return Err(Error::Corrupt(format!(
                            "nid {}: extent at {off} does not advance",
                            e.nid
                        )));
                    }
                    off = next;
                }
            }
            // Depth first in name order: push in reverse.
            stack.extend(subdirs.into_iter().rev());
        }
        for pieces in &mut idx.blobs {
            // Stable: among pieces with one start, the first file of the walk comes first.
            pieces.sort_by_key(|p| p.start);
            let mut kept: Vec<Piece> = Vec::with_capacity(pieces.len());
            let mut covered = 0u64;
            for mut p in pieces.drain(..) {
                if p.end <= covered {
                    continue;
                }
                if p.start < covered {
                    p.logical += covered - p.start;
                    p.start = covered;
                }
                covered = p.end;
                kept.push(p);
            }
            *pieces = kept;
        }
        Ok(idx)
    }

    /// Regular files indexed.
    pub fn files(&self) -> usize {
        self.paths.len()
    }

    /// Path and size of the regular file with inode `nid`.
    pub fn path_of(&self, nid: u64) -> Option<(&[u8], u64)> {
        let &f = self.by_nid.get(&nid)?;
        Some((&self.paths[f as usize], self.sizes[f as usize]))
    }

    /// The file bytes held by bytes `start..end` of blob `blob`, in blob order; ranges past a
    /// file's end (block padding) and bytes no file owns are left out.
    pub fn files_in(&self, blob: usize, start: u64, end: u64) -> Vec<FileRange<'_>> {
        let Some(pieces) = self.blobs.get(blob) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let first = pieces.partition_point(|p| p.end <= start);
        for p in &pieces[first..] {
            if p.start >= end {
                break;
            }
            let s = start.max(p.start);
            let e = end.min(p.end);
            let size = self.sizes[p.file as usize];
            let offset = p.logical + (s - p.start);
            let len = (e - s).min(size.saturating_sub(offset));
            if len > 0 {
                out.push(FileRange {
                    path: &self.paths[p.file as usize],
                    size,
                    offset,
                    len,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{ChunkAddr, Content, FileData, Metadata, Node, Tree};
    use crate::writer::{write_bootstrap, DeviceSpec, WriteOptions};

    fn file(tree: &mut Tree, dir: usize, name: &str, size: u64, chunks: Vec<ChunkAddr>) -> usize {
        let id = tree.add(Node {
            meta: Metadata {
                permissions: 0o644,
                ..Default::default()
            },
            content: Content::File(FileData::Chunked {
                size,
                chunk_bits: 13, // 8 KiB chunks: two blocks each
                chunks,
            }),
        });
        tree.link(dir, name.as_bytes().to_vec(), id);
        id
    }

    fn at(device: u16, blkaddr: u32) -> ChunkAddr {
        ChunkAddr { device, blkaddr }
    }

    #[test]
    fn blob_ranges_and_inodes_map_back_to_paths() {
        let mut tree = Tree::new(Metadata {
            permissions: 0o755,
            ..Default::default()
        });
        let sub = tree.add(Node {
            meta: Metadata {
                permissions: 0o755,
                ..Default::default()
            },
            content: Content::Directory(Default::default()),
        });
        tree.link(Tree::ROOT, b"d".to_vec(), sub);
        // /a: 10000 bytes = chunks at blob 0 blocks 0..2 and 2..3 (tail 1808 bytes).
        let a = file(&mut tree, Tree::ROOT, "a", 10000, vec![at(1, 0), at(1, 2)]);
        // /d/b: a hole, then a chunk in blob 1 at block 5; /d/c shares /a's first chunk.
        file(&mut tree, sub, "b", 16384, vec![ChunkAddr::HOLE, at(2, 5)]);
        file(&mut tree, sub, "c", 8192, vec![at(1, 0)]);
        // A hard link to /a.
        tree.link(sub, b"link".to_vec(), a);
        let opts = WriteOptions {
            devices: vec![
                DeviceSpec {
                    tag: vec![b'a'; 64],
                    blocks: 3,
                },
                DeviceSpec {
                    tag: vec![b'b'; 64],
                    blocks: 7,
                },
            ],
            ..Default::default()
        };
        let (bytes, _) = write_bootstrap(&tree, &opts).unwrap();
        let image = Image::open(Box::new(bytes)).unwrap();
        let idx = FileIndex::build(&image).unwrap();
        assert_eq!(idx.files(), 3);

        let r = |path: &'static str, size, offset, len| FileRange {
            path: path.as_bytes(),
            size,
            offset,
            len,
        };
        // Blob 0, one page inside /a's second chunk (the shared first chunk is /a's).
        assert_eq!(
            idx.files_in(0, 8192, 12288),
            vec![r("/a", 10000, 8192, 1808)]
        );
        assert_eq!(
            idx.files_in(0, 4096, 12288),
            vec![r("/a", 10000, 4096, 4096), r("/a", 10000, 8192, 1808)]
        );
        assert_eq!(idx.files_in(0, 0, 4096), vec![r("/a", 10000, 0, 4096)]);
        // Blob 1: /d/b's data chunk is its second one.
        assert_eq!(
            idx.files_in(1, 5 * 4096, 7 * 4096),
            vec![r("/d/b", 16384, 8192, 8192)]
        );
        // Nothing there, no such blob.
        assert!(idx.files_in(1, 0, 5 * 4096).is_empty());
        assert!(idx.files_in(5, 0, 4096).is_empty());

        // Inodes: the hard link has the first path.
        let root = image.inode(image.root_nid()).unwrap();
        let a_nid = image.lookup(&root, b"a").unwrap().unwrap();
        assert_eq!(idx.path_of(a_nid), Some((&b"/a"[..], 10000)));
        let d = image
            .inode(image.lookup(&root, b"d").unwrap().unwrap())
            .unwrap();
        let c_nid = image.lookup(&d, b"c").unwrap().unwrap();
        assert_eq!(idx.path_of(c_nid), Some((&b"/d/c"[..], 8192)));
        assert_eq!(idx.path_of(image.root_nid()), None);
    }
}
