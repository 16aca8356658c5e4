//! The image manifest: a standard OCI image manifest whose `artifactType` marks it as a lazy
//! image, whose config is the source image's config (entrypoint, env, ... for runtimes), and
//! whose layers are the index blob (first) followed by the data blobs. Any OCI registry stores
//! it as is; the index is named by its digest, so it is verified like every other blob.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// `artifactType` of a lazy image manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazyimg.image.v1";
/// Media type of the index blob.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.lazyimg.index.v1";
/// Media type of a data blob (independently zstd-compressed chunks, concatenated).
pub const MEDIA_TYPE_BLOB: &str = "application/vnd.lazyimg.blob.v1";
/// Media type of a data blob stored elsewhere (`lazyctl convert --reference`): an existing
/// object, indexed in place, whose descriptor names it in `urls` (`s3://BUCKET/KEY`). Its
/// chunks are byte ranges of the object, all stored uncompressed; its digest is the object's
/// sha256 when it was indexed. Pushes skip it: it is not in any store.
pub const MEDIA_TYPE_BLOB_EXTERNAL: &str = "application/vnd.lazyimg.blob.external.v1";
/// Annotation on an external blob: the object's ETag when it was indexed.
pub const ANNOTATION_ETAG: &str = "dev.lazyimg.etag";
/// Annotation on an external blob: the object's size in bytes when it was indexed.
pub const ANNOTATION_OBJECT_SIZE: &str = "dev.lazyimg.object-size";
/// Annotation on a data blob: the digest of the source layer it was converted from.
pub const ANNOTATION_SOURCE_LAYER: &str = "dev.lazyimg.source-layer";
/// Annotation on the manifest: the source image reference.
pub const ANNOTATION_SOURCE: &str = "dev.lazyimg.source";

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a lazy image manifest: {0}")]
    NotLazy(String),
    #[error("bad digest {0:?} in manifest")]
    BadDigest(String),
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// Where the blob is stored when it is in none of the image's stores (OCI's field for
    /// foreign layers); set only on [`MEDIA_TYPE_BLOB_EXTERNAL`] blobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// The blob's location outside the image's stores, if it has one.
    pub fn external_url(&self) -> Option<&str> {
        self.urls
            .as_ref()
            .and_then(|u| u.first())
            .map(String::as_str)
    }
}

/// A lazy image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LazyManifest {
    pub schema_version: u32,
    pub media_type: String,
    pub artifact_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Checks `sha256:` followed by 64 lower-case hex digits.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

