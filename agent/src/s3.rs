//! S3 and S3-compatible stores: the [`BlobStore`] the fetcher reads lazy images from, and the
//! writes `lazyctl push` needs to put them there.
//!
//! **Layout.** An image at `s3://BUCKET/PREFIX` is
//!
//! ```text
//! PREFIX/blobs/sha256/<hex>   every blob (index, chunk data), named by its sha256
//! PREFIX/manifest.json        the image manifest, naming the blobs it needs
//! ```
//!
//! A push uploads every blob first and writes the manifest last, so a reader never sees a
//! manifest whose blobs are missing; a blob that is already there with the same size is not sent
//! again ([`S3Store::put_blob_file`]), so an interrupted push resumes cheaply.
//!
//! **Client.** [`S3Store::connect`] builds an `aws-sdk-s3` client from the AWS default chain
//! (`AWS_ACCESS_KEY_ID`/`AWS_PROFILE`/SSO/instance roles, `AWS_REGION`, `AWS_ENDPOINT_URL` and
//! `AWS_ENDPOINT_URL_S3`), with [`S3Options`] on top. The region falls back to `us-east-1`. When
//! an endpoint override is in effect (from the environment, a profile or the options) requests
//! are path-style (`http://host/bucket/key`), which S3-compatible stores expect. Request
//! checksums are computed and response checksums validated only when an operation requires it:
//! aws-sdk-s3 1.69 and later otherwise add checksum trailers that S3 stand-ins reject.
//!
//! **Timeouts and retries.** `connect_timeout` bounds the TCP/TLS connect; `read_timeout` bounds
//! each attempt until the response headers arrive and then each wait for the next piece of a body,
//! so a large range on a slow link is fine but a silent server is not. Uploads get `read_timeout`
//! plus one second per MiB sent ([`UPLOAD_FLOOR_RATE`]). The SDK retries up to
//! `max_attempts` times; the fetcher passes 1 because it runs its own retries.
//!
//! **Errors.** Reads return [`BlobError`]: a missing object is `NotFound`, 403 `Denied`, a range
//! past the end `Invalid`, a timeout `Timeout`, connection failures, 5xx and throttling
//! `Unavailable` (`Throttled` with a `Retry-After`), and an object whose ETag is not the one the
//! caller expected `Changed`. Writes and the other calls return [`S3Error`], with the same
//! classes. Every message names the bucket and key and carries the SDK error's whole `source()` chain
//! ("dispatch failure: io error: ...: Connection refused"), not just "dispatch failure".

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_types::service_config::ServiceConfigKey;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::blobstore::{
    check_digest, parse_retry_after, too_large, BackendId, BlobError, BlobStore, ObjectChange,
};
use crate::error::error_chain;

/// Region used when neither the options, the environment nor a profile names one.
const DEFAULT_REGION: &str = "us-east-1";
/// Files larger than this are uploaded in parts: below it one PUT is simpler and as fast.
pub const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// Smallest part of a multipart upload. S3 requires 5 MiB; 16 MiB keeps the request count low
/// and still lets [`PARALLEL_PARTS`] parts in flight fill a fast link.
pub const MIN_PART_SIZE: u64 = 16 << 20;
/// S3 allows at most 10,000 parts per upload; larger files get larger parts.
const MAX_PARTS: u64 = 10_000;
/// Parts uploaded at once. Each streams from the file, so memory use does not grow with this.
const PARALLEL_PARTS: usize = 4;
/// Slowest upload rate we wait for, in bytes per second: an upload attempt may take
/// `read_timeout` plus one second per MiB (16 s for a 16 MiB part) before it counts as timed out.
pub const UPLOAD_FLOOR_RATE: u64 = 1 << 20;
/// Initial buffer for a body; larger bodies grow as bytes actually arrive, so a huge range or
/// a lying `Content-Length` cannot make us allocate before the server sends anything.
const MAX_PREALLOCATION: u64 = 8 << 20;
/// Name of the manifest object under the prefix.
const MANIFEST_NAME: &str = "manifest.json";
/// Name of the image's hot-chunk profile under its prefix.
const PROFILE_NAME: &str = "profile.json";
/// How a bucket name may look. Lenient enough for legacy us-east-1 names (capitals,
/// underscores), strict enough to catch typos and URL syntax.
const BUCKET_RULE: &str = "a bucket name is 3-255 characters of [A-Za-z0-9._-], starting with a \
                           letter or digit";

/// Errors from S3 calls other than [`BlobStore`] reads, and from parsing a location.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("bad S3 location {input:?}: {reason}; expected s3://BUCKET[/PREFIX]")]
    BadLocation { input: String, reason: String },
    #[error("bad S3 endpoint URL {url:?}: {reason}")]
    BadEndpoint { url: String, reason: String },
    #[error("{url} not found")]
    NotFound { url: String },
    #[error("{url}: access denied: {reason}")]
    Denied { url: String, reason: String },
    /// A request that cannot succeed as asked: the bucket is missing, the object too large, the
    /// answer malformed.
    #[error("{url}: {reason}")]
    Invalid { url: String, reason: String },
    /// The store could not be reached or failed in a way that may pass.
    #[error("{url}: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("{url}: no answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("reading {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl S3Error {
    /// True when retrying the same call cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            S3Error::BadLocation { .. }
            | S3Error::BadEndpoint { .. }
            | S3Error::NotFound { .. }
            | S3Error::Denied { .. }
            | S3Error::Invalid { .. }
            | S3Error::File { .. } => true,
            S3Error::Unavailable { .. } | S3Error::Timeout { .. } => false,
        }
    }
}

