//! The fetcher: the `ChunkSource` a mount of a remote image reads through, and the work that
//! fills the caches ahead of readers (read-ahead, tensor streams, hot-chunk profiles,
//! speculation, the whole image, warm).
//!
//! A chunk read tries, in order: the decoded-chunk LRU in memory (`decoded`: chunks readers
//! read; chunks fetched ahead of readers go to the disk cache only, so a warm or a prefetch does
//! not flush what readers use), the compressed chunk cache on disk (`cache`), and the chunk's
//! backend (`BlobStore`). Disk hits and fetches
//! both go through one table of *flights* keyed by chunk digest: any number of readers,
//! read-aheads and warms of one chunk cause one decode or one fetch, and a reader that finds its
//! chunk on its way (queued, in flight, being decoded) waits for that instead of starting
//! another.
//!
//! Fetches wait in one queue per backend and [`Priority`] ([`queue`] has the rules: demand
//! first, in slots of its own; then read-ahead, streams and profiles; then speculation; then
//! warm and the whole image, which start only while no demand request runs). A queued job that
//! a more urgent caller asks for moves to that caller's queue: a reader waiting on a queued
//! chunk promotes it to demand. Each request carries a run of adjacent chunks of one blob, and
//! hands each chunk on as soon as the body has carried its bytes ([`request`]), so a reader
//! waiting for the first chunk of a long request waits for that chunk only.
//!
//! **Checks.** Every fetched chunk is verified (length, crc32, zstd, blake3: `decode_chunk`)
//! before it is cached or served; a mismatch is logged and the chunk is not served. A disk-cache
//! hit is checked by the cache (entry header and payload crc32) and decoded without a second
//! crc32 or blake3: only verified bytes are ever written to the cache (docs/ARCHITECTURE.md,
//! "Integrity"). A reader waits at most `read_timeout` for its chunk and then gets an error
//! (EIO at the filesystem) with a log line saying why; readers that join that chunk's fetch
//! later get the error at once, and once the fetch ends the next read starts afresh, so reads
//! succeed again as soon as the backend is back.
//!
//! **Speculation** ([`Fetcher::speculate`]): chunks a reader may read next (the filesystem
//! guesses them from the image's layout). Those on disk are decoded into memory by one
//! background thread, those not cached are fetched in the speculative class; both are counted,
//! and so is how much of it readers then used.
//!
//! **Where it runs.** `ChunkSource::chunk` and `warm` are called on plain threads and block on
//! a condition variable or a channel; requests and rate-limit timers run on the tokio runtime
//! the fetcher is handed (lazyd's); verification and decoding of fetched chunks run on that
//! runtime's blocking pool, speculative decodes on a thread of the fetcher's own.

mod decode;
mod queue;
mod rate;
mod request;
mod warm;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use fusefs::chunk::{check_stored, decode_chunk, decode_owned, Checks};
use fusefs::{ChunkError, ChunkRef, ChunkSource, SourceError};
use tracing::{debug, error, warn};

use crate::blobstore::{BackendId, BlobError, BlobStore};
use crate::cache::ChunkCache;
use crate::decoded::DecodedLru;
use crate::metrics::{BackendMetrics, ChunkMetrics, Counter, MetricsSnapshot, StreamMetrics};
use crate::sync::lock;
use decode::DecodeAhead;
use queue::{Limits, Next, Queue, Queued};
use warm::WarmFailure;

pub use queue::Priority;
pub use rate::RateLimit;
pub use warm::{Done, WarmError, WarmOptions, WarmProgress, DEFAULT_WARM_WINDOW};

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
    /// Largest coalesced demand or prefetch request.
    pub max_request_bytes: u64,
    /// Demand requests in flight per backend.
    pub concurrency: usize,
    /// Most stored bytes of demand requests in flight per backend (one starts anyway when none
    /// runs).
    pub demand_bytes: u64,
    /// Prefetch, speculative and background requests in flight per backend, besides the
    /// demand requests.
    pub prefetch_requests: usize,
    /// Speculative requests in flight per backend, within `prefetch_requests`.
    pub speculative_requests: usize,
    /// Largest coalesced speculative request.
    pub speculative_request_bytes: u64,
    /// Background (warm, whole image) requests in flight per backend, within
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
            // Eight full requests: enough to fill a 1 Gbit/s, 20 ms link (the tensor a reader
            // waits for gets all of it), few enough that a second reader's tensor waits its turn
            // (then both are done sooner on average than sharing the link).
            demand_bytes: 64 << 20,
            // A stream of tensors should fill the link on its own: 16 requests of 8 MiB keep
            // 128 MiB in flight, the bandwidth-delay product of 10 Gbit/s at 100 ms, and 16
            // object-store connections of ~100 MB/s each.
            prefetch_requests: 16,
            // Guesses share the link with the reads they guess for: four requests of 2 MiB keep
            // the next few chunks of what was just touched in flight (a 1 Gbit/s, 20 ms link
            // carries 2.5 MB per round trip) while a demand read that arrives meanwhile shares
            // the link with at most 8 MiB of them (64 ms at 1 Gbit/s, shared, not queued).
            speculative_requests: 4,
            speculative_request_bytes: 2 << 20,
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

