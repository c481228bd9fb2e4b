//! lode's on-disk format: EROFS structures ([`format`]), a reader of any uncompressed EROFS
//! image ([`reader`]), the in-memory [`tree`] the builder fills and the bootstrap [`writer`]
//! that lays it out, the image directory [`manifest`], access [`trace`]s and the
//! [`reverse`] map from blob ranges and inodes to paths. No network, no cache policy.

pub mod blob;
pub mod error;
pub mod format;
pub mod manifest;
pub mod reader;
pub mod reverse;
pub mod trace;
pub mod tree;
pub mod writer;

pub use error::{Error, Result};
