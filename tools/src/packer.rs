//! Packs file data into fixed-size chunks, compresses them on all cores and appends them to
//! a layer's data blob in order.
//!
//! Files smaller than a chunk are packed together into shared chunks (so a cold start does
//! not make one request per small file); larger files start a fresh chunk and are cut at
//! fixed offsets, so the same file yields the same chunks in any image and dedups. Chunks of
//! a large file that are all zeros become holes and take no space.
//!
//! Pipeline: the caller's thread reads the input and cuts chunks, numbered when they are
//! started ("provisional" numbers, which extents name) and again when they are sent ("seq",
//! the blob order); `jobs` worker threads hash and compress them; one writer thread puts them
//! back in seq order, drops duplicates (by blake3 digest, across all layers) and appends the
//! rest to the blob while hashing it (sha256). Channels are bounded, so memory stays at a few
//! chunks per worker whatever the input size.
//!
//! With a [`HotLayout`] (an access profile), data the profile read is *hot*: hot small files
//! are packed into their own shared chunks (never mixed with cold files), and the writer keeps
//! hot chunks aside in a spool file and, when the layer is done, writes them first, ordered by
//! rank (then by seq), followed by the cold chunks in their usual order. Chunk numbers and the
//! tree do not change; only the small files' packing and the blob's byte order do. A hot chunk
//! whose content an earlier cold chunk already has stays where that one is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use fusefs::chunk::{encode_chunk, EncodedChunk};
use fusefs::format::{ChunkRecord, ExtentRecord, CHUNK_UNCOMPRESSED};
use sha2::{Digest, Sha256};

use crate::compression::Compression;
use crate::error::ConvertError;
use crate::layout::HotLayout;

/// Provisional numbers not (yet) given a chunk; never left once a layer is finished.
const UNRESOLVED: u32 = u32::MAX;

/// The image's chunk table as it grows layer by layer.
#[derive(Default)]
pub struct ChunkTable {
    pub records: Vec<ChunkRecord>,
    by_digest: HashMap<[u8; 32], u32>,
    /// Final chunk number of each provisional number.
    provisional: Vec<u32>,
    pub deduplicated: u64,
}

impl ChunkTable {
    /// The final chunk number for a provisional one.
    pub fn resolve(&self, provisional: u32) -> u32 {
        self.provisional[provisional as usize]
    }

    /// Adds a chunk that is stored already (`convert --reference`), or finds the chunk with
    /// its digest. Returns its provisional number and whether it is new.
    pub fn add_record(&mut self, record: ChunkRecord) -> (u32, bool) {
        let provisional = self.provisional.len() as u32;
        let (id, new) = match self.by_digest.get(&record.digest) {
            Some(id) => {
                self.deduplicated += 1;
                (*id, false)
            }
            None => {
                let id = self.records.len() as u32;
                self.by_digest.insert(record.digest, id);
                self.records.push(record);
                (id, true)
            }
        };
        self.provisional.push(id);
        (provisional, new)
    }
}

/// A finished layer blob, not yet moved into the store.
pub struct FinishedBlob {
    pub file: tempfile::NamedTempFile,
    pub digest: String,
    pub size: u64,
}

/// A chunk on its way to the writer.
struct Job {
    /// Position in send order (the writer's order).
    seq: u32,
    provisional: u32,
    /// Profile rank of hot data; `None` for cold.
    rank: Option<u32>,
    /// zstd-compress it, or store it raw (`--compression`).
    compress: bool,
    raw: Vec<u8>,
}

/// A chunk compressed by a worker.
struct Done {
    seq: u32,
    provisional: u32,
    rank: Option<u32>,
    encoded: std::io::Result<EncodedChunk>,
}

struct WriterOutput {
    table: ChunkTable,
    blob: FinishedBlob,
}

/// A chunk being filled with small files.
struct Shared {
    data: Vec<u8>,
    provisional: u32,
    /// Hot buffers: the best (lowest) rank of the files in it.
    rank: Option<u32>,
}

