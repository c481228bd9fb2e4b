//! Mounting in fanotify mode: open the image (bootstrap and chunk tables, no blob data), write
//! the spec, start the supervisor (see the `lode_fanotify` crate for what it and its worker do)
//! and return once the mount is up.

use std::path::Path;

use anyhow::{bail, Context, Result};
use lode_fanotify::{side_path, Spec};
use lode_mount::runtime;
use lode_storage::cache::BlobCache;
use lode_storage::image::{open_image, ImageSource, RegistryOptions, SourceOptions};

use crate::request::MountRequest;

/// Reader threads of a worker. Every thread blocked in `read(2)` of the group is woken for
/// every event (the kernel's wait is not exclusive), so few: misses are filled on threads of
/// their own, readers only answer cached ranges.
const READER_THREADS: usize = 2;

/// The registry options as worker arguments (credentials travel in the environment).
fn registry_argv(r: &RegistryOptions) -> Vec<String> {
    let mut v = Vec::new();
    if r.plain_http {
        v.push("--plain-http".to_string());
    }
    if r.insecure_tls {
        v.push("--insecure-tls".to_string());
    }
    if let Some(p) = &r.docker_config {
        v.push("--auth-file".to_string());
        v.push(p.display().to_string());
    }
    v.push("--retries".to_string());
    v.push(r.retries.to_string());
    v
}

/// Mounts `req.image` at `req.mountpoint` (canonical); returns the supervisor's PID.
pub fn mount(req: &MountRequest, cache_dir: &Path) -> Result<u32> {
    let mnt = &req.mountpoint;
    if let Some(rec) = runtime::load(mnt) {
        if runtime::alive(rec.pid) && lode_fanotify::proc::mounted_in("self", dev_of(mnt)?) {
            bail!(
                "{} is already mounted (mode {}, served by pid {})",
                mnt.display(),
                rec.mode,
                rec.pid
            );
        }
    }
    lode_fanotify::check_cache_fs(cache_dir)?;

    let source = ImageSource::parse(&req.image)?;
    let source_str = match &source {
        ImageSource::Dir(p) => std::fs::canonicalize(p)?.display().to_string(),
        other => other.to_string(),
    };
    let opts = SourceOptions {
        registry: req.registry.client_options(),
        ..Default::default()
    };
    let cache = BlobCache::open(cache_dir)?;
    let img = open_image(&source, &cache, &opts)?;
    let open_stats = img.stats.snapshot();
    let exe = std::env::current_exe().context("locating the lode binary")?;
    let mut worker_command = vec![exe.display().to_string(), "__fanotify-worker".to_string()];
    worker_command.extend(registry_argv(&req.registry));
    let spec = Spec {
        mountpoint: mnt.clone(),
        image: req.image.clone(),
        source: source_str,
        bootstrap: img.bootstrap.clone(),
        cache_dir: cache_dir.to_path_buf(),
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
        prefetch_all: req.prefetch_all,
        prefetch_rate: req.prefetch_rate,
        stats_path: side_path(mnt, "stats"),
        log_path: side_path(mnt, "log"),
        worker_command,
        open_requests: open_stats.requests,
        open_bytes: open_stats.bytes_fetched,
        record_trace: req.record_trace.clone(),
    };
    std::fs::create_dir_all(runtime::run_dir())
        .with_context(|| format!("creating {}", runtime::run_dir().display()))?;
    let spec_path = side_path(mnt, "spec");
    spec.save(&spec_path)?;
    drop(img);
    cache.flush();
    drop(cache);

    let mut envs = Vec::new();
    if let Some((u, p)) = &req.registry.credentials {
        envs.push(("LODE_REGISTRY_AUTH".to_string(), format!("{u}:{p}")));
    }
    lode_fanotify::supervisor::launch(&exe, &spec_path, &spec.log_path, &envs).inspect_err(|_| {
        let _ = std::fs::remove_file(&spec_path);
    })
}

fn dev_of(p: &Path) -> Result<u64> {
    Ok(rustix::fs::stat(p)
        .with_context(|| format!("stat {}", p.display()))?
        .st_dev)
}
