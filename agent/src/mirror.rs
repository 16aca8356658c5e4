//! Mirrors: blob reads of a registry or an S3 bucket sent to a cache tier first (`[[mirror]]`
//! in lazyd's config), the origin asked only when no mirror could answer.
//!
//! - **What goes to a mirror**: blob reads only (chunk ranges, the index, a registry image's
//!   profile), which are named by digest and checked by the reader (every chunk's crc32 and
//!   blake3, the index's and the profile's sha256), so a mirror can never make a wrong byte reach
//!   a reader; a chunk that fails its checks is fetched again from the origin. Manifests are
//!   always read from the origin: a tag names whatever the origin says it names now.
//! - **How**: a registry mirror is asked the registry's own paths (`/v2/REPO/blobs/DIGEST`) with
//!   the origin's credentials, as containerd and docker ask theirs; a token realm's 401 passes
//!   through it. An S3 mirror is asked for the path and query of a GetObject presigned for the
//!   origin's endpoint (the `Range` is not signed), so a tier that forwards a miss unchanged
//!   needs no credentials of its own and the origin still checks every miss.
//! - **Fallback**: mirrors are tried in the order configured, then the origin. A mirror that
//!   does not connect or goes quiet for its `timeout`, answers with an error, or is so slow that
//!   the fetcher's `request_timeout` cuts its request off, is skipped for
//!   `backoff`, doubled after each failure up to `max_backoff`; its first success makes it
//!   healthy again. A request that a mirror broke off after some bytes continues where it
//!   stopped, at the next mirror or the origin.
//! - **Alignment**: a mirror's `slice` is the tier's slice size; the fetcher cuts its requests
//!   at its multiples ([`BlobStore::request_alignment`]), so a request costs the tier one slice
//!   and hosts asking for the same bytes ask for the same slices.
//! - **Accounting**: requests, bytes and failures per mirror, requests and bytes per origin
//!   (`lazyctl status`, `/metrics`).

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_s3::presigning::PresigningConfig;
use reqwest::header::{CONTENT_RANGE, RANGE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::blobstore::{collect_range, parse_retry_after, BackendId, BlobError, BlobStore};
use crate::error::error_chain;
use crate::metrics::Counter;
use crate::registry::{
    docker_config_credentials, ClientOptions, PlainHttp, RegistryBlobStore, RegistryClient,
    RegistryError,
};
use crate::s3::S3Store;
use crate::sync::lock;

/// How long a GetObject presigned for a mirror stays valid: the request is sent at once, so
/// this only needs to cover clock skew and a slow tier's wait on the origin.
const PRESIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// Whose blob reads a mirror takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A registry, `host[:port]` as image references write it.
    Registry(String),
    /// An S3 bucket, whatever its endpoint.
    Bucket(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Registry(host) => write!(f, "registry {host}"),
            Origin::Bucket(bucket) => write!(f, "s3://{bucket}"),
        }
    }
}

/// One configured mirror.
#[derive(Debug, Clone)]
pub struct MirrorSpec {
    pub origin: Origin,
    /// `scheme://host[:port]`.
    pub url: Url,
    /// Limit on connecting and on each wait for data; slower is a failure.
    pub timeout: Duration,
    /// The tier's slice size; 0: requests are not cut.
    pub slice: u64,
    /// How long a failed mirror is skipped, doubled after each further failure ...
    pub backoff: Duration,
    /// ... up to this.
    pub max_backoff: Duration,
}