/// Where an image lives in S3: a bucket and a key prefix (possibly empty, never with a leading
/// or trailing `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    bucket: String,
    prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET`, `s3://BUCKET/` or `s3://BUCKET/some/prefix[/]`.
    pub fn parse(input: &str) -> Result<S3Location, S3Error> {
        let bad = |reason: &str| S3Error::BadLocation {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let rest = input
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket name is empty"));
        }
        let bucket_ok = (3..=255).contains(&bucket.len())
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !bucket_ok {
            return Err(bad(&format!(
                "bucket {bucket:?} is not valid: {BUCKET_RULE}"
            )));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            if prefix.split('/').any(|segment| segment.is_empty()) {
                return Err(bad("the prefix has an empty path segment (`//`)"));
            }
            if prefix
                .split('/')
                .any(|segment| segment == "." || segment == "..")
            {
                return Err(bad("the prefix has a `.` or `..` segment"));
            }
            if prefix.chars().any(char::is_control) {
                return Err(bad("the prefix has a control character"));
            }
            // S3 keys are at most 1024 bytes; leave room for `/blobs/sha256/<64 hex>`.
            if prefix.len() > 900 {
                return Err(bad("the prefix is longer than 900 bytes"));
            }
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix, without leading or trailing `/`; empty for the bucket's root.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/blobs/sha256/<hex>` for a `sha256:<hex>` digest.
    pub fn blob_key(&self, digest: &str) -> Result<String, BlobError> {
        let hex = check_digest(&self.id(), digest)?;
        Ok(self.key(&format!("blobs/sha256/{hex}")))
    }

    /// The backend this location is, for the fetcher, logs and errors.
    pub fn id(&self) -> BackendId {
        BackendId::s3(&self.bucket, &self.prefix)
    }

    /// `<prefix>/manifest.json`.
    pub fn manifest_key(&self) -> String {
        self.key(MANIFEST_NAME)
    }

    /// `<prefix>/profile.json`: the image's hot-chunk profile (see `crate::profile`).
    pub fn profile_key(&self) -> String {
        self.key(PROFILE_NAME)
    }

    /// `s3://bucket/key`, for messages.
    pub fn object_url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// How to reach the store; everything not set here comes from the AWS default chain.
#[derive(Clone)]
pub struct S3Options {
    /// Limit on establishing a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Limit on each attempt until the response headers arrive, and on each wait for more of a
    /// response body.
    pub read_timeout: Duration,
    /// Attempts the SDK makes per request (1 = no SDK retries; the fetcher retries itself).
    pub max_attempts: u32,
    /// Endpoint of an S3-compatible store, e.g. `http://127.0.0.1:9000`; overrides
    /// `AWS_ENDPOINT_URL[_S3]`. Any endpoint override switches to path-style requests.
    pub endpoint_url: Option<String>,
    /// Region; overrides `AWS_REGION` and profiles.
    pub region: Option<String>,
    /// Static `(access key id, secret access key)`, overriding the credential chain (tests,
    /// S3-compatible stores).
    pub credentials: Option<(String, String)>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            max_attempts: 3,
            endpoint_url: None,
            region: None,
            credentials: None,
        }
    }
}

impl fmt::Debug for S3Options {
    // By hand so that the secret key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "<redacted>")),
            )
            .finish()
    }
}

/// What [`S3Store::put_blob_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobUpload {
    /// The blob was already there with the same size; nothing was sent.
    AlreadyPresent,
    Uploaded,
}

/// One object of a listing ([`S3Store::list_objects`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// The whole key, bucket-relative.
    pub key: String,
    pub size: u64,
    /// `LastModified` as seconds and nanoseconds since the epoch.
    pub last_modified: Option<(i64, u32)>,
    /// The ETag as S3 gives it (with its quotes).
    pub etag: Option<String>,
}

/// The body of a GET of a whole object ([`S3Store::open_object`]), read piece by piece.
pub struct ObjectBody {
    body: ByteStream,
    read_timeout: Duration,
    read: u64,
    url: String,
    /// `Content-Length` of the answer.
    pub len: Option<u64>,
    /// The ETag of the object the answer comes from.
    pub etag: Option<String>,
}

impl ObjectBody {
    /// The next piece of the body, `None` at its end; waits at most the read timeout for it.
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, S3Error> {
        let piece = tokio::time::timeout(self.read_timeout, self.body.next())
            .await
            .map_err(|_| S3Error::Timeout {
                url: self.url.clone(),
                after: self.read_timeout,
            })?;
        match piece {
            None => Ok(None),
            Some(Ok(bytes)) => {
                self.read += bytes.len() as u64;
                Ok(Some(bytes))
            }
            Some(Err(e)) => Err(S3Error::Unavailable {
                url: self.url.clone(),
                reason: format!(
                    "GET: body broke off after {} bytes: {}",
                    self.read,
                    error_chain(&e)
                ),
            }),
        }
    }
}

/// An ETag without the quotes S3 puts around it (some stores omit them).
fn unquote(etag: &str) -> &str {
    etag.trim_matches('"')
}

