//! The worker: the process that reads `/dev/cachefiles` and answers it.
//!
//! - The message thread polls the device and handles every message in order: OPEN is
//!   answered at once from memory (`copen` with the exact size, or an error for an unknown
//!   key), CLOSE drops the object, READ is queued to a pool of reader threads (a READ may wait
//!   on the network; OPENs and other READs never wait behind it).
//! - A reader thread makes the range present (bootstrap: the verified local file; blob: the
//!   storage layer's fetcher), writes it through the object's anonymous fd (page-aligned
//!   O_DIRECT writes) and completes the READ. When the data cannot be had it writes nothing
//!   and completes anyway, so the application gets EIO at once: no hang, never zeros.
//! - The control thread serves `lode mount`/`lode umount`/status requests.
//! - A restarted worker (`--restore`) reopens the images recorded in the run directory and
//!   writes `restore`, so the kernel re-sends what the dead worker had read but not answered.
//!   The kernel re-opens each object on its next READ (new OPEN, new anonymous fd).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use lode_storage::cache::BlobCache;
use lode_storage::fetch::{BlobFetcher, PrefetchLimits};
use lode_storage::image::{open_image, ImageSource, OpenedImage};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::abi::{self, Message, PAGE_SIZE};
use crate::control::{ImageSpec, Request, RunDir, DOMAIN};
use crate::sys::{self, AlignedBuf, AnonFd, Device};

/// Threads serving READs (they block on remote fetches).
const READ_THREADS: usize = 16;
/// Largest piece copied into the cache file per write.
const COPY_PIECE: usize = 1 << 20;
/// How often mounts are checked for having gone away.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// An image registered but never mounted is forgotten after this.
const PENDING_TIMEOUT: Duration = Duration::from_secs(120);

pub struct WorkerArgs {
    pub cache_dir: PathBuf,
    pub dev_fd: RawFd,
    pub listen_fd: RawFd,
    pub restore: bool,
}

/// Counters per cookie key (fsid or blob digest): how the kernel used it.
#[derive(Default)]
struct KeyStats {
    opens: AtomicU64,
    reads: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// An image this worker serves.
struct Served {
    fsid: String,
    spec: ImageSpec,
    image: OpenedImage,
}

struct Entry {
    served: Arc<Served>,
    mountpoint: Option<PathBuf>,
    /// The mount's sysfs directory was seen: its disappearance means the mount is gone.
    seen: bool,
    added: Instant,
    warned: bool,
}

/// What an object (cache file) holds.
enum Target {
    /// The image's bootstrap: served from the verified local copy.
    Bootstrap { file: File, len: u64 },
    /// A blob: the fetcher of the image that provided it (re-resolved when that image goes).
    Blob {
        provider: Mutex<(Arc<Served>, usize)>,
    },
}

struct Object {
    id: u32,
    key: String,
    fd: AnonFd,
    size: u64,
    target: Target,
    stats: Arc<KeyStats>,
    delay: Option<Duration>,
}

struct Worker {
    dev: Device,
    cache: Arc<BlobCache>,
    cache_dir: PathBuf,
    run: RunDir,
    images: Mutex<BTreeMap<String, Entry>>,
    objects: Mutex<HashMap<u32, Arc<Object>>>,
    keys: Mutex<HashMap<String, Arc<KeyStats>>>,
    wake_w: OwnedFd,
    check_now: AtomicBool,
    started: SystemTime,
    restored: bool,
    inflight: AtomicU64,
    reads_total: AtomicU64,
    read_errors: AtomicU64,
    bad_messages: AtomicU64,
    /// Time READs spent making data present (fetch) and writing cache files, in µs.
    fetch_us: AtomicU64,
    write_us: AtomicU64,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    fsid: String,
    spec: ImageSpec,
    mountpoint: Option<PathBuf>,
    bootstrap_digest: String,
}

/// Characters of a bootstrap digest in an fsid.
const FSID_DIGEST_CHARS: usize = 28;

/// The fsid of the `n`-th concurrent mount of the image whose bootstrap has the sha256 digest
/// `hex`: the digest in URL-safe base64, cut to 28 characters (168 bits), then `-n` from the
/// second mount on. Stable, so the next mount of the same image reuses the bootstrap's cache
/// file; long enough that no two bootstraps share one (cachefiles would serve one image's
/// cached metadata to the other if their sizes matched); and short, because the kernel names
/// the mount's sysfs directory with only the first 36 bytes of `<domain>,<fsid>`
/// (`s_sysfs_name`): longer fsids would collide there and fail the mount.
pub fn fsid_for(hex: &str, n: u32) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let mut s = String::new();
    for group in bytes.chunks(3) {
        let v = group
            .iter()
            .enumerate()
            .fold(0u32, |v, (i, b)| v | (*b as u32) << (16 - 8 * i));
        for k in 0..=group.len() {
            s.push(ALPHABET[(v >> (18 - 6 * k) & 63) as usize] as char);
        }
    }
    s.truncate(FSID_DIGEST_CHARS);
    if n <= 1 {
        s
    } else {
        format!("{s}-{n}")
    }
}

