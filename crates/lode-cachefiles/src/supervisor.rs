//! The supervisor: binds the cache and keeps `/dev/cachefiles` open across worker crashes.
//!
//! cachefiles ties the cache's life to the device descriptor: when its last copy closes, the
//! cache dies and every pending and future request fails with EIO. So the descriptor lives
//! here, in a small process that does no I/O on it after binding. The worker (which reads and
//! answers requests) inherits a copy; when it dies abnormally the supervisor starts a new one
//! with `--restore`, which writes `restore` and serves on: reads in flight at the crash are
//! delivered again and complete normally.
//!
//! A worker that exits with status 0 has no mount left; the supervisor then exits too.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::abi;
use crate::control::RunDir;
use crate::sys::{self, Device};

/// The cachefiles tag (any name works: EROFS asks for the default cache).
pub const TAG: &str = "lode";
/// Crashes tolerated within [`CRASH_WINDOW`] before giving up (then every pending read
/// fails with EIO instead of the worker crash-looping).
const MAX_CRASHES: usize = 10;
const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// The cachefiles backing directory inside lode's cache directory.
pub fn backing_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("fscache")
}

/// Opens the device, retrying while a previous daemon is still letting go of it.
fn open_device() -> Result<Device> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match Device::open() {
            Ok(d) => return Ok(d),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => bail!(
                "{} does not exist: this kernel has no cachefiles (CONFIG_CACHEFILES, \
                 CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND are needed for --mode fscache)",
                sys::DEVICE_PATH
            ),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
                "{} is busy: another cachefiles daemon (cachefilesd?) holds it; only one may run",
                sys::DEVICE_PATH
            ),
            Err(e) => return Err(e).with_context(|| format!("opening {}", sys::DEVICE_PATH)),
        }
    }
}

/// Binds an on-demand cache in `backing`.
fn bind(dev: &Device, backing: &Path) -> Result<()> {
    let send = |word: &str, arg: Option<&str>| -> Result<()> {
        let cmd = abi::command(word, arg).map_err(anyhow::Error::msg)?;
        dev.command(&cmd).with_context(|| {
            format!(
                "`{}` on {}",
                String::from_utf8_lossy(&cmd),
                sys::DEVICE_PATH
            )
        })
    };
    let dir = backing
        .to_str()
        .context("the cache directory path is not UTF-8")?;
    send("dir", Some(dir))?;
    send("tag", Some(TAG))?;
    send("bind", Some("ondemand")).map_err(|e| {
        let hint = match e.root_cause().downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()) {
            Some(libc::EOPNOTSUPP) => format!(
                " ({} must be on a disk filesystem with xattrs and O_TMPFILE, such as ext4, xfs or btrfs; not tmpfs, overlayfs or 9p)",
                backing.display()
            ),
            Some(libc::EINVAL) => " (the kernel lacks CONFIG_CACHEFILES_ONDEMAND)".to_string(),
            _ => String::new(),
        };
        anyhow::anyhow!("{e:#}{hint}")
    })
}

/// Deletes what cachefiles moved to `<dir>/graveyard` (culled or stale objects): the kernel
/// leaves that to the daemon.
fn clear_graveyard(backing: &Path) {
    let Ok(rd) = std::fs::read_dir(backing.join("graveyard")) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(err) = r {
            tracing::warn!("removing {}: {err}", p.display());
        }
    }
}

/// Runs the supervisor (started detached by `lode mount`). Returns when the worker exited
/// with no mount left.
pub fn run(cache_dir: &Path) -> Result<()> {
    // Our own session: no terminal signals, survives the `lode mount` that started it.
    let _ = rustix::process::setsid();
    let run = RunDir::from_env();
    run.create()?;
    let cache_dir = std::fs::canonicalize(cache_dir)
        .with_context(|| format!("cache directory {}", cache_dir.display()))?;
    let backing = backing_dir(&cache_dir);
    std::fs::create_dir_all(&backing).with_context(|| format!("creating {}", backing.display()))?;
    let dev = open_device()?;
    bind(&dev, &backing)?;
    tracing::info!(
        "bound an on-demand cache in {} (tag {TAG}), pid {}",
        backing.display(),
        std::process::id()
    );
    clear_graveyard(&backing);
    // A new cache session: whatever an earlier daemon recorded is meaningless now.
    let _ = std::fs::remove_file(run.state());
    let _ = std::fs::remove_file(run.socket());
    let listener = UnixListener::bind(run.socket())
        .with_context(|| format!("binding {}", run.socket().display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(run.socket(), std::fs::Permissions::from_mode(0o600))?;
    }
    dev.set_inheritable()?;
    sys::set_inheritable(&listener)?;
    std::fs::write(run.supervisor_pid(), std::process::id().to_string())?;

    let worker_pid = Arc::new(AtomicU32::new(0));
    {
        let worker_pid = worker_pid.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    // The worker decides: it exits only when no mount is left.
                    let pid = worker_pid.load(Ordering::Acquire);
                    tracing::info!("signal {sig}: passing SIGTERM to worker {pid}");
                    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
                    }
                }
            })?;
    }

    let exe = std::env::current_exe().context("finding the lode executable")?;
    let mut crashes: Vec<Instant> = Vec::new();
    let mut restore = false;
    let mut last_worker;
    loop {
        let mut cmd = Command::new(&exe);
        cmd.arg("__fscache-daemon")
            .arg("--worker")
            .arg("--cache-dir")
            .arg(&cache_dir)
            .arg("--dev-fd")
            .arg(dev.raw().to_string())
            .arg("--listen-fd")
            .arg(listener.as_raw_fd().to_string());
        if restore {
            cmd.arg("--restore");
        }
        let mut child = cmd.spawn().context("starting the fscache worker")?;
        worker_pid.store(child.id(), Ordering::Release);
        last_worker = child.id();
        tracing::info!(pid = child.id(), restore, "worker started");
        let status = child.wait().context("waiting for the worker")?;
        worker_pid.store(0, Ordering::Release);
        if status.success() {
            tracing::info!("worker exited: no mount left; supervisor exiting");
            break;
        }
        tracing::error!("worker died ({status}); restarting it with restore");
        let now = Instant::now();
        crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        crashes.push(now);
        if crashes.len() > MAX_CRASHES {
            // Closing the device fails every pending read with EIO: better than a hang.
            let _ = std::fs::remove_file(run.socket());
            bail!(
                "the worker crashed {} times within {CRASH_WINDOW:?}; giving up",
                crashes.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50 * crashes.len() as u64));
        restore = true;
    }
    // Only our own records: a new daemon may already be starting.
    for (path, pid) in [
        (run.supervisor_pid(), std::process::id()),
        (run.worker_pid(), last_worker),
    ] {
        if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == pid.to_string()) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}
