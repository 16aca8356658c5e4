//! Packs file data into fixed-size chunks, compresses them on all cores and appends them to
//! a layer's data blob in order.
//!
//! Files smaller than a chunk are packed together into shared chunks (so a cold start does
//! not make one request per small file); larger files start a fresh chunk and are cut at
//! fixed offsets, so the same file yields the same chunks in any image and dedups. Chunks of
//! a large file that are all zeros become holes and take no space.
//!
//! Pipeline: the caller's thread reads the input and cuts chunks, numbered in order
//! ("provisional" numbers); `jobs` worker threads hash and compress them; one writer thread
//! puts them back in order, drops duplicates (by blake3 digest, across all layers) and
//! appends the rest to the blob while hashing it (sha256). Channels are bounded, so memory
//! stays at a few chunks per worker whatever the input size.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use fusefs::chunk::{encode_chunk, EncodedChunk};
use fusefs::format::{ChunkRecord, ExtentRecord};
use sha2::{Digest, Sha256};

use crate::error::ConvertError;

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
}

/// A finished layer blob, not yet moved into the store.
pub struct FinishedBlob {
    pub file: tempfile::NamedTempFile,
    pub digest: String,
    pub size: u64,
}

type Job = (u32, Vec<u8>);
type Done = (u32, std::io::Result<EncodedChunk>);

struct WriterOutput {
    table: ChunkTable,
    blob: FinishedBlob,
}

/// Packs one layer's data into one blob.
pub struct LayerPacker {
    chunk_size: usize,
    buf: Vec<u8>,
    /// Provisional number of the chunk `buf` will become.
    buf_seq: u32,
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
        let first_seq = table.provisional.len() as u32;
        let (job_tx, job_rx) = bounded::<Job>(jobs * 2);
        let (done_tx, done_rx) = bounded::<Done>(jobs * 2);
        let workers = (0..jobs)
            .map(|_| {
                let rx = job_rx.clone();
                let tx = done_tx.clone();
                std::thread::spawn(move || {
                    for (seq, raw) in rx {
                        if tx.send((seq, encode_chunk(&raw, level))).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(done_tx);
        let writer =
            std::thread::spawn(move || write_blob(done_rx, table, blob_index, file, first_seq));
        LayerPacker {
            chunk_size: chunk_size as usize,
            buf: Vec::with_capacity(chunk_size as usize),
            buf_seq: first_seq,
            next_seq: first_seq,
            zeros: vec![0u8; chunk_size as usize],
            jobs: Some(job_tx),
            workers,
            writer: Some(writer),
            input_bytes,
        }
    }

    fn alloc_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn send(&mut self, seq: u32, raw: Vec<u8>) -> Result<(), ConvertError> {
        let sent = self.jobs.as_ref().map(|tx| tx.send((seq, raw)));
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

    /// Sends the pack buffer off as a chunk.
    fn flush(&mut self) -> Result<(), ConvertError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let raw = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size));
        let seq = self.buf_seq;
        self.send(seq, raw)
    }

    /// Reads `size` bytes of one file from `r` and returns its extents (with provisional
    /// chunk numbers). `what` names the file in errors.
    pub fn add_file(
        &mut self,
        r: &mut dyn Read,
        size: u64,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<ExtentRecord>, ConvertError> {
        let short = |e: std::io::Error| ConvertError::Io {
            context: format!("reading {}", what()),
            source: e,
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        if size < self.chunk_size as u64 {
            if self.buf.len() + size as usize > self.chunk_size {
                self.flush()?;
            }
            if self.buf.is_empty() {
                self.buf_seq = self.alloc_seq();
            }
            let at = self.buf.len();
            self.buf.resize(at + size as usize, 0);
            r.read_exact(&mut self.buf[at..]).map_err(short)?;
            self.input_bytes.fetch_add(size, Ordering::Relaxed);
            return Ok(vec![ExtentRecord {
                file_off: 0,
                chunk: self.buf_seq,
                chunk_off: at as u32,
                len: size as u32,
            }]);
        }
        self.flush()?;
        let mut extents = Vec::new();
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(self.chunk_size as u64) as usize;
            let mut piece = vec![0u8; n];
            r.read_exact(&mut piece).map_err(short)?;
            self.input_bytes.fetch_add(n as u64, Ordering::Relaxed);
            if piece[..] != self.zeros[..n] {
                let seq = self.alloc_seq();
                self.send(seq, piece)?;
                extents.push(ExtentRecord {
                    file_off: off,
                    chunk: seq,
                    chunk_off: 0,
                    len: n as u32,
                });
            }
            off += n as u64;
        }
        Ok(extents)
    }

    /// Flushes the last chunk and waits for the blob to be complete.
    pub fn finish(mut self) -> Result<(ChunkTable, FinishedBlob), ConvertError> {
        self.flush()?;
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

fn write_blob(
    done: Receiver<Done>,
    mut table: ChunkTable,
    blob_index: u32,
    file: tempfile::NamedTempFile,
    first_seq: u32,
) -> Result<WriterOutput, ConvertError> {
    let path = file.path().display().to_string();
    let werr = |e| ConvertError::Io {
        context: format!("writing blob {path}"),
        source: e,
    };
    let mut out = BufWriter::with_capacity(1 << 20, file.as_file());
    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut pending: BTreeMap<u32, EncodedChunk> = BTreeMap::new();
    let mut next = first_seq;
    for (seq, encoded) in done {
        let encoded = encoded.map_err(|e| ConvertError::Io {
            context: "compressing a chunk".into(),
            source: e,
        })?;
        pending.insert(seq, encoded);
        while let Some(chunk) = pending.remove(&next) {
            let id = match table.by_digest.get(&chunk.digest) {
                Some(id) => {
                    table.deduplicated += 1;
                    *id
                }
                None => {
                    out.write_all(&chunk.stored).map_err(werr)?;
                    sha.update(&chunk.stored);
                    let id = table.records.len() as u32;
                    table.records.push(ChunkRecord {
                        blob: blob_index,
                        flags: chunk.flags,
                        comp_off: size,
                        comp_len: chunk.stored.len() as u32,
                        raw_len: chunk.raw_len,
                        crc32: chunk.crc32,
                        digest: chunk.digest,
                    });
                    table.by_digest.insert(chunk.digest, id);
                    size += chunk.stored.len() as u64;
                    id
                }
            };
            debug_assert_eq!(table.provisional.len() as u32, next);
            table.provisional.push(id);
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
    Ok(WriterOutput {
        table,
        blob: FinishedBlob {
            file,
            digest: format!("sha256:{}", hex::encode(sha.finalize())),
            size,
        },
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
                p.add_file(&mut &f[..], f.len() as u64, &|| "f".into())
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
            .add_file(&mut &[1u8; 10][..], 100, &|| "etc/passwd".into())
            .unwrap_err();
        assert!(err.to_string().contains("etc/passwd"), "{err}");
    }
}
