//! The agent: what `lazyd` runs. One [`Agent`] per host owns the chunk cache, the fetcher and
//! every FUSE mount, so the read path never crosses a process boundary; `server` exposes it on
//! the control socket.
//!
//! Beyond serving reads it moves bytes ahead of demand:
//! - **warm** fetches a whole image (or its hot set) into the cache at background priority and
//!   full speed, reporting progress; chunks already cached are skipped, so a second warm fetches
//!   nothing and an interrupted one continues where it stopped;
//! - **profiles**: each mount records which chunks are read in its first seconds
//!   (`profile.window`), in first-access order; when the window ends the run is merged into the
//!   image's local profile (`STATE/profiles`) and queued for pushing beside the image
//!   (`STATE/profiles/pending`, pushed by `lazyctl profile push` or at once with
//!   `profile.push`). Mounting an image that has a profile (local, else beside the image)
//!   queues its chunks for prefetch in profile order, below demand reads and under
//!   `background.bandwidth`.
//!
//! **Containers' root filesystems** (`POST /v1/rootfs`): an image is mounted once per manifest
//! digest as a shared read-only lower (`STATE/lower/<hex>`, an ordinary mount that records and
//! prefetches like any other), and each container gets an overlay of its own upper and work
//! dirs (`STATE/containers/NAME`) over it. The lower is referenced by the containers using it
//! and unmounted with the last of them. Creating and removing containers is serialised, so a
//! lower is never mounted twice nor unmounted under a container being created.
//!
//! State that must survive a restart is small and lives in files: the images the agent has
//! opened (`STATE/images.json`, used by `gc`), kept manifests and indexes in the cache directory
//! (so a warmed image mounts with its backend down), profiles, and the mount table
//! (`STATE/mounts.json`, [`crate::handover`]). Mounts survive the process when a holder keeps
//! their FUSE descriptors (systemd or lazyd's supervisor): the next agent serves them again
//! ([`Agent::adopt`]). Without one, SIGTERM unmounts what is idle and keeps serving what is in
//! use until it is released (see `lazyd` and docs/OPERATIONS.md).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use std::os::fd::{AsFd, OwnedFd};

use fusefs::fuse::{Connection, MountConfig};
use fusefs::ops::OpStats;
use fusefs::Index;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::api::{
    GcReport, GcRequest, KnownImage, MountInfo, MountProfile, MountRequest, ProfileReport,
    RecordRequest, RootfsInfo, RootfsRemoved, RootfsRequest, Status, UmountRequest, WarmEvent,
    WarmInfo, WarmRequest,
};
use crate::cache::{CacheConfig, CacheError, ChunkCache};
use crate::config::{AgentConfig, WholeImage};
use crate::fetcher::{Backend, Fetcher, Priority, RateLimit, WarmError, WarmOptions, WarmProgress};
use crate::handover::{self, Holder, KeptContainer, KeptMount, MountTable};
use crate::metrics::MetricsSnapshot;
use crate::mount::{self, Attach, MountError, MountedImage};
use crate::profile::{self, Profile, ProfileError, Recorder};
use crate::registry::error_chain;
use crate::remote::{self, ImageLocation, OpenedImage, RemoteError, RemoteOptions};
use crate::stream::Streams;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("nothing is mounted by lazyd at {0}")]
    NotMounted(PathBuf),
    #[error("{0}")]
    Conflict(String),
    #[error("{path} is in use (open files, a working directory or an overlay on it); stop its users or unmount with --lazy")]
    Busy { path: PathBuf },
    #[error("no container rootfs named {0:?} (lazyctl status lists them)")]
    NoContainer(String),
    #[error("{path} is the shared read-only lower of container(s) {}; it is unmounted when the last of them is removed (lazyctl umount ROOTFS)", containers.join(", "))]
    LowerInUse {
        path: PathBuf,
        containers: Vec<String>,
    },
    #[error("lazyd is shutting down")]
    ShuttingDown,
    #[error("cannot open {image}: {source}")]
    Open {
        image: String,
        #[source]
        source: RemoteError,
    },
    #[error("cannot open {image}: no answer within mount.open_timeout ({after:?}): the registry or bucket is unreachable or too slow")]
    OpenTimeout { image: String, after: Duration },
    #[error("cannot read the config of {image}: {source}")]
    Config {
        image: String,
        #[source]
        source: RemoteError,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("profile: {0}")]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Warm(#[from] WarmError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Whether the failure is the backend's (down, slow) rather than the request's.
    pub fn is_backend(&self) -> bool {
        match self {
            AgentError::Open { source, .. } | AgentError::Config { source, .. } => {
                !source.is_permanent()
            }
            AgentError::Profile(e) => !e.is_permanent(),
            AgentError::OpenTimeout { .. } => true,
            _ => false,
        }
    }

    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}

