//! `lode convert SRC DST`: an ordinary OCI/Docker image from a registry into a lazy lode image
//! pushed to a registry.

use std::io::Read;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use lode_builder::layers::LayerInput;
use lode_builder::progress::{Event, Progress};
use lode_registry::{LayerDescriptor, Platform, Reference, RegistryClient, SourceImage};

use super::build::{print_report, Tuning};
use super::registry::{explain, RegistryArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Source image (Docker or OCI; a manifest list resolves to this machine's platform).
    pub source: String,
    /// Where the lode image is pushed.
    pub destination: String,
    /// Keep the converted image directory here (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Reuse the chunks of an existing lode image directory.
    #[arg(long, value_name = "IMAGE_DIR")]
    pub chunk_dict: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: Tuning,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print the build report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A layer blob opened on first read, so layers are downloaded one after another while
/// they are imported rather than all at once.
struct LazyLayer {
    client: Arc<RegistryClient>,
    image: Arc<SourceImage>,
    layer: LayerDescriptor,
    reader: Option<Box<dyn Read + Send>>,
}

impl Read for LazyLayer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.reader.is_none() {
            let r = self
                .image
                .open_layer(&self.client, &self.layer)
                .map_err(|e| {
                    std::io::Error::other(format!("layer {}: {e:#}", self.layer.digest))
                })?;
            self.reader = Some(Box::new(r));
        }
        self.reader.as_mut().expect("opened").read(buf)
    }
}

/// The progress hook `inner`, shown the source layers' digests instead of `stream N`.
fn layer_digests_shown(inner: Progress, image: &SourceImage) -> Progress {
    if !inner.is_active() {
        return inner;
    }
    let digests: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
    Progress::new(move |e| match *e {
        Event::LayerStart {
            index, count, size, ..
        } => inner.emit(Event::LayerStart {
            index,
            count,
            name: digests.get(index).map_or("?", |d| d),
            size,
        }),
        ref other => inner.emit(other.clone()),
    })
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let src = Reference::parse(&args.source)?;
    let dst = Reference::parse(&args.destination)?;
    let client = Arc::new(args.registry.client()?);
    let reporter = crate::progress::Reporter::new();
    reporter.step("resolving", &src.to_string());
    let image = Arc::new(
        lode_registry::pull_layers(&client, &src, &Platform::host())
            .map_err(explain)
            .with_context(|| format!("reading source image {src}"))?,
    );
    let layer_bytes: u64 = image.layers.iter().map(|l| l.size).sum();
    let inputs: Vec<LayerInput> = image
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let reader = Box::new(LazyLayer {
                client: client.clone(),
                image: image.clone(),
                layer: l.clone(),
                reader: None,
            });
            LayerInput::new(format!("stream {}", i + 1), reader).with_size(l.size)
        })
        .collect();
    let tmp;
    let out = match &args.output {
        Some(dir) => dir.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("lode-convert-")
                .tempdir_in(std::env::temp_dir())?;
            tmp.path().join("image")
        }
    };
    let mut opts = args.tuning.options()?;
    opts.progress = layer_digests_shown(reporter.build(), &image);
    let report = lode_builder::build_layer_inputs(inputs, &out, &opts, args.chunk_dict.as_deref())
        .with_context(|| format!("converting {src}"))?;
    let built = started.elapsed();
    let pushed = lode_registry::push_image_with(&client, &out, &dst, &reporter.transfer("pushing"))
        .map_err(explain)
        .with_context(|| format!("pushing the converted image to {dst}"))?;
    reporter.clear();
    let total = started.elapsed();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["source"] = src.to_string().into();
        v["destination"] = format!("{dst}@{}", pushed.manifest_digest).into();
        v["source_layer_bytes"] = layer_bytes.into();
        v["convert_seconds"] = built.as_secs_f64().into();
        v["total_seconds"] = total.as_secs_f64().into();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    print_report(&report, &out, &src.to_string(), false)?;
    let dedup = report.deduplicated_bytes as f64
        / (report.stored_bytes + report.deduplicated_bytes).max(1) as f64;
    writeln!(
        stdout,
        "converted {src} ({} layers, {:.1} MB compressed, {:.1} MB uncompressed) in {:.2} s ({:.0} MB/s uncompressed)",
        image.layers.len(),
        layer_bytes as f64 / 1e6,
        report.input_bytes as f64 / 1e6,
        built.as_secs_f64(),
        report.input_bytes as f64 / 1e6 / built.as_secs_f64().max(1e-9),
    )?;
    writeln!(
        stdout,
        "pushed {dst}@{}: bootstrap {:.1} MB + blobs {:.1} MB ({:.0}% of the source layers), dedup {:.1}%, total {:.2} s",
        pushed.manifest_digest,
        report.bootstrap_bytes as f64 / 1e6,
        report.blob_bytes as f64 / 1e6,
        100.0 * (report.bootstrap_bytes + report.blob_bytes) as f64 / layer_bytes.max(1) as f64,
        100.0 * dedup,
        total.as_secs_f64(),
    )?;
    Ok(())
}
