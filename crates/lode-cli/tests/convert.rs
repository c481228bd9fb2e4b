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

    // What the merged rootfs must be, made independently: GNU tar extracts layer 1 (tar keeps
    // no hard links between fifos or devices, so neither can the image), then layer 2's
    // whiteout and file are applied by hand.
    let expected = w.join("expected");
    std::fs::create_dir(&expected).unwrap();
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpzf"])
        .arg(w.join("l1.tar.gz"))
        .arg("-C")
        .arg(&expected));
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
    // Layer 2 carries no "." entry, so the root keeps layer 1's metadata.
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

/// A real tree (`/usr/lib/python3*`, or `/usr/share/doc`) as the bottom layer of an ordinary
/// image, converted through the registry, pulled and mounted: identical to the tree.
#[test]
fn convert_real_tree_image() {
    require_root();
    require_erofs();
    let work = tempfile::Builder::new()
        .prefix("lode-convert-real-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();
    let tree = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3."))
                && p.is_dir()
        })
        .max()
        .unwrap_or_else(|| "/usr/share/doc".into());
    // One layer: the tree under /payload.
    let l1root = w.join("l1");
    std::fs::create_dir(&l1root).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(&tree)
        .arg(l1root.join("payload")));
    tar_gz::<&str>(&l1root, &[], &w.join("l1.tar.gz"));
    let layout = w.join("layout");
    write_layout(&layout, "real", &[w.join("l1.tar.gz")]);
    let registry = TestRegistry::start();
    let src = format!("{}/src/real:1", registry.addr());
    let dst = format!("{}/lode/real:1", registry.addr());
    skopeo_push(&layout, "real", &src);
    run(lode().args(["convert", "--plain-http", &src, &dst]));
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
    assert_same_tree(&l1root, &mnt);
    guard.unmount().unwrap();
}
