//! A synthetic image that holds every tar entry type and every layering rule.
//!
//! [`every_entry_type_image`] writes four layers (gzip/GNU headers, zstd/PAX headers,
//! uncompressed/GNU headers, gzip/PAX headers) whose merged tree covers: regular files (empty,
//! hundreds of small ones that pack into shared chunks, exactly 1 MiB, multi-MiB random, a
//! mostly-zero file larger than 4 GiB with data across the 4 GiB boundary), directories, symlinks
//! (relative, absolute, dangling, to a directory, to a symlink, with a target over 100 bytes),
//! hard links (three names across directories, one later whited out, and a link in an upper
//! layer to a lower file),
//! character and block devices (including numbers that need the wide `dev_t` encoding), a fifo,
//! xattrs (`user.*` including binary values, `security.capability`, `trusted.*`), setuid /
//! setgid / sticky modes, distinct owners (including a uid that needs base-256 encoding),
//! distinct mtimes (including nanoseconds via PAX and times past 2038), whiteouts of a file and
//! of a directory, a whiteout followed by the same name in the same layer and in the next one,
//! an opaque directory, a file replaced by a directory and a directory by a file (without
//! whiteouts), a directory re-declared with new metadata, names and paths longer than the
//! header fields (GNU long names and PAX paths), and non-UTF-8 names.
//!
//! The path constants below name the entries that end-to-end tests want to poke directly.
//!
//! Not in the image because the reference unpack cannot represent them: empty xattr values
//! (a PAX record with an empty value means "unset"; umoci drops them), GNU sparse entries
//! (umoci: "unknown typeflag"; see [`gnu_sparse_image`] instead) and directories without a
//! tar entry of their own (umoci stamps them with the unpack time).

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::oci::{
    Compression, Entry, HeaderFormat, Layer, LayoutBuilder, LayoutInfo, DEFAULT_MTIME,
};
use crate::pseudo_random_bytes;

/// Tag of the image in its layout.
pub const TAG: &str = "every-entry-type";

/// Size of [`HUGE_PATH`]: past 4 GiB (so 32-bit sizes and offsets overflow), not a multiple
/// of any chunk or block size, below the 8 GiB that still fits the octal size field.
pub const HUGE_SIZE: u64 = (4 << 30) + (1 << 20) + 4097;
/// A file of [`HUGE_SIZE`] bytes, zeros except for [`huge_segments`], in the zstd layer (the
/// blob stays small). A plain regular entry: umoci cannot unpack GNU sparse entries.
pub const HUGE_PATH: &str = "huge/over-4gib";
/// A file of exactly 1 MiB of random bytes.
pub const ONE_MIB_PATH: &str = "data/one-mib";
/// A file of [`MULTI_MIB_SIZE`] random bytes.
pub const MULTI_MIB_PATH: &str = "data/multi-mib";
pub const MULTI_MIB_SIZE: usize = (5 << 20) + 12345;
/// An empty regular file.
pub const EMPTY_PATH: &str = "data/empty";
/// A directory of [`SMALL_FILE_COUNT`] small files `f000`, `f001`, ...
pub const SMALL_DIR: &str = "data/small";
pub const SMALL_FILE_COUNT: usize = 300;
/// The hard-link group after all layers: these names share one inode (`data/hl/b` was a
/// member until a whiteout in layer 2 removed it).
pub const HARDLINK_GROUP: [&str; 2] = ["data/hl/a", "other/hl-c"];
/// A hard link made in layer 1 to a file of layer 0; both names share one inode.
pub const UPPER_HARDLINK: [&str; 2] = ["data/hl/lower-target", "upper/link-to-lower"];
/// A file with `security.capability` (cap_net_bind_service, effective).
pub const CAPABILITY_PATH: &str = "xattr/cap";
/// The value of [`CAPABILITY_PATH`]'s `security.capability`: VFS_CAP_REVISION_2 with the
/// effective flag, permitted = 1 << CAP_NET_BIND_SERVICE (10).
pub const CAPABILITY_VALUE: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// A regular file with PAX nanosecond mtime [`NSEC_MTIME`].
pub const NSEC_PATH: &str = "times/nsec";
pub const NSEC_MTIME: (u64, u32) = (1_600_000_000, 123_456_789);

