//! Remote backends against real servers: busybox httpd and `python3 -m http.server` (HTTP),
//! docker-registry (OCI registry), moto in server mode (S3, with signature checks), and
//! the fault-injecting proxy of lode-testkit in between for failures.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_registry::testing::TestRegistry;
use lode_registry::RegistryClient;
use lode_storage::backend::http::{HttpBackend, HttpOptions};
use lode_storage::backend::mirror::{MirrorBackend, MirrorState};
use lode_storage::backend::registry::{backend_client_options, RegistryBackend};
use lode_storage::backend::s3::{S3Backend, S3Options};
use lode_storage::backend::stats::{BackendStatsSnapshot, Counted};
use lode_storage::backend::{Backend, BackendErrorKind};
use lode_testkit::faultproxy::{Fault, FaultProxy};
use support::{busybox_httpd, pseudo_random, python_http_server, sha256_digest, ImageDir, MotoS3};

const MISSING: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn http(base: &str) -> HttpBackend {
    HttpBackend::new(base, HttpOptions::default()).expect("http backend")
}

fn http_with(base: &str, opts: HttpOptions) -> HttpBackend {
    HttpBackend::new(base, opts).expect("http backend")
}

/// Ranges at the start, the end, across the middle, single bytes and the whole blob.
fn check_ranges(b: &dyn Backend, digest: &str, data: &[u8]) {
    let n = data.len() as u64;
    let cases = [
        (0, 1),
        (0, 4096),
        (1, 1),
        (12_345, 54_321),
        (n - 1, 1),
        (n - 4096, 4096),
        (n / 2, n / 2),
        (0, n),
    ];
    for (off, len) in cases {
        let got = b
            .read_range(digest, off, len)
            .unwrap_or_else(|e| panic!("{} {off}+{len}: {e}", b.describe()));
        assert_eq!(got.len() as u64, len, "{off}+{len}");
        assert!(
            got == data[off as usize..(off + len) as usize],
            "{}: wrong bytes for {off}+{len}",
            b.describe()
        );
    }
    assert!(b.read_range(digest, 5, 0).unwrap().is_empty());
}

fn kind_of(r: Result<Vec<u8>, lode_storage::backend::BackendError>) -> BackendErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got {} bytes", v.len()),
        Err(e) => e.kind,
    }
}

// ------------------------------------------------------------------ HTTP

