//! Behaviour a real registry will not show on demand, against a tiny HTTP server that
//! follows the distribution spec for the few endpoints used: retries (503, 429, 404),
//! blob redirects to storage that ignores Range, expiry of the cached storage URL, upload
//! retries, Bearer tokens (caching, not leaking Authorization to storage).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{bytes, serve, sha256, Req, Resp};
use lode_registry::{ClientOptions, Error, Reference, RegistryClient};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

fn client(retries: u32) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        plain_http: true,
        retries,
        docker_config: Some("/nonexistent/lode-test/config.json".into()),
        ..ClientOptions::default()
    })
    .unwrap()
}

fn reference(addr: std::net::SocketAddr, rest: &str) -> Reference {
    Reference::parse(&format!("{addr}/{rest}")).unwrap()
}

fn not_found() -> Resp {
    Resp::new(
        404,
        r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"nope"}}]}"#,
    )
    .header("Content-Type", "application/json")
}

#[test]
fn retries_503_twice_then_succeeds() {
    let manifest_gets = Arc::new(AtomicUsize::new(0));
    let m = manifest_gets.clone();
    let (addr, _) = serve(move |req: &Req| match req.path() {
        "/v2/x/manifests/t" => {
            if m.fetch_add(1, Ordering::SeqCst) < 2 {
                Resp::new(503, "busy")
            } else {
                Resp::new(200, MANIFEST)
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            }
        }
        "/v2/x/manifests/slow" => Resp::new(429, "").header("Retry-After", "0"),
        _ => not_found(),
    });
    let r = reference(addr, "x:t");
    let got = client(2).get_manifest(&r, &[]).unwrap();
    assert_eq!(manifest_gets.load(Ordering::SeqCst), 3);
    assert_eq!(got.bytes, MANIFEST.as_bytes());
    assert_eq!(got.digest, sha256(MANIFEST.as_bytes()));
    assert_eq!(got.media_type, "application/vnd.oci.image.manifest.v1+json");

    // Fewer retries than failures: the 503 is reported.
    manifest_gets.store(0, Ordering::SeqCst);
    let e = client(1).get_manifest(&r, &[]).unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert_eq!(manifest_gets.load(Ordering::SeqCst), 2);
    assert!(e.to_string().contains(": busy"), "{e}");
}

#[test]
fn no_retry_on_404_and_429_is_retried() {
    let (addr, count) = serve(|req: &Req| match req.path() {
        "/v2/x/manifests/slow" => Resp::new(429, "").header("Retry-After", "0"),
        _ => not_found(),
    });
    let e = client(3)
        .get_manifest(&reference(addr, "x:nope"), &[])
        .unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(e.is_not_found());
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "GET http://{addr}/v2/x/manifests/nope: HTTP 404: MANIFEST_UNKNOWN: manifest unknown"
        )) && msg.contains(r#"{"Tag":"nope"}"#),
        "{msg}"
    );
    assert_eq!(e.registry_codes(), vec!["MANIFEST_UNKNOWN"]);

    count.store(0, Ordering::SeqCst);
    let e = client(3)
        .get_manifest(&reference(addr, "x:slow"), &[])
        .unwrap_err();
    assert_eq!(e.status(), Some(429));
    assert_eq!(count.load(Ordering::SeqCst), 4);
}

#[test]
fn connection_refused_is_retried_then_reported() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = Reference::parse(&format!("127.0.0.1:{port}/x:t")).unwrap();
    let start = std::time::Instant::now();
    let e = client(2).get_manifest(&r, &[]).unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    // Two backoffs happened (≥ 125 ms + 250 ms).
    assert!(start.elapsed() >= std::time::Duration::from_millis(375));
}

