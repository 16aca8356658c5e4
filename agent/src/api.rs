//! The control API's messages: HTTP/1.1 with JSON bodies on lazyd's unix socket, shared by the
//! server (`daemon::serve`) and the client (`client`, lazyctl's) so the two cannot drift.
//! docs/API.md describes every route with examples.
//!
//! Errors are a JSON body `{"error": "..."}` with a status that says whose fault it was: 400 a
//! bad request, 404 no such mount, container or lower holder, 409 a conflict (mountpoint in use
//! or busy, name taken), 502 the backend failed, 503 the agent is shutting down, 504 the image
//! did not open in time, 500 anything else.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cache::RetainReport;
use crate::fetcher::WarmProgress;
use crate::metrics::MetricsSnapshot;
use crate::profile::Profile;

/// Version prefix of every route but `/metrics`.
pub const PREFIX: &str = "/v1";

/// `POST /v1/mounts`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRequest {
    /// `dir:PATH[:TAG]`, `docker://HOST/REPO:TAG`, `HOST/REPO:TAG` or `s3://BUCKET/PREFIX`.
    pub image: String,
    /// An existing, empty directory.
    pub mountpoint: PathBuf,
    /// Overrides the config's `mount.allow_other`.
    #[serde(default)]
    pub allow_other: Option<bool>,
    /// Honour setuid/setgid bits and file capabilities (the mount is `nosuid` otherwise).
    #[serde(default)]
    pub suid: bool,
}

/// `POST /v1/umount`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UmountRequest {
    pub mountpoint: PathBuf,
    /// Detach even while files are open (`umount -l`).
    #[serde(default)]
    pub lazy: bool,
}

/// `POST /v1/upgrade`: replace the running lazyd (supervisor and server) by a binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// The new lazyd; by default the binary lazyd was started from (replaced by a package
    /// upgrade).
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// The answer to `POST /v1/upgrade`: the server that hands over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeStarted {
    pub pid: u32,
}

/// A live mount, as `status` and `mount` report it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub image: String,
    pub manifest_digest: String,
    pub files: u64,
    /// Seconds since the image was mounted here, across restarts of lazyd.
    pub mounted_secs: f64,
    /// Restarts of lazyd (crashes, restarts, upgrades) the mount was served across.
    #[serde(default)]
    pub restarts_survived: u32,
    /// File bytes read through the mount (since lazyd last started).
    pub bytes_served: u64,
    pub profile: MountProfile,
}

/// What a mount does with hot-chunk profiles.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountProfile {
    /// Still recording first accesses.
    pub recording: bool,
    /// Chunks recorded so far in this mount's recording.
    pub recorded_chunks: u64,
    /// Chunks of the profile queued for prefetch after mounting (0: no profile).
    pub prefetch_chunks: u64,
    /// Where that profile came from (`local`, or the image's location).
    pub prefetch_source: Option<String>,
    /// Chunks of the whole image queued for background prefetch after mounting
    /// (`background.whole_image`; 0: none).
    #[serde(default)]
    pub whole_image_chunks: u64,
}

/// `POST /v1/warm`: the response is a stream of [`WarmEvent`]s, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmRequest {
    pub image: String,
    /// Only the chunks of the image's profile (its hot set).
    #[serde(default)]
    pub hot: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WarmEvent {
    /// The image was opened; `progress` has the totals and what is cached already.
    Started {
        manifest_digest: String,
        progress: WarmProgress,
    },
    Progress {
        progress: WarmProgress,
    },
    Done {
        progress: WarmProgress,
        seconds: f64,
    },
    Failed {
        error: String,
        progress: WarmProgress,
    },
}

/// A warm in progress, as `status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmInfo {
    pub image: String,
    pub hot: bool,
    pub running_secs: f64,
    pub progress: WarmProgress,
}

/// `GET /v1/status`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The serving lazyd's pid.
    pub pid: u32,
    /// The supervisor's pid, when lazyd runs under its own supervisor.
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    /// Who keeps the mounts' FUSE descriptors across restarts: `systemd`, `supervisor`, or
    /// `none` (the mounts end with this process).
    #[serde(default)]
    pub holder: String,
    /// Times lazyd started again and took over the mounts of the one before.
    #[serde(default)]
    pub restarts: u64,
    /// The running binary.
    #[serde(default)]
    pub binary: PathBuf,
    pub uptime_secs: f64,
    pub cache_dir: PathBuf,
    pub shutting_down: bool,
    pub mounts: Vec<MountInfo>,
    pub warms: Vec<WarmInfo>,
    /// Containers' root filesystems (`POST /v1/rootfs`); their shared lowers are in `mounts`.
    #[serde(default)]
    pub containers: Vec<RootfsInfo>,
    /// Holders of shared lowers (`POST /v1/lower`); the lowers mounted now are in `mounts`.
    #[serde(default)]
    pub lower_holders: Vec<LowerInfo>,
    pub images: Vec<KnownImage>,
    pub metrics: MetricsSnapshot,
}