/// A mountpoint reserved while its mount is being made; freed when dropped.
struct Reserved<'a> {
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
struct LiveMount {
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
    image: String,
    opened: OpenedImage,
    /// `None` for local stores, read in place.
    backend: Option<Arc<Backend>>,
    session: Mutex<Option<MountedImage>>,
    reader: Arc<fusefs::ImageReader>,
    recorder: Option<Arc<Recorder>>,
    /// Bumped by every (re)start of a recording, so only the latest one's timer saves it.
    recording: AtomicU64,
    /// Whether the latest recording has been saved.
    saved: AtomicBool,
    prefetch: Mutex<(u64, Option<String>)>,
    /// Chunks of the whole image queued for background prefetch (no profile was found).
    whole_image: AtomicU64,
    /// Set when the mount goes: its prefetch (profile, whole image) stops.
    stop_prefetch: Arc<AtomicBool>,
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
enum Serve {
    /// Mounts anew.
    New { allow_other: bool, suid: bool },
    /// Serves a mount a predecessor handed over.
    Adopt(Box<KeptMount>, Connection),
}

/// A container's root filesystem: an overlay over a shared lower mount.
struct Container {
    info: RootfsInfo,
    /// Whether the caller chose the target (it is then left in place at removal).
    own_target: bool,
}

struct RunningWarm {
    image: String,
    hot: bool,
    started: Instant,
    progress: WarmProgress,
}

pub struct Agent {
    config: AgentConfig,
    remote: RemoteOptions,
    fetcher: Arc<Fetcher>,
    cache: Arc<ChunkCache>,
    background_limit: Option<Arc<RateLimit>>,
    /// Streams of safetensors files, shared by every mount so they share the link fairly.
    streams: Arc<Streams>,
    mounts: Mutex<BTreeMap<PathBuf, Arc<LiveMount>>>,
    /// Mountpoints whose mount is being made (the image opened, the filesystem mounted): a
    /// second request for one is refused rather than stacked on it.
    mounting: Mutex<BTreeSet<PathBuf>>,
    /// Containers' root filesystems by name.
    containers: Mutex<BTreeMap<String, Container>>,
    /// Held while a container is created or removed (and a lower unmounted by request), so
    /// lower mounts and their references change one at a time.
    container_ops: tokio::sync::Mutex<()>,
    warms: Mutex<BTreeMap<u64, RunningWarm>>,
    next_warm: AtomicU64,
    images: Mutex<Vec<KnownImage>>,
    shutting_down: AtomicBool,
    started: Instant,
    /// The FUSE requests of every mount of this agent.
    fuse_stats: Arc<OpStats>,
    /// Images opened from a registry or S3 lately, by the location asked for, and when:
    /// reused for `fetch.resolve_ttl` without asking the backend.
    opened: Mutex<HashMap<String, (OpenedImage, Instant)>>,
    /// Lowers whose last container is gone, each with the number of its idle spell: the timer
    /// that unmounts a lingering lower acts only if no container came (and went) since.
    idle_lowers: Mutex<HashMap<PathBuf, u64>>,
    next_idle: AtomicU64,
    /// Who keeps the mounts' descriptors across restarts.
    holder: Holder,
    /// The next mount id (`handover::fd_name`); from the mount table ([`Agent::adopt`]).
    next_mount: AtomicU64,
    /// Times an agent took over the mounts of the one before; from the mount table.
    restarts: AtomicU64,
    /// Serialises writes of `STATE/mounts.json`.
    table_lock: Mutex<()>,
    /// Notified when `POST /v1/upgrade` asks this server to hand over.
    upgrade: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded value is replaced or updated in single statements; a panic elsewhere cannot
    // leave one torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long a starting agent waits for the cache's lock, which a predecessor that is exiting
/// may still hold.
const CACHE_LOCK_WAIT: Duration = Duration::from_secs(3);

/// How often a warm reports progress to its client (the last report is always sent).
const WARM_REPORT_INTERVAL: Duration = Duration::from_millis(200);

impl Agent {
    /// Opens the cache (taking its lock) and starts the fetcher, whose requests run on
    /// `runtime` (lazyd's). Contacts no backend: the agent starts with every registry and
    /// bucket unreachable.
    pub fn new(
        config: AgentConfig,
        runtime: tokio::runtime::Handle,
        holder: Holder,
    ) -> Result<Arc<Agent>, AgentError> {
        for dir in [&config.state_dir, &config.cache_dir] {
            crate::create_private_dir(dir)
                .map_err(AgentError::io(format!("creating {}", dir.display())))?;
        }
        let cache_config = CacheConfig {
            dir: config.chunk_dir(),
            budget_bytes: config.cache_size,
        };
        // A predecessor killed a moment ago (with its supervisor) may still hold the lock
        // while it exits.
        let deadline = Instant::now() + CACHE_LOCK_WAIT;
        let cache = loop {
            match ChunkCache::open(&cache_config) {
                Err(CacheError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                opened => break Arc::new(opened?),
            }
        };
        let fetcher = Fetcher::new(config.fetcher(), Some(cache.clone()), runtime)
            .map_err(AgentError::io("starting the fetcher"))?;
        let streams = Streams::new(fetcher.clone(), config.streams());
        let images = load_images(&config.state_dir.join(IMAGES_FILE));
        let background_limit =
            (config.background.bandwidth > 0).then(|| RateLimit::new(config.background.bandwidth));
        Ok(Arc::new(Agent {
            remote: config.remote(),
            config,
            fetcher,
            cache,
            background_limit,
            streams,
            mounts: Mutex::new(BTreeMap::new()),
            containers: Mutex::new(BTreeMap::new()),
            container_ops: tokio::sync::Mutex::new(()),
            mounting: Mutex::new(BTreeSet::new()),
            warms: Mutex::new(BTreeMap::new()),
            next_warm: AtomicU64::new(0),
            images: Mutex::new(images),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            fuse_stats: Arc::new(OpStats::default()),
            opened: Mutex::new(HashMap::new()),
            idle_lowers: Mutex::new(HashMap::new()),
            next_idle: AtomicU64::new(0),
            holder,
            next_mount: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            table_lock: Mutex::new(()),
            upgrade: tokio::sync::Notify::new(),
        }))
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    fn check_running(&self) -> Result<(), AgentError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Err(AgentError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Opens `image` (manifest and index); with `remember`, records it for `gc` as in use. A
    /// registry or S3 image opened within `fetch.resolve_ttl` is not asked for again.
    async fn open(&self, image: &str, remember: bool) -> Result<OpenedImage, AgentError> {
        let location =
            ImageLocation::parse(image).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let ttl = self.config.fetch.resolve_ttl;
        let recent = lock(&self.opened)
            .get(image)
            .filter(|(_, at)| at.elapsed() < ttl)
            .map(|(opened, _)| opened.clone());
        let opened = match recent {
            Some(opened) => opened,
            None => {
                let deadline = self.config.mount.open_timeout;
                let opening =
                    remote::open_image(&location, &self.remote, Some(&self.config.cache_dir));
                let opened = tokio::time::timeout(deadline, opening)
                    .await
                    .map_err(|_| {
                        warn!(
                            image,
                            "cannot open the image within mount.open_timeout ({deadline:?})"
                        );
                        AgentError::OpenTimeout {
                            image: image.to_string(),
                            after: deadline,
                        }
                    })?
                    .map_err(|source| {
                        // The client gets the error; the log must name it too (a digest
                        // mismatch is someone changing the store, not a client's mistake).
                        warn!(image, "cannot open the image: {}", error_chain(&source));
                        AgentError::Open {
                            image: image.to_string(),
                            source,
                        }
                    })?;
                // A local store is read in place: opening it again costs no round trip.
                if !ttl.is_zero() && !matches!(location, ImageLocation::Dir { .. }) {
                    let mut recent = lock(&self.opened);
                    recent.retain(|_, (_, at)| at.elapsed() < ttl);
                    recent.insert(image.to_string(), (opened.clone(), Instant::now()));
                }
                opened
            }
        };
        if remember {
            self.remember(image, &opened);
        }
        Ok(opened)
    }

    /// Mounts an image; mounting the same image again at the same place is a no-op.
    pub async fn mount(self: &Arc<Self>, req: MountRequest) -> Result<MountInfo, AgentError> {
        self.check_running()?;
        self.reap();
        let mountpoint = absolute(&req.mountpoint)?;
        if let Some(live) = lock(&self.mounts).get(&mountpoint) {
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
        if let Some(name) = self.container_at(&mountpoint) {
            return Err(AgentError::Conflict(format!(
                "{} is the root filesystem of container {name}",
                mountpoint.display()
            )));
        }
        let _reserved = Reserved::take(&self.mounting, &mountpoint)?;
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
    async fn serve(
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
                let id = self.next_mount.fetch_add(1, Ordering::Relaxed);
                let connection = mounted.connection.take().expect("a new mount's connection");
                if let Err(e) = self
                    .holder
                    .store(&handover::fd_name(id), connection.fd.as_fd())
                {
                    warn!(mountpoint = %mountpoint.display(), "cannot hand the mount's FUSE descriptor to the {} holder; it will not survive a restart of lazyd: {e}", self.holder.name());
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
        lock(&self.mounts).insert(mountpoint.to_path_buf(), live.clone());
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

    /// The image's profile (the local one, else the one beside the image) and where it came
    /// from, when profile prefetch is on and there is one; a profile that cannot be read is
    /// logged and treated as none.
    async fn find_profile(&self, opened: &OpenedImage, image: &str) -> Option<(Profile, String)> {
        if !self.config.profile.prefetch {
            return None;
        }
        match profile::load_local(&self.profile_dir(), &opened.manifest_digest) {
            Ok(Some(p)) => Some((p, "local".to_string())),
            Ok(None) => match profile::fetch_profile(opened, &self.remote).await {
                Ok(Some(p)) => Some((p, image.to_string())),
                Ok(None) => None,
                Err(e) => {
                    warn!(
                        image,
                        "cannot fetch the image's profile, not prefetching it: {e}"
                    );
                    None
                }
            },
            Err(e) => {
                warn!(image, "local profile unusable, not prefetching it: {e}");
                None
            }
        }
    }

    /// What a new remote mount fetches before it is read: its profile's hot set at prefetch
    /// priority (in profile order, filling the link from the start, demand reads still first),
    /// then, when `background.whole_image` says so (by default: only when there is no
    /// profile), the whole image in layout order at background priority, under
    /// `background.bandwidth`, up to half of the cache budget. Both stop when the mount goes.
    async fn prefetch_after_mount(
        &self,
        live: &Arc<LiveMount>,
        profile: Option<(Profile, String)>,
    ) {
        let Some(backend) = live.backend.clone() else {
            return;
        };
        let found = profile.is_some();
        if let Some((profile, source)) = profile {
            // The profile says what the start reads: guesses would fetch what it left out.
            let guesses = lock(&live.session)
                .as_ref()
                .and_then(|m| m.fetch_guesses.clone());
            if let Some(guesses) = guesses {
                guesses.store(false, Ordering::Relaxed);
            }
            let chunks = profile.chunks(&live.opened.index);
            let bytes: u64 = chunks.iter().map(|c| u64::from(c.record.comp_len)).sum();
            info!(
                image = %live.image,
                chunks = chunks.len(),
                bytes,
                runs = profile.runs,
                "prefetching the hot set from the {source} profile"
            );
            *lock(&live.prefetch) = (chunks.len() as u64, Some(source));
            let opts = WarmOptions {
                priority: Priority::Prefetch,
                window_bytes: self.config.profile.prefetch_window,
                decode_ahead: true,
                ..WarmOptions::default()
            };
            self.prefetch_chunks(live, &backend, chunks, opts, "the hot set")
                .await;
        }
        let whole = match self.config.background.whole_image {
            WholeImage::Never => false,
            WholeImage::WithoutProfile => !found,
            WholeImage::Always => true,
        };
        if !whole || live.stop_prefetch.load(Ordering::Relaxed) {
            return;
        }
        if live.reader.watches_opens() {
            // A model image: each safetensors file is streamed when it is opened, at the pace
            // of its loader; a loader that reads one shard must not get the others fetched.
            return;
        }
        let budget = self.config.cache_size / 2;
        let mut chunks = match layout_order(&live.opened.index) {
            Ok(chunks) => chunks,
            Err(e) => {
                warn!(image = %live.image, "not prefetching the whole image: {e}");
                return;
            }
        };
        let mut bytes = 0u64;
        let within = chunks
            .iter()
            .take_while(|c| {
                bytes += u64::from(c.record.comp_len);
                bytes <= budget
            })
            .count();
        chunks.truncate(within);
        info!(
            image = %live.image,
            chunks = chunks.len(),
            of = live.opened.index.chunk_count(),
            "prefetching the whole image in the background (no profile)"
        );
        live.whole_image
            .store(chunks.len() as u64, Ordering::Relaxed);
        let opts = WarmOptions {
            limit: self.background_limit.clone(),
            ..WarmOptions::default()
        };
        self.prefetch_chunks(live, &backend, chunks, opts, "the whole image")
            .await;
    }

    /// Runs a warm of `chunks` for a mount's prefetch until it is done or the mount goes;
    /// a failure is logged (the readers of those chunks fetch them on demand).
    async fn prefetch_chunks(
        &self,
        live: &LiveMount,
        backend: &Arc<Backend>,
        chunks: Vec<fusefs::ChunkRef>,
        opts: WarmOptions,
        what: &'static str,
    ) {
        let fetcher = self.fetcher.clone();
        let backend = backend.clone();
        let stop = live.stop_prefetch.clone();
        let started = Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            fetcher.warm(&backend, &chunks, &opts, &mut |_| {
                !stop.load(Ordering::Relaxed)
            })
        })
        .await;
        match outcome {
            Ok(Ok(p)) => info!(
                image = %live.image,
                fetched = p.fetched_bytes,
                cached = p.cached_bytes,
                "prefetched {what} in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
            Ok(Err(WarmError::Cancelled)) => {}
            Ok(Err(e)) => warn!(image = %live.image, "prefetch of {what} stopped: {e}"),
            Err(e) => error!(image = %live.image, "prefetch task failed: {e}"),
        }
    }

    fn schedule_recording_end(
        self: &Arc<Self>,
        live: &Arc<LiveMount>,
        generation: u64,
        window: Duration,
    ) {
        let agent = self.clone();
        let live = live.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            if live.recording.load(Ordering::SeqCst) == generation {
                agent.save_recording(&live).await;
            }
        });
    }

    /// Merges what the mount recorded into the image's local profile and its pending runs,
    /// once per recording; pushes it when the config says so.
    async fn save_recording(&self, live: &LiveMount) {
        let Some(recorder) = &live.recorder else {
            return;
        };
        if live.saved.swap(true, Ordering::SeqCst) {
            return;
        }
        let digest = &live.opened.manifest_digest;
        let run = recorder.profile(digest, &live.opened.index);
        if run.entries.is_empty() {
            return;
        }
        let result = (|| -> Result<(), ProfileError> {
            for dir in [self.profile_dir(), self.pending_dir()] {
                let merged = match profile::load_local(&dir, digest)? {
                    Some(mut p) => {
                        p.merge(&run);
                        p
                    }
                    None => run.clone(),
                };
                profile::save_local(&dir, &merged)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => info!(
                image = %live.image,
                chunks = run.entries.len(),
                "recorded the image's first reads into its profile"
            ),
            Err(e) => {
                error!(image = %live.image, "cannot save the recorded profile: {e}");
                return;
            }
        }
        if self.config.profile.push {
            match self.push_pending(&live.opened).await {
                Ok(Some(to)) => info!(image = %live.image, "pushed the profile to {to}"),
                Ok(None) => {}
                Err(e) => warn!(image = %live.image, "cannot push the profile (kept locally): {e}"),
            }
        }
    }

    /// Merges the runs recorded here and not pushed yet into the profile beside the image and
    /// pushes the result. Returns where it went, or `None` when there was nothing to push.
    async fn push_pending(&self, opened: &OpenedImage) -> Result<Option<String>, AgentError> {
        let digest = &opened.manifest_digest;
        let Some(pending) = profile::load_local(&self.pending_dir(), digest)? else {
            return Ok(None);
        };
        let merged = match profile::fetch_profile(opened, &self.remote).await? {
            Some(mut remote) => {
                remote.merge(&pending);
                remote
            }
            None => pending,
        };
        let to = profile::push_profile(opened, &merged, &self.remote).await?;
        profile::remove_local(&self.pending_dir(), digest)?;
        Ok(Some(to))
    }

    /// Unmounts; fails with `Busy` while the mount is in use unless `lazy`. On the target of a
    /// container's rootfs it removes that container, keeping nothing (`lazyctl umount` of a
    /// `lazyctl mount --rootfs`); a shared lower is refused while containers use it.
    pub async fn umount(self: &Arc<Self>, req: UmountRequest) -> Result<(), AgentError> {
        let mountpoint = absolute(&req.mountpoint)?;
        if let Some(name) = self.container_at(&mountpoint) {
            self.remove_container(&name, false, req.lazy).await?;
            return Ok(());
        }
        if mountpoint.starts_with(self.lower_root()) {
            let _ops = self.container_ops.lock().await;
            let containers = self.lower_users(&mountpoint);
            if !containers.is_empty() {
                return Err(AgentError::LowerInUse {
                    path: mountpoint,
                    containers,
                });
            }
            return self.unmount_mount(req).await;
        }
        self.unmount_mount(req).await
    }

    /// Unmounts one of the agent's FUSE mounts.
    async fn unmount_mount(self: &Arc<Self>, req: UmountRequest) -> Result<(), AgentError> {
        let mountpoint = absolute(&req.mountpoint)?;
        let Some(live) = lock(&self.mounts).get(&mountpoint).cloned() else {
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

    fn lower_root(&self) -> PathBuf {
        self.config.state_dir.join(LOWER_DIR)
    }

    fn containers_root(&self) -> PathBuf {
        self.config.state_dir.join(CONTAINERS_DIR)
    }

    /// The container whose overlay is mounted at `target`.
    fn container_at(&self, target: &Path) -> Option<String> {
        lock(&self.containers)
            .values()
            .find(|c| c.info.rootfs == target)
            .map(|c| c.info.name.clone())
    }

    /// The containers whose overlays use the lower mount at `lower`.
    fn lower_users(&self, lower: &Path) -> Vec<String> {
        lock(&self.containers)
            .values()
            .filter(|c| c.info.lower == lower)
            .map(|c| c.info.name.clone())
            .collect()
    }

    /// Creates a container's root filesystem: mounts the image as the shared lower (once per
    /// manifest digest), then an overlay of the container's own upper and work dirs over it.
    pub async fn create_rootfs(
        self: &Arc<Self>,
        req: RootfsRequest,
    ) -> Result<RootfsInfo, AgentError> {
        self.check_running()?;
        self.reap();
        let name = match req.name {
            Some(n) => n,
            None => random_name()?,
        };
        mount::check_container_name(&name).map_err(AgentError::BadRequest)?;
        let target = req.target.as_deref().map(absolute).transpose()?;
        // Opened before the lock: a slow registry must not hold up every other container's
        // create and remove, nor the drain at SIGTERM.
        let opened = self.open(&req.image, true).await?;
        let _ops = self.container_ops.lock().await;
        self.check_running()?;
        if lock(&self.containers).contains_key(&name) {
            return Err(AgentError::Conflict(format!(
                "a container named {name} exists; remove it first or choose another name"
            )));
        }
        let dir = self.containers_root().join(&name);
        if dir.exists() {
            return Err(AgentError::Conflict(format!(
                "{} exists (kept from an earlier container?); delete it or choose another name",
                dir.display()
            )));
        }
        if let Some(t) = &target {
            if !t.is_dir() {
                return Err(MountError::NotADirectory(t.clone()).into());
            }
            if lock(&self.mounts).contains_key(t) || self.container_at(t).is_some() {
                return Err(AgentError::Conflict(format!(
                    "lazyd already has something mounted at {}",
                    t.display()
                )));
            }
        }
        let _reserved = target
            .as_deref()
            .map(|t| Reserved::take(&self.mounting, t))
            .transpose()?;
        // The runtime's bundle needs the image's config next (`/v1/image/config`): fetch it
        // (into CACHE/configs) while the root filesystem is being made.
        if !opened.is_local() {
            let (location, config, store) = (
                opened.location.clone(),
                opened.manifest.config.clone(),
                opened.store.clone(),
            );
            let cache_dir = self.config.cache_dir.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    remote::read_config(&location, &config, store.as_ref(), Some(&cache_dir)).await
                {
                    warn!(image = %location, "cannot fetch the image's config ahead: {e}");
                }
            });
        }
        let manifest_digest = opened.manifest_digest.clone();
        let hex = manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&manifest_digest);
        let lower = self.lower_root().join(hex);
        lock(&self.idle_lowers).remove(&lower);
        if lock(&self.mounts).contains_key(&lower) {
            self.touch(&manifest_digest);
        } else {
            crate::create_private_dir(&self.lower_root())
                .and_then(|()| std::fs::create_dir_all(&lower))
                .map_err(AgentError::io(format!("creating {}", lower.display())))?;
            // Containers run as any user: the lower must let them all through (root mounts it).
            // Their setuid binaries work through their overlays, whatever the lower says.
            let how = Serve::New {
                allow_other: true,
                suid: false,
            };
            self.serve(&req.image, opened, &lower, how).await?;
        }
        let made = {
            let (dir, lower, target) = (dir.clone(), lower.clone(), target.clone());
            tokio::task::spawn_blocking(move || make_overlay(&dir, &lower, target.as_deref()))
                .await
                .map_err(|e| AgentError::Io {
                    context: "overlay task".into(),
                    source: std::io::Error::other(e),
                })
                .and_then(|r| r)
        };
        let (rootfs, upper, work) = match made {
            Ok(paths) => paths,
            Err(e) => {
                self.release_lower(&lower, false).await;
                return Err(e);
            }
        };
        let info = RootfsInfo {
            name: name.clone(),
            image: req.image,
            manifest_digest,
            rootfs,
            upper,
            work,
            lower,
            dir,
        };
        info!(
            container = %name,
            image = %info.image,
            rootfs = %info.rootfs.display(),
            lower = %info.lower.display(),
            "container rootfs ready"
        );
        lock(&self.containers).insert(
            name,
            Container {
                info: info.clone(),
                own_target: target.is_some(),
            },
        );
        self.save_table();
        Ok(info)
    }

    /// Removes a container's root filesystem: unmounts its overlay (busy: refused), deletes its
    /// directory unless `keep`, and unmounts the lower when no other container uses it.
    pub async fn remove_rootfs(
        self: &Arc<Self>,
        name: &str,
        keep: bool,
    ) -> Result<RootfsRemoved, AgentError> {
        self.remove_container(name, keep, false).await
    }

    /// [`Agent::remove_rootfs`]; with `lazy`, detaches the overlay (and the lower) even while
    /// in use.
    async fn remove_container(
        self: &Arc<Self>,
        name: &str,
        keep: bool,
        lazy: bool,
    ) -> Result<RootfsRemoved, AgentError> {
        let _ops = self.container_ops.lock().await;
        let (info, own_target) = lock(&self.containers)
            .get(name)
            .map(|c| (c.info.clone(), c.own_target))
            .ok_or_else(|| AgentError::NoContainer(name.to_string()))?;
        let kept_upper = {
            let info = info.clone();
            tokio::task::spawn_blocking(move || remove_overlay(&info, own_target, keep, lazy))
                .await
                .map_err(|e| AgentError::Io {
                    context: "overlay task".into(),
                    source: std::io::Error::other(e),
                })??
        };
        lock(&self.containers).remove(name);
        self.save_table();
        match &kept_upper {
            Some(upper) => info!(
                container = %name,
                "container rootfs removed; its upper (the container's writes) is kept in {}",
                upper.display()
            ),
            None => info!(container = %name, "container rootfs removed"),
        }
        self.release_lower(&info.lower, lazy).await;
        self.touch(&info.manifest_digest);
        Ok(RootfsRemoved {
            name: name.to_string(),
            kept_upper,
        })
    }

    /// When no container uses the lower at `lower` any more: ends its recording (the start is
    /// over) and unmounts it after `mount.lower_linger`, unless a container comes meanwhile
    /// (with `lazy`, or no linger, at once). A busy lower (someone works in it directly) is left
    /// mounted, for a later umount or the agent's stop.
    async fn release_lower(self: &Arc<Self>, lower: &Path, lazy: bool) {
        if !self.lower_users(lower).is_empty() {
            return;
        }
        let Some(live) = lock(&self.mounts).get(lower).cloned() else {
            return;
        };
        let linger = self.config.mount.lower_linger;
        if lazy || linger.is_zero() {
            self.unmount_lower(lower, lazy).await;
            return;
        }
        self.save_recording(&live).await;
        let spell = self.next_idle.fetch_add(1, Ordering::Relaxed);
        lock(&self.idle_lowers).insert(lower.to_path_buf(), spell);
        let agent = self.clone();
        let lower = lower.to_path_buf();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let _ops = agent.container_ops.lock().await;
            let still_idle = {
                let mut idle = lock(&agent.idle_lowers);
                let mine = idle.get(&lower) == Some(&spell);
                if mine {
                    idle.remove(&lower);
                }
                mine && agent.lower_users(&lower).is_empty()
            };
            if still_idle {
                info!(lower = %lower.display(), "unmounting a lower no container used for {linger:?}");
                agent.unmount_lower(&lower, false).await;
            }
        });
    }

    /// Unmounts the lower at `lower` now.
    async fn unmount_lower(self: &Arc<Self>, lower: &Path, lazy: bool) {
        lock(&self.idle_lowers).remove(lower);
        let req = UmountRequest {
            mountpoint: lower.to_path_buf(),
            lazy,
        };
        match self.unmount_mount(req).await {
            Ok(()) => {
                let _ = std::fs::remove_dir(lower);
            }
            Err(e) => warn!(
                lower = %lower.display(),
                "no container uses this lower any more, but it cannot be unmounted yet; left mounted for lazyctl umount or the agent's stop: {e}"
            ),
        }
    }

    /// The image's OCI config JSON, verbatim (kept in `CACHE/configs` for remote images).
    pub async fn image_config(&self, image: &str) -> Result<Vec<u8>, AgentError> {
        let opened = self.open(image, false).await?;
        remote::read_config(
            &opened.location,
            &opened.manifest.config,
            opened.store.as_ref(),
            Some(&self.config.cache_dir),
        )
        .await
        .map_err(|source| AgentError::Config {
            image: image.to_string(),
            source,
        })
    }

    async fn forget_mount(&self, mountpoint: &Path, live: &Arc<LiveMount>) {
        live.stop_prefetch.store(true, Ordering::Relaxed);
        {
            let mut mounts = lock(&self.mounts);
            if mounts.get(mountpoint).is_some_and(|m| Arc::ptr_eq(m, live)) {
                mounts.remove(mountpoint);
            }
        }
        self.holder.remove(&handover::fd_name(live.id));
        self.save_table();
        self.touch(&live.opened.manifest_digest);
        self.save_recording(live).await;
    }

    /// Drops mounts whose FUSE session ended without the agent (`umount` run by hand).
    fn reap(self: &Arc<Self>) {
        let finished: Vec<(PathBuf, Arc<LiveMount>)> = lock(&self.mounts)
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
        let live = lock(&self.mounts)
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

    /// The image's profiles: the one merged here, the one beside the image, and what they cover.
    pub async fn profile_show(&self, image: &str) -> Result<ProfileReport, AgentError> {
        let opened = self.open(image, false).await?;
        self.profile_report(image, &opened, None).await
    }

    /// Pushes the runs recorded here (merged into the profile beside the image).
    pub async fn profile_push(&self, image: &str) -> Result<ProfileReport, AgentError> {
        let opened = self.open(image, false).await?;
        let to = self.push_pending(&opened).await?;
        if to.is_none() {
            return Err(AgentError::BadRequest(format!(
                "no runs of {image} were recorded here since the last push; mount it and run its workload first (lazyctl profile record MOUNTPOINT restarts a recording)"
            )));
        }
        self.profile_report(image, &opened, to).await
    }

    async fn profile_report(
        &self,
        image: &str,
        opened: &OpenedImage,
        pushed_to: Option<String>,
    ) -> Result<ProfileReport, AgentError> {
        let digest = &opened.manifest_digest;
        let local = profile::load_local(&self.profile_dir(), digest)?;
        let pending_runs = profile::load_local(&self.pending_dir(), digest)?.map_or(0, |p| p.runs);
        let (remote, remote_error) = match profile::fetch_profile(opened, &self.remote).await {
            Ok(p) => (p, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let chunks = opened
            .index
            .chunk_refs()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let image_bytes = chunks.iter().map(|c| u64::from(c.record.comp_len)).sum();
        let hot_bytes = local.as_ref().or(remote.as_ref()).map_or(0, |p| {
            p.chunks(&opened.index)
                .iter()
                .map(|c| u64::from(c.record.comp_len))
                .sum()
        });
        Ok(ProfileReport {
            image: image.to_string(),
            manifest_digest: digest.clone(),
            local,
            remote,
            remote_error,
            pending_runs,
            pushed_to,
            hot_bytes,
            image_bytes,
        })
    }

    /// The checks a warm request must pass before its event stream starts.
    pub fn check_warm(&self, req: &WarmRequest) -> Result<(), AgentError> {
        self.check_running()?;
        ImageLocation::parse(&req.image).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        Ok(())
    }

    /// Fetches an image (or, with `hot`, its profile's chunks) into the cache, sending
    /// progress events to `events`. Stops when the receiver is dropped (the client went away).
    pub async fn warm(self: &Arc<Self>, req: WarmRequest, events: mpsc::Sender<WarmEvent>) {
        let mut last = WarmProgress::default();
        if let Err(e) = self.warm_inner(&req, &events, &mut last).await {
            warn!(image = %req.image, "warm failed: {e}");
            let _ = events
                .send(WarmEvent::Failed {
                    error: e.to_string(),
                    progress: last,
                })
                .await;
        }
    }

    async fn warm_inner(
        self: &Arc<Self>,
        req: &WarmRequest,
        events: &mpsc::Sender<WarmEvent>,
        last: &mut WarmProgress,
    ) -> Result<(), AgentError> {
        self.check_running()?;
        let started = Instant::now();
        let opened = self.open(&req.image, true).await?;
        let chunks = if req.hot {
            let profile = match profile::load_local(&self.profile_dir(), &opened.manifest_digest)? {
                Some(p) => p,
                None => profile::fetch_profile(&opened, &self.remote)
                    .await?
                    .ok_or_else(|| {
                        AgentError::BadRequest(format!(
                            "{} has no profile (none recorded here, none beside the image); warm the whole image, or record one (lazyctl profile --help)",
                            req.image
                        ))
                    })?,
            };
            profile.chunks(&opened.index)
        } else {
            layout_order(&opened.index).map_err(|e| AgentError::BadRequest(e.to_string()))?
        };
        if opened.is_local() {
            // A local store is read in place; there is nothing to fetch.
            let stored: u64 = chunks.iter().map(|c| u64::from(c.record.comp_len)).sum();
            *last = WarmProgress {
                total_chunks: chunks.len() as u64,
                total_bytes: stored,
                cached_chunks: chunks.len() as u64,
                cached_bytes: stored,
                ..WarmProgress::default()
            };
            let _ = events
                .send(WarmEvent::Started {
                    manifest_digest: opened.manifest_digest.clone(),
                    progress: last.clone(),
                })
                .await;
        } else {
            *last = self.run_warm(req, &opened, chunks, events).await?;
        }
        self.touch(&opened.manifest_digest);
        let seconds = started.elapsed().as_secs_f64();
        info!(
            image = %req.image,
            fetched_bytes = last.fetched_bytes,
            cached_bytes = last.cached_bytes,
            "warmed {} ({} chunks) in {seconds:.1} s, {:.1} MB/s",
            if req.hot { "the hot set" } else { "the image" },
            last.total_chunks,
            last.fetched_bytes as f64 / seconds.max(1e-3) / 1e6
        );
        let _ = events
            .send(WarmEvent::Done {
                progress: last.clone(),
                seconds,
            })
            .await;
        Ok(())
    }

    async fn run_warm(
        self: &Arc<Self>,
        req: &WarmRequest,
        opened: &OpenedImage,
        chunks: Vec<fusefs::ChunkRef>,
        events: &mpsc::Sender<WarmEvent>,
    ) -> Result<WarmProgress, AgentError> {
        let backend = self.fetcher.backend(opened.store.clone());
        let id = self.next_warm.fetch_add(1, Ordering::Relaxed);
        lock(&self.warms).insert(
            id,
            RunningWarm {
                image: req.image.clone(),
                hot: req.hot,
                started: Instant::now(),
                progress: WarmProgress::default(),
            },
        );
        let agent = self.clone();
        let events = events.clone();
        let digest = opened.manifest_digest.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut started = false;
            let mut last_report: Option<Instant> = None;
            let mut report = |p: &WarmProgress| -> bool {
                if let Some(w) = lock(&agent.warms).get_mut(&id) {
                    w.progress = p.clone();
                }
                let event = if !started {
                    started = true;
                    WarmEvent::Started {
                        manifest_digest: digest.clone(),
                        progress: p.clone(),
                    }
                } else if last_report.is_some_and(|t| t.elapsed() < WARM_REPORT_INTERVAL) {
                    return !events.is_closed();
                } else {
                    WarmEvent::Progress {
                        progress: p.clone(),
                    }
                };
                last_report = Some(Instant::now());
                events.blocking_send(event).is_ok()
            };
            let result =
                agent
                    .fetcher
                    .warm(&backend, &chunks, &WarmOptions::default(), &mut report);
            lock(&agent.warms).remove(&id);
            result
        })
        .await
        .map_err(|e| AgentError::Io {
            context: "warm task".into(),
            source: std::io::Error::other(e),
        })?;
        Ok(outcome?)
    }

    /// Forgets images unused for `unused_for_secs` (never a mounted one), drops their kept
    /// manifests and indexes, and removes every cached chunk no remembered image references.
    pub async fn gc(self: &Arc<Self>, req: GcRequest) -> Result<GcReport, AgentError> {
        self.reap();
        let now = unix_now();
        let mounted: Vec<Arc<LiveMount>> = lock(&self.mounts).values().cloned().collect();
        let mounted_digests: HashSet<&str> = mounted
            .iter()
            .map(|m| m.opened.manifest_digest.as_str())
            .collect();
        let mut forgotten = Vec::new();
        let kept: Vec<KnownImage> = {
            let mut images = lock(&self.images);
            images.retain(|img| {
                let stale = !mounted_digests.contains(img.manifest_digest.as_str())
                    && req
                        .unused_for_secs
                        .is_some_and(|d| now.saturating_sub(img.last_used) >= d);
                if stale {
                    forgotten.push(img.location.clone());
                }
                !stale
            });
            images.clone()
        };
        let index_dir = self.config.cache_dir.join(remote::INDEX_DIR);
        let mut live_chunks: HashSet<[u8; 32]> = HashSet::new();
        let mut wanted_indexes: HashSet<String> = HashSet::new();
        for m in &mounted {
            wanted_indexes.insert(m.opened.manifest.index().digest.replace(':', "-"));
            add_chunks(&m.opened.index, &mut live_chunks);
        }
        let mut unusable = Vec::new();
        for img in &kept {
            let name = img.index_digest.replace(':', "-");
            if !wanted_indexes.insert(name.clone()) {
                continue;
            }
            match Index::open(&index_dir.join(&name)) {
                Ok(index) => add_chunks(&index, &mut live_chunks),
                Err(e) => {
                    warn!(image = %img.location, "kept index unusable, forgetting the image: {e}");
                    unusable.push(img.manifest_digest.clone());
                    forgotten.push(img.location.clone());
                    wanted_indexes.remove(&name);
                }
            }
        }
        if !unusable.is_empty() {
            lock(&self.images).retain(|i| !unusable.contains(&i.manifest_digest));
        }
        self.save_images();
        let removed_indexes = remove_unwanted(&index_dir, &wanted_indexes);
        let wanted_manifests: HashSet<String> = lock(&self.images)
            .iter()
            .filter_map(|i| ImageLocation::parse(&i.location).ok())
            .map(|l| remote::kept_manifest_name(&l))
            .collect();
        remove_unwanted(
            &self.config.cache_dir.join(remote::MANIFEST_DIR),
            &wanted_manifests,
        );
        let cache = self.cache.clone();
        let report = tokio::task::spawn_blocking(move || {
            cache.retain(&|digest: &[u8; 32]| live_chunks.contains(digest))
        })
        .await
        .map_err(|e| AgentError::Io {
            context: "gc task".into(),
            source: std::io::Error::other(e),
        })??;
        info!(
            forgotten = forgotten.len(),
            removed_indexes,
            removed_chunks = report.removed_chunks,
            freed_bytes = report.freed_bytes,
            "garbage collected"
        );
        Ok(GcReport {
            forgotten_images: forgotten,
            removed_indexes,
            cache: report,
        })
    }

    pub fn status(self: &Arc<Self>) -> Status {
        self.reap();
        let mounts = lock(&self.mounts)
            .iter()
            .map(|(path, live)| live.info(path))
            .collect();
        let warms = lock(&self.warms)
            .values()
            .map(|w| WarmInfo {
                image: w.image.clone(),
                hot: w.hot,
                running_secs: w.started.elapsed().as_secs_f64(),
                progress: w.progress.clone(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            supervisor_pid: match self.holder {
                Holder::Supervisor { pid } => Some(pid),
                _ => None,
            },
            holder: self.holder.name().to_string(),
            restarts: self.restarts.load(Ordering::Relaxed),
            binary: std::env::current_exe().unwrap_or_default(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            cache_dir: self.config.cache_dir.clone(),
            shutting_down: self.shutting_down.load(Ordering::Relaxed),
            mounts,
            warms,
            containers: lock(&self.containers)
                .values()
                .map(|c| c.info.clone())
                .collect(),
            images: lock(&self.images).clone(),
            metrics: self.metrics(),
        }
    }

    /// The fetcher's and cache's counters with the FUSE requests of every mount.
    fn metrics(&self) -> MetricsSnapshot {
        let mut metrics = self.fetcher.snapshot();
        metrics.fuse.ops = self.fuse_stats.snapshot();
        metrics
    }

    /// The Prometheus text of `GET /metrics`: the fetcher's counters plus the agent's own
    /// gauges.
    pub fn prometheus(&self) -> String {
        let mut text = self.metrics().prometheus();
        let mounts = lock(&self.mounts).len();
        let warms = lock(&self.warms).len();
        for (name, help, value) in [
            (
                crate::metrics::MOUNTS,
                "FUSE mounts served by this agent.",
                mounts as f64,
            ),
            (crate::metrics::WARMS, "Warms in progress.", warms as f64),
            (
                crate::metrics::UPTIME,
                "Seconds since the agent started.",
                self.started.elapsed().as_secs_f64(),
            ),
        ] {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        text
    }

    /// Refuses new mounts and warms from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Unmounts every mount that is not in use (with `force`, detaches them all); returns the
    /// mountpoints still mounted because they are busy.
    ///
    /// Containers' overlays go first, keeping their upper dirs (a container's writes are not
    /// thrown away by a restart of the agent); a lower stays while an overlay still uses it.
    pub async fn unmount_all(self: &Arc<Self>, force: bool) -> Vec<PathBuf> {
        let containers: Vec<(String, PathBuf)> = lock(&self.containers)
            .values()
            .map(|c| (c.info.name.clone(), c.info.rootfs.clone()))
            .collect();
        let mut busy = Vec::new();
        for (name, rootfs) in containers {
            match self.remove_container(&name, true, force).await {
                Ok(_) | Err(AgentError::NoContainer(_)) => {}
                Err(AgentError::Busy { path }) => busy.push(path),
                Err(e) => {
                    error!(container = %name, "cannot unmount the container's rootfs: {e}");
                    busy.push(rootfs);
                }
            }
        }
        let paths: Vec<PathBuf> = lock(&self.mounts).keys().cloned().collect();
        for mountpoint in paths {
            let req = UmountRequest {
                mountpoint: mountpoint.clone(),
                lazy: force,
            };
            match self.umount(req).await {
                // A lower of a busy container goes with the container.
                Ok(()) | Err(AgentError::NotMounted(_)) | Err(AgentError::LowerInUse { .. }) => {}
                Err(AgentError::Busy { path }) => busy.push(path),
                Err(e) => {
                    error!(mountpoint = %mountpoint.display(), "cannot unmount: {e}");
                    busy.push(mountpoint);
                }
            }
        }
        busy
    }

    pub fn holder(&self) -> Holder {
        self.holder
    }

    /// Writes the mount table (`STATE/mounts.json`) from the live mounts and containers.
    fn save_table(&self) {
        let _writing = lock(&self.table_lock);
        let table = MountTable {
            next_id: self.next_mount.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            mounts: lock(&self.mounts)
                .iter()
                .map(|(path, live)| live.kept(path))
                .collect(),
            containers: lock(&self.containers)
                .values()
                .map(|c| KeptContainer {
                    info: c.info.clone(),
                    own_target: c.own_target,
                })
                .collect(),
        };
        if let Err(e) = table.save(&self.config.state_dir) {
            error!("cannot write the mount table; a restart of lazyd would lose its mounts: {e}");
        }
    }

    /// At start: serves again the mounts of the mount table whose FUSE descriptors the holder
    /// handed back (`fds`, by name), and restores the containers on them. A mount of the table
    /// whose descriptor did not come back (the holder died too, a reboot) is dead: it is
    /// detached, with a log line naming it, so that its path can be mounted again; so is a
    /// container overlay over one. Descriptors no mount claims are closed.
    pub async fn adopt(self: &Arc<Self>, mut fds: HashMap<String, OwnedFd>) {
        let table = MountTable::load(&self.config.state_dir);
        self.next_mount.store(table.next_id, Ordering::Relaxed);
        let handed = !fds.is_empty();
        let restarts = table.restarts + u64::from(handed);
        self.restarts.store(restarts, Ordering::Relaxed);
        let mut served = 0;
        for kept in table.mounts {
            let path = kept.mountpoint.clone();
            let fd = fds.remove(&handover::fd_name(kept.id));
            let fs_type = mount::fs_type_at(&path);
            match (fd, fs_type.as_deref()) {
                (Some(fd), Some(mount::FUSE_TYPE)) => match self.adopt_one(kept, fd).await {
                    Ok(resent) => {
                        served += 1;
                        info!(mountpoint = %path.display(), resent, "serving the mount again");
                    }
                    Err(e) => {
                        error!(mountpoint = %path.display(), "cannot serve the mount again, detaching it: {}", error_chain(&e));
                        detach_dead(&path, "its image cannot be opened again");
                    }
                },
                (Some(_), _) => {
                    info!(mountpoint = %path.display(), "the mount was unmounted while lazyd was down; forgetting it");
                }
                (None, Some(mount::FUSE_TYPE)) if mount::is_dead_fuse_mount(&path) => {
                    detach_dead(&path, "its FUSE connection did not survive (the fd holder stopped too, or the host rebooted)");
                }
                (None, Some(mount::FUSE_TYPE)) => {
                    warn!(mountpoint = %path.display(), "a live mount no descriptor came back for (not this lazyd's any more?); left alone");
                }
                (None, _) => {}
            }
        }
        for (name, _) in fds.drain() {
            warn!(
                name,
                "closing a handed-over descriptor no mount of the table names"
            );
            self.holder.remove(&name);
        }
        for kept in table.containers {
            let name = kept.info.name.clone();
            let rootfs = kept.info.rootfs.clone();
            let lower_served = lock(&self.mounts).contains_key(&kept.info.lower);
            let overlay = mount::fs_type_at(&rootfs).as_deref() == Some("overlay");
            if lower_served && overlay {
                lock(&self.containers).insert(
                    name,
                    Container {
                        info: kept.info,
                        own_target: kept.own_target,
                    },
                );
            } else if overlay {
                detach_dead(&rootfs, &format!("the root filesystem of container {name} lost its lower mount; its writes stay in {}", kept.info.upper.display()));
            }
        }
        self.save_table();
        if handed || served > 0 {
            info!(
                mounts = served,
                "took over the mounts of the previous lazyd"
            );
        }
        // Lowers no container uses any more linger and go, as they would have.
        let lowers: Vec<PathBuf> = lock(&self.mounts)
            .keys()
            .filter(|p| p.starts_with(self.lower_root()))
            .cloned()
            .collect();
        for lower in lowers {
            self.release_lower(&lower, false).await;
        }
    }

    /// Serves one handed-over mount again; returns whether the kernel resent the requests the
    /// previous lazyd had not answered.
    async fn adopt_one(self: &Arc<Self>, kept: KeptMount, fd: OwnedFd) -> Result<bool, AgentError> {
        let location =
            ImageLocation::parse(&kept.image).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let opened = remote::open_pinned(
            &location,
            kept.manifest.clone(),
            kept.manifest_digest.clone(),
            &self.remote,
            Some(&self.config.cache_dir),
        )
        .await
        .map_err(|source| AgentError::Open {
            image: kept.image.clone(),
            source,
        })?;
        let connection = Connection {
            fd,
            proto: kept.proto,
        };
        let (image, path) = (kept.image.clone(), kept.mountpoint.clone());
        let live = self
            .serve(
                &image,
                opened,
                &path,
                Serve::Adopt(Box::new(kept), connection),
            )
            .await?;
        let resent = lock(&live.session).as_ref().is_some_and(|s| s.resent);
        Ok(resent)
    }

    /// Asks the supervisor to replace lazyd by `binary` (by default the binary it was started
    /// from); this server then hands over ([`Agent::upgrade_requested`]).
    pub fn request_upgrade(
        &self,
        binary: Option<PathBuf>,
    ) -> Result<crate::api::UpgradeStarted, AgentError> {
        self.check_running()?;
        match self.holder {
            Holder::Supervisor { .. } => {}
            Holder::Systemd => {
                return Err(AgentError::Conflict(
                    "lazyd runs under systemd: install the new binary where the unit's ExecStart= names it and run `systemctl restart lazyd`; systemd keeps the mounts meanwhile".into(),
                ))
            }
            Holder::None => {
                return Err(AgentError::Conflict(
                    "lazyd runs without a supervisor (--no-supervisor): replacing it would end its mounts".into(),
                ))
            }
        }
        let target = match &binary {
            Some(path) => {
                let path = absolute(path)?;
                handover::upgrade_target(&path).map_err(AgentError::BadRequest)?;
                path.display().to_string()
            }
            None => String::new(),
        };
        let message = format!("X_LAZYD_UPGRADE={target}");
        sd_notify::notify(false, &[sd_notify::NotifyState::Custom(&message)])
            .map_err(AgentError::io("asking the supervisor for the upgrade"))?;
        self.upgrade.notify_one();
        Ok(crate::api::UpgradeStarted {
            pid: std::process::id(),
        })
    }

    /// Resolves when an upgrade was asked for through the API.
    pub async fn upgrade_requested(&self) {
        self.upgrade.notified().await;
    }

    /// Stops serving without unmounting: the holder keeps every mount's descriptor for the next
    /// lazyd, which serves them from the mount table written here. Requests read and not
    /// answered yet are resent to it by the kernel (6.9+).
    pub fn hand_over(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.save_table();
        info!(
            mounts = lock(&self.mounts).len(),
            containers = lock(&self.containers).len(),
            "handing the mounts over to the next lazyd (the {} keeps their descriptors)",
            self.holder.name()
        );
    }

    fn profile_dir(&self) -> PathBuf {
        self.config.state_dir.join("profiles")
    }

    fn pending_dir(&self) -> PathBuf {
        self.config.state_dir.join("profiles").join("pending")
    }

    /// Records that the agent uses `opened`, for `gc`.
    fn remember(&self, location: &str, opened: &OpenedImage) {
        // A local store keeps its own index; gc cannot reopen it from the cache, so chunks a
        // `dir:` image with referenced S3 objects fetched are kept only while it is mounted.
        if let ImageLocation::Dir { .. } = opened.location {
            return;
        }
        {
            let mut images = lock(&self.images);
            let entry = KnownImage {
                location: location.to_string(),
                manifest_digest: opened.manifest_digest.clone(),
                index_digest: opened.manifest.index().digest.clone(),
                last_used: unix_now(),
            };
            match images.iter_mut().find(|i| i.location == location) {
                Some(old) => *old = entry,
                None => images.push(entry),
            }
        }
        self.save_images();
    }

    fn touch(&self, manifest_digest: &str) {
        {
            let mut images = lock(&self.images);
            for img in images
                .iter_mut()
                .filter(|i| i.manifest_digest == manifest_digest)
            {
                img.last_used = unix_now();
            }
        }
        self.save_images();
    }

    fn save_images(&self) {
        let path = self.config.state_dir.join(IMAGES_FILE);
        let bytes = match serde_json::to_vec_pretty(&*lock(&self.images)) {
            Ok(b) => b,
            Err(e) => {
                error!("cannot encode the image list: {e}");
                return;
            }
        };
        if let Err(e) = crate::store::write_atomic(&self.config.state_dir, &path, &bytes) {
            error!("cannot save the image list: {e}");
        }
    }
}

/// The images the agent has opened, in the state directory.
const IMAGES_FILE: &str = "images.json";
/// In the state directory: the shared lower mounts of containers, by manifest digest.
const LOWER_DIR: &str = "lower";
/// In the state directory: one directory per container (upper, work, rootfs, bundle).
const CONTAINERS_DIR: &str = "containers";

/// A random 12-hex-digit container name.
fn random_name() -> Result<String, AgentError> {
    use std::io::Read;
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(AgentError::io("reading /dev/urandom"))?;
    Ok(hex::encode(bytes))
}

/// Creates a container's directory (`dir`: upper, work, and the default target `rootfs`) and
/// mounts its overlay over `lower` at `target` or `dir/rootfs`; on failure removes what it
/// created. Returns (rootfs, upper, work).
fn make_overlay(
    dir: &Path,
    lower: &Path,
    target: Option<&Path>,
) -> Result<(PathBuf, PathBuf, PathBuf), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let parent = dir.parent().unwrap_or(Path::new("/"));
    // Containers' writes (a setuid shell their root made, say) must not be reachable from the
    // host by any other user: neither the containers' directory nor theirs let anyone through.
    crate::create_private_dir(parent)
        .map_err(AgentError::io(format!("creating {}", parent.display())))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(AgentError::io(format!("creating {}", dir.display())))?;
    let upper = dir.join("upper");
    let work = dir.join("work");
    let rootfs = target.map_or_else(|| dir.join("rootfs"), Path::to_path_buf);
    let made = (|| -> Result<(), AgentError> {
        for d in [&upper, &work] {
            std::fs::create_dir(d).map_err(AgentError::io(format!("creating {}", d.display())))?;
        }
        if target.is_none() {
            std::fs::create_dir(&rootfs)
                .map_err(AgentError::io(format!("creating {}", rootfs.display())))?;
        }
        // The overlay's root takes the upper dir's owner and mode: make them the image's.
        let root = std::fs::metadata(lower)
            .map_err(AgentError::io(format!("reading {}", lower.display())))?;
        std::os::unix::fs::chown(&upper, Some(root.uid()), Some(root.gid()))
            .map_err(AgentError::io(format!("chown {}", upper.display())))?;
        std::fs::set_permissions(
            &upper,
            std::fs::Permissions::from_mode(root.mode() & 0o7777),
        )
        .map_err(AgentError::io(format!(
            "setting the mode of {}",
            upper.display()
        )))?;
        mount::mount_overlay(lower, &upper, &work, &rootfs)?;
        Ok(())
    })();
    if let Err(e) = made {
        if let Err(rm) = std::fs::remove_dir_all(dir) {
            warn!(dir = %dir.display(), "cannot clean up after a failed overlay: {rm}");
        }
        return Err(e);
    }
    Ok((rootfs, upper, work))
}

/// Unmounts a container's overlay and, unless `keep`, deletes its directory (a target the
/// caller chose is left). Returns the upper dir when it was kept.
fn remove_overlay(
    info: &RootfsInfo,
    own_target: bool,
    keep: bool,
    lazy: bool,
) -> Result<Option<PathBuf>, AgentError> {
    match mount::unmount(&info.rootfs, lazy) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(AgentError::Busy {
                path: info.rootfs.clone(),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            warn!(rootfs = %info.rootfs.display(), "the overlay was already unmounted (outside lazyd)");
        }
        Err(e) => {
            return Err(AgentError::io(format!(
                "unmounting {}",
                info.rootfs.display()
            ))(e))
        }
    }
    if keep {
        return Ok(Some(info.upper.clone()));
    }
    if !own_target && mount::is_mount_point(&info.rootfs) {
        // Something else was mounted there since; never delete through a mount.
        warn!(rootfs = %info.rootfs.display(), "still a mount point after unmounting the overlay; leaving {}", info.dir.display());
        return Ok(None);
    }
    if let Err(e) = std::fs::remove_dir_all(&info.dir) {
        warn!(dir = %info.dir.display(), "cannot delete the container's directory: {e}");
    }
    Ok(None)
}

/// Every chunk of `index` in blob and offset order (the layout order): neighbours coalesce into
/// long range requests.
fn layout_order(index: &Index) -> Result<Vec<fusefs::ChunkRef>, fusefs::IndexError> {
    let mut all = index.chunk_refs()?;
    all.sort_by(|a, b| {
        (&a.blob_digest, a.record.comp_off).cmp(&(&b.blob_digest, b.record.comp_off))
    });
    Ok(all)
}

fn load_images(path: &Path) -> Vec<KnownImage> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), "image list unreadable, starting a new one: {e}");
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!(path = %path.display(), "image list unreadable, starting a new one: {e}");
            Vec::new()
        }
    }
}

fn add_chunks(index: &Index, into: &mut HashSet<[u8; 32]>) {
    for i in 0..index.chunk_count() as u32 {
        if let Ok(c) = index.chunk(i) {
            into.insert(c.digest);
        }
    }
}

/// Deletes the files of `dir` whose names are not in `wanted`; returns how many.
fn remove_unwanted(dir: &Path, wanted: &HashSet<String>) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn absolute(path: &Path) -> Result<PathBuf, AgentError> {
    if !path.is_absolute() {
        return Err(AgentError::BadRequest(format!(
            "mountpoint {} must be an absolute path",
            path.display()
        )));
    }
    Ok(path.to_path_buf())
}

/// Detaches the dead mount at `path`, saying why.
fn detach_dead(path: &Path, why: &str) {
    match mount::unmount(path, true) {
        Ok(()) => warn!(mountpoint = %path.display(), "detached a dead mount: {why}"),
        Err(e) => error!(mountpoint = %path.display(), "cannot detach a dead mount ({why}): {e}"),
    }
}

fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn unix_now() -> u64 {
    unix_now_f64() as u64
}
