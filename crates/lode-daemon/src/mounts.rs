//! Mounting, unmounting and describing mounts in every mode. The same functions serve
//! `lode mount` without a daemon and the daemon's API, so both behave alike.
//!
//! Each lazy mount is served by its mode's supervisor process (fanotify and FUSE: one per
//! mount; cachefiles: one shared daemon), started in a session of its own: mounts outlive the
//! process that made them, so the daemon can be restarted or upgraded while they serve. What
//! is mounted is known from the mount records in the run directory (`lode_mount::runtime`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lode_mount::runtime::{self, MountRecord};
use serde::{Deserialize, Serialize};

use crate::request::{Mode, MountRequest};

/// Why each lazy mode can or cannot be used here, best first: fanotify where the kernel has
/// pre-content events (and the cache fs takes the marks), else cachefiles on-demand where
/// `/dev/cachefiles` works, else FUSE.
pub fn choose_mode(cache_dir: &Path) -> (Mode, String) {
    use lode_fanotify::abi::{FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC};
    let _ = std::fs::create_dir_all(cache_dir);
    let fanotify = lode_fanotify::sys::fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, 0)
        .map_err(|e| format!("no fanotify pre-content events ({e}; Linux 6.14+ needed)"))
        .and_then(|_| lode_fanotify::check_cache_fs(cache_dir).map_err(|e| format!("{e:#}")));
    let fanotify_why = match fanotify {
        Ok(()) => {
            return (
                Mode::Fanotify,
                "fanotify pre-content events are available".into(),
            )
        }
        Err(why) => why,
    };
    // EBUSY: held by a daemon already (ours serves every fscache mount), so it works.
    let cachefiles = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/cachefiles");
    if cachefiles.is_ok() || cachefiles.is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY)) {
        return (
            Mode::Fscache,
            format!("{fanotify_why}; /dev/cachefiles is available"),
        );
    }
    (
        Mode::Fuse,
        format!("{fanotify_why}; no usable /dev/cachefiles"),
    )
}

/// What [`mount`] did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mounted {
    pub mountpoint: PathBuf,
    pub image: String,
    /// The mode that serves it (never `auto`).
    pub mode: Mode,
    /// Why `auto` chose that mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_because: Option<String>,
    /// The process serving the mount (0 for local mode).
    pub pid: u32,
    /// Where the serving process writes its counters (fanotify) and its log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

/// Mounts an image as `req` says (paths absolute, see [`MountRequest::absolutize`]);
/// `default_cache` when the request names no cache directory.
pub fn mount(req: &MountRequest, default_cache: &Path) -> Result<Mounted> {
    req.validate()?;
    let cache_dir = req.cache_dir.as_deref().unwrap_or(default_cache);
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating the cache directory {}", cache_dir.display()))?;
    let cache_dir = std::fs::canonicalize(cache_dir)
        .with_context(|| format!("cache directory {}", cache_dir.display()))?;
    if is_mountpoint(&req.mountpoint) {
        bail!("{} is already a mount point", req.mountpoint.display());
    }
    let (mode, chosen_because) = match req.mode {
        Mode::Auto => {
            let (m, why) = choose_mode(&cache_dir);
            (m, Some(why))
        }
        m => (m, None),
    };
    if req.record_trace.is_some() && !matches!(mode, Mode::Fanotify | Mode::Fuse) {
        bail!("--record-trace is supported in fanotify and FUSE modes, not {mode}");
    }
    let ctx = || {
        format!(
            "mounting {} at {} ({mode} mode)",
            req.image,
            req.mountpoint.display()
        )
    };
    let pid = match mode {
        Mode::Auto => unreachable!("resolved above"),
        Mode::Local => {
            lode_mount::local::mount(Path::new(&req.image), &req.mountpoint, &cache_dir)
                .with_context(ctx)?;
            runtime::save(&MountRecord {
                mountpoint: req.mountpoint.clone(),
                mode: "local".into(),
                image: req.image.clone(),
                pid: 0,
                cache_dir: cache_dir.clone(),
                control: None,
                started: runtime::now_secs(),
            })?;
            0
        }
        Mode::Fanotify => crate::fanotify::mount(req, &cache_dir).with_context(ctx)?,
        Mode::Fuse => {
            let m = lode_fuse::mount(&lode_fuse::MountConfig {
                image: req.image.clone(),
                mountpoint: req.mountpoint.clone(),
                cache_dir: cache_dir.clone(),
                registry: req.registry.clone(),
                passthrough: req.fuse.passthrough,
                passthrough_min_size: req.fuse.passthrough_min_size,
                threads: req.fuse.threads,
                record_trace: req.record_trace.clone(),
            })
            .with_context(ctx)?;
            m.supervisor_pid
        }
        Mode::Fscache => {
            let r = &req.registry;
            lode_cachefiles::client::mount(&lode_cachefiles::client::MountRequest {
                image: req.image.clone(),
                mountpoint: req.mountpoint.clone(),
                cache_dir: cache_dir.clone(),
                registry: lode_cachefiles::control::RegistryOpts {
                    plain_http: r.plain_http,
                    insecure_tls: r.insecure_tls,
                    credentials: r.credentials.clone(),
                    auth_file: r.docker_config.clone(),
                    retries: Some(r.retries),
                },
            })
            .with_context(ctx)?;
            runtime::load(&req.mountpoint).map(|r| r.pid).unwrap_or(0)
        }
    };
    let (stats, log) = match mode {
        Mode::Fanotify => (
            Some(lode_fanotify::side_path(&req.mountpoint, "stats")),
            Some(lode_fanotify::side_path(&req.mountpoint, "log")),
        ),
        Mode::Fuse => (None, Some(lode_fuse::log_path(&cache_dir, &req.mountpoint))),
        Mode::Fscache => (
            None,
            Some(lode_cachefiles::control::RunDir::from_env().log()),
        ),
        _ => (None, None),
    };
    Ok(Mounted {
        mountpoint: req.mountpoint.clone(),
        image: req.image.clone(),
        mode,
        chosen_because,
        pid,
        stats,
        log,
    })
}

