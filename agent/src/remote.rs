//! Where a lazy image lives and how to open it there: `dir:PATH[:TAG]` (a local store), a
//! registry (`docker://HOST/REPO:TAG` or `HOST/REPO:TAG`), or S3 (`s3://BUCKET/PREFIX`).
//!
//! Opening an image fetches its manifest and its index and nothing else; file data is fetched
//! later, chunk by chunk, through the returned `BlobStore`. The index is checked against the
//! manifest's sha256 before use and kept in the cache directory by digest, so mounting the same
//! image again fetches only the manifest; the manifest is kept too, and used when the backend
//! cannot be reached. The image's OCI config (the source image's: entrypoint, env, user...) is
//! read on request, verified, and kept by digest in the cache directory too.
//!
//! In a registry a lazy image is an OCI artifact (`artifactType`
//! `application/vnd.lazyimg.image.v1`). A reference may name it directly (`REPO:TAG-lazy`) or
//! name the source image, in which case the lazy image is found through the referrers API (or
//! its tag-schema fallback, `sha256-<hex>`) and then, failing that, at the tag `TAG-lazy`.
//!
//! An image whose manifest names blobs stored elsewhere (`lazyctl convert --reference`) gets its
//! store wrapped in an `external::RoutedBlobStore` here, after `external`'s rules and with S3
//! clients built from [`RemoteOptions`]: `external` knows blob and S3 stores, not locations.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fusefs::manifest::{LazyManifest, ARTIFACT_TYPE};
use fusefs::Index;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::blobstore::{BlobError, BlobStore, DirBlobStore};
use crate::external::{check_buckets, external_objects, ExternalError, Route, RoutedBlobStore};
use crate::mirror::Mirrors;
use crate::registry::{
    docker_config_credentials, ClientOptions, ImageRef, PlainHttp, Reference, RegistryBlobStore,
    RegistryClient, RegistryError,
};
use crate::s3::{S3Error, S3Location, S3Options, S3Store};
use crate::store::{sha256_digest, LocalStore, StoreError, DEFAULT_TAG};

/// Largest index accepted from a remote store (an index of millions of files is ~200 MB).
pub const MAX_INDEX_BYTES: u64 = 1 << 30;
/// Largest manifest accepted from S3 (registries apply their own 4 MiB limit).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Tag suffix of a lazy image pushed next to its source image.
pub const LAZY_TAG_SUFFIX: &str = "-lazy";

