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
//! and by its *holders* (`POST /v1/lower`: a containerd snapshotter that mounts overlays of its
//! own over it), and unmounted with the last of them. Creating and removing containers and
//! holders is serialised, so a lower is never mounted twice nor unmounted under a container or
//! holder being created.
//!
//! State that must survive a restart is small and lives in files: the images the agent has
//! opened (`STATE/images.json`, used by `gc`), kept manifests and indexes in the cache directory
//! (so a warmed image mounts with its backend down), profiles, and the mount table
//! (`STATE/mounts.json`, [`crate::handover`]). Mounts survive the process when a holder keeps
//! their FUSE descriptors (systemd or lazyd's supervisor): the next agent serves them again
//! ([`Agent::adopt`]). Without one, SIGTERM unmounts what is idle and keeps serving what is in
//! use until it is released (see `lazyd` and docs/OPERATIONS.md).
//!
//! ## Layout
//!
//! [`Agent`] (here) holds the parts' state, each part's in a struct of the part's own file, and
//! what they share: the config, the fetcher and cache, the streams, the FUSE counters and the
//! images opened lately (`Agent::open`, reused for `fetch.resolve_ttl`). Each part adds its
//! requests to `Agent` in an `impl Agent` block of its file:
//!
//! - `mounts`: the live mounts and the mountpoints being mounted (`Mounts`); mount,
//!   serve, umount, reap, record. Serving a mount starts its recording (`profiles`) and its
//!   prefetch (`warm`).
//! - `containers`: containers' root filesystems, the lowers' holders, the lock that serialises
//!   their changes and the lingering lowers (`Containers`); the overlays and `STATE/lower`,
//!   `STATE/containers`. A lower is a mount of `mounts`, served and unmounted through it.
//! - `warm`: running warms (`Warms`), and a new mount's prefetch of its hot set or
//!   whole image, which are warms too.
//! - `profiles`: recording a mount's first reads into the image's profile, pushing it, showing
//!   it (`STATE/profiles`); no state of its own beyond the files and each mount's recorder.
//! - `images`: the images the agent has opened (`KnownImages`, `STATE/images.json`),
//!   which every part touches when it uses one.
//! - `gc`: forgetting unused images and removing the chunks no remembered image references.
//! - `handover`: the mount table (`STATE/mounts.json`), the fd holder and the numbering it
//!   carries (`HandOver`); serving the mounts of a predecessor, and handing over to
//!   a successor. The holder and the table's format are [`crate::handover`]'s.
//!
//! Who calls whom: `mounts` calls `profiles` (the recording, the profile to prefetch) and
//! `warm` (the prefetch) when it serves a mount; `containers` mounts and unmounts its lowers
//! through `mounts`, which hands an umount of a container's target or lower back to
//! `containers`; `handover` serves adopted mounts through `mounts` and releases idle lowers
//! through `containers`; `gc` reads `mounts` and `images`. Every part touches `images` when it
//! uses an image, and `mounts` and `containers` call `handover::save_table` after each change.
//!
//! Locks: each part's mutexes guard its own state, mostly for single statements. Held
//! together, always in this order: the mount table's writer lock, then the mounts' or the
//! containers' (`HandOver`, while the table is written); the mounts', then one mount's own
//! (`LiveMount::info`, `LiveMount::is_finished`); the lingering lowers', then the containers'.
//! Only the containers' lock (`Containers::serialise`, a tokio mutex) is held across an
//! `.await`: creating and removing containers and holders, and unmounting a lower, take their
//! turns.

mod containers;
mod gc;
mod handover;
mod images;
mod mounts;
mod profiles;
mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fusefs::ops::OpStats;
use thiserror::Error;
use tracing::{error, warn};

use crate::api::{Status, UmountRequest};
use crate::cache::{CacheConfig, CacheError, ChunkCache};
use crate::config::AgentConfig;
use crate::error::error_chain;
use crate::fetcher::{Fetcher, RateLimit, WarmError};
use crate::handover::Holder;
use crate::metrics::MetricsSnapshot;
use crate::mount::MountError;
use crate::profile::ProfileError;
use crate::remote::{self, ImageLocation, OpenedImage, RemoteError, RemoteOptions};
use crate::stream::Streams;
use crate::sync::lock;

use containers::Containers;
pub use containers::LowerUsers;
use handover::HandOver;
use images::KnownImages;
use mounts::Mounts;
use warm::Warms;

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
    #[error("no lower holder named {0:?} (lower_holders in lazyctl status --json lists them)")]
    NoHolder(String),
    #[error("{path} is the shared read-only lower of {users}; it is unmounted when the last of them is gone (lazyctl umount ROOTFS removes a container, POST /v1/lower/release releases a holder)")]
    LowerInUse { path: PathBuf, users: LowerUsers },
    #[error("lazyd is shutting down")]
    ShuttingDown,
    /// A configuration that [`AgentConfig::parse`] refuses, built some other way.
    #[error("bad configuration: {0}")]
    BadConfig(String),
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

