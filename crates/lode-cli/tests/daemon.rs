//! `lode daemon` end to end over its unix socket: mounts in several modes made through the
//! API and through `lode mount`, listed with their counters, `/metrics` scraped and parsed,
//! errors named, a daemon restart that leaves the mounts serving, and a worker upgrade onto a
//! replaced binary while readers keep checking every byte.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_testkit::cmd::run;
use lode_testkit::compare::assert_same_tree;
use lode_testkit::mount::{is_mounted, require_erofs, require_fuse, require_root};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

/// A daemon on a private socket and run directory, stopped by PID when dropped; every mount
/// listed in `mounts` is unmounted first.
struct Daemon {
    exe: PathBuf,
    socket: PathBuf,
    run_dir: PathBuf,
    child: Option<Child>,
    mounts: Vec<PathBuf>,
}

impl Daemon {
    fn start(exe: &Path, work: &Path) -> Daemon {
        let mut d = Daemon {
            exe: exe.to_path_buf(),
            socket: work.join("lode.sock"),
            run_dir: work.join("run"),
            child: None,
            mounts: Vec::new(),
        };
        d.spawn(work);
        d
    }

    fn spawn(&mut self, work: &Path) {
        self.spawn_with(work, &[]);
    }

    fn spawn_with(&mut self, work: &Path, extra: &[&std::ffi::OsStr]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join("daemon.log"))
            .unwrap();
        let child = Command::new(&self.exe)
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--cache-dir")
            .arg(work.join("cache"))
            .args(extra)
            .env("LODE_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon process only (mounts stay).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("the daemon did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn lode(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.env("LODE_SOCKET", &self.socket)
            .env("LODE_RUN_DIR", &self.run_dir);
        c
    }

    /// One request; (status, JSON or text body).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        lode_daemon::client::Client::connect(&self.socket)
            .expect("the daemon listens")
            .raw(method, path, body, Duration::from_secs(120))
            .unwrap()
    }

    fn json(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let (code, text) = self.call(method, path, body);
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            if is_mounted(m) {
                let _ = self.lode().arg("umount").arg("--no-daemon").arg(m).status();
            }
            if is_mounted(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        self.stop();
    }
}

/// Parses the Prometheus text format strictly enough to catch a malformed page:
/// `name{labels} value` lines, `# HELP/TYPE/EOF` comments. Returns samples by name + labels.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name_end = key.find('{').unwrap_or(key.len());
        let name = &key[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < key.len() {
            assert!(key.ends_with('}'), "bad labels in {line:?}");
        }
        let v: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"))
        };
        out.insert(key.to_string(), v);
    }
    out
}

