//! The filesystem a worker serves: lode's EROFS reader behind `fuser`'s request loop.
//!
//! - Node ids are EROFS nids, except that the root (which FUSE calls 1) and nid 1 trade
//!   places; `st_ino` is the node id (fuser's READDIRPLUS uses one for the other), so hard
//!   links share it and every other inode's `st_ino` is its nid.
//! - Everything is immutable, so entries, attributes, negative lookups, directory pages and
//!   file pages are cached by the kernel for a long time (`TTL`, `FOPEN_KEEP_CACHE`,
//!   `FOPEN_CACHE_DIR`, CACHE_SYMLINKS).
//! - Permission checks are the kernel's (`default_permissions`).
//! - Data: a READ goes through the reader to a [`lode_storage::fetch::LazyDevice`] per blob,
//!   which fetches missing chunks first; a failed fetch is EIO, never zeros.
//! - Passthrough: an OPEN of a regular file all of whose bytes are local, with no cached
//!   (non-passthrough) open of the same inode, gets a backing file (see `materialize.rs`)
//!   and FOPEN_PASSTHROUGH; from then on every open of that inode uses the same backing id,
//!   and the kernel reads the backing file without asking us.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use lode_format::format::FileType as ErofsType;
use lode_format::reader::{DirEntry, Error as ReadError, ExtentKind, Image, Inode};
use lode_format::reverse::FileIndex;
use lode_storage::trace::TraceRecorder;

use crate::materialize::Materializer;
use crate::shared::{Counter, Shared};

/// How long the kernel may cache entries and attributes: the image never changes.
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const FH_CACHED: u64 = 1;
const FH_PASSTHROUGH: u64 = 2;
const STRIPES: usize = 256;
/// Parsed directories kept at most (the kernel caches listings itself: FOPEN_CACHE_DIR).
const DIR_CACHE: usize = 1024;

mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const IOCTL: u32 = 39;
    pub const READDIRPLUS: u32 = 44;
    pub const LSEEK: u32 = 46;
}

/// Options of a served image.
pub struct FsOptions {
    /// Use passthrough when the connection negotiated it.
    pub passthrough: bool,
    /// Smallest file that gets passthrough.
    pub passthrough_min_size: u64,
    /// `--record-trace`: where reads are recorded, and the inode → path map.
    pub trace: Option<(Arc<TraceRecorder>, FileIndex)>,
}

pub struct LodeFs {
    image: Image,
    root_nid: u64,
    shared: Arc<Shared>,
    materializer: Materializer,
    /// The /dev/fuse connection, for BACKING_OPEN.
    fuse_fd: OwnedFd,
    passthrough: AtomicBool,
    passthrough_min_size: u64,
    trace: Option<(Arc<TraceRecorder>, FileIndex)>,
    stripes: Vec<Mutex<()>>,
    /// Parsed directories (nid → entries) between the READDIRs of one listing; bounded.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    statfs: (u64, u64),
}

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno_of(e: &ReadError) -> Errno {
    match e {
        ReadError::NotFound(_) => Errno::ENOENT,
        ReadError::NotADirectory(_) => Errno::ENOTDIR,
        _ => Errno::EIO,
    }
}

fn errno(n: i32) -> Errno {
    Errno::from_i32(n)
}

