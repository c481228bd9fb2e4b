//! `lode unpack IMAGE DIR`: faithful extraction of the whole tree.
//!
//! Every file type is recreated (device nodes, fifos and sockets with mknod), hard links stay
//! hard links (one nid → one inode on disk), holes stay holes, and ownership, mode (with
//! setuid/setgid/sticky), xattrs and nanosecond mtimes are restored. The order of the
//! metadata calls matters: chown clears setuid/setgid and security.capability, so it comes
//! first, then xattrs, then chmod, then the times; directories get their metadata after
//! their contents, deepest first.
//!
//! Names come from an untrusted image: each must be a single path component, so nothing is
//! ever written outside DIR, and every file is created with O_EXCL so an existing entry is
//! never followed or overwritten.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lode_format::format::FileType;
use lode_format::reader::{display_bytes, ExtentKind, Image, Inode};
use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags, CWD};

use crate::image_arg::ImageArgs;

/// Size of the pieces file data is copied in.
const PIECE: u64 = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Output directory; must not exist or be empty.
    pub dir: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let image = args.image.open()?;
    prepare_output_dir(&args.dir)?;
    let mut unpacker = Unpacker {
        image: &image,
        privileged: rustix::process::geteuid().is_root(),
        first_path_of_nid: HashMap::new(),
        skipped_ownership: 0,
        skipped_xattrs: 0,
        buf: Vec::new(),
    };
    unpacker.unpack(&args.dir)?;
    if unpacker.skipped_ownership > 0 || unpacker.skipped_xattrs > 0 {
        eprintln!(
            "warning: not running as root: kept the current owner of {} entries and skipped {} privileged xattrs",
            unpacker.skipped_ownership, unpacker.skipped_xattrs
        );
    }
    Ok(())
}

fn prepare_output_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot access {}", dir.display())),
        Ok(meta) if !meta.is_dir() => bail!("{} exists and is not a directory", dir.display()),
        Ok(_) => {
            let mut listing =
                std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            if listing.next().is_some() {
                bail!("{} is not empty", dir.display());
            }
            Ok(())
        }
    }
}

/// Rejects names that are not exactly one path component.
fn check_name(name: &[u8], dir: &Path) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        bail!(
            "corrupt image: directory {} has an entry named {:?}, which is not a valid file name",
            dir.display(),
            display_bytes(name)
        );
    }
    Ok(())
}

