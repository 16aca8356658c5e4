//! Mount lifecycle: open an image (from a local store, or remotely through the fetcher), mount
//! it read-only through FUSE, wait until it is unmounted (by `lazyctl umount`, `umount`, or a
//! signal handled by the caller), and unmount by path. Also the overlay of a container's root
//! filesystem: a writable upper directory over an image's read-only lazy mount.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fusefs::fuse::{Connection, MountConfig, Session};
use fusefs::{ChunkSource, ImageReader};
use thiserror::Error;
use tracing::{info, warn};

use crate::fetcher::Fetcher;
use crate::local::{LocalChunkSource, DEFAULT_MEMORY_CACHE};
use crate::profile::{Recorder, RecordingSource};
use crate::remote::{ImageLocation, OpenedImage};
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
    #[error("cannot serve the mount at {path} again over its handed-over FUSE connection")]
    Adopt {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is a dead FUSE mount (the process that served it is gone): detach it with `umount -l {0}`, or restart lazyd, which detaches its own dead mounts")]
    DeadMount(PathBuf),
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

/// How a mount reaches the kernel.
pub enum Attach<'a> {
    /// `fusefs::fuse::mount` mounts it (fusermount3 for a user); it ends with the process. The
    /// standalone `lazyctl mount`.
    Standalone,
    /// mount(2) here, keeping the connection so that a successor can serve it (lazyd).
    Kept,
    /// Serve a connection an earlier lazyd mounted and handed over.
    Adopt(&'a Connection),
}

/// A live mount of one image.
pub struct MountedImage {
    session: Session,
    /// The connection, for the fd holder (`Attach::Kept`).
    pub connection: Option<Connection>,
    /// An adopted mount whose unanswered requests the kernel was asked to resend.
    pub resent: bool,
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
        self.session.is_finished()
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

/// Mounts `image`, opened (`remote::open_image`) from the local store at `store_path` and read
/// there in place (`OpenedImage::is_local`), at `mountpoint`; with `recorder`, first accesses of
/// chunks are recorded for a profile. The standalone `lazyctl mount`, which began to open the
/// image at `started`: its `mounted in` line counts from there.
pub fn mount_local(
    store_path: &Path,
    image: &OpenedImage,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
    started: Instant,
) -> Result<MountedImage, MountError> {
    check_mountpoint(mountpoint)?;
    let how = (started, Attach::Standalone);
    local_mount(
        &LocalStore::open(store_path)?,
        &image.index,
        &image.manifest_digest,
        mountpoint,
        cfg,
        recorder,
        how,
    )
}

/// Mounts `index` of the local `store`, read in place.
fn local_mount(
    store: &LocalStore,
    index: &Arc<fusefs::Index>,
    manifest_digest: &str,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
    how: (Instant, Attach<'_>),
) -> Result<MountedImage, MountError> {
    let source = Arc::new(LocalChunkSource::new(store, index, DEFAULT_MEMORY_CACHE)?);
    mount_reader(
        ImageReader::new(index.clone(), recorded(source.clone(), recorder))?,
        MountSource::Local(source),
        manifest_digest,
        mountpoint,
        cfg,
        how,
    )
}

/// lazyd's mounts: mounts an opened image (read in place from a local store, or through the
/// fetcher of `streams`, with `speculate`) at `mountpoint`, or serves it there again over an
/// adopted connection (`attach`).
pub fn mount_opened(
    image: &OpenedImage,
    streams: &Arc<Streams>,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
    speculate: bool,
    attach: Attach<'_>,
) -> Result<MountedImage, MountError> {
    let started = Instant::now();
    if !matches!(attach, Attach::Adopt(_)) {
        check_mountpoint(mountpoint)?;
    }
    match &image.location {
        ImageLocation::Dir { path, .. } if image.is_local() => local_mount(
            &LocalStore::open(path)?,
            &image.index,
            &image.manifest_digest,
            mountpoint,
            cfg,
            recorder,
            (started, attach),
        ),
        _ => remote_mount(
            image,
            streams,
            mountpoint,
            cfg,
            recorder,
            speculate,
            (started, attach),
        ),
    }
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
    check_mountpoint(mountpoint)?;
    remote_mount(
        image,
        &streams,
        mountpoint,
        cfg,
        recorder,
        true,
        (Instant::now(), Attach::Standalone),
    )
}

/// A remote image's mount with the streams (and fetcher) of `streams`, shared with other mounts
/// so that their streams share the link fairly; `speculate` says whether the filesystem
/// guesses what its readers read next (`ImageReader::speculate_from_layout`).
fn remote_mount(
    image: &OpenedImage,
    streams: &Arc<Streams>,
    mountpoint: &Path,
    cfg: &MountConfig,
    recorder: Option<&Arc<Recorder>>,
    speculate: bool,
    how: (Instant, Attach<'_>),
) -> Result<MountedImage, MountError> {
    let fetcher = streams.fetcher();
    let backend = fetcher.backend(image.store.clone());
    let fetch = Arc::new(fetcher.source(backend.clone()));
    let fetch_guesses = fetch.fetch_guesses();
    let source = Arc::new(streams.source(fetch, backend));
    let index = image.index.clone();
    let mut reader = ImageReader::new(index, recorded(source.clone(), recorder))?;
    if let Some(observer) = source.observer() {
        reader = reader.with_observer(observer)?;
    }
    let reader = reader
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
        how,
    )?;
    mounted.fetch_guesses = Some(fetch_guesses);
    Ok(mounted)
}

fn check_mountpoint(mountpoint: &Path) -> Result<(), MountError> {
    if is_dead_fuse_mount(mountpoint) {
        return Err(MountError::DeadMount(mountpoint.to_path_buf()));
    }
    match std::fs::metadata(mountpoint) {
        Ok(md) if md.is_dir() => Ok(()),
        _ => Err(MountError::NotADirectory(mountpoint.to_path_buf())),
    }
}

/// Whether `path` is a FUSE mount whose connection is gone ("Transport endpoint is not
/// connected"). Asks with statfs, which the kernel never answers from its caches (a stat of
/// the mount's root can still succeed from cached attributes).
pub fn is_dead_fuse_mount(path: &Path) -> bool {
    let is_fuse = fs_type_at(path).is_some_and(|t| t == "fuse" || t.starts_with("fuse."));
    is_fuse
        && matches!(
            nix::sys::statfs::statfs(path),
            Err(nix::errno::Errno::ENOTCONN)
        )
}

fn mount_reader(
    reader: ImageReader,
    source: MountSource,
    manifest_digest: &str,
    mountpoint: &Path,
    cfg: &MountConfig,
    (started, attach): (Instant, Attach<'_>),
) -> Result<MountedImage, MountError> {
    let files = reader.index().inode_count();
    let reader = Arc::new(reader);
    let failed = |source| MountError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let (session, connection, resent) = match attach {
        Attach::Standalone => {
            let session = fusefs::fuse::mount(reader.clone(), mountpoint, cfg).map_err(failed)?;
            (session, None, false)
        }
        Attach::Kept => {
            let kept = fusefs::fuse::mount_kept(reader.clone(), mountpoint, cfg).map_err(failed)?;
            (kept.session, Some(kept.connection), false)
        }
        Attach::Adopt(connection) => {
            let (session, resent) = fusefs::fuse::serve_adopted(reader.clone(), connection, cfg)
                .map_err(|source| MountError::Adopt {
                    path: mountpoint.to_path_buf(),
                    source,
                })?;
            (session, None, resent)
        }
    };
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
        connection,
        resent,
        reader,
        source,
        mountpoint: mountpoint.to_path_buf(),
        files,
        fetch_guesses: None,
    })
}

/// The file system type of lazyd's FUSE mounts in /proc/self/mountinfo.
pub const FUSE_TYPE: &str = "fuse.lazyimg";

/// The file system type of the topmost mount at `path` (`/proc/self/mountinfo`), if `path` is
/// a mountpoint. Reads no file under `path`, so it answers for dead FUSE mounts too.
pub fn fs_type_at(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    text.lines().rev().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
        let mut fields = line.split(' ');
        let mountpoint = fields.nth(4)?;
        let (_, after) = line.split_once(" - ")?;
        let fs_type = after.split(' ').next()?;
        (unescape_mountinfo(mountpoint) == want).then(|| fs_type.to_string())
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
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

/// Gives `upper` the owner and mode of `lower`'s root directory. An overlay's root takes its
/// upper dir's owner and mode, and must show the image's (containerd's overlayfs snapshotter
/// does the same with the layer below).
pub fn take_owner_and_mode(upper: &Path, lower: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::fs::metadata(lower)?;
    std::os::unix::fs::chown(upper, Some(root.uid()), Some(root.gid()))?;
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(root.mode() & 0o7777))
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
    match fusefs::fuse::umount(path, lazy) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        done => return done,
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
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(r"/x\04"), b"/x\\04");
    }

    #[test]
    fn the_root_is_a_mountpoint_and_a_file_is_not() {
        assert!(fs_type_at(Path::new("/")).is_some());
        assert_eq!(fs_type_at(Path::new("/proc/self/mountinfo")), None);
    }

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
