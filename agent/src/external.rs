//! Blobs stored outside an image's own store: `lazyctl convert --reference` indexes existing S3
//! objects in place, and the manifest names each one in its descriptor's `urls`
//! (`s3://BUCKET/KEY`, media type `MEDIA_TYPE_BLOB_EXTERNAL`), with the object's ETag and size
//! as annotations. Such a blob's chunks are byte ranges of the object, stored uncompressed.
//!
//! This module owns the rules and the reads: which blobs are external ([`external_objects`]:
//! only `s3://` urls are accepted, any other url is an error when the image is opened), which
//! buckets an image may name ([`check_buckets`]), and [`RoutedBlobStore`], which reads those
//! digests as range GETs of their objects and everything else from the image's own store.
//! Opening an image (`remote::open_image`) applies the rules and builds the S3 clients (one per
//! bucket, endpoint and credentials from the AWS environment as for `s3://` images); this module
//! knows only blob stores and S3 stores.
//!
//! Each GET checks the object's ETag against the one recorded at indexing, so a replaced
//! object is refused as [`BlobError::Changed`], and a deleted one is reported as
//! [`BlobError::Deleted`]; the fetcher's blake3 check of every chunk stays the last word (it
//! also catches a store that keeps the ETag of changed bytes). Both are permanent errors: the
//! read fails with EIO and the fetcher logs why.
//!
//! The objects are read with the agent's own AWS credentials, so an image may name only its own
//! bucket (an `s3://` image's) and the buckets `RemoteOptions::external_buckets` lists: an image
//! from a registry cannot point the agent's credentials at any bucket it likes.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use fusefs::manifest::{LazyManifest, ANNOTATION_ETAG};
use thiserror::Error;

use crate::blobstore::{too_large, BackendId, BlobError, BlobStore};
use crate::s3::{S3Location, S3Store};

/// An image whose external blobs cannot be read. Permanent: the image must be converted again
/// or the agent configured otherwise.
#[derive(Debug, Error)]
pub enum ExternalError {
    #[error("blob {blob} of {image} is stored at {url}, which lazyd cannot fetch (only s3:// urls); re-run lazyctl convert --reference with an s3:// source")]
    UnfetchableBlob {
        blob: String,
        image: String,
        url: String,
    },
    #[error("{image} names blobs in bucket {bucket}, which this agent may not read for it; if you trust the image, add the bucket to fetch.external_buckets")]
    Bucket { image: String, bucket: String },
}

impl ExternalError {
    /// Whether trying again cannot help: always, the image or the configuration must change.
    pub fn is_permanent(&self) -> bool {
        match self {
            ExternalError::UnfetchableBlob { .. } | ExternalError::Bucket { .. } => true,
        }
    }
}

/// Where one external blob is: its object and what it was when indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalObject {
    /// `s3://BUCKET/KEY`, as the manifest says.
    pub url: String,
    pub bucket: String,
    pub key: String,
    /// The object's ETag when it was indexed, if recorded.
    pub etag: Option<String>,
    /// The object's size (the descriptor's size).
    pub size: u64,
}

/// Parses `s3://BUCKET/KEY` (the key may hold any characters but must not be empty).
pub fn parse_s3_url(url: &str) -> Option<(S3Location, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    if key.is_empty() {
        return None;
    }
    let location = S3Location::parse(&format!("s3://{bucket}")).ok()?;
    Some((location, key.to_string()))
}

/// The external blobs `manifest` names, by digest. `image` names the image in errors.
pub fn external_objects(
    manifest: &LazyManifest,
    image: &str,
) -> Result<HashMap<String, ExternalObject>, ExternalError> {
    let mut objects = HashMap::new();
    for d in manifest.blobs() {
        let Some(url) = d.external_url() else {
            continue;
        };
        let Some((location, key)) = parse_s3_url(url) else {
            return Err(ExternalError::UnfetchableBlob {
                blob: d.digest.clone(),
                image: image.to_string(),
                url: url.to_string(),
            });
        };
        objects.insert(
            d.digest.clone(),
            ExternalObject {
                url: url.to_string(),
                bucket: location.bucket().to_string(),
                key,
                etag: d
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_ETAG))
                    .cloned(),
                size: d.size,
            },
        );
    }
    Ok(objects)
}

/// Refuses `objects` of the image `image` unless each is in `own_bucket` (an `s3://` image's
/// bucket) or a bucket `allowed` lists (`"*"`: any).
pub fn check_buckets(
    objects: &HashMap<String, ExternalObject>,
    image: &str,
    own_bucket: Option<&str>,
    allowed: &[String],
) -> Result<(), ExternalError> {
    let allowed = |bucket: &str| {
        own_bucket == Some(bucket) || allowed.iter().any(|b| b == "*" || b == bucket)
    };
    match objects.values().find(|o| !allowed(&o.bucket)) {
        Some(object) => Err(ExternalError::Bucket {
            image: image.to_string(),
            bucket: object.bucket.clone(),
        }),
        None => Ok(()),
    }
}

