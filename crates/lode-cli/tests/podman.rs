//! A container whose rootfs is a lazy lode mount starts and exits 0 (issue 9): root, real
//! kernel mounts, real podman.
//!
//! 1. Fixture from the host, no network: a small rootfs with busybox and python3.11 (each
//!    with the libraries `ldd` names and the dynamic loader, at their host paths, symlinks
//!    such as Debian's `/lib -> usr/lib` kept), the python stdlib without tests and the
//!    static-library `config-*` dir, `/etc/passwd`, `/etc/group` and empty `/tmp`, `/dev`,
//!    `/proc`, `/sys`; `lode build --compress zstd`.
//! 2. `lode mount IMG MNT --mode fanotify` (second case: `--mode fuse`), private
//!    `LODE_RUN_DIR`, no daemon, an empty cache under /var/tmp.
//! 3. `podman run --rootfs MNT:O` (private podman storage) of python importing a set of
//!    stdlib modules, C extensions included, and of `busybox sh -c 'echo ok'`: both exit 0
//!    and print `ok`; the mount's counters (`lode status MNT --json`) show the runs fetched
//!    data lazily: more than before, less than the image's blobs.
//!
//! Cleanup on every path ([`Work`]'s Drop): podman's containers removed, the lode mount
//! unmounted and its processes stopped by PID, anything left mounted under the work dir
//! unmounted, then the work dir removed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lode_testkit::cmd::{command_line, run, run_stdout, try_run};
use lode_testkit::mount::{is_mounted, require_erofs, require_fuse, require_root, MountGuard};
use lode_testkit::procs::{alive, children, kill9};

/// Stdlib modules the python workload imports; their C extensions' libraries are in the
/// fixture (`_sqlite3`: libsqlite3, `_hashlib`/`_ssl`: libcrypto/libssl, `_decimal`, …).
const IMPORTS: &str = "json, http.client, email, sqlite3, asyncio, decimal, hashlib, \
                       xml.dom.minidom, urllib.request, logging, argparse";

fn lode(run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lode"));
    c.env("LODE_RUN_DIR", run_dir)
        // Never through a daemon someone else runs on this machine.
        .env("LODE_SOCKET", run_dir.join("no-daemon.sock"));
    c
}

/// `podman` with storage, run root and tmp dir private to the work dir `w` (short names:
/// podman refuses a run root longer than 50 characters).
///
/// This machine has hybrid cgroups (v1 controllers plus a cgroup2 mount at
/// /sys/fs/cgroup/unified), which crun refuses even with `--cgroups=disabled` ("cgroups in
/// hybrid mode not supported, drop all controllers from cgroupv2"). Where that mount exists,
/// podman runs in a private mount namespace without it (`unshare -m`, private propagation:
/// the host keeps its mount, and podman's own overlay mounts stay in that namespace and
/// vanish with it). On a pure cgroup2 (or pure v1) machine podman runs directly.
fn podman(w: &Path) -> Command {
    let mut c = if is_mounted(Path::new("/sys/fs/cgroup/unified")) {
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(r#"umount /sys/fs/cgroup/unified && exec "$0" "$@""#)
            .arg("podman");
        c
    } else {
        Command::new("podman")
    };
    c.arg("--root")
        .arg(w.join("p/root"))
        .arg("--runroot")
        .arg(w.join("p/run"))
        .arg("--tmpdir")
        .arg(w.join("p/tmp"))
        .args(["--events-backend", "none"]);
    c
}

/// `podman run` of `cmd` in a container whose rootfs is `rootfs` with a writable overlay
/// on top (`:O`), no network, no cgroups. The limits are explicit and below this machine's
/// hard limits: `--ulimit host` fails (crun's setrlimit(RLIMIT_NOFILE) gets EPERM).
fn podman_run(w: &Path, rootfs: &Path, cmd: &[&str]) -> Command {
    let mut c = podman(w);
    c.args([
        "run",
        "--rm",
        "--network=none",
        "--cgroups=disabled",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--rootfs",
    ])
    .arg(format!("{}:O", rootfs.display()))
    .args(cmd);
    c
}

/// Fails (never skips) when podman is not installed.
fn require_podman() {
    match Command::new("podman")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("podman --version failed: {o:?}"),
        Err(e) => panic!(
            "podman is not usable ({e}); scripts/setup.sh installs it (Debian package podman)"
        ),
    }
}

/// The mount points below `dir` (deepest first), from /proc/self/mountinfo. The work dir's
/// name has no character mountinfo escapes.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(PathBuf::from)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// The test's work dir under /var/tmp and everything started in it; Drop cleans up whatever
/// state the test ended in.
struct Work {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    run_dir: PathBuf,
    /// The lode mount and its serving process, while mounted.
    mount: Option<(PathBuf, u32)>,
}

