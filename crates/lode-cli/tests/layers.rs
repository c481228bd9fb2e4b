//! `lode build LAYER...` and `--oci-layout`: OCI layer import, checked through the kernel.
//!
//! Layers come from GNU tar (pax, gnu, sparse, xattrs; plain, gzip, zstd) and from tars
//! written header by header with the `tar` crate (hostile names, links, ids, times,
//! truncations). The expected merged tree is made independently: GNU tar extracts each layer
//! onto one directory after [`apply_whiteouts`] removed what the layer's whiteouts hide
//! (overlay semantics). Then `lode mount --mode local` must show exactly that tree.
//!
//! Needs root and a kernel with EROFS file-backed mounts: these tests fail, not skip, without.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lode_format::manifest::ImageManifest;
use lode_testkit::cmd::{run, run_fail};
use lode_testkit::compare::{assert_same_tree_with, CompareOptions};
use lode_testkit::mount::{require_erofs, require_root, MountGuard};
use lode_testkit::tree::{
    capability_v2, materialize, Chunk, Entry, EntryKind, FileData, Fill, Meta, TreeSpec,
};

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

fn setup() -> tempfile::TempDir {
    require_root();
    require_erofs();
    tempfile::Builder::new()
        .prefix("lode-layers-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// `lode build LAYERS -o OUT --json EXTRA`; the parsed report.
fn build(layers: &[&Path], out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = run(lode()
        .arg("build")
        .args(layers)
        .arg("-o")
        .arg(out)
        .arg("--json")
        .args(extra));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `lode build` that must fail; its stderr. Fails the test if it takes over a minute.
fn build_fails(layers: &[&Path], out: &Path) -> String {
    let started = Instant::now();
    let o = run_fail(lode().arg("build").args(layers).arg("-o").arg(out));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "build took too long to fail"
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn manifest(img: &Path) -> ImageManifest {
    serde_json::from_slice(&fs::read(img.join("image.json")).unwrap()).unwrap()
}

/// Mounts an image directory with `lode mount --mode local`; unmounted when dropped.
fn mount_local(img: &Path, mnt: &Path) -> MountGuard {
    fs::create_dir_all(mnt).unwrap();
    let cache = mnt.parent().unwrap().join("cache");
    run(lode()
        .args(["mount", "--mode", "local", "--cache-dir"])
        .arg(&cache)
        .arg(img)
        .arg(mnt));
    MountGuard::new(mnt)
}

/// Unmounts, retrying while the mount is transiently busy (a closed file's last reference can
/// be dropped a little later than the close).
fn unmount(guard: MountGuard) {
    let path = guard.path().to_path_buf();
    for _ in 0..100 {
        match rustix::mount::unmount(&path, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => {
                guard.disarm();
                return;
            }
            Err(rustix::io::Errno::BUSY) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("umount {path:?}: {e}"),
        }
    }
    guard.unmount().unwrap();
}

/// Mounts `img` and compares it with `expected`.
fn check_mount(img: &Path, expected: &Path, opts: &CompareOptions) {
    let mnt = img.with_extension("mnt");
    let guard = mount_local(img, &mnt);
    assert_same_tree_with(expected, &mnt, opts);
    unmount(guard);
}

/// `fsck.erofs` must accept the image (blobs expanded by the local mount's cache).
fn fsck(img: &Path) {
    let cache = img.with_extension("mnt").parent().unwrap().join("cache");
    let mut cmd = Command::new("fsck.erofs");
    for b in manifest(img).blobs {
        let dev = if b.is_direct() {
            img.join("blobs").join(b.hex())
        } else {
            lode_storage::fetch::materialize_from_dir(&cache, &b, &img.join("blobs")).unwrap()
        };
        cmd.arg(format!("--device={}", dev.display()));
    }
    run(cmd.arg(img.join("bootstrap")));
}

/// GNU tar: archive the entries of `dir` (all of them, or `names` in that order without
/// recursion) into `out`.
fn gnu_tar(dir: &Path, out: &Path, args: &[&str], names: Option<&[&str]>) {
    let mut cmd = Command::new("tar");
    cmd.args(args).arg("-C").arg(dir).arg("-cf").arg(out);
    match names {
        None => {
            cmd.arg(".");
        }
        Some(names) => {
            let list = out.with_extension("list");
            let mut bytes = Vec::new();
            for n in names {
                bytes.extend_from_slice(n.as_bytes());
                bytes.push(0);
            }
            fs::write(&list, bytes).unwrap();
            cmd.arg("--no-recursion").arg("--null").arg("-T").arg(&list);
        }
    }
    run(cmd);
}

/// Compresses `tar` with the `gzip` or `zstd` command; returns the new file.
fn compress(tar: &Path, how: &str) -> PathBuf {
    match how {
        "none" => tar.to_path_buf(),
        "gzip" => {
            run(Command::new("gzip").args(["-k", "-f", "-6"]).arg(tar));
            PathBuf::from(format!("{}.gz", tar.display()))
        }
        "zstd" => {
            run(Command::new("zstd").args(["-q", "-f", "-k", "-3"]).arg(tar));
            PathBuf::from(format!("{}.zst", tar.display()))
        }
        other => panic!("unknown compression {other}"),
    }
}

/// The uncompressed tar of a layer (a temporary copy when compressed).
fn plain_tar(layer: &Path) -> PathBuf {
    let head = fs::read(layer).unwrap();
    let tool = match head.get(..4) {
        Some([0x1f, 0x8b, ..]) => "gzip",
        Some([0x28, 0xb5, 0x2f, 0xfd]) => "zstd",
        _ => return layer.to_path_buf(),
    };
    let out = PathBuf::from(format!("{}.plain", layer.display()));
    let o = run(Command::new(tool).arg("-dc").arg(layer));
    fs::write(&out, o.stdout).unwrap();
    out
}

/// Normalized names (no leading `./` or `/`) and whether each is a directory.
fn list_entries(tar: &Path) -> Vec<(PathBuf, bool)> {
    let mut archive = ::tar::Archive::new(fs::File::open(tar).unwrap());
    let mut out = Vec::new();
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        let path: PathBuf = e
            .path()
            .unwrap()
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        out.push((path, e.header().entry_type().is_dir()));
    }
    out
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
        Ok(_) => fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// Overlay semantics for one layer about to be extracted onto `dest`: whiteouts remove what
/// lower layers put there, and an entry whose directory-ness differs from what is in `dest`
/// replaces it (GNU tar would refuse to put a directory over a file and vice versa).
fn apply_whiteouts(entries: &[(PathBuf, bool)], dest: &Path) {
    for (path, _) in entries {
        let Some(name) = path.file_name() else {
            continue;
        };
        let name = name.to_string_lossy().into_owned();
        let parent = dest.join(path.parent().unwrap());
        if name == ".wh..wh..opq" {
            if let Ok(rd) = fs::read_dir(&parent) {
                for child in rd {
                    remove_any(&child.unwrap().path());
                }
            }
        } else if let Some(target) = name.strip_prefix(".wh.") {
            remove_any(&parent.join(target));
        }
    }
    for (path, is_dir) in entries {
        if path.as_os_str().is_empty() {
            continue;
        }
        let p = dest.join(path);
        if let Ok(m) = fs::symlink_metadata(&p) {
            if m.is_dir() != *is_dir {
                remove_any(&p);
            }
        }
    }
}

/// The merged tree of `layers` made with GNU tar and [`apply_whiteouts`].
fn expected_tree(layers: &[&Path], dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    for layer in layers {
        let tar = plain_tar(layer);
        let entries = list_entries(&tar);
        apply_whiteouts(&entries, dest);
        run(Command::new("tar")
            .args([
                "-x",
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--same-owner",
                "-p",
                // Layers list a directory's children anywhere after it.
                "--delay-directory-restore",
                "--exclude=.wh.*",
                "-f",
            ])
            .arg(&tar)
            .arg("-C")
            .arg(dest));
    }
}

fn entry(path: &str, kind: EntryKind, meta: Meta) -> Entry {
    Entry {
        path: PathBuf::from(path),
        kind,
        meta,
    }
}

fn meta(mode: u32, sec: i64) -> Meta {
    Meta {
        mtime_sec: sec,
        ..Meta::simple(mode)
    }
}

/// The kitchen sink plus xattr values with newline bytes (a capability with
/// cap_dac_override|cap_fowner has 0x0a in its permitted word).
fn rich_tree() -> TreeSpec {
    let mut spec = TreeSpec::kitchen_sink();
    let mut m = Meta::simple(0o755);
    m.xattrs = vec![
        (b"user.binary".to_vec(), b"a\nb\n\0c=d".to_vec()),
        (
            b"security.capability".to_vec(),
            capability_v2(0b1010, 0, true),
        ),
    ];
    spec.entries.push(entry(
        "caps-with-newline",
        EntryKind::File(FileData::random(70_000, 5)),
        m,
    ));
    spec.entries.push(entry(
        "ns-mtime",
        EntryKind::File(FileData::bytes(b"x")),
        Meta {
            mtime_nsec: 123_456_789,
            ..meta(0o644, 1_650_000_000)
        },
    ));
    spec
}

#[test]
fn gnu_tar_layers_in_every_format_and_compression() {
    let work = setup();
    let src = work.path().join("src");
    materialize(&rich_tree(), &src).unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        ("pax", "none", &[]),
        ("pax", "gzip", &["--chunk-size", "64K"]),
        ("pax", "zstd", &["--compress", "lz4", "--inline-max", "0"]),
        ("gnu", "none", &["--chunk-size", "4K"]),
        ("gnu", "gzip", &[]),
        ("gnu", "zstd", &["--compress", "none"]),
    ];
    for (i, (format, compression, extra)) in cases.iter().enumerate() {
        let case = work.path().join(format!("case{i}"));
        fs::create_dir(&case).unwrap();
        let tar = case.join("layer.tar");
        gnu_tar(
            &src,
            &tar,
            &[
                &format!("--format={format}"),
                "--sparse",
                "--xattrs",
                "--xattrs-include=*",
            ],
            None,
        );
        let layer = compress(&tar, compression);
        let img = case.join("img");
        let report = build(&[&layer], &img, extra);
        assert_eq!(
            report["layers"][0]["format"],
            if *compression == "none" {
                "tar"
            } else {
                compression
            }
        );
        let expected = case.join("expected");
        expected_tree(&[&layer], &expected);
        check_mount(&img, &expected, &CompareOptions::default());
        if i == 0 {
            fsck(&img);
            // The pax layer keeps what the source has (sockets aside, which tar skips).
            let guard = mount_local(&img, &case.join("mnt2"));
            let diffs = lode_testkit::compare::compare_trees(
                &src,
                guard.path(),
                &CompareOptions::default(),
            );
            assert!(
                // (GNU tar stores the second name of a fifo as a fifo of its own.)
                diffs
                    .iter()
                    .all(|d| d.path.ends_with("sock")
                        || d.path.to_string_lossy().starts_with("fifo")),
                "{}",
                lode_testkit::compare::format_differences(&diffs)
            );
        }
    }
}

#[test]
fn sparse_files_in_every_tar_sparse_format_stay_holes() {
    let work = setup();
    let src = work.path().join("src");
    let big = 5u64 << 30;
    let spec = TreeSpec {
        root: Meta::simple(0o755),
        entries: vec![
            entry(
                "big",
                EntryKind::File(FileData {
                    size: big,
                    chunks: vec![
                        Chunk {
                            offset: 0,
                            len: 10_000,
                            fill: Fill::Random(1),
                        },
                        Chunk {
                            offset: (4 << 30) + 12_345,
                            len: 3 << 20,
                            fill: Fill::Text(2),
                        },
                        Chunk {
                            offset: big - 4,
                            len: 4,
                            fill: Fill::Byte(9),
                        },
                    ],
                    sparse: true,
                }),
                Meta::simple(0o644),
            ),
            entry(
                "small-sparse",
                EntryKind::File(FileData {
                    size: 300_000,
                    chunks: vec![Chunk {
                        offset: 200_000,
                        len: 5,
                        fill: Fill::Byte(1),
                    }],
                    sparse: true,
                }),
                Meta::simple(0o600),
            ),
        ],
    };
    materialize(&spec, &src).unwrap();
    let formats: &[&[&str]] = &[
        &["--format=gnu"],
        &["--format=pax"],
        &["--format=pax", "--sparse-version=0.0"],
        &["--format=pax", "--sparse-version=0.1"],
    ];
    for (i, args) in formats.iter().enumerate() {
        let case = work.path().join(format!("case{i}"));
        fs::create_dir(&case).unwrap();
        let tar = case.join("layer.tar");
        let mut all = vec!["--sparse"];
        all.extend_from_slice(args);
        gnu_tar(&src, &tar, &all, None);
        // The archive holds the data only, not the holes.
        assert!(fs::metadata(&tar).unwrap().len() < 8 << 20, "{args:?}");
        let img = case.join("img");
        let started = Instant::now();
        let report = build(&[&tar], &img, &["--compress", "none"]);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{args:?}: holes must not be read as data"
        );
        // Data chunks only: 1 MiB at 0, four covering the 3 MiB run past 4 GiB, the last,
        // and the one chunk of the small file.
        let stored = report["stored_bytes"].as_u64().unwrap();
        assert_eq!(stored, (6 << 20) + 300_000, "{args:?}");
        assert!(report["hole_chunks"].as_u64().unwrap() > 5000, "{args:?}");
        let expected = case.join("expected");
        expected_tree(&[&tar], &expected);
        check_mount(&img, &expected, &CompareOptions::default());
        fs::remove_dir_all(&expected).unwrap();
    }
}

fn write_tree(root: &Path, files: &[(&str, Option<&str>)]) {
    for (path, content) in files {
        let p = root.join(path);
        match content {
            None => fs::create_dir_all(&p).unwrap(),
            Some(c) => {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, c).unwrap();
            }
        }
    }
}

#[test]
fn whiteouts_opaque_directories_and_replacements() {
    let work = setup();
    let w = &work.path().to_path_buf();
    let (s1, s2, s3) = (w.join("s1"), w.join("s2"), w.join("s3"));
    write_tree(
        &s1,
        &[
            ("a/x", Some("x1")),
            ("a/sub/y", Some("y1")),
            ("b/1", Some("b1")),
            ("b/2", Some("b2")),
            ("b/deep/er", Some("deep")),
            ("c/keep", Some("keep")),
            ("c/old", Some("old")),
            ("d", Some("d1")),
            ("e/z", Some("z1")),
            ("f", Some("f1")),
        ],
    );
    let l1 = w.join("l1.tar");
    gnu_tar(&s1, &l1, &["--format=pax"], None);

    write_tree(
        &s2,
        &[
            (".wh.d", Some("")),
            ("a/.wh.sub", Some("")),
            ("b/new", Some("new2")),
            ("b/.wh..wh..opq", Some("")),
            ("b/later", Some("later2")),
            ("b/deep/fresh", Some("fresh2")),
            (".wh.e", Some("")),
            ("e", Some("e is a file now")),
            ("c/.wh.old", Some("")),
            ("f/inner", Some("f is a dir now")),
            ("g/.wh..wh..opq", Some("")),
            ("g/n", Some("n2")),
        ],
    );
    fs::set_permissions(s2.join("c"), fs::Permissions::from_mode(0o700)).unwrap();
    let l2 = w.join("l2.tar");
    // Same-layer entries before and after the opaque marker, a whiteout before the entry
    // that replaces what it hides.
    gnu_tar(
        &s2,
        &l2,
        &["--format=pax"],
        Some(&[
            ".",
            ".wh.d",
            "a",
            "a/.wh.sub",
            "b",
            "b/new",
            "b/deep",
            "b/.wh..wh..opq",
            "b/later",
            "b/deep/fresh",
            ".wh.e",
            "e",
            "c",
            "c/.wh.old",
            "f",
            "f/inner",
            "g",
            "g/.wh..wh..opq",
            "g/n",
        ]),
    );
    let l2 = compress(&l2, "zstd");

    write_tree(
        &s3,
        &[
            ("b/.wh.new", Some("")),
            ("k", Some("k3")),
            (".wh.k", Some("")),
            (".wh.nonexistent", Some("")),
            ("c/fresh", Some("fresh3")),
            ("c/.wh..wh..opq", Some("")),
        ],
    );
    let l3 = w.join("l3.tar");
    gnu_tar(
        &s3,
        &l3,
        &["--format=gnu"],
        Some(&[
            ".",
            "b",
            "b/.wh.new",
            "k",
            ".wh.k",
            ".wh.nonexistent",
            "c",
            "c/fresh",
            "c/.wh..wh..opq",
        ]),
    );
    let l3 = compress(&l3, "gzip");

    let img = w.join("img");
    let report = build(&[&l1, &l2, &l3], &img, &[]);
    assert_eq!(report["layers"][1]["whiteouts"], 6);
    let expected = w.join("expected");
    expected_tree(&[&l1, &l2, &l3], &expected);
    // The helper's result is what the rules say (so the comparison means something).
    let names = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(expected.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(""), ["a", "b", "c", "e", "f", "g", "k"]);
    assert_eq!(names("a"), ["x"]);
    assert_eq!(names("b"), ["deep", "later"]);
    assert_eq!(names("b/deep"), ["fresh"]);
    assert_eq!(names("c"), ["fresh"]);
    assert!(expected.join("e").is_file() && expected.join("f/inner").is_file());
    check_mount(&img, &expected, &CompareOptions::default());
    fsck(&img);
}

/// Tars written header by header, for input GNU tar would never produce.
struct RawTar(Vec<u8>);

impl RawTar {
    fn new() -> Self {
        RawTar(Vec::new())
    }

    /// A ustar header with `name` written into the name field as is (no checks).
    fn header(kind: ::tar::EntryType, name: &[u8], size: u64) -> ::tar::Header {
        let mut h = ::tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h.set_entry_type(kind);
        h
    }

    fn raw(&mut self, mut h: ::tar::Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let h = Self::header(
            ::tar::EntryType::Regular,
            name.as_bytes(),
            data.len() as u64,
        );
        self.raw(h, data)
    }

    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(::tar::EntryType::Directory, name.as_bytes(), 0);
        h.set_mode(mode);
        self.raw(h, &[])
    }

    fn link(&mut self, kind: ::tar::EntryType, name: &str, target: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, name.as_bytes(), 0);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
        self.raw(h, &[])
    }

    /// A PAX header (records with binary values) for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = [k.as_bytes(), b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            while len.to_string().len() + 1 + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(&body);
        }
        let h = Self::header(
            ::tar::EntryType::XHeader,
            b"././@PaxHeader",
            data.len() as u64,
        );
        self.raw(h, &data)
    }

    fn gnu_long(&mut self, kind: u8, value: &[u8]) -> &mut Self {
        let mut h = ::tar::Header::new_gnu();
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_size(value.len() as u64 + 1);
        h.set_mode(0o644);
        h.set_entry_type(::tar::EntryType::new(kind));
        let mut v = value.to_vec();
        v.push(0);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(&v);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut v = self.0.clone();
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    fn write(&mut self, path: &Path) -> PathBuf {
        fs::write(path, self.finish()).unwrap();
        path.to_path_buf()
    }
}

