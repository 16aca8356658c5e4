//! OCI image layouts built from layers described in test code.
//!
//! A test describes each layer as a list of [`Entry`] values (path as raw bytes, kind, metadata)
//! and picks its [`Compression`]; [`LayoutBuilder`] serialises every layer with the `tar` crate's
//! header types, compresses it while hashing both the uncompressed stream (the config's
//! `rootfs.diff_ids`) and the compressed blob (the manifest's layer digest), and writes an OCI
//! image layout: `oci-layout`, `index.json` (the tag in `org.opencontainers.image.ref.name`) and
//! `blobs/sha256/*`. Several tags may share one layout directory; shared layers are stored once.
//!
//! Entries are written byte-exactly, without the path normalisation `tar::Builder::append_data`
//! does, so tests can use non-UTF-8 names, trailing slashes on directories and names longer than
//! the 100-byte header field: in [`HeaderFormat::Gnu`] layers long names become GNU
//! `././@LongLink` (`L`/`K`) entries, in [`HeaderFormat::Pax`] layers they become PAX `path` /
//! `linkpath` records the way Go's `archive/tar` (docker, buildkit, umoci) writes them.
//! Sub-second mtimes and xattrs always travel as PAX records (`mtime`, `SCHILY.xattr.*`).
//! Sparse files are written as old-GNU sparse entries (type `S`, sparse map in the header and in
//! extension blocks), which GNU tar, Go's `archive/tar` and the `tar` crate all read.
//!
//! [`docker_archive`] and [`oci_archive`] re-package any tagged layout (also ones written by
//! umoci) in the `docker save` format and as a tarred layout, for the converter's other inputs.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an OCI image index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Annotation that carries the tag of a manifest in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Default mtime of entries (2023-11-14T22:13:20Z): fixed so layer digests are reproducible.
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// Tar blocks are 512 bytes; every header and every data area is padded to whole blocks.
const TAR_BLOCK: u64 = 512;
/// Buffer for generated content: large, so gigabytes take thousands of calls, not millions.
const COPY_BUFFER: usize = 1 << 20;
/// The largest size an 11-digit octal size field holds (8 GiB - 1).
const MAX_OCTAL_SIZE: u64 = 0o77_777_777_777;
/// Sparse map slots in an old-GNU header, and in each sparse extension block that follows it.
const GNU_SPARSE_IN_HEADER: usize = 4;
const GNU_SPARSE_IN_EXTENSION: usize = 21;
/// Header name/linkname fields hold 100 bytes; the ustar prefix field 155 more.
const NAME_FIELD: usize = 100;
const PREFIX_FIELD: usize = 155;

/// How a layer blob is compressed; decides its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar, `application/vnd.oci.image.layer.v1.tar`.
    None,
    /// gzip, `application/vnd.oci.image.layer.v1.tar+gzip`.
    Gzip,
    /// zstd, `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// The compression a layer media type names (OCI and Docker v2 types).
    pub fn from_media_type(media_type: &str) -> Result<Compression> {
        Ok(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            other => bail!("unknown layer media type {other}"),
        })
    }
}

/// Which tar dialect a layer's headers use for what does not fit a plain ustar header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderFormat {
    /// GNU headers; names and link targets over 100 bytes go in `././@LongLink` entries
    /// (what GNU tar and the `tar` crate write).
    Gnu,
    /// ustar headers; names that fit are split into prefix/name, longer or non-ASCII names and
    /// targets go in PAX `path`/`linkpath` records (what Go's `archive/tar` writes).
    Pax,
}

/// Ownership, permissions, times and xattrs of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid (0o4000), setgid (0o2000) and sticky (0o1000).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: u64,
    /// Nanoseconds; when set, the mtime is also written as a PAX `mtime` record.
    pub mtime_nsec: Option<u32>,
    /// Extended attributes (full names such as `user.comment`), written as PAX
    /// `SCHILY.xattr.NAME` records in this order.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// Root-owned, given mode, [`DEFAULT_MTIME`], no xattrs.
    pub fn with_mode(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            mtime_nsec: None,
            xattrs: Vec::new(),
        }
    }
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with this content.
    File(Vec<u8>),
    /// A regular file of `size` bytes that is zero except for `data` (sorted, non-overlapping
    /// `(offset, bytes)` segments), written as a plain regular entry whose content is generated
    /// while writing (never held in memory). In a zstd layer gigabytes of zeros cost kilobytes.
    /// Sizes of 8 GiB and more use a base-256 size field (GNU) or a PAX `size` record (PAX).
    LargeFile {
        size: u64,
        data: Vec<(u64, Vec<u8>)>,
    },
    /// The same content as `LargeFile`, written as an old-GNU sparse entry (type `S`): the
    /// layer holds only the segments, widened to whole 512-byte blocks (as GNU tar writes
    /// them, so every reader agrees), built in memory. Needs a [`HeaderFormat::Gnu`] layer.
    /// umoci 0.4 cannot unpack these ("unknown typeflag"), so keep them out of images checked
    /// against umoci.
    Sparse {
        size: u64,
        data: Vec<(u64, Vec<u8>)>,
    },
    Dir,
    /// A symbolic link to this target (raw bytes, not checked).
    Symlink(Vec<u8>),
    /// A hard link to this earlier path (of this layer or a lower one).
    Hardlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One tar entry of a layer: raw path bytes, kind and metadata.
///
/// Build with the constructors and chain the setters:
/// `Entry::file("etc/motd", "hi\n").mode(0o600).owner(1000, 1000).mtime_ns(1_600_000_000, 5)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the image, relative, as raw bytes (need not be UTF-8).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub meta: Meta,
}

impl Entry {
    /// A regular file (mode 0o644).
    pub fn file(path: impl AsRef<[u8]>, content: impl Into<Vec<u8>>) -> Entry {
        Entry::new(path, EntryKind::File(content.into()), 0o644)
    }

    /// A regular file of `size` bytes holding `data` segments, zero elsewhere, generated while
    /// the layer is written (0o644).
    pub fn large_file(path: impl AsRef<[u8]>, size: u64, data: Vec<(u64, Vec<u8>)>) -> Entry {
        Entry::new(path, EntryKind::LargeFile { size, data }, 0o644)
    }

    /// An old-GNU sparse file of `size` bytes holding `data` segments, zero elsewhere (0o644).
    pub fn sparse(path: impl AsRef<[u8]>, size: u64, data: Vec<(u64, Vec<u8>)>) -> Entry {
        Entry::new(path, EntryKind::Sparse { size, data }, 0o644)
    }

