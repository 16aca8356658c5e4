//! Reading one layer: detect its compression (gzip, zstd or plain tar, by magic bytes, not
//! by media type), hash the blob as it streams past to check its digest, and apply every tar
//! entry to the merged tree, with file data going to the packer.

use std::io::{self, BufRead, BufReader, Read};

use sha2::{Digest, Sha256};

use crate::error::ConvertError;
use crate::packer::LayerPacker;
use crate::pax::{parse_records, pax_records_before, HeaderTap, PaxLookup, PaxRecord};
use crate::tree::{
    components, dir_node, file_node, special_node, symlink_node, Meta, Tree, TreeError,
};
use fusefs::format::{encode_dev, S_IFBLK, S_IFCHR, S_IFIFO};

/// A reader that hashes (sha256, when asked to) and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    pub bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_hash(inner, true)
    }

    /// `hash: false` only counts: no digest is needed for this stream.
    pub fn with_hash(inner: R, hash: bool) -> Self {
        HashingReader {
            inner,
            hasher: hash.then(Sha256::new),
            bytes: 0,
        }
    }

    /// Reads the rest of the stream (tar readers stop before trailing padding) and returns
    /// `sha256:<hex>` of everything read, if hashing.
    pub fn finish(mut self) -> io::Result<Option<String>> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self
            .hasher
            .map(|h| format!("sha256:{}", hex::encode(h.finalize()))))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "uncompressed tar",
        }
    }

    /// Sniffs the first bytes of a blob.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Opens the decompressed tar stream of a blob.
pub fn decompress<'a, R: BufRead + 'a>(
    mut r: R,
    layer: &str,
) -> Result<(Compression, Box<dyn Read + 'a>), ConvertError> {
    let head = r
        .fill_buf()
        .map_err(ConvertError::io(format!("reading layer {layer}")))?;
    let c = Compression::detect(head);
    let stream: Box<dyn Read> = match c {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|e| {
                ConvertError::CorruptLayer {
                    layer: layer.to_string(),
                    compression: "zstd",
                    reason: e.to_string(),
                }
            })?)
        }
        Compression::None => Box::new(r),
    };
    Ok((c, stream))
}

/// Counts of what one layer contained.
#[derive(Debug, Default, Clone)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses a PAX time ("1700000000.123456789", possibly negative) into (sec, nsec).
fn pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    // Digits only: `from_str` would also take a second sign (`--5`, `-+5`).
    if whole.is_empty() || !whole.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let sec: u64 = whole.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    if !neg {
        Some((i64::try_from(sec).ok()?, nsec))
    } else if nsec == 0 {
        Some((0i64.checked_sub_unsigned(sec)?, 0))
    } else {
        Some(((-1i64).checked_sub_unsigned(sec)?, 1_000_000_000 - nsec))
    }
}