use ::tar::EntryType as T;

#[test]
fn hostile_names_are_normalized_or_rejected() {
    let work = setup();
    let w = work.path();
    let mut long = "n".repeat(255);
    let ok = RawTar::new()
        .file("/abs/./path//file", b"abs")
        .file("a/b/../c", b"c")
        .file("./dot/./x", b"x")
        .pax(&[("path", format!("pax/{long}").as_bytes())])
        .file("ignored-name", b"255 via pax")
        .gnu_long(b'L', format!("gnu/{long}").as_bytes())
        .file("ignored-too", b"255 via GNU long name")
        .write(&w.join("ok.tar"));
    let img = w.join("img");
    build(&[&ok], &img, &[]);
    let mnt = w.join("mnt");
    let guard = mount_local(&img, &mnt);
    assert_eq!(fs::read(mnt.join("abs/path/file")).unwrap(), b"abs");
    assert_eq!(fs::read(mnt.join("a/c")).unwrap(), b"c");
    assert!(
        !mnt.join("a/b").exists(),
        "a/b only appeared in a name that '..' left"
    );
    assert_eq!(fs::read(mnt.join("dot/x")).unwrap(), b"x");
    assert_eq!(
        fs::read(mnt.join("pax").join(&long)).unwrap(),
        b"255 via pax"
    );
    assert_eq!(
        fs::read(mnt.join("gnu").join(&long)).unwrap(),
        b"255 via GNU long name"
    );
    // Implied parents: 0755, root, mtime 0; so is the root without a "./" entry.
    for d in ["", "abs", "abs/path", "a", "pax"] {
        let m = fs::symlink_metadata(mnt.join(d)).unwrap();
        assert_eq!(
            (
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            ),
            (0o755, 0, 0, 0, 0),
            "{d:?}"
        );
    }
    unmount(guard);

    long.push('n');
    let bad: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (
            RawTar::new().file("../escape", b"x").finish(),
            vec!["../escape", "escapes the root"],
        ),
        (
            RawTar::new()
                .file("ok", b"1")
                .file("a/../../escape", b"x")
                .finish(),
            vec!["a/../../escape", "escapes the root"],
        ),
        (
            RawTar::new()
                .pax(&[("path", b"/../../etc/passwd")])
                .file("x", b"x")
                .finish(),
            vec!["/../../etc/passwd", "escapes"],
        ),
        (
            RawTar::new()
                .pax(&[("path", b"nul\0byte")])
                .file("x", b"x")
                .finish(),
            vec!["NUL"],
        ),
        (
            RawTar::new()
                .pax(&[("path", format!("d/{long}").as_bytes())])
                .file("x", b"x")
                .finish(),
            vec!["256 bytes", "255"],
        ),
        (
            RawTar::new()
                .link(T::Symlink, "s", b"/etc")
                .file("s/passwd", b"x")
                .finish(),
            vec!["s/passwd", "\"s\" is a symlink", "never follows"],
        ),
        (
            RawTar::new().link(T::Symlink, "empty-target", b"").finish(),
            vec!["empty-target", "empty target"],
        ),
        (
            RawTar::new()
                .file("x", b"1")
                .raw(RawTar::header(T::new(b'M'), b"multi", 0), &[])
                .finish(),
            vec!["multi", "unsupported tar entry type 'M'"],
        ),
    ];
    for (i, (bytes, needles)) in bad.iter().enumerate() {
        let layer = w.join(format!("bad{i}.tar"));
        fs::write(&layer, bytes).unwrap();
        let err = build_fails(&[&layer], &w.join(format!("out{i}")));
        let mut needles = needles.clone();
        let name = layer.display().to_string();
        needles.push(&name);
        assert_mentions(&err, &needles);
    }
    // Nothing was written outside the output directories.
    assert!(!w.join("escape").exists() && !w.parent().unwrap().join("escape").exists());
}

