//! lode image directory <-> OCI artifact, and the layers of ordinary images for
//! `lode convert`.
//!
//! A lode image in a registry is an OCI image manifest whose config is the image's
//! `image.json` (media type [`MEDIA_TYPE_CONFIG`], bytes as they are, so fields this code
//! does not know survive) and whose layers are the bootstrap followed by the data blobs in
//! `image.json` order.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use lode_format::manifest::{BlobRef, BLOBS_DIR, BOOTSTRAP_FILE, MANIFEST_FILE};
use oci_spec::image::{DescriptorBuilder, Digest, ImageManifest, ImageManifestBuilder, MediaType};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::client::{sha256_digest, BlobReader, RegistryClient};
use crate::error::{Error, Result};
use crate::media::{self, Platform};
use crate::progress::{no_progress, Counted, ProgressFn, Transfer};
use crate::reference::{validate_digest, Reference};

pub const MEDIA_TYPE_BLOB: &str = "application/vnd.lode.blob.v1";
pub const MEDIA_TYPE_BOOTSTRAP: &str = "application/vnd.lode.bootstrap.v1";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.lode.image.config.v1+json";
const TITLE: &str = "org.opencontainers.image.title";
/// Largest config blob read into memory.
const MAX_CONFIG_SIZE: u64 = 64 << 20;

/// The part of `image.json` this crate needs; everything else is carried opaquely.
#[derive(Deserialize)]
struct ImageJson {
    bootstrap: BlobRef,
    #[serde(default)]
    blobs: Vec<BlobRef>,
}

fn parse_image_json(bytes: &[u8], what: &dyn Fn(String) -> Error) -> Result<ImageJson> {
    let j: ImageJson =
        serde_json::from_slice(bytes).map_err(|e| what(format!("image.json: {e}")))?;
    for b in std::iter::once(&j.bootstrap).chain(&j.blobs) {
        validate_digest(&b.digest).map_err(|e| what(format!("image.json: {e}")))?;
    }
    Ok(j)
}

/// What [`push_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSummary {
    pub manifest_digest: String,
    /// Blobs (bootstrap, data blobs, config) uploaded / already in the registry.
    pub blobs_uploaded: usize,
    pub blobs_skipped: usize,
    pub bytes_uploaded: u64,
}

/// Push the lode image directory `dir` to `reference` (tag, or `latest`).
pub fn push_image(
    client: &RegistryClient,
    dir: &Path,
    reference: &Reference,
) -> Result<PushSummary> {
    push_image_with(client, dir, reference, &no_progress())
}

