//! Opening an image to serve it lazily: from a local image directory, an `http(s)://` URL of
//! one, or a registry reference. The bootstrap is fetched whole and verified (the kernel reads
//! metadata straight from it); blobs get a cache entry and a fetcher each, and no blob data is
//! fetched until someone reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lode_format::manifest::{self, ImageManifest};
use sha2::{Digest, Sha256};

use crate::backend::http::{HttpBackend, HttpOptions};
use crate::backend::local::LocalDirBackend;
use crate::backend::registry::{backend_client_options, RegistryBackend};
use crate::backend::Backend;
use crate::cache::BlobCache;
use crate::fetch::{BlobFetcher, FetchOptions, FetchStats};

/// Where an image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A local image directory (bootstrap, image.json, blobs/).
    Dir(PathBuf),
    /// The URL of an image directory on a web server.
    Http(String),
    /// A lode image in an OCI registry.
    Registry(lode_registry::Reference),
}

impl ImageSource {
    /// `IMAGE` as users write it: an existing directory, an `http(s)://` URL, or a registry
    /// reference.
    pub fn parse(spec: &str) -> Result<ImageSource> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return Ok(ImageSource::Http(spec.to_string()));
        }
        let p = Path::new(spec);
        if p.is_dir() {
            return Ok(ImageSource::Dir(p.to_path_buf()));
        }
        if spec.starts_with('/') || spec.starts_with('.') {
            bail!("image directory {spec} does not exist");
        }
        let r = lode_registry::Reference::parse(spec).with_context(|| {
            format!("{spec:?} is not an image directory, an http(s) URL or a registry reference")
        })?;
        Ok(ImageSource::Registry(r))
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::Dir(p) => write!(f, "{}", p.display()),
            ImageSource::Http(u) => f.write_str(u),
            ImageSource::Registry(r) => write!(f, "{r}"),
        }
    }
}

/// How to reach remote sources.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    pub registry: lode_registry::ClientOptions,
    pub http: HttpOptions,
    pub fetch: FetchOptions,
}

/// How to reach a registry (a serializable mirror of `lode_registry::ClientOptions`): what
/// mount requests, the daemon API and frontend specs carry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryOptions {
    pub plain_http: bool,
    pub insecure_tls: bool,
    pub credentials: Option<(String, String)>,
    pub docker_config: Option<PathBuf>,
    pub retries: u32,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            plain_http: false,
            insecure_tls: false,
            credentials: None,
            docker_config: None,
            retries: 4,
        }
    }
}

impl RegistryOptions {
    pub fn client_options(&self) -> lode_registry::ClientOptions {
        lode_registry::ClientOptions {
            plain_http: self.plain_http,
            insecure_tls: self.insecure_tls,
            credentials: self.credentials.clone(),
            docker_config: self.docker_config.clone(),
            retries: self.retries,
            ..Default::default()
        }
    }

    pub fn source_options(&self) -> SourceOptions {
        SourceOptions {
            registry: self.client_options(),
            http: HttpOptions {
                insecure_tls: self.insecure_tls,
                ..Default::default()
            },
            fetch: Default::default(),
        }
    }
}

