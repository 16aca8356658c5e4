//! `lazyctl convert s3://BUCKET/PREFIX/ DST`: the objects under an S3 prefix as plain files
//! (model shards, config, tokenizer, anything), the way `path:DIR` reads a directory.
//!
//! Every object under `PREFIX/` is listed (ListObjectsV2, all pages) and its key, relative to
//! the prefix, becomes its path in the image: directories are created as needed (0755), files
//! are 0644, everything is owned by root, and a file's mtime is the object's LastModified.
//! Zero-byte keys ending in `/` are directory markers (an empty directory when nothing else is
//! in it). Keys that cannot be paths are refused before anything is read, naming the key: `.`
//! or `..` components, empty components (`a//b`, a leading `/`), components over 255 bytes, and
//! a key that is both a file and a directory (`a` and `a/b`).
//!
//! Two ways to use them:
//!
//! - [`apply_objects`] streams each object through the packer (chunked, compressed per
//!   `--compression`, into the image's own data blob), a few MiB at a time whatever its size;
//! - [`index_objects`] (`--reference`) reads each object once to cut its chunks and hash them,
//!   but stores nothing: each object becomes an external blob (see `fusefs::manifest`) whose
//!   chunks are byte ranges of the object, uncompressed, cut exactly as the packer cuts a large
//!   file; a smaller file is one chunk, the whole object; no packing across objects.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use agent::remote::{s3_store, RemoteOptions};
use agent::s3::{ListedObject, ObjectBody, S3Location, S3Store};
use fusefs::format::{BlobRecord, ChunkRecord, ExtentRecord, CHUNK_UNCOMPRESSED, NAME_MAX};
use fusefs::manifest::{
    Descriptor, ANNOTATION_ETAG, ANNOTATION_OBJECT_SIZE, MEDIA_TYPE_BLOB_EXTERNAL,
};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::error::ConvertError;
use crate::packer::{ChunkTable, LayerPacker};
use crate::tree::{dir_node, file_node, Meta, Tree};

/// Mode of every file made from an object.
const FILE_MODE: u32 = 0o644;
/// Mode of every directory.
const DIR_MODE: u32 = 0o755;

/// One listed object, with its path in the image.
#[derive(Debug, Clone)]
pub struct SourceObject {
    pub listed: ListedObject,
    /// Path components from the image root.
    pub path: Vec<Vec<u8>>,
    /// A zero-byte `.../` directory marker.
    pub is_dir: bool,
}

/// The S3 side of a conversion: a runtime to drive the client from the converter's thread.
pub struct ObjectSource {
    runtime: tokio::runtime::Runtime,
    store: S3Store,
    location: S3Location,
    pub objects: Vec<SourceObject>,
}

fn err(msg: String) -> ConvertError {
    ConvertError::Source(msg)
}

/// The key prefix to list for `location`: `PREFIX/`, or everything for a bucket root.
fn list_prefix(location: &S3Location) -> String {
    if location.prefix().is_empty() {
        String::new()
    } else {
        format!("{}/", location.prefix())
    }
}

