//! Random directory trees: a plain-data description ([`TreeSpec`]), a proptest strategy
//! ([`tree_strategy`]) and [`materialize`] to create one on disk.
//!
//! A [`TreeSpec`] is a flat list of entries in creation order; every entry's parent directory
//! appears before it, and a [`EntryKind::HardLink`] names an earlier non-directory entry. File
//! content is described, not stored ([`FileData`]): a size plus data chunks whose bytes are
//! generated deterministically, so multi-MiB files cost nothing to generate or shrink.
//!
//! [`materialize`] needs root (chown, mknod, `trusted.*` xattrs). It sets, per entry: owner,
//! then mode (chown clears setuid/setgid), then xattrs (`security.capability` last, after
//! chown, which would clear it), then atime = mtime. Hard links are made after all other
//! non-directories, and directory metadata (including mtimes) is applied last, deepest first.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags, CWD};

/// Earliest mtime seconds generated: 1902-01-01T00:00:00Z (ext4 stores down to 1901-12-13).
pub const MIN_MTIME_SEC: i64 = -2_145_916_800;
/// Latest mtime seconds generated: 2399-12-31T23:59:59Z (ext4 stores up to 2446-05-10).
pub const MAX_MTIME_SEC: i64 = 13_569_465_599;
/// Largest major number the kernel's dev_t encoding (and EROFS's u32 rdev) can hold.
pub const MAX_MAJOR: u32 = (1 << 12) - 1;
/// Largest minor number the kernel's dev_t encoding can hold.
pub const MAX_MINOR: u32 = (1 << 20) - 1;

/// Metadata applied to an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`& 0o7777`). Ignored for symlinks
    /// (Linux symlinks are always 0o777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    /// 0..1_000_000_000
    pub mtime_nsec: u32,
    /// Full xattr names (with namespace prefix, e.g. `user.foo`) and values, set in order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// root:root, given mode, mtime 2021-01-01T00:00:00.5Z, no xattrs.
    pub fn simple(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime_sec: 1_609_459_200,
            mtime_nsec: 500_000_000,
            xattrs: Vec::new(),
        }
    }
}

/// How the bytes of a [`Chunk`] are generated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Fill {
    /// Explicitly written zero bytes (not a hole).
    Zero,
    /// One repeated byte.
    Byte(u8),
    /// Incompressible pseudo-random bytes; byte `i` of the chunk depends only on `(seed, i)`,
    /// so equal seeds give equal (block-dedupable) content.
    Random(u64),
    /// Compressible text: fixed 64-byte lines that depend on `(seed, line number)`.
    Text(u64),
}

impl Fill {
    /// Fill `buf` with the bytes at `chunk_offset..chunk_offset + buf.len()` of a chunk.
    pub fn generate(&self, chunk_offset: u64, buf: &mut [u8]) {
        match *self {
            Fill::Zero => buf.fill(0),
            Fill::Byte(b) => buf.fill(b),
            Fill::Random(seed) => {
                let mut pos = chunk_offset;
                let mut i = 0;
                while i < buf.len() {
                    let word = splitmix64(seed ^ (pos / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let bytes = word.to_le_bytes();
                    let start = (pos % 8) as usize;
                    let n = (8 - start).min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
                    i += n;
                    pos += n as u64;
                }
            }
            Fill::Text(seed) => {
                const WORDS: [&str; 8] = [
                    "lorem", "ipsum", "dolor", "sit", "amet", "erofs", "lode", "layer",
                ];
                let mut pos = chunk_offset;
                let mut i = 0;
                let mut line = Vec::with_capacity(64);
                let mut line_no = u64::MAX;
                while i < buf.len() {
                    if pos / 64 != line_no {
                        line_no = pos / 64;
                        line.clear();
                        let h = splitmix64(seed.wrapping_add(line_no));
                        let _ = write!(
                            line,
                            "{:08} {} {} {} {:x}",
                            line_no % 100_000_000,
                            WORDS[(h & 7) as usize],
                            WORDS[((h >> 3) & 7) as usize],
                            WORDS[((h >> 6) & 7) as usize],
                            seed % 4096
                        );
                        line.resize(63, b' ');
                        line.push(b'\n');
                    }
                    let start = (pos % 64) as usize;
                    let n = (64 - start).min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&line[start..start + n]);
                    i += n;
                    pos += n as u64;
                }
            }
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A run of generated bytes inside a file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub fill: Fill,
}

/// The content of a regular file: `size` bytes, zero except inside `chunks`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileData {
    pub size: u64,
    /// Sorted by offset, non-overlapping, inside `0..size`.
    pub chunks: Vec<Chunk>,
    /// If true the file is extended with `set_len` and only the chunks are written, so gaps
    /// between chunks are real holes (at filesystem-block granularity). If false every byte
    /// is written.
    pub sparse: bool,
}

impl FileData {
    /// A file of `size` pseudo-random bytes.
    pub fn random(size: u64, seed: u64) -> FileData {
        FileData {
            size,
            chunks: if size == 0 {
                Vec::new()
            } else {
                vec![Chunk {
                    offset: 0,
                    len: size,
                    fill: Fill::Random(seed),
                }]
            },
            sparse: false,
        }
    }

    /// A file holding exactly `bytes`.
    pub fn bytes(bytes: &[u8]) -> FileData {
        // Stored as one Byte chunk per run; fine for the short literal contents this is for.
        let mut chunks: Vec<Chunk> = Vec::new();
        for (i, &b) in bytes.iter().enumerate() {
            match chunks.last_mut() {
                Some(c) if c.fill == Fill::Byte(b) && c.offset + c.len == i as u64 => c.len += 1,
                _ => chunks.push(Chunk {
                    offset: i as u64,
                    len: 1,
                    fill: Fill::Byte(b),
                }),
            }
        }
        FileData {
            size: bytes.len() as u64,
            chunks,
            sparse: false,
        }
    }

    /// Fill `buf` with the file's bytes at `offset..offset + buf.len()` (zeros past EOF).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for c in &self.chunks {
            let (cs, ce) = (c.offset, c.offset + c.len);
            if ce <= offset || cs >= end {
                continue;
            }
            let s = cs.max(offset);
            let e = ce.min(end);
            c.fill.generate(
                s - cs,
                &mut buf[(s - offset) as usize..(e - offset) as usize],
            );
        }
    }

