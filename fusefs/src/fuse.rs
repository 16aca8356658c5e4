//! The thin `fuser` adapter: translates kernel requests into `ImageReader` calls and plain
//! results back into replies. Metadata comes from the mapped index and is answered inline;
//! `read` may block on a fetch, so it is handed with its `Reply` to a pool of read workers and
//! the session loop moves on at once.
//!
//! Every request that reaches the daemon is a round trip (two context switches and a queue),
//! so the adapter lets the kernel answer whatever it can on its own (the kernel of this
//! project's hosts, 6.x, offers each of these):
//!
//! - entries, attributes and pages are cached for a day (images are immutable), and so are
//!   *missing* names: a lookup that finds nothing is answered with a negative entry (node id 0
//!   with a TTL), so the next stat of that name never leaves the kernel;
//! - `open` and `opendir` answer `ENOSYS` unless an observer watches some file's opens
//!   (`ImageReader::watches_opens`: a model image's safetensors files are streamed when
//!   opened). The kernel then takes every later open as succeeding with `FOPEN_KEEP_CACHE`
//!   (and `FOPEN_CACHE_DIR` for directories) without asking, and sends no release for them
//!   (`FUSE_NO_OPEN_SUPPORT`, `FUSE_NO_OPENDIR_SUPPORT`);
//! - `flush` answers `ENOSYS`: nothing is ever written, and the kernel stops sending flushes
//!   on close for the whole mount;
//! - `getxattr` and `listxattr` answer `ENOSYS` when the image has no extended attributes at
//!   all, and the kernel stops asking (overlayfs asks a container's lower for
//!   `trusted.overlay.*` on nearly every lookup);
//! - `ioctl` cannot be switched off (the kernel sends every one, such as the `TCGETS` that
//!   Python's `open` makes to ask whether a file is a terminal), so it is answered `ENOTTY`
//!   inline, as cheaply as a request can be.
//!
//! [`OpStats`] counts what does reach the daemon, by kind, with the time spent on it.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Sender};
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};
use tracing::{debug, error, warn};

use crate::error::FsError;
use crate::ops::{Op, OpStats};
use crate::reader::{Attr, FileKind, ImageReader};

/// Images never change, so the kernel may cache entries and attributes for a long time.
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Requests the kernel may keep in flight; the default (12) starves parallel readers.
const MAX_BACKGROUND: u16 = 128;
/// Kernel read-ahead a connection starts with: one default chunk, so sequential readers ask for
/// whole chunks. lazyd then sets each mount's own through its bdi (`agent::mount`: 4 MiB, 1 MiB
/// for streamed model files), which overrides this.
const MAX_READAHEAD: u32 = 1 << 20;

/// How to mount an image.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Shown as the mount source in /proc/mounts.
    pub fs_name: String,
    /// Let users other than the mounter in (`allow_other`); needed for containers.
    pub allow_other: bool,
    /// Honour the image's setuid and setgid bits (and file capabilities) when its files are
    /// executed from the mount. Off by default (`nosuid`): with `allow_other`, any local user
    /// could otherwise run an image's setuid-root binary as root. Containers do not need it
    /// (their overlay, not its lower, decides), only a runtime handed this mount as its root.
    pub suid: bool,
    /// Threads that block on chunk fetches for `read` requests.
    pub read_workers: usize,
    /// Threads reading /dev/fuse.
    pub session_threads: usize,
    /// Where the mount counts the requests it answers; several mounts may share one.
    pub stats: Arc<OpStats>,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            fs_name: "lazyimg".to_string(),
            allow_other: true,
            suid: false,
            read_workers: 16,
            session_threads: 2,
            stats: Arc::new(OpStats::default()),
        }
    }
}

type ReadJob = Box<dyn FnOnce() + Send>;

/// The `fuser::Filesystem` over an `ImageReader`.
pub struct LazyFs {
    reader: Arc<ImageReader>,
    reads: Sender<ReadJob>,
    stats: Arc<OpStats>,
    /// Whether opens are answered (some file's opens are watched) or refused with `ENOSYS`.
    watch_opens: bool,
    /// Whether the image has extended attributes at all; if not, xattr requests are refused
    /// with `ENOSYS`.
    has_xattrs: bool,
}

impl LazyFs {
    /// Starts `read_workers` threads that serve reads; fails if none can be started.
    pub fn new(
        reader: Arc<ImageReader>,
        read_workers: usize,
        stats: Arc<OpStats>,
    ) -> std::io::Result<LazyFs> {
        let (tx, rx) = bounded::<ReadJob>(MAX_BACKGROUND as usize * 2);
        for i in 0..read_workers.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("lazy-read-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(LazyFs {
            watch_opens: reader.watches_opens(),
            has_xattrs: reader.has_xattrs(),
            reader,
            reads: tx,
            stats,
        })
    }
}

