//! `lode daemon`: the node service (see `lode_daemon::server`).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML; see docs/lode.toml). Without it, the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen here instead of the configured socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Use this cache directory instead of the configured one.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let mut config = match &args.config {
        Some(p) => lode_daemon::Config::load(p)?,
        None => lode_daemon::Config::default(),
    };
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(c) = args.cache_dir {
        config.cache_dir = c;
    }
    lode_daemon::init_logging(&config.log);
    lode_daemon::server::run(config)
}
