//! The reader against hand-assembled images: every block size from 512 to 4096, holes,
//! chunk indexes into an extra device (separate, flat and missing), long xattr prefixes,
//! 255-byte names, and one test per rule a corrupt or unsupported image breaks.

mod common;

use common::asm::{dir_data, Asm, InodeSpec};
use common::pseudo_random;
use lode_format::format::{encode_rdev, xattr_index, FileType};
use lode_format::reader::{Error, ExtentKind, Image, Inode};

const BLOB_TAG: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// What the built image must read back.
struct Built {
    image: Vec<u8>,
    blob: Vec<u8>,
    files: Vec<(Vec<u8>, Vec<u8>)>,
    /// Byte offset of the appended blob copy in the primary (flat mode), if any.
    flat_at: Option<usize>,
}

fn dot_entries(own: u64, parent: u64) -> Vec<(Vec<u8>, u64, FileType)> {
    vec![
        (b".".to_vec(), own, FileType::Directory),
        (b"..".to_vec(), parent, FileType::Directory),
    ]
}

fn build(bs: usize, flat: bool) -> Built {
    let mut asm = Asm::new(bs, 32768 / bs);
    asm.prefixes = vec![(xattr_index::TRUSTED, b"overlay.".to_vec())];
    let root = asm.reserve(32);
    let sub = asm.reserve(64);
    let mut root_entries = dot_entries(root, root);
    let mut files = Vec::new();
    let add = |entries: &mut Vec<_>, name: &[u8], nid: u64, ft: FileType| {
        entries.push((name.to_vec(), nid, ft));
    };

    // FLAT_PLAIN, extended inode with a big uid and its own mtime.
    let plain_data = pseudo_random(3 * bs + 5, 1);
    let mut spec = asm.plain(0o104755, &plain_data);
    spec.extended = true;
    spec.uid = 100_000;
    spec.gid = 200_000;
    spec.mtime = -12_345;
    spec.mtime_nsec = 987_654_321;
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"plain", nid, FileType::Regular);
    files.push((b"/plain".to_vec(), plain_data));

    // FLAT_INLINE with inline, long-prefix, ACL and shared xattrs.
    let shared = asm.shared_xattr(xattr_index::SECURITY, b"shared", b"shared value");
    let inline_data = pseudo_random(2 * bs + 100, 2);
    let mut spec = asm.inline(0o100600, &inline_data);
    spec.xattrs = vec![
        (xattr_index::USER, b"inline".to_vec(), b"v1".to_vec()),
        (xattr_index::LONG_PREFIX, b"opaque".to_vec(), b"y".to_vec()),
        (xattr_index::POSIX_ACL_ACCESS, Vec::new(), vec![2, 0, 0, 0]),
        // Index 5 (lustre) has no handler: the kernel never lists it.
        (5, b"hidden".to_vec(), b"x".to_vec()),
    ];
    spec.shared = vec![shared];
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"inline", nid, FileType::Regular);
    files.push((b"/inline".to_vec(), inline_data));

    // Whole file inline in a compact inode.
    let tiny = b"tiny file".to_vec();
    let spec = asm.inline(0o100644, &tiny);
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"tiny", nid, FileType::Regular);
    add(&mut root_entries, &[b'x'; 255], nid, FileType::Regular);
    add(
        &mut root_entries,
        b"\xff\xfe-not-utf8",
        nid,
        FileType::Regular,
    );
    files.push((b"/tiny".to_vec(), tiny.clone()));
    files.push((
        vec![b'/'].into_iter().chain([b'x'; 255]).collect(),
        tiny.clone(),
    ));

    // Block map with 2-block chunks and a hole in chunk 1.
    let mut map_data = pseudo_random(7 * bs + 17, 3);
    map_data[2 * bs..4 * bs].fill(0);
    let spec = asm.block_map(&map_data, 1, &[1]);
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"blockmap", nid, FileType::Regular);
    files.push((b"/blockmap".to_vec(), map_data));

    // Chunk indexes: blob chunks, primary chunks and a hole.
    let index_data = pseudo_random(5 * bs + 9, 4);
    let chunks: Vec<&[u8]> = index_data.chunks(bs).collect();
    let mut blob = Vec::new();
    let mut placement = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        placement.push(match i {
            1 => None,
            2 | 5 => Some((0u16, asm.data(chunk))),
            _ => {
                let blkaddr = (blob.len() / bs) as u32;
                blob.extend_from_slice(chunk);
                blob.resize(blob.len().next_multiple_of(bs), 0);
                Some((1u16, blkaddr))
            }
        });
    }
    let mut expected_index_data = index_data.clone();
    expected_index_data[bs..2 * bs].fill(0);
    let spec = asm.chunk_indexes(index_data.len() as u64, 0, &placement);
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"indexes", nid, FileType::Regular);
    files.push((b"/indexes".to_vec(), expected_index_data));

    // FLAT_PLAIN without an address: a hole, as 6.15+ reads it.
    let mut spec = InodeSpec::new(0o100644, 3 * bs as u64);
    spec.u = u32::MAX;
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"nulladdr", nid, FileType::Regular);
    files.push((b"/nulladdr".to_vec(), vec![0; 3 * bs]));

    let spec = asm.inline(0o120777, b"target/of/link");
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"symlink", nid, FileType::Symlink);
    let mut spec = InodeSpec::new(0o20600, 0);
    spec.u = encode_rdev(4, 64);
    let nid = asm.inode(&spec);
    add(&mut root_entries, b"tty", nid, FileType::CharDevice);

    // A directory spanning several blocks at small block sizes.
    let mut sub_entries = dot_entries(sub, root);
    for i in 0..100 {
        let nid = asm.inode(&InodeSpec::new(0o100644, 0));
        sub_entries.push((
            format!("file-{i:02}-padding").into_bytes(),
            nid,
            FileType::Regular,
        ));
    }
    let mut spec = asm.dir(sub_entries);
    spec.extended = true;
    spec.mtime = 1_600_000_000;
    asm.write_inode(sub, &spec);
    add(&mut root_entries, b"sub", sub, FileType::Directory);

    let spec = asm.dir(root_entries);
    asm.write_inode(root, &spec);

    let blob_blocks = (blob.len() / bs) as u32;
    let mut flat_at = None;
    let mapped = if flat {
        let blkaddr = asm.data(&blob);
        flat_at = Some(blkaddr as usize * bs);
        blkaddr
    } else {
        0
    };
    asm.devices = vec![(BLOB_TAG.to_vec(), blob_blocks, mapped)];
    Built {
        image: asm.finish(root),
        blob,
        files,
        flat_at,
    }
}