    /// The whole content in memory (for small files in tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.size as usize];
        self.read_at(0, &mut v);
        v
    }

    fn write_to(&self, f: &File) -> io::Result<()> {
        const BUF: usize = 1 << 20;
        let mut buf = vec![0u8; BUF];
        if self.sparse {
            f.set_len(self.size)?;
            for c in &self.chunks {
                let mut done = 0;
                while done < c.len {
                    let n = (c.len - done).min(BUF as u64) as usize;
                    c.fill.generate(done, &mut buf[..n]);
                    f.write_all_at(&buf[..n], c.offset + done)?;
                    done += n as u64;
                }
            }
        } else {
            let mut pos = 0;
            while pos < self.size {
                let n = (self.size - pos).min(BUF as u64) as usize;
                self.read_at(pos, &mut buf[..n]);
                f.write_all_at(&buf[..n], pos)?;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(FileData),
    /// Target bytes (non-empty, no NUL, < 4096 bytes).
    Symlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// A unix socket file (made by binding a listener and dropping it).
    Socket,
    /// Another name for an earlier non-directory entry (relative path). The entry's own
    /// [`Meta`] is ignored: the inode's metadata is the target's.
    HardLink(PathBuf),
}

/// One entry of a [`TreeSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative path (raw bytes; components are never `.`/`..`/empty).
    pub path: PathBuf,
    pub kind: EntryKind,
    pub meta: Meta,
}

/// A directory tree to create with [`materialize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeSpec {
    /// Metadata of the root directory itself.
    pub root: Meta,
    /// Entries in creation order: parents before children, hard-link targets before links.
    pub entries: Vec<Entry>,
}

