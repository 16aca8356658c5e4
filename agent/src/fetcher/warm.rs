//! [`Fetcher::warm`]: every chunk of a list that the disk cache lacks, fetched in list order at
//! a priority of the caller's, keeping a bounded window of bytes queued or in flight, with
//! progress. `lazyctl warm` (background priority), the hot-chunk profile after a mount
//! (prefetch priority) and the whole image after a mount (background, under a bandwidth limit)
//! all run through it.
//!
//! A warm hears of completions through a channel of digests and outcomes and never holds chunk
//! data, so its memory does not grow with the image. It fails at the first chunk that cannot be
//! fetched (after the fetcher's retries) or cached, and at the end when the cache no longer
//! holds every chunk (a disk smaller than the cache budget makes it evict some to take the
//! rest): a warm that reports success has filled the cache. A cancelled warm drops its queued jobs that nothing else waits for (a reader that
//! joined one as it was dropped fetches it again).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusefs::ChunkRef;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{stored_len, Backend, Fetcher, Priority, RateLimit};
use crate::sync::lock;

/// Default [`WarmOptions::window_bytes`]: four times what the background requests of a default
/// fetcher carry at once (4 requests of 8 MiB), so the queue does not run dry between a
/// completion and the warm topping it up, and a cancelled warm has little queued to drop. The
/// window costs queue entries, not memory for chunk data: fetched chunks go to the disk cache.
pub const DEFAULT_WARM_WINDOW: u64 = 4 * 4 * (8 << 20);

/// How often a warm that hears of no completion calls its `progress` anyway (background work
/// paused behind readers, or a slow backend), so a cancel is noticed within about this long.
const WARM_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How a [`Fetcher::warm`] runs.
#[derive(Debug, Clone)]
pub struct WarmOptions {
    /// Bandwidth limit shared with other background work; `None`: full speed. Only background
    /// warms are limited.
    pub limit: Option<Arc<RateLimit>>,
    /// Most stored bytes queued or in flight at once (one larger chunk is still let through).
    pub window_bytes: u64,
    /// The class its requests are queued in: `Background` for `lazyctl warm` and the whole
    /// image, `Prefetch` for a hot-chunk profile.
    pub priority: Priority,
    /// Readers will read these chunks soon, about in this order (a hot-chunk profile): each is
    /// also decoded into memory ahead of them once fetched (`decode`).
    pub decode_ahead: bool,
}

impl Default for WarmOptions {
    fn default() -> Self {
        WarmOptions {
            limit: None,
            window_bytes: DEFAULT_WARM_WINDOW,
            priority: Priority::Background,
            decode_ahead: false,
        }
    }
}

/// Where a warm stands. Bytes are stored (compressed) bytes, as in the blobs and the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmProgress {
    /// Distinct chunks asked for.
    pub total_chunks: u64,
    pub total_bytes: u64,
    /// Already in the disk cache when the warm began.
    pub cached_chunks: u64,
    pub cached_bytes: u64,
    /// Fetched into the disk cache by this warm (or by a fetch it joined).
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    pub failed_chunks: u64,
}

/// Why a warm stopped before filling the cache.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The chunk could not be fetched (retries included) or failed verification.
    #[error("chunk {chunk} of blob {blob} not fetched: {reason}")]
    Fetch {
        chunk: String,
        blob: String,
        reason: String,
    },
    /// The chunk was fetched but the disk cache refused it (disk full, I/O error).
    #[error("chunk {chunk} of blob {blob} not cached: {reason}")]
    NotCached {
        chunk: String,
        blob: String,
        reason: String,
    },
    /// The chunks cannot all be in the cache at once: warming them would evict the first ones.
    #[error("warm needs {needed} bytes of chunk cache but its budget is {budget} bytes; raise the cache budget")]
    TooLarge { needed: u64, budget: u64 },
    /// Every chunk was fetched and cached, but the cache evicted some of them again before the
    /// warm ended: its disk holds less than its budget (disk full), or other work filled it.
    #[error("warm fetched every chunk but the chunk cache kept only {kept} of {total}: the rest were evicted to make room (is the cache's disk smaller than its budget, or full?); free disk space or lower cache_size")]
    Evicted { kept: u64, total: u64 },
    #[error("warm needs a disk cache; this fetcher has none")]
    NoCache,
    /// `progress` returned false.
    #[error("warm cancelled")]
    Cancelled,
}

impl WarmError {
    fn of(chunk: &ChunkRef, failure: WarmFailure) -> WarmError {
        let (chunk, blob) = (chunk.digest_hex(), chunk.blob_digest.clone());
        match failure {
            WarmFailure::Fetch(reason) => WarmError::Fetch {
                chunk,
                blob,
                reason,
            },
            WarmFailure::NotCached(reason) => WarmError::NotCached {
                chunk,
                blob,
                reason,
            },
        }
    }
}

/// Why a chunk a watcher waited for is not in the cache.
pub(super) enum WarmFailure {
    Fetch(String),
    NotCached(String),
}

/// What a watcher (a warm, a stream) hears when a chunk it waits for is done. No chunk bytes,
/// so a watcher's memory does not grow with what it fetched.
pub struct Done {
    /// The chunk's blake3 digest.
    pub digest: [u8; 32],
    pub(super) outcome: Result<(), WarmFailure>,
}

