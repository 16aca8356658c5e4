//! The mounts the agent serves ([`Mounts`]: the live ones by mountpoint, and the mountpoints
//! whose mounts are being made) and their lifecycle: mounting an image ([`Agent::mount`]),
//! serving a mount, new or handed over ([`Agent::serve`]: it starts the mount's recording,
//! `profiles`, and its prefetch, `warm`), unmounting it, reaping mounts unmounted outside lazyd,
//! and restarting a mount's recording. Every change of the live mounts is written to the mount
//! table (`handover::save_table`).
//!
//! Containers' root filesystems are `containers`': a mount at one is refused, an umount of one
//! removes its container, and an umount of a shared lower is refused while containers or
//! holders use it.
//! `containers` mounts its lowers through [`Agent::serve`] and unmounts them through
//! [`Agent::unmount_mount`].

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fusefs::fuse::{Connection, MountConfig};
use tracing::{info, warn};

use super::{absolute, unix_now_f64, Agent, AgentError};
use crate::api::{MountInfo, MountProfile, MountRequest, RecordRequest, UmountRequest};
use crate::fetcher::Backend;
use crate::handover::{self, KeptMount};
use crate::mount::{self, Attach, MountedImage};
use crate::profile::Recorder;
use crate::remote::OpenedImage;
use crate::sync::lock;

/// The mounts the agent serves.
#[derive(Default)]
pub(super) struct Mounts {
    /// By mountpoint.
    live: Mutex<BTreeMap<PathBuf, Arc<LiveMount>>>,
    /// Mountpoints whose mount is being made (the image opened, the filesystem mounted): a
    /// second request for one is refused rather than stacked on it.
    making: Mutex<BTreeSet<PathBuf>>,
}

impl Mounts {
    /// Reserves `path` while its mount is being made, unless one is being made there already.
    pub(super) fn reserve(&self, path: &Path) -> Result<Reserved<'_>, AgentError> {
        Reserved::take(&self.making, path)
    }

    /// The mount at `mountpoint`.
    pub(super) fn get(&self, mountpoint: &Path) -> Option<Arc<LiveMount>> {
        lock(&self.live).get(mountpoint).cloned()
    }

    pub(super) fn contains(&self, mountpoint: &Path) -> bool {
        lock(&self.live).contains_key(mountpoint)
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.live).len()
    }

    pub(super) fn paths(&self) -> Vec<PathBuf> {
        lock(&self.live).keys().cloned().collect()
    }

    pub(super) fn all(&self) -> Vec<Arc<LiveMount>> {
        lock(&self.live).values().cloned().collect()
    }

    pub(super) fn infos(&self) -> Vec<MountInfo> {
        lock(&self.live)
            .iter()
            .map(|(path, live)| live.info(path))
            .collect()
    }

    /// The mounts as the mount table keeps them.
    pub(super) fn kept(&self) -> Vec<KeptMount> {
        lock(&self.live)
            .iter()
            .map(|(path, live)| live.kept(path))
            .collect()
    }
}

/// A mountpoint reserved while its mount is being made; freed when dropped.
pub(super) struct Reserved<'a> {
    set: &'a Mutex<BTreeSet<PathBuf>>,
    path: PathBuf,
}

