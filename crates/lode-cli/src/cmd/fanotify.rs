//! `lode mount --mode fanotify` and its two hidden processes, `lode __fanotify-supervisor`
//! and `lode __fanotify-worker` (see the `lode_fanotify` crate docs for the design).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lode_fanotify::{side_path, Spec};
use lode_mount::runtime;
use lode_storage::cache::BlobCache;
use lode_storage::image::{open_image, ImageSource, SourceOptions};

use super::registry::RegistryArgs;

/// Reader threads of a worker. Every thread blocked in `read(2)` of the group is woken for
/// every event (the kernel's wait is not exclusive), so few: misses are filled on threads of
/// their own, readers only answer cached ranges.
const READER_THREADS: usize = 2;

/// The registry options as worker arguments (credentials travel in the environment).
fn registry_argv(r: &RegistryArgs) -> Vec<String> {
    let mut v = Vec::new();
    if r.plain_http {
        v.push("--plain-http".to_string());
    }
    if r.insecure_tls {
        v.push("--insecure-tls".to_string());
    }
    if let Some(p) = &r.auth_file {
        v.push("--auth-file".to_string());
        v.push(p.display().to_string());
    }
    v.push("--retries".to_string());
    v.push(r.retries.to_string());
    v
}

/// What `lode mount --mode fanotify` needs beyond the common mount arguments.
pub struct MountOptions<'a> {
    pub image: &'a std::path::Path,
    pub mountpoint: &'a std::path::Path,
    pub cache_dir: &'a std::path::Path,
    pub registry: &'a RegistryArgs,
    pub prefetch_all: bool,
    pub prefetch_rate: u64,
}

/// Opens the image (bootstrap and chunk tables, no blob data), starts the supervisor and
/// returns once the mount is up.
pub fn mount(o: MountOptions<'_>) -> Result<()> {
    let mnt = runtime::canonical(o.mountpoint)?;
    if !mnt.is_dir() {
        bail!("mount point {} is not a directory", mnt.display());
    }
    if let Some(rec) = runtime::load(&mnt) {
        if runtime::alive(rec.pid) && lode_fanotify::proc::mounted_in("self", dev_of(&mnt)?) {
            bail!(
                "{} is already mounted (mode {}, served by pid {})",
                mnt.display(),
                rec.mode,
                rec.pid
            );
        }
    }
    std::fs::create_dir_all(o.cache_dir)
        .with_context(|| format!("creating {}", o.cache_dir.display()))?;
    let cache_dir = std::fs::canonicalize(o.cache_dir)?;
    lode_fanotify::check_cache_fs(&cache_dir)?;

    let image = o.image.to_str().context("IMAGE must be valid UTF-8")?;
    let source = ImageSource::parse(image)?;
    let source_str = match &source {
        ImageSource::Dir(p) => std::fs::canonicalize(p)?.display().to_string(),
        other => other.to_string(),
    };
    let opts = SourceOptions {
        registry: o.registry.client_options()?,
        ..Default::default()
    };
    let cache = BlobCache::open(&cache_dir)?;
    let img = open_image(&source, &cache, &opts)?;
    let open_stats = img.stats.snapshot();
    let exe = std::env::current_exe().context("locating the lode binary")?;
    let mut worker_command = vec![exe.display().to_string(), "__fanotify-worker".to_string()];
    worker_command.extend(registry_argv(o.registry));
    let spec = Spec {
        mountpoint: mnt.clone(),
        image: image.to_string(),
        source: source_str,
        bootstrap: img.bootstrap.clone(),
        cache_dir: cache_dir.clone(),
        data_paths: img
            .fetchers
            .iter()
            .map(|f| f.cached().data_path().to_path_buf())
            .collect(),
        state_paths: img
            .manifest
            .blobs
            .iter()
            .map(|b| cache.state_path(b))
            .collect(),
        manifest: img.manifest.clone(),
        threads: READER_THREADS,
        prefetch_all: o.prefetch_all,
        prefetch_rate: o.prefetch_rate,
        stats_path: side_path(&mnt, "stats"),
        log_path: side_path(&mnt, "log"),
        worker_command,
        open_requests: open_stats.requests,
        open_bytes: open_stats.bytes_fetched,
        record_trace: None,
    };
    std::fs::create_dir_all(runtime::run_dir())
        .with_context(|| format!("creating {}", runtime::run_dir().display()))?;
    let spec_path = side_path(&mnt, "spec");
    spec.save(&spec_path)?;
    drop(img);
    cache.flush();
    drop(cache);

    let mut envs = Vec::new();
    if let Some(c) = &o.registry.creds {
        envs.push(("LODE_REGISTRY_AUTH".to_string(), c.clone()));
    }
    let pid = lode_fanotify::supervisor::launch(&exe, &spec_path, &spec.log_path, &envs)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&spec_path);
        })?;
    println!(
        "mounted {image} at {} (fanotify; supervisor pid {pid}; stats {}; log {})",
        mnt.display(),
        spec.stats_path.display(),
        spec.log_path.display()
    );
    Ok(())
}

fn dev_of(p: &std::path::Path) -> Result<u64> {
    Ok(rustix::fs::stat(p)
        .with_context(|| format!("stat {}", p.display()))?
        .st_dev)
}

#[derive(clap::Args)]
pub struct SupervisorArgs {
    #[arg(long)]
    pub spec: PathBuf,
    /// A pipe to `lode mount`: READY or ERROR <message>.
    #[arg(long)]
    pub status_fd: Option<i32>,
}

pub fn supervisor(args: SupervisorArgs) -> Result<()> {
    lode_fanotify::init_logging("fanotify supervisor");
    let status = args
        .status_fd
        .map(lode_fanotify::sys::take_inherited_fd)
        .transpose()?;
    lode_fanotify::supervisor::supervise(&args.spec, status)
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub spec: PathBuf,
    #[arg(long)]
    pub group_fd: i32,
    #[arg(long)]
    pub journal_fd: i32,
    #[arg(long, value_delimiter = ',')]
    pub data_fds: Vec<i32>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    lode_fanotify::init_logging("fanotify worker");
    // An error is printed by main() to stderr, i.e. the mount's log.
    lode_fanotify::worker::run(lode_fanotify::worker::WorkerArgs {
        spec: args.spec,
        group_fd: args.group_fd,
        journal_fd: args.journal_fd,
        data_fds: args.data_fds,
        source: SourceOptions {
            registry: args.registry.client_options()?,
            ..Default::default()
        },
    })
}
