//! On-disk layout of the lazy image index: constants, record sizes and the little-endian
//! encoding of every fixed-size record. `docs/FORMAT.md` is the prose version of this file;
//! change both together.
//!
//! The index is a header followed by seven sections of fixed-size records (plus one byte
//! string table). Every record is read with explicit little-endian decoding from a slice of
//! exactly its size, so the reader never casts untrusted bytes into structs.

/// First eight bytes of every index.
pub const MAGIC: [u8; 8] = *b"LAZYIDX\0";
/// The only index version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of the header; sections start after it.
pub const HEADER_LEN: usize = 256;
/// Default uncompressed chunk size: large enough that a cold start makes few requests, small
/// enough that a random 4 KiB read does not drag in much more than it needs.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size accepted (one page).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size accepted; bounds the memory one decoded chunk can take.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Linux `NAME_MAX`: the longest single name a directory entry may carry.
pub const NAME_MAX: usize = 255;
/// Linux `PATH_MAX`: the longest symlink target.
pub const PATH_MAX: usize = 4096;
/// Sections start on this alignment so a mapped index can be read with aligned loads.
pub const SECTION_ALIGN: u64 = 8;

/// Chunk flag: the chunk is stored raw because compression did not make it smaller.
pub const CHUNK_UNCOMPRESSED: u32 = 1;

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFSOCK: u32 = 0o140_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFBLK: u32 = 0o060_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFCHR: u32 = 0o020_000;
pub const S_IFIFO: u32 = 0o010_000;

/// The sections of an index, in header order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Inodes = 0,
    Dirents = 1,
    Extents = 2,
    Chunks = 3,
    Blobs = 4,
    Xattrs = 5,
    Strings = 6,
}

impl Section {
    pub const ALL: [Section; 7] = [
        Section::Inodes,
        Section::Dirents,
        Section::Extents,
        Section::Chunks,
        Section::Blobs,
        Section::Xattrs,
        Section::Strings,
    ];

    /// Size of one record of this section.
    pub const fn record_len(self) -> usize {
        match self {
            Section::Inodes => InodeRecord::LEN,
            Section::Dirents => DirentRecord::LEN,
            Section::Extents => ExtentRecord::LEN,
            Section::Chunks => ChunkRecord::LEN,
            Section::Blobs => BlobRecord::LEN,
            Section::Xattrs => XattrRecord::LEN,
            Section::Strings => 1,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Section::Inodes => "inodes",
            Section::Dirents => "dirents",
            Section::Extents => "extents",
            Section::Chunks => "chunks",
            Section::Blobs => "blobs",
            Section::Xattrs => "xattrs",
            Section::Strings => "strings",
        }
    }
}

/// Byte offset of the section table inside the header.
pub const SECTION_TABLE_OFFSET: usize = 32;
/// One section table entry: offset u64, length u64, crc32 u32, reserved u32.
pub const SECTION_ENTRY_LEN: usize = 24;
/// Byte offset of the header's own crc32 (over bytes `0..HEADER_CRC_OFFSET`).
pub const HEADER_CRC_OFFSET: usize = HEADER_LEN - 4;

/// Where one section lives in the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SectionEntry {
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub chunk_size: u32,
    pub total_len: u64,
    pub sections: [SectionEntry; 7],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, HEADER_LEN as u32);
        put_u32(&mut b, 16, self.chunk_size);
        put_u32(&mut b, 20, 0);
        put_u64(&mut b, 24, self.total_len);
        for (i, s) in self.sections.iter().enumerate() {
            let at = SECTION_TABLE_OFFSET + i * SECTION_ENTRY_LEN;
            put_u64(&mut b, at, s.offset);
            put_u64(&mut b, at + 8, s.len);
            put_u32(&mut b, at + 16, s.crc32);
        }
        let crc = crc32fast::hash(&b[..HEADER_CRC_OFFSET]);
        put_u32(&mut b, HEADER_CRC_OFFSET, crc);
        b
    }

    /// Decodes the fields; the caller has checked magic, length and crc.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let mut sections = [SectionEntry::default(); 7];
        for (i, s) in sections.iter_mut().enumerate() {
            let at = SECTION_TABLE_OFFSET + i * SECTION_ENTRY_LEN;
            *s = SectionEntry {
                offset: get_u64(b, at),
                len: get_u64(b, at + 8),
                crc32: get_u32(b, at + 16),
            };
        }
        Header {
            version: get_u32(b, 8),
            chunk_size: get_u32(b, 16),
            total_len: get_u64(b, 24),
            sections,
        }
    }
}

/// One inode. `data_start`/`data_count` mean: directory -> dirent range, regular file ->
/// extent range, symlink -> target byte range in the string table, others -> unused (0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InodeRecord {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub rdev: u32,
    pub data_start: u32,
    pub data_count: u32,
    pub xattr_start: u32,
    pub xattr_count: u32,
    /// Inode number of the directory holding this inode (root: itself). For files with
    /// several names, the directory of one of them.
    pub parent: u32,
}

/// One directory entry; entries of a directory are contiguous and sorted by name bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirentRecord {
    pub name_off: u32,
    pub name_len: u32,
    pub ino: u32,
}

/// One piece of a regular file: `len` bytes at `file_off` are bytes `chunk_off..` of chunk
/// `chunk`. Extents of a file are sorted by `file_off` and do not overlap; gaps are holes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtentRecord {
    pub file_off: u64,
    pub chunk: u32,
    pub chunk_off: u32,
    pub len: u32,
}