/// Unmounts `mountpoint`, then stops the process serving it once the kernel let go of it.
/// Returns a warning worth showing, if any.
pub fn umount(mountpoint: &Path) -> Result<Option<String>> {
    let mnt = runtime::canonical(mountpoint)?;
    let record = runtime::load(&mnt);
    if record.is_none() && !is_mountpoint(&mnt) {
        bail!("{} is not mounted", mnt.display());
    }
    lode_mount::kernel::umount(&mnt)?;
    let mut warning = None;
    match record {
        Some(rec) if rec.mode == "fscache" => {
            // One daemon serves every fscache mount: tell it, it exits after its last one.
            if let Err(e) = lode_cachefiles::client::unmounted(&rec) {
                warning = Some(format!("telling the fscache daemon: {e:#}"));
            }
            runtime::remove(&mnt);
        }
        Some(rec) => {
            if runtime::alive(rec.pid) && runtime::stop_process(rec.pid, Duration::from_secs(10)) {
                warning = Some(format!(
                    "the {} server (pid {}) did not exit in time and was killed",
                    rec.mode, rec.pid
                ));
            }
            reap(rec.pid);
            runtime::remove(&mnt);
        }
        None => {}
    }
    Ok(warning)
}

/// Collects the exit status of `pid` if it is our child (the daemon started it), so no
/// zombie is left; a no-op for other processes.
pub fn reap(pid: u32) {
    if pid == 0 {
        return;
    }
    let mut status = 0;
    // SAFETY: waitpid on a pid with WNOHANG only reads our own child table.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}

/// Counters of one mount, the same names in every mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountStats {
    /// Bytes received from the image's source (remote form, i.e. compressed).
    pub bytes_fetched: u64,
    /// Range requests to the source.
    pub requests: u64,
    pub fetch_errors: u64,
    /// Reads found in the cache / reads that had to fetch (modes that count them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misses: Option<u64>,
    /// Chunks of the image / of them in the cache (fanotify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_present: Option<u64>,
    /// Kernel requests served, by kind: fanotify events, FUSE opcodes, cachefiles messages.
    pub events: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_pid: Option<u32>,
    pub worker_restarts: u64,
    /// Background prefetch: `off`, `running`, `done`, `failed: …` (fanotify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<String>,
}

/// One mount as `lode ls`, `lode status` and `GET /v1/mounts` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStatus {
    pub mountpoint: PathBuf,
    pub mode: String,
    pub image: String,
    /// The serving process (0: none, local mode).
    pub pid: u32,
    pub cache_dir: PathBuf,
    /// Seconds since the epoch.
    pub started: u64,
    /// `serving`, `not mounted` (the kernel has no such mount: a stale record) or
    /// `server gone` (mounted, but its process died: reads fail).
    pub state: String,
    pub stats: MountStats,
    /// Where the stats could not be read, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_error: Option<String>,
    /// The mode's own counters, unabridged.
    pub detail: serde_json::Value,
}

