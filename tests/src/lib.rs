//! Harness for the end-to-end tests of the lazy image system.
//!
//! The tests in `tests/tests/*.rs` convert real images with `lazyctl convert`, mount them with
//! `lazyctl mount` and compare what the mount shows with what a reference tool unpacks. This
//! library provides the pieces:
//!
//! - [`oci`]: OCI image layouts (and docker/oci archives) built from layers described in code;
//! - [`synthetic`]: an image holding every tar entry type and layering rule;
//! - [`debian`]: cached Debian bookworm images made with debootstrap and umoci: minbase, and
//!   minbase plus python3;
//! - [`reference`](mod@reference): the reference unpack (`umoci unpack`) and `skopeo copy`;
//! - [`tree`]: a full comparison of two directory trees (metadata, xattrs, hardlinks, content);
//! - [`agent`]: a real `lazyd` with its own socket, cache and state, driven through `lazyctl`;
//! - [`containerd`](mod@containerd): a private containerd (root, state and sockets of its own)
//!   driven with `ctr`/`ctr-remote`, and `lazy-snapshotter` as its `lazyimg` proxy plugin;
//! - [`cri`]: the CRI image service's PullImage and RemoveImage, as a kubelet calls them;
//! - [`random_files`]: directories of incompressible files from a seed, for images whose
//!   bytes a test recomputes;
//! - [`model`]: sharded safetensors model directories from a seed, and a tensor-by-tensor
//!   check of a mounted copy;
//! - [`mount`]: running `lazyctl`, a guard around a live FUSE mount, root/FUSE preconditions;
//! - [`registry`]: a real `docker-registry` on a loopback port, stoppable and restartable;
//! - [`s3`]: a real S3 API (`moto_server`) on a loopback port, stoppable for fault tests;
//! - [`proxy`]: a TCP proxy adding per-request latency and, optionally, a shared reply rate
//!   limit (a shaped link); it logs the HTTP requests it passes and counts replies per client;
//! - [`fleet`]: N hosts in network namespaces, each with its own `lazyd`, a caching tier
//!   (nginx from `packaging/tier/`) and a shaped, delayed origin (registry, S3) on one bridge;
//! - [`fault_proxy`]: an HTTP proxy that damages ranged GETs on demand (slow, cut, reset,
//!   corrupted or misranged bodies, 503 bursts, 429 with `Retry-After`).
//!
//! The harness uses `anyhow` for errors: it is test-only code whose callers `unwrap()` or `?`
//! and want the context chain in the failure message, not a typed error to match on.
//! Everything here needs root (devices, ownership, `trusted.*` xattrs) and the `umoci`,
//! `skopeo`, `debootstrap` and GNU `tar` tools; missing preconditions fail loudly.

pub mod agent;
pub mod containerd;
pub mod cri;
pub mod debian;
pub mod fault_proxy;
pub mod fleet;
pub mod model;
pub mod mount;
pub mod oci;
pub mod proxy;
pub mod random_files;
pub mod reference;
pub mod registry;
pub mod s3;
pub mod synthetic;
pub mod tree;

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where expensive fixtures are cached between test runs: `$LAZY_FIXTURES_DIR`, else
/// `$CARGO_TARGET_DIR/lazy-fixtures`, else `target/lazy-fixtures` of this workspace.
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAZY_FIXTURES_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("lazy-fixtures");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/lazy-fixtures")
}

/// Name of the file that marks a cached fixture directory as completely built.
const COMPLETE_MARKER: &str = "COMPLETE";

/// Builds a fixture once and reuses it: `build(dir)` runs only if `dir` lacks the completion
/// marker, under an exclusive `flock` on `dir.lock`, so parallel tests and concurrent test
/// processes wait for one builder instead of racing. A half-built `dir` (a crash, a failed
/// build) is removed first; the marker is written, holding the text `build` returns, only
/// after success. `open(dir)` then turns the directory into the fixture value.
pub fn cached_fixture<T>(
    dir: &Path,
    build: impl FnOnce(&Path) -> Result<String>,
    open: impl Fn(&Path) -> Result<T>,
) -> Result<T> {
    let parent = dir.parent().context("fixture directory has no parent")?;
    std::fs::create_dir_all(parent)?;
    let lock = lock_exclusive(&dir.with_extension("lock"))?;
    let marker = dir.join(COMPLETE_MARKER);
    if !marker.exists() {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing half-built fixture {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)?;
        let note = build(dir).with_context(|| format!("building fixture {}", dir.display()))?;
        std::fs::write(&marker, note)?;
    }
    let opened = open(dir);
    drop(lock);
    opened
}

/// Creates `path` if needed and takes an exclusive `flock` on it, waiting for other holders;
/// the lock is released when the returned file is dropped.
pub(crate) fn lock_exclusive(path: &Path) -> Result<File> {
    let lock =
        File::create(path).with_context(|| format!("creating lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; the lock is released when `lock` is dropped.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(lock)
}

/// Inverts one byte every `step` bytes of the file at `path`, from offset `from` on (damage
/// behind a reader's back: a cache segment, a stored blob); returns how many.
pub fn flip_bytes(path: &Path, from: u64, step: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = file.metadata().unwrap().len();
    let mut flipped = 0;
    for at in (from..len).step_by(step as usize) {
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[!b[0]], at).unwrap();
        flipped += 1;
    }
    flipped
}

/// `len` pseudo-random bytes from `seed` (splitmix64): incompressible, reproducible test data
/// without a `rand` dependency.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_bytes_are_reproducible_and_seed_dependent() {
        assert_eq!(pseudo_random_bytes(7, 1000), pseudo_random_bytes(7, 1000));
        assert_ne!(pseudo_random_bytes(7, 64), pseudo_random_bytes(8, 64));
        assert_eq!(pseudo_random_bytes(7, 13).len(), 13);
        assert_eq!(
            &pseudo_random_bytes(7, 100)[..13],
            &pseudo_random_bytes(7, 13)[..]
        );
    }
}