/// One stored chunk: where its bytes live in which blob, and how to check them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkRecord {
    pub blob: u32,
    pub flags: u32,
    pub comp_off: u64,
    pub comp_len: u32,
    pub raw_len: u32,
    /// crc32 of the stored (compressed) bytes: checked on every read from disk.
    pub crc32: u32,
    /// blake3 of the uncompressed bytes: the chunk's identity, checked after decoding.
    pub digest: [u8; 32],
}

/// One data blob: its sha256 (the OCI digest it is stored under) and size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobRecord {
    pub sha256: [u8; 32],
    pub size: u64,
}

/// One extended attribute; an inode's xattrs are contiguous and sorted by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XattrRecord {
    pub name_off: u32,
    pub name_len: u32,
    pub value_off: u32,
    pub value_len: u32,
}

/// Fixed-size little-endian encoding of one record type.
pub trait Record: Sized {
    const LEN: usize;
    /// Decodes from exactly `Self::LEN` bytes.
    fn decode(b: &[u8]) -> Self;
    fn encode(&self, out: &mut Vec<u8>);
}

impl Record for InodeRecord {
    const LEN: usize = 64;
    fn decode(b: &[u8]) -> Self {
        InodeRecord {
            mode: get_u32(b, 0),
            uid: get_u32(b, 4),
            gid: get_u32(b, 8),
            nlink: get_u32(b, 12),
            size: get_u64(b, 16),
            mtime_sec: get_u64(b, 24) as i64,
            mtime_nsec: get_u32(b, 32),
            rdev: get_u32(b, 36),
            data_start: get_u32(b, 40),
            data_count: get_u32(b, 44),
            xattr_start: get_u32(b, 48),
            xattr_count: get_u32(b, 52),
            parent: get_u32(b, 56),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.mode, self.uid, self.gid, self.nlink] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_sec.to_le_bytes());
        for v in [
            self.mtime_nsec,
            self.rdev,
            self.data_start,
            self.data_count,
            self.xattr_start,
            self.xattr_count,
            self.parent,
            0,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl Record for DirentRecord {
    const LEN: usize = 16;
    fn decode(b: &[u8]) -> Self {
        DirentRecord {
            name_off: get_u32(b, 0),
            name_len: get_u32(b, 4),
            ino: get_u32(b, 8),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.name_off, self.name_len, self.ino, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl Record for ExtentRecord {
    const LEN: usize = 24;
    fn decode(b: &[u8]) -> Self {
        ExtentRecord {
            file_off: get_u64(b, 0),
            chunk: get_u32(b, 8),
            chunk_off: get_u32(b, 12),
            len: get_u32(b, 16),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.file_off.to_le_bytes());
        for v in [self.chunk, self.chunk_off, self.len, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl Record for ChunkRecord {
    const LEN: usize = 64;
    fn decode(b: &[u8]) -> Self {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[32..64]);
        ChunkRecord {
            blob: get_u32(b, 0),
            flags: get_u32(b, 4),
            comp_off: get_u64(b, 8),
            comp_len: get_u32(b, 16),
            raw_len: get_u32(b, 20),
            crc32: get_u32(b, 24),
            digest,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.blob.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.comp_off.to_le_bytes());
        for v in [self.comp_len, self.raw_len, self.crc32, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.digest);
    }
}

impl Record for BlobRecord {
    const LEN: usize = 48;
    fn decode(b: &[u8]) -> Self {
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&b[0..32]);
        BlobRecord {
            sha256,
            size: get_u64(b, 32),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
    }
}

impl Record for XattrRecord {
    const LEN: usize = 16;
    fn decode(b: &[u8]) -> Self {
        XattrRecord {
            name_off: get_u32(b, 0),
            name_len: get_u32(b, 4),
            value_off: get_u32(b, 8),
            value_len: get_u32(b, 12),
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.name_off, self.name_len, self.value_off, self.value_len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Encodes a device number the way the Linux kernel's `new_encode_dev` does, which is what
/// FUSE's 32-bit `rdev` carries.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Inverse of [`encode_dev`].
pub fn decode_dev(rdev: u32) -> (u32, u32) {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let i = InodeRecord {
            mode: S_IFREG | 0o4755,
            uid: 1,
            gid: 2,
            nlink: 3,
            size: 5 << 32,
            mtime_sec: -7,
            mtime_nsec: 999_999_999,
            rdev: 9,
            data_start: 10,
            data_count: 11,
            xattr_start: 12,
            xattr_count: 13,
            parent: 14,
        };
        let mut v = Vec::new();
        i.encode(&mut v);
        assert_eq!(v.len(), InodeRecord::LEN);
        assert_eq!(InodeRecord::decode(&v), i);

        let c = ChunkRecord {
            blob: 1,
            flags: CHUNK_UNCOMPRESSED,
            comp_off: 1 << 40,
            comp_len: 2,
            raw_len: 3,
            crc32: 4,
            digest: [7; 32],
        };
        let mut v = Vec::new();
        c.encode(&mut v);
        assert_eq!(v.len(), ChunkRecord::LEN);
        assert_eq!(ChunkRecord::decode(&v), c);
    }

    #[test]
    fn device_numbers_round_trip() {
        for (maj, min) in [(0, 0), (1, 3), (8, 1), (259, 65536), (4095, 0xfffff)] {
            assert_eq!(decode_dev(encode_dev(maj, min)), (maj, min));
        }
        // /dev/null is 1:3 -> 0x103 in the kernel's encoding.
        assert_eq!(encode_dev(1, 3), 0x103);
    }
}
