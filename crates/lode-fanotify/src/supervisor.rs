//! The supervisor: holds the fanotify group and the marks for as long as the EROFS mount can
//! be read, and keeps a worker running (see the crate docs).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lode_mount::kernel::ErofsMount;
use lode_mount::runtime::{self, MountRecord};
use rustix::fs::FlockOperation;
use tracing::{error, info, warn};

use crate::abi;
use crate::journal::Journal;
use crate::{proc, sys, Spec};

static TERM_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_sig: libc::c_int) {
    TERM_REQUESTED.store(true, Ordering::SeqCst);
}

/// SIGTERM/SIGINT/SIGHUP only set a flag: the supervisor exits when the mount is gone, never
/// because it was asked to (exiting would let every pending and later read see zeros).
fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `on_term` is async-signal-safe (one atomic store); the sigaction struct is
        // fully initialised (zeroed, then handler and an empty mask set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_term as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: setting a signal to SIG_IGN has no memory-safety requirements.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const TICK: Duration = Duration::from_millis(100);

struct Running {
    spec: Spec,
    spec_path: PathBuf,
    group: OwnedFd,
    journal: Journal,
    /// Non-notifying read-write fds of the blob data files (passed to each worker).
    data: Vec<File>,
    /// Shared flocks on the state files: cache GC leaves the blobs alone.
    _locks: Vec<File>,
    worker: Option<Child>,
    /// The current worker got ready (settled and serving).
    worker_ready: bool,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// `st_dev` of the EROFS superblock once mounted.
    dev: u64,
    /// A detached clone of the mount: keeps the superblock (and so `dev`) ours.
    _pin: Option<OwnedFd>,
    mounted: bool,
}

/// Runs the supervisor of the mount described by `spec_path`. `status` (a pipe to
/// `lode mount`) receives `READY` once the mount is up, or `ERROR <message>`. Returns when
/// the mount is gone.
pub fn supervise(spec_path: &Path, status: Option<OwnedFd>) -> Result<()> {
    install_signal_handlers();
    let mut status = status.map(File::from);
    let mut report = |msg: &str| {
        if let Some(s) = status.as_mut() {
            let _ = s.write_all(msg.as_bytes());
        }
    };
    let setup = Spec::load(spec_path).and_then(|spec| Running::setup(spec, spec_path));
    let mut running = match setup {
        Ok(r) => r,
        Err(e) => {
            error!("setup failed: {e:#}");
            report(&format!("ERROR {e:#}\n"));
            return Err(e);
        }
    };
    report("READY\n");
    drop(status);
    info!(
        mountpoint = %running.spec.mountpoint.display(),
        "mounted; supervising"
    );
    running.run();
    running.cleanup();
    Ok(())
}

