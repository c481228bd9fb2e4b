//! `lode mount --mode fanotify`: the kernel EROFS driver reads sparse blob files in the cache;
//! fanotify pre-content events (`FAN_PRE_ACCESS`, Linux 6.14+) on those files let lode fill
//! each range from the remote source before the kernel reads it.
//!
//! The kernel **fails open**: when the last fd of the fanotify group is closed, every
//! pending event is allowed and later reads are not intercepted — readers see the holes as
//! zeros (`shared/spec/fanotify-precontent.md` §0). Everything below is arranged so that this
//! never happens while the mount exists, and so that a crashed worker costs no reader its
//! data.
//!
//! # Processes
//!
//! ```text
//! lode mount IMAGE MNT --mode fanotify      (foreground; exits when the mount is up)
//!   open_image: fetch + verify bootstrap, chunk tables, create the sparse cache files
//!   write the spec (<run dir>/<mount key>.spec), spawn the supervisor, wait for READY
//!
//! lode __fanotify-supervisor  (setsid, stdout/stderr -> <run dir>/<mount key>.log)
//!   1. flock(LOCK_SH) each blob's cache state file (cache GC keeps away)
//!   2. non-notifying read-write fds of each blob data file (sys::open_nonotifying)
//!   3. group = fanotify_init(PRE_CONTENT|CLOEXEC|UNLIMITED_QUEUE, O_RDWR|O_LARGEFILE)
//!   4. inode mark FAN_PRE_ACCESS on each blob data file
//!   5. the journal (a memfd, mapped shared); spawn worker 1, wait until it is ready
//!   6. mount EROFS (bootstrap + blob data files as device=) — after the marks; keep a
//!      detached clone of the mount (open_tree) so the superblock's device number stays
//!      ours and the exit check below cannot mistake another mount for ours
//!   7. write the mount record (mode fanotify, pid = supervisor), tell `lode mount` READY
//!   8. loop: restart the worker whenever it dies (backoff 0.1 s .. 5 s); exit only once
//!      the EROFS superblock is unreachable (no longer mounted in our namespace and no
//!      process has a file, mapping, cwd/root or mount of it) — SIGTERM alone never
//!      makes it exit. Then SIGKILL the worker, close the group, remove record and spec.
//!
//! lode __fanotify-worker  (exec'd by the supervisor; inherits by fd number: the group,
//!                          the journal, the non-notifying blob fds)
//!   open the cache entries (no network: the supervisor's spec pins the manifest), make
//!   every fill go through the inherited non-notifying fd (CachedBlob::use_data_file),
//!   settle the journal (below), mark itself ready, then 2 reader threads (answer cached
//!   ranges, start a fill thread per miss), a stats thread, and the background prefetch
//!   (the image's prefetch list, then everything with `--prefetch-all`; foreground misses
//!   overtake it). With `--record-trace` it records every event's range as image paths
//!   and writes the trace on SIGTERM, which the supervisor sends before SIGKILL when it
//!   exits.
//! ```
//!
//! Holding the group in a process that does almost nothing means a worker crash (panic,
//! `kill -9`, OOM) releases nothing: queued events wait for the successor, events the dead
//! worker had read stay pending and are answered by the successor by fd number. If the
//! supervisor itself dies, the worker (which also holds the group) keeps serving and exits
//! once the mount is gone.
//!
//! # Fills and non-notifying fds
//!
//! A write through an fd that was opened while a pre-content mark existed raises an event
//! to our own group and deadlocks. Fills therefore go through fds the kernel opened
//! non-notifying: the supervisor obtains them from `FAN_OPEN` events of a throw-away
//! notification group (event fds are always non-notifying), which works even when another
//! lode mount of the same blob already marked the file — so prefetch, which has no event
//! fd, is safe too. Each worker inherits them and hands them to the storage layer.
//!
//! # Serving an event
//!
//! The blob is found by `fstat(event fd)` → (dev, ino). The range `(offset, count)` is
//! page-granular and may run past the end of the blob: it is clamped to the blob's size.
//! - `count == 0` (the kernel reports it only for `ftruncate`, which does not read): nothing
//!   to fill, `FAN_ALLOW`. Past the end of the blob: likewise.
//! - every chunk of the range present (the in-memory chunk bitmap): `FAN_ALLOW` at once;
//! - else `BlobFetcher::ensure` (single flight, merging, verification, written to the
//!   cache), then `FAN_ALLOW`; if the fetch fails, `FAN_DENY_ERRNO(EIO)` — never an allow of
//!   unfilled data. Several misses of one `read(2)` batch are served concurrently.
//! - once every chunk of a blob is in the cache, the worker removes the blob's mark
//!   (`FAN_MARK_REMOVE`, spec §8.6): from then on the kernel reads it with no event at all,
//!   at native speed (`LODE_FANOTIFY_KEEP_MARKS=1` keeps marks, to measure the event path).
//! - the worker runs at nice -10: every reader's page-cache miss waits on it.
//!
//! # The journal protocol
//!
//! The journal is a memfd owned by the supervisor: a header (generation, ready flag,
//! counters) and 64 *slots*, each a 4 KiB event buffer plus one state word per event in it
//! (answered bit, blob index). A reader thread leases a free slot (one whose events are all
//! answered, their fds closed), and:
//!
//! 1. zeroes the buffer, **then** clears the state words (a crash in between leaves an empty
//!    buffer, so no event without its flag);
//! 2. `read(2)`s the group **directly into the buffer** in shared memory: when `read`
//!    returns, the events and their fd numbers are journaled (a kill at any later point
//!    leaves them there; a zeroed header ends the slot's event list);
//! 3. per event (cached ranges on the reader thread, misses each on a fill thread): records
//!    the blob index, fills if needed, then in this order: **write the response → set the
//!    answered bit → close the event fd**. An event whose bit is clear therefore still had
//!    its fd open when the worker died, so no later event of that worker can have been given
//!    the same fd number. The slot is free again when its last event is answered.
//!
//! A worker starting up (the successor), before its first `read(2)`:
//!
//! 1. collects every journaled event with an fd and no answered bit (all slots);
//! 2. fills each range (its blob if recorded; else the range in every blob that has it);
//! 3. answers each by its fd number (`FAN_ALLOW`, or `FAN_DENY_ERRNO(EIO)` if the fill
//!    failed), then sets its bit. `ENOENT` means the dead worker had answered it already;
//! 4. clears all slots, then sweeps fd numbers `0..65536` with `FAN_DENY_ERRNO(EIO)`
//!    (a safety net for events that were pending but not journaled; counted as `swept`,
//!    expected 0), and only then starts reading.
//!
//! Only one worker runs at a time (the supervisor reaps the old one before it spawns the
//! next), and a successor reads nothing before it has settled everything, so a stale fd
//! number can never collide with a new event's (the collision would release the stale
//! reader with zeros, spec §4.3). A successor that dies while settling leaves the rest
//! for the next one: the bits it set stay set.
//!
//! # Stats
//!
//! The worker writes `<run dir>/<mount key>.stats` (JSON) every 250 ms: fetch counters,
//! event counters (cumulative over worker restarts), worker pid and generation, chunks
//! present. See [`stats`].

