//! Reading a lazy image index: open (mmap or owned bytes), validate every offset and count
//! once, then answer record lookups without copying the index.
//!
//! The index is untrusted input. `Index::from_bytes` checks the header, every section's
//! bounds, alignment and crc32, and then every record's references (ranges inside their
//! sections, sorted and unique directory names, a tree of directories with no cycles, extents
//! inside their files and chunks). After that, accessors still use checked slicing: a bug in
//! validation turns into an error, never an out-of-bounds read.
//!
//! Chunks leave the index as [`ChunkRef`]s (a chunk record with its blob's digest), which is
//! how the source, the speculator and the reader name them.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::error::IndexError;
use crate::format::*;

/// Bytes of an index: a read-only memory map or an owned buffer.
enum IndexBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl IndexBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            IndexBytes::Mapped(m) => m,
            IndexBytes::Owned(v) => v,
        }
    }
}

/// A validated index.
pub struct Index {
    bytes: IndexBytes,
    header: Header,
    counts: [usize; 7],
    /// `sha256:<hex>` of every blob of the blob table, in table order: each [`ChunkRef`]
    /// carries its blob's, so they are spelled out once, when the index is opened.
    blob_digests: Vec<String>,
}

/// A chunk as the reader needs it: the record plus the OCI digest of its blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index into the image's chunk table (stable for an image).
    pub index: u32,
    pub record: ChunkRecord,
    /// `sha256:<hex>` of the blob the chunk is stored in.
    pub blob_digest: String,
}

impl ChunkRef {
    /// Hex blake3 of the decoded chunk: the cache key and the name used in logs.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.record.digest)
    }
}

/// Inode numbers are 1-based; the root directory is inode 1 (FUSE's `FUSE_ROOT_ID`).
pub const ROOT_INO: u64 = 1;

impl Index {
    /// Maps the index file at `path` and validates it, section checksums included.
    pub fn open(path: &Path) -> Result<Arc<Index>, IndexError> {
        let map = Self::map(path)?;
        Self::validate(IndexBytes::Mapped(map), true).map(Arc::new)
    }

    /// Maps the index file at `path`, lets `verify` check the whole mapped bytes (the store
    /// compares them with the digest its manifest names), then validates the structure. A
    /// digest over every byte makes the per-section crc32s redundant, so they are skipped:
    /// they would only read the index a second time.
    pub fn open_verified<E: From<IndexError>>(
        path: &Path,
        verify: impl FnOnce(&[u8]) -> Result<(), E>,
    ) -> Result<Arc<Index>, E> {
        let map = Self::map(path)?;
        // Header and length first: "truncated at N bytes" says more than a digest mismatch.
        Self::header(&map)?;
        verify(&map)?;
        Ok(Self::validate(IndexBytes::Mapped(map), false).map(Arc::new)?)
    }

    /// [`Index::open_verified`] of bytes already read into memory (from a file that someone
    /// else may write, which must not be mapped).
    pub fn from_bytes_verified<E: From<IndexError>>(
        bytes: Vec<u8>,
        verify: impl FnOnce(&[u8]) -> Result<(), E>,
    ) -> Result<Arc<Index>, E> {
        Self::header(&bytes)?;
        verify(&bytes)?;
        Ok(Self::validate(IndexBytes::Owned(bytes), false).map(Arc::new)?)
    }