/// Packs one layer's data into one blob.
pub struct LayerPacker {
    chunk_size: usize,
    /// Small cold files, in input order.
    cold: Shared,
    /// Small hot files (only with a layout).
    hot: Shared,
    layout: Option<Arc<HotLayout>>,
    compression: Compression,
    next_provisional: u32,
    next_seq: u32,
    zeros: Vec<u8>,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<Result<WriterOutput, ConvertError>>>,
    /// Uncompressed bytes taken in (for progress and throughput).
    pub input_bytes: Arc<AtomicU64>,
}

impl LayerPacker {
    /// Starts a packer writing blob number `blob_index` to `file`, continuing `table`.
    pub fn start(
        table: ChunkTable,
        blob_index: u32,
        file: tempfile::NamedTempFile,
        chunk_size: u32,
        level: i32,
        jobs: usize,
        input_bytes: Arc<AtomicU64>,
    ) -> LayerPacker {
        let jobs = jobs.max(1);
        let first_provisional = table.provisional.len() as u32;
        let (job_tx, job_rx) = bounded::<Job>(jobs * 2);
        let (done_tx, done_rx) = bounded::<Done>(jobs * 2);
        let workers = (0..jobs)
            .map(|_| {
                let rx = job_rx.clone();
                let tx = done_tx.clone();
                std::thread::spawn(move || {
                    for job in rx {
                        let encoded = if job.compress {
                            encode_chunk(&job.raw, level)
                        } else {
                            Ok(raw_chunk(job.raw))
                        };
                        let done = Done {
                            seq: job.seq,
                            provisional: job.provisional,
                            rank: job.rank,
                            encoded,
                        };
                        if tx.send(done).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(done_tx);
        let writer = std::thread::spawn(move || write_blob(done_rx, table, blob_index, file));
        let shared = || Shared {
            data: Vec::with_capacity(chunk_size as usize),
            provisional: UNRESOLVED,
            rank: None,
        };
        LayerPacker {
            chunk_size: chunk_size as usize,
            cold: shared(),
            hot: shared(),
            layout: None,
            compression: Compression::Zstd,
            next_provisional: first_provisional,
            next_seq: 0,
            zeros: vec![0u8; chunk_size as usize],
            jobs: Some(job_tx),
            workers,
            writer: Some(writer),
            input_bytes,
        }
    }

    /// Chooses which chunks are compressed (default: all, as `Compression::Zstd`).
    pub fn with_compression(mut self, compression: Compression) -> LayerPacker {
        self.compression = compression;
        self
    }

    /// Lays out data that `layout` names first (see the module docs).
    pub fn with_layout(mut self, layout: Option<Arc<HotLayout>>) -> LayerPacker {
        self.layout = layout;
        self
    }

    fn alloc_provisional(&mut self) -> u32 {
        let p = self.next_provisional;
        self.next_provisional += 1;
        p
    }

    fn send(
        &mut self,
        provisional: u32,
        rank: Option<u32>,
        compress: bool,
        raw: Vec<u8>,
    ) -> Result<(), ConvertError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let job = Job {
            seq,
            provisional,
            rank,
            compress,
            raw,
        };
        let sent = self.jobs.as_ref().map(|tx| tx.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            // The writer stopped early; `finish` reports why.
            _ => Err(self.stop_with_error()),
        }
    }

    fn stop_with_error(&mut self) -> ConvertError {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => e,
            _ => ConvertError::Source("chunk writer stopped unexpectedly".into()),
        }
    }

    /// Sends a shared chunk off, if it holds anything.
    fn flush(&mut self, hot: bool) -> Result<(), ConvertError> {
        let shared = if hot { &mut self.hot } else { &mut self.cold };
        if shared.data.is_empty() {
            return Ok(());
        }
        let raw = std::mem::replace(&mut shared.data, Vec::with_capacity(self.chunk_size));
        let (provisional, rank) = (shared.provisional, shared.rank.take());
        self.send(provisional, rank, self.compression.compresses_packs(), raw)
    }

    /// Reads `size` bytes of one file from `r` and returns its extents (with provisional
    /// chunk numbers). `path` (components from the image root) is looked up in the layout;
    /// `what` names the file in errors.
    pub fn add_file(
        &mut self,
        r: &mut dyn Read,
        size: u64,
        path: &[Vec<u8>],
        what: &dyn Fn() -> String,
    ) -> Result<Vec<ExtentRecord>, ConvertError> {
        let short = |e: std::io::Error| ConvertError::Io {
            context: format!("reading {}", what()),
            source: e,
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let layout = self.layout.clone();
        let rank_of = |off: u64, len: u64| layout.as_ref().and_then(|l| l.rank(path, off, len));
        if size < self.chunk_size as u64 {
            let rank = rank_of(0, size);
            if self.shared(rank.is_some()).data.len() + size as usize > self.chunk_size {
                self.flush(rank.is_some())?;
            }
            if self.shared(rank.is_some()).data.is_empty() {
                let provisional = self.alloc_provisional();
                self.shared(rank.is_some()).provisional = provisional;
            }
            let shared = self.shared(rank.is_some());
            shared.rank = match (shared.rank, rank) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let at = shared.data.len();
            shared.data.resize(at + size as usize, 0);
            r.read_exact(&mut shared.data[at..]).map_err(short)?;
            let chunk = shared.provisional;
            self.input_bytes.fetch_add(size, Ordering::Relaxed);
            return Ok(vec![ExtentRecord {
                file_off: 0,
                chunk,
                chunk_off: at as u32,
                len: size as u32,
            }]);
        }
        // Keeps the cold packing what it is without a layout: small files on either side of a
        // large one do not share a chunk.
        self.flush(false)?;
        let name = path.last().map_or(&[][..], Vec::as_slice);
        let compress = self.compression.compresses_file(name);
        let mut extents = Vec::new();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(self.chunk_size as u64) as usize;
            let mut piece = vec![0u8; n];
            r.read_exact(&mut piece).map_err(short)?;
            self.input_bytes.fetch_add(n as u64, Ordering::Relaxed);
            if piece[..] != self.zeros[..n] {
                let provisional = self.alloc_provisional();
                self.send(provisional, rank_of(off, n as u64), compress, piece)?;
                extents.push(ExtentRecord {
                    file_off: off,
                    chunk: provisional,
                    chunk_off: 0,
                    len: n as u32,
                });
            }
            off += n as u64;
        }
        Ok(extents)
    }

    fn shared(&mut self, hot: bool) -> &mut Shared {
        if hot {
            &mut self.hot
        } else {
            &mut self.cold
        }
    }

    /// Flushes the last chunks and waits for the blob to be complete.
    pub fn finish(mut self) -> Result<(ChunkTable, FinishedBlob), ConvertError> {
        self.flush(false)?;
        self.flush(true)?;
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Ok(out))) => Ok((out.table, out.blob)),
            Some(Ok(Err(e))) => Err(e),
            _ => Err(ConvertError::Source("chunk writer panicked".into())),
        }
    }
}

