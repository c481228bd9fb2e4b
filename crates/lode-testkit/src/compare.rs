//! Exact comparison of two directory trees.
//!
//! Both trees are walked with lstat semantics (symlinks are never followed); names are
//! compared as raw bytes. Per path: file type, permission bits (incl. setuid/setgid/sticky),
//! uid, gid, mtime (seconds and nanoseconds, all types), size (regular files and symlinks),
//! content (streamed in 1 MiB pieces; regions that are holes in both files are skipped via
//! `SEEK_DATA`), symlink target bytes, rdev (devices), the full xattr set, hard-link grouping
//! and optionally directory nlink.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What [`compare_trees`] checks.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Compare permission bits (`mode & 0o7777`).
    pub mode: bool,
    /// Compare uid and gid.
    pub ownership: bool,
    /// Compare mtime seconds and nanoseconds.
    pub mtime: bool,
    /// Compare regular-file content (sizes are always compared).
    pub content: bool,
    /// Compare xattrs.
    pub xattrs: bool,
    /// Xattr names (full, e.g. `security.selinux`) to ignore on both sides.
    pub ignore_xattrs: BTreeSet<Vec<u8>>,
    /// Compare hard-link grouping of non-directories.
    pub hardlinks: bool,
    /// Compare st_nlink of directories.
    pub dir_nlink: bool,
    /// Compare the metadata of the two root directories themselves.
    pub root_metadata: bool,
    /// Skip regions that are holes in both files (`SEEK_DATA`/`SEEK_HOLE`).
    pub skip_holes: bool,
}

impl Default for CompareOptions {
    /// Everything except directory nlink; nothing ignored.
    fn default() -> Self {
        CompareOptions {
            mode: true,
            ownership: true,
            mtime: true,
            content: true,
            xattrs: true,
            ignore_xattrs: BTreeSet::new(),
            hardlinks: true,
            dir_nlink: false,
            root_metadata: true,
            skip_holes: true,
        }
    }
}

impl CompareOptions {
    /// Builder-style: also ignore the xattr `name`.
    pub fn ignore_xattr(mut self, name: &str) -> Self {
        self.ignore_xattrs.insert(name.as_bytes().to_vec());
        self
    }
}

/// File type as seen by lstat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
    Unknown(u32),
}

impl Kind {
    pub fn of(mode: u32) -> Kind {
        match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            other => Kind::Unknown(other),
        }
    }
}

/// One difference found by [`compare_trees`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// Path relative to the tree roots (empty for the roots themselves).
    pub path: PathBuf,
    pub kind: DiffKind,
}

/// What differs. `a`/`b` values are from the first/second tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiffKind {
    OnlyInA,
    OnlyInB,
    FileType {
        a: Kind,
        b: Kind,
    },
    Mode {
        a: u32,
        b: u32,
    },
    Uid {
        a: u32,
        b: u32,
    },
    Gid {
        a: u32,
        b: u32,
    },
    Mtime {
        a: (i64, i64),
        b: (i64, i64),
    },
    Size {
        a: u64,
        b: u64,
    },
    /// First differing byte offset.
    Content {
        offset: u64,
    },
    SymlinkTarget {
        a: Vec<u8>,
        b: Vec<u8>,
    },
    /// (major, minor)
    Rdev {
        a: (u32, u32),
        b: (u32, u32),
    },
    /// `None` = absent on that side.
    Xattr {
        name: Vec<u8>,
        a: Option<Vec<u8>>,
        b: Option<Vec<u8>>,
    },
    /// The set of paths sharing this path's inode differs (restricted to paths in both).
    Hardlinks {
        a: Vec<PathBuf>,
        b: Vec<PathBuf>,
    },
    DirNlink {
        a: u64,
        b: u64,
    },
    /// An I/O error while examining the path.
    Error(String),
}

fn show_bytes(b: &[u8]) -> String {
    const MAX: usize = 64;
    let mut s = String::from("\"");
    for &c in b.iter().take(MAX) {
        s.extend(std::ascii::escape_default(c).map(char::from));
    }
    s.push('"');
    if b.len() > MAX {
        s.push_str(&format!("…({} bytes)", b.len()));
    }
    s
}

