//! `lode mount --mode fuse`, for real (root, /dev/fuse, a local docker-registry): content
//! and metadata, concurrency, passthrough, worker kill -9 under load, clean unmount.
//!
//! Every test runs its own run directory (`LODE_RUN_DIR`) and cache; a guard unmounts and
//! kills the mount's processes by PID, also when the test fails.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_registry::testing::TestRegistry;
use lode_testkit::cmd::run;
use lode_testkit::compare::assert_same_tree;
use lode_testkit::mount::{is_mounted, require_fuse, require_root};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

const O_DIRECT: i32 = rustix::fs::OFlags::DIRECT.bits() as i32;

fn lode(run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lode"));
    c.env("LODE_RUN_DIR", run_dir);
    c
}

struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        require_root();
        require_fuse();
        Work {
            dir: tempfile::Builder::new()
                .prefix("lode-fuse-")
                .tempdir_in("/var/tmp")
                .unwrap(),
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn run_dir(&self) -> PathBuf {
        self.path("run")
    }
}

/// A FUSE mount made by `lode mount`; on drop: `lode umount`, then (if anything is left)
/// SIGKILL of the supervisor and worker by PID and a lazy unmount.
struct FuseMount {
    mnt: PathBuf,
    run_dir: PathBuf,
    supervisor: u32,
    workers: Vec<u32>,
    done: bool,
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

impl FuseMount {
    fn mount(work: &Work, image: &str, extra: &[&str]) -> FuseMount {
        let mnt = work.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        run(lode(&work.run_dir())
            .args(["mount", "--mode", "fuse", "--cache-dir"])
            .arg(work.path("cache"))
            .args(extra)
            .arg(image)
            .arg(&mnt));
        let mut m = FuseMount {
            mnt: mnt.clone(),
            run_dir: work.run_dir(),
            supervisor: 0,
            workers: Vec::new(),
            done: false,
        };
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                std::fs::read_dir(&m.run_dir)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| p.extension().is_some_and(|x| x == "json"))
                    .expect("a mount record"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(rec["mode"], "fuse");
        m.supervisor = rec["pid"].as_u64().unwrap() as u32;
        let w = m.worker_pid();
        m.workers.push(w);
        assert!(is_mounted(&mnt));
        m
    }

    fn stats(&self) -> serde_json::Value {
        let sock = std::fs::read_dir(&self.run_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "sock"))
            .expect("a control socket");
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut s, &mut buf).unwrap();
        serde_json::from_str(&buf).unwrap()
    }

    fn worker_pid(&self) -> u32 {
        self.stats()["worker_pid"].as_u64().unwrap() as u32
    }

    fn reads(&self) -> u64 {
        self.stats()["requests"]["read"].as_u64().unwrap_or(0)
    }

    /// `lode umount`, then checks nothing is left: processes, mount, record, socket.
    fn umount(mut self) {
        // Retried: a fork in a parallel test can hold one of our descriptors for a moment
        // (EBUSY); a real failure still fails after the deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = lode_testkit::cmd::try_run(lode(&self.run_dir).arg("umount").arg(&self.mnt));
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("busy") || Instant::now() > deadline {
                panic!("lode umount failed: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let pids: Vec<u32> = std::iter::once(self.supervisor)
            .chain(self.workers.iter().copied())
            .collect();
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &p in &pids {
            assert!(!alive(p), "process {p} survived lode umount");
        }
        assert!(!is_mounted(&self.mnt));
        let left: Vec<_> = std::fs::read_dir(&self.run_dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in the run dir: {left:?}");
        // Only now: a failed check above leaves the cleanup (kill by PID) to Drop.
        self.done = true;
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = lode(&self.run_dir)
            .arg("umount")
            .arg(&self.mnt)
            .stdin(std::process::Stdio::null())
            .output();
        for &p in std::iter::once(&self.supervisor).chain(self.workers.iter()) {
            if p != 0 && alive(p) {
                kill9(p);
            }
        }
        let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Regular files of `dir` (relative path → content).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.insert(
                    e.path().strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(e.path()).unwrap(),
                );
            }
        }
    }
    out
}