    /// A directory (mode 0o755). The header name gets the trailing `/` tar writers add.
    pub fn dir(path: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, EntryKind::Dir, 0o755)
    }

    /// A symbolic link (mode 0o777).
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, EntryKind::Symlink(target.as_ref().to_vec()), 0o777)
    }

    /// A hard link to `target`, a path written earlier in this layer or in a lower layer.
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, EntryKind::Hardlink(target.as_ref().to_vec()), 0o644)
    }

    /// A character device (mode 0o644).
    pub fn char_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
        Entry::new(path, EntryKind::CharDevice { major, minor }, 0o644)
    }

    /// A block device (mode 0o644).
    pub fn block_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
        Entry::new(path, EntryKind::BlockDevice { major, minor }, 0o644)
    }

    /// A named pipe (mode 0o644).
    pub fn fifo(path: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, EntryKind::Fifo, 0o644)
    }

    /// The whiteout that deletes `path` of the lower layers: an empty file `DIR/.wh.NAME`.
    pub fn whiteout(path: impl AsRef<[u8]>) -> Entry {
        let path = path.as_ref();
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(slash) => (&path[..=slash], &path[slash + 1..]),
            None => (&b""[..], path),
        };
        let whiteout = [dir, b".wh.", name].concat();
        Entry::file(whiteout, Vec::new())
    }

    /// The opaque marker `DIR/.wh..wh..opq`: hides everything lower layers put in `dir`.
    pub fn opaque(dir: impl AsRef<[u8]>) -> Entry {
        let dir = dir.as_ref().strip_suffix(b"/").unwrap_or(dir.as_ref());
        Entry::file([dir, b"/.wh..wh..opq"].concat(), Vec::new())
    }

    fn new(path: impl AsRef<[u8]>, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.as_ref().to_vec(),
            kind,
            meta: Meta::with_mode(mode),
        }
    }

    /// Sets the permission bits (including setuid/setgid/sticky).
    pub fn mode(mut self, mode: u32) -> Entry {
        self.meta.mode = mode;
        self
    }

    /// Sets the numeric owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.meta.uid = uid;
        self.meta.gid = gid;
        self
    }

    /// Sets a whole-second mtime (header field only).
    pub fn mtime(mut self, secs: u64) -> Entry {
        self.meta.mtime = secs;
        self.meta.mtime_nsec = None;
        self
    }

    /// Sets an mtime with nanoseconds (header field plus a PAX `mtime` record).
    pub fn mtime_ns(mut self, secs: u64, nsec: u32) -> Entry {
        assert!(nsec < 1_000_000_000, "nanoseconds out of range: {nsec}");
        self.meta.mtime = secs;
        self.meta.mtime_nsec = Some(nsec);
        self
    }

    /// Adds an extended attribute (PAX `SCHILY.xattr.NAME` record).
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Entry {
        self.meta
            .xattrs
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }
}

/// One layer: its entries in archive order, its compression and its header dialect.
#[derive(Clone, Debug)]
pub struct Layer {
    pub compression: Compression,
    pub format: HeaderFormat,
    pub entries: Vec<Entry>,
}

impl Layer {
    /// An empty layer with GNU headers.
    pub fn new(compression: Compression) -> Layer {
        Layer {
            compression,
            format: HeaderFormat::Gnu,
            entries: Vec::new(),
        }
    }

    /// Switches the header dialect.
    pub fn format(mut self, format: HeaderFormat) -> Layer {
        self.format = format;
        self
    }

    /// Appends one entry.
    pub fn entry(mut self, entry: Entry) -> Layer {
        self.entries.push(entry);
        self
    }

    /// Appends entries.
    pub fn entries(mut self, entries: impl IntoIterator<Item = Entry>) -> Layer {
        self.entries.extend(entries);
        self
    }

    /// Writes the uncompressed tar stream (ending with the two zero blocks) to `out`.
    pub fn write_tar<W: Write>(&self, out: W) -> Result<W> {
        let mut builder = tar::Builder::new(out);
        for entry in &self.entries {
            append_entry(&mut builder, self.format, entry).with_context(|| {
                format!("writing tar entry {}", String::from_utf8_lossy(&entry.path))
            })?;
        }
        Ok(builder.into_inner()?)
    }
}

/// Appends `entry` to `builder`, byte-exact, with whatever extension records it needs.
fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    format: HeaderFormat,
    entry: &Entry,
) -> Result<()> {
    let mut name = entry.path.clone();
    ensure!(
        !name.is_empty() && !name.contains(&0),
        "entry paths must be non-empty without NUL"
    );
    if entry.kind == EntryKind::Dir && !name.ends_with(b"/") {
        name.push(b'/');
    }
    let link = match &entry.kind {
        EntryKind::Symlink(target) | EntryKind::Hardlink(target) => Some(target.as_slice()),
        _ => None,
    };

    let mut header = match format {
        HeaderFormat::Gnu => tar::Header::new_gnu(),
        HeaderFormat::Pax => tar::Header::new_ustar(),
    };
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    match format {
        HeaderFormat::Gnu => {
            if name.len() > NAME_FIELD {
                append_gnu_long(builder, b'L', &name)?;
            }
            if let Some(link) = link.filter(|l| l.len() > NAME_FIELD) {
                append_gnu_long(builder, b'K', link)?;
            }
            put_field(&mut header.as_old_mut().name, &name);
        }
        HeaderFormat::Pax => {
            let ustar = header.as_ustar_mut().expect("ustar header");
            match ustar_split(&name) {
                Some((prefix, rest)) => {
                    put_field(&mut ustar.prefix, prefix);
                    put_field(&mut ustar.name, rest);
                }
                None => {
                    pax.push(("path".into(), name.clone()));
                    put_field(&mut ustar.name, &name);
                }
            }
            if let Some(link) = link.filter(|l| l.len() > NAME_FIELD || !l.is_ascii()) {
                pax.push(("linkpath".into(), link.to_vec()));
            }
        }
    }
    if let Some(link) = link {
        put_field(&mut header.as_old_mut().linkname, link);
    }

    let meta = &entry.meta;
    if let Some(nsec) = meta.mtime_nsec {
        pax.push((
            "mtime".into(),
            format!("{}.{:09}", meta.mtime, nsec).into_bytes(),
        ));
    }
    for (key, value) in &meta.xattrs {
        pax.push((format!("SCHILY.xattr.{key}"), value.clone()));
    }
    let content_size = match &entry.kind {
        EntryKind::File(content) => content.len() as u64,
        EntryKind::LargeFile { size, .. } => *size,
        _ => 0,
    };
    // Go's archive/tar puts sizes that overflow the octal field in a PAX record and writes 0
    // in the header; GNU headers take base-256 (the tar crate's `set_size` does that).
    let pax_size = format == HeaderFormat::Pax && content_size > MAX_OCTAL_SIZE;
    if pax_size {
        pax.push(("size".into(), content_size.to_string().into_bytes()));
    }
    if !pax.is_empty() {
        builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }

    header.set_mode(meta.mode);
    header.set_uid(meta.uid);
    header.set_gid(meta.gid);
    header.set_mtime(meta.mtime);
    header.set_size(0);
    match &entry.kind {
        EntryKind::File(content) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(content.len() as u64);
            header.set_cksum();
            builder.append(&header, content.as_slice())?;
        }
        EntryKind::LargeFile { size, data } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(if pax_size { 0 } else { *size });
            header.set_cksum();
            // The data area is `size` bytes whatever the header field says.
            let out = builder.get_mut();
            out.write_all(header.as_bytes())?;
            copy_large(&mut SegmentReader::new(*size, data)?, out)?;
            let pad = (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK;
            out.write_all(&[0u8; TAR_BLOCK as usize][..pad as usize])?;
        }
        EntryKind::Sparse { size, data } => {
            ensure!(
                format == HeaderFormat::Gnu,
                "sparse entries need a GNU-format layer"
            );
            append_gnu_sparse(builder, header, *size, data)?;
        }
        EntryKind::Dir => append_empty(builder, header, tar::EntryType::Directory)?,
        EntryKind::Symlink(_) => append_empty(builder, header, tar::EntryType::Symlink)?,
        EntryKind::Hardlink(_) => append_empty(builder, header, tar::EntryType::Link)?,
        EntryKind::Fifo => append_empty(builder, header, tar::EntryType::Fifo)?,
        EntryKind::CharDevice { major, minor } => {
            header.set_device_major(*major)?;
            header.set_device_minor(*minor)?;
            append_empty(builder, header, tar::EntryType::Char)?
        }
        EntryKind::BlockDevice { major, minor } => {
            header.set_device_major(*major)?;
            header.set_device_minor(*minor)?;
            append_empty(builder, header, tar::EntryType::Block)?
        }
    }
    Ok(())
}