impl Work {
    fn new(prefix: &str) -> Work {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .unwrap();
        let path = fs::canonicalize(dir.path()).unwrap();
        let run_dir = path.join("run");
        fs::create_dir(&run_dir).unwrap();
        Work {
            dir: Some(dir),
            path,
            run_dir,
            mount: None,
        }
    }

    fn lode(&self) -> Command {
        lode(&self.run_dir)
    }

    fn mount(&mut self, img: &Path, mode: &str) -> PathBuf {
        let mnt = self.path.join("mnt");
        fs::create_dir(&mnt).unwrap();
        let out = run(self
            .lode()
            .args(["mount", "--json", "--mode", mode, "--cache-dir"])
            .arg(self.path.join("cache"))
            .arg(img)
            .arg(&mnt));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        self.mount = Some((mnt.clone(), v["pid"].as_u64().unwrap() as u32));
        assert!(is_mounted(&mnt), "{v}");
        assert_eq!(v["mode"], mode, "{v}");
        mnt
    }

    /// `lode status MNT --json`: `stats.bytes_fetched`.
    fn bytes_fetched(&self) -> u64 {
        let (mnt, _) = self.mount.as_ref().unwrap();
        let out = run(self.lode().args(["status", "--json"]).arg(mnt));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["state"], "serving", "{v}");
        v["stats"]["bytes_fetched"].as_u64().unwrap()
    }

    /// `lode umount`; the serving processes exit.
    fn umount(&mut self) {
        let (mnt, pid) = self.mount.take().unwrap();
        let procs: Vec<u32> = std::iter::once(pid).chain(children(pid)).collect();
        run(self.lode().arg("umount").arg(&mnt));
        assert!(!is_mounted(&mnt));
        let deadline = Instant::now() + Duration::from_secs(15);
        while procs.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in procs {
            assert!(!alive(p), "process {p} of the mount is still running");
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if self.path.join("p/root").exists() {
            quiet(podman(&self.path).args(["rm", "-af"]));
        }
        if let Some((mnt, pid)) = self.mount.take() {
            let procs: Vec<u32> = std::iter::once(pid).chain(children(pid)).collect();
            quiet(self.lode().arg("umount").arg(&mnt));
            for p in procs {
                if alive(p) {
                    kill9(p);
                }
            }
            if is_mounted(&mnt) {
                drop(MountGuard::new(&mnt)); // umount, retried; then umount -l
            }
        }
        // Podman run without the namespace workaround may leave overlay mounts in its storage.
        for m in mounts_under(&self.path) {
            drop(MountGuard::new(&m));
        }
        let left = mounts_under(&self.path);
        if left.is_empty() {
            drop(self.dir.take());
        } else {
            let kept = self.dir.take().unwrap().keep();
            eprintln!(
                "leaving {} (still mounted below it: {left:?})",
                kept.display()
            );
        }
    }
}

/// Lexically resolves `.` and `..` (the path has no symlinks left to make that wrong).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Copies the host's absolute path `p` into `root` at the same path: each directory on the
/// way is created (with the host's mode), each symlink on the way is recreated as it is and
/// followed, so the path resolves inside `root` as it does on the host (Debian's
/// `/lib64 -> usr/lib64`, `/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/…`). Files
/// already copied are left alone.
fn copy_host(root: &Path, p: &Path) {
    let comps: Vec<Component> = p.components().skip(1).collect();
    let mut host = PathBuf::from("/");
    for (i, c) in comps.iter().enumerate() {
        let next = host.join(c);
        let dst = root.join(next.strip_prefix("/").unwrap());
        let meta =
            fs::symlink_metadata(&next).unwrap_or_else(|e| panic!("{}: {e}", next.display()));
        let exists = fs::symlink_metadata(&dst).is_ok();
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&next).unwrap();
            if !exists {
                std::os::unix::fs::symlink(&target, &dst).unwrap();
            }
            let mut resolved = host.join(&target); // an absolute target replaces `host`
            resolved.extend(&comps[i + 1..]);
            return copy_host(root, &normalize(&resolved));
        }
        if !exists {
            if meta.is_dir() {
                fs::create_dir(&dst).unwrap();
                fs::set_permissions(&dst, meta.permissions()).unwrap();
            } else {
                fs::copy(&next, &dst).unwrap_or_else(|e| panic!("{}: {e}", next.display()));
            }
        }
        host = next;
    }
}

/// [`copy_host`] of the directory `dir` and everything below it, except directories named
/// in `skip` (or starting with `config-`).
fn copy_host_tree(root: &Path, dir: &Path, skip: &[&str]) {
    copy_host(root, dir);
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if e.file_type().unwrap().is_dir() {
            if !skip.contains(&name.as_ref()) && !name.starts_with("config-") {
                copy_host_tree(root, &e.path(), skip);
            }
        } else {
            copy_host(root, &e.path());
        }
    }
}

