//! The fetcher: the `ChunkSource` a mount of a remote image reads through, and the warm and
//! background prefetch that fill the disk cache ahead of readers.
//!
//! A chunk read tries, in order: the decoded-chunk LRU in memory, the compressed chunk cache on
//! disk (`cache`), and the chunk's backend (`BlobStore`). Misses go through one table of fetches
//! in flight, keyed by chunk digest (single-flight: any number of readers, read-aheads and warms
//! of one chunk cause one fetch), and one queue per backend and [`Priority`]:
//!
//! - `Demand`: a reader is blocked on the chunk. Dispatched before anything else, always.
//! - `Prefetch`: a reader's read-ahead hint, or a stream of a file's chunks ahead of its reader
//!   (`stream`: safetensors tensors in offset order). Fills idle capacity; never limited or
//!   paused.
//! - `Background`: warm and hot-chunk profile prefetch. Strict priority: no background request
//!   starts while a demand job of the backend is queued or running, so a reader's request never
//!   shares the link with background transfers started after it; and a background job may carry
//!   a bandwidth limit.
//!
//! A queued job that a more urgent caller asks for moves to that caller's queue: a reader
//! waiting on a queued prefetch or background chunk promotes it to demand, a read-ahead of a
//! queued background chunk moves it to prefetch.
//!
//! When a queue is dispatched, the job taken is extended with jobs of the same queue and blob
//! whose stored bytes are adjacent (before or after) into one range request of at most
//! `max_request_bytes`: a kernel read-ahead of several chunks, or a warm run, becomes one GET.
//! Each backend runs at most `concurrency` demand requests and, besides them, at most
//! `prefetch_requests` prefetch and background requests at once: prefetch never takes a slot a
//! demand read could use, and many prefetch requests can fill a fast link (object stores carry
//! ~100 MB/s per connection). Background requests are fewer
//! and smaller still (`background_requests` of at most `background_request_bytes`): a demand
//! request that arrives during a warm shares the link with the background requests already in
//! flight until they end, so those are kept to what fills the link.
//!
//! **Bandwidth limit.** A [`RateLimit`] is a token bucket in bytes per second, shared by every
//! background job that holds it (for example all warms of an agent). A limited background
//! request is dispatched only once the bucket holds its (coalesced) bytes; until then a tokio
//! timer re-runs the dispatch when the tokens will be there: no busy loop, no blocked thread.
//! Demand and prefetch requests are never limited and do not take tokens. The background queue
//! is served in order, so a job waiting for tokens also holds back the jobs queued behind it.
//!
//! **Warm.** [`Fetcher::warm`] fetches every chunk of a list that the disk cache lacks, at
//! background priority, keeping a bounded window of bytes queued or in flight, and reports
//! progress. It hears of completions through a channel of digests and outcomes and never holds
//! chunk data, so its memory does not grow with the image. It fails at the first chunk that
//! cannot be fetched (after retries) or cached: a warm that reports success has filled the
//! cache. A cancelled warm drops its queued jobs that nothing else waits for (a reader that
//! joined one as it was dropped fetches it again). [`Fetcher::prefetch_background`] queues a
//! list (a hot-chunk profile) and returns. [`Fetcher::prefetch_watched`] queues one chunk at
//! prefetch priority and tells a watcher when it is done (how a stream keeps a bounded number of
//! bytes queued), and [`Fetcher::cancel_prefetch`] drops a stopped stream's queued jobs.
//!
//! A request is bounded by `request_timeout`; transient failures (connection errors, 5xx, short
//! bodies, timeouts) are retried with exponential backoff up to `max_attempts`; permanent ones
//! (missing blob, denied, bad range) are not. Every chunk's bytes are checked (length, crc32,
//! zstd, blake3: `decode_chunk`) before they are cached or served; a mismatch is logged and the
//! chunk is not served. A reader waits at most `read_timeout` for its chunk and then gets an
//! error (EIO at the filesystem) with a log line saying why; the next read starts a new fetch,
//! so reads succeed again as soon as the backend is back.
//!
//! Blocking and async meet here: `ChunkSource::chunk` and `warm` are called on plain threads
//! and block on a condition variable or a channel; requests and rate-limit timers run on the
//! fetcher's own tokio runtime; verification and decoding run on its blocking pool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fusefs::chunk::decode_chunk;
use fusefs::{ChunkRef, ChunkSource, SourceError};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, warn};

use crate::blobstore::{BlobError, BlobStore};
use crate::cache::{CacheError, ChunkCache};
use crate::metrics::{BackendMetrics, ChunkMetrics, MetricsSnapshot, StreamMetrics};

/// Who asked for a chunk, most urgent first; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A reader is blocked on the chunk.
    Demand,
    /// A reader's read-ahead hint: not limited, not paused by demand reads.
    Prefetch,
    /// Warm and hot-chunk profile prefetch: paused while demand reads of the backend are queued
    /// or running, and optionally rate-limited.
    Background,
}

/// Bucket capacity of a [`RateLimit`], in seconds of its rate. A quarter second lets a few
/// requests go out together after a pause (so timers fire a few times a second, not once per
/// request) while the bytes sent in any second stay within 25% of the limit. A request larger
/// than the bucket (an 8 MiB coalesced request under a 16 MiB/s limit) is let through when the
/// bucket is full and leaves it in debt: the burst is then one such request, and the long-run
/// rate still holds.
const BURST_SECONDS: f64 = 0.25;

/// Shortest wait for tokens: tokio's timer resolution, so a wait that rounds to nothing still
/// sleeps instead of spinning through dispatch.
const MIN_TOKEN_WAIT: Duration = Duration::from_millis(1);

/// A token bucket in bytes per second, shared by the background work that holds it; see the
/// module docs.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative after a request larger than the bucket.
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (0 is taken as 1). The bucket starts full.
    pub fn new(bytes_per_sec: u64) -> Arc<RateLimit> {
        let rate = bytes_per_sec.max(1);
        Arc::new(RateLimit {
            rate,
            bucket: Mutex::new(Bucket {
                tokens: rate as f64 * BURST_SECONDS,
                refilled: Instant::now(),
            }),
        })
    }

    /// The limit in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` tokens when the bucket holds them (or is full, for a request larger than
    /// the bucket); otherwise says how long until it will.
    fn try_take(&self, bytes: u64) -> Result<(), Duration> {
        let rate = self.rate as f64;
        let capacity = rate * BURST_SECONDS;
        let now = Instant::now();
        let mut bucket = lock(&self.bucket);
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.refilled = now;
        let need = (bytes as f64).min(capacity);
        if bucket.tokens >= need {
            bucket.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - bucket.tokens) / rate).max(MIN_TOKEN_WAIT))
        }
    }
}

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
    /// Bandwidth limit shared with other background work; `None`: full speed.
    pub limit: Option<Arc<RateLimit>>,
    /// Most stored bytes queued or in flight at once (one larger chunk is still let through).
    pub window_bytes: u64,
}

