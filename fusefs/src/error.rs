//! Errors of the format layer and of `ImageReader`, and the one place that maps them to errno.

use thiserror::Error;

/// An index that cannot be used. Every variant is permanent: re-reading the same bytes gives
/// the same answer, so the fix is to re-fetch or re-convert the image.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IndexError {
    #[error("image index is truncated at {actual} bytes (expected {expected}); re-run lazyctl convert or re-fetch the image")]
    Truncated { actual: u64, expected: u64 },
    #[error("not a lazy image index (bad magic); the file is not an index or is corrupted")]
    BadMagic,
    #[error("unsupported index version {0}; this build reads version 1")]
    UnsupportedVersion(u32),
    #[error("index header checksum mismatch; the index is corrupted")]
    HeaderChecksum,
    #[error("index section '{section}' checksum mismatch; the index is corrupted")]
    SectionChecksum { section: &'static str },
    #[error("index is corrupt: {0}")]
    Corrupt(String),
    #[error("index is too large: {0}")]
    TooLarge(String),
}

/// A chunk whose stored bytes fail a check. Permanent for the bytes at hand; re-fetching the
/// chunk from the source may help.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk {digest} has {actual} stored bytes, expected {expected}")]
    Length {
        digest: String,
        actual: usize,
        expected: usize,
    },
    #[error("chunk {digest} crc32 mismatch (stored {expected:08x}, computed {actual:08x})")]
    Crc {
        digest: String,
        expected: u32,
        actual: u32,
    },
    #[error("chunk {digest} does not decompress: {reason}")]
    Decompress { digest: String, reason: String },
    #[error("chunk {digest} digest mismatch after decoding (got {actual})")]
    Digest { digest: String, actual: String },
}

/// Why a chunk source could not deliver a chunk: its verdict, after whatever retries the source
/// makes (the agent's fetcher retries a backend's transient errors itself). Every one is EIO to
/// the reader, and the next read of the chunk asks the source afresh.
#[derive(Debug, Error, Clone)]
pub enum SourceError {
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("blob {blob}: {reason}")]
    Blob { blob: String, reason: String },
    #[error("timed out after {0:?} waiting for chunk data")]
    Timeout(std::time::Duration),
}

/// The outcome of a filesystem operation that did not succeed.
#[derive(Debug, Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("no such attribute")]
    NoXattr,
    #[error("name too long")]
    NameTooLong,
    #[error("read-only file system")]
    ReadOnly,
    #[error("invalid argument")]
    Invalid,
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl FsError {
    /// The errno a caller of the filesystem sees. One exhaustive match, so a new variant
    /// cannot slip through as a generic error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::NoXattr => libc::ENODATA,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::ReadOnly => libc::EROFS,
            FsError::Invalid => libc::EINVAL,
            FsError::Index(_) => libc::EIO,
            FsError::Source(_) => libc::EIO,
        }
    }
}
