//! The fetcher: the `ChunkSource` a mount of a remote image reads through.
//!
//! A chunk read tries, in order: the decoded-chunk LRU in memory, the compressed chunk cache on
//! disk (`cache`), and the chunk's backend (`BlobStore`). Misses go through one table of fetches
//! in flight, keyed by chunk digest (single-flight: any number of readers of one chunk cause one
//! fetch), and one queue per backend with two priorities: a demand read is dispatched before any
//! queued prefetch, always, and a queued prefetch that a reader starts waiting for is promoted.
//!
//! When the queue is dispatched, the job taken is extended with queued jobs of the same blob whose
//! stored bytes are adjacent (before or after) into one range request of at most
//! `max_request_bytes`: a kernel read-ahead of several chunks, or a prefetch run, becomes one GET.
//! Each backend runs at most `concurrency` requests at once, of which at most half prefetch, so a
//! demand read finds a free slot soon and shares the link with few prefetch transfers.
//!
//! A request is bounded by `request_timeout`; transient failures (connection errors, 5xx, short
//! bodies, timeouts) are retried with exponential backoff up to `max_attempts`; permanent ones
//! (missing blob, denied, bad range) are not. Every chunk's bytes are checked (length, crc32,
//! zstd, blake3: `decode_chunk`) before they are cached or served; a mismatch is logged and the
//! chunk is not served. A reader waits at most `read_timeout` for its chunk and then gets an
//! error (EIO at the filesystem) with a log line saying why; the next read starts a new fetch,
//! so reads succeed again as soon as the backend is back.
//!
//! Blocking and async meet here: `ChunkSource::chunk` is called on the filesystem's worker
//! threads and blocks on a condition variable; requests run on the fetcher's own tokio runtime;
//! verification and decoding run on its blocking pool.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fusefs::chunk::decode_chunk;
use fusefs::{ChunkRef, ChunkSource, SourceError};
use lru::LruCache;
use tracing::{debug, error, warn};

use crate::blobstore::{BlobError, BlobStore};
use crate::cache::{CacheError, ChunkCache};
use crate::metrics::{BackendMetrics, ChunkMetrics, MetricsSnapshot};

/// Who asked for a chunk. Demand reads always go first; prefetch fills idle capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Demand,
    Prefetch,
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
    /// Requests in flight per backend.
    pub concurrency: usize,
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
    running: usize,
    /// Requests in flight that were taken from the prefetch queue.
    running_prefetch: usize,
}

struct Job {
    chunk: ChunkRef,
    flight: Arc<Flight>,
}

impl Job {
    fn range(&self) -> Range<u64> {
        let start = self.chunk.record.comp_off;
        start..start + u64::from(self.chunk.record.comp_len)
    }
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

