//! State that must outlive a worker: a `memfd` the supervisor creates per mount and every
//! worker maps. It holds
//!
//! - the counters (FUSE requests per opcode, bytes served, passthrough opens, …), so they
//!   survive a worker restart and the supervisor can report them;
//! - per nid, the passthrough `backing_id` (ids belong to the FUSE connection, not to the
//!   worker that opened them: a new worker must answer with the same id, or the kernel
//!   refuses an open of an inode that still has passthrough files open) and the number of
//!   open non-passthrough (cached) handles (an inode with cached opens must not get a
//!   passthrough open: the kernel would fail it with EIO).
//!
//! Everything is an atomic in a `MAP_SHARED` mapping, so a worker killed at any instant
//! leaves it consistent.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

const MAGIC: u64 = u64::from_le_bytes(*b"LODEFUSE");
const HEADER: usize = 4096;
const SLOT: usize = 8;

/// Opcodes are counted in slots 0..64 of the counter array.
pub const OPCODE_SLOTS: usize = 64;

/// Named counters, after the opcode slots.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Counter {
    /// Bytes returned by READ replies (non-passthrough reads).
    BytesServed = OPCODE_SLOTS,
    /// Opens answered with FOPEN_PASSTHROUGH.
    PassthroughOpens,
    /// Opens answered without passthrough (the kernel sends READs).
    CachedOpens,
    /// Backing files made / their apparent bytes / their allocated bytes.
    MaterializedFiles,
    MaterializedBytes,
    MaterializedDiskBytes,
    /// Backing files made with FICLONERANGE (no extra disk space).
    ReflinkedFiles,
    /// BACKING_OPEN ioctls that succeeded.
    BackingIds,
    /// READs answered with EIO (fetch or read failures).
    ReadErrors,
    /// Workers started (1 + restarts).
    WorkerStarts,
    /// 1 once passthrough has been found unusable (and said so in the log).
    PassthroughDisabled,
    /// The pid of the current worker.
    WorkerPid,
    /// Range requests to the backend, bytes received, failed fetches (all workers).
    FetchRequests,
    FetchBytes,
    FetchErrors,
    /// Reads that needed data not yet in the cache (each waited for a fetch).
    FetchMisses,
    /// Requests sent for those reads (the rest were background prefetch).
    FetchForegroundRequests,
    Last,
}

const COUNTERS: usize = Counter::Last as usize;
const _: () = assert!(16 + COUNTERS * 8 <= HEADER);

/// The mapped state.
pub struct Shared {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
    slots: u64,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Creates a new state with room for nids `0..slots`.
    pub fn create(slots: u64) -> Result<Shared> {
        let fd = rustix::fs::memfd_create("lode-fuse-state", rustix::fs::MemfdFlags::CLOEXEC)
            .context("memfd_create")?;
        let len = HEADER as u64 + slots * SLOT as u64;
        rustix::fs::ftruncate(&fd, len).context("sizing the state memfd")?;
        let s = Self::map(fd)?;
        s.header(0).store(MAGIC, Ordering::Relaxed);
        s.header(1).store(slots, Ordering::Relaxed);
        Ok(s)
    }

    /// Maps a state made by [`Shared::create`] (in another process).
    pub fn open(fd: OwnedFd) -> Result<Shared> {
        let s = Self::map(fd)?;
        if s.header(0).load(Ordering::Relaxed) != MAGIC {
            bail!("the shared state fd does not hold lode-fuse state");
        }
        Ok(s)
    }

