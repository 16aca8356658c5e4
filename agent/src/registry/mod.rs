//! Client for the OCI distribution API: image references, manifests, whole blobs and byte ranges,
//! pushes, and referrers.
//!
//! The converter uses it to pull `docker://HOST/REPO:TAG` images and to push lazy images back
//! (`push.rs`: blobs and manifests; `referrers.rs`: recording and finding which lazy image was
//! made from which source manifest), and the lazy fetcher reads slices of blobs on demand
//! through [`RegistryBlobStore`] (`blob_store.rs`, over [`RegistryClient::get_blob_range`]).
//! It behaves the way docker and containerd do, so that a registry that works with them works
//! here:
//!
//! - **Auth.** Requests go out anonymously first. On a 401 the `WWW-Authenticate` challenge is
//!   parsed; for `Bearer` a token is fetched from the realm (with basic credentials when some are
//!   configured), cached per scope (`repository:REPO:pull`, or `repository:REPO:pull,push` for
//!   pushes) until shortly before it expires, and the request is retried once, upload body
//!   included. Once a registry has asked for a token, later requests for other scopes fetch one up
//!   front instead of taking a 401 first. A 401 on a request that carried a token (expired early,
//!   revoked) drops that token and fetches a new one. `Basic` challenges are answered with the
//!   configured credentials. Credentials and tokens only ever go to the registry's own origin.
//! - **Plain HTTP only for loopback.** Like docker's treatment of `localhost` registries, a client
//!   for `localhost`, `127.0.0.0/8` or `[::1]` tries https first and, if the connection or TLS
//!   handshake fails, falls back to http and remembers that choice. Every other host is https only.
//! - **Redirects** (a blob GET answered with 307 to an S3-like store) are followed with every
//!   header but `Authorization`, which is dropped whenever the redirect leaves the registry's
//!   origin (reqwest's policy does this; tests hold it to that). Signed query strings are cut from
//!   the URLs in errors.
//! - **Timeouts.** Downloads fail when the server goes quiet for `read_timeout`. Uploads cannot
//!   use reqwest's read timeout, which runs from the start of the request and would cut off any
//!   upload that takes longer; an upload fails instead when its body stops moving for
//!   `read_timeout` ([`RegistryError::Stalled`]).
//! - **Everything the server says is checked**: manifests and blobs against their sha256 digest,
//!   ranges against the requested length, bodies against size caps. Nothing here panics on a bad
//!   header or bad JSON; such input becomes a [`RegistryError`], and
//!   [`RegistryError::is_permanent`] tells the caller whether a retry can help.
//!
//! Only sha256 digests are supported, which is what every registry in use produces.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode, Url};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::blobstore::parse_retry_after;

mod blob_store;
mod push;
mod referrers;

pub use blob_store::RegistryBlobStore;
pub use push::{PushedBlob, PushedManifest};
pub use referrers::{referrers_tag, Referrer};

/// Media type of an OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of a Docker manifest list (the Docker equivalent of an OCI index).
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a Docker image manifest, schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Host that serves Docker Hub's registry API; `docker.io` and `index.docker.io` map to it.
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// How docker prints Docker Hub in image names.
const DOCKER_HUB_DISPLAY: &str = "docker.io";
/// Namespace of Docker Hub's official images (`ubuntu` is `library/ubuntu`).
const DOCKER_HUB_OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// Docker's limit on the length of a repository name.
const MAX_REPOSITORY_LEN: usize = 255;
/// Docker's limit on the length of a tag.
const MAX_TAG_LEN: usize = 128;
/// What a valid tag looks like, for error messages.
const TAG_RULE: &str = "a tag is 1-128 characters of [A-Za-z0-9_.-], not starting with . or -";

/// Manifests are a few KiB; containerd refuses anything over 4 MiB, and so do we, so that a
/// hostile or confused server cannot make us buffer an unbounded body.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Token responses carry one JWT-sized token; 1 MiB is far above any real one.
const MAX_TOKEN_RESPONSE_BYTES: usize = 1 << 20;
/// Enough of an error body to show the registry's `errors[0]` code and message.
const MAX_ERROR_BODY_BYTES: usize = 16 << 10;
/// An error body is a few hundred bytes; waiting longer than this for it only delays the error.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Initial buffer for a range read; larger ranges grow as bytes actually arrive, so a huge
/// requested range cannot allocate before the server sends anything.
const MAX_PREALLOCATION: usize = 8 << 20;
/// Write buffer for blob downloads: fewer, larger writes than the network's 8–16 KiB chunks.
const BLOB_WRITE_BUFFER: usize = 256 << 10;
/// Same redirect limit as reqwest's default and Go's http client, stated here on purpose.
const MAX_REDIRECTS: usize = 10;

/// Lifetime assumed for a token without `expires_in`, and the minimum the token spec allows.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Upper bound on a server-provided lifetime, so a hostile `expires_in` cannot overflow `Instant`.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// A token is replaced this long before it expires, so it does not expire in flight.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// Errors from the registry client. Each one names the image, blob or URL it is about.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: &'static str },
    #[error("invalid registry host {host:?}: expected HOST[:PORT]")]
    InvalidRegistry { host: String },
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },
    #[error("invalid range {start}..{end} for blob {digest}: start is past end")]
    InvalidRange {
        digest: String,
        start: u64,
        end: u64,
    },
    #[error("manifest unknown: {repo}{}{reference}", .reference.separator())]
    ManifestUnknown { repo: String, reference: Reference },
    #[error("blob unknown: {repo}@{digest}")]
    BlobUnknown { repo: String, digest: String },
    #[error("unauthorized for {repo}: {detail}")]
    Unauthorized { repo: String, detail: String },
    #[error("access denied to {repo} (http 403 from {url})")]
    Denied { repo: String, url: String },
    #[error("{kind} {repo}@{expected} digest mismatch: got {actual}")]
    DigestMismatch {
        kind: ContentKind,
        repo: String,
        expected: String,
        actual: String,
    },
    #[error("manifest {repo}{}{reference} is unusable: {reason}", .reference.separator())]
    InvalidManifest {
        repo: String,
        reference: Reference,
        reason: String,
    },
    #[error("range {start}..{end} of blob {repo}@{digest}: {reason}")]
    RangeMismatch {
        repo: String,
        digest: String,
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("range {start}..{end} of blob {repo}@{digest}: body ended after {received} bytes")]
    TruncatedBody {
        repo: String,
        digest: String,
        start: u64,
        end: u64,
        received: u64,
    },
    #[error("unsupported authentication challenge from {url}: {header:?}")]
    UnsupportedAuth { url: String, header: String },
    #[error("bad token response from {realm}: {reason}")]
    TokenResponse { realm: String, reason: String },
    #[error("http {status} from {url}{}", detail_suffix(.detail))]
    Http {
        status: u16,
        url: String,
        detail: String,
        /// The wait a 429 or 503 asked for with `Retry-After`.
        retry_after: Option<Duration>,
    },
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("blob {repo}@{digest} is larger than the {limit}-byte limit")]
    BlobTooLarge {
        repo: String,
        digest: String,
        limit: u64,
    },
    /// The server answered in a way the protocol does not allow: an upload without a `Location`,
    /// a referrers list that is not an index.
    #[error("unusable response from {url}: {reason}")]
    BadResponse { url: String, reason: String },
    /// An upload body made no progress (or the registry did not answer after it) for `after`.
    #[error("upload to {url} stalled: no progress for {after:?}")]
    Stalled { url: String, after: Duration },
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl RegistryError {
    /// True when retrying the same request cannot help: the thing is missing, access is refused,
    /// the input is malformed or the content is wrong. Timeouts, connection failures, truncated
    /// bodies, 5xx, 408 and 429 are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            RegistryError::InvalidReference { .. }
            | RegistryError::InvalidRegistry { .. }
            | RegistryError::InvalidDigest { .. }
            | RegistryError::InvalidRange { .. }
            | RegistryError::ManifestUnknown { .. }
            | RegistryError::BlobUnknown { .. }
            | RegistryError::Unauthorized { .. }
            | RegistryError::Denied { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::InvalidManifest { .. }
            | RegistryError::RangeMismatch { .. }
            | RegistryError::UnsupportedAuth { .. }
            | RegistryError::TokenResponse { .. }
            | RegistryError::BlobTooLarge { .. }
            | RegistryError::BadResponse { .. }
            | RegistryError::Io { .. }
            | RegistryError::ReadFile { .. } => true,
            RegistryError::TruncatedBody { .. } | RegistryError::Stalled { .. } => false,
            RegistryError::Http { status, .. } => {
                let status = *status;
                !(status >= 500
                    || status == StatusCode::REQUEST_TIMEOUT.as_u16()
                    || status == StatusCode::TOO_MANY_REQUESTS.as_u16())
            }
            // A bad URL or a redirect loop fails the same way every time; everything else
            // (connect, TLS handshake, timeout, reset mid-body) may not.
            RegistryError::Transport { source, .. } => source.is_builder() || source.is_redirect(),
        }
    }
}

/// The error and every cause under it, joined with `: `. reqwest keeps the useful part ("tcp
/// connect error: Connection refused") in `source()`, which `Display` alone does not show.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their cause in their own message; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What a [`RegistryError::DigestMismatch`] was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    Manifest,
    Blob,
}

impl fmt::Display for ContentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContentKind::Manifest => "manifest",
            ContentKind::Blob => "blob",
        })
    }
}

/// Which manifest of a repository: a tag or a content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    /// `sha256:<hex>`; fetching by digest verifies the manifest against it.
    Digest(String),
}

