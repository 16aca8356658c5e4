//! Streams of model weights ahead of their readers: when a `*.safetensors` file of a remote
//! image is opened, its header is read; once the loader reads a tensor, the file's tensors are
//! fetched in the loader's order, at prefetch priority and with many range requests at once, so
//! a loader that reads every tensor (through `read` or mmap page faults) finds them fetched or
//! in flight instead of waiting a round trip per read.
//!
//! [`StreamSource`] wraps a mount's [`ChunkSource`] and is the mount's [`OpenObserver`]:
//! `ImageReader` tells it of each safetensors file's first open and last release, and of every
//! read of such a file (`OpenObserver::read`). The open goes to a thread of the mount, which
//! resolves the file's name and, for a safetensors file, starts a stream on a thread of its own:
//!
//! - **Header**: the 8-byte length and the JSON are read through the inner source (demand
//!   priority) and checked as untrusted input (`fusefs::safetensors`). A refused header is a
//!   warning naming the file and why; the file is then read as any other.
//! - **Start**: at the loader's first read of a tensor's bytes, from that tensor. A file opened
//!   and not read (or only its header) costs nothing, and the other shards of a loader that
//!   reads one shard at a time leave the link to the one it reads.
//! - **The reader's tensor first**: a read that jumps (does not continue the reads before it:
//!   the kernel's read-ahead past a tensor's end says nothing of where the reader goes next)
//!   into another tensor has that tensor's rest, up to `first_bytes`, fetched at once at demand
//!   priority, ahead of every stream's queued work (`Fetcher::fetch_now`; the fetcher's demand
//!   bound then gives it the link before the next reader's tensor).
//! - **Order**: offset order, or name order (`safe_open(...).keys()`, as vLLM and transformers
//!   read) when the reader's jumps step forward by name and not by offset (`Plan::learn`). When
//!   the stream was not ahead of the reader where it jumped, or the order changed, the stream's
//!   queued jobs are dropped and it goes on from the reader's tensor in the reader's order.
//! - **Bound ahead of the reader**: a stream's chunks that were queued or fetched but not yet
//!   read (reads pass through this wrapper, which credits each chunk to its stream) never
//!   exceed `max_ahead` bytes, nor an equal share of `ahead_budget` (a quarter of the disk
//!   cache) among the running streams; chunks already cached do not count. A reader that
//!   stops leaves at most that much fetched beyond what it read, and a cache smaller than the
//!   model evicts what was read, not what the streams fetched for the readers.
//! - **Bound in the fetcher, fairness**: all streams together keep at most `queue_budget`
//!   bytes queued or in flight, each an equal share of it (at least one chunk), topped up as
//!   the fetcher reports completions (`Fetcher::prefetch_watched`). The fetcher serves its
//!   prefetch queue in order, so equal shares interleave concurrent streams; demand reads are
//!   dispatched before any of them, and a queued chunk a reader waits for is promoted.
//! - **Bounded, whoever opens files**: anyone who can open files on a mount can open
//!   safetensors files, so what streams hold is bounded for the whole agent, not per file: at
//!   most [`MAX_STREAM_FILES`] files have a stream (a thread each) at once, at most
//!   [`MAX_HEADER_READS`] headers are read at once, a header over [`MAX_STREAMED_HEADER`] bytes
//!   is not streamed, and the plans of all streams hold at most [`MAX_PLANNED_TENSORS`]
//!   tensors. A file past a bound is read as any other file (a debug line and
//!   `lazy_streams_skipped_total`): headers in memory stay under 64 MiB and plans under about
//!   40 MB.
//! - **Stop**: at the end of the file, when the file's last handle is released, and when the
//!   filesystem goes away. A stopped stream's queued jobs are dropped at once (requests in
//!   flight finish), so nothing more is fetched for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use fusefs::safetensors::{header_len, parse_header, TensorRange, LEN_PREFIX};
use fusefs::{ChunkRef, ChunkSource, OpenFile, OpenObserver, SourceError};
use tracing::{debug, info, warn};

use crate::fetcher::{Backend, Done, Fetcher};
use crate::sync::lock;

/// Files that have a stream (and its thread) at once, in the whole agent.
pub const MAX_STREAM_FILES: usize = 64;
/// Headers read at once, in the whole agent.
pub const MAX_HEADER_READS: usize = 4;
/// The largest header streamed (safetensors allows 100 MB; real ones are well under 1 MB).
pub const MAX_STREAMED_HEADER: u64 = 16 << 20;
/// Tensors the plans of all running streams hold together (about 150 bytes each).
pub const MAX_PLANNED_TENSORS: usize = 256 << 10;

/// The suffix of the files streamed.
const SAFETENSORS_SUFFIX: &[u8] = b".safetensors";

/// Whether a file of this name is streamed when opened.
fn is_safetensors(name: &[u8]) -> bool {
    name.ends_with(SAFETENSORS_SUFFIX)
}

/// How streams run; see the module docs.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Stream `*.safetensors` files when they are opened.
    pub safetensors: bool,
    /// Most stored bytes one stream has fetched or queued that its reader has not read.
    pub max_ahead: u64,
    /// Most stored bytes all streams together have fetched or queued that their readers have
    /// not read: each running stream gets an equal share (and at most `max_ahead`), so the
    /// streams of several shards never hold more of the cache than this (a cache smaller than
    /// the model evicts what was read, not what is about to be).
    pub ahead_budget: u64,
    /// Most stored bytes all streams together keep queued or in flight in the fetcher.
    pub queue_budget: u64,
    /// Largest read-ahead window of a sequential reader of any file (`ImageReader`).
    pub read_ahead: u64,
    /// Most stored bytes of the tensor a reader starts reading that are fetched at once, at
    /// demand priority, ahead of the streams' queued work.
    pub first_bytes: u64,
}

impl StreamConfig {
    /// The defaults for a fetcher: 1 GiB ahead of each reader, but at most a quarter of the disk
    /// cache (or half the memory cache without one), so streamed chunks are not evicted before
    /// they are read; as many bytes in the fetcher as its prefetch requests carry at once.
    pub fn for_fetcher(fetcher: &Fetcher) -> StreamConfig {
        let f = fetcher.config();
        StreamConfig {
            safetensors: true,
            max_ahead: DEFAULT_MAX_AHEAD,
            ahead_budget: u64::MAX,
            queue_budget: f.prefetch_requests.max(1) as u64 * f.max_request_bytes,
            read_ahead: DEFAULT_READ_AHEAD,
            first_bytes: DEFAULT_TENSOR_FIRST,
        }
        .bounded_by(fetcher)
    }

    /// Caps `max_ahead`, `ahead_budget` and `read_ahead` by what the fetcher's caches can hold.
    pub fn bounded_by(mut self, fetcher: &Fetcher) -> StreamConfig {
        let room = match fetcher.cache() {
            Some(cache) => cache.budget_bytes() / 4,
            None => fetcher.config().memory_budget as u64 / 2,
        };
        self.max_ahead = self.max_ahead.min(room);
        self.ahead_budget = self.ahead_budget.min(room);
        self.read_ahead = self.read_ahead.min(self.max_ahead);
        self
    }
}

/// Default `max_ahead`: several shards' worth of tensors in flight at 10 Gbit/s for ~1 s.
pub const DEFAULT_MAX_AHEAD: u64 = 1 << 30;

