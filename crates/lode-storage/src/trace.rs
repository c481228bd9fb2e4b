//! Recording an access trace while a mount serves (`lode mount --record-trace FILE`): which
//! files, and which byte ranges of them, were read, in the order of first access. The file
//! is in the format of [`lode_format::trace`] (what `lode build --prefetch` reads), ranges
//! merged per file, a file read from start to end as its path alone.
//!
//! The recorder keeps the trace in memory and rewrites the file (temp file + rename, so it
//! is never half written) at most every [`FLUSH_INTERVAL`] while it changes, on
//! [`TraceRecorder::flush`], and on SIGTERM (see [`TraceRecorder::exit_on_sigterm`]): a
//! crash loses at most the last interval. A worker that replaces a dead one resumes the
//! trace its predecessor wrote ([`TraceRecorder::resume`]); the mount starts it empty
//! ([`start`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lode_format::trace;

/// Longest time a recorded access stays only in memory.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Creates (or empties) the trace file at `path`: done once per mount, before its first
/// worker resumes it. The error names the file.
pub fn start(path: &Path) -> Result<()> {
    std::fs::write(path, b"").with_context(|| format!("creating the trace file {}", path.display()))
}

#[derive(Debug, Default)]
struct Entry {
    path: Vec<u8>,
    /// Read from start to end (or given as a whole-file line when resumed).
    whole: bool,
    /// Merged, sorted `[start, end)` ranges.
    ranges: Vec<(u64, u64)>,
}

impl Entry {
    /// Adds `[start, end)`; false if it was covered already.
    fn add(&mut self, start: u64, end: u64) -> bool {
        if self.whole {
            return false;
        }
        let i = self.ranges.partition_point(|r| r.1 < start);
        if self
            .ranges
            .get(i)
            .is_some_and(|r| r.0 <= start && end <= r.1)
        {
            return false;
        }
        // Merge every range touching [start, end).
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < self.ranges.len() && self.ranges[j].0 <= end {
            s = s.min(self.ranges[j].0);
            e = e.max(self.ranges[j].1);
            j += 1;
        }
        self.ranges.splice(i..j, [(s, e)]);
        true
    }
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    by_path: HashMap<Vec<u8>, usize>,
    dirty: bool,
}

