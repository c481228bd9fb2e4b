//! `lode mount` without `--mode` picks the best lazy mode this machine has. On this kernel
//! (6.14+ with pre-content events, cache on ext4) that is fanotify.

use std::process::Command;

use lode_testkit::cmd::run;
use lode_testkit::compare::assert_same_tree;
use lode_testkit::mount::{require_erofs, require_root};
use lode_testkit::tree::{materialize, sample_tree, TreeParams};

fn lode() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lode"))
}

#[test]
fn auto_mode_chooses_fanotify_here_and_serves_the_image() {
    require_root();
    require_erofs();
    let work = tempfile::Builder::new()
        .prefix("lode-auto-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();
    let src = w.join("src");
    std::fs::create_dir(&src).unwrap();
    materialize(&sample_tree(TreeParams::small(), 5), &src).unwrap();
    run(lode().arg("build").arg(&src).arg("-o").arg(w.join("img")));
    let mnt = w.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = run(lode()
        .arg("mount")
        .arg(w.join("img"))
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(w.join("cache")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unmount (and stop the supervisor) whatever happens below.
    struct Umount<'a>(&'a std::path::Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = Command::new(env!("CARGO_BIN_EXE_lode"))
                .arg("umount")
                .arg(self.0)
                .status();
        }
    }
    let _umount = Umount(&mnt);
    assert!(stderr.contains("--mode auto chose fanotify"), "{stderr}");
    assert_same_tree(&src, &mnt);
}
