//! Mounts that outlive lazyd (docs/ARCHITECTURE.md, "Mounts that outlive lazyd").
//!
//! A FUSE mount lives as long as some process holds its /dev/fuse descriptor. lazyd hands each
//! mount's descriptor to a *holder* that outlives it, using the systemd notification protocol
//! (`FDSTORE=1`, `FDNAME=`, `FDSTOREREMOVE=1`): systemd's file descriptor store under systemd,
//! else lazyd's own supervisor ([`crate::supervisor`]), which speaks the same protocol. The
//! holder gives the descriptors back to the next lazyd (`LISTEN_FDS`, `LISTEN_FDNAMES`), which
//! finds in the mount table ([`MountTable`], `STATE/mounts.json`) what each one serves and
//! serves it again.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use fusefs::manifest::LazyManifest;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::api::{LowerInfo, RootfsInfo};

/// The mount table, in the state directory.
pub const TABLE_FILE: &str = "mounts.json";
/// Set by lazyd's supervisor in its server's environment: the supervisor's pid.
pub const SUPERVISOR_ENV: &str = "LAZYD_SUPERVISOR_PID";
/// The name under which the control socket's listening descriptor is stored: connections made
/// while lazyd restarts wait in its queue for the next one.
pub const API_SOCKET: &str = "lazyd-api";
/// Prefix of the names under which mounts' descriptors are stored.
const FD_PREFIX: &str = "lazyd-mount-";

/// Who keeps the mounts' descriptors while lazyd restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// systemd's file descriptor store (`FileDescriptorStoreMax=` in the unit).
    Systemd,
    /// lazyd's supervisor, the parent of this process.
    Supervisor { pid: u32 },
    /// Nobody: the mounts end with this process.
    None,
}

impl Holder {
    /// The holder this process was started under: the supervisor when it set
    /// [`SUPERVISOR_ENV`], systemd when it gave a notification socket and a descriptor store
    /// (`$FDSTORE`, systemd 254 and later, set when the unit has `FileDescriptorStoreMax=`).
    pub fn from_env() -> Holder {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Holder::None;
        }
        if let Some(pid) = std::env::var(SUPERVISOR_ENV)
            .ok()
            .and_then(|p| p.parse().ok())
        {
            return Holder::Supervisor { pid };
        }
        match std::env::var("FDSTORE")
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(n) if n > 0 => Holder::Systemd,
            _ => Holder::None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Holder::Systemd => "systemd",
            Holder::Supervisor { .. } => "supervisor",
            Holder::None => "none",
        }
    }

    pub fn keeps_mounts(&self) -> bool {
        !matches!(self, Holder::None)
    }

    /// Hands a mount's descriptor to the holder under `name`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        if !self.keeps_mounts() {
            return Ok(());
        }
        let name = format!("FDNAME={name}");
        sd_notify::notify_with_fds(
            false,
            &[
                sd_notify::NotifyState::FdStore,
                sd_notify::NotifyState::Custom(&name),
            ],
            &[fd],
        )
    }

    /// Tells the holder to close the descriptor stored under `name` (the mount is gone).
    pub fn remove(&self, name: &str) {
        if !self.keeps_mounts() {
            return;
        }
        let name = format!("FDNAME={name}");
        if let Err(e) = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::FdStoreRemove,
                sd_notify::NotifyState::Custom(&name),
            ],
        ) {
            warn!("cannot tell the fd holder to drop {name}: {e}");
        }
    }
}

/// The name under which mount `id`'s descriptor is stored.
pub fn fd_name(id: u64) -> String {
    format!("{FD_PREFIX}{id}")
}

/// The descriptors the holder gave this process at start, by name (`LISTEN_FDS`,
/// `LISTEN_FDNAMES`, for this pid); the variables are removed so no child inherits them.
pub fn inherited_fds() -> HashMap<String, OwnedFd> {
    let mut fds = HashMap::new();
    match sd_notify::listen_fds_with_names(true) {
        Ok(listed) => {
            for (fd, name) in listed {
                // SAFETY: the holder passed `fd` to this process for it to own (LISTEN_PID is
                // this process), and nothing else here has taken it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                fds.insert(name, fd);
            }
        }
        Err(e) => warn!("ignoring the descriptors passed at start: {e}"),
    }
    fds
}

