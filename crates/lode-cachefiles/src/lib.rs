//! lode's cachefiles on-demand frontend (`lode mount --mode fscache`).
//!
//! - [`abi`]: the `/dev/cachefiles` on-demand ABI by hand: message structs parsed with
//!   zerocopy by a fuzzable, panic-free [`abi::parse_message`]; `copen` and other commands;
//!   `CACHEFILES_IOC_READ_COMPLETE`.
//! - [`supervisor`]: binds the cache and holds the device descriptor for the cache's whole
//!   life, restarting the worker (with `restore`) when it dies.
//! - [`worker`]: answers OPEN/READ/CLOSE, fetching blob ranges through `lode-storage`.
//! - [`client`]: what `lode mount`/`lode umount` do: find or start the daemon, register the
//!   image, mount EROFS with `fsid=`/`domain_id=`, record the mount.
//! - [`control`]: the daemon's control socket protocol and run directory.
//!
//! One daemon serves every fscache mount of the system (the kernel allows one
//! `/dev/cachefiles` opener); all mounts use the EROFS domain [`control::DOMAIN`], and blob
//! cookies are named by their sha256 digest, so images sharing a blob share its cache file.
//! See docs/ARCHITECTURE.md and shared/spec/cachefiles-ondemand.md.

pub mod abi;
#[cfg(feature = "daemon")]
pub mod client;
#[cfg(feature = "daemon")]
pub mod control;
#[cfg(feature = "daemon")]
pub mod supervisor;
#[cfg(feature = "daemon")]
pub mod sys;
#[cfg(feature = "daemon")]
pub mod worker;

/// Logs to stderr (the daemon's stderr is its log file), filtered by `LODE_LOG`
/// (default `info`).
#[cfg(feature = "daemon")]
pub fn init_logging(role: &'static str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LODE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_thread_names(true)
        .try_init();
    tracing::debug!("{role} logging to stderr");
}