/// One external blob: the S3 store its object's bucket is read through, and the object.
pub(crate) struct Route {
    pub(crate) store: S3Store,
    pub(crate) object: ExternalObject,
}

/// An image's own store plus the S3 objects its external blobs are (see the module docs).
pub struct RoutedBlobStore {
    own: Arc<dyn BlobStore>,
    routes: HashMap<String, Route>,
    id: BackendId,
}

impl RoutedBlobStore {
    /// Reads the blobs `routes` has (by digest) from their objects, the others from `own`.
    pub(crate) fn new(own: Arc<dyn BlobStore>, routes: HashMap<String, Route>) -> RoutedBlobStore {
        let buckets: BTreeSet<&str> = routes.values().map(|r| r.object.bucket.as_str()).collect();
        // The fetcher shares one backend between stores of the same identity: it must tell
        // this set of routes from another image's at the same location (a re-conversion).
        let mut set: Vec<(&String, &str, Option<&str>)> = routes
            .iter()
            .map(|(d, r)| (d, r.object.url.as_str(), r.object.etag.as_deref()))
            .collect();
        set.sort();
        let fingerprint = crate::store::sha256_digest(format!("{set:?}").as_bytes());
        let id = BackendId::routed(
            own.id(),
            buckets.into_iter().map(str::to_string).collect(),
            routes.len(),
            fingerprint[7..19].to_string(),
        );
        RoutedBlobStore { own, routes, id }
    }

    /// Refuses a range past the end of the object (its size as indexed).
    fn check_range(
        &self,
        digest: &str,
        route: &Route,
        range: &Range<u64>,
    ) -> Result<(), BlobError> {
        if range.end > route.object.size {
            return Err(BlobError::Invalid {
                store: self.id.clone(),
                digest: digest.to_string(),
                reason: format!(
                    "range {}..{} is outside {}'s {} bytes",
                    range.start, range.end, route.object.url, route.object.size
                ),
            });
        }
        Ok(())
    }

    /// An S3 error about a referenced object, as this store's: a missing object was deleted
    /// since the image was indexed, a changed one is named with this store.
    fn explain(&self, digest: &str, object: &ExternalObject, e: BlobError) -> BlobError {
        match e {
            BlobError::NotFound { .. } => BlobError::Deleted {
                store: self.id.clone(),
                digest: digest.to_string(),
                object: object.url.clone(),
            },
            BlobError::Changed { change, .. } => BlobError::Changed {
                store: self.id.clone(),
                digest: digest.to_string(),
                change,
            },
            other => other,
        }
    }
}

#[async_trait]
impl BlobStore for RoutedBlobStore {
    fn id(&self) -> BackendId {
        self.id.clone()
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        let Some(route) = self.routes.get(digest) else {
            return self.own.read_range(digest, range).await;
        };
        self.check_range(digest, route, &range)?;
        route
            .store
            .read_object_range(
                digest,
                &route.object.key,
                range,
                route.object.etag.as_deref(),
            )
            .await
            .map_err(|e| self.explain(digest, &route.object, e))
    }

    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        let Some(route) = self.routes.get(digest) else {
            return self.own.read_range_to(digest, range, sink).await;
        };
        self.check_range(digest, route, &range)?;
        route
            .store
            .read_object_range_to(
                digest,
                &route.object.key,
                range,
                route.object.etag.as_deref(),
                sink,
            )
            .await
            .map_err(|e| self.explain(digest, &route.object, e))
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        let Some(route) = self.routes.get(digest) else {
            return self.own.read_blob(digest, max_size).await;
        };
        if route.object.size > max_size {
            return Err(too_large(&self.id, digest, route.object.size, max_size));
        }
        self.read_range(digest, 0..route.object.size).await
    }
}

/// Manifests with external blobs, for the tests of this module and of `remote`.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use fusefs::manifest::{
        Descriptor, LazyManifest, ANNOTATION_ETAG, MEDIA_TYPE_BLOB, MEDIA_TYPE_BLOB_EXTERNAL,
        MEDIA_TYPE_INDEX, MEDIA_TYPE_OCI_CONFIG,
    };

    /// A descriptor of a 100-byte blob named by `c`, stored at `url` when there is one.
    fn desc(media_type: &str, c: char, url: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 100,
            urls: url.map(|u| vec![u.to_string()]),
            annotations: url.map(|_| BTreeMap::from([(ANNOTATION_ETAG.into(), "\"e1\"".into())])),
        }
    }

    /// A manifest with one blob of its own and external blobs at `urls`.
    pub(crate) fn external_manifest(urls: &[&str]) -> LazyManifest {
        let chars = ['c', 'd', 'e', 'f'];
        let mut blobs = vec![desc(MEDIA_TYPE_BLOB, '1', None)];
        for (url, c) in urls.iter().zip(chars) {
            blobs.push(desc(MEDIA_TYPE_BLOB_EXTERNAL, c, Some(url)));
        }
        LazyManifest::new(
            desc(MEDIA_TYPE_OCI_CONFIG, 'a', None),
            desc(MEDIA_TYPE_INDEX, 'b', None),
            blobs,
        )
    }
}

