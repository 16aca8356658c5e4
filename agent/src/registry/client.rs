//! [`RegistryClient`], one registry's OCI distribution API over HTTP: the connection (https,
//! or http for a loopback registry without TLS), sending a request and answering a 401 with
//! credentials or a token, and fetching manifests, whole blobs and byte ranges, each checked
//! against its digest, length and size cap (the rules are in the `registry` module docs).
//!
//! Uses `error.rs` for its errors, `reference.rs` to check every name before it goes into a
//! URL, `auth.rs` for challenges, tokens and credentials, and `upload.rs` for request bodies.
//! `push.rs` and `referrers.rs` add methods to [`RegistryClient`] on top of the plumbing here
//! ([`Call`], [`Access`], [`RegistryClient::request`], `status_error`); `blob_store.rs` wraps a
//! client as a blob store.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
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

use super::auth::{
    credentials_may_go_to, from_json_object, parse_token_response, pick_challenge, AuthState,
    CachedToken, Challenge, Credentials, MAX_TOKEN_RESPONSE_BYTES,
};
use super::error::{registry_error_detail, transport, ContentKind, Reference, RegistryError};
use super::reference::{
    is_loopback_registry, normalize_registry, split_host_port, valid_registry, validate_digest,
    validate_repository,
};
use super::upload::{send_watched, StallLimits, UploadBody};
use super::{
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use crate::blobstore::parse_retry_after;
use crate::store::sha256_digest;
use crate::sync::lock;

/// Manifests are a few KiB; containerd refuses anything over 4 MiB, and so do we, so that a
/// hostile or confused server cannot make us buffer an unbounded body.
pub(super) const MAX_MANIFEST_BYTES: usize = 4 << 20;
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

/// How a [`RegistryClient`] connects and authenticates.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Sent to the token server (Bearer) or the registry (Basic) when it asks for them; see
    /// [`docker_config_credentials`](super::docker_config_credentials) to use what `docker login` stored.
    pub credentials: Option<Credentials>,
    /// Limit on establishing a connection, TLS handshake included.
    pub connect_timeout: Duration,
    /// Limit on the wait for each read from the server, so a stalled transfer fails while a slow
    /// but moving one does not.
    pub read_timeout: Duration,
    pub user_agent: String,
    /// When plain http may be used instead of https.
    pub plain_http: PlainHttp,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            credentials: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            user_agent: concat!("lazy-image/", env!("CARGO_PKG_VERSION")).to_string(),
            plain_http: PlainHttp::Loopback,
        }
    }
}

/// When a [`RegistryClient`] may talk plain http.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainHttp {
    /// Only to a loopback registry, after https failed (docker's rule for `localhost`).
    Loopback,
    /// To this registry, after https failed: one the operator listed as insecure (docker's
    /// `insecure-registries`).
    Fallback,
    /// Only plain http: a mirror configured with an `http://` URL.
    Only,
    /// Never: a mirror configured with an `https://` URL.
    Never,
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
    pub(super) inner: Arc<ClientInner>,
}

pub(super) struct ClientInner {
    /// `host[:port]`, normalised (Docker Hub is `registry-1.docker.io`).
    registry: String,
    http: reqwest::Client,
    /// The same client without a read timeout, for requests with a body (see the module docs).
    upload_http: reqwest::Client,
    pub(super) connect_timeout: Duration,
    pub(super) read_timeout: Duration,
    credentials: Option<Credentials>,
    /// `Authorization: Basic ...` for `credentials`, built once.
    basic_auth: Option<HeaderValue>,
    scheme: Mutex<Scheme>,
    pub(super) auth: Mutex<AuthState>,
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
    /// A loopback or insecure registry not yet contacted: try https, fall back to http.
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

/// What a request needs to be allowed to do, which decides the token scope it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
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
pub(super) enum Target {
    /// A path (and query) on the registry; the client picks http or https.
    Path(String),
    /// A URL the registry handed out: an upload `Location`, a `Link` to the next page.
    Url(Url),
}

/// A request body that can be sent again, so that a 401 retry or the http fallback resends it.
#[derive(Debug, Clone)]
pub(super) enum Payload<'a> {
    Empty,
    Bytes(Bytes),
    /// Streamed from the file, which is reopened for each attempt.
    File(&'a Path),
}

/// One request, before authorization.
pub(super) struct Call<'a> {
    pub(super) method: Method,
    pub(super) target: Target,
    pub(super) headers: HeaderMap,
    pub(super) payload: Payload<'a>,
}

impl<'a> Call<'a> {
    pub(super) fn new(method: Method, target: Target) -> Self {
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
        let scheme = match opts.plain_http {
            PlainHttp::Loopback if is_loopback_registry(&registry) => Scheme::HttpsThenHttp,
            PlainHttp::Loopback | PlainHttp::Never => Scheme::Https,
            PlainHttp::Fallback => Scheme::HttpsThenHttp,
            PlainHttp::Only => Scheme::Http,
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

    pub(super) async fn fetch_manifest(
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
    pub(super) async fn request(
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
        Ok(CachedToken::new(header, lifetime))
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
            Payload::Bytes(bytes) => Some(UploadBody::from_bytes(bytes.clone())),
            Payload::File(path) => Some(UploadBody::open(path).await?),
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
                let limits = StallLimits {
                    connect: self.inner.connect_timeout,
                    idle: self.inner.read_timeout,
                };
                send_watched(request, progress, limits, &shown).await?
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

/// Turns a non-success response into an error naming `repo` and `url`.
pub(super) async fn status_error(repo: &str, url: &str, mut resp: Response) -> RegistryError {
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

/// Reads the body if it is at most `limit` bytes; `None` if it is longer.
pub(super) async fn read_capped(
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

pub(super) fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

/// Parses `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
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
pub(super) fn manifest_media_type(
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<String, String> {
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

#[cfg(test)]
mod tests {
    use super::super::auth::{credentials_from_config, parse_www_authenticate};
    use super::super::reference::ImageRef;
    use super::super::test_support::*;
    use super::*;

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

    #[test]
    fn client_for_a_malformed_registry_host_is_refused() {
        assert!(matches!(
            RegistryClient::new("bad host", ClientOptions::default()),
            Err(RegistryError::InvalidRegistry { .. })
        ));
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
        let (storage, registry) = registry_redirecting_to_storage(&data, "data", "abc").await;
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
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs docker-registry (scripts/setup.sh installs it)"
    )]
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
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs docker-registry (scripts/setup.sh installs it)"
    )]
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
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs docker-registry (scripts/setup.sh installs it)"
    )]
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
