//! Fuzzes the conversion of a layer's tar stream: `tools::layer::apply_tar` (PAX records, entry
//! paths, whiteouts, links) into `tools::tree::Tree` and `tools::packer::LayerPacker`, then
//! `Tree::write_index`. Tar entries are where hostile paths come from: `../x`, `/etc/x`,
//! hardlinks to outside the tree, writes through symlinks, PAX `path` and `linkpath` overrides.
//! The input is an uncompressed layer, tried as is and with every header checksum made valid,
//! and applied twice, as a lower and an upper layer, so that whiteouts and opaque directories
//! meet content below them.
//!
//! Checks on a stream both layers take: the index written from the tree opens; every name in
//! every directory is one path component (not empty, `.` or `..`, no `/` or NUL), so nothing
//! lies outside the root; every directory is reached once (no cycles through hardlinks);
//! symlink targets are non-empty; every file reads back its full size from the blobs the
//! packer wrote, each chunk's crc32 and digest checked on the way.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use fusefs::chunk::decode_chunk;
use fusefs::format::{BlobRecord, MIN_CHUNK_SIZE};
use fusefs::reader::FileKind;
use fusefs::writer::IndexWriter;
use fusefs::{ChunkRef, ChunkSource, ImageReader, Index, SourceError};
use lazy_fuzz::repair_tar_checksums;
use libfuzzer_sys::fuzz_target;
use tools::layer::{apply_tar, Compression};
use tools::packer::{ChunkTable, LayerPacker};
use tools::tree::Tree;

/// The smallest chunk size, so that small inputs make files of several chunks.
const CHUNK_SIZE: u32 = MIN_CHUNK_SIZE;
/// Entries larger than this are skipped: a GNU sparse entry can claim terabytes of holes in a
/// few bytes, which the converter then reads (as it must) for longer than a fuzz run allows.
const MAX_ENTRY_SIZE: u64 = 1 << 20;

/// The data blobs the packer wrote, by blob number.
struct Blobs(Vec<Vec<u8>>);

impl ChunkSource for Blobs {
    fn chunk(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        let r = &c.record;
        let stored = self
            .0
            .get(r.blob as usize)
            .and_then(|blob| blob.get(r.comp_off as usize..)?.get(..r.comp_len as usize))
            .ok_or_else(|| SourceError::Blob {
                blob: c.blob_digest.clone(),
                reason: "chunk lies outside the blob".into(),
            })?;
        Ok(Arc::new(decode_chunk(r, stored)?))
    }
}

/// Whether the tar crate's view of the stream has an entry over `MAX_ENTRY_SIZE`.
fn has_huge_entry(stream: &[u8]) -> bool {
    let mut archive = tar::Archive::new(stream);
    let Ok(entries) = archive.entries() else {
        return false;
    };
    entries
        .map_while(Result::ok)
        .any(|e| e.size() > MAX_ENTRY_SIZE)
}

/// Converts `stream` as two layers into an index and its blobs; `None` when it is refused.
fn convert(stream: &[u8]) -> Option<(Vec<u8>, Blobs)> {
    let mut tree = Tree::new();
    let mut table = ChunkTable::default();
    let mut writer = IndexWriter::new(CHUNK_SIZE);
    let mut blobs = Vec::new();
    for layer in 0..2 {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut packer = LayerPacker::start(table, layer, file, CHUNK_SIZE, 1, 1, Arc::default());
        let applied = apply_tar(
            stream,
            layer,
            "fuzz",
            Compression::None,
            &mut tree,
            &mut packer,
        );
        let (t, blob) = packer.finish().expect("the packer finishes a layer");
        table = t;
        applied.ok()?;
        let mut sha256 = [0; 32];
        hex::decode_to_slice(&blob.digest["sha256:".len()..], &mut sha256).unwrap();
        writer.add_blob(BlobRecord {
            sha256,
            size: blob.size,
        });
        blobs.push(std::fs::read(blob.file.path()).unwrap());
    }
    for record in &table.records {
        writer.add_chunk(*record);
    }
    tree.write_index(&mut writer, &|p| table.resolve(p)).ok()?;
    Some((writer.finish().ok()?, Blobs(blobs)))
}

fn check(index: Vec<u8>, blobs: Blobs) {
    let index = Index::from_bytes(index).expect("the converter's index opens");
    let reader = ImageReader::new(index, Arc::new(blobs)).expect("a reader over it");
    let mut dirs = HashSet::new();
    let mut stack = vec![reader.root_ino()];
    while let Some(dir) = stack.pop() {
        assert!(dirs.insert(dir), "directory {dir} is reached twice");
        let mut entries = Vec::new();
        reader
            .readdir(dir, 2, |e| {
                entries.push((e.ino, e.kind, e.name.to_vec()));
                true
            })
            .unwrap();
        for (ino, kind, name) in entries {
            assert!(
                !name.is_empty()
                    && name != b"."
                    && name != b".."
                    && !name.contains(&b'/')
                    && !name.contains(&0),
                "entry name {name:?}"
            );
            let attr = reader.lookup(dir, &name).unwrap();
            assert_eq!(attr.ino, ino);
            match kind {
                FileKind::Directory => stack.push(ino),
                FileKind::Symlink => assert!(!reader.readlink(ino).unwrap().is_empty()),
                FileKind::Regular => {
                    let mut read = 0;
                    while read < attr.size {
                        let piece = (attr.size - read).min(u64::from(CHUNK_SIZE)) as u32;
                        let data = reader.read(ino, read, piece).expect("file data reads back");
                        assert_eq!(data.len(), piece as usize);
                        read += u64::from(piece);
                    }
                    assert!(reader.read(ino, attr.size, 1).unwrap().is_empty());
                }
                _ => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for stream in [data.to_vec(), repair_tar_checksums(data)] {
        if has_huge_entry(&stream) {
            continue;
        }
        if let Some((index, blobs)) = convert(&stream) {
            check(index, blobs);
        }
    }
});
