//! `lode daemon`: the long-running node service. Listens on its unix socket (mode 0600), serves
//! the API of [`crate::api`], keeps the cache under its size limit and reaps the server
//! processes it started.
//!
//! Mounts outlive the daemon: stopping it (SIGTERM) closes the socket and leaves every mount
//! serving; a new daemon finds them in the run directory. That is how the daemon itself is
//! upgraded; `POST /v1/upgrade` then moves the mounts' workers to the new binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::api::{router, Daemon};
use crate::config::Config;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<()> {
    if let Some(dir) = &config.run_dir {
        // Before any thread exists: every child inherits it.
        std::env::set_var("LODE_RUN_DIR", dir);
    }
    std::fs::create_dir_all(&config.cache_dir).with_context(|| {
        format!(
            "creating the cache directory {}",
            config.cache_dir.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let socket = config.socket.clone();
    let listener = bind(&socket)?;
    tracing::info!(
        socket = %socket.display(),
        cache = %config.cache_dir.display(),
        run_dir = %lode_mount::runtime::run_dir().display(),
        mounts = lode_mount::runtime::list().len(),
        "lode daemon {} listening",
        env!("CARGO_PKG_VERSION")
    );
    let daemon = Daemon::new(config);
    tokio::spawn(housekeeping(daemon.clone()));
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("stopping; mounts stay up and keep serving");
    };
    let r = axum::serve(listener, router(daemon))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    r.context("serving the API")
}

/// Binds the socket, refusing to take it from a live daemon.
fn bind(socket: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!(
                "a lode daemon already listens on {} (stop it first, or use --socket)",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    // Created 0600 from the start: no window in which others could connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = tokio::net::UnixListener::bind(socket);
    rustix::process::umask(old);
    let listener = listener.with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(listener)
}

/// Every few seconds: evict unused blobs over the size limit, reap exited servers.
async fn housekeeping(daemon: std::sync::Arc<Daemon>) {
    let max = daemon
        .config
        .cache_max_size
        .as_deref()
        .and_then(|s| lode_storage::cache::parse_size(s).ok());
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let d = daemon.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(max) = max {
                match lode_storage::cache::gc(&d.config.cache_dir, max) {
                    Ok(removed) if !removed.is_empty() => tracing::info!(
                        blobs = removed.len(),
                        freed = removed.iter().map(|e| e.disk_bytes).sum::<u64>(),
                        "cache over its limit: evicted unused blobs"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cache eviction: {e:#}"),
                }
            }
            let records = lode_mount::runtime::list();
            tracing::debug!(mounts = records.len(), "housekeeping");
            for rec in records {
                crate::mounts::reap(rec.pid);
            }
        })
        .await;
    }
}
