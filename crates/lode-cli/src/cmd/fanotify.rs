//! The two hidden processes of a fanotify mount, `lode __fanotify-supervisor` and
//! `lode __fanotify-worker` (see the `lode_fanotify` crate docs for the design; the mount
//! itself is made by `lode_daemon::fanotify`).

use std::path::PathBuf;

use anyhow::Result;
use lode_storage::image::SourceOptions;

use super::registry::RegistryArgs;

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