/// Every recorded mount with its counters.
pub fn list() -> Vec<MountStatus> {
    let records = runtime::list();
    // The shared cachefiles daemon answers for all its mounts at once.
    let fscache = records
        .iter()
        .any(|r| r.mode == "fscache")
        .then(lode_cachefiles::client::status);
    records
        .into_iter()
        .map(|r| describe(r, fscache.as_ref()))
        .collect()
}

/// The mount at `mountpoint`.
pub fn status(mountpoint: &Path) -> Result<MountStatus> {
    let mnt = runtime::canonical(mountpoint)?;
    let rec =
        runtime::load(&mnt).with_context(|| format!("{} is not a lode mount", mnt.display()))?;
    let fscache = (rec.mode == "fscache").then(lode_cachefiles::client::status);
    Ok(describe(rec, fscache.as_ref()))
}

fn describe(rec: MountRecord, fscache: Option<&Result<serde_json::Value>>) -> MountStatus {
    let mounted = is_mountpoint(&rec.mountpoint);
    let state = if !mounted {
        "not mounted"
    } else if rec.pid != 0 && !runtime::alive(rec.pid) {
        "server gone"
    } else {
        "serving"
    };
    let (stats, detail, stats_error) = match mode_stats(&rec, fscache) {
        Ok((s, d)) => (s, d, None),
        Err(e) => (
            MountStats::default(),
            serde_json::Value::Null,
            Some(format!("{e:#}")),
        ),
    };
    MountStatus {
        state: state.into(),
        mountpoint: rec.mountpoint,
        mode: rec.mode,
        image: rec.image,
        pid: rec.pid,
        cache_dir: rec.cache_dir,
        started: rec.started,
        stats,
        stats_error,
        detail,
    }
}

fn mode_stats(
    rec: &MountRecord,
    fscache: Option<&Result<serde_json::Value>>,
) -> Result<(MountStats, serde_json::Value)> {
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    match rec.mode.as_str() {
        "fanotify" => {
            let path = lode_fanotify::side_path(&rec.mountpoint, "stats");
            let s = lode_fanotify::stats::Stats::load(&path)?;
            let stats = MountStats {
                bytes_fetched: s.fetch("bytes_fetched") + s.open_bytes,
                requests: s.fetch("requests") + s.open_requests,
                fetch_errors: s.fetch("errors"),
                hits: Some(s.fetch("hits")),
                misses: Some(s.fetch("misses")),
                chunks: Some(s.chunks),
                chunks_present: Some(s.chunks_present),
                events: s.events.clone(),
                worker_pid: Some(s.worker_pid),
                worker_restarts: s.worker_restarts,
                prefetch: Some(s.prefetch.clone()),
            };
            Ok((stats, serde_json::to_value(&s)?))
        }
        "fuse" => {
            let d = lode_fuse::stats(&rec.mountpoint)?;
            let events = d["requests"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            let stats = MountStats {
                bytes_fetched: u(&d, "fetch_bytes"),
                requests: u(&d, "fetch_requests"),
                fetch_errors: u(&d, "fetch_errors"),
                events,
                worker_pid: d["worker_pid"].as_u64().map(|p| p as u32),
                worker_restarts: u(&d, "worker_starts").saturating_sub(1),
                ..Default::default()
            };
            Ok((stats, d))
        }
        "fscache" => {
            let all = match fscache {
                Some(Ok(v)) => v,
                Some(Err(e)) => bail!("asking the fscache daemon: {e:#}"),
                None => bail!("the fscache daemon was not asked"),
            };
            let image = all["images"]
                .as_array()
                .and_then(|imgs| {
                    imgs.iter()
                        .find(|i| i["mountpoint"].as_str() == rec.mountpoint.to_str())
                })
                .cloned()
                .context("the fscache daemon does not serve this mount")?;
            let f = &image["fetch"];
            let mut events = BTreeMap::new();
            for blob in image["blobs"].as_array().into_iter().flatten() {
                if let Some(k) = all["keys"].get(blob.as_str().unwrap_or_default()) {
                    *events.entry("open".into()).or_insert(0) += u(k, "opens");
                    *events.entry("read".into()).or_insert(0) += u(k, "reads");
                }
            }
            let stats = MountStats {
                bytes_fetched: u(f, "bytes_fetched"),
                requests: u(f, "requests"),
                fetch_errors: u(f, "errors"),
                hits: Some(u(f, "hits")),
                misses: Some(u(f, "misses")),
                events,
                worker_pid: all["worker_pid"].as_u64().map(|p| p as u32),
                ..Default::default()
            };
            Ok((stats, image))
        }
        _ => Ok((MountStats::default(), serde_json::Value::Null)),
    }
}

pub use lode_mount::kernel::is_mountpoint;