/// Paths that whiteouts removed: none of them may exist in the merged tree.
pub const DELETED_PATHS: &[&str] = &[
    "lower/gone-file",
    "lower/gone-dir",
    "lower/gone-dir/a",
    "opaque/old1",
    "opaque/sub",
    "data/hl/b",
    "lower/recreated-dir/old-child",
];

/// The data segments of [`HUGE_PATH`]: at the start, unaligned in the first GiB, straddling
/// the 4 GiB boundary, and the last bytes of the file.
pub fn huge_segments() -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, pseudo_random_bytes(101, 4096)),
        ((1 << 30) + 123, b"one gibibyte and a bit".to_vec()),
        ((4 << 30) - 3000, pseudo_random_bytes(102, 6000)),
        (HUGE_SIZE - 100, pseudo_random_bytes(103, 100)),
    ]
}

/// Content of [`SMALL_DIR`]`/fNNN` as written in layer 0 (`f007` is rewritten in layer 2).
pub fn small_file_content(i: usize) -> Vec<u8> {
    let len = (i * 7919) % 4001; // 0..=4000 bytes, spread over the range
    pseudo_random_bytes(1000 + i as u64, len)
}

const T: u64 = DEFAULT_MTIME;

/// [`every_entry_type_image`], built once into [`crate::fixtures_dir`] and reused. The cache
/// key is a digest of the harness sources that decide the image's bytes, so editing them
/// builds a fresh copy; treat the layout as read-only.
pub fn every_entry_type_image_cached() -> Result<LayoutInfo> {
    let sources = [
        include_str!("synthetic.rs"),
        include_str!("oci.rs"),
        include_str!("lib.rs"),
    ];
    let key = crate::oci::sha256_digest(sources.concat().as_bytes());
    let dir = crate::fixtures_dir().join(format!("{TAG}-{}", &key[7..23]));
    crate::cached_fixture(
        &dir,
        |dir| {
            let info = every_entry_type_image(&dir.join("layout"))?;
            Ok(format!("{}\n", info.manifest_digest))
        },
        |dir| LayoutInfo::open(&dir.join("layout"), TAG),
    )
}

/// Writes the every-entry-type image into the OCI layout at `dir` (tag [`TAG`]).
pub fn every_entry_type_image(dir: &Path) -> Result<LayoutInfo> {
    LayoutBuilder::new(TAG)
        .layer(base_layer())
        .layer(whiteout_layer())
        .layer(next_layer())
        .layer(top_layer())
        .write(dir)
}

