//! The few system calls rustix has no safe wrapper for: adopting descriptors the kernel (or
//! the supervisor) put in our fd table by number, and `CACHEFILES_IOC_READ_COMPLETE`.
//! Everything unsafe in this crate is in this file, each use checked before it is made.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use rustix::io::FdFlags;

use crate::abi;

/// Where the on-demand cache device lives.
pub const DEVICE_PATH: &str = "/dev/cachefiles";

/// What `/proc/self/fd/N` says for a descriptor.
fn fd_target(fd: RawFd) -> Option<Vec<u8>> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.as_os_str().as_bytes().to_vec())
}

/// Takes ownership of descriptor `fd` if `/proc/self/fd/fd` names `expected` (so a wrong
/// number can never make us close a descriptor something else owns).
fn adopt(fd: RawFd, expected: &[u8]) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    match fd_target(fd) {
        Some(t) if t == expected => {
            // SAFETY: the descriptor is open (its /proc link exists) and is the kernel object
            // we expect. It was installed for this process by the kernel (an OPEN's anonymous
            // fd) or inherited from the supervisor, and no other owner exists in this process:
            // callers adopt each number once, right after learning it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        Some(t) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fd {fd} is {}, not {}",
                String::from_utf8_lossy(&t),
                String::from_utf8_lossy(expected)
            ),
        )),
        None => Err(io::Error::from_raw_os_error(libc::EBADF)),
    }
}

/// Adopts a listening Unix socket inherited from the supervisor.
pub fn inherit_listener(fd: RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    let link = fd_target(fd).ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
    if !link.starts_with(b"socket:") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fd {fd} is {}, not a socket",
                String::from_utf8_lossy(&link)
            ),
        ));
    }
    let fd = adopt(fd, &link)?;
    rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
    Ok(std::os::unix::net::UnixListener::from(fd))
}

/// Lets a descriptor survive exec.
pub fn set_inheritable(fd: &impl AsFd) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, FdFlags::empty())?;
    Ok(())
}

/// `/dev/cachefiles`, opened read-write.
pub struct Device {
    fd: OwnedFd,
}

impl Device {
    /// Opens the device (close-on-exec; see [`Device::set_inheritable`]).
    pub fn open() -> io::Result<Device> {
        let fd = rustix::fs::open(DEVICE_PATH, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Device { fd })
    }

    /// Adopts the device descriptor inherited from the supervisor.
    pub fn inherit(fd: RawFd) -> io::Result<Device> {
        let fd = adopt(fd, DEVICE_PATH.as_bytes())?;
        rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
        Ok(Device { fd })
    }

    /// Lets the descriptor survive exec (for the worker the supervisor starts).
    pub fn set_inheritable(&self) -> io::Result<()> {
        rustix::io::fcntl_setfd(&self.fd, FdFlags::empty())?;
        Ok(())
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends one text command; the kernel's errno comes back as the error.
    pub fn command(&self, cmd: &[u8]) -> io::Result<()> {
        let n = rustix::io::write(&self.fd, cmd)?;
        if n != cmd.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short command write ({n} of {} bytes)", cmd.len()),
            ));
        }
        Ok(())
    }

    /// Reads one message into `buf`; `Ok(0)` means nothing is pending (not end of file).
    pub fn read_message(&self, buf: &mut [u8; abi::MSG_MAX_SIZE]) -> io::Result<usize> {
        loop {
            match rustix::io::read(&self.fd, &mut buf[..]) {
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which are readable.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    match poll(&mut pfds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect())
}

/// The anonymous per-object descriptor of an OPEN ("[cachefiles]", write-only).
pub struct AnonFd {
    fd: OwnedFd,
}

impl AnonFd {
    /// Adopts the fd number an OPEN message carried (checked to be a cachefiles anon fd) and
    /// makes it close-on-exec (the kernel installs it without).
    pub fn adopt(fd: i32) -> io::Result<AnonFd> {
        let fd = adopt(fd, b"anon_inode:[cachefiles]")?;
        rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
        Ok(AnonFd { fd })
    }

    /// Writes `buf` (4 KiB-aligned memory, length a multiple of 4 KiB) at `offset` (a
    /// multiple of 4 KiB) of the cache file.
    pub fn pwrite_all(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        debug_assert_eq!(buf.as_ptr() as usize % abi::PAGE_SIZE as usize, 0);
        debug_assert_eq!(buf.len() as u64 % abi::PAGE_SIZE, 0);
        debug_assert_eq!(offset % abi::PAGE_SIZE, 0);
        while !buf.is_empty() {
            match rustix::io::pwrite(&self.fd, buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "cache file write returned 0",
                    ))
                }
                // Keep later writes page-aligned even if the kernel ever wrote a partial page.
                Ok(n) => {
                    let n = n - n % abi::PAGE_SIZE as usize;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "cache file write was shorter than a page",
                        ));
                    }
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `ioctl(fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)`: wakes the reader. If the start of
    /// the requested range is still a hole, the reader gets EIO.
    pub fn read_complete(&self, msg_id: u32) -> io::Result<()> {
        // SAFETY: a plain ioctl on a descriptor we own; the argument is an integer passed by
        // value (the kernel reads `arg` itself, not memory behind it), so no memory is shared.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                abi::CACHEFILES_IOC_READ_COMPLETE as _,
                msg_id as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A page-aligned byte buffer for O_DIRECT writes, without unsafe allocation: a `Vec` one
/// page longer than needed, used from its first page-aligned byte.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes (rounded up to whole pages).
    pub fn new(capacity: usize) -> AlignedBuf {
        let page = abi::PAGE_SIZE as usize;
        let capacity = capacity.div_ceil(page).max(1) * page;
        let storage = vec![0u8; capacity + page];
        let start = storage.as_ptr().align_offset(page);
        assert!(start < page, "cannot align a byte buffer");
        AlignedBuf {
            storage,
            start,
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The first `len` bytes (len ≤ capacity), page-aligned.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.start..self.start + len]
    }

    pub fn slice(&self, len: usize) -> &[u8] {
        &self.storage[self.start..self.start + len]
    }
}

/// Whether a path names an existing file system object (sysfs probes).
pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// `OsStr` of a byte key (cache keys are ASCII; the fallback is lossless anyway).
pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers() {
        for cap in [1, 4096, 5000, 1 << 20] {
            let mut b = AlignedBuf::new(cap);
            assert!(b.capacity() >= cap);
            assert_eq!(b.capacity() % 4096, 0);
            let s = b.slice_mut(b.capacity());
            assert_eq!(s.as_ptr() as usize % 4096, 0);
            s[0] = 1;
        }
    }

    #[test]
    fn adoption_checks_what_the_descriptor_is() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let raw = f.as_raw_fd();
        // A regular file is neither the device nor an anon fd: refused, and not closed.
        assert!(AnonFd::adopt(raw).is_err());
        assert!(Device::inherit(raw).is_err());
        assert!(AnonFd::adopt(-1).is_err());
        assert!(fd_target(raw).is_some());
        drop(f);
    }
}
