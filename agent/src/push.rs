//! Copying a lazy image from a local store to where mounts will read it: a registry, S3 or
//! another local store.
//!
//! Blobs go first (config, index, data blobs; several at a time; blobs the destination already
//! holds are skipped, and so are blobs whose descriptor has `urls`: objects indexed in place by
//! `convert --reference`, which are in no store), the manifest last, so a reader never finds a manifest whose blobs are
//! missing. In a registry the manifest may carry a `subject` (the source image's manifest), so
//! the referrers API finds the lazy image from the source image; on registries without that API
//! the referrers tag-schema index (`sha256-<hex>`) is updated instead, as OCI distribution 1.1
//! asks of clients.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use fusefs::manifest::{Descriptor, LazyManifest, MEDIA_TYPE_OCI_MANIFEST};
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::registry::{PushedBlob, Reference, Referrer};
use crate::remote::{registry_client, s3_store, ImageLocation, RemoteError, RemoteOptions};
use crate::s3::BlobUpload;
use crate::store::{sha256_digest, LocalStore};

/// Blob uploads in flight at once.
const PARALLEL_UPLOADS: usize = 4;

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub destination: String,
    pub manifest_digest: String,
    pub blobs: usize,
    pub uploaded_blobs: usize,
    pub uploaded_bytes: u64,
    pub skipped_bytes: u64,
    /// The registry has no referrers API and the tag-schema index was updated instead.
    pub referrers_fallback: bool,
    pub seconds: f64,
}

impl PushReport {
    pub fn summary(&self) -> String {
        format!(
            "pushed {} to {}: {} blob(s), {} uploaded ({:.1} MiB), {:.1} MiB already there, in {:.2} s",
            self.manifest_digest,
            self.destination,
            self.blobs,
            self.uploaded_blobs,
            self.uploaded_bytes as f64 / (1 << 20) as f64,
            self.skipped_bytes as f64 / (1 << 20) as f64,
            self.seconds
        )
    }
}

/// Pushes image `tag` of `src` to `dest`. `subject` (a registry destination only) is the source
/// image's manifest, recorded so the referrers API can find the lazy image from it.
pub async fn push_image(
    src: &LocalStore,
    tag: &str,
    dest: &ImageLocation,
    subject: Option<Descriptor>,
    opts: &RemoteOptions,
) -> Result<PushReport, RemoteError> {
    let started = Instant::now();
    let local_digest = src.resolve(tag)?;
    let mut manifest = LazyManifest::parse(&src.read_blob(&local_digest)?).map_err(|source| {
        RemoteError::Manifest {
            location: format!("dir:{}:{tag}", src.root().display()),
            source,
        }
    })?;
    // Blobs with `urls` (`convert --reference`) are stored elsewhere, not in any store.
    let blobs: Vec<(String, PathBuf, u64)> = std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .filter(|d| d.external_url().is_none())
        .map(|d| Ok((d.digest.clone(), src.blob_path(&d.digest)?, d.size)))
        .collect::<Result<_, RemoteError>>()?;
    let mut report = PushReport {
        destination: dest.to_string(),
        manifest_digest: String::new(),
        blobs: blobs.len(),
        uploaded_blobs: 0,
        uploaded_bytes: 0,
        skipped_bytes: 0,
        referrers_fallback: false,
        seconds: 0.0,
    };

    match dest {
        ImageLocation::Registry(image) => {
            let client = registry_client(&image.registry, opts)?;
            let repo = image.repository.clone();
            let uploads = upload_all(blobs, |digest, path, _size| {
                let client = client.clone();
                let repo = repo.clone();
                async move {
                    let pushed = client.push_blob_file(&repo, &digest, &path).await?;
                    Ok(pushed == PushedBlob::Uploaded)
                }
            })
            .await?;
            tally(&mut report, &uploads);
            let subject_digest = subject.as_ref().map(|s| s.digest.clone());
            manifest.subject = subject;
            let bytes = manifest.to_json();
            let reference = match &image.reference {
                Reference::Tag(t) => Reference::Tag(t.clone()),
                Reference::Digest(_) => Reference::Digest(sha256_digest(&bytes)),
            };
            let pushed = client
                .put_manifest(&repo, &reference, MEDIA_TYPE_OCI_MANIFEST, &bytes)
                .await?;
            report.manifest_digest = pushed.digest.clone();
            if let Some(subject) = subject_digest {
                if !pushed.subject_accepted {
                    debug!(%repo, "registry has no referrers API; updating the tag-schema index");
                    let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &bytes);
                    client
                        .add_referrer_fallback(&repo, &subject, &referrer)
                        .await?;
                    report.referrers_fallback = true;
                }
            }
        }
        ImageLocation::S3(location) => {
            // Uploads are retried by the SDK (3 attempts): a push has no retry loop of its own.
            let s3 = Arc::new(s3_store(location, opts, 3).await?);
            let uploads = upload_all(blobs, |digest, path, _size| {
                let s3 = s3.clone();
                async move {
                    let outcome = s3.put_blob_file(&digest, &path).await?;
                    Ok(outcome == BlobUpload::Uploaded)
                }
            })
            .await?;
            tally(&mut report, &uploads);
            let bytes = manifest.to_json();
            s3.put_bytes(&location.manifest_key(), bytes.clone())
                .await?;
            report.manifest_digest = sha256_digest(&bytes);
        }
        ImageLocation::Dir { path, tag } => {
            let dst = LocalStore::create(path)?;
            let mut uploads = Vec::new();
            for (digest, from, size) in blobs {
                let copied = !dst.has_blob(&digest);
                if copied {
                    let mut tmp = dst.temp_file()?;
                    let mut file = std::fs::File::open(&from).map_err(RemoteError::io(&from))?;
                    std::io::copy(&mut file, tmp.as_file_mut())
                        .map_err(RemoteError::io(tmp.path()))?;
                    dst.commit_blob(tmp, &digest)?;
                }
                uploads.push((copied, size));
            }
            tally(&mut report, &uploads);
            report.manifest_digest = dst.put_manifest(tag, &manifest)?;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    info!("{}", report.summary());
    Ok(report)
}

fn tally(report: &mut PushReport, uploads: &[(bool, u64)]) {
    for &(uploaded, size) in uploads {
        if uploaded {
            report.uploaded_blobs += 1;
            report.uploaded_bytes += size;
        } else {
            report.skipped_bytes += size;
        }
    }
}

/// Runs `upload(digest, path, size)` for every blob, [`PARALLEL_UPLOADS`] at a time. Each
/// returns whether it uploaded (false: the blob was already there). Returns `(uploaded, size)`
/// per blob; the first error stops the rest.
async fn upload_all<F, Fut>(
    blobs: Vec<(String, PathBuf, u64)>,
    upload: F,
) -> Result<Vec<(bool, u64)>, RemoteError>
where
    F: Fn(String, PathBuf, u64) -> Fut,
    Fut: std::future::Future<Output = Result<bool, RemoteError>> + Send + 'static,
{
    let mut pending = blobs.into_iter();
    let mut running = JoinSet::new();
    let mut done = Vec::new();
    loop {
        while running.len() < PARALLEL_UPLOADS {
            let Some((digest, path, size)) = pending.next() else {
                break;
            };
            let fut = upload(digest, path, size);
            running.spawn(async move { fut.await.map(|uploaded| (uploaded, size)) });
        }
        let Some(joined) = running.join_next().await else {
            return Ok(done);
        };
        let outcome = joined.map_err(|e| RemoteError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("upload task failed: {e}")),
        })?;
        done.push(outcome?);
    }
}
