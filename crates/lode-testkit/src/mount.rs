//! Mount guards and environment checks for tests that mount things.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use rustix::mount::{MountFlags, UnmountFlags};

/// Unmounts `path` when dropped (also while unwinding from a panic): a normal unmount,
/// retried briefly while busy, then a lazy `MNT_DETACH` unmount if that keeps failing.
#[derive(Debug)]
pub struct MountGuard {
    path: PathBuf,
    armed: bool,
}

impl MountGuard {
    /// Take responsibility for unmounting the already-mounted `path`.
    pub fn new(path: impl Into<PathBuf>) -> MountGuard {
        MountGuard {
            path: path.into(),
            armed: true,
        }
    }

    /// mount(2) `source` on `target` and guard it. `data` is the comma-separated option
    /// string (empty for none).
    pub fn mount(
        source: impl AsRef<Path>,
        target: impl AsRef<Path>,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<MountGuard> {
        let target = target.as_ref();
        let data = std::ffi::CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
        rustix::mount::mount(
            source.as_ref(),
            target,
            fstype,
            flags,
            Some(data.as_c_str()),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mount -t {fstype} {:?} {target:?}: {e}", source.as_ref()),
            )
        })?;
        Ok(MountGuard::new(target))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmount now. Returns the error of the normal unmount if it failed (the mount is then
    /// detached lazily anyway, so nothing is leaked).
    pub fn unmount(mut self) -> io::Result<()> {
        self.armed = false;
        // A process that just left the mount (a child of another test, a short-lived
        // scanner) can keep it busy for a moment: retry EBUSY briefly.
        let mut result = rustix::mount::unmount(&self.path, UnmountFlags::empty());
        for _ in 0..40 {
            if result != Err(rustix::io::Errno::BUSY) {
                break;
            }
            sleep(Duration::from_millis(50));
            result = rustix::mount::unmount(&self.path, UnmountFlags::empty());
        }
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
                Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("umount {:?}: {e}", self.path),
                ))
            }
        }
    }

    /// Stop guarding; the mount stays. Returns the mount point.
    pub fn disarm(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut last = None;
        for attempt in 0..5 {
            match rustix::mount::unmount(&self.path, UnmountFlags::empty()) {
                Ok(()) => return,
                // Not mounted (any more): nothing to do.
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return,
                Err(rustix::io::Errno::BUSY) => {
                    last = Some(rustix::io::Errno::BUSY);
                    sleep(Duration::from_millis(50 << attempt));
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = rustix::mount::unmount(&self.path, UnmountFlags::DETACH) {
            eprintln!(
                "MountGuard: could not unmount {:?} (umount: {:?}, umount -l: {e})",
                self.path, last
            );
        }
    }
}

/// A temporary, empty mount-point directory. Mount something on it with
/// [`TempMount::mount`] (or mount it yourself and call [`TempMount::arm`]); on drop it is
/// unmounted first and the (then empty) directory removed with `rmdir` — never recursively,
/// so a mount that could not be removed is never deleted into.
#[derive(Debug)]
pub struct TempMount {
    guard: Option<MountGuard>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TempMount {
    /// A new empty directory under the system temp dir.
    pub fn new() -> io::Result<TempMount> {
        let dir = tempfile::Builder::new().prefix("lode-mnt-").tempdir()?;
        let path = dir.path().to_path_buf();
        Ok(TempMount {
            guard: None,
            dir: Some(dir),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Mount on this directory and unmount on drop.
    pub fn mount(
        &mut self,
        source: impl AsRef<Path>,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let guard = MountGuard::mount(source, &self.path, fstype, flags, data)?;
        self.guard = Some(guard);
        Ok(())
    }

    /// Something (e.g. a FUSE daemon or `mount(8)`) has been mounted here: unmount on drop.
    pub fn arm(&mut self) {
        self.guard = Some(MountGuard::new(&self.path));
    }

    /// Unmount now, reporting failure of the normal unmount.
    pub fn unmount(&mut self) -> io::Result<()> {
        match self.guard.take() {
            Some(g) => g.unmount(),
            None => Ok(()),
        }
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Some(dir) = self.dir.take() {
            let path = dir.keep();
            if let Err(e) = fs::remove_dir(&path) {
                eprintln!("TempMount: leaving {path:?}: {e}");
            }
        }
    }
}

/// Whether `path` is a mount point according to /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(path) = fs::canonicalize(path) else {
        return false;
    };
    lode_mount::kernel::is_mountpoint(&path)
}

/// Whether the effective uid is 0.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Fail the test unless running as root.
#[track_caller]
pub fn require_root() {
    if !is_root() {
        panic!(
            "this test needs root (mount, mknod, chown, trusted.* xattrs); run the suite as root, \
             e.g. `sudo scripts/test.sh`"
        );
    }
}

fn proc_filesystems_has(fs_name: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some(fs_name))
        })
        .unwrap_or(false)
}

fn try_modprobe(module: &str) {
    let _ = Command::new("modprobe")
        .arg(module)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether the kernel supports EROFS (trying `modprobe erofs` if it is not registered).
pub fn kernel_has_erofs() -> bool {
    if proc_filesystems_has("erofs") {
        return true;
    }
    try_modprobe("erofs");
    proc_filesystems_has("erofs")
}

/// Fail the test unless the kernel has EROFS. Every kernel this project runs tests on has
/// it, so a missing EROFS is an error, not a reason to skip.
#[track_caller]
pub fn require_erofs() {
    if !kernel_has_erofs() {
        panic!(
            "kernel {} has no EROFS support (not in /proc/filesystems, `modprobe erofs` failed); \
             these tests need CONFIG_EROFS_FS",
            kernel_release()
        );
    }
}

/// Whether FUSE is usable (`/dev/fuse` exists and `fuse` is registered, trying modprobe).
pub fn kernel_has_fuse() -> bool {
    if !proc_filesystems_has("fuse") {
        try_modprobe("fuse");
    }
    proc_filesystems_has("fuse") && Path::new("/dev/fuse").exists()
}

/// Fail the test unless FUSE is usable.
#[track_caller]
pub fn require_fuse() {
    if !kernel_has_fuse() {
        panic!(
            "FUSE is not available on kernel {} (/dev/fuse or fuse filesystem missing)",
            kernel_release()
        );
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Print `SKIP: <why>` and return from the current test if `cond` holds. Use only for
/// features the machine truly lacks (e.g. cachefiles outside the VM), never for EROFS.
#[macro_export]
macro_rules! skip_if {
    ($cond:expr, $($why:tt)+) => {
        if $cond {
            eprintln!("SKIP: {}", format!($($why)+));
            return;
        }
    };
}