#[cfg(test)]
mod tests {

    use super::testing::external_manifest;
    use super::*;
    use crate::blobstore::MemoryBlobStore;
    use crate::s3::S3Options;

    #[test]
    fn s3_urls_are_split_into_bucket_and_key() {
        let (location, key) = parse_s3_url("s3://models/raw/m/x.safetensors").unwrap();
        assert_eq!(location.bucket(), "models");
        assert_eq!(key, "raw/m/x.safetensors");
        // Keys keep what S3 allows in them.
        assert_eq!(parse_s3_url("s3://models/a//b c").unwrap().1, "a//b c");
        assert!(parse_s3_url("s3://models").is_none());
        assert!(parse_s3_url("s3://models/").is_none());
        assert!(parse_s3_url("https://models/x").is_none());
    }

    #[test]
    fn external_blobs_are_found_with_their_etag_and_other_urls_refused() {
        let objects = external_objects(
            &external_manifest(&["s3://models/a.bin", "s3://other/b.bin"]),
            "img",
        )
        .unwrap();
        assert_eq!(objects.len(), 2);
        let a = &objects[&format!("sha256:{}", "c".repeat(64))];
        assert_eq!((a.bucket.as_str(), a.key.as_str()), ("models", "a.bin"));
        assert_eq!(a.etag.as_deref(), Some("\"e1\""));
        assert_eq!(a.size, 100);

        let e = external_objects(
            &external_manifest(&["https://example.com/a.bin"]),
            "s3://lazy/img",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("sha256:{}", "c".repeat(64)))
                && text.contains("s3://lazy/img")
                && text.contains("https://example.com/a.bin")
                && text.contains("only s3:// urls"),
            "{text}"
        );
        assert!(e.is_permanent());
    }

    /// A routed store over `own` for the external blobs of `m`, as opening the image builds it.
    async fn routed(own: Arc<dyn BlobStore>, m: &LazyManifest) -> RoutedBlobStore {
        let mut routes = HashMap::new();
        for (digest, object) in external_objects(m, "s3://models/lazy/llm").unwrap() {
            let location = S3Location::parse(&format!("s3://{}", object.bucket)).unwrap();
            let opts = S3Options {
                region: Some("us-east-1".into()),
                ..S3Options::default()
            };
            let store = S3Store::connect(location, &opts).await.unwrap();
            routes.insert(digest, Route { store, object });
        }
        RoutedBlobStore::new(own, routes)
    }

    #[test]
    fn only_the_images_own_bucket_and_the_allowed_ones_pass() {
        let objects = external_objects(&external_manifest(&["s3://models/a.bin"]), "img").unwrap();
        for own in [None, Some("other")] {
            let e = check_buckets(&objects, "img", own, &[]).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("bucket models") && text.contains("fetch.external_buckets"),
                "{text}"
            );
            assert!(e.is_permanent());
        }
        for allowed in [vec!["models".to_string()], vec!["*".to_string()]] {
            check_buckets(&objects, "img", None, &allowed).unwrap();
        }
        check_buckets(&objects, "img", Some("models"), &[]).unwrap();
    }

    #[tokio::test]
    async fn routed_store_names_its_routes_and_reads_own_blobs_from_its_store() {
        let own = Arc::new(MemoryBlobStore::new());
        let digest = own.insert(b"own bytes".to_vec());
        let m1 = external_manifest(&["s3://models/a.bin"]);
        let m2 = external_manifest(&["s3://models/b.bin"]);
        let r1 = routed(own.clone(), &m1).await;
        let r2 = routed(own.clone(), &m2).await;
        assert_eq!(r1.id().kind(), "memory");
        assert!(r1
            .id()
            .to_string()
            .starts_with("memory + 1 referenced object(s) in s3://models ["));
        assert_ne!(r1.id(), r2.id(), "another set of objects, another backend");
        assert_ne!(r1.id().to_string(), r2.id().to_string());
        assert_eq!(r1.id(), routed(own.clone(), &m1).await.id());
        assert_eq!(r1.read_range(&digest, 0..3).await.unwrap(), b"own");
        // A range past the object's indexed size is refused before any request.
        let external = format!("sha256:{}", "c".repeat(64));
        let e = r1.read_range(&external, 50..101).await.unwrap_err();
        assert!(e.to_string().contains("outside s3://models/a.bin"), "{e}");
    }
}