    fn map(path: &Path) -> Result<memmap2::Mmap, IndexError> {
        let file = File::open(path)
            .map_err(|e| IndexError::Corrupt(format!("cannot open {}: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| IndexError::Corrupt(format!("cannot stat {}: {e}", path.display())))?
            .len();
        if len == 0 {
            return Err(IndexError::Truncated {
                actual: 0,
                expected: HEADER_LEN as u64,
            });
        }
        // SAFETY: the file belongs to the image store, whose files are written once under a
        // temporary name and renamed into place, never modified afterwards. Every access below
        // is bounds-checked against the mapping's length, so a file truncated underneath us
        // can at worst raise SIGBUS, not read another object's memory.
        unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| IndexError::Corrupt(format!("cannot map {}: {e}", path.display())))
    }

    /// Validates an index held in memory, section checksums included.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Arc<Index>, IndexError> {
        Self::validate(IndexBytes::Owned(bytes), true).map(Arc::new)
    }

    /// Checks magic, version, header crc, total length and chunk size; returns the header.
    fn header(data: &[u8]) -> Result<Header, IndexError> {
        let header_bytes: &[u8; HEADER_LEN] = match data.get(..HEADER_LEN) {
            Some(h) => h.try_into().map_err(|_| IndexError::BadMagic)?,
            None => {
                if data.len() >= 8 && data[..8] != MAGIC {
                    return Err(IndexError::BadMagic);
                }
                return Err(IndexError::Truncated {
                    actual: data.len() as u64,
                    expected: HEADER_LEN as u64,
                });
            }
        };
        if header_bytes[..8] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        let header = Header::decode(header_bytes);
        if header.version != VERSION {
            return Err(IndexError::UnsupportedVersion(header.version));
        }
        let stored_crc = u32::from_le_bytes(
            header_bytes[HEADER_CRC_OFFSET..]
                .try_into()
                .map_err(|_| IndexError::HeaderChecksum)?,
        );
        if crc32fast::hash(&header_bytes[..HEADER_CRC_OFFSET]) != stored_crc {
            return Err(IndexError::HeaderChecksum);
        }
        if (data.len() as u64) < header.total_len {
            return Err(IndexError::Truncated {
                actual: data.len() as u64,
                expected: header.total_len,
            });
        }
        if data.len() as u64 != header.total_len {
            return Err(IndexError::Corrupt(format!(
                "index is {} bytes but its header says {}",
                data.len(),
                header.total_len
            )));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&header.chunk_size) {
            return Err(IndexError::Corrupt(format!(
                "chunk size {} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                header.chunk_size
            )));
        }
        Ok(header)
    }

    fn validate(bytes: IndexBytes, check_crcs: bool) -> Result<Index, IndexError> {
        let data = bytes.as_slice();
        let header = Self::header(data)?;
        let mut counts = [0usize; 7];
        for section in Section::ALL {
            let entry = header.sections[section as usize];
            let end = entry.offset.checked_add(entry.len).ok_or_else(|| {
                IndexError::Corrupt(format!("section '{}' overflows", section.name()))
            })?;
            if entry.offset < HEADER_LEN as u64 || end > header.total_len {
                return Err(IndexError::Corrupt(format!(
                    "section '{}' at {}..{} lies outside the index ({} bytes)",
                    section.name(),
                    entry.offset,
                    end,
                    header.total_len
                )));
            }
            if !entry.offset.is_multiple_of(SECTION_ALIGN) {
                return Err(IndexError::Corrupt(format!(
                    "section '{}' is not {SECTION_ALIGN}-byte aligned",
                    section.name()
                )));
            }
            let rec = section.record_len() as u64;
            if !entry.len.is_multiple_of(rec) {
                return Err(IndexError::Corrupt(format!(
                    "section '{}' length {} is not a multiple of {rec}",
                    section.name(),
                    entry.len
                )));
            }
            let count = entry.len / rec;
            if section != Section::Strings && count > u32::MAX as u64 {
                return Err(IndexError::TooLarge(format!(
                    "section '{}' has {count} records",
                    section.name()
                )));
            }
            // In range: `end <= total_len == data.len()`.
            let body = &data[entry.offset as usize..end as usize];
            if check_crcs && crc32fast::hash(body) != entry.crc32 {
                return Err(IndexError::SectionChecksum {
                    section: section.name(),
                });
            }
            counts[section as usize] = count as usize;
        }
        let mut index = Index {
            bytes,
            header,
            counts,
            blob_digests: Vec::new(),
        };
        index.validate_records()?;
        index.blob_digests = index
            .blobs()?
            .iter()
            .map(|b| format!("sha256:{}", hex::encode(b.sha256)))
            .collect();
        Ok(index)
    }

    fn validate_records(&self) -> Result<(), IndexError> {
        let corrupt = |m: String| IndexError::Corrupt(m);
        let n_inodes = self.count(Section::Inodes);
        if n_inodes == 0 {
            return Err(corrupt("index has no root inode".into()));
        }
        if n_inodes > u32::MAX as usize - 1 {
            return Err(IndexError::TooLarge(format!("{n_inodes} inodes")));
        }
        for blob in 0..self.count(Section::Blobs) {
            self.record::<BlobRecord>(Section::Blobs, blob)?;
        }
        let chunk_size = self.header.chunk_size;
        for c in 0..self.count(Section::Chunks) {
            let chunk: ChunkRecord = self.record(Section::Chunks, c)?;
            let blob: BlobRecord = self
                .record(Section::Blobs, chunk.blob as usize)
                .map_err(|_| corrupt(format!("chunk {c} names missing blob {}", chunk.blob)))?;
            let end = chunk.comp_off.checked_add(chunk.comp_len as u64);
            if end.is_none_or(|e| e > blob.size) {
                return Err(corrupt(format!(
                    "chunk {c} lies outside blob {}",
                    chunk.blob
                )));
            }
            // Chunks are stored compressed only when that makes them smaller, so a stored chunk
            // is never larger than its data: this also bounds what one read allocates.
            if chunk.raw_len == 0
                || chunk.raw_len > chunk_size
                || chunk.comp_len == 0
                || chunk.comp_len > chunk.raw_len
            {
                return Err(corrupt(format!("chunk {c} has bad lengths")));
            }
            if chunk.flags & CHUNK_UNCOMPRESSED != 0 && chunk.comp_len != chunk.raw_len {
                return Err(corrupt(format!("stored chunk {c} has comp_len != raw_len")));
            }
            if chunk.flags & !CHUNK_UNCOMPRESSED != 0 {
                return Err(corrupt(format!("chunk {c} has unknown flags")));
            }
        }
        let n_xattrs = self.count(Section::Xattrs) as u64;
        let n_dirents = self.count(Section::Dirents) as u64;
        let n_extents = self.count(Section::Extents) as u64;
        let in_range = |start: u32, count: u32, limit: u64| start as u64 + count as u64 <= limit;
        // How many directory entries point at each directory: must be exactly one (zero for
        // the root), which makes the directories a tree reachable only from the root.
        let mut dir_refs = vec![0u8; n_inodes];
        for i in 0..n_inodes {
            let ino = i as u64 + 1;
            let inode: InodeRecord = self.record(Section::Inodes, i)?;
            if !in_range(inode.xattr_start, inode.xattr_count, n_xattrs) {
                return Err(corrupt(format!("inode {ino} xattrs out of range")));
            }
            let mut prev: Option<&[u8]> = None;
            for x in inode.xattr_start..inode.xattr_start + inode.xattr_count {
                let rec: XattrRecord = self.record(Section::Xattrs, x as usize)?;
                let name = self.string(rec.name_off, rec.name_len)?;
                self.string(rec.value_off, rec.value_len)?;
                if name.is_empty() || name.contains(&0) || prev.is_some_and(|p| p >= name) {
                    return Err(corrupt(format!(
                        "inode {ino} has bad or unsorted xattr names"
                    )));
                }
                prev = Some(name);
            }
            if inode.parent == 0 || inode.parent as usize > n_inodes {
                return Err(corrupt(format!(
                    "inode {ino} has bad parent {}",
                    inode.parent
                )));
            }
            match inode.mode & S_IFMT {
                S_IFDIR => {
                    if !in_range(inode.data_start, inode.data_count, n_dirents) {
                        return Err(corrupt(format!("directory {ino} entries out of range")));
                    }
                    self.validate_dir(ino, &inode, &mut dir_refs)?;
                }
                S_IFREG => {
                    if !in_range(inode.data_start, inode.data_count, n_extents) {
                        return Err(corrupt(format!("file {ino} extents out of range")));
                    }
                    self.validate_extents(ino, &inode)?;
                }
                S_IFLNK => {
                    let target = self.string(inode.data_start, inode.data_count)?;
                    if target.is_empty() || target.len() > PATH_MAX || target.contains(&0) {
                        return Err(corrupt(format!("symlink {ino} has a bad target")));
                    }
                    if inode.size != target.len() as u64 {
                        return Err(corrupt(format!("symlink {ino} size mismatch")));
                    }
                }
                S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK => {
                    if inode.data_count != 0 || inode.size != 0 {
                        return Err(corrupt(format!("special file {ino} carries data")));
                    }
                }
                other => {
                    return Err(corrupt(format!("inode {ino} has unknown type {other:o}")));
                }
            }
        }
        let root: InodeRecord = self.record(Section::Inodes, 0)?;
        if root.mode & S_IFMT != S_IFDIR || root.parent != 1 {
            return Err(corrupt("root inode is not a directory".into()));
        }
        if dir_refs[0] != 0 {
            return Err(corrupt("root directory is linked from a directory".into()));
        }
        for (i, refs) in dir_refs.iter().enumerate().skip(1) {
            let inode: InodeRecord = self.record(Section::Inodes, i)?;
            if inode.mode & S_IFMT == S_IFDIR && *refs != 1 {
                return Err(corrupt(format!(
                    "directory {} is linked {refs} times (must be once)",
                    i + 1
                )));
            }
        }
        Ok(())
    }

    fn validate_dir(
        &self,
        ino: u64,
        inode: &InodeRecord,
        dir_refs: &mut [u8],
    ) -> Result<(), IndexError> {
        let corrupt = |m: String| IndexError::Corrupt(m);
        let mut prev: Option<&[u8]> = None;
        for d in inode.data_start..inode.data_start + inode.data_count {
            let entry: DirentRecord = self.record(Section::Dirents, d as usize)?;
            let name = self.string(entry.name_off, entry.name_len)?;
            if name.is_empty()
                || name.len() > NAME_MAX
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(corrupt(format!(
                    "directory {ino} has an invalid entry name"
                )));
            }
            if prev.is_some_and(|p| p >= name) {
                return Err(corrupt(format!("directory {ino} entries are not sorted")));
            }
            prev = Some(name);
            let child = entry.ino as usize;
            if child < 2 || child > dir_refs.len() {
                return Err(corrupt(format!("directory {ino} names bad inode {child}")));
            }
            let child_rec: InodeRecord = self.record(Section::Inodes, child - 1)?;
            if child_rec.mode & S_IFMT == S_IFDIR {
                if child_rec.parent as u64 != ino {
                    return Err(corrupt(format!("directory {child} has wrong parent")));
                }
                dir_refs[child - 1] = dir_refs[child - 1].saturating_add(1);
            }
        }
        Ok(())
    }