impl FetcherConfig {
    fn limits(&self) -> Limits {
        Limits {
            demand_requests: self.concurrency,
            demand_bytes: self.demand_bytes,
            low_requests: self.prefetch_requests,
            speculative_requests: self.speculative_requests,
            background_requests: self.background_requests,
            request_bytes: self.max_request_bytes,
            speculative_request_bytes: self.speculative_request_bytes,
            background_request_bytes: self.background_request_bytes,
        }
    }
}

/// One blob store as the fetcher sees it: the store, its identity, its queue and its metrics.
pub struct Backend {
    store: Arc<dyn BlobStore>,
    id: BackendId,
    queue: Mutex<Queue<Job>>,
    pub metrics: BackendMetrics,
}

impl Backend {
    pub fn new(store: Arc<dyn BlobStore>) -> Arc<Backend> {
        Arc::new(Backend {
            id: store.id(),
            queue: Mutex::new(Queue::aligned(store.request_alignment())),
            store,
            metrics: BackendMetrics::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }
}

/// Where a fetched chunk's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Through {
    /// The backend's store, its mirrors included.
    Store,
    /// The origin, asked again after bytes from a mirror failed verification.
    Origin,
}

/// One chunk waiting in a backend's queue.
struct Job {
    chunk: ChunkRef,
    flight: Arc<Flight>,
    /// The bandwidth limit of a background job; `None` in the other queues.
    limit: Option<Arc<RateLimit>>,
}

impl Queued for Job {
    fn blob(&self) -> &str {
        &self.chunk.blob_digest
    }

    fn range(&self) -> Range<u64> {
        let start = self.chunk.record.comp_off;
        start..start + stored_len(&self.chunk)
    }

    fn limit(&self) -> Option<&Arc<RateLimit>> {
        self.limit.as_ref()
    }
}

fn stored_len(chunk: &ChunkRef) -> u64 {
    u64::from(chunk.record.comp_len)
}

/// A chunk on its way (queued, fetched, or decoded from disk): readers wait on it; whoever
/// serves it completes it once.
struct Flight {
    state: Mutex<FlightState>,
    done: Condvar,
}

struct FlightState {
    priority: Priority,
    /// Still in a backend queue (not yet dispatched), so it can be promoted.
    queued: bool,
    /// Served by decoding the disk cache's copy, not by a fetch.
    decoding: bool,
    /// Readers waiting for it: a fetched chunk someone waits for is decoded at once.
    readers: u32,
    /// Bulk work whose chunks readers will read soon (a profile's hot set): decode each into
    /// memory once fetched ([`decode`]).
    decode_ahead: bool,
    /// `Ok(None)`: the chunk is in the disk cache (checked, not decoded: bulk work), where a
    /// reader that waited for it reads it.
    result: Option<Result<Option<Arc<Vec<u8>>>, SourceError>>,
    /// Why the fetched chunk is not in the disk cache, when the cache refused it.
    cache_error: Option<String>,
    /// Watchers (warms, streams) waiting for this chunk; each hears once, when it is done.
    watchers: Vec<mpsc::Sender<Done>>,
    /// Started for a watcher: may be dropped from the queue when that watcher stops.
    for_watcher: bool,
    /// Dropped unserved (its watcher stopped, or its decode found nothing): a reader that had
    /// joined it starts anew.
    abandoned: bool,
    /// When the first reader that waited for it gives up (its start plus the read timeout).
    /// Readers that join later give up then too: a chunk overdue for one reader fails the next
    /// at once instead of holding it a read timeout more. The kernel retries a page whose
    /// read-ahead failed with one more read, which would otherwise double every wait.
    overdue_at: Option<Instant>,
}

impl FlightState {
    /// What a watcher hears of this finished flight.
    fn done(&self, digest: [u8; 32]) -> Done {
        let outcome = match (&self.result, &self.cache_error) {
            (Some(Err(e)), _) => Err(WarmFailure::Fetch(e.to_string())),
            (_, Some(reason)) => Err(WarmFailure::NotCached(reason.clone())),
            _ => Ok(()),
        };
        Done { digest, outcome }
    }
}

impl Flight {
    fn new(priority: Priority, watcher: Option<&mpsc::Sender<Done>>) -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(FlightState {
                priority,
                queued: true,
                decoding: false,
                readers: 0,
                decode_ahead: false,
                result: None,
                cache_error: None,
                watchers: watcher.into_iter().cloned().collect(),
                for_watcher: watcher.is_some(),
                abandoned: false,
                overdue_at: None,
            }),
            done: Condvar::new(),
        })
    }
}

