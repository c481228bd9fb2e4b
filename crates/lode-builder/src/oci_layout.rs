//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) as layer
//! input: picks a manifest by tag, follows an index (manifest list) to linux/amd64, and opens
//! each layer blob through a reader that checks its size and sha256 as it is read.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use oci_spec::image::{Arch, Descriptor, ImageIndex, ImageManifest, MediaType, Os};
use sha2::{Digest, Sha256};

use crate::layers::LayerInput;

/// Annotation naming a manifest in `index.json` (`skopeo copy … oci:DIR:TAG` sets it).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and `docker save`'s) full image name annotation.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Largest index or manifest read into memory.
const MAX_JSON: u64 = 8 << 20;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Splits `DIR[:TAG]`: a path that exists as given is a directory without a tag; else the
/// first `:` whose left side is a layout directory splits (so a tag may be a full image name
/// such as `docker.io/library/debian:12`); else the last `:`.
pub fn parse_arg(arg: &str) -> (PathBuf, Option<String>) {
    let is_layout = |p: &str| Path::new(p).join("index.json").is_file();
    if is_layout(arg) {
        return (PathBuf::from(arg), None);
    }
    for (i, _) in arg.match_indices(':') {
        if i > 0 && is_layout(&arg[..i]) {
            return (PathBuf::from(&arg[..i]), Some(arg[i + 1..].to_string()));
        }
    }
    match arg.rsplit_once(':') {
        Some((dir, tag)) if !dir.is_empty() && !tag.contains('/') => {
            (PathBuf::from(dir), Some(tag.to_string()))
        }
        _ => (PathBuf::from(arg), None),
    }
}

/// The layers of the image `tag` (or the only image) of the layout at `dir`, in order.
pub fn open_layers(dir: &Path, tag: Option<&str>) -> Result<Vec<LayerInput>> {
    let manifest = resolve_manifest(dir, tag)?;
    let mut out = Vec::new();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let mt = layer.media_type().to_string();
        ensure!(
            mt.contains("tar") && !mt.contains("encrypted"),
            "{}: layer {} has media type {mt}, not a tar layer",
            dir.display(),
            i + 1
        );
        let (path, hex) = blob_path(dir, layer)?;
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        out.push(
            LayerInput::new(
                format!("{}", layer.digest()),
                Box::new(Verified::new(
                    file,
                    hex,
                    layer.size(),
                    layer.digest().to_string(),
                )),
            )
            .with_size(layer.size()),
        );
    }
    Ok(out)
}

/// Reads `index.json`, picks the descriptor and follows indexes down to an image manifest.
pub fn resolve_manifest(dir: &Path, tag: Option<&str>) -> Result<ImageManifest> {
    let index_path = dir.join("index.json");
    let index_bytes = std::fs::read(&index_path).with_context(|| {
        format!(
            "reading {} (is it an OCI image layout?)",
            index_path.display()
        )
    })?;
    let index: ImageIndex = serde_json::from_slice(&index_bytes)
        .with_context(|| format!("parsing {}", index_path.display()))?;
    let names = |d: &Descriptor| -> Vec<String> {
        d.annotations()
            .iter()
            .flat_map(|a| [a.get(REF_NAME), a.get(CONTAINERD_NAME)])
            .flatten()
            .cloned()
            .collect()
    };
    let candidates: Vec<&Descriptor> = match tag {
        Some(tag) => index
            .manifests()
            .iter()
            .filter(|d| names(d).iter().any(|n| n == tag))
            .collect(),
        None => index.manifests().iter().collect(),
    };
    let desc = match candidates.as_slice() {
        [] => {
            let known: Vec<String> = index.manifests().iter().flat_map(names).collect();
            match tag {
                Some(tag) => bail!(
                    "{}: no image tagged {tag:?} (tags: {})",
                    dir.display(),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
                None => bail!("{}: index.json lists no image", dir.display()),
            }
        }
        [one] => (*one).clone(),
        several => {
            let amd64: Vec<&&Descriptor> = several.iter().filter(|d| is_linux_amd64(d)).collect();
            match amd64.as_slice() {
                [one] => (**one).clone(),
                _ => {
                    let known: Vec<String> = several.iter().flat_map(|d| names(d)).collect();
                    bail!(
                        "{}: index.json lists {} images{}; pick one with DIR:TAG (tags: {})",
                        dir.display(),
                        several.len(),
                        tag.map(|t| format!(" tagged {t:?}")).unwrap_or_default(),
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    )
                }
            }
        }
    };
    let mut desc = desc;
    for _ in 0..8 {
        let mt = desc.media_type().clone();
        let bytes = read_blob(dir, &desc)?;
        match mt {
            MediaType::ImageManifest => return parse_manifest(&bytes, &desc),
            MediaType::Other(ref s) if s == DOCKER_MANIFEST => {
                return parse_manifest(&bytes, &desc)
            }
            MediaType::ImageIndex => desc = pick_platform(&bytes, &desc)?,
            MediaType::Other(ref s) if s == DOCKER_LIST => desc = pick_platform(&bytes, &desc)?,
            other => bail!(
                "{}: {} has media type {other}, not an image",
                dir.display(),
                desc.digest()
            ),
        }
    }
    bail!("{}: indexes nest too deeply", dir.display())
}

fn is_linux_amd64(d: &Descriptor) -> bool {
    d.platform()
        .as_ref()
        .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
}

fn parse_manifest(bytes: &[u8], desc: &Descriptor) -> Result<ImageManifest> {
    serde_json::from_slice(bytes).with_context(|| format!("parsing manifest {}", desc.digest()))
}

fn pick_platform(bytes: &[u8], desc: &Descriptor) -> Result<Descriptor> {
    let index: ImageIndex = serde_json::from_slice(bytes)
        .with_context(|| format!("parsing index {}", desc.digest()))?;
    index
        .manifests()
        .iter()
        .find(|d| is_linux_amd64(d))
        .cloned()
        .with_context(|| {
            let platforms: Vec<String> = index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| format!("{}/{}", p.os(), p.architecture()))
                .collect();
            format!(
                "index {} has no linux/amd64 image (platforms: {})",
                desc.digest(),
                platforms.join(", ")
            )
        })
}

