//! `ImageReader`: POSIX read-only semantics over a validated index and a `ChunkSource`.
//! Plain types in, plain types out, so tests drive it without FUSE; `fuse.rs` only translates.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::error::{FsError, IndexError};
use crate::format::*;
use crate::index::{ChunkRef, Index, ROOT_INO};
use crate::opens::{ImageFiles, OpenFile, OpenObserver};
use crate::source::ChunkSource;
use crate::speculate::Speculator;

/// File types as the filesystem reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileKind {
    fn from_mode(mode: u32) -> Result<FileKind, IndexError> {
        Ok(match mode & S_IFMT {
            S_IFREG => FileKind::Regular,
            S_IFDIR => FileKind::Directory,
            S_IFLNK => FileKind::Symlink,
            S_IFCHR => FileKind::CharDevice,
            S_IFBLK => FileKind::BlockDevice,
            S_IFIFO => FileKind::Fifo,
            S_IFSOCK => FileKind::Socket,
            other => return Err(IndexError::Corrupt(format!("unknown file type {other:o}"))),
        })
    }
}

/// Attributes of one inode (what `stat` shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (no type bits).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks holding data (holes excluded).
    pub blocks: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub rdev: u32,
}

/// One directory entry as returned by `readdir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    pub kind: FileKind,
    pub name: &'a [u8],
    /// The offset to pass to `readdir` to continue after this entry.
    pub next_offset: u64,
}

/// Filesystem-wide numbers for `statfs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// An extended attribute's name and value, borrowed from the index.
type XattrPair<'a> = (&'a [u8], &'a [u8]);

/// Read-only view of one image.
pub struct ImageReader {
    index: Arc<Index>,
    source: Arc<dyn ChunkSource>,
    total_blocks: u64,
    /// File bytes returned by `read` (what the kernel read, its read-ahead included).
    bytes_served: AtomicU64,
    /// Sequential-read detection per file, for read-ahead hints.
    streams: Mutex<HashMap<u64, Stream>>,
    /// Largest read-ahead window (see [`READ_AHEAD_MAX`]).
    read_ahead_max: u64,
    /// Open handles per watched file, so the observer hears of a file's first open and last
    /// release only.
    open_files: Mutex<HashMap<u64, u32>>,
    /// Who hears of the opens, releases and reads of which files
    /// ([`ImageReader::with_observer`]).
    watching: Option<Watching>,
    /// Guesses from the layout of what is read next ([`ImageReader::with_speculation`]).
    speculation: Option<Speculator>,
}

/// An observer of a reader's opens and the regular files it watches
/// ([`OpenObserver::watches`]), found by name when it is given.
struct Watching {
    observer: Arc<dyn OpenObserver>,
    files: HashSet<u64>,
}

/// Directory entries scanned to find an opened file's name: a directory larger than this
/// (rare; a million files) leaves the file unnamed, so the cost of a name is bounded.
const MAX_NAME_SCAN: u32 = 1 << 20;

impl OpenFile {
    /// A handle on file `ino` of `reader`, as the filesystem passes it to its source.
    pub fn new(reader: &Arc<ImageReader>, ino: u64, size: u64) -> OpenFile {
        let reader: Weak<ImageReader> = Arc::downgrade(reader);
        OpenFile::opened_in(reader, ino, size)
    }
}

/// Read-ahead starts at this window once a file is read sequentially...
const READ_AHEAD_START: u64 = 4 << 20;
/// ...and doubles with each sequential read up to this (unless [`ImageReader::with_read_ahead_max`]
/// says otherwise): at 1 Gbit/s and 20 ms per request, 32 MiB in flight is ~10x the
/// bandwidth-delay product, enough to keep the link busy with a few large coalesced requests
/// even when the reader stalls briefly. Faster links (S3 at several Gbit/s, where each
/// connection carries ~100 MB/s) want more: the agent raises it.
pub const READ_AHEAD_MAX: u64 = 32 << 20;
/// A read this close to where the previous one ended still counts as sequential: the kernel
/// issues its read-ahead as concurrent 128 KiB requests that the worker pool may take out of
/// order (16 workers: 2 MiB).
const SEQUENTIAL_SLACK: u64 = 2 << 20;
/// Files tracked at once; the table is cleared when it grows past this (a hint is only a hint).
const MAX_STREAMS: usize = 4096;

