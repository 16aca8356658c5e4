//! The snapshotter: containerd's snapshot model (committed snapshots in parent chains, active
//! snapshots and views on top of them, each with the mounts that make its tree) over two kinds
//! of layers.
//!
//! - **Ordinary layers** are directories, as containerd's overlayfs snapshotter keeps them:
//!   `ROOT/snapshots/ID/fs` (and `work` for an active snapshot). An active snapshot is an
//!   overlay of its `fs` over its parents' (a bind mount with no parent); containerd unpacks a
//!   layer into it and commits it.
//! - **Lazy layers.** When a layer being unpacked (a Prepare labelled
//!   `containerd.io/snapshot.ref`) belongs to an image lazyd has a lazy version of, the layer
//!   is committed at once, empty, and the Prepare answers AlreadyExists: containerd fetches no
//!   layer blob. An active snapshot or view over the image's top layer gets lazyd's shared
//!   read-only mount of the image as its lowest lower (held in lazyd in the snapshot's name
//!   until it is removed); the image's layers are all in that one tree.
//!
//! A lazy layer below an image's top has no tree of its own. A Prepare that would stack on one
//! (an image without a lazy version sharing the lazy image's lower layers) is refused, so no
//! chain ever mixes part of a lazy image into another image.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use agent::sync::lock;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::filter::{Fields, Filters};
use crate::lazyd::{Lazyd, Resolution};
use crate::metrics::Metrics;
use crate::store::{Kind, LazyLayer, Record, Store, StoreError, Usage};

/// The label containerd puts on the Prepare of a layer it is about to unpack: the layer's
/// chain ID, the name the committed layer gets.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The image a layer belongs to, from containerd's CRI plugin (and any client using
/// `snapshotters.AppendInfoHandlerWrapper`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The same, from `ctr-remote image rpull` (stargz-snapshotter's labels).
pub const STARGZ_IMAGE_REF: &str = "containerd.io/snapshot/remote/stargz.reference";

/// Why a request failed, in the terms containerd's errdefs understand.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// lazyd could not be asked; trying again later may work.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SnapError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapError {
        let context = context.into();
        move |source| SnapError::Io { context, source }
    }
}

/// A mount, as containerd's `containerd.types.Mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A snapshot as `Stat` and `List` describe it.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Info {
    fn of(name: &str, r: &Record) -> Info {
        Info {
            name: name.to_string(),
            parent: r.parent.clone(),
            kind: r.kind,
            labels: r.labels.clone(),
            created: r.created,
            updated: r.updated,
        }
    }
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.split_first() {
            Some((f, [])) if f == "kind" => Some(self.kind.as_str().to_string()),
            Some((f, [])) if f == "name" => Some(self.name.clone()),
            Some((f, [])) if f == "parent" => Some(self.parent.clone()),
            Some((f, rest)) if f == "labels" && !rest.is_empty() => {
                self.labels.get(&rest.join(".")).cloned()
            }
            _ => None,
        }
    }
}

/// What a snapshot's tree is made of below its own directory: its parents' directories, top
/// first, then the lazy image at the bottom of the chain, if any.
struct Lowers {
    dirs: Vec<PathBuf>,
    lazy: Option<String>,
}

pub struct Snapshotter {
    root: PathBuf,
    store: Mutex<Store>,
    lazyd: Arc<Lazyd>,
    /// Whether a lazy image is mounted (and its background fetch begun) as soon as its top
    /// layer is pulled, rather than at its first container.
    mount_at_pull: bool,
    /// Holders in lazyd are named `PREFIX-ID`.
    holder_prefix: String,
    metrics: Arc<Metrics>,
}

