//! The decoded-chunk LRU: chunks readers asked for, decoded, bounded in bytes (chunk sizes
//! differ from image to image, and a file's last chunk is short). A hit is an `Arc` clone; what
//! it saves is a chunk's read, checks and decode when several reads share it (small files
//! packed into one chunk, 128 KiB reads of a 1 MiB chunk). Both chunk sources keep one behind a
//! lock of their own and count their own hits: the fetcher (remote mounts, beside the disk
//! cache) and `local::LocalChunkSource` (local stores). The `lru` crate keeps the order; this
//! adds the byte budget.

use std::sync::Arc;

use lru::LruCache;

/// The LRU and its budget in bytes.
pub(crate) struct DecodedLru {
    lru: LruCache<[u8; 32], Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

impl DecodedLru {
    pub(crate) fn new(budget: usize) -> DecodedLru {
        DecodedLru {
            lru: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    pub(crate) fn get(&mut self, digest: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        self.lru.get(digest).cloned()
    }

    /// Whether the chunk is held, without making it recent.
    pub(crate) fn contains(&self, digest: &[u8; 32]) -> bool {
        self.lru.contains(digest)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// Keeps `data`, evicting the least recently used chunks beyond the budget (the newest
    /// chunk stays even when it alone is over it); returns the digests evicted.
    pub(crate) fn put(&mut self, digest: [u8; 32], data: Arc<Vec<u8>>) -> Vec<[u8; 32]> {
        self.bytes += data.len();
        if let Some(old) = self.lru.put(digest, data) {
            self.bytes -= old.len();
        }
        let mut evicted = Vec::new();
        while self.bytes > self.budget && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((gone, old)) => {
                    self.bytes -= old.len();
                    evicted.push(gone);
                }
                None => break,
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_chunks_within_the_budget() {
        let mut m = DecodedLru::new(250);
        m.put([1; 32], Arc::new(vec![0; 100]));
        m.put([2; 32], Arc::new(vec![0; 100]));
        assert!(m.get(&[1; 32]).is_some(), "1 is now the most recent");
        assert_eq!(m.put([3; 32], Arc::new(vec![0; 100])), vec![[2; 32]]);
        assert!(m.contains(&[1; 32]) && m.contains(&[3; 32]));
        assert!(!m.contains(&[2; 32]), "the least recent went");
        // A chunk larger than the budget is kept alone.
        m.put([4; 32], Arc::new(vec![0; 1000]));
        assert!(m.contains(&[4; 32]) && !m.contains(&[1; 32]));
    }
}
