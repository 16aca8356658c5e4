//! Real root file systems as OCI images: Debian bookworm, `debootstrap --variant=minbase`,
//! packed into a single gzip layer with umoci, in two variants:
//!
//! - [`minbase_image`] (tag [`TAG`]): minbase as debootstrap leaves it, apt's package lists and
//!   downloaded packages included (about 90 MB of gzip layer);
//! - [`python_image`] (tag [`TAG_PYTHON`]): minbase plus `python3` (the interpreter and its
//!   standard library), with apt's lists and package files removed as Debian's own container
//!   images do, so its size and its start-up reads are those of a real Python base image
//!   (about 68 MB of gzip layer, 150 MiB in 6600 files).
//!
//! Each image is built once and cached (see [`crate::cached_fixture`]): the first build
//! downloads the packages from the Debian mirror (about 30 MB for minbase, 10 MB more for
//! python3) and takes a minute or so; later calls return at once. Downloaded packages are
//! kept beside the caches, in one directory shared by the variants, so a rebuild after deleting
//! a cache needs no network for them:
//!
//! ```text
//! CACHE/layout/           the OCI image layout, tag TAG (or TAG_PYTHON)
//! CACHE/COMPLETE          written last: build time and package count
//! CACHE.lock              held while building
//! PARENT/debian.debs/     debootstrap's package cache, shared by the variants in PARENT
//! PARENT/debian.debs.lock held while debootstrap uses it
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
use crate::{cached_fixture, fixtures_dir, lock_exclusive};

/// Tag of the minbase image in its layout.
pub const TAG: &str = "bookworm-minbase";
/// Tag of the minbase + python3 image in its layout.
pub const TAG_PYTHON: &str = "bookworm-python";
/// The Debian release and mirror debootstrap installs from.
pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// One flavour of the Debian image.
struct Variant {
    tag: &'static str,
    /// Packages added to minbase (`debootstrap --include`).
    include: &'static [&'static str],
    /// A file the build must have produced, checked before packing.
    expect: &'static str,
    /// Whether to delete apt's package lists and downloaded `.deb` files before packing, like
    /// Debian's container images. Minbase keeps them: it was first built with them, and caches
    /// already built elsewhere must keep meaning the same image.
    remove_apt_caches: bool,
}

const MINBASE: Variant = Variant {
    tag: TAG,
    include: &[],
    expect: "usr/bin/dpkg",
    remove_apt_caches: false,
};

const PYTHON: Variant = Variant {
    tag: TAG_PYTHON,
    // `python3`, not `python3-minimal`: the minimal package lacks most of the standard library
    // (`email`, `http.client`, ...), which real programs import at start-up.
    include: &["python3"],
    expect: "usr/bin/python3",
    remove_apt_caches: true,
};

/// The default cache directory of the minbase image, `<fixtures>/debian-minbase`.
pub fn default_cache_dir() -> PathBuf {
    fixtures_dir().join("debian-minbase")
}

/// The default cache directory of the python3 image, `<fixtures>/debian-python`.
pub fn default_python_cache_dir() -> PathBuf {
    fixtures_dir().join("debian-python")
}

/// The Debian minbase image, built into `cache_dir` unless a complete build is already there.
pub fn minbase_image(cache_dir: &Path) -> Result<LayoutInfo> {
    cached_image(cache_dir, &MINBASE)
}

/// Debian minbase plus `python3`, built into `cache_dir` unless a complete build is already
/// there. `chroot ROOTFS python3 -c 'import json, email, http.client'` works in its unpack.
pub fn python_image(cache_dir: &Path) -> Result<LayoutInfo> {
    cached_image(cache_dir, &PYTHON)
}

fn cached_image(cache_dir: &Path, variant: &Variant) -> Result<LayoutInfo> {
    let cache_dir = absolute(cache_dir)?;
    // debootstrap keeps its package cache outside the fixture directory proper, so it
    // survives the removal of a half-built fixture, and the variants share it.
    let debs = cache_dir
        .parent()
        .context("fixture directory has no parent")?
        .join("debian.debs");
    cached_fixture(
        &cache_dir,
        |dir| build(dir, &debs, variant),
        |dir| LayoutInfo::open(&dir.join("layout"), variant.tag),
    )
}

fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

fn build(dir: &Path, debs: &Path, variant: &Variant) -> Result<String> {
    let start = Instant::now();
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    let tag = variant.tag;
    let image = format!("{}:{tag}", layout.display());
    fs::create_dir_all(debs)?;

    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))?;

    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .arg("--variant=minbase")
        .arg(format!("--cache-dir={}", debs.display()));
    if !variant.include.is_empty() {
        debootstrap.arg(format!("--include={}", variant.include.join(",")));
    }
    debootstrap.arg(SUITE).arg(&rootfs).arg(MIRROR);
    // Two debootstraps writing one package cache could each see the other's half-downloaded
    // files.
    let debs_lock = lock_exclusive(&debs.with_extension("debs.lock"))?;
    let debootstrapped = run(&mut debootstrap);
    drop(debs_lock);
    // debootstrap mounts /proc and /sys inside the target; never leave them behind, and never
    // pack them.
    unmount_below(&rootfs)?;
    debootstrapped.context("debootstrap failed (is deb.debian.org reachable?)")?;
    ensure!(
        rootfs.join(variant.expect).exists(),
        "debootstrap left no {}",
        variant.expect
    );
    if variant.remove_apt_caches {
        remove_apt_caches(&rootfs)?;
    }

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
    eprintln!("lazy-tests: built Debian {tag} ({packages} packages) in {seconds:.0} s");
    Ok(format!(
        "built in {seconds:.1} s, {packages} packages, {SUITE} from {MIRROR}\n"
    ))
}

/// Deletes apt's package lists and downloaded packages (the files directly in
/// `var/lib/apt/lists` and `var/cache/apt/archives`; the `partial` directories stay), as
/// `rm -rf /var/lib/apt/lists/*` and `apt-get clean` do in Debian's container images: about
/// 80 MB that no program reads.
fn remove_apt_caches(rootfs: &Path) -> Result<()> {
    for dir in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        let dir = rootfs.join(dir);
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
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

    /// Slow the first time (debootstrap downloads and installs python3); cached afterwards.
    #[test]
    fn python_fixture_builds_and_runs_python3_in_a_chroot() {
        crate::mount::require_root();
        let start = Instant::now();
        let image = python_image(&default_python_cache_dir()).unwrap();
        eprintln!("fixture ready in {:.1} s", start.elapsed().as_secs_f64());
        assert_eq!(image.tag, TAG_PYTHON);
        assert_eq!(
            image.layers.len(),
            1,
            "umoci repack of one rootfs is one layer"
        );
        assert_eq!(python_image(&default_python_cache_dir()).unwrap(), image);

        let scratch = tempfile::tempdir().unwrap();
        let rootfs = umoci_unpack(&image.dir, TAG_PYTHON, &scratch.path().join("bundle")).unwrap();
        let stats = tree_stats(&rootfs).unwrap();
        eprintln!(
            "Debian minbase + python3: layer {} bytes, {stats}",
            image.layers[0].size
        );
        let version = fs::read_to_string(rootfs.join("etc/debian_version")).unwrap();
        assert!(version.starts_with("12."), "not bookworm: {version}");
        // apt's package lists and downloaded packages are gone; the directories stay.
        for dir in ["var/lib/apt/lists", "var/cache/apt/archives"] {
            let left: Vec<_> = fs::read_dir(rootfs.join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|name| name != "partial")
                .collect();
            assert!(left.is_empty(), "left in {dir}: {left:?}");
        }

        // The interpreter and the standard library modules a real program loads at start-up.
        let output = Command::new("chroot")
            .arg(&rootfs)
            .args([
                "python3",
                "-c",
                "import json, email, http.client; print(json.dumps([42]))",
            ])
            // The host's environment means nothing inside; root's PATH finds chroot and python3.
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "python3 in the chroot failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), "[42]\n");
    }
}