/// A chunk stored as it is (`UNCOMPRESSED`): its checks, and no compression work.
pub fn raw_chunk(raw: Vec<u8>) -> EncodedChunk {
    EncodedChunk {
        digest: *blake3::hash(&raw).as_bytes(),
        crc32: crc32fast::hash(&raw),
        raw_len: raw.len() as u32,
        flags: CHUNK_UNCOMPRESSED,
        stored: raw,
    }
}

/// A hot chunk kept aside until the layer is done.
struct HotChunk {
    rank: u32,
    seq: u32,
    /// Its number in the chunk table.
    id: u32,
    /// Where its stored bytes are in the spool.
    spool_off: u64,
    len: u32,
}

fn write_blob(
    done: Receiver<Done>,
    mut table: ChunkTable,
    blob_index: u32,
    file: tempfile::NamedTempFile,
) -> Result<WriterOutput, ConvertError> {
    let path = file.path().display().to_string();
    let werr = |e| ConvertError::Io {
        context: format!("writing blob {path}"),
        source: e,
    };
    let first_record = table.records.len();
    let mut out = BufWriter::with_capacity(1 << 20, file.as_file());
    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut hot: Vec<HotChunk> = Vec::new();
    let mut spool: Option<BufWriter<std::fs::File>> = None;
    let mut spool_size = 0u64;
    let mut pending: BTreeMap<u32, Done> = BTreeMap::new();
    let mut next = 0u32;
    for d in done {
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&next) {
            let chunk = d.encoded.map_err(|e| ConvertError::Io {
                context: "compressing a chunk".into(),
                source: e,
            })?;
            let id = match table.by_digest.get(&chunk.digest) {
                Some(id) => {
                    table.deduplicated += 1;
                    *id
                }
                None => {
                    let id = table.records.len() as u32;
                    let comp_off = match d.rank {
                        None => {
                            out.write_all(&chunk.stored).map_err(werr)?;
                            sha.update(&chunk.stored);
                            size += chunk.stored.len() as u64;
                            size - chunk.stored.len() as u64
                        }
                        Some(rank) => {
                            let spool = match &mut spool {
                                Some(spool) => spool,
                                None => {
                                    let dir =
                                        file.path().parent().unwrap_or(std::path::Path::new("."));
                                    let f = tempfile::tempfile_in(dir).map_err(werr)?;
                                    spool.insert(BufWriter::with_capacity(1 << 20, f))
                                }
                            };
                            spool.write_all(&chunk.stored).map_err(werr)?;
                            hot.push(HotChunk {
                                rank,
                                seq: d.seq,
                                id,
                                spool_off: spool_size,
                                len: chunk.stored.len() as u32,
                            });
                            spool_size += chunk.stored.len() as u64;
                            // Set when the hot chunks are placed.
                            0
                        }
                    };
                    table.records.push(ChunkRecord {
                        blob: blob_index,
                        flags: chunk.flags,
                        comp_off,
                        comp_len: chunk.stored.len() as u32,
                        raw_len: chunk.raw_len,
                        crc32: chunk.crc32,
                        digest: chunk.digest,
                    });
                    table.by_digest.insert(chunk.digest, id);
                    id
                }
            };
            let slot = d.provisional as usize;
            if table.provisional.len() <= slot {
                table.provisional.resize(slot + 1, UNRESOLVED);
            }
            table.provisional[slot] = id;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(ConvertError::Source(format!(
            "chunk {next} never arrived from the compression workers"
        )));
    }
    out.flush().map_err(werr)?;
    drop(out);
    let Some(spool) = spool else {
        return Ok(WriterOutput {
            table,
            blob: FinishedBlob {
                file,
                digest: format!("sha256:{}", hex::encode(sha.finalize())),
                size,
            },
        });
    };
    let spool = spool.into_inner().map_err(|e| werr(e.into_error()))?;
    let blob = hot_first(&mut table, first_record, hot, &spool, file, size).map_err(werr)?;
    Ok(WriterOutput { table, blob })
}

