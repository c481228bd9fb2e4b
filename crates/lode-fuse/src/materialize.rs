//! Backing files for FUSE passthrough: one regular file per distinct file content, holding
//! the file's bytes at the same offsets, in `<cache>/files/<key>`.
//!
//! The key is a blake3 hash of where the bytes come from (size, and per extent the blob
//! digest and offset, or the inline bytes), so identical files made of the same chunks
//! share one backing file across inodes, images and mounts.
//!
//! A backing file is built from chunks that are already in the blob cache (the caller checks
//! that first), so making one never touches the network: per extent `FICLONERANGE` (a reflink
//! — no extra disk space — when the cache filesystem supports it and the ranges are block
//! aligned, which blob chunks always are), else `copy_file_range`, else read/write. Holes
//! stay holes. The file is written as an unnamed `O_TMPFILE`, synced, then linked under its
//! name: a backing file with a name is always complete.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use lode_format::reader::{ExtentKind, Image, Inode};
use lode_storage::fetch::BlobFetcher;

/// What making a backing file cost.
#[derive(Debug, Clone, Default)]
pub struct Made {
    /// A new file was written (false: an existing one was reused).
    pub created: bool,
    /// All data extents were reflinked.
    pub reflinked: bool,
    /// Blocks allocated to the file, in bytes.
    pub disk_bytes: u64,
}

pub struct Materializer {
    dir: PathBuf,
    fetchers: Vec<Arc<BlobFetcher>>,
    /// Cleared after the first FICLONERANGE the filesystem refuses.
    try_reflink: AtomicBool,
}

/// `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

