//! The header of a safetensors file, parsed as untrusted input: an 8-byte little-endian length
//! N, then N bytes of JSON mapping tensor names to `{"dtype", "shape", "data_offsets": [begin,
//! end]}` (offsets relative to byte 8 + N), plus an optional `"__metadata__"` map of strings.
//!
//! The agent reads it when a model loader opens a `*.safetensors` file, to fetch the tensors
//! in the order of their bytes before the loader asks for them. Everything is checked against
//! the file it came from: the length is capped as the safetensors specification caps it (100
//! MB), the JSON must be an object of well-formed entries, and every tensor's bytes must lie
//! within the file and overlap no other tensor's. Nothing here panics on any input (see the
//! `safetensors_header` fuzz target).

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

/// Bytes before the JSON: its length, a little-endian u64.
pub const LEN_PREFIX: u64 = 8;

/// Largest JSON header accepted: the limit of the safetensors specification and of its
/// reference implementation (`MAX_HEADER_SIZE`, 100 000 000 bytes).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The key of the free-form string map, which names no tensor.
const METADATA_KEY: &str = "__metadata__";

/// Why a header was refused; the message names the tensor or field at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("file of {0} bytes is too short for a safetensors header")]
    TooShort(u64),
    #[error("header length {len} exceeds the safetensors limit of {MAX_HEADER_LEN} bytes")]
    TooLong { len: u64 },
    #[error("header of {len} bytes does not fit in a file of {file_size} bytes")]
    PastEnd { len: u64, file_size: u64 },
    #[error("header is not a JSON object of tensors: {0}")]
    Json(String),
    #[error("tensor {name:?}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("tensors {first:?} and {second:?} overlap")]
    Overlap { first: String, second: String },
}

/// One tensor's bytes in the file: `begin..end` are absolute file offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRange {
    pub name: String,
    pub begin: u64,
    pub end: u64,
}

/// The length N of the JSON header from a file's first eight bytes, checked against the
/// specification's cap and the file's size.
pub fn header_len(prefix: &[u8], file_size: u64) -> Result<u64, HeaderError> {
    let Some(bytes) = prefix.get(..LEN_PREFIX as usize) else {
        return Err(HeaderError::TooShort(file_size));
    };
    if file_size < LEN_PREFIX {
        return Err(HeaderError::TooShort(file_size));
    }
    let mut le = [0u8; 8];
    le.copy_from_slice(bytes);
    let len = u64::from_le_bytes(le);
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong { len });
    }
    if LEN_PREFIX + len > file_size {
        return Err(HeaderError::PastEnd { len, file_size });
    }
    Ok(len)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The tensors of a header `json` of length `len` (from [`header_len`]) in a file of
/// `file_size` bytes, sorted by where their bytes begin. Empty tensors are left out: they have
/// no bytes to fetch.
pub fn parse_header(json: &[u8], file_size: u64) -> Result<Vec<TensorRange>, HeaderError> {
    let len = json.len() as u64;
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong { len });
    }
    let data_start = LEN_PREFIX + len;
    if data_start > file_size {
        return Err(HeaderError::PastEnd { len, file_size });
    }
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| HeaderError::Json(e.to_string()))?;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == METADATA_KEY {
            if !value.is_object() {
                return Err(HeaderError::Json(format!(
                    "{METADATA_KEY} is not an object"
                )));
            }
            continue;
        }
        let bad = |reason: String| HeaderError::Tensor {
            name: name.clone(),
            reason,
        };
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if info.dtype.is_empty() || info.shape.len() > 64 {
            return Err(bad(format!(
                "dtype {:?} with {} dimensions",
                info.dtype,
                info.shape.len()
            )));
        }
        let [begin, end] = info.data_offsets;
        if begin > end {
            return Err(bad(format!("data_offsets [{begin}, {end}] run backwards")));
        }
        let limit = file_size - data_start;
        if end > limit {
            return Err(bad(format!(
                "data_offsets end {end} is past the {limit} data bytes of the file"
            )));
        }
        if begin < end {
            tensors.push(TensorRange {
                name,
                begin: data_start + begin,
                end: data_start + end,
            });
        }
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    for pair in tensors.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(HeaderError::Overlap {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file's bytes: the length prefix, `json`, then `data` bytes of zeros.
    fn file(json: &str, data: u64) -> (Vec<u8>, u64) {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        let size = bytes.len() as u64 + data;
        (bytes, size)
    }

    fn parse(json: &str, data: u64) -> Result<Vec<TensorRange>, HeaderError> {
        let (bytes, size) = file(json, data);
        let len = header_len(&bytes, size)?;
        parse_header(&bytes[8..8 + len as usize], size)
    }

    #[test]
    fn a_good_header_gives_tensors_in_byte_order() {
        let json = r#"{"__metadata__":{"format":"pt"},
            "b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},
            "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
            "empty":{"dtype":"F32","shape":[0],"data_offsets":[16,16]}}"#;
        let t = parse(json, 16).unwrap();
        let base = 8 + json.len() as u64;
        assert_eq!(
            t,
            vec![
                TensorRange {
                    name: "a".into(),
                    begin: base,
                    end: base + 8
                },
                TensorRange {
                    name: "b".into(),
                    begin: base + 8,
                    end: base + 16
                },
            ]
        );
    }

    #[test]
    fn hostile_headers_are_refused_with_a_reason() {
        // A length past the specification's cap, and one past the end of the file.
        let mut huge = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            header_len(&huge, u64::MAX),
            Err(HeaderError::TooLong { .. })
        ));
        assert!(matches!(
            header_len(&100u64.to_le_bytes(), 50),
            Err(HeaderError::PastEnd { .. })
        ));
        assert!(matches!(
            header_len(&[1, 2, 3], 3),
            Err(HeaderError::TooShort(3))
        ));
        assert!(matches!(
            header_len(&u64::MAX.to_le_bytes(), u64::MAX),
            Err(HeaderError::TooLong { .. })
        ));
        for (json, data, want) in [
            ("{not json", 0, "JSON"),
            ("[1,2]", 0, "JSON"),
            ("\"a\"", 0, "JSON"),
            (r#"{"__metadata__":3}"#, 0, "__metadata__"),
            (r#"{"t":5}"#, 0, "\"t\""),
            (r#"{"t":{"dtype":"F32","shape":[1]}}"#, 8, "data_offsets"),
            (
                r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
                8,
                "\"t\"",
            ),
            (
                r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[-1,4]}}"#,
                8,
                "\"t\"",
            ),
            (
                r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                8,
                "backwards",
            ),
            (
                r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,9]}}"#,
                8,
                "past the 8 data bytes",
            ),
            (
                r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#,
                8,
                "past",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,12]}}"#,
                16,
                "overlap",
            ),
        ] {
            let e = parse(json, data).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
