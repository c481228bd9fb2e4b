//! The supervisor: a small process that owns the FUSE connection for the life of the mount.
//!
//! It opens `/dev/fuse`, mounts, answers INIT itself, creates the shared state (`shared.rs`)
//! and then runs workers one at a time, handing each the connection and the state by
//! descriptor inheritance (placed at fixed numbers with `dup2` between fork and exec). It
//! never reads requests itself. Because it holds the connection, a worker may die at any
//! moment (kill -9, crash, planned upgrade with `SIGHUP`) without the kernel noticing: the
//! requests the dead worker had read stay pending in the connection until the next worker
//! asks for them to be resent (`FUSE_NOTIFY_RESEND`), and new requests simply wait in the
//! queue. Applications see a pause, never an error.
//!
//! Signals: SIGCHLD (a worker ended: exit status 0 means the filesystem was unmounted, so
//! the supervisor ends too; anything else starts a new worker), SIGHUP (replace the worker,
//! e.g. after installing a new `lode` binary), SIGTERM/SIGINT (stop: the worker is stopped
//! and the mount, if still there, detached).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lode_mount::runtime::{self, MountRecord};
use lode_storage::cache::BlobCache;
use lode_storage::image::{open_image, ImageSource};

use crate::abi;
use crate::config::{MountConfig, WorkerConfig};
use crate::shared::{snapshot, Counter, Shared};

/// Where workers find their descriptors.
const WORKER_FUSE_FD: i32 = 3;
const WORKER_STATE_FD: i32 = 4;
const WORKER_START_TIMEOUT_MS: i32 = 60_000;

struct Supervisor {
    exe: PathBuf,
    worker_cfg: WorkerConfig,
    fuse: OwnedFd,
    shared: Arc<Shared>,
    mountpoint: PathBuf,
}

/// `lode __fuse-supervisor`: reads a [`MountConfig`] from stdin; prints `READY <pid>` or
/// `ERROR <message>` on stdout, then detaches stdout and serves until unmounted or stopped.
pub fn main() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading the mount config")?;
    let cfg: MountConfig = serde_json::from_slice(&input).context("parsing the mount config")?;
    crate::init_logging();
    block_signals();
    let (sup, first) = match setup(cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("mount failed: {e:#}");
            println!("ERROR {e:#}");
            std::process::exit(1);
        }
    };
    println!("READY {}", std::process::id());
    let _ = std::io::stdout().flush();
    crate::detach_stdio();
    sup.run(first)
}

