//! The worker: reads pre-content events from the group and fills ranges (see the crate docs
//! for the protocol). Runs as its own process so that `kill -9` of it costs nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use lode_format::blob::BLOB_BLOCK_SIZE;
use lode_format::manifest;
use lode_format::reader::Image;
use lode_format::reverse::FileIndex;
use lode_storage::backend::http::HttpBackend;
use lode_storage::backend::local::LocalDirBackend;
use lode_storage::backend::registry::{backend_client_options, RegistryBackend};
use lode_storage::backend::Backend;
use lode_storage::cache::BlobCache;
use lode_storage::fetch::{prefetch_extents, BlobFetcher, FetchStats, PrefetchLimits};
use lode_storage::image::{ImageSource, SourceOptions};
use lode_storage::trace::TraceRecorder;
use tracing::{debug, error, info, warn};

use crate::abi::{self, fan_deny_errno, Event, FAN_ALLOW};
use crate::journal::{Counter, Journal, COUNTERS, FETCH_COUNTERS, SLOT_BUF};
use crate::stats::Stats;
use crate::{proc, sys, Spec, WORKER_NOFILE};

/// What a worker is started with (the supervisor appends the fd numbers to its argv).
pub struct WorkerArgs {
    pub spec: PathBuf,
    pub group_fd: RawFd,
    pub journal_fd: RawFd,
    pub data_fds: Vec<RawFd>,
    /// How to reach the source (registry credentials etc.), from the worker's own argv.
    pub source: SourceOptions,
}

const EIO_DENY: u32 = fan_deny_errno(libc::EIO);
/// The worker's nice value.
const WORKER_NICE: i32 = -10;

struct Served {
    spec: Spec,
    group: OwnedFd,
    journal: Journal,
    /// Kept alive: it commits filled chunks to the state files.
    _cache: Arc<BlobCache>,
    fetchers: Vec<Arc<BlobFetcher>>,
    stats: Arc<FetchStats>,
    by_inode: HashMap<(u64, u64), usize>,
    prefetch: Mutex<String>,
    /// Per blob: its mark was removed (the blob is complete in the cache).
    unmarked: Vec<AtomicBool>,
    /// `LODE_FANOTIFY_KEEP_MARKS=1`, or a trace being recorded: never remove marks.
    keep_marks: bool,
    /// `--record-trace`: the recorder and the map from blob ranges to image paths.
    trace: Option<(Arc<TraceRecorder>, FileIndex)>,
    /// Journal slots not holding unanswered events.
    free_slots: Mutex<Vec<usize>>,
    slot_freed: Condvar,
}

/// An event whose range must be fetched first.
struct Miss {
    slot: usize,
    i: usize,
    fd: OwnedFd,
    blob: usize,
    start: u64,
    len: u64,
    pid: i32,
}

/// What to do with one event.
enum Decision {
    Allow(Counter),
    Deny(Counter),
    Fill { blob: usize, start: u64, len: u64 },
}

