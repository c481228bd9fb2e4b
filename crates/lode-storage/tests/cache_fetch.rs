//! The cache and the fetcher, for real: images built by lode-builder, blobs read through
//! backends that count, delay, corrupt or fail, and kill -9 of a process filling the cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lode_format::manifest::{DataBlob, ImageManifest};
use lode_format::reader::ReadAt;
use lode_storage::backend::local::LocalDirBackend;
use lode_storage::backend::{Backend, BackendError};
use lode_storage::cache::{self, BlobCache};
use lode_storage::chunks::UncompressedView;
use lode_storage::fetch::{BlobFetcher, FetchOptions, PrefetchLimits};

/// Wraps a backend: counts requests, can sleep, flip a bit, or fail.
struct TestBackend {
    inner: LocalDirBackend,
    requests: AtomicU64,
    delay: Duration,
    /// Flip a bit in the next N responses.
    corrupt_next: AtomicUsize,
    /// Fail every request (transiently) while set.
    down: std::sync::atomic::AtomicBool,
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl TestBackend {
    fn new(dir: &Path) -> Arc<Self> {
        Arc::new(TestBackend {
            inner: LocalDirBackend::new(dir),
            requests: AtomicU64::new(0),
            delay: Duration::ZERO,
            corrupt_next: AtomicUsize::new(0),
            down: Default::default(),
            ranges: Mutex::new(Vec::new()),
        })
    }
}

impl Backend for TestBackend {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.ranges.lock().unwrap().push((offset, len));
        std::thread::sleep(self.delay);
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::transient("test backend is down"));
        }
        let mut data = self.inner.read_range(digest, offset, len)?;
        if self
            .corrupt_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            let i = data.len() / 2;
            data[i] ^= 0x10;
        }
        Ok(data)
    }
    fn describe(&self) -> String {
        "test backend".into()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    img: PathBuf,
    manifest: ImageManifest,
}

impl Fixture {
    fn blobs_dir(&self) -> PathBuf {
        self.img.join("blobs")
    }
    fn blob(&self) -> &DataBlob {
        self.manifest
            .blobs
            .iter()
            .max_by_key(|b| b.chunk_count)
            .unwrap()
    }
    /// The uncompressed layout of `blob`, decoded straight from its remote form.
    fn reference(&self, blob: &DataBlob) -> Vec<u8> {
        let f = std::fs::File::open(self.blobs_dir().join(blob.hex())).unwrap();
        let view = UncompressedView::open(f, blob.clone()).unwrap();
        let mut out = vec![0u8; blob.uncompressed_size as usize];
        view.read_exact_at(&mut out, 0).unwrap();
        out
    }
}

/// An image with many small chunks (64 KiB) of varied, compressible data.
fn fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("lode-cache-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..40u32 {
        let len = 1000 + (i as usize * 37_919) % 300_000;
        let data: Vec<u8> = (0..len)
            .map(|j| ((j as u32 / 7) ^ i.wrapping_mul(2654435761)) as u8 % 61)
            .collect();
        std::fs::write(src.join(format!("f{i}")), data).unwrap();
    }
    let img = dir.path().join("img");
    let opts = lode_builder::BuildOptions {
        chunk_size: 64 << 10,
        inline_max: 0,
        ..Default::default()
    };
    lode_builder::build_dir(&src, &img, &opts).unwrap();
    let manifest: ImageManifest =
        serde_json::from_slice(&std::fs::read(img.join("image.json")).unwrap()).unwrap();
    Fixture {
        _dir: dir,
        img,
        manifest,
    }
}

fn opts() -> FetchOptions {
    FetchOptions {
        backoff: Duration::from_millis(1),
        ..Default::default()
    }
}

fn read_cache(fetcher: &BlobFetcher, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    fetcher.cached().read_at(&mut buf, off).unwrap();
    buf
}

