//! The host's compressed chunk cache: chunks' stored bytes (as in their blob: zstd or raw) on
//! local disk, keyed by the chunk digest (blake3 of the decoded bytes), shared by every mount of
//! one process (`Arc<ChunkCache>`, safe to call from many threads at once).
//!
//! **Layout.** `DIR/lock` holds an exclusive `flock` for as long as the cache is open (and the
//! holder's pid, for the error a second process gets). `DIR/segments/<seq:016x>.seg` are
//! append-only segment files: a 16-byte segment header, then entries, each a 64-byte entry header
//! (magic, flags, stored and raw length, crc32 of the payload, digest, crc32 of the header)
//! followed by the payload. Entries are appended with positioned writes, never through a
//! writable mapping, so a full disk is an `ENOSPC` error rather than a `SIGBUS`. A segment is
//! sealed once the next entry would take it past the segment size, and a new one is started.
//!
//! **Reads.** The in-memory index maps a digest to (segment, offset). `get` checks the segment
//! file is still long enough (`fstat`, so a file truncated behind our back is a miss), reads the
//! entry header and then the payload with positioned reads (`pread`) into a buffer the caller
//! owns, and checks the header and the payload's crc32 on every read. A mismatch drops the entry
//! and counts it corrupt; the caller refetches. Segments are never mapped: a mapping keeps every
//! page read through it in the process's resident set (`RssFile`), so reading a few GiB of
//! model weights through the cache made `lazyd` look several GiB large, although the pages were
//! only the kernel's page cache. With `pread` the page cache holds them and `lazyd`'s RSS is its
//! own memory. The price is paid only when the page cache is hot: reading 1 GiB of 1 MiB
//! entries takes about 1 s from a cold page cache either way, but 0.18 s by `pread` against
//! 0.09 s through mappings that stay populated (`read_path_benchmark` at the end of this
//! file). A `POSIX_FADV_WILLNEED` on each entry before the reads starts its whole range at once,
//! and more than doubles cold throughput.
//!
//! **Eviction.** LRU at segment granularity: a segment's recency is the latest `get` or `insert`
//! of any entry in it (at open, the segment sequence order). When an insert would take the sum
//! of segment file sizes past the budget, the least recently used sealed segment is deleted as
//! a whole and its entries leave the index. Deleting whole files keeps eviction O(1) in I/O and
//! needs no compaction; the price is that warm entries sharing a segment with cold ones go too,
//! which the segment size (at most 1/16 of the budget) keeps to a small fraction of the cache.
//!
//! **Garbage collection.** `retain` drops the entries a caller no longer wants (chunks of no
//! image it keeps) and frees their space: a segment with no live entry left is deleted, and one
//! whose live entries fill less than half of it is compacted: they are appended to the active
//! segment like inserts, re-indexed there, and the old file is deleted. Half bounds the copying
//! (each compaction frees at least as much as it writes) while keeping at most twice the live
//! data on disk. `evict_to` evicts whole segments, least recently used first, down to a target.
//! Segments are only ever unlinked, never rewritten in place, so readers are as safe as with
//! eviction.
//!
//! **Crashes.** Nothing is fsynced per insert: a torn write is caught by the crc32s. At open
//! every segment's entry headers are scanned (payloads are not read, so opening a 10 GiB cache
//! reads only headers) to rebuild the index; a bad segment header deletes the segment and a bad
//! entry header or an entry running past the end of the file truncates the segment there. A
//! payload torn or rotted on disk fails its crc32 on the first `get`.
//!
//! **Locks.** Each `get` holds one index shard's read lock for a hash lookup; the reads and the
//! crc32 run with no lock held. Inserts check the stored
//! bytes' crc32 before taking any lock, then serialize on the writer lock for the append itself
//! (one `pwrite` of one chunk into the page cache: a segment has one append position, and
//! inserts follow a network fetch that is far slower). `get` never takes the writer lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use fusefs::chunk::check_stored;
use fusefs::format::ChunkRecord;
use fusefs::ChunkError;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Where the cache lives and how much disk it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Cache directory; created if missing.
    pub dir: PathBuf,
    /// Most bytes of segment files kept on disk.
    pub budget_bytes: u64,
}

/// Errors of the chunk cache. None of them is a reason to fail a read: the caller serves the
/// chunk from its source and, at worst, runs without a cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Another open `ChunkCache` (normally another `lazyd`) holds the directory.
    #[error("chunk cache {dir} is in use by {}; stop it or give this process its own cache directory", holder(*pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    #[error("chunk cache {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The disk is full and evicting every segment did not make room.
    #[error("chunk cache {dir}: disk full, nothing left to evict for a {needed}-byte entry; the chunk is served without caching")]
    NoSpace { dir: PathBuf, needed: u64 },
    #[error(
        "chunk {digest}: a {size}-byte cache entry does not fit the cache budget of {budget} bytes"
    )]
    TooLarge {
        digest: String,
        size: u64,
        budget: u64,
    },
    /// The stored bytes handed to `insert` do not match their record.
    #[error("chunk not cached: stored bytes do not match the record")]
    Mismatch(#[source] ChunkError),
}

impl CacheError {
    /// True when retrying the same call cannot help. A full disk may drain and I/O errors may
    /// pass; a held lock lasts as long as the process holding it, which is normally a daemon.
    pub fn is_permanent(&self) -> bool {
        match self {
            CacheError::Locked { .. } | CacheError::TooLarge { .. } | CacheError::Mismatch(_) => {
                true
            }
            CacheError::Io { .. } | CacheError::NoSpace { .. } => false,
        }
    }
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("process {pid}"),
        None => "another process".into(),
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// A point-in-time copy of the cache's counters, for metrics and `lazyctl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Entries in the index.
    pub entries: u64,
    /// Segment files on disk.
    pub segments: u64,
    /// Sum of the segment files' sizes.
    pub bytes_used: u64,
    pub budget_bytes: u64,
    pub hits: u64,
    /// `get`s that found nothing servable (absent, or dropped as corrupt).
    pub misses: u64,
    /// Entries written.
    pub inserts: u64,
    pub evicted_segments: u64,
    pub evicted_bytes: u64,
    /// Entries dropped because their bytes on disk failed a check.
    pub corrupt_entries: u64,
    /// `insert` calls that returned an error.
    pub insert_failures: u64,
}

/// What [`ChunkCache::retain`] or [`ChunkCache::evict_to`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainReport {
    /// Entries left in the index.
    pub kept_chunks: u64,
    /// Entries dropped from the index.
    pub removed_chunks: u64,
    /// Bytes of segment files freed, net of the copies compaction wrote.
    pub freed_bytes: u64,
    /// Segments whose live entries were copied elsewhere before the file was deleted.
    pub segments_compacted: u64,
    /// Segments deleted with no live entry left (compacted ones not included).
    pub segments_deleted: u64,
}

/// A segment taken out of the cache by `drop_segment`.
struct Dropped {
    /// Index entries that went with it.
    entries: u64,
    /// Its file size.
    bytes: u64,
    path: PathBuf,
    /// Why the file could not be deleted, if it could not.
    delete_error: Option<io::Error>,
}

impl Dropped {
    fn deleted(self) -> Result<(), CacheError> {
        match self.delete_error {
            Some(e) => Err(io_err(&self.path, "deleting a segment")(e)),
            None => Ok(()),
        }
    }
}

