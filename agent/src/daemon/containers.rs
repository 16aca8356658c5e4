//! Containers' root filesystems (`POST /v1/rootfs`) and the shared lowers under them:
//! [`Containers`] holds the containers by name, the lowers' holders by name, the lock that
//! serialises creating and removing them, and the lowers lingering after their last user. An
//! image is mounted once per manifest digest as a shared read-only lower (`STATE/lower/<hex>`,
//! a mount of `mounts`, served and unmounted through it) and each container gets an overlay of
//! its own upper and work dirs (`STATE/containers/NAME`) over it.
//!
//! A *holder* (`POST /v1/lower`) uses a lower without an overlay of lazyd's: a containerd
//! snapshotter mounts its own overlay over it. Holders count as the lower's users like
//! containers do, and are kept in the mount table whether or not their lower survived a
//! restart: a holder's next request mounts its lower again.
//!
//! Also the image's OCI config, which a container's bundle is made from, and the resolution of
//! an image reference to a pinned one with its layers' diff_ids.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::mounts::Serve;
use super::{absolute, Agent, AgentError};
use crate::api::{
    LowerInfo, LowerReleaseRequest, LowerReleased, LowerRequest, ResolvedImage, RootfsInfo,
    RootfsRemoved, RootfsRequest, UmountRequest,
};
use crate::handover::KeptContainer;
use crate::mount::{self, MountError};
use crate::registry::{ImageRef, Reference};
use crate::remote::{self, ImageLocation, OpenedImage};
use crate::sync::lock;

/// The containers' root filesystems of the agent.
#[derive(Default)]
pub(super) struct Containers {
    /// By name.
    by_name: Mutex<BTreeMap<String, Container>>,
    /// The lowers' holders, by name.
    holders: Mutex<BTreeMap<String, LowerInfo>>,
    /// Held while a container or holder comes or goes (and a lower is unmounted by request), so
    /// lower mounts and their references change one at a time.
    ops: tokio::sync::Mutex<()>,
    /// Lowers whose last user is gone, each with the number of its idle spell: the timer that
    /// unmounts a lingering lower acts only if no user came (and went) since.
    idle_lowers: Mutex<HashMap<PathBuf, u64>>,
    next_idle: AtomicU64,
}

impl Containers {
    /// Takes the lock that serialises container changes (`ops`), until the guard is dropped.
    pub(super) async fn serialise(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.ops.lock().await
    }

    /// The container whose overlay is mounted at `target`.
    pub(super) fn at(&self, target: &Path) -> Option<String> {
        lock(&self.by_name)
            .values()
            .find(|c| c.info.rootfs == target)
            .map(|c| c.info.name.clone())
    }

    /// The containers whose overlays use the lower mount at `lower`, and its holders.
    pub(super) fn lower_users(&self, lower: &Path) -> LowerUsers {
        let containers = lock(&self.by_name)
            .values()
            .filter(|c| c.info.lower == lower)
            .map(|c| c.info.name.clone())
            .collect();
        let holders = lock(&self.holders)
            .values()
            .filter(|h| h.lower == lower)
            .map(|h| h.holder.clone())
            .collect();
        LowerUsers {
            containers,
            holders,
        }
    }

    /// Restores a container a predecessor handed over.
    pub(super) fn insert(&self, name: String, container: Container) {
        lock(&self.by_name).insert(name, container);
    }

    /// Restores a holder a predecessor handed over.
    pub(super) fn insert_holder(&self, info: LowerInfo) {
        lock(&self.holders).insert(info.holder.clone(), info);
    }

    /// The lowers' holders, by name.
    pub(super) fn holders(&self) -> Vec<LowerInfo> {
        lock(&self.holders).values().cloned().collect()
    }