/// An image location in S3 with a client for it. Cheap to clone (the client is shared).
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    location: S3Location,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds a client for `location`. Nothing is sent yet: a wrong bucket or bad credentials
    /// show up on the first request.
    pub async fn connect(location: S3Location, opts: &S3Options) -> Result<S3Store, S3Error> {
        if let Some(url) = &opts.endpoint_url {
            check_endpoint_url(url)?;
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(attempt_timeouts(opts.connect_timeout, opts.read_timeout))
            .retry_config(RetryConfig::standard().with_max_attempts(opts.max_attempts.max(1)))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        loader = match &opts.region {
            Some(region) => loader.region(Region::new(region.clone())),
            None => loader.region(
                RegionProviderChain::default_provider()
                    .or_else(Region::from_static(DEFAULT_REGION)),
            ),
        };
        if let Some(url) = &opts.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some((id, secret)) = &opts.credentials {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret,
                None,
                None,
                "lazy-s3-options",
            ));
        }
        let sdk = loader.load().await;
        // Same precedence as the SDK: options, then AWS_ENDPOINT_URL_S3 (or the profile's
        // `[services]` entry), then AWS_ENDPOINT_URL.
        let endpoint = opts
            .endpoint_url
            .clone()
            .or_else(|| {
                let key = ServiceConfigKey::builder()
                    .service_id("S3")
                    .env("AWS_ENDPOINT_URL")
                    .profile("endpoint_url")
                    .build()
                    .ok()?;
                sdk.service_config()?.load_config(key)
            })
            .or_else(|| sdk.endpoint_url().map(str::to_string));
        let mut config = aws_sdk_s3::config::Builder::from(&sdk);
        if endpoint.is_some() {
            config = config.force_path_style(true);
        }
        debug!(
            location = %location,
            endpoint = endpoint.as_deref().unwrap_or("AWS"),
            region = sdk.region().map(|r| r.as_ref()).unwrap_or("?"),
            "S3 client ready"
        );
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            location,
            connect_timeout: opts.connect_timeout,
            read_timeout: opts.read_timeout,
        })
    }

    pub fn location(&self) -> &S3Location {
        &self.location
    }

    /// The SDK client, for calls this module does not wrap (listing a prefix, say).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The whole object `key` (bucket-relative, prefix included), `None` if it does not exist,
    /// an error if it is larger than `max_size` bytes.
    pub async fn get_object(&self, key: &str, max_size: u64) -> Result<Option<Vec<u8>>, S3Error> {
        let url = self.location.object_url(key);
        match self.get_whole(key, max_size).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Failure::NotFound) => Ok(None),
            Err(failure) => Err(failure.into_s3_error(url)),
        }
    }

    /// The size of object `key`, `None` if it does not exist.
    pub async fn head_object(&self, key: &str) -> Result<Option<u64>, S3Error> {
        let url = self.location.object_url(key);
        let result = self
            .client
            .head_object()
            .bucket(&self.location.bucket)
            .key(key)
            .send()
            .await;
        match result {
            Ok(head) => content_length(head.content_length())
                .map(Some)
                .ok_or_else(|| S3Error::Invalid {
                    url,
                    reason: "HEAD answer has no Content-Length".into(),
                }),
            Err(e) => match self.classify("HEAD", self.read_timeout, &e) {
                Failure::NotFound => Ok(None),
                failure => Err(failure.into_s3_error(url)),
            },
        }
    }

    /// Writes `bytes` to object `key` (bucket-relative) in one PUT.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), S3Error> {
        let len = bytes.len() as u64;
        self.put_body(key, ByteStream::from(bytes), len).await
    }

    /// Uploads file `path` to object `key` (bucket-relative): one PUT up to
    /// [`MULTIPART_THRESHOLD`], above it a multipart upload of [`MIN_PART_SIZE`] (or larger)
    /// parts, four at a time. A failed multipart upload is aborted so that its parts do not linger (and cost).
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), S3Error> {
        let file_error = |source| S3Error::File {
            path: path.to_path_buf(),
            source,
        };
        let size = tokio::fs::metadata(path).await.map_err(file_error)?.len();
        if size > MULTIPART_THRESHOLD {
            return self.put_multipart(key, path, size).await;
        }
        let body = file_body(path, 0, size).await?;
        self.put_body(key, body, size).await
    }

    /// Uploads file `path` as blob `digest`, unless a blob of that name and size is already
    /// there. The caller vouches that the file's sha256 is `digest`; it is not hashed again.
    pub async fn put_blob_file(&self, digest: &str, path: &Path) -> Result<BlobUpload, S3Error> {
        let key = self
            .location
            .blob_key(digest)
            .map_err(|e| S3Error::Invalid {
                url: self.location.to_string(),
                reason: e.to_string(),
            })?;
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| S3Error::File {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if self.head_object(&key).await? == Some(size) {
            debug!(blob = digest, size, "blob already in S3, not uploading");
            return Ok(BlobUpload::AlreadyPresent);
        }
        self.put_file(&key, path).await?;
        Ok(BlobUpload::Uploaded)
    }

    async fn put_body(&self, key: &str, body: ByteStream, len: u64) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.location.bucket)
            .key(key)
            .content_length(len as i64)
            .body(body)
            .customize()
            .config_override(self.upload_config(len))
            .send()
            .await
            .map_err(|e| {
                self.classify("PUT", self.upload_timeout(len), &e)
                    .into_s3_error(self.location.object_url(key))
            })?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str, path: &Path, size: u64) -> Result<(), S3Error> {
        let url = self.location.object_url(key);
        let part_size = part_size(size);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.location.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                self.classify("CreateMultipartUpload", self.read_timeout, &e)
                    .into_s3_error(url.clone())
            })?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| S3Error::Invalid {
                url: url.clone(),
                reason: "CreateMultipartUpload answer has no upload id".into(),
            })?
            .to_string();
        debug!(%url, size, part_size, "multipart upload started");
        let result = self
            .upload_parts_and_complete(key, path, size, part_size, &upload_id)
            .await;
        if result.is_err() {
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(&self.location.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = abort {
                warn!(%url, upload_id, error = %error_chain(&e),
                    "could not abort a failed multipart upload; its parts stay until a \
                     lifecycle rule removes them");
            }
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        upload_id: &str,
    ) -> Result<(), S3Error> {
        let url = self.location.object_url(key);
        let count = size.div_ceil(part_size);
        let mut tasks = JoinSet::new();
        let mut parts = Vec::with_capacity(count as usize);
        let mut next = 0;
        loop {
            while tasks.len() < PARALLEL_PARTS && next < count {
                let offset = next * part_size;
                let len = part_size.min(size - offset);
                // Part numbers are 1-based and at most MAX_PARTS, so they fit an i32.
                let number = (next + 1) as i32;
                let (this, key, path, upload_id) = (
                    self.clone(),
                    key.to_string(),
                    path.to_path_buf(),
                    upload_id.to_string(),
                );
                tasks.spawn(async move {
                    this.upload_part(&key, &path, &upload_id, number, offset, len)
                        .await
                });
                next += 1;
            }
            // Returning early drops `tasks`, which aborts the parts still in flight.
            match tasks.join_next().await {
                None => break,
                Some(Ok(part)) => parts.push(part?),
                Some(Err(e)) => {
                    return Err(S3Error::Unavailable {
                        url,
                        reason: format!("part upload task failed: {e}"),
                    })
                }
            }
        }
        parts.sort_by_key(|part| part.part_number());
        // S3 assembles the object before it answers, which takes longer the larger it is: give
        // it as long as sending it may take.
        self.client
            .complete_multipart_upload()
            .bucket(&self.location.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .customize()
            .config_override(self.upload_config(size))
            .send()
            .await
            .map_err(|e| {
                self.classify("CompleteMultipartUpload", self.upload_timeout(size), &e)
                    .into_s3_error(url.clone())
            })?;
        debug!(%url, size, "multipart upload complete");
        Ok(())
    }

    async fn upload_part(
        &self,
        key: &str,
        path: &Path,
        upload_id: &str,
        number: i32,
        offset: u64,
        len: u64,
    ) -> Result<CompletedPart, S3Error> {
        let url = self.location.object_url(key);
        let body = file_body(path, offset, len).await?;
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.location.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(len as i64)
            .body(body)
            .customize()
            .config_override(self.upload_config(len))
            .send()
            .await
            .map_err(|e| {
                self.classify(
                    &format!("UploadPart {number}"),
                    self.upload_timeout(len),
                    &e,
                )
                .into_s3_error(url.clone())
            })?;
        let e_tag = uploaded.e_tag().ok_or_else(|| S3Error::Invalid {
            url,
            reason: format!("UploadPart {number} answer has no ETag"),
        })?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .e_tag(e_tag)
            .build())
    }

    /// Every object whose key starts with `prefix` (bucket-relative; `""` for the whole bucket),
    /// in key order, following ListObjectsV2's continuation tokens to the end.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ListedObject>, S3Error> {
        self.list_objects_paged(prefix, None).await
    }

    /// [`S3Store::list_objects`] asking for pages of at most `page_size` keys (S3's default
    /// is 1000).
    async fn list_objects_paged(
        &self,
        prefix: &str,
        page_size: Option<i32>,
    ) -> Result<Vec<ListedObject>, S3Error> {
        let url = self.location.object_url(prefix);
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.location.bucket)
                .prefix(prefix)
                .set_max_keys(page_size)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| {
                    self.classify("ListObjectsV2", self.read_timeout, &e)
                        .into_s3_error(url.clone())
                })?;
            for object in page.contents() {
                let key = object.key().ok_or_else(|| S3Error::Invalid {
                    url: url.clone(),
                    reason: "ListObjectsV2 answer has an object without a key".into(),
                })?;
                let size = content_length(object.size()).ok_or_else(|| S3Error::Invalid {
                    url: self.location.object_url(key),
                    reason: "ListObjectsV2 answer has no size for it".into(),
                })?;
                objects.push(ListedObject {
                    key: key.to_string(),
                    size,
                    last_modified: object.last_modified().map(|t| (t.secs(), t.subsec_nanos())),
                    etag: object.e_tag().map(str::to_string),
                });
            }
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_string()),
                (Some(true), None) => {
                    return Err(S3Error::Invalid {
                        url,
                        reason: "ListObjectsV2 answer is truncated but has no continuation token"
                            .into(),
                    })
                }
                _ => break,
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Starts a GET of the whole object `key` (bucket-relative) and returns its body to read
    /// piece by piece, so an object of any size streams through a small buffer.
    pub async fn open_object(&self, key: &str) -> Result<ObjectBody, S3Error> {
        let url = self.location.object_url(key);
        let response = self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                self.classify("GET", self.read_timeout, &e)
                    .into_s3_error(url.clone())
            })?;
        Ok(ObjectBody {
            len: content_length(response.content_length()),
            etag: response.e_tag().map(str::to_string),
            body: response.body,
            read_timeout: self.read_timeout,
            read: 0,
            url,
        })
    }

    /// Bytes `range` of object `key` (bucket-relative), read as blob `digest` (for errors).
    /// With `etag`, an answer from an object whose ETag differs (it was replaced) is refused
    /// as [`BlobError::Changed`]; a missing object is [`BlobError::NotFound`].
    pub async fn read_object_range(
        &self,
        digest: &str,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Vec<u8>, BlobError> {
        let mut out = Vec::new();
        self.read_object_range_to(digest, key, range, etag, &mut |bytes| {
            out.extend_from_slice(bytes)
        })
        .await?;
        Ok(out)
    }

    /// [`S3Store::read_object_range`], passing the bytes to `sink` as they arrive (see
    /// `BlobStore::read_range_to`).
    pub async fn read_object_range_to(
        &self,
        digest: &str,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        if range.start > range.end {
            return Err(BlobError::Invalid {
                store: self.id(),
                digest: digest.to_string(),
                reason: format!("range {}..{} is reversed", range.start, range.end),
            });
        }
        if range.is_empty() {
            return Ok(());
        }
        self.get_range_to(key, range, etag, sink)
            .await
            .map_err(|failure| {
                failure.into_blob_error(self.id(), digest, &self.location.object_url(key))
            })
    }

    /// Attempt timeout for an upload of `len` bytes: the read timeout plus time to send the
    /// body at [`UPLOAD_FLOOR_RATE`].
    fn upload_timeout(&self, len: u64) -> Duration {
        self.read_timeout + Duration::from_secs(len.div_ceil(UPLOAD_FLOOR_RATE))
    }

    /// Client settings for an upload of `len` bytes: [`S3Store::upload_timeout`].
    fn upload_config(&self, len: u64) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::new().timeout_config(attempt_timeouts(
            self.connect_timeout,
            self.upload_timeout(len),
        ))
    }

    /// GETs object `key` whole, refusing more than `max_size` bytes.
    async fn get_whole(&self, key: &str, max_size: u64) -> Result<Vec<u8>, Failure> {
        let response = self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify("GET", self.read_timeout, &e))?;
        if let Some(len) = content_length(response.content_length()) {
            if len > max_size {
                return Err(Failure::TooLarge { len, max_size });
            }
        }
        let prealloc = content_length(response.content_length()).unwrap_or(0);
        self.read_body(response.body, max_size, prealloc)
            .await
            .map_err(|failure| match failure {
                Failure::TooLong { .. } => Failure::Invalid(format!(
                    "GET: body is longer than the {max_size}-byte limit"
                )),
                other => other,
            })
    }

    /// GETs exactly bytes `range` of object `key`, passing the body to `sink` piece by piece
    /// as it arrives; with `etag`, refuses (as [`Failure::Changed`]) an answer from an object
    /// whose ETag is another: the object was replaced since the ETag was read. Succeeds only
    /// when exactly the range was passed; on an error, what `sink` got stands (all of it bytes
    /// of the range, in order).
    async fn get_range_to(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), Failure> {
        let want = range.end - range.start;
        let response = self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(key)
            // HTTP ranges are inclusive.
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await
            .map_err(|e| self.classify("GET", self.read_timeout, &e))?;
        if let Some(expected) = etag {
            let actual = response.e_tag().unwrap_or("");
            if unquote(actual) != unquote(expected) {
                return Err(Failure::Changed {
                    etag: actual.to_string(),
                    indexed_etag: expected.to_string(),
                });
            }
        }
        let outside = |total: u64| {
            Failure::Invalid(format!(
                "GET: range {}..{} is outside the object's {total} bytes",
                range.start, range.end
            ))
        };
        // S3 answers a range that starts inside the object but ends past it with the part that
        // exists; `Content-Range: bytes a-b/TOTAL` tells that apart from a body cut short. An
        // answer naming other bytes (a proxy or cache that mixed up ranges) is refused here, by
        // name, rather than left to fail the chunks' checksums.
        if let Some(header) = response.content_range() {
            if let Some(total) = content_range_total(header) {
                if total < range.end {
                    return Err(outside(total));
                }
            }
            if content_range_bounds(header) != Some((range.start, range.end - 1)) {
                return Err(Failure::Invalid(format!(
                    "GET: asked for bytes {}-{}, the answer is {header:?}",
                    range.start,
                    range.end - 1
                )));
            }
        }
        if let Some(len) = content_length(response.content_length()) {
            if len > want {
                return Err(Failure::Invalid(format!(
                    "GET: answer to a {want}-byte range has {len} bytes (Range ignored?)"
                )));
            }
        }
        let received = self
            .stream_body(response.body, want, sink)
            .await
            .map_err(|failure| match failure {
                Failure::TooLong { limit } => Failure::Invalid(format!(
                    "GET: answer to a {limit}-byte range is longer (Range ignored?)"
                )),
                other => other,
            })?;
        if received < want {
            return Err(Failure::Unavailable(format!(
                "GET: body ended after {received} of {want} bytes"
            )));
        }
        Ok(())
    }

    /// Passes a response body of at most `limit` bytes to `sink` piece by piece, waiting at
    /// most `read_timeout` for each; returns its length.
    async fn stream_body(
        &self,
        mut body: ByteStream,
        limit: u64,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<u64, Failure> {
        let mut received = 0u64;
        loop {
            let piece = tokio::time::timeout(self.read_timeout, body.next())
                .await
                .map_err(|_| Failure::Timeout(self.read_timeout))?;
            match piece {
                None => return Ok(received),
                Some(Ok(bytes)) => {
                    if received + bytes.len() as u64 > limit {
                        return Err(Failure::TooLong { limit });
                    }
                    received += bytes.len() as u64;
                    sink(&bytes);
                }
                Some(Err(e)) => {
                    return Err(Failure::Unavailable(format!(
                        "GET: body broke off after {received} bytes: {}",
                        error_chain(&e)
                    )))
                }
            }
        }
    }

    /// Reads a response body of at most `limit` bytes, waiting at most `read_timeout` for each
    /// piece.
    async fn read_body(
        &self,
        body: ByteStream,
        limit: u64,
        prealloc: u64,
    ) -> Result<Vec<u8>, Failure> {
        let mut out = Vec::with_capacity(prealloc.min(limit).min(MAX_PREALLOCATION) as usize);
        self.stream_body(body, limit, &mut |bytes| out.extend_from_slice(bytes))
            .await?;
        Ok(out)
    }

    /// Sorts an SDK error into the [`BlobError`] classes. `op` names the request for messages;
    /// `attempt_timeout` is the limit the request ran under.
    fn classify<E>(&self, op: &str, attempt_timeout: Duration, err: &SdkError<E>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let cause = || format!("{op}: {}", error_chain(err));
        if let Some(credentials) = find_source::<CredentialsError>(err) {
            return match credentials {
                // Nothing in the chain had credentials, or a profile is broken: no retry helps.
                CredentialsError::CredentialsNotLoaded(_)
                | CredentialsError::InvalidConfiguration(_) => Failure::Denied(format!(
                    "{}; configure credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                     AWS_PROFILE, or an instance role)",
                    cause()
                )),
                // A provider (STS, SSO, instance metadata) failed or was slow: may pass.
                _ => Failure::Unavailable(cause()),
            };
        }
        match err {
            SdkError::TimeoutError(_) => Failure::Timeout(attempt_timeout),
            SdkError::DispatchFailure(failure) if failure.is_timeout() => {
                Failure::Timeout(self.connect_timeout)
            }
            // A request the HTTP client refused to send (a malformed endpoint, say).
            SdkError::DispatchFailure(failure) if failure.is_user() => Failure::Invalid(cause()),
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
                Failure::Unavailable(cause())
            }
            // Could not build or sign the request.
            SdkError::ConstructionFailure(_) => Failure::Invalid(cause()),
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                match (status, err.code()) {
                    (_, Some("NoSuchBucket")) => Failure::Invalid(format!(
                        "bucket {} does not exist: {}",
                        self.location.bucket,
                        cause()
                    )),
                    (_, Some("NoSuchKey" | "NotFound")) | (404, _) => Failure::NotFound,
                    (_, Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"))
                    | (401 | 403, _) => Failure::Denied(cause()),
                    (_, Some("InvalidRange")) | (416, _) => Failure::Invalid(cause()),
                    (_, Some("SlowDown" | "RequestTimeout" | "Throttling" | "InternalError"))
                    | (408 | 429, _)
                    | (500..=599, _) => match retry_after(service.raw()) {
                        Some(after) => Failure::Throttled(cause(), after),
                        None => Failure::Unavailable(cause()),
                    },
                    _ => Failure::Invalid(cause()),
                }
            }
            _ => Failure::Unavailable(cause()),
        }
    }
}