#[test]
fn garbage_from_the_server_is_an_error_not_a_panic() {
    let (addr, _) = serve(|req: &Req| match req.path() {
        "/v2/x/manifests/nojson" => Resp::new(200, "\u{0}\u{1}garbage"),
        "/v2/x/manifests/badauth" => {
            Resp::new(401, "").header("WWW-Authenticate", "Bearer ,,=\"\"")
        }
        "/v2/x/manifests/badrealm" => {
            Resp::new(401, "").header("WWW-Authenticate", "Bearer realm=\"ftp://x\"")
        }
        "/v2/x/manifests/big" => Resp::new(200, vec![b'x'; (8 << 20) + 10]),
        p if p.starts_with("/v2/x/blobs/") => {
            Resp::new(206, "abc").header("Content-Range", "bytes nonsense")
        }
        _ => not_found(),
    });
    let c = client(0);
    for (tag, want) in [
        ("nojson", "media type"),
        ("badauth", "realm"),
        ("badrealm", "not an http(s) URL"),
        ("big", "larger than"),
    ] {
        let e = c
            .get_manifest(&reference(addr, &format!("x:{tag}")), &[])
            .unwrap_err();
        assert!(e.to_string().contains(want), "{tag}: {e}");
    }
    let e = c
        .get_blob_range(&reference(addr, "x"), &sha256(b"x"), 0, 3)
        .unwrap_err();
    assert!(e.to_string().contains("Content-Range"), "{e}");
}

/// A registry needing Bearer tokens (token endpoint on itself, Basic creds u:p), whose
/// blob endpoint redirects to a storage server on another port that ignores Range and
/// honours only the latest signed URL generation.
struct Fake {
    registry: std::net::SocketAddr,
    token_requests: Arc<AtomicUsize>,
    blob_requests: Arc<AtomicUsize>,
    storage_requests: Arc<Mutex<Vec<Req>>>,
    generation: Arc<AtomicUsize>,
    puts: Arc<Mutex<Vec<Req>>>,
}

fn fake(blob: Vec<u8>) -> Fake {
    let digest = sha256(&blob);
    let generation = Arc::new(AtomicUsize::new(1));
    let storage_requests = Arc::new(Mutex::new(Vec::new()));
    let (storage, _) = {
        let g = generation.clone();
        let seen = storage_requests.clone();
        let blob = blob.clone();
        serve(move |req: &Req| {
            seen.lock().unwrap().push(req.clone());
            if req.query("gen") != vec![g.load(Ordering::SeqCst).to_string()] {
                return Resp::new(403, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>");
            }
            Resp::new(200, blob.clone()) // ignores Range
        })
    };
    let token_requests = Arc::new(AtomicUsize::new(0));
    let blob_requests = Arc::new(AtomicUsize::new(0));
    let puts = Arc::new(Mutex::new(Vec::new()));
    let put_failures = Arc::new(AtomicUsize::new(0));
    let registry_addr = Arc::new(Mutex::new(None::<std::net::SocketAddr>));
    let (registry, _) = {
        let (tr, br, g, puts, ra) = (
            token_requests.clone(),
            blob_requests.clone(),
            generation.clone(),
            puts.clone(),
            registry_addr.clone(),
        );
        serve(move |req: &Req| {
            let me = ra.lock().unwrap().expect("address set");
            if req.path() == "/token" {
                tr.fetch_add(1, Ordering::SeqCst);
                if req.header("Authorization") != Some("Basic dTpw") {
                    return Resp::new(
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad creds"}]}"#,
                    );
                }
                assert_eq!(req.query("service"), vec!["fake-registry"]);
                let scopes = req.query("scope").join(" ");
                let token = format!("tok-{}", scopes.replace(' ', "_"));
                return Resp::new(200, format!(r#"{{"token":"{token}","expires_in":300}}"#));
            }
            let auth = req.header("Authorization").unwrap_or("");
            if !auth.starts_with("Bearer tok-") {
                return Resp::new(401, r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#).header(
                    "WWW-Authenticate",
                    &format!(r#"Bearer realm="http://{me}/token",service="fake-registry",scope="repository:x:pull""#),
                );
            }
            let path = req.path().to_string();
            if path == format!("/v2/x/blobs/{digest}") {
                br.fetch_add(1, Ordering::SeqCst);
                let gen = g.load(Ordering::SeqCst);
                return Resp::new(307, "").header(
                    "Location",
                    &format!("http://{storage}/store/{digest}?gen={gen}"),
                );
            }
            if path == "/v2/x/blobs/uploads/" && req.method == "POST" {
                assert!(auth.contains("pull,push"), "{auth}");
                return Resp::new(202, "")
                    .header("Location", "/v2/x/blobs/uploads/session-1?_state=abc");
            }
            if path == "/v2/x/blobs/uploads/session-1" && req.method == "PUT" {
                puts.lock().unwrap().push(req.clone());
                if put_failures.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Resp::new(503, "try again");
                }
                return Resp::new(201, "");
            }
            if path.starts_with("/v2/x/blobs/") && req.method == "HEAD" {
                return Resp::new(404, "");
            }
            not_found()
        })
    };
    *registry_addr.lock().unwrap() = Some(registry);
    Fake {
        registry,
        token_requests,
        blob_requests,
        storage_requests,
        generation,
        puts,
    }
}

fn bearer_client(password: &str) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        plain_http: true,
        retries: 2,
        credentials: Some(("u".into(), password.into())),
        ..ClientOptions::default()
    })
    .unwrap()
}

