//! A `ChunkSource` over data blobs in a local store: reads a chunk's stored bytes with one
//! positioned read, verifies and decodes them (`fusefs::chunk::decode_chunk`), and keeps
//! recently decoded chunks in the decoded-chunk LRU (`decoded`), keyed by chunk digest.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fusefs::chunk::decode_chunk;
use fusefs::{ChunkRef, ChunkSource, Index, SourceError};
use tracing::error;

use crate::decoded::DecodedLru;
use crate::store::{LocalStore, StoreError};

/// Default budget of the decoded-chunk LRU: 64 default-size chunks.
pub const DEFAULT_MEMORY_CACHE: usize = 64 << 20;

/// Counters a mount reports on exit.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub chunk_reads: AtomicU64,
    pub memory_hits: AtomicU64,
    pub bytes_read_from_disk: AtomicU64,
    pub bytes_decoded: AtomicU64,
    pub errors: AtomicU64,
}

impl SourceStats {
    pub fn summary(&self) -> String {
        format!(
            "{} chunk reads ({} from memory), {} bytes read from blobs, {} bytes decoded, {} errors",
            self.chunk_reads.load(Ordering::Relaxed),
            self.memory_hits.load(Ordering::Relaxed),
            self.bytes_read_from_disk.load(Ordering::Relaxed),
            self.bytes_decoded.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// Serves chunks from the blob files of a local store.
pub struct LocalChunkSource {
    blobs: HashMap<String, File>,
    decoded: Mutex<DecodedLru>,
    pub stats: SourceStats,
}

impl LocalChunkSource {
    /// Opens every data blob `index` reads from. A missing blob is an error now rather than
    /// EIO later.
    pub fn new(
        store: &LocalStore,
        index: &Index,
        memory_budget: usize,
    ) -> Result<Self, StoreError> {
        let mut blobs = HashMap::new();
        for blob in index.blobs()? {
            let digest = format!("sha256:{}", hex::encode(blob.sha256));
            let path = store.blob_path(&digest)?;
            let file = File::open(&path).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
            blobs.insert(digest, file);
        }
        // `memory_budget` bytes, and never under four chunks: at the default 1 MiB chunk size
        // that is the bound the LRU had when it counted entries (`memory_budget / chunk_size`
        // chunks, at least 4), now in bytes.
        let budget = memory_budget.max(4 * index.chunk_size() as usize);
        Ok(LocalChunkSource {
            blobs,
            decoded: Mutex::new(DecodedLru::new(budget)),
            stats: SourceStats::default(),
        })
    }

    /// The decoded-chunk LRU. A panic elsewhere while holding the lock cannot leave it
    /// inconsistent (entries are whole `Arc`s), so a poisoned lock is simply taken over.
    fn lru(&self) -> std::sync::MutexGuard<'_, DecodedLru> {
        self.decoded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn load(&self, chunk: &ChunkRef) -> Result<Vec<u8>, SourceError> {
        let file = self
            .blobs
            .get(&chunk.blob_digest)
            .ok_or_else(|| SourceError::Blob {
                blob: chunk.blob_digest.clone(),
                reason: "blob is not open".into(),
            })?;
        let mut stored = vec![0u8; chunk.record.comp_len as usize];
        file.read_exact_at(&mut stored, chunk.record.comp_off)
            .map_err(|e| SourceError::Blob {
                blob: chunk.blob_digest.clone(),
                reason: format!(
                    "reading {} bytes at offset {}: {e}",
                    stored.len(),
                    chunk.record.comp_off
                ),
            })?;
        self.stats
            .bytes_read_from_disk
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        let raw = decode_chunk(&chunk.record, &stored)?;
        self.stats
            .bytes_decoded
            .fetch_add(raw.len() as u64, Ordering::Relaxed);
        Ok(raw)
    }
}

impl ChunkSource for LocalChunkSource {
    fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        if let Some(hit) = self.chunk_in_memory(chunk) {
            return Ok(hit);
        }
        self.stats.chunk_reads.fetch_add(1, Ordering::Relaxed);
        let key = chunk.record.digest;
        match self.load(chunk) {
            Ok(raw) => {
                let raw = Arc::new(raw);
                self.lru().put(key, raw.clone());
                Ok(raw)
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                error!(
                    chunk = chunk.index,
                    blob = %chunk.blob_digest,
                    "chunk not served: {e}"
                );
                Err(e)
            }
        }
    }

    fn chunk_in_memory(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let hit = self.lru().get(&chunk.record.digest)?;
        self.stats.chunk_reads.fetch_add(1, Ordering::Relaxed);
        self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(hit)
    }
}