impl Snapshotter {
    /// Opens the snapshotter's state in `root` (created if missing).
    pub fn open(
        root: &Path,
        lazyd: Lazyd,
        holder_prefix: &str,
        mount_at_pull: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Snapshotter, SnapError> {
        let text = root.to_str().unwrap_or("");
        if !root.is_absolute() || text.contains([',', ':']) {
            return Err(SnapError::InvalidArgument(format!(
                "the root {} must be an absolute path without ',' or ':' (overlay mount options name directories in it)",
                root.display()
            )));
        }
        for dir in [root.to_path_buf(), root.join("snapshots")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(SnapError::io(format!("creating {}", dir.display())))?;
        }
        let store = Store::open(&root.join("metadata.redb"))?;
        info!(root = %root.display(), snapshots = store.len(), "metadata loaded");
        Ok(Snapshotter {
            root: root.to_path_buf(),
            store: Mutex::new(store),
            lazyd: Arc::new(lazyd),
            mount_at_pull,
            holder_prefix: holder_prefix.to_string(),
            metrics,
        })
    }

    /// The Prometheus metrics, with the snapshots there are now.
    pub fn metrics_text(&self) -> String {
        self.metrics.render(&self.store())
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn holder(&self, id: u64) -> String {
        format!("{}-{id}", self.holder_prefix)
    }

    /// Prepare (an active snapshot) or View (a read-only one) of `key` on `parent`.
    pub async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapError> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument("a snapshot needs a key".into()));
        }
        self.check_new(key, parent)?;
        if kind == Kind::Active {
            if let Some(target) = labels.get(SNAPSHOT_REF) {
                self.skip_layer(key, target, parent, &labels).await?;
            }
        }
        let (id, lowers) = {
            let mut store = self.store();
            (store.take_id(), lowers(&store, parent, |id| self.fs(id))?)
        };
        let dir = self.dir(id);
        // An id handed out before a crash, never recorded, may have left its directory.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(SnapError::io(format!(
                "removing the orphan {}",
                dir.display()
            )))?;
        }
        let mut made = vec!["fs"];
        if kind == Kind::Active {
            made.push("work");
        }
        for d in made {
            let path = dir.join(d);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&path)
                .map_err(SnapError::io(format!("creating {}", path.display())))?;
        }
        let now = SystemTime::now();
        let record = Record {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            lazy: None,
            holder: lowers.lazy.as_ref().map(|_| self.holder(id)),
            usage: Usage::default(),
        };
        let made = self.record_and_mount(key, &record, lowers).await;
        if made.is_err() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(dir = %dir.display(), "cannot remove the directory of a failed snapshot: {e}");
            }
        }
        let mounts = made?;
        info!(key, parent, kind = kind.as_str(), id, "snapshot created");
        Ok(mounts)
    }

    /// Records a new snapshot, holds its lazy lower and returns its mounts; on failure nothing
    /// stays recorded or held.
    async fn record_and_mount(
        &self,
        key: &str,
        record: &Record,
        lowers: Lowers,
    ) -> Result<Vec<Mount>, SnapError> {
        {
            let mut store = self.store();
            // Again, in the same hold of the lock as the write: the lock was let go while lazyd
            // was asked, and two creates of one key may have got this far at once.
            check_new(&store, key, &record.parent)?;
            store.apply(vec![(key.to_string(), Some(record.clone()))])?;
        }
        match self.mounts_of(record, lowers, true).await {
            Ok(mounts) => Ok(mounts),
            Err(e) => {
                {
                    let mut store = self.store();
                    if let Err(undo) = store.apply(vec![(key.to_string(), None)]) {
                        warn!(key, "cannot forget a snapshot whose mounts failed: {undo}");
                    }
                }
                if let Some(holder) = &record.holder {
                    if let Err(release) = self.lazyd.release(holder).await {
                        warn!(holder, "cannot release the lower of a failed snapshot in lazyd (the next Cleanup does): {release}");
                    }
                }
                Err(e)
            }
        }
    }

    fn check_new(&self, key: &str, parent: &str) -> Result<(), SnapError> {
        check_new(&self.store(), key, parent)
    }

    /// For a layer containerd is about to unpack: answers AlreadyExists when the layer can be
    /// skipped, committing it empty first if it is a lazy image's. Otherwise returns, and the
    /// layer is unpacked.
    ///
    /// containerd then takes *any* committed snapshot labelled with the layer's chain ID on the
    /// same parent (`List`). A lazy image may take any of them, as every one has the layers'
    /// tree; an image without a lazy version must never get a lazy layer below an image's top
    /// (it has no tree of its own). So an unpacked layer is reused only where no lazy snapshot
    /// of the layer is there to be taken instead.
    async fn skip_layer(
        &self,
        key: &str,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), SnapError> {
        let there = self.committed_layers(target, parent);
        if !there.is_empty() && there.iter().all(|(_, lazy)| lazy.is_none()) {
            self.metrics.layer("reused");
            return Err(SnapError::AlreadyExists(format!(
                "layer {target} exists as snapshot {}",
                there[0].0
            )));
        }
        let Some(image) = labels
            .get(CRI_IMAGE_REF)
            .or_else(|| labels.get(STARGZ_IMAGE_REF))
        else {
            debug!(key, target, "a layer without an image label is unpacked");
            return Ok(());
        };
        let resolved = match self.lazyd.resolve(image).await {
            Resolution::Lazy(resolved) => resolved,
            Resolution::Unpack(why) => {
                debug!(image, target, "unpacking the layer: {why}");
                return Ok(());
            }
        };
        let chain = chain_ids(&resolved.diff_ids);
        let Some(at) = chain.iter().position(|c| c == target) else {
            warn!(image, target, lazy = %resolved.pinned, "the lazy version of the image has other layers than the image being pulled (was the tag moved?); unpacking the layer");
            return Ok(());
        };
        let lazy = LazyLayer {
            image: resolved.pinned.clone(),
            pulled_as: image.clone(),
            top: at + 1 == chain.len(),
        };
        let mut store = self.store();
        let below = match at.checked_sub(1) {
            None => parent.is_empty(),
            Some(i) => store
                .get(parent)
                .and_then(|p| p.labels.get(SNAPSHOT_REF))
                .is_some_and(|r| *r == chain[i]),
        };
        if !below {
            warn!(
                image,
                target,
                parent,
                "the parent is not the layer below in the lazy image; unpacking the layer"
            );
            return Ok(());
        }
        let there = committed_layers(&store, target, parent);
        if let Some((name, _)) = there.first() {
            // This image's top may be a lower layer of the image that made the snapshot: it is
            // now a top, with this image's mount as its tree.
            let mut changes = Vec::new();
            for (name, was) in &there {
                if lazy.top && was.as_ref().is_some_and(|l| !l.top) {
                    let mut record = get(&store, name)?.clone();
                    record.lazy = Some(lazy.clone());
                    record.updated = SystemTime::now();
                    record.holder = self.mount_at_pull.then(|| self.holder(record.id));
                    changes.push((name.clone(), Some(record)));
                }
            }
            if !changes.is_empty() {
                let held: Vec<String> = changes
                    .iter()
                    .filter_map(|(_, r)| r.as_ref()?.holder.clone())
                    .collect();
                store.apply(changes)?;
                info!(
                    image,
                    target, "lazy layer is now also the top of this image"
                );
                for holder in held {
                    self.mount_in_background(&lazy.image, holder);
                }
            }
            self.metrics.layer("lazy");
            return Err(SnapError::AlreadyExists(format!(
                "layer {target} of {image} exists as snapshot {name}"
            )));
        }
        check_new(&store, key, parent)?;
        let id = store.take_id();
        let now = SystemTime::now();
        let name = format!("lazy/{id}/{target}");
        let holder = (self.mount_at_pull && lazy.top).then(|| self.holder(id));
        let pinned = lazy.image.clone();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            labels: labels.clone(),
            created: now,
            updated: now,
            lazy: Some(lazy),
            holder: holder.clone(),
            usage: Usage::default(),
        };
        store.apply(vec![(name.clone(), Some(record))])?;
        self.metrics.layer("lazy");
        info!(image, layer = at + 1, of = chain.len(), target, snapshot = %name, "lazy layer: not unpacked");
        if let Some(holder) = holder {
            self.mount_in_background(&pinned, holder);
        }
        Err(SnapError::AlreadyExists(format!(
            "layer {target} of {image} is served lazily (snapshot {name})"
        )))
    }

    /// Has lazyd mount `image` for the pulled top layer `holder` names, without making the
    /// pull wait: the image's open, its mount and its background fetch then run while
    /// containerd finishes the pull and creates a container. A failure only costs that head
    /// start (the container's Prepare mounts it), so it is logged, not returned.
    fn mount_in_background(&self, image: &str, holder: String) {
        let (lazyd, image) = (self.lazyd.clone(), image.to_string());
        tokio::spawn(async move {
            match lazyd.hold(&image, &holder).await {
                Ok(lower) => {
                    info!(image, holder, lower = %lower.display(), "pulled lazy image mounted")
                }
                Err(e) => warn!(
                    image,
                    holder, "cannot mount the pulled lazy image ahead of its containers: {e}"
                ),
            }
        });
    }

    fn committed_layers(&self, target: &str, parent: &str) -> Vec<(String, Option<LazyLayer>)> {
        committed_layers(&self.store(), target, parent)
    }

    /// The mounts of an active snapshot or view (holding its lazy lower in lazyd, which mounts
    /// it again if it is gone); `fresh` when the snapshot was just made (its root directory then
    /// takes the owner and mode of the tree below, as containerd's overlayfs snapshotter does).
    async fn mounts_of(
        &self,
        record: &Record,
        lowers: Lowers,
        fresh: bool,
    ) -> Result<Vec<Mount>, SnapError> {
        let mut dirs = lowers.dirs;
        if let (Some(image), Some(holder)) = (&lowers.lazy, &record.holder) {
            let lower = self.lazyd.hold(image, holder).await.map_err(|e| {
                SnapError::Unavailable(format!(
                    "lazyd cannot mount the lazy image {image} for snapshot {holder}: {e}"
                ))
            })?;
            dirs.push(lower);
        }
        let fs = self.fs(record.id);
        if fresh && record.kind == Kind::Active {
            if let Some(top) = dirs.first() {
                agent::mount::take_owner_and_mode(&fs, top).map_err(SnapError::io(format!(
                    "giving {} the owner and mode of {}",
                    fs.display(),
                    top.display()
                )))?;
            }
        }
        Ok(match record.kind {
            Kind::Active => active_mounts(&fs, &self.dir(record.id).join("work"), &dirs),
            _ => view_mounts(&fs, &dirs),
        })
    }

    /// The mounts of the active snapshot or view `key`.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapError> {
        let (record, lowers) = {
            let store = self.store();
            let record = get(&store, key)?.clone();
            if record.kind == Kind::Committed {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key} is committed: it has no mounts"
                )));
            }
            let lowers = lowers(&store, &record.parent, |id| self.fs(id))?;
            (record, lowers)
        };
        self.mounts_of(&record, lowers, false).await
    }

    /// Commits the active snapshot `key` as `name`.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapError> {
        let record = get(&self.store(), key)?.clone();
        if record.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is {}; only an active snapshot can be committed",
                record.kind.as_str()
            )));
        }
        let fs = self.fs(record.id);
        let usage = tokio::task::spawn_blocking(move || disk_usage(&fs))
            .await
            .map_err(|e| SnapError::Io {
                context: "measuring a snapshot".into(),
                source: std::io::Error::other(e),
            })??;
        {
            let mut store = self.store();
            if store.get(name).is_some() {
                return Err(SnapError::AlreadyExists(format!("snapshot {name} exists")));
            }
            get(&store, key)?;
            let committed = Record {
                kind: Kind::Committed,
                labels,
                updated: SystemTime::now(),
                holder: None,
                usage,
                ..record.clone()
            };
            store.apply(vec![
                (key.to_string(), None),
                (name.to_string(), Some(committed)),
            ])?;
        }
        let work = self.dir(record.id).join("work");
        if let Err(e) = std::fs::remove_dir_all(&work) {
            warn!(work = %work.display(), "cannot remove the work dir of a committed snapshot: {e}");
        }
        info!(
            name,
            key,
            id = record.id,
            size = usage.size,
            "snapshot committed"
        );
        if let Some(holder) = &record.holder {
            // Its children hold the lower for themselves.
            if let Err(e) = self.lazyd.release(holder).await {
                warn!(holder, "cannot release a committed snapshot's lower in lazyd (the next Cleanup does): {e}");
            }
        }
        Ok(())
    }

    /// Removes `key` (not while it has children): lets go of its lower in lazyd, then forgets
    /// it and deletes its directory.
    pub async fn remove(&self, key: &str) -> Result<(), SnapError> {
        let record = {
            let store = self.store();
            let record = get(&store, key)?.clone();
            if store.has_children(key) {
                return Err(SnapError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: other snapshots are based on it"
                )));
            }
            record
        };
        if let Some(holder) = &record.holder {
            self.lazyd.release(holder).await.map_err(|e| {
                SnapError::Unavailable(format!(
                    "cannot remove snapshot {key}: lazyd cannot release its lower ({holder}): {e}"
                ))
            })?;
        }
        {
            let mut store = self.store();
            store.apply(vec![(key.to_string(), None)])?;
        }
        if record.lazy.is_none() {
            let dir = self.dir(record.id);
            let deleted = tokio::task::spawn_blocking(move || {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!(dir = %dir.display(), "cannot delete a removed snapshot's directory (the next Cleanup tries again): {e}");
                }
            });
            // Before answering: containerd's Cleanup, which may come next, must not find it.
            let _ = deleted.await;
        }
        info!(key, id = record.id, "snapshot removed");
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapError> {
        Ok(Info::of(key, get(&self.store(), key)?))
    }

    /// Updates the labels of `info.name`: all of them with no field paths or `labels`, one
    /// with `labels.KEY` (removed when `info` does not have it). Nothing else can change.
    pub fn update(&self, info: Info, paths: &[String]) -> Result<Info, SnapError> {
        let mut store = self.store();
        let mut record = get(&store, &info.name)?.clone();
        for path in paths {
            if path == "labels" {
                record.labels = info.labels.clone();
            } else if let Some(label) = path.strip_prefix("labels.") {
                match info.labels.get(label) {
                    Some(v) => record.labels.insert(label.to_string(), v.clone()),
                    None => record.labels.remove(label),
                };
            } else {
                return Err(SnapError::InvalidArgument(format!(
                    "cannot update {path:?} of snapshot {}: only its labels can change",
                    info.name
                )));
            }
        }
        if paths.is_empty() {
            record.labels = info.labels;
        }
        record.updated = SystemTime::now();
        store.apply(vec![(info.name.clone(), Some(record.clone()))])?;
        Ok(Info::of(&info.name, &record))
    }

    /// Every snapshot that matches any of `filters` (all of them with none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapError> {
        let filters = Filters::parse(filters).map_err(SnapError::InvalidArgument)?;
        Ok(self
            .store()
            .iter()
            .map(|(name, r)| Info::of(name, r))
            .filter(|info| filters.matches(info))
            .collect())
    }

    /// Disk use of `key` alone (not its parents): measured now for an active snapshot, as
    /// committed for a committed one; a lazy layer uses none here (its bytes are lazyd's cache).
    pub async fn usage(&self, key: &str) -> Result<Usage, SnapError> {
        let record = get(&self.store(), key)?.clone();
        if record.kind == Kind::Committed || record.lazy.is_some() {
            return Ok(record.usage);
        }
        let fs = self.fs(record.id);
        tokio::task::spawn_blocking(move || disk_usage(&fs))
            .await
            .map_err(|e| SnapError::Io {
                context: "measuring a snapshot".into(),
                source: std::io::Error::other(e),
            })?
    }

    /// Deletes what no snapshot owns: directories under `snapshots/` and lazyd holders named
    /// after this snapshotter (left by a crash between two steps).
    pub async fn cleanup(&self) -> Result<(), SnapError> {
        let (ids, holders): (Vec<u64>, Vec<String>) = {
            let store = self.store();
            (
                store.iter().map(|(_, r)| r.id).collect(),
                store.iter().filter_map(|(_, r)| r.holder.clone()).collect(),
            )
        };
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots)
            .map_err(SnapError::io(format!("listing {}", snapshots.display())))?;
        for entry in entries.flatten() {
            let owned = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !owned {
                let path = entry.path();
                info!(dir = %path.display(), "cleanup: deleting a directory no snapshot owns");
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    warn!(dir = %path.display(), "cleanup: cannot delete: {e}");
                }
            }
        }
        let prefix = format!("{}-", self.holder_prefix);
        let held = self.lazyd.holders().await.map_err(|e| {
            SnapError::Unavailable(format!("cleanup: cannot list lazyd's holders: {e}"))
        })?;
        for lower in held {
            let ours = lower
                .holder
                .strip_prefix(&prefix)
                .is_some_and(|id| id.parse::<u64>().is_ok());
            if ours && !holders.contains(&lower.holder) {
                info!(holder = %lower.holder, "cleanup: releasing a lower no snapshot holds");
                if let Err(e) = self.lazyd.release(&lower.holder).await {
                    warn!(holder = %lower.holder, "cleanup: cannot release: {e}");
                }
            }
        }
        Ok(())
    }
}

