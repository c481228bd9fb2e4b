//! Progress bars on stderr for the long commands (`build`, `convert`, `push`, `pull`), drawn
//! with indicatif from the progress hooks of lode-builder and lode-registry.
//!
//! Bars are shown only when stderr is a terminal, `--quiet` is not given, `LODE_PROGRESS` is
//! not `0` and `TERM` is not `dumb`; otherwise the hooks are the libraries' no-ops and
//! nothing but the usual summary lines is printed. Bars are cleared when their work ends, so
//! the summary on stdout reads the same with and without them.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use lode_builder::progress::{Event, Progress};
use lode_registry::{ProgressFn, Transfer};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress bars (errors and summaries are still printed).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether progress bars are drawn (see the module documentation).
pub fn enabled() -> bool {
    let off = |v: &str| matches!(v.trim(), "0" | "false" | "no" | "off" | "never");
    !QUIET.load(Ordering::Relaxed)
        && !std::env::var("LODE_PROGRESS").is_ok_and(|v| off(&v))
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
        && std::io::stderr().is_terminal()
}

/// `sha256:0123456789ab` for a digest, the name itself for anything else.
fn short(name: &str) -> String {
    match name.strip_prefix("sha256:") {
        Some(hex) => format!("sha256:{}", &hex[..hex.len().min(12)]),
        None => name.to_string(),
    }
}

/// A bar of bytes; the message is cut to the terminal's width (one line, never wrapped).
fn bytes_bar(prefix: String, len: Option<u64>) -> ProgressBar {
    let (bar, template) = match len {
        Some(len) => (
            ProgressBar::new(len),
            "{prefix:>10.bold} [{bar:20}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} {wide_msg}",
        ),
        None => (
            ProgressBar::no_length(),
            "{prefix:>10.bold} {spinner} {bytes} {binary_bytes_per_sec} {wide_msg}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ");
    bar.with_style(style).with_prefix(prefix)
}

fn spinner(prefix: &str, msg: &str) -> ProgressBar {
    let style = ProgressStyle::with_template("{prefix:>10.bold} {spinner} {wide_msg}")
        .expect("valid template");
    let bar = ProgressBar::new_spinner()
        .with_style(style)
        .with_prefix(prefix.to_string())
        .with_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

#[derive(Default)]
struct State {
    bar: Option<ProgressBar>,
    /// Builds: the current layer's short name (`None`: a directory build).
    layer: Option<String>,
    files_done: u64,
    files_total: u64,
    data_bytes: u64,
    /// Transfers: blobs finished / announced, bytes of finished blobs.
    blobs_done: usize,
    blobs_total: usize,
    base: u64,
    verb: &'static str,
}

impl State {
    /// Shows `bar` in place of the current one.
    fn show(&mut self, bar: ProgressBar) {
        if let Some(old) = self.bar.replace(bar) {
            old.finish_and_clear();
        }
    }

    fn clear(&mut self) {
        if let Some(old) = self.bar.take() {
            old.finish_and_clear();
        }
    }

    fn build_event(&mut self, e: &Event) {
        match *e {
            Event::Scanned { files, bytes } => {
                self.layer = None;
                self.files_total = files;
                self.files_done = 0;
                self.show(bytes_bar("building".into(), Some(bytes)));
                self.build_message();
            }
            Event::LayerStart {
                index,
                count,
                name,
                size,
            } => {
                self.layer = Some(short(name));
                self.files_done = 0;
                self.data_bytes = 0;
                self.show(bytes_bar(format!("layer {}/{count}", index + 1), size));
                self.build_message();
            }
            Event::LayerRead { done } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done);
                }
            }
            Event::LayerDone { .. } => self.clear(),
            Event::Data { files, bytes } => {
                self.files_done += files;
                self.data_bytes += bytes;
                if self.layer.is_none() {
                    if let Some(bar) = &self.bar {
                        bar.inc(bytes);
                    }
                }
                self.build_message();
            }
            Event::Writing => self.show(spinner("writing", "bootstrap and image.json")),
        }
    }

    fn build_message(&self) {
        let Some(bar) = &self.bar else { return };
        match &self.layer {
            Some(name) => bar.set_message(format!(
                "{name}: {} files, {:.1} MB unpacked",
                self.files_done,
                self.data_bytes as f64 / 1e6
            )),
            None => bar.set_message(format!("{}/{} files", self.files_done, self.files_total)),
        }
    }

    fn transfer_event(&mut self, t: &Transfer) {
        match *t {
            Transfer::Begin { blobs, bytes } => {
                self.blobs_total = blobs;
                self.blobs_done = 0;
                self.base = 0;
                self.show(bytes_bar(self.verb.to_string(), Some(bytes)));
                self.transfer_message(None);
            }
            Transfer::Start { digest, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(self.base);
                }
                self.transfer_message(Some(digest));
            }
            Transfer::Bytes { done, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(self.base + done);
                }
            }
            Transfer::Done { size, moved, .. } => {
                self.blobs_done += 1;
                if let Some(bar) = &self.bar {
                    if moved {
                        self.base += size;
                        bar.set_position(self.base);
                    } else {
                        // Already in place: not part of the bytes to move after all.
                        let len = bar.length().unwrap_or(0);
                        bar.set_length(len.saturating_sub(size));
                    }
                }
                self.transfer_message(None);
            }
        }
    }

    fn transfer_message(&self, current: Option<&str>) {
        let Some(bar) = &self.bar else { return };
        let blobs = format!("{}/{} blobs", self.blobs_done, self.blobs_total);
        match current {
            Some(d) => bar.set_message(format!("{blobs}, {}", short(d))),
            None => bar.set_message(blobs),
        }
    }
}

