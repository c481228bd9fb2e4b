//! lode-registry: an OCI distribution client, and the mapping between lode image
//! directories and registry artifacts.
//!
//! - [`Reference`]: `[host[:port]/]repo/name[:tag][@sha256:...]` with Docker's defaults.
//! - [`RegistryClient`]: manifests, blobs (streamed and verified, HTTP ranges with the
//!   storage redirect cached, uploads from files, cross-repo mounts), anonymous / Basic /
//!   Bearer-token auth with credentials from docker/podman auth files, retries with backoff.
//!   Blocking, `Send + Sync`.
//! - [`image`]: `push_image` / `pull_image` of a lode image directory, `pull_layers` of an
//!   ordinary image for `lode convert`.
//! - [`progress`]: the [`Transfer`] events a push or pull reports to its callback.
//! - `testing` (feature `testing`): a real `docker-registry` on loopback for tests.

pub mod auth;
pub mod client;
pub mod error;
pub mod image;
pub mod media;
pub mod progress;
pub mod reference;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::Credentials;
pub use client::{BlobReader, ClientOptions, FetchedManifest, RegistryClient};
pub use error::{Error, RegistryError, RegistryErrors, Result};
pub use image::{
    pull_image, pull_image_with, pull_layers, push_image, push_image_with, resolve_image,
    LayerDescriptor, PullSummary, PushSummary, RemoteImage, SourceImage,
};
pub use media::{resolve_platform, IndexEntry, Platform};
pub use progress::{ProgressFn, Transfer};
pub use reference::{validate_digest, Reference};