impl TreeSpec {
    /// Number of regular files (not counting hard links).
    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File(_)))
            .count()
    }

    /// Sum of regular-file sizes (each inode once).
    pub fn total_file_size(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File(d) => d.size,
                _ => 0,
            })
            .sum()
    }

    /// A small fixed tree with one of every kind of entry and most edge cases (odd modes,
    /// big ids, pre-1970 and far-future mtimes, xattrs in every namespace incl.
    /// `security.capability`, non-UTF-8 and 255-byte names, holes, hard links across dirs,
    /// dangling and long symlinks, devices with minor > 255).
    pub fn kitchen_sink() -> TreeSpec {
        fn m(mode: u32, uid: u32, gid: u32, sec: i64, nsec: u32) -> Meta {
            Meta {
                mode,
                uid,
                gid,
                mtime_sec: sec,
                mtime_nsec: nsec,
                xattrs: Vec::new(),
            }
        }
        fn e(path: &[u8], kind: EntryKind, meta: Meta) -> Entry {
            Entry {
                path: PathBuf::from(OsStr::from_bytes(path)),
                kind,
                meta,
            }
        }
        let long_name = vec![b'L'; 255];
        let mut odd_name = b"caf\xe9-\xff\xfe-name".to_vec();
        odd_name.extend_from_slice(b" with spaces\n");
        let mut long_path = b"dir/".to_vec();
        long_path.extend_from_slice(&long_name);
        let mut long_target = Vec::new();
        while long_target.len() < 3000 {
            long_target.extend_from_slice(b"../some-long-component");
        }
        let mut dir_meta = m(0o2755, 1000, 1000, 1_700_000_000, 123_456_789);
        dir_meta
            .xattrs
            .push((b"user.dir".to_vec(), b"yes".to_vec()));
        let mut file_meta = m(0o4755, 70_000, 4_000_000_000, -1, 999_999_999);
        file_meta.xattrs = vec![
            (b"user.empty".to_vec(), Vec::new()),
            (b"trusted.t".to_vec(), vec![0, 1, 2, 255]),
            (b"security.lodetest".to_vec(), b"s".to_vec()),
            (
                b"security.capability".to_vec(),
                capability_v2(1 << 10 | 1 << 12, 0, true),
            ),
        ];
        let mut sym_meta = m(0o777, 5, 6, 4_102_444_800, 1);
        sym_meta
            .xattrs
            .push((b"trusted.on-symlink".to_vec(), b"v".to_vec()));
        let sparse = FileData {
            size: 3 << 20,
            chunks: vec![
                Chunk {
                    offset: 4096,
                    len: 100,
                    fill: Fill::Random(7),
                },
                Chunk {
                    offset: 1 << 20,
                    len: 65536,
                    fill: Fill::Zero,
                },
                Chunk {
                    offset: (2 << 20) + 1,
                    len: 8191,
                    fill: Fill::Text(3),
                },
            ],
            sparse: true,
        };
        TreeSpec {
            root: m(0o755, 0, 0, 1_600_000_000, 42),
            entries: vec![
                e(b"dir", EntryKind::Dir, dir_meta),
                e(
                    b"dir/sub",
                    EntryKind::Dir,
                    m(0o1777, 0, 0, MIN_MTIME_SEC, 0),
                ),
                e(
                    b"dir/sub/deeper",
                    EntryKind::Dir,
                    m(0o000, 65_536, 65_535, 0, 0),
                ),
                e(
                    b"empty",
                    EntryKind::File(FileData::random(0, 0)),
                    m(0o644, 0, 0, 1, 1),
                ),
                e(
                    b"tiny",
                    EntryKind::File(FileData::bytes(b"hello\n")),
                    m(0o600, 1, 2, 3, 4),
                ),
                e(
                    b"dir/4097",
                    EntryKind::File(FileData::random(4097, 1)),
                    file_meta,
                ),
                e(
                    b"dir/4097-dup",
                    EntryKind::File(FileData::random(4097, 1)),
                    Meta::simple(0o644),
                ),
                e(
                    b"dir/sub/sparse",
                    EntryKind::File(sparse),
                    m(0o6711, 0, 0, MAX_MTIME_SEC, 5),
                ),
                e(
                    b"all-hole",
                    EntryKind::File(FileData {
                        size: 1 << 20,
                        chunks: Vec::new(),
                        sparse: true,
                    }),
                    Meta::simple(0o444),
                ),
                e(
                    &long_path,
                    EntryKind::File(FileData::random(4096, 9)),
                    Meta::simple(0o640),
                ),
                e(
                    &odd_name,
                    EntryKind::File(FileData::random(17, 2)),
                    Meta::simple(0o664),
                ),
                e(
                    b"rel-link",
                    EntryKind::Symlink(b"dir/4097".to_vec()),
                    sym_meta,
                ),
                e(
                    b"abs-dangling",
                    EntryKind::Symlink(b"/nonexistent/\xff".to_vec()),
                    m(0, 0, 0, 9, 9),
                ),
                e(
                    b"dir/long-link",
                    EntryKind::Symlink(long_target),
                    Meta::simple(0o777),
                ),
                e(
                    b"chr",
                    EntryKind::CharDev { major: 1, minor: 3 },
                    Meta::simple(0o666),
                ),
                e(
                    b"dir/blk",
                    EntryKind::BlockDev {
                        major: 259,
                        minor: 70_000,
                    },
                    m(0o660, 0, 6, 1_000, 0),
                ),
                e(
                    b"fifo",
                    EntryKind::Fifo,
                    m(0o620, 3, 3, 1_234_567_890, 987_654_321),
                ),
                e(
                    b"dir/sub/sock",
                    EntryKind::Socket,
                    m(0o755, 0, 0, 2_000_000_000, 1),
                ),
                e(
                    b"hard-a",
                    EntryKind::HardLink(PathBuf::from("dir/4097")),
                    Meta::simple(0),
                ),
                e(
                    b"dir/sub/hard-b",
                    EntryKind::HardLink(PathBuf::from("dir/4097")),
                    Meta::simple(0),
                ),
                e(
                    b"fifo-link",
                    EntryKind::HardLink(PathBuf::from("fifo")),
                    Meta::simple(0),
                ),
            ],
        }
    }
}