#[test]
fn ids_times_devices_xattrs_and_links_from_raw_headers() {
    let work = setup();
    let w = work.path();
    let long_target = "t/".repeat(1500);
    let mut big_uid = RawTar::header(T::Regular, b"big-uid", 3);
    big_uid.set_uid(4_000_000_000);
    // (u32::MAX itself is the kernel's invalid id, shown as the overflow id.)
    big_uid.set_gid(4_294_967_294);
    let mut neg_mtime = RawTar::header(T::Regular, b"neg-mtime", 0);
    // GNU base-256: -86400 (1969-12-31).
    let mut field = [0xffu8; 12];
    field[4..].copy_from_slice(&(-86_400i64).to_be_bytes());
    neg_mtime.as_old_mut().mtime = field;
    let mut chr = RawTar::header(T::Char, b"dev/chr", 0);
    chr.set_device_major(4095).unwrap();
    chr.set_device_minor(1_048_575).unwrap();
    let mut blk = RawTar::header(T::Block, b"dev/blk", 0);
    blk.set_device_major(259).unwrap();
    blk.set_device_minor(70_000).unwrap();
    let cap = capability_v2(0b1010, 0, true);
    let layer1 = RawTar::new()
        .raw(big_uid, b"uid")
        .raw(neg_mtime, &[])
        .pax(&[("mtime", b"1700000000.123456789"), ("uid", b"70000")])
        .file("pax-mtime", b"ns")
        .pax(&[("mtime", b"-1.25")])
        .file("pax-neg-mtime", b"")
        .raw(chr, &[])
        .raw(blk, &[])
        .raw(RawTar::header(T::Fifo, b"dev/fifo", 0), &[])
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.nl", b"\n\n"),
            ("SCHILY.xattr.com.apple.quarantine", b"skipped"),
            ("LIBARCHIVE.xattr.user.ignored", b"eA=="),
            ("atime", b"1.5"),
            ("uname", b"someone"),
        ])
        .file("caps", b"binary")
        .pax(&[("linkpath", long_target.as_bytes())])
        .link(T::Symlink, "pax-long-link", b"ignored")
        .gnu_long(b'K', long_target.as_bytes())
        .link(T::Symlink, "gnu-long-link", b"ignored")
        .link(T::Symlink, "outside", b"../../../../etc/shadow")
        .file("target", b"shared inode")
        .link(T::Link, "same-layer-link", b"target")
        .file("dup", b"first")
        .dir("dd", 0o700)
        .file("dd/child", b"kept")
        .file("dup", b"second wins")
        .dir("dd", 0o750)
        .file("to-dir", b"file first")
        .dir("to-dir", 0o755)
        .file("to-dir/in", b"then a directory")
        .write(&w.join("l1.tar"));
    let layer2 = RawTar::new()
        .link(T::Link, "lower-link", b"target")
        .link(T::Link, "./x/../abs-link", b"/target")
        .file(".wh.dup", b"")
        .write(&w.join("l2.tar"));
    let img = w.join("img");
    let report = build(&[&layer1, &layer2], &img, &[]);
    let warnings = report["layers"][0]["warnings"].to_string();
    assert!(
        warnings.contains("com.apple.quarantine") && warnings.contains("caps"),
        "{report}"
    );
    let mnt = w.join("mnt");
    let guard = mount_local(&img, &mnt);
    let md = |p: &str| fs::symlink_metadata(mnt.join(p)).unwrap();
    assert_eq!(
        (md("big-uid").uid(), md("big-uid").gid()),
        (4_000_000_000, u32::MAX - 1)
    );
    assert_eq!(md("neg-mtime").mtime(), -86_400);
    assert_eq!(
        (md("pax-mtime").mtime(), md("pax-mtime").mtime_nsec()),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(md("pax-mtime").uid(), 70_000);
    assert_eq!(
        (
            md("pax-neg-mtime").mtime(),
            md("pax-neg-mtime").mtime_nsec()
        ),
        (-2, 750_000_000)
    );
    let dev = |p: &str| {
        let r = md(p).rdev();
        (rustix::fs::major(r), rustix::fs::minor(r))
    };
    assert!(md("dev/chr").file_type().is_char_device_like());
    assert_eq!(dev("dev/chr"), (4095, 1_048_575));
    assert_eq!(dev("dev/blk"), (259, 70_000));
    assert!(md("dev/fifo").file_type().is_fifo_like());
    let x = lode_testkit::compare::read_xattrs(&mnt.join("caps")).unwrap();
    assert_eq!(x.len(), 2, "{x:?}");
    assert_eq!(x[&b"security.capability".to_vec()], cap);
    assert_eq!(x[&b"user.nl".to_vec()], b"\n\n");
    for l in ["pax-long-link", "gnu-long-link"] {
        assert_eq!(fs::read_link(mnt.join(l)).unwrap(), Path::new(&long_target));
    }
    assert_eq!(
        fs::read_link(mnt.join("outside")).unwrap(),
        Path::new("../../../../etc/shadow")
    );
    for l in ["same-layer-link", "lower-link", "abs-link"] {
        assert_eq!(md(l).ino(), md("target").ino(), "{l}");
    }
    assert_eq!(md("target").nlink(), 4);
    assert!(!mnt.join("x").exists());
    assert!(!mnt.join("dup").exists(), "whited out by layer 2");
    assert_eq!(fs::read(mnt.join("dd/child")).unwrap(), b"kept");
    assert_eq!(md("dd").mode() & 0o7777, 0o750);
    assert_eq!(
        fs::read(mnt.join("to-dir/in")).unwrap(),
        b"then a directory"
    );
    unmount(guard);

    // Duplicates: the last entry of a path wins.
    let dups = RawTar::new()
        .file("dup", b"first")
        .file("dup", b"second wins")
        .write(&w.join("dups.tar"));
    let img2 = w.join("img2");
    build(&[&dups], &img2, &[]);
    let guard = mount_local(&img2, &w.join("mnt2"));
    assert_eq!(fs::read(w.join("mnt2/dup")).unwrap(), b"second wins");
    unmount(guard);

    let mut huge_uid = RawTar::header(T::Regular, b"huge-uid", 0);
    huge_uid.set_uid(5_000_000_000);
    let mut bad_dev = RawTar::header(T::Char, b"bad-dev", 0);
    bad_dev.set_device_major(5000).unwrap();
    bad_dev.set_device_minor(0).unwrap();
    let mut bad_mtime = RawTar::header(T::Regular, b"bad-mtime", 0);
    bad_mtime.as_old_mut().mtime = *b"0000000009x\0";
    let bad: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (
            RawTar::new().raw(huge_uid, &[]).finish(),
            vec!["huge-uid", "uid 5000000000"],
        ),
        (
            RawTar::new()
                .pax(&[("gid", b"4294967296")])
                .file("pax-gid", b"")
                .finish(),
            vec!["pax-gid", "gid 4294967296"],
        ),
        (
            RawTar::new()
                .pax(&[("uid", b"-1")])
                .file("neg-uid", b"")
                .finish(),
            vec!["neg-uid", "bad PAX uid"],
        ),
        (
            RawTar::new()
                .pax(&[("mtime", b"12:00")])
                .file("pax-time", b"")
                .finish(),
            vec!["pax-time", "bad PAX mtime"],
        ),
        (
            RawTar::new().raw(bad_mtime, &[]).finish(),
            vec!["bad mtime field"],
        ),
        (
            RawTar::new().raw(bad_dev, &[]).finish(),
            vec!["bad-dev", "5000:0"],
        ),
        (
            RawTar::new().link(T::Link, "dangling", b"missing").finish(),
            vec![
                "dangling",
                "\"missing\" is not in this layer or a lower one",
            ],
        ),
        (
            RawTar::new()
                .dir("d", 0o755)
                .link(T::Link, "to-dir", b"d")
                .finish(),
            vec!["to-dir", "is a directory"],
        ),
        (
            RawTar::new().file("x", b"").pax(&[("path", b"a")]).finish(),
            vec!["extension header"],
        ),
        (
            RawTar::new()
                .pax(&[("SCHILY.xattr.user.big", &vec![b'v'; 70_000])])
                .file("bigx", b"")
                .finish(),
            vec!["bigx", "too large"],
        ),
    ];
    for (i, (bytes, needles)) in bad.iter().enumerate() {
        let layer = w.join(format!("bad{i}.tar"));
        fs::write(&layer, bytes).unwrap();
        let err = build_fails(&[&layer], &w.join(format!("out{i}")));
        assert_mentions(&err, needles);
    }
    // A hard link to a lower layer's file that a lower layer whited out.
    let l3 = RawTar::new()
        .link(T::Link, "late", b"dup")
        .write(&w.join("l3.tar"));
    let err = build_fails(&[&layer1, &layer2, &l3], &w.join("out-late"));
    assert_mentions(
        &err,
        &["layer 3", "\"late\"", "\"dup\" is not in this layer"],
    );
}