/// The PAX records of `entry`: parsed from the raw bytes the tap recorded, or, when the
/// recording is not usable, from the `tar` crate's own (newline-splitting) parser.
fn pax_of<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    tap: &crate::pax::Tap,
) -> Result<Vec<PaxRecord>, String> {
    match pax_records_before(tap, entry.raw_header_position()) {
        PaxLookup::Found(data) => parse_records(&data),
        PaxLookup::NoPax => Ok(Vec::new()),
        PaxLookup::Unreadable => match entry.pax_extensions() {
            Ok(Some(exts)) => exts
                .map(|e| {
                    e.map(|e| (e.key_bytes().to_vec(), e.value_bytes().to_vec()))
                        .map_err(|e| e.to_string())
                })
                .collect(),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// Applies the tar stream of layer number `layer` (named `label` in errors) to `tree`.
pub fn apply_tar(
    stream: impl Read,
    layer: u32,
    label: &str,
    compression: Compression,
    tree: &mut Tree,
    packer: &mut LayerPacker,
) -> Result<LayerStats, ConvertError> {
    let corrupt = |e: io::Error| ConvertError::CorruptLayer {
        layer: label.to_string(),
        compression: compression.name(),
        reason: e.to_string(),
    };
    let (stream, tap) = HeaderTap::new(stream);
    let mut archive = tar::Archive::new(stream);
    let mut stats = LayerStats::default();
    let mut entries = archive.entries().map_err(corrupt)?;
    loop {
        // Record the headers tar reads before the next entry (not file data).
        tap.borrow_mut().reset();
        let Some(entry) = entries.next() else { break };
        let mut entry = entry.map_err(corrupt)?;
        tap.borrow_mut().pause();
        stats.entries += 1;
        let pax = pax_of(&mut entry, &tap.borrow()).map_err(|reason| ConvertError::BadEntry {
            layer: label.to_string(),
            entry: lossy(&entry.path_bytes()),
            reason,
        })?;
        let pax_value = |key: &[u8]| {
            pax.iter()
                .rev()
                .find(|(k, _)| k.as_slice() == key)
                .map(|(_, v)| v.clone())
        };
        let raw_path = pax_value(b"path").unwrap_or_else(|| entry.path_bytes().into_owned());
        let shown = lossy(&raw_path);
        let bad_entry = |reason: String| ConvertError::BadEntry {
            layer: label.to_string(),
            entry: shown.clone(),
            reason,
        };
        let tree_err = |e: TreeError| match e {
            TreeError::Absolute => ConvertError::AbsolutePath {
                layer: label.to_string(),
                entry: shown.clone(),
            },
            TreeError::Escapes => ConvertError::EscapesRoot {
                layer: label.to_string(),
                entry: shown.clone(),
            },
            other => bad_entry(other.to_string()),
        };
        let path = components(&raw_path).map_err(tree_err)?;

        if let Some((name, dir)) = path.split_last() {
            if name.as_slice() == b".wh..wh..opq" {
                tree.opaque(dir, layer).map_err(tree_err)?;
                stats.whiteouts += 1;
                continue;
            }
            if name.starts_with(b".wh..wh.") {
                // aufs bookkeeping (e.g. .wh..wh.plnk): not content.
                continue;
            }
            if let Some(hidden) = name.strip_prefix(b".wh.") {
                tree.whiteout(dir, hidden, layer).map_err(tree_err)?;
                stats.whiteouts += 1;
                continue;
            }
        }

        let header = entry.header().clone();
        let mut meta = Meta {
            mode: header.mode().map_err(corrupt)? & 0o7777,
            uid: header.uid().map_err(corrupt)? as u32,
            gid: header.gid().map_err(corrupt)? as u32,
            mtime_sec: header.mtime().map_err(corrupt)? as i64,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        };
        for (key, value) in &pax {
            let (key, value) = (key.as_slice(), value.as_slice());
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"mtime" {
                let (s, ns) = pax_time(value)
                    .ok_or_else(|| bad_entry(format!("bad PAX mtime {:?}", lossy(value))))?;
                meta.mtime_sec = s;
                meta.mtime_nsec = ns;
            } else if key == b"uid" || key == b"gid" {
                let id: u32 = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad_entry(format!("bad PAX {}", lossy(key))))?;
                if key == b"uid" {
                    meta.uid = id;
                } else {
                    meta.gid = id;
                }
            }
        }
        meta.xattrs.sort();
        meta.xattrs.dedup_by(|a, b| a.0 == b.0);

        let kind = header.entry_type();
        use tar::EntryType as T;
        let node = match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                let size = entry.size();
                let what = || format!("layer {label}: entry {shown:?}");
                let extents =
                    packer
                        .add_file(&mut entry, size, &path, &what)
                        .map_err(|e| match e {
                            ConvertError::Io { source, .. } => corrupt(source),
                            other => other,
                        })?;
                file_node(meta, size, extents)
            }
            T::Directory => dir_node(meta),
            T::Symlink => {
                let target = pax_value(b"linkpath")
                    .or_else(|| entry.link_name_bytes().map(|t| t.into_owned()))
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad_entry("symlink without a target".into()))?;
                if target.len() > fusefs::format::PATH_MAX || target.contains(&0) {
                    return Err(bad_entry("symlink target is too long".into()));
                }
                symlink_node(meta, target)
            }
            T::Link => {
                let target = pax_value(b"linkpath")
                    .or_else(|| entry.link_name_bytes().map(|t| t.into_owned()))
                    .unwrap_or_default();
                let link_err = |e: TreeError| match e {
                    TreeError::Absolute | TreeError::Escapes => ConvertError::LinkOutsideTree {
                        layer: label.to_string(),
                        entry: shown.clone(),
                        target: lossy(&target),
                    },
                    other => ConvertError::BadHardlink {
                        layer: label.to_string(),
                        entry: shown.clone(),
                        target: lossy(&target),
                        reason: other.to_string(),
                    },
                };
                let target_path = components(&target).map_err(link_err)?;
                tree.hardlink(&path, &target_path, layer)
                    .map_err(link_err)?;
                continue;
            }
            T::Char | T::Block => {
                let major = header.device_major().map_err(corrupt)?.unwrap_or(0);
                let minor = header.device_minor().map_err(corrupt)?.unwrap_or(0);
                meta.mode |= if kind == T::Char { S_IFCHR } else { S_IFBLK };
                special_node(meta, encode_dev(major, minor))
            }
            // A fifo's device fields are meaningless (and often blank): not read.
            T::Fifo => {
                meta.mode |= S_IFIFO;
                special_node(meta, 0)
            }
            T::XGlobalHeader => continue,
            other => {
                return Err(bad_entry(format!(
                    "unsupported tar entry type {:?}",
                    other.as_byte() as char
                )))
            }
        };
        tree.insert(&path, node, layer).map_err(tree_err)?;
    }
    Ok(stats)
}

/// Opens a layer blob file for reading with a large buffer.
pub fn open_blob(path: &std::path::Path) -> Result<BufReader<std::fs::File>, ConvertError> {
    let f = std::fs::File::open(path).map_err(ConvertError::io(format!(
        "opening layer blob {}",
        path.display()
    )))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse() {
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(pax_time(b"12"), Some((12, 0)));
        assert_eq!(pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time(b"x"), None);
        assert_eq!(pax_time(b"1.2x"), None);
    }

    /// `--9223372036854775808` parsed as i64::MIN and was then negated: an overflow panic in
    /// debug builds, a wrong mtime in release ones; `--5` was taken for 5.
    #[test]
    fn pax_time_with_two_signs_is_refused() {
        assert_eq!(pax_time(b"--9223372036854775808"), None);
        assert_eq!(pax_time(b"--5"), None);
        assert_eq!(pax_time(b"-+5"), None);
        assert_eq!(pax_time(b"+5"), None);
        assert_eq!(pax_time(b"-9223372036854775808"), Some((i64::MIN, 0)));
        assert_eq!(
            pax_time(b"-9223372036854775807.5"),
            Some((i64::MIN, 500_000_000))
        );
        assert_eq!(pax_time(b"9223372036854775808"), None);
    }

    #[test]
    fn compression_is_sniffed() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"etc/"), Compression::None);
    }
}