impl Done {
    /// Whether the chunk was fetched and verified (and cached, with a disk cache).
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }

    /// A message naming no chunk: wakes a watcher to look at its own state again.
    pub fn nudge() -> Done {
        Done {
            digest: [0; 32],
            outcome: Ok(()),
        }
    }
}

impl Fetcher {
    /// Fetches every chunk of `chunks` (deduplicated by digest) that the disk cache lacks, in
    /// `opts.priority`'s queue, keeping at most `opts.window_bytes` stored bytes queued or in
    /// flight. Blocks: call it from a plain thread or `spawn_blocking`, never from the runtime.
    ///
    /// `progress` is called once at the start, after each completion, and at least every
    /// second while waiting; when it returns false the warm stops with `Cancelled` (requests
    /// already in flight still run and fill the cache). The warm stops at the first chunk that
    /// cannot be fetched after the fetcher's retries, or that the cache refuses, with an error
    /// naming it; chunks fetched before stay cached.
    pub fn warm(
        &self,
        backend: &Arc<Backend>,
        chunks: &[ChunkRef],
        opts: &WarmOptions,
        progress: &mut dyn FnMut(&WarmProgress) -> bool,
    ) -> Result<WarmProgress, WarmError> {
        let shared = &self.shared;
        let cache = shared.cache.as_ref().ok_or(WarmError::NoCache)?;
        let started = Instant::now();
        let mut p = WarmProgress::default();
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        for chunk in chunks {
            if !seen.insert(chunk.record.digest) {
                continue;
            }
            let len = stored_len(chunk);
            p.total_chunks += 1;
            p.total_bytes += len;
            if cache.contains(&chunk.record.digest) {
                p.cached_chunks += 1;
                p.cached_bytes += len;
            } else {
                missing.push(chunk);
            }
        }
        drop(seen);
        // Payload bytes only: with entry headers the real need is slightly larger.
        if p.total_bytes > cache.budget_bytes() {
            return Err(WarmError::TooLarge {
                needed: p.total_bytes,
                budget: cache.budget_bytes(),
            });
        }
        if !progress(&p) {
            return Err(WarmError::Cancelled);
        }
        let limit = opts
            .limit
            .as_ref()
            .filter(|_| opts.priority == Priority::Background);
        let (tx, rx) = mpsc::channel();
        let mut waiting: HashMap<[u8; 32], &ChunkRef> = HashMap::new();
        let mut window = 0u64;
        let mut next = missing.into_iter().peekable();
        loop {
            while let Some(&chunk) = next.peek() {
                let len = stored_len(chunk);
                if !waiting.is_empty() && window + len > opts.window_bytes {
                    break;
                }
                next.next();
                waiting.insert(chunk.record.digest, chunk);
                window += len;
                let (flight, _) = shared.join(backend, chunk, opts.priority, limit, Some(&tx));
                if opts.decode_ahead {
                    // (A flight that finished meanwhile was decoded or cached without it.)
                    lock(&flight.state).decode_ahead = true;
                }
            }
            shared.dispatch(backend);
            if waiting.is_empty() {
                break;
            }
            // `tx` lives as long as this loop, so the channel is never disconnected here.
            let Ok(done) = rx.recv_timeout(WARM_PROGRESS_INTERVAL) else {
                if !progress(&p) {
                    return Err(self.cancel_warm(backend, &waiting, opts.priority));
                }
                continue;
            };
            let Some(chunk) = waiting.remove(&done.digest) else {
                continue;
            };
            let len = stored_len(chunk);
            window -= len;
            match done.outcome {
                Ok(()) => {
                    p.fetched_chunks += 1;
                    p.fetched_bytes += len;
                }
                Err(failure) => {
                    p.failed_chunks += 1;
                    progress(&p);
                    return Err(WarmError::of(chunk, failure));
                }
            }
            if !progress(&p) {
                return Err(self.cancel_warm(backend, &waiting, opts.priority));
            }
        }
        // A warm that reports success has filled the cache: each chunk was cached when it
        // came, but a disk smaller than the budget makes the cache evict earlier ones to take
        // later ones.
        let mut kept = HashSet::new();
        for chunk in chunks {
            if cache.contains(&chunk.record.digest) {
                kept.insert(chunk.record.digest);
            }
        }
        if (kept.len() as u64) < p.total_chunks {
            return Err(WarmError::Evicted {
                kept: kept.len() as u64,
                total: p.total_chunks,
            });
        }
        debug!(
            backend = %backend.id,
            chunks = p.fetched_chunks,
            bytes = p.fetched_bytes,
            cached = p.cached_chunks,
            "warm done in {:?}",
            started.elapsed()
        );
        Ok(p)
    }

    /// Stops a warm: drops its queued jobs nobody else waits for (requests in flight finish
    /// and are cached).
    fn cancel_warm(
        &self,
        backend: &Backend,
        waiting: &HashMap<[u8; 32], &ChunkRef>,
        priority: Priority,
    ) -> WarmError {
        let digests: HashSet<[u8; 32]> = waiting.keys().copied().collect();
        let dropped = self.shared.drop_queued(backend, &digests, priority);
        debug!(backend = %backend.id, dropped, "warm cancelled");
        WarmError::Cancelled
    }
}
