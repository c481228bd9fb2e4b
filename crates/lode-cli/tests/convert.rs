//! `lode convert` of an ordinary two-layer OCI image in a real registry, then `pull --all`
//! and a kernel mount compared with the image's merged rootfs.

use std::path::Path;
use std::process::Command;

use lode_registry::testing::TestRegistry;
use lode_testkit::cmd::{run, run_stdout};
use lode_testkit::compare::assert_same_tree;
use lode_testkit::mount::{require_erofs, require_root, MountGuard};
use lode_testkit::oci::{skopeo_push, tar_gz, write_layout};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

/// tar cannot archive sockets; drop them from the source (and so from what we expect).
fn remove_sockets(dir: &Path) {
    run(Command::new("find")
        .arg(dir)
        .args(["-type", "s", "-delete"]));
}

#[test]
fn convert_two_layer_image_then_mount_matches_merged_rootfs() {
    require_root();
    require_erofs();
    let work = tempfile::Builder::new()
        .prefix("lode-convert-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();

    // Layer 1: a random tree with every kind of entry tar can carry.
    let rootfs = w.join("rootfs1");
    std::fs::create_dir(&rootfs).unwrap();
    materialize(&sample_tree(TreeParams::default(), 21), &rootfs).unwrap();
    remove_sockets(&rootfs);
    tar_gz::<&str>(&rootfs, &[], &w.join("l1.tar.gz"));

    // Layer 2: one new file and a whiteout of the first top-level entry of layer 1.
    let mut names: Vec<_> = std::fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let victim = names[0].clone();
    let l2 = w.join("rootfs2");
    std::fs::create_dir(&l2).unwrap();
    std::fs::write(l2.join("added.txt"), b"from layer 2\n").unwrap();
    let mut wh = std::ffi::OsString::from(".wh.");
    wh.push(&victim);
    std::fs::write(l2.join(&wh), b"").unwrap();
    tar_gz(&l2, &["added.txt".into(), wh], &w.join("l2.tar.gz"));

    // What the merged rootfs must be.
    let expected = w.join("expected");
    run(Command::new("cp").arg("-a").arg(&rootfs).arg(&expected));
    let v = expected.join(&victim);
    if v.is_dir() && !v.is_symlink() {
        std::fs::remove_dir_all(&v).unwrap();
    } else {
        std::fs::remove_file(&v).unwrap();
    }
    run(Command::new("cp")
        .arg("-a")
        .arg(l2.join("added.txt"))
        .arg(expected.join("added.txt")));
    // The added entry changed the root directory's mtime in `expected` but not in the image
    // (layer 2 carries no "." entry): restore it.
    run(Command::new("touch")
        .arg("-h")
        .arg("--reference")
        .arg(&rootfs)
        .arg(&expected));

    let layout = w.join("layout");
    write_layout(&layout, "1", &[w.join("l1.tar.gz"), w.join("l2.tar.gz")]);
    let registry = TestRegistry::start();
    let src = format!("{}/src/app:1", registry.addr());
    let dst = format!("{}/lode/app:1", registry.addr());
    skopeo_push(&layout, "1", &src);

    let out = run_stdout(lode().args(["convert", "--plain-http", &src, &dst]));
    assert!(out.contains("converted"), "{out}");
    run(lode()
        .args(["pull", "--all", "--plain-http", &dst])
        .arg(w.join("pulled")));
    let mnt = w.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(lode()
        .args(["mount", "--mode", "local", "--cache-dir"])
        .arg(w.join("cache"))
        .arg(w.join("pulled"))
        .arg(&mnt));
    let guard = MountGuard::new(&mnt);
    assert_same_tree(&expected, &mnt);
    guard.unmount().unwrap();
}
