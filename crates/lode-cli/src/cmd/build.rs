//! `lode build`: a directory tree, OCI layer tarballs or an OCI image layout into an image
//! directory.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Result};
use lode_builder::{BuildOptions, DEFAULT_CHUNK_SIZE, DEFAULT_INLINE_MAX};

#[derive(clap::Args)]
pub struct Args {
    /// A source directory, or OCI layer tarballs (tar, tar+gzip, tar+zstd) applied in order.
    #[arg(required_unless_present = "oci_layout")]
    pub sources: Vec<PathBuf>,
    /// Build the image TAG (or the only image) of an OCI image layout directory, following
    /// an index to linux/amd64; every layer's sha256 is checked while it is read.
    #[arg(long, value_name = "DIR[:TAG]", conflicts_with = "sources")]
    pub oci_layout: Option<String>,
    /// Reuse the chunks of an existing lode image: chunks found there are referenced, not
    /// stored again, and the blobs used are linked (or copied) into the output.
    #[arg(long, value_name = "IMAGE_DIR")]
    pub chunk_dict: Option<PathBuf>,
    /// Output image directory (created; holds bootstrap, blobs/ and image.json).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Print the build report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How images are laid out; shared by `build` and `convert`.
#[derive(clap::Args, Debug, Clone)]
pub struct Tuning {
    /// Chunk size: a power of two from 4K to 64M (suffixes K, M accepted).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE.to_string(), value_parser = parse_size)]
    pub chunk_size: String,
    /// Files up to this many bytes are stored in the bootstrap instead of a blob.
    #[arg(long, default_value_t = DEFAULT_INLINE_MAX)]
    pub inline_max: u64,
    /// Compression of blob chunks (the local cache always holds them uncompressed).
    #[arg(long, default_value = "zstd")]
    pub compress: lode_format::blob::Compression,
    /// Worker threads reading, hashing and compressing data (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// An access trace (`lode mount --record-trace`, or one absolute path per line, optionally
    /// followed by OFFSET LEN): stored as the image's prefetch list, fetched at mount time.
    #[arg(long, value_name = "TRACE")]
    pub prefetch: Option<PathBuf>,
}

impl Tuning {
    pub fn options(&self) -> Result<BuildOptions> {
        let chunk_size: u64 = self.chunk_size.parse().expect("validated by clap");
        let chunk_size = u32::try_from(chunk_size)
            .map_err(|_| anyhow::anyhow!("chunk size {chunk_size} is larger than 64 MiB"))?;
        let mut opts = BuildOptions {
            chunk_size,
            inline_max: self.inline_max,
            compression: self.compress,
            prefetch: self.prefetch.clone(),
            ..Default::default()
        };
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        // Fail before the data is read, not after.
        if let Some(trace) = &self.prefetch {
            std::fs::File::open(trace)
                .map_err(|e| anyhow::anyhow!("cannot read trace {}: {e}", trace.display()))?;
        }
        Ok(opts)
    }
}

/// A file source must look like a layer tarball; say so plainly when it does not.
fn check_layer_file(path: &std::path::Path) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| anyhow::anyhow!("cannot read build source {}: {e}", path.display()))?;
    if !lode_builder::tarstream::looks_like_layer(&head) {
        bail!(
            "{} is not a directory, nor a layer tarball (tar, tar+gzip or tar+zstd)",
            path.display()
        );
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<String, String> {
    parse_bytes(s).map(|v| v.to_string())
}

/// Parses `4096`, `64K`, `1M`, `1MiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    lode_storage::cache::parse_size(s).map_err(|e| format!("{e:#}"))
}

pub fn run(args: Args) -> Result<()> {
    let reporter = crate::progress::Reporter::new();
    let mut opts = args.tuning.options()?;
    opts.progress = reporter.build();
    let dict = args.chunk_dict.as_deref();
    let (report, source) = if let Some(layout) = &args.oci_layout {
        let (dir, tag) = lode_builder::oci_layout::parse_arg(layout);
        let report =
            lode_builder::build_oci_layout(&dir, tag.as_deref(), &args.output, &opts, dict)?;
        (report, layout.clone())
    } else {
        let dirs = args.sources.iter().filter(|p| p.is_dir()).count();
        match (dirs, args.sources.as_slice()) {
            (1, [dir]) => (
                lode_builder::build_dir_with_dict(dir, &args.output, &opts, dict)?,
                dir.display().to_string(),
            ),
            (0, layers) => (
                {
                    for path in layers {
                        check_layer_file(path)?;
                    }
                    lode_builder::build_layers(layers, &args.output, &opts, dict)?
                },
                format!("{} layer(s)", layers.len()),
            ),
            _ => bail!(
                "a directory source cannot be combined with other sources: give one directory, or layer tarballs"
            ),
        }
    };
    reporter.clear();
    print_report(&report, &args.output, &source, args.json)
}

/// Prints a build report as text or JSON.
pub fn print_report(
    report: &lode_builder::BuildReport,
    output: &std::path::Path,
    source: &str,
    json: bool,
) -> Result<()> {
    // Written, not println!'d: `lode … | head` ends quietly on a closed pipe.
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(report)?;
        v["elapsed_seconds"] = report.elapsed.as_secs_f64().into();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        let secs = report.elapsed.as_secs_f64();
        writeln!(
            out,
            "built {} from {}: {} inodes, {} files ({} inlined), {:.1} MB in {:.2} s ({:.0} MB/s)",
            output.display(),
            source,
            report.inodes,
            report.files,
            report.inlined_files,
            report.input_bytes as f64 / 1e6,
            secs,
            report.input_bytes as f64 / 1e6 / secs.max(1e-9),
        )?;
        writeln!(
            out,
            "bootstrap {:.1} MB, blobs {:.1} MB ({:.1} MB uncompressed); {} chunks, {} unique, {} holes, {:.1} MB deduplicated",
            report.bootstrap_bytes as f64 / 1e6,
            report.blob_bytes as f64 / 1e6,
            report.stored_bytes as f64 / 1e6,
            report.chunks,
            report.unique_chunks,
            report.hole_chunks,
            report.deduplicated_bytes as f64 / 1e6,
        )?;
        for (i, l) in report.layers.iter().enumerate() {
            writeln!(
                out,
                "layer {} {}: {:?}, {:.1} MB read, {:.1} MB tar, {} entries, {:.1} MB new in blob {}, {:.1} MB deduplicated",
                i + 1,
                l.name,
                l.format,
                l.input_bytes as f64 / 1e6,
                l.tar_bytes as f64 / 1e6,
                l.entries,
                l.stored_bytes as f64 / 1e6,
                l.blob.as_deref().map_or("(none)", |d| &d[..d.len().min(19)]),
                l.deduplicated_bytes as f64 / 1e6,
            )?;
        }
        for (i, l) in report.layers.iter().enumerate() {
            for w in &l.warnings {
                eprintln!("warning: layer {} ({}): {w}", i + 1, l.name);
            }
        }
        if !report.dict_blobs.is_empty() {
            writeln!(
                out,
                "{} blob(s) of the chunk dictionary are used and were placed in the output",
                report.dict_blobs.len()
            )?;
        }
        if let Some(p) = &report.prefetch {
            writeln!(
                out,
                "prefetch list: {} trace entries ({} skipped: not in the image or inline) -> {} ranges, {:.1} MB",
                p.entries,
                p.skipped,
                p.extents,
                p.bytes as f64 / 1e6
            )?;
        }
    }
    Ok(())
}
