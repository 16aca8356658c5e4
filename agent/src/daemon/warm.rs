//! Warms: fetching an image, or its profile's hot set, into the cache at background priority
//! and full speed for `lazyctl warm`, reporting progress ([`Warms`] holds the running ones, for
//! `status`); and a new remote mount's prefetch, which is a warm too: its hot set at prefetch
//! priority, then, when `background.whole_image` says so, the whole image in layout order under
//! `background.bandwidth`, both stopped when the mount goes. Chunks already cached are skipped,
//! so a second warm fetches nothing and an interrupted one continues where it stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fusefs::Index;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::mounts::LiveMount;
use super::{Agent, AgentError};
use crate::api::{WarmEvent, WarmInfo, WarmRequest};
use crate::config::WholeImage;
use crate::fetcher::{Backend, Priority, WarmError, WarmOptions, WarmProgress};
use crate::profile::{self, Profile};
use crate::remote::{ImageLocation, OpenedImage};
use crate::sync::lock;

/// The warms in progress.
#[derive(Default)]
pub(super) struct Warms {
    /// By id, in the order they started.
    running: Mutex<BTreeMap<u64, RunningWarm>>,
    next: AtomicU64,
}

impl Warms {
    pub(super) fn len(&self) -> usize {
        lock(&self.running).len()
    }

    pub(super) fn infos(&self) -> Vec<WarmInfo> {
        lock(&self.running)
            .values()
            .map(|w| WarmInfo {
                image: w.image.clone(),
                hot: w.hot,
                running_secs: w.started.elapsed().as_secs_f64(),
                progress: w.progress.clone(),
            })
            .collect()
    }
}

struct RunningWarm {
    image: String,
    hot: bool,
    started: Instant,
    progress: WarmProgress,
}

/// How often a warm reports progress to its client (the last report is always sent).
const WARM_REPORT_INTERVAL: Duration = Duration::from_millis(200);

impl Agent {
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
        self.images.touch(&opened.manifest_digest);
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
        let id = self.warms.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.warms.running).insert(
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
                if let Some(w) = lock(&agent.warms.running).get_mut(&id) {
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
            lock(&agent.warms.running).remove(&id);
            result
        })
        .await
        .map_err(|e| AgentError::Io {
            context: "warm task".into(),
            source: std::io::Error::other(e),
        })?;
        Ok(outcome?)
    }

    /// What a new remote mount fetches before it is read: its profile's hot set at prefetch
    /// priority (in profile order, filling the link from the start, demand reads still first),
    /// then, when `background.whole_image` says so (by default: only when there is no
    /// profile), the whole image in layout order at background priority, under
    /// `background.bandwidth`, up to half of the cache budget. Both stop when the mount goes.
    pub(super) async fn prefetch_after_mount(
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