/// Default `first_bytes`: a large tensor's first 64 MiB (half a second at 1 Gbit/s) go first;
/// the stream brings the rest, in the reader's order, right behind them.
pub const DEFAULT_TENSOR_FIRST: u64 = 64 << 20;

/// Default largest read-ahead of sequential readers: 128 MiB in flight fills a 10 Gbit/s link at
/// 100 ms per request (the bandwidth-delay product is 125 MB).
pub const DEFAULT_READ_AHEAD: u64 = 128 << 20;

/// What the streams of every mount of a fetcher share: the configuration, the fetcher and the
/// count of running streams that sets each one's share of the queue budget.
pub struct Streams {
    config: StreamConfig,
    fetcher: Arc<Fetcher>,
    running: AtomicUsize,
    /// Files with a stream thread (reading the header or streaming).
    files: AtomicUsize,
    /// Tensors in the plans of running streams.
    planned: AtomicUsize,
    /// Header reads that may start.
    header_reads: Mutex<usize>,
    header_read_done: Condvar,
}

impl Streams {
    pub fn new(fetcher: Arc<Fetcher>, config: StreamConfig) -> Arc<Streams> {
        Arc::new(Streams {
            config,
            fetcher,
            running: AtomicUsize::new(0),
            files: AtomicUsize::new(0),
            planned: AtomicUsize::new(0),
            header_reads: Mutex::new(MAX_HEADER_READS),
            header_read_done: Condvar::new(),
        })
    }

    /// Takes `n` of the `limit` units `counter` counts, if that many are left.
    fn take(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= limit).then_some(used + n)
            })
            .is_ok()
    }

    /// Runs `read` once fewer than [`MAX_HEADER_READS`] headers are being read.
    fn read_header<T>(&self, read: impl FnOnce() -> T) -> T {
        {
            let mut free = lock(&self.header_reads);
            while *free == 0 {
                free = self
                    .header_read_done
                    .wait(free)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            *free -= 1;
        }
        let out = read();
        *lock(&self.header_reads) += 1;
        self.header_read_done.notify_one();
        out
    }

    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// Streams running now (header read, chunks being fetched).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Bytes one stream may keep queued or in flight: an equal share of the budget.
    fn share(&self) -> u64 {
        self.config.queue_budget / self.running().max(1) as u64
    }

    /// Bytes one stream may have ahead of its reader: an equal share of `ahead_budget`, at most
    /// `max_ahead`.
    fn ahead_share(&self) -> u64 {
        let share = self.config.ahead_budget / self.running().max(1) as u64;
        share.min(self.config.max_ahead)
    }

    /// The wrapper of one mount's source, whose chunks live in `backend`.
    pub fn source(
        self: &Arc<Self>,
        inner: Arc<dyn ChunkSource>,
        backend: Arc<Backend>,
    ) -> StreamSource {
        let mount = Arc::new(MountStreams {
            inner,
            hub: self.clone(),
            backend,
            files: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            owned: AtomicUsize::new(0),
        });
        let (opens, rx) = mpsc::channel::<Opened>();
        let for_thread = mount.clone();
        let started = std::thread::Builder::new()
            .name("lazy-stream-open".into())
            .spawn(move || {
                for (file, stream) in rx {
                    for_thread.clone().consider(file, stream);
                }
            });
        if let Err(e) = &started {
            warn!("cannot start the stream thread, files will not be streamed: {e}");
        }
        StreamSource {
            mount,
            opens: started.ok().map(|_| opens),
        }
    }
}

/// A mount's [`ChunkSource`] with streams of its safetensors files, and the observer of their
/// opens ([`StreamSource::observer`]); see the module docs.
pub struct StreamSource {
    mount: Arc<MountStreams>,
    /// Opens for the mount's stream thread; `None` when it could not be started.
    opens: Option<mpsc::Sender<Opened>>,
}

/// An opened file and the stream it may get, as the mount's stream thread receives them.
type Opened = (OpenFile, Arc<FileStream>);

/// The state of one mount's streams, shared with their threads.
struct MountStreams {
    inner: Arc<dyn ChunkSource>,
    hub: Arc<Streams>,
    backend: Arc<Backend>,
    /// Open files that may have a stream, by inode.
    files: Mutex<HashMap<u64, Arc<FileStream>>>,
    /// The stream each chunk of a streamed file belongs to, by chunk index.
    owners: Mutex<HashMap<u32, Arc<FileStream>>>,
    /// `owners.len()`, read without the lock on every chunk read.
    owned: AtomicUsize,
}

/// One file's stream.
struct FileStream {
    ino: u64,
    state: Mutex<StreamState>,
}

/// The order a loader takes a file's tensors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// The order of their bytes (`load_file`, a copy of the file).
    Offset,
    /// The order of their names (`safe_open(...).keys()`, as vLLM and transformers read).
    Name,
}

/// A streamed file's tensors, the chunks of each, and their name order.
struct Plan {
    /// Tensors in offset order.
    tensors: Vec<Tensor>,
    /// Each tensor's place in name order.
    name_rank: Vec<usize>,
    /// The tensors (offset-order indices) in name order.
    by_name: Vec<usize>,
}

struct Tensor {
    /// The tensor's bytes in the file.
    range: std::ops::Range<u64>,
    /// The chunks holding them, in file order, each with the file bytes it holds.
    chunks: Vec<(std::ops::Range<u64>, ChunkRef)>,
}

/// How far ahead in its order a loader's next tensor may be and still count as the next one:
/// small tensors read whole by the kernel's read-ahead of the one before are never seen.
const NEXT_SLACK: usize = 4;

impl Plan {
    /// The tensor whose bytes hold file offset `at`.
    fn find(&self, at: u64) -> Option<usize> {
        let i = self.tensors.partition_point(|t| t.range.end <= at);
        self.tensors
            .get(i)
            .filter(|t| t.range.start <= at)
            .map(|_| i)
    }

    /// The order the reader reads in, learned from its last tensor and the one it reads now:
    /// a step forward in one order but not in the other decides; anything else keeps `order`.
    /// A first read at the first tensor of one order (and not of the other) decides too.
    fn learn(&self, order: Order, last: Option<usize>, now: usize) -> Order {
        let step = |from: usize, to: usize| to > from && to - from <= NEXT_SLACK;
        let (by_offset, by_name) = match last {
            None => (now == 0, self.name_rank[now] == 0),
            Some(last) => (
                step(last, now),
                step(self.name_rank[last], self.name_rank[now]),
            ),
        };
        match (by_offset, by_name) {
            (true, false) => Order::Offset,
            (false, true) => Order::Name,
            _ => order,
        }
    }

    /// Every tensor in `order` starting at `from`, then those before it.
    fn from(&self, order: Order, from: usize) -> VecDeque<usize> {
        let n = self.tensors.len();
        match order {
            Order::Offset => (from..n).chain(0..from).collect(),
            Order::Name => {
                let rank = self.name_rank[from];
                self.by_name[rank..]
                    .iter()
                    .chain(&self.by_name[..rank])
                    .copied()
                    .collect()
            }
        }
    }
}

