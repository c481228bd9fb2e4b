//! `lode`: build, inspect and unpack lazily served container images in EROFS format.
//!
//! This file only parses the command line and dispatches; each subcommand lives in its own
//! module under `cmd/` with an `Args` struct and a `run` function.

mod cmd;
mod display;
mod help;
mod image_arg;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lode",
    version,
    about = "Lazily served container images in EROFS format"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress bars (they are drawn only when stderr is a terminal anyway).
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image directory (bootstrap, blobs, image.json) from a directory tree, OCI layer
    /// tarballs (applied in order) or an OCI image layout.
    Build(cmd::build::Args),
    /// Mount an image.
    Mount(cmd::mount::Args),
    /// Unmount an image mounted by `lode mount`.
    Umount(cmd::mount::UmountArgs),
    /// Show mounts with their mode, image, state and counters (fetched bytes, requests, …).
    Status(cmd::mount::StatusArgs),
    /// Run the node service: owns mounts, serves the HTTP API and /metrics on a unix socket.
    Daemon(cmd::daemon::Args),
    /// Push an image directory to an OCI registry.
    Push(cmd::registry::PushArgs),
    /// Pull an image from an OCI registry (metadata only unless --all).
    Pull(cmd::registry::PullArgs),
    /// Inspect or clean the local blob cache.
    Cache(cmd::cache::Args),
    /// Convert an OCI/Docker image in a registry into a lode image and push it.
    Convert(cmd::convert::Args),
    /// Show the superblock, feature bits, devices and a summary of the tree.
    Inspect(cmd::inspect::Args),
    /// List a directory (or show one entry) in `ls -l` style, without following symlinks.
    Ls(cmd::ls::Args),
    /// Write a regular file's contents to stdout.
    Cat(cmd::cat::Args),
    /// The cachefiles daemon behind `lode mount --mode fscache` (started by `lode mount`).
    #[command(name = "__fscache-daemon", hide = true)]
    FscacheDaemon(cmd::fscache_daemon::Args),
    /// Extract the whole tree with ownership, modes, xattrs, times, hard links and holes.
    Unpack(cmd::unpack::Args),
    /// Internal: the supervisor of a `lode mount --mode fanotify` mount.
    #[command(name = "__fanotify-supervisor", hide = true)]
    FanotifySupervisor(cmd::fanotify::SupervisorArgs),
    /// Internal: a fanotify worker started by its supervisor.
    #[command(name = "__fanotify-worker", hide = true)]
    FanotifyWorker(cmd::fanotify::WorkerArgs),
    /// Internal: the FUSE supervisor started by `lode mount --mode fuse`.
    #[command(name = "__fuse-supervisor", hide = true)]
    FuseSupervisor,
    /// Internal: a FUSE worker started by the supervisor.
    #[command(name = "__fuse-worker", hide = true)]
    FuseWorker,
}

fn main() {
    let cli: Cli = help::parse();
    progress::set_quiet(cli.quiet);
    let result = match cli.command {
        Command::Build(args) => cmd::build::run(args),
        Command::Mount(args) => cmd::mount::run(args),
        Command::Umount(args) => cmd::mount::umount(args),
        Command::Status(args) => cmd::mount::status(args),
        Command::Daemon(args) => cmd::daemon::run(args),
        Command::Push(args) => cmd::registry::push(args),
        Command::Pull(args) => cmd::registry::pull(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Cache(args) => cmd::cache::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Ls(args) => cmd::ls::run(args),
        Command::Cat(args) => cmd::cat::run(args),
        Command::FscacheDaemon(args) => cmd::fscache_daemon::run(args),
        Command::Unpack(args) => cmd::unpack::run(args),
        Command::FanotifySupervisor(args) => cmd::fanotify::supervisor(args),
        Command::FanotifyWorker(args) => cmd::fanotify::worker(args),
        Command::FuseSupervisor => lode_fuse::supervisor::main(),
        Command::FuseWorker => lode_fuse::worker::main(),
    };
    if let Err(err) = result {
        // `lode cat … | head` is not an error worth reporting.
        if is_broken_pipe(&err) {
            std::process::exit(0);
        }
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