/// [`push_image`], reporting the uploads to `progress`.
pub fn push_image_with(
    client: &RegistryClient,
    dir: &Path,
    reference: &Reference,
    progress: &ProgressFn,
) -> Result<PushSummary> {
    let bad = |reason: String| Error::InvalidImageDir {
        dir: dir.to_path_buf(),
        reason,
    };
    let config_path = dir.join(MANIFEST_FILE);
    let config =
        fs::read(&config_path).map_err(|e| Error::io(config_path.display().to_string(), e))?;
    let image = parse_image_json(&config, &bad)?;
    let config_digest = sha256_digest(&config);

    // (path, digest, size, media type), bootstrap first.
    let mut files: Vec<(PathBuf, &BlobRef, &str)> = vec![(
        dir.join(BOOTSTRAP_FILE),
        &image.bootstrap,
        MEDIA_TYPE_BOOTSTRAP,
    )];
    for b in &image.blobs {
        files.push((dir.join(BLOBS_DIR).join(b.hex()), b, MEDIA_TYPE_BLOB));
    }
    for (path, b, _) in &files {
        let len = fs::metadata(path)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?
            .len();
        if len != b.size {
            return Err(bad(format!(
                "{} is {len} bytes, image.json says {}",
                path.display(),
                b.size
            )));
        }
    }

    let mut summary = PushSummary {
        manifest_digest: String::new(),
        blobs_uploaded: 0,
        blobs_skipped: 0,
        bytes_uploaded: 0,
    };
    let mut done: HashMap<&str, ()> = HashMap::new();
    let uploads: Vec<(PathBuf, &str, u64)> = files
        .iter()
        .map(|(p, b, _)| (p.clone(), b.digest.as_str(), b.size))
        .chain(std::iter::once((
            config_path.clone(),
            config_digest.as_str(),
            config.len() as u64,
        )))
        .filter(|(_, digest, _)| done.insert(digest, ()).is_none())
        .collect();
    progress(&Transfer::Begin {
        blobs: uploads.len(),
        bytes: uploads.iter().map(|u| u.2).sum(),
    });
    for (path, digest, size) in uploads {
        let moved = client.push_blob_from_file_with(reference, &path, digest, size, progress)?;
        if moved {
            summary.blobs_uploaded += 1;
            summary.bytes_uploaded += size;
        } else {
            summary.blobs_skipped += 1;
        }
        progress(&Transfer::Done {
            digest,
            size,
            moved,
        });
    }

    let descriptor =
        |media_type: &str, digest: &str, size: u64, title: Option<String>| -> Result<_> {
            let d = Digest::from_str(digest).map_err(|e| bad(format!("digest {digest}: {e}")))?;
            let mut b = DescriptorBuilder::default()
                .media_type(MediaType::from(media_type))
                .digest(d)
                .size(size);
            if let Some(t) = title {
                b = b.annotations(HashMap::from([(TITLE.to_string(), t)]));
            }
            b.build().map_err(|e| bad(format!("descriptor: {e}")))
        };
    let mut layers = Vec::new();
    for (_, b, mt) in &files {
        let title = if *mt == MEDIA_TYPE_BOOTSTRAP {
            BOOTSTRAP_FILE.to_string()
        } else {
            format!("{BLOBS_DIR}/{}", b.hex())
        };
        layers.push(descriptor(mt, &b.digest, b.size, Some(title))?);
    }
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(
            MEDIA_TYPE_CONFIG,
            &config_digest,
            config.len() as u64,
            None,
        )?)
        .layers(layers)
        .build()
        .map_err(|e| bad(format!("manifest: {e}")))?;
    let bytes = serde_json::to_vec(&manifest).map_err(|e| bad(format!("manifest: {e}")))?;
    summary.manifest_digest = client.put_manifest(reference, &bytes, media::OCI_MANIFEST)?;
    Ok(summary)
}

/// A lode image as found in a registry: enough to pull it, or to read it lazily.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    /// The reference pinned to the manifest digest.
    pub reference: Reference,
    pub manifest_digest: String,
    /// `image.json`, verified against the manifest.
    pub config: Vec<u8>,
    pub bootstrap: BlobRef,
    /// In `image.json` (device table) order.
    pub blobs: Vec<BlobRef>,
}

/// Fetch and check the manifest and config of a lode image.
pub fn resolve_image(client: &RegistryClient, reference: &Reference) -> Result<RemoteImage> {
    let m = client.get_manifest(
        reference,
        &[
            media::OCI_MANIFEST,
            media::DOCKER_MANIFEST,
            media::OCI_INDEX,
            media::DOCKER_MANIFEST_LIST,
        ],
    )?;
    let not_lode = |media_type: String| Error::NotLodeImage {
        reference: reference.to_string(),
        media_type,
    };
    if !media::is_image_manifest(&m.media_type) {
        return Err(not_lode(format!(
            "none: the manifest is a {}",
            m.media_type
        )));
    }
    let manifest = ImageManifest::from_reader(&m.bytes[..]).map_err(|e| Error::Protocol {
        url: reference.to_string(),
        reason: format!("bad image manifest: {e}"),
    })?;
    let config_type = manifest.config().media_type().to_string();
    if config_type != MEDIA_TYPE_CONFIG {
        return Err(not_lode(config_type));
    }
    let bad = |reason: String| Error::UnsupportedImage {
        reference: reference.to_string(),
        reason,
    };
    let config_digest = manifest.config().digest().to_string();
    validate_digest(&config_digest)?;
    let config = read_small_blob(client, reference, &config_digest, manifest.config().size())?;
    let image = parse_image_json(&config, &|r| bad(r))?;

    let layers: Vec<(String, u64)> = manifest
        .layers()
        .iter()
        .map(|l| (l.digest().to_string(), l.size()))
        .collect();
    let want: Vec<(String, u64)> = std::iter::once(&image.bootstrap)
        .chain(&image.blobs)
        .map(|b| (b.digest.clone(), b.size))
        .collect();
    if layers != want {
        return Err(bad(
            "the manifest's layers do not match image.json's bootstrap and blobs".into(),
        ));
    }
    Ok(RemoteImage {
        reference: reference.with_digest(&m.digest)?,
        manifest_digest: m.digest,
        config,
        bootstrap: image.bootstrap,
        blobs: image.blobs,
    })
}