fn read_all(image: &Image, inode: &Inode) -> Result<Vec<u8>, Error> {
    let mut data = vec![0u8; inode.size as usize];
    let got = image.read_at(inode, 0, &mut data)?;
    assert_eq!(got, data.len());
    Ok(data)
}

fn check_contents(image: &Image, built: &Built) {
    for (path, expected) in &built.files {
        let inode = image.resolve(path).unwrap();
        assert_eq!(
            &read_all(image, &inode).unwrap(),
            expected,
            "{}",
            String::from_utf8_lossy(path)
        );
        // Reads at every offset near block edges agree with the whole.
        let bs = image.block_size();
        for offset in [
            1,
            bs - 1,
            bs,
            bs + 1,
            2 * bs - 3,
            inode.size.saturating_sub(1),
        ] {
            if offset >= inode.size {
                continue;
            }
            let mut piece = vec![0u8; 2 * bs as usize];
            let got = image.read_at(&inode, offset, &mut piece).unwrap();
            let end = (offset as usize + got).min(expected.len());
            assert_eq!(got, end - offset as usize);
            assert_eq!(&piece[..got], &expected[offset as usize..end]);
        }
    }
}

fn check_metadata(image: &Image) {
    let bs = image.block_size();
    let sb = image.superblock();
    assert_eq!(sb.volume_name, "test");
    assert_eq!(
        image.devices()[0].tag,
        std::str::from_utf8(BLOB_TAG).unwrap()
    );

    let plain = image.resolve(b"/plain").unwrap();
    assert!(plain.extended);
    assert_eq!((plain.uid, plain.gid), (100_000, 200_000));
    assert_eq!((plain.mtime, plain.mtime_nsec), (-12_345, 987_654_321));
    assert_eq!(plain.mode, 0o104755);

    let tiny = image.resolve(b"/tiny").unwrap();
    assert_eq!((tiny.mtime, tiny.mtime_nsec), (sb.build_time as i64, 42));
    let long = [&b"/"[..], &[b'x'; 255]].concat();
    assert_eq!(image.resolve(&long).unwrap().nid, tiny.nid);
    assert_eq!(image.resolve(b"/\xff\xfe-not-utf8").unwrap().nid, tiny.nid);

    let inline = image.resolve(b"/inline").unwrap();
    let xattrs = image.xattrs(&inline).unwrap();
    let names: Vec<&[u8]> = xattrs.iter().map(|(n, _)| n.as_slice()).collect();
    assert_eq!(
        names,
        vec![
            &b"user.inline"[..],
            b"trusted.overlay.opaque",
            b"system.posix_acl_access",
            b"security.shared"
        ]
    );
    assert_eq!(xattrs[3].1, b"shared value");
    let tail = image.map(&inline, inline.size - 1).unwrap();
    assert!(matches!(tail.kind, ExtentKind::Inline { .. }));
    assert_eq!((tail.logical, tail.len), (2 * bs, 100));

    let map = image.resolve(b"/blockmap").unwrap();
    let hole = image.map(&map, 2 * bs + 5).unwrap();
    assert_eq!(
        (hole.logical, hole.len, hole.kind),
        (2 * bs, 2 * bs, ExtentKind::Hole)
    );
    let last = image.map(&map, map.size - 1).unwrap();
    assert_eq!((last.logical, last.len), (6 * bs, bs + 17));

    let indexes = image.resolve(b"/indexes").unwrap();
    let kinds: Vec<_> = (0..6)
        .map(|i| image.map(&indexes, i * bs).unwrap().kind)
        .collect();
    assert!(matches!(
        kinds[0],
        ExtentKind::Mapped {
            device: 1,
            physical: 0
        }
    ));
    assert_eq!(kinds[1], ExtentKind::Hole);
    assert!(matches!(kinds[2], ExtentKind::Mapped { device: 0, .. }));
    assert!(matches!(kinds[3], ExtentKind::Mapped { device: 1, physical } if physical == bs));

    let nulladdr = image.resolve(b"/nulladdr").unwrap();
    assert_eq!(image.map(&nulladdr, 0).unwrap().kind, ExtentKind::Hole);

    let symlink = image.resolve(b"/symlink").unwrap();
    assert_eq!(image.readlink(&symlink).unwrap(), b"target/of/link");
    let tty = image.resolve(b"/tty").unwrap();
    assert_eq!((tty.file_type(), tty.rdev), (FileType::CharDevice, (4, 64)));

    let sub = image.resolve(b"/sub").unwrap();
    assert_eq!((sub.mtime, sub.mtime_nsec), (1_600_000_000, 0));
    let entries = image.read_dir(&sub).unwrap();
    assert_eq!(entries.len(), 102);
    if bs < 4096 {
        assert!(sub.size > bs, "the directory should span blocks");
    }
    for entry in &entries {
        assert_eq!(image.lookup(&sub, &entry.name).unwrap(), Some(entry.nid));
    }
    for absent in [
        &b"file-"[..],
        b"file-00",
        b"file-99-paddinh",
        b"file-30-paddinh",
        b"+",
        b"zz",
    ] {
        assert_eq!(image.lookup(&sub, absent).unwrap(), None);
    }
    assert_eq!(image.resolve(b"/sub/..").unwrap().nid, image.root_nid());
}

