//! Where a lazy image's blobs live: the `BlobStore` boundary the fetcher reads through.
//!
//! A store answers two questions: "give me bytes `start..end` of blob `sha256:...`" (chunk
//! fetches, coalesced by the fetcher into one range per run of adjacent chunks, handed on piece
//! by piece as the body arrives where the store can stream it) and "give me this whole small
//! blob" (the index). It never verifies chunk contents: the fetcher checks every
//! chunk's crc32 and blake3 before anything is cached or served, and the caller of `read_blob`
//! checks the blob's sha256.
//!
//! Implementations: the OCI registry (`registry::RegistryBlobStore`), S3 (`s3::S3Store`),
//! a local OCI layout directory ([`DirBlobStore`]), an in-memory map for unit tests
//! ([`MemoryBlobStore`]) and a fault-injecting wrapper for tests ([`FaultyBlobStore`]).
//!
//! Each store names its backend with a typed [`BackendId`] (the fetcher's per-backend queues,
//! limits and metrics are keyed by it; logs show its `Display` form) and says with each
//! [`BlobError`]'s [`BlobErrorKind`] whether a retry can help.
//!
//! Stores apply their own connect and read timeouts; the fetcher bounds each request as a whole.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

/// Which backend a store reads from: the fetcher keeps one queue, one set of limits and one
/// metrics label per identity (two images in one registry repository share them), and logs and
/// errors name the backend by its [`Display`](fmt::Display) form. Two identities that differ
/// print differently, so the metrics label stays unique. Cheap to clone (every error carries
/// one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendId(Arc<Backend>);

/// The parts of a [`BackendId`].
#[derive(Debug, PartialEq, Eq, Hash)]
enum Backend {
    Registry {
        registry: String,
        repository: String,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    Dir(PathBuf),
    Memory(&'static str),
    Routed {
        own: BackendId,
        buckets: Vec<String>,
        objects: usize,
        fingerprint: String,
    },
}

impl BackendId {
    /// A repository of an OCI registry: `registry HOST/REPO`.
    pub fn registry(registry: &str, repository: &str) -> BackendId {
        BackendId(Arc::new(Backend::Registry {
            registry: registry.to_string(),
            repository: repository.to_string(),
        }))
    }

    /// A bucket and key prefix (empty for the bucket's root): `s3://BUCKET/PREFIX`. The
    /// endpoint is not part of it: every S3 store of one agent takes its endpoint from the
    /// same AWS environment.
    pub fn s3(bucket: &str, prefix: &str) -> BackendId {
        BackendId(Arc::new(Backend::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }))
    }

    /// A local OCI image layout: `dir PATH`.
    pub fn dir(root: &Path) -> BackendId {
        BackendId(Arc::new(Backend::Dir(root.to_path_buf())))
    }

    /// An in-memory store or another test double, by its name: `memory`.
    pub fn memory(name: &'static str) -> BackendId {
        BackendId(Arc::new(Backend::Memory(name)))
    }

    /// An image's own store `own` plus `objects` S3 objects in `buckets` that its blobs
    /// indexed in place are read from (`external::RoutedBlobStore`):
    /// `OWN + N referenced object(s) in s3://B [FINGERPRINT]`. `fingerprint` is a digest of the
    /// routes (blob, object url, ETag), so that another set of objects at the same location (a
    /// re-conversion) is another backend.
    pub fn routed(
        own: BackendId,
        buckets: Vec<String>,
        objects: usize,
        fingerprint: String,
    ) -> BackendId {
        BackendId(Arc::new(Backend::Routed {
            own,
            buckets,
            objects,
            fingerprint,
        }))
    }

    /// The backend kind, used as the metrics label: `registry`, `s3`, `dir`, `memory`; a routed
    /// store is of its own store's kind.
    pub fn kind(&self) -> &'static str {
        match &*self.0 {
            Backend::Registry { .. } => "registry",
            Backend::S3 { .. } => "s3",
            Backend::Dir(_) => "dir",
            Backend::Memory(_) => "memory",
            Backend::Routed { own, .. } => own.kind(),
        }
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Backend::Registry {
                registry,
                repository,
            } => write!(f, "registry {registry}/{repository}"),
            Backend::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Backend::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Backend::Dir(root) => write!(f, "dir {}", root.display()),
            Backend::Memory(name) => f.write_str(name),
            Backend::Routed {
                own,
                buckets,
                objects,
                fingerprint,
            } => {
                write!(f, "{own} + {objects} referenced object(s) in ")?;
                for (i, bucket) in buckets.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}s3://{bucket}")?;
                }
                write!(f, " [{fingerprint}]")
            }
        }
    }
}

