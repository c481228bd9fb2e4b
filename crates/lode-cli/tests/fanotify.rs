//! `lode mount --mode fanotify`, for real: a local docker-registry behind a fault-injecting
//! proxy, the kernel's EROFS over sparse cache files, fanotify pre-content events.
//!
//! Needs root and Linux 6.14+ with pre-content fanotify (this machine and CI have both).
//! Every process a test starts is stopped by PID and every mount unmounted, also on failure
//! ([`FanMount`]'s Drop).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_fanotify::stats::Stats;
use lode_registry::testing::TestRegistry;
use lode_testkit::cmd::{run, run_fail};
use lode_testkit::compare::assert_same_tree;
use lode_testkit::faultproxy::{Fault, FaultProxy};
use lode_testkit::mount::{is_mounted, require_erofs, require_root, MountGuard};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

fn work_dir() -> tempfile::TempDir {
    require_root();
    require_erofs();
    tempfile::Builder::new()
        .prefix("lode-fan-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn drop_caches() {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn alive(pid: u32) -> bool {
    // A zombie has exited (its parent, init, reaps it whenever it likes).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn kill(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A source tree: sample_tree's variety plus `big` incompressible files of `big_size`.
fn make_tree(dir: &Path, seed: u64, big: usize, big_size: usize) {
    std::fs::create_dir_all(dir).unwrap();
    materialize(&sample_tree(TreeParams::default(), seed), dir).unwrap();
    let d = dir.join("big-files");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..big {
        std::fs::write(
            d.join(format!("big{i}")),
            noise(seed * 1000 + i as u64, big_size),
        )
        .unwrap();
    }
}

/// Relative paths of the regular files under `root`.
fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(r);
            } else if m.is_file() {
                out.push(r);
            }
        }
    }
    out.sort();
    out
}

/// Reads every file of `files` under `mnt` and compares it with `src`; returns
/// (bytes compared, wrong files, read errors).
fn check_files(src: &Path, mnt: &Path, files: &[PathBuf]) -> (u64, u64, u64) {
    let (mut bytes, mut wrong, mut errors) = (0, 0, 0);
    for f in files {
        let want = std::fs::read(src.join(f)).unwrap();
        match std::fs::read(mnt.join(f)) {
            Ok(got) => {
                bytes += got.len() as u64;
                if got != want {
                    wrong += 1;
                    eprintln!("WRONG BYTES: {}", f.display());
                }
            }
            Err(e) => {
                errors += 1;
                eprintln!("READ ERROR: {}: {e}", f.display());
            }
        }
    }
    (bytes, wrong, errors)
}

/// A registry with a fault proxy in front, holding the image built from `src`.
struct Source {
    _registry: TestRegistry,
    proxy: FaultProxy,
    reference: String,
}

fn push_image(w: &Path, src: &Path, extra_build: &[&str]) -> Source {
    run(lode()
        .arg("build")
        .arg(src)
        .arg("-o")
        .arg(w.join("img"))
        .args(extra_build));
    let registry = TestRegistry::start();
    let reference = format!("{}/demo/app:v1", registry.addr());
    run(lode()
        .args(["push", "--plain-http"])
        .arg(w.join("img"))
        .arg(&reference));
    let proxy = FaultProxy::start(registry.addr());
    let reference = format!("{}/demo/app:v1", proxy.addr());
    Source {
        _registry: registry,
        proxy,
        reference,
    }
}

/// A fanotify mount; unmounted (and every process of it gone) when dropped.
struct FanMount {
    mnt: PathBuf,
    run_dir: PathBuf,
    supervisor: u32,
    stats: PathBuf,
    done: bool,
}

impl FanMount {
    fn mount(image: &str, w: &Path, extra: &[&str]) -> FanMount {
        FanMount::mount_at(image, w, "mnt", "cache", extra)
    }

    fn mount_at(image: &str, w: &Path, name: &str, cache: &str, extra: &[&str]) -> FanMount {
        FanMount::mount_env(image, w, name, cache, extra, &[])
    }

    fn mount_env(
        image: &str,
        w: &Path,
        name: &str,
        cache: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> FanMount {
        let mnt = w.join(name);
        std::fs::create_dir_all(&mnt).unwrap();
        let run_dir = w.join("run");
        let out = run(lode()
            .env("LODE_RUN_DIR", &run_dir)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .args(["mount", "--mode", "fanotify", "--plain-http", "--cache-dir"])
            .arg(w.join(cache))
            .args(extra)
            .arg(image)
            .arg(&mnt));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let pid: u32 = stdout
            .split("supervisor pid ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no supervisor pid in {stdout:?}"));
        let stats = PathBuf::from(
            stdout
                .split("stats ")
                .nth(1)
                .and_then(|s| s.split(';').next())
                .unwrap()
                .trim(),
        );
        let m = FanMount {
            mnt: std::fs::canonicalize(&mnt).unwrap(),
            run_dir,
            supervisor: pid,
            stats,
            done: false,
        };
        assert!(is_mounted(&m.mnt), "{stdout}");
        m
    }

