//! Mount lifecycle: open an image (from a local store, or remotely through the fetcher), mount
//! it read-only through FUSE, wait until it is unmounted (by `lazyctl umount`, `umount`, or a
//! signal handled by the caller), and unmount by path. Also the overlay of a container's root
//! filesystem: a writable upper directory over an image's read-only lazy mount.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fusefs::fuse::MountConfig;
use fusefs::{ChunkSource, ImageReader, Index};
use thiserror::Error;
use tracing::{info, warn};

use crate::fetcher::Fetcher;
use crate::local::{LocalChunkSource, DEFAULT_MEMORY_CACHE};
use crate::profile::{Recorder, RecordingSource};
use crate::remote::OpenedImage;
use crate::store::{LocalStore, StoreError};
use crate::stream::{StreamConfig, Streams};

#[derive(Debug, Error)]
pub enum MountError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] fusefs::IndexError),
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot mount at {path} (is /dev/fuse available and fuse3 installed?)")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay directory {path} contains ',', ':' or '\\', which overlayfs options cannot carry; use a state dir or target without them")]
    OverlayPath { path: PathBuf },
    #[error("cannot mount the overlay at {target} ({options}); does the kernel have overlayfs (modprobe overlay) and accept a FUSE lower?")]
    Overlay {
        target: PathBuf,
        options: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a mount reads through, for its counters.
#[derive(Clone)]
pub enum MountSource {
    Local(Arc<LocalChunkSource>),
    Remote(Arc<Fetcher>),
}

impl MountSource {
    /// The counters as a few human lines, printed when a foreground mount ends.
    pub fn summary(&self) -> String {
        match self {
            MountSource::Local(s) => s.stats.summary(),
            MountSource::Remote(f) => f.snapshot().summary(),
        }
    }
}

/// A live mount of one image.
pub struct MountedImage {
    session: fuser::BackgroundSession,
    pub reader: Arc<ImageReader>,
    pub source: MountSource,
    pub mountpoint: PathBuf,
    pub files: u64,
    /// For a remote image: whether its guesses are fetched (`FetchSource::fetch_guesses`).
    pub fetch_guesses: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl MountedImage {
    /// Blocks until the filesystem is unmounted.
    pub fn join(self) -> std::io::Result<()> {
        self.session.join()
    }

    /// Whether the session has ended (the filesystem was unmounted, by anyone).
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }
}

/// The chunk source a mount reads through: `chunks`, or `chunks` seen by `recorder`.
fn recorded(
    chunks: Arc<dyn ChunkSource>,
    recorder: Option<&Arc<Recorder>>,
) -> Arc<dyn ChunkSource> {
    match recorder {
        Some(r) => Arc::new(RecordingSource::new(chunks, r.clone())),
        None => chunks,
    }
}

/// Opens image `tag` of the store at `store_path` and mounts it at `mountpoint`; with
/// `recorder`, first accesses of chunks are recorded for a profile.
pub fn mount_local(
    store_path: &Path,
    tag: &str,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
) -> Result<MountedImage, MountError> {
    let started = Instant::now();
    check_mountpoint(mountpoint)?;
    let store = LocalStore::open(store_path)?;
    let image = store.open_image(tag)?;
    let source = Arc::new(LocalChunkSource::new(
        &store,
        &image.index,
        DEFAULT_MEMORY_CACHE,
    )?);
    mount_index(
        image.index,
        recorded(source.clone(), recorder),
        MountSource::Local(source),
        &image.manifest_digest,
        mountpoint,
        cfg,
        started,
    )
}

/// Mounts an image opened with `remote::open_image`, reading its data through `fetcher`, with
/// streams of its safetensors files under the defaults for `fetcher`
/// (`StreamConfig::for_fetcher`) and speculation from the image's layout; with `recorder`,
/// first accesses of chunks are recorded for a profile.
pub fn mount_remote(
    image: &OpenedImage,
    fetcher: &Arc<Fetcher>,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
) -> Result<MountedImage, MountError> {
    let streams = Streams::new(fetcher.clone(), StreamConfig::for_fetcher(fetcher));
    mount_remote_streaming(image, &streams, mountpoint, cfg, recorder, true)
}

/// [`mount_remote`] with the streams (and fetcher) of `streams`, shared with other mounts so
/// that their streams share the link fairly; `speculate` says whether the filesystem guesses
/// what its readers read next (`ImageReader::speculate_from_layout`).
pub fn mount_remote_streaming(
    image: &OpenedImage,
    streams: &Arc<Streams>,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
    speculate: bool,
) -> Result<MountedImage, MountError> {
    let started = Instant::now();
    check_mountpoint(mountpoint)?;
    let fetcher = streams.fetcher();
    let backend = fetcher.backend(image.store.clone());
    let fetch = Arc::new(fetcher.source(backend.clone()));
    let fetch_guesses = fetch.fetch_guesses();
    let source = Arc::new(streams.source(fetch, backend));
    let index = image.index.clone();
    let reader = ImageReader::new(index, recorded(source, recorder))?
        .with_read_ahead_max(streams.config().read_ahead)
        .with_speculation(speculate)
        .map_err(|source| MountError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let mut mounted = mount_reader(
        reader,
        MountSource::Remote(fetcher.clone()),
        &image.manifest_digest,
        mountpoint,
        cfg,
        started,
    )?;
    mounted.fetch_guesses = Some(fetch_guesses);
    Ok(mounted)
}

fn check_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    if mountpoint.is_dir() {
        Ok(())
    } else {
        Err(MountError::NotADirectory(mountpoint.to_path_buf()))
    }
}

fn mount_index(
    index: Arc<Index>,
    chunks: Arc<dyn ChunkSource>,
    source: MountSource,
    manifest_digest: &str,
    mountpoint: &Path,
    cfg: &MountConfig,
    started: Instant,
) -> Result<MountedImage, MountError> {
    mount_reader(
        ImageReader::new(index, chunks)?,
        source,
        manifest_digest,
        mountpoint,
        cfg,
        started,
    )
}

fn mount_reader(
    reader: ImageReader,
    source: MountSource,
    manifest_digest: &str,
    mountpoint: &Path,
    cfg: &MountConfig,
    started: Instant,
) -> Result<MountedImage, MountError> {
    let files = reader.index().inode_count();
    let reader = Arc::new(reader);
    let session = fusefs::fuse::mount(reader.clone(), mountpoint, cfg).map_err(|source| {
        MountError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        }
    })?;
    let read_ahead_kb = match reader.watches_opens() {
        true => STREAMED_READ_AHEAD_KB,
        false => READ_AHEAD_KB,
    };
    raise_read_ahead(mountpoint, read_ahead_kb);
    info!(
        image = %manifest_digest,
        mountpoint = %mountpoint.display(),
        files,
        "mounted in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(MountedImage {
        session,
        reader,
        source,
        mountpoint: mountpoint.to_path_buf(),
        files,
        fetch_guesses: None,
    })
}