#[async_trait]
impl BlobStore for S3Store {
    fn id(&self) -> BackendId {
        self.location.id()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let key = self.location.blob_key(digest)?;
        self.read_object_range(digest, &key, range, None).await
    }

    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        let key = self.location.blob_key(digest)?;
        self.read_object_range_to(digest, &key, range, None, sink)
            .await
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        let key = self.location.blob_key(digest)?;
        self.get_whole(&key, max_size).await.map_err(|failure| {
            failure.into_blob_error(self.id(), digest, &self.location.object_url(&key))
        })
    }
}

/// Why a request failed, before it is dressed as a [`BlobError`] or an [`S3Error`]. Reasons
/// carry the operation and the cause; the object's URL is added when it is dressed.
#[derive(Debug)]
enum Failure {
    NotFound,
    Denied(String),
    Invalid(String),
    Unavailable(String),
    Timeout(Duration),
    /// The object is larger than the caller's cap.
    TooLarge {
        len: u64,
        max_size: u64,
    },
    /// The body went on past `limit` bytes (internal to reading; callers translate it).
    TooLong {
        limit: u64,
    },
    /// The object is not the one the caller expects: its ETag is `etag`, not `indexed_etag`.
    Changed {
        etag: String,
        indexed_etag: String,
    },
    /// A 429 or 503 asking to be asked again after this long (`Retry-After`).
    Throttled(String, Duration),
}