#[test]
fn every_block_size_reads_back_with_a_separate_device() {
    for bs in [512, 1024, 2048, 4096] {
        let built = build(bs, false);
        let mut image = Image::open(Box::new(built.image.clone())).unwrap();
        assert_eq!(image.superblock().block_size as usize, bs);
        // Without the device, only its chunks fail, naming the slot and tag.
        let indexes = image.resolve(b"/indexes").unwrap();
        match read_all(&image, &indexes) {
            Err(Error::MissingDevice { index: 0, tag }) => assert_eq!(tag.as_bytes(), BLOB_TAG),
            other => panic!("bs {bs}: expected MissingDevice, got {other:?}"),
        }
        image.set_device(0, Box::new(built.blob.clone()));
        check_contents(&image, &built);
        check_metadata(&image);
    }
}

#[test]
fn flat_mode_reads_the_device_from_the_primary() {
    for bs in [512, 4096] {
        let built = build(bs, true);
        let image = Image::open(Box::new(built.image.clone())).unwrap();
        check_contents(&image, &built);
        check_metadata(&image);

        // A separate device wins over flat mode once given.
        let cut = built.image[..built.flat_at.unwrap()].to_vec();
        let mut separate = Image::open(Box::new(cut.clone())).unwrap();
        separate.set_device(0, Box::new(built.blob.clone()));
        check_contents(&separate, &built);

        // Flat mode without the appended blob: a read error, never zeros.
        let missing = Image::open(Box::new(cut)).unwrap();
        let indexes = missing.resolve(b"/indexes").unwrap();
        assert!(matches!(
            read_all(&missing, &indexes),
            Err(Error::Io { .. })
        ));
    }
}

