//! One module per subcommand; each exposes `Args` (clap) and `run(Args)`.

pub mod build;
pub mod cache;
pub mod cat;
pub mod convert;
pub mod daemon;
pub mod fanotify;
pub mod fscache_daemon;
pub mod inspect;
pub mod ls;
pub mod mount;
pub mod registry;
pub mod unpack;