    pub(super) fn holder_count(&self) -> usize {
        lock(&self.holders).len()
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.by_name).len()
    }

    pub(super) fn infos(&self) -> Vec<RootfsInfo> {
        lock(&self.by_name)
            .values()
            .map(|c| c.info.clone())
            .collect()
    }

    /// Each container's name and root filesystem.
    pub(super) fn rootfs_by_name(&self) -> Vec<(String, PathBuf)> {
        lock(&self.by_name)
            .values()
            .map(|c| (c.info.name.clone(), c.info.rootfs.clone()))
            .collect()
    }

    /// The containers as the mount table keeps them.
    pub(super) fn kept(&self) -> Vec<KeptContainer> {
        lock(&self.by_name)
            .values()
            .map(|c| KeptContainer {
                info: c.info.clone(),
                own_target: c.own_target,
            })
            .collect()
    }
}

/// Who uses a shared lower: containers (by name) and holders (by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerUsers {
    pub containers: Vec<String>,
    pub holders: Vec<String>,
}

impl LowerUsers {
    pub(super) fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.holders.is_empty()
    }
}

impl std::fmt::Display for LowerUsers {
    /// `container(s) a, b and holder(s) c`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.containers.is_empty() {
            parts.push(format!("container(s) {}", self.containers.join(", ")));
        }
        if !self.holders.is_empty() {
            parts.push(format!("holder(s) {}", self.holders.join(", ")));
        }
        f.write_str(&parts.join(" and "))
    }
}

/// A container's root filesystem: an overlay over a shared lower mount.
pub(super) struct Container {
    pub(super) info: RootfsInfo,
    /// Whether the caller chose the target (it is then left in place at removal).
    pub(super) own_target: bool,
}

/// In the state directory: the shared lower mounts of containers, by manifest digest.
const LOWER_DIR: &str = "lower";

/// In the state directory: one directory per container (upper, work, rootfs, bundle).
const CONTAINERS_DIR: &str = "containers";

impl Agent {
    pub(super) fn lower_root(&self) -> PathBuf {
        self.config.state_dir.join(LOWER_DIR)
    }

    fn containers_root(&self) -> PathBuf {
        self.config.state_dir.join(CONTAINERS_DIR)
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
        let _ops = self.containers.serialise().await;
        self.check_running()?;
        if lock(&self.containers.by_name).contains_key(&name) {
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
            if self.mounts.contains(t) || self.containers.at(t).is_some() {
                return Err(AgentError::Conflict(format!(
                    "lazyd already has something mounted at {}",
                    t.display()
                )));
            }
        }
        let _reserved = target
            .as_deref()
            .map(|t| self.mounts.reserve(t))
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
        let lower = self.mount_lower(&req.image, opened).await?;
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
        lock(&self.containers.by_name).insert(
            name,
            Container {
                info: info.clone(),
                own_target: target.is_some(),
            },
        );
        self.save_table();
        Ok(info)
    }

    /// The path of the shared lower of the image whose manifest digest is `manifest_digest`.
    fn lower_path(&self, manifest_digest: &str) -> PathBuf {
        let hex = manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(manifest_digest);
        self.lower_root().join(hex)
    }

    /// Mounts `opened` as the shared lower of its manifest digest, unless it is mounted already
    /// (a lingering lower is kept from then on); returns the lower's path. Called under
    /// [`Containers::serialise`].
    async fn mount_lower(
        self: &Arc<Self>,
        image: &str,
        opened: OpenedImage,
    ) -> Result<PathBuf, AgentError> {
        let manifest_digest = opened.manifest_digest.clone();
        let lower = self.lower_path(&manifest_digest);
        lock(&self.containers.idle_lowers).remove(&lower);
        if self.mounts.contains(&lower) {
            self.images.touch(&manifest_digest);
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
            self.serve(image, opened, &lower, how).await?;
        }
        Ok(lower)
    }

