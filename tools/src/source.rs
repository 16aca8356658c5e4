//! Resolving a source reference to an image config and an ordered list of layer blobs on
//! local disk: OCI layouts are read in place; archives are unpacked to a temporary directory
//! first; registry images are downloaded (`pull`, each blob checked against its digest).
//! What they resolve to (`SourceImage`) and the manifest reading they share are in `image`.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageManifest, ANNOTATION_REF_NAME,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ConvertError;
use crate::image::{parse_manifest, pick_platform, Expected, SourceImage, SourceLayer};
use crate::reference::SourceRef;

fn err(msg: String) -> ConvertError {
    ConvertError::Source(msg)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ConvertError> {
    let bytes = fs::read(path).map_err(ConvertError::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| err(format!("{} is not valid JSON: {e}", path.display())))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ConvertError> {
    if !fusefs::manifest::is_sha256_digest(digest) {
        return Err(err(format!("unsupported or malformed digest {digest:?}")));
    }
    Ok(layout.join("blobs").join("sha256").join(&digest[7..]))
}

/// Reads a small blob (manifest, config) and checks its digest.
fn read_verified(layout: &Path, digest: &str) -> Result<Vec<u8>, ConvertError> {
    let path = blob_path(layout, digest)?;
    let bytes = fs::read(&path).map_err(ConvertError::io(format!("reading blob {digest}")))?;
    let actual = sha256_hex(&bytes);
    if actual != digest {
        return Err(err(format!(
            "blob {digest} is corrupt: content hashes to {actual}"
        )));
    }
    Ok(bytes)
}

fn str_field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str, ConvertError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("{what} has no {key:?}")))
}

/// The image manifest of blob `digest` of `layout`, which `index.json` names: an image
/// manifest, or an image index of per-platform manifests, whose entry for this host is read
/// instead. Told apart by whether the JSON has `manifests` (not by the media type its
/// descriptor claims), then read as the oci-spec type.
fn read_manifest(layout: &Path, digest: &str) -> Result<ImageManifest, ConvertError> {
    let not_json = |e: serde_json::Error| err(format!("manifest {digest} is not valid JSON: {e}"));
    let value: Value = serde_json::from_slice(&read_verified(layout, digest)?).map_err(not_json)?;
    if value.get("manifests").is_none() {
        return serde_json::from_value(value).map_err(not_json);
    }
    let index: ImageIndex = serde_json::from_value(value).map_err(not_json)?;
    let digest = pick_platform(&index)?;
    parse_manifest(&read_verified(layout, &digest)?, &digest)
}

