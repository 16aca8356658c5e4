//! Garbage collection of the cache (`lazyctl gc`): forgets the known images (`images`) unused
//! for long, never a mounted one, drops their kept manifests and indexes, and removes every
//! cached chunk that neither a mount nor a remembered image references. No state of its own.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use fusefs::Index;
use tracing::{info, warn};

use super::mounts::LiveMount;
use super::{unix_now, Agent, AgentError};
use crate::api::{GcReport, GcRequest, KnownImage};
use crate::remote::{self, ImageLocation};

impl Agent {
    /// Forgets images unused for `unused_for_secs` (never a mounted one), drops their kept
    /// manifests and indexes, and removes every cached chunk no remembered image references.
    pub async fn gc(self: &Arc<Self>, req: GcRequest) -> Result<GcReport, AgentError> {
        self.reap();
        let now = unix_now();
        let mounted: Vec<Arc<LiveMount>> = self.mounts.all();
        // A holder's lower may be down (lazyd restarted without its mounts); its image is
        // wanted all the same.
        let holders = self.containers.holders();
        let mounted_digests: HashSet<&str> = mounted
            .iter()
            .map(|m| m.opened.manifest_digest.as_str())
            .chain(holders.iter().map(|h| h.manifest_digest.as_str()))
            .collect();
        let mut forgotten = Vec::new();
        let kept: Vec<KnownImage> = self.images.retain(|img| {
            let stale = !mounted_digests.contains(img.manifest_digest.as_str())
                && req
                    .unused_for_secs
                    .is_some_and(|d| now.saturating_sub(img.last_used) >= d);
            if stale {
                forgotten.push(img.location.clone());
            }
            !stale
        });
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
            self.images
                .retain(|i| !unusable.contains(&i.manifest_digest));
        }
        self.images.save();
        let removed_indexes = remove_unwanted(&index_dir, &wanted_indexes);
        let wanted_manifests: HashSet<String> = self
            .images
            .list()
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
