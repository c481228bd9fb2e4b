//! Access trace → prefetch list, end to end and measured, in fanotify and FUSE mode (root,
//! real kernel mounts, a local docker-registry behind the fault proxy adding 20 ms to every
//! request):
//!
//! 1. `lode build` a real tree (/usr/lib/python3.11), push it;
//! 2. mount it cold with `--record-trace`, read a fixed set of ~200 files, `lode umount`;
//! 3. `lode build --prefetch TRACE` the same tree, push it;
//! 4. mount that cold (fresh cache), read the same files.
//!
//! Asserts the trace names the files read (in the order read), the second run's reads waited
//! for far fewer requests (< 20% of the first run's) and read the same bytes; prints both
//! runs side by side (time, misses, requests through the proxy, bytes fetched).
//!
//! Every mount is unmounted and its processes stopped by PID, also when a test fails
//! ([`Mounted`]'s Drop); each test has its own `LODE_RUN_DIR` and caches.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lode_registry::testing::TestRegistry;
use lode_testkit::cmd::run;
use lode_testkit::faultproxy::FaultProxy;
use lode_testkit::mount::{is_mounted, require_erofs, require_fuse, require_root, MountGuard};
use lode_testkit::procs::{alive, children, kill9};

const SOURCE: &str = "/usr/lib/python3.11";
const WORKLOAD_FILES: usize = 200;
const LATENCY: Duration = Duration::from_millis(20);

fn lode(run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lode"));
    c.env("LODE_RUN_DIR", run_dir)
        // Never through a daemon someone else runs on this machine.
        .env("LODE_SOCKET", run_dir.join("no-daemon.sock"))
        .env("RUST_LOG", "info");
    c
}

/// A `lode mount`; on drop (a failed test): `lode umount`, SIGKILL of the server and its
/// workers by PID, then a lazy unmount if anything is left.
struct Mounted {
    mnt: PathBuf,
    run_dir: PathBuf,
    pid: u32,
    done: bool,
}

impl Mounted {
    fn mount(
        run_dir: &Path,
        mode: &str,
        image: &str,
        mnt: &Path,
        cache: &Path,
        extra: &[&str],
    ) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
        let out = run(lode(run_dir)
            .args([
                "mount",
                "--json",
                "--plain-http",
                "--mode",
                mode,
                "--cache-dir",
            ])
            .arg(cache)
            .args(extra)
            .arg(image)
            .arg(mnt));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = Mounted {
            mnt: std::fs::canonicalize(mnt).unwrap(),
            run_dir: run_dir.to_path_buf(),
            pid: v["pid"].as_u64().unwrap() as u32,
            done: false,
        };
        assert!(is_mounted(&m.mnt), "{v}");
        m
    }

    /// The mode's own counters (`lode status --json`).
    fn detail(&self) -> serde_json::Value {
        let out = run(lode(&self.run_dir)
            .args(["status", "--json"])
            .arg(&self.mnt));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let v = if v.is_array() { v[0].clone() } else { v };
        v["detail"].clone()
    }

    fn umount(mut self) {
        let procs: Vec<u32> = std::iter::once(self.pid)
            .chain(children(self.pid))
            .collect();
        run(lode(&self.run_dir).arg("umount").arg(&self.mnt));
        self.done = true;
        assert!(!is_mounted(&self.mnt));
        let deadline = Instant::now() + Duration::from_secs(15);
        while procs.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in procs {
            assert!(!alive(p), "process {p} of the mount is still running");
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let procs: Vec<u32> = std::iter::once(self.pid)
            .chain(children(self.pid))
            .collect();
        let _ = lode(&self.run_dir)
            .arg("umount")
            .arg(&self.mnt)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        for p in procs {
            if alive(p) {
                kill9(p);
            }
        }
        if is_mounted(&self.mnt) {
            drop(MountGuard::new(&self.mnt));
        }
    }
}

