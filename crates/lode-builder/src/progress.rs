//! A progress hook for long builds: [`BuildOptions::progress`](crate::BuildOptions) takes a
//! callback that is handed [`Event`]s; the default does nothing. Events are batched (every few
//! MiB or files), so the hook costs next to nothing on the data path.

use std::fmt;
use std::sync::Arc;

/// Data events are sent once this many bytes or files have gathered.
const BATCH_BYTES: u64 = 4 << 20;
const BATCH_FILES: u64 = 256;
/// Layer-read events are sent once the source has advanced this far.
const READ_STEP: u64 = 1 << 20;

/// What a build reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// A directory build has scanned its source: the regular files and their bytes to read.
    Scanned { files: u64, bytes: u64 },
    /// Layer `index` (0-based, of `count`) starts; `size` is its compressed size when known.
    LayerStart {
        index: usize,
        count: usize,
        name: &'a str,
        size: Option<u64>,
    },
    /// `done` bytes of the current layer's source (compressed) have been read.
    LayerRead { done: u64 },
    /// Every entry of layer `index` has been applied; `done` bytes of its source were read.
    LayerDone { index: usize, done: u64 },
    /// `bytes` more bytes of file data were read and handed to hashing and compression, and
    /// `files` more files finished.
    Data { files: u64, bytes: u64 },
    /// All data is stored; the bootstrap and `image.json` are written now.
    Writing,
}

type Hook = dyn Fn(&Event) + Send + Sync;

/// The callback that receives a build's [`Event`]s (cheap to clone; default: none).
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<Hook>>);

impl Progress {
    pub fn new(hook: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        Progress(Some(Arc::new(hook)))
    }

    #[inline]
    pub fn emit(&self, event: Event) {
        if let Some(hook) = &self.0 {
            hook(&event);
        }
    }

    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(hook)"
        } else {
            "Progress(none)"
        })
    }
}

/// Gathers [`Event::Data`] counts and sends them in batches (the rest when dropped).
pub(crate) struct DataBatch {
    progress: Progress,
    files: u64,
    bytes: u64,
}

impl DataBatch {
    pub(crate) fn new(progress: Progress) -> Self {
        DataBatch {
            progress,
            files: 0,
            bytes: 0,
        }
    }

    #[inline]
    pub(crate) fn add(&mut self, files: u64, bytes: u64) {
        self.files += files;
        self.bytes += bytes;
        if self.bytes >= BATCH_BYTES || self.files >= BATCH_FILES {
            self.flush();
        }
    }

    pub(crate) fn flush(&mut self) {
        if self.files > 0 || self.bytes > 0 {
            self.progress.emit(Event::Data {
                files: self.files,
                bytes: self.bytes,
            });
            self.files = 0;
            self.bytes = 0;
        }
    }
}

impl Drop for DataBatch {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Sends [`Event::LayerRead`] when a layer's source has advanced by a step.
pub(crate) struct ReadTicker {
    sent: u64,
}

impl ReadTicker {
    pub(crate) fn new() -> Self {
        ReadTicker { sent: 0 }
    }

    #[inline]
    pub(crate) fn tick(&mut self, progress: &Progress, done: u64) {
        if done >= self.sent + READ_STEP {
            self.sent = done;
            progress.emit(Event::LayerRead { done });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn batches_and_flushes() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let p = Progress::new(move |e| {
            if let Event::Data { files, bytes } = e {
                s.lock().unwrap().push((*files, *bytes));
            }
        });
        {
            let mut b = DataBatch::new(p.clone());
            for _ in 0..10 {
                b.add(1, 1 << 20);
            }
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen.iter().map(|s| s.1).sum::<u64>(), 10 << 20);
        assert_eq!(seen.iter().map(|s| s.0).sum::<u64>(), 10);
        // The default hook is free and silent.
        Progress::default().emit(Event::Writing);
    }
}