impl LazyManifest {
    pub fn new(config: Descriptor, index: Descriptor, blobs: Vec<Descriptor>) -> LazyManifest {
        let mut layers = vec![index];
        layers.extend(blobs);
        LazyManifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_OCI_MANIFEST.to_string(),
            artifact_type: ARTIFACT_TYPE.to_string(),
            config,
            layers,
            subject: None,
            annotations: None,
        }
    }

    /// Parses and checks a manifest: the artifact type, one index layer first, data blobs
    /// after it, and well-formed digests everywhere.
    pub fn parse(bytes: &[u8]) -> Result<LazyManifest, ManifestError> {
        let m: LazyManifest = serde_json::from_slice(bytes)?;
        if m.schema_version != 2 || m.artifact_type != ARTIFACT_TYPE {
            return Err(ManifestError::NotLazy(format!(
                "artifactType is {:?}, expected {ARTIFACT_TYPE:?}; convert the image with lazyctl convert",
                m.artifact_type
            )));
        }
        match m.layers.first() {
            Some(d) if d.media_type == MEDIA_TYPE_INDEX => {}
            _ => {
                return Err(ManifestError::NotLazy(
                    "first layer is not the index".into(),
                ))
            }
        }
        for d in &m.layers[1..] {
            let has_urls = d.urls.as_ref().is_some_and(|u| !u.is_empty());
            match (d.media_type.as_str(), has_urls) {
                (MEDIA_TYPE_BLOB, false) | (MEDIA_TYPE_BLOB_EXTERNAL, true) => {}
                (MEDIA_TYPE_BLOB, true) => {
                    return Err(ManifestError::NotLazy(format!(
                        "data blob {} has urls but is not of type {MEDIA_TYPE_BLOB_EXTERNAL}",
                        d.digest
                    )))
                }
                (MEDIA_TYPE_BLOB_EXTERNAL, false) => {
                    return Err(ManifestError::NotLazy(format!(
                        "external blob {} has no urls",
                        d.digest
                    )))
                }
                (other, _) => {
                    return Err(ManifestError::NotLazy(format!(
                        "unknown layer media type {other:?}"
                    )))
                }
            }
        }
        if m.config.urls.is_some() || m.layers[0].urls.is_some() {
            return Err(ManifestError::NotLazy(
                "the config and the index must be stored with the image (no urls)".into(),
            ));
        }
        for d in std::iter::once(&m.config).chain(&m.layers) {
            if !is_sha256_digest(&d.digest) {
                return Err(ManifestError::BadDigest(d.digest.clone()));
            }
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }

    /// The index blob's descriptor.
    pub fn index(&self) -> &Descriptor {
        &self.layers[0]
    }

    /// The data blobs' descriptors.
    pub fn blobs(&self) -> &[Descriptor] {
        &self.layers[1..]
    }

    /// Whether some data blob is stored elsewhere (`urls`: an image made with `--reference`).
    pub fn has_external_blobs(&self) -> bool {
        self.blobs().iter().any(|d| d.external_url().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(mt: &str, c: char) -> Descriptor {
        Descriptor {
            media_type: mt.into(),
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 1,
            urls: None,
            annotations: None,
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let m = LazyManifest::new(
            desc(MEDIA_TYPE_OCI_CONFIG, 'a'),
            desc(MEDIA_TYPE_INDEX, 'b'),
            vec![desc(MEDIA_TYPE_BLOB, 'c')],
        );
        let parsed = LazyManifest::parse(&m.to_json()).unwrap();
        assert_eq!(parsed, m);
        assert_eq!(parsed.blobs().len(), 1);
        assert!(!parsed.has_external_blobs());

        let mut bad = m.clone();
        bad.layers[0].digest = "sha256:../../etc/passwd".into();
        assert!(matches!(
            LazyManifest::parse(&bad.to_json()),
            Err(ManifestError::BadDigest(_))
        ));
        let mut bad = m.clone();
        bad.artifact_type = "x".into();
        assert!(LazyManifest::parse(&bad.to_json()).is_err());
        assert!(LazyManifest::parse(b"{").is_err());
    }

    #[test]
    fn external_blobs_need_urls_and_their_own_media_type() {
        let mut external = desc(MEDIA_TYPE_BLOB_EXTERNAL, 'c');
        external.urls = Some(vec!["s3://models/raw/a.safetensors".into()]);
        let m = LazyManifest::new(
            desc(MEDIA_TYPE_OCI_CONFIG, 'a'),
            desc(MEDIA_TYPE_INDEX, 'b'),
            vec![external.clone(), desc(MEDIA_TYPE_BLOB, 'd')],
        );
        let parsed = LazyManifest::parse(&m.to_json()).unwrap();
        assert_eq!(
            parsed.blobs()[0].external_url(),
            Some("s3://models/raw/a.safetensors")
        );
        assert_eq!(parsed.blobs()[1].external_url(), None);
        assert!(parsed.has_external_blobs());
        let json = String::from_utf8(m.to_json()).unwrap();
        assert_eq!(json.matches("\"urls\"").count(), 1, "{json}");

        let mut bad = m.clone();
        bad.layers[1].urls = None;
        assert!(LazyManifest::parse(&bad.to_json()).is_err());
        let mut bad = m.clone();
        bad.layers[2].urls = external.urls.clone();
        assert!(LazyManifest::parse(&bad.to_json()).is_err());
        let mut bad = m;
        bad.layers[0].urls = external.urls;
        assert!(LazyManifest::parse(&bad.to_json()).is_err());
    }
}
