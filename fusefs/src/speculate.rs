//! Guesses of what a reader reads next, from the image's layout, handed to the source as
//! [`ChunkSource::speculate`] hints (a remote source fetches them while the link has room and
//! decodes cached ones ahead).
//!
//! Images are converted in tree order, so a directory's files are neighbours in their blob and
//! a package is a run of chunks. A start that imports from a package reads much of it (in one
//! measured Python start, three quarters of scipy's chunks and two thirds of pandas'), one file
//! after another. So:
//!
//! - the **first read of a third file of a directory** (a reader is working through it) hints
//!   the directory's whole subtree, in layout order, when it is small enough to be a package
//!   ([`SUBTREE_MAX_BYTES`]); a larger one (`/usr/lib`, a `site-packages` of everything), only
//!   its own small files;
//! - the **first read of a file** hints its chunks around the read: a library is mapped and its
//!   pages faulted in all over it, a data file is read on.
//!
//! Touches are noted with one bit per inode. A file's are planned on the spot, before the read
//! that touched it asks for its chunk: a remote source then carries the guesses in the same
//! request as that chunk, after it. A directory's (a subtree walk) are planned on a thread of
//! their own, so a read never waits for a plan. Lookups guess nothing: a start looks up many
//! names along its search paths in directories it never reads from. Newer hints are more
//! specific (a module inside a package inside a directory of packages); the source serves the
//! newest first.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use crate::error::IndexError;
use crate::format::*;
use crate::index::{ChunkRef, Index};
use crate::source::ChunkSource;

/// A directory whose files (all of its subtree) hold at most this many bytes is hinted whole
/// when [`SUBTREE_AFTER_FILES`] of its files have been read: a package. Larger ones are
/// collections of packages or libraries, of which one start reads a small part.
pub const SUBTREE_MAX_BYTES: u64 = 64 << 20;
/// Files read from a directory before its subtree is guessed: a reader working through a
/// package reads many of its files, a start that loads two libraries from a directory of
/// hundreds does not go on (guessing after two files fetched a tenth of a small image for
/// `sh -c 'echo ok'`).
const SUBTREE_AFTER_FILES: u8 = 3;
/// The subtree walk stops (and the directory counts as large) past this many entries.
const SUBTREE_MAX_ENTRIES: usize = 16 << 10;
/// A large directory read from hints the chunks of its small files (each within one chunk),
/// up to this many distinct chunks...
const DIR_SMALL_FILE_CHUNKS: usize = 8;
/// ...looking at this many of its entries at most.
const DIR_SCAN: u32 = 1024;
/// A file's first read hints the chunks of the file after the read, up to this many...
const FILE_AFTER_CHUNKS: u64 = 12;
/// ...and this many before it (a mapped library's header is read first, then its segments,
/// some of which lie before the first page faulted).
const FILE_BEFORE_CHUNKS: u64 = 4;
/// Directory touches waiting to be planned; more are dropped (they are only hints).
const PENDING_TOUCHES: usize = 256;

/// A directory read from ([`SUBTREE_AFTER_FILES`] files), for the planner thread: its subtree
/// if a package, else its small files.
struct Touch(u64);

/// Notes first touches: plans a file's on the spot (before the read that touched it asks for
/// its chunk, so the guesses can ride along with that request), hands a directory's to the
/// planner thread.
pub(crate) struct Speculator {
    files: Vec<AtomicU64>,
    /// Files read from each directory, up to [`SUBTREE_AFTER_FILES`] (one byte per inode).
    files_read: Vec<AtomicU8>,
    touches: SyncSender<Touch>,
    planner: Arc<Planner>,
    source: Arc<dyn ChunkSource>,
}

impl Speculator {
    /// Starts the planner thread of an image read through `source`.
    pub(crate) fn start(
        index: Arc<Index>,
        source: Arc<dyn ChunkSource>,
    ) -> std::io::Result<Speculator> {
        let words = (index.inode_count() / 64 + 1) as usize;
        let inodes = index.inode_count() as usize + 1;
        let (tx, rx) = sync_channel(PENDING_TOUCHES);
        let planner = Arc::new(Planner { index });
        {
            let planner = planner.clone();
            let source = source.clone();
            std::thread::Builder::new()
                .name("lazy-speculate".into())
                .spawn(move || planner.run(&rx, source.as_ref()))?;
        }
        Ok(Speculator {
            files: (0..words).map(|_| AtomicU64::new(0)).collect(),
            files_read: (0..inodes).map(|_| AtomicU8::new(0)).collect(),
            touches: tx,
            planner,
            source,
        })
    }

