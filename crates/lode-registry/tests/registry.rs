//! Against a real `docker-registry` on loopback (lode_registry::testing).

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use base64::Engine;
use common::{bytes, make_image_dir, sha256};
use lode_registry::testing::TestRegistry;
use lode_registry::{
    pull_image, pull_layers, push_image, resolve_image, ClientOptions, Error, Platform, Reference,
    RegistryClient,
};

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn blob_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn push_then_pull_round_trips_every_byte() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let blobs = vec![bytes(1, 300_000), bytes(2, 4096), bytes(3, 1)];
    let image_json = make_image_dir(&src, &bytes(9, 12_345), &blobs);
    let r = reg.reference("lode/roundtrip:v1");

    let pushed = push_image(&client, &src, &r).unwrap();
    assert_eq!(pushed.blobs_uploaded, 5, "{pushed:?}"); // bootstrap, 3 blobs, config
    assert_eq!(pushed.blobs_skipped, 0);

    let dst = tmp.path().join("dst");
    let pulled = pull_image(&client, &r, &dst, true).unwrap();
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.blobs_fetched, 3);
    assert_eq!(
        pulled.bytes_fetched,
        (image_json.len() + 12_345 + 300_000 + 4096 + 1) as u64
    );
    assert_eq!(read(&dst.join("image.json")), image_json);
    assert_eq!(read(&dst.join("bootstrap")), read(&src.join("bootstrap")));
    assert_eq!(blob_names(&dst), blob_names(&src));
    for name in blob_names(&src) {
        assert_eq!(
            read(&dst.join("blobs").join(&name)),
            read(&src.join("blobs").join(&name))
        );
    }

    // The manifest is what the registry serves, and says what it should.
    let m = client.get_manifest(&r, &[]).unwrap();
    assert_eq!(m.digest, pushed.manifest_digest);
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
    let v: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    assert_eq!(
        v["config"]["mediaType"],
        "application/vnd.lode.image.config.v1+json"
    );
    assert_eq!(
        v["layers"][0]["mediaType"],
        "application/vnd.lode.bootstrap.v1"
    );
    assert_eq!(v["layers"][1]["mediaType"], "application/vnd.lode.blob.v1");
    assert_eq!(v["layers"][1]["digest"], sha256(&blobs[0]));
    assert_eq!(v["layers"][3]["digest"], sha256(&blobs[2]));
    assert_eq!(v["layers"].as_array().unwrap().len(), 4);

    // Pushing again uploads nothing and gives the same manifest (deterministic).
    let again = push_image(&client, &src, &reg.reference("lode/roundtrip:v2")).unwrap();
    assert_eq!(again.manifest_digest, pushed.manifest_digest);
    assert_eq!((again.blobs_uploaded, again.blobs_skipped), (0, 5));

    // Pulling into the same directory again fetches only the config.
    let again = pull_image(&client, &r, &dst, true).unwrap();
    assert_eq!((again.blobs_fetched, again.blobs_present), (0, 3));
    assert_eq!(again.bytes_fetched, image_json.len() as u64);

    // By digest too.
    let by_digest = r.with_digest(&pushed.manifest_digest).unwrap();
    let img = resolve_image(&client, &by_digest).unwrap();
    assert_eq!(img.blobs.len(), 3);
    assert_eq!(img.config, image_json);
}

#[test]
fn pull_without_all_fetches_bootstrap_and_config_only() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let image_json = make_image_dir(&src, &bytes(4, 5000), &[bytes(5, 70_000), bytes(6, 8192)]);
    let r = reg.reference("lode/lazy:latest");
    push_image(&client, &src, &r).unwrap();

    let dst = tmp.path().join("dst");
    let s = pull_image(&client, &r, &dst, false).unwrap();
    assert_eq!((s.blobs_fetched, s.blobs_present), (0, 0));
    assert_eq!(s.bytes_fetched, (image_json.len() + 5000) as u64);
    assert_eq!(read(&dst.join("image.json")), image_json);
    assert_eq!(read(&dst.join("bootstrap")), bytes(4, 5000));
    assert!(blob_names(&dst).is_empty(), "{:?}", blob_names(&dst));
}