struct Unpacker<'a> {
    image: &'a Image,
    privileged: bool,
    /// Where each non-directory nid was first extracted, to hard-link further names to it.
    first_path_of_nid: HashMap<u64, PathBuf>,
    skipped_ownership: u64,
    skipped_xattrs: u64,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn unpack(&mut self, out_dir: &Path) -> Result<()> {
        let image = self.image;
        let root = image.inode(image.root_nid())?;
        let mut visited_dirs: HashSet<u64> = HashSet::from([root.nid]);
        // Directories in creation order; their metadata is applied in reverse, so children
        // always come before their parents.
        let mut created_dirs: Vec<(PathBuf, Inode)> = vec![(out_dir.to_path_buf(), root.clone())];
        let mut pending: Vec<(PathBuf, Inode)> = vec![(out_dir.to_path_buf(), root)];

        while let Some((dir_path, dir)) = pending.pop() {
            let entries = image
                .read_dir(&dir)
                .with_context(|| format!("reading directory {}", dir_path.display()))?;
            for entry in entries {
                // The stored self and parent links are not files to create.
                if entry.name == b"." || entry.name == b".." {
                    continue;
                }
                check_name(&entry.name, &dir_path)?;
                let path = dir_path.join(OsStr::from_bytes(&entry.name));
                let inode = image
                    .inode(entry.nid)
                    .with_context(|| format!("reading the inode of {}", path.display()))?;
                if inode.is_dir() {
                    if !visited_dirs.insert(inode.nid) {
                        bail!(
                            "corrupt image: directory nid {} is reached again at {} (a directory cycle or a hard-linked directory)",
                            inode.nid,
                            path.display()
                        );
                    }
                    std::fs::create_dir(&path)
                        .with_context(|| format!("cannot create directory {}", path.display()))?;
                    created_dirs.push((path.clone(), inode.clone()));
                    pending.push((path, inode));
                } else if let Some(first) = self.first_path_of_nid.get(&inode.nid) {
                    std::fs::hard_link(first, &path).with_context(|| {
                        format!("cannot hard-link {} to {}", path.display(), first.display())
                    })?;
                } else {
                    self.create_node(&path, &inode)
                        .with_context(|| format!("cannot extract {}", path.display()))?;
                    self.apply_metadata(&path, &inode).with_context(|| {
                        format!("cannot set the metadata of {}", path.display())
                    })?;
                    self.first_path_of_nid.insert(inode.nid, path);
                }
            }
        }
        for (path, inode) in created_dirs.iter().rev() {
            self.apply_metadata(path, inode)
                .with_context(|| format!("cannot set the metadata of {}", path.display()))?;
        }
        Ok(())
    }

    /// Creates a non-directory entry with its data; metadata comes later.
    fn create_node(&mut self, path: &Path, inode: &Inode) -> Result<()> {
        let image = self.image;
        let private = Mode::from_raw_mode(0o600);
        match inode.file_type() {
            FileType::Regular => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                self.copy_data(inode, &file)?;
            }
            FileType::Symlink => {
                let target = image.readlink(inode)?;
                if target.is_empty() || target.contains(&0) {
                    bail!(
                        "corrupt image: symlink nid {} has an invalid target {:?}",
                        inode.nid,
                        display_bytes(&target)
                    );
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), path)?;
            }
            FileType::CharDevice | FileType::BlockDevice => {
                let kind = if inode.file_type() == FileType::CharDevice {
                    rustix::fs::FileType::CharacterDevice
                } else {
                    rustix::fs::FileType::BlockDevice
                };
                let (major, minor) = inode.rdev;
                rustix::fs::mknodat(CWD, path, kind, private, rustix::fs::makedev(major, minor))?;
            }
            FileType::Fifo => {
                rustix::fs::mknodat(CWD, path, rustix::fs::FileType::Fifo, private, 0)?
            }
            FileType::Socket => {
                rustix::fs::mknodat(CWD, path, rustix::fs::FileType::Socket, private, 0)?
            }
            FileType::Directory | FileType::Unknown => {
                bail!(
                    "nid {}: unexpected file type (mode 0o{:o})",
                    inode.nid,
                    inode.mode
                )
            }
        }
        Ok(())
    }

    /// Writes the mapped parts of a file and leaves its holes unwritten.
    fn copy_data(&mut self, inode: &Inode, file: &File) -> Result<()> {
        let image = self.image;
        let mut offset = 0u64;
        while offset < inode.size {
            let extent = image.map(inode, offset)?;
            let end = extent.logical + extent.len;
            if extent.kind != ExtentKind::Hole {
                while offset < end {
                    let piece = (end - offset).min(PIECE) as usize;
                    self.buf.resize(piece, 0);
                    let got = image.read_at(inode, offset, &mut self.buf[..piece])?;
                    if got != piece {
                        bail!("nid {}: short read at offset {offset}", inode.nid);
                    }
                    file.write_all_at(&self.buf[..piece], offset)?;
                    offset += piece as u64;
                }
            }
            offset = end;
        }
        file.set_len(inode.size)?;
        Ok(())
    }

    fn apply_metadata(&mut self, path: &Path, inode: &Inode) -> Result<()> {
        let image = self.image;
        // chown first: it clears setuid/setgid and security.capability.
        let owner = Some(rustix::fs::Uid::from_raw(inode.uid));
        let group = Some(rustix::fs::Gid::from_raw(inode.gid));
        match rustix::fs::chownat(CWD, path, owner, group, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(()) => {}
            Err(e) if !self.privileged && is_permission_error(e) => self.skipped_ownership += 1,
            Err(e) => {
                return Err(e).context(format!("chown to {}:{}", inode.uid, inode.gid));
            }
        }
        for (name, value) in image.xattrs(inode)? {
            let name_os = OsStr::from_bytes(&name);
            match rustix::fs::lsetxattr(path, name_os, &value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(e) if !self.privileged && is_permission_error(e) => self.skipped_xattrs += 1,
                Err(e) => {
                    return Err(e).context(format!("setting xattr {:?}", display_bytes(&name)));
                }
            }
        }
        // Symlinks have no mode of their own on Linux.
        if !inode.is_symlink() {
            rustix::fs::chmodat(
                CWD,
                path,
                Mode::from_raw_mode(inode.mode & 0o7777),
                AtFlags::empty(),
            )
            .with_context(|| format!("chmod to 0o{:o}", inode.mode & 0o7777))?;
        }
        let mtime = Timespec {
            tv_sec: inode.mtime,
            tv_nsec: inode.mtime_nsec.min(999_999_999) as _,
        };
        let times = Timestamps {
            last_access: mtime,
            last_modification: mtime,
        };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
            .context("setting the modification time")?;
        Ok(())
    }
}

fn is_permission_error(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::PERM || e == rustix::io::Errno::ACCESS
}
