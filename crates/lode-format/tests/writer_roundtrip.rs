//! Property test: any tree the writer accepts reads back identically through the reader
//! (names, types, metadata, xattrs, inline and chunked data, holes, hard links, rdev).

use std::collections::BTreeMap;

use lode_format::reader::{Image, Inode};
use lode_format::tree::{ChunkAddr, Content, FileData, Metadata, Node, NodeId, Tree};
use lode_format::writer::{write_bootstrap, DeviceSpec, WriteOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    Inline(Vec<u8>),
    /// Chunks of `1 << bits` bytes; `None` is a hole.
    Chunked(u8, Vec<Option<u8>>, u64),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Fifo,
    Socket,
    /// A hard link to the n-th earlier non-directory (modulo their count).
    Link(usize),
}

#[derive(Debug, Clone)]
struct Entry {
    parent: usize,
    name: Vec<u8>,
    kind: Kind,
    meta: Metadata,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z]{1,12}".prop_map(|s| s.into_bytes()),
        prop::collection::vec(1u8..=255, 1..255).prop_map(|v| v
            .into_iter()
            .map(|b| if b == b'/' { b'_' } else { b })
            .collect()),
        Just(vec![b'x'; 255]),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn meta() -> impl Strategy<Value = Metadata> {
    let xattr = prop_oneof![
        "[a-z]{1,8}".prop_map(|s| format!("user.{s}").into_bytes()),
        "[a-z]{1,8}".prop_map(|s| format!("trusted.{s}").into_bytes()),
        Just(b"security.capability".to_vec()),
    ];
    (
        0u16..0o7777,
        prop_oneof![Just(0u32), 1u32..70000, Just(u32::MAX - 1)],
        prop_oneof![Just(0u32), 1u32..70000],
        prop_oneof![Just(1_600_000_000i64), -3_000_000_000i64..5_000_000_000],
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
        prop::collection::btree_map(xattr, prop::collection::vec(any::<u8>(), 0..40), 0..4),
    )
        .prop_map(
            |(permissions, uid, gid, mtime, mtime_nsec, xattrs)| Metadata {
                permissions,
                uid,
                gid,
                mtime,
                mtime_nsec,
                xattrs,
            },
        )
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Dir),
        3 => prop::collection::vec(any::<u8>(), 0..6000).prop_map(Kind::Inline),
        2 => (12u8..15, prop::collection::vec(prop::option::of(any::<u8>()), 1..6), 0u64..4096)
            .prop_map(|(bits, chunks, short)| Kind::Chunked(bits, chunks, short)),
        1 => prop::collection::vec(1u8..=255, 1..300).prop_map(Kind::Symlink),
        1 => (0u32..4096, 0u32..0x100000).prop_map(|(a, b)| Kind::Char(a, b)),
        1 => Just(Kind::Fifo),
        1 => Just(Kind::Socket),
        1 => any::<usize>().prop_map(Kind::Link),
    ]
}

fn entries() -> impl Strategy<Value = Vec<Entry>> {
    prop::collection::vec((any::<usize>(), name(), kind(), meta()), 0..40).prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(i, (p, name, kind, meta))| Entry {
                // Parent: the root (0) or an earlier entry (1-based), fixed up later.
                parent: p % (i + 1),
                name,
                kind,
                meta,
            })
            .collect()
    })
}

/// Builds the tree and the blob holding chunked data; returns the expected files per path.
fn build(entries: &[Entry], root_meta: &Metadata) -> (Tree, Vec<u8>) {
    let mut tree = Tree::new(root_meta.clone());
    let mut blob: Vec<u8> = Vec::new();
    // Entry index (1-based) -> node id; directories only are valid parents.
    let mut ids: Vec<NodeId> = vec![Tree::ROOT];
    let mut non_dirs: Vec<NodeId> = Vec::new();
    for e in entries {
        let mut parent = ids[e.parent];
        if tree.entries(parent).is_none() {
            parent = Tree::ROOT;
        }
        if tree.entries(parent).unwrap().contains_key(&e.name) {
            ids.push(Tree::ROOT); // duplicate name: skip the entry
            continue;
        }
        let content = match &e.kind {
            Kind::Dir => Content::Directory(BTreeMap::new()),
            Kind::Inline(d) => Content::File(FileData::Inline(d.clone())),
            Kind::Chunked(bits, chunks, short) => {
                let csize = 1u64 << bits;
                let size = (chunks.len() as u64 * csize).saturating_sub(*short).max(1);
                let mut addrs = Vec::new();
                for (i, c) in chunks.iter().enumerate() {
                    let len = (size - i as u64 * csize).min(csize);
                    addrs.push(match c {
                        None => ChunkAddr::HOLE,
                        Some(b) => {
                            let blk = (blob.len() / 4096) as u32;
                            blob.extend(std::iter::repeat_n(*b | 1, len as usize));
                            blob.resize(blob.len().next_multiple_of(4096), 0);
                            ChunkAddr {
                                device: 1,
                                blkaddr: blk,
                            }
                        }
                    });
                }
                Content::File(FileData::Chunked {
                    size,
                    chunk_bits: *bits,
                    chunks: addrs,
                })
            }
            Kind::Symlink(t) => Content::Symlink(t.clone()),
            Kind::Char(a, b) => Content::CharDevice {
                major: *a,
                minor: *b,
            },
            Kind::Fifo => Content::Fifo,
            Kind::Socket => Content::Socket,
            Kind::Link(n) => {
                if non_dirs.is_empty() {
                    Content::Fifo
                } else {
                    let target = non_dirs[n % non_dirs.len()];
                    tree.link(parent, e.name.clone(), target);
                    ids.push(target);
                    continue;
                }
            }
        };
        let is_dir = matches!(content, Content::Directory(_));
        let id = tree.add(Node {
            meta: e.meta.clone(),
            content,
        });
        tree.link(parent, e.name.clone(), id);
        if !is_dir {
            non_dirs.push(id);
        }
        ids.push(id);
    }
    (tree, blob)
}

