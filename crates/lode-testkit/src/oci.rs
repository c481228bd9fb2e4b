//! Ordinary (non-lode) OCI images for tests: layer tarballs made with GNU tar from real
//! directories, an OCI image layout written around them, and `skopeo copy` into a registry.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cmd::run;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Tars the entries `names` of `dir` (or `.` when empty) with GNU tar in PAX format,
/// keeping numeric owners, xattrs and nanosecond times, gzip-compressed into `out`.
pub fn tar_gz<N: AsRef<std::ffi::OsStr>>(dir: &Path, names: &[N], out: &Path) {
    let tar = out.with_extension("plain");
    let mut cmd = Command::new("tar");
    cmd.args([
        "--format=pax",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--sort=name",
        "-C",
    ])
    .arg(dir)
    .arg("-cf")
    .arg(&tar);
    if names.is_empty() {
        cmd.arg(".");
    } else {
        cmd.args(names.iter().map(|n| n.as_ref()));
    }
    run(&mut cmd);
    let gz = std::fs::File::create(out).expect("create layer");
    run(Command::new("gzip").args(["-n", "-c"]).arg(&tar).stdout(gz));
    std::fs::remove_file(&tar).expect("remove plain tar");
}

/// Writes an OCI image layout at `layout` holding one linux/amd64 image tagged `tag` whose
/// layers are the gzip tarballs `layers` (bottom first).
pub fn write_layout(layout: &Path, tag: &str, layers: &[PathBuf]) {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    let put = |b: &[u8]| -> String {
        let d = sha256(b);
        std::fs::write(blobs.join(&d[7..]), b).expect("write blob");
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let gz = std::fs::read(l).expect("read layer");
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain)
            .expect("gunzip layer");
        diff_ids.push(sha256(&plain));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(&gz), "size": gz.len()
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config.as_bytes()), "size": config.len()},
        "layers": descs
    })
    .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest.as_bytes()), "size": manifest.len(),
        "platform": {"os": "linux", "architecture": "amd64"},
        "annotations": {"org.opencontainers.image.ref.name": tag}
    }]});
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
}

/// `skopeo copy oci:LAYOUT:TAG docker://DEST` to a plain-HTTP registry.
pub fn skopeo_push(layout: &Path, tag: &str, dest: &str) {
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}")));
}
