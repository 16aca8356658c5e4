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
//!
//! **Files.** This one: the public API (`open`, `get`, `contains`, `insert`, `remove`, `clear`,
//! `stats`), the directory lock, the sharded index, the counters and the bytes-used total.
//! `gc`: making room for inserts within the budget (and on a full disk), eviction, `retain` and
//! `evict_to`, as an `impl ChunkCache` over this file's state. `segment`: the segment files and
//! the writer's view of them (`Segments`): creating, appending, scanning at open, reading an
//! entry back with its checks. `entry`: the entry header codec. Calls go one way, this file ->
//! `gc` -> `segment` -> `entry`: `segment` and `entry` know nothing of the index or the budget.

mod entry;
mod gc;
mod segment;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use fusefs::chunk::check_stored;
use fusefs::format::ChunkRecord;
use fusefs::ChunkError;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use entry::{entry_record, ENTRY_HEADER_LEN};
use segment::{
    is_read_only, load_segment, parse_segment_name, read_entry, segment_name, segment_size, Entry,
    Segment, SegmentIoError, Segments, Unservable, SEGMENT_HEADER_LEN,
};

pub use gc::RetainReport;

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

impl From<SegmentIoError> for CacheError {
    fn from(e: SegmentIoError) -> CacheError {
        CacheError::Io {
            path: e.path,
            op: e.op,
            source: e.source,
        }
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

/// Index shards: `get`s of different chunks rarely share a lock. Digests are blake3 hashes,
/// so their first byte spreads entries evenly.
const INDEX_SHARDS: usize = 16;

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
            writer: Mutex::new(Segments::new()),
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
            let Some((mut state, entries)) = load_segment(seq, path)? else {
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
    use super::entry::encode_entry_header;
    use super::segment::will_need;
    use super::testing::*;
    use super::*;
    use fusefs::chunk::{decode_with, Checks};
    use fusefs::format::CHUNK_UNCOMPRESSED;
    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Barrier};

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
