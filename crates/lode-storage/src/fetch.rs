//! Fetch scheduling for one blob: turns "make uncompressed bytes a..b present" into as few
//! verified range requests as possible.
//!
//! - **Single flight**: a chunk being fetched is fetched once; concurrent misses wait for it.
//! - **Merging**: missing chunks whose payloads are adjacent in the remote blob (or separated
//!   by at most `merge_gap` bytes) go into one Range request, up to `max_request` bytes.
//! - **Readahead**: a miss also fetches up to `readahead` more uncompressed bytes after it.
//! - **Verification**: every chunk is decompressed and its blake3 checked before it is written
//!   to the cache; a bad chunk is fetched again, and after `retries` attempts the read fails
//!   with an error (the caller answers EIO) — a bad byte never reaches the cache.
//! - **Priorities**: background prefetch pauses while any foreground fetch is in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lode_format::blob::{ChunkEntry, BLOB_BLOCK_SIZE};
use lode_format::manifest::DataBlob;

use crate::backend::{Backend, BackendError};
use crate::cache::{BlobCache, CachedBlob};
use crate::chunks::decode_chunk;

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Largest gap (bytes of the remote blob) bridged to merge two misses into one request.
    pub merge_gap: u64,
    /// Largest single range request.
    pub max_request: u64,
    /// Bytes of the remote blob (compressed payloads) fetched after a miss, beyond what was
    /// asked: whole chunks that follow the missing ones.
    pub readahead: u64,
    /// Attempts per request after the first (transient errors and bad data).
    pub retries: u32,
    /// First retry delay; doubled each attempt.
    pub backoff: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            merge_gap: 64 << 10,
            max_request: 8 << 20,
            readahead: 0,
            retries: 3,
            backoff: Duration::from_millis(100),
        }
    }
}

/// Counters a user tunes by. All monotonic.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Range requests issued (each retry counts).
    pub requests: AtomicU64,
    /// Bytes received from backends.
    pub bytes_fetched: AtomicU64,
    /// Uncompressed bytes callers asked to be present.
    pub bytes_requested: AtomicU64,
    /// Chunks fetched and written to the cache.
    pub chunks_fetched: AtomicU64,
    /// `ensure` calls fully served from the cache / needing a fetch.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Waits on a fetch another caller had started (single flight).
    pub shared_waits: AtomicU64,
    /// Requests sent for `ensure` misses (a reader waited for each); the rest of
    /// `requests` were background prefetch (or retries).
    pub foreground_requests: AtomicU64,
    pub retries: AtomicU64,
    /// Chunks whose digest did not match (corrupt data from the backend).
    pub verify_failures: AtomicU64,
    pub errors: AtomicU64,
    /// Request latency histogram: counts per bucket of [`LATENCY_BUCKETS_MS`] (+ overflow).
    pub latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// Sum of request latencies, microseconds (a histogram's `_sum`).
    pub latency_us_sum: AtomicU64,
}

/// Upper bounds (ms) of the latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 250, 1000, 5000];

