//! Freeing space: the cache's budget and what gives way to it. `append` writes an insert's
//! entry within the budget (`make_room`), evicting least recently used segments first, and more
//! when the disk is full; `retain` drops the entries a caller no longer wants and deletes or
//! compacts the segments they leave mostly empty; `evict_to` evicts down to a target. The
//! module docs of `cache` give the policy and why.
//!
//! Everything here is an `impl ChunkCache`: it changes the cache's index, segments and counters
//! together, segments only under the writer lock. It uses `segment` for the files and owns no
//! state besides the reports it returns.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use fusefs::format::ChunkRecord;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::entry::ENTRY_HEADER_LEN;
use super::segment::{
    is_no_space, read_entry, Entry, SegmentState, Segments, Unservable, SEGMENT_HEADER_LEN,
};
use super::{io_err, CacheError, ChunkCache, INDEX_SHARDS};

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
pub(super) struct Dropped {
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

impl ChunkCache {
    /// Writes one entry (an entry record and its checked stored bytes) to the active segment,
    /// making room first, and returns where it lives; the caller indexes it. When the disk is
    /// full, evicts and tries again until nothing is left to evict.
    pub(super) fn append(
        &self,
        writer: &mut Segments,
        record: &ChunkRecord,
        stored: &[u8],
    ) -> Result<Entry, CacheError> {
        let need = ENTRY_HEADER_LEN + stored.len() as u64;
        loop {
            let seq = self.make_room(writer, need)?;
            let state = writer
                .live
                .get_mut(&seq)
                .expect("make_room returns a live segment");
            let offset = state.len;
            match state.append(record, stored) {
                Ok(entry) => {
                    self.bytes_used.fetch_add(need, Ordering::Relaxed);
                    self.touch(&entry.segment);
                    return Ok(entry);
                }
                Err(e) => {
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
            match writer.create(&self.segments_dir) {
                Ok(seq) => {
                    self.touch(&writer.live[&seq].segment);
                    self.bytes_used
                        .fetch_add(SEGMENT_HEADER_LEN, Ordering::Relaxed);
                    return Ok(seq);
                }
                Err(e) if is_no_space(&e.source) => {
                    warn!(segment = %e.path.display(), "chunk cache disk full: evicting a segment");
                    if self.evict_one(writer, "disk full").is_none() {
                        return Err(self.no_space(need));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Evicts the least recently used sealed segment, or the active one when it is the only
    /// one left. `None` when there are no segments.
    pub(super) fn evict_one(&self, writer: &mut Segments, why: &str) -> Option<Dropped> {
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
        let state = writer.remove(seq)?;
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
        let state = writer.remove(seq).expect("the segment is live");
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::testing::*;
    use crate::cache::{CacheError, CachedChunk};
    use std::fs::File;
    use std::path::Path;

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
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root: mounts FUSE or a tmpfs"
    )]
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
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root: mounts FUSE or a tmpfs"
    )]
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
}