    fn validate_extents(&self, ino: u64, inode: &InodeRecord) -> Result<(), IndexError> {
        let corrupt = |m: String| IndexError::Corrupt(m);
        let mut next_free = 0u64;
        for e in inode.data_start..inode.data_start + inode.data_count {
            let ext: ExtentRecord = self.record(Section::Extents, e as usize)?;
            let end = ext.file_off.checked_add(ext.len as u64);
            if ext.len == 0 || ext.file_off < next_free || end.is_none_or(|e| e > inode.size) {
                return Err(corrupt(format!(
                    "file {ino} has overlapping or bad extents"
                )));
            }
            next_free = ext.file_off + ext.len as u64;
            let chunk: ChunkRecord = self
                .record(Section::Chunks, ext.chunk as usize)
                .map_err(|_| corrupt(format!("file {ino} names missing chunk {}", ext.chunk)))?;
            if ext.chunk_off as u64 + ext.len as u64 > chunk.raw_len as u64 {
                return Err(corrupt(format!(
                    "file {ino} extent outside chunk {}",
                    ext.chunk
                )));
            }
        }
        Ok(())
    }

    /// Number of records in a section (bytes for the string table).
    pub fn count(&self, section: Section) -> usize {
        self.counts[section as usize]
    }

    /// Decodes record `i` of `section`.
    pub fn record<R: Record>(&self, section: Section, i: usize) -> Result<R, IndexError> {
        let entry = self.header.sections[section as usize];
        let at = (i as u64)
            .checked_mul(R::LEN as u64)
            .and_then(|o| o.checked_add(entry.offset))
            .ok_or_else(|| {
                IndexError::Corrupt(format!("{} record {i} overflows", section.name()))
            })?;
        if i >= self.count(section) {
            return Err(IndexError::Corrupt(format!(
                "{} record {i} out of range",
                section.name()
            )));
        }
        let bytes = self
            .bytes
            .as_slice()
            .get(at as usize..at as usize + R::LEN)
            .ok_or_else(|| {
                IndexError::Corrupt(format!("{} record {i} out of range", section.name()))
            })?;
        Ok(R::decode(bytes))
    }

