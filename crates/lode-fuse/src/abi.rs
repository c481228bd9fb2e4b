//! The few raw pieces of the FUSE kernel interface lode handles itself (layouts from
//! shared/spec/fuse-passthrough.md and `include/uapi/linux/fuse.h`):
//!
//! - `mount(2)` of a `/dev/fuse` fd;
//! - the INIT handshake, answered once per mount by the supervisor (not by a worker, so a
//!   worker can be replaced at any time without the kernel ever noticing);
//! - a synthetic INIT request that lets `fuser` run its usual handshake against a socket
//!   before it is pointed at the already initialised `/dev/fuse` fd (see `worker.rs`);
//! - `FUSE_NOTIFY_RESEND`, which makes the kernel queue again every request a dead worker had
//!   read but not answered.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const FUSE_INIT: u32 = 26;
pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
const INIT_IN_LEN: usize = 64;
const INIT_OUT_LEN: usize = 64;
/// `enum fuse_notify_code`: FUSE_NOTIFY_RESEND (7.40, Linux 6.9).
pub const FUSE_NOTIFY_RESEND: i32 = 7;
/// Largest read the kernel sends (FUSE_MAX_PAGES × 4 KiB) and our `max_read`.
pub const MAX_READ: u32 = 1 << 20;
pub const MAX_PAGES: u16 = (MAX_READ / 4096) as u16;

/// INIT flag bits (64-bit set: `flags` | `flags2 << 32`).
pub mod flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const WRITEBACK_CACHE: u64 = 1 << 16;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const HAS_RESEND: u64 = 1 << 39;
}

/// The kernel's INIT request.
#[derive(Debug, Clone, Copy)]
pub struct InitRequest {
    pub unique: u64,
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// Offered flags, both words.
    pub flags: u64,
}

/// What the INIT reply settled; handed to every worker.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Negotiated {
    pub major: u32,
    pub minor: u32,
    pub kernel_minor: u32,
    pub max_readahead: u32,
    /// Flags in force (offered ∩ requested).
    pub flags: u64,
    /// Flags the kernel offered.
    pub offered: u64,
    pub passthrough: bool,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads one request from a fresh connection and parses it as INIT.
pub fn read_init(fd: BorrowedFd<'_>) -> Result<InitRequest> {
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        match rustix::io::read(fd, &mut buf[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
            Err(e) => return Err(io::Error::from(e)).context("reading INIT from /dev/fuse"),
        }
    };
    if n < IN_HEADER_LEN + 16 {
        bail!("short first request from /dev/fuse ({n} bytes)");
    }
    let opcode = u32_at(&buf, 4);
    if opcode != FUSE_INIT {
        bail!("first request from /dev/fuse has opcode {opcode}, expected INIT");
    }
    let body = &buf[IN_HEADER_LEN..n];
    let mut flags = u32_at(body, 12) as u64;
    if body.len() >= 20 && flags & flags::INIT_EXT != 0 {
        flags |= (u32_at(body, 16) as u64) << 32;
    }
    Ok(InitRequest {
        unique: u64_at(&buf, 8),
        major: u32_at(body, 0),
        minor: u32_at(body, 4),
        max_readahead: u32_at(body, 8),
        flags,
    })
}

/// The flags lode asks for. No WRITEBACK_CACHE (it would switch passthrough off), no
/// AUTO_INVAL_DATA (the image never changes), CACHE_SYMLINKS and READDIRPLUS for fewer
/// round trips, MAX_PAGES for 1 MiB reads.
fn wanted_flags(passthrough: bool) -> u64 {
    let mut f = flags::ASYNC_READ
        | flags::BIG_WRITES
        | flags::DO_READDIRPLUS
        | flags::READDIRPLUS_AUTO
        | flags::ASYNC_DIO
        | flags::PARALLEL_DIROPS
        | flags::POSIX_ACL
        | flags::MAX_PAGES
        | flags::CACHE_SYMLINKS
        | flags::INIT_EXT;
    if passthrough {
        f |= flags::PASSTHROUGH;
    }
    f
}

/// The highest protocol minor lode speaks (the layouts it uses have not changed since).
pub const OUR_MINOR: u32 = 41;