/// What [`pull_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSummary {
    pub manifest_digest: String,
    /// Bytes downloaded (config, bootstrap, blobs).
    pub bytes_fetched: u64,
    /// Data blobs downloaded / found already present and intact.
    pub blobs_fetched: usize,
    pub blobs_present: usize,
}

/// Pull a lode image into `dir` (created if needed): `image.json` and `bootstrap`, and with
/// `all` every data blob into `dir/blobs/<hex>`. Everything is verified; files are written
/// to a temporary name and renamed; files already present and intact are kept. `image.json`
/// is written last.
pub fn pull_image(
    client: &RegistryClient,
    reference: &Reference,
    dir: &Path,
    all: bool,
) -> Result<PullSummary> {
    pull_image_with(client, reference, dir, all, &no_progress())
}

/// [`pull_image`], reporting the downloads of the bootstrap and blobs to `progress`.
pub fn pull_image_with(
    client: &RegistryClient,
    reference: &Reference,
    dir: &Path,
    all: bool,
    progress: &ProgressFn,
) -> Result<PullSummary> {
    let img = resolve_image(client, reference)?;
    let blobs_dir = dir.join(BLOBS_DIR);
    fs::create_dir_all(&blobs_dir).map_err(|e| Error::io(blobs_dir.display().to_string(), e))?;
    let mut s = PullSummary {
        manifest_digest: img.manifest_digest.clone(),
        bytes_fetched: img.config.len() as u64,
        blobs_fetched: 0,
        blobs_present: 0,
    };
    let wanted = if all { &img.blobs[..] } else { &[] };
    progress(&Transfer::Begin {
        blobs: 1 + wanted.len(),
        bytes: img.bootstrap.size + wanted.iter().map(|b| b.size).sum::<u64>(),
    });
    if fetch_to(
        client,
        &img.reference,
        &img.bootstrap,
        &dir.join(BOOTSTRAP_FILE),
        progress,
    )? {
        s.bytes_fetched += img.bootstrap.size;
    }
    if all {
        for b in &img.blobs {
            if fetch_to(
                client,
                &img.reference,
                b,
                &blobs_dir.join(b.hex()),
                progress,
            )? {
                s.blobs_fetched += 1;
                s.bytes_fetched += b.size;
            } else {
                s.blobs_present += 1;
            }
        }
    }
    write_atomic(&dir.join(MANIFEST_FILE), &img.config)?;
    Ok(s)
}

/// Whether `path` holds exactly the blob `b` (size, then sha256).
pub fn file_matches(path: &Path, b: &BlobRef) -> Result<bool> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(path.display().to_string(), e)),
    };
    let len = f
        .metadata()
        .map_err(|e| Error::io(path.display().to_string(), e))?
        .len();
    if len != b.size {
        return Ok(false);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()) == b.hex())
}

/// Download blob `b` to `path` unless it is there already; returns whether it downloaded.
fn fetch_to(
    client: &RegistryClient,
    repo: &Reference,
    b: &BlobRef,
    path: &Path,
    progress: &ProgressFn,
) -> Result<bool> {
    let done = |moved| {
        progress(&Transfer::Done {
            digest: &b.digest,
            size: b.size,
            moved,
        })
    };
    if file_matches(path, b)? {
        done(false);
        return Ok(false);
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".lode-pull-")
        .tempfile_in(parent)
        .map_err(|e| Error::io(format!("temporary file in {}", parent.display()), e))?;
    progress(&Transfer::Start {
        digest: &b.digest,
        size: b.size,
    });
    let reader = client.get_blob(repo, &b.digest, Some(b.size))?;
    let mut reader = Counted::new(reader, &b.digest, progress.clone());
    io::copy(&mut reader, tmp.as_file_mut()).map_err(|e| {
        Error::from_io(e, format!("downloading {} to {}", b.digest, path.display()))
    })?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path.display().to_string(), e.error))?;
    done(true);
    Ok(true)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".lode-pull-")
        .tempfile_in(parent)
        .map_err(|e| Error::io(format!("temporary file in {}", parent.display()), e))?;
    tmp.write_all(bytes)
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path.display().to_string(), e.error))?;
    Ok(())
}