/// Regular files of `root` bigger than 4 KiB (so never inline in the bootstrap), by path.
fn big_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.metadata().unwrap().len() > 4096 {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// ~200 files spread over the tree, in a fixed (not path-sorted) order.
fn workload(root: &Path) -> Vec<PathBuf> {
    let all = big_files(root);
    assert!(
        all.len() >= WORKLOAD_FILES,
        "{} has too few files",
        root.display()
    );
    let step = all.len() / WORKLOAD_FILES;
    let mut picked: Vec<PathBuf> = all.into_iter().step_by(step).take(WORKLOAD_FILES).collect();
    // An order a program might read them in: not the image's layout order.
    picked.sort_by_key(|p| digest(p.as_os_str().as_encoded_bytes()));
    picked
}

/// A content digest (the tests compare contents; no attacker).
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Reads every file of `files` under `mnt` whole; returns (elapsed, digest per file).
fn read_all(mnt: &Path, files: &[PathBuf]) -> (Duration, Vec<u64>) {
    let t = Instant::now();
    let hashes = files
        .iter()
        .map(|f| {
            digest(&std::fs::read(mnt.join(f)).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        })
        .collect();
    (t.elapsed(), hashes)
}

struct Run {
    time: Duration,
    misses: u64,
    foreground_requests: u64,
    requests: u64,
    bytes: u64,
    hashes: Vec<u64>,
}

/// Misses (reads that waited for a fetch), requests sent for them, and bytes fetched, from
/// the mode's counters.
fn counters(mode: &str, d: &serde_json::Value) -> (u64, u64, u64) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("no counter in {d}"));
    match mode {
        "fanotify" => (
            n(&d["fetch"]["misses"]),
            n(&d["worker_fetch"]["foreground_requests"]),
            n(&d["fetch"]["bytes_fetched"]),
        ),
        _ => (
            n(&d["fetch_misses"]),
            n(&d["fetch_foreground_requests"]),
            n(&d["fetch_bytes"]),
        ),
    }
}

/// Mounts `image` cold, reads `files`, unmounts.
fn measured_run(
    w: &Path,
    name: &str,
    mode: &str,
    image: &str,
    proxy: &FaultProxy,
    files: &[PathBuf],
    extra: &[&str],
) -> Run {
    let run_dir = w.join("run");
    let before = proxy.handle().requests();
    let m = Mounted::mount(
        &run_dir,
        mode,
        image,
        &w.join(format!("mnt-{name}")),
        &w.join(format!("cache-{name}")),
        extra,
    );
    let (time, hashes) = read_all(&m.mnt, files);
    // Counters are published every 200-250 ms.
    std::thread::sleep(Duration::from_millis(700));
    let (misses, foreground_requests, bytes) = counters(mode, &m.detail());
    let requests = proxy.handle().requests() - before;
    m.umount();
    Run {
        time,
        misses,
        foreground_requests,
        requests,
        bytes,
        hashes,
    }
}

