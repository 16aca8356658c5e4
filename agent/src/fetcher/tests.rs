//! The fetcher against in-memory and fault-injecting stores: single-flight, coalescing,
//! priorities, retries, timeouts, verification, the disk cache, warm, streaming delivery and
//! speculation.

use super::*;
use crate::blobstore::{Faults, FaultyBlobStore, MemoryBlobStore};
use async_trait::async_trait;
use fusefs::format::ChunkRecord;

use super::test_runtime as runtime;

/// A blob of `n` distinct chunks of `size` bytes, stored in `store`.
fn blob(store: &MemoryBlobStore, n: usize, size: usize) -> Vec<ChunkRef> {
    let raws = (0..n)
        .map(|i| (0..size).map(|j| ((i * 31 + j / 7) % 251) as u8).collect())
        .collect::<Vec<Vec<u8>>>();
    blob_of(store, &raws)
}

/// A blob of the chunks `raws`, each encoded as the converter does, stored in `store`.
fn blob_of(store: &MemoryBlobStore, raws: &[Vec<u8>]) -> Vec<ChunkRef> {
    let mut bytes = Vec::new();
    let mut records = Vec::new();
    for raw in raws {
        let e = fusefs::chunk::encode_chunk(raw, 3).unwrap();
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

/// A chunk cache in `dir` with a budget of `budget_bytes`.
fn disk_cache(dir: &std::path::Path, budget_bytes: u64) -> Arc<ChunkCache> {
    Arc::new(
        ChunkCache::open(&crate::cache::CacheConfig {
            dir: dir.to_path_buf(),
            budget_bytes,
        })
        .unwrap(),
    )
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
    fn id(&self) -> BackendId {
        BackendId::memory("recording")
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

/// One background slot, one chunk per request: requests go out in queue order.
fn one_chunk_per_request() -> FetcherConfig {
    FetcherConfig {
        concurrency: 2,
        // Half the slots for prefetch and background work (the rule before streams).
        prefetch_requests: 1,
        max_request_bytes: 1,
        background_request_bytes: 1,
        ..config()
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
    let fetcher = Fetcher::new(config, None, runtime()).unwrap();
    let backend = fetcher.backend(faulty.clone());
    (fetcher, faulty, backend, chunks)
}

/// Reads `chunk` until it is served, for at most `limit` (a fetch that failed may still be
/// running out its retries); panics if it is not.
fn read_until_served(
    fetcher: &Fetcher,
    backend: &Arc<Backend>,
    chunk: &ChunkRef,
    limit: Duration,
) -> Arc<Vec<u8>> {
    let deadline = Instant::now() + limit;
    loop {
        match fetcher.read(backend, chunk, Priority::Demand) {
            Ok(got) => return got,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not served yet: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("not served within {limit:?}: {e}"),
        }
    }
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
        runtime(),
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
fn throttled_requests_wait_as_asked_up_to_the_read_timeout() {
    let (fetcher, store, backend, chunks) = setup(
        2,
        FetcherConfig {
            read_timeout: Duration::from_millis(1500),
            ..config()
        },
    );
    // Two 429s asking for 300 ms each: the read succeeds after both waits, not after the
    // 10 ms backoffs.
    store.set(Faults {
        fail_next: 2,
        retry_after: Some(Duration::from_millis(300)),
        ..Faults::default()
    });
    let started = Instant::now();
    let got = fetcher
        .read(&backend, &chunks[0], Priority::Demand)
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(*got, expected(&chunks[0]));
    assert!(waited >= Duration::from_millis(600), "waited {waited:?}");
    assert_eq!(store.requests(), 3);

    // A server asking for an hour: the request asks again one read timeout later instead of
    // an hour later (the first reader's own wait ends about then too, with the chunk or EIO).
    store.set(Faults {
        fail_next: 1,
        retry_after: Some(Duration::from_secs(3600)),
        ..Faults::default()
    });
    let started = Instant::now();
    let got = read_until_served(&fetcher, &backend, &chunks[1], Duration::from_secs(10));
    assert_eq!(*got, expected(&chunks[1]));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    assert_eq!(store.requests(), 5);
}

/// A reader waits one read timeout, and one that joins the fetch after that fails at once.
/// Regression: a read through the page cache got EIO only after twice the read timeout, since
/// the kernel retries a page whose read-ahead failed and that retry waited a read timeout too.
#[test]
fn silent_backend_fails_reads_within_one_read_timeout_and_reads_recover() {
    let (fetcher, store, backend, chunks) = setup(
        2,
        FetcherConfig {
            request_timeout: Duration::from_millis(300),
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
    assert!(matches!(err, SourceError::Timeout(_)), "{err}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(1500),
        "waited {waited:?}"
    );
    // The fetch is still retrying (4 attempts of 300 ms): the next reader fails at once.
    let started = Instant::now();
    let err = fetcher
        .read(&backend, &chunks[0], Priority::Demand)
        .unwrap_err();
    assert!(matches!(err, SourceError::Timeout(_)), "{err}");
    let again = started.elapsed();
    assert!(again < Duration::from_millis(200), "waited {again:?} again");

    store.set(Faults::default());
    // A new read succeeds once the failed fetch has given up or its next attempt got through.
    let got = read_until_served(&fetcher, &backend, &chunks[0], Duration::from_secs(5));
    assert_eq!(*got, expected(&chunks[0]));
    assert!(backend.metrics.timeouts.get() >= 1);
}

#[test]
fn corrupted_bytes_are_never_served_nor_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = disk_cache(dir.path(), 64 << 20);
    let memory = MemoryBlobStore::new();
    let chunks = blob(&memory, 3, 64 << 10);
    let store = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
    let fetcher = Fetcher::new(config(), Some(cache.clone()), runtime()).unwrap();
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
fn a_chunk_a_mirror_corrupted_is_fetched_again_from_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let cache = disk_cache(dir.path(), 64 << 20);
    let origin = Arc::new(MemoryBlobStore::new());
    let chunks = blob(&origin, 3, 64 << 10);
    // The same blob, in the mirror.
    let copy = MemoryBlobStore::new();
    blob(&copy, 3, 64 << 10);
    let mirror = Arc::new(FaultyBlobStore::new(Arc::new(copy)));
    mirror.set(Faults {
        corrupt_offset: Some(chunks[1].record.comp_off + 5),
        ..Faults::default()
    });
    let (store, via, traffic) =
        crate::mirror::mirrored_for_tests(mirror.clone(), origin.clone(), Duration::from_secs(1));
    let fetcher = Fetcher::new(config(), Some(cache.clone()), runtime()).unwrap();
    let backend = fetcher.backend(store);
    for class in [Priority::Demand, Priority::Background] {
        let chunk = if class == Priority::Demand {
            &chunks[1]
        } else {
            &chunks[2]
        };
        if class == Priority::Background {
            mirror.set(Faults {
                corrupt_offset: Some(chunk.record.comp_off + 5),
                ..Faults::default()
            });
        }
        let got = fetcher.read(&backend, chunk, class).unwrap();
        assert_eq!(*got, expected(chunk), "{class:?}");
        assert!(cache.contains(&chunk.record.digest));
    }
    assert_eq!(fetcher.snapshot().chunks.digest_mismatches, 2);
    assert_eq!(via.snapshot().requests, 2);
    // Only the two bad chunks were asked of the origin.
    assert_eq!(origin.requests(), 2);
    assert_eq!(traffic.requests.get(), 2);
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
        let fetcher = Fetcher::new(config(), Some(cache), runtime()).unwrap();
        let backend = fetcher.backend(memory.clone());
        for c in &chunks {
            fetcher.read(&backend, c, Priority::Demand).unwrap();
        }
    }
    let before = memory.requests();
    // The first fetcher's last request tasks may still be ending on the shared runtime, holding
    // its cache (and the cache directory's lock) a moment longer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let cache = loop {
        match ChunkCache::open(&cache_config) {
            Ok(cache) => break Arc::new(cache),
            Err(e) if Instant::now() < deadline => {
                eprintln!("cache still held: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let fetcher = Fetcher::new(config(), Some(cache), runtime()).unwrap();
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
    let cache = disk_cache(dir.path(), 64 << 20);
    let memory = MemoryBlobStore::new();
    let chunks = blob(&memory, n, 64 << 10);
    let store = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
    let recording = Recording::new(store.clone());
    let fetcher = Fetcher::new(config, Some(cache.clone()), runtime()).unwrap();
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
        lock(&t.fetcher.shared.memory).is_empty(),
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
        window_bytes: 1,
        ..WarmOptions::default()
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
    let small = disk_cache(dir.path(), total - 1);
    let fetcher = Fetcher::new(config(), Some(small), runtime()).unwrap();
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

    let memory_only = Fetcher::new(config(), None, runtime()).unwrap();
    let backend = memory_only.backend(t.store.clone());
    let err = memory_only
        .warm(&backend, &t.chunks, &WarmOptions::default(), &mut |_| true)
        .unwrap_err();
    assert!(matches!(err, WarmError::NoCache), "{err}");
}

/// Regression: a warm onto a cache whose disk is smaller than its budget reported success
/// although the cache, evicting to make room on the full disk, kept only its last chunks.
#[test]
#[cfg_attr(
    not(feature = "system-tests"),
    ignore = "needs root: mounts FUSE or a tmpfs"
)]
fn warm_onto_a_disk_smaller_than_the_budget_fails_naming_what_was_kept() {
    lazy_tests::mount::require_root();
    let dir = tempfile::tempdir().unwrap();
    let _disk = lazy_tests::mount::TmpfsMount::new(dir.path(), "6m").unwrap();
    // 64 MiB of budget (4 MiB segments) on a 6 MiB disk, for 10 MiB of incompressible chunks.
    let cache = disk_cache(&dir.path().join("cache"), 64 << 20);
    let memory = MemoryBlobStore::new();
    let raws: Vec<Vec<u8>> = (0..40)
        .map(|i| lazy_tests::pseudo_random_bytes(i, 256 << 10))
        .collect();
    let chunks = blob_of(&memory, &raws);
    let fetcher = Fetcher::new(config(), Some(cache.clone()), runtime()).unwrap();
    let backend = fetcher.backend(Arc::new(memory));
    let err = fetcher
        .warm(&backend, &chunks, &WarmOptions::default(), &mut |_| true)
        .unwrap_err();
    let WarmError::Evicted { kept, total } = err else {
        panic!("{err}");
    };
    assert_eq!(total, 40);
    let held = chunks
        .iter()
        .filter(|c| cache.contains(&c.record.digest))
        .count() as u64;
    assert!(kept < total && kept == held, "kept {kept}, held {held}");
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
        window_bytes: 1,
        ..WarmOptions::default()
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
    let t = cached(12, one_chunk_per_request());
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
fn rate_limited_background_warm_takes_its_bytes_over_the_rate() {
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
    let limited = WarmOptions {
        limit: Some(RateLimit::new(rate)),
        ..WarmOptions::default()
    };
    t.fetcher
        .warm(&t.backend, &t.chunks, &limited, &mut |_| true)
        .unwrap();
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
fn warm_keeps_its_order_and_skips_cached_chunks() {
    let t = cached(10, one_chunk_per_request());
    t.fetcher
        .read(&t.backend, &t.chunks[3], Priority::Demand)
        .unwrap();
    let profile: Vec<ChunkRef> = t.chunks.iter().rev().cloned().collect();
    t.fetcher
        .warm(&t.backend, &profile, &WarmOptions::default(), &mut |_| true)
        .unwrap();
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
    let t = cached(10, one_chunk_per_request());
    t.store.set(Faults {
        delay: Duration::from_millis(50),
        ..Faults::default()
    });
    std::thread::scope(|s| {
        let warm = s.spawn(|| {
            t.fetcher
                .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |_| {
                    true
                })
        });
        std::thread::sleep(Duration::from_millis(20));
        t.fetcher.prefetch(&t.backend, &t.chunks[9..]);
        warm.join().unwrap().unwrap();
    });
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

/// A store that streams bodies in 4 KiB pieces, `per_piece` apart, and can break a body off
/// once after `break_after` bytes (then it streams whole bodies again). Logs the ranges asked.
struct Trickle {
    inner: MemoryBlobStore,
    per_piece: Duration,
    break_after: Mutex<Option<u64>>,
    log: Mutex<Vec<Range<u64>>>,
}

#[async_trait]
impl BlobStore for Trickle {
    fn id(&self) -> BackendId {
        BackendId::memory("trickle")
    }
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        self.inner.read_range(digest, range).await
    }
    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        lock(&self.log).push(range.clone());
        let bytes = self.inner.read_range(digest, range).await?;
        let cut = lock(&self.break_after).take();
        for (i, piece) in bytes.chunks(4096).enumerate() {
            if cut.is_some_and(|cut| (i * 4096) as u64 >= cut) {
                return Err(BlobError::Unavailable {
                    store: BackendId::memory("trickle"),
                    digest: digest.to_string(),
                    reason: "connection reset".into(),
                });
            }
            tokio::time::sleep(self.per_piece).await;
            sink(piece);
        }
        Ok(())
    }
    async fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, BlobError> {
        self.inner.read_blob(digest, max).await
    }
}

fn trickle(n: usize, per_piece: Duration) -> (Arc<Trickle>, Vec<ChunkRef>) {
    let inner = MemoryBlobStore::new();
    let chunks = blob(&inner, n, 64 << 10);
    let store = Arc::new(Trickle {
        inner,
        per_piece,
        break_after: Mutex::new(None),
        log: Mutex::new(Vec::new()),
    });
    (store, chunks)
}

#[test]
fn a_reader_gets_its_chunk_when_its_bytes_arrive_not_when_the_request_ends() {
    // 8 chunks of 64 KiB in one request, 16 pieces each, 5 ms a piece: the request takes
    // about 640 ms, its first chunk is in after about 80.
    let (store, chunks) = trickle(8, Duration::from_millis(5));
    let fetcher = Fetcher::new(config(), None, runtime()).unwrap();
    let backend = fetcher.backend(store.clone());
    fetcher.prefetch(&backend, &chunks);
    let started = Instant::now();
    let got = fetcher
        .read(&backend, &chunks[0], Priority::Demand)
        .unwrap();
    let first = started.elapsed();
    assert_eq!(*got, expected(&chunks[0]));
    let got = fetcher
        .read(&backend, &chunks[7], Priority::Demand)
        .unwrap();
    let last = started.elapsed();
    assert_eq!(*got, expected(&chunks[7]));
    let log = lock(&store.log).clone();
    assert_eq!(log.len(), 1, "one request: {log:?}");
    assert!(
        first * 3 < last,
        "the first chunk came after {first:?}, the last after {last:?}"
    );
}

/// A blob of `n` chunks of `size` incompressible bytes (stored as they are), and each chunk's
/// bytes.
fn raw_blob(store: &MemoryBlobStore, n: usize, size: usize) -> (Vec<ChunkRef>, Vec<Vec<u8>>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let raws: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect();
    let chunks = blob_of(store, &raws);
    assert!(
        chunks.iter().all(|c| c.record.comp_len as usize == size),
        "random bytes are stored raw"
    );
    (chunks, raws)
}

#[test]
fn a_body_broken_off_midway_is_retried_for_the_chunks_not_delivered_only() {
    let inner = MemoryBlobStore::new();
    let (chunks, raws) = raw_blob(&inner, 6, 10_000);
    // The body breaks off at 24 KiB: chunks 0 and 1 (20,000 bytes) are delivered, 2.. are not.
    let store = Arc::new(Trickle {
        inner,
        per_piece: Duration::ZERO,
        break_after: Mutex::new(Some(24 << 10)),
        log: Mutex::new(Vec::new()),
    });
    let fetcher = Fetcher::new(config(), None, runtime()).unwrap();
    let backend = fetcher.backend(store.clone());
    fetcher.prefetch(&backend, &chunks);
    for (c, raw) in chunks.iter().zip(&raws) {
        assert_eq!(*fetcher.read(&backend, c, Priority::Demand).unwrap(), *raw);
    }
    let log = lock(&store.log).clone();
    assert_eq!(
        log,
        vec![0..60_000, 20_000..60_000],
        "the retry asks for the rest only"
    );
    assert_eq!(
        backend.metrics.bytes.get(),
        (24 << 10) + 40_000,
        "bytes received: the broken body's and the retry's"
    );
    assert_eq!(backend.metrics.retries.get(), 1);
}

#[test]
fn guesses_ride_along_with_a_demand_request_and_their_use_is_counted() {
    let t = cached(
        8,
        FetcherConfig {
            // No speculative request may start before the demand read is queued.
            speculative_requests: 1,
            ..config()
        },
    );
    t.store.set(Faults {
        delay: Duration::from_millis(100),
        ..Faults::default()
    });
    // A guess in flight holds the one speculative slot...
    t.fetcher.speculate(&t.backend, &t.chunks[6..7], true);
    // ...so these wait in the queue: chunks 1..4, right after the reader's chunk 0.
    t.fetcher.speculate(&t.backend, &t.chunks[1..4], true);
    let got = t
        .fetcher
        .read(&t.backend, &t.chunks[0], Priority::Demand)
        .unwrap();
    assert_eq!(*got, expected(&t.chunks[0]));
    let log = lock(&t.recording.log).clone();
    let end = t.chunks[3].record.comp_off + u64::from(t.chunks[3].record.comp_len);
    assert!(
        log.contains(&(0..end)),
        "chunks 1..3 did not ride along with chunk 0: {log:?}"
    );
    // The riders are in memory: reading them takes no request.
    let requests = t.store.requests();
    for c in &t.chunks[1..4] {
        assert_eq!(
            *t.fetcher.read(&t.backend, c, Priority::Demand).unwrap(),
            expected(c)
        );
    }
    assert_eq!(t.store.requests(), requests);
    let riders = stored_bytes(&t.chunks[1..4]);
    // Chunk 6's request ran beside the demand one and is counted when it ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut m = t.fetcher.snapshot().chunks;
    while m.speculative_bytes < riders + stored_len(&t.chunks[6]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        m = t.fetcher.snapshot().chunks;
    }
    assert_eq!(m.demand_fetches, 1);
    assert_eq!(m.speculative_fetches, 4);
    assert_eq!(m.speculative_used_bytes, riders);
    assert_eq!(m.speculative_bytes, riders + stored_len(&t.chunks[6]));
}

#[test]
fn guesses_are_not_fetched_when_told_not_to_and_wait_for_prefetch() {
    let t = cached(8, config());
    t.fetcher.speculate(&t.backend, &t.chunks[..4], false);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(t.store.requests(), 0, "guesses fetched while told not to");
    t.fetcher.speculate(&t.backend, &t.chunks[..4], true);
    wait_cached(&t.cache, &t.chunks[..4]);
    assert_eq!(t.fetcher.snapshot().chunks.speculative_fetches, 4);
}

#[test]
fn cached_guesses_are_decoded_ahead_and_readers_find_them_in_memory() {
    let t = cached(6, config());
    t.fetcher
        .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |_| {
            true
        })
        .unwrap();
    let requests = t.store.requests();
    t.fetcher.speculate(&t.backend, &t.chunks[..3], true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.fetcher.snapshot().chunks.decoded_ahead < 3 {
        assert!(Instant::now() < deadline, "not decoded ahead");
        std::thread::sleep(Duration::from_millis(5));
    }
    for c in &t.chunks[..3] {
        assert_eq!(
            *t.fetcher.read(&t.backend, c, Priority::Demand).unwrap(),
            expected(c)
        );
    }
    let m = t.fetcher.snapshot().chunks;
    assert_eq!((m.memory_hits, m.disk_hits), (3, 0));
    assert_eq!((m.decoded_ahead, m.decoded_ahead_used), (3, 3));
    assert_eq!(t.store.requests(), requests, "nothing fetched");
}

#[test]
fn concurrent_readers_of_a_cached_chunk_decode_it_once() {
    let t = cached(2, config());
    t.fetcher
        .warm(&t.backend, &t.chunks, &WarmOptions::default(), &mut |_| {
            true
        })
        .unwrap();
    let hits = t.cache.stats().hits;
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let got = t
                    .fetcher
                    .read(&t.backend, &t.chunks[1], Priority::Demand)
                    .unwrap();
                assert_eq!(*got, expected(&t.chunks[1]));
            });
        }
    });
    assert_eq!(
        t.cache.stats().hits - hits,
        1,
        "the chunk was read from disk more than once"
    );
}

#[test]
fn bulk_chunks_are_checked_by_crc_when_fetched_and_by_digest_when_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let cache = disk_cache(dir.path(), 64 << 20);
    let memory = MemoryBlobStore::new();
    let chunks = blob(&memory, 3, 64 << 10);
    let store = Arc::new(memory);
    // Chunk 1 as a forger would send it: other bytes whose crc32 matches what the index says
    // (the index names the crc of these bytes), but not the chunk's digest.
    let mut forged = chunks[1].clone();
    let other = fusefs::chunk::encode_chunk(&vec![9u8; 64 << 10], 3).unwrap();
    let forged_digest = store.insert(other.stored.clone());
    forged.blob_digest = forged_digest;
    forged.record.comp_off = 0;
    forged.record.comp_len = other.stored.len() as u32;
    forged.record.crc32 = other.crc32;
    forged.record.flags = other.flags;
    let fetcher = Fetcher::new(config(), Some(cache.clone()), runtime()).unwrap();
    let backend = fetcher.backend(store.clone());
    // The warm checks the crc and caches it, without decoding anything.
    let list = vec![chunks[0].clone(), forged.clone()];
    fetcher
        .warm(&backend, &list, &WarmOptions::default(), &mut |_| true)
        .unwrap();
    assert!(cache.contains(&forged.record.digest));
    // The first read decodes and checks the digest: the good chunk is served...
    assert_eq!(
        *fetcher
            .read(&backend, &chunks[0], Priority::Demand)
            .unwrap(),
        expected(&chunks[0])
    );
    // ...the forged one is not: dropped from the cache, fetched again, refused again.
    let err = fetcher
        .read(&backend, &forged, Priority::Demand)
        .unwrap_err();
    assert!(matches!(err, SourceError::Chunk(_)), "{err}");
    assert!(!cache.contains(&forged.record.digest));
    assert_eq!(fetcher.snapshot().chunks.digest_mismatches, 2);
}