fn get<'a>(store: &'a Store, key: &str) -> Result<&'a Record, SnapError> {
    store
        .get(key)
        .ok_or_else(|| SnapError::NotFound(format!("snapshot {key} does not exist")))
}

fn check_new(store: &Store, key: &str, parent: &str) -> Result<(), SnapError> {
    if store.get(key).is_some() {
        return Err(SnapError::AlreadyExists(format!("snapshot {key} exists")));
    }
    if parent.is_empty() {
        return Ok(());
    }
    match store.get(parent) {
        None => Err(SnapError::NotFound(format!(
            "parent snapshot {parent} does not exist"
        ))),
        Some(p) if p.kind != Kind::Committed => Err(SnapError::InvalidArgument(format!(
            "parent snapshot {parent} is {}, not committed",
            p.kind.as_str()
        ))),
        Some(_) => Ok(()),
    }
}

/// The committed snapshots of layer `target` on `parent` (names, and whether each is lazy).
fn committed_layers(store: &Store, target: &str, parent: &str) -> Vec<(String, Option<LazyLayer>)> {
    store
        .iter()
        .filter(|(_, r)| {
            r.kind == Kind::Committed
                && r.parent == parent
                && r.labels.get(SNAPSHOT_REF).map(String::as_str) == Some(target)
        })
        .map(|(name, r)| (name.clone(), r.lazy.clone()))
        .collect()
}