fn trace_then_prefetch(mode: &str) {
    require_root();
    let src = Path::new(SOURCE);
    if !src.is_dir() {
        panic!("{SOURCE} is missing (python3.11 is part of the test machine's setup)");
    }
    let w = tempfile::Builder::new()
        .prefix(&format!("lode-trace-{mode}-"))
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = w.path();
    let run_dir = w.join("run");
    let files = workload(src);

    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.addr());
    proxy.handle().set_latency(LATENCY);
    let push = |img: &Path, tag: &str| {
        run(lode(&run_dir)
            .args(["push", "--plain-http"])
            .arg(img)
            .arg(format!("{}/trace/py:{tag}", registry.addr())));
        format!("{}/trace/py:{tag}", proxy.addr())
    };

    // 1. The plain image, and a run that records a trace.
    run(lode(&run_dir)
        .arg("build")
        .arg(src)
        .arg("-o")
        .arg(w.join("img1")));
    let plain = push(&w.join("img1"), "plain");
    let trace = w.join("trace.txt");
    let trace_arg = trace.to_str().unwrap().to_string();
    let first = measured_run(
        w,
        "1",
        mode,
        &plain,
        &proxy,
        &files,
        &["--record-trace", &trace_arg],
    );

    // The trace names what was read, in the order read.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut traced: Vec<String> = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let p = lode_format::trace::parse_line(line.as_bytes())
            .unwrap()
            .unwrap()
            .0;
        let p = String::from_utf8(p.to_vec()).unwrap();
        if traced.last() != Some(&p) {
            traced.push(p);
        }
    }
    let pos: HashMap<&str, usize> = traced
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    // A file whose data another file of the image has too (deduplicated) may be traced
    // under that file's name.
    let by_content: HashMap<u64, &str> = traced
        .iter()
        .filter_map(|p| Some((digest(&std::fs::read(src.join(&p[1..])).ok()?), p.as_str())))
        .collect();
    let mut order = Vec::new();
    for f in &files {
        let name = format!("/{}", f.display());
        let at = pos.get(name.as_str()).copied().or_else(|| {
            let h = digest(&std::fs::read(src.join(f)).unwrap());
            by_content.get(&h).and_then(|p| pos.get(p).copied())
        });
        let at = at.unwrap_or_else(|| panic!("{name} was read but is not in the trace:\n{text}"));
        order.push(at);
    }
    let inversions = order.windows(2).filter(|p| p[0] >= p[1]).count();
    assert!(
        inversions <= WORKLOAD_FILES / 50,
        "the trace is not in the order the files were read ({inversions} inversions)"
    );
    let distinct: HashSet<&String> = traced.iter().collect();
    assert_eq!(
        distinct.len(),
        traced.len(),
        "a file's lines are not together:\n{text}"
    );

    // 2. The image with the trace as its prefetch list, mounted cold.
    let out = run(lode(&run_dir)
        .arg("build")
        .arg(src)
        .arg("-o")
        .arg(w.join("img2"))
        .arg("--prefetch")
        .arg(&trace));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.join("img2/image.json")).unwrap()).unwrap();
    assert!(
        manifest["prefetch"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "no prefetch list in the image"
    );
    let prefetched = push(&w.join("img2"), "prefetch");
    let second = measured_run(w, "2", mode, &prefetched, &proxy, &files, &[]);

    assert_eq!(
        first.hashes, second.hashes,
        "the two runs read different bytes"
    );
    let want: Vec<u64> = files
        .iter()
        .map(|f| digest(&std::fs::read(src.join(f)).unwrap()))
        .collect();
    assert_eq!(
        first.hashes, want,
        "the mount read other bytes than the source has"
    );

    eprintln!(
        "\n{mode}: {} files of {SOURCE}, {} ms per request\n\
         {:<34} {:>12} {:>12}\n\
         {:<34} {:>12.0} {:>12.0}\n\
         {:<34} {:>12} {:>12}\n\
         {:<34} {:>12} {:>12}\n\
         {:<34} {:>12} {:>12}\n\
         {:<34} {:>12.1} {:>12.1}\n",
        files.len(),
        LATENCY.as_millis(),
        "",
        "no prefetch",
        "trace prefetch",
        "workload time (ms)",
        first.time.as_secs_f64() * 1000.0,
        second.time.as_secs_f64() * 1000.0,
        "reads that waited for a fetch",
        first.misses,
        second.misses,
        "requests the reads waited for",
        first.foreground_requests,
        second.foreground_requests,
        "requests (mount + reads + prefetch)",
        first.requests,
        second.requests,
        "MB fetched",
        first.bytes as f64 / 1e6,
        second.bytes as f64 / 1e6,
    );
    assert!(
        second.foreground_requests * 5 < first.foreground_requests,
        "prefetch did not cut the requests reads wait for below 20%: {} -> {}",
        first.foreground_requests,
        second.foreground_requests
    );
    assert!(
        second.misses * 2 < first.misses,
        "prefetch did not halve the reads that wait: {} -> {}",
        first.misses,
        second.misses
    );
    assert!(
        second.time < first.time,
        "prefetch made the workload slower"
    );
}

#[test]
fn fanotify_trace_then_prefetch() {
    require_root();
    require_erofs();
    trace_then_prefetch("fanotify");
}

#[test]
fn fuse_trace_then_prefetch() {
    require_root();
    require_fuse();
    trace_then_prefetch("fuse");
}
