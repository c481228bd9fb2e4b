use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;

use crate::cmd::run;
use crate::compare::{compare_trees, read_xattrs, CompareOptions, DiffKind, Difference};
use crate::mount::require_root;
use crate::tree::{
    self, materialize, sample_tree, EntryKind, FileData, Fill, TreeParams, TreeSpec,
};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lode-testkit-")
        .tempdir()
        .unwrap()
}

/// Materialize `spec` into `<tmp>/a` and return (tempdir, path of a).
fn materialized(spec: &TreeSpec) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempdir();
    let a = tmp.path().join("a");
    materialize(spec, &a).unwrap();
    (tmp, a)
}

/// `cp -a --preserve=all a b`.
fn cp_a(a: &Path, b: &Path) {
    run(Command::new("cp")
        .arg("-a")
        .arg("--preserve=all")
        .arg(a)
        .arg(b));
}

#[track_caller]
fn assert_no_diffs(diffs: &[Difference]) {
    assert!(
        diffs.is_empty(),
        "unexpected differences:\n{}",
        crate::compare::format_differences(diffs)
    );
}

#[test]
fn fill_generation_is_offset_consistent() {
    for fill in [Fill::Zero, Fill::Byte(7), Fill::Random(3), Fill::Text(99)] {
        let mut whole = vec![0u8; 10_000];
        fill.generate(0, &mut whole);
        for (off, len) in [
            (0usize, 1usize),
            (1, 7),
            (63, 130),
            (4095, 2),
            (9_000, 1_000),
        ] {
            let mut part = vec![0u8; len];
            fill.generate(off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "{fill:?} at {off}");
        }
    }
    let d = FileData::bytes(b"hello\n\0\0x");
    assert_eq!(d.to_vec(), b"hello\n\0\0x");
}

#[test]
fn strategy_respects_params() {
    let params = TreeParams {
        max_entries: 60,
        max_file_size: 10_000,
        ..TreeParams::default()
    };
    for seed in 0..40 {
        let spec = sample_tree(params.clone(), seed);
        assert!(spec.entries.len() <= 60);
        let mut seen = std::collections::HashSet::new();
        for e in &spec.entries {
            assert!(seen.insert(e.path.clone()), "duplicate path {:?}", e.path);
            assert!(e.path.components().count() <= 5, "too deep: {:?}", e.path);
            for c in e.path.components() {
                let b = c.as_os_str().as_bytes();
                assert!(!b.is_empty() && b.len() <= 255 && !b.contains(&0));
            }
            if let Some(parent) = e.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                assert!(
                    spec.entries
                        .iter()
                        .any(|p| p.path == parent && p.kind == EntryKind::Dir),
                    "parent of {:?} missing",
                    e.path
                );
            }
            match &e.kind {
                EntryKind::File(d) => {
                    assert!(d.size <= 10_000);
                    let mut end = 0;
                    for c in &d.chunks {
                        assert!(c.offset >= end && c.len > 0 && c.offset + c.len <= d.size);
                        end = c.offset + c.len;
                    }
                }
                EntryKind::Symlink(t) => {
                    assert!(!t.is_empty() && t.len() < 4096 && !t.contains(&0))
                }
                EntryKind::CharDev { major, minor } | EntryKind::BlockDev { major, minor } => {
                    assert!(*major <= tree::MAX_MAJOR && *minor <= tree::MAX_MINOR)
                }
                _ => {}
            }
            assert!((tree::MIN_MTIME_SEC..=tree::MAX_MTIME_SEC).contains(&e.meta.mtime_sec));
            assert!(e.meta.mtime_nsec < 1_000_000_000);
        }
    }
}

