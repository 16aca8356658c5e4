//! The agent's side of hand-overs: the mount table it keeps (`STATE/mounts.json`, written
//! whenever a mount or container comes or goes), the numbering the table carries (mount ids,
//! restarts) and the fd holder ([`HandOver`]); at start, serving the mounts a predecessor
//! handed over and restoring the containers on them ([`Agent::adopt`]); at an upgrade or a
//! restart, handing over to the successor ([`Agent::hand_over`]). The holder itself and the
//! table's format are [`crate::handover`]'s; mounts are served through `mounts`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fusefs::fuse::Connection;
use tracing::{error, info, warn};

use super::containers::Container;
use super::mounts::Serve;
use super::{absolute, Agent, AgentError};
use crate::error::error_chain;
use crate::handover::{self, Holder, KeptMount, MountTable};
use crate::mount;
use crate::remote::{self, ImageLocation};
use crate::sync::lock;

/// What the agent keeps for its successor, besides the mounts themselves.
pub(super) struct HandOver {
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

impl HandOver {
    pub(super) fn new(holder: Holder) -> HandOver {
        HandOver {
            holder,
            next_mount: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            table_lock: Mutex::new(()),
            upgrade: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn holder(&self) -> Holder {
        self.holder
    }

    /// The id of a new mount, under which the holder keeps its descriptor.
    pub(super) fn new_mount_id(&self) -> u64 {
        self.next_mount.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

impl Agent {
    pub fn holder(&self) -> Holder {
        self.handover.holder
    }

    /// Writes the mount table (`STATE/mounts.json`) from the live mounts and containers.
    pub(super) fn save_table(&self) {
        let _writing = lock(&self.handover.table_lock);
        let table = MountTable {
            next_id: self.handover.next_mount.load(Ordering::Relaxed),
            restarts: self.handover.restarts(),
            mounts: self.mounts.kept(),
            containers: self.containers.kept(),
            lower_holders: self.containers.holders(),
        };
        if let Err(e) = table.save(&self.config.state_dir) {
            error!("cannot write the mount table; a restart of lazyd would lose its mounts: {e}");
        }
    }

    /// At start: serves again the mounts of the mount table whose FUSE descriptors the holder
    /// handed back (`fds`, by name), and restores the containers on them and the lowers'
    /// holders. A mount of the table
    /// whose descriptor did not come back (the holder died too, a reboot) is dead: it is
    /// detached, with a log line naming it, so that its path can be mounted again; so is a
    /// container overlay over one. Descriptors no mount claims are closed.
    pub async fn adopt(self: &Arc<Self>, mut fds: HashMap<String, OwnedFd>) {
        let table = MountTable::load(&self.config.state_dir);
        self.handover
            .next_mount
            .store(table.next_id, Ordering::Relaxed);
        let handed = !fds.is_empty();
        let restarts = table.restarts + u64::from(handed);
        self.handover.restarts.store(restarts, Ordering::Relaxed);
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
            self.handover.holder.remove(&name);
        }
        for kept in table.containers {
            let name = kept.info.name.clone();
            let rootfs = kept.info.rootfs.clone();
            let lower_served = self.mounts.contains(&kept.info.lower);
            let overlay = mount::fs_type_at(&rootfs).as_deref() == Some("overlay");
            if lower_served && overlay {
                self.containers.insert(
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
        // A holder stays whether or not its lower survived: its next request mounts it again.
        for holder in table.lower_holders {
            self.containers.insert_holder(holder);
        }
        self.save_table();
        if handed || served > 0 {
            info!(
                mounts = served,
                "took over the mounts of the previous lazyd"
            );
        }
        // Lowers no container or holder uses any more linger and go, as they would have.
        let lowers: Vec<PathBuf> = self
            .mounts
            .paths()
            .into_iter()
            .filter(|p| p.starts_with(self.lower_root()))
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
        match self.handover.holder {
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
        self.handover.upgrade.notify_one();
        Ok(crate::api::UpgradeStarted {
            pid: std::process::id(),
        })
    }

    /// Resolves when an upgrade was asked for through the API.
    pub async fn upgrade_requested(&self) {
        self.handover.upgrade.notified().await;
    }

    /// Stops serving without unmounting: the holder keeps every mount's descriptor for the next
    /// lazyd, which serves them from the mount table written here. Requests read and not
    /// answered yet are resent to it by the kernel (6.9+).
    pub fn hand_over(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.save_table();
        info!(
            mounts = self.mounts.len(),
            containers = self.containers.len(),
            "handing the mounts over to the next lazyd (the {} keeps their descriptors)",
            self.handover.holder.name()
        );
    }
}

/// Detaches the dead mount at `path`, saying why.
fn detach_dead(path: &Path, why: &str) {
    match mount::unmount(path, true) {
        Ok(()) => warn!(mountpoint = %path.display(), "detached a dead mount: {why}"),
        Err(e) => error!(mountpoint = %path.display(), "cannot detach a dead mount ({why}): {e}"),
    }
}