/// Linux `new_encode_dev`, the form FUSE's `attr.rdev` carries.
fn encode_rdev((major, minor): (u32, u32)) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn kind_of_mode(mode: u32) -> FileType {
    match mode & 0o170000 {
        0o040000 => FileType::Directory,
        0o120000 => FileType::Symlink,
        0o020000 => FileType::CharDevice,
        0o060000 => FileType::BlockDevice,
        0o010000 => FileType::NamedPipe,
        0o140000 => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dirent(t: ErofsType) -> FileType {
    match t {
        ErofsType::Directory => FileType::Directory,
        ErofsType::Symlink => FileType::Symlink,
        ErofsType::CharDevice => FileType::CharDevice,
        ErofsType::BlockDevice => FileType::BlockDevice,
        ErofsType::Fifo => FileType::NamedPipe,
        ErofsType::Socket => FileType::Socket,
        ErofsType::Regular | ErofsType::Unknown => FileType::RegularFile,
    }
}

fn time_of(sec: i64, nsec: u32) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

impl LodeFs {
    pub fn new(
        image: Image,
        shared: Arc<Shared>,
        materializer: Materializer,
        fuse_fd: OwnedFd,
        opts: FsOptions,
    ) -> LodeFs {
        let root_nid = image.root_nid();
        let bs = image.block_size();
        let blocks = image.superblock().blocks as u64
            + image.devices().iter().map(|d| d.blocks as u64).sum::<u64>();
        let inos = image.superblock().inos;
        LodeFs {
            image,
            root_nid,
            shared,
            materializer,
            fuse_fd,
            passthrough: AtomicBool::new(opts.passthrough),
            passthrough_min_size: opts.passthrough_min_size.max(1),
            trace: opts.trace,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            dirs: Mutex::new(HashMap::new()),
            statfs: (blocks * bs / 4096, inos),
        }
    }

    /// Node id ↔ nid: the root is node 1, nid 1 (if it exists) takes the root's nid.
    fn swap(&self, x: u64) -> u64 {
        if x == 1 {
            self.root_nid
        } else if x == self.root_nid {
            1
        } else {
            x
        }
    }

    fn nid(&self, ino: INodeNo) -> u64 {
        self.swap(ino.0)
    }

    fn ino(&self, nid: u64) -> INodeNo {
        INodeNo(self.swap(nid))
    }

    fn inode(&self, ino: INodeNo) -> Result<Inode, Errno> {
        self.image.inode(self.nid(ino)).map_err(|e| {
            tracing::warn!("inode {}: {e}", ino.0);
            errno_of(&e)
        })
    }

    fn attr(&self, inode: &Inode) -> FileAttr {
        let t = time_of(inode.mtime, inode.mtime_nsec);
        let bs = self.image.block_size();
        FileAttr {
            ino: self.ino(inode.nid),
            size: inode.size,
            blocks: inode.size.next_multiple_of(bs) / 512,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: kind_of_mode(inode.mode),
            perm: (inode.mode & 0o7777) as u16,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: encode_rdev(inode.rdev),
            blksize: 4096,
            flags: 0,
        }
    }

    fn dir_entries(&self, ino: INodeNo) -> Result<Arc<Vec<DirEntry>>, Errno> {
        let nid = self.nid(ino);
        if let Some(entries) = self.dirs.lock().expect("dirs").get(&nid) {
            return Ok(entries.clone());
        }
        let dir = self.inode(ino)?;
        let entries = Arc::new(self.image.read_dir(&dir).map_err(|e| {
            tracing::warn!("readdir of nid {nid}: {e}");
            errno_of(&e)
        })?);
        let mut dirs = self.dirs.lock().expect("dirs");
        if dirs.len() >= DIR_CACHE {
            dirs.clear();
        }
        dirs.insert(nid, entries.clone());
        Ok(entries)
    }

    /// With `--record-trace`: bytes `offset..offset+len` of inode `nid` were read.
    fn record(&self, nid: u64, offset: u64, len: u64) {
        if let Some((rec, index)) = &self.trace {
            if let Some((path, size)) = index.path_of(nid) {
                rec.record(path, size, offset, len);
            }
        }
    }

    fn passthrough_on(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Passthrough is unusable on this mount: say so once (across workers) and stop trying.
    fn disable_passthrough(&self, why: &str) {
        self.passthrough.store(false, Ordering::Relaxed);
        if self.shared.get(Counter::PassthroughDisabled) == 0 {
            self.shared.set(Counter::PassthroughDisabled, 1);
            tracing::warn!("FUSE passthrough disabled, serving reads through lode: {why}");
        }
    }

    /// The backing id to answer an OPEN of `inode` with, or None for a cached open (which
    /// has then been counted).
    fn open_decision(&self, inode: &Inode) -> Option<u32> {
        let nid = inode.nid;
        let stripe = &self.stripes[(nid as usize) % STRIPES];
        let eligible =
            self.passthrough_on() && inode.is_regular() && inode.size >= self.passthrough_min_size;
        {
            let _g = stripe.lock().expect("stripe");
            let id = self.shared.backing_id(nid);
            if id != 0 {
                return Some(id);
            }
            let local = eligible
                && self.shared.cached_opens(nid) == 0
                && self
                    .materializer
                    .is_local(&self.image, inode)
                    .unwrap_or(false);
            if !local {
                self.shared.cached_open(nid);
                return None;
            }
        }
        // Build the backing file without holding the stripe (it may take a while).
        let made = self.materializer.backing_file(&self.image, inode);
        if let Ok((_, m)) = &made {
            if m.created {
                self.shared.add(Counter::MaterializedFiles, 1);
                self.shared.add(Counter::MaterializedBytes, inode.size);
                self.shared
                    .add(Counter::MaterializedDiskBytes, m.disk_bytes);
                if m.reflinked {
                    self.shared.add(Counter::ReflinkedFiles, 1);
                }
            }
        }
        let _g = stripe.lock().expect("stripe");
        let id = self.shared.backing_id(nid);
        if id != 0 {
            return Some(id);
        }
        let (file, _) = match made {
            Ok(x) if self.shared.cached_opens(nid) == 0 && self.passthrough_on() => x,
            Ok(_) => {
                self.shared.cached_open(nid);
                return None;
            }
            Err(e) => {
                tracing::warn!("no backing file for nid {nid}: {e:#}");
                self.shared.cached_open(nid);
                return None;
            }
        };
        match fuser::BackingId::create_raw(&self.fuse_fd, &file) {
            Ok(id) if id > 0 => {
                self.shared.add(Counter::BackingIds, 1);
                // Recorded before the reply: a worker killed after this point leaves the id
                // to its successor, which answers the resent OPEN with it.
                self.shared.set_backing_id(nid, id);
                Some(id)
            }
            Ok(id) => {
                tracing::warn!("BACKING_OPEN returned id {id}");
                self.shared.cached_open(nid);
                None
            }
            Err(e) => {
                let why = match e.raw_os_error() {
                    Some(libc::EPERM) => format!(
                        "BACKING_OPEN: {e} (needs CAP_SYS_ADMIN in the initial user namespace)"
                    ),
                    Some(libc::ELOOP) => format!(
                        "BACKING_OPEN: {e} (the cache directory is on a stacked filesystem such as overlayfs)"
                    ),
                    _ => format!("BACKING_OPEN: {e}"),
                };
                self.disable_passthrough(&why);
                self.shared.cached_open(nid);
                None
            }
        }
    }
}

impl Filesystem for LodeFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        // The connection was initialised by the supervisor; this is fuser's handshake with a
        // synthetic INIT (worker.rs), nothing to negotiate.
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.shared.op(op::LOOKUP);
        let dir = match self.inode(parent) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        if !dir.is_dir() {
            return reply.error(Errno::ENOTDIR);
        }
        match self.image.lookup(&dir, name.as_bytes()) {
            Ok(Some(nid)) => match self.image.inode(nid) {
                Ok(inode) => reply.entry(&TTL, &self.attr(&inode), Generation(0)),
                Err(e) => {
                    tracing::warn!("inode {nid}: {e}");
                    reply.error(errno_of(&e))
                }
            },
            Ok(None) => {
                // A negative entry (node id 0) the kernel may cache.
                let mut attr = self.attr(&dir);
                attr.ino = INodeNo(0);
                reply.entry(&TTL, &attr, Generation(0))
            }
            Err(e) => {
                tracing::warn!("lookup in nid {}: {e}", dir.nid);
                reply.error(errno_of(&e))
            }
        }
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        self.shared.op(op::FORGET);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.shared.op(op::GETATTR);
        match self.inode(ino) {
            Ok(inode) => reply.attr(&TTL, &self.attr(&inode)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.shared.op(op::READLINK);
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if !inode.is_symlink() {
            return reply.error(Errno::EINVAL);
        }
        match self.image.readlink(&inode) {
            Ok(target) => reply.data(&target),
            Err(e) => {
                tracing::warn!("readlink of nid {}: {e}", inode.nid);
                reply.error(errno_of(&e))
            }
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.shared.op(op::OPEN);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match self.open_decision(&inode) {
            Some(id) => {
                self.shared.add(Counter::PassthroughOpens, 1);
                // Its reads never reach us: count the file as read whole.
                self.record(inode.nid, 0, inode.size);
                // SAFETY: `id` is open on this connection and never closed while mounted.
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), &backing);
                // Keep the id: it lives as long as the connection (and outlives this worker).
                let _ = backing.into_raw();
            }
            None => {
                self.shared.add(Counter::CachedOpens, 1);
                reply.opened(
                    FileHandle(FH_CACHED),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                );
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.shared.op(op::READ);
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let want = (size as usize).min(crate::abi::MAX_READ as usize);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.image.read_at(&inode, offset, &mut buf[..want]) {
                Ok(n) => {
                    self.shared.add(Counter::BytesServed, n as u64);
                    reply.data(&buf[..n]);
                    self.record(inode.nid, offset, n as u64);
                }
                Err(e) => {
                    self.shared.add(Counter::ReadErrors, 1);
                    tracing::error!("read of nid {} at {offset}+{size}: {e}", inode.nid);
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.shared.op(op::FLUSH);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.op(op::RELEASE);
        reply.ok();
        // After the reply: a worker killed before it gets the RELEASE again (resent) and
        // decrements once; killed after it, the count stays high, which only delays
        // passthrough for this inode.
        if fh.0 == FH_CACHED {
            self.shared.cached_release(self.nid(ino));
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.shared.op(op::OPENDIR);
        // ENOSYS turns on zero-message opendir for the connection: no OPENDIR/RELEASEDIR
        // round trips, and the kernel then caches listings (FOPEN_KEEP_CACHE|CACHE_DIR).
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.shared.op(op::READDIR);
        let entries = match self.dir_entries(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                self.ino(e.nid),
                i as u64 + 1,
                kind_of_dirent(e.file_type),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.shared.op(op::READDIRPLUS);
        let entries = match self.dir_entries(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let inode = match self.image.inode(e.nid) {
                Ok(x) => x,
                Err(err) => {
                    tracing::warn!("inode {}: {err}", e.nid);
                    return reply.error(errno_of(&err));
                }
            };
            if reply.add(
                self.ino(e.nid),
                i as u64 + 1,
                OsStr::from_bytes(&e.name),
                &TTL,
                &self.attr(&inode),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Only sent before the first OPENDIR was refused (zero-message opendir after).
        self.shared.op(op::RELEASEDIR);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.shared.op(op::STATFS);
        let (blocks, inos) = self.statfs;
        reply.statfs(blocks, 0, 0, inos, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.shared.op(op::GETXATTR);
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let xattrs = match self.image.xattrs(&inode) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("xattrs of nid {}: {e}", inode.nid);
                return reply.error(errno_of(&e));
            }
        };
        match xattrs.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
            None => reply.error(errno(libc::ENODATA)),
            Some((_, value)) if size == 0 => reply.size(value.len() as u32),
            Some((_, value)) if value.len() > size as usize => reply.error(errno(libc::ERANGE)),
            Some((_, value)) => reply.data(value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.shared.op(op::LISTXATTR);
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let xattrs = match self.image.xattrs(&inode) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("xattrs of nid {}: {e}", inode.nid);
                return reply.error(errno_of(&e));
            }
        };
        let mut list = Vec::new();
        for (name, _) in &xattrs {
            list.extend_from_slice(name);
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(errno(libc::ERANGE))
        } else {
            reply.data(&list)
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Not sent with default_permissions; the kernel checks modes itself.
        self.shared.op(op::ACCESS);
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.shared.op(op::IOCTL);
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.shared.op(op::LSEEK);
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        let off = offset as u64;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(Errno::EINVAL);
        }
        if off >= inode.size {
            return reply.error(Errno::ENXIO);
        }
        let want_hole = whence == libc::SEEK_HOLE;
        let mut pos = off;
        while pos < inode.size {
            let e = match self.image.map(&inode, pos) {
                Ok(e) => e,
                Err(err) => return reply.error(errno_of(&err)),
            };
            let is_hole = matches!(e.kind, ExtentKind::Hole);
            if is_hole == want_hole {
                return reply.offset(pos.max(e.logical) as i64);
            }
            pos = e.logical + e.len;
        }
        if want_hole {
            reply.offset(inode.size as i64)
        } else {
            reply.error(Errno::ENXIO)
        }
    }
}
