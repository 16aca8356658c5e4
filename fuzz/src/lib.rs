//! Helpers shared by the fuzz targets in `fuzz_targets/`.

/// Size of a tar block; headers start on block boundaries.
pub const TAR_BLOCK: usize = 512;

/// `data` with every 512-byte block that is not all zeros given the header checksum its other
/// bytes add up to (tar's rule: the sum of all bytes, the 8-byte checksum field counted as
/// spaces), so that fuzzed headers get past the checksum test. All-zero blocks are left alone:
/// they end an archive.
pub fn repair_tar_checksums(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for block in out.chunks_exact_mut(TAR_BLOCK) {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        // At most 512 * 255 = 0o376000: six octal digits, then NUL, then the space left there.
        block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }
    out
}
