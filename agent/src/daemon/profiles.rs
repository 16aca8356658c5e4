//! Hot-chunk profiles as the agent keeps them: each mount records which chunks are read in its
//! first seconds (`profile.window`), in first-access order; when the window ends the run is
//! merged into the image's local profile (`STATE/profiles`) and queued for pushing beside the
//! image (`STATE/profiles/pending`, pushed by `lazyctl profile push` or at once with
//! `profile.push`). A new mount looks up its image's profile here (local, else beside the
//! image) for `warm` to prefetch. The state is in those files and in each mount's recorder
//! (`mounts::LiveMount`); the profiles' format and merging are [`crate::profile`]'s.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::mounts::LiveMount;
use super::{Agent, AgentError};
use crate::api::ProfileReport;
use crate::profile::{self, Profile, ProfileError};
use crate::remote::OpenedImage;

impl Agent {
    pub(super) fn profile_dir(&self) -> PathBuf {
        self.config.state_dir.join("profiles")
    }

    fn pending_dir(&self) -> PathBuf {
        self.config.state_dir.join("profiles").join("pending")
    }

    /// The image's profile (the local one, else the one beside the image) and where it came
    /// from, when profile prefetch is on and there is one; a profile that cannot be read is
    /// logged and treated as none.
    pub(super) async fn find_profile(
        &self,
        opened: &OpenedImage,
        image: &str,
    ) -> Option<(Profile, String)> {
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

    pub(super) fn schedule_recording_end(
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
    pub(super) async fn save_recording(&self, live: &LiveMount) {
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
}