/// Answers INIT: 1 MiB reads, passthrough with `max_stack_depth = 1` when wanted and offered
/// (so the mount itself may still be an overlayfs lower layer).
pub fn reply_init(fd: BorrowedFd<'_>, req: &InitRequest, passthrough: bool) -> Result<Negotiated> {
    if req.major != 7 {
        bail!(
            "kernel FUSE protocol {}.{} (lode speaks 7.x)",
            req.major,
            req.minor
        );
    }
    let minor = req.minor.min(OUR_MINOR);
    let flags = wanted_flags(passthrough) & (req.flags | flags::INIT_EXT);
    let passthrough = flags & flags::PASSTHROUGH != 0;
    let max_readahead = req.max_readahead.min(MAX_READ);
    let mut out = [0u8; OUT_HEADER_LEN + INIT_OUT_LEN];
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[8..16].copy_from_slice(&req.unique.to_le_bytes());
    let b = &mut out[OUT_HEADER_LEN..];
    b[0..4].copy_from_slice(&7u32.to_le_bytes());
    b[4..8].copy_from_slice(&minor.to_le_bytes());
    b[8..12].copy_from_slice(&max_readahead.to_le_bytes());
    b[12..16].copy_from_slice(&(flags as u32).to_le_bytes());
    b[16..18].copy_from_slice(&64u16.to_le_bytes()); // max_background
    b[18..20].copy_from_slice(&48u16.to_le_bytes()); // congestion_threshold
    b[20..24].copy_from_slice(&(128u32 << 10).to_le_bytes()); // max_write (read-only fs)
    b[24..28].copy_from_slice(&1u32.to_le_bytes()); // time_gran: 1 ns
    b[28..30].copy_from_slice(&MAX_PAGES.to_le_bytes());
    b[32..36].copy_from_slice(&((flags >> 32) as u32).to_le_bytes());
    let depth: u32 = if passthrough { 1 } else { 0 };
    b[36..40].copy_from_slice(&depth.to_le_bytes());
    write_all(fd, &out).context("writing the INIT reply")?;
    Ok(Negotiated {
        major: 7,
        minor,
        kernel_minor: req.minor,
        max_readahead,
        flags,
        offered: req.flags,
        passthrough,
    })
}

/// An INIT request as the kernel would send it for `neg`, for fuser's handshake.
pub fn synthetic_init(neg: &Negotiated) -> Vec<u8> {
    let mut m = vec![0u8; IN_HEADER_LEN + INIT_IN_LEN];
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_le_bytes());
    m[4..8].copy_from_slice(&FUSE_INIT.to_le_bytes());
    m[8..16].copy_from_slice(&2u64.to_le_bytes());
    let b = &mut m[IN_HEADER_LEN..];
    b[0..4].copy_from_slice(&neg.major.to_le_bytes());
    b[4..8].copy_from_slice(&neg.minor.to_le_bytes());
    b[8..12].copy_from_slice(&neg.max_readahead.to_le_bytes());
    b[12..16].copy_from_slice(&((neg.flags | flags::INIT_EXT) as u32).to_le_bytes());
    b[16..20].copy_from_slice(&((neg.flags >> 32) as u32).to_le_bytes());
    m
}