impl Reference {
    /// The tag or digest as it appears in a URL.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(s) | Reference::Digest(s) => s,
        }
    }

    /// What joins it to the repository name: `repo:tag`, `repo@digest`.
    fn separator(&self) -> char {
        match self {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        }
    }

    fn validate(&self) -> Result<(), RegistryError> {
        match self {
            Reference::Tag(tag) if valid_tag(tag) => Ok(()),
            Reference::Tag(tag) => Err(RegistryError::InvalidReference {
                input: tag.clone(),
                reason: TAG_RULE,
            }),
            Reference::Digest(digest) => validate_digest(digest),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed image name: `registry/repository:tag` or `registry/repository@digest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Host and optional port the API is served on; Docker Hub is `registry-1.docker.io`.
    pub registry: String,
    /// Repository path, e.g. `library/ubuntu`.
    pub repository: String,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses an image name the way docker does.
    ///
    /// - An optional `docker://` prefix is stripped.
    /// - The first path component is the registry if it contains `.` or `:` or is `localhost`;
    ///   otherwise the image is on Docker Hub (`registry-1.docker.io`), and a single-component
    ///   name is an official image (`ubuntu` is `library/ubuntu`).
    /// - Without a tag or digest the tag is `latest`. With both (`name:tag@sha256:...`) the
    ///   digest wins, as in docker.
    pub fn parse(input: &str) -> Result<Self, RegistryError> {
        let invalid = |reason| RegistryError::InvalidReference {
            input: input.to_string(),
            reason,
        };
        let s = input.strip_prefix("docker://").unwrap_or(input);
        if s.is_empty() {
            return Err(invalid("empty image name"));
        }
        let (name_and_tag, digest) = match s.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (s, None),
        };
        // A tag is the part after the last ':' of the last path component, so that the port in
        // `host:5000/repo` is not taken for one.
        let last_component = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_component..].rfind(':') {
            Some(i) => {
                let colon = last_component + i;
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            None => (name_and_tag, None),
        };

        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest.to_string())
            }
            _ => (DOCKER_HUB_DISPLAY, name.to_string()),
        };
        let registry = normalize_registry(registry);
        if !valid_registry(&registry) {
            return Err(invalid("the registry must be HOST[:PORT]"));
        }
        let repository = if registry == DOCKER_HUB_REGISTRY && !repository.contains('/') {
            format!("{DOCKER_HUB_OFFICIAL_NAMESPACE}/{repository}")
        } else {
            repository
        };
        if !valid_repository(&repository) {
            return Err(invalid(
                "the repository must be lowercase [a-z0-9] components separated by '/', \
                 joined within a component by '.', '_', '__' or dashes",
            ));
        }

        let reference = match (digest, tag) {
            (Some(digest), _) => {
                validate_digest(digest)
                    .map_err(|_| invalid("the digest must be sha256:<64 lowercase hex digits>"))?;
                Reference::Digest(digest.to_string())
            }
            (None, Some(tag)) => {
                if !valid_tag(tag) {
                    return Err(invalid(TAG_RULE));
                }
                Reference::Tag(tag.to_string())
            }
            (None, None) => Reference::Tag(DEFAULT_TAG.to_string()),
        };
        Ok(ImageRef {
            registry,
            repository,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    /// The canonical name, which parses back to the same `ImageRef`: `docker.io/library/ubuntu:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = if self.registry == DOCKER_HUB_REGISTRY {
            DOCKER_HUB_DISPLAY
        } else {
            &self.registry
        };
        write!(
            f,
            "{registry}/{}{}{}",
            self.repository,
            self.reference.separator(),
            self.reference
        )
    }
}

/// A username and password (or token) for a registry. `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How a [`RegistryClient`] connects and authenticates.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent to the token server (Bearer) or the registry (Basic) when it asks for them; see
    /// [`docker_config_credentials`] to use what `docker login` stored.
    pub credentials: Option<Credentials>,
    /// Limit on establishing a connection, TLS handshake included.
    pub connect_timeout: Duration,
    /// Limit on the wait for each read from the server, so a stalled transfer fails while a slow
    /// but moving one does not.
    pub read_timeout: Duration,
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            credentials: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            user_agent: concat!("lazy-image/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// A manifest or index exactly as the registry served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// One of the `MEDIA_TYPE_*` constants.
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Manifest {
    /// True for an OCI index or Docker manifest list, which point at per-platform manifests.
    pub fn is_index(&self) -> bool {
        self.media_type == MEDIA_TYPE_OCI_INDEX
            || self.media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    }
}

/// Client for one registry. Cloning is cheap and clones share connections and cached tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    /// `host[:port]`, normalised (Docker Hub is `registry-1.docker.io`).
    registry: String,
    http: reqwest::Client,
    /// The same client without a read timeout, for requests with a body (see the module docs).
    upload_http: reqwest::Client,
    connect_timeout: Duration,
    read_timeout: Duration,
    credentials: Option<Credentials>,
    /// `Authorization: Basic ...` for `credentials`, built once.
    basic_auth: Option<HeaderValue>,
    scheme: Mutex<Scheme>,
    auth: Mutex<AuthState>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registry", &self.inner.registry)
            .field("credentials", &self.inner.credentials)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Https,
    Http,
    /// A loopback registry not yet contacted: try https, fall back to http.
    HttpsThenHttp,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Https | Scheme::HttpsThenHttp => "https",
            Scheme::Http => "http",
        }
    }
}

#[derive(Default)]
struct AuthState {
    /// The last challenge answered successfully; lets requests for new scopes and expired tokens
    /// authenticate up front instead of taking a 401 first.
    challenge: Option<Challenge>,
    /// Bearer tokens by scope (`repository:REPO:pull`).
    tokens: HashMap<String, CachedToken>,
}

struct CachedToken {
    header: HeaderValue,
    /// When to stop using it: the server's lifetime less [`TOKEN_EXPIRY_MARGIN`].
    refresh_at: Instant,
}

/// A usable `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state is only ever replaced whole, so a panic elsewhere cannot leave it torn.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a request needs to be allowed to do, which decides the token scope it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Pull,
    /// Uploads, and the reads that go with them (a push asks for one token, not two).
    Push,
}