/// Layer 0 (gzip, GNU headers): everything the upper layers modify, plus the entry types.
fn base_layer() -> Layer {
    let long_component = "n".repeat(150);
    let long_dir_1 = format!("long/{}", "d".repeat(100));
    let long_dir_2 = format!("{long_dir_1}/{}", "e".repeat(100));
    let long_path = format!("{long_dir_2}/{}", "f".repeat(80)); // 5 + 101 + 101 + 80 = 287 bytes
    let long_target = format!("../{long_dir_2}/{}", "f".repeat(80));

    let mut layer = Layer::new(Compression::Gzip)
        .entry(Entry::dir("./").mtime(T - 100))
        .entry(Entry::dir("etc").mtime(T - 90))
        .entry(Entry::file("etc/hostname", "synthetic\n").mtime(T - 89))
        .entry(Entry::dir("data").mtime(T - 80))
        .entry(Entry::file(EMPTY_PATH, "").mtime(T - 79))
        .entry(Entry::file(ONE_MIB_PATH, pseudo_random_bytes(1, 1 << 20)).mtime(T - 78))
        .entry(Entry::file(MULTI_MIB_PATH, pseudo_random_bytes(2, MULTI_MIB_SIZE)).mtime(T - 77))
        .entry(Entry::file(
            "data/compressible",
            "all work and no play\n".repeat(150_000),
        ))
        .entry(Entry::dir(SMALL_DIR).mtime(T - 76));
    for i in 0..SMALL_FILE_COUNT {
        let path = format!("{SMALL_DIR}/f{i:03}");
        layer = layer.entry(Entry::file(path, small_file_content(i)).mtime(T - 1000 + i as u64));
    }
    layer
        // Hard links: three names in two directories; `b` is whited out in layer 2.
        .entry(Entry::dir("data/hl").mtime(T - 75))
        .entry(
            Entry::file("data/hl/a", "hardlinked content\n")
                .mode(0o640)
                .owner(1000, 100),
        )
        .entry(Entry::hardlink("data/hl/b", "data/hl/a"))
        .entry(Entry::file("data/hl/lower-target", "linked from an upper layer\n").mtime(T - 74))
        .entry(Entry::dir("other").mtime(T - 73))
        .entry(Entry::hardlink("other/hl-c", "data/hl/a"))
        // Symlinks.
        .entry(Entry::dir("links").mtime(T - 70))
        .entry(Entry::symlink("links/relative", "../data/one-mib").mtime(T - 69))
        .entry(Entry::symlink("links/absolute", "/etc/hostname").mtime(T - 68))
        .entry(Entry::symlink("links/dangling", "no/such/file").mtime(T - 67))
        .entry(Entry::symlink("links/to-dir", "../data/small").mtime(T - 66))
        .entry(Entry::symlink("links/to-symlink", "relative").mtime(T - 65))
        .entry(Entry::symlink("links/long-target", long_target).mtime(T - 64))
        // Devices and a fifo.
        .entry(Entry::dir("dev").mtime(T - 60))
        .entry(Entry::char_device("dev/null", 1, 3).mode(0o666))
        .entry(
            Entry::block_device("dev/loop0", 7, 0)
                .mode(0o660)
                .owner(0, 6),
        )
        .entry(Entry::char_device("dev/wide", 260, 70_000).mode(0o600))
        .entry(Entry::dir("run").mtime(T - 59))
        .entry(Entry::fifo("run/fifo").mode(0o600).mtime(T - 58))
        // Extended attributes.
        .entry(
            Entry::dir("xattr")
                .mtime(T - 50)
                .xattr("user.dir-attr", "on a directory"),
        )
        .entry(
            Entry::file("xattr/user", "has user xattrs\n")
                .xattr("user.comment", "hello")
                .xattr("user.binary", [0u8, 1, 2, 0xff, b'\n', b'='])
                .xattr("user.big", pseudo_random_bytes(3, 2000)),
        )
        .entry(
            Entry::file(CAPABILITY_PATH, "#!/bin/sh\n")
                .mode(0o755)
                .xattr("security.capability", CAPABILITY_VALUE),
        )
        .entry(Entry::file("xattr/trusted", "").xattr("trusted.lazy-test", "t"))
        // Modes.
        .entry(Entry::dir("modes").mtime(T - 40))
        .entry(Entry::file("modes/setuid", "").mode(0o4755))
        .entry(Entry::file("modes/setgid", "").mode(0o2755).owner(0, 50))
        .entry(Entry::file("modes/all-bits", "").mode(0o7777))
        .entry(Entry::file("modes/none", "unreadable except for root\n").mode(0o000))
        .entry(Entry::file("modes/exec-only", "").mode(0o111))
        .entry(Entry::dir("modes/sticky-dir").mode(0o1777).mtime(T - 39))
        .entry(
            Entry::dir("modes/setgid-dir")
                .mode(0o2775)
                .owner(0, 50)
                .mtime(T - 38),
        )
        // Owners.
        .entry(Entry::dir("owners").mtime(T - 30))
        .entry(Entry::file("owners/user", "").owner(1000, 1000))
        .entry(Entry::file("owners/nobody", "").owner(65534, 65534))
        .entry(Entry::file("owners/split", "").owner(12345, 54321))
        .entry(Entry::file("owners/wide", "").owner(4_000_000, 4_000_001)) // base-256 fields
        .entry(Entry::dir("owners/dir").owner(1000, 2000).mtime(T - 29))
        // Times.
        .entry(Entry::dir("times").mtime_ns(T - 20, 5))
        .entry(Entry::file("times/epoch-plus-one", "").mtime(1))
        .entry(Entry::file("times/after-2038", "").mtime((1 << 31) + 100))
        .entry(Entry::file(NSEC_PATH, "").mtime_ns(NSEC_MTIME.0, NSEC_MTIME.1))
        .entry(Entry::symlink("times/nsec-link", "nsec").mtime_ns(T - 19, 999_999_999))
        .entry(Entry::dir("times/nsec-dir").mtime_ns(T - 18, 1))
        // What the upper layers delete, replace or link to.
        .entry(Entry::dir("lower").mtime(T - 10))
        .entry(Entry::file("lower/gone-file", "deleted by layer 1\n"))
        .entry(Entry::dir("lower/gone-dir"))
        .entry(Entry::file(
            "lower/gone-dir/a",
            "deleted with its directory\n",
        ))
        .entry(Entry::dir("lower/gone-dir/sub"))
        .entry(Entry::file("lower/gone-dir/sub/b", ""))
        .entry(Entry::file("lower/recreated", "old\n"))
        .entry(Entry::dir("lower/recreated-dir"))
        .entry(Entry::file("lower/recreated-dir/old-child", ""))
        .entry(Entry::file("lower/recreated-next", "old\n").mode(0o755))
        .entry(Entry::file("lower/file-to-dir", "becomes a directory\n"))
        .entry(Entry::dir("lower/dir-to-file"))
        .entry(Entry::file(
            "lower/dir-to-file/child",
            "goes away with its directory\n",
        ))
        .entry(Entry::file("lower/replaced", "v1\n"))
        .entry(Entry::dir("opaque").mtime(T - 9))
        .entry(Entry::file("opaque/old1", "hidden by the opaque marker\n"))
        .entry(Entry::dir("opaque/sub"))
        .entry(Entry::file("opaque/sub/old2", ""))
        // Long names: a 150-byte component and a 287-byte path (GNU long name entries).
        .entry(Entry::dir("long").mtime(T - 5))
        .entry(Entry::file(
            format!("long/{long_component}"),
            "long component\n",
        ))
        .entry(Entry::dir(&long_dir_1))
        .entry(Entry::dir(&long_dir_2))
        .entry(Entry::file(&long_path, "long path\n"))
        // Names that are not UTF-8, or not printable.
        .entry(Entry::dir("names").mtime(T - 4))
        .entry(Entry::file(b"names/caf\xe9", "latin-1 name\n"))
        .entry(Entry::file(b"names/\xff\xfe\xfd", "invalid utf-8\n"))
        .entry(Entry::file("names/with space", ""))
        .entry(Entry::file("names/new\nline", ""))
        .entry(Entry::file("names/\x01control", ""))
        .entry(Entry::file("names/utf8-\u{e9}\u{2713}", "valid utf-8\n"))
}

