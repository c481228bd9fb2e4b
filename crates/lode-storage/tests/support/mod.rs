//! Real servers for the backend tests, each on a free loopback port, started from a
//! temporary directory (its log is there), killed by PID and waited for on drop — also when
//! the test panics — and the directory removed.
//!
//! - [`busybox_httpd`]: busybox's static web server (answers Range with 206);
//! - [`python_http_server`]: `python3 -m http.server` (ignores Range: 200 with everything);
//! - [`MotoS3`]: moto in server mode, an S3-compatible server, with SigV4 signature checks
//!   switched on and one IAM user allowed `s3:*`.
//!
//! A missing server is a test failure that says to run scripts/setup.sh, never a skip.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub struct ChildServer {
    name: String,
    child: Child,
    addr: SocketAddr,
    // Removed after the child is killed (Drop::drop runs before fields are dropped).
    dir: tempfile::TempDir,
}

impl ChildServer {
    /// Start `make(port, dir)` on a free port until it answers HTTP (any status) on
    /// 127.0.0.1:port; retries a few ports if one was taken meanwhile.
    pub fn start(
        name: &str,
        install_hint: &str,
        make: impl Fn(u16, &Path) -> Command,
    ) -> ChildServer {
        let mut last = String::new();
        for _ in 0..4 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("lode-test-{name}-"))
                .tempdir()
                .expect("tempdir");
            let port = free_port();
            let log_path = dir.path().join("server.log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut cmd = make(port, dir.path());
            cmd.current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log);
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => panic!("starting {name} ({cmd:?}): {e}; {install_hint}"),
            };
            let mut s = ChildServer {
                name: name.to_string(),
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                dir,
            };
            match s.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return s,
                Err(e) => {
                    last = format!("{e}\n--- {name} log ---\n{}", s.log());
                    let taken = last.contains("in use") || last.contains("Address already");
                    if !taken {
                        break;
                    }
                }
            }
        }
        panic!("{name} did not start: {last}\n{install_hint}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited with {status}", self.name));
            }
            if http_status(self.addr, "/").is_some() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!("{} did not answer within {timeout:?}", self.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // This child only, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Status of `GET path`, if something answers HTTP there.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

const SETUP_HINT: &str = "run scripts/setup.sh";

/// busybox httpd serving `root` (Range → 206).
pub fn busybox_httpd(root: &Path) -> ChildServer {
    let root = root.to_path_buf();
    ChildServer::start(
        "busybox-httpd",
        "the HTTP backend tests need busybox (Debian package busybox); run scripts/setup.sh",
        move |port, _| {
            let mut c = Command::new("busybox");
            c.args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
                .arg(&root);
            c
        },
    )
}

/// `python3 -m http.server` serving `root` (ignores Range: 200 with the whole file).
pub fn python_http_server(root: &Path) -> ChildServer {
    let root = root.to_path_buf();
    ChildServer::start("python-http.server", SETUP_HINT, move |port, _| {
        let mut c = Command::new("python3");
        c.args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(&root);
        c
    })
}

/// moto's S3 in server mode, checking signatures: one IAM user (`s3:*`) and its generated
/// key pair.
pub struct MotoS3 {
    pub server: ChildServer,
    pub access_key: String,
    pub secret_key: String,
}

impl MotoS3 {
    pub fn start() -> MotoS3 {
        let server = ChildServer::start(
            "moto-s3",
            "the S3 backend tests need moto in server mode (pip install 'moto[server]'); run scripts/setup.sh",
            |port, _| {
                let mut c = Command::new("python3");
                c.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]);
                c
            },
        );
        let http = reqwest::blocking::Client::new();
        let url = server.url();
        // Authentication is off until reset-auth below: these calls need a well-formed
        // Authorization header only so moto routes them to IAM.
        let iam = |params: &[(&str, &str)]| -> String {
            let mut form = vec![("Version", "2010-05-08")];
            form.extend_from_slice(params);
            let resp = http
                .post(format!("{url}/"))
                .header(
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=setup/20240101/us-east-1/iam/aws4_request, \
                     SignedHeaders=host, Signature=00",
                )
                .header("X-Amz-Date", "20240101T000000Z")
                .form(&form)
                .send()
                .expect("moto IAM request");
            let status = resp.status();
            let body = resp.text().unwrap_or_default();
            assert!(status.is_success(), "moto IAM {params:?}: {status}: {body}");
            body
        };
        iam(&[("Action", "CreateUser"), ("UserName", "lode")]);
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
        iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", "lode"),
            ("PolicyName", "s3-all"),
            ("PolicyDocument", policy),
        ]);
        let keys = iam(&[("Action", "CreateAccessKey"), ("UserName", "lode")]);
        let tag = |t: &str| {
            keys.split_once(&format!("<{t}>"))
                .and_then(|(_, r)| r.split_once(&format!("</{t}>")))
                .map(|(v, _)| v.to_string())
                .unwrap_or_else(|| panic!("no {t} in CreateAccessKey answer: {keys}"))
        };
        let (access_key, secret_key) = (tag("AccessKeyId"), tag("SecretAccessKey"));
        // From now on every request must be signed by a known key with a matching signature.
        let r = http
            .post(format!("{url}/moto-api/reset-auth"))
            .body("0")
            .send()
            .expect("moto reset-auth");
        assert!(r.status().is_success(), "moto reset-auth: {}", r.status());
        MotoS3 {
            server,
            access_key,
            secret_key,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.url()
    }
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An image directory: `blobs/<hex>` for each blob and an `image.json`.
pub struct ImageDir {
    pub dir: tempfile::TempDir,
    /// (digest, bytes)
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl ImageDir {
    pub fn new(sizes: &[usize]) -> ImageDir {
        Self::new_under("", sizes)
    }

    /// The image directory at `sub` below the served root (`""`: the root itself).
    pub fn new_under(sub: &str, sizes: &[usize]) -> ImageDir {
        let dir = tempfile::Builder::new()
            .prefix("lode-test-img-")
            .tempdir()
            .expect("tempdir");
        let img = dir.path().join(sub);
        std::fs::create_dir_all(img.join("blobs")).expect("blobs dir");
        let mut blobs = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let data = pseudo_random(n, i as u64 + 1);
            let digest = sha256_digest(&data);
            std::fs::write(img.join("blobs").join(&digest[7..]), &data).expect("blob");
            blobs.push((digest, data));
        }
        std::fs::write(img.join("image.json"), br#"{"format_version":1}"#).expect("image.json");
        ImageDir { dir, blobs }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn blob_path(&self, i: usize) -> PathBuf {
        self.dir.path().join("blobs").join(&self.blobs[i].0[7..])
    }
}