#[derive(Debug, Error)]
pub enum MirrorError {
    #[error("mirror {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("mirror {url}: cannot build its client")]
    Client {
        url: String,
        #[source]
        source: RegistryError,
    },
    #[error("mirror {url}: cannot build its http client")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Checks a mirror URL: http or https, a host, no path, query, fragment or credentials.
pub fn check_url(url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the URL must be http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err("the URL must not have a path: a mirror serves the origin's own paths".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not carry credentials".into());
    }
    Ok(())
}

/// A mirror's health: skipped until `skip_until` after `failures` failures in a row.
#[derive(Debug, Default)]
struct Health {
    failures: u32,
    skip_until: Option<Instant>,
    last_error: Option<String>,
}

/// How a mirror is asked.
enum MirrorClient {
    /// A registry's mirror: the client keeps connections and tokens across repositories.
    Registry(RegistryClient),
    /// A bucket's mirror.
    S3(reqwest::Client),
}

/// One mirror, shared by every image of its origin.
pub struct Mirror {
    spec: MirrorSpec,
    client: MirrorClient,
    health: Mutex<Health>,
    requests: Counter,
    bytes: Counter,
    failures: Counter,
}

impl Mirror {
    fn new(spec: MirrorSpec) -> Result<Mirror, MirrorError> {
        let user_agent = ClientOptions::default().user_agent;
        check_url(&spec.url).map_err(|reason| MirrorError::Url {
            url: spec.url.to_string(),
            reason,
        })?;
        let host = spec.url.host_str().unwrap_or_default();
        // What a registry client is named by.
        let authority = match spec.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let client = match &spec.origin {
            Origin::Registry(origin) => {
                let plain_http = if spec.url.scheme() == "http" {
                    PlainHttp::Only
                } else {
                    PlainHttp::Never
                };
                let client = RegistryClient::new(
                    &authority,
                    ClientOptions {
                        // The origin's credentials: the mirror passes them on a miss.
                        credentials: docker_config_credentials(origin),
                        connect_timeout: spec.timeout,
                        read_timeout: spec.timeout,
                        user_agent: user_agent.clone(),
                        plain_http,
                    },
                )
                .map_err(|source| MirrorError::Client {
                    url: spec.url.to_string(),
                    source,
                })?;
                MirrorClient::Registry(client)
            }
            Origin::Bucket(_) => {
                let client = reqwest::Client::builder()
                    .user_agent(&user_agent)
                    .connect_timeout(spec.timeout)
                    .read_timeout(spec.timeout)
                    // A tier answers itself; a redirect would lead around it.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|source| MirrorError::Http {
                        url: spec.url.to_string(),
                        source,
                    })?;
                MirrorClient::S3(client)
            }
        };
        Ok(Mirror {
            spec,
            client,
            health: Mutex::new(Health::default()),
            requests: Counter::default(),
            bytes: Counter::default(),
            failures: Counter::default(),
        })
    }

    pub fn url(&self) -> &Url {
        &self.spec.url
    }

    /// Whether the mirror is not being skipped after a failure.
    fn usable(&self, now: Instant) -> bool {
        lock(&self.health)
            .skip_until
            .is_none_or(|until| now >= until)
    }

    fn succeeded(&self) {
        let mut health = lock(&self.health);
        if health.failures > 0 {
            info!(
                mirror = %self.spec.url,
                origin = %self.spec.origin,
                "mirror answers again after {} failure(s)",
                health.failures
            );
        }
        health.failures = 0;
        health.skip_until = None;
    }

    /// Counts a failure and skips the mirror for its backoff; failures of requests that were
    /// under way when an earlier one already put the mirror aside do not lengthen it.
    fn failed(&self, reason: &str) {
        self.failures.inc();
        let now = Instant::now();
        let mut health = lock(&self.health);
        health.last_error = Some(reason.to_string());
        if health.skip_until.is_some_and(|until| now < until) {
            return;
        }
        health.failures = health.failures.saturating_add(1);
        let wait = self
            .spec
            .backoff
            .saturating_mul(2u32.saturating_pow(health.failures - 1))
            .min(self.spec.max_backoff);
        health.skip_until = Some(now + wait);
        warn!(
            mirror = %self.spec.url,
            origin = %self.spec.origin,
            failures = health.failures,
            "mirror failed, reading from the origin; the mirror is asked again in {wait:?}: {reason}"
        );
    }

    pub(crate) fn snapshot(&self) -> MirrorSnapshot {
        let health = lock(&self.health);
        let now = Instant::now();
        MirrorSnapshot {
            url: self.spec.url.to_string(),
            origin: self.spec.origin.clone(),
            up: health.failures == 0,
            skipped_for_secs: health.skip_until.map_or(0.0, |until| {
                until.saturating_duration_since(now).as_secs_f64()
            }),
            failures_in_a_row: health.failures,
            last_error: health.last_error.clone(),
            requests: self.requests.get(),
            bytes: self.bytes.get(),
            failures: self.failures.get(),
        }
    }
}