trait FileTypeLike {
    fn is_char_device_like(&self) -> bool;
    fn is_fifo_like(&self) -> bool;
}

impl FileTypeLike for fs::FileType {
    fn is_char_device_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_char_device(self)
    }
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn truncated_and_corrupt_layers_fail_cleanly() {
    let work = setup();
    let w = work.path();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let full = RawTar::new()
        .file("first", b"1")
        .file("payload", &data)
        .file("last", b"2")
        .finish();
    fs::write(w.join("full.tar"), &full).unwrap();
    let gz = compress(&w.join("full.tar"), "gzip");
    let zst = compress(&w.join("full.tar"), "zstd");
    let cut = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = w.join(name);
        fs::write(&p, bytes).unwrap();
        p
    };
    let payload_end = 1024 + 512 + data.len().next_multiple_of(512);
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            cut("mid-data.tar", &full[..1024 + 512 + 1000]),
            vec!["\"payload\"", "truncated"],
        ),
        (
            cut("mid-header.tar", &full[..1024 + 100]),
            vec!["after entry \"first\"", "truncated"],
        ),
        (
            cut("no-end.tar", &full[..payload_end + 1024]),
            vec!["without the end-of-archive marker", "truncated"],
        ),
        (
            cut("garbage.tar", &[0x55; 4096]),
            vec!["not a directory, nor a layer tarball"],
        ),
        (
            cut(
                "half.tar.gz",
                &fs::read(&gz).unwrap()[..fs::metadata(&gz).unwrap().len() as usize / 2],
            ),
            vec!["half.tar.gz"],
        ),
        (
            cut("no-trailer.tar.gz", &{
                let b = fs::read(&gz).unwrap();
                b[..b.len() - 4].to_vec()
            }),
            vec!["no-trailer.tar.gz"],
        ),
        (
            cut(
                "half.tar.zst",
                &fs::read(&zst).unwrap()[..fs::metadata(&zst).unwrap().len() as usize / 2],
            ),
            vec!["half.tar.zst"],
        ),
        (
            cut("corrupt.tar.gz", &{
                let mut b = fs::read(&gz).unwrap();
                let n = b.len();
                for x in &mut b[n / 3..n / 3 + 64] {
                    *x ^= 0x5a;
                }
                b
            }),
            vec!["corrupt.tar.gz"],
        ),
        (cut("empty", &[]), vec!["nor a layer tarball"]),
    ];
    for (i, (layer, needles)) in cases.iter().enumerate() {
        let err = build_fails(&[layer], &w.join(format!("out{i}")));
        assert_mentions(&err, needles);
    }
    // The intact ones build.
    for l in [&gz, &zst] {
        build(&[l], &w.join("ok"), &[]);
    }
}