/// Runs a worker; returns only on a setup error.
pub fn run(args: WorkerArgs) -> Result<()> {
    sys::raise_nofile(WORKER_NOFILE);
    // Own the inherited fds first (and make them close-on-exec).
    let group = sys::take_inherited_fd(args.group_fd).context("the group fd")?;
    let journal =
        Journal::open(sys::take_inherited_fd(args.journal_fd).context("the journal fd")?)?;
    let data = args
        .data_fds
        .iter()
        .map(|&fd| sys::take_inherited_fd(fd))
        .collect::<Result<Vec<_>>>()
        .context("the blob fds")?;
    let spec = Spec::load(&args.spec)?;
    if data.len() != spec.manifest.blobs.len() {
        bail!(
            "{} blob fds for {} blobs",
            data.len(),
            spec.manifest.blobs.len()
        );
    }
    if spec.threads == 0 || spec.threads > journal.nslots() {
        bail!(
            "{} reader threads for a journal of {} slots",
            spec.threads,
            journal.nslots()
        );
    }
    // Readers of the mount wait on this process for every page-cache miss, like on a kernel
    // I/O thread: do not let a busy machine's other work delay the answers (threads started
    // below inherit this).
    if let Err(e) = rustix::process::setpriority_process(None, WORKER_NICE) {
        debug!("setpriority {WORKER_NICE}: {e}");
    }
    let generation = journal.begin_generation(std::process::id());
    info!(generation, mountpoint = %spec.mountpoint.display(), "worker starting");

    let (cache, fetchers, stats) = open_fetchers(&spec, &args.source)?;
    let mut by_inode = HashMap::new();
    for (i, (f, fd)) in fetchers.iter().zip(data).enumerate() {
        let key = sys::dev_ino(fd.as_fd())?;
        f.cached().use_data_file(File::from(fd))?;
        by_inode.insert(key, i);
    }
    let trace = match &spec.record_trace {
        Some(path) => Some(open_trace(&spec, path)?),
        None => None,
    };
    let n_blobs = fetchers.len();
    let nslots = journal.nslots();
    let served = Arc::new(Served {
        prefetch: Mutex::new(if prefetching(&spec) { "running" } else { "off" }.into()),
        spec,
        group,
        journal,
        _cache: cache,
        fetchers,
        stats,
        by_inode,
        unmarked: (0..n_blobs).map(|_| AtomicBool::new(false)).collect(),
        keep_marks: trace.is_some()
            || std::env::var_os("LODE_FANOTIFY_KEEP_MARKS").is_some_and(|v| v == "1"),
        trace,
        free_slots: Mutex::new((0..nslots).rev().collect()),
        slot_freed: Condvar::new(),
    });

    served.settle();
    for b in 0..served.fetchers.len() {
        served.unmark_if_complete(b);
    }
    served.journal.set_ready(generation);
    info!(generation, "worker ready");

    let mut threads = Vec::new();
    for r in 0..served.spec.threads {
        let s = served.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("fan-reader-{r}"))
                .spawn(move || s.read_loop())?,
        );
    }
    {
        let s = served.clone();
        std::thread::Builder::new()
            .name("fan-stats".into())
            .spawn(move || s.stats_loop())?;
    }
    if prefetching(&served.spec) {
        let s = served.clone();
        std::thread::Builder::new()
            .name("fan-prefetch".into())
            .spawn(move || s.prefetch_loop())?;
    }
    for t in threads {
        let _ = t.join();
    }
    bail!("every reader thread ended")
}

/// The trace recorder (resuming what an earlier worker of this mount recorded) and the
/// reverse map of the bootstrap; SIGTERM then writes the trace before the worker exits.
fn open_trace(spec: &Spec, path: &std::path::Path) -> Result<(Arc<TraceRecorder>, FileIndex)> {
    let bytes = std::fs::read(&spec.bootstrap)
        .with_context(|| format!("reading {}", spec.bootstrap.display()))?;
    let image = Image::open(Box::new(bytes)).context("opening the bootstrap")?;
    let index = FileIndex::build(&image).context("mapping the image's files for --record-trace")?;
    let rec = TraceRecorder::resume(path)?;
    rec.exit_on_sigterm();
    info!(files = index.files(), trace = %path.display(), "recording an access trace");
    Ok((rec, index))
}

/// Background prefetch: the image's prefetch list, and everything with `--prefetch-all`.
fn prefetching(spec: &Spec) -> bool {
    spec.prefetch_all || !spec.manifest.prefetch.is_empty()
}

type Opened = (Arc<BlobCache>, Vec<Arc<BlobFetcher>>, Arc<FetchStats>);