#[test]
fn kitchen_sink_materializes_faithfully() {
    require_root();
    let spec = TreeSpec::kitchen_sink();
    let (_tmp, a) = materialized(&spec);
    assert_no_diffs(&compare_trees(&a, &a, &CompareOptions::default()));

    for e in &spec.entries {
        let p = a.join(&e.path);
        let m = fs::symlink_metadata(&p).unwrap();
        if let EntryKind::HardLink(t) = &e.kind {
            assert_eq!(m.ino(), fs::symlink_metadata(a.join(t)).unwrap().ino());
            continue;
        }
        if !matches!(e.kind, EntryKind::Symlink(_)) {
            assert_eq!(m.mode() & 0o7777, e.meta.mode, "{p:?}");
        }
        assert_eq!((m.uid(), m.gid()), (e.meta.uid, e.meta.gid), "{p:?}");
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (e.meta.mtime_sec, e.meta.mtime_nsec as i64),
            "{p:?}"
        );
        let xattrs = read_xattrs(&p).unwrap();
        for (k, v) in &e.meta.xattrs {
            assert_eq!(
                xattrs.get(k),
                Some(v),
                "{p:?} xattr {:?}",
                OsStr::from_bytes(k)
            );
        }
        match &e.kind {
            EntryKind::File(d) => {
                assert_eq!(m.size(), d.size);
                if d.size <= 1 << 20 {
                    assert_eq!(fs::read(&p).unwrap(), d.to_vec(), "{p:?}");
                }
            }
            EntryKind::Symlink(t) => {
                assert_eq!(fs::read_link(&p).unwrap().as_os_str().as_bytes(), t)
            }
            EntryKind::CharDev { major, minor } => {
                assert!(m.file_type().is_char_device());
                assert_eq!(m.rdev(), rustix::fs::makedev(*major, *minor));
            }
            EntryKind::BlockDev { major, minor } => {
                assert!(m.file_type().is_block_device());
                assert_eq!(m.rdev(), rustix::fs::makedev(*major, *minor));
            }
            EntryKind::Fifo => assert!(m.file_type().is_fifo()),
            EntryKind::Socket => assert!(m.file_type().is_socket()),
            _ => {}
        }
    }
    // Holes are real: the 3 MiB sparse file occupies far less.
    let sparse = fs::metadata(a.join("dir/sub/sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file has {} blocks",
        sparse.blocks()
    );
    assert_eq!(fs::metadata(a.join("all-hole")).unwrap().blocks(), 0);
    let root = fs::metadata(&a).unwrap();
    assert_eq!(
        (root.mtime(), root.mtime_nsec()),
        (spec.root.mtime_sec, spec.root.mtime_nsec as i64)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// Materializing is deterministic, and a tree equals itself.
    #[test]
    fn random_trees_materialize_deterministically(spec in tree::tree_strategy(TreeParams::small())) {
        require_root();
        let tmp = tempdir();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        materialize(&spec, &a).unwrap();
        materialize(&spec, &b).unwrap();
        let opts = CompareOptions::default();
        assert_no_diffs(&compare_trees(&a, &a, &opts));
        assert_no_diffs(&compare_trees(&a, &b, &opts));
    }
}

#[test]
fn big_random_tree_self_equal() {
    require_root();
    let spec = sample_tree(TreeParams::default(), 1);
    let (_tmp, a) = materialized(&spec);
    assert_no_diffs(&compare_trees(&a, &a, &CompareOptions::default()));
}

#[test]
fn cp_a_copy_compares_equal() {
    require_root();
    for spec in [
        TreeSpec::kitchen_sink(),
        sample_tree(TreeParams::default(), 2),
        sample_tree(TreeParams::small(), 3),
    ] {
        let (tmp, a) = materialized(&spec);
        let b = tmp.path().join("b");
        cp_a(&a, &b);
        assert_no_diffs(&compare_trees(&a, &b, &CompareOptions::default()));
    }
}

/// Copy the kitchen sink, apply `mutate` to the copy, and return the differences.
fn diffs_after(mutate: impl FnOnce(&Path)) -> Vec<Difference> {
    let (tmp, a) = materialized(&TreeSpec::kitchen_sink());
    let b = tmp.path().join("b");
    cp_a(&a, &b);
    mutate(&b);
    compare_trees(&a, &b, &CompareOptions::default())
}

#[track_caller]
fn assert_detects(diffs: &[Difference], path: &str, pred: impl Fn(&DiffKind) -> bool) {
    assert!(
        diffs
            .iter()
            .any(|d| d.path == Path::new(path) && pred(&d.kind)),
        "expected difference at {path} not found in:\n{}",
        crate::compare::format_differences(diffs)
    );
}

#[test]
fn detects_chmod() {
    require_root();
    let d = diffs_after(|b| drop(run(Command::new("chmod").arg("4755").arg(b.join("tiny")))));
    assert_detects(&d, "tiny", |k| {
        *k == DiffKind::Mode {
            a: 0o600,
            b: 0o4755,
        }
    });
    assert_eq!(d.len(), 1, "{d:?}");
    // Dropping only the sticky bit of a directory is detected too.
    let d = diffs_after(|b| {
        drop(run(Command::new("chmod")
            .arg("0777")
            .arg(b.join("dir/sub"))))
    });
    assert_detects(&d, "dir/sub", |k| {
        *k == DiffKind::Mode {
            a: 0o1777,
            b: 0o777,
        }
    });
}

#[test]
fn detects_mtime_nanoseconds() {
    require_root();
    // Same second, other nanoseconds; on a symlink (touch -h) and on a file.
    let d = diffs_after(|b| {
        run(Command::new("touch")
            .arg("-h")
            .arg("-d")
            .arg("@4102444800.000000002")
            .arg(b.join("rel-link")));
        run(Command::new("touch")
            .arg("-d")
            .arg("@3.000000005")
            .arg(b.join("tiny")));
    });
    assert_detects(&d, "rel-link", |k| {
        matches!(
            k,
            DiffKind::Mtime {
                a: (4102444800, 1),
                b: (4102444800, 2)
            }
        )
    });
    assert_detects(&d, "tiny", |k| {
        matches!(
            k,
            DiffKind::Mtime {
                a: (3, 4),
                b: (3, 5)
            }
        )
    });
    assert_eq!(d.len(), 2, "{d:?}");
}

#[test]
fn detects_changed_byte() {
    require_root();
    use std::os::unix::fs::FileExt;
    // One byte inside the data of a 3 MiB sparse file, past the first MiB, and one byte
    // written into a hole (zero to zero-valued write must not be reported: write 1).
    let d = diffs_after(|b| {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(b.join("dir/sub/sparse"))
            .unwrap();
        let off = (2 << 20) + 5000;
        let mut byte = [0u8];
        f.read_at(&mut byte, off).unwrap();
        f.write_all_at(&[byte[0] ^ 1], off).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(b.join("all-hole"))
            .unwrap();
        f.write_all_at(&[1], 777_777).unwrap();
    });
    assert_detects(&d, "dir/sub/sparse", |k| {
        *k == DiffKind::Content {
            offset: (2 << 20) + 5000,
        }
    });
    assert_detects(&d, "all-hole", |k| {
        *k == DiffKind::Content { offset: 777_777 }
    });
    // Writing changed the mtimes too.
    assert!(
        d.iter()
            .all(|x| matches!(x.kind, DiffKind::Content { .. } | DiffKind::Mtime { .. })),
        "{d:?}"
    );
    // Also found without the SEEK_DATA fast path.
    let (tmp, a) = materialized(&TreeSpec::kitchen_sink());
    let b = tmp.path().join("b");
    cp_a(&a, &b);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(b.join("all-hole"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9], 1_000_000).unwrap();
    let opts = CompareOptions {
        skip_holes: false,
        mtime: false,
        ..CompareOptions::default()
    };
    assert_eq!(
        compare_trees(&a, &b, &opts),
        vec![Difference {
            path: "all-hole".into(),
            kind: DiffKind::Content { offset: 1_000_000 }
        }]
    );
}

#[test]
fn detects_xattr_changes() {
    require_root();
    let d = diffs_after(|b| {
        run(Command::new("setfattr")
            .args(["-n", "user.dir", "-v", "no"])
            .arg(b.join("dir")));
        run(Command::new("setfattr")
            .args(["-h", "-x", "trusted.on-symlink"])
            .arg(b.join("rel-link")));
        run(Command::new("setfattr")
            .args(["-n", "trusted.new", "-v", "1"])
            .arg(b.join("fifo")));
    });
    assert_detects(&d, "dir", |k| {
        *k == DiffKind::Xattr {
            name: b"user.dir".to_vec(),
            a: Some(b"yes".to_vec()),
            b: Some(b"no".to_vec()),
        }
    });
    assert_detects(&d, "rel-link", |k| {
        *k == DiffKind::Xattr {
            name: b"trusted.on-symlink".to_vec(),
            a: Some(b"v".to_vec()),
            b: None,
        }
    });
    // fifo-link is the same inode as fifo.
    for p in ["fifo", "fifo-link"] {
        assert_detects(&d, p, |k| matches!(k, DiffKind::Xattr { a: None, .. }));
    }
    assert_eq!(d.len(), 4, "{d:?}");
    // Ignored names are not reported.
    let (tmp, a) = materialized(&TreeSpec::kitchen_sink());
    let b = tmp.path().join("b");
    cp_a(&a, &b);
    run(Command::new("setfattr")
        .args(["-n", "trusted.new", "-v", "1"])
        .arg(b.join("fifo")));
    let opts = CompareOptions::default().ignore_xattr("trusted.new");
    assert_no_diffs(&compare_trees(&a, &b, &opts));
}

#[test]
fn detects_broken_hardlink() {
    require_root();
    // Replace one name of the 3-name group by an identical independent copy.
    let d = diffs_after(|b| {
        let p = b.join("hard-a");
        let tmp = b.join("hard-a.tmp");
        cp_a(&p, &tmp);
        fs::rename(&tmp, &p).unwrap();
    });
    assert!(
        d.iter().any(
            |x| matches!(&x.kind, DiffKind::Hardlinks { a, b } if a.len() == 3 && b.len() == 2)
        ),
        "{d:?}"
    );
    // Besides the root directory's mtime (its entries changed), only hard links differ.
    assert!(
        d.iter()
            .all(|x| matches!(x.kind, DiffKind::Hardlinks { .. }) || x.path == Path::new("")),
        "{d:?}"
    );
    // And the reverse: two separate files that became one inode.
    let d = diffs_after(|b| {
        fs::remove_file(b.join("dir/4097-dup")).unwrap();
        fs::hard_link(b.join("tiny"), b.join("dir/4097-dup")).unwrap();
    });
    assert!(
        d.iter().any(
            |x| matches!(&x.kind, DiffKind::Hardlinks { a, b } if a.len() == 1 && b.len() == 2)
        ),
        "{d:?}"
    );
}

#[test]
fn detects_other_changes() {
    require_root();
    let d = diffs_after(|b| {
        fs::remove_file(b.join("fifo-link")).unwrap();
        fs::write(b.join("new-file"), b"x").unwrap();
        fs::remove_file(b.join("abs-dangling")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/other", b.join("abs-dangling")).unwrap();
        fs::remove_file(b.join("chr")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            b.join("chr"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 300),
        )
        .unwrap();
        fs::remove_file(b.join("tiny")).unwrap();
        fs::create_dir(b.join("tiny")).unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            b.join("empty"),
            Some(rustix::fs::Uid::from_raw(70_000)),
            None,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
    });
    assert_detects(&d, "fifo-link", |k| *k == DiffKind::OnlyInA);
    assert_detects(&d, "new-file", |k| *k == DiffKind::OnlyInB);
    assert_detects(&d, "abs-dangling", |k| {
        matches!(k, DiffKind::SymlinkTarget { .. })
    });
    assert_detects(&d, "chr", |k| {
        *k == DiffKind::Rdev {
            a: (1, 3),
            b: (1, 300),
        }
    });
    assert_detects(&d, "tiny", |k| matches!(k, DiffKind::FileType { .. }));
    assert_detects(&d, "empty", |k| *k == DiffKind::Uid { a: 0, b: 70_000 });
    // fifo lost its second name, but hard-link groups are compared only over paths in
    // both trees, so that is reported only as fifo-link being absent.
    assert!(!d.iter().any(|x| x.path == Path::new("fifo")), "{d:?}");
    // The readable report names the paths.
    let text = crate::compare::format_differences(&d);
    assert!(text.contains("\"new-file\": only in b"), "{text}");
}

#[test]
fn assert_same_tree_panics_readably() {
    require_root();
    let tmp = tempdir();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    for i in 0..60 {
        fs::write(a.join(format!("f{i}")), b"").unwrap();
    }
    run(Command::new("touch").arg("-r").arg(&a).arg(&b));
    let err = std::panic::catch_unwind(|| crate::assert_same_tree(&a, &b)).unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("60 difference(s)") && msg.contains("… and 10 more"),
        "{msg}"
    );
    assert!(msg.lines().count() < 60, "{msg}");
}

#[test]
fn mount_guard_unmounts_on_drop_and_panic() {
    require_root();
    use crate::mount::{is_mounted, MountGuard, TempMount};
    use rustix::mount::MountFlags;
    let mut m = TempMount::new().unwrap();
    m.mount("none", "tmpfs", MountFlags::empty(), "size=1m")
        .unwrap();
    assert!(is_mounted(m.path()));
    let path = m.path().to_path_buf();
    drop(m);
    assert!(!path.exists(), "mount point not removed");

    let tmp = tempdir();
    let target = tmp.path().join("mnt with space");
    fs::create_dir(&target).unwrap();
    let t2 = target.clone();
    let r = std::panic::catch_unwind(move || {
        let _g = MountGuard::mount("none", &t2, "tmpfs", MountFlags::empty(), "").unwrap();
        assert!(is_mounted(&t2));
        panic!("boom");
    });
    assert!(r.is_err());
    assert!(!is_mounted(&target));

    // Busy mount: the guard falls back to a lazy unmount.
    let g = MountGuard::mount("none", &target, "tmpfs", MountFlags::empty(), "").unwrap();
    let busy = fs::File::create(target.join("open")).unwrap();
    drop(g);
    assert!(!is_mounted(&target));
    drop(busy);
}

#[test]
fn erofs_is_available() {
    crate::mount::require_erofs();
}

#[test]
fn cmd_run_reports_failures() {
    let out = run(Command::new("sh").args(["-c", "echo hi"]));
    assert_eq!(out.stdout, b"hi\n");
    let err = std::panic::catch_unwind(|| {
        run(Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .env("X", "a b"))
    })
    .unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("X='a b' sh -c 'echo out; echo err >&2; exit 3'"),
        "{msg}"
    );
    assert!(
        msg.contains("out") && msg.contains("err") && msg.contains("3"),
        "{msg}"
    );
}