impl Drop for LazyFs {
    /// A session that ends without `destroy` (the connection was aborted) still tells the
    /// source that every file is closed.
    fn drop(&mut self) {
        self.reader.release_all();
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Logs errors that mean data could not be served (the user sees EIO); lookups of missing
/// names are normal and stay quiet.
fn report(op: &str, ino: u64, e: &FsError) -> Errno {
    match e {
        FsError::Index(_) | FsError::Source(_) => error!(op, ino, "returning EIO: {e}"),
        _ => debug!(op, ino, "{e}"),
    }
    errno(e)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn time(sec: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(nsec.min(999_999_999) as u64);
    if sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(sec as u64) + nsec
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nsec
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let t = time(a.mtime_sec, a.mtime_nsec);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_READ,
        ] {
            if config.add_capabilities(cap).is_err() {
                debug!("kernel lacks capability {cap:?}");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let started = Instant::now();
        match self.reader.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(FsError::NotFound) => {
                // A negative entry: node id 0 with a TTL. The kernel remembers that the name is
                // missing and answers the next lookup of it itself.
                reply.entry(&TTL, &missing_attr(), Generation(0));
                self.stats.record(Op::LookupMissing, started);
            }
            Err(e) => reply.error(report("lookup", parent.0, &e)),
        }
        self.stats.record(Op::Lookup, started);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let started = Instant::now();
        match self.reader.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(report("getattr", ino.0, &e)),
        }
        self.stats.record(Op::Getattr, started);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let started = Instant::now();
        match self.reader.readlink(ino.0) {
            Ok(t) => reply.data(t),
            Err(e) => reply.error(report("readlink", ino.0, &e)),
        }
        self.stats.record(Op::Readlink, started);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        if !self.watch_opens {
            // The kernel takes this as success, with FOPEN_KEEP_CACHE, and opens every file
            // of this mount without asking from now on (FUSE_NO_OPEN_SUPPORT). The mount is
            // read-only, so the VFS refuses writable opens before they get here.
            reply.error(Errno::from_i32(libc::ENOSYS));
            self.stats.record(Op::Open, started);
            return;
        }
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.reader.open(ino.0, write) {
            Ok(()) => {
                // Tells the observer of a watched file's first open (it must not block).
                self.reader.opened(ino.0);
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(report("open", ino.0, &e)),
        }
        self.stats.record(Op::Open, started);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let started = Instant::now();
        self.reader.released(ino.0);
        reply.ok();
        self.stats.record(Op::Release, started);
    }

    fn destroy(&mut self) {
        self.reader.release_all();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        // A read whose chunk is in memory is answered here: handing it to a worker would cost
        // two more context switches than the copy itself.
        if let Some(result) = self.reader.read_from_memory(ino.0, offset, size) {
            match result {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(report("read", ino.0, &e)),
            }
            self.stats.record(Op::Read, started);
            return;
        }
        let reader = self.reader.clone();
        let stats = self.stats.clone();
        let job: ReadJob = Box::new(move || {
            match reader.read(ino.0, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(report("read", ino.0, &e)),
            }
            stats.record(Op::Read, started);
        });
        if let Err(e) = self.reads.send(job) {
            warn!("read workers are gone; failing read of inode {}", ino.0);
            (e.into_inner())();
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written, so there is nothing to flush: ENOSYS tells the kernel to
        // stop sending flushes on close for this mount.
        let started = Instant::now();
        reply.error(Errno::from_i32(libc::ENOSYS));
        self.stats.record(Op::Flush, started);
    }

    /// Directories need no open state: ENOSYS makes the kernel open every directory of this
    /// mount itself from now on, with `FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR`, and skip
    /// `releasedir` (FUSE_NO_OPENDIR_SUPPORT). Only directories reach `opendir`.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        reply.error(Errno::from_i32(libc::ENOSYS));
        self.stats.record(Op::Opendir, started);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let started = Instant::now();
        let result = self.reader.readdir(ino.0, offset, |e| {
            !reply.add(
                INodeNo(e.ino),
                e.next_offset,
                file_type(e.kind),
                OsStr::from_bytes(e.name),
            )
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(report("readdir", ino.0, &e)),
        }
        self.stats.record(Op::Readdir, started);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let started = Instant::now();
        let mut failure = None;
        let result = self
            .reader
            .readdir(ino.0, offset, |e| match self.reader.getattr(e.ino) {
                Ok(a) => !reply.add(
                    INodeNo(e.ino),
                    e.next_offset,
                    OsStr::from_bytes(e.name),
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                ),
                Err(err) => {
                    failure = Some(err);
                    false
                }
            });
        match result.and_then(|()| failure.map_or(Ok(()), Err)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(report("readdirplus", ino.0, &e)),
        }
        self.stats.record(Op::Readdirplus, started);
    }

    /// No ioctls: ENOTTY, what a file system without them answers. overlayfs asks for the
    /// inode flags (FS_IOC_GETFLAGS) of every file it copies up from this lower layer, and
    /// Python's `open` asks every file whether it is a terminal (TCGETS). The kernel has no way
    /// to be told that a file system has no ioctls (it turns ENOSYS into ENOTTY and asks again
    /// next time), so each one is a round trip, answered here without a lookup.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let started = Instant::now();
        reply.error(Errno::from_i32(libc::ENOTTY));
        self.stats.record(Op::Ioctl, started);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let started = Instant::now();
        let s = self.reader.statfs();
        reply.statfs(
            s.blocks,
            0,
            0,
            s.files,
            0,
            s.block_size,
            s.name_max,
            s.block_size,
        );
        self.stats.record(Op::Statfs, started);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let started = Instant::now();
        if !self.has_xattrs {
            no_xattrs(reply);
            self.stats.record(Op::Getxattr, started);
            return;
        }
        match self.reader.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => xattr_reply(reply, size, v),
            Err(e) => reply.error(report("getxattr", ino.0, &e)),
        }
        self.stats.record(Op::Getxattr, started);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let started = Instant::now();
        if !self.has_xattrs {
            no_xattrs(reply);
            self.stats.record(Op::Listxattr, started);
            return;
        }
        match self.reader.listxattr(ino.0) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(report("listxattr", ino.0, &e)),
        }
        self.stats.record(Op::Listxattr, started);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let started = Instant::now();
        match self.reader.getattr(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::from_i32(libc::EROFS)),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(report("access", ino.0, &e)),
        }
        self.stats.record(Op::Access, started);
    }
}

