//! The local blob cache: per blob, a sparse file in the uncompressed layout the kernel reads,
//! plus a state file (the blob's chunk table and a bitmap of chunks held).
//!
//! Crash safety rules:
//! - A chunk's bit is set in the state file only after its data is durable (fdatasync of the
//!   data file happens before the bitmap write), so after kill -9 or power loss the cache never
//!   claims a chunk it does not hold; it may forget some it does (they are fetched again).
//! - Files are created as unnamed `O_TMPFILE`s, sized, tagged and synced, and only then linked
//!   under their real names: a half-made file never has a real name.
//! - The data file carries a coherency xattr (format version, blob digest, size); a file whose
//!   tag or state does not match is discarded and recreated, never trusted.
//! - A blob in use holds a shared `flock` on its state file; GC takes it exclusively, so it
//!   never removes a blob a mount (in any process) is using.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lode_format::blob::{ChunkTable, BLOB_BLOCK_SIZE, BLOB_TRAILER_SIZE};
use lode_format::manifest::DataBlob;
use rustix::fs::{FlockOperation, Mode, OFlags, XattrFlags};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/lode/cache";
const COHERENCY_XATTR: &str = "user.lode.cache";
const STATE_MAGIC: [u8; 8] = *b"LODESTAT";
const STATE_VERSION: u32 = 1;
const STATE_HEADER_SIZE: u64 = 128;
/// How long a filled chunk may wait before it is made durable and recorded.
const COMMIT_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct StateHeader {
    magic: [u8; 8],
    version: U32,
    reserved: U32,
    chunk_count: U64,
    /// Bytes of chunk table + trailer stored after the header.
    table_len: U64,
    uncompressed_size: U64,
    digest_hex: [u8; 64],
    pad: [u8; 24],
}

const _: () = assert!(size_of::<StateHeader>() == STATE_HEADER_SIZE as usize);

fn coherency_tag(blob: &DataBlob) -> String {
    format!(
        "lode-cache v{STATE_VERSION} {} {}",
        blob.digest, blob.uncompressed_size
    )
}

/// Counters of the cache as a whole.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub blobs_opened: AtomicU64,
    pub blobs_invalidated: AtomicU64,
    pub chunks_committed: AtomicU64,
    /// Blobs removed to keep the cache under its size limit.
    pub blobs_evicted: AtomicU64,
    pub commits: AtomicU64,
}

/// One cache directory.
pub struct BlobCache {
    dir: PathBuf,
    blobs_dir: PathBuf,
    open: Mutex<HashMap<String, Weak<CachedBlob>>>,
    committer: Arc<Committer>,
    pub stats: Arc<CacheStats>,
}

/// Chunks filled but not yet durable, committed in batches by a background thread.
struct Committer {
    /// The cache's `blobs` directory, and its size limit in bytes on disk (0: none).
    blobs_dir: PathBuf,
    max_bytes: AtomicU64,
    pending: Mutex<Vec<(Arc<CachedBlob>, usize)>>,
    /// Held for a whole commit, so `flush` also waits for one already under way.
    committing: Mutex<()>,
    wake: Condvar,
    stop: std::sync::atomic::AtomicBool,
}

