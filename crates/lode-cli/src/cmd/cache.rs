//! `lode cache ls` and `lode cache gc`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(clap::Subcommand)]
pub enum CacheCommand {
    /// List cached blobs: size, bytes on disk, chunks held, whether a mount uses them.
    Ls {
        /// The cache to list.
        #[arg(long, default_value = lode_storage::cache::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Print a JSON array instead of a table: digest, size, disk_bytes, chunks,
        /// chunks_present, last_used (seconds since the epoch), in_use.
        #[arg(long)]
        json: bool,
    },
    /// Remove cached blobs no mount uses, least recently used first, down to --max-size
    /// (default: remove every unused blob).
    Gc {
        /// The cache to clean.
        #[arg(long, default_value = lode_storage::cache::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Keep at most this many bytes on disk (suffixes K, M, G).
        #[arg(long, value_parser = super::build::parse_bytes)]
        max_size: Option<u64>,
        /// Print {"removed": [entries as in `ls --json`], "freed_bytes": N} instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn when(secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let ago = (now - secs).max(0);
    match ago {
        0..60 => format!("{ago}s ago"),
        60..3600 => format!("{}m ago", ago / 60),
        3600..86400 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

pub fn run(args: Args) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match args.command {
        CacheCommand::Ls { cache_dir, json } => {
            let entries = lode_storage::cache::list(&cache_dir)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<19} {:>10} {:>10} {:>15} {:>10} IN USE",
                "BLOB", "SIZE", "ON DISK", "CHUNKS", "USED"
            )?;
            for e in &entries {
                writeln!(
                    out,
                    "{:<19} {:>9.1}M {:>9.1}M {:>7}/{:<7} {:>10} {}",
                    &e.digest[..19.min(e.digest.len())],
                    e.size as f64 / 1e6,
                    e.disk_bytes as f64 / 1e6,
                    e.chunks_present,
                    e.chunks,
                    when(e.last_used),
                    if e.in_use { "yes" } else { "no" }
                )?;
            }
            let disk: u64 = entries.iter().map(|e| e.disk_bytes).sum();
            writeln!(
                out,
                "{} blobs, {:.1} MB on disk in {}",
                entries.len(),
                disk as f64 / 1e6,
                cache_dir.display()
            )?;
        }
        CacheCommand::Gc {
            cache_dir,
            max_size,
            json,
        } => {
            let removed = lode_storage::cache::gc(&cache_dir, max_size.unwrap_or(0))?;
            let freed: u64 = removed.iter().map(|e| e.disk_bytes).sum();
            if json {
                let v = serde_json::json!({ "removed": removed, "freed_bytes": freed });
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                return Ok(());
            }
            for e in &removed {
                writeln!(
                    out,
                    "removed {} ({:.1} MB on disk)",
                    e.digest,
                    e.disk_bytes as f64 / 1e6
                )?;
            }
            writeln!(
                out,
                "{} blobs removed, {:.1} MB freed",
                removed.len(),
                freed as f64 / 1e6
            )?;
        }
    }
    Ok(())
}