/// The answer to an xattr request on an image without extended attributes: `ENOSYS`, after
/// which the kernel answers every getxattr and listxattr of the mount itself (`EOPNOTSUPP`:
/// "no attributes here", what overlayfs, `cp -a` and the capability check on exec take it
/// as). overlayfs asks a lower layer for `trusted.overlay.*` attributes on nearly every lookup
/// (thousands per Python start), so this saves as many round trips per container start; an
/// image that has attributes answers each of them.
fn no_xattrs(reply: ReplyXattr) {
    reply.error(Errno::from_i32(libc::ENOSYS));
}

/// The attributes of a negative entry: node id 0 tells the kernel the name does not exist.
fn missing_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The mount options of an image, for `fuser`'s mount (the standalone `lazyctl mount`).
fn mount_options(cfg: &MountConfig) -> Vec<MountOption> {
    vec![
        MountOption::RO,
        MountOption::FSName(cfg.fs_name.clone()),
        MountOption::Subtype("lazyimg".to_string()),
        MountOption::DefaultPermissions,
        // Device nodes of an image never open from the mount: a container gets its devices
        // from its runtime.
        MountOption::NoDev,
        if cfg.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
        MountOption::Exec,
    ]
}

fn session_config(cfg: &MountConfig, clone_fd: bool) -> Config {
    let mut config = Config::default();
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.session_threads.max(1));
    config.clone_fd = clone_fd;
    config
}

/// A running FUSE session: the background threads serving one mount. It ends when the file
/// system is unmounted, by anyone; dropping it first unmounts a file system [`mount`] made.
pub struct Session(fuser::BackgroundSession);

impl Session {
    /// Blocks until the session ends (the file system was unmounted).
    pub fn join(self) -> std::io::Result<()> {
        self.0.join()
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.0.guard.is_finished()
    }
}

/// Mounts `reader` at `mountpoint` read-only and serves it from background threads until the
/// returned session is dropped or unmounted. The mount ends with the process: lazyd mounts
/// with [`mount_kept`] instead.
pub fn mount(
    reader: Arc<ImageReader>,
    mountpoint: &Path,
    cfg: &MountConfig,
) -> std::io::Result<Session> {
    let mut config = session_config(cfg, true);
    config.mount_options = mount_options(cfg);
    let fs = LazyFs::new(reader, cfg.read_workers, cfg.stats.clone())?;
    fuser::spawn_mount(fs, mountpoint, &config).map(Session)
}

/// `FUSE_NOTIFY_RESEND` (Linux 6.9): the kernel queues again every request that was read
/// from the connection and not answered.
const FUSE_NOTIFY_RESEND: i32 = 7;