#[test]
fn fetched_ranges_match_the_blob_and_hits_do_not_fetch() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let want = fx.reference(&blob);
    let cache_dir = fx.img.join("cache");
    let cache = BlobCache::open(&cache_dir).unwrap();
    let backend = TestBackend::new(&fx.blobs_dir());
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    let size = blob.uncompressed_size;
    let mut x = 12345u64;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 11) % size;
        let len = ((x >> 40) % 200_000).min(size - off).max(1);
        f.ensure(off, len).unwrap();
        assert!(
            read_cache(&f, off, len) == want[off as usize..(off + len) as usize],
            "bytes at {off}+{len} differ"
        );
    }
    let before = backend.requests.load(Ordering::SeqCst);
    f.ensure(0, size).unwrap();
    f.ensure(0, size).unwrap();
    let after_full = backend.requests.load(Ordering::SeqCst);
    f.ensure(0, size).unwrap();
    assert_eq!(
        backend.requests.load(Ordering::SeqCst),
        after_full,
        "a hit fetched"
    );
    assert!(after_full > before);
    assert!(f.cached().is_complete());
    assert!(read_cache(&f, 0, size) == want);
    let s = f.stats.snapshot();
    assert!(s.hits >= 1 && s.misses >= 1, "{s:?}");
}

#[test]
fn adjacent_misses_merge_into_one_request() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let cache = BlobCache::open(&fx.img.join("cache")).unwrap();
    let backend = TestBackend::new(&fx.blobs_dir());
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    let table_requests = backend.requests.load(Ordering::SeqCst);
    // A range covering ten whole chunks: one request, ten chunks.
    let e = &f.cached().table.entries;
    assert!(e.len() >= 12, "fixture has {} chunks", e.len());
    let start = e[1].blkaddr.get() as u64 * 4096;
    let end = e[11].blkaddr.get() as u64 * 4096;
    f.ensure(start, end - start).unwrap();
    assert_eq!(backend.requests.load(Ordering::SeqCst) - table_requests, 1);
    let s = f.stats.snapshot();
    assert_eq!(s.chunks_fetched, 10);
    assert!(s.merge_ratio() >= 5.0, "{s:?}");
}

#[test]
fn concurrent_misses_on_one_chunk_share_one_fetch() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let want = fx.reference(&blob);
    let cache = BlobCache::open(&fx.img.join("cache")).unwrap();
    let mut b = TestBackend::new(&fx.blobs_dir());
    Arc::get_mut(&mut b).unwrap().delay = Duration::from_millis(200);
    let backend = b;
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    let base = backend.requests.load(Ordering::SeqCst);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                f.ensure(5000, 100).unwrap();
                assert!(read_cache(&f, 5000, 100) == want[5000..5100]);
            });
        }
    });
    assert_eq!(backend.requests.load(Ordering::SeqCst) - base, 1);
    assert!(f.stats.snapshot().shared_waits >= 1);
}

#[test]
fn corrupt_data_is_retried_and_never_cached() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let want = fx.reference(&blob);
    let cache = BlobCache::open(&fx.img.join("cache")).unwrap();
    let backend = TestBackend::new(&fx.blobs_dir());
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    // Transient corruption: two bad responses, then good data.
    backend.corrupt_next.store(2, Ordering::SeqCst);
    f.ensure(0, 1000).unwrap();
    assert!(read_cache(&f, 0, 1000) == want[..1000]);
    assert_eq!(f.stats.snapshot().verify_failures, 2);
    // Permanent corruption: the read fails with an error naming the blob, nothing is cached.
    let far = blob.uncompressed_size - 10;
    backend.corrupt_next.store(1000, Ordering::SeqCst);
    let err = f.ensure(far, 10).unwrap_err().to_string();
    assert!(
        err.contains(&blob.digest) && err.contains("digest"),
        "{err}"
    );
    let last = f.cached().table.entries.len() - 1;
    assert!(!f.cached().is_present(last));
    // The backend heals: the same read now succeeds.
    backend.corrupt_next.store(0, Ordering::SeqCst);
    f.ensure(far, 10).unwrap();
    assert!(read_cache(&f, far, 10) == want[far as usize..]);
}

#[test]
fn backend_down_gives_an_error_then_recovers() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let cache = BlobCache::open(&fx.img.join("cache")).unwrap();
    let backend = TestBackend::new(&fx.blobs_dir());
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    backend.down.store(true, Ordering::SeqCst);
    let err = f.ensure(0, 10).unwrap_err().to_string();
    assert!(err.contains("down"), "{err}");
    backend.down.store(false, Ordering::SeqCst);
    f.ensure(0, 10).unwrap();
}