    /// A stats snapshot written after `after` (the worker rewrites it every 250 ms).
    fn stats_after(&self, after: Instant) -> Stats {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            - after.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = Stats::load(&self.stats) {
                if s.updated > since + 0.01 {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no fresh stats in {}",
                self.stats.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stats(&self) -> Stats {
        self.stats_after(Instant::now())
    }

    fn worker(&self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(&p) = children(self.supervisor).first() {
                return p;
            }
            assert!(Instant::now() < deadline, "the supervisor has no worker");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(&self.run_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                s.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        s
    }

    /// `lode umount`, then checks that nothing is left.
    fn umount(mut self) {
        let worker = children(self.supervisor);
        run(lode()
            .env("LODE_RUN_DIR", &self.run_dir)
            .arg("umount")
            .arg(&self.mnt));
        self.done = true;
        assert!(!is_mounted(&self.mnt));
        let deadline = Instant::now() + Duration::from_secs(10);
        while (alive(self.supervisor) || worker.iter().any(|&p| alive(p)))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(self.supervisor), "the supervisor is still running");
        for p in worker {
            assert!(!alive(p), "worker {p} is still running");
        }
        // No record, spec or stats of this mount left; only its log.
        assert!(!self.stats.exists(), "stats file left");
        assert!(
            !self.stats.with_extension("spec").exists(),
            "spec file left"
        );
        let records: Vec<PathBuf> = std::fs::read_dir(&self.run_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter(|p| {
                serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap_or_default())
                    .ok()
                    .and_then(|v| v["mountpoint"].as_str().map(PathBuf::from))
                    == Some(self.mnt.clone())
            })
            .collect();
        assert!(records.is_empty(), "mount record left: {records:?}");
    }
}

impl Drop for FanMount {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let procs: Vec<u32> = std::iter::once(self.supervisor)
            .chain(children(self.supervisor))
            .collect();
        let _ = lode()
            .env("LODE_RUN_DIR", &self.run_dir)
            .arg("umount")
            .arg(&self.mnt)
            .output();
        // Still mounted (busy): the guard retries and detaches lazily.
        drop(MountGuard::new(&self.mnt));
        let deadline = Instant::now() + Duration::from_secs(10);
        while procs.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in procs {
            if alive(p) {
                eprintln!("FanMount: killing leftover pid {p}");
                kill(p, rustix::process::Signal::KILL);
            }
        }
        eprintln!("--- mount log ---\n{}", self.log());
    }
}

/// Inode numbers of the cache data files of the image built at `w/img`, cached in `w/cache`.
fn blob_inodes(w: &Path) -> Vec<u64> {
    let manifest: lode_format::manifest::ImageManifest =
        serde_json::from_slice(&std::fs::read(w.join("img/image.json")).unwrap()).unwrap();
    manifest
        .blobs
        .iter()
        .map(|b| {
            std::fs::metadata(w.join("cache/blobs").join(b.hex()))
                .unwrap()
                .ino()
        })
        .collect()
}

/// Inode numbers fanotify marks point at, over every fanotify fd of every process.
fn fanotify_marked_inodes() -> Vec<u64> {
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let text = std::fs::read_to_string(fd.path()).unwrap_or_default();
            for l in text.lines() {
                if let Some(rest) = l.strip_prefix("fanotify ino:") {
                    if let Some(ino) = rest.split_whitespace().next() {
                        out.push(u64::from_str_radix(ino, 16).unwrap_or(0));
                    }
                }
            }
        }
    }
    out
}

/// Backing files of the loop devices in use (other tests on the machine may use some).
fn loop_backing_files() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .map(|s| PathBuf::from(s.trim()))
        .collect()
}

