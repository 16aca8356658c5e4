//! Chunk encoding: each chunk is compressed on its own (zstd) so any chunk can be fetched and
//! decoded alone, and carries two checks: crc32 of the stored bytes (cheap; every read from
//! disk) and blake3 of the decoded bytes (its identity; checked after every decode).
//!
//! A pure codec over a chunk record and its bytes: `lazyctl convert` encodes with it, every
//! source decodes with it; it reads nothing and knows no source (`source` has the
//! `ChunkSource` boundary).

use crate::error::ChunkError;
use crate::format::{ChunkRecord, CHUNK_UNCOMPRESSED};

/// Default zstd level: level 3 is zstd's own default, a good ratio at ~300+ MB/s per core.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

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
            digest: hex::encode(record.digest),
            actual: stored.len(),
            expected: record.comp_len as usize,
        });
    }
    let crc = crc32fast::hash(stored);
    if crc != record.crc32 {
        return Err(ChunkError::Crc {
            digest: hex::encode(record.digest),
            expected: record.crc32,
            actual: crc,
        });
    }
    Ok(())
}

/// Which checks [`decode_with`] runs on top of the ones it always runs (the stored length, and
/// decompression to exactly `raw_len` bytes). What each check protects against, and where each
/// one runs, is in docs/ARCHITECTURE.md ("Integrity").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// crc32 of the stored bytes: transfer and storage errors (torn writes, rot, truncation).
    pub crc32: bool,
    /// blake3 of the decoded bytes: the chunk is the one the index names (the index is
    /// authenticated by its sha256), whoever sent it.
    pub digest: bool,
}

impl Checks {
    /// Bytes of unknown provenance: a network fetch, a blob of a local store.
    pub const ALL: Checks = Checks {
        crc32: true,
        digest: true,
    };
    /// Bytes whose crc32 the caller just checked (a disk cache read) and whose digest was not
    /// checked yet in this process.
    pub const DIGEST: Checks = Checks {
        crc32: false,
        digest: true,
    };
    /// Bytes whose crc32 the caller just checked and whose digest was checked before.
    pub const NONE: Checks = Checks {
        crc32: false,
        digest: false,
    };
}

/// Verifies and decodes stored bytes: crc32, decompression to exactly `raw_len` bytes, then
/// blake3 of the result. Nothing that fails a check is returned.
pub fn decode_chunk(record: &ChunkRecord, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
    decode_with(record, stored, Checks::ALL)
}

/// Decodes stored bytes with `checks`; the length of the stored bytes and of the decoded ones
/// is always checked, so nothing but `raw_len` bytes is ever returned.
pub fn decode_with(
    record: &ChunkRecord,
    stored: &[u8],
    checks: Checks,
) -> Result<Vec<u8>, ChunkError> {
    check_lengths_and_crc(record, stored, checks)?;
    let raw = decompress(record, stored)?;
    check_digest(record, &raw, checks)?;
    Ok(raw)
}

/// [`decode_with`] of stored bytes the caller owns: an uncompressed chunk (model weights, mostly)
/// is returned as it was read, without a copy.
pub fn decode_owned(
    record: &ChunkRecord,
    stored: Vec<u8>,
    checks: Checks,
) -> Result<Vec<u8>, ChunkError> {
    if record.flags & CHUNK_UNCOMPRESSED == 0 {
        return decode_with(record, &stored, checks);
    }
    check_lengths_and_crc(record, &stored, checks)?;
    check_digest(record, &stored, checks)?;
    Ok(stored)
}

fn check_lengths_and_crc(
    record: &ChunkRecord,
    stored: &[u8],
    checks: Checks,
) -> Result<(), ChunkError> {
    if checks.crc32 {
        check_stored(record, stored)
    } else if stored.len() != record.comp_len as usize {
        Err(ChunkError::Length {
            digest: hex::encode(record.digest),
            actual: stored.len(),
            expected: record.comp_len as usize,
        })
    } else {
        Ok(())
    }
}

fn check_digest(record: &ChunkRecord, raw: &[u8], checks: Checks) -> Result<(), ChunkError> {
    if checks.digest {
        let digest = blake3::hash(raw);
        if digest.as_bytes() != &record.digest {
            return Err(ChunkError::Digest {
                digest: hex::encode(record.digest),
                actual: digest.to_hex().to_string(),
            });
        }
    }
    Ok(())
}

