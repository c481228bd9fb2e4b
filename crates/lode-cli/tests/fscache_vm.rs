//! `lode mount --mode fscache` for real: this machine's kernel has no cachefiles, so the
//! checks run inside the Linux 6.12 VM of `../shared/vm` (emulated; one boot runs them all,
//! see fscache_vm.sh): content and metadata through the daemon, blob sharing between two
//! images of one domain, cache reuse by a new daemon, kill -9 of the worker twice during a
//! read-heavy workload (0 errors), EIO on a fetch failure, bad `copen` answers refused.
//!
//! Needs root (trees with devices, owners and trusted xattrs; the VM's qemu) and the shared
//! directory (`$LODE_SHARED_DIR`, default `<repo>/../shared`): it fails, not skips, without.
//! The test binary doubles as the guest's tree lister: with `LODE_FSCACHE_LISTING=DIR:OUT`
//! it writes DIR's listing to OUT and returns.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lode_format::manifest::ImageManifest;
use lode_testkit::cmd::run;
use lode_testkit::mount::require_root;
use lode_testkit::tree::{materialize, EntryKind, FileData, Meta, TreeSpec};

/// PASS lines fscache_vm.sh prints when everything works.
const EXPECTED_CHECKS: usize = 30;

/// Longest the VM may run (boot + every check), so a hang fails the test instead of CI.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

fn shared_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LODE_SHARED_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// A listing line per entry: path, kind, mode, owner, mtime (ns), size and content hash,
/// symlink target, device number, hard-link group, xattrs. Sorted by raw name bytes.
fn listing(root: &Path) -> String {
    let mut out = String::new();
    let mut groups: HashMap<(u64, u64), String> = HashMap::new();
    walk(root, Path::new(""), &mut out, &mut groups);
    out
}

fn walk(root: &Path, rel: &Path, out: &mut String, groups: &mut HashMap<(u64, u64), String>) {
    let path = root.join(rel);
    let md = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let name = if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.as_os_str().as_bytes().escape_ascii().to_string()
    };
    let ft = md.file_type();
    let kind = match md.mode() & 0o170000 {
        0o040000 => "dir",
        0o100000 => "file",
        0o120000 => "symlink",
        0o020000 => "chr",
        0o060000 => "blk",
        0o010000 => "fifo",
        0o140000 => "sock",
        _ => "?",
    };
    let mut line = format!(
        "{name} {kind} {:o} {}:{} {}.{:09}",
        md.mode() & 0o7777,
        md.uid(),
        md.gid(),
        md.mtime(),
        md.mtime_nsec()
    );
    if ft.is_file() {
        let mut h = std::hash::DefaultHasher::new();
        let mut f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("reading {path:?}: {e}"));
            if n == 0 {
                break;
            }
            h.write(&buf[..n]);
        }
        line += &format!(" size={} hash={:016x}", md.size(), h.finish());
    } else if ft.is_symlink() {
        let t = std::fs::read_link(&path).unwrap();
        line += &format!(" -> {}", t.as_os_str().as_bytes().escape_ascii());
    } else if kind == "chr" || kind == "blk" {
        let r = md.rdev();
        let major = ((r >> 8) & 0xfff) | ((r >> 32) & !0xfff);
        let minor = (r & 0xff) | ((r >> 12) & !0xff);
        line += &format!(" rdev={major}:{minor}");
    }
    if !ft.is_dir() && md.nlink() > 1 {
        let first = groups
            .entry((md.dev(), md.ino()))
            .or_insert_with(|| name.clone());
        line += &format!(" links={} group={first}", md.nlink());
    }
    for (k, v) in lode_testkit::compare::read_xattrs(&path).unwrap() {
        line += &format!(" x:{}={}", k.escape_ascii(), hex(&v));
    }
    out.push_str(&line);
    out.push('\n');
    if ft.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            walk(root, &rel.join(n), out, groups);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn file(path: &str, size: u64, seed: u64) -> lode_testkit::tree::Entry {
    lode_testkit::tree::Entry {
        path: PathBuf::from(OsStr::from_bytes(path.as_bytes())),
        kind: EntryKind::File(FileData::random(size, seed)),
        meta: Meta::simple(0o644),
    }
}

fn dir(path: &str) -> lode_testkit::tree::Entry {
    lode_testkit::tree::Entry {
        path: PathBuf::from(path),
        kind: EntryKind::Dir,
        meta: Meta::simple(0o755),
    }
}

fn manifest(img: &Path) -> ImageManifest {
    serde_json::from_slice(&std::fs::read(img.join("image.json")).unwrap()).unwrap()
}