#[derive(Debug, Error)]
pub enum RemoteError {
    #[error("invalid image location {input:?}: {reason}")]
    BadLocation { input: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{location}: {source}")]
    Manifest {
        location: String,
        #[source]
        source: fusefs::manifest::ManifestError,
    },
    #[error(transparent)]
    Index(#[from] fusefs::IndexError),
    #[error("{location} is not a lazy image and has no lazy version (no referrer with artifactType {ARTIFACT_TYPE}, no tag {lazy_tag}); create one with lazyctl convert {location} docker://{lazy_ref}")]
    NoLazyImage {
        location: String,
        lazy_tag: String,
        lazy_ref: String,
    },
    #[error("index blob {expected} from {location} hashes to {actual}; the store is corrupt or was changed")]
    IndexDigest {
        location: String,
        expected: String,
        actual: String,
    },
    #[error("config blob {expected} ({expected_size} bytes) of {location} is {actual_size} bytes hashing to {actual}; the store is corrupt or was changed")]
    ConfigDigest {
        location: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    External(#[from] ExternalError),
}

impl RemoteError {
    /// Whether trying again later cannot help (a missing image, a bad reference, corrupt data),
    /// as opposed to a backend that is down or slow.
    pub fn is_permanent(&self) -> bool {
        match self {
            RemoteError::Registry(e) => e.is_permanent(),
            RemoteError::S3(e) => e.is_permanent(),
            RemoteError::Blob(e) => e.is_permanent(),
            RemoteError::Store(e) => e.is_permanent(),
            RemoteError::External(e) => e.is_permanent(),
            RemoteError::BadLocation { .. }
            | RemoteError::Manifest { .. }
            | RemoteError::Index(_)
            | RemoteError::NoLazyImage { .. }
            | RemoteError::IndexDigest { .. }
            | RemoteError::ConfigDigest { .. }
            | RemoteError::Io { .. } => true,
        }
    }

    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
        move |source| RemoteError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where a lazy image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    Dir { path: PathBuf, tag: String },
    Registry(ImageRef),
    S3(S3Location),
}

impl ImageLocation {
    /// Parses `dir:PATH[:TAG]`, `s3://BUCKET/PREFIX`, `docker://HOST/REPO[:TAG|@DIGEST]`, or a
    /// bare `HOST/REPO[:TAG]` (a registry reference, as docker reads it).
    pub fn parse(input: &str) -> Result<ImageLocation, RemoteError> {
        let bad = |reason: String| RemoteError::BadLocation {
            input: input.to_string(),
            reason,
        };
        if let Some(rest) = input.strip_prefix("dir:") {
            let (path, tag) = match rest.rsplit_once(':') {
                Some((path, tag)) if !tag.contains('/') && !tag.is_empty() => (path, tag),
                _ => (rest, DEFAULT_TAG),
            };
            if path.is_empty() {
                return Err(bad("dir: needs a path".into()));
            }
            return Ok(ImageLocation::Dir {
                path: PathBuf::from(path),
                tag: tag.to_string(),
            });
        }
        if input.starts_with("s3://") {
            return S3Location::parse(input)
                .map(ImageLocation::S3)
                .map_err(|e| bad(e.to_string()));
        }
        if let Some((scheme, _)) = input.split_once("://") {
            if scheme != "docker" {
                return Err(bad(format!(
                    "unknown scheme {scheme}://; use dir:, docker:// or s3://"
                )));
            }
        }
        ImageRef::parse(input)
            .map(ImageLocation::Registry)
            .map_err(|e| bad(e.to_string()))
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Dir { path, tag } => write!(f, "dir:{}:{tag}", path.display()),
            ImageLocation::Registry(r) => write!(f, "docker://{r}"),
            ImageLocation::S3(l) => write!(f, "{l}"),
        }
    }
}

/// Connection settings for remote stores.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub connect_timeout: std::time::Duration,
    /// Limit on each wait for data from the server.
    pub read_timeout: std::time::Duration,
    /// Buckets an image's external blobs may be in besides its own (`"*"`: any); see
    /// `crate::external`.
    pub external_buckets: Vec<String>,
    /// Registries (`host[:port]`) reached over plain http when https fails.
    pub insecure_registries: Vec<String>,
    /// Where blob reads go before the origin (`crate::mirror`).
    pub mirrors: Arc<Mirrors>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: std::time::Duration::from_secs(5),
            read_timeout: std::time::Duration::from_secs(10),
            external_buckets: Vec::new(),
            insecure_registries: Vec::new(),
            mirrors: Arc::new(Mirrors::default()),
        }
    }
}

/// A registry client for `registry` with docker's stored credentials and `opts`' timeouts.
pub fn registry_client(
    registry: &str,
    opts: &RemoteOptions,
) -> Result<RegistryClient, RegistryError> {
    let plain_http = if opts.insecure_registries.iter().any(|r| r == registry) {
        PlainHttp::Fallback
    } else {
        PlainHttp::Loopback
    };
    RegistryClient::new(
        registry,
        ClientOptions {
            credentials: docker_config_credentials(registry),
            connect_timeout: opts.connect_timeout,
            read_timeout: opts.read_timeout,
            plain_http,
            ..ClientOptions::default()
        },
    )
}

/// An S3 client for `location` from the AWS environment, with `opts`' timeouts and at most
/// `max_attempts` attempts per request (1 for mounts: the fetcher retries with its own policy).
pub async fn s3_store(
    location: &S3Location,
    opts: &RemoteOptions,
    max_attempts: u32,
) -> Result<S3Store, S3Error> {
    S3Store::connect(
        location.clone(),
        &S3Options {
            connect_timeout: opts.connect_timeout,
            read_timeout: opts.read_timeout,
            max_attempts,
            ..S3Options::default()
        },
    )
    .await
}

