//! A real registry for tests: Debian's `docker-registry` (distribution 2.8) on loopback,
//! filesystem storage in a temporary directory, stopped (by PID) and cleaned up on drop,
//! also when the test panics.
//!
//! A missing `docker-registry` is a test failure ("run scripts/setup.sh"), never a skip.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{ClientOptions, RegistryClient};
use crate::reference::Reference;

/// The registry binary; `LODE_DOCKER_REGISTRY` overrides it.
pub fn registry_binary() -> PathBuf {
    std::env::var_os("LODE_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// How the test registry authenticates.
#[derive(Debug, Clone)]
pub enum TestAuth {
    None,
    /// `auth.htpasswd` with one bcrypt user.
    Htpasswd {
        user: String,
        password: String,
    },
    /// `auth.token`: tokens from `realm`, signed by the key of the certificate(s) in
    /// `root_cert_pem`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_pem: String,
    },
}

pub struct TestRegistry {
    child: Child,
    addr: SocketAddr,
    auth: TestAuth,
    tls: bool,
    // Dropped after `child` is killed (Drop::drop runs before the fields are dropped).
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// An anonymous registry.
    pub fn start() -> Self {
        Self::start_with(TestAuth::None)
    }

    /// A registry that requires Basic auth as `user`/`password`.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Self {
        Self::start_with(TestAuth::Htpasswd {
            user: user.into(),
            password: password.into(),
        })
    }

    pub fn start_with(auth: TestAuth) -> Self {
        Self::start_with_binary(&registry_binary(), auth)
    }

    /// Start `bin` (a `docker-registry`); panics with "run scripts/setup.sh" if it is missing.
    pub fn start_with_binary(bin: &Path, auth: TestAuth) -> Self {
        Self::start_full(bin, auth, None)
    }

    /// Serve HTTPS with this certificate and key (PEM); `client_options` then set
    /// `insecure_tls` instead of `plain_http`.
    pub fn start_with_tls(auth: TestAuth, cert_pem: &str, key_pem: &str) -> Self {
        Self::start_full(&registry_binary(), auth, Some((cert_pem, key_pem)))
    }

    /// HTTPS and Basic auth (user `tls-user`, password `tls-pass`).
    pub fn start_with_basic_auth_tls(cert_pem: &str, key_pem: &str) -> Self {
        let auth = TestAuth::Htpasswd {
            user: "tls-user".into(),
            password: "tls-pass".into(),
        };
        Self::start_with_tls(auth, cert_pem, key_pem)
    }

    fn start_full(bin: &Path, auth: TestAuth, tls: Option<(&str, &str)>) -> Self {
        if !bin.exists() {
            panic!(
                "{} not found: the registry tests need Debian's docker-registry; run scripts/setup.sh",
                bin.display()
            );
        }
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("lode-test-registry-")
                .tempdir()
                .expect("tempdir");
            let port = free_port();
            let config = write_config(dir.path(), port, &auth, tls);
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path).expect("registry log file");
            let child = Command::new(bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .env_remove("REGISTRY_HTTP_ADDR")
                .env_remove("REGISTRY_STORAGE")
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("starting {}: {e}; run scripts/setup.sh", bin.display())
                });
            let mut reg = TestRegistry {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                auth: auth.clone(),
                tls: tls.is_some(),
                dir,
            };
            match reg.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return reg,
                Err(e) => {
                    last_log = format!(
                        "{e}\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    // Port taken between probe and bind: try another; anything else is fatal.
                    if !last_log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("docker-registry exited with {status}"));
            }
            if let Some(code) = http_status(self.addr, "/v2/") {
                // A TLS listener answers plain HTTP with 400.
                if code == 200 || code == 401 || (self.tls && code == 400) {
                    return Ok(());
                }
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "docker-registry did not answer GET /v2/ within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The registry process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary directory (config, storage, log); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's filesystem storage root (`docker/registry/v2/...` below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where a blob's bytes are stored (to corrupt them in tests).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `host/name` parsed, e.g. `reference("lode/test:v1")`.
    pub fn reference(&self, name: &str) -> Reference {
        Reference::parse(&format!("{}/{name}", self.host())).expect("test reference")
    }

    /// Plain HTTP (or HTTPS accepting the test certificate), the htpasswd user's credentials if any, no auth files of the machine
    /// (`docker_config` points at a file that does not exist), 2 retries.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            plain_http: !self.tls,
            insecure_tls: self.tls,
            credentials: match &self.auth {
                TestAuth::Htpasswd { user, password } => Some((user.clone(), password.clone())),
                _ => None,
            },
            docker_config: Some(self.dir.path().join("no-auth-file.json")),
            retries: 2,
            ..ClientOptions::default()
        }
    }

    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(self.client_options()).expect("registry client")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // This child only, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn write_config(dir: &Path, port: u16, auth: &TestAuth, tls: Option<(&str, &str)>) -> PathBuf {
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage).expect("storage dir");
    let mut yml = format!(
        "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: lode-test-secret
",
        storage = storage.display()
    );
    if let Some((cert, key)) = tls {
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert).expect("tls cert");
        std::fs::write(&k, key).expect("tls key");
        yml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            c.display(),
            k.display()
        ));
    }
    match auth {
        TestAuth::None => {}
        TestAuth::Htpasswd { user, password } => {
            let hash = bcrypt::hash_with_result(password, 4)
                .expect("bcrypt")
                .format_for_version(bcrypt::Version::TwoY);
            let path = dir.join("htpasswd");
            std::fs::write(&path, format!("{user}:{hash}\n")).expect("htpasswd");
            yml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lode-test\n    path: {}\n",
                path.display()
            ));
        }
        TestAuth::Token {
            realm,
            service,
            issuer,
            root_cert_pem,
        } => {
            let path = dir.join("token-root.pem");
            std::fs::write(&path, root_cert_pem).expect("root cert bundle");
            yml.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                path.display()
            ));
        }
    }
    let path = dir.join("config.yml");
    std::fs::write(&path, yml).expect("config.yml");
    path
}

/// Status code of `GET path` on `addr`, if something answers HTTP.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
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