#[test]
fn range_reads_return_exact_slices() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let tmp = tempfile::tempdir().unwrap();
    let data = bytes(7, 1 << 20 | 123);
    let digest = sha256(&data);
    let path = tmp.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    let r = reg.reference("lode/ranges");
    assert!(!client.blob_exists(&r, &digest).unwrap());
    assert!(client
        .push_blob_from_file(&r, &path, &digest, data.len() as u64)
        .unwrap());
    assert!(client.blob_exists(&r, &digest).unwrap());
    assert!(!client
        .push_blob_from_file(&r, &path, &digest, data.len() as u64)
        .unwrap());

    let n = data.len() as u64;
    for (off, len) in [
        (0, 1),
        (0, 4096),
        (1, 4095),
        (4096, 65536),
        (777_777, 12_345),
        (n - 10, 10),
        (n - 1, 1),
    ] {
        let got = client.get_blob_range(&r, &digest, off, len).unwrap();
        assert_eq!(
            got,
            &data[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    // Past the end: what there is.
    let tail = client.get_blob_range(&r, &digest, n - 5, 100).unwrap();
    assert_eq!(tail, &data[data.len() - 5..]);
    assert!(client.get_blob_range(&r, &digest, 0, 0).unwrap().is_empty());
    // Entirely past the end: the registry's 416 as an error.
    let e = client.get_blob_range(&r, &digest, n + 10, 5).unwrap_err();
    assert!(e.status().is_some(), "{e}");

    // Whole blob, streamed and verified.
    let mut all = Vec::new();
    client
        .get_blob(&r, &digest, Some(n))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, data);

    // A blob that is not there.
    let missing = sha256(b"nope");
    let e = client.get_blob_range(&r, &missing, 0, 10).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("BLOB_UNKNOWN"), "{e}");
    assert!(
        e.to_string().contains("/v2/lode/ranges/blobs/sha256:"),
        "{e}"
    );

    // Cross-repository mount.
    let other = reg.reference("lode/other");
    assert!(client.mount_blob(&other, &r, &digest).unwrap());
    assert!(client.blob_exists(&other, &digest).unwrap());
    assert!(!client.mount_blob(&other, &r, &missing).unwrap());
}

#[test]
fn corrupted_bytes_are_detected() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let blob = bytes(8, 50_000);
    make_image_dir(&src, &bytes(10, 3000), std::slice::from_ref(&blob));
    let r = reg.reference("lode/corrupt:v1");
    push_image(&client, &src, &r).unwrap();

    // A local blob with the right size but wrong bytes is fetched again, not trusted.
    let dst = tmp.path().join("dst");
    let name = &sha256(&blob)[7..];
    std::fs::create_dir_all(dst.join("blobs")).unwrap();
    std::fs::write(dst.join("blobs").join(name), bytes(11, 50_000)).unwrap();
    let s = pull_image(&client, &r, &dst, true).unwrap();
    assert_eq!(s.blobs_fetched, 1);
    assert_eq!(read(&dst.join("blobs").join(name)), blob);

    // The registry's copy corrupted (same size): the pull fails naming the digest, and
    // leaves no file behind under the blob's name.
    let stored = reg.blob_data_path(&sha256(&blob));
    let mut bad = read(&stored);
    bad[1234] ^= 0xff;
    std::fs::write(&stored, &bad).unwrap();
    let dst2 = tmp.path().join("dst2");
    let e = pull_image(&client, &r, &dst2, true).unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&sha256(&blob)) && msg.contains(&sha256(&bad)),
        "{msg}"
    );
    assert!(!dst2.join("blobs").join(name).exists());
    assert!(!dst2.join("image.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dst2.join("blobs")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The streaming reader: the error comes with the last read.
    let mut out = Vec::new();
    let e = client
        .get_blob(&r, &sha256(&blob), None)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    let e = Error::from_io(e, "reading");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");

    // A wrong expected size is caught too.
    let bootstrap = sha256(&bytes(10, 3000));
    let e = client.get_blob(&r, &bootstrap, Some(2999)).err().unwrap();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e:?}");

    // A manifest asked for by a digest it does not have.
    let wrong = r.with_digest(&sha256(b"other")).unwrap();
    let e = client.get_manifest(&wrong, &[]).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("MANIFEST_UNKNOWN"), "{e}");
}

