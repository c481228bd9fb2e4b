//! The reader against images made by mkfs.erofs (erofs-utils 1.5) from a tree holding every
//! kind of file: each layout mkfs can produce must read back exactly what the tree holds.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_trees_equal, mkfs, populate, scan_dir, scan_image, Tree};
use lode_format::format::{DataLayout, FileType, NULL_ADDR};
use lode_format::reader::{Error, ExtentKind, Image};
use tempfile::TempDir;

struct Fixture {
    dir: TempDir,
    src: PathBuf,
    expected: Tree,
}

fn fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("lode-mkfs-")
        .tempdir()
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src);
    let expected = scan_dir(&src);
    Fixture { dir, src, expected }
}

impl Fixture {
    fn image(&self, name: &str, args: &[&str]) -> PathBuf {
        let path = self.dir.path().join(name);
        mkfs(&path, &self.src, args);
        path
    }
}

fn open(path: &Path) -> Image {
    Image::open(Box::new(std::fs::File::open(path).unwrap())).unwrap()
}

fn open_bytes(bytes: Vec<u8>) -> Image {
    Image::open(Box::new(bytes)).unwrap()
}

/// Every path resolves (through the binary-search lookup) to the nid the walk found, and
/// names that are absent are not found.
fn check_lookups(image: &Image, scanned: &Tree) {
    for (path, node) in scanned {
        let inode = image.resolve(path).unwrap();
        assert_eq!(
            inode.nid,
            node.identity,
            "resolve {}",
            String::from_utf8_lossy(path)
        );
    }
    let bigdir = image.resolve(b"/bigdir").unwrap();
    for absent in [
        &b"a"[..],
        b"entry-",
        b"entry-00000x",
        b"entry-05000",
        b"zzz",
        b"\xff",
        b"-",
    ] {
        assert_eq!(image.lookup(&bigdir, absent).unwrap(), None, "{absent:?}");
    }
    assert_eq!(image.lookup(&bigdir, b".").unwrap(), Some(bigdir.nid));
    assert!(matches!(image.resolve(b"/nope/x"), Err(Error::NotFound(p)) if p == "/nope"));
    assert!(matches!(image.resolve(b"/one/x"), Err(Error::NotADirectory(p)) if p == "/one"));
    let entries = image.read_dir(&bigdir).unwrap();
    assert_eq!(entries.len(), 5002);
    assert_eq!(entries[0].name, b".");
    assert_eq!(entries[1].name, b"..");
    assert_eq!(entries[1].nid, image.root_nid());
}

fn layouts(image: &Image, scanned: &Tree) -> Vec<(Vec<u8>, DataLayout)> {
    scanned
        .iter()
        .map(|(path, node)| (path.clone(), image.inode(node.identity).unwrap().layout))
        .collect()
}

/// Checks the extents of every regular file tile it exactly.
fn check_extents(image: &Image, scanned: &Tree) {
    for node in scanned
        .values()
        .filter(|n| n.file_type == FileType::Regular)
    {
        let inode = image.inode(node.identity).unwrap();
        let mut offset = 0;
        while offset < inode.size {
            let extent = image.map(&inode, offset).unwrap();
            assert_eq!(extent.logical, offset);
            assert!(extent.len > 0 && extent.logical + extent.len <= inode.size);
            offset += extent.len;
        }
        assert!(matches!(
            image.map(&inode, inode.size),
            Err(Error::OutOfRange { .. })
        ));
    }
}

#[test]
fn default_layout_reads_back_the_tree() {
    let fixture = fixture();
    let image_path = fixture.image("default.img", &[]);
    let image = open(&image_path);
    let scanned = scan_image(&image);
    assert_trees_equal(&fixture.expected, &scanned, |_, _| {});
    check_lookups(&image, &scanned);
    check_extents(&image, &scanned);

    let layouts = layouts(&image, &scanned);
    assert!(layouts.iter().any(|(_, l)| *l == DataLayout::FlatInline));
    assert!(layouts.iter().all(|(_, l)| *l != DataLayout::ChunkBased));
    // Extended inodes carry the per-file mtimes.
    let one = image.resolve(b"/one").unwrap();
    assert!(one.extended);
    assert_eq!(image.superblock().block_size, 4096);

    // Inline xattrs are listed before shared ones.
    let shared_1 = image.resolve(b"/shared_1").unwrap();
    let names: Vec<_> = image
        .xattrs(&shared_1)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names[0], b"user.own", "{names:?}");
}