impl Failure {
    /// As a [`BlobError`] of blob `digest`, stored at `url`.
    fn into_blob_error(self, store: BackendId, digest: &str, url: &str) -> BlobError {
        let digest = digest.to_string();
        match self {
            Failure::NotFound => BlobError::NotFound { store, digest },
            Failure::Denied(reason) => BlobError::Denied {
                store,
                digest,
                reason: format!("{url}: {reason}"),
            },
            Failure::Invalid(reason) => BlobError::Invalid {
                store,
                digest,
                reason: format!("{url}: {reason}"),
            },
            Failure::Unavailable(reason) => BlobError::Unavailable {
                store,
                digest,
                reason: format!("{url}: {reason}"),
            },
            Failure::Throttled(reason, retry_after) => BlobError::Throttled {
                store,
                digest,
                reason: format!("{url}: {reason}"),
                retry_after,
            },
            Failure::Timeout(after) => BlobError::Timeout {
                store,
                digest,
                after,
            },
            Failure::TooLarge { len, max_size } => too_large(&store, &digest, len, max_size),
            Failure::TooLong { limit } => BlobError::Invalid {
                store,
                digest,
                reason: format!("body is longer than {limit} bytes"),
            },
            Failure::Changed { etag, indexed_etag } => BlobError::Changed {
                store,
                digest,
                change: Box::new(ObjectChange {
                    object: url.to_string(),
                    etag,
                    indexed_etag,
                }),
            },
        }
    }

