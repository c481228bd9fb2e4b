//! Acting on running mounts through their supervisors' worker-restart paths.
//!
//! Every lazy mode keeps the kernel side (fanotify group + marks, `/dev/fuse`,
//! `/dev/cachefiles`) in a supervisor and serves requests in a worker it restarts when it
//! exits; requests in flight are settled by the successor (fanotify journal, FUSE
//! `NOTIFY_RESEND`, cachefiles `restore`). Upgrading is therefore: put the new binary in place,
//! then replace each worker — the supervisors start workers from the binary's path, so the
//! successors run the new code while the mounts stay up.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lode_mount::runtime::{self, MountRecord};
use serde_json::json;

fn signal(pid: u32, sig: rustix::process::Signal) -> Result<()> {
    let p = rustix::process::Pid::from_raw(pid as i32).context("no process id")?;
    rustix::process::kill_process(p, sig).with_context(|| format!("signalling pid {pid}"))
}

fn fanotify_worker(rec: &MountRecord) -> Result<u32> {
    let path = lode_fanotify::side_path(&rec.mountpoint, "stats");
    let s = lode_fanotify::stats::Stats::load(&path)?;
    if s.worker_pid == 0 {
        bail!(
            "no fanotify worker is running for {}",
            rec.mountpoint.display()
        );
    }
    Ok(s.worker_pid)
}

/// Starts fetching the whole image of a fanotify mount in the background (`rate` bytes/s,
/// 0: no limit): the spec the worker reads at start is updated and the worker replaced.
pub fn prefetch_all(rec: &MountRecord, rate: u64) -> Result<()> {
    if let Some(why) = prefetch_unsupported(rec) {
        bail!("{why}");
    }
    let spec_path = lode_fanotify::side_path(&rec.mountpoint, "spec");
    let mut spec = lode_fanotify::Spec::load(&spec_path)?;
    spec.prefetch_all = true;
    spec.prefetch_rate = rate;
    spec.save(&spec_path)?;
    signal(fanotify_worker(rec)?, rustix::process::Signal::TERM)
}

/// Why `rec` cannot prefetch on demand, if it cannot (only fanotify workers re-read their
/// spec when replaced).
pub fn prefetch_unsupported(rec: &MountRecord) -> Option<String> {
    (rec.mode != "fanotify").then(|| {
        format!(
            "prefetch on demand is supported for fanotify mounts; {} is a {} mount (mount it with --prefetch-all instead)",
            rec.mountpoint.display(),
            rec.mode
        )
    })
}

/// Replaces the worker of every mount (see the module docs); the answer lists what was done
/// per mount.
pub fn upgrade_workers() -> serde_json::Value {
    let mut out = Vec::new();
    let mut fscache_done = false;
    for rec in runtime::list() {
        let r: Result<String> = match rec.mode.as_str() {
            "fanotify" => fanotify_worker(&rec).and_then(|pid| {
                signal(pid, rustix::process::Signal::TERM)?;
                Ok(format!("worker {pid} replaced"))
            }),
            // The FUSE supervisor replaces its worker on SIGHUP.
            "fuse" => signal(rec.pid, rustix::process::Signal::HUP)
                .map(|_| format!("supervisor {} asked to replace its worker", rec.pid)),
            // One worker serves every fscache mount; it is replaced once, with `restore`.
            "fscache" if fscache_done => Ok("shared worker already replaced".into()),
            "fscache" => {
                fscache_done = true;
                let run = lode_cachefiles::control::RunDir::from_env();
                std::fs::read_to_string(run.worker_pid())
                    .with_context(|| format!("reading {}", run.worker_pid().display()))
                    .and_then(|s| s.trim().parse::<u32>().context("bad worker pid file"))
                    .and_then(|pid| {
                        signal(pid, rustix::process::Signal::KILL)?;
                        Ok(format!("shared worker {pid} replaced (restore)"))
                    })
            }
            _ => Ok("nothing to replace (no server process)".into()),
        };
        out.push(json!({
            "mountpoint": rec.mountpoint,
            "mode": rec.mode,
            "result": r.as_ref().ok(),
            "error": r.as_ref().err().map(|e| format!("{e:#}")),
        }));
    }
    json!({ "mounts": out, "binary": std::env::current_exe().unwrap_or_else(|_| PathBuf::from("?")) })
}