/// `DIR/blobs/sha256/<hex>` for a descriptor (only sha256 digests are accepted).
fn blob_path(dir: &Path, desc: &Descriptor) -> Result<(PathBuf, String)> {
    let digest = desc.digest().to_string();
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest} (only sha256 is)"))?;
    ensure!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "malformed digest {digest}"
    );
    Ok((dir.join("blobs").join("sha256").join(hex), hex.to_string()))
}

/// A small blob (index, manifest), checked against its descriptor.
fn read_blob(dir: &Path, desc: &Descriptor) -> Result<Vec<u8>> {
    let (path, hex) = blob_path(dir, desc)?;
    ensure!(
        desc.size() <= MAX_JSON,
        "{} is {} bytes, too large for an index or manifest",
        desc.digest(),
        desc.size()
    );
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    Verified::new(file, hex, desc.size(), desc.digest().to_string())
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// Passes a blob through while hashing it; at its end, checks size and sha256 and turns a
/// mismatch into a read error.
pub struct Verified<R> {
    inner: R,
    sha: Sha256,
    read: u64,
    size: u64,
    hex: String,
    name: String,
    checked: bool,
}

impl<R: Read> Verified<R> {
    pub fn new(inner: R, hex: String, size: u64, name: String) -> Self {
        Verified {
            inner,
            sha: Sha256::new(),
            read: 0,
            size,
            hex,
            name,
            checked: false,
        }
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.read += n as u64;
        if self.read > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is larger than the {} bytes its descriptor says",
                    self.name, self.size
                ),
            ));
        }
        if n == 0 && !self.checked {
            if self.read != self.size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "blob {} is {} bytes, its descriptor says {} (truncated?)",
                        self.name, self.read, self.size
                    ),
                ));
            }
            let got = hex::encode(self.sha.clone().finalize());
            if got != self.hex {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob {} has digest sha256:{got} (corrupted)", self.name),
                ));
            }
            self.checked = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_argument() {
        assert_eq!(
            parse_arg("/nonexistent/img:v1"),
            (PathBuf::from("/nonexistent/img"), Some("v1".to_string()))
        );
        assert_eq!(
            parse_arg("/nonexistent/img"),
            (PathBuf::from("/nonexistent/img"), None)
        );
        assert_eq!(parse_arg("a:b/c"), (PathBuf::from("a:b/c"), None));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.json"), "{}").unwrap();
        let d = dir.path().display();
        assert_eq!(
            parse_arg(&format!("{d}:docker.io/library/debian:12")),
            (
                dir.path().to_path_buf(),
                Some("docker.io/library/debian:12".into())
            )
        );
        assert_eq!(parse_arg(&format!("{d}")), (dir.path().to_path_buf(), None));
    }

    #[test]
    fn verification() {
        let data = b"hello".to_vec();
        let hex = hex::encode(Sha256::digest(&data));
        let mut out = Vec::new();
        Verified::new(&data[..], hex.clone(), 5, "x".into())
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        let e = Verified::new(&b"hellO"[..], hex.clone(), 5, "x".into())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("corrupted"), "{e}");
        let e = Verified::new(&b"hell"[..], hex.clone(), 5, "x".into())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = Verified::new(&b"hello!"[..], hex, 5, "x".into())
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("larger"), "{e}");
    }
}