#[test]
fn basic_auth_for_real() {
    let reg = TestRegistry::start_with_basic_auth("alice", "s3cret pass");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let image_json = make_image_dir(&src, &bytes(12, 999), &[bytes(13, 10_000)]);
    let r = reg.reference("lode/private:v1");

    push_image(&reg.client(), &src, &r).unwrap();
    let dst = tmp.path().join("dst");
    pull_image(&reg.client(), &r, &dst, true).unwrap();
    assert_eq!(read(&dst.join("image.json")), image_json);

    // Wrong password: a clear error naming registry and user.
    let wrong = RegistryClient::new(ClientOptions {
        credentials: Some(("alice".into(), "wrong".into())),
        ..reg.client_options()
    })
    .unwrap();
    let e = pull_image(&wrong, &r, &tmp.path().join("x"), false).unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&reg.host()) && msg.contains("\"alice\"") && msg.contains("rejected"),
        "{msg}"
    );
    assert!(msg.contains("401"), "{msg}");

    // No credentials at all.
    let anon = RegistryClient::new(ClientOptions {
        credentials: None,
        ..reg.client_options()
    })
    .unwrap();
    let msg = anon.get_manifest(&r, &[]).unwrap_err().to_string();
    assert!(
        msg.contains("requires authentication") && msg.contains("no-auth-file.json"),
        "{msg}"
    );

    // Credentials from a docker config.json: `auth` (base64) and username/password forms.
    for entry in [
        serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode("alice:s3cret pass")}),
        serde_json::json!({"username": "alice", "password": "s3cret pass"}),
    ] {
        let cfg = tmp.path().join("config.json");
        let key = format!("http://{}", reg.host());
        std::fs::write(&cfg, serde_json::json!({"auths": {key: entry}}).to_string()).unwrap();
        let c = RegistryClient::new(ClientOptions {
            credentials: None,
            docker_config: Some(cfg),
            ..reg.client_options()
        })
        .unwrap();
        let m = c.get_manifest(&r, &[]).unwrap();
        assert!(!m.bytes.is_empty());
    }
}

#[test]
fn not_a_lode_image_is_reported() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let r = reg.reference("plain/image:1");
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let layer = write_oci_layout(&layout, "1", &[("amd64", b"hello")]);
    skopeo_copy(&reg, &format!("oci:{}:1", layout.display()), &r, false);
    let e = pull_image(&client, &r, &tmp.path().join("dst"), true).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "{r} is not a lode image (config media type application/vnd.oci.image.config.v1+json)"
        )) && msg.contains("lode convert"),
        "{msg}"
    );
    assert!(!layer.is_empty());
}

