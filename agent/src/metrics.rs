//! Counters the fetcher and cache keep, and their two renderings: a JSON-able snapshot (read by
//! tests, printed by `lazyctl` when a foreground mount exits) and Prometheus text (served by
//! `lazyd`). Metric names live here as constants, in one place.
//!
//! Everything is a relaxed atomic: counters are monotonic and read as a whole only for display,
//! so no ordering between them is needed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fusefs::ops::{Op, OpCount};
use serde::{Deserialize, Serialize};

use crate::mirror::{MirrorSnapshot, OriginSnapshot};

pub const CHUNK_READS: &str = "lazy_chunk_reads_total";
pub const MEMORY_HITS: &str = "lazy_chunk_memory_hits_total";
pub const DISK_HITS: &str = "lazy_chunk_disk_hits_total";
pub const MISSES: &str = "lazy_chunk_misses_total";
pub const JOINED: &str = "lazy_chunk_fetch_joined_total";
pub const DEMAND_FETCHES: &str = "lazy_chunk_demand_fetches_total";
pub const PREFETCH_FETCHES: &str = "lazy_chunk_prefetch_fetches_total";
pub const BACKGROUND_FETCHES: &str = "lazy_chunk_background_fetches_total";
pub const SPECULATIVE_FETCHES: &str = "lazy_chunk_speculative_fetches_total";
pub const DEMAND_WAIT: &str = "lazy_chunk_demand_wait_seconds";
pub const AHEAD_BYTES: &str = "lazy_chunk_ahead_bytes_total";
pub const AHEAD_USED_BYTES: &str = "lazy_chunk_ahead_used_bytes_total";
pub const DECODED_AHEAD: &str = "lazy_chunk_decoded_ahead_total";
pub const DECODED_AHEAD_USED: &str = "lazy_chunk_decoded_ahead_used_total";
pub const DIGEST_MISMATCHES: &str = "lazy_chunk_digest_mismatches_total";
pub const SERVED_UNCACHED: &str = "lazy_chunk_served_uncached_total";
pub const READ_ERRORS: &str = "lazy_chunk_read_errors_total";
pub const BACKEND_REQUESTS: &str = "lazy_backend_requests_total";
pub const BACKEND_BYTES: &str = "lazy_backend_bytes_total";
pub const BACKEND_CHUNKS: &str = "lazy_backend_chunks_total";
pub const BACKEND_RETRIES: &str = "lazy_backend_retries_total";
pub const BACKEND_ERRORS: &str = "lazy_backend_errors_total";
pub const BACKEND_TIMEOUTS: &str = "lazy_backend_timeouts_total";
pub const BACKEND_LATENCY: &str = "lazy_backend_request_seconds";
pub const MIRROR_REQUESTS: &str = "lazy_mirror_requests_total";
pub const MIRROR_BYTES: &str = "lazy_mirror_bytes_total";
pub const MIRROR_FAILURES: &str = "lazy_mirror_failures_total";
pub const MIRROR_UP: &str = "lazy_mirror_up";
pub const ORIGIN_REQUESTS: &str = "lazy_origin_requests_total";
pub const ORIGIN_BYTES: &str = "lazy_origin_bytes_total";
pub const STREAMS_STARTED: &str = "lazy_streams_started_total";
pub const STREAM_BYTES: &str = "lazy_stream_bytes_total";
pub const STREAM_HEADERS_REFUSED: &str = "lazy_stream_headers_refused_total";
pub const STREAMS_SKIPPED: &str = "lazy_streams_skipped_total";
pub const FUSE_REQUESTS: &str = "lazy_fuse_requests_total";
pub const FUSE_SECONDS: &str = "lazy_fuse_request_seconds_total";
pub const MOUNTS: &str = "lazyd_mounts";
pub const WARMS: &str = "lazyd_warms_running";
pub const LOWER_HOLDERS: &str = "lazyd_lower_holders";
pub const UPTIME: &str = "lazyd_uptime_seconds";