fn show_path(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        ".".to_string()
    } else {
        show_bytes(p.as_os_str().as_bytes())
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", show_path(&self.path))?;
        let opt = |v: &Option<Vec<u8>>| v.as_deref().map_or("<absent>".to_string(), show_bytes);
        let paths = |v: &[PathBuf]| {
            v.iter()
                .map(|p| show_path(p))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.kind {
            DiffKind::OnlyInA => write!(f, "only in a"),
            DiffKind::OnlyInB => write!(f, "only in b"),
            DiffKind::FileType { a, b } => write!(f, "file type {a:?} != {b:?}"),
            DiffKind::Mode { a, b } => write!(f, "mode {a:#o} != {b:#o}"),
            DiffKind::Uid { a, b } => write!(f, "uid {a} != {b}"),
            DiffKind::Gid { a, b } => write!(f, "gid {a} != {b}"),
            DiffKind::Mtime { a, b } => {
                write!(f, "mtime {}.{:09} != {}.{:09}", a.0, a.1, b.0, b.1)
            }
            DiffKind::Size { a, b } => write!(f, "size {a} != {b}"),
            DiffKind::Content { offset } => write!(f, "content differs at byte {offset}"),
            DiffKind::SymlinkTarget { a, b } => {
                write!(f, "symlink target {} != {}", show_bytes(a), show_bytes(b))
            }
            DiffKind::Rdev { a, b } => write!(f, "rdev {}:{} != {}:{}", a.0, a.1, b.0, b.1),
            DiffKind::Xattr { name, a, b } => {
                write!(f, "xattr {}: {} != {}", show_bytes(name), opt(a), opt(b))
            }
            DiffKind::Hardlinks { a, b } => {
                write!(f, "hard-link group [{}] != [{}]", paths(a), paths(b))
            }
            DiffKind::DirNlink { a, b } => write!(f, "directory nlink {a} != {b}"),
            DiffKind::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// lstat of every path below (and including, as the empty path) `root`.
fn walk(root: &Path, errors: &mut Vec<Difference>) -> BTreeMap<PathBuf, Metadata> {
    let mut out = BTreeMap::new();
    match fs::symlink_metadata(root) {
        Ok(m) => {
            out.insert(PathBuf::new(), m);
        }
        Err(e) => {
            errors.push(Difference {
                path: PathBuf::new(),
                kind: DiffKind::Error(format!("lstat {root:?}: {e}")),
            });
            return out;
        }
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let rd = match fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(Difference {
                    path: rel,
                    kind: DiffKind::Error(format!("readdir {abs:?}: {e}")),
                });
                continue;
            }
        };
        for ent in rd {
            let ent = match ent {
                Ok(ent) => ent,
                Err(e) => {
                    errors.push(Difference {
                        path: rel.clone(),
                        kind: DiffKind::Error(format!("readdir {abs:?}: {e}")),
                    });
                    break;
                }
            };
            let child = rel.join(ent.file_name());
            match fs::symlink_metadata(ent.path()) {
                Ok(m) => {
                    if m.file_type().is_dir() {
                        stack.push(child.clone());
                    }
                    out.insert(child, m);
                }
                Err(e) => errors.push(Difference {
                    path: child,
                    kind: DiffKind::Error(format!("lstat: {e}")),
                }),
            }
        }
    }
    out
}

/// All xattrs of `path` (not following symlinks). Unsupported → empty.
pub fn read_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let os = std::ffi::OsStr::from_bytes(name);
        let value = loop {
            let size = match rustix::fs::lgetxattr_query(path, os) {
                Ok(n) => n,
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            };
            let mut buf = vec![0u8; size];
            if size == 0 {
                break Some(buf);
            }
            match rustix::fs::lgetxattr(path, os, &mut buf[..]) {
                Ok(n) => {
                    buf.truncate(n);
                    break Some(buf);
                }
                Err(rustix::io::Errno::RANGE) => continue,
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(v) = value {
            out.insert(name.to_vec(), v);
        }
    }
    Ok(out)
}

fn next_data(f: &File, pos: u64, size: u64) -> io::Result<u64> {
    match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(pos)) {
        Ok(p) => Ok(p.min(size)),
        Err(rustix::io::Errno::NXIO) => Ok(size),
        Err(e) => Err(e.into()),
    }
}