/// A minimal image: root with one file "f" built from `spec_of`, and a 3-entry subdir.
fn single(bs: usize, spec_of: impl FnOnce(&mut Asm) -> InodeSpec) -> Vec<u8> {
    single_with(bs, spec_of, |_| {})
}

fn single_with(
    bs: usize,
    spec_of: impl FnOnce(&mut Asm) -> InodeSpec,
    tweak: impl FnOnce(&mut Asm),
) -> Vec<u8> {
    let mut asm = Asm::new(bs, 8192 / bs);
    let root = asm.reserve(32);
    let spec = spec_of(&mut asm);
    let file_type = FileType::from_mode(spec.mode).unwrap_or(FileType::Regular);
    let file = asm.inode(&spec);
    let mut entries = dot_entries(root, root);
    entries.push((b"f".to_vec(), file, file_type));
    let spec = asm.dir(entries);
    asm.write_inode(root, &spec);
    tweak(&mut asm);
    asm.finish(root)
}

fn open(bytes: Vec<u8>) -> Result<Image, Error> {
    Image::open(Box::new(bytes))
}

fn file_of(image: &Image) -> Result<Inode, Error> {
    image.resolve(b"/f")
}

fn expect_corrupt<T: std::fmt::Debug>(result: Result<T, Error>, needle: &str) {
    match result {
        Err(Error::Corrupt(msg)) if msg.contains(needle) => {}
        other => panic!("expected Corrupt mentioning {needle:?}, got {other:?}"),
    }
}

fn expect_unsupported<T: std::fmt::Debug>(result: Result<T, Error>, needle: &str) {
    match result {
        Err(Error::Unsupported(msg)) if msg.contains(needle) => {}
        other => panic!("expected Unsupported mentioning {needle:?}, got {other:?}"),
    }
}

fn plain_file(asm: &mut Asm) -> InodeSpec {
    asm.inline(0o100644, b"data")
}

fn patch_sb(mut image: Vec<u8>, offset: usize, bytes: &[u8]) -> Vec<u8> {
    image[1024 + offset..1024 + offset + bytes.len()].copy_from_slice(bytes);
    common::asm::refresh_checksum(&mut image);
    image
}