/// Walks the chain from `parent` down: ordinary layers' directories (`fs` of an id), until a
/// lazy image's top layer (whose tree is lazyd's mount of the whole image) or the chain's end.
fn lowers(store: &Store, parent: &str, fs: impl Fn(u64) -> PathBuf) -> Result<Lowers, SnapError> {
    let mut dirs = Vec::new();
    let mut name = parent;
    while !name.is_empty() {
        let r = get(store, name)?;
        if let Some(lazy) = &r.lazy {
            if !lazy.top {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {name} is a layer below the top of the lazy image {}: it has no tree of its own, so nothing can be stacked on it. The image being prepared shares lower layers with that lazy image but has no lazy version itself; convert it (lazyctl convert) or pull it with another snapshotter",
                    lazy.pulled_as
                )));
            }
            return Ok(Lowers {
                dirs,
                lazy: Some(lazy.image.clone()),
            });
        }
        dirs.push(fs(r.id));
        name = &r.parent;
    }
    Ok(Lowers { dirs, lazy: None })
}

/// An active snapshot: its `fs` alone, read-write (no parent), or an overlay over `lowers`.
fn active_mounts(fs: &Path, work: &Path, lowers: &[PathBuf]) -> Vec<Mount> {
    if lowers.is_empty() {
        return vec![bind(fs, "rw")];
    }
    let mut options = overlay_base();
    options.push(format!("workdir={}", work.display()));
    options.push(format!("upperdir={}", fs.display()));
    options.push(format!("lowerdir={}", join(lowers)));
    vec![overlay(options)]
}