/// The progress display of one command: hands out hooks for the libraries, and clears its
/// bar when dropped (also on errors, before `main` prints the error line).
pub struct Reporter {
    state: Option<Arc<Mutex<State>>>,
}

impl Reporter {
    /// A reporter that draws if [`enabled`], else does nothing at all.
    pub fn new() -> Reporter {
        Reporter {
            state: enabled().then(|| Arc::new(Mutex::new(State::default()))),
        }
    }

    fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
        state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hook for [`lode_builder::BuildOptions::progress`].
    pub fn build(&self) -> Progress {
        match &self.state {
            Some(state) => {
                let state = state.clone();
                Progress::new(move |e| Self::lock(&state).build_event(e))
            }
            None => Progress::default(),
        }
    }

    /// The hook for `lode_registry::{push,pull}_image_with`; `verb` names the bar.
    pub fn transfer(&self, verb: &'static str) -> ProgressFn {
        match &self.state {
            Some(state) => {
                Self::lock(state).verb = verb;
                let state = state.clone();
                Arc::new(move |t| Self::lock(&state).transfer_event(t))
            }
            None => lode_registry::progress::no_progress(),
        }
    }

    /// Shows a spinner for a step of unknown length (until the next bar or [`clear`]).
    ///
    /// [`clear`]: Reporter::clear
    pub fn step(&self, prefix: &str, msg: &str) {
        if let Some(state) = &self.state {
            Self::lock(state).show(spinner(prefix, msg));
        }
    }

    /// Removes the bar (call before printing the summary).
    pub fn clear(&self) {
        if let Some(state) = &self.state {
            Self::lock(state).clear();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(
            short("sha256:0123456789abcdef0123"),
            "sha256:0123456789ab".to_string()
        );
        assert_eq!(short("stream 1"), "stream 1");
    }

    #[test]
    fn hidden_bars_take_every_event() {
        // Bars that draw nowhere still follow the events (no panics, sane positions).
        let mut s = State {
            verb: "pushing",
            ..Default::default()
        };
        s.transfer_event(&Transfer::Begin {
            blobs: 2,
            bytes: 300,
        });
        s.bar
            .as_ref()
            .unwrap()
            .set_draw_target(indicatif::ProgressDrawTarget::hidden());
        s.transfer_event(&Transfer::Start {
            digest: "sha256:aa",
            size: 100,
        });
        s.transfer_event(&Transfer::Bytes {
            digest: "sha256:aa",
            done: 100,
        });
        s.transfer_event(&Transfer::Done {
            digest: "sha256:aa",
            size: 100,
            moved: true,
        });
        s.transfer_event(&Transfer::Done {
            digest: "sha256:bb",
            size: 200,
            moved: false,
        });
        let bar = s.bar.as_ref().unwrap();
        assert_eq!((bar.position(), bar.length()), (100, Some(100)));
        s.build_event(&Event::Scanned {
            files: 3,
            bytes: 10,
        });
        s.build_event(&Event::Data {
            files: 3,
            bytes: 10,
        });
        assert_eq!(s.files_done, 3);
        s.build_event(&Event::Writing);
        s.clear();
        assert!(s.bar.is_none());
    }
}
