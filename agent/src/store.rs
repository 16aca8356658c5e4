//! The local lazy-image store (`dir:PATH`): an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) holding lazy image manifests, their index blobs and data blobs.
//! Several images (tags) share one store and its blobs. Blobs are written to `PATH/tmp`
//! first and renamed into place once complete, so a crash never leaves a partial blob under
//! its digest; `index.json` is replaced the same way.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fusefs::manifest::{is_sha256_digest, LazyManifest, MEDIA_TYPE_OCI_MANIFEST};
use fusefs::Index;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// OCI annotation naming a manifest's tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Tag used when a reference names none.
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a lazy image store (no oci-layout file); create one with lazyctl convert")]
    NotAStore(PathBuf),
    #[error("image {tag:?} not found in store {store} (tags: {available})")]
    NoSuchTag {
        tag: String,
        store: PathBuf,
        available: String,
    },
    #[error("bad digest {0:?}")]
    BadDigest(String),
    #[error("blob {digest} is corrupt: its content hashes to {actual}; re-run lazyctl convert to rebuild the image")]
    DigestMismatch { digest: String, actual: String },
    #[error("store index.json is invalid: {0}")]
    BadIndexJson(String),
    #[error(transparent)]
    Manifest(#[from] fusefs::manifest::ManifestError),
    #[error(transparent)]
    Index(#[from] fusefs::IndexError),
}

impl StoreError {
    /// Whether retrying can help (only I/O errors might be transient).
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Io { .. } => false,
            StoreError::NotAStore(_)
            | StoreError::NoSuchTag { .. }
            | StoreError::BadDigest(_)
            | StoreError::DigestMismatch { .. }
            | StoreError::BadIndexJson(_)
            | StoreError::Manifest(_)
            | StoreError::Index(_) => true,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutIndex {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<fusefs::manifest::Descriptor>,
}

/// A local lazy-image store rooted at a directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// An image opened from a store: its manifest (and digest) and its validated index.
pub struct StoredImage {
    pub manifest: LazyManifest,
    pub manifest_digest: String,
    pub index: Arc<Index>,
}

impl LocalStore {
    /// Opens an existing store.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        if !root.join("oci-layout").is_file() {
            return Err(StoreError::NotAStore(root.to_path_buf()));
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
        })
    }

    /// Opens a store, creating an empty one if `root` does not hold one yet.
    pub fn create(root: &Path) -> Result<LocalStore, StoreError> {
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        fs::create_dir_all(root.join("tmp")).map_err(io(root))?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(root, &layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            let empty = LayoutIndex {
                schema_version: 2,
                media_type: Some("application/vnd.oci.image.index.v1+json".into()),
                manifests: Vec::new(),
            };
            write_atomic(
                root,
                &index,
                &serde_json::to_vec_pretty(&empty).expect("json"),
            )?;
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `digest` lives; the digest is checked so it cannot name another path.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        if !is_sha256_digest(digest) {
            return Err(StoreError::BadDigest(digest.to_string()));
        }
        Ok(self.root.join("blobs").join("sha256").join(&digest[7..]))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// A fresh temporary file in the store, on the same filesystem as the blobs.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, StoreError> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        tempfile::NamedTempFile::new_in(&tmp).map_err(io(&tmp))
    }

    /// Moves a completed temporary file into place as blob `digest`. The caller computed
    /// the digest while writing it.
    pub fn commit_blob(
        &self,
        file: tempfile::NamedTempFile,
        digest: &str,
    ) -> Result<PathBuf, StoreError> {
        let path = self.blob_path(digest)?;
        file.as_file().sync_all().map_err(io(file.path()))?;
        file.persist(&path).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(path)
    }

    /// Stores `bytes` as a blob; returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = sha256_digest(bytes);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut tmp = self.temp_file()?;
        tmp.write_all(bytes).map_err(io(tmp.path()))?;
        self.commit_blob(tmp, &digest)?;
        Ok(digest)
    }

    /// Reads a whole blob and checks its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(&path))?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                digest: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    fn layout_index(&self) -> Result<LayoutIndex, StoreError> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::BadIndexJson(e.to_string()))
    }

    /// Points `tag` at a manifest (stored first), replacing what the tag named before.
    pub fn put_manifest(&self, tag: &str, manifest: &LazyManifest) -> Result<String, StoreError> {
        let bytes = manifest.to_json();
        let digest = self.put_blob(&bytes)?;
        let mut index = self.layout_index()?;
        index.manifests.retain(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .is_none_or(|t| t != tag)
        });
        index.manifests.push(fusefs::manifest::Descriptor {
            media_type: MEDIA_TYPE_OCI_MANIFEST.to_string(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            urls: None,
            annotations: Some([(REF_NAME.to_string(), tag.to_string())].into()),
        });
        let path = self.root.join("index.json");
        write_atomic(
            &self.root,
            &path,
            &serde_json::to_vec_pretty(&index).expect("json"),
        )?;
        Ok(digest)
    }

    /// Tags present in the store.
    pub fn tags(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .layout_index()?
            .manifests
            .iter()
            .filter_map(|d| d.annotations.as_ref()?.get(REF_NAME).cloned())
            .collect())
    }

    /// Finds the manifest digest of `tag`.
    pub fn resolve(&self, tag: &str) -> Result<String, StoreError> {
        let index = self.layout_index()?;
        index
            .manifests
            .iter()
            .find(|d| {
                d.annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|t| t == tag)
            })
            .map(|d| d.digest.clone())
            .ok_or_else(|| StoreError::NoSuchTag {
                tag: tag.to_string(),
                store: self.root.clone(),
                available: self.tags().map(|t| t.join(", ")).unwrap_or_default(),
            })
    }

    /// Reads and checks the manifest of image `tag`; returns its digest and the manifest.
    pub fn manifest(&self, tag: &str) -> Result<(String, LazyManifest), StoreError> {
        let manifest_digest = self.resolve(tag)?;
        let manifest = LazyManifest::parse(&self.read_blob(&manifest_digest)?)?;
        Ok((manifest_digest, manifest))
    }

    /// Opens image `tag`: reads and checks its manifest, reads the index blob into memory,
    /// verifies its digest and validates it.
    ///
    /// The index is read, not mapped: whoever can write the store (it is the user's directory)
    /// could truncate a mapped file under lazyd and kill it with SIGBUS. The bytes read are the
    /// bytes checked and served.
    pub fn open_image(&self, tag: &str) -> Result<StoredImage, StoreError> {
        let (manifest_digest, manifest) = self.manifest(tag)?;
        let index_digest = manifest.index().digest.clone();
        let path = self.blob_path(&index_digest)?;
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(&path))?;
        let index = Index::from_bytes_verified(bytes, |bytes| {
            let actual = sha256_digest(bytes);
            if actual == index_digest {
                Ok(())
            } else {
                Err(StoreError::DigestMismatch {
                    digest: index_digest.clone(),
                    actual,
                })
            }
        })?;
        Ok(StoredImage {
            manifest,
            manifest_digest,
            index,
        })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes `bytes` to `path` (in `dir`) through a temporary file, so a reader never sees a
/// partial file.
pub(crate) fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| StoreError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}