fn tree(work: &Work, params: TreeParams, seed: u64) -> PathBuf {
    let src = work.path("src");
    std::fs::create_dir(&src).unwrap();
    materialize(&sample_tree(params, seed), &src).unwrap();
    src
}

fn build(work: &Work, src: &Path) -> PathBuf {
    let img = work.path("img");
    run(lode(&work.run_dir())
        .arg("build")
        .arg(src)
        .arg("-o")
        .arg(&img));
    img
}

#[test]
fn registry_image_served_lazily_matches_source() {
    let work = Work::new();
    let src = tree(&work, TreeParams::default(), 11);
    let img = build(&work, &src);
    let registry = TestRegistry::start();
    let reference = format!("{}/fuse/app:v1", registry.addr());
    run(lode(&work.run_dir())
        .args(["push", "--plain-http"])
        .arg(&img)
        .arg(&reference));
    let m = FuseMount::mount(
        &work,
        &reference,
        &["--plain-http", "--passthrough-min-size", "1"],
    );
    // Nothing fetched yet but metadata.
    assert_eq!(m.stats()["bytes_served"], 0);
    assert_same_tree(&src, &m.mnt);
    // Again, now that every file's data is local: passthrough opens.
    assert_same_tree(&src, &m.mnt);
    let s = m.stats();
    assert!(s["passthrough_opens"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["read_errors"], 0, "{s}");
    // Fetch counters are published every 200 ms.
    let deadline = Instant::now() + Duration::from_secs(3);
    while m.stats()["fetch_bytes"] == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = m.stats();
    assert!(s["fetch_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["fetch_requests"].as_u64().unwrap() > 0, "{s}");
    m.umount();
}

#[test]
fn directory_image_matches_source_with_and_without_passthrough() {
    let work = Work::new();
    let src = tree(&work, TreeParams::default(), 12);
    let img = build(&work, &src);
    let img = img.to_str().unwrap();
    {
        let m = FuseMount::mount(&work, img, &["--no-passthrough"]);
        assert_same_tree(&src, &m.mnt);
        assert_same_tree(&src, &m.mnt);
        let s = m.stats();
        assert_eq!(s["passthrough_opens"], 0, "{s}");
        assert!(s["requests"]["read"].as_u64().unwrap() > 0, "{s}");
        m.umount();
    }
    let m = FuseMount::mount(&work, img, &[]);
    assert_same_tree(&src, &m.mnt);
    m.umount();
}

#[test]
fn sixty_four_concurrent_readers_get_every_byte_right() {
    let work = Work::new();
    let params = TreeParams {
        max_entries: 120,
        special_files: false,
        ..TreeParams::default()
    };
    let src = tree(&work, params, 13);
    let img = build(&work, &src);
    let expected = Arc::new(files(&src));
    assert!(expected.len() > 20);
    // Cold cache, no passthrough: every reader goes through fetches and READs.
    let m = FuseMount::mount(&work, img.to_str().unwrap(), &["--no-passthrough"]);
    let bad = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let expected = expected.clone();
            let mnt = m.mnt.clone();
            let bad = bad.clone();
            std::thread::spawn(move || {
                let mut names: Vec<&PathBuf> = expected.keys().collect();
                let shift = (t as usize * 7) % names.len();
                names.rotate_left(shift);
                if t % 2 == 1 {
                    names.reverse();
                }
                for name in names {
                    match std::fs::read(mnt.join(name)) {
                        Ok(got) if got == expected[name] => {}
                        Ok(_) => {
                            eprintln!("reader {t}: wrong bytes in {}", name.display());
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("reader {t}: {}: {e}", name.display());
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(bad.load(Ordering::Relaxed), 0);
    assert_eq!(m.stats()["read_errors"], 0);
    m.umount();
}

#[test]
fn passthrough_reads_bypass_the_server() {
    let work = Work::new();
    let src = work.path("src");
    std::fs::create_dir(&src).unwrap();
    let data: Vec<u8> = (0..(3 << 20) + 12345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big"), &data).unwrap();
    let img = build(&work, &src);
    let m = FuseMount::mount(&work, img.to_str().unwrap(), &[]);
    let f = m.mnt.join("big");
    // First read: not local yet, so served by lode (READ requests, fetches).
    assert_eq!(std::fs::read(&f).unwrap(), data);
    let reads_before = m.reads();
    assert!(reads_before > 0);
    let s0 = m.stats();
    let mut total = 0u64;
    for _ in 0..50 {
        let got = std::fs::read(&f).unwrap();
        assert!(got == data);
        total += got.len() as u64;
    }
    // O_DIRECT goes to the backing file too.
    let mut direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_DIRECT)
        .open(&f)
        .unwrap();
    let mut buf = AlignedBuf::new(data.len().next_multiple_of(4096));
    let n = read_full(&mut direct, buf.as_mut());
    assert_eq!(&buf.as_mut()[..n], &data[..]);
    drop(direct);
    let s1 = m.stats();
    assert_eq!(total, 50 * data.len() as u64);
    assert_eq!(
        s1["requests"]["read"], s0["requests"]["read"],
        "READ requests grew while reading through passthrough: {s0} -> {s1}"
    );
    let opens =
        s1["passthrough_opens"].as_u64().unwrap() - s0["passthrough_opens"].as_u64().unwrap();
    assert_eq!(opens, 51, "{s1}");
    assert_eq!(s1["materialized_files"], 1, "{s1}");
    assert_eq!(s1["bytes_served"], s0["bytes_served"]);
    // The backing file holds exactly the file.
    let backing: Vec<PathBuf> = std::fs::read_dir(work.path("cache/files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backing.len(), 1);
    assert_eq!(std::fs::read(&backing[0]).unwrap(), data);
    m.umount();
}

/// A `Vec` whose slice is 4096-aligned, for O_DIRECT.
struct AlignedBuf {
    raw: Vec<u8>,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        AlignedBuf {
            raw: vec![0; len + 4096],
            len,
        }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        let off = self.raw.as_ptr().align_offset(4096);
        &mut self.raw[off..off + self.len]
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    loop {
        match std::io::Read::read(f, &mut buf[n..]) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Readers loop over every file (some with O_DIRECT, so READs keep reaching the worker),
/// caches are dropped now and then (so lookups, opens and reads go to the worker again),
/// and the worker is killed with SIGKILL several times: no reader may see an error or a
/// wrong byte.
fn kill_workers_under_load(extra: &[&str]) {
    let work = Work::new();
    let params = TreeParams {
        max_entries: 80,
        special_files: false,
        ..TreeParams::default()
    };
    let src = tree(&work, params, 14);
    let img = build(&work, &src);
    let expected = Arc::new(files(&src));
    let mut m = FuseMount::mount(&work, img.to_str().unwrap(), extra);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let files_read = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..8u64)
        .map(|t| {
            let (expected, mnt, stop) = (expected.clone(), m.mnt.clone(), stop.clone());
            let (errors, wrong, files_read) = (errors.clone(), wrong.clone(), files_read.clone());
            std::thread::spawn(move || {
                let direct = t % 2 == 1;
                while !stop.load(Ordering::Relaxed) {
                    for (name, want) in expected.iter() {
                        let mut opts = std::fs::OpenOptions::new();
                        opts.read(true);
                        if direct {
                            opts.custom_flags(O_DIRECT);
                        }
                        let got = opts.open(mnt.join(name)).and_then(|mut f| {
                            let mut buf = AlignedBuf::new(want.len().next_multiple_of(4096) + 4096);
                            let b = buf.as_mut();
                            let mut n = 0;
                            loop {
                                let k = std::io::Read::read(&mut f, &mut b[n..])?;
                                if k == 0 {
                                    break;
                                }
                                n += k;
                            }
                            Ok(b[..n].to_vec())
                        });
                        match got {
                            Ok(g) if &g == want => {}
                            Ok(_) => {
                                eprintln!("wrong bytes in {}", name.display());
                                wrong.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("{}: {e}", name.display());
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        files_read.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let dropper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                drop_caches();
            }
        })
    };
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(600));
        let before = files_read.load(Ordering::Relaxed);
        let w = m.worker_pid();
        kill9(w);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut next = w;
        while next == w && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            next = m.worker_pid();
        }
        assert_ne!(next, w, "no new worker after killing {w}");
        m.workers.push(next);
        // Readers make progress again.
        let deadline = Instant::now() + Duration::from_secs(20);
        while files_read.load(Ordering::Relaxed) < before + 20 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            files_read.load(Ordering::Relaxed) >= before + 20,
            "readers stalled"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    dropper.join().unwrap();
    let s = m.stats();
    eprintln!(
        "{} files read across 6 worker kills; stats {s}",
        files_read.load(Ordering::Relaxed)
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "reader errors");
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "wrong bytes");
    assert_eq!(s["worker_starts"], 7);
    assert_eq!(s["read_errors"], 0);
    m.umount();
}

#[test]
fn worker_kill9_under_load_no_passthrough() {
    kill_workers_under_load(&["--no-passthrough"]);
}

#[test]
fn worker_kill9_under_load_with_passthrough() {
    kill_workers_under_load(&["--passthrough-min-size", "1"]);
}

#[test]
fn missing_blob_is_eio_never_zeros() {
    let work = Work::new();
    let src = work.path("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), vec![7u8; 200_000]).unwrap();
    let img = build(&work, &src);
    let m = FuseMount::mount(&work, img.to_str().unwrap(), &[]);
    for b in std::fs::read_dir(img.join("blobs")).unwrap() {
        std::fs::remove_file(b.unwrap().path()).unwrap();
    }
    let err = std::fs::read(m.mnt.join("a")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::IO.raw_os_error()),
        "{err}"
    );
    assert!(m.stats()["read_errors"].as_u64().unwrap() > 0);
    m.umount();
}

#[test]
fn plain_umount_also_ends_the_processes() {
    let work = Work::new();
    let src = tree(&work, TreeParams::plain(), 15);
    let img = build(&work, &src);
    let mut m = FuseMount::mount(&work, img.to_str().unwrap(), &[]);
    assert_same_tree(&src, &m.mnt);
    // umount(2) directly, as an admin might: the worker sees the connection end, the
    // supervisor follows and removes its record.
    // (EBUSY can come from a fork in a parallel test briefly holding one of our descriptors.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rustix::mount::unmount(&m.mnt, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => break,
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("umount: {e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while (alive(m.supervisor) || m.workers.iter().any(|&w| alive(w))) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(m.supervisor));
    assert!(m.workers.iter().all(|&w| !alive(w)));
    let left: Vec<_> = std::fs::read_dir(&m.run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    m.done = true;
}

#[test]
fn sighup_replaces_the_worker_for_an_upgrade() {
    let work = Work::new();
    let src = tree(&work, TreeParams::plain(), 16);
    let img = build(&work, &src);
    let mut m = FuseMount::mount(&work, img.to_str().unwrap(), &[]);
    assert_same_tree(&src, &m.mnt);
    let old = m.worker_pid();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(m.supervisor as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut new = old;
    while new == old && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        new = m.worker_pid();
    }
    assert_ne!(new, old);
    m.workers.push(new);
    assert!(!alive(old));
    drop_caches();
    assert_same_tree(&src, &m.mnt);
    assert_eq!(m.stats()["worker_starts"], 2);
    m.umount();
}

/// With the cache on overlayfs, BACKING_OPEN fails (ELOOP: the backing file's stack depth
/// reaches the mount's max_stack_depth of 1): reads fall back to lode, the log says so once.
#[test]
fn stacked_cache_falls_back_to_reads_and_says_so_once() {
    let work = Work::new();
    let src = tree(&work, TreeParams::plain(), 17);
    let img = build(&work, &src);
    for d in ["lower", "upper", "ovl-work", "cache"] {
        std::fs::create_dir_all(work.path(d)).unwrap();
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        work.path("lower").display(),
        work.path("upper").display(),
        work.path("ovl-work").display()
    );
    let _ovl = lode_testkit::mount::MountGuard::mount(
        "overlay",
        work.path("cache"),
        "overlay",
        rustix::mount::MountFlags::empty(),
        &data,
    )
    .unwrap();
    let m = FuseMount::mount(
        &work,
        img.to_str().unwrap(),
        &["--passthrough-min-size", "1"],
    );
    assert_same_tree(&src, &m.mnt);
    drop_caches();
    assert_same_tree(&src, &m.mnt);
    let s = m.stats();
    assert_eq!(s["passthrough_disabled"], true, "{s}");
    assert_eq!(s["passthrough_opens"], 0, "{s}");
    let log: String = std::fs::read_dir(work.path("cache/logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(log.matches("FUSE passthrough disabled").count(), 1, "{log}");
    assert!(log.contains("stacked filesystem"), "{log}");
    m.umount();
}

/// A minimal HTTP/1.1 server for an image directory (Range reads); reads below `blobs/`
/// first wait `delay` milliseconds.
fn slow_http_server(root: PathBuf, delay: Arc<AtomicU64>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (root, delay) = (root.clone(), delay.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap();
                        range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()));
                    }
                }
                if path.starts_with("/blobs/") {
                    std::thread::sleep(Duration::from_millis(delay.load(Ordering::Relaxed)));
                }
                let mut out = conn;
                let Ok(data) = std::fs::read(root.join(path.trim_start_matches('/'))) else {
                    let _ = out.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                };
                let total = data.len() as u64;
                let (head, body) = match range {
                    Some((a, b)) => {
                        let b = b.min(total - 1);
                        (
                            format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{total}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                b + 1 - a
                            ),
                            &data[a as usize..=b as usize],
                        )
                    }
                    None => (
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
                        ),
                        &data[..],
                    ),
                };
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(body);
            });
        }
    });
    format!("http://{addr}")
}

/// A READ that is in the worker (waiting for a slow fetch) when the worker is killed is
/// answered by the next worker: FUSE_NOTIFY_RESEND hands it over; the reader only waits.
#[test]
fn read_in_flight_in_a_killed_worker_is_answered_by_the_next() {
    let work = Work::new();
    let src = work.path("src");
    std::fs::create_dir(&src).unwrap();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    std::fs::write(src.join("f"), &data).unwrap();
    let img = build(&work, &src);
    let delay = Arc::new(AtomicU64::new(0));
    let url = slow_http_server(img.clone(), delay.clone());
    let mut m = FuseMount::mount(&work, &url, &["--no-passthrough"]);
    delay.store(2000, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = m.mnt.join("f");
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(path));
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "the read should still wait for the fetch"
    );
    let w = m.worker_pid();
    kill9(w);
    delay.store(0, Ordering::Relaxed);
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the read was lost with the worker")
        .expect("the read failed");
    assert!(got == data, "wrong bytes");
    let next = m.worker_pid();
    assert_ne!(next, w);
    m.workers.push(next);
    let s = m.stats();
    assert_eq!(s["worker_starts"], 2, "{s}");
    assert_eq!(s["read_errors"], 0, "{s}");
    m.umount();
}