/// A cache hit: the stored entry's record (flags, lengths, crc32, digest; `blob` and `comp_off`
/// are zero) and its stored bytes, which passed the crc32 check, read into a buffer of their
/// own. Decode with `fusefs::chunk::decode_chunk(&hit.record, &hit.bytes)`.
pub struct CachedChunk {
    pub record: ChunkRecord,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for CachedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedChunk")
            .field("record", &self.record)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// First bytes of every segment file.
const SEGMENT_MAGIC: [u8; 8] = *b"LAZYSEG\0";
/// The only segment format this code reads and writes; other versions are deleted at open.
const SEGMENT_VERSION: u32 = 1;
/// Segment header: magic, version, crc32 of both.
const SEGMENT_HEADER_LEN: u64 = 16;
/// First bytes of every entry header.
const ENTRY_MAGIC: [u8; 4] = *b"LZCE";
/// Entry header: magic 4, flags 4, stored length 4, raw length 4, payload crc32 4, digest 32,
/// reserved 8, header crc32 4.
const ENTRY_HEADER_LEN: u64 = 64;
const ENTRY_HEADER_CRC_OFFSET: usize = 60;

/// Segment size: `budget / SEGMENTS_PER_BUDGET`, clamped to `MIN_SEGMENT..=MAX_SEGMENT`, and
/// never over `budget / MIN_SEGMENTS`. A segment is the unit of eviction, so its size is the
/// LRU's precision: 1/16 of the budget evicts about 6% of the cache at a time. A 10 GiB cache
/// (640 MiB capped to 256 MiB) is 40 files, rather than thousands of tiny ones.
const SEGMENTS_PER_BUDGET: u64 = 16;
/// Floor: a few default-size (1 MiB) chunks per segment, so the per-segment costs (a file, a
/// create and an unlink) are spread over several entries.
const MIN_SEGMENT: u64 = 4 << 20;
/// Ceiling: one eviction never throws out more than 256 MiB of possibly warm data, however
/// large the budget.
const MAX_SEGMENT: u64 = 256 << 20;
/// A small budget still holds at least this many segments, so an eviction frees part of the
/// cache instead of emptying it.
const MIN_SEGMENTS: u64 = 4;

/// Index shards: `get`s of different chunks rarely share a lock. Digests are blake3 hashes,
/// so their first byte spreads entries evenly.
const INDEX_SHARDS: usize = 16;

fn segment_size(budget: u64) -> u64 {
    (budget / SEGMENTS_PER_BUDGET)
        .clamp(MIN_SEGMENT, MAX_SEGMENT)
        .min(budget / MIN_SEGMENTS)
}

fn segment_header() -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn encode_entry_header(r: &ChunkRecord) -> [u8; ENTRY_HEADER_LEN as usize] {
    let mut h = [0u8; ENTRY_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&ENTRY_MAGIC);
    h[4..8].copy_from_slice(&r.flags.to_le_bytes());
    h[8..12].copy_from_slice(&r.comp_len.to_le_bytes());
    h[12..16].copy_from_slice(&r.raw_len.to_le_bytes());
    h[16..20].copy_from_slice(&r.crc32.to_le_bytes());
    h[20..52].copy_from_slice(&r.digest);
    let crc = crc32fast::hash(&h[..ENTRY_HEADER_CRC_OFFSET]);
    h[ENTRY_HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The record an entry header describes, or `None` when the header is not one (bad magic or
/// crc). Field values are not trusted further: lengths are checked against the file.
fn decode_entry_header(h: &[u8; ENTRY_HEADER_LEN as usize]) -> Option<ChunkRecord> {
    let le = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    if h[0..4] != ENTRY_MAGIC
        || crc32fast::hash(&h[..ENTRY_HEADER_CRC_OFFSET]) != le(ENTRY_HEADER_CRC_OFFSET)
    {
        return None;
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&h[20..52]);
    Some(ChunkRecord {
        blob: 0,
        flags: le(4),
        comp_off: 0,
        comp_len: le(8),
        raw_len: le(12),
        crc32: le(16),
        digest,
    })
}

/// The cache record of a chunk: only the fields an entry stores.
fn entry_record(r: &ChunkRecord) -> ChunkRecord {
    ChunkRecord {
        blob: 0,
        comp_off: 0,
        ..*r
    }
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// One segment file, shared by the index entries that live in it and by readers.
struct Segment {
    seq: u64,
    path: PathBuf,
    file: File,
    /// Logical time of the latest get or insert of an entry in this segment.
    last_used: AtomicU64,
}

/// Where an indexed entry lives, with the fields needed to check and return it.
#[derive(Clone)]
struct Entry {
    segment: Arc<Segment>,
    /// Offset of the entry header in the segment file.
    offset: u64,
    record: ChunkRecord,
}

impl Entry {
    fn end(&self) -> u64 {
        self.offset + ENTRY_HEADER_LEN + u64::from(self.record.comp_len)
    }

    fn same_as(&self, other: &Entry) -> bool {
        Arc::ptr_eq(&self.segment, &other.segment) && self.offset == other.offset
    }
}

/// A segment as the writer side sees it.
struct SegmentState {
    segment: Arc<Segment>,
    /// Bytes of the file that hold whole entries (the file's length).
    len: u64,
    /// Digests written to this segment, to take them out of the index on eviction. May name
    /// entries already dropped or re-inserted elsewhere; eviction checks the index first.
    digests: Vec<[u8; 32]>,
}

/// Everything inserts, eviction and `clear` change, under the writer lock.
struct Segments {
    live: BTreeMap<u64, SegmentState>,
    /// The segment new entries are appended to.
    active: Option<u64>,
    next_seq: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evicted_segments: AtomicU64,
    evicted_bytes: AtomicU64,
    corrupt_entries: AtomicU64,
    insert_failures: AtomicU64,
}

/// Why a `get` could not serve an indexed entry.
enum Unservable {
    /// The bytes on disk fail a check.
    Corrupt(String),
    /// The segment could not be stat'ed or read.
    Unreadable(io::Error),
}

/// One shard of the in-memory index: digest to entry.
type IndexShard = HashMap<[u8; 32], Entry>;

/// The local chunk cache. See the module docs.
pub struct ChunkCache {
    dir: PathBuf,
    segments_dir: PathBuf,
    budget: u64,
    segment_size: u64,
    index: Box<[RwLock<IndexShard>]>,
    writer: Mutex<Segments>,
    /// Logical clock for segment recency.
    clock: AtomicU64,
    bytes_used: AtomicU64,
    counters: Counters,
    /// Holds the directory's flock until the cache is dropped.
    _lock: File,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .field("bytes_used", &self.bytes_used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// Opens (or creates) the cache in `config.dir`: takes the directory lock, scans the
    /// segments' entry headers to rebuild the index (truncating torn tails), and evicts down
    /// to the budget if the directory holds more than it.
    pub fn open(config: &CacheConfig) -> Result<ChunkCache, CacheError> {
        let dir = config.dir.clone();
        crate::create_private_dir(&dir).map_err(io_err(&dir, "creating the cache directory"))?;
        let lock = take_lock(&dir)?;
        let segments_dir = dir.join("segments");
        crate::create_private_dir(&segments_dir)
            .map_err(io_err(&segments_dir, "creating the segments directory"))?;

        let budget = config.budget_bytes;
        let cache = ChunkCache {
            dir,
            budget,
            segment_size: segment_size(budget),
            index: (0..INDEX_SHARDS)
                .map(|_| RwLock::new(HashMap::new()))
                .collect(),
            writer: Mutex::new(Segments {
                live: BTreeMap::new(),
                active: None,
                next_seq: 0,
            }),
            clock: AtomicU64::new(0),
            bytes_used: AtomicU64::new(0),
            counters: Counters::default(),
            _lock: lock,
            segments_dir,
        };
        cache.load_segments()?;
        Ok(cache)
    }

    /// The stored bytes of chunk `digest`, checked against their crc32, or `None`. An entry
    /// that fails a check is dropped (and counted corrupt), so the caller's refetch can
    /// re-insert it.
    pub fn get(&self, digest: &[u8; 32]) -> Option<CachedChunk> {
        let entry = self.shard(digest).get(digest).cloned();
        let Some(entry) = entry else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match read_entry(&entry) {
            Ok(bytes) => {
                self.touch(&entry.segment);
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(CachedChunk {
                    record: entry.record,
                    bytes,
                })
            }
            Err(why) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                let reason = match why {
                    Unservable::Corrupt(reason) => {
                        self.counters
                            .corrupt_entries
                            .fetch_add(1, Ordering::Relaxed);
                        reason
                    }
                    Unservable::Unreadable(e) => format!("segment unreadable: {e}"),
                };
                warn!(
                    digest = %hex::encode(digest),
                    segment = %entry.segment.path.display(),
                    offset = entry.offset,
                    "dropping cached chunk: {reason}"
                );
                let mut shard = self.shard_mut(digest);
                if shard.get(digest).is_some_and(|e| e.same_as(&entry)) {
                    shard.remove(digest);
                }
                None
            }
        }
    }

    /// Whether `digest` is indexed. Does not read or check its bytes.
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.shard(digest).contains_key(digest)
    }

    /// Caches a chunk's stored bytes (`record` describes them: flags, `comp_len`, `raw_len`,
    /// crc32, digest). A digest already present is left as it is. Evicts least recently used
    /// segments to stay within the budget, and more when the disk is full; `NoSpace` when
    /// nothing is left to evict.
    pub fn insert(&self, record: &ChunkRecord, stored: &[u8]) -> Result<(), CacheError> {
        let result = self.insert_entry(record, stored);
        if result.is_err() {
            self.counters
                .insert_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Drops `digest` from the index. Its bytes stay in their segment until it is evicted.
    pub fn remove(&self, digest: &[u8; 32]) {
        self.shard_mut(digest).remove(digest);
    }

    /// Deletes every segment and empties the index. Chunks already handed out stay readable.
    pub fn clear(&self) -> Result<(), CacheError> {
        let mut writer = self.writer();
        writer.active = None;
        let live = std::mem::take(&mut writer.live);
        for shard in self.index.iter() {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        let mut first_error = None;
        for state in live.into_values() {
            self.bytes_used.fetch_sub(state.len, Ordering::Relaxed);
            if let Err(e) = fs::remove_file(&state.segment.path) {
                if e.kind() != io::ErrorKind::NotFound && first_error.is_none() {
                    first_error = Some(io_err(&state.segment.path, "deleting a segment")(e));
                }
            }
        }
        info!(dir = %self.dir.display(), "chunk cache cleared");
        first_error.map_or(Ok(()), Err)
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let segments = self.writer().live.len() as u64;
        CacheStats {
            entries: self
                .index
                .iter()
                .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len() as u64)
                .sum(),
            segments,
            bytes_used: self.bytes_used.load(Ordering::Relaxed),
            budget_bytes: self.budget,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            inserts: c.inserts.load(Ordering::Relaxed),
            evicted_segments: c.evicted_segments.load(Ordering::Relaxed),
            evicted_bytes: c.evicted_bytes.load(Ordering::Relaxed),
            corrupt_entries: c.corrupt_entries.load(Ordering::Relaxed),
            insert_failures: c.insert_failures.load(Ordering::Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// The lock guards plain maps whose every update is a single insert or remove, so a panic
    /// elsewhere cannot leave them half-changed: a poisoned lock is taken over.
    fn shard(&self, digest: &[u8; 32]) -> std::sync::RwLockReadGuard<'_, IndexShard> {
        self.index[usize::from(digest[0]) % INDEX_SHARDS]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn shard_mut(&self, digest: &[u8; 32]) -> std::sync::RwLockWriteGuard<'_, IndexShard> {
        self.index[usize::from(digest[0]) % INDEX_SHARDS]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, Segments> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn touch(&self, segment: &Segment) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        segment.last_used.fetch_max(now, Ordering::Relaxed);
    }

    fn insert_entry(&self, record: &ChunkRecord, stored: &[u8]) -> Result<(), CacheError> {
        if let Some(entry) = self.shard(&record.digest).get(&record.digest) {
            self.touch(&entry.segment);
            return Ok(());
        }
        check_stored(record, stored).map_err(CacheError::Mismatch)?;
        let need = ENTRY_HEADER_LEN + stored.len() as u64;
        if need + SEGMENT_HEADER_LEN > self.budget {
            return Err(CacheError::TooLarge {
                digest: hex::encode(record.digest),
                size: need,
                budget: self.budget,
            });
        }
        let record = entry_record(record);

        let mut writer = self.writer();
        // Another thread may have inserted it while this one waited for the lock.
        if let Some(entry) = self.shard(&record.digest).get(&record.digest) {
            self.touch(&entry.segment);
            return Ok(());
        }
        let entry = self.append(&mut writer, &record, stored)?;
        self.shard_mut(&record.digest).insert(record.digest, entry);
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes one entry (an entry record and its checked stored bytes) to the active segment,
    /// making room first, and returns where it lives; the caller indexes it. When the disk is
    /// full, evicts and tries again until nothing is left to evict.
    fn append(
        &self,
        writer: &mut Segments,
        record: &ChunkRecord,
        stored: &[u8],
    ) -> Result<Entry, CacheError> {
        let header = encode_entry_header(record);
        let need = ENTRY_HEADER_LEN + stored.len() as u64;
        loop {
            let seq = self.make_room(writer, need)?;
            let state = writer
                .live
                .get_mut(&seq)
                .expect("make_room returns a live segment");
            let offset = state.len;
            let file = &state.segment.file;
            let written = file
                .write_all_at(&header, offset)
                .and_then(|()| file.write_all_at(stored, offset + ENTRY_HEADER_LEN));
            match written {
                Ok(()) => {
                    state.len += need;
                    state.digests.push(record.digest);
                    let entry = Entry {
                        segment: state.segment.clone(),
                        offset,
                        record: *record,
                    };
                    self.bytes_used.fetch_add(need, Ordering::Relaxed);
                    self.touch(&entry.segment);
                    return Ok(entry);
                }
                Err(e) => {
                    // Cut off what part of the entry was written, so the file stays a clean
                    // run of whole entries. If that fails too, the scan at the next open
                    // truncates the torn tail.
                    let _ = file.set_len(offset);
                    let path = state.segment.path.clone();
                    if !is_no_space(&e) {
                        return Err(io_err(&path, "writing an entry")(e));
                    }
                    // A fresh segment that is all the cache holds did not take the entry:
                    // evicting it (and starting another) cannot make room.
                    if offset <= SEGMENT_HEADER_LEN && writer.live.len() == 1 {
                        return Err(self.no_space(need));
                    }
                    warn!(segment = %path.display(), "chunk cache disk full: evicting a segment");
                    if self.evict_one(writer, "disk full").is_none() {
                        return Err(self.no_space(need));
                    }
                }
            }
        }
    }

    fn no_space(&self, needed: u64) -> CacheError {
        CacheError::NoSpace {
            dir: self.dir.clone(),
            needed,
        }
    }

    /// Makes the active segment one that can take a `need`-byte entry within the budget,
    /// evicting and starting segments as needed. Returns its sequence number.
    fn make_room(&self, writer: &mut Segments, need: u64) -> Result<u64, CacheError> {
        loop {
            if let Some(seq) = writer.active {
                let len = writer.live[&seq].len;
                // Seal it, unless it is empty: an entry larger than a segment gets one alone.
                if len > SEGMENT_HEADER_LEN && len + need > self.segment_size {
                    writer.active = None;
                }
            }
            let new_segment = if writer.active.is_none() {
                SEGMENT_HEADER_LEN
            } else {
                0
            };
            let used = self.bytes_used.load(Ordering::Relaxed);
            if used + need + new_segment > self.budget {
                // `insert` checked that the entry fits an empty cache, so this ends.
                if self.evict_one(writer, "over budget").is_none() {
                    return Err(self.no_space(need));
                }
                continue;
            }
            if let Some(seq) = writer.active {
                return Ok(seq);
            }
            match self.create_segment(writer) {
                Ok(seq) => return Ok(seq),
                Err(CacheError::Io { source, path, .. }) if is_no_space(&source) => {
                    warn!(segment = %path.display(), "chunk cache disk full: evicting a segment");
                    if self.evict_one(writer, "disk full").is_none() {
                        return Err(self.no_space(need));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn create_segment(&self, writer: &mut Segments) -> Result<u64, CacheError> {
        let seq = writer.next_seq;
        writer.next_seq += 1;
        let path = self.segments_dir.join(segment_name(seq));
        // Chunks of private images: root's alone, whatever the directory's mode.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path, "creating a segment"))?;
        if let Err(e) = file.write_all_at(&segment_header(), 0) {
            let _ = fs::remove_file(&path);
            return Err(io_err(&path, "writing a segment header")(e));
        }
        debug!(segment = %path.display(), "started cache segment");
        let segment = Arc::new(Segment {
            seq,
            path,
            file,
            last_used: AtomicU64::new(0),
        });
        self.touch(&segment);
        writer.live.insert(
            seq,
            SegmentState {
                segment,
                len: SEGMENT_HEADER_LEN,
                digests: Vec::new(),
            },
        );
        self.bytes_used
            .fetch_add(SEGMENT_HEADER_LEN, Ordering::Relaxed);
        writer.active = Some(seq);
        Ok(seq)
    }

    /// Evicts the least recently used sealed segment, or the active one when it is the only
    /// one left. `None` when there are no segments.
    fn evict_one(&self, writer: &mut Segments, why: &str) -> Option<Dropped> {
        let victim = writer
            .live
            .values()
            .filter(|s| Some(s.segment.seq) != writer.active)
            .min_by_key(|s| s.segment.last_used.load(Ordering::Relaxed))
            .map(|s| s.segment.seq)
            .or(writer.active)?;
        self.evict(writer, victim, why)
    }

    fn evict(&self, writer: &mut Segments, seq: u64, why: &str) -> Option<Dropped> {
        let dropped = self.drop_segment(writer, seq)?;
        self.counters
            .evicted_segments
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(dropped.bytes, Ordering::Relaxed);
        info!(
            segment = %dropped.path.display(),
            entries = dropped.entries,
            bytes = dropped.bytes,
            "evicted least recently used cache segment ({why})"
        );
        Some(dropped)
    }

    /// Takes segment `seq` out of the cache: its entries leave the index and its file is
    /// deleted. Readers that looked its entries up keep reading them: an unlinked file stays
    /// readable through its open descriptor, and its space is freed when the last `Entry` goes.
    fn drop_segment(&self, writer: &mut Segments, seq: u64) -> Option<Dropped> {
        let state = writer.live.remove(&seq)?;
        if writer.active == Some(seq) {
            writer.active = None;
        }
        let mut by_shard: Vec<Vec<[u8; 32]>> = vec![Vec::new(); INDEX_SHARDS];
        for digest in &state.digests {
            by_shard[usize::from(digest[0]) % INDEX_SHARDS].push(*digest);
        }
        let mut entries = 0;
        for (shard, digests) in self.index.iter().zip(by_shard) {
            if digests.is_empty() {
                continue;
            }
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            for digest in digests {
                if shard
                    .get(&digest)
                    .is_some_and(|e| Arc::ptr_eq(&e.segment, &state.segment))
                {
                    shard.remove(&digest);
                    entries += 1;
                }
            }
        }
        let path = state.segment.path.clone();
        let delete_error = match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                warn!(segment = %path.display(), "cannot delete cache segment: {e}");
                Some(e)
            }
            _ => None,
        };
        self.bytes_used.fetch_sub(state.len, Ordering::Relaxed);
        Some(Dropped {
            entries,
            bytes: state.len,
            path,
            delete_error,
        })
    }

    /// Drops every entry whose digest `keep` rejects, and frees their disk space: a segment
    /// left with no live entry is deleted, and one whose live entries fill less than half of
    /// its entry area is compacted (its live entries are copied to the active segment, then
    /// the file is deleted). Also reclaims space left by entries dropped earlier (corrupt,
    /// removed, superseded), so `retain(&|_| true)` is a plain compaction.
    ///
    /// Safe beside readers, as eviction is: a deleted segment stays readable through the
    /// descriptor of entries already looked up, and a compacted entry is re-indexed to its
    /// copy only after the copy is written. `keep` is called with no lock held. `get`s never
    /// wait; inserts wait while one segment is dealt with.
    pub fn retain(&self, keep: &dyn Fn(&[u8; 32]) -> bool) -> Result<RetainReport, CacheError> {
        let mut report = RetainReport::default();
        for shard in self.index.iter() {
            let entries: Vec<([u8; 32], Entry)> = shard
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(digest, entry)| (*digest, entry.clone()))
                .collect();
            let rejected: Vec<_> = entries
                .into_iter()
                .filter(|(digest, _)| !keep(digest))
                .collect();
            if rejected.is_empty() {
                continue;
            }
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            for (digest, entry) in rejected {
                // Unless it changed meanwhile (dropped as corrupt, or re-inserted elsewhere).
                if shard.get(&digest).is_some_and(|e| e.same_as(&entry)) {
                    shard.remove(&digest);
                    report.removed_chunks += 1;
                }
            }
        }
        let seqs: Vec<u64> = self.writer().live.keys().copied().collect();
        for seq in seqs {
            let mut writer = self.writer();
            // Only writer-lock holders change `bytes_used`, so this is what dealing with this
            // segment freed (net of the copies written).
            let before = self.bytes_used.load(Ordering::Relaxed);
            let result = self.reclaim(&mut writer, seq, &mut report);
            let after = self.bytes_used.load(Ordering::Relaxed);
            report.freed_bytes += before.saturating_sub(after);
            result?;
        }
        report.kept_chunks = self.stats().entries;
        info!(
            dir = %self.dir.display(),
            kept = report.kept_chunks,
            removed = report.removed_chunks,
            freed_bytes = report.freed_bytes,
            deleted = report.segments_deleted,
            compacted = report.segments_compacted,
            "chunk cache garbage collected"
        );
        Ok(report)
    }

    /// Deletes segment `seq` if no entry in it is live, compacts it if its live entries fill
    /// less than half of its entry area, or leaves it.
    fn reclaim(
        &self,
        writer: &mut Segments,
        seq: u64,
        report: &mut RetainReport,
    ) -> Result<(), CacheError> {
        let Some(state) = writer.live.get(&seq) else {
            // Evicted since the list was taken.
            return Ok(());
        };
        let live = self.live_entries(state);
        if live.is_empty() {
            let dropped = self.drop_segment(writer, seq).expect("the segment is live");
            report.segments_deleted += 1;
            return dropped.deleted();
        }
        let live_bytes: u64 = live.iter().map(|e| e.end() - e.offset).sum();
        if live_bytes * 2 >= state.len - SEGMENT_HEADER_LEN {
            return Ok(());
        }
        // Out of the live set first, so making room for the copies never evicts it; its
        // bytes leave the budget now, as the copies are at most half of them.
        let state = writer.live.remove(&seq).expect("the segment is live");
        if writer.active == Some(seq) {
            writer.active = None;
        }
        self.bytes_used.fetch_sub(state.len, Ordering::Relaxed);
        for old in &live {
            let digest = old.record.digest;
            let bytes = match read_entry(old) {
                Ok(bytes) => bytes,
                Err(Unservable::Unreadable(e)) => {
                    // Entries not yet copied stay where they are: the segment goes back.
                    let path = state.segment.path.clone();
                    self.bytes_used.fetch_add(state.len, Ordering::Relaxed);
                    writer.live.insert(seq, state);
                    return Err(io_err(&path, "reading a segment to compact")(e));
                }
                Err(Unservable::Corrupt(reason)) => {
                    warn!(
                        digest = %hex::encode(digest),
                        segment = %state.segment.path.display(),
                        offset = old.offset,
                        "dropping cached chunk while compacting: {reason}"
                    );
                    self.counters
                        .corrupt_entries
                        .fetch_add(1, Ordering::Relaxed);
                    let mut shard = self.shard_mut(&digest);
                    if shard.get(&digest).is_some_and(|e| e.same_as(old)) {
                        shard.remove(&digest);
                        report.removed_chunks += 1;
                    }
                    continue;
                }
            };
            match self.append(writer, &old.record, &bytes) {
                Ok(copy) => {
                    let mut shard = self.shard_mut(&digest);
                    if shard.get(&digest).is_some_and(|e| e.same_as(old)) {
                        shard.insert(digest, copy);
                    }
                }
                Err(e) => {
                    // Entries not yet copied stay where they are: the segment goes back.
                    self.bytes_used.fetch_add(state.len, Ordering::Relaxed);
                    writer.live.insert(seq, state);
                    return Err(e);
                }
            }
        }
        report.segments_compacted += 1;
        debug!(
            segment = %state.segment.path.display(),
            entries = live.len(),
            "compacted cache segment"
        );
        fs::remove_file(&state.segment.path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(io_err(&state.segment.path, "deleting a compacted segment"))
    }

    /// The indexed entries that live in `state`'s segment, each once.
    fn live_entries(&self, state: &SegmentState) -> Vec<Entry> {
        let mut seen = HashSet::new();
        state
            .digests
            .iter()
            .filter(|d| seen.insert(**d))
            .filter_map(|d| {
                self.shard(d)
                    .get(d)
                    .filter(|e| Arc::ptr_eq(&e.segment, &state.segment))
                    .cloned()
            })
            .collect()
    }

    /// Evicts whole segments, least recently used first, until at most `target_bytes` of
    /// segment files are left (all of them, for a target of 0).
    pub fn evict_to(&self, target_bytes: u64) -> Result<RetainReport, CacheError> {
        let mut writer = self.writer();
        let mut report = RetainReport::default();
        let mut first_error = None;
        while self.bytes_used.load(Ordering::Relaxed) > target_bytes {
            let Some(dropped) = self.evict_one(&mut writer, "garbage collection") else {
                break;
            };
            report.removed_chunks += dropped.entries;
            report.freed_bytes += dropped.bytes;
            report.segments_deleted += 1;
            if let Err(e) = dropped.deleted() {
                first_error.get_or_insert(e);
            }
        }
        drop(writer);
        report.kept_chunks = self.stats().entries;
        first_error.map_or(Ok(report), Err)
    }

    /// Scans every segment file into the index, oldest first, then evicts down to the budget
    /// and resumes appending to the newest segment if it has room.
    fn load_segments(&self) -> Result<(), CacheError> {
        let dir = &self.segments_dir;
        let mut seqs = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err(dir, "listing segments"))? {
            let item = item.map_err(io_err(dir, "listing segments"))?;
            match item.file_name().to_str().and_then(parse_segment_name) {
                Some(seq) => seqs.push(seq),
                None => debug!(file = ?item.path(), "not a cache segment; ignored"),
            }
        }
        seqs.sort_unstable();

        let mut writer = self.writer();
        for seq in seqs {
            writer.next_seq = seq.saturating_add(1);
            let path = dir.join(segment_name(seq));
            let Some((mut state, entries)) = self.load_segment(seq, path)? else {
                continue;
            };
            // Segments opened now rank by age: the newest is the most recently used.
            self.touch(&state.segment);
            state.digests = entries.iter().map(|e| e.record.digest).collect();
            for entry in entries {
                // A digest in two segments was dropped from the older one and re-inserted:
                // the newer entry wins.
                self.shard_mut(&entry.record.digest)
                    .insert(entry.record.digest, entry);
            }
            self.bytes_used.fetch_add(state.len, Ordering::Relaxed);
            writer.live.insert(seq, state);
        }
        // The budget may have shrunk since the last run.
        while self.bytes_used.load(Ordering::Relaxed) > self.budget
            && self.evict_one(&mut writer, "over budget at open").is_some()
        {}
        if let Some((&seq, newest)) = writer.live.last_key_value() {
            if newest.len < self.segment_size {
                writer.active = Some(seq);
            }
        }
        let entries: usize = self
            .index
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum();
        info!(
            dir = %self.dir.display(),
            entries,
            segments = writer.live.len(),
            bytes = self.bytes_used.load(Ordering::Relaxed),
            budget = self.budget,
            "chunk cache opened"
        );
        Ok(())
    }

    /// Opens and scans one segment file. A bad segment header deletes the file (`None`); a torn
    /// tail is truncated away.
    fn load_segment(
        &self,
        seq: u64,
        path: PathBuf,
    ) -> Result<Option<(SegmentState, Vec<Entry>)>, CacheError> {
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Err(e) if is_read_only(&e) => File::open(&path),
            opened => opened,
        }
        .map_err(io_err(&path, "opening a segment"))?;
        let file_len = file
            .metadata()
            .map_err(io_err(&path, "opening a segment"))?
            .len();
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        if file_len < SEGMENT_HEADER_LEN
            || file.read_exact_at(&mut header, 0).is_err()
            || header != segment_header()
        {
            warn!(segment = %path.display(), bytes = file_len, "cache segment has no valid header (torn at creation, or another version): deleted");
            drop(file);
            match fs::remove_file(&path) {
                Err(e) if !is_read_only(&e) => {
                    return Err(io_err(&path, "deleting a bad segment")(e));
                }
                _ => return Ok(None),
            }
        }
        let scan = scan_entries(&file, file_len).map_err(io_err(&path, "scanning a segment"))?;
        if let Some(reason) = &scan.torn {
            warn!(
                segment = %path.display(),
                at = scan.len,
                dropped_bytes = file_len - scan.len,
                "cache segment has a torn tail ({reason}): truncated at the last whole entry"
            );
            // On a read-only disk the tail stays, unindexed.
            match file.set_len(scan.len) {
                Err(e) if !is_read_only(&e) => {
                    return Err(io_err(&path, "truncating a torn segment")(e));
                }
                _ => {}
            }
        }
        let segment = Arc::new(Segment {
            seq,
            path,
            file,
            last_used: AtomicU64::new(0),
        });
        let entries = scan
            .entries
            .into_iter()
            .map(|(offset, record)| Entry {
                segment: segment.clone(),
                offset,
                record,
            })
            .collect();
        let state = SegmentState {
            segment,
            len: scan.len,
            digests: Vec::new(),
        };
        Ok(Some((state, entries)))
    }
}

/// The whole entries at the start of a segment's entry area.
struct Scan {
    /// Offset and record of each entry.
    entries: Vec<(u64, ChunkRecord)>,
    /// Where the last whole entry ends.
    len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    torn: Option<String>,
}

/// Reads the entry headers of a segment whose header checked out. Every length is checked
/// against the file before use, so no content makes this panic or allocate by a length field.
fn scan_entries(file: &File, file_len: u64) -> io::Result<Scan> {
    let mut entries = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    let mut header = [0u8; ENTRY_HEADER_LEN as usize];
    let torn = loop {
        if at == file_len {
            break None;
        }
        if file_len - at < ENTRY_HEADER_LEN {
            break Some(format!("{} bytes of an entry header", file_len - at));
        }
        file.read_exact_at(&mut header, at)?;
        let Some(record) = decode_entry_header(&header) else {
            break Some("bad entry header".to_string());
        };
        let end = at + ENTRY_HEADER_LEN + u64::from(record.comp_len);
        if end > file_len {
            break Some(format!(
                "entry of {} bytes runs past the end of the file",
                record.comp_len
            ));
        }
        entries.push((at, record));
        at = end;
    };
    Ok(Scan {
        entries,
        len: at,
        torn,
    })
}

/// Checks an indexed entry on disk and returns its payload, read with positioned reads into a
/// buffer of its own. Reads only after fstat shows the file still covers the entry.
fn read_entry(entry: &Entry) -> Result<Vec<u8>, Unservable> {
    let file = &entry.segment.file;
    let end = entry.end();
    let file_len = file.metadata().map_err(Unservable::Unreadable)?.len();
    if file_len < end {
        return Err(Unservable::Corrupt(format!(
            "segment is {file_len} bytes but the entry ends at {end} (truncated)"
        )));
    }
    will_need(file, entry.offset, end - entry.offset);
    let read = |buf: &mut [u8], at: u64| match file.read_exact_at(buf, at) {
        Ok(()) => Ok(()),
        // Cut since the fstat above (another process: this one only appends).
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Unservable::Corrupt(format!(
            "segment ends inside the entry at {at} (truncated while read)"
        ))),
        Err(e) => Err(Unservable::Unreadable(e)),
    };
    let mut header = [0u8; ENTRY_HEADER_LEN as usize];
    read(&mut header, entry.offset)?;
    if header != encode_entry_header(&entry.record) {
        return Err(Unservable::Corrupt("entry header changed on disk".into()));
    }
    // The length is the index's, which the scan at open checked against the file.
    let mut payload = vec![0u8; entry.record.comp_len as usize];
    read(&mut payload, entry.offset + ENTRY_HEADER_LEN)?;
    let crc = crc32fast::hash(&payload);
    if crc != entry.record.crc32 {
        return Err(Unservable::Corrupt(format!(
            "payload crc32 {crc:08x}, expected {:08x}",
            entry.record.crc32
        )));
    }
    Ok(payload)
}

/// Starts reading `len` bytes at `offset` of `file` into the page cache, all at once, rather
/// than one readahead window after another as the reads that follow reach them (a cold 1 MiB
/// entry is several windows). Only advice: failing costs speed, never correctness.
fn will_need(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise reads no memory of ours; a bad descriptor or range is an error
    // return, which is ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// Whether `e` says the file system is mounted read-only.
fn is_read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EROFS)
}

/// Takes the directory's exclusive lock and records this process as its holder.
///
/// On a read-only file system the lock is taken on the directory itself and no holder is
/// recorded: the cache then serves what it holds and caches nothing new.
fn take_lock(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join("lock");
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path);
    let (file, writable) = match opened {
        Ok(file) => (file, true),
        Err(e) if is_read_only(&e) => {
            warn!(dir = %dir.display(), "the cache directory is read-only: serving the chunks it holds, caching nothing new");
            let file = File::open(dir).map_err(io_err(dir, "opening the cache directory"))?;
            (file, false)
        }
        Err(e) => return Err(io_err(&path, "opening the lock file")(e)),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            return Err(CacheError::Locked {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_err(&path, "locking the cache")(e)),
    }
    if !writable {
        return Ok(file);
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .map_err(io_err(&path, "writing the lock file"))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusefs::chunk::{decode_chunk, decode_with, encode_chunk, Checks, DEFAULT_ZSTD_LEVEL};
    use fusefs::format::CHUNK_UNCOMPRESSED;
    use std::collections::HashSet;
    use std::sync::Barrier;

    /// A chunk as the fetcher would hand it to the cache: its record and stored bytes, plus
    /// the raw bytes to compare decoded hits against.
    struct TestChunk {
        record: ChunkRecord,
        stored: Vec<u8>,
        raw: Vec<u8>,
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
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
    fn chunk(seed: u64, len: usize, compressible: bool) -> TestChunk {
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

    fn open(dir: &Path, budget: u64) -> ChunkCache {
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
    fn assert_served(cache: &ChunkCache, c: &TestChunk) {
        let hit = cache.get(&c.record.digest).expect("chunk is cached");
        assert_eq!(&*hit.bytes, &c.stored[..]);
        assert_eq!(hit.record, entry_record(&c.record));
        assert_eq!(decode_chunk(&hit.record, &hit.bytes).unwrap(), c.raw);
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir.join("segments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn cache_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChunkCache>();
        check::<CachedChunk>();
    }

    #[test]
    fn encoded_chunks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 * MIB);
        let packed = chunk(1, 200_000, true);
        let raw = chunk(2, 100_000, false);
        assert_eq!(packed.record.flags, 0);
        assert_eq!(raw.record.flags, CHUNK_UNCOMPRESSED);
        assert!(cache.get(&packed.record.digest).is_none());
        cache.insert(&packed.record, &packed.stored).unwrap();
        cache.insert(&raw.record, &raw.stored).unwrap();
        assert!(cache.contains(&packed.record.digest));
        assert_served(&cache, &packed);
        assert_served(&cache, &raw);

        // A second insert of a digest already present writes nothing.
        let before = cache.stats();
        cache.insert(&packed.record, &packed.stored).unwrap();
        let after = cache.stats();
        assert_eq!(after.inserts, 2);
        assert_eq!(after.bytes_used, before.bytes_used);

        let stats = cache.stats();
        assert_eq!(stats.entries, 2);
        assert_eq!(stats.hits, 2);
        assert_eq!(stats.misses, 1);
        assert_eq!(
            stats.bytes_used,
            SEGMENT_HEADER_LEN
                + 2 * ENTRY_HEADER_LEN
                + (packed.stored.len() + raw.stored.len()) as u64
        );
        assert_eq!(
            stats.bytes_used,
            segment_files(dir.path())
                .iter()
                .map(|p| file_len(p))
                .sum::<u64>()
        );
        assert_eq!(stats.budget_bytes, 64 * MIB);
    }

    #[test]
    fn the_cache_is_roots_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("chunks");
        // An older lazyd left the directory open to everyone.
        fs::create_dir_all(&cache_dir).unwrap();
        fs::set_permissions(&cache_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let cache = open(&cache_dir, 64 * MIB);
        let c = chunk(1, 10_000, true);
        cache.insert(&c.record, &c.stored).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache_dir), 0o700);
        assert_eq!(mode(&cache_dir.join("segments")), 0o700);
        let segments = segment_files(&cache_dir);
        assert!(!segments.is_empty());
        for segment in segments {
            assert_eq!(mode(&segment), 0o600, "{}", segment.display());
        }
    }

    #[test]
    fn entries_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<TestChunk> = (0..10).map(|i| chunk(i, 50_000, i % 2 == 0)).collect();
        let used = {
            let cache = open(dir.path(), 64 * MIB);
            for c in &chunks[..6] {
                cache.insert(&c.record, &c.stored).unwrap();
            }
            cache.stats().bytes_used
        };
        let cache = open(dir.path(), 64 * MIB);
        let stats = cache.stats();
        assert_eq!(stats.entries, 6);
        assert_eq!(stats.bytes_used, used);
        for c in &chunks[..6] {
            assert_served(&cache, c);
        }
        // The newest segment had room, so appending resumes in it.
        for c in &chunks[6..] {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        assert_eq!(segment_files(dir.path()).len(), 1);
        drop(cache);
        let cache = open(dir.path(), 64 * MIB);
        for c in &chunks {
            assert_served(&cache, c);
        }
    }

    #[test]
    fn flipped_payload_byte_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 * MIB);
        let a = chunk(1, 40_000, true);
        let b = chunk(2, 40_000, false);
        cache.insert(&a.record, &a.stored).unwrap();
        cache.insert(&b.record, &b.stored).unwrap();
        assert_served(&cache, &a);

        // Flip one byte in the middle of `a`'s payload, behind the cache's back.
        let seg = &segment_files(dir.path())[0];
        let file = OpenOptions::new().read(true).write(true).open(seg).unwrap();
        let at = SEGMENT_HEADER_LEN + ENTRY_HEADER_LEN + a.stored.len() as u64 / 2;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();

        assert!(cache.get(&a.record.digest).is_none());
        assert!(!cache.contains(&a.record.digest));
        let stats = cache.stats();
        assert_eq!(stats.corrupt_entries, 1);
        assert_eq!(stats.entries, 1);
        assert_served(&cache, &b);

        // The caller refetches and re-inserts: it is served again, from a fresh copy.
        cache.insert(&a.record, &a.stored).unwrap();
        assert_served(&cache, &a);
        drop(cache);
        // After a restart the good copy wins over the corrupt one.
        let cache = open(dir.path(), 64 * MIB);
        assert_served(&cache, &a);
        assert_served(&cache, &b);
    }

    #[test]
    fn corrupt_entry_header_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 * MIB);
        let a = chunk(1, 40_000, true);
        cache.insert(&a.record, &a.stored).unwrap();
        let seg = &segment_files(dir.path())[0];
        let file = OpenOptions::new().write(true).open(seg).unwrap();
        // Overwrite the raw length in the header: the payload still checks out, the header not.
        file.write_all_at(&[0xff], SEGMENT_HEADER_LEN + 12).unwrap();
        assert!(cache.get(&a.record.digest).is_none());
        assert_eq!(cache.stats().corrupt_entries, 1);
    }

    #[test]
    fn segment_truncated_while_open_is_a_miss_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 * MIB);
        let chunks: Vec<TestChunk> = (0..8).map(|i| chunk(i, 30_000, false)).collect();
        for c in &chunks {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        // Read the segment, then cut it after the second entry (as another process could):
        // later entries lie past its end.
        assert_served(&cache, &chunks[7]);
        let entry_len = ENTRY_HEADER_LEN + chunks[0].stored.len() as u64;
        let seg = &segment_files(dir.path())[0];
        OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(SEGMENT_HEADER_LEN + 2 * entry_len + 10)
            .unwrap();
        for c in &chunks[2..] {
            assert!(cache.get(&c.record.digest).is_none());
        }
        assert_served(&cache, &chunks[0]);
        assert_served(&cache, &chunks[1]);
        let stats = cache.stats();
        assert_eq!(stats.corrupt_entries, 6);
        assert_eq!(stats.entries, 2);
    }

    #[test]
    fn garbage_tail_is_truncated_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<TestChunk> = (0..3).map(|i| chunk(i, 30_000, true)).collect();
        let used = {
            let cache = open(dir.path(), 64 * MIB);
            for c in &chunks {
                cache.insert(&c.record, &c.stored).unwrap();
            }
            cache.stats().bytes_used
        };
        let seg = segment_files(dir.path()).remove(0);
        let mut garbage = fs::read(&seg).unwrap();
        garbage.extend_from_slice(&noise(9, 1000));
        fs::write(&seg, &garbage).unwrap();

        let cache = open(dir.path(), 64 * MIB);
        assert_eq!(file_len(&seg), used);
        assert_eq!(cache.stats().bytes_used, used);
        for c in &chunks {
            assert_served(&cache, c);
        }
    }

    #[test]
    fn torn_last_entry_is_dropped_and_truncated_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<TestChunk> = (0..3).map(|i| chunk(i, 30_000, false)).collect();
        {
            let cache = open(dir.path(), 64 * MIB);
            for c in &chunks {
                cache.insert(&c.record, &c.stored).unwrap();
            }
        }
        let entry_len = ENTRY_HEADER_LEN + chunks[0].stored.len() as u64;
        let two_entries = SEGMENT_HEADER_LEN + 2 * entry_len;
        let seg = segment_files(dir.path()).remove(0);
        // A crash halfway through writing the third entry's payload.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(two_entries + entry_len / 2)
            .unwrap();

        let cache = open(dir.path(), 64 * MIB);
        assert_eq!(file_len(&seg), two_entries);
        assert_eq!(cache.stats().entries, 2);
        assert_served(&cache, &chunks[0]);
        assert_served(&cache, &chunks[1]);
        assert!(cache.get(&chunks[2].record.digest).is_none());
        cache.insert(&chunks[2].record, &chunks[2].stored).unwrap();
        assert_served(&cache, &chunks[2]);
    }

    #[test]
    fn hostile_segment_files_are_dropped_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = chunk(1, 20_000, true);
        {
            let cache = open(dir.path(), 64 * MIB);
            cache.insert(&good.record, &good.stored).unwrap();
        }
        let segs = dir.path().join("segments");
        // An entry header with a valid crc that claims a 4 GiB payload.
        let mut huge = entry_record(&good.record);
        huge.comp_len = u32::MAX;
        huge.digest[0] ^= 1;
        let mut lying = segment_header().to_vec();
        lying.extend_from_slice(&encode_entry_header(&huge));
        lying.extend_from_slice(&[0u8; 100]);
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("0000000000000010.seg", Vec::new()),
            ("0000000000000011.seg", b"LAZYSEG".to_vec()),
            ("0000000000000012.seg", noise(5, 100_000)),
            ("0000000000000013.seg", lying),
            ("0000000000000014.seg", {
                let mut v = segment_header().to_vec();
                v.extend_from_slice(&[0xffu8; 63]);
                v
            }),
            ("0000000000000015.seg", {
                let mut v = segment_header().to_vec();
                v[8] = 2; // a future version
                v
            }),
            ("not-a-segment.txt", b"hello".to_vec()),
        ];
        for (name, bytes) in &files {
            fs::write(segs.join(name), bytes).unwrap();
        }

        let cache = open(dir.path(), 64 * MIB);
        assert_eq!(cache.stats().entries, 1);
        assert_served(&cache, &good);
        assert!(!cache.contains(&huge.digest));
        // Headerless segments are deleted; segments with a good header keep just the header.
        for name in [
            "0000000000000010.seg",
            "0000000000000011.seg",
            "0000000000000012.seg",
            "0000000000000015.seg",
        ] {
            assert!(!segs.join(name).exists(), "{name} kept");
        }
        for name in ["0000000000000013.seg", "0000000000000014.seg"] {
            assert_eq!(file_len(&segs.join(name)), SEGMENT_HEADER_LEN, "{name}");
        }
        assert!(segs.join("not-a-segment.txt").exists());
        // New segments are numbered after the highest one seen.
        let next = chunk(2, 20_000, true);
        cache.insert(&next.record, &next.stored).unwrap();
        assert_served(&cache, &next);
    }

