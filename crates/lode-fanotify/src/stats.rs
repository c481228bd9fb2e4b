//! The stats file of a fanotify mount (`<run dir>/<mount key>.stats`, JSON), rewritten by
//! the worker every 250 ms. Until the daemon/API issue unifies this, it is the way to see
//! what a mount does:
//!
//! ```text
//! jq . /run/lode/mounts/_mnt_app-*.stats
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub mountpoint: String,
    pub image: String,
    pub supervisor_pid: u32,
    pub worker_pid: u32,
    /// Worker incarnations so far (1 = the first worker is serving).
    pub worker_generation: u64,
    pub worker_restarts: u64,
    /// Seconds since the epoch of this snapshot.
    pub updated: f64,
    /// Sum of the blobs' uncompressed layouts / remote forms.
    pub image_bytes: u64,
    pub blob_bytes: u64,
    pub chunks: u64,
    pub chunks_present: u64,
    /// Blobs complete in the cache whose marks were removed (reads raise no events).
    #[serde(default)]
    pub blobs_unmarked: u64,
    /// Requests and bytes spent by `lode mount` opening the image (chunk tables).
    pub open_requests: u64,
    pub open_bytes: u64,
    /// Fetch counters summed over every worker so far: requests, bytes_fetched,
    /// chunks_fetched, errors, hits, misses.
    pub fetch: BTreeMap<String, u64>,
    /// Event counters summed over every worker (see `journal::Counter`).
    pub events: BTreeMap<String, u64>,
    /// The current worker's full fetch statistics (latency histogram etc.).
    pub worker_fetch: serde_json::Value,
    /// `off`, `running`, `done`, or `failed: …`.
    pub prefetch: String,
}

impl Stats {
    pub fn load(path: &Path) -> Result<Stats> {
        let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes atomically (temp file + rename), so readers never see half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("stats-tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn fetch(&self, name: &str) -> u64 {
        self.fetch.get(name).copied().unwrap_or(0)
    }

    pub fn event(&self, name: &str) -> u64 {
        self.events.get(name).copied().unwrap_or(0)
    }
}