    /// Gives `req.holder` the shared lower of `req.image`, mounting it unless it is mounted
    /// already, and records the holder as one of its users. The same holder asking again for
    /// the same image (by manifest digest) gets the same answer, its lower mounted again if it
    /// was not any more; for another image, a conflict.
    pub async fn hold_lower(self: &Arc<Self>, req: LowerRequest) -> Result<LowerInfo, AgentError> {
        self.check_running()?;
        self.reap();
        mount::check_container_name(&req.holder).map_err(|e| {
            AgentError::BadRequest(format!("a lower holder is named like a container: {e}"))
        })?;
        // Opened before the lock, as for a container.
        let opened = self.open(&req.image, true).await?;
        let _ops = self.containers.serialise().await;
        self.check_running()?;
        let held = lock(&self.containers.holders).get(&req.holder).cloned();
        if let Some(held) = &held {
            if held.manifest_digest != opened.manifest_digest {
                return Err(AgentError::Conflict(format!(
                    "holder {} holds the lower of {} ({}), not of {} ({}); release it first or choose another name",
                    req.holder, held.image, held.manifest_digest, req.image, opened.manifest_digest
                )));
            }
        }
        let manifest_digest = opened.manifest_digest.clone();
        let lower = self.mount_lower(&req.image, opened).await?;
        if let Some(held) = held {
            return Ok(held);
        }
        let info = LowerInfo {
            holder: req.holder,
            image: req.image,
            manifest_digest,
            lower,
        };
        info!(
            holder = %info.holder,
            image = %info.image,
            lower = %info.lower.display(),
            "lower held"
        );
        self.containers.insert_holder(info.clone());
        self.save_table();
        Ok(info)
    }