impl Materializer {
    pub fn new(cache_dir: &Path, fetchers: Vec<Arc<BlobFetcher>>) -> Result<Materializer> {
        let dir = cache_dir.join("files");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Materializer {
            dir,
            fetchers,
            try_reflink: AtomicBool::new(true),
        })
    }

    /// Whether every byte of `inode` is local (inline, a hole, or a present blob chunk).
    pub fn is_local(&self, image: &Image, inode: &Inode) -> lode_format::reader::Result<bool> {
        let mut off = 0;
        while off < inode.size {
            let e = image.map(inode, off)?;
            if let ExtentKind::Mapped { device, physical } = e.kind {
                if device > 0 {
                    let Some(f) = self.fetchers.get(device as usize - 1) else {
                        return Ok(false);
                    };
                    let skip = off - e.logical;
                    if !f.is_range_present(physical + skip, e.len - skip) {
                        return Ok(false);
                    }
                }
            }
            off = e.logical + e.len;
        }
        Ok(true)
    }

    /// The content key of `inode`'s data.
    fn key(&self, image: &Image, inode: &Inode) -> Result<String> {
        let mut h = blake3::Hasher::new();
        h.update(b"lode-fuse backing file v1\0");
        h.update(&inode.size.to_le_bytes());
        let mut off = 0;
        let mut buf = Vec::new();
        while off < inode.size {
            let e = image.map(inode, off)?;
            h.update(&e.logical.to_le_bytes());
            h.update(&e.len.to_le_bytes());
            match e.kind {
                ExtentKind::Hole => {
                    h.update(b"H");
                }
                ExtentKind::Mapped { device, physical } if device > 0 => {
                    h.update(b"M");
                    let digest = self
                        .fetchers
                        .get(device as usize - 1)
                        .map(|f| f.cached().blob.digest.clone())
                        .unwrap_or_default();
                    h.update(digest.as_bytes());
                    h.update(&physical.to_le_bytes());
                }
                _ => {
                    // Inline, or data in the bootstrap itself: hash the bytes.
                    h.update(b"B");
                    buf.resize(e.len as usize, 0);
                    image.read_at(inode, e.logical, &mut buf)?;
                    h.update(&buf);
                }
            }
            off = e.logical + e.len;
        }
        Ok(h.finalize().to_hex().to_string())
    }

    /// The backing file of `inode` (made if needed), opened read-only. The caller has checked
    /// [`Materializer::is_local`].
    pub fn backing_file(&self, image: &Image, inode: &Inode) -> Result<(File, Made)> {
        let key = self.key(image, inode)?;
        let path = self.dir.join(&key);
        if let Ok(f) = File::open(&path) {
            let meta = f.metadata()?;
            if meta.len() == inode.size {
                return Ok((
                    f,
                    Made {
                        created: false,
                        reflinked: false,
                        disk_bytes: meta.blocks() * 512,
                    },
                ));
            }
            // Not ours (or damaged): replace it.
            let _ = std::fs::remove_file(&path);
        }
        let (tmp, named) = self.tempfile()?;
        let reflinked = self
            .fill(image, inode, &tmp)
            .with_context(|| format!("writing backing file for nid {}", inode.nid))?;
        tmp.set_len(inode.size)?;
        tmp.sync_data()?;
        match named {
            None => link_tmpfile(&tmp, &path)?,
            Some(t) => {
                if let Err(e) = t.persist_noclobber(&path) {
                    if e.error.kind() != io::ErrorKind::AlreadyExists {
                        return Err(e.error).context("naming a backing file");
                    }
                }
            }
        }
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let disk_bytes = f.metadata()?.blocks() * 512;
        Ok((
            f,
            Made {
                created: true,
                reflinked,
                disk_bytes,
            },
        ))
    }

    /// An unnamed file in the files directory (or a named temporary where O_TMPFILE is not
    /// supported).
    fn tempfile(&self) -> Result<(File, Option<tempfile::NamedTempFile>)> {
        use rustix::fs::{Mode, OFlags};
        match rustix::fs::open(
            &self.dir,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(fd) => Ok((File::from(fd), None)),
            Err(_) => {
                let t = tempfile::NamedTempFile::new_in(&self.dir)?;
                let f = t.as_file().try_clone()?;
                Ok((f, Some(t)))
            }
        }
    }

    /// Writes the data of `inode` into `dst`; returns whether every data extent was
    /// reflinked.
    fn fill(&self, image: &Image, inode: &Inode, dst: &File) -> Result<bool> {
        let mut off = 0;
        let mut all_reflinked = true;
        let mut any_data = false;
        let mut buf = Vec::new();
        while off < inode.size {
            let e = image.map(inode, off)?;
            match e.kind {
                ExtentKind::Hole => {}
                ExtentKind::Mapped { device, physical } if device > 0 => {
                    any_data = true;
                    let src = self
                        .fetchers
                        .get(device as usize - 1)
                        .context("extent names a missing device")?
                        .cached()
                        .data_file();
                    if !self.copy_range(src, physical, dst, e.logical, e.len)? {
                        all_reflinked = false;
                    }
                }
                _ => {
                    any_data = true;
                    all_reflinked = false;
                    buf.resize(e.len as usize, 0);
                    let n = image.read_at(inode, e.logical, &mut buf)?;
                    dst.write_all_at(&buf[..n], e.logical)?;
                }
            }
            off = e.logical + e.len;
        }
        Ok(any_data && all_reflinked)
    }

    /// Copies `len` bytes; returns whether it was a reflink.
    fn copy_range(
        &self,
        src: &File,
        src_off: u64,
        dst: &File,
        dst_off: u64,
        len: u64,
    ) -> Result<bool> {
        const BLOCK: u64 = 4096;
        if self.try_reflink.load(Ordering::Relaxed)
            && src_off.is_multiple_of(BLOCK)
            && dst_off.is_multiple_of(BLOCK)
        {
            // Chunks are block-aligned and padded with zeros to a block in the blob layout,
            // so the rounded-up range is safe to clone; the file is truncated to size after.
            let src_len = src.metadata()?.len();
            let rounded = len.next_multiple_of(BLOCK);
            let clone_len = if src_off + rounded <= src_len {
                rounded
            } else {
                len
            };
            let arg = FileCloneRange {
                src_fd: src.as_raw_fd() as i64,
                src_offset: src_off,
                src_length: clone_len,
                dest_offset: dst_off,
            };
            // SAFETY: FICLONERANGE with a valid struct; both fds are open.
            let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE as _, &arg) };
            if r == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            tracing::debug!("FICLONERANGE refused ({err}); copying backing files instead");
            self.try_reflink.store(false, Ordering::Relaxed);
        }
        let mut done = 0u64;
        while done < len {
            let mut so = src_off + done;
            let mut doff = dst_off + done;
            match rustix::fs::copy_file_range(
                src.as_fd(),
                Some(&mut so),
                dst.as_fd(),
                Some(&mut doff),
                (len - done) as usize,
            ) {
                Ok(0) => anyhow::bail!("blob cache file ends inside a chunk"),
                Ok(n) => done += n as u64,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => {
                    // Fall back to plain reads and writes.
                    let mut buf = vec![0u8; (len - done).min(1 << 20) as usize];
                    while done < len {
                        let n = ((len - done) as usize).min(buf.len());
                        src.read_exact_at(&mut buf[..n], src_off + done)?;
                        dst.write_all_at(&buf[..n], dst_off + done)?;
                        done += n as u64;
                    }
                }
            }
        }
        Ok(false)
    }
}

fn link_tmpfile(file: &File, dest: &Path) -> Result<()> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        rustix::fs::CWD,
        dest,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    ) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(io::Error::from(e)).with_context(|| format!("linking {}", dest.display())),
    }
}