/// What a [`BlobError`] means for whoever asked: the fetcher retries only `Transient` errors,
/// and an object indexed in place that is `Changed` or `Gone` needs the image re-indexed (or
/// the object restored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobErrorKind {
    /// The object changed under us: its ETag is not the one it had when it was indexed.
    Changed,
    /// The blob or its object is not there (not found, deleted).
    Gone,
    /// Any other error a retry cannot help: denied, a bad request, a malformed answer.
    Permanent,
    /// A retry may help: the store is down, slow, or asked to be asked again later.
    Transient,
}

/// Errors from a blob store. Each one names the store and, where there is one, the blob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlobError {
    #[error("{store}: blob {digest} not found")]
    NotFound { store: BackendId, digest: String },
    #[error("{store}: access to blob {digest} denied: {reason}")]
    Denied {
        store: BackendId,
        digest: String,
        reason: String,
    },
    /// A request that cannot succeed as asked: bad digest, range past the end, malformed reply.
    #[error("{store}: blob {digest}: {reason}")]
    Invalid {
        store: BackendId,
        digest: String,
        reason: String,
    },
    /// The store could not be reached or failed in a way that may pass: connection refused or
    /// reset, 5xx, 429, a body that ended early.
    #[error("{store}: blob {digest}: {reason}")]
    Unavailable {
        store: BackendId,
        digest: String,
        reason: String,
    },
    #[error("{store}: blob {digest}: no answer within {after:?}")]
    Timeout {
        store: BackendId,
        digest: String,
        after: Duration,
    },
    /// The store asked to be asked again later: a 429 or 503 with a `Retry-After`.
    #[error("{store}: blob {digest}: {reason}; asked to retry after {retry_after:?}")]
    Throttled {
        store: BackendId,
        digest: String,
        reason: String,
        retry_after: Duration,
    },
    /// The object a blob was indexed in place from (`lazyctl convert --reference`) was
    /// replaced since: its ETag is another.
    #[error("{store}: blob {digest}: referenced object {} changed since it was indexed: the object's ETag is now {}, it was {} when the image was indexed; re-run lazyctl convert --reference", .change.object, .change.etag, .change.indexed_etag)]
    Changed {
        store: BackendId,
        digest: String,
        change: Box<ObjectChange>,
    },
    /// The object a blob was indexed in place from was deleted since.
    #[error("{store}: blob {digest}: referenced object {object} is gone (404): it was deleted since the image was indexed; restore it or re-run lazyctl convert --reference")]
    Deleted {
        store: BackendId,
        digest: String,
        /// The object's url, `s3://BUCKET/KEY`.
        object: String,
    },
}

/// How an object indexed in place differs from what was indexed (boxed in
/// [`BlobError::Changed`], which would otherwise make every `BlobError` larger).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectChange {
    /// The object's url, `s3://BUCKET/KEY`.
    pub object: String,
    /// Its ETag now.
    pub etag: String,
    /// Its ETag when the image was indexed.
    pub indexed_etag: String,
}

impl BlobError {
    /// What the error means for whoever asked (see [`BlobErrorKind`]).
    pub fn kind(&self) -> BlobErrorKind {
        match self {
            BlobError::Changed { .. } => BlobErrorKind::Changed,
            BlobError::NotFound { .. } | BlobError::Deleted { .. } => BlobErrorKind::Gone,
            BlobError::Denied { .. } | BlobError::Invalid { .. } => BlobErrorKind::Permanent,
            BlobError::Unavailable { .. }
            | BlobError::Timeout { .. }
            | BlobError::Throttled { .. } => BlobErrorKind::Transient,
        }
    }

    /// True when retrying the same request cannot help.
    pub fn is_permanent(&self) -> bool {
        match self.kind() {
            BlobErrorKind::Changed | BlobErrorKind::Gone | BlobErrorKind::Permanent => true,
            BlobErrorKind::Transient => false,
        }
    }

