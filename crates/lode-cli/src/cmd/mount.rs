//! `lode mount` and `lode umount`.

use std::path::PathBuf;

use anyhow::Result;

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

#[derive(clap::Args)]
pub struct Args {
    /// Image directory (bootstrap, blobs/, image.json).
    pub image: PathBuf,
    /// Mount point (an existing directory).
    pub mountpoint: PathBuf,
    /// How the image is served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Where uncompressed blob data is kept.
    #[arg(long, default_value = lode_storage::cache::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    /// fanotify mode: fetch the whole image in the background (reads overtake it).
    #[arg(long)]
    pub prefetch_all: bool,
    /// fanotify mode: bandwidth limit of --prefetch-all, bytes/s (suffixes K, M, G; 0: none).
    #[arg(long, value_parser = super::build::parse_bytes, default_value = "0")]
    pub prefetch_rate: u64,
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
}

/// Why each lazy mode can or cannot be used here, best first.
fn choose_mode(cache_dir: &std::path::Path) -> (Mode, String) {
    use lode_fanotify::abi::{FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC};
    let _ = std::fs::create_dir_all(cache_dir);
    let fanotify = lode_fanotify::sys::fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, 0)
        .map_err(|e| format!("no fanotify pre-content events ({e}; Linux 6.14+ needed)"))
        .and_then(|_| lode_fanotify::check_cache_fs(cache_dir).map_err(|e| format!("{e:#}")));
    if fanotify.is_ok() {
        return (
            Mode::Fanotify,
            "fanotify pre-content events are available".into(),
        );
    }
    let fanotify_why = fanotify.unwrap_err();
    // EBUSY: held by a daemon already (ours serves every fscache mount), so it works.
    let cachefiles = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/cachefiles");
    if cachefiles.is_ok() || cachefiles.is_err_and(|e| e.raw_os_error() == Some(16)) {
        return (
            Mode::Fscache,
            format!("{fanotify_why}; /dev/cachefiles is available"),
        );
    }
    (
        Mode::Fuse,
        format!("{fanotify_why}; no usable /dev/cachefiles"),
    )
}

pub fn run(mut args: Args) -> Result<()> {
    if args.mode == Mode::Auto {
        let (mode, why) = choose_mode(&args.cache_dir);
        eprintln!("lode: --mode auto chose {mode:?}: {why}");
        args.mode = mode;
    }
    match args.mode {
        Mode::Auto => unreachable!("resolved above"),
        Mode::Local => lode_mount::local::mount(&args.image, &args.mountpoint, &args.cache_dir)?,
        Mode::Fanotify => super::fanotify::mount(super::fanotify::MountOptions {
            image: &args.image,
            mountpoint: &args.mountpoint,
            cache_dir: &args.cache_dir,
            registry: &args.registry,
            prefetch_all: args.prefetch_all,
            prefetch_rate: args.prefetch_rate,
        })?,
        Mode::Fuse => fuse_mount(&args)?,
        Mode::Fscache => fscache_mount(&args)?,
    }
    Ok(())
}

fn fuse_mount(args: &Args) -> Result<()> {
    use anyhow::Context;
    let r = &args.registry;
    let credentials = r.credentials()?;
    let image = args
        .image
        .to_str()
        .context("IMAGE must be valid UTF-8")?
        .to_string();
    let m = lode_fuse::mount(&lode_fuse::MountConfig {
        image,
        mountpoint: args.mountpoint.clone(),
        cache_dir: args.cache_dir.clone(),
        registry: lode_fuse::RegistryOptions {
            plain_http: r.plain_http,
            insecure_tls: r.insecure_tls,
            credentials,
            docker_config: r.auth_file.clone(),
            retries: r.retries,
        },
        passthrough: !args.no_passthrough,
        passthrough_min_size: args.passthrough_min_size,
        threads: args.threads,
        record_trace: None,
    })?;
    eprintln!(
        "lode: {} mounted on {} (FUSE, supervisor pid {}, log {})",
        args.image.display(),
        args.mountpoint.display(),
        m.supervisor_pid,
        m.log.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// Mount point.
    pub mountpoint: PathBuf,
}

/// Unmounts, then stops the process serving the mount (if any) once the kernel let go of it.
pub fn umount(args: UmountArgs) -> Result<()> {
    use lode_mount::runtime;
    let mnt = runtime::canonical(&args.mountpoint)?;
    let record = runtime::load(&mnt);
    lode_mount::kernel::umount(&mnt)?;
    if let Some(rec) = record.as_ref().filter(|r| r.mode == "fscache") {
        // One daemon serves every fscache mount: tell it, it exits after its last one.
        if let Err(e) = lode_cachefiles::client::unmounted(rec) {
            eprintln!("lode: telling the fscache daemon: {e:#}");
        }
        runtime::remove(&mnt);
    } else if let Some(rec) = record {
        if runtime::alive(rec.pid)
            && runtime::stop_process(rec.pid, std::time::Duration::from_secs(10))
        {
            eprintln!(
                "lode: the {} server (pid {}) did not exit in time and was killed",
                rec.mode, rec.pid
            );
        }
        runtime::remove(&mnt);
    }
    Ok(())
}

fn fscache_mount(args: &Args) -> Result<()> {
    let r = &args.registry;
    let credentials = r.credentials()?;
    lode_cachefiles::client::mount(&lode_cachefiles::client::MountRequest {
        image: args.image.to_string_lossy().into_owned(),
        mountpoint: args.mountpoint.clone(),
        cache_dir: args.cache_dir.clone(),
        registry: lode_cachefiles::control::RegistryOpts {
            plain_http: r.plain_http,
            insecure_tls: r.insecure_tls,
            credentials,
            auth_file: r.auth_file.clone(),
            retries: Some(r.retries),
        },
    })
}
