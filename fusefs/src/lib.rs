//! The lazy image format and a read-only filesystem over it.
//!
//! - `format`: record layout of the index (see docs/FORMAT.md).
//! - `index`: validating reader of an index (mmap or bytes); `ChunkRef`, a chunk as it names it.
//! - `writer`: builds an index from a tree, chunks and blobs.
//! - `chunk`: chunk encoding and checks (zstd, crc32, blake3); a pure codec.
//! - `source`: the `ChunkSource` trait data is read through.
//! - `opens`: the `OpenObserver` trait, which hears of the opens, releases and reads of the
//!   files it watches, and `OpenFile`, the handle it gets.
//! - `speculate`: guesses from the image's layout of what a reader reads next.
//! - `reader`: `ImageReader`, POSIX semantics over an index; testable without FUSE.
//! - `fuse`: the thin `fuser` adapter and `mount`.
//! - `ops`: counters of the FUSE requests a mount answers, by kind.
//! - `manifest`: the OCI manifest that names an image's index and blobs.
//! - `safetensors`: the header of a safetensors file, parsed as untrusted input.
//!
//! Inside the crate dependencies point one way: `format` <- `index` <- `source` <- `opens`,
//! `speculate` <- `reader` <- `fuse`; the codec (`chunk`) and the `writer` need only `format`.

pub mod chunk;
pub mod error;
pub mod format;
pub mod fuse;
pub mod index;
pub mod manifest;
pub mod opens;
pub mod ops;
pub mod reader;
pub mod safetensors;
pub mod source;
mod speculate;
pub mod writer;

pub use error::{ChunkError, FsError, IndexError, SourceError};
pub use index::{ChunkRef, Index};
pub use opens::{OpenFile, OpenObserver};
pub use reader::ImageReader;
pub use source::ChunkSource;