/// Chunks remembered as fetched or decoded ahead of readers, for the counters of how much of it
/// readers used; past this the record starts over (the counters then miss some uses).
const MAX_AHEAD_RECORDS: usize = 1 << 20;

/// Fetches chunks for every mount of the process; see the module docs.
pub struct Fetcher {
    shared: Arc<Shared>,
}

struct Shared {
    config: FetcherConfig,
    limits: Limits,
    handle: tokio::runtime::Handle,
    cache: Option<Arc<ChunkCache>>,
    memory: Mutex<DecodedLru>,
    flights: Mutex<HashMap<[u8; 32], Arc<Flight>>>,
    backends: Mutex<Vec<Arc<Backend>>>,
    metrics: ChunkMetrics,
    /// Set while the disk cache refuses inserts (a full or read-only disk), so that is logged
    /// once per episode.
    disk_full: AtomicBool,
    stream_metrics: StreamMetrics,
    /// Chunks fetched ahead of readers (by class) that no reader has read yet.
    ahead: Mutex<HashMap<[u8; 32], (Priority, u64)>>,
    /// Chunks whose blake3 was checked in this process (see [`Shared::disk_hit`]).
    verified: Mutex<HashSet<[u8; 32]>>,
    /// The decoder thread's lanes (with a disk cache).
    decode_ahead: Option<Arc<DecodeAhead>>,
}

impl Fetcher {
    /// A fetcher whose requests run on `runtime` (lazyd's). `cache` is the shared disk cache
    /// (`None`: memory only).
    pub fn new(
        config: FetcherConfig,
        cache: Option<Arc<ChunkCache>>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<Fetcher>> {
        let decoder = cache
            .is_some()
            .then(|| Arc::new(DecodeAhead::new(config.memory_budget / 2)));
        let shared = Arc::new(Shared {
            memory: Mutex::new(DecodedLru::new(config.memory_budget)),
            limits: config.limits(),
            config,
            handle: runtime,
            cache,
            flights: Mutex::new(HashMap::new()),
            backends: Mutex::new(Vec::new()),
            metrics: ChunkMetrics::default(),
            disk_full: AtomicBool::new(false),
            stream_metrics: StreamMetrics::default(),
            ahead: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashSet::new()),
            decode_ahead: decoder,
        });
        if let Some(decoder) = &shared.decode_ahead {
            let decoder = decoder.clone();
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("lazy-decode".into())
                .spawn(move || decode_ahead(&weak, &decoder))?;
        }
        Ok(Arc::new(Fetcher { shared }))
    }

    /// The runtime requests run on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.shared.handle
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

