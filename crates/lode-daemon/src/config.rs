//! The daemon's configuration file (`lode daemon --config /etc/lode/lode.toml`); every key is
//! optional. `docs/lode.toml` is a commented sample.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::request::{FuseOptions, Mode, RegistryOptions};

/// Where `lode` looks for the daemon, and where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/lode/lode.sock";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The API's unix socket (mode 0600: root only).
    pub socket: PathBuf,
    /// Blob cache shared by every mount (must be on ext4, xfs or btrfs for fanotify mode).
    pub cache_dir: PathBuf,
    /// Evict unused blobs, least recently used first, while the cache is larger
    /// (e.g. "20G"); none by default.
    pub cache_max_size: Option<String>,
    /// Mount records and per-mount state.
    pub run_dir: Option<PathBuf>,
    /// Mode of requests that do not name one.
    pub default_mode: Mode,
    /// `tracing` filter when `RUST_LOG` is not set, e.g. "info" or "lode_storage=debug".
    pub log: String,
    /// Registry settings of requests that carry none.
    pub registry: RegistryOptions,
    /// FUSE settings of requests that carry none.
    pub fuse: FuseOptions,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(DEFAULT_SOCKET),
            cache_dir: PathBuf::from(lode_storage::cache::DEFAULT_CACHE_DIR),
            cache_max_size: None,
            run_dir: None,
            default_mode: Mode::Auto,
            log: "info".into(),
            registry: RegistryOptions {
                retries: 4,
                ..Default::default()
            },
            fuse: FuseOptions::default(),
        }
    }
}

impl Config {
    /// Reads `path`; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        if let Some(s) = &c.cache_max_size {
            lode_storage::cache::parse_size(s)
                .with_context(|| format!("cache_max_size = {s:?}"))?;
        }
        if !c.socket.is_absolute() {
            bail!("socket = {:?} must be an absolute path", c.socket);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses() {
        let text = include_str!("../../../docs/lode.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn empty_config_is_the_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.default_mode, Mode::Auto);
        assert_eq!(c.registry.retries, 4);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("cache_max_size = \"lots\"").unwrap_err();
        assert!(format!("{e:#}").contains("cache_max_size"), "{e:#}");
        let e = Config::parse("sokcet = \"/x\"").unwrap_err();
        assert!(format!("{e:#}").contains("sokcet"), "{e:#}");
        let e = Config::parse("default_mode = \"fast\"").unwrap_err();
        assert!(format!("{e:#}").contains("fast"), "{e:#}");
    }
}
