//! Storage: everything between a blob's remote form and the uncompressed layout the kernel
//! reads.
//!
//! - [`backend`]: where remote bytes come from (local dir, HTTP, registry, S3, mirror).
//! - [`chunks`]: chunk tables; decompressing and verifying chunks.
//! - [`cache`]: the crash-safe local cache (sparse uncompressed layout + chunk state).
//! - [`fetch`]: per-blob fetch scheduling (single flight, merging, readahead, prefetch).
//! - [`image`]: opening an image (dir, URL, registry) for lazy serving.
//! - [`trace`]: recording an access trace while a mount serves.

pub mod backend;
pub mod cache;
pub mod chunks;
pub mod fetch;
pub mod image;
pub mod trace;