impl Access {
    fn scope(self, repo: &str) -> String {
        match self {
            Access::Pull => format!("repository:{repo}:pull"),
            Access::Push => format!("repository:{repo}:pull,push"),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push => "push",
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
enum Target {
    /// A path (and query) on the registry; the client picks http or https.
    Path(String),
    /// A URL the registry handed out: an upload `Location`, a `Link` to the next page.
    Url(Url),
}

/// A request body that can be sent again, so that a 401 retry or the http fallback resends it.
#[derive(Debug, Clone)]
enum Payload<'a> {
    Empty,
    Bytes(Bytes),
    /// Streamed from the file, which is reopened for each attempt.
    File(&'a Path),
}

/// One request, before authorization.
struct Call<'a> {
    method: Method,
    target: Target,
    headers: HeaderMap,
    payload: Payload<'a>,
}

impl<'a> Call<'a> {
    fn new(method: Method, target: Target) -> Self {
        Call {
            method,
            target,
            headers: HeaderMap::new(),
            payload: Payload::Empty,
        }
    }

    fn get(path: String, headers: HeaderMap) -> Self {
        Call {
            headers,
            ..Call::new(Method::GET, Target::Path(path))
        }
    }
}

impl RegistryClient {
    /// A client for `registry` (`host[:port]`; `docker.io` means Docker Hub).
    pub fn new(registry: &str, opts: ClientOptions) -> Result<Self, RegistryError> {
        let registry = normalize_registry(registry);
        if !valid_registry(&registry) {
            return Err(RegistryError::InvalidRegistry { host: registry });
        }
        let builder = || {
            reqwest::Client::builder()
                .user_agent(opts.user_agent.as_str())
                .connect_timeout(opts.connect_timeout)
                .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        };
        let build_error = |source| RegistryError::Transport {
            url: registry.clone(),
            source,
        };
        let http = builder()
            .read_timeout(opts.read_timeout)
            .build()
            .map_err(build_error)?;
        let upload_http = builder().build().map_err(build_error)?;
        let basic_auth = opts.credentials.as_ref().and_then(|c| {
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.username, c.password));
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        let scheme = if is_loopback_registry(&registry) {
            Scheme::HttpsThenHttp
        } else {
            Scheme::Https
        };
        Ok(RegistryClient {
            inner: Arc::new(ClientInner {
                registry,
                http,
                upload_http,
                connect_timeout: opts.connect_timeout,
                read_timeout: opts.read_timeout,
                credentials: opts.credentials,
                basic_auth,
                scheme: Mutex::new(scheme),
                auth: Mutex::new(AuthState::default()),
            }),
        })
    }

    /// The registry this client talks to, `host[:port]` (Docker Hub is `registry-1.docker.io`).
    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    /// Fetches a manifest or index, asking for the OCI and Docker v2 media types.
    ///
    /// The digest is the sha256 of the bytes; it must match `reference` when that is a digest
    /// and the `Docker-Content-Digest` header when the server sends one.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &Reference,
    ) -> Result<Manifest, RegistryError> {
        self.fetch_manifest(repo, reference, Access::Pull).await
    }

    async fn fetch_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        access: Access,
    ) -> Result<Manifest, RegistryError> {
        validate_repository(repo)?;
        reference.validate()?;
        let invalid = |reason: String| RegistryError::InvalidManifest {
            repo: repo.to_string(),
            reference: reference.clone(),
            reason,
        };

        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static(concat!(
                "application/vnd.oci.image.index.v1+json, ",
                "application/vnd.oci.image.manifest.v1+json, ",
                "application/vnd.docker.distribution.manifest.list.v2+json, ",
                "application/vnd.docker.distribution.manifest.v2+json"
            )),
        );
        let path = format!("/v2/{repo}/manifests/{reference}");
        let (mut resp, url) = self
            .request(repo, access, &Call::get(path, headers))
            .await?;
        if !resp.status().is_success() {
            return Err(match resp.status() {
                StatusCode::NOT_FOUND => RegistryError::ManifestUnknown {
                    repo: repo.to_string(),
                    reference: reference.clone(),
                },
                _ => status_error(repo, &url, resp).await,
            });
        }
        if resp
            .content_length()
            .is_some_and(|len| len > MAX_MANIFEST_BYTES as u64)
        {
            return Err(invalid(format!("larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let header_digest = header_str(resp.headers(), "docker-content-digest");
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str()).map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
        let bytes = read_capped(&mut resp, MAX_MANIFEST_BYTES, &url)
            .await?
            .ok_or_else(|| invalid(format!("larger than {MAX_MANIFEST_BYTES} bytes")))?;

        let digest = sha256_digest(&bytes);
        let claimed = match reference {
            Reference::Digest(expected) => Some(expected.clone()),
            Reference::Tag(_) => header_digest.filter(|d| d.starts_with("sha256:")),
        };
        if let Some(expected) = claimed {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    kind: ContentKind::Manifest,
                    repo: repo.to_string(),
                    expected,
                    actual: digest,
                });
            }
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes).map_err(invalid)?;
        Ok(Manifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Streams a blob into `dest` (created or truncated), hashing as it goes, and returns its
    /// size. If the content does not match `digest`, or the download fails, `dest` is removed.
    pub async fn get_blob_to_file(
        &self,
        repo: &str,
        digest: &str,
        dest: &Path,
    ) -> Result<u64, RegistryError> {
        validate_repository(repo)?;
        validate_digest(digest)?;
        let (resp, url) = self.get_blob(repo, digest, HeaderMap::new()).await?;
        if resp.status() != StatusCode::OK {
            return Err(blob_status_error(repo, digest, &url, resp).await);
        }
        let io_error = |source| RegistryError::Io {
            path: dest.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::create(dest).await.map_err(io_error)?;
        let mut writer = tokio::io::BufWriter::with_capacity(BLOB_WRITE_BUFFER, file);
        let outcome = async {
            let mut resp = resp;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = resp.chunk().await.map_err(transport(&url))? {
                hasher.update(&chunk);
                writer.write_all(&chunk).await.map_err(io_error)?;
                size += chunk.len() as u64;
            }
            writer.flush().await.map_err(io_error)?;
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != digest {
                return Err(RegistryError::DigestMismatch {
                    kind: ContentKind::Blob,
                    repo: repo.to_string(),
                    expected: digest.to_string(),
                    actual,
                });
            }
            Ok(size)
        }
        .await;
        if outcome.is_err() {
            drop(writer);
            if let Err(e) = tokio::fs::remove_file(dest).await {
                warn!(path = %dest.display(), error = %e, "could not remove failed blob download");
            }
        }
        outcome
    }

    /// Reads a whole blob into memory and verifies its digest, refusing a blob larger than
    /// `max_size` bytes: by its `Content-Length` before the body is read, and by counting while
    /// it arrives when the server does not say.
    pub async fn get_blob_bytes(
        &self,
        repo: &str,
        digest: &str,
        max_size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        validate_repository(repo)?;
        validate_digest(digest)?;
        let too_large = || RegistryError::BlobTooLarge {
            repo: repo.to_string(),
            digest: digest.to_string(),
            limit: max_size,
        };
        let (mut resp, url) = self.get_blob(repo, digest, HeaderMap::new()).await?;
        if resp.status() != StatusCode::OK {
            return Err(blob_status_error(repo, digest, &url, resp).await);
        }
        if resp.content_length().is_some_and(|len| len > max_size) {
            return Err(too_large());
        }
        let limit = usize::try_from(max_size).unwrap_or(usize::MAX);
        let bytes = read_capped(&mut resp, limit, &url)
            .await?
            .ok_or_else(too_large)?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                kind: ContentKind::Blob,
                repo: repo.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Reads bytes `range` of a blob with an HTTP Range request.
    ///
    /// A `206` must carry exactly the requested bytes. A server that ignores `Range` and answers
    /// `200` with the whole blob is tolerated: the body is read up to `range.end` and sliced. The
    /// bytes are not digest-checked (a range cannot be); callers verify their own chunk digests.
    pub async fn get_blob_range(
        &self,
        repo: &str,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Vec<u8>, RegistryError> {
        let want = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(want.min(MAX_PREALLOCATION));
        self.get_blob_range_to(repo, digest, range, &mut |bytes| {
            out.extend_from_slice(bytes)
        })
        .await?;
        Ok(out)
    }

    /// [`RegistryClient::get_blob_range`], passing the bytes to `sink` as the body brings
    /// them. Succeeds only when exactly the range was passed; on an error, what `sink` got
    /// stands (all of it bytes of the range, in order).
    pub async fn get_blob_range_to(
        &self,
        repo: &str,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), RegistryError> {
        validate_repository(repo)?;
        validate_digest(digest)?;
        let Range { start, end } = range;
        if start > end {
            return Err(RegistryError::InvalidRange {
                digest: digest.to_string(),
                start,
                end,
            });
        }
        if start == end {
            return Ok(());
        }
        let mismatch = |reason: String| RegistryError::RangeMismatch {
            repo: repo.to_string(),
            digest: digest.to_string(),
            start,
            end,
            reason,
        };
        let truncated = |received: u64| RegistryError::TruncatedBody {
            repo: repo.to_string(),
            digest: digest.to_string(),
            start,
            end,
            received,
        };
        let want = end - start;

        let mut headers = HeaderMap::new();
        let range_header = HeaderValue::from_str(&format!("bytes={start}-{}", end - 1))
            .map_err(|_| mismatch("cannot build the Range header".into()))?;
        headers.insert(RANGE, range_header);
        let (mut resp, url) = self.get_blob(repo, digest, headers).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                if let Some(value) = header_str(resp.headers(), CONTENT_RANGE.as_str()) {
                    let (first, last, total) = parse_content_range(&value)
                        .ok_or_else(|| mismatch(format!("unparseable Content-Range {value:?}")))?;
                    if first != start || last != end - 1 {
                        return Err(match total {
                            Some(total) if first == start && total <= end => {
                                mismatch(format!("the blob is only {total} bytes"))
                            }
                            _ => mismatch(format!("server sent bytes {first}-{last} instead")),
                        });
                    }
                }
                let mut received = 0u64;
                while let Some(chunk) = resp.chunk().await.map_err(transport(&url))? {
                    if received + chunk.len() as u64 > want {
                        return Err(mismatch(format!("server sent more than {want} bytes")));
                    }
                    received += chunk.len() as u64;
                    sink(&chunk);
                }
                if received != want {
                    return Err(truncated(received));
                }
                Ok(())
            }
            StatusCode::OK => {
                debug!(%url, "server ignored Range; reading the full body up to the range end");
                let mut pos = 0u64;
                while pos < end {
                    let Some(chunk) = resp.chunk().await.map_err(transport(&url))? else {
                        return Err(mismatch(format!("the blob is only {pos} bytes")));
                    };
                    let chunk_end = pos + chunk.len() as u64;
                    if chunk_end > start {
                        // Both offsets lie within `chunk`, so the casts cannot truncate.
                        let from = start.saturating_sub(pos) as usize;
                        let to = (end.min(chunk_end) - pos) as usize;
                        sink(&chunk[from..to]);
                    }
                    pos = chunk_end;
                }
                Ok(())
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let size = header_str(resp.headers(), CONTENT_RANGE.as_str()).and_then(|v| {
                    v.strip_prefix("bytes */")
                        .and_then(|n| n.parse::<u64>().ok())
                });
                Err(match size {
                    Some(size) => mismatch(format!("the blob is only {size} bytes")),
                    None => mismatch("range not satisfiable (http 416)".into()),
                })
            }
            _ => Err(blob_status_error(repo, digest, &url, resp).await),
        }
    }

    async fn get_blob(
        &self,
        repo: &str,
        digest: &str,
        headers: HeaderMap,
    ) -> Result<(Response, String), RegistryError> {
        let call = Call::get(format!("/v2/{repo}/blobs/{digest}"), headers);
        self.request(repo, Access::Pull, &call).await
    }

    /// Sends `call` with whatever authorization `access` to `repo` needs, answering one 401
    /// challenge (and resending the body). Returns the response and the URL to name in errors
    /// (the one we asked for, not a redirect target, whose query may hold a signature).
    async fn request(
        &self,
        repo: &str,
        access: Access,
        call: &Call<'_>,
    ) -> Result<(Response, String), RegistryError> {
        let scope = access.scope(repo);
        let auth = self.authorization_for(repo, access, &scope).await;
        let (resp, url) = self.send(call, auth.as_ref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok((resp, url));
        }

        let challenge_values: Vec<&str> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let challenge =
            pick_challenge(&challenge_values).ok_or_else(|| RegistryError::UnsupportedAuth {
                url: url.clone(),
                header: challenge_values.join(", "),
            })?;
        debug!(%url, ?challenge, "registry asked for authentication");
        lock(&self.inner.auth).tokens.remove(&scope);
        let header = match &challenge {
            Challenge::Basic if auth.is_some() => return Err(self.unauthorized(repo, access)),
            Challenge::Basic => self
                .inner
                .basic_auth
                .clone()
                .ok_or_else(|| self.unauthorized(repo, access))?,
            Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            } => {
                let mut scopes = vec![scope.clone()];
                scopes.extend(challenge_scope.iter().filter(|s| **s != scope).cloned());
                let token = self
                    .fetch_token(repo, access, realm, service.as_deref(), &scopes)
                    .await?;
                let header = token.header.clone();
                lock(&self.inner.auth).tokens.insert(scope.clone(), token);
                header
            }
        };
        // Remembered only once it has worked, so that a broken realm is not reused up front.
        lock(&self.inner.auth).challenge = Some(challenge);
        let (resp, url) = self.send(call, Some(&header)).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            lock(&self.inner.auth).tokens.remove(&scope);
            return Err(self.unauthorized(repo, access));
        }
        Ok((resp, url))
    }

    fn unauthorized(&self, repo: &str, access: Access) -> RegistryError {
        let verb = access.verb();
        let detail = match &self.inner.credentials {
            None => format!(
                "{verb} access denied: the repository does not exist or needs credentials \
                 (none configured; run docker login {})",
                self.inner.registry
            ),
            Some(c) => format!(
                "{verb} access denied: the repository does not exist or the credentials of {:?} \
                 do not grant access",
                c.username
            ),
        };
        RegistryError::Unauthorized {
            repo: repo.to_string(),
            detail,
        }
    }

    /// The `Authorization` header to send up front: a fresh cached token, a new token when the
    /// registry is known to want one, Basic credentials when it is known to want those.
    async fn authorization_for(
        &self,
        repo: &str,
        access: Access,
        scope: &str,
    ) -> Option<HeaderValue> {
        let challenge = {
            let state = lock(&self.inner.auth);
            if let Some(token) = state.tokens.get(scope) {
                if Instant::now() < token.refresh_at {
                    return Some(token.header.clone());
                }
            }
            state.challenge.clone()
        };
        match challenge {
            None => None,
            Some(Challenge::Basic) => self.inner.basic_auth.clone(),
            Some(Challenge::Bearer { realm, service, .. }) => {
                match self
                    .fetch_token(
                        repo,
                        access,
                        &realm,
                        service.as_deref(),
                        &[scope.to_string()],
                    )
                    .await
                {
                    Ok(token) => {
                        let header = token.header.clone();
                        lock(&self.inner.auth)
                            .tokens
                            .insert(scope.to_string(), token);
                        Some(header)
                    }
                    // Fetching up front only saves a round trip; the 401 path reports failures.
                    Err(e) => {
                        debug!(%realm, error = %e, "no token up front; asking anonymously");
                        None
                    }
                }
            }
        }
    }