/// Opens an image from an OCI image layout directory.
pub fn open_oci(layout: &Path, tag: Option<&str>) -> Result<SourceImage, ConvertError> {
    let index: ImageIndex = read_json(&layout.join("index.json"))?;
    let manifests = index.manifests();
    let ref_name = |m: &Descriptor| {
        m.annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REF_NAME))
            .cloned()
    };
    let chosen = match tag {
        Some(t) => manifests.iter().find(|m| ref_name(m).as_deref() == Some(t)),
        None if manifests.len() == 1 => manifests.first(),
        None => manifests
            .iter()
            .find(|m| ref_name(m).as_deref() == Some("latest")),
    }
    .ok_or_else(|| {
        let tags: Vec<String> = manifests.iter().filter_map(ref_name).collect();
        err(format!(
            "no image {:?} in OCI layout {} (tags: {})",
            tag.unwrap_or("latest"),
            layout.display(),
            tags.join(", ")
        ))
    })?;
    let manifest = read_manifest(layout, chosen.digest().as_ref())?;
    let config = read_verified(layout, manifest.config().digest().as_ref())?;
    let layers = manifest
        .layers()
        .iter()
        .map(|l| {
            let d = l.digest().as_ref();
            Ok(SourceLayer {
                path: blob_path(layout, d)?,
                expected: Expected::Blob(d.to_string()),
                size: l.size(),
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    Ok(SourceImage {
        config,
        layers,
        _scratch: None,
    })
}

/// Unpacks an archive of image metadata and blobs (not a rootfs) into a scratch directory.
fn unpack_archive(path: &Path) -> Result<tempfile::TempDir, ConvertError> {
    let scratch = tempfile::tempdir().map_err(ConvertError::io("creating a scratch directory"))?;
    let f =
        fs::File::open(path).map_err(ConvertError::io(format!("opening {}", path.display())))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(f));
    // `unpack` refuses entries that would land outside the target directory.
    archive.unpack(scratch.path()).map_err(|e| {
        err(format!(
            "{} is not a readable image archive: {e}",
            path.display()
        ))
    })?;
    Ok(scratch)
}

/// Opens an OCI layout stored as a tar archive.
pub fn open_oci_archive(path: &Path) -> Result<SourceImage, ConvertError> {
    let scratch = unpack_archive(path)?;
    let mut image = open_oci(scratch.path(), None)?;
    image._scratch = Some(scratch);
    Ok(image)
}

/// Opens a `docker save` archive (manifest.json with Config and Layers paths).
pub fn open_docker_archive(path: &Path) -> Result<SourceImage, ConvertError> {
    let scratch = unpack_archive(path)?;
    let root = scratch.path();
    // docker save's own manifest.json ([{Config, RepoTags, Layers}]), which oci-spec has no type
    // for: read as plain JSON, each field checked with a message naming it.
    let manifest: Value = read_json(&root.join("manifest.json"))?;
    let entry = manifest
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| err("docker-archive manifest.json lists no image".into()))?;
    let inside = |p: &str| -> Result<PathBuf, ConvertError> {
        let rel = Path::new(p);
        if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            return Err(err(format!(
                "docker-archive names a path outside it: {p:?}"
            )));
        }
        Ok(root.join(rel))
    };
    let config_path = inside(str_field(entry, "Config", "docker-archive manifest")?)?;
    let config = fs::read(&config_path).map_err(ConvertError::io(format!(
        "reading {}",
        config_path.display()
    )))?;
    let config_json: ImageConfiguration = serde_json::from_slice(&config)
        .map_err(|e| err(format!("docker-archive config is not valid JSON: {e}")))?;
    let diff_ids = config_json.rootfs().diff_ids().clone();
    let layer_paths = entry
        .get("Layers")
        .and_then(Value::as_array)
        .ok_or_else(|| err("docker-archive manifest has no Layers".into()))?;
    if layer_paths.len() != diff_ids.len() {
        return Err(err(format!(
            "docker-archive lists {} layers but its config has {} diff_ids",
            layer_paths.len(),
            diff_ids.len()
        )));
    }
    let layers = layer_paths
        .iter()
        .zip(diff_ids)
        .map(|(p, diff_id)| {
            let p = p
                .as_str()
                .ok_or_else(|| err("docker-archive layer path is not a string".into()))?;
            let path = inside(p)?;
            let size = fs::metadata(&path)
                .map_err(ConvertError::io(format!("layer {p}")))?
                .len();
            Ok(SourceLayer {
                path,
                expected: Expected::Uncompressed(diff_id),
                size,
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    Ok(SourceImage {
        config,
        layers,
        _scratch: Some(scratch),
    })
}

/// Resolves any image source except `path:` (which has no layers).
pub fn open(src: &SourceRef) -> Result<SourceImage, ConvertError> {
    match src {
        SourceRef::Oci { path, tag } => open_oci(path, tag.as_deref()),
        SourceRef::OciArchive { path } => open_oci_archive(path),
        SourceRef::DockerArchive { path } => open_docker_archive(path),
        SourceRef::Docker { reference } => crate::pull::pull(reference),
        SourceRef::Path { dir } => Err(err(format!(
            "{} is a directory source, not an image",
            dir.display()
        ))),
        SourceRef::S3 { location } => Err(err(format!(
            "{location} is a source of plain objects, not an image"
        ))),
    }
}
