//! Is our EROFS superblock still reachable? The supervisor must not exit (which would fail
//! the mount open) while anything can still read from it: a lazy `umount -l` removes the
//! mount from the namespace while open files, mappings and working directories keep the
//! superblock alive, and other mount namespaces may hold copies of the mount.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::{AtFlags, StatxFlags};

/// `major:minor` as `/proc/*/mountinfo` spells a device.
pub fn dev_string(dev: u64) -> String {
    format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
}

/// Whether a filesystem with device `dev` is mounted in the mount namespace of `pid`
/// (`"self"` for ours).
pub fn mounted_in(pid: &str, dev: u64) -> bool {
    let want = dev_string(dev);
    fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(2) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

fn stat_dev(path: &Path) -> Option<u64> {
    // DONT_SYNC: never ask a (possibly hung) network or FUSE filesystem.
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::STATX_DONT_SYNC,
        StatxFlags::BASIC_STATS,
    )
    .ok()?;
    Some(rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor))
}

/// Processes that can still reach the superblock of device `dev`, with the reason (at most a
/// few; empty when nothing can). Skips the pids in `skip` (ourselves).
pub fn users_of(dev: u64, skip: &[u32]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut namespaces: HashSet<u64> = HashSet::new();
    let want = dev_string(dev);
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if skip.contains(&pid) {
            continue;
        }
        let why = why_uses(pid, dev, &want, &mut namespaces);
        if let Some(why) = why {
            out.push((pid, why));
            if out.len() >= 5 {
                break;
            }
        }
    }
    out
}

/// Why process `pid` can reach device `dev` (`want` is its `major:minor`), if it can.
/// `namespaces`: mount namespaces already checked.
fn why_uses(pid: u32, dev: u64, want: &str, namespaces: &mut HashSet<u64>) -> Option<String> {
    let p = Path::new("/proc").join(pid.to_string());
    if let Ok(ns) = fs::metadata(p.join("ns/mnt")) {
        if namespaces.insert(ns.ino()) && mounted_in(&pid.to_string(), dev) {
            return Some("mounted in its mount namespace".to_string());
        }
    }
    for link in ["cwd", "root"] {
        if stat_dev(&p.join(link)) == Some(dev) {
            return Some(format!("{link} on it"));
        }
    }
    if let Ok(fds) = fs::read_dir(p.join("fd")) {
        for fd in fds.flatten() {
            if stat_dev(&fd.path()) == Some(dev) {
                return Some(format!("fd {} on it", fd.file_name().to_string_lossy()));
            }
        }
    }
    if let Ok(maps) = fs::read_to_string(p.join("maps")) {
        for l in maps.lines() {
            // addr perms offset MM:mm inode path; MM:mm in hex.
            let Some((ma, mi)) = l.split_whitespace().nth(3).and_then(|d| d.split_once(':')) else {
                continue;
            };
            if let (Ok(ma), Ok(mi)) = (u32::from_str_radix(ma, 16), u32::from_str_radix(mi, 16)) {
                if format!("{ma}:{mi}") == want {
                    return Some("a mapping of it".to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_fds_and_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fs::metadata(dir.path()).unwrap().dev();
        let _f = fs::File::create(dir.path().join("x")).unwrap();
        let me = std::process::id();
        let why = why_uses(me, dev, &dev_string(dev), &mut HashSet::new());
        assert!(why.is_some());
        assert!(!users_of(dev, &[me]).iter().any(|(p, _)| *p == me));
        assert!(mounted_in("self", fs::metadata("/proc").unwrap().dev()));
        // A device nobody has.
        assert!(users_of(rustix::fs::makedev(4095, 4095), &[]).is_empty());
    }
}
