//! A mirror (or caching proxy, or P2P agent such as Dragonfly's dfdaemon) in front of the
//! origin: reads go to the mirror first; when it fails — any error, a missing blob included —
//! that read is served by the origin and the mirror is put in a cool-down (30 s by default)
//! during which reads go straight to the origin. After the cool-down the next read tries the
//! mirror again. A warning is logged when the mirror goes down, a note when it comes back;
//! nothing per read.
//!
//! (A mirror reached as an HTTP *forward* proxy is simpler: `HttpOptions::proxy` on the
//! origin's [`super::http::HttpBackend`]. This type is for a mirror with its own URL.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Backend, BackendError};

pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);

pub struct MirrorBackend {
    mirror: Box<dyn Backend>,
    origin: Box<dyn Backend>,
    cooldown: Duration,
    state: Mutex<State>,
    mirror_reads: AtomicU64,
    origin_reads: AtomicU64,
    fallbacks: AtomicU64,
}

#[derive(Default)]
struct State {
    /// When the current outage was noticed (a success of a read that started before this
    /// does not end it).
    down_since: Option<Instant>,
    /// Reads go to the origin until then.
    down_until: Option<Instant>,
}

/// What the mirror is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorState {
    /// Reads go to the mirror (after an outage: the next read tries it).
    Up,
    /// Reads go to the origin for `remaining` more.
    CoolingDown { remaining: Duration },
}

/// Where reads went, since the backend was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MirrorCounters {
    /// Reads the mirror answered.
    pub mirror_reads: u64,
    /// Reads sent to the origin (fallbacks and reads during a cool-down).
    pub origin_reads: u64,
    /// Reads the mirror failed (each also went to the origin).
    pub fallbacks: u64,
}

impl MirrorBackend {
    pub fn new(mirror: Box<dyn Backend>, origin: Box<dyn Backend>) -> Self {
        Self::with_cooldown(mirror, origin, DEFAULT_COOLDOWN)
    }

    pub fn with_cooldown(
        mirror: Box<dyn Backend>,
        origin: Box<dyn Backend>,
        cooldown: Duration,
    ) -> Self {
        MirrorBackend {
            mirror,
            origin,
            cooldown,
            state: Mutex::new(State::default()),
            mirror_reads: AtomicU64::new(0),
            origin_reads: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    pub fn mirror(&self) -> &dyn Backend {
        &*self.mirror
    }

    pub fn origin(&self) -> &dyn Backend {
        &*self.origin
    }

    pub fn state(&self) -> MirrorState {
        let st = self.lock();
        let now = Instant::now();
        match st.down_until {
            Some(t) if t > now => MirrorState::CoolingDown { remaining: t - now },
            _ => MirrorState::Up,
        }
    }

    pub fn counters(&self) -> MirrorCounters {
        MirrorCounters {
            mirror_reads: self.mirror_reads.load(Ordering::Relaxed),
            origin_reads: self.origin_reads.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_up(&self, started: Instant) {
        let mut st = self.lock();
        if let Some(since) = st.down_since {
            if since <= started {
                st.down_since = None;
                st.down_until = None;
                tracing::info!(
                    "mirror {} answers again; reading through it",
                    self.mirror.describe()
                );
            }
        }
    }

    fn mark_down(&self, e: &BackendError) {
        let mut st = self.lock();
        let now = Instant::now();
        let was_up = st.down_since.is_none();
        st.down_since = Some(now);
        st.down_until = Some(now + self.cooldown);
        if was_up {
            tracing::warn!(
                "mirror {} failed ({e}); reading from the origin {} for {:?}",
                self.mirror.describe(),
                self.origin.describe(),
                self.cooldown
            );
        } else {
            tracing::debug!("mirror {} still failing: {e}", self.mirror.describe());
        }
    }
}

impl Backend for MirrorBackend {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let use_mirror = match self.lock().down_until {
            Some(t) => Instant::now() >= t,
            None => true,
        };
        let mut mirror_error = None;
        if use_mirror {
            let started = Instant::now();
            match self.mirror.read_range(digest, offset, len) {
                Ok(v) => {
                    self.mirror_reads.fetch_add(1, Ordering::Relaxed);
                    self.mark_up(started);
                    return Ok(v);
                }
                Err(e) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    self.mark_down(&e);
                    mirror_error = Some(e);
                }
            }
        }
        self.origin_reads.fetch_add(1, Ordering::Relaxed);
        self.origin
            .read_range(digest, offset, len)
            .map_err(|mut e| {
                if let Some(m) = mirror_error {
                    e.message = format!("{} (the mirror failed first: {m})", e.message);
                }
                e
            })
    }

    fn describe(&self) -> String {
        format!(
            "{} via mirror {}",
            self.origin.describe(),
            self.mirror.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendErrorKind;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Answers `len` copies of `byte`, or fails while `down` is set.
    struct Fake {
        byte: u8,
        down: Arc<AtomicBool>,
        calls: Arc<AtomicU64>,
    }

    impl Backend for Fake {
        fn read_range(&self, _: &str, _: u64, len: u64) -> Result<Vec<u8>, BackendError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(BackendError::transient(format!("fake {} down", self.byte)));
            }
            Ok(vec![self.byte; len as usize])
        }
        fn describe(&self) -> String {
            format!("fake {}", self.byte)
        }
    }

    fn fake(byte: u8) -> (Box<dyn Backend>, Arc<AtomicBool>, Arc<AtomicU64>) {
        let down = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let b = Fake {
            byte,
            down: down.clone(),
            calls: calls.clone(),
        };
        (Box::new(b), down, calls)
    }

    #[test]
    fn falls_back_and_cools_down() {
        let (m, m_down, m_calls) = fake(1);
        let (o, o_down, o_calls) = fake(2);
        let b = MirrorBackend::with_cooldown(m, o, Duration::from_millis(200));
        assert_eq!(b.read_range("d", 0, 3).unwrap(), vec![1; 3]);
        m_down.store(true, Ordering::SeqCst);
        assert_eq!(b.read_range("d", 0, 3).unwrap(), vec![2; 3]);
        assert!(matches!(b.state(), MirrorState::CoolingDown { .. }));
        for _ in 0..5 {
            assert_eq!(b.read_range("d", 0, 3).unwrap(), vec![2; 3]);
        }
        assert_eq!(
            m_calls.load(Ordering::SeqCst),
            2,
            "no mirror reads while cooling down"
        );
        assert_eq!(o_calls.load(Ordering::SeqCst), 6);
        // Origin errors come back with the mirror's error attached.
        o_down.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(250));
        let e = b.read_range("d", 0, 3).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Transient);
        assert!(
            e.message.contains("fake 2 down") && e.message.contains("fake 1 down"),
            "{e}"
        );
        o_down.store(false, Ordering::SeqCst);
        m_down.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(b.state(), MirrorState::Up);
        assert_eq!(b.read_range("d", 0, 3).unwrap(), vec![1; 3]);
        assert_eq!(
            b.counters(),
            MirrorCounters {
                mirror_reads: 2,
                origin_reads: 7,
                fallbacks: 2
            }
        );
        assert_eq!(b.describe(), "fake 2 via mirror fake 1");
    }
}