    /// Bytes `off..off+len` of the string table.
    pub fn string(&self, off: u32, len: u32) -> Result<&[u8], IndexError> {
        let entry = self.header.sections[Section::Strings as usize];
        let end = off as u64 + len as u64;
        if end > entry.len {
            return Err(IndexError::Corrupt(format!(
                "string {off}+{len} outside the string table ({} bytes)",
                entry.len
            )));
        }
        let start = (entry.offset + off as u64) as usize;
        self.bytes
            .as_slice()
            .get(start..start + len as usize)
            .ok_or_else(|| IndexError::Corrupt("string out of range".into()))
    }

    /// The inode record of inode number `ino` (1-based).
    pub fn inode(&self, ino: u64) -> Result<InodeRecord, IndexError> {
        if ino == 0 || ino > self.count(Section::Inodes) as u64 {
            return Err(IndexError::Corrupt(format!("inode {ino} does not exist")));
        }
        self.record(Section::Inodes, (ino - 1) as usize)
    }

    pub fn inode_count(&self) -> u64 {
        self.count(Section::Inodes) as u64
    }

    pub fn chunk_size(&self) -> u32 {
        self.header.chunk_size
    }

    /// The blob table: every data blob this index reads from.
    pub fn blobs(&self) -> Result<Vec<BlobRecord>, IndexError> {
        (0..self.count(Section::Blobs))
            .map(|i| self.record(Section::Blobs, i))
            .collect()
    }

