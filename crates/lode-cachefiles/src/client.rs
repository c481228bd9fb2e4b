//! What `lode mount --mode fscache` and `lode umount` do: find (or start) the daemon,
//! register the image, mount it in fscache mode, record the mount.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lode_mount::runtime::{self, MountRecord};

use crate::control::{self, ImageSpec, RegistryOpts, Request, RunDir, TestHooks, DOMAIN};

/// How long `lode mount` waits for a daemon it started to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Opening an image may fetch its manifest, bootstrap and chunk tables.
const ADD_TIMEOUT: Duration = Duration::from_secs(600);
const SHORT_TIMEOUT: Duration = Duration::from_secs(30);

/// `lode mount IMAGE MNT --mode fscache`.
pub struct MountRequest {
    /// IMAGE as given: an image directory, an http(s) URL or a registry reference.
    pub image: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub registry: RegistryOpts,
}

/// Mounts an image in fscache mode, starting the shared daemon if none runs.
pub fn mount(req: &MountRequest) -> Result<()> {
    let mnt = runtime::canonical(&req.mountpoint)?;
    if !mnt.is_dir() {
        bail!("mount point {} is not a directory", mnt.display());
    }
    std::fs::create_dir_all(&req.cache_dir)
        .with_context(|| format!("creating {}", req.cache_dir.display()))?;
    let cache_dir = std::fs::canonicalize(&req.cache_dir)?;
    // The daemon has another working directory: pass local images as absolute paths.
    let source = if Path::new(&req.image).is_dir() {
        std::fs::canonicalize(&req.image)?
            .to_string_lossy()
            .into_owned()
    } else {
        req.image.clone()
    };
    let run = RunDir::from_env();
    run.create()?;

    // Held while finding the daemon and registering the image, so the daemon cannot decide
    // it is idle and exit in between.
    let lock = File::create(run.lock()).with_context(|| format!("{}", run.lock().display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .context("locking the fscache run directory")?;
    let info = find_or_start(&run, &cache_dir)?;
    let serving = PathBuf::from(info["cache_dir"].as_str().unwrap_or_default());
    if serving != cache_dir {
        bail!(
            "the fscache daemon serves the cache in {}; only one cachefiles cache can exist per \
             system, so mount with --cache-dir {} (or unmount its images first)",
            serving.display(),
            serving.display()
        );
    }
    let supervisor = info["supervisor_pid"].as_u64().unwrap_or(0) as u32;
    let spec = ImageSpec {
        source,
        registry: req.registry.clone(),
        test: TestHooks::from_env(),
    };
    let added = control::call(&run.socket(), &Request::Add { spec }, ADD_TIMEOUT)
        .with_context(|| format!("opening {}", req.image))?;
    drop(lock);
    let fsid = added["fsid"]
        .as_str()
        .context("no fsid in the reply")?
        .to_string();

    if let Err(e) = mount_fscache(&fsid, DOMAIN, &mnt) {
        let _ = control::call(
            &run.socket(),
            &Request::Remove { fsid: fsid.clone() },
            SHORT_TIMEOUT,
        );
        return Err(e.context(format!("mounting {} (fsid {fsid})", req.image)));
    }
    control::call(
        &run.socket(),
        &Request::Mounted {
            fsid: fsid.clone(),
            mountpoint: mnt.clone(),
        },
        SHORT_TIMEOUT,
    )?;
    runtime::save(&MountRecord {
        mountpoint: mnt,
        mode: "fscache".into(),
        image: req.image.clone(),
        pid: supervisor,
        cache_dir,
        control: Some(run.socket()),
        started: runtime::now_secs(),
    })?;
    Ok(())
}

/// Tells the daemon that served `rec` its mount is gone (`lode umount`, after unmounting).
/// The daemon releases the image and exits after its last mount; it is never signalled, since
/// other images may still be mounted through it.
pub fn unmounted(rec: &MountRecord) -> Result<()> {
    let socket = rec
        .control
        .clone()
        .unwrap_or_else(|| RunDir::from_env().socket());
    match control::call(
        &socket,
        &Request::Unmounted {
            mountpoint: rec.mountpoint.clone(),
        },
        SHORT_TIMEOUT,
    ) {
        Ok(_) => Ok(()),
        // Already gone (it exits by itself when its mounts disappear).
        Err(_) if !socket.exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The daemon's status (`lode __fscache-daemon --status`).
pub fn status() -> Result<serde_json::Value> {
    control::call(
        &RunDir::from_env().socket(),
        &Request::Status,
        SHORT_TIMEOUT,
    )
}

fn find_or_start(run: &RunDir, cache_dir: &Path) -> Result<serde_json::Value> {
    let socket = run.socket();
    if socket.exists() {
        // A live daemon answers at once (while its worker restarts, the supervisor's socket
        // keeps the connection waiting); a socket nobody listens on is stale.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => {
                    if let Ok(v) = control::call_on(stream, &Request::Ping, SHORT_TIMEOUT) {
                        return Ok(v);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
                {
                    break
                }
                Err(_) => {}
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The supervisor waits for an exiting predecessor to let go of /dev/cachefiles.
    start(run, cache_dir)
}

/// Starts the supervisor detached (it calls setsid) and waits until its worker answers.
fn start(run: &RunDir, cache_dir: &Path) -> Result<serde_json::Value> {
    let log_path = run.log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map_or(0, |m| m.len());
    let exe = std::env::current_exe().context("finding the lode executable")?;
    let mut child = Command::new(exe)
        .arg("__fscache-daemon")
        .arg("--cache-dir")
        .arg(cache_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the fscache daemon")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the fscache daemon exited ({status}) while starting:\n{}",
                log_tail(&log_path, log_start)
            );
        }
        if run.socket().exists() {
            if let Ok(v) = control::call(&run.socket(), &Request::Ping, SHORT_TIMEOUT) {
                return Ok(v);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the fscache daemon did not answer within {START_TIMEOUT:?}:\n{}",
                log_tail(&log_path, log_start)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(path: &Path, from: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.take(16 << 10).read_to_string(&mut s);
    }
    s.trim_end().to_string()
}

/// Mounts EROFS in fscache mode (`fsid=`, `domain_id=`) read-only at `target` through the
/// new mount API. Blocks until the daemon has answered the OPENs and first READs, so it must
/// never run on the thread serving `/dev/cachefiles` (here it is another process).
pub fn mount_fscache(fsid: &str, domain: &str, target: &Path) -> Result<()> {
    use std::ffi::OsStr;
    lode_mount::kernel::mount_erofs(
        &[
            ("source", OsStr::new("lode")),
            ("fsid", OsStr::new(fsid)),
            ("domain_id", OsStr::new(domain)),
        ],
        target,
    )
}
