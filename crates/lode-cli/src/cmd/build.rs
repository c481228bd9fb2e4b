//! `lode build`: a directory tree into an image directory.

use std::path::PathBuf;

use anyhow::Result;
use lode_builder::{BuildOptions, DEFAULT_CHUNK_SIZE, DEFAULT_INLINE_MAX};

#[derive(clap::Args)]
pub struct Args {
    /// Source directory.
    pub source: PathBuf,
    /// Output image directory (created; holds bootstrap, blobs/ and image.json).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Chunk size: a power of two from 4K to 64M (suffixes K, M accepted).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE.to_string(), value_parser = parse_size)]
    pub chunk_size: String,
    /// Files up to this many bytes are stored in the bootstrap instead of a blob.
    #[arg(long, default_value_t = DEFAULT_INLINE_MAX)]
    pub inline_max: u64,
    /// Compression of blob chunks (the local cache always holds them uncompressed).
    #[arg(long, default_value = "zstd")]
    pub compress: lode_format::blob::Compression,
    /// Worker threads reading and hashing file data (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the build report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<String, String> {
    parse_bytes(s).map(|v| v.to_string())
}

/// Parses `4096`, `64K`, `1M`, `1MiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 64K, 1M)"))
}

pub fn run(args: Args) -> Result<()> {
    let chunk_size: u64 = args.chunk_size.parse().expect("validated by clap");
    let chunk_size = u32::try_from(chunk_size)
        .map_err(|_| anyhow::anyhow!("chunk size {chunk_size} is larger than 64 MiB"))?;
    let mut opts = BuildOptions {
        chunk_size,
        inline_max: args.inline_max,
        compression: args.compress,
        ..Default::default()
    };
    if let Some(t) = args.threads {
        opts.threads = t;
    }
    let report = lode_builder::build_dir(&args.source, &args.output, &opts)?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["elapsed_seconds"] = report.elapsed.as_secs_f64().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let secs = report.elapsed.as_secs_f64();
        println!(
            "built {} from {}: {} inodes, {} files ({} inlined), {:.1} MB in {:.2} s ({:.0} MB/s)",
            args.output.display(),
            args.source.display(),
            report.inodes,
            report.files,
            report.inlined_files,
            report.input_bytes as f64 / 1e6,
            secs,
            report.input_bytes as f64 / 1e6 / secs.max(1e-9),
        );
        println!(
            "bootstrap {:.1} MB, blobs {:.1} MB ({:.1} MB uncompressed); {} chunks, {} unique, {} holes, {:.1} MB deduplicated",
            report.bootstrap_bytes as f64 / 1e6,
            report.blob_bytes as f64 / 1e6,
            report.stored_bytes as f64 / 1e6,
            report.chunks,
            report.unique_chunks,
            report.hole_chunks,
            report.deduplicated_bytes as f64 / 1e6,
        );
    }
    Ok(())
}