/// Over a handful of samples the default strategy produces every feature the kit promises.
#[test]
fn strategy_covers_every_feature() {
    use std::collections::BTreeMap;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut count = |k: &'static str, cond: bool| {
        *seen.entry(k).or_default() += cond as usize;
    };
    let mut total_entries = 0;
    let mut total_bytes = 0;
    for seed in 0..20 {
        let spec = sample_tree(TreeParams::default(), seed);
        total_entries += spec.entries.len();
        total_bytes += spec.total_file_size();
        let mut contents = std::collections::HashMap::new();
        for e in &spec.entries {
            let depth = e.path.components().count();
            let name = e.path.file_name().unwrap().as_bytes();
            count("depth-5 entry", depth == 5);
            count("non-utf8 name", std::str::from_utf8(name).is_err());
            count("255-byte name", name.len() == 255);
            count("mtime < 1970", e.meta.mtime_sec < 0);
            count("mtime > 2038", e.meta.mtime_sec > 1 << 31);
            count("mtime nsec", e.meta.mtime_nsec != 0);
            count("uid > 65535", e.meta.uid > 65_535);
            count("gid > 65535", e.meta.gid > 65_535);
            count("setuid", e.meta.mode & 0o4000 != 0);
            count("sticky", e.meta.mode & 0o1000 != 0);
            count("mode 000", e.meta.mode == 0);
            for (k, _) in &e.meta.xattrs {
                count("user.", k.starts_with(b"user."));
                count("trusted.", k.starts_with(b"trusted."));
                count("security.", k.starts_with(b"security.lodetest."));
                count("security.capability", k == b"security.capability");
            }
            match &e.kind {
                EntryKind::Dir => count("dir", true),
                EntryKind::File(d) => {
                    count("empty file", d.size == 0);
                    count("file 4095..=4097", (4095..=4097).contains(&d.size));
                    count("file > 1 MiB", d.size > 1 << 20);
                    count(
                        "sparse with hole",
                        d.sparse && d.chunks.iter().map(|c| c.len).sum::<u64>() + 8192 < d.size,
                    );
                    count(
                        "zero run",
                        d.chunks
                            .iter()
                            .any(|c| c.fill == Fill::Zero && c.len >= 4096),
                    );
                    if d.size > 0 {
                        count(
                            "duplicate content",
                            contents.insert(d.clone(), ()).is_some(),
                        );
                    }
                }
                EntryKind::Symlink(t) => {
                    count("symlink", true);
                    count("absolute symlink", t.starts_with(b"/"));
                    count("symlink > 1000 bytes", t.len() > 1000);
                }
                EntryKind::CharDev { minor, .. } => count("chardev minor > 255", *minor > 255),
                EntryKind::BlockDev { .. } => count("blockdev", true),
                EntryKind::Fifo => count("fifo", true),
                EntryKind::Socket => count("socket", true),
                EntryKind::HardLink(t) => {
                    count("hardlink across dirs", t.parent() != e.path.parent())
                }
            }
        }
    }
    eprintln!("{total_entries} entries, {total_bytes} bytes in 20 trees: {seen:#?}");
    let missing: Vec<_> = seen
        .iter()
        .filter(|(_, &n)| n == 0)
        .map(|(k, _)| *k)
        .collect();
    assert!(missing.is_empty(), "never generated: {missing:?}");
    assert_eq!(seen.len(), 30, "{seen:?}");
}