/// A `security.capability` value in VFS_CAP_REVISION_2 format (20 bytes): low 32 bits of
/// permitted/inheritable in the first data word pair, the rest zero.
pub fn capability_v2(permitted: u64, inheritable: u64, effective: bool) -> Vec<u8> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x1;
    let magic = VFS_CAP_REVISION_2
        | if effective {
            VFS_CAP_FLAGS_EFFECTIVE
        } else {
            0
        };
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&magic.to_le_bytes());
    v.extend_from_slice(&(permitted as u32).to_le_bytes());
    v.extend_from_slice(&(inheritable as u32).to_le_bytes());
    v.extend_from_slice(&((permitted >> 32) as u32).to_le_bytes());
    v.extend_from_slice(&((inheritable >> 32) as u32).to_le_bytes());
    v
}

fn ctx(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("materialize: {what} {path:?}: {e}"))
}

fn to_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// Create `spec` under `dir` (created if missing; should be empty). Needs root.
pub fn materialize(spec: &TreeSpec, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir).map_err(|e| ctx(dir, "create root", e))?;
    let full = |p: &Path| dir.join(p);

    // 1. Directories and non-directories except hard links, in order.
    for entry in &spec.entries {
        let path = full(&entry.path);
        match &entry.kind {
            EntryKind::Dir => fs::create_dir(&path).map_err(|e| ctx(&path, "mkdir", e))?,
            EntryKind::File(data) => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| ctx(&path, "create", e))?;
                data.write_to(&f).map_err(|e| ctx(&path, "write", e))?;
            }
            EntryKind::Symlink(target) => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .map_err(|e| ctx(&path, "symlink", e))?
            }
            EntryKind::CharDev { major, minor } => {
                mknod(&path, FileType::CharacterDevice, *major, *minor)?
            }
            EntryKind::BlockDev { major, minor } => {
                mknod(&path, FileType::BlockDevice, *major, *minor)?
            }
            EntryKind::Fifo => mknod(&path, FileType::Fifo, 0, 0)?,
            EntryKind::Socket => make_socket(&path)?,
            EntryKind::HardLink(_) => continue,
        }
        if entry.kind != EntryKind::Dir {
            apply_meta(
                &path,
                &entry.meta,
                matches!(entry.kind, EntryKind::Symlink(_)),
            )?;
        }
    }
    // 2. Hard links.
    for entry in &spec.entries {
        if let EntryKind::HardLink(target) = &entry.kind {
            let path = full(&entry.path);
            // linkat(2) without AT_SYMLINK_FOLLOW: links a symlink itself.
            fs::hard_link(full(target), &path).map_err(|e| ctx(&path, "link", e))?;
        }
    }
    // 3. Directory metadata last (mtimes would change when children are added).
    for entry in spec.entries.iter().rev() {
        if entry.kind == EntryKind::Dir {
            apply_meta(&full(&entry.path), &entry.meta, false)?;
        }
    }
    apply_meta(dir, &spec.root, false)
}

fn mknod(path: &Path, ft: FileType, major: u32, minor: u32) -> io::Result<()> {
    rustix::fs::mknodat(
        CWD,
        path,
        ft,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(major, minor),
    )
    .map_err(|e| ctx(path, "mknod", to_io(e)))
}

/// Bind a unix socket at `path` and drop the listener; the socket file remains. sun_path is
/// limited to 108 bytes, so bind to a short temporary name through `/proc/self/fd/N/` of
/// the parent directory and rename it into place.
fn make_socket(path: &Path) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| ctx(path, "socket", io::ErrorKind::InvalidInput.into()))?;
    let dirfd = File::open(parent).map_err(|e| ctx(parent, "open dir", e))?;
    let tmp = format!(
        ".lode-sock-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    {
        use std::os::fd::AsRawFd;
        let via_proc = format!("/proc/self/fd/{}/{}", dirfd.as_raw_fd(), tmp);
        let listener = std::os::unix::net::UnixListener::bind(&via_proc)
            .map_err(|e| ctx(path, "bind socket", e))?;
        drop(listener);
    }
    rustix::fs::renameat(dirfd.as_fd(), tmp.as_str(), dirfd.as_fd(), name)
        .map_err(|e| ctx(path, "rename socket", to_io(e)))
}