fn sum_of(m: &HashMap<String, f64>, name: &str, label: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

fn query(mnt: &Path) -> String {
    lode_daemon::client::mountpoint_query(mnt)
}

fn work_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn build_image(w: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let src = w.join(format!("src{seed}"));
    std::fs::create_dir(&src).unwrap();
    materialize(&sample_tree(TreeParams::small(), seed), &src).unwrap();
    let img = w.join(format!("img{seed}"));
    run(Command::new(env!("CARGO_BIN_EXE_lode"))
        .args(["build", "--compress", "zstd"])
        .arg(&src)
        .arg("-o")
        .arg(&img));
    (src, img)
}

#[test]
fn api_mounts_lists_scrapes_and_names_errors() {
    require_root();
    require_erofs();
    require_fuse();
    let work = work_dir("lode-daemon-api-");
    let w = work.path();
    let (src, img) = build_image(w, 11);
    let mut d = Daemon::start(Path::new(env!("CARGO_BIN_EXE_lode")), w);

    // The socket is root's only.
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    // One mount through the API, one through `lode mount` (which finds the daemon).
    let fan = w.join("fan");
    let fuse = w.join("fuse");
    std::fs::create_dir(&fan).unwrap();
    std::fs::create_dir(&fuse).unwrap();
    d.mounts.push(fan.clone());
    d.mounts.push(fuse.clone());
    let body = serde_json::json!({"image": img, "mountpoint": fan}).to_string();
    let (code, text) = d.call("POST", "/v1/mounts", Some(&body));
    assert_eq!(code, 201, "{text}");
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["mode"], "fanotify", "auto mode on this kernel: {m}");
    assert!(m["chosen_because"]
        .as_str()
        .unwrap()
        .contains("pre-content"));
    let out = run(d
        .lode()
        .arg("mount")
        .arg(&img)
        .arg(&fuse)
        .args(["--mode", "fuse"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(fuse; supervisor pid"),
        "{out:?}"
    );
    // The daemon made it: its record is in the daemon's run dir.
    assert!(std::fs::read_dir(&d.run_dir).unwrap().count() > 0);

    assert_same_tree(&src, &fan);
    assert_same_tree(&src, &fuse);
    std::thread::sleep(Duration::from_millis(600)); // fanotify stats: every 250 ms

    // List: both, with mode, image, state and counters.
    let list = d.json("GET", "/v1/mounts", None);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    for e in list {
        assert_eq!(e["state"], "serving", "{e}");
        assert_eq!(e["image"], img.to_str().unwrap());
        assert!(e["stats"]["bytes_fetched"].as_u64().unwrap() > 0, "{e}");
        assert!(e["stats"]["requests"].as_u64().unwrap() > 0, "{e}");
    }
    let ls = run(d.lode().args(["ls", "--json"]));
    let ls: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let st = run(d.lode().arg("status").arg(&fan).arg("--json"));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["mode"], "fanotify");
    assert!(
        st["stats"]["events"]["events"].as_u64().unwrap() > 0,
        "{st}"
    );
    let table = run(d.lode().arg("status"));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("fanotify") && table.contains("fuse"),
        "{table}"
    );

    // Metrics: well-formed, and they say what the list says.
    let (code, text) = d.call("GET", "/metrics", None);
    assert_eq!(code, 200);
    let metrics = parse_metrics(&text);
    assert_eq!(metrics["lode_mounts{mode=\"fanotify\"}"], 1.0);
    assert_eq!(metrics["lode_mounts{mode=\"fuse\"}"], 1.0);
    let fan_label = format!("mountpoint=\"{}\"", fan.display());
    assert!(
        sum_of(&metrics, "lode_fetch_bytes_total", &fan_label) > 0.0,
        "{text}"
    );
    assert!(
        sum_of(&metrics, "lode_fetch_requests_total", "mode=\"fuse\"") > 0.0,
        "{text}"
    );
    assert!(
        sum_of(&metrics, "lode_kernel_events_total", "kind=\"events\"") > 0.0,
        "{text}"
    );
    assert!(
        sum_of(&metrics, "lode_kernel_events_total", "kind=\"read\"") > 0.0,
        "{text}"
    );
    assert!(
        sum_of(&metrics, "lode_fetch_latency_seconds_count", &fan_label) > 0.0,
        "latency histogram: {text}"
    );
    assert!(metrics["lode_cache_disk_bytes"] > 0.0);
    assert_eq!(metrics["lode_cache_blobs_in_use"], 1.0);
    let cache = d.json("GET", "/v1/cache", None);
    assert_eq!(cache["summary"]["blobs"], 1, "{cache}");

    // Errors: clear, with the right status, never a hang or a crash.
    let (code, text) = d.call("POST", "/v1/mounts", Some("{not json"));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("mount request"), "{text}");
    let (code, text) = d.call(
        "POST",
        "/v1/mounts",
        Some(r#"{"image":"/x","mountpoint":"/tmp","speed":"fast"}"#),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("speed"), "unknown field named: {text}");
    let missing = w.join("no-such-image");
    let spare = w.join("spare");
    std::fs::create_dir(&spare).unwrap();
    d.mounts.push(spare.clone());
    let body =
        serde_json::json!({"image": missing, "mountpoint": spare, "mode": "fanotify"}).to_string();
    let (code, text) = d.call("POST", "/v1/mounts", Some(&body));
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("no-such-image"), "names the image: {text}");
    let (code, text) = d.call(
        "POST",
        "/v1/mounts",
        Some(&serde_json::json!({"image": img, "mountpoint": fan}).to_string()),
    );
    assert!(code >= 400 && text.contains("already"), "{code} {text}");
    let (code, text) = d.call("DELETE", &format!("/v1/mounts?{}", query(&spare)), None);
    assert_eq!(code, 404, "{text}");
    let (code, _) = d.call("GET", "/v1/nothing", None);
    assert_eq!(code, 404);
    let (code, text) = d.call(
        "POST",
        &format!("/v1/mounts/prefetch?{}", query(&fuse)),
        None,
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("fanotify"), "{text}");
    let fail = d.lode().arg("status").arg(&spare).output().unwrap();
    assert!(!fail.status.success());
    assert!(
        String::from_utf8_lossy(&fail.stderr).contains("not a lode mount"),
        "{fail:?}"
    );

    // Prefetch on demand: the whole image ends up cached.
    d.json(
        "POST",
        &format!("/v1/mounts/prefetch?{}", query(&fan)),
        Some("{\"rate\":0}"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.json("GET", &format!("/v1/mounts/status?{}", query(&fan)), None);
        if s["stats"]["prefetch"] == "done" {
            assert_eq!(s["stats"]["chunks"], s["stats"]["chunks_present"], "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "prefetch did not finish: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Unmount through the API and through `lode umount`; nothing left serving.
    let pid_fan = d.json("GET", &format!("/v1/mounts/status?{}", query(&fan)), None)["pid"]
        .as_u64()
        .unwrap();
    d.json("DELETE", &format!("/v1/mounts?{}", query(&fan)), None);
    run(d.lode().arg("umount").arg(&fuse));
    assert!(!is_mounted(&fan) && !is_mounted(&fuse));
    assert!(d
        .json("GET", "/v1/mounts", None)
        .as_array()
        .unwrap()
        .is_empty());
    // Its supervisor exited and was reaped (no zombie left behind by the daemon).
    assert!(
        !Path::new(&format!("/proc/{pid_fan}")).exists(),
        "supervisor {pid_fan} left"
    );
}

/// Reads every file of `src`'s mirror under `mnt` in a loop and counts wrong bytes / errors.
fn start_readers(
    src: &Path,
    mnts: &[PathBuf],
    stop: Arc<AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
    let mut files = Vec::new();
    for e in walk(src) {
        files.push((
            e.strip_prefix(src).unwrap().to_path_buf(),
            std::fs::read(&e).unwrap(),
        ));
    }
    let files = Arc::new(files);
    let bad = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let handles = mnts
        .iter()
        .map(|m| {
            let (m, files, stop, bad, reads) = (
                m.clone(),
                files.clone(),
                stop.clone(),
                bad.clone(),
                reads.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (rel, want) in files.iter() {
                        match std::fs::read(m.join(rel)) {
                            Ok(got) if &got == want => {}
                            other => {
                                eprintln!(
                                    "{}: {:?}",
                                    m.join(rel).display(),
                                    other.map(|g| g.len())
                                );
                                bad.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    (handles, bad, reads)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

fn exe_of(pid: u64) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn daemon_restart_and_worker_upgrade_keep_mounts_serving() {
    require_root();
    require_erofs();
    require_fuse();
    let work = work_dir("lode-daemon-upgrade-");
    let w = work.path();
    let (src, img) = build_image(w, 12);
    // The daemon runs from a copy of the binary that the test then replaces, as a package
    // upgrade does (new file renamed over the old path).
    let bin = w.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = bin.join("lode");
    std::fs::copy(env!("CARGO_BIN_EXE_lode"), &exe).unwrap();
    let mut d = Daemon::start(&exe, w);
    let fan = w.join("fan");
    let fuse = w.join("fuse");
    std::fs::create_dir(&fan).unwrap();
    std::fs::create_dir(&fuse).unwrap();
    d.mounts.push(fan.clone());
    d.mounts.push(fuse.clone());
    run(d
        .lode()
        .arg("mount")
        .arg(&img)
        .arg(&fan)
        .args(["--mode", "fanotify"]));
    run(d
        .lode()
        .arg("mount")
        .arg(&img)
        .arg(&fuse)
        .args(["--mode", "fuse", "--no-passthrough"]));

    let stop = Arc::new(AtomicBool::new(false));
    let (readers, bad, reads) = start_readers(&src, &[fan.clone(), fuse.clone()], stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    // 1. The daemon stops: the mounts keep serving; a new daemon finds them.
    d.stop();
    let before = reads.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        reads.load(Ordering::Relaxed) > before,
        "reads stalled without the daemon"
    );
    d.spawn(w);
    let list = d.json("GET", "/v1/mounts", None);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "serving"),
        "{list}"
    );

    // 2. A new binary replaces the old one; the workers move onto it.
    let workers = |d: &Daemon| -> Vec<u64> {
        std::thread::sleep(Duration::from_millis(400));
        d.json("GET", "/v1/mounts", None)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["stats"]["worker_pid"].as_u64().unwrap())
            .collect()
    };
    let old = workers(&d);
    for &p in &old {
        assert!(!exe_of(p).ends_with("(deleted)"), "{}", exe_of(p));
    }
    let staged = bin.join("lode.new");
    std::fs::copy(env!("CARGO_BIN_EXE_lode"), &staged).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    for &p in &old {
        assert!(
            exe_of(p).ends_with("(deleted)"),
            "old worker runs the replaced file"
        );
    }
    let up = d.json("POST", "/v1/upgrade", None);
    for m in up["mounts"].as_array().unwrap() {
        assert!(m["error"].is_null(), "{up}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        let new = workers(&d);
        if new.iter().zip(&old).all(|(n, o)| n != o && *n != 0) {
            break new;
        }
        assert!(
            Instant::now() < deadline,
            "workers not replaced: {old:?} -> {new:?}"
        );
    };
    for &p in &new {
        let e = exe_of(p);
        assert!(e == exe.display().to_string(), "new worker {p} runs {e}");
    }
    let before = reads.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(
        reads.load(Ordering::Relaxed) > before,
        "reads stalled after the upgrade"
    );
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "wrong bytes or errors while upgrading"
    );
    let list = d.json("GET", "/v1/mounts", None);
    for e in list.as_array().unwrap() {
        assert!(e["stats"]["worker_restarts"].as_u64().unwrap() >= 1, "{e}");
    }
    eprintln!(
        "{} whole-file reads checked across daemon restart and worker upgrade, 0 wrong",
        reads.load(Ordering::Relaxed)
    );
    run(d.lode().arg("umount").arg(&fan));
    run(d.lode().arg("umount").arg(&fuse));
}

#[test]
fn config_file_sets_the_cache_limit_and_bad_configs_are_named() {
    require_root();
    require_erofs();
    let work = work_dir("lode-daemon-config-");
    let w = work.path();
    let (_, img_a) = build_image(w, 21);
    let (src_b, img_b) = build_image(w, 22);

    // A config with a mistake: the daemon refuses to start and names the key.
    let bad = w.join("bad.toml");
    std::fs::write(&bad, "cache_max_size = \"a lot\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lode"))
        .arg("daemon")
        .arg("--config")
        .arg(&bad)
        .arg("--socket")
        .arg(w.join("bad.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cache_max_size") && err.contains("bad.toml"),
        "{err}"
    );

    // A 1-byte cache limit: whatever no mount uses is evicted by the daemon's housekeeping;
    // the blob of a mounted image never is.
    let cfg = w.join("lode.toml");
    std::fs::write(&cfg, "cache_max_size = \"1\"\nlog = \"debug\"\n").unwrap();
    let mut d = Daemon {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_lode")),
        socket: w.join("lode.sock"),
        run_dir: w.join("run"),
        child: None,
        mounts: Vec::new(),
    };
    d.spawn_with(w, &[std::ffi::OsStr::new("--config"), cfg.as_os_str()]);
    let (a, b) = (w.join("a"), w.join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    d.mounts.push(a.clone());
    d.mounts.push(b.clone());
    run(d.lode().arg("mount").arg(&img_a).arg(&a));
    run(d.lode().arg("mount").arg(&img_b).arg(&b));
    assert_same_tree(&src_b, &b);
    walk(&a)
        .iter()
        .for_each(|f| drop(std::fs::read(f).unwrap()));
    run(d.lode().arg("umount").arg(&a));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cache = d.json("GET", "/v1/cache", None);
        let blobs = cache["blobs"].as_array().unwrap();
        if blobs.len() == 1 {
            assert_eq!(blobs[0]["in_use"], true, "{cache}");
            assert_eq!(cache["summary"]["max_size"], 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unused blob not evicted: {cache}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The mounted image still reads right after the eviction of the other one.
    assert_same_tree(&src_b, &b);
    let log = std::fs::read_to_string(w.join("daemon.log")).unwrap();
    assert!(log.contains("evicted unused blobs"), "{log}");
    assert!(log.contains("DEBUG"), "log level from the config: {log}");
    run(d.lode().arg("umount").arg(&b));
}