/// One request to a mirror, counted when it starts. One that is dropped before it ends (the
/// fetcher's `request_timeout` cut it off: a mirror that trickles, which no read timeout sees)
/// counts as failed, so the retry goes to the origin.
struct Attempt<'a> {
    mirror: &'a Mirror,
    ended: bool,
}

impl<'a> Attempt<'a> {
    fn start(mirror: &'a Mirror) -> Attempt<'a> {
        mirror.requests.inc();
        Attempt {
            mirror,
            ended: false,
        }
    }

    fn succeeded(mut self) {
        self.ended = true;
        self.mirror.succeeded();
    }

    fn failed(mut self, reason: &str) {
        self.ended = true;
        self.mirror.failed(reason);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.mirror
                .failed("the request was cut off before it ended (fetch.request_timeout)");
        }
    }
}

/// What one origin that has mirrors was asked directly.
#[derive(Debug)]
pub(crate) struct OriginTraffic {
    origin: Origin,
    pub(crate) requests: Counter,
    pub(crate) bytes: Counter,
}

/// Every configured mirror, by origin, with their health and counters.
#[derive(Default)]
pub struct Mirrors {
    mirrors: Vec<Arc<Mirror>>,
    origins: Vec<Arc<OriginTraffic>>,
}

impl fmt::Debug for Mirrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.mirrors.iter().map(|m| m.spec.url.as_str()))
            .finish()
    }
}

impl Mirrors {
    /// The mirrors of `specs`, in their order.
    pub fn new(specs: &[MirrorSpec]) -> Result<Mirrors, MirrorError> {
        let mut mirrors = Mirrors::default();
        for spec in specs {
            mirrors.mirrors.push(Arc::new(Mirror::new(spec.clone())?));
            if !mirrors.origins.iter().any(|o| o.origin == spec.origin) {
                mirrors.origins.push(Arc::new(OriginTraffic {
                    origin: spec.origin.clone(),
                    requests: Counter::default(),
                    bytes: Counter::default(),
                }));
            }
        }
        Ok(mirrors)
    }

    pub fn is_empty(&self) -> bool {
        self.mirrors.is_empty()
    }

    fn of(&self, origin: &Origin) -> Vec<Arc<Mirror>> {
        self.mirrors
            .iter()
            .filter(|m| &m.spec.origin == origin)
            .cloned()
            .collect()
    }

    fn traffic(&self, origin: &Origin) -> Option<Arc<OriginTraffic>> {
        self.origins.iter().find(|o| &o.origin == origin).cloned()
    }

    /// `store` (repository `repo` of `registry`) behind the registry's mirrors, if it has any.
    pub fn registry_store(
        &self,
        registry: &str,
        repo: &str,
        store: RegistryBlobStore,
    ) -> Result<Arc<dyn BlobStore>, RegistryError> {
        let origin = Origin::Registry(registry.to_string());
        let Some(traffic) = self.traffic(&origin) else {
            return Ok(Arc::new(store));
        };
        let mut via = Vec::new();
        for mirror in self.of(&origin) {
            if let MirrorClient::Registry(client) = &mirror.client {
                let store: Arc<dyn BlobStore> =
                    Arc::new(RegistryBlobStore::new(client.clone(), repo)?);
                via.push((mirror, store));
            }
        }
        Ok(Arc::new(MirroredStore::new(Arc::new(store), traffic, via)))
    }

