//! `lode inspect`, `ls`, `cat` and `unpack` run as a user would, on images made by mkfs.erofs
//! and on hand-assembled ones; `unpack` output is compared with the source tree.

#[path = "../../lode-format/tests/common/mod.rs"]
mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::asm::Asm;
use common::{assert_trees_equal, mkfs, populate, pseudo_random, scan_dir};
use lode_format::format::{xattr_index, FileType};

fn lode(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lode"))
        .args(args)
        .output()
        .expect("running lode")
}

fn lode_ok(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let output = lode(args);
    assert!(
        output.status.success(),
        "lode {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn lode_err(args: &[&std::ffi::OsStr]) -> String {
    let output = lode(args);
    assert_eq!(output.status.code(), Some(1), "lode {args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

macro_rules! os {
    ($($arg:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($arg)),*] };
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lode-cli-")
        .tempdir()
        .unwrap()
}

#[test]
fn unpack_reproduces_the_source_for_every_mkfs_layout() {
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src);
    let expected = scan_dir(&src);
    let blob = dir.path().join("blob");
    let blob_arg = format!("--blobdev={}", blob.display());
    let layouts: [(&str, Vec<&str>); 4] = [
        ("default", vec![]),
        ("noinline", vec!["-Enoinline_data"]),
        ("chunked", vec!["--chunksize=4096"]),
        ("blobdev", vec!["--chunksize=4096", &blob_arg]),
    ];
    for (name, args) in layouts {
        let image = dir.path().join(format!("{name}.img"));
        mkfs(&image, &src, &args);
        let out = dir.path().join(format!("{name}.out"));
        let mut cli_args = vec![image.as_os_str(), out.as_os_str()];
        if name == "blobdev" {
            cli_args.extend([std::ffi::OsStr::new("--device"), blob.as_os_str()]);
        }
        lode_ok(&[&[std::ffi::OsStr::new("unpack")][..], &cli_args].concat());
        assert_trees_equal(&expected, &scan_dir(&out), |_, _| {});
    }
}

/// A lode image directory (bootstrap + blobs/<tag>) with a mostly-hole file, a file whose
/// data is on the blob, a 255-byte name, hard links and a long-prefix xattr.
fn lode_image_dir(root: &Path) -> PathBuf {
    let bs = 4096;
    let tag = "sha256:00112233445566778899aabbccddeeff";
    let mut asm = Asm::new(bs, 4);
    asm.prefixes = vec![(xattr_index::TRUSTED, b"overlay.".to_vec())];
    let root_nid = asm.reserve(32);
    let mut entries = vec![
        (b".".to_vec(), root_nid, FileType::Directory),
        (b"..".to_vec(), root_nid, FileType::Directory),
    ];
    // 64 chunks of 64 KiB, data only in chunks 3 and 63.
    let chunk = 16 * bs;
    let mut sparse = vec![0u8; 64 * chunk];
    sparse[3 * chunk..4 * chunk].copy_from_slice(&pseudo_random(chunk, 1));
    sparse[63 * chunk..].copy_from_slice(&pseudo_random(chunk, 2));
    let holes: Vec<usize> = (0..64).filter(|i| *i != 3 && *i != 63).collect();
    let mut spec = asm.block_map(&sparse, 4, &holes);
    spec.xattrs = vec![(xattr_index::LONG_PREFIX, b"opaque".to_vec(), b"y".to_vec())];
    spec.extended = true;
    spec.mtime = 1_234_567_890;
    spec.mtime_nsec = 5;
    spec.nlink = 2;
    let sparse_nid = asm.inode(&spec);
    entries.push((b"sparse".to_vec(), sparse_nid, FileType::Regular));
    entries.push((vec![b'L'; 255], sparse_nid, FileType::Regular));
    let spec = asm.chunk_indexes(2 * bs as u64 + 10, 0, &[Some((1, 0)), None, Some((1, 1))]);
    entries.push((b"on_blob".to_vec(), asm.inode(&spec), FileType::Regular));
    let spec = asm.dir(entries);
    asm.write_inode(root_nid, &spec);
    asm.devices = vec![(tag.as_bytes().to_vec(), 2, 0)];
    let image = asm.finish(root_nid);

    let image_dir = root.join("image");
    std::fs::create_dir_all(image_dir.join("blobs")).unwrap();
    std::fs::write(image_dir.join("bootstrap"), image).unwrap();
    std::fs::write(image_dir.join("blobs").join(tag), pseudo_random(2 * bs, 3)).unwrap();
    image_dir
}

#[test]
fn unpack_keeps_holes_hard_links_and_long_names() {
    let dir = tempdir();
    let image = lode_image_dir(dir.path());
    let out = dir.path().join("out");
    lode_ok(os!("unpack", &image, &out));

    let sparse = out.join("sparse");
    let meta = std::fs::metadata(&sparse).unwrap();
    assert_eq!(meta.len(), 64 * 16 * 4096);
    // Two 64 KiB chunks of data: far fewer than the 4 MiB the file spans.
    assert!(
        meta.blocks() * 512 <= 4 * 64 * 1024,
        "holes were filled: {} blocks",
        meta.blocks()
    );
    assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_234_567_890, 5));
    let long = out.join(std::ffi::OsStr::from_bytes(&[b'L'; 255]));
    assert_eq!(std::fs::metadata(&long).unwrap().ino(), meta.ino());
    let value =
        rustix::fs::lgetxattr(&sparse, "trusted.overlay.opaque", &mut [0u8; 16][..]).unwrap();
    assert_eq!(value, 1);

    let blob = std::fs::read(image.join("blobs/sha256:00112233445566778899aabbccddeeff")).unwrap();
    let on_blob = std::fs::read(out.join("on_blob")).unwrap();
    assert_eq!(&on_blob[..4096], &blob[..4096]);
    assert!(on_blob[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(&on_blob[8192..], &blob[4096..4106]);

    // cat and ls on the same image directory.
    assert_eq!(lode_ok(os!("cat", &image, "/on_blob")), on_blob);
    let listing = lode_ok(os!("ls", &image, "/"));
    let lines: Vec<&[u8]> = listing
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 3, "{}", String::from_utf8_lossy(&listing));
    assert!(lines[0].ends_with(&[b'L'; 255]));
    assert!(
        lines[2].starts_with(b"-rw-r--r--   2 "),
        "{}",
        String::from_utf8_lossy(lines[2])
    );

    // Without its blob, reading that file names the slot and tag.
    std::fs::remove_file(image.join("blobs/sha256:00112233445566778899aabbccddeeff")).unwrap();
    let err = lode_err(os!("cat", &image, "/on_blob"));
    assert!(
        err.contains("slot 0") && err.contains("sha256:0011"),
        "{err}"
    );
}