fn apply_meta(path: &Path, meta: &Meta, is_symlink: bool) -> io::Result<()> {
    rustix::fs::chownat(
        CWD,
        path,
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ctx(path, "chown", to_io(e)))?;
    if !is_symlink {
        rustix::fs::chmodat(
            CWD,
            path,
            Mode::from_raw_mode(meta.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(|e| ctx(path, "chmod", to_io(e)))?;
    }
    let is_cap = |n: &[u8]| n == b"security.capability";
    for (name, value) in meta
        .xattrs
        .iter()
        .filter(|(n, _)| !is_cap(n))
        .chain(meta.xattrs.iter().filter(|(n, _)| is_cap(n)))
    {
        rustix::fs::lsetxattr(path, OsStr::from_bytes(name), value, XattrFlags::empty()).map_err(
            |e| {
                ctx(
                    path,
                    &format!(
                        "setxattr {:?} ({} bytes)",
                        OsStr::from_bytes(name),
                        value.len()
                    ),
                    to_io(e),
                )
            },
        )?;
    }
    let ts = Timespec {
        tv_sec: meta.mtime_sec,
        tv_nsec: meta.mtime_nsec as _,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ctx(path, "utimensat", to_io(e)))
}

// ---------------------------------------------------------------------------------------
// Strategy
// ---------------------------------------------------------------------------------------

/// Knobs for [`tree_strategy`].
#[derive(Clone, Debug)]
pub struct TreeParams {
    /// Upper bound on the number of entries (excluding the root).
    pub max_entries: usize,
    /// Maximum directory nesting (a directory at depth `max_depth` gets no subdirectories);
    /// at most 4 is sensible.
    pub max_depth: usize,
    /// Largest regular file generated. Big files are rare; most are ≤ 64 KiB.
    pub max_file_size: u64,
    /// Generate char/block devices, fifos and sockets.
    pub special_files: bool,
    /// Generate xattrs (user./trusted./security., incl. `security.capability`).
    pub xattrs: bool,
    /// Generate hard links.
    pub hardlinks: bool,
    /// Generate non-UTF-8 names and names of exactly 255 bytes (else short ASCII names).
    pub odd_names: bool,
    /// Random uid/gid/mode/mtime (else root:root, 0o644/0o755/0o777, one fixed mtime).
    pub odd_metadata: bool,
}

impl TreeParams {
    /// Few entries, files ≤ 64 KiB: fast enough for many proptest cases.
    pub fn small() -> TreeParams {
        TreeParams {
            max_entries: 24,
            max_file_size: 64 << 10,
            ..TreeParams::default()
        }
    }

    /// Like [`TreeParams::small`] but only plain dirs/files/symlinks with simple metadata.
    pub fn plain() -> TreeParams {
        TreeParams {
            special_files: false,
            xattrs: false,
            hardlinks: false,
            odd_names: false,
            odd_metadata: false,
            ..TreeParams::small()
        }
    }
}

impl Default for TreeParams {
    /// Up to 200 entries, files up to 4 MiB, everything enabled.
    fn default() -> TreeParams {
        TreeParams {
            max_entries: 200,
            max_depth: 4,
            max_file_size: 4 << 20,
            special_files: true,
            xattrs: true,
            hardlinks: true,
            odd_names: true,
            odd_metadata: true,
        }
    }
}

#[derive(Clone, Debug)]
enum KindBp {
    Dir,
    File {
        data: FileData,
        dup_of: Option<Index>,
        cap: Option<Vec<u8>>,
    },
    Symlink(SymlinkBp),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
    Socket,
    HardLink(Index),
}

#[derive(Clone, Debug)]
enum SymlinkBp {
    Literal(Vec<u8>),
    /// Relative path to an earlier entry (so the link resolves).
    ToEntry(Index),
}

#[derive(Clone, Debug)]
struct EntryBp {
    parent: Index,
    name: Vec<u8>,
    kind: KindBp,
    meta: Meta,
}

fn sanitize_name(mut v: Vec<u8>) -> Vec<u8> {
    for b in v.iter_mut() {
        if *b == b'/' || *b == 0 {
            *b = b'_';
        }
    }
    if v.is_empty() || v == b"." || v == b".." {
        v.insert(0, b'x');
    }
    v
}

fn name_strategy(odd: bool) -> BoxedStrategy<Vec<u8>> {
    let simple = "[a-z0-9][a-zA-Z0-9_.-]{0,11}".prop_map(String::into_bytes);
    if !odd {
        return simple.prop_map(sanitize_name).boxed();
    }
    prop_oneof![
        8 => simple,
        2 => prop::collection::vec(1u8..=255, 1..40),
        1 => prop_oneof![
            prop::collection::vec(1u8..=255, 255..=255),
            "[a-z]{1,4}".prop_map(|s| {
                let mut v = s.into_bytes();
                v.resize(255, b'n');
                v
            }),
        ],
        1 => "\\PC{1,20}".prop_map(String::into_bytes),
        1 => select(vec![
            b"-rf".to_vec(),
            b" ".to_vec(),
            b"...".to_vec(),
            b"a\nb".to_vec(),
            b"\xff".to_vec(),
            b"\xc3\x28".to_vec(),
            b"*?[".to_vec(),
            b"\\".to_vec(),
        ]),
    ]
    .prop_map(|v| {
        let mut v = sanitize_name(v);
        v.truncate(255);
        v
    })
    .boxed()
}

fn mode_strategy() -> BoxedStrategy<u32> {
    prop_oneof![
        6 => select(vec![0o644u32, 0o755, 0o600, 0o700, 0o444, 0o555, 0o640, 0o750]),
        2 => select(vec![0o000u32, 0o4755, 0o2755, 0o6755, 0o1777, 0o7777, 0o1000, 0o4000, 0o2070, 0o007]),
        2 => 0u32..=0o7777,
    ]
    .boxed()
}

fn id_strategy() -> BoxedStrategy<u32> {
    prop_oneof![
        4 => Just(0u32),
        2 => 1u32..=65_535,
        1 => select(vec![65_534u32, 65_535, 65_536, 100_000, 1 << 31, u32::MAX - 1]),
        1 => 65_536u32..u32::MAX,
    ]
    .boxed()
}

fn mtime_strategy() -> BoxedStrategy<(i64, u32)> {
    let nsec = prop_oneof![Just(0u32), 0u32..1_000_000_000];
    prop_oneof![
        4 => (1_500_000_000i64..1_800_000_000, nsec.clone()),
        1 => (MIN_MTIME_SEC..0, nsec.clone()),
        1 => (2_000_000_000i64..=MAX_MTIME_SEC, nsec),
        1 => select(vec![
            (0i64, 0u32),
            (0, 1),
            (-1, 999_999_999),
            (-1, 0),
            (MIN_MTIME_SEC, 0),
            (MAX_MTIME_SEC, 999_999_999),
            ((1 << 31) - 1, 999_999_999),
            (1 << 31, 0),
            (1 << 32, 0),
            (1 << 32, 1),
        ]),
    ]
    .boxed()
}

fn xattr_strategy() -> BoxedStrategy<Vec<(Vec<u8>, Vec<u8>)>> {
    let ns = select(vec!["user.", "trusted.", "security.lodetest."]);
    let suffix = prop_oneof![
        6 => "[a-z][a-z0-9_.-]{0,15}".prop_map(String::into_bytes),
        1 => prop::collection::vec(1u8..=255, 1..100),
        1 => "[a-z]{1,3}".prop_map(|s| {
            let mut v = s.into_bytes();
            v.resize(230, b'x');
            v
        }),
    ];
    let value = prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..48),
        1 => Just(Vec::new()),
        1 => prop::collection::vec(any::<u8>(), 0..1500),
    ];
    let one = (ns, suffix, value).prop_map(|(ns, suffix, value)| {
        let mut name = ns.as_bytes().to_vec();
        name.extend(suffix.into_iter().map(|b| if b == 0 { b'_' } else { b }));
        name.truncate(255);
        (name, value)
    });
    prop_oneof![
        3 => Just(Vec::new()),
        2 => prop::collection::vec(one, 1..=4),
    ]
    .boxed()
}