/// Layer 1 (zstd, PAX headers): whiteouts, opaque directory, type changes, an upper hard link,
/// PAX long paths and times.
fn whiteout_layer() -> Layer {
    let long_dir_1 = format!("long-pax/{}", "q".repeat(120));
    let long_dir_2 = format!("{long_dir_1}/{}", "r".repeat(120));
    let long_path = format!("{long_dir_2}/{}", "s".repeat(150)); // 400 bytes
    Layer::new(Compression::Zstd)
        .format(HeaderFormat::Pax)
        .entry(Entry::dir("lower").mtime(T - 10))
        .entry(Entry::whiteout("lower/gone-file"))
        .entry(Entry::whiteout("lower/gone-dir"))
        // Whiteout, then the same name again in the same layer.
        .entry(Entry::whiteout("lower/recreated"))
        .entry(Entry::file("lower/recreated", "new\n").mtime(T + 1))
        .entry(Entry::whiteout("lower/recreated-dir"))
        .entry(Entry::dir("lower/recreated-dir").mode(0o700).mtime(T + 2))
        .entry(Entry::file("lower/recreated-dir/new-child", "new child\n"))
        // Whiteout here, the same name again in layer 2.
        .entry(Entry::whiteout("lower/recreated-next"))
        // Type changes without a whiteout: the entry replaces what is there.
        .entry(Entry::dir("lower/file-to-dir").mtime(T + 3))
        .entry(Entry::file("lower/file-to-dir/child", "was a file\n"))
        .entry(Entry::file("lower/dir-to-file", "was a directory\n"))
        .entry(
            Entry::file("lower/replaced", "v2, longer than v1\n")
                .mode(0o600)
                .owner(7, 7),
        )
        // Opaque directory: only what this layer puts there survives.
        .entry(Entry::dir("opaque").mtime(T - 9))
        .entry(Entry::opaque("opaque"))
        .entry(Entry::file("opaque/new1", "above the opaque marker\n"))
        // A hard link to a file of layer 0.
        .entry(Entry::dir("upper").mtime(T + 4))
        .entry(Entry::hardlink(UPPER_HARDLINK[1], UPPER_HARDLINK[0]))
        // PAX paths: a 400-byte path, a non-ASCII name, a long symlink target, and xattrs.
        .entry(Entry::dir("long-pax").mtime(T + 5))
        .entry(Entry::dir(&long_dir_1))
        .entry(Entry::dir(&long_dir_2))
        .entry(Entry::file(&long_path, "pax path\n").xattr("user.on-long-path", "yes"))
        .entry(Entry::symlink("long-pax/link", format!("../{long_path}")))
        .entry(Entry::dir("names").mtime(T - 4))
        .entry(Entry::file(
            b"names/pax-\xe9\xff",
            "non-utf-8 name in a PAX record\n",
        ))
        .entry(Entry::dir("times").mtime_ns(T - 20, 5))
        .entry(Entry::file("times/pax-nsec", "").mtime_ns(T + 6, 500_000_000))
        // Over 4 GiB, mostly zeros: about 150 KB of zstd.
        .entry(Entry::dir("huge").mtime(T + 10))
        .entry(Entry::large_file(HUGE_PATH, HUGE_SIZE, huge_segments()).mtime(T + 11))
}