/// The trace of one mount, recorded by its worker.
#[derive(Debug)]
pub struct TraceRecorder {
    path: PathBuf,
    state: Mutex<State>,
    /// Serializes writers of the file (the flusher thread and explicit flushes).
    write: Mutex<()>,
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_sig: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

impl TraceRecorder {
    /// Continues the trace at `path` (what an earlier worker of this mount wrote, or nothing
    /// if the file is missing or empty) and starts flushing it in the background.
    pub fn resume(path: &Path) -> Result<Arc<TraceRecorder>> {
        let mut state = State::default();
        match std::fs::read(path) {
            Ok(text) => {
                for (n, line) in text.split(|&b| b == b'\n').enumerate() {
                    // A line this recorder did not write is kept if it parses, else skipped.
                    let Ok(Some((p, range))) = trace::parse_line(line) else {
                        if !line.is_empty() && !line.starts_with(b"#") {
                            tracing::warn!(
                                "{}:{}: not a trace line; dropped",
                                path.display(),
                                n + 1
                            );
                        }
                        continue;
                    };
                    let i = entry_index(&mut state, p);
                    match range {
                        None => state.entries[i].whole = true,
                        Some((off, len)) => {
                            state.entries[i].add(off, off.saturating_add(len));
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let rec = Arc::new(TraceRecorder {
            path: path.to_path_buf(),
            state: Mutex::new(state),
            write: Mutex::new(()),
        });
        // Fail now, not in the background, if the file cannot be written.
        rec.flush()?;
        let weak = Arc::downgrade(&rec);
        std::thread::Builder::new()
            .name("lode-trace".into())
            .spawn(move || flush_loop(weak))
            .context("starting the trace flusher")?;
        Ok(rec)
    }

    /// Records that bytes `offset..offset+len` of the file at `path` (absolute in the image,
    /// `size` bytes long) were read. Cheap when the range was recorded already.
    pub fn record(&self, path: &[u8], size: u64, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return;
        }
        let mut st = self.state.lock().expect("trace lock");
        let i = entry_index(&mut st, path);
        let e = &mut st.entries[i];
        if e.add(offset, end) {
            if e.ranges == [(0, size)] {
                e.whole = true;
            }
            st.dirty = true;
        }
    }

    /// Writes the trace file now (if anything changed since the last write).
    pub fn flush(&self) -> Result<()> {
        let _w = self.write.lock().expect("trace write lock");
        let text = {
            let mut st = self.state.lock().expect("trace lock");
            if !st.dirty && self.path.exists() {
                return Ok(());
            }
            st.dirty = false;
            let mut out =
                b"# lode access trace: PATH or PATH OFFSET LEN, in first-access order\n".to_vec();
            for e in &st.entries {
                let ranges: Vec<(u64, u64)> =
                    e.ranges.iter().map(|&(s, end)| (s, end - s)).collect();
                if !trace::write_entry(&mut out, &e.path, e.whole, &ranges) {
                    tracing::debug!(path = %String::from_utf8_lossy(&e.path), "path cannot be written to a trace");
                }
            }
            out
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let r = std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .with_context(|| format!("writing the trace file {}", self.path.display()));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
            self.state.lock().expect("trace lock").dirty = true;
        }
        r
    }

    /// Makes SIGTERM write the trace and then exit the process (status 143, as if killed by
    /// the signal): a worker being stopped leaves a complete trace. Call once per process.
    pub fn exit_on_sigterm(&self) {
        // SAFETY: `on_term` is async-signal-safe (one atomic store); the struct is zeroed,
        // then handler and an empty mask set.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_term as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        }
    }

    /// Files recorded so far.
    pub fn files(&self) -> usize {
        self.state.lock().expect("trace lock").entries.len()
    }
}

fn entry_index(st: &mut State, path: &[u8]) -> usize {
    if let Some(&i) = st.by_path.get(path) {
        return i;
    }
    st.entries.push(Entry {
        path: path.to_vec(),
        ..Default::default()
    });
    st.by_path.insert(path.to_vec(), st.entries.len() - 1);
    st.entries.len() - 1
}

fn flush_loop(rec: std::sync::Weak<TraceRecorder>) {
    let tick = Duration::from_millis(20);
    let mut last = Instant::now();
    loop {
        std::thread::sleep(tick);
        let Some(rec) = rec.upgrade() else { return };
        let term = TERM.load(Ordering::SeqCst);
        if term || last.elapsed() >= FLUSH_INTERVAL {
            if let Err(e) = rec.flush() {
                tracing::warn!("{e:#}");
            }
            last = Instant::now();
        }
        if term {
            tracing::info!("SIGTERM: trace written; exiting");
            std::process::exit(128 + libc::SIGTERM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_per_file_in_first_access_order_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        start(&path).unwrap();
        let rec = TraceRecorder::resume(&path).unwrap();
        rec.record(b"/b", 10000, 4096, 4096);
        rec.record(b"/a", 100, 0, 4096); // clamped to the file: whole
        rec.record(b"/b", 10000, 0, 4096);
        rec.record(b"/b", 10000, 8192 + 100, 50);
        rec.record(b"/b", 10000, 5000, 10); // covered
        rec.record(b"/c", 10, 10, 5); // past the end: nothing
        rec.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, ["/b 0 8192", "/b 8292 50", "/a"]);
        drop(rec);
        // A successor continues it.
        let rec = TraceRecorder::resume(&path).unwrap();
        rec.record(b"/b", 10000, 8192, 1808);
        rec.record(b"/d", 5, 0, 5);
        rec.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, ["/b", "/a", "/d"]);
    }
}
