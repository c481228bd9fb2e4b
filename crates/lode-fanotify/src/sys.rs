//! System calls without a safe wrapper in `rustix` (fanotify), and small helpers around the
//! ones that have one.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use zerocopy::IntoBytes;

use crate::abi::{self, Response};

/// `fanotify_init(2)`.
pub fn fanotify_init(flags: u32, event_f_flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; on success it returns a new fd that we
    // own exclusively.
    let fd = unsafe { libc::fanotify_init(flags, event_f_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(2)` on a path (an inode mark unless `flags` says otherwise).
pub fn fanotify_mark(group: BorrowedFd<'_>, flags: u32, mask: u64, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `group` is a valid fd for the duration of the call, `c` a NUL-terminated string
    // that outlives it; the kernel does not keep the pointer.
    let r =
        unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, mask, libc::AT_FDCWD, c.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fanotify_mark(2)` on the object an fd refers to (`pathname` NULL: `dirfd` itself).
pub fn fanotify_mark_fd(
    group: BorrowedFd<'_>,
    flags: u32,
    mask: u64,
    fd: BorrowedFd<'_>,
) -> io::Result<()> {
    // SAFETY: both fds are valid for the duration of the call; a NULL pathname is allowed
    // and means "the object `fd` refers to".
    let r = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            fd.as_raw_fd(),
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes one `struct fanotify_response`.
pub fn respond(group: BorrowedFd<'_>, fd: RawFd, response: u32) -> io::Result<()> {
    let r = Response::new(fd, response);
    loop {
        match rustix::io::write(group, r.as_bytes()) {
            Ok(n) if n == r.as_bytes().len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short fanotify response write ({n} bytes)"
                )))
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `(st_dev, st_ino)` of an open file.
pub fn dev_ino(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Opens each of `paths` read-write through an fd that **never raises fanotify events**,
/// whatever marks exist on them now (ours or another process's).
///
/// An fd opened after a pre-content mark exists is notifying, and writing through it from the
/// serving process deadlocks (spec §2.7). Event fds are the exception: the kernel opens them
/// non-notifying. So this asks the kernel for event fds: a throw-away notification group
/// (`FAN_CLASS_NOTIF`, event fds `O_RDWR`) marks each file `FAN_OPEN`, we open and close each
/// file once, and keep the fds of the resulting `FAN_OPEN` events (matched by our pid and the
/// file's dev/ino). The group is closed before returning.
pub fn open_nonotifying(paths: &[PathBuf]) -> Result<Vec<File>> {
    let group = fanotify_init(
        abi::FAN_CLASS_NOTIF | abi::FAN_CLOEXEC | abi::FAN_NONBLOCK,
        (libc::O_RDWR | libc::O_LARGEFILE) as u32,
    )
    .context("fanotify_init (notification group for non-notifying fds)")?;
    let mut want: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, p) in paths.iter().enumerate() {
        let m = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        want.insert((m.dev(), m.ino()), i);
        fanotify_mark(
            group.as_fd(),
            abi::FAN_MARK_ADD | abi::FAN_MARK_INODE,
            abi::FAN_OPEN,
            p,
        )
        .with_context(|| format!("fanotify_mark FAN_OPEN {}", p.display()))?;
    }
    for p in paths {
        drop(File::open(p).with_context(|| format!("opening {}", p.display()))?);
    }
    let me = std::process::id() as i32;
    let mut got: Vec<Option<File>> = (0..paths.len()).map(|_| None).collect();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match rustix::io::read(&group, &mut buf) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e).context("reading the notification group"),
        };
        let (events, _) = abi::parse_events(&buf[..n]);
        for ev in events {
            if ev.fd < 0 {
                continue;
            }
            // SAFETY: the kernel installed this fd for us when the event was read; nobody
            // else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(ev.fd) };
            if ev.pid != me || ev.mask & abi::FAN_OPEN == 0 {
                continue;
            }
            if let Some(&i) = dev_ino(fd.as_fd()).ok().and_then(|k| want.get(&k)) {
                if got[i].is_none() {
                    set_cloexec(fd.as_fd())?;
                    got[i] = Some(File::from(fd));
                }
            }
        }
    }
    drop(group);
    got.into_iter()
        .zip(paths)
        .map(|(f, p)| match f {
            Some(f) => Ok(f),
            None => bail!("no FAN_OPEN event for {}", p.display()),
        })
        .collect()
}

/// Raises the soft `RLIMIT_NOFILE` to `want` (or the hard limit, if lower; the hard limit
/// too if we may). Every in-flight event pins one fd; without an fd the kernel denies the
/// event (EPERM to the reader).
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    if hard < want
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: Some(want),
            },
        )
        .is_ok()
    {
        return want;
    }
    let soft = want.min(hard);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: cur.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(soft)
}

/// Clears `FD_CLOEXEC` on `fd`, so it survives `exec`. Async-signal-safe (one `fcntl`), for
/// `pre_exec` hooks.
pub fn inherit_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller passes an fd that is open in this process for the call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    Ok(())
}

/// Sets `FD_CLOEXEC` on an inherited fd we keep but must not pass on.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    Ok(())
}

/// Takes ownership of an fd number inherited across `exec`, checking it is open.
pub fn take_inherited_fd(fd: RawFd) -> Result<OwnedFd> {
    if fd < 0 {
        bail!("invalid inherited fd {fd}");
    }
    // SAFETY: only used for fcntl right below, while nothing else can close it.
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) })
        .with_context(|| format!("inherited fd {fd} is not open"))?;
    // SAFETY: the fd is open and was handed to this process to own (by number, on its
    // command line); nothing else in the process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd())?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes through the fds `open_nonotifying` returns raise no event, even though our own
    /// pre-content mark exists and an ordinary open after it would (as root).
    #[test]
    fn nonotifying_fds_raise_no_events() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIP: needs root (fanotify)");
            return;
        }
        let dir = tempfile::Builder::new()
            .prefix("lode-fan-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let p = dir.path().join("blob");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let group = fanotify_init(
            abi::FAN_CLASS_PRE_CONTENT | abi::FAN_CLOEXEC | abi::FAN_NONBLOCK,
            (libc::O_RDWR | libc::O_LARGEFILE) as u32,
        )
        .unwrap();
        fanotify_mark(
            group.as_fd(),
            abi::FAN_MARK_ADD | abi::FAN_MARK_INODE,
            abi::FAN_PRE_ACCESS,
            &p,
        )
        .unwrap();
        let files = open_nonotifying(std::slice::from_ref(&p)).unwrap();
        use std::os::unix::fs::FileExt;
        files[0].write_all_at(b"hello", 4096).unwrap();
        let mut b = [0u8; 5];
        files[0].read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"hello");
        let mut buf = [0u8; 4096];
        assert_eq!(
            rustix::io::read(&group, &mut buf).unwrap_err(),
            rustix::io::Errno::AGAIN,
            "a write through a non-notifying fd raised an event"
        );
        // Control: a plain open after the mark is notifying (read in a thread, answered here).
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 5];
            File::open(&p2)
                .unwrap()
                .read_exact_at(&mut b, 4096)
                .unwrap();
            b
        });
        let n = loop {
            match rustix::io::read(&group, &mut buf) {
                Ok(n) => break n,
                Err(rustix::io::Errno::AGAIN) => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let (ev, _) = abi::parse_events(&buf[..n]);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].range, Some((4096, 4096)));
        respond(group.as_fd(), ev[0].fd, abi::FAN_ALLOW).unwrap();
        // SAFETY: test: the event fd is ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(ev[0].fd) });
        assert_eq!(&t.join().unwrap(), b"hello");
    }
}