/// The layer's final blob: the `hot` chunks from `spool` in rank order, then the cold chunks
/// of `cold` (`cold_size` bytes); moves the records of this blob's chunks accordingly.
fn hot_first(
    table: &mut ChunkTable,
    first_record: usize,
    mut hot: Vec<HotChunk>,
    spool: &std::fs::File,
    cold: tempfile::NamedTempFile,
    cold_size: u64,
) -> std::io::Result<FinishedBlob> {
    hot.sort_unstable_by_key(|h| (h.rank, h.seq));
    let dir = cold.path().parent().unwrap_or(std::path::Path::new("."));
    let blob = tempfile::NamedTempFile::new_in(dir)?;
    let mut out = BufWriter::with_capacity(1 << 20, blob.as_file());
    let mut sha = Sha256::new();
    let mut at = 0u64;
    let mut buf = Vec::new();
    for h in &hot {
        buf.resize(h.len as usize, 0);
        spool.read_exact_at(&mut buf, h.spool_off)?;
        out.write_all(&buf)?;
        sha.update(&buf);
        table.records[h.id as usize].comp_off = at;
        at += u64::from(h.len);
    }
    let hot_ids: HashSet<u32> = hot.iter().map(|h| h.id).collect();
    for (i, record) in table.records.iter_mut().enumerate().skip(first_record) {
        if !hot_ids.contains(&(i as u32)) {
            record.comp_off += at;
        }
    }
    let mut cold_file = cold.as_file();
    cold_file.rewind()?;
    buf.resize(1 << 20, 0);
    let mut copied = 0u64;
    loop {
        let n = cold_file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        sha.update(&buf[..n]);
        copied += n as u64;
    }
    if copied != cold_size {
        return Err(std::io::Error::other(format!(
            "cold chunks are {copied} bytes on disk, {cold_size} written"
        )));
    }
    out.flush()?;
    drop(out);
    Ok(FinishedBlob {
        file: blob,
        digest: format!("sha256:{}", hex::encode(sha.finalize())),
        size: at + cold_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(
        files: &[Vec<u8>],
        chunk_size: u32,
    ) -> (ChunkTable, FinishedBlob, Vec<Vec<ExtentRecord>>) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let mut p = LayerPacker::start(
            ChunkTable::default(),
            0,
            tmp,
            chunk_size,
            3,
            2,
            Arc::new(AtomicU64::new(0)),
        );
        let exts = files
            .iter()
            .map(|f| {
                p.add_file(&mut &f[..], f.len() as u64, &[], &|| "f".into())
                    .unwrap()
            })
            .collect();
        let (t, b) = p.finish().unwrap();
        (t, b, exts)
    }

    #[test]
    fn small_files_share_chunks_and_large_files_split_at_fixed_offsets() {
        let cs = 4096u32;
        let small: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i + 1; 1000]).collect();
        let mut files = small.clone();
        files.push((0..10_000u32).map(|i| (i % 251) as u8 + 1).collect());
        let (table, _, exts) = pack(&files, cs);
        // 10 x 1000 bytes in 4096-byte chunks: 4 per chunk -> 3 chunks.
        let small_chunks: std::collections::BTreeSet<u32> = exts[..10]
            .iter()
            .map(|e| table.resolve(e[0].chunk))
            .collect();
        assert_eq!(small_chunks.len(), 3);
        let big = &exts[10];
        assert_eq!(
            big.iter().map(|e| (e.file_off, e.len)).collect::<Vec<_>>(),
            vec![(0, 4096), (4096, 4096), (8192, 1808)]
        );
        assert!(big.iter().all(|e| e.chunk_off == 0));
    }

    #[test]
    fn zero_chunks_become_holes_and_duplicates_are_stored_once() {
        let cs = 4096u32;
        let mut sparse = vec![0u8; 3 * cs as usize];
        sparse[5000] = 1;
        let block = vec![9u8; cs as usize];
        let dup: Vec<u8> = [block.clone(), block.clone()].concat();
        let (table, blob, exts) = pack(&[sparse, dup], cs);
        assert_eq!(exts[0].len(), 1, "only the non-zero chunk is stored");
        assert_eq!(exts[0][0].file_off, 4096);
        assert_eq!(
            table.resolve(exts[1][0].chunk),
            table.resolve(exts[1][1].chunk)
        );
        assert_eq!(table.deduplicated, 1);
        assert_eq!(table.records.len(), 2);
        let on_disk = std::fs::metadata(blob.file.path()).unwrap().len();
        assert_eq!(on_disk, blob.size);
    }

    #[test]
    fn short_input_is_an_error_naming_the_file() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let mut p = LayerPacker::start(
            ChunkTable::default(),
            0,
            tmp,
            4096,
            3,
            1,
            Arc::new(AtomicU64::new(0)),
        );
        let err = p
            .add_file(&mut &[1u8; 10][..], 100, &[], &|| "etc/passwd".into())
            .unwrap_err();
        assert!(err.to_string().contains("etc/passwd"), "{err}");
    }
}