/// Issue 5, tests 1 and 5: lazy mount from a registry; identical tree; nothing fetched at
/// mount time; one file costs ≪ the image; umount leaves nothing behind (also after a
/// SIGTERM the supervisor must refuse while mounted).
#[test]
fn lazy_mount_from_registry_then_clean_umount() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    make_tree(&src, 11, 4, 3 << 20);
    let source = push_image(w, &src, &[]);

    let m = FanMount::mount(&source.reference, w, &[]);
    let s = m.stats();
    let manifest: lode_format::manifest::ImageManifest =
        serde_json::from_slice(&std::fs::read(w.join("img/image.json")).unwrap()).unwrap();
    // Mounted, and not one byte of blob data fetched: only the chunk tables, by `lode mount`.
    assert_eq!(s.fetch("requests"), 0, "{s:#?}");
    assert_eq!(s.fetch("bytes_fetched"), 0);
    assert_eq!(s.open_requests, manifest.blobs.len() as u64);
    assert_eq!(s.chunks_present, 0);
    assert_eq!(s.event("events"), 0);
    let blob_inodes: Vec<u64> = manifest
        .blobs
        .iter()
        .map(|b| {
            std::fs::metadata(w.join("cache/blobs").join(b.hex()))
                .unwrap()
                .ino()
        })
        .collect();
    let marked = fanotify_marked_inodes();
    assert!(
        blob_inodes.iter().all(|i| marked.contains(i)),
        "a blob is not marked"
    );
    // File-backed: no loop device in between (it would bypass the marks).
    assert!(!loop_backing_files().iter().any(|p| p.starts_with(w)));

    // One 3 MiB file of a ~15 MiB image.
    let got = std::fs::read(m.mnt.join("big-files/big2")).unwrap();
    assert_eq!(got, std::fs::read(src.join("big-files/big2")).unwrap());
    // A snapshot taken after the read completed (fills are counted before they are allowed).
    let s = m.stats();
    eprintln!(
        "one file: {} bytes fetched in {} requests, image {} bytes",
        s.fetch("bytes_fetched"),
        s.fetch("requests"),
        s.blob_bytes
    );
    assert!(s.fetch("bytes_fetched") >= 3 << 20);
    assert!(
        s.fetch("bytes_fetched") <= (3 << 20) + (1 << 20)
            && s.fetch("bytes_fetched") * 4 < s.blob_bytes,
        "{s:#?}"
    );
    assert!(s.event("allowed_filled") > 0);

    // The whole tree: contents and metadata.
    assert_same_tree(&src, &m.mnt);
    let s = m.stats();
    assert_eq!(s.event("denied_eio"), 0);
    assert_eq!(s.event("overflows"), 0);

    // SIGTERM while mounted: refused (exiting would fail the mount open).
    kill(m.supervisor, rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(m.supervisor));
    drop_caches();
    let (bytes, wrong, errors) = check_files(&src, &m.mnt, &regular_files(&src));
    assert!(bytes > 0 && wrong == 0 && errors == 0);
    assert!(m.log().contains("termination requested"));

    // Everything was read: every blob is complete, its mark removed (reads raise no events).
    let s = m.stats();
    assert_eq!(s.chunks_present, s.chunks);
    assert_eq!(s.blobs_unmarked, manifest.blobs.len() as u64);
    let marked = fanotify_marked_inodes();
    assert!(!marked.iter().any(|i| blob_inodes.contains(i)));
    m.umount();
    let marked = fanotify_marked_inodes();
    assert!(
        !marked.iter().any(|i| blob_inodes.contains(i)),
        "a fanotify mark on a blob survived umount"
    );
    let cache = std::fs::canonicalize(w.join("cache")).unwrap();
    let loops: Vec<PathBuf> = loop_backing_files()
        .into_iter()
        .filter(|p| p.starts_with(&cache) || p.starts_with(w))
        .collect();
    assert!(loops.is_empty(), "loop devices on our files: {loops:?}");
    assert_eq!(source.proxy.handle().faulted(), 0);
}

