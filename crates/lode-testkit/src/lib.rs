//! Helpers shared by lode's tests. Not part of any shipped binary.
//!
//! - [`tree`]: a plain-data description of a directory tree ([`tree::TreeSpec`]), a proptest
//!   strategy generating nasty random trees, and [`tree::materialize`] to write one to disk.
//! - [`compare`]: [`compare::compare_trees`] / [`compare::assert_same_tree`], a metadata- and
//!   content-exact comparison of two directory trees (lstat semantics, raw byte names).
//! - [`mount`]: RAII unmounting ([`mount::MountGuard`], [`mount::TempMount`]) and
//!   environment checks ([`mount::require_root`], [`mount::require_erofs`], …).
//! - [`cmd`]: run a process and panic with its full command line and output if it fails.
//! - [`faultproxy`]: an HTTP/1.1 proxy on loopback that injects faults (error statuses,
//!   resets, truncated or bit-flipped bodies, latency, refused connections).
//!
//! Most of this needs root (chown, mknod, `trusted.*` xattrs, mounts).

pub mod cmd;
pub mod compare;
pub mod faultproxy;
pub mod mount;
pub mod oci;
pub mod procs;
pub mod tree;

pub use compare::{
    assert_same_tree, assert_same_tree_with, compare_trees, CompareOptions, Difference,
};
pub use mount::{require_erofs, require_root, MountGuard, TempMount};
pub use tree::{materialize, tree_strategy, TreeParams, TreeSpec};

#[cfg(test)]
mod tests;