    #[test]
    fn budget_is_kept_by_evicting_least_recently_used_segments() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MIB;
        let cache = open(dir.path(), budget);
        // 256 KiB segments (budget / 4); 4 entries of 60 KiB fill one.
        assert_eq!(cache.segment_size, 256 << 10);
        let chunks: Vec<TestChunk> = (0..40).map(|i| chunk(i, 60 << 10, false)).collect();
        for c in &chunks[..16] {
            cache.insert(&c.record, &c.stored).unwrap();
            assert!(cache.stats().bytes_used <= budget);
        }
        // Four full segments: [0..4) [4..8) [8..12) [12..16). Reading chunk 1 makes the
        // oldest segment the most recently used. Chunk 16 still fits, in a fifth segment;
        // chunk 17 does not, and evicts [4..8) rather than the older [0..4).
        assert_eq!(cache.stats().segments, 4);
        assert_served(&cache, &chunks[1]);
        for c in &chunks[16..18] {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        let stats = cache.stats();
        assert_eq!(stats.evicted_segments, 1);
        assert_eq!(stats.segments, 4);
        assert!(stats.bytes_used <= budget);
        for c in &chunks[..4] {
            assert_served(&cache, c);
        }
        for c in &chunks[4..8] {
            assert!(!cache.contains(&c.record.digest));
        }
        // Keep going: usage stays bounded and the newest entries are always there.
        for (i, c) in chunks.iter().enumerate().skip(18) {
            cache.insert(&c.record, &c.stored).unwrap();
            assert!(cache.stats().bytes_used <= budget);
            assert_served(&cache, c);
            assert!(cache.contains(&chunks[i - 1].record.digest));
        }
        let stats = cache.stats();
        assert!(stats.evicted_segments >= 6, "{stats:?}");
        assert_eq!(
            stats.bytes_used,
            segment_files(dir.path())
                .iter()
                .map(|p| file_len(p))
                .sum::<u64>()
        );
        assert!(stats.evicted_bytes > 0);
    }

