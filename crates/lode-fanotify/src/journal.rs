//! The shared-memory journal of in-flight events (see the crate docs for the protocol).
//!
//! A memfd created by the supervisor and mapped `MAP_SHARED` by it and by each worker, so
//! what a worker wrote survives its `kill -9`. Layout (all offsets in bytes):
//!
//! ```text
//! 0      header (4096): magic, slot count, worker generation, ready generation, worker pid,
//!        worker restarts, EROFS device, cumulative event counters, fetch counters (previous workers /
//!        current worker)
//! 4096   slot 0 (8192): buf[4096]   the read(2) target of the reader thread leasing it
//!                       state[170]  u32 per event of buf, in order: bit 0 answered,
//!                                   bits 8.. blob index + 1 (0: not yet known)
//! ...    slot 1, 2, … nslots-1
//! ```

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use rustix::mm::{MapFlags, ProtFlags};

use crate::abi::METADATA_LEN;

const MAGIC: u64 = u64::from_le_bytes(*b"LODEFAN1");
const HEADER_SIZE: usize = 4096;
/// Bytes one `read(2)` may return into a slot.
pub const SLOT_BUF: usize = 4096;
/// Most events one slot can hold (metadata-only events of 24 bytes).
pub const SLOT_EVENTS: usize = SLOT_BUF / METADATA_LEN;
const SLOT_SIZE: usize = 8192;
/// Most slots a journal has.
pub const MAX_SLOTS: usize = 256;

const OFF_MAGIC: usize = 0;
const OFF_NSLOTS: usize = 8;
const OFF_GENERATION: usize = 16;
const OFF_READY: usize = 24;
const OFF_WORKER_PID: usize = 32;
const OFF_RESTARTS: usize = 40;
const OFF_EROFS_DEV: usize = 48;
const OFF_COUNTERS: usize = 64;
const OFF_FETCH_PREV: usize = 1024;
const OFF_FETCH_CUR: usize = 1536;

const ANSWERED: u32 = 1;

/// Cumulative event counters kept in the journal header (they survive worker restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Events read (with an fd).
    Events,
    /// Allowed at once: every chunk of the range was present.
    AllowedCached,
    /// Allowed after fetching the range.
    AllowedFilled,
    /// Allowed: nothing to fill (past the end of the blob, or count 0).
    AllowedEmpty,
    /// Denied with EIO (a fetch failed, or an unknown file).
    Denied,
    /// Stale events of a dead worker settled by its successor.
    Settled,
    /// ...of which denied with EIO.
    SettledDenied,
    /// Unjournaled stale fd numbers the successor's sweep answered (should stay 0).
    Swept,
    /// `FAN_Q_OVERFLOW` seen (should stay 0: the queue is unlimited).
    Overflows,
    /// Events on a file that is not one of our blobs.
    Unknown,
    /// Response writes the kernel refused.
    RespondErrors,
}

pub const COUNTERS: [(Counter, &str); 11] = [
    (Counter::Events, "events"),
    (Counter::AllowedCached, "allowed_cached"),
    (Counter::AllowedFilled, "allowed_filled"),
    (Counter::AllowedEmpty, "allowed_empty"),
    (Counter::Denied, "denied_eio"),
    (Counter::Settled, "settled"),
    (Counter::SettledDenied, "settled_denied"),
    (Counter::Swept, "swept"),
    (Counter::Overflows, "overflows"),
    (Counter::Unknown, "unknown_file"),
    (Counter::RespondErrors, "respond_errors"),
];

/// Fetch counters published by the current worker, accumulated over previous ones.
pub const FETCH_COUNTERS: [&str; 6] = [
    "requests",
    "bytes_fetched",
    "chunks_fetched",
    "errors",
    "hits",
    "misses",
];

/// The mapped journal.
pub struct Journal {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
    nslots: usize,
}

// SAFETY: the mapping is only accessed through atomics (header, event states) and through
// slot buffers that exactly one thread (the slot's leaseholder) uses at a time, by raw
// pointers.
unsafe impl Send for Journal {}
// SAFETY: as above.
unsafe impl Sync for Journal {}

impl Journal {
    /// A new zeroed journal with `nslots` slots (supervisor).
    pub fn create(nslots: usize) -> Result<Journal> {
        if nslots == 0 || nslots > MAX_SLOTS {
            bail!("journal slots must be 1..={MAX_SLOTS}");
        }
        let fd = rustix::fs::memfd_create(
            "lode-fanotify-journal",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .context("memfd_create")?;
        let len = HEADER_SIZE + nslots * SLOT_SIZE;
        rustix::fs::ftruncate(&fd, len as u64).context("sizing the journal")?;
        let mut j = Journal::map(fd, len)?;
        j.nslots = nslots;
        j.u64_at(OFF_NSLOTS).store(nslots as u64, Ordering::Relaxed);
        j.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);
        // Its size never changes again.
        let _ = rustix::fs::fcntl_add_seals(
            &j.fd,
            rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SEAL,
        );
        Ok(j)
    }