fn append_empty<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    kind: tar::EntryType,
) -> Result<()> {
    header.set_entry_type(kind);
    header.set_cksum();
    builder.append(&header, io::empty())?;
    Ok(())
}

/// Copies up to `field.len()` bytes of `value` into a NUL-padded header field.
fn put_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

/// Splits an ASCII path into ustar (prefix, name) at a `/`, if it fits the two fields.
fn ustar_split(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if !path.is_ascii() {
        return None;
    }
    if path.len() <= NAME_FIELD {
        return Some((&[], path));
    }
    // A trailing slash (directories) stays with the name part.
    let search = &path[..path.len() - 1];
    search
        .iter()
        .enumerate()
        .rev()
        .filter(|&(_, &b)| b == b'/')
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .find(|(prefix, rest)| prefix.len() <= PREFIX_FIELD && rest.len() <= NAME_FIELD)
}

/// Appends a GNU long name (`L`) or long link (`K`) entry carrying `value`.
fn append_gnu_long<W: Write>(builder: &mut tar::Builder<W>, kind: u8, value: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    put_field(&mut header.as_old_mut().name, b"././@LongLink");
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    // GNU tar NUL-terminates the name and counts the NUL.
    header.set_size(value.len() as u64 + 1);
    header.set_entry_type(tar::EntryType::new(kind));
    header.set_cksum();
    builder.append(&header, value.chain(&[0u8][..]))?;
    Ok(())
}

/// Appends an old-GNU sparse entry: type `S`, the first four map slots in the header, the rest
/// in 512-byte extension blocks, then the data of the segments back to back.
fn append_gnu_sparse<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    size: u64,
    data: &[(u64, Vec<u8>)],
) -> Result<()> {
    // Validates the segments, and supplies the bytes of the widened regions.
    let mut content = SegmentReader::new(size, data)?;
    // GNU tar reads every region from a fresh 512-byte block, Go and the tar crate read them
    // back to back; regions widened to whole blocks (GNU tar writes nothing else) read the
    // same in all three.
    let mut map: Vec<(u64, u64)> = Vec::with_capacity(data.len() + 1);
    for (offset, bytes) in data.iter().filter(|(_, b)| !b.is_empty()) {
        let start = offset / TAR_BLOCK * TAR_BLOCK;
        let end = (offset + bytes.len() as u64).div_ceil(TAR_BLOCK) * TAR_BLOCK;
        let end = end.min(size);
        match map.last_mut() {
            Some((last_start, last_len)) if *last_start + *last_len >= start => {
                *last_len = end - *last_start;
            }
            _ => map.push((start, end - start)),
        }
    }
    let stored: u64 = map.iter().map(|&(_, len)| len).sum();
    if map.last().is_none_or(|&(start, len)| start + len < size) {
        // GNU tar closes a trailing hole with an empty region at the end of the file.
        map.push((size, 0));
    }

    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_size(stored);
    let gnu = header.as_gnu_mut().expect("gnu header");
    gnu.set_real_size(size);
    for (slot, &(offset, len)) in gnu.sparse.iter_mut().zip(&map) {
        slot.set_offset(offset);
        slot.set_length(len);
    }
    gnu.set_is_extended(map.len() > GNU_SPARSE_IN_HEADER);
    header.set_cksum();

    let mut body = Vec::new();
    let rest: Vec<_> = map.iter().skip(GNU_SPARSE_IN_HEADER).collect();
    let blocks: Vec<_> = rest.chunks(GNU_SPARSE_IN_EXTENSION).collect();
    for (i, block) in blocks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &&(offset, len)) in ext.sparse.iter_mut().zip(block.iter()) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        ext.set_is_extended(i + 1 < blocks.len());
        body.extend_from_slice(ext.as_bytes());
    }
    for &(start, len) in &map {
        let mut skip = start - content.pos;
        while skip > 0 {
            let mut sink = vec![0u8; skip.min(COPY_BUFFER as u64) as usize];
            content.read_exact(&mut sink)?;
            skip -= sink.len() as u64;
        }
        let from = body.len();
        body.resize(from + len as usize, 0);
        content.read_exact(&mut body[from..])?;
    }
    // `append` pads after the data; the extension blocks are whole blocks already.
    builder.append(&header, body.as_slice())?;
    Ok(())
}

