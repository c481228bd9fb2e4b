//! What a mount request says: the same whether it comes from `lode mount` directly or over the
//! daemon's API (it is the JSON body of `POST /v1/mounts`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use lode_storage::image::RegistryOptions;

/// How an image is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The best lazy mode this machine supports (see [`crate::mounts::choose_mode`]).
    #[default]
    Auto,
    /// Kernel EROFS over blobs that are all local; nothing is fetched.
    Local,
    /// Kernel EROFS over sparse cache files with fanotify pre-content marks (Linux 6.14+).
    Fanotify,
    /// lode's own EROFS reader behind FUSE, passthrough for local files.
    Fuse,
    /// Kernel EROFS over cachefiles on-demand.
    Fscache,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Local => "local",
            Mode::Fanotify => "fanotify",
            Mode::Fuse => "fuse",
            Mode::Fscache => "fscache",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// FUSE-mode knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseOptions {
    /// Use FUSE passthrough for files whose data is local.
    pub passthrough: bool,
    /// Smallest file given passthrough.
    pub passthrough_min_size: u64,
    /// Request-serving threads.
    pub threads: usize,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            passthrough: true,
            passthrough_min_size: lode_fuse::config::DEFAULT_PASSTHROUGH_MIN_SIZE,
            threads: 8,
        }
    }
}

/// `lode mount IMAGE MOUNTPOINT …` as data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// An image directory (absolute), an http(s) URL or a registry reference.
    pub image: String,
    /// An existing directory (absolute).
    pub mountpoint: PathBuf,
    #[serde(default)]
    pub mode: Mode,
    /// Where blob data is cached; the daemon's configured cache when absent.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub registry: RegistryOptions,
    /// Fetch the whole image in the background (reads overtake it).
    #[serde(default)]
    pub prefetch_all: bool,
    /// Bandwidth limit of background prefetch, bytes/s; 0: none.
    #[serde(default)]
    pub prefetch_rate: u64,
    #[serde(default)]
    pub fuse: FuseOptions,
    /// Record which files and ranges the workload reads into this file (a trace for
    /// `lode build --prefetch`).
    #[serde(default)]
    pub record_trace: Option<PathBuf>,
}

impl MountRequest {
    /// Makes relative paths absolute against `cwd` (the client's working directory: the
    /// daemon's is `/`), so a request means the same wherever it is served.
    pub fn absolutize(&mut self, cwd: &Path) -> Result<()> {
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                cwd.join(p)
            }
        };
        self.mountpoint = std::fs::canonicalize(abs(&self.mountpoint))
            .with_context(|| format!("mount point {}", self.mountpoint.display()))?;
        if let Some(c) = &self.cache_dir {
            self.cache_dir = Some(abs(c));
        }
        if let Some(t) = &self.record_trace {
            self.record_trace = Some(abs(t));
        }
        if let Some(a) = &self.registry.docker_config {
            self.registry.docker_config = Some(abs(a));
        }
        // A local image directory; URLs and references stay as they are.
        let image = Path::new(&self.image);
        if !self.image.contains("://") && (image.is_absolute() || abs(image).exists()) {
            let dir = std::fs::canonicalize(abs(image))
                .with_context(|| format!("image directory {}", self.image))?;
            self.image = dir
                .to_str()
                .context("the image directory's path must be valid UTF-8")?
                .to_string();
        }
        Ok(())
    }

    /// Checks what can be checked before any work.
    pub fn validate(&self) -> Result<()> {
        if !self.mountpoint.is_absolute() {
            bail!(
                "mount point {} must be an absolute path",
                self.mountpoint.display()
            );
        }
        if !self.mountpoint.is_dir() {
            bail!(
                "mount point {} is not a directory",
                self.mountpoint.display()
            );
        }
        if self.image.is_empty() {
            bail!("no image given");
        }
        if self.fuse.threads == 0 || self.fuse.threads > 256 {
            bail!("FUSE threads must be 1..=256, not {}", self.fuse.threads);
        }
        Ok(())
    }
}