/// Where a file's last read ended and how far ahead chunks were already hinted.
#[derive(Debug, Clone, Copy)]
struct Stream {
    next: u64,
    hinted_until: u64,
    window: u64,
}

impl ImageReader {
    pub fn new(index: Arc<Index>, source: Arc<dyn ChunkSource>) -> Result<ImageReader, IndexError> {
        let total_blocks = (0..index.chunk_count() as u32)
            .map(|i| index.chunk(i).map(|c| c.raw_len as u64))
            .sum::<Result<u64, _>>()?
            .div_ceil(4096);
        Ok(ImageReader {
            index,
            source,
            total_blocks,
            bytes_served: AtomicU64::new(0),
            streams: Mutex::new(HashMap::new()),
            read_ahead_max: READ_AHEAD_MAX,
            open_files: Mutex::new(HashMap::new()),
            watching: None,
            speculation: None,
        })
    }

    /// With `observer`, which hears of the opens, releases and reads of the files it watches
    /// (found by name here, a walk of the image's directories).
    pub fn with_observer(
        mut self,
        observer: Arc<dyn OpenObserver>,
    ) -> Result<ImageReader, IndexError> {
        let files = files_named(&self.index, |name| observer.watches(name))?;
        self.watching = Some(Watching { observer, files });
        Ok(self)
    }

    /// The observer, when it watches file `ino`.
    fn observer_of(&self, ino: u64) -> Option<&Arc<dyn OpenObserver>> {
        let watching = self.watching.as_ref()?;
        watching.files.contains(&ino).then_some(&watching.observer)
    }

    /// With `on`, the first read of each file (and of a second file of each directory) hint
    /// what is likely read next to the source ([`ChunkSource::speculate`];
    /// `speculate` has the rules), from a thread of the reader's own. Fails only when that
    /// thread cannot be started.
    pub fn with_speculation(mut self, on: bool) -> std::io::Result<ImageReader> {
        self.speculation = match on {
            true => Some(Speculator::start(self.index.clone(), self.source.clone())?),
            false => None,
        };
        Ok(self)
    }

    /// Whether any inode of the image has extended attributes.
    pub fn has_xattrs(&self) -> bool {
        self.index.count(Section::Xattrs) > 0
    }

    /// Whether an observer watches the opens of any file of this image. When not,
    /// the filesystem lets the kernel open and close files without asking.
    pub fn watches_opens(&self) -> bool {
        self.watching.as_ref().is_some_and(|w| !w.files.is_empty())
    }

    /// Lets a sequential reader's read-ahead window grow to `bytes` (at least the starting
    /// window): the most a reader that stops has caused to be fetched beyond where it stopped.
    pub fn with_read_ahead_max(mut self, bytes: u64) -> ImageReader {
        self.read_ahead_max = bytes.max(READ_AHEAD_START);
        self
    }

    /// Notes an open handle of `ino`; a watched file's first one is passed on to the observer
    /// (`OpenObserver::opened`). Call it after a successful [`ImageReader::open`].
    pub fn opened(self: &Arc<Self>, ino: u64) {
        let Some(observer) = self.observer_of(ino) else {
            return;
        };
        let Ok(rec) = self.inode(ino) else { return };
        let first = {
            let mut open = self
                .open_files
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = open.entry(ino).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            observer.opened(OpenFile::new(self, ino, rec.size));
        }
    }