/// Kernel read-ahead for a mount, in KiB. FUSE mounts start at 128 KiB, which turns a
/// sequential reader into a stream of small requests; 4 MiB lets the kernel ask for several
/// chunks ahead. Images are immutable, so read-ahead never reads anything stale.
const READ_AHEAD_KB: u32 = 4096;

/// Kernel read-ahead for a mount whose files are streamed (model weights): one FUSE request.
/// The kernel reads a mapped file *around* a faulting page, half the read-ahead before it: with
/// 4 MiB, a loader's first fault in a tensor made lazyd fetch 2 MiB of the tensor before it at
/// demand priority, and the first of the four 1 MiB requests that window is sent as started in
/// that other tensor, hiding where the loader is. The stream fetches ahead of the loader.
const STREAMED_READ_AHEAD_KB: u32 = 1024;

/// Sets the mount's read-ahead (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`) to `kb`. Needs root;
/// best effort, a failure only costs sequential throughput.
fn raise_read_ahead(mountpoint: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = md.dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    match std::fs::write(&bdi, kb.to_string()) {
        Ok(()) => tracing::debug!("read-ahead set to {kb} KiB via {bdi}"),
        Err(e) => tracing::debug!("cannot raise read-ahead via {bdi}: {e}"),
    }
}

/// Longest container name: a hostname's label length, and well under every runtime's limit.
pub const MAX_CONTAINER_NAME: usize = 64;

