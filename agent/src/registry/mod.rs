//! Client for the OCI distribution API: image references, manifests, whole blobs and byte ranges,
//! pushes, and referrers.
//!
//! The converter uses it to pull `docker://HOST/REPO:TAG` images and to push lazy images back
//! (`push.rs`: blobs and manifests; `referrers.rs`: recording and finding which lazy image was
//! made from which source manifest), and the lazy fetcher reads slices of blobs on demand
//! through [`RegistryBlobStore`] (`blob_store.rs`, over [`RegistryClient::get_blob_range`]).
//! It behaves the way docker and containerd do, so that a registry that works with them works
//! here:
//!
//! - **Auth.** Requests go out anonymously first. On a 401 the `WWW-Authenticate` challenge is
//!   parsed; for `Bearer` a token is fetched from the realm (with basic credentials when some are
//!   configured), cached per scope (`repository:REPO:pull`, or `repository:REPO:pull,push` for
//!   pushes) until shortly before it expires, and the request is retried once, upload body
//!   included. Once a registry has asked for a token, later requests for other scopes fetch one up
//!   front instead of taking a 401 first. A 401 on a request that carried a token (expired early,
//!   revoked) drops that token and fetches a new one. `Basic` challenges are answered with the
//!   configured credentials. Credentials and tokens only ever go to the registry's own origin.
//! - **Plain HTTP only for loopback.** Like docker's treatment of `localhost` registries, a client
//!   for `localhost`, `127.0.0.0/8` or `[::1]` tries https first and, if the connection or TLS
//!   handshake fails, falls back to http and remembers that choice. Every other host is https
//!   only, unless the caller says otherwise ([`PlainHttp`]: lazyd's `fetch.insecure_registries`,
//!   a mirror's `http://` URL).
//! - **Redirects** (a blob GET answered with 307 to an S3-like store) are followed with every
//!   header but `Authorization`, which is dropped whenever the redirect leaves the registry's
//!   origin (reqwest's policy does this; tests hold it to that). Signed query strings are cut from
//!   the URLs in errors.
//! - **Timeouts.** Downloads fail when the server goes quiet for `read_timeout`. Uploads cannot
//!   use reqwest's read timeout, which runs from the start of the request and would cut off any
//!   upload that takes longer; an upload fails instead when its body stops moving for
//!   `read_timeout` ([`RegistryError::Stalled`]).
//! - **Everything the server says is checked**: manifests and blobs against their sha256 digest,
//!   ranges against the requested length, bodies against size caps. Nothing here panics on a bad
//!   header or bad JSON; such input becomes a [`RegistryError`], and
//!   [`RegistryError::is_permanent`] tells the caller whether a retry can help.
//!
//! Only sha256 digests are supported, which is what every registry in use produces.
//!
//! # Layout
//!
//! Each file owns one thing, and uses only the ones listed before it:
//!
//! - `error.rs`: [`RegistryError`] and what its variants carry ([`ContentKind`], and
//!   [`Reference`], which is here so that the errors need nothing above them), [`error_chain`],
//!   turning a reqwest error into one without a signed URL in it, and reading a registry's JSON
//!   error body.
//! - `reference.rs`: [`ImageRef`] and the grammar of repositories, tags, digests and registry
//!   hosts, Docker Hub's aliases, and which hosts are loopback.
//! - `auth.rs`: `WWW-Authenticate` challenges, token replies and the token cache, and
//!   [`Credentials`], with the ones `docker login` stored ([`docker_config_credentials`]).
//! - `upload.rs`: request bodies for uploads, streamed from bytes or a file, and the watchdog
//!   that fails an upload whose body stops moving.
//! - `client.rs`: [`RegistryClient`] and its options, the request plumbing (scheme choice, auth
//!   round trips, redirects, timeouts, upload bodies) and the pulls: manifests, blobs and ranges.
//! - `push.rs` and `referrers.rs` add pushes and referrers to [`RegistryClient`] over
//!   `client.rs`'s plumbing; `blob_store.rs` is [`RegistryBlobStore`], the client as a
//!   [`crate::blobstore::BlobStore`].
//! - `fuzzing.rs` exposes the parsers above to the fuzz targets in `fuzz/`.
//!
//! This file holds only the media types, which several of them use, and the re-exports that
//! make up the module's public paths (`agent::registry::X`).

mod auth;
mod blob_store;
mod client;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod push;
mod reference;
mod referrers;
#[cfg(test)]
mod test_support;
mod upload;

pub use auth::{docker_config_credentials, Credentials};
pub use blob_store::RegistryBlobStore;
pub(crate) use client::parse_content_range;
pub use client::{ClientOptions, Manifest, PlainHttp, RegistryClient};
pub use error::{ContentKind, Reference, RegistryError};
pub use push::{PushedBlob, PushedManifest};
pub use reference::ImageRef;
pub use referrers::{referrers_tag, Referrer};

/// Media type of an OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of a Docker manifest list (the Docker equivalent of an OCI index).
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a Docker image manifest, schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