    /// Registers a backend, reusing the one already registered for the same backend identity
    /// (`BlobStore::id`) so that two images on one registry share its concurrency limit and
    /// metrics.
    pub fn backend(&self, store: Arc<dyn BlobStore>) -> Arc<Backend> {
        let mut backends = lock(&self.shared.backends);
        let id = store.id();
        if let Some(b) = backends.iter().find(|b| b.id == id) {
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
            fetch_guesses: Arc::new(AtomicBool::new(true)),
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
    /// already cached or on their way are skipped.
    pub fn prefetch(&self, backend: &Arc<Backend>, chunks: &[ChunkRef]) {
        self.shared
            .queue_missing(backend, chunks, Priority::Prefetch);
    }

    /// Chunks a reader may read next (a guess, most likely first): those on disk are decoded
    /// into memory by the decoder thread, those not cached are (with `fetch`) queued at
    /// speculative priority ahead of older guesses, those in memory are left alone. Returns at
    /// once; guesses the decoder cannot take now are dropped.
    pub fn speculate(&self, backend: &Arc<Backend>, chunks: &[ChunkRef], fetch: bool) {
        let shared = &self.shared;
        let mut fetches = Vec::new();
        let mut decodes = Vec::new();
        for chunk in chunks {
            let digest = &chunk.record.digest;
            if lock(&shared.memory).contains(digest) {
                continue;
            }
            if shared.on_disk(digest) {
                decodes.push(chunk.clone());
            } else if fetch {
                fetches.push(chunk);
            }
        }
        if let (Some(decoder), false) = (&shared.decode_ahead, decodes.is_empty()) {
            decoder.guesses(&decodes);
        }
        // Each goes to the front of the queue (a chunk queued for background work moves up
        // there): the last one first, so they keep their order. Those in flight stay as
        // they are.
        for chunk in fetches.into_iter().rev() {
            shared.join(backend, chunk, Priority::Speculative, None, None);
        }
        shared.dispatch(backend);
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
        shared.dispatch(backend);
        true
    }

    /// Queues `chunks` at demand priority without waiting for them: a reader is about to ask
    /// for them (the rest of the tensor it started reading). Chunks held in memory or on disk
    /// are skipped; queued ones move up to the demand queue, in this order. Returns at once.
    pub fn fetch_now(&self, backend: &Arc<Backend>, chunks: &[ChunkRef]) {
        self.shared.queue_missing(backend, chunks, Priority::Demand);
    }

    /// Drops the queued, not yet dispatched prefetch jobs of `digests` that no reader waits
    /// for and no other watcher watches (a stream stopped); requests in flight finish. Returns
    /// how many were dropped.
    pub fn cancel_prefetch(&self, backend: &Backend, digests: &HashSet<[u8; 32]>) -> usize {
        self.shared
            .drop_queued(backend, digests, Priority::Prefetch)
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let shared = &self.shared;
        MetricsSnapshot {
            chunks: shared.metrics.snapshot(),
            streams: shared.stream_metrics.snapshot(),
            backends: lock(&shared.backends)
                .iter()
                .map(|b| b.metrics.snapshot(b.id.kind(), &b.id.to_string()))
                .collect(),
            cache: shared.cache.as_ref().map(|c| c.stats()),
            ..MetricsSnapshot::default()
        }
    }
}

impl Drop for Fetcher {
    /// The decoder thread holds the fetcher weakly; it stops here.
    fn drop(&mut self) {
        if let Some(decoder) = &self.shared.decode_ahead {
            decoder.close();
        }
    }
}

/// What a mount reads through: the process's fetcher and the image's backend.
pub struct FetchSource {
    fetcher: Arc<Fetcher>,
    backend: Arc<Backend>,
    fetch_guesses: Arc<AtomicBool>,
}

impl FetchSource {
    /// Whether the mount's guesses ([`ChunkSource::speculate`]) are fetched from the backend
    /// (on by default) or only decoded ahead when cached: off while the image's profile says
    /// what is needed (guesses on top of it fetch what the profile left out, sharing the link
    /// with what it put in).
    pub fn fetch_guesses(&self) -> Arc<AtomicBool> {
        self.fetch_guesses.clone()
    }

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

    fn chunk_in_memory(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let shared = &self.fetcher.shared;
        let hit = shared.memory_hit(chunk)?;
        shared.metrics.reads.inc();
        Some(hit)
    }

    /// Sequential read-ahead from the filesystem becomes prefetch: it fills idle capacity and
    /// never delays a demand read.
    fn read_ahead(&self, chunks: &[ChunkRef]) {
        self.fetcher.prefetch(&self.backend, chunks);
    }

    fn speculate(&self, chunks: &[ChunkRef]) {
        let fetch = self.fetch_guesses.load(Ordering::Relaxed);
        self.fetcher.speculate(&self.backend, chunks, fetch);
    }
}

/// The decoder thread ([`decode`]): decodes what its lanes hand it until the fetcher is gone.
fn decode_ahead(shared: &Weak<Shared>, decoder: &DecodeAhead) {
    while let Some(chunk) = decoder.next() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.decode_speculatively(&chunk);
    }
}

impl Shared {
    /// Queues those of `chunks` that neither memory nor the disk cache holds at `priority`
    /// (joining, and moving up, any already queued), in order, then dispatches.
    fn queue_missing(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        chunks: &[ChunkRef],
        priority: Priority,
    ) {
        for chunk in chunks {
            if !self.holds(&chunk.record.digest) {
                self.join(backend, chunk, priority, None, None);
            }
        }
        self.dispatch(backend);
    }

    /// Whether memory or the disk cache has the chunk, without reading it or counting a lookup.
    fn holds(&self, digest: &[u8; 32]) -> bool {
        let in_memory = lock(&self.memory).contains(digest);
        in_memory || self.on_disk(digest)
    }

    /// Whether the disk cache has the chunk (what background work fills), without reading it.
    fn on_disk(&self, digest: &[u8; 32]) -> bool {
        self.cache.as_ref().is_some_and(|c| c.contains(digest))
    }

    /// The chunk from the memory LRU, counted as a memory hit (and as used, if it was decoded
    /// or fetched ahead of readers).
    fn memory_hit(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let hit = lock(&self.memory).get(&chunk.record.digest)?;
        self.metrics.memory_hits.inc();
        self.note_read(&chunk.record.digest);
        Some(hit)
    }

    /// The chunk decoded from the disk cache, without fetching; a copy that fails its checks is
    /// dropped from the cache (and `None`). The cache checks the entry's crc32 on every read;
    /// the chunk's blake3 is checked on its first decode in this process (bulk work caches
    /// chunks checked by crc32 only, and a cache may outlive the process that filled it).
    fn disk_hit(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let cache = self.cache.as_ref()?;
        let digest = &chunk.record.digest;
        let entry = cache.get(digest)?;
        let checked = lock(&self.verified).contains(digest);
        let checks = if checked {
            Checks::NONE
        } else {
            Checks::DIGEST
        };
        match decode_owned(&entry.record, entry.bytes, checks) {
            Ok(raw) => {
                if !checked {
                    self.mark_verified(*digest);
                }
                let raw = Arc::new(raw);
                self.keep_decoded(*digest, raw.clone());
                Some(raw)
            }
            Err(e) => {
                self.metrics.digest_mismatches.inc();
                error!(
                    chunk = %chunk.digest_hex(),
                    blob = %chunk.blob_digest,
                    "cached chunk fails verification, dropped from the cache and fetched again: {e}"
                );
                cache.remove(digest);
                None
            }
        }
    }

