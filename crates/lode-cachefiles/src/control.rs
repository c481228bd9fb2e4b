//! The daemon's control socket: one JSON request per line, one JSON reply per line.
//!
//! Only root can reach it (the run directory and the socket are 0700/0600); requests may
//! carry registry credentials.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The EROFS `domain_id` every lode fscache mount uses: blobs are named by their content
/// digest, so one domain is always correct, and it lets images share cache files.
pub const DOMAIN: &str = "lode";

/// The daemon's files: `LODE_FSCACHE_DIR`, default `/run/lode/fscache`.
#[derive(Debug, Clone)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn from_env() -> RunDir {
        RunDir(
            std::env::var_os("LODE_FSCACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/run/lode/fscache")),
        )
    }
    pub fn socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }
    /// flock'ed by clients while they find-or-start the daemon and register an image, and
    /// by the daemon when it decides to exit.
    pub fn lock(&self) -> PathBuf {
        self.0.join("lock")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("images.json")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("daemon.log")
    }
    pub fn supervisor_pid(&self) -> PathBuf {
        self.0.join("supervisor.pid")
    }
    pub fn worker_pid(&self) -> PathBuf {
        self.0.join("worker.pid")
    }
    pub fn create(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0)
            .with_context(|| format!("creating {}", self.0.display()))
    }
}

/// Registry options as the daemon needs them (a serializable copy of the CLI's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryOpts {
    pub plain_http: bool,
    pub insecure_tls: bool,
    pub credentials: Option<(String, String)>,
    pub auth_file: Option<PathBuf>,
    pub retries: Option<u32>,
}

impl RegistryOpts {
    pub fn source_options(&self) -> lode_storage::image::SourceOptions {
        let mut registry = lode_registry::ClientOptions {
            plain_http: self.plain_http,
            insecure_tls: self.insecure_tls,
            credentials: self.credentials.clone(),
            docker_config: self.auth_file.clone(),
            ..Default::default()
        };
        if let Some(r) = self.retries {
            registry.retries = r;
        }
        let http = lode_storage::backend::http::HttpOptions {
            insecure_tls: self.insecure_tls,
            ..Default::default()
        };
        lode_storage::image::SourceOptions {
            registry,
            http,
            fetch: Default::default(),
        }
    }
}

/// Fault injection for tests, set per image by `lode mount` from `LODE_TEST_FSCACHE_*`
/// environment variables. Never set in normal use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TestHooks {
    /// Answer this image's bootstrap OPEN with `copen <id>,<this>` verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copen_size: Option<String>,
    /// Sleep this long before serving each blob READ of this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_delay_ms: Option<u64>,
}

impl TestHooks {
    pub fn from_env() -> TestHooks {
        TestHooks {
            copen_size: std::env::var("LODE_TEST_FSCACHE_COPEN_SIZE").ok(),
            read_delay_ms: std::env::var("LODE_TEST_FSCACHE_READ_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

/// What an image was registered with; persisted so a restarted worker can serve it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSpec {
    /// IMAGE as given to `lode mount` (directory, URL or registry reference).
    pub source: String,
    pub registry: RegistryOpts,
    #[serde(default)]
    pub test: TestHooks,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Who are you (cache dir, pids).
    Ping,
    /// Open an image and reserve an fsid for it; the caller mounts it next.
    Add { spec: ImageSpec },
    /// The mount of `fsid` is up at `mountpoint`.
    Mounted { fsid: String, mountpoint: PathBuf },
    /// The mount of `fsid` failed; forget the image.
    Remove { fsid: String },
    /// `lode umount` unmounted `mountpoint`; the daemon exits after its last mount is gone.
    Unmounted { mountpoint: PathBuf },
    /// Images, objects, per-key READ counters and fetch statistics.
    Status,
}

/// Sends one request and returns the reply's JSON (an error if it says `ok: false`).
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    call_on(stream, req, timeout)
}

pub fn call_on(
    mut stream: UnixStream,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .context("sending to the fscache daemon")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("waiting for the fscache daemon")?;
    if reply.is_empty() {
        bail!("the fscache daemon closed the connection (it is exiting)");
    }
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("parsing the fscache daemon's reply")?;
    if v["ok"] != serde_json::Value::Bool(true) {
        bail!(
            "{}",
            v["error"].as_str().unwrap_or("the fscache daemon refused")
        );
    }
    Ok(v)
}