#[test]
fn layers_share_chunks_and_chunk_dictionaries_are_reused() {
    let work = setup();
    let w = work.path();
    let big = FileData::random(3 << 20, 77);
    let s1 = w.join("s1");
    materialize(
        &TreeSpec {
            root: Meta::simple(0o755),
            entries: vec![entry(
                "big",
                EntryKind::File(big.clone()),
                Meta::simple(0o644),
            )],
        },
        &s1,
    )
    .unwrap();
    let s2 = w.join("s2");
    materialize(
        &TreeSpec {
            root: Meta::simple(0o755),
            entries: vec![
                entry(
                    "copy-of-big",
                    EntryKind::File(big.clone()),
                    Meta::simple(0o600),
                ),
                entry(
                    "new",
                    EntryKind::File(FileData::random(10_000, 78)),
                    Meta::simple(0o644),
                ),
            ],
        },
        &s2,
    )
    .unwrap();
    let s3 = w.join("s3");
    materialize(
        &TreeSpec {
            root: Meta::simple(0o755),
            entries: vec![entry("again", EntryKind::File(big), Meta::simple(0o644))],
        },
        &s3,
    )
    .unwrap();
    let (l1, l2, l3) = (w.join("l1.tar"), w.join("l2.tar"), w.join("l3.tar"));
    for (s, l) in [(&s1, &l1), (&s2, &l2), (&s3, &l3)] {
        gnu_tar(s, l, &["--format=pax"], None);
    }
    let img = w.join("img");
    let r = build(&[&l1, &l2, &l3], &img, &["--compress", "none"]);
    let layer = |i: usize, k: &str| r["layers"][i][k].as_u64().unwrap_or(0);
    assert_eq!(layer(0, "stored_bytes"), 3 << 20);
    // Layer 2's blob holds only the new file; the copy of big is layer 1's chunks.
    assert_eq!(layer(1, "stored_bytes"), 10_000);
    assert_eq!(layer(1, "deduplicated_bytes"), 3 << 20);
    assert_eq!(r["layers"][2]["blob"], serde_json::Value::Null);
    let m = manifest(&img);
    assert_eq!(m.blobs.len(), 2);
    assert_eq!(m.blobs[1].uncompressed_size, 12_288);
    let expected = w.join("expected");
    expected_tree(&[&l1, &l2, &l3], &expected);
    check_mount(&img, &expected, &CompareOptions::default());

    // A chunk dictionary: an image of layer 1 alone, reused by a build of layer 2.
    let dict = w.join("dict");
    build(&[&l1], &dict, &[]);
    let dict_blob = manifest(&dict).blobs[0].clone();
    let img2 = w.join("img2");
    let r2 = build(&[&l2], &img2, &["--chunk-dict", dict.to_str().unwrap()]);
    assert_eq!(r2["dict_blobs"][0], dict_blob.digest.as_str());
    assert_eq!(r2["stored_bytes"], 10_000);
    assert_eq!(r2["deduplicated_bytes"], 3 << 20);
    let m2 = manifest(&img2);
    assert_eq!(m2.blobs.len(), 2);
    assert_eq!(m2.blobs[0], dict_blob);
    assert!(img2.join("blobs").join(dict_blob.hex()).is_file());
    // The image stands alone: the dictionary can go.
    fs::remove_dir_all(&dict).unwrap();
    let expected2 = w.join("expected2");
    expected_tree(&[&l2], &expected2);
    check_mount(&img2, &expected2, &CompareOptions::default());
    fsck(&img2);

    // A dictionary nothing is found in does not become a device.
    let dict3 = w.join("dict3");
    build(&[&l2], &dict3, &["--compress", "lz4"]);
    let s4 = w.join("s4");
    materialize(
        &TreeSpec {
            root: Meta::simple(0o755),
            entries: vec![entry(
                "other",
                EntryKind::File(FileData::random(2 << 20, 79)),
                Meta::simple(0o644),
            )],
        },
        &s4,
    )
    .unwrap();
    let l4 = w.join("l4.tar");
    gnu_tar(&s4, &l4, &["--format=pax"], None);
    let img4 = w.join("img4");
    let r4 = build(&[&l4], &img4, &["--chunk-dict", dict3.to_str().unwrap()]);
    assert!(r4.get("dict_blobs").is_none(), "{r4}");
    assert_eq!(manifest(&img4).blobs.len(), 1);
    // A directory source can use a dictionary too.
    let img5 = w.join("img5");
    let o = run(lode()
        .arg("build")
        .arg(&s2)
        .arg("-o")
        .arg(&img5)
        .arg("--json")
        .arg("--chunk-dict")
        .arg(&img));
    let r5: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r5["stored_bytes"], 0, "{r5}");
    check_mount(&img5, &s2, &CompareOptions::default());
}