#[test]
fn superblock_rules() {
    let good = single(4096, plain_file);
    assert!(open(good.clone()).is_ok());
    expect_corrupt(open(patch_sb(good.clone(), 0, &[0; 4])), "magic");
    let mut bad_sum = good.clone();
    bad_sum[1024 + 100] ^= 1;
    expect_corrupt(open(bad_sum), "checksum");
    // The checksum covers the rest of the block too (here: the root inode).
    let mut bad_sum = good.clone();
    bad_sum[3000] ^= 1;
    expect_corrupt(open(bad_sum), "checksum");
    expect_unsupported(open(patch_sb(good.clone(), 12, &[13])), "blkszbits");
    expect_unsupported(open(patch_sb(good.clone(), 12, &[8])), "blkszbits");
    expect_corrupt(open(patch_sb(good.clone(), 90, &[1])), "dirblkbits");
    expect_unsupported(
        open(patch_sb(good.clone(), 80, &0x84u32.to_le_bytes())),
        "0x80",
    );
    expect_corrupt(open(patch_sb(good.clone(), 64, &[b'a'; 16])), "volume_name");
    expect_corrupt(open(patch_sb(good.clone(), 13, &[190])), "sb_extslots");
    let file_nid = open(good.clone()).unwrap().resolve(b"/f").unwrap().nid;
    expect_corrupt(
        open(patch_sb(good.clone(), 14, &(file_nid as u16).to_le_bytes())),
        "not a directory",
    );
    // A truncated image is an I/O error, not zeros.
    assert!(matches!(open(good[..1100].to_vec()), Err(Error::Io { .. })));
}

#[test]
fn inode_rules() {
    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.format_extra = 0x10;
        spec
    }))
    .unwrap();
    expect_unsupported(file_of(&image), "i_format");

    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.layout = 5;
        spec
    }))
    .unwrap();
    expect_unsupported(file_of(&image), "layout");

    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.mode = 0o170644;
        spec
    }))
    .unwrap();
    expect_corrupt(file_of(&image), "i_mode");

    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.extended = true;
        spec.size = 1 << 63;
        spec
    }))
    .unwrap();
    expect_corrupt(file_of(&image), "negative");

    let image = open(single(4096, |asm| {
        let mut spec = asm.block_map(&[1; 4096], 0, &[]);
        spec.u |= 0x40;
        spec
    }))
    .unwrap();
    expect_unsupported(file_of(&image), "chunk format");

    let image = open(single(4096, |_| InodeSpec::new(0o10644, 5))).unwrap();
    let fifo = file_of(&image).unwrap();
    expect_corrupt(image.map(&fifo, 0), "special file");

    let image = open(single(4096, |asm| asm.plain(0o120777, &[b'a'; 5000]))).unwrap();
    expect_corrupt(image.readlink(&file_of(&image).unwrap()), "target");

    // Compressed data is refused by name, metadata still reads.
    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.layout = 3;
        spec
    }))
    .unwrap();
    let compressed = file_of(&image).unwrap();
    expect_unsupported(image.read_at(&compressed, 0, &mut [0; 4]), "compressed");
}

#[test]
fn data_rules() {
    // An inline tail that would cross its block.
    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.size = 4000;
        spec
    }))
    .unwrap();
    let file = file_of(&image).unwrap();
    expect_corrupt(image.read_at(&file, 0, &mut [0; 10]), "crosses a block");

    // A device id beyond the table (masked with 3 for two devices).
    let image = open(single_with(
        4096,
        |asm| asm.chunk_indexes(4096, 0, &[Some((3, 0))]),
        |asm| {
            asm.devices = vec![(b"a".to_vec(), 1, 0), (b"b".to_vec(), 1, 0)];
        },
    ))
    .unwrap();
    let file = file_of(&image).unwrap();
    expect_corrupt(image.map(&file, 0), "device_id 3");

    // Data past the end of the primary: an I/O error, never zeros.
    let image = open(single(4096, |asm| {
        let mut spec = asm.plain(0o100644, &[7; 8192]);
        spec.u = 1000;
        spec
    }))
    .unwrap();
    let file = file_of(&image).unwrap();
    assert!(matches!(
        image.read_at(&file, 0, &mut [0; 10]),
        Err(Error::Io { .. })
    ));

    // Data past the end of an extra device: the same.
    let mut image = open(single_with(
        4096,
        |asm| asm.chunk_indexes(8192, 0, &[Some((1, 0)), Some((1, 1))]),
        |asm| asm.devices = vec![(b"d".to_vec(), 2, 0)],
    ))
    .unwrap();
    image.set_device(0, Box::new(vec![7u8; 4096]));
    let file = file_of(&image).unwrap();
    let mut buf = vec![0u8; 8192];
    assert!(matches!(
        image.read_at(&file, 0, &mut buf),
        Err(Error::Io { .. })
    ));
    assert_eq!(image.read_at(&file, 0, &mut buf[..4096]).unwrap(), 4096);
    assert!(buf[..4096].iter().all(|&b| b == 7));
}