#[derive(Default)]
struct StreamState {
    stopped: bool,
    /// Wakes the stream's thread (it also hears the fetcher's completions on this channel).
    wake: Option<mpsc::Sender<Done>>,
    /// The file's tensors, once the header is read.
    plan: Option<Arc<Plan>>,
    /// The reader's order as learned so far (offset order until a read says otherwise).
    order: Option<Order>,
    /// The tensor the reader read last.
    last: Option<usize>,
    /// Whether the reader has read a tensor's bytes yet: the stream starts then, from there, so
    /// a file opened and not read (or only its header) costs nothing, and the streams of files
    /// that wait for their turn (a loader's other shards) leave the link to those being read.
    reading: bool,
    /// Where the reader read before the header was read: taken up once it is.
    early: Option<u64>,
    /// The reader's current run of sequential reads: from the read that jumped here to the end
    /// of the furthest read since.
    run: std::ops::Range<u64>,
    /// Tensors still to stream, in the order they go; `at` chunks of the first are done.
    todo: VecDeque<usize>,
    at: usize,
    /// Chunks queued by the stream or fetched first for the reader: never asked for again.
    issued: HashSet<u32>,
    /// Chunks queued or fetched by the stream and not read since, by index: stored bytes.
    ahead: HashMap<u32, u64>,
    ahead_bytes: u64,
    /// Chunks queued or in flight in the fetcher, by digest: stored bytes.
    queued: HashMap<[u8; 32], u64>,
    queued_bytes: u64,
    /// Chunks the reader read before the stream reached them: not fetched again.
    read: HashSet<u32>,
}

impl StreamState {
    /// The next chunk to stream: the first of the first tensor to go that is neither issued
    /// nor read. Does not take it.
    fn peek(&mut self, plan: &Plan) -> Option<ChunkRef> {
        loop {
            let &t = self.todo.front()?;
            let chunks = &plan.tensors[t].chunks;
            while let Some((_, c)) = chunks.get(self.at) {
                if !self.issued.contains(&c.index) && !self.read.contains(&c.index) {
                    return Some(c.clone());
                }
                self.at += 1;
            }
            self.todo.pop_front();
            self.at = 0;
        }
    }
}

impl FileStream {
    fn nudge(state: &StreamState) {
        if let Some(wake) = &state.wake {
            let _ = wake.send(Done::nudge());
        }
    }

    /// Stops the stream and drops its jobs still queued in the fetcher.
    fn stop(&self, fetcher: &Fetcher, backend: &Backend) {
        let queued: HashSet<[u8; 32]> = {
            let mut state = lock(&self.state);
            state.stopped = true;
            FileStream::nudge(&state);
            state.queued.keys().copied().collect()
        };
        if !queued.is_empty() {
            let dropped = fetcher.cancel_prefetch(backend, &queued);
            debug!(ino = self.ino, dropped, "stream stopped");
        }
    }

    /// A reader reads `read` of the file; see [`Touch`]. `None` when the stream has stopped.
    ///
    /// Only the first read of a tensor's bytes and a read that jumps (does not continue the
    /// reads before it) say where the reader is: the kernel reads ahead of a sequential reader,
    /// past the end of the tensor it reads, and that says nothing of which tensor the reader
    /// takes next. A read's middle is where the reader is: the kernel reads a mapped file
    /// around the faulting page.
    fn reader_at(&self, read: std::ops::Range<u64>, first_bytes: u64) -> Option<Touch> {
        let mut touch = Touch::default();
        let mut state = lock(&self.state);
        if state.stopped {
            return None;
        }
        // The pieces of one read-ahead window are read by several threads at once and may
        // arrive in any order: a read within twice its length of the run, on either side,
        // still continues it.
        let slack = 2 * (read.end - read.start);
        let run = &mut state.run;
        let continues =
            !run.is_empty() && read.start <= run.end + slack && read.end + slack >= run.start;
        if continues {
            *run = run.start.min(read.start)..run.end.max(read.end);
        } else {
            *run = read.clone();
        }
        // The reader's first read of a tensor always counts: it starts the stream (a loader
        // that reads the header and then the tensors in offset order never jumps).
        if continues && state.last.is_some() {
            return Some(touch);
        }
        let at = read.start + (read.end - read.start) / 2;
        let Some(plan) = state.plan.clone() else {
            state.early.get_or_insert(at);
            return Some(touch);
        };
        let Some(now) = plan.find(at) else {
            return Some(touch);
        };
        if state.last == Some(now) {
            return Some(touch);
        }
        let was = state.order.unwrap_or(Order::Offset);
        let order = plan.learn(was, state.last, now);
        state.order = Some(order);
        state.last = Some(now);
        state.reading = true;
        let chunks = &plan.tensors[now].chunks;
        let ahead_here = chunks.iter().all(|(_, c)| state.issued.contains(&c.index));
        if order != was || !ahead_here {
            // The stream is not where the reader is: what it queued goes back, and it goes on
            // from this tensor in the reader's order.
            touch.cancel = state.queued.keys().copied().collect();
            state.todo = plan.from(order, now);
            state.at = 0;
        }
        let mut bytes = 0;
        for (range, c) in chunks {
            if bytes >= first_bytes {
                break;
            }
            if range.end <= at || state.read.contains(&c.index) {
                continue;
            }
            touch.first.push(c.clone());
            state.issued.insert(c.index);
            bytes += stored_len(c);
        }
        FileStream::nudge(&state);
        Some(touch)
    }
}

/// What a reader's read of a streamed file asks of the fetcher. When it lands in a tensor other
/// than the one the reader read last, the reader's order is learned again (offset or name
/// order), and:
#[derive(Default)]
struct Touch {
    /// The tensor's chunks from the read on (up to `first_bytes`), not yet read: fetched at
    /// once, at demand priority, ahead of the streams' queued work.
    first: Vec<ChunkRef>,
    /// When the stream was not ahead of the reader there (or the order changed): its queued
    /// jobs, dropped from the fetcher's queue; the stream queues them again in its new order.
    cancel: HashSet<[u8; 32]>,
}

impl ChunkSource for StreamSource {
    fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        if self.mount.owned.load(Ordering::Relaxed) > 0 {
            self.mount.consumed(chunk.index);
        }
        self.mount.inner.chunk(chunk)
    }

    fn chunk_in_memory(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let hit = self.mount.inner.chunk_in_memory(chunk)?;
        if self.mount.owned.load(Ordering::Relaxed) > 0 {
            self.mount.consumed(chunk.index);
        }
        Some(hit)
    }

    fn read_ahead(&self, chunks: &[ChunkRef]) {
        self.mount.inner.read_ahead(chunks)
    }

    fn speculate(&self, chunks: &[ChunkRef]) {
        self.mount.inner.speculate(chunks)
    }
}

impl StreamSource {
    /// The observer of the mount's opens (itself), for `ImageReader::with_observer`; `None`
    /// when no file is streamed (`stream.safetensors` off, or the mount's stream thread could
    /// not be started).
    pub fn observer(self: &Arc<Self>) -> Option<Arc<dyn OpenObserver>> {
        let streams = self.opens.is_some() && self.mount.hub.config.safetensors;
        streams.then(|| self.clone() as Arc<dyn OpenObserver>)
    }
}

impl OpenObserver for StreamSource {
    fn watches(&self, name: &[u8]) -> bool {
        is_safetensors(name)
    }

