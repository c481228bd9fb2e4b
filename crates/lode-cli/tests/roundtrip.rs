//! Build → (kernel mount | reader via `lode unpack` | fsck.erofs) round trips, for real.
//!
//! Needs root and a kernel with EROFS file-backed mounts (this machine and CI have both):
//! these tests fail, not skip, when either is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use lode_format::manifest::ImageManifest;
use lode_testkit::cmd::{run, run_fail};
use lode_testkit::compare::{assert_same_tree, assert_same_tree_with, CompareOptions};
use lode_testkit::mount::{require_erofs, require_root, MountGuard};
use lode_testkit::tree::{materialize, sample_tree, tree_strategy, TreeParams, TreeSpec};
use proptest::prelude::*;

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

fn build(src: &Path, out: &Path, extra: &[&str]) {
    run(lode().arg("build").arg(src).arg("-o").arg(out).args(extra));
}

fn manifest(img: &Path) -> ImageManifest {
    serde_json::from_slice(&std::fs::read(img.join("image.json")).unwrap()).unwrap()
}

/// Mounts an image directory with `lode mount --mode local`; unmounted when dropped.
fn mount_local(img: &Path, mnt: &Path) -> MountGuard {
    std::fs::create_dir_all(mnt).unwrap();
    let cache = mnt.parent().unwrap().join("cache");
    run(lode()
        .args(["mount", "--mode", "local", "--cache-dir"])
        .arg(&cache)
        .arg(img)
        .arg(mnt));
    MountGuard::new(mnt)
}

