//! Fuzzes the index reader with arbitrary bytes. Each input is tried twice: as is, and with
//! its checksums repaired, so the fuzzer reaches the record validation behind the crc32s.
//! An accepted index is then walked through `ImageReader` (every inode: getattr, readdir,
//! lookup of every name, readlink, xattrs, and reads of files), which must never panic.
#![no_main]

use std::sync::Arc;

use fusefs::format::{
    Header, HEADER_CRC_OFFSET, HEADER_LEN, MAGIC, SECTION_ENTRY_LEN, SECTION_TABLE_OFFSET,
};
use fusefs::{ChunkRef, ChunkSource, ImageReader, Index, SourceError};
use libfuzzer_sys::fuzz_target;

/// Serves zero-filled chunks of the right length, so reads exercise the extent arithmetic.
struct Zeros;

impl ChunkSource for Zeros {
    fn chunk(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        Ok(Arc::new(vec![0; c.record.raw_len as usize]))
    }
}

/// Rewrites the section and header crc32s (and the length) so they match the bytes.
fn repair(data: &mut [u8]) {
    if data.len() < HEADER_LEN {
        return;
    }
    data[..8].copy_from_slice(&MAGIC);
    let len = data.len() as u64;
    data[24..32].copy_from_slice(&len.to_le_bytes());
    for i in 0..7 {
        let at = SECTION_TABLE_OFFSET + i * SECTION_ENTRY_LEN;
        let off = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        let slen = u64::from_le_bytes(data[at + 8..at + 16].try_into().unwrap());
        let Some(end) = off.checked_add(slen) else {
            continue;
        };
        if end <= len && off <= end {
            let crc = crc32fast::hash(&data[off as usize..end as usize]);
            data[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&data[..HEADER_CRC_OFFSET]);
    data[HEADER_CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    let _ = Header::decode(data[..HEADER_LEN].try_into().unwrap());
}

fn exercise(index: Arc<Index>) {
    let Ok(reader) = ImageReader::new(index.clone(), Arc::new(Zeros)) else {
        return;
    };
    for ino in 0..=index.inode_count() + 1 {
        let _ = reader.getattr(ino);
        let _ = reader.readlink(ino);
        let _ = reader.listxattr(ino);
        let _ = reader.getxattr(ino, b"user.x");
        let _ = reader.read(ino, 0, 1 << 20);
        let _ = reader.read(ino, u64::MAX - 10, 100);
        let mut names = Vec::new();
        let _ = reader.readdir(ino, 0, |e| {
            names.push(e.name.to_vec());
            names.len() < 10_000
        });
        for n in names {
            let _ = reader.lookup(ino, &n);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = Index::from_bytes(data.to_vec()) {
        exercise(index);
    }
    let mut repaired = data.to_vec();
    repair(&mut repaired);
    if let Ok(index) = Index::from_bytes(repaired) {
        exercise(index);
    }
});
