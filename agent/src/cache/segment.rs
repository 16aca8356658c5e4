//! Segment files: the append-only files the cache keeps its entries in, `<seq:016x>.seg` in
//! the segments directory. A segment is a 16-byte header (magic, version, crc32 of both) and a
//! run of whole entries (`entry` has their layout); it is the cache's unit of eviction.
//!
//! This file owns the files and what the writer knows of them ([`Segments`], under the cache's
//! writer lock): creating a segment, appending an entry with positioned writes (a failed write
//! is cut off again), scanning one at open (truncating a torn tail), and reading an indexed
//! entry back with its checks. What to evict, and when, is `gc`'s; the index and the
//! accounting of bytes used are the cache's (`mod.rs`). Nothing here knows of either.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use fusefs::format::ChunkRecord;
use tracing::{debug, warn};

use super::entry::{decode_entry_header, encode_entry_header, ENTRY_HEADER_LEN};

/// First bytes of every segment file.
const SEGMENT_MAGIC: [u8; 8] = *b"LAZYSEG\0";
/// The only segment format this code reads and writes; other versions are deleted at open.
const SEGMENT_VERSION: u32 = 1;
/// Segment header: magic, version, crc32 of both.
pub(super) const SEGMENT_HEADER_LEN: u64 = 16;

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

/// An I/O error on a segment file: which file, and what was being done to it. The cache turns
/// it into `CacheError::Io`.
#[derive(Debug, thiserror::Error)]
#[error("chunk cache {path}: {op}")]
pub(super) struct SegmentIoError {
    pub(super) path: PathBuf,
    pub(super) op: &'static str,
    #[source]
    pub(super) source: io::Error,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SegmentIoError + 'a {
    move |source| SegmentIoError {
        path: path.to_path_buf(),
        op,
        source,
    }
}

pub(super) fn segment_size(budget: u64) -> u64 {
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

pub(super) fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Whether `e` says the disk (or the user's quota) is full.
pub(super) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Whether `e` says the file system is mounted read-only.
/// Whether `e` says the file system is mounted read-only.
pub(super) fn is_read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EROFS)
}

/// One segment file, shared by the index entries that live in it and by readers.
pub(super) struct Segment {
    pub(super) seq: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Logical time of the latest get or insert of an entry in this segment.
    pub(super) last_used: AtomicU64,
}

/// Where an indexed entry lives, with the fields needed to check and return it.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) segment: Arc<Segment>,
    /// Offset of the entry header in the segment file.
    pub(super) offset: u64,
    pub(super) record: ChunkRecord,
}

impl Entry {
    pub(super) fn end(&self) -> u64 {
        self.offset + ENTRY_HEADER_LEN + u64::from(self.record.comp_len)
    }

    pub(super) fn same_as(&self, other: &Entry) -> bool {
        Arc::ptr_eq(&self.segment, &other.segment) && self.offset == other.offset
    }
}

/// A segment as the writer side sees it.
pub(super) struct SegmentState {
    pub(super) segment: Arc<Segment>,
    /// Bytes of the file that hold whole entries (the file's length).
    pub(super) len: u64,
    /// Digests written to this segment, to take them out of the index on eviction. May name
    /// entries already dropped or re-inserted elsewhere; eviction checks the index first.
    pub(super) digests: Vec<[u8; 32]>,
}

/// Everything inserts, eviction and `clear` change, under the writer lock.
pub(super) struct Segments {
    pub(super) live: BTreeMap<u64, SegmentState>,
    /// The segment new entries are appended to.
    pub(super) active: Option<u64>,
    pub(super) next_seq: u64,
}

/// Why a `get` could not serve an indexed entry.
pub(super) enum Unservable {
    /// The bytes on disk fail a check.
    Corrupt(String),
    /// The segment could not be stat'ed or read.
    Unreadable(io::Error),
}

impl Segments {
    pub(super) fn new() -> Segments {
        Segments {
            live: BTreeMap::new(),
            active: None,
            next_seq: 0,
        }
    }

    /// Starts the next segment in `dir`: creates its file (root's alone), writes its header,
    /// and makes it the active segment. Returns its sequence number.
    pub(super) fn create(&mut self, dir: &Path) -> Result<u64, SegmentIoError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = dir.join(segment_name(seq));
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
        self.live.insert(
            seq,
            SegmentState {
                segment,
                len: SEGMENT_HEADER_LEN,
                digests: Vec::new(),
            },
        );
        self.active = Some(seq);
        Ok(seq)
    }

    /// Takes segment `seq` out of the live set (its file stays); it is no longer active.
    pub(super) fn remove(&mut self, seq: u64) -> Option<SegmentState> {
        let state = self.live.remove(&seq)?;
        if self.active == Some(seq) {
            self.active = None;
        }
        Some(state)
    }
}

impl SegmentState {
    /// Writes one entry (an entry record and its checked stored bytes) at the end of the
    /// segment and returns where it lives. A failed write is cut off again, so the file stays a
    /// clean run of whole entries; if that fails too, the scan at the next open truncates the
    /// torn tail.
    pub(super) fn append(&mut self, record: &ChunkRecord, stored: &[u8]) -> io::Result<Entry> {
        let header = encode_entry_header(record);
        let offset = self.len;
        let file = &self.segment.file;
        let written = file
            .write_all_at(&header, offset)
            .and_then(|()| file.write_all_at(stored, offset + ENTRY_HEADER_LEN));
        if let Err(e) = written {
            let _ = file.set_len(offset);
            return Err(e);
        }
        self.len += ENTRY_HEADER_LEN + stored.len() as u64;
        self.digests.push(record.digest);
        Ok(Entry {
            segment: self.segment.clone(),
            offset,
            record: *record,
        })
    }
}

/// Opens and scans one segment file: its state (with no digests yet) and its entries. A bad
/// segment header deletes the file (`None`); a torn tail is truncated away.
pub(super) fn load_segment(
    seq: u64,
    path: PathBuf,
) -> Result<Option<(SegmentState, Vec<Entry>)>, SegmentIoError> {
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
pub(super) fn read_entry(entry: &Entry) -> Result<Vec<u8>, Unservable> {
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
pub(super) fn will_need(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise reads no memory of ours; a bad descriptor or range is an error
    // return, which is ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::entry_record;
    use crate::cache::testing::*;

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
}