    /// Gets a bearer token from `realm` (docker's token protocol).
    async fn fetch_token(
        &self,
        repo: &str,
        access: Access,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<CachedToken, RegistryError> {
        let bad = |reason: String| RegistryError::TokenResponse {
            realm: realm.to_string(),
            reason,
        };
        let mut url =
            Url::parse(realm).map_err(|e| bad(format!("realm is not a valid url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("realm must be an http or https url".into()));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
        }
        debug!(%realm, ?scopes, "fetching registry token");
        let send_credentials = credentials_may_go_to(&url, &self.inner.registry);
        let mut request = self.inner.http.get(url);
        if let Some(c) = &self.inner.credentials {
            if send_credentials {
                request = request.basic_auth(&c.username, Some(&c.password));
            } else {
                warn!(%realm, registry = %self.inner.registry, "not sending the registry's credentials to a token server over plain http on another host; asking anonymously");
            }
        }
        let mut resp = request.send().await.map_err(transport(realm))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(match &self.inner.credentials {
                None => self.unauthorized(repo, access),
                Some(c) => RegistryError::Unauthorized {
                    repo: repo.to_string(),
                    detail: format!(
                        "token server {realm} rejected the credentials of {:?} (http {})",
                        c.username,
                        status.as_u16()
                    ),
                },
            });
        }
        if !status.is_success() {
            return Err(status_error(repo, realm, resp).await);
        }
        let body = read_capped(&mut resp, MAX_TOKEN_RESPONSE_BYTES, realm)
            .await?
            .ok_or_else(|| bad(format!("larger than {MAX_TOKEN_RESPONSE_BYTES} bytes")))?;
        let (header, lifetime) = parse_token_response(&body).map_err(bad)?;
        Ok(CachedToken {
            header,
            refresh_at: Instant::now() + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN),
        })
    }

    /// Sends one request, choosing http or https as described in the module docs.
    async fn send(
        &self,
        call: &Call<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<(Response, String), RegistryError> {
        let path = match &call.target {
            Target::Path(path) => path,
            Target::Url(url) => {
                let auth = match auth {
                    Some(_) if !self.is_registry_origin(url) => {
                        debug!(%url, "not sending credentials to another origin");
                        None
                    }
                    auth => auth,
                };
                return self.send_to(url.clone(), call, auth).await;
            }
        };
        let scheme = *lock(&self.inner.scheme);
        match scheme {
            Scheme::Https | Scheme::Http => self.send_with(scheme, path, call, auth).await,
            Scheme::HttpsThenHttp => match self.send_with(Scheme::Https, path, call, auth).await {
                Ok(sent) => {
                    *lock(&self.inner.scheme) = Scheme::Https;
                    Ok(sent)
                }
                Err(RegistryError::Transport { url, source }) if source.is_connect() => {
                    debug!(%url, error = %source, "https failed on a loopback registry; trying http");
                    let sent = self.send_with(Scheme::Http, path, call, auth).await?;
                    *lock(&self.inner.scheme) = Scheme::Http;
                    Ok(sent)
                }
                Err(e) => Err(e),
            },
        }
    }

    async fn send_with(
        &self,
        scheme: Scheme,
        path: &str,
        call: &Call<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<(Response, String), RegistryError> {
        let text = format!("{}://{}{path}", scheme.as_str(), self.inner.registry);
        // The host and every piece of the path were validated, so this does not fail.
        let url = Url::parse(&text).map_err(|_| RegistryError::InvalidRegistry {
            host: self.inner.registry.clone(),
        })?;
        self.send_to(url, call, auth).await
    }

    async fn send_to(
        &self,
        url: Url,
        call: &Call<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<(Response, String), RegistryError> {
        // An upload location's query is the registry's opaque upload state: noise in an error.
        let mut shown = url.clone();
        if matches!(call.target, Target::Url(_)) {
            shown.set_query(None);
        }
        let shown = shown.to_string();
        let body = match &call.payload {
            Payload::Empty => None,
            Payload::Bytes(bytes) => Some(push::UploadBody::from_bytes(bytes.clone())),
            Payload::File(path) => Some(push::UploadBody::open(path).await?),
        };
        let http = match body {
            None => &self.inner.http,
            Some(_) => &self.inner.upload_http,
        };
        let mut request = http
            .request(call.method.clone(), url)
            .headers(call.headers.clone());
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let resp = match body {
            None => request.send().await.map_err(transport(&shown))?,
            Some(body) => {
                let progress = body.progress();
                let request = request
                    .header(CONTENT_LENGTH, body.len())
                    .body(reqwest::Body::wrap(body));
                let limits = push::StallLimits {
                    connect: self.inner.connect_timeout,
                    idle: self.inner.read_timeout,
                };
                push::send_watched(request, progress, limits, &shown).await?
            }
        };
        Ok((resp, shown))
    }

    /// True when `url` is on this registry's scheme, host and port, so that it may see the
    /// registry's credentials.
    fn is_registry_origin(&self, url: &Url) -> bool {
        let scheme = match *lock(&self.inner.scheme) {
            // Not contacted yet, so no URL can have come from it.
            Scheme::HttpsThenHttp => return false,
            scheme => scheme.as_str(),
        };
        let Some((host, port)) = split_host_port(&self.inner.registry) else {
            return false;
        };
        let port = match port {
            Some(port) => port.parse::<u16>().ok(),
            None if scheme == "https" => Some(443),
            None => Some(80),
        };
        let url_host = url.host_str().unwrap_or_default();
        let url_host = url_host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(url_host);
        url.scheme() == scheme
            && url_host.eq_ignore_ascii_case(host)
            && url.port_or_known_default() == port
            && url.username().is_empty()
    }
}

#[derive(Deserialize)]
struct TokenResponseBody {
    token: Option<String>,
    access_token: Option<String>,
    /// Usually an integer; kept loose so that a float or string does not fail the whole token.
    expires_in: Option<serde_json::Value>,
}

/// Parses a JSON object into `T`. Structs that derive `Deserialize` also take a JSON array of
/// their fields' values in order (`[null,null]` passed for a manifest, `["t"]` for a token
/// reply); no server sends one, so it is refused.
fn from_json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// A token server's reply: the `Authorization` value to send (`Bearer TOKEN`, from `token` or,
/// when that is missing or empty, `access_token`) and how long the token lives.
fn parse_token_response(body: &[u8]) -> Result<(HeaderValue, Duration), String> {
    let parsed: TokenResponseBody =
        from_json_object(body).map_err(|e| format!("not a token json: {e}"))?;
    let token = [parsed.token, parsed.access_token]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or("no token or access_token field")?;
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token is not a valid header value")?;
    header.set_sensitive(true);
    Ok((header, token_lifetime(parsed.expires_in.as_ref())))
}

/// How long a token lives: `expires_in` clamped to [60 s, 24 h], 60 s when absent or unreadable.
fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = expires_in.and_then(|v| {
        v.as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    });
    secs.map_or(MIN_TOKEN_LIFETIME, |s| {
        Duration::from_secs(s).clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME)
    })
}

/// Turns a non-success response into an error naming `repo` and `url`.
async fn status_error(repo: &str, url: &str, mut resp: Response) -> RegistryError {
    match resp.status() {
        StatusCode::UNAUTHORIZED => RegistryError::Unauthorized {
            repo: repo.to_string(),
            detail: format!("http 401 from {url}"),
        },
        StatusCode::FORBIDDEN => RegistryError::Denied {
            repo: repo.to_string(),
            url: url.to_string(),
        },
        status => {
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                    header_str(resp.headers(), RETRY_AFTER.as_str())
                        .and_then(|v| parse_retry_after(&v, SystemTime::now()))
                }
                _ => None,
            };
            let read = read_capped(&mut resp, MAX_ERROR_BODY_BYTES, url);
            let detail = match tokio::time::timeout(ERROR_BODY_TIMEOUT, read).await {
                Ok(Ok(Some(body))) => registry_error_detail(&body),
                Ok(Ok(None) | Err(_)) | Err(_) => String::new(),
            };
            RegistryError::Http {
                status: status.as_u16(),
                url: url.to_string(),
                detail,
                retry_after,
            }
        }
    }
}

async fn blob_status_error(repo: &str, digest: &str, url: &str, resp: Response) -> RegistryError {
    match resp.status() {
        StatusCode::NOT_FOUND => RegistryError::BlobUnknown {
            repo: repo.to_string(),
            digest: digest.to_string(),
        },
        _ => status_error(repo, url, resp).await,
    }
}

/// `CODE: message` from a registry error body (`{"errors":[{"code":..,"message":..}]}`), or "".
fn registry_error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => parsed
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::new(),
    }
}

fn transport(url: &str) -> impl FnOnce(reqwest::Error) -> RegistryError + '_ {
    move |mut source| {
        // reqwest names the URL it was at, which after a redirect may be a presigned storage
        // URL whose query is a credential. The path is enough to tell what failed.
        if let Some(at) = source.url_mut() {
            if at.query().is_some() {
                at.set_query(Some("redacted"));
            }
        }
        RegistryError::Transport {
            url: url.to_string(),
            source,
        }
    }
}

/// Reads the body if it is at most `limit` bytes; `None` if it is longer.
async fn read_capped(
    resp: &mut Response,
    limit: usize,
    url: &str,
) -> Result<Option<Vec<u8>>, RegistryError> {
    let mut body = Vec::with_capacity(limit.min(MAX_PREALLOCATION));
    while let Some(chunk) = resp.chunk().await.map_err(transport(url))? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

/// Parses `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let first = first.trim().parse().ok()?;
    let last = last.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    (first <= last).then_some((first, last, total))
}

/// The media type of a manifest: the Content-Type when it names a manifest type, otherwise the
/// body's `mediaType` field, otherwise its shape (`manifests` means an index). Rejects bodies
/// that are not JSON objects and media types this client does not handle.
fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Sniff {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
    }
    const SUPPORTED: [&str; 4] = [
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        MEDIA_TYPE_DOCKER_MANIFEST,
    ];
    let sniff: Sniff = from_json_object(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    let media_type = match content_type {
        Some(ct) if SUPPORTED.contains(&ct) => ct.to_string(),
        Some(ct) if ct.starts_with("application/vnd.") => ct.to_string(),
        _ => match (sniff.media_type, sniff.manifests) {
            (Some(mt), _) => mt,
            (None, Some(_)) => MEDIA_TYPE_OCI_INDEX.to_string(),
            (None, None) => MEDIA_TYPE_OCI_MANIFEST.to_string(),
        },
    };
    if SUPPORTED.contains(&media_type.as_str()) {
        Ok(media_type)
    } else {
        Err(format!(
            "unsupported media type {media_type:?}; expected an OCI or Docker v2 manifest or index"
        ))
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn validate_digest(digest: &str) -> Result<(), RegistryError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidDigest {
            digest: digest.to_string(),
        })
    }
}

fn validate_repository(repo: &str) -> Result<(), RegistryError> {
    if valid_repository(repo) {
        Ok(())
    } else {
        Err(RegistryError::InvalidReference {
            input: repo.to_string(),
            reason: "the repository must be lowercase [a-z0-9] components separated by '/'",
        })
    }
}

/// Docker's repository grammar: components of `[a-z0-9]+` joined by `.`, `_`, `__` or dashes,
/// separated by `/`, at most 255 characters.
fn valid_repository(repo: &str) -> bool {
    repo.len() <= MAX_REPOSITORY_LEN && repo.split('/').all(valid_path_component)
}

