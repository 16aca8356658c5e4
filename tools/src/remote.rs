//! The remote side of `lazyctl`: converting straight to a registry or S3 (convert into a
//! scratch store, then push), pushing a stored image, and setting up the chunk cache and fetcher
//! a remote mount reads through.
//!
//! Cache directory layout: `DIR/chunks` (the compressed chunk cache's segments), `DIR/indexes`
//! (indexes of opened images, by digest) and `DIR/manifests` (their manifests, by location).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent::cache::{CacheConfig, ChunkCache};
use agent::fetcher::{Fetcher, FetcherConfig};
use agent::push::{push_image, PushReport};
use agent::registry::ImageRef;
use agent::remote::{registry_client, ImageLocation, RemoteOptions};
use agent::store::LocalStore;
use anyhow::{bail, Context, Result};
use fusefs::manifest::Descriptor;

use crate::reference::{SourceRef, StoreRef};
use crate::{convert, ConvertOptions, ConvertReport};

/// Where the chunk cache of `cache_dir` keeps its segments.
pub fn chunk_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join(agent::remote::CHUNK_DIR)
}

/// Opens the chunk cache in `cache_dir` (creating it) and a fetcher over it, whose requests run
/// on `runtime`.
pub fn fetcher(
    cache_dir: &Path,
    cache_size: u64,
    config: FetcherConfig,
    runtime: tokio::runtime::Handle,
) -> Result<Arc<Fetcher>> {
    let cache = ChunkCache::open(&CacheConfig {
        dir: chunk_dir(cache_dir),
        budget_bytes: cache_size,
    })
    .with_context(|| format!("opening the chunk cache in {}", cache_dir.display()))?;
    Fetcher::new(config, Some(Arc::new(cache)), runtime).context("starting the fetcher")
}

/// A runtime for `lazyctl`'s own network work (pushes, a standalone mount's fetcher).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting a runtime")
}

/// The descriptor of the manifest `reference` names, which must be in the repository of `dst`.
async fn subject_descriptor(
    reference: &str,
    dst: &ImageLocation,
    opts: &RemoteOptions,
) -> Result<Descriptor> {
    let ImageLocation::Registry(target) = dst else {
        bail!("--subject needs a registry destination (docker://HOST/REPO:TAG)");
    };
    let subject = ImageRef::parse(reference)?;
    if subject.registry != target.registry || subject.repository != target.repository {
        bail!(
            "the subject {subject} must be in the destination repository {}/{} (the referrers API is per repository)",
            target.registry,
            target.repository
        );
    }
    let client = registry_client(&subject.registry, opts)?;
    let manifest = client
        .get_manifest(&subject.repository, &subject.reference)
        .await
        .with_context(|| format!("reading the subject {subject}"))?;
    Ok(Descriptor {
        media_type: manifest.media_type.clone(),
        digest: manifest.digest.clone(),
        size: manifest.bytes.len() as u64,
        urls: None,
        annotations: None,
    })
}

/// `lazyctl push`: copies image `src` to `dst`, with `subject` (a `docker://` reference in the
/// destination repository) recorded for the referrers API.
pub fn push(
    src: &StoreRef,
    dst: &ImageLocation,
    subject: Option<&str>,
    opts: &RemoteOptions,
) -> Result<PushReport> {
    let store = LocalStore::open(&src.path)?;
    runtime()?.block_on(async {
        let subject = match subject {
            Some(s) => Some(subject_descriptor(s, dst, opts).await?),
            None => None,
        };
        push_image(&store, &src.tag, dst, subject, opts)
            .await
            .with_context(|| format!("pushing to {dst}"))
    })
}

/// `lazyctl convert` to any destination: a local store directly; a registry or S3 through a
/// scratch store, then a push. Converting `docker://HOST/REPO:TAG` into the same repository
/// records the source image as the lazy image's subject.
pub fn convert_to(
    src: &SourceRef,
    dst: &ImageLocation,
    opts: &ConvertOptions,
    remote: &RemoteOptions,
) -> Result<(ConvertReport, Option<PushReport>)> {
    if let ImageLocation::Dir { path, tag } = dst {
        let report = convert(
            src,
            &StoreRef {
                path: path.clone(),
                tag: tag.clone(),
            },
            opts,
        )?;
        return Ok((report, None));
    }
    let scratch = tempfile::Builder::new()
        .prefix("lazyctl-convert-")
        .tempdir()
        .context("creating a scratch store")?;
    let store = StoreRef {
        path: scratch.path().to_path_buf(),
        tag: "latest".into(),
    };
    let report = convert(src, &store, opts)?;
    let subject = match (src, dst) {
        (SourceRef::Docker { reference }, ImageLocation::Registry(target)) => {
            let source = ImageRef::parse(reference)?;
            let same_repo = source.registry == target.registry
                && source.repository == target.repository
                && source.reference != target.reference;
            same_repo.then(|| format!("docker://{source}"))
        }
        _ => None,
    };
    let pushed = push(&store, dst, subject.as_deref(), remote)?;
    Ok((report, Some(pushed)))
}
