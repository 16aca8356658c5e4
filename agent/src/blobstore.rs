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
//! Stores apply their own connect and read timeouts; the fetcher bounds each request as a whole.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

/// Errors from a blob store. Each one names the store and, where there is one, the blob.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlobError {
    #[error("{store}: blob {digest} not found")]
    NotFound { store: String, digest: String },
    #[error("{store}: access to blob {digest} denied: {reason}")]
    Denied {
        store: String,
        digest: String,
        reason: String,
    },
    /// A request that cannot succeed as asked: bad digest, range past the end, malformed reply.
    #[error("{store}: blob {digest}: {reason}")]
    Invalid {
        store: String,
        digest: String,
        reason: String,
    },
    /// The store could not be reached or failed in a way that may pass: connection refused or
    /// reset, 5xx, 429, a body that ended early.
    #[error("{store}: blob {digest}: {reason}")]
    Unavailable {
        store: String,
        digest: String,
        reason: String,
    },
    #[error("{store}: blob {digest}: no answer within {after:?}")]
    Timeout {
        store: String,
        digest: String,
        after: Duration,
    },
    /// The store asked to be asked again later: a 429 or 503 with a `Retry-After`.
    #[error("{store}: blob {digest}: {reason}; asked to retry after {retry_after:?}")]
    Throttled {
        store: String,
        digest: String,
        reason: String,
        retry_after: Duration,
    },
}

impl BlobError {
    /// True when retrying the same request cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            BlobError::NotFound { .. } | BlobError::Denied { .. } | BlobError::Invalid { .. } => {
                true
            }
            BlobError::Unavailable { .. }
            | BlobError::Timeout { .. }
            | BlobError::Throttled { .. } => false,
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
            | BlobError::Timeout { .. } => None,
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
    /// The backend kind, used as the metrics label: `registry`, `s3`, `dir`, `memory`.
    fn kind(&self) -> &'static str;

    /// Where the store is, for logs and errors: `registry 127.0.0.1:5000/debian`,
    /// `s3://bucket/prefix`, `dir /var/lib/images`.
    fn describe(&self) -> String;

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
}

/// Checks that `digest` is `sha256:` and 64 lowercase hex digits, so it is safe in a path or URL.
pub fn check_digest<'a>(store: &str, digest: &'a str) -> Result<&'a str, BlobError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(BlobError::Invalid {
            store: store.to_string(),
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
        let hex = check_digest(&self.describe(), digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    fn io_error(&self, digest: &str, e: std::io::Error) -> BlobError {
        let store = self.describe();
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
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn describe(&self) -> String {
        format!("dir {}", self.root.display())
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
                    store: this.describe(),
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
            store: self.describe(),
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
            return Err(too_large(&self.describe(), digest, len, max_size));
        }
        tokio::fs::read(&path)
            .await
            .map_err(|e| self.io_error(digest, e))
    }
}

pub(crate) fn too_large(store: &str, digest: &str, len: u64, max: u64) -> BlobError {
    BlobError::Invalid {
        store: store.to_string(),
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
                store: self.describe(),
                digest: digest.to_string(),
            })
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        "memory".into()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let blob = self.get(digest)?;
        if range.start > range.end || range.end > blob.len() as u64 {
            return Err(BlobError::Invalid {
                store: self.describe(),
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
            return Err(too_large(
                &self.describe(),
                digest,
                blob.len() as u64,
                max_size,
            ));
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
                self.describe(),
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
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        self.inner.describe()
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
