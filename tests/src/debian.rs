//! A real root file system as an OCI image: Debian bookworm, `debootstrap --variant=minbase`,
//! packed into a single gzip layer with umoci.
//!
//! The image is built once and cached (see [`crate::cached_fixture`]): the first build
//! downloads about 40 MB of packages from the Debian mirror and takes a few minutes; later
//! calls return at once. Downloaded packages are kept beside the cache, so a rebuild after
//! deleting it needs no network for them:
//!
//! ```text
//! CACHE/layout/    the OCI image layout, tag TAG
//! CACHE/COMPLETE   written last: build time and package count
//! CACHE.debs/      debootstrap's package cache
//! CACHE.lock       held while building
//! ```
//!
//! umoci repack writes whole-second mtimes (it rounds the nanoseconds of the debootstrapped
//! files), keeps `security.capability` and other xattrs, devices, hard links and modes; the
//! image itself is the reference, so whatever it holds is what the mount must show.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use crate::mount::mounts_at;
use crate::oci::LayoutInfo;
use crate::reference::run;
use crate::{cached_fixture, fixtures_dir};

/// Tag of the image in its layout.
pub const TAG: &str = "bookworm-minbase";
/// The Debian release and mirror debootstrap installs from.
pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// The default cache directory, `<fixtures>/debian-minbase`.
pub fn default_cache_dir() -> PathBuf {
    fixtures_dir().join("debian-minbase")
}

/// The Debian minbase image, built into `cache_dir` unless a complete build is already there.
pub fn minbase_image(cache_dir: &Path) -> Result<LayoutInfo> {
    let cache_dir = absolute(cache_dir)?;
    // debootstrap keeps its package cache outside the fixture directory proper, so it
    // survives the removal of a half-built fixture.
    let debs = cache_dir.with_extension("debs");
    cached_fixture(
        &cache_dir,
        |dir| build(dir, &debs),
        |dir| LayoutInfo::open(&dir.join("layout"), TAG),
    )
}

fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

fn build(dir: &Path, debs: &Path) -> Result<String> {
    let start = Instant::now();
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    let image = format!("{}:{TAG}", layout.display());
    fs::create_dir_all(debs)?;

    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))?;

    let debootstrap = run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(SUITE)
        .arg(&rootfs)
        .arg(MIRROR));
    // debootstrap mounts /proc and /sys inside the target; never leave them behind, and never
    // pack them.
    unmount_below(&rootfs)?;
    debootstrap.context("debootstrap failed (is deb.debian.org reachable?)")?;
    ensure!(
        rootfs.join("usr/bin/dpkg").exists(),
        "debootstrap left no usr/bin/dpkg"
    );

    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))?;
    run(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/bash"]))?;
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let packages = fs::read_to_string(rootfs.join("var/lib/dpkg/status"))
        .map(|s| s.matches("\nPackage: ").count() + usize::from(s.starts_with("Package: ")))
        .unwrap_or(0);
    fs::remove_dir_all(&bundle)?;

    let seconds = start.elapsed().as_secs_f64();
    eprintln!("lazy-tests: built Debian {SUITE} minbase ({packages} packages) in {seconds:.0} s");
    Ok(format!(
        "built in {seconds:.1} s, {packages} packages, {SUITE} from {MIRROR}\n"
    ))
}

/// Lazily unmounts every mount at or below `root`, deepest first.
fn unmount_below(root: &Path) -> Result<()> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut below: Vec<PathBuf> = crate::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&root))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for mount_point in below {
        if !mounts_at(&mount_point)?.is_empty() {
            run(Command::new("umount").arg("-l").arg(&mount_point))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::umoci_unpack;
    use crate::tree::{compare_trees, tree_stats};

    /// Slow the first time (debootstrap downloads ~40 MB and installs); cached afterwards.
    #[test]
    fn debian_fixture_builds_and_unpacks() {
        crate::mount::require_root();
        let start = Instant::now();
        let image = minbase_image(&default_cache_dir()).unwrap();
        eprintln!("fixture ready in {:.1} s", start.elapsed().as_secs_f64());
        assert_eq!(image.tag, TAG);
        assert_eq!(
            image.layers.len(),
            1,
            "umoci repack of one rootfs is one layer"
        );
        assert!(
            image.layers[0].media_type.ends_with("tar+gzip"),
            "{:?}",
            image.layers[0]
        );

        // A second call reuses the cache and returns the same image.
        let again = minbase_image(&default_cache_dir()).unwrap();
        assert_eq!(again, image);

        let scratch = tempfile::tempdir().unwrap();
        let rootfs = umoci_unpack(&image.dir, TAG, &scratch.path().join("bundle")).unwrap();
        for path in [
            "usr/bin/dpkg",
            "bin/sh",
            "etc/debian_version",
            "usr/lib/os-release",
        ] {
            assert!(
                rootfs.join(path).symlink_metadata().is_ok(),
                "{path} missing in the rootfs"
            );
        }
        let version = fs::read_to_string(rootfs.join("etc/debian_version")).unwrap();
        assert!(version.starts_with("12."), "not bookworm: {version}");
        let stats = tree_stats(&rootfs).unwrap();
        eprintln!("Debian minbase: {stats}");
        assert!(
            stats.files > 3000,
            "a minbase rootfs has thousands of files: {stats}"
        );
        assert!(stats.symlinks > 100, "{stats}");

        // The reference unpack is reproducible, and comparing a real rootfs is quick.
        let second = umoci_unpack(&image.dir, TAG, &scratch.path().join("bundle2")).unwrap();
        let compare_start = Instant::now();
        let report = compare_trees(&rootfs, &second);
        assert!(
            report.is_empty(),
            "two unpacks differ:\n{}",
            report.join("\n")
        );
        let took = compare_start.elapsed();
        eprintln!(
            "compared two Debian rootfs trees in {:.2} s",
            took.as_secs_f64()
        );
    }
}