/// The shared libraries and the loader `ldd` names for `bin`.
fn ldd(bin: &Path) -> Vec<PathBuf> {
    run_stdout(Command::new("ldd").arg(bin))
        .split_whitespace()
        .filter(|t| t.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Copies `bin` and everything it loads.
fn copy_binary(root: &Path, bin: &Path) {
    copy_host(root, bin);
    for lib in ldd(bin) {
        copy_host(root, &lib);
    }
}

/// The fixture rootfs (see the module doc).
fn make_rootfs(root: &Path) {
    fs::create_dir(root).unwrap();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    copy_binary(root, Path::new("/bin/busybox"));
    copy_binary(root, Path::new("/usr/bin/python3.11"));
    // Without test suites, IDLE, site-packages, bytecode caches and config-3.11-*/ (25 MB of
    // static library).
    copy_host_tree(
        root,
        Path::new("/usr/lib/python3.11"),
        &["test", "idlelib", "site-packages", "__pycache__"],
    );
    for so in fs::read_dir("/usr/lib/python3.11/lib-dynload").unwrap() {
        for lib in ldd(&so.unwrap().path()) {
            copy_host(root, &lib);
        }
    }
    copy_host(root, Path::new("/etc/passwd"));
    copy_host(root, Path::new("/etc/group"));
    for (d, mode) in [
        ("tmp", 0o1777),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
    ] {
        fs::create_dir(root.join(d)).unwrap();
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Compressed bytes of the image's blobs (image.json).
fn blob_bytes(img: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(img.join("image.json")).unwrap()).unwrap();
    v["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["size"].as_u64().unwrap())
        .sum()
}

/// `podman run` of `cmd` on `rootfs`: exits 0 and prints `ok`. Returns how long it took.
fn run_ok(w: &Path, rootfs: &Path, cmd: &[&str]) -> Duration {
    let mut c = podman_run(w, rootfs, cmd);
    let t0 = Instant::now();
    let out = try_run(&mut c);
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "ok"),
        "{}\nstatus: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        command_line(&c),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// `bytes_fetched` once it has grown past `before` (fanotify's counters are published
/// every 250 ms), after a last settling pause.
fn fetched_after(work: &Work, before: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while work.bytes_fetched() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(600));
    work.bytes_fetched()
}

fn podman_runs_on_a_lazy_mount(mode: &str) {
    require_root();
    require_erofs();
    require_podman();
    let mut work = Work::new(&format!("lode-podman-{mode}-"));
    let w = work.path.clone();

    let t0 = Instant::now();
    let rootfs = w.join("rootfs");
    make_rootfs(&rootfs);
    let img = w.join("img");
    run(work
        .lode()
        .args(["build", "--compress", "zstd"])
        .arg(&rootfs)
        .arg("-o")
        .arg(&img));
    let total = blob_bytes(&img);
    let built = t0.elapsed();

    let t0 = Instant::now();
    let mnt = work.mount(&img, mode);
    let mounted = t0.elapsed();
    let before = work.bytes_fetched();

    let script = format!(
        "import {IMPORTS}\n\
         db = sqlite3.connect(':memory:')\n\
         assert db.execute('select 40 + 2').fetchone() == (42,)\n\
         assert hashlib.sha256(b'').hexdigest().startswith('e3b0c442')\n\
         assert json.loads(json.dumps({{'d': str(decimal.Decimal('1.1') * 2)}})) == {{'d': '2.2'}}\n\
         print('ok')"
    );
    let py = run_ok(&w, &mnt, &["/usr/bin/python3.11", "-c", &script]);
    let after_py = fetched_after(&work, before);
    let sh = run_ok(&w, &mnt, &["/bin/busybox", "sh", "-c", "echo ok"]);
    let after = work.bytes_fetched();

    eprintln!(
        "{mode}: fixture + build {built:.2?}, blobs {total} bytes; mount {mounted:.2?}; \
         podman python {py:.2?}, busybox {sh:.2?}; fetched {before} bytes before the runs, \
         {after_py} after python, {after} after busybox ({:.1}% of the blobs)",
        after as f64 * 100.0 / total as f64
    );
    assert!(
        after_py > before,
        "the python run fetched nothing: {before} -> {after_py}"
    );
    assert!(
        after < total,
        "fetched {after} bytes, not less than the image's {total} blob bytes: not lazy"
    );
    work.umount();
}

#[test]
fn podman_runs_python_and_busybox_on_a_fanotify_mount() {
    podman_runs_on_a_lazy_mount("fanotify");
}

#[test]
fn podman_runs_python_and_busybox_on_a_fuse_mount() {
    require_fuse();
    podman_runs_on_a_lazy_mount("fuse");
}
