//! Chunk encoding: each chunk is compressed on its own (zstd) so any chunk can be fetched and
//! decoded alone, and carries two checks: crc32 of the stored bytes (cheap; every read from
//! disk) and blake3 of the decoded bytes (its identity; checked after every decode).
//!
//! `ChunkSource` is the boundary the filesystem reads data through: the agent implements it
//! over local stores, caches and remote backends.

use std::sync::Arc;

use crate::error::{ChunkError, SourceError};
use crate::format::{ChunkRecord, CHUNK_UNCOMPRESSED};

/// Default zstd level: level 3 is zstd's own default, a good ratio at ~300+ MB/s per core.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// A chunk as the reader needs it: the record plus the OCI digest of its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index into the image's chunk table (stable for an image).
    pub index: u32,
    pub record: ChunkRecord,
    /// `sha256:<hex>` of the blob the chunk is stored in.
    pub blob_digest: String,
}

impl ChunkRef {
    /// Hex blake3 of the decoded chunk: the cache key and the name used in logs.
    pub fn digest_hex(&self) -> String {
        hex(&self.record.digest)
    }
}

/// The result of encoding one chunk: the bytes to store and the record fields describing them.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub stored: Vec<u8>,
    pub raw_len: u32,
    pub crc32: u32,
    pub digest: [u8; 32],
    pub flags: u32,
}

/// Compresses `raw` with zstd at `level`, or keeps it raw when compression does not save at
/// least 1/64 of the size (already-compressed data, model weights).
pub fn encode_chunk(raw: &[u8], level: i32) -> std::io::Result<EncodedChunk> {
    let digest = *blake3::hash(raw).as_bytes();
    let compressed = zstd::bulk::compress(raw, level)?;
    let (stored, flags) = if compressed.len() + raw.len() / 64 < raw.len() {
        (compressed, 0)
    } else {
        (raw.to_vec(), CHUNK_UNCOMPRESSED)
    };
    Ok(EncodedChunk {
        crc32: crc32fast::hash(&stored),
        raw_len: raw.len() as u32,
        stored,
        digest,
        flags,
    })
}

/// Checks stored bytes against their record without decoding (crc32 and length).
pub fn check_stored(record: &ChunkRecord, stored: &[u8]) -> Result<(), ChunkError> {
    if stored.len() != record.comp_len as usize {
        return Err(ChunkError::Length {
            digest: hex(&record.digest),
            actual: stored.len(),
            expected: record.comp_len as usize,
        });
    }
    let crc = crc32fast::hash(stored);
    if crc != record.crc32 {
        return Err(ChunkError::Crc {
            digest: hex(&record.digest),
            expected: record.crc32,
            actual: crc,
        });
    }
    Ok(())
}

/// Verifies and decodes stored bytes: crc32, decompression to exactly `raw_len` bytes, then
/// blake3 of the result. Nothing that fails a check is returned.
pub fn decode_chunk(record: &ChunkRecord, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
    check_stored(record, stored)?;
    let raw = if record.flags & CHUNK_UNCOMPRESSED != 0 {
        stored.to_vec()
    } else {
        let raw = zstd::bulk::decompress(stored, record.raw_len as usize).map_err(|e| {
            ChunkError::Decompress {
                digest: hex(&record.digest),
                reason: e.to_string(),
            }
        })?;
        if raw.len() != record.raw_len as usize {
            return Err(ChunkError::Decompress {
                digest: hex(&record.digest),
                reason: format!("{} bytes, expected {}", raw.len(), record.raw_len),
            });
        }
        raw
    };
    let digest = blake3::hash(&raw);
    if digest.as_bytes() != &record.digest {
        return Err(ChunkError::Digest {
            digest: hex(&record.digest),
            actual: digest.to_hex().to_string(),
        });
    }
    Ok(raw)
}

/// Where `ImageReader` gets decoded chunk bytes from. Implementations must return only bytes
/// that passed `decode_chunk` (or an equivalent check) and may block: the FUSE adapter calls
/// them from worker threads, never from the session loop.
pub trait ChunkSource: Send + Sync {
    fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError>;

    /// A hint that `chunks` will probably be read soon (a file is being read sequentially).
    /// Must not block. Sources with slow backends start fetching them at low priority; local
    /// sources ignore it.
    fn read_ahead(&self, _chunks: &[ChunkRef]) {}

    /// A regular file was opened and had no other open handle. Must not block (it runs on the
    /// FUSE session thread): a source that wants to read the file hands `file` to a thread of
    /// its own.
    fn file_opened(&self, _file: crate::reader::OpenFile) {}

    /// The last open handle of file `ino` was released (or the filesystem is going away).
    /// Must not block for long: it runs on the FUSE session thread.
    fn file_released(&self, _ino: u64) {}
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_for(e: &EncodedChunk) -> ChunkRecord {
        ChunkRecord {
            blob: 0,
            flags: e.flags,
            comp_off: 0,
            comp_len: e.stored.len() as u32,
            raw_len: e.raw_len,
            crc32: e.crc32,
            digest: e.digest,
        }
    }

    #[test]
    fn compressible_chunk_round_trips() {
        let raw = b"hello hello hello hello hello hello hello hello".repeat(100);
        let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
        assert_eq!(e.flags, 0);
        assert!(e.stored.len() < raw.len());
        assert_eq!(decode_chunk(&record_for(&e), &e.stored).unwrap(), raw);
    }

    #[test]
    fn incompressible_chunk_is_stored_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let raw: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
        assert_eq!(e.flags, CHUNK_UNCOMPRESSED);
        assert_eq!(decode_chunk(&record_for(&e), &e.stored).unwrap(), raw);
    }

    #[test]
    fn every_single_byte_corruption_is_caught() {
        let raw = b"some chunk data ".repeat(64);
        let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
        let rec = record_for(&e);
        for i in 0..e.stored.len() {
            let mut bad = e.stored.clone();
            bad[i] ^= 0x40;
            assert!(decode_chunk(&rec, &bad).is_err(), "flip at {i} served");
        }
        assert!(matches!(
            decode_chunk(&rec, &e.stored[1..]),
            Err(ChunkError::Length { .. })
        ));
    }

    #[test]
    fn wrong_digest_is_caught_even_with_matching_crc() {
        let raw = vec![7u8; 5000];
        let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
        let mut rec = record_for(&e);
        rec.digest[0] ^= 1;
        assert!(matches!(
            decode_chunk(&rec, &e.stored),
            Err(ChunkError::Digest { .. })
        ));
    }
}
