//! Reference tools the lazy mount is checked against.
//!
//! `umoci unpack` (run as root, so ownership, devices and `trusted.*`/`security.*` xattrs are
//! applied) is the reference unpack: it applies layers in order with OCI whiteout semantics,
//! and is an implementation independent of ours. `skopeo copy` moves images between the
//! transports the converter accepts (`oci:`, `oci-archive:`, `docker-archive:`).

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
/// because gzip-compressing the synthetic image's 4 GiB of zeros takes 15 s), into a scratch
/// layout beside `dest`, which is removed afterwards.
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
    Ok(dest.join("rootfs"))
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