#[test]
fn restart_serves_cached_data_offline() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let want = fx.reference(&blob);
    let cache_dir = fx.img.join("cache");
    {
        let cache = BlobCache::open(&cache_dir).unwrap();
        let backend = TestBackend::new(&fx.blobs_dir());
        let f = BlobFetcher::open(&cache, backend, &blob, opts(), Default::default()).unwrap();
        f.prefetch_all(&PrefetchLimits::default()).unwrap();
        cache.flush();
    }
    // A new process-like start with the origin gone.
    let cache = BlobCache::open(&cache_dir).unwrap();
    let backend = TestBackend::new(&fx.blobs_dir());
    backend.down.store(true, Ordering::SeqCst);
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    f.ensure(0, blob.uncompressed_size).unwrap();
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
    assert!(read_cache(&f, 0, blob.uncompressed_size) == want);
}

#[test]
fn a_stale_or_foreign_cache_file_is_replaced_not_trusted() {
    let fx = fixture();
    let blob = fx.blob().clone();
    let want = fx.reference(&blob);
    let cache_dir = fx.img.join("cache");
    let data_path;
    {
        let cache = BlobCache::open(&cache_dir).unwrap();
        let f = BlobFetcher::open(
            &cache,
            TestBackend::new(&fx.blobs_dir()),
            &blob,
            opts(),
            Default::default(),
        )
        .unwrap();
        f.prefetch_all(&PrefetchLimits::default()).unwrap();
        cache.flush();
        data_path = f.cached().data_path().to_path_buf();
    }
    // Someone overwrites the file with other bytes and a wrong tag.
    let garbage = vec![0xAAu8; blob.uncompressed_size as usize];
    std::fs::write(&data_path, &garbage).unwrap();
    rustix::fs::setxattr(
        &data_path,
        "user.lode.cache",
        b"lode-cache v1 sha256:other 1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let cache = BlobCache::open(&cache_dir).unwrap();
    let backend = TestBackend::new(&fx.blobs_dir());
    let f = BlobFetcher::open(&cache, backend.clone(), &blob, opts(), Default::default()).unwrap();
    assert_eq!(f.cached().chunks_present.load(Ordering::SeqCst), 0);
    f.ensure(0, blob.uncompressed_size).unwrap();
    assert!(read_cache(&f, 0, blob.uncompressed_size) == want);
    assert_eq!(cache.stats.blobs_invalidated.load(Ordering::SeqCst), 1);
}

/// Child half of the crash test (the test binary re-runs the test in a child process with
/// `LODE_CRASH_DIR` set): fill the cache as fast as possible until killed.
fn crash_child(dir: PathBuf) -> ! {
    let manifest: ImageManifest =
        serde_json::from_slice(&std::fs::read(dir.join("img/image.json")).unwrap()).unwrap();
    let cache = BlobCache::open(&dir.join("cache")).unwrap();
    for blob in &manifest.blobs {
        // Slow enough that the parent's kill lands while chunks are being filled.
        let mut backend = TestBackend::new(&dir.join("img/blobs"));
        Arc::get_mut(&mut backend).unwrap().delay = Duration::from_millis(3);
        let f = BlobFetcher::open(&cache, backend, blob, opts(), Default::default()).unwrap();
        // Random order so fills and commits interleave across the file.
        let n = f.cached().table.entries.len();
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = std::process::id() as u64;
        for i in (1..n).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            order.swap(i, (x >> 33) as usize % (i + 1));
        }
        for i in order {
            f.prefetch([i], &PrefetchLimits::default()).unwrap();
        }
    }
    std::thread::sleep(Duration::from_secs(60));
    std::process::exit(0)
}

