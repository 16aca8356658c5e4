//! Reference tools the lazy mount is checked against.
//!
//! `umoci unpack` (run as root, so ownership, devices and `trusted.*`/`security.*` xattrs are
//! applied) is the reference unpack: it applies layers in order with OCI whiteout semantics,
//! and is an implementation independent of ours. `skopeo copy` moves images between the
//! transports the converter accepts (`oci:`, `oci-archive:`, `docker-archive:`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::oci::{recompress, Compression, LayoutInfo};

/// Unpacks the image tagged `tag` of the OCI layout `layout` into the new bundle directory
/// `dest` with `umoci unpack`; returns the root filesystem, `dest/rootfs`.
///
/// `dest` must not exist yet. The bundle also holds umoci's `config.json`, `umoci.json` and an
/// mtree manifest beside `rootfs`; only `rootfs` is the image's content.
///
/// umoci 0.4 (Debian 12) refuses zstd layers, so an image with any is first copied, with those
/// layers decompressed to plain tar (same tar streams, same diff_ids; plain rather than gzip
/// because gzip-compressing the synthetic image's 4 GiB of zeros takes 15 s; written sparse),
/// into a scratch layout beside `dest`, which is removed afterwards.
///
/// umoci writes every byte of a file; large files of the result then have their zero blocks
/// punched out (see [`punch_zero_blocks`]), so the synthetic image's 4 GiB file holds its disk
/// only while umoci runs.
pub fn umoci_unpack(layout: &Path, tag: &str, dest: &Path) -> Result<PathBuf> {
    ensure!(
        !dest.exists(),
        "umoci unpack target {} already exists",
        dest.display()
    );
    let info = LayoutInfo::open(layout, tag)?;
    let mut scratch = None;
    let mut source = layout.to_path_buf();
    if info
        .layers
        .iter()
        .any(|l| l.compression().ok() == Some(Compression::Zstd))
    {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = tempfile::Builder::new()
            .prefix(".umoci-gzip-")
            .tempdir_in(parent)?;
        recompress(&info, dir.path(), |c| match c {
            Compression::Zstd => Compression::None,
            other => other,
        })?;
        source = dir.path().to_path_buf();
        scratch = Some(dir);
    }
    let image = format!("{}:{tag}", source.display());
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(&image)
        .arg(dest))
    .with_context(|| format!("umoci unpack of {image}"))?;
    drop(scratch);
    let rootfs = dest.join("rootfs");
    punch_zero_blocks(&rootfs).with_context(|| format!("making {} sparse", rootfs.display()))?;
    Ok(rootfs)
}

/// Files at least this large are made sparse after an unpack.
const PUNCH_MIN_LEN: u64 = 64 << 20;

/// Turns the whole zero blocks of every regular file of at least [`PUNCH_MIN_LEN`] under
/// `root` into holes (`FALLOC_FL_PUNCH_HOLE`), keeping size, content and times: what a file
/// reads is unchanged, only the disk it takes. Symlinks are not followed.
pub fn punch_zero_blocks(root: &Path) -> Result<()> {
    const BLOCK: usize = 1 << 20;
    let meta = std::fs::symlink_metadata(root)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(root)? {
            punch_zero_blocks(&entry?.path())?;
        }
        return Ok(());
    }
    if !meta.is_file() || meta.len() < PUNCH_MIN_LEN {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root)?;
    let mut buf = vec![0u8; BLOCK];
    let mut offset = 0u64;
    loop {
        let n = crate::model::read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        if crate::oci::is_zeros(&buf[..n]) {
            // SAFETY: fallocate on a descriptor this function owns; no memory is passed.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    n as libc::off_t,
                )
            };
            ensure!(
                rc == 0,
                "punching a hole: {}",
                std::io::Error::last_os_error()
            );
        }
        offset += n as u64;
    }
    // Punching a hole stamps the file's mtime; the reference keeps the image's.
    let times = std::fs::FileTimes::new()
        .set_accessed(meta.accessed()?)
        .set_modified(meta.modified()?);
    file.set_times(times)?;
    Ok(())
}

/// [`umoci_unpack`] of `image`, done once and cached in [`crate::fixtures_dir`] under its
/// manifest digest; returns the rootfs. The tree is shared by every test that asks for it:
/// never modify it (copy it first).
pub fn umoci_unpack_cached(image: &LayoutInfo) -> Result<PathBuf> {
    let hex = image.manifest_digest.trim_start_matches("sha256:");
    let dir =
        crate::fixtures_dir()
            .join("umoci-unpack")
            .join(format!("{}-{}", image.tag, &hex[..16]));
    crate::cached_fixture(
        &dir,
        |dir| {
            umoci_unpack(&image.dir, &image.tag, &dir.join("bundle"))?;
            Ok(format!("{}\n", image.manifest_digest))
        },
        |dir| Ok(dir.join("bundle/rootfs")),
    )
}

/// Copies an image between two skopeo transports, e.g.
/// `skopeo_copy("docker-archive:/x.tar", "oci:/layout:tag")`. Registries on loopback are
/// spoken to over plain http (tests run their own, without TLS).
pub fn skopeo_copy(source: &str, destination: &str) -> Result<()> {
    let loopback = |r: &str| {
        r.strip_prefix("docker://")
            .is_some_and(|h| h.starts_with("127.") || h.starts_with("localhost"))
    };
    let mut command = Command::new("skopeo");
    command.args(["copy", "--quiet", "--insecure-policy"]);
    if loopback(source) {
        command.arg("--src-tls-verify=false");
    }
    if loopback(destination) {
        command.arg("--dest-tls-verify=false");
    }
    run(command.args([source, destination]))
        .with_context(|| format!("skopeo copy {source} {destination}"))
}

/// Runs `command`; an error carries its exit status and stderr.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
