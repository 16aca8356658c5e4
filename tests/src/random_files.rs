//! Directories of incompressible files made from a seed: images whose every chunk is distinct
//! and whose bytes a test recomputes instead of keeping a copy. File `blobI` of a set of files of
//! `size` bytes holds [`file_bytes`]`(I, size)`; sets of different sizes share no chunk.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::mount::lazyctl_path;

/// The bytes of file `i` of a set of files of `size` bytes.
pub fn file_bytes(i: usize, size: usize) -> Vec<u8> {
    crate::pseudo_random_bytes((size as u64) << 16 | i as u64, size)
}

/// A directory of `count` files of `size` bytes: `blob0`, `blob1`, ...
pub struct RandomFiles {
    dir: PathBuf,
    count: usize,
    size: usize,
}

impl RandomFiles {
    /// Writes the files into `parent/name` (created).
    pub fn write(parent: &Path, name: &str, count: usize, size: usize) -> RandomFiles {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..count {
            std::fs::write(dir.join(Self::name(i)), file_bytes(i, size)).unwrap();
        }
        RandomFiles { dir, count, size }
    }

    /// The name of file `i`.
    pub fn name(i: usize) -> String {
        format!("blob{i}")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The bytes of file `i`.
    pub fn bytes(&self, i: usize) -> Vec<u8> {
        file_bytes(i, self.size)
    }

    /// `lazyctl convert path:DIR DEST` with `env` (an S3 endpoint, say); panics with its
    /// output unless it succeeds.
    pub fn convert(&self, dest: &str, env: &[(String, String)]) {
        let out = Command::new(lazyctl_path())
            .args(["convert", "--no-progress"])
            .arg(format!("path:{}", self.dir.display()))
            .arg(dest)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lazyctl convert path:{} {dest}: {out:?}",
            self.dir.display()
        );
    }

    /// Reads every file under `root` (a mount of the image) and panics unless each equals its
    /// source; returns the bytes compared.
    pub fn assert_equal(&self, root: &Path) -> u64 {
        for i in 0..self.count {
            let path = root.join(Self::name(i));
            let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(got == self.bytes(i), "{} read wrong bytes", path.display());
        }
        (self.count * self.size) as u64
    }
}