/// Upper bounds of the latency histogram's buckets, in seconds: loopback (sub-millisecond)
/// through a slow cross-region object store (seconds); the last bucket is +Inf.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A fixed-bucket latency histogram (Prometheus semantics: cumulative when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts, not cumulative; the extra last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramSnapshot {
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS`], then +Inf.
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl HistogramSnapshot {
    /// The upper bound of the bucket holding quantile `q` (0..=1); `None` when empty.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let target = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// What one backend (one blob store) was asked and answered.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    /// Range and blob requests sent, retries included.
    pub requests: Counter,
    /// Bytes received in successful responses.
    pub bytes: Counter,
    /// Chunks delivered (a coalesced request delivers several).
    pub chunks: Counter,
    pub retries: Counter,
    /// Requests that failed (each attempt counts).
    pub errors: Counter,
    /// Attempts cut off by the request timeout (also counted in `errors`).
    pub timeouts: Counter,
    pub latency: Histogram,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendSnapshot {
    pub kind: String,
    pub name: String,
    pub requests: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub retries: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub latency: HistogramSnapshot,
}

impl BackendMetrics {
    pub fn snapshot(&self, kind: &str, name: &str) -> BackendSnapshot {
        BackendSnapshot {
            kind: kind.to_string(),
            name: name.to_string(),
            requests: self.requests.get(),
            bytes: self.bytes.get(),
            chunks: self.chunks.get(),
            retries: self.retries.get(),
            errors: self.errors.get(),
            timeouts: self.timeouts.get(),
            latency: self.latency.snapshot(),
        }
    }
}

/// Where the chunks the filesystem asked for came from.
#[derive(Debug, Default)]
pub struct ChunkMetrics {
    /// `ChunkSource::chunk` calls.
    pub reads: Counter,
    pub memory_hits: Counter,
    pub disk_hits: Counter,
    /// Reads that found the chunk in neither cache.
    pub misses: Counter,
    /// Misses that joined a fetch already in flight instead of starting one.
    pub joined: Counter,
    /// Chunks fetched for a reader waiting on them.
    pub demand_fetches: Counter,
    /// Chunks fetched on a reader's read-ahead hint.
    pub prefetch_fetches: Counter,
    /// Chunks fetched by background work (warm, the whole image).
    pub background_fetches: Counter,
    /// Chunks fetched on a guess (the rest of a file or directory just touched).
    pub speculative_fetches: Counter,
    /// How long readers waited for chunks that had to be fetched (misses).
    pub demand_wait: Histogram,
    /// Stored bytes fetched ahead of readers, by class (read-ahead, streams and profiles;
    /// speculation; background), and of those, the bytes of chunks a reader then read.
    pub prefetch_ahead_bytes: Counter,
    pub prefetch_ahead_used_bytes: Counter,
    pub speculative_ahead_bytes: Counter,
    pub speculative_ahead_used_bytes: Counter,
    pub background_ahead_bytes: Counter,
    pub background_ahead_used_bytes: Counter,
    /// Chunks decoded from the disk cache into memory on a guess, and of those, the ones a
    /// reader then read.
    pub decoded_ahead: Counter,
    pub decoded_ahead_used: Counter,
    /// Chunks whose fetched bytes failed crc32, decompression or blake3: never served.
    pub digest_mismatches: Counter,
    /// Chunks served without being written to the disk cache (disk full).
    pub served_uncached: Counter,
    /// Reads answered with an error (EIO at the filesystem).
    pub read_errors: Counter,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChunkSnapshot {
    pub reads: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub joined: u64,
    pub demand_fetches: u64,
    pub prefetch_fetches: u64,
    pub background_fetches: u64,
    #[serde(default)]
    pub speculative_fetches: u64,
    /// Misses and the seconds readers waited for them, in all and by bucket.
    #[serde(default)]
    pub demand_waits: u64,
    #[serde(default)]
    pub demand_wait_seconds: f64,
    #[serde(default)]
    pub demand_wait: HistogramSnapshot,
    #[serde(default)]
    pub prefetch_bytes: u64,
    #[serde(default)]
    pub prefetch_used_bytes: u64,
    #[serde(default)]
    pub speculative_bytes: u64,
    #[serde(default)]
    pub speculative_used_bytes: u64,
    #[serde(default)]
    pub background_bytes: u64,
    #[serde(default)]
    pub background_used_bytes: u64,
    #[serde(default)]
    pub decoded_ahead: u64,
    #[serde(default)]
    pub decoded_ahead_used: u64,
    pub digest_mismatches: u64,
    pub served_uncached: u64,
    pub read_errors: u64,
}

impl ChunkMetrics {
    pub fn snapshot(&self) -> ChunkSnapshot {
        let demand_wait = self.demand_wait.snapshot();
        ChunkSnapshot {
            reads: self.reads.get(),
            memory_hits: self.memory_hits.get(),
            disk_hits: self.disk_hits.get(),
            misses: self.misses.get(),
            joined: self.joined.get(),
            demand_fetches: self.demand_fetches.get(),
            prefetch_fetches: self.prefetch_fetches.get(),
            background_fetches: self.background_fetches.get(),
            speculative_fetches: self.speculative_fetches.get(),
            demand_waits: demand_wait.count,
            demand_wait_seconds: demand_wait.sum_seconds,
            demand_wait,
            prefetch_bytes: self.prefetch_ahead_bytes.get(),
            prefetch_used_bytes: self.prefetch_ahead_used_bytes.get(),
            speculative_bytes: self.speculative_ahead_bytes.get(),
            speculative_used_bytes: self.speculative_ahead_used_bytes.get(),
            background_bytes: self.background_ahead_bytes.get(),
            background_used_bytes: self.background_ahead_used_bytes.get(),
            decoded_ahead: self.decoded_ahead.get(),
            decoded_ahead_used: self.decoded_ahead_used.get(),
            digest_mismatches: self.digest_mismatches.get(),
            served_uncached: self.served_uncached.get(),
            read_errors: self.read_errors.get(),
        }
    }
}

/// What the streams of files ahead of their readers (`agent::stream`) did.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    /// Files whose chunks were streamed (safetensors files with a valid header).
    pub started: Counter,
    /// Stored bytes of the chunks streams fetched (not those already cached).
    pub bytes: Counter,
    /// Safetensors files not streamed because their header is invalid.
    pub headers_refused: Counter,
    /// Safetensors files not streamed because the streams' bounds were reached (files
    /// streamed at once, header size, tensors planned); they read as any other file.
    pub skipped: Counter,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamSnapshot {
    pub started: u64,
    pub bytes: u64,
    pub headers_refused: u64,
    #[serde(default)]
    pub skipped: u64,
}

impl StreamMetrics {
    pub fn snapshot(&self) -> StreamSnapshot {
        StreamSnapshot {
            started: self.started.get(),
            bytes: self.bytes.get(),
            headers_refused: self.headers_refused.get(),
            skipped: self.skipped.get(),
        }
    }
}

/// Everything at one moment: what tests read and what `lazyctl` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub chunks: ChunkSnapshot,
    /// Absent in snapshots written before streams existed.
    #[serde(default)]
    pub streams: StreamSnapshot,
    pub backends: Vec<BackendSnapshot>,
    pub cache: Option<crate::cache::CacheStats>,
    /// The FUSE requests the mounts answered (absent in snapshots written before they were
    /// counted).
    #[serde(default)]
    pub fuse: FuseSnapshot,
    /// The configured mirrors (`crate::mirror`).
    #[serde(default)]
    pub mirrors: Vec<MirrorSnapshot>,
    /// What the origins that have mirrors served themselves.
    #[serde(default)]
    pub origins: Vec<OriginSnapshot>,
}

/// FUSE requests that reached the daemon, by kind (`fusefs::ops`), summed over mounts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FuseSnapshot {
    pub ops: Vec<OpCount>,
}

impl FuseSnapshot {
    /// How many `op` requests were answered.
    pub fn count(&self, op: Op) -> u64 {
        self.ops.iter().find(|c| c.op == op).map_or(0, |c| c.count)
    }

    /// Requests of every kind.
    pub fn total(&self) -> u64 {
        self.ops
            .iter()
            .filter(|c| c.op != Op::LookupMissing)
            .map(|c| c.count)
            .sum()
    }
}

impl MetricsSnapshot {
    /// Bytes received from all backends.
    pub fn bytes_fetched(&self) -> u64 {
        self.backends.iter().map(|b| b.bytes).sum()
    }

    /// Requests sent to all backends.
    pub fn requests(&self) -> u64 {
        self.backends.iter().map(|b| b.requests).sum()
    }

    /// A few human lines for the end of a foreground mount.
    pub fn summary(&self) -> String {
        let c = &self.chunks;
        let mut out = format!(
            "chunks: {} reads, {} from memory, {} from disk cache, {} fetched ({} joined a fetch in flight), {} digest mismatches, {} served uncached, {} errors",
            c.reads, c.memory_hits, c.disk_hits, c.misses, c.joined, c.digest_mismatches, c.served_uncached, c.read_errors
        );
        let _ = write!(
            out,
            "\nfetches: {} for readers, {} read-ahead (streams, profiles), {} speculative, {} background (warm, whole image)",
            c.demand_fetches, c.prefetch_fetches, c.speculative_fetches, c.background_fetches
        );
        if c.demand_waits > 0 {
            let _ = write!(
                out,
                "\nreaders waited for {} fetches, {:.3} s in all",
                c.demand_waits, c.demand_wait_seconds
            );
        }
        let _ = write!(
            out,
            "\nfetched ahead of readers (bytes used / fetched): read-ahead {} / {}, speculative {} / {}, background {} / {}; decoded ahead {} / {} chunks",
            c.prefetch_used_bytes,
            c.prefetch_bytes,
            c.speculative_used_bytes,
            c.speculative_bytes,
            c.background_used_bytes,
            c.background_bytes,
            c.decoded_ahead_used,
            c.decoded_ahead
        );
        let st = &self.streams;
        if st.started + st.headers_refused + st.skipped > 0 {
            let _ = write!(
                out,
                "\nstreams: {} files streamed ({} bytes fetched ahead of readers), {} headers refused, {} skipped at the streams' bounds",
                st.started, st.bytes, st.headers_refused, st.skipped
            );
        }
        for b in &self.backends {
            let p50 = b.latency.quantile_bound(0.5).map_or("-".into(), fmt_secs);
            let p99 = b.latency.quantile_bound(0.99).map_or("-".into(), fmt_secs);
            let _ = write!(
                out,
                "\n{}: {} requests, {} bytes, {} chunks, {} retries, {} errors ({} timeouts), latency p50 <= {p50}, p99 <= {p99}",
                b.name, b.requests, b.bytes, b.chunks, b.retries, b.errors, b.timeouts
            );
        }
        for m in &self.mirrors {
            let state = if m.skipped_for_secs > 0.0 {
                format!("down, asked again in {:.1} s", m.skipped_for_secs)
            } else if m.up {
                "up".to_string()
            } else {
                "failing".to_string()
            };
            let _ = write!(
                out,
                "\nmirror {} for {}: {state}; {} bytes in {} requests, {} failed",
                m.url, m.origin, m.bytes, m.requests, m.failures
            );
            if let (false, Some(error)) = (m.up, &m.last_error) {
                let _ = write!(out, " (last: {error})");
            }
        }
        for o in &self.origins {
            let _ = write!(
                out,
                "\norigin {} (not through a mirror): {} bytes in {} requests",
                o.origin, o.bytes, o.requests
            );
        }
        if !self.fuse.ops.is_empty() {
            let ops: Vec<String> = self
                .fuse
                .ops
                .iter()
                .map(|c| format!("{} {} ({:.3} s)", c.count, c.op.name(), c.seconds))
                .collect();
            let _ = write!(out, "\nfuse requests: {}", ops.join(", "));
        }
        if let Some(cache) = &self.cache {
            let _ = write!(
                out,
                "\ncache: {} entries, {} of {} bytes used, {} evicted segments, {} corrupt entries dropped, {} failed inserts",
                cache.entries, cache.bytes_used, cache.budget_bytes, cache.evicted_segments, cache.corrupt_entries, cache.insert_failures
            );
        }
        out
    }

    /// The snapshot in Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let c = &self.chunks;
        for (name, help, value) in [
            (CHUNK_READS, "Chunk reads by the filesystem.", c.reads),
            (
                MEMORY_HITS,
                "Chunk reads served from the decoded-chunk memory cache.",
                c.memory_hits,
            ),
            (
                DISK_HITS,
                "Chunk reads served from the local disk cache.",
                c.disk_hits,
            ),
            (MISSES, "Chunk reads that needed a fetch.", c.misses),
            (
                JOINED,
                "Misses that joined a fetch already in flight.",
                c.joined,
            ),
            (
                DEMAND_FETCHES,
                "Chunks fetched for a reader.",
                c.demand_fetches,
            ),
            (
                PREFETCH_FETCHES,
                "Chunks fetched on readers' read-ahead hints.",
                c.prefetch_fetches,
            ),
            (
                BACKGROUND_FETCHES,
                "Chunks fetched by background work (warm, the whole image).",
                c.background_fetches,
            ),
            (
                SPECULATIVE_FETCHES,
                "Chunks fetched on a guess (the rest of a file or directory just touched).",
                c.speculative_fetches,
            ),
            (
                DECODED_AHEAD,
                "Chunks decoded from the disk cache into memory on a guess.",
                c.decoded_ahead,
            ),
            (
                DECODED_AHEAD_USED,
                "Chunks decoded ahead that a reader then read.",
                c.decoded_ahead_used,
            ),
            (
                DIGEST_MISMATCHES,
                "Fetched chunks that failed verification and were not served.",
                c.digest_mismatches,
            ),
            (
                SERVED_UNCACHED,
                "Chunks served without being cached on disk (disk full).",
                c.served_uncached,
            ),
            (
                READ_ERRORS,
                "Chunk reads answered with an error.",
                c.read_errors,
            ),
            (
                STREAMS_STARTED,
                "Files streamed ahead of their readers (safetensors tensors in offset order).",
                self.streams.started,
            ),
            (
                STREAM_BYTES,
                "Stored bytes fetched by streams ahead of their readers.",
                self.streams.bytes,
            ),
            (
                STREAM_HEADERS_REFUSED,
                "Safetensors files not streamed because their header is invalid.",
                self.streams.headers_refused,
            ),
            (
                STREAMS_SKIPPED,
                "Safetensors files not streamed because the streams' bounds were reached.",
                self.streams.skipped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        type Field = fn(&BackendSnapshot) -> u64;
        let fields: [(&str, &str, Field); 6] = [
            (BACKEND_REQUESTS, "Requests sent to a backend.", |b| {
                b.requests
            }),
            (BACKEND_BYTES, "Bytes received from a backend.", |b| b.bytes),
            (BACKEND_CHUNKS, "Chunks received from a backend.", |b| {
                b.chunks
            }),
            (
                BACKEND_RETRIES,
                "Requests retried after a transient error.",
                |b| b.retries,
            ),
            (BACKEND_ERRORS, "Failed backend requests.", |b| b.errors),
            (
                BACKEND_TIMEOUTS,
                "Backend requests cut off by the timeout.",
                |b| b.timeouts,
            ),
        ];
        for (name, help, field) in fields {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for b in &self.backends {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(b), field(b));
            }
        }
        for (name, help, kind, value) in [
            (
                MIRROR_REQUESTS,
                "Blob requests sent to a mirror (each try).",
                "counter",
                (|m: &MirrorSnapshot| m.requests as f64) as fn(&MirrorSnapshot) -> f64,
            ),
            (
                MIRROR_BYTES,
                "Bytes a mirror delivered.",
                "counter",
                |m| m.bytes as f64,
            ),
            (
                MIRROR_FAILURES,
                "Requests a mirror failed (error, timeout, short body); the origin was asked instead.",
                "counter",
                |m| m.failures as f64,
            ),
            (
                MIRROR_UP,
                "1 when the mirror's last request succeeded (or none was sent yet).",
                "gauge",
                |m| if m.up { 1.0 } else { 0.0 },
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for m in &self.mirrors {
                let _ = writeln!(
                    out,
                    "{name}{{mirror=\"{}\",origin=\"{}\"}} {}",
                    escape_label(&m.url),
                    escape_label(&m.origin.to_string()),
                    value(m)
                );
            }
        }
        for (name, help, value) in [
            (
                ORIGIN_REQUESTS,
                "Blob requests an origin with mirrors was sent itself.",
                (|o: &OriginSnapshot| o.requests) as fn(&OriginSnapshot) -> u64,
            ),
            (
                ORIGIN_BYTES,
                "Bytes an origin with mirrors delivered itself.",
                |o| o.bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for o in &self.origins {
                let _ = writeln!(
                    out,
                    "{name}{{origin=\"{}\"}} {}",
                    escape_label(&o.origin.to_string()),
                    value(o)
                );
            }
        }
        for (name, help, value) in [
            (
                FUSE_REQUESTS,
                "FUSE requests answered by the daemon, by kind (lookup_missing: lookups of missing names, also counted as lookup).",
                (|c: &OpCount| c.count.to_string()) as fn(&OpCount) -> String,
            ),
            (
                FUSE_SECONDS,
                "Time the daemon spent answering FUSE requests, by kind.",
                |c| c.seconds.to_string(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for c in &self.fuse.ops {
                let _ = writeln!(out, "{name}{{op=\"{}\"}} {}", c.op.name(), value(c));
            }
        }
        for (name, help, values) in [
            (
                AHEAD_BYTES,
                "Stored bytes fetched ahead of readers, by class.",
                [c.prefetch_bytes, c.speculative_bytes, c.background_bytes],
            ),
            (
                AHEAD_USED_BYTES,
                "Stored bytes fetched ahead of readers that a reader then read, by class.",
                [
                    c.prefetch_used_bytes,
                    c.speculative_used_bytes,
                    c.background_used_bytes,
                ],
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (class, value) in ["prefetch", "speculative", "background"].iter().zip(values) {
                let _ = writeln!(out, "{name}{{class=\"{class}\"}} {value}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP {DEMAND_WAIT} How long readers waited for chunks that had to be fetched.\n# TYPE {DEMAND_WAIT} histogram"
        );
        write_histogram(&mut out, DEMAND_WAIT, "", &c.demand_wait);
        let _ = writeln!(
            out,
            "# HELP {BACKEND_LATENCY} Backend request latency.\n# TYPE {BACKEND_LATENCY} histogram"
        );
        for b in &self.backends {
            write_histogram(&mut out, BACKEND_LATENCY, &labels(b), &b.latency);
        }
        out
    }
}

/// The `_bucket`, `_sum` and `_count` lines of histogram `name` with `labels` (may be empty).
fn write_histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, n) in h.buckets.iter().enumerate() {
        cumulative += n;
        let le = LATENCY_BUCKETS
            .get(i)
            .map_or("+Inf".to_string(), |v| v.to_string());
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braces} {}\n{name}_count{braces} {}",
        h.sum_seconds, h.count
    );
}

fn labels(b: &BackendSnapshot) -> String {
    format!("backend=\"{}\",name=\"{}\"", b.kind, escape_label(&b.name))
}

/// A label value with its backslashes and quotes escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

fn fmt_secs(secs: f64) -> String {
    if secs.is_infinite() {
        "inf".into()
    } else if secs < 1.0 {
        format!("{:.0} ms", secs * 1e3)
    } else {
        format!("{secs} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::default();
        for ms in [1, 3, 3, 40, 4000, 9000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(s.buckets.iter().sum::<u64>(), 6);
        assert_eq!(s.buckets[0], 1); // <= 1 ms
        assert_eq!(s.buckets[2], 2); // <= 5 ms
        assert_eq!(*s.buckets.last().unwrap(), 1); // > 5 s
        assert_eq!(s.quantile_bound(0.5), Some(0.005));
        assert_eq!(s.quantile_bound(1.0), Some(f64::INFINITY));
        assert!((s.sum_seconds - 13.047).abs() < 1e-6);
    }

    #[test]
    fn prometheus_text_is_cumulative_and_labelled() {
        let backend = BackendMetrics::default();
        backend.requests.add(3);
        backend.latency.observe(Duration::from_millis(1));
        backend.latency.observe(Duration::from_millis(30));
        let snap = MetricsSnapshot {
            backends: vec![backend.snapshot("registry", "127.0.0.1:5000/\"x\"")],
            ..MetricsSnapshot::default()
        };
        let text = snap.prometheus();
        assert!(text.contains(
            "lazy_backend_requests_total{backend=\"registry\",name=\"127.0.0.1:5000/\\\"x\\\"\"} 3"
        ));
        assert!(text.contains("le=\"0.001\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(text.contains("le=\"+Inf\"} 2"));
        assert!(text.contains("lazy_backend_request_seconds_count{"));
    }

    #[test]
    fn mirrors_and_origins_are_reported() {
        use crate::mirror::Origin;
        let origin = Origin::Registry("registry.local:5000".into());
        let snap = MetricsSnapshot {
            mirrors: vec![MirrorSnapshot {
                url: "http://tier:5000/".into(),
                origin: origin.clone(),
                up: false,
                skipped_for_secs: 1.5,
                failures_in_a_row: 1,
                last_error: Some("connection refused".into()),
                requests: 10,
                bytes: 4096,
                failures: 1,
            }],
            origins: vec![OriginSnapshot {
                origin,
                requests: 2,
                bytes: 100,
            }],
            ..MetricsSnapshot::default()
        };
        let text = snap.prometheus();
        let labels = "{mirror=\"http://tier:5000/\",origin=\"registry registry.local:5000\"}";
        for line in [
            format!("lazy_mirror_requests_total{labels} 10"),
            format!("lazy_mirror_bytes_total{labels} 4096"),
            format!("lazy_mirror_failures_total{labels} 1"),
            format!("lazy_mirror_up{labels} 0"),
            "lazy_origin_bytes_total{origin=\"registry registry.local:5000\"} 100".into(),
        ] {
            assert!(text.contains(&line), "{line} not in {text}");
        }
        assert!(text.contains("# TYPE lazy_mirror_up gauge"));
        let summary = snap.summary();
        assert!(
            summary.contains("mirror http://tier:5000/ for registry registry.local:5000: down, asked again in 1.5 s; 4096 bytes in 10 requests, 1 failed (last: connection refused)"),
            "{summary}"
        );
        assert!(summary.contains(
            "origin registry registry.local:5000 (not through a mirror): 100 bytes in 2 requests"
        ));
    }

    #[test]
    fn background_fetches_are_reported() {
        let chunks = ChunkMetrics::default();
        chunks.background_fetches.add(7);
        chunks.prefetch_fetches.add(2);
        let snap = MetricsSnapshot {
            chunks: chunks.snapshot(),
            ..MetricsSnapshot::default()
        };
        assert_eq!(snap.chunks.background_fetches, 7);
        let text = snap.prometheus();
        assert!(text.contains("# TYPE lazy_chunk_background_fetches_total counter\nlazy_chunk_background_fetches_total 7\n"), "{text}");
        assert!(text.contains("lazy_chunk_prefetch_fetches_total 2\n"));
        assert!(
            snap.summary()
                .contains("2 read-ahead (streams, profiles), 0 speculative, 7 background"),
            "{}",
            snap.summary()
        );
    }
}