#[test]
fn real_multi_layer_image() {
    let work = setup();
    let w = work.path();
    let base = Path::new("/usr/share/doc");
    let l1 = w.join("l1.tar");
    gnu_tar(
        base,
        &l1,
        &["--format=pax", "--xattrs", "--xattrs-include=*"],
        None,
    );
    let l1 = compress(&l1, "gzip");
    // Layer 2: a changed file, a new one, whiteouts of a real file and a real directory, and
    // an opaque directory, each with its (real) parent's metadata.
    let mut dirs: Vec<String> = fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 3,
        "/usr/share/doc has too few directories for this test"
    );
    let (gone, opaque, changed) = (&dirs[0], &dirs[1], &dirs[2]);
    let first_file = |d: &str| -> String {
        let mut f: Vec<String> = fs::read_dir(base.join(d))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        f.sort();
        f.into_iter().next().expect("a file")
    };
    let changed_file = first_file(changed);
    let s2 = w.join("s2");
    for d in [opaque, changed] {
        fs::create_dir_all(s2.join(d)).unwrap();
    }
    fs::write(s2.join(format!(".wh.{gone}")), "").unwrap();
    fs::write(s2.join(opaque).join(".wh..wh..opq"), "").unwrap();
    fs::write(s2.join(opaque).join("only-this"), "new content").unwrap();
    fs::write(s2.join(changed).join(&changed_file), "changed").unwrap();
    fs::write(s2.join(changed).join(".wh.not-there"), "").unwrap();
    fs::write(s2.join("NEW"), vec![7u8; 100_000]).unwrap();
    for d in ["", opaque.as_str(), changed.as_str()] {
        let m = fs::metadata(base.join(d)).unwrap();
        fs::set_permissions(s2.join(d), m.permissions()).unwrap();
    }
    let l2 = w.join("l2.tar");
    gnu_tar(&s2, &l2, &["--format=pax"], None);
    let l2 = compress(&l2, "zstd");
    let img = w.join("img");
    let r = build(&[&l1, &l2], &img, &[]);
    assert!(r["layers"][0]["tar_bytes"].as_u64().unwrap() > 10 << 20);
    let expected = w.join("expected");
    expected_tree(&[&l1, &l2], &expected);
    assert!(!expected.join(gone).exists());
    assert_eq!(fs::read_dir(expected.join(opaque)).unwrap().count(), 1);
    check_mount(&img, &expected, &CompareOptions::default());
    fsck(&img);
}