/// `fsck.erofs` (erofs-utils) must accept the image, with every blob's uncompressed layout
/// (the blob itself, or its expansion in the cache a local mount made) as `--device`.
fn fsck(img: &Path) {
    let mut cmd = Command::new("fsck.erofs");
    let cache = img.parent().unwrap().join("cache");
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

/// Builds `src`, then checks the kernel mount and `lode unpack` reproduce it exactly.
fn check_roundtrip(src: &Path, work: &Path, extra: &[&str]) -> PathBuf {
    let img = work.join("img");
    build(src, &img, extra);
    {
        let mnt = work.join("mnt");
        let guard = mount_local(&img, &mnt);
        assert_same_tree(src, &mnt);
        guard.unmount().unwrap();
    }
    let out = work.join("unpacked");
    run(lode().arg("unpack").arg(&img).arg(&out));
    assert_same_tree(src, &out);
    std::fs::remove_dir_all(&out).unwrap();
    img
}

fn setup() -> tempfile::TempDir {
    require_root();
    require_erofs();
    tempfile::Builder::new()
        .prefix("lode-rt-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn materialized(spec: &TreeSpec, work: &Path) -> PathBuf {
    let src = work.join("src");
    std::fs::create_dir(&src).unwrap();
    materialize(spec, &src).unwrap();
    src
}

#[test]
fn kitchen_sink_round_trips_through_kernel_and_reader() {
    let work = setup();
    let src = materialized(&TreeSpec::kitchen_sink(), work.path());
    let img = check_roundtrip(&src, work.path(), &[]);
    fsck(&img);
}

#[test]
fn every_chunk_size_and_no_inlining_round_trip() {
    let work = setup();
    let spec = sample_tree(TreeParams::default(), 7);
    let src = materialized(&spec, work.path());
    for (i, args) in [
        vec!["--chunk-size", "4K", "--compress", "lz4"],
        vec![
            "--chunk-size",
            "64K",
            "--inline-max",
            "0",
            "--compress",
            "none",
        ],
        vec!["--chunk-size", "64M", "--inline-max", "4000"],
    ]
    .iter()
    .enumerate()
    {
        let case = work.path().join(format!("case{i}"));
        std::fs::create_dir(&case).unwrap();
        let img = check_roundtrip(&src, &case, args);
        fsck(&img);
    }
}

#[test]
fn output_is_deterministic_across_thread_counts() {
    let work = setup();
    let spec = sample_tree(TreeParams::default(), 11);
    let src = materialized(&spec, work.path());
    let a = work.path().join("a");
    let b = work.path().join("b");
    build(&src, &a, &["--threads", "1"]);
    build(&src, &b, &["--threads", "5"]);
    for name in ["bootstrap", "image.json"] {
        assert!(
            std::fs::read(a.join(name)).unwrap() == std::fs::read(b.join(name)).unwrap(),
            "{name} differs between builds"
        );
    }
    for blob in manifest(&a).blobs {
        let p = format!("blobs/{}", blob.hex());
        assert_eq!(
            std::fs::read(a.join(&p)).unwrap(),
            std::fs::read(b.join(&p)).unwrap()
        );
    }
}

#[test]
fn identical_chunks_are_stored_once_and_holes_stay_holes() {
    let work = setup();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("a"), &data).unwrap();
    std::fs::write(src.join("b"), &data).unwrap();
    // A 6 GiB sparse file with data at the start, past 4 GiB, and at the end.
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    f.set_len(6 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"past 4 GiB", (4 << 30) + 12345).unwrap();
    f.write_all_at(b"tail", (6 << 30) - 4).unwrap();
    drop(f);
    let img = check_roundtrip(&src, work.path(), &["--compress", "none"]);
    let m = manifest(&img);
    let blob_bytes: u64 = m.blobs.iter().map(|b| b.uncompressed_size).sum();
    // 3 MiB of unique data (stored once for two files) plus the three 1 MiB chunks of the
    // sparse file that hold data; the other 6141 chunks are holes.
    assert_eq!(blob_bytes, 6 << 20);
    fsck(&img);
}

#[test]
fn directory_with_100k_entries() {
    let work = setup();
    let src = work.path().join("src");
    let big = src.join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..100_000u32 {
        // Mixed name lengths so entries straddle many directory blocks.
        let name = format!("{:0width$}", i, width = 6 + (i % 50) as usize);
        std::fs::File::create(big.join(name)).unwrap();
    }
    let img = check_roundtrip(&src, work.path(), &[]);
    fsck(&img);
}

#[test]
fn real_tree_round_trips_through_the_kernel() {
    let work = setup();
    let tree = Path::new("/usr/share");
    let img = work.path().join("img");
    build(tree, &img, &[]);
    let mnt = work.path().join("mnt");
    let guard = mount_local(&img, &mnt);
    assert_same_tree_with(tree, &mnt, &CompareOptions::default());
    guard.unmount().unwrap();
    fsck(&img);
}

#[test]
fn bad_input_gives_clear_errors() {
    let work = setup();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let out = work.path().join("img");
    let check = |args: &[&str], needle: &str| {
        let o = run_fail(lode().args(args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(needle),
            "`lode {}` said {err:?}, expected it to mention {needle:?}",
            args.join(" ")
        );
    };
    let s = src.to_str().unwrap();
    let o = out.to_str().unwrap();
    check(
        &["build", s, "-o", o, "--chunk-size", "3000"],
        "chunk size 3000",
    );
    check(&["build", s, "-o", o, "--chunk-size", "128M"], "chunk size");
    check(&["build", s, "-o", o, "--chunk-size", "lots"], "lots");
    check(
        &["build", "/nonexistent-lode-src", "-o", o],
        "/nonexistent-lode-src",
    );
    check(&["build", &format!("{s}/f"), "-o", o], "is not a directory");

    // A blob that is missing or truncated is named, and nothing is mounted.
    build(&src, &out, &["--inline-max", "0"]);
    let blob = out.join("blobs").join(manifest(&out).blobs[0].hex());
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(&blob, b"short").unwrap();
    let cache = work.path().join("cache");
    let local = || {
        let mut c = lode();
        c.args(["mount", "--mode", "local", "--cache-dir"])
            .arg(&cache)
            .arg(&out)
            .arg(&mnt);
        c
    };
    let fail = run_fail(local());
    let err = String::from_utf8_lossy(&fail.stderr);
    assert!(err.contains(manifest(&out).blobs[0].hex()), "{err}");
    std::fs::remove_file(&blob).unwrap();
    run_fail(local());
    assert!(!lode_testkit::mount::is_mounted(&mnt));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(spec in tree_strategy(TreeParams::small())) {
        let work = setup();
        let src = materialized(&spec, work.path());
        let img = check_roundtrip(&src, work.path(), &["--chunk-size", "16K"]);
        fsck(&img);
    }
}