    #[test]
    fn smaller_budget_at_reopen_evicts_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<TestChunk> = (0..16).map(|i| chunk(i, 60 << 10, false)).collect();
        {
            let cache = open(dir.path(), MIB);
            for c in &chunks {
                cache.insert(&c.record, &c.stored).unwrap();
            }
        }
        let cache = open(dir.path(), MIB / 2);
        let stats = cache.stats();
        assert!(stats.bytes_used <= MIB / 2, "{stats:?}");
        assert!(!cache.contains(&chunks[0].record.digest));
        assert_served(&cache, &chunks[15]);
    }

    #[test]
    fn oversized_and_mismatched_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 << 10);
        let big = chunk(1, 100_000, false);
        let err = cache.insert(&big.record, &big.stored).unwrap_err();
        assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
        assert!(err.is_permanent());

        let small = chunk(2, 1000, false);
        let mut wrong = small.stored.clone();
        wrong[0] ^= 1;
        let err = cache.insert(&small.record, &wrong).unwrap_err();
        assert!(
            matches!(err, CacheError::Mismatch(ChunkError::Crc { .. })),
            "{err}"
        );
        let err = cache.insert(&small.record, &small.stored[1..]).unwrap_err();
        assert!(
            matches!(err, CacheError::Mismatch(ChunkError::Length { .. })),
            "{err}"
        );

        let stats = cache.stats();
        assert_eq!(stats.insert_failures, 3);
        assert_eq!(stats.entries, 0);
        assert_eq!(stats.bytes_used, 0);
    }

    fn disk_bytes(dir: &Path) -> u64 {
        segment_files(dir).iter().map(|p| file_len(p)).sum()
    }

    /// Fills `cache` (1 MiB segments) with 60 KiB incompressible chunks: two full segments
    /// and an active one with three entries fewer. Returns them and the entries per segment.
    fn three_segments(cache: &ChunkCache) -> (Vec<TestChunk>, usize) {
        assert_eq!(cache.segment_size, MIB);
        let per = ((MIB - SEGMENT_HEADER_LEN) / (ENTRY_HEADER_LEN + (60 << 10))) as usize;
        let chunks: Vec<TestChunk> = (0..3 * per as u64 - 3)
            .map(|i| chunk(i, 60 << 10, false))
            .collect();
        for c in &chunks {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        assert_eq!(cache.stats().segments, 3);
        (chunks, per)
    }

    #[test]
    fn retain_keeps_exactly_the_kept_chunks_and_frees_their_space() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 4 * MIB);
        let (chunks, per) = three_segments(&cache);
        let before = disk_bytes(dir.path());
        assert_eq!(cache.stats().bytes_used, before);
        // Segment 0: nothing kept (deleted). Segment 1: 3 kept (compacted). Segment 2, the
        // active one: all kept (left as it is, and it takes the copies).
        let kept: HashSet<[u8; 32]> = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| (per..per + 3).contains(i) || *i >= 2 * per)
            .map(|(_, c)| c.record.digest)
            .collect();
        let n_kept = kept.len() as u64;
        // A reader holding a chunk of a segment about to be deleted keeps valid bytes.
        let held = cache.get(&chunks[per + 5].record.digest).unwrap();
        let report = cache.retain(&|d| kept.contains(d)).unwrap();
        assert_eq!(&*held.bytes, &chunks[per + 5].stored[..]);

        assert_eq!(report.kept_chunks, n_kept);
        assert_eq!(report.removed_chunks, chunks.len() as u64 - n_kept);
        assert_eq!(report.segments_deleted, 1);
        assert_eq!(report.segments_compacted, 1);
        let after = disk_bytes(dir.path());
        assert_eq!(report.freed_bytes, before - after);
        assert_eq!(cache.stats().bytes_used, after);
        let entry = ENTRY_HEADER_LEN + (60 << 10);
        assert_eq!(after, n_kept * entry + SEGMENT_HEADER_LEN);
        assert_eq!(
            segment_files(dir.path()).len(),
            1,
            "segment 2, now holding the copies"
        );
        for c in &chunks {
            if kept.contains(&c.record.digest) {
                assert_served(&cache, c);
            } else {
                assert!(!cache.contains(&c.record.digest));
            }
        }
        // The compacted copies survive a reopen; nothing else comes back.
        drop(cache);
        let cache = open(dir.path(), 4 * MIB);
        assert_eq!(cache.stats().entries, n_kept);
        for c in chunks.iter().filter(|c| kept.contains(&c.record.digest)) {
            assert_served(&cache, c);
        }
        // New inserts still work, and keeping everything changes nothing.
        let extra = chunk(100, 60 << 10, false);
        cache.insert(&extra.record, &extra.stored).unwrap();
        assert_served(&cache, &extra);
        let report = cache.retain(&|_| true).unwrap();
        assert_eq!(
            (
                report.kept_chunks,
                report.removed_chunks,
                report.freed_bytes
            ),
            (n_kept + 1, 0, 0)
        );
    }

    #[test]
    fn readers_during_retain_always_get_kept_chunks_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 4 * MIB);
        let chunks: Vec<TestChunk> = (0..45).map(|i| chunk(i, 60 << 10, false)).collect();
        for c in &chunks {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        // Keep one chunk in three: every segment is compacted while the readers run.
        let keep = |i: usize| i.is_multiple_of(3);
        let kept: HashSet<[u8; 32]> = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, c)| c.record.digest)
            .collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let report = std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        for (i, c) in chunks.iter().enumerate() {
                            match cache.get(&c.record.digest) {
                                Some(hit) => assert_eq!(&*hit.bytes, &c.stored[..]),
                                None => assert!(!keep(i), "kept chunk {i} went missing"),
                            }
                        }
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            let report = cache.retain(&|d| kept.contains(d)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            stop.store(true, Ordering::Relaxed);
            report
        });
        assert_eq!(report.kept_chunks, kept.len() as u64);
        assert!(report.segments_compacted >= 2, "{report:?}");
        assert_eq!(cache.stats().corrupt_entries, 0);
        for (i, c) in chunks.iter().enumerate() {
            if keep(i) {
                assert_served(&cache, c);
            } else {
                assert!(!cache.contains(&c.record.digest));
            }
        }
    }

    #[test]
    fn retain_reclaims_space_of_removed_entries_in_the_active_segment() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 * MIB);
        let chunks: Vec<TestChunk> = (0..10).map(|i| chunk(i, 50_000, false)).collect();
        for c in &chunks {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        for c in &chunks[..8] {
            cache.remove(&c.record.digest);
        }
        let before = disk_bytes(dir.path());
        let report = cache.retain(&|_| true).unwrap();
        assert_eq!((report.kept_chunks, report.segments_compacted), (2, 1));
        assert!(disk_bytes(dir.path()) < before / 4, "{report:?}");
        for c in &chunks[8..] {
            assert_served(&cache, c);
        }
        // The copies went to a fresh active segment, which takes new entries.
        let extra = chunk(50, 50_000, false);
        cache.insert(&extra.record, &extra.stored).unwrap();
        assert_served(&cache, &extra);
        assert_eq!(segment_files(dir.path()).len(), 1);
    }

    #[test]
    fn evict_to_drops_least_recently_used_segments_until_under_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 4 * MIB);
        let (chunks, per) = three_segments(&cache);
        // Segment 0 becomes the most recently used; segment 1 is then the oldest.
        assert_served(&cache, &chunks[0]);
        let target = 2 * MIB + MIB / 2;
        let report = cache.evict_to(target).unwrap();
        let stats = cache.stats();
        assert!(stats.bytes_used <= target, "{stats:?}");
        assert_eq!(stats.bytes_used, disk_bytes(dir.path()));
        assert_eq!(report.segments_deleted, 1);
        assert_eq!(report.removed_chunks, per as u64);
        assert_eq!(report.kept_chunks, (chunks.len() - per) as u64);
        assert_eq!(
            report.freed_bytes,
            per as u64 * (ENTRY_HEADER_LEN + (60 << 10)) + SEGMENT_HEADER_LEN
        );
        assert!(!cache.contains(&chunks[per].record.digest));
        assert_served(&cache, &chunks[0]);
        assert_served(&cache, chunks.last().unwrap());

        let report = cache.evict_to(0).unwrap();
        assert_eq!(report.kept_chunks, 0);
        assert_eq!(cache.stats().bytes_used, 0);
        assert!(segment_files(dir.path()).is_empty());
        cache.insert(&chunks[1].record, &chunks[1].stored).unwrap();
        assert_served(&cache, &chunks[1]);
    }

    #[test]
    fn second_open_of_a_locked_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), MIB);
        let err = ChunkCache::open(&CacheConfig {
            dir: dir.path().to_path_buf(),
            budget_bytes: MIB,
        })
        .unwrap_err();
        match &err {
            CacheError::Locked { dir: d, pid } => {
                assert_eq!(d, dir.path());
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        drop(cache);
        open(dir.path(), MIB);
    }

    #[test]
    fn remove_and_clear_forget_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 64 * MIB);
        let chunks: Vec<TestChunk> = (0..4).map(|i| chunk(i, 10_000, true)).collect();
        for c in &chunks {
            cache.insert(&c.record, &c.stored).unwrap();
        }
        cache.remove(&chunks[0].record.digest);
        assert!(cache.get(&chunks[0].record.digest).is_none());
        assert_served(&cache, &chunks[1]);

        // A chunk handed out before `clear` stays readable after its segment is deleted.
        let held = cache.get(&chunks[2].record.digest).unwrap();
        cache.clear().unwrap();
        assert_eq!(&*held.bytes, &chunks[2].stored[..]);
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes_used, stats.segments), (0, 0, 0));
        assert!(segment_files(dir.path()).is_empty());
        cache.insert(&chunks[3].record, &chunks[3].stored).unwrap();
        assert_served(&cache, &chunks[3]);
        drop(cache);
        let cache = open(dir.path(), 64 * MIB);
        assert_eq!(cache.stats().entries, 1);
        assert_served(&cache, &chunks[3]);
    }

    #[test]
    fn concurrent_inserts_and_gets_return_correct_bytes() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 24;
        let dir = tempfile::tempdir().unwrap();
        // Small enough that eviction runs while readers hold and check chunks.
        let cache = Arc::new(open(dir.path(), 2 * MIB));
        let chunks: Arc<Vec<TestChunk>> = Arc::new(
            (0..THREADS * PER_THREAD)
                .map(|i| chunk(i, 20_000 + (i as usize % 7) * 3000, i % 3 == 0))
                .collect(),
        );
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, chunks, barrier) = (cache.clone(), chunks.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut hits = 0u64;
                    for round in 0..PER_THREAD {
                        let mine = &chunks[(t * PER_THREAD + round) as usize];
                        cache.insert(&mine.record, &mine.stored).unwrap();
                        // Everyone also inserts a shared chunk, racing on the same digest.
                        let shared = &chunks[round as usize];
                        cache.insert(&shared.record, &shared.stored).unwrap();
                        for other in chunks.iter().step_by(5) {
                            if let Some(hit) = cache.get(&other.record.digest) {
                                assert_eq!(&*hit.bytes, &other.stored[..]);
                                assert_eq!(hit.record.digest, other.record.digest);
                                hits += 1;
                            }
                        }
                    }
                    hits
                })
            })
            .collect();
        let hits: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let stats = cache.stats();
        assert!(hits > 0);
        assert_eq!(stats.hits, hits);
        assert_eq!(stats.corrupt_entries, 0);
        assert_eq!(stats.insert_failures, 0);
        assert!(stats.bytes_used <= 2 * MIB, "{stats:?}");
        assert!(stats.evicted_segments > 0, "{stats:?}");
        // Every entry left in the index is intact, and a reopen agrees.
        let cached: Vec<&TestChunk> = chunks
            .iter()
            .filter(|c| cache.contains(&c.record.digest))
            .collect();
        assert!(!cached.is_empty());
        for c in &cached {
            assert_served(&cache, c);
        }
        drop(cache);
        let cache = open(dir.path(), 2 * MIB);
        for c in &cached {
            assert_served(&cache, c);
        }
    }

    #[test]
    fn entry_larger_than_the_free_disk_is_refused_not_retried_forever() {
        // Regression: a write that failed with ENOSPC in a fresh, otherwise empty segment used
        // to evict that segment, start another, fail again, and loop for ever.
        lazy_tests::mount::require_root();
        let dir = tempfile::tempdir().unwrap();
        let _mount = lazy_tests::mount::TmpfsMount::new(dir.path(), "1m").unwrap();
        let cache = open(&dir.path().join("cache"), 1 << 30);
        let big = chunk(1, 3 << 19, false);
        let started = std::time::Instant::now();
        let err = cache.insert(&big.record, &big.stored).unwrap_err();
        assert!(matches!(err, CacheError::NoSpace { .. }), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Smaller chunks still fit and are served.
        let small = chunk(2, 64 << 10, false);
        cache.insert(&small.record, &small.stored).unwrap();
        assert_served(&cache, &small);
    }

    #[test]
    fn full_disk_gives_no_space_and_never_wrong_bytes() {
        // A real full disk needs root to mount a small tmpfs; the test fails without it.
        lazy_tests::mount::require_root();
        let dir = tempfile::tempdir().unwrap();
        let _mount = lazy_tests::mount::TmpfsMount::new(dir.path(), "8m").unwrap();
        // A budget far over the 8 MiB the disk has: only ENOSPC stops the cache growing.
        let cache = open(&dir.path().join("cache"), 64 * MIB);
        let chunks: Vec<TestChunk> = (0..60).map(|i| chunk(i, 300 << 10, false)).collect();
        let (mut ok, mut no_space) = (0, 0);
        for c in &chunks {
            match cache.insert(&c.record, &c.stored) {
                Ok(()) => {
                    ok += 1;
                    assert_served(&cache, c);
                }
                Err(CacheError::NoSpace { .. }) => no_space += 1,
                Err(e) => panic!("unexpected error on a full disk: {e}"),
            }
        }
        let stats = cache.stats();
        assert_eq!(ok + no_space, chunks.len());
        assert!(ok > 0, "{stats:?}");
        // 60 x 300 KiB does not fit in 8 MiB: the disk filled and segments were evicted.
        assert!(stats.evicted_segments > 0, "{stats:?}");
        assert!(stats.bytes_used <= 8 * MIB, "{stats:?}");
        assert_eq!(stats.insert_failures, no_space as u64);
        for c in &chunks {
            if let Some(hit) = cache.get(&c.record.digest) {
                assert_eq!(&*hit.bytes, &c.stored[..]);
            }
        }
        assert!(stats.entries > 0);
        eprintln!("{ok} inserts stored, {no_space} refused for lack of space: {stats:?}");

        // Now leave nothing to gain from eviction: hold every segment file open (an evicted
        // segment keeps its disk space while a descriptor is open, as it does while a reader
        // has it) and fill the rest of the disk. Chunks read before stay intact.
        let held: Vec<(CachedChunk, &TestChunk)> = chunks
            .iter()
            .filter_map(|c| cache.get(&c.record.digest).map(|hit| (hit, c)))
            .collect();
        let pinned: Vec<File> = segment_files(&dir.path().join("cache"))
            .iter()
            .map(|p| File::open(p).unwrap())
            .collect();
        let ballast_path = dir.path().join("ballast");
        let mut ballast = File::create(&ballast_path).unwrap();
        for block in [64 << 10, 4 << 10, 1] {
            while io::Write::write_all(&mut ballast, &vec![0u8; block]).is_ok() {}
        }
        let extra = chunk(1000, 300 << 10, false);
        let err = cache.insert(&extra.record, &extra.stored).unwrap_err();
        assert!(matches!(err, CacheError::NoSpace { .. }), "{err}");
        assert!(!err.is_permanent());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.segments, stats.bytes_used), (0, 0, 0));
        for (hit, c) in &held {
            assert_eq!(&*hit.bytes, &c.stored[..]);
        }

        // Once space comes back, so does caching.
        drop(pinned);
        drop(ballast);
        fs::remove_file(&ballast_path).unwrap();
        cache.insert(&extra.record, &extra.stored).unwrap();
        assert_served(&cache, &extra);
        drop(cache);
    }

    /// The read path before (segments mapped, a chunk copied out of the mapping into its own
    /// buffer) against the one now (`pread` into the chunk's buffer), over 1 GiB of 1 MiB
    /// incompressible (raw) entries in 64 MiB segments, with the page cache cold (the segment
    /// files dropped from it with `POSIX_FADV_DONTNEED`) and hot. Every variant ends with the
    /// payload, crc32-checked, in a `Vec` of its own. `LAZY_CACHE_BENCH_MIB` changes the size.
    ///
    /// cargo test --release -p agent --lib cache::tests::read_path_benchmark -- --ignored --nocapture
    #[test]
    #[ignore = "benchmark: writes and reads 1 GiB"]
    fn read_path_benchmark() {
        use std::time::Instant;
        let mib: u64 = std::env::var("LAZY_CACHE_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let dir =
            tempfile::tempdir_in(std::env::var_os("TMPDIR").unwrap_or("/var/tmp".into())).unwrap();
        let cache = open(dir.path(), 2 * mib * MIB);
        let digests: Vec<[u8; 32]> = (0..mib)
            .map(|i| {
                let c = chunk(i, MIB as usize, false);
                assert_eq!(c.record.flags, CHUNK_UNCOMPRESSED);
                cache.insert(&c.record, &c.stored).unwrap();
                c.record.digest
            })
            .collect();
        let entries: Vec<Entry> = digests
            .iter()
            .map(|d| cache.shard(d).get(d).cloned().unwrap())
            .collect();
        let files: Vec<Arc<Segment>> = cache
            .writer()
            .live
            .values()
            .map(|s| s.segment.clone())
            .collect();
        for segment in &files {
            segment.file.sync_all().unwrap();
        }
        let maps: Mutex<HashMap<u64, memmap2::Mmap>> = Mutex::new(HashMap::new());
        let evict_page_cache = || {
            maps.lock().unwrap().clear();
            for segment in &files {
                // SAFETY: advice on our own descriptor; reads no memory of ours.
                let rc = unsafe {
                    libc::posix_fadvise(segment.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                };
                assert_eq!(rc, 0);
            }
        };
        let rss_file_kib = || {
            let status = fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };

        // Before: one mapping per segment, kept (so hot pages stay mapped), WillNeed on the
        // entry, checks, copy out.
        let mmap = || {
            let mut maps = maps.lock().unwrap();
            let mut total = 0;
            for entry in &entries {
                let segment = &entry.segment;
                // SAFETY: read-only mapping of a sealed segment nothing writes to or truncates
                // during the benchmark.
                let map = maps
                    .entry(segment.seq)
                    .or_insert_with(|| unsafe { memmap2::Mmap::map(&segment.file).unwrap() });
                let start = entry.offset as usize;
                let payload = start + ENTRY_HEADER_LEN as usize;
                let end = entry.end() as usize;
                let _ = map.advise_range(memmap2::Advice::WillNeed, start, end - start);
                assert_eq!(map[start..payload], encode_entry_header(&entry.record));
                assert_eq!(crc32fast::hash(&map[payload..end]), entry.record.crc32);
                let owned = map[payload..end].to_vec();
                total += owned.len();
            }
            total
        };
        // Now: `get` (fstat, WillNeed, pread header and payload, checks).
        let pread = || {
            let mut total = 0;
            for d in &digests {
                total += cache.get(d).unwrap().bytes.len();
            }
            total
        };
        // Now, and the copy `decode_with` makes of a raw chunk on top.
        let pread_and_copy = || {
            let mut total = 0;
            for d in &digests {
                let hit = cache.get(d).unwrap();
                total += decode_with(&hit.record, &hit.bytes, Checks::NONE)
                    .unwrap()
                    .len();
            }
            total
        };
        // `read_entry` without the WillNeed advice.
        let pread_no_advice = || {
            let mut total = 0;
            for entry in &entries {
                let file = &entry.segment.file;
                assert!(file.metadata().unwrap().len() >= entry.end());
                let mut header = [0u8; ENTRY_HEADER_LEN as usize];
                file.read_exact_at(&mut header, entry.offset).unwrap();
                assert_eq!(header, encode_entry_header(&entry.record));
                let mut payload = vec![0u8; entry.record.comp_len as usize];
                file.read_exact_at(&mut payload, entry.offset + ENTRY_HEADER_LEN)
                    .unwrap();
                assert_eq!(crc32fast::hash(&payload), entry.record.crc32);
                total += payload.len();
            }
            total
        };
        // `read_entry` without zeroing the buffer first.
        let pread_uninit = || {
            let mut total = 0;
            for entry in &entries {
                let file = &entry.segment.file;
                assert!(file.metadata().unwrap().len() >= entry.end());
                will_need(file, entry.offset, entry.end() - entry.offset);
                let mut header = [0u8; ENTRY_HEADER_LEN as usize];
                file.read_exact_at(&mut header, entry.offset).unwrap();
                assert_eq!(header, encode_entry_header(&entry.record));
                let len = entry.record.comp_len as usize;
                let mut payload: Vec<u8> = Vec::with_capacity(len);
                // SAFETY: pread writes at most `len` bytes into the spare capacity; the length
                // is set to what it wrote.
                unsafe {
                    let n = libc::pread(
                        file.as_raw_fd(),
                        payload.as_mut_ptr().cast(),
                        len,
                        (entry.offset + ENTRY_HEADER_LEN) as libc::off_t,
                    );
                    assert_eq!(n, len as isize);
                    payload.set_len(len);
                }
                assert_eq!(crc32fast::hash(&payload), entry.record.crc32);
                total += payload.len();
            }
            total
        };
        let variants: [(&str, &dyn Fn() -> usize); 5] = [
            ("mmap + copy out (before)", &mmap),
            ("pread (now)", &pread),
            ("pread + decode copy", &pread_and_copy),
            ("pread, no WillNeed", &pread_no_advice),
            ("pread, buffer not zeroed", &pread_uninit),
        ];
        let bytes = (mib * MIB) as f64;
        let mut results: BTreeMap<(usize, bool), Vec<f64>> = BTreeMap::new();
        for round in 0..5 {
            for (v, (name, read)) in variants.iter().enumerate() {
                for cold in [true, false] {
                    if cold {
                        evict_page_cache();
                    } else {
                        read();
                    }
                    let rss_before = rss_file_kib();
                    let started = Instant::now();
                    let total = read();
                    let secs = started.elapsed().as_secs_f64();
                    // Before the mappings are dropped (by the next cold run).
                    let rss_after = rss_file_kib();
                    assert_eq!(total as u64, mib * MIB);
                    eprintln!(
                        "round {round} {name:26} {:4}: {secs:6.3} s {:6.2} GB/s, RssFile {:+} MiB",
                        if cold { "cold" } else { "hot" },
                        bytes / secs / 1e9,
                        (rss_after as i64 - rss_before as i64) / 1024,
                    );
                    results.entry((v, cold)).or_default().push(secs);
                }
            }
        }
        for ((v, cold), mut secs) in results {
            secs.sort_by(f64::total_cmp);
            let median = secs[secs.len() / 2];
            eprintln!(
                "median {:26} {:4}: {median:6.3} s {:6.2} GB/s (min {:.3} s, max {:.3} s)",
                variants[v].0,
                if cold { "cold" } else { "hot" },
                bytes / median / 1e9,
                secs[0],
                secs[secs.len() - 1],
            );
        }
    }
}
