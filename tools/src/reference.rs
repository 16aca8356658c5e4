//! Image references, following skopeo's transports so users already know them:
//! `oci:PATH[:TAG]`, `oci-archive:PATH`, `docker-archive:PATH`, `docker://HOST/REPO:TAG`,
//! `path:DIR` (a plain directory: a rootfs or a model folder) and `s3://BUCKET/PREFIX/` (the
//! objects under a prefix as plain files) as sources, and `dir:PATH[:TAG]`
//! (a local lazy-image store) as destination and mount source.

use std::path::PathBuf;

use agent::remote::{ImageLocation, RemoteError};
use agent::s3::S3Location;

use crate::error::ConvertError;

/// Where a conversion reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    Oci {
        path: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        path: PathBuf,
    },
    DockerArchive {
        path: PathBuf,
    },
    Docker {
        reference: String,
    },
    Path {
        dir: PathBuf,
    },
    /// The objects under an S3 prefix, as plain files.
    S3 {
        location: S3Location,
    },
}

/// A local lazy-image store and a tag in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRef {
    pub path: PathBuf,
    pub tag: String,
}

fn bad(reference: &str, reason: &str) -> ConvertError {
    ConvertError::BadReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    }
}

/// Splits `PATH[:TAG]` the way skopeo's `oci:` does: a trailing `:TAG` without '/' is a tag.
fn split_tag(rest: &str) -> (PathBuf, Option<String>) {
    match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.is_empty() && !tag.contains('/') && !path.is_empty() => {
            (PathBuf::from(path), Some(tag.to_string()))
        }
        _ => (PathBuf::from(rest), None),
    }
}

impl SourceRef {
    pub fn parse(s: &str) -> Result<SourceRef, ConvertError> {
        let (transport, rest) = s.split_once(':').ok_or_else(|| {
            bad(
                s,
                "expected TRANSPORT:REF, one of oci:, oci-archive:, docker-archive:, docker://, path:, s3://",
            )
        })?;
        if rest.is_empty() {
            return Err(bad(s, "empty reference after the transport"));
        }
        Ok(match transport {
            "oci" => {
                let (path, tag) = split_tag(rest);
                SourceRef::Oci { path, tag }
            }
            "oci-archive" => SourceRef::OciArchive {
                path: PathBuf::from(rest),
            },
            "docker-archive" => SourceRef::DockerArchive {
                path: PathBuf::from(rest),
            },
            "docker" => SourceRef::Docker {
                reference: rest
                    .strip_prefix("//")
                    .ok_or_else(|| bad(s, "docker references are docker://HOST/REPO:TAG"))?
                    .to_string(),
            },
            "path" => SourceRef::Path {
                dir: PathBuf::from(rest),
            },
            "s3" => SourceRef::S3 {
                location: S3Location::parse(s).map_err(|e| bad(s, &e.to_string()))?,
            },
            other => return Err(bad(s, &format!("unknown transport {other:?}"))),
        })
    }
}

impl StoreRef {
    /// Parses `dir:PATH[:TAG]`; the grammar is `agent::remote::ImageLocation`'s, so a store
    /// reference means the same to `convert`, `push` and `mount`.
    pub fn parse(s: &str) -> Result<StoreRef, ConvertError> {
        if !s.starts_with("dir:") {
            return Err(bad(s, "expected dir:PATH[:TAG] (a local lazy-image store)"));
        }
        match ImageLocation::parse(s) {
            Ok(ImageLocation::Dir { path, tag }) => Ok(StoreRef { path, tag }),
            Ok(_) => Err(bad(s, "expected dir:PATH[:TAG] (a local lazy-image store)")),
            Err(RemoteError::BadLocation { reason, .. }) => Err(bad(s, &reason)),
            Err(e) => Err(bad(s, &e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_transport() {
        assert_eq!(
            SourceRef::parse("oci:/x/layout:v1").unwrap(),
            SourceRef::Oci {
                path: "/x/layout".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            SourceRef::parse("oci:layout").unwrap(),
            SourceRef::Oci {
                path: "layout".into(),
                tag: None
            }
        );
        assert_eq!(
            SourceRef::parse("docker://127.0.0.1:5000/a/b:t").unwrap(),
            SourceRef::Docker {
                reference: "127.0.0.1:5000/a/b:t".into()
            }
        );
        assert!(matches!(
            SourceRef::parse("docker-archive:/a.tar").unwrap(),
            SourceRef::DockerArchive { .. }
        ));
        assert!(matches!(
            SourceRef::parse("oci-archive:/a.tar").unwrap(),
            SourceRef::OciArchive { .. }
        ));
        assert!(matches!(
            SourceRef::parse("path:/models/x").unwrap(),
            SourceRef::Path { .. }
        ));
        match SourceRef::parse("s3://models/raw/llama/").unwrap() {
            SourceRef::S3 { location } => {
                assert_eq!(
                    (location.bucket(), location.prefix()),
                    ("models", "raw/llama")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(SourceRef::parse("s3://models/a/../b").is_err());
        assert!(SourceRef::parse("ftp:/x").is_err());
        assert!(SourceRef::parse("docker:x").is_err());
        assert!(SourceRef::parse("nonsense").is_err());
    }

    #[test]
    fn store_refs_default_to_latest() {
        let r = StoreRef::parse("dir:/var/lib/store").unwrap();
        assert_eq!(r.path, PathBuf::from("/var/lib/store"));
        assert_eq!(r.tag, "latest");
        let r = StoreRef::parse("dir:/s:v2").unwrap();
        assert_eq!((r.path, r.tag.as_str()), (PathBuf::from("/s"), "v2"));
        assert!(StoreRef::parse("/s").is_err());
    }
}
