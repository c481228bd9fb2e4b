//! lode's on-disk format: EROFS structures ([`format`]), a reader of any uncompressed EROFS
//! image ([`reader`]), the in-memory [`tree`] the builder fills and the bootstrap [`writer`]
//! that lays it out, and the image directory [`manifest`]. No network, no cache policy.

pub mod blob;
pub mod error;
pub mod format;
pub mod manifest;
pub mod reader;
pub mod tree;
pub mod writer;

pub use error::{Error, Result};