    /// Remembers that the chunk's blake3 was checked (the set is as large as the set of chunks
    /// read since the start: a few bytes per chunk of the cache at most).
    fn mark_verified(&self, digest: [u8; 32]) {
        lock(&self.verified).insert(digest);
    }

    /// A reader read the chunk: if it came ahead of readers, count it as used.
    fn note_read(&self, digest: &[u8; 32]) {
        {
            let mut ahead = lock(&self.ahead);
            if let Some((class, bytes)) = ahead.remove(digest) {
                ahead_used(&self.metrics, class).add(bytes);
            }
        }
        if let Some(decoder) = &self.decode_ahead {
            if decoder.has_unread() && decoder.gone(digest) {
                self.metrics.decoded_ahead_used.inc();
            }
        }
    }

    /// Records a chunk fetched ahead of readers, in `class`.
    fn note_ahead(&self, digest: [u8; 32], class: Priority, bytes: u64) {
        ahead_fetched(&self.metrics, class).add(bytes);
        let mut ahead = lock(&self.ahead);
        if ahead.len() >= MAX_AHEAD_RECORDS {
            ahead.clear();
        }
        ahead.insert(digest, (class, bytes));
    }

    /// Keeps a decoded chunk in the memory LRU; chunks decoded ahead that it evicts unread no
    /// longer count against the decoder's budget.
    fn keep_decoded(&self, digest: [u8; 32], raw: Arc<Vec<u8>>) {
        let evicted = lock(&self.memory).put(digest, raw);
        if let Some(decoder) = &self.decode_ahead {
            for digest in evicted {
                decoder.gone(&digest);
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
        if let Some(hit) = self.memory_hit(chunk) {
            return Ok(hit);
        }
        let started = Instant::now();
        let deadline = started + self.config.read_timeout;
        let mut fetched = false;
        let mut result = Err(SourceError::Blob {
            blob: chunk.blob_digest.clone(),
            reason: "fetch dropped".to_string(),
        });
        // A flight dropped unserved (its warm cancelled, its decode came to nothing) just as
        // this read joined it is started again, and so is one that left the chunk in the disk
        // cache undecoded (bulk work): the next one decodes it. A few rounds are plenty.
        for _ in 0..4 {
            let (flight, started_here) = self.join(backend, chunk, priority, None, None);
            self.dispatch(backend);
            let decoding = {
                let mut state = lock(&flight.state);
                state.readers += 1;
                state.decoding
            };
            if decoding {
                self.metrics.disk_hits.inc();
            } else {
                fetched = true;
                if !started_here {
                    self.metrics.joined.inc();
                }
            }
            result = match self.wait(&flight, chunk, backend, deadline) {
                Ok(Some(data)) => Ok(data),
                Ok(None) => continue,
                Err(e) if lock(&flight.state).abandoned => Err(e),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if result.is_ok() {
                break;
            }
        }
        if fetched {
            self.metrics.misses.inc();
            self.metrics.demand_wait.observe(started.elapsed());
        }
        match &result {
            Ok(_) => self.note_read(&chunk.record.digest),
            Err(_) => self.metrics.read_errors.inc(),
        }
        result
    }

    /// Decodes a disk-cached chunk into memory ahead of its readers, unless memory has it or
    /// it is already on its way; readers that ask meanwhile wait for this decode.
    fn decode_speculatively(&self, chunk: &ChunkRef) {
        let digest = chunk.record.digest;
        if lock(&self.memory).contains(&digest) {
            return;
        }
        let flight = {
            let mut flights = lock(&self.flights);
            if flights.contains_key(&digest) {
                return;
            }
            let flight = Flight::new(Priority::Speculative, None);
            {
                let mut state = lock(&flight.state);
                state.decoding = true;
                state.queued = false;
            }
            flights.insert(digest, flight.clone());
            flight
        };
        match self.disk_hit(chunk) {
            Some(raw) => {
                self.metrics.decoded_ahead.inc();
                if let Some(decoder) = &self.decode_ahead {
                    decoder.decoded(digest, raw.len());
                }
                self.finish(&digest, &flight, Ok(Some(raw)), None);
            }
            None => {
                // Evicted or corrupt since the guess: whoever joined starts anew.
                lock(&flight.state).abandoned = true;
                let err = SourceError::Blob {
                    blob: chunk.blob_digest.clone(),
                    reason: "speculative decode found no cached copy".into(),
                };
                self.finish(&digest, &flight, Err(err), None);
            }
        }
    }

    /// Drops the queued, not yet dispatched jobs of `digests` in the `queue` (background: a
    /// cancelled warm's; prefetch: a stopped stream's or profile's) that only the one stopping
    /// watches, so it stops fetching at once. Jobs that a reader or another watcher has joined
    /// stay queued (a reader's promotes the job out of this queue); a read-ahead hint that
    /// joined a dropped prefetch job loses it, which costs only that hint.
    fn drop_queued(
        &self,
        backend: &Backend,
        digests: &HashSet<[u8; 32]>,
        queue: Priority,
    ) -> usize {
        let dropped: Vec<Job> = lock(&backend.queue).drain(queue, |job| {
            digests.contains(&job.chunk.record.digest) && {
                let state = lock(&job.flight.state);
                (state.for_watcher || queue == Priority::Prefetch)
                    && state.priority == queue
                    && state.watchers.len() <= 1
            }
        });
        let reason = match queue {
            Priority::Prefetch => "stream or prefetch stopped",
            _ => "warm cancelled",
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

    /// Joins the flight of `chunk` or starts one, moving a queued one up to `priority`. A
    /// reader (demand) that starts a flight for a chunk on disk decodes it here, and others
    /// that come meanwhile wait for that decode; otherwise the chunk is queued for a fetch.
    /// `limit` applies to a new background job; `watcher` hears when the flight is done.
    /// Returns the flight and whether this call started it. Queues, never dispatches: the
    /// caller calls [`Shared::dispatch`] once it has queued what it has, so that adjacent
    /// chunks queued together leave in one request.
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
        let flight = Flight::new(priority, watcher);
        let on_disk = self.on_disk(&digest);
        if on_disk && priority == Priority::Demand {
            let mut state = lock(&flight.state);
            state.decoding = true;
            state.queued = false;
        }
        flights.insert(digest, flight.clone());
        drop(flights);

        // A fetch that completed between the caller's look at the caches and registering this
        // flight has filled them: look once more, so it is not fetched twice. Background work
        // is for the disk cache, so for it only the disk cache counts.
        let filled =
            on_disk || (priority != Priority::Background && lock(&self.memory).contains(&digest));
        if filled {
            let in_memory = lock(&self.memory).get(&digest);
            let served = in_memory.or_else(|| self.disk_hit(chunk));
            if let Some(hit) = served {
                let cache_error = (!self.on_disk(&digest)).then(|| "held in memory only".into());
                self.finish(&digest, &flight, Ok(Some(hit)), cache_error);
                return (flight, true);
            }
            // Gone again (evicted, or failed its check): fetch it after all.
            lock(&flight.state).decoding = false;
        }
        let job = Job {
            chunk: chunk.clone(),
            flight: flight.clone(),
            limit: limit.filter(|_| priority == Priority::Background).cloned(),
        };
        {
            let mut queue = lock(&backend.queue);
            match priority {
                // The newest guesses are the most specific: they go first.
                Priority::Speculative => queue.push_front(priority, job),
                _ => queue.push(priority, job),
            }
        }
        (flight, true)
    }

    /// Waits for `flight` until `deadline` (the reader's start plus the read timeout), or until
    /// the flight is overdue (see [`FlightState::overdue_at`]): its chunk, or `None` when it
    /// left the chunk in the disk cache undecoded.
    fn wait(
        &self,
        flight: &Flight,
        chunk: &ChunkRef,
        backend: &Backend,
        deadline: Instant,
    ) -> Result<Option<Arc<Vec<u8>>>, SourceError> {
        let mut state = lock(&flight.state);
        let (deadline, first) = match state.overdue_at {
            Some(overdue) => (overdue.min(deadline), false),
            None => {
                state.overdue_at = Some(deadline);
                (deadline, true)
            }
        };
        loop {
            if let Some(result) = &state.result {
                return result.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                // Said once per chunk fetch: by the reader that waited the whole read timeout.
                if first {
                    error!(
                        chunk = %chunk.digest_hex(),
                        blob = %chunk.blob_digest,
                        backend = %backend.id,
                        "chunk not served: no data from the backend within {:?}",
                        self.config.read_timeout
                    );
                } else {
                    debug!(
                        chunk = %chunk.digest_hex(),
                        "chunk not served: its fetch is overdue"
                    );
                }
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
    /// read of a failed chunk starts afresh. `cache_error` says why a fetched chunk is not in
    /// the disk cache, if the cache refused it.
    fn finish(
        &self,
        digest: &[u8; 32],
        flight: &Arc<Flight>,
        result: Result<Option<Arc<Vec<u8>>>, SourceError>,
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
            // A watcher that stopped early dropped its receiver; nothing to tell it.
            let _ = watcher.send(state.done(*digest));
        }
        flight.done.notify_all();
    }

    /// Starts requests while the backend's queue lets it (`queue::Queue::next`). A
    /// rate-limited background job that has to wait for tokens arms a timer that dispatches
    /// again.
    fn dispatch(self: &Arc<Self>, backend: &Arc<Backend>) {
        loop {
            let (batch, class) = {
                let mut queue = lock(&backend.queue);
                match queue.next(&self.limits) {
                    Next::Batch(batch, class) => (batch, class),
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
            let mut counted = [0u64; 4];
            for job in &batch {
                let mut state = lock(&job.flight.state);
                state.queued = false;
                counted[state.priority as usize] += 1;
            }
            for (class, n) in Priority::ALL.iter().zip(counted) {
                fetches(&self.metrics, *class).add(n);
            }
            let bytes = batch.iter().map(|j| stored_len(&j.chunk)).sum();
            let shared = self.clone();
            let backend = backend.clone();
            self.handle.spawn(async move {
                shared.run_request(&backend, batch).await;
                lock(&backend.queue).finished(class, bytes);
                shared.dispatch(&backend);
            });
        }
    }

    /// One request for `batch`: each chunk is verified, cached and handed to its readers on
    /// the blocking pool as soon as its bytes are in; chunks the request could not deliver get
    /// its error.
    async fn run_request(self: &Arc<Self>, backend: &Arc<Backend>, batch: Vec<Job>) {
        let spans: Vec<Range<u64>> = batch.iter().map(Job::range).collect();
        let blob = batch[0].chunk.blob_digest.clone();
        let (tx, rx) = mpsc::channel::<(usize, Result<Vec<u8>, BlobError>)>();
        let completer = {
            let shared = self.clone();
            let backend = backend.clone();
            tokio::task::spawn_blocking(move || {
                for (i, outcome) in rx {
                    shared.complete(&backend, &batch[i], outcome, Through::Store);
                }
            })
        };
        let outcome = {
            let tx = tx.clone();
            let mut deliver = move |i: usize, bytes: Vec<u8>| {
                let _ = tx.send((i, Ok(bytes)));
            };
            let store = &*backend.store;
            request::fetch_spans(&self.config, backend, store, &blob, &spans, &mut deliver).await
        };
        if let Err((first, e)) = outcome {
            error!(
                backend = %backend.id,
                chunks = spans.len() - first,
                "chunk not served: {e}"
            );
            for i in first..spans.len() {
                let _ = tx.send((i, Err(e.clone())));
            }
        }
        drop(tx);
        if let Err(e) = completer.await {
            error!(backend = %backend.id, "chunk verification task failed: {e}");
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

    /// Verifies, caches and hands out one fetched chunk (or its request's error). A chunk a
    /// reader waits for, or will read next (read-ahead, a guess at its next file), is decoded
    /// and its blake3 checked now, and kept decoded in memory. Bulk work (warms, profiles,
    /// whole images, streams: whatever a watcher drives, and background work) only checks the
    /// length and crc32 and writes the chunk to the disk cache: its blake3 is checked when it
    /// is first decoded for a reader, so it is decoded once, not twice.
    fn complete(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        job: &Job,
        outcome: Result<Vec<u8>, BlobError>,
        through: Through,
    ) {
        let digest = job.chunk.record.digest;
        let stored = match outcome {
            Ok(stored) => stored,
            Err(e) => {
                let err = SourceError::Blob {
                    blob: job.chunk.blob_digest.clone(),
                    reason: e.to_string(),
                };
                self.finish(&digest, &job.flight, Err(err), None);
                return;
            }
        };
        let (priority, bulk, readers, decode_ahead) = {
            let state = lock(&job.flight.state);
            (
                state.priority,
                state.for_watcher,
                state.readers,
                state.decode_ahead,
            )
        };
        let decode = priority == Priority::Demand
            || readers > 0
            || (!bulk && priority != Priority::Background)
            || self.cache.is_none();
        let checked = if decode {
            decode_chunk(&job.chunk.record, &stored).map(Some)
        } else {
            check_stored(&job.chunk.record, &stored).map(|()| None)
        };
        let raw = match checked {
            Ok(raw) => raw,
            Err(e) => return self.refuse_fetched(backend, job, e, through),
        };
        backend.metrics.chunks.inc();
        let cache_error = self.store(&job.chunk, &stored);
        if priority != Priority::Demand {
            self.note_ahead(digest, priority, stored_len(&job.chunk));
        }
        let result = match raw {
            Some(raw) => {
                self.mark_verified(digest);
                let raw = Arc::new(raw);
                self.keep_decoded(digest, raw.clone());
                Some(raw)
            }
            // Not decoded and not cached (the cache refused it): decode it after all, so the
            // bytes fetched are not lost to whoever waits.
            None if cache_error.is_some() => match decode_chunk(&job.chunk.record, &stored) {
                Ok(raw) => {
                    self.mark_verified(digest);
                    Some(Arc::new(raw))
                }
                Err(e) => return self.refuse_fetched(backend, job, e, through),
            },
            None => {
                if let (true, Some(decoder)) = (decode_ahead, &self.decode_ahead) {
                    decoder.known(job.chunk.clone());
                }
                None
            }
        };
        self.finish(&digest, &job.flight, Ok(result), cache_error);
    }

    /// A fetched chunk failed its checks: counted and logged. Bytes that came through a mirror
    /// are fetched again from the origin (a tier's bad disk must not fail reads); otherwise its
    /// readers get the error.
    fn refuse_fetched(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        job: &Job,
        e: ChunkError,
        through: Through,
    ) {
        self.metrics.digest_mismatches.inc();
        let origin = match through {
            Through::Store => backend.store.origin(),
            Through::Origin => None,
        };
        if let Some(origin) = origin {
            warn!(
                backend = %backend.id,
                blob = %job.chunk.blob_digest,
                offset = job.chunk.record.comp_off,
                "chunk fetched through a mirror fails verification, fetching it from the origin: {e}"
            );
            self.refetch_from_origin(backend, job, origin);
            return;
        }
        error!(
            backend = %backend.id,
            blob = %job.chunk.blob_digest,
            offset = job.chunk.record.comp_off,
            "chunk not served: fetched bytes fail verification: {e}"
        );
        let digest = job.chunk.record.digest;
        self.finish(&digest, &job.flight, Err(SourceError::Chunk(e)), None);
    }

    /// Fetches `job`'s chunk from `origin`, bypassing the mirrors, and completes it from there.
    fn refetch_from_origin(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        job: &Job,
        origin: Arc<dyn BlobStore>,
    ) {
        let job = Job {
            chunk: job.chunk.clone(),
            flight: job.flight.clone(),
            limit: None,
        };
        let shared = self.clone();
        let backend = backend.clone();
        self.handle.spawn(async move {
            let blob = job.chunk.blob_digest.clone();
            let mut bytes = Vec::new();
            let outcome = request::fetch_spans(
                &shared.config,
                &backend,
                &*origin,
                &blob,
                &[job.range()],
                &mut |_, got| bytes = got,
            )
            .await
            .map(|()| bytes)
            .map_err(|(_, e)| e);
            let completing = shared.clone();
            let done = tokio::task::spawn_blocking(move || {
                completing.complete(&backend, &job, outcome, Through::Origin)
            });
            if let Err(e) = done.await {
                error!("chunk verification task failed: {e}");
            }
        });
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
                // Once per episode: a full or read-only disk refuses every chunk.
                if !self.disk_full.swap(true, Ordering::Relaxed) {
                    warn!(chunk = %chunk.digest_hex(), "serving chunks from memory without caching them: {e}");
                }
                Some(e.to_string())
            }
        }
    }
}

/// The counter of chunks fetched in `class`.
fn fetches(m: &ChunkMetrics, class: Priority) -> &Counter {
    match class {
        Priority::Demand => &m.demand_fetches,
        Priority::Prefetch => &m.prefetch_fetches,
        Priority::Speculative => &m.speculative_fetches,
        Priority::Background => &m.background_fetches,
    }
}

/// The counter of bytes fetched ahead of readers in `class` (demand counts as prefetch: it
/// is never ahead).
fn ahead_fetched(m: &ChunkMetrics, class: Priority) -> &Counter {
    match class {
        Priority::Demand | Priority::Prefetch => &m.prefetch_ahead_bytes,
        Priority::Speculative => &m.speculative_ahead_bytes,
        Priority::Background => &m.background_ahead_bytes,
    }
}

/// The counter of bytes fetched ahead of readers in `class` that a reader then read.
fn ahead_used(m: &ChunkMetrics, class: Priority) -> &Counter {
    match class {
        Priority::Demand | Priority::Prefetch => &m.prefetch_ahead_used_bytes,
        Priority::Speculative => &m.speculative_ahead_used_bytes,
        Priority::Background => &m.background_ahead_used_bytes,
    }
}

/// Moves the queued job for `digest` up to the queue of `to`, if it waits in a less urgent one.
fn promote(backend: &Backend, flight: &Flight, digest: &[u8; 32], to: Priority) {
    let from = {
        let mut state = lock(&flight.state);
        if state.priority <= to || !state.queued {
            return;
        }
        std::mem::replace(&mut state.priority, to)
    };
    let mut queue = lock(&backend.queue);
    // Look in every less urgent queue from where it was: a concurrent promotion to a middle
    // priority may not have moved the job yet.
    for class in Priority::ALL {
        if class <= to || class > from {
            continue;
        }
        if let Some(mut job) = queue.remove(class, |j| &j.chunk.record.digest == digest) {
            job.limit = None;
            match to {
                Priority::Speculative => queue.push_front(to, job),
                _ => queue.push(to, job),
            }
            return;
        }
    }
}

/// One runtime for the fetchers of the agent's unit tests, as lazyd has one for its fetcher.
#[cfg(test)]
pub(crate) fn test_runtime() -> tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the tests")
        })
        .handle()
        .clone()
}

#[cfg(test)]
mod tests;
