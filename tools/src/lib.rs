//! `lazyctl`'s library: converting images and directories to the lazy format.
//!
//! - `reference`: source and store references (skopeo-style transports).
//! - `image`: what a source resolves to (config and layer blobs on disk), the platform picked
//!   from a multi-platform image, typed OCI manifests; shared by `source` and `pull`.
//! - `source`, `pull`: resolving a source to a config and layer blobs on disk (`source`
//!   dispatches, `pull` downloads from registries).
//! - `layer`: decompressing and applying one layer's tar stream.
//! - `dirsource`: reading a plain directory.
//! - `s3source`: the objects under an S3 prefix as plain files, packed or indexed in place.
//! - `compression`: `--compression auto|zstd|none`: which chunks are stored raw.
//! - `tree`: the merged tree with whiteouts and hardlinks.
//! - `packer`: chunking, parallel compression and blob writing.
//! - `layout`: which data an access profile says to write first.
//! - `convert`: the whole conversion.
//! - `remote`: converting to and pushing to registries and S3; the remote mount's cache.
//! - `progress`: the terminal progress bar.
//! - `client`: the client of lazyd's control API (unix socket).
//! - `ctl`: the `lazyctl` commands that drive lazyd (mount, umount, status, warm, gc, profile).
//! - `spec`: the OCI runtime spec of a container, from the image's config and `run`'s flags.
//! - `seccomp`: the containers' seccomp filter, from docker's default profile.
//! - `run`: `lazyctl run`: a rootfs from lazyd, a bundle, the OCI runtime, cleanup.

pub mod client;
pub mod compression;
pub mod convert;
pub mod ctl;
pub mod dirsource;
pub mod error;
pub mod image;
pub mod layer;
pub mod layout;
pub mod packer;
pub mod pax;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod remote;
pub mod run;
pub mod s3source;
pub mod seccomp;
pub mod source;
pub mod spec;
pub mod tree;

pub use convert::{convert, ConvertOptions, ConvertReport};
pub use error::ConvertError;
pub use remote::{convert_to, push};