/// A FUSE connection that can outlive the process serving it: its /dev/fuse descriptor, and
/// what a successor needs to serve it again.
#[derive(Debug)]
pub struct Connection {
    /// A descriptor of the connection's /dev/fuse file (shared with the session's threads).
    pub fd: OwnedFd,
    /// The FUSE ABI version agreed on in `FUSE_INIT`.
    pub proto: (u32, u32),
}

/// A mount served by this process whose connection can be handed to a successor.
pub struct KeptSession {
    pub session: Session,
    pub connection: Connection,
}

/// Whether the running kernel has `FUSE_NOTIFY_RESEND` (Linux 6.9 and later).
///
/// It decides how a mount is read. With it, every session thread reads the connection's one
/// descriptor, which the fd holder keeps: requests a dying lazyd had read stay in the kernel
/// and the successor has them resent, so no reader sees an error. Without it, each thread reads
/// a clone of the descriptor (`FUSE_DEV_IOC_CLONE`), which dies with the process: the kernel
/// then fails the requests that process had read (`ECONNABORTED`) instead of leaving their
/// readers waiting for an answer nobody can give; requests not yet read wait for the successor.
pub fn kernel_resends() -> bool {
    kernel_at_least(6, 9)
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// Mounts `reader` at `mountpoint` read-only with mount(2) (root only), answers the kernel's
/// `FUSE_INIT`, and serves it from background threads. The returned [`Connection`] lets a
/// successor serve the mount after this process ends ([`serve_adopted`]); nothing here
/// unmounts it: [`crate`]'s callers unmount by path.
pub fn mount_kept(
    reader: Arc<ImageReader>,
    mountpoint: &Path,
    cfg: &MountConfig,
) -> std::io::Result<KeptSession> {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(device);
    let kept = fd.try_clone()?;
    let fs = LazyFs::new(reader, cfg.read_workers, cfg.stats.clone())?;
    mount_fuse(&fd, mountpoint, cfg)?;
    let config = session_config(cfg, !kernel_resends());
    let session = match fuser::Session::from_fd(fs, fd, config.acl, config) {
        Ok(s) => s,
        Err(e) => {
            // The connection is dead without its INIT answered; take the mount down.
            let _ = umount(mountpoint, true);
            return Err(e);
        }
    };
    let proto = session.proto_version().map_or((0, 0), |v| (v.0, v.1));
    Ok(KeptSession {
        session: Session(session.spawn()?),
        connection: Connection { fd: kept, proto },
    })
}

/// Serves a mount whose connection an earlier process initialised and handed over (`fd`, with
/// the ABI version it agreed on), and has the kernel resend what that process read but did
/// not answer. Returns the session and whether the requests were resent (false on kernels
/// before 6.9; see [`kernel_resends`]).
pub fn serve_adopted(
    reader: Arc<ImageReader>,
    connection: &Connection,
    cfg: &MountConfig,
) -> std::io::Result<(Session, bool)> {
    let resend = kernel_resends();
    let fs = LazyFs::new(reader, cfg.read_workers, cfg.stats.clone())?;
    let (major, minor) = connection.proto;
    let config = session_config(cfg, !resend);
    let session = fuser::Session::from_fd_initialized(
        fs,
        connection.fd.try_clone()?,
        config.acl,
        config,
        fuser::Version(major, minor),
    )
    .spawn()?;
    if resend {
        notify_resend(connection.fd.as_fd())?;
    }
    Ok((Session(session), resend))
}

/// Writes `FUSE_NOTIFY_RESEND` to a connection.
fn notify_resend(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `fd` is open for the duration of the call; `header` is 16 readable bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), header.as_ptr().cast(), header.len()) };
    if n == header.len() as isize {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// mount(2) of a FUSE file system served through `fd` at `mountpoint`, with the options of
/// [`mount_options`].
fn mount_fuse(fd: &OwnedFd, mountpoint: &Path, cfg: &MountConfig) -> std::io::Result<()> {
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        // SAFETY: getuid and getgid have no preconditions and cannot fail.
        unsafe { libc::getuid() },
        // SAFETY: as above.
        unsafe { libc::getgid() }
    );
    if cfg.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_RDONLY | libc::MS_NODEV;
    if !cfg.suid {
        flags |= libc::MS_NOSUID;
    }
    let (source, target) = (
        c(cfg.fs_name.as_bytes())?,
        c(mountpoint.as_os_str().as_bytes())?,
    );
    let (fstype, data) = (c(b"fuse.lazyimg")?, c(data.as_bytes())?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `bytes` as a C string for a system call; a NUL inside is invalid input.
fn c(bytes: &[u8]) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// umount2(2) of `mountpoint`; with `lazy`, detached even while in use (`MNT_DETACH`).
pub fn umount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `target` is a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