fn valid_path_component(component: &str) -> bool {
    let b = component.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !b.first().is_some_and(|&c| alnum(c)) || !b.last().is_some_and(|&c| alnum(c)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        if !(sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-')) {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// Maps Docker Hub's aliases to the host that serves its API.
fn normalize_registry(registry: &str) -> String {
    match registry {
        "docker.io" | "index.docker.io" | DOCKER_HUB_REGISTRY => DOCKER_HUB_REGISTRY.to_string(),
        other => other.to_string(),
    }
}

/// Splits `host[:port]` or `[v6]:port` into host and port text, without validating.
fn split_host_port(registry: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = registry.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => Some((host, Some(port))),
            None => Some((registry, None)),
        }
    }
}

fn valid_registry(registry: &str) -> bool {
    let Some((host, port)) = split_host_port(registry) else {
        return false;
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    let host_ok = if registry.starts_with('[') {
        host.parse::<Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    port_ok && host_ok
}

fn is_loopback_registry(registry: &str) -> bool {
    match split_host_port(registry) {
        Some((host, _)) => {
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// One `scheme param=value, ...` challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawChallenge {
    scheme: String,
    /// Parameter names lowercased, values unquoted.
    params: Vec<(String, String)>,
}

impl RawChallenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value (RFC 7235), which may hold several challenges:
/// `Bearer realm="https://a/token",service="reg", Basic realm="x"`. Lenient and total: junk is
/// skipped, an unterminated quote runs to the end, and it never panics.
fn parse_www_authenticate(header: &str) -> Vec<RawChallenge> {
    let b = header.as_bytes();
    let is_ws = |c: u8| c == b' ' || c == b'\t';
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
    let skip = |i: &mut usize, pred: &dyn Fn(u8) -> bool| {
        while *i < b.len() && pred(b[*i]) {
            *i += 1;
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        skip(&mut i, &|c| is_ws(c) || c == b',');
        if i >= b.len() {
            break;
        }
        let start = i;
        skip(&mut i, &is_tchar);
        if i == start {
            i += 1; // not a scheme: skip the byte
            continue;
        }
        let scheme = text(&b[start..i]);
        let mut params = Vec::new();
        loop {
            skip(&mut i, &is_ws);
            let name_start = i;
            skip(&mut i, &is_tchar);
            let name_end = i;
            skip(&mut i, &is_ws);
            if name_end == name_start || i >= b.len() || b[i] != b'=' {
                i = name_start; // the next challenge's scheme, or the end
                break;
            }
            i += 1;
            skip(&mut i, &is_ws);
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut value = Vec::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    value.push(b[i]);
                    i += 1;
                }
                i += 1; // closing quote, or past the end
                value
            } else {
                let value_start = i;
                skip(&mut i, &|c| !is_ws(c) && c != b',');
                b[value_start..i].to_vec()
            };
            params.push((
                text(&b[name_start..name_end]).to_ascii_lowercase(),
                text(&value),
            ));
            skip(&mut i, &is_ws);
            if i < b.len() && b[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        out.push(RawChallenge { scheme, params });
    }
    out
}

/// Whether the registry's credentials may be sent to the token server at `realm`: over https,
/// or to the registry's own host (which the user chose to reach over plain http). A registry
/// that names a plain-http realm elsewhere would otherwise hand the password to whoever is on
/// the path to that host.
fn credentials_may_go_to(realm: &Url, registry: &str) -> bool {
    if realm.scheme() == "https" {
        return true;
    }
    let Some(host) = realm.host_str() else {
        return false;
    };
    let registry_host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(registry, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
        == registry_host.trim_start_matches('[').trim_end_matches(']')
}

/// The challenge to answer among all `WWW-Authenticate` values: Bearer (with a realm) over Basic.
fn pick_challenge(values: &[&str]) -> Option<Challenge> {
    let challenges: Vec<RawChallenge> = values
        .iter()
        .flat_map(|v| parse_www_authenticate(v))
        .collect();
    let bearer = challenges.iter().find_map(|c| {
        if !c.scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some(Challenge::Bearer {
            realm: c.param("realm")?.to_string(),
            service: c.param("service").map(str::to_string),
            scope: c.param("scope").map(str::to_string),
        })
    });
    bearer.or_else(|| {
        challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
            .then_some(Challenge::Basic)
    })
}

/// Credentials for `registry` from docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`), as `docker login` stores them in `auths`: a base64 `auth` of
/// `user:password`, or `username` and `password` fields. Docker Hub's entry is found under
/// `https://index.docker.io/v1/` as well as `docker.io`.
///
/// Credential helpers (`credsStore`, `credHelpers`) and `identitytoken` entries are not
/// supported: such registries get `None`, and the caller can pass credentials explicitly. A
/// missing file is `None`; an unreadable or malformed one is logged and is `None`.
pub fn docker_config_credentials(registry: &str) -> Option<Credentials> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))?;
    credentials_from_config_file(&dir.join("config.json"), registry)
}

fn credentials_from_config_file(path: &Path, registry: &str) -> Option<Credentials> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read docker config; pulling anonymously");
            return None;
        }
    };
    match credentials_from_config(&text, registry) {
        Ok(credentials) => credentials,
        Err(reason) => {
            warn!(path = %path.display(), %reason, "ignoring docker config; pulling anonymously");
            None
        }
    }
}

fn credentials_from_config(text: &str, registry: &str) -> Result<Option<Credentials>, String> {
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, DockerAuth>,
    }
    #[derive(Deserialize)]
    struct DockerAuth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: DockerConfig =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let wanted = normalize_registry(registry);
    // An exact key wins over one that only matches after normalisation; BTreeMap order makes
    // the choice among the rest deterministic.
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| key.as_str() == registry)
        .or_else(|| {
            config.auths.iter().find(|(key, _)| {
                let host = key
                    .trim_start_matches("https://")
                    .trim_start_matches("http://");
                let host = host.split('/').next().unwrap_or_default();
                normalize_registry(host) == wanted
            })
        });
    let Some((key, auth)) = entry else {
        return Ok(None);
    };
    if let Some(encoded) = auth.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| format!("auth for {key} is not valid base64"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("auth for {key} is not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| format!("auth for {key} is not user:password"))?;
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (&auth.username, &auth.password) {
        (Some(username), Some(password)) if !username.is_empty() => Ok(Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        })),
        _ => Ok(None),
    }
}

/// The parsers of what a registry sends, for the fuzz targets in `fuzz/` (they are private to
/// this module). Not an API: plain types in, plain types out.
#[doc(hidden)]
pub mod fuzzing {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    use reqwest::header::HeaderValue;

    use super::{Challenge, MAX_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME};

    /// The lifetimes a token can be given.
    pub const TOKEN_LIFETIME: RangeInclusive<Duration> = MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME;

    /// The challenges of one `WWW-Authenticate` value: scheme and (lowercased name, value) pairs.
    pub fn www_authenticate(header: &str) -> Vec<(String, Vec<(String, String)>)> {
        super::parse_www_authenticate(header)
            .into_iter()
            .map(|c| (c.scheme, c.params))
            .collect()
    }

    /// A Bearer challenge's realm, service and scope.
    pub type Bearer = (String, Option<String>, Option<String>);

    /// The challenge the client answers among `values`: `Some(None)` for Basic, `Some(Some(_))`
    /// for Bearer.
    pub fn pick_challenge(values: &[&str]) -> Option<Option<Bearer>> {
        super::pick_challenge(values).map(|c| match c {
            Challenge::Basic => None,
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
        })
    }

    /// A token server's reply: the `Authorization` value and the token's lifetime.
    pub fn token_response(body: &[u8]) -> Result<(HeaderValue, Duration), String> {
        super::parse_token_response(body)
    }

    /// The media type of a manifest served with `content_type`.
    pub fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Result<String, String> {
        super::manifest_media_type(content_type, bytes)
    }

    /// The referrers a referrers list (or referrers-tag index) names; `None` when it is not a
    /// JSON object.
    pub fn index_referrers(bytes: &[u8]) -> Option<Vec<super::Referrer>> {
        serde_json::from_slice(bytes)
            .ok()
            .map(|index| super::referrers::index_referrers(&index))
    }
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    // ---------------------------------------------------------------- references and parsers

    fn parsed(s: &str) -> (String, String, Reference) {
        let r = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (r.registry, r.repository, r.reference)
    }

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn credentials_go_to_https_realms_and_the_registrys_own_host_only() {
        let ok = |realm: &str, registry: &str| {
            credentials_may_go_to(&Url::parse(realm).unwrap(), registry)
        };
        assert!(ok("https://auth.example/token", "registry.example"));
        assert!(ok("http://127.0.0.1:5001/token", "127.0.0.1:5000"));
        assert!(ok("http://reg.local/token", "reg.local:5000"));
        assert!(ok("http://[::1]:5001/token", "[::1]:5000"));
        assert!(!ok("http://evil.example/token", "127.0.0.1:5000"));
        assert!(!ok("http://reg.local.evil/token", "reg.local:5000"));
        assert!(!ok("http://10.0.0.9/token", "registry.example"));
    }

    #[test]
    fn image_ref_parse_follows_docker_normalisation() {
        let hub = DOCKER_HUB_REGISTRY.to_string();
        assert_eq!(
            parsed("ubuntu"),
            (hub.clone(), "library/ubuntu".into(), tag("latest"))
        );
        assert_eq!(
            parsed("ubuntu:22.04"),
            (hub.clone(), "library/ubuntu".into(), tag("22.04"))
        );
        assert_eq!(
            parsed("docker://ubuntu"),
            (hub.clone(), "library/ubuntu".into(), tag("latest"))
        );
        assert_eq!(
            parsed("docker.io/ubuntu"),
            (hub.clone(), "library/ubuntu".into(), tag("latest"))
        );
        assert_eq!(
            parsed("index.docker.io/library/ubuntu:x"),
            (hub.clone(), "library/ubuntu".into(), tag("x"))
        );
        assert_eq!(
            parsed("bitnami/redis:7"),
            (hub.clone(), "bitnami/redis".into(), tag("7"))
        );
        assert_eq!(
            parsed("127.0.0.1:5000/test/img:v1"),
            ("127.0.0.1:5000".into(), "test/img".into(), tag("v1"))
        );
        assert_eq!(
            parsed("localhost/a/b/c"),
            ("localhost".into(), "a/b/c".into(), tag("latest"))
        );
        assert_eq!(
            parsed("localhost:5000/img"),
            ("localhost:5000".into(), "img".into(), tag("latest"))
        );
        assert_eq!(
            parsed("[::1]:5000/img:t"),
            ("[::1]:5000".into(), "img".into(), tag("t"))
        );
        assert_eq!(
            parsed(&format!("ghcr.io/o/r@{DIGEST_A}")),
            (
                "ghcr.io".into(),
                "o/r".into(),
                Reference::Digest(DIGEST_A.into())
            )
        );
        // Tag and digest: the digest wins.
        assert_eq!(
            parsed(&format!("quay.io/o/r:v1@{DIGEST_A}")),
            (
                "quay.io".into(),
                "o/r".into(),
                Reference::Digest(DIGEST_A.into())
            )
        );
        assert_eq!(
            parsed("my-registry.example.com:443/a__b/c-d.e:T_1.2-x"),
            (
                "my-registry.example.com:443".into(),
                "a__b/c-d.e".into(),
                tag("T_1.2-x")
            )
        );
    }

    #[test]
    fn image_ref_display_is_canonical_and_parses_back() {
        for (input, canonical) in [
            ("ubuntu", "docker.io/library/ubuntu:latest"),
            (
                "docker://registry-1.docker.io/library/ubuntu:22.04",
                "docker.io/library/ubuntu:22.04",
            ),
            ("127.0.0.1:5000/test/img:v1", "127.0.0.1:5000/test/img:v1"),
            (
                &format!("ghcr.io/o/r@{DIGEST_A}"),
                &format!("ghcr.io/o/r@{DIGEST_A}"),
            ),
        ] {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(r.to_string(), canonical);
            assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
        }
    }

    #[test]
    fn image_ref_parse_rejects_malformed_names() {
        for bad in [
            "",
            "docker://",
            "Ubuntu",
            "ghcr.io/Owner/repo",
            "ubuntu:",
            "ubuntu:-x",
            "ubuntu:.x",
            "ubuntu@sha256:abc",
            "ubuntu@sha512:aaaa",
            &format!("ubuntu@{}", DIGEST_A.to_uppercase()),
            "host:99999/repo",
            "host:/repo",
            "a//b",
            "a/",
            "/a",
            "a..b",
            "a___b",
            "a-",
            "bad_host!.com/repo",
            "ubuntu:t\u{e9}",
            "r\u{e9}po",
            &"a".repeat(256),
            &format!("ubuntu:{}", "t".repeat(129)),
        ] {
            let err = ImageRef::parse(bad).expect_err(bad);
            assert!(
                matches!(err, RegistryError::InvalidReference { .. }),
                "{bad}: {err}"
            );
            assert!(err.is_permanent());
            assert!(
                err.to_string().starts_with("invalid image reference"),
                "{err}"
            );
        }
    }

