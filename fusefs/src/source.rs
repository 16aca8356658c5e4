//! `ChunkSource`, the boundary the filesystem reads data through: the agent implements it over
//! local stores, caches and remote backends; `ImageReader` and the speculator call it.
//!
//! Besides chunks, a source may ask to hear of the opens and releases of some files (the agent
//! streams a safetensors file in the reader's order). Those hooks hand it an [`OpenFile`], a
//! handle that reads its file back through the filesystem it was opened in. That filesystem is
//! `ImageReader`, which depends on this module, so the handle reaches it through
//! `ImageFiles`, a trait the reader implements: this module names no reader.

use std::ops::Range;
use std::sync::{Arc, Weak};

use crate::error::{FsError, SourceError};
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

    /// Which files' opens this source wants to hear of ([`ChunkSource::file_opened`] and
    /// [`ChunkSource::file_released`]), as a test of a file's name; `None` (the default): no
    /// file's. A mount whose source wants no file of its image lets the kernel open and close
    /// every file without asking (see `fuse`), which saves two round trips per open.
    fn opens_wanted(&self) -> Option<fn(&[u8]) -> bool> {
        None
    }

    /// A regular file that [`ChunkSource::opens_wanted`] names was opened and had no other
    /// open handle. Must not block (it runs on the FUSE session thread): a source that wants
    /// to read the file hands `file` to a thread of its own.
    fn file_opened(&self, _file: OpenFile) {}

    /// The last open handle of file `ino` was released (or the filesystem is going away).
    /// Must not block for long: it runs on the FUSE session thread.
    fn file_released(&self, _ino: u64) {}

    /// A reader reads `range` of a file that [`ChunkSource::opens_wanted`] names, before its
    /// chunks are asked for. Must not block (it may run on the FUSE session thread). Returns
    /// whether the source reads this file ahead of the reader itself; when not (the default),
    /// the filesystem hints a sequential reader's next chunks ([`ChunkSource::read_ahead`]).
    fn watched_read(&self, _ino: u64, _range: Range<u64>) -> bool {
        false
    }
}

/// A regular file that was just opened, as [`ChunkSource::file_opened`] gets it: enough to
/// find its name, its chunks and its bytes from another thread. It holds the reader weakly, so
/// a source that keeps it does not keep the filesystem alive; once the reader is gone every
/// method fails. `ImageReader` makes them (`OpenFile::new`).
#[derive(Clone)]
pub struct OpenFile {
    pub ino: u64,
    pub size: u64,
    reader: Weak<dyn ImageFiles>,
}

/// The filesystem an [`OpenFile`] was opened in, as the handle reads it (implemented by
/// `ImageReader`).
pub(crate) trait ImageFiles: Send + Sync {
    /// The name of file `ino` in the directory that holds it; see [`OpenFile::name`].
    fn file_name(&self, ino: u64) -> Option<Vec<u8>>;

    /// The chunks holding bytes `range` of file `ino`; see [`OpenFile::chunks`].
    fn file_chunks(
        &self,
        ino: u64,
        range: Range<u64>,
    ) -> Result<Vec<(Range<u64>, ChunkRef)>, FsError>;

    /// Bytes of file `ino` read through `source`; see [`OpenFile::read`].
    fn read_from(
        &self,
        source: &dyn ChunkSource,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError>;
}

impl OpenFile {
    /// A handle on file `ino` of `reader`.
    pub(crate) fn opened_in(reader: Weak<dyn ImageFiles>, ino: u64, size: u64) -> OpenFile {
        OpenFile { ino, size, reader }
    }

    fn reader(&self) -> Result<Arc<dyn ImageFiles>, FsError> {
        self.reader.upgrade().ok_or(FsError::NotFound)
    }

    /// The file's name in the directory that holds it (for a file with several names, one of
    /// them); `None` when the reader is gone or the directory is too large to scan. Costs a
    /// scan of that directory: call it off the session thread.
    pub fn name(&self) -> Option<Vec<u8>> {
        self.reader().ok()?.file_name(self.ino)
    }

    /// The chunks holding bytes `range` of the file, in file order, each with the file range
    /// it serves there (clamped to `range`); a chunk serving two adjacent pieces is listed once.
    pub fn chunks(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, ChunkRef)>, FsError> {
        self.reader()?.file_chunks(self.ino, range)
    }

    /// Bytes `offset..offset + size` of the file (clamped to its size), read from `source`
    /// rather than the filesystem's own source, so the read is not seen as the reader's.
    pub fn read(
        &self,
        source: &dyn ChunkSource,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        self.reader()?.read_from(source, self.ino, offset, size)
    }
}
