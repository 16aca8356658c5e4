//! `ChunkSource`, the boundary the filesystem reads data through: the agent implements it over
//! local stores, caches and remote backends; `ImageReader` and the speculator call it. Who
//! hears of a file's opens, releases and reads is another trait (`opens::OpenObserver`), so a
//! source that wraps another (the profile recorder) forwards chunks and hints only.

use std::sync::Arc;

use crate::error::SourceError;
use crate::index::ChunkRef;

/// Where `ImageReader` gets decoded chunk bytes from. Implementations must return only bytes
/// that passed `decode_chunk` (or an equivalent check) and may block: the FUSE adapter calls
/// them from worker threads, never from the session loop.
pub trait ChunkSource: Send + Sync {
    fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError>;

    /// The chunk, when the source holds it decoded in memory: what `chunk` would return, with
    /// the same side effects (counters, recordings), but never blocking nor reading a disk;
    /// `None` otherwise (the default). The filesystem answers a read whose chunk is held on
    /// the session thread, without handing it to a read worker.
    fn chunk_in_memory(&self, _chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        None
    }

    /// A hint that `chunks` will probably be read soon (a file is being read sequentially).
    /// Must not block. Sources with slow backends start fetching them at low priority; local
    /// sources ignore it.
    fn read_ahead(&self, _chunks: &[ChunkRef]) {}

    /// A guess that `chunks` may be read soon, made from the image's layout (the rest of a file
    /// or of a directory just touched). Must not block. Sources with slow backends fetch them
    /// when the link has room, and decode cached ones ahead while a core is free; local sources
    /// ignore it.
    fn speculate(&self, _chunks: &[ChunkRef]) {}
}