#[test]
fn bearer_tokens_redirect_cache_and_range_ignoring_storage() {
    let blob = bytes(21, 100_000);
    let digest = sha256(&blob);
    let f = fake(blob.clone());
    let c = bearer_client("p");
    let r = reference(f.registry, "x");

    let got = c.get_blob_range(&r, &digest, 1000, 500).unwrap();
    assert_eq!(got, &blob[1000..1500]);
    assert_eq!(f.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(f.blob_requests.load(Ordering::SeqCst), 1);

    // Later ranges go straight to the cached storage URL; the token is reused.
    let got = c.get_blob_range(&r, &digest, 99_990, 100).unwrap();
    assert_eq!(got, &blob[99_990..]);
    let got = c.get_blob_range(&r, &digest, 0, 1).unwrap();
    assert_eq!(got, &blob[..1]);
    assert_eq!(f.blob_requests.load(Ordering::SeqCst), 1);
    assert_eq!(f.token_requests.load(Ordering::SeqCst), 1);
    {
        let seen = f.storage_requests.lock().unwrap();
        assert_eq!(seen.len(), 3);
        for req in seen.iter() {
            assert_eq!(
                req.header("Authorization"),
                None,
                "registry token leaked to storage"
            );
            assert!(req.header("Range").is_some());
        }
    }

    // The signed URL expires: back to the registry for a new one.
    f.generation.store(2, Ordering::SeqCst);
    let got = c.get_blob_range(&r, &digest, 5, 10).unwrap();
    assert_eq!(got, &blob[5..15]);
    assert_eq!(f.blob_requests.load(Ordering::SeqCst), 2);
    assert_eq!(f.storage_requests.lock().unwrap().len(), 5);

    // Whole-blob reads verify through the redirect too.
    let mut all = Vec::new();
    std::io::Read::read_to_end(
        &mut c.get_blob(&r, &digest, Some(100_000)).unwrap(),
        &mut all,
    )
    .unwrap();
    assert_eq!(all, blob);

    // Wrong password: the token server's refusal, clearly.
    let bad = bearer_client("wrong");
    let e = bad.get_blob_range(&r, &digest, 0, 1).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    assert!(
        msg.contains("refused a token") && msg.contains("\"u\"") && msg.contains("bad creds"),
        "{msg}"
    );
}

#[test]
fn upload_is_retried_from_a_new_session() {
    let f = fake(Vec::new());
    let c = bearer_client("p");
    let r = reference(f.registry, "x");
    let tmp = tempfile::tempdir().unwrap();
    let data = bytes(22, 30_000);
    let path = tmp.path().join("b");
    std::fs::write(&path, &data).unwrap();
    let digest = sha256(&data);
    assert!(c.push_blob_from_file(&r, &path, &digest, 30_000).unwrap());
    let puts = f.puts.lock().unwrap();
    assert_eq!(puts.len(), 2);
    for p in puts.iter() {
        assert_eq!(p.body, data);
        assert_eq!(p.query("digest"), vec![digest.clone()]);
        assert_eq!(p.query("_state"), vec!["abc"]);
        assert_eq!(p.header("Content-Type"), Some("application/octet-stream"));
    }
    // A file of the wrong size is refused before anything is sent.
    let e = c
        .push_blob_from_file(&r, &path, &digest, 30_001)
        .unwrap_err();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e:?}");
}