/// Opens the cache entries `lode mount` created, for exactly the manifest in the spec. No
/// network: the chunk tables are in the cache.
fn open_fetchers(spec: &Spec, opts: &SourceOptions) -> Result<Opened> {
    let source = ImageSource::parse(&spec.source)?;
    let backend: Arc<dyn Backend> = match &source {
        ImageSource::Dir(d) => Arc::new(LocalDirBackend::new(d.join(manifest::BLOBS_DIR))),
        ImageSource::Http(url) => {
            Arc::new(HttpBackend::new(url, opts.http.clone()).with_context(|| url.clone())?)
        }
        ImageSource::Registry(r) => {
            let client =
                lode_registry::RegistryClient::new(backend_client_options(opts.registry.clone()))?;
            Arc::new(RegistryBackend::with_shared_client(
                Arc::new(client),
                r.clone(),
            ))
        }
    };
    let cache = BlobCache::open(&spec.cache_dir)?;
    let stats = Arc::new(FetchStats::default());
    let mut fetchers = Vec::new();
    for (i, blob) in spec.manifest.blobs.iter().enumerate() {
        // The entry must be the one the kernel has open; never create a new one.
        let held = cache.open_existing(blob)?.with_context(|| {
            format!(
                "the cache entry of blob {} is gone or invalid; the mount cannot be served",
                blob.digest
            )
        })?;
        if held.data_path() != spec.data_paths[i] {
            bail!("blob {}: cache path changed", blob.digest);
        }
        fetchers.push(BlobFetcher::open(
            &cache,
            backend.clone(),
            blob,
            opts.fetch.clone(),
            stats.clone(),
        )?);
    }
    Ok((cache, fetchers, stats))
}

impl Served {
    fn blob_size(&self, blob: usize) -> u64 {
        self.spec.manifest.blobs[blob].uncompressed_size
    }

    /// `[start, end)` of an event range clamped to blob `blob`, if anything is left.
    fn clamp(&self, blob: usize, range: Option<(u64, u64)>) -> Option<(u64, u64)> {
        let size = self.blob_size(blob);
        // No range record: not something FAN_PRE_ACCESS produces; fill the whole file.
        let (off, count) = range.unwrap_or((0, size));
        if count == 0 {
            // Only ftruncate reports count 0; nothing is read.
            return None;
        }
        let end = off.saturating_add(count).min(size);
        (off < end).then_some((off, end))
    }

    /// Every chunk overlapping `[start, end)` of `blob` is in the cache.
    fn all_present(&self, blob: usize, start: u64, end: u64) -> bool {
        let cached = self.fetchers[blob].cached();
        let entries = &cached.table.entries;
        let cstart = |i: usize| entries[i].blkaddr.get() as u64 * BLOB_BLOCK_SIZE;
        let cend = |i: usize| {
            cstart(i) + (entries[i].uncompressed_len.get() as u64).next_multiple_of(BLOB_BLOCK_SIZE)
        };
        let first = entries.partition_point(|e| {
            e.blkaddr.get() as u64 * BLOB_BLOCK_SIZE
                + (e.uncompressed_len.get() as u64).next_multiple_of(BLOB_BLOCK_SIZE)
                <= start
        });
        let mut i = first;
        while i < entries.len() && cstart(i) < end {
            if cend(i) > start && !cached.is_present(i) {
                return false;
            }
            i += 1;
        }
        true
    }

    fn decide(&self, fd: &OwnedFd, ev: &Event) -> Decision {
        let blob = match sys::dev_ino(fd.as_fd())
            .ok()
            .and_then(|k| self.by_inode.get(&k))
        {
            Some(&b) => b,
            None => {
                warn!(?ev, "event on a file that is not one of our blobs: EIO");
                return Decision::Deny(Counter::Unknown);
            }
        };
        let range = self.clamp(blob, ev.range);
        if let (Some((rec, index)), Some((s, e))) = (&self.trace, range) {
            for f in index.files_in(blob, s, e) {
                rec.record(f.path, f.size, f.offset, f.len);
            }
        }
        match range {
            None => Decision::Allow(Counter::AllowedEmpty),
            Some((s, e)) if self.all_present(blob, s, e) => Decision::Allow(Counter::AllowedCached),
            Some((start, end)) => Decision::Fill {
                blob,
                start,
                len: end - start,
            },
        }
    }

