//! The agent side of lazy images: where image bytes come from, how mounts are run, and the
//! `Agent` the `lazyd` binary (the `lazyd` crate) serves.
//!
//! - `blobstore`: the `BlobStore` trait remote and local blob stores implement.
//! - `registry`: an OCI distribution API client (pulls, pushes, referrers) and
//!   `RegistryBlobStore`, the blob store over one repository.
//! - `s3`: S3 and S3-compatible stores: a `BlobStore` for reads, uploads for `lazyctl push`.
//! - `external`: blobs indexed in place in S3 (`convert --reference`), routed beside an image's
//!   own store.
//! - `store`: the local lazy-image store (`dir:PATH`, an OCI image layout).
//! - `remote`: image locations (dir:, docker://, s3://) and opening images there.
//! - `push`: copying a lazy image to a registry, S3 or another store.
//! - `cache`: the on-disk compressed chunk cache shared by all mounts (segments, LRU, crc checks).
//! - `decoded`: the decoded-chunk LRU, bounded in bytes, that `fetcher` and `local` keep.
//! - `fetcher`: the `ChunkSource` of remote mounts: caches, single-flight, priorities (demand,
//!   read-ahead, background), retries, warm.
//! - `local`: a `ChunkSource` over a local store's blobs, with a decoded-chunk LRU.
//! - `stream`: streams of safetensors files' tensors ahead of their readers, on open.
//! - `profile`: hot-chunk profiles: recording first reads, merging runs, storing them beside
//!   the image.
//! - `mount`: opening an image and running a FUSE mount of it until it is unmounted.
//! - `metrics`: fetch and cache counters, as JSON and Prometheus text.
//! - `config`: lazyd's TOML configuration.
//! - `daemon`: the `Agent` lazyd runs, one file per part of its state: mounts, containers,
//!   warms, profiles, known images and gc, the hand-over.
//! - `handover`: mounts that outlive lazyd: the fd holder (systemd or the supervisor) and the
//!   mount table its successor serves them again from.
//! - `api`, `server`: the control API's messages and its HTTP server on the unix socket.
//! - `client`: an async client of that API (lazyctl's, and a snapshotter's).

pub mod api;
pub mod blobstore;
pub mod cache;
pub mod client;
pub mod config;
pub mod daemon;
mod decoded;
pub mod error;
pub mod external;
pub mod fetcher;
pub mod handover;
pub mod local;
pub mod metrics;
pub mod mirror;
pub mod mount;
pub mod profile;
pub mod push;
pub mod registry;
pub mod remote;
pub mod s3;
pub mod server;
pub mod store;
pub mod stream;
pub mod sync;

/// Creates `dir` and its missing parents and makes it its owner's alone (mode 0700, also when
/// it already existed with another): lazyd's state and cache directories hold what other local
/// users must neither read nor reach, such as chunks of private images and the writable layers
/// of containers (whose setuid files a container's root can make).
///
/// On a read-only file system nothing can be changed: an existing directory is taken as it is,
/// with a warning when others may enter it.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode == 0o700 {
        return Ok(());
    }
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            tracing::warn!(dir = %dir.display(), "on a read-only file system: its mode stays {mode:o}");
            Ok(())
        }
        changed => changed,
    }
}
