//! `lode __fscache-daemon` (hidden): the cachefiles daemon behind `lode mount --mode fscache`.
//!
//! `lode mount` starts it as needed; it is not meant to be run by hand except `--status`.
//!
//!     lode __fscache-daemon --cache-dir DIR        supervisor: binds the cache, runs workers
//!     lode __fscache-daemon --worker --dev-fd N --listen-fd M --cache-dir DIR [--restore]
//!     lode __fscache-daemon --status               the running daemon's state, as JSON

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// lode's cache directory (the cachefiles cache is its `fscache/` subdirectory; it must
    /// be on a disk filesystem such as ext4).
    #[arg(long, default_value = lode_storage::cache::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Run as the worker the supervisor starts (inherits the device and socket fds).
    #[arg(long, requires_all = ["dev_fd", "listen_fd"])]
    pub worker: bool,
    #[arg(long)]
    pub dev_fd: Option<i32>,
    #[arg(long)]
    pub listen_fd: Option<i32>,
    /// The previous worker died: write `restore` so its unanswered requests come again.
    #[arg(long, requires = "worker")]
    pub restore: bool,
    /// Print the running daemon's status as JSON and exit.
    #[arg(long, conflicts_with = "worker")]
    pub status: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.status {
        let v = lode_cachefiles::client::status().context("no fscache daemon is running")?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if args.worker {
        lode_cachefiles::init_logging("worker");
        let r = lode_cachefiles::worker::run(lode_cachefiles::worker::WorkerArgs {
            cache_dir: args.cache_dir,
            dev_fd: args.dev_fd.expect("required"),
            listen_fd: args.listen_fd.expect("required"),
            restore: args.restore,
        });
        if let Err(e) = &r {
            eprintln!("lode fscache worker: {e:#}");
        }
        return r;
    }
    lode_cachefiles::init_logging("supervisor");
    let r = lode_cachefiles::supervisor::run(&args.cache_dir);
    if let Err(e) = &r {
        eprintln!("lode fscache supervisor: {e:#}");
    }
    r
}
