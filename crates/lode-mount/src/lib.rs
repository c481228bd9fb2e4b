//! Kernel EROFS mounts of lode images.
//!
//! [`kernel`] mounts a bootstrap file-backed with its blobs as `device=` through the new mount
//! API (fsopen/fsconfig/fsmount), which has no one-page limit on the option string and hands
//! back the kernel's own error message. [`local`] is the daemon-less mode: every blob is a
//! complete local file.

pub mod kernel;
pub mod local;
pub mod runtime;
