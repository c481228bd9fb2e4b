//! `lode mount IMAGE MNT --mode fuse`: lode's own EROFS reader served over FUSE, with data
//! fetched lazily, FUSE passthrough once a file's data is local, and a worker that can be
//! killed or replaced while the mount stays usable.
//!
//! Processes (all the `lode` binary):
//!
//! ```text
//! lode mount ──spawn──▶ lode __fuse-supervisor   (owns /dev/fuse, mounted, answered INIT,
//!    │  (config on stdin,        │                  holds the shared state memfd; tiny)
//!    │   READY on stdout)        └─spawn─▶ lode __fuse-worker  (serves requests; replaceable)
//!    └─ returns once the mount is up
//! ```
//!
//! - [`abi`]: the raw kernel interface lode drives itself (mount, INIT, RESEND).
//! - [`supervisor`]: mounts, runs and replaces workers, control socket with counters.
//! - [`worker`]: opens the image from local state, attaches `fuser`, serves.
//! - [`fs`]: the `fuser::Filesystem` over [`lode_format::reader::Image`].
//! - [`materialize`]: passthrough backing files.
//! - [`shared`]: state that outlives a worker (counters, backing ids, open counts).

pub mod abi;
pub mod config;
pub mod fs;
pub mod materialize;
pub mod shared;
pub mod supervisor;
pub mod worker;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

pub use config::{MountConfig, RegistryOptions};

/// Logging for the supervisor and workers: to stderr (the mount's log file), `RUST_LOG`
/// (default `info`; fuser's own messages only from `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Points stdin and stdout at /dev/null (stdout was a readiness pipe; stderr is the log).
pub(crate) fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

/// The log file of the FUSE mount at `mountpoint` (canonical).
pub fn log_path(cache_dir: &Path, mountpoint: &Path) -> PathBuf {
    let h = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    cache_dir
        .join("logs")
        .join(format!("fuse-{}.log", &h.to_hex()[..16]))
}

/// What [`mount`] started.
#[derive(Debug, Clone)]
pub struct Mounted {
    pub supervisor_pid: u32,
    pub log: PathBuf,
}

/// Starts the supervisor in the background (its own session, logging to
/// `<cache>/logs/fuse-*.log`) and returns once the mount serves, or with the supervisor's
/// error.
pub fn mount(cfg: &MountConfig) -> Result<Mounted> {
    let mountpoint = lode_mount::runtime::canonical(&cfg.mountpoint)?;
    let cfg = MountConfig {
        mountpoint: mountpoint.clone(),
        ..cfg.clone()
    };
    std::fs::create_dir_all(&cfg.cache_dir)
        .with_context(|| format!("creating {}", cfg.cache_dir.display()))?;
    let cache_dir = std::fs::canonicalize(&cfg.cache_dir)?;
    let cfg = MountConfig { cache_dir, ..cfg };
    let log = log_path(&cfg.cache_dir, &mountpoint);
    std::fs::create_dir_all(log.parent().expect("has a parent"))?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the lode binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("__fuse-supervisor")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file));
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the FUSE supervisor")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(&serde_json::to_vec(&cfg)?)
        .context("sending the supervisor its config")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let line = line.trim();
    if let Some(pid) = line.strip_prefix("READY ") {
        return Ok(Mounted {
            supervisor_pid: pid.parse().context("supervisor pid")?,
            log,
        });
    }
    let _ = child.wait();
    if let Some(msg) = line.strip_prefix("ERROR ") {
        bail!("{msg}");
    }
    let mut tail = String::new();
    if let Ok(mut f) = std::fs::File::open(&log) {
        let _ = f.read_to_string(&mut tail);
    }
    let tail: Vec<&str> = tail.lines().rev().take(10).collect();
    bail!(
        "the FUSE supervisor exited without mounting; last lines of {}:\n{}",
        log.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// The counters of the FUSE mount at `mountpoint`, from its supervisor's control socket.
pub fn stats(mountpoint: &Path) -> Result<serde_json::Value> {
    let mnt = lode_mount::runtime::canonical(mountpoint)?;
    let path = lode_mount::runtime::control_path(&mnt);
    let mut conn = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("connecting to {}", path.display()))?;
    // A hung supervisor must not hang `lode status` or the daemon's scrape.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut buf = String::new();
    conn.read_to_string(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&buf)?)
}