fn write_all(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<()> {
    loop {
        match rustix::io::write(fd, buf) {
            Ok(n) if n == buf.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short write to /dev/fuse ({n} of {} bytes)",
                    buf.len()
                )))
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `FUSE_NOTIFY_RESEND`: the kernel moves every request that was read from this connection
/// but not answered back to the pending queue (unique | 1<<63), so a new worker gets them.
pub fn notify_resend(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut out = [0u8; OUT_HEADER_LEN];
    out[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    out[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    write_all(fd, &out)
}

/// Opens `/dev/fuse` (close-on-exec; workers get it through an explicit dup2).
pub fn open_dev_fuse() -> Result<OwnedFd> {
    rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(io::Error::from)
    .context("opening /dev/fuse (is the fuse module loaded?)")
}

/// mount(2) of a FUSE filesystem served through `fd`: read-only, nodev, `default_permissions`
/// (the kernel checks modes/owners/ACLs from our attributes), `allow_other`.
pub fn mount_fuse(fd: BorrowedFd<'_>, mountpoint: &Path, source: &str) -> Result<()> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions,allow_other,max_read={MAX_READ}",
        fd.as_raw_fd()
    );
    let data = std::ffi::CString::new(data).expect("no NUL");
    rustix::mount::mount(
        source,
        mountpoint,
        "fuse.lode",
        rustix::mount::MountFlags::RDONLY | rustix::mount::MountFlags::NODEV,
        Some(data.as_c_str()),
    )
    .map_err(io::Error::from)
    .with_context(|| format!("mount -t fuse.lode on {}", mountpoint.display()))
}

/// Raises the FUSE mount's readahead (bdi `read_ahead_kb`) to 1 MiB, best effort: the
/// kernel only lets INIT lower it from the VM default of 128 KiB.
pub fn raise_readahead(mountpoint: &Path) {
    // The device number comes from mountinfo: a stat of the mount point would be a FUSE
    // request, and the caller (the supervisor) must never wait on its own mount.
    let Some((major, minor)) = mount_dev(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{}", MAX_READ >> 10)) {
        tracing::debug!("could not raise {path}: {e}");
    }
}

/// `major:minor` of the `fuse.lode` mount at `mountpoint`, from /proc/self/mountinfo.
pub fn mount_dev(mountpoint: &Path) -> Option<(u32, u32)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()) && l.contains(" fuse.lode "))
        .and_then(|l| {
            let (a, b) = l.split(' ').nth(2)?.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
}

/// Whether this process has CAP_SYS_ADMIN in its effective set (needed for BACKING_OPEN).
pub fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Whether a handle is a FUSE device (by its rdev: 10:229).
pub fn is_dev_fuse(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| {
        let rdev = st.st_rdev;
        libc::major(rdev) == 10 && libc::minor(rdev) == 229
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiated(flags: u64) -> Negotiated {
        Negotiated {
            major: 7,
            minor: 41,
            kernel_minor: 45,
            max_readahead: 1 << 20,
            flags,
            offered: flags,
            passthrough: flags & flags::PASSTHROUGH != 0,
        }
    }

    #[test]
    fn synthetic_init_round_trips_through_the_parser() {
        let neg = negotiated(flags::ASYNC_READ | flags::MAX_PAGES | flags::PASSTHROUGH);
        let msg = synthetic_init(&neg);
        assert_eq!(msg.len(), 104, "the size the 6.18 kernel sends");
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::io::write(&a, &msg).unwrap();
        let init = read_init(b.as_fd()).unwrap();
        assert_eq!((init.major, init.minor), (7, 41));
        assert_eq!(init.max_readahead, 1 << 20);
        assert_eq!(
            init.flags,
            flags::ASYNC_READ | flags::MAX_PAGES | flags::PASSTHROUGH | flags::INIT_EXT
        );
    }

    #[test]
    fn init_reply_layout_enables_passthrough_only_when_offered() {
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        for (offered, want, expect) in [
            (flags::PASSTHROUGH | flags::MAX_PAGES, true, true),
            (flags::MAX_PAGES, true, false),
            (flags::PASSTHROUGH, false, false),
        ] {
            let req = InitRequest {
                unique: 99,
                major: 7,
                minor: 45,
                max_readahead: 128 << 10,
                flags: offered | flags::INIT_EXT | flags::WRITEBACK_CACHE,
            };
            let neg = reply_init(a.as_fd(), &req, want).unwrap();
            assert_eq!(neg.passthrough, expect);
            assert_eq!(neg.minor, OUR_MINOR);
            let mut buf = [0u8; 256];
            let n = rustix::io::read(&b, &mut buf[..]).unwrap();
            assert_eq!(n, 80);
            assert_eq!(u32_at(&buf, 0), 80);
            assert_eq!(u64_at(&buf, 8), 99);
            let body = &buf[16..];
            assert_eq!(u32_at(body, 0), 7);
            let low = u32_at(body, 12) as u64;
            let high = u32_at(body, 32) as u64;
            let all = low | high << 32;
            assert!(all & flags::INIT_EXT != 0);
            assert_eq!(all & flags::WRITEBACK_CACHE, 0, "never with passthrough");
            assert_eq!(all & flags::PASSTHROUGH != 0, expect);
            assert_eq!(u32_at(body, 36), expect as u32, "max_stack_depth");
            assert_eq!(u16::from_le_bytes([body[28], body[29]]), MAX_PAGES);
        }
    }
}
