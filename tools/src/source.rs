//! Resolving a source reference to an image config and an ordered list of layer blobs on
//! local disk: OCI layouts are read in place; archives are unpacked to a temporary directory
//! first; registry images are downloaded (each blob checked against its digest).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::ConvertError;
use crate::reference::SourceRef;

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

fn err(msg: String) -> ConvertError {
    ConvertError::Source(msg)
}

fn read_json(path: &Path) -> Result<Value, ConvertError> {
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

/// The platform this converter picks from multi-platform images.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Picks the manifest for this host from an image index.
pub fn pick_platform(index: &Value) -> Result<String, ConvertError> {
    let (os, arch) = host_platform();
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| err("image index has no manifests".into()))?;
    manifests
        .iter()
        .find(|m| {
            m.get("platform").is_some_and(|p| {
                p.get("os").and_then(Value::as_str) == Some(os)
                    && p.get("architecture").and_then(Value::as_str) == Some(arch)
            })
        })
        .and_then(|m| m.get("digest").and_then(Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| err(format!("image index has no manifest for {os}/{arch}")))
}

fn is_index(v: &Value) -> bool {
    v.get("manifests").is_some()
}

/// Opens an image from an OCI image layout directory.
pub fn open_oci(layout: &Path, tag: Option<&str>) -> Result<SourceImage, ConvertError> {
    let index = read_json(&layout.join("index.json"))?;
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            err(format!(
                "{}/index.json lists no manifests",
                layout.display()
            ))
        })?;
    let ref_name = |m: &Value| {
        m.pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str)
            .map(str::to_string)
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
    let mut digest = str_field(chosen, "digest", "index.json entry")?.to_string();
    let mut manifest: Value = serde_json::from_slice(&read_verified(layout, &digest)?)
        .map_err(|e| err(format!("manifest {digest} is not valid JSON: {e}")))?;
    if is_index(&manifest) {
        digest = pick_platform(&manifest)?;
        manifest = serde_json::from_slice(&read_verified(layout, &digest)?)
            .map_err(|e| err(format!("manifest {digest} is not valid JSON: {e}")))?;
    }
    let config_digest = manifest
        .pointer("/config/digest")
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("manifest {digest} has no config")))?;
    let config = read_verified(layout, config_digest)?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| err(format!("manifest {digest} has no layers")))?
        .iter()
        .map(|l| {
            let d = str_field(l, "digest", "layer descriptor")?;
            Ok(SourceLayer {
                path: blob_path(layout, d)?,
                expected: Expected::Blob(d.to_string()),
                size: l.get("size").and_then(Value::as_u64).unwrap_or(0),
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
    let manifest = read_json(&root.join("manifest.json"))?;
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
    let config_json: Value = serde_json::from_slice(&config)
        .map_err(|e| err(format!("docker-archive config is not valid JSON: {e}")))?;
    let diff_ids: Vec<String> = config_json
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
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