/// Issue 5, test 2: 64 concurrent readers of every file of a cold mount.
#[test]
fn sixty_four_concurrent_readers() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    make_tree(&src, 22, 8, 1 << 20);
    let source = push_image(w, &src, &["--chunk-size", "64K"]);
    let m = FanMount::mount(&source.reference, w, &[]);
    let files = Arc::new(regular_files(&src));
    drop_caches();
    let wrong = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let (files, src, mnt) = (files.clone(), src.clone(), m.mnt.clone());
            let (wrong, errors, bytes) = (wrong.clone(), errors.clone(), bytes.clone());
            std::thread::spawn(move || {
                // Each reader starts somewhere else, so they collide on different files.
                let n = files.len();
                let order: Vec<PathBuf> = (0..n).map(|k| files[(k + i * 7) % n].clone()).collect();
                let (b, w, e) = check_files(&src, &mnt, &order);
                bytes.fetch_add(b, Ordering::Relaxed);
                wrong.fetch_add(w, Ordering::Relaxed);
                errors.fetch_add(e, Ordering::Relaxed);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = m.stats();
    eprintln!(
        "64 readers: {} bytes compared; {} events, {} filled, {} from cache; {} requests, {} shared waits",
        bytes.load(Ordering::Relaxed),
        s.event("events"),
        s.event("allowed_filled"),
        s.event("allowed_cached"),
        s.fetch("requests"),
        s.worker_fetch["shared_waits"]
    );
    assert_eq!(wrong.load(Ordering::Relaxed), 0);
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    assert_eq!(s.event("denied_eio"), 0);
    m.umount();
}

/// Issue 5, test 3: `kill -9` of the worker, again and again, under readers that check
/// every byte: 0 wrong bytes, 0 errors; blocked readers complete after the restart.
#[test]
fn worker_kill_9_loses_no_reader() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    make_tree(&src, 33, 12, 1 << 20);
    let source = push_image(w, &src, &["--chunk-size", "64K"]);
    // Slow fetches, so kills land while events are in flight.
    source
        .proxy
        .handle()
        .set_latency(Duration::from_millis(150));
    // Marks stay when blobs are complete, so the later rounds (after drop_caches) still go
    // through events.
    let m = FanMount::mount_env(
        &source.reference,
        w,
        "mnt",
        "cache",
        &[],
        &[("LODE_FANOTIFY_KEEP_MARKS", "1")],
    );
    let files = Arc::new(regular_files(&src));
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let passes = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let (files, src, mnt) = (files.clone(), src.clone(), m.mnt.clone());
            let (stop, wrong, errors, passes) =
                (stop.clone(), wrong.clone(), errors.clone(), passes.clone());
            std::thread::spawn(move || {
                let n = files.len();
                let order: Vec<PathBuf> = (0..n).map(|k| files[(k + i * 13) % n].clone()).collect();
                while !stop.load(Ordering::Relaxed) {
                    let (_, w, e) = check_files(&src, &mnt, &order);
                    wrong.fetch_add(w, Ordering::Relaxed);
                    errors.fetch_add(e, Ordering::Relaxed);
                    passes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut kills = 0;
    for round in 0..8 {
        // The first rounds land in the cold phase (fetches in flight); later ones after a
        // drop_caches (events served from the cache).
        std::thread::sleep(Duration::from_millis(if round < 4 { 700 } else { 300 }));
        if round >= 4 {
            drop_caches();
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = m.stats();
        let victim = m.worker();
        kill(victim, rustix::process::Signal::KILL);
        kills += 1;
        // The supervisor starts a successor, which settles and serves.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = m.stats();
            if s.worker_generation > before.worker_generation && s.worker_pid != victim {
                break;
            }
            assert!(Instant::now() < deadline, "no new worker after kill -9");
        }
    }
    // Let every reader finish at least one more full pass after the last kill.
    let p = passes.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(120);
    while passes.load(Ordering::Relaxed) < p + 6 {
        assert!(Instant::now() < deadline, "readers stopped making progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let s = m.stats();
    eprintln!(
        "kill -9 x{kills}: {} reader passes; restarts {}, settled {} (denied {}), swept {}; events {}",
        passes.load(Ordering::Relaxed),
        s.worker_restarts,
        s.event("settled"),
        s.event("settled_denied"),
        s.event("swept"),
        s.event("events"),
    );
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "wrong bytes after kill -9"
    );
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "read errors after kill -9"
    );
    assert_eq!(s.worker_restarts, kills);
    assert_eq!(s.event("swept"), 0);
    assert_eq!(s.event("settled_denied"), 0);
    assert!(
        s.event("settled") > 0,
        "no kill landed on an in-flight event: {s:#?}"
    );
    assert_same_tree(&src, &m.mnt);
    m.umount();
}

/// Issue 5, test 4: the registry goes away → readers get EIO (never zeros); it comes back
/// → the same reads return the right bytes.
#[test]
fn registry_down_gives_eio_then_recovers() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    make_tree(&src, 44, 3, 1 << 20);
    let source = push_image(w, &src, &[]);
    let m = FanMount::mount(&source.reference, w, &[]);
    let faults = source.proxy.handle();
    for (fault, name) in [(Fault::Status(503), "big0"), (Fault::Refuse, "big1")] {
        let rel = Path::new("big-files").join(name);
        let want = std::fs::read(src.join(&rel)).unwrap();
        faults.set_persistent(Some(fault.clone()));
        let mut buf = Vec::new();
        let err = std::fs::File::open(m.mnt.join(&rel))
            .unwrap()
            .read_to_end(&mut buf)
            .expect_err(&format!(
                "a read with the registry down ({fault:?}) succeeded"
            ));
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::IO.raw_os_error()),
            "{err}"
        );
        // Whatever was returned before the error is the right bytes, not zeros.
        assert_eq!(buf[..], want[..buf.len()]);
        faults.set_persistent(None);
        faults.clear();
        assert_eq!(
            std::fs::read(m.mnt.join(&rel)).unwrap(),
            want,
            "after recovery"
        );
    }
    let s = m.stats();
    eprintln!(
        "registry down: {} EIO answers, {} fetch errors",
        s.event("denied_eio"),
        s.fetch("errors")
    );
    assert!(s.event("denied_eio") > 0, "{s:#?}");
    // Most of the image was never read: the marks are still there, until umount.
    let blobs = blob_inodes(w);
    assert!(s.chunks_present < s.chunks);
    assert!(fanotify_marked_inodes().iter().any(|i| blobs.contains(i)));
    m.umount();
    assert!(
        !fanotify_marked_inodes().iter().any(|i| blobs.contains(i)),
        "a fanotify mark on a blob survived umount"
    );
}