    fn map(fd: OwnedFd) -> Result<Shared> {
        let len = rustix::fs::fstat(&fd)?.st_size as usize;
        if len < HEADER {
            bail!("state memfd too small ({len} bytes)");
        }
        // SAFETY: a fresh shared mapping of the whole file; unmapped in Drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .context("mapping the state memfd")? as *mut u8;
        let slots = ((len - HEADER) / SLOT) as u64;
        Ok(Shared {
            fd,
            ptr,
            len,
            slots,
        })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn header(&self, i: usize) -> &AtomicU64 {
        // SAFETY: in bounds (i < 2), 8-aligned (page-aligned mapping), lives as long as self.
        unsafe { &*(self.ptr.add(i * 8) as *const AtomicU64) }
    }

    fn counter_ref(&self, i: usize) -> &AtomicU64 {
        assert!(i < COUNTERS);
        // SAFETY: as above; the counters start at byte 16 of the header page.
        unsafe { &*(self.ptr.add(16 + i * 8) as *const AtomicU64) }
    }

    pub fn add(&self, c: Counter, n: u64) {
        self.counter_ref(c as usize).fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, c: Counter, v: u64) {
        self.counter_ref(c as usize).store(v, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.counter_ref(c as usize).load(Ordering::Relaxed)
    }

    /// Counts one request of `opcode`.
    pub fn op(&self, opcode: u32) {
        if (opcode as usize) < OPCODE_SLOTS {
            self.counter_ref(opcode as usize)
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn op_count(&self, opcode: u32) -> u64 {
        if (opcode as usize) < OPCODE_SLOTS {
            self.counter_ref(opcode as usize).load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn slot(&self, nid: u64, half: usize) -> Option<&AtomicU32> {
        if nid >= self.slots {
            return None;
        }
        // SAFETY: nid < slots keeps it inside the mapping; 4-aligned.
        Some(unsafe {
            &*(self.ptr.add(HEADER + nid as usize * SLOT + half * 4) as *const AtomicU32)
        })
    }

    /// The backing id recorded for `nid` (0: none).
    pub fn backing_id(&self, nid: u64) -> u32 {
        self.slot(nid, 1)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    pub fn set_backing_id(&self, nid: u64, id: u32) {
        if let Some(a) = self.slot(nid, 1) {
            a.store(id, Ordering::Release);
        }
    }

    /// Open cached (non-passthrough) handles of `nid`; `u32::MAX` for nids out of range,
    /// which therefore never get passthrough.
    pub fn cached_opens(&self, nid: u64) -> u32 {
        self.slot(nid, 0)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(u32::MAX)
    }

    pub fn cached_open(&self, nid: u64) {
        if let Some(a) = self.slot(nid, 0) {
            a.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn cached_release(&self, nid: u64) {
        if let Some(a) = self.slot(nid, 0) {
            let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr as *mut _, self.len);
        }
    }
}

/// Opcode names for the stats.
pub fn opcode_name(op: u32) -> Option<&'static str> {
    Some(match op {
        1 => "lookup",
        2 => "forget",
        3 => "getattr",
        5 => "readlink",
        14 => "open",
        15 => "read",
        17 => "statfs",
        18 => "release",
        22 => "getxattr",
        23 => "listxattr",
        25 => "flush",
        27 => "opendir",
        28 => "readdir",
        29 => "releasedir",
        34 => "access",
        39 => "ioctl",
        40 => "poll",
        42 => "batch_forget",
        44 => "readdirplus",
        46 => "lseek",
        _ => return None,
    })
}

/// A JSON snapshot of the counters.
pub fn snapshot(s: &Shared) -> serde_json::Value {
    let mut ops = serde_json::Map::new();
    for op in 0..OPCODE_SLOTS as u32 {
        let n = s.op_count(op);
        if n > 0 {
            let name = opcode_name(op)
                .map(str::to_string)
                .unwrap_or_else(|| format!("op{op}"));
            ops.insert(name, n.into());
        }
    }
    serde_json::json!({
        "requests": ops,
        "bytes_served": s.get(Counter::BytesServed),
        "passthrough_opens": s.get(Counter::PassthroughOpens),
        "cached_opens": s.get(Counter::CachedOpens),
        "materialized_files": s.get(Counter::MaterializedFiles),
        "materialized_bytes": s.get(Counter::MaterializedBytes),
        "materialized_disk_bytes": s.get(Counter::MaterializedDiskBytes),
        "reflinked_files": s.get(Counter::ReflinkedFiles),
        "backing_ids": s.get(Counter::BackingIds),
        "read_errors": s.get(Counter::ReadErrors),
        "worker_starts": s.get(Counter::WorkerStarts),
        "worker_pid": s.get(Counter::WorkerPid),
        "passthrough_disabled": s.get(Counter::PassthroughDisabled) != 0,
        "fetch_requests": s.get(Counter::FetchRequests),
        "fetch_bytes": s.get(Counter::FetchBytes),
        "fetch_errors": s.get(Counter::FetchErrors),
        "fetch_misses": s.get(Counter::FetchMisses),
        "fetch_foreground_requests": s.get(Counter::FetchForegroundRequests),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_shared_through_the_fd() {
        let a = Shared::create(100).unwrap();
        a.op(15);
        a.add(Counter::BytesServed, 4096);
        a.set_backing_id(7, 3);
        a.cached_open(9);
        a.cached_open(9);
        let fd = rustix::io::dup(a.fd()).unwrap();
        let b = Shared::open(fd).unwrap();
        assert_eq!(b.op_count(15), 1);
        assert_eq!(b.get(Counter::BytesServed), 4096);
        assert_eq!(b.backing_id(7), 3);
        assert_eq!(b.cached_opens(9), 2);
        b.cached_release(9);
        b.cached_release(9);
        b.cached_release(9);
        assert_eq!(a.cached_opens(9), 0, "never below zero");
        // Out of range: never passthrough, never a crash.
        assert_eq!(a.cached_opens(1000), u32::MAX);
        a.set_backing_id(1000, 5);
        assert_eq!(a.backing_id(1000), 0);
        assert_eq!(snapshot(&b)["requests"]["read"], 1);
    }
}
