//! The opens, releases and reads of the files a mount watches, for whoever reads such files
//! ahead its own way (the agent streams a safetensors file in the reader's order).
//!
//! An [`OpenObserver`] is given to `ImageReader` beside its `ChunkSource`, not through it:
//! a source wrapped by another (the profile recorder) still hears of nothing it did not ask
//! for, and nothing it asked for is lost in a wrapper that does not forward it. The observer
//! gets an [`OpenFile`], a handle that reads its file back through the filesystem it was
//! opened in. That filesystem is `ImageReader`, which depends on this module, so the handle
//! reaches it through `ImageFiles`, a trait the reader implements: this module names no reader.

use std::ops::Range;
use std::sync::{Arc, Weak};

use crate::error::FsError;
use crate::index::ChunkRef;
use crate::source::ChunkSource;

/// Hears of the opens, releases and reads of the regular files it watches
/// ([`OpenObserver::watches`]). Every method runs on the FUSE session thread or a read worker
/// and must not block for long.
pub trait OpenObserver: Send + Sync {
    /// Whether the file named `name` (its name in its directory) is watched. Asked once per
    /// file when the reader is made.
    fn watches(&self, name: &[u8]) -> bool;

    /// A watched file was opened and had no other open handle. Must not block: an observer
    /// that wants to read the file hands `file` to a thread of its own.
    fn opened(&self, file: OpenFile);

    /// The last open handle of watched file `ino` was released (or the filesystem is going
    /// away).
    fn released(&self, ino: u64);

    /// A reader reads `range` of watched file `ino`, before its chunks are asked for. Returns
    /// whether the observer reads this file ahead of the reader itself; when not, the
    /// filesystem hints a sequential reader's next chunks (`ChunkSource::read_ahead`).
    fn read(&self, ino: u64, range: Range<u64>) -> bool;
}

/// A regular file that was just opened, as [`OpenObserver::opened`] gets it: enough to
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
