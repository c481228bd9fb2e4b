//! The error type of the EROFS reader.
//!
//! Every message names what was being read (which nid, which field, which offset), so a
//! corrupt image can be diagnosed from the error alone.

use std::io;

/// Errors returned by [`crate::reader::Image`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image contradicts the on-disk format.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image is valid but uses something this reader does not implement
    /// (compressed data, an unknown incompatible feature, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A path component does not exist.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// A path component that must be a directory is not one.
    #[error("{0}: not a directory")]
    NotADirectory(String),
    /// A read from a backing file failed (including reads past its end).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Data lives on an extra device that was not provided and cannot be found in the
    /// primary image (flat mode needs a non-zero `mapped_blkaddr`).
    #[error("extra device slot {index} (device_id {}, tag {tag:?}) is not available", index + 1)]
    MissingDevice { index: usize, tag: String },
    /// A caller asked for a file offset at or beyond the file size.
    #[error("offset {offset} is beyond the end of nid {nid} (size {size})")]
    OutOfRange { nid: u64, offset: u64, size: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