impl<'a> Reserved<'a> {
    /// Reserves `path`, unless a mount there is being made already.
    fn take(set: &'a Mutex<BTreeSet<PathBuf>>, path: &Path) -> Result<Self, AgentError> {
        if !lock(set).insert(path.to_path_buf()) {
            return Err(AgentError::Conflict(format!(
                "a mount at {} is being made already",
                path.display()
            )));
        }
        Ok(Reserved {
            set,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.path);
    }
}

/// A mount served by the agent.
pub(super) struct LiveMount {
    /// Its descriptor is kept under `handover::fd_name(id)`.
    id: u64,
    allow_other: bool,
    suid: bool,
    /// The FUSE ABI version agreed on when it was mounted.
    proto: (u32, u32),
    /// When it was first mounted (seconds since the Unix epoch), and how many restarts of
    /// lazyd it has been served across.
    first_mounted: f64,
    restarts: u32,
    pub(super) image: String,
    pub(super) opened: OpenedImage,
    /// `None` for local stores, read in place.
    pub(super) backend: Option<Arc<Backend>>,
    pub(super) session: Mutex<Option<MountedImage>>,
    pub(super) reader: Arc<fusefs::ImageReader>,
    pub(super) recorder: Option<Arc<Recorder>>,
    /// Bumped by every (re)start of a recording, so only the latest one's timer saves it.
    pub(super) recording: AtomicU64,
    /// Whether the latest recording has been saved.
    pub(super) saved: AtomicBool,
    pub(super) prefetch: Mutex<(u64, Option<String>)>,
    /// Chunks of the whole image queued for background prefetch (no profile was found).
    pub(super) whole_image: AtomicU64,
    /// Set when the mount goes: its prefetch (profile, whole image) stops.
    pub(super) stop_prefetch: Arc<AtomicBool>,
}

impl LiveMount {
    fn info(&self, mountpoint: &Path) -> MountInfo {
        let (prefetch_chunks, prefetch_source) = lock(&self.prefetch).clone();
        MountInfo {
            mountpoint: mountpoint.to_path_buf(),
            image: self.image.clone(),
            manifest_digest: self.opened.manifest_digest.clone(),
            files: self.opened.index.inode_count(),
            mounted_secs: (unix_now_f64() - self.first_mounted).max(0.0),
            restarts_survived: self.restarts,
            bytes_served: self.reader.bytes_served(),
            profile: MountProfile {
                recording: self.recorder.as_ref().is_some_and(|r| r.is_recording()),
                recorded_chunks: self.recorder.as_ref().map_or(0, |r| r.len() as u64),
                prefetch_chunks,
                prefetch_source,
                whole_image_chunks: self.whole_image.load(Ordering::Relaxed),
            },
        }
    }

    fn is_finished(&self) -> bool {
        lock(&self.session).as_ref().is_none_or(|s| s.is_finished())
    }

    fn kept(&self, mountpoint: &Path) -> KeptMount {
        KeptMount {
            id: self.id,
            mountpoint: mountpoint.to_path_buf(),
            image: self.image.clone(),
            manifest: self.opened.manifest.clone(),
            manifest_digest: self.opened.manifest_digest.clone(),
            allow_other: self.allow_other,
            suid: self.suid,
            proto: self.proto,
            mounted_at: self.first_mounted,
            restarts: self.restarts,
        }
    }
}

/// How [`Agent::serve`] attaches a mount.
pub(super) enum Serve {
    /// Mounts anew.
    New { allow_other: bool, suid: bool },
    /// Serves a mount a predecessor handed over.
    Adopt(Box<KeptMount>, Connection),
}

impl Agent {
    /// Mounts an image; mounting the same image again at the same place is a no-op.
    pub async fn mount(self: &Arc<Self>, req: MountRequest) -> Result<MountInfo, AgentError> {
        self.check_running()?;
        self.reap();
        let mountpoint = absolute(&req.mountpoint)?;
        if let Some(live) = lock(&self.mounts.live).get(&mountpoint) {
            return if live.image == req.image {
                Ok(live.info(&mountpoint))
            } else {
                Err(AgentError::Conflict(format!(
                    "{} already has {} mounted",
                    mountpoint.display(),
                    live.image
                )))
            };
        }
        if let Some(name) = self.containers.at(&mountpoint) {
            return Err(AgentError::Conflict(format!(
                "{} is the root filesystem of container {name}",
                mountpoint.display()
            )));
        }
        let _reserved = self.mounts.reserve(&mountpoint)?;
        let opened = self.open(&req.image, true).await?;
        let allow_other = req.allow_other.unwrap_or(self.config.mount.allow_other);
        let how = Serve::New {
            allow_other,
            suid: req.suid,
        };
        let live = self.serve(&req.image, opened, &mountpoint, how).await?;
        Ok(live.info(&mountpoint))
    }