impl BlobCache {
    /// Opens (creating if needed) the cache at `dir`.
    pub fn open(dir: &Path) -> Result<Arc<BlobCache>> {
        let blobs_dir = dir.join("blobs");
        fs::create_dir_all(&blobs_dir)
            .with_context(|| format!("creating cache directory {}", blobs_dir.display()))?;
        let max_bytes = match std::env::var("LODE_CACHE_MAX_SIZE") {
            Ok(v) => parse_size(&v).with_context(|| format!("LODE_CACHE_MAX_SIZE={v:?}"))?,
            Err(_) => 0,
        };
        let committer = Arc::new(Committer {
            blobs_dir: blobs_dir.clone(),
            max_bytes: AtomicU64::new(max_bytes),
            pending: Mutex::new(Vec::new()),
            committing: Mutex::new(()),
            wake: Condvar::new(),
            stop: Default::default(),
        });
        let stats = Arc::new(CacheStats::default());
        let cache = Arc::new(BlobCache {
            dir: dir.to_path_buf(),
            blobs_dir,
            open: Mutex::new(HashMap::new()),
            committer: committer.clone(),
            stats: stats.clone(),
        });
        std::thread::Builder::new()
            .name("lode-cache-commit".into())
            .spawn(move || commit_loop(committer, stats))
            .context("starting the cache commit thread")?;
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the cache at most `bytes` on disk (0: no limit; default from the environment
    /// variable `LODE_CACHE_MAX_SIZE`): every few seconds, while it is larger, blobs no
    /// process uses are evicted, least recently used first. Blobs in use are never evicted,
    /// so a cache can stay above its limit while its mounts need the data.
    pub fn set_max_size(&self, bytes: u64) {
        self.committer.max_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Path of a blob's data file (its uncompressed layout).
    pub fn data_path(&self, blob: &DataBlob) -> PathBuf {
        self.blobs_dir.join(blob.hex())
    }

    /// Path of a blob's state file (chunk table and bitmap); a shared `flock` on it keeps GC
    /// away from the blob.
    pub fn state_path(&self, blob: &DataBlob) -> PathBuf {
        self.blobs_dir.join(format!("{}.state", blob.hex()))
    }

    /// The cached blob, if this cache already holds a valid state for it (no fetch needed
    /// for the chunk table): what a restart uses to serve offline.
    pub fn open_existing(self: &Arc<Self>, blob: &DataBlob) -> Result<Option<Arc<CachedBlob>>> {
        let mut open = self.open.lock().expect("cache lock");
        if let Some(b) = open.get(blob.hex()).and_then(Weak::upgrade) {
            return Ok(Some(b));
        }
        match self.load(blob)? {
            Some(b) => {
                let b = Arc::new(b);
                open.insert(blob.hex().to_string(), Arc::downgrade(&b));
                Ok(Some(b))
            }
            None => Ok(None),
        }
    }

    /// Opens the cache entry of `blob`, creating it from `table_bytes` (the blob's chunk
    /// table followed by its trailer, as fetched from the end of the remote form) if there is
    /// no valid one.
    pub fn open_blob(
        self: &Arc<Self>,
        blob: &DataBlob,
        table_bytes: &[u8],
    ) -> Result<Arc<CachedBlob>> {
        if let Some(b) = self.open_existing(blob)? {
            return Ok(b);
        }
        let mut open = self.open.lock().expect("cache lock");
        if let Some(b) = open.get(blob.hex()).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let b = Arc::new(self.create(blob, table_bytes)?);
        open.insert(blob.hex().to_string(), Arc::downgrade(&b));
        Ok(b)
    }

    /// Loads a valid existing entry; discards an invalid one.
    fn load(self: &Arc<Self>, blob: &DataBlob) -> Result<Option<CachedBlob>> {
        let data_path = self.data_path(blob);
        let state_path = self.state_path(blob);
        let (data, state) = match (
            File::options().read(true).write(true).open(&data_path),
            File::options().read(true).write(true).open(&state_path),
        ) {
            (Ok(d), Ok(s)) => (d, s),
            (Err(_), Err(_)) => return Ok(None),
            _ => {
                self.discard(blob, "data or state file missing");
                return Ok(None);
            }
        };
        match self.validate(blob, &data, &state) {
            Ok((table, bitmap)) => {
                flock_shared(&state)?;
                self.stats.blobs_opened.fetch_add(1, Ordering::Relaxed);
                Ok(Some(CachedBlob::new(
                    blob.clone(),
                    table,
                    data,
                    data_path,
                    state,
                    &bitmap,
                    Arc::downgrade(&self.committer),
                )))
            }
            Err(why) => {
                self.discard(blob, &format!("{why:#}"));
                Ok(None)
            }
        }
    }

    fn validate(
        &self,
        blob: &DataBlob,
        data: &File,
        state: &File,
    ) -> Result<(ChunkTable, Vec<u8>)> {
        let mut tag = vec![0u8; 256];
        let n = rustix::fs::fgetxattr(data, COHERENCY_XATTR, &mut tag[..])
            .context("no coherency tag")?;
        if tag[..n] != *coherency_tag(blob).as_bytes() {
            bail!(
                "coherency tag {:?} does not match",
                String::from_utf8_lossy(&tag[..n])
            );
        }
        if data.metadata()?.len() != blob.uncompressed_size {
            bail!("data file has the wrong size");
        }
        let mut hb = [0u8; STATE_HEADER_SIZE as usize];
        state
            .read_exact_at(&mut hb, 0)
            .context("short state file")?;
        let h = StateHeader::read_from_bytes(&hb).expect("exact size");
        if h.magic != STATE_MAGIC
            || h.version.get() != STATE_VERSION
            || h.digest_hex != blob.hex().as_bytes()[..]
            || h.uncompressed_size.get() != blob.uncompressed_size
            || h.chunk_count.get() != blob.chunk_count
        {
            bail!("state header does not match the blob");
        }
        let table_len = h.table_len.get();
        if table_len > 1 << 32 || table_len < BLOB_TRAILER_SIZE as u64 {
            bail!("state table length {table_len} is implausible");
        }
        let mut tb = vec![0u8; table_len as usize];
        state.read_exact_at(&mut tb, STATE_HEADER_SIZE)?;
        let table = parse_table_bytes(blob, &tb)?;
        let mut bitmap = vec![0u8; bitmap_len(table.entries.len())];
        state
            .read_exact_at(&mut bitmap, STATE_HEADER_SIZE + table_len)
            .context("short state bitmap")?;
        Ok((table, bitmap))
    }

    fn discard(&self, blob: &DataBlob, why: &str) {
        tracing::warn!(blob = %blob.digest, "discarding cache entry: {why}");
        self.stats.blobs_invalidated.fetch_add(1, Ordering::Relaxed);
        let _ = fs::remove_file(self.data_path(blob));
        let _ = fs::remove_file(self.state_path(blob));
    }

    fn create(self: &Arc<Self>, blob: &DataBlob, table_bytes: &[u8]) -> Result<CachedBlob> {
        let table = parse_table_bytes(blob, table_bytes)?;
        let dir = File::open(&self.blobs_dir)
            .with_context(|| format!("opening {}", self.blobs_dir.display()))?;
        // Data file: sized, tagged, then linked.
        let data = tmpfile(&dir, &self.blobs_dir)?;
        data.set_len(blob.uncompressed_size)
            .context("sizing cache data file")?;
        rustix::fs::fsetxattr(
            &data,
            COHERENCY_XATTR,
            coherency_tag(blob).as_bytes(),
            XattrFlags::empty(),
        )
        .with_context(|| {
            format!(
                "tagging a cache file in {} (the cache filesystem must support user xattrs)",
                self.blobs_dir.display()
            )
        })?;
        // State file: header, table, empty bitmap.
        let state = tmpfile(&dir, &self.blobs_dir)?;
        let mut digest_hex = [0u8; 64];
        let hex = blob.hex().as_bytes();
        if hex.len() != 64 {
            bail!("blob digest {} is not a sha256 digest", blob.digest);
        }
        digest_hex.copy_from_slice(hex);
        let header = StateHeader {
            magic: STATE_MAGIC,
            version: STATE_VERSION.into(),
            reserved: 0.into(),
            chunk_count: blob.chunk_count.into(),
            table_len: (table_bytes.len() as u64).into(),
            uncompressed_size: blob.uncompressed_size.into(),
            digest_hex,
            pad: [0; 24],
        };
        let mut sb = header.as_bytes().to_vec();
        sb.extend_from_slice(table_bytes);
        sb.resize(sb.len() + bitmap_len(table.entries.len()), 0);
        state.write_all_at(&sb, 0).context("writing cache state")?;
        state.sync_all().context("syncing cache state")?;
        data.sync_all().context("syncing cache data file")?;
        // Link the state first: a data file with a name always has its state beside it.
        let data_path = self.data_path(blob);
        let state_path = self.state_path(blob);
        let _ = fs::remove_file(&data_path);
        let _ = fs::remove_file(&state_path);
        link_tmpfile(&state, &state_path)?;
        link_tmpfile(&data, &data_path)?;
        dir.sync_all().context("syncing cache directory")?;
        flock_shared(&state)?;
        self.stats.blobs_opened.fetch_add(1, Ordering::Relaxed);
        Ok(CachedBlob::new(
            blob.clone(),
            table,
            data,
            data_path,
            state,
            &vec![0u8; bitmap_len(blob.chunk_count as usize)],
            Arc::downgrade(&self.committer),
        ))
    }

    /// Makes every filled chunk durable and recorded now (shutdown, tests).
    pub fn flush(&self) {
        commit_pending(&self.committer, &self.stats);
    }

    /// Entries of the cache directory, for `lode cache ls`.
    pub fn list(&self) -> Result<Vec<CacheEntry>> {
        list_dir(&self.blobs_dir)
    }
}

impl Drop for BlobCache {
    fn drop(&mut self) {
        commit_pending(&self.committer, &self.stats);
        self.committer.stop.store(true, Ordering::Relaxed);
        self.committer.wake.notify_all();
    }
}

fn parse_table_bytes(blob: &DataBlob, bytes: &[u8]) -> Result<ChunkTable> {
    Ok(crate::chunks::parse_table(blob, bytes)?)
}

fn bitmap_len(chunks: usize) -> usize {
    chunks.div_ceil(8)
}

fn tmpfile(dir: &File, path: &Path) -> Result<File> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .with_context(|| {
        format!(
            "O_TMPFILE in {} (the cache needs a filesystem that supports it)",
            path.display()
        )
    })?;
    Ok(File::from(fd))
}

fn link_tmpfile(file: &File, dest: &Path) -> Result<()> {
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        rustix::fs::CWD,
        dest,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .with_context(|| format!("linking cache file {}", dest.display()))
}

fn flock_shared(file: &File) -> Result<()> {
    rustix::fs::flock(file.as_fd(), FlockOperation::LockShared).context("locking cache entry")
}

/// One blob's cache entry, shared by every user of the blob.
pub struct CachedBlob {
    pub blob: DataBlob,
    pub table: ChunkTable,
    data: File,
    /// A caller-given fd of the same data file that replaces `data` (see
    /// [`CachedBlob::use_data_file`]).
    data_override: OnceLock<File>,
    data_path: PathBuf,
    state: File,
    /// Bit per chunk: filled (readable from the data file).
    present: Vec<AtomicU64>,
    /// Bits already recorded in the state file.
    recorded: Mutex<Vec<u8>>,
    committer: Weak<Committer>,
    pub chunks_present: AtomicU64,
}

impl CachedBlob {
    fn new(
        blob: DataBlob,
        table: ChunkTable,
        data: File,
        data_path: PathBuf,
        state: File,
        bitmap: &[u8],
        committer: Weak<Committer>,
    ) -> Self {
        let n = table.entries.len();
        let present: Vec<AtomicU64> = (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let mut count = 0;
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                present[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
                count += 1;
            }
        }
        CachedBlob {
            blob,
            table,
            data,
            data_override: OnceLock::new(),
            data_path,
            state,
            present,
            recorded: Mutex::new(bitmap.to_vec()),
            committer,
            chunks_present: AtomicU64::new(count),
        }
    }

    /// The data file (uncompressed layout): what the kernel is given as `device=`.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// The fd every fill, read and sync goes through.
    pub fn data_file(&self) -> &File {
        self.data_override.get().unwrap_or(&self.data)
    }

    /// Makes fills, reads and syncs go through `file` instead of the fd the cache opened:
    /// for a frontend under which fds opened now would raise events (fanotify pre-content
    /// marks) and that hands in a non-notifying fd of the same file. `file` must be the same
    /// inode and opened read-write; may be called once.
    pub fn use_data_file(&self, file: File) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (file.metadata()?, self.data.metadata()?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            bail!(
                "{}: the given fd is not this cache file (another inode)",
                self.data_path.display()
            );
        }
        self.data_override
            .set(file)
            .map_err(|_| anyhow::anyhow!("{}: data fd already replaced", self.data_path.display()))
    }

    pub fn is_present(&self, chunk: usize) -> bool {
        self.present[chunk / 64].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    pub fn is_complete(&self) -> bool {
        self.chunks_present.load(Ordering::Relaxed) == self.table.entries.len() as u64
    }

    /// Writes a verified chunk's bytes into the data file and marks it readable; it becomes
    /// durable and recorded in the state file shortly after (batched).
    pub fn fill(self: &Arc<Self>, chunk: usize, data: &[u8]) -> Result<()> {
        let e = &self.table.entries[chunk];
        debug_assert_eq!(data.len(), e.uncompressed_len.get() as usize);
        self.data_file()
            .write_all_at(data, e.blkaddr.get() as u64 * BLOB_BLOCK_SIZE)
            .with_context(|| format!("writing cache file {}", self.data_path.display()))?;
        let bit = 1u64 << (chunk % 64);
        if self.present[chunk / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.chunks_present.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = self.committer.upgrade() {
                c.pending
                    .lock()
                    .expect("commit lock")
                    .push((self.clone(), chunk));
                c.wake.notify_one();
            }
        }
        Ok(())
    }

    /// Reads the uncompressed layout; the caller must have made the range present.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.data_file().read_exact_at(buf, offset)
    }

    /// Records `chunks` (already durable) in the state file.
    fn record(&self, chunks: &[usize]) -> std::io::Result<()> {
        let mut rec = self.recorded.lock().expect("record lock");
        let mut lo = usize::MAX;
        let mut hi = 0;
        for &c in chunks {
            rec[c / 8] |= 1 << (c % 8);
            lo = lo.min(c / 8);
            hi = hi.max(c / 8 + 1);
        }
        if lo < hi {
            let off = STATE_HEADER_SIZE + self.table_bytes_len();
            self.state.write_all_at(&rec[lo..hi], off + lo as u64)?;
        }
        Ok(())
    }

    fn table_bytes_len(&self) -> u64 {
        self.table.entries.len() as u64 * lode_format::blob::CHUNK_ENTRY_SIZE as u64
            + BLOB_TRAILER_SIZE as u64
    }
}

/// How often the size limit is checked.
const EVICT_INTERVAL: Duration = Duration::from_secs(2);

fn commit_loop(committer: Arc<Committer>, stats: Arc<CacheStats>) {
    let mut last_evict = std::time::Instant::now();
    loop {
        let max = committer.max_bytes.load(Ordering::Relaxed);
        if max > 0 && last_evict.elapsed() >= EVICT_INTERVAL {
            last_evict = std::time::Instant::now();
            match evict_over(&committer.blobs_dir, max) {
                Ok(removed) if !removed.is_empty() => {
                    stats
                        .blobs_evicted
                        .fetch_add(removed.len() as u64, Ordering::Relaxed);
                    tracing::info!(
                        removed = removed.len(),
                        "cache over its size limit: evicted unused blobs"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cache eviction: {e:#}"),
            }
        }
        {
            let pending = committer.pending.lock().expect("commit lock");
            let (_guard, _) = committer
                .wake
                .wait_timeout(pending, COMMIT_INTERVAL)
                .expect("commit lock");
        }
        // Let a burst of fills accumulate into one fdatasync.
        std::thread::sleep(COMMIT_INTERVAL / 5);
        commit_pending(&committer, &stats);
        // The cache is gone (it committed what was left when dropped).
        if committer.stop.load(Ordering::Relaxed) || Arc::strong_count(&committer) == 1 {
            return;
        }
    }
}

fn commit_pending(committer: &Committer, stats: &CacheStats) {
    let _committing = committer.committing.lock().expect("commit lock");
    let batch = std::mem::take(&mut *committer.pending.lock().expect("commit lock"));
    if batch.is_empty() {
        return;
    }
    let mut by_blob: HashMap<*const CachedBlob, (Arc<CachedBlob>, Vec<usize>)> = HashMap::new();
    for (b, c) in batch {
        by_blob
            .entry(Arc::as_ptr(&b))
            .or_insert_with(|| (b.clone(), Vec::new()))
            .1
            .push(c);
    }
    for (_, (blob, chunks)) in by_blob {
        // Data first, then the record: a recorded chunk is always durable.
        let result = blob
            .data_file()
            .sync_data()
            .and_then(|_| blob.record(&chunks));
        match result {
            Ok(()) => {
                stats
                    .chunks_committed
                    .fetch_add(chunks.len() as u64, Ordering::Relaxed);
                stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(blob = %blob.blob.digest, "cache commit failed: {e}"),
        }
    }
}

/// A blob in the cache directory, as `lode cache ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheEntry {
    pub digest: String,
    /// Bytes of the uncompressed layout.
    pub size: u64,
    /// Bytes actually allocated on disk.
    pub disk_bytes: u64,
    pub chunks: u64,
    pub chunks_present: u64,
    /// Seconds since the epoch the entry was last opened or filled.
    pub last_used: i64,
    pub in_use: bool,
}

/// Entries of the cache at `cache_dir` (no cache there: none).
pub fn list(cache_dir: &Path) -> Result<Vec<CacheEntry>> {
    list_dir(&cache_dir.join("blobs"))
}

fn list_dir(blobs_dir: &Path) -> Result<Vec<CacheEntry>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let rd = match fs::read_dir(blobs_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", blobs_dir.display())),
    };
    for ent in rd {
        let ent = ent?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_suffix(".state") else {
            continue;
        };
        let state_path = ent.path();
        let data_path = blobs_dir.join(hex);
        let (Ok(state), Ok(dmeta)) = (File::open(&state_path), fs::metadata(&data_path)) else {
            continue;
        };
        let mut hb = [0u8; STATE_HEADER_SIZE as usize];
        if state.read_exact_at(&mut hb, 0).is_err() {
            continue;
        }
        let h = StateHeader::read_from_bytes(&hb).expect("exact size");
        let n = h.chunk_count.get() as usize;
        let mut bitmap = vec![0u8; bitmap_len(n)];
        let _ = state.read_exact_at(&mut bitmap, STATE_HEADER_SIZE + h.table_len.get());
        let present: u64 = bitmap.iter().map(|b| b.count_ones() as u64).sum();
        let in_use = rustix::fs::flock(&state, FlockOperation::NonBlockingLockExclusive).is_err();
        let smeta = state.metadata()?;
        out.push(CacheEntry {
            digest: format!("sha256:{hex}"),
            size: h.uncompressed_size.get(),
            disk_bytes: dmeta.blocks() * 512 + smeta.blocks() * 512,
            chunks: n as u64,
            chunks_present: present,
            last_used: smeta.mtime().max(dmeta.mtime()),
            in_use,
        });
    }
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(out)
}

/// Removes entries no process uses, least recently used first, until the cache holds at most
/// `max_bytes` on disk (0 removes every unused entry). Returns the entries removed.
pub fn gc(cache_dir: &Path, max_bytes: u64) -> Result<Vec<CacheEntry>> {
    evict_over(&cache_dir.join("blobs"), max_bytes)
}

fn evict_over(blobs_dir: &Path, max_bytes: u64) -> Result<Vec<CacheEntry>> {
    let blobs_dir = blobs_dir.to_path_buf();
    let mut entries = list_dir(&blobs_dir)?;
    let mut total: u64 = entries.iter().map(|e| e.disk_bytes).sum();
    entries.sort_by_key(|e| e.last_used);
    let mut removed = Vec::new();
    for e in entries {
        if total <= max_bytes && max_bytes != 0 {
            break;
        }
        if e.in_use {
            continue;
        }
        let hex = e.digest.trim_start_matches("sha256:");
        let state_path = blobs_dir.join(format!("{hex}.state"));
        // Hold the exclusive lock while removing, so no one opens it half-removed.
        let Ok(state) = File::open(&state_path) else {
            continue;
        };
        if rustix::fs::flock(&state, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        // Data first: a state without data is discarded on open, never trusted.
        let _ = fs::remove_file(blobs_dir.join(hex));
        let _ = fs::remove_file(&state_path);
        total = total.saturating_sub(e.disk_bytes);
        removed.push(e);
    }
    // Leftover temporary or orphaned files from crashes are unnamed (O_TMPFILE): nothing to do.
    Ok(removed)
}

/// Parses `1048576`, `512M`, `2G`, `64KiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .with_context(|| format!("{s:?} is not a size (e.g. 1073741824, 512M, 2G)"))
}