/// Compares node `id` of the tree with inode `ino` of the image, recursively.
fn check(tree: &Tree, id: NodeId, img: &Image, ino: &Inode, nlinks: &BTreeMap<NodeId, u32>) {
    let node = tree.node(id);
    let m = &node.meta;
    assert_eq!(ino.mode & 0o7777, m.permissions as u32);
    assert_eq!(ino.mode & 0o170000, node.content.type_bits());
    assert_eq!((ino.uid, ino.gid), (m.uid, m.gid));
    assert_eq!((ino.mtime, ino.mtime_nsec), (m.mtime, m.mtime_nsec));
    let xattrs: BTreeMap<Vec<u8>, Vec<u8>> = img.xattrs(ino).unwrap().into_iter().collect();
    assert_eq!(&xattrs, &m.xattrs);
    match &node.content {
        Content::Directory(entries) => {
            let listed = img.read_dir(ino).unwrap();
            let names: Vec<&[u8]> = listed
                .iter()
                .map(|d| d.name.as_slice())
                .filter(|n| *n != b"." && *n != b"..")
                .collect();
            let want: Vec<&[u8]> = entries.keys().map(|k| k.as_slice()).collect();
            assert_eq!(names, want);
            for (name, &child) in entries {
                let nid = img
                    .lookup(ino, name)
                    .unwrap()
                    .expect("entry found by lookup");
                check(tree, child, img, &img.inode(nid).unwrap(), nlinks);
            }
        }
        Content::File(data) => {
            assert_eq!(ino.size, data.size());
            assert_eq!(ino.nlink, nlinks[&id]);
            let mut got = vec![0u8; ino.size as usize];
            assert_eq!(img.read_at(ino, 0, &mut got).unwrap(), got.len());
            let want: Vec<u8> = match data {
                FileData::Inline(d) => d.clone(),
                FileData::Chunked {
                    size,
                    chunk_bits,
                    chunks,
                } => {
                    let mut v = Vec::new();
                    for (i, c) in chunks.iter().enumerate() {
                        let len = (*size - ((i as u64) << chunk_bits)).min(1 << chunk_bits);
                        let byte = if c.is_hole() { 0 } else { got[i << chunk_bits] };
                        assert!(c.is_hole() || byte & 1 == 1, "chunk {i} read as zeros");
                        v.extend(std::iter::repeat_n(byte, len as usize));
                    }
                    v
                }
            };
            assert!(got == want, "file content differs");
        }
        Content::Symlink(t) => assert_eq!(&img.readlink(ino).unwrap(), t),
        Content::CharDevice { major, minor } => assert_eq!(ino.rdev, (*major, *minor)),
        _ => assert_eq!(ino.size, 0),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn trees_round_trip_through_writer_and_reader(entries in entries(), root in meta()) {
        let (tree, blob) = build(&entries, &root);
        let devices = if blob.is_empty() {
            vec![]
        } else {
            vec![DeviceSpec { tag: b"blob".to_vec(), blocks: (blob.len() / 4096) as u32 }]
        };
        let has_blob = !devices.is_empty();
        let (bytes, _) = write_bootstrap(&tree, &WriteOptions { devices, ..Default::default() })
            .unwrap();
        let mut img = Image::open(Box::new(bytes)).unwrap();
        if has_blob {
            img.set_device(0, Box::new(blob));
        }
        let mut nlinks = BTreeMap::new();
        for id in 0..tree.len() {
            if let Some(entries) = tree.entries(id) {
                for &child in entries.values() {
                    *nlinks.entry(child).or_insert(0) += 1;
                }
            }
        }
        let root_ino = img.inode(img.root_nid()).unwrap();
        check(&tree, Tree::ROOT, &img, &root_ino, &nlinks);
    }
}
