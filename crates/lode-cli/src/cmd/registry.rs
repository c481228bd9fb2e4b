//! `lode push`, `lode pull` and the registry options they share with `convert` and `mount`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use lode_registry::{ClientOptions, Reference, RegistryClient};

/// Options for talking to a registry.
#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Use plain HTTP (for a local registry on 127.0.0.1).
    #[arg(long)]
    pub plain_http: bool,
    /// Accept any TLS certificate.
    #[arg(long)]
    pub insecure_tls: bool,
    /// Credentials as USER:PASSWORD (default: from docker/podman config.json).
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        env = "LODE_REGISTRY_AUTH",
        hide_env_values = true
    )]
    pub creds: Option<String>,
    /// A docker config.json to read credentials from.
    #[arg(long, value_name = "PATH")]
    pub auth_file: Option<PathBuf>,
    /// Retries of failed requests (connection errors, 429, 5xx), with backoff.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
}

impl RegistryArgs {
    /// `--creds USER:PASSWORD`, split.
    pub fn credentials(&self) -> Result<Option<(String, String)>> {
        self.creds
            .as_deref()
            .map(|c| {
                let (u, p) = c.split_once(':').context("--creds must be USER:PASSWORD")?;
                Ok((u.to_string(), p.to_string()))
            })
            .transpose()
    }

    /// The flags as the serializable options mounts and the daemon API carry.
    pub fn options(&self) -> Result<lode_storage::image::RegistryOptions> {
        Ok(lode_storage::image::RegistryOptions {
            plain_http: self.plain_http,
            insecure_tls: self.insecure_tls,
            credentials: self.credentials()?,
            docker_config: self.auth_file.clone(),
            retries: self.retries,
        })
    }

    pub fn client_options(&self) -> Result<ClientOptions> {
        Ok(self.options()?.client_options())
    }

    pub fn client(&self) -> Result<RegistryClient> {
        Ok(RegistryClient::new(self.client_options()?)?)
    }
}

/// A registry error with what it means for the operator in front of the HTTP details.
pub fn explain(err: lode_registry::Error) -> anyhow::Error {
    let codes = err.registry_codes();
    let has = |c: &str| codes.contains(&c);
    let meaning = if has("MANIFEST_UNKNOWN") || has("NAME_UNKNOWN") {
        Some("not found in the registry (no such repository or tag)")
    } else if has("BLOB_UNKNOWN") {
        Some("a blob of the image is not found in the registry")
    } else if err.is_not_found() {
        Some("not found in the registry")
    } else if matches!(err.status(), Some(401 | 403)) || has("DENIED") || has("UNAUTHORIZED") {
        Some("access denied (credentials: --creds, LODE_REGISTRY_AUTH or docker config.json)")
    } else {
        None
    };
    match meaning {
        Some(m) => anyhow::Error::new(err).context(m),
        None => err.into(),
    }
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// Image directory to push.
    pub image: PathBuf,
    /// Destination, e.g. 127.0.0.1:5000/app:v1.
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn push(args: PushArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let client = args.registry.client()?;
    let started = Instant::now();
    let reporter = crate::progress::Reporter::new();
    let s = lode_registry::push_image_with(
        &client,
        &args.image,
        &reference,
        &reporter.transfer("pushing"),
    )
    .map_err(explain)
    .with_context(|| format!("pushing {} to {reference}", args.image.display()))?;
    reporter.clear();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "pushed {} to {reference}@{}: {} blobs uploaded ({:.1} MB), {} already there, {:.2} s",
        args.image.display(),
        s.manifest_digest,
        s.blobs_uploaded,
        s.bytes_uploaded as f64 / 1e6,
        s.blobs_skipped,
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Image to pull, e.g. 127.0.0.1:5000/app:v1.
    pub reference: String,
    /// Output image directory.
    pub output: PathBuf,
    /// Also download every data blob (default: metadata only, data is fetched lazily).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn pull(args: PullArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let client = args.registry.client()?;
    let started = Instant::now();
    let reporter = crate::progress::Reporter::new();
    reporter.step("resolving", &reference.to_string());
    let s = lode_registry::pull_image_with(
        &client,
        &reference,
        &args.output,
        args.all,
        &reporter.transfer("pulling"),
    )
    .map_err(explain)
    .with_context(|| format!("pulling {reference}"))?;
    reporter.clear();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "pulled {reference}@{} into {}: {:.1} MB fetched, {} blobs fetched, {} already present, {:.2} s",
        s.manifest_digest,
        args.output.display(),
        s.bytes_fetched as f64 / 1e6,
        s.blobs_fetched,
        s.blobs_present,
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}