    fn opened(&self, file: OpenFile) {
        let Some(opens) = &self.opens else { return };
        let stream = Arc::new(FileStream {
            ino: file.ino,
            state: Mutex::new(StreamState::default()),
        });
        if let Some(old) = lock(&self.mount.files).insert(file.ino, stream.clone()) {
            old.stop(&self.mount.hub.fetcher, &self.mount.backend);
        }
        let _ = opens.send((file, stream));
    }

    fn released(&self, ino: u64) {
        let stream = lock(&self.mount.files).remove(&ino);
        if let Some(stream) = stream {
            stream.stop(&self.mount.hub.fetcher, &self.mount.backend);
        }
    }

    /// A read of a streamed file: the rest of the tensor it lands in is fetched at once, at
    /// demand priority, and the stream goes on from there in the reader's order.
    fn read(&self, ino: u64, range: std::ops::Range<u64>) -> bool {
        let stream = lock(&self.mount.files).get(&ino).cloned();
        let Some(stream) = stream else {
            return false;
        };
        let Some(touch) = stream.reader_at(range, self.mount.hub.config.first_bytes) else {
            return false;
        };
        let (fetcher, backend) = (&self.mount.hub.fetcher, &self.mount.backend);
        if !touch.first.is_empty() {
            fetcher.fetch_now(backend, &touch.first);
        }
        if !touch.cancel.is_empty() {
            fetcher.cancel_prefetch(backend, &touch.cancel);
        }
        true
    }
}

impl Drop for StreamSource {
    /// The filesystem is gone: every stream stops.
    fn drop(&mut self) {
        let files: Vec<Arc<FileStream>> = lock(&self.mount.files).drain().map(|(_, s)| s).collect();
        for stream in files {
            stream.stop(&self.mount.hub.fetcher, &self.mount.backend);
        }
    }
}

impl MountStreams {
    /// A reader reads chunk `index`: credit it to its stream.
    fn consumed(&self, index: u32) {
        let Some(stream) = lock(&self.owners).get(&index).cloned() else {
            return;
        };
        let mut state = lock(&stream.state);
        match state.ahead.remove(&index) {
            Some(len) => {
                state.ahead_bytes -= len;
                FileStream::nudge(&state);
            }
            None => {
                state.read.insert(index);
            }
        }
    }

    /// Whether `stream` is still the open file's (not released, not replaced by a new open).
    fn is_current(&self, stream: &Arc<FileStream>) -> bool {
        lock(&self.files)
            .get(&stream.ino)
            .is_some_and(|s| Arc::ptr_eq(s, stream))
    }

    /// Runs on the mount's stream thread: starts a stream of `file` if it is a safetensors file.
    fn consider(self: Arc<Self>, file: OpenFile, stream: Arc<FileStream>) {
        let name = file.name().filter(|n| is_safetensors(n));
        let (Some(name), true) = (name, self.is_current(&stream)) else {
            let mut files = lock(&self.files);
            if files
                .get(&file.ino)
                .is_some_and(|s| Arc::ptr_eq(s, &stream))
            {
                files.remove(&file.ino);
            }
            return;
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        let hub = self.hub.clone();
        if !Streams::take(&hub.files, 1, MAX_STREAM_FILES) {
            hub.fetcher.stream_metrics().skipped.inc();
            debug!(
                file = name,
                "not streaming: {MAX_STREAM_FILES} files are streamed already"
            );
            return self.forget(&stream);
        }
        let spawned = std::thread::Builder::new()
            .name("lazy-stream".into())
            .spawn(move || {
                self.run(&file, &name, &stream);
                self.hub.files.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            hub.files.fetch_sub(1, Ordering::AcqRel);
            warn!("cannot start a stream thread: {e}");
        }
    }

    /// Reads and checks the header, then streams the tensors; see the module docs.
    fn run(&self, file: &OpenFile, name: &str, stream: &Arc<FileStream>) {
        let metrics = self.hub.fetcher.stream_metrics();
        let plan = match self.plan(file) {
            Ok(plan) => Arc::new(plan),
            Err(Refusal::Header(reason)) => {
                metrics.headers_refused.inc();
                warn!(
                    file = name,
                    ino = file.ino,
                    "not streaming: invalid safetensors header: {reason}"
                );
                return self.forget(stream);
            }
            Err(Refusal::Read(reason)) => {
                debug!(file = name, ino = file.ino, "not streaming: {reason}");
                return self.forget(stream);
            }
            Err(Refusal::Bound(reason)) => {
                metrics.skipped.inc();
                debug!(file = name, ino = file.ino, "not streaming: {reason}");
                return self.forget(stream);
            }
        };
        let planned = plan.tensors.len();
        metrics.started.inc();
        let chunks: HashSet<u32> = plan
            .tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|(_, c)| c.index))
            .collect();
        let started = Instant::now();
        {
            let mut owners = lock(&self.owners);
            for t in &plan.tensors {
                for (_, c) in &t.chunks {
                    owners.entry(c.index).or_insert_with(|| stream.clone());
                }
            }
            self.owned.store(owners.len(), Ordering::Relaxed);
        }
        self.hub.running.fetch_add(1, Ordering::Relaxed);
        let fetched = self.stream(&plan, stream);
        self.hub.running.fetch_sub(1, Ordering::Relaxed);
        self.hub.planned.fetch_sub(planned, Ordering::AcqRel);
        {
            let mut owners = lock(&self.owners);
            owners.retain(|_, s| !Arc::ptr_eq(s, stream));
            self.owned.store(owners.len(), Ordering::Relaxed);
        }
        let (stopped, order) = {
            let state = lock(&stream.state);
            (state.stopped, state.order)
        };
        info!(
            file = name,
            ino = file.ino,
            tensors = plan.tensors.len(),
            chunks = chunks.len(),
            fetched,
            order = ?order.unwrap_or(Order::Offset),
            "stream {} after {:.1} s",
            if stopped { "stopped" } else { "done" },
            started.elapsed().as_secs_f64()
        );
        self.forget(stream);
    }

