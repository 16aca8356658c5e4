//! `docker://` sources: download an image's manifest, config and layers from a registry into
//! a scratch directory (each blob checked against its digest while it streams to disk), then
//! convert from there like a local image.

use oci_spec::image::ImageIndex;

use agent::registry::{
    docker_config_credentials, ClientOptions, ImageRef, Reference, RegistryClient,
};

use crate::error::ConvertError;
use crate::image::{parse_manifest, pick_platform, Expected, SourceImage, SourceLayer};

fn err(e: impl std::fmt::Display) -> ConvertError {
    ConvertError::Source(e.to_string())
}

/// Pulls `reference` (`HOST/REPO:TAG` or `HOST/REPO@DIGEST`).
pub fn pull(reference: &str) -> Result<SourceImage, ConvertError> {
    let image = ImageRef::parse(reference).map_err(|e| ConvertError::BadReference {
        reference: reference.to_string(),
        reason: e.to_string(),
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ConvertError::io("starting the download runtime"))?;
    runtime.block_on(pull_async(image))
}

async fn pull_async(image: ImageRef) -> Result<SourceImage, ConvertError> {
    let options = ClientOptions {
        credentials: docker_config_credentials(&image.registry),
        ..ClientOptions::default()
    };
    let client = RegistryClient::new(&image.registry, options).map_err(err)?;
    let repo = image.repository.as_str();
    let mut manifest = client
        .get_manifest(repo, &image.reference)
        .await
        .map_err(err)?;
    if manifest.is_index() {
        let index: ImageIndex = serde_json::from_slice(&manifest.bytes).map_err(err)?;
        let digest = pick_platform(&index)?;
        manifest = client
            .get_manifest(repo, &Reference::Digest(digest))
            .await
            .map_err(err)?;
    }
    let m = parse_manifest(&manifest.bytes, &manifest.digest)?;
    let scratch = tempfile::tempdir().map_err(ConvertError::io("creating a download directory"))?;
    let config_path = scratch.path().join("config.json");
    client
        .get_blob_to_file(repo, m.config().digest().as_ref(), &config_path)
        .await
        .map_err(err)?;
    let config = std::fs::read(&config_path).map_err(ConvertError::io("reading the config"))?;
    let descriptors = m.layers();
    let mut layers = Vec::with_capacity(descriptors.len());
    for (i, d) in descriptors.iter().enumerate() {
        let digest = d.digest().as_ref();
        let path = scratch.path().join(format!("layer-{i}"));
        tracing::info!(layer = digest, "downloading");
        let size = client
            .get_blob_to_file(repo, digest, &path)
            .await
            .map_err(err)?;
        layers.push(SourceLayer {
            path,
            expected: Expected::Blob(digest.to_string()),
            size,
        });
    }
    Ok(SourceImage {
        config,
        layers,
        _scratch: Some(scratch),
    })
}