    #[test]
    fn parsers_do_not_panic_on_random_input() {
        let alphabet: Vec<char> = "aZ09:/@._-\"\\=, \t[]é\u{0}sha256bearerrealm"
            .chars()
            .collect();
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let len = (xorshift(&mut state) % 40) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(xorshift(&mut state) % alphabet.len() as u64) as usize])
                .collect();
            if let Ok(r) = ImageRef::parse(&s) {
                assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r, "{s:?}");
            }
            let _ = parse_www_authenticate(&s);
            let _ = pick_challenge(&[&s]);
            let _ = parse_content_range(&s);
            let _ = valid_registry(&s);
            let _ = credentials_from_config(&s, "x");
            let _ = manifest_media_type(Some(&s), s.as_bytes());
        }
    }

    #[test]
    fn www_authenticate_parses_docker_hub_and_multiple_challenges() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#;
        assert_eq!(
            pick_challenge(&[hub]),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            })
        );

        let several = r#"Basic realm="basic, with comma", BEARER Realm = "http://x/t?a=1" , service=svc,error="invalid_token""#;
        let parsed = parse_www_authenticate(several);
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed[0].scheme, "Basic");
        assert_eq!(parsed[0].param("realm"), Some("basic, with comma"));
        assert_eq!(parsed[1].param("realm"), Some("http://x/t?a=1"));
        assert_eq!(parsed[1].param("service"), Some("svc"));
        assert_eq!(parsed[1].param("error"), Some("invalid_token"));
        // Bearer is preferred over Basic, whatever the order.
        assert!(matches!(
            pick_challenge(&[several]),
            Some(Challenge::Bearer { .. })
        ));
        // Separate header values are combined.
        assert_eq!(
            pick_challenge(&["Basic realm=\"r\"", "Bearer realm=\"https://t/\""]),
            Some(Challenge::Bearer {
                realm: "https://t/".into(),
                service: None,
                scope: None
            })
        );

        let escaped = parse_www_authenticate(r#"Bearer realm="a\"b\\c""#);
        assert_eq!(escaped[0].param("realm"), Some(r#"a"b\c"#));
        let unterminated = parse_www_authenticate(r#"Bearer realm="https://t/token"#);
        assert_eq!(unterminated[0].param("realm"), Some("https://t/token"));

        assert_eq!(
            pick_challenge(&["Basic realm=\"registry\""]),
            Some(Challenge::Basic)
        );
        assert_eq!(pick_challenge(&["Basic"]), Some(Challenge::Basic));
        // Bearer without a realm cannot be answered; neither can unknown schemes or junk.
        assert_eq!(pick_challenge(&["Bearer service=\"x\""]), None);
        assert_eq!(pick_challenge(&["Negotiate abc=="]), None);
        assert_eq!(pick_challenge(&["\"\"==,,\\"]), None);
        assert_eq!(pick_challenge(&[]), None);
    }

    #[test]
    fn content_range_parser() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-9/100"), None);
        assert_eq!(
            parse_content_range("bytes 0-99999999999999999999999/1"),
            None
        );
    }

    #[test]
    fn manifest_media_type_prefers_header_then_body() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        let typed = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#;
        assert_eq!(
            manifest_media_type(Some(MEDIA_TYPE_OCI_MANIFEST), typed).unwrap(),
            MEDIA_TYPE_OCI_MANIFEST
        );
        assert_eq!(
            manifest_media_type(Some("application/json"), typed).unwrap(),
            MEDIA_TYPE_DOCKER_MANIFEST
        );
        assert_eq!(
            manifest_media_type(None, index).unwrap(),
            MEDIA_TYPE_OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(None, b"{}").unwrap(),
            MEDIA_TYPE_OCI_MANIFEST
        );
        let schema1 = manifest_media_type(
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            b"{}",
        )
        .unwrap_err();
        assert!(schema1.contains("unsupported media type"), "{schema1}");
        assert!(manifest_media_type(None, b"<html>")
            .unwrap_err()
            .contains("not a JSON manifest"));
        assert!(manifest_media_type(None, b"[1,2]").is_err());
    }

    /// `[null,null]` deserialized as the two fields of the media-type sniff and was taken for
    /// an OCI manifest (found by the oci_manifest fuzz target's check).
    #[test]
    fn manifest_that_is_a_json_array_is_refused() {
        for body in [
            &b"[null,null]"[..],
            b" [\"application/vnd.oci.image.index.v1+json\",1]",
        ] {
            let e = manifest_media_type(None, body).unwrap_err();
            assert!(e.contains("not a JSON object"), "{e}");
        }
        assert_eq!(
            manifest_media_type(None, b" \n{}").unwrap(),
            MEDIA_TYPE_OCI_MANIFEST
        );
    }

    /// `["t",null,5]` deserialized as token, access_token and expires_in and was accepted as a
    /// token (found by the token_response fuzz target's check).
    #[test]
    fn token_reply_that_is_a_json_array_is_refused() {
        let e = parse_token_response(br#"["t",null,5]"#).unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
        let (header, lifetime) =
            parse_token_response(br#" {"token":"","access_token":"t","expires_in":300}"#).unwrap();
        assert_eq!(header, "Bearer t");
        assert!(header.is_sensitive());
        assert_eq!(lifetime, Duration::from_secs(300));
    }

    #[test]
    fn token_lifetime_is_clamped() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(token_lifetime(None), MIN_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(&v("300"))), Duration::from_secs(300));
        assert_eq!(token_lifetime(Some(&v("300.5"))), Duration::from_secs(300));
        assert_eq!(
            token_lifetime(Some(&v("\"600\""))),
            Duration::from_secs(600)
        );
        assert_eq!(token_lifetime(Some(&v("5"))), MIN_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(&v("-5"))), MIN_TOKEN_LIFETIME);
        assert_eq!(
            token_lifetime(Some(&v("18446744073709551615"))),
            MAX_TOKEN_LIFETIME
        );
        assert_eq!(token_lifetime(Some(&v("1e300"))), MAX_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(&v("{}"))), MIN_TOKEN_LIFETIME);
    }

    #[test]
    fn registry_hosts() {
        for ok in [
            "localhost",
            "localhost:5000",
            "a.b-c.io",
            "10.0.0.1:443",
            "[::1]",
            "[::1]:5000",
        ] {
            assert!(valid_registry(ok), "{ok}");
        }
        for bad in [
            "", ":5000", "a:", "a:b", "[::1", "[zz]:1", "a..b", "-a.io", "a_b.io", "a/b", "[::1]x",
        ] {
            assert!(!valid_registry(bad), "{bad}");
        }
        for lo in [
            "localhost:5000",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
        ] {
            assert!(is_loopback_registry(lo), "{lo}");
        }
        for remote in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:5000",
        ] {
            assert!(!is_loopback_registry(remote), "{remote}");
        }
        assert!(matches!(
            RegistryClient::new("bad host", ClientOptions::default()),
            Err(RegistryError::InvalidRegistry { .. })
        ));
    }

    #[test]
    fn docker_config_auth_entries() {
        let alice = Credentials {
            username: "alice".into(),
            password: "pa:ss".into(),
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        let config = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{encoded}"}},
                "ghcr.io": {{"username": "alice", "password": "pa:ss"}},
                "http://localhost:5000": {{"auth": "{encoded}"}},
                "helper.example.com": {{}},
                "broken.example.com": {{"auth": "%%%"}}
            }}, "credsStore": "desktop"}}"#
        );
        let creds = |r: &str| credentials_from_config(&config, r);
        assert_eq!(creds("registry-1.docker.io"), Ok(Some(alice.clone())));
        assert_eq!(creds("docker.io"), Ok(Some(alice.clone())));
        assert_eq!(creds("ghcr.io"), Ok(Some(alice.clone())));
        assert_eq!(creds("localhost:5000"), Ok(Some(alice.clone())));
        assert_eq!(creds("helper.example.com"), Ok(None));
        assert_eq!(creds("quay.io"), Ok(None));
        assert!(creds("broken.example.com")
            .unwrap_err()
            .contains("not valid base64"));
        assert!(credentials_from_config("{", "x").is_err());
        assert_eq!(credentials_from_config("{}", "x"), Ok(None));
        assert!(
            !format!("{alice:?}").contains("pa:ss"),
            "Debug must not print the password"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert_eq!(credentials_from_config_file(&path, "ghcr.io"), None);
        std::fs::write(&path, &config).unwrap();
        assert_eq!(credentials_from_config_file(&path, "ghcr.io"), Some(alice));
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(credentials_from_config_file(&path, "ghcr.io"), None);
    }

    #[test]
    fn permanence_of_errors() {
        let http = |status| RegistryError::Http {
            status,
            url: "u".into(),
            detail: String::new(),
            retry_after: None,
        };
        for status in [500, 502, 503, 408, 429] {
            assert!(!http(status).is_permanent(), "{status}");
        }
        for status in [400, 404, 405, 410] {
            assert!(http(status).is_permanent(), "{status}");
        }
        let manifest = RegistryError::ManifestUnknown {
            repo: "test/img".into(),
            reference: tag("nope"),
        };
        assert!(manifest.is_permanent());
        assert_eq!(manifest.to_string(), "manifest unknown: test/img:nope");
        let by_digest = RegistryError::ManifestUnknown {
            repo: "test/img".into(),
            reference: Reference::Digest(DIGEST_A.into()),
        };
        assert_eq!(
            by_digest.to_string(),
            format!("manifest unknown: test/img@{DIGEST_A}")
        );
        assert!(!RegistryError::TruncatedBody {
            repo: "r".into(),
            digest: DIGEST_A.into(),
            start: 0,
            end: 2,
            received: 1
        }
        .is_permanent());
        let detail = RegistryError::Http {
            status: 500,
            url: "u".into(),
            detail: "X y".into(),
            retry_after: None,
        };
        assert_eq!(detail.to_string(), "http 500 from u: X y");
        assert_eq!(http(500).to_string(), "http 500 from u");
        assert_eq!(
            registry_error_detail(
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#
            ),
            "BLOB_UNKNOWN blob unknown to registry"
        );
        assert_eq!(registry_error_detail(b"<html>"), "");

        let stalled = RegistryError::Stalled {
            url: "u".into(),
            after: Duration::from_secs(30),
        };
        assert!(!stalled.is_permanent());
        assert_eq!(
            stalled.to_string(),
            "upload to u stalled: no progress for 30s"
        );
        let too_large = RegistryError::BlobTooLarge {
            repo: "r".into(),
            digest: DIGEST_A.into(),
            limit: 10,
        };
        assert!(too_large.is_permanent());
        assert!(RegistryError::BadResponse {
            url: "u".into(),
            reason: "no Location".into()
        }
        .is_permanent());
    }

    #[tokio::test]
    async fn bearer_token_is_fetched_with_credentials_cached_and_sent() {
        let server = FakeServer::start(|base| {
            Arc::new(move |req: &SeenRequest| match req.path_only() {
                "/token"
                    if req.header("authorization") == Some(&basic_header("alice", "s3cret")) =>
                {
                    Reply::new(200, r#"{"token":"tok-1","expires_in":300}"#)
                }
                "/token" => Reply::new(401, "no"),
                "/v2/test/img/manifests/v1"
                    if req.header("authorization") == Some("Bearer tok-1") =>
                {
                    manifest_reply()
                }
                _ => bearer_challenge(&base, "test/img"),
            })
        })
        .await;
        let creds = Credentials {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        let client = server.client(Some(creds));
        for _ in 0..2 {
            let m = client.get_manifest("test/img", &tag("v1")).await.unwrap();
            assert_eq!(m.bytes, MANIFEST_BODY);
            assert_eq!(m.digest, sha256_digest(MANIFEST_BODY));
            assert_eq!(m.media_type, MEDIA_TYPE_OCI_MANIFEST);
            assert!(!m.is_index());
        }
        let tokens = server.requests_to("/token");
        assert_eq!(tokens.len(), 1, "the token is cached: {tokens:?}");
        assert_eq!(tokens[0].query("service"), ["fake-registry"]);
        assert_eq!(tokens[0].query("scope"), ["repository:test/img:pull"]);
        let manifests = server.requests_to("/v2/test/img/manifests/v1");
        let auth: Vec<_> = manifests
            .iter()
            .map(|r| r.header("authorization"))
            .collect();
        assert_eq!(
            auth,
            [None, Some("Bearer tok-1"), Some("Bearer tok-1")],
            "anonymous first"
        );
        assert!(manifests[0]
            .header("accept")
            .unwrap()
            .contains(MEDIA_TYPE_DOCKER_MANIFEST_LIST));
    }

    #[tokio::test]
    async fn credentials_are_not_sent_to_a_plain_http_realm_on_another_host() {
        // The token server answers anyone; only the Authorization header it sees matters.
        let tokens = FakeServer::start(|_| {
            Arc::new(|_: &SeenRequest| Reply::new(200, r#"{"token":"tok-1"}"#))
        })
        .await;
        // `localhost`, not the registry's `127.0.0.1`: another host, over plain http.
        let realm = format!(
            "http://localhost:{}/token",
            tokens.host().rsplit_once(':').unwrap().1
        );
        let server = FakeServer::start(move |_| {
            Arc::new(move |req: &SeenRequest| match req.header("authorization") {
                Some("Bearer tok-1") => manifest_reply(),
                _ => Reply::new(401, "").header(
                    "WWW-Authenticate",
                    format!(r#"Bearer realm="{realm}",service="s""#),
                ),
            })
        })
        .await;
        let creds = Credentials {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        let m = server
            .client(Some(creds))
            .get_manifest("test/img", &tag("v1"))
            .await
            .unwrap();
        assert_eq!(m.bytes, MANIFEST_BODY);
        let asked = tokens.requests_to("/token");
        assert!(!asked.is_empty());
        for request in asked {
            assert_eq!(request.header("authorization"), None, "the password left");
        }
    }

    #[tokio::test]
    async fn token_is_replaced_after_a_new_401_and_fetched_up_front_for_other_repos() {
        #[derive(Default)]
        struct TokenState {
            issued: u32,
            valid: Option<String>,
        }
        let state = Arc::new(Mutex::new(TokenState::default()));
        let server_state = state.clone();
        let server = FakeServer::start(move |base| {
            Arc::new(move |req: &SeenRequest| {
                let mut state = server_state.lock().unwrap();
                if req.path_only() == "/token" {
                    state.issued += 1;
                    let token = format!("tok-{}", state.issued);
                    state.valid = Some(token.clone());
                    // access_token instead of token, and no expires_in: both allowed.
                    return Reply::new(200, format!(r#"{{"access_token":"{token}"}}"#));
                }
                let expected = state.valid.as_ref().map(|t| format!("Bearer {t}"));
                if expected.is_some() && req.header("authorization") == expected.as_deref() {
                    manifest_reply()
                } else {
                    bearer_challenge(&base, "test/img")
                }
            })
        })
        .await;
        let client = server.client(None);
        client.get_manifest("test/img", &tag("v1")).await.unwrap();
        state.lock().unwrap().valid = None; // the server revokes tok-1
        client
            .clone()
            .get_manifest("test/img", &tag("v1"))
            .await
            .unwrap();
        assert_eq!(state.lock().unwrap().issued, 2);

        // The registry is known to want tokens: a new scope gets one before its first request.
        client.get_manifest("test/other", &tag("v1")).await.unwrap();
        let other = server.requests_to("/v2/test/other/manifests/v1");
        assert_eq!(other.len(), 1, "{other:?}");
        assert_eq!(other[0].header("authorization"), Some("Bearer tok-3"));

        // An expired token is replaced before the request, without a 401 round trip.
        for token in lock(&client.inner.auth).tokens.values_mut() {
            token.refresh_at = Instant::now();
        }
        let before = server.requests_to("/v2/test/img/manifests/v1").len();
        client.get_manifest("test/img", &tag("v1")).await.unwrap();
        let after = server.requests_to("/v2/test/img/manifests/v1");
        assert_eq!(after.len(), before + 1, "no 401 round trip: {after:?}");
        assert_eq!(after[before].header("authorization"), Some("Bearer tok-4"));

        let scopes: Vec<_> = server
            .requests_to("/token")
            .iter()
            .map(|r| r.query("scope"))
            .collect();
        let img = vec!["repository:test/img:pull".to_string()];
        let other = vec!["repository:test/other:pull".to_string()];
        assert_eq!(scopes, [img.clone(), img.clone(), other, img]);
    }

    #[tokio::test]
    async fn basic_challenge_is_answered_with_credentials() {
        let server = FakeServer::start(|_| {
            Arc::new(move |req: &SeenRequest| {
                if req.header("authorization") == Some(&basic_header("bob", "pw")) {
                    manifest_reply()
                } else {
                    Reply::new(401, "")
                        .header("WWW-Authenticate", r#"Basic realm="Registry Realm""#)
                }
            })
        })
        .await;
        let bob = Credentials {
            username: "bob".into(),
            password: "pw".into(),
        };
        let client = server.client(Some(bob));
        client.get_manifest("test/img", &tag("v1")).await.unwrap();
        client.get_manifest("test/img", &tag("v1")).await.unwrap();
        let auth: Vec<_> = server
            .requests()
            .iter()
            .map(|r| r.header("authorization").is_some())
            .collect();
        assert_eq!(
            auth,
            [false, true, true],
            "credentials are sent up front once Basic is known"
        );

        let err = server
            .client(None)
            .get_manifest("test/img", &tag("v1"))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
        assert!(err.is_permanent());
        assert!(err.to_string().contains("docker login"), "{err}");

        let wrong = Credentials {
            username: "bob".into(),
            password: "wrong".into(),
        };
        let err = server
            .client(Some(wrong))
            .get_manifest("test/img", &tag("v1"))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
        assert!(err.to_string().contains("\"bob\""), "{err}");
    }

    #[tokio::test]
    async fn blob_redirect_to_storage_drops_authorization() {
        let data = noise(100_000, 7);
        let digest = sha256_digest(&data);
        let storage_data = data.clone();
        let storage = FakeServer::start(move |_| {
            Arc::new(move |req: &SeenRequest| range_reply(req, &storage_data))
        })
        .await;
        let storage_base = format!("http://{}", storage.host());
        let blob_path = format!("/v2/test/img/blobs/{digest}");
        let registry = FakeServer::start(move |base| {
            Arc::new(move |req: &SeenRequest| match req.path_only() {
                "/token" => Reply::new(200, r#"{"token":"secret-token"}"#),
                p if p == blob_path
                    && req.header("authorization") == Some("Bearer secret-token") =>
                {
                    Reply::new(307, "").header(
                        "Location",
                        format!("{storage_base}/bucket/data?X-Amz-Signature=abc"),
                    )
                }
                _ => bearer_challenge(&base, "test/img"),
            })
        })
        .await;
        let client = registry.client(None);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        assert_eq!(
            client
                .get_blob_to_file("test/img", &digest, &dest)
                .await
                .unwrap(),
            100_000
        );
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        let slice = client
            .get_blob_range("test/img", &digest, 99_990..100_000)
            .await
            .unwrap();
        assert_eq!(slice, &data[99_990..]);

        let fetched = storage.requests();
        assert_eq!(fetched.len(), 2, "{fetched:?}");
        for req in &fetched {
            assert_eq!(req.path, "/bucket/data?X-Amz-Signature=abc");
            assert_eq!(
                req.header("authorization"),
                None,
                "token leaked to storage: {req:?}"
            );
        }
        assert_eq!(fetched[1].header("range"), Some("bytes=99990-99999"));
        let to_registry = registry.requests_to(&format!("/v2/test/img/blobs/{digest}"));
        assert!(to_registry
            .iter()
            .any(|r| r.header("authorization") == Some("Bearer secret-token")));
    }

    #[tokio::test]
    async fn range_reads_check_what_the_server_sent() {
        let data = noise(1000, 3);
        let digest = sha256_digest(&data);
        let served = data.clone();
        let server = FakeServer::start(move |_| {
            Arc::new(move |req: &SeenRequest| {
                let repo = req
                    .path_only()
                    .strip_prefix("/v2/")
                    .and_then(|p| p.split("/blobs/").next());
                let honest = range_reply(req, &served);
                match repo {
                    Some("test/honest") => honest,
                    Some("test/ignores-range") => Reply::new(200, served.as_slice()),
                    Some("test/short") => {
                        let mut r = honest;
                        r.body.pop();
                        r
                    }
                    Some("test/long") => {
                        let mut r = honest;
                        r.body.push(0);
                        r
                    }
                    Some("test/shifted") => {
                        Reply::new(206, &served[1..11]).header("Content-Range", "bytes 1-10/1000")
                    }
                    Some("test/garbled") => {
                        Reply::new(206, &served[..10]).header("Content-Range", "bytes ??")
                    }
                    _ => Reply::new(404, r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#),
                }
            })
        })
        .await;
        let client = server.client(None);
        let read = |repo: &'static str, range: Range<u64>| {
            let client = client.clone();
            let digest = digest.clone();
            async move { client.get_blob_range(repo, &digest, range).await }
        };

        for repo in ["test/honest", "test/ignores-range"] {
            assert_eq!(read(repo, 0..10).await.unwrap(), &data[..10], "{repo}");
            assert_eq!(read(repo, 500..1000).await.unwrap(), &data[500..], "{repo}");
            assert_eq!(read(repo, 999..1000).await.unwrap(), &data[999..], "{repo}");
            assert_eq!(read(repo, 7..7).await.unwrap(), b"", "{repo}");
            let err = read(repo, 990..1010).await.unwrap_err();
            assert!(
                err.to_string().contains("the blob is only 1000 bytes"),
                "{repo}: {err}"
            );
            assert!(err.is_permanent());
            let err = read(repo, 2000..2010).await.unwrap_err();
            assert!(
                err.to_string().contains("the blob is only 1000 bytes"),
                "{repo}: {err}"
            );
        }

        let err = read("test/short", 0..10).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::TruncatedBody { received: 9, .. }),
            "{err}"
        );
        assert!(!err.is_permanent());
        let err = read("test/long", 0..10).await.unwrap_err();
        assert!(err.to_string().contains("more than 10 bytes"), "{err}");
        let err = read("test/shifted", 0..10).await.unwrap_err();
        assert!(
            err.to_string().contains("server sent bytes 1-10 instead"),
            "{err}"
        );
        let err = read("test/garbled", 0..10).await.unwrap_err();
        assert!(
            err.to_string().contains("unparseable Content-Range"),
            "{err}"
        );
        let err = read("test/missing", 0..10).await.unwrap_err();
        assert!(matches!(err, RegistryError::BlobUnknown { .. }), "{err}");
        #[allow(clippy::reversed_empty_ranges)]
        let err = read("test/honest", 10..5).await.unwrap_err();
        assert!(matches!(err, RegistryError::InvalidRange { .. }), "{err}");
        let err = client
            .get_blob_range("test/honest", "sha256:../../etc", 0..1)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::InvalidDigest { .. }), "{err}");
        assert!(server.requests().iter().all(|r| !r.path.contains("..")));
    }

    #[tokio::test]
    async fn hostile_registry_responses_become_errors() {
        let wrong_digest = sha256_digest(b"something else");
        let header_digest = wrong_digest.clone();
        let server = FakeServer::start(move |base| {
            Arc::new(move |req: &SeenRequest| {
                let challenge = |realm: &str| {
                    Reply::new(401, "")
                        .header("WWW-Authenticate", format!(r#"Bearer realm="{realm}""#))
                };
                match req.path_only() {
                    "/v2/test/not-json/manifests/v1" => {
                        Reply::new(200, "<html>").header("Content-Type", "text/html")
                    }
                    "/v2/test/lying-header/manifests/v1" => {
                        manifest_reply().header("Docker-Content-Digest", header_digest.clone())
                    }
                    p if p.starts_with("/v2/test/by-digest/manifests/") => manifest_reply(),
                    "/v2/test/schema1/manifests/v1" => Reply::new(200, "{}").header(
                        "Content-Type",
                        "application/vnd.docker.distribution.manifest.v1+prettyjws",
                    ),
                    "/v2/test/huge/manifests/v1" => {
                        Reply::new(200, vec![b' '; MAX_MANIFEST_BYTES + 1])
                    }
                    "/v2/test/negotiate/manifests/v1" => {
                        Reply::new(401, "").header("WWW-Authenticate", "Negotiate")
                    }
                    "/v2/test/no-challenge/manifests/v1" => Reply::new(401, ""),
                    "/v2/test/bad-token-json/manifests/v1" => {
                        challenge(&format!("{base}/token-bad-json"))
                    }
                    "/v2/test/bad-token-header/manifests/v1" => {
                        challenge(&format!("{base}/token-newline"))
                    }
                    "/v2/test/bad-realm/manifests/v1" => challenge("file:///etc/passwd"),
                    "/v2/test/token-500/manifests/v1" => challenge(&format!("{base}/token-500")),
                    "/token-bad-json" => Reply::new(200, "{\"token\": 5"),
                    "/token-newline" => Reply::new(200, r#"{"token":"a\nb"}"#),
                    "/token-500" => Reply::new(500, ""),
                    "/v2/test/server-error/manifests/v1" => Reply::new(
                        503,
                        r#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#,
                    ),
                    "/v2/test/forbidden/manifests/v1" => Reply::new(403, ""),
                    _ => Reply::new(404, ""),
                }
            })
        })
        .await;
        let client = server.client(None);
        let get = |repo: &'static str, reference: Reference| {
            let client = client.clone();
            async move { client.get_manifest(repo, &reference).await.unwrap_err() }
        };

        let err = get("test/not-json", tag("v1")).await;
        assert!(
            matches!(err, RegistryError::InvalidManifest { .. }) && err.is_permanent(),
            "{err}"
        );
        let err = get("test/lying-header", tag("v1")).await;
        match &err {
            RegistryError::DigestMismatch {
                kind: ContentKind::Manifest,
                expected,
                actual,
                ..
            } => {
                assert_eq!(expected, &wrong_digest);
                assert_eq!(actual, &sha256_digest(MANIFEST_BODY));
            }
            other => panic!("{other}"),
        }
        let err = get("test/by-digest", Reference::Digest(wrong_digest.clone())).await;
        assert!(
            matches!(err, RegistryError::DigestMismatch { .. }) && err.is_permanent(),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "manifest test/by-digest@{wrong_digest} digest mismatch: got sha256:"
            )),
            "{err}"
        );
        let ok = client
            .get_manifest(
                "test/by-digest",
                &Reference::Digest(sha256_digest(MANIFEST_BODY)),
            )
            .await
            .unwrap();
        assert_eq!(ok.bytes, MANIFEST_BODY);
        let err = get("test/schema1", tag("v1")).await;
        assert!(err.to_string().contains("unsupported media type"), "{err}");
        let err = get("test/huge", tag("v1")).await;
        assert!(
            err.to_string().contains("larger than 4194304 bytes"),
            "{err}"
        );
        for repo in ["test/negotiate", "test/no-challenge"] {
            let err = get(repo, tag("v1")).await;
            assert!(
                matches!(err, RegistryError::UnsupportedAuth { .. }) && err.is_permanent(),
                "{err}"
            );
        }
        for repo in [
            "test/bad-token-json",
            "test/bad-token-header",
            "test/bad-realm",
        ] {
            let err = get(repo, tag("v1")).await;
            assert!(
                matches!(err, RegistryError::TokenResponse { .. }),
                "{repo}: {err}"
            );
        }
        let err = get("test/token-500", tag("v1")).await;
        assert!(
            matches!(err, RegistryError::Http { status: 500, .. }) && !err.is_permanent(),
            "{err}"
        );
        let err = get("test/server-error", tag("v1")).await;
        assert!(!err.is_permanent());
        assert!(
            err.to_string()
                .ends_with("manifests/v1: UNAVAILABLE try later"),
            "{err}"
        );
        let err = get("test/forbidden", tag("v1")).await;
        assert!(
            matches!(err, RegistryError::Denied { .. }) && err.is_permanent(),
            "{err}"
        );
        let err = get("test/missing", tag("v1")).await;
        assert_eq!(err.to_string(), "manifest unknown: test/missing:v1");
        let err = get("Test/Upper", tag("v1")).await;
        assert!(
            matches!(err, RegistryError::InvalidReference { .. }),
            "{err}"
        );
        let err = get("test/img", tag("../x")).await;
        assert!(
            matches!(err, RegistryError::InvalidReference { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn transport_errors_keep_their_cause_and_hide_signed_queries() {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}/bucket/blob?X-Amz-Signature=s3cr3t");
        let source = reqwest::Client::new().get(&url).send().await.unwrap_err();
        assert!(
            source.to_string().contains("s3cr3t"),
            "reqwest names the url: {source}"
        );
        let err = transport("the registry url")(source);
        let chain = error_chain(&err);
        assert!(!chain.contains("s3cr3t"), "{chain}");
        assert!(
            chain.starts_with("request to the registry url failed: "),
            "{chain}"
        );
        assert!(chain.contains("/bucket/blob"), "{chain}");
        assert!(
            chain.contains("Connection refused"),
            "the cause is kept: {chain}"
        );
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        let port = free_port();
        let client =
            RegistryClient::new(&format!("127.0.0.1:{port}"), ClientOptions::default()).unwrap();
        let err = client
            .get_manifest("test/img", &tag("v1"))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Transport { .. }), "{err}");
        assert!(!err.is_permanent(), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("127.0.0.1:{port}/v2/test/img/manifests/v1")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn pulls_manifest_and_blobs_from_docker_registry() {
        let (registry, image) = registry_with_image();
        let image_ref =
            ImageRef::parse(&format!("docker://{}/test/img:v1", registry.host())).unwrap();
        let client = RegistryClient::new(&image_ref.registry, ClientOptions::default()).unwrap();

        let manifest = client
            .get_manifest(&image_ref.repository, &image_ref.reference)
            .await
            .unwrap();
        assert_eq!(manifest.media_type, MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(manifest.digest, sha256_digest(&manifest.bytes));
        let parsed =
            oci_spec::image::ImageManifest::from_reader(manifest.bytes.as_slice()).unwrap();
        assert_eq!(parsed.layers().len(), 1);
        let layer_digest = parsed.layers()[0].digest().to_string();
        let config_digest = parsed.config().digest().to_string();
        assert_eq!(layer_digest, sha256_digest(&image.layer));
        assert_eq!(config_digest, sha256_digest(&image.config));

        // skopeo pushed our manifest unchanged, so it is also reachable by our digest.
        assert_eq!(manifest.digest, image.manifest_digest);
        let by_digest = client
            .get_manifest("test/img", &Reference::Digest(manifest.digest.clone()))
            .await
            .unwrap();
        assert_eq!(by_digest, manifest);

        let dir = tempfile::tempdir().unwrap();
        for (digest, expected) in [
            (&layer_digest, &image.layer),
            (&config_digest, &image.config),
        ] {
            let dest = dir.path().join(digest.replace(':', "_"));
            let size = client
                .get_blob_to_file("test/img", digest, &dest)
                .await
                .unwrap();
            assert_eq!(size, expected.len() as u64);
            assert_eq!(&std::fs::read(&dest).unwrap(), expected);
        }

        let len = image.layer.len() as u64;
        for range in [0..1, 0..4096, 1000..70_000, len - 10..len, len / 2..len] {
            let bytes = client
                .get_blob_range("test/img", &layer_digest, range.clone())
                .await
                .unwrap();
            assert_eq!(
                bytes,
                &image.layer[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
        let err = client
            .get_blob_range("test/img", &layer_digest, len - 1..len + 1)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("the blob is only {len} bytes")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn missing_tag_blob_and_repository_are_permanent_errors() {
        let (registry, image) = registry_with_image();
        let client = RegistryClient::new(&registry.host(), ClientOptions::default()).unwrap();

        let err = client
            .get_manifest("test/img", &tag("nope"))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "manifest unknown: test/img:nope");
        assert!(err.is_permanent());
        let err = client
            .get_manifest("test/absent", &tag("v1"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::ManifestUnknown { .. }),
            "{err}"
        );
        assert!(err.is_permanent());

        let missing = sha256_digest(b"not pushed");
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let err = client
            .get_blob_to_file("test/img", &missing, &dest)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), format!("blob unknown: test/img@{missing}"));
        assert!(err.is_permanent());
        assert!(!dest.exists());
        let err = client
            .get_blob_range("test/img", &missing, 0..10)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::BlobUnknown { .. }), "{err}");

        // The layer exists, but not in this repository.
        let err = client
            .get_blob_range("test/absent", &sha256_digest(&image.layer), 0..10)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::BlobUnknown { .. }), "{err}");
    }

    #[tokio::test]
    async fn corrupted_blob_in_registry_storage_is_rejected_and_removed() {
        let (registry, image) = registry_with_image();
        let digest = sha256_digest(&image.layer);
        // Same length, different bytes: only the digest check can notice.
        let stored = registry.blob_file(&digest);
        let mut corrupted = std::fs::read(&stored).unwrap();
        assert_eq!(corrupted, image.layer);
        let middle = corrupted.len() / 2;
        corrupted[middle] ^= 0xff;
        std::fs::write(&stored, &corrupted).unwrap();

        let client = RegistryClient::new(&registry.host(), ClientOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let err = client
            .get_blob_to_file("test/img", &digest, &dest)
            .await
            .unwrap_err();
        match &err {
            RegistryError::DigestMismatch {
                kind: ContentKind::Blob,
                expected,
                actual,
                ..
            } => {
                assert_eq!(expected, &digest);
                assert_eq!(actual, &sha256_digest(&corrupted));
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().starts_with(&format!(
            "blob test/img@{digest} digest mismatch: got sha256:"
        )));
        assert!(err.is_permanent());
        assert!(
            !dest.exists(),
            "a blob that failed verification must not be left behind"
        );
    }
}