/// An image whose root holds one hostile entry.
fn hostile_image(dir: &Path, name: &[u8], to_root: bool) -> PathBuf {
    let mut asm = Asm::new(4096, 2);
    let root = asm.reserve(32);
    let sub = asm.reserve(32);
    let spec = asm.plain(0o100644, b"data");
    let file = asm.inode(&spec);
    let mut sub_entries = vec![
        (b".".to_vec(), sub, FileType::Directory),
        (b"..".to_vec(), root, FileType::Directory),
    ];
    if to_root {
        sub_entries.push((b"loop".to_vec(), root, FileType::Directory));
    }
    let spec = asm.dir(sub_entries);
    asm.write_inode(sub, &spec);
    let entries = vec![
        (b".".to_vec(), root, FileType::Directory),
        (b"..".to_vec(), root, FileType::Directory),
        (b"sub".to_vec(), sub, FileType::Directory),
        (name.to_vec(), file, FileType::Regular),
    ];
    let spec = asm.dir(entries);
    asm.write_inode(root, &spec);
    let label: String = name
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("hostile-{label}.img"));
    std::fs::write(&path, asm.finish(root)).unwrap();
    path
}

#[test]
fn unpack_refuses_hostile_images_and_used_directories() {
    let dir = tempdir();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let image = hostile_image(dir.path(), b"../escaped", false);
    let err = lode_err(os!("unpack", &image, &work.join("out1")));
    assert!(err.contains("not a valid file name"), "{err}");
    assert!(!work.join("escaped").exists() && !dir.path().join("escaped").exists());

    let image = hostile_image(dir.path(), b"ok", true);
    let err = lode_err(os!("unpack", &image, &work.join("out2")));
    assert!(err.contains("cycle"), "{err}");

    // A non-empty output directory is refused before anything is written.
    let used = work.join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("keep"), b"x").unwrap();
    let good = hostile_image(dir.path(), b"fine", false);
    let err = lode_err(os!("unpack", &good, &used));
    assert!(err.contains("not empty"), "{err}");
    // An empty one is fine.
    let empty = work.join("empty");
    std::fs::create_dir(&empty).unwrap();
    lode_ok(os!("unpack", &good, &empty));
    assert_eq!(std::fs::read(empty.join("fine")).unwrap(), b"data");
}

