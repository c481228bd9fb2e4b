//! A progress hook for blob transfers: [`push_image_with`](crate::image::push_image_with) and
//! [`pull_image_with`](crate::image::pull_image_with) hand [`Transfer`] events to a callback.
//! Byte counts are batched (about every MiB), so the hook costs next to nothing per read.

use std::io::{self, Read};
use std::sync::Arc;

/// Byte events are sent once a blob has advanced this far.
const STEP: u64 = 1 << 20;

/// What a push or pull reports while it moves blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transfer<'a> {
    /// Up to `blobs` blobs of `bytes` bytes in all will be moved (some may be found already
    /// in place).
    Begin { blobs: usize, bytes: u64 },
    /// A blob's transfer starts (again after a retry: `done` then counts from 0 again).
    Start { digest: &'a str, size: u64 },
    /// `done` bytes of the blob have been moved.
    Bytes { digest: &'a str, done: u64 },
    /// The blob is in place: moved (`moved`), or found there already.
    Done {
        digest: &'a str,
        size: u64,
        moved: bool,
    },
}

/// The callback that receives [`Transfer`] events.
pub type ProgressFn = Arc<dyn Fn(&Transfer) + Send + Sync>;

/// A callback that ignores every event.
pub fn no_progress() -> ProgressFn {
    Arc::new(|_| {})
}

/// A reader that reports how many bytes of blob `digest` went through it.
pub(crate) struct Counted<R> {
    inner: R,
    digest: String,
    progress: ProgressFn,
    done: u64,
    sent: u64,
}

impl<R> Counted<R> {
    pub(crate) fn new(inner: R, digest: &str, progress: ProgressFn) -> Self {
        Counted {
            inner,
            digest: digest.to_string(),
            progress,
            done: 0,
            sent: 0,
        }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done >= self.sent + STEP || (n == 0 && self.done > self.sent) {
            self.sent = self.done;
            (self.progress)(&Transfer::Bytes {
                digest: &self.digest,
                done: self.done,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn counts_in_steps() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let data = vec![7u8; (5 << 20) / 2];
        let mut r = Counted::new(
            &data[..],
            "sha256:x",
            Arc::new(move |t: &Transfer| {
                if let Transfer::Bytes { done, .. } = t {
                    s.lock().unwrap().push(*done);
                }
            }),
        );
        io::copy(&mut r, &mut io::sink()).unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 3 && seen.len() <= 4, "{seen:?}");
        assert_eq!(*seen.last().unwrap(), data.len() as u64);
    }
}