    /// How long the store asked the caller to wait before trying again, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BlobError::Throttled { retry_after, .. } => Some(*retry_after),
            BlobError::NotFound { .. }
            | BlobError::Denied { .. }
            | BlobError::Invalid { .. }
            | BlobError::Unavailable { .. }
            | BlobError::Timeout { .. }
            | BlobError::Changed { .. }
            | BlobError::Deleted { .. } => None,
        }
    }
}

/// The wait a `Retry-After` header value asks for (RFC 9110 section 10.2.3): delay-seconds, or
/// an HTTP date (a date already past asks for no wait). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// A place blobs are read from. Cheap to share (`Arc<dyn BlobStore>`); safe to call from many
/// tasks at once.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Which backend the store reads from: the fetcher's per-backend state, logs, errors and
    /// metrics name it by this.
    fn id(&self) -> BackendId;

    /// Bytes `range` of blob `digest` (`sha256:<hex>`): exactly `range.end - range.start` bytes
    /// or an error. A short body is [`BlobError::Unavailable`], never a short `Ok`.
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError>;

    /// Bytes `range` of blob `digest`, passed to `sink` in order as they arrive, so a caller
    /// can use the first bytes of a long range before the last have come. `Ok` once the body
    /// ended: the caller counts what it got (a short body is its to notice); on an error, what
    /// `sink` got stands. The default reads the whole range first; stores that can stream a
    /// body (registry, S3) pass it on piece by piece.
    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        let bytes = self.read_range(digest, range).await?;
        sink(&bytes);
        Ok(())
    }

    /// The whole blob `digest`, refusing blobs larger than `max_size` bytes. Used for the index.
    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError>;

    /// The size whose multiples requests should not cross (a mirror's slice: see
    /// `crate::mirror`); `None`: any range is as good as another.
    fn request_alignment(&self) -> Option<u64> {
        None
    }

    /// The store behind this one's mirrors (`crate::mirror`), asked again for a chunk whose
    /// bytes from a mirror failed verification; `None` for a store without mirrors.
    fn origin(&self) -> Option<Arc<dyn BlobStore>> {
        None
    }
}

/// [`BlobStore::read_range`] for a store that streams: its `read_range_to`, collected, and a
/// body that ended short of the range an [`BlobError::Unavailable`].
pub async fn collect_range(
    store: &(impl BlobStore + ?Sized),
    digest: &str,
    range: Range<u64>,
) -> Result<Vec<u8>, BlobError> {
    let want = range.end.saturating_sub(range.start);
    let mut out = Vec::new();
    store
        .read_range_to(digest, range, &mut |bytes| out.extend_from_slice(bytes))
        .await?;
    if out.len() as u64 != want {
        return Err(BlobError::Unavailable {
            store: store.id(),
            digest: digest.to_string(),
            reason: format!("got {} of {want} bytes", out.len()),
        });
    }
    Ok(out)
}

/// Checks that `digest` is `sha256:` and 64 lowercase hex digits, so it is safe in a path or URL.
pub fn check_digest<'a>(store: &BackendId, digest: &'a str) -> Result<&'a str, BlobError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if fusefs::manifest::is_sha256_digest(digest) => Ok(hex),
        _ => Err(BlobError::Invalid {
            store: store.clone(),
            digest: digest.to_string(),
            reason: "not a sha256 digest".into(),
        }),
    }
}

/// Blobs in a local OCI image layout (`ROOT/blobs/sha256/<hex>`), e.g. a `dir:` store.
#[derive(Debug, Clone)]
pub struct DirBlobStore {
    root: PathBuf,
}

