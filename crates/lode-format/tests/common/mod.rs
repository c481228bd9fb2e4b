//! Fixtures shared by the reader tests and the CLI tests (included there with `#[path]`):
//! a source tree holding every kind of file EROFS can store, `mkfs.erofs` wrappers, and
//! scanners that turn a directory tree or an EROFS image into maps that can be compared.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use lode_format::format::FileType;
use lode_format::reader::Image;
use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags, CWD};

/// Finds a tool from erofs-utils; a missing one fails the test (never skips it).
pub fn require_tool(name: &str) -> PathBuf {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found: run scripts/setup.sh (it installs erofs-utils) and retry")
        })
}

/// Runs `mkfs.erofs [args] image src` and panics with its output on failure.
pub fn mkfs(image: &Path, src: &Path, args: &[&str]) {
    let output = Command::new(require_tool("mkfs.erofs"))
        .args(args)
        .arg("--quiet")
        .arg(image)
        .arg(src)
        .output()
        .expect("running mkfs.erofs");
    assert!(
        output.status.success(),
        "mkfs.erofs {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn path_of(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

fn write_file(root: &Path, rel: &[u8], data: &[u8]) {
    fs::write(path_of(root, rel), data).unwrap();
}

fn set_xattr(root: &Path, rel: &[u8], name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path_of(root, rel), name, value, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", String::from_utf8_lossy(rel)));
}

fn chown(root: &Path, rel: &[u8], uid: u32, gid: u32) {
    rustix::fs::chownat(
        CWD,
        path_of(root, rel),
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn chmod(root: &Path, rel: &[u8], mode: u32) {
    fs::set_permissions(path_of(root, rel), fs::Permissions::from_mode(mode)).unwrap();
}

fn mknod(root: &Path, rel: &[u8], kind: rustix::fs::FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        CWD,
        path_of(root, rel),
        kind,
        Mode::from_raw_mode(0o640),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

/// The name of the 5000-entry directory in [`populate`].
pub const BIG_DIR: &str = "bigdir";

/// The longest name mkfs.erofs 1.5 handles: it truncates 255-byte names when it builds the
/// source path and then fails, so 255-byte names are covered by the hand-made images.
pub fn long_name() -> Vec<u8> {
    vec![b'n'; 254]
}

/// Fills `root` (an existing empty directory) with the full fixture tree. Needs root
/// privileges (device nodes, chown, trusted.* xattrs).
pub fn populate(root: &Path) {
    populate_files(root, true);
}

/// A small tree for the corruption test: a bit of everything, few blocks.
pub fn populate_small(root: &Path) {
    populate_files(root, false);
}

fn populate_files(root: &Path, full: bool) {
    for (name, len) in [
        ("empty", 0usize),
        ("one", 1),
        ("f4095", 4095),
        ("f4096", 4096),
        ("f4097", 4097),
    ] {
        write_file(root, name.as_bytes(), &pseudo_random(len, len as u64));
    }
    if full {
        write_file(root, b"big", &pseudo_random((1 << 20) + 3, 7));
        // 8 MiB with data at 3 MiB and in the last block, holes elsewhere.
        let sparse = fs::File::create(root.join("sparse")).unwrap();
        sparse.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        sparse.write_all_at(b"island", 3 << 20).unwrap();
        sparse.write_all_at(b"end", (8 << 20) - 3).unwrap();
    }

    std::os::unix::fs::symlink("one", root.join("short_link")).unwrap();
    let long_target: String = "dir/".repeat(999) + "tgt";
    assert_eq!(long_target.len(), 3999);
    std::os::unix::fs::symlink(&long_target, root.join("long_link")).unwrap();

    fs::create_dir(root.join("sub")).unwrap();
    write_file(root, b"hl_a", b"hard linked content\n");
    fs::hard_link(root.join("hl_a"), root.join("sub/hl_b")).unwrap();
    fs::hard_link(root.join("hl_a"), root.join("sub/hl_c")).unwrap();

    fs::create_dir(root.join("dev")).unwrap();
    mknod(
        root,
        b"dev/null",
        rustix::fs::FileType::CharacterDevice,
        1,
        3,
    );
    mknod(root, b"dev/sda1", rustix::fs::FileType::BlockDevice, 8, 1);
    mknod(
        root,
        b"dev/big_numbers",
        rustix::fs::FileType::CharacterDevice,
        300,
        70000,
    );
    mknod(root, b"dev/fifo", rustix::fs::FileType::Fifo, 0, 0);
    drop(std::os::unix::net::UnixListener::bind(root.join("dev/socket")).unwrap());

    write_file(root, b"setuid", b"#!/bin/sh\n");
    chmod(root, b"setuid", 0o4755);
    write_file(root, b"setgid_noexec", b"x");
    chmod(root, b"setgid_noexec", 0o2640);
    write_file(root, b"mode_000", b"secret");
    chmod(root, b"mode_000", 0o000);
    fs::create_dir(root.join("sticky")).unwrap();
    chmod(root, b"sticky", 0o1777);
    fs::create_dir(root.join("setgid_dir")).unwrap();
    chmod(root, b"setgid_dir", 0o2755);

    write_file(root, b"big_ids", b"owned by a high uid");
    chown(root, b"big_ids", 100_000, 200_000);
    chown(root, b"sub", 65_536, 70_000);
    chown(root, b"short_link", 1234, 5678);

    write_file(root, b"x_user", b"xattrs");
    set_xattr(root, b"x_user", "user.foo", b"bar");
    set_xattr(root, b"x_user", "user.empty", b"");
    set_xattr(root, b"x_user", "user.big", &pseudo_random(3000, 3));
    set_xattr(root, b"sub", "trusted.overlay.opaque", b"y");
    set_xattr(root, b"short_link", "trusted.link", b"on a symlink");
    write_file(root, b"x_cap", b"\x7fELF");
    // A v2 vfs_cap_data: magic 0x02000000 | effective, permitted = CAP_NET_BIND_SERVICE.
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    set_xattr(root, b"x_cap", "security.capability", &cap);
    // The same xattr on several inodes: mkfs stores it once as a shared xattr.
    for name in ["shared_1", "shared_2", "shared_3"] {
        write_file(root, name.as_bytes(), name.as_bytes());
        set_xattr(
            root,
            name.as_bytes(),
            "user.shared",
            b"one value, many inodes",
        );
        set_xattr(root, name.as_bytes(), "trusted.shared", b"also shared");
    }
    set_xattr(root, b"shared_1", "user.own", b"inline next to shared");

    write_file(root, &long_name(), b"255-byte name");
    write_file(root, b"\xff\xfe non-utf8 \x80", b"latin1");
    write_file(root, b"-sorts-before-dot", b"-");
    write_file(root, b"with\nnewline and space", b"nl");

    let dir_entries = if full { 5000 } else { 40 };
    fs::create_dir(root.join(BIG_DIR)).unwrap();
    for i in 0..dir_entries {
        let name = format!("{BIG_DIR}/entry-{i:05}");
        if i % 1000 == 999 {
            fs::create_dir(root.join(&name)).unwrap();
        } else {
            write_file(root, name.as_bytes(), &pseudo_random(i % 7, i as u64));
        }
    }

    set_times_deepest_first(root);
}

/// Gives every entry a distinct mtime with nanoseconds, contents before their directory.
fn set_times_deepest_first(root: &Path) {
    let mut paths = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        paths.push(dir.clone());
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                paths.push(entry.path());
            }
        }
    }
    for (i, path) in paths.iter().enumerate().rev() {
        let time = Timespec {
            tv_sec: 1_500_000_000 + i as i64 * 1000,
            tv_nsec: ((i as i64 * 7_919_123) % 1_000_000_000) as _,
        };
        let times = Timestamps {
            last_access: time,
            last_modification: time,
        };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }
}

/// What is compared for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub file_type: FileType,
    /// Including the type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// 0 for directories (their sizes differ between filesystems).
    pub size: u64,
    pub mtime: (i64, u32),
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub target: Option<Vec<u8>>,
    pub content: Option<Vec<u8>>,
    /// Inode number or nid, only to check which paths share an inode.
    #[doc(hidden)]
    pub identity: u64,
}

pub type Tree = BTreeMap<Vec<u8>, Node>;

fn list_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 1 << 16];
    let len = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 1 << 16];
        let value_len =
            rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..]).unwrap();
        value.truncate(value_len);
        out.insert(name.to_vec(), value);
    }
    out
}