/// A mount lazyd serves, as its successor needs to know it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeptMount {
    /// Its descriptor's name at the holder is `lazyd-mount-ID`.
    pub id: u64,
    pub mountpoint: PathBuf,
    /// The location asked for (`docker://...`, `s3://...`, `dir:...`).
    pub image: String,
    /// The lazy manifest served, pinned: the successor serves the same index (so the same inode
    /// numbers) whatever the location's tag names by then.
    pub manifest: LazyManifest,
    pub manifest_digest: String,
    pub allow_other: bool,
    pub suid: bool,
    /// The FUSE ABI version agreed on in `FUSE_INIT`.
    pub proto: (u32, u32),
    /// When it was first mounted, in seconds since the Unix epoch.
    pub mounted_at: f64,
    /// How many restarts of lazyd it has been served across.
    pub restarts: u32,
}

/// A container's root filesystem, for the successor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeptContainer {
    pub info: RootfsInfo,
    pub own_target: bool,
}

/// `STATE/mounts.json`: what lazyd serves, rewritten (atomically) on every change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MountTable {
    /// The next mount id.
    pub next_id: u64,
    /// How many times lazyd has started with mounts handed over from a predecessor.
    pub restarts: u64,
    pub mounts: Vec<KeptMount>,
    pub containers: Vec<KeptContainer>,
    /// Holders of shared lowers (`POST /v1/lower`), kept whether or not their lower is mounted:
    /// a holder's next request mounts it again.
    #[serde(default)]
    pub lower_holders: Vec<LowerInfo>,
}

impl MountTable {
    /// The table in `state_dir`; an empty one when there is none. A table that cannot be read
    /// is set aside (`mounts.json.bad`) with a warning: its mounts are then detached at start
    /// like those of a reboot.
    pub fn load(state_dir: &Path) -> MountTable {
        let path = state_dir.join(TABLE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return MountTable::default(),
            Err(e) => {
                warn!(path = %path.display(), "cannot read the mount table: {e}");
                return MountTable::default();
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(t) => t,
            Err(e) => {
                let bad = path.with_extension("json.bad");
                warn!(path = %path.display(), "the mount table is unreadable ({e}); moved to {}", bad.display());
                let _ = std::fs::rename(&path, bad);
                MountTable::default()
            }
        }
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::store::write_atomic(state_dir, &state_dir.join(TABLE_FILE), &bytes)
            .map_err(std::io::Error::other)
    }
}

/// Checks that `binary` is an executable file, before the server is stopped for it.
pub fn upgrade_target(binary: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(binary) {
        Ok(md) if md.is_file() && md.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("{} is not an executable file", binary.display())),
        Err(e) => Err(format!("{}: {e}", binary.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_round_trips_and_a_bad_one_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(MountTable::load(dir.path()), MountTable::default());
        let desc = |media_type: &str, c: char| fusefs::manifest::Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 100,
            urls: None,
            annotations: None,
        };
        let manifest = LazyManifest::new(
            desc(fusefs::manifest::MEDIA_TYPE_OCI_CONFIG, 'a'),
            desc(fusefs::manifest::MEDIA_TYPE_INDEX, 'b'),
            vec![desc(fusefs::manifest::MEDIA_TYPE_BLOB, 'c')],
        );
        let table = MountTable {
            next_id: 3,
            restarts: 2,
            mounts: vec![KeptMount {
                id: 2,
                mountpoint: "/mnt/x".into(),
                image: "docker://r/x:1".into(),
                manifest,
                manifest_digest: "sha256:00".into(),
                allow_other: true,
                suid: false,
                proto: (7, 41),
                mounted_at: 1.5,
                restarts: 2,
            }],
            containers: vec![],
            lower_holders: vec![LowerInfo {
                holder: "snap-1".into(),
                image: "docker://r/x:1".into(),
                manifest_digest: "sha256:00".into(),
                lower: "/var/lib/lazyd/lower/00".into(),
            }],
        };
        table.save(dir.path()).unwrap();
        assert_eq!(MountTable::load(dir.path()), table);
        std::fs::write(dir.path().join(TABLE_FILE), b"{ torn").unwrap();
        assert_eq!(MountTable::load(dir.path()), MountTable::default());
        assert!(dir.path().join("mounts.json.bad").exists());
    }

    #[test]
    fn a_table_written_before_lower_holders_loads_with_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(TABLE_FILE),
            br#"{"next_id": 4, "restarts": 1, "mounts": [], "containers": []}"#,
        )
        .unwrap();
        let table = MountTable::load(dir.path());
        assert_eq!((table.next_id, table.restarts), (4, 1));
        assert!(table.lower_holders.is_empty());
        assert!(!dir.path().join("mounts.json.bad").exists());
    }
}