    /// Queues `chunks` for background fetching at prefetch priority; returns at once. Chunks
    /// already cached or in flight are skipped.
    pub fn prefetch(&self, backend: &Arc<Backend>, chunks: &[ChunkRef]) {
        let shared = &self.shared;
        for chunk in chunks {
            if !shared.holds(&chunk.record.digest) {
                shared.join(backend, chunk, Priority::Prefetch);
            }
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let shared = &self.shared;
        MetricsSnapshot {
            chunks: shared.metrics.snapshot(),
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
        lock(&self.memory).lru.contains(digest)
            || self.cache.as_ref().is_some_and(|c| c.contains(digest))
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
        let (flight, leader) = self.join(backend, chunk, priority);
        if !leader {
            self.metrics.joined.inc();
        }
        let result = self.wait(&flight, chunk, backend);
        if result.is_err() {
            self.metrics.read_errors.inc();
        }
        result
    }

    /// Joins the fetch in flight for `chunk` or starts one. Returns the flight and whether this
    /// call started it.
    fn join(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        chunk: &ChunkRef,
        priority: Priority,
    ) -> (Arc<Flight>, bool) {
        let digest = chunk.record.digest;
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get(&digest).cloned() {
            drop(flights);
            if priority == Priority::Demand {
                promote(backend, &flight, &digest);
            }
            return (flight, false);
        }
        let flight = Arc::new(Flight {
            state: Mutex::new(FlightState {
                priority,
                queued: true,
                result: None,
            }),
            done: Condvar::new(),
        });
        flights.insert(digest, flight.clone());
        drop(flights);

        // A fetch that completed between our cache lookup and registering this flight has
        // already filled the caches: look once more, so it is not fetched twice. `holds` first,
        // so a plain miss is not looked up (and counted) in the disk cache a second time.
        if self.holds(&digest) {
            if let Some(hit) = self.cached(chunk) {
                self.finish(&digest, &flight, Ok(hit));
                return (flight, true);
            }
        }
        let job = Job {
            chunk: chunk.clone(),
            flight: flight.clone(),
        };
        {
            let mut queue = lock(&backend.queue);
            match priority {
                Priority::Demand => queue.demand.push_back(job),
                Priority::Prefetch => queue.prefetch.push_back(job),
            }
        }
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
    fn finish(
        &self,
        digest: &[u8; 32],
        flight: &Arc<Flight>,
        result: Result<Arc<Vec<u8>>, SourceError>,
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
        flight.done.notify_all();
    }

    /// Starts requests while the backend has free slots: demand jobs first, each extended with
    /// adjacent queued jobs of the same blob.
    fn dispatch(self: &Arc<Self>, backend: &Arc<Backend>) {
        loop {
            let (batch, from_prefetch) = {
                let mut queue = lock(&backend.queue);
                if queue.running >= self.config.concurrency {
                    return;
                }
                let from_prefetch = queue.demand.is_empty();
                if from_prefetch && queue.running_prefetch >= prefetch_slots(&self.config) {
                    return;
                }
                let Some(batch) = take_batch(&mut queue, self.config.max_request_bytes) else {
                    return;
                };
                queue.running += 1;
                queue.running_prefetch += usize::from(from_prefetch);
                (batch, from_prefetch)
            };
            let mut priority = Priority::Prefetch;
            for job in &batch {
                let mut state = lock(&job.flight.state);
                state.queued = false;
                priority = priority.min(state.priority);
            }
            match priority {
                Priority::Demand => self.metrics.demand_fetches.add(batch.len() as u64),
                Priority::Prefetch => self.metrics.prefetch_fetches.add(batch.len() as u64),
            }
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
                    queue.running_prefetch -= usize::from(from_prefetch);
                }
                shared.dispatch(&backend);
            });
        }
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
                    self.finish(&job.chunk.record.digest, &job.flight, Err(err));
                }
                return;
            }
        };
        for job in batch {
            let range = job.range();
            let from = (range.start - start) as usize;
            let stored = &bytes[from..from + (range.end - range.start) as usize];
            let result = match decode_chunk(&job.chunk.record, stored) {
                Ok(raw) => {
                    backend.metrics.chunks.inc();
                    self.store(&job.chunk, stored);
                    let raw = Arc::new(raw);
                    let prefetched = lock(&job.flight.state).priority == Priority::Prefetch;
                    if !prefetched || self.cache.is_none() {
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
            self.finish(&job.chunk.record.digest, &job.flight, result);
        }
    }

    /// Writes verified stored bytes to the disk cache; when the disk is full the chunk is still
    /// served (from memory), and the condition is logged once until inserts work again.
    fn store(&self, chunk: &ChunkRef, stored: &[u8]) {
        let Some(cache) = &self.cache else { return };
        match cache.insert(&chunk.record, stored) {
            Ok(()) => {
                if self.disk_full.swap(false, Ordering::Relaxed) {
                    warn!("chunk cache accepts writes again");
                }
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
            }
        }
    }
}

/// Moves a queued prefetch job for `digest` to the demand queue.
fn promote(backend: &Backend, flight: &Flight, digest: &[u8; 32]) {
    {
        let mut state = lock(&flight.state);
        if state.priority == Priority::Demand || !state.queued {
            return;
        }
        state.priority = Priority::Demand;
    }
    let mut queue = lock(&backend.queue);
    if let Some(pos) = queue
        .prefetch
        .iter()
        .position(|j| &j.chunk.record.digest == digest)
    {
        if let Some(job) = queue.prefetch.remove(pos) {
            queue.demand.push_back(job);
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

/// Requests prefetch may have in flight on one backend: half the slots, so that a demand read
/// always finds a free slot soon and shares the link with few prefetch transfers.
fn prefetch_slots(config: &FetcherConfig) -> usize {
    (config.concurrency / 2).max(1)
}

/// Queued jobs looked at when extending a request with adjacent chunks: a full 8 MiB request of
/// 32 KiB chunks, or of default 1 MiB chunks with other blobs' jobs interleaved; images with
/// smaller chunks get smaller coalesced requests.
const COALESCE_SCAN: usize = 256;

/// Takes the next job (demand first) and the queued jobs of the same priority class that extend
/// its byte range in the same blob, up to `max_bytes`.
fn take_batch(queue: &mut Queue, max_bytes: u64) -> Option<Vec<Job>> {
    let from_demand = !queue.demand.is_empty();
    let source = if from_demand {
        &mut queue.demand
    } else {
        &mut queue.prefetch
    };
    let first = source.pop_front()?;
    let blob = first.chunk.blob_digest.clone();
    let mut range = first.range();
    let mut batch = vec![first];
    // Extend forwards and backwards with exactly adjacent jobs until nothing more fits. Only the
    // head of the queue is searched, so a long prefetch queue (a warm of thousands of chunks,
    // queued in blob order) costs a bounded scan per request, not one proportional to it.
    loop {
        let next = source.iter().take(COALESCE_SCAN).position(|j| {
            j.chunk.blob_digest == blob && {
                let r = j.range();
                (r.start == range.end || r.end == range.start)
                    && (range.end - range.start) + (r.end - r.start) <= max_bytes
            }
        });
        let Some(pos) = next else { break };
        let Some(job) = source.remove(pos) else { break };
        let r = job.range();
        range = range.start.min(r.start)..range.end.max(r.end);
        batch.push(job);
    }
    batch.sort_by_key(|j| j.chunk.record.comp_off);
    Some(batch)
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
            lock(&self.log).push(range.clone());
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
        let recording = Arc::new(Recording {
            inner: faulty,
            log: Mutex::new(Vec::new()),
        });
        let fetcher = Fetcher::new(
            FetcherConfig {
                concurrency: 1,
                // One chunk per request, so the order of requests is the order of dispatch.
                max_request_bytes: 1,
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
}
