//! A worker: serves FUSE requests on a connection the supervisor mounted and initialised.
//!
//! The same code runs for the first worker and for every replacement:
//!
//! 1. open the image from local state only (bootstrap and chunk tables from the cache);
//! 2. write `FUSE_NOTIFY_RESEND`: the kernel queues again every request a dead predecessor
//!    had read but not answered (they would otherwise wait forever);
//! 3. attach `fuser` to the connection (below) and serve with N threads that all read the
//!    one inherited `/dev/fuse` descriptor. Cloned descriptors (FUSE_DEV_IOC_CLONE) are
//!    avoided on purpose: a clone dies with its worker, and the kernel then fails the
//!    requests it held with ECONNABORTED, while requests read from the supervisor's shared
//!    descriptor stay queued for the next worker.
//!
//! **Attaching fuser after INIT.** fuser 0.18's `Session::from_fd` always runs the INIT
//! handshake on the descriptor it is given, and has no way to adopt an initialised
//! connection. So the session is created on one end of a `SOCK_SEQPACKET` socket pair, the
//! other end feeds it an INIT that mirrors what the supervisor negotiated (and swallows its
//! reply), and then the session's descriptor number is `dup3`ed over with the real
//! `/dev/fuse` descriptor before `run()` starts reading.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fuser::{Session, SessionACL};
use lode_format::manifest::PrefetchExtent;
use lode_format::reader::Image;
use lode_format::reverse::FileIndex;
use lode_storage::cache::BlobCache;
use lode_storage::fetch::{
    prefetch_extents, BlobFetcher, FetchOptions, FetchStats, LazyDevice, PrefetchLimits,
};
use lode_storage::trace::TraceRecorder;

use crate::abi;
use crate::config::{blob_backend, WorkerConfig};
use crate::fs::{FsOptions, LodeFs};
use crate::materialize::Materializer;
use crate::shared::{Counter, Shared};

/// Whether `bytes` hash to `digest` (`sha256:<hex>`).
fn bootstrap_matches(bytes: &[u8], digest: &str) -> bool {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes))) == digest
}

/// `lode __fuse-worker`: reads a [`WorkerConfig`] from stdin, prints `READY` on stdout
/// once it serves, and returns when the filesystem is unmounted.
pub fn main() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading the worker config")?;
    let cfg: WorkerConfig = serde_json::from_slice(&input).context("parsing the worker config")?;
    crate::init_logging();
    // Die with the supervisor (it keeps the connection; without it there is nothing to do).
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    if rustix::process::getppid().is_none_or(|p| p.as_raw_nonzero().get() == 1) {
        bail!("the supervisor is gone");
    }
    // SAFETY: the supervisor placed these descriptors at these numbers for us.
    let fuse_fd = unsafe { OwnedFd::from_raw_fd(cfg.fuse_fd) };
    let state_fd = unsafe { OwnedFd::from_raw_fd(cfg.state_fd) };
    if !abi::is_dev_fuse(&fuse_fd) {
        bail!("descriptor {} is not /dev/fuse", cfg.fuse_fd);
    }
    let shared = Arc::new(Shared::open(state_fd)?);
    shared.add(Counter::WorkerStarts, 1);
    shared.set(Counter::WorkerPid, std::process::id() as u64);

    let opened = open_fs(&cfg, shared.clone(), fuse_fd.try_clone()?)?;
    let (fs, cache, trace) = (opened.fs, opened.cache, opened.trace);
    publish_fetch_stats(shared.clone(), opened.stats);
    start_prefetch(opened.fetchers, &cfg.manifest.prefetch);

    match abi::notify_resend(fuse_fd.as_fd()) {
        Ok(()) => {}
        // Before Linux 6.9: requests a dead worker held are not recovered.
        Err(e) => tracing::warn!("FUSE_NOTIFY_RESEND failed ({e}); requests in flight in a previous worker stay unanswered"),
    }
    let session = attach(fs, &fuse_fd, &cfg)?;
    tracing::info!(
        pid = std::process::id(),
        threads = cfg.mount.threads,
        passthrough = cfg.passthrough,
        "worker serving {}",
        cfg.mount.mountpoint.display()
    );
    {
        let mut out = std::io::stdout();
        writeln!(out, "READY")?;
        out.flush()?;
    }
    // stdout was the supervisor's readiness pipe; nothing is printed after READY.
    crate::detach_stdio();
    let result = session.run();
    cache.flush();
    if let Some(t) = &trace {
        if let Err(e) = t.flush() {
            tracing::error!("{e:#}");
        }
    }
    match result {
        Ok(()) => {
            tracing::info!("connection closed (unmounted); worker exits");
            Ok(())
        }
        Err(e) => Err(e).context("serving FUSE requests"),
    }
}

/// Adds this worker's fetch counters to the shared ones every 200 ms (so they count across
/// worker restarts).
fn publish_fetch_stats(shared: Arc<Shared>, stats: Arc<FetchStats>) {
    let _ = std::thread::Builder::new()
        .name("lode-fuse-stats".into())
        .spawn(move || {
            let mut last = (0u64, 0u64, 0u64, 0u64, 0u64);
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let s = stats.snapshot();
                shared.add(Counter::FetchRequests, s.requests - last.0);
                shared.add(Counter::FetchBytes, s.bytes_fetched - last.1);
                shared.add(Counter::FetchErrors, s.errors - last.2);
                shared.add(Counter::FetchMisses, s.misses - last.3);
                shared.add(
                    Counter::FetchForegroundRequests,
                    s.foreground_requests - last.4,
                );
                last = (
                    s.requests,
                    s.bytes_fetched,
                    s.errors,
                    s.misses,
                    s.foreground_requests,
                );
            }
        });
}