    fn into_s3_error(self, url: String) -> S3Error {
        match self {
            Failure::NotFound => S3Error::NotFound { url },
            Failure::Denied(reason) => S3Error::Denied { url, reason },
            Failure::Invalid(reason) => S3Error::Invalid { url, reason },
            Failure::Unavailable(reason) | Failure::Throttled(reason, _) => {
                S3Error::Unavailable { url, reason }
            }
            Failure::Timeout(after) => S3Error::Timeout { url, after },
            Failure::TooLarge { len, max_size } => S3Error::Invalid {
                url,
                reason: format!("{len} bytes is over the {max_size}-byte limit"),
            },
            Failure::TooLong { limit } => S3Error::Invalid {
                url,
                reason: format!("body is longer than {limit} bytes"),
            },
            Failure::Changed { etag, indexed_etag } => S3Error::Invalid {
                url,
                reason: format!(
                    "changed: the object's ETag is now {etag}, it was {indexed_etag} when the \
                     image was indexed"
                ),
            },
        }
    }
}

/// The first error of type `T` in `err`'s source chain.
fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn attempt_timeouts(connect: Duration, attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(connect)
        .operation_attempt_timeout(attempt)
        .build()
}

fn check_endpoint_url(url: &str) -> Result<(), S3Error> {
    let bad = |reason: &str| S3Error::BadEndpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| bad("it must start with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(bad("it has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace"));
    }
    Ok(())
}