    /// `store` behind its bucket's mirrors, if it has any.
    pub fn s3_store(&self, store: S3Store) -> Arc<dyn BlobStore> {
        let origin = Origin::Bucket(store.location().bucket().to_string());
        let Some(traffic) = self.traffic(&origin) else {
            return Arc::new(store);
        };
        let via = self
            .of(&origin)
            .into_iter()
            .filter_map(|mirror| {
                let MirrorClient::S3(http) = &mirror.client else {
                    return None;
                };
                let mirrored: Arc<dyn BlobStore> = Arc::new(S3MirrorStore {
                    origin: store.clone(),
                    http: http.clone(),
                    url: mirror.spec.url.clone(),
                    timeout: mirror.spec.timeout,
                });
                Some((mirror, mirrored))
            })
            .collect();
        Arc::new(MirroredStore::new(Arc::new(store), traffic, via))
    }

    /// Each mirror's health and counters, then each mirrored origin's.
    pub fn snapshot(&self) -> (Vec<MirrorSnapshot>, Vec<OriginSnapshot>) {
        let mirrors = self.mirrors.iter().map(|m| m.snapshot()).collect();
        let origins = self
            .origins
            .iter()
            .map(|o| OriginSnapshot {
                origin: o.origin.clone(),
                requests: o.requests.get(),
                bytes: o.bytes.get(),
            })
            .collect();
        (mirrors, origins)
    }
}

/// A mirror as `lazyctl status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorSnapshot {
    pub url: String,
    pub origin: Origin,
    /// Its last request succeeded (or it was not asked yet).
    pub up: bool,
    /// How much longer it is skipped after its last failure.
    pub skipped_for_secs: f64,
    pub failures_in_a_row: u32,
    pub last_error: Option<String>,
    /// Requests sent to it (each try of a blob read).
    pub requests: u64,
    /// Bytes it delivered.
    pub bytes: u64,
    /// Requests it failed (an error, a timeout, a body cut short).
    pub failures: u64,
}

/// An origin with mirrors: what it was asked directly (when no mirror could answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginSnapshot {
    pub origin: Origin,
    pub requests: u64,
    pub bytes: u64,
}

/// A blob store behind its mirrors: see the module docs.
struct MirroredStore {
    origin: Arc<Direct>,
    via: Vec<(Arc<Mirror>, Arc<dyn BlobStore>)>,
    /// The smallest slice of the mirrors.
    alignment: Option<u64>,
}

impl MirroredStore {
    fn new(
        origin: Arc<dyn BlobStore>,
        traffic: Arc<OriginTraffic>,
        via: Vec<(Arc<Mirror>, Arc<dyn BlobStore>)>,
    ) -> MirroredStore {
        let alignment = via
            .iter()
            .map(|(m, _)| m.spec.slice)
            .filter(|&slice| slice > 0)
            .min();
        MirroredStore {
            origin: Arc::new(Direct {
                store: origin,
                traffic,
            }),
            via,
            alignment,
        }
    }
}

/// The origin of a [`MirroredStore`], asked directly, its traffic counted.
struct Direct {
    store: Arc<dyn BlobStore>,
    traffic: Arc<OriginTraffic>,
}

#[async_trait]
impl BlobStore for Direct {
    fn id(&self) -> BackendId {
        self.store.id()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        self.traffic.requests.inc();
        let bytes = self.store.read_range(digest, range).await?;
        self.traffic.bytes.add(bytes.len() as u64);
        Ok(bytes)
    }

    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        self.traffic.requests.inc();
        let mut counted = |bytes: &[u8]| {
            self.traffic.bytes.add(bytes.len() as u64);
            sink(bytes);
        };
        self.store.read_range_to(digest, range, &mut counted).await
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        self.traffic.requests.inc();
        let bytes = self.store.read_blob(digest, max_size).await?;
        self.traffic.bytes.add(bytes.len() as u64);
        Ok(bytes)
    }
}