    /// Once every chunk of a blob is in the cache, its reads need no answer any more: remove
    /// its mark, so the kernel reads it with no event at all (spec §8.6). Events queued
    /// before are still answered (allowed: the blob is complete).
    fn unmark_if_complete(&self, blob: usize) {
        if self.keep_marks
            || !self.fetchers[blob].cached().is_complete()
            || self.unmarked[blob].swap(true, Ordering::AcqRel)
        {
            return;
        }
        let data = self.fetchers[blob].cached().data_file();
        match sys::fanotify_mark_fd(
            self.group.as_fd(),
            abi::FAN_MARK_REMOVE | abi::FAN_MARK_INODE,
            abi::FAN_PRE_ACCESS,
            data.as_fd(),
        ) {
            Ok(()) => info!(blob, "blob complete in the cache: mark removed"),
            // Removed by an earlier worker.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => warn!(blob, "removing the mark of a complete blob: {e}"),
        }
    }

    /// write response → set answered → close fd (this order is the protocol).
    fn answer(&self, slot: usize, i: usize, fd: OwnedFd, response: u32) {
        if let Err(e) = sys::respond(self.group.as_fd(), fd.as_raw_fd(), response) {
            self.journal.count(Counter::RespondErrors, 1);
            error!(
                fd = fd.as_raw_fd(),
                response, "fanotify response refused: {e}"
            );
        }
        self.journal.set_answered(slot, i);
        drop(fd);
    }

    fn fill(&self, blob: usize, start: u64, len: u64) -> u32 {
        match self.fetchers[blob].ensure(start, len) {
            Ok(()) => FAN_ALLOW,
            Err(e) => {
                warn!(blob, start, len, "fill failed, answering EIO: {e}");
                EIO_DENY
            }
        }
    }

    fn take_slot(&self) -> usize {
        let mut free = self.free_slots.lock().expect("slot lock");
        loop {
            if let Some(s) = free.pop() {
                return s;
            }
            free = self.slot_freed.wait(free).expect("slot lock");
        }
    }

    fn release_slot(&self, slot: usize) {
        self.free_slots.lock().expect("slot lock").push(slot);
        self.slot_freed.notify_one();
    }

