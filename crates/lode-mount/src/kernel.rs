//! File-backed kernel EROFS mounts through the new mount API.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, unmount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};

/// What to mount: the bootstrap file and one file per device-table slot, in slot order.
#[derive(Debug, Clone)]
pub struct ErofsMount {
    pub bootstrap: PathBuf,
    pub devices: Vec<PathBuf>,
}

impl ErofsMount {
    /// Mounts read-only at `target`.
    pub fn mount(&self, target: &Path) -> Result<()> {
        let mut options = vec![("source", self.bootstrap.as_os_str())];
        options.extend(self.devices.iter().map(|d| ("device", d.as_os_str())));
        mount_erofs(&options, target)
    }
}

/// Mounts EROFS read-only (and nodev) at `target` with the given `fsconfig` string options,
/// in order (`source`, `device`, `fsid`, `domain_id`, …); a failure carries the kernel's own
/// messages.
pub fn mount_erofs(options: &[(&str, &std::ffi::OsStr)], target: &Path) -> Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| {
        anyhow!("the kernel has no EROFS support (fsopen erofs: {e}); try `modprobe erofs`")
    })?;
    let step = |what: &str, r: rustix::io::Result<()>| -> Result<()> {
        r.map_err(|e| anyhow!("{what}: {e}{}", kernel_log(&fs)))
    };
    for (key, value) in options {
        step(
            &format!("{key}={}", value.to_string_lossy()),
            fsconfig_set_string(fs.as_fd(), *key, *value),
        )?;
    }
    step("mounting", fsconfig_create(fs.as_fd()))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(|e| anyhow!("fsmount: {e}{}", kernel_log(&fs)))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .with_context(|| format!("attaching the mount at {}", target.display()))
}

/// The messages the kernel left in a filesystem context, formatted as a suffix.
fn kernel_log(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut file = std::fs::File::from(fs.try_clone().expect("dup fs context"));
    let mut buf = [0u8; 1024];
    // Each read returns one message; the context fd is non-blocking for reads (ENODATA at end).
    for _ in 0..16 {
        match file.read(&mut buf) {
            Ok(n) if n > 0 => {
                let msg = String::from_utf8_lossy(&buf[..n]);
                out.push_str(" [kernel: ");
                out.push_str(msg.trim());
                out.push(']');
            }
            _ => break,
        }
    }
    out
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> Result<()> {
    unmount(target, UnmountFlags::empty())
        .with_context(|| format!("unmounting {}", target.display()))
}

/// Whether the kernel has a mount at `path` (as given: pass a canonical path). Read from
/// /proc/self/mountinfo, so it never touches the mount, which may belong to a dead FUSE server.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_encoded_bytes();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod mountinfo_tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(r"/x\04"), b"/x\\04");
    }

    #[test]
    fn root_is_a_mountpoint() {
        assert!(is_mountpoint(Path::new("/")));
        assert!(!is_mountpoint(Path::new("/definitely/not/mounted")));
    }
}