#[async_trait]
impl BlobStore for MirroredStore {
    fn id(&self) -> BackendId {
        self.origin.id()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        collect_range(self, digest, range).await
    }

    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        let mut next = range.start;
        for (mirror, store) in &self.via {
            if next >= range.end {
                break;
            }
            if !mirror.usable(Instant::now()) {
                continue;
            }
            let attempt = Attempt::start(mirror);
            let asked = next..range.end;
            let outcome = {
                let mut counted = |bytes: &[u8]| {
                    next += bytes.len() as u64;
                    mirror.bytes.add(bytes.len() as u64);
                    sink(bytes);
                };
                store
                    .read_range_to(digest, asked.clone(), &mut counted)
                    .await
            };
            match outcome {
                Ok(()) if next == range.end => {
                    attempt.succeeded();
                    return Ok(());
                }
                Ok(()) => attempt.failed(&format!(
                    "blob {digest}: the body of {}..{} ended after {} bytes",
                    asked.start,
                    asked.end,
                    next - asked.start
                )),
                Err(e) => attempt.failed(&e.to_string()),
            }
        }
        if next >= range.end {
            return Ok(());
        }
        self.origin
            .read_range_to(digest, next..range.end, sink)
            .await
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        for (mirror, store) in &self.via {
            if !mirror.usable(Instant::now()) {
                continue;
            }
            let attempt = Attempt::start(mirror);
            match store.read_blob(digest, max_size).await {
                Ok(bytes) => {
                    mirror.bytes.add(bytes.len() as u64);
                    attempt.succeeded();
                    return Ok(bytes);
                }
                Err(e) => attempt.failed(&e.to_string()),
            }
        }
        self.origin.read_blob(digest, max_size).await
    }

    fn request_alignment(&self) -> Option<u64> {
        self.alignment
    }

    fn origin(&self) -> Option<Arc<dyn BlobStore>> {
        Some(self.origin.clone())
    }
}

/// An S3 bucket's blobs read through a mirror with GetObjects presigned for the origin.
struct S3MirrorStore {
    origin: S3Store,
    http: reqwest::Client,
    /// The mirror's URL.
    url: Url,
    timeout: Duration,
}

impl S3MirrorStore {
    fn error(&self, digest: &str, reason: String) -> BlobError {
        BlobError::Unavailable {
            store: self.origin.id(),
            digest: digest.to_string(),
            reason: format!("mirror {}: {reason}", self.url),
        }
    }