pub struct Agent {
    config: AgentConfig,
    remote: RemoteOptions,
    fetcher: Arc<Fetcher>,
    cache: Arc<ChunkCache>,
    background_limit: Option<Arc<RateLimit>>,
    /// Streams of safetensors files, shared by every mount so they share the link fairly.
    streams: Arc<Streams>,
    shutting_down: AtomicBool,
    started: Instant,
    /// The FUSE requests of every mount of this agent.
    fuse_stats: Arc<OpStats>,
    /// Images opened from a registry or S3 lately, by the location asked for, and when:
    /// reused for `fetch.resolve_ttl` without asking the backend.
    opened: Mutex<HashMap<String, (OpenedImage, Instant)>>,
    mounts: Mounts,
    containers: Containers,
    warms: Warms,
    images: KnownImages,
    handover: HandOver,
}

/// How long a starting agent waits for the cache's lock, which a predecessor that is exiting
/// may still hold.
const CACHE_LOCK_WAIT: Duration = Duration::from_secs(3);

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
        let images = KnownImages::load(&config.state_dir);
        let background_limit =
            (config.background.bandwidth > 0).then(|| RateLimit::new(config.background.bandwidth));
        Ok(Arc::new(Agent {
            remote: config.remote().map_err(AgentError::BadConfig)?,
            config,
            fetcher,
            cache,
            background_limit,
            streams,
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            fuse_stats: Arc::new(OpStats::default()),
            opened: Mutex::new(HashMap::new()),
            mounts: Mounts::default(),
            containers: Containers::default(),
            warms: Warms::default(),
            images,
            handover: HandOver::new(holder),
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
                self.remember_opened(image, &opened);
                opened
            }
        };
        if remember {
            self.images.remember(image, &opened);
        }
        Ok(opened)
    }

    /// Keeps `opened` as what `image` opens to for `fetch.resolve_ttl`. A local store is read
    /// in place: opening it again costs no round trip, so it is not kept.
    fn remember_opened(&self, image: &str, opened: &OpenedImage) {
        let ttl = self.config.fetch.resolve_ttl;
        if ttl.is_zero() || matches!(opened.location, ImageLocation::Dir { .. }) {
            return;
        }
        let mut recent = lock(&self.opened);
        recent.retain(|_, (_, at)| at.elapsed() < ttl);
        recent.insert(image.to_string(), (opened.clone(), Instant::now()));
    }

    pub fn status(self: &Arc<Self>) -> Status {
        self.reap();
        let mounts = self.mounts.infos();
        let warms = self.warms.infos();
        let holder = self.handover.holder();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            supervisor_pid: match holder {
                Holder::Supervisor { pid } => Some(pid),
                _ => None,
            },
            holder: holder.name().to_string(),
            restarts: self.handover.restarts(),
            binary: std::env::current_exe().unwrap_or_default(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            cache_dir: self.config.cache_dir.clone(),
            shutting_down: self.shutting_down.load(Ordering::Relaxed),
            mounts,
            warms,
            containers: self.containers.infos(),
            lower_holders: self.containers.holders(),
            images: self.images.list(),
            metrics: self.metrics(),
        }
    }

    /// The fetcher's and cache's counters with the FUSE requests of every mount and the
    /// mirrors' health and traffic.
    fn metrics(&self) -> MetricsSnapshot {
        let mut metrics = self.fetcher.snapshot();
        metrics.fuse.ops = self.fuse_stats.snapshot();
        (metrics.mirrors, metrics.origins) = self.remote.mirrors.snapshot();
        metrics
    }

    /// The Prometheus text of `GET /metrics`: the fetcher's counters plus the agent's own
    /// gauges.
    pub fn prometheus(&self) -> String {
        let mut text = self.metrics().prometheus();
        let mounts = self.mounts.len();
        let warms = self.warms.len();
        let holders = self.containers.holder_count();
        for (name, help, value) in [
            (
                crate::metrics::MOUNTS,
                "FUSE mounts served by this agent.",
                mounts as f64,
            ),
            (crate::metrics::WARMS, "Warms in progress.", warms as f64),
            (
                crate::metrics::LOWER_HOLDERS,
                "Holders of shared lowers (POST /v1/lower).",
                holders as f64,
            ),
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
    /// thrown away by a restart of the agent); a lower stays while an overlay still uses it. A
    /// lower only holders use is unmounted like any mount (busy while the holder's overlay is
    /// on it); the holders stay in the mount table, and their next request mounts it again.
    pub async fn unmount_all(self: &Arc<Self>, force: bool) -> Vec<PathBuf> {
        let containers = self.containers.rootfs_by_name();
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
        let paths = self.mounts.paths();
        for mountpoint in paths {
            let req = UmountRequest {
                mountpoint: mountpoint.clone(),
                lazy: force,
            };
            let held_only = mountpoint.starts_with(self.lower_root())
                && self
                    .containers
                    .lower_users(&mountpoint)
                    .containers
                    .is_empty();
            let unmounted = if held_only {
                let _ops = self.containers.serialise().await;
                self.unmount_mount(req).await
            } else {
                self.umount(req).await
            };
            match unmounted {
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

fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn unix_now() -> u64 {
    unix_now_f64() as u64
}
