//! What resolving a source yields, and the OCI reading its resolvers share: a [`SourceImage`]
//! (the config and the layer blobs on local disk, each with what it is checked against), the
//! platform picked from a multi-platform image, and typed parsing of image manifests.
//!
//! `source` (OCI layouts and archives) and `pull` (registries) both build on this module, and
//! `source` dispatches to `pull`: the dependencies point one way.
//!
//! Manifests and indexes are read as oci-spec's `ImageManifest` and `ImageIndex`. Docker's
//! schema 2 manifests and manifest lists have the same shape (their media types read as
//! `MediaType::Other`), so the same types read a registry's images of either kind.

use std::path::PathBuf;

use oci_spec::image::{ImageIndex, ImageManifest};

use crate::error::ConvertError;

/// What the converter checks a layer blob against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Digest of the blob as stored (OCI layouts, registries).
    Blob(String),
    /// Digest of the uncompressed tar (docker-archive, whose layers are named by diff_id).
    Uncompressed(String),
}

#[derive(Debug, Clone)]
pub struct SourceLayer {
    pub path: PathBuf,
    pub expected: Expected,
    pub size: u64,
}

/// A source image ready to convert.
pub struct SourceImage {
    /// The image config JSON, passed through to the lazy image.
    pub config: Vec<u8>,
    pub layers: Vec<SourceLayer>,
    /// Keeps unpacked archives or downloads alive until conversion ends.
    pub _scratch: Option<tempfile::TempDir>,
}

/// The platform this converter picks from multi-platform images.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Picks the manifest for this host from an image index: the digest of the first entry of
/// this host's platform.
pub fn pick_platform(index: &ImageIndex) -> Result<String, ConvertError> {
    let (os, arch) = host_platform();
    index
        .manifests()
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
        })
        .map(|m| m.digest().to_string())
        .ok_or_else(|| ConvertError::Source(format!("image index has no manifest for {os}/{arch}")))
}

/// Parses the image manifest `digest`.
pub(crate) fn parse_manifest(bytes: &[u8], digest: &str) -> Result<ImageManifest, ConvertError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ConvertError::Source(format!("manifest {digest} is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_docker_manifest_list_with_an_attestation_entry_gives_the_hosts_manifest() {
        let (os, arch) = host_platform();
        let list = format!(
            r#"{{"schemaVersion":2,
                "mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
                "manifests":[
                  {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{DIGEST_A}",
                    "size":1,"platform":{{"architecture":"unknown","os":"unknown"}}}},
                  {{"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
                    "digest":"{DIGEST_B}","size":2,
                    "platform":{{"architecture":"{arch}","os":"{os}"}}}}]}}"#
        );
        let index: ImageIndex = serde_json::from_str(&list).unwrap();
        assert_eq!(pick_platform(&index).unwrap(), DIGEST_B);
    }

    #[test]
    fn an_index_without_the_hosts_platform_is_refused_by_name() {
        let index: ImageIndex = serde_json::from_str(&format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "digest":"{DIGEST_A}","size":1,"platform":{{"architecture":"s390x","os":"plan9"}}}}]}}"#
        ))
        .unwrap();
        let (os, arch) = host_platform();
        assert_eq!(
            pick_platform(&index).unwrap_err().to_string(),
            ConvertError::Source(format!("image index has no manifest for {os}/{arch}"))
                .to_string()
        );
    }

    #[test]
    fn a_docker_schema2_manifest_reads_as_an_image_manifest() {
        let manifest = format!(
            r#"{{"schemaVersion":2,
                "mediaType":"application/vnd.docker.distribution.manifest.v2+json",
                "config":{{"mediaType":"application/vnd.docker.container.image.v1+json",
                  "digest":"{DIGEST_A}","size":10}},
                "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip",
                  "digest":"{DIGEST_B}","size":20}}]}}"#
        );
        let m = parse_manifest(manifest.as_bytes(), "sha256:m").unwrap();
        assert_eq!(m.config().digest().as_ref(), DIGEST_A);
        assert_eq!(m.layers()[0].digest().as_ref(), DIGEST_B);
        assert_eq!(m.layers()[0].size(), 20);
        let err = parse_manifest(b"{", "sha256:m").unwrap_err().to_string();
        assert!(
            err.contains("manifest sha256:m is not valid JSON: "),
            "{err}"
        );
    }
}