    /// Notes that a handle of `ino` was released; the observer hears of the last one
    /// (`OpenObserver::released`).
    pub fn released(&self, ino: u64) {
        let last = {
            let mut open = self
                .open_files
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    open.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if let (true, Some(observer)) = (last, self.observer_of(ino)) {
            observer.released(ino);
        }
    }

    /// Releases every file still open (the filesystem is going away): the observer hears of
    /// each.
    pub fn release_all(&self) {
        let open: Vec<u64> = self
            .open_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(ino, _)| ino)
            .collect();
        if let Some(watching) = &self.watching {
            for ino in open {
                watching.observer.released(ino);
            }
        }
    }

    /// Files with open handles.
    pub fn open_file_count(&self) -> usize {
        self.open_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    fn inode(&self, ino: u64) -> Result<InodeRecord, FsError> {
        if ino == 0 || ino > self.index.inode_count() {
            return Err(FsError::NotFound);
        }
        Ok(self.index.inode(ino)?)
    }

    fn attr_of(&self, ino: u64, rec: &InodeRecord) -> Result<Attr, FsError> {
        let kind = FileKind::from_mode(rec.mode)?;
        let blocks = match kind {
            FileKind::Regular => {
                let mut bytes = 0u64;
                for e in rec.data_start..rec.data_start + rec.data_count {
                    let ext: ExtentRecord = self.index.record(Section::Extents, e as usize)?;
                    bytes += ext.len as u64;
                }
                bytes.div_ceil(512)
            }
            FileKind::Directory => 8,
            _ => 0,
        };
        Ok(Attr {
            ino,
            kind,
            perm: (rec.mode & 0o7777) as u16,
            nlink: rec.nlink,
            uid: rec.uid,
            gid: rec.gid,
            size: rec.size,
            blocks,
            mtime_sec: rec.mtime_sec,
            mtime_nsec: rec.mtime_nsec,
            rdev: rec.rdev,
        })
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let rec = self.inode(ino)?;
        self.attr_of(ino, &rec)
    }

    fn dir(&self, ino: u64) -> Result<InodeRecord, FsError> {
        let rec = self.inode(ino)?;
        if rec.mode & S_IFMT != S_IFDIR {
            return Err(FsError::NotDir);
        }
        Ok(rec)
    }

    fn dirent(&self, dir: &InodeRecord, i: u32) -> Result<(DirentRecord, &[u8]), FsError> {
        let d: DirentRecord = self
            .index
            .record(Section::Dirents, (dir.data_start + i) as usize)?;
        let name = self.index.string(d.name_off, d.name_len)?;
        Ok((d, name))
    }

    /// Finds `name` in directory `parent` (binary search over the sorted entries).
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        let dir = self.dir(parent)?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        match name {
            b"." => return self.getattr(parent),
            b".." => return self.getattr(dir.parent as u64),
            _ => {}
        }
        let (mut lo, mut hi) = (0u32, dir.data_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (d, entry_name) = self.dirent(&dir, mid)?;
            match entry_name.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return self.getattr(d.ino as u64),
            }
        }
        Err(FsError::NotFound)
    }

    /// Entries of directory `ino` from `offset` on: offset 0 is ".", 1 is "..", and 2 + i is
    /// the i-th stored entry. Stops early when `f` returns false (the reply buffer is full).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<(), FsError> {
        let dir = self.dir(ino)?;
        let total = dir.data_count as u64 + 2;
        for pos in offset..total {
            let entry = match pos {
                0 => DirEntry {
                    ino,
                    kind: FileKind::Directory,
                    name: b".",
                    next_offset: 1,
                },
                1 => DirEntry {
                    ino: dir.parent as u64,
                    kind: FileKind::Directory,
                    name: b"..",
                    next_offset: 2,
                },
                _ => {
                    let (d, name) = self.dirent(&dir, (pos - 2) as u32)?;
                    let child = self.index.inode(d.ino as u64)?;
                    DirEntry {
                        ino: d.ino as u64,
                        kind: FileKind::from_mode(child.mode)?,
                        name,
                        next_offset: pos + 1,
                    }
                }
            };
            if !f(entry) {
                break;
            }
        }
        Ok(())
    }

    pub fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        let rec = self.inode(ino)?;
        if rec.mode & S_IFMT != S_IFLNK {
            return Err(FsError::NotSymlink);
        }
        Ok(self.index.string(rec.data_start, rec.data_count)?)
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<XattrPair<'_>>, FsError> {
        let rec = self.inode(ino)?;
        let mut out = Vec::with_capacity(rec.xattr_count as usize);
        for x in rec.xattr_start..rec.xattr_start + rec.xattr_count {
            let r: XattrRecord = self.index.record(Section::Xattrs, x as usize)?;
            out.push((
                self.index.string(r.name_off, r.name_len)?,
                self.index.string(r.value_off, r.value_len)?,
            ));
        }
        Ok(out)
    }

    /// The value of extended attribute `name`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<&[u8], FsError> {
        self.xattrs(ino)?
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoXattr)
    }

    /// Names of all extended attributes, each followed by a NUL (the `listxattr` format).
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        for (name, _) in self.xattrs(ino)? {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// Checks that `ino` can be opened for reading (regular files only reach `read`).
    pub fn open(&self, ino: u64, write: bool) -> Result<(), FsError> {
        let rec = self.inode(ino)?;
        if write {
            return Err(FsError::ReadOnly);
        }
        if rec.mode & S_IFMT == S_IFDIR {
            return Err(FsError::IsDir);
        }
        Ok(())
    }

    /// The chunk pieces covering `offset..offset+size` of file `ino`, clamped to the file
    /// size, as (position in the output, extent) pairs. Gaps between them are holes.
    pub fn plan_read(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<(usize, Vec<(usize, ExtentRecord)>), FsError> {
        let rec = self.inode(ino)?;
        match rec.mode & S_IFMT {
            S_IFREG => {}
            S_IFDIR => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid),
        }
        if offset >= rec.size {
            return Ok((0, Vec::new()));
        }
        let end = offset.saturating_add(size as u64).min(rec.size);
        let len = (end - offset) as usize;
        let extent = |i: u32| -> Result<ExtentRecord, FsError> {
            Ok(self
                .index
                .record(Section::Extents, (rec.data_start + i) as usize)?)
        };
        // First extent ending after `offset`.
        let (mut lo, mut hi) = (0u32, rec.data_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = extent(mid)?;
            if e.file_off + e.len as u64 <= offset {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut pieces = Vec::new();
        for i in lo..rec.data_count {
            let e = extent(i)?;
            if e.file_off >= end {
                break;
            }
            let start = e.file_off.max(offset);
            let stop = (e.file_off + e.len as u64).min(end);
            pieces.push((
                (start - offset) as usize,
                ExtentRecord {
                    file_off: start,
                    chunk: e.chunk,
                    chunk_off: e.chunk_off + (start - e.file_off) as u32,
                    len: (stop - start) as u32,
                },
            ));
        }
        Ok((len, pieces))
    }

    /// Reads up to `size` bytes at `offset` of file `ino`. Blocks while chunks are fetched.
    /// When the file is being read sequentially, first tells the source which chunks follow
    /// (`ChunkSource::read_ahead`), with a window that grows as the reader keeps going.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let (len, pieces) = self.plan_read(ino, offset, size)?;
        self.before_read(ino, offset, offset + len as u64);
        let out = self.copy_pieces(self.source.as_ref(), len, pieces)?;
        self.bytes_served
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// What a read of `start..end` of `ino` tells the observer and the source before its chunks
    /// are read: a watched file's read goes to the observer ([`OpenObserver::read`]), which
    /// reads such a file ahead its own way (a tensor stream, in the reader's order) when it
    /// can; guesses from the layout would only compete with that for the link. Any other
    /// file's read feeds the speculator, and a sequential reader's read-ahead is hinted unless
    /// the observer reads the file ahead itself.
    fn before_read(&self, ino: u64, start: u64, end: u64) {
        let observer = self.observer_of(ino);
        if observer.is_some_and(|o| o.read(ino, start..end)) {
            return;
        }
        if let Some(ahead) = self.read_ahead_range(ino, start, end) {
            self.hint(ino, ahead);
        }
        if let (Some(spec), None) = (&self.speculation, observer) {
            spec.file_read(ino, start, end);
        }
    }

    /// [`ImageReader::read`] when it needs no more than one chunk and the source holds that
    /// chunk in memory ([`ChunkSource::chunk_in_memory`]): never blocks. `None` when the read
    /// must go to [`ImageReader::read`] (which then does everything, read-ahead included).
    pub fn read_from_memory(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Option<Result<Vec<u8>, FsError>> {
        let (len, pieces) = match self.plan_read(ino, offset, size) {
            Ok(plan) => plan,
            Err(e) => return Some(Err(e)),
        };
        let held = match pieces.as_slice() {
            [] => None,
            [(_, piece)] => {
                let chunk = self.index.chunk_ref(piece.chunk).ok()?;
                Some(self.source.chunk_in_memory(&chunk)?)
            }
            _ => return None,
        };
        self.before_read(ino, offset, offset + len as u64);
        let mut out = vec![0u8; len];
        if let (Some(data), [(at, piece)]) = (held, pieces.as_slice()) {
            let from = piece.chunk_off as usize;
            let Some(src) = data.get(from..from + piece.len as usize) else {
                let e = IndexError::Corrupt(format!("chunk {} is short", piece.chunk));
                return Some(Err(e.into()));
            };
            out[*at..*at + piece.len as usize].copy_from_slice(src);
        }
        self.bytes_served
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Some(Ok(out))
    }

    /// The `len` bytes that `pieces` (from `plan_read`) describe, read through `source`.
    fn copy_pieces(
        &self,
        source: &dyn ChunkSource,
        len: usize,
        pieces: Vec<(usize, ExtentRecord)>,
    ) -> Result<Vec<u8>, FsError> {
        let mut out = vec![0u8; len];
        for (at, piece) in pieces {
            let chunk = self.index.chunk_ref(piece.chunk)?;
            let data = source.chunk(&chunk)?;
            let from = piece.chunk_off as usize;
            let src = data
                .get(from..from + piece.len as usize)
                .ok_or_else(|| IndexError::Corrupt(format!("chunk {} is short", piece.chunk)))?;
            out[at..at + piece.len as usize].copy_from_slice(src);
        }
        Ok(out)
    }

    /// File bytes served by `read` so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served.load(Ordering::Relaxed)
    }

    /// Updates the file's stream state for a read of `start..end`; returns the range to hint,
    /// if the read is sequential and the window reaches past what was hinted before.
    fn read_ahead_range(&self, ino: u64, start: u64, end: u64) -> Option<Range<u64>> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if streams.len() >= MAX_STREAMS && !streams.contains_key(&ino) {
            streams.clear();
        }
        let s = streams.entry(ino).or_insert(Stream {
            next: u64::MAX,
            hinted_until: 0,
            window: 0,
        });
        if start.abs_diff(s.next) <= SEQUENTIAL_SLACK {
            s.window = (s.window * 2).clamp(READ_AHEAD_START, self.read_ahead_max);
            // Reads of one window may arrive out of order: never move backwards.
            s.next = s.next.max(end);
        } else {
            s.window = 0;
            s.next = end;
            s.hinted_until = end;
            return None;
        }
        let from = s.hinted_until.max(end);
        let to = end + s.window;
        if to <= from {
            return None;
        }
        s.hinted_until = to;
        Some(from..to)
    }

    /// Passes the chunks holding `range` of file `ino` to the source's read-ahead, and records
    /// that the file is hinted up to the end of the last of them, so no chunk is hinted twice.
    fn hint(&self, ino: u64, range: Range<u64>) {
        let len = u32::try_from(range.end - range.start).unwrap_or(u32::MAX);
        let Ok((_, pieces)) = self.plan_read(ino, range.start, len) else {
            return;
        };
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut covered = range.end;
        for (_, piece) in pieces {
            if chunks.last().is_some_and(|c| c.index == piece.chunk) {
                continue;
            }
            match self.index.chunk_ref(piece.chunk) {
                Ok(c) => {
                    // The file offset where this chunk's data ends.
                    covered = piece.file_off
                        + u64::from(c.record.raw_len - piece.chunk_off.min(c.record.raw_len));
                    chunks.push(c);
                }
                Err(_) => return,
            }
        }
        if chunks.is_empty() {
            return;
        }
        if let Some(s) = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&ino)
        {
            s.hinted_until = s.hinted_until.max(covered);
        }
        self.source.read_ahead(&chunks);
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: self.total_blocks,
            files: self.index.inode_count(),
            block_size: 4096,
            name_max: NAME_MAX as u32,
        }
    }

    pub fn root_ino(&self) -> u64 {
        ROOT_INO
    }
}