impl FetchStats {
    fn observe(&self, d: Duration) {
        let ms = d.as_millis() as u64;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_us_sum
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FetchStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FetchStatsSnapshot {
            requests: l(&self.requests),
            bytes_fetched: l(&self.bytes_fetched),
            bytes_requested: l(&self.bytes_requested),
            chunks_fetched: l(&self.chunks_fetched),
            hits: l(&self.hits),
            misses: l(&self.misses),
            shared_waits: l(&self.shared_waits),
            foreground_requests: l(&self.foreground_requests),
            retries: l(&self.retries),
            verify_failures: l(&self.verify_failures),
            errors: l(&self.errors),
            latency_ms_buckets: LATENCY_BUCKETS_MS.to_vec(),
            latency_counts: self.latency.iter().map(l).collect(),
            latency_us_sum: l(&self.latency_us_sum),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchStatsSnapshot {
    pub requests: u64,
    pub bytes_fetched: u64,
    pub bytes_requested: u64,
    pub chunks_fetched: u64,
    pub hits: u64,
    pub misses: u64,
    pub shared_waits: u64,
    pub foreground_requests: u64,
    pub retries: u64,
    pub verify_failures: u64,
    pub errors: u64,
    pub latency_ms_buckets: Vec<u64>,
    pub latency_counts: Vec<u64>,
    pub latency_us_sum: u64,
}

impl FetchStatsSnapshot {
    /// Chunks per request: how much merging helped.
    pub fn merge_ratio(&self) -> f64 {
        self.chunks_fetched as f64 / self.requests.max(1) as f64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("blob {blob}: {message}")]
    Failed { blob: String, message: String },
}

/// A fetch in progress that others may wait on.
struct Flight {
    result: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<(), String> {
        let mut r = self.result.lock().expect("flight lock");
        while r.is_none() {
            r = self.done.wait(r).expect("flight lock");
        }
        r.clone().expect("set")
    }
    fn finish(&self, result: Result<(), String>) {
        *self.result.lock().expect("flight lock") = Some(result);
        self.done.notify_all();
    }
}

/// Fetches the chunks of one blob into its cache entry.
pub struct BlobFetcher {
    backend: Arc<dyn Backend>,
    cached: Arc<CachedBlob>,
    inflight: Mutex<HashMap<usize, Arc<Flight>>>,
    opts: FetchOptions,
    pub stats: Arc<FetchStats>,
    /// Foreground fetches in flight; background prefetch yields while non-zero.
    foreground: AtomicUsize,
}

impl BlobFetcher {
    /// Opens `blob`'s cache entry, fetching its chunk table from `backend` only if the cache
    /// does not hold a valid one (so a restart serves cached data offline).
    pub fn open(
        cache: &Arc<BlobCache>,
        backend: Arc<dyn Backend>,
        blob: &DataBlob,
        opts: FetchOptions,
        stats: Arc<FetchStats>,
    ) -> Result<Arc<BlobFetcher>> {
        let cached = match cache.open_existing(blob)? {
            Some(c) => c,
            None => {
                let len = blob
                    .size
                    .checked_sub(blob.table_offset)
                    .context("blob table offset past its end")?;
                let bytes = with_retries(&opts, &stats, || {
                    backend.read_range(&blob.digest, blob.table_offset, len)
                })
                .with_context(|| {
                    format!(
                        "fetching the chunk table of blob {} from {}",
                        blob.digest,
                        backend.describe()
                    )
                })?;
                cache.open_blob(blob, &bytes)?
            }
        };
        Ok(Arc::new(BlobFetcher {
            backend,
            cached,
            inflight: Mutex::new(HashMap::new()),
            opts,
            stats,
            foreground: AtomicUsize::new(0),
        }))
    }

    pub fn cached(&self) -> &Arc<CachedBlob> {
        &self.cached
    }

    /// Indices of the chunks overlapping uncompressed bytes `offset..offset + len`.
    pub fn chunks_in(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let entries = &self.cached.table.entries;
        let end = offset.saturating_add(len);
        let first = entries.partition_point(|e| chunk_end(e) <= offset);
        let last = entries.partition_point(|e| chunk_start(e) < end);
        first..last.max(first)
    }

    /// Whether uncompressed bytes `offset..offset + len` are all in the cache (no fetch).
    pub fn is_range_present(&self, offset: u64, len: u64) -> bool {
        self.chunks_in(offset, len)
            .all(|i| self.cached.is_present(i))
    }

    /// Makes uncompressed bytes `offset..offset + len` present in the cache (a foreground
    /// miss: waits, fetches, and never returns before the bytes are there or it failed).
    pub fn ensure(&self, offset: u64, len: u64) -> Result<(), FetchError> {
        self.stats.bytes_requested.fetch_add(len, Ordering::Relaxed);
        let required = self.chunks_in(offset, len);
        if required.clone().all(|i| self.cached.is_present(i)) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.fetch_chunks(required, self.opts.readahead, true)
    }

    /// Fetches chunks `required` (and readahead after them), waiting for those others fetch.
    /// A `foreground` caller that sends requests of its own pauses background prefetch
    /// while they run; one that only waits for fetches in flight (often the prefetch's own)
    /// does not.
    fn fetch_chunks(
        &self,
        required: std::ops::Range<usize>,
        readahead: u64,
        foreground: bool,
    ) -> Result<(), FetchError> {
        let entries = &self.cached.table.entries;
        // Extend with readahead chunks (not waited on).
        let mut end = required.end;
        let mut extra = 0u64;
        while end < entries.len() && extra < readahead {
            extra += entries[end].compressed_len.get() as u64;
            end += 1;
        }
        let mut mine: Vec<usize> = Vec::new();
        let mut theirs: Vec<Arc<Flight>> = Vec::new();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for i in required.start..end {
                if self.cached.is_present(i) {
                    continue;
                }
                match inflight.get(&i) {
                    Some(f) => {
                        if required.contains(&i) {
                            theirs.push(f.clone());
                        }
                    }
                    None => {
                        inflight.insert(
                            i,
                            Arc::new(Flight {
                                result: Mutex::new(None),
                                done: Condvar::new(),
                            }),
                        );
                        mine.push(i);
                    }
                }
            }
        }
        let _pause = (foreground && !mine.is_empty()).then(|| Foreground::enter(&self.foreground));
        let mut first_error: Option<String> = None;
        for run in self.runs(&mine) {
            if foreground {
                self.stats
                    .foreground_requests
                    .fetch_add(1, Ordering::Relaxed);
            }
            let r = self.fetch_run(&run);
            let flights: Vec<Arc<Flight>> = {
                let mut inflight = self.inflight.lock().expect("inflight lock");
                run.iter().filter_map(|i| inflight.remove(i)).collect()
            };
            for f in flights {
                f.finish(r.clone());
            }
            if let Err(e) = r {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if run.iter().any(|i| required.contains(i)) && first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
        for f in theirs {
            self.stats.shared_waits.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = f.wait() {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(message) => Err(FetchError::Failed {
                blob: self.cached.blob.digest.clone(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Groups chunk indices (ascending) into runs fetched by one request each.
    fn runs(&self, chunks: &[usize]) -> Vec<Vec<usize>> {
        let entries = &self.cached.table.entries;
        let mut runs: Vec<Vec<usize>> = Vec::new();
        let mut run_start = 0u64;
        let mut run_end = 0u64;
        for &i in chunks {
            let e = &entries[i];
            let s = e.compressed_offset.get();
            let t = s + e.compressed_len.get() as u64;
            let joinable = !runs.is_empty()
                && s >= run_end
                && s - run_end <= self.opts.merge_gap
                && t - run_start <= self.opts.max_request;
            if joinable {
                runs.last_mut().expect("a run").push(i);
                run_end = t;
            } else {
                runs.push(vec![i]);
                run_start = s;
                run_end = t;
            }
        }
        runs
    }

    /// One range request for a run of chunks, verified chunk by chunk, with retries.
    fn fetch_run(&self, run: &[usize]) -> Result<(), String> {
        let entries = &self.cached.table.entries;
        let first = &entries[run[0]];
        let last = &entries[*run.last().expect("non-empty run")];
        let start = first.compressed_offset.get();
        let end = last.compressed_offset.get() + last.compressed_len.get() as u64;
        let blob = &self.cached.blob;
        let mut attempt = 0;
        loop {
            let t0 = Instant::now();
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let result = self
                .backend
                .read_range(&blob.digest, start, end - start)
                .map_err(|e| (e.is_transient(), e.to_string()))
                .and_then(|bytes| {
                    self.stats.observe(t0.elapsed());
                    self.stats
                        .bytes_fetched
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    for &i in run {
                        let e = &entries[i];
                        let off = (e.compressed_offset.get() - start) as usize;
                        let payload = &bytes[off..off + e.compressed_len.get() as usize];
                        let data =
                            decode_chunk(&blob.digest, self.cached.table.compression, e, payload)
                                .map_err(|err| {
                                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                                (true, err.to_string())
                            })?;
                        self.cached
                            .fill(i, &data)
                            .map_err(|err| (false, format!("{err:#}")))?;
                        self.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                });
            match result {
                Ok(()) => return Ok(()),
                Err((retryable, msg)) if retryable && attempt < self.opts.retries => {
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(blob = %blob.digest, attempt, "retrying fetch: {msg}");
                    std::thread::sleep(self.opts.backoff * (1 << (attempt - 1).min(6)));
                }
                Err((_, msg)) => {
                    return Err(format!(
                        "fetching {} bytes at {start} from {}: {msg}",
                        end - start,
                        self.backend.describe()
                    ))
                }
            }
        }
    }

    /// Fetches every missing chunk in the background order given (chunk indices), yielding
    /// to foreground fetches. Used by prefetch lists and "fetch the whole image".
    pub fn prefetch(
        &self,
        chunks: impl IntoIterator<Item = usize>,
        limits: &PrefetchLimits,
    ) -> Result<(), FetchError> {
        let entries = &self.cached.table.entries;
        let mut batch: Vec<usize> = Vec::new();
        let mut batch_bytes = 0u64;
        let flush = |batch: &mut Vec<usize>| -> Result<(), FetchError> {
            if batch.is_empty() {
                return Ok(());
            }
            while self.foreground.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let bytes: u64 = batch
                .iter()
                .map(|&i| entries[i].compressed_len.get() as u64)
                .sum();
            limits.throttle(bytes);
            batch.sort_unstable();
            batch.dedup();
            for run in group_consecutive(batch) {
                self.fetch_chunks(run.clone(), 0, false)?;
            }
            batch.clear();
            Ok(())
        };
        for i in chunks {
            if i >= entries.len() || self.cached.is_present(i) {
                continue;
            }
            batch.push(i);
            batch_bytes += entries[i].compressed_len.get() as u64;
            if batch_bytes >= self.opts.max_request {
                flush(&mut batch)?;
                batch_bytes = 0;
            }
        }
        flush(&mut batch)
    }

    /// `chunks` cut into consecutive pieces of at most `max_bytes` of remote (compressed)
    /// data each (a single larger chunk is a piece of its own).
    pub fn split_compressed(
        &self,
        chunks: std::ops::Range<usize>,
        max_bytes: u64,
    ) -> Vec<std::ops::Range<usize>> {
        let entries = &self.cached.table.entries;
        let mut out = Vec::new();
        let (mut start, mut bytes) = (chunks.start, 0u64);
        for i in chunks.clone() {
            let len = entries.get(i).map_or(0, |e| e.compressed_len.get() as u64);
            if bytes > 0 && bytes + len > max_bytes {
                out.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += len;
        }
        if start < chunks.end {
            out.push(start..chunks.end);
        }
        out
    }

    /// Fetches the whole blob.
    pub fn prefetch_all(&self, limits: &PrefetchLimits) -> Result<(), FetchError> {
        self.prefetch(0..self.cached.table.entries.len(), limits)
    }
}

/// Counts a foreground fetch in flight for as long as it lives.
struct Foreground<'a>(&'a AtomicUsize);

impl<'a> Foreground<'a> {
    fn enter(n: &'a AtomicUsize) -> Foreground<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        Foreground(n)
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn group_consecutive(sorted: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

fn chunk_start(e: &ChunkEntry) -> u64 {
    e.blkaddr.get() as u64 * BLOB_BLOCK_SIZE
}

fn chunk_end(e: &ChunkEntry) -> u64 {
    chunk_start(e) + (e.uncompressed_len.get() as u64).next_multiple_of(BLOB_BLOCK_SIZE)
}

/// Requests a prefetch list keeps in flight at once. A trace's files are scattered over
/// the blobs (one request each, mostly): in parallel the list is fetched well ahead of the
/// workload that made the trace, one after the other hardly faster than that workload.
pub const PREFETCH_PARALLEL: usize = 16;

/// Remote bytes per prefetch request at most: large enough that a round trip is small next
/// to the transfer, small enough that 16 of them share a link and data arrives early.
pub const PREFETCH_PIECE_BYTES: u64 = 1 << 20;

/// Fetches an image's prefetch list (extents of its blobs, in list order) into the cache,
/// up to [`PREFETCH_PARALLEL`] extents at a time, yielding to foreground fetches. Extents
/// naming a blob not in `fetchers` are skipped. Goes on past a failure; returns the last.
pub fn prefetch_extents(
    fetchers: &[Arc<BlobFetcher>],
    list: &[lode_format::manifest::PrefetchExtent],
    limits: &PrefetchLimits,
) -> Result<(), FetchError> {
    let mut jobs: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for ext in list {
        let Some(f) = fetchers.get(ext.blob as usize) else {
            tracing::warn!(
                blob = ext.blob,
                "prefetch list names a blob the image does not have"
            );
            continue;
        };
        let chunks = f.chunks_in(ext.offset, ext.len);
        match jobs.last_mut() {
            Some((b, r)) if *b == ext.blob as usize && r.end == chunks.start => r.end = chunks.end,
            _ => jobs.push((ext.blob as usize, chunks)),
        }
    }
    // Long extents (a prefetch blob is one) in pieces, so they arrive over parallel requests
    // and the first files are usable before the last bytes come.
    let jobs: Vec<(usize, std::ops::Range<usize>)> = jobs
        .into_iter()
        .flat_map(|(b, r)| {
            fetchers[b]
                .split_compressed(r, PREFETCH_PIECE_BYTES)
                .into_iter()
                .map(move |p| (b, p))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<FetchError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..PREFETCH_PARALLEL.min(jobs.len()) {
            s.spawn(|| loop {
                let Some((b, chunks)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                if let Err(e) = fetchers[*b].prefetch(chunks.clone(), limits) {
                    *failed.lock().expect("prefetch lock") = Some(e);
                }
            });
        }
    });
    match failed.into_inner().expect("prefetch lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Bandwidth limit shared by background prefetchers (a token bucket; 0 = unlimited).
#[derive(Debug, Default)]
pub struct PrefetchLimits {
    pub bytes_per_second: u64,
    state: Mutex<Option<(Instant, f64)>>,
}

impl PrefetchLimits {
    pub fn new(bytes_per_second: u64) -> Self {
        PrefetchLimits {
            bytes_per_second,
            state: Mutex::new(None),
        }
    }

    fn throttle(&self, bytes: u64) {
        if self.bytes_per_second == 0 {
            return;
        }
        let rate = self.bytes_per_second as f64;
        let wait = {
            let mut s = self.state.lock().expect("limit lock");
            let now = Instant::now();
            let (last, tokens) = s.unwrap_or((now, rate));
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
            let left = tokens - bytes as f64;
            *s = Some((now, left));
            if left < 0.0 {
                Duration::from_secs_f64(-left / rate)
            } else {
                Duration::ZERO
            }
        };
        std::thread::sleep(wait);
    }
}

fn with_retries<T>(
    opts: &FetchOptions,
    stats: &FetchStats,
    mut f: impl FnMut() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    let mut attempt = 0;
    loop {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < opts.retries => {
                attempt += 1;
                stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(opts.backoff * (1 << (attempt - 1).min(6)));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes the whole uncompressed layout of `blob` present in the cache at `cache_dir`, reading
/// its remote form from the local directory `blobs_dir`, and returns the data file's path.
pub fn materialize_from_dir(
    cache_dir: &std::path::Path,
    blob: &DataBlob,
    blobs_dir: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let cache = BlobCache::open(cache_dir)?;
    let backend: Arc<dyn Backend> =
        Arc::new(crate::backend::local::LocalDirBackend::new(blobs_dir));
    let fetcher = BlobFetcher::open(
        &cache,
        backend,
        blob,
        FetchOptions::default(),
        Default::default(),
    )?;
    fetcher.prefetch_all(&PrefetchLimits::default())?;
    cache.flush();
    Ok(fetcher.cached().data_path().to_path_buf())
}

/// A blob's uncompressed layout as a [`ReadAt`](lode_format::reader::ReadAt) device for the
/// EROFS reader: every read first makes its range present (fetching on a miss), then reads
/// the cache. A failed fetch is an I/O error, never zeros.
pub struct LazyDevice(pub Arc<BlobFetcher>);

impl lode_format::reader::ReadAt for LazyDevice {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0
            .ensure(offset, buf.len() as u64)
            .map_err(std::io::Error::other)?;
        self.0.cached().read_at(buf, offset)
    }
}