#[test]
fn inspect_ls_and_cat_on_a_mkfs_image() {
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    common::populate_small(&src);
    let image = dir.path().join("small.img");
    mkfs(&image, &src, &["--chunksize=4096"]);

    let text = String::from_utf8(lode_ok(os!("inspect", &image))).unwrap();
    assert!(text.contains("chunked_file"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&lode_ok(os!("inspect", &image, "--json"))).unwrap();
    assert_eq!(json["superblock"]["block_size"], 4096);
    assert_eq!(json["tree"]["char_devices"], 2);
    assert_eq!(json["tree"]["sockets"], 1);
    assert_eq!(json["tree"]["extra_hard_links"], 2);
    assert!(json["incompat_features"]
        .as_array()
        .unwrap()
        .contains(&"chunked_file".into()));

    let ls = String::from_utf8_lossy(&lode_ok(os!("ls", &image, "/dev"))).into_owned();
    assert!(
        ls.lines()
            .any(|l| l.starts_with("crw-r----- ") && l.contains(" 1, 3 ") && l.ends_with(" null")),
        "{ls}"
    );
    assert!(ls.lines().any(|l| l.starts_with("srw")), "{ls}");
    let ls = String::from_utf8_lossy(&lode_ok(os!("ls", &image, "/short_link"))).into_owned();
    assert!(ls.trim_end().ends_with("short_link -> one"), "{ls}");
    let json: serde_json::Value =
        serde_json::from_slice(&lode_ok(os!("ls", &image, "/", "--json"))).unwrap();
    let entries = json.as_array().unwrap();
    let setuid = entries.iter().find(|e| e["name"] == "setuid").unwrap();
    assert_eq!(setuid["mode_string"], "-rwsr-xr-x");
    assert!(
        entries.iter().any(|e| e["name_bytes"].is_array()),
        "the non-UTF-8 name keeps its bytes"
    );

    assert_eq!(
        lode_ok(os!("cat", &image, "/f4097")),
        std::fs::read(src.join("f4097")).unwrap()
    );
    assert_eq!(lode_ok(os!("cat", &image, "empty")), b"");
    assert!(lode_err(os!("cat", &image, "/sub")).contains("is a directory"));
    assert!(lode_err(os!("cat", &image, "/short_link")).contains("symlink"));
    assert!(lode_err(os!("cat", &image, "/nope")).contains("/nope: no such file"));
    assert!(lode_err(os!("ls", &image, "/one/x")).contains("/one: not a directory"));
    let not_erofs = dir.path().join("not-erofs");
    std::fs::write(&not_erofs, vec![0u8; 8192]).unwrap();
    assert!(lode_err(os!("inspect", &not_erofs)).contains("magic"));
}

#[test]
fn devices_are_found_next_to_a_plain_image() {
    let dir = tempdir();
    let image_dir = lode_image_dir(dir.path());
    // The same bootstrap as a plain file, its blob beside it under <tag>.
    let plain = dir.path().join("plain.erofs");
    std::fs::copy(image_dir.join("bootstrap"), &plain).unwrap();
    let tag = "sha256:00112233445566778899aabbccddeeff";
    std::fs::copy(image_dir.join("blobs").join(tag), dir.path().join(tag)).unwrap();
    let content = lode_ok(os!("cat", &plain, "/on_blob"));
    assert_eq!(content.len(), 2 * 4096 + 10);
    let json: serde_json::Value =
        serde_json::from_slice(&lode_ok(os!("inspect", &plain, "--json"))).unwrap();
    assert_eq!(json["devices"][0]["backing"], "file");
    assert_eq!(json["devices"][0]["tag"], tag);
    // Explicit --device wins; too many are refused.
    let err = lode_err(os!(
        "inspect", &plain, "--device", &plain, "--device", &plain
    ));
    assert!(err.contains("2 --device given"), "{err}");
}
