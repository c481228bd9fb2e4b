//! `lode cat IMAGE PATH`: streams a regular file to stdout in 1 MiB pieces.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context, Result};

use crate::image_arg::ImageArgs;

/// Piece size: large enough for few syscalls, small enough to stream huge files.
const PIECE: usize = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Path of a regular file inside the image (symlinks are not followed).
    pub path: std::ffi::OsString,
}

pub fn run(args: Args) -> Result<()> {
    let image = args.image.open()?;
    let shown = args.path.to_string_lossy();
    let inode = image.resolve(args.path.as_bytes())?;
    if inode.is_dir() {
        bail!("{shown}: is a directory");
    }
    if inode.is_symlink() {
        bail!("{shown}: is a symlink (lode does not follow symlinks)");
    }
    if !inode.is_regular() {
        bail!("{shown}: not a regular file");
    }
    let mut buf = vec![0u8; inode.size.min(PIECE as u64) as usize];
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut offset = 0u64;
    while offset < inode.size {
        let got = image
            .read_at(&inode, offset, &mut buf)
            .with_context(|| format!("reading {shown} at offset {offset}"))?;
        if got == 0 {
            bail!("{shown}: unexpected end of data at offset {offset}");
        }
        out.write_all(&buf[..got])?;
        offset += got as u64;
    }
    out.flush()?;
    Ok(())
}