#[test]
fn noinline_data_layout_reads_back_the_tree() {
    let fixture = fixture();
    let image = open(&fixture.image("noinline.img", &["-Enoinline_data"]));
    let scanned = scan_image(&image);
    assert_trees_equal(&fixture.expected, &scanned, |_, _| {});
    check_extents(&image, &scanned);
    // mkfs 1.5 still tail-packs directories and symlinks; file data must be in blocks.
    for (path, layout) in layouts(&image, &scanned) {
        if scanned[&path].file_type == FileType::Regular {
            assert_eq!(
                layout,
                DataLayout::FlatPlain,
                "{}",
                String::from_utf8_lossy(&path)
            );
        }
    }
}

#[test]
fn chunked_layout_reads_back_the_tree() {
    let fixture = fixture();
    let image = open(&fixture.image("chunked.img", &["--chunksize=4096"]));
    let scanned = scan_image(&image);
    assert_trees_equal(&fixture.expected, &scanned, |_, _| {});
    check_lookups(&image, &scanned);
    check_extents(&image, &scanned);
    let big = image.resolve(b"/big").unwrap();
    assert_eq!(big.layout, DataLayout::ChunkBased);
    // A 4096-byte chunk per extent; the last one is the 3-byte tail.
    let last = image.map(&big, big.size - 1).unwrap();
    assert_eq!((last.logical, last.len), (1 << 20, 3));
}

/// Pads `image` to whole blocks and appends `blob` as the flat-mode copy of device 1.
fn append_flat_device(mut image: Vec<u8>, blob: &[u8], bs: usize) -> (Vec<u8>, u32) {
    image.resize(image.len().next_multiple_of(bs), 0);
    let mapped_blkaddr = (image.len() / bs) as u32;
    image.extend_from_slice(blob);
    image.resize(image.len().next_multiple_of(bs), 0);
    let sb = 1024;
    let devt_slotoff = u16::from_le_bytes([image[sb + 88], image[sb + 89]]) as usize;
    let slot = devt_slotoff * 128;
    let blob_blocks = blob.len().div_ceil(bs) as u32;
    image[slot + 64..slot + 68].copy_from_slice(&blob_blocks.to_le_bytes());
    image[slot + 68..slot + 72].copy_from_slice(&mapped_blkaddr.to_le_bytes());
    (image, mapped_blkaddr)
}