/// Scans a directory tree on the host; keys are "/"-rooted paths ("/" is the root).
pub fn scan_dir(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut pending = vec![(b"/".to_vec(), root.to_path_buf())];
    while let Some((rel, path)) = pending.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let file_type = FileType::from_mode(meta.mode()).unwrap();
        let rdev = match file_type {
            FileType::CharDevice | FileType::BlockDevice => (
                rustix::fs::major(meta.rdev()),
                rustix::fs::minor(meta.rdev()),
            ),
            _ => (0, 0),
        };
        let node = Node {
            file_type,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            size: if meta.is_dir() { 0 } else { meta.size() },
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            nlink: meta.nlink() as u32,
            rdev,
            xattrs: list_xattrs(&path),
            target: meta.is_symlink().then(|| {
                fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            }),
            content: meta.is_file().then(|| fs::read(&path).unwrap()),
            identity: meta.ino(),
        };
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                let mut child = rel.clone();
                if child.len() > 1 {
                    child.push(b'/');
                }
                child.extend_from_slice(entry.file_name().as_bytes());
                pending.push((child, entry.path()));
            }
        }
        tree.insert(rel, node);
    }
    tree
}

/// Scans an EROFS image with the reader, in the same form as [`scan_dir`].
pub fn scan_image(image: &Image) -> Tree {
    let mut tree = Tree::new();
    let root = image.inode(image.root_nid()).unwrap();
    let mut pending = vec![(b"/".to_vec(), root)];
    while let Some((rel, inode)) = pending.pop() {
        let file_type = inode.file_type();
        let content = inode.is_regular().then(|| {
            let mut data = vec![0u8; inode.size as usize];
            // Odd piece sizes exercise reads that straddle blocks and chunks.
            let mut offset = 0;
            while offset < data.len() {
                let end = (offset + 70_001).min(data.len());
                let got = image
                    .read_at(&inode, offset as u64, &mut data[offset..end])
                    .unwrap();
                assert_eq!(
                    got,
                    end - offset,
                    "short read of {}",
                    String::from_utf8_lossy(&rel)
                );
                offset = end;
            }
            data
        });
        let node = Node {
            file_type,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            size: if inode.is_dir() { 0 } else { inode.size },
            mtime: (inode.mtime, inode.mtime_nsec),
            nlink: inode.nlink,
            rdev: inode.rdev,
            xattrs: image.xattrs(&inode).unwrap().into_iter().collect(),
            target: inode.is_symlink().then(|| image.readlink(&inode).unwrap()),
            content,
            identity: inode.nid,
        };
        if inode.is_dir() {
            for entry in image.read_dir(&inode).unwrap() {
                if entry.name == b"." || entry.name == b".." {
                    continue;
                }
                let child_inode = image.inode(entry.nid).unwrap();
                assert_eq!(
                    entry.file_type,
                    child_inode.file_type(),
                    "dirent type of {}",
                    String::from_utf8_lossy(&entry.name)
                );
                let mut child = rel.clone();
                if child.len() > 1 {
                    child.push(b'/');
                }
                child.extend_from_slice(&entry.name);
                pending.push((child, child_inode));
            }
        }
        tree.insert(rel, node);
    }
    tree
}

