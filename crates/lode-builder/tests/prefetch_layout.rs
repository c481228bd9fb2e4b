//! With an access trace, the traced files' chunks are stored together — first in the blob of a
//! directory build (in trace order), in a blob of their own for a layer build — so the image's
//! prefetch list is one extent a mount fetches with a few large requests, not one per file.

use std::path::Path;
use std::process::Command;

use lode_builder::{build_dir, build_layers, BuildOptions};
use lode_format::blob::Compression;
use lode_format::manifest::ImageManifest;

/// 300 files of 10,000 distinct bytes in `a/`; a trace naming every 10th, in reverse order.
fn fixture(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    for i in 0..300u32 {
        let data: Vec<u8> = (0..10_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 13) as u8)
            .collect();
        std::fs::write(src.join(format!("a/f{i:03}")), data).unwrap();
    }
    let trace = dir.join("trace");
    let lines: Vec<String> = (0..30)
        .rev()
        .map(|k| format!("/a/f{:03}", k * 10))
        .collect();
    std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
    trace
}

fn manifest(img: &Path) -> ImageManifest {
    serde_json::from_slice(&std::fs::read(img.join("image.json")).unwrap()).unwrap()
}

fn opts(trace: &Path) -> BuildOptions {
    BuildOptions {
        compression: Compression::Zstd,
        prefetch: Some(trace.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn directory_build_puts_traced_files_first() {
    let dir = tempfile::tempdir().unwrap();
    let trace = fixture(dir.path());
    build_dir(
        &dir.path().join("src"),
        &dir.path().join("img"),
        &opts(&trace),
    )
    .unwrap();
    let m = manifest(&dir.path().join("img"));
    assert_eq!(m.blobs.len(), 1);
    assert_eq!(m.prefetch.len(), 1, "one extent: {:?}", m.prefetch);
    let e = &m.prefetch[0];
    // 30 files of 10,000 bytes, each starting on a 4 KiB block, from the blob's start.
    assert_eq!((e.blob, e.offset, e.len), (0, 0, 30 * 12288));

    // Without the trace the same files are scattered: one extent each.
    let plain = BuildOptions {
        compression: Compression::Zstd,
        ..Default::default()
    };
    build_dir(&dir.path().join("src"), &dir.path().join("img2"), &plain).unwrap();
    assert!(manifest(&dir.path().join("img2")).prefetch.is_empty());
}

#[test]
fn layer_build_keeps_traced_files_in_a_blob_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let trace = fixture(dir.path());
    let tar = dir.path().join("layer.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(dir.path().join("src"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("GNU tar (scripts/setup.sh installs it)");
    assert!(st.success());
    let img = dir.path().join("img");
    build_layers(&[tar], &img, &opts(&trace), None).unwrap();
    let m = manifest(&img);
    assert_eq!(m.blobs.len(), 2, "the layer's blob and the prefetch blob");
    assert_eq!(m.prefetch.len(), 1, "one extent: {:?}", m.prefetch);
    let e = &m.prefetch[0];
    assert_eq!((e.offset, e.len), (0, 30 * 12288));
    let hot = &m.blobs[e.blob as usize];
    assert_eq!(hot.chunk_count, 30);
    assert_eq!(hot.uncompressed_size, 30 * 12288);
}