#[test]
fn http_ranges_against_busybox_httpd() {
    let img = ImageDir::new(&[300_000, 70_000]);
    let server = busybox_httpd(img.root());
    let b = http(&format!("{}/", server.url()));
    for (digest, data) in &img.blobs {
        check_ranges(&b, digest, data);
    }
    assert!(!b.server_ignores_ranges());

    // Missing blob; ranges past the end (partly: 206 cut short; wholly: 200 or 416).
    let (d0, data0) = &img.blobs[0];
    let n = data0.len() as u64;
    assert_eq!(
        kind_of(b.read_range(MISSING, 0, 10)),
        BackendErrorKind::NotFound
    );
    let e = b.read_range(d0, n - 10, 20).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::NotFound, "{e}");
    assert!(e.message.contains("past the end"), "{e}");
    assert_eq!(
        kind_of(b.read_range(d0, n + 100, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        kind_of(b.read_range("sha256:not-hex", 0, 10)),
        BackendErrorKind::Permanent
    );

    // Whole small files.
    assert_eq!(
        b.get_file("image.json").unwrap(),
        br#"{"format_version":1}"#
    );
    assert_eq!(b.get_file(&format!("blobs/{}", &d0[7..])).unwrap(), *data0);
    assert_eq!(
        b.get_file("bootstrap").unwrap_err().kind,
        BackendErrorKind::NotFound
    );

    // Many threads at once through one backend (one client, one pool).
    let b = Arc::new(b);
    let blobs = Arc::new(img.blobs.clone());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let b = b.clone();
            let blobs = blobs.clone();
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                for i in 0..25u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (d, data) = &blobs[(i % 2) as usize];
                    let n = data.len() as u64;
                    let off = (x >> 20) % n;
                    let len = 1 + (x >> 40) % (n - off).min(65_536);
                    let got = b.read_range(d, off, len).expect("concurrent read");
                    assert!(got == data[off as usize..(off + len) as usize]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
}

#[test]
fn http_server_that_ignores_ranges() {
    let img = ImageDir::new(&[200_000]);
    let server = python_http_server(img.root());
    let b = http(&server.url());
    let (d, data) = &img.blobs[0];
    check_ranges(&b, d, data);
    assert!(
        b.server_ignores_ranges(),
        "python's http.server answers 200"
    );
    assert_eq!(
        kind_of(b.read_range(MISSING, 0, 10)),
        BackendErrorKind::NotFound
    );
    let n = data.len() as u64;
    assert_eq!(
        kind_of(b.read_range(d, n - 1, 2)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        b.get_file("image.json").unwrap(),
        br#"{"format_version":1}"#
    );
}

#[test]
fn http_faults_through_the_fault_proxy() {
    let img = ImageDir::new(&[100_000]);
    let server = busybox_httpd(img.root());
    let proxy = FaultProxy::start(server.addr());
    let b = http_with(
        &proxy.url(),
        HttpOptions {
            timeout: Duration::from_millis(1500),
            headers: vec![("X-Lode-Test".into(), "yes".into())],
            ..Default::default()
        },
    );
    let (d, data) = &img.blobs[0];
    let read = || b.read_range(d, 1000, 5000);
    let want = &data[1000..6000];
    assert_eq!(read().unwrap(), want);
    let rec = proxy.records().pop().unwrap();
    assert_eq!(rec.header("range"), Some("bytes=1000-5999"));
    assert_eq!(rec.header("x-lode-test"), Some("yes"));

    for (status, kind) in [
        (500, BackendErrorKind::Transient),
        (503, BackendErrorKind::Transient),
        (429, BackendErrorKind::Transient),
        (404, BackendErrorKind::NotFound),
        (410, BackendErrorKind::NotFound),
        (401, BackendErrorKind::Permanent),
        (403, BackendErrorKind::Permanent),
    ] {
        proxy.fail_next(1, status);
        let e = read().unwrap_err();
        assert_eq!(e.kind, kind, "HTTP {status}: {e}");
        assert!(e.message.contains(&format!("HTTP {status}")), "{e}");
    }
    for fault in [
        Fault::Reset,
        Fault::Truncate(100),
        Fault::ShortBody(4999),
        Fault::Refuse,
    ] {
        proxy.inject(fault.clone(), 1);
        let e = read().unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Transient, "{fault:?}: {e}");
    }
    // The last one was a plain short body: our own length check caught it.
    proxy.short_body_next(1, 10);
    let e = read().unwrap_err();
    assert!(e.message.contains("short body"), "{e}");

    // A flipped bit is data as far as the backend knows (the fetcher verifies chunks).
    proxy.flip_bit_next(1, Some(777));
    let got = read().unwrap();
    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    assert_eq!(diff, vec![777]);
    assert_eq!(got[777] ^ want[777], 1);
    proxy.flip_bit_next(1, None);
    let got = read().unwrap();
    let (off, mask) = proxy.records().pop().unwrap().flipped.unwrap();
    assert_eq!(got[off as usize] ^ want[off as usize], mask);

    // Too slow: a timeout is transient, and it does not take long.
    proxy.set_latency(Duration::from_secs(5));
    let t = Instant::now();
    let e = read().unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Transient, "{e}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    proxy.set_latency(Duration::ZERO);

    // The server going away entirely: connection refused.
    proxy.set_persistent(Some(Fault::Refuse));
    assert_eq!(kind_of(read()), BackendErrorKind::Transient);
    proxy.clear();
    assert_eq!(read().unwrap(), want);
}

#[test]
fn http_through_a_forward_proxy() {
    // The blobs live under /img on the server; the backend's base URL names a host that
    // does not resolve, so only the proxy can have answered.
    let img = ImageDir::new_under("img", &[50_000]);
    let server = busybox_httpd(img.root());
    let proxy = FaultProxy::start(server.addr());
    let b = http_with(
        "http://blobs.lode-test.invalid:8080/img",
        HttpOptions {
            proxy: Some(proxy.url()),
            ..Default::default()
        },
    );
    let (d, data) = &img.blobs[0];
    assert_eq!(b.read_range(d, 10, 20).unwrap(), data[10..30]);
    let rec = proxy.records().pop().unwrap();
    assert_eq!(
        rec.target,
        format!("http://blobs.lode-test.invalid:8080/img/blobs/{}", &d[7..])
    );
    assert_eq!(rec.header("host"), Some("blobs.lode-test.invalid:8080"));
    assert_eq!(
        b.get_file("image.json").unwrap(),
        br#"{"format_version":1}"#
    );
    // Without the proxy the name does not resolve: transient (DNS may come back).
    let direct = http("http://blobs.lode-test.invalid:8080/img");
    assert_eq!(
        kind_of(direct.read_range(d, 0, 1)),
        BackendErrorKind::Transient
    );
}

// ------------------------------------------------------------------ mirror

#[test]
fn mirror_falls_back_to_origin_and_cools_down() {
    let img = ImageDir::new(&[80_000]);
    let server = busybox_httpd(img.root());
    let mirror_proxy = FaultProxy::start(server.addr());
    let origin_proxy = FaultProxy::start(server.addr());
    let opts = || HttpOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let mirror = http_with(&mirror_proxy.url(), opts());
    let origin = http_with(&origin_proxy.url(), opts());
    let b = MirrorBackend::with_cooldown(
        Box::new(mirror),
        Box::new(origin),
        Duration::from_millis(1500),
    );
    assert!(b.describe().contains("via mirror"), "{}", b.describe());
    let (d, data) = &img.blobs[0];
    let read = || b.read_range(d, 100, 1000);
    let want = &data[100..1100];

    assert_eq!(read().unwrap(), want);
    assert_eq!((mirror_proxy.requests(), origin_proxy.requests()), (1, 0));

    // Mirror down (refuses connections): this read falls back, the next ones skip it.
    mirror_proxy.set_persistent(Some(Fault::Refuse));
    for _ in 0..5 {
        assert_eq!(read().unwrap(), want);
    }
    assert_eq!((mirror_proxy.requests(), origin_proxy.requests()), (2, 5));
    assert!(matches!(b.state(), MirrorState::CoolingDown { .. }));

    // After the cool-down the mirror is tried again; still down: back to cooling down.
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(b.state(), MirrorState::Up);
    assert_eq!(read().unwrap(), want);
    assert_eq!((mirror_proxy.requests(), origin_proxy.requests()), (3, 6));
    assert!(matches!(b.state(), MirrorState::CoolingDown { .. }));

    // Mirror back, and a mirror that answers errors (503) also falls back.
    mirror_proxy.clear();
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(read().unwrap(), want);
    assert_eq!((mirror_proxy.requests(), origin_proxy.requests()), (4, 6));
    mirror_proxy.fail_next(1, 503);
    assert_eq!(read().unwrap(), want);
    assert_eq!((mirror_proxy.requests(), origin_proxy.requests()), (5, 7));

    // Both failing: the origin's error (its kind), naming the mirror's too.
    origin_proxy.set_persistent(Some(Fault::Status(404)));
    let e = read().unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::NotFound, "{e}");
    origin_proxy.clear();
    std::thread::sleep(Duration::from_millis(1600));
    mirror_proxy.fail_next(1, 500);
    origin_proxy.fail_next(1, 503);
    let e = read().unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Transient, "{e}");
    assert!(
        e.message.contains("HTTP 503")
            && e.message.contains("mirror failed first")
            && e.message.contains("HTTP 500"),
        "{e}"
    );
    let c = b.counters();
    assert_eq!(c.mirror_reads, 2);
    assert_eq!(c.fallbacks, 4);
}

