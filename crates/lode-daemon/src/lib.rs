//! The lode node service and the one place mounts are made.
//!
//! - [`request`]: a mount request as data ([`request::MountRequest`]), the same from the
//!   command line and from the API.
//! - [`mounts`]: mount / umount / list / status in every mode, auto-mode choice, per-mount
//!   counters under common names ([`mounts::MountStats`]).
//! - [`fanotify`]: what mounting in fanotify mode takes (the supervisor and worker live in
//!   `lode-fanotify`; FUSE and cachefiles have their own `mount` entry points).
//! - [`control`]: acting on running mounts — prefetch on demand, worker upgrade.
//! - [`api`] + [`server`]: `lode daemon`, an HTTP API on a unix socket (docs/API.md).
//! - [`metrics`]: `GET /metrics` in the Prometheus text format.
//! - [`client`]: what `lode mount/umount/ls/status` use to reach a running daemon.
//! - [`config`]: `lode.toml`.
//!
//! A request for "where does a READ go" starts in the frontends (`lode-fanotify`,
//! `lode-fuse`, `lode-cachefiles`); this crate only starts, stops and watches them.

pub mod api;
pub mod client;
pub mod config;
pub mod control;
pub mod fanotify;
pub mod metrics;
pub mod mounts;
pub mod request;
pub mod server;

pub use config::Config;
pub use request::{Mode, MountRequest};

/// Logs to stderr with levels: `RUST_LOG` if set, else `default_filter`.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