    /// Maps a journal the supervisor created (worker).
    pub fn open(fd: OwnedFd) -> Result<Journal> {
        let size = rustix::fs::fstat(&fd).context("journal fd")?.st_size as usize;
        if size < HEADER_SIZE {
            bail!("the journal fd is too small ({size} bytes)");
        }
        let mut j = Journal::map(fd, size)?;
        if j.u64_at(OFF_MAGIC).load(Ordering::Acquire) != MAGIC {
            bail!("the journal fd does not hold a lode fanotify journal");
        }
        let nslots = j.u64_at(OFF_NSLOTS).load(Ordering::Relaxed) as usize;
        if nslots == 0 || nslots > MAX_SLOTS || HEADER_SIZE + nslots * SLOT_SIZE > size {
            bail!("the journal header is inconsistent ({nslots} slots, {size} bytes)");
        }
        j.nslots = nslots;
        Ok(j)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Journal> {
        // SAFETY: a fresh shared mapping of a memfd we hold; no Rust object aliases it. It is
        // unmapped in Drop, and all access goes through the methods below.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .context("mapping the journal")?;
        Ok(Journal {
            fd,
            base: NonNull::new(p.cast()).context("mmap returned NULL")?,
            len,
            nslots: 0,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn nslots(&self) -> usize {
        self.nslots
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= HEADER_SIZE);
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the memory lives as
        // long as `self` and is only ever accessed atomically at this offset.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    fn state(&self, slot: usize, i: usize) -> &AtomicU32 {
        assert!(slot < self.nslots && i < SLOT_EVENTS);
        let off = HEADER_SIZE + slot * SLOT_SIZE + SLOT_BUF + 4 * i;
        // SAFETY: in bounds (SLOT_BUF + 4 * SLOT_EVENTS < SLOT_SIZE), 4-aligned, only
        // accessed atomically; lives as long as `self`.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    fn slot_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.nslots);
        // SAFETY: in bounds of the mapping.
        unsafe { self.base.as_ptr().add(HEADER_SIZE + slot * SLOT_SIZE) }
    }

    // ---- header ----

    /// Starts a new worker incarnation: returns its generation and folds the previous
    /// worker's published fetch counters into the "previous" totals.
    pub fn begin_generation(&self, pid: u32) -> u64 {
        for i in 0..FETCH_COUNTERS.len() {
            let cur = self.u64_at(OFF_FETCH_CUR + 8 * i).swap(0, Ordering::AcqRel);
            self.u64_at(OFF_FETCH_PREV + 8 * i)
                .fetch_add(cur, Ordering::AcqRel);
        }
        self.u64_at(OFF_WORKER_PID)
            .store(pid as u64, Ordering::Release);
        self.u64_at(OFF_GENERATION).fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn generation(&self) -> u64 {
        self.u64_at(OFF_GENERATION).load(Ordering::Acquire)
    }

    /// The worker of `generation` settled its predecessors' events and serves.
    pub fn set_ready(&self, generation: u64) {
        self.u64_at(OFF_READY).store(generation, Ordering::Release);
    }

    pub fn ready_generation(&self) -> u64 {
        self.u64_at(OFF_READY).load(Ordering::Acquire)
    }

    pub fn worker_pid(&self) -> u32 {
        self.u64_at(OFF_WORKER_PID).load(Ordering::Acquire) as u32
    }

    pub fn add_restart(&self) {
        self.u64_at(OFF_RESTARTS).fetch_add(1, Ordering::AcqRel);
    }

    pub fn restarts(&self) -> u64 {
        self.u64_at(OFF_RESTARTS).load(Ordering::Acquire)
    }

    /// `st_dev` of the mounted EROFS superblock (0 until mounted).
    pub fn set_erofs_dev(&self, dev: u64) {
        self.u64_at(OFF_EROFS_DEV).store(dev, Ordering::Release);
    }

    pub fn erofs_dev(&self) -> u64 {
        self.u64_at(OFF_EROFS_DEV).load(Ordering::Acquire)
    }

    pub fn count(&self, c: Counter, n: u64) {
        self.u64_at(OFF_COUNTERS + 8 * c as usize)
            .fetch_add(n, Ordering::Relaxed);
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.u64_at(OFF_COUNTERS + 8 * c as usize)
            .load(Ordering::Relaxed)
    }

    /// Publishes the current worker's fetch counters (in [`FETCH_COUNTERS`] order).
    pub fn publish_fetch(&self, values: &[u64; FETCH_COUNTERS.len()]) {
        for (i, v) in values.iter().enumerate() {
            self.u64_at(OFF_FETCH_CUR + 8 * i)
                .store(*v, Ordering::Relaxed);
        }
    }

    /// Fetch counters of every worker so far (previous ones plus the current one's last
    /// published values).
    pub fn fetch_totals(&self) -> [u64; FETCH_COUNTERS.len()] {
        std::array::from_fn(|i| {
            self.u64_at(OFF_FETCH_PREV + 8 * i).load(Ordering::Relaxed)
                + self.u64_at(OFF_FETCH_CUR + 8 * i).load(Ordering::Relaxed)
        })
    }

    // ---- slots ----

    /// Forgets a slot's events, which must all be answered and their fds closed: the
    /// buffer is zeroed first, so a crash half way leaves no event without its flag.
    pub fn clear_slot(&self, slot: usize) {
        // SAFETY: the slot buffer is in bounds and used by this slot's thread only.
        unsafe { std::ptr::write_bytes(self.slot_ptr(slot), 0, SLOT_BUF) };
        fence(Ordering::SeqCst);
        for i in 0..SLOT_EVENTS {
            self.state(slot, i).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }

    /// `read(2)` of the group straight into the slot buffer: the moment the kernel has
    /// handed us events (and installed their fds) they are in the journal.
    pub fn read_into_slot(&self, slot: usize, group: BorrowedFd<'_>) -> io::Result<usize> {
        // SAFETY: the kernel writes at most SLOT_BUF bytes into the slot buffer, which is in
        // bounds and used by this slot's thread only; no Rust reference to it exists.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&group),
                self.slot_ptr(slot).cast(),
                SLOT_BUF,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// A copy of the first `n` bytes of a slot's buffer.
    pub fn slot_bytes(&self, slot: usize, n: usize) -> Vec<u8> {
        let n = n.min(SLOT_BUF);
        let mut v = vec![0u8; n];
        // SAFETY: in bounds; the slot is not written concurrently (its thread is the caller,
        // or its worker is dead).
        unsafe { std::ptr::copy_nonoverlapping(self.slot_ptr(slot), v.as_mut_ptr(), n) };
        v
    }

    /// Records which blob event `i` of a slot is about (so a successor fills only it).
    pub fn set_blob(&self, slot: usize, i: usize, blob: usize) {
        if i < SLOT_EVENTS {
            self.state(slot, i)
                .store(((blob as u32 + 1) << 8) & !ANSWERED, Ordering::Release);
        }
    }

    /// Event `i` of a slot has been answered (call after the response write, before
    /// closing its fd).
    pub fn set_answered(&self, slot: usize, i: usize) {
        if i < SLOT_EVENTS {
            self.state(slot, i).fetch_or(ANSWERED, Ordering::AcqRel);
        }
    }

    /// `(answered, blob)` of event `i` of a slot.
    pub fn event_state(&self, slot: usize, i: usize) -> (bool, Option<usize>) {
        if i >= SLOT_EVENTS {
            return (false, None);
        }
        let s = self.state(slot, i).load(Ordering::Acquire);
        let blob = (s >> 8) as usize;
        (s & ANSWERED != 0, blob.checked_sub(1))
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `map` with this address and length, and no
        // reference into it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_between_two_mappings() {
        let a = Journal::create(3).unwrap();
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = Journal::open(fd).unwrap();
        assert_eq!(b.nslots(), 3);
        let g = b.begin_generation(7);
        assert_eq!(a.generation(), g);
        assert_eq!(a.worker_pid(), 7);
        b.set_blob(2, 5, 3);
        assert_eq!(a.event_state(2, 5), (false, Some(3)));
        b.set_answered(2, 5);
        assert_eq!(a.event_state(2, 5), (true, Some(3)));
        b.count(Counter::Settled, 2);
        assert_eq!(a.counter(Counter::Settled), 2);
        b.publish_fetch(&[1, 2, 3, 4, 5, 6]);
        b.begin_generation(8);
        b.publish_fetch(&[1, 1, 1, 1, 1, 1]);
        assert_eq!(a.fetch_totals(), [2, 3, 4, 5, 6, 7]);
        a.clear_slot(2);
        assert_eq!(b.event_state(2, 5), (false, None));
        assert!(b.slot_bytes(2, SLOT_BUF).iter().all(|&x| x == 0));
    }

    #[test]
    fn read_lands_in_the_slot() {
        let j = Journal::create(1).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&w, b"hello").unwrap();
        assert_eq!(j.read_into_slot(0, r.as_fd()).unwrap(), 5);
        assert_eq!(j.slot_bytes(0, 5), b"hello");
    }
}