/// `io::copy` with a 1 MiB buffer: gigabytes in thousands of calls, not millions of 8 KiB ones
/// (which matters in the unoptimised test profile).
pub(crate) fn copy_large(from: &mut dyn Read, to: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A file written through [`Write`] in which whole writes of zeros are left as holes, so that
/// a plain tar of the synthetic image's 4 GiB of zeros takes next to no disk (CI machines can
/// be short of it). [`SparseFile::finish`] sets the length a trailing hole leaves short.
struct SparseFile {
    file: File,
    len: u64,
}

impl SparseFile {
    fn new(file: File) -> Self {
        Self { file, len: 0 }
    }

    fn finish(self) -> io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_all()
    }
}

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if is_zeros(buf) {
            self.file.seek(io::SeekFrom::Current(buf.len() as i64))?;
        } else {
            self.file.write_all(buf)?;
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Whether `buf` is all zeros (compared a block at a time, through `memcmp`: this crate is
/// built unoptimised and checks gigabytes).
pub(crate) fn is_zeros(buf: &[u8]) -> bool {
    const BLOCK: usize = 64 << 10;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    buf.chunks(BLOCK).all(|b| b == &ZEROS[..b.len()])
}

/// Reads `size` bytes that are zero except for the given segments.
struct SegmentReader<'a> {
    size: u64,
    pos: u64,
    segments: &'a [(u64, Vec<u8>)],
}

impl<'a> SegmentReader<'a> {
    fn new(size: u64, segments: &'a [(u64, Vec<u8>)]) -> Result<Self> {
        let mut end = 0;
        for (offset, bytes) in segments {
            ensure!(
                *offset >= end,
                "segments must be sorted and must not overlap"
            );
            end = offset + bytes.len() as u64;
        }
        ensure!(
            end <= size,
            "segment ends at {end}, past the file size {size}"
        );
        Ok(SegmentReader {
            size,
            pos: 0,
            segments,
        })
    }
}

impl Read for SegmentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Drop segments that end before the read position.
        while let Some((offset, bytes)) = self.segments.first() {
            if offset + bytes.len() as u64 > self.pos {
                break;
            }
            self.segments = &self.segments[1..];
        }
        let remaining = self.size - self.pos;
        let want = (buf.len() as u64).min(remaining) as usize;
        let n = match self.segments.first() {
            Some((offset, bytes)) if *offset <= self.pos => {
                let start = (self.pos - offset) as usize;
                let n = want.min(bytes.len() - start);
                buf[..n].copy_from_slice(&bytes[start..start + n]);
                n
            }
            Some((offset, _)) => {
                let n = want.min((offset - self.pos) as usize);
                buf[..n].fill(0);
                n
            }
            None => {
                buf[..want].fill(0);
                want
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// A descriptor of one layer of a written image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// `sha256:...` of the blob as stored.
    pub digest: String,
    /// `sha256:...` of the uncompressed tar stream.
    pub diff_id: String,
    pub media_type: String,
    /// Size of the blob as stored.
    pub size: u64,
}

impl LayerInfo {
    /// The compression named by the media type.
    pub fn compression(&self) -> Result<Compression> {
        Compression::from_media_type(&self.media_type)
    }
}

/// One tagged image in an OCI image layout directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutInfo {
    /// The layout directory (holds `oci-layout`, `index.json`, `blobs/`).
    pub dir: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Lowest layer first.
    pub layers: Vec<LayerInfo>,
}

impl LayoutInfo {
    /// Reads the image tagged `tag` from the layout at `dir`.
    pub fn open(dir: &Path, tag: &str) -> Result<LayoutInfo> {
        let index = read_json(&dir.join("index.json"))?;
        let descriptor = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"][REF_NAME_ANNOTATION].as_str() == Some(tag))
            .with_context(|| format!("no manifest tagged {tag} in {}", dir.display()))?;
        let manifest_digest = str_field(descriptor, "digest")?;
        let manifest = read_json(&blob_path(dir, &manifest_digest))?;
        let config_digest = str_field(&manifest["config"], "digest")?;
        let config = read_json(&blob_path(dir, &config_digest))?;
        let diff_ids = config["rootfs"]["diff_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let layer_descriptors = manifest["layers"].as_array().cloned().unwrap_or_default();
        ensure!(
            diff_ids.len() == layer_descriptors.len(),
            "manifest {manifest_digest} has {} layers but its config {} diff_ids",
            layer_descriptors.len(),
            diff_ids.len()
        );
        let layers = layer_descriptors
            .iter()
            .zip(&diff_ids)
            .map(|(layer, diff_id)| {
                Ok(LayerInfo {
                    digest: str_field(layer, "digest")?,
                    diff_id: diff_id
                        .as_str()
                        .context("diff_id is not a string")?
                        .to_string(),
                    media_type: str_field(layer, "mediaType")?,
                    size: layer["size"]
                        .as_u64()
                        .context("layer size is not a number")?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(LayoutInfo {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
            manifest_digest,
            config_digest,
            layers,
        })
    }

    /// The image in skopeo's transport syntax, `oci:DIR:TAG`.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.dir.display(), self.tag)
    }

    /// Where the blob with this `sha256:...` digest is stored.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.dir, digest)
    }

    /// The uncompressed tar stream of `layer`.
    pub fn open_layer(&self, layer: &LayerInfo) -> Result<Box<dyn Read>> {
        let file = File::open(self.blob_path(&layer.digest))
            .with_context(|| format!("opening layer blob {}", layer.digest))?;
        let file = BufReader::new(file);
        Ok(match layer.compression()? {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
            Compression::Zstd => Box::new(zstd::Decoder::with_buffer(file)?),
        })
    }
}

fn str_field(value: &Value, key: &str) -> Result<String> {
    Ok(value[key]
        .as_str()
        .with_context(|| format!("missing string field {key}"))?
        .to_string())
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    dir.join("blobs/sha256").join(hex)
}

/// `sha256:` + hex of `bytes`.
///
/// SHA-256 here and in [`crate::tree`] is ring's: its assembly runs at about 1 GB/s in the
/// unoptimised test profile, where the `sha2` crate manages 20 MB/s (minutes for the
/// synthetic image's 4 GiB file).
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    )
}

/// Writes an OCI image layout from [`Layer`]s.
///
/// ```no_run
/// use lazy_tests::oci::{Compression, Entry, Layer, LayoutBuilder};
/// let info = LayoutBuilder::new("v1")
///     .layer(Layer::new(Compression::Gzip).entry(Entry::file("hello", "world\n")))
///     .write(std::path::Path::new("/tmp/layout"))
///     .unwrap();
/// assert_eq!(info.layers.len(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct LayoutBuilder {
    tag: String,
    /// Layers of another image, below `layers`: copied blob for blob.
    base: Option<LayoutInfo>,
    layers: Vec<Layer>,
    env: Vec<String>,
    cmd: Vec<String>,
}

impl LayoutBuilder {
    /// An image with no layers, to be tagged `tag`, with a default `PATH` and `/bin/sh`.
    pub fn new(tag: &str) -> LayoutBuilder {
        LayoutBuilder {
            tag: tag.to_string(),
            base: None,
            layers: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: vec!["/bin/sh".into()],
        }
    }

    /// Puts the layers of `base` (the same blobs, so the same diff IDs and chain IDs) below the
    /// layers added here: an image built `FROM` it.
    pub fn on(mut self, base: &LayoutInfo) -> LayoutBuilder {
        self.base = Some(base.clone());
        self
    }

    /// Adds the next (upper) layer.
    pub fn layer(mut self, layer: Layer) -> LayoutBuilder {
        self.layers.push(layer);
        self
    }

    /// Sets the config's `Cmd`.
    pub fn cmd(mut self, cmd: &[&str]) -> LayoutBuilder {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Writes the image into the layout at `dir` (created if missing). An existing layout keeps
    /// its other tags; a manifest with the same tag is replaced.
    pub fn write(&self, dir: &Path) -> Result<LayoutInfo> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;

        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in self.base.iter().flat_map(|b| &b.layers) {
            let from = self.base.as_ref().map(|b| b.blob_path(&layer.digest));
            let to = blobs.join(&layer.digest["sha256:".len()..]);
            if let Some(from) = from.filter(|f| *f != to) {
                fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
            }
            layers.push(layer.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            layers.push(write_layer_blob(&blobs, layer).with_context(|| format!("layer {i}"))?);
        }

        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": self.env, "Cmd": self.cmd, "WorkingDir": "/" },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.as_str()).collect::<Vec<_>>(),
            },
            "history": layers.iter().enumerate()
                .map(|(i, _)| json!({ "created": "2023-11-14T22:13:20Z",
                                      "created_by": format!("lazy-tests layer {i}") }))
                .collect::<Vec<_>>(),
        });
        let config = serde_json::to_vec(&config)?;
        let config_digest = write_blob(&blobs, &config)?;

        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.size,
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest)?;
        let manifest_digest = write_blob(&blobs, &manifest)?;

        tag_manifest(dir, &self.tag, &manifest_digest, manifest.len())?;

        Ok(LayoutInfo {
            dir: dir.to_path_buf(),
            tag: self.tag.clone(),
            manifest_digest,
            config_digest,
            layers,
        })
    }
}