    pub fn chunk(&self, i: u32) -> Result<ChunkRecord, IndexError> {
        self.record(Section::Chunks, i as usize)
    }

    pub fn chunk_count(&self) -> usize {
        self.count(Section::Chunks)
    }

    /// The `sha256:<hex>` digests of the blob table, in table order.
    pub fn blob_digests(&self) -> &[String] {
        &self.blob_digests
    }

    /// Chunk `i` with the digest of its blob.
    pub fn chunk_ref(&self, i: u32) -> Result<ChunkRef, IndexError> {
        let record = self.chunk(i)?;
        let blob_digest = self
            .blob_digests
            .get(record.blob as usize)
            .cloned()
            .ok_or_else(|| IndexError::Corrupt(format!("chunk {i} names missing blob")))?;
        Ok(ChunkRef {
            index: i,
            record,
            blob_digest,
        })
    }

    /// Every chunk of the image with its blob's digest, in table order (what a warm fetches).
    pub fn chunk_refs(&self) -> Result<Vec<ChunkRef>, IndexError> {
        (0..self.chunk_count() as u32)
            .map(|i| self.chunk_ref(i))
            .collect()
    }

    /// The raw index bytes (to verify the digest the manifest names).
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Size of the whole index in bytes.
    pub fn len(&self) -> u64 {
        self.header.total_len
    }

    /// Always false: a valid index has at least a header and a root inode.
    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{IndexWriter, NodeContent, NodeSpec};

    fn tiny() -> Vec<u8> {
        let mut w = IndexWriter::new(DEFAULT_CHUNK_SIZE);
        let root = w.root();
        w.add_child(root, b"hello", NodeSpec::symlink(b"world".to_vec()))
            .unwrap();
        w.add_child(root, b"dir", NodeSpec::dir(0o755)).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = tiny();
        assert!(Index::from_bytes(bytes.clone()).is_ok());
        for len in 0..bytes.len() {
            let err = Index::from_bytes(bytes[..len].to_vec()).err();
            assert!(err.is_some(), "truncated to {len} bytes was accepted");
        }
        let err = Index::from_bytes(bytes[..300].to_vec()).err().unwrap();
        assert!(
            matches!(err, IndexError::Truncated { actual: 300, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("truncated at 300 bytes"));
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        let bytes = tiny();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                assert!(
                    Index::from_bytes(b).is_err(),
                    "flip of bit {bit:#x} at byte {i} was accepted"
                );
            }
        }
    }

    #[test]
    fn chunk_stored_larger_than_its_data_is_refused() {
        let mut w = IndexWriter::new(DEFAULT_CHUNK_SIZE);
        w.add_blob(BlobRecord {
            sha256: [0; 32],
            size: u32::MAX as u64 + 10,
        });
        w.add_chunk(ChunkRecord {
            comp_len: u32::MAX,
            raw_len: 4096,
            ..Default::default()
        });
        let err = Index::from_bytes(w.finish().unwrap()).err().unwrap();
        assert_eq!(err, IndexError::Corrupt("chunk 0 has bad lengths".into()));
    }

    #[test]
    fn unknown_node_content_is_not_needed_for_root() {
        let w = IndexWriter::new(DEFAULT_CHUNK_SIZE);
        let idx = Index::from_bytes(w.finish().unwrap()).unwrap();
        assert_eq!(idx.inode_count(), 1);
        let root = idx.inode(ROOT_INO).unwrap();
        assert_eq!(root.mode & S_IFMT, S_IFDIR);
        assert!(matches!(NodeSpec::dir(0o755).content, NodeContent::Dir));
    }
}
