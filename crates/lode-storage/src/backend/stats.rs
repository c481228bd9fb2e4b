//! Per-backend counters: requests, bytes, errors by kind, requests in flight and a latency
//! histogram with fixed buckets. [`Counted`] wraps any backend and fills a
//! [`BackendStats`]; [`BackendStats::snapshot`] gives a serializable copy (for the
//! daemon's metrics endpoint, `--json` output, tests).
//!
//! Also here: a `Box` or an `Arc` of a backend is a backend, so `Counted<Arc<dyn Backend>>`
//! and `MirrorBackend::new(Box::new(arc.clone()), …)` work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, BackendErrorKind};

impl<T: Backend + ?Sized> Backend for Box<T> {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        (**self).read_range(digest, offset, len)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

impl<T: Backend + ?Sized> Backend for Arc<T> {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        (**self).read_range(digest, offset, len)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Upper bounds of the latency buckets, in microseconds; one more bucket above the last.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];
const NBUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// Counters of one backend; all monotonic except `in_flight`. Shared as `Arc`.
#[derive(Debug, Default)]
pub struct BackendStats {
    requests: AtomicU64,
    /// Bytes of successful reads.
    bytes: AtomicU64,
    transient_errors: AtomicU64,
    not_found_errors: AtomicU64,
    permanent_errors: AtomicU64,
    in_flight: AtomicU64,
    /// Per bucket (not cumulative): requests (successful or not) whose latency was at most
    /// the bucket's bound and above the previous one.
    latency: [AtomicU64; NBUCKETS],
    latency_sum_us: AtomicU64,
}

/// A copy of [`BackendStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackendStatsSnapshot {
    /// The backend's `describe()`.
    pub backend: String,
    pub requests: u64,
    pub bytes: u64,
    pub transient_errors: u64,
    pub not_found_errors: u64,
    pub permanent_errors: u64,
    pub in_flight: u64,
    pub latency: LatencyHistogram,
}

/// Request latencies. `counts[i]` requests took at most `bounds_us[i]` (and more than the
/// bound before); `counts[bounds_us.len()]` took longer than the last bound. Not cumulative
/// (Prometheus buckets are the running sums).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl BackendStatsSnapshot {
    pub fn errors(&self) -> u64 {
        self.transient_errors + self.not_found_errors + self.permanent_errors
    }
}

impl LatencyHistogram {
    /// An upper bound of the `q`-quantile (0..=1) in microseconds: the bound of the bucket
    /// it falls in (`u64::MAX` for the overflow bucket), `None` without requests.
    pub fn quantile_upper_bound_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(self.bounds_us.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

impl BackendStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one finished request.
    pub fn record(&self, latency: Duration, result: Result<u64, &BackendErrorKind>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(bytes) => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(BackendErrorKind::Transient) => {
                self.transient_errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(BackendErrorKind::NotFound) => {
                self.not_found_errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(BackendErrorKind::Permanent) => {
                self.permanent_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self, backend: String) -> BackendStatsSnapshot {
        BackendStatsSnapshot {
            backend,
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            transient_errors: self.transient_errors.load(Ordering::Relaxed),
            not_found_errors: self.not_found_errors.load(Ordering::Relaxed),
            permanent_errors: self.permanent_errors.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency: LatencyHistogram {
                bounds_us: LATENCY_BUCKETS_US.to_vec(),
                counts: self
                    .latency
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
                sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            },
        }
    }
}

/// A backend that counts what goes through it.
pub struct Counted<B: Backend> {
    inner: B,
    stats: Arc<BackendStats>,
}

impl<B: Backend> Counted<B> {
    pub fn new(inner: B) -> Self {
        Self::with_stats(inner, Arc::new(BackendStats::new()))
    }

    /// Count into `stats` (e.g. shared by several backends, or kept by a metrics registry).
    pub fn with_stats(inner: B, stats: Arc<BackendStats>) -> Self {
        Counted { inner, stats }
    }

    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    pub fn snapshot(&self) -> BackendStatsSnapshot {
        self.stats.snapshot(self.inner.describe())
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Backend> Backend for Counted<B> {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let r = self.inner.read_range(digest, offset, len);
        let took = start.elapsed();
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats.record(
            took,
            match &r {
                Ok(v) => Ok(v.len() as u64),
                Err(e) => Err(&e.kind),
            },
        );
        r
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Backend for Fixed {
        fn read_range(&self, d: &str, _: u64, len: u64) -> Result<Vec<u8>, BackendError> {
            match d {
                "missing" => Err(BackendError::new(BackendErrorKind::NotFound, "nope")),
                "flaky" => Err(BackendError::transient("later")),
                "denied" => Err(BackendError::new(BackendErrorKind::Permanent, "no")),
                _ => Ok(vec![0; len as usize]),
            }
        }
        fn describe(&self) -> String {
            "fixed".into()
        }
    }

    #[test]
    fn counts() {
        let c = Counted::new(Arc::new(Fixed) as Arc<dyn Backend>);
        c.read_range("a", 0, 10).unwrap();
        c.read_range("a", 0, 5).unwrap();
        c.read_range("missing", 0, 5).unwrap_err();
        c.read_range("flaky", 0, 5).unwrap_err();
        c.read_range("denied", 0, 5).unwrap_err();
        let s = c.snapshot();
        assert_eq!(s.backend, "fixed");
        assert_eq!(
            (
                s.requests,
                s.bytes,
                s.transient_errors,
                s.not_found_errors,
                s.permanent_errors
            ),
            (5, 15, 1, 1, 1)
        );
        assert_eq!(s.errors(), 3);
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.latency.counts.iter().sum::<u64>(), 5);
        assert_eq!(s.latency.counts.len(), s.latency.bounds_us.len() + 1);
        let json = serde_json::to_string(&s).unwrap();
        let back: BackendStatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn buckets() {
        let st = BackendStats::new();
        st.record(Duration::from_micros(250), Ok(1)); // bucket 0 (<= 250)
        st.record(Duration::from_micros(251), Ok(1)); // bucket 1
        st.record(Duration::from_secs(100), Ok(1)); // overflow
        let h = st.snapshot(String::new()).latency;
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[NBUCKETS - 1], 1);
        assert_eq!(h.quantile_upper_bound_us(0.0), Some(250));
        assert_eq!(h.quantile_upper_bound_us(0.5), Some(500));
        assert_eq!(h.quantile_upper_bound_us(1.0), Some(u64::MAX));
        assert_eq!(h.sum_us, 100_000_501);
        assert_eq!(
            LatencyHistogram::default().quantile_upper_bound_us(0.5),
            None
        );
    }
}