/// Part size for a multipart upload of `size` bytes: [`MIN_PART_SIZE`], or more when that would
/// take more than [`MAX_PARTS`] parts (rounded up to a whole MiB).
fn part_size(size: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    needed.max(MIN_PART_SIZE)
}

/// A request body of `len` bytes of `path` from `offset`, read from disk as it is sent (and
/// again if the SDK retries).
async fn file_body(path: &Path, offset: u64, len: u64) -> Result<ByteStream, S3Error> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .build()
        .await
        .map_err(|e| S3Error::File {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })
}

fn content_length(header: Option<i64>) -> Option<u64> {
    header.and_then(|len| u64::try_from(len).ok())
}

/// The wait a 429 or 503 answer asks for with `Retry-After`, if it does.
fn retry_after(response: &aws_sdk_s3::config::http::HttpResponse) -> Option<Duration> {
    match response.status().as_u16() {
        429 | 503 => parse_retry_after(response.headers().get("retry-after")?, SystemTime::now()),
        _ => None,
    }
}

/// The `TOTAL` of `Content-Range: bytes a-b/TOTAL`, if known.
fn content_range_total(header: &str) -> Option<u64> {
    header.rsplit_once('/')?.1.trim().parse().ok()
}

/// The `(a, b)` of `Content-Range: bytes a-b/TOTAL`.
fn content_range_bounds(header: &str) -> Option<(u64, u64)> {
    let range = header.trim().strip_prefix("bytes ")?.split_once('/')?.0;
    let (first, last) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_parses_bucket_and_prefix() {
        let loc = S3Location::parse("s3://images/team/debian").unwrap();
        assert_eq!(loc.bucket(), "images");
        assert_eq!(loc.prefix(), "team/debian");
        assert_eq!(loc.to_string(), "s3://images/team/debian");
        assert_eq!(loc.manifest_key(), "team/debian/manifest.json");
        let hex = "ab".repeat(32);
        assert_eq!(
            loc.blob_key(&format!("sha256:{hex}")).unwrap(),
            format!("team/debian/blobs/sha256/{hex}")
        );
        assert_eq!(
            loc.object_url(&loc.manifest_key()),
            "s3://images/team/debian/manifest.json"
        );

        let trailing = S3Location::parse("s3://images/team/debian/").unwrap();
        assert_eq!(trailing, loc);
    }

    #[test]
    fn location_with_empty_prefix_uses_the_bucket_root() {
        for input in ["s3://images", "s3://images/"] {
            let loc = S3Location::parse(input).unwrap();
            assert_eq!(loc.prefix(), "");
            assert_eq!(loc.to_string(), "s3://images");
            assert_eq!(loc.manifest_key(), "manifest.json");
            let hex = "0".repeat(64);
            assert_eq!(
                loc.blob_key(&format!("sha256:{hex}")).unwrap(),
                format!("blobs/sha256/{hex}")
            );
        }
    }

    #[test]
    fn location_rejects_bad_input_with_the_reason() {
        let cases = [
            ("images/debian", "does not start with s3://"),
            ("https://images/debian", "does not start with s3://"),
            ("s3://", "bucket name is empty"),
            ("s3:///debian", "bucket name is empty"),
            ("s3://ab/debian", "is not valid"),
            ("s3://my bucket/debian", "is not valid"),
            ("s3://user@images/debian", "is not valid"),
            ("s3://-images", "is not valid"),
            ("s3://images//debian", "empty path segment"),
            ("s3://images/a//b", "empty path segment"),
            ("s3://images/a/../b", "`.` or `..`"),
            ("s3://images/a\nb", "control character"),
        ];
        for (input, expected) in cases {
            let err = S3Location::parse(input).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(expected) && message.contains("s3://BUCKET[/PREFIX]"),
                "{input:?}: {message}"
            );
            assert!(err.is_permanent());
        }
        let long = format!("s3://images/{}", "a".repeat(901));
        assert!(S3Location::parse(&long).is_err());
    }

    #[test]
    fn blob_key_refuses_non_sha256_digests() {
        let loc = S3Location::parse("s3://images/p").unwrap();
        for digest in ["sha256:../../etc", "sha512:00", "sha256:ABCD"] {
            assert!(
                matches!(loc.blob_key(digest), Err(BlobError::Invalid { .. })),
                "{digest}"
            );
        }
    }

    #[test]
    fn part_size_stays_within_s3_part_count() {
        assert_eq!(part_size(80 << 20), MIN_PART_SIZE);
        assert_eq!(part_size(100 << 30), 16 << 20);
        let huge = 5u64 << 40; // S3's 5 TiB object limit
        let size = part_size(huge);
        assert!(huge.div_ceil(size) <= MAX_PARTS, "{size}");
        assert_eq!(size % (1 << 20), 0);
    }

    #[test]
    fn content_range_total_is_parsed() {
        assert_eq!(content_range_total("bytes 0-9/100"), Some(100));
        assert_eq!(content_range_total("bytes 0-9/*"), None);
        assert_eq!(content_range_total("garbage"), None);
        assert_eq!(content_range_bounds("bytes 0-9/100"), Some((0, 9)));
        assert_eq!(content_range_bounds("bytes 5-6/*"), Some((5, 6)));
        assert_eq!(content_range_bounds("bytes */100"), None);
        assert_eq!(content_range_bounds("garbage"), None);
    }

    #[test]
    fn endpoint_urls_are_checked() {
        check_endpoint_url("http://127.0.0.1:9000").unwrap();
        check_endpoint_url("https://s3.example.com/").unwrap();
        for bad in ["127.0.0.1:9000", "ftp://x", "http://", "http://a b"] {
            let err = check_endpoint_url(bad).unwrap_err();
            assert!(matches!(err, S3Error::BadEndpoint { .. }), "{bad}: {err}");
        }
    }

    /// A listing reads every page; a range GET with the ETag recorded at listing refuses the
    /// object once it is replaced, and a deleted one is not found.
    #[tokio::test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs moto_server (scripts/setup.sh installs it)"
    )]
    async fn listing_follows_every_page_and_ranges_check_the_etag() {
        let moto = lazy_tests::s3::MotoServer::start();
        moto.create_bucket("lazy-list");
        for key in ["m/a", "m/b/c", "m/d", "m/e", "m/f", "other/x"] {
            moto.put_object("lazy-list", key, key.as_bytes());
        }
        let opts = S3Options {
            endpoint_url: Some(moto.endpoint()),
            region: Some("us-east-1".into()),
            credentials: Some(("test".into(), "test".into())),
            max_attempts: 1,
            ..S3Options::default()
        };
        let location = S3Location::parse("s3://lazy-list").unwrap();
        let store = S3Store::connect(location, &opts).await.unwrap();
        let listed = store.list_objects_paged("m/", Some(2)).await.unwrap();
        let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["m/a", "m/b/c", "m/d", "m/e", "m/f"]);
        assert_eq!(listed[1].size, 5);
        assert!(listed[1].last_modified.is_some() && listed[1].etag.is_some());

        let mut body = store.open_object("m/b/c").await.unwrap();
        let mut bytes = Vec::new();
        while let Some(piece) = body.next().await.unwrap() {
            bytes.extend_from_slice(&piece);
        }
        assert_eq!(bytes, b"m/b/c");
        let digest = format!("sha256:{}", "0".repeat(64));
        let etag = listed[1].etag.clone();
        let got = store
            .read_object_range(&digest, "m/b/c", 2..4, etag.as_deref())
            .await
            .unwrap();
        assert_eq!(got, b"b/");
        moto.put_object("lazy-list", "m/b/c", b"M/B/C");
        let e = store
            .read_object_range(&digest, "m/b/c", 2..4, etag.as_deref())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("changed since it was indexed"),
            "{e}"
        );
        assert!(matches!(e, BlobError::Changed { .. }), "{e}");
        moto.delete_object("lazy-list", "m/b/c");
        let e = store
            .read_object_range(&digest, "m/b/c", 2..4, etag.as_deref())
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::NotFound { .. }), "{e}");
    }

    /// A part that cannot be read (here: the file is shorter than the size the upload
    /// started with, as when it shrinks during a push) fails the upload, and the multipart
    /// upload is aborted rather than left behind holding the parts already sent.
    #[tokio::test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs moto_server (scripts/setup.sh installs it)"
    )]
    async fn failed_multipart_upload_is_aborted() {
        let moto = lazy_tests::s3::MotoServer::start();
        moto.create_bucket("lazy-abort");
        let opts = S3Options {
            endpoint_url: Some(moto.endpoint()),
            region: Some("us-east-1".into()),
            credentials: Some(("test".into(), "test".into())),
            max_attempts: 1,
            ..S3Options::default()
        };
        let location = S3Location::parse("s3://lazy-abort/p").unwrap();
        let store = S3Store::connect(location, &opts).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrunk");
        std::fs::write(&path, vec![7u8; 40 << 20]).unwrap();

        let err = store
            .put_multipart("p/blob", &path, 80 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, S3Error::File { .. }), "{err}");
        let uploads = store
            .client()
            .list_multipart_uploads()
            .bucket("lazy-abort")
            .send()
            .await
            .unwrap();
        assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
        assert_eq!(store.head_object("p/blob").await.unwrap(), None);
    }

    #[test]
    fn options_debug_hides_the_secret_key() {
        let opts = S3Options {
            credentials: Some(("AKIDEXAMPLE".into(), "wJalrXUtnFEMI".into())),
            ..S3Options::default()
        };
        let shown = format!("{opts:?}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
    }
}