/// Stores `bytes` as a blob; returns its digest.
fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<String> {
    let digest = sha256_digest(bytes);
    fs::write(blobs.join(&digest["sha256:".len()..]), bytes)?;
    Ok(digest)
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: ring::digest::Context,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            len: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finish())),
            self.len,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A compressing writer of any [`Compression`].
enum Compressor<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    fn new(compression: Compression, inner: W) -> Result<Self> {
        Ok(match compression {
            Compression::None => Compressor::None(inner),
            Compression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                inner,
                flate2::Compression::new(6),
            )),
            Compression::Zstd => Compressor::Zstd(zstd::Encoder::new(inner, 3)?),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Gzip(w) => w.finish(),
            Compressor::Zstd(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

/// Streams `layer` as tar -> hash (diff_id) -> compress -> hash (digest) -> blob file.
fn write_layer_blob(blobs: &Path, layer: &Layer) -> Result<LayerInfo> {
    let tmp = tempfile::NamedTempFile::new_in(blobs)?;
    let file = BufWriter::new(tmp.reopen()?);
    let stream = HashingWriter::new(Compressor::new(
        layer.compression,
        HashingWriter::new(file),
    )?);
    let (compressor, diff_id, _) = layer.write_tar(stream)?.finish();
    let (file, digest, size) = compressor.finish()?.finish();
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    tmp.persist(blobs.join(&digest["sha256:".len()..]))?;
    Ok(LayerInfo {
        digest,
        diff_id,
        media_type: layer.compression.media_type().into(),
        size,
    })
}

/// Copies the image `layout` into the layout at `dest_dir` (created if missing, other tags
/// kept) with every layer recompressed as `compression_for(current)` says; the tar streams,
/// and so the diff_ids and the config, stay the same. Blobs that keep their compression are
/// hard-linked when possible.
///
/// The reference unpack uses this to turn zstd layers into gzip ones (umoci 0.4 reads no
/// zstd); tests use it to feed one image to the converter in several compressions.
pub fn recompress(
    layout: &LayoutInfo,
    dest_dir: &Path,
    compression_for: impl Fn(Compression) -> Compression,
) -> Result<LayoutInfo> {
    let blobs = dest_dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    fs::write(
        dest_dir.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut manifest = read_json(&layout.blob_path(&layout.manifest_digest))?;
    let mut layers = Vec::with_capacity(layout.layers.len());
    for (i, layer) in layout.layers.iter().enumerate() {
        let from = layer.compression()?;
        let to = compression_for(from);
        let new = if from == to {
            link_or_copy(
                &layout.blob_path(&layer.digest),
                &blob_path(dest_dir, &layer.digest),
            )?;
            layer.clone()
        } else {
            let tmp = tempfile::NamedTempFile::new_in(&blobs)?;
            let file = BufWriter::with_capacity(COPY_BUFFER, SparseFile::new(tmp.reopen()?));
            let mut stream = HashingWriter::new(Compressor::new(to, HashingWriter::new(file))?);
            copy_large(&mut layout.open_layer(layer)?, &mut stream)?;
            let (compressor, diff_id, _) = stream.finish();
            ensure!(
                diff_id == layer.diff_id,
                "layer {} decompresses to {diff_id}",
                layer.digest
            );
            let (file, digest, size) = compressor.finish()?.finish();
            file.into_inner().map_err(|e| e.into_error())?.finish()?;
            tmp.persist(blobs.join(&digest["sha256:".len()..]))?;
            LayerInfo {
                digest,
                diff_id,
                media_type: to.media_type().into(),
                size,
            }
        };
        let descriptor = &mut manifest["layers"][i];
        descriptor["digest"] = json!(new.digest);
        descriptor["mediaType"] = json!(new.media_type);
        descriptor["size"] = json!(new.size);
        layers.push(new);
    }
    link_or_copy(
        &layout.blob_path(&layout.config_digest),
        &blob_path(dest_dir, &layout.config_digest),
    )?;
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = write_blob(&blobs, &manifest)?;
    tag_manifest(dest_dir, &layout.tag, &manifest_digest, manifest.len())?;
    Ok(LayoutInfo {
        dir: dest_dir.to_path_buf(),
        tag: layout.tag.clone(),
        manifest_digest,
        config_digest: layout.config_digest.clone(),
        layers,
    })
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        return Ok(());
    }
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// Points `tag` in `dir/index.json` at the manifest, replacing an older manifest of that tag.
fn tag_manifest(dir: &Path, tag: &str, manifest_digest: &str, manifest_len: usize) -> Result<()> {
    let index_path = dir.join("index.json");
    let mut manifests: Vec<Value> = if index_path.exists() {
        read_json(&index_path)?["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION].as_str() != Some(tag));
    manifests.push(json!({
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": manifest_digest,
        "size": manifest_len,
        "annotations": { REF_NAME_ANNOTATION: tag },
    }));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    });
    fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// Writes the image `layout` in the `docker save` format to `path`: `manifest.json`
/// (`Config`, `RepoTags: [repo_tag]`, `Layers`), the config as `HEX.json` and every layer
/// uncompressed as `DIFFIDHEX/layer.tar`.
pub fn docker_archive(layout: &LayoutInfo, repo_tag: &str, path: &Path) -> Result<()> {
    let mut archive = tar::Builder::new(BufWriter::new(File::create(path)?));
    let scratch = tempfile::tempdir()?;
    let config_hex = &layout.config_digest["sha256:".len()..];
    let config_name = format!("{config_hex}.json");
    append_file_from(
        &mut archive,
        &config_name,
        &layout.blob_path(&layout.config_digest),
    )?;

    let mut layer_names = Vec::new();
    let mut written = std::collections::HashSet::new();
    for layer in &layout.layers {
        let hex = &layer.diff_id["sha256:".len()..];
        let name = format!("{hex}/layer.tar");
        if written.insert(name.clone()) {
            let tar_path = scratch.path().join(hex);
            let mut out = HashingWriter::new(BufWriter::new(File::create(&tar_path)?));
            copy_large(&mut layout.open_layer(layer)?, &mut out)?;
            let (out, diff_id, _) = out.finish();
            out.into_inner().map_err(|e| e.into_error())?;
            ensure!(
                diff_id == layer.diff_id,
                "layer {} decompresses to {diff_id}",
                layer.digest
            );
            append_dir(&mut archive, &format!("{hex}/"))?;
            append_file_from(&mut archive, &name, &tar_path)?;
            fs::remove_file(&tar_path)?;
        }
        layer_names.push(name);
    }
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": [repo_tag],
        "Layers": layer_names,
    }]);
    append_bytes(
        &mut archive,
        "manifest.json",
        &serde_json::to_vec(&manifest)?,
    )?;
    archive
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(())
}

/// Writes the layout directory of `layout` (all its tags) as a tar file at `path`, the format
/// of skopeo's `oci-archive:` transport.
pub fn oci_archive(layout: &LayoutInfo, path: &Path) -> Result<()> {
    let mut archive = tar::Builder::new(BufWriter::new(File::create(path)?));
    append_file_from(&mut archive, "oci-layout", &layout.dir.join("oci-layout"))?;
    append_file_from(&mut archive, "index.json", &layout.dir.join("index.json"))?;
    append_dir(&mut archive, "blobs/")?;
    append_dir(&mut archive, "blobs/sha256/")?;
    let mut blobs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in fs::read_dir(layout.dir.join("blobs/sha256"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name.len() == 64 {
            blobs.insert(format!("blobs/sha256/{name}"), entry.path());
        }
    }
    for (name, source) in &blobs {
        append_file_from(&mut archive, name, source)?;
    }
    archive
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(())
}

fn archive_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(DEFAULT_MTIME);
    header.set_size(size);
    header
}

fn append_dir<W: Write>(archive: &mut tar::Builder<W>, name: &str) -> Result<()> {
    let mut header = archive_header(tar::EntryType::Directory, 0o755, 0);
    archive.append_data(&mut header, name, io::empty())?;
    Ok(())
}

fn append_bytes<W: Write>(archive: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut header = archive_header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
    archive.append_data(&mut header, name, bytes)?;
    Ok(())
}

fn append_file_from<W: Write>(
    archive: &mut tar::Builder<W>,
    name: &str,
    source: &Path,
) -> Result<()> {
    let file = File::open(source).with_context(|| format!("opening {}", source.display()))?;
    let mut header = archive_header(tar::EntryType::Regular, 0o644, file.metadata()?.len());
    archive.append_data(&mut header, name, BufReader::new(file))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo_random_bytes;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    fn all_kinds(long: &str) -> Vec<Entry> {
        vec![
            Entry::dir("d").mode(0o1777).owner(5, 6).mtime(1234),
            Entry::file("d/f", "content")
                .mode(0o4755)
                .mtime_ns(1_600_000_000, 987_654_321),
            Entry::file(b"d/\xff\xfename", "not utf-8"),
            Entry::file(long, "long path")
                .xattr("user.a", "1")
                .xattr("user.b", [0u8, 255]),
            Entry::symlink("d/s", long),
            Entry::hardlink("d/h", "d/f"),
            Entry::char_device("d/c", 1, 3),
            Entry::block_device("d/b", 260, 70_000),
            Entry::fifo("d/p").owner(4_000_000, 7),
            Entry::whiteout("d/gone"),
            Entry::opaque("d"),
        ]
    }

    /// One entry as the tar crate reads it back.
    struct ReadBack {
        path: Vec<u8>,
        kind: u8,
        mode: u32,
        uid: u64,
        link: Option<Vec<u8>>,
        size: u64,
        /// `key=value` of its PAX records.
        pax: Vec<String>,
    }

    fn read_back(tar_bytes: &[u8]) -> Vec<ReadBack> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let pax = entry
                .pax_extensions()
                .unwrap()
                .map(|exts| {
                    exts.map(|e| {
                        let e = e.unwrap();
                        let value = String::from_utf8_lossy(e.value_bytes());
                        format!("{}={value}", e.key().unwrap())
                    })
                    .collect()
                })
                .unwrap_or_default();
            let header = entry.header().clone();
            out.push(ReadBack {
                path: entry.path_bytes().into_owned(),
                kind: header.entry_type().as_byte(),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                link: entry.link_name_bytes().map(|l| l.into_owned()),
                size: entry.size(),
                pax,
            });
        }
        out
    }

    #[test]
    fn entries_round_trip_through_the_tar_crate_in_both_header_formats() {
        let long = format!("{}/{}/{}", "a".repeat(100), "b".repeat(100), "c".repeat(90));
        for format in [HeaderFormat::Gnu, HeaderFormat::Pax] {
            let layer = Layer::new(Compression::None)
                .format(format)
                .entries(all_kinds(&long));
            let bytes = layer.write_tar(Vec::new()).unwrap();
            let entries = read_back(&bytes);
            let paths: Vec<Vec<u8>> = entries.iter().map(|e| e.path.clone()).collect();
            let expected: Vec<Vec<u8>> = [
                &b"d/"[..],
                b"d/f",
                b"d/\xff\xfename",
                long.as_bytes(),
                b"d/s",
                b"d/h",
                b"d/c",
                b"d/b",
                b"d/p",
                b"d/.wh.gone",
                b"d/.wh..wh..opq",
            ]
            .iter()
            .map(|p| p.to_vec())
            .collect();
            assert_eq!(paths, expected, "{format:?}");
            let types: Vec<u8> = entries.iter().map(|e| e.kind).collect();
            assert_eq!(types, b"50002134600", "{format:?}");
            assert_eq!(entries[0].mode, 0o1777);
            assert_eq!(entries[0].uid, 5);
            assert_eq!(entries[1].mode, 0o4755);
            assert_eq!(entries[1].size, 7);
            assert!(entries[1]
                .pax
                .contains(&"mtime=1600000000.987654321".to_string()));
            assert!(entries[3]
                .pax
                .contains(&"SCHILY.xattr.user.a=1".to_string()));
            assert!(entries[3].pax.contains(&format!(
                "SCHILY.xattr.user.b={}",
                String::from_utf8_lossy(&[0, 255])
            )));
            assert_eq!(
                entries[4].link.as_deref(),
                Some(long.as_bytes()),
                "{format:?}"
            );
            assert_eq!(entries[5].link.as_deref(), Some(&b"d/f"[..]));
            assert_eq!(entries[8].uid, 4_000_000);
            // Device numbers.
            let mut archive = tar::Archive::new(&bytes[..]);
            let block = archive.entries().unwrap().nth(7).unwrap().unwrap();
            assert_eq!(block.header().device_major().unwrap(), Some(260));
            assert_eq!(block.header().device_minor().unwrap(), Some(70_000));
        }
    }

    #[test]
    fn gnu_tar_reads_both_header_formats() {
        let long = format!("{}/{}/{}", "a".repeat(100), "b".repeat(100), "c".repeat(90));
        for format in [HeaderFormat::Gnu, HeaderFormat::Pax] {
            let dir = tempfile::tempdir().unwrap();
            let tar_path = dir.path().join("layer.tar");
            let layer = Layer::new(Compression::None)
                .format(format)
                .entries(all_kinds(&long));
            layer.write_tar(File::create(&tar_path).unwrap()).unwrap();
            let output = Command::new("tar")
                .arg("-tvf")
                .arg(&tar_path)
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(listing.contains(&long), "{format:?}: {listing}");
            assert!(listing.contains("d/h link to d/f"), "{format:?}: {listing}");
            assert!(listing.contains("260,70000"), "{format:?}: {listing}");
            assert_eq!(listing.lines().count(), 11, "{format:?}: {listing}");
        }
    }

    #[test]
    fn gnu_sparse_entries_extract_with_gnu_tar_to_the_same_bytes_with_holes() {
        let size = (8 << 20) + 3;
        // 30 segments: the header's 4 map slots plus two extension blocks.
        let data: Vec<(u64, Vec<u8>)> = (0..30u64)
            .map(|i| (i * 250_000 + 17, pseudo_random_bytes(i, 1000 + i as usize)))
            .collect();
        let layer = Layer::new(Compression::None)
            .entry(Entry::sparse("sparse", size, data.clone()))
            .entry(Entry::sparse("empty-sparse", 1 << 20, Vec::new()))
            .entry(Entry::file("after", "the entry after the sparse ones\n"));
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("layer.tar");
        layer.write_tar(File::create(&tar_path).unwrap()).unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let status = Command::new("tar")
            .arg("-xf")
            .arg(&tar_path)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());

        let mut expected = vec![0u8; size as usize];
        for (offset, bytes) in &data {
            expected[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
        }
        assert!(
            fs::read(out.join("sparse")).unwrap() == expected,
            "sparse content differs"
        );
        let meta = fs::metadata(out.join("sparse")).unwrap();
        assert!(
            meta.blocks() * 512 < size / 2,
            "GNU tar wrote holes: {} blocks",
            meta.blocks()
        );
        assert_eq!(
            fs::metadata(out.join("empty-sparse")).unwrap().len(),
            1 << 20
        );
        assert_eq!(
            fs::read(out.join("after")).unwrap(),
            b"the entry after the sparse ones\n"
        );

        // The tar crate agrees.
        let mut archive = tar::Archive::new(File::open(&tar_path).unwrap());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        assert!(content == expected, "tar crate reads other bytes");
    }

    /// Keeps the first `keep` bytes written and counts the rest.
    struct Head {
        keep: usize,
        head: Vec<u8>,
        total: u64,
    }

    impl Write for Head {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.keep.saturating_sub(self.head.len()).min(buf.len());
            self.head.extend_from_slice(&buf[..room]);
            self.total += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sizes_past_8_gib_use_base256_in_gnu_headers_and_pax_size_records() {
        let size = (9 << 30) + 1;
        for format in [HeaderFormat::Gnu, HeaderFormat::Pax] {
            let layer = Layer::new(Compression::None)
                .format(format)
                .entry(Entry::large_file("big", size, vec![(size - 1, vec![7])]));
            let out = layer
                .write_tar(Head {
                    keep: 4096,
                    head: Vec::new(),
                    total: 0,
                })
                .unwrap();
            let (header_at, data_blocks) = match format {
                HeaderFormat::Gnu => (0, 1),
                HeaderFormat::Pax => (1024, 3), // PAX header + its data block first
            };
            let header = &out.head[header_at..header_at + 512];
            let size_field = &header[124..136];
            match format {
                HeaderFormat::Gnu => assert_eq!(size_field[0] & 0x80, 0x80, "base-256 marker"),
                HeaderFormat::Pax => {
                    let pax = String::from_utf8_lossy(&out.head[512..1024]);
                    assert!(pax.contains(&format!("size={size}\n")), "{pax}");
                    assert_eq!(
                        &size_field[..11],
                        b"00000000000",
                        "Go writes 0 beside PAX size"
                    );
                }
            }
            let padded = size.div_ceil(512) * 512;
            assert_eq!(out.total, data_blocks * 512 + padded + 1024, "{format:?}");
        }
    }

    #[test]
    fn large_file_content_is_zero_except_the_segments() {
        let segments = vec![(3, b"abc".to_vec()), (10, b"xy".to_vec())];
        let mut reader = SegmentReader::new(14, &segments).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4]; // small reads cross segment edges
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"\0\0\0abc\0\0\0\0xy\0\0");
        assert!(
            SegmentReader::new(4, &segments).is_err(),
            "segment past the end"
        );
        let overlapping = vec![(0, b"abc".to_vec()), (2, b"x".to_vec())];
        assert!(SegmentReader::new(10, &overlapping).is_err());
    }

    fn file_digest(path: &Path) -> String {
        format!("sha256:{}", crate::tree::sha256_file_hex(path).unwrap())
    }

    fn decompressed_digest(layout: &LayoutInfo, layer: &LayerInfo) -> String {
        let mut out = HashingWriter::new(io::sink());
        copy_large(&mut layout.open_layer(layer).unwrap(), &mut out).unwrap();
        out.finish().1
    }

    fn small_image(tag: &str, top: &str) -> LayoutBuilder {
        LayoutBuilder::new(tag)
            .layer(
                Layer::new(Compression::Gzip)
                    .entry(Entry::dir("etc"))
                    .entry(Entry::file("etc/base", pseudo_random_bytes(9, 100_000))),
            )
            .layer(Layer::new(Compression::Zstd).entry(Entry::file("top", top)))
            .layer(Layer::new(Compression::None).entry(Entry::whiteout("etc/base")))
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root, skopeo and umoci (scripts/setup.sh installs them)"
    )]
    fn layouts_have_tagged_manifests_valid_digests_and_shared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        small_image("one", "1").write(&layout).unwrap();
        let two = small_image("two", "2").write(&layout).unwrap();
        // Rewriting a tag replaces it rather than adding a second manifest.
        let one = small_image("one", "1").write(&layout).unwrap();

        let index = read_json(&layout.join("index.json")).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(LayoutInfo::open(&layout, "one").unwrap(), one);
        assert_eq!(LayoutInfo::open(&layout, "two").unwrap(), two);
        assert_eq!(
            one.layers[0], two.layers[0],
            "the shared base layer is one blob"
        );
        assert_ne!(one.layers[1].digest, two.layers[1].digest);
        assert!(LayoutInfo::open(&layout, "three").is_err());
        assert_eq!(
            fs::read_to_string(layout.join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );

        let media: Vec<&str> = one.layers.iter().map(|l| l.media_type.as_str()).collect();
        assert_eq!(
            media,
            [
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.v1.tar+zstd",
                "application/vnd.oci.image.layer.v1.tar",
            ]
        );
        for layer in &one.layers {
            let blob = one.blob_path(&layer.digest);
            assert_eq!(file_digest(&blob), layer.digest);
            assert_eq!(fs::metadata(&blob).unwrap().len(), layer.size);
            assert_eq!(decompressed_digest(&one, layer), layer.diff_id);
        }
        assert_eq!(
            one.layers[2].digest, one.layers[2].diff_id,
            "plain tar: digest = diff_id"
        );
        let config = read_json(&one.blob_path(&one.config_digest)).unwrap();
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        assert_eq!(
            diff_ids,
            one.layers
                .iter()
                .map(|l| l.diff_id.as_str())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            file_digest(&one.blob_path(&one.manifest_digest)),
            one.manifest_digest
        );

        // An independent reader agrees that the layout is valid.
        let output = Command::new("skopeo")
            .args(["inspect", "--raw", &one.oci_ref()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn recompress_changes_blobs_but_not_diff_ids() {
        let dir = tempfile::tempdir().unwrap();
        let source = small_image("img", "x")
            .write(&dir.path().join("a"))
            .unwrap();
        let all_zstd = recompress(&source, &dir.path().join("b"), |_| Compression::Zstd).unwrap();
        assert_eq!(
            LayoutInfo::open(&dir.path().join("b"), "img").unwrap(),
            all_zstd
        );
        assert_eq!(all_zstd.config_digest, source.config_digest);
        for (new, old) in all_zstd.layers.iter().zip(&source.layers) {
            assert_eq!(new.diff_id, old.diff_id);
            assert_eq!(new.compression().unwrap(), Compression::Zstd);
            assert_eq!(file_digest(&all_zstd.blob_path(&new.digest)), new.digest);
            assert_eq!(decompressed_digest(&all_zstd, new), new.diff_id);
        }
        assert_eq!(
            all_zstd.layers[1].digest, source.layers[1].digest,
            "already zstd: reused"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root, skopeo and umoci (scripts/setup.sh installs them)"
    )]
    fn docker_and_oci_archives_carry_the_same_image_through_skopeo() {
        crate::mount::require_root();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let source = small_image("img", "top\n")
            .write(&d.join("layout"))
            .unwrap();
        docker_archive(&source, "lazy-tests/img:v1", &d.join("docker.tar")).unwrap();
        oci_archive(&source, &d.join("oci.tar")).unwrap();

        let docker_src = format!("docker-archive:{}", d.join("docker.tar").display());
        let oci_src = format!("oci-archive:{}:img", d.join("oci.tar").display());
        crate::reference::skopeo_copy(
            &docker_src,
            &format!("oci:{}:img", d.join("from-docker").display()),
        )
        .unwrap();
        crate::reference::skopeo_copy(
            &oci_src,
            &format!("oci:{}:img", d.join("from-oci").display()),
        )
        .unwrap();

        let from_docker = LayoutInfo::open(&d.join("from-docker"), "img").unwrap();
        let from_oci = LayoutInfo::open(&d.join("from-oci"), "img").unwrap();
        let diff_ids = |l: &LayoutInfo| {
            l.layers
                .iter()
                .map(|x| x.diff_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(diff_ids(&from_docker), diff_ids(&source));
        assert_eq!(diff_ids(&from_oci), diff_ids(&source));
        // skopeo compresses the plain layer when it copies, so compare what it reads instead.
        let raw = Command::new("skopeo")
            .args(["inspect", "--raw", &oci_src])
            .output()
            .unwrap();
        assert_eq!(
            sha256_digest(&raw.stdout),
            source.manifest_digest,
            "oci-archive is byte-exact"
        );

        let unpack = |l: &LayoutInfo, name: &str| {
            crate::reference::umoci_unpack(&l.dir, "img", &d.join(name)).unwrap()
        };
        let expected = unpack(&source, "u-source");
        assert_eq!(fs::read(expected.join("top")).unwrap(), b"top\n");
        assert!(!expected.join("etc/base").exists(), "the whiteout applied");
        for (layout, name) in [(&from_docker, "u-docker"), (&from_oci, "u-oci")] {
            let report = crate::tree::compare_trees(&expected, &unpack(layout, name));
            assert!(report.is_empty(), "{name}:\n{}", report.join("\n"));
        }
    }
}
