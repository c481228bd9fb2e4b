//! Scans a source directory into a [`Tree`]: every inode's metadata and xattrs, and the list
//! of regular files whose bytes the chunk pipeline will read afterwards.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lode_format::tree::{Content, FileData, Metadata, Node, NodeId, Tree};

/// A regular file whose data still has to be read.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub node: NodeId,
    pub path: PathBuf,
    pub size: u64,
    /// Allocated bytes are fewer than the size: look for holes before reading.
    pub sparse: bool,
}

/// Reads the metadata and xattrs of `path` (not following symlinks).
pub fn read_metadata(path: &Path, st: &fs::Metadata, buf: &mut Vec<u8>) -> Result<Metadata> {
    Ok(Metadata {
        permissions: (st.mode() & 0o7777) as u16,
        uid: st.uid(),
        gid: st.gid(),
        mtime: st.mtime(),
        mtime_nsec: st.mtime_nsec() as u32,
        xattrs: read_xattrs(path, buf)?,
    })
}

fn read_xattrs(
    path: &Path,
    buf: &mut Vec<u8>,
) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    // XATTR_LIST_MAX and XATTR_SIZE_MAX are both 64 KiB.
    buf.resize(65536, 0);
    let n = match rustix::fs::llistxattr(path, &mut buf[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("listing xattrs of {}", path.display()))
        }
    };
    let names: Vec<Vec<u8>> = buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect();
    for name in names {
        let len = match rustix::fs::lgetxattr(path, OsStr::from_bytes(&name), &mut buf[..]) {
            Ok(len) => len,
            // Removed between list and get.
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => {
                return Err(std::io::Error::from(e)).with_context(|| {
                    format!(
                        "reading xattr {} of {}",
                        String::from_utf8_lossy(&name),
                        path.display()
                    )
                })
            }
        };
        if lode_format::format::split_xattr_name(&name).is_none() {
            bail!(
                "{}: xattr {:?} cannot be stored in EROFS (only user., trusted., security. and POSIX ACLs can)",
                path.display(),
                String::from_utf8_lossy(&name)
            );
        }
        out.insert(name, buf[..len].to_vec());
    }
    Ok(out)
}

/// Scans `src` into a tree. Files up to `inline_max` bytes are queued like the others;
/// the pipeline decides from their size whether they are inlined.
pub fn scan(src: &Path) -> Result<(Tree, Vec<FileJob>)> {
    let st = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    if !st.is_dir() {
        bail!("{} is not a directory", src.display());
    }
    let mut buf = Vec::new();
    let mut tree = Tree::new(read_metadata(src, &st, &mut buf)?);
    let mut jobs = Vec::new();
    let mut hardlinks: HashMap<(u64, u64), NodeId> = HashMap::new();
    // Depth-first, names in byte order, so file data lands in the blob directory by directory.
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(src.to_path_buf(), Tree::ROOT)];
    while let Some((dir_path, dir_node)) = stack.pop() {
        let mut names: Vec<std::ffi::OsString> = fs::read_dir(&dir_path)
            .with_context(|| format!("reading directory {}", dir_path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading directory {}", dir_path.display()))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir_path.join(&name);
            let st = fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let ft = st.file_type();
            if !ft.is_dir() && st.nlink() > 1 {
                if let Some(&existing) = hardlinks.get(&(st.dev(), st.ino())) {
                    tree.link(dir_node, name.as_bytes().to_vec(), existing);
                    continue;
                }
            }
            let meta = read_metadata(&path, &st, &mut buf)?;
            let content = if ft.is_dir() {
                Content::Directory(Default::default())
            } else if ft.is_file() {
                Content::File(FileData::Inline(Vec::new()))
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)
                    .with_context(|| format!("reading symlink {}", path.display()))?;
                Content::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() || ft.is_block_device() {
                let (major, minor) = split_dev(st.rdev());
                if major > 0xfff || minor > 0xfffff {
                    bail!(
                        "{}: device number {major}:{minor} cannot be stored in EROFS",
                        path.display()
                    );
                }
                if ft.is_char_device() {
                    Content::CharDevice { major, minor }
                } else {
                    Content::BlockDevice { major, minor }
                }
            } else if ft.is_fifo() {
                Content::Fifo
            } else if ft.is_socket() {
                Content::Socket
            } else {
                bail!("{}: unknown file type", path.display());
            };
            let is_dir = ft.is_dir();
            let node = tree.add(Node { meta, content });
            tree.link(dir_node, name.as_bytes().to_vec(), node);
            if ft.is_file() {
                jobs.push(FileJob {
                    node,
                    path: path.clone(),
                    size: st.size(),
                    sparse: st.blocks() * 512 < st.size(),
                });
            }
            if !is_dir && st.nlink() > 1 {
                hardlinks.insert((st.dev(), st.ino()), node);
            }
            if is_dir {
                subdirs.push((path, node));
            }
        }
        // Reverse so the stack pops them in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok((tree, jobs))
}

/// Splits a Linux `dev_t` into (major, minor).
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major as u32, minor as u32)
}