/// Checks a container name: 1 to 64 of `[A-Za-z0-9_.-]`, starting with a letter or digit (so it
/// is never `.`, `..` or taken for an option by a runtime's command line). Says what is wrong.
pub fn check_container_name(name: &str) -> Result<(), String> {
    let fix = "use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit";
    if name.is_empty() || name.len() > MAX_CONTAINER_NAME {
        return Err(format!(
            "container name {name:?} is {} bytes long; {fix}",
            name.len()
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "container name {name:?} must start with a letter or digit; {fix}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("container name {name:?} contains {c:?}; {fix}"));
    }
    Ok(())
}

/// The `data` of an overlay mount(2): `lowerdir=..,upperdir=..,workdir=..`. Refuses paths that
/// the option syntax would split (`,` between options, `:` between lower layers, `\` escapes).
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String, MountError> {
    let mut parts = Vec::with_capacity(3);
    for (key, path) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let text = path.to_str().filter(|t| !t.contains([',', ':', '\\']));
        let Some(text) = text else {
            return Err(MountError::OverlayPath {
                path: path.to_path_buf(),
            });
        };
        parts.push(format!("{key}={text}"));
    }
    Ok(parts.join(","))
}

/// Mounts an overlay of `upper` (with its `work` dir) over the read-only `lower` at `target`.
pub fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), MountError> {
    let options = overlay_options(lower, upper, work)?;
    let err = |source| MountError::Overlay {
        target: target.to_path_buf(),
        options: options.clone(),
        source,
    };
    let c_target = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let c_options =
        CString::new(options.as_str()).map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            c_target.as_ptr(),
            c"overlay".as_ptr(),
            libc::MS_NODEV,
            c_options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    info!(target = %target.display(), lower = %lower.display(), "overlay mounted");
    Ok(())
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (std::fs::symlink_metadata(path), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

/// Unmounts the filesystem at `path`: `umount2(2)` as root, else `fusermount3 -u`. With
/// `lazy`, detaches it even while files are open (MNT_DETACH).
pub fn unmount(path: &Path, lazy: bool) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    warn!("umount2 not permitted, trying fusermount3");
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let status = cmd.arg(path).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "fusermount3 -u failed: {status}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names() {
        for ok in ["a", "web-1", "x_y.z", "0123456789ab", &"n".repeat(64)] {
            assert_eq!(check_container_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "-rm",
            ".hidden",
            "a b",
            "é",
            "a\0b",
            &"n".repeat(65),
        ] {
            let e = check_container_name(bad).unwrap_err();
            assert!(e.contains("letters, digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn overlay_option_string() {
        let o = overlay_options(
            Path::new("/var/lib/lazyd/lower/ab"),
            Path::new("/var/lib/lazyd/containers/c/upper"),
            Path::new("/var/lib/lazyd/containers/c/work"),
        )
        .unwrap();
        assert_eq!(
            o,
            "lowerdir=/var/lib/lazyd/lower/ab,upperdir=/var/lib/lazyd/containers/c/upper,workdir=/var/lib/lazyd/containers/c/work"
        );
        for bad in ["/a,b", "/a:b", "/a\\b"] {
            let e = overlay_options(Path::new("/l"), Path::new(bad), Path::new("/w")).unwrap_err();
            assert!(matches!(e, MountError::OverlayPath { ref path } if path == Path::new(bad)));
        }
    }
}