    /// Sends a GET of blob `digest` (bytes `range`, or all of it) to the mirror.
    async fn get(
        &self,
        digest: &str,
        range: Option<&Range<u64>>,
    ) -> Result<reqwest::Response, BlobError> {
        let key = self.origin.location().blob_key(digest)?;
        let config = PresigningConfig::expires_in(PRESIGNED_FOR)
            .map_err(|e| self.error(digest, format!("cannot presign: {e}")))?;
        let presigned = self
            .origin
            .client()
            .get_object()
            .bucket(self.origin.location().bucket())
            .key(&key)
            .presigned(config)
            .await
            .map_err(|e| {
                self.error(
                    digest,
                    format!("cannot presign the GET: {}", error_chain(&e)),
                )
            })?;
        let signed = Url::parse(presigned.uri())
            .map_err(|e| self.error(digest, format!("presigned URL: {e}")))?;
        let mut url = self.url.clone();
        url.set_path(signed.path());
        url.set_query(signed.query());
        let mut request = self.http.get(url);
        for (name, value) in presigned.headers() {
            if !name.eq_ignore_ascii_case("host") {
                request = request.header(name, value);
            }
        }
        if let Some(range) = range {
            request = request.header(RANGE, format!("bytes={}-{}", range.start, range.end - 1));
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport(digest, e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let store = self.origin.id();
        let digest = digest.to_string();
        let reason = format!("mirror {} answered {status}", self.url);
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        Err(match (status, retry_after) {
            (StatusCode::NOT_FOUND, _) => BlobError::NotFound { store, digest },
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => BlobError::Denied {
                store,
                digest,
                reason,
            },
            (
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE,
                Some(retry_after),
            ) => BlobError::Throttled {
                store,
                digest,
                reason,
                retry_after,
            },
            (s, _) if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                BlobError::Unavailable {
                    store,
                    digest,
                    reason,
                }
            }
            _ => BlobError::Invalid {
                store,
                digest,
                reason,
            },
        })
    }

    fn transport(&self, digest: &str, mut e: reqwest::Error) -> BlobError {
        // The URL in reqwest's error carries the presigned query: a credential for a while.
        if let Some(url) = e.url_mut() {
            url.set_query(None);
        }
        if e.is_timeout() {
            BlobError::Timeout {
                store: self.origin.id(),
                digest: digest.to_string(),
                after: self.timeout,
            }
        } else {
            self.error(digest, error_chain(&e))
        }
    }
}

#[async_trait]
impl BlobStore for S3MirrorStore {
    fn id(&self) -> BackendId {
        self.origin.id()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        collect_range(self, digest, range).await
    }

    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        if range.start > range.end {
            return Err(BlobError::Invalid {
                store: self.origin.id(),
                digest: digest.to_string(),
                reason: format!("range {}..{} is reversed", range.start, range.end),
            });
        }
        if range.is_empty() {
            return Ok(());
        }
        let mut response = self.get(digest, Some(&range)).await?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(self.error(
                digest,
                format!("answered {} to a range request, not 206", response.status()),
            ));
        }
        let span = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::registry::parse_content_range);
        match span {
            Some((first, last, _)) if first == range.start && last + 1 == range.end => {}
            _ => {
                return Err(self.error(
                    digest,
                    format!(
                        "answered a Content-Range other than bytes {}-{}",
                        range.start,
                        range.end - 1
                    ),
                ))
            }
        }
        let want = range.end - range.start;
        let mut received = 0u64;
        while let Some(piece) = response
            .chunk()
            .await
            .map_err(|e| self.transport(digest, e))?
        {
            let take = (piece.len() as u64).min(want - received) as usize;
            received += take as u64;
            sink(&piece[..take]);
            if take < piece.len() {
                return Err(self.error(digest, format!("sent more than {want} bytes")));
            }
        }
        Ok(())
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        let mut response = self.get(digest, None).await?;
        let mut out = Vec::new();
        while let Some(piece) = response
            .chunk()
            .await
            .map_err(|e| self.transport(digest, e))?
        {
            if (out.len() + piece.len()) as u64 > max_size {
                return Err(BlobError::Invalid {
                    store: self.origin.id(),
                    digest: digest.to_string(),
                    reason: format!("larger than {max_size} bytes"),
                });
            }
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }
}