fn read_small_blob(
    client: &RegistryClient,
    repo: &Reference,
    digest: &str,
    size: u64,
) -> Result<Vec<u8>> {
    if size > MAX_CONFIG_SIZE {
        return Err(Error::UnsupportedImage {
            reference: repo.to_string(),
            reason: format!("config blob {digest} is {size} bytes, more than {MAX_CONFIG_SIZE}"),
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    client
        .get_blob(repo, digest, Some(size))?
        .read_to_end(&mut out)
        .map_err(|e| Error::from_io(e, format!("reading config {digest} of {repo}")))?;
    Ok(out)
}

/// One layer of an ordinary image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub digest: String,
    pub size: u64,
    /// e.g. `application/vnd.oci.image.layer.v1.tar+gzip`,
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip`.
    pub media_type: String,
}

/// An ordinary Docker/OCI image resolved for one platform, for `lode convert`.
#[derive(Debug, Clone)]
pub struct SourceImage {
    /// The reference pinned to the platform manifest's digest.
    pub reference: Reference,
    pub manifest_digest: String,
    /// The platform chosen from an index (`None` if the reference named a manifest).
    pub platform: Option<Platform>,
    /// The image config JSON (verified).
    pub config: Vec<u8>,
    pub config_media_type: String,
    /// Base layer first.
    pub layers: Vec<LayerDescriptor>,
}

impl SourceImage {
    /// Stream a layer blob (still compressed as its media type says); the reader verifies
    /// size and digest when it reaches the end.
    pub fn open_layer(
        &self,
        client: &RegistryClient,
        layer: &LayerDescriptor,
    ) -> Result<BlobReader> {
        client.get_blob(&self.reference, &layer.digest, Some(layer.size))
    }
}

/// Resolve an ordinary image for `platform` (through an index / manifest list if there is
/// one): its config and ordered layers.
pub fn pull_layers(
    client: &RegistryClient,
    reference: &Reference,
    platform: &Platform,
) -> Result<SourceImage> {
    let mut m = client.get_manifest(reference, media::ALL_MANIFESTS)?;
    let mut current = reference.clone();
    let mut chosen = None;
    let mut depth = 0;
    while media::is_index(&m.media_type) {
        depth += 1;
        if depth > 2 {
            return Err(Error::UnsupportedImage {
                reference: reference.to_string(),
                reason: "image indexes nested more than twice".into(),
            });
        }
        let e = media::resolve_platform(&m.bytes, platform).map_err(|e| match e {
            Error::NoMatchingPlatform {
                platform,
                available,
                ..
            } => Error::NoMatchingPlatform {
                reference: reference.to_string(),
                platform,
                available,
            },
            other => other,
        })?;
        current = current.with_digest(&e.digest)?;
        m = client.get_manifest(&current, media::ALL_MANIFESTS)?;
        chosen = Some(e.platform);
    }
    let unsupported = |reason: String| Error::UnsupportedImage {
        reference: reference.to_string(),
        reason,
    };
    if !media::is_image_manifest(&m.media_type) {
        return Err(unsupported(format!(
            "unsupported manifest media type {}",
            m.media_type
        )));
    }
    let manifest = ImageManifest::from_reader(&m.bytes[..]).map_err(|e| Error::Protocol {
        url: current.to_string(),
        reason: format!("bad image manifest: {e}"),
    })?;
    let config_media_type = manifest.config().media_type().to_string();
    if config_media_type == MEDIA_TYPE_CONFIG {
        return Err(unsupported(
            "this is already a lode image; use `lode pull`".into(),
        ));
    }
    if config_media_type != media::OCI_CONFIG && config_media_type != media::DOCKER_CONFIG {
        return Err(unsupported(format!(
            "config media type {config_media_type} is not a container image config"
        )));
    }
    let config_digest = manifest.config().digest().to_string();
    validate_digest(&config_digest)?;
    let config = read_small_blob(client, &current, &config_digest, manifest.config().size())?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let digest = l.digest().to_string();
        validate_digest(&digest)?;
        layers.push(LayerDescriptor {
            digest,
            size: l.size(),
            media_type: l.media_type().to_string(),
        });
    }
    let current = current.with_digest(&m.digest)?;
    Ok(SourceImage {
        reference: current,
        manifest_digest: m.digest,
        platform: chosen,
        config,
        config_media_type,
        layers,
    })
}
