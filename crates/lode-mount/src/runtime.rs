//! Records of mounts served by a lode process, so `lode umount` (and later `lode ls`) can
//! find the process that serves a mount point.
//!
//! One JSON file per mount in the run directory (`$LODE_RUN_DIR`, default `/run/lode/mounts`),
//! named after the canonical mount point. Written when the mount is up, removed on unmount.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    /// `local`, `fanotify`, `fuse`, `fscache`.
    pub mode: String,
    /// The IMAGE argument as given.
    pub image: String,
    /// The process that serves the mount (supervisor); 0 when none (local mode).
    pub pid: u32,
    pub cache_dir: PathBuf,
    /// A control socket of the serving process, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<PathBuf>,
    /// Seconds since the epoch.
    pub started: u64,
}

/// Now, as a record's `started` (seconds since the epoch).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("LODE_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/lode/mounts"))
}

fn record_path(mountpoint: &Path) -> PathBuf {
    let key: String = mountpoint
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = xxhash64(mountpoint.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{key}-{hash:016x}.json"))
}

/// The control socket of the process serving `mountpoint` (canonical): short, so it fits
/// `sun_path` whatever the mount point.
pub fn control_path(mountpoint: &Path) -> PathBuf {
    let hash = xxhash64(mountpoint.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{hash:016x}.sock"))
}

fn xxhash64(bytes: &[u8]) -> u64 {
    // FNV-1a: stable, dependency-free; only disambiguates names that map to the same key.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The canonical form of a mount point (records are keyed by it).
pub fn canonical(mountpoint: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))
}

pub fn save(rec: &MountRecord) -> Result<()> {
    let dir = run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = record_path(&rec.mountpoint);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn load(mountpoint: &Path) -> Option<MountRecord> {
    let bytes = std::fs::read(record_path(mountpoint)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn remove(mountpoint: &Path) {
    let _ = std::fs::remove_file(record_path(mountpoint));
}

/// Every recorded mount.
pub fn list() -> Vec<MountRecord> {
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<MountRecord> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    out
}

/// Whether a process with this PID exists.
pub fn alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Sends SIGTERM to `pid` and waits up to `timeout` for it to exit; SIGKILL after that.
/// Returns whether it had to be killed.
pub fn stop_process(pid: u32, timeout: Duration) -> bool {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if !alive(pid) || is_zombie(pid) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    true
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