fn sha256_hex(path: &Path) -> String {
    let o = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&o.stdout)[..64].to_string()
}

/// Puts `file` into the layout's blob store; returns (digest, size).
fn add_blob(layout: &Path, file: &Path) -> (String, u64) {
    let hex = sha256_hex(file);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(file, dir.join(&hex)).unwrap();
    (format!("sha256:{hex}"), fs::metadata(file).unwrap().len())
}

fn add_json(layout: &Path, value: &serde_json::Value) -> (String, u64) {
    let tmp = layout.join("tmp.json");
    fs::write(&tmp, serde_json::to_vec(value).unwrap()).unwrap();
    let r = add_blob(layout, &tmp);
    fs::remove_file(&tmp).unwrap();
    r
}

/// An image manifest for `layers` (gzip or zstd files) with a config listing their diff ids.
fn add_image(layout: &Path, layers: &[&Path], arch: &str) -> serde_json::Value {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (digest, size) = add_blob(layout, l);
        let media = if l.extension().unwrap() == "zst" {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        } else {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        };
        descs.push(serde_json::json!({"mediaType": media, "digest": digest, "size": size}));
        diff_ids.push(format!("sha256:{}", sha256_hex(&plain_tar(l))));
    }
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = add_json(layout, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = add_json(layout, &manifest);
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms,
        "platform": {"architecture": arch, "os": "linux"},
    })
}