#[test]
fn xattr_rules() {
    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.icount_override = Some(1);
        spec
    }))
    .unwrap();
    expect_unsupported(image.xattrs(&file_of(&image).unwrap()), "xattr_icount 1");

    // An entry whose value runs past the xattr area.
    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.xattrs = vec![(xattr_index::USER, b"a".to_vec(), b"bcd".to_vec())];
        spec.icount_override = Some(2);
        spec
    }))
    .unwrap();
    expect_corrupt(image.xattrs(&file_of(&image).unwrap()), "overflows");

    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.shared = vec![0];
        spec.icount_override = Some(1 + 1);
        spec.xattrs = vec![];
        spec
    }))
    .unwrap();
    // 12-byte header + 1 shared id = icount 2: valid, the id points at a zeroed entry.
    assert!(image.xattrs(&file_of(&image).unwrap()).is_ok());

    let image = open(single(4096, |asm| {
        let mut spec = plain_file(asm);
        spec.shared = vec![0, 0, 0];
        spec.icount_override = Some(2);
        spec
    }))
    .unwrap();
    expect_corrupt(image.xattrs(&file_of(&image).unwrap()), "shared xattr ids");

    // A long prefix record of length 0 (65536) fails the open, like the mount.
    let mut bytes = single_with(4096, plain_file, |asm| {
        asm.prefixes = vec![(xattr_index::TRUSTED, b"overlay.".to_vec())];
    });
    bytes[1664..1666].copy_from_slice(&0u16.to_le_bytes());
    common::asm::refresh_checksum(&mut bytes);
    expect_corrupt(open(bytes), "long xattr prefix");
}

#[test]
fn directory_rules() {
    let bs = 4096;
    // Mis-sorted names.
    let mut asm = Asm::new(bs, 2);
    let root = asm.reserve(32);
    let file = asm.inode(&InodeSpec::new(0o100644, 0));
    let mut data = dir_data(bs, {
        let mut e = dot_entries(root, root);
        e.push((b"aa".to_vec(), file, FileType::Regular));
        e.push((b"bb".to_vec(), file, FileType::Regular));
        e
    });
    // The names area is ". .. aa bb": swap the last two names.
    let names_at = data.len() - 4;
    data[names_at..].copy_from_slice(b"bbaa");
    let mut spec = asm.plain(0o40755, &data);
    spec.nlink = 2;
    asm.write_inode(root, &spec);
    let image = open(asm.finish(root)).unwrap();
    let root_inode = image.inode(image.root_nid()).unwrap();
    expect_corrupt(image.read_dir(&root_inode), "not sorted");

    // nameoff0 of 0 and names that run out of the block.
    for (offset, value) in [(8usize, 0u16), (8, 13), (8, 4096), (20, 5000)] {
        let mut asm = Asm::new(bs, 2);
        let root = asm.reserve(32);
        let mut data = dir_data(bs, dot_entries(root, root));
        data[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
        let mut spec = asm.plain(0o40755, &data);
        spec.nlink = 2;
        asm.write_inode(root, &spec);
        // The root must still open (inode load does not read its blocks).
        let image = open(asm.finish(root)).unwrap();
        let root_inode = image.inode(image.root_nid()).unwrap();
        assert!(
            matches!(image.read_dir(&root_inode), Err(Error::Corrupt(_))),
            "{offset} {value}"
        );
        assert!(matches!(
            image.lookup(&root_inode, b"x"),
            Err(Error::Corrupt(_)) | Ok(None)
        ));
    }

    // read_dir of a non-directory.
    let image = open(single(bs, plain_file)).unwrap();
    assert!(matches!(
        image.read_dir(&file_of(&image).unwrap()),
        Err(Error::NotADirectory(_))
    ));
}