/// An image opened for mounting.
#[derive(Clone)]
pub struct OpenedImage {
    pub location: ImageLocation,
    pub manifest: LazyManifest,
    pub manifest_digest: String,
    pub index: Arc<Index>,
    /// Where its data blobs are read from.
    pub store: Arc<dyn BlobStore>,
}

impl OpenedImage {
    /// Whether every data blob is a file of a local store (`dir:` without blobs stored
    /// elsewhere): such an image is read from disk, not through the fetcher and chunk cache.
    pub fn is_local(&self) -> bool {
        matches!(self.location, ImageLocation::Dir { .. }) && !self.manifest.has_external_blobs()
    }
}

/// Opens the image at `location`: fetches and checks its manifest and index.
///
/// With `cache_dir`, what was fetched is kept there: indexes by digest (`CACHE/indexes`, reused
/// when they verify) and the lazy manifest last seen at each location (`CACHE/manifests`). When
/// the backend cannot be reached (a transient error), the kept manifest is used instead, with a
/// warning, so an image opened or warmed here before opens with its registry down.
pub async fn open_image(
    location: &ImageLocation,
    opts: &RemoteOptions,
    cache_dir: Option<&Path>,
) -> Result<OpenedImage, RemoteError> {
    let (fetched, store): (Result<Vec<u8>, RemoteError>, Arc<dyn BlobStore>) = match location {
        ImageLocation::Dir { path, tag } => {
            // The store's own checks, on the index mapped in place (no copy).
            let image = LocalStore::open(path)?.open_image(tag)?;
            let own: Arc<dyn BlobStore> = Arc::new(DirBlobStore::new(path));
            let store = route_external(own, &image.manifest, location, opts).await?;
            return Ok(OpenedImage {
                location: location.clone(),
                manifest: image.manifest,
                manifest_digest: image.manifest_digest,
                index: image.index,
                store,
            });
        }
        ImageLocation::Registry(image) => {
            let client = registry_client(&image.registry, opts)?;
            let fetched = lazy_manifest_in_registry(&client, image).await;
            let store = RegistryBlobStore::new(client, &image.repository)?;
            let store = opts
                .mirrors
                .registry_store(&image.registry, &image.repository, store)?;
            (fetched, store)
        }
        ImageLocation::S3(l) => {
            let s3 = s3_store(l, opts, 1).await?;
            let key = l.manifest_key();
            let fetched = match s3.get_object(&key, MAX_MANIFEST_BYTES).await {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => Err(S3Error::NotFound {
                    url: l.object_url(&key),
                }
                .into()),
                Err(e) => Err(e.into()),
            };
            (fetched, opts.mirrors.s3_store(s3))
        }
    };
    let kept = cache_dir.map(|dir| kept_manifest_path(dir, location));
    let manifest_bytes = match (fetched, &kept) {
        (Ok(bytes), Some(path)) => {
            if let Err(e) = write_atomically(path, &bytes) {
                warn!(path = %path.display(), "cannot keep the manifest: {e}");
            }
            bytes
        }
        (Ok(bytes), None) => bytes,
        (Err(e), Some(path)) if !e.is_permanent() && path.is_file() => {
            warn!(image = %location, "backend unreachable ({e}); using the manifest kept in {}", path.display());
            std::fs::read(path).map_err(RemoteError::io(path))?
        }
        (Err(e), _) => return Err(e),
    };
    let manifest_digest = sha256_digest(&manifest_bytes);
    let manifest =
        LazyManifest::parse(&manifest_bytes).map_err(|source| RemoteError::Manifest {
            location: location.to_string(),
            source,
        })?;
    open_manifest(location, manifest, manifest_digest, store, opts, cache_dir).await
}