impl Default for WarmOptions {
    fn default() -> Self {
        WarmOptions {
            limit: None,
            window_bytes: DEFAULT_WARM_WINDOW,
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

/// What a watcher (a warm, a stream) hears when a chunk it waits for is done. No chunk bytes,
/// so a watcher's memory does not grow with what it fetched.
pub struct Done {
    /// The chunk's blake3 digest.
    pub digest: [u8; 32],
    outcome: Result<(), WarmFailure>,
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

enum WarmFailure {
    Fetch(String),
    NotCached(String),
}

/// Tunables of the fetcher. The defaults suit a registry or S3 over a data-centre network.
#[derive(Debug, Clone)]
pub struct FetcherConfig {
    /// Bound on one request (connect, headers and body together).
    pub request_timeout: Duration,
    /// How long a reader waits for a chunk before it gets EIO, retries included.
    pub read_timeout: Duration,
    /// Attempts per request, the first one included; only transient errors are retried.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// Largest coalesced range request.
    pub max_request_bytes: u64,
    /// Demand requests in flight per backend.
    pub concurrency: usize,
    /// Prefetch (read-ahead, streams) and background requests in flight per backend, besides
    /// the demand requests.
    pub prefetch_requests: usize,
    /// Background (warm, profile prefetch) requests in flight per backend, within
    /// `prefetch_requests`.
    pub background_requests: usize,
    /// Largest coalesced background request.
    pub background_request_bytes: u64,
    /// Budget of the decoded-chunk LRU.
    pub memory_budget: usize,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        FetcherConfig {
            request_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_attempts: 4,
            retry_backoff: Duration::from_millis(100),
            // Eight default chunks: at 1 Gbit/s and 20 ms per request this keeps a request's
            // fixed cost under a third of its transfer time, and a retry costs little.
            max_request_bytes: 8 << 20,
            // Enough requests in flight to fill a 10 Gbit/s, 20 ms link with 8 MiB requests
            // (bandwidth-delay product ~25 MB), few enough not to trip registry rate limits.
            concurrency: 16,
            // A stream of tensors should fill the link on its own: 16 requests of 8 MiB keep
            // 128 MiB in flight, the bandwidth-delay product of 10 Gbit/s at 100 ms, and 16
            // object-store connections of ~100 MB/s each.
            prefetch_requests: 16,
            // Background bytes in flight are what a demand request shares the link with: a
            // demand read that arrives during a warm waits for its own bytes at 1/(n+1) of the
            // link until the n background requests in flight end (none start while it runs).
            // Four 8 MiB requests (32 MiB) fill a 1 Gbit/s, 20 ms link (bandwidth-delay product
            // 2.5 MB; each request spends 20 ms waiting and ~67 ms transferring) with little
            // cost per byte (a 4.2 GB model warmed from an S3 server at 1 Gbit/s: 87 % of the
            // link with 4 MiB requests, 93 % with 8 MiB; docs/BENCHMARKS.md), and keep that
            // share at 1/5 for at most ~270 ms. Faster or farther links want more.
            background_requests: 4,
            background_request_bytes: 8 << 20,
            memory_budget: 64 << 20,
        }
    }
}

/// One blob store as the fetcher sees it: the store, its queue and its metrics.
pub struct Backend {
    store: Arc<dyn BlobStore>,
    name: String,
    queue: Mutex<Queue>,
    pub metrics: BackendMetrics,
}

#[derive(Default)]
struct Queue {
    demand: VecDeque<Job>,
    prefetch: VecDeque<Job>,
    background: VecDeque<Job>,
    running: usize,
    /// Requests in flight that were taken from the prefetch or background queue; the others
    /// (`running - running_low`) are demand requests.
    running_low: usize,
    /// Requests in flight that were taken from the background queue.
    running_background: usize,
    /// When the armed rate-limit timer fires, if one is armed.
    token_timer: Option<Instant>,
}

impl Queue {
    fn jobs(&mut self, priority: Priority) -> &mut VecDeque<Job> {
        match priority {
            Priority::Demand => &mut self.demand,
            Priority::Prefetch => &mut self.prefetch,
            Priority::Background => &mut self.background,
        }
    }
}

struct Job {
    chunk: ChunkRef,
    flight: Arc<Flight>,
    /// The bandwidth limit of a background job; `None` in the other queues.
    limit: Option<Arc<RateLimit>>,
}

impl Job {
    fn range(&self) -> Range<u64> {
        let start = self.chunk.record.comp_off;
        start..start + stored_len(&self.chunk)
    }
}

fn stored_len(chunk: &ChunkRef) -> u64 {
    u64::from(chunk.record.comp_len)
}

/// A fetch in flight: readers wait on it; the fetch task completes it once.
struct Flight {
    state: Mutex<FlightState>,
    done: Condvar,
}

struct FlightState {
    priority: Priority,
    /// Still in a backend queue (not yet dispatched), so it can be promoted.
    queued: bool,
    result: Option<Result<Arc<Vec<u8>>, SourceError>>,
    /// Why the fetched chunk is not in the disk cache, when the cache refused it.
    cache_error: Option<String>,
    /// Warms waiting for this chunk; each hears once, when the flight finishes.
    watchers: Vec<mpsc::Sender<Done>>,
    /// Started by a warm: may be dropped from the queue when that warm is cancelled.
    for_warm: bool,
    /// Dropped from the queue unfetched (its warm was cancelled): a reader that had joined it
    /// starts a new fetch.
    abandoned: bool,
}

impl FlightState {
    /// What a warm hears of this finished flight.
    fn done(&self, digest: [u8; 32]) -> Done {
        let outcome = match (&self.result, &self.cache_error) {
            (Some(Err(e)), _) => Err(WarmFailure::Fetch(e.to_string())),
            (_, Some(reason)) => Err(WarmFailure::NotCached(reason.clone())),
            _ => Ok(()),
        };
        Done { digest, outcome }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded structure here is updated in single assignments or whole-entry inserts, so a
    // panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend {
    pub fn new(store: Arc<dyn BlobStore>) -> Arc<Backend> {
        Arc::new(Backend {
            name: store.describe(),
            store,
            queue: Mutex::new(Queue::default()),
            metrics: BackendMetrics::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }
}

/// The decoded-chunk LRU, bounded in bytes.
struct MemoryCache {
    lru: LruCache<[u8; 32], Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

impl MemoryCache {
    fn get(&mut self, digest: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        self.lru.get(digest).cloned()
    }

    fn put(&mut self, digest: [u8; 32], data: Arc<Vec<u8>>) {
        self.bytes += data.len();
        if let Some(old) = self.lru.put(digest, data) {
            self.bytes -= old.len();
        }
        while self.bytes > self.budget && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

/// Fetches chunks for every mount of the process; see the module docs.
///
/// The runtime lives here and the state requests need lives in [`Shared`], so tasks never hold
/// the runtime: it is dropped with the last `Fetcher` handle, outside any task.
pub struct Fetcher {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
}

struct Shared {
    config: FetcherConfig,
    handle: tokio::runtime::Handle,
    cache: Option<Arc<ChunkCache>>,
    memory: Mutex<MemoryCache>,
    flights: Mutex<HashMap<[u8; 32], Arc<Flight>>>,
    backends: Mutex<Vec<Arc<Backend>>>,
    metrics: ChunkMetrics,
    /// Set while the disk cache refuses inserts, so "disk full" is logged once per episode.
    disk_full: AtomicBool,
    stream_metrics: StreamMetrics,
}

impl Fetcher {
    /// A fetcher with its own runtime. `cache` is the shared disk cache (`None`: memory only).
    pub fn new(
        config: FetcherConfig,
        cache: Option<Arc<ChunkCache>>,
    ) -> std::io::Result<Arc<Fetcher>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lazy-fetch")
            .enable_all()
            .build()?;
        Ok(Arc::new(Fetcher {
            shared: Arc::new(Shared {
                memory: Mutex::new(MemoryCache {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                    budget: config.memory_budget,
                }),
                config,
                handle: runtime.handle().clone(),
                cache,
                flights: Mutex::new(HashMap::new()),
                backends: Mutex::new(Vec::new()),
                metrics: ChunkMetrics::default(),
                disk_full: AtomicBool::new(false),
                stream_metrics: StreamMetrics::default(),
            }),
            runtime,
        }))
    }

    /// The runtime requests run on; callers may use it for their own async work (opening
    /// images) so that one process has one runtime.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    pub fn config(&self) -> &FetcherConfig {
        &self.shared.config
    }

    pub fn cache(&self) -> Option<&Arc<ChunkCache>> {
        self.shared.cache.as_ref()
    }

    pub fn metrics(&self) -> &ChunkMetrics {
        &self.shared.metrics
    }

    /// The counters of the streams (`agent::stream`) of this fetcher's mounts.
    pub fn stream_metrics(&self) -> &StreamMetrics {
        &self.shared.stream_metrics
    }

    /// Registers a backend, reusing the one already registered for the same store location so
    /// that two images on one registry share its concurrency limit and metrics.
    pub fn backend(&self, store: Arc<dyn BlobStore>) -> Arc<Backend> {
        let mut backends = lock(&self.shared.backends);
        let name = store.describe();
        if let Some(b) = backends.iter().find(|b| b.name == name) {
            return b.clone();
        }
        let backend = Backend::new(store);
        backends.push(backend.clone());
        backend
    }

    /// The `ChunkSource` for one image whose blobs are in `backend`.
    pub fn source(self: &Arc<Self>, backend: Arc<Backend>) -> FetchSource {
        FetchSource {
            fetcher: self.clone(),
            backend,
        }
    }

    /// Reads one chunk with `priority`, blocking up to the read timeout.
    pub fn read(
        &self,
        backend: &Arc<Backend>,
        chunk: &ChunkRef,
        priority: Priority,
    ) -> Result<Arc<Vec<u8>>, SourceError> {
        self.shared.read(backend, chunk, priority)
    }

    /// Queues `chunks` at prefetch priority (a reader's read-ahead); returns at once. Chunks
    /// already cached or in flight are skipped.
    pub fn prefetch(&self, backend: &Arc<Backend>, chunks: &[ChunkRef]) {
        let shared = &self.shared;
        for chunk in chunks {
            if !shared.holds(&chunk.record.digest) {
                shared.join(backend, chunk, Priority::Prefetch, None, None);
            }
        }
    }

    /// Queues `chunk` at prefetch priority, or joins its fetch in flight, and has `watcher` told
    /// when it is done; returns at once. Returns false, telling nobody, when memory or the disk
    /// cache already holds the chunk: there is nothing to fetch.
    pub fn prefetch_watched(
        &self,
        backend: &Arc<Backend>,
        chunk: &ChunkRef,
        watcher: &mpsc::Sender<Done>,
    ) -> bool {
        let shared = &self.shared;
        if shared.holds(&chunk.record.digest) {
            return false;
        }
        shared.join(backend, chunk, Priority::Prefetch, None, Some(watcher));
        true
    }

    /// Drops the queued, not yet dispatched prefetch jobs of `digests` that no reader waits
    /// for and no other watcher watches (a stream stopped); requests in flight finish. Returns
    /// how many were dropped.
    pub fn cancel_prefetch(&self, backend: &Backend, digests: &HashSet<[u8; 32]>) -> usize {
        self.shared
            .drop_queued(backend, digests, Priority::Prefetch)
    }

    /// Queues `chunks` at background priority under `limit` (a hot-chunk profile), in their
    /// order; returns at once. Chunks already in the disk cache or in flight are skipped.
    pub fn prefetch_background(
        &self,
        backend: &Arc<Backend>,
        chunks: &[ChunkRef],
        limit: Option<Arc<RateLimit>>,
    ) {
        let shared = &self.shared;
        for chunk in chunks {
            if !shared.on_disk(&chunk.record.digest) {
                shared.join(backend, chunk, Priority::Background, limit.as_ref(), None);
            }
        }
    }

    /// Fetches every chunk of `chunks` (deduplicated by digest) that the disk cache lacks, at
    /// background priority, keeping at most `opts.window_bytes` stored bytes queued or in
    /// flight. Blocks: call it from a plain thread or `spawn_blocking`, never from the
    /// fetcher's runtime.
    ///
    /// `progress` is called once at the start, after each completion, and at least every
    /// second while waiting; when it returns false the warm stops with `Cancelled` (jobs
    /// already queued still run and fill the cache). The warm stops at the first chunk that
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
                shared.join(
                    backend,
                    chunk,
                    Priority::Background,
                    opts.limit.as_ref(),
                    Some(&tx),
                );
            }
            if waiting.is_empty() {
                break;
            }
            // `tx` lives as long as this loop, so the channel is never disconnected here.
            let Ok(done) = rx.recv_timeout(WARM_PROGRESS_INTERVAL) else {
                if !progress(&p) {
                    return Err(self.cancel_warm(backend, &waiting));
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
                return Err(self.cancel_warm(backend, &waiting));
            }
        }
        debug!(
            backend = %backend.name,
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
    fn cancel_warm(&self, backend: &Backend, waiting: &HashMap<[u8; 32], &ChunkRef>) -> WarmError {
        let digests: HashSet<[u8; 32]> = waiting.keys().copied().collect();
        let dropped = self
            .shared
            .drop_queued(backend, &digests, Priority::Background);
        debug!(backend = %backend.name, dropped, "warm cancelled");
        WarmError::Cancelled
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let shared = &self.shared;
        MetricsSnapshot {
            chunks: shared.metrics.snapshot(),
            streams: shared.stream_metrics.snapshot(),
            backends: lock(&shared.backends)
                .iter()
                .map(|b| b.metrics.snapshot(b.store.kind(), &b.name))
                .collect(),
            cache: shared.cache.as_ref().map(|c| c.stats()),
        }
    }
}

/// What a mount reads through: the process's fetcher and the image's backend.
pub struct FetchSource {
    fetcher: Arc<Fetcher>,
    backend: Arc<Backend>,
}

impl FetchSource {
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl ChunkSource for FetchSource {
    fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        self.fetcher.read(&self.backend, chunk, Priority::Demand)
    }

    /// Sequential read-ahead from the filesystem becomes prefetch: it fills idle capacity and
    /// never delays a demand read.
    fn read_ahead(&self, chunks: &[ChunkRef]) {
        self.fetcher.prefetch(&self.backend, chunks);
    }
}

impl Shared {
    /// Whether memory or the disk cache has the chunk, without reading it or counting a lookup.
    fn holds(&self, digest: &[u8; 32]) -> bool {
        lock(&self.memory).lru.contains(digest) || self.on_disk(digest)
    }

    /// Whether the disk cache has the chunk (what background work fills), without reading it.
    fn on_disk(&self, digest: &[u8; 32]) -> bool {
        self.cache.as_ref().is_some_and(|c| c.contains(digest))
    }

    /// A chunk from memory or the disk cache, without fetching.
    fn cached(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let digest = &chunk.record.digest;
        if let Some(hit) = lock(&self.memory).get(digest) {
            self.metrics.memory_hits.inc();
            return Some(hit);
        }
        let cache = self.cache.as_ref()?;
        let entry = cache.get(digest)?;
        match decode_chunk(&entry.record, &entry.bytes) {
            Ok(raw) => {
                self.metrics.disk_hits.inc();
                let raw = Arc::new(raw);
                lock(&self.memory).put(*digest, raw.clone());
                Some(raw)
            }
            Err(e) => {
                warn!(chunk = %chunk.digest_hex(), "cached chunk fails verification, refetching: {e}");
                cache.remove(digest);
                None
            }
        }
    }

    fn read(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        chunk: &ChunkRef,
        priority: Priority,
    ) -> Result<Arc<Vec<u8>>, SourceError> {
        self.metrics.reads.inc();
        if let Some(hit) = self.cached(chunk) {
            return Ok(hit);
        }
        self.metrics.misses.inc();
        let mut result;
        // A flight dropped unfetched by a cancelled warm just as this read joined it is
        // started again; a drop needs a cancel, so two tries are plenty.
        for _ in 0..3 {
            let (flight, leader) = self.join(backend, chunk, priority, None, None);
            if !leader {
                self.metrics.joined.inc();
            }
            result = self.wait(&flight, chunk, backend);
            if result.is_ok() || !lock(&flight.state).abandoned {
                if result.is_err() {
                    self.metrics.read_errors.inc();
                }
                return result;
            }
        }
        self.metrics.read_errors.inc();
        Err(SourceError::Blob {
            blob: chunk.blob_digest.clone(),
            reason: "fetch dropped by cancelled warms".to_string(),
        })
    }

    /// Drops the queued, not yet dispatched jobs of `digests` in the `queue` (background: a
    /// cancelled warm's; prefetch: a stopped stream's) that only the one stopping watches, so
    /// it stops fetching at once. Jobs that a reader or another watcher has joined stay
    /// queued (a reader's promotes the job out of this queue); a read-ahead hint that joined a
    /// dropped prefetch job loses it, which costs only that hint.
    fn drop_queued(
        &self,
        backend: &Backend,
        digests: &HashSet<[u8; 32]>,
        queue: Priority,
    ) -> usize {
        let dropped: VecDeque<Job> = {
            let mut jobs = lock(&backend.queue);
            let jobs = jobs.jobs(queue);
            let (dropped, kept): (VecDeque<Job>, VecDeque<Job>) = jobs.drain(..).partition(|job| {
                digests.contains(&job.chunk.record.digest) && {
                    let state = lock(&job.flight.state);
                    (state.for_warm || queue == Priority::Prefetch)
                        && state.priority == queue
                        && state.watchers.len() <= 1
                }
            });
            *jobs = kept;
            dropped
        };
        let reason = match queue {
            Priority::Background => "warm cancelled",
            _ => "stream stopped",
        };
        for job in &dropped {
            lock(&job.flight.state).abandoned = true;
            let err = SourceError::Blob {
                blob: job.chunk.blob_digest.clone(),
                reason: reason.to_string(),
            };
            self.finish(&job.chunk.record.digest, &job.flight, Err(err), None);
        }
        dropped.len()
    }

    /// Joins the fetch in flight for `chunk` or starts one, moving a queued one up to
    /// `priority`. `limit` applies to a new background job; `watcher` hears when the fetch is
    /// done. Returns the flight and whether this call started it.
    fn join(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        chunk: &ChunkRef,
        priority: Priority,
        limit: Option<&Arc<RateLimit>>,
        watcher: Option<&mpsc::Sender<Done>>,
    ) -> (Arc<Flight>, bool) {
        let digest = chunk.record.digest;
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get(&digest).cloned() {
            drop(flights);
            if let Some(watcher) = watcher {
                let mut state = lock(&flight.state);
                if state.result.is_some() {
                    // Finished between the table lookup and now: it will not call again.
                    let _ = watcher.send(state.done(digest));
                } else {
                    state.watchers.push(watcher.clone());
                }
            }
            promote(backend, &flight, &digest, priority);
            return (flight, false);
        }
        let flight = Arc::new(Flight {
            state: Mutex::new(FlightState {
                priority,
                queued: true,
                result: None,
                cache_error: None,
                watchers: watcher.into_iter().cloned().collect(),
                for_warm: watcher.is_some() && priority == Priority::Background,
                abandoned: false,
            }),
            done: Condvar::new(),
        });
        flights.insert(digest, flight.clone());
        drop(flights);

        // A fetch that completed between our cache lookup and registering this flight has
        // already filled the caches: look once more, so it is not fetched twice. `holds` first,
        // so a plain miss is not looked up (and counted) in the disk cache a second time.
        // Background work is for the disk cache, so for it only the disk cache counts.
        let filled = match priority {
            Priority::Background => self.on_disk(&digest),
            Priority::Demand | Priority::Prefetch => self.holds(&digest),
        };
        if filled {
            if let Some(hit) = self.cached(chunk) {
                let cache_error =
                    (!self.on_disk(&digest)).then(|| "held in memory only".to_string());
                self.finish(&digest, &flight, Ok(hit), cache_error);
                return (flight, true);
            }
        }
        let job = Job {
            chunk: chunk.clone(),
            flight: flight.clone(),
            limit: limit.filter(|_| priority == Priority::Background).cloned(),
        };
        lock(&backend.queue).jobs(priority).push_back(job);
        self.dispatch(backend);
        (flight, true)
    }

    fn wait(
        &self,
        flight: &Flight,
        chunk: &ChunkRef,
        backend: &Backend,
    ) -> Result<Arc<Vec<u8>>, SourceError> {
        let deadline = Instant::now() + self.config.read_timeout;
        let mut state = lock(&flight.state);
        loop {
            if let Some(result) = &state.result {
                return result.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                error!(
                    chunk = %chunk.digest_hex(),
                    blob = %chunk.blob_digest,
                    backend = %backend.name,
                    "chunk not served: no data from the backend within {:?}",
                    self.config.read_timeout
                );
                return Err(SourceError::Timeout(self.config.read_timeout));
            }
            state = flight
                .done
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Completes a flight: records the result, wakes its readers, and forgets it so the next
    /// read of a failed chunk starts afresh.
    /// `cache_error` says why a fetched chunk is not in the disk cache, if the cache refused it.
    fn finish(
        &self,
        digest: &[u8; 32],
        flight: &Arc<Flight>,
        result: Result<Arc<Vec<u8>>, SourceError>,
        cache_error: Option<String>,
    ) {
        {
            let mut flights = lock(&self.flights);
            if flights.get(digest).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                flights.remove(digest);
            }
        }
        let mut state = lock(&flight.state);
        state.queued = false;
        state.result = Some(result);
        state.cache_error = cache_error;
        for watcher in std::mem::take(&mut state.watchers) {
            // A warm that stopped early dropped its receiver; nothing to tell it.
            let _ = watcher.send(state.done(*digest));
        }
        flight.done.notify_all();
    }

    /// Starts requests while the backend has free slots, by the rules of the module docs: each
    /// job extended with adjacent queued jobs of the same queue and blob. A rate-limited
    /// background job that has to wait for tokens arms a timer that dispatches again.
    fn dispatch(self: &Arc<Self>, backend: &Arc<Backend>) {
        loop {
            let (batch, class) = {
                let mut queue = lock(&backend.queue);
                match next_batch(&mut queue, &self.config) {
                    Next::Batch(batch, class) => {
                        queue.running += 1;
                        queue.running_low += usize::from(class != Priority::Demand);
                        queue.running_background += usize::from(class == Priority::Background);
                        (batch, class)
                    }
                    Next::Idle => return,
                    Next::WaitForTokens(wait) => {
                        let at = Instant::now() + wait;
                        // An armed timer that fires sooner will dispatch again anyway.
                        if queue.token_timer.is_none_or(|armed| armed > at) {
                            queue.token_timer = Some(at);
                            drop(queue);
                            self.wake_at(backend, at);
                        }
                        return;
                    }
                }
            };
            let mut priority = Priority::Background;
            for job in &batch {
                let mut state = lock(&job.flight.state);
                state.queued = false;
                priority = priority.min(state.priority);
            }
            let counter = match priority {
                Priority::Demand => &self.metrics.demand_fetches,
                Priority::Prefetch => &self.metrics.prefetch_fetches,
                Priority::Background => &self.metrics.background_fetches,
            };
            counter.add(batch.len() as u64);
            let shared = self.clone();
            let backend = backend.clone();
            self.handle.spawn(async move {
                let first = batch[0].range().start;
                let end = batch[batch.len() - 1].range().end;
                let blob = batch[0].chunk.blob_digest.clone();
                let outcome = fetch_range(&shared.config, &backend, &blob, first..end).await;
                let completer = shared.clone();
                let backend_for_completion = backend.clone();
                let completed = tokio::task::spawn_blocking(move || {
                    completer.complete(&backend_for_completion, batch, first, outcome)
                })
                .await;
                if let Err(e) = completed {
                    error!(backend = %backend.name, "chunk verification task failed: {e}");
                }
                {
                    let mut queue = lock(&backend.queue);
                    queue.running -= 1;
                    queue.running_low -= usize::from(class != Priority::Demand);
                    queue.running_background -= usize::from(class == Priority::Background);
                }
                shared.dispatch(&backend);
            });
        }
    }

    /// Dispatches `backend` again at `at`, when a rate-limited job will have its tokens.
    fn wake_at(self: &Arc<Self>, backend: &Arc<Backend>, at: Instant) {
        let shared = self.clone();
        let backend = backend.clone();
        self.handle.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            {
                let mut queue = lock(&backend.queue);
                if queue.token_timer == Some(at) {
                    queue.token_timer = None;
                }
            }
            shared.dispatch(&backend);
        });
    }

    /// Verifies, caches and hands out the chunks of one finished request.
    fn complete(
        &self,
        backend: &Backend,
        batch: Vec<Job>,
        start: u64,
        outcome: Result<Vec<u8>, BlobError>,
    ) {
        let bytes = match outcome {
            Ok(bytes) => bytes,
            Err(e) => {
                error!(
                    backend = %backend.name,
                    chunks = batch.len(),
                    "chunk not served: {e}"
                );
                for job in batch {
                    let err = SourceError::Blob {
                        blob: job.chunk.blob_digest.clone(),
                        reason: e.to_string(),
                    };
                    self.finish(&job.chunk.record.digest, &job.flight, Err(err), None);
                }
                return;
            }
        };
        for job in batch {
            let range = job.range();
            let from = (range.start - start) as usize;
            let stored = &bytes[from..from + (range.end - range.start) as usize];
            let mut cache_error = None;
            let result = match decode_chunk(&job.chunk.record, stored) {
                Ok(raw) => {
                    backend.metrics.chunks.inc();
                    cache_error = self.store(&job.chunk, stored);
                    let raw = Arc::new(raw);
                    // Chunks fetched ahead of readers go to the disk cache only, so a warm
                    // does not flush the memory LRU of what readers use.
                    let ahead = lock(&job.flight.state).priority != Priority::Demand;
                    if !ahead || self.cache.is_none() {
                        lock(&self.memory).put(job.chunk.record.digest, raw.clone());
                    }
                    Ok(raw)
                }
                Err(e) => {
                    self.metrics.digest_mismatches.inc();
                    error!(
                        backend = %backend.name,
                        blob = %job.chunk.blob_digest,
                        offset = range.start,
                        "chunk not served: fetched bytes fail verification: {e}"
                    );
                    Err(SourceError::Chunk(e))
                }
            };
            self.finish(&job.chunk.record.digest, &job.flight, result, cache_error);
        }
    }

    /// Writes verified stored bytes to the disk cache; when the disk is full the chunk is still
    /// served (from memory), and the condition is logged once until inserts work again. Returns
    /// why the chunk is not cached when the cache refused it.
    fn store(&self, chunk: &ChunkRef, stored: &[u8]) -> Option<String> {
        let cache = self.cache.as_ref()?;
        match cache.insert(&chunk.record, stored) {
            Ok(()) => {
                if self.disk_full.swap(false, Ordering::Relaxed) {
                    warn!("chunk cache accepts writes again");
                }
                None
            }
            Err(e) => {
                self.metrics.served_uncached.inc();
                let first = !self.disk_full.swap(true, Ordering::Relaxed);
                match e {
                    CacheError::NoSpace { .. } if !first => {}
                    _ => {
                        warn!(chunk = %chunk.digest_hex(), "serving chunks from memory without caching them: {e}")
                    }
                }
                Some(e.to_string())
            }
        }
    }
}

/// Moves the queued job for `digest` up to the queue of `to`, if it waits in a less urgent one.
fn promote(backend: &Backend, flight: &Flight, digest: &[u8; 32], to: Priority) {
    {
        let mut state = lock(&flight.state);
        if state.priority <= to || !state.queued {
            return;
        }
        state.priority = to;
    }
    let mut queue = lock(&backend.queue);
    // Look in every less urgent queue: a concurrent promotion to a middle priority may not
    // have moved the job yet.
    for from in [Priority::Prefetch, Priority::Background] {
        if from <= to {
            continue;
        }
        let jobs = queue.jobs(from);
        if let Some(pos) = jobs.iter().position(|j| &j.chunk.record.digest == digest) {
            if let Some(mut job) = jobs.remove(pos) {
                job.limit = None;
                queue.jobs(to).push_back(job);
            }
            return;
        }
    }
}

/// One range request with retries: transient errors are retried with exponential backoff up to
/// `max_attempts`, each attempt bounded by `request_timeout`.
async fn fetch_range(
    config: &FetcherConfig,
    backend: &Backend,
    blob: &str,
    range: Range<u64>,
) -> Result<Vec<u8>, BlobError> {
    let want = (range.end - range.start) as usize;
    let mut attempt = 1;
    loop {
        backend.metrics.requests.inc();
        let started = Instant::now();
        let result = match tokio::time::timeout(
            config.request_timeout,
            backend.store.read_range(blob, range.clone()),
        )
        .await
        {
            Ok(Ok(bytes)) if bytes.len() == want => Ok(bytes),
            Ok(Ok(bytes)) => Err(BlobError::Unavailable {
                store: backend.name.clone(),
                digest: blob.to_string(),
                reason: format!("got {} of {want} bytes", bytes.len()),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                backend.metrics.timeouts.inc();
                Err(BlobError::Timeout {
                    store: backend.name.clone(),
                    digest: blob.to_string(),
                    after: config.request_timeout,
                })
            }
        };
        backend.metrics.latency.observe(started.elapsed());
        let err = match result {
            Ok(bytes) => {
                backend.metrics.bytes.add(bytes.len() as u64);
                return Ok(bytes);
            }
            Err(e) => e,
        };
        backend.metrics.errors.inc();
        if err.is_permanent() || attempt >= config.max_attempts {
            return Err(err);
        }
        let delay = config.retry_backoff * 2u32.saturating_pow(attempt - 1);
        debug!(
            backend = %backend.name,
            blob,
            attempt,
            "range {}..{} failed, retrying in {delay:?}: {err}",
            range.start,
            range.end
        );
        backend.metrics.retries.inc();
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// Queued jobs looked at when extending a request with adjacent chunks: a full 8 MiB request of
/// 32 KiB chunks, or of default 1 MiB chunks with other blobs' jobs interleaved; images with
/// smaller chunks get smaller coalesced requests.
const COALESCE_SCAN: usize = 256;

/// What the dispatcher does next.
enum Next {
    /// Start this request, taken from the queue of this priority.
    Batch(Vec<Job>, Priority),
    /// Nothing may start now; a completion will dispatch again.
    Idle,
    /// Only a rate-limited background job could start, once its bucket refills in this long.
    WaitForTokens(Duration),
}

/// Picks the next request by the module's rules: demand first, within `concurrency` demand
/// requests; prefetch and background within `prefetch_requests` of their own; background only
/// while no demand request is queued or running, and only with tokens for its bytes.
fn next_batch(queue: &mut Queue, config: &FetcherConfig) -> Next {
    let max = config.max_request_bytes;
    if queue.running - queue.running_low < config.concurrency.max(1) {
        if let Some(batch) = take_batch(&mut queue.demand, max) {
            return Next::Batch(batch, Priority::Demand);
        }
    }
    if queue.running_low >= config.prefetch_requests.max(1) {
        return Next::Idle;
    }
    if let Some(batch) = take_batch(&mut queue.prefetch, max) {
        return Next::Batch(batch, Priority::Prefetch);
    }
    if queue.running > queue.running_low
        || queue.running_background >= config.background_requests.max(1)
    {
        return Next::Idle;
    }
    let Some(batch) = take_batch(&mut queue.background, config.background_request_bytes) else {
        return Next::Idle;
    };
    if let Some(limit) = &batch[0].limit {
        let bytes = batch.iter().map(|j| stored_len(&j.chunk)).sum();
        if let Err(wait) = limit.try_take(bytes) {
            // Back to the head, in blob order; the next dispatch coalesces them again.
            for job in batch.into_iter().rev() {
                queue.background.push_front(job);
            }
            return Next::WaitForTokens(wait);
        }
    }
    Next::Batch(batch, Priority::Background)
}

/// Takes the job at the head of `jobs` and the queued jobs that extend its byte range in the
/// same blob (under the same bandwidth limit), up to `max_bytes`.
fn take_batch(jobs: &mut VecDeque<Job>, max_bytes: u64) -> Option<Vec<Job>> {
    let first = jobs.pop_front()?;
    let blob = first.chunk.blob_digest.clone();
    let limit = first.limit.clone();
    let mut range = first.range();
    let mut batch = vec![first];
    // Extend forwards and backwards with exactly adjacent jobs until nothing more fits. Only the
    // head of the queue is searched, so a long queue (a warm of thousands of chunks, queued in
    // blob order) costs a bounded scan per request, not one proportional to it.
    loop {
        let next = jobs.iter().take(COALESCE_SCAN).position(|j| {
            j.chunk.blob_digest == blob && same_limit(&j.limit, &limit) && {
                let r = j.range();
                (r.start == range.end || r.end == range.start)
                    && (range.end - range.start) + (r.end - r.start) <= max_bytes
            }
        });
        let Some(pos) = next else { break };
        let Some(job) = jobs.remove(pos) else { break };
        let r = job.range();
        range = range.start.min(r.start)..range.end.max(r.end);
        batch.push(job);
    }
    batch.sort_by_key(|j| j.chunk.record.comp_off);
    Some(batch)
}

fn same_limit(a: &Option<Arc<RateLimit>>, b: &Option<Arc<RateLimit>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobstore::{Faults, FaultyBlobStore, MemoryBlobStore};
    use async_trait::async_trait;
    use fusefs::format::ChunkRecord;

    /// A blob of `n` distinct chunks of `size` bytes, stored in `store`.
    fn blob(store: &MemoryBlobStore, n: usize, size: usize) -> Vec<ChunkRef> {
        let mut bytes = Vec::new();
        let mut records = Vec::new();
        for i in 0..n {
            let raw: Vec<u8> = (0..size).map(|j| ((i * 31 + j / 7) % 251) as u8).collect();
            let e = fusefs::chunk::encode_chunk(&raw, 3).unwrap();
            records.push(ChunkRecord {
                blob: 0,
                flags: e.flags,
                comp_off: bytes.len() as u64,
                comp_len: e.stored.len() as u32,
                raw_len: e.raw_len,
                crc32: e.crc32,
                digest: e.digest,
            });
            bytes.extend_from_slice(&e.stored);
        }
        let digest = store.insert(bytes);
        records
            .into_iter()
            .enumerate()
            .map(|(i, record)| ChunkRef {
                index: i as u32,
                record,
                blob_digest: digest.clone(),
            })
            .collect()
    }

    fn expected(chunk: &ChunkRef) -> Vec<u8> {
        let i = chunk.index as usize;
        (0..chunk.record.raw_len as usize)
            .map(|j| ((i * 31 + j / 7) % 251) as u8)
            .collect()
    }

    /// Records the order of requested ranges.
    struct Recording {
        inner: Arc<dyn BlobStore>,
        log: Mutex<Vec<Range<u64>>>,
        /// When each request of `log` arrived.
        times: Mutex<Vec<Instant>>,
    }

    impl Recording {
        fn new(inner: Arc<dyn BlobStore>) -> Arc<Recording> {
            Arc::new(Recording {
                inner,
                log: Mutex::new(Vec::new()),
                times: Mutex::new(Vec::new()),
            })
        }
    }

    #[async_trait]
    impl BlobStore for Recording {
        fn kind(&self) -> &'static str {
            "memory"
        }
        fn describe(&self) -> String {
            "recording".into()
        }
        async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
            {
                let mut log = lock(&self.log);
                log.push(range.clone());
                lock(&self.times).push(Instant::now());
            }
            self.inner.read_range(digest, range).await
        }
        async fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, BlobError> {
            self.inner.read_blob(digest, max).await
        }
    }

    fn config() -> FetcherConfig {
        FetcherConfig {
            request_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            retry_backoff: Duration::from_millis(10),
            ..FetcherConfig::default()
        }
    }

    fn setup(
        n: usize,
        config: FetcherConfig,
    ) -> (
        Arc<Fetcher>,
        Arc<FaultyBlobStore>,
        Arc<Backend>,
        Vec<ChunkRef>,
    ) {
        let memory = MemoryBlobStore::new();
        let chunks = blob(&memory, n, 64 << 10);
        let faulty = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
        let fetcher = Fetcher::new(config, None).unwrap();
        let backend = fetcher.backend(faulty.clone());
        (fetcher, faulty, backend, chunks)
    }

    #[test]
    fn concurrent_readers_of_one_chunk_cause_one_fetch() {
        let (fetcher, store, backend, chunks) = setup(2, config());
        store.set(Faults {
            delay: Duration::from_millis(200),
            ..Faults::default()
        });
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let got = fetcher
                        .read(&backend, &chunks[1], Priority::Demand)
                        .unwrap();
                    assert_eq!(*got, expected(&chunks[1]));
                });
            }
        });
        assert_eq!(store.requests(), 1);
        let m = fetcher.snapshot();
        assert_eq!(m.chunks.reads, 8);
        assert_eq!(m.chunks.demand_fetches, 1);
        assert_eq!(m.chunks.joined + m.chunks.memory_hits, 7, "{m:?}");
    }

    #[test]
    fn queued_adjacent_chunks_are_coalesced_into_one_request() {
        let (fetcher, store, backend, chunks) = setup(
            6,
            FetcherConfig {
                concurrency: 1,
                // Half the slots for prefetch and background work (the rule before streams).
                prefetch_requests: 1,
                ..config()
            },
        );
        store.set(Faults {
            delay: Duration::from_millis(300),
            ..Faults::default()
        });
        std::thread::scope(|s| {
            s.spawn(|| {
                fetcher
                    .read(&backend, &chunks[0], Priority::Demand)
                    .unwrap()
            });
            std::thread::sleep(Duration::from_millis(100));
            for c in &chunks[1..5] {
                s.spawn(|| {
                    let got = fetcher.read(&backend, c, Priority::Demand).unwrap();
                    assert_eq!(*got, expected(c));
                });
            }
        });
        assert_eq!(
            store.requests(),
            2,
            "chunk 0 alone, then chunks 1-4 in one range"
        );
        assert_eq!(backend.metrics.chunks.get(), 5);
    }

    #[test]
    fn demand_reads_go_before_queued_prefetch() {
        let memory = MemoryBlobStore::new();
        let chunks = blob(&memory, 12, 64 << 10);
        let faulty = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
        faulty.set(Faults {
            delay: Duration::from_millis(50),
            ..Faults::default()
        });
        let recording = Recording::new(faulty);
        let fetcher = Fetcher::new(
            FetcherConfig {
                concurrency: 1,
                // Half the slots for prefetch and background work (the rule before streams).
                prefetch_requests: 1,
                // One chunk per request, so the order of requests is the order of dispatch.
                max_request_bytes: 1,
                background_request_bytes: 1,
                ..config()
            },
            None,
        )
        .unwrap();
        let backend = fetcher.backend(recording.clone());
        fetcher.prefetch(&backend, &chunks[..10]);
        let started = Instant::now();
        let got = fetcher
            .read(&backend, &chunks[11], Priority::Demand)
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(*got, expected(&chunks[11]));
        let log = lock(&recording.log).clone();
        let demand = chunks[11].record.comp_off;
        let position = log.iter().position(|r| r.start == demand).unwrap();
        assert!(
            position <= 1,
            "demand read was request #{position}: {log:?}"
        );
        assert!(waited < Duration::from_millis(400), "waited {waited:?}");

        // A queued prefetch that a reader asks for is promoted too.
        let got = fetcher
            .read(&backend, &chunks[9], Priority::Demand)
            .unwrap();
        assert_eq!(*got, expected(&chunks[9]));
        let log = lock(&recording.log).clone();
        let promoted = log
            .iter()
            .position(|r| r.start == chunks[9].record.comp_off)
            .unwrap();
        assert!(
            promoted < 9,
            "promoted prefetch was request #{promoted}: {log:?}"
        );
    }

    #[test]
    fn transient_errors_are_retried_and_permanent_ones_are_not() {
        let (fetcher, store, backend, chunks) = setup(2, config());
        store.set(Faults {
            fail_next: 2,
            ..Faults::default()
        });
        let got = fetcher
            .read(&backend, &chunks[0], Priority::Demand)
            .unwrap();
        assert_eq!(*got, expected(&chunks[0]));
        assert_eq!(backend.metrics.retries.get(), 2);
        assert_eq!(store.requests(), 3);

        let mut missing = chunks[1].clone();
        missing.blob_digest = format!("sha256:{}", "0".repeat(64));
        let err = fetcher
            .read(&backend, &missing, Priority::Demand)
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        assert_eq!(store.requests(), 4, "a missing blob is asked for once");
    }

    #[test]
    fn silent_backend_fails_reads_within_the_timeout_and_recovers() {
        let (fetcher, store, backend, chunks) = setup(
            2,
            FetcherConfig {
                request_timeout: Duration::from_millis(200),
                read_timeout: Duration::from_millis(700),
                ..config()
            },
        );
        store.set(Faults {
            delay: Duration::from_secs(30),
            ..Faults::default()
        });
        let started = Instant::now();
        let err = fetcher
            .read(&backend, &chunks[0], Priority::Demand)
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            matches!(err, SourceError::Timeout(_) | SourceError::Blob { .. }),
            "{err}"
        );
        assert!(waited < Duration::from_millis(1500), "waited {waited:?}");

        store.set(Faults::default());
        // The failed fetch may still be retrying; a new read succeeds once it gives up.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fetcher.read(&backend, &chunks[0], Priority::Demand) {
                Ok(got) => {
                    assert_eq!(*got, expected(&chunks[0]));
                    break;
                }
                Err(e) if Instant::now() < deadline => eprintln!("still failing: {e}"),
                Err(e) => panic!("backend is back but reads fail: {e}"),
            }
        }
        assert!(backend.metrics.timeouts.get() >= 1);
    }

    #[test]
    fn corrupted_bytes_are_never_served_nor_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(
            ChunkCache::open(&crate::cache::CacheConfig {
                dir: dir.path().to_path_buf(),
                budget_bytes: 64 << 20,
            })
            .unwrap(),
        );
        let memory = MemoryBlobStore::new();
        let chunks = blob(&memory, 3, 64 << 10);
        let store = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
        let fetcher = Fetcher::new(config(), Some(cache.clone())).unwrap();
        let backend = fetcher.backend(store.clone());
        store.set(Faults {
            corrupt_offset: Some(chunks[1].record.comp_off + 5),
            ..Faults::default()
        });
        let err = fetcher
            .read(&backend, &chunks[1], Priority::Demand)
            .unwrap_err();
        assert!(matches!(err, SourceError::Chunk(_)), "{err}");
        assert!(!cache.contains(&chunks[1].record.digest));
        assert_eq!(fetcher.snapshot().chunks.digest_mismatches, 1);

        store.set(Faults::default());
        let got = fetcher
            .read(&backend, &chunks[1], Priority::Demand)
            .unwrap();
        assert_eq!(*got, expected(&chunks[1]));
        assert!(cache.contains(&chunks[1].record.digest));
    }

    #[test]
    fn disk_cache_serves_a_new_fetcher_without_requests() {
        let dir = tempfile::tempdir().unwrap();
        let cache_config = crate::cache::CacheConfig {
            dir: dir.path().to_path_buf(),
            budget_bytes: 64 << 20,
        };
        let memory = Arc::new(MemoryBlobStore::new());
        let chunks = blob(&memory, 4, 64 << 10);
        {
            let cache = Arc::new(ChunkCache::open(&cache_config).unwrap());
            let fetcher = Fetcher::new(config(), Some(cache)).unwrap();
            let backend = fetcher.backend(memory.clone());
            for c in &chunks {
                fetcher.read(&backend, c, Priority::Demand).unwrap();
            }
        }
        let before = memory.requests();
        let cache = Arc::new(ChunkCache::open(&cache_config).unwrap());
        let fetcher = Fetcher::new(config(), Some(cache)).unwrap();
        let backend = fetcher.backend(memory.clone());
        for c in &chunks {
            assert_eq!(
                *fetcher.read(&backend, c, Priority::Demand).unwrap(),
                expected(c)
            );
        }
        assert_eq!(memory.requests(), before);
        assert_eq!(fetcher.snapshot().chunks.disk_hits, 4);
    }

    /// A fetcher over a disk cache (in the returned temporary directory) and a faulty store
    /// holding one blob of `n` chunks.
    struct Cached {
        _dir: tempfile::TempDir,
        cache: Arc<ChunkCache>,
        fetcher: Arc<Fetcher>,
        store: Arc<FaultyBlobStore>,
        recording: Arc<Recording>,
        backend: Arc<Backend>,
        chunks: Vec<ChunkRef>,
    }

    fn cached(n: usize, config: FetcherConfig) -> Cached {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(
            ChunkCache::open(&crate::cache::CacheConfig {
                dir: dir.path().to_path_buf(),
                budget_bytes: 64 << 20,
            })
            .unwrap(),
        );
        let memory = MemoryBlobStore::new();
        let chunks = blob(&memory, n, 64 << 10);
        let store = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
        let recording = Recording::new(store.clone());
        let fetcher = Fetcher::new(config, Some(cache.clone())).unwrap();
        let backend = fetcher.backend(recording.clone());
        Cached {
            _dir: dir,
            cache,
            fetcher,
            store,
            recording,
            backend,
            chunks,
        }
    }

    fn stored_bytes(chunks: &[ChunkRef]) -> u64 {
        chunks.iter().map(stored_len).sum()
    }

    /// Waits until every chunk is in the disk cache; panics after 10 s.
    fn wait_cached(cache: &ChunkCache, chunks: &[ChunkRef]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !chunks.iter().all(|c| cache.contains(&c.record.digest)) {
            assert!(Instant::now() < deadline, "chunks never reached the cache");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn default_warm_window_keeps_the_default_background_requests_busy_four_times_over() {
        let config = FetcherConfig::default();
        assert_eq!(
            DEFAULT_WARM_WINDOW,
            4 * config.background_requests as u64 * config.background_request_bytes
        );
        assert_eq!(WarmOptions::default().window_bytes, DEFAULT_WARM_WINDOW);
    }

    #[test]
    fn rate_limit_admits_a_request_larger_than_the_bucket_and_charges_it() {
        let limit = RateLimit::new(1000);
        assert_eq!(limit.rate(), 1000);
        // Full bucket: 250 tokens. A 1000-byte request goes, leaving 750 bytes of debt, so the
        // next request waits about a second.
        limit.try_take(1000).unwrap();
        let wait = limit.try_take(100).unwrap_err();
        assert!(
            wait > Duration::from_millis(800) && wait <= Duration::from_millis(860),
            "{wait:?}"
        );
        assert_eq!(RateLimit::new(0).rate(), 1);
    }

    #[test]
    fn warm_fetches_each_missing_chunk_once_and_a_second_warm_fetches_nothing() {
        let t = cached(20, config());
        // Duplicates are fetched and counted once.
        let mut list = t.chunks.clone();
        list.extend_from_slice(&t.chunks[..5]);
        let total = stored_bytes(&t.chunks);
        let mut calls = Vec::new();
        let p = t
            .fetcher
            .warm(&t.backend, &list, &WarmOptions::default(), &mut |p| {
                calls.push(p.clone());
                true
            })
            .unwrap();
        let want = WarmProgress {
            total_chunks: 20,
            total_bytes: total,
            fetched_chunks: 20,
            fetched_bytes: total,
            ..WarmProgress::default()
        };
        assert_eq!(p, want);
        assert_eq!(
            calls[0].fetched_chunks, 0,
            "progress is called at the start"
        );
        assert_eq!(calls.last(), Some(&want));
        for c in &t.chunks {
            assert!(t.cache.contains(&c.record.digest));
        }
        assert_eq!(t.backend.metrics.chunks.get(), 20);
        assert_eq!(
            t.backend.metrics.bytes.get(),
            total,
            "every byte fetched once"
        );
        let m = t.fetcher.snapshot();
        assert_eq!(m.chunks.background_fetches, 20);
        assert_eq!(m.chunks.demand_fetches + m.chunks.prefetch_fetches, 0);
        assert!(
            lock(&t.fetcher.shared.memory).lru.is_empty(),
            "a warm fills the disk cache, not the memory LRU"
        );

        let requests = t.store.requests();
        let p = t
            .fetcher
            .warm(&t.backend, &list, &WarmOptions::default(), &mut |_| true)
            .unwrap();
        assert_eq!(p.fetched_chunks, 0);
        assert_eq!((p.cached_chunks, p.cached_bytes), (20, total));
        assert_eq!(t.store.requests(), requests);
        // Readers now find everything on disk.
        for c in &t.chunks {
            let got = t.fetcher.read(&t.backend, c, Priority::Demand).unwrap();
            assert_eq!(*got, expected(c));
        }
        assert_eq!(t.store.requests(), requests);
        assert_eq!(t.fetcher.snapshot().chunks.disk_hits, 20);
    }

    #[test]
    fn warm_after_a_partial_warm_fetches_only_the_rest() {
        let t = cached(20, config());
        let opts = WarmOptions::default();
        let p = t
            .fetcher
            .warm(&t.backend, &t.chunks[..8], &opts, &mut |_| true)
            .unwrap();
        assert_eq!(p.fetched_chunks, 8);
        let before = t.backend.metrics.bytes.get();
        let p = t
            .fetcher
            .warm(&t.backend, &t.chunks, &opts, &mut |_| true)
            .unwrap();
        assert_eq!((p.cached_chunks, p.fetched_chunks), (8, 12));
        assert_eq!(p.cached_bytes, stored_bytes(&t.chunks[..8]));
        assert_eq!(p.fetched_bytes, stored_bytes(&t.chunks[8..]));
        assert_eq!(
            t.backend.metrics.bytes.get() - before,
            stored_bytes(&t.chunks[8..])
        );
    }

    #[test]
    fn warm_stops_at_a_failing_chunk_naming_it_and_keeps_what_it_fetched() {
        let t = cached(12, config());
        // One chunk at a time, so the chunks before the bad one are done when it fails.
        let one_at_a_time = WarmOptions {
            limit: None,
            window_bytes: 1,
        };
        let mut list = t.chunks[..8].to_vec();
        let missing_blob = format!("sha256:{}", "0".repeat(64));
        list[5].blob_digest = missing_blob.clone();
        let mut last = WarmProgress::default();
        let err = t
            .fetcher
            .warm(&t.backend, &list, &one_at_a_time, &mut |p| {
                last = p.clone();
                true
            })
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, WarmError::Fetch { .. }), "{err}");
        assert!(message.contains(&list[5].digest_hex()), "{message}");
        assert!(message.contains(&missing_blob), "{message}");
        assert!(message.contains("not found"), "{message}");
        assert_eq!((last.fetched_chunks, last.failed_chunks), (5, 1));
        for c in &t.chunks[..5] {
            assert!(t.cache.contains(&c.record.digest));
        }

        // A backend that stays down fails the warm after the fetcher's retries.
        t.store.set(Faults {
            down: true,
            ..Faults::default()
        });
        let requests = t.store.requests();
        let err = t
            .fetcher
            .warm(&t.backend, &t.chunks, &one_at_a_time, &mut |_| true)
            .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert!(
            err.to_string().contains(&t.chunks[5].digest_hex()),
            "the first missing chunk is named: {err}"
        );
        assert_eq!(
            t.store.requests() - requests,
            u64::from(config().max_attempts)
        );

        // Back up: a warm fetches just what is missing.
        t.store.set(Faults::default());
        let p = t
            .fetcher
            .warm(&t.backend, &t.chunks, &one_at_a_time, &mut |_| true)
            .unwrap();
        assert_eq!((p.cached_chunks, p.fetched_chunks), (5, 7));
    }

    #[test]
    fn warm_fails_when_the_cache_cannot_keep_the_chunks() {
        let t = cached(6, config());
        // Segments can no longer be created: every insert fails.
        fs_remove_segments(&t.cache);
        let err = t
            .fetcher
            .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |_| {
                true
            })
            .unwrap_err();
        assert!(matches!(err, WarmError::NotCached { .. }), "{err}");
        assert!(err.to_string().contains("not cached"), "{err}");

        // Chunks that cannot all fit the budget are refused before any fetch.
        let dir = tempfile::tempdir().unwrap();
        let total = stored_bytes(&t.chunks);
        let small = Arc::new(
            ChunkCache::open(&crate::cache::CacheConfig {
                dir: dir.path().to_path_buf(),
                budget_bytes: total - 1,
            })
            .unwrap(),
        );
        let fetcher = Fetcher::new(config(), Some(small)).unwrap();
        let backend = fetcher.backend(t.store.clone());
        let requests = t.store.requests();
        let err = fetcher
            .warm(&backend, &t.chunks, &WarmOptions::default(), &mut |_| true)
            .unwrap_err();
        assert!(
            matches!(err, WarmError::TooLarge { needed, .. } if needed == total),
            "{err}"
        );
        assert_eq!(t.store.requests(), requests);

        let memory_only = Fetcher::new(config(), None).unwrap();
        let backend = memory_only.backend(t.store.clone());
        let err = memory_only
            .warm(&backend, &t.chunks, &WarmOptions::default(), &mut |_| true)
            .unwrap_err();
        assert!(matches!(err, WarmError::NoCache), "{err}");
    }

    fn fs_remove_segments(cache: &ChunkCache) {
        std::fs::remove_dir_all(cache.dir().join("segments")).unwrap();
    }

    #[test]
    fn cancelled_warm_stops_early() {
        let t = cached(10, config());
        let err = t
            .fetcher
            .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |_| {
                false
            })
            .unwrap_err();
        assert!(matches!(err, WarmError::Cancelled), "{err}");
        assert_eq!(
            t.store.requests(),
            0,
            "cancelled at the start: nothing fetched"
        );

        t.store.set(Faults {
            delay: Duration::from_millis(50),
            ..Faults::default()
        });
        let opts = WarmOptions {
            limit: None,
            window_bytes: 1,
        };
        let err = t
            .fetcher
            .warm(&t.backend, &t.chunks, &opts, &mut |p| p.fetched_chunks < 2)
            .unwrap_err();
        assert!(matches!(err, WarmError::Cancelled), "{err}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(t.store.requests(), 2, "no chunk queued after the cancel");
        assert_eq!(
            t.chunks
                .iter()
                .filter(|c| t.cache.contains(&c.record.digest))
                .count(),
            2
        );
    }

    #[test]
    fn cancelled_warm_drops_its_queued_jobs_but_not_one_a_reader_waits_for() {
        // One background slot and a slow store: the warm's other jobs wait in the queue.
        let t = cached(
            12,
            FetcherConfig {
                concurrency: 2,
                // Half the slots for prefetch and background work (the rule before streams).
                prefetch_requests: 1,
                max_request_bytes: 1,
                background_request_bytes: 1,
                ..config()
            },
        );
        t.store.set(Faults {
            delay: Duration::from_millis(100),
            ..Faults::default()
        });
        let wanted = t.chunks[11].clone();
        let reader = {
            let fetcher = t.fetcher.clone();
            let backend = t.backend.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                fetcher.read(&backend, &wanted, Priority::Demand)
            })
        };
        let err = t
            .fetcher
            .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |p| {
                p.fetched_chunks < 1
            })
            .unwrap_err();
        assert!(matches!(err, WarmError::Cancelled), "{err}");
        let data = reader
            .join()
            .unwrap()
            .expect("the reader's chunk is still fetched");
        assert_eq!(data.len(), t.chunks[11].record.raw_len as usize);
        std::thread::sleep(Duration::from_millis(300));
        // The first chunk, the reader's, and at most one more already dispatched.
        let requests = t.store.requests();
        assert!(
            requests <= 3,
            "{requests} requests: the cancelled warm kept fetching"
        );
    }

    #[test]
    fn demand_read_during_a_warm_goes_next_and_pauses_background_requests() {
        const DELAY: Duration = Duration::from_millis(200);
        let t = cached(
            40,
            FetcherConfig {
                concurrency: 4,
                // Half the slots for prefetch and background work (the rule before streams).
                prefetch_requests: 2,
                // One chunk per request, so the order of requests is the order of dispatch.
                max_request_bytes: 1,
                background_request_bytes: 1,
                ..config()
            },
        );
        t.store.set(Faults {
            delay: DELAY,
            ..Faults::default()
        });
        std::thread::scope(|s| {
            let warm = s.spawn(|| {
                t.fetcher
                    .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |_| {
                        true
                    })
            });
            // Mid-round: two background requests (half the slots) are in flight.
            std::thread::sleep(DELAY + DELAY / 2);
            let issued = Instant::now();
            // The last chunk of the warm, still queued at background priority: promoted.
            let last = &t.chunks[39];
            let got = t.fetcher.read(&t.backend, last, Priority::Demand).unwrap();
            let done = Instant::now();
            assert_eq!(*got, expected(last));
            let waited = done - issued;
            assert!(waited < DELAY + DELAY, "waited {waited:?}");

            let log = lock(&t.recording.log).clone();
            let times = lock(&t.recording.times).clone();
            let demand = log
                .iter()
                .position(|r| r.start == last.record.comp_off)
                .unwrap();
            // Judge by the store's own clock: a background request that reached the store after
            // the demand request and less than half a request's time after it was dispatched
            // while the demand one ran. (Those dispatched when it has finished come a whole
            // DELAY later; the reader's own wake-up time is no measure, it may come later still.)
            let demand_started = times[demand];
            let started_meanwhile: Vec<usize> = (demand + 1..log.len())
                .filter(|&i| times[i] < demand_started + DELAY / 2)
                .collect();
            assert!(
                started_meanwhile.is_empty(),
                "background requests {started_meanwhile:?} started while the demand read of request #{demand} was queued or running"
            );
            assert!(demand >= 2, "the warm was running: {log:?}");
            warm.join().unwrap().unwrap();
        });
        let m = t.fetcher.snapshot();
        assert_eq!(m.chunks.demand_fetches, 1);
        assert_eq!(m.chunks.background_fetches, 39);
    }

    #[test]
    fn rate_limited_background_prefetch_takes_its_bytes_over_the_rate() {
        let t = cached(
            32,
            FetcherConfig {
                max_request_bytes: 1,
                background_request_bytes: 1,
                ..config()
            },
        );
        let total = stored_bytes(&t.chunks);
        // Two seconds' worth at the limit.
        let rate = total / 2;
        let started = Instant::now();
        t.fetcher
            .prefetch_background(&t.backend, &t.chunks, Some(RateLimit::new(rate)));
        wait_cached(&t.cache, &t.chunks);
        let took = started.elapsed().as_secs_f64();
        let ideal = total as f64 / rate as f64;
        assert!(
            took >= 0.7 * ideal,
            "{total} bytes at {rate} B/s took {took:.2} s"
        );
        assert!(
            took < 3.0 * ideal,
            "{total} bytes at {rate} B/s took {took:.2} s"
        );
        assert_eq!(t.fetcher.snapshot().chunks.background_fetches, 32);
        assert_eq!(t.backend.metrics.bytes.get(), total);
    }

    #[test]
    fn background_prefetch_keeps_its_order_and_skips_cached_chunks() {
        let t = cached(
            10,
            FetcherConfig {
                // One background slot, one chunk per request: requests in queue order.
                concurrency: 2,
                // Half the slots for prefetch and background work (the rule before streams).
                prefetch_requests: 1,
                max_request_bytes: 1,
                background_request_bytes: 1,
                ..config()
            },
        );
        t.fetcher
            .read(&t.backend, &t.chunks[3], Priority::Demand)
            .unwrap();
        let profile: Vec<ChunkRef> = t.chunks.iter().rev().cloned().collect();
        t.fetcher.prefetch_background(&t.backend, &profile, None);
        wait_cached(&t.cache, &t.chunks);
        let log = lock(&t.recording.log).clone();
        let want: Vec<u64> = profile
            .iter()
            .filter(|c| c.index != 3)
            .map(|c| c.record.comp_off)
            .collect();
        let got: Vec<u64> = log[1..].iter().map(|r| r.start).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn read_ahead_of_a_queued_background_chunk_moves_it_to_prefetch() {
        let t = cached(
            10,
            FetcherConfig {
                concurrency: 2,
                // Half the slots for prefetch and background work (the rule before streams).
                prefetch_requests: 1,
                max_request_bytes: 1,
                background_request_bytes: 1,
                ..config()
            },
        );
        t.store.set(Faults {
            delay: Duration::from_millis(50),
            ..Faults::default()
        });
        t.fetcher.prefetch_background(&t.backend, &t.chunks, None);
        t.fetcher.prefetch(&t.backend, &t.chunks[9..]);
        wait_cached(&t.cache, &t.chunks);
        let log = lock(&t.recording.log).clone();
        let position = log
            .iter()
            .position(|r| r.start == t.chunks[9].record.comp_off)
            .unwrap();
        assert!(
            position <= 1,
            "read-ahead chunk was request #{position}: {log:?}"
        );
        assert_eq!(log.len(), 10);
        let m = t.fetcher.snapshot();
        assert_eq!(
            (m.chunks.prefetch_fetches, m.chunks.background_fetches),
            (1, 9)
        );
    }
}
