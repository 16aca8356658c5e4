//! Fuzzes the safetensors header parser: the input's first eight bytes are taken as a file
//! size, the rest as a file's first bytes (length prefix and JSON). Parsing must never panic,
//! and an accepted header's tensors must lie within the file, sorted, without overlap.
#![no_main]

use fusefs::safetensors::{header_len, parse_header, LEN_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (size, file) = data.split_at(8);
    let file_size = u64::from_le_bytes(size.try_into().unwrap()).max(file.len() as u64);
    let Ok(len) = header_len(file, file_size) else {
        return;
    };
    let Some(json) = file.get(LEN_PREFIX as usize..(LEN_PREFIX + len) as usize) else {
        return;
    };
    if let Ok(tensors) = parse_header(json, file_size) {
        let data_start = LEN_PREFIX + len;
        for t in &tensors {
            assert!(data_start <= t.begin && t.begin < t.end && t.end <= file_size);
        }
        for w in tensors.windows(2) {
            assert!(w[0].end <= w[1].begin);
        }
    }
});