thread_local! {
    /// One zstd decoder context per thread: making a context for every chunk costs more than
    /// decoding a small one.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The chunk's raw bytes: a copy of raw chunks, zstd's output (exactly `raw_len` bytes) for
/// the others.
fn decompress(record: &ChunkRecord, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
    if record.flags & CHUNK_UNCOMPRESSED != 0 {
        return Ok(stored.to_vec());
    }
    let failed = |reason: String| ChunkError::Decompress {
        digest: hex::encode(record.digest),
        reason,
    };
    let raw_len = record.raw_len as usize;
    let raw = DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(d) => d,
            None => {
                cell.insert(zstd::bulk::Decompressor::new().map_err(|e| failed(e.to_string()))?)
            }
        };
        let mut raw = Vec::with_capacity(raw_len);
        decompressor
            .decompress_to_buffer(stored, &mut raw)
            .map_err(|e| failed(e.to_string()))?;
        Ok::<_, ChunkError>(raw)
    })?;
    if raw.len() != raw_len {
        return Err(failed(format!("{} bytes, expected {raw_len}", raw.len())));
    }
    Ok(raw)
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
    fn decode_owned_returns_an_uncompressed_chunk_as_is_after_the_same_checks() {
        let raw = b"weights ".repeat(300);
        let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
        let compressed = record_for(&e);
        assert_eq!(
            decode_owned(&compressed, e.stored.clone(), Checks::ALL).unwrap(),
            raw
        );
        let mut rec = ChunkRecord {
            flags: CHUNK_UNCOMPRESSED,
            comp_len: raw.len() as u32,
            raw_len: raw.len() as u32,
            crc32: crc32fast::hash(&raw),
            digest: *blake3::hash(&raw).as_bytes(),
            ..compressed
        };
        // The very buffer handed in comes back: no copy.
        let stored = raw.clone();
        let at = stored.as_ptr();
        let out = decode_owned(&rec, stored, Checks::ALL).unwrap();
        assert_eq!(out, raw);
        assert_eq!(out.as_ptr(), at);
        rec.digest[0] ^= 1;
        assert!(matches!(
            decode_owned(&rec, raw.clone(), Checks::DIGEST),
            Err(ChunkError::Digest { .. })
        ));
        rec.digest[0] ^= 1;
        rec.crc32 ^= 1;
        assert!(matches!(
            decode_owned(&rec, raw.clone(), Checks::ALL),
            Err(ChunkError::Crc { .. })
        ));
        assert!(matches!(
            decode_owned(&rec, raw[1..].to_vec(), Checks::NONE),
            Err(ChunkError::Length { .. })
        ));
    }

    #[test]
    fn decode_with_runs_the_checks_asked_for_but_always_the_lengths() {
        let raw = b"cached chunk ".repeat(300);
        let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
        let mut rec = record_for(&e);
        for checks in [Checks::ALL, Checks::DIGEST, Checks::NONE] {
            assert_eq!(decode_with(&rec, &e.stored, checks).unwrap(), raw);
        }
        rec.crc32 ^= 1;
        assert!(matches!(
            decode_with(&rec, &e.stored, Checks::ALL),
            Err(ChunkError::Crc { .. })
        ));
        assert_eq!(decode_with(&rec, &e.stored, Checks::DIGEST).unwrap(), raw);
        rec.digest[0] ^= 1;
        assert!(matches!(
            decode_with(&rec, &e.stored, Checks::DIGEST),
            Err(ChunkError::Digest { .. })
        ));
        // The checks left to the caller really are skipped...
        assert_eq!(decode_with(&rec, &e.stored, Checks::NONE).unwrap(), raw);
        // ...but never other than `raw_len` bytes come out.
        assert!(matches!(
            decode_with(&rec, &e.stored[1..], Checks::NONE),
            Err(ChunkError::Length { .. })
        ));
        rec.raw_len += 1;
        assert!(matches!(
            decode_with(&rec, &e.stored, Checks::NONE),
            Err(ChunkError::Decompress { .. })
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
