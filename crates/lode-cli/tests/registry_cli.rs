//! `lode push` / `lode pull` against a real `docker-registry` on 127.0.0.1, then a kernel
//! mount of what was pulled.

use std::process::Command;

use lode_registry::testing::TestRegistry;
use lode_testkit::cmd::{run, run_fail};
use lode_testkit::compare::assert_same_tree;
use lode_testkit::mount::{require_erofs, require_root, MountGuard};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

#[test]
fn push_pull_all_then_mount_matches_source() {
    require_root();
    require_erofs();
    let work = tempfile::Builder::new()
        .prefix("lode-reg-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();
    let src = w.join("src");
    std::fs::create_dir(&src).unwrap();
    materialize(&sample_tree(TreeParams::default(), 3), &src).unwrap();
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));

    let registry = TestRegistry::start();
    let reference = format!("{}/demo/app:v1", registry.addr());
    run(lode()
        .args(["push", "--plain-http"])
        .arg(w.join("img"))
        .arg(&reference));

    // Metadata only: bootstrap and image.json, no blob data.
    run(lode()
        .args(["pull", "--plain-http", &reference])
        .arg(w.join("meta")));
    assert!(w.join("meta/bootstrap").exists());
    assert_eq!(
        std::fs::read_dir(w.join("meta/blobs"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    // ...so a local mount refuses it, naming the missing blob.
    let mnt = w.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = run_fail(
        lode()
            .args(["mount", "--mode", "local", "--cache-dir"])
            .arg(w.join("cache"))
            .arg(w.join("meta"))
            .arg(&mnt),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--all"));

    run(lode()
        .args(["pull", "--all", "--plain-http", &reference])
        .arg(w.join("full")));
    run(lode()
        .args(["mount", "--mode", "local", "--cache-dir"])
        .arg(w.join("cache"))
        .arg(w.join("full"))
        .arg(&mnt));
    let guard = MountGuard::new(&mnt);
    assert_same_tree(&src, &mnt);
    guard.unmount().unwrap();

    // A reference that does not exist is an error naming it.
    let out = run_fail(
        lode()
            .args([
                "pull",
                "--plain-http",
                &format!("{}/demo/nope:v1", registry.addr()),
            ])
            .arg(w.join("nope")),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{out:?}"
    );
}