fn block_signals() {
    // SAFETY: plain signal mask manipulation before any thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn setup(cfg: MountConfig) -> Result<(Supervisor, Child)> {
    let mountpoint = runtime::canonical(&cfg.mountpoint)?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    let exe = std::env::current_exe().context("locating the lode binary")?;
    if let Some(t) = &cfg.record_trace {
        lode_storage::trace::start(t)?;
    }
    // Resolve and verify the image now, so errors reach `lode mount`.
    let source = ImageSource::parse(&cfg.image)?;
    let cache = BlobCache::open(&cfg.cache_dir)?;
    let opened = open_image(&source, &cache, &cfg.registry.source_options())
        .with_context(|| format!("opening {source}"))?;
    let bootstrap_len = opened.manifest.bootstrap.size;
    let manifest = opened.manifest.clone();
    let bootstrap = opened.bootstrap.clone();
    drop(opened);
    drop(cache);

    let shared = Arc::new(Shared::create(bootstrap_len / 32 + 1)?);
    let mut passthrough = cfg.passthrough;
    if passthrough && !abi::has_cap_sys_admin() {
        tracing::warn!(
            "FUSE passthrough disabled, serving reads through lode: no CAP_SYS_ADMIN (BACKING_OPEN needs it)"
        );
        shared.set(Counter::PassthroughDisabled, 1);
        passthrough = false;
    }
    let fuse = abi::open_dev_fuse()?;
    abi::mount_fuse(fuse.as_fd(), &mountpoint, &format!("lode:{}", cfg.image))?;
    // Until the mount is fully set up, an error detaches it again.
    let guard = DetachOnError(Some(mountpoint.clone()));
    let init = abi::read_init(fuse.as_fd())?;
    let negotiated = abi::reply_init(fuse.as_fd(), &init, passthrough)?;
    if passthrough && !negotiated.passthrough {
        tracing::warn!(
            kernel_minor = negotiated.kernel_minor,
            "FUSE passthrough disabled, serving reads through lode: the kernel did not offer FUSE_PASSTHROUGH (needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)"
        );
        shared.set(Counter::PassthroughDisabled, 1);
        passthrough = false;
    }
    tracing::info!(
        minor = negotiated.minor,
        kernel_minor = negotiated.kernel_minor,
        flags = format!("{:#x}", negotiated.flags),
        passthrough,
        "mounted {} on {}",
        cfg.image,
        mountpoint.display()
    );
    abi::raise_readahead(&mountpoint);
    let worker_cfg = WorkerConfig {
        mount: MountConfig {
            mountpoint: mountpoint.clone(),
            ..cfg.clone()
        },
        manifest,
        bootstrap,
        negotiated,
        passthrough,
        fuse_fd: WORKER_FUSE_FD,
        state_fd: WORKER_STATE_FD,
    };
    let sup = Supervisor {
        exe,
        worker_cfg,
        fuse,
        shared,
        mountpoint: mountpoint.clone(),
    };
    let first = sup.spawn_worker()?;
    let control = runtime::control_path(&mountpoint);
    start_control_socket(&control, sup.shared.clone(), &cfg, &mountpoint)?;
    runtime::save(&MountRecord {
        mountpoint: mountpoint.clone(),
        mode: "fuse".into(),
        image: cfg.image.clone(),
        pid: std::process::id(),
        cache_dir: cfg.cache_dir.clone(),
        control: Some(control),
        started: runtime::now_secs(),
    })?;
    std::mem::forget(guard);
    Ok((sup, first))
}

struct DetachOnError(Option<PathBuf>);

impl Drop for DetachOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            detach(&p);
        }
    }
}

fn detach(mountpoint: &Path) {
    let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
}

fn is_mounted(mountpoint: &Path) -> bool {
    abi::mount_dev(mountpoint).is_some()
}