/// Huge sparse files are compared without reading their holes.
#[test]
fn huge_sparse_files_compare_fast() {
    use std::os::unix::fs::FileExt;
    let tmp = tempdir();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    let size = 64u64 << 30;
    for (dir, byte) in [(&a, 1u8), (&b, 2u8)] {
        let f = fs::File::create(dir.join("big")).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[byte], size - 10).unwrap();
    }
    run(Command::new("touch")
        .arg("-r")
        .arg(a.join("big"))
        .arg(b.join("big")));
    run(Command::new("touch").arg("-r").arg(&a).arg(&b));
    let start = std::time::Instant::now();
    let d = compare_trees(&a, &b, &CompareOptions::default());
    assert_eq!(
        d,
        vec![Difference {
            path: "big".into(),
            kind: DiffKind::Content { offset: size - 10 }
        }]
    );
    assert!(start.elapsed().as_secs() < 10, "took {:?}", start.elapsed());
}

/// The kit works on tmpfs too (the other filesystem tests put trees on).
#[test]
fn kitchen_sink_on_tmpfs() {
    require_root();
    let mut m = crate::mount::TempMount::new().unwrap();
    m.mount(
        "none",
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        "size=64m",
    )
    .unwrap();
    let spec = TreeSpec::kitchen_sink();
    let a = m.path().join("a");
    materialize(&spec, &a).unwrap();
    let (tmp, b) = materialized(&spec);
    assert_no_diffs(&compare_trees(&a, &b, &CompareOptions::default()));
    drop(tmp);
}