/// Layer 2 (uncompressed, GNU headers): re-creation after a whiteout, a whiteout of one
/// hard-link name, a metadata-only change of a directory, a rewritten small file.
fn next_layer() -> Layer {
    Layer::new(Compression::None)
        .entry(Entry::dir("lower").mtime(T - 10))
        .entry(Entry::file("lower/recreated-next", "recreated in the next layer\n").mode(0o600))
        .entry(Entry::dir("data/hl").mtime(T - 75))
        .entry(Entry::whiteout("data/hl/b"))
        .entry(Entry::dir("etc").mode(0o700).owner(0, 4).mtime(T + 12))
        .entry(Entry::dir(SMALL_DIR).mtime(T - 76))
        .entry(Entry::file(
            format!("{SMALL_DIR}/f007"),
            "rewritten in layer 2\n",
        ))
}

/// Layer 3 (gzip, PAX headers): a small top layer, so the image does not end on a plain tar.
fn top_layer() -> Layer {
    Layer::new(Compression::Gzip)
        .format(HeaderFormat::Pax)
        .entry(Entry::dir("etc").mode(0o700).owner(0, 4).mtime(T + 12))
        .entry(Entry::file("etc/top", "from the top layer\n").mtime_ns(T + 13, 42))
}

/// Tag of [`gnu_sparse_image`].
pub const GNU_SPARSE_TAG: &str = "gnu-sparse";
/// Size of `sparse/many-segments` in [`gnu_sparse_image`].
pub const GNU_SPARSE_SIZE: u64 = (64 << 20) + 3;

/// One sparse file of [`gnu_sparse_image`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseFile {
    pub path: &'static str,
    pub size: u64,
    /// `(offset, bytes)` segments; zeros elsewhere.
    pub data: Vec<(u64, Vec<u8>)>,
}

/// The files of [`gnu_sparse_image`].
pub fn gnu_sparse_files() -> Vec<SparseFile> {
    // 30 segments: more than the 4 map slots of the header, so two extension blocks follow.
    let many = (0..30u64)
        .map(|i| {
            (
                i * (2 << 20) + i * 4099,
                pseudo_random_bytes(200 + i, 1000 + i as usize * 37),
            )
        })
        .collect();
    vec![
        SparseFile {
            path: "sparse/many-segments",
            size: GNU_SPARSE_SIZE,
            data: many,
        },
        SparseFile {
            path: "sparse/all-hole",
            size: 10 << 20,
            data: Vec::new(),
        },
        SparseFile {
            path: "sparse/data-at-end",
            size: (3 << 20) + 5,
            data: vec![((3 << 20) - 7, b"the end\n\0\0\0\0".to_vec())],
        },
    ]
}