/// The trees and images the guest script expects in `work`.
fn prepare(work: &Path) {
    // A: every kind of entry and metadata edge case, plus ~10 MB of data files.
    let mut a = TreeSpec::kitchen_sink();
    a.entries.push(dir("data"));
    let sizes = [3 << 20, (5 << 20) / 2, (1 << 20) + 17, 700 << 10, 100_000];
    for (i, s) in sizes.iter().enumerate() {
        a.entries
            .push(file(&format!("data/f{i}"), *s, 100 + i as u64));
    }
    for i in 0..12 {
        a.entries
            .push(file(&format!("data/small{i:02}"), 5000 + 3000 * i, 200 + i));
    }
    // B: A plus new files; built with A as chunk dictionary, so B's first blob is A's.
    let mut b = a.clone();
    b.entries.push(dir("extra"));
    for i in 0..4 {
        b.entries
            .push(file(&format!("extra/g{i}"), 900_000 + 1000 * i, 300 + i));
    }
    // C: ~24 MB of fresh data in 24 files, for the read-heavy failover run.
    let mut c = TreeSpec {
        root: Meta::simple(0o755),
        entries: vec![dir("c")],
    };
    for i in 0..24u64 {
        c.entries.push(file(
            &format!("c/file{i:02}"),
            (512 << 10) + i * 40_000,
            400 + i,
        ));
    }
    // D: a file whose chunk gets corrupted in the blob, and an intact one.
    let d = TreeSpec {
        root: Meta::simple(0o755),
        entries: vec![file("bad", 300_000, 500), file("good", 200_000, 501)],
    };
    for (name, spec) in [("TA", &a), ("TB", &b), ("TC", &c), ("TD", &d)] {
        materialize(spec, &work.join(name)).unwrap();
    }
    let build = |src: &str, out: &Path, extra: &[&str]| {
        run(lode()
            .arg("build")
            .arg(work.join(src))
            .arg("-o")
            .arg(out)
            .args(extra));
    };
    build("TA", &work.join("A"), &[]);
    let a_dir = work.join("A");
    build(
        "TB",
        &work.join("B"),
        &["--chunk-dict", a_dir.to_str().unwrap()],
    );
    std::fs::create_dir_all(work.join("www")).unwrap();
    build("TC", &work.join("www/C"), &[]);
    build("TD", &work.join("D"), &[]);

    let (ma, mb) = (manifest(&work.join("A")), manifest(&work.join("B")));
    assert_eq!(ma.blobs.len(), 1);
    assert_eq!(
        mb.blobs.len(),
        2,
        "B should use A's blob plus one of its own"
    );
    assert_eq!(
        mb.blobs[0].digest, ma.blobs[0].digest,
        "B's first blob is A's"
    );
    // Corrupt the first chunk payload of D's blob ("bad" comes first).
    let md = manifest(&work.join("D"));
    let blob = work.join("D/blobs").join(md.blobs[0].hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    for b in &mut bytes[100..164] {
        *b ^= 0x5a;
    }
    std::fs::write(&blob, bytes).unwrap();
    std::fs::copy(work.join("TD/good"), work.join("D.good")).unwrap();

    std::fs::write(work.join("A.list"), listing(&work.join("TA"))).unwrap();
    std::fs::write(work.join("B.list"), listing(&work.join("TB"))).unwrap();
    let sums = run(Command::new("sh").current_dir(work.join("TC")).args([
        "-c",
        "find . -type f -print0 | sort -z | xargs -0 sha256sum",
    ]));
    std::fs::write(work.join("C.sums"), &sums.stdout).unwrap();
}

/// Runs `cmd` with a deadline; returns (exit ok, stdout+stderr).
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> (bool, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .process_group(0)
        .spawn()
        .expect("starting the VM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > timeout {
            // The whole process group: vng, qemu.
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(out.path()).unwrap_or_default();
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\nVM TIMED OUT after {timeout:?}")),
    }
}

#[test]
fn fscache_vm() {
    // Guest side: list a tree and return.
    if let Ok(spec) = std::env::var("LODE_FSCACHE_LISTING") {
        let (dir, out) = spec.split_once(':').expect("DIR:OUT");
        std::fs::write(out, listing(Path::new(dir))).unwrap();
        return;
    }
    require_root();
    let shared = shared_dir();
    let vm_run = shared.join("vm/run");
    assert!(
        vm_run.exists(),
        "{} is missing: the fscache tests run in the shared VM (set LODE_SHARED_DIR)",
        vm_run.display()
    );
    let work = tempfile::Builder::new()
        .prefix("lode-fscache-vm.")
        .tempdir_in("/tmp")
        .unwrap();
    let t = Instant::now();
    prepare(work.path());
    let prep = t.elapsed();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fscache_vm.sh");
    let test_bin = std::env::current_exe().unwrap();
    let mut cmd = Command::new(&vm_run);
    cmd.current_dir(work.path())
        .arg("--rwdir")
        .arg(work.path())
        .arg("--")
        .arg("bash")
        .arg(&script)
        .arg(work.path())
        .arg(env!("CARGO_BIN_EXE_lode"))
        .arg(&test_bin);
    let t = Instant::now();
    let (ok, out) = run_with_timeout(cmd, VM_TIMEOUT);
    let vm = t.elapsed();
    eprintln!("{out}");
    eprintln!(
        "fscache VM test: preparation {:.1} s, VM run {:.1} s",
        prep.as_secs_f64(),
        vm.as_secs_f64()
    );
    let passes = out.lines().filter(|l| l.starts_with("PASS ")).count();
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(fails.is_empty(), "failed checks:\n{}", fails.join("\n"));
    assert!(ok, "the VM run failed (see the output above)");
    // Every check printed its line (a script that stopped early must not pass).
    assert!(
        out.contains("fscache-vm: ") && passes >= EXPECTED_CHECKS,
        "only {passes} checks passed"
    );
}