/// A view: read-only; its (empty) `fs` with no parent, the one lower bound, or an overlay of
/// the lowers.
fn view_mounts(fs: &Path, lowers: &[PathBuf]) -> Vec<Mount> {
    match lowers {
        [] => vec![bind(fs, "ro")],
        [one] => vec![bind(one, "ro")],
        _ => {
            let mut options = overlay_base();
            options.push(format!("lowerdir={}", join(lowers)));
            vec![overlay(options)]
        }
    }
}

fn bind(source: &Path, mode: &str) -> Mount {
    Mount {
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec![mode.to_string(), "rbind".to_string()],
    }
}

fn overlay(options: Vec<String>) -> Mount {
    Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}

/// `index=off` where the kernel has overlay's index feature, as containerd's overlayfs
/// snapshotter does: with it, an overlay mounted again over a lower whose inodes changed (a
/// lazy image mounted again) could be refused.
fn overlay_base() -> Vec<String> {
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        vec!["index=off".to_string()]
    } else {
        Vec::new()
    }
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// The chain IDs of the layers with these diff IDs (OCI image spec: ChainID(L1) = DiffID(L1),
/// ChainID(L1..Ln) = sha256(ChainID(L1..Ln-1) + " " + DiffID(Ln))).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(below) => format!(
                "sha256:{}",
                hex_of(&Sha256::digest(format!("{below} {diff_id}").as_bytes()))
            ),
        };
        chain.push(next);
    }
    chain
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes (allocated blocks) and inodes under `dir`, each inode counted once, as containerd
/// counts a snapshot's usage.
fn disk_usage(dir: &Path) -> Result<Usage, SnapError> {
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(SnapError::io(format!("reading {}", path.display())))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX);
        }
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path)
                .map_err(SnapError::io(format!("listing {}", path.display())))?;
            for entry in entries {
                pending.push(
                    entry
                        .map_err(SnapError::io(format!("listing {}", path.display())))?
                        .path(),
                );
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let (a, b) = ("sha256:aa".to_string(), "sha256:bb".to_string());
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        let expected = Sha256::digest(format!("{a} {b}").as_bytes());
        assert_eq!(chain[1], format!("sha256:{}", hex_of(&expected)));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn mounts_are_those_of_containerds_overlayfs_snapshotter() {
        let (fs, work) = (
            Path::new("/r/snapshots/3/fs"),
            Path::new("/r/snapshots/3/work"),
        );
        assert_eq!(active_mounts(fs, work, &[]), vec![bind(fs, "rw")]);
        let lowers = [
            PathBuf::from("/r/snapshots/2/fs"),
            PathBuf::from("/lazyd/lower/ab"),
        ];
        let overlay = &active_mounts(fs, work, &lowers)[0];
        assert_eq!(overlay.kind, "overlay");
        assert_eq!(
            overlay.options[overlay.options.len() - 3..],
            [
                "workdir=/r/snapshots/3/work".to_string(),
                "upperdir=/r/snapshots/3/fs".to_string(),
                "lowerdir=/r/snapshots/2/fs:/lazyd/lower/ab".to_string(),
            ]
        );
        assert_eq!(view_mounts(fs, &[]), vec![bind(fs, "ro")]);
        assert_eq!(view_mounts(fs, &lowers[1..]), vec![bind(&lowers[1], "ro")]);
        let view = &view_mounts(fs, &lowers)[0];
        assert_eq!(view.kind, "overlay");
        assert!(!view.options.iter().any(|o| o.starts_with("upperdir")));
    }

    fn snapshotter(root: &Path) -> Snapshotter {
        // No lazyd listens there: these snapshots never ask it anything.
        let lazyd = Lazyd::new(&root.join("no-lazyd.sock"));
        let metrics = Arc::new(Metrics::default());
        Snapshotter::open(&root.join("root"), lazyd, "t", true, metrics).unwrap()
    }

    #[tokio::test]
    async fn the_snapshot_lifecycle_of_an_image_without_a_lazy_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = snapshotter(dir.path());
        let labels = HashMap::from([(SNAPSHOT_REF.to_string(), "sha256:l1".to_string())]);
        let mounts = s
            .create(Kind::Active, "x1", "", labels.clone())
            .await
            .unwrap();
        assert_eq!(
            (mounts[0].kind.as_str(), &mounts[0].options[0]),
            ("bind", &"rw".to_string())
        );
        std::fs::write(Path::new(&mounts[0].source).join("file"), vec![7u8; 10_000]).unwrap();
        s.commit("l1", "x1", labels).await.unwrap();
        assert!(matches!(s.stat("x1"), Err(SnapError::NotFound(_))));
        let l1 = s.stat("l1").unwrap();
        assert_eq!((l1.kind, l1.parent.as_str()), (Kind::Committed, ""));
        let usage = s.usage("l1").await.unwrap();
        assert!(usage.size >= 10_000 && usage.inodes == 2, "{usage:?}");

        // A layer already there is reused, not unpacked again.
        let again = HashMap::from([(SNAPSHOT_REF.to_string(), "sha256:l1".to_string())]);
        let Err(SnapError::AlreadyExists(_)) = s.create(Kind::Active, "x2", "", again).await else {
            panic!("a committed layer was prepared again");
        };
        let mounts = s
            .create(Kind::Active, "c1", "l1", HashMap::new())
            .await
            .unwrap();
        let options = &mounts[0].options;
        assert_eq!(mounts[0].kind, "overlay");
        assert!(
            options
                .iter()
                .any(|o| o.starts_with("lowerdir=") && o.ends_with("/1/fs")),
            "{options:?}"
        );
        let view = s
            .create(Kind::View, "v1", "l1", HashMap::new())
            .await
            .unwrap();
        assert_eq!(
            (view[0].kind.as_str(), &view[0].options[0]),
            ("bind", &"ro".to_string())
        );
        assert_eq!(s.mounts("c1").await.unwrap(), mounts);
        assert!(matches!(
            s.mounts("l1").await,
            Err(SnapError::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "c2", "c1", HashMap::new()).await,
            Err(SnapError::InvalidArgument(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "c1", "l1", HashMap::new()).await,
            Err(SnapError::AlreadyExists(_))
        ));

        // Labels: all at once, or one by path (absent from the info: removed).
        let mut info = s.stat("c1").unwrap();
        info.labels = HashMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        s.update(info.clone(), &[]).unwrap();
        info.labels = HashMap::from([("c".into(), "3".into())]);
        let updated = s
            .update(info, &["labels.c".into(), "labels.a".into()])
            .unwrap();
        let mut keys: Vec<_> = updated.labels.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["b", "c"]);
        assert!(matches!(
            s.update(updated, &["parent".into()]),
            Err(SnapError::InvalidArgument(_))
        ));
        let names = |filters: &[&str]| {
            let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
            let mut names: Vec<String> = s
                .list(&filters)
                .unwrap()
                .into_iter()
                .map(|i| i.name)
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&[]), ["c1", "l1", "v1"]);
        assert_eq!(names(&["kind==committed"]), ["l1"]);
        assert_eq!(
            names(&[r#"labels."containerd.io/snapshot.ref"==sha256:l1,parent=="""#]),
            ["l1"]
        );
        assert_eq!(names(&["labels.b==2", "kind==view"]), ["c1", "v1"]);
        assert!(s
            .metrics_text()
            .contains("lazy_snapshotter_snapshots{kind=\"active\"} 1"));
        assert!(s
            .metrics_text()
            .contains("lazy_snapshotter_layers_skipped_total{how=\"reused\"} 1"));

        // Children first; the directories go with their snapshots.
        assert!(matches!(
            s.remove("l1").await,
            Err(SnapError::FailedPrecondition(_))
        ));
        for key in ["c1", "v1", "l1"] {
            s.remove(key).await.unwrap();
        }
        assert!(s.list(&[]).unwrap().is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("root/snapshots"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn snapshots_survive_a_restart_and_cleanup_deletes_what_none_owns() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = snapshotter(dir.path());
            s.create(Kind::Active, "x1", "", HashMap::new())
                .await
                .unwrap();
            s.commit("l1", "x1", HashMap::new()).await.unwrap();
            s.create(Kind::Active, "c1", "l1", HashMap::new())
                .await
                .unwrap();
        }
        let orphan = dir.path().join("root/snapshots/99");
        std::fs::create_dir_all(orphan.join("fs")).unwrap();
        let s = snapshotter(dir.path());
        assert_eq!(s.stat("c1").unwrap().parent, "l1");
        assert!(s
            .metrics_text()
            .contains("lazy_snapshotter_snapshots{kind=\"committed\"} 1"));
        // The orphan goes; lazyd cannot be asked about holders, which Cleanup then reports.
        let Err(SnapError::Unavailable(e)) = s.cleanup().await else {
            panic!("cleanup without lazyd did not say so");
        };
        assert!(e.contains("lazyd"), "{e}");
        assert!(!orphan.exists());
        assert!(dir.path().join("root/snapshots/1/fs").is_dir());
        // A new snapshot gets an id no kept one has.
        let m = s
            .create(Kind::Active, "c2", "l1", HashMap::new())
            .await
            .unwrap();
        assert!(
            m[0].options.iter().any(|o| o.contains("/snapshots/3/fs")),
            "{m:?}"
        );
    }

    #[test]
    fn a_lower_layer_of_a_lazy_image_has_no_tree_to_stack_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("m.redb")).unwrap();
        let record = |id, parent: &str, lazy: Option<bool>| Record {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: HashMap::new(),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            lazy: lazy.map(|top| LazyLayer {
                image: "r/app@sha256:1".into(),
                pulled_as: "r/app:v1".into(),
                top,
            }),
            holder: None,
            usage: Usage::default(),
        };
        store
            .apply(vec![
                ("l1".into(), Some(record(1, "", Some(false)))),
                ("l2".into(), Some(record(2, "l1", Some(true)))),
                ("p3".into(), Some(record(3, "l2", None))),
            ])
            .unwrap();
        let fs = |id| PathBuf::from(format!("/fs/{id}"));
        let on_top = lowers(&store, "p3", fs).unwrap();
        assert_eq!(on_top.dirs, vec![PathBuf::from("/fs/3")]);
        assert_eq!(on_top.lazy.as_deref(), Some("r/app@sha256:1"));
        let Err(SnapError::FailedPrecondition(e)) = lowers(&store, "l1", fs) else {
            panic!("stacking on a lazy image's lower layer was not refused");
        };
        assert!(
            e.contains("below the top of the lazy image r/app:v1"),
            "{e}"
        );
    }
}