    /// Forgets a stream that ended, unless its file was opened again since.
    fn forget(&self, stream: &Arc<FileStream>) {
        lock(&stream.state).wake = None;
        let mut files = lock(&self.files);
        if files
            .get(&stream.ino)
            .is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            files.remove(&stream.ino);
        }
    }

    /// The file's tensors from its header, each with its chunks.
    fn plan(&self, file: &OpenFile) -> Result<Plan, Refusal> {
        let read_err = |e: fusefs::FsError| Refusal::Read(format!("reading the header: {e}"));
        let ranges = self.hub.read_header(|| {
            let prefix = file
                .read(self.inner.as_ref(), 0, LEN_PREFIX as u32)
                .map_err(read_err)?;
            let len = header_len(&prefix, file.size).map_err(|e| Refusal::Header(e.to_string()))?;
            if len > MAX_STREAMED_HEADER {
                return Err(Refusal::Bound(format!(
                    "its header ({len} bytes) is over {MAX_STREAMED_HEADER}"
                )));
            }
            let json = file
                .read(self.inner.as_ref(), LEN_PREFIX, len as u32)
                .map_err(read_err)?;
            parse_header(&json, file.size).map_err(|e| Refusal::Header(e.to_string()))
        })?;
        if !Streams::take(&self.hub.planned, ranges.len(), MAX_PLANNED_TENSORS) {
            return Err(Refusal::Bound(format!(
                "its {} tensors and those of the running streams are over {MAX_PLANNED_TENSORS}",
                ranges.len()
            )));
        }
        let tensors = ranges.len();
        let plan = Self::plan_tensors(file, ranges);
        if plan.is_err() {
            self.hub.planned.fetch_sub(tensors, Ordering::AcqRel);
        }
        plan
    }

    /// The plan of `ranges`, the tensors of `file`'s header.
    fn plan_tensors(file: &OpenFile, ranges: Vec<TensorRange>) -> Result<Plan, Refusal> {
        let mut by_name: Vec<usize> = (0..ranges.len()).collect();
        by_name.sort_by(|&a, &b| ranges[a].name.cmp(&ranges[b].name));
        let mut name_rank = vec![0; ranges.len()];
        for (rank, &t) in by_name.iter().enumerate() {
            name_rank[t] = rank;
        }
        let mut tensors = Vec::with_capacity(ranges.len());
        for t in ranges {
            let chunks = file
                .chunks(t.begin..t.end)
                .map_err(|e| Refusal::Read(format!("mapping tensor {:?}: {e}", t.name)))?;
            tensors.push(Tensor {
                range: t.begin..t.end,
                chunks,
            });
        }
        Ok(Plan {
            tensors,
            name_rank,
            by_name,
        })
    }

    /// Queues the plan's chunks, in the reader's order as it is learned, within the stream's
    /// bounds until every one is done or the stream stops; returns the stored bytes it fetched.
    fn stream(&self, plan: &Arc<Plan>, stream: &FileStream) -> u64 {
        let fetcher = &self.hub.fetcher;
        let metrics = fetcher.stream_metrics();
        let (tx, rx) = mpsc::channel();
        let early = {
            let mut state = lock(&stream.state);
            state.wake = Some(tx.clone());
            state.plan = Some(plan.clone());
            state.early.take()
        };
        if let Some(at) = early {
            // Taken up as a jump to that place (the run it started is already recorded).
            lock(&stream.state).run = 0..0;
            if let Some(touch) = stream.reader_at(at..at + 1, self.hub.config.first_bytes) {
                fetcher.fetch_now(&self.backend, &touch.first);
            }
        }
        // Nothing to stream until the reader reads a tensor.
        loop {
            let state = lock(&stream.state);
            if state.reading || state.stopped {
                break;
            }
            drop(state);
            if rx.recv().is_err() {
                break;
            }
        }
        let mut fetched = 0;
        loop {
            {
                let mut state = lock(&stream.state);
                if state.stopped {
                    break;
                }
                let (share, max_ahead) = (self.hub.share(), self.hub.ahead_share());
                while let Some(chunk) = state.peek(plan) {
                    let len = stored_len(&chunk);
                    if (!state.queued.is_empty() && state.queued_bytes + len > share)
                        || (!state.ahead.is_empty() && state.ahead_bytes + len > max_ahead)
                    {
                        break;
                    }
                    state.issued.insert(chunk.index);
                    // Under the state lock, so a stop cannot miss a job queued now.
                    if fetcher.prefetch_watched(&self.backend, &chunk, &tx)
                        && state.queued.insert(chunk.record.digest, len).is_none()
                    {
                        state.queued_bytes += len;
                        state.ahead.insert(chunk.index, len);
                        state.ahead_bytes += len;
                    }
                }
                if state.todo.is_empty() && state.queued.is_empty() {
                    break;
                }
            }
            // The stream holds a sender, so the channel stays open.
            let Ok(done) = rx.recv() else { break };
            let mut state = lock(&stream.state);
            if let Some(len) = state.queued.remove(&done.digest) {
                state.queued_bytes -= len;
                if done.is_ok() {
                    fetched += len;
                    metrics.bytes.add(len);
                } else {
                    // Not fetched (dropped when the stream turned, or failed): not ahead, and
                    // streamed again when its tensor's turn comes (the reader may come first).
                    let chunks = plan.tensors.iter().flat_map(|t| &t.chunks);
                    for (_, c) in chunks.filter(|(_, c)| c.record.digest == done.digest) {
                        state.issued.remove(&c.index);
                        if let Some(len) = state.ahead.remove(&c.index) {
                            state.ahead_bytes -= len;
                        }
                    }
                }
            }
        }
        fetched
    }
}

enum Refusal {
    /// The header is invalid: a warning and a metric.
    Header(String),
    /// The file could not be read (backend down): the reader will see that itself.
    Read(String),
    /// Streaming it would pass one of the streams' bounds: a debug line and a metric.
    Bound(String),
}

