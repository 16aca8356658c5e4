//! The cache entry codec: the 64-byte header in front of every payload in a segment file (see
//! `segment` for the files). An entry header carries a chunk's record (flags, stored and raw
//! length, crc32 of the payload, digest) and a crc32 of itself; the payload is the chunk's
//! stored bytes, as in its blob. This file knows nothing of files, segments or the index: it
//! turns records into header bytes and back.

use fusefs::format::ChunkRecord;

/// First bytes of every entry header.
const ENTRY_MAGIC: [u8; 4] = *b"LZCE";
/// Entry header: magic 4, flags 4, stored length 4, raw length 4, payload crc32 4, digest 32,
/// reserved 8, header crc32 4.
pub(super) const ENTRY_HEADER_LEN: u64 = 64;
const ENTRY_HEADER_CRC_OFFSET: usize = 60;

/// The header of an entry holding the stored bytes `r` describes.
pub(super) fn encode_entry_header(r: &ChunkRecord) -> [u8; ENTRY_HEADER_LEN as usize] {
    let mut h = [0u8; ENTRY_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&ENTRY_MAGIC);
    h[4..8].copy_from_slice(&r.flags.to_le_bytes());
    h[8..12].copy_from_slice(&r.comp_len.to_le_bytes());
    h[12..16].copy_from_slice(&r.raw_len.to_le_bytes());
    h[16..20].copy_from_slice(&r.crc32.to_le_bytes());
    h[20..52].copy_from_slice(&r.digest);
    let crc = crc32fast::hash(&h[..ENTRY_HEADER_CRC_OFFSET]);
    h[ENTRY_HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The record an entry header describes, or `None` when the header is not one (bad magic or
/// crc). Field values are not trusted further: lengths are checked against the file.
pub(super) fn decode_entry_header(h: &[u8; ENTRY_HEADER_LEN as usize]) -> Option<ChunkRecord> {
    let le = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    if h[0..4] != ENTRY_MAGIC
        || crc32fast::hash(&h[..ENTRY_HEADER_CRC_OFFSET]) != le(ENTRY_HEADER_CRC_OFFSET)
    {
        return None;
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&h[20..52]);
    Some(ChunkRecord {
        blob: 0,
        flags: le(4),
        comp_off: 0,
        comp_len: le(8),
        raw_len: le(12),
        crc32: le(16),
        digest,
    })
}

/// The cache record of a chunk: only the fields an entry stores.
pub(super) fn entry_record(r: &ChunkRecord) -> ChunkRecord {
    ChunkRecord {
        blob: 0,
        comp_off: 0,
        ..*r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_header_round_trips_and_a_flipped_byte_is_refused() {
        let record = ChunkRecord {
            blob: 7,
            flags: 1,
            comp_off: 99,
            comp_len: 1234,
            raw_len: 5678,
            crc32: 0xdead_beef,
            digest: [9; 32],
        };
        let header = encode_entry_header(&record);
        assert_eq!(decode_entry_header(&header), Some(entry_record(&record)));
        for at in [0, 4, 8, 20, 52, ENTRY_HEADER_CRC_OFFSET] {
            let mut bad = header;
            bad[at] ^= 1;
            assert_eq!(decode_entry_header(&bad), None, "byte {at} flipped");
        }
    }
}