/// What an [`OpenFile`] of this reader reads through.
impl ImageFiles for ImageReader {
    fn file_name(&self, ino: u64) -> Option<Vec<u8>> {
        let rec = self.inode(ino).ok()?;
        let dir = self.dir(rec.parent as u64).ok()?;
        (0..dir.data_count.min(MAX_NAME_SCAN)).find_map(|i| {
            let (d, name) = self.dirent(&dir, i).ok()?;
            (d.ino as u64 == ino).then(|| name.to_vec())
        })
    }

    /// The chunks holding bytes `range` of file `ino`, in file order, each with the file range
    /// it serves (clamped to `range` and the file size); consecutive pieces of one chunk merge.
    fn file_chunks(
        &self,
        ino: u64,
        range: Range<u64>,
    ) -> Result<Vec<(Range<u64>, ChunkRef)>, FsError> {
        let mut out: Vec<(Range<u64>, ChunkRef)> = Vec::new();
        let mut at = range.start;
        while at < range.end {
            // plan_read takes a u32 size: walk big ranges in 1 GiB steps.
            let step = (range.end - at).min(1 << 30) as u32;
            let (len, pieces) = self.plan_read(ino, at, step)?;
            if len == 0 {
                break;
            }
            for (_, piece) in pieces {
                let piece_range = piece.file_off..piece.file_off + piece.len as u64;
                match out.last_mut() {
                    Some((r, c)) if c.index == piece.chunk => r.end = piece_range.end,
                    _ => out.push((piece_range, self.index.chunk_ref(piece.chunk)?)),
                }
            }
            at += len as u64;
        }
        Ok(out)
    }

    /// Reads up to `size` bytes at `offset` of file `ino` through `source`, without read-ahead.
    fn read_from(
        &self,
        source: &dyn ChunkSource,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let (len, pieces) = self.plan_read(ino, offset, size)?;
        self.copy_pieces(source, len, pieces)
    }
}

/// The regular files of `index` with a name `wanted` accepts (any of a file's names, for a
/// file with several). One pass over every directory entry.
fn files_named(index: &Index, wanted: impl Fn(&[u8]) -> bool) -> Result<HashSet<u64>, IndexError> {
    let mut files = HashSet::new();
    for ino in ROOT_INO..=index.inode_count() {
        let dir = index.inode(ino)?;
        if dir.mode & S_IFMT != S_IFDIR {
            continue;
        }
        for i in dir.data_start..dir.data_start + dir.data_count {
            let d: DirentRecord = index.record(Section::Dirents, i as usize)?;
            if !wanted(index.string(d.name_off, d.name_len)?) {
                continue;
            }
            if index.inode(d.ino as u64)?.mode & S_IFMT == S_IFREG {
                files.insert(d.ino as u64);
            }
        }
    }
    Ok(files)
}