// ------------------------------------------------------------------ counters

#[test]
fn counted_backend_stats() {
    let img = ImageDir::new(&[40_000]);
    let server = busybox_httpd(img.root());
    let proxy = FaultProxy::start(server.addr());
    let b = Counted::new(http(&proxy.url()));
    let (d, _) = &img.blobs[0];
    b.read_range(d, 0, 1000).unwrap();
    b.read_range(d, 1000, 3000).unwrap();
    b.read_range(MISSING, 0, 10).unwrap_err();
    proxy.fail_next(1, 503);
    b.read_range(d, 0, 10).unwrap_err();
    proxy.fail_next(1, 403);
    b.read_range(d, 0, 10).unwrap_err();
    let s = b.snapshot();
    assert_eq!(s.backend, proxy.url());
    assert_eq!(
        (
            s.requests,
            s.bytes,
            s.transient_errors,
            s.not_found_errors,
            s.permanent_errors,
            s.in_flight
        ),
        (5, 4000, 1, 1, 1, 0)
    );
    assert_eq!(s.latency.counts.iter().sum::<u64>(), 5);
    assert!(s.latency.sum_us > 0);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["bytes"], 4000);
    let back: BackendStatsSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
}

// ------------------------------------------------------------------ registry

fn registry_backend(reg: &TestRegistry, name: &str) -> RegistryBackend {
    let client = RegistryClient::new(backend_client_options(reg.client_options())).unwrap();
    RegistryBackend::new(client, reg.reference(name))
}