fn stored_len(chunk: &ChunkRef) -> u64 {
    u64::from(chunk.record.comp_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;
    use std::time::Duration;

    use async_trait::async_trait;
    use fusefs::chunk::encode_chunk;
    use fusefs::format::{BlobRecord, ChunkRecord, ExtentRecord};
    use fusefs::writer::{IndexWriter, NodeSpec};
    use fusefs::{ImageReader, Index};

    use crate::blobstore::{
        BackendId, BlobError, BlobStore, Faults, FaultyBlobStore, MemoryBlobStore,
    };
    use crate::fetcher::FetcherConfig;

    /// Chunk size of the test images: small, so a file has many chunks.
    const CS: usize = 16 << 10;

    /// Records every range request (and when it came) before passing it on.
    struct Log {
        inner: Arc<FaultyBlobStore>,
        ranges: Mutex<Vec<Range<u64>>>,
    }

    #[async_trait]
    impl BlobStore for Log {
        fn id(&self) -> BackendId {
            BackendId::memory("log")
        }
        async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
            lock(&self.ranges).push(range.clone());
            self.inner.read_range(digest, range).await
        }
        async fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, BlobError> {
            self.inner.read_blob(digest, max).await
        }
    }

    /// A safetensors file: header naming `tensors` (name, length) laid out in the given order
    /// with `gap` unreferenced bytes after the first one, then the data.
    fn safetensors(tensors: &[(&str, usize)], gap: usize, seed: u64) -> Vec<u8> {
        let mut entries = Vec::new();
        let mut at = 0;
        for (i, (name, len)) in tensors.iter().enumerate() {
            entries.push(format!(
                r#""{name}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{at},{}]}}"#,
                at + len
            ));
            at += len;
            if i == 0 {
                at += gap;
            }
        }
        let json = format!(
            r#"{{"__metadata__":{{"format":"pt"}},{}}}"#,
            entries.join(",")
        );
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        file.extend_from_slice(&lazy_tests::pseudo_random_bytes(seed, at));
        file
    }

    struct Image {
        reader: Arc<ImageReader>,
        source: Arc<StreamSource>,
        streams: Arc<Streams>,
        store: Arc<FaultyBlobStore>,
        log: Arc<Log>,
        /// Per file name: inode, bytes, and its chunks' stored ranges in the blob.
        files: HashMap<String, (u64, Vec<u8>, Range<u64>)>,
    }

    impl Image {
        fn requests(&self) -> Vec<Range<u64>> {
            lock(&self.log.ranges).clone()
        }

        fn fetched(&self) -> u64 {
            self.requests().iter().map(|r| r.end - r.start).sum()
        }

        /// Requests that fell in file `name`'s part of the blob.
        fn requests_of(&self, name: &str) -> Vec<Range<u64>> {
            let part = &self.files[name].2;
            self.requests()
                .into_iter()
                .filter(|r| r.start >= part.start && r.end <= part.end)
                .collect()
        }

        fn ino(&self, name: &str) -> u64 {
            self.files[name].0
        }

        /// The reader reads the first byte of file `name`'s first tensor: its stream starts.
        fn begin(&self, name: &str) {
            let file = &self.files[name].1;
            let header_end = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
            let got = self.reader.read(self.ino(name), header_end, 1).unwrap();
            assert_eq!(got, &file[header_end as usize..header_end as usize + 1]);
        }

        /// The chunk refs of file `name`, in file order.
        fn chunks(&self, name: &str) -> Vec<ChunkRef> {
            let f = &self.files[name];
            OpenFile::new(&self.reader, f.0, f.1.len() as u64)
                .chunks(0..u64::MAX)
                .unwrap()
                .into_iter()
                .map(|(_, c)| c)
                .collect()
        }
    }

    /// An image of `files` (name, bytes), each cut into chunks of `CS` stored one after the
    /// other in one blob, mounted (without FUSE) over a fetcher and a stream source.
    fn image(files: Vec<(&str, Vec<u8>)>, fetch: FetcherConfig, streams: StreamConfig) -> Image {
        let mut blob = Vec::new();
        let mut w = IndexWriter::new(CS as u32);
        let mut records = Vec::new();
        let mut layout = Vec::new();
        for (name, bytes) in &files {
            let start = blob.len() as u64;
            let mut extents = Vec::new();
            for (i, raw) in bytes.chunks(CS).enumerate() {
                let e = encode_chunk(raw, 1).unwrap();
                extents.push(ExtentRecord {
                    file_off: (i * CS) as u64,
                    chunk: records.len() as u32,
                    chunk_off: 0,
                    len: raw.len() as u32,
                });
                records.push(ChunkRecord {
                    blob: 0,
                    flags: e.flags,
                    comp_off: blob.len() as u64,
                    comp_len: e.stored.len() as u32,
                    raw_len: e.raw_len,
                    crc32: e.crc32,
                    digest: e.digest,
                });
                blob.extend_from_slice(&e.stored);
            }
            layout.push((
                name.to_string(),
                extents,
                bytes.clone(),
                start..blob.len() as u64,
            ));
        }
        let memory = MemoryBlobStore::new();
        let digest = memory.insert(blob.clone());
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&digest[7..], &mut sha).unwrap();
        w.add_blob(BlobRecord {
            sha256: sha,
            size: blob.len() as u64,
        });
        for r in records {
            w.add_chunk(r);
        }
        let mut inos = Vec::new();
        for (name, extents, bytes, _) in &layout {
            let spec = NodeSpec::file(0o644, bytes.len() as u64, extents.clone());
            inos.push(w.add_child(w.root(), name.as_bytes(), spec).unwrap());
        }
        let index = Index::from_bytes(w.finish().unwrap()).unwrap();
        let store = Arc::new(FaultyBlobStore::new(Arc::new(memory)));
        let log = Arc::new(Log {
            inner: store.clone(),
            ranges: Mutex::new(Vec::new()),
        });
        let fetcher = Fetcher::new(fetch, None, crate::fetcher::test_runtime()).unwrap();
        let backend = fetcher.backend(log.clone());
        let streams = Streams::new(fetcher.clone(), streams);
        let source = Arc::new(streams.source(Arc::new(fetcher.source(backend.clone())), backend));
        let observer = source.observer().expect("streams of safetensors files");
        let reader = ImageReader::new(index, source.clone())
            .and_then(|reader| reader.with_observer(observer))
            .unwrap();
        let reader = Arc::new(reader);
        let files = layout
            .into_iter()
            .zip(inos)
            .map(|((name, _, bytes, part), ino)| (name, (ino as u64, bytes, part)))
            .collect();
        Image {
            reader,
            source,
            streams,
            store,
            log,
            files,
        }
    }

    fn fetch_config(requests: usize) -> FetcherConfig {
        FetcherConfig {
            request_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            prefetch_requests: requests,
            memory_budget: 256 << 20,
            ..FetcherConfig::default()
        }
    }

    fn stream_config(max_ahead: u64, queue_budget: u64) -> StreamConfig {
        StreamConfig {
            safetensors: true,
            max_ahead,
            ahead_budget: u64::MAX,
            queue_budget,
            read_ahead: 4 << 20,
            first_bytes: 0,
        }
    }

    /// Waits until `done` holds, for at most 10 s.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the image's store has seen no new request for `quiet`.
    fn settle(img: &Image, quiet: Duration) {
        let mut last = (img.requests().len(), Instant::now());
        wait_for("the fetcher to settle", || {
            let n = img.requests().len();
            if n != last.0 {
                last = (n, Instant::now());
            }
            last.1.elapsed() >= quiet
        });
    }

    /// Names in name order that are laid out in reverse: a loader's name order is not the
    /// order of the bytes.
    fn reversed_tensors() -> Vec<(&'static str, usize)> {
        vec![
            ("z.0", 3 * CS + 100),
            ("y.1", CS / 2),
            ("x.2", 5 * CS),
            ("w.3", 7),
            ("v.4", 2 * CS),
            ("a.5", 4 * CS + 1),
        ]
    }

    #[test]
    fn a_stream_fetches_every_tensor_chunk_once_in_offset_order_and_nothing_else() {
        // One chunk per request, one request at a time: requests in the order they were queued.
        let fetch = FetcherConfig {
            max_request_bytes: 1,
            ..fetch_config(1)
        };
        let file = safetensors(&reversed_tensors(), 3 * CS, 1);
        let img = image(
            vec![("m.safetensors", file.clone())],
            fetch,
            stream_config(1 << 30, 1 << 20),
        );
        let ino = img.ino("m.safetensors");
        img.reader.opened(ino);
        img.begin("m.safetensors");
        let metrics = img.streams.fetcher().stream_metrics();
        wait_for("the stream to end", || {
            metrics.started.get() == 1 && img.streams.running() == 0
        });
        let chunks = img.chunks("m.safetensors");
        let header_end = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
        let first_tensor_end = header_end + reversed_tensors()[0].1 as u64;
        // The chunks holding tensor bytes: all but the gap's whole chunks.
        let want: Vec<Range<u64>> = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let (start, end) = ((i * CS) as u64, ((i + 1) * CS) as u64);
                !(start >= first_tensor_end && end <= first_tensor_end + 3 * CS as u64)
            })
            .map(|(_, c)| c.record.comp_off..c.record.comp_off + u64::from(c.record.comp_len))
            .collect();
        assert!(want.len() < chunks.len(), "the gap holds whole chunks");
        assert_eq!(
            img.requests(),
            want,
            "header chunk, then tensors in offset order"
        );
        assert_eq!(
            metrics.bytes.get(),
            want[1..].iter().map(|r| r.end - r.start).sum::<u64>(),
            "streamed bytes are those after the header's chunk"
        );
        // The reader then finds every byte without a request.
        let before = img.requests().len();
        let data = img
            .reader
            .read(ino, header_end, (file.len() as u64 - header_end) as u32);
        assert_eq!(data.unwrap(), &file[header_end as usize..]);
        assert_eq!(
            img.requests().len() - before,
            chunks.len() - want.len(),
            "only the gap's chunks were fetched"
        );
        img.reader.released(ino);
    }

    #[test]
    fn a_reader_that_stops_leaves_at_most_max_ahead_fetched_and_nothing_after_release() {
        let tensors: Vec<(String, usize)> = (0..40).map(|i| (format!("t{i:02}"), CS)).collect();
        let refs: Vec<(&str, usize)> = tensors.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let file = safetensors(&refs, 0, 2);
        let max_ahead = 8 * CS as u64;
        let img = image(
            vec![("m.safetensors", file)],
            FetcherConfig {
                max_request_bytes: 1,
                ..fetch_config(1)
            },
            stream_config(max_ahead, 2 * CS as u64),
        );
        img.store.set(Faults {
            delay: Duration::from_millis(10),
            ..Faults::default()
        });
        let ino = img.ino("m.safetensors");
        let chunks = img.chunks("m.safetensors");
        img.reader.opened(ino);
        // The reader reads the first ten chunks and stops.
        for i in 0..10 {
            img.reader.read(ino, (i * CS) as u64, CS as u32).unwrap();
        }
        settle(&img, Duration::from_millis(300));
        let read: u64 = chunks[..10].iter().map(stored_len).sum();
        let fetched = img.fetched();
        assert!(
            fetched <= read + max_ahead,
            "fetched {fetched} bytes for a reader of {read} with {max_ahead} ahead"
        );
        assert!(
            fetched + 2 * CS as u64 >= read + max_ahead,
            "the stream went ahead: fetched {fetched}, read {read}"
        );
        // The reader reads on a little, so the stream has jobs queued, then closes the file.
        for i in 10..14 {
            img.reader.read(ino, (i * CS) as u64, CS as u32).unwrap();
        }
        img.reader.released(ino);
        let at_release = img.requests().len();
        settle(&img, Duration::from_millis(300));
        assert!(
            img.requests().len() <= at_release + 1,
            "{} requests after release (one may have been in flight)",
            img.requests().len() - at_release
        );
        let read: u64 = chunks[..14].iter().map(stored_len).sum();
        assert!(img.fetched() <= read + max_ahead);
        assert_eq!(img.streams.running(), 0);
        assert!(
            img.requests().len() < chunks.len(),
            "the rest was not fetched"
        );
    }

    #[test]
    fn streams_together_stay_within_the_ahead_budget() {
        let tensors: Vec<(String, usize)> = (0..40).map(|i| (format!("t{i:02}"), CS)).collect();
        let refs: Vec<(&str, usize)> = tensors.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let budget = 8 * CS as u64;
        let img = image(
            vec![
                ("a.safetensors", safetensors(&refs, 0, 21)),
                ("b.safetensors", safetensors(&refs, 0, 22)),
            ],
            FetcherConfig {
                max_request_bytes: 1,
                ..fetch_config(4)
            },
            StreamConfig {
                ahead_budget: budget,
                ..stream_config(1 << 30, 1 << 30)
            },
        );
        for name in ["a.safetensors", "b.safetensors"] {
            img.reader.opened(img.ino(name));
            img.begin(name);
        }
        wait_for("both streams to run", || img.streams.running() == 2);
        settle(&img, Duration::from_millis(300));
        // The readers read the header's chunk only. The first stream may have taken the whole
        // budget before the second started; from then on each tops up to half of it.
        let ahead = |name: &str| {
            let total: u64 = img.requests_of(name).iter().map(|r| r.end - r.start).sum();
            total - stored_len(&img.chunks(name)[0])
        };
        let (a, b) = (ahead("a.safetensors"), ahead("b.safetensors"));
        assert!(
            a <= budget && b <= budget,
            "a {a}, b {b} ahead of budget {budget}"
        );
        assert!(a + b <= budget * 3 / 2 + CS as u64, "a {a} + b {b} ahead");
        for name in ["a.safetensors", "b.safetensors"] {
            img.reader.released(img.ino(name));
        }
    }

    #[test]
    fn two_streams_at_once_both_progress() {
        let tensors: Vec<(String, usize)> = (0..60).map(|i| (format!("t{i:02}"), CS)).collect();
        let refs: Vec<(&str, usize)> = tensors.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let img = image(
            vec![
                ("a.safetensors", safetensors(&refs, 0, 3)),
                ("b.safetensors", safetensors(&refs, 0, 4)),
            ],
            FetcherConfig {
                max_request_bytes: 1,
                ..fetch_config(1)
            },
            stream_config(1 << 30, 8 * CS as u64),
        );
        img.store.set(Faults {
            delay: Duration::from_millis(5),
            ..Faults::default()
        });
        img.reader.opened(img.ino("a.safetensors"));
        img.reader.opened(img.ino("b.safetensors"));
        img.begin("a.safetensors");
        img.begin("b.safetensors");
        wait_for("both streams to run", || img.streams.running() == 2);
        // Once both run, each gets about half of the requests.
        let (a0, b0) = (
            img.requests_of("a.safetensors").len(),
            img.requests_of("b.safetensors").len(),
        );
        wait_for("40 more requests", || {
            img.requests_of("a.safetensors").len() + img.requests_of("b.safetensors").len()
                >= a0 + b0 + 40
        });
        let a = img.requests_of("a.safetensors").len() - a0;
        let b = img.requests_of("b.safetensors").len() - b0;
        assert!(a >= 10 && b >= 10, "a: {a}, b: {b} of the last requests");
        img.reader.released(img.ino("a.safetensors"));
        img.reader.released(img.ino("b.safetensors"));
        wait_for("both streams to stop", || img.streams.running() == 0);
    }

    #[test]
    fn a_demand_read_during_a_stream_is_served_first() {
        let tensors: Vec<(String, usize)> = (0..50).map(|i| (format!("t{i:02}"), CS)).collect();
        let refs: Vec<(&str, usize)> = tensors.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let img = image(
            vec![
                ("m.safetensors", safetensors(&refs, 0, 5)),
                ("other", lazy_tests::pseudo_random_bytes(6, 4 * CS)),
            ],
            FetcherConfig {
                max_request_bytes: 1,
                concurrency: 1,
                ..fetch_config(2)
            },
            stream_config(1 << 30, 1 << 30),
        );
        const DELAY: Duration = Duration::from_millis(40);
        img.store.set(Faults {
            delay: DELAY,
            ..Faults::default()
        });
        img.reader.opened(img.ino("m.safetensors"));
        img.begin("m.safetensors");
        wait_for("the stream to queue its chunks", || {
            img.streams.running() == 1 && img.requests_of("m.safetensors").len() >= 3
        });
        let started = Instant::now();
        let got = img.reader.read(img.ino("other"), 0, CS as u32).unwrap();
        let waited = started.elapsed();
        assert_eq!(got, img.files["other"].1[..CS]);
        // Its own slot: one request's time, not the ~45 queued before it.
        assert!(waited < DELAY * 4, "demand read waited {waited:?}");
        img.reader.released(img.ino("m.safetensors"));
    }

    /// Forty tensors of two chunks each whose names are not in offset order: the tensor at
    /// offset place `i` is named `t{(7 i + 3) mod 40}`, so `t00` is the 12th and `t01` the 35th.
    fn shuffled_names() -> Vec<(String, usize)> {
        (0..40)
            .map(|i| (format!("t{:02}", (7 * i + 3) % 40), 2 * CS))
            .collect()
    }

    /// The stored ranges of the chunks of the tensor at offset place `place` of
    /// `shuffled_names()` (two chunks each, after the header's chunk).
    fn tensor_requests(img: &Image, name: &str, place: usize) -> Vec<Range<u64>> {
        let file = &img.files[name].1;
        let header_end = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let (start, end) = (
            header_end + place * 2 * CS,
            header_end + (place + 1) * 2 * CS,
        );
        img.chunks(name)
            .iter()
            .enumerate()
            .filter(|(i, _)| i * CS < end && (i + 1) * CS > start)
            .map(|(_, c)| c.record.comp_off..c.record.comp_off + u64::from(c.record.comp_len))
            .collect()
    }

    #[test]
    fn a_reader_inside_a_tensor_gets_it_before_queued_stream_work_and_the_stream_follows_name_order(
    ) {
        let names = shuffled_names();
        let refs: Vec<(&str, usize)> = names.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let file = safetensors(&refs, 0, 11);
        let img = image(
            vec![("m.safetensors", file.clone())],
            FetcherConfig {
                max_request_bytes: 1,
                concurrency: 1,
                ..fetch_config(1)
            },
            StreamConfig {
                first_bytes: 1 << 30,
                ..stream_config(1 << 30, 6 * CS as u64)
            },
        );
        img.store.set(Faults {
            delay: Duration::from_millis(10),
            ..Faults::default()
        });
        let ino = img.ino("m.safetensors");
        let header_end = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
        let read_tensor = |place: usize| {
            let at = header_end + (place * 2 * CS) as u64;
            let got = img.reader.read(ino, at, 2 * CS as u32).unwrap();
            assert_eq!(got, &file[at as usize..at as usize + 2 * CS]);
        };
        img.reader.opened(ino);
        // The reader reads the first tensor by offset (`t03`): the stream starts in offset
        // order and queues its share.
        read_tensor(0);
        wait_for("the stream to start in offset order", || {
            img.requests_of("m.safetensors").len() >= 5
        });
        // It reads `t00` (the 12th by offset): that tensor's chunks (three: the header does
        // not end on a chunk boundary) come next, ahead of the stream's queued work; at most
        // the stream request in flight before the read, and one that starts beside the last
        // of them (nothing waits then), are logged among them.
        let before = img.requests().len();
        read_tensor(11);
        let t00 = tensor_requests(&img, "m.safetensors", 11);
        let after = img.requests()[before..].to_vec();
        let at: Vec<usize> = t00
            .iter()
            .map(|r| {
                after
                    .iter()
                    .position(|a| a == r)
                    .expect("tensor chunk fetched")
            })
            .collect();
        assert!(
            at.iter().all(|&i| i < t00.len() + 2),
            "the reader's tensor came first: at {at:?} of {after:?}"
        );
        // Then `t01` (the 35th by offset): one step in name order, none in offset order. The
        // stream learns name order and goes on with `t02` (the 18th by offset).
        let from = img.requests().len();
        read_tensor(34);
        let t01 = tensor_requests(&img, "m.safetensors", 34);
        let t02 = tensor_requests(&img, "m.safetensors", 17);
        wait_for("the stream to fetch t02", || {
            let all = img.requests();
            t02.iter().all(|r| all[from..].contains(r))
        });
        let all = img.requests()[from..].to_vec();
        let last_t02 = all.iter().rposition(|r| t02.contains(r)).unwrap();
        let others = all[..last_t02]
            .iter()
            .filter(|r| !t01.contains(r) && !t02.contains(r))
            .count();
        assert!(
            others <= 2,
            "t02 came right after t01, not the offset order queued before: {all:?}"
        );
        img.reader.released(ino);
    }

    #[test]
    fn streams_are_bounded_however_many_files_are_opened() {
        let opened = MAX_STREAM_FILES + 36;
        let names: Vec<String> = (0..opened)
            .map(|i| format!("m{i:03}.safetensors"))
            .collect();
        // A header over the streamed bound, padded with spaces (valid JSON).
        let json = br#"{"t":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
        let mut big = (MAX_STREAMED_HEADER + 1).to_le_bytes().to_vec();
        big.extend_from_slice(json);
        big.resize(8 + MAX_STREAMED_HEADER as usize + 1, b' ');
        big.extend_from_slice(&[7; 8]);
        let mut files: Vec<(&str, Vec<u8>)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), safetensors(&[("t", CS)], 0, i as u64)))
            .collect();
        files.push(("big.safetensors", big.clone()));
        let img = image(files, fetch_config(4), stream_config(1 << 30, 1 << 30));
        let metrics = img.streams.fetcher().stream_metrics();
        for name in &names {
            img.reader.opened(img.ino(name));
        }
        wait_for("the files past the bound to be skipped", || {
            metrics.skipped.get() == 36
        });
        assert_eq!(img.streams.files.load(Ordering::Acquire), MAX_STREAM_FILES);
        // Released, the files free their streams; a new open is streamed again.
        for name in &names {
            img.reader.released(img.ino(name));
        }
        wait_for("the streams to end", || {
            img.streams.files.load(Ordering::Acquire) == 0
        });
        assert_eq!(img.streams.planned.load(Ordering::Acquire), 0);
        img.reader.opened(img.ino("big.safetensors"));
        wait_for("the large header to be skipped", || {
            metrics.skipped.get() == 37
        });
        let got = img
            .reader
            .read(img.ino("big.safetensors"), 0, big.len() as u32);
        assert_eq!(got.unwrap(), big, "a skipped file reads as any other");
        img.reader.released(img.ino("big.safetensors"));
        assert_eq!(metrics.headers_refused.get(), 0);
    }

    #[test]
    fn invalid_headers_are_refused_and_the_file_still_reads() {
        let mut huge = (fusefs::safetensors::MAX_HEADER_LEN + 1)
            .to_le_bytes()
            .to_vec();
        huge.extend_from_slice(&lazy_tests::pseudo_random_bytes(7, 3 * CS));
        let mut past_end = safetensors(&[("t", CS)], 0, 8);
        past_end.truncate(past_end.len() - 1);
        let mut bad_json = safetensors(&[("t", CS)], 0, 9);
        bad_json[9] = b'[';
        let files = vec![
            ("huge.safetensors", huge),
            ("past-end.safetensors", past_end),
            ("bad-json.safetensors", bad_json),
            ("short.safetensors", vec![1, 2, 3]),
            ("not-weights.bin", safetensors(&[("t", CS)], 0, 10)),
        ];
        let img = image(
            files.clone(),
            fetch_config(4),
            stream_config(1 << 30, 1 << 30),
        );
        let metrics = img.streams.fetcher().stream_metrics();
        for (name, _) in &files {
            img.reader.opened(img.ino(name));
        }
        wait_for("four refusals", || metrics.headers_refused.get() == 4);
        // The open thread handles opens in order: the last (not a safetensors file) is done
        // once it names no stream.
        wait_for("the opens to be handled", || {
            lock(&img.source.mount.files).is_empty()
        });
        assert_eq!(metrics.started.get(), 0);
        for (name, bytes) in &files {
            let got = img
                .reader
                .read(img.ino(name), 0, bytes.len() as u32)
                .unwrap();
            assert_eq!(&got, bytes, "{name}");
            img.reader.released(img.ino(name));
        }
    }
}
