//! `lode ls IMAGE [PATH]`: `ls -l` style listing of a directory, or of one entry when PATH is
//! not a directory. Symlinks are shown, never followed. `lode ls` alone lists the mounts.

use std::io::Write;

use anyhow::{Context, Result};
use lode_format::format::FileType;
use lode_format::reader::{Image, Inode};
use serde::Serialize;

use crate::display::{format_time, mode_string, type_name};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A lode image directory (bootstrap + blobs/) or an EROFS image file; without it, the
    /// lode mounts of this machine are listed (mode, image, state, counters).
    pub image: Option<std::path::PathBuf>,
    /// Backing file of extra device slot 0, 1, … in slot order (overrides the lookup by tag).
    #[arg(long = "device", value_name = "PATH")]
    pub devices: Vec<std::path::PathBuf>,
    /// Path inside the image (default: the root).
    #[arg(default_value = "/")]
    pub path: std::ffi::OsString,
    /// Also list the "." and ".." entries.
    #[arg(short, long)]
    pub all: bool,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: super::mount::DaemonArgs,
}

#[derive(Serialize)]
struct Entry {
    /// The name, lossily decoded; `name_bytes` holds the exact bytes when it is not UTF-8.
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name_bytes: Option<Vec<u8>>,
    nid: u64,
    #[serde(rename = "type")]
    file_type: &'static str,
    mode: u32,
    mode_string: String,
    nlink: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nsec: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    rdev: Option<(u32, u32)>,
    /// Symlink target, lossily decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip)]
    raw_name: Vec<u8>,
    #[serde(skip)]
    raw_target: Option<Vec<u8>>,
}

pub fn run(args: Args) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some(image_path) = &args.image else {
        return super::mount::list_mounts(args.json, &args.daemon);
    };
    let image = crate::image_arg::open_image_with_devices(image_path, &args.devices)?;
    let path = args.path.as_bytes();
    let inode = image.resolve(path)?;
    let mut entries = Vec::new();
    if inode.is_dir() {
        let listing = image
            .read_dir(&inode)
            .with_context(|| format!("listing {}", args.path.to_string_lossy()))?;
        for dirent in listing {
            if !args.all && (dirent.name == b"." || dirent.name == b"..") {
                continue;
            }
            let child = image.inode(dirent.nid)?;
            entries.push(describe(&image, dirent.name, &child)?);
        }
    } else {
        let name = path
            .rsplit(|&b| b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"/");
        entries.push(describe(&image, name.to_vec(), &inode)?);
    }

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
    } else {
        for entry in &entries {
            write_line(&mut out, entry)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn describe(image: &Image, name: Vec<u8>, inode: &Inode) -> Result<Entry> {
    let file_type = inode.file_type();
    let raw_target = if inode.is_symlink() {
        Some(image.readlink(inode)?)
    } else {
        None
    };
    let is_device = matches!(file_type, FileType::CharDevice | FileType::BlockDevice);
    Ok(Entry {
        name: String::from_utf8_lossy(&name).into_owned(),
        name_bytes: std::str::from_utf8(&name).is_err().then(|| name.clone()),
        nid: inode.nid,
        file_type: type_name(file_type),
        mode: inode.mode,
        mode_string: mode_string(file_type, inode.mode),
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        size: inode.size,
        mtime: inode.mtime,
        mtime_nsec: inode.mtime_nsec,
        rdev: is_device.then_some(inode.rdev),
        target: raw_target
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
        raw_name: name,
        raw_target,
    })
}

/// One `ls -l` line; names and targets are written as raw bytes.
fn write_line(out: &mut impl Write, entry: &Entry) -> std::io::Result<()> {
    let size_column = match entry.rdev {
        Some((major, minor)) => format!("{major}, {minor}"),
        None => entry.size.to_string(),
    };
    write!(
        out,
        "{} {:>3} {:>6} {:>6} {:>10} {} ",
        entry.mode_string,
        entry.nlink,
        entry.uid,
        entry.gid,
        size_column,
        format_time(entry.mtime, entry.mtime_nsec)
    )?;
    out.write_all(&entry.raw_name)?;
    if let Some(target) = &entry.raw_target {
        out.write_all(b" -> ")?;
        out.write_all(target)?;
    }
    writeln!(out)
}