fn meta_strategy(params: &TreeParams) -> BoxedStrategy<Meta> {
    let xattrs = if params.xattrs {
        xattr_strategy()
    } else {
        Just(Vec::new()).boxed()
    };
    if !params.odd_metadata {
        return xattrs
            .prop_map(|x| Meta {
                xattrs: x,
                ..Meta::simple(0o644)
            })
            .boxed();
    }
    (
        mode_strategy(),
        id_strategy(),
        id_strategy(),
        mtime_strategy(),
        xattrs,
    )
        .prop_map(|(mode, uid, gid, (mtime_sec, mtime_nsec), xattrs)| Meta {
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            xattrs,
        })
        .boxed()
}

/// Random file content of at most `max` bytes.
pub fn file_data_strategy(max: u64) -> BoxedStrategy<FileData> {
    let small_max = max.min(64 << 10);
    let size = prop_oneof![
        3 => Just(0u64),
        6 => 1u64..=64,
        4 => select(vec![
            511u64, 512, 4095, 4096, 4097, 8191, 8192, 8193, 12_288, 65_535, 65_536, 65_537, 1 << 20,
            (1 << 20) + 1,
        ]),
        4 => 0..=small_max,
        1 => 0..=max,
    ]
    .prop_map(move |s| s.min(max));
    let seed = prop_oneof![0u64..4, any::<u64>()];
    let fill = prop_oneof![
        2 => Just(Fill::Zero),
        1 => any::<u8>().prop_map(Fill::Byte),
        4 => seed.clone().prop_map(Fill::Random),
        2 => seed.clone().prop_map(Fill::Text),
    ];
    // Pieces: (start fraction, length fraction, 4 KiB-aligned?, fill), all in 0..=1<<16.
    let pieces = prop::collection::vec((0u64..=65_536, 0u64..=65_536, any::<bool>(), fill), 0..6);
    // Layout: 0 whole random, 1 whole text, 2 zero-filled with pieces, 3 sparse with pieces.
    (size, 0u8..4, seed, pieces)
        .prop_map(|(size, layout, seed, pieces)| {
            if size == 0 {
                return FileData {
                    size,
                    chunks: Vec::new(),
                    sparse: layout == 3,
                };
            }
            match layout {
                0 => FileData::random(size, seed),
                1 => FileData {
                    size,
                    chunks: vec![Chunk {
                        offset: 0,
                        len: size,
                        fill: Fill::Text(seed),
                    }],
                    sparse: false,
                },
                _ => {
                    let mut chunks: Vec<Chunk> = Vec::new();
                    let mut ps: Vec<_> = pieces
                        .into_iter()
                        .map(|(s, l, aligned, fill)| {
                            let mut off = (size as u128 * s as u128 / 65_537) as u64;
                            if aligned {
                                off &= !4095;
                            }
                            let len = (((size - off) as u128 * l as u128 / 65_536) as u64).max(1);
                            (off, len.min(size - off), fill)
                        })
                        .collect();
                    ps.sort_by_key(|p| p.0);
                    for (off, len, fill) in ps {
                        let end_prev = chunks.last().map_or(0, |c| c.offset + c.len);
                        let off = off.max(end_prev);
                        let len = len.min(size.saturating_sub(off));
                        if len > 0 {
                            chunks.push(Chunk {
                                offset: off,
                                len,
                                fill,
                            });
                        }
                    }
                    FileData {
                        size,
                        chunks,
                        sparse: layout == 3,
                    }
                }
            }
        })
        .boxed()
}