/// An image ready to be served: its bootstrap is local and verified, every blob has a fetcher.
pub struct OpenedImage {
    pub source: ImageSource,
    pub manifest: ImageManifest,
    /// The verified bootstrap, in the cache directory.
    pub bootstrap: PathBuf,
    pub backend: Arc<dyn Backend>,
    /// One per blob, in device-table order.
    pub fetchers: Vec<Arc<BlobFetcher>>,
    pub stats: Arc<FetchStats>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Opens `source`, fetching what is needed to mount it (manifest, bootstrap, chunk tables).
pub fn open_image(
    source: &ImageSource,
    cache: &Arc<BlobCache>,
    opts: &SourceOptions,
) -> Result<OpenedImage> {
    // The bootstrap and the chunk tables all need only image.json: they are fetched at once
    // (on a slow link each is a round trip).
    type Fetch<'a> = Box<dyn FnOnce() -> Result<Vec<u8>> + Send + 'a>;
    let (manifest_bytes, fetch_bootstrap, backend): (Vec<u8>, Fetch, Arc<dyn Backend>) =
        match source {
            ImageSource::Dir(dir) => {
                let m = std::fs::read(dir.join(manifest::MANIFEST_FILE))
                    .with_context(|| format!("reading {}/image.json", dir.display()))?;
                let path = dir.join(manifest::BOOTSTRAP_FILE);
                let b: Fetch = Box::new(move || {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
                });
                let backend = LocalDirBackend::new(dir.join(manifest::BLOBS_DIR));
                (m, b, Arc::new(backend))
            }
            ImageSource::Http(url) => {
                let backend = Arc::new(
                    HttpBackend::new(url, opts.http.clone())
                        .with_context(|| format!("image at {url}"))?,
                );
                let m = backend
                    .get_file(manifest::MANIFEST_FILE)
                    .with_context(|| format!("fetching {url}/image.json"))?;
                let be = backend.clone();
                let b: Fetch = Box::new(move || {
                    be.get_file(manifest::BOOTSTRAP_FILE)
                        .with_context(|| format!("fetching {url}/bootstrap"))
                });
                (m, b, backend)
            }
            ImageSource::Registry(reference) => {
                let client = Arc::new(lode_registry::RegistryClient::new(opts.registry.clone())?);
                let remote = lode_registry::resolve_image(&client, reference)
                    .with_context(|| format!("resolving {reference}"))?;
                let backend_client = Arc::new(lode_registry::RegistryClient::new(
                    backend_client_options(opts.registry.clone()),
                )?);
                let backend =
                    RegistryBackend::with_shared_client(backend_client, remote.reference.clone());
                let config = remote.config.clone();
                let b: Fetch = Box::new(move || {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(
                        &mut client
                            .get_blob(
                                &remote.reference,
                                &remote.bootstrap.digest,
                                Some(remote.bootstrap.size),
                            )
                            .with_context(|| format!("fetching the bootstrap of {reference}"))?,
                        &mut b,
                    )
                    .with_context(|| format!("fetching the bootstrap of {reference}"))?;
                    Ok(b)
                });
                (config, b, Arc::new(backend))
            }
        };
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("{source}: image.json is not a lode image manifest"))?;
    if manifest.format_version != manifest::FORMAT_VERSION {
        bail!(
            "{source}: image format version {} is not supported (this lode reads {})",
            manifest.format_version,
            manifest::FORMAT_VERSION
        );
    }
    let stats = Arc::new(FetchStats::default());
    let (bootstrap_bytes, fetchers) = std::thread::scope(|s| {
        let bootstrap = s.spawn(fetch_bootstrap);
        let opening: Vec<_> = manifest
            .blobs
            .iter()
            .map(|blob| {
                let (backend, stats) = (backend.clone(), stats.clone());
                s.spawn(move || {
                    BlobFetcher::open(cache, backend, blob, opts.fetch.clone(), stats)
                        .with_context(|| format!("{source}: opening blob {}", blob.digest))
                })
            })
            .collect();
        let fetchers: Result<Vec<_>> = opening
            .into_iter()
            .map(|h| h.join().expect("opening a blob panicked"))
            .collect();
        let bootstrap = bootstrap.join().expect("fetching the bootstrap panicked");
        (bootstrap, fetchers)
    });
    let bootstrap_bytes = bootstrap_bytes?;
    let got = format!("sha256:{}", sha256_hex(&bootstrap_bytes));
    if got != manifest.bootstrap.digest || bootstrap_bytes.len() as u64 != manifest.bootstrap.size {
        bail!(
            "{source}: bootstrap digest {got} ({} bytes) does not match image.json ({}, {} bytes)",
            bootstrap_bytes.len(),
            manifest.bootstrap.digest,
            manifest.bootstrap.size
        );
    }
    // Refuse a bootstrap the reader cannot parse before handing it to the kernel.
    lode_format::reader::Image::open(Box::new(bootstrap_bytes.clone()))
        .with_context(|| format!("{source}: the bootstrap is not a valid EROFS image"))?;
    let bootstrap = store_bootstrap(cache.dir(), manifest.bootstrap.hex(), &bootstrap_bytes)?;
    let fetchers = fetchers?;
    Ok(OpenedImage {
        source: source.clone(),
        manifest,
        bootstrap,
        backend,
        fetchers,
        stats,
    })
}

impl OpenedImage {
    /// Starts fetching in the background, at once: the image's prefetch list (in its order),
    /// then, with `everything`, every remaining chunk of every blob. Foreground reads
    /// overtake it (the fetchers pause background work while a miss is being served).
    /// Errors are logged, not fatal: a later read fetches (or fails) on its own.
    pub fn start_prefetch(
        &self,
        everything: bool,
        limits: Arc<crate::fetch::PrefetchLimits>,
    ) -> Option<std::thread::JoinHandle<()>> {
        if self.manifest.prefetch.is_empty() && !everything {
            return None;
        }
        let list = self.manifest.prefetch.clone();
        let fetchers = self.fetchers.clone();
        let name = self.source.to_string();
        std::thread::Builder::new()
            .name("lode-prefetch".into())
            .spawn(move || {
                if let Err(e) = crate::fetch::prefetch_extents(&fetchers, &list, &limits) {
                    tracing::warn!(image = %name, "prefetch: {e}");
                }
                if everything {
                    for f in &fetchers {
                        if let Err(e) = f.prefetch_all(&limits) {
                            tracing::warn!(image = %name, "prefetch: {e}");
                        }
                    }
                }
                tracing::info!(image = %name, "background prefetch done");
            })
            .ok()
    }
}

/// Writes a verified bootstrap into `<cache>/bootstraps/<hex>` (atomically; reused if there).
fn store_bootstrap(cache_dir: &Path, hex: &str, bytes: &[u8]) -> Result<PathBuf> {
    let dir = cache_dir.join("bootstraps");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(hex);
    if std::fs::read(&path).is_ok_and(|b| b == bytes) {
        return Ok(path);
    }
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