#[test]
fn pull_layers_of_a_skopeo_pushed_multi_platform_image() {
    let reg = TestRegistry::start();
    let client = reg.client();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let layers = write_oci_layout(
        &layout,
        "multi",
        &[("arm64", b"arm64 files"), ("amd64", b"amd64 files")],
    );
    let r = reg.reference("library/small:multi");
    skopeo_copy(&reg, &format!("oci:{}:multi", layout.display()), &r, true);

    let top = client.get_manifest(&r, &[]).unwrap();
    assert_eq!(top.media_type, "application/vnd.oci.image.index.v1+json");

    let img = pull_layers(&client, &r, &Platform::default()).unwrap();
    assert_eq!(img.platform, Some(Platform::new("linux", "amd64", None)));
    assert_eq!(
        img.config_media_type,
        "application/vnd.oci.image.config.v1+json"
    );
    let config: serde_json::Value = serde_json::from_slice(&img.config).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(img.layers.len(), 1);
    let (want_digest, want_bytes) = &layers["amd64"];
    assert_eq!(&img.layers[0].digest, want_digest);
    assert_eq!(
        img.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let mut got = Vec::new();
    img.open_layer(&client, &img.layers[0])
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(&got, want_bytes);
    assert_eq!(img.reference.digest(), Some(img.manifest_digest.as_str()));

    let arm = pull_layers(&client, &r, &Platform::new("linux", "arm64", None)).unwrap();
    assert_eq!(arm.layers[0].digest, layers["arm64"].0);

    let e = pull_layers(&client, &r, &Platform::new("linux", "s390x", None)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/amd64") && msg.contains("linux/arm64"),
        "{msg}"
    );

    // A lode image is refused by pull_layers.
    let src = tmp.path().join("lode");
    make_image_dir(&src, b"boot", &[]);
    let lr = reg.reference("lode/img:1");
    push_image(&client, &src, &lr).unwrap();
    let msg = pull_layers(&client, &lr, &Platform::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("already a lode image"), "{msg}");
}

/// Write an OCI layout by hand: one image per architecture (one gzip layer holding a file
/// with `content`), under an index tagged `tag`. Returns arch → (layer digest, bytes).
fn write_oci_layout(
    dir: &Path,
    tag: &str,
    images: &[(&str, &[u8])],
) -> std::collections::HashMap<String, (String, Vec<u8>)> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| -> String {
        let d = sha256(b);
        std::fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let mut out = std::collections::HashMap::new();
    let mut manifests = Vec::new();
    for (arch, content) in images {
        let root = dir.join(format!("rootfs-{arch}"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hello"), content).unwrap();
        let tar = dir.join(format!("layer-{arch}.tar"));
        let ok = Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("etc")
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar");
        let diff_id = sha256(&read(&tar));
        assert!(Command::new("gzip")
            .arg("-n")
            .arg(&tar)
            .status()
            .unwrap()
            .success());
        let gz = read(&dir.join(format!("layer-{arch}.tar.gz")));
        let layer = put(&gz);
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]}
        })
        .to_string();
        let config_d = put(config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": gz.len()}]
        })
        .to_string();
        let md = put(manifest.as_bytes());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "platform": {"os": "linux", "architecture": arch}
        }));
        out.insert(arch.to_string(), (layer, gz));
    }
    let index_body = if manifests.len() == 1 {
        // A single image: the layout's index points at its manifest directly.
        let mut m = manifests.pop().unwrap();
        m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        serde_json::json!({"schemaVersion": 2, "manifests": [m]})
    } else {
        let inner = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests
        })
        .to_string();
        let d = put(inner.as_bytes());
        serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]})
    };
    std::fs::write(dir.join("index.json"), index_body.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    out
}

fn skopeo_copy(reg: &TestRegistry, src: &str, dst: &Reference, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ]);
    if all {
        cmd.arg("--all");
    }
    let out = cmd
        .arg(src)
        .arg(format!("docker://{dst}"))
        .output()
        .unwrap_or_else(|e| panic!("skopeo: {e}; run scripts/setup.sh"));
    assert!(
        out.status.success(),
        "skopeo copy failed: {}\n{}\nregistry log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        reg.log()
    );
}

#[test]
fn harness_cleans_up_on_panic_and_fails_without_the_binary() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let r = std::panic::catch_unwind(move || {
        let reg = TestRegistry::start();
        *s.lock().unwrap() = Some((reg.pid(), reg.dir().to_path_buf()));
        panic!("test body fails");
    });
    assert!(r.is_err());
    let (pid, dir) = seen.lock().unwrap().clone().unwrap();
    // Killed and reaped: no such process (or, if the PID was reused, not our registry).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("docker-registry"),
        "registry {pid} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());

    let r = std::panic::catch_unwind(|| {
        TestRegistry::start_with_binary(
            Path::new("/nonexistent/docker-registry"),
            lode_registry::testing::TestAuth::None,
        )
    });
    let msg = r
        .err()
        .and_then(|p| p.downcast::<String>().ok())
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.contains("run scripts/setup.sh"), "{msg}");
}