fn symlink_strategy() -> BoxedStrategy<SymlinkBp> {
    let component = "[a-z0-9._-]{1,12}";
    prop_oneof![
        3 => any::<Index>().prop_map(SymlinkBp::ToEntry),
        2 => prop::collection::vec(component, 1..5).prop_map(|c| SymlinkBp::Literal(c.join("/").into_bytes())),
        1 => prop::collection::vec(component, 1..5)
            .prop_map(|c| SymlinkBp::Literal(format!("/{}", c.join("/")).into_bytes())),
        1 => select(vec![
            b"/".to_vec(),
            b".".to_vec(),
            b"..".to_vec(),
            b"../../../../../../etc/passwd".to_vec(),
            b"/dev/null".to_vec(),
            b"dangling-target".to_vec(),
            b"trailing/".to_vec(),
            b"a//b".to_vec(),
        ])
        .prop_map(SymlinkBp::Literal),
        1 => prop::collection::vec(1u8..=255, 1..64).prop_map(SymlinkBp::Literal),
        1 => (1usize..=3000, "[a-z]{1,8}").prop_map(|(len, comp)| {
            let mut v = Vec::with_capacity(len + 10);
            while v.len() < len {
                v.extend_from_slice(comp.as_bytes());
                v.push(b'/');
            }
            v.truncate(len);
            SymlinkBp::Literal(v)
        }),
    ]
    .boxed()
}

fn kind_strategy(params: &TreeParams) -> BoxedStrategy<KindBp> {
    let file = (
        file_data_strategy(params.max_file_size),
        prop_oneof![4 => Just(None), 1 => any::<Index>().prop_map(Some)],
        prop_oneof![
            9 => Just(None),
            1 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(p, i, e)| {
                let mask = (1u64 << 41) - 1; // CAP_LAST_CAP = 40
                Some(capability_v2(p & mask, i & mask, e))
            }),
        ],
    )
        .prop_map(|(data, dup_of, cap)| KindBp::File { data, dup_of, cap });
    let dev = (
        prop_oneof![0u32..=255, 0u32..=MAX_MAJOR],
        prop_oneof![0u32..=255, 256u32..=MAX_MINOR, Just(MAX_MINOR)],
    );
    let mut choices: Vec<(u32, BoxedStrategy<KindBp>)> = vec![
        (4, Just(KindBp::Dir).boxed()),
        (8, file.boxed()),
        (2, symlink_strategy().prop_map(KindBp::Symlink).boxed()),
    ];
    if params.hardlinks {
        choices.push((2, any::<Index>().prop_map(KindBp::HardLink).boxed()));
    }
    if params.special_files {
        choices.push((
            1,
            dev.clone().prop_map(|(a, b)| KindBp::CharDev(a, b)).boxed(),
        ));
        choices.push((1, dev.prop_map(|(a, b)| KindBp::BlockDev(a, b)).boxed()));
        choices.push((1, Just(KindBp::Fifo).boxed()));
        choices.push((1, Just(KindBp::Socket).boxed()));
    }
    proptest::strategy::Union::new_weighted(choices).boxed()
}

/// A proptest strategy generating random [`TreeSpec`]s according to `params`.
pub fn tree_strategy(params: TreeParams) -> BoxedStrategy<TreeSpec> {
    let entry = (
        any::<Index>(),
        name_strategy(params.odd_names),
        kind_strategy(&params),
        meta_strategy(&params),
    )
        .prop_map(|(parent, name, kind, meta)| EntryBp {
            parent,
            name,
            kind,
            meta,
        });
    let root_meta = meta_strategy(&params);
    (
        root_meta,
        prop::collection::vec(entry, 0..=params.max_entries),
    )
        .prop_map(move |(root, bps)| build(&params, root, bps))
        .boxed()
}