/// First offset at which the two files (both `size` bytes) differ, if any.
fn first_content_difference(
    a: &Path,
    b: &Path,
    size: u64,
    skip_holes: bool,
) -> io::Result<Option<u64>> {
    const BUF: usize = 1 << 20;
    let fa = File::open(a)?;
    let fb = File::open(b)?;
    let mut ba = vec![0u8; BUF];
    let mut bb = vec![0u8; BUF];
    let mut skip_holes = skip_holes;
    let mut pos = 0u64;
    while pos < size {
        if skip_holes {
            match (next_data(&fa, pos, size), next_data(&fb, pos, size)) {
                (Ok(da), Ok(db)) => {
                    let both_hole_until = da.min(db);
                    if both_hole_until > pos {
                        pos = both_hole_until;
                        continue;
                    }
                }
                _ => skip_holes = false,
            }
        }
        let n = (size - pos).min(BUF as u64) as usize;
        read_full_at(&fa, &mut ba[..n], pos, a)?;
        read_full_at(&fb, &mut bb[..n], pos, b)?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}

fn read_full_at(f: &File, buf: &mut [u8], pos: u64, path: &Path) -> io::Result<()> {
    f.read_exact_at(buf, pos)
        .map_err(|e| io::Error::new(e.kind(), format!("read {path:?} at {pos}: {e}")))
}

fn dev_pair(rdev: u64) -> (u32, u32) {
    (rustix::fs::major(rdev as _), rustix::fs::minor(rdev as _))
}

/// Compare the trees rooted at `a` and `b`; empty result means identical.
pub fn compare_trees(a: &Path, b: &Path, opts: &CompareOptions) -> Vec<Difference> {
    let mut diffs = Vec::new();
    let ta = walk(a, &mut diffs);
    let tb = walk(b, &mut diffs);
    let mut push = |path: &Path, kind: DiffKind| {
        diffs.push(Difference {
            path: path.to_path_buf(),
            kind,
        })
    };

    for p in ta.keys().filter(|p| !tb.contains_key(*p)) {
        push(p, DiffKind::OnlyInA);
    }
    for p in tb.keys().filter(|p| !ta.contains_key(*p)) {
        push(p, DiffKind::OnlyInB);
    }

    for (rel, ma) in &ta {
        let Some(mb) = tb.get(rel) else { continue };
        let (ka, kb) = (Kind::of(ma.mode()), Kind::of(mb.mode()));
        if ka != kb {
            push(rel, DiffKind::FileType { a: ka, b: kb });
            continue;
        }
        if rel.as_os_str().is_empty() && !opts.root_metadata {
            continue;
        }
        let (pa, pb) = (a.join(rel), b.join(rel));
        if opts.mode && ma.mode() & 0o7777 != mb.mode() & 0o7777 {
            push(
                rel,
                DiffKind::Mode {
                    a: ma.mode() & 0o7777,
                    b: mb.mode() & 0o7777,
                },
            );
        }
        if opts.ownership {
            if ma.uid() != mb.uid() {
                push(
                    rel,
                    DiffKind::Uid {
                        a: ma.uid(),
                        b: mb.uid(),
                    },
                );
            }
            if ma.gid() != mb.gid() {
                push(
                    rel,
                    DiffKind::Gid {
                        a: ma.gid(),
                        b: mb.gid(),
                    },
                );
            }
        }
        if opts.mtime && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            push(
                rel,
                DiffKind::Mtime {
                    a: (ma.mtime(), ma.mtime_nsec()),
                    b: (mb.mtime(), mb.mtime_nsec()),
                },
            );
        }
        match ka {
            Kind::File => {
                if ma.size() != mb.size() {
                    push(
                        rel,
                        DiffKind::Size {
                            a: ma.size(),
                            b: mb.size(),
                        },
                    );
                } else if opts.content {
                    match first_content_difference(&pa, &pb, ma.size(), opts.skip_holes) {
                        Ok(None) => {}
                        Ok(Some(offset)) => push(rel, DiffKind::Content { offset }),
                        Err(e) => push(rel, DiffKind::Error(format!("content: {e}"))),
                    }
                }
            }
            Kind::Symlink => match (fs::read_link(&pa), fs::read_link(&pb)) {
                (Ok(ta), Ok(tb)) => {
                    if ta != tb {
                        push(
                            rel,
                            DiffKind::SymlinkTarget {
                                a: ta.as_os_str().as_bytes().to_vec(),
                                b: tb.as_os_str().as_bytes().to_vec(),
                            },
                        );
                    } else if ma.size() != mb.size() {
                        push(
                            rel,
                            DiffKind::Size {
                                a: ma.size(),
                                b: mb.size(),
                            },
                        );
                    }
                }
                (ra, rb) => {
                    for r in [ra, rb] {
                        if let Err(e) = r {
                            push(rel, DiffKind::Error(format!("readlink: {e}")));
                        }
                    }
                }
            },
            Kind::CharDev | Kind::BlockDev if ma.rdev() != mb.rdev() => {
                let (a, b) = (dev_pair(ma.rdev()), dev_pair(mb.rdev()));
                push(rel, DiffKind::Rdev { a, b });
            }
            Kind::Dir if opts.dir_nlink && ma.nlink() != mb.nlink() => {
                let (a, b) = (ma.nlink(), mb.nlink());
                push(rel, DiffKind::DirNlink { a, b });
            }
            _ => {}
        }
        if opts.xattrs {
            match (read_xattrs(&pa), read_xattrs(&pb)) {
                (Ok(mut xa), Ok(mut xb)) => {
                    xa.retain(|k, _| !opts.ignore_xattrs.contains(k));
                    xb.retain(|k, _| !opts.ignore_xattrs.contains(k));
                    let names: BTreeSet<&Vec<u8>> = xa.keys().chain(xb.keys()).collect();
                    for name in names {
                        let (va, vb) = (xa.get(name), xb.get(name));
                        if va != vb {
                            push(
                                rel,
                                DiffKind::Xattr {
                                    name: name.clone(),
                                    a: va.cloned(),
                                    b: vb.cloned(),
                                },
                            );
                        }
                    }
                }
                (ra, rb) => {
                    for r in [ra, rb] {
                        if let Err(e) = r {
                            push(rel, DiffKind::Error(format!("xattrs: {e}")));
                        }
                    }
                }
            }
        }
    }

    if opts.hardlinks {
        // Non-directories present in both trees with the same type.
        let common: Vec<&PathBuf> = ta
            .iter()
            .filter(|(p, m)| !m.is_dir() && tb.get(*p).is_some_and(|mb| !mb.is_dir()))
            .map(|(p, _)| p)
            .collect();
        let groups = |t: &BTreeMap<PathBuf, Metadata>| {
            let mut g: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
            for p in &common {
                let m = &t[*p];
                g.entry((m.dev(), m.ino())).or_default().push((*p).clone());
            }
            g
        };
        let (ga, gb) = (groups(&ta), groups(&tb));
        let mut reported = BTreeSet::new();
        for p in &common {
            let (ma, mb) = (&ta[*p], &tb[*p]);
            let va = &ga[&(ma.dev(), ma.ino())];
            let vb = &gb[&(mb.dev(), mb.ino())];
            if va != vb && reported.insert((va.clone(), vb.clone())) {
                push(
                    p,
                    DiffKind::Hardlinks {
                        a: va.clone(),
                        b: vb.clone(),
                    },
                );
            }
        }
    }
    diffs.sort_by(|x, y| x.path.cmp(&y.path));
    diffs
}

/// Maximum number of differences listed by [`assert_same_tree`].
pub const MAX_LISTED: usize = 50;

/// Format differences as a readable list (at most [`MAX_LISTED`]).
pub fn format_differences(diffs: &[Difference]) -> String {
    let mut s = String::new();
    for d in diffs.iter().take(MAX_LISTED) {
        s.push_str(&format!("  {d}\n"));
    }
    if diffs.len() > MAX_LISTED {
        s.push_str(&format!("  … and {} more\n", diffs.len() - MAX_LISTED));
    }
    s
}

/// Panic with a readable list of differences unless the trees are identical (default
/// options).
#[track_caller]
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_tree_with(a, b, &CompareOptions::default())
}

/// [`assert_same_tree`] with explicit options.
#[track_caller]
pub fn assert_same_tree_with(a: &Path, b: &Path, opts: &CompareOptions) {
    let diffs = compare_trees(a, b, opts);
    if !diffs.is_empty() {
        panic!(
            "trees differ: a = {a:?}, b = {b:?}; {} difference(s):\n{}",
            diffs.len(),
            format_differences(&diffs)
        );
    }
}