    /// Mounts an opened image at `mountpoint` and serves it: starts its recording and, for a
    /// remote image, its prefetch (`Agent::prefetch_after_mount`). The image's profile is
    /// looked up while the filesystem is being mounted, so the link is busy from the start.
    pub(super) async fn serve(
        self: &Arc<Self>,
        image: &str,
        opened: OpenedImage,
        mountpoint: &Path,
        how: Serve,
    ) -> Result<Arc<LiveMount>, AgentError> {
        let (allow_other, suid, kept, connection) = match how {
            Serve::New { allow_other, suid } => (allow_other, suid, None, None),
            Serve::Adopt(kept, connection) => {
                (kept.allow_other, kept.suid, Some(kept), Some(connection))
            }
        };
        // A mount served again records nothing: its start was recorded before.
        let recorder = (self.config.profile.record && kept.is_none())
            .then(|| Recorder::new(self.config.profile.window));
        let cfg = MountConfig {
            fs_name: format!("lazyimg:{image}"),
            allow_other,
            suid,
            read_workers: self.config.mount.read_workers,
            stats: self.fuse_stats.clone(),
            ..MountConfig::default()
        };
        let backend = (!opened.is_local()).then(|| self.fetcher.backend(opened.store.clone()));
        let profile = backend.is_some().then(|| {
            let agent = self.clone();
            let (opened, image) = (opened.clone(), image.to_string());
            tokio::spawn(async move { agent.find_profile(&opened, &image).await })
        });
        let streams = self.streams.clone();
        let speculate = self.config.fetch.speculate;
        let mounted = {
            let mountpoint = mountpoint.to_path_buf();
            let recorder = recorder.clone();
            tokio::task::spawn_blocking(move || {
                let attach = match &connection {
                    Some(c) => Attach::Adopt(c),
                    None => Attach::Kept,
                };
                let mounted = mount::mount_opened(
                    &opened,
                    &streams,
                    &mountpoint,
                    &cfg,
                    recorder.as_ref(),
                    speculate,
                    attach,
                );
                mounted.map(|m| (opened, m))
            })
            .await
        };
        let (opened, mut mounted) = match mounted {
            Ok(Ok(mounted)) => mounted,
            failed => {
                if let Some(lookup) = &profile {
                    lookup.abort();
                }
                return Err(match failed {
                    Ok(Err(e)) => e.into(),
                    Err(e) => AgentError::Io {
                        context: "mount task".into(),
                        source: std::io::Error::other(e),
                    },
                    Ok(Ok(_)) => unreachable!("handled above"),
                });
            }
        };
        let (id, proto, first_mounted, restarts) = match &kept {
            Some(k) => (k.id, k.proto, k.mounted_at, k.restarts + 1),
            None => {
                let id = self.handover.new_mount_id();
                let holder = self.handover.holder();
                let connection = mounted.connection.take().expect("a new mount's connection");
                if let Err(e) = holder.store(&handover::fd_name(id), connection.fd.as_fd()) {
                    warn!(mountpoint = %mountpoint.display(), "cannot hand the mount's FUSE descriptor to the {} holder; it will not survive a restart of lazyd: {e}", holder.name());
                }
                (id, connection.proto, unix_now_f64(), 0)
            }
        };
        let live = Arc::new(LiveMount {
            id,
            allow_other,
            suid,
            proto,
            first_mounted,
            restarts,
            image: image.to_string(),
            reader: mounted.reader.clone(),
            opened,
            backend,
            session: Mutex::new(Some(mounted)),
            recorder,
            recording: AtomicU64::new(0),
            saved: AtomicBool::new(false),
            prefetch: Mutex::new((0, None)),
            whole_image: AtomicU64::new(0),
            stop_prefetch: Arc::new(AtomicBool::new(false)),
        });
        lock(&self.mounts.live).insert(mountpoint.to_path_buf(), live.clone());
        self.save_table();
        if live.recorder.is_some() {
            self.schedule_recording_end(&live, 0, self.config.profile.window);
        }
        if let Some(lookup) = profile {
            let agent = self.clone();
            let live = live.clone();
            tokio::spawn(async move {
                let profile = lookup.await.ok().flatten();
                agent.prefetch_after_mount(&live, profile).await;
            });
        }
        Ok(live)
    }

    /// Unmounts; fails with `Busy` while the mount is in use unless `lazy`. On the target of a
    /// container's rootfs it removes that container, keeping nothing (`lazyctl umount` of a
    /// `lazyctl mount --rootfs`); a shared lower is refused while containers or holders use it.
    pub async fn umount(self: &Arc<Self>, req: UmountRequest) -> Result<(), AgentError> {
        let mountpoint = absolute(&req.mountpoint)?;
        if let Some(name) = self.containers.at(&mountpoint) {
            self.remove_container(&name, false, req.lazy).await?;
            return Ok(());
        }
        if mountpoint.starts_with(self.lower_root()) {
            let _ops = self.containers.serialise().await;
            let users = self.containers.lower_users(&mountpoint);
            if !users.is_empty() {
                return Err(AgentError::LowerInUse {
                    path: mountpoint,
                    users,
                });
            }
            return self.unmount_mount(req).await;
        }
        self.unmount_mount(req).await
    }