    /// Forgets the holder `req.holder`; its lower goes as after a container's removal when no
    /// one else uses it ([`Agent::release_lower`]).
    pub async fn release_held_lower(
        self: &Arc<Self>,
        req: LowerReleaseRequest,
    ) -> Result<LowerReleased, AgentError> {
        let _ops = self.containers.serialise().await;
        let info = lock(&self.containers.holders)
            .remove(&req.holder)
            .ok_or_else(|| AgentError::NoHolder(req.holder.clone()))?;
        self.save_table();
        info!(holder = %info.holder, lower = %info.lower.display(), "lower released");
        self.release_lower(&info.lower, req.lazy).await;
        self.images.touch(&info.manifest_digest);
        Ok(LowerReleased {
            holder: info.holder,
        })
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
    pub(super) async fn remove_container(
        self: &Arc<Self>,
        name: &str,
        keep: bool,
        lazy: bool,
    ) -> Result<RootfsRemoved, AgentError> {
        let _ops = self.containers.serialise().await;
        let (info, own_target) = lock(&self.containers.by_name)
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
        lock(&self.containers.by_name).remove(name);
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
        self.images.touch(&info.manifest_digest);
        Ok(RootfsRemoved {
            name: name.to_string(),
            kept_upper,
        })
    }

    /// When no container or holder uses the lower at `lower` any more: ends its recording (the
    /// start is over) and unmounts it after `mount.lower_linger`, unless a user comes meanwhile
    /// (with `lazy`, or no linger, at once). A busy lower (someone works in it directly) is left
    /// mounted, for a later umount or the agent's stop.
    pub(super) async fn release_lower(self: &Arc<Self>, lower: &Path, lazy: bool) {
        if !self.containers.lower_users(lower).is_empty() {
            return;
        }
        let Some(live) = self.mounts.get(lower) else {
            return;
        };
        let linger = self.config.mount.lower_linger;
        if lazy || linger.is_zero() {
            self.unmount_lower(lower, lazy).await;
            return;
        }
        self.save_recording(&live).await;
        let spell = self.containers.next_idle.fetch_add(1, Ordering::Relaxed);
        lock(&self.containers.idle_lowers).insert(lower.to_path_buf(), spell);
        let agent = self.clone();
        let lower = lower.to_path_buf();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let _ops = agent.containers.serialise().await;
            let still_idle = {
                let mut idle = lock(&agent.containers.idle_lowers);
                let mine = idle.get(&lower) == Some(&spell);
                if mine {
                    idle.remove(&lower);
                }
                mine && agent.containers.lower_users(&lower).is_empty()
            };
            if still_idle {
                info!(lower = %lower.display(), "unmounting a lower no container or holder used for {linger:?}");
                agent.unmount_lower(&lower, false).await;
            }
        });
    }

    /// Unmounts the lower at `lower` now.
    async fn unmount_lower(self: &Arc<Self>, lower: &Path, lazy: bool) {
        lock(&self.containers.idle_lowers).remove(lower);
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
                "no container or holder uses this lower any more, but it cannot be unmounted yet; left mounted for lazyctl umount or the agent's stop: {e}"
            ),
        }
    }

    /// The image's OCI config JSON, verbatim (kept in `CACHE/configs` for remote images).
    pub async fn image_config(&self, image: &str) -> Result<Vec<u8>, AgentError> {
        let opened = self.open(image, false).await?;
        self.read_config(image, &opened).await
    }

    /// The lazy image `image` names now: its manifest digest, a reference that opens that very
    /// image later whatever its tag names by then, and its layers' diff_ids (from its config,
    /// read as [`Agent::image_config`] reads it).
    pub async fn resolve_image(&self, image: &str) -> Result<ResolvedImage, AgentError> {
        let opened = self.open(image, false).await?;
        let config = self.read_config(image, &opened).await?;
        let diff_ids = diff_ids(&config).map_err(|reason| {
            AgentError::BadRequest(format!(
                "the config of {image} ({}) {reason}; a container image's config lists its layers there",
                opened.manifest.config.digest
            ))
        })?;
        let pinned = match &opened.location {
            ImageLocation::Registry(r) => {
                let by_digest = ImageRef {
                    reference: Reference::Digest(opened.manifest_digest.clone()),
                    ..r.clone()
                };
                // The snapshotter mounts the image by this reference next: the same image,
                // opened already, within the same `fetch.resolve_ttl`.
                let as_pinned = OpenedImage {
                    location: ImageLocation::Registry(by_digest.clone()),
                    ..opened.clone()
                };
                self.remember_opened(&by_digest.to_string(), &as_pinned);
                by_digest.to_string()
            }
            ImageLocation::Dir { .. } | ImageLocation::S3(_) => image.to_string(),
        };
        Ok(ResolvedImage {
            image: image.to_string(),
            manifest_digest: opened.manifest_digest,
            pinned,
            diff_ids,
        })
    }

    /// The config blob of the opened `image`, verified and kept in `CACHE/configs`.
    async fn read_config(&self, image: &str, opened: &OpenedImage) -> Result<Vec<u8>, AgentError> {
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
}

/// The `rootfs.diff_ids` of an OCI image config, in order; else what is wrong with it.
fn diff_ids(config: &[u8]) -> Result<Vec<String>, String> {
    let config: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("is not JSON: {e}"))?;
    let Some(ids) = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
    else {
        return Err("has no rootfs.diff_ids".into());
    };
    ids.iter()
        .map(|id| {
            id.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("has a rootfs.diff_ids entry that is not a string: {id}"))
        })
        .collect()
}

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
    use std::os::unix::fs::DirBuilderExt;
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
        mount::take_owner_and_mode(&upper, lower).map_err(AgentError::io(format!(
            "giving {} the owner and mode of {}",
            upper.display(),
            lower.display()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_ids_are_read_in_order_and_a_config_without_them_is_refused() {
        let config = br#"{"os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]}}"#;
        assert_eq!(diff_ids(config).unwrap(), ["sha256:aa", "sha256:bb"]);
        assert_eq!(
            diff_ids(br#"{"os": "linux"}"#).unwrap_err(),
            "has no rootfs.diff_ids"
        );
        assert!(diff_ids(br#"{"rootfs": {"diff_ids": [1]}}"#)
            .unwrap_err()
            .contains("not a string"));
        assert!(diff_ids(b"{ torn").unwrap_err().starts_with("is not JSON"));
    }
}