/// `/sys/fs/erofs/<domain>,<fsid>`: exists exactly as long as the mount's superblock.
fn sysfs_dir(fsid: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/erofs/{DOMAIN},{fsid}"))
}

/// Runs the worker until its last mount is gone (then returns Ok).
pub fn run(args: WorkerArgs) -> Result<()> {
    let dev = Device::inherit(args.dev_fd).context("adopting /dev/cachefiles")?;
    let listener = sys::inherit_listener(args.listen_fd).context("adopting the control socket")?;
    let run = RunDir::from_env();
    let cache = BlobCache::open(&args.cache_dir)?;
    let (wake_r, wake_w) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )?;
    let w = Arc::new(Worker {
        dev,
        cache,
        cache_dir: args.cache_dir.clone(),
        run: run.clone(),
        images: Mutex::new(BTreeMap::new()),
        objects: Mutex::new(HashMap::new()),
        keys: Mutex::new(HashMap::new()),
        wake_w,
        check_now: AtomicBool::new(false),
        started: SystemTime::now(),
        restored: args.restore,
        inflight: AtomicU64::new(0),
        reads_total: AtomicU64::new(0),
        read_errors: AtomicU64::new(0),
        bad_messages: AtomicU64::new(0),
        fetch_us: AtomicU64::new(0),
        write_us: AtomicU64::new(0),
    });
    let _ = std::fs::write(run.worker_pid(), std::process::id().to_string());
    if args.restore {
        w.reload();
        // Everything the dead worker had read but not answered becomes new again.
        w.dev
            .command(&abi::command("restore", None).expect("valid"))
            .context("writing `restore` to /dev/cachefiles")?;
        tracing::info!("restore sent; serving again");
    }

    // Signals: SIGTERM (from `lode umount` or the supervisor) means "exit if idle".
    {
        let w = w.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    tracing::info!("signal {sig}: exiting if no mount is left");
                    w.check_soon();
                }
            })?;
    }
    {
        let w = w.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || w.control_loop(listener))?;
    }
    let (tx, rx) = crossbeam_channel::unbounded::<(Arc<Object>, abi::Read)>();
    for i in 0..READ_THREADS {
        let w = w.clone();
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("read-{i}"))
            .spawn(move || {
                let mut buf = AlignedBuf::new(COPY_PIECE);
                for (obj, r) in rx {
                    w.serve_read(&obj, r, &mut buf);
                    w.inflight.fetch_sub(1, Ordering::Relaxed);
                }
            })?;
    }

    let mut buf = [0u8; abi::MSG_MAX_SIZE];
    let mut last_scan = Instant::now();
    let mut read_failures = 0u32;
    loop {
        let ready = sys::poll_readable(&[w.dev.as_fd(), wake_r.as_fd()], SCAN_INTERVAL)?;
        if ready[1] {
            let mut sink = [0u8; 64];
            while matches!(rustix::io::read(&wake_r, &mut sink), Ok(n) if n > 0) {}
        }
        if ready[0] {
            loop {
                match w.dev.read_message(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        read_failures = 0;
                        w.handle(&buf[..n], &tx);
                    }
                    Err(e) => {
                        read_failures += 1;
                        tracing::error!("reading /dev/cachefiles: {e}");
                        if read_failures > 50 {
                            bail!("/dev/cachefiles keeps failing: {e}");
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        if w.check_now.swap(false, Ordering::AcqRel) || last_scan.elapsed() >= SCAN_INTERVAL {
            last_scan = Instant::now();
            if w.scan() && w.try_exit() {
                tracing::info!("no mount left; exiting");
                w.cache.flush();
                return Ok(());
            }
        }
    }
}

impl Worker {
    fn check_soon(&self) {
        self.check_now.store(true, Ordering::Release);
        let _ = rustix::io::write(&self.wake_w, &[1]);
    }

    fn key_stats(&self, key: &str) -> Arc<KeyStats> {
        self.keys
            .lock()
            .expect("keys lock")
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    // ---- messages -------------------------------------------------------------------------

    fn handle(&self, bytes: &[u8], reads: &crossbeam_channel::Sender<(Arc<Object>, abi::Read)>) {
        match abi::parse_message(bytes) {
            Ok(Message::Open(o)) => self.open(o),
            Ok(Message::Close(c)) => {
                let obj = self
                    .objects
                    .lock()
                    .expect("objects lock")
                    .remove(&c.object_id);
                match obj {
                    Some(obj) => {
                        tracing::debug!(object = c.object_id, key = %obj.key, "CLOSE");
                        if matches!(obj.target, Target::Bootstrap { .. }) {
                            // A bootstrap object closes when its mount goes away.
                            self.check_now.store(true, Ordering::Release);
                        }
                    }
                    None => tracing::warn!(object = c.object_id, "CLOSE of an unknown object"),
                }
            }
            Ok(Message::Read(r)) => {
                let obj = self
                    .objects
                    .lock()
                    .expect("objects lock")
                    .get(&r.object_id)
                    .cloned();
                match obj {
                    Some(obj) => {
                        self.inflight.fetch_add(1, Ordering::Relaxed);
                        reads.send((obj, r)).expect("read threads alive");
                    }
                    // Cannot be completed without an fd of the object; the kernel only sends
                    // READs for objects it opened through us, so this is a kernel/daemon bug.
                    None => tracing::error!(
                        msg = r.msg_id,
                        object = r.object_id,
                        "READ for an object this worker never opened"
                    ),
                }
            }
            Err(e) => {
                self.bad_messages.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{e}");
                // Answer what can be answered, so nothing waits forever.
                let Some(h) = e.header else { return };
                match h.opcode {
                    abi::OP_OPEN => {
                        let _ = self
                            .dev
                            .command(abi::copen_error(h.msg_id, libc::EINVAL).as_bytes());
                        if let Some(fd) = e.open_fd {
                            drop(AnonFd::adopt(fd));
                        }
                    }
                    abi::OP_READ => {
                        let obj = self
                            .objects
                            .lock()
                            .expect("objects lock")
                            .get(&h.object_id)
                            .cloned();
                        if let Some(obj) = obj {
                            let _ = obj.fd.read_complete(h.msg_id);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn open(&self, o: abi::Open<'_>) {
        let fd = match AnonFd::adopt(o.fd) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(msg = o.msg_id, fd = o.fd, "OPEN with an unusable fd: {e}");
                let _ = self
                    .dev
                    .command(abi::copen_error(o.msg_id, libc::EBADF).as_bytes());
                return;
            }
        };
        let key = String::from_utf8_lossy(o.cookie_key).into_owned();
        let volume = String::from_utf8_lossy(o.volume_key).into_owned();
        let stats = self.key_stats(&key);
        stats.opens.fetch_add(1, Ordering::Relaxed);
        let r = match self.resolve(o.volume_key, &key) {
            Ok(r) => r,
            Err(errno) => {
                tracing::warn!(volume, key, "OPEN of an unknown cookie: answering -{errno}");
                if let Err(e) = self
                    .dev
                    .command(abi::copen_error(o.msg_id, errno).as_bytes())
                {
                    tracing::error!("copen {}: {e}", o.msg_id);
                }
                return; // the anonymous fd is closed after the reply
            }
        };
        let (reply, valid) = match &r.copen_override {
            // Test hook: a deliberately wrong `copen` (the object is only kept if the
            // override is a size the kernel accepts).
            Some(raw) => (
                format!("copen {},{raw}", o.msg_id),
                raw.parse::<u64>().is_ok(),
            ),
            None => (abi::copen(o.msg_id, r.size), true),
        };
        let obj = Arc::new(Object {
            id: o.object_id,
            key: key.clone(),
            fd,
            size: r.size,
            target: r.target,
            stats,
            delay: r.delay,
        });
        // Registered before the reply: READs for it may follow right after `copen`.
        if valid {
            let old = self
                .objects
                .lock()
                .expect("objects lock")
                .insert(o.object_id, obj.clone());
            if let Some(old) = old {
                tracing::warn!(object = o.object_id, key = %old.key, "object id reused without CLOSE");
            }
        }
        match self.dev.command(reply.as_bytes()) {
            Ok(()) => tracing::info!(object = obj.id, key, size = obj.size, "OPEN: {reply}"),
            Err(e) => {
                tracing::error!(key, "the kernel refused `{reply}`: {e}");
                self.objects
                    .lock()
                    .expect("objects lock")
                    .remove(&o.object_id);
            }
        }
    }

    /// Finds what a cookie names: an image's fsid (its bootstrap) or a blob digest.
    fn resolve(&self, volume_key: &[u8], key: &str) -> Result<Resolved, i32> {
        if abi::erofs_volume_id(volume_key) != Some(DOMAIN.as_bytes()) {
            return Err(libc::ENOENT);
        }
        let images = self.images.lock().expect("images lock");
        if let Some(e) = images.get(key) {
            let s = &e.served;
            let file = File::open(&s.image.bootstrap).map_err(|err| {
                tracing::error!("opening {}: {err}", s.image.bootstrap.display());
                libc::EIO
            })?;
            let len = s.image.manifest.bootstrap.size;
            let over = s.spec.test.copen_size.clone();
            return Ok(Resolved {
                target: Target::Bootstrap { file, len },
                size: over.as_deref().and_then(|o| o.parse().ok()).unwrap_or(len),
                delay: None,
                copen_override: over,
            });
        }
        let (served, index) = find_blob(&images, key).ok_or(libc::ENOENT)?;
        Ok(Resolved {
            size: served.image.manifest.blobs[index].uncompressed_size,
            delay: served.spec.test.read_delay_ms.map(Duration::from_millis),
            target: Target::Blob {
                provider: Mutex::new((served, index)),
            },
            copen_override: None,
        })
    }

    /// The fetcher for a blob object, moving to another image with the same blob when the
    /// one that provided it was removed.
    fn blob_fetcher(&self, obj: &Object) -> Option<Arc<BlobFetcher>> {
        let Target::Blob { provider } = &obj.target else {
            return None;
        };
        let mut p = provider.lock().expect("provider lock");
        let images = self.images.lock().expect("images lock");
        if !images.contains_key(&p.0.fsid) {
            if let Some(next) = find_blob(&images, &obj.key) {
                *p = next;
            }
        }
        Some(p.0.image.fetchers[p.1].clone())
    }

    // ---- READ -----------------------------------------------------------------------------

    fn serve_read(&self, obj: &Object, r: abi::Read, buf: &mut AlignedBuf) {
        self.reads_total.fetch_add(1, Ordering::Relaxed);
        obj.stats.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = obj.delay {
            std::thread::sleep(d);
        }
        match self.fill(obj, r, buf) {
            Ok(bytes) => {
                obj.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                obj.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    key = %obj.key,
                    off = r.off,
                    len = r.len,
                    "READ failed, the reader gets EIO: {e:#}"
                );
            }
        }
        // Always completed: with the range filled the reader proceeds, without it the
        // kernel finds a hole and returns EIO.
        if let Err(e) = obj.fd.read_complete(r.msg_id) {
            tracing::error!(key = %obj.key, msg = r.msg_id, "READ_COMPLETE: {e}");
        }
    }

    /// Writes the page-rounded range of a READ into the cache file; returns bytes written.
    fn fill(&self, obj: &Object, r: abi::Read, buf: &mut AlignedBuf) -> Result<u64> {
        let padded = obj.size.next_multiple_of(PAGE_SIZE);
        let start = r.off - r.off % PAGE_SIZE;
        let end = (r.off + r.len).next_multiple_of(PAGE_SIZE).min(padded);
        if start >= end {
            bail!(
                "range {}+{} is outside the object ({} bytes)",
                r.off,
                r.len,
                obj.size
            );
        }
        // The bytes that exist (the rest of the last page is zeros).
        let (data_len, fetcher) = match &obj.target {
            Target::Bootstrap { len, .. } => (*len, None),
            Target::Blob { .. } => {
                let f = self
                    .blob_fetcher(obj)
                    .context("no image provides this blob any more")?;
                (f.cached().blob.uncompressed_size, Some(f))
            }
        };
        if let Some(f) = &fetcher {
            let want = end.min(data_len).saturating_sub(start);
            // Fetch everything first: a failure leaves the whole range a hole (EIO), never
            // a partly written one.
            let t = Instant::now();
            let r = f.ensure(start, want);
            self.fetch_us
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            r?;
        }
        let t = Instant::now();
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.capacity());
            let piece = buf.slice_mut(n);
            let avail = data_len.saturating_sub(pos).min(n as u64) as usize;
            match (&obj.target, &fetcher) {
                (Target::Bootstrap { file, .. }, _) => file
                    .read_exact_at(&mut piece[..avail], pos)
                    .context("reading the local bootstrap")?,
                (_, Some(f)) => f
                    .cached()
                    .read_at(&mut piece[..avail], pos)
                    .context("reading the blob cache")?,
                _ => unreachable!("blob without fetcher"),
            }
            piece[avail..].fill(0);
            obj.fd
                .pwrite_all(buf.slice(n), pos)
                .with_context(|| format!("writing {n} bytes at {pos} to the cache file"))?;
            pos += n as u64;
        }
        self.write_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(end - start)
    }

    // ---- images ---------------------------------------------------------------------------

    fn add(&self, spec: ImageSpec) -> Result<serde_json::Value> {
        let source = ImageSource::parse(&spec.source)?;
        let image = open_image(&source, &self.cache, &spec.registry.source_options())?;
        for b in &image.manifest.blobs {
            if b.hex().len() != 64 || !abi::valid_key(b.hex()) {
                bail!("blob digest {} cannot be a cachefiles cookie key", b.digest);
            }
        }
        // The kernel opens blobs by the bootstrap's device-table tags, and in the shared
        // domain any tag names whichever image's blob has that digest: an image may only
        // name the blobs its (verified) manifest lists, in order.
        let boot = std::fs::read(&image.bootstrap)
            .with_context(|| format!("reading {}", image.bootstrap.display()))?;
        let parsed = lode_format::reader::Image::open(Box::new(boot))?;
        let tags: Vec<&str> = parsed.devices().iter().map(|d| d.tag.as_str()).collect();
        let hexes: Vec<&str> = image.manifest.blobs.iter().map(|b| b.hex()).collect();
        if tags != hexes {
            bail!(
                "{}: the bootstrap's device table {tags:?} does not name the manifest's blobs {hexes:?}",
                spec.source
            );
        }
        let mut images = self.images.lock().expect("images lock");
        let fsid = (1..100)
            .map(|n| fsid_for(image.manifest.bootstrap.hex(), n))
            .find(|f| !images.contains_key(f) && !sys::exists(&sysfs_dir(f)))
            .context("too many mounts of this image")?;
        if !abi::valid_key(&fsid) {
            bail!("fsid {fsid} is not a valid cachefiles key");
        }
        tracing::info!(
            fsid,
            source = spec.source,
            blobs = image.manifest.blobs.len(),
            "image added"
        );
        // The image's prefetch list into lode's blob cache from the start: the kernel's
        // READs of those ranges are then served without a remote fetch.
        let _ = image.start_prefetch(false, Arc::new(PrefetchLimits::default()));
        images.insert(
            fsid.clone(),
            Entry {
                served: Arc::new(Served {
                    fsid: fsid.clone(),
                    spec,
                    image,
                }),
                mountpoint: None,
                seen: false,
                added: Instant::now(),
                warned: false,
            },
        );
        self.persist(&images);
        Ok(json!({"ok": true, "fsid": fsid, "domain": DOMAIN}))
    }

    /// Records the images so a restarted worker can serve them.
    fn persist(&self, images: &BTreeMap<String, Entry>) {
        let list: Vec<Persisted> = images
            .values()
            .map(|e| Persisted {
                fsid: e.served.fsid.clone(),
                spec: e.served.spec.clone(),
                mountpoint: e.mountpoint.clone(),
                bootstrap_digest: e.served.image.manifest.bootstrap.digest.clone(),
            })
            .collect();
        let path = self.run.state();
        let tmp = path.with_extension("tmp");
        let r = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::from)
            .and_then(|bytes| {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = r {
            tracing::error!("recording images in {}: {e}", path.display());
        }
    }

    /// After a crash: serve the images the previous worker recorded.
    fn reload(&self) {
        let list: Vec<Persisted> = match std::fs::read(self.run.state()) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!("{}: {e}", self.run.state().display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let mut images = self.images.lock().expect("images lock");
        for p in list {
            let opened = ImageSource::parse(&p.spec.source)
                .and_then(|src| open_image(&src, &self.cache, &p.spec.registry.source_options()));
            match opened {
                Ok(image) if image.manifest.bootstrap.digest == p.bootstrap_digest => {
                    tracing::info!(fsid = p.fsid, "image reopened");
                    images.insert(
                        p.fsid.clone(),
                        Entry {
                            served: Arc::new(Served {
                                fsid: p.fsid.clone(),
                                spec: p.spec,
                                image,
                            }),
                            seen: sys::exists(&sysfs_dir(&p.fsid)),
                            mountpoint: p.mountpoint,
                            added: Instant::now(),
                            warned: false,
                        },
                    );
                }
                // Its OPENs will be refused and its reads fail (EIO): better than serving
                // another image's bytes under this mount.
                Ok(image) => tracing::error!(
                    fsid = p.fsid,
                    "{} now has bootstrap {}, the mount has {}; not serving it",
                    p.spec.source,
                    image.manifest.bootstrap.digest,
                    p.bootstrap_digest
                ),
                Err(e) => tracing::error!(fsid = p.fsid, "reopening {}: {e:#}", p.spec.source),
            }
        }
    }

    /// Forgets images whose mount is gone. Returns whether none is left.
    fn scan(&self) -> bool {
        let mut images = self.images.lock().expect("images lock");
        let before = images.len();
        images.retain(|fsid, e| {
            if sys::exists(&sysfs_dir(fsid)) {
                e.seen = true;
                return true;
            }
            if e.seen {
                tracing::info!(fsid, "the mount is gone; image released");
                return false;
            }
            if e.mountpoint.is_none() && e.added.elapsed() > PENDING_TIMEOUT {
                tracing::warn!(fsid, "registered but never mounted; released");
                return false;
            }
            if e.mountpoint.is_some() && !e.warned {
                e.warned = true;
                tracing::warn!(fsid, "mounted but {} is missing", sysfs_dir(fsid).display());
            }
            true
        });
        if images.len() != before {
            self.persist(&images);
        }
        images.is_empty()
    }

    /// Exits only if no client is between "found the daemon" and "registered an image".
    fn try_exit(&self) -> bool {
        let Ok(lock) = File::create(self.run.lock()) else {
            return false;
        };
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return false;
        }
        if !self.images.lock().expect("images lock").is_empty() {
            return false;
        }
        // No new client can find us now; the lock is released when the process exits.
        let _ = std::fs::remove_file(self.run.socket());
        let _ = std::fs::remove_file(self.run.state());
        std::mem::forget(lock);
        true
    }

    // ---- control --------------------------------------------------------------------------

    fn control_loop(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let w = self.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || w.serve_connection(stream));
                }
                Err(e) => {
                    tracing::error!("control socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn serve_connection(&self, stream: UnixStream) {
        let mut out = match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(req) => self
                    .request(req)
                    .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")})),
                Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            };
            let mut bytes = serde_json::to_vec(&reply).expect("json");
            bytes.push(b'\n');
            if out.write_all(&bytes).is_err() {
                return;
            }
        }
    }

    fn request(&self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Ping => Ok(json!({
                "ok": true,
                "cache_dir": self.cache_dir,
                "supervisor_pid": rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()),
                "worker_pid": std::process::id(),
                "domain": DOMAIN,
            })),
            Request::Add { spec } => self.add(spec),
            Request::Mounted { fsid, mountpoint } => {
                let mut images = self.images.lock().expect("images lock");
                let e = images.get_mut(&fsid).context("no such image")?;
                e.mountpoint = Some(mountpoint);
                e.seen |= sys::exists(&sysfs_dir(&fsid));
                self.persist(&images);
                Ok(json!({"ok": true}))
            }
            Request::Remove { fsid } => {
                let mut images = self.images.lock().expect("images lock");
                if sys::exists(&sysfs_dir(&fsid)) {
                    bail!("{fsid} is mounted");
                }
                images.remove(&fsid);
                self.persist(&images);
                drop(images);
                self.check_soon();
                Ok(json!({"ok": true}))
            }
            Request::Unmounted { mountpoint } => {
                tracing::info!("{} unmounted", mountpoint.display());
                self.check_soon();
                Ok(json!({"ok": true}))
            }
            Request::Status => Ok(self.status()),
        }
    }

    fn status(&self) -> serde_json::Value {
        let images: Vec<serde_json::Value> = self
            .images
            .lock()
            .expect("images lock")
            .values()
            .map(|e| {
                let m = &e.served.image.manifest;
                json!({
                    "fsid": e.served.fsid,
                    "source": e.served.spec.source,
                    "mountpoint": e.mountpoint,
                    "mounted": e.seen,
                    "bootstrap": m.bootstrap.digest,
                    "blobs": m.blobs.iter().map(|b| b.hex()).collect::<Vec<_>>(),
                    "fetch": e.served.image.stats.snapshot(),
                })
            })
            .collect();
        let mut objects: Vec<serde_json::Value> = self
            .objects
            .lock()
            .expect("objects lock")
            .values()
            .map(|o| json!({"id": o.id, "key": o.key, "size": o.size}))
            .collect();
        objects.sort_by_key(|o| o["id"].as_u64());
        let keys: serde_json::Map<String, serde_json::Value> = self
            .keys
            .lock()
            .expect("keys lock")
            .iter()
            .map(|(k, s)| {
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                (
                    k.clone(),
                    json!({"opens": l(&s.opens), "reads": l(&s.reads), "bytes": l(&s.bytes), "errors": l(&s.errors)}),
                )
            })
            .collect();
        let started = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        json!({
            "ok": true,
            "worker_pid": std::process::id(),
            "supervisor_pid": rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()),
            "started": started,
            "restored": self.restored,
            "cache_dir": self.cache_dir,
            "domain": DOMAIN,
            "images": images,
            "objects": objects,
            "keys": keys,
            "reads": self.reads_total.load(Ordering::Relaxed),
            "read_errors": self.read_errors.load(Ordering::Relaxed),
            "reads_in_flight": self.inflight.load(Ordering::Relaxed),
            "bad_messages": self.bad_messages.load(Ordering::Relaxed),
            "fetch_seconds": self.fetch_us.load(Ordering::Relaxed) as f64 / 1e6,
            "write_seconds": self.write_us.load(Ordering::Relaxed) as f64 / 1e6,
            "read_bytes": self.keys.lock().expect("keys lock").values().map(|k| k.bytes.load(Ordering::Relaxed)).sum::<u64>(),
        })
    }
}

struct Resolved {
    target: Target,
    size: u64,
    delay: Option<Duration>,
    copen_override: Option<String>,
}

/// The first image (by fsid) that has blob `hex`.
fn find_blob(images: &BTreeMap<String, Entry>, hex: &str) -> Option<(Arc<Served>, usize)> {
    images.values().find_map(|e| {
        e.served
            .image
            .manifest
            .blobs
            .iter()
            .position(|b| b.hex() == hex)
            .map(|i| (e.served.clone(), i))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsids_fit_the_sysfs_name() {
        let hex = "0123456789abcdef".repeat(4);
        // base64url of 01 23 45 67 89 ab cd ef ...
        assert_eq!(fsid_for(&hex, 1), "ASNFZ4mrze8BI0VniavN7wEjRWeJ");
        assert_eq!(fsid_for(&hex, 2), "ASNFZ4mrze8BI0VniavN7wEjRWeJ-2");
        assert_eq!(fsid_for(&"ff".repeat(32), 1), "_".repeat(28));
        // The 21st byte (bits 160..168) still counts.
        let mut other = hex.clone();
        other.replace_range(40..42, "00");
        assert_ne!(fsid_for(&hex, 1), fsid_for(&other, 1));
        let mut other = hex.clone();
        other.replace_range(42..44, "00");
        assert_eq!(fsid_for(&hex, 1), fsid_for(&other, 1));
        for n in 1..100 {
            let f = fsid_for(&hex, n);
            assert!(abi::valid_key(&f));
            // s_sysfs_name holds 36 bytes + NUL.
            assert!(format!("{DOMAIN},{f}").len() <= 36, "{f}");
        }
    }
}
