//! Media types, and choosing a platform's manifest from an index / manifest list.

use std::fmt;

use oci_spec::image::ImageIndex;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::validate_digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Every manifest type this crate understands, for `Accept`.
pub const ALL_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub fn is_image_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// The media type of a manifest without a usable Content-Type: its `mediaType` field, else
/// OCI index / manifest by shape.
pub(crate) fn sniff_manifest_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        layers: Option<serde::de::IgnoredAny>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    if let Some(m) = p.media_type.filter(|m| !m.is_empty()) {
        return Some(m);
    }
    if p.manifests.is_some() {
        Some(OCI_INDEX.into())
    } else if p.layers.is_some() {
        Some(OCI_MANIFEST.into())
    } else {
        None
    }
}

/// An OS / architecture / variant triple, as in index entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }

    /// The platform of this machine in Go's names (`linux/amd64`, `linux/arm64/v8`, ...).
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform::new(std::env::consts::OS, arch, variant)
    }
}

/// The host's platform (`linux/amd64` on x86-64 Linux).
impl Default for Platform {
    fn default() -> Self {
        Platform::host()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The entry of an index chosen for a platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub platform: Platform,
}

/// Choose the manifest for `platform` in an OCI index or Docker manifest list. The variant
/// must match when both sides have one; otherwise an entry without a variant, or with the
/// default one (`v8` for arm64), is preferred. Errors list the platforms present.
pub fn resolve_platform(index: &[u8], platform: &Platform) -> Result<IndexEntry> {
    let idx: ImageIndex = serde_json::from_slice(index).map_err(|e| Error::Protocol {
        url: "image index".into(),
        reason: format!("not a valid OCI index / manifest list: {e}"),
    })?;
    let mut entries = Vec::new();
    for d in idx.manifests() {
        let Some(p) = d.platform() else { continue };
        entries.push(IndexEntry {
            digest: d.digest().to_string(),
            size: d.size(),
            media_type: d.media_type().to_string(),
            platform: Platform {
                os: p.os().to_string(),
                architecture: p.architecture().to_string(),
                variant: p.variant().clone().filter(|v| !v.is_empty()),
            },
        });
    }
    let default_variant = |arch: &str| match arch {
        "arm64" => Some("v8"),
        _ => None,
    };
    let score = |e: &IndexEntry| -> Option<u8> {
        if e.platform.os != platform.os || e.platform.architecture != platform.architecture {
            return None;
        }
        let dv = default_variant(&platform.architecture);
        match (platform.variant.as_deref(), e.platform.variant.as_deref()) {
            (Some(want), Some(got)) if want == got => Some(3),
            (Some(want), Some(_)) if Some(want) != dv => None,
            (Some(_), Some(_)) => None,
            (Some(want), None) if Some(want) == dv => Some(2),
            (Some(_), None) => Some(1),
            (None, None) => Some(3),
            (None, Some(got)) if Some(got) == dv => Some(2),
            (None, Some(_)) => Some(1),
        }
    };
    let best = entries
        .iter()
        .filter_map(|e| score(e).map(|s| (s, e)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, e)| e.clone());
    match best {
        Some(e) => {
            validate_digest(&e.digest)?;
            Ok(e)
        }
        None => {
            let available: Vec<String> = entries.iter().map(|e| e.platform.to_string()).collect();
            Err(Error::NoMatchingPlatform {
                reference: "index".into(),
                platform: platform.to_string(),
                available: if available.is_empty() {
                    "no platform entries".into()
                } else {
                    available.join(", ")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, n: u8) -> String {
        let v = variant
            .map(|v| format!(r#","variant":"{v}""#))
            .unwrap_or_default();
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","size":{n},"digest":"sha256:{}","platform":{{"os":"{os}","architecture":"{arch}"{v}}}}}"#,
            format!("{n:02x}").repeat(32)
        )
    }

    #[test]
    fn platforms() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{},{},{},{}]}}"#,
            entry("linux", "arm", Some("v6"), 1),
            entry("linux", "arm64", Some("v8"), 2),
            entry("linux", "amd64", None, 3),
            entry("unknown", "unknown", None, 4),
            entry("linux", "arm", Some("v7"), 5),
        );
        let pick = |p: Platform| resolve_platform(idx.as_bytes(), &p).map(|e| e.size);
        assert_eq!(pick(Platform::new("linux", "amd64", None)).unwrap(), 3);
        assert_eq!(pick(Platform::default()).unwrap(), 3);
        assert_eq!(pick(Platform::new("linux", "arm64", None)).unwrap(), 2);
        assert_eq!(
            pick(Platform::new("linux", "arm64", Some("v8"))).unwrap(),
            2
        );
        assert_eq!(pick(Platform::new("linux", "arm", Some("v7"))).unwrap(), 5);
        let e = pick(Platform::new("linux", "s390x", None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux/s390x") && e.contains("linux/arm/v6, linux/arm64/v8, linux/amd64"),
            "{e}"
        );
        assert!(resolve_platform(b"{", &Platform::default()).is_err());
        assert!(resolve_platform(b"[]", &Platform::default()).is_err());
    }

    #[test]
    fn sniff() {
        assert_eq!(
            sniff_manifest_type(br#"{"manifests":[]}"#).unwrap(),
            OCI_INDEX
        );
        assert_eq!(
            sniff_manifest_type(br#"{"mediaType":"x","layers":[]}"#).unwrap(),
            "x"
        );
        assert_eq!(
            sniff_manifest_type(br#"{"layers":[]}"#).unwrap(),
            OCI_MANIFEST
        );
        assert_eq!(sniff_manifest_type(b"\xff"), None);
    }
}