/// One deterministic random tree for `seed` (for tests that want a single sample rather
/// than a proptest run).
pub fn sample_tree(params: TreeParams, seed: u64) -> TreeSpec {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    tree_strategy(params)
        .new_tree(&mut runner)
        .expect("generate tree")
        .current()
}

/// Xattr budget per inode: ext4 keeps all xattrs of an inode in the inode body plus one
/// 4 KiB block (without `ea_inode`), and each entry costs ~16 bytes + name.
const XATTR_BUDGET: usize = 3000;

fn fix_meta(mut meta: Meta, params: &TreeParams, kind: &KindBp) -> Meta {
    let user_ok = matches!(kind, KindBp::Dir | KindBp::File { .. });
    let mut seen = HashSet::new();
    let mut used = 0;
    meta.xattrs.retain(|(name, value)| {
        if !user_ok && name.starts_with(b"user.") {
            return false; // user.* is only allowed on regular files and directories
        }
        let cost = 16 + name.len() + value.len().div_ceil(4) * 4;
        if !seen.insert(name.clone()) || used + cost > XATTR_BUDGET {
            return false;
        }
        used += cost;
        true
    });
    if !params.odd_metadata {
        meta.mode = match kind {
            KindBp::Dir => 0o755,
            KindBp::Symlink(_) => 0o777,
            _ => 0o644,
        };
    }
    if matches!(kind, KindBp::Symlink(_)) {
        meta.mode = 0o777;
    }
    meta
}

fn build(params: &TreeParams, root: Meta, bps: Vec<EntryBp>) -> TreeSpec {
    let max_depth = params.max_depth.max(1);
    let root = fix_meta(root, params, &KindBp::Dir);
    let mut dirs: Vec<(PathBuf, usize)> = vec![(PathBuf::new(), 0)];
    let mut paths: HashSet<PathBuf> = HashSet::new();
    let mut linkable: Vec<usize> = Vec::new();
    let mut files: Vec<usize> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    for bp in bps {
        if entries.len() >= params.max_entries {
            break;
        }
        let is_dir = matches!(bp.kind, KindBp::Dir);
        let (parent, depth) = if is_dir {
            let eligible: Vec<&(PathBuf, usize)> =
                dirs.iter().filter(|d| d.1 < max_depth).collect();
            eligible[bp.parent.index(eligible.len())].clone()
        } else {
            dirs[bp.parent.index(dirs.len())].clone()
        };
        let path = parent.join(OsStr::from_bytes(&bp.name));
        if paths.contains(&path) {
            continue;
        }
        let mut meta = fix_meta(bp.meta, params, &bp.kind);
        let kind = match bp.kind {
            KindBp::Dir => EntryKind::Dir,
            KindBp::File { data, dup_of, cap } => {
                let data = match dup_of {
                    Some(ix) if !files.is_empty() => {
                        match &entries[files[ix.index(files.len())]].kind {
                            EntryKind::File(d) => d.clone(),
                            _ => unreachable!(),
                        }
                    }
                    _ => data,
                };
                if let Some(cap) = cap {
                    if params.xattrs {
                        meta.xattrs.push((b"security.capability".to_vec(), cap));
                    }
                }
                EntryKind::File(data)
            }
            KindBp::Symlink(SymlinkBp::Literal(t)) => {
                let mut t: Vec<u8> = t
                    .into_iter()
                    .map(|b| if b == 0 { b'_' } else { b })
                    .collect();
                if t.is_empty() {
                    t.push(b'x');
                }
                EntryKind::Symlink(t)
            }
            KindBp::Symlink(SymlinkBp::ToEntry(ix)) => {
                let target_rel = if entries.is_empty() {
                    PathBuf::from(".")
                } else {
                    entries[ix.index(entries.len())].path.clone()
                };
                let mut t = b"../".repeat(depth);
                t.extend_from_slice(target_rel.as_os_str().as_bytes());
                EntryKind::Symlink(t)
            }
            KindBp::CharDev(major, minor) => EntryKind::CharDev { major, minor },
            KindBp::BlockDev(major, minor) => EntryKind::BlockDev { major, minor },
            KindBp::Fifo => EntryKind::Fifo,
            KindBp::Socket => EntryKind::Socket,
            KindBp::HardLink(ix) => {
                if linkable.is_empty() {
                    continue;
                }
                EntryKind::HardLink(entries[linkable[ix.index(linkable.len())]].path.clone())
            }
        };
        paths.insert(path.clone());
        match &kind {
            EntryKind::Dir => dirs.push((path.clone(), depth + 1)),
            EntryKind::HardLink(_) => {}
            EntryKind::File(_) => {
                files.push(entries.len());
                linkable.push(entries.len());
            }
            _ => linkable.push(entries.len()),
        }
        entries.push(Entry { path, kind, meta });
    }
    TreeSpec { root, entries }
}