/// Opens the image at `location` whose lazy manifest is `manifest` (with digest
/// `manifest_digest`), without asking the backend for a manifest: a mount lazyd serves again
/// after a restart must show the same image, whatever its tag names now. Its index comes from
/// `CACHE/indexes` when kept there (else from the backend), verified against the manifest.
pub async fn open_pinned(
    location: &ImageLocation,
    manifest: LazyManifest,
    manifest_digest: String,
    opts: &RemoteOptions,
    cache_dir: Option<&Path>,
) -> Result<OpenedImage, RemoteError> {
    let store: Arc<dyn BlobStore> = match location {
        ImageLocation::Dir { path, .. } => Arc::new(DirBlobStore::new(path)),
        ImageLocation::Registry(image) => {
            let client = registry_client(&image.registry, opts)?;
            let store = RegistryBlobStore::new(client, &image.repository)?;
            opts.mirrors
                .registry_store(&image.registry, &image.repository, store)?
        }
        ImageLocation::S3(l) => opts.mirrors.s3_store(s3_store(l, opts, 1).await?),
    };
    // A local store's index is read from the store itself, as when it was mounted.
    let cache_dir = cache_dir.filter(|_| !matches!(location, ImageLocation::Dir { .. }));
    open_manifest(location, manifest, manifest_digest, store, opts, cache_dir).await
}

/// The rest of opening an image once its manifest is known: its index and where its blobs are.
async fn open_manifest(
    location: &ImageLocation,
    manifest: LazyManifest,
    manifest_digest: String,
    store: Arc<dyn BlobStore>,
    opts: &RemoteOptions,
    cache_dir: Option<&Path>,
) -> Result<OpenedImage, RemoteError> {
    let index_dir = cache_dir.map(|dir| dir.join(INDEX_DIR));
    let index = load_index(location, &manifest, store.as_ref(), index_dir.as_deref()).await?;
    // Blobs indexed in place elsewhere (`lazyctl convert --reference`) are read from there.
    let store = route_external(store, &manifest, location, opts).await?;
    Ok(OpenedImage {
        location: location.clone(),
        manifest,
        manifest_digest,
        index,
        store,
    })
}

/// `own` if `manifest` has no external blobs, else a [`RoutedBlobStore`] over it (see
/// `crate::external`). The image at `location` may name only its own bucket and those `opts`
/// allows.
async fn route_external(
    own: Arc<dyn BlobStore>,
    manifest: &LazyManifest,
    location: &ImageLocation,
    opts: &RemoteOptions,
) -> Result<Arc<dyn BlobStore>, RemoteError> {
    let image = location.to_string();
    let objects = external_objects(manifest, &image)?;
    if objects.is_empty() {
        return Ok(own);
    }
    let own_bucket = match location {
        ImageLocation::S3(l) => Some(l.bucket()),
        _ => None,
    };
    check_buckets(&objects, &image, own_bucket, &opts.external_buckets)?;
    let mut clients: HashMap<String, S3Store> = HashMap::new();
    let mut routes = HashMap::new();
    for (digest, object) in objects {
        let store = match clients.get(&object.bucket) {
            Some(store) => store.clone(),
            None => {
                let location = S3Location::parse(&format!("s3://{}", object.bucket))?;
                // One attempt per request: the fetcher retries with its own policy.
                let store = s3_store(&location, opts, 1).await?;
                clients.insert(object.bucket.clone(), store.clone());
                store
            }
        };
        routes.insert(digest, Route { store, object });
    }
    Ok(Arc::new(RoutedBlobStore::new(own, routes)))
}