/// Maps listed objects to image paths, refusing keys that cannot be paths (see the module
/// docs). `listing` names the listed prefix in errors.
pub fn map_keys(
    objects: Vec<ListedObject>,
    prefix: &str,
    listing: &str,
) -> Result<Vec<SourceObject>, ConvertError> {
    let refuse = |key: &str, reason: &str| {
        err(format!(
            "object key {key:?} under {listing} cannot be a path in the image: {reason}; rename \
             or remove the object"
        ))
    };
    #[derive(PartialEq)]
    enum Kind {
        File,
        Dir,
    }
    let mut kinds: HashMap<Vec<Vec<u8>>, Kind> = HashMap::new();
    let mut out = Vec::new();
    for listed in objects {
        let key = listed.key.clone();
        let Some(rel) = key.strip_prefix(prefix) else {
            return Err(refuse(&key, "it is outside the listed prefix"));
        };
        if rel.is_empty() && !prefix.is_empty() && listed.size == 0 {
            // The directory marker of the prefix itself: the image root.
            continue;
        }
        let (rel, is_dir) = match rel.strip_suffix('/') {
            Some(dir) => (dir, true),
            None => (rel, false),
        };
        if is_dir && listed.size != 0 {
            return Err(refuse(
                &key,
                "it ends in `/` but holds data (only zero-byte directory markers may)",
            ));
        }
        if rel.is_empty() {
            if is_dir {
                // The marker of the prefix itself: the image root.
                continue;
            }
            return Err(refuse(&key, "it has an empty path"));
        }
        let mut path = Vec::new();
        for c in rel.split('/') {
            match c {
                "" => {
                    return Err(refuse(
                        &key,
                        "it has an empty path component (`//` or a leading `/`)",
                    ))
                }
                "." | ".." => return Err(refuse(&key, &format!("it has a `{c}` component"))),
                c if c.len() > NAME_MAX => {
                    return Err(refuse(&key, "a path component is longer than 255 bytes"))
                }
                c if c.contains('\0') => return Err(refuse(&key, "it contains a NUL byte")),
                c => path.push(c.as_bytes().to_vec()),
            }
        }
        for i in 1..path.len() {
            match kinds.get(&path[..i]) {
                Some(Kind::File) => {
                    return Err(refuse(
                        &key,
                        &format!(
                            "{:?} is also a file (a path cannot be a file and a directory)",
                            String::from_utf8_lossy(&path[..i].join(&b'/'))
                        ),
                    ))
                }
                Some(Kind::Dir) => {}
                None => {
                    kinds.insert(path[..i].to_vec(), Kind::Dir);
                }
            }
        }
        let kind = if is_dir { Kind::Dir } else { Kind::File };
        match kinds.get(&path) {
            Some(existing) if *existing != kind || kind == Kind::File => {
                return Err(refuse(
                    &key,
                    "another key makes the same path a directory (a path cannot be a file and a \
                     directory)",
                ))
            }
            _ => {
                kinds.insert(path.clone(), kind);
            }
        }
        out.push(SourceObject {
            listed,
            path,
            is_dir,
        });
    }
    Ok(out)
}

impl ObjectSource {
    /// Lists every object under `location` and maps keys to paths; reads no object yet.
    pub fn open(
        location: &S3Location,
        remote: &RemoteOptions,
    ) -> Result<ObjectSource, ConvertError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(ConvertError::io("starting a runtime"))?;
        let store = runtime
            .block_on(s3_store(location, remote, 3))
            .map_err(|e| err(format!("{location}: {e}")))?;
        let prefix = list_prefix(location);
        let listed = runtime
            .block_on(store.list_objects(&prefix))
            .map_err(|e| err(format!("listing {location}/: {e}")))?;
        let objects = map_keys(listed, &prefix, &format!("{location}/"))?;
        if objects.is_empty() {
            return Err(err(format!(
                "no objects under {location}/: check the bucket and prefix"
            )));
        }
        info!(source = %location, objects = objects.len(), "listed the S3 source");
        Ok(ObjectSource {
            runtime,
            store,
            location: location.clone(),
            objects,
        })
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.location.bucket())
    }

    fn get(&self, key: &str) -> Result<ObjectReader<'_>, ConvertError> {
        let body = self
            .runtime
            .block_on(self.store.open_object(key))
            .map_err(|e| err(format!("reading {}: {e}", self.url(key))))?;
        Ok(ObjectReader {
            runtime: &self.runtime,
            body,
            piece: Vec::new(),
            at: 0,
        })
    }
}

fn meta(mode: u32, listed: &ListedObject) -> Meta {
    let (mtime_sec, mtime_nsec) = listed.last_modified.unwrap_or((0, 0));
    Meta {
        mode,
        mtime_sec,
        mtime_nsec,
        ..Meta::default()
    }
}

/// A GET's body as a blocking `Read`, for the packer's thread.
struct ObjectReader<'a> {
    runtime: &'a tokio::runtime::Runtime,
    body: ObjectBody,
    piece: Vec<u8>,
    at: usize,
}

