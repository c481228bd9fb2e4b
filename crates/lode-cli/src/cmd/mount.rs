//! `lode mount`, `lode umount` and `lode status`: through the daemon when one listens on its
//! socket, else done by this process with the same code (`lode_daemon::mounts`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use lode_daemon::client::{mountpoint_query, Client};
use lode_daemon::mounts::{self, MountStatus, Mounted};
use lode_daemon::request::{FuseOptions, MountRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The best lazy mode this machine supports: fanotify where the kernel has pre-content
    /// events (and the cache fs takes the marks), else cachefiles on-demand where
    /// /dev/cachefiles works, else FUSE. The choice is printed.
    Auto,
    /// Kernel EROFS, file-backed, every blob already local; no daemon.
    Local,
    /// Kernel EROFS over sparse cache files marked for fanotify pre-content events: each
    /// missing range is fetched before the kernel reads it (Linux 6.14+; the cache dir must
    /// be on ext4, xfs or btrfs); IMAGE may be a directory, URL or reference.
    Fanotify,
    /// FUSE: lode's reader serves the image, data fetched on first read (directory, http(s)
    /// URL or registry reference), passthrough once a file is local; a supervisor keeps the
    /// mount up across worker restarts.
    Fuse,
    /// Kernel EROFS over cachefiles on-demand (`fsid=`): the kernel asks lode's shared
    /// fscache daemon for each missing range; IMAGE may be a directory, URL or reference.
    Fscache,
}

impl From<Mode> for lode_daemon::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => lode_daemon::Mode::Auto,
            Mode::Local => lode_daemon::Mode::Local,
            Mode::Fanotify => lode_daemon::Mode::Fanotify,
            Mode::Fuse => lode_daemon::Mode::Fuse,
            Mode::Fscache => lode_daemon::Mode::Fscache,
        }
    }
}

/// How to reach the daemon (shared by mount, umount, ls and status).
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The daemon's socket; used when a daemon listens there.
    #[arg(long, env = "LODE_SOCKET", default_value = lode_daemon::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Do the work in this process even if a daemon runs.
    #[arg(long)]
    pub no_daemon: bool,
}

