//! The images the agent has opened ([`KnownImages`], kept in `STATE/images.json`): each with
//! its manifest and index digests and when it was last used, for `gc`, which keeps the chunks
//! of the images remembered here and forgets those unused for long. Opening an image for a
//! mount, a container or a warm remembers it; using or releasing one touches it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{error, warn};

use super::unix_now;
use crate::api::KnownImage;
use crate::remote::{ImageLocation, OpenedImage};
use crate::sync::lock;

/// The images the agent has opened, in the state directory.
const IMAGES_FILE: &str = "images.json";

/// The images the agent has opened, as in `STATE/images.json`.
pub(super) struct KnownImages {
    state_dir: PathBuf,
    list: Mutex<Vec<KnownImage>>,
}

impl KnownImages {
    /// The images the state directory `state_dir` keeps; none when its list is unreadable.
    pub(super) fn load(state_dir: &Path) -> KnownImages {
        KnownImages {
            state_dir: state_dir.to_path_buf(),
            list: Mutex::new(load_images(&state_dir.join(IMAGES_FILE))),
        }
    }

    /// Records that the agent uses `opened`, for `gc`.
    pub(super) fn remember(&self, location: &str, opened: &OpenedImage) {
        // A local store keeps its own index; gc cannot reopen it from the cache, so chunks a
        // `dir:` image with referenced S3 objects fetched are kept only while it is mounted.
        if let ImageLocation::Dir { .. } = opened.location {
            return;
        }
        {
            let mut images = lock(&self.list);
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
        self.save();
    }

    pub(super) fn touch(&self, manifest_digest: &str) {
        {
            let mut images = lock(&self.list);
            for img in images
                .iter_mut()
                .filter(|i| i.manifest_digest == manifest_digest)
            {
                img.last_used = unix_now();
            }
        }
        self.save();
    }

    /// Keeps the images `keep` says to keep; returns those kept.
    pub(super) fn retain(&self, keep: impl FnMut(&KnownImage) -> bool) -> Vec<KnownImage> {
        let mut images = lock(&self.list);
        images.retain(keep);
        images.clone()
    }

    pub(super) fn list(&self) -> Vec<KnownImage> {
        lock(&self.list).clone()
    }

    pub(super) fn save(&self) {
        let path = self.state_dir.join(IMAGES_FILE);
        let bytes = match serde_json::to_vec_pretty(&*lock(&self.list)) {
            Ok(b) => b,
            Err(e) => {
                error!("cannot encode the image list: {e}");
                return;
            }
        };
        if let Err(e) = crate::store::write_atomic(&self.state_dir, &path, &bytes) {
            error!("cannot save the image list: {e}");
        }
    }
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