impl DirBlobStore {
    pub fn new(root: &Path) -> Self {
        DirBlobStore {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        let hex = check_digest(&self.id(), digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    fn io_error(&self, digest: &str, e: std::io::Error) -> BlobError {
        let store = self.id();
        let digest = digest.to_string();
        match e.kind() {
            std::io::ErrorKind::NotFound => BlobError::NotFound { store, digest },
            std::io::ErrorKind::PermissionDenied => BlobError::Denied {
                store,
                digest,
                reason: e.to_string(),
            },
            _ => BlobError::Unavailable {
                store,
                digest,
                reason: e.to_string(),
            },
        }
    }
}

#[async_trait]
impl BlobStore for DirBlobStore {
    fn id(&self) -> BackendId {
        BackendId::dir(&self.root)
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest)?;
        let this = self.clone();
        let digest = digest.to_string();
        tokio::task::spawn_blocking(move || {
            let file = File::open(&path).map_err(|e| this.io_error(&digest, e))?;
            let len = file
                .metadata()
                .map_err(|e| this.io_error(&digest, e))?
                .len();
            if range.end > len || range.start > range.end {
                return Err(BlobError::Invalid {
                    store: this.id(),
                    digest,
                    reason: format!(
                        "range {}..{} is outside the blob's {len} bytes",
                        range.start, range.end
                    ),
                });
            }
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| this.io_error(&digest, e))?;
            Ok(buf)
        })
        .await
        .map_err(|e| BlobError::Unavailable {
            store: self.id(),
            digest: String::new(),
            reason: format!("read task failed: {e}"),
        })?
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest)?;
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(|e| self.io_error(digest, e))?
            .len();
        if len > max_size {
            return Err(too_large(&self.id(), digest, len, max_size));
        }
        tokio::fs::read(&path)
            .await
            .map_err(|e| self.io_error(digest, e))
    }
}

pub(crate) fn too_large(store: &BackendId, digest: &str, len: u64, max: u64) -> BlobError {
    BlobError::Invalid {
        store: store.clone(),
        digest: digest.to_string(),
        reason: format!("{len} bytes is over the {max}-byte limit"),
    }
}

/// Blobs held in memory, for unit tests. Counts the requests it serves.
#[derive(Debug, Default)]
pub struct MemoryBlobStore {
    blobs: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    requests: AtomicU64,
}

impl MemoryBlobStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `bytes` under its sha256 digest and returns the digest.
    pub fn insert(&self, bytes: Vec<u8>) -> String {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
        self.blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest.clone(), Arc::new(bytes));
        digest
    }

    /// Requests served so far (ranges and whole blobs, failed ones included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn get(&self, digest: &str) -> Result<Arc<Vec<u8>>, BlobError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
            .cloned()
            .ok_or_else(|| BlobError::NotFound {
                store: self.id(),
                digest: digest.to_string(),
            })
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    fn id(&self) -> BackendId {
        BackendId::memory("memory")
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let blob = self.get(digest)?;
        if range.start > range.end || range.end > blob.len() as u64 {
            return Err(BlobError::Invalid {
                store: self.id(),
                digest: digest.to_string(),
                reason: format!(
                    "range {}..{} is outside the blob's {} bytes",
                    range.start,
                    range.end,
                    blob.len()
                ),
            });
        }
        Ok(blob[range.start as usize..range.end as usize].to_vec())
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        let blob = self.get(digest)?;
        if blob.len() as u64 > max_size {
            return Err(too_large(&self.id(), digest, blob.len() as u64, max_size));
        }
        Ok(blob.to_vec())
    }
}

/// What a [`FaultyBlobStore`] does to the requests it passes on. Change it at any time with
/// [`FaultyBlobStore::set`]; requests already in flight keep the faults they started with.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Fail every request with [`BlobError::Unavailable`] (the backend is down).
    pub down: bool,
    /// Fail this many of the next requests with [`BlobError::Unavailable`], then pass them.
    pub fail_next: u32,
    /// Wait this long before each request (a slow or silent backend).
    pub delay: Duration,
    /// Return only the first half of each range (a body cut short, reported as `Ok`).
    pub truncate: bool,
    /// Flip the lowest bit of the byte at this offset of any blob, wherever a read covers it.
    pub corrupt_offset: Option<u64>,
    /// Injected failures are throttling answers ([`BlobError::Throttled`]) asking to retry
    /// after this long, instead of [`BlobError::Unavailable`].
    pub retry_after: Option<Duration>,
}

/// Wraps a store and injects errors, delays, truncation and corruption, for tests of the
/// fetcher's retries, timeouts and digest checks.
pub struct FaultyBlobStore {
    inner: Arc<dyn BlobStore>,
    faults: Mutex<Faults>,
    requests: AtomicU64,
}

impl FaultyBlobStore {
    pub fn new(inner: Arc<dyn BlobStore>) -> Self {
        FaultyBlobStore {
            inner,
            faults: Mutex::new(Faults::default()),
            requests: AtomicU64::new(0),
        }
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = faults;
    }