impl DaemonArgs {
    fn client(&self) -> Option<Client> {
        if self.no_daemon {
            return None;
        }
        Client::connect(&self.socket)
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Image directory, http(s) URL of one, or registry reference (REGISTRY/REPO:TAG).
    pub image: String,
    /// Mount point (an existing directory).
    pub mountpoint: PathBuf,
    /// How the image is served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Where uncompressed blob data is kept [default: the daemon's, else
    /// /var/lib/lode/cache].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    /// Fetch the whole image in the background (reads overtake it).
    #[arg(long)]
    pub prefetch_all: bool,
    /// Bandwidth limit of background prefetch, bytes/s (suffixes K, M, G; 0: none).
    #[arg(long, value_parser = super::build::parse_bytes, default_value = "0")]
    pub prefetch_rate: u64,
    /// Record which files and ranges are read into FILE (a trace for
    /// `lode build/convert --prefetch FILE`); fanotify and FUSE modes.
    #[arg(long, value_name = "FILE")]
    pub record_trace: Option<PathBuf>,
    /// FUSE mode: serve every read through lode (no FUSE passthrough).
    #[arg(long)]
    pub no_passthrough: bool,
    /// FUSE mode: request-serving threads.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// FUSE mode: smallest file given passthrough (suffixes K, M, G); smaller files are
    /// read through lode and kept in the page cache.
    #[arg(long, value_parser = super::build::parse_bytes, default_value = "64K")]
    pub passthrough_min_size: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print what was mounted as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Mounting can fetch a manifest, a bootstrap and chunk tables over a slow link.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(900);
const SHORT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: Args) -> Result<()> {
    let mut req = MountRequest {
        image: args.image.clone(),
        mountpoint: args.mountpoint.clone(),
        mode: args.mode.into(),
        cache_dir: args.cache_dir.clone(),
        registry: args.registry.options()?,
        prefetch_all: args.prefetch_all,
        prefetch_rate: args.prefetch_rate,
        fuse: FuseOptions {
            passthrough: !args.no_passthrough,
            passthrough_min_size: args.passthrough_min_size,
            threads: args.threads,
        },
        record_trace: args.record_trace.clone(),
    };
    let cwd = std::env::current_dir().context("finding the working directory")?;
    req.absolutize(&cwd)?;
    let m: Mounted = match args.daemon.client() {
        Some(c) => {
            let v = c.call(
                "POST",
                "/v1/mounts",
                Some(&serde_json::to_value(&req)?),
                MOUNT_TIMEOUT,
            )?;
            serde_json::from_value(v).context("the daemon's mount answer")?
        }
        None => mounts::mount(
            &req,
            std::path::Path::new(lode_storage::cache::DEFAULT_CACHE_DIR),
        )?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    if let Some(why) = &m.chosen_because {
        eprintln!("lode: --mode auto chose {}: {why}", m.mode);
    }
    let mut by = String::new();
    if m.pid != 0 {
        by += &format!("; supervisor pid {}", m.pid);
    }
    if let Some(p) = &m.stats {
        by += &format!("; stats {}", p.display());
    }
    if let Some(p) = &m.log {
        by += &format!("; log {}", p.display());
    }
    println!(
        "mounted {} at {} ({}{by})",
        m.image,
        m.mountpoint.display(),
        m.mode
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// Mount point.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Unmounts, then stops the process serving the mount (if any) once the kernel let go of it.
pub fn umount(args: UmountArgs) -> Result<()> {
    let mnt = lode_mount::runtime::canonical(&args.mountpoint)?;
    let warning = match args.daemon.client() {
        Some(c) => {
            let v = c.call(
                "DELETE",
                &format!("/v1/mounts?{}", mountpoint_query(&mnt)),
                None,
                SHORT_TIMEOUT,
            )?;
            v["warning"].as_str().map(str::to_string)
        }
        None => mounts::umount(&mnt)?,
    };
    if let Some(w) = warning {
        eprintln!("lode: {w}");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// One mount point (default: every mount).
    pub mountpoint: Option<PathBuf>,
    /// Print JSON (every counter, per mode).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The mounts (or one) with their counters: from the daemon if it runs, else read here.
fn statuses(mountpoint: Option<&PathBuf>, daemon: &DaemonArgs) -> Result<Vec<MountStatus>> {
    let client = daemon.client();
    match (mountpoint, client) {
        (Some(m), Some(c)) => {
            let mnt = lode_mount::runtime::canonical(m)?;
            let v = c.call(
                "GET",
                &format!("/v1/mounts/status?{}", mountpoint_query(&mnt)),
                None,
                SHORT_TIMEOUT,
            )?;
            Ok(vec![serde_json::from_value(v)?])
        }
        (Some(m), None) => Ok(vec![mounts::status(m)?]),
        (None, Some(c)) => Ok(serde_json::from_value(c.call(
            "GET",
            "/v1/mounts",
            None,
            SHORT_TIMEOUT,
        )?)?),
        (None, None) => Ok(mounts::list()),
    }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let list = statuses(args.mountpoint.as_ref(), &args.daemon)?;
    if args.json {
        let v = if args.mountpoint.is_some() {
            serde_json::to_value(&list[0])?
        } else {
            serde_json::to_value(&list)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_table(&list);
    Ok(())
}

/// `lode ls` without an image: the mounts, one line each.
pub fn list_mounts(json: bool, daemon: &DaemonArgs) -> Result<()> {
    let list = statuses(None, daemon)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_table(&list);
    }
    Ok(())
}

fn print_table(list: &[MountStatus]) {
    if list.is_empty() {
        println!("no lode mounts");
        return;
    }
    println!(
        "{:<28} {:<9} {:<11} {:>10} {:>8} {:>7} {:>7} {:<9} IMAGE",
        "MOUNTPOINT", "MODE", "STATE", "FETCHED", "REQUESTS", "ERRORS", "CACHED", "PREFETCH"
    );
    for m in list {
        let s = &m.stats;
        // How much of the image is local (background prefetch shows up here).
        let cached = match (s.chunks, s.chunks_present) {
            (Some(c), Some(p)) if c > 0 => format!("{:.0}%", 100.0 * p as f64 / c as f64),
            _ => "-".into(),
        };
        println!(
            "{:<28} {:<9} {:<11} {:>9.1}M {:>8} {:>7} {:>7} {:<9} {}",
            m.mountpoint.display(),
            m.mode,
            m.state,
            s.bytes_fetched as f64 / 1e6,
            s.requests,
            s.fetch_errors,
            cached,
            s.prefetch.as_deref().unwrap_or("-"),
            m.image
        );
        if let Some(e) = &m.stats_error {
            println!("    (counters unavailable: {e})");
        }
    }
}