    /// A reader thread: leases a free journal slot, reads a batch of events into it,
    /// answers the cached ones at once and hands each miss to a fill thread; the slot is
    /// free again once every event in it is answered (only then may it be cleared).
    fn read_loop(self: &Arc<Self>) {
        loop {
            let slot = self.take_slot();
            let n = loop {
                self.journal.clear_slot(slot);
                match self.journal.read_into_slot(slot, self.group.as_fd()) {
                    Ok(n) => break n,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => {
                        // EMFILE: the kernel denied that event already (EPERM to the reader).
                        error!(slot, "reading the fanotify group: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            let bytes = self.journal.slot_bytes(slot, n);
            let (events, garbage) = abi::parse_events(&bytes);
            if garbage {
                error!(slot, n, "unparsable bytes after {} events", events.len());
            }
            let mut misses = Vec::new();
            for (i, ev) in events.iter().enumerate() {
                if ev.fd < 0 {
                    if ev.mask & abi::FAN_Q_OVERFLOW != 0 {
                        self.journal.count(Counter::Overflows, 1);
                        error!("fanotify queue overflow: the kernel allowed events unseen");
                    }
                    self.journal.set_answered(slot, i);
                    continue;
                }
                // SAFETY: the kernel installed this fd in our table for this event when we
                // read it; this is its only owner.
                let fd = unsafe { OwnedFd::from_raw_fd(ev.fd) };
                self.journal.count(Counter::Events, 1);
                match self.decide(&fd, ev) {
                    Decision::Allow(c) => {
                        self.journal.count(c, 1);
                        self.answer(slot, i, fd, FAN_ALLOW);
                    }
                    Decision::Deny(c) => {
                        self.journal.count(c, 1);
                        self.journal.count(Counter::Denied, 1);
                        self.answer(slot, i, fd, EIO_DENY);
                    }
                    Decision::Fill { blob, start, len } => {
                        self.journal.set_blob(slot, i, blob);
                        misses.push(Miss {
                            slot,
                            i,
                            fd,
                            blob,
                            start,
                            len,
                            pid: ev.pid,
                        });
                    }
                }
            }
            if misses.is_empty() {
                self.release_slot(slot);
                continue;
            }
            let left = Arc::new(AtomicUsize::new(misses.len()));
            for m in misses {
                let job = Arc::new(Mutex::new(Some(m)));
                let (s, j, left2) = (self.clone(), job.clone(), left.clone());
                let spawned = std::thread::Builder::new()
                    .name("fan-fill".into())
                    .spawn(move || s.fill_job(&j, &left2));
                if let Err(e) = spawned {
                    // No thread to be had: serve it here (the job is still in `job`).
                    warn!("starting a fill thread: {e}; filling inline");
                    self.fill_job(&job, &left);
                }
            }
        }
    }

    /// Fills one miss and answers it; the last of its batch frees the slot.
    fn fill_job(&self, job: &Mutex<Option<Miss>>, left: &AtomicUsize) {
        let Some(m) = job.lock().expect("job lock").take() else {
            return;
        };
        debug!(m.blob, m.start, m.len, pid = m.pid, "filling");
        let r = self.fill(m.blob, m.start, m.len);
        if r == FAN_ALLOW {
            self.unmark_if_complete(m.blob);
        }
        self.journal.count(
            if r == FAN_ALLOW {
                Counter::AllowedFilled
            } else {
                Counter::Denied
            },
            1,
        );
        self.answer(m.slot, m.i, m.fd, r);
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release_slot(m.slot);
        }
    }

    /// Settles what dead predecessors left pending (crate docs, "The journal protocol").
    fn settle(&self) {
        struct Stale {
            slot: usize,
            i: usize,
            ev: Event,
            blob: Option<usize>,
        }
        let mut stale = Vec::new();
        for slot in 0..self.journal.nslots() {
            let (events, _) = abi::parse_events(&self.journal.slot_bytes(slot, SLOT_BUF));
            for (i, ev) in events.into_iter().enumerate() {
                let (answered, blob) = self.journal.event_state(slot, i);
                if ev.fd >= 0 && !answered {
                    stale.push(Stale { slot, i, ev, blob });
                }
            }
        }
        if !stale.is_empty() {
            info!(
                events = stale.len(),
                "settling events a dead worker had read"
            );
        }
        let settle_one = |st: &Stale| {
            let blobs: Vec<usize> = match st.blob {
                Some(b) if b < self.fetchers.len() => vec![b],
                _ => (0..self.fetchers.len()).collect(),
            };
            let mut response = FAN_ALLOW;
            for b in blobs {
                if let Some((s, e)) = self.clamp(b, st.ev.range) {
                    if self.fill(b, s, e - s) != FAN_ALLOW {
                        response = EIO_DENY;
                    }
                }
            }
            match sys::respond(self.group.as_fd(), st.ev.fd, response) {
                Ok(()) => {
                    self.journal.count(Counter::Settled, 1);
                    if response != FAN_ALLOW {
                        self.journal.count(Counter::SettledDenied, 1);
                    }
                    info!(fd = st.ev.fd, range = ?st.ev.range, response, "settled a stale event");
                }
                // The dead worker had answered it (and died before setting its bit).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    self.journal.count(Counter::RespondErrors, 1);
                    error!(fd = st.ev.fd, "settling a stale event: {e}");
                }
            }
            self.journal.set_answered(st.slot, st.i);
        };
        std::thread::scope(|sc| {
            for st in &stale {
                sc.spawn(move || settle_one(st));
            }
        });
        for slot in 0..self.journal.nslots() {
            self.journal.clear_slot(slot);
        }
        // Safety net: any pending event with an fd number gets EIO rather than a reader
        // blocked forever (none expected; nothing new has been read yet).
        let mut swept = 0;
        for n in 0..WORKER_NOFILE as RawFd {
            if sys::respond(self.group.as_fd(), n, EIO_DENY).is_ok() {
                swept += 1;
            }
        }
        if swept > 0 {
            self.journal.count(Counter::Swept, swept);
            error!(swept, "answered unjournaled stale events with EIO");
        }
    }

    fn snapshot(&self) -> Stats {
        let ws = self.stats.snapshot();
        self.journal.publish_fetch(&[
            ws.requests,
            ws.bytes_fetched,
            ws.chunks_fetched,
            ws.errors,
            ws.hits,
            ws.misses,
        ]);
        let totals = self.journal.fetch_totals();
        let blobs = &self.spec.manifest.blobs;
        Stats {
            mountpoint: self.spec.mountpoint.display().to_string(),
            image: self.spec.image.clone(),
            supervisor_pid: std::os::unix::process::parent_id(),
            worker_pid: std::process::id(),
            worker_generation: self.journal.generation(),
            worker_restarts: self.journal.restarts(),
            updated: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            image_bytes: blobs.iter().map(|b| b.uncompressed_size).sum(),
            blob_bytes: blobs.iter().map(|b| b.size).sum(),
            chunks: blobs.iter().map(|b| b.chunk_count).sum(),
            chunks_present: self
                .fetchers
                .iter()
                .map(|f| f.cached().chunks_present.load(Ordering::Relaxed))
                .sum(),
            blobs_unmarked: self
                .unmarked
                .iter()
                .filter(|u| u.load(Ordering::Relaxed))
                .count() as u64,
            open_requests: self.spec.open_requests,
            open_bytes: self.spec.open_bytes,
            fetch: FETCH_COUNTERS
                .iter()
                .zip(totals)
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            events: COUNTERS
                .iter()
                .map(|(c, k)| (k.to_string(), self.journal.counter(*c)))
                .collect::<BTreeMap<_, _>>(),
            worker_fetch: serde_json::to_value(&ws).unwrap_or_default(),
            prefetch: self.prefetch.lock().expect("prefetch lock").clone(),
        }
    }

    fn stats_loop(&self) {
        let parent = std::os::unix::process::parent_id();
        loop {
            if let Err(e) = self.snapshot().save(&self.spec.stats_path) {
                debug!("stats: {e:#}");
            }
            std::thread::sleep(Duration::from_millis(250));
            if std::os::unix::process::parent_id() != parent {
                self.orphaned();
            }
        }
    }

    /// The supervisor died: we hold the group now. Serve until the mount is unreachable,
    /// then exit (closing the group, which removes the marks).
    fn orphaned(&self) {
        let dev = self.journal.erofs_dev();
        let me = std::process::id();
        if dev != 0 && (proc::mounted_in("self", dev) || !proc::users_of(dev, &[me]).is_empty()) {
            return;
        }
        error!("the supervisor is gone and the mount is unreachable: worker exiting");
        let mnt = &self.spec.mountpoint;
        if lode_mount::runtime::load(mnt).is_some_and(|r| r.mode == "fanotify") {
            lode_mount::runtime::remove(mnt);
        }
        std::process::exit(0);
    }

    fn prefetch_loop(&self) {
        let limits = PrefetchLimits::new(self.spec.prefetch_rate);
        let mut delay = Duration::from_secs(1);
        loop {
            let mut failed = None;
            // The image's prefetch list first, in its order; then, if asked, everything.
            if let Err(e) = prefetch_extents(&self.fetchers, &self.spec.manifest.prefetch, &limits)
            {
                failed = Some(e.to_string());
            }
            if self.spec.prefetch_all {
                for f in &self.fetchers {
                    if let Err(e) = f.prefetch_all(&limits) {
                        failed = Some(e.to_string());
                    }
                }
            }
            for b in 0..self.fetchers.len() {
                self.unmark_if_complete(b);
            }
            match failed {
                None => {
                    info!("background prefetch done");
                    *self.prefetch.lock().expect("prefetch lock") = "done".into();
                    return;
                }
                Some(e) => {
                    warn!("prefetch failed, retrying in {delay:?}: {e}");
                    *self.prefetch.lock().expect("prefetch lock") = format!("failed: {e}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}