impl Supervisor {
    /// Starts a worker and waits until it serves (or fails).
    fn spawn_worker(&self) -> Result<Child> {
        let fuse = self.fuse.as_raw_fd();
        let state = self.shared.fd().as_raw_fd();
        let mut cmd = Command::new(&self.exe);
        cmd.arg("__fuse-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Via high numbers first, so neither source is clobbered and dup2 always
                // makes a new (inheritable) descriptor.
                let f = libc::fcntl(fuse, libc::F_DUPFD_CLOEXEC, 10);
                let s = libc::fcntl(state, libc::F_DUPFD_CLOEXEC, 10);
                if f < 0
                    || s < 0
                    || libc::dup2(f, WORKER_FUSE_FD) < 0
                    || libc::dup2(s, WORKER_STATE_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting a FUSE worker")?;
        let cfg = serde_json::to_vec(&self.worker_cfg)?;
        {
            let mut stdin = child.stdin.take().expect("piped");
            stdin
                .write_all(&cfg)
                .context("sending the worker its config")?;
        }
        let stdout = child.stdout.take().expect("piped");
        // A worker opens the image from local state only; one that takes longer than this
        // to start is stuck and is replaced.
        let mut pfd = libc::pollfd {
            fd: stdout.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        let ready = unsafe { libc::poll(&mut pfd, 1, WORKER_START_TIMEOUT_MS) } > 0;
        let mut line = String::new();
        let n = if ready {
            BufReader::new(stdout).read_line(&mut line).unwrap_or(0)
        } else {
            0
        };
        if n == 0 || line.trim() != "READY" {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!("the FUSE worker failed to start ({status:?}); see the log");
        }
        tracing::info!(pid = child.id(), "worker ready");
        Ok(child)
    }

    fn run(self, first: Child) -> Result<()> {
        let mut worker = Some(first);
        let mut failures = 0u32;
        loop {
            let sig = wait_signal(Duration::from_secs(1));
            match sig {
                Some(libc::SIGTERM) | Some(libc::SIGINT) => {
                    tracing::info!("stopping");
                    if let Some(w) = worker.as_mut() {
                        stop_child(w);
                    }
                    if is_mounted(&self.mountpoint) {
                        detach(&self.mountpoint);
                    }
                    self.cleanup();
                    return Ok(());
                }
                Some(libc::SIGHUP) => {
                    // Planned replacement: the new worker picks up what the old one held.
                    if let Some(w) = worker.as_mut() {
                        tracing::info!(pid = w.id(), "replacing the worker (SIGHUP)");
                        let _ = w.kill();
                    }
                }
                _ => {}
            }
            // Reap and replace.
            let Some(w) = worker.as_mut() else {
                worker = self.respawn(&mut failures)?;
                continue;
            };
            match w.try_wait() {
                Ok(Some(status)) if status.success() => {
                    tracing::info!("worker exited after the unmount; supervisor exits");
                    self.cleanup();
                    runtime::remove(&self.mountpoint);
                    return Ok(());
                }
                Ok(Some(status)) => {
                    tracing::warn!(pid = w.id(), %status, "worker died; starting a new one");
                    if !is_mounted(&self.mountpoint) {
                        tracing::info!("the mount is gone; supervisor exits");
                        self.cleanup();
                        runtime::remove(&self.mountpoint);
                        return Ok(());
                    }
                    worker = self.respawn(&mut failures)?;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("waiting for the worker: {e}"),
            }
        }
    }

    /// Starts a replacement worker, backing off while workers keep failing to start; after
    /// many consecutive failures the connection is aborted (applications get ENOTCONN
    /// rather than waiting forever).
    fn respawn(&self, failures: &mut u32) -> Result<Option<Child>> {
        loop {
            let started = Instant::now();
            match self.spawn_worker() {
                Ok(c) => {
                    *failures = 0;
                    return Ok(Some(c));
                }
                Err(e) => {
                    *failures += 1;
                    tracing::error!(failures = *failures, "{e:#}");
                    if *failures >= 20 {
                        tracing::error!("giving up: detaching the mount");
                        detach(&self.mountpoint);
                        self.cleanup();
                        runtime::remove(&self.mountpoint);
                        bail!("workers keep failing to start");
                    }
                    let pause = Duration::from_millis(50 << (*failures).min(5));
                    std::thread::sleep(pause.saturating_sub(started.elapsed()));
                    // Keep honouring stop requests while backing off.
                    if matches!(
                        wait_signal(Duration::from_millis(1)),
                        Some(libc::SIGTERM) | Some(libc::SIGINT)
                    ) {
                        detach(&self.mountpoint);
                        self.cleanup();
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn cleanup(&self) {
        let _ = std::fs::remove_file(runtime::control_path(&self.mountpoint));
    }
}

fn stop_child(w: &mut Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(w.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = w.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = w.kill();
    let _ = w.wait();
}

/// Waits up to `timeout` for one of the blocked signals.
fn wait_signal(timeout: Duration) -> Option<i32> {
    // SAFETY: sigtimedwait on the set blocked in block_signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let r = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        (r > 0).then_some(r)
    }
}

/// Serves a JSON snapshot of the counters to every connection on `path`.
fn start_control_socket(
    path: &Path,
    shared: Arc<Shared>,
    cfg: &MountConfig,
    mountpoint: &Path,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let image = cfg.image.clone();
    let mnt = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("lode-fuse-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut v = snapshot(&shared);
                v["supervisor_pid"] = std::process::id().into();
                v["mountpoint"] = mnt.to_string_lossy().into_owned().into();
                v["image"] = image.clone().into();
                let _ = conn.write_all(v.to_string().as_bytes());
            }
        })?;
    Ok(())
}