/// An image the agent has opened (mounted or warmed), kept in `STATE/images.json` so `gc`
/// knows which cached chunks are still wanted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KnownImage {
    pub location: String,
    pub manifest_digest: String,
    pub index_digest: String,
    /// Seconds since the Unix epoch of the last mount, unmount or warm.
    pub last_used: u64,
}

/// `POST /v1/gc`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcRequest {
    /// Also forget images that are not mounted and were not used for this many seconds.
    #[serde(default)]
    pub unused_for_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcReport {
    pub forgotten_images: Vec<String>,
    pub removed_indexes: u64,
    pub cache: RetainReport,
}

/// `POST /v1/profile/record`: (re)starts recording first accesses on a live mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordRequest {
    pub mountpoint: PathBuf,
    /// Default: the config's `profile.window`.
    #[serde(default)]
    pub window_secs: Option<f64>,
}

/// `POST /v1/profile/push` and `POST /v1/profile/show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileRequest {
    pub image: String,
}

/// The profiles the agent knows for one image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileReport {
    pub image: String,
    pub manifest_digest: String,
    /// Merged from the runs recorded on this host.
    pub local: Option<Profile>,
    /// Stored beside the image.
    pub remote: Option<Profile>,
    /// Why the profile beside the image could not be read (backend down, say).
    pub remote_error: Option<String>,
    /// Runs recorded here and not yet pushed.
    pub pending_runs: u32,
    /// After a push: where the profile went.
    pub pushed_to: Option<String>,
    /// Bytes (stored) of the image's chunks the local or else the remote profile names.
    pub hot_bytes: u64,
    /// Bytes (stored) of the whole image.
    pub image_bytes: u64,
}

/// `POST /v1/rootfs`: an overlaid, writable root filesystem of an image for one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsRequest {
    pub image: String,
    /// Unique per agent; default: a random 12-hex-digit name.
    #[serde(default)]
    pub name: Option<String>,
    /// Where to mount the overlay; default STATE/containers/NAME/rootfs.
    #[serde(default)]
    pub target: Option<PathBuf>,
}

/// A container's root filesystem, as `POST /v1/rootfs` and `status` report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootfsInfo {
    pub name: String,
    pub image: String,
    pub manifest_digest: String,
    /// The overlay mountpoint.
    pub rootfs: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// The shared read-only lazy mount.
    pub lower: PathBuf,
    /// STATE/containers/NAME: lazyctl run writes its bundle here (NAME/bundle).
    pub dir: PathBuf,
}

/// `POST /v1/rootfs/remove`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsRemoveRequest {
    pub name: String,
    /// Keep the container's directory (its upper layer) for inspection.
    #[serde(default)]
    pub keep: bool,
}

/// The answer to `POST /v1/rootfs/remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsRemoved {
    pub name: String,
    /// With `keep`: the upper layer left for inspection (the container's writes).
    pub kept_upper: Option<PathBuf>,
}

/// `POST /v1/image/config` -> the image's OCI config JSON (serde_json::Value), verbatim;
/// `POST /v1/image/resolve` -> [`ResolvedImage`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRequest {
    pub image: String,
}

/// The answer to `POST /v1/image/resolve`: the lazy image a reference names now, and a
/// reference that names that image for good.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResolvedImage {
    /// As asked.
    pub image: String,
    /// The lazy image's manifest digest.
    pub manifest_digest: String,
    /// Opens this very lazy image later, even after its tag moves: `HOST/REPO@sha256:...` of
    /// the lazy manifest for a registry image; the location as given for `dir:` and `s3://`.
    pub pinned: String,
    /// The image config's `rootfs.diff_ids`, lowest layer first (a lazy image's config is its
    /// source image's).
    pub diff_ids: Vec<String>,
}

/// `POST /v1/lower`: the image's shared read-only lower mount, for a holder that mounts its
/// own overlay over it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LowerRequest {
    pub image: String,
    /// Who holds the lower; unique per agent, named like a container.
    pub holder: String,
}

/// A holder of a shared lower, as `POST /v1/lower` and `status` report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LowerInfo {
    pub holder: String,
    /// As first asked by the holder.
    pub image: String,
    pub manifest_digest: String,
    /// The shared read-only lazy mount, `STATE/lower/<hex of the manifest digest>`.
    pub lower: PathBuf,
}

/// `POST /v1/lower/release`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LowerReleaseRequest {
    pub holder: String,
    /// When it was the lower's last user: detach the lower even while in use, at once.
    #[serde(default)]
    pub lazy: bool,
}

/// The answer to `POST /v1/lower/release`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LowerReleased {
    pub holder: String,
}

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