    /// Unmounts one of the agent's FUSE mounts.
    pub(super) async fn unmount_mount(
        self: &Arc<Self>,
        req: UmountRequest,
    ) -> Result<(), AgentError> {
        let mountpoint = absolute(&req.mountpoint)?;
        let Some(live) = lock(&self.mounts.live).get(&mountpoint).cloned() else {
            return Err(AgentError::NotMounted(mountpoint));
        };
        let target = mountpoint.clone();
        let lazy = req.lazy;
        let session = {
            let live = live.clone();
            tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
                if !live.is_finished() {
                    match mount::unmount(&target, lazy) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            return Err(AgentError::Busy { path: target });
                        }
                        Err(e) => {
                            return Err(AgentError::io(format!("unmounting {}", target.display()))(
                                e,
                            ))
                        }
                    }
                }
                let session = lock(&live.session).take();
                let Some(session) = session else {
                    return Ok(());
                };
                if lazy && !session.is_finished() {
                    // Detached while in use: the kernel ends the session when the last file is
                    // closed; serve those reads until then without holding the caller.
                    std::thread::spawn(move || {
                        if let Err(e) = session.join() {
                            warn!(mountpoint = %target.display(), "FUSE session ended with an error: {e}");
                        }
                    });
                } else if let Err(e) = session.join() {
                    warn!(mountpoint = %target.display(), "FUSE session ended with an error: {e}");
                }
                Ok(())
            })
        };
        session.await.map_err(|e| AgentError::Io {
            context: "unmount task".into(),
            source: std::io::Error::other(e),
        })??;
        self.forget_mount(&mountpoint, &live).await;
        info!(mountpoint = %mountpoint.display(), image = %live.image, "unmounted");
        Ok(())
    }

    async fn forget_mount(&self, mountpoint: &Path, live: &Arc<LiveMount>) {
        live.stop_prefetch.store(true, Ordering::Relaxed);
        {
            let mut mounts = lock(&self.mounts.live);
            if mounts.get(mountpoint).is_some_and(|m| Arc::ptr_eq(m, live)) {
                mounts.remove(mountpoint);
            }
        }
        self.handover.holder().remove(&handover::fd_name(live.id));
        self.save_table();
        self.images.touch(&live.opened.manifest_digest);
        self.save_recording(live).await;
    }

    /// Drops mounts whose FUSE session ended without the agent (`umount` run by hand).
    pub(super) fn reap(self: &Arc<Self>) {
        let finished: Vec<(PathBuf, Arc<LiveMount>)> = lock(&self.mounts.live)
            .iter()
            .filter(|(_, m)| m.is_finished())
            .map(|(p, m)| (p.clone(), m.clone()))
            .collect();
        for (path, live) in finished {
            info!(mountpoint = %path.display(), image = %live.image, "mount was unmounted outside lazyd");
            let session = lock(&live.session).take();
            if let Some(session) = session {
                let _ = session.join();
            }
            let agent = self.clone();
            tokio::spawn(async move { agent.forget_mount(&path, &live).await });
        }
    }

    /// Restarts the recording of a live mount's first reads for `window`.
    pub fn record(self: &Arc<Self>, req: RecordRequest) -> Result<MountInfo, AgentError> {
        let mountpoint = absolute(&req.mountpoint)?;
        let live = lock(&self.mounts.live)
            .get(&mountpoint)
            .cloned()
            .ok_or_else(|| AgentError::NotMounted(mountpoint.clone()))?;
        let Some(recorder) = &live.recorder else {
            return Err(AgentError::BadRequest(
                "profile recording is off in the config (profile.record = false)".into(),
            ));
        };
        let window = match req.window_secs {
            Some(s) => Duration::try_from_secs_f64(s)
                .map_err(|_| AgentError::BadRequest(format!("not a duration: {s}")))?,
            None => self.config.profile.window,
        };
        let generation = live.recording.fetch_add(1, Ordering::SeqCst) + 1;
        live.saved.store(false, Ordering::SeqCst);
        recorder.restart(window);
        self.schedule_recording_end(&live, generation, window);
        Ok(live.info(&mountpoint))
    }
}