#[test]
fn kill_9_never_leaves_a_claimed_chunk_missing() {
    if let Ok(dir) = std::env::var("LODE_CRASH_DIR") {
        crash_child(PathBuf::from(dir));
    }
    let fx = fixture();
    let dir = fx.img.parent().unwrap().to_path_buf();
    let blob = fx.blob().clone();
    let want = fx.reference(&blob);
    for round in 0..6u64 {
        let _ = std::fs::remove_dir_all(dir.join("cache"));
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill_9_never_leaves_a_claimed_chunk_missing",
                "--nocapture",
            ])
            .env("LODE_CRASH_DIR", &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(60 + round * 50));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Every chunk the state file claims must hold exactly the right bytes.
        let cache = BlobCache::open(&dir.join("cache")).unwrap();
        let Some(c) = cache.open_existing(&blob).unwrap() else {
            continue; // killed before the entry was linked: nothing is claimed
        };
        let mut claimed = 0;
        for (i, e) in c.table.entries.iter().enumerate() {
            if c.is_present(i) {
                claimed += 1;
                let off = e.blkaddr.get() as u64 * 4096;
                let len = e.uncompressed_len.get() as u64;
                let mut buf = vec![0u8; len as usize];
                c.read_at(&mut buf, off).unwrap();
                assert!(
                    buf == want[off as usize..(off + len) as usize],
                    "round {round}: chunk {i} is claimed but wrong"
                );
            }
        }
        eprintln!(
            "round {round}: {claimed}/{} chunks claimed and correct",
            c.table.entries.len()
        );
    }
}

#[test]
fn gc_removes_least_recently_used_unused_blobs_only() {
    let fx = fixture();
    let cache_dir = fx.img.join("cache");
    let blobs: Vec<DataBlob> = fx.manifest.blobs.clone();
    let cache = BlobCache::open(&cache_dir).unwrap();
    let held = BlobFetcher::open(
        &cache,
        TestBackend::new(&fx.blobs_dir()),
        &blobs[0],
        opts(),
        Default::default(),
    )
    .unwrap();
    held.prefetch_all(&PrefetchLimits::default()).unwrap();
    cache.flush();
    let listed = cache.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].in_use);
    assert_eq!(listed[0].chunks_present, listed[0].chunks);
    // In use: survives a full GC.
    assert!(cache::gc(&cache_dir, 0).unwrap().is_empty());
    drop(held);
    drop(cache);
    // Unused now: removed.
    let removed = cache::gc(&cache_dir, 0).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(BlobCache::open(&cache_dir)
        .unwrap()
        .list()
        .unwrap()
        .is_empty());
}

#[test]
fn size_limit_evicts_unused_blobs_only() {
    let fx = fixture();
    let cache_dir = fx.img.join("cache");
    let blobs: Vec<DataBlob> = fx.manifest.blobs.clone();
    {
        // Fill the cache with the blob, then let go of it.
        let cache = BlobCache::open(&cache_dir).unwrap();
        let f = BlobFetcher::open(
            &cache,
            TestBackend::new(&fx.blobs_dir()),
            &blobs[0],
            opts(),
            Default::default(),
        )
        .unwrap();
        f.prefetch_all(&PrefetchLimits::default()).unwrap();
        cache.flush();
    }
    let cache = BlobCache::open(&cache_dir).unwrap();
    assert_eq!(cache.list().unwrap().len(), 1);
    // In use by this process: the limit does not evict it.
    let held = BlobFetcher::open(
        &cache,
        TestBackend::new(&fx.blobs_dir()),
        &blobs[0],
        opts(),
        Default::default(),
    )
    .unwrap();
    cache.set_max_size(1);
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(cache.list().unwrap().len(), 1, "a blob in use was evicted");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cache.list().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the unused blob was not evicted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cache.stats.blobs_evicted.load(Ordering::SeqCst), 1);
}

#[test]
fn a_forged_chunk_table_is_refused() {
    // A source that serves a different (self-consistent) table than the manifest names must
    // not be trusted: the manifest's table digest anchors every chunk digest.
    let fx = fixture();
    let mut blob = fx.blob().clone();
    blob.table_digest = format!("blake3:{}", blake3::hash(b"another table").to_hex());
    let cache = BlobCache::open(&fx.img.join("cache")).unwrap();
    let err = BlobFetcher::open(
        &cache,
        TestBackend::new(&fx.blobs_dir()),
        &blob,
        opts(),
        Default::default(),
    )
    .err()
    .expect("a forged table must be refused");
    assert!(format!("{err:#}").contains("chunk table digest"), "{err:#}");
}