#[test]
fn oci_image_layout_with_index_tags_and_digest_checks() {
    let work = setup();
    let w = work.path();
    let s1 = w.join("s1");
    write_tree(
        &s1,
        &[
            ("etc/os", Some("one")),
            ("usr/bin/tool", Some("tool")),
            ("gone/x", Some("x")),
        ],
    );
    let s2 = w.join("s2");
    write_tree(&s2, &[("etc/os", Some("two")), (".wh.gone", Some(""))]);
    let (l1, l2) = (w.join("l1.tar"), w.join("l2.tar"));
    gnu_tar(&s1, &l1, &["--format=pax"], None);
    gnu_tar(&s2, &l2, &["--format=pax"], None);
    let (l1, l2) = (compress(&l1, "gzip"), compress(&l2, "gzip"));
    let l2z = compress(&w.join("l2.tar"), "zstd");

    let layout = w.join("layout");
    fs::create_dir_all(&layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let amd = add_image(&layout, &[&l1, &l2], "amd64");
    let arm = add_image(&layout, &[&l1], "arm64");
    let zstd_image = add_image(&layout, &[&l1, &l2z], "amd64");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm, amd.clone()],
    });
    let (id, is) = add_json(&layout, &index);
    let with_tag = |mut d: serde_json::Value, tag: &str| {
        d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        d
    };
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            with_tag(serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": is,
            }), "multi"),
            with_tag(amd, "flat"),
            with_tag(zstd_image, "zstd"),
        ],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();

    let build_layout = |arg: String, out: &Path| -> serde_json::Value {
        let o = run(lode()
            .arg("build")
            .arg("--oci-layout")
            .arg(arg)
            .arg("-o")
            .arg(out)
            .arg("--json"));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let ld = layout.display();
    let multi = w.join("multi");
    let flat = w.join("flat");
    let zst = w.join("zst");
    let r = build_layout(format!("{ld}:multi"), &multi);
    assert_eq!(
        r["layers"].as_array().unwrap().len(),
        2,
        "linux/amd64 chosen: {r}"
    );
    build_layout(format!("{ld}:flat"), &flat);
    build_layout(format!("{ld}:zstd"), &zst);
    assert_eq!(
        fs::read(multi.join("bootstrap")).unwrap(),
        fs::read(flat.join("bootstrap")).unwrap()
    );

    // umoci unpacks the same image as the reference tree.
    let bundle = w.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{ld}:flat"))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    assert_eq!(fs::read(rootfs.join("etc/os")).unwrap(), b"two");
    assert!(!rootfs.join("gone").exists());
    let opts = CompareOptions {
        root_metadata: false,
        ..CompareOptions::default()
    };
    check_mount(&multi, &rootfs, &opts);
    check_mount(&zst, &rootfs, &opts);

    // Errors: unknown tag (the known ones are listed), several images without a tag, a
    // corrupted layer blob.
    let fail = |arg: String| -> String {
        let o = run_fail(
            lode()
                .arg("build")
                .arg("--oci-layout")
                .arg(arg)
                .arg("-o")
                .arg(w.join("bad")),
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert_mentions(&fail(format!("{ld}:nope")), &["\"nope\"", "multi", "flat"]);
    assert_mentions(&fail(format!("{ld}")), &["3 images", "DIR:TAG"]);
    let l2_blob = layout.join("blobs/sha256").join(sha256_hex(&l2));
    let mut bytes = fs::read(&l2_blob).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    fs::write(&l2_blob, &bytes).unwrap();
    let err = fail(format!("{ld}:flat"));
    assert_mentions(&err, &["layer 2", &sha256_hex(&l2)]);
    bytes.truncate(n - 100);
    fs::write(&l2_blob, &bytes).unwrap();
    assert_mentions(&fail(format!("{ld}:flat")), &["layer 2"]);
}

#[test]
fn output_is_deterministic_across_thread_counts() {
    let work = setup();
    let w = work.path();
    let src = w.join("src");
    materialize(&rich_tree(), &src).unwrap();
    let l = w.join("l.tar");
    gnu_tar(
        &src,
        &l,
        &["--format=pax", "--sparse", "--xattrs", "--xattrs-include=*"],
        None,
    );
    let l = compress(&l, "zstd");
    let (a, b) = (w.join("a"), w.join("b"));
    build(&[&l, &l], &a, &["--threads", "1", "--chunk-size", "4K"]);
    build(&[&l, &l], &b, &["--threads", "5", "--chunk-size", "4K"]);
    // The compression is told by the bytes, not the name.
    let misnamed = w.join("really-zstd.tar.gz");
    fs::copy(&l, &misnamed).unwrap();
    let c = w.join("c");
    build(
        &[&l, &misnamed],
        &c,
        &["--threads", "2", "--chunk-size", "4K"],
    );
    for name in ["bootstrap", "image.json"] {
        let a = fs::read(a.join(name)).unwrap();
        assert!(a == fs::read(b.join(name)).unwrap(), "{name}");
        assert!(a == fs::read(c.join(name)).unwrap(), "{name}");
    }
}

#[test]
fn command_line_misuse_is_explained() {
    let work = setup();
    let w = work.path();
    let dir = w.join("dir");
    fs::create_dir(&dir).unwrap();
    let tar = RawTar::new().file("f", b"x").write(&w.join("l.tar"));
    let out = w.join("out");
    let err = |args: &[&std::ffi::OsStr]| {
        String::from_utf8_lossy(
            &run_fail(lode().arg("build").args(args).arg("-o").arg(&out)).stderr,
        )
        .into_owned()
    };
    assert_mentions(
        &err(&[dir.as_os_str(), tar.as_os_str()]),
        &["cannot be combined"],
    );
    assert_mentions(
        &err(&[tar.as_os_str(), "--oci-layout".as_ref(), dir.as_os_str()]),
        &["--oci-layout"],
    );
    assert_mentions(
        &err(&["--oci-layout".as_ref(), dir.as_os_str()]),
        &["index.json"],
    );
    assert_mentions(&err(&[]), &["SOURCES"]);
}
