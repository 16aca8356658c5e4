//! Helpers the cache's unit tests share: chunks as the fetcher hands them to the cache, opening
//! a cache in a test directory, and checking what it serves and keeps on disk.

use std::fs;
use std::path::{Path, PathBuf};

use fusefs::chunk::{decode_chunk, encode_chunk, DEFAULT_ZSTD_LEVEL};
use fusefs::format::ChunkRecord;

use super::entry::entry_record;
use super::{CacheConfig, CacheError, ChunkCache};

/// A chunk as the fetcher would hand it to the cache: its record and stored bytes, plus
/// the raw bytes to compare decoded hits against.
pub(super) struct TestChunk {
    pub(super) record: ChunkRecord,
    pub(super) stored: Vec<u8>,
    pub(super) raw: Vec<u8>,
}

pub(super) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `len` raw bytes derived from `seed`: compressible text or incompressible noise.
pub(super) fn chunk(seed: u64, len: usize, compressible: bool) -> TestChunk {
    let raw = if compressible {
        format!("chunk {seed} says hello; ")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(len)
            .collect()
    } else {
        noise(seed, len)
    };
    let e = encode_chunk(&raw, DEFAULT_ZSTD_LEVEL).unwrap();
    TestChunk {
        record: ChunkRecord {
            blob: 3,
            flags: e.flags,
            comp_off: 12345,
            comp_len: e.stored.len() as u32,
            raw_len: e.raw_len,
            crc32: e.crc32,
            digest: e.digest,
        },
        stored: e.stored,
        raw,
    }
}

pub(super) fn open(dir: &Path, budget: u64) -> ChunkCache {
    let config = CacheConfig {
        dir: dir.to_path_buf(),
        budget_bytes: budget,
    };
    // A reopen right after a drop can find the lock still held for a moment: a test
    // spawning a process (`mount`) at the same time forks a child that holds a copy of
    // every descriptor, the lock's too, until it execs (O_CLOEXEC closes them only then).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match ChunkCache::open(&config) {
            Err(CacheError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            result => return result.unwrap(),
        }
    }
}

/// Asserts `c` is served with its exact stored bytes and decodes to its raw bytes.
pub(super) fn assert_served(cache: &ChunkCache, c: &TestChunk) {
    let hit = cache.get(&c.record.digest).expect("chunk is cached");
    assert_eq!(&*hit.bytes, &c.stored[..]);
    assert_eq!(hit.record, entry_record(&c.record));
    assert_eq!(decode_chunk(&hit.record, &hit.bytes).unwrap(), c.raw);
}

pub(super) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

pub(super) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

pub(super) const MIB: u64 = 1 << 20;