    /// Requests received so far, failed ones included.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts the request and returns the faults to apply to it, or the injected error.
    async fn begin(&self, digest: &str) -> Result<Faults, BlobError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let faults = {
            let mut guard = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
            let faults = guard.clone();
            guard.fail_next = guard.fail_next.saturating_sub(1);
            faults
        };
        if !faults.delay.is_zero() {
            tokio::time::sleep(faults.delay).await;
        }
        if faults.down || faults.fail_next > 0 {
            let (store, digest, reason) = (
                self.id(),
                digest.to_string(),
                "injected failure".to_string(),
            );
            return Err(match faults.retry_after {
                Some(retry_after) => BlobError::Throttled {
                    store,
                    digest,
                    reason,
                    retry_after,
                },
                None => BlobError::Unavailable {
                    store,
                    digest,
                    reason,
                },
            });
        }
        Ok(faults)
    }
}

fn corrupt(bytes: &mut [u8], start: u64, offset: Option<u64>) {
    if let Some(at) = offset.and_then(|o| o.checked_sub(start)) {
        if let Some(byte) = bytes.get_mut(at as usize) {
            *byte ^= 1;
        }
    }
}

#[async_trait]
impl BlobStore for FaultyBlobStore {
    fn id(&self) -> BackendId {
        self.inner.id()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let faults = self.begin(digest).await?;
        let start = range.start;
        let mut bytes = self.inner.read_range(digest, range).await?;
        if faults.truncate {
            bytes.truncate(bytes.len() / 2);
        }
        corrupt(&mut bytes, start, faults.corrupt_offset);
        Ok(bytes)
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        let faults = self.begin(digest).await?;
        let mut bytes = self.inner.read_blob(digest, max_size).await?;
        if faults.truncate {
            bytes.truncate(bytes.len() / 2);
        }
        corrupt(&mut bytes, 0, faults.corrupt_offset);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn memory_store_serves_exact_ranges_and_refuses_outside_ones() {
        rt().block_on(async {
            let store = MemoryBlobStore::new();
            let digest = store.insert((0u8..=255).collect());
            assert_eq!(
                store.read_range(&digest, 10..14).await.unwrap(),
                [10, 11, 12, 13]
            );
            let err = store.read_range(&digest, 250..257).await.unwrap_err();
            assert!(err.is_permanent(), "{err}");
            let missing = format!("sha256:{}", "0".repeat(64));
            assert!(matches!(
                store.read_range(&missing, 0..1).await,
                Err(BlobError::NotFound { .. })
            ));
            assert!(store.read_blob(&digest, 100).await.is_err());
            assert_eq!(store.read_blob(&digest, 256).await.unwrap().len(), 256);
        });
    }

    #[test]
    fn dir_store_reads_layout_blobs_and_rejects_path_like_digests() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let hex = "ab".repeat(32);
            std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
            std::fs::write(dir.path().join("blobs/sha256").join(&hex), b"hello world").unwrap();
            let store = DirBlobStore::new(dir.path());
            let digest = format!("sha256:{hex}");
            assert_eq!(store.read_range(&digest, 6..11).await.unwrap(), b"world");
            assert_eq!(store.read_blob(&digest, 64).await.unwrap(), b"hello world");
            assert!(store
                .read_range(&digest, 6..12)
                .await
                .unwrap_err()
                .is_permanent());
            let hostile = "sha256:../../../../etc/passwd";
            assert!(matches!(
                store.read_blob(hostile, 64).await,
                Err(BlobError::Invalid { .. })
            ));
            let missing = format!("sha256:{}", "cd".repeat(32));
            assert!(matches!(
                store.read_blob(&missing, 64).await,
                Err(BlobError::NotFound { .. })
            ));
        });
    }

    #[test]
    fn faulty_store_injects_each_fault() {
        rt().block_on(async {
            let inner = Arc::new(MemoryBlobStore::new());
            let digest = inner.insert(vec![7u8; 100]);
            let store = FaultyBlobStore::new(inner);

            store.set(Faults {
                fail_next: 2,
                ..Faults::default()
            });
            for _ in 0..2 {
                let err = store.read_range(&digest, 0..10).await.unwrap_err();
                assert!(!err.is_permanent(), "{err}");
            }
            assert_eq!(store.read_range(&digest, 0..10).await.unwrap(), [7u8; 10]);

            store.set(Faults {
                truncate: true,
                ..Faults::default()
            });
            assert_eq!(store.read_range(&digest, 0..10).await.unwrap().len(), 5);

            store.set(Faults {
                corrupt_offset: Some(12),
                ..Faults::default()
            });
            let bytes = store.read_range(&digest, 10..20).await.unwrap();
            assert_eq!(bytes[2], 6);
            assert_eq!(bytes.iter().filter(|&&b| b == 7).count(), 9);

            store.set(Faults {
                down: true,
                ..Faults::default()
            });
            assert!(store.read_blob(&digest, 1000).await.is_err());

            store.set(Faults {
                fail_next: 1,
                retry_after: Some(Duration::from_secs(2)),
                ..Faults::default()
            });
            let err = store.read_range(&digest, 0..10).await.unwrap_err();
            assert!(!err.is_permanent(), "{err}");
            assert_eq!(err.retry_after(), Some(Duration::from_secs(2)), "{err}");
            assert_eq!(store.requests(), 7);
        });
    }

    #[test]
    fn backend_ids_print_for_logs_and_tell_backends_apart() {
        let registry = BackendId::registry("127.0.0.1:5000", "debian");
        assert_eq!(registry.to_string(), "registry 127.0.0.1:5000/debian");
        assert_eq!(registry.kind(), "registry");
        assert_eq!(BackendId::s3("lazy", "").to_string(), "s3://lazy");
        assert_eq!(
            BackendId::s3("lazy", "img/v1").to_string(),
            "s3://lazy/img/v1"
        );
        assert_eq!(
            BackendId::dir(Path::new("/var/lib/images")).to_string(),
            "dir /var/lib/images"
        );
        let routed = |fingerprint: &str| {
            BackendId::routed(
                registry.clone(),
                vec!["a".into(), "b".into()],
                3,
                fingerprint.into(),
            )
        };
        assert_eq!(
            routed("0123456789ab").to_string(),
            "registry 127.0.0.1:5000/debian + 3 referenced object(s) in s3://a, s3://b \
             [0123456789ab]"
        );
        assert_eq!(routed("0123456789ab").kind(), "registry");
        let ids: std::collections::HashSet<BackendId> = [
            BackendId::registry("127.0.0.1:5000", "debian"),
            registry.clone(),
            BackendId::s3("lazy", ""),
            BackendId::s3("lazy", "img"),
            routed("0123456789ab"),
            routed("0123456789ab"),
            routed("ba9876543210"),
        ]
        .into();
        assert_eq!(ids.len(), 5);
    }

    #[test]
    fn error_kinds_say_what_a_retry_can_do() {
        let store = BackendId::memory("memory");
        let digest = "sha256:00".to_string();
        let changed = BlobError::Changed {
            store: store.clone(),
            digest: digest.clone(),
            change: Box::new(ObjectChange {
                object: "s3://models/a.bin".into(),
                etag: "\"e2\"".into(),
                indexed_etag: "\"e1\"".into(),
            }),
        };
        assert_eq!(
            changed.to_string(),
            "memory: blob sha256:00: referenced object s3://models/a.bin changed since it was \
             indexed: the object's ETag is now \"e2\", it was \"e1\" when the image was indexed; \
             re-run lazyctl convert --reference"
        );
        let deleted = BlobError::Deleted {
            store: store.clone(),
            digest: digest.clone(),
            object: "s3://models/a.bin".into(),
        };
        let not_found = BlobError::NotFound {
            store: store.clone(),
            digest: digest.clone(),
        };
        let down = BlobError::Unavailable {
            store,
            digest,
            reason: "connection refused".into(),
        };
        let kinds = [&changed, &deleted, &not_found, &down].map(BlobError::kind);
        assert_eq!(
            kinds,
            [
                BlobErrorKind::Changed,
                BlobErrorKind::Gone,
                BlobErrorKind::Gone,
                BlobErrorKind::Transient
            ]
        );
        assert!(changed.is_permanent() && deleted.is_permanent() && not_found.is_permanent());
        assert!(!down.is_permanent());
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date already past: retry at once.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
