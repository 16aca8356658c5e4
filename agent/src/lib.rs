//! The agent side of lazy images: where image bytes come from and how mounts are run.
//!
//! - `blobstore`: the `BlobStore` trait remote and local blob stores implement.
//! - `store`: the local lazy-image store (`dir:PATH`, an OCI image layout).
//! - `local`: a `ChunkSource` over a local store's blobs, with a decoded-chunk LRU.
//! - `registry`: an OCI distribution API client (pulls, pushes, referrers) and
//!   `RegistryBlobStore`, the blob store over one repository.
//! - `mount`: opening an image and running a FUSE mount of it until it is unmounted.

pub mod blobstore;
pub mod local;
pub mod mount;
pub mod registry;
pub mod store;