fn fix_checksum(image: &mut [u8]) {
    let bs = 1usize << image[1024 + 12];
    let region = lode_format::format::checksum_region_len(bs as u32);
    let sum = lode_format::format::superblock_checksum(&image[1024..1024 + region]);
    image[1028..1032].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn blob_device_layout_reads_back_the_tree() {
    let fixture = fixture();
    let blob_path = fixture.dir.path().join("blob");
    let blob_arg = format!("--blobdev={}", blob_path.display());
    let image_path = fixture.image("blobdev.img", &["--chunksize=4096", &blob_arg]);
    let blob = std::fs::read(&blob_path).unwrap();

    // Without the blob, metadata reads fine but data names the missing slot.
    let mut image = open(&image_path);
    assert_eq!(image.devices().len(), 1);
    let big = image.resolve(b"/big").unwrap();
    let mut buf = [0u8; 16];
    match image.read_at(&big, 0, &mut buf) {
        Err(Error::MissingDevice { index: 0, .. }) => {}
        other => panic!("expected MissingDevice, got {other:?}"),
    }
    let extent = image.map(&big, 0).unwrap();
    assert!(
        matches!(extent.kind, ExtentKind::Mapped { device: 1, .. }),
        "{extent:?}"
    );

    image.set_device(0, Box::new(std::fs::File::open(&blob_path).unwrap()));
    let scanned = scan_image(&image);
    assert_trees_equal(&fixture.expected, &scanned, |_, _| {});
    check_extents(&image, &scanned);

    // Flat mode: the blob appended to the primary at mapped_blkaddr, no device given.
    let (mut flat, mapped_blkaddr) =
        append_flat_device(std::fs::read(&image_path).unwrap(), &blob, 4096);
    fix_checksum(&mut flat);
    let flat_image = open_bytes(flat.clone());
    assert_eq!(flat_image.devices()[0].mapped_blkaddr, mapped_blkaddr);
    assert_trees_equal(&fixture.expected, &scan_image(&flat_image), |_, _| {});

    // Unified addressing: chunk indexes rewritten to device 0 with unified block addresses
    // must still reach the blob (given as a separate device) or the flat copy.
    let mut rewritten = 0;
    for node in scanned
        .values()
        .filter(|n| n.file_type == FileType::Regular)
    {
        let inode = flat_image.inode(node.identity).unwrap();
        if inode.layout != DataLayout::ChunkBased || inode.size == 0 {
            continue;
        }
        let chunk_size = 4096u64 << (inode.chunk_format().unwrap() & 0x1f);
        let base =
            (inode.meta_offset() + inode.inode_size() + inode.xattr_size()).next_multiple_of(8);
        for chunk in 0..inode.size.div_ceil(chunk_size) {
            let at = (base + chunk * 8) as usize;
            let device_id = u16::from_le_bytes([flat[at + 2], flat[at + 3]]);
            let blkaddr = u32::from_le_bytes(flat[at + 4..at + 8].try_into().unwrap());
            if blkaddr == NULL_ADDR || device_id != 1 {
                continue;
            }
            flat[at + 2..at + 4].copy_from_slice(&0u16.to_le_bytes());
            flat[at + 4..at + 8].copy_from_slice(&(blkaddr + mapped_blkaddr).to_le_bytes());
            rewritten += 1;
        }
    }
    assert!(rewritten > 100, "only {rewritten} chunk indexes rewritten");
    fix_checksum(&mut flat);
    let unified_flat = open_bytes(flat.clone());
    assert_trees_equal(&fixture.expected, &scan_image(&unified_flat), |_, _| {});
    // Cut the flat copy off: the data can now only come from the separate device.
    flat.truncate(mapped_blkaddr as usize * 4096);
    let mut unified = open_bytes(flat);
    unified.set_device(0, Box::new(blob));
    let extent = unified
        .map(&unified.resolve(b"/big").unwrap(), 8192)
        .unwrap();
    assert!(
        matches!(extent.kind, ExtentKind::Mapped { device: 1, .. }),
        "{extent:?}"
    );
    assert_trees_equal(&fixture.expected, &scan_image(&unified), |_, _| {});
}

#[test]
fn fixed_timestamp_gives_compact_inodes_with_the_build_time() {
    let fixture = fixture();
    let image = open(&fixture.image("fixed.img", &["-T1600000000"]));
    let sb = image.superblock();
    assert_eq!(sb.build_time, 1_600_000_000);
    let build_time = (sb.build_time as i64, sb.build_time_nsec);
    let scanned = scan_image(&image);
    assert_trees_equal(&fixture.expected, &scanned, |_, node| {
        node.mtime = build_time
    });
    let one = image.resolve(b"/one").unwrap();
    assert!(
        !one.extended,
        "small ids and the build time should give a compact inode"
    );
    let big_ids = image.resolve(b"/big_ids").unwrap();
    assert!(big_ids.extended);
}

#[test]
fn compressed_data_is_reported_as_unsupported() {
    let dir = tempfile::Builder::new()
        .prefix("lode-lz4-")
        .tempdir()
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("compressible"), b"lode ".repeat(200_000)).unwrap();
    std::fs::write(src.join("small"), b"x").unwrap();
    let image_path = dir.path().join("lz4.img");
    mkfs(&image_path, &src, &["-zlz4"]);
    let image = open(&image_path);
    let inode = image.resolve(b"/compressible").unwrap();
    assert!(matches!(
        inode.layout,
        DataLayout::CompressedFull | DataLayout::CompressedCompact
    ));
    let mut buf = [0u8; 10];
    match image.read_at(&inode, 0, &mut buf) {
        Err(Error::Unsupported(msg)) => {
            assert!(msg.contains(&format!("nid {}", inode.nid)), "{msg}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(matches!(image.map(&inode, 0), Err(Error::Unsupported(_))));
    // Metadata of the compressed image is still readable.
    assert_eq!(
        image.read_dir(&image.resolve(b"/").unwrap()).unwrap().len(),
        4
    );
}