    /// A read of `start..end` of file `ino`, about to ask for its chunks.
    pub(crate) fn file_read(&self, ino: u64, start: u64, end: u64) {
        if !first(&self.files, ino) {
            return;
        }
        if let Ok(chunks) = self.planner.plan_file(ino, start, end) {
            if !chunks.is_empty() {
                self.source.speculate(&chunks);
            }
        }
        let Ok(file) = self.planner.index.inode(ino) else {
            return;
        };
        let dir = u64::from(file.parent);
        let Some(count) = self.files_read.get(dir as usize) else {
            return;
        };
        let counted = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < SUBTREE_AFTER_FILES).then_some(n + 1)
        });
        // Exactly once: for the read that takes the count to the threshold.
        if counted == Ok(SUBTREE_AFTER_FILES - 1) {
            self.send(Touch(dir));
        }
    }

    fn send(&self, touch: Touch) {
        match self.touches.try_send(touch) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Marks `ino` in `bits`; true the first time.
fn first(bits: &[AtomicU64], ino: u64) -> bool {
    let Some(word) = bits.get((ino / 64) as usize) else {
        return false;
    };
    let bit = 1u64 << (ino % 64);
    word.fetch_or(bit, Ordering::Relaxed) & bit == 0
}

/// Turns touches into lists of chunks. Every index access is checked: a plan over a corrupt
/// index is cut short, never a panic.
struct Planner {
    index: Arc<Index>,
}

impl Planner {
    /// Plans every directory touched until the filesystem (its [`Speculator`]) is gone.
    fn run(&self, touches: &Receiver<Touch>, source: &dyn ChunkSource) {
        while let Ok(Touch(dir)) = touches.recv() {
            if let Ok(chunks) = self.plan_dir(dir) {
                if !chunks.is_empty() {
                    source.speculate(&chunks);
                }
            }
        }
    }

    /// The whole subtree of a package-sized directory, else its own small files.
    fn plan_dir(&self, ino: u64) -> Result<Vec<ChunkRef>, IndexError> {
        match self.subtree(ino)? {
            Some(chunks) => Ok(chunks),
            None => self.small_files(ino),
        }
    }

    /// The chunks of every regular file under directory `ino`, depth first in name order (the
    /// layout order), each once; `None` when the subtree is larger than a package.
    fn subtree(&self, ino: u64) -> Result<Option<Vec<ChunkRef>>, IndexError> {
        let mut plan = Plan::default();
        let mut bytes = 0u64;
        let mut entries = 0usize;
        // (directory, next entry) pairs: an explicit stack, so a deep tree cannot overflow
        // ours; the index has no cycles (validated), and the entry count bounds the walk.
        let mut stack = vec![(self.dir(ino)?, 0u32)];
        while let Some((dir, next)) = stack.last_mut() {
            if *next >= dir.data_count {
                stack.pop();
                continue;
            }
            let d: DirentRecord = self
                .index
                .record(Section::Dirents, (dir.data_start + *next) as usize)?;
            *next += 1;
            entries += 1;
            if entries > SUBTREE_MAX_ENTRIES {
                return Ok(None);
            }
            let child = self.index.inode(d.ino as u64)?;
            match child.mode & S_IFMT {
                S_IFDIR => stack.push((child, 0)),
                S_IFREG => {
                    bytes += child.size;
                    if bytes > SUBTREE_MAX_BYTES {
                        return Ok(None);
                    }
                    for e in child.data_start..child.data_start + child.data_count {
                        let ext: ExtentRecord = self.index.record(Section::Extents, e as usize)?;
                        plan.add(self, ext.chunk)?;
                    }
                }
                _ => {}
            }
        }
        Ok(Some(plan.chunks))
    }

    /// The chunks of the small files (each within one chunk) directly in directory `ino`.
    fn small_files(&self, ino: u64) -> Result<Vec<ChunkRef>, IndexError> {
        let dir = self.dir(ino)?;
        let chunk_size = u64::from(self.index.chunk_size());
        let mut plan = Plan::default();
        for i in 0..dir.data_count.min(DIR_SCAN) {
            if plan.chunks.len() >= DIR_SMALL_FILE_CHUNKS {
                break;
            }
            let d: DirentRecord = self
                .index
                .record(Section::Dirents, (dir.data_start + i) as usize)?;
            let rec = self.index.inode(d.ino as u64)?;
            if rec.mode & S_IFMT != S_IFREG || rec.size > chunk_size || rec.data_count == 0 {
                continue;
            }
            let ext: ExtentRecord = self
                .index
                .record(Section::Extents, rec.data_start as usize)?;
            plan.add(self, ext.chunk)?;
        }
        Ok(plan.chunks)
    }

    /// The chunks of file `ino` after `end` and before `start`, within the bounds.
    fn plan_file(&self, ino: u64, start: u64, end: u64) -> Result<Vec<ChunkRef>, IndexError> {
        let rec = self.index.inode(ino)?;
        if rec.mode & S_IFMT != S_IFREG {
            return Ok(Vec::new());
        }
        let chunk_size = u64::from(self.index.chunk_size()).max(1);
        let after = end..end.saturating_add(FILE_AFTER_CHUNKS * chunk_size);
        let before = start.saturating_sub(FILE_BEFORE_CHUNKS * chunk_size)..start;
        let mut plan = Plan::default();
        for range in [after, before] {
            for e in rec.data_start..rec.data_start + rec.data_count {
                let ext: ExtentRecord = self.index.record(Section::Extents, e as usize)?;
                let ext_end = ext.file_off.saturating_add(u64::from(ext.len));
                let overlaps = |r: &std::ops::Range<u64>| ext_end > r.start && ext.file_off < r.end;
                // The read's own chunks are being read already.
                if overlaps(&range) && !overlaps(&(start..end)) {
                    plan.add(self, ext.chunk)?;
                }
            }
        }
        Ok(plan.chunks)
    }

    fn dir(&self, ino: u64) -> Result<InodeRecord, IndexError> {
        if ino == 0 || ino > self.index.inode_count() {
            return Err(IndexError::Corrupt(format!("no inode {ino}")));
        }
        let rec = self.index.inode(ino)?;
        if rec.mode & S_IFMT != S_IFDIR {
            return Err(IndexError::Corrupt(format!(
                "inode {ino} is not a directory"
            )));
        }
        Ok(rec)
    }
}

/// Chunks in the order first added, each once.
#[derive(Default)]
struct Plan {
    chunks: Vec<ChunkRef>,
    seen: HashSet<u32>,
}

impl Plan {
    fn add(&mut self, planner: &Planner, chunk: u32) -> Result<(), IndexError> {
        if self.seen.insert(chunk) {
            self.chunks.push(planner.index.chunk_ref(chunk)?);
        }
        Ok(())
    }
}