impl Read for ObjectReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.piece.len() {
            match self.runtime.block_on(self.body.next()) {
                Ok(Some(bytes)) => {
                    self.piece.clear();
                    self.piece.extend_from_slice(&bytes);
                    self.at = 0;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Adds every object of `source` to `tree` as layer 0, its data through `packer`. Returns the
/// number of entries added.
pub fn apply_objects(
    source: &ObjectSource,
    tree: &mut Tree,
    packer: &mut LayerPacker,
) -> Result<u64, ConvertError> {
    for object in &source.objects {
        let listed = &object.listed;
        let url = source.url(&listed.key);
        if object.is_dir {
            tree.insert(&object.path, dir_node(meta(DIR_MODE, listed)), 0)
                .map_err(|e| err(format!("{url}: {e}")))?;
            continue;
        }
        let mut reader = source.get(&listed.key)?;
        let what = || url.clone();
        let extents = packer.add_file(&mut reader, listed.size, &object.path, &what)?;
        let mut extra = [0u8; 1];
        if reader
            .read(&mut extra)
            .map_err(ConvertError::io(format!("reading {url}")))?
            != 0
        {
            return Err(err(format!(
                "{url} is longer than the {} bytes it was listed with: it changed during the \
                 conversion; run lazyctl convert again",
                listed.size
            )));
        }
        tree.insert(
            &object.path,
            file_node(meta(FILE_MODE, listed), listed.size, extents),
            0,
        )
        .map_err(|e| err(format!("{url}: {e}")))?;
    }
    Ok(source.objects.len() as u64)
}

/// What [`index_objects`] produced: the external blobs and the chunk table.
pub struct Indexed {
    pub blobs: Vec<(Descriptor, BlobRecord)>,
    pub table: ChunkTable,
    /// Bytes read from the objects.
    pub input_bytes: u64,
}

/// `--reference`: indexes every object of `source` in place (see the module docs). Each object
/// with a chunk not seen in an earlier object becomes one external blob; chunks already seen
/// reference the earlier object's range. All-zero chunks of objects of `chunk_size` or more
/// are holes.
pub fn index_objects(
    source: &ObjectSource,
    tree: &mut Tree,
    chunk_size: u32,
    input: &std::sync::atomic::AtomicU64,
) -> Result<Indexed, ConvertError> {
    let cs = chunk_size as usize;
    let mut table = ChunkTable::default();
    let mut blobs = Vec::new();
    let zeros = vec![0u8; cs];
    let mut input_bytes = 0u64;
    for object in &source.objects {
        let listed = &object.listed;
        let url = source.url(&listed.key);
        if object.is_dir {
            tree.insert(&object.path, dir_node(meta(DIR_MODE, listed)), 0)
                .map_err(|e| err(format!("{url}: {e}")))?;
            continue;
        }
        let mut reader = source.get(&listed.key)?;
        let blob_index = blobs.len() as u32;
        let mut uses_blob = false;
        let mut sha = Sha256::new();
        let mut extents = Vec::new();
        let mut off = 0u64;
        let mut piece = vec![0u8; cs];
        loop {
            let n = read_full(&mut reader, &mut piece)
                .map_err(ConvertError::io(format!("reading {url}")))?;
            if n == 0 {
                break;
            }
            let data = &piece[..n];
            sha.update(data);
            input_bytes += n as u64;
            input.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            // A hole only in objects cut into several chunks, as the packer does.
            let large = listed.size >= chunk_size as u64;
            if !(large && data == &zeros[..n]) {
                let record = ChunkRecord {
                    blob: blob_index,
                    flags: CHUNK_UNCOMPRESSED,
                    comp_off: off,
                    comp_len: n as u32,
                    raw_len: n as u32,
                    crc32: crc32fast::hash(data),
                    digest: *blake3::hash(data).as_bytes(),
                };
                let (provisional, new) = table.add_record(record);
                uses_blob |= new;
                extents.push(ExtentRecord {
                    file_off: off,
                    chunk: provisional,
                    chunk_off: 0,
                    len: n as u32,
                });
            }
            off += n as u64;
        }
        if off != listed.size {
            return Err(err(format!(
                "{url} is {off} bytes, listed as {}: it changed during the conversion; run \
                 lazyctl convert again",
                listed.size
            )));
        }
        if uses_blob {
            let digest = format!("sha256:{}", hex::encode(sha.finalize()));
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(&digest[7..], &mut sha256).expect("64 hex digits");
            let etag = reader.body.etag.clone().or_else(|| listed.etag.clone());
            let mut annotations =
                BTreeMap::from([(ANNOTATION_OBJECT_SIZE.to_string(), off.to_string())]);
            if let Some(etag) = etag {
                annotations.insert(ANNOTATION_ETAG.to_string(), etag);
            }
            blobs.push((
                Descriptor {
                    media_type: MEDIA_TYPE_BLOB_EXTERNAL.to_string(),
                    digest,
                    size: off,
                    urls: Some(vec![url.clone()]),
                    annotations: Some(annotations),
                },
                BlobRecord { sha256, size: off },
            ));
        }
        tree.insert(
            &object.path,
            file_node(meta(FILE_MODE, listed), listed.size, extents),
            0,
        )
        .map_err(|e| err(format!("{url}: {e}")))?;
    }
    Ok(Indexed {
        blobs,
        table,
        input_bytes,
    })
}

/// Fills `buf` from `r` unless the input ends first; returns how many bytes it read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(key: &str, size: u64) -> ListedObject {
        ListedObject {
            key: key.into(),
            size,
            last_modified: Some((1_700_000_000, 5)),
            etag: Some("\"e\"".into()),
        }
    }

    fn map(keys: &[(&str, u64)]) -> Result<Vec<SourceObject>, ConvertError> {
        map_keys(
            keys.iter().map(|(k, s)| listed(k, *s)).collect(),
            "raw/m/",
            "s3://b/raw/m/",
        )
    }

    #[test]
    fn keys_become_paths_relative_to_the_prefix() {
        let objects = map(&[
            ("raw/m/", 0),
            ("raw/m/config.json", 10),
            ("raw/m/sub/", 0),
            ("raw/m/sub/deep/w.safetensors", 100),
            ("raw/m/empty/", 0),
        ])
        .unwrap();
        let paths: Vec<(String, bool)> = objects
            .iter()
            .map(|o| (String::from_utf8(o.path.join(&b'/')).unwrap(), o.is_dir))
            .collect();
        assert_eq!(
            paths,
            [
                ("config.json".to_string(), false),
                ("sub".to_string(), true),
                ("sub/deep/w.safetensors".to_string(), false),
                ("empty".to_string(), true),
            ]
        );
    }

    #[test]
    fn hostile_keys_are_refused_naming_the_key() {
        for (keys, needle) in [
            (&[("raw/m/a/../b", 1)][..], "`..`"),
            (&[("raw/m/./b", 1)][..], "`.`"),
            (&[("raw/m/a//b", 1)][..], "empty path component"),
            (&[("raw/m//b", 1)][..], "empty path component"),
            (&[("raw/m/d/", 5)][..], "holds data"),
            (
                &[("raw/m/a", 1), ("raw/m/a/b", 1)][..],
                "file and a directory",
            ),
            (
                &[("raw/m/a/", 0), ("raw/m/a", 1)][..],
                "file and a directory",
            ),
            (
                &[("raw/m/a/b", 1), ("raw/m/a", 1)][..],
                "file and a directory",
            ),
        ] {
            let e = map(keys).unwrap_err().to_string();
            let last = keys.last().unwrap().0;
            assert!(e.contains(&format!("{last:?}")), "{e}");
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let long = format!("raw/m/{}", "x".repeat(256));
        assert!(map(&[(&long, 1)]).unwrap_err().to_string().contains("255"));
    }
}