#[test]
fn registry_backend_against_docker_registry() {
    let reg = TestRegistry::start();
    let data = pseudo_random(250_000, 42);
    let digest = sha256_digest(&data);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let reference = reg.reference("lode/backend-test:v1");
    reg.client()
        .push_blob_from_file(&reference, file.path(), &digest, data.len() as u64)
        .unwrap();

    let b = registry_backend(&reg, "lode/backend-test:v1");
    assert!(
        b.describe().contains("lode/backend-test"),
        "{}",
        b.describe()
    );
    check_ranges(&b, &digest, &data);
    let n = data.len() as u64;
    assert_eq!(
        kind_of(b.read_range(MISSING, 0, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        kind_of(b.read_range(&digest, n - 5, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        kind_of(b.read_range(&digest, n + 5, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        kind_of(b.read_range("sha256:xyz", 0, 10)),
        BackendErrorKind::Permanent
    );
    // Another repository does not have the blob.
    let other = registry_backend(&reg, "lode/other:v1");
    assert_eq!(
        kind_of(other.read_range(&digest, 0, 10)),
        BackendErrorKind::NotFound
    );

    // Concurrent readers share the client.
    let b = Arc::new(b);
    let data = Arc::new(data);
    let ts: Vec<_> = (0..4u64)
        .map(|t| {
            let (b, data, digest) = (b.clone(), data.clone(), digest.clone());
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let off = (t * 50_000 + i * 3_001) % (n - 8192);
                    let got = b.read_range(&digest, off, 8192).unwrap();
                    assert!(got == data[off as usize..off as usize + 8192]);
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }

    // The registry gone: transient.
    drop(reg);
    assert_eq!(
        kind_of(b.read_range(&digest, 0, 10)),
        BackendErrorKind::Transient
    );
}

#[test]
fn registry_backend_wrong_password_is_permanent() {
    let reg = TestRegistry::start_with_basic_auth("lode", "right");
    let data = pseudo_random(10_000, 7);
    let digest = sha256_digest(&data);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let reference = reg.reference("lode/private:v1");
    reg.client()
        .push_blob_from_file(&reference, file.path(), &digest, data.len() as u64)
        .unwrap();
    let good = registry_backend(&reg, "lode/private:v1");
    assert_eq!(good.read_range(&digest, 100, 200).unwrap(), data[100..300]);

    let mut opts = backend_client_options(reg.client_options());
    opts.credentials = Some(("lode".into(), "wrong".into()));
    let bad = RegistryBackend::new(RegistryClient::new(opts).unwrap(), reference);
    let e = bad.read_range(&digest, 0, 10).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Permanent, "{e}");
}

// ------------------------------------------------------------------ S3

fn s3(moto: &MotoS3, f: impl FnOnce(&mut S3Options)) -> S3Backend {
    let mut o = S3Options {
        endpoint: moto.endpoint(),
        region: "us-east-1".into(),
        bucket: "lode-blobs".into(),
        prefix: "images/test/blobs/".into(),
        access_key: moto.access_key.clone(),
        secret_key: moto.secret_key.clone(),
        path_style: true,
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    f(&mut o);
    S3Backend::new(o).expect("s3 backend")
}

#[test]
fn s3_backend_against_moto() {
    let moto = MotoS3::start();
    let b = s3(&moto, |_| {});
    b.create_bucket().unwrap();
    b.create_bucket()
        .expect("an existing bucket of ours is fine");

    // Upload: one blob from bytes, one from a file; a plain object too.
    let data0 = pseudo_random(300_000, 1);
    let d0 = sha256_digest(&data0);
    b.put_object(&b.object_key(&d0).unwrap(), &data0).unwrap();
    let data1 = pseudo_random(123_457, 2);
    let d1 = sha256_digest(&data1);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &data1).unwrap();
    b.put_blob_file(&d1, f.path()).unwrap();
    b.put_object("images/test/image.json", b"{}").unwrap();
    assert_eq!(b.get_object("images/test/image.json").unwrap(), b"{}");
    // A key that needs encoding. (moto checks signatures against the decoded path, so
    // with keys holding `+`, `%`, `=`, `:` or non-ASCII even boto3's requests fail there.)
    b.put_object("images/test/odd key~1", b"odd").unwrap();
    assert_eq!(b.get_object("images/test/odd key~1").unwrap(), b"odd");

    check_ranges(&b, &d0, &data0);
    check_ranges(&b, &d1, &data1);
    let n = data0.len() as u64;
    assert_eq!(
        kind_of(b.read_range(MISSING, 0, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        kind_of(b.read_range(&d0, n - 5, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        kind_of(b.read_range(&d0, n + 5, 10)),
        BackendErrorKind::NotFound
    );
    assert_eq!(
        b.get_object("images/test/nothing").unwrap_err().kind,
        BackendErrorKind::NotFound
    );

    // Another prefix has nothing; another bucket does not exist.
    let other = s3(&moto, |o| o.prefix = "elsewhere/".into());
    assert_eq!(
        kind_of(other.read_range(&d0, 0, 10)),
        BackendErrorKind::NotFound
    );
    let nobucket = s3(&moto, |o| o.bucket = "no-such-bucket".into());
    assert_eq!(
        kind_of(nobucket.read_range(&d0, 0, 10)),
        BackendErrorKind::NotFound
    );

    // Wrong secret, unknown key, no signature at all: permanent.
    let wrong = s3(&moto, |o| o.secret_key = "not-the-secret".into());
    let e = wrong.read_range(&d0, 0, 10).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Permanent, "{e}");
    assert!(e.message.contains("SignatureDoesNotMatch"), "{e}");
    let e = wrong.put_object("images/test/x", b"x").unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Permanent, "{e}");
    let unknown = s3(&moto, |o| o.access_key = "AKIAUNKNOWNUNKNOWN00".into());
    let e = unknown.read_range(&d0, 0, 10).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Permanent, "{e}");
    let anonymous = s3(&moto, |o| {
        o.access_key = String::new();
        o.secret_key = String::new();
    });
    assert!(anonymous.read_range(&d0, 0, 10).is_err());

    // Concurrent ranged reads.
    let b = Arc::new(b);
    let data0 = Arc::new(data0);
    let ts: Vec<_> = (0..4u64)
        .map(|t| {
            let (b, data, d) = (b.clone(), data0.clone(), d0.clone());
            std::thread::spawn(move || {
                for i in 0..8u64 {
                    let off = (t * 70_001 + i * 9_999) % (n - 4096);
                    let got = b.read_range(&d, off, 4096).unwrap();
                    assert!(got == data[off as usize..off as usize + 4096]);
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
}

#[test]
fn s3_virtual_hosted_through_proxy_and_faults() {
    let moto = MotoS3::start();
    let setup = s3(&moto, |_| {});
    setup.create_bucket().unwrap();
    let data = pseudo_random(64_000, 3);
    let d = sha256_digest(&data);
    setup
        .put_object(&setup.object_key(&d).unwrap(), &data)
        .unwrap();

    // Virtual-hosted style: the bucket is in the host name (which only the proxy can
    // reach); the signature covers that Host header and must still match.
    let proxy = FaultProxy::start(moto.server.addr());
    let port = moto.server.addr().port();
    let vh = s3(&moto, |o| {
        o.endpoint = format!("http://s3.lode-test.invalid:{port}");
        o.path_style = false;
        o.proxy = Some(proxy.url());
        o.timeout = Duration::from_secs(3);
    });
    assert_eq!(vh.read_range(&d, 1, 100).unwrap(), data[1..101]);
    let rec = proxy.records().pop().unwrap();
    assert_eq!(
        rec.header("host"),
        Some(format!("lode-blobs.s3.lode-test.invalid:{port}").as_str())
    );
    assert!(rec
        .header("authorization")
        .unwrap()
        .starts_with("AWS4-HMAC-SHA256 "));
    vh.put_object(&vh.object_key(MISSING).unwrap(), b"vh")
        .unwrap();
    assert_eq!(vh.read_range(MISSING, 0, 2).unwrap(), b"vh");

    // Faults between the backend and S3.
    proxy.fail_next(1, 503);
    assert_eq!(
        kind_of(vh.read_range(&d, 0, 10)),
        BackendErrorKind::Transient
    );
    proxy.reset_next(1);
    assert_eq!(
        kind_of(vh.read_range(&d, 0, 1000)),
        BackendErrorKind::Transient
    );
    proxy.short_body_next(1, 10);
    assert_eq!(
        kind_of(vh.read_range(&d, 0, 1000)),
        BackendErrorKind::Transient
    );
    proxy.set_persistent(Some(Fault::Refuse));
    assert_eq!(
        kind_of(vh.read_range(&d, 0, 10)),
        BackendErrorKind::Transient
    );
    proxy.clear();
    assert_eq!(vh.read_range(&d, 0, 10).unwrap(), data[..10]);
}