/// Groups paths by identity: the set of hard-link groups with more than one path.
fn link_groups(tree: &Tree) -> BTreeSet<BTreeSet<Vec<u8>>> {
    let mut by_identity: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (path, node) in tree {
        if node.file_type != FileType::Directory {
            by_identity
                .entry(node.identity)
                .or_default()
                .insert(path.clone());
        }
    }
    by_identity
        .into_values()
        .filter(|group| group.len() > 1)
        .collect()
}

/// Asserts two scans are equal, path by path, plus hard-link identity. `adjust` may rewrite
/// an expected node first (e.g. to the mtime mkfs gives compact inodes).
pub fn assert_trees_equal(expected: &Tree, actual: &Tree, adjust: impl Fn(&[u8], &mut Node)) {
    let expected_paths: BTreeSet<_> = expected.keys().collect();
    let actual_paths: BTreeSet<_> = actual.keys().collect();
    let show = |set: Vec<&&Vec<u8>>| {
        set.iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        expected_paths,
        actual_paths,
        "missing: {:?}, unexpected: {:?}",
        show(expected_paths.difference(&actual_paths).collect()),
        show(actual_paths.difference(&expected_paths).collect())
    );
    for (path, expected_node) in expected {
        let mut expected_node = expected_node.clone();
        adjust(path, &mut expected_node);
        let mut actual_node = actual[path].clone();
        expected_node.identity = 0;
        actual_node.identity = 0;
        if expected_node != actual_node {
            // Keep the message readable: no file contents.
            let same_content = expected_node.content == actual_node.content;
            expected_node.content = None;
            actual_node.content = None;
            panic!(
                "{} differs (content equal: {same_content}):\nexpected {expected_node:?}\nactual   {actual_node:?}",
                String::from_utf8_lossy(path)
            );
        }
    }
    assert_eq!(
        link_groups(expected),
        link_groups(actual),
        "hard-link groups differ"
    );
}

pub mod asm;