/// Inside a cache directory: the chunk cache's segments.
pub const CHUNK_DIR: &str = "chunks";
/// Inside a cache directory: indexes by digest.
pub const INDEX_DIR: &str = "indexes";
/// Inside a cache directory: the last lazy manifest seen at each location.
pub const MANIFEST_DIR: &str = "manifests";
/// Inside a cache directory: image configs by digest.
pub const CONFIG_DIR: &str = "configs";
/// Largest image config accepted (configs are a few KiB; registries cap manifests at 4 MiB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The image's OCI config blob, verbatim: the lazy manifest's `config` descriptor, read from
/// `store` and checked for size and sha256. With `cache_dir` (remote images) it is kept in
/// `CACHE/configs` by digest and read from there next time, so it is available with the
/// backend down once seen; a `dir:` store is read in place.
pub async fn read_config(
    location: &ImageLocation,
    desc: &fusefs::manifest::Descriptor,
    store: &dyn BlobStore,
    cache_dir: Option<&Path>,
) -> Result<Vec<u8>, RemoteError> {
    let kept = match (location, cache_dir) {
        (ImageLocation::Dir { .. }, _) | (_, None) => None,
        (_, Some(dir)) => Some(dir.join(CONFIG_DIR).join(desc.digest.replace(':', "-"))),
    };
    if let Some(path) = &kept {
        if let Ok(bytes) = std::fs::read(path) {
            match check_config(location, desc, &bytes) {
                Ok(()) => return Ok(bytes),
                Err(e) => {
                    warn!(path = %path.display(), "kept config is unusable, fetching it again: {e}");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
    if desc.size > MAX_CONFIG_BYTES {
        return Err(BlobError::Invalid {
            store: store.id(),
            digest: desc.digest.clone(),
            reason: format!(
                "config of {} bytes is over the {MAX_CONFIG_BYTES}-byte limit",
                desc.size
            ),
        }
        .into());
    }
    let bytes = store.read_blob(&desc.digest, desc.size).await?;
    check_config(location, desc, &bytes)?;
    if let Some(path) = &kept {
        if let Err(e) = write_atomically(path, &bytes) {
            warn!(path = %path.display(), "cannot keep the image config: {e}");
        }
    }
    Ok(bytes)
}

/// Checks a config blob against its descriptor: exact size and sha256.
fn check_config(
    location: &ImageLocation,
    desc: &fusefs::manifest::Descriptor,
    bytes: &[u8],
) -> Result<(), RemoteError> {
    let actual = sha256_digest(bytes);
    if actual == desc.digest && bytes.len() as u64 == desc.size {
        Ok(())
    } else {
        Err(RemoteError::ConfigDigest {
            location: location.to_string(),
            expected: desc.digest.clone(),
            expected_size: desc.size,
            actual,
            actual_size: bytes.len() as u64,
        })
    }
}

/// Where the manifest last seen at `location` is kept: named by the sha256 of the location as
/// written, so any location string maps to a plain file name.
fn kept_manifest_path(cache_dir: &Path, location: &ImageLocation) -> PathBuf {
    cache_dir
        .join(MANIFEST_DIR)
        .join(kept_manifest_name(location))
}

/// The file name in `CACHE/manifests` of the manifest kept for `location`.
pub fn kept_manifest_name(location: &ImageLocation) -> String {
    sha256_digest(location.to_string().as_bytes()).replace(':', "-")
}

/// Writes `bytes` to `path`, creating its directory, so a reader never sees a partial file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RemoteError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(RemoteError::io(dir))?;
    Ok(crate::store::write_atomic(dir, path, bytes)?)
}

/// The manifest bytes of the lazy image `image` names: the manifest itself when it is lazy,
/// else its lazy referrer, else the tag `TAG-lazy`.
async fn lazy_manifest_in_registry(
    client: &RegistryClient,
    image: &ImageRef,
) -> Result<Vec<u8>, RemoteError> {
    let repo = &image.repository;
    let manifest = client.get_manifest(repo, &image.reference).await?;
    if LazyManifest::parse(&manifest.bytes).is_ok() {
        return Ok(manifest.bytes);
    }
    debug!(image = %image, "not a lazy image; looking for a lazy referrer");
    match client
        .referrers(repo, &manifest.digest, Some(ARTIFACT_TYPE))
        .await
    {
        Ok(referrers) => {
            if let Some(found) = referrers
                .iter()
                .rev()
                .find(|d| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
            {
                info!(image = %image, lazy = %found.digest, "using the lazy image that refers to it");
                let lazy = client
                    .get_manifest(repo, &Reference::Digest(found.digest.clone()))
                    .await?;
                return Ok(lazy.bytes);
            }
        }
        Err(e) => warn!(image = %image, "cannot list referrers: {e}"),
    }
    let lazy_tag = match &image.reference {
        Reference::Tag(tag) => format!("{tag}{LAZY_TAG_SUFFIX}"),
        Reference::Digest(_) => format!("{DEFAULT_TAG}{LAZY_TAG_SUFFIX}"),
    };
    let lazy_ref = ImageRef {
        reference: Reference::Tag(lazy_tag.clone()),
        ..image.clone()
    };
    match client
        .get_manifest(repo, &Reference::Tag(lazy_tag.clone()))
        .await
    {
        Ok(m) if LazyManifest::parse(&m.bytes).is_ok() => Ok(m.bytes),
        Ok(_) | Err(RegistryError::ManifestUnknown { .. }) => Err(RemoteError::NoLazyImage {
            location: format!("docker://{image}"),
            lazy_tag,
            lazy_ref: lazy_ref.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The image's index, verified against the manifest: from `index_dir` when a good copy is
/// there, else fetched (and then kept there).
async fn load_index(
    location: &ImageLocation,
    manifest: &LazyManifest,
    store: &dyn BlobStore,
    index_dir: Option<&Path>,
) -> Result<Arc<Index>, RemoteError> {
    let expected = manifest.index().digest.clone();
    let verify = |bytes: &[u8]| {
        let actual = sha256_digest(bytes);
        if actual == expected {
            Ok(())
        } else {
            Err(RemoteError::IndexDigest {
                location: location.to_string(),
                expected: expected.clone(),
                actual,
            })
        }
    };
    let kept = index_dir.map(|dir| dir.join(expected.replace(':', "-")));
    if let Some(path) = &kept {
        if path.is_file() {
            match Index::open_verified(path, verify) {
                Ok(index) => return Ok(index),
                Err(e) => {
                    warn!(path = %path.display(), "kept index is unusable, fetching it again: {e}");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
    let bytes = store.read_blob(&expected, MAX_INDEX_BYTES).await?;
    verify(&bytes)?;
    let Some(path) = kept else {
        return Ok(Index::from_bytes(bytes)?);
    };
    // A copy that cannot be kept (a full or read-only cache disk) costs the next mount a
    // fetch, not this one: the verified bytes are in hand.
    if let Err(e) = write_atomically(&path, &bytes) {
        warn!(path = %path.display(), "cannot keep the index, holding it in memory: {e}");
        return Ok(Index::from_bytes(bytes)?);
    }
    Index::open_verified(&path, verify)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::blobstore::MemoryBlobStore;
    use crate::external::testing::external_manifest;
    use fusefs::manifest::{Descriptor, MEDIA_TYPE_OCI_CONFIG};

    fn desc(digest: &str, size: u64) -> Descriptor {
        Descriptor {
            media_type: MEDIA_TYPE_OCI_CONFIG.into(),
            digest: digest.into(),
            size,
            urls: None,
            annotations: None,
        }
    }

    fn registry() -> ImageLocation {
        ImageLocation::parse("127.0.0.1:5000/app:v1").unwrap()
    }

    #[tokio::test]
    async fn config_is_verified_kept_and_read_back_offline() {
        let cache = tempfile::tempdir().unwrap();
        let config = br#"{"architecture":"amd64","config":{"Cmd":["sh"]}}"#.to_vec();
        let store = MemoryBlobStore::new();
        let digest = store.insert(config.clone());
        let d = desc(&digest, config.len() as u64);
        let got = read_config(&registry(), &d, &store, Some(cache.path()))
            .await
            .unwrap();
        assert_eq!(got, config);
        assert_eq!(store.requests(), 1);
        let kept = cache.path().join(CONFIG_DIR).join(digest.replace(':', "-"));
        assert_eq!(std::fs::read(&kept).unwrap(), config);
        // Kept: a second read does not ask the store (it works with the backend down).
        let empty = MemoryBlobStore::new();
        let again = read_config(&registry(), &d, &empty, Some(cache.path()))
            .await
            .unwrap();
        assert_eq!(again, config);
        assert_eq!(empty.requests(), 0);
    }

    #[tokio::test]
    async fn config_with_wrong_digest_or_size_is_refused_and_not_kept() {
        let cache = tempfile::tempdir().unwrap();
        let store = MemoryBlobStore::new();
        let digest = store.insert(b"{}".to_vec());
        // The right digest with a descriptor claiming another size.
        let e = read_config(&registry(), &desc(&digest, 3), &store, Some(cache.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, RemoteError::ConfigDigest { actual_size: 2, .. }),
            "{e}"
        );
        // Another blob's digest.
        let other = MemoryBlobStore::new();
        other.insert(b"{}".to_vec());
        let lying = desc(&format!("sha256:{}", "0".repeat(64)), 2);
        assert!(read_config(&registry(), &lying, &other, Some(cache.path()))
            .await
            .is_err());
        assert!(!cache
            .path()
            .join(CONFIG_DIR)
            .join(format!("sha256-{}", "0".repeat(64)))
            .exists());

        // A kept file that was changed on disk is refetched and replaced.
        let kept = cache.path().join(CONFIG_DIR).join(digest.replace(':', "-"));
        std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
        std::fs::write(&kept, b"{\"x\":1}").unwrap();
        let got = read_config(&registry(), &desc(&digest, 2), &store, Some(cache.path()))
            .await
            .unwrap();
        assert_eq!(got, b"{}");
        assert_eq!(std::fs::read(&kept).unwrap(), b"{}");

        // check_config names both digests.
        let bad = check_config(&registry(), &desc(&digest, 2), b"[]").unwrap_err();
        assert!(
            matches!(bad, RemoteError::ConfigDigest { ref expected, .. } if *expected == digest)
        );
        assert!(bad.is_permanent());
        assert!(bad.to_string().contains("corrupt"), "{bad}");
    }

    #[tokio::test]
    async fn oversized_config_is_refused_before_reading() {
        let store = MemoryBlobStore::new();
        let digest = store.insert(b"{}".to_vec());
        let e = read_config(
            &registry(),
            &desc(&digest, MAX_CONFIG_BYTES + 1),
            &store,
            None,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        assert_eq!(store.requests(), 0);
    }

    /// An image in the bucket its tests' blobs are in.
    fn models_image() -> ImageLocation {
        ImageLocation::parse("s3://models/lazy/llm").unwrap()
    }

    #[tokio::test]
    async fn images_name_only_their_own_bucket_and_the_allowed_ones() {
        let own: Arc<dyn BlobStore> = Arc::new(MemoryBlobStore::new());
        let m = external_manifest(&["s3://models/a.bin"]);
        let elsewhere = ImageLocation::parse("s3://other/lazy").unwrap();
        for location in [&registry(), &elsewhere] {
            let e = route_external(own.clone(), &m, location, &RemoteOptions::default())
                .await
                .err()
                .expect("refused");
            let text = e.to_string();
            assert!(
                text.contains("bucket models") && text.contains("fetch.external_buckets"),
                "{text}"
            );
            assert!(e.is_permanent());
        }
        for allowed in [vec!["models".to_string()], vec!["*".to_string()]] {
            let opts = RemoteOptions {
                external_buckets: allowed,
                ..RemoteOptions::default()
            };
            route_external(own.clone(), &m, &registry(), &opts)
                .await
                .unwrap();
        }
        route_external(own, &m, &models_image(), &RemoteOptions::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn images_without_external_blobs_keep_their_store() {
        let own: Arc<dyn BlobStore> = Arc::new(MemoryBlobStore::new());
        let routed = route_external(
            own.clone(),
            &external_manifest(&[]),
            &models_image(),
            &RemoteOptions::default(),
        )
        .await
        .unwrap();
        assert!(Arc::ptr_eq(&own, &routed));
    }

    #[tokio::test]
    async fn images_with_external_blobs_get_a_routed_store() {
        let own = Arc::new(MemoryBlobStore::new());
        let digest = own.insert(b"own bytes".to_vec());
        let m = external_manifest(&["s3://models/a.bin"]);
        let routed = route_external(own, &m, &models_image(), &RemoteOptions::default())
            .await
            .unwrap();
        assert!(routed
            .id()
            .to_string()
            .starts_with("memory + 1 referenced object(s) in s3://models ["));
        assert_eq!(routed.read_range(&digest, 0..3).await.unwrap(), b"own");
    }
}