/// The image's prefetch list, fetched in the background from the start (foreground reads
/// overtake it); every worker does it again, skipping what is cached.
fn start_prefetch(fetchers: Vec<Arc<BlobFetcher>>, list: &[PrefetchExtent]) {
    if list.is_empty() {
        return;
    }
    let list = list.to_vec();
    let spawned = std::thread::Builder::new()
        .name("lode-prefetch".into())
        .spawn(
            move || match prefetch_extents(&fetchers, &list, &PrefetchLimits::default()) {
                Ok(()) => tracing::info!(extents = list.len(), "background prefetch done"),
                Err(e) => tracing::warn!("prefetch: {e} (reads fetch what they need)"),
            },
        );
    if let Err(e) = spawned {
        tracing::warn!("starting the prefetch thread: {e}");
    }
}

/// What a worker serves with.
struct Opened {
    fs: LodeFs,
    cache: Arc<BlobCache>,
    stats: Arc<FetchStats>,
    fetchers: Vec<Arc<BlobFetcher>>,
    trace: Option<Arc<TraceRecorder>>,
}

fn open_fs(cfg: &WorkerConfig, shared: Arc<Shared>, fuse_fd: OwnedFd) -> Result<Opened> {
    let m = &cfg.mount;
    let cache = BlobCache::open(&m.cache_dir)?;
    let backend = blob_backend(m)?;
    let stats = Arc::new(FetchStats::default());
    let mut fetchers = Vec::new();
    for blob in &cfg.manifest.blobs {
        fetchers.push(
            BlobFetcher::open(
                &cache,
                backend.clone(),
                blob,
                FetchOptions::default(),
                stats.clone(),
            )
            .with_context(|| format!("opening blob {}", blob.digest))?,
        );
    }
    let bytes = std::fs::read(&cfg.bootstrap)
        .with_context(|| format!("reading {}", cfg.bootstrap.display()))?;
    if !bootstrap_matches(&bytes, &cfg.manifest.bootstrap.digest) {
        bail!(
            "{} does not match the bootstrap digest {}",
            cfg.bootstrap.display(),
            cfg.manifest.bootstrap.digest
        );
    }
    let mut image = Image::open(Box::new(bytes)).context("opening the bootstrap")?;
    if image.devices().len() != fetchers.len() {
        bail!(
            "the bootstrap has {} devices, image.json {} blobs",
            image.devices().len(),
            fetchers.len()
        );
    }
    for (i, f) in fetchers.iter().enumerate() {
        image.set_device(i, Box::new(LazyDevice(f.clone())));
    }
    let trace = match &m.record_trace {
        Some(path) => {
            let index =
                FileIndex::build(&image).context("mapping the image's files for --record-trace")?;
            let rec = TraceRecorder::resume(path)?;
            // `lode umount` stops the worker with SIGTERM: write the trace first.
            rec.exit_on_sigterm();
            tracing::info!(files = index.files(), trace = %path.display(), "recording an access trace");
            Some((rec, index))
        }
        None => None,
    };
    let recorder = trace.as_ref().map(|(r, _)| r.clone());
    let materializer = Materializer::new(&m.cache_dir, fetchers.clone())?;
    let fs = LodeFs::new(
        image,
        shared,
        materializer,
        fuse_fd,
        FsOptions {
            passthrough: cfg.passthrough,
            passthrough_min_size: cfg.mount.passthrough_min_size,
            trace,
        },
    );
    Ok(Opened {
        fs,
        cache,
        stats,
        fetchers,
        trace: recorder,
    })
}

/// A fuser session reading from `fuse_fd`, which was initialised by someone else.
fn attach(fs: LodeFs, fuse_fd: &OwnedFd, cfg: &WorkerConfig) -> Result<Session<LodeFs>> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .context("socketpair")?;
    let init = abi::synthetic_init(&cfg.negotiated);
    rustix::io::write(&ours, &init).context("feeding fuser its INIT")?;
    let session_fd = theirs.as_raw_fd();
    let mut config = fuser::Config::default();
    config.n_threads = Some(cfg.mount.threads.max(1));
    config.clone_fd = false;
    config.acl = SessionACL::All;
    let session = Session::from_fd(fs, theirs, SessionACL::All, config)
        .context("fuser handshake on the socket pair")?;
    let mut reply = [0u8; 512];
    let n = rustix::io::read(&ours, &mut reply[..]).context("reading fuser's INIT reply")?;
    if n < abi::OUT_HEADER_LEN || i32::from_le_bytes(reply[4..8].try_into().unwrap()) != 0 {
        bail!("fuser refused the INIT");
    }
    // From here on the session's descriptor is the real connection.
    // SAFETY: dup3 onto a descriptor number the session owns; nothing reads it yet.
    let r = unsafe { libc::dup3(fuse_fd.as_raw_fd(), session_fd, libc::O_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("dup3 of /dev/fuse");
    }
    Ok(session)
}