/// A store behind one mirror, `mirror`, built the way [`Mirrors`] builds them, for tests here and
/// in the fetcher's; the mirror is skipped for `backoff` after a failure.
#[cfg(test)]
pub(crate) fn mirrored_for_tests(
    mirror: Arc<dyn BlobStore>,
    origin: Arc<dyn BlobStore>,
    backoff: Duration,
) -> (Arc<dyn BlobStore>, Arc<Mirror>, Arc<OriginTraffic>) {
    let spec = MirrorSpec {
        origin: Origin::Registry("origin.test:5000".into()),
        url: Url::parse("http://tier.test:5000").expect("a URL"),
        timeout: Duration::from_secs(1),
        slice: 1 << 20,
        backoff,
        max_backoff: backoff * 4,
    };
    let via = Arc::new(Mirror::new(spec).expect("a mirror"));
    let traffic = Arc::new(OriginTraffic {
        origin: via.spec.origin.clone(),
        requests: Counter::default(),
        bytes: Counter::default(),
    });
    let store = MirroredStore::new(origin, traffic.clone(), vec![(via.clone(), mirror)]);
    (Arc::new(store), via, traffic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobstore::{Faults, FaultyBlobStore, MemoryBlobStore};

    /// One blob of `len` distinct bytes, in two stores that both hold it.
    fn two_stores(len: usize) -> (String, Vec<u8>, Arc<FaultyBlobStore>, Arc<MemoryBlobStore>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mirror = MemoryBlobStore::new();
        let origin = MemoryBlobStore::new();
        let digest = mirror.insert(bytes.clone());
        origin.insert(bytes.clone());
        let mirror = Arc::new(FaultyBlobStore::new(Arc::new(mirror)));
        (digest, bytes, mirror, Arc::new(origin))
    }

    #[tokio::test]
    async fn a_mirror_that_answers_spares_the_origin() {
        let (digest, bytes, mirror, origin) = two_stores(4096);
        let (store, via, traffic) =
            mirrored_for_tests(mirror.clone(), origin.clone(), Duration::from_secs(1));
        assert_eq!(
            store.read_range(&digest, 100..3000).await.unwrap(),
            &bytes[100..3000]
        );
        assert_eq!(store.read_blob(&digest, 1 << 20).await.unwrap(), bytes);
        assert_eq!(origin.requests(), 0);
        let seen = via.snapshot();
        assert_eq!(
            (seen.requests, seen.bytes, seen.failures),
            (2, 2900 + 4096, 0)
        );
        assert!(seen.up);
        assert_eq!((traffic.requests.get(), traffic.bytes.get()), (0, 0));
        assert_eq!(store.request_alignment(), Some(1 << 20));
    }

    #[tokio::test]
    async fn a_failing_mirror_is_skipped_for_its_backoff_then_asked_again() {
        let (digest, bytes, mirror, origin) = two_stores(4096);
        let backoff = Duration::from_millis(200);
        let (store, via, traffic) = mirrored_for_tests(mirror.clone(), origin.clone(), backoff);
        mirror.set(Faults {
            down: true,
            ..Faults::default()
        });
        // Down: the origin answers, and the mirror is not asked again within its backoff.
        for _ in 0..3 {
            assert_eq!(
                store.read_range(&digest, 0..1000).await.unwrap(),
                &bytes[..1000]
            );
        }
        assert_eq!(mirror.requests(), 1);
        assert_eq!(origin.requests(), 3);
        let seen = via.snapshot();
        assert!(!seen.up && seen.skipped_for_secs > 0.0, "{seen:?}");
        assert!(seen.last_error.unwrap().contains("injected failure"));
        assert_eq!((traffic.requests.get(), traffic.bytes.get()), (3, 3000));
        // Still down after the backoff: asked once, then skipped for twice as long.
        tokio::time::sleep(backoff).await;
        store.read_range(&digest, 0..1000).await.unwrap();
        assert_eq!(mirror.requests(), 2);
        assert_eq!(via.snapshot().failures_in_a_row, 2);
        tokio::time::sleep(backoff).await;
        store.read_range(&digest, 0..1000).await.unwrap();
        assert_eq!(mirror.requests(), 2, "skipped for 2 x backoff");
        // Back: its first answer makes it healthy again.
        mirror.set(Faults::default());
        tokio::time::sleep(backoff).await;
        store.read_range(&digest, 0..1000).await.unwrap();
        assert_eq!((mirror.requests(), origin.requests()), (3, 5));
        let seen = via.snapshot();
        assert!(seen.up && seen.skipped_for_secs == 0.0, "{seen:?}");
        assert_eq!(seen.failures, 2);
    }

    #[tokio::test]
    async fn a_slow_mirror_is_a_failing_one() {
        let (digest, bytes, mirror, origin) = two_stores(4096);
        let (store, via, _) =
            mirrored_for_tests(mirror.clone(), origin.clone(), Duration::from_secs(1));
        // A store that answers with an error after its timeout, as the mirror's client does.
        mirror.set(Faults {
            fail_next: 1,
            delay: Duration::from_millis(50),
            ..Faults::default()
        });
        assert_eq!(store.read_blob(&digest, 1 << 20).await.unwrap(), bytes);
        assert_eq!((mirror.requests(), origin.requests()), (1, 1));
        assert!(!via.snapshot().up);
    }

    #[tokio::test]
    async fn a_request_cut_off_at_the_mirror_makes_the_next_go_to_the_origin() {
        let (digest, bytes, mirror, origin) = two_stores(4096);
        let (store, via, _) =
            mirrored_for_tests(mirror.clone(), origin.clone(), Duration::from_secs(1));
        mirror.set(Faults {
            delay: Duration::from_secs(5),
            ..Faults::default()
        });
        let cut = tokio::time::timeout(Duration::from_millis(50), store.read_range(&digest, 0..10));
        assert!(cut.await.is_err());
        assert_eq!(
            store.read_range(&digest, 0..10).await.unwrap(),
            &bytes[..10]
        );
        assert_eq!((mirror.requests(), origin.requests()), (1, 1));
        assert_eq!(via.snapshot().failures, 1);
    }

    #[tokio::test]
    async fn a_body_the_mirror_cut_short_is_finished_by_the_origin() {
        let (digest, bytes, mirror, origin) = two_stores(4096);
        let (store, via, traffic) =
            mirrored_for_tests(mirror.clone(), origin.clone(), Duration::from_secs(1));
        mirror.set(Faults {
            truncate: true,
            ..Faults::default()
        });
        let mut got = Vec::new();
        store
            .read_range_to(&digest, 1000..3000, &mut |b| got.extend_from_slice(b))
            .await
            .unwrap();
        assert_eq!(got, &bytes[1000..3000]);
        // The mirror sent the first half; the origin was asked for the rest only.
        assert_eq!(via.snapshot().bytes, 1000);
        assert_eq!((traffic.requests.get(), traffic.bytes.get()), (1, 1000));
        assert_eq!(via.snapshot().failures, 1);
    }

    #[tokio::test]
    async fn the_origin_store_is_there_to_bypass_the_mirrors() {
        let (digest, bytes, mirror, origin) = two_stores(64);
        let (store, via, traffic) =
            mirrored_for_tests(mirror.clone(), origin.clone(), Duration::from_secs(1));
        let direct = store.origin().expect("a mirrored store has an origin");
        assert_eq!(direct.read_range(&digest, 0..64).await.unwrap(), bytes);
        assert_eq!((mirror.requests(), via.snapshot().requests), (0, 0));
        assert_eq!((traffic.requests.get(), traffic.bytes.get()), (1, 64));
    }

    #[test]
    fn mirror_urls_name_a_host_and_nothing_else() {
        for good in [
            "http://tier:5000",
            "https://tier.example.com/",
            "http://10.0.0.2",
        ] {
            check_url(&Url::parse(good).unwrap()).unwrap();
        }
        for bad in [
            "ftp://tier",
            "http://tier/registry",
            "http://tier/?x=1",
            "http://user:pw@tier",
            "unix:/run/tier.sock",
        ] {
            assert!(check_url(&Url::parse(bad).unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn stores_of_origins_without_mirrors_are_left_alone() {
        let spec = MirrorSpec {
            origin: Origin::Registry("origin.test:5000".into()),
            url: Url::parse("http://tier.test:5000").unwrap(),
            timeout: Duration::from_secs(1),
            slice: 0,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
        };
        let mirrors = Mirrors::new(&[spec]).unwrap();
        let client = |host: &str| RegistryClient::new(host, ClientOptions::default()).unwrap();
        let other = RegistryBlobStore::new(client("other.test"), "library/x").unwrap();
        let plain = mirrors
            .registry_store("other.test", "library/x", other)
            .unwrap();
        assert!(plain.origin().is_none());
        let mirrored = RegistryBlobStore::new(client("origin.test:5000"), "library/x").unwrap();
        let mirrored = mirrors
            .registry_store("origin.test:5000", "library/x", mirrored)
            .unwrap();
        assert!(mirrored.origin().is_some());
        // A slice of 0 cuts nothing.
        assert_eq!(mirrored.request_alignment(), None);
        let (shown, origins) = mirrors.snapshot();
        assert_eq!(shown.len(), 1);
        assert_eq!(origins[0].origin.to_string(), "registry origin.test:5000");
    }
}
