//! `GET /metrics`: every mount's counters and the cache's size in the Prometheus text format.
//!
//! Built afresh at each scrape from what [`crate::mounts::list`] reads (the counters live in
//! the serving processes, which outlive the daemon), so nothing is kept between scrapes.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::mounts::MountStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MountLabels {
    mountpoint: String,
    mode: String,
    image: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    mountpoint: String,
    mode: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

/// The cache as the daemon sees it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CacheSummary {
    pub dir: std::path::PathBuf,
    pub blobs: u64,
    /// Bytes allocated on disk (sparse files count what is present).
    pub disk_bytes: u64,
    /// Sum of the blobs' full uncompressed sizes.
    pub apparent_bytes: u64,
    pub in_use: u64,
    pub max_size: Option<u64>,
}

/// Renders the metrics page.
pub fn render(mounts: &[MountStatus], cache: &CacheSummary, uptime_secs: u64) -> String {
    let mut reg = Registry::with_prefix("lode");
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
        .set(1);
    reg.register("build_info", "The running lode version", info);
    reg.register(
        "daemon_uptime_seconds",
        "Seconds since the daemon started",
        ConstGauge::new(uptime_secs as i64),
    );

    let by_mode = Family::<ModeLabels, Gauge>::default();
    for m in ["fanotify", "fscache", "fuse", "local"] {
        by_mode.get_or_create(&ModeLabels { mode: m.into() }).set(0);
    }
    let serving = Family::<MountLabels, Gauge>::default();
    let fetched = Family::<MountLabels, Counter>::default();
    let requests = Family::<MountLabels, Counter>::default();
    let errors = Family::<MountLabels, Counter>::default();
    let hits = Family::<MountLabels, Counter>::default();
    let misses = Family::<MountLabels, Counter>::default();
    let restarts = Family::<MountLabels, Counter>::default();
    let chunks_present = Family::<MountLabels, Gauge>::default();
    let chunks = Family::<MountLabels, Gauge>::default();
    let events = Family::<EventLabels, Counter>::default();
    let mut latency = LatencyHistograms::default();
    for m in mounts {
        let l = MountLabels {
            mountpoint: m.mountpoint.display().to_string(),
            mode: m.mode.clone(),
            image: m.image.clone(),
        };
        by_mode
            .get_or_create(&ModeLabels {
                mode: m.mode.clone(),
            })
            .inc();
        serving.get_or_create(&l).set((m.state == "serving") as i64);
        let s = &m.stats;
        fetched.get_or_create(&l).inc_by(s.bytes_fetched);
        requests.get_or_create(&l).inc_by(s.requests);
        errors.get_or_create(&l).inc_by(s.fetch_errors);
        restarts.get_or_create(&l).inc_by(s.worker_restarts);
        if let Some(h) = s.hits {
            hits.get_or_create(&l).inc_by(h);
        }
        if let Some(h) = s.misses {
            misses.get_or_create(&l).inc_by(h);
        }
        if let (Some(c), Some(p)) = (s.chunks, s.chunks_present) {
            chunks.get_or_create(&l).set(c as i64);
            chunks_present.get_or_create(&l).set(p as i64);
        }
        for (kind, n) in &s.events {
            events
                .get_or_create(&EventLabels {
                    mountpoint: l.mountpoint.clone(),
                    mode: l.mode.clone(),
                    kind: kind.clone(),
                })
                .inc_by(*n);
        }
        if let Some(h) = fetch_latency(&m.detail) {
            latency.0.push((l, h));
        }
    }
    reg.register("mounts", "Mounts by mode", by_mode);
    reg.register(
        "mount_serving",
        "1 when the mount is up and its server process alive",
        serving,
    );
    reg.register(
        "fetch_bytes",
        "Bytes received from the image's source (compressed form)",
        fetched,
    );
    reg.register(
        "fetch_requests",
        "Range requests to the image's source",
        requests,
    );
    reg.register("fetch_errors", "Fetches that failed after retries", errors);
    reg.register(
        "cache_hits",
        "Reads whose data was already in the cache",
        hits,
    );
    reg.register("cache_misses", "Reads that had to fetch", misses);
    reg.register(
        "worker_restarts",
        "Worker processes restarted by their supervisor",
        restarts,
    );
    reg.register("image_chunks", "Chunks of the mounted image", chunks);
    reg.register(
        "image_chunks_cached",
        "Chunks of the mounted image in the cache",
        chunks_present,
    );
    reg.register(
        "kernel_events",
        "Kernel requests served, by kind (fanotify events, FUSE opcodes, cachefiles messages)",
        events,
    );
    reg.register_collector(Box::new(latency));

    reg.register(
        "cache_blobs",
        "Blobs in the cache",
        ConstGauge::new(cache.blobs as i64),
    );
    reg.register(
        "cache_disk_bytes",
        "Bytes the cache occupies on disk",
        ConstGauge::new(cache.disk_bytes as i64),
    );
    reg.register(
        "cache_apparent_bytes",
        "Full uncompressed size of the cached blobs",
        ConstGauge::new(cache.apparent_bytes as i64),
    );
    reg.register(
        "cache_blobs_in_use",
        "Blobs of mounted images",
        ConstGauge::new(cache.in_use as i64),
    );
    if let Some(max) = cache.max_size {
        reg.register(
            "cache_max_bytes",
            "Configured cache size limit",
            ConstGauge::new(max as i64),
        );
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).expect("writing to a String");
    out
}

/// One fetch-latency histogram: per-bucket counts (ms upper bounds, last = overflow) and the
/// sum in microseconds, as lode-storage's `FetchStatsSnapshot` keeps them.
#[derive(Debug, Clone)]
struct Histogram {
    bounds_ms: Vec<u64>,
    counts: Vec<u64>,
    sum_us: u64,
}

fn fetch_latency(detail: &serde_json::Value) -> Option<Histogram> {
    // fanotify keeps the current worker's snapshot under `worker_fetch`; fscache under `fetch`.
    let f = detail
        .get("worker_fetch")
        .filter(|v| v.is_object())
        .or_else(|| detail.get("fetch"))?;
    let nums = |k: &str| -> Option<Vec<u64>> {
        f.get(k)?.as_array()?.iter().map(|v| v.as_u64()).collect()
    };
    Some(Histogram {
        bounds_ms: nums("latency_ms_buckets")?,
        counts: nums("latency_counts")?,
        sum_us: f
            .get("latency_us_sum")
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
    })
}

#[derive(Debug, Default)]
struct LatencyHistograms(Vec<(MountLabels, Histogram)>);

impl Collector for LatencyHistograms {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "fetch_latency_seconds",
            "Latency of range requests to the image's source (current worker)",
            None,
            MetricType::Histogram,
        )?;
        for (labels, h) in &self.0 {
            let mut buckets: Vec<(f64, u64)> = h
                .bounds_ms
                .iter()
                .zip(&h.counts)
                .map(|(&b, &c)| (b as f64 / 1000.0, c))
                .collect();
            buckets.push((
                f64::INFINITY,
                h.counts.get(h.bounds_ms.len()).copied().unwrap_or(0),
            ));
            let count = h.counts.iter().sum();
            family
                .encode_family(labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum_us as f64 / 1e6,
                    count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}