/// An image of one GNU-format layer holding old-GNU sparse entries (type `S`, the format of
/// `tar --sparse`): a file with 30 data segments (sparse map extension blocks), one that is all
/// hole and one with data only at its end. umoci cannot unpack it, so
/// [`write_gnu_sparse_expected`] writes the tree it stands for.
pub fn gnu_sparse_image(dir: &Path) -> Result<LayoutInfo> {
    let mut layer = Layer::new(Compression::Gzip).entry(Entry::dir("sparse").mtime(T + 20));
    for SparseFile { path, size, data } in gnu_sparse_files() {
        layer = layer.entry(
            Entry::sparse(path, size, data)
                .mode(0o640)
                .owner(3, 4)
                .mtime(T + 21),
        );
    }
    LayoutBuilder::new(GNU_SPARSE_TAG).layer(layer).write(dir)
}

/// Writes the tree [`gnu_sparse_image`] stands for under the existing directory `root`, with
/// real holes, for [`crate::tree::compare_trees`] (as root: it sets owners).
pub fn write_gnu_sparse_expected(root: &Path) -> Result<()> {
    let mtime = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let dir = root.join("sparse");
    fs::create_dir(&dir)?;
    for SparseFile { path, size, data } in gnu_sparse_files() {
        let full = root.join(path);
        let file = fs::File::create(&full).with_context(|| format!("creating {path}"))?;
        file.set_len(size)?;
        for (offset, bytes) in &data {
            file.write_all_at(bytes, *offset)?;
        }
        std::os::unix::fs::chown(&full, Some(3), Some(4))?;
        fs::set_permissions(&full, fs::Permissions::from_mode(0o640))?;
        file.set_modified(mtime(T + 21))?;
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    fs::File::open(&dir)?.set_modified(mtime(T + 20))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::umoci_unpack;
    use crate::tree::{compare_trees, sha256_file_hex, tree_stats};
    use std::ffi::OsStr;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::process::Command;

    fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut file = fs::File::open(path).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        file.read_exact(&mut buf).unwrap();
        buf
    }

    /// The big one: unpack the image with umoci, compare with a second unpack, and check the
    /// merged tree entry by entry. Slow the first time (building the image and two unpacks of
    /// 4 GiB, about 2.5 minutes in the debug profile); later runs reuse the cached image and
    /// reference unpack and take about one.
    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root, skopeo and umoci (scripts/setup.sh installs them)"
    )]
    fn every_entry_type_image_unpacks_reproducibly_and_as_described() {
        crate::mount::require_root();
        let image = every_entry_type_image_cached().unwrap();
        assert_eq!(image.layers.len(), 4);
        let compressions: Vec<Compression> = image
            .layers
            .iter()
            .map(|l| l.compression().unwrap())
            .collect();
        assert_eq!(
            compressions,
            [
                Compression::Gzip,
                Compression::Zstd,
                Compression::None,
                Compression::Gzip
            ]
        );
        assert!(
            image.layers[1].size < 1 << 20,
            "4 GiB of zeros stay small in zstd"
        );

        let root = crate::reference::umoci_unpack_cached(&image).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let second = umoci_unpack(&image.dir, TAG, &dir.path().join("fresh")).unwrap();
        let report = compare_trees(&root, &second);
        assert!(
            report.is_empty(),
            "two umoci unpacks differ:\n{}",
            report.join("\n")
        );
        eprintln!("every-entry-type image: {}", tree_stats(&root).unwrap());

        let meta = |p: &str| {
            fs::symlink_metadata(root.join(OsStr::from_bytes(p.as_bytes())))
                .unwrap_or_else(|e| panic!("{p}: {e}"))
        };
        // Regular files.
        assert_eq!(meta(EMPTY_PATH).len(), 0);
        assert_eq!(
            fs::read(root.join(ONE_MIB_PATH)).unwrap(),
            pseudo_random_bytes(1, 1 << 20)
        );
        assert_eq!(meta(MULTI_MIB_PATH).len(), MULTI_MIB_SIZE as u64);
        let small = fs::read_dir(root.join(SMALL_DIR)).unwrap().count();
        assert_eq!(small, SMALL_FILE_COUNT);
        assert_eq!(
            fs::read(root.join(SMALL_DIR).join("f042")).unwrap(),
            small_file_content(42)
        );
        assert_eq!(
            fs::read(root.join(SMALL_DIR).join("f007")).unwrap(),
            b"rewritten in layer 2\n"
        );
        // The huge file: size past 4 GiB, its segments where they belong, zeros between.
        let huge = root.join(HUGE_PATH);
        assert_eq!(meta(HUGE_PATH).len(), HUGE_SIZE);
        for (offset, bytes) in huge_segments() {
            assert_eq!(
                read_at(&huge, offset, bytes.len()),
                bytes,
                "segment at {offset}"
            );
        }
        assert_eq!(
            read_at(&huge, 1 << 32, 16)[..],
            pseudo_random_bytes(102, 6000)[3000..3016]
        );
        assert!(read_at(&huge, 3 << 30, 4096).iter().all(|&b| b == 0));
        assert!(
            meta(HUGE_PATH).blocks() * 512 < 64 << 20,
            "the reference's zeros are holes: {} blocks",
            meta(HUGE_PATH).blocks()
        );
        // Directories, modes, owners, times.
        assert_eq!(meta("modes/sticky-dir").mode() & 0o7777, 0o1777);
        assert_eq!(meta("modes/setuid").mode() & 0o7777, 0o4755);
        assert_eq!(meta("modes/setgid").mode() & 0o7777, 0o2755);
        assert_eq!(meta("modes/all-bits").mode() & 0o7777, 0o7777);
        assert_eq!(meta("modes/none").mode() & 0o7777, 0);
        assert_eq!(
            (meta("owners/wide").uid(), meta("owners/wide").gid()),
            (4_000_000, 4_000_001)
        );
        assert_eq!(
            (meta("owners/dir").uid(), meta("owners/dir").gid()),
            (1000, 2000)
        );
        assert_eq!(
            (
                meta(NSEC_PATH).mtime() as u64,
                meta(NSEC_PATH).mtime_nsec() as u32
            ),
            NSEC_MTIME
        );
        assert_eq!(
            meta("times/nsec-link").mtime_nsec(),
            999_999_999,
            "symlink mtime"
        );
        assert_eq!(meta("times/nsec-dir").mtime_nsec(), 1, "directory mtime");
        assert_eq!(meta("times/after-2038").mtime(), (1 << 31) + 100);
        assert_eq!(
            meta("etc").mode() & 0o7777,
            0o700,
            "layer 2 re-declared etc/"
        );
        assert_eq!(
            meta(".").mtime() as u64,
            T - 100,
            "the ./ entry sets the root"
        );
        // Symlinks.
        assert_eq!(
            fs::read_link(root.join("links/absolute")).unwrap(),
            Path::new("/etc/hostname")
        );
        assert_eq!(
            fs::read_link(root.join("links/dangling")).unwrap(),
            Path::new("no/such/file")
        );
        assert!(
            fs::read_link(root.join("links/long-target"))
                .unwrap()
                .as_os_str()
                .len()
                > 255
        );
        assert!(
            fs::read_link(root.join("long-pax/link"))
                .unwrap()
                .as_os_str()
                .len()
                > 255
        );
        // Hard links.
        let ino = |p: &str| meta(p).ino();
        assert_eq!(ino(HARDLINK_GROUP[0]), ino(HARDLINK_GROUP[1]));
        assert_eq!(meta(HARDLINK_GROUP[0]).nlink(), 2);
        assert_eq!(ino(UPPER_HARDLINK[0]), ino(UPPER_HARDLINK[1]));
        // Devices and fifo.
        assert!(meta("dev/null").file_type().is_char_device());
        assert_eq!(meta("dev/null").rdev(), libc::makedev(1, 3));
        assert!(meta("dev/loop0").file_type().is_block_device());
        assert_eq!(meta("dev/wide").rdev(), libc::makedev(260, 70_000));
        assert!(meta("run/fifo").file_type().is_fifo());
        // Xattrs in every namespace.
        let get = |p: &str, name: &str| xattr::get(root.join(p), name).unwrap();
        assert_eq!(
            get("xattr/user", "user.comment").as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(
            get("xattr/user", "user.binary").as_deref(),
            Some(&[0u8, 1, 2, 0xff, b'\n', b'='][..])
        );
        assert_eq!(get("xattr/user", "user.big").unwrap().len(), 2000);
        assert_eq!(
            get(CAPABILITY_PATH, "security.capability").as_deref(),
            Some(&CAPABILITY_VALUE[..])
        );
        assert_eq!(
            get("xattr/trusted", "trusted.lazy-test").as_deref(),
            Some(&b"t"[..])
        );
        assert_eq!(
            get("xattr", "user.dir-attr").as_deref(),
            Some(&b"on a directory"[..])
        );
        // Whiteouts, opaque directory, re-creation, type changes.
        for path in DELETED_PATHS {
            assert!(
                root.join(path).symlink_metadata().is_err(),
                "{path} should be deleted"
            );
        }
        let names = |p: &str| {
            let mut names: Vec<String> = fs::read_dir(root.join(p))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names("opaque"), ["new1"]);
        assert_eq!(names("lower/recreated-dir"), ["new-child"]);
        assert_eq!(fs::read(root.join("lower/recreated")).unwrap(), b"new\n");
        assert_eq!(
            fs::read(root.join("lower/recreated-next")).unwrap(),
            b"recreated in the next layer\n"
        );
        assert!(meta("lower/file-to-dir").is_dir());
        assert!(meta("lower/dir-to-file").is_file());
        assert!(
            !names("lower").iter().any(|n| n.starts_with(".wh.")),
            "no whiteout files remain"
        );
        // Long and non-UTF-8 names.
        assert!(meta(&format!("long/{}", "n".repeat(150))).is_file());
        let non_utf8: &[&[u8]] = &[
            b"names/caf\xe9",
            b"names/\xff\xfe\xfd",
            b"names/pax-\xe9\xff",
            b"names/new\nline",
        ];
        for name in non_utf8 {
            assert!(
                root.join(OsStr::from_bytes(name)).is_file(),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        // Content hashing sees the same bytes as a direct read.
        assert_eq!(
            sha256_file_hex(&root.join(ONE_MIB_PATH)).unwrap(),
            hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                &pseudo_random_bytes(1, 1 << 20)
            ))
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root, skopeo and umoci (scripts/setup.sh installs them)"
    )]
    fn gnu_sparse_image_extracts_with_gnu_tar_to_its_expected_tree() {
        crate::mount::require_root();
        let dir = tempfile::tempdir().unwrap();
        let image = gnu_sparse_image(&dir.path().join("layout")).unwrap();
        assert_eq!(image.layers.len(), 1);
        assert!(image.layers[0].size < 1 << 20);
        let extracted = dir.path().join("extracted");
        fs::create_dir(&extracted).unwrap();
        let tar = dir.path().join("layer.tar");
        crate::oci::copy_large(
            &mut image.open_layer(&image.layers[0]).unwrap(),
            &mut fs::File::create(&tar).unwrap(),
        )
        .unwrap();
        let status = Command::new("tar")
            .args(["--numeric-owner", "--same-owner", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&extracted)
            .status()
            .unwrap();
        assert!(status.success());
        let expected = dir.path().join("expected");
        fs::create_dir(&expected).unwrap();
        write_gnu_sparse_expected(&expected).unwrap();
        let report = compare_trees(&expected, &extracted);
        assert!(report.is_empty(), "{}", report.join("\n"));
        let holes = fs::metadata(expected.join("sparse/many-segments")).unwrap();
        assert!(
            holes.blocks() * 512 < GNU_SPARSE_SIZE / 4,
            "expected tree has real holes"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root, skopeo and umoci (scripts/setup.sh installs them)"
    )]
    fn cached_image_is_built_once_and_reopened() {
        let first = every_entry_type_image_cached().unwrap();
        let second = every_entry_type_image_cached().unwrap();
        assert_eq!(first, second);
        assert!(first.dir.starts_with(crate::fixtures_dir()));
        let marker = fs::read_to_string(first.dir.parent().unwrap().join("COMPLETE")).unwrap();
        assert_eq!(marker.trim(), first.manifest_digest);
    }
}