/// Two mounts of one image share a cache: the second one's fds are opened while the first
/// one's marks exist (they would be notifying), yet both fill without deadlock and read right.
/// Also: a local image directory as the source, and `--prefetch-all`.
#[test]
fn two_mounts_share_a_cache() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    make_tree(&src, 55, 4, 1 << 20);
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));
    let img = w.join("img").display().to_string();
    let a = FanMount::mount_at(&img, w, "a", "cache", &[]);
    let b = FanMount::mount_at(&img, w, "b", "cache", &[]);
    let files = regular_files(&src);
    drop_caches();
    assert_eq!(check_files(&src, &b.mnt, &files).1, 0);
    drop_caches();
    assert_eq!(check_files(&src, &a.mnt, &files).1, 0);
    assert_same_tree(&src, &b.mnt);
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.event("denied_eio") + sb.event("denied_eio"), 0);
    b.umount();
    // A still serves after B is gone.
    drop_caches();
    let (_, wrong, errors) = check_files(&src, &a.mnt, &files);
    assert_eq!((wrong, errors), (0, 0));
    a.umount();

    // --prefetch-all fetches the whole image in the background, with nobody reading.
    let c = FanMount::mount_at(&img, w, "c", "cache-c", &["--prefetch-all"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.stats();
        if s.prefetch == "done" {
            assert_eq!(s.chunks_present, s.chunks);
            break;
        }
        assert!(Instant::now() < deadline, "prefetch did not finish: {s:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same_tree(&src, &c.mnt);
    c.umount();
}

/// A lazy `umount -l` while a reader holds a file open: the supervisor keeps serving (exiting
/// would let the reader see zeros) and exits once the file is closed.
#[test]
fn lazy_umount_keeps_serving_open_files() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    make_tree(&src, 66, 2, 2 << 20);
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));
    let img = w.join("img").display().to_string();
    let mut m = FanMount::mount(&img, w, &[]);
    let mut f = std::fs::File::open(m.mnt.join("big-files/big1")).unwrap();
    rustix::mount::unmount(&m.mnt, rustix::mount::UnmountFlags::DETACH).unwrap();
    assert!(!is_mounted(&m.mnt));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        alive(m.supervisor),
        "the supervisor exited while a file was open"
    );
    drop_caches();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, std::fs::read(src.join("big-files/big1")).unwrap());
    drop(f);
    let worker = children(m.supervisor);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(m.supervisor) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(m.supervisor),
        "the supervisor outlived its superblock"
    );
    for p in worker {
        assert!(!alive(p));
    }
    assert!(m.log().contains("still reachable"));
    m.done = true;
}

/// The cache directory must be on ext4/xfs/btrfs: tmpfs is refused with a clear message.
#[test]
fn cache_on_tmpfs_is_refused() {
    let work = work_dir();
    let w = work.path();
    let src = w.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), noise(1, 100_000)).unwrap();
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));
    let shm = tempfile::Builder::new()
        .prefix("lode-fan-")
        .tempdir_in("/dev/shm")
        .unwrap();
    std::fs::create_dir_all(w.join("mnt")).unwrap();
    let out = run_fail(
        lode()
            .env("LODE_RUN_DIR", w.join("run"))
            .args(["mount", "--mode", "fanotify", "--cache-dir"])
            .arg(shm.path())
            .arg(w.join("img"))
            .arg(w.join("mnt")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tmpfs") && err.contains("ext4"), "{err}");
    assert!(!is_mounted(&w.join("mnt")));
}
