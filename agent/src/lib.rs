//! The agent side of lazy images: where image bytes come from and how mounts are run.
//!
//! - `blobstore`: the `BlobStore` trait remote and local blob stores implement.
//! - `fetcher`: the `ChunkSource` of remote mounts: caches, single-flight, priorities, retries.
//! - `metrics`: fetch and cache counters, as JSON and Prometheus text.
//! - `remote`: image locations (dir:, docker://, s3://) and opening images there.
//! - `push`: copying a lazy image to a registry, S3 or another store.
//! - `fetcher`: the `ChunkSource` of remote mounts: caches, single-flight, priorities, retries.
//! - `metrics`: fetch and cache counters, as JSON and Prometheus text.
//! - `remote`: image locations (dir:, docker://, s3://) and opening images there.
//! - `push`: copying a lazy image to a registry, S3 or another store.
//! - `store`: the local lazy-image store (`dir:PATH`, an OCI image layout).
//! - `cache`: the on-disk compressed chunk cache shared by all mounts (segments, LRU, crc checks).
//! - `local`: a `ChunkSource` over a local store's blobs, with a decoded-chunk LRU.
//! - `registry`: an OCI distribution API client (pulls, pushes, referrers) and
//!   `RegistryBlobStore`, the blob store over one repository.
//! - `s3`: S3 and S3-compatible stores: a `BlobStore` for reads, uploads for `lazyctl push`.
//! - `mount`: opening an image and running a FUSE mount of it until it is unmounted.

pub mod blobstore;
pub mod cache;
pub mod fetcher;
pub mod local;
pub mod metrics;
pub mod mount;
pub mod push;
pub mod registry;
pub mod remote;
pub mod s3;
pub mod store;