impl Running {
    fn setup(spec: Spec, spec_path: &Path) -> Result<Running> {
        rustix::process::chdir("/").context("chdir /")?;
        sys::raise_nofile(4096);
        let mut locks = Vec::new();
        for p in &spec.state_paths {
            let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
            rustix::fs::flock(&f, FlockOperation::LockShared)
                .with_context(|| format!("locking {}", p.display()))?;
            locks.push(f);
        }
        // Before our marks, and correct even if another mount marked these files already.
        let data = sys::open_nonotifying(&spec.data_paths)
            .context("opening the blob cache files without notifications")?;
        let group = sys::fanotify_init(
            abi::FAN_CLASS_PRE_CONTENT | abi::FAN_CLOEXEC | abi::FAN_UNLIMITED_QUEUE,
            (libc::O_RDWR | libc::O_LARGEFILE) as u32,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => anyhow!("fanotify_init: {e} (fanotify mode needs CAP_SYS_ADMIN: run as root)"),
            Some(libc::EINVAL) => anyhow!("fanotify_init(FAN_CLASS_PRE_CONTENT): {e} (the kernel lacks pre-content events: Linux 6.14+ with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"),
            _ => anyhow!("fanotify_init: {e}"),
        })?;
        for p in &spec.data_paths {
            sys::fanotify_mark(
                group.as_fd(),
                abi::FAN_MARK_ADD | abi::FAN_MARK_INODE,
                abi::FAN_PRE_ACCESS,
                p,
            )
            .map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    " (the cache filesystem does not support pre-content marks; use ext4, xfs or btrfs)"
                } else {
                    ""
                };
                anyhow!("fanotify_mark FAN_PRE_ACCESS {}: {e}{hint}", p.display())
            })?;
        }
        if let Some(t) = &spec.record_trace {
            lode_storage::trace::start(t)?;
        }
        let journal = Journal::create(crate::JOURNAL_SLOTS.max(spec.threads))?;
        let mut r = Running {
            spec,
            spec_path: spec_path.to_path_buf(),
            group,
            journal,
            data,
            _locks: locks,
            worker: None,
            worker_ready: false,
            restart_at: None,
            backoff: BACKOFF_MIN,
            dev: 0,
            _pin: None,
            mounted: false,
        };
        if let Err(e) = r.start_worker().and_then(|_| r.wait_ready()) {
            r.kill_worker();
            return Err(e);
        }
        // The marks exist, so every file EROFS opens now raises events.
        let m = ErofsMount {
            bootstrap: r.spec.bootstrap.clone(),
            devices: r.spec.data_paths.clone(),
        };
        if let Err(e) = m.mount(&r.spec.mountpoint) {
            r.kill_worker();
            return Err(e);
        }
        r.mounted = true;
        // From here on the mount exists: never return an error (that would exit and fail
        // it open) unless it could be unmounted again.
        match rustix::fs::stat(&r.spec.mountpoint) {
            Ok(st) => r.dev = st.st_dev,
            Err(e) => {
                let e = anyhow!("stat of the new mount {}: {e}", r.spec.mountpoint.display());
                if lode_mount::kernel::umount(&r.spec.mountpoint).is_ok() {
                    r.kill_worker();
                    return Err(e);
                }
                error!("{e:#}; cannot unmount it either: serving on, exit detection disabled");
            }
        }
        r.journal.set_erofs_dev(r.dev);
        // Pin the superblock with a detached clone of the mount (it does not make the mount
        // busy): while we live, its device number cannot be given to another mount, so
        // "is device X still mounted or in use" is about our superblock and no other.
        match rustix::mount::open_tree(
            rustix::fs::CWD,
            &r.spec.mountpoint,
            rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
                | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
        ) {
            Ok(fd) => r._pin = Some(fd),
            Err(e) => warn!("pinning the superblock (open_tree clone): {e}; a device number reused after unmount could delay exit"),
        }
        let saved = runtime::save(&MountRecord {
            mountpoint: r.spec.mountpoint.clone(),
            mode: "fanotify".into(),
            image: r.spec.image.clone(),
            pid: std::process::id(),
            cache_dir: r.spec.cache_dir.clone(),
            control: None,
            started: runtime::now_secs(),
        });
        if let Err(e) = saved {
            error!("writing the mount record: {e:#} (`lode umount` will not find this process; it exits on its own once unmounted)");
        }
        Ok(r)
    }

    fn start_worker(&mut self) -> Result<()> {
        let argv = &self.spec.worker_command;
        let Some(program) = argv.first() else {
            bail!("the spec has no worker command");
        };
        let group = self.group.as_raw_fd();
        let journal = self.journal.fd().as_raw_fd();
        let data: Vec<RawFd> = self.data.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new(program);
        cmd.args(&argv[1..])
            .arg("--spec")
            .arg(&self.spec_path)
            .arg("--group-fd")
            .arg(group.to_string())
            .arg("--journal-fd")
            .arg(journal.to_string());
        if !data.is_empty() {
            let list: Vec<String> = data.iter().map(|fd| fd.to_string()).collect();
            cmd.arg("--data-fds").arg(list.join(","));
        }
        cmd.stdin(Stdio::null());
        let mut inherit = vec![group, journal];
        inherit.extend(&data);
        // SAFETY: the closure runs between fork and exec and only makes fcntl calls
        // (async-signal-safe) on fds that are open in the child.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    sys::inherit_fd(fd)?;
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the worker {program}"))?;
        info!(pid = child.id(), "worker started");
        self.worker = Some(child);
        self.worker_ready = false;
        Ok(())
    }

    /// Waits until the worker just started has settled and serves.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.worker.as_mut().context("no worker")?;
            if let Some(st) = child.try_wait()? {
                self.worker = None;
                bail!(
                    "the worker exited ({st}) before serving; see {}",
                    self.spec.log_path.display()
                );
            }
            let g = self.journal.generation();
            if g > 0 && self.journal.ready_generation() == g {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the worker did not get ready in {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM to the worker, then up to `grace` for it to exit.
    fn stop_worker(&mut self, grace: Duration) {
        let Some(c) = self.worker.as_mut() else {
            return;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.worker = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        warn!("the worker did not exit in {grace:?} after SIGTERM");
    }

    fn kill_worker(&mut self) {
        if let Some(mut c) = self.worker.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn run(&mut self) {
        let mut said_busy = false;
        let mut said_term = false;
        loop {
            std::thread::sleep(TICK);
            // A panic here must not end the process while the mount exists.
            let tick = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.tick(&mut said_busy, &mut said_term)
            }));
            match tick {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => error!("supervisor tick panicked; carrying on"),
            }
        }
    }

    /// One round of supervision; true when the mount is gone and unreachable.
    fn tick(&mut self, said_busy: &mut bool, said_term: &mut bool) -> bool {
        let me = std::process::id();
        {
            self.keep_worker();
            if self.dev != 0 && !proc::mounted_in("self", self.dev) {
                let wpid = self.worker.as_ref().map(|c| c.id()).unwrap_or(0);
                let users = proc::users_of(self.dev, &[me, wpid]);
                if users.is_empty() {
                    info!("the mount is gone and nothing can reach it: exiting");
                    self.mounted = false;
                    return true;
                }
                if !*said_busy {
                    warn!(
                        ?users,
                        "unmounted here but still reachable; serving until they let go"
                    );
                    *said_busy = true;
                }
            }
            if TERM_REQUESTED.load(Ordering::SeqCst) && !*said_term {
                info!("termination requested: exiting once the mount is gone (exiting now would fail it open)");
                *said_term = true;
            }
        }
        false
    }

    /// Reaps a dead worker and starts the next one: at once if it had been serving (a
    /// crash or `kill -9`: readers are waiting), with backoff (0.1 s doubling to 5 s) if it
    /// died before it got ready (a start-up failure that would only repeat).
    fn keep_worker(&mut self) {
        if let Some(c) = self.worker.as_mut() {
            match c.try_wait() {
                Ok(None) => {
                    let g = self.journal.generation();
                    if g > 0 && self.journal.ready_generation() == g {
                        self.worker_ready = true;
                        self.backoff = BACKOFF_MIN;
                    }
                    return;
                }
                Ok(Some(st)) => {
                    let g = self.journal.generation();
                    let served =
                        self.worker_ready || (g > 0 && self.journal.ready_generation() == g);
                    warn!(pid = c.id(), served, "worker exited ({st}); restarting");
                    self.worker = None;
                    self.journal.add_restart();
                    let wait = if served { Duration::ZERO } else { self.backoff };
                    if !served {
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    }
                    self.restart_at = Some(Instant::now() + wait);
                }
                Err(e) => {
                    error!("waiting for the worker: {e}");
                    return;
                }
            }
        }
        if self.worker.is_none() && self.restart_at.is_none_or(|t| Instant::now() >= t) {
            match self.start_worker() {
                Ok(()) => self.restart_at = None,
                Err(e) => {
                    error!("restarting the worker: {e:#}");
                    self.restart_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn cleanup(&mut self) {
        // The mount is gone: a worker recording a trace writes it on SIGTERM.
        if self.spec.record_trace.is_some() {
            self.stop_worker(Duration::from_secs(3));
        }
        self.kill_worker();
        let mnt = &self.spec.mountpoint;
        if runtime::load(mnt).is_some_and(|r| r.pid == std::process::id()) {
            runtime::remove(mnt);
        }
        let _ = std::fs::remove_file(&self.spec.stats_path);
        let _ = std::fs::remove_file(&self.spec_path);
        info!("supervisor exiting; closing the group removes the marks");
    }
}

/// Starts the supervisor of the mount in `spec_path` (`exe __fanotify-supervisor`, in its
/// own session, output appended to `log_path`, plus `envs`) and waits until it reports the
/// mount up. Returns its pid.
pub fn launch(
    exe: &Path,
    spec_path: &Path,
    log_path: &Path,
    envs: &[(String, String)],
) -> Result<u32> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let wfd = w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("__fanotify-supervisor")
        .arg("--spec")
        .arg(spec_path)
        .arg("--status-fd")
        .arg(wfd.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // SAFETY: between fork and exec: setsid and fcntl only (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            sys::inherit_fd(wfd)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} __fanotify-supervisor", exe.display()))?;
    drop(w);
    let mut status = String::new();
    let _ = File::from(r).read_to_string(&mut status);
    if status.starts_with("READY") {
        return Ok(child.id());
    }
    let st = child.wait()?;
    match status.strip_prefix("ERROR ") {
        Some(msg) => bail!("{}", msg.trim_end()),
        None => bail!(
            "the fanotify supervisor exited ({st}) without reporting; see {}",
            log_path.display()
        ),
    }
}
