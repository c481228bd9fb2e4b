//! `lode inspect IMAGE [--json]`: superblock fields, feature names, devices, and counts of
//! what the tree holds.

use std::collections::HashSet;

use anyhow::{Context, Result};
use lode_format::format::{DataLayout, FileType};
use lode_format::reader::{format_uuid, DeviceInfo, Image, SuperInfo};
use serde::Serialize;

use crate::display::format_time;
use crate::image_arg::ImageArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    superblock: &'a SuperInfo,
    compat_features: Vec<String>,
    incompat_features: Vec<String>,
    devices: Vec<DeviceReport<'a>>,
    tree: TreeStats,
}

#[derive(Serialize)]
struct DeviceReport<'a> {
    slot: usize,
    #[serde(flatten)]
    info: &'a DeviceInfo,
    /// "file" (a backing file was found), "flat" (read from the primary at
    /// mapped_blkaddr) or "missing".
    backing: &'static str,
}

/// Counts over the tree; each inode (nid) is counted once, however many names it has.
#[derive(Serialize, Default)]
struct TreeStats {
    inodes: u64,
    directories: u64,
    regular_files: u64,
    symlinks: u64,
    char_devices: u64,
    block_devices: u64,
    fifos: u64,
    sockets: u64,
    /// Directory entries (other than "." and "..") naming an inode already counted.
    extra_hard_links: u64,
    compressed_files: u64,
    chunk_based_files: u64,
    inodes_with_xattrs: u64,
    /// Sum of regular file sizes.
    data_bytes: u64,
}

pub fn run(args: Args) -> Result<()> {
    let image = args.image.open()?;
    let tree = walk(&image).context("walking the directory tree")?;
    let sb = image.superblock();
    let devices = image
        .devices()
        .iter()
        .enumerate()
        .map(|(slot, info)| DeviceReport {
            slot,
            info,
            backing: if image.has_device(slot) {
                "file"
            } else if info.mapped_blkaddr != 0 {
                "flat"
            } else {
                "missing"
            },
        })
        .collect();
    let report = Report {
        superblock: sb,
        compat_features: sb.compat_feature_names(),
        incompat_features: sb.incompat_feature_names(),
        devices,
        tree,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn walk(image: &Image) -> Result<TreeStats> {
    let mut stats = TreeStats::default();
    let mut seen: HashSet<u64> = HashSet::new();
    let root = image.inode(image.root_nid())?;
    let mut pending = vec![root];
    seen.insert(image.root_nid());
    count(image, &pending[0], &mut stats)?;
    while let Some(dir) = pending.pop() {
        let entries = image
            .read_dir(&dir)
            .with_context(|| format!("reading directory nid {}", dir.nid))?;
        for entry in entries {
            if entry.name == b"." || entry.name == b".." {
                continue;
            }
            if !seen.insert(entry.nid) {
                stats.extra_hard_links += 1;
                continue;
            }
            let inode = image.inode(entry.nid)?;
            count(image, &inode, &mut stats)?;
            if inode.is_dir() {
                pending.push(inode);
            }
        }
    }
    Ok(stats)
}

fn count(image: &Image, inode: &lode_format::reader::Inode, stats: &mut TreeStats) -> Result<()> {
    stats.inodes += 1;
    match inode.file_type() {
        FileType::Directory => stats.directories += 1,
        FileType::Regular => {
            stats.regular_files += 1;
            stats.data_bytes = stats.data_bytes.saturating_add(inode.size);
        }
        FileType::Symlink => stats.symlinks += 1,
        FileType::CharDevice => stats.char_devices += 1,
        FileType::BlockDevice => stats.block_devices += 1,
        FileType::Fifo => stats.fifos += 1,
        FileType::Socket => stats.sockets += 1,
        FileType::Unknown => {}
    }
    match inode.layout {
        DataLayout::CompressedFull | DataLayout::CompressedCompact => stats.compressed_files += 1,
        DataLayout::ChunkBased => stats.chunk_based_files += 1,
        _ => {}
    }
    if inode.xattr_icount > 0 && !image.xattrs(inode)?.is_empty() {
        stats.inodes_with_xattrs += 1;
    }
    Ok(())
}

fn print_text(report: &Report) {
    let sb = report.superblock;
    let bs = sb.block_size as u64;
    let row = |label: &str, value: String| println!("{label:<20} {value}");
    row(
        "block size",
        format!("{} (blkszbits {})", sb.block_size, sb.blkszbits),
    );
    row(
        "blocks",
        format!("{} ({} bytes)", sb.blocks, sb.blocks as u64 * bs),
    );
    row("root nid", sb.root_nid.to_string());
    row("inodes (inos)", sb.inos.to_string());
    row(
        "build time",
        format!(
            "{} UTC ({}.{:09})",
            format_time(sb.build_time as i64, sb.build_time_nsec),
            sb.build_time,
            sb.build_time_nsec
        ),
    );
    row("uuid", format_uuid(&sb.uuid));
    row("volume name", format!("{:?}", sb.volume_name));
    row("meta_blkaddr", sb.meta_blkaddr.to_string());
    row("xattr_blkaddr", sb.xattr_blkaddr.to_string());
    row("checksum", format!("0x{:08x}", sb.checksum));
    let names = |list: &[String]| {
        if list.is_empty() {
            "-".to_string()
        } else {
            list.join(" ")
        }
    };
    row(
        "compat features",
        format!(
            "0x{:x} {}",
            sb.feature_compat,
            names(&report.compat_features)
        ),
    );
    row(
        "incompat features",
        format!(
            "0x{:x} {}",
            sb.feature_incompat,
            names(&report.incompat_features)
        ),
    );
    if sb.xattr_prefix_count > 0 {
        row(
            "xattr prefixes",
            format!(
                "{} at byte {}",
                sb.xattr_prefix_count,
                sb.xattr_prefix_start as u64 * 4
            ),
        );
    }
    if sb.packed_nid != 0 {
        row("packed nid", sb.packed_nid.to_string());
    }
    row("extra devices", report.devices.len().to_string());
    for device in &report.devices {
        println!(
            "  slot {} (device_id {}): tag {:?}, {} blocks, mapped_blkaddr {}, backing: {}",
            device.slot,
            device.slot + 1,
            device.info.tag,
            device.info.blocks,
            device.info.mapped_blkaddr,
            device.backing
        );
    }
    let t = &report.tree;
    println!("tree:");
    let stat = |label: &str, value: u64| println!("  {label:<18} {value}");
    stat("inodes", t.inodes);
    stat("directories", t.directories);
    stat("regular files", t.regular_files);
    stat("symlinks", t.symlinks);
    stat("char devices", t.char_devices);
    stat("block devices", t.block_devices);
    stat("fifos", t.fifos);
    stat("sockets", t.sockets);
    stat("extra hard links", t.extra_hard_links);
    stat("chunk-based files", t.chunk_based_files);
    stat("compressed files", t.compressed_files);
    stat("with xattrs", t.inodes_with_xattrs);
    stat("data bytes", t.data_bytes);
}
