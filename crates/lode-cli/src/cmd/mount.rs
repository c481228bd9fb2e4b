//! `lode mount` and `lode umount`.

use std::path::PathBuf;

use anyhow::Result;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Mode {
    /// Kernel EROFS, file-backed, every blob already local; no daemon.
    Local,
}

#[derive(clap::Args)]
pub struct Args {
    /// Image directory (bootstrap, blobs/, image.json).
    pub image: PathBuf,
    /// Mount point (an existing directory).
    pub mountpoint: PathBuf,
    /// How the image is served.
    #[arg(long, value_enum, default_value_t = Mode::Local)]
    pub mode: Mode,
    /// Where uncompressed blob data is kept.
    #[arg(long, default_value = lode_storage::cache::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    match args.mode {
        Mode::Local => lode_mount::local::mount(&args.image, &args.mountpoint, &args.cache_dir)?,
    }
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
    if let Some(rec) = record {
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