pub mod abi;
pub mod journal;
pub mod proc;
pub mod stats;
pub mod supervisor;
pub mod sys;
pub mod worker;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lode_format::manifest::ImageManifest;
use serde::{Deserialize, Serialize};

/// fd numbers a worker may use (its `RLIMIT_NOFILE`), and so the stale-number sweep range.
pub const WORKER_NOFILE: u64 = 65536;
/// Journal slots: batches of events read and not yet fully answered, at most.
pub const JOURNAL_SLOTS: usize = 64;

/// Everything the supervisor and its workers need to serve one mount, written by
/// `lode mount` (JSON, mode 0600, `<run dir>/<mount key>.spec`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Canonical mount point.
    pub mountpoint: PathBuf,
    /// The IMAGE argument as given.
    pub image: String,
    /// The image source in a form `ImageSource::parse` reads back (absolute path, URL or
    /// registry reference).
    pub source: String,
    /// The manifest that was mounted: workers serve exactly this (no re-resolving a tag).
    pub manifest: ImageManifest,
    pub bootstrap: PathBuf,
    pub cache_dir: PathBuf,
    /// Per blob, in device-table order: the cache data file (the kernel's `device=`) and
    /// its state file.
    pub data_paths: Vec<PathBuf>,
    pub state_paths: Vec<PathBuf>,
    /// Reader threads of a worker (each blocked in `read(2)` of the group; fills run on
    /// threads of their own).
    pub threads: usize,
    /// Fetch the whole image in the background (after the image's prefetch list, which is
    /// always fetched).
    pub prefetch_all: bool,
    /// Bandwidth limit of the background prefetch, bytes/s (0: none).
    pub prefetch_rate: u64,
    pub stats_path: PathBuf,
    pub log_path: PathBuf,
    /// argv of a worker; the supervisor appends `--spec`, `--group-fd`, `--journal-fd`,
    /// `--data-fds`.
    pub worker_command: Vec<String>,
    /// Requests and bytes `lode mount` spent opening the image (chunk tables).
    pub open_requests: u64,
    pub open_bytes: u64,
    /// `--record-trace`: record which files (and ranges) are read into this file, in the
    /// trace format of `lode_format::trace`. The supervisor empties it at mount; workers
    /// resume it, map each event's blob range back to image paths
    /// (`lode_format::reverse::FileIndex`) and keep every mark (so a read of a complete
    /// blob is still seen).
    #[serde(default)]
    pub record_trace: Option<PathBuf>,
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("spec-tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        drop(f);
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Logging for the supervisor and the worker: to stderr (their log file), `RUST_LOG`
/// filters (default `info`).
pub fn init_logging(role: &'static str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_thread_names(true)
        .try_init();
    tracing::info!("{role} pid {} starting", std::process::id());
}

/// A file beside the mount records for the fanotify mount at `mountpoint` (canonical):
/// `<run dir>/fanotify-<hash>.<ext>` — `spec`, `stats`, `log`.
pub fn side_path(mountpoint: &Path, ext: &str) -> PathBuf {
    // FNV-1a of the mount point: stable and short.
    let hash = mountpoint
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    lode_mount::runtime::run_dir().join(format!("fanotify-{hash:016x}.{ext}"))
}

/// The cache directory must be on a filesystem that supports pre-content marks: ext4, xfs
/// or btrfs (tmpfs, overlayfs, NFS, … refuse them with EOPNOTSUPP).
pub fn check_cache_fs(dir: &Path) -> Result<()> {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    let st = rustix::fs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    let t = st.f_type as i64;
    let name = match t {
        EXT4 | XFS | BTRFS => return Ok(()),
        0x0102_1994 => "tmpfs".to_string(),
        0x794c_7630 => "overlayfs".to_string(),
        0x6969 => "NFS".to_string(),
        0x6573_5546 => "FUSE".to_string(),
        0xE0F5_E1E2 => "EROFS".to_string(),
        _ => format!("a filesystem of type {t:#x}"),
    };
    anyhow::bail!(
        "the cache directory {} is on {name}; fanotify mode needs it on ext4, xfs or btrfs \
         (the kernel refuses pre-content marks elsewhere): pick another --cache-dir",
        dir.display()
    )
}
