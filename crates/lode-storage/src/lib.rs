//! Storage: everything between a blob's remote form and the uncompressed layout the kernel
//! reads. Today: reading chunk tables, fetching, decompressing and verifying chunks from a
//! local remote-form blob ([`chunks`]), and materializing whole blobs into the local blob
//! cache ([`cache`]). Backends (HTTP, registry, S3) and fetch scheduling come next.

pub mod backend;
pub mod cache;
pub mod chunks;
